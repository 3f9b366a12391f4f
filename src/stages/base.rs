//! Stage `base`: the base model as a Hugging Face folder's files
//! (`config.json`, `model.safetensors`, `tokenizer.json`,
//! `generation_config.json`, `tokenizer_config.json`): a local folder
//! (validated by loading it), a Hub repository at a resolved commit, a GGUF
//! file dequantized, or a model of the manifest's size initialised from a
//! seed, whose tokenizer is the one the `tokenizer` stage trained.

use std::collections::BTreeMap;
use std::path::Path;

use super::shared::{
    Artifact, TRAINED_TOKENIZER, copy, model_error, save_weights, write_json, writers,
};
use crate::engine::{
    ExternalFile, Settings, Stage, StageContext, StageError, settings_of, spec_of,
};
use crate::manifest::{Architecture, Base, BaseModel};
use crate::model::rng::Rng;
use crate::model::{self, ModelConfig};

/// The stage is its settings.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct BaseStage {
    pub base: BaseSettings,
    /// Where the model is: a folder or a GGUF file is keyed by its content
    /// (`files`), never by where it lies; a Hub repository as `base.model`.
    #[serde(rename = "@model")]
    pub model: BaseModel,
    /// For a local folder or GGUF file: its files, keyed by content.
    #[serde(rename = "@files")]
    pub files: Vec<ExternalFile>,
    /// For a Hub model: its revision resolved to a commit (keyed as
    /// `base.commit`), or why it could not be (reported when it runs).
    #[serde(rename = "@hub")]
    pub hub: Option<Result<model::hub::Resolved, StageError>>,
    /// Where the output folder gets the base model: not what it holds.
    #[serde(rename = "@publish")]
    pub publish: super::ModelPublish,
}

/// What of `[base]` shapes the model's files.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct BaseSettings {
    pub model: BaseKind,
    /// A Hub base's commit (`null`: the Hub could not be asked).
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "present"
    )]
    pub commit: Option<Option<String>>,
    /// A model from scratch: its shape and seed.
    #[serde(flatten, default, skip_serializing_if = "Option::is_none")]
    pub scratch: Option<ScratchShape>,
}

/// What kind of base it is (a Hub repository by name and revision).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BaseKind {
    Scratch,
    Hub {
        repo: String,
        revision: Option<String>,
    },
    Path,
    Gguf,
}

/// A model from scratch: `[base]`'s architecture, size and seed.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct ScratchShape {
    pub architecture: Architecture,
    pub n_layer: u64,
    pub n_head: u64,
    pub n_embd: u64,
    pub n_positions: u64,
    pub seed: u64,
}

/// A field that is there, `null` included, is `Some`.
fn present<'de, D, T>(deserializer: D) -> Result<Option<T>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: serde::Deserialize<'de>,
{
    T::deserialize(deserializer).map(Some)
}

impl BaseStage {
    /// The stage for `[base]`.
    pub fn new(
        base: &Base,
        files: Vec<ExternalFile>,
        hub: Option<Result<model::hub::Resolved, StageError>>,
        publish: super::ModelPublish,
    ) -> Self {
        let kind = match &base.model {
            BaseModel::Scratch => BaseKind::Scratch,
            BaseModel::Hub { repo, revision } => BaseKind::Hub {
                repo: repo.clone(),
                revision: revision.clone(),
            },
            BaseModel::Path(_) => BaseKind::Path,
            BaseModel::Gguf(_) => BaseKind::Gguf,
        };
        let scratch = (kind == BaseKind::Scratch).then_some(ScratchShape {
            architecture: base.architecture,
            n_layer: base.n_layer,
            n_head: base.n_head,
            n_embd: base.n_embd,
            n_positions: base.n_positions,
            seed: base.seed,
        });
        BaseStage {
            base: BaseSettings {
                model: kind,
                commit: hub
                    .as_ref()
                    .map(|h| h.as_ref().ok().map(|r| r.commit.clone())),
                scratch,
            },
            model: base.model.clone(),
            files,
            hub,
            publish,
        }
    }
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
        // The chat template in a file of its own, as transformers 4.50 on saves it.
        "chat_template.jinja".to_string(),
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

impl BaseStage {
    /// What it reads: a scratch model's tokenizer.
    fn inputs(&self) -> Vec<Artifact> {
        match self.model {
            BaseModel::Scratch => vec![TRAINED_TOKENIZER],
            _ => Vec::new(),
        }
    }
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
        settings_of(self)
    }
    fn spec(&self) -> Option<serde_json::Value> {
        spec_of(self)
    }
    fn dependencies(&self) -> Vec<String> {
        writers(&self.inputs())
    }
    fn files(&self) -> &[ExternalFile] {
        &self.files
    }
    fn tools(&self) -> BTreeMap<String, String> {
        super::shared::tools()
    }
    fn publishes(&self) -> Vec<(String, String)> {
        self.publish.files(false)
    }
    fn run(&self, ctx: &StageContext<'_>) -> Result<serde_json::Value, StageError> {
        match &self.model {
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
    // A chat template saved as `chat_template.jinja` joins tokenizer_config.json,
    // where the stages after this one (and transformers.js) read it.
    let jinja = dir.join("chat_template.jinja");
    if names.contains(&"chat_template.jinja") && jinja.is_file() {
        let out = ctx.output("tokenizer_config.json");
        let mut config: serde_json::Value = if out.is_file() {
            model::read_json(&out).map_err(model_error)?
        } else {
            serde_json::json!({})
        };
        if config["chat_template"].is_null() {
            config["chat_template"] = std::fs::read_to_string(&jinja)
                .map_err(|e| super::shared::io(&jinja, e))?
                .into();
            super::shared::write_json(&out, &config)?;
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

impl BaseStage {
    fn scratch(&self, ctx: &StageContext<'_>) -> Result<serde_json::Value, StageError> {
        let tokenizer_path = TRAINED_TOKENIZER.path(ctx)?;
        let tokenizer = tokenizers::Tokenizer::from_file(tokenizer_path)
            .map_err(|e| StageError::failed(format!("cannot load the trained tokenizer: {e}")))?;
        let eos = tokenizer
            .token_to_id("<|endoftext|>")
            .or_else(|| tokenizer.get_added_tokens_decoder().keys().min().copied());
        let b = self.base.scratch.as_ref().ok_or_else(|| {
            StageError::failed("a scratch base's stage has no shape (`base.n_layer`, ...)")
        })?;
        let config = scratch_config(b, tokenizer.get_vocab_size(true), eos).map_err(model_error)?;
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
        let mut json = config.json.clone();
        json["architectures"] = serde_json::json!([model.family().class()]);
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
fn scratch_config(
    b: &ScratchShape,
    vocab_size: usize,
    eos: Option<u32>,
) -> model::Result<ModelConfig> {
    let family = match b.architecture {
        Architecture::Gpt2 => model::families::gpt2::GPT2,
        Architecture::Llama => model::families::llama::LLAMA,
    };
    let (width, heads) = (b.n_embd as usize, b.n_head as usize);
    let dims = model::Dims {
        vocab_size,
        context: b.n_positions as usize,
        width,
        layers: b.n_layer as usize,
        heads,
        kv_heads: heads,
        head_dim: width / heads.max(1),
        inner: None,
    };
    family.scratch_config(&dims, eos)
}
