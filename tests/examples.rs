//! The facade crate's test harness: the MNIST, language-model and chat-distillation examples'
//! whole pipelines in tiny configurations (a few hundred examples, one epoch). The quality claims live in the
//! examples' results, not here.

#[path = "../examples/mnist/pipeline.rs"]
#[allow(dead_code)]
mod pipeline;

#[path = "../examples/lm/pipeline.rs"]
#[allow(dead_code)]
mod lm_pipeline;

#[path = "../examples/distill_chat/pipeline.rs"]
#[allow(dead_code)]
mod chat_pipeline;

#[path = "../examples/common/runs.rs"]
mod runs;

// The CPU backends' random streams are process-wide: the two pipelines run one at a time, so
// neither draws from (or reseeds) the other's stream and each run is reproducible.
use burn_distill_testing::serial;

#[test]
fn the_mnist_pipeline_runs_end_to_end_and_writes_its_outputs() {
    let _serial = serial();
    let device = burn_distill::loss::available_devices().remove(0);
    let run_dir = burn_distill_testing::scratch("mnist");
    let options = pipeline::Options {
        device: device.name.to_string(),
        run_dir: run_dir.clone(),
        train_examples: Some(300),
        test_examples: Some(200),
        teacher_epochs: 1,
        student_epochs: 1,
        use_cache: true,
        distill_jitter: false,
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
    assert!(
        summary.seconds.teacher > 0.0 && summary.seconds.student_alone > 0.0 && summary.seconds.student_distilled > 0.0
    );
    // A damaged cache is rebuilt, and that is said on stderr and logged in the run's
    // warnings.log.
    let cache = run_dir.join("teacher-outputs-without-3.bdkd");
    let mut bytes = std::fs::read(&cache).unwrap();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0x40;
    std::fs::write(&cache, bytes).unwrap();
    assert!(!run_dir.join("warnings.log").exists());
    let again = pipeline::run(&options).unwrap();
    let log = std::fs::read_to_string(run_dir.join("warnings.log")).unwrap();
    assert!(
        log.contains("rebuilt the teacher cache") && log.contains("teacher-outputs-without-3.bdkd"),
        "{log}"
    );
    burn_distill::data::TeacherCache::open(&cache).unwrap();
    // The phase times are the recorded ones (a retrained phase would not repeat them exactly).
    assert_eq!(
        (
            again.seconds.teacher,
            again.seconds.student_alone,
            again.seconds.student_distilled
        ),
        (
            summary.seconds.teacher,
            summary.seconds.student_alone,
            summary.seconds.student_distilled
        )
    );
    assert_eq!(
        again.student_distilled_test_errors,
        summary.student_distilled_test_errors
    );

    // --student-seed: the same teacher (loaded, not retrained), both students from another seed.
    let reseeded_dir = run_dir.with_extension("student-seed");
    let _ = std::fs::remove_dir_all(&reseeded_dir);
    copy_dir(&run_dir.join("teacher"), &reseeded_dir.join("teacher"));
    let reseeded = pipeline::run(&pipeline::Options {
        run_dir: reseeded_dir.clone(),
        student_seed: Some(5),
        ..options.clone()
    })
    .unwrap();
    assert_eq!(reseeded.seconds.teacher, summary.seconds.teacher);
    assert_eq!((reseeded.seed, reseeded.student_seed), (options.seed, 5));
    for phase in ["student-alone-without-3", "student-distilled-without-3-cached"] {
        let config: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(reseeded_dir.join(phase).join("config.json")).unwrap())
                .unwrap();
        assert_eq!(config["seed"], 5, "{phase}");
    }
    let _ = std::fs::remove_dir_all(&reseeded_dir);

    // --student-dropout: both students trained again, in directories of their own.
    let dropped = pipeline::Options {
        student_dropout: 0.5,
        ..options.clone()
    };
    let summary = pipeline::run(&dropped).unwrap();
    assert_eq!(summary.student_dropout, 0.5);
    for phase in [
        "student-alone-without-3-dropout0.5",
        "student-distilled-without-3-dropout0.5-cached",
    ] {
        assert!(run_dir.join(phase).join("final.bpk").is_file(), "{phase}");
    }
    let error = pipeline::run(&pipeline::Options {
        student_dropout: 1.0,
        ..options.clone()
    })
    .unwrap_err();
    assert!(error.to_string().contains("dropout"), "{error}");

    // The diagnostics: a teacher without jitter, and a hint term (which needs the live teacher).
    let hinted = pipeline::Options {
        teacher_jitter: false,
        hint_weight: 1.0,
        ..options.clone()
    };
    let error = pipeline::run(&hinted).unwrap_err();
    assert!(error.to_string().contains("--hint"), "{error}");
    let hinted = pipeline::Options {
        use_cache: false,
        eval_train: true,
        ..hinted
    };
    let summary = pipeline::run(&hinted).unwrap();
    assert!(!summary.teacher_jitter && summary.hint_weight == 1.0);
    let metrics = std::fs::read_to_string(
        run_dir
            .join("student-distilled-without-3-from-plain-teacher-hint")
            .join("metrics.jsonl"),
    )
    .unwrap();
    let record: serde_json::Value = serde_json::from_str(metrics.lines().next().unwrap()).unwrap();
    assert!(record["train"]["feature_loss"].as_f64().unwrap() > 0.0, "{record}");
    // --eval-train: the test set first, then as many transfer-set images, with the teacher's KL.
    let eval = record["eval"].as_array().unwrap();
    assert_eq!(
        (eval[0][0].as_str(), eval[1][0].as_str()),
        (Some("test"), Some("train")),
        "{record}"
    );
    assert_eq!(eval[1][1]["examples"].as_u64(), Some(200), "{record}");
    assert!(eval[1][1]["teacher_kl"].as_f64().unwrap() >= 0.0, "{record}");
    assert!(run_dir.join("teacher-plain").join("final.bpk").is_file());

    // A finished distilled student made from another teacher is refused, not loaded: the
    // students' directories copied next to a teacher trained differently (their configs match).
    let other_dir = run_dir.with_extension("other-teacher");
    let _ = std::fs::remove_dir_all(&other_dir);
    for phase in ["student-alone-without-3", "student-distilled-without-3-cached"] {
        copy_dir(&run_dir.join(phase), &other_dir.join(phase));
    }
    let other = pipeline::Options {
        run_dir: other_dir.clone(),
        teacher_epochs: 2,
        teacher_max_norm: Some(2.0),
        ..options.clone()
    };
    let error = pipeline::run(&other).unwrap_err();
    assert!(error.to_string().contains("another teacher"), "{error}");
    // That teacher trained under --teacher-max-norm: its hidden layers only.
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(other_dir.join("teacher").join("config.json")).unwrap()).unwrap();
    assert_eq!(
        config["max_norm"],
        serde_json::json!({"max_norm": 2.0, "modules": ["hidden"]}),
        "{config}"
    );
    let _ = std::fs::remove_dir_all(&other_dir);
}

