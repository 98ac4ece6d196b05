//! The model crate's test harness, on every device this build has.

use burn::module::{Module, ModuleVisitor, Param};
use burn::optim::{GradientsParams, SgdConfig};
use burn::tensor::{Device, Tensor, TensorData, activation};
use burn_distill_loss::{HintonKdLossConfig, NamedDevice, Reduction};
use burn_distill_model::*;
use burn_distill_testing::{devices_for_tests, serial};

#[path = "model/llama.rs"]
mod llama;

#[path = "model/hostile.rs"]
mod hostile;

fn devices() -> Vec<NamedDevice> {
    devices_for_tests()
}

/// Host-made inputs in [0, 1), identical on every device.
fn inputs(rows: usize, width: usize, seed: u32, device: &Device) -> Tensor<2> {
    let values: Vec<f32> = (0..rows * width)
        .map(|i| {
            ((i as u32)
                .wrapping_mul(2_654_435_761)
                .wrapping_add(seed.wrapping_mul(97))
                >> 8) as f32
                / (1u32 << 24) as f32
        })
        .collect();
    Tensor::from_data(TensorData::new(values, [rows, width]), device)
}

fn values<const D: usize>(tensor: Tensor<D>) -> Vec<f32> {
    tensor.into_data().iter::<f32>().collect()
}

#[test]
fn hinton_mlps_have_the_papers_sizes() {
    let _serial = serial();
    let device = &devices()[0].device;
    let teacher = MlpConfig::hinton_teacher().init(device);
    let student = MlpConfig::hinton_student().init(device);
    assert_eq!(teacher.widths(), vec![784, 1200, 1200, 10]);
    assert_eq!(student.widths(), vec![784, 800, 800, 10]);
    // Weights plus biases, layer by layer.
    let teacher_params = 784 * 1200 + 1200 + 1200 * 1200 + 1200 + 1200 * 10 + 10;
    let student_params = 784 * 800 + 800 + 800 * 800 + 800 + 800 * 10 + 10;
    assert_eq!(teacher.parameter_count(), teacher_params);
    assert_eq!(student.parameter_count(), student_params);
    // 2 FLOPs per multiply-add, 1 per bias.
    assert_eq!(
        teacher.flops_per_example(),
        (2 * teacher_params - 1200 - 1200 - 10) as u64
    );
    let compression = Compression::between(&teacher, &student);
    assert!((compression.size_ratio - teacher_params as f64 / student_params as f64).abs() < 1e-12);
    assert!(compression.size_ratio > 1.8 && compression.compute_ratio > 1.8);
}

#[test]
fn mlp_shapes_taps_and_unknown_taps() {
    let _serial = serial();
    for named in devices() {
        let device = &named.device;
        let mlp = MlpConfig::new(12, vec![7, 5], 3).init(device);
        let out = mlp.learn(inputs(4, 12, 1, device), &["hidden.1", "hidden.0"]).unwrap();
        assert_eq!(out.logits.dims(), [4, 3]);
        assert_eq!(out.features["hidden.0"].dims(), vec![4, 7]);
        assert_eq!(out.features["hidden.1"].dims(), vec![4, 5]);
        match mlp.learn(inputs(4, 12, 1, device), &["hidden.9"]) {
            Err(ModelError::UnknownTap { name, available }) => {
                assert_eq!(name, "hidden.9");
                assert_eq!(available, vec!["hidden.0".to_string(), "hidden.1".to_string()]);
            }
            other => panic!("{}: expected UnknownTap, got {other:?}", named.name),
        }
    }
}

#[test]
fn frozen_teacher_is_deterministic_and_carries_no_autodiff() {
    let _serial = serial();
    for named in devices() {
        let device = named.device.clone().autodiff();
        // Dropout on: a module in training mode gives different outputs each call.
        let model = MlpConfig::new(10, vec![32], 4).with_dropout(0.5).init(&device);
        let teacher = FrozenTeacher::new(&model);
        let input = inputs(6, 10, 2, &device);
        let first = teacher.teach(input.clone(), &["hidden.0"]).unwrap();
        let second = teacher.teach(input.clone(), &[]).unwrap();
        assert!(
            !first.logits().is_autodiff(),
            "{}: teacher logits carry autodiff",
            named.name
        );
        match &first.features()["hidden.0"] {
            Feature::Vector(t) => assert!(!t.is_autodiff()),
            other => panic!("unexpected feature {other:?}"),
        }
        assert_eq!(
            values(first.logits().clone()),
            values(second.logits().clone()),
            "{}",
            named.name
        );
        let trained_a = values(model.forward(input.clone()));
        let trained_b = values(model.forward(input));
        assert_ne!(
            trained_a, trained_b,
            "{}: dropout should be active in training mode",
            named.name
        );
    }
}

