//! The devices this build can run on.

use burn::tensor::Device;

/// A device compiled into this build, with the name users pass on command lines.
#[derive(Debug, Clone)]
pub struct NamedDevice {
    /// `"ndarray"`, `"flex"`, `"wgpu"` or `"cuda"`.
    pub name: &'static str,
    /// The device itself (without autodiff; call `.autodiff()` to train on it).
    pub device: Device,
}

/// Every device whose backend feature is enabled in this build, in the order
/// ndarray, flex, wgpu, cuda.
///
/// Creating a device is lazy: a wgpu device is listed even on a machine without an adapter,
/// and fails on first use there. [`device_by_name`] picks one of these by name.
// One `push` per backend feature reads better than a `vec!` of `cfg`-gated items.
#[allow(clippy::vec_init_then_push)]
pub fn available_devices() -> Vec<NamedDevice> {
    #[allow(unused_mut)] // with no backend feature nothing is pushed
    let mut devices = Vec::new();
    #[cfg(feature = "ndarray")]
    devices.push(NamedDevice {
        name: "ndarray",
        // burn 0.22 deprecates ndarray in favour of flex; our users still ask for it.
        #[allow(deprecated)]
        device: Device::ndarray(),
    });
    #[cfg(feature = "flex")]
    devices.push(NamedDevice {
        name: "flex",
        device: Device::flex(),
    });
    #[cfg(feature = "wgpu")]
    devices.push(NamedDevice {
        name: "wgpu",
        device: Device::wgpu(Default::default()),
    });
    #[cfg(feature = "cuda")]
    devices.push(NamedDevice {
        name: "cuda",
        device: Device::cuda(0),
    });
    devices
}

/// The compiled-in device called `name` (see [`available_devices`]), or `None`.
pub fn device_by_name(name: &str) -> Option<Device> {
    available_devices()
        .into_iter()
        .find(|named| named.name == name)
        .map(|named| named.device)
}

/// Whether `device` can run here: a tiny computation on it, with a panic (a wgpu device on a
/// machine without an adapter) caught and reported as `false`.
pub fn device_works(device: &Device) -> bool {
    let device = device.clone();
    std::panic::catch_unwind(move || {
        burn::tensor::Tensor::<1>::from_floats([1.0, 2.0], &device)
            .sum()
            .into_scalar::<f32>()
            == 3.0
    })
    .unwrap_or(false)
}

/// The devices of [`available_devices`] that [work](device_works) on this machine.
pub fn runnable_devices() -> Vec<NamedDevice> {
    available_devices()
        .into_iter()
        .filter(|named| device_works(&named.device))
        .collect()
}
