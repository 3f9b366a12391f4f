//! Models in candle: one folder per family (`families/gpt2/`,
//! `families/llama/`), the pieces they share (`layers.rs`, `attention.rs`,
//! `ops.rs`), LoRA, training, and loading a Hugging Face model folder
//! (`config.json`, `model.safetensors` or its shards, `tokenizer.json`), a
//! Hub repository or a GGUF file.
//!
//! [`Model`] is the seam: everything outside this folder holds a `Model`
//! and asks it, or its [`Family`], for what differs between architectures.

pub mod attention;
pub mod families;
pub mod gguf;
pub mod health;
pub mod hub;
pub mod layers;
pub mod lora;
pub mod ops;
pub mod rng;
pub mod train;
pub mod trainer;

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;

pub use families::{Dims, Family, ModelConfig};
pub use layers::{EmbeddingInit, KvCache, Linear, RowLayout, Sampling, TokenMatrix};

#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("cannot read `{path}`: {message}")]
    Io { path: PathBuf, message: String },
    /// Writing failed: the disk, not the input (a full disk, permissions).
    #[error("cannot write `{path}`: {message}")]
    Write { path: PathBuf, message: String },
    #[error("{0}")]
    Config(String),
    /// A file or setting that does not hold what it must, with the error
    /// that said so.
    #[error("{message}: {source}")]
    Invalid {
        message: String,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// The network or a server failed (not the input): exit 1.
    #[error("{0}")]
    Network(String),
    #[error("unsupported model: {0}")]
    Unsupported(String),
    #[error("{}", candle_message(.0))]
    Candle(#[from] candle_core::Error),
}

/// A candle error's message without the backtrace candle attaches when
/// `RUST_BACKTRACE` is set, and without its path prefix.
pub fn candle_message(error: &candle_core::Error) -> String {
    match error {
        candle_core::Error::WithBacktrace { inner, .. }
        | candle_core::Error::WithPath { inner, .. } => candle_message(inner),
        candle_core::Error::Context { inner, context } => {
            format!("{context}: {}", candle_message(inner))
        }
        other => other.to_string(),
    }
}

impl ModelError {
    pub fn io(path: &Path, error: impl std::fmt::Display) -> Self {
        ModelError::Io {
            path: path.to_path_buf(),
            message: error.to_string(),
        }
    }

    pub fn io_candle(path: &Path, error: candle_core::Error) -> Self {
        ModelError::Io {
            path: path.to_path_buf(),
            message: candle_message(&error),
        }
    }

    pub fn write(path: &Path, error: impl std::fmt::Display) -> Self {
        ModelError::Write {
            path: path.to_path_buf(),
            message: error.to_string(),
        }
    }
}

pub type Result<T> = std::result::Result<T, ModelError>;

pub fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T> {
    let bytes = std::fs::read(path).map_err(|e| ModelError::io(path, e))?;
    serde_json::from_slice(&bytes).map_err(|e| ModelError::io(path, format!("invalid JSON: {e}")))
}

/// The weight files of a folder: `model.safetensors`, or the shards named by
/// `model.safetensors.index.json`.
pub fn weight_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let single = dir.join("model.safetensors");
    if single.is_file() {
        return Ok(vec![single]);
    }
    let index = dir.join("model.safetensors.index.json");
    if index.is_file() {
        let index: serde_json::Value = read_json(&index)?;
        let mut files: Vec<PathBuf> = index["weight_map"]
            .as_object()
            .map(|m| {
                m.values()
                    .filter_map(|v| v.as_str())
                    .map(|f| dir.join(f))
                    .collect()
            })
            .unwrap_or_default();
        files.sort();
        files.dedup();
        return Ok(files);
    }
    Err(ModelError::io(
        &single,
        "no `model.safetensors` (nor `model.safetensors.index.json`) in the model folder",
    ))
}

/// A model of any family symb supports: its family's [`Network`](families::Network).
#[derive(Debug)]
pub struct Model(Box<dyn families::Network>);

/// A label that trains nothing (PyTorch's `-100`): [`Model::loss`] leaves
/// its position out.
pub const IGNORE: u32 = u32::MAX;

impl Clone for Model {
    fn clone(&self) -> Self {
        Model(self.0.boxed_clone())
    }
}

