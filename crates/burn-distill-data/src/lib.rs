//! Datasets, batching and the offline teacher-output cache for knowledge distillation.
//!
//! This crate will hold the MNIST and text datasets and the teacher cache (issue 4). It is
//! empty for now so that the workspace has its final shape.
#![warn(missing_docs)]
