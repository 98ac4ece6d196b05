//! A language model's last linear layer and the KD loss in one chunked operation.

use std::sync::Arc;

use burn::backend::Dispatch;
use burn::config::Config;
use burn::tensor::{Int, Tensor, TensorData};

use crate::divergence::{Divergence, DivergenceLossConfig};
use crate::error::{LossError, check_range, check_temperature};
use crate::fused::{FusedLossBackend, HeadJob, Implementation, SparseTeacher, decide, has_nan, kernel_labels};
use crate::hinton::HintonKdLossConfig;
use crate::input::read_ints;
use crate::reduction::{Reduction, reduction_weights};
use crate::sparse::{SparseKlLossConfig, TailPolicy};
use crate::spec::RowSpec;

/// The teacher side of a [`LinearHeadKd`].
// One value per loss call: boxing the larger variant would buy nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone)]
pub enum HeadTeacher {
    /// The teacher's logits, `[positions, classes]`.
    Logits(Tensor<2>),
    /// The teacher's last hidden states `[positions, teacher_width]` and head weight
    /// `[classes, teacher_width]`: its logits are computed chunk by chunk too.
    Head {
        /// Hidden states.
        hidden: Tensor<2>,
        /// Head weight (PyTorch's `nn.Linear` layout, `[out, in]`).
        weight: Tensor<2>,
    },
    /// The teacher's `k` most likely classes per position and their log-probabilities (an
    /// offline top-k cache, [`SparseKlLoss`](crate::SparseKlLoss)'s teacher), the rest of its
    /// distribution rebuilt by `tail`. Each chunk's dense teacher rows are written from them on
    /// the host just before that chunk runs. Forward KL only.
    TopK {
        /// `[positions, k]` class ids, distinct within a position.
        indices: Tensor<2, Int>,
        /// `[positions, k]` log-probabilities of the teacher's full softmax at temperature 1.
        log_probs: Tensor<2>,
        /// What the mass outside the top k becomes.
        tail: TailPolicy,
    },
    /// The labels as a one-hot teacher: the soft term is then the cross-entropy with the labels
    /// (training on text, or on a teacher's sampled answers), chunk by chunk like the others.
    /// Needs labels; forward KL only.
    Labels,
}

/// Configuration of [`LinearHeadKd`]: `α · CE(student, labels) + (1 − α) · [T²] · D(teacher_T ‖
/// student_T)` with `student = hidden · weightᵀ`, computed `chunk_rows` positions at a time.
///
/// | Name | Default | Purpose | Range |
/// |---|---|---|---|
/// | `divergence` | `ForwardKl` | the soft term | see [`Divergence`] |
/// | `temperature` | 1.0 | softens both sides of the soft term | `T > 0` |
/// | `scale_by_temperature_squared` | false | multiply the soft term by `T²` | |
/// | `alpha` | 0.0 | weight of the hard-label cross-entropy (`T = 1`) | `[0, 1]` |
/// | `chunk_rows` | 1024 | positions per chunk: the student logits exist `chunk_rows × classes` at a time | `≥ 1` |
/// | `ignore_index` | [`IGNORE_INDEX`](crate::IGNORE_INDEX) (-100) | labels equal to it mask their position out | |
/// | `implementation` | `Auto` | chunked fused kernel (ndarray, flex) or a plain matmul + composed loss | see [`Implementation`] |
#[derive(Config, Debug)]
pub struct LinearHeadKdConfig {
    /// The soft term.
    #[config(default = "Divergence::ForwardKl")]
    pub divergence: Divergence,
    /// Temperature of the soft term.
    #[config(default = 1.0)]
    pub temperature: f64,
    /// Multiply the soft term by `T²`.
    #[config(default = false)]
    pub scale_by_temperature_squared: bool,
    /// Weight of the cross-entropy with the labels.
    #[config(default = 0.0)]
    pub alpha: f64,
    /// Positions per chunk.
    #[config(default = 1024)]
    pub chunk_rows: usize,
    /// Label value that masks a position.
    #[config(default = "crate::IGNORE_INDEX")]
    pub ignore_index: i64,
    /// Chunked fused kernel or composed tensor operations.
    #[config(default = "Implementation::Auto")]
    pub implementation: Implementation,
}

