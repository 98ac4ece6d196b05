//! The feature and relational losses: the authors' PyTorch formulas in float64
//! (`tests/fixtures/relations.json`, written by `scripts/make_relation_fixtures.py`) on every
//! device, properties, degenerate inputs and rejected ones.

use burn::module::{Module, Param};
use burn::nn::Linear;
use burn::tensor::{Device, Int, Tensor};
use burn_distill_loss::*;
use serde_json::Value;

use super::{assert_close, devices, floats, ints, scalar, to_vec};

fn fixtures() -> &'static Value {
    static FIXTURES: std::sync::OnceLock<Value> = std::sync::OnceLock::new();
    FIXTURES.get_or_init(|| {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../../tests/fixtures/relations.json");
        let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{path}: {e}"));
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("{path}: {e}"))
    })
}

fn numbers(value: &Value) -> Vec<f64> {
    value
        .as_array()
        .expect("array")
        .iter()
        .map(|v| v.as_f64().expect("number"))
        .collect()
}

fn shape(value: &Value) -> Vec<usize> {
    value["shape"]
        .as_array()
        .expect("shape")
        .iter()
        .map(|v| v.as_u64().expect("dimension") as usize)
        .collect()
}

fn tensor<const D: usize>(value: &Value, device: &Device) -> Tensor<D> {
    floats(&numbers(&value["values"]), &shape(value), device)
}

/// The loss a fixture case names, on rank-`D` inputs.
fn case_loss<const D: usize>(
    case: &Value,
    student: Tensor<D>,
    teacher: Tensor<D>,
    implementation: Implementation,
) -> Tensor<1> {
    let number = |key: &str| case[key].as_f64().expect(key);
    match case["loss"].as_str().unwrap() {
        "rkd_distance" => RkdLossConfig::new().init().terms(student, teacher).unwrap().0,
        "rkd_angle" => RkdLossConfig::new().init().terms(student, teacher).unwrap().1,
        "rkd" => RkdLossConfig::new().init().forward(student, teacher).unwrap(),
        "pkt" => PktLossConfig::new()
            .with_implementation(implementation)
            .init()
            .forward(student, teacher)
            .unwrap(),
        "sp" => SpLossConfig::new()
            .with_implementation(implementation)
            .init()
            .forward(student, teacher)
            .unwrap(),
        "dist" => DistLossConfig::new()
            .with_beta(number("beta"))
            .with_gamma(number("gamma"))
            .with_temperature(number("temperature"))
            .with_implementation(implementation)
            .init()
            .forward(student, teacher)
            .unwrap(),
        "cka" => CkaLossConfig::new()
            .with_debiased(case["debiased"].as_bool().unwrap())
            .with_implementation(implementation)
            .init()
            .forward(student, teacher)
            .unwrap(),
        other => panic!("not a rank-generic case: {other}"),
    }
}

/// `(value, gradient with respect to the student)` of one fixture case on `device`.
fn run_case(case: &Value, device: &Device, implementation: Implementation) -> (f64, Vec<f64>) {
    let autodiff = device.clone().autodiff();
    let rank = shape(&case["student"]).len();
    macro_rules! grad_of {
        ($rank:literal, $body:expr) => {{
            let student = tensor::<$rank>(&case["student"], &autodiff).require_grad();
            let teacher = tensor::<$rank>(&case["teacher"], &autodiff);
            #[allow(clippy::redundant_closure_call)]
            let value: Tensor<1> = $body(student.clone(), teacher);
            let grads = value.backward();
            (scalar(value), to_vec(student.grad(&grads).expect("student gradient")))
        }};
    }
    match (case["loss"].as_str().unwrap(), rank) {
        ("at", 4) => grad_of!(4, |s, t| AttentionTransferLossConfig::new()
            .with_p(case["p"].as_f64().unwrap())
            .with_implementation(implementation)
            .init()
            .forward(s, t, Reduction::BatchMean)
            .unwrap()),
        ("hidden", 3) => {
            let mask: Vec<i64> = case["mask"]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_i64().unwrap())
                .collect();
            let distance = match case["distance"].as_str().unwrap() {
                "Mse" => HiddenDistance::Mse,
                _ => HiddenDistance::Cosine,
            };
            let lead = &shape(&case["student"])[..2];
            let mask = super::bools::<2>(&mask, lead, &autodiff);
            grad_of!(3, |s, t| HiddenStateLossConfig::new()
                .with_distance(distance)
                .with_implementation(implementation)
                .init()
                .forward_masked(s, t, mask, Reduction::BatchMean)
                .unwrap())
        }
        (_, 2) => grad_of!(2, |s, t| case_loss::<2>(case, s, t, implementation)),
        (_, 4) => grad_of!(4, |s, t| case_loss::<4>(case, s, t, implementation)),
        (name, rank) => panic!("fixture {name} of rank {rank}"),
    }
}

