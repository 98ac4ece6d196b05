//! The error type of the model crate.

/// What can go wrong when plugging models into distillation.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ModelError {
    /// A feature tap was asked for that the model does not have.
    #[error("no feature tap named {name:?}; this model has {available:?}")]
    UnknownTap {
        /// The name asked for.
        name: String,
        /// The taps the model offers.
        available: Vec<String>,
    },
    /// Teachers of an ensemble disagree on the number of classes.
    #[error("ensemble member {index} has {classes} classes, the first member has {expected}")]
    ClassMismatch {
        /// Index of the disagreeing member.
        index: usize,
        /// Its class count.
        classes: usize,
        /// The first member's class count.
        expected: usize,
    },
    /// An ensemble needs at least one member, with finite, positive weights.
    #[error("invalid ensemble: {reason}")]
    InvalidEnsemble {
        /// What is wrong.
        reason: String,
    },
    /// A feature has a shape the connector cannot take.
    #[error("{what}: expected {expected}, got shape {actual:?}")]
    FeatureShape {
        /// Which feature or connector.
        what: String,
        /// The expected shape, in words.
        expected: String,
        /// The shape given.
        actual: Vec<usize>,
    },
}

/// The result type of this crate.
pub type Result<T> = core::result::Result<T, ModelError>;
