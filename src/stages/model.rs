//! Stages `base`, `finetune` and `merge`: the model side of the pipeline.
//!
//! - `base` resolves the base model into a Hugging Face folder's files
//!   (`config.json`, `model.safetensors`, `tokenizer.json`,
//!   `generation_config.json`): a local folder (validated by loading it), or
//!   a GPT-2 of the manifest's size initialised from a seed, whose tokenizer
//!   is the one the `tokenizer` stage trained.
//! - `finetune` trains it on the corpus (LoRA or all weights) and writes a
//!   PEFT adapter or the full weights, `metrics.json` and `loss.svg`.
//! - `merge` folds the adapter into the weights: a folder Python
//!   transformers loads.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use super::corpus::{Document, read_documents};
use crate::engine::{ExternalFile, Settings, Stage, StageContext, StageError};
use crate::manifest::{Architecture, Base, BaseModel, Finetune, FinetuneMethod};
use crate::model::train::{LoraSpec, Rng};
use crate::model::trainer::{Method, Progress, Schedule, TrainConfig, pack, train};
use crate::model::{self, ModelConfig, ModelError, lora};

/// The candle version that shapes the model artifacts (part of the keys).
pub const CANDLE_VERSION: &str = "0.11.1";

pub(super) fn model_error(e: ModelError) -> StageError {
    match e {
        ModelError::Candle(_) | ModelError::Write { .. } | ModelError::Network(_) => {
            StageError::failed(e.to_string())
        }
        _ => StageError::bad_input(e.to_string()),
    }
}

pub(super) fn io(path: &Path, e: std::io::Error) -> StageError {
    StageError::failed(format!("cannot write `{}`: {e}", path.display()))
}

/// Copies `from` (an input: a model folder's file, or an upstream artifact)
/// to `to` (an artifact), saying which side failed.
pub(super) fn copy(from: &Path, to: &Path) -> Result<(), StageError> {
    let mut source = std::fs::File::open(from)
        .map_err(|e| StageError::failed(format!("cannot read `{}`: {e}", from.display())))?;
    let mut dest = std::fs::File::create(to).map_err(|e| io(to, e))?;
    std::io::copy(&mut source, &mut dest).map_err(|e| {
        StageError::failed(format!(
            "cannot copy `{}` to `{}`: {e}",
            from.display(),
            to.display()
        ))
    })?;
    Ok(())
}

pub(super) fn write_json(path: &Path, value: &serde_json::Value) -> Result<(), StageError> {
    let mut text = serde_json::to_string_pretty(value).expect("json serialises");
    text.push('\n');
    std::fs::write(path, text).map_err(|e| io(path, e))
}

pub(super) fn tools() -> BTreeMap<String, String> {
    [
        ("candle".to_string(), CANDLE_VERSION.to_string()),
        (
            "tokenizers".to_string(),
            super::tokenizer::TOKENIZERS_VERSION.to_string(),
        ),
    ]
    .into()
}

pub struct BaseStage {
    pub base: Base,
    /// For a local folder: its files.
    pub files: Vec<ExternalFile>,
    /// For a Hub model: its revision resolved to a commit (or why it could not be).
    pub hub: Option<Result<model::hub::Resolved, StageError>>,
    /// Where the output folder gets the base model.
    pub publish: super::ModelPublish,
}

/// The files of a local model folder that a build reads, labelled
/// `base.model/<name>` wherever the folder is: keys hold the files' content,
/// never where they lie, so the same model in another folder or on another
/// machine gives the same keys (and a shared cache's artifacts).
pub fn folder_files(dir: &Path) -> Vec<ExternalFile> {
    let mut names = vec![
        "config.json".to_string(),
        "tokenizer.json".to_string(),
        "generation_config.json".to_string(),
        "tokenizer_config.json".to_string(),
    ];
    if let Ok(weights) = model::weight_files(dir) {
        names.extend(
            weights
                .iter()
                .filter_map(|p| p.file_name().and_then(|n| n.to_str()).map(str::to_string)),
        );
        if dir.join("model.safetensors.index.json").is_file() {
            names.push("model.safetensors.index.json".to_string());
        }
    }
    names
        .into_iter()
        .map(|name| dir.join(&name))
        .filter(|path| path.is_file())
        .map(|path| {
            let name = path
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            ExternalFile {
                label: format!("base.model/{name}"),
                path,
            }
        })
        .collect()
}