/// The memory this process can still take: the kernel's `MemAvailable`,
/// capped by the cgroup's limit (a container's) when one is set; `None`
/// where neither can be read.
pub fn available_memory() -> Option<u64> {
    let meminfo = std::fs::read_to_string("/proc/meminfo").ok()?;
    let available = meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemAvailable:"))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse::<u64>()
        .ok()?
        * 1024;
    let read = |name: &str| {
        std::fs::read_to_string(format!("/sys/fs/cgroup/{name}"))
            .ok()
            .and_then(|v| v.trim().parse::<u64>().ok())
    };
    match (read("memory.max"), read("memory.current")) {
        (Some(max), Some(current)) => Some(available.min(max.saturating_sub(current))),
        _ => Some(available),
    }
}

/// Refuses work that needs more memory than the machine has, before it
/// starts (an allocation that fails aborts the process): `what` says what
/// needs it, `fix` which settings make it smaller.
pub fn check_memory(needed: u128, what: &str, fix: &str) -> Result<()> {
    let Some(available) = available_memory() else {
        return Ok(());
    };
    if needed > available as u128 {
        let gb = |b: u128| b as f64 / 1e9;
        return Err(ModelError::Config(format!(
            "{what} needs about {:.1} GB of memory, and this machine has {:.1} GB available: {fix}",
            gb(needed),
            gb(available as u128)
        )));
    }
    Ok(())
}

impl Model {
    /// Loads from a VarBuilder over a checkpoint, by `config`'s family.
    pub fn load(vb: VarBuilder, config: &ModelConfig) -> Result<Self> {
        Ok(Model(config.family.load(config, vb)?))
    }

    /// A new model of `config`'s family and shape, initialised as transformers does.
    pub fn scratch(config: &ModelConfig, rng: &mut rng::Rng) -> Result<Self> {
        Ok(Model(config.family.scratch(config, rng)?))
    }

    pub fn family(&self) -> Family {
        self.0.family()
    }

    /// The model's config (with its current vocabulary size).
    pub fn config(&self) -> ModelConfig {
        self.0.config()
    }

    pub fn device(&self) -> &Device {
        self.0.device()
    }

    pub fn vocab_size(&self) -> usize {
        self.head().vocab_size()
    }

    /// The longest sequence the model takes.
    pub fn context(&self) -> usize {
        self.0.dims().context
    }

    /// The hidden width.
    pub fn width(&self) -> usize {
        self.0.dims().width
    }

    pub fn n_layer(&self) -> usize {
        self.0.dims().layers
    }

    /// The matrix the logits come from (the embedding when tied).
    pub fn head(&self) -> &TokenMatrix {
        self.0.head()
    }

    /// The input embedding.
    pub fn embedding(&self) -> &TokenMatrix {
        self.0.embedding()
    }

    /// The token matrices under their module names: the input embedding
    /// first, then an untied head. PEFT's trainable tokens replace rows of each.
    pub fn token_matrices_mut(&mut self) -> Vec<(&'static str, &mut TokenMatrix)> {
        self.0.token_matrices_mut()
    }

    /// Calls `f` on every weight with its checkpoint name, in a fixed order
    /// (a tied head is not repeated).
    pub fn visit_mut(&mut self, mut f: impl FnMut(&str, &mut Tensor) -> Result<()>) -> Result<()> {
        self.0.visit_mut(&mut f)
    }

    /// Every weight under its checkpoint name.
    pub fn named_tensors(&self) -> std::collections::BTreeMap<String, Tensor> {
        let mut out = std::collections::BTreeMap::new();
        let mut copy = self.clone();
        copy.visit_mut(|name, tensor| {
            out.insert(name.to_string(), tensor.clone());
            Ok(())
        })
        .expect("collecting cannot fail");
        out
    }

    /// The linear layers `target` selects, with their PEFT module names.
    pub fn linears_mut(&mut self, target: lora::LoraTarget) -> Vec<(String, &mut Linear)> {
        self.0.linears_mut(target)
    }

    /// Final hidden states `[b·t, width]`.
    fn hidden(
        &self,
        input_ids: &Tensor,
        cache: Option<&mut KvCache>,
        padding: &RowLayout,
    ) -> Result<Tensor> {
        self.0.hidden(input_ids, cache, padding)
    }

    /// Logits `[b, t, vocab]` for `input_ids` `[b, t]`, continuing from
    /// `cache` (updated in place) when given.
    pub fn forward(&self, input_ids: &Tensor, cache: Option<&mut KvCache>) -> Result<Tensor> {
        self.forward_padded(input_ids, cache, &RowLayout::default())
    }

