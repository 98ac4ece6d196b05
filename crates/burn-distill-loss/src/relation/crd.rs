//! Contrastive representation distillation (Tian, Krishnan & Isola, ICLR 2020): learned
//! embeddings of both sides, a momentum memory bank of every training example's embedding, and
//! a noise-contrastive estimate over negatives drawn from it.

use std::sync::Arc;

use burn::config::Config;
use burn::module::{Module, Param};
use burn::nn::{Linear, LinearConfig};
use burn::tensor::{Device, Distribution, IndexingUpdateOp, Int, Tensor, TensorData};
use rand::RngExt;
use rand::SeedableRng;
use rand::rngs::StdRng;

use crate::error::{LossError, check_range, check_temperature};
use crate::fused::{Implementation, gathered_dot, use_host_relation};
use crate::input::read_ints;
use crate::relation::common::{NORM_FLOOR, check_features, example_rows, norm_floor};

/// Added inside the NCE logarithms, as in the authors' code.
const NCE_EPS: f64 = 1e-7;

/// Configuration of [`CrdLoss`].
///
/// Each side's feature goes through a learned linear embedding to `embedding_width`, scaled to
/// unit length. Two memory banks hold every training example's last embedding (student and
/// teacher), updated with momentum after each step. For example `i` and `negatives` other
/// examples `j`, the student's embedding is scored against the teacher bank (and the teacher's
/// against the student bank) by `exp(v · m_j / T) / Z`; the loss is the NCE loss of telling
/// the positive (`j = i`) from the negatives, summed over both directions and averaged over the
/// batch. `Z` is estimated once, from the first batch, as in the authors' code (with gradient
/// accumulation, from the step's first micro-batch). Negatives are drawn uniformly from the
/// other examples ([`sample_negatives`](CrdLoss::sample_negatives)), as the authors'
/// `ContrastMemory` does; their CIFAR-100 loader can instead draw them from other classes
/// (`mode='exact'`), which this crate leaves to the caller (pass your own `negatives`).
///
/// | Name | Default | Purpose | Range |
/// |---|---|---|---|
/// | `student_width` | (required) | width of the student feature (flattened) | `≥ 1` |
/// | `teacher_width` | (required) | width of the teacher feature (flattened) | `≥ 1` |
/// | `examples` | (required) | training examples: rows of each bank, range of the indices | `> negatives` |
/// | `embedding_width` | 128 | width of the embeddings and banks | `≥ 1` |
/// | `negatives` | 4096 | negatives per example (the paper: 16384 on CIFAR-100) | `≥ 1` |
/// | `temperature` | 0.07 | `T` of the scores | `> 0` |
/// | `momentum` | 0.5 | bank update `m ← normalize(μ m + (1 − μ) v)` | `[0, 1)` |
/// | `check_inputs` | true | refuse NaN / infinite features, indices out of range | |
/// | `implementation` | `Auto` | the bank scores gathered and multiplied in one host kernel on the CPU devices (ndarray, flex; f32 banks that take no gradient, as `init` makes them), composed tensor ops elsewhere | see [`Implementation`] |
#[derive(Config, Debug)]
pub struct CrdLossConfig {
    /// Width of the student feature.
    pub student_width: usize,
    /// Width of the teacher feature.
    pub teacher_width: usize,
    /// Number of training examples (rows of each memory bank).
    pub examples: usize,
    /// Width of the embeddings.
    #[config(default = 128)]
    pub embedding_width: usize,
    /// Negatives drawn per example.
    #[config(default = 4096)]
    pub negatives: usize,
    /// Temperature of the scores.
    #[config(default = 0.07)]
    pub temperature: f64,
    /// Momentum of the memory banks.
    #[config(default = 0.5)]
    pub momentum: f64,
    /// Check features for NaN / infinities and indices for their range (device reads).
    #[config(default = true)]
    pub check_inputs: bool,
    /// One host kernel for the bank scores (the CPU devices) or composed tensor operations.
    #[config(default = "Implementation::Auto")]
    pub implementation: Implementation,
}

