//! The training loop: packed blocks, AdamW, a warmup + decay schedule,
//! gradient accumulation and clipping, periodic evaluation with early
//! stopping, and checkpoints a killed run resumes from.
//!
//! Determinism: block order comes from (seed, epoch), dropout masks from a
//! seeded stream whose state is checkpointed with the parameters and the
//! optimizer moments, so a resumed run takes exactly the steps an
//! uninterrupted one would.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use candle_core::{Device, Tensor, Var};
use serde::{Deserialize, Serialize};

use super::Model;
use super::lora::LoraSpec;
use super::rng::Rng;
use super::train::{AdamW, AdamWParams, LoraVars, attach_lora};
use super::{IGNORE, ModelError, Result, RowLayout, read_json, save_safetensors};

/// The learning rate after warmup (`finetune.schedule`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Schedule {
    Cosine,
    Linear,
    Constant,
}

/// Which weights a run with evaluation ends with (`finetune.keep`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Keep {
    /// The evaluated step with the lowest eval loss (transformers'
    /// `load_best_model_at_end`).
    Best,
    /// The last step's.
    Last,
}

#[derive(Debug, Clone)]
pub enum Method {
    /// Every weight trains.
    Full,
    /// LoRA adapters train, with dropout on their input.
    Lora { spec: LoraSpec, dropout: f64 },
}

#[derive(Debug, Clone)]
pub struct TrainConfig {
    pub method: Method,
    pub learning_rate: f64,
    pub weight_decay: f64,
    pub schedule: Schedule,
    pub warmup_steps: usize,
    pub batch_size: usize,
    pub block_size: usize,
    pub epochs: usize,
    pub max_steps: Option<usize>,
    pub gradient_accumulation: usize,
    pub max_grad_norm: f64,
    pub eval_every: usize,
    pub early_stopping_patience: Option<usize>,
    pub keep: Keep,
    pub checkpoint_every: usize,
    pub seed: u64,
    /// With LoRA: token ids whose embedding rows train too (PEFT's
    /// `trainable_token_indices`).
    pub trainable_tokens: Vec<u32>,
}

/// One row of training data: the input ids, their labels (each the next
/// token, or [`IGNORE`] where nothing trains) and the lengths of the
/// sequences packed in it, end to end (empty: one sequence).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Block {
    pub inputs: Vec<u32>,
    pub labels: Vec<u32>,
    pub sequences: Vec<usize>,
}

impl Block {
    /// The positions whose labels train.
    pub fn trained(&self) -> usize {
        self.labels.iter().filter(|&&l| l != IGNORE).count()
    }
}

/// Token streams joined (each followed by `separator`) and cut into blocks
/// of `block_size` inputs, every position trained.
pub fn pack(documents: &[Vec<u32>], separator: Option<u32>, block_size: usize) -> Vec<Block> {
    let mut stream = Vec::new();
    for doc in documents {
        stream.extend_from_slice(doc);
        stream.extend(separator);
    }
    stream
        .chunks_exact(block_size + 1)
        .map(|chunk| Block {
            inputs: chunk[..block_size].to_vec(),
            labels: chunk[1..].to_vec(),
            sequences: Vec::new(),
        })
        .collect()
}

/// One sequence to train on as a whole (a conversation): its ids and, for
/// each, whether the model learns to predict it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Masked {
    pub ids: Vec<u32>,
    pub trained: Vec<bool>,
}

impl Masked {
    /// Its inputs and labels: label `i` is id `i + 1`, or [`IGNORE`].
    fn example(&self) -> (Vec<u32>, Vec<u32>) {
        let n = self.ids.len().saturating_sub(1);
        let labels = (1..=n)
            .map(|i| if self.trained[i] { self.ids[i] } else { IGNORE })
            .collect();
        (self.ids[..n].to_vec(), labels)
    }
}

