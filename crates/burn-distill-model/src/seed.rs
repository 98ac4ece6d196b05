//! Reproducible initialisation on every device.

use burn::module::{Module, ModuleVisitor, Param};
use burn::tensor::{Device, Tensor};
use burn_distill_loss::available_devices;

/// Builds a model whose weights depend only on `seed`, on any device.
///
/// burn's seeded random numbers are reproducible on its CPU backends, but not on wgpu (seeding
/// a wgpu device and initialising twice gives different weights, seen with burn 0.22.1). So the
/// model is initialised on a CPU device (ndarray or flex, whichever this build has) seeded with
/// `seed`, and its weights are loaded into the same architecture built on `device`: the same
/// seed gives bit-identical weights on every device, and the model trains on an autodiff one.
/// A build without a CPU backend seeds `device` itself.
///
/// The host's random stream is process-wide: calls from several threads are serialised, so one
/// call's draws cannot land between another's seeding and its drawing. (Other code drawing
/// random numbers on the same CPU device at the same moment still can.)
pub fn init_seeded<M: Module>(seed: u64, device: &Device, init: impl Fn(&Device) -> M) -> M {
    let host = available_devices()
        .into_iter()
        .find(|named| named.name == "ndarray" || named.name == "flex")
        .map(|named| named.device);
    match host {
        Some(host) => {
            let drawn = {
                let _serialised = SEEDING.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
                host.seed(seed);
                let drawn = init(&host);
                // burn initialises parameters lazily, on first use: draw them now, on the
                // seeded host, or they would be drawn on `device` later.
                drawn.visit(&mut Materialise);
                drawn
            };
            // Loading the record into a model made on `device` keeps that model's parameter
            // ids and trainability (a moved module would not train on an autodiff device).
            init(device).load_record(drawn.into_record())
        }
        None => {
            device.seed(seed);
            init(device)
        }
    }
}

/// Held from seeding the host to the last draw of one [`init_seeded`] call.
static SEEDING: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// Touches every parameter so that lazily initialised ones are drawn.
struct Materialise;

impl ModuleVisitor for Materialise {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        let _ = param.val();
    }
}