#[test]
fn relational_losses_match_the_authors_formulas_on_every_device() {
    let cases: Vec<&Value> = fixtures()["cases"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|case| !matches!(case["loss"].as_str(), Some("crd" | "minibatch_cka")))
        .collect();
    assert!(cases.len() >= 17, "fixture file lost its cases");
    // The CPU devices run the host kernels (`Fused`, what `Auto` picks there) and the composed
    // tensor operations; the others the composed ones.
    let runs = devices().iter().flat_map(|named| {
        let host = matches!(named.name, "ndarray" | "flex");
        let implementations: &[Implementation] = if host {
            &[Implementation::Fused, Implementation::Composed]
        } else {
            &[Implementation::Composed]
        };
        implementations
            .iter()
            .map(move |&implementation| (named, implementation))
    });
    for (named, implementation) in runs {
        for case in &cases {
            let (value, grad) = run_case(case, &named.device, implementation);
            let what = format!(
                "{} {:?} {} {}",
                named.name,
                implementation,
                case["loss"],
                case.get("p").or(case.get("debiased")).unwrap_or(&Value::Null)
            );
            assert_close(
                &format!("{what} value"),
                &[value],
                &[case["value"].as_f64().unwrap()],
                1e-4,
                1e-6,
            );
            // `value_only`: below eps PyTorch's cosine differentiates through a norm clamped
            // in place under no_grad (see the script); only the value is comparable there.
            if case["value_only"].as_bool() != Some(true) {
                assert_close(&format!("{what} grad"), &grad, &numbers(&case["grad"]), 2e-4, 1e-6);
            }
        }
    }
}

#[test]
fn minibatch_cka_metric_matches_nguyen_et_al() {
    let case = fixtures()["cases"]
        .as_array()
        .unwrap()
        .iter()
        .find(|case| case["loss"] == "minibatch_cka")
        .unwrap();
    for named in devices() {
        let mut metric = CkaAccumulator::new(true);
        assert_eq!(metric.value(), None);
        for batch in case["batches"].as_array().unwrap() {
            metric
                .update(
                    tensor::<2>(&batch[0], &named.device),
                    tensor::<2>(&batch[1], &named.device),
                )
                .unwrap();
        }
        assert_eq!(metric.batches(), 3);
        let expected = case["value"].as_f64().unwrap();
        assert_close(
            &format!("{} minibatch CKA", named.name),
            &[metric.value().unwrap()],
            &[expected],
            1e-4,
            1e-6,
        );
        // One batch's metric is that batch's CKA.
        let batch = &case["batches"][0];
        let mut one = CkaAccumulator::new(true);
        one.update(
            tensor::<2>(&batch[0], &named.device),
            tensor::<2>(&batch[1], &named.device),
        )
        .unwrap();
        let direct = scalar(
            linear_cka(
                tensor::<2>(&batch[0], &named.device),
                tensor::<2>(&batch[1], &named.device),
                true,
            )
            .unwrap(),
        );
        assert_close("one batch", &[one.value().unwrap()], &[direct], 1e-5, 1e-6);
    }
}

fn linear(weight_out_in: &Value, bias: &Value, device: &Device) -> Linear {
    // PyTorch stores [out, in]; burn's Linear holds [in, out].
    let weight = tensor::<2>(weight_out_in, device).transpose();
    Linear {
        weight: Param::from_tensor(weight),
        bias: Some(Param::from_tensor(tensor::<1>(bias, device))),
    }
}

