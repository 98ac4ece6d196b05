//! Chat-model distillation: a real Llama-family teacher (SmolLM2-135M-Instruct by default)
//! answers chat prompts, and a student made of a few of its blocks (or the same shape, randomly
//! initialised) learns from those answers with every method: alone on the corpus text, by
//! fine-tuning on the answers (black-box), by forward KL to an offline top-k cache (white-box),
//! by on-policy GKD and by the sampled per-token reverse KL.
//!
//! Shared by the `distill_chat` example (`main.rs`) and the root test harness, which runs it on
//! the tiny GGUF fixture.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use burn::data::dataset::Dataset;
use burn::module::Module;
use burn::tensor::{Device, Int, Tensor};
use burn_distill::data::{
    AnswerOptions, CacheBuildOptions, CacheMode, CachedTeacher, ChatPrompt, ChatTranscript, Fingerprinted,
    SequenceBatcher, Transcript, TranscriptDataset, answer_prompts, build_cache, default_text_file, jargon_entries,
    jargon_prompts, read_chat_prompts, split_of, split_prompts, tokenizer_fingerprint,
};
use burn_distill::loss::{Divergence, DivergenceLossConfig, SparseKlLossConfig, TailPolicy, device_by_name};
use burn_distill::model::llm::{
    ChatTokenizer, GenerateOptions, Llama, LoadedModel, SMOLLM2_FILE, VocabularyMatch, export_hf, load_model,
    smollm2_cache_path,
};
use burn_distill::model::{
    ConnectorConfig, Fingerprint, FrozenTeacher, SamplingConfig, Teacher, TeacherOn, init_seeded, load_weights,
    save_weights,
};
use burn_distill::serve::{Lineage, SparseTeacher, TransferSet, chat_transcripts};
use burn_distill::train::{
    DistillConfig, Distiller, EvalMetrics, EvalSet, FeatureKind, FeatureTermConfig, FitData, ObjectiveConfig,
    OnPolicyConfig, Precision, corpus_chrf, evaluate, read_metrics,
};
use serde::{Deserialize, Serialize};

use super::runs::{Chart, SavedRun, adam_warm_up_cosine, write_atomic};

type Error = Box<dyn std::error::Error>;
type LlmTeacher<'a> = &'a dyn Teacher<Tensor<2, Int>, 3>;

/// The teacher on its own device.
type LlmTeacherOn = TeacherOn<FrozenTeacher<Llama>>;

/// How a student learns.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Method {
    /// Next-token cross-entropy on the corpus text; no teacher.
    Alone,
    /// Black-box, sequence-level: cross-entropy on the teacher's answers (answer tokens only).
    Sft,
    /// White-box, token-level: forward KL to the offline top-k cache on the same answers.
    TopK,
    /// On-policy GKD: with probability λ the student answers and the teacher scores every token
    /// (generalised JSD with β).
    Gkd,
    /// On-policy, cheap: the student answers, the teacher gives the log-probability of each
    /// sampled token, and the per-token reverse KL is the signal.
    SampledRkl,
    /// White-box with the live teacher: dense forward KL on the training answers (the control
    /// of `kl+hidden`).
    Kl,
    /// `kl` plus a hidden-state term: a student block's output, through a learned projection,
    /// against a teacher block's (MSE, cosine or CKA; answer tokens only).
    KlHidden,
}

impl Method {
    /// Every method of the default runs, in the table's order.
    pub const ALL: [Method; 5] = [Self::Alone, Self::Sft, Self::TopK, Self::Gkd, Self::SampledRkl];

    /// Methods run only when named (`--methods kl,kl+hidden`): each needs the live teacher's
    /// forward pass at every step.
    pub const EXTRA: [Method; 2] = [Self::Kl, Self::KlHidden];

    /// The name on the command line and in `summary.json`.
    pub fn name(self) -> &'static str {
        match self {
            Self::Alone => "alone",
            Self::Sft => "sft",
            Self::TopK => "top-k-kl",
            Self::Gkd => "gkd",
            Self::SampledRkl => "sampled-rkl",
            Self::Kl => "kl",
            Self::KlHidden => "kl+hidden",
        }
    }

    /// The method named `name`.
    pub fn parse(name: &str) -> Result<Self, String> {
        Self::ALL
            .into_iter()
            .chain(Self::EXTRA)
            .find(|m| m.name() == name)
            .ok_or_else(|| {
                let names: Vec<_> = Self::ALL.iter().chain(&Self::EXTRA).map(|m| m.name()).collect();
                format!("no method {name:?}; the methods are {}", names.join(", "))
            })
    }
}

/// Where a student's weights start.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Init {
    /// The teacher's embedding, final norm and the chosen blocks (DistilBERT-style).
    Teacher,
    /// The same architecture, randomly initialised.
    Random,
    /// The finished `sft` student (from the teacher's blocks): on-policy distillation as it is
    /// practised, after fine-tuning, with twice the budget of a method from the start.
    AfterSft,
    /// The model `--student` names (instead of the teacher's blocks).
    Given,
}

/// What to do with a `--student` whose tokenizer is not the teacher's.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum VocabPolicy {
    /// When the two vocabularies agree on every id both have (one extended or padded): resize
    /// the student's embedding and head to the teacher's ids (`Llama::with_vocab_size`: extra
    /// rows dropped, new rows the mean row), then train and evaluate it with the teacher's
    /// tokenizer and chat template.
    Resize,
}

impl VocabPolicy {
    /// The policy named `name` on the command line.
    pub fn parse(name: &str) -> Result<Self, String> {
        match name {
            "resize" => Ok(Self::Resize),
            _ => Err(format!("--vocab-policy {name:?}: the policies are: resize")),
        }
    }
}

/// What to run.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Options {
    /// `ndarray`, `flex`, `wgpu` or `cuda`.
    pub device: String,
    /// The teacher: a GGUF file or a Hugging Face directory (default: the SmolLM2 file that
    /// `scripts/fetch_smollm2.sh` caches).
    pub model: Option<PathBuf>,
    /// Where the teacher runs: a device name, or `ws://HOST:PORT[/INDEX]` for a device of a
    /// `burn-distill-device-server` in another process or on another machine (`None`: the
    /// training device). The students train on `device` either way.
    #[serde(default)]
    pub teacher_device: Option<String>,
    /// A JSONL file of chat prompts (default: one per head word of the Jargon File).
    pub prompts: Option<PathBuf>,
    /// The student to start from: a GGUF file or a Hugging Face directory (default: a subset
    /// of the teacher's blocks). Its tokenizer must be the teacher's unless `vocab_policy` says
    /// what to do.
    pub student: Option<PathBuf>,
    /// How a `student` with another tokenizer is aligned to the teacher's (`None`: refused).
    pub vocab_policy: Option<VocabPolicy>,
    /// A transfer set harvested from a served teacher (the `harvest` example's `--out`): its
    /// answers are the training answers, and its top log-probabilities the top-k teacher,
    /// instead of the local teacher's. Validation and test answers still come from `model`.
    pub transfer_set: Option<PathBuf>,
    /// Where everything goes; a rerun reuses what is finished and resumes what is not.
    pub run_dir: PathBuf,
    /// Training prompts (spread over the training split).
    pub train_prompts: usize,
    /// Validation prompts: hyper-parameters are chosen on these.
    pub valid_prompts: usize,
    /// Test prompts: read once, for the table.
    pub test_prompts: usize,
    /// The most tokens of each answer (teacher and students).
    pub answer_tokens: usize,
    /// The teacher's sampling temperature for the training answers (validation and test
    /// answers are greedy).
    pub answer_temperature: f64,
    /// Prompts answered at once (KV-cached batches).
    pub answer_batch: usize,
    /// The teacher's blocks the student keeps; `None`: of a few subsets of `depth` blocks
    /// (evenly spaced, the first ones with the last ones), the one whose initialisation is
    /// closest to the teacher on the validation answers.
    pub blocks: Option<Vec<usize>>,
    /// The student's blocks when `blocks` is `None`.
    pub depth: usize,
    /// Methods run from the teacher's blocks.
    pub methods: Vec<Method>,
    /// Methods run from a random initialisation.
    pub random_methods: Vec<Method>,
    /// Methods continued from the finished `sft` student (`sft` must be among `methods`).
    pub after_sft: Vec<Method>,
    /// Their peak learning rate (`None`: `learning_rate`).
    pub after_sft_learning_rate: Option<f64>,
    /// Epochs of every method.
    pub epochs: usize,
    /// Sequences per optimizer step.
    pub batch_size: usize,
    /// Peak Adam learning rate from the teacher's blocks (5 % warm-up, cosine to a tenth).
    pub learning_rate: f64,
    /// Peak learning rate from a random initialisation.
    pub random_learning_rate: f64,
    /// Teacher log-probabilities kept per token in the offline cache.
    pub top_k: usize,
    /// Weight of the hard (answer-token cross-entropy) term beside the top-k KL.
    pub hard_weight: f64,
    /// GKD's share of steps on student answers.
    pub lambda: f64,
    /// GKD's generalised-JSD β (0: forward KL, 1: reverse KL).
    pub beta: f64,
    /// `kl+hidden`'s term: its weight, kind (`mse`, `cosine` or `cka`) and taps
    /// (`STUDENT:TEACHER`, default the last block of each).
    #[serde(default)]
    pub hidden: HiddenTerm,
    /// Seed of sampling, initialisation and data order.
    pub seed: u64,
    /// The precision the students train in (f32 weights either way).
    pub precision: Precision,
    /// Measure every model on the test prompts. Off (`--no-test`) for hyper-parameter sweeps:
    /// the test figures are NaN and the test set is not read.
    pub test: bool,
    /// Print progress.
    pub progress: bool,
}

