//! What the stages share and none owns: the errors of the layers below as
//! stage errors, writing artifacts, reading the artifacts one stage hands
//! another (the corpus's documents, a model folder and its tokenizer
//! config, the vocab's new tokens, an ONNX file's external data chunks),
//! the English sample, and the library versions that enter keys.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::engine::{StageContext, StageError};
use crate::manifest::ExternalData;
use crate::model::{self, ModelConfig, ModelError};
use crate::onnx::external::{self, Policy, Written};

/// The stage whose model folder another stage reads: a closed set.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ModelStage {
    Base,
    Vocab,
    Merge,
}

impl ModelStage {
    /// The stage's name in the plan.
    pub const fn name(self) -> &'static str {
        match self {
            ModelStage::Base => "base",
            ModelStage::Vocab => "vocab",
            ModelStage::Merge => "merge",
        }
    }

    /// One file of the model folder it writes (`config.json`, ...).
    pub const fn file(self, file: &'static str) -> Artifact {
        Artifact::new(self.name(), file)
    }

    /// A file of the stage's that it may not have written (a base without
    /// a `tokenizer_config.json`).
    pub fn optional_file<'a>(self, ctx: &'a StageContext<'_>, file: &str) -> Option<&'a Path> {
        ctx.input(self.name(), file).ok()
    }

    /// The files a stage that loads the model reads.
    pub fn model(self) -> [Artifact; 3] {
        ["config.json", "model.safetensors", "tokenizer.json"].map(|f| self.file(f))
    }
}

/// An artifact one stage writes and another reads: the writer's name in the
/// plan and the file's name among its outputs. A stage declares what it
/// reads, and its dependencies are the writers of that ([`writers`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Artifact {
    pub stage: &'static str,
    pub file: &'static str,
}

impl Artifact {
    pub const fn new(stage: &'static str, file: &'static str) -> Self {
        Artifact { stage, file }
    }

    /// Its path, in a stage that reads it.
    pub fn path<'a>(self, ctx: &'a StageContext<'_>) -> Result<&'a Path, StageError> {
        ctx.input(self.stage, self.file)
    }

    /// A dtype's ONNX file (its data chunks beside it: [`data_inputs`]).
    pub const fn onnx(dtype: crate::dtype::Dtype) -> Self {
        Artifact::new(dtype.producer_stage(), dtype.file_name())
    }

    /// A dtype's verification report.
    pub const fn verify_report(dtype: crate::dtype::Dtype) -> Self {
        Artifact::new(dtype.verify_stage(), "report.json")
    }
}

/// The stages that write `inputs`, each once, in order: a stage's dependencies.
pub fn writers(inputs: &[Artifact]) -> Vec<String> {
    let mut stages: Vec<String> = Vec::new();
    for input in inputs {
        if !stages.iter().any(|s| s == input.stage) {
            stages.push(input.stage.to_string());
        }
    }
    stages
}

/// The corpus's train split (`Document`s, one JSON object a line).
pub const TRAIN: Artifact = Artifact::new("corpus", "train.jsonl");
/// The corpus's eval split.
pub const EVAL: Artifact = Artifact::new("corpus", "eval.jsonl");
/// The tokenizer trained on the corpus.
pub const TRAINED_TOKENIZER: Artifact = Artifact::new("tokenizer", "tokenizer.json");
/// The warnings of the stages that warn, for the report and the card (see
/// [`write_warnings`]).
pub const WARNINGS: [Artifact; 3] = [
    Artifact::new("tokenizer", "warnings.json"),
    Artifact::new("finetune", "warnings.json"),
    Artifact::new("reference", "warnings.json"),
];
/// The ids the vocab stage added.
pub const NEW_TOKENS: Artifact = Artifact::new("vocab", "new_tokens.json");
/// The vocab stage's report (fertility, sizes).
pub const VOCAB_REPORT: Artifact = Artifact::new("vocab", "report.json");
/// A LoRA adapter in PEFT's files.
pub const ADAPTER_CONFIG: Artifact = Artifact::new("finetune", "adapter_config.json");
pub const ADAPTER_WEIGHTS: Artifact = Artifact::new("finetune", "adapter_model.safetensors");
/// All weights, trained.
pub const TRAINED_WEIGHTS: Artifact = Artifact::new("finetune", "model.safetensors");
/// The training's losses and counts.
pub const TRAINING_METRICS: Artifact = Artifact::new("finetune", "metrics.json");
/// The fp32 export.
pub const FP32_ONNX: Artifact = Artifact::new("export", "model.onnx");
/// The Hessian of each weight input over the calibration windows.
pub const HESSIANS: Artifact = Artifact::new("calibrate", "hessians.safetensors");
/// The calibration windows' token ids and counts.
pub const CALIBRATION_WINDOWS: Artifact = Artifact::new("calibrate", "calibration.json");
/// The verification workload: prompts and windows as token ids, candle's greedy tokens.
pub const WORKLOAD: Artifact = Artifact::new("reference", "reference.json");
/// candle's logits over the prompts and its greedy tokens (see
/// [`crate::verify::reference`]).
pub const REFERENCE_LOGITS: Artifact = Artifact::new("reference", "logits.f32");
/// The browser check's report.
pub const BROWSER_REPORT: Artifact = Artifact::new("browser", "report.json");