#[test]
fn crd_matches_the_authors_code_over_two_steps() {
    let case = fixtures()["cases"]
        .as_array()
        .unwrap()
        .iter()
        .find(|case| case["loss"] == "crd")
        .unwrap();
    let count = |key: &str| case[key].as_u64().unwrap() as usize;
    for named in devices() {
        let device = named.device.clone().autodiff();
        let mut loss = CrdLossConfig::new(7, 9, count("examples"))
            .with_embedding_width(count("embedding_width"))
            .with_negatives(count("negatives"))
            .with_temperature(case["temperature"].as_f64().unwrap())
            .with_momentum(case["momentum"].as_f64().unwrap())
            .init(&device)
            .with_banks(
                tensor::<2>(&case["initial_banks"][0], &device),
                tensor::<2>(&case["initial_banks"][1], &device),
            )
            .unwrap();
        loss.student_embed = linear(&case["student_embed"], &case["student_bias"], &device);
        loss.teacher_embed = linear(&case["teacher_embed"], &case["teacher_bias"], &device);
        assert_eq!(loss.normalisers(), None);
        for (step, expected) in case["steps"].as_array().unwrap().iter().enumerate() {
            let what = format!("{} step {step}", named.name);
            let student = tensor::<2>(&expected["student"], &device).require_grad();
            let teacher = tensor::<2>(&expected["teacher"], &device);
            let indices: Vec<i64> = expected["indices"]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_i64().unwrap())
                .collect();
            let negatives: Vec<i64> = expected["negatives"]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_i64().unwrap())
                .collect();
            let batch = indices.len();
            let output = loss
                .forward(
                    student.clone(),
                    teacher,
                    ints::<1>(&indices, &[batch], &device),
                    ints::<2>(&negatives, &[batch, count("negatives")], &device),
                )
                .unwrap();
            let number = |key: &str| expected[key].as_f64().unwrap();
            assert_close(
                &format!("{what} loss"),
                &[scalar(output.loss.clone())],
                &[number("loss")],
                1e-4,
                1e-5,
            );
            assert_close(
                &format!("{what} student term"),
                &[scalar(output.student_term.clone())],
                &[number("student_term")],
                1e-4,
                1e-5,
            );
            assert_close(
                &format!("{what} teacher term"),
                &[scalar(output.teacher_term.clone())],
                &[number("teacher_term")],
                1e-4,
                1e-5,
            );
            let grads = output.loss.backward();
            assert_close(
                &format!("{what} student grad"),
                &to_vec(student.grad(&grads).unwrap()),
                &numbers(&expected["grad_student"]),
                2e-4,
                1e-6,
            );
            let embed_grad = |linear: &Linear| to_vec(linear.weight.val().grad(&grads).unwrap().transpose());
            assert_close(
                &format!("{what} student embed grad"),
                &embed_grad(&loss.student_embed),
                &numbers(&expected["grad_student_embed"]),
                2e-4,
                1e-6,
            );
            assert_close(
                &format!("{what} teacher embed grad"),
                &embed_grad(&loss.teacher_embed),
                &numbers(&expected["grad_teacher_embed"]),
                2e-4,
                1e-6,
            );
            loss = loss.update(output.update);
            let (student_bank, teacher_bank) = loss.banks();
            assert_close(
                &format!("{what} student bank"),
                &to_vec(student_bank),
                &numbers(&expected["student_bank"]),
                1e-5,
                1e-6,
            );
            assert_close(
                &format!("{what} teacher bank"),
                &to_vec(teacher_bank),
                &numbers(&expected["teacher_bank"]),
                1e-5,
                1e-6,
            );
            let normalisers = loss.normalisers().expect("set by the first step");
            assert_close(
                &format!("{what} Z"),
                &normalisers,
                &numbers(&expected["normalisers"]),
                1e-4,
                0.0,
            );
        }
        // The banks and Z are in the module's record: a checkpoint carries them.
        let restored = CrdLossConfig::new(7, 9, count("examples"))
            .with_embedding_width(count("embedding_width"))
            .with_negatives(count("negatives"))
            .init(&device)
            .load_record(loss.clone().into_record());
        assert_eq!(to_vec(restored.banks().0), to_vec(loss.banks().0));
        assert_eq!(restored.normalisers(), loss.normalisers());
    }
}

#[test]
fn crd_negatives_are_uniform_over_the_other_examples_and_seeded() {
    let device = devices()[0].device.clone();
    let loss = CrdLossConfig::new(4, 4, 50).with_negatives(40).init(&device);
    let indices = [0i64, 17, 49];
    let drawn = loss.sample_negatives(&indices, 7, &device);
    assert_eq!(drawn.dims(), [3, 40]);
    let values: Vec<i64> = drawn.clone().into_data().iter::<i64>().collect();
    for (row, &index) in indices.iter().enumerate() {
        let row_values = &values[row * 40..(row + 1) * 40];
        assert!(
            row_values.iter().all(|&v| (0..50).contains(&v) && v != index),
            "row {row}: {row_values:?}"
        );
    }
    let again: Vec<i64> = loss
        .sample_negatives(&indices, 7, &device)
        .into_data()
        .iter::<i64>()
        .collect();
    assert_eq!(values, again, "same seed, same negatives");
    let other: Vec<i64> = loss
        .sample_negatives(&indices, 8, &device)
        .into_data()
        .iter::<i64>()
        .collect();
    assert_ne!(values, other);
}

fn random(shape: &[usize], seed: u64, device: &Device) -> Vec<f64> {
    let _ = device;
    super::random_logits(shape, 1.0, seed)
}

#[test]
fn a_student_equal_to_its_teacher_has_zero_loss() {
    for named in devices() {
        let device = &named.device;
        let features = floats::<2>(&random(&[8, 6], 1, device), &[8, 6], device);
        let maps = floats::<4>(&random(&[3, 4, 5, 5], 2, device), &[3, 4, 5, 5], device);
        let values = [
            (
                "RKD",
                scalar(
                    RkdLossConfig::new()
                        .init()
                        .forward(features.clone(), features.clone())
                        .unwrap(),
                ),
            ),
            (
                "PKT",
                scalar(
                    PktLossConfig::new()
                        .init()
                        .forward(features.clone(), features.clone())
                        .unwrap(),
                ),
            ),
            (
                "SP",
                scalar(
                    SpLossConfig::new()
                        .init()
                        .forward(features.clone(), features.clone())
                        .unwrap(),
                ),
            ),
            (
                "DIST",
                scalar(
                    DistLossConfig::new()
                        .init()
                        .forward(features.clone(), features.clone())
                        .unwrap(),
                ),
            ),
            (
                "CKA",
                scalar(
                    CkaLossConfig::new()
                        .init()
                        .forward(features.clone(), features.clone())
                        .unwrap(),
                ),
            ),
            (
                "AT",
                scalar(
                    AttentionTransferLossConfig::new()
                        .init()
                        .forward(maps.clone(), maps, Reduction::BatchMean)
                        .unwrap(),
                ),
            ),
            (
                "hidden cosine",
                scalar(
                    HiddenStateLossConfig::new()
                        .with_distance(HiddenDistance::Cosine)
                        .init()
                        .forward(features.clone(), features.clone(), Reduction::BatchMean)
                        .unwrap(),
                ),
            ),
        ];
        for (name, value) in values {
            assert!(value.abs() < 2e-6, "{} {name}: {value}", named.name);
        }
    }
}