impl Options {
    /// The full run: 256 training prompts with answers of up to 64 tokens, every method from
    /// the teacher's blocks, fine-tuning and the top-k KL from a random start too, and GKD (with
    /// fine-tuning as its control) continued from the fine-tuned student. Each count is an
    /// option; 1 024 prompts of 96 tokens with every method from both starts is about 8 hours
    /// on 2 cores.
    pub fn full() -> Self {
        Self {
            device: "flex".into(),
            model: None,
            teacher_device: None,
            prompts: None,
            student: None,
            vocab_policy: None,
            transfer_set: None,
            run_dir: PathBuf::from("runs/distill_chat"),
            train_prompts: 256,
            valid_prompts: 32,
            test_prompts: 64,
            answer_tokens: 64,
            answer_temperature: 1.0,
            answer_batch: 16,
            blocks: None,
            depth: 6,
            methods: Method::ALL.to_vec(),
            random_methods: vec![Method::Sft, Method::TopK],
            after_sft: vec![Method::Gkd, Method::Sft],
            after_sft_learning_rate: None,
            epochs: 3,
            batch_size: 8,
            learning_rate: 3e-4,
            random_learning_rate: 1e-3,
            top_k: 32,
            hard_weight: 0.0,
            lambda: 0.5,
            beta: 0.0,
            hidden: HiddenTerm::default(),
            seed: 1,
            precision: Precision::F32,
            test: true,
            progress: true,
        }
    }

    /// `--quick`: fewer prompts, shorter answers, the random initialisation for one method
    /// only; under 15 minutes on 2 cores.
    pub fn quick() -> Self {
        Self {
            run_dir: PathBuf::from("runs/distill_chat-quick"),
            train_prompts: 64,
            valid_prompts: 16,
            test_prompts: 32,
            answer_tokens: 48,
            random_methods: vec![Method::TopK],
            after_sft: Vec::new(),
            ..Self::full()
        }
    }
}

/// The hidden-state term of `kl+hidden`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct HiddenTerm {
    /// Its weight beside the KL.
    pub weight: f64,
    /// `mse`, `cosine` or `cka`.
    pub kind: String,
    /// `(student tap, teacher tap)`; `None`: the last block of each (`block.{n-1}`).
    pub taps: Option<(String, String)>,
    /// Start the projection at random even where the widths are equal (by default it then
    /// starts as the identity: a student made of the teacher's blocks shares its space).
    #[serde(default)]
    pub random_projection: bool,
}

impl Default for HiddenTerm {
    fn default() -> Self {
        Self {
            weight: 1.0,
            kind: "cosine".into(),
            taps: None,
            random_projection: false,
        }
    }
}

impl HiddenTerm {
    /// The kind, or a message naming the accepted ones.
    pub fn feature_kind(&self) -> Result<FeatureKind, String> {
        match self.kind.as_str() {
            "mse" => Ok(FeatureKind::Mse),
            "cosine" => Ok(FeatureKind::Cosine),
            "cka" => Ok(FeatureKind::Cka { debiased: true }),
            other => Err(format!("hidden-state kind {other:?}: use mse, cosine or cka")),
        }
    }
}

/// A model's figures on the test prompts (read once, after training).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TestMetrics {
    /// Mean KL(teacher ‖ model) per answer token, teacher-forced on the teacher's test answers.
    pub kl_to_teacher: f64,
    /// Share of answer tokens where the model's top-1 next token is the teacher's.
    pub agreement: f64,
    /// Perplexity of the teacher's test answers.
    pub perplexity: f64,
    /// Perplexity of held-out corpus text (the test terms' Jargon File definitions).
    pub corpus_perplexity: f64,
    /// Corpus chrF (sacrebleu's defaults) of its greedy answers against the teacher's.
    pub chrf: f64,
    /// Greedy answer tokens per second, batched with the KV cache, prefill included.
    pub tokens_per_second: f64,
    /// Its greedy answers to the test prompts.
    pub answers: Vec<String>,
}

impl TestMetrics {
    /// Figures not measured (`--no-test`).
    fn unread() -> Self {
        Self {
            kl_to_teacher: f64::NAN,
            agreement: f64::NAN,
            perplexity: f64::NAN,
            corpus_perplexity: f64::NAN,
            chrf: f64::NAN,
            tokens_per_second: f64::NAN,
            answers: Vec::new(),
        }
    }
}

/// One method's results, as written to `summary.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MethodResult {
    /// What it was trained with.
    pub description: String,
    /// Where its weights started.
    pub init: Init,
    /// Parameters.
    pub parameters: usize,
    /// Parameters outside the (tied) embedding.
    pub non_embedding_parameters: usize,
    /// On the test prompts.
    pub kl_to_teacher: f64,
    /// On the test prompts.
    pub agreement: f64,
    /// Of the teacher's test answers.
    pub perplexity: f64,
    /// Of held-out corpus text.
    pub corpus_perplexity: f64,
    /// Of its greedy test answers against the teacher's.
    pub chrf: f64,
    /// Greedy answer tokens per second.
    pub tokens_per_second: f64,
    /// KL to the teacher on the validation answers after the last epoch.
    pub valid_kl: f64,
    /// KL to the teacher on the validation answers at each optimizer step it was measured at
    /// (step 0: the initialisation).
    pub valid_kl_per_step: Vec<(usize, f64)>,
    /// Training seconds (teacher forward passes and rollouts included).
    pub train_seconds: f64,
    /// Counted training tokens per second.
    pub train_tokens_per_second: f64,
    /// Bytes of teacher data it learnt from on disk (transfer set or cache).
    pub teacher_data_bytes: Option<u64>,
}

/// The teacher's figures.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TeacherResult {
    /// The file it was loaded from.
    pub model: String,
    /// Blocks.
    pub blocks: usize,
    /// Parameters.
    pub parameters: usize,
    /// Parameters outside the (tied) embedding.
    pub non_embedding_parameters: usize,
    /// Of its own greedy test answers.
    pub perplexity: f64,
    /// Of held-out corpus text.
    pub corpus_perplexity: f64,
    /// Greedy answer tokens per second on the test prompts.
    pub tokens_per_second: f64,
    /// Seconds spent answering the training prompts (when answered in this run).
    pub answer_seconds: Option<f64>,
}