/// Sequences packed into blocks of at most `block_size` inputs without
/// splitting any (first fit, longest first: LLaMA-Factory's packing): each
/// block lists its sequences' lengths, so that none attends to another and
/// each counts positions from 0. Every sequence must have at most
/// `block_size + 1` ids and at least one trained label.
pub fn pack_sequences(sequences: &[Masked], block_size: usize) -> Vec<Block> {
    let mut order: Vec<usize> = (0..sequences.len()).collect();
    order.sort_by_key(|&i| std::cmp::Reverse(sequences[i].ids.len()));
    let mut blocks: Vec<Block> = Vec::new();
    for i in order {
        let (inputs, labels) = sequences[i].example();
        if inputs.is_empty() {
            continue;
        }
        let fits = blocks
            .iter()
            .position(|b| b.inputs.len() + inputs.len() <= block_size);
        let block = match fits {
            Some(at) => &mut blocks[at],
            None => {
                blocks.push(Block {
                    inputs: Vec::new(),
                    labels: Vec::new(),
                    sequences: Vec::new(),
                });
                blocks.last_mut().expect("just pushed")
            }
        };
        block.sequences.push(inputs.len());
        block.inputs.extend(inputs);
        block.labels.extend(labels);
    }
    blocks
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Metrics {
    /// (step, training loss of that step).
    pub train_loss: Vec<(usize, f64)>,
    /// (step, eval loss); step 0 is before training.
    pub eval_loss: Vec<(usize, f64)>,
    pub steps: usize,
    pub total_steps: usize,
    pub tokens: u64,
    pub stopped_early: bool,
    /// Steps restored from a checkpoint at the start of this run.
    pub resumed_from: usize,
    /// The trained parameters (LoRA's factors and token rows, or every weight).
    #[serde(default)]
    pub trainable_parameters: usize,
    /// The step whose weights the run ended with, and its eval loss (the
    /// best evaluated step after training began, with `keep = "best"`).
    #[serde(default)]
    pub kept: Option<(usize, f64)>,
}

/// What a checkpoint records besides tensors.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct CheckpointState {
    step: usize,
    dropout_rng: u64,
    best_eval: Option<f64>,
    evals_without_improvement: usize,
    metrics: Metrics,
    /// The best evaluated step after the start, and its loss (its weights
    /// are `best.safetensors` when it is not this step).
    #[serde(default)]
    best_step: Option<(usize, f64)>,
}

/// Progress of a run, for the caller to display.
pub struct Progress<'a> {
    pub step: usize,
    pub total_steps: usize,
    pub loss: f64,
    pub tokens_per_second: f64,
    pub eta_seconds: f64,
    pub message: &'a str,
    /// The checkpoint's step this run resumed from (0: it started afresh).
    pub resumed_from: usize,
}

pub struct Trained {
    pub model: Model,
    pub lora: Option<LoraVars>,
    pub metrics: Metrics,
    /// Tokens trained on in this run (after any resumed steps).
    pub tokens_this_run: u64,
}

/// The learning-rate multiplier of optimizer step `k` (0-based), as
/// transformers' schedulers compute it.
pub fn lr_factor(schedule: Schedule, k: usize, warmup: usize, total: usize) -> f64 {
    if k < warmup {
        return k as f64 / warmup.max(1) as f64;
    }
    let progress = (k - warmup) as f64 / (total.saturating_sub(warmup)).max(1) as f64;
    match schedule {
        Schedule::Constant => 1.0,
        Schedule::Linear => (1.0 - progress).max(0.0),
        Schedule::Cosine => (0.5 * (1.0 + (std::f64::consts::PI * progress).cos())).max(0.0),
    }
}

/// Mean loss over the trained positions of `blocks` (each position
/// weighs the same), without gradients.
pub fn evaluate(model: &Model, blocks: &[Block], batch_size: usize) -> Result<Option<f64>> {
    let (mut total, mut count) = (0.0, 0usize);
    for batch in blocks.chunks(batch_size) {
        let trained: usize = batch.iter().map(Block::trained).sum();
        if trained == 0 {
            continue;
        }
        let loss = batch_loss(model, batch, false)?.to_scalar::<f32>()? as f64;
        total += loss * trained as f64;
        count += trained;
    }
    Ok((count > 0).then(|| total / count as f64))
}

