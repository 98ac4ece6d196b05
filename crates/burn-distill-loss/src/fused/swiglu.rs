//! The SwiGLU gate of Llama-family feed-forward blocks, `silu(gate) · up`, as one host kernel with
//! its own backward.
//!
//! Composed from burn's operations on the CPU devices it is three passes over the
//! `[positions, ffn]` activations, the sigmoid on one thread through libm's `expf`: 13 % of a
//! SmolLM2 teacher forward on flex (`llama_bench --only forward`, BENCHMARKS.md). The kernel reads
//! both inputs once and writes the output once, on every core, with an exponential LLVM
//! vectorises; its backward is one more such pass.

// burn 0.22 deprecates ndarray in favour of flex; the extension macro names it in generated code.
#![allow(deprecated)]

use burn::backend::autodiff::Autodiff;
use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::tensor::FloatTensor;
use burn::backend::{Backend, Dispatch, TensorMetadata, backend_extension};
use burn::tensor::{Tensor, activation};
use rayon::prelude::*;

use super::kernel::fast_exp;
#[cfg(any(feature = "ndarray", feature = "flex"))]
use super::op::HostTensor;

/// `silu(gate) · up`, elementwise, with gradients to both inputs.
///
/// On the ndarray and flex devices with f32 tensors of one shape it runs one host kernel
/// (forward and backward); elsewhere it is `activation::silu(gate) * up`. The two agree to a few
/// ulp (the kernel's exponential is a polynomial good to 2 ulp); NaN inputs give NaN outputs.
///
/// # Panics
/// When the shapes differ (as burn's own elementwise operations do).
pub fn swiglu<const D: usize>(gate: Tensor<D>, up: Tensor<D>) -> Tensor<D> {
    assert_eq!(gate.dims(), up.dims(), "swiglu: gate and up must have the same shape");
    if !super::host_f32_pair((&gate.device(), gate.dtype()), (&up.device(), up.dtype())) {
        return activation::silu(gate) * up;
    }
    let output = <Dispatch as SwiGluBackend>::swiglu(gate.into_dispatch(), up.into_dispatch());
    Tensor::from_dispatch(output)
}

/// The SwiGLU gate as backend operations (host kernels on ndarray and flex).
#[backend_extension(Autodiff, NdArray: cfg(feature = "ndarray"), Flex: cfg(feature = "flex"))]
pub(crate) trait SwiGluBackend: Backend {
    /// `silu(gate) · up`; both of one shape.
    fn swiglu(gate: FloatTensor<Self>, up: FloatTensor<Self>) -> FloatTensor<Self>;

    /// The gradients w.r.t. `gate` and `up` of `silu(gate) · up`, given the upstream `grad`.
    fn swiglu_backward(
        gate: FloatTensor<Self>,
        up: FloatTensor<Self>,
        grad: FloatTensor<Self>,
    ) -> (FloatTensor<Self>, FloatTensor<Self>);
}

/// Elements per parallel task: large enough to amortise rayon, small enough for two cores to
/// share a `[2048, 1536]` activation evenly.
const CHUNK: usize = 16 * 1024;

/// `σ(x)` from `e^{-|x|}` (never overflows): `1 / (1 + e)` for `x ≥ 0`, `e / (1 + e)` below.
#[inline(always)]
fn sigmoid(x: f32) -> f32 {
    let e = fast_exp(-x.abs());
    let s = 1.0 / (1.0 + e);
    if x >= 0.0 { s } else { e * s }
}

/// `out = silu(gate) · up`.
pub(crate) fn swiglu_rows(gate: &[f32], up: &[f32], out: &mut [f32]) {
    out.par_chunks_mut(CHUNK)
        .zip(gate.par_chunks(CHUNK).zip(up.par_chunks(CHUNK)))
        .for_each(|(out, (gate, up))| {
            for ((o, &g), &u) in out.iter_mut().zip(gate).zip(up) {
                *o = g * sigmoid(g) * u;
            }
        });
}

/// `d_gate = grad · up · σ(g) (1 + g (1 − σ(g)))`, `d_up = grad · silu(g)`.
pub(crate) fn swiglu_backward_rows(gate: &[f32], up: &[f32], grad: &[f32], d_gate: &mut [f32], d_up: &mut [f32]) {
    d_gate
        .par_chunks_mut(CHUNK)
        .zip(d_up.par_chunks_mut(CHUNK))
        .zip(
            gate.par_chunks(CHUNK)
                .zip(up.par_chunks(CHUNK))
                .zip(grad.par_chunks(CHUNK)),
        )
        .for_each(|((d_gate, d_up), ((gate, up), grad))| {
            for i in 0..d_gate.len() {
                let (g, u, dy) = (gate[i], up[i], grad[i]);
                let s = sigmoid(g);
                d_gate[i] = dy * u * s * (1.0 + g * (1.0 - s));
                d_up[i] = dy * g * s;
            }
        });
}

