//! Teachers and students for knowledge distillation with burn.
//!
//! This crate will hold the `Teacher` and `Student` traits, ensembles, feature taps and the
//! reference models (issue 3). It is empty for now so that the workspace has its final shape.
#![warn(missing_docs)]
