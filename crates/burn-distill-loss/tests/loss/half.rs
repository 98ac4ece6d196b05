//! Half-precision logits (f16, bf16): the fused kernel reads them as they are and sums in f32,
//! so on the same (half) inputs it must give the f32 kernel's loss on the widened inputs bit
//! for bit, and that gradient rounded once to the student's precision. The composed path
//! widens them to f32 first. Extreme logits, all-masked batches and GJSD's sign are checked in
//! half precision.

use burn::tensor::{DType, FloatDType};

use super::*;

/// A loss of student and teacher logits.
type PairLoss = Box<dyn Fn(Tensor<2>, Tensor<2>) -> Tensor<1>>;

const HALVES: [(FloatDType, DType); 2] = [(FloatDType::F16, DType::F16), (FloatDType::BF16, DType::BF16)];

/// The devices whose fused kernel reads half-precision logits.
fn half_devices() -> Vec<&'static NamedDevice> {
    devices()
        .iter()
        .filter(|named| fused_available_for(&named.device, DType::BF16))
        .collect()
}

/// `values` rounded to `dtype` (the half-precision inputs every path below gets).
fn rounded<const D: usize>(values: &[f64], shape: &[usize], dtype: FloatDType, device: &Device) -> Tensor<D> {
    floats::<D>(values, shape, device).cast(dtype)
}

/// Loss values, the student gradient as f64, and the dtypes of both, for a student given in
/// `dtype`. The upstream gradient is 1 everywhere: the kernel's gradient is then returned
/// as it was written (a scaled one is rounded to half precision a second time).
fn run_half<const D: usize>(
    device: &Device,
    student: &[f64],
    shape: &[usize],
    dtype: FloatDType,
    loss: impl Fn(Tensor<D>) -> Tensor<1>,
) -> (Vec<f64>, Vec<f64>, DType, DType) {
    let student = rounded::<D>(student, shape, dtype, &device.clone().autodiff()).require_grad();
    let value = loss(student.clone());
    let value_dtype = value.dtype();
    let grads = value.clone().sum().backward();
    let grad = student.grad(&grads).expect("student gradient");
    let grad_dtype = grad.dtype();
    (to_vec(value), to_vec(grad.without_autodiff()), value_dtype, grad_dtype)
}

/// `value` rounded to the half precision `dtype` and back (round to nearest, ties to even).
fn round_to(value: f64, dtype: DType) -> f64 {
    match dtype {
        DType::F16 => burn::tensor::f16::from_f64(value).to_f64(),
        // From the f32 (the value is one): `bf16::from_f64` does not round to nearest.
        DType::BF16 => burn::tensor::bf16::from_f32(value as f32).to_f64(),
        _ => value,
    }
}

fn assert_bitwise(what: &str, half: &[f64], widened: &[f64], dtype: DType) {
    assert_eq!(half.len(), widened.len(), "{what}: length");
    for (i, (&h, &w)) in half.iter().zip(widened).enumerate() {
        let expected = round_to(w, dtype);
        assert!(
            h == expected || (h.is_nan() && expected.is_nan()),
            "{what}[{i}]: got {h}, the f32 path rounded to {dtype:?} gives {expected} (f32: {w})"
        );
    }
}

