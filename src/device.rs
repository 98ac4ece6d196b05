//! Devices by the names users write on command lines, remote ones included.

use burn::remote::RemoteHost;
use burn::tensor::Device;

/// A device name [`open_device`] could not turn into a device.
#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    /// No compiled-in backend has this name.
    #[error("no device {name:?} in this build (it has {available:?}, and ws://HOST:PORT[/INDEX] for a device server)")]
    Unknown {
        /// The name given.
        name: String,
        /// The names this build has.
        available: Vec<&'static str>,
    },
    /// A `cuda:N` or `ws://…/N` index that is not a number.
    #[error("{spec}: the device index must be a number")]
    BadIndex {
        /// The name given.
        spec: String,
    },
    /// The device server did not accept a session.
    #[error("cannot connect the device server at {spec}: {message}")]
    Unreachable {
        /// The name given.
        spec: String,
        /// What burn-remote reported.
        message: String,
    },
}

/// The device `spec` names: a compiled-in backend (`flex`, `ndarray`, `wgpu`, `cuda`, and
/// `cuda:N` for the N-th GPU), or `ws://HOST:PORT[/INDEX]`, device `INDEX` (default 0) of a
/// `burn-distill-device-server` (burn-remote over WebSocket), connected before this returns so
/// that an unreachable server is an error here rather than in the middle of a run.
///
/// # Errors
/// [`DeviceError`] naming what is wrong.
pub fn open_device(spec: &str) -> Result<Device, DeviceError> {
    if let Some(rest) = spec.strip_prefix("ws://") {
        let (address, index) = match rest.split_once('/') {
            Some((address, index)) => (
                address,
                index
                    .parse::<usize>()
                    .map_err(|_| DeviceError::BadIndex { spec: spec.into() })?,
            ),
            None => (rest, 0),
        };
        return Device::remote_options(&RemoteHost::websocket(&format!("ws://{address}")))
            .device_index(index)
            .init()
            .map_err(|err| DeviceError::Unreachable {
                spec: spec.into(),
                message: err.to_string(),
            });
    }
    #[cfg(feature = "cuda")]
    if let Some(index) = spec.strip_prefix("cuda:") {
        let index = index
            .parse::<usize>()
            .map_err(|_| DeviceError::BadIndex { spec: spec.into() })?;
        return Ok(Device::cuda(index));
    }
    burn_distill_loss::device_by_name(spec).ok_or_else(|| DeviceError::Unknown {
        name: spec.into(),
        available: burn_distill_loss::available_devices().iter().map(|d| d.name).collect(),
    })
}
