//! Language-model distillation on the bundled Jargon File: a byte-level transformer teacher,
//! the same small student trained alone, and that student distilled with every objective.
//!
//! Shared by the `lm` example (`main.rs`) and the root test harness, which runs it in a tiny
//! configuration.

use std::path::{Path, PathBuf};
use std::time::Instant;

use burn::data::dataloader::batcher::Batcher;
use burn::data::dataset::Dataset;
use burn::module::Module;
use burn::tensor::{Device, Int, Tensor};
use burn_distill::data::{
    BYTE_VOCAB, ByteCorpus, CacheBuildOptions, CacheMode, CachedTeacher, EpochAware, Fingerprinted, Indexed,
    SequenceBatcher, Subset, TextWindows, TokenBatch, TokenBatcher, Transcript, TranscriptDataset, build_cache,
    generate_transcripts, read_transcripts, write_transcripts,
};
use burn_distill::loss::{Divergence, DivergenceLossConfig, SparseKlLossConfig, TailPolicy, device_by_name};
use burn_distill::model::{
    Fingerprint, FrozenTeacher, SamplingConfig, Teacher, TransformerLm, TransformerLmConfig, init_seeded, load_weights,
    save_weights,
};
use burn_distill::train::{DistillConfig, Distiller, EvalSet, FitData, ObjectiveConfig, OnPolicyConfig, read_metrics};
use serde::{Deserialize, Serialize};

use super::runs::{Chart, SavedRun, adam_warm_up_cosine, write_atomic};

type Error = Box<dyn std::error::Error>;

/// A transformer's size.
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
pub struct Shape {
    /// Transformer blocks.
    pub layers: usize,
    /// Model width.
    pub width: usize,
    /// Attention heads.
    pub heads: usize,
}

/// What to run.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Options {
    /// `ndarray`, `flex`, `wgpu` or `cuda`.
    pub device: String,
    /// Where models, metrics, caches, the transfer set and the summary go.
    pub run_dir: PathBuf,
    /// Tokens (bytes) per training window.
    pub context: usize,
    /// The teacher.
    pub teacher: Shape,
    /// Every student.
    pub student: Shape,
    /// Training windows (spread evenly over the training part of the corpus).
    pub train_windows: usize,
    /// Validation windows (from the held-out 5 % of the corpus).
    pub valid_windows: usize,
    /// Teacher epochs over the training windows.
    pub teacher_epochs: usize,
    /// Student epochs.
    pub student_epochs: usize,
    /// Windows per batch.
    pub batch_size: usize,
    /// Peak Adam learning rate (linear warm-up, cosine decay).
    pub learning_rate: f64,
    /// Transcripts in the sequence-level transfer set (one per training window, from its start).
    pub transcripts: usize,
    /// Prompt tokens of each transcript and of each on-policy rollout.
    pub prompt_tokens: usize,
    /// GKD's share of steps on student-generated sequences.
    pub lambda: f64,
    /// Top-k sizes of the offline caches.
    pub top_k: Vec<usize>,
    /// Seed of initialisation, data order and sampling.
    pub seed: u64,
    /// Print progress.
    pub progress: bool,
}

impl Options {
    /// The default, full run.
    pub fn full() -> Self {
        Self {
            device: "flex".into(),
            run_dir: PathBuf::from("runs/lm"),
            context: 64,
            teacher: Shape {
                layers: 3,
                width: 128,
                heads: 4,
            },
            student: Shape {
                layers: 1,
                width: 64,
                heads: 2,
            },
            train_windows: 4096,
            valid_windows: 512,
            teacher_epochs: 8,
            student_epochs: 4,
            batch_size: 32,
            learning_rate: 2e-3,
            transcripts: 4096,
            prompt_tokens: 16,
            lambda: 0.5,
            top_k: vec![8, 32],
            seed: 1,
            progress: true,
        }
    }