#[test]
fn similarity_losses_ignore_scale_and_rotation_where_the_papers_say() {
    for named in devices() {
        let device = &named.device;
        let student = floats::<2>(&random(&[10, 4], 3, device), &[10, 4], device);
        let teacher = floats::<2>(&random(&[10, 6], 4, device), &[10, 6], device);
        // An orthogonal map of the teacher (a rotation in its first two coordinates) and a scale.
        let (sin, cos) = 0.6f64.sin_cos();
        let mut rotation = vec![0.0; 36];
        for i in 0..6 {
            rotation[i * 6 + i] = 1.0;
        }
        rotation[0] = cos;
        rotation[1] = -sin;
        rotation[6] = sin;
        rotation[7] = cos;
        let rotated = teacher
            .clone()
            .matmul(floats::<2>(&rotation, &[6, 6], device))
            .mul_scalar(7.5);
        let cka = CkaLossConfig::new().init();
        let rkd = RkdLossConfig::new().init();
        let pkt = PktLossConfig::new().init();
        for (name, plain, moved) in [
            (
                "CKA",
                cka.forward(student.clone(), teacher.clone()),
                cka.forward(student.clone(), rotated.clone()),
            ),
            (
                "RKD",
                rkd.forward(student.clone(), teacher.clone()),
                rkd.forward(student.clone(), rotated.clone()),
            ),
            (
                "PKT",
                pkt.forward(student.clone(), teacher.clone()),
                pkt.forward(student.clone(), rotated.clone()),
            ),
        ] {
            let (plain, moved) = (scalar(plain.unwrap()), scalar(moved.unwrap()));
            assert!(plain > 1e-3, "{name} should be positive here: {plain}");
            assert!(
                (plain - moved).abs() <= 1e-4 * plain.abs().max(1.0),
                "{} {name}: {plain} vs {moved}",
                named.name
            );
        }
    }
}

#[test]
fn degenerate_batches_are_errors_or_finite() {
    for named in devices() {
        let device = &named.device.clone().autodiff();
        let one = floats::<2>(&[1.0, 2.0, 3.0], &[1, 3], device).require_grad();
        assert!(matches!(
            RkdLossConfig::new().init().forward(one.clone(), one.clone()),
            Err(LossError::TooFewExamples {
                loss: "RKD",
                min: 2,
                examples: 1
            })
        ));
        let three = floats::<2>(&random(&[3, 5], 5, device), &[3, 5], device);
        assert!(matches!(
            CkaLossConfig::new().init().forward(three.clone(), three.clone()),
            Err(LossError::TooFewExamples {
                loss: "CKA",
                min: 4,
                examples: 3
            })
        ));
        let empty = Tensor::<2>::zeros([0, 4], device);
        for result in [
            PktLossConfig::new().init().forward(empty.clone(), empty.clone()),
            SpLossConfig::new().init().forward(empty.clone(), empty.clone()),
            DistLossConfig::new().init().forward(empty.clone(), empty.clone()),
        ] {
            assert!(
                matches!(result, Err(LossError::TooFewExamples { examples: 0, .. })),
                "{result:?}"
            );
        }
        // A batch of one: PKT and SP are 0; DIST's intra term is 1 with zero gradient.
        let teacher_one = floats::<2>(&[0.5, -1.0, 2.0], &[1, 3], device);
        for (name, value) in [
            (
                "PKT",
                PktLossConfig::new()
                    .init()
                    .forward(one.clone(), teacher_one.clone())
                    .unwrap(),
            ),
            (
                "SP",
                SpLossConfig::new()
                    .init()
                    .forward(one.clone(), teacher_one.clone())
                    .unwrap(),
            ),
        ] {
            let grads = value.clone().backward();
            assert!(scalar(value).abs() < 1e-6, "{name}");
            assert!(
                to_vec(one.grad(&grads).unwrap()).iter().all(|g| g.is_finite()),
                "{name}"
            );
        }
        let dist = DistLossConfig::new().init();
        let (_, intra) = dist.terms(one.clone(), teacher_one.clone()).unwrap();
        assert!((scalar(intra) - 1.0).abs() < 1e-6);
        // Constant features: CKA is 0 (loss 1) with a zero gradient; zero vectors have finite
        // PKT and AT gradients.
        let constant = floats::<2>(&[2.0; 24], &[6, 4], device).require_grad();
        let varied = floats::<2>(&random(&[6, 5], 6, device), &[6, 5], device);
        for debiased in [true, false] {
            let value = CkaLossConfig::new()
                .with_debiased(debiased)
                .init()
                .forward(constant.clone(), varied.clone())
                .unwrap();
            let grads = value.clone().backward();
            assert!((scalar(value) - 1.0).abs() < 1e-6);
            assert!(to_vec(constant.grad(&grads).unwrap()).iter().all(|g| *g == 0.0));
        }
        let zeros = floats::<2>(&[0.0; 24], &[6, 4], device).require_grad();
        let value = PktLossConfig::new()
            .init()
            .forward(zeros.clone(), varied.clone())
            .unwrap();
        let grads = value.backward();
        assert!(to_vec(zeros.grad(&grads).unwrap()).iter().all(|g| g.is_finite()));
        let zero_maps = Tensor::<4>::zeros([2, 3, 4, 4], device).require_grad();
        let maps = floats::<4>(&random(&[2, 5, 4, 4], 7, device), &[2, 5, 4, 4], device);
        let value = AttentionTransferLossConfig::new()
            .init()
            .forward(zero_maps.clone(), maps, Reduction::BatchMean)
            .unwrap();
        let grads = value.backward();
        assert!(to_vec(zero_maps.grad(&grads).unwrap()).iter().all(|g| g.is_finite()));
    }
}