impl Stage for BaseStage {
    fn name(&self) -> &str {
        "base"
    }
    fn kind(&self) -> &'static str {
        "base"
    }
    fn version(&self) -> u32 {
        // 2: a matching safetensors file is copied as it is. 3: written
        // safetensors carry `{"format": "pt"}`.
        3
    }
    fn settings(&self) -> Settings {
        let b = &self.base;
        let mut s = Settings::new();
        // A local folder is keyed by its files' content (`files()`), not its path.
        let model = match &b.model {
            BaseModel::Path(_) => serde_json::json!("path"),
            BaseModel::Gguf(_) => serde_json::json!("gguf"),
            other => serde_json::to_value(other).expect("serialises"),
        };
        s.insert("base.model".into(), model);
        if let Some(hub) = &self.hub {
            s.insert(
                "base.commit".into(),
                hub.as_ref().ok().map(|r| r.commit.clone()).into(),
            );
        }
        if b.model == BaseModel::Scratch {
            s.insert(
                "base.architecture".into(),
                serde_json::to_value(b.architecture).expect("serialises"),
            );
            for (key, value) in [
                ("n_layer", b.n_layer),
                ("n_head", b.n_head),
                ("n_embd", b.n_embd),
                ("n_positions", b.n_positions),
                ("seed", b.seed),
            ] {
                s.insert(format!("base.{key}"), value.into());
            }
        }
        s
    }
    fn dependencies(&self) -> Vec<String> {
        if self.base.model == BaseModel::Scratch {
            vec!["tokenizer".to_string()]
        } else {
            Vec::new()
        }
    }
    fn files(&self) -> &[ExternalFile] {
        &self.files
    }
    fn tools(&self) -> BTreeMap<String, String> {
        tools()
    }
    fn publishes(&self) -> Vec<(String, String)> {
        self.publish.files(false)
    }
    fn run(&self, ctx: &StageContext<'_>) -> Result<serde_json::Value, StageError> {
        match &self.base.model {
            BaseModel::Scratch => self.scratch(ctx),
            BaseModel::Path(dir) => {
                let names: Vec<&str> = self
                    .files
                    .iter()
                    .filter_map(|f| f.path.file_name().and_then(|n| n.to_str()))
                    .collect();
                copy_folder(dir, &names, ctx)
            }
            BaseModel::Gguf(file) => from_gguf(file, ctx),
            BaseModel::Hub { repo, .. } => {
                let resolved = match &self.hub {
                    Some(Ok(resolved)) => resolved,
                    Some(Err(error)) => return Err(error.clone()),
                    None => return Err(StageError::failed("the Hub model was not resolved")),
                };
                // The download goes to the checkpoint folder: a killed build resumes it.
                let folder =
                    model::hub::download(repo, resolved, &ctx.checkpoint_dir().join("hub"))
                        .map_err(model_error)?;
                let names: Vec<&str> = resolved.files.iter().map(String::as_str).collect();
                copy_folder(&folder, &names, ctx)
            }
        }
    }
}

/// The fields of a base model's `tokenizer_config.json` carried into the
/// output's: its chat template and the special tokens it names. (Its
/// `added_tokens_decoder` is not: tokenizer.json holds the added tokens,
/// new ones included.)
const CARRIED: [&str; 5] = [
    "chat_template",
    "pad_token",
    "unk_token",
    "additional_special_tokens",
    "padding_side",
];

/// The `tokenizer_config.json` for a model's config and tokenizer: what
/// transformers and transformers.js need (special tokens as plain strings,
/// no clean-up of spaces, the context length), with the base's chat
/// template and the special tokens it names when `base` is its
/// `tokenizer_config.json`.
pub(super) fn tokenizer_config(
    config_path: &Path,
    tokenizer_path: &Path,
    base: Option<&Path>,
) -> Result<serde_json::Value, StageError> {
    let config = ModelConfig::read(config_path).map_err(model_error)?;
    let tokenizer = tokenizers::Tokenizer::from_file(tokenizer_path)
        .map_err(|e| StageError::failed(format!("cannot load the tokenizer: {e}")))?;
    let token = |id: Option<u32>| id.and_then(|i| tokenizer.id_to_token(i));
    // The tokenizer model's own unknown token (SentencePiece-style `<unk>`), else the eos.
    let json: serde_json::Value = model::read_json(tokenizer_path).map_err(model_error)?;
    let unk = json["model"]["unk_token"]
        .as_str()
        .map(str::to_string)
        .or_else(|| token(config.eos_token_id()));
    let mut out = serde_json::json!({
        "tokenizer_class": "PreTrainedTokenizerFast",
        // What the ONNX graph and the model take: without it, Python's
        // AutoTokenizer returns `token_type_ids` too, and GPT-2 adds their
        // embedding (`wte[0]`) to every position.
        "model_input_names": ["input_ids", "attention_mask"],
        "bos_token": token(config.bos_token_id()),
        "eos_token": token(config.eos_token_id()),
        "unk_token": unk,
        "model_max_length": config.context(),
        "clean_up_tokenization_spaces": false,
    });
    // transformers.js's text-generation pipeline adds the special tokens
    // only when the config says the tokenizer adds a BOS (or an EOS), where
    // Python's adds what tokenizer.json's post-processor adds: a model
    // whose prompts start with its BOS (SmolLM2, Llama) got other prompts in
    // the page and wrote other text.
    let probe = |special: bool| {
        tokenizer
            .encode("a", special)
            .map(|e| e.get_ids().to_vec())
            .map_err(|e| StageError::failed(format!("cannot run the tokenizer: {e}")))
    };
    let (plain, special) = (probe(false)?, probe(true)?);
    if special.len() > plain.len() {
        if special.first() == config.bos_token_id().as_ref() && plain.first() != special.first() {
            out["add_bos_token"] = true.into();
        }
        if special.last() == config.eos_token_id().as_ref() && plain.last() != special.last() {
            out["add_eos_token"] = true.into();
        }
    }
    if let Some(base) = base {
        let base: serde_json::Value = model::read_json(base).map_err(model_error)?;
        // A token is written as a string, or as transformers' AddedToken object.
        let plain = |v: &serde_json::Value| {
            v.as_str()
                .or_else(|| v["content"].as_str())
                .map(str::to_string)
        };
        let known = |t: &String| tokenizer.token_to_id(t).is_some();
        for key in CARRIED {
            let value = match (key, &base[key]) {
                (_, serde_json::Value::Null) => continue,
                ("pad_token" | "unk_token", v) => {
                    plain(v).filter(known).map(serde_json::Value::from)
                }
                ("additional_special_tokens", serde_json::Value::Array(list)) => Some(
                    list.iter()
                        .filter_map(plain)
                        .filter(known)
                        .collect::<Vec<_>>()
                        .into(),
                ),
                (_, v) => Some(v.clone()),
            };
            if let Some(value) = value {
                out[key] = value;
            }
        }
    }
    // A `<pad>` the tokenizer has (symb's recipes make one) is the pad
    // token, unless the base named another.
    if out["pad_token"].is_null()
        && tokenizer
            .get_added_vocabulary()
            .get_vocab()
            .contains_key("<pad>")
    {
        out["pad_token"] = "<pad>".into();
    }
    Ok(out)
}