#[test]
fn teacher_parameters_are_bit_identical_after_a_student_step() {
    let _serial = serial();
    for named in devices() {
        let device = named.device.clone().autodiff();
        let teacher_model = MlpConfig::new(16, vec![24], 5).init(&device);
        let teacher = FrozenTeacher::new(&teacher_model);
        let mut student = MlpConfig::new(16, vec![8], 5).init(&device);
        let snapshot = |m: &Mlp| -> Vec<Vec<u32>> {
            let mut visitor = ParameterBits(Vec::new());
            m.visit(&mut visitor);
            visitor.0
        };
        let teacher_before = snapshot(teacher.module());
        let student_before = snapshot(&student);

        let input = inputs(8, 16, 3, &device);
        let labels = burn::tensor::Tensor::<1, burn::tensor::Int>::from_ints([0, 1, 2, 3, 4, 0, 1, 2], &device);
        let soft = teacher.teach(input.clone(), &[]).unwrap();
        let out = student.learn(input, &[]).unwrap();
        let loss = HintonKdLossConfig::new()
            .init()
            .forward(out.logits, soft.logits().clone(), labels, Reduction::BatchMean)
            .unwrap();
        let grads = GradientsParams::from_grads(loss.backward(), &student);
        let mut optimizer = SgdConfig::new().init();
        student = optimizer.step(0.5, student, grads);

        assert_eq!(
            snapshot(teacher.module()),
            teacher_before,
            "{}: the teacher changed",
            named.name
        );
        assert_ne!(
            snapshot(&student),
            student_before,
            "{}: the student did not train",
            named.name
        );
    }
}

/// Every float parameter's bits, in visiting order.
struct ParameterBits(Vec<Vec<u32>>);

impl ModuleVisitor for ParameterBits {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        self.0.push(values(param.val()).iter().map(|v| v.to_bits()).collect());
    }
}

#[test]
fn fn_teacher_wraps_any_forward() {
    let _serial = serial();
    for named in devices() {
        let device = &named.device;
        let model = MlpConfig::new(6, vec![], 3).init(device);
        let teacher = FnTeacher::new(&model, 3, |m: &Mlp, x: Tensor<2>| m.forward(x));
        let out = teacher.teach(inputs(2, 6, 4, device), &[]).unwrap();
        assert_eq!(
            values(out.logits().clone()),
            values(model.forward(inputs(2, 6, 4, device)))
        );
        assert_eq!(Teacher::<Tensor<2>, 2>::num_classes(&teacher), 3);
        assert!(matches!(
            teacher.teach(inputs(2, 6, 4, device), &["x"]),
            Err(ModelError::UnknownTap { .. })
        ));
    }
}

#[test]
fn ensemble_averages_probabilities_or_logits_and_checks_classes() {
    let _serial = serial();
    for named in devices() {
        let device = &named.device;
        let a = MlpConfig::new(5, vec![4], 3).init(device);
        let b = MlpConfig::new(5, vec![6], 3).init(device);
        let input = inputs(7, 5, 5, device);
        let (la, lb) = (a.forward(input.clone()), b.forward(input.clone()));
        let members = || -> Vec<(Box<dyn Teacher<Tensor<2>, 2>>, f64)> {
            vec![
                (Box::new(FrozenTeacher::new(&a)), 1.0),
                (Box::new(FrozenTeacher::new(&b)), 3.0),
            ]
        };

        let probabilities = Ensemble::new(members(), Combine::Probabilities).unwrap();
        assert_eq!(probabilities.weights(), vec![0.25, 0.75]);
        let got = activation::softmax(probabilities.teach(input.clone(), &[]).unwrap().into_parts().0, 1);
        let expected =
            activation::softmax(la.clone(), 1).mul_scalar(0.25) + activation::softmax(lb.clone(), 1).mul_scalar(0.75);
        for (g, e) in values(got).iter().zip(values(expected)) {
            assert!((g - e).abs() < 1e-6, "{}: {g} vs {e}", named.name);
        }

        let logits = Ensemble::new(members(), Combine::Logits).unwrap();
        let got = values(logits.teach(input.clone(), &[]).unwrap().into_parts().0);
        let expected = values(la.mul_scalar(0.25) + lb.mul_scalar(0.75));
        for (g, e) in got.iter().zip(expected) {
            assert!((g - e).abs() < 1e-5, "{}: {g} vs {e}", named.name);
        }

        let four = MlpConfig::new(5, vec![4], 4).init(device);
        let mismatched: Vec<(Box<dyn Teacher<Tensor<2>, 2>>, f64)> = vec![
            (Box::new(FrozenTeacher::new(&a)), 1.0),
            (Box::new(FrozenTeacher::new(&four)), 1.0),
        ];
        assert_eq!(
            Ensemble::new(mismatched, Combine::Probabilities).unwrap_err(),
            ModelError::ClassMismatch {
                index: 1,
                classes: 4,
                expected: 3
            }
        );
        assert!(matches!(
            Ensemble::<Tensor<2>, 2>::new(vec![], Combine::Logits),
            Err(ModelError::InvalidEnsemble { .. })
        ));
        let negative: Vec<(Box<dyn Teacher<Tensor<2>, 2>>, f64)> = vec![(Box::new(FrozenTeacher::new(&a)), -1.0)];
        assert!(matches!(
            Ensemble::new(negative, Combine::Logits),
            Err(ModelError::InvalidEnsemble { .. })
        ));
    }
}

