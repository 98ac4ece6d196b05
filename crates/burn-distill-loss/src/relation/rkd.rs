//! Relational knowledge distillation (Park, Kim, Lu & Cho, CVPR 2019): distance and angle.

use burn::config::Config;
use burn::module::Module;
use burn::tensor::{Bool, Tensor};

use crate::error::check_range;
use crate::relation::common::{check_examples, check_features, example_rows, smooth_l1};

/// Squared distances are floored here before their square root (the reference `pdist`'s eps).
const DISTANCE_FLOOR: f64 = 1e-12;

/// Configuration of [`RkdLoss`]: `distance_weight · L_D + angle_weight · L_A`.
///
/// `L_D` is the smooth-L1 (Huber, δ = 1) loss between the student's and the teacher's pairwise
/// Euclidean distances, each divided by its mean over the distinct pairs; `L_A` the smooth-L1
/// loss between the cosines of the angles every triple of examples makes (`[batch]³` of them).
/// Both are means over all entries, the reference code's `F.smooth_l1_loss(.., "mean")`.
/// Student and teacher widths may differ. The defaults are the reference implementation's
/// weights (RepDistiller: 25 and 50; the paper's ratio 1 : 2).
///
/// | Name | Default | Purpose | Range |
/// |---|---|---|---|
/// | `distance_weight` | 25.0 | weight of `L_D` | `≥ 0` |
/// | `angle_weight` | 50.0 | weight of `L_A` | `≥ 0` |
/// | `check_inputs` | true | refuse NaN / infinite features | |
///
/// The angle term holds `[batch]³` cosines (8 MiB at batch 128), computed from the batch's Gram
/// matrix.
#[derive(Config, Debug)]
pub struct RkdLossConfig {
    /// Weight of the distance term.
    #[config(default = 25.0)]
    pub distance_weight: f64,
    /// Weight of the angle term.
    #[config(default = 50.0)]
    pub angle_weight: f64,
    /// Check the features for NaN and infinities (one device read).
    #[config(default = true)]
    pub check_inputs: bool,
}

impl RkdLossConfig {
    /// Builds the loss, or says which hyper-parameter is out of range.
    ///
    /// # Errors
    /// [`LossError::InvalidParameter`](crate::LossError::InvalidParameter) for a negative or
    /// non-finite weight.
    pub fn try_init(&self) -> crate::Result<RkdLoss> {
        check_range(
            "distance_weight",
            self.distance_weight,
            0.0,
            f64::MAX,
            "a finite value >= 0",
        )?;
        check_range("angle_weight", self.angle_weight, 0.0, f64::MAX, "a finite value >= 0")?;
        Ok(RkdLoss {
            distance_weight: self.distance_weight,
            angle_weight: self.angle_weight,
            check_inputs: self.check_inputs,
        })
    }

    /// Builds the loss.
    ///
    /// # Panics
    /// When a weight is out of range; the message names it.
    pub fn init(&self) -> RkdLoss {
        self.try_init()
            .unwrap_or_else(|error| panic!("invalid RkdLossConfig: {error}"))
    }
}

/// Relational KD loss; built by [`RkdLossConfig`].
#[derive(Module, Debug)]
pub struct RkdLoss {
    /// Weight of the distance term.
    #[module(skip)]
    pub distance_weight: f64,
    /// Weight of the angle term.
    #[module(skip)]
    pub angle_weight: f64,
    /// Whether inputs are checked.
    pub check_inputs: bool,
}

impl RkdLoss {
    /// The loss of the batch: a relation between its examples, so there is no per-example value
    /// and no reduction to choose.
    ///
    /// # Shapes
    /// - student: `[batch, ..]` (flattened to `[batch, features]`)
    /// - teacher: `[batch, ..]`, its own width
    /// - output: `[1]`
    ///
    /// # Errors
    /// [`LossError::TooFewExamples`](crate::LossError::TooFewExamples) below 2 examples (no
    /// pair has a distance), [`LossError::FeatureShape`](crate::LossError::FeatureShape) for
    /// different batch sizes, [`LossError::NonFinite`](crate::LossError::NonFinite).
    pub fn forward<const D: usize>(&self, student: Tensor<D>, teacher: Tensor<D>) -> crate::Result<Tensor<1>> {
        let (distance, angle) = self.terms(student, teacher)?;
        Ok(distance.mul_scalar(self.distance_weight) + angle.mul_scalar(self.angle_weight))
    }

