//! Evaluation: loss, accuracy, calibration and agreement with the teacher.

use burn::data::dataloader::batcher::Batcher;
use burn::data::dataset::Dataset;
use burn::module::Module;
use burn::tensor::{Device, Int, Tensor, activation};
use burn_distill_data::{Batch, EpochSampler, Indexed};
use burn_distill_model::{Student, Teacher, TeacherInput};
use serde::{Deserialize, Serialize};

use crate::config::IGNORE_INDEX;
use crate::error::{Result, TrainError};
use crate::step::widen_f32;

/// Bins of the expected calibration error.
pub const ECE_BINS: usize = 15;

/// A model's quality on an evaluation set. Per-position quantities (a classification example has
/// one position, a sequence one per token) are averaged over positions.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EvalMetrics {
    /// Examples evaluated.
    pub examples: usize,
    /// Predictions evaluated (positions whose target is not `IGNORE_INDEX`).
    pub positions: usize,
    /// Mean cross-entropy with the labels, in nats.
    pub loss: f64,
    /// Share of correct top-1 predictions.
    pub accuracy: f64,
    /// Number of wrong top-1 predictions.
    pub errors: usize,
    /// `exp(loss)`, for language models (`None` for classifiers).
    pub perplexity: Option<f64>,
    /// Expected calibration error: the gap between confidence and accuracy, over 15 equal-width
    /// confidence bins, weighted by their share of predictions.
    pub ece: f64,
    /// Share of positions where the student's top-1 is the teacher's top-1 (with a teacher).
    pub teacher_agreement: Option<f64>,
    /// Mean `KL(teacher ‖ student)` at temperature 1, in nats (with a teacher).
    pub teacher_kl: Option<f64>,
}

#[derive(Default)]
struct Totals {
    examples: usize,
    positions: usize,
    nll: f64,
    correct: usize,
    agree: usize,
    kl: f64,
    bin_count: [usize; ECE_BINS],
    bin_confidence: [f64; ECE_BINS],
    bin_correct: [usize; ECE_BINS],
}

fn host_f32<const D: usize>(tensor: Tensor<D>) -> Vec<f32> {
    tensor.into_data().iter::<f32>().collect()
}

fn host_i64<const D: usize>(tensor: Tensor<D, Int>) -> Vec<i64> {
    tensor.into_data().iter::<i64>().collect()
}

/// Logits `[.., classes]` as `[positions, classes]`.
pub(crate) fn flatten_logits<const D: usize>(logits: Tensor<D>) -> Tensor<2> {
    logits.flatten::<2>(0, D - 2)
}

/// Class ids `[.., k]` as `[positions, k]`.
pub(crate) fn flatten_indices<const D: usize>(indices: Tensor<D, Int>) -> Tensor<2, Int> {
    indices.flatten::<2>(0, D - 2)
}

/// The examples at `positions` of `dataset`; a failure is [`TrainError::Dataset`] naming `set`.
pub(crate) fn read_items<It>(dataset: &impl Dataset<It>, positions: &[usize], set: &'static str) -> Result<Vec<It>> {
    positions
        .iter()
        .map(|&index| {
            dataset
                .get(index)
                .map_err(|source| TrainError::Dataset { set, index, source })
        })
        .collect()
}

/// Evaluates `student` (in inference mode: no dropout, no autodiff) on `dataset`, batched by
/// `batcher` on `device`, in dataset order; compares it with `teacher` when given.
///
/// # Errors
/// When the student or teacher fails, or the dataset cannot be read.
pub fn evaluate<M, S, It, Bt, B, const D: usize>(
    student: &M,
    teacher: Option<&dyn Teacher<B::Input, D>>,
    dataset: &S,
    batcher: &Bt,
    batch_size: usize,
    device: &Device,
) -> Result<EvalMetrics>
where
    M: Module + Student<B::Input, D>,
    S: Dataset<It>,
    It: Indexed,
    Bt: Batcher<It, B>,
    B: Batch,
    B::Input: TeacherInput,
{
    let model = student.valid();
    let mut totals = Totals::default();
    for positions in EpochSampler::sequential(dataset.len(), batch_size).batches(0) {
        let items = read_items(dataset, &positions, "evaluation data")?;
        let batch = batcher.batch(items, device);
        let input = batch.input().without_autodiff();
        let logits = flatten_logits(model.learn(input.clone(), &[])?.logits);
        let targets = batch.targets().without_autodiff();
        let teacher_logits = match teacher {
            Some(teacher) => Some(flatten_logits(
                teacher.teach_examples(input, batch.indices(), &[])?.into_parts().0,
            )),
            None => None,
        };
        accumulate(&mut totals, logits, targets, teacher_logits, batch.size());
    }
    Ok(finish(totals, D == 3, teacher.is_some()))
}