    /// `--quick`: smaller models and data; a few minutes on 2 CPU cores.
    pub fn quick() -> Self {
        Self {
            run_dir: PathBuf::from("runs/lm-quick"),
            teacher: Shape {
                layers: 2,
                width: 96,
                heads: 4,
            },
            student: Shape {
                layers: 1,
                width: 48,
                heads: 2,
            },
            train_windows: 1024,
            valid_windows: 256,
            teacher_epochs: 4,
            student_epochs: 2,
            transcripts: 512,
            ..Self::full()
        }
    }
}

/// One model's results, as written to `summary.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ModelResult {
    /// Run directory name.
    pub name: String,
    /// What it was trained with.
    pub objective: String,
    /// Validation cross-entropy, nats per byte.
    pub valid_loss: f64,
    /// `exp(valid_loss)`.
    pub valid_perplexity: f64,
    /// `valid_loss / ln 2`.
    pub bits_per_byte: f64,
    /// Share of validation positions where its top-1 byte is the teacher's (students).
    pub teacher_agreement: Option<f64>,
    /// Mean KL(teacher ‖ model) on validation, nats (students).
    pub teacher_kl: Option<f64>,
    /// Parameters.
    pub parameters: usize,
    /// Training tokens (counted positions) per second.
    pub train_tokens_per_second: f64,
    /// Training seconds (including the teacher's forward passes).
    pub train_seconds: f64,
    /// Bytes of the teacher data it trained from, on disk (transfer set or cache).
    pub disk_bytes: Option<u64>,
    /// Validation loss after each epoch, with the optimizer step it was measured at.
    pub valid_loss_per_step: Vec<(usize, f64)>,
}

/// The whole run, as written to `summary.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Summary {
    /// The options it ran with.
    pub options: Options,
    /// Training and validation tokens.
    pub train_tokens: usize,
    /// Validation tokens.
    pub valid_tokens: usize,
    /// The teacher.
    pub teacher: ModelResult,
    /// Students, the one trained alone first.
    pub students: Vec<ModelResult>,
    /// Inference tokens per second, teacher and student (validation set, batch 32).
    pub teacher_inference_tokens_per_second: f64,
    /// Inference tokens per second of the student architecture.
    pub student_inference_tokens_per_second: f64,
    /// Bytes a dense f32 cache of the training windows would take (computed from the format).
    pub dense_f32_cache_bytes: u64,
    /// Seconds spent generating the sequence-level transfer set.
    pub transfer_set_seconds: f64,
    /// The distilled student with the lowest validation loss.
    pub best_distilled: String,
    /// Its bits per byte below the student trained alone.
    pub best_gain_bits_per_byte: f64,
    /// Wall-clock seconds of this invocation.
    pub seconds: f64,
}