/// Writes the stage's warnings so far as its `warnings.json` (a list,
/// maybe empty), which report.html and the model card show.
pub fn write_warnings(ctx: &StageContext<'_>) -> Result<(), StageError> {
    write_json(
        &ctx.output("warnings.json"),
        &serde_json::to_value(ctx.warnings()).expect("warnings serialise"),
    )
}

/// The tokenizers version that shapes tokenizer artifacts (part of the
/// keys), as Cargo.lock pins it.
pub const TOKENIZERS_VERSION: &str = env!("SYMB_LOCKED_TOKENIZERS");

/// The candle version that shapes the model artifacts (part of the keys),
/// as Cargo.lock pins it.
pub const CANDLE_VERSION: &str = env!("SYMB_LOCKED_CANDLE");

/// A model error as a stage error: a bad file is the user's input (exit 2),
/// a failed write or network the machine's (exit 1).
pub fn model_error(e: ModelError) -> StageError {
    match e {
        ModelError::Candle(_) | ModelError::Write { .. } | ModelError::Network(_) => {
            StageError::failed_from(e)
        }
        _ => StageError::bad_input_from(e),
    }
}

/// A failed write of `path`.
pub fn io(path: &Path, e: std::io::Error) -> StageError {
    StageError::failed(format!("cannot write `{}`", path.display())).because(e)
}

/// Copies `from` (an input: a model folder's file, or an upstream artifact)
/// to `to` (an artifact), saying which side failed.
pub fn copy(from: &Path, to: &Path) -> Result<(), StageError> {
    let mut source = std::fs::File::open(from)
        .map_err(|e| StageError::failed(format!("cannot read `{}`", from.display())).because(e))?;
    let mut dest = std::fs::File::create(to).map_err(|e| io(to, e))?;
    std::io::copy(&mut source, &mut dest).map_err(|e| {
        StageError::failed(format!(
            "cannot copy `{}` to `{}`",
            from.display(),
            to.display()
        ))
        .because(e)
    })?;
    Ok(())
}

/// Writes `value` as pretty JSON: an artifact.
pub fn write_json(path: &Path, value: &serde_json::Value) -> Result<(), StageError> {
    let mut text = serde_json::to_string_pretty(value).expect("json serialises");
    text.push('\n');
    std::fs::write(path, text).map_err(|e| io(path, e))
}

