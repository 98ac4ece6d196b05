//! The fused kernel against the composed tensor-op path: values and gradients, every loss it
//! serves, rank 2 and masked rank 3, extreme logits, errors, and the chunked linear head.
//! (The PyTorch fixtures above already run through the fused kernel on ndarray and flex,
//! since `Implementation::Auto` picks it there.)

use super::*;

const RTOL: f64 = 1e-5;

/// The devices with a fused kernel (the others run the composed path under `Auto`).
fn fused_devices() -> Vec<&'static NamedDevice> {
    devices()
        .iter()
        .filter(|named| fused_available(&named.device))
        .collect()
}

/// The loss value(s) and the gradient w.r.t. the student logits of `loss(student)`.
fn value_and_grad<const D: usize>(
    device: &Device,
    student: &[f64],
    shape: &[usize],
    loss: impl Fn(Tensor<D>) -> Tensor<1>,
) -> (Vec<f64>, Vec<f64>) {
    let student = floats::<D>(student, shape, &device.clone().autodiff()).require_grad();
    let value = loss(student.clone());
    // A weighted sum, so per-position outputs get a gradient that is not all ones.
    let positions = value.dims()[0];
    let weights: Vec<f64> = (0..positions).map(|i| 1.0 + (i % 3) as f64 * 0.5).collect();
    let weighted = (value.clone() * floats::<1>(&weights, &[positions], &value.device())).sum();
    let grads = weighted.backward();
    let grad = student.grad(&grads).expect("student gradient");
    (to_vec(value), to_vec(grad.without_autodiff()))
}

fn assert_same(what: &str, fused: &(Vec<f64>, Vec<f64>), composed: &(Vec<f64>, Vec<f64>)) {
    assert_same_within(what, fused, composed, RTOL, 1e-8);
}

/// Values and gradients within `rtol` of the largest; gradients also within `grad_atol`.
fn assert_same_within(
    what: &str,
    fused: &(Vec<f64>, Vec<f64>),
    composed: &(Vec<f64>, Vec<f64>),
    rtol: f64,
    grad_atol: f64,
) {
    assert_close(&format!("{what}: value"), &fused.0, &composed.0, rtol, 1e-7);
    assert_close(&format!("{what}: gradient"), &fused.1, &composed.1, rtol, grad_atol);
}

pub(super) fn divergences() -> Vec<Divergence> {
    let mut all = Divergence::ALL.to_vec();
    all.extend([
        Divergence::GeneralizedJsd { beta: 1e-3 },
        Divergence::GeneralizedJsd { beta: 0.0 },
        Divergence::GeneralizedJsd { beta: 1.0 },
        Divergence::SkewKl { alpha: 0.9 },
        Divergence::SkewReverseKl { alpha: 0.5 },
    ]);
    all
}

/// Teacher and student logits where the same classes are `-inf` on both sides (a padded
/// vocabulary) and, when `teacher_only`, more classes are `-inf` in the teacher alone.
fn with_neg_inf(
    mut student: Vec<f64>,
    mut teacher: Vec<f64>,
    classes: usize,
    teacher_only: bool,
) -> (Vec<f64>, Vec<f64>) {
    for (index, (s, t)) in student.iter_mut().zip(teacher.iter_mut()).enumerate() {
        let class = index % classes;
        if class % 7 == 3 {
            *s = f64::NEG_INFINITY;
            *t = f64::NEG_INFINITY;
        } else if teacher_only && class % 5 == 1 {
            *t = f64::NEG_INFINITY;
        }
    }
    (student, teacher)
}

#[test]
fn fused_divergences_equal_composed_on_rank_2() {
    let cases: [(&str, [usize; 2], f64, f64); 5] = [
        ("256x10", [256, 10], 4.0, 2.0),
        ("256x1000", [256, 1000], 4.0, 1.0),
        ("odd 9x37 at T=0.25", [9, 37], 3.0, 0.25),
        ("extreme 1e4 logits", [16, 50], 1e4, 1.0),
        ("extreme at T=100", [16, 50], 1e3, 100.0),
    ];
    for named in fused_devices() {
        for (name, shape, scale, temperature) in cases {
            let student = random_logits(&shape, scale, 11);
            let teacher = random_logits(&shape, scale, 12);
            for divergence in divergences() {
                for reduction in [Reduction::BatchMean, Reduction::Sum] {
                    let run = |implementation| {
                        let loss = DivergenceLossConfig::new(divergence)
                            .with_temperature(temperature)
                            .with_scale_by_temperature_squared(true)
                            .with_implementation(implementation)
                            .init();
                        value_and_grad::<2>(&named.device, &student, &shape, |s| {
                            let t = floats::<2>(&teacher, &shape, &s.device());
                            loss.forward(s, t, reduction).unwrap()
                        })
                    };
                    let what = format!("{} {name} {divergence:?} {reduction:?}", named.name);
                    // One-hot rows at logits of 1e4: the gradient is 0 up to the composed
                    // path's rounding noise (3e-8, 1e-7 for GJSD at β = 1e-3, which divides by β).
                    let grad_atol = if scale >= 1e3 { 1e-6 } else { 1e-8 };
                    assert_same_within(
                        &what,
                        &run(Implementation::Fused),
                        &run(Implementation::Composed),
                        RTOL,
                        grad_atol,
                    );
                }
            }
        }
    }
}