/// The mean loss over the trained positions of `batch` (blocks of packed
/// sequences or not, padded to the longest); `grad`: whether backward runs.
pub fn batch_loss(model: &Model, batch: &[Block], grad: bool) -> Result<Tensor> {
    let (inputs, labels, rows) = tensors(batch)?;
    model.loss(&inputs, &labels, &rows, grad)
}

/// A batch's inputs `[b, t]`, labels `[b·t]` and row layout: rows shorter
/// than the longest are padded on the right with a sequence of their own
/// that trains nothing.
fn tensors(batch: &[Block]) -> Result<(Tensor, Tensor, RowLayout)> {
    let longest = batch.iter().map(|b| b.inputs.len()).max().unwrap_or(0);
    let packed = batch
        .iter()
        .any(|b| !b.sequences.is_empty() || b.inputs.len() < longest);
    let (mut inputs, mut labels, mut lengths) = (Vec::new(), Vec::new(), Vec::new());
    for block in batch {
        let pad = longest - block.inputs.len();
        inputs.push(
            block
                .inputs
                .iter()
                .copied()
                .chain(std::iter::repeat_n(0, pad))
                .collect::<Vec<u32>>(),
        );
        labels.extend(
            block
                .labels
                .iter()
                .copied()
                .chain(std::iter::repeat_n(IGNORE, pad)),
        );
        let mut row = if block.sequences.is_empty() {
            vec![block.inputs.len()]
        } else {
            block.sequences.clone()
        };
        if pad > 0 {
            row.push(pad);
        }
        lengths.push(row);
    }
    let rows = if packed {
        RowLayout::packed(&lengths)
    } else {
        RowLayout::default()
    };
    Ok((
        Tensor::new(inputs, &Device::Cpu)?,
        Tensor::new(labels, &Device::Cpu)?,
        rows,
    ))
}

/// The batch's real (not padding) input positions.
fn real_tokens(batch: &[Block]) -> u64 {
    batch.iter().map(|b| b.inputs.len() as u64).sum()
}