#[test]
fn half_logits_give_the_f32_kernels_loss_and_its_rounded_gradient() {
    let cases: [(&str, [usize; 2], f64, f64); 4] = [
        ("13x300 at T=2", [13, 300], 4.0, 2.0),
        ("odd 9x37 at T=0.25", [9, 37], 3.0, 0.25),
        ("f16-extreme 6e4 logits", [8, 50], 6e4, 1.0),
        ("2x32000 at T=4", [2, 32000], 8.0, 4.0),
    ];
    for named in half_devices() {
        for (dtype, dtype_id) in HALVES {
            for (name, shape, scale, temperature) in cases {
                let student = random_logits(&shape, scale, 71);
                let teacher = random_logits(&shape, scale, 72);
                // The inputs as the half tensors hold them, widened exactly to f32.
                let widen = |values: &[f64]| -> Vec<f64> {
                    to_vec(rounded::<2>(values, &shape, dtype, &named.device).cast(FloatDType::F32))
                };
                let (student_w, teacher_w) = (widen(&student), widen(&teacher));
                let mut losses: Vec<(String, PairLoss)> = fused::divergences()
                    .into_iter()
                    .map(|divergence| {
                        let loss = DivergenceLossConfig::new(divergence)
                            .with_temperature(temperature)
                            .with_scale_by_temperature_squared(true)
                            .with_implementation(Implementation::Fused)
                            .init();
                        let run: PairLoss =
                            Box::new(move |s, t| loss.forward_no_reduction(s, t).unwrap().reshape([-1]));
                        (format!("{divergence:?}"), run)
                    })
                    .collect();
                let labels: Vec<i64> = (0..shape[0]).map(|i| ((i * 7) % shape[1]) as i64).collect();
                let hinton = HintonKdLossConfig::new()
                    .with_alpha(0.5)
                    .with_temperature(temperature)
                    .with_label_smoothing(0.1)
                    .with_implementation(Implementation::Fused)
                    .init();
                let hinton_labels = labels.clone();
                losses.push((
                    "Hinton".into(),
                    Box::new(move |s: Tensor<2>, t| {
                        let labels = ints::<1>(&hinton_labels, &[hinton_labels.len()], &s.device());
                        hinton.forward(s, t, labels, Reduction::BatchMean).unwrap()
                    }),
                ));
                for (loss_name, loss) in &losses {
                    let what = format!("{} {dtype:?} {name} {loss_name}", named.name);
                    let (value, grad, value_dtype, grad_dtype) =
                        run_half::<2>(&named.device, &student, &shape, dtype, |s| {
                            let t = rounded::<2>(&teacher, &shape, dtype, &s.device());
                            loss(s, t)
                        });
                    assert_eq!(value_dtype, DType::F32, "{what}: the loss is f32");
                    assert_eq!(
                        grad_dtype, dtype_id,
                        "{what}: the gradient keeps the student's precision"
                    );
                    let (value_f32, grad_f32, _, _) =
                        run_half::<2>(&named.device, &student_w, &shape, FloatDType::F32, |s| {
                            let t = floats::<2>(&teacher_w, &shape, &s.device());
                            loss(s, t)
                        });
                    assert_eq!(
                        value, value_f32,
                        "{what}: loss against the f32 kernel on the widened inputs"
                    );
                    assert_bitwise(&format!("{what}: gradient"), &grad, &grad_f32, dtype_id);
                    assert!(value.iter().all(|v| v.is_finite()), "{what}: {value:?}");
                }
            }
        }
    }
}

