//! The manifest as written: serde types that hold no logic. Every table
//! denies unknown keys; absent keys are `None` and get their defaults when the
//! manifest is resolved.

use std::collections::BTreeMap;

use serde::Deserialize;

use crate::model::trainer::{Keep, Schedule};
use crate::verify::Tolerance;

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawManifest {
    pub project: Option<RawProject>,
    pub corpus: Option<RawCorpus>,
    pub tokenizer: Option<RawTokenizer>,
    pub base: Option<RawBase>,
    pub vocab: Option<RawVocab>,
    pub finetune: Option<RawFinetune>,
    pub export: Option<RawExport>,
    pub verify: Option<RawVerify>,
    pub web: Option<RawWeb>,
    pub chat: Option<RawChat>,
    pub cache: Option<RawCache>,
    pub remote: Option<RawRemote>,
}

/// `[remote]`: stages that run as jobs of an engine the user operates.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRemote {
    pub engine: RemoteEngine,
    /// The engine's address (Ray: its dashboard, `http://head:8265`).
    pub address: Option<String>,
    /// The stages sent there.
    pub stages: Vec<String>,
    /// The symb command on the workers.
    pub worker_symb: Option<String>,
    /// What to do when the engine cannot be reached.
    pub fallback: Option<RemoteFallback>,
    /// Per stage: what its job asks the engine for.
    pub resources: Option<std::collections::BTreeMap<String, RawResources>>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RemoteEngine {
    Ray,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RemoteFallback {
    /// Fail the build (the default).
    Error,
    /// Warn and run the stage here.
    Local,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawResources {
    pub num_cpus: Option<f64>,
    pub num_gpus: Option<f64>,
    /// Bytes, or a size such as "16GiB".
    pub memory: Option<RawSize>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum RawSize {
    Bytes(u64),
    Text(String),
}

/// `[cache]`: a shared store behind the local cache folder.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawCache {
    /// `s3://bucket/prefix`.
    pub remote: Option<String>,
    /// Whether builds upload what they run (default true).
    pub remote_write: Option<bool>,
}

/// `[web]`: what the playground page starts with.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawWeb {
    pub dtype: Option<String>,
    pub webgpu_dtype: Option<String>,
    pub prompt: Option<String>,
    pub max_new_tokens: Option<u64>,
    pub transformers_js: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawProject {
    pub name: Option<String>,
    pub output: Option<String>,
    pub cache: Option<String>,
    /// The model card's `license` (a Hugging Face license id, e.g. "apache-2.0").
    pub license: Option<String>,
    /// The model card's `language`: codes of the languages the model writes.
    pub language: Option<Vec<String>>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum CorpusFormat {
    Auto,
    Text,
    Jsonl,
    Csv,
    /// JSONL records of `{"messages": [{"role", "content"}, ...]}`.
    Chat,
}

/// `[chat]`: how conversations become training text.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawChat {
    /// `"base"`, `"chatml"`, or a path to a `.jinja` file.
    pub template: Option<String>,
    pub train_on: Option<TrainOn>,
}

/// Which tokens of a conversation train: `chat.train_on`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum TrainOn {
    /// The assistant's turns, each through its end-of-turn token.
    Assistant,
    /// Every token.
    All,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawCorpus {
    pub files: Option<Vec<String>>,
    pub format: Option<CorpusFormat>,
    pub text_field: Option<String>,
    pub prompt_field: Option<String>,
    pub completion_field: Option<String>,
    pub messages_field: Option<String>,
    pub eval_fraction: Option<f64>,
    pub eval_files: Option<Vec<String>>,
    pub seed: Option<u64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum PreTokenizer {
    ByteLevel,
    Whitespace,
    Metaspace,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawTokenizer {
    pub vocab_size: Option<u64>,
    pub min_frequency: Option<u64>,
    pub pre_tokenizer: Option<PreTokenizer>,
    pub special_tokens: Option<Vec<String>>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Architecture {
    Gpt2,
    Llama,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawBase {
    pub model: Option<String>,
    pub architecture: Option<Architecture>,
    pub n_layer: Option<u64>,
    pub n_head: Option<u64>,
    pub n_embd: Option<u64>,
    pub n_positions: Option<u64>,
    pub seed: Option<u64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum VocabStrategy {
    AddTokens,
    ExtendBpe,
    None,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum VocabInit {
    Mean,
    Normal,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawVocab {
    pub strategy: Option<VocabStrategy>,
    pub init: Option<VocabInit>,
    pub pad_to_multiple_of: Option<u64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum FinetuneMethod {
    Lora,
    Full,
    None,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawFinetune {
    pub method: Option<FinetuneMethod>,
    pub rank: Option<u64>,
    pub alpha: Option<f64>,
    pub dropout: Option<f64>,
    pub rslora: Option<bool>,
    pub targets: Option<Vec<String>>,
    pub learning_rate: Option<f64>,
    pub weight_decay: Option<f64>,
    pub schedule: Option<Schedule>,
    pub warmup_steps: Option<u64>,
    pub batch_size: Option<u64>,
    pub block_size: Option<u64>,
    pub epochs: Option<u64>,
    pub max_steps: Option<u64>,
    pub gradient_accumulation: Option<u64>,
    pub max_grad_norm: Option<f64>,
    pub eval_every: Option<u64>,
    pub early_stopping_patience: Option<u64>,
    pub keep: Option<Keep>,
    pub checkpoint_every: Option<u64>,
    pub seed: Option<u64>,
    pub train_new_tokens: Option<bool>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawExport {
    pub opset: Option<u64>,
    pub targets: Option<Vec<String>>,
    pub quantize_embedding: Option<bool>,
    pub head_bits: Option<u64>,
    pub external_data: Option<ExternalData>,
    pub accuracy_level: Option<u64>,
    pub adapter: Option<String>,
    pub calibration: Option<String>,
    pub mixed: Option<bool>,
    pub q4_blocks: Option<String>,
}

/// When ONNX initializers go to `model*.onnx_data` files.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ExternalData {
    /// Only for a file that would pass protobuf's 2 GiB.
    Auto,
    /// Always.
    Always,
}

/// `prompts`: a count taken from the eval split, or the prompts themselves.
#[derive(Debug, Clone, PartialEq, Deserialize, serde::Serialize)]
#[serde(untagged, expecting = "a number of prompts or a list of strings")]
pub enum RawPrompts {
    Count(u64),
    List(Vec<String>),
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawVerify {
    pub prompts: Option<RawPrompts>,
    pub max_new_tokens: Option<u64>,
    pub tolerance: Option<BTreeMap<String, Tolerance>>,
    pub browser: Option<RawBrowser>,
}

/// `[verify.browser]`: every file run again by transformers.js in a headless Chromium.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawBrowser {
    pub devices: Option<Vec<String>>,
    pub adapter: Option<String>,
    pub prompts: Option<u64>,
    pub chromium: Option<String>,
    pub transformers_js: Option<String>,
    pub timeout_s: Option<u64>,
}