fn accumulate(
    totals: &mut Totals,
    logits: Tensor<2>,
    targets: Tensor<1, Int>,
    teacher: Option<Tensor<2>>,
    examples: usize,
) {
    // Half-precision students or teachers are compared in f32.
    let (logits, teacher) = (widen_f32(logits), teacher.map(widen_f32));
    let host_targets = host_i64(targets.clone());
    let valid: Vec<bool> = host_targets.iter().map(|&target| target != IGNORE_INDEX).collect();
    let targets = targets.clone().mask_fill(targets.equal_elem(IGNORE_INDEX), 0);
    let log_probs = activation::log_softmax(logits, 1);
    let nll = host_f32(
        log_probs
            .clone()
            .gather(1, targets.unsqueeze_dim::<2>(1))
            .neg()
            .squeeze_dim::<1>(1),
    );
    let (confidence, predicted) = log_probs.clone().max_dim_with_indices(1);
    let confidence = host_f32(confidence.exp().squeeze_dim::<1>(1));
    let predicted = host_i64(predicted.squeeze_dim::<1>(1));
    totals.examples += examples;
    for position in (0..valid.len()).filter(|&position| valid[position]) {
        totals.positions += 1;
        totals.nll += f64::from(nll[position]);
        let correct = predicted[position] == host_targets[position];
        totals.correct += usize::from(correct);
        let bin = ((f64::from(confidence[position]) * ECE_BINS as f64) as usize).min(ECE_BINS - 1);
        totals.bin_count[bin] += 1;
        totals.bin_confidence[bin] += f64::from(confidence[position]);
        totals.bin_correct[bin] += usize::from(correct);
    }
    if let Some(teacher) = teacher {
        let [_, student_classes] = log_probs.dims();
        let teacher_classes = teacher.dims()[1];
        // A teacher with a larger vocabulary is compared on the student's classes.
        let teacher = if teacher_classes == student_classes {
            teacher
        } else {
            let rows = teacher.dims()[0];
            teacher.slice([0..rows, 0..student_classes.min(teacher_classes)])
        };
        let teacher_log_probs = activation::log_softmax(teacher, 1);
        let student_log_probs = if teacher_classes < student_classes {
            let rows = log_probs.dims()[0];
            activation::log_softmax(log_probs.slice([0..rows, 0..teacher_classes]), 1)
        } else {
            log_probs
        };
        let kl = host_f32(
            (teacher_log_probs.clone().exp() * (teacher_log_probs.clone() - student_log_probs))
                .sum_dim(1)
                .squeeze_dim::<1>(1),
        );
        let teacher_predicted = host_i64(teacher_log_probs.argmax(1).squeeze_dim::<1>(1));
        for position in (0..valid.len()).filter(|&position| valid[position]) {
            totals.kl += f64::from(kl[position]);
            totals.agree += usize::from(predicted[position] == teacher_predicted[position]);
        }
    }
}

fn finish(totals: Totals, sequence: bool, with_teacher: bool) -> EvalMetrics {
    let n = totals.positions.max(1) as f64;
    let loss = totals.nll / n;
    let ece = (0..ECE_BINS)
        .filter(|&bin| totals.bin_count[bin] > 0)
        .map(|bin| {
            let count = totals.bin_count[bin] as f64;
            (totals.bin_confidence[bin] / count - totals.bin_correct[bin] as f64 / count).abs() * count / n
        })
        .sum();
    EvalMetrics {
        examples: totals.examples,
        positions: totals.positions,
        loss,
        accuracy: totals.correct as f64 / n,
        errors: totals.positions - totals.correct,
        perplexity: sequence.then(|| loss.exp()),
        ece,
        teacher_agreement: with_teacher.then(|| totals.agree as f64 / n),
        teacher_kl: with_teacher.then(|| totals.kl / n),
    }
}