#[test]
fn half_logits_run_fused_on_the_gpu_devices_widened_to_f32() {
    // The CubeCL kernel reads f32: half logits are widened first, and the gradient comes back
    // in their precision (rounded once by the device's cast).
    let shape = [6, 500];
    let (student, teacher) = (random_logits(&shape, 4.0, 151), random_logits(&shape, 4.0, 152));
    let gpu_devices: Vec<_> = devices()
        .iter()
        .filter(|named| fused_available(&named.device) && !fused_available_for(&named.device, DType::F16))
        .collect();
    let mut ran = Vec::new();
    for named in &gpu_devices {
        for (dtype, dtype_id) in HALVES {
            if !named.device.supports_dtype(dtype_id) {
                continue;
            }
            ran.push(format!("{} {dtype:?}", named.name));
            let what = format!("{} {dtype:?}", named.name);
            let loss = HintonKdLossConfig::new()
                .with_alpha(0.5)
                .with_temperature(2.0)
                .with_implementation(Implementation::Fused)
                .init();
            let labels: Vec<i64> = (0..shape[0] as i64).collect();
            let run = |values: &[f64], precision: FloatDType| {
                run_half::<2>(&named.device, values, &shape, precision, |s| {
                    let t = rounded::<2>(&teacher, &shape, dtype, &s.device());
                    let labels = ints::<1>(&labels, &[shape[0]], &s.device());
                    loss.forward(s, t, labels, Reduction::BatchMean).unwrap()
                })
            };
            let (value, grad, value_dtype, grad_dtype) = run(&student, dtype);
            let widened = to_vec(rounded::<2>(&student, &shape, dtype, &named.device).cast(FloatDType::F32));
            let (value_f32, grad_f32, _, _) = run(&widened, FloatDType::F32);
            assert_eq!((value_dtype, grad_dtype), (DType::F32, dtype_id), "{what}");
            assert_eq!(value, value_f32, "{what}: the f32 kernel on the widened inputs");
            // One rounding to half precision: within one unit in its last place.
            let ulp = if dtype == FloatDType::BF16 {
                2f64.powi(-8)
            } else {
                2f64.powi(-11)
            };
            for (i, (&g, &f)) in grad.iter().zip(&grad_f32).enumerate() {
                assert!(
                    (g - f).abs() <= ulp * f.abs() + 1e-7,
                    "{what}: gradient[{i}] {g} vs f32 {f}"
                );
            }
        }
    }
    // wgpu (lavapipe in CI) holds f16 tensors: the test is not empty there.
    assert!(
        gpu_devices.is_empty() || !ran.is_empty(),
        "no GPU device here holds f16 or bf16"
    );
    eprintln!("half logits fused after widening on: {ran:?}");
}

#[test]
fn half_student_with_an_f32_teacher_runs_fused() {
    // A bf16 student against an f32 teacher cache: no cast of the teacher, the gradient in bf16.
    let shape = [5, 400];
    let (student, teacher) = (random_logits(&shape, 4.0, 81), random_logits(&shape, 4.0, 82));
    for named in half_devices() {
        let loss = DivergenceLossConfig::new(Divergence::ForwardKl)
            .with_temperature(2.0)
            .with_implementation(Implementation::Fused)
            .init();
        let (value, grad, _, grad_dtype) = run_half::<2>(&named.device, &student, &shape, FloatDType::BF16, |s| {
            let t = floats::<2>(&teacher, &shape, &s.device());
            loss.forward(s, t, Reduction::BatchMean).unwrap()
        });
        let student_w = to_vec(rounded::<2>(&student, &shape, FloatDType::BF16, &named.device).cast(FloatDType::F32));
        let (value_f32, grad_f32, _, _) = run_half::<2>(&named.device, &student_w, &shape, FloatDType::F32, |s| {
            let t = floats::<2>(&teacher, &shape, &s.device());
            loss.forward(s, t, Reduction::BatchMean).unwrap()
        });
        assert_eq!(grad_dtype, DType::BF16);
        assert_eq!(value, value_f32, "{}", named.name);
        assert_bitwise(&format!("{} mixed", named.name), &grad, &grad_f32, DType::BF16);
    }
}

#[test]
fn all_masked_half_batches_give_zero_or_an_error_never_nan() {
    let shape = [2, 3, 64];
    let (student, teacher) = (random_logits(&shape, 4.0, 91), random_logits(&shape, 4.0, 92));
    let mask = [0i64; 6];
    for named in devices() {
        for (dtype, dtype_id) in HALVES {
            if !named.device.supports_dtype(dtype_id) {
                continue;
            }
            for implementation in [Implementation::Auto, Implementation::Composed] {
                let what = format!("{} {dtype:?} {implementation:?}", named.name);
                let loss = DivergenceLossConfig::new(Divergence::GeneralizedJsd { beta: 0.5 })
                    .with_implementation(implementation)
                    .init();
                let s = rounded::<3>(&student, &shape, dtype, &named.device);
                let t = rounded::<3>(&teacher, &shape, dtype, &named.device);
                let m = bools::<2>(&mask, &[2, 3], &named.device);
                let sum = loss
                    .forward_masked(s.clone(), t.clone(), m.clone(), Reduction::Sum)
                    .unwrap();
                assert_eq!(scalar(sum), 0.0, "{what}: sum over no position");
                let mean = loss.forward_masked(s, t, m, Reduction::BatchMean);
                assert!(
                    matches!(mean, Err(LossError::NoValidPositions)),
                    "{what}: a mean over no position is an error, got {mean:?}"
                );
            }
        }
    }
}