#[test]
fn relational_losses_reject_bad_inputs_and_options() {
    let device = &devices()[0].device;
    let student = floats::<2>(&random(&[6, 4], 8, device), &[6, 4], device);
    let five = floats::<2>(&random(&[5, 4], 9, device), &[5, 4], device);
    for result in [
        RkdLossConfig::new().init().forward(student.clone(), five.clone()),
        PktLossConfig::new().init().forward(student.clone(), five.clone()),
        SpLossConfig::new().init().forward(student.clone(), five.clone()),
        CkaLossConfig::new().init().forward(student.clone(), five.clone()),
    ] {
        let error = result.unwrap_err();
        assert!(
            matches!(
                error,
                LossError::FeatureShape {
                    what: "teacher features",
                    ..
                }
            ),
            "{error:?}"
        );
        assert!(error.to_string().contains("6 examples"), "{error}");
    }
    let mut poisoned = random(&[6, 4], 10, device);
    poisoned[5] = f64::NAN;
    let nan = floats::<2>(&poisoned, &[6, 4], device);
    poisoned[5] = f64::INFINITY;
    let inf = floats::<2>(&poisoned, &[6, 4], device);
    assert_eq!(
        RkdLossConfig::new()
            .init()
            .forward(nan.clone(), student.clone())
            .unwrap_err(),
        LossError::NonFinite {
            tensor: "student features",
            kind: "NaN"
        }
    );
    assert_eq!(
        CkaLossConfig::new()
            .init()
            .forward(student.clone(), inf.neg())
            .unwrap_err(),
        LossError::NonFinite {
            tensor: "teacher features",
            kind: "infinite"
        }
    );
    assert!(matches!(
        DistLossConfig::new().init().forward(nan, student.clone()),
        Err(LossError::NonFinite {
            tensor: "student logits",
            ..
        })
    ));
    // AT: spatial sizes must agree.
    let small = Tensor::<4>::ones([2, 3, 4, 4], device);
    let large = Tensor::<4>::ones([2, 3, 8, 8], device);
    let error = AttentionTransferLossConfig::new()
        .init()
        .forward(small, large, Reduction::BatchMean)
        .unwrap_err();
    assert!(error.to_string().contains("pool the larger map"), "{error}");
    // Hidden states: same shape after the projection, a mask of the leading shape.
    let hidden = Tensor::<3>::ones([2, 3, 4], device);
    let loss = HiddenStateLossConfig::new().init();
    assert!(matches!(
        loss.forward(
            hidden.clone(),
            Tensor::<3>::ones([2, 3, 5], device),
            Reduction::BatchMean
        ),
        Err(LossError::FeatureShape {
            what: "teacher hidden states",
            ..
        })
    ));
    assert!(matches!(
        loss.forward_masked(
            hidden.clone(),
            hidden.clone(),
            super::bools::<2>(&[1, 0], &[1, 2], device),
            Reduction::BatchMean
        ),
        Err(LossError::FeatureShape {
            what: "position mask",
            ..
        })
    ));
    let none = super::bools::<2>(&[0; 6], &[2, 3], device);
    assert_eq!(
        loss.forward_masked(hidden.clone(), hidden, none, Reduction::BatchMean)
            .unwrap_err(),
        LossError::NoValidPositions
    );
    // Options.
    for error in [
        AttentionTransferLossConfig::new().with_p(0.5).try_init().unwrap_err(),
        RkdLossConfig::new().with_angle_weight(-1.0).try_init().unwrap_err(),
        PktLossConfig::new().with_eps(0.0).try_init().unwrap_err(),
        DistLossConfig::new().with_temperature(0.0).try_init().unwrap_err(),
        DistLossConfig::new().with_gamma(f64::NAN).try_init().unwrap_err(),
        CrdLossConfig::new(4, 4, 10)
            .with_negatives(10)
            .try_init(device)
            .unwrap_err(),
        CrdLossConfig::new(4, 4, 100)
            .with_momentum(1.0)
            .try_init(device)
            .unwrap_err(),
        CrdLossConfig::new(0, 4, 100).try_init(device).unwrap_err(),
    ] {
        assert!(matches!(error, LossError::InvalidParameter { .. }), "{error:?}");
    }
    // CRD: indices outside the bank, negatives of the wrong shape.
    let crd = CrdLossConfig::new(4, 4, 30).with_negatives(5).init(device);
    let indices = ints::<1>(&[0, 1, 2, 3, 4, 30], &[6], device);
    let negatives = crd.sample_negatives(&[0, 1, 2, 3, 4, 5], 1, device);
    assert_eq!(
        crd.forward(student.clone(), student.clone(), indices, negatives.clone())
            .unwrap_err(),
        LossError::IndexOutOfRange {
            tensor: "indices",
            index: 30,
            classes: 30
        }
    );
    // Each example's bank row is written once per step: repeated indices are refused.
    let repeated = ints::<1>(&[0, 1, 2, 3, 4, 1], &[6], device);
    let error = crd
        .forward(student.clone(), student.clone(), repeated, negatives.clone())
        .unwrap_err();
    assert!(error.to_string().contains("1 repeats"), "{error}");
    let good: Tensor<1, Int> = ints::<1>(&[0, 1, 2, 3, 4, 5], &[6], device);
    assert!(matches!(
        crd.forward(
            student.clone(),
            student.clone(),
            good.clone(),
            negatives.narrow(1, 0, 4)
        ),
        Err(LossError::FeatureShape { what: "negatives", .. })
    ));
    assert!(matches!(
        crd.forward(
            student.clone(),
            floats::<2>(&random(&[6, 3], 11, device), &[6, 3], device),
            good,
            crd.sample_negatives(&[0, 1, 2, 3, 4, 5], 1, device)
        ),
        Err(LossError::FeatureShape {
            what: "teacher features",
            ..
        })
    ));
}

