//! On-policy distillation (GKD): the student writes some of the sequences it is scored on.

use burn::data::dataloader::batcher::Batcher;
use burn::data::dataset::Dataset;
use burn::module::{Module, ModuleDisplay};
use burn::tensor::{Device, Int, Tensor, TensorData};
use burn_distill_data::{EpochAware, Fingerprinted, Indexed, TokenBatch};
use burn_distill_model::{Generator, SamplingConfig, Student, TokenRng};

use crate::config::{IGNORE_INDEX, OnPolicyConfig};
use crate::distiller::{Distiller, FitData, RunOutcome};
use crate::error::{Result, TrainError};

impl Distiller<'_, Tensor<2, Int>, 3> {
    /// [`fit`](Self::fit) for language models, with the config's
    /// [`on_policy`](crate::DistillConfig::on_policy) rollouts (GKD): for each micro-batch, with
    /// probability `lambda`, its sequences are replaced by the student's
    /// continuations of their first `prompt_tokens` tokens and only the generated positions are
    /// scored against the teacher. Without an `on_policy` config it is `fit`.
    ///
    /// With `lambda = 0` no rollout happens and every step is the data step `fit` would take.
    ///
    /// # Errors
    /// As [`fit`](Self::fit); also a teacher that answers by example index (a cache cannot
    /// score sequences it has never seen), and batches too short for the prompt.
    pub fn fit_on_policy<M, S, V, It, Bt>(
        &self,
        student: M,
        data: FitData<'_, S, V, Bt>,
        device: &Device,
    ) -> Result<RunOutcome<M>>
    where
        M: Module + ModuleDisplay + Student<Tensor<2, Int>, 3> + Generator,
        S: Dataset<It> + Fingerprinted,
        V: Dataset<It>,
        It: Indexed,
        Bt: Batcher<It, TokenBatch> + EpochAware,
    {
        let config = self.config();
        let Some(on_policy) = config.on_policy.clone() else {
            return self.fit_inner(student, data, device, None);
        };
        config.validate()?;
        if on_policy.lambda > 0.0 && self.teacher().is_some_and(|teacher| teacher.needs_indices()) {
            return Err(TrainError::UnsuitableTeacher {
                needs: "on-policy distillation needs a live teacher to score the student's own sequences",
                has: "answers by example index (a cache)",
            });
        }
        let seed = config.seed;
        let rollout = move |student: &M, batch: TokenBatch, step: usize, micro: usize| {
            roll_out(student, batch, &on_policy, seed, step, micro)
        };
        self.fit_inner(student, data, device, Some(&rollout))
    }
}

/// SplitMix64 finaliser: decorrelates nearby seeds.
fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// The seed of one micro-batch's coin and sampling stream.
fn step_seed(seed: u64, step: usize, micro: usize) -> u64 {
    mix(mix(mix(seed) ^ step as u64) ^ micro as u64)
}

/// With probability `lambda`, the batch rewritten from the student's own continuations; else the
/// batch unchanged.
///
/// # Errors
/// When the sequences are not longer than the prompt.
pub fn roll_out<M: Generator>(
    student: &M,
    batch: TokenBatch,
    config: &OnPolicyConfig,
    seed: u64,
    step: usize,
    micro: usize,
) -> Result<TokenBatch> {
    let stream = step_seed(seed, step, micro);
    if config.lambda <= 0.0 || TokenRng::new(stream).next_unit() >= config.lambda {
        return Ok(batch);
    }
    let sampling = SamplingConfig {
        seed: mix(stream),
        ..config.sampling.clone()
    };
    if config.chat_prompts {
        return Ok(roll_out_answers(student, batch, config, &sampling));
    }
    let [rows, length] = batch.inputs.dims();
    let prompt = config.prompt_tokens;
    if prompt >= length {
        return Err(TrainError::ShortSequences {
            prompt_tokens: prompt,
            length,
        });
    }
    let device = batch.inputs.device();
    let prompt_tokens = batch.inputs.clone().slice([0..rows, 0..prompt]);
    // `length + 1` tokens give `length` inputs and `length` next-token targets.
    let sequence = student.generate(prompt_tokens, length + 1 - prompt, &sampling);
    let host: Vec<i64> = sequence.into_data().iter::<i64>().collect();
    let mut inputs = Vec::with_capacity(rows * length);
    let mut targets = Vec::with_capacity(rows * length);
    for row in host.chunks(length + 1) {
        inputs.extend_from_slice(&row[..length]);
        targets.extend(
            row[1..]
                .iter()
                .enumerate()
                .map(|(position, &token)| if position + 1 < prompt { IGNORE_INDEX } else { token }),
        );
    }
    Ok(TokenBatch {
        inputs: Tensor::from_data(TensorData::new(inputs, [rows, length]), &device),
        targets: Tensor::from_data(TensorData::new(targets, [rows, length]), &device),
        indices: batch.indices,
    })
}

/// The batch with each row's answer rewritten by the student: its prompt (the tokens up to its
/// first counted target) kept, the answer sampled until a stop token or the batch's length,
/// its tokens the only counted targets. A row with no counted target stays as it is.
fn roll_out_answers<M: Generator>(
    student: &M,
    batch: TokenBatch,
    config: &OnPolicyConfig,
    sampling: &SamplingConfig,
) -> TokenBatch {
    let [rows, length] = batch.inputs.dims();
    let device = batch.inputs.device();
    let inputs: Vec<i64> = batch.inputs.clone().into_data().iter::<i64>().collect();
    let targets: Vec<i64> = batch.targets.clone().into_data().iter::<i64>().collect();
    // The prompt of row r: inputs[r][..=j] for its first counted target j.
    let prompt_ends: Vec<Option<usize>> = targets
        .chunks(length)
        .map(|row| row.iter().position(|&target| target != IGNORE_INDEX).map(|j| j + 1))
        .collect();
    let answering: Vec<usize> = (0..rows).filter(|&r| prompt_ends[r].is_some()).collect();
    if answering.is_empty() {
        return batch;
    }
    let prompts: Vec<Vec<u32>> = answering
        .iter()
        .map(|&r| {
            let end = prompt_ends[r].expect("answering rows have a prompt");
            inputs[r * length..r * length + end].iter().map(|&t| t as u32).collect()
        })
        .collect();
    let shortest = prompts.iter().map(Vec::len).min().expect("at least one prompt");
    let longest = prompts.iter().map(Vec::len).max().expect("at least one prompt");
    // `length + 1` tokens fill `length` inputs and their next-token targets; no row may pass
    // the student's context.
    let budget = (length + 1 - shortest).min(student.context().saturating_sub(longest));
    if budget == 0 {
        return batch;
    }
    let answers = student.generate_rows(&prompts, budget, sampling, &config.stop_tokens, &device);
    let (mut new_inputs, mut new_targets) = (inputs, targets);
    for ((&r, prompt), answer) in answering.iter().zip(&prompts).zip(&answers) {
        let sequence: Vec<i64> = prompt
            .iter()
            .chain(answer)
            .take(length + 1)
            .map(|&t| i64::from(t))
            .collect();
        for j in 0..length {
            new_inputs[r * length + j] = sequence.get(j).copied().unwrap_or(0);
            new_targets[r * length + j] = match sequence.get(j + 1) {
                Some(&token) if j + 1 >= prompt.len() => token,
                _ => IGNORE_INDEX,
            };
        }
    }
    TokenBatch {
        inputs: Tensor::from_data(TensorData::new(new_inputs, [rows, length]), &device),
        targets: Tensor::from_data(TensorData::new(new_targets, [rows, length]), &device),
        indices: batch.indices,
    }
}