impl CrdLossConfig {
    /// Builds the loss on `device` (an autodiff device, to train its embeddings), with banks
    /// drawn uniformly from `±√(3 / embedding_width)` as the authors' code does.
    ///
    /// # Errors
    /// [`LossError::InvalidParameter`] for a width, bank or negative count of zero, fewer
    /// examples than negatives + 1, a temperature that is not positive, or a momentum outside
    /// `[0, 1)`.
    pub fn try_init(&self, device: &Device) -> crate::Result<CrdLoss> {
        self.check()?;
        let bound = (3.0 / self.embedding_width as f64).sqrt();
        let bank = || {
            let values = Tensor::<2>::random(
                [self.examples, self.embedding_width],
                Distribution::Uniform(-bound, bound),
                device,
            );
            Param::from_tensor(values).set_require_grad(false)
        };
        Ok(CrdLoss {
            student_embed: LinearConfig::new(self.student_width, self.embedding_width).init(device),
            teacher_embed: LinearConfig::new(self.teacher_width, self.embedding_width).init(device),
            student_bank: bank(),
            teacher_bank: bank(),
            normalisers: Param::from_tensor(Tensor::from_floats([-1.0, -1.0], device)).set_require_grad(false),
            negatives: self.negatives,
            temperature: self.temperature,
            momentum: self.momentum,
            check_inputs: self.check_inputs,
            implementation: self.implementation,
        })
    }

    /// Checks the settings without building anything (what [`try_init`](Self::try_init)
    /// refuses).
    ///
    /// # Errors
    /// As [`try_init`](Self::try_init).
    pub fn check(&self) -> crate::Result<()> {
        for (name, value) in [
            ("student_width", self.student_width),
            ("teacher_width", self.teacher_width),
            ("embedding_width", self.embedding_width),
            ("negatives", self.negatives),
        ] {
            if value == 0 {
                return Err(LossError::InvalidParameter {
                    name,
                    value: 0.0,
                    expected: "at least 1",
                });
            }
        }
        if self.examples <= self.negatives {
            return Err(LossError::InvalidParameter {
                name: "examples",
                value: self.examples as f64,
                expected: "more training examples than negatives per example",
            });
        }
        check_temperature(self.temperature)?;
        check_range("momentum", self.momentum, 0.0, 1.0 - f64::EPSILON, "a value in [0, 1)")?;
        Ok(())
    }

    /// Builds the loss.
    ///
    /// # Panics
    /// When a hyper-parameter is out of range; the message names it.
    pub fn init(&self, device: &Device) -> CrdLoss {
        self.try_init(device)
            .unwrap_or_else(|error| panic!("invalid CrdLossConfig: {error}"))
    }
}

/// Contrastive representation distillation; built by [`CrdLossConfig`].
///
/// It is a module with state: train it with the student (its embeddings learn) and save it with
/// the student's checkpoint (its banks and `Z` are parameters that take no gradient, so they
/// are in its record). Each step is [`forward`](Self::forward), the optimizer's step, then
/// [`update`](Self::update) with what `forward` returned.
#[derive(Module, Debug)]
pub struct CrdLoss {
    /// The student's embedding.
    pub student_embed: Linear,
    /// The teacher's embedding (trained too; the teacher itself is not).
    pub teacher_embed: Linear,
    student_bank: Param<Tensor<2>>,
    teacher_bank: Param<Tensor<2>>,
    /// `[Z_student, Z_teacher]`, negative until the first batch sets them.
    normalisers: Param<Tensor<1>>,
    #[module(skip)]
    negatives: usize,
    #[module(skip)]
    temperature: f64,
    #[module(skip)]
    momentum: f64,
    /// Whether inputs are checked.
    pub check_inputs: bool,
    /// Host kernel or composed tensor operations for the bank scores.
    #[module(skip)]
    pub implementation: Implementation,
}