#[test]
fn fused_divergences_equal_composed_on_masked_rank_3_and_per_position() {
    let shape = [3, 6, 40];
    let mask = [1, 1, 1, 1, 0, 0, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0];
    let student = random_logits(&shape, 5.0, 21);
    let teacher = random_logits(&shape, 5.0, 22);
    let finite = (student.clone(), teacher.clone());
    let padded = with_neg_inf(student.clone(), teacher.clone(), 40, false);
    let teacher_zeros = with_neg_inf(student, teacher, 40, true);
    for named in fused_devices() {
        for divergence in divergences() {
            let infinite_reverse = matches!(divergence, Divergence::ReverseKl | Divergence::SymmetricKl)
                || divergence == (Divergence::GeneralizedJsd { beta: 1.0 });
            let mut inputs = vec![("finite", &finite), ("padded vocabulary", &padded)];
            if !infinite_reverse {
                inputs.push(("teacher zeros", &teacher_zeros));
            }
            for (input, (student, teacher)) in inputs {
                let loss = |implementation| {
                    DivergenceLossConfig::new(divergence)
                        .with_temperature(1.5)
                        .with_implementation(implementation)
                        .init()
                };
                let masked = |implementation| {
                    let loss = loss(implementation);
                    value_and_grad::<3>(&named.device, student, &shape, |s| {
                        let t = floats::<3>(teacher, &shape, &s.device());
                        let m = bools::<2>(&mask, &[3, 6], &s.device());
                        loss.forward_masked(s, t, m, Reduction::BatchMean).unwrap()
                    })
                };
                let per_position = |implementation| {
                    let loss = loss(implementation);
                    value_and_grad::<3>(&named.device, student, &shape, |s| {
                        let t = floats::<3>(teacher, &shape, &s.device());
                        loss.forward_no_reduction(s, t).unwrap().reshape([18])
                    })
                };
                let what = format!("{} {divergence:?} {input}", named.name);
                assert_same(
                    &format!("{what} masked"),
                    &masked(Implementation::Fused),
                    &masked(Implementation::Composed),
                );
                assert_same(
                    &format!("{what} per position"),
                    &per_position(Implementation::Fused),
                    &per_position(Implementation::Composed),
                );
            }
        }
    }
}

/// `log_softmax(row / T)` in f64.
fn log_softmax_f64(row: &[f64], temperature: f64) -> Vec<f64> {
    let max = row.iter().fold(f64::NEG_INFINITY, |m, &v| m.max(v / temperature));
    let log_sum = row.iter().map(|&v| (v / temperature - max).exp()).sum::<f64>().ln();
    row.iter().map(|&v| v / temperature - max - log_sum).collect()
}

/// Hinton KD per position in f64 (0 where the label is ignored), T² on.
fn hinton_reference(
    student: &[f64],
    teacher: &[f64],
    labels: &[i64],
    classes: usize,
    alpha: f64,
    temperature: f64,
    smoothing: f64,
) -> Vec<f64> {
    student
        .chunks(classes)
        .zip(teacher.chunks(classes))
        .zip(labels)
        .map(|((s, t), &label)| {
            if label < 0 {
                return 0.0;
            }
            let (q, p, q1) = (
                log_softmax_f64(s, temperature),
                log_softmax_f64(t, temperature),
                log_softmax_f64(s, 1.0),
            );
            let kl: f64 = p.iter().zip(&q).map(|(lp, lq)| lp.exp() * (lp - lq)).sum();
            let uniform: f64 = q1.iter().sum::<f64>() / classes as f64;
            let cross_entropy = -(1.0 - smoothing) * q1[label as usize] - smoothing * uniform;
            alpha * cross_entropy + (1.0 - alpha) * temperature * temperature * kl
        })
        .collect()
}

#[test]
fn fused_hinton_equals_composed_with_labels_ignore_and_smoothing() {
    let shape = [4, 5, 30];
    let student = random_logits(&shape, 6.0, 31);
    let teacher = random_logits(&shape, 6.0, 32);
    let labels: Vec<i64> = (0..20).map(|i| if i % 6 == 5 { -100 } else { (i * 7) % 30 }).collect();
    for named in fused_devices() {
        for (alpha, temperature, smoothing) in [(0.5, 4.0, 0.0), (0.1, 20.0, 0.1), (1.0, 1.0, 0.0), (0.0, 2.0, 0.0)] {
            for reduction in [
                Reduction::BatchMean,
                Reduction::Sum,
                Reduction::ElementMean,
                Reduction::SumOver(50),
            ] {
                let run = |implementation| {
                    let loss = HintonKdLossConfig::new()
                        .with_alpha(alpha)
                        .with_temperature(temperature)
                        .with_label_smoothing(smoothing)
                        .with_implementation(implementation)
                        .init();
                    value_and_grad::<3>(&named.device, &student, &shape, |s| {
                        let t = floats::<3>(&teacher, &shape, &s.device());
                        let y = ints::<2>(&labels, &[4, 5], &s.device());
                        loss.forward(s, t, y, reduction).unwrap()
                    })
                };
                let what = format!(
                    "{} hinton α={alpha} T={temperature} ε={smoothing} {reduction:?}",
                    named.name
                );
                assert_same(&what, &run(Implementation::Fused), &run(Implementation::Composed));
            }
            let per_position = |implementation| {
                let loss = HintonKdLossConfig::new()
                    .with_alpha(alpha)
                    .with_temperature(temperature)
                    .with_label_smoothing(smoothing)
                    .with_implementation(implementation)
                    .init();
                value_and_grad::<3>(&named.device, &student, &shape, |s| {
                    let t = floats::<3>(&teacher, &shape, &s.device());
                    let y = ints::<2>(&labels, &[4, 5], &s.device());
                    loss.forward_no_reduction(s, t, y).unwrap().reshape([20])
                })
            };
            let fused = per_position(Implementation::Fused);
            let reference = hinton_reference(&student, &teacher, &labels, 30, alpha, temperature, smoothing);
            assert_close(
                &format!("{} hinton α={alpha} per position vs f64", named.name),
                &fused.0,
                &reference,
                RTOL,
                1e-7,
            );
            // At T = 20 with T² the soft term is a small KL times 400: the composed f32 path is
            // itself 1.3e-5 (relative) away from the f64 reference there, the fused one within 1e-5.
            let rtol = if temperature >= 20.0 { 3e-5 } else { RTOL };
            let composed = per_position(Implementation::Composed);
            assert_same_within(
                &format!("{} hinton α={alpha} per position", named.name),
                &fused,
                &composed,
                rtol,
                1e-8,
            );
        }
    }
}