/// The whole run, as written to `summary.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Summary {
    /// The options it ran with.
    pub options: Options,
    /// The teacher.
    pub teacher: TeacherResult,
    /// Every student, by name: `<method>` from the teacher's blocks, `<method>-random` from a
    /// random initialisation.
    pub methods: BTreeMap<String, MethodResult>,
    /// Prompts per split.
    pub prompts: [usize; 3],
    /// Answer tokens in the training transfer set.
    pub train_answer_tokens: usize,
    /// The teacher's blocks the students are made of.
    pub blocks: Vec<usize>,
    /// Each candidate subset of blocks with its initialisation's KL to the teacher on the
    /// validation answers (the lowest is chosen).
    pub block_choice: Vec<(Vec<usize>, f64)>,
    /// Bytes per token of the top-k cache on disk (positions of prompt and padding included).
    pub cache_bytes_per_token: f64,
    /// Its k: `--top-k`, or the most log-probabilities a served teacher gave at one position.
    #[serde(default)]
    pub cache_top_k: usize,
    /// Bytes per token a dense f32 cache would take: 4 × vocabulary.
    pub dense_bytes_per_token: f64,
    /// The distilled student closest to the teacher on validation (KL).
    pub best_distilled: String,
    /// Wall-clock seconds of this invocation.
    pub seconds: f64,
}

struct Data {
    train: TranscriptDataset,
    valid: TranscriptDataset,
    test: TranscriptDataset,
    corpus_train: TranscriptDataset,
    corpus_test: TranscriptDataset,
    test_prompts: Vec<ChatPrompt>,
    test_answers: Vec<ChatTranscript>,
    eos: Vec<u32>,
}

/// Runs every phase and writes the summary, plot and samples.
///
/// # Errors
/// A missing teacher file, bad prompts, bad options, data, model, training or file errors; all
/// checked before the long work where they can be.
pub fn run(options: &Options) -> Result<Summary, Error> {
    let start = Instant::now();
    check_options(options)?;
    let device =
        device_by_name(&options.device).ok_or_else(|| format!("--device {}: not in this build", options.device))?;
    let training = device.clone().autodiff();
    let teacher_device = match &options.teacher_device {
        Some(spec) => burn_distill::open_device(spec).map_err(|err| format!("--teacher-device: {err}"))?,
        None => device.clone(),
    };
    let model_path = match &options.model {
        Some(path) => path.clone(),
        None => {
            let path = smollm2_cache_path().unwrap_or_else(|| PathBuf::from(SMOLLM2_FILE));
            if !path.exists() {
                return Err(format!(
                    "no --model given and no SmolLM2 file at {}: run `bash scripts/fetch_smollm2.sh` first",
                    path.display()
                )
                .into());
            }
            path
        }
    };
    let prompts = match &options.prompts {
        Some(path) => read_chat_prompts(path)?,
        None => jargon_prompts(&jargon()?),
    };
    let LoadedModel {
        model: teacher_model,
        tokenizer,
    } = load_model(&model_path, &teacher_device).map_err(|e| format!("--model {}: {e}", model_path.display()))?;
    let vocab = teacher_model.config().vocab_size;
    if tokenizer.vocab_size() > vocab {
        return Err(format!(
            "the tokenizer has {} ids but the model only {vocab} logits",
            tokenizer.vocab_size()
        )
        .into());
    }
    // The students start from a copy on the training device: of the teacher's blocks, or the
    // model --student names.
    let teacher_blocks = load_model(&model_path, &training)?.model;
    let given = match &options.student {
        Some(path) => Some(given_student(options, path, &tokenizer, vocab, &training)?),
        None => None,
    };
    let candidates = match (&given, &options.blocks) {
        (Some(_), _) => Vec::new(),
        (None, Some(blocks)) => vec![blocks.clone()],
        (None, None) => block_candidates(teacher_model.config().num_hidden_layers, options.depth)?,
    };
    for blocks in &candidates {
        teacher_blocks
            .with_blocks(blocks)
            .map_err(|e| format!("--blocks {blocks:?}: {e}"))?;
    }
    let student_shape = match &given {
        Some(student) => student.clone(),
        None => teacher_blocks.with_blocks(&candidates[0])?,
    };
    std::fs::create_dir_all(&options.run_dir)?;
    let teacher_params = teacher_model.num_params();
    let student_params = student_shape.num_params();
    say(
        options,
        &format!(
            "teacher {} ({} blocks, {:.1} M parameters, {:.1} M outside the embedding); student{}: {} blocks ({:.1} M, {:.1} M outside the embedding, {:.1}x fewer)",
            model_path.display(),
            teacher_model.config().num_hidden_layers,
            teacher_params as f64 / 1e6,
            non_embedding(&teacher_model) as f64 / 1e6,
            options
                .student
                .as_ref()
                .map_or(String::new(), |path| format!(" {}", path.display())),
            student_shape.config().num_hidden_layers,
            student_params as f64 / 1e6,
            non_embedding(&student_shape) as f64 / 1e6,
            non_embedding(&teacher_model) as f64 / non_embedding(&student_shape).max(1) as f64,
        ),
    );

    // 1. Prompts, split by term, and the teacher's answers to them.
    let splits = split_prompts(prompts, 0.1, 0.1)?;
    let train_prompts = spread(&splits.train, options.train_prompts);
    let valid_prompts = spread(&splits.valid, options.valid_prompts);
    let test_prompts = spread(&splits.test, options.test_prompts);
    if train_prompts.is_empty() || valid_prompts.is_empty() || test_prompts.is_empty() {
        return Err(format!(
            "the prompts give {} training, {} validation and {} test prompts: each split needs at least one",
            train_prompts.len(),
            valid_prompts.len(),
            test_prompts.len()
        )
        .into());
    }
    say(
        options,
        &format!(
            "prompts: {} training, {} validation, {} test (of {} / {} / {}); run directory {}",
            train_prompts.len(),
            valid_prompts.len(),
            test_prompts.len(),
            splits.train.len(),
            splits.valid.len(),
            splits.test.len(),
            options.run_dir.display()
        ),
    );
    let answer =
        |name: &str, prompts: &[ChatPrompt], temperature: f64| -> Result<(Vec<ChatTranscript>, Option<f64>), Error> {
            let path = options.run_dir.join(format!("answers-{name}.jsonl"));
            let answer_options = AnswerOptions {
                max_new_tokens: options.answer_tokens,
                sampling: SamplingConfig::new()
                    .with_temperature(temperature)
                    .with_seed(options.seed),
                batch_size: options.answer_batch,
            };
            let started = Instant::now();
            let mut first_done = None;
            let mut progress = |done: usize, total: usize| {
                first_done.get_or_insert(done);
                if options.progress && done < total {
                    eprint!("\rteacher answers ({name}): {done}/{total}  ");
                }
            };
            let answers = match answer_prompts(
                &teacher_model,
                &tokenizer,
                prompts,
                &answer_options,
                &path,
                &mut progress,
            ) {
                // Answers made for other prompts, options or by another teacher are not these.
                Err(burn_distill::data::DataError::OtherTransferSet { what, .. }) => {
                    eprintln!(
                        "warning: answering again: {} was made with another {what}",
                        path.display()
                    );
                    std::fs::remove_file(&path)?;
                    answer_prompts(
                        &teacher_model,
                        &tokenizer,
                        prompts,
                        &answer_options,
                        &path,
                        &mut progress,
                    )?
                }
                other => other?,
            };
            if options.progress && first_done != Some(answers.len()) {
                eprintln!(
                    "\rteacher answers ({name}): {} in {:.0} s",
                    answers.len(),
                    started.elapsed().as_secs_f64()
                );
            }
            let fresh = first_done == Some(0);
            Ok((answers, fresh.then(|| started.elapsed().as_secs_f64())))
        };
    let needs_cache = options
        .methods
        .iter()
        .chain(&options.random_methods)
        .any(|&m| m == Method::TopK);
    let served = match &options.transfer_set {
        Some(dir) => Some(served_answers(
            dir,
            &tokenizer,
            &valid_prompts,
            &test_prompts,
            needs_cache,
            &options.run_dir,
        )?),
        None => None,
    };
    let (train_answers, answer_seconds) = match &served {
        Some(served) => (served.transcripts.clone(), None),
        None => answer("train", &train_prompts, options.answer_temperature)?,
    };
    let (valid_answers, _) = answer("valid", &valid_prompts, 0.0)?;
    let (test_answers, _) = answer("test", &test_prompts, 0.0)?;
    let transcripts = |answers: &[ChatTranscript]| -> Result<TranscriptDataset, Error> {
        let transcripts: Vec<Transcript> = answers.iter().map(ChatTranscript::transcript).collect();
        let context = transcripts
            .iter()
            .map(|t| t.prompt_ids().len() + t.completion_ids().len() - 1)
            .max()
            .unwrap_or(1);
        Ok(TranscriptDataset::new(&transcripts, context, vocab, false)?)
    };

    // 2. The corpus text for the student alone (training terms' definitions) and for held-out
    // perplexity (test terms'), tokenized with the teacher's tokenizer, truncated to the answers'
    // length; as many training definitions as give the transfer set's answer tokens.
    let entries = jargon()?;
    let corpus = |split: usize, budget: usize| -> Result<TranscriptDataset, Error> {
        let mut sequences = Vec::new();
        let mut tokens = 0;
        for entry in entries.iter().filter(|e| split_of(&e.term, 0.1, 0.1) == split) {
            if tokens >= budget {
                break;
            }
            let mut ids = tokenizer.encode(&format!("{}: {}", entry.term, entry.definition), false)?;
            ids.truncate(options.answer_tokens + 1);
            if ids.len() < 2 {
                continue;
            }
            tokens += ids.len() - 1;
            sequences.push(Transcript::from_tokens(&[], &ids));
        }
        Ok(TranscriptDataset::new(&sequences, options.answer_tokens, vocab, true)?)
    };
    let train = transcripts(&train_answers)?;
    let data = Data {
        corpus_train: corpus(0, train.target_tokens())?,
        corpus_test: corpus(2, test_prompts.len() * options.answer_tokens)?,
        train,
        valid: transcripts(&valid_answers)?,
        test: transcripts(&test_answers)?,
        test_prompts: test_prompts.clone(),
        test_answers,
        eos: tokenizer.eos_ids().to_vec(),
    };

    // 3. The offline top-k cache of the teacher's log-probabilities on the training answers.
    // On its own device (a device server's, say): batches go there and logits come back.
    let teacher = TeacherOn::new(FrozenTeacher::new(&teacher_model), teacher_device.clone());
    let fingerprint = Teacher::<Tensor<2, Int>, 3>::fingerprint(&teacher).ok_or("the teacher has no fingerprint")?;
    let cache_path = match &served {
        Some(served) => options.run_dir.join(format!(
            "teacher-served-top{}.bdkd",
            served.sparse.as_ref().map_or(0, |sparse| sparse.k)
        )),
        None => options.run_dir.join(format!("teacher-top{}.bdkd", options.top_k)),
    };
    let cached = match (&served, needs_cache) {
        (_, false) => None,
        (Some(served), true) => Some(served_cache(options, served, &cache_path, &data.train, vocab, &device)?),
        (None, true) => Some(open_or_build_cache(
            options,
            &cache_path,
            &teacher,
            fingerprint,
            &data.train,
            &device,
        )?),
    };

    // 4. The teacher's own figures.
    let teacher_result = teacher_figures(
        options,
        &model_path,
        &teacher_model,
        &tokenizer,
        &data,
        &teacher_device,
        answer_seconds,
    )?;

    // 5. Every student.
    let mut ctx = Context {
        options,
        blocks: candidates.first().cloned().unwrap_or_default(),
        given: given.as_ref(),
        device: &training,
        infer: &device,
        teacher: &teacher,
        teacher_blocks: &teacher_blocks,
        tokenizer: &tokenizer,
        data: &data,
        cached: cached.as_ref(),
        cache_bytes: needs_cache.then(|| std::fs::metadata(&cache_path).map(|m| m.len()).unwrap_or(0)),
        transfer_bytes: match &served {
            Some(served) => std::fs::metadata(served.set.dir.join(burn_distill::serve::RECORDS_FILE))?.len(),
            None => std::fs::metadata(options.run_dir.join("answers-train.jsonl"))?.len(),
        },
    };
    let block_choice = if given.is_some() {
        Vec::new()
    } else {
        ctx.choose_blocks(&candidates)?
    };
    let mut methods = BTreeMap::new();
    let first = if given.is_some() { Init::Given } else { Init::Teacher };
    let runs = options
        .methods
        .iter()
        .map(|&m| (first, m))
        .chain(options.random_methods.iter().map(|&m| (Init::Random, m)))
        .chain(options.after_sft.iter().map(|&m| (Init::AfterSft, m)));
    for (init, method) in runs {
        let (name, result) = ctx.phase(init, method)?;
        methods.insert(name, result);
    }

    let best_distilled = methods
        .iter()
        .filter(|(_, r)| !r.description.starts_with("alone"))
        .min_by(|a, b| a.1.valid_kl.total_cmp(&b.1.valid_kl))
        .map(|(name, _)| name.clone())
        .unwrap_or_default();
    // The best distilled student as a Hugging Face directory with the teacher's tokenizer and
    // chat template: what `serve --model` (and transformers) read.
    if !best_distilled.is_empty() {
        let weights = options.run_dir.join(&best_distilled).join("final.bpk");
        let student = load_weights(ctx.init(first)?, &weights)
            .map_err(|e| format!("the {best_distilled} student {}: {e}", weights.display()))?;
        let dir = options.run_dir.join("best-hf");
        export_hf(&student, &dir)?;
        tokenizer.save(&dir)?;
    }
    // The cache holds every sequence padded to the longest.
    let cache_tokens = data.train.len() * max_len(&data.train);
    let summary = Summary {
        options: options.clone(),
        teacher: teacher_result,
        prompts: [
            served
                .as_ref()
                .map_or(train_prompts.len(), |served| served.set.card.prompts.count),
            valid_prompts.len(),
            test_prompts.len(),
        ],
        train_answer_tokens: data.train.target_tokens(),
        blocks: ctx.blocks.clone(),
        block_choice,
        cache_bytes_per_token: ctx.cache_bytes.map_or(0.0, |b| b as f64 / cache_tokens.max(1) as f64),
        cache_top_k: ctx.cache_k(),
        dense_bytes_per_token: (4 * vocab) as f64,
        best_distilled,
        methods,
        seconds: start.elapsed().as_secs_f64(),
    };
    write_atomic(
        &options.run_dir.join("summary.json"),
        serde_json::to_string_pretty(&summary)?.as_bytes(),
    )?;
    plot(&options.run_dir.join("valid-kl.png"), &summary)?;
    if options.test {
        write_atomic(&options.run_dir.join("samples.md"), samples(&summary, &data).as_bytes())?;
    }
    if options.progress {
        print_table(&summary);
        println!(
            "wrote {}, {}, {}, a metrics.jsonl per method, and the best student ({}) in {}",
            options.run_dir.join("summary.json").display(),
            options.run_dir.join("valid-kl.png").display(),
            options.run_dir.join("samples.md").display(),
            summary.best_distilled,
            options.run_dir.join("best-hf").display()
        );
    }
    Ok(summary)
}

