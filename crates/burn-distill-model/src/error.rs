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
    /// A teacher placed on a device of its own ([`TeacherOn`](crate::TeacherOn)) failed there:
    /// a remote server that went away, a lost GPU.
    #[error("the teacher's device {device} failed: {message}")]
    TeacherDevice {
        /// The device, as burn names it.
        device: String,
        /// What burn reported.
        message: String,
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
    /// A weight file could not be read or written.
    #[error("weights {path}: {reason}")]
    WeightFile {
        /// The file.
        path: String,
        /// What went wrong.
        reason: String,
    },
    /// A tensor in a weight file does not fit the model.
    #[error("weights {path}: tensor {key:?} has shape {found:?}, the model expects {expected:?}")]
    WeightShape {
        /// The file.
        path: String,
        /// The tensor's key in the model (after key remapping).
        key: String,
        /// The model's shape.
        expected: Vec<usize>,
        /// The file's shape.
        found: Vec<usize>,
    },
    /// The model has tensors the file does not provide.
    #[error("weights {path}: missing {missing:?} (the file has {unused:?} that match nothing)")]
    MissingWeights {
        /// The file.
        path: String,
        /// Model tensors without a value in the file.
        missing: Vec<String>,
        /// File tensors that matched no model tensor (often a key-mapping problem).
        unused: Vec<String>,
    },
    /// A teacher cannot serve this request (e.g. a cache asked for outputs without indices).
    #[error("{teacher}: {reason}")]
    Unsupported {
        /// Which teacher.
        teacher: String,
        /// Why, and what to do instead.
        reason: String,
    },
    /// A teacher failed to produce outputs (e.g. a cache file could not be read).
    #[error("{teacher}: {reason}")]
    TeacherFailed {
        /// Which teacher.
        teacher: String,
        /// What went wrong.
        reason: String,
    },
}

/// The result type of this crate.
pub type Result<T> = core::result::Result<T, ModelError>;
