//! The error type of the loss crate.

/// What can be wrong with the tensors or hyper-parameters handed to a loss.
///
/// Every variant names the offending input, so a message reaching a user's log says what to fix.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum LossError {
    /// Losses take `[batch, classes]` or `[batch, seq, vocab]` tensors.
    #[error("{tensor} has rank {rank}; losses take rank 2 [batch, classes] or rank 3 [batch, seq, vocab]")]
    UnsupportedRank {
        /// Which input.
        tensor: &'static str,
        /// Its rank.
        rank: usize,
    },
    /// Two inputs that must agree on their leading (batch, sequence) dimensions do not.
    #[error("{tensor} has shape {actual:?}, expected leading dimensions {expected:?}")]
    ShapeMismatch {
        /// Which input.
        tensor: &'static str,
        /// The shape the other inputs imply.
        expected: Vec<usize>,
        /// The shape that was given.
        actual: Vec<usize>,
    },
    /// Student and teacher have different class counts and the vocabulary policy is strict.
    #[error(
        "vocabulary mismatch: student has {student} classes, teacher has {teacher}; \
         choose VocabPolicy::PadWithNegInf or VocabPolicy::Truncate to allow it"
    )]
    VocabMismatch {
        /// Student classes (last dimension).
        student: usize,
        /// Teacher classes (last dimension).
        teacher: usize,
    },
    /// An input holds NaN or +inf (−inf logits are allowed: they mean probability zero).
    #[error("{tensor} contains {kind} values")]
    NonFinite {
        /// Which input.
        tensor: &'static str,
        /// `"NaN"` or `"+inf"`.
        kind: &'static str,
    },
    /// A row of logits is −inf everywhere: it is no distribution.
    #[error("{tensor} has a row whose logits are all -inf")]
    EmptyDistribution {
        /// Which input.
        tensor: &'static str,
    },
    /// A class index (a label or a top-k index) is outside `0..classes`.
    #[error("{tensor} holds index {index}, outside 0..{classes}")]
    IndexOutOfRange {
        /// Which input.
        tensor: &'static str,
        /// The first offending index found.
        index: i64,
        /// The number of classes.
        classes: usize,
    },
    /// Every position is masked, so a mean over valid positions is undefined.
    #[error("every position is masked: a mean over valid positions is undefined")]
    NoValidPositions,
    /// A hyper-parameter is outside its accepted range.
    #[error("{name} = {value} is invalid: expected {expected}")]
    InvalidParameter {
        /// The parameter's name.
        name: &'static str,
        /// The value given.
        value: f64,
        /// The accepted range, in words.
        expected: &'static str,
    },
    /// [`Implementation::Fused`](crate::Implementation::Fused) was asked for where the fused
    /// kernel does not run.
    #[error(
        "the fused loss kernel runs on f32 tensors on the ndarray, flex, wgpu and cuda devices (f16 and bf16 on flex), not on {device} with {dtype}; \
         use Implementation::Auto or Implementation::Composed"
    )]
    FusedUnavailable {
        /// The device of the student logits.
        device: String,
        /// Their dtype.
        dtype: String,
    },
    /// A loss needs more classes than were given.
    #[error("{loss} needs at least {min} classes, got {classes}")]
    TooFewClasses {
        /// The loss.
        loss: &'static str,
        /// Its minimum.
        min: usize,
        /// The number given.
        classes: usize,
    },
    /// A feature or relational loss got a tensor of a rank it does not take.
    #[error("{tensor} has rank {rank}; {expected}")]
    FeatureRank {
        /// Which input.
        tensor: &'static str,
        /// Its rank.
        rank: usize,
        /// The ranks accepted, in words.
        expected: &'static str,
    },
    /// A feature loss got student and teacher features whose shapes do not fit together.
    #[error("{what}: expected {expected}, got shape {actual:?}")]
    FeatureShape {
        /// Which input, and what about it.
        what: &'static str,
        /// What was expected, in words.
        expected: String,
        /// The shape that was given.
        actual: Vec<usize>,
    },
    /// A relational loss needs more examples in the batch than were given.
    #[error("{loss} needs at least {min} examples in the batch, got {examples}")]
    TooFewExamples {
        /// The loss.
        loss: &'static str,
        /// Its minimum.
        min: usize,
        /// The number given.
        examples: usize,
    },
}

/// The result type of this crate.
pub type Result<T> = core::result::Result<T, LossError>;

/// Checks that `value` lies in `[low, high]` and is finite.
pub(crate) fn check_range(name: &'static str, value: f64, low: f64, high: f64, expected: &'static str) -> Result<()> {
    if value.is_finite() && value >= low && value <= high {
        Ok(())
    } else {
        Err(LossError::InvalidParameter { name, value, expected })
    }
}

/// Checks that a temperature is finite and strictly positive.
pub(crate) fn check_temperature(temperature: f64) -> Result<()> {
    if temperature.is_finite() && temperature > 0.0 {
        Ok(())
    } else {
        Err(LossError::InvalidParameter {
            name: "temperature",
            value: temperature,
            expected: "a finite value > 0",
        })
    }
}