#[test]
fn masked_hidden_state_loss_equals_the_loss_of_the_kept_positions() {
    for named in devices() {
        let device = &named.device;
        let student = floats::<3>(&random(&[2, 5, 4], 12, device), &[2, 5, 4], device);
        let teacher = floats::<3>(&random(&[2, 5, 4], 13, device), &[2, 5, 4], device);
        let mask = [1i64, 1, 1, 0, 0, 1, 1, 0, 0, 0];
        let kept: Vec<usize> = mask
            .iter()
            .enumerate()
            .filter(|(_, m)| **m == 1)
            .map(|(i, _)| i)
            .collect();
        let rows = |t: Tensor<3>| {
            let flat = t.reshape([10, 4]);
            let index = ints::<1>(
                &kept.iter().map(|&i| i as i64).collect::<Vec<_>>(),
                &[kept.len()],
                device,
            );
            flat.select(0, index)
        };
        for distance in [HiddenDistance::Mse, HiddenDistance::Cosine] {
            let loss = HiddenStateLossConfig::new().with_distance(distance).init();
            let masked = loss
                .forward_masked(
                    student.clone(),
                    teacher.clone(),
                    super::bools::<2>(&mask, &[2, 5], device),
                    Reduction::BatchMean,
                )
                .unwrap();
            let kept_only = loss
                .forward(rows(student.clone()), rows(teacher.clone()), Reduction::BatchMean)
                .unwrap();
            assert_close(
                &format!("{} {distance:?}", named.name),
                &[scalar(masked)],
                &[scalar(kept_only)],
                1e-6,
                1e-7,
            );
        }
        // CKA over positions: the mask drops the same rows.
        let cka = CkaLossConfig::new().init();
        let masked = cka
            .forward_positions(
                student.clone(),
                teacher.clone(),
                Some(super::bools::<2>(&mask, &[2, 5], device)),
            )
            .unwrap();
        let kept_only = cka.forward(rows(student), rows(teacher)).unwrap();
        assert_close(
            &format!("{} CKA positions", named.name),
            &[scalar(masked)],
            &[scalar(kept_only)],
            1e-6,
            1e-7,
        );
    }
}

/// One loss of [`host_kernels_equal_the_composed_operations`]: its value on `student` (a
/// tracked tensor or not) for an implementation.
type KernelCase = Box<dyn Fn(Tensor<4>, Tensor<4>, Implementation) -> burn_distill_loss::Result<Tensor<1>>>;