fn copy_dir(from: &std::path::Path, to: &std::path::Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), target).unwrap();
        }
    }
}

#[test]
fn the_lm_pipeline_runs_every_objective_end_to_end_and_loads_finished_models() {
    let _serial = serial();
    let device = burn_distill::loss::available_devices().remove(0);
    let run_dir = burn_distill_testing::scratch("lm");
    let shape = |layers, width| lm_pipeline::Shape {
        layers,
        width,
        heads: 2,
    };
    let options = lm_pipeline::Options {
        device: device.name.to_string(),
        run_dir: run_dir.clone(),
        context: 24,
        teacher: shape(1, 32),
        student: shape(1, 16),
        train_windows: 48,
        valid_windows: 16,
        teacher_epochs: 1,
        student_epochs: 1,
        batch_size: 16,
        transcripts: 24,
        prompt_tokens: 8,
        lambda: 1.0,
        top_k: vec![4],
        progress: false,
        ..lm_pipeline::Options::quick()
    };
    let summary = lm_pipeline::run(&options).unwrap();
    let names: Vec<&str> = summary.students.iter().map(|s| s.name.as_str()).collect();
    assert_eq!(
        names,
        [
            "student-alone",
            "kd-forward-kl",
            "kd-reverse-kl",
            "kd-gjsd-0.5",
            "kd-skew-kl-0.1",
            "kd-skew-reverse-kl-0.1",
            "kd-tvd",
            "seq-kd",
            "gkd",
            "kd-top4-cache"
        ]
    );
    for result in std::iter::once(&summary.teacher).chain(&summary.students) {
        assert!(
            result.valid_loss.is_finite() && result.valid_perplexity > 1.0,
            "{}: {result:?}",
            result.name
        );
        assert!(
            (result.bits_per_byte - result.valid_loss / std::f64::consts::LN_2).abs() < 1e-12,
            "{}",
            result.name
        );
        // 48 windows (24 transcripts for seq-kd) in batches of 16.
        let steps = if result.name == "seq-kd" { 2 } else { 3 };
        assert_eq!(
            result.valid_loss_per_step,
            vec![(steps, result.valid_loss)],
            "{}",
            result.name
        );
        let metrics = std::fs::read_to_string(run_dir.join(&result.name).join("metrics.jsonl")).unwrap();
        assert_eq!(metrics.lines().count(), 1, "{}", result.name);
    }
    assert!(
        summary
            .students
            .iter()
            .all(|s| s.teacher_agreement.is_some() && s.parameters < summary.teacher.parameters)
    );
    let transcripts = burn_distill::data::read_transcripts(&run_dir.join("transfer.jsonl")).unwrap();
    assert_eq!(transcripts.len(), 24);
    assert!(
        transcripts
            .iter()
            .all(|t| t.prompt_ids().len() == 8 && t.completion_ids().len() == 24 + 1 - 8)
    );
    assert!(summary.students[7].disk_bytes.is_some() && summary.students[9].disk_bytes.is_some());
    let written: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(run_dir.join("summary.json")).unwrap()).unwrap();
    assert_eq!(written["best_distilled"], summary.best_distilled.as_str());
    let png = std::fs::read(run_dir.join("valid-loss.png")).unwrap();
    assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n");

    // A second run loads every finished model, the transfer set and the cache instead of
    // training or generating again: same results, same training seconds.
    let again = lm_pipeline::run(&options).unwrap();
    for (a, b) in std::iter::once(&summary.teacher)
        .chain(&summary.students)
        .zip(std::iter::once(&again.teacher).chain(&again.students))
    {
        assert_eq!(
            (a.valid_loss, a.train_seconds),
            (b.valid_loss, b.train_seconds),
            "{}",
            a.name
        );
    }
    assert_eq!(summary.transfer_set_seconds, again.transfer_set_seconds);
    let _ = std::fs::remove_dir_all(&run_dir);
}