    /// The distance and angle terms, unweighted.
    ///
    /// # Errors
    /// As [`forward`](Self::forward).
    pub fn terms<const D: usize>(
        &self,
        student: Tensor<D>,
        teacher: Tensor<D>,
    ) -> crate::Result<(Tensor<1>, Tensor<1>)> {
        let student = example_rows(student, "student features")?;
        let teacher = example_rows(teacher, "teacher features")?.detach();
        check_examples(&student, &teacher, "RKD", 2)?;
        if self.check_inputs {
            check_features(&student, &teacher)?;
        }
        let distance = smooth_l1(normalised_distances(student.clone()) - normalised_distances(teacher.clone())).mean();
        let angle = smooth_l1(angles(student) - angles(teacher)).mean();
        Ok((distance, angle))
    }
}

/// Pairwise Euclidean distances `[n, n]` (0 on the diagonal) divided by their mean over the
/// pairs whose distance is positive.
fn normalised_distances(rows: Tensor<2>) -> Tensor<2> {
    let [examples, _] = rows.dims();
    let squares = rows.clone().powi_scalar(2).sum_dim(1);
    let products = rows.clone().matmul(rows.transpose());
    let squared = squares.clone() + squares.transpose() - products.mul_scalar(2.0);
    let diagonal = Tensor::<2, Bool>::diag_mask([examples, examples], 0, &squared.device()).bool_not();
    let distances = squared.clamp_min(DISTANCE_FLOOR).sqrt().mask_fill(diagonal, 0.0);
    let positive = distances.clone().greater_elem(0.0).float().sum();
    let mean = distances.clone().sum() / positive;
    distances / mean.reshape([1, 1])
}

/// `cos ∠(e_i − e_j, e_k − e_j)` for every triple: `[n, n, n]`, entry `[j, i, k]`; 0 where
/// `e_i = e_j` or `e_k = e_j` (the reference normalises a zero difference to zero).
///
/// Computed from the `[n, n]` Gram matrix `G` of the centred rows (angles do not move with a
/// translation): `⟨e_i − e_j, e_k − e_j⟩ = G_ik − G_ij − G_jk + G_jj` over the two distances,
/// so no `[n, n, width]` tensor of differences is formed (at batch 128 and width 512 that tensor
/// was 32 MiB and most of the loss's time).
fn angles(rows: Tensor<2>) -> Tensor<3> {
    let [examples, _] = rows.dims();
    let n = examples;
    let centred = rows.clone() - rows.mean_dim(0);
    let gram = centred.clone().matmul(centred.transpose());
    let squares = gram
        .clone()
        .mask_fill(Tensor::<2, Bool>::diag_mask([n, n], 0, &gram.device()), 0.0)
        .sum_dim(1);
    let squared = (squares.clone() + squares.clone().transpose() - gram.clone().mul_scalar(2.0)).clamp_min(0.0);
    let same = squared.clone().lower_equal_elem(DISTANCE_FLOOR * DISTANCE_FLOOR);
    let distance = squared.clamp_min(DISTANCE_FLOOR * DISTANCE_FLOOR).sqrt();
    let numerator = gram.clone().reshape([1, n, n]).expand([n, n, n])
        - gram.clone().reshape([n, n, 1]).expand([n, n, n])
        - gram.clone().reshape([n, 1, n]).expand([n, n, n])
        + squares.reshape([n, 1, 1]).expand([n, n, n]);
    let denominator =
        distance.clone().reshape([n, n, 1]).expand([n, n, n]) * distance.reshape([n, 1, n]).expand([n, n, n]);
    let degenerate = same
        .clone()
        .reshape([n, n, 1])
        .expand([n, n, n])
        .bool_or(same.reshape([n, 1, n]).expand([n, n, n]));
    (numerator / denominator).mask_fill(degenerate, 0.0)
}