/// The library versions that shape a model stage's artifacts.
pub fn tools() -> BTreeMap<String, String> {
    [
        ("candle".to_string(), CANDLE_VERSION.to_string()),
        ("tokenizers".to_string(), TOKENIZERS_VERSION.to_string()),
    ]
    .into()
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
pub fn tokenizer_config(
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

/// Writes the weights (one file, checkpoint names); returns the stage metrics.
pub fn save_weights(
    model: &model::Model,
    ctx: &StageContext<'_>,
) -> Result<serde_json::Value, StageError> {
    let tensors = model.named_tensors();
    model::save_safetensors(&tensors, &ctx.output("model.safetensors")).map_err(model_error)?;
    let parameters: usize = tensors.values().map(|t| t.elem_count()).sum();
    Ok(serde_json::json!({ "parameters": parameters, "vocab_size": model.vocab_size() }))
}

/// The model a model stage (`base`, `vocab`, `merge`) wrote: its
/// `config.json` and `model.safetensors` artifacts, loaded.
pub fn load_model(ctx: &StageContext<'_>, stage: ModelStage) -> Result<model::Model, StageError> {
    model::load_files(
        stage.file("config.json").path(ctx)?,
        &[stage.file("model.safetensors").path(ctx)?.to_path_buf()],
    )
    .map_err(model_error)
}

/// Loads the model to train from the artifacts of `stage`.
pub fn load_base(
    ctx: &StageContext<'_>,
    stage: ModelStage,
) -> Result<(model::Model, tokenizers::Tokenizer), StageError> {
    let model = load_model(ctx, stage)?;
    let tokenizer = tokenizers::Tokenizer::from_file(stage.file("tokenizer.json").path(ctx)?)
        .map_err(|e| StageError::failed(format!("cannot load the base tokenizer: {e}")))?;
    Ok((model, tokenizer))
}

/// One document of the corpus.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Document {
    Text {
        text: String,
    },
    PromptCompletion {
        prompt: String,
        completion: String,
    },
    /// A conversation, in OpenAI's form, and where it was read
    /// (`file:line`, for messages about it).
    Chat {
        messages: Vec<crate::chat::Message>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        at: Option<String>,
    },
}

impl Document {
    /// The document's texts, each a training sequence for the tokenizer.
    pub fn texts(&self) -> Vec<&str> {
        match self {
            Document::Text { text } => vec![text],
            Document::PromptCompletion { prompt, completion } => vec![prompt, completion],
            Document::Chat { messages, .. } => {
                messages.iter().map(|m| m.content.as_str()).collect()
            }
        }
    }

    /// The conversation it is in a chat build: its messages, or a
    /// prompt/completion record's. Plain text is none.
    pub fn conversation(&self) -> Option<Vec<crate::chat::Message>> {
        match self {
            Document::Text { .. } => None,
            // One user turn and one assistant turn.
            Document::PromptCompletion { prompt, completion } => Some(vec![
                crate::chat::Message::new("user", prompt),
                crate::chat::Message::new("assistant", completion),
            ]),
            Document::Chat { messages, .. } => Some(messages.clone()),
        }
    }

    /// Where it was read, for a conversation.
    pub fn at(&self) -> Option<&str> {
        match self {
            Document::Chat { at, .. } => at.as_deref(),
            _ => None,
        }
    }
}

/// The chat template a build trains with and ships, compiled, with what
/// it renders with and the token that ends an assistant's turn.
pub struct ChatSpec {
    pub source: String,
    pub template: crate::chat::ChatTemplate,
    /// `bos_token`, `eos_token`, ... as the tokenizer config names them.
    pub render: crate::chat::Render,
    pub end_of_turn: String,
    pub end_of_turn_id: u32,
}

impl ChatSpec {
    /// The template `chat` names, for the model of `stage` (its
    /// `tokenizer_config.json` holds the base's template) and its tokenizer.
    pub fn resolve(
        ctx: &StageContext<'_>,
        stage: ModelStage,
        chat: &crate::manifest::Chat,
        tokenizer: &tokenizers::Tokenizer,
    ) -> Result<ChatSpec, StageError> {
        use crate::manifest::ChatTemplateSource;
        let base_config: Option<serde_json::Value> = stage
            .optional_file(ctx, "tokenizer_config.json")
            .map(|p| model::read_json(p).map_err(model_error))
            .transpose()?;
        let source = match &chat.template {
            ChatTemplateSource::Chatml => crate::chat::CHATML.to_string(),
            ChatTemplateSource::File { source, .. } => source.clone(),
            ChatTemplateSource::Base => base_config
                .as_ref()
                .and_then(|c| crate::chat::template_source(&c["chat_template"]))
                .ok_or_else(|| {
                    StageError::bad_input(
                        "`chat.template` = \"base\", but the base model has no chat template \
                        (its tokenizer_config.json has no `chat_template`); set `chat.template = \
                        \"chatml\"` (its tokens `<|im_start|>` and `<|im_end|>` must be in the \
                        tokenizer) or the path of a .jinja file",
                    )
                })?,
        };
        let template = crate::chat::ChatTemplate::new(&source)
            .map_err(|e| StageError::bad_input(format!("`chat.template`: {e}")))?;
        let config = tokenizer_config(
            stage.file("config.json").path(ctx)?,
            stage.file("tokenizer.json").path(ctx)?,
            stage.optional_file(ctx, "tokenizer_config.json"),
        )?;
        let mut render = crate::chat::Render::default();
        for key in ["bos_token", "eos_token", "unk_token", "pad_token"] {
            if let Some(token) = config[key].as_str() {
                render
                    .special_tokens
                    .insert(key.to_string(), token.to_string());
            }
        }
        let special: Vec<String> = tokenizer
            .get_added_tokens_decoder()
            .values()
            .filter(|t| t.special)
            .map(|t| t.content.clone())
            .collect();
        let end_of_turn = template
            .end_of_turn(&render, &special)
            .map_err(|e| StageError::bad_input(format!("`chat.template`: {e}")))?;
        let end_of_turn_id = tokenizer.token_to_id(&end_of_turn).ok_or_else(|| {
            StageError::bad_input(format!(
                "`chat.template` ends turns with `{end_of_turn}`, which is not a token of the tokenizer"
            ))
        })?;
        Ok(ChatSpec {
            source,
            template,
            render,
            end_of_turn,
            end_of_turn_id,
        })
    }
}

/// `texts` encoded one after another (with the tokenizer's special tokens
/// when `add_special`; a rendered conversation has them already), each
/// followed by `eos`, until the stream holds `limit` ids.
pub fn token_stream<'a>(
    texts: impl IntoIterator<Item = std::borrow::Cow<'a, str>>,
    tokenizer: &tokenizers::Tokenizer,
    add_special: bool,
    eos: Option<u32>,
    limit: usize,
) -> Result<Vec<u32>, StageError> {
    let mut stream = Vec::new();
    for text in texts {
        if stream.len() >= limit {
            break;
        }
        let encoding = tokenizer
            .encode(text.as_ref(), add_special)
            .map_err(|e| StageError::failed(format!("cannot tokenize the corpus: {e}")))?;
        stream.extend(encoding.get_ids());
        stream.extend(eos);
    }
    Ok(stream)
}