/// Trains `model` on `train` blocks; evaluates on `eval` blocks. With a
/// `checkpoint_dir`, resumes from the checkpoint there and writes new ones.
pub fn train(
    mut model: Model,
    config: &TrainConfig,
    train: &[Block],
    eval: &[Block],
    checkpoint_dir: Option<&Path>,
    mut progress: impl FnMut(&Progress<'_>),
) -> Result<Trained> {
    if train.is_empty() {
        return Err(ModelError::Config(format!(
            "the train split is shorter than one block of {} tokens",
            config.block_size + 1
        )));
    }
    if train.iter().all(|b| b.trained() == 0) {
        return Err(ModelError::Config(
            "no position of the train split trains (every label is masked)".into(),
        ));
    }
    super::ops::keep_freed_memory();
    let mut init_rng = Rng::new(config.seed);
    let dropout_rng = Arc::new(Mutex::new(Rng::new(config.seed ^ 0x5EED_D80F)));
    // Trainable variables, by name.
    let (lora, vars): (Option<LoraVars>, Vec<(String, Var)>) = match &config.method {
        Method::Lora { spec, dropout } => {
            let mut lora = attach_lora(&mut model, spec, None, &mut init_rng)?;
            if !config.trainable_tokens.is_empty() {
                lora.train_token_rows(&mut model, config.trainable_tokens.clone())?;
            }
            if *dropout > 0.0 {
                for (_, linear) in model.linears_mut(super::lora::LoraTarget(&spec.targets)) {
                    if let Some(l) = linear.lora.as_mut() {
                        l.dropout = Some((*dropout, dropout_rng.clone()));
                    }
                }
            }
            let mut vars: Vec<(String, Var)> = lora
                .modules
                .iter()
                .flat_map(|(m, (a, b))| {
                    [
                        (format!("{m}.lora_A"), a.clone()),
                        (format!("{m}.lora_B"), b.clone()),
                    ]
                })
                .collect();
            for (module, rows) in &lora.token_rows {
                vars.push((format!("{module}.trainable_tokens"), rows.clone()));
            }
            (Some(lora), vars)
        }
        Method::Full => {
            let mut vars = Vec::new();
            model.visit_mut(|name, tensor| {
                let var = Var::from_tensor(tensor)?;
                *tensor = var.as_tensor().clone();
                vars.push((name.to_string(), var));
                Ok(())
            })?;
            (None, vars)
        }
    };
    let mut optimizer = AdamW::new(
        vars.iter().map(|(_, v)| v.clone()).collect(),
        AdamWParams {
            lr: config.learning_rate,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: config.weight_decay,
        },
    )?;
    let per_epoch = train.len().div_ceil(config.batch_size);
    let total_steps = config
        .max_steps
        .unwrap_or_else(|| (config.epochs * per_epoch).div_ceil(config.gradient_accumulation))
        .max(1);
    let trainable_parameters = vars.iter().map(|(_, v)| v.elem_count()).sum();
    let mut metrics = Metrics {
        total_steps,
        trainable_parameters,
        ..Metrics::default()
    };
    let mut best_eval: Option<f64> = None;
    let mut evals_without_improvement = 0;
    let mut start_step = 0;
    // The best step after the start: its step, loss and weights (`None`
    // while they are the current ones).
    let mut best: Option<(usize, f64, Option<Vec<Tensor>>)> = None;

    if let Some(dir) = checkpoint_dir
        && let Some((state, best_weights)) = load_checkpoint(dir, &vars, &mut optimizer)?
    {
        start_step = state.step;
        *dropout_rng.lock().expect("rng lock") = Rng::new(state.dropout_rng);
        best_eval = state.best_eval;
        evals_without_improvement = state.evals_without_improvement;
        best = state
            .best_step
            .map(|(step, loss)| (step, loss, best_weights));
        metrics = state.metrics;
        metrics.resumed_from = start_step;
        metrics.trainable_parameters = trainable_parameters;
    } else {
        let initial = evaluate(&model, eval, config.batch_size)?;
        if let Some(loss) = initial {
            metrics.eval_loss.push((0, loss));
            best_eval = Some(loss);
        }
    }

    let started = Instant::now();
    let mut tokens_this_run = 0u64;
    let mut orders: BTreeMap<usize, Vec<usize>> = BTreeMap::new();
    let mut step = start_step;
    while step < total_steps {
        let mut accumulated: Vec<Option<Tensor>> = vec![None; vars.len()];
        let mut step_loss = 0.0;
        let mut step_tokens = 0u64;
        for micro in 0..config.gradient_accumulation {
            let index = step * config.gradient_accumulation + micro;
            let epoch = index / per_epoch;
            let order = orders
                .entry(epoch)
                .or_insert_with(|| shuffled(train.len(), config.seed.wrapping_add(epoch as u64)));
            let position = (index % per_epoch) * config.batch_size;
            let batch: Vec<Block> = order
                [position..(position + config.batch_size).min(train.len())]
                .iter()
                .map(|&i| train[i].clone())
                .filter(|b| b.trained() > 0)
                .collect();
            if batch.is_empty() {
                continue;
            }
            let loss = batch_loss(&model, &batch, true)?;
            step_loss += loss.to_scalar::<f32>()? as f64 / config.gradient_accumulation as f64;
            let grads = loss.backward()?;
            for (slot, (name, var)) in accumulated.iter_mut().zip(&vars) {
                let grad = grads
                    .get(var.as_tensor())
                    .ok_or_else(|| ModelError::Config(format!("no gradient reached `{name}`")))?;
                let grad = (grad.detach() / config.gradient_accumulation as f64)?;
                *slot = Some(match slot.take() {
                    Some(sum) => (sum + grad)?,
                    None => grad,
                });
            }
            step_tokens += real_tokens(&batch);
        }
        // A micro-batch with nothing to train adds no gradient.
        let mut grads: Vec<Tensor> = accumulated
            .into_iter()
            .zip(&vars)
            .map(|(g, (_, var))| g.map_or_else(|| var.as_tensor().zeros_like(), Ok))
            .collect::<candle_core::Result<_>>()?;
        clip(&mut grads, config.max_grad_norm)?;
        optimizer.params.lr = config.learning_rate
            * lr_factor(config.schedule, step, config.warmup_steps, total_steps);
        optimizer.step_with(&grads)?;
        step += 1;
        metrics.steps = step;
        metrics.tokens += step_tokens;
        tokens_this_run += step_tokens;
        metrics.train_loss.push((step, step_loss));
        let elapsed = started.elapsed().as_secs_f64();
        let tokens_per_second = tokens_this_run as f64 / elapsed.max(1e-9);
        let eta = elapsed / (step - start_step) as f64 * (total_steps - step) as f64;
        progress(&Progress {
            step,
            total_steps,
            loss: step_loss,
            tokens_per_second,
            eta_seconds: eta,
            message: "training",
            resumed_from: start_step,
        });

        if (step % config.eval_every == 0 || step == total_steps)
            && let Some(loss) = evaluate(&model, eval, config.batch_size)?
        {
            metrics.eval_loss.push((step, loss));
            if config.keep == Keep::Best && best.as_ref().is_none_or(|b| loss < b.1) {
                best = Some((step, loss, None));
            }
            if best_eval.is_none_or(|best| loss < best) {
                best_eval = Some(loss);
                evals_without_improvement = 0;
            } else {
                evals_without_improvement += 1;
            }
            if config
                .early_stopping_patience
                .is_some_and(|p| evals_without_improvement >= p)
            {
                metrics.stopped_early = true;
                break;
            }
        }
        if let Some(dir) = checkpoint_dir
            && step % config.checkpoint_every == 0
            && step < total_steps
        {
            keep_best_weights(&mut best, step, &vars)?;
            let state = CheckpointState {
                step,
                dropout_rng: dropout_rng.lock().expect("rng lock").state(),
                best_eval,
                evals_without_improvement,
                metrics: metrics.clone(),
                best_step: best.as_ref().map(|b| (b.0, b.1)),
            };
            let best_weights = best.as_ref().and_then(|b| b.2.as_deref());
            save_checkpoint(dir, &vars, &optimizer, &state, best_weights)?;
        }
        // The weights of the best step, before the next step changes them.
        keep_best_weights(&mut best, step, &vars)?;
    }
    metrics.kept = match best {
        Some((kept, loss, weights)) => {
            if let Some(weights) = weights {
                for ((_, var), w) in vars.iter().zip(&weights) {
                    var.set(w)?;
                }
            }
            Some((kept, loss))
        }
        None => metrics
            .eval_loss
            .last()
            .filter(|e| e.0 == metrics.steps && e.0 > 0)
            .copied(),
    };
    // Training is over: the LoRA layers no longer drop out.
    for (_, linear) in model.linears_mut(super::lora::LoraTarget(&["all-linear".to_string()])) {
        if let Some(l) = linear.lora.as_mut() {
            l.dropout = None;
        }
    }
    Ok(Trained {
        model,
        lora,
        metrics,
        tokens_this_run,
    })
}

/// Copies the trainable weights as the best step's when that step is the
/// current one (`step`) and they are not copied yet.
fn keep_best_weights(
    best: &mut Option<(usize, f64, Option<Vec<Tensor>>)>,
    step: usize,
    vars: &[(String, Var)],
) -> Result<()> {
    if let Some((at, _, weights @ None)) = best
        && *at == step
    {
        *weights = Some(
            vars.iter()
                .map(|(_, v)| v.as_tensor().copy())
                .collect::<candle_core::Result<_>>()?,
        );
    }
    Ok(())
}

/// PyTorch's `clip_grad_norm_`: scale all gradients when their global norm
/// exceeds `max_norm`.
fn clip(grads: &mut [Tensor], max_norm: f64) -> Result<()> {
    let mut sum = 0.0f64;
    for g in grads.iter() {
        sum += g.sqr()?.sum_all()?.to_scalar::<f32>()? as f64;
    }
    let norm = sum.sqrt();
    let factor = max_norm / (norm + 1e-6);
    if factor < 1.0 {
        for g in grads.iter_mut() {
            *g = (&*g * factor)?;
        }
    }
    Ok(())
}

/// A seeded permutation of 0..n (Fisher–Yates).
fn shuffled(n: usize, seed: u64) -> Vec<usize> {
    let mut rng = Rng::new(seed);
    let mut order: Vec<usize> = (0..n).collect();
    for i in (1..n).rev() {
        let j = (rng.next_u64() % (i as u64 + 1)) as usize;
        order.swap(i, j);
    }
    order
}

fn save_checkpoint(
    dir: &Path,
    vars: &[(String, Var)],
    optimizer: &AdamW,
    state: &CheckpointState,
    best: Option<&[Tensor]>,
) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| ModelError::write(dir, e))?;
    let mut params = BTreeMap::new();
    let mut moments = BTreeMap::new();
    for ((name, var), (_, m, v)) in vars.iter().zip(&optimizer.state) {
        params.insert(name.clone(), var.as_tensor().clone());
        moments.insert(format!("{name}.m"), m.clone());
        moments.insert(format!("{name}.v"), v.clone());
    }
    // Tensors first, the state file last: it is the checkpoint's commit
    // point, and it names the digests of the tensors it goes with, so that a
    // crash between the files (new params beside an older state) is noticed
    // on resume instead of mixing two steps.
    let write = |name: &str, tensors: &BTreeMap<String, Tensor>| -> Result<String> {
        let tmp = dir.join(format!("{name}.tmp"));
        save_safetensors(tensors, &tmp)?;
        let digest = file_digest(&tmp)?;
        std::fs::rename(&tmp, dir.join(name)).map_err(|e| ModelError::write(dir, e))?;
        Ok(digest)
    };
    let params_digest = write("params.safetensors", &params)?;
    crate::cache::fault::point(&format!("checkpoint-partial:{}", state.step));
    let optimizer_digest = write("optimizer.safetensors", &moments)?;
    let mut files = serde_json::json!({"params.safetensors": params_digest, "optimizer.safetensors": optimizer_digest});
    if let Some(best) = best {
        let tensors = vars
            .iter()
            .zip(best)
            .map(|((name, _), t)| (name.clone(), t.clone()))
            .collect();
        files["best.safetensors"] = write("best.safetensors", &tensors)?.into();
    }
    let mut json = serde_json::to_value(state).expect("state serialises");
    json["optimizer_step"] = optimizer.step.into();
    json["files"] = files;
    let tmp = dir.join("state.json.tmp");
    std::fs::write(&tmp, serde_json::to_vec_pretty(&json).expect("json"))
        .map_err(|e| ModelError::write(&tmp, e))?;
    std::fs::rename(&tmp, dir.join("state.json")).map_err(|e| ModelError::write(dir, e))
}