/// The GPU kernel against the host kernel (which sums in f64): a row far wider than a cube
/// (each unit strides over 125 classes), more rows than one launch axis holds (65 535), and
/// rows of only `-inf` but one class.
#[test]
fn fused_kernels_agree_across_devices() {
    let fused = fused_devices();
    let Some(host) = fused.iter().find(|named| matches!(named.name, "ndarray" | "flex")) else {
        return; // no host kernel compiled in: nothing to compare the others with
    };
    let cases: [(&str, [usize; 2], f64); 3] = [
        ("8x32000", [8, 32000], 4.0),
        ("70000x3 (two launch axes)", [70000, 3], 2.0),
        ("5x64 one finite class", [5, 64], 3.0),
    ];
    for (name, shape, scale) in cases {
        let mut student = random_logits(&shape, scale, 81);
        let mut teacher = random_logits(&shape, scale, 82);
        let one_finite = name.contains("one finite");
        if one_finite {
            for (index, (s, t)) in student.iter_mut().zip(teacher.iter_mut()).enumerate() {
                if index % shape[1] != 7 {
                    *s = f64::NEG_INFINITY;
                    *t = f64::NEG_INFINITY;
                }
            }
        }
        // There, the label is the finite class and no smoothing (else the loss is +inf).
        let labels: Vec<i64> = (0..shape[0] as i64)
            .map(|i| if one_finite { 7 } else { (i * 13) % shape[1] as i64 })
            .collect();
        let smoothing = if one_finite { 0.0 } else { 0.1 };
        let cases: [(&str, Option<Divergence>); 4] = [
            ("forward KL", Some(Divergence::ForwardKl)),
            ("GJSD", Some(Divergence::GeneralizedJsd { beta: 0.5 })),
            ("TVD", Some(Divergence::TotalVariation)),
            ("Hinton", None),
        ];
        for (loss_name, divergence) in cases {
            let run = |device: &Device| {
                value_and_grad::<2>(device, &student, &shape, |s| {
                    let t = floats::<2>(&teacher, &shape, &s.device());
                    match divergence {
                        Some(divergence) => DivergenceLossConfig::new(divergence)
                            .with_temperature(2.0)
                            .with_implementation(Implementation::Fused)
                            .init()
                            .forward_no_reduction(s, t)
                            .unwrap()
                            .reshape([shape[0]]),
                        None => {
                            let y = ints::<1>(&labels, &[shape[0]], &s.device());
                            HintonKdLossConfig::new()
                                .with_alpha(0.3)
                                .with_temperature(4.0)
                                .with_label_smoothing(smoothing)
                                .with_implementation(Implementation::Fused)
                                .init()
                                .forward_no_reduction(s, t, y)
                                .unwrap()
                                .reshape([shape[0]])
                        }
                    }
                })
            };
            let expected = run(&host.device);
            for named in fused.iter().filter(|named| named.name != host.name) {
                let what = format!("{} vs {} {loss_name} {name}", named.name, host.name);
                let got = run(&named.device);
                // The one-class rows: loss and gradient 0, up to the host kernel's rounding
                // noise in the log-sum (2e-7).
                let atol = if one_finite { 1e-6 } else { 1e-7 };
                assert_close(&format!("{what}: value"), &got.0, &expected.0, RTOL, atol);
                assert_close(&format!("{what}: gradient"), &got.1, &expected.1, RTOL, 1e-8);
            }
        }
    }
}

#[test]
fn fused_gradient_is_scaled_by_the_upstream_gradient() {
    let shape = [8, 12];
    let student = random_logits(&shape, 3.0, 41);
    let teacher = random_logits(&shape, 3.0, 42);
    for named in fused_devices() {
        let loss = DivergenceLossConfig::new(Divergence::ForwardKl)
            .with_temperature(2.0)
            .init();
        let grad_times = |factor: f64| {
            let s = floats::<2>(&student, &shape, &named.device.clone().autodiff()).require_grad();
            let t = floats::<2>(&teacher, &shape, &s.device());
            let value = loss.forward(s.clone(), t, Reduction::BatchMean).unwrap();
            to_vec(s.grad(&value.mul_scalar(factor).backward()).unwrap().without_autodiff())
        };
        let once = grad_times(1.0);
        let scaled: Vec<f64> = grad_times(-3.0).iter().map(|g| g / -3.0).collect();
        assert_close("gradient of -3 · loss, divided by -3", &scaled, &once, 1e-6, 1e-9);
        // (q − p) / (T · N) sums to zero in each row.
        for row in once.chunks(12) {
            assert!(
                row.iter().sum::<f64>().abs() < 1e-7,
                "row gradient sums to {}",
                row.iter().sum::<f64>()
            );
        }
    }
}

#[test]
fn fused_path_rejects_bad_values_by_name() {
    let shape = [4, 6];
    for named in fused_devices() {
        let loss = DivergenceLossConfig::new(Divergence::ForwardKl)
            .with_implementation(Implementation::Fused)
            .init();
        let good = random_logits(&shape, 2.0, 51);
        let cases: [(&str, usize, f64, LossError); 4] = [
            (
                "student NaN",
                0,
                f64::NAN,
                LossError::NonFinite {
                    tensor: "student logits",
                    kind: "NaN",
                },
            ),
            (
                "teacher NaN",
                1,
                f64::NAN,
                LossError::NonFinite {
                    tensor: "teacher logits",
                    kind: "NaN",
                },
            ),
            (
                "student +inf",
                0,
                f64::INFINITY,
                LossError::NonFinite {
                    tensor: "student logits",
                    kind: "+inf",
                },
            ),
            (
                "teacher +inf",
                1,
                f64::INFINITY,
                LossError::NonFinite {
                    tensor: "teacher logits",
                    kind: "+inf",
                },
            ),
        ];
        for (what, side, bad, expected) in cases {
            let mut values = [good.clone(), good.clone()];
            values[side][13] = bad;
            let s = floats::<2>(&values[0], &shape, &named.device);
            let t = floats::<2>(&values[1], &shape, &named.device);
            assert_eq!(
                loss.forward(s, t, Reduction::BatchMean).unwrap_err(),
                expected,
                "{what}"
            );
        }
        let mut empty = good.clone();
        empty[6..12].fill(f64::NEG_INFINITY);
        let s = floats::<2>(&good, &shape, &named.device);
        let t = floats::<2>(&empty, &shape, &named.device);
        assert_eq!(
            loss.forward(s, t, Reduction::BatchMean).unwrap_err(),
            LossError::EmptyDistribution {
                tensor: "teacher logits"
            }
        );
        let s = floats::<2>(&good, &shape, &named.device);
        let t = floats::<2>(&good, &shape, &named.device);
        let mask = bools::<1>(&[0, 0, 0, 0], &[4], &named.device);
        assert_eq!(
            loss.forward_masked(s, t, mask, Reduction::BatchMean).unwrap_err(),
            LossError::NoValidPositions
        );
        let hinton = HintonKdLossConfig::new()
            .with_implementation(Implementation::Fused)
            .init();
        let s = floats::<2>(&good, &shape, &named.device);
        let t = floats::<2>(&good, &shape, &named.device);
        let labels = ints::<1>(&[0, 6, 1, 2], &[4], &named.device);
        assert_eq!(
            hinton.forward(s, t, labels, Reduction::BatchMean).unwrap_err(),
            LossError::IndexOutOfRange {
                tensor: "labels",
                index: 6,
                classes: 6
            }
        );
    }
}