    /// [`forward`](Self::forward) over a left-padded batch: row `b` starts
    /// after `padding.of(b)` positions, which no query sees, and its position
    /// ids count from there (transformers' `generate()` with
    /// `padding_side = "left"`).
    pub fn forward_padded(
        &self,
        input_ids: &Tensor,
        cache: Option<&mut KvCache>,
        padding: &RowLayout,
    ) -> Result<Tensor> {
        let (b, t) = input_ids.dims2()?;
        padding.check(b, t + cache.as_ref().map_or(0, |c| c.len()))?;
        let hidden = self.hidden(input_ids, cache, padding)?;
        Ok(self
            .head()
            .logits(&hidden)?
            .reshape((b, t, self.vocab_size()))?)
    }

    /// Mean next-token loss of `input_ids` `[b, t]` against `labels` `[b·t]`;
    /// `grad` says whether backward will run (otherwise the graph is cut).
    /// With a frozen head the logits are never kept (a fused op).
    /// Labels [`IGNORE`] count for nothing (the loss is the mean over the
    /// others, PyTorch's `ignore_index`); their hidden states never reach
    /// the head. Rows are laid out as `rows` says (packed sequences, each
    /// alone).
    pub fn loss(
        &self,
        input_ids: &Tensor,
        labels: &Tensor,
        rows: &RowLayout,
        grad: bool,
    ) -> Result<Tensor> {
        let (b, t) = input_ids.dims2()?;
        rows.check(b, t)?;
        let hidden = self.hidden(input_ids, None, rows)?;
        let all = labels.to_vec1::<u32>()?;
        if !all.contains(&IGNORE) {
            return self.head().loss(&hidden, labels, grad);
        }
        let kept: Vec<u32> = (0..all.len() as u32)
            .filter(|&i| all[i as usize] != IGNORE)
            .collect();
        if kept.is_empty() {
            return Err(ModelError::Config(
                "a batch whose labels are all ignored has no loss".into(),
            ));
        }
        let labels: Vec<u32> = kept.iter().map(|&i| all[i as usize]).collect();
        let device = hidden.device().clone();
        let hidden = hidden.index_select(&Tensor::new(kept, &device)?, 0)?;
        self.head()
            .loss(&hidden, &Tensor::new(labels, &device)?, grad)
    }

    /// Greedy decoding with the KV cache: up to `max_new_tokens` ids, stopping
    /// after `eos` (included) as transformers' `generate()` does. Returns the
    /// new ids and the logits at the last prompt position.
    pub fn greedy(
        &self,
        prompt: &[u32],
        max_new_tokens: usize,
        eos: Option<u32>,
    ) -> Result<(Vec<u32>, Vec<f32>)> {
        self.decode(prompt, max_new_tokens, eos, None)
    }

    /// Decoding with the KV cache, greedy or sampled (see [`greedy`](Self::greedy)).
    pub fn decode(
        &self,
        prompt: &[u32],
        max_new_tokens: usize,
        eos: Option<u32>,
        sampling: Option<&Sampling>,
    ) -> Result<(Vec<u32>, Vec<f32>)> {
        let (mut generated, mut logits) =
            self.decode_batch(&[prompt.to_vec()], max_new_tokens, eos, sampling)?;
        Ok((generated.remove(0), logits.remove(0)))
    }

    /// Decodes several prompts at once, left-padded into one batch with one
    /// KV cache, as transformers' `generate()` does; a row stops after its
    /// `eos`. Returns each row's new ids and its logits at the last prompt
    /// position.
    pub fn decode_batch(
        &self,
        prompts: &[Vec<u32>],
        max_new_tokens: usize,
        eos: Option<u32>,
        sampling: Option<&Sampling>,
    ) -> Result<Decoded> {
        let (generated, prompt_logits, _) =
            self.decode_batch_inner(prompts, max_new_tokens, eos, sampling, false)?;
        Ok((generated, prompt_logits))
    }

    /// Greedy [`decode_batch`](Self::decode_batch) that keeps every logit
    /// row of each prompt: its prompt's positions, then one per new id fed
    /// back (all but the last): `[(prompt.len() + new.len() - 1) * vocab]`
    /// (the prompt's alone when nothing is generated).
    pub fn decode_batch_logits(
        &self,
        prompts: &[Vec<u32>],
        max_new_tokens: usize,
        eos: Option<u32>,
    ) -> Result<Decoded> {
        let (generated, _, rows) =
            self.decode_batch_inner(prompts, max_new_tokens, eos, None, true)?;
        Ok((generated, rows))
    }