#[test]
fn connectors_map_features_and_train() {
    let _serial = serial();
    for named in devices() {
        let device = named.device.clone().autodiff();
        let linear = ConnectorConfig::new(8, 12).init(&device);
        let vector = Feature::Vector(inputs(3, 8, 6, &device));
        match linear.forward(vector).unwrap() {
            Feature::Vector(t) => {
                assert_eq!(t.dims(), [3, 12]);
                let grads = t.sum().backward();
                let params = GradientsParams::from_grads(grads, &linear);
                assert!(!params.is_empty(), "{}: the connector got no gradient", named.name);
            }
            other => panic!("{other:?}"),
        }
        let conv = ConnectorConfig::new(4, 6)
            .with_kind(ConnectorKind::Conv1x1)
            .init(&device);
        let map = Feature::Map(inputs(2 * 4, 9, 7, &device).reshape([2, 4, 3, 3]));
        assert_eq!(conv.forward(map.clone()).unwrap().dims(), vec![2, 6, 3, 3]);
        assert!(matches!(linear.forward(map), Err(ModelError::FeatureShape { .. })));
        assert!(matches!(
            conv.forward(Feature::Vector(inputs(2, 4, 8, &device))),
            Err(ModelError::FeatureShape { .. })
        ));
        assert!(matches!(
            linear.forward(Feature::Vector(inputs(2, 9, 8, &device))),
            Err(ModelError::FeatureShape { .. })
        ));
        // An identity start passes the features through (the first channels, zero-padded to a
        // wider teacher), and still trains.
        let features = inputs(3, 8, 9, &device);
        for (teacher_width, kind) in [
            (8, ConnectorKind::Linear),
            (12, ConnectorKind::Linear),
            (6, ConnectorKind::Linear),
        ] {
            let identity = ConnectorConfig::new(8, teacher_width)
                .with_kind(kind)
                .with_identity(true)
                .init(&device);
            let Feature::Vector(mapped) = identity.forward(Feature::Vector(features.clone())).unwrap() else {
                panic!("a vector")
            };
            let kept = teacher_width.min(8);
            assert_eq!(
                values(mapped.clone().narrow(1, 0, kept)),
                values(features.clone().narrow(1, 0, kept))
            );
            if teacher_width > 8 {
                assert!(
                    values(mapped.clone().narrow(1, 8, teacher_width - 8))
                        .iter()
                        .all(|v| *v == 0.0)
                );
            }
            let params = GradientsParams::from_grads(mapped.sum().backward(), &identity);
            assert!(!params.is_empty(), "{}: an identity connector must train", named.name);
        }
        let maps = inputs(2 * 4, 9, 10, &device).reshape([2, 4, 3, 3]);
        let identity = ConnectorConfig::new(4, 4)
            .with_kind(ConnectorKind::Conv1x1)
            .with_identity(true)
            .init(&device);
        let Feature::Map(mapped) = identity.forward(Feature::Map(maps.clone())).unwrap() else {
            panic!("a map")
        };
        let (got, expected) = (values(mapped), values(maps));
        assert!(
            got.iter().zip(&expected).all(|(g, e)| (g - e).abs() <= 1e-6),
            "{}: 1x1 identity",
            named.name
        );
    }
}