/// Runs every phase and writes the summary and plot.
///
/// # Errors
/// Data, model, training or file errors.
pub fn run(options: &Options) -> Result<Summary, Error> {
    let start = Instant::now();
    let device =
        device_by_name(&options.device).ok_or_else(|| format!("no device {:?} in this build", options.device))?;
    let training = device.clone().autodiff();
    std::fs::create_dir_all(&options.run_dir)?;

    let windows = ByteCorpus::load_default()?.windows(options.context, options.context)?;
    let (all_train, all_valid) = windows.split(0.05)?;
    let spread = |count: usize, len: usize| -> Vec<usize> {
        let count = count.min(len);
        (0..count).map(|i| i * len / count).collect()
    };
    let train = Subset::new(all_train.clone(), spread(options.train_windows, all_train.len()));
    let valid = Subset::new(all_valid.clone(), spread(options.valid_windows, all_valid.len()));
    let evals = [EvalSet {
        name: "valid",
        dataset: &valid,
    }];
    say(
        options,
        &format!(
            "LM distillation: {} training windows of {} bytes, {} validation windows, on {}; run directory {}",
            train.len(),
            options.context,
            valid.len(),
            options.device,
            options.run_dir.display()
        ),
    );
    let lm_config = |shape: Shape| {
        TransformerLmConfig::new(BYTE_VOCAB, options.context)
            .with_layers(shape.layers)
            .with_width(shape.width)
            .with_heads(shape.heads)
            // An untied head starts with small logits; the tied one (unit-variance embeddings)
            // starts with logits of standard deviation ~sqrt(width) and trains far slower here.
            .with_tied_head(false)
    };
    let teacher_init = || init_seeded(options.seed, &training, |d| lm_config(options.teacher).init(d));
    let student_init = || init_seeded(options.seed + 1, &training, |d| lm_config(options.student).init(d));
    let ctx = Context {
        options,
        device: &training,
    };

    // 1. The teacher.
    let teacher_phase = ctx.phase(
        "teacher",
        "cross-entropy",
        config(options, options.teacher_epochs, supervised(), train.len()),
        &teacher_init,
        None,
        None,
        &train,
        &evals,
        &TokenBatcher,
    )?;
    let teacher_module = teacher_phase.model.clone().valid();
    let teacher = FrozenTeacher::new(&teacher_module);
    let teacher_fingerprint =
        Teacher::<Tensor<2, Int>, 3>::fingerprint(&teacher).ok_or("the teacher has no fingerprint")?;
    let live: Option<&dyn Teacher<Tensor<2, Int>, 3>> = Some(&teacher);

    // 2. The student alone.
    let student_epochs = options.student_epochs;
    let mut students = vec![ctx.phase(
        "student-alone",
        "cross-entropy (no teacher)",
        config(options, student_epochs, supervised(), train.len()),
        &student_init,
        None,
        live,
        &train,
        &evals,
        &TokenBatcher,
    )?];

    // 3. Token-level KD from the live teacher, one divergence each.
    let divergences = [
        ("kd-forward-kl", "forward KL", Divergence::ForwardKl),
        ("kd-reverse-kl", "reverse KL", Divergence::ReverseKl),
        (
            "kd-gjsd-0.5",
            "generalised JSD, beta 0.5",
            Divergence::GeneralizedJsd { beta: 0.5 },
        ),
        (
            "kd-skew-kl-0.1",
            "skew KL, alpha 0.1",
            Divergence::SkewKl { alpha: 0.1 },
        ),
        (
            "kd-skew-reverse-kl-0.1",
            "skew reverse KL, alpha 0.1",
            Divergence::SkewReverseKl { alpha: 0.1 },
        ),
        ("kd-tvd", "total variation", Divergence::TotalVariation),
    ];
    for (name, description, divergence) in divergences {
        students.push(ctx.phase(
            name,
            &format!("token-level {description}"),
            config(options, student_epochs, divergence_objective(divergence), train.len()),
            &student_init,
            live,
            live,
            &train,
            &evals,
            &TokenBatcher,
        )?);
    }

    // 4. Sequence-level KD: the teacher writes a transfer set, the student learns it by
    // cross-entropy on the completions.
    let transfer_path = options.run_dir.join("transfer.jsonl");
    let (transcripts, transfer_set_seconds) = transfer_set(
        options,
        &teacher_module,
        teacher_fingerprint,
        &train,
        &transfer_path,
        &device,
    )?;
    let transfer = TranscriptDataset::new(&transcripts, options.context, BYTE_VOCAB, false)?;
    let valid_sequences = TranscriptDataset::new(
        &(0..valid.len())
            .map(|i| Transcript::from_tokens(&[], &tokens_of(&valid, i)))
            .collect::<Vec<_>>(),
        options.context,
        BYTE_VOCAB,
        true,
    )?;
    let sequence_evals = [EvalSet {
        name: "valid",
        dataset: &valid_sequences,
    }];
    let mut sequence = ctx.phase(
        "seq-kd",
        "sequence-level (CE on teacher samples)",
        config(options, student_epochs, supervised(), transfer.len()),
        &student_init,
        None,
        live,
        &transfer,
        &sequence_evals,
        &SequenceBatcher::default(),
    )?;
    sequence.result.disk_bytes = Some(std::fs::metadata(&transfer_path)?.len());
    students.push(sequence);

    // 5. On-policy GKD: with probability lambda the student writes the sequence.
    let gkd = config(
        options,
        student_epochs,
        divergence_objective(Divergence::GeneralizedJsd { beta: 0.5 }),
        train.len(),
    )
    .with_on_policy(Some(
        OnPolicyConfig::new()
            .with_lambda(options.lambda)
            .with_prompt_tokens(options.prompt_tokens),
    ));
    students.push(ctx.phase(
        "gkd",
        &format!("on-policy GKD, JSD 0.5, lambda {}", options.lambda),
        gkd,
        &student_init,
        live,
        live,
        &train,
        &evals,
        &TokenBatcher,
    )?);

    // 6. Offline top-k caches with the sparse loss.
    for &k in &options.top_k {
        let path = options.run_dir.join(format!("teacher-top{k}.bdkd"));
        let cached = open_or_build_cache(options, &path, &teacher, teacher_fingerprint, &train, k, &device)?;
        let objective = ObjectiveConfig::Sparse {
            loss: SparseKlLossConfig::new().with_tail(TailPolicy::UniformTail),
            hard_weight: 0.0,
        };
        let mut phase = ctx.phase(
            &format!("kd-top{k}-cache"),
            &format!("forward KL from a top-{k} cache (uniform tail)"),
            config(options, student_epochs, objective, train.len()),
            &student_init,
            Some(&cached),
            live,
            &train,
            &evals,
            &TokenBatcher,
        )?;
        phase.result.disk_bytes = Some(std::fs::metadata(&path)?.len());
        students.push(phase);
    }

    let teacher_speed = inference_tokens_per_second(&teacher_module, &valid, &device);
    let student_speed = inference_tokens_per_second(&students[0].model.clone().valid(), &valid, &device);
    let dense_f32_cache_bytes = (train.len() * (8 + options.context * BYTE_VOCAB * 4)) as u64;
    let alone = students[0].result.clone();
    let best = students[1..]
        .iter()
        .min_by(|a, b| a.result.valid_loss.total_cmp(&b.result.valid_loss))
        .map(|phase| phase.result.clone())
        .ok_or("no distilled student")?;
    let summary = Summary {
        options: options.clone(),
        train_tokens: train.len() * options.context,
        valid_tokens: valid.len() * options.context,
        teacher: teacher_phase.result,
        students: students.into_iter().map(|phase| phase.result).collect(),
        teacher_inference_tokens_per_second: teacher_speed,
        student_inference_tokens_per_second: student_speed,
        dense_f32_cache_bytes,
        transfer_set_seconds,
        best_gain_bits_per_byte: alone.bits_per_byte - best.bits_per_byte,
        best_distilled: best.name,
        seconds: start.elapsed().as_secs_f64(),
    };
    write_atomic(
        &options.run_dir.join("summary.json"),
        serde_json::to_string_pretty(&summary)?.as_bytes(),
    )?;
    plot(&options.run_dir.join("valid-loss.png"), &summary)?;
    if options.progress {
        print_table(&summary);
        println!(
            "wrote {}, {} and a metrics.jsonl per model",
            options.run_dir.join("summary.json").display(),
            options.run_dir.join("valid-loss.png").display()
        );
    }
    Ok(summary)
}