#[test]
fn the_chat_pipeline_distils_a_gguf_chat_model_with_every_method_and_resumes() {
    // The whole chat pipeline on the tiny GGUF fixture (its own BPE tokenizer and chat
    // template, 2 blocks): Jargon File prompts split by term, the teacher's answers, the top-k
    // cache, a one-block student with every method from the teacher's block and one from a
    // random start, test figures, summary, plot and samples.
    use burn_distill::model::llm::{Llama, export_hf, load_model};
    use chat_pipeline::{Init, Method, Options, VocabPolicy};
    let _serial = serial();
    let device = burn_distill::loss::available_devices().remove(0);
    let run_dir = burn_distill_testing::scratch("distill-chat");
    let _ = std::fs::remove_dir_all(&run_dir);
    let fixture = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/llama/tiny-q8_0.gguf");
    let options = Options {
        device: device.name.to_string(),
        model: Some(fixture),
        run_dir: run_dir.clone(),
        train_prompts: 12,
        valid_prompts: 4,
        test_prompts: 4,
        answer_tokens: 6,
        answer_batch: 4,
        depth: 1,
        // Every default method, and the live KL with a hidden-state term (CKA between the
        // student's block and the teacher's last, through a projection; padding left out).
        methods: Method::ALL.iter().copied().chain([Method::KlHidden]).collect(),
        hidden: chat_pipeline::HiddenTerm {
            weight: 0.5,
            kind: "cka".into(),
            taps: None,
            random_projection: false,
        },
        random_methods: vec![Method::Alone],
        after_sft: vec![Method::SampledRkl],
        epochs: 2,
        batch_size: 4,
        learning_rate: 1e-2,
        top_k: 8,
        progress: false,
        ..Options::quick()
    };
    let summary = chat_pipeline::run(&options).unwrap();
    let names: Vec<&str> = summary.methods.keys().map(String::as_str).collect();
    assert_eq!(
        names,
        [
            "alone",
            "alone-random",
            "gkd",
            "kl+hidden",
            "sampled-rkl",
            "sampled-rkl-after-sft",
            "sft",
            "top-k-kl"
        ]
    );
    assert!(
        summary.methods["kl+hidden"]
            .description
            .contains("cka between block.0 and the teacher's block.1")
    );
    assert_eq!(summary.prompts, [12, 4, 4]);
    for (name, result) in &summary.methods {
        assert_eq!(result.init == Init::Random, name.ends_with("-random"), "{name}");
        assert_eq!(result.init == Init::AfterSft, name.ends_with("-after-sft"), "{name}");
        for value in [
            result.kl_to_teacher,
            result.perplexity,
            result.corpus_perplexity,
            result.tokens_per_second,
            result.valid_kl,
        ] {
            assert!(value.is_finite() && value > 0.0, "{name}: {result:?}");
        }
        assert!((0.0..=1.0).contains(&result.agreement) && (0.0..=100.0).contains(&result.chrf));
        assert!(result.parameters < summary.teacher.parameters, "{name}");
        // Step 0 (the initialisation) and each of the 2 epochs of 3 steps (12 answers, or the
        // corpus definitions for the student alone, in batches of 4).
        let steps: Vec<usize> = result.valid_kl_per_step.iter().map(|p| p.0).collect();
        if name.starts_with("alone") {
            assert_eq!(steps.len(), 3, "{name}");
        } else if name.ends_with("-after-sft") {
            assert_eq!(steps, [6, 9, 12], "{name} continues after sft's 6 steps");
        } else {
            assert_eq!(steps, [0, 3, 6], "{name}");
        }
        let metrics = std::fs::read_to_string(run_dir.join(name).join("metrics.jsonl")).unwrap();
        assert_eq!(metrics.lines().count(), 2, "{name}");
    }
    // Both students of a start share its step-0 KL; the two starts differ.
    // The student is the one of the teacher's 2 blocks closer to it on validation.
    assert_eq!(summary.block_choice.len(), 2);
    let closest = summary.block_choice.iter().min_by(|a, b| a.1.total_cmp(&b.1)).unwrap();
    assert_eq!(summary.blocks, closest.0);
    let kl0 = |name: &str| summary.methods[name].valid_kl_per_step[0].1;
    assert_eq!(kl0("sft"), closest.1);
    assert_eq!(kl0("sft"), kl0("gkd"));
    assert_ne!(kl0("alone"), kl0("alone-random"));
    assert_eq!(
        kl0("sampled-rkl-after-sft"),
        summary.methods["sft"].valid_kl,
        "it starts from the sft student"
    );
    assert_eq!(
        summary.methods["top-k-kl"].teacher_data_bytes,
        Some(std::fs::metadata(run_dir.join("teacher-top8.bdkd")).unwrap().len())
    );
    assert!(summary.cache_bytes_per_token > 0.0 && summary.cache_bytes_per_token < summary.dense_bytes_per_token);
    let written: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(run_dir.join("summary.json")).unwrap()).unwrap();
    for key in [
        "kl_to_teacher",
        "agreement",
        "perplexity",
        "parameters",
        "tokens_per_second",
    ] {
        assert!(
            written["methods"]["alone"][key].is_number(),
            "summary.json lacks methods.alone.{key}"
        );
    }
    assert!(written["teacher"]["parameters"].is_number());
    let png = std::fs::read(run_dir.join("valid-kl.png")).unwrap();
    assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n");
    let samples = std::fs::read_to_string(run_dir.join("samples.md")).unwrap();
    assert_eq!(samples.lines().count(), 2 + 3, "{samples}");
    let transfer = std::fs::read_to_string(run_dir.join("answers-train.jsonl")).unwrap();
    assert_eq!(transfer.lines().count(), 1 + 12, "a header and one answer per prompt");

    // A run killed in its last epoch: the rerun resumes from the checkpoint of the first and ends
    // as the uninterrupted run did; everything else is loaded, not recomputed.
    let sft = run_dir.join("sft");
    for file in ["summary.json", "final.bpk", "test.json"] {
        std::fs::remove_file(sft.join(file)).unwrap();
    }
    let checkpoints = sft.join("checkpoints");
    std::fs::remove_dir_all(checkpoints.join("epoch-0002")).unwrap();
    let _ = std::fs::remove_dir_all(checkpoints.join("best"));
    let metrics = std::fs::read_to_string(sft.join("metrics.jsonl")).unwrap();
    let first_line = metrics.lines().next().unwrap();
    std::fs::write(sft.join("metrics.jsonl"), format!("{first_line}\n")).unwrap();
    let again = chat_pipeline::run(&options).unwrap();
    for (name, result) in &summary.methods {
        let rerun = &again.methods[name];
        assert_eq!(
            (result.kl_to_teacher, result.valid_kl, result.chrf),
            (rerun.kl_to_teacher, rerun.valid_kl, rerun.chrf),
            "{name}"
        );
        if name != "sft" {
            assert_eq!(
                result.train_seconds, rerun.train_seconds,
                "{name} was loaded, not retrained"
            );
        }
    }
    assert_eq!(summary.teacher.tokens_per_second, again.teacher.tokens_per_second);

    // Bad input is refused before anything runs: a malformed prompt line names the line, and the
    // run directory is not created.
    let bad_dir = burn_distill_testing::scratch("distill-chat-bad");
    let _ = std::fs::remove_dir_all(&bad_dir);
    std::fs::create_dir_all(&bad_dir).unwrap();
    let prompts = bad_dir.join("prompts.jsonl");
    std::fs::write(
        &prompts,
        "{\"id\": \"a\", \"messages\": [{\"role\": \"user\", \"content\": \"hi\"}]}\n{\"id\": \"b\", \"messages\": \n",
    )
    .unwrap();
    let error = chat_pipeline::run(&Options {
        prompts: Some(prompts),
        run_dir: bad_dir.join("run"),
        ..options.clone()
    })
    .unwrap_err()
    .to_string();
    assert!(error.contains("line 2"), "{error}");
    assert!(!bad_dir.join("run").exists());
    let error = chat_pipeline::run(&Options {
        blocks: Some(vec![0, 2]),
        run_dir: bad_dir.join("run"),
        ..options.clone()
    })
    .unwrap_err()
    .to_string();
    assert!(error.contains("--blocks") && error.contains("block 2"), "{error}");
    assert!(!bad_dir.join("run").exists());
    for (bad, says) in [
        (
            Options {
                vocab_policy: Some(VocabPolicy::Resize),
                ..options.clone()
            },
            "give --student",
        ),
        (
            Options {
                student: Some(bad_dir.join("no-such-model")),
                blocks: Some(vec![0]),
                ..options.clone()
            },
            "choose one",
        ),
        (
            Options {
                student: Some(bad_dir.join("no-such-model")),
                ..options.clone()
            },
            "no-such-model",
        ),
    ] {
        let error = chat_pipeline::run(&Options {
            run_dir: bad_dir.join("run"),
            ..bad
        })
        .unwrap_err()
        .to_string();
        assert!(error.contains(says), "{error}");
        assert!(!bad_dir.join("run").exists());
    }

    // A student from a file (--student): the teacher's block 1, written with its tokenizer,
    // starts exactly where the student made of block 1 started in the run above.
    let teacher = load_model(options.model.as_ref().unwrap(), &device.device).unwrap();
    let block = teacher.model.with_blocks(&[1]).unwrap();
    let write = |name: &str, model: &Llama, edit: &dyn Fn(&mut serde_json::Value)| {
        let dir = bad_dir.join(name);
        export_hf(model, &dir).unwrap();
        teacher.tokenizer.save(&dir).unwrap();
        let path = dir.join("tokenizer.json");
        let mut json: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        edit(&mut json);
        std::fs::write(&path, json.to_string()).unwrap();
        dir
    };
    let student_options = |student: &std::path::Path, policy: Option<VocabPolicy>| Options {
        student: Some(student.to_path_buf()),
        vocab_policy: policy,
        methods: vec![Method::Sft],
        random_methods: Vec::new(),
        after_sft: Vec::new(),
        run_dir: bad_dir.join("run"),
        ..options.clone()
    };
    let same = write("same", &block, &|_| {});
    let given = chat_pipeline::run(&student_options(&same, None)).unwrap();
    let block_kl = summary.block_choice.iter().find(|c| c.0 == [1]).unwrap().1;
    let sft = &given.methods["sft"];
    assert_eq!(sft.init, Init::Given);
    assert!(
        (sft.valid_kl_per_step[0].1 - block_kl).abs() < 1e-6 * block_kl,
        "{sft:?} against {block_kl}"
    );
    assert_ne!(sft.valid_kl, sft.valid_kl_per_step[0].1, "it was trained");
    assert!(given.blocks.is_empty() && given.block_choice.is_empty());
    let _ = std::fs::remove_dir_all(bad_dir.join("run"));
    // Its tokenizer extended by one token (and its model by one logit): refused unless a
    // vocabulary policy is named; resized, it starts where the block did.
    let extended = write("extended", &block.with_vocab_size(321).unwrap(), &|json| {
        json["added_tokens"].as_array_mut().unwrap().push(serde_json::json!({
            "id": 320, "content": "<|tool|>", "single_word": false, "lstrip": false,
            "rstrip": false, "normalized": false, "special": true
        }));
    });
    let error = chat_pipeline::run(&student_options(&extended, None))
        .unwrap_err()
        .to_string();
    assert!(
        error.contains("--vocab-policy resize") && error.contains("321 ids against 320"),
        "{error}"
    );
    assert!(!bad_dir.join("run").exists());
    // (Run as a sweep would be: the test prompts unread.)
    let resized = chat_pipeline::run(&Options {
        test: false,
        ..student_options(&extended, Some(VocabPolicy::Resize))
    })
    .unwrap();
    let start = resized.methods["sft"].valid_kl_per_step[0].1;
    assert!((start - block_kl).abs() < 1e-6 * block_kl, "{start} against {block_kl}");
    assert!(resized.methods["sft"].kl_to_teacher.is_nan() && resized.teacher.perplexity.is_nan());
    assert!(resized.methods["sft"].valid_kl.is_finite());
    let run = bad_dir.join("run");
    assert!(
        !run.join("sft/test.json").exists() && !run.join("teacher.json").exists() && !run.join("samples.md").exists()
    );
    let _ = std::fs::remove_dir_all(bad_dir.join("run"));
    // Two tokens swapped: no policy aligns it.
    let swapped = write("swapped", &block, &|json| {
        let vocab = json["model"]["vocab"].as_object_mut().unwrap();
        vocab.insert("a".into(), 68.into());
        vocab.insert("b".into(), 67.into());
    });
    for policy in [None, Some(VocabPolicy::Resize)] {
        let error = chat_pipeline::run(&student_options(&swapped, policy))
            .unwrap_err()
            .to_string();
        assert!(
            error.contains("id 67") && error.contains("no vocabulary policy"),
            "{error}"
        );
        assert!(!bad_dir.join("run").exists());
    }
    let _ = std::fs::remove_dir_all(&bad_dir);
    let _ = std::fs::remove_dir_all(&run_dir);
}