impl LinearHeadKdConfig {
    /// Builds the loss, or says which hyper-parameter is out of range.
    ///
    /// # Errors
    /// [`LossError::InvalidParameter`] for a temperature that is not positive, `alpha` outside
    /// `[0, 1]`, `chunk_rows` of 0 or an invalid divergence parameter.
    pub fn try_init(&self) -> crate::Result<LinearHeadKd> {
        check_temperature(self.temperature)?;
        check_range("alpha", self.alpha, 0.0, 1.0, "a value in [0, 1]")?;
        self.divergence.validate()?;
        if self.chunk_rows == 0 {
            return Err(LossError::InvalidParameter {
                name: "chunk_rows",
                value: 0.0,
                expected: "at least 1 position per chunk",
            });
        }
        Ok(LinearHeadKd { config: self.clone() })
    }

    /// Builds the loss.
    ///
    /// # Panics
    /// When a hyper-parameter is out of range; the message names it and its range.
    pub fn init(&self) -> LinearHeadKd {
        self.try_init()
            .unwrap_or_else(|error| panic!("invalid LinearHeadKdConfig: {error}"))
    }
}

/// Distillation through a linear head without the full `[positions, classes]` student logits.
///
/// At a language model's vocabulary (32k–152k) the logits of a batch are gigabytes. This loss
/// takes the student's last hidden states and head weight and, on every device with a fused
/// kernel (ndarray, flex, wgpu, cuda), computes the logits, the loss and the gradients w.r.t. `hidden` and `weight`
/// `chunk_rows` positions at a time: peak memory is one chunk of logits plus the gradients,
/// whatever the number of positions. Elsewhere it falls back to one matmul and the composed
/// loss (same values, memory growing with the positions). There is no bias: LM heads have none.
#[derive(Debug, Clone)]
pub struct LinearHeadKd {
    config: LinearHeadKdConfig,
}

impl LinearHeadKd {
    /// The reduced loss.
    ///
    /// # Shapes
    /// - hidden: `[positions, width]` (flatten `[batch, seq, width]` first)
    /// - weight: `[classes, width]`
    /// - teacher: see [`HeadTeacher`], `classes` columns
    /// - labels: `[positions]`; needed when `alpha > 0`, and marks ignored positions in any case
    /// - output: `[1]`
    ///
    /// # Errors
    /// A [`LossError`] for shapes that do not fit, labels out of range or missing when
    /// `alpha > 0`, no valid position under a mean reduction, NaN or +inf logits, or
    /// [`Implementation::Fused`] where the fused kernel does not run.
    pub fn forward(
        &self,
        hidden: Tensor<2>,
        weight: Tensor<2>,
        teacher: HeadTeacher,
        labels: Option<Tensor<1, Int>>,
        reduction: Reduction,
    ) -> crate::Result<Tensor<1>> {
        let config = &self.config;
        let [positions, width] = hidden.dims();
        let [classes, weight_width] = weight.dims();
        expect_shape("student head weight", &[classes, width], &[classes, weight_width])?;
        let teacher_rows = match &teacher {
            HeadTeacher::Logits(logits) => {
                expect_shape("teacher logits", &[positions, classes], &logits.dims())?;
                Some(logits.clone())
            }
            HeadTeacher::Head {
                hidden: t_hidden,
                weight: t_weight,
            } => {
                let [t_positions, t_width] = t_hidden.dims();
                expect_shape("teacher hidden states", &[positions, t_width], &[t_positions, t_width])?;
                expect_shape("teacher head weight", &[classes, t_width], &t_weight.dims())?;
                Some(t_hidden.clone())
            }
            HeadTeacher::TopK { indices, log_probs, .. } => {
                let k = indices.dims()[1];
                expect_shape("teacher top-k indices", &[positions, k], &indices.dims())?;
                expect_shape("teacher top-k log-probs", &[positions, k], &log_probs.dims())?;
                if k == 0 || k > classes {
                    return Err(LossError::InvalidParameter {
                        name: "k",
                        value: k as f64,
                        expected: "1 <= k <= number of student classes",
                    });
                }
                Some(log_probs.clone())
            }
            HeadTeacher::Labels => None,
        };
        let sparse_teacher = matches!(teacher, HeadTeacher::TopK { .. } | HeadTeacher::Labels);
        if sparse_teacher && config.divergence != Divergence::ForwardKl {
            return Err(LossError::InvalidParameter {
                name: "divergence",
                value: f64::NAN,
                expected: "ForwardKl with a top-k or label teacher (its tail has no probability to divide by)",
            });
        }
        if (config.alpha > 0.0 || matches!(teacher, HeadTeacher::Labels)) && labels.is_none() {
            return Err(LossError::InvalidParameter {
                name: "alpha",
                value: config.alpha,
                expected: "0 when no labels are given (and labels with HeadTeacher::Labels)",
            });
        }
        let labels = match labels {
            Some(labels) => {
                expect_shape("labels", &[positions], &labels.dims())?;
                Some(read_ints(labels.into_data()))
            }
            None => None,
        };
        let mut devices = vec![weight.device()];
        let mut dtypes = vec![hidden.dtype(), weight.dtype()];
        if let Some(rows) = &teacher_rows {
            devices.push(rows.device());
            dtypes.push(rows.dtype());
        }
        // A top-k teacher goes to the host once, checked there: the chunks are written from it.
        let sparse = match &teacher {
            HeadTeacher::TopK {
                indices,
                log_probs,
                tail,
            } => Some(sparse_teacher_rows(indices.clone(), log_probs.clone(), *tail, classes)?),
            HeadTeacher::Labels => {
                let labels = labels.as_ref().expect("checked above");
                let (indices, _) = kernel_labels(labels.clone(), config.ignore_index, classes)?;
                Some(SparseTeacher {
                    k: 1,
                    log_probs: vec![0.0; indices.len()],
                    tails: vec![f32::NEG_INFINITY; indices.len()],
                    indices,
                })
            }
            _ => None,
        };
        if !decide(config.implementation, &hidden.device(), &devices, &dtypes)? {
            return self.composed(hidden, weight, teacher, labels, reduction);
        }

        let (labels, valid) = match labels {
            Some(labels) => {
                let (labels, valid) = kernel_labels(labels, config.ignore_index, classes)?;
                (Some(labels), valid)
            }
            None => (None, vec![true; positions]),
        };
        let weights = reduction_weights(Some(&valid), positions, classes, reduction)?;
        let job = HeadJob {
            spec: RowSpec::weighted(
                config.divergence,
                config.temperature,
                config.scale_by_temperature_squared,
                config.alpha,
                0.0,
            ),
            chunk_rows: config.chunk_rows,
            labels: labels.map(Arc::new),
            weights: Arc::new(weights),
        };
        let output = match teacher {
            HeadTeacher::TopK { .. } | HeadTeacher::Labels => <Dispatch as FusedLossBackend>::fused_head_loss_sparse(
                hidden.into_dispatch(),
                weight.into_dispatch(),
                Arc::new(sparse.expect("built above")),
                job,
            ),
            HeadTeacher::Logits(logits) => <Dispatch as FusedLossBackend>::fused_head_loss_logits(
                hidden.into_dispatch(),
                weight.into_dispatch(),
                logits.into_dispatch(),
                job,
            ),
            HeadTeacher::Head {
                hidden: t_hidden,
                weight: t_weight,
            } => <Dispatch as FusedLossBackend>::fused_head_loss(
                hidden.into_dispatch(),
                weight.into_dispatch(),
                t_hidden.into_dispatch(),
                t_weight.into_dispatch(),
                job,
            ),
        };
        let output = Tensor::<1>::from_dispatch(output);
        if has_nan(&output) {
            return Err(LossError::NonFinite {
                tensor: "student or teacher logits of the linear head",
                kind: "NaN, +inf or all -inf",
            });
        }
        Ok(output)
    }

