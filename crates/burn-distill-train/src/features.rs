//! Feature terms: the loss between a student tap and a teacher tap, for every
//! [`FeatureKind`](crate::FeatureKind).

use burn::tensor::{Bool, Int, Tensor, TensorData};
use burn_distill_loss::{
    AttentionTransferLossConfig, CkaLossConfig, CrdLoss, CrdUpdate, HiddenDistance, HiddenStateLossConfig,
    PktLossConfig, Reduction, RkdLossConfig, SpLossConfig, kept_positions,
};
use burn_distill_model::{Connector, Feature, Features, ModelError};

use crate::config::{FeatureKind, FeatureTermConfig};
use crate::error::{Result, TrainError};
use crate::step::StepCounts;

/// What a micro-batch's feature terms read besides the features.
pub(crate) struct FeatureContext<'a> {
    pub(crate) connectors: &'a [Connector],
    pub(crate) connector_of: &'a [Option<usize>],
    pub(crate) contrast: &'a [CrdLoss],
    pub(crate) contrast_of: &'a [Option<usize>],
    /// `[positions]`, `true` where the target counts (padding and prompts are false).
    pub(crate) mask: Option<&'a Tensor<1, Bool>>,
    pub(crate) counts: StepCounts,
    /// The examples' indices in the training set (CRD's banks).
    pub(crate) indices: &'a [usize],
    /// Seeds CRD's negatives for this micro-batch.
    pub(crate) seed: u64,
    pub(crate) check_inputs: bool,
}

/// The feature terms' weighted sum (`None` without terms) and the memory-bank updates of the
/// CRD terms, in order.
pub(crate) fn feature_loss(
    terms: &[FeatureTermConfig],
    student: &Features,
    teacher: &Features,
    context: &FeatureContext<'_>,
) -> Result<(Option<Tensor<1>>, Vec<CrdUpdate>)> {
    let mut total: Option<Tensor<1>> = None;
    let mut updates = Vec::new();
    for (index, term) in terms.iter().enumerate() {
        let missing = |name: &str, side: &str| {
            TrainError::Model(ModelError::UnknownTap {
                name: format!("{side} tap {name}"),
                available: vec![],
            })
        };
        let mut student_feature = student
            .get(&term.student_tap)
            .cloned()
            .ok_or_else(|| missing(&term.student_tap, "student"))?;
        let teacher_feature = teacher
            .get(&term.teacher_tap)
            .cloned()
            .ok_or_else(|| missing(&term.teacher_tap, "teacher"))?;
        if let Some(slot) = context.connector_of[index] {
            student_feature = context.connectors[slot].forward(student_feature)?;
        }
        let name = || format!("feature term {index} ({} → {})", term.student_tap, term.teacher_tap);
        let term_loss = match &term.kind {
            FeatureKind::Crd(_) => {
                if let Feature::Sequence(t) = &student_feature {
                    return Err(TrainError::Config(format!(
                        "{}: CRD embeds whole examples, and [batch, seq, width] taps are padded sequences of changing length {:?}; \
                         tap a pooled [batch, width] feature",
                        name(),
                        t.dims()
                    )));
                }
                let slot = context.contrast_of[index].expect("a CRD term has a CRD module");
                let (loss, update) = contrastive(&context.contrast[slot], student_feature, teacher_feature, context)?;
                updates.push(update);
                loss
            }
            kind => one_term(kind, student_feature, teacher_feature, context, &name)?,
        };
        let term_loss = term_loss.mul_scalar(term.weight);
        total = Some(match total {
            Some(sum) => sum + term_loss,
            None => term_loss,
        });
    }
    Ok((total, updates))
}