#[test]
fn the_chat_pipeline_distils_from_a_harvested_transfer_set_and_records_its_lineage() {
    // Black-box distillation end to end on loopback: our server serves the tiny GGUF teacher,
    // the harvest client asks it for answers with their top log-probabilities, and the chat
    // pipeline trains a one-block student from that set alone (sequence-level and top-k KL),
    // writing the set's lineage into its run directory.
    use burn_distill::data::{ByteCorpus, default_text_file, jargon_entries, jargon_prompts, split_prompts};
    use burn_distill::model::llm::load_model;
    use burn_distill::serve::{HarvestOptions, Lineage, ServeOptions, TransferSet, harvest_blocking, spawn};
    use chat_pipeline::{Method, Options};
    let _serial = serial();
    let device = burn_distill::loss::available_devices().remove(0);
    let fixture = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/llama/tiny-q8_0.gguf");
    let loaded = load_model(&fixture, &device.device).unwrap();
    let server = spawn(
        std::net::SocketAddr::from(([127, 0, 0, 1], 0)),
        loaded.model,
        loaded.tokenizer,
        ServeOptions::new("tiny-teacher"),
    )
    .unwrap();
    let corpus = ByteCorpus::from_file(&default_text_file()).unwrap();
    let splits = split_prompts(
        jargon_prompts(&jargon_entries(std::str::from_utf8(corpus.bytes()).unwrap())),
        0.1,
        0.1,
    )
    .unwrap();
    let train: Vec<_> = (0..8)
        .map(|i| splits.train[i * splits.train.len() / 8].clone())
        .collect();
    let set_dir = burn_distill_testing::scratch("served-set");
    let mut harvest_options = HarvestOptions::new(server.base_url(), "Apache-2.0, test fixture");
    harvest_options.api_key_env = "BURN_DISTILL_TEST_NO_KEY".into();
    harvest_options.max_tokens = 6;
    harvest_options.temperature = 1.0;
    harvest_options.top_logprobs = Some(4);
    let report = harvest_blocking(&train, None, &set_dir, &harvest_options).unwrap();
    assert_eq!((report.records, report.model.as_str()), (8, "tiny-teacher"));
    drop(server);

    let run_dir = burn_distill_testing::scratch("distill-chat-served");
    let options = Options {
        device: device.name.to_string(),
        model: Some(fixture),
        transfer_set: Some(set_dir.clone()),
        run_dir: run_dir.clone(),
        valid_prompts: 4,
        test_prompts: 4,
        answer_tokens: 6,
        answer_batch: 4,
        depth: 1,
        blocks: Some(vec![1]),
        methods: vec![Method::Sft, Method::TopK],
        random_methods: Vec::new(),
        after_sft: Vec::new(),
        epochs: 1,
        batch_size: 4,
        learning_rate: 1e-2,
        progress: false,
        ..Options::quick()
    };
    let summary = chat_pipeline::run(&options).unwrap();
    assert_eq!(summary.methods.keys().collect::<Vec<_>>(), ["sft", "top-k-kl"]);
    assert_eq!(summary.prompts[0], 8);
    for result in summary.methods.values() {
        assert!(result.valid_kl.is_finite() && result.valid_kl > 0.0, "{result:?}");
    }
    let set = TransferSet::open(&set_dir).unwrap();
    let lineage = Lineage::read(&run_dir).unwrap();
    assert_eq!(lineage.fingerprint, set.fingerprint());
    assert_eq!(lineage.card.teacher_model, "tiny-teacher");
    assert_eq!(lineage.card.terms, "Apache-2.0, test fixture");
    let cached = std::fs::read_dir(&run_dir)
        .unwrap()
        .filter_map(Result::ok)
        .any(|e| e.file_name().to_string_lossy().starts_with("teacher-served-top"));
    assert!(cached, "the served log-probabilities became the top-k cache");
    // The best distilled student, exported with the teacher's tokenizer, is served in turn.
    let best = load_model(run_dir.join("best-hf"), &device.device).unwrap();
    assert_eq!(best.model.config().num_hidden_layers, 1);
    let student_server = spawn(
        std::net::SocketAddr::from(([127, 0, 0, 1], 0)),
        best.model,
        best.tokenizer,
        ServeOptions::new("tiny-student"),
    )
    .unwrap();
    let mut ask_student = HarvestOptions::new(student_server.base_url(), "MIT, test student");
    ask_student.api_key_env = "BURN_DISTILL_TEST_NO_KEY".into();
    ask_student.max_tokens = 4;
    let report = harvest_blocking(
        &train[..2],
        None,
        &burn_distill_testing::scratch("student-set"),
        &ask_student,
    )
    .unwrap();
    assert_eq!((report.records, report.model.as_str()), (2, "tiny-student"));

    // A set that answers a validation prompt is refused before any training.
    let leaky = burn_distill_testing::scratch("served-set-leaky");
    for name in ["card.json", "records.jsonl"] {
        std::fs::copy(set_dir.join(name), leaky.join(name)).unwrap();
    }
    let records = std::fs::read_to_string(leaky.join("records.jsonl")).unwrap();
    let first_id = set.records[0].id.clone();
    let valid_prompts: Vec<_> = (0..4)
        .map(|i| splits.valid[i * splits.valid.len() / 4].clone())
        .collect();
    let leaked = records.replacen(
        &format!("\"id\":{}", serde_json::to_string(&first_id).unwrap()),
        &format!("\"id\":{}", serde_json::to_string(&valid_prompts[0].id).unwrap()),
        1,
    );
    assert_ne!(leaked, records);
    std::fs::write(leaky.join("records.jsonl"), leaked).unwrap();
    let leak_run = burn_distill_testing::scratch("distill-chat-leaky");
    let Err(error) = chat_pipeline::run(&Options {
        transfer_set: Some(leaky),
        run_dir: leak_run.clone(),
        ..options
    }) else {
        panic!("a set that answers a validation prompt must be refused");
    };
    assert!(error.to_string().contains("validation or test"), "{error}");
    assert!(!leak_run.join("sft").exists());
}