/// Validates a model folder by loading it, then writes its config and
/// tokenizer files and its weights (one file, checkpoint names) as artifacts.
fn copy_folder(
    dir: &Path,
    names: &[&str],
    ctx: &StageContext<'_>,
) -> Result<serde_json::Value, StageError> {
    let model = model::load_folder(dir).map_err(model_error)?;
    let tokenizer = dir.join("tokenizer.json");
    if !tokenizer.is_file() {
        return Err(StageError::bad_input(format!(
            "the base model folder `{}` has no `tokenizer.json`",
            dir.display()
        )));
    }
    // Caught here, not at verify after export ran: the tokenizer loads.
    if let Err(e) = tokenizers::Tokenizer::from_file(&tokenizer) {
        return Err(StageError::bad_input(format!(
            "`{}` is not a tokenizer the tokenizers library can load: {e}",
            tokenizer.display()
        )));
    }
    for name in [
        "config.json",
        "tokenizer.json",
        "generation_config.json",
        "tokenizer_config.json",
    ] {
        if names.contains(&name) && dir.join(name).is_file() {
            copy(&dir.join(name), &ctx.output(name))?;
        }
    }
    // A single float32 file holding exactly the model's tensors under their
    // checkpoint names is copied as it is (500 MB for GPT-2 small: a copy,
    // not a re-serialisation); anything else is written anew.
    let tensors = model.named_tensors();
    let single = dir.join("model.safetensors");
    if single.is_file() && safetensors_matches(&single, &tensors) {
        copy(&single, &ctx.output("model.safetensors"))?;
        let parameters: usize = tensors.values().map(|t| t.elem_count()).sum();
        return Ok(
            serde_json::json!({ "parameters": parameters, "vocab_size": model.vocab_size(), "weights": "copied" }),
        );
    }
    save_weights(&model, ctx)
}

/// The files of a `gguf:` base: the file itself, keyed by its content
/// under its name (not its folder).
pub fn gguf_files(file: &Path) -> Vec<ExternalFile> {
    let name = file
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    vec![ExternalFile {
        label: format!("base.model/{name}"),
        path: file.to_path_buf(),
    }]
}

/// A `gguf:` base: the file read into a Hugging Face folder (see
/// [`model::gguf`]), then loaded as any folder is, to check it.
fn from_gguf(file: &Path, ctx: &StageContext<'_>) -> Result<serde_json::Value, StageError> {
    let converted = model::gguf::read(file).map_err(model_error)?;
    let parameters: usize = converted.tensors.values().map(|t| t.elem_count()).sum();
    model::check_memory(
        parameters as u128 * 4 * 2,
        &format!("the GGUF model's {parameters} parameters in float32"),
        "use a smaller model",
    )
    .map_err(model_error)?;
    for (name, value) in [
        ("config.json", &converted.config),
        ("generation_config.json", &converted.generation_config),
        ("tokenizer.json", &converted.tokenizer),
        ("tokenizer_config.json", &converted.tokenizer_config),
    ] {
        write_json(&ctx.output(name), value)?;
    }
    model::save_safetensors(&converted.tensors, &ctx.output("model.safetensors"))
        .map_err(model_error)?;
    drop(converted.tensors);
    // What was written loads, as a model and as a tokenizer.
    let folder = ctx
        .output("config.json")
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_default();
    let model = model::load_folder(&folder).map_err(model_error)?;
    tokenizers::Tokenizer::from_file(ctx.output("tokenizer.json")).map_err(|e| {
        StageError::failed(format!(
            "the tokenizer read from `{}` does not load: {e}",
            file.display()
        ))
    })?;
    Ok(
        serde_json::json!({ "parameters": parameters, "vocab_size": model.vocab_size(), "weights": "gguf", "storage": converted.storage }),
    )
}

/// Whether the safetensors file at `path` holds exactly `tensors`: the same
/// names, float32, the same shapes (read from its header only).
fn safetensors_matches(path: &Path, tensors: &BTreeMap<String, candle_core::Tensor>) -> bool {
    use std::io::Read;
    let header = || -> Option<serde_json::Map<String, serde_json::Value>> {
        let mut file = std::fs::File::open(path).ok()?;
        let mut len = [0u8; 8];
        file.read_exact(&mut len).ok()?;
        let len = u64::from_le_bytes(len);
        if len > 100 << 20 {
            return None;
        }
        let mut json = vec![0u8; len as usize];
        file.read_exact(&mut json).ok()?;
        serde_json::from_slice(&json).ok()
    };
    let Some(mut header) = header() else {
        return false;
    };
    header.remove("__metadata__");
    header.len() == tensors.len()
        && tensors.iter().all(|(name, t)| {
            header.get(name).is_some_and(|h| {
                h["dtype"] == "F32"
                    && h["shape"].as_array().is_some_and(|s| {
                        s.iter()
                            .map(|d| d.as_u64().unwrap_or(u64::MAX) as usize)
                            .eq(t.dims().iter().copied())
                    })
            })
        })
}

/// Writes the weights (one file, checkpoint names); returns the stage metrics.
pub(super) fn save_weights(
    model: &model::Model,
    ctx: &StageContext<'_>,
) -> Result<serde_json::Value, StageError> {
    let tensors = model.named_tensors();
    model::save_safetensors(&tensors, &ctx.output("model.safetensors")).map_err(model_error)?;
    let parameters: usize = tensors.values().map(|t| t.elem_count()).sum();
    Ok(serde_json::json!({ "parameters": parameters, "vocab_size": model.vocab_size() }))
}