    /// `Σ_i w_i · (−log q_i(label_i))` with `q = softmax(hidden · weightᵀ)` at temperature 1,
    /// chunk by chunk like [`forward`](Self::forward): a cross-entropy with a weight per
    /// position, which may be negative (the per-token surrogate of a policy gradient). Positions
    /// labelled `ignore_index` count for nothing. The config's divergence, temperature and α are
    /// not used; its chunk size and implementation are.
    ///
    /// # Shapes
    /// - hidden: `[positions, width]`, weight: `[classes, width]`, labels: `[positions]`
    /// - row_weights: `positions` values
    ///
    /// # Errors
    /// As [`forward`](Self::forward); a weight vector of the wrong length or with a NaN or
    /// infinite weight.
    pub fn weighted_cross_entropy(
        &self,
        hidden: Tensor<2>,
        weight: Tensor<2>,
        labels: Tensor<1, Int>,
        row_weights: &[f32],
    ) -> crate::Result<Tensor<1>> {
        let config = &self.config;
        let [positions, width] = hidden.dims();
        let [classes, weight_width] = weight.dims();
        expect_shape("student head weight", &[classes, width], &[classes, weight_width])?;
        expect_shape("labels", &[positions], &labels.dims())?;
        expect_shape("row weights", &[positions], &[row_weights.len()])?;
        if let Some(&bad) = row_weights.iter().find(|w| !w.is_finite()) {
            return Err(LossError::InvalidParameter {
                name: "row weight",
                value: f64::from(bad),
                expected: "finite weights",
            });
        }
        let labels = read_ints(labels.into_data());
        let (indices, valid) = kernel_labels(labels.clone(), config.ignore_index, classes)?;
        let weights: Vec<f32> = row_weights
            .iter()
            .zip(&valid)
            .map(|(&w, &valid)| if valid { w } else { 0.0 })
            .collect();
        let devices = [weight.device()];
        let dtypes = [hidden.dtype(), weight.dtype()];
        let device = hidden.device();
        if !decide(config.implementation, &device, &devices, &dtypes)? {
            let log_probs = burn::tensor::activation::log_softmax(hidden.matmul(weight.transpose()), 1);
            let at_labels = log_probs
                .gather(
                    1,
                    Tensor::<1, Int>::from_data(TensorData::new(indices, [positions]), &device).reshape([positions, 1]),
                )
                .reshape([positions]);
            let weights = Tensor::<1>::from_data(TensorData::new(weights, [positions]), &device);
            return Ok((at_labels.neg() * weights).sum());
        }
        let job = HeadJob {
            spec: RowSpec::weighted(Divergence::ForwardKl, 1.0, false, 0.0, 0.0),
            chunk_rows: config.chunk_rows,
            labels: None,
            weights: Arc::new(weights),
        };
        let sparse = SparseTeacher {
            k: 1,
            log_probs: vec![0.0; positions],
            tails: vec![f32::NEG_INFINITY; positions],
            indices,
        };
        let output = Tensor::<1>::from_dispatch(<Dispatch as FusedLossBackend>::fused_head_loss_sparse(
            hidden.into_dispatch(),
            weight.into_dispatch(),
            Arc::new(sparse),
            job,
        ));
        if has_nan(&output) {
            return Err(LossError::NonFinite {
                tensor: "student logits of the linear head",
                kind: "NaN, +inf or all -inf",
            });
        }
        Ok(output)
    }