/// blake3 of a file, hex (as the cache names its blobs).
fn file_digest(path: &Path) -> Result<String> {
    crate::cache::hash_file(path)
        .map(|(digest, _)| digest)
        .map_err(|e| ModelError::io(path, e))
}

fn load_checkpoint(
    dir: &Path,
    vars: &[(String, Var)],
    optimizer: &mut AdamW,
) -> Result<Option<(CheckpointState, Option<Vec<Tensor>>)>> {
    let state_path = dir.join("state.json");
    if !state_path.is_file() {
        return Ok(None);
    }
    let json: serde_json::Value = read_json(&state_path)?;
    let state: CheckpointState =
        serde_json::from_value(json.clone()).map_err(|e| ModelError::io(&state_path, e))?;
    // Tensors that are not the ones the state was written with (a crash
    // mid-save): start over rather than resume from a mixture.
    let with_best = json["files"]["best.safetensors"].is_string();
    for name in [
        "params.safetensors",
        "optimizer.safetensors",
        "best.safetensors",
    ] {
        if name == "best.safetensors" && !with_best {
            continue;
        }
        let expected = json["files"][name].as_str();
        if expected.is_none() || file_digest(&dir.join(name)).ok().as_deref() != expected {
            tracing::warn!(
                "checkpoint `{}`: `{name}` does not match its state; training starts over",
                dir.display()
            );
            return Ok(None);
        }
    }
    let params = candle_core::safetensors::load(dir.join("params.safetensors"), &Device::Cpu)
        .map_err(|e| ModelError::io_candle(dir, e))?;
    let moments = candle_core::safetensors::load(dir.join("optimizer.safetensors"), &Device::Cpu)
        .map_err(|e| ModelError::io_candle(dir, e))?;
    for ((name, var), (_, m, v)) in vars.iter().zip(optimizer.state.iter_mut()) {
        let missing =
            || ModelError::Config(format!("checkpoint `{}` lacks `{name}`", dir.display()));
        var.set(params.get(name).ok_or_else(missing)?)?;
        *m = moments
            .get(&format!("{name}.m"))
            .ok_or_else(missing)?
            .clone();
        *v = moments
            .get(&format!("{name}.v"))
            .ok_or_else(missing)?
            .clone();
    }
    optimizer.step = json["optimizer_step"].as_u64().unwrap_or(state.step as u64);
    let best = if with_best {
        let tensors = candle_core::safetensors::load(dir.join("best.safetensors"), &Device::Cpu)
            .map_err(|e| ModelError::io_candle(dir, e))?;
        let weights = vars
            .iter()
            .map(|(name, _)| {
                tensors.get(name).cloned().ok_or_else(|| {
                    ModelError::Config(format!(
                        "checkpoint `{}` lacks the best `{name}`",
                        dir.display()
                    ))
                })
            })
            .collect::<Result<_>>()?;
        Some(weights)
    } else {
        None
    };
    Ok(Some((state, best)))
}

