//! Flush-to-zero for the training thread's floating-point arithmetic.
//!
//! SGD with momentum keeps a velocity `v ← μ v + g` per parameter. When a parameter's gradient is
//! exactly zero for a while (a dead ReLU unit, a pixel that is always blank), its velocity decays
//! into the subnormal range and, with round-to-nearest, never reaches zero: `0.9 × 4 ulp` rounds
//! back to `4 ulp`. Every later step then multiplies those subnormals, and on x86 each such
//! multiply takes a microcode assist, tens of times slower than a normal one. Measured on the
//! MNIST example (flex device; BENCHMARKS.md, "Training step: flushing subnormals"): 58 % of a
//! distilled student's optimizer state was subnormal after 10 epochs, `mul_scalar` in the
//! momentum update took 54 % of the run's time, and an epoch 2.3 × as long as with the flush.
//!
//! Flushing subnormals to zero (x86 MXCSR FTZ and DAZ, AArch64 FPCR FZ) changes, in practice,
//! nothing a training run can see: a subnormal is below 2⁻¹²⁶, so added to a weight or to any
//! normal number it is lost to rounding anyway (only a weight that is itself zero or subnormal
//! could differ). The MNIST students end on bit-identical losses with and without it.
//! TensorFlow runs its CPU kernels with it on; PyTorch offers it as
//! `torch.set_flush_denormal(True)`.

use std::marker::PhantomData;

/// Flushes subnormal results and inputs to zero on the current thread until dropped, then restores
/// the thread's previous mode. A no-op on targets other than x86-64 and AArch64
/// ([`FlushDenormals::SUPPORTED`] says which).
///
/// It is not `Send`: the mode belongs to the thread that set it.
///
/// ```
/// use burn_distill_train::FlushDenormals;
/// use std::hint::black_box;
///
/// let tiny = black_box(f32::MIN_POSITIVE);
/// let flushed = {
///     let _guard = FlushDenormals::enable();
///     black_box(tiny * black_box(0.5))
/// };
/// if FlushDenormals::SUPPORTED {
///     assert_eq!(flushed, 0.0);
/// }
/// assert!(black_box(tiny * black_box(0.5)) > 0.0, "restored when the guard dropped");
/// ```
#[derive(Debug)]
#[must_use = "the mode is restored when the guard drops"]
pub struct FlushDenormals {
    previous: Option<u64>,
    /// Each rayon worker's previous mode, by its index in the pool, when the guard covers the pool.
    pool_previous: Option<Vec<Option<u64>>>,
    not_send: PhantomData<*const ()>,
}

impl FlushDenormals {
    /// Whether this target has a flush-to-zero mode that [`FlushDenormals::enable`] sets.
    pub const SUPPORTED: bool = cfg!(any(target_arch = "x86_64", target_arch = "aarch64"));

    /// Turns flush-to-zero on for the current thread.
    ///
    /// New threads inherit the mode of the thread that spawns them: a rayon pool first started
    /// while this guard is on gets flushed workers for good. [`enable_with_pool`](Self::enable_with_pool)
    /// covers the pool and starts it unflushed.
    pub fn enable() -> Self {
        Self {
            previous: flush_here(),
            pool_previous: None,
            not_send: PhantomData,
        }
    }

    /// Turns flush-to-zero on for the current thread and for every thread of the current rayon
    /// pool (the global one outside a pool), and restores each thread's own mode when dropped.
    ///
    /// The CPU backends run their large matrix products and reductions on that pool (burn's
    /// `rayon` feature, this crate's `parallel`), so a guard on the calling thread alone would
    /// leave most of a step's arithmetic unflushed. [`Distiller`](crate::Distiller) uses this.
    /// Do not start other work on the same pool while the guard lives: it runs flushed too. Two
    /// guards held at once by different threads share the pool: the first dropped restores its
    /// workers' earlier mode while the other still runs (a training run in parallel with another
    /// in one process then computes unflushed: slower on subnormals, the same weights otherwise).
    pub fn enable_with_pool() -> Self {
        // The pool first: a pool started by this call spawns its workers from this thread, and a
        // new thread inherits its parent's floating-point mode; started from a flushed thread
        // they would record "flushed" as their own mode and keep it after the guard.
        let pool_previous = Some(rayon::broadcast(|_| flush_here()));
        let previous = flush_here();
        Self {
            previous,
            pool_previous,
            not_send: PhantomData,
        }
    }
}

/// Sets the flush bits on this thread and returns its previous mode.
fn flush_here() -> Option<u64> {
    let previous = mode::read();
    if let Some(previous) = previous {
        mode::write(previous | mode::FLUSH_BITS);
    }
    previous
}

impl Drop for FlushDenormals {
    fn drop(&mut self) {
        // The pool first: the calling thread may itself be one of its workers, and its own mode
        // from before either was set is the one to end on.
        if let Some(pool_previous) = self.pool_previous.take() {
            rayon::broadcast(|context| {
                if let Some(Some(previous)) = pool_previous.get(context.index()) {
                    mode::write(*previous);
                }
            });
        }
        if let Some(previous) = self.previous {
            mode::write(previous);
        }
    }
}

// The compiler assumes the default floating-point environment, so code built for it may fold a
// subnormal constant differently from the flushed hardware; here that only decides whether a
// quantity below 2^-126 reads as itself or as zero, which training does not distinguish.
#[cfg(target_arch = "x86_64")]
#[allow(unsafe_code)]
mod mode {
    /// MXCSR: FTZ (bit 15) flushes subnormal results, DAZ (bit 6) reads subnormal inputs as zero.
    pub const FLUSH_BITS: u64 = (1 << 15) | (1 << 6);

    pub fn read() -> Option<u64> {
        let mut csr: u32 = 0;
        // SAFETY: stmxcsr stores the 32-bit MXCSR into `csr`, a live, aligned local.
        unsafe { core::arch::asm!("stmxcsr [{}]", in(reg) &mut csr, options(nostack, preserves_flags)) };
        Some(u64::from(csr))
    }

    pub fn write(value: u64) {
        // Only mode bits are ever set here, on a value read from the register itself.
        let csr = value as u32;
        // SAFETY: ldmxcsr loads a valid MXCSR value (the register's own, plus FTZ/DAZ) from a
        // live local; reserved bits are untouched, so it cannot fault.
        unsafe { core::arch::asm!("ldmxcsr [{}]", in(reg) &csr, options(nostack, readonly, preserves_flags)) };
    }
}

#[cfg(target_arch = "aarch64")]
#[allow(unsafe_code)]
mod mode {
    /// FPCR.FZ (bit 24): subnormal inputs and results are flushed to zero.
    pub const FLUSH_BITS: u64 = 1 << 24;

    pub fn read() -> Option<u64> {
        let fpcr: u64;
        // SAFETY: reading FPCR has no side effects.
        unsafe { core::arch::asm!("mrs {}, fpcr", out(reg) fpcr, options(nomem, nostack, preserves_flags)) };
        Some(fpcr)
    }

    pub fn write(value: u64) {
        // SAFETY: writes back the register's own value with only the FZ mode bit changed.
        unsafe { core::arch::asm!("msr fpcr, {}", in(reg) value, options(nomem, nostack, preserves_flags)) };
    }
}

#[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
mod mode {
    pub const FLUSH_BITS: u64 = 0;

    pub fn read() -> Option<u64> {
        None
    }

    pub fn write(_value: u64) {}
}