#[test]
fn forcing_the_fused_kernel_elsewhere_is_an_error_and_auto_falls_back() {
    for named in devices() {
        let student = floats::<2>(&random_logits(&[2, 3], 1.0, 61), &[2, 3], &named.device);
        let forced = DivergenceLossConfig::new(Divergence::ForwardKl)
            .with_implementation(Implementation::Fused)
            .init()
            .forward(student.clone(), student.clone(), Reduction::Sum);
        let auto = DivergenceLossConfig::new(Divergence::ForwardKl)
            .init()
            .forward(student.clone(), student, Reduction::Sum)
            .unwrap();
        assert!(scalar(auto).abs() < 1e-6);
        if fused_available(&named.device) {
            assert!(forced.is_ok(), "{}", named.name);
        } else {
            assert!(
                matches!(forced, Err(LossError::FusedUnavailable { .. })),
                "{}: {forced:?}",
                named.name
            );
        }
    }
    #[cfg(feature = "ndarray")]
    {
        #[allow(deprecated)]
        let device = Device::ndarray();
        let f64_logits = Tensor::<2>::zeros([2, 3], &device).cast(burn::tensor::DType::F64);
        let forced = DivergenceLossConfig::new(Divergence::ForwardKl)
            .with_implementation(Implementation::Fused)
            .init()
            .forward(f64_logits.clone(), f64_logits, Reduction::Sum);
        assert!(
            matches!(forced, Err(LossError::FusedUnavailable { .. })),
            "f64: {forced:?}"
        );
    }
}

/// `(loss, ∂/∂hidden, ∂/∂weight)` of the linear-head loss, with the teacher `teacher` makes on
/// the autodiff device.
fn head_loss_and_grads(
    device: &Device,
    config: &LinearHeadKdConfig,
    data: &HeadData,
    teacher: impl FnOnce(&Device) -> HeadTeacher,
) -> [Vec<f64>; 3] {
    let device = device.clone().autodiff();
    let hidden = floats::<2>(&data.hidden, &[data.positions, data.width], &device).require_grad();
    let weight = floats::<2>(&data.weight, &[data.classes, data.width], &device).require_grad();
    let teacher = teacher(&device);
    let labels = ints::<1>(&data.labels, &[data.positions], &device);
    let loss = config
        .init()
        .forward(
            hidden.clone(),
            weight.clone(),
            teacher,
            Some(labels),
            Reduction::BatchMean,
        )
        .unwrap();
    let grads = loss.clone().mul_scalar(0.5).backward();
    [
        to_vec(loss),
        to_vec(hidden.grad(&grads).unwrap().without_autodiff()),
        to_vec(weight.grad(&grads).unwrap().without_autodiff()),
    ]
}

/// The linear-head loss with the teacher's head (`teacher_head`) or its logits.
fn head_run(device: &Device, config: &LinearHeadKdConfig, data: &HeadData, teacher_head: bool) -> [Vec<f64>; 3] {
    head_loss_and_grads(device, config, data, |device| {
        if teacher_head {
            HeadTeacher::Head {
                hidden: floats::<2>(&data.teacher_hidden, &[data.positions, 5], device),
                weight: floats::<2>(&data.teacher_weight, &[data.classes, 5], device),
            }
        } else {
            HeadTeacher::Logits(floats::<2>(
                &data.teacher_logits(),
                &[data.positions, data.classes],
                device,
            ))
        }
    })
}

struct HeadData {
    positions: usize,
    width: usize,
    classes: usize,
    hidden: Vec<f64>,
    weight: Vec<f64>,
    teacher_hidden: Vec<f64>,
    teacher_weight: Vec<f64>,
    labels: Vec<i64>,
}

#[test]
fn chunked_linear_head_equals_matmul_and_composed_loss() {
    let (positions, width, classes) = (23, 8, 41);
    let data = HeadData {
        positions,
        width,
        classes,
        hidden: random_logits(&[positions, width], 1.0, 71),
        weight: random_logits(&[classes, width], 1.0, 72),
        teacher_hidden: random_logits(&[positions, 5], 1.5, 73),
        teacher_weight: random_logits(&[classes, 5], 1.5, 74),
        labels: (0..positions as i64)
            .map(|i| if i % 5 == 4 { -100 } else { (i * 3) % classes as i64 })
            .collect(),
    };
    for named in fused_devices() {
        for (divergence, alpha) in [
            (Divergence::ForwardKl, 0.0),
            (Divergence::ForwardKl, 0.3),
            (Divergence::ReverseKl, 0.0),
            (Divergence::TotalVariation, 0.2),
        ] {
            let base = LinearHeadKdConfig::new()
                .with_divergence(divergence)
                .with_alpha(alpha)
                .with_temperature(2.0)
                .with_scale_by_temperature_squared(true);
            let reference = head_run(
                &named.device,
                &base.clone().with_implementation(Implementation::Composed),
                &data,
                true,
            );
            for chunk_rows in [1, 7, 23, 64] {
                for teacher_head in [true, false] {
                    let config = base
                        .clone()
                        .with_chunk_rows(chunk_rows)
                        .with_implementation(Implementation::Fused);
                    let fused = head_run(&named.device, &config, &data, teacher_head);
                    let what = format!(
                        "{} head {divergence:?} α={alpha} chunk={chunk_rows} teacher head={teacher_head}",
                        named.name
                    );
                    for (part, (got, expected)) in ["loss", "d hidden", "d weight"]
                        .iter()
                        .zip(fused.iter().zip(&reference))
                    {
                        assert_close(&format!("{what}: {part}"), got, expected, 1e-5, 1e-8);
                    }
                }
            }
        }
    }
}

/// The linear-head loss with a top-k (`k > 0`) or label (`k = 0`) teacher.
fn sparse_head_run(
    device: &Device,
    config: &LinearHeadKdConfig,
    data: &HeadData,
    k: usize,
    tail: TailPolicy,
) -> [Vec<f64>; 3] {
    head_loss_and_grads(device, config, data, |device| {
        if k == 0 {
            return HeadTeacher::Labels;
        }
        let (indices, log_probs) = top_k_of(&data.teacher_logits(), data.classes, k);
        HeadTeacher::TopK {
            indices: ints::<2>(&indices, &[data.positions, k], device),
            log_probs: floats::<2>(&log_probs, &[data.positions, k], device),
            tail,
        }
    })
}

