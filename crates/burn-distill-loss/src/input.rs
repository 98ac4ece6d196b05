//! Shape checks, flattening and input validation shared by every loss.

use burn::tensor::{Bool, Int, Tensor, TensorData};

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
/// the vocabulary policy. Returns `(student, teacher, leading shape)`.
pub(crate) fn flatten_pair<const D: usize>(
    student: Tensor<D>,
    teacher: Tensor<D>,
    policy: VocabPolicy,
    check: bool,
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
    Ok((student_rows, teacher_rows, student.lead))
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
    if rows.dims()[0] == 0 {
        return Ok(());
    }
    let nan = rows.clone().is_nan().any().int().reshape([1]);
    let pos_inf = rows.clone().equal_elem(f32::INFINITY).any().int().reshape([1]);
    let empty = rows
        .clone()
        .max_dim(1)
        .equal_elem(f32::NEG_INFINITY)
        .any()
        .int()
        .reshape([1]);
    let flags = read_ints(Tensor::cat(vec![nan, pos_inf, empty], 0).into_data());
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
    if flags[2] != 0 {
        return Err(LossError::EmptyDistribution { tensor: name });
    }
    Ok(())
}

/// Refuses float values that are NaN or +inf (used for teacher log-probabilities).
pub(crate) fn check_finite_or_neg_inf(values: &Tensor<2>, name: &'static str) -> Result<()> {
    let nan = values.clone().is_nan().any().int().reshape([1]);
    let pos_inf = values.clone().equal_elem(f32::INFINITY).any().int().reshape([1]);
    let flags = read_ints(Tensor::cat(vec![nan, pos_inf], 0).into_data());
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

/// The positions whose label is not `ignore_index`, and the labels with those replaced by 0
/// (a safe index for gathers whose result is masked out anyway).
pub(crate) fn split_ignored(labels: Tensor<1, Int>, ignore_index: i64) -> (Tensor<1, Int>, Tensor<1, Bool>) {
    let ignored = labels.clone().equal_elem(ignore_index);
    (labels.mask_fill(ignored.clone(), 0), ignored.bool_not())
}

fn read_ints(data: TensorData) -> Vec<i64> {
    data.iter::<i64>().collect()
}