/// The bank rows and normalisers a [`CrdLoss::forward`] call computed, for
/// [`CrdLoss::update`].
#[derive(Debug, Clone)]
pub struct CrdUpdate {
    indices: Tensor<1, Int>,
    student_rows: Tensor<2>,
    teacher_rows: Tensor<2>,
    normalisers: Tensor<1>,
}

/// What [`CrdLoss::forward`] returns.
#[derive(Debug, Clone)]
pub struct CrdOutput {
    /// `student_term + teacher_term`, `[1]`.
    pub loss: Tensor<1>,
    /// NCE loss of the student's embedding against the teacher bank.
    pub student_term: Tensor<1>,
    /// NCE loss of the teacher's embedding against the student bank.
    pub teacher_term: Tensor<1>,
    /// The bank update to apply after the optimizer's step.
    pub update: CrdUpdate,
}

impl CrdLoss {
    /// The loss of a batch of examples, and the bank update it implies.
    ///
    /// # Shapes
    /// - student: `[batch, ..]` (flattened to `student_width`)
    /// - teacher: `[batch, ..]` (flattened to `teacher_width`)
    /// - indices: `[batch]`, each example's index in the training set, distinct
    /// - negatives: `[batch, negatives]`, indices of the contrasted examples
    ///   ([`sample_negatives`](Self::sample_negatives) draws them)
    ///
    /// # Errors
    /// [`LossError::FeatureShape`] for a width or batch that does not fit,
    /// [`LossError::IndexOutOfRange`] for an index outside the banks,
    /// [`LossError::NonFinite`].
    pub fn forward<const D: usize>(
        &self,
        student: Tensor<D>,
        teacher: Tensor<D>,
        indices: Tensor<1, Int>,
        negatives: Tensor<2, Int>,
    ) -> crate::Result<CrdOutput> {
        let student = example_rows(student, "student features")?;
        let teacher = example_rows(teacher, "teacher features")?.detach();
        let [batch, student_width] = student.dims();
        let [examples, embedding_width] = self.student_bank.dims();
        let expect = |what: &'static str, expected: String, actual: Vec<usize>, ok: bool| {
            if ok {
                Ok(())
            } else {
                Err(LossError::FeatureShape { what, expected, actual })
            }
        };
        let embed_in = |linear: &Linear| linear.weight.dims()[0];
        expect(
            "student features",
            format!("[batch, {}] after flattening", embed_in(&self.student_embed)),
            student.dims().to_vec(),
            student_width == embed_in(&self.student_embed) && batch > 0,
        )?;
        expect(
            "teacher features",
            format!("[{batch}, {}] after flattening", embed_in(&self.teacher_embed)),
            teacher.dims().to_vec(),
            teacher.dims() == [batch, embed_in(&self.teacher_embed)],
        )?;
        expect(
            "indices",
            format!("[{batch}]"),
            indices.dims().to_vec(),
            indices.dims() == [batch],
        )?;
        expect(
            "negatives",
            format!("[{batch}, {}]", self.negatives),
            negatives.dims().to_vec(),
            negatives.dims() == [batch, self.negatives],
        )?;
        if self.check_inputs {
            check_features(&student, &teacher)?;
            check_indices(&indices, "indices", examples)?;
            let mut seen: Vec<i64> = read_ints(indices.clone().into_data());
            seen.sort_unstable();
            if let Some(pair) = seen.windows(2).find(|pair| pair[0] == pair[1]) {
                return Err(LossError::FeatureShape {
                    what: "indices",
                    expected: format!(
                        "distinct training-set indices (each example's bank row is written once); {} repeats",
                        pair[0]
                    ),
                    actual: indices.dims().to_vec(),
                });
            }
            check_indices(
                &negatives.clone().reshape([batch * self.negatives]),
                "negatives",
                examples,
            )?;
        }
        let student_embedding = embed(&self.student_embed, student);
        let teacher_embedding = embed(&self.teacher_embed, teacher);
        let contrasted = Tensor::cat(vec![indices.clone().reshape([batch, 1]), negatives], 1)
            .reshape([batch * (self.negatives + 1)]);
        let student_bank = self.student_bank.val();
        let teacher_bank = self.teacher_bank.val();
        // On the CPU devices each bank row is gathered and multiplied in one pass (the composed
        // form writes all `[batch · (negatives + 1), embedding]` rows first).
        let per_row = self.negatives + 1;
        let host = use_host_relation(self.implementation, &student_embedding, &student_bank)?
            && teacher_bank.dtype() == student_bank.dtype()
            && !student_bank.is_require_grad()
            && !teacher_bank.is_require_grad();
        let host_indices = host.then(|| Arc::new(read_ints(contrasted.clone().into_data())));
        let scores = |bank: Tensor<2>, embedding: Tensor<2>| {
            let dots = match &host_indices {
                Some(indices) => gathered_dot(bank, embedding, indices.clone(), per_row),
                None => bank
                    .select(0, contrasted.clone())
                    .reshape([batch, per_row, embedding_width])
                    .matmul(embedding.reshape([batch, embedding_width, 1]))
                    .reshape([batch, per_row]),
            };
            dots.div_scalar(self.temperature).exp()
        };
        let student_scores = scores(teacher_bank.clone(), student_embedding.clone());
        let teacher_scores = scores(student_bank.clone(), teacher_embedding.clone());