#[test]
fn devices_agree_on_the_same_weights() {
    let _serial = serial();
    let devices = devices();
    let reference = MlpConfig::hinton_student().init(&devices[0].device);
    let expected = values(reference.forward(inputs(5, 784, 9, &devices[0].device)));
    for named in &devices[1..] {
        let moved = reference.clone().to_device(&named.device);
        let got = values(moved.forward(inputs(5, 784, 9, &named.device)));
        let scale = expected.iter().fold(0.0f32, |m, v| m.max(v.abs()));
        for (g, e) in got.iter().zip(&expected) {
            assert!((g - e).abs() <= 1e-5 * scale.max(1.0), "{}: {g} vs {e}", named.name);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Weights

fn fixture(name: &str) -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures/models")
        .join(name)
}

fn scratch_dir(name: &str) -> std::path::PathBuf {
    burn_distill_testing::scratch(&format!("model-{name}"))
}

#[test]
fn saved_models_load_back_identically_on_every_device() {
    let _serial = serial();
    let dir = scratch_dir("roundtrip");
    let devices = devices();
    let source = &devices[0].device;
    let model = MlpConfig::new(20, vec![9, 7], 4).init(source);
    let expected = values(model.forward(inputs(3, 20, 10, source)));
    for file in ["mlp.bpk", "mlp.safetensors"] {
        let path = dir.join(file);
        save_weights(&model, &path).unwrap();
        // Saving again replaces the file and leaves no temporary behind.
        save_weights(&model, &path).unwrap();
        let leftovers: Vec<_> = std::fs::read_dir(&dir)
            .unwrap()
            .filter_map(|e| e.ok())
            .filter(|e| e.file_name().to_string_lossy().contains(".tmp-"))
            .collect();
        assert!(leftovers.is_empty(), "temporary files left: {leftovers:?}");
        for named in &devices {
            let fresh = MlpConfig::new(20, vec![9, 7], 4).init(&named.device);
            let loaded = load_weights(fresh, &path).unwrap();
            let got = values(loaded.forward(inputs(3, 20, 10, &named.device)));
            for (g, e) in got.iter().zip(&expected) {
                assert!(
                    (g - e).abs() <= 1e-5 * e.abs().max(1.0),
                    "{file} on {}: {g} vs {e}",
                    named.name
                );
            }
            if named.name == devices[0].name {
                assert_eq!(got, expected, "{file}: same device must give the very same numbers");
            }
        }
    }
    std::fs::remove_dir_all(dir).unwrap();
}

#[derive(serde::Deserialize)]
struct TorchReference {
    widths: Vec<usize>,
    classes: usize,
    input: Vec<f32>,
    input_shape: Vec<usize>,
    output: Vec<f32>,
}

fn torch_reference() -> TorchReference {
    serde_json::from_str(&std::fs::read_to_string(fixture("mlp.json")).unwrap()).unwrap()
}

#[test]
fn pytorch_teachers_import_and_match_pytorch_outputs() {
    let _serial = serial();
    let reference = torch_reference();
    for named in devices() {
        let device = &named.device;
        let architecture =
            || MlpConfig::new(reference.widths[0], reference.widths[1..].to_vec(), reference.classes).init(device);
        let input = Tensor::<2>::from_data(
            TensorData::new(reference.input.clone(), reference.input_shape.clone()),
            device,
        );
        let direct = import_pytorch_safetensors(architecture(), fixture("mlp.safetensors"), &[]).unwrap();
        let remapped = import_pytorch_safetensors(
            architecture(),
            fixture("mlp_sequential.safetensors"),
            &[(r"^0\.", "hidden.0."), (r"^2\.", "hidden.1."), (r"^4\.", "output.")],
        )
        .unwrap();
        for (what, model) in [("direct", direct), ("remapped", remapped)] {
            let got = values(model.forward(input.clone()));
            for (g, e) in got.iter().zip(&reference.output) {
                assert!(
                    (g - e).abs() <= 1e-5 * e.abs().max(1.0),
                    "{what} on {}: {g} vs {e}",
                    named.name
                );
            }
        }
    }
}

#[test]
fn weight_files_that_do_not_fit_are_refused_by_name() {
    let _serial = serial();
    let device = &devices()[0].device;
    let wrong_width = MlpConfig::new(12, vec![16, 9], 5).init(device);
    match import_pytorch_safetensors(wrong_width, fixture("mlp.safetensors"), &[]) {
        Err(ModelError::WeightShape {
            key, expected, found, ..
        }) => {
            assert!(key.starts_with("hidden.1.") || key.starts_with("output."), "{key}");
            assert_ne!(expected, found);
            if key == "hidden.1.weight" {
                assert_eq!((expected, found), (vec![16, 9], vec![16, 8]));
            }
        }
        other => panic!("expected WeightShape, got {other:?}"),
    }
    let unmapped = MlpConfig::new(12, vec![16, 8], 5).init(device);
    match import_pytorch_safetensors(unmapped, fixture("mlp_sequential.safetensors"), &[]) {
        Err(ModelError::MissingWeights { missing, unused, .. }) => {
            assert!(missing.contains(&"hidden.0.weight".to_string()), "{missing:?}");
            assert!(unused.contains(&"0.weight".to_string()), "{unused:?}");
        }
        other => panic!("expected MissingWeights, got {other:?}"),
    }
    let absent = MlpConfig::new(12, vec![16, 8], 5).init(device);
    assert!(matches!(
        load_weights(absent, fixture("no-such-file.bpk")),
        Err(ModelError::WeightFile { .. })
    ));
    let model = MlpConfig::new(12, vec![16, 8], 5).init(device);
    assert!(matches!(
        save_weights(&model, scratch_dir("ext").join("model.pt")),
        Err(ModelError::WeightFile { .. })
    ));
}

// ---------------------------------------------------------------------------------------------
// LeNet

#[test]
fn lenet_shapes_taps_cost_and_gradients() {
    let _serial = serial();
    for named in devices() {
        let device = named.device.clone().autodiff();
        let net = LeNetConfig::new().init(&device);
        let images = inputs(3, 28 * 28, 11, &device).reshape([3, 1, 28, 28]);
        let out = net.learn(images, &["conv.0", "conv.1", "hidden.1"]).unwrap();
        assert_eq!(out.logits.dims(), [3, 10]);
        assert_eq!(out.features["conv.0"].dims(), vec![3, 6, 28, 28]);
        assert_eq!(out.features["conv.1"].dims(), vec![3, 16, 10, 10]);
        assert_eq!(out.features["hidden.1"].dims(), vec![3, 84]);
        let grads = GradientsParams::from_grads(out.logits.sum().backward(), &net);
        assert!(
            !grads.is_empty(),
            "{}: no gradient reached the convolutions",
            named.name
        );
    }
    let device = &devices()[0].device;
    let net = LeNetConfig::new().init(device);
    // LeNet-5 on 28×28 with padding 2: conv 1→6 (5×5), conv 6→16, 400→120→84→10.
    let params = (6 * 25 + 6) + (16 * 6 * 25 + 16) + (400 * 120 + 120) + (120 * 84 + 84) + (84 * 10 + 10);
    assert_eq!(net.parameter_count(), params);
    let flops = 28 * 28 * 6 * (2 * 25 + 1)
        + 10 * 10 * 16 * (2 * 150 + 1)
        + (2 * 400 * 120 + 120)
        + (2 * 120 * 84 + 84)
        + (2 * 84 * 10 + 10);
    assert_eq!(net.flops_per_example(), flops as u64);
    // Other sizes and channel counts by config.
    let rgb = LeNetConfig::new()
        .with_input_channels(3)
        .with_image_size(32)
        .with_first_padding(0)
        .with_classes(7)
        .init(device);
    assert_eq!(
        rgb.forward(inputs(2, 3 * 32 * 32, 12, device).reshape([2, 3, 32, 32]))
            .dims(),
        [2, 7]
    );
    // Flat image batches (as `ImageBatch` holds them) are the same images, reshaped.
    let flat = inputs(2, 3 * 32 * 32, 12, device);
    let from_flat = Student::<Tensor<2>, 2>::learn(&rgb, flat.clone(), &["conv.1"]).unwrap();
    let from_maps = Student::<Tensor<4>, 2>::learn(&rgb, flat.reshape([2, 3, 32, 32]), &["conv.1"]).unwrap();
    assert_eq!(
        from_flat.logits.into_data().iter::<f32>().collect::<Vec<_>>(),
        from_maps.logits.into_data().iter::<f32>().collect::<Vec<_>>()
    );
    assert_eq!(from_flat.features["conv.1"].dims(), vec![2, 16, 10, 10]);
    let odd = inputs(2, 3 * 30 * 31, 13, device);
    let wrong = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        Student::<Tensor<2>, 2>::learn(&rgb, odd, &[])
    }))
    .map(|_| ())
    .unwrap_err();
    let message = wrong.downcast_ref::<String>().cloned().unwrap_or_default();
    assert!(message.contains("not 3 square channel(s)"), "{message}");
}