/// The model `--student` names, on the training device. A student with the teacher's tokenizer
/// (the same fingerprint: vocabulary, merges, normalisation, special tokens, chat template) and
/// as many logits is taken as it is. Any other is refused unless `vocab_policy` is named, and
/// then only when the two vocabularies agree on every id both have: it is resized to the
/// teacher's ids and from then on reads the teacher's tokenizer and chat template. Vocabularies
/// that differ at an id are refused whatever the policy: token-level losses compare logits id
/// by id.
fn given_student(
    options: &Options,
    path: &Path,
    teacher_tokenizer: &ChatTokenizer,
    vocab: usize,
    device: &Device,
) -> Result<Llama, Error> {
    let named = |what: String| -> Error { format!("--student {}: {what}", path.display()).into() };
    let LoadedModel { model, tokenizer } = load_model(path, device).map_err(|e| named(e.to_string()))?;
    let student_vocab = model.config().vocab_size;
    let same_tokenizer = tokenizer_fingerprint(&tokenizer)? == tokenizer_fingerprint(teacher_tokenizer)?;
    if same_tokenizer && student_vocab == vocab {
        return Ok(model);
    }
    let differs = match tokenizer.vocabulary_match(teacher_tokenizer) {
        VocabularyMatch::Different { .. } if !same_tokenizer => {
            return Err(named(format!(
                "its tokenizer is not the teacher's ({}): token-level distillation compares logits id by id, so no vocabulary policy can align them; give a student with the teacher's tokenizer",
                tokenizer.vocabulary_match(teacher_tokenizer)
            )));
        }
        _ if same_tokenizer => format!("the teacher's tokenizer, but {student_vocab} logits against the teacher's {vocab}"),
        VocabularyMatch::Same => "the same vocabulary as the teacher's tokenizer, but other merges, normalisation, special tokens or chat template".to_string(),
        extended => format!("a tokenizer with {extended} of the teacher's"),
    };
    match options.vocab_policy {
        None => Err(named(format!(
            "it has {differs}; name --vocab-policy resize to resize it to the teacher's {vocab} ids and train it with the teacher's tokenizer and chat template"
        ))),
        Some(VocabPolicy::Resize) => {
            say(
                options,
                &format!(
                    "--student {}: it has {differs}; resized from {student_vocab} to the teacher's {vocab} ids (--vocab-policy resize), with the teacher's tokenizer and chat template",
                    path.display()
                ),
            );
            Ok(model.with_vocab_size(vocab)?)
        }
    }
}