fn say(options: &Options, line: &str) {
    if options.progress {
        println!("{line}");
    }
}

fn supervised() -> ObjectiveConfig {
    ObjectiveConfig::Supervised { label_smoothing: 0.0 }
}

fn divergence_objective(divergence: Divergence) -> ObjectiveConfig {
    ObjectiveConfig::Divergence {
        loss: DivergenceLossConfig::new(divergence),
        hard_weight: 0.0,
    }
}

/// Adam, 5 % linear warm-up, cosine decay to a tenth.
fn config(options: &Options, epochs: usize, objective: ObjectiveConfig, examples: usize) -> DistillConfig {
    adam_warm_up_cosine(epochs, examples, options.batch_size, options.learning_rate, objective)
        .with_eval_batch_size(64)
        .with_seed(options.seed)
}

struct Phase {
    model: TransformerLm,
    result: ModelResult,
}

struct Context<'a> {
    options: &'a Options,
    device: &'a Device,
}

impl Context<'_> {
    /// Trains a model in `run_dir/name`, or loads it when that directory holds a finished run
    /// with the same config, training data and teacher. A directory holding anything else (an
    /// earlier run with other settings) is replaced.
    #[allow(clippy::too_many_arguments)]
    fn phase<S, V, It, Bt>(
        &self,
        name: &str,
        objective: &str,
        config: DistillConfig,
        init: &dyn Fn() -> TransformerLm,
        teacher: Option<&dyn Teacher<Tensor<2, Int>, 3>>,
        eval_teacher: Option<&dyn Teacher<Tensor<2, Int>, 3>>,
        train: &S,
        evals: &[EvalSet<'_, V>],
        batcher: &Bt,
    ) -> Result<Phase, Error>
    where
        S: Dataset<It> + Fingerprinted,
        V: Dataset<It>,
        It: Indexed,
        Bt: Batcher<It, TokenBatch> + EpochAware,
    {
        let options = self.options;
        let dir = options.run_dir.join(name);
        let weights = dir.join("final.bpk");
        let teacher_fingerprint = teacher.and_then(|teacher| teacher.fingerprint());
        let saved = SavedRun::read(&dir, &config)?;
        let finished = saved
            .finished(&dir)
            .cloned()
            .filter(|summary| summary.train_data == train.fingerprint() && summary.teacher == teacher_fingerprint);
        let (model, summary, records) = if let Some(summary) = finished {
            say(
                options,
                &format!("{name}: loading the finished run in {}", dir.display()),
            );
            let model = load_weights(init(), &weights)?;
            let records = read_metrics(&dir)?;
            (model, summary, records)
        } else {
            if dir.exists() {
                say(
                    options,
                    &format!("{name}: replacing the earlier run in {}", dir.display()),
                );
                std::fs::remove_dir_all(&dir)?;
            }
            say(
                options,
                &format!("{name}: training, {} epochs ({objective})", config.epochs),
            );
            let distiller = Distiller::new(config, &dir).with_progress(options.progress);
            let distiller = match teacher {
                Some(teacher) => distiller.with_teacher(teacher),
                None => distiller,
            };
            let distiller = match eval_teacher {
                Some(teacher) => distiller.with_eval_teacher(teacher),
                None => distiller,
            };
            let outcome = distiller.fit_on_policy(
                init(),
                FitData {
                    train,
                    evals,
                    train_batcher: batcher,
                    eval_batcher: batcher,
                },
                self.device,
            )?;
            save_weights(&outcome.student, &weights)?;
            (outcome.student, outcome.summary, outcome.records)
        };
        let last = &summary.last.eval[0].1;
        let positions: usize = records.iter().map(|r| r.train.positions).sum();
        let result = ModelResult {
            name: name.to_string(),
            objective: objective.to_string(),
            valid_loss: last.loss,
            valid_perplexity: last.loss.exp(),
            bits_per_byte: last.loss / std::f64::consts::LN_2,
            teacher_agreement: last.teacher_agreement,
            teacher_kl: last.teacher_kl,
            parameters: summary.student_parameters,
            train_tokens_per_second: positions as f64 / summary.train_seconds.max(1e-9),
            train_seconds: summary.train_seconds,
            disk_bytes: None,
            valid_loss_per_step: records
                .iter()
                .map(|r| (r.epoch * train.len().div_ceil(options.batch_size), r.eval[0].1.loss))
                .collect(),
        };
        say(
            options,
            &format!(
                "{name}: validation perplexity {:.3}, {:.4} bits per byte",
                result.valid_perplexity, result.bits_per_byte
            ),
        );
        Ok(Phase { model, result })
    }
}