// ---------------------------------------------------------------------------------------------
// Transformer language model and sampling

fn tokens(rows: &[&[i64]], device: &Device) -> Tensor<2, burn::tensor::Int> {
    let width = rows[0].len();
    let flat: Vec<i64> = rows.iter().flat_map(|r| r.iter().copied()).collect();
    Tensor::from_data(TensorData::new(flat, [rows.len(), width]), device)
}

#[test]
fn transformer_lm_is_causal_and_sized_by_config() {
    let _serial = serial();
    for named in devices() {
        let device = &named.device;
        let lm = TransformerLmConfig::new(50, 16)
            .with_width(32)
            .with_heads(4)
            .init(device);
        let a = tokens(&[&[1, 2, 3, 4, 5, 6], &[7, 8, 9, 10, 11, 12]], device);
        let b = tokens(&[&[1, 2, 3, 40, 41, 42], &[7, 8, 9, 10, 11, 49]], device);
        let out = lm.learn(a.clone(), &["hidden"]).unwrap();
        assert_eq!(out.logits.dims(), [2, 6, 50]);
        assert_eq!(out.features["hidden"].dims(), vec![2, 6, 32]);
        // Changing tokens from position 3 on leaves the logits of positions 0..3 unchanged.
        let (la, lb) = (lm.forward(a), lm.forward(b));
        let early = |t: Tensor<3>| values(t.slice([0..2, 0..3, 0..50]));
        for (x, y) in early(la.clone()).iter().zip(early(lb.clone())) {
            assert!(
                (x - y).abs() <= 1e-5 * x.abs().max(1.0),
                "{}: attention is not causal",
                named.name
            );
        }
        assert_ne!(
            values(la.slice([0..1, 3..6, 0..50])),
            values(lb.slice([0..1, 3..6, 0..50]))
        );
    }
    let device = &devices()[0].device;
    let tied = TransformerLmConfig::new(50, 16).with_width(32).init(device);
    let untied = TransformerLmConfig::new(50, 16)
        .with_width(32)
        .with_tied_head(false)
        .init(device);
    assert_eq!(untied.parameter_count() - tied.parameter_count(), 50 * 32);
    let (w, v, n, layers) = (32u64, 50u64, 16u64, 2u64);
    assert_eq!(
        tied.flops_per_example(),
        n * (layers * (8 * w * w + 4 * n * w + 16 * w * w) + 2 * w * v)
    );
}