        let stored: Vec<f64> = self.normalisers.val().into_data().iter::<f64>().collect();
        let device = student_scores.device();
        let normaliser = |stored: f64, scores: &Tensor<2>| {
            if stored > 0.0 {
                Tensor::<1>::from_floats([stored as f32], &device)
            } else {
                scores.clone().detach().mean().mul_scalar(examples as f64)
            }
        };
        let student_normaliser = normaliser(stored[0], &student_scores);
        let teacher_normaliser = normaliser(stored[1], &teacher_scores);
        let student_term = nce(
            student_scores / student_normaliser.clone().reshape([1, 1]),
            examples,
            self.negatives,
        );
        let teacher_term = nce(
            teacher_scores / teacher_normaliser.clone().reshape([1, 1]),
            examples,
            self.negatives,
        );

        let moved = |bank: Tensor<2>, embedding: Tensor<2>| {
            let old = bank.select(0, indices.clone());
            let new = old.mul_scalar(self.momentum) + embedding.detach().mul_scalar(1.0 - self.momentum);
            new.clone() / norm_floor(new, 1, NORM_FLOOR)
        };
        let student_rows = moved(student_bank, student_embedding);
        let teacher_rows = moved(teacher_bank, teacher_embedding);
        let update = CrdUpdate {
            indices,
            student_rows,
            teacher_rows,
            normalisers: Tensor::cat(vec![student_normaliser, teacher_normaliser], 0),
        };
        Ok(CrdOutput {
            loss: student_term.clone() + teacher_term.clone(),
            student_term,
            teacher_term,
            update,
        })
    }

    /// Writes a step's bank rows (call it after the optimizer's step; the embeddings it moved
    /// are the ones `forward` computed, as in the authors' code), and the normalisers when they
    /// were not set yet.
    pub fn update(self, update: CrdUpdate) -> Self {
        let CrdUpdate {
            indices,
            student_rows,
            teacher_rows,
            normalisers,
        } = update;
        let overwrite = |bank: Tensor<2>, rows: Tensor<2>| {
            bank.detach()
                .select_assign(0, indices.clone(), rows.detach(), IndexingUpdateOp::Assign)
        };
        let unset = self.normalisers().is_none();
        Self {
            student_bank: self.student_bank.map(|bank| overwrite(bank, student_rows)),
            teacher_bank: self.teacher_bank.map(|bank| overwrite(bank, teacher_rows)),
            normalisers: if unset {
                self.normalisers.map(|_| normalisers.detach())
            } else {
                self.normalisers
            },
            ..self
        }
    }

    /// Draws `negatives` indices per example uniformly from the training set, never the
    /// example itself, from `seed` (a run passes its step's seed, so a resumed run draws the
    /// same).
    ///
    /// # Shapes
    /// - output: `[indices.len(), negatives]`
    pub fn sample_negatives(&self, indices: &[i64], seed: u64, device: &Device) -> Tensor<2, Int> {
        let examples = self.student_bank.dims()[0] as i64;
        let mut rng = StdRng::seed_from_u64(seed);
        let mut drawn = Vec::with_capacity(indices.len() * self.negatives);
        for &index in indices {
            for _ in 0..self.negatives {
                // Uniform over the other examples: draw from examples - 1 and skip the positive.
                let other = rng.random_range(0..examples - 1);
                drawn.push(if other >= index { other + 1 } else { other });
            }
        }
        Tensor::from_data(TensorData::new(drawn, [indices.len(), self.negatives]), device)
    }

    /// The student and teacher memory banks, `[examples, embedding_width]` each.
    pub fn banks(&self) -> (Tensor<2>, Tensor<2>) {
        (self.student_bank.val(), self.teacher_bank.val())
    }

    /// `[Z_student, Z_teacher]`, `None` before the first update.
    pub fn normalisers(&self) -> Option<[f64; 2]> {
        let values: Vec<f64> = self.normalisers.val().into_data().iter::<f64>().collect();
        (values[0] > 0.0).then(|| [values[0], values[1]])
    }

    /// The same loss with the given banks (to reproduce a reference, or to start from saved
    /// embeddings).
    ///
    /// # Errors
    /// [`LossError::FeatureShape`] when a bank's shape is not `[examples, embedding_width]`.
    pub fn with_banks(self, student_bank: Tensor<2>, teacher_bank: Tensor<2>) -> crate::Result<Self> {
        let shape = self.student_bank.dims();
        for (what, bank) in [("student bank", &student_bank), ("teacher bank", &teacher_bank)] {
            if bank.dims() != shape {
                return Err(LossError::FeatureShape {
                    what,
                    expected: format!("{shape:?}"),
                    actual: bank.dims().to_vec(),
                });
            }
        }
        Ok(Self {
            student_bank: self.student_bank.map(|_| student_bank.detach()),
            teacher_bank: self.teacher_bank.map(|_| teacher_bank.detach()),
            ..self
        })
    }
}

