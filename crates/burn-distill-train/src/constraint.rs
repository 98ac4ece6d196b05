//! Max-norm weight constraints (Srivastava et al. 2014, "Dropout", section 5.1; the constraint
//! on Hinton et al.'s MNIST teacher): after each optimizer step every unit's incoming weight
//! vector is scaled back onto the L2 ball of radius `c` when it has left it.

use burn::config::Config;
use burn::module::{Module, ModuleMapper, Param};
use burn::tensor::Tensor;

/// A max-norm constraint ([`apply_max_norm`]; `DistillConfig::max_norm` applies it after every
/// optimizer step).
///
/// | Name | Default | Purpose | Range |
/// |---|---|---|---|
/// | `max_norm` | (required) | largest L2 norm of a unit's incoming weights | finite, > 0 |
/// | `modules` | empty: all | the modules constrained, as dotted paths or their prefixes (`"hidden"` covers `hidden.0` and `hidden.1`) | |
#[derive(Config, Debug, PartialEq)]
pub struct MaxNormConfig {
    /// The radius `c` of the ball each unit's incoming weight vector is kept in.
    pub max_norm: f64,
    /// The modules constrained (a parameter is constrained when one of these is a prefix of its
    /// path, compared by whole components); empty for every rank-2 `weight`. Srivastava et al.
    /// constrained the hidden units only: `vec!["hidden".into()]` for an
    /// [`Mlp`](burn_distill_model::Mlp).
    #[config(default = "Vec::new()")]
    pub modules: Vec<String>,
}

/// Scales each column of every rank-2 parameter named `weight` under `config.modules` (all of
/// them when it is empty) to an L2 norm of at most `config.max_norm`. burn's `Linear` stores
/// `[d_input, d_output]`, so a column is one output unit's incoming weights. Shorter columns,
/// biases and parameters of other ranks (convolution kernels) are left as they are, bit for bit.
/// An `Embedding` table (`[vocabulary, width]`) is a rank-2 `weight` too and would be constrained
/// column by column: list the `Linear` modules in `config.modules` for a model that has one.
///
/// A parameter keeps its id, autodiff state and gradient requirement, so an optimizer's state
/// (momentum) still applies to it after the call.
///
/// # Panics
/// When `max_norm` is not finite and positive ([`crate::DistillConfig::validate`] rejects it first
/// in a training run).
pub fn apply_max_norm<M: Module>(module: M, config: &MaxNormConfig) -> M {
    let max_norm = config.max_norm;
    assert!(
        max_norm.is_finite() && max_norm > 0.0,
        "max_norm = {max_norm} must be finite and > 0"
    );
    module.map(&mut MaxNorm {
        max_norm,
        modules: &config.modules,
        path: Vec::new(),
    })
}

struct MaxNorm<'a> {
    max_norm: f64,
    modules: &'a [String],
    path: Vec<String>,
}

impl MaxNorm<'_> {
    /// Whether the parameter at `self.path` is constrained.
    fn selected(&self) -> bool {
        if self.path.last().map(String::as_str) != Some("weight") {
            return false;
        }
        self.modules.is_empty()
            || self.modules.iter().any(|module| {
                let prefix: Vec<&str> = module.split('.').collect();
                prefix.len() < self.path.len() && prefix.iter().zip(&self.path).all(|(a, b)| a == b)
            })
    }
}

impl ModuleMapper for MaxNorm<'_> {
    fn enter_module(&mut self, name: &str, _container_type: &str) {
        self.path.push(name.to_string());
    }

    fn exit_module(&mut self, _name: &str, _container_type: &str) {
        self.path.pop();
    }

    fn map_float<const D: usize>(&mut self, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
        if D != 2 || !self.selected() {
            return param;
        }
        let max_norm = self.max_norm;
        param.map(|weight| {
            let autodiff = weight.is_autodiff();
            let require_grad = weight.is_require_grad();
            let strategy = weight.gradient_checkpointing_strategy();
            let plain = weight.without_autodiff();
            // Norms of the columns, [1, d_output]; a factor of exactly 1 where within the ball
            // (so those columns come back unchanged), c / norm where outside.
            let norms = plain.clone().powi_scalar(2).sum_dim(0).sqrt();
            let outside = norms.clone().greater_elem(max_norm);
            let factor = norms
                .clone()
                .ones_like()
                .mask_where(outside, norms.recip().mul_scalar(max_norm));
            let mut scaled = plain * factor;
            if autodiff {
                scaled = scaled.autodiff();
                if let Some(strategy) = strategy {
                    scaled = scaled.with_gradient_checkpointing_strategy(strategy);
                }
                if require_grad {
                    scaled = scaled.require_grad();
                }
            }
            scaled
        })
    }
}