impl BaseStage {
    fn scratch(&self, ctx: &StageContext<'_>) -> Result<serde_json::Value, StageError> {
        let tokenizer_path = ctx.input("tokenizer", "tokenizer.json")?;
        let tokenizer = tokenizers::Tokenizer::from_file(tokenizer_path)
            .map_err(|e| StageError::failed(format!("cannot load the trained tokenizer: {e}")))?;
        let eos = tokenizer
            .token_to_id("<|endoftext|>")
            .or_else(|| tokenizer.get_added_tokens_decoder().keys().min().copied());
        let b = &self.base;
        let config = scratch_config(b, tokenizer.get_vocab_size(true), eos);
        // Its weights, and as much again while they are initialised and saved.
        let parameters = config.parameters();
        model::check_memory(
            parameters * 4 * 2,
            &format!("a new model of {parameters} parameters"),
            "lower `base.n_embd`, `base.n_layer` or `base.n_positions`",
        )
        .map_err(model_error)?;
        let model = model::Model::scratch(&config, &mut Rng::new(b.seed)).map_err(model_error)?;
        let metrics = save_weights(&model, ctx)?;
        let mut json = match &config {
            ModelConfig::Gpt2(c) => serde_json::to_value(c),
            ModelConfig::Llama(c) => serde_json::to_value(c),
        }
        .expect("config serialises");
        json["architectures"] = serde_json::json!([model.family().architecture()]);
        json["initializer_range"] = 0.02.into();
        json["torch_dtype"] = "float32".into();
        write_json(&ctx.output("config.json"), &json)?;
        write_json(
            &ctx.output("generation_config.json"),
            &serde_json::json!({"bos_token_id": eos, "eos_token_id": eos}),
        )?;
        copy(tokenizer_path, &ctx.output("tokenizer.json"))?;
        Ok(metrics)
    }
}

/// The config of a from-scratch model of the manifest's architecture and size.
fn scratch_config(b: &Base, vocab_size: usize, eos: Option<u32>) -> ModelConfig {
    let (n_layer, n_head, n_embd, n_positions) = (
        b.n_layer as usize,
        b.n_head as usize,
        b.n_embd as usize,
        b.n_positions as usize,
    );
    match b.architecture {
        Architecture::Gpt2 => ModelConfig::Gpt2(model::gpt2::Config {
            vocab_size,
            n_positions,
            n_embd,
            n_layer,
            n_head,
            n_inner: None,
            layer_norm_epsilon: 1e-5,
            activation_function: "gelu_new".to_string(),
            bos_token_id: eos,
            eos_token_id: eos,
            model_type: Some("gpt2".to_string()),
            tie_word_embeddings: Some(true),
        }),
        // SmolLM2's choices: a tied head, an MLP about 8/3 as wide (to a multiple of 64).
        Architecture::Llama => ModelConfig::Llama(model::llama::Config {
            vocab_size,
            hidden_size: n_embd,
            intermediate_size: (8 * n_embd / 3).div_ceil(64) * 64,
            num_hidden_layers: n_layer,
            num_attention_heads: n_head,
            num_key_value_heads: Some(n_head),
            head_dim: Some(n_embd / n_head),
            rms_norm_eps: 1e-5,
            rope_theta: 10_000.0,
            rope_scaling: None,
            max_position_embeddings: n_positions,
            tie_word_embeddings: true,
            attention_bias: false,
            mlp_bias: false,
            hidden_act: "silu".to_string(),
            bos_token_id: eos,
            eos_token_id: eos,
            model_type: Some("llama".to_string()),
            use_sliding_window: false,
        }),
    }
}

pub struct FinetuneStage {
    pub finetune: Finetune,
    /// The stage whose model it trains: `base`, or `vocab` when one grew it.
    pub model_stage: &'static str,
    /// What the adapter names as its base (`base_model_name_or_path`): the
    /// Hub id. A local folder is named by its config's `_name_or_path` (what
    /// transformers saved it from) when that is not a path of a machine.
    pub base_name: Option<String>,
}

impl FinetuneStage {
    /// The stage from its [`Stage::spec`], on a worker.
    pub fn from_spec(spec: &serde_json::Value) -> Result<Self, String> {
        let finetune = serde_json::from_value(spec["finetune"].clone())
            .map_err(|e| format!("`finetune`: {e}"))?;
        let model_stage = match spec["model_stage"].as_str() {
            Some("base") => "base",
            Some("vocab") => "vocab",
            other => {
                return Err(format!(
                    "`model_stage` {other:?} is neither `base` nor `vocab`"
                ));
            }
        };
        let base_name = serde_json::from_value(spec["base_name"].clone())
            .map_err(|e| format!("`base_name`: {e}"))?;
        Ok(FinetuneStage {
            finetune,
            model_stage,
            base_name,
        })
    }

    fn train_config(&self, trainable_tokens: Vec<u32>) -> TrainConfig {
        let f = &self.finetune;
        let method = match f.method {
            FinetuneMethod::Full | FinetuneMethod::None => Method::Full,
            FinetuneMethod::Lora => Method::Lora {
                spec: LoraSpec {
                    targets: f.targets.clone(),
                    rank: f.rank as usize,
                    alpha: f.alpha,
                    rslora: f.rslora,
                },
                dropout: f.dropout,
            },
        };
        TrainConfig {
            method,
            learning_rate: f.learning_rate,
            weight_decay: f.weight_decay,
            schedule: match f.schedule {
                crate::manifest::Schedule::Cosine => Schedule::Cosine,
                crate::manifest::Schedule::Linear => Schedule::Linear,
                crate::manifest::Schedule::Constant => Schedule::Constant,
            },
            warmup_steps: f.warmup_steps as usize,
            batch_size: f.batch_size as usize,
            block_size: f.block_size as usize,
            epochs: f.epochs as usize,
            max_steps: f.max_steps.map(|s| s as usize),
            gradient_accumulation: f.gradient_accumulation as usize,
            max_grad_norm: f.max_grad_norm,
            eval_every: f.eval_every as usize,
            early_stopping_patience: f.early_stopping_patience.map(|p| p as usize),
            checkpoint_every: f.checkpoint_every as usize,
            seed: f.seed,
            trainable_tokens,
        }
    }
}