#[test]
fn generalized_jsd_stays_non_negative_in_half_precision() {
    // Student and teacher one half-precision step apart (and equal in some rows): the
    // divergence is tiny, where a half-precision softmax and mixture come out negative.
    let shape = [6, 2000];
    let teacher = random_logits(&shape, 3.0, 101);
    for named in devices() {
        for (dtype, dtype_id) in HALVES {
            if !named.device.supports_dtype(dtype_id) {
                continue;
            }
            let step = if dtype == FloatDType::BF16 { 2e-2 } else { 2e-3 };
            let student: Vec<f64> = teacher
                .iter()
                .enumerate()
                .map(|(i, &t)| {
                    if i / shape[1] % 2 == 0 {
                        t
                    } else {
                        t + step * ((i % 5) as f64 - 2.0)
                    }
                })
                .collect();
            for implementation in [Implementation::Auto, Implementation::Composed] {
                for beta in [0.5, 0.1, 0.9] {
                    let loss = DivergenceLossConfig::new(Divergence::GeneralizedJsd { beta })
                        .with_temperature(1.0)
                        .with_implementation(implementation)
                        .init();
                    let s = rounded::<2>(&student, &shape, dtype, &named.device);
                    let t = rounded::<2>(&teacher, &shape, dtype, &named.device);
                    let rows = to_vec(loss.forward_no_reduction(s, t).unwrap());
                    let what = format!("{} {dtype:?} {implementation:?} β={beta}", named.name);
                    for (row, &value) in rows.iter().enumerate() {
                        assert!(value >= 0.0 && value.is_finite(), "{what}: row {row} = {value}");
                        if row % 2 == 0 {
                            assert!(value < 1e-7, "{what}: equal rows give {value}");
                        } else {
                            assert!(value > 0.0, "{what}: different rows give 0");
                        }
                    }
                }
            }
        }
    }
}

#[test]
fn composed_path_widens_half_logits_to_f32() {
    // The composed path on half inputs equals the composed path on the widened f32 inputs,
    // and the gradient comes back in the student's precision.
    let shape = [7, 120];
    let (student, teacher) = (random_logits(&shape, 5.0, 111), random_logits(&shape, 5.0, 112));
    for named in devices() {
        for (dtype, dtype_id) in HALVES {
            if !named.device.supports_dtype(dtype_id) {
                continue;
            }
            let loss = DivergenceLossConfig::new(Divergence::TotalVariation)
                .with_implementation(Implementation::Composed)
                .init();
            let (value, _, value_dtype, grad_dtype) = run_half::<2>(&named.device, &student, &shape, dtype, |s| {
                let t = rounded::<2>(&teacher, &shape, dtype, &s.device());
                loss.forward(s, t, Reduction::BatchMean).unwrap()
            });
            let widen =
                |values: &[f64]| to_vec(rounded::<2>(values, &shape, dtype, &named.device).cast(FloatDType::F32));
            let (student_w, teacher_w) = (widen(&student), widen(&teacher));
            let (value_f32, _, _, _) = run_half::<2>(&named.device, &student_w, &shape, FloatDType::F32, |s| {
                let t = floats::<2>(&teacher_w, &shape, &s.device());
                loss.forward(s, t, Reduction::BatchMean).unwrap()
            });
            let what = format!("{} {dtype:?}", named.name);
            assert_eq!(value_dtype, DType::F32, "{what}");
            assert_eq!(grad_dtype, dtype_id, "{what}");
            assert_close(&what, &value, &value_f32, 1e-6, 1e-9);
        }
    }
}

