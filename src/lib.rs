//! # burn-distill
//!
//! Knowledge distillation for the [burn](https://burn.dev) deep-learning framework: train a
//! small *student* model on a large *teacher*'s temperature-softened outputs (Hinton, Vinyals &
//! Dean, 2015), on any burn device.
//!
//! This facade re-exports the member crates:
//!
//! | Module | Crate | What |
//! |---|---|---|
//! | [`loss`] | `burn-distill-loss` | KL, JSD, TVD, Hinton KD, DKD, sparse teachers; reductions and masking |
//! | [`model`] | `burn-distill-model` | teachers, students, ensembles, reference models, weights |
//! | [`data`] | `burn-distill-data` | MNIST, text windows, batchers, the teacher-output cache |
//! | [`train`] | `burn-distill-train` | the `Distiller` training loop, evaluation, runs and checkpoints |
//!
//! ```
//! use burn_distill::prelude::*;
//!
//! # fn main() -> Result<(), LossError> {
//! let device = available_devices().remove(0).device;
//! let student = Tensor::<2>::from_floats([[1.0, 2.0, 0.5]], &device);
//! let teacher = Tensor::<2>::from_floats([[0.5, 3.0, 0.0]], &device);
//! let loss = HintonKdLossConfig::new().with_temperature(4.0).init();
//! let labels = Tensor::<1, Int>::from_ints([1], &device);
//! let value: f32 = loss.forward(student, teacher, labels, Reduction::BatchMean)?.into_scalar();
//! assert!(value > 0.0);
//! # Ok(())
//! # }
//! ```
#![warn(missing_docs)]

mod device;

pub use device::{DeviceError, open_device};

pub use burn_distill_data as data;
pub use burn_distill_loss as loss;
pub use burn_distill_model as model;
pub use burn_distill_serve as serve;
pub use burn_distill_train as train;

/// The types most programs need.
pub mod prelude {
    pub use burn::tensor::{Bool, Device, Int, Tensor};
    pub use burn_distill_data::{
        Batch, ByteCorpus, CacheBuildOptions, CacheMode, CachedTeacher, ImageBatcher, Jitter, MnistDataset, MnistSplit,
        Subset, TokenBatcher, build_cache, split_validation,
    };
    pub use burn_distill_loss::{
        Divergence, DivergenceLoss, DivergenceLossConfig, DkdLoss, DkdLossConfig, HintonKdLoss, HintonKdLossConfig,
        LossError, NamedDevice, Reduction, SparseKlLoss, SparseKlLossConfig, TailPolicy, VocabPolicy,
        available_devices, device_by_name,
    };
    pub use burn_distill_model::{
        Ensemble, Fingerprint, FnTeacher, FrozenTeacher, Mlp, MlpConfig, Student, TappedForward, Teacher,
        TransformerLm, TransformerLmConfig, init_seeded,
    };
    pub use burn_distill_train::{
        DistillConfig, Distiller, EvalSet, ObjectiveConfig, OptimizerConfig, RunOutcome, TrainError, evaluate,
    };
}

/// The README's code blocks, compiled and run by `cargo test --doc`.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
pub struct ReadmeDoctests;