/// A teacher hosted by `burn-distill-device-server` in another process, over WebSocket on
/// loopback: it teaches as the same teacher in this process does, and when its server is
/// killed in the middle of an epoch the run stops with an error naming the teacher's device,
/// then resumes from its last checkpoint once the server is back, ending as the run that was
/// never interrupted.
mod remote_teacher {
    use std::io::{BufRead, BufReader};
    use std::process::{Child, Command, Stdio};
    use std::sync::Mutex;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;

    use burn::module::Module;
    use burn::remote::RemoteHost;
    use burn::tensor::{Device, Tensor};
    use burn_distill::data::{ImageBatcher, MnistDataset, MnistSplit, Subset};
    use burn_distill::model::{
        FrozenTeacher, Mlp, MlpConfig, ModelError, Teacher, TeacherOn, TeacherOutput, init_seeded,
    };
    use burn_distill::train::{DistillConfig, Distiller, FitData, ObjectiveConfig, OptimizerConfig, TrainError};

    /// A device server process; killed when dropped.
    struct DeviceServer {
        child: Child,
        address: String,
    }

    impl DeviceServer {
        /// Starts one on `listen` (`127.0.0.1:0`: a free port) and waits for its address.
        fn start(listen: &str) -> Self {
            let mut child = Command::new(env!("CARGO_BIN_EXE_burn-distill-device-server"))
                .args(["--listen", listen, "--devices", "flex"])
                .stdout(Stdio::piped())
                .stderr(Stdio::null())
                .spawn()
                .expect("the device server starts");
            let stdout = child.stdout.take().unwrap();
            let (sender, receiver) = std::sync::mpsc::channel();
            // The first line is the address; the rest (burn-remote's log) is drained, so that
            // the server never writes into a closed pipe.
            std::thread::spawn(move || {
                let mut lines = BufReader::new(stdout).lines();
                let first = lines.next().and_then(|line| line.ok()).unwrap_or_default();
                let _ = sender.send(first);
                lines.for_each(drop);
            });
            let line = receiver
                .recv_timeout(Duration::from_secs(60))
                .expect("the device server says where it listens within a minute");
            let address = line
                .strip_prefix("listening on ws://")
                .and_then(|rest| rest.split_whitespace().next())
                .unwrap_or_else(|| panic!("unexpected first line {line:?}"))
                .to_string();
            assert!(address.starts_with("127.0.0.1:"), "{address}");
            Self { child, address }
        }