/// The LoRA targets for a model of `family`: the family's defaults when the
/// manifest names none, and an error naming the setting when it names a
/// layer the family does not have.
fn check_targets(family: model::Family, targets: &mut Vec<String>) -> Result<(), StageError> {
    if targets.is_empty() {
        *targets = family
            .default_lora_targets()
            .iter()
            .map(|t| t.to_string())
            .collect();
    }
    let known = family.lora_targets();
    if let Some(bad) = targets.iter().find(|t| !known.contains(&t.as_str())) {
        return Err(StageError::bad_input(format!(
            "`finetune.targets`: `{bad}` is not a layer of a {family} model; {family} has {}",
            known.join(", ")
        )));
    }
    Ok(())
}

/// The model a model stage (`base`, `vocab`, `merge`) wrote: its
/// `config.json` and `model.safetensors` artifacts, loaded.
pub(super) fn load_model(ctx: &StageContext<'_>, stage: &str) -> Result<model::Model, StageError> {
    model::load_files(
        ctx.input(stage, "config.json")?,
        &[ctx.input(stage, "model.safetensors")?.to_path_buf()],
    )
    .map_err(model_error)
}

/// Loads the model to train from the artifacts of `stage`.
fn load_base(
    ctx: &StageContext<'_>,
    stage: &str,
) -> Result<(model::Model, tokenizers::Tokenizer), StageError> {
    let model = load_model(ctx, stage)?;
    let tokenizer = tokenizers::Tokenizer::from_file(ctx.input(stage, "tokenizer.json")?)
        .map_err(|e| StageError::failed(format!("cannot load the base tokenizer: {e}")))?;
    Ok((model, tokenizer))
}

fn tokenize(
    tokenizer: &tokenizers::Tokenizer,
    docs: &[Document],
) -> Result<Vec<Vec<u32>>, StageError> {
    let texts: Vec<String> = docs
        .iter()
        .map(|d| match d {
            Document::Text { text } => text.clone(),
            Document::PromptCompletion { prompt, completion } => format!("{prompt}\n{completion}"),
        })
        .collect();
    // With the tokenizer's special tokens (a SentencePiece `<s>`), as
    // transformers encodes text by default.
    let encodings = tokenizer
        .encode_batch(texts, true)
        .map_err(|e| StageError::failed(format!("cannot tokenize the corpus: {e}")))?;
    Ok(encodings
        .into_iter()
        .map(|e| e.get_ids().to_vec())
        .collect())
}

impl FinetuneStage {
    /// LoRA on a model whose vocabulary grew trains the new rows too.
    fn trains_new_tokens(&self) -> bool {
        self.model_stage == "vocab"
            && self.finetune.method == FinetuneMethod::Lora
            && self.finetune.train_new_tokens
    }
}