    /// `log q_i(label_i)` at every position (0 where the label is `ignore_index`), detached,
    /// with the student logits formed `chunk_rows` positions at a time: what a per-token policy
    /// gradient weighs its positions by.
    ///
    /// # Errors
    /// Shapes that do not fit, labels out of range.
    pub fn label_log_probs(
        &self,
        hidden: Tensor<2>,
        weight: Tensor<2>,
        labels: Tensor<1, Int>,
    ) -> crate::Result<Vec<f32>> {
        let [positions, width] = hidden.dims();
        let [classes, weight_width] = weight.dims();
        expect_shape("student head weight", &[classes, width], &[classes, weight_width])?;
        expect_shape("labels", &[positions], &labels.dims())?;
        let labels = read_ints(labels.into_data());
        let (indices, valid) = kernel_labels(labels, self.config.ignore_index, classes)?;
        let device = hidden.device();
        let (hidden, weight_t) = (hidden.detach(), weight.detach().transpose());
        let mut out = Vec::with_capacity(positions);
        let chunk = self.config.chunk_rows.max(1);
        for start in (0..positions).step_by(chunk) {
            let end = (start + chunk).min(positions);
            let logits = hidden.clone().slice([start..end, 0..width]).matmul(weight_t.clone());
            let rows =
                Tensor::<1, Int>::from_data(TensorData::new(indices[start..end].to_vec(), [end - start]), &device);
            let picked = burn::tensor::activation::log_softmax(logits, 1)
                .gather(1, rows.reshape([end - start, 1]))
                .reshape([end - start]);
            out.extend(picked.into_data().iter::<f32>());
        }
        for (value, &valid) in out.iter_mut().zip(&valid) {
            if !valid {
                *value = 0.0;
            }
        }
        Ok(out)
    }