impl HeadData {
    /// The teacher head's logits, `[positions, classes]`.
    fn teacher_logits(&self) -> Vec<f64> {
        (0..self.positions * self.classes)
            .map(|index| {
                let (row, class) = (index / self.classes, index % self.classes);
                (0..5)
                    .map(|k| self.teacher_hidden[row * 5 + k] * self.teacher_weight[class * 5 + k])
                    .sum()
            })
            .collect()
    }

    /// The student's logits, `[positions, classes]`, in f64.
    fn student_logits(&self) -> Vec<f64> {
        (0..self.positions * self.classes)
            .map(|index| {
                let (row, class) = (index / self.classes, index % self.classes);
                (0..self.width)
                    .map(|k| self.hidden[row * self.width + k] * self.weight[class * self.width + k])
                    .sum()
            })
            .collect()
    }
}

/// Per row, the `k` largest log-probabilities of `logits` and their classes (largest first).
fn top_k_of(logits: &[f64], classes: usize, k: usize) -> (Vec<i64>, Vec<f64>) {
    let (mut indices, mut values) = (Vec::new(), Vec::new());
    for row in logits.chunks(classes) {
        let max = row.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let lse = max + row.iter().map(|v| (v - max).exp()).sum::<f64>().ln();
        let mut order: Vec<usize> = (0..classes).collect();
        order.sort_by(|&a, &b| row[b].total_cmp(&row[a]));
        for &class in &order[..k] {
            indices.push(class as i64);
            values.push(row[class] - lse);
        }
    }
    (indices, values)
}

#[test]
fn chunked_linear_head_takes_top_k_and_label_teachers_without_the_dense_teacher() {
    let (positions, width, classes) = (23, 8, 41);
    let data = HeadData {
        positions,
        width,
        classes,
        hidden: random_logits(&[positions, width], 1.0, 81),
        weight: random_logits(&[classes, width], 1.0, 82),
        teacher_hidden: random_logits(&[positions, 5], 1.5, 83),
        teacher_weight: random_logits(&[classes, 5], 1.5, 84),
        labels: (0..positions as i64)
            .map(|i| if i % 6 == 5 { -100 } else { (i * 7) % classes as i64 })
            .collect(),
    };
    let valid: Vec<usize> = (0..positions).filter(|&i| data.labels[i] != -100).collect();

    // The definitions in f64, for the composed path: the one-hot teacher's forward KL is the
    // cross-entropy; the renormalised top-k teacher's is Σ p̂ (log p̂ − log q) over its k classes.
    let student = data.student_logits();
    let log_q = |row: usize, class: usize, t: f64| {
        let s = &student[row * classes..(row + 1) * classes];
        let max = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max) / t;
        s[class] / t - (max + s.iter().map(|v| (v / t - max).exp()).sum::<f64>().ln())
    };
    let k = 5;
    let (indices, log_probs) = top_k_of(&data.teacher_logits(), classes, k);
    for t in [1.0, 2.0] {
        let cross_entropy = valid
            .iter()
            .map(|&row| -log_q(row, data.labels[row] as usize, t))
            .sum::<f64>()
            / valid.len() as f64;
        let renormalised = valid
            .iter()
            .map(|&row| {
                let top = &log_probs[row * k..(row + 1) * k];
                let scaled: Vec<f64> = top.iter().map(|lp| lp / t).collect();
                let max = scaled.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let norm = max + scaled.iter().map(|v| (v - max).exp()).sum::<f64>().ln();
                (0..k)
                    .map(|j| {
                        let log_p = scaled[j] - norm;
                        log_p.exp() * (log_p - log_q(row, indices[row * k + j] as usize, t))
                    })
                    .sum::<f64>()
            })
            .sum::<f64>()
            / valid.len() as f64;
        for named in devices() {
            let config = LinearHeadKdConfig::new()
                .with_temperature(t)
                .with_implementation(Implementation::Composed);
            let [ce, ..] = sparse_head_run(&named.device, &config, &data, 0, TailPolicy::Renormalize);
            assert_close(
                &format!("{} labels T={t}: composed", named.name),
                &ce,
                &[cross_entropy],
                1e-5,
                1e-7,
            );
            let [kl, ..] = sparse_head_run(&named.device, &config, &data, k, TailPolicy::Renormalize);
            assert_close(
                &format!("{} top-{k} T={t}: composed", named.name),
                &kl,
                &[renormalised],
                1e-5,
                1e-7,
            );
        }
    }

    // The chunked kernel against the composed path, loss and both gradients.
    for named in fused_devices() {
        for (k, tail, alpha, t) in [
            (0, TailPolicy::Renormalize, 0.0, 1.0),
            (0, TailPolicy::Renormalize, 0.0, 2.0),
            (5, TailPolicy::Renormalize, 0.0, 2.0),
            (5, TailPolicy::UniformTail, 0.3, 1.0),
            (12, TailPolicy::UniformTail, 0.0, 2.0),
            (classes, TailPolicy::UniformTail, 0.0, 1.0),
        ] {
            let base = LinearHeadKdConfig::new()
                .with_alpha(alpha)
                .with_temperature(t)
                .with_scale_by_temperature_squared(true);
            let reference = sparse_head_run(
                &named.device,
                &base.clone().with_implementation(Implementation::Composed),
                &data,
                k,
                tail,
            );
            for chunk_rows in [1, 7, 64] {
                let config = base
                    .clone()
                    .with_chunk_rows(chunk_rows)
                    .with_implementation(Implementation::Fused);
                let fused = sparse_head_run(&named.device, &config, &data, k, tail);
                let what = format!("{} k={k} {tail:?} α={alpha} T={t} chunk={chunk_rows}", named.name);
                for (part, (got, expected)) in ["loss", "d hidden", "d weight"]
                    .iter()
                    .zip(fused.iter().zip(&reference))
                {
                    assert_close(&format!("{what}: {part}"), got, expected, 1e-5, 1e-8);
                }
            }
        }
    }

    // What it refuses, before any chunk runs.
    let device = &devices()[0].device;
    let hidden = floats::<2>(&data.hidden, &[positions, width], device);
    let weight = floats::<2>(&data.weight, &[classes, width], device);
    let labels = ints::<1>(&data.labels, &[positions], device);
    let top = |indices: Vec<i64>, log_probs: Vec<f64>| HeadTeacher::TopK {
        indices: ints::<2>(&indices, &[positions, 1], device),
        log_probs: floats::<2>(&log_probs, &[positions, 1], device),
        tail: TailPolicy::UniformTail,
    };
    let run = |config: LinearHeadKdConfig, teacher: HeadTeacher, labels: Option<Tensor<1, Int>>| {
        config
            .init()
            .forward(hidden.clone(), weight.clone(), teacher, labels, Reduction::BatchMean)
    };
    let reverse = run(
        LinearHeadKdConfig::new().with_divergence(Divergence::ReverseKl),
        top(vec![0; positions], vec![-0.5; positions]),
        Some(labels.clone()),
    );
    assert!(
        matches!(reverse, Err(LossError::InvalidParameter { name: "divergence", .. })),
        "{reverse:?}"
    );
    let mut outside = vec![0; positions];
    outside[3] = classes as i64;
    let outside = run(LinearHeadKdConfig::new(), top(outside, vec![-0.5; positions]), None);
    assert!(
        matches!(
            outside,
            Err(LossError::IndexOutOfRange {
                tensor: "teacher top-k indices",
                ..
            })
        ),
        "{outside:?}"
    );
    let mut nan = vec![-0.5; positions];
    nan[4] = f64::NAN;
    let nan = run(LinearHeadKdConfig::new(), top(vec![0; positions], nan), None);
    assert!(matches!(nan, Err(LossError::NonFinite { kind: "NaN", .. })), "{nan:?}");
    let unlabelled = run(LinearHeadKdConfig::new(), HeadTeacher::Labels, None);
    assert!(
        matches!(unlabelled, Err(LossError::InvalidParameter { .. })),
        "{unlabelled:?}"
    );
}