#[test]
fn generation_is_reproducible_under_a_seed_and_greedy_follows_the_logits() {
    let _serial = serial();
    for named in devices() {
        let device = &named.device;
        // Seeded, and with its own head: a tied head at initialisation scores the last token
        // about |e|² = width above the rest, so it repeats that token with near certainty and
        // every seed can draw the same stream (seen once in CI with an unseeded model).
        let lm = init_seeded(3, device, |d| {
            TransformerLmConfig::new(40, 8)
                .with_width(16)
                .with_heads(2)
                .with_tied_head(false)
                .init(d)
        });
        let prompt = tokens(&[&[3, 1, 4], &[1, 5, 9]], device);
        let sampling = SamplingConfig::new()
            .with_temperature(1.5)
            .with_top_k(Some(20))
            .with_seed(7);
        let first: Vec<i64> = lm
            .generate(prompt.clone(), 10, &sampling)
            .into_data()
            .iter::<i64>()
            .collect();
        let again: Vec<i64> = lm
            .generate(prompt.clone(), 10, &sampling)
            .into_data()
            .iter::<i64>()
            .collect();
        assert_eq!(first, again, "{}: same seed, different text", named.name);
        assert_eq!(first.len(), 2 * 13);
        assert_eq!(&first[..3], &[3, 1, 4]);
        // One other seed could draw the same 20 tokens by chance; five cannot all, unless the
        // model is near-deterministic, which this guards against.
        // The logits for the first new token, used here and by the greedy check below.
        let next_logits = lm.forward(prompt.clone()).slice([0..2, 2..3, 0..40]);
        let last: Vec<f32> = next_logits.clone().into_data().iter::<f32>().collect();
        for row in last.chunks(40) {
            let top = sampling_distribution(row, &sampling).into_iter().fold(0.0, f64::max);
            assert!(
                top < 0.5,
                "{}: a peaked model ({top}) makes the seed check weak",
                named.name
            );
        }
        let changed = (8..13).any(|seed| {
            let other: Vec<i64> = lm
                .generate(prompt.clone(), 10, &sampling.clone().with_seed(seed))
                .into_data()
                .iter::<i64>()
                .collect();
            other != first
        });
        assert!(changed, "{}: the seed does not change the stream", named.name);
        // Greedy: each new token is the arg max of the model's logits at the previous position
        // (checked for the first one), and the context window slides past 8 tokens.
        let greedy = lm.generate(prompt.clone(), 9, &SamplingConfig::new().with_temperature(0.0));
        assert_eq!(greedy.dims(), [2, 12]);
        let expected: Vec<i64> = next_logits.argmax(2).into_data().iter::<i64>().collect();
        let produced: Vec<i64> = greedy.slice([0..2, 3..4]).into_data().iter::<i64>().collect();
        assert_eq!(produced, expected, "{}", named.name);
    }
}

#[test]
fn sampling_distribution_applies_temperature_top_k_and_top_p() {
    let _serial = serial();
    let logits = [2.0f32, 1.0, 0.0, -1.0, 3.0];
    let softmax = |t: f64| -> Vec<f64> {
        let e: Vec<f64> = logits.iter().map(|&l| (f64::from(l) / t).exp()).collect();
        let s: f64 = e.iter().sum();
        e.iter().map(|x| x / s).collect()
    };
    let plain = sampling_distribution(&logits, &SamplingConfig::new());
    for (p, q) in plain.iter().zip(softmax(1.0)) {
        assert!((p - q).abs() < 1e-12);
    }
    let hot = sampling_distribution(&logits, &SamplingConfig::new().with_temperature(2.0));
    for (p, q) in hot.iter().zip(softmax(2.0)) {
        assert!((p - q).abs() < 1e-12);
    }
    let top2 = sampling_distribution(&logits, &SamplingConfig::new().with_top_k(Some(2)));
    let z = 3f64.exp() + 2f64.exp();
    assert!((top2[4] - 3f64.exp() / z).abs() < 1e-12 && (top2[0] - 2f64.exp() / z).abs() < 1e-12);
    assert_eq!(top2[1] + top2[2] + top2[3], 0.0);
    // Nucleus: the smallest prefix reaching p. Token 4 alone has ~0.64, so p = 0.6 keeps it only.
    let nucleus = sampling_distribution(&logits, &SamplingConfig::new().with_top_p(Some(0.6)));
    assert_eq!(nucleus, vec![0.0, 0.0, 0.0, 0.0, 1.0]);
    // Tokens 4 and 0 together have ~0.87: p = 0.85 keeps exactly those two, renormalised.
    let nucleus = sampling_distribution(&logits, &SamplingConfig::new().with_top_p(Some(0.85)));
    assert!((nucleus[4] - 3f64.exp() / z).abs() < 1e-12 && (nucleus[0] - 2f64.exp() / z).abs() < 1e-12);
    assert_eq!(nucleus[1] + nucleus[2] + nucleus[3], 0.0);
    let greedy = sampling_distribution(&logits, &SamplingConfig::new().with_temperature(0.0));
    assert_eq!(greedy, vec![0.0, 0.0, 0.0, 0.0, 1.0]);
    // Draw frequencies follow the distribution.
    let config = SamplingConfig::new().with_temperature(1.0);
    let mut rng = TokenRng::new(42);
    let mut counts = [0usize; 5];
    let draws = 20_000;
    for _ in 0..draws {
        counts[sample_token(&logits, &config, &mut rng)] += 1;
    }
    for (count, p) in counts.iter().zip(softmax(1.0)) {
        let expected = p * draws as f64;
        let sigma = (expected * (1.0 - p)).sqrt();
        assert!((*count as f64 - expected).abs() < 5.0 * sigma + 1.0, "{counts:?}");
    }
}