#[test]
fn host_kernels_equal_the_composed_operations() {
    // Rank-4 inputs `[batch, a, b, c]` for every loss (the flat losses flatten them; the hidden
    // ones see `[batch, a, b · c]` through a reshape).
    let hidden = |distance: HiddenDistance, reduction: Reduction| -> KernelCase {
        Box::new(move |s: Tensor<4>, t: Tensor<4>, implementation| {
            let [batch, a, b, c] = s.dims();
            let device = s.device();
            let mask: Vec<bool> = (0..batch * a).map(|i| i % 3 != 1).collect();
            let mask: Tensor<2, burn::tensor::Bool> =
                Tensor::from_data(burn::tensor::TensorData::new(mask, [batch, a]), &device);
            HiddenStateLossConfig::new()
                .with_distance(distance)
                .with_implementation(implementation)
                .init()
                .forward_masked(
                    s.reshape([batch, a, b * c]),
                    t.reshape([batch, a, b * c]),
                    mask,
                    reduction,
                )
        })
    };
    let at = |p: f64, reduction: Reduction| -> KernelCase {
        Box::new(move |s, t, implementation| {
            AttentionTransferLossConfig::new()
                .with_p(p)
                .with_implementation(implementation)
                .init()
                .forward(s, t, reduction)
        })
    };
    // DIST on `[batch, classes]` logits (the input flattened).
    let dist = |config: DistLossConfig| -> KernelCase {
        Box::new(move |s, t, implementation| {
            let [batch, a, b, c] = s.dims();
            config
                .clone()
                .with_implementation(implementation)
                .init()
                .forward(s.reshape([batch, a * b * c]), t.reshape([batch, a * b * c]))
        })
    };
    let cka = |debiased: bool| -> KernelCase {
        Box::new(move |s, t, implementation| {
            CkaLossConfig::new()
                .with_debiased(debiased)
                .with_implementation(implementation)
                .init()
                .forward(s, t)
        })
    };
    // (name, loss, student shape, teacher shape, what to do to the student first)
    #[allow(clippy::type_complexity)]
    let cases: Vec<(&str, KernelCase, [usize; 4], [usize; 4], fn(&mut [f64], [usize; 4]))> = vec![
        (
            "sp, a zero example",
            Box::new(|s, t, i| SpLossConfig::new().with_implementation(i).init().forward(s, t)),
            [16, 2, 3, 4],
            [16, 5, 2, 4],
            zero_first_example,
        ),
        (
            "pkt, a zero example",
            Box::new(|s, t, i| PktLossConfig::new().with_implementation(i).init().forward(s, t)),
            [16, 2, 3, 4],
            [16, 5, 2, 4],
            zero_first_example,
        ),
        ("cka debiased", cka(true), [12, 3, 2, 5], [12, 2, 2, 5], |_, _| {}),
        ("cka biased", cka(false), [12, 3, 2, 5], [12, 2, 2, 5], |_, _| {}),
        (
            "cka, constant student",
            cka(true),
            [12, 3, 2, 5],
            [12, 2, 2, 5],
            constant_examples,
        ),
        (
            "dist τ = 4, a -inf logit",
            dist(
                DistLossConfig::new()
                    .with_beta(2.0)
                    .with_gamma(0.5)
                    .with_temperature(4.0),
            ),
            [10, 37, 1, 1],
            [10, 37, 1, 1],
            |values, _| values[3] = f64::NEG_INFINITY,
        ),
        (
            "dist, one example",
            dist(DistLossConfig::new()),
            [1, 9, 1, 1],
            [1, 9, 1, 1],
            |_, _| {},
        ),
        (
            "at p = 2, sum",
            at(2.0, Reduction::Sum),
            [6, 5, 3, 4],
            [6, 7, 3, 4],
            |_, _| {},
        ),
        (
            "at p = 3, mean",
            at(3.0, Reduction::BatchMean),
            [6, 5, 3, 4],
            [6, 7, 3, 4],
            |_, _| {},
        ),
        (
            "at p = 1, zeros",
            at(1.0, Reduction::BatchMean),
            [6, 5, 3, 4],
            [6, 7, 3, 4],
            zero_first_example,
        ),
        (
            "hidden mse, SumOver",
            hidden(HiddenDistance::Mse, Reduction::SumOver(11)),
            [3, 7, 4, 5],
            [3, 7, 4, 5],
            |_, _| {},
        ),
        (
            "hidden cosine, a zero position",
            hidden(HiddenDistance::Cosine, Reduction::ElementMean),
            [3, 7, 4, 5],
            [3, 7, 4, 5],
            zero_first_example,
        ),
    ];
    let mut host_devices = 0;
    for named in devices() {
        if !matches!(named.name, "ndarray" | "flex") {
            // Elsewhere the host kernel cannot be forced.
            let (s, t) = (
                random(&[4, 2, 2, 2], 1, &named.device),
                random(&[4, 2, 2, 2], 2, &named.device),
            );
            let forced = SpLossConfig::new()
                .with_implementation(Implementation::Fused)
                .init()
                .forward(
                    floats::<4>(&s, &[4, 2, 2, 2], &named.device),
                    floats::<4>(&t, &[4, 2, 2, 2], &named.device),
                );
            assert!(
                matches!(forced, Err(LossError::FusedUnavailable { .. })),
                "{}: {forced:?}",
                named.name
            );
            continue;
        }
        host_devices += 1;
        let autodiff = named.device.clone().autodiff();
        for (seed, (name, loss, student_shape, teacher_shape, prepare)) in cases.iter().enumerate() {
            let mut student = random(student_shape, 10 + seed as u64, &named.device);
            prepare(&mut student, *student_shape);
            let teacher = random(teacher_shape, 50 + seed as u64, &named.device);
            let run = |implementation: Implementation| {
                let s = floats::<4>(&student, student_shape, &autodiff).require_grad();
                let t = floats::<4>(&teacher, teacher_shape, &autodiff);
                let value = loss(s.clone(), t, implementation).unwrap();
                // An upstream gradient other than 1: the kernel's saved gradient is scaled.
                let grads = value.clone().mul_scalar(2.5).backward();
                let grad = s.grad(&grads).map(to_vec).unwrap_or_else(|| vec![0.0; student.len()]);
                // Without autodiff: the value alone.
                let plain = loss(
                    floats::<4>(&student, student_shape, &named.device),
                    floats::<4>(&teacher, teacher_shape, &named.device),
                    implementation,
                )
                .unwrap();
                (scalar(value), grad, scalar(plain))
            };
            let (kernel, kernel_grad, kernel_plain) = run(Implementation::Fused);
            let (composed, composed_grad, composed_plain) = run(Implementation::Composed);
            let what = format!("{} {name}", named.name);
            assert_close(&format!("{what} value"), &[kernel], &[composed], 1e-5, 1e-7);
            assert_close(
                &format!("{what} value without autodiff"),
                &[kernel_plain],
                &[composed_plain],
                1e-5,
                1e-7,
            );
            assert_close(&format!("{what} grad"), &kernel_grad, &composed_grad, 1e-4, 1e-7);
            assert!(
                kernel_grad.iter().any(|&g| g != 0.0) || name.contains("constant"),
                "{what}: a zero gradient"
            );
        }
    }
    if cfg!(any(feature = "ndarray", feature = "flex")) {
        assert!(host_devices > 0, "no CPU device ran the host kernels");
    }
}