    /// One matmul and the composed loss: the reference, and the path on other devices.
    fn composed(
        &self,
        hidden: Tensor<2>,
        weight: Tensor<2>,
        teacher: HeadTeacher,
        labels: Option<Vec<i64>>,
        reduction: Reduction,
    ) -> crate::Result<Tensor<1>> {
        let config = &self.config;
        let device = hidden.device();
        let student = hidden.matmul(weight.transpose());
        let positions = student.dims()[0];
        let labels = Tensor::<1, Int>::from_data(
            burn::tensor::TensorData::new(labels.unwrap_or_else(|| vec![0; positions]), [positions]),
            &device,
        );
        let hard = |student: Tensor<2>| {
            // α = 1 leaves Hinton KD's cross-entropy alone (the teacher is not read).
            HintonKdLossConfig::new()
                .with_alpha(1.0)
                .with_ignore_index(config.ignore_index)
                .with_implementation(Implementation::Composed)
                .try_init()?
                .forward(student.clone(), student, labels.clone(), reduction)
        };
        let teacher = match teacher {
            HeadTeacher::Logits(logits) => logits,
            HeadTeacher::Head { hidden, weight } => hidden.matmul(weight.transpose()),
            HeadTeacher::Labels => {
                // Forward KL to a one-hot teacher is the cross-entropy at the loss's temperature.
                let soft = hard(student.div_scalar(config.temperature))?;
                return Ok(if config.scale_by_temperature_squared {
                    soft.mul_scalar(config.temperature * config.temperature)
                } else {
                    soft
                });
            }
            HeadTeacher::TopK {
                indices,
                log_probs,
                tail,
            } => {
                let mask = labels.clone().not_equal_elem(config.ignore_index);
                let soft = SparseKlLossConfig::new()
                    .with_temperature(config.temperature)
                    .with_scale_by_temperature_squared(config.scale_by_temperature_squared)
                    .with_tail(tail)
                    .try_init()?
                    .forward_masked(student.clone(), indices, log_probs, mask, reduction)?;
                if config.alpha == 0.0 {
                    return Ok(soft);
                }
                return Ok(soft.mul_scalar(1.0 - config.alpha) + hard(student)?.mul_scalar(config.alpha));
            }
        };
        if config.divergence == Divergence::ForwardKl {
            return HintonKdLossConfig::new()
                .with_alpha(config.alpha)
                .with_temperature(config.temperature)
                .with_scale_by_temperature_squared(config.scale_by_temperature_squared)
                .with_ignore_index(config.ignore_index)
                .with_implementation(Implementation::Composed)
                .try_init()?
                .forward(student, teacher, labels.clone(), reduction);
        }
        let mask = labels.clone().not_equal_elem(config.ignore_index);
        let soft = DivergenceLossConfig::new(config.divergence)
            .with_temperature(config.temperature)
            .with_scale_by_temperature_squared(config.scale_by_temperature_squared)
            .with_implementation(Implementation::Composed)
            .try_init()?
            .forward_masked(student.clone(), teacher.clone(), mask, reduction)?;
        if config.alpha == 0.0 {
            return Ok(soft);
        }
        Ok(soft.mul_scalar(1.0 - config.alpha) + hard(student)?.mul_scalar(config.alpha))
    }
}

fn expect_shape(tensor: &'static str, expected: &[usize], actual: &[usize]) -> crate::Result<()> {
    if expected == actual {
        Ok(())
    } else {
        Err(LossError::ShapeMismatch {
            tensor,
            expected: expected.to_vec(),
            actual: actual.to_vec(),
        })
    }
}

/// A top-k teacher on the host, checked, with the log-probability of its tail classes per
/// position: `ln((1 − Σ p_top) / (V − k))` for [`TailPolicy::UniformTail`] (the missing mass
/// taken as `−expm1(log p_max) − Σ others`, as [`SparseKlLoss`](crate::SparseKlLoss) does),
/// `-inf` for [`TailPolicy::Renormalize`] and where no mass is missing.
fn sparse_teacher_rows(
    indices: Tensor<2, Int>,
    log_probs: Tensor<2>,
    tail: TailPolicy,
    classes: usize,
) -> crate::Result<SparseTeacher> {
    let k = indices.dims()[1];
    let indices = read_ints(indices.into_data());
    let log_probs: Vec<f32> = log_probs.into_data().iter::<f32>().collect();
    if let Some(&index) = indices.iter().find(|&&index| index < 0 || index >= classes as i64) {
        return Err(LossError::IndexOutOfRange {
            tensor: "teacher top-k indices",
            index,
            classes,
        });
    }
    if let Some(&value) = log_probs
        .iter()
        .find(|value| value.is_nan() || **value == f32::INFINITY)
    {
        return Err(LossError::NonFinite {
            tensor: "teacher top-k log-probs",
            kind: if value.is_nan() { "NaN" } else { "+inf" },
        });
    }
    let tails = log_probs
        .chunks(k)
        .map(|row| {
            if tail == TailPolicy::Renormalize || k == classes {
                return f32::NEG_INFINITY;
            }
            let (largest, _) =
                row.iter().enumerate().fold(
                    (0, f32::NEG_INFINITY),
                    |best, (i, &value)| if value > best.1 { (i, value) } else { best },
                );
            let others: f64 = row
                .iter()
                .enumerate()
                .filter(|&(i, _)| i != largest)
                .map(|(_, &value)| f64::from(value).exp())
                .sum();
            let missing = (-f64::from(row[largest]).exp_m1() - others).max(0.0);
            (missing / (classes - k) as f64).ln() as f32
        })
        .collect();
    Ok(SparseTeacher {
        k,
        indices,
        log_probs,
        tails,
    })
}