/// `linear(rows)` scaled to unit length.
fn embed(linear: &Linear, rows: Tensor<2>) -> Tensor<2> {
    let embedded = linear.forward(rows);
    embedded.clone() / norm_floor(embedded, 1, NORM_FLOOR)
}

/// The NCE loss of scores `[batch, 1 + negatives]` (positive first) with noise probability
/// `1 / examples`: `−(Σ log P(D=1 | pos) + Σ log P(D=0 | neg)) / batch`.
fn nce(scores: Tensor<2>, examples: usize, negatives: usize) -> Tensor<1> {
    let [batch, _] = scores.dims();
    let noise = negatives as f64 / examples as f64;
    let positive = scores.clone().narrow(1, 0, 1);
    let negative = scores.narrow(1, 1, negatives);
    let log_positive = (positive.clone() / positive.add_scalar(noise + NCE_EPS)).log().sum();
    let log_negative = negative
        .add_scalar(noise + NCE_EPS)
        .recip()
        .mul_scalar(noise)
        .log()
        .sum();
    (log_positive + log_negative).neg().div_scalar(batch as f64)
}

fn check_indices(indices: &Tensor<1, Int>, tensor: &'static str, examples: usize) -> crate::Result<()> {
    let outside = indices
        .clone()
        .lower_elem(0)
        .bool_or(indices.clone().greater_equal_elem(examples as i64));
    let first = read_ints(
        Tensor::cat(
            vec![
                outside.clone().any().int().reshape([1]),
                indices.clone().mask_fill(outside.bool_not(), 0).max().reshape([1]),
                indices.clone().min().reshape([1]),
            ],
            0,
        )
        .into_data(),
    );
    if first[0] != 0 {
        let index = if first[2] < 0 { first[2] } else { first[1] };
        return Err(LossError::IndexOutOfRange {
            tensor,
            index,
            classes: examples,
        });
    }
    Ok(())
}