/// `(loss, ∂loss/∂w)` for student logits `x · w` (`x` untracked): a model's output, held by
/// nothing but the loss unless `keep_logits` keeps a second handle on it.
fn head_grad(
    device: &Device,
    [rows, width, classes]: [usize; 3],
    dtype: FloatDType,
    keep_logits: bool,
    loss: &dyn Fn(Tensor<2>, Tensor<2>) -> Tensor<1>,
) -> (Vec<f64>, Vec<f64>) {
    let device = device.clone().autodiff();
    let x = rounded::<2>(&random_logits(&[rows, width], 1.0, 121), &[rows, width], dtype, &device);
    let w = rounded::<2>(
        &random_logits(&[width, classes], 1.0, 122),
        &[width, classes],
        dtype,
        &device,
    )
    .require_grad();
    let teacher = rounded::<2>(
        &random_logits(&[rows, classes], 4.0, 123),
        &[rows, classes],
        dtype,
        &device,
    );
    let logits = x.matmul(w.clone());
    let kept = keep_logits.then(|| logits.clone());
    let value = loss(logits, teacher);
    let grads = value.clone().sum().backward();
    drop(kept);
    (
        to_vec(value),
        to_vec(w.grad(&grads).expect("gradient").cast(FloatDType::F32)),
    )
}

#[test]
fn gradient_written_over_the_student_logits_equals_the_new_buffer_one() {
    let dims = [24, 16, 700];
    let labels: Vec<i64> = (0..dims[0]).map(|i| ((i * 13) % dims[2]) as i64).collect();
    let hinton = HintonKdLossConfig::new().with_alpha(0.3).with_temperature(2.0).init();
    let losses: Vec<(&str, PairLoss)> = vec![
        (
            "forward KL",
            Box::new(|s, t| {
                DivergenceLossConfig::new(Divergence::ForwardKl)
                    .init()
                    .forward(s, t, Reduction::BatchMean)
                    .unwrap()
            }),
        ),
        (
            "GJSD per row",
            Box::new(|s, t| {
                DivergenceLossConfig::new(Divergence::GeneralizedJsd { beta: 0.3 })
                    .init()
                    .forward_no_reduction(s, t)
                    .unwrap()
                    .reshape([-1])
            }),
        ),
        (
            "Hinton",
            Box::new(move |s: Tensor<2>, t| {
                let labels = ints::<1>(&labels, &[labels.len()], &s.device());
                hinton.forward(s, t, labels, Reduction::ElementMean).unwrap()
            }),
        ),
    ];
    for named in half_devices() {
        for dtype in [FloatDType::F32, FloatDType::F16, FloatDType::BF16] {
            for (name, loss) in &losses {
                let what = format!("{} {dtype:?} {name}", named.name);
                let before = fused_grad_stores();
                let in_place = head_grad(&named.device, dims, dtype, false, loss.as_ref());
                let after = fused_grad_stores();
                assert!(
                    after.in_place > before.in_place,
                    "{what}: the gradient was not written in place"
                );
                let new_buffer = head_grad(&named.device, dims, dtype, true, loss.as_ref());
                assert!(
                    fused_grad_stores().new_buffer > after.new_buffer,
                    "{what}: a kept handle must not be written over"
                );
                assert_eq!(in_place.0, new_buffer.0, "{what}: loss");
                assert_eq!(in_place.1, new_buffer.1, "{what}: ∂/∂w");
            }
        }
    }
}

