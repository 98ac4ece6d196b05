//! Several teachers combined into one.

use burn::tensor::{Tensor, activation};
use serde::{Deserialize, Serialize};

use crate::base::Teacher;
use crate::error::{ModelError, Result};
use crate::fingerprint::{Fingerprint, Fingerprinter};
use crate::output::{Features, TeacherOutput, select_taps};

/// How an [`Ensemble`] combines its members.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub enum Combine {
    /// Weighted average of the members' probabilities; the ensemble's logits are the
    /// log of that average (so they are log-probabilities). Hinton et al.'s ensembles.
    #[default]
    Probabilities,
    /// Weighted average of the members' logits.
    Logits,
}

/// Teachers combined by weighted averaging; itself a [`Teacher`] with no feature taps.
pub struct Ensemble<I, const D: usize> {
    members: Vec<(Box<dyn Teacher<I, D>>, f64)>,
    combine: Combine,
    classes: usize,
}

impl<I, const D: usize> std::fmt::Debug for Ensemble<I, D> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let weights: Vec<f64> = self.members.iter().map(|(_, w)| *w).collect();
        f.debug_struct("Ensemble")
            .field("weights", &weights)
            .field("combine", &self.combine)
            .field("classes", &self.classes)
            .finish()
    }
}

impl<I: Clone, const D: usize> Ensemble<I, D> {
    /// An ensemble of `members` with their weights, which are normalised to sum to 1.
    ///
    /// # Errors
    /// [`ModelError::InvalidEnsemble`] for no members or a weight that is not finite and
    /// positive; [`ModelError::ClassMismatch`] when the members' class counts differ.
    pub fn new(members: Vec<(Box<dyn Teacher<I, D>>, f64)>, combine: Combine) -> Result<Self> {
        let Some((first, _)) = members.first() else {
            return Err(ModelError::InvalidEnsemble {
                reason: "no members".to_string(),
            });
        };
        let expected = first.num_classes();
        for (index, (member, weight)) in members.iter().enumerate() {
            if !(weight.is_finite() && *weight > 0.0) {
                return Err(ModelError::InvalidEnsemble {
                    reason: format!("member {index} has weight {weight}; weights must be finite and > 0"),
                });
            }
            if member.num_classes() != expected {
                return Err(ModelError::ClassMismatch {
                    index,
                    classes: member.num_classes(),
                    expected,
                });
            }
        }
        let total: f64 = members.iter().map(|(_, w)| w).sum();
        let members = members.into_iter().map(|(m, w)| (m, w / total)).collect();
        Ok(Self {
            members,
            combine,
            classes: expected,
        })
    }

    /// Equal weights.
    ///
    /// # Errors
    /// As [`Ensemble::new`].
    pub fn uniform(members: Vec<Box<dyn Teacher<I, D>>>, combine: Combine) -> Result<Self> {
        Self::new(members.into_iter().map(|m| (m, 1.0)).collect(), combine)
    }

    /// The normalised weights, in member order.
    pub fn weights(&self) -> Vec<f64> {
        self.members.iter().map(|(_, w)| *w).collect()
    }
}

impl<I: Clone, const D: usize> Teacher<I, D> for Ensemble<I, D> {
    fn teach(&self, input: I, taps: &[&str]) -> Result<TeacherOutput<D>> {
        self.combine_members(input, None, taps)
    }

    fn teach_examples(&self, input: I, indices: &[usize], taps: &[&str]) -> Result<TeacherOutput<D>> {
        self.combine_members(input, Some(indices), taps)
    }

    fn num_classes(&self) -> usize {
        self.classes
    }

    fn needs_indices(&self) -> bool {
        self.members.iter().any(|(member, _)| member.needs_indices())
    }

    /// Combines the members' fingerprints with their weights and the combination rule; `None`
    /// when a member has none.
    fn fingerprint(&self) -> Option<Fingerprint> {
        let mut hasher = Fingerprinter::new("ensemble");
        hasher.update_str(match self.combine {
            Combine::Probabilities => "probabilities",
            Combine::Logits => "logits",
        });
        for (member, weight) in &self.members {
            hasher.update_fingerprint(member.fingerprint()?);
            hasher.update_u64(weight.to_bits());
        }
        Some(hasher.finish())
    }
}

impl<I: Clone, const D: usize> Ensemble<I, D> {
    fn combine_members(&self, input: I, indices: Option<&[usize]>, taps: &[&str]) -> Result<TeacherOutput<D>> {
        let features = select_taps(Features::new(), taps)?;
        let mut terms = Vec::with_capacity(self.members.len());
        for (member, weight) in &self.members {
            let output = match indices {
                Some(indices) => member.teach_examples(input.clone(), indices, &[])?,
                None => member.teach(input.clone(), &[])?,
            };
            let logits = output.into_parts().0;
            terms.push(match self.combine {
                Combine::Logits => logits.mul_scalar(*weight),
                // log(w · p) = log w + log_softmax(logits)
                Combine::Probabilities => activation::log_softmax(logits, D - 1).add_scalar(weight.ln()),
            });
        }
        let logits = match self.combine {
            Combine::Logits => terms.into_iter().reduce(|a, b| a + b).expect("at least one member"),
            Combine::Probabilities => log_sum_exp_stack(terms),
        };
        Ok(TeacherOutput::new(logits, features))
    }
}

/// `log Σ_i exp(terms_i)` elementwise, stable.
fn log_sum_exp_stack<const D: usize>(terms: Vec<Tensor<D>>) -> Tensor<D> {
    let peak = terms
        .iter()
        .cloned()
        .reduce(|a, b| a.max_pair(b))
        .expect("at least one member");
    let sum = terms
        .into_iter()
        .map(|term| (term - peak.clone()).exp())
        .reduce(|a, b| a + b)
        .expect("at least one member");
    sum.log() + peak
}
