//! Shape checks, flattening and input validation shared by every loss.

use burn::tensor::{Bool, DType, FloatDType, Int, Tensor, TensorData};

use crate::error::{LossError, Result};
use crate::vocab::VocabPolicy;

/// Logits flattened to `[positions, classes]`, with the leading shape they came from.
pub(crate) struct Rows {
    pub rows: Tensor<2>,
    pub lead: Vec<usize>,
}

/// Flattens a rank-2 or rank-3 tensor to `[positions, classes]`.
pub(crate) fn flatten<const D: usize>(tensor: Tensor<D>, name: &'static str) -> Result<Rows> {
    if D != 2 && D != 3 {
        return Err(LossError::UnsupportedRank { tensor: name, rank: D });
    }
    let dims = tensor.dims();
    let lead = dims[..D - 1].to_vec();
    let positions = lead.iter().product();
    Ok(Rows {
        rows: tensor.reshape([positions, dims[D - 1]]),
        lead,
    })
}

/// Flattens student and teacher logits, checks that their leading dimensions agree and applies
/// the vocabulary policy. Returns `(student, teacher, leading shape)`; with `widen`, half-
/// precision rows are cast to f32 (the composed paths: softmaxes, logs and sums in f16 or
/// bf16 lose the small divergences, and can even come out negative).
pub(crate) fn flatten_pair<const D: usize>(
    student: Tensor<D>,
    teacher: Tensor<D>,
    policy: VocabPolicy,
    check: bool,
    widen: bool,
) -> Result<(Tensor<2>, Tensor<2>, Vec<usize>)> {
    let student = flatten(student, "student logits")?;
    let teacher = flatten(teacher, "teacher logits")?;
    if student.lead != teacher.lead {
        let mut actual = teacher.lead.clone();
        actual.push(teacher.rows.dims()[1]);
        return Err(LossError::ShapeMismatch {
            tensor: "teacher logits",
            expected: student.lead,
            actual,
        });
    }
    if check {
        check_logits(&student.rows, "student logits")?;
        check_logits(&teacher.rows, "teacher logits")?;
    }
    let (student_rows, teacher_rows) = policy.align(student.rows, teacher.rows)?;
    if widen {
        return Ok((widen_f32(student_rows), widen_f32(teacher_rows), student.lead));
    }
    Ok((student_rows, teacher_rows, student.lead))
}

/// `tensor` in f32 when it is in a half precision (f16, bf16, flex32); as it is otherwise.
/// The cast is differentiable: the gradient comes back in the tensor's own precision.
pub(crate) fn widen_f32<const D: usize>(tensor: Tensor<D>) -> Tensor<D> {
    match tensor.dtype() {
        DType::F16 | DType::BF16 | DType::Flex32 => tensor.cast(FloatDType::F32),
        _ => tensor,
    }
}

/// Flattens a per-position tensor (labels, mask, top-k) whose leading shape must be `lead`.
pub(crate) fn flatten_positions<const L: usize, K>(
    tensor: Tensor<L, K>,
    lead: &[usize],
    name: &'static str,
) -> Result<Tensor<1, K>>
where
    K: burn::tensor::kind::Basic,
{
    let dims = tensor.dims();
    if dims[..] != lead[..] {
        return Err(LossError::ShapeMismatch {
            tensor: name,
            expected: lead.to_vec(),
            actual: dims.to_vec(),
        });
    }
    Ok(tensor.reshape([lead.iter().product::<usize>()]))
}

/// Reshapes per-position values `[positions]` to `lead ++ [1]`.
pub(crate) fn unflatten<const D: usize>(per_position: Tensor<1>, lead: &[usize]) -> Tensor<D> {
    let mut shape = [1usize; D];
    shape[..D - 1].copy_from_slice(lead);
    per_position.reshape(shape)
}

/// Refuses NaN and +inf logits, and rows that are −inf everywhere, in one device read.
pub(crate) fn check_logits(rows: &Tensor<2>, name: &'static str) -> Result<()> {
    check_values(rows, name, true)
}