// ---------------------------------------------------------------------------------------------
// SwiGLU

/// `silu(g) · u` and its two partial derivatives, in f64, each with the size of its terms
/// (what f32 rounding is relative to: `∂/∂g` cancels to 0 near g ≈ −1.28).
fn swiglu_reference(g: f64, u: f64) -> [(f64, f64); 3] {
    let s = 1.0 / (1.0 + (-g).exp());
    [
        (g * s * u, (g * s * u).abs()),
        (
            u * s * (1.0 + g * (1.0 - s)),
            (u * s).abs() * (1.0 + g.abs() * (1.0 - s)),
        ),
        (g * s, (g * s).abs()),
    ]
}

/// `|actual − expected| ≤ atol + rtol · scale` per element, each with its own scale: the kernel
/// is elementwise, so nothing hides behind a large neighbour.
fn assert_elementwise(what: &str, actual: &[f64], expected: &[(f64, f64)], rtol: f64, atol: f64) {
    assert_eq!(actual.len(), expected.len(), "{what}: length");
    for (i, (a, (e, scale))) in actual.iter().zip(expected).enumerate() {
        assert!(
            (a - e).abs() <= atol + rtol * scale,
            "{what}[{i}]: got {a}, expected {e}"
        );
    }
}

#[test]
fn swiglu_matches_its_analytic_values_and_gradients_on_every_device() {
    // More elements than one parallel task takes, across the range a feed-forward sees and
    // past where exp(−g) overflows f32, with the signed zeros and tiny values.
    let specials = [
        0.0, -0.0, 1e-30, -1e-30, 88.8, -88.8, 100.0, -100.0, 20.0, -20.0, 1.0, -1.0,
    ];
    let len = 3 * 17_011;
    let mut gate = random_logits(&[len], 8.0, 11);
    gate[..specials.len()].copy_from_slice(&specials);
    let up = random_logits(&[len], 3.0, 12);
    let weights = random_logits(&[len], 1.0, 13);
    let shape = [3, len / 3];
    let reference: Vec<[(f64, f64); 3]> = gate
        .iter()
        .zip(&up)
        .map(|(&g, &u)| swiglu_reference(g as f32 as f64, u as f32 as f64))
        .collect();
    let expected: Vec<(f64, f64)> = reference.iter().map(|r| r[0]).collect();
    let weighted = |part: usize| -> Vec<(f64, f64)> {
        let w = weights.iter().map(|&w| w as f32 as f64);
        reference
            .iter()
            .zip(w)
            .map(|(r, w)| (r[part].0 * w, r[part].1 * w.abs()))
            .collect()
    };
    let (d_gate, d_up) = (weighted(1), weighted(2));
    for named in devices() {
        let device = named.device.clone().autodiff();
        let g = floats::<2>(&gate, &shape, &device).require_grad();
        let u = floats::<2>(&up, &shape, &device).require_grad();
        let out = swiglu(g.clone(), u.clone());
        let grads = (out.clone() * floats::<2>(&weights, &shape, &device)).sum().backward();
        let name = &named.name;
        assert_elementwise(
            &format!("{name}: swiglu"),
            &to_vec(out.without_autodiff()),
            &expected,
            1e-5,
            1e-30,
        );
        let grad = |t: &Tensor<2>| to_vec(t.grad(&grads).expect("gradient").without_autodiff());
        assert_elementwise(&format!("{name}: d gate"), &grad(&g), &d_gate, 1e-5, 1e-30);
        assert_elementwise(&format!("{name}: d up"), &grad(&u), &d_up, 1e-5, 1e-30);

        // Without autodiff too (the teacher's path), and a NaN stays NaN.
        let plain = swiglu(
            floats::<2>(&gate, &shape, &named.device),
            floats::<2>(&up, &shape, &named.device),
        );
        assert_elementwise(
            &format!("{name}: swiglu (no autodiff)"),
            &to_vec(plain),
            &expected,
            1e-5,
            1e-30,
        );
        let nan = swiglu(
            floats::<1>(&[f64::NAN, 1.0], &[2], &named.device),
            floats::<1>(&[1.0, f64::NAN], &[2], &named.device),
        );
        assert!(to_vec(nan).iter().all(|v| v.is_nan()), "{name}: NaN in, NaN out");
    }
    let mismatched = std::panic::catch_unwind(|| {
        let device = &devices()[0].device;
        swiglu(
            floats::<1>(&[1.0, 2.0], &[2], device),
            floats::<1>(&[1.0], &[1], device),
        )
    });
    assert!(mismatched.is_err(), "shapes that differ are refused");
}