fn check_options(options: &Options) -> Result<(), Error> {
    let bad = |what: &str| -> Result<(), Error> { Err(what.to_string().into()) };
    if options.epochs == 0 || options.batch_size == 0 || options.answer_batch == 0 || options.answer_tokens == 0 {
        return bad("--epochs, --batch-size, --answer-batch and --answer-tokens must be at least 1");
    }
    if options.methods.is_empty() && options.random_methods.is_empty() {
        return bad("no method to run: give --methods or --random-methods");
    }
    if !options.after_sft.is_empty() && !options.methods.contains(&Method::Sft) {
        return bad("--after-sft continues the sft student: give sft in --methods too");
    }
    if !(0.0..=1.0).contains(&options.lambda) || !(0.0..=1.0).contains(&options.beta) {
        return bad("--lambda and --beta must be in [0, 1]");
    }
    if options.top_k == 0 {
        return bad("--top-k must be at least 1");
    }
    options.hidden.feature_kind()?;
    if !(options.hidden.weight.is_finite() && options.hidden.weight >= 0.0) {
        return bad("--hidden-weight must be finite and >= 0");
    }
    if options.student.is_some() && options.blocks.is_some() {
        return bad("--blocks picks the student's blocks from the teacher, --student gives the student: choose one");
    }
    if options.student.is_none() && options.vocab_policy.is_some() {
        return bad("--vocab-policy aligns a --student model's vocabulary: give --student too");
    }
    for (name, value) in [
        ("--learning-rate", options.learning_rate),
        ("--random-learning-rate", options.random_learning_rate),
        (
            "--after-sft-learning-rate",
            options.after_sft_learning_rate.unwrap_or(options.learning_rate),
        ),
    ] {
        if !(value.is_finite() && value > 0.0) {
            return Err(format!("{name} {value} must be finite and > 0").into());
        }
    }
    if !(options.hard_weight.is_finite() && (0.0..=1.0).contains(&options.hard_weight)) {
        return bad("--hard-weight must be in [0, 1]");
    }
    if !(options.answer_temperature.is_finite() && options.answer_temperature >= 0.0) {
        return bad("--answer-temperature must be finite and >= 0");
    }
    Ok(())
}

fn jargon() -> Result<Vec<burn_distill::data::JargonEntry>, Error> {
    let corpus = burn_distill::data::ByteCorpus::from_file(&default_text_file())?;
    Ok(jargon_entries(std::str::from_utf8(corpus.bytes())?))
}

/// Subsets of `depth` of a teacher's `layers` blocks worth trying as a student: evenly spaced,
/// the first blocks with the last one, two or half, and the last blocks alone (deep blocks next
/// to each other tend to do similar work; the first and last ones do not).
fn block_candidates(layers: usize, depth: usize) -> Result<Vec<Vec<usize>>, Error> {
    if depth == 0 || depth > layers {
        return Err(format!("--depth {depth}: the teacher has {layers} blocks").into());
    }
    let mut candidates = vec![
        (0..depth)
            .map(|i| i * (layers - 1) / (depth - 1).max(1))
            .collect::<Vec<_>>(),
    ];
    for last in [1, 2, depth / 2, depth] {
        if last >= 1 && last <= depth {
            candidates.push((0..depth - last).chain(layers - last..layers).collect());
        }
    }
    let mut unique: Vec<Vec<usize>> = Vec::new();
    for candidate in candidates {
        if !unique.contains(&candidate) {
            unique.push(candidate);
        }
    }
    Ok(unique)
}

/// `count` items spread evenly over `items` (all of them when there are fewer).
fn spread<T: Clone>(items: &[T], count: usize) -> Vec<T> {
    let count = count.min(items.len());
    (0..count).map(|i| items[i * items.len() / count].clone()).collect()
}

fn max_len(dataset: &TranscriptDataset) -> usize {
    (0..dataset.len())
        .filter_map(|i| dataset.get(i).ok())
        .map(|item| item.tokens.len() - 1)
        .max()
        .unwrap_or(0)
}

/// Parameters outside the token embedding (and the head, when it is not tied to it).
fn non_embedding(model: &Llama) -> usize {
    let config = model.config();
    let tables = if config.tie_word_embeddings { 1 } else { 2 };
    model.num_params() - tables * config.vocab_size * config.hidden_size
}

fn say(options: &Options, line: &str) {
    if options.progress {
        println!("{line}");
    }
}

/// Adam, 5 % linear warm-up, cosine decay to a tenth.
fn config(options: &Options, peak: f64, objective: ObjectiveConfig, examples: usize) -> DistillConfig {
    adam_warm_up_cosine(options.epochs, examples, options.batch_size, peak, objective)
        .with_eval_batch_size(8)
        .with_seed(options.seed)
        .with_precision(options.precision)
}

/// Greedy answers to `prompts` in batches, and the tokens per second they were made at.
fn greedy_answers(
    model: &Llama,
    tokenizer: &ChatTokenizer,
    prompts: &[ChatPrompt],
    options: &Options,
) -> Result<(Vec<String>, f64), Error> {
    let generate = GenerateOptions::greedy(options.answer_tokens);
    let started = Instant::now();
    let mut tokens = 0;
    let mut texts = Vec::with_capacity(prompts.len());
    for chunk in prompts.chunks(options.answer_batch) {
        let conversations: Vec<_> = chunk.iter().map(|p| p.messages.clone()).collect();
        let (answers, _) = model.chat(tokenizer, &conversations, &generate, &[], |_, _| {})?;
        for answer in answers {
            tokens += answer.generation.tokens.len();
            texts.push(answer.text);
        }
    }
    Ok((texts, tokens as f64 / started.elapsed().as_secs_f64().max(1e-9)))
}

fn teacher_figures(
    options: &Options,
    model_path: &Path,
    model: &Llama,
    tokenizer: &ChatTokenizer,
    data: &Data,
    device: &Device,
    answer_seconds: Option<f64>,
) -> Result<TeacherResult, Error> {
    let path = options.run_dir.join("teacher.json");
    let fingerprint = (Fingerprint::of_module(model), tokenizer_fingerprint(tokenizer)?);
    #[derive(Serialize, Deserialize)]
    struct Saved {
        fingerprint: (Fingerprint, Fingerprint),
        test: TeacherResult,
    }
    if !options.test {
        return Ok(TeacherResult {
            model: model_path.display().to_string(),
            blocks: model.config().num_hidden_layers,
            parameters: model.num_params(),
            non_embedding_parameters: non_embedding(model),
            perplexity: f64::NAN,
            corpus_perplexity: f64::NAN,
            tokens_per_second: f64::NAN,
            answer_seconds,
        });
    }
    if let Ok(text) = std::fs::read_to_string(&path)
        && let Ok(saved) = serde_json::from_str::<Saved>(&text)
        && saved.fingerprint == fingerprint
        && saved.test.model == model_path.display().to_string()
    {
        return Ok(saved.test);
    }
    say(options, "teacher: test-set figures");
    let answers = evaluate(model, None, &data.test, &SequenceBatcher::default(), 8, device)?;
    let corpus = evaluate(model, None, &data.corpus_test, &SequenceBatcher::default(), 8, device)?;
    let (_, tokens_per_second) = greedy_answers(model, tokenizer, &data.test_prompts, options)?;
    let result = TeacherResult {
        model: model_path.display().to_string(),
        blocks: model.config().num_hidden_layers,
        parameters: model.num_params(),
        non_embedding_parameters: non_embedding(model),
        perplexity: perplexity(&answers),
        corpus_perplexity: perplexity(&corpus),
        tokens_per_second,
        answer_seconds,
    };
    write_atomic(
        &path,
        serde_json::to_string_pretty(&Saved {
            fingerprint,
            test: result.clone(),
        })?
        .as_bytes(),
    )?;
    Ok(result)
}