    #[allow(clippy::type_complexity)]
    fn decode_batch_inner(
        &self,
        prompts: &[Vec<u32>],
        max_new_tokens: usize,
        eos: Option<u32>,
        sampling: Option<&Sampling>,
        keep: bool,
    ) -> Result<(Vec<Vec<u32>>, Vec<Vec<f32>>, Vec<Vec<f32>>)> {
        if prompts.is_empty() || prompts.iter().any(Vec::is_empty) {
            return Err(ModelError::Config(
                "the prompt encodes to no tokens".to_string(),
            ));
        }
        let pad_id = eos.unwrap_or(0);
        let (rows, padding) = RowLayout::pad(prompts, pad_id);
        let longest = rows[0].len();
        let mut cache = KvCache::new(self.n_layer());
        let logits = self.forward_padded(
            &Tensor::new(rows, self.device())?,
            Some(&mut cache),
            &padding,
        )?;
        let mut kept: Vec<Vec<f32>> = if keep {
            (0..prompts.len())
                .map(|b| {
                    logits
                        .get(b)?
                        .narrow(0, padding.of(b), longest - padding.of(b))?
                        .flatten_all()?
                        .to_vec1::<f32>()
                })
                .collect::<candle_core::Result<_>>()?
        } else {
            Vec::new()
        };
        let mut last: Vec<Vec<f32>> = (0..prompts.len())
            .map(|b| logits.get(b)?.get(longest - 1)?.to_vec1::<f32>())
            .collect::<candle_core::Result<_>>()?;
        let prompt_logits = last.clone();
        let mut generated = vec![Vec::new(); prompts.len()];
        let mut done = vec![max_new_tokens == 0; prompts.len()];
        let mut rng = sampling.map(|s| rng::Rng::new(s.seed));
        let mut length = longest;
        while !done.iter().all(|&d| d) && length < self.context() {
            let mut next = Vec::with_capacity(prompts.len());
            for (b, row) in last.iter().enumerate() {
                let id = match (sampling, rng.as_mut()) {
                    _ if done[b] => pad_id,
                    (Some(s), Some(rng)) if s.temperature > 0.0 => s.pick(row, rng),
                    _ => argmax(row),
                };
                if !done[b] {
                    generated[b].push(id);
                    done[b] = Some(id) == eos || generated[b].len() == max_new_tokens;
                }
                next.push(vec![id]);
            }
            if done.iter().all(|&d| d) {
                break;
            }
            let logits = self.forward_padded(
                &Tensor::new(next, self.device())?,
                Some(&mut cache),
                &padding,
            )?;
            last = (0..prompts.len())
                .map(|b| logits.get(b)?.get(0)?.to_vec1::<f32>())
                .collect::<candle_core::Result<_>>()?;
            if keep {
                // A row's id was fed as its own (not its last) where it goes on.
                for (b, row) in last.iter().enumerate() {
                    if !done[b] {
                        kept[b].extend_from_slice(row);
                    }
                }
            }
            length += 1;
        }
        Ok((generated, prompt_logits, kept))
    }

    /// Grows the token embedding (and an untied head) to `new_size` rows; the
    /// new rows start as `init` says, drawn from `rng`.
    pub fn resize_token_embeddings(
        &mut self,
        new_size: usize,
        init: EmbeddingInit,
        rng: &mut rng::Rng,
    ) -> Result<()> {
        for (_, matrix) in self.token_matrices_mut() {
            matrix.grow(new_size, init, rng)?;
        }
        self.0.set_vocab_size(new_size);
        Ok(())
    }

    /// The model as an ONNX graph at standard opset `opset` (its family's
    /// lowering), for transformers.js.
    pub fn to_onnx(&self, opset: i64) -> Result<crate::onnx::proto::ModelProto> {
        self.0.lower(opset)
    }
}

/// Per row of a batch: the new ids, and logits (the last prompt position's,
/// or every position's: see each method).
pub type Decoded = (Vec<Vec<u32>>, Vec<Vec<f32>>);

/// The first index of the largest value (`torch.argmax`'s choice on ties).
fn argmax(row: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &v) in row.iter().enumerate() {
        if v > row[best] {
            best = i;
        }
    }
    best as u32
}

/// Loads a model from a Hugging Face folder, on the CPU, in float32.
pub fn load_folder(dir: &Path) -> Result<Model> {
    load_files(&dir.join("config.json"), &weight_files(dir)?)
}

/// Loads a model from its config and weight files.
pub fn load_files(config_path: &Path, files: &[PathBuf]) -> Result<Model> {
    // The family first: another architecture's config is named as such.
    let config = ModelConfig::read(config_path)?;
    // SAFETY: the files are memory-mapped read-only; symb does not modify
    // model files while it reads them.
    let vb = unsafe { VarBuilder::from_mmaped_safetensors(files, DType::F32, &Device::Cpu) }
        .map_err(|e| ModelError::io_candle(&files[0], e))?;
    Model::load(vb, &config).map_err(|e| match e {
        ModelError::Candle(inner) => ModelError::Config(format!(
            "`{}` does not match `{}`: {}",
            files[0].display(),
            config_path.display(),
            candle_message(&inner)
        )),
        other => other,
    })
}