#[test]
fn crd_bank_kernel_equals_the_composed_operations() {
    for named in devices()
        .iter()
        .filter(|named| matches!(named.name, "ndarray" | "flex"))
    {
        let device = named.device.clone().autodiff();
        let kernel = CrdLossConfig::new(8, 6, 40)
            .with_negatives(5)
            .with_embedding_width(4)
            .init(&device);
        let mut composed = kernel.clone();
        composed.implementation = Implementation::Composed;
        let indices = [0i64, 7, 13, 21];
        let negatives = kernel.sample_negatives(&indices, 3, &device);
        let indices: Tensor<1, Int> = ints(&indices, &[4], &device);
        let student_values = random(&[4, 8], 11, &device);
        let teacher_values = random(&[4, 6], 12, &device);
        let run = |loss: &CrdLoss| {
            let student = floats::<2>(&student_values, &[4, 8], &device).require_grad();
            let teacher = floats::<2>(&teacher_values, &[4, 6], &device);
            let output = loss
                .forward(student.clone(), teacher, indices.clone(), negatives.clone())
                .unwrap();
            let grads = output.loss.clone().mul_scalar(1.5).backward();
            (
                scalar(output.loss),
                to_vec(student.grad(&grads).unwrap()),
                to_vec(loss.teacher_embed.weight.grad(&grads).unwrap()),
            )
        };
        let (value, student_grad, teacher_embed_grad) = run(&kernel);
        let (expected, expected_student, expected_teacher_embed) = run(&composed);
        let what = format!("{} CRD", named.name);
        assert_close(&format!("{what} value"), &[value], &[expected], 1e-5, 1e-7);
        assert_close(
            &format!("{what} student grad"),
            &student_grad,
            &expected_student,
            1e-4,
            1e-7,
        );
        assert_close(
            &format!("{what} teacher embedding grad"),
            &teacher_embed_grad,
            &expected_teacher_embed,
            1e-4,
            1e-7,
        );
    }
}

/// Zeroes the first example (or position) of `[batch, ..]` values.
fn zero_first_example(values: &mut [f64], shape: [usize; 4]) {
    let width: usize = shape[1..].iter().product();
    values[..width].iter_mut().for_each(|v| *v = 0.0);
}

/// Makes every example equal to the first (constant features).
fn constant_examples(values: &mut [f64], shape: [usize; 4]) {
    let width: usize = shape[1..].iter().product();
    let first = values[..width].to_vec();
    for row in values.chunks_mut(width) {
        row.copy_from_slice(&first);
    }
}

#[test]
fn unchecked_nan_features_give_a_nan_loss_in_the_host_kernels() {
    // With `check_inputs` off nothing refuses a NaN; the loss must still show it, not hide it.
    for named in devices()
        .iter()
        .filter(|named| matches!(named.name, "ndarray" | "flex"))
    {
        let device = &named.device;
        let mut student = random(&[6, 10], 1, device);
        student[13] = f64::NAN;
        let teacher = random(&[6, 10], 2, device);
        let s = || floats::<2>(&student, &[6, 10], device);
        let t = || floats::<2>(&teacher, &[6, 10], device);
        let fused = Implementation::Fused;
        let values = [
            (
                "DIST",
                DistLossConfig::new()
                    .with_check_inputs(false)
                    .with_implementation(fused)
                    .init()
                    .forward(s(), t()),
            ),
            (
                "PKT",
                PktLossConfig::new()
                    .with_check_inputs(false)
                    .with_implementation(fused)
                    .init()
                    .forward(s(), t()),
            ),
            (
                "SP",
                SpLossConfig::new()
                    .with_check_inputs(false)
                    .with_implementation(fused)
                    .init()
                    .forward(s(), t()),
            ),
            (
                "CKA",
                CkaLossConfig::new()
                    .with_check_inputs(false)
                    .with_implementation(fused)
                    .init()
                    .forward(s(), t()),
            ),
            (
                "hidden MSE",
                HiddenStateLossConfig::new()
                    .with_check_inputs(false)
                    .with_implementation(fused)
                    .init()
                    .forward(s(), t(), Reduction::BatchMean),
            ),
        ];
        for (name, value) in values {
            let value = scalar(value.unwrap());
            assert!(value.is_nan(), "{} {name}: {value}", named.name);
        }
    }
}