fn tokens_of(windows: &Subset<TextWindows>, index: usize) -> Vec<u32> {
    let item = windows.get(index).expect("index within the subset");
    item.tokens.iter().map(|&b| u32::from(b)).collect()
}

/// What the transfer set was made from; a set made otherwise is regenerated.
#[derive(Debug, PartialEq, Serialize, Deserialize)]
struct TransferMeta {
    teacher: Fingerprint,
    training_windows: Fingerprint,
    transcripts: usize,
    prompt_tokens: usize,
    new_tokens: usize,
    sampling: SamplingConfig,
    seconds: f64,
}

/// The teacher's completions of the first `prompt_tokens` bytes of training windows, sampled at
/// temperature 1 (the teacher's own distribution), as JSONL.
fn transfer_set(
    options: &Options,
    teacher: &TransformerLm,
    teacher_fingerprint: Fingerprint,
    train: &Subset<TextWindows>,
    path: &Path,
    device: &Device,
) -> Result<(Vec<Transcript>, f64), Error> {
    let count = options.transcripts.min(train.len());
    let new_tokens = options.context + 1 - options.prompt_tokens;
    let sampling = SamplingConfig::new().with_seed(options.seed);
    let meta_path = path.with_extension("meta.json");
    let mut meta = TransferMeta {
        teacher: teacher_fingerprint,
        training_windows: train.fingerprint(),
        transcripts: count,
        prompt_tokens: options.prompt_tokens,
        new_tokens,
        sampling: sampling.clone(),
        seconds: 0.0,
    };
    if let Ok(text) = std::fs::read_to_string(&meta_path)
        && let Ok(saved) = serde_json::from_str::<TransferMeta>(&text)
        && (TransferMeta {
            seconds: saved.seconds,
            sampling: meta.sampling.clone(),
            ..meta
        }) == saved
        && path.is_file()
    {
        say(options, &format!("seq-kd: loading the transfer set {}", path.display()));
        let transcripts = read_transcripts(path)?;
        if transcripts.len() == count {
            return Ok((transcripts, saved.seconds));
        }
    }
    say(
        options,
        &format!("seq-kd: the teacher writes {count} completions of {new_tokens} bytes"),
    );
    let start = Instant::now();
    let prompts: Vec<Vec<u32>> = (0..count)
        .map(|i| tokens_of(train, i)[..options.prompt_tokens].to_vec())
        .collect();
    let transcripts = generate_transcripts(teacher, &prompts, new_tokens, &sampling, 128, device)?;
    meta.seconds = start.elapsed().as_secs_f64();
    write_transcripts(path, &transcripts)?;
    write_atomic(&meta_path, serde_json::to_string_pretty(&meta)?.as_bytes())?;
    Ok((transcripts, meta.seconds))
}