/// `x · W` in f64, with `Σ |x| |W|` per output as the scale of its rounding error. `w` is
/// `[k, n]`, or `[n, k]` when `transposed`.
fn matmul_reference(x: &[f64], w: &[f64], m: usize, k: usize, n: usize, transposed: bool) -> Vec<(f64, f64)> {
    let at = |i: usize, j: usize| if transposed { w[j * k + i] } else { w[i * n + j] };
    let mut out = Vec::with_capacity(m * n);
    for r in 0..m {
        for j in 0..n {
            let (mut value, mut scale) = (0.0, 0.0);
            for i in 0..k {
                let (a, b) = (x[r * k + i] as f32 as f64, at(i, j) as f32 as f64);
                value += a * b;
                scale += (a * b).abs();
            }
            out.push((value, scale));
        }
    }
    out
}

#[test]
fn weight_matmul_matches_the_f64_product_and_its_gradients_on_every_device() {
    // Inner widths off the kernel's 4- and 16-wide steps, a weight wider than one column block
    // (1024) and one deep enough to be split across tasks; row counts up to FEW_ROWS and one past
    // it (burn's matmul).
    for (k, n) in [(37, 1030), (1541, 70)] {
        for m in [1, 3, 8, FEW_ROWS, FEW_ROWS + 1] {
            for layout in [WeightLayout::InOut, WeightLayout::OutIn] {
                let transposed = layout == WeightLayout::OutIn;
                let x = random_logits(&[m * k], 1.0, 21);
                let w = random_logits(&[k * n], 1.0, 22);
                let upstream = random_logits(&[m * n], 1.0, 23);
                let w_shape = if transposed { [n, k] } else { [k, n] };
                let expected = matmul_reference(&x, &w, m, k, n, transposed);
                // d x = G · Wᵀ and d W = xᵀ · G (stored as W is), in f64.
                let g_w: Vec<f64> = if transposed {
                    (0..n * k).map(|e| (e / k, e % k)).collect::<Vec<_>>()
                } else {
                    (0..k * n).map(|e| (e % n, e / n)).collect::<Vec<_>>()
                }
                .into_iter()
                .map(|(j, i)| {
                    (0..m)
                        .map(|r| x[r * k + i] as f32 as f64 * upstream[r * n + j] as f32 as f64)
                        .sum()
                })
                .collect();
                let g_x: Vec<f64> = (0..m * k)
                    .map(|e| {
                        let (r, i) = (e / k, e % k);
                        let at = |j: usize| if transposed { w[j * k + i] } else { w[i * n + j] };
                        (0..n)
                            .map(|j| upstream[r * n + j] as f32 as f64 * at(j) as f32 as f64)
                            .sum()
                    })
                    .collect();
                let scaled = |values: &[f64]| -> Vec<(f64, f64)> {
                    let largest = values.iter().fold(1.0f64, |a, v| a.max(v.abs()));
                    values.iter().map(|&v| (v, largest)).collect()
                };
                for named in devices() {
                    let what = format!("{}: {m}x{k}x{n} {layout:?}", named.name);
                    let plain = weight_matmul(
                        floats::<2>(&x, &[m, k], &named.device),
                        floats::<2>(&w, &w_shape, &named.device),
                        layout,
                    );
                    assert_eq!(plain.dims(), [m, n], "{what}: shape");
                    assert_elementwise(&what, &to_vec(plain), &expected, 1e-5, 1e-30);

                    let device = named.device.clone().autodiff();
                    let xt = floats::<2>(&x, &[m, k], &device).require_grad();
                    let wt = floats::<2>(&w, &w_shape, &device).require_grad();
                    let out = weight_matmul(xt.clone(), wt.clone(), layout);
                    let grads = (out * floats::<2>(&upstream, &[m, n], &device)).sum().backward();
                    let grad = |t: &Tensor<2>| to_vec(t.grad(&grads).expect("gradient").without_autodiff());
                    assert_elementwise(&format!("{what}: d x"), &grad(&xt), &scaled(&g_x), 1e-5, 0.0);
                    assert_elementwise(&format!("{what}: d W"), &grad(&wt), &scaled(&g_w), 1e-5, 0.0);
                }
            }
        }
    }
    let device = &devices()[0].device;
    let mismatched = std::panic::catch_unwind(|| {
        weight_matmul(
            floats::<2>(&[1.0; 6], &[2, 3], device),
            floats::<2>(&[1.0; 8], &[4, 2], device),
            WeightLayout::InOut,
        )
    });
    assert!(mismatched.is_err(), "inner widths that differ are refused");
    let nan = weight_matmul(
        floats::<2>(&[f64::NAN, 1.0], &[1, 2], device),
        floats::<2>(&[1.0, 2.0, 3.0, 4.0], &[2, 2], device),
        WeightLayout::InOut,
    );
    assert!(to_vec(nan).iter().all(|v| v.is_nan()), "NaN in, NaN out");
}

/// One attention call's sizes: `[batch, seq, heads, kv_heads, head_dim]`, the cached slots
/// before the queries, and each row's left padding.
struct AttentionCase {
    dims: [usize; 5],
    past: usize,
    padding: Vec<usize>,
}

