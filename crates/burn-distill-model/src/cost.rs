//! Model size and compute, so an example can say "2.2× smaller and 2.4× cheaper".

use burn::module::Module;

/// Parameters and forward FLOPs of a model.
///
/// FLOPs count a multiply-add as 2 and a bias addition as 1, for one example's forward pass;
/// activations, softmax and dropout are not counted (they are small next to the matrix
/// products of the models here).
pub trait Cost: Module {
    /// Forward-pass FLOPs for one example.
    fn flops_per_example(&self) -> u64;

    /// Number of trainable scalars.
    fn parameter_count(&self) -> usize {
        self.num_params()
    }
}

/// How much smaller and cheaper `student` is than `teacher`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Compression {
    /// Teacher parameters / student parameters.
    pub size_ratio: f64,
    /// Teacher FLOPs / student FLOPs.
    pub compute_ratio: f64,
}

impl Compression {
    /// Compares two models.
    pub fn between(teacher: &impl Cost, student: &impl Cost) -> Self {
        Self {
            size_ratio: teacher.parameter_count() as f64 / student.parameter_count() as f64,
            compute_ratio: teacher.flops_per_example() as f64 / student.flops_per_example() as f64,
        }
    }
}