/// Reads a `train.jsonl` / `eval.jsonl` artifact.
pub fn read_documents(path: &Path) -> Result<Vec<Document>, StageError> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| StageError::failed(format!("cannot read `{}`", path.display())).because(e))?;
    text.lines()
        .map(|line| {
            serde_json::from_str(line).map_err(|e| {
                StageError::failed(format!("corrupt corpus artifact `{}`", path.display()))
                    .because(e)
            })
        })
        .collect()
}

/// transformers.js reads at most this many data chunks per file.
pub const MAX_CHUNKS: usize = 100;

/// Where an ONNX file's initializers go, from `export.external_data`.
pub fn policy(external_data: ExternalData) -> Policy {
    match external_data {
        ExternalData::Auto => Policy::Auto,
        ExternalData::Always => Policy::Always,
    }
}

/// The artifacts of one ONNX file: the file, then every data chunk it may have.
pub fn onnx_artifacts(file: &str) -> Vec<(String, String)> {
    let mut files = vec![(file.to_string(), format!("onnx/{file}"))];
    files.extend(
        (0..MAX_CHUNKS)
            .map(|i| external::data_file_name(file, i))
            .map(|name| (name.clone(), format!("onnx/{name}"))),
    );
    files
}

/// The data chunks written beside an ONNX file, as (name, path).
pub fn data_inputs<'a>(ctx: &'a StageContext<'_>, onnx: Artifact) -> Vec<(String, &'a Path)> {
    (0..MAX_CHUNKS)
        .map_while(|i| {
            let name = external::data_file_name(onnx.file, i);
            ctx.input(onnx.stage, &name).ok().map(|path| (name, path))
        })
        .collect()
}

/// Writes an ONNX file (and its data chunks), refusing more chunks than
/// transformers.js reads.
pub fn write_onnx(
    model: crate::onnx::proto::ModelProto,
    path: &std::path::Path,
    policy: Policy,
) -> Result<Written, StageError> {
    let written = external::write(model, path, policy)
        .map_err(|e| StageError::failed(format!("cannot write `{}`", path.display())).because(e))?;
    if written.data_files.len() > MAX_CHUNKS {
        return Err(StageError::failed(format!(
            "`{}` needs {} external data files; transformers.js reads at most {MAX_CHUNKS}",
            path.display(),
            written.data_files.len()
        )));
    }
    Ok(written)
}

/// Hard-links `from` to `to` where the file system allows, else copies it.
pub fn link_or_copy(from: &std::path::Path, to: &std::path::Path) -> Result<(), StageError> {
    if std::fs::hard_link(from, to).is_err() {
        std::fs::copy(from, to).map_err(|e| {
            StageError::failed(format!("cannot copy `{}`", from.display())).because(e)
        })?;
    }
    Ok(())
}