/// The result of `symb generate`.
#[derive(Debug, serde::Serialize)]
pub struct Generation {
    pub input_ids: Vec<u32>,
    pub generated_ids: Vec<u32>,
    /// The generated tokens decoded (special tokens skipped).
    pub text: String,
    /// The full logits vector at the last prompt position.
    pub logits: Vec<f32>,
}

/// Generation from a Hugging Face folder (greedy, or sampled), optionally
/// with a PEFT adapter folder applied; several prompts decode as one
/// left-padded batch. `special`: whether the tokenizer adds its special
/// tokens to a prompt (not to a chat template's rendering, which holds them).
pub fn generate(
    dir: &Path,
    adapter: Option<&Path>,
    prompts: &[String],
    max_new_tokens: usize,
    sampling: Option<&Sampling>,
    special: bool,
) -> Result<Vec<Generation>> {
    let mut model = load_folder(dir)?;
    if let Some(adapter) = adapter {
        lora::load_adapter(&mut model, adapter)?;
    }
    let tokenizer_path = dir.join("tokenizer.json");
    let tokenizer = tokenizers::Tokenizer::from_file(&tokenizer_path)
        .map_err(|e| ModelError::io(&tokenizer_path, e))?;
    // With the tokenizer's special tokens (a SentencePiece `<s>`), as
    // transformers and transformers.js encode a prompt by default.
    let encode = |prompt: &String| -> Result<Vec<u32>> {
        Ok(tokenizer
            .encode(prompt.as_str(), special)
            .map_err(|e| ModelError::io(&tokenizer_path, e))?
            .get_ids()
            .to_vec())
    };
    let inputs: Vec<Vec<u32>> = prompts.iter().map(encode).collect::<Result<_>>()?;
    let eos = eos_token(dir, &model.config());
    let (generated, logits) = model.decode_batch(&inputs, max_new_tokens, eos, sampling)?;
    inputs
        .into_iter()
        .zip(generated)
        .zip(logits)
        .map(|((input_ids, generated_ids), logits)| {
            let text = tokenizer
                .decode(&generated_ids, true)
                .map_err(|e| ModelError::io(&tokenizer_path, e))?;
            Ok(Generation {
                input_ids,
                generated_ids,
                text,
                logits,
            })
        })
        .collect()
}

/// The end-of-sequence id: generation_config.json first, then config.json.
pub(crate) fn eos_token(dir: &Path, config: &ModelConfig) -> Option<u32> {
    eos_token_from(Some(&dir.join("generation_config.json")), config)
}

/// [`eos_token`] with the generation config's path given (or none).
pub(crate) fn eos_token_from(
    generation_config: Option<&Path>,
    config: &ModelConfig,
) -> Option<u32> {
    let from_generation = generation_config
        .and_then(|p| read_json::<serde_json::Value>(p).ok())
        .and_then(|g| {
            g["eos_token_id"]
                .as_u64()
                .or_else(|| g["eos_token_id"][0].as_u64())
        });
    from_generation
        .map(|id| id as u32)
        .or(config.eos_token_id())
}

/// Writes tensors as safetensors (tensors sorted by name: byte-stable).
pub fn save_safetensors(
    tensors: &std::collections::BTreeMap<String, candle_core::Tensor>,
    path: &Path,
) -> Result<()> {
    // `{"format": "pt"}`, as transformers' `save_pretrained` writes it (some
    // loaders check it).
    let metadata = std::collections::HashMap::from([("format".to_string(), "pt".to_string())]);
    safetensors::serialize_to_file(
        tensors.iter().map(|(k, v)| (k.as_str(), v)),
        Some(metadata),
        path,
    )
    .map_err(|e| ModelError::write(path, e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A full disk is a write error, with the path and the cause. (Writing
    /// to `/dev/full` cannot show it: safetensors writes a temp file beside
    /// the target and renames it over; `tests/safety.rs` fills a real tmpfs.)
    #[test]
    fn a_full_disk_is_a_write_error() {
        let error = ModelError::write(
            Path::new("/x/params.safetensors"),
            std::io::Error::from_raw_os_error(28),
        );
        assert_eq!(
            error.to_string(),
            "cannot write `/x/params.safetensors`: No space left on device (os error 28)"
        );
    }
}