#[cfg(test)]
mod tests {
    /// A checkpoint's losses come back bit for bit: a resumed run's
    /// metrics.json then has the bytes of an uninterrupted one's (serde_json
    /// parsed `7.5523223876953125` as `7.552322387695312` without its
    /// exact float parsing).
    #[test]
    fn losses_in_a_checkpoint_come_back_bit_for_bit() {
        let mut state = 0x2545_F491_4F6C_DD1Du64;
        let losses: Vec<(usize, f64)> = (0..20_000)
            .map(|step| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                // Losses are f32s widened to f64, as training computes them.
                (
                    step,
                    (f32::from_bits(0x3f80_0000 + (state as u32 % 0x0100_0000)) * 4.0) as f64,
                )
            })
            .chain([(0, 7.5523223876953125)])
            .collect();
        let metrics = super::Metrics {
            train_loss: losses.clone(),
            ..Default::default()
        };
        let back: super::Metrics =
            serde_json::from_str(&serde_json::to_string(&metrics).unwrap()).unwrap();
        let differ = back
            .train_loss
            .iter()
            .zip(&losses)
            .filter(|(a, b)| a.1.to_bits() != b.1.to_bits())
            .count();
        assert_eq!(differ, 0, "losses changed in a round trip through JSON");
    }
}