/// The output of causal grouped-query attention and the gradients of `Σ output · upstream`
/// w.r.t. q, k and v, in f64 from the definition (`[batch, seq, heads, head_dim]` queries,
/// `[batch, past + seq, kv_heads, head_dim]` keys and values).
fn attention_reference(case: &AttentionCase, [q, k, v, upstream]: [&[f64]; 4]) -> [Vec<f64>; 4] {
    let [batch, seq, heads, kv_heads, d] = case.dims;
    let keys = case.past + seq;
    let scale = 1.0 / (d as f64).sqrt();
    let f = |x: f64| x as f32 as f64;
    let q_at = |b: usize, i: usize, h: usize| ((b * seq + i) * heads + h) * d;
    let k_at = |b: usize, j: usize, kv: usize| ((b * keys + j) * kv_heads + kv) * d;
    let mut out = vec![0.0; q.len()];
    let (mut d_q, mut d_k, mut d_v) = (vec![0.0; q.len()], vec![0.0; k.len()], vec![0.0; v.len()]);
    for b in 0..batch {
        let pad = case.padding.get(b).copied().unwrap_or(0);
        for i in 0..seq {
            let slot = case.past + i;
            let allowed: Vec<usize> = (0..keys).filter(|&j| j == slot || (j <= slot && j >= pad)).collect();
            for h in 0..heads {
                let kv = h / (heads / kv_heads);
                let (qa, ga) = (q_at(b, i, h), q_at(b, i, h));
                let scores: Vec<f64> = allowed
                    .iter()
                    .map(|&j| (0..d).map(|e| f(q[qa + e]) * f(k[k_at(b, j, kv) + e])).sum::<f64>() * scale)
                    .collect();
                let max = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let exps: Vec<f64> = scores.iter().map(|s| (s - max).exp()).collect();
                let total: f64 = exps.iter().sum();
                let p: Vec<f64> = exps.iter().map(|e| e / total).collect();
                for (&j, &pj) in allowed.iter().zip(&p) {
                    for e in 0..d {
                        out[qa + e] += pj * f(v[k_at(b, j, kv) + e]);
                        d_v[k_at(b, j, kv) + e] += pj * f(upstream[ga + e]);
                    }
                }
                // dP_j = dO · v_j; dS_j = P_j (dP_j − Σ P dP).
                let d_p: Vec<f64> = allowed
                    .iter()
                    .map(|&j| (0..d).map(|e| f(upstream[ga + e]) * f(v[k_at(b, j, kv) + e])).sum())
                    .collect();
                let mean: f64 = p.iter().zip(&d_p).map(|(p, dp)| p * dp).sum();
                for ((&j, &pj), &dpj) in allowed.iter().zip(&p).zip(&d_p) {
                    let ds = pj * (dpj - mean) * scale;
                    for e in 0..d {
                        d_q[qa + e] += ds * f(k[k_at(b, j, kv) + e]);
                        d_k[k_at(b, j, kv) + e] += ds * f(q[qa + e]);
                    }
                }
            }
        }
    }
    [out, d_q, d_k, d_v]
}

#[test]
fn causal_attention_matches_its_f64_definition_and_gradients_on_every_device() {
    let cases = [
        // Whole sequences past one 64-query block, three query heads per key/value head.
        AttentionCase {
            dims: [2, 70, 6, 2, 8],
            past: 0,
            padding: vec![],
        },
        // A cached call on left-padded rows: row 2's padding runs past the cache, so its first
        // queries are padding and see themselves alone.
        AttentionCase {
            dims: [3, 3, 4, 1, 6],
            past: 5,
            padding: vec![0, 2, 6],
        },
        // One decoding step, as many key/value heads as query heads.
        AttentionCase {
            dims: [2, 1, 3, 3, 4],
            past: 9,
            padding: vec![1, 0],
        },
    ];
    for (index, case) in cases.iter().enumerate() {
        let [batch, seq, heads, kv_heads, d] = case.dims;
        let keys = case.past + seq;
        let (q_shape, k_shape) = ([batch, seq, heads, d], [batch, keys, kv_heads, d]);
        let seed = 40 + 4 * index as u64;
        let q = random_logits(&q_shape, 2.0, seed);
        let k = random_logits(&k_shape, 2.0, seed + 1);
        let v = random_logits(&k_shape, 1.0, seed + 2);
        let upstream = random_logits(&[batch, seq, heads * d], 1.0, seed + 3);
        let reference = attention_reference(case, [&q, &k, &v, &upstream]);
        let scaled = |values: &[f64]| -> Vec<(f64, f64)> {
            let largest = values.iter().fold(1e-3f64, |a, v| a.max(v.abs()));
            values.iter().map(|&v| (v, largest)).collect()
        };
        let [out, d_q, d_k, d_v] = reference.each_ref().map(|values| scaled(values));
        let mask = CausalMask::cached(case.past, case.padding.clone());
        for named in devices() {
            let what = format!("{}: case {index}", named.name);
            let plain = causal_attention(
                floats::<4>(&q, &q_shape, &named.device),
                floats::<4>(&k, &k_shape, &named.device),
                floats::<4>(&v, &k_shape, &named.device),
                &mask,
            );
            assert_eq!(plain.dims(), [batch, seq, heads * d], "{what}: shape");
            assert_elementwise(&format!("{what}: output"), &to_vec(plain), &out, 2e-5, 0.0);

            let device = named.device.clone().autodiff();
            let qt = floats::<4>(&q, &q_shape, &device).require_grad();
            let kt = floats::<4>(&k, &k_shape, &device).require_grad();
            let vt = floats::<4>(&v, &k_shape, &device).require_grad();
            let output = causal_attention(qt.clone(), kt.clone(), vt.clone(), &mask);
            let grads = (output.clone() * floats::<3>(&upstream, &[batch, seq, heads * d], &device))
                .sum()
                .backward();
            assert_elementwise(
                &format!("{what}: output (autodiff)"),
                &to_vec(output.without_autodiff()),
                &out,
                2e-5,
                0.0,
            );
            let grad = |t: &Tensor<4>| to_vec(t.grad(&grads).expect("gradient").without_autodiff());
            assert_elementwise(&format!("{what}: d q"), &grad(&qt), &d_q, 2e-5, 0.0);
            assert_elementwise(&format!("{what}: d k"), &grad(&kt), &d_k, 2e-5, 0.0);
            assert_elementwise(&format!("{what}: d v"), &grad(&vt), &d_v, 2e-5, 0.0);
        }
    }
    for named in devices() {
        // A NaN query poisons its own rows only.
        let mut q = random_logits(&[1, 2, 1, 4], 1.0, 60);
        q[4] = f64::NAN;
        let kv = random_logits(&[1, 2, 1, 4], 1.0, 61);
        let out = to_vec(causal_attention(
            floats::<4>(&q, &[1, 2, 1, 4], &named.device),
            floats::<4>(&kv, &[1, 2, 1, 4], &named.device),
            floats::<4>(&kv, &[1, 2, 1, 4], &named.device),
            &CausalMask::causal(),
        ));
        assert!(
            out[..4].iter().all(|v| v.is_finite()),
            "{}: clean row stays finite",
            named.name
        );
        assert!(out[4..].iter().all(|v| v.is_nan()), "{}: NaN in, NaN out", named.name);
    }
    let mismatched = std::panic::catch_unwind(|| {
        let device = &devices()[0].device;
        let t = |seq: usize| floats::<4>(&vec![0.0; seq * 4], &[1, seq, 1, 4], device);
        causal_attention(t(2), t(3), t(3), &CausalMask::causal())
    });
    assert!(mismatched.is_err(), "keys that are not past + seq slots are refused");
}