        fn device(&self) -> Device {
            Device::remote_options(&RemoteHost::websocket(&format!("ws://{}", self.address)))
                .init()
                .expect("the device server accepts a session")
        }

        fn kill(&mut self) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }

    impl Drop for DeviceServer {
        fn drop(&mut self) {
            self.kill();
        }
    }

    /// The teacher, killing its server on the `kill_at`-th batch: a machine lost mid-epoch.
    struct LosesItsServer<'s> {
        teacher: TeacherOn<FrozenTeacher<Mlp>>,
        calls: AtomicUsize,
        kill_at: usize,
        server: &'s Mutex<DeviceServer>,
    }

    impl Teacher<Tensor<2>, 2> for LosesItsServer<'_> {
        fn teach(&self, input: Tensor<2>, taps: &[&str]) -> burn_distill::model::Result<TeacherOutput<2>> {
            if self.calls.fetch_add(1, Ordering::SeqCst) + 1 == self.kill_at {
                self.server.lock().unwrap().kill();
            }
            self.teacher.teach(input, taps)
        }

        fn num_classes(&self) -> usize {
            10
        }

        fn fingerprint(&self) -> Option<burn_distill::model::Fingerprint> {
            Teacher::<Tensor<2>, 2>::fingerprint(&self.teacher)
        }
    }

    fn config() -> DistillConfig {
        let objective = ObjectiveConfig::Hinton(
            burn_distill::loss::HintonKdLossConfig::new()
                .with_temperature(4.0)
                .with_alpha(0.5),
        );
        DistillConfig::new(
            3,
            OptimizerConfig::Sgd(burn::optim::SgdConfig::new()),
            burn::optim::lr_scheduler::LrSchedulerConfig::Constant(0.1),
            objective,
        )
        .with_batch_size(64)
        .with_seed(7)
    }

    fn probe(student: &Mlp, images: Tensor<2>) -> Vec<f32> {
        student.valid().forward(images).into_data().iter::<f32>().collect()
    }

    #[test]
    fn a_teacher_behind_a_device_server_teaches_as_a_local_one_and_a_lost_server_is_resumed_from() {
        let _serial = super::serial();
        let device = Device::flex().autodiff();
        let train = Subset::new(
            MnistDataset::load_default(MnistSplit::Train).unwrap(),
            (0..256).collect(),
        );
        let batcher = ImageBatcher::new();
        let teacher = init_seeded(3, &device, |d| MlpConfig::hinton_teacher().init(d)).valid();
        let student = || init_seeded(4, &device, |d| MlpConfig::hinton_student().init(d));
        let images: Tensor<2> = {
            use burn::data::dataloader::batcher::Batcher;
            use burn::data::dataset::Dataset;
            let items = (0..16).map(|i| train.get(i).unwrap()).collect();
            Batcher::batch(&batcher, items, &Device::flex()).images
        };

        // The same run with the teacher here and with the teacher in the server process.
        let local_teacher = FrozenTeacher::new(&teacher);
        let local = Distiller::new(config(), burn_distill_testing::scratch("remote-local"))
            .with_teacher(&local_teacher)
            .fit(student(), FitData::new(&train, &batcher), &device)
            .unwrap();
        let server = Mutex::new(DeviceServer::start("127.0.0.1:0"));
        let address = server.lock().unwrap().address.clone();
        let remote_device = server.lock().unwrap().device();
        let remote_teacher = TeacherOn::new(
            FrozenTeacher::new(&teacher.clone().to_device(&remote_device)),
            remote_device,
        );
        let remote = Distiller::new(config(), burn_distill_testing::scratch("remote-served"))
            .with_teacher(&remote_teacher)
            .fit(student(), FitData::new(&train, &batcher), &device)
            .unwrap();
        for (here, there) in local.records.iter().zip(&remote.records) {
            assert!(
                (here.train.loss - there.train.loss).abs() <= 1e-6 * here.train.loss.abs().max(1.0),
                "epoch {}: local {} vs remote {}",
                here.epoch,
                here.train.loss,
                there.train.loss
            );
        }
        assert_eq!(remote.records.len(), 3);
        let expected = probe(&local.student, images.clone());

        // The server dies on the 6th batch: epoch 2 (4 batches an epoch), its 2nd step.
        let run_dir = burn_distill_testing::scratch("remote-killed");
        let remote_device = server.lock().unwrap().device();
        let dying = LosesItsServer {
            teacher: TeacherOn::new(
                FrozenTeacher::new(&teacher.clone().to_device(&remote_device)),
                remote_device,
            ),
            calls: AtomicUsize::new(0),
            kill_at: 6,
            server: &server,
        };
        let error = Distiller::new(config(), &run_dir)
            .with_teacher(&dying)
            .fit(student(), FitData::new(&train, &batcher), &device)
            .unwrap_err();
        match &error {
            TrainError::Model(ModelError::TeacherDevice { .. }) => {}
            other => panic!("expected the teacher's device to fail, got {other:?}"),
        }
        assert!(error.to_string().contains("the teacher's device"), "{error}");
        assert!(
            run_dir.join("checkpoints").join("epoch-0001").is_dir(),
            "epoch 1 was checkpointed"
        );
        assert!(!run_dir.join("checkpoints").join("epoch-0002").exists());

        // The server comes back; the run resumes from epoch 1 and ends as the uninterrupted
        // one. burn-remote keeps a process's session to an address for the life of the
        // process, dead or not, so within this test the server comes back on another port; a
        // user's new training process reaches it at the old one.
        let back = DeviceServer::start("127.0.0.1:0");
        assert_ne!(back.address, address);
        let device_back = back.device();
        let teacher_back = TeacherOn::new(
            FrozenTeacher::new(&teacher.clone().to_device(&device_back)),
            device_back,
        );
        let resumed = Distiller::resume(&run_dir)
            .unwrap()
            .with_teacher(&teacher_back)
            .fit(student(), FitData::new(&train, &batcher), &device)
            .unwrap();
        assert_eq!(resumed.records.len(), 3);
        let gap = probe(&resumed.student, images)
            .iter()
            .zip(&expected)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0, f32::max);
        assert!(gap < 1e-5, "the resumed run drifted by {gap}");
    }

    /// The chat pipeline (a Llama-family GGUF teacher: its answers, its top-k cache, its live
    /// scoring of on-policy rollouts, its test figures) with the teacher in a device server
    /// process gives what it gives with the teacher in process.
    #[test]
    fn the_chat_pipeline_distils_from_a_llama_teacher_behind_a_device_server() {
        use super::chat_pipeline::{Method, Options, run};
        let _serial = super::serial();
        let fixture = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/llama/tiny-q8_0.gguf");
        let options = |name: &str, teacher_device: Option<String>| Options {
            device: "flex".into(),
            model: Some(fixture.clone()),
            teacher_device,
            run_dir: burn_distill_testing::scratch(name),
            train_prompts: 8,
            valid_prompts: 4,
            test_prompts: 4,
            answer_tokens: 6,
            answer_batch: 4,
            depth: 1,
            methods: vec![Method::TopK, Method::Gkd],
            random_methods: Vec::new(),
            after_sft: Vec::new(),
            epochs: 1,
            batch_size: 4,
            learning_rate: 1e-2,
            top_k: 8,
            progress: false,
            ..Options::quick()
        };
        let local = run(&options("chat-local-teacher", None)).unwrap();
        let server = DeviceServer::start("127.0.0.1:0");
        let remote = run(&options(
            "chat-remote-teacher",
            Some(format!("ws://{}", server.address)),
        ))
        .unwrap();
        assert_eq!(
            local.train_answer_tokens, remote.train_answer_tokens,
            "the same answers"
        );
        let close = |a: f64, b: f64| (a - b).abs() <= 1e-4 * a.abs().max(1.0);
        assert!(
            close(local.teacher.perplexity, remote.teacher.perplexity),
            "{} vs {}",
            local.teacher.perplexity,
            remote.teacher.perplexity
        );
        assert_eq!(
            local.methods.keys().collect::<Vec<_>>(),
            remote.methods.keys().collect::<Vec<_>>()
        );
        for (name, here) in &local.methods {
            let there = &remote.methods[name];
            assert!(here.kl_to_teacher.is_finite(), "{name}");
            assert!(
                close(here.kl_to_teacher, there.kl_to_teacher),
                "{name}: KL {} here, {} with the teacher in the server",
                here.kl_to_teacher,
                there.kl_to_teacher
            );
        }
        // A server that is not there is refused before any work.
        let error = run(&options("chat-no-server", Some("ws://127.0.0.1:1".into()))).unwrap_err();
        assert!(error.to_string().contains("--teacher-device"), "{error}");
    }
}
