//! The distillation training loop.
//!
//! This crate will hold the `Distiller`, metrics and checkpoints (issue 5). It is empty for now
//! so that the workspace has its final shape.
#![warn(missing_docs)]
