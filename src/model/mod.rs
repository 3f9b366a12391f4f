//! Models in candle: GPT-2 (one file per architecture), LoRA, and loading a
//! Hugging Face model folder (`config.json`, `model.safetensors` or its
//! shards, `tokenizer.json`).

pub mod family;
pub mod gpt2;
pub mod hub;
pub mod lora;
pub mod ops;
pub mod train;
pub mod trainer;

use std::path::{Path, PathBuf};

use candle_core::{DType, Device};
use candle_nn::VarBuilder;

pub use family::Family;
pub use gpt2::{Config, Gpt2, KvCache, Sampling};

#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("cannot read `{path}`: {message}")]
    Io { path: PathBuf, message: String },
    /// Writing failed: the disk, not the input (a full disk, permissions).
    #[error("cannot write `{path}`: {message}")]
    Write { path: PathBuf, message: String },
    #[error("{0}")]
    Config(String),
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
        candle_core::Error::WithBacktrace { inner, .. } | candle_core::Error::WithPath { inner, .. } => candle_message(inner),
        candle_core::Error::Context { inner, context } => {
            format!("{context}: {}", candle_message(inner))
        }
        other => other.to_string(),
    }
}

impl ModelError {
    pub fn io(path: &Path, error: impl std::fmt::Display) -> Self {
        ModelError::Io { path: path.to_path_buf(), message: error.to_string() }
    }

    pub fn io_candle(path: &Path, error: candle_core::Error) -> Self {
        ModelError::Io { path: path.to_path_buf(), message: candle_message(&error) }
    }

    pub fn write(path: &Path, error: impl std::fmt::Display) -> Self {
        ModelError::Write { path: path.to_path_buf(), message: error.to_string() }
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
        let mut files: Vec<PathBuf> = index["weight_map"].as_object().map(|m| m.values().filter_map(|v| v.as_str()).map(|f| dir.join(f)).collect()).unwrap_or_default();
        files.sort();
        files.dedup();
        return Ok(files);
    }
    Err(ModelError::io(&single, "no `model.safetensors` (nor `model.safetensors.index.json`) in the model folder"))
}

/// Loads a GPT-2 from a Hugging Face folder, on the CPU, in float32.
pub fn load_folder(dir: &Path) -> Result<Gpt2> {
    load_files(&dir.join("config.json"), &weight_files(dir)?)
}

/// Loads a GPT-2 from its config and weight files.
pub fn load_files(config_path: &Path, files: &[PathBuf]) -> Result<Gpt2> {
    // The family first: another architecture's config is named as such.
    match Family::of_config(config_path)? {
        Family::Gpt2 => {}
    }
    let config: Config = read_json(config_path)?;
    config.validate().map_err(|e| ModelError::Config(format!("`{}`: {e}", config_path.display())))?;
    // SAFETY: the files are memory-mapped read-only; symb does not modify
    // model files while it reads them.
    let vb = unsafe { VarBuilder::from_mmaped_safetensors(files, DType::F32, &Device::Cpu) }.map_err(|e| ModelError::io_candle(&files[0], e))?;
    Gpt2::load(vb, &config).map_err(|e| match e {
        ModelError::Candle(inner) => ModelError::Config(format!("`{}` does not match `{}`: {}", files[0].display(), config_path.display(), candle_message(&inner))),
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
/// with a PEFT adapter folder applied.
pub fn generate(dir: &Path, adapter: Option<&Path>, prompt: &str, max_new_tokens: usize, sampling: Option<&Sampling>) -> Result<Generation> {
    let mut model = load_folder(dir)?;
    if let Some(adapter) = adapter {
        lora::load_adapter(&mut model, adapter)?;
    }
    let tokenizer_path = dir.join("tokenizer.json");
    let tokenizer = tokenizers::Tokenizer::from_file(&tokenizer_path).map_err(|e| ModelError::io(&tokenizer_path, e))?;
    let input_ids = tokenizer.encode(prompt, false).map_err(|e| ModelError::io(&tokenizer_path, e))?.get_ids().to_vec();
    let eos = eos_token(dir, &model.config);
    let (generated_ids, logits) = model.decode(&input_ids, max_new_tokens, eos, sampling)?;
    let text = tokenizer.decode(&generated_ids, true).map_err(|e| ModelError::io(&tokenizer_path, e))?;
    Ok(Generation { input_ids, generated_ids, text, logits })
}

/// The end-of-sequence id: generation_config.json first, then config.json.
pub(crate) fn eos_token(dir: &Path, config: &Config) -> Option<u32> {
    eos_token_from(Some(&dir.join("generation_config.json")), config)
}

/// [`eos_token`] with the generation config's path given (or none).
pub(crate) fn eos_token_from(generation_config: Option<&Path>, config: &Config) -> Option<u32> {
    let from_generation = generation_config.and_then(|p| read_json::<serde_json::Value>(p).ok()).and_then(|g| g["eos_token_id"].as_u64().or_else(|| g["eos_token_id"][0].as_u64()));
    from_generation.map(|id| id as u32).or(config.eos_token_id)
}

/// Writes tensors as safetensors (tensors sorted by name: byte-stable).
pub fn save_safetensors(tensors: &std::collections::BTreeMap<String, candle_core::Tensor>, path: &Path) -> Result<()> {
    let map: std::collections::HashMap<String, candle_core::Tensor> = tensors.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
    candle_core::safetensors::save(&map, path).map_err(|e| ModelError::write(path, candle_message(&e)))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A full disk is a write error, with the path and the cause. (Writing
    /// to `/dev/full` cannot show it: safetensors writes a temp file beside
    /// the target and renames it over; `tests/safety.rs` fills a real tmpfs.)
    #[test]
    fn a_full_disk_is_a_write_error() {
        let error = ModelError::write(Path::new("/x/params.safetensors"), std::io::Error::from_raw_os_error(28));
        assert_eq!(error.to_string(), "cannot write `/x/params.safetensors`: No space left on device (os error 28)");
    }
}