/// The first of `names` in a folder of the `PATH`.
pub fn on_path(names: &[&str]) -> Option<std::path::PathBuf> {
    let path = std::env::var_os("PATH")?;
    names.iter().find_map(|name| {
        std::env::split_paths(&path)
            .map(|dir| dir.join(name))
            .find(|p| p.is_file())
    })
}

/// Where the `web` stage puts transformers.js in the output folder, and the
/// page finds it.
pub const WEB_FOLDER: &str = "web/";

/// English text, a language every base knows: the vocab stage's fertility
/// report, the reference's prompts without a corpus, the browser's tokenizer check.
pub const ENGLISH_SAMPLE: &str = include_str!("english.txt");

/// The new token ids a `vocab` stage wrote.
pub fn read_new_tokens(path: &std::path::Path) -> Result<Vec<u32>, StageError> {
    let json: HashMap<String, Value> = model::read_json(path).map_err(StageError::failed_from)?;
    Ok(json
        .get("ids")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(|v| v.as_u64().map(|i| i as u32))
        .collect())
}

/// The non-blank lines of documents' texts.
pub fn document_lines(docs: &[Document]) -> Vec<String> {
    docs.iter()
        .flat_map(Document::texts)
        .flat_map(|t| t.lines().map(str::to_string).collect::<Vec<_>>())
        .filter(|l| !l.trim().is_empty())
        .collect()
}

/// The lines a tokenizer check tokenizes where the model runs: the eval
/// split's (at most [`TOKENIZED_LINES`], when the build has a corpus), the
/// English sample, and `prompts`.
pub fn tokenized_lines(
    ctx: &StageContext<'_>,
    corpus: bool,
    prompts: &[String],
) -> Result<Vec<String>, StageError> {
    let mut lines = Vec::new();
    if corpus {
        let eval = read_documents(EVAL.path(ctx)?)?;
        lines.extend(document_lines(&eval).into_iter().take(TOKENIZED_LINES));
    }
    lines.extend(
        ENGLISH_SAMPLE
            .lines()
            .filter(|l| !l.trim().is_empty())
            .map(str::to_string),
    );
    lines.extend(prompts.iter().cloned());
    Ok(lines)
}

/// The most eval lines a tokenizer check tokenizes.
pub const TOKENIZED_LINES: usize = 2000;

/// Where transformers.js's ids differ from symb's: one line per text, the
/// first `shown` of them, and how many lines differ. `posted` is `{"ids":
/// [[...], ...]}` (one list per line, no special tokens added) or
/// `{"error": "..."}`.
pub fn tokenizer_differences(
    tokenizer: &tokenizers::Tokenizer,
    lines: &[String],
    posted: &serde_json::Value,
    shown: usize,
) -> Result<(usize, Vec<String>), StageError> {
    if let Some(error) = posted["error"].as_str() {
        return Err(StageError::failed(format!(
            "transformers.js could not load the tokenizer: {error}"
        )));
    }
    let theirs: Vec<Vec<u32>> = serde_json::from_value(posted["ids"].clone())
        .map_err(|e| StageError::failed("transformers.js's token ids").because(e))?;
    if theirs.len() != lines.len() {
        return Err(StageError::failed(format!(
            "transformers.js tokenized {} of {} lines",
            theirs.len(),
            lines.len()
        )));
    }
    let mut differences = Vec::new();
    for (line, theirs) in lines.iter().zip(&theirs) {
        let ours = tokenizer
            .encode(line.as_str(), false)
            .map_err(|e| StageError::failed(format!("cannot run the tokenizer: {e}")))?;
        if ours.get_ids() != theirs.as_slice() {
            differences.push(format!(
                "    {line:?}: symb {:?}, transformers.js {theirs:?}",
                ours.get_ids()
            ));
        }
    }
    let total = differences.len();
    differences.truncate(shown);
    if total > shown {
        differences.push(format!("    ... and {} more", total - shown));
    }
    Ok((
        total,
        if total == 0 {
            Vec::new()
        } else {
            std::iter::once(format!(
                "  the tokenizer gives other ids in transformers.js than in symb \
            on {total} of {} lines:",
                lines.len()
            ))
            .chain(differences)
            .collect()
        },
    ))
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