fn one_term(
    kind: &FeatureKind,
    student: Feature,
    teacher: Feature,
    context: &FeatureContext<'_>,
    name: &dyn Fn() -> String,
) -> Result<Tensor<1>> {
    let counts = context.counts;
    let examples = student.dims()[0];
    let example_share = examples as f64 / counts.examples.max(1) as f64;
    let device = match &student {
        Feature::Vector(t) => t.device(),
        Feature::Sequence(t) => t.device(),
        Feature::Map(t) => t.device(),
    };
    // A micro-batch too small for a relational loss adds nothing to its term.
    let nothing = || Ok(Tensor::<1>::zeros([1], &device));
    if let Feature::Sequence(t) = &student
        && matches!(kind, FeatureKind::Rkd { .. } | FeatureKind::Pkt | FeatureKind::Sp)
    {
        return Err(TrainError::Config(format!(
            "{}: {} relates whole examples, and [batch, seq, width] taps are padded sequences of changing length {:?}; \
             use MSE, cosine or CKA (positions as examples), or tap a pooled [batch, width] feature",
            name(),
            kind_name(kind),
            t.dims()
        )));
    }
    let positions_mask = |dims: [usize; 3]| -> Result<Option<Tensor<2, Bool>>> {
        match context.mask {
            None => Ok(None),
            Some(mask) if mask.dims()[0] == dims[0] * dims[1] => Ok(Some(mask.clone().reshape([dims[0], dims[1]]))),
            Some(mask) => Err(TrainError::Config(format!(
                "{}: the [batch, seq, width] tap {:?} needs a target per position; the batch has {} targets",
                name(),
                dims,
                mask.dims()[0]
            ))),
        }
    };
    let same_shape = |student: &Feature, teacher: &Feature| -> Result<()> {
        if student.dims() == teacher.dims() {
            Ok(())
        } else {
            Err(TrainError::Model(ModelError::FeatureShape {
                what: name(),
                expected: format!("the teacher's shape {:?} (add a connector)", teacher.dims()),
                actual: student.dims(),
            }))
        }
    };
    let check = context.check_inputs;
    let hidden = |distance: HiddenDistance| {
        HiddenStateLossConfig::new()
            .with_distance(distance)
            .with_check_inputs(check)
            .init()
    };
    let value = match (kind, student, teacher) {
        (FeatureKind::Mse | FeatureKind::Cosine, student, teacher) => {
            same_shape(&student, &teacher)?;
            let distance = if matches!(kind, FeatureKind::Mse) {
                HiddenDistance::Mse
            } else {
                HiddenDistance::Cosine
            };
            match (student, teacher) {
                (Feature::Vector(s), Feature::Vector(t)) => {
                    hidden(distance).forward(s, t, Reduction::SumOver(counts.examples.max(1)))?
                }
                (Feature::Sequence(s), Feature::Sequence(t)) => {
                    let dims = s.dims();
                    let reduction = Reduction::SumOver(counts.positions.max(1));
                    match positions_mask(dims)? {
                        Some(mask) => hidden(distance).forward_masked(s, t, mask, reduction)?,
                        None => hidden(distance).forward(s, t, reduction)?,
                    }
                }
                (Feature::Map(s), Feature::Map(t)) if distance == HiddenDistance::Mse => {
                    let per_example: usize = t.dims()[1..].iter().product();
                    (s - t.detach())
                        .powi_scalar(2)
                        .sum()
                        .div_scalar((counts.examples.max(1) * per_example) as f64)
                }
                (student, _) => {
                    return Err(TrainError::Config(format!(
                        "{}: the cosine term takes [batch, width] or [batch, seq, width] features, not {:?}",
                        name(),
                        student.dims()
                    )));
                }
            }
        }
        (FeatureKind::Cka { debiased }, student, teacher) => {
            let loss = CkaLossConfig::new()
                .with_debiased(*debiased)
                .with_check_inputs(check)
                .init();
            match (student, teacher) {
                (Feature::Sequence(s), Feature::Sequence(t)) => {
                    // Positions are the examples; weighted by this micro-batch's share of them.
                    // The mask is read from the device once, for the count and the rows.
                    let (dims, teacher_dims) = (s.dims(), t.dims());
                    if teacher_dims[..2] != dims[..2] {
                        return Err(TrainError::Config(format!(
                            "{}: the teacher tap {teacher_dims:?} has not the student tap's batch and length {:?}",
                            name(),
                            dims
                        )));
                    }
                    let positions = dims[0] * dims[1];
                    let s = s.reshape([positions, dims[2]]);
                    let t = t.reshape([positions, teacher_dims[2]]);
                    let (s, t, kept) = match positions_mask(dims)? {
                        Some(mask) => {
                            let kept = kept_positions(mask.reshape([positions]));
                            let count = kept.dims()[0];
                            if count < cka_minimum(*debiased) {
                                return nothing();
                            }
                            if count == positions {
                                (s, t, count)
                            } else {
                                (s.select(0, kept.clone()), t.select(0, kept), count)
                            }
                        }
                        None => (s, t, positions),
                    };
                    if kept < cka_minimum(*debiased) {
                        return nothing();
                    }
                    loss.forward(s, t)?
                        .mul_scalar(kept as f64 / counts.positions.max(1) as f64)
                }
                _ if examples < cka_minimum(*debiased) => return nothing(),
                (s, t) => with_rows(s, t, |s, t| loss.forward(s, t))?.mul_scalar(example_share),
            }
        }
        (FeatureKind::AttentionTransfer { p }, Feature::Map(s), Feature::Map(t)) => AttentionTransferLossConfig::new()
            .with_p(*p)
            .with_check_inputs(check)
            .try_init()?
            .forward(s, t, Reduction::SumOver(counts.examples.max(1)))?,
        (FeatureKind::AttentionTransfer { .. }, student, _) => {
            return Err(TrainError::Config(format!(
                "{}: attention transfer takes [batch, channels, height, width] maps, not {:?}",
                name(),
                student.dims()
            )));
        }
        (FeatureKind::Rkd { .. }, ..) if examples < 2 => return nothing(),
        (
            FeatureKind::Rkd {
                distance_weight,
                angle_weight,
            },
            s,
            t,
        ) => {
            let loss = RkdLossConfig::new()
                .with_distance_weight(*distance_weight)
                .with_angle_weight(*angle_weight)
                .with_check_inputs(check)
                .try_init()?;
            with_rows(s, t, |s, t| loss.forward(s, t))?.mul_scalar(example_share)
        }
        (FeatureKind::Pkt, s, t) => {
            let loss = PktLossConfig::new().with_check_inputs(check).init();
            with_rows(s, t, |s, t| loss.forward(s, t))?.mul_scalar(example_share)
        }
        (FeatureKind::Sp, s, t) => {
            let loss = SpLossConfig::new().with_check_inputs(check).init();
            with_rows(s, t, |s, t| loss.forward(s, t))?.mul_scalar(example_share)
        }
        (FeatureKind::Crd(_), ..) => unreachable!("CRD terms are computed with their module"),
    };
    Ok(value)
}