fn perplexity(metrics: &EvalMetrics) -> f64 {
    metrics.perplexity.unwrap_or(metrics.loss.exp())
}

/// Opens the top-k cache at `path` when it was made from this teacher and these answers;
/// otherwise (re)builds it.
/// A harvested transfer set as training answers (and a sparse teacher, when `sparse`).
struct Served {
    set: TransferSet,
    transcripts: Vec<ChatTranscript>,
    sparse: Option<SparseTeacher>,
}

/// Reads the transfer set in `dir`, refuses one that answers validation or test prompts, maps
/// its tokens to `tokenizer`'s ids (the token-level path when `sparse`; its refusal is an
/// error naming the token), and records its lineage in `run_dir`.
fn served_answers(
    dir: &Path,
    tokenizer: &ChatTokenizer,
    valid: &[ChatPrompt],
    test: &[ChatPrompt],
    sparse: bool,
    run_dir: &Path,
) -> Result<Served, Error> {
    let set = TransferSet::open(dir).map_err(|e| format!("--transfer-set {}: {e}", dir.display()))?;
    if set.records.is_empty() {
        return Err(format!("--transfer-set {}: it holds no answers yet", dir.display()).into());
    }
    let held_out: std::collections::HashSet<&str> = valid.iter().chain(test).map(|p| p.id.as_str()).collect();
    let leaked: Vec<&str> = set
        .records
        .iter()
        .map(|r| r.id.as_str())
        .filter(|id| held_out.contains(id))
        .collect();
    if let Some(first) = leaked.first() {
        return Err(format!(
            "--transfer-set {}: {} answers are to validation or test prompts (the first: {first:?}); harvest the training split only (the harvest example's default prompts)",
            dir.display(),
            leaked.len()
        )
        .into());
    }
    let (transcripts, sparse) = if sparse {
        let sparse = SparseTeacher::new(&set, tokenizer).map_err(|e| {
            format!(
                "--transfer-set {}: {e}; the sequence-level methods (--methods sft) still work",
                dir.display()
            )
        })?;
        (sparse.transcripts.clone(), Some(sparse))
    } else {
        (chat_transcripts(&set, tokenizer)?, None)
    };
    Lineage::of(&set).write(run_dir)?;
    Ok(Served {
        set,
        transcripts,
        sparse,
    })
}

/// The top-k cache of a served teacher's log-probabilities, written once from the transfer set.
fn served_cache(
    options: &Options,
    served: &Served,
    path: &Path,
    train: &TranscriptDataset,
    vocab: usize,
    device: &Device,
) -> Result<CachedTeacher, Error> {
    let sparse = served.sparse.as_ref().ok_or("no sparse teacher")?;
    let fingerprint = served.set.fingerprint();
    if let Ok(cached) = CachedTeacher::open(path, train, fingerprint, device) {
        return Ok(cached.with_tail(TailPolicy::UniformTail));
    }
    say(
        options,
        &format!(
            "writing the served top-{} log-probabilities to {} ({} entries, {} left out as ambiguous)",
            sparse.k,
            path.display(),
            sparse.entries,
            sparse.ambiguous
        ),
    );
    sparse.write_cache(path, train, fingerprint, vocab, max_len(train))?;
    Ok(CachedTeacher::open(path, train, fingerprint, device)?.with_tail(TailPolicy::UniformTail))
}

fn open_or_build_cache(
    options: &Options,
    path: &Path,
    teacher: &LlmTeacherOn,
    fingerprint: Fingerprint,
    train: &TranscriptDataset,
    device: &Device,
) -> Result<CachedTeacher, Error> {
    let k = options.top_k;
    if path.is_file() {
        match CachedTeacher::open(path, train, fingerprint, device) {
            Ok(cached) if cached.cache().header().mode == (CacheMode::TopK { k }) => {
                return Ok(cached.with_tail(TailPolicy::UniformTail));
            }
            Ok(_) => super::runs::warn(
                &options.run_dir,
                &format!("rebuilding {}: it holds another mode than the top {k}", path.display()),
            ),
            Err(error) => super::runs::warn(&options.run_dir, &format!("rebuilding {}: {error}", path.display())),
        }
        std::fs::remove_file(path)?;
    }
    say(
        options,
        &format!("caching the teacher's top-{k} log-probabilities in {}", path.display()),
    );
    let build = CacheBuildOptions::new(CacheMode::TopK { k })
        .with_batch_size(8)
        .with_progress(options.progress)
        .with_teacher_fingerprint(fingerprint);
    // One length for every batch: the longest sequence.
    let batcher = SequenceBatcher {
        length: Some(max_len(train)),
        ..SequenceBatcher::default()
    };
    build_cache(path, teacher, train, &batcher, device, &build)?;
    Ok(CachedTeacher::open(path, train, fingerprint, device)?.with_tail(TailPolicy::UniformTail))
}

struct Context<'a> {
    options: &'a Options,
    blocks: Vec<usize>,
    given: Option<&'a Llama>,
    device: &'a Device,
    infer: &'a Device,
    teacher: &'a LlmTeacherOn,
    teacher_blocks: &'a Llama,
    tokenizer: &'a ChatTokenizer,
    data: &'a Data,
    cached: Option<&'a CachedTeacher>,
    cache_bytes: Option<u64>,
    transfer_bytes: u64,
}

