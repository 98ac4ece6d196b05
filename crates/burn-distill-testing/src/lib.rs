//! Helpers shared by burn-distill's test suites (not published): the devices a suite runs on,
//! the lock that keeps the CPU backends' process-wide random streams to one test at a time, and
//! scratch directories.

pub mod hostile;

use std::path::PathBuf;
use std::sync::{Mutex, MutexGuard, PoisonError};

use burn_distill_loss::{NamedDevice, available_devices, device_works};

/// The devices a test suite should run on: every compiled-in device that works here.
///
/// A device that does not work (a wgpu device without an adapter) is skipped with a message on
/// stderr, except when the `CI` environment variable is set (and not `false`): CI is expected
/// to provide every compiled backend (wgpu through Mesa's lavapipe), so there it panics.
///
/// # Panics
/// Under CI, when a compiled-in device does not work.
pub fn devices_for_tests() -> Vec<NamedDevice> {
    let in_ci = std::env::var("CI").is_ok_and(|value| !value.is_empty() && value != "false");
    available_devices()
        .into_iter()
        .filter(|named| {
            let works = device_works(&named.device);
            assert!(
                works || !in_ci,
                "CI expects the {} device to work (for wgpu: apt-get install mesa-vulkan-drivers), it does not",
                named.name
            );
            if !works {
                eprintln!("the {} device does not work here: skipping it", named.name);
            }
            works
        })
        .collect()
}

/// The CPU backends' random streams are process-wide, and burn draws weights lazily at a
/// model's first use: a test drawing on one (unseeded initialisation, dropout) while another
/// seeds it would change the seeded weights. Tests that seed or draw take this lock.
pub fn serial() -> MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(PoisonError::into_inner)
}

/// A new, empty directory under the system's temporary directory, named after `name` and made
/// unique by `tempfile`; it is kept after the test (to look into when one fails).
///
/// # Panics
/// When the directory cannot be made.
pub fn scratch(name: &str) -> PathBuf {
    tempfile::Builder::new()
        .prefix(&format!("burn-distill-{name}-"))
        .tempdir()
        .expect("a scratch directory")
        .keep()
}