impl Stage for FinetuneStage {
    fn name(&self) -> &str {
        "finetune"
    }
    fn kind(&self) -> &'static str {
        "finetune"
    }
    fn version(&self) -> u32 {
        // 3: the adapter names its base; safetensors carry `{"format": "pt"}`.
        // 4: the loss plot has axes, ticks, a grid and a legend.
        4
    }
    fn settings(&self) -> Settings {
        let f = &self.finetune;
        let mut s = Settings::new();
        s.insert(
            "finetune.method".into(),
            serde_json::to_value(f.method).expect("serialises"),
        );
        if f.method == FinetuneMethod::Lora {
            s.insert("base.model".into(), serde_json::json!(self.base_name));
        }
        if f.method == FinetuneMethod::Lora {
            s.insert("finetune.rank".into(), f.rank.into());
            s.insert("finetune.alpha".into(), f.alpha.into());
            s.insert("finetune.dropout".into(), f.dropout.into());
            s.insert("finetune.rslora".into(), f.rslora.into());
            s.insert("finetune.targets".into(), serde_json::json!(f.targets));
        }
        for (key, value) in [
            ("learning_rate", f.learning_rate),
            ("weight_decay", f.weight_decay),
            ("max_grad_norm", f.max_grad_norm),
        ] {
            s.insert(format!("finetune.{key}"), value.into());
        }
        s.insert(
            "finetune.schedule".into(),
            serde_json::to_value(f.schedule).expect("serialises"),
        );
        for (key, value) in [
            ("warmup_steps", f.warmup_steps),
            ("batch_size", f.batch_size),
            ("block_size", f.block_size),
            ("epochs", f.epochs),
            ("gradient_accumulation", f.gradient_accumulation),
            ("eval_every", f.eval_every),
            ("checkpoint_every", f.checkpoint_every),
            ("seed", f.seed),
        ] {
            s.insert(format!("finetune.{key}"), value.into());
        }
        s.insert("finetune.max_steps".into(), serde_json::json!(f.max_steps));
        s.insert(
            "finetune.early_stopping_patience".into(),
            serde_json::json!(f.early_stopping_patience),
        );
        if self.trains_new_tokens() {
            s.insert("finetune.train_new_tokens".into(), true.into());
        }
        s
    }
    fn dependencies(&self) -> Vec<String> {
        vec!["corpus".to_string(), self.model_stage.to_string()]
    }
    fn spec(&self) -> Option<serde_json::Value> {
        Some(
            serde_json::json!({"finetune": self.finetune, "model_stage": self.model_stage, "base_name": self.base_name}),
        )
    }
    fn publishes(&self) -> Vec<(String, String)> {
        let mut files = vec![
            (
                "metrics.json".to_string(),
                "training/metrics.json".to_string(),
            ),
            ("loss.svg".to_string(), "training/loss.svg".to_string()),
        ];
        if self.finetune.method == FinetuneMethod::Lora {
            for file in ["adapter_config.json", "adapter_model.safetensors"] {
                files.push((file.to_string(), format!("adapter/{file}")));
            }
        }
        files
    }
    fn tools(&self) -> BTreeMap<String, String> {
        tools()
    }
    fn run(&self, ctx: &StageContext<'_>) -> Result<serde_json::Value, StageError> {
        self.check_memory(ctx)?;
        let (model, tokenizer) = load_base(ctx, self.model_stage)?;
        let trainable_tokens = if self.trains_new_tokens() {
            super::vocab::read_new_tokens(ctx.input("vocab", "new_tokens.json")?)?
        } else {
            Vec::new()
        };
        let config = self.train_config(trainable_tokens);
        if config.block_size > model.context() {
            return Err(StageError::bad_input(format!(
                "`finetune.block_size` = {} is longer than the base model's context ({} positions)",
                config.block_size,
                model.context()
            )));
        }
        let mut config = config;
        if let Method::Lora { spec, .. } = &mut config.method {
            check_targets(model.family(), &mut spec.targets)?;
            if spec.rank > model.width() {
                return Err(StageError::bad_input(format!(
                    "`finetune.rank` = {} is larger than the base model's width ({})",
                    spec.rank,
                    model.width()
                )));
            }
        }
        let base_name = self.base_name.clone().or_else(|| {
            let config: serde_json::Value =
                model::read_json(ctx.input(self.model_stage, "config.json").ok()?).ok()?;
            config["_name_or_path"]
                .as_str()
                .filter(|n| !n.is_empty() && !Path::new(n).is_absolute() && !n.starts_with('.'))
                .map(str::to_string)
        });
        let separator = model.config().eos_token_id();
        let train_docs = read_documents(ctx.input("corpus", "train.jsonl")?)?;
        let eval_docs = read_documents(ctx.input("corpus", "eval.jsonl")?)?;
        let train_blocks = pack(
            &tokenize(&tokenizer, &train_docs)?,
            separator,
            config.block_size,
        );
        let eval_blocks = pack(
            &tokenize(&tokenizer, &eval_docs)?,
            separator,
            config.block_size,
        );
        let started = std::time::Instant::now();
        let noted = std::cell::Cell::new(false);
        let trained = train(
            model,
            &config,
            &train_blocks,
            &eval_blocks,
            Some(ctx.checkpoint_dir()),
            |p: &Progress<'_>| {
                if p.resumed_from > 0 && !noted.replace(true) {
                    ctx.note(&format!(
                        "resumed from step {} of {} (a checkpoint of an interrupted build)",
                        p.resumed_from, p.total_steps
                    ));
                }
                let fields = [
                    ("loss", p.loss),
                    ("tokens_per_second", p.tokens_per_second),
                    ("eta_s", p.eta_seconds),
                ];
                ctx.progress_with(
                    p.step as u64,
                    p.total_steps as u64,
                    &format!(
                        "loss {:.3}, {:.0} tokens/s, ETA {:.0}s",
                        p.loss, p.tokens_per_second, p.eta_seconds
                    ),
                    &fields,
                );
            },
        )
        .map_err(model_error)?;
        let seconds = started.elapsed().as_secs_f64();
        match (&config.method, &trained.lora) {
            (Method::Lora { spec, dropout }, Some(lora)) => {
                write_json(
                    &ctx.output("adapter_config.json"),
                    &lora::peft_config(
                        trained.model.family(),
                        base_name.as_deref(),
                        spec,
                        *dropout,
                        &config.trainable_tokens,
                        &lora.token_modules(),
                    ),
                )?;
                model::save_safetensors(
                    &lora.peft_tensors(),
                    &ctx.output("adapter_model.safetensors"),
                )
                .map_err(model_error)?;
            }
            _ => model::save_safetensors(
                &trained.model.named_tensors(),
                &ctx.output("model.safetensors"),
            )
            .map_err(model_error)?,
        }
        let m = &trained.metrics;
        let first = m.eval_loss.first().map(|e| e.1);
        let last = m.eval_loss.last().map(|e| e.1);
        // The artifact holds only what the seed determines; timings and
        // whether the run resumed go to the record's metrics.
        let metrics = serde_json::json!({
            "steps": m.steps,
            "total_steps": m.total_steps,
            "tokens": m.tokens,
            "train_blocks": train_blocks.len(),
            "eval_blocks": eval_blocks.len(),
            "initial_eval_loss": first,
            "final_eval_loss": last,
            "initial_perplexity": first.map(f64::exp),
            "final_perplexity": last.map(f64::exp),
            "stopped_early": m.stopped_early,
            "train_loss": m.train_loss,
            "eval_loss": m.eval_loss,
        });
        write_json(&ctx.output("metrics.json"), &metrics)?;
        std::fs::write(
            ctx.output("loss.svg"),
            loss_svg(&m.train_loss, &m.eval_loss),
        )
        .map_err(|e| io(&ctx.output("loss.svg"), e))?;
        let mut summary = metrics;
        let object = summary.as_object_mut().expect("an object");
        object.retain(|k, _| k != "train_loss" && k != "eval_loss");
        object.insert("resumed_from_step".into(), m.resumed_from.into());
        object.insert("seconds_this_run".into(), seconds.into());
        object.insert(
            "tokens_per_second".into(),
            (trained.tokens_this_run as f64 / seconds.max(1e-9)).into(),
        );
        Ok(summary)
    }
}