#[derive(serde::Deserialize)]
struct LmReference {
    config: LmShape,
    tokens: Vec<i64>,
    tokens_shape: Vec<usize>,
    logits: Vec<f32>,
}

#[derive(serde::Deserialize)]
struct LmShape {
    vocab: usize,
    context: usize,
    layers: usize,
    heads: usize,
    width: usize,
    ratio: usize,
}

#[test]
fn pytorch_transformer_lm_imports_and_matches_pytorch_logits() {
    let _serial = serial();
    let reference: LmReference = serde_json::from_str(&std::fs::read_to_string(fixture("lm.json")).unwrap()).unwrap();
    let c = &reference.config;
    for named in devices() {
        let device = &named.device;
        let architecture = TransformerLmConfig::new(c.vocab, c.context)
            .with_layers(c.layers)
            .with_heads(c.heads)
            .with_width(c.width)
            .with_mlp_ratio(c.ratio)
            .init(device);
        let lm = import_pytorch_safetensors(architecture, fixture("lm.safetensors"), &[]).unwrap();
        let input = Tensor::<2, burn::tensor::Int>::from_data(
            TensorData::new(reference.tokens.clone(), reference.tokens_shape.clone()),
            device,
        );
        let got = values(lm.forward(input));
        assert_eq!(got.len(), reference.logits.len());
        let scale = reference.logits.iter().fold(0.0f32, |m, v| m.max(v.abs()));
        for (g, e) in got.iter().zip(&reference.logits) {
            assert!((g - e).abs() <= 1e-4 * scale, "{}: {g} vs {e}", named.name);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Every reference model: seeded initialisation and save/load round trips on every device

fn parameter_bits<M: Module>(model: &M) -> Vec<Vec<u32>> {
    let mut visitor = ParameterBits(Vec::new());
    model.visit(&mut visitor);
    visitor.0
}

#[test]
fn reference_models_initialise_deterministically_under_a_seed() {
    let _serial = serial();
    let devices = devices();
    let seeded = |seed: u64, device: &Device| {
        (
            parameter_bits(&init_seeded(seed, device, |d| MlpConfig::new(6, vec![5], 3).init(d))),
            parameter_bits(&init_seeded(seed, device, |d| {
                LeNetConfig::new()
                    .with_image_size(12)
                    .with_first_padding(0)
                    .with_channels(vec![2])
                    .init(d)
            })),
            parameter_bits(&init_seeded(seed, device, |d| {
                TransformerLmConfig::new(11, 4).with_width(8).with_heads(2).init(d)
            })),
        )
    };
    let reference = seeded(5, &devices[0].device);
    for named in &devices {
        for device in [named.device.clone(), named.device.clone().autodiff()] {
            // The same seed gives the same weights, on this device and on every other.
            assert_eq!(
                seeded(5, &device),
                reference,
                "{}: same seed, different weights",
                named.name
            );
            assert_ne!(
                seeded(6, &device),
                reference,
                "{}: the seed does not reach initialisation",
                named.name
            );
        }
    }
    let trained = init_seeded(5, &devices[0].device.clone().autodiff(), |d| {
        MlpConfig::new(6, vec![5], 3).init(d)
    });
    let out = trained.forward(inputs(2, 6, 1, &devices[0].device.clone().autodiff()));
    let grads = GradientsParams::from_grads(out.sum().backward(), &trained);
    assert!(!grads.is_empty(), "a seeded model on an autodiff device must train");
}

#[test]
fn every_reference_model_round_trips_through_both_formats() {
    let _serial = serial();
    let dir = scratch_dir("models");
    for named in devices() {
        let device = &named.device;
        let lenet_config = LeNetConfig::new()
            .with_image_size(16)
            .with_first_padding(0)
            .with_channels(vec![3]);
        let lenet = lenet_config.init(device);
        let lm_config = TransformerLmConfig::new(13, 6)
            .with_width(8)
            .with_heads(2)
            .with_tied_head(false);
        let lm = lm_config.init(device);
        let images = inputs(2, 16 * 16, 13, device).reshape([2, 1, 16, 16]);
        let ids = tokens(&[&[1, 2, 3, 4], &[5, 6, 7, 8]], device);
        for file in ["model.bpk", "model.safetensors"] {
            let path = dir.join(format!("{}-lenet-{file}", named.name));
            save_weights(&lenet, &path).unwrap();
            let loaded = load_weights(lenet_config.init(device), &path).unwrap();
            assert_eq!(
                values(loaded.forward(images.clone())),
                values(lenet.forward(images.clone())),
                "{} {file}",
                named.name
            );
            // Connectors are modules too: they are saved and loaded like the student they serve.
            let connector_config = ConnectorConfig::new(4, 6).with_kind(ConnectorKind::Conv1x1);
            let connector = connector_config.init(device);
            let path = dir.join(format!("{}-connector-{file}", named.name));
            save_weights(&connector, &path).unwrap();
            let loaded = load_weights(connector_config.init(device), &path).unwrap();
            let map = || Feature::Map(inputs(8, 9, 14, device).reshape([2, 4, 3, 3]));
            let (Feature::Map(a), Feature::Map(b)) =
                (loaded.forward(map()).unwrap(), connector.forward(map()).unwrap())
            else {
                panic!("a 1x1 connector maps maps to maps")
            };
            assert_eq!(values(a), values(b), "{} {file} connector", named.name);
            let path = dir.join(format!("{}-lm-{file}", named.name));
            save_weights(&lm, &path).unwrap();
            let loaded = load_weights(lm_config.init(device), &path).unwrap();
            assert_eq!(
                values(loaded.forward(ids.clone())),
                values(lm.forward(ids.clone())),
                "{} {file}",
                named.name
            );
        }
    }
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn greedy_sampling_takes_the_token_the_distribution_gives_probability_one() {
    let greedy = SamplingConfig::new().with_temperature(0.0);
    for logits in [
        vec![1.0, 3.0, 3.0, f32::NEG_INFINITY],
        vec![-2.0, -1.0, -1.5],
        vec![0.5; 7],
        (0..1000).map(|i| ((i * 7919) % 1009) as f32 * 0.01).collect(),
    ] {
        let distribution = sampling_distribution(&logits, &greedy);
        let expected = distribution.iter().position(|&p| p == 1.0).unwrap();
        let mut rng = TokenRng::new(5);
        assert_eq!(sample_token(&logits, &greedy, &mut rng), expected, "{logits:?}");
        // One draw taken, as on the sampling path.
        let mut reference = TokenRng::new(5);
        reference.next_unit();
        assert_eq!(rng.next_unit(), reference.next_unit());
    }
}

#[test]
fn files_are_replaced_whole_or_not_at_all() {
    use burn_distill_model::files::{save_atomically, write_atomically};
    use std::io::Write;
    let dir = tempfile::tempdir().unwrap();
    let entries = || {
        let mut names: Vec<String> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|entry| entry.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    };
    let path = dir.path().join("notes.txt");
    write_atomically(&path, |file| file.write_all(b"first")).unwrap();
    assert_eq!(std::fs::read(&path).unwrap(), b"first");
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o644, "readable by all, not private like a temporary file");
    }

    // A write that fails half way leaves the old file and nothing else.
    let failed = write_atomically(&path, |file| {
        file.write_all(b"half")?;
        Err(std::io::Error::other("disk full"))
    });
    assert_eq!(failed.unwrap_err().to_string(), "disk full");
    assert_eq!(std::fs::read(&path).unwrap(), b"first");
    assert_eq!(entries(), ["notes.txt"]);

    // A writer that takes a path, even one that replaces the file there, and sees the extension.
    let png = dir.path().join("plot.png");
    save_atomically(
        &png,
        |temporary| {
            assert_eq!(temporary.extension().unwrap(), "png");
            assert_eq!(temporary.parent(), Some(dir.path()));
            std::fs::remove_file(temporary)?;
            std::fs::write(temporary, b"pixels")
        },
        |error| error,
    )
    .unwrap();
    assert_eq!(std::fs::read(&png).unwrap(), b"pixels");
    let refused = save_atomically(
        &png,
        |temporary| {
            std::fs::write(temporary, b"junk").map_err(|_| "io")?;
            Err("bad plot")
        },
        |_| "io",
    );
    assert_eq!(refused, Err("bad plot"));
    assert_eq!(std::fs::read(&png).unwrap(), b"pixels");
    assert_eq!(entries(), ["notes.txt", "plot.png"]);

    // A directory that does not exist is an error, before anything is written.
    let missing = dir.path().join("absent").join("x.txt");
    assert!(write_atomically(&missing, |file| file.write_all(b"x")).is_err());
}