#[cfg(any(feature = "ndarray", feature = "flex"))]
fn host_swiglu<B: HostTensor>(gate: &FloatTensor<B>, up: &FloatTensor<B>) -> FloatTensor<B> {
    let shape = gate.shape().to_vec();
    let mut out = vec![0.0f32; shape.iter().product()];
    B::with_values(gate, |gate| B::with_values(up, |up| swiglu_rows(gate, up, &mut out)));
    B::from_values(out, shape)
}

#[cfg(any(feature = "ndarray", feature = "flex"))]
fn host_swiglu_backward<B: HostTensor>(
    gate: &FloatTensor<B>,
    up: &FloatTensor<B>,
    grad: &FloatTensor<B>,
) -> (FloatTensor<B>, FloatTensor<B>) {
    let shape = gate.shape().to_vec();
    let len = shape.iter().product();
    let (mut d_gate, mut d_up) = (vec![0.0f32; len], vec![0.0f32; len]);
    B::with_values(gate, |gate| {
        B::with_values(up, |up| {
            B::with_values(grad, |grad| {
                swiglu_backward_rows(gate, up, grad, &mut d_gate, &mut d_up)
            })
        })
    });
    (B::from_values(d_gate, shape.clone()), B::from_values(d_up, shape))
}

macro_rules! host_impl {
    ($backend:ty, $feature:literal) => {
        #[cfg(feature = $feature)]
        impl SwiGluBackend for $backend {
            fn swiglu(gate: FloatTensor<Self>, up: FloatTensor<Self>) -> FloatTensor<Self> {
                host_swiglu::<Self>(&gate, &up)
            }

            fn swiglu_backward(
                gate: FloatTensor<Self>,
                up: FloatTensor<Self>,
                grad: FloatTensor<Self>,
            ) -> (FloatTensor<Self>, FloatTensor<Self>) {
                host_swiglu_backward::<Self>(&gate, &up, &grad)
            }
        }
    };
}

host_impl!(burn::backend::NdArray, "ndarray");
host_impl!(burn::backend::Flex, "flex");

/// Saved by the forward pass: both inputs.
#[derive(Debug)]
struct SwiGluBackward;

impl<B: SwiGluBackend> Backward<B, 2> for SwiGluBackward {
    type State = (FloatTensor<B>, FloatTensor<B>);

    fn backward(self, ops: Ops<Self::State, 2>, grads: &mut Gradients, _checkpointer: &mut Checkpointer) {
        let [gate_node, up_node] = ops.parents;
        let upstream = grads.consume::<B>(&ops.node);
        let (gate, up) = ops.state;
        let (d_gate, d_up) = B::swiglu_backward(gate, up, upstream);
        if let Some(node) = gate_node {
            grads.register::<B>(node.id, d_gate);
        }
        if let Some(node) = up_node {
            grads.register::<B>(node.id, d_up);
        }
    }
}

impl<B: SwiGluBackend, C: CheckpointStrategy> SwiGluBackend for Autodiff<B, C> {
    fn swiglu(gate: FloatTensor<Self>, up: FloatTensor<Self>) -> FloatTensor<Self> {
        match SwiGluBackward
            .prepare::<C>([gate.node(), up.node()])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => {
                let (gate, up) = (gate.into_primitive(), up.into_primitive());
                let output = B::swiglu(gate.clone(), up.clone());
                prep.finish((gate, up), output)
            }
            OpsKind::UnTracked(prep) => prep.finish(B::swiglu(gate.into_primitive(), up.into_primitive())),
        }
    }

    fn swiglu_backward(
        gate: FloatTensor<Self>,
        up: FloatTensor<Self>,
        grad: FloatTensor<Self>,
    ) -> (FloatTensor<Self>, FloatTensor<Self>) {
        let (d_gate, d_up) = B::swiglu_backward(gate.into_primitive(), up.into_primitive(), grad.into_primitive());
        (FloatTensor::<Self>::new(d_gate), FloatTensor::<Self>::new(d_up))
    }
}
