//! Teachers and students for knowledge distillation with [burn](https://burn.dev).
//!
//! # Overview
//!
//! A [`Teacher`] turns a batch into [`TeacherOutput`] (logits plus named features) and can
//! never receive a gradient: its outputs carry no autodiff by construction, and a module teacher
//! ([`FrozenTeacher`], [`FnTeacher`]) is kept in validation mode and fed inputs without autodiff.
//! A teacher need not be a module: an [`Ensemble`], or a cache of outputs (`burn-distill-data`),
//! is one too. [`Teacher::fingerprint`] identifies a teacher's weights, so such a cache can refuse
//! to stand in for a different teacher.
//! A [`Student`] returns [`StudentOutput`] on an autodiff device for the training step.
//!
//! Any burn module becomes both by implementing [`TappedForward`] (a forward pass that also
//! reports named features); [`Connector`]s map a student feature to a teacher's width for hint
//! losses; [`Cost`] gives parameter counts and FLOPs. [`save_weights`] / [`load_weights`]
//! keep models in burnpack or safetensors files, and [`import_pytorch_safetensors`] brings in a
//! teacher trained in PyTorch.
//!
//! # Reference models
//!
//! - [`Mlp`]: Hinton et al.'s MNIST teacher (784-1200-1200-10, dropout) and student
//!   (784-800-800-10), any widths by config.
//! - [`LeNet`]: a LeNet-5-like CNN for image inputs, channels and widths by config.
//! - [`TransformerLm`]: a small decoder-only language model (causal, tied or untied head) with
//!   seeded sampling ([`SamplingConfig`]: temperature, top-k, top-p).
//!
//! # Supported Rust versions
//!
//! Rust 1.95 or newer.
#![warn(missing_docs)]

mod base;
mod cnn;
mod connector;
mod cost;
mod dense;
mod ensemble;
mod error;
pub mod files;
mod fingerprint;
pub mod llm;
mod mlp;
mod output;
mod sampling;
mod seed;
mod transformer;
mod weights;

pub use base::{FnTeacher, FrozenTeacher, Student, TappedForward, Teacher, TeacherInput, TeacherOn, cast_params};
pub use cnn::{LeNet, LeNetConfig};
pub use connector::{Connector, ConnectorConfig, ConnectorKind};
pub use cost::{Compression, Cost};
pub use ensemble::{Combine, Ensemble};
pub use error::{ModelError, Result};
pub use fingerprint::{Fingerprint, Fingerprinter};
pub use mlp::{Mlp, MlpConfig};
pub use output::{Feature, Features, StudentHidden, StudentOutput, TeacherOutput, select_taps};
pub use sampling::{Generator, SamplingConfig, TokenRng, sample_token, sampling_distribution};
pub use seed::init_seeded;
pub use transformer::{TransformerLm, TransformerLmConfig};
pub use weights::{WeightFormat, import_pytorch_safetensors, load_weights, save_weights};
