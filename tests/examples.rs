//! The facade crate's test harness: the MNIST example's whole pipeline in a tiny configuration
//! (a few hundred examples, one epoch). The accuracy claims live in the example's results, not
//! here.

#[path = "../examples/mnist/pipeline.rs"]
#[allow(dead_code)]
mod pipeline;

#[test]
fn the_mnist_pipeline_runs_end_to_end_and_writes_its_outputs() {
    let device = burn_distill::loss::available_devices().remove(0);
    let run_dir = std::env::temp_dir().join(format!("burn-distill-mnist-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&run_dir);
    let options = pipeline::Options {
        device: device.name.to_string(),
        run_dir: run_dir.clone(),
        train_examples: Some(300),
        test_examples: Some(200),
        teacher_epochs: 1,
        student_epochs: 1,
        use_cache: true,
        omit_digit: Some(3),
        progress: false,
        batch_size: 64,
        ..pipeline::Options::quick()
    };
    let summary = pipeline::run(&options).unwrap();
    assert_eq!((summary.test_examples, summary.epochs), (200, 1));
    let labels = burn_distill::data::MnistDataset::load_default(burn_distill::data::MnistSplit::Train)
        .unwrap()
        .labels()[..300]
        .to_vec();
    let threes = labels.iter().filter(|&&label| label == 3).count();
    assert_eq!(summary.train_examples, 300 - threes, "the transfer set has no 3s");
    assert!(summary.teacher_test_errors <= 200 && summary.student_distilled_test_errors <= 200);
    let omitted = summary.omitted_digit.as_ref().unwrap();
    assert!(omitted.digit_errors_after <= omitted.digit_test_examples);

    let written: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(run_dir.join("summary-without-3.json")).unwrap()).unwrap();
    for key in [
        "teacher_test_errors",
        "student_alone_test_errors",
        "student_distilled_test_errors",
        "epochs",
        "device",
        "temperature",
        "alpha",
        "seconds",
    ] {
        assert!(!written[key].is_null(), "summary.json lacks {key}");
    }
    for phase in [
        "teacher",
        "student-alone-without-3",
        "student-distilled-without-3-cached",
    ] {
        let metrics = std::fs::read_to_string(run_dir.join(phase).join("metrics.jsonl")).unwrap();
        let record: serde_json::Value = serde_json::from_str(metrics.lines().next().unwrap()).unwrap();
        assert_eq!(record["epoch"], 1, "{phase}");
    }
    let png = std::fs::read(run_dir.join("test-errors-without-3.png")).unwrap();
    assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n");
    assert!(run_dir.join("teacher-outputs-without-3.bdkd").is_file());

    // A second run finds every model finished and loads it instead of training.
    let again = pipeline::run(&options).unwrap();
    assert_eq!(again.seconds.teacher, 0.0);
    assert_eq!(
        again.student_distilled_test_errors,
        summary.student_distilled_test_errors
    );
}