/// Round tick positions covering `lo..=hi`: steps of 1, 2 or 5 times a
/// power of ten, about `count` of them.
fn ticks(lo: f64, hi: f64, count: usize) -> Vec<f64> {
    let raw = (hi - lo) / count.max(1) as f64;
    if !(raw > 0.0 && raw.is_finite()) {
        return vec![lo];
    }
    let magnitude = 10f64.powf(raw.log10().floor());
    let multiple = [1.0, 2.0, 5.0, 10.0]
        .into_iter()
        .find(|m| m * magnitude >= raw)
        .unwrap_or(10.0);
    let step = multiple * magnitude;
    let first = (lo / step).ceil() as i64;
    let last = (hi / step).floor() as i64;
    // i·multiple·10^e, divided rather than multiplied for e < 0 so that the
    // values are the round decimals (2.4, not 2.4000000000000004).
    let value = |i: i64| {
        if magnitude < 1.0 {
            i as f64 * multiple / (1.0 / magnitude).round()
        } else {
            i as f64 * multiple * magnitude
        }
    };
    (first..=last).map(value).collect()
}

/// The loss curves as a small standalone SVG: training loss per step (a
/// line) and eval loss (dots), on axes with ticks, a grid and labels.
pub fn loss_svg(train: &[(usize, f64)], eval: &[(usize, f64)]) -> String {
    use std::fmt::Write;
    let (width, height) = (640.0, 360.0);
    let (left, right, top, bottom) = (56.0, 16.0, 36.0, 44.0);
    let max_step = train
        .iter()
        .chain(eval)
        .map(|p| p.0)
        .max()
        .unwrap_or(1)
        .max(1) as f64;
    let values = train
        .iter()
        .chain(eval)
        .map(|p| p.1)
        .filter(|v| v.is_finite());
    let (lo, hi) = values.fold((f64::MAX, f64::MIN), |(lo, hi), v| (lo.min(v), hi.max(v)));
    let (lo, hi) = if lo < hi {
        (lo, hi)
    } else if lo <= hi {
        (lo - 1.0, lo + 1.0)
    } else {
        (0.0, 1.0)
    };
    let margin = (hi - lo) * 0.05;
    let (lo, hi) = (lo - margin, hi + margin);
    let x = |step: f64| left + step / max_step * (width - left - right);
    let y = |v: f64| height - bottom - (v - lo) / (hi - lo) * (height - top - bottom);
    let mut svg = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" viewBox=\"0 0 {width} {height}\" width=\"{width}\" height=\"{height}\" font-family=\"sans-serif\" font-size=\"12\"><rect width=\"100%\" height=\"100%\" fill=\"white\"/>"
    );
    // Grid and ticks.
    let digits = if hi - lo < 0.5 { 3 } else { 2 };
    for v in ticks(lo, hi, 5) {
        let _ = write!(
            svg,
            "<line x1=\"{left}\" x2=\"{:.1}\" y1=\"{:.1}\" y2=\"{:.1}\" stroke=\"#e5e5e5\"/><text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"end\">{v:.digits$}</text>",
            width - right,
            y(v),
            y(v),
            left - 6.0,
            y(v) + 4.0
        );
    }
    for s in ticks(0.0, max_step, 6)
        .into_iter()
        .filter(|s| s.fract() == 0.0)
    {
        let _ = write!(
            svg,
            "<line x1=\"{:.1}\" x2=\"{:.1}\" y1=\"{top}\" y2=\"{:.1}\" stroke=\"#e5e5e5\"/><text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"middle\">{s}</text>",
            x(s),
            x(s),
            height - bottom,
            x(s),
            height - bottom + 16.0
        );
    }
    // Axes and their labels.
    let _ = write!(
        svg,
        "<line x1=\"{left}\" x2=\"{left}\" y1=\"{top}\" y2=\"{:.1}\" stroke=\"#333\"/><line x1=\"{left}\" x2=\"{:.1}\" y1=\"{:.1}\" y2=\"{:.1}\" stroke=\"#333\"/>\
<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"middle\">step</text><text transform=\"rotate(-90)\" x=\"{:.1}\" y=\"14\" text-anchor=\"middle\">loss (nats per token)</text>",
        height - bottom,
        width - right,
        height - bottom,
        height - bottom,
        (left + width - right) / 2.0,
        height - 8.0,
        -(top + height - bottom) / 2.0,
    );
    // The curves.
    let line: Vec<String> = train
        .iter()
        .filter(|p| p.1.is_finite())
        .map(|&(s, v)| format!("{:.1},{:.1}", x(s as f64), y(v)))
        .collect();
    let _ = write!(
        svg,
        "<polyline fill=\"none\" stroke=\"#00798c\" stroke-width=\"1.5\" points=\"{}\"/>",
        line.join(" ")
    );
    for &(s, v) in eval.iter().filter(|p| p.1.is_finite()) {
        let _ = write!(
            svg,
            "<circle cx=\"{:.1}\" cy=\"{:.1}\" r=\"4\" fill=\"#d1495b\"/>",
            x(s as f64),
            y(v)
        );
    }
    // The legend.
    let _ = writeln!(
        svg,
        "<line x1=\"{left}\" x2=\"{:.1}\" y1=\"18\" y2=\"18\" stroke=\"#00798c\" stroke-width=\"2\"/><text x=\"{:.1}\" y=\"22\">training loss</text><circle cx=\"{:.1}\" cy=\"18\" r=\"4\" fill=\"#d1495b\"/><text x=\"{:.1}\" y=\"22\">eval loss</text></svg>",
        left + 20.0,
        left + 26.0,
        left + 130.0,
        left + 140.0
    );
    svg
}

#[cfg(test)]
mod svg_tests {
    use super::*;

    #[test]
    fn ticks_are_round_and_cover_the_range() {
        assert_eq!(
            ticks(0.0, 100.0, 5),
            vec![0.0, 20.0, 40.0, 60.0, 80.0, 100.0]
        );
        assert_eq!(ticks(2.31, 3.07, 5), vec![2.4, 2.6, 2.8, 3.0]);
        assert_eq!(ticks(0.0, 7.0, 6), vec![0.0, 2.0, 4.0, 6.0]);
    }