/// Opens the top-k cache at `path` when it was made from this teacher and these windows;
/// otherwise (re)builds it.
fn open_or_build_cache(
    options: &Options,
    path: &Path,
    teacher: &FrozenTeacher<TransformerLm>,
    teacher_fingerprint: Fingerprint,
    train: &Subset<TextWindows>,
    k: usize,
    device: &Device,
) -> Result<CachedTeacher, Error> {
    if path.is_file() {
        match CachedTeacher::open(path, train, teacher_fingerprint, device) {
            Ok(cached) if cached.cache().header().mode == (CacheMode::TopK { k }) => return Ok(cached),
            // Said even with --quiet: an hour-long rebuild should not be a surprise.
            Ok(cached) => {
                let mode = cached.cache().header().mode;
                super::runs::warn(
                    &options.run_dir,
                    &format!(
                        "rebuilding the teacher cache {}: it holds {mode:?}, not the top {k}",
                        path.display()
                    ),
                );
                drop(cached);
                std::fs::remove_file(path)?;
            }
            Err(error) => {
                super::runs::warn(
                    &options.run_dir,
                    &format!("rebuilding the teacher cache {}: {error}", path.display()),
                );
                std::fs::remove_file(path)?;
            }
        }
    }
    say(
        options,
        &format!("caching the teacher's top-{k} outputs in {}", path.display()),
    );
    let build = CacheBuildOptions::new(CacheMode::TopK { k })
        .with_batch_size(options.batch_size * 2)
        .with_progress(options.progress)
        .with_teacher_fingerprint(teacher_fingerprint);
    build_cache(path, teacher, train, &TokenBatcher, device, &build)?;
    Ok(CachedTeacher::open(path, train, teacher_fingerprint, device)?)
}