#[test]
fn bad_logits_are_named_without_keeping_the_inputs() {
    // With the inputs' own handles gone (the gradient may be written over the student), the
    // kernel's report still names the tensor and the problem, in the composed checks' order.
    let shape = [3, 50];
    let cases: [(&str, usize, f64, bool, &str); 5] = [
        ("student NaN", 7, f64::NAN, true, "student logits contains NaN values"),
        (
            "student +inf",
            60,
            f64::INFINITY,
            true,
            "student logits contains +inf values",
        ),
        ("teacher NaN", 3, f64::NAN, false, "teacher logits contains NaN values"),
        (
            "teacher +inf",
            149,
            f64::INFINITY,
            false,
            "teacher logits contains +inf values",
        ),
        (
            "teacher row of -inf",
            0,
            f64::NEG_INFINITY,
            false,
            "teacher logits has a row whose logits are all -inf",
        ),
    ];
    for named in half_devices() {
        for (dtype, _) in [(FloatDType::F32, ()), (FloatDType::BF16, ())] {
            for (name, index, value, on_student, message) in cases {
                let (mut student, mut teacher) = (random_logits(&shape, 2.0, 131), random_logits(&shape, 2.0, 132));
                let target = if on_student { &mut student } else { &mut teacher };
                if value == f64::NEG_INFINITY {
                    target[50..100].fill(value);
                } else {
                    target[index] = value;
                }
                let device = named.device.clone().autodiff();
                let s = rounded::<2>(&student, &shape, dtype, &device).require_grad();
                let t = rounded::<2>(&teacher, &shape, dtype, &device);
                let error = DivergenceLossConfig::new(Divergence::ReverseKl)
                    .init()
                    .forward(s, t, Reduction::Sum)
                    .expect_err(name);
                assert_eq!(error.to_string(), message, "{} {dtype:?} {name}", named.name);
            }
        }
    }
}

#[test]
fn linear_head_takes_half_precision_hidden_states_and_weights() {
    // The chunked head in bf16 / f16: each chunk's logits come out of a half-precision matmul
    // and go to the kernel as they are; the gradients of hidden states and weight come back
    // in their precision. Against the head in f32 on the same (rounded) inputs, the loss and
    // gradients differ only by the rounding of the chunk logits and gradients.
    let (positions, width, classes) = (40, 16, 300);
    let hidden = random_logits(&[positions, width], 1.0, 141);
    let weight = random_logits(&[classes, width], 0.5, 142);
    let teacher = random_logits(&[positions, classes], 3.0, 143);
    let config = LinearHeadKdConfig::new().with_temperature(2.0).with_chunk_rows(16);
    for named in half_devices() {
        for (dtype, dtype_id) in HALVES {
            let device = named.device.clone().autodiff();
            let run = |precision: FloatDType| {
                let widen = |values: &[f64], shape: &[usize]| {
                    rounded::<2>(values, shape, dtype, &device)
                        .cast(precision)
                        .require_grad()
                };
                let (h, w) = (widen(&hidden, &[positions, width]), widen(&weight, &[classes, width]));
                let t = floats::<2>(&teacher, &[positions, classes], &device);
                let loss = config
                    .init()
                    .forward(h.clone(), w.clone(), HeadTeacher::Logits(t), None, Reduction::BatchMean)
                    .unwrap();
                let grads = loss.clone().backward();
                let (gh, gw) = (h.grad(&grads).unwrap(), w.grad(&grads).unwrap());
                let dtypes = (loss.dtype(), gh.dtype(), gw.dtype());
                (
                    to_vec(loss),
                    to_vec(gh.cast(FloatDType::F32)),
                    to_vec(gw.cast(FloatDType::F32)),
                    dtypes,
                )
            };
            let what = format!("{} {dtype:?}", named.name);
            let half = run(dtype);
            let full = run(FloatDType::F32);
            assert_eq!(
                half.3,
                (DType::F32, dtype_id, dtype_id),
                "{what}: dtypes of loss and gradients"
            );
            assert_close(&format!("{what}: loss"), &half.0, &full.0, 2e-2, 0.0);
            assert_close(&format!("{what}: ∂/∂hidden"), &half.1, &full.1, 5e-2, 0.0);
            assert_close(&format!("{what}: ∂/∂weight"), &half.2, &full.2, 5e-2, 0.0);
        }
    }
}