    #[test]
    fn the_loss_plot_has_axes_ticks_grid_labels_and_a_legend() {
        let train: Vec<(usize, f64)> = (1..=40).map(|s| (s, 5.0 - s as f64 * 0.05)).collect();
        let svg = loss_svg(&train, &[(0, 5.1), (20, 4.1), (40, 3.2)]);
        assert!(svg.contains(">step</text>") && svg.contains(">loss (nats per token)</text>"));
        assert!(svg.contains(">training loss</text>") && svg.contains(">eval loss</text>"));
        assert!(
            svg.contains(">40</text>") && svg.contains(">3.50</text>"),
            "{svg}"
        );
        assert_eq!(
            svg.matches("<circle").count(),
            4,
            "three eval points and the legend's"
        );
        assert!(svg.matches("stroke=\"#e5e5e5\"").count() >= 8, "grid lines");
    }
}

impl FinetuneStage {
    /// Refuses a training that cannot fit in memory before the model is
    /// loaded: the weights, the optimizer's state (AdamW: a gradient and two
    /// moments per trained parameter) and, at the least, each layer's
    /// activations and the logits of one batch.
    fn check_memory(&self, ctx: &StageContext<'_>) -> Result<(), StageError> {
        let config =
            ModelConfig::read(ctx.input(self.model_stage, "config.json")?).map_err(model_error)?;
        let f = &self.finetune;
        let parameters = config.parameters();
        let trained = if f.method == FinetuneMethod::Lora {
            0
        } else {
            parameters
        };
        let tokens = f.batch_size as u128 * f.block_size as u128;
        let activations = tokens
            * (config.n_layer() as u128 * config.width() as u128 * 8
                + config.vocab_size() as u128 * 3);
        let needed = (parameters + 3 * trained + activations) * 4;
        let fix = if f.method == FinetuneMethod::Lora {
            "lower `finetune.batch_size` or `finetune.block_size` (or choose a smaller base)"
        } else {
            "lower `finetune.batch_size` or `finetune.block_size`, or train with `finetune.method = \"lora\"`"
        };
        model::check_memory(
            needed,
            &format!(
                "training {parameters} parameters on batches of {} x {} tokens",
                f.batch_size, f.block_size
            ),
            fix,
        )
        .map_err(model_error)
    }
}

pub struct MergeStage {
    pub lora: bool,
    /// The stage whose model the adapter was trained on.
    pub model_stage: &'static str,
}

impl Stage for MergeStage {
    fn name(&self) -> &str {
        "merge"
    }
    fn kind(&self) -> &'static str {
        "merge"
    }
    fn version(&self) -> u32 {
        // 2: the pad token declared in tokenizer_config.json; safetensors
        // carry `{"format": "pt"}`. 3: `model_input_names` in
        // tokenizer_config.json, and `add_bos_token` where the tokenizer adds one.
        3
    }
    fn settings(&self) -> Settings {
        Settings::new()
    }
    fn dependencies(&self) -> Vec<String> {
        vec![self.model_stage.to_string(), "finetune".to_string()]
    }
    fn tools(&self) -> BTreeMap<String, String> {
        tools()
    }
    fn publishes(&self) -> Vec<(String, String)> {
        [
            "config.json",
            "generation_config.json",
            "model.safetensors",
            "tokenizer.json",
            "tokenizer_config.json",
        ]
        .iter()
        .map(|f| (f.to_string(), f.to_string()))
        .collect()
    }
    fn run(&self, ctx: &StageContext<'_>) -> Result<serde_json::Value, StageError> {
        let weights: PathBuf = if self.lora {
            let (mut model, _) = load_base(ctx, self.model_stage)?;
            lora::load_adapter_files(
                &mut model,
                ctx.input("finetune", "adapter_config.json")?,
                ctx.input("finetune", "adapter_model.safetensors")?,
            )
            .map_err(model_error)?;
            lora::merge(&mut model).map_err(model_error)?;
            model::save_safetensors(&model.named_tensors(), &ctx.output("model.safetensors"))
                .map_err(model_error)?;
            ctx.output("model.safetensors")
        } else {
            let trained = ctx.input("finetune", "model.safetensors")?;
            copy(trained, &ctx.output("model.safetensors"))?;
            ctx.output("model.safetensors")
        };
        for file in ["config.json", "generation_config.json", "tokenizer.json"] {
            match ctx.input(self.model_stage, file) {
                Ok(from) => {
                    copy(from, &ctx.output(file))?;
                }
                Err(_) if file == "generation_config.json" => {}
                Err(e) => return Err(e),
            }
        }
        let base = ctx.input(self.model_stage, "tokenizer_config.json").ok();
        write_json(
            &ctx.output("tokenizer_config.json"),
            &tokenizer_config(
                &ctx.output("config.json"),
                &ctx.output("tokenizer.json"),
                base,
            )?,
        )?;
        let size = std::fs::metadata(&weights).map(|m| m.len()).unwrap_or(0);
        Ok(serde_json::json!({ "model_bytes": size }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failed_writes_and_networks_exit_1_and_bad_files_2() {
        let class = |e: ModelError| model_error(e).class;
        assert_eq!(
            class(ModelError::write(
                Path::new("/x"),
                std::io::Error::from_raw_os_error(28)
            )),
            crate::engine::FailureClass::Failed
        );
        assert_eq!(
            class(ModelError::Network("connection refused".into())),
            crate::engine::FailureClass::Failed
        );
        assert_eq!(
            class(ModelError::io(Path::new("/x/config.json"), "invalid JSON")),
            crate::engine::FailureClass::BadInput
        );
    }
}