impl Context<'_> {
    /// `kl+hidden`'s taps: `--hidden-taps`, or the last block of the student and the teacher.
    fn hidden_taps(&self) -> (String, String) {
        if let Some(taps) = &self.options.hidden.taps {
            return taps.clone();
        }
        let student_depth = self
            .given
            .map_or(self.blocks.len(), |given| given.config().num_hidden_layers);
        let teacher_depth = self.teacher_blocks.config().num_hidden_layers;
        (
            format!("block.{}", student_depth.saturating_sub(1)),
            format!("block.{}", teacher_depth.saturating_sub(1)),
        )
    }

    /// The student's and the teacher's hidden widths.
    fn hidden_widths(&self) -> (usize, usize) {
        let teacher = self.teacher_blocks.config().hidden_size;
        (self.given.map_or(teacher, |given| given.config().hidden_size), teacher)
    }

    /// The cache's k: `--top-k`, or what the served log-probabilities gave.
    fn cache_k(&self) -> usize {
        match self.cached.map(|cached| cached.cache().header().mode) {
            Some(CacheMode::TopK { k }) => k,
            _ => self.options.top_k,
        }
    }

    fn init(&self, init: Init) -> Result<Llama, Error> {
        let student = match self.given {
            Some(given) => given.clone(),
            None => self.teacher_blocks.with_blocks(&self.blocks)?,
        };
        Ok(match init {
            Init::Teacher | Init::Given => student,
            Init::Random => {
                let config = student.config().clone();
                init_seeded(self.options.seed + 1, self.device, |d| {
                    config.init(d).expect("a valid config")
                })
            }
            Init::AfterSft => {
                let weights = self.options.run_dir.join(Method::Sft.name()).join("final.bpk");
                load_weights(student, &weights).map_err(|e| format!("the sft student {}: {e}", weights.display()))?
            }
        })
    }

    /// Makes the students of the candidate whose initialisation is closest to the teacher on
    /// validation; each candidate with its KL.
    fn choose_blocks(&mut self, candidates: &[Vec<usize>]) -> Result<Vec<(Vec<usize>, f64)>, Error> {
        let mut choice = Vec::new();
        for blocks in candidates {
            self.blocks = blocks.clone();
            choice.push((blocks.clone(), self.initial_kl(Init::Teacher)?));
        }
        let best = choice
            .iter()
            .min_by(|a, b| a.1.total_cmp(&b.1))
            .map(|(blocks, _)| blocks.clone())
            .ok_or("no candidate blocks")?;
        if candidates.len() > 1 {
            say(
                self.options,
                &format!(
                    "student blocks: {best:?}, the closest of {} subsets to the teacher on validation at initialisation",
                    candidates.len()
                ),
            );
        }
        self.blocks = best;
        Ok(choice)
    }

    /// The initialisation's KL to the teacher on validation: step 0 of every curve.
    fn initial_kl(&self, init: Init) -> Result<f64, Error> {
        let blocks: Vec<String> = self.blocks.iter().map(|b| format!("-{b}")).collect();
        let path = self
            .options
            .run_dir
            .join(format!("init-{init:?}{}.json", blocks.concat()).to_lowercase());
        let start = self.init(init)?;
        let key = (
            Fingerprinted::fingerprint(&self.data.valid),
            Fingerprint::of_module(&start),
        );
        if let Ok(text) = std::fs::read_to_string(&path)
            && let Ok((saved, kl)) = serde_json::from_str::<((Fingerprint, Fingerprint), f64)>(&text)
            && saved == key
        {
            return Ok(kl);
        }
        let metrics = evaluate(
            &start.valid(),
            Some(self.teacher as LlmTeacher<'_>),
            &self.data.valid,
            &SequenceBatcher::default(),
            8,
            self.infer,
        )?;
        let kl = metrics.teacher_kl.ok_or("no KL without a teacher")?;
        write_atomic(&path, serde_json::to_string(&(key, kl))?.as_bytes())?;
        Ok(kl)
    }

    /// Trains one student in `run_dir/<name>`: loads it when finished with the same config,
    /// data and teacher, resumes it from its last epoch when unfinished, and replaces a run made
    /// with anything else. Then its test figures, computed once and kept in `test.json`.
    fn phase(&self, init: Init, method: Method) -> Result<(String, MethodResult), Error> {
        let options = self.options;
        let name = match init {
            Init::Teacher | Init::Given => method.name().to_string(),
            Init::Random => format!("{}-random", method.name()),
            Init::AfterSft => format!("{}-after-sft", method.name()),
        };
        let peak = match init {
            Init::Teacher | Init::Given => options.learning_rate,
            Init::Random => options.random_learning_rate,
            Init::AfterSft => options.after_sft_learning_rate.unwrap_or(options.learning_rate),
        };
        let data = self.data;
        let live = Some(self.teacher as LlmTeacher<'_>);
        let supervised = ObjectiveConfig::Supervised { label_smoothing: 0.0 };
        let chat_rollouts = |lambda: f64| {
            OnPolicyConfig::new()
                .with_lambda(lambda)
                .with_chat_prompts(true)
                .with_stop_tokens(data.eos.clone())
                .with_sampling(SamplingConfig::new().with_seed(options.seed))
        };
        let examples = data.train.len();
        let (description, config, teacher, train, teacher_bytes) = match method {
            Method::Alone => (
                "alone: cross-entropy on the corpus text, no teacher".to_string(),
                config(options, peak, supervised, data.corpus_train.len()),
                None,
                &data.corpus_train,
                None,
            ),
            Method::Sft => (
                "black-box: cross-entropy on the teacher's answers".to_string(),
                config(options, peak, supervised, examples),
                None,
                &data.train,
                Some(self.transfer_bytes),
            ),
            Method::TopK => (
                format!(
                    "white-box: forward KL to a top-{} {}cache (uniform tail){}",
                    self.cache_k(),
                    if options.transfer_set.is_some() { "served " } else { "" },
                    if options.hard_weight > 0.0 {
                        format!(", hard weight {}", options.hard_weight)
                    } else {
                        String::new()
                    }
                ),
                config(
                    options,
                    peak,
                    ObjectiveConfig::Sparse {
                        loss: SparseKlLossConfig::new().with_tail(TailPolicy::UniformTail),
                        hard_weight: options.hard_weight,
                    },
                    examples,
                ),
                Some(self.cached.ok_or("no cache")? as LlmTeacher<'_>),
                &data.train,
                self.cache_bytes,
            ),
            Method::Gkd => (
                format!("on-policy GKD: JSD beta {}, lambda {}", options.beta, options.lambda),
                config(
                    options,
                    peak,
                    ObjectiveConfig::Divergence {
                        loss: DivergenceLossConfig::new(Divergence::GeneralizedJsd { beta: options.beta }),
                        hard_weight: 0.0,
                    },
                    examples,
                )
                .with_on_policy(Some(chat_rollouts(options.lambda))),
                live,
                &data.train,
                None,
            ),
            Method::SampledRkl => (
                "on-policy: per-token reverse KL of sampled tokens".to_string(),
                config(options, peak, ObjectiveConfig::SampledReverseKl, examples)
                    .with_on_policy(Some(chat_rollouts(1.0))),
                live,
                &data.train,
                None,
            ),
            Method::Kl | Method::KlHidden => {
                let objective = ObjectiveConfig::Divergence {
                    loss: DivergenceLossConfig::new(Divergence::ForwardKl),
                    hard_weight: options.hard_weight,
                };
                let mut description = "white-box: dense forward KL to the live teacher".to_string();
                let mut config = config(options, peak, objective, examples);
                if method == Method::KlHidden {
                    let (student_tap, teacher_tap) = self.hidden_taps();
                    let hidden = &options.hidden;
                    description = format!(
                        "{description} + {} × {} between {student_tap} and the teacher's {teacher_tap} (learned projection)",
                        hidden.weight, hidden.kind
                    );
                    let (student_width, teacher_width) = self.hidden_widths();
                    // A student made of the teacher's blocks (or continued from one) shares its
                    // space: the projection starts as the identity there.
                    let identity = student_width == teacher_width
                        && !hidden.random_projection
                        && matches!(init, Init::Teacher | Init::AfterSft);
                    if !identity {
                        description.push_str(", random start");
                    }
                    let term = FeatureTermConfig::new(student_tap, teacher_tap)
                        .with_kind(hidden.feature_kind()?)
                        .with_weight(hidden.weight)
                        .with_connector(Some(
                            ConnectorConfig::new(student_width, teacher_width).with_identity(identity),
                        ));
                    config = config.with_features(vec![term]);
                }
                (description, config, live, &data.train, None)
            }
        };
        let description = match init {
            Init::AfterSft => format!("{description}, continued from sft (twice the budget)"),
            _ => description,
        };
        let dir = options.run_dir.join(&name);
        let weights = dir.join("final.bpk");
        let saved = SavedRun::read(&dir, &config)?;
        // The run's identity also holds where the student starts (the config does not).
        let start = self.init(init)?;
        let start_fingerprint = Fingerprint::of_module(&start);
        let init_path = dir.join("init.json");
        let same_start = std::fs::read_to_string(&init_path)
            .ok()
            .and_then(|text| serde_json::from_str::<Fingerprint>(&text).ok())
            == Some(start_fingerprint);
        let same_config = saved.same_config && same_start;
        let teacher_fingerprint = teacher.and_then(|t| t.fingerprint());
        let finished = saved.finished(&dir).cloned().filter(|summary| {
            same_start
                && summary.train_data == Fingerprinted::fingerprint(train)
                && summary.teacher == teacher_fingerprint
        });
        let evals = [EvalSet {
            name: "valid",
            dataset: &data.valid,
        }];
        let batcher = SequenceBatcher::default();
        let (student, summary, records) = if let Some(summary) = finished {
            say(
                options,
                &format!("{name}: loading the finished run in {}", dir.display()),
            );
            let student = load_weights(start, &weights)?;
            (student, summary, read_metrics(&dir)?)
        } else {
            let resume = same_config && saved.has_config;
            let distiller = if resume {
                say(options, &format!("{name}: resuming {}", dir.display()));
                Distiller::resume(&dir)?
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
                    &format!("{name}: training, {} epochs ({description})", options.epochs),
                );
                std::fs::create_dir_all(&dir)?;
                write_atomic(&init_path, serde_json::to_string(&start_fingerprint)?.as_bytes())?;
                Distiller::new(config, &dir)
            };
            let distiller = distiller
                .with_progress(options.progress)
                .with_eval_teacher(self.teacher);
            let distiller = match teacher {
                Some(teacher) => distiller.with_teacher(teacher),
                None => distiller,
            };
            let outcome = distiller.fit_on_policy(
                start,
                FitData {
                    train,
                    evals: &evals,
                    train_batcher: &batcher,
                    eval_batcher: &batcher,
                },
                self.device,
            )?;
            save_weights(&outcome.student, &weights)?;
            (outcome.student, outcome.summary, outcome.records)
        };
        let steps_per_epoch = train.len().div_ceil(options.batch_size);
        // A run continued from sft starts where sft's steps end.
        let offset = match init {
            Init::AfterSft => options.epochs * data.train.len().div_ceil(options.batch_size),
            _ => 0,
        };
        let mut valid_kl_per_step = vec![(offset, self.initial_kl(init)?)];
        for record in &records {
            if let Some(kl) = record.eval[0].1.teacher_kl {
                valid_kl_per_step.push((offset + record.epoch * steps_per_epoch, kl));
            }
        }
        let test = if options.test {
            self.test_figures(&dir, &student.valid())?
        } else {
            TestMetrics::unread()
        };
        let positions: usize = records.iter().map(|r| r.train.positions).sum();
        let result = MethodResult {
            description,
            init,
            parameters: summary.student_parameters,
            non_embedding_parameters: non_embedding(&student),
            kl_to_teacher: test.kl_to_teacher,
            agreement: test.agreement,
            perplexity: test.perplexity,
            corpus_perplexity: test.corpus_perplexity,
            chrf: test.chrf,
            tokens_per_second: test.tokens_per_second,
            valid_kl: valid_kl_per_step.last().map_or(f64::NAN, |p| p.1),
            valid_kl_per_step,
            train_seconds: summary.train_seconds,
            train_tokens_per_second: positions as f64 / summary.train_seconds.max(1e-9),
            teacher_data_bytes: teacher_bytes,
        };
        say(
            options,
            &format!(
                "{name}: validation KL {:.3}; test KL {:.3}, agreement {:.1} %, chrF {:.1}",
                result.valid_kl,
                result.kl_to_teacher,
                100.0 * result.agreement,
                result.chrf
            ),
        );
        Ok((name, result))
    }

    /// The test figures of a trained student, computed once: `dir/test.json` keeps them.
    fn test_figures(&self, dir: &Path, student: &Llama) -> Result<TestMetrics, Error> {
        let path = dir.join("test.json");
        let fingerprint = Fingerprint::of_module(student);
        if let Ok(text) = std::fs::read_to_string(&path)
            && let Ok((saved, metrics)) = serde_json::from_str::<(Fingerprint, TestMetrics)>(&text)
            && saved == fingerprint
        {
            return Ok(metrics);
        }
        let device = self.infer;
        let batcher = SequenceBatcher::default();
        let answers = evaluate(
            student,
            Some(self.teacher as LlmTeacher<'_>),
            &self.data.test,
            &batcher,
            8,
            device,
        )?;
        let corpus = evaluate(student, None, &self.data.corpus_test, &batcher, 8, device)?;
        let (texts, tokens_per_second) =
            greedy_answers(student, self.tokenizer, &self.data.test_prompts, self.options)?;
        let chrf = corpus_chrf(
            texts
                .iter()
                .zip(&self.data.test_answers)
                .map(|(hypothesis, reference)| (hypothesis.as_str(), reference.answer.as_str())),
        );
        let metrics = TestMetrics {
            kl_to_teacher: answers.teacher_kl.ok_or("no KL")?,
            agreement: answers.teacher_agreement.ok_or("no agreement")?,
            perplexity: perplexity(&answers),
            corpus_perplexity: perplexity(&corpus),
            chrf,
            tokens_per_second,
            answers: texts,
        };
        write_atomic(&path, serde_json::to_string(&(fingerprint, &metrics))?.as_bytes())?;
        Ok(metrics)
    }
}

/// The teacher's, the student alone's and the best distilled student's answers to the first
/// three test prompts, as Markdown.
fn samples(summary: &Summary, data: &Data) -> String {
    let read = |name: &str| -> Vec<String> {
        let path = summary.options.run_dir.join(name).join("test.json");
        std::fs::read_to_string(path)
            .ok()
            .and_then(|text| serde_json::from_str::<(Fingerprint, TestMetrics)>(&text).ok())
            .map(|(_, metrics)| metrics.answers)
            .unwrap_or_default()
    };
    let alone = read("alone");
    let best = read(&summary.best_distilled);
    let mut out = String::new();
    let cell = |text: &str| text.replace('|', "\\|").replace('\n', "<br>");
    out.push_str(&format!(
        "| prompt | teacher | alone | {} |\n|---|---|---|---|\n",
        summary.best_distilled
    ));
    for (index, prompt) in data.test_prompts.iter().take(3).enumerate() {
        let question = prompt.messages.last().map_or("", |m| m.content.as_str());
        out.push_str(&format!(
            "| {} | {} | {} | {} |\n",
            cell(question),
            cell(&data.test_answers[index].answer),
            cell(alone.get(index).map_or("", String::as_str)),
            cell(best.get(index).map_or("", String::as_str)),
        ));
    }
    out
}

fn print_table(summary: &Summary) {
    let t = &summary.teacher;
    println!();
    println!(
        "Distilling {} ({:.1} M parameters) on {} training / {} validation / {} test prompts, {} answer tokens; {} device",
        t.model,
        t.parameters as f64 / 1e6,
        summary.prompts[0],
        summary.prompts[1],
        summary.prompts[2],
        summary.train_answer_tokens,
        summary.options.device
    );
    println!(
        "| model | how | valid KL | test KL | agreement | ppl (answers) | ppl (corpus) | chrF | parameters | tokens/s | train s |"
    );
    println!("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    println!(
        "| teacher | {} blocks | — | — | — | {:.2} | {:.2} | — | {:.1} M | {:.0} | — |",
        t.blocks,
        t.perplexity,
        t.corpus_perplexity,
        t.parameters as f64 / 1e6,
        t.tokens_per_second
    );
    let mut names: Vec<_> = summary.methods.keys().collect();
    names.sort_by_key(|name| {
        (
            name.ends_with("-random"),
            Method::ALL
                .iter()
                .chain(&Method::EXTRA)
                .position(|m| name.trim_end_matches("-random").trim_end_matches("-after-sft") == m.name()),
        )
    });
    for name in names {
        let r = &summary.methods[name];
        println!(
            "| {name} | {} | {:.3} | {:.3} | {:.1} % | {:.2} | {:.2} | {:.1} | {:.1} M | {:.0} | {:.0} |",
            r.description,
            r.valid_kl,
            r.kl_to_teacher,
            100.0 * r.agreement,
            r.perplexity,
            r.corpus_perplexity,
            r.chrf,
            r.parameters as f64 / 1e6,
            r.tokens_per_second,
            r.train_seconds
        );
    }
    if summary.cache_bytes_per_token > 0.0 {
        println!(
            "top-{} cache: {:.0} bytes per token against {:.0} for dense f32 ({:.0}x smaller)",
            summary.cache_top_k,
            summary.cache_bytes_per_token,
            summary.dense_bytes_per_token,
            summary.dense_bytes_per_token / summary.cache_bytes_per_token
        );
    }
    println!(
        "student blocks {:?}; best distilled on validation: {}",
        summary.blocks, summary.best_distilled
    );
}

/// KL to the teacher on validation against the optimizer step, one line per student.
fn plot(path: &Path, summary: &Summary) -> Result<(), Error> {
    Chart {
        caption: "Students: KL(teacher ‖ student) per answer token on validation",
        x: "optimizer step",
        y: "KL to the teacher (nats)",
        lines: summary
            .methods
            .iter()
            .map(|(name, result)| {
                let points = result.valid_kl_per_step.iter().map(|&(s, k)| (s as f64, k)).collect();
                (name.clone(), points)
            })
            .collect(),
        reference: None,
        margin: 0.08,
    }
    .save(path)
}