/// Refuses NaN and +inf values (teacher log-probabilities may hold −inf, and whole rows of it).
pub(crate) fn check_finite_or_neg_inf(values: &Tensor<2>, name: &'static str) -> Result<()> {
    check_values(values, name, false)
}

fn check_values(values: &Tensor<2>, name: &'static str, refuse_empty_rows: bool) -> Result<()> {
    if values.dims()[0] == 0 {
        return Ok(());
    }
    let mut flags = vec![
        values.clone().is_nan().any().int().reshape([1]),
        values.clone().equal_elem(f32::INFINITY).any().int().reshape([1]),
    ];
    if refuse_empty_rows {
        let empty = values.clone().max_dim(1).equal_elem(f32::NEG_INFINITY).any();
        flags.push(empty.int().reshape([1]));
    }
    let flags = read_ints(Tensor::cat(flags, 0).into_data());
    if flags[0] != 0 {
        return Err(LossError::NonFinite {
            tensor: name,
            kind: "NaN",
        });
    }
    if flags[1] != 0 {
        return Err(LossError::NonFinite {
            tensor: name,
            kind: "+inf",
        });
    }
    if flags.get(2).is_some_and(|&flag| flag != 0) {
        return Err(LossError::EmptyDistribution { tensor: name });
    }
    Ok(())
}

/// Checks that every index is in `0..classes`, except those equal to `ignore`.
pub(crate) fn check_indices(
    indices: &Tensor<1, Int>,
    classes: usize,
    ignore: Option<i64>,
    name: &'static str,
) -> Result<()> {
    let bad = read_ints(indices.to_data())
        .into_iter()
        .find(|&index| Some(index) != ignore && (index < 0 || index >= classes as i64));
    match bad {
        Some(index) => Err(LossError::IndexOutOfRange {
            tensor: name,
            index,
            classes,
        }),
        None => Ok(()),
    }
}

/// Student and teacher rows with their labels, for the losses that take labels.
pub(crate) struct Labelled {
    pub student: Tensor<2>,
    pub teacher: Tensor<2>,
    /// `[positions]`, ignored labels replaced by 0.
    pub labels: Tensor<1, Int>,
    /// `[positions]`, false where the label was `ignore_index`.
    pub valid: Tensor<1, Bool>,
    pub lead: Vec<usize>,
}

/// [`flatten_pair`] plus labels: checks their shape and range and splits off ignored ones.
pub(crate) fn flatten_labelled<const D: usize, const L: usize>(
    student: Tensor<D>,
    teacher: Tensor<D>,
    labels: Tensor<L, Int>,
    policy: VocabPolicy,
    check: bool,
    ignore_index: i64,
) -> Result<Labelled> {
    let (student, teacher, lead) = flatten_pair(student, teacher, policy, check, true)?;
    let labels = flatten_positions(labels, &lead, "labels")?;
    if check {
        check_indices(&labels, student.dims()[1], Some(ignore_index), "labels")?;
    }
    let (labels, valid) = split_ignored(labels, ignore_index);
    Ok(Labelled {
        student,
        teacher,
        labels,
        valid,
        lead,
    })
}

/// The positions whose label is not `ignore_index`, and the labels with those replaced by 0
/// (a safe index for gathers whose result is masked out anyway).
fn split_ignored(labels: Tensor<1, Int>, ignore_index: i64) -> (Tensor<1, Int>, Tensor<1, Bool>) {
    let ignored = labels.clone().equal_elem(ignore_index);
    (labels.mask_fill(ignored.clone(), 0), ignored.bool_not())
}

/// A boolean tensor's values on the host (one device read).
pub(crate) fn read_bools(values: Tensor<1, Bool>) -> Vec<bool> {
    values.into_data().iter::<bool>().collect()
}

pub(crate) fn read_ints(data: TensorData) -> Vec<i64> {
    data.iter::<i64>().collect()
}