fn inference_tokens_per_second(model: &TransformerLm, valid: &Subset<TextWindows>, device: &Device) -> f64 {
    let items: Vec<_> = (0..valid.len().min(256))
        .map(|i| valid.get(i).expect("in range"))
        .collect();
    let batches: Vec<TokenBatch> = items
        .chunks(32)
        .map(|chunk| TokenBatcher.batch(chunk.to_vec(), device))
        .collect();
    // One warm-up pass (kernel compilation on GPU devices), then the timed pass.
    let _ = model.forward(batches[0].inputs.clone()).into_data();
    let start = Instant::now();
    let mut tokens = 0;
    for batch in &batches {
        let [rows, length] = batch.inputs.dims();
        let _ = model.forward(batch.inputs.clone()).into_data();
        tokens += rows * length;
    }
    tokens as f64 / start.elapsed().as_secs_f64()
}

fn megabytes(bytes: u64) -> String {
    format!("{:.1} MB", bytes as f64 / 1e6)
}

fn print_table(summary: &Summary) {
    let o = &summary.options;
    println!();
    println!(
        "Byte-level LM on the Jargon File: {} training tokens, {} validation tokens, context {}, {} device",
        summary.train_tokens, summary.valid_tokens, o.context, o.device
    );
    println!(
        "| model | objective | valid ppl | bits/byte | agreement with teacher | KL(teacher‖model) | parameters | train tok/s | teacher data on disk |"
    );
    println!("|---|---|---:|---:|---:|---:|---:|---:|---:|");
    let row = |result: &ModelResult| {
        println!(
            "| {} | {} | {:.3} | {:.4} | {} | {} | {} | {:.0} | {} |",
            result.name,
            result.objective,
            result.valid_perplexity,
            result.bits_per_byte,
            result
                .teacher_agreement
                .map_or("—".into(), |a| format!("{:.1} %", 100.0 * a)),
            result.teacher_kl.map_or("—".into(), |k| format!("{k:.4}")),
            result.parameters,
            result.train_tokens_per_second,
            result.disk_bytes.map_or("—".into(), megabytes),
        );
    };
    row(&summary.teacher);
    for student in &summary.students {
        row(student);
    }
    println!(
        "inference: teacher {:.0} tokens/s, student {:.0} tokens/s ({:.1}x); a dense f32 cache would take {}; the transfer set took {:.0} s to generate",
        summary.teacher_inference_tokens_per_second,
        summary.student_inference_tokens_per_second,
        summary.student_inference_tokens_per_second / summary.teacher_inference_tokens_per_second,
        megabytes(summary.dense_f32_cache_bytes),
        summary.transfer_set_seconds
    );
    println!(
        "best distilled student: {} ({:.4} bits per byte below the student alone)",
        summary.best_distilled, summary.best_gain_bits_per_byte
    );
}

/// Validation loss against the optimizer step, one line per model.
fn plot(path: &Path, summary: &Summary) -> Result<(), Error> {
    Chart {
        caption: "Students: validation loss (nats per byte) per step",
        x: "optimizer step",
        y: "validation loss",
        lines: summary
            .students
            .iter()
            .map(|r| {
                let points = r.valid_loss_per_step.iter().map(|&(s, l)| (s as f64, l)).collect();
                (r.name.clone(), points)
            })
            .collect(),
        reference: Some(("teacher (final)".into(), summary.teacher.valid_loss)),
        margin: 0.02,
    }
    .save(path)
}