/// Both features as `[batch, features]`, for the relational losses (their widths may differ).
fn with_rows(
    student: Feature,
    teacher: Feature,
    loss: impl FnOnce(Tensor<2>, Tensor<2>) -> burn_distill_loss::Result<Tensor<1>>,
) -> Result<Tensor<1>> {
    Ok(loss(rows(student), rows(teacher))?)
}

fn rows(feature: Feature) -> Tensor<2> {
    let dims = feature.dims();
    let width: usize = dims[1..].iter().product();
    match feature {
        Feature::Vector(t) => t,
        Feature::Sequence(t) => t.reshape([dims[0], width]),
        Feature::Map(t) => t.reshape([dims[0], width]),
    }
}

/// The examples (or positions) a CKA term needs.
fn cka_minimum(debiased: bool) -> usize {
    if debiased { 4 } else { 2 }
}

fn kind_name(kind: &FeatureKind) -> &'static str {
    match kind {
        FeatureKind::Mse => "MSE",
        FeatureKind::Cosine => "cosine",
        FeatureKind::Cka { .. } => "CKA",
        FeatureKind::AttentionTransfer { .. } => "attention transfer",
        FeatureKind::Rkd { .. } => "RKD",
        FeatureKind::Pkt => "PKT",
        FeatureKind::Sp => "SP",
        FeatureKind::Crd(_) => "CRD",
    }
}

/// A CRD term's loss, weighted by the micro-batch's share of the step's examples, and its bank
/// update.
fn contrastive(
    loss: &CrdLoss,
    student: Feature,
    teacher: Feature,
    context: &FeatureContext<'_>,
) -> Result<(Tensor<1>, CrdUpdate)> {
    let student = rows(student);
    let device = student.device();
    let indices: Vec<i64> = context.indices.iter().map(|&index| index as i64).collect();
    let count = indices.len();
    let negatives = loss.sample_negatives(&indices, context.seed, &device);
    let indices: Tensor<1, Int> = Tensor::from_data(TensorData::new(indices, [count]), &device);
    let output = loss.forward(student, rows(teacher), indices, negatives)?;
    let share = count as f64 / context.counts.examples.max(1) as f64;
    Ok((output.loss.mul_scalar(share), output.update))
}
