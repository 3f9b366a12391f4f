//! Raw manifest -> validated [`Manifest`]: defaults applied, paths resolved
//! relative to the manifest's folder, cross-field rules checked.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Component, Path, PathBuf};

use serde::Serialize;

use super::error::{ManifestError, Spans, suggest};
use super::raw::*;
use crate::dtype::Dtype;
use crate::engine::ExternalFile;
use crate::model::trainer::{Keep, Schedule};
use crate::verify::Tolerance;

/// Layer names LoRA may target.
/// The LoRA target names `finetune.targets` accepts: every family's layers
/// and groups (the finetune stage checks them against the model's family).
pub fn lora_target_names() -> Vec<&'static str> {
    let mut names: Vec<&'static str> = Vec::new();
    for name in crate::model::Family::ALL
        .iter()
        .flat_map(|f| f.lora_targets())
    {
        if !names.contains(name) {
            names.push(name);
        }
    }
    names
}

/// The stages `[remote] stages` may name: those that read nothing but their
/// settings and upstream artifacts (a worker has no project folder), and run
/// long enough to be worth a job.
pub const REMOTE_STAGES: [&str; 1] = ["finetune"];

/// Alphabet of the byte-level pre-tokenizer.
const BYTE_ALPHABET: u64 = 256;

#[derive(Debug, Clone)]
pub struct Manifest {
    /// The manifest file.
    pub path: PathBuf,
    /// How the manifest is named in messages.
    pub display: String,
    /// The project folder (the manifest's folder), absolute.
    pub dir: PathBuf,
    pub project: Project,
    pub corpus: Option<Corpus>,
    pub tokenizer: Option<Tokenizer>,
    pub base: Option<Base>,
    pub vocab: Option<Vocab>,
    pub finetune: Option<Finetune>,
    pub export: Option<Export>,
    pub verify: Option<Verify>,
    pub web: Web,
    /// `[chat]`: set when the corpus holds conversations, or `[chat]` is given.
    pub chat: Option<Chat>,
    /// `[cache] remote`, before `SYMB_CACHE_REMOTE` (which wins).
    pub cache_remote: Option<CacheRemote>,
    /// `[remote]`: stages run as jobs elsewhere.
    pub remote: Option<Remote>,
}

/// `[remote]`, resolved.
#[derive(Debug, Clone, PartialEq)]
pub struct Remote {
    pub engine: RemoteEngine,
    /// `None`: `SYMB_REMOTE_ADDRESS` must give it.
    pub address: Option<String>,
    pub stages: Vec<String>,
    pub worker_symb: String,
    pub fallback_local: bool,
    /// Stage -> what its job asks for.
    pub resources: BTreeMap<String, Resources>,
}

/// What a dispatched stage's job asks the engine for.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Resources {
    pub num_cpus: Option<f64>,
    pub num_gpus: Option<f64>,
    /// Bytes.
    pub memory: Option<u64>,
}

/// A shared store behind the local cache.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CacheRemote {
    /// `s3://bucket/prefix`.
    pub url: String,
    /// Whether builds upload what they run.
    pub write: bool,
}

/// Where the playground page gets transformers.js by default.
pub const TRANSFORMERS_JS_CDN: &str = crate::verify::transformers_js::CDN;

/// `[web]`, resolved: the playground's defaults.
#[derive(Debug, Clone, PartialEq, Serialize, serde::Deserialize)]
pub struct Web {
    /// The dtype transformers.js loads by default (`None`: symb picks one of the targets).
    pub dtype: Option<Dtype>,
    /// The dtype it loads on WebGPU (`None`: symb picks one of the targets).
    pub webgpu_dtype: Option<Dtype>,
    pub prompt: String,
    pub max_new_tokens: u64,
    /// Where the page imports transformers.js from (unless `symb serve` has a local copy).
    pub transformers_js: TransformersJs,
}

/// Where the playground page gets transformers.js: `web.transformers_js`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TransformersJs {
    /// `"bundle"` (the default): its files in the output folder's `web/`,
    /// so the page works with no network.
    Bundle,
    /// A URL of `transformers.min.js` (the CDN's, or a path on the server).
    Url(String),
}

impl TransformersJs {
    /// The module the page imports.
    pub fn url(&self) -> &str {
        match self {
            TransformersJs::Bundle => "./web/transformers.min.js",
            TransformersJs::Url(url) => url,
        }
    }
}

impl Serialize for TransformersJs {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            TransformersJs::Bundle => s.serialize_str("bundle"),
            TransformersJs::Url(url) => s.serialize_str(url),
        }
    }
}

impl<'de> serde::Deserialize<'de> for TransformersJs {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        Ok(if text == "bundle" {
            TransformersJs::Bundle
        } else {
            TransformersJs::Url(text)
        })
    }
}

#[derive(Debug, Clone)]
pub struct Project {
    pub name: String,
    /// The output folder, absolute, inside the project folder.
    pub output: PathBuf,
    /// The output folder as written, for messages.
    pub output_label: String,
    /// The cache folder, absolute.
    pub cache: PathBuf,
    /// The model card's license and languages.
    pub license: Option<String>,
    pub language: Vec<String>,
}

/// Which fields of a jsonl or csv record make a document (named as the
/// manifest names them).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(untagged)]
pub enum TextFields {
    Text {
        text_field: String,
    },
    PromptCompletion {
        prompt_field: String,
        completion_field: String,
    },
    /// Conversations: a list of `{"role", "content"}` messages.
    Messages {
        messages_field: String,
    },
}

/// `[corpus]`: the corpus stage's settings.
#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct Corpus {
    /// The glob patterns as written (`corpus.files`).
    #[serde(rename = "files")]
    pub patterns: Vec<String>,
    /// The files they matched, sorted, without duplicates: keyed by their
    /// content (the stage's `files()`), not by where they are.
    #[serde(rename = "@files")]
    pub files: Vec<ExternalFile>,
    pub format: CorpusFormat,
    #[serde(flatten)]
    pub fields: TextFields,
    pub eval_fraction: f64,
    /// The labels of the files (among `files`) that are the eval split
    /// (`corpus.eval_files`), instead of a drawn fraction.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub eval_files: Vec<String>,
    pub seed: u64,
}

/// `[chat]`, resolved: present when the corpus holds conversations (or
/// `[chat]` makes prompt/completion records ones).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct Chat {
    pub template: ChatTemplateSource,
    pub train_on: TrainOn,
}

/// Where the chat template comes from: `chat.template`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ChatTemplateSource {
    /// The base model's (`tokenizer_config.json`'s `chat_template`, or its
    /// `chat_template.jinja`); ChatML for a model trained from scratch.
    Base,
    /// ChatML (`<|im_start|>role\n...<|im_end|>`).
    Chatml,
    /// A `.jinja` file's text (keyed by it, not by where it is).
    File {
        #[serde(skip)]
        label: String,
        source: String,
    },
}

#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct Tokenizer {
    pub vocab_size: u64,
    pub min_frequency: u64,
    pub pre_tokenizer: PreTokenizer,
    pub special_tokens: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BaseModel {
    Scratch,
    Hub {
        repo: String,
        revision: Option<String>,
    },
    Path(PathBuf),
    /// A GGUF file (llama.cpp's format), dequantized to float32.
    Gguf(PathBuf),
}

#[derive(Debug, Clone)]
pub struct Base {
    pub model: BaseModel,
    pub architecture: Architecture,
    pub n_layer: u64,
    pub n_head: u64,
    pub n_embd: u64,
    pub n_positions: u64,
    pub seed: u64,
}

#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct Vocab {
    pub strategy: VocabStrategy,
    pub init: VocabInit,
    pub pad_to_multiple_of: u64,
}

#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Finetune {
    pub method: FinetuneMethod,
    pub rank: u64,
    pub alpha: f64,
    pub dropout: f64,
    pub rslora: bool,
    pub targets: Vec<String>,
    pub learning_rate: f64,
    pub weight_decay: f64,
    pub schedule: Schedule,
    pub warmup_steps: u64,
    pub batch_size: u64,
    pub block_size: u64,
    pub epochs: u64,
    pub max_steps: Option<u64>,
    pub gradient_accumulation: u64,
    pub max_grad_norm: f64,
    pub eval_every: u64,
    pub early_stopping_patience: Option<u64>,
    /// With evaluation: the best evaluated step's weights, or the last's.
    pub keep: Keep,
    pub checkpoint_every: u64,
    pub seed: u64,
    /// With LoRA after a `vocab` stage: the new tokens' embedding rows train
    /// too (PEFT's `trainable_token_indices`).
    pub train_new_tokens: bool,
}

#[derive(Debug, Clone)]
pub struct Export {
    pub opset: u64,
    pub targets: Vec<Dtype>,
    pub quantize_embedding: bool,
    /// The head's precision in q4 and q4f16.
    pub head_bits: crate::quant::HeadBits,
    pub external_data: ExternalData,
    /// MatMulNBits' `accuracy_level` in the 4-bit files.
    pub accuracy_level: u64,
    /// What the output folder's `adapter/` holds beside a LoRA adapter.
    pub adapter: AdapterFiles,
    /// What the 4-bit files' blocks are chosen with.
    pub calibration: Calibration,
    /// The 4-bit files hold 8-bit weights where their bounds need them.
    pub mixed: bool,
    /// The 4-bit blocks' layout.
    pub q4_blocks: crate::quant::Layout,
}

/// `export.calibration`: the data the 4-bit quantizers see.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Calibration {
    /// The corpus's train split (the default with a corpus): GPTQ.
    Corpus,
    /// None: each block rounded to nearest (RTN; the default without one).
    None,
}

/// `export.adapter`: whether a LoRA adapter ships with the weights it was
/// trained on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum AdapterFiles {
    /// The adapter alone: its base comes from where the manifest took it.
    #[default]
    Alone,
    /// `adapter/base/` holds the base the adapter was trained on (its
    /// vocabulary grown, the new rows as they started).
    WithBase,
}

impl AdapterFiles {
    const ALL: [AdapterFiles; 2] = [AdapterFiles::Alone, AdapterFiles::WithBase];

    pub fn name(self) -> &'static str {
        match self {
            AdapterFiles::Alone => "alone",
            AdapterFiles::WithBase => "with-base",
        }
    }
}

#[derive(Debug, Clone)]
pub struct Verify {
    pub prompts: RawPrompts,
    pub max_new_tokens: u64,
    /// dtype -> tolerance overrides.
    pub tolerance: BTreeMap<Dtype, Tolerance>,
    /// `[verify.browser]`: the files checked in a browser too.
    pub browser: Option<Browser>,
}

impl Default for Verify {
    /// What a build verifies with when the manifest has no `[verify]`.
    fn default() -> Self {
        Verify {
            prompts: RawPrompts::Count(16),
            max_new_tokens: 32,
            tolerance: BTreeMap::new(),
            browser: None,
        }
    }
}

/// A browser device transformers.js runs a model on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Device {
    Webgpu,
    Wasm,
}

impl Device {
    pub fn name(self) -> &'static str {
        match self {
            Device::Webgpu => "webgpu",
            Device::Wasm => "wasm",
        }
    }
    /// As people call it.
    pub fn title(self) -> &'static str {
        match self {
            Device::Webgpu => "WebGPU",
            Device::Wasm => "WebAssembly",
        }
    }
}

/// The WebGPU adapter Chromium gives the page.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Adapter {
    /// The machine's GPU.
    Gpu,
    /// SwiftShader: WebGPU in software, on any machine (slow: small models).
    Swiftshader,
}

/// `[verify.browser]`, resolved.
#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct Browser {
    pub devices: Vec<Device>,
    pub adapter: Adapter,
    /// How many of verify's prompts (the first ones).
    pub prompts: usize,
    /// The Chromium binary (`None`: `$CHROMIUM`, else one on the PATH):
    /// keyed by its version (the stage's tools), not its path.
    #[serde(rename = "@chromium")]
    pub chromium: Option<PathBuf>,
    /// A `node_modules` folder with transformers.js and onnxruntime-web
    /// (`None`: `web.transformers_js`, a URL): keyed by the library's
    /// version (the stage's tools), not its path.
    #[serde(rename = "@transformers_js")]
    pub transformers_js: Option<PathBuf>,
    /// How long the check may take: not what it finds.
    #[serde(rename = "@timeout")]
    pub timeout: std::time::Duration,
}

/// Builds errors pointing into one manifest.
struct Ctx<'a> {
    display: &'a str,
    source: &'a str,
    spans: &'a Spans<'a>,
}

impl Ctx<'_> {
    /// An error at the value of `path` (or its key, or its table).
    fn at(&self, path: &[&str], message: impl Into<String>) -> ManifestError {
        let span = self.spans.value(path).or_else(|| self.spans.key(path));
        ManifestError::at(self.display, self.source, span, message)
    }
}

pub(super) fn resolve(
    path: &Path,
    display: &str,
    source: &str,
    spans: &Spans<'_>,
    raw: RawManifest,
) -> Result<Manifest, ManifestError> {
    let cx = Ctx {
        display,
        source,
        spans,
    };
    let dir = absolute(
        path.parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new(".")),
    )
    .map_err(|e| {
        ManifestError::general(display, format!("cannot resolve the project folder: {e}"))
    })?;
    let project = resolve_project(&cx, &dir, raw.project.unwrap_or_default())?;
    let corpus = raw
        .corpus
        .map(|c| resolve_corpus(&cx, &dir, c))
        .transpose()?;
    let mut tokenizer = raw
        .tokenizer
        .map(|t| resolve_tokenizer(&cx, t))
        .transpose()?;

    if tokenizer.is_some() && corpus.is_none() {
        return Err(cx.at(
            &["tokenizer"],
            "`[tokenizer]` needs a `[corpus]` section to train on",
        ));
    }
    let base = raw.base.map(|b| resolve_base(&cx, &dir, b)).transpose()?;
    let mut chat = resolve_chat(&cx, &dir, raw.chat, corpus.as_ref())?;
    // A model trained from scratch has no template of its own: ChatML, whose
    // two tokens its tokenizer gets.
    if let Some(chat) = &mut chat
        && base.as_ref().is_some_and(|b| b.model == BaseModel::Scratch)
    {
        if chat.template == ChatTemplateSource::Base {
            chat.template = ChatTemplateSource::Chatml;
        }
        if let Some(tokenizer) = &mut tokenizer
            && chat.template == ChatTemplateSource::Chatml
        {
            for token in crate::chat::CHATML_TOKENS {
                if !tokenizer.special_tokens.iter().any(|t| t == token) {
                    tokenizer.special_tokens.push(token.to_string());
                }
            }
        }
    }
    let vocab = raw.vocab.map(|v| resolve_vocab(&cx, v)).transpose()?;
    let finetune = raw
        .finetune
        .map(|f| resolve_finetune(&cx, f, base.as_ref()))
        .transpose()?;
    let export = raw
        .export
        .map(|e| resolve_export(&cx, e, finetune.as_ref(), corpus.is_some(), base.as_ref()))
        .transpose()?;
    let verify = raw
        .verify
        .map(|v| resolve_verify(&cx, &dir, v))
        .transpose()?;
    let web = resolve_web(&cx, raw.web.unwrap_or_default(), export.as_ref())?;
    let cache_remote = match raw.cache.unwrap_or_default() {
        RawCache {
            remote: Some(url),
            remote_write,
        } => {
            if !url.starts_with("s3://") || url.len() <= "s3://".len() {
                return Err(cx.at(
                    &["cache", "remote"],
                    format!("`cache.remote` = \"{url}\" is not an s3://bucket/prefix URL"),
                ));
            }
            Some(CacheRemote {
                url,
                write: remote_write.unwrap_or(true),
            })
        }
        RawCache {
            remote: None,
            remote_write: Some(_),
        } => {
            return Err(cx.at(
                &["cache", "remote_write"],
                "`cache.remote_write` is set but `cache.remote` is not",
            ));
        }
        RawCache {
            remote: None,
            remote_write: None,
        } => None,
    };
    let remote = raw
        .remote
        .map(|r| resolve_remote(&cx, r, finetune.as_ref()))
        .transpose()?;
    check_folders(&cx, path, &dir, &project, corpus.as_ref(), base.as_ref())?;
    let manifest = Manifest {
        path: path.to_path_buf(),
        display: display.to_string(),
        dir,
        project,
        corpus,
        tokenizer,
        base,
        vocab,
        finetune,
        export,
        verify,
        web,
        chat,
        cache_remote,
        remote,
    };
    check_sections(&cx, &manifest)?;
    Ok(manifest)
}

/// The rules between sections: what each stage needs from the others.
fn check_sections(cx: &Ctx<'_>, m: &Manifest) -> Result<(), ManifestError> {
    let vocab = m
        .vocab
        .as_ref()
        .filter(|v| v.strategy != VocabStrategy::None);
    let finetune = m
        .finetune
        .as_ref()
        .filter(|f| f.method != FinetuneMethod::None);
    if let Some(base) = &m.base {
        let pretrained = base.model != BaseModel::Scratch;
        match (pretrained, m.tokenizer.is_some(), vocab.is_some()) {
            (false, false, _) => {
                return Err(cx.at(
                    &["base", "model"],
                    "`base.model` = \"scratch\" \
                needs a `[tokenizer]` section: a new model takes the tokenizer trained for it",
                ));
            }
            (false, true, true) => {
                return Err(cx.at(
                    &["vocab"],
                    "`[vocab]` adds tokens to a \
                pretrained base, but `base.model` = \"scratch\" is built with the trained \
                tokenizer already; remove `[vocab]` or set `vocab.strategy = \"none\"`",
                ));
            }
            (true, true, false) => {
                return Err(cx.at(
                    &["tokenizer"],
                    "a `[tokenizer]` with a \
                pretrained base needs a `[vocab]` section (`strategy = \"add_tokens\"` or \
                `\"extend_bpe\"`) to add its tokens to the base's tokenizer; or comment \
                `[tokenizer]` out to fine-tune with the base's own tokenizer",
                ));
            }
            (true, false, true) => {
                return Err(cx.at(
                    &["vocab"],
                    "`[vocab]` adds the tokens of a \
                trained tokenizer to the base's: add a `[tokenizer]` section to train one",
                ));
            }
            _ => {}
        }
        if vocab.is_some() && m.corpus.is_none() {
            return Err(cx.at(
                &["vocab"],
                "`[vocab]` needs a `[corpus]`: its report measures the \
                new tokens on the eval split",
            ));
        }
    } else if vocab.is_some() {
        return Err(cx.at(
            &["vocab"],
            "`[vocab]` needs a `[base]` model whose tokenizer it extends",
        ));
    }
    if finetune.is_some() && (m.corpus.is_none() || m.base.is_none()) {
        return Err(cx.at(
            &["finetune"],
            "`[finetune]` needs a `[corpus]` to train on and a `[base]` model to train",
        ));
    }
    match &m.export {
        Some(_) if m.base.is_none() => {
            return Err(cx.at(
                &["export"],
                "`[export]` converts a model: add a `[base]` section",
            ));
        }
        Some(export) => {
            let tolerance = m.verify.as_ref().map(|v| &v.tolerance);
            if let Some(dtype) = tolerance
                .into_iter()
                .flat_map(|t| t.keys())
                .find(|d| !export.targets.contains(d))
            {
                return Err(cx.at(&["verify", "tolerance", dtype.name()], format!("`[verify.tolerance.{dtype}]` sets bounds for `{dtype}`, which `export.targets` does not build")));
            }
        }
        None if m.verify.is_some() => return Err(cx.at(
            &["verify"],
            "`[verify]` checks the ONNX files that `[export]` writes: add an `[export]` section",
        )),
        None => {}
    }
    if m.corpus.is_none() && m.tokenizer.is_none() && m.base.is_none() {
        return Err(ManifestError::general(
            cx.display,
            "the manifest asks for nothing to build: add a `[corpus]` and a `[tokenizer]` section",
        ));
    }
    Ok(())
}

fn resolve_remote(
    cx: &Ctx<'_>,
    raw: RawRemote,
    finetune: Option<&Finetune>,
) -> Result<Remote, ManifestError> {
    if let Some(address) = &raw.address
        && !(address.starts_with("http://") || address.starts_with("https://"))
    {
        return Err(cx.at(
            &["remote", "address"],
            format!(
                "`remote.address` = \"{address}\" is not \
            an http:// or https:// URL (Ray's dashboard address, such as \"http://head:8265\")"
            ),
        ));
    }
    if let Some(address) = &raw.address
        && has_user_info(address)
    {
        return Err(cx.at(
            &["remote", "address"],
            "`remote.address` holds a user name or password: \
            symb prints the address in its messages, so keep credentials out of it",
        ));
    }
    if raw.stages.is_empty() {
        return Err(cx.at(
            &["remote", "stages"],
            format!(
                "`remote.stages` is empty: name the stages to run remotely ({})",
                quoted(&REMOTE_STAGES)
            ),
        ));
    }
    for stage in &raw.stages {
        if !REMOTE_STAGES.contains(&stage.as_str()) {
            let hint = suggest(stage, REMOTE_STAGES.iter().copied())
                .map(|b| format!(", did you mean `{b}`?"))
                .unwrap_or_default();
            return Err(cx.at(
                &["remote", "stages"],
                format!(
                    "`remote.stages`: `{stage}` cannot run \
                remotely{hint}; the stages that can are {}",
                    quoted(&REMOTE_STAGES)
                ),
            ));
        }
        if stage == "finetune" && finetune.is_none_or(|f| f.method == FinetuneMethod::None) {
            return Err(cx.at(
                &["remote", "stages"],
                "`remote.stages` names `finetune`, but this \
                manifest trains nothing: add a `[finetune]` section or remove it from \
                `remote.stages`",
            ));
        }
    }
    let mut resources = BTreeMap::new();
    for (stage, r) in raw.resources.unwrap_or_default() {
        if !raw.stages.contains(&stage) {
            return Err(cx.at(
                &["remote", "resources", &stage],
                format!("`[remote.resources.{stage}]`: `{stage}` is not in `remote.stages`"),
            ));
        }
        for (key, value) in [("num_cpus", r.num_cpus), ("num_gpus", r.num_gpus)] {
            if let Some(v) = value
                && !(v >= 0.0 && v.is_finite())
            {
                return Err(cx.at(
                    &["remote", "resources", &stage, key],
                    format!("`remote.resources.{stage}.{key}` = {v} must be 0 or more"),
                ));
            }
        }
        let memory = match r.memory {
            None => None,
            Some(RawSize::Bytes(b)) => Some(b),
            Some(RawSize::Text(text)) => Some(parse_size(&text).ok_or_else(|| {
                cx.at(&["remote", "resources", &stage, "memory"], format!("`remote.resources.{stage}.memory` = \"{text}\" is not a size: write bytes, or a number with KB, MB, GB, KiB, MiB or GiB"))
            })?),
        };
        resources.insert(
            stage,
            Resources {
                num_cpus: r.num_cpus,
                num_gpus: r.num_gpus,
                memory,
            },
        );
    }
    let worker_symb = raw.worker_symb.unwrap_or_else(|| "symb".to_string());
    if worker_symb.trim().is_empty() {
        return Err(cx.at(
            &["remote", "worker_symb"],
            "`remote.worker_symb` is empty: the symb \
            command on the workers (default \"symb\", found on their PATH)",
        ));
    }
    Ok(Remote {
        engine: raw.engine,
        address: raw.address,
        stages: raw.stages,
        worker_symb,
        fallback_local: raw.fallback == Some(RemoteFallback::Local),
        resources,
    })
}

/// Whether a URL carries `user[:password]@` before its host.
pub fn has_user_info(url: &str) -> bool {
    let rest = url.split_once("://").map_or(url, |(_, rest)| rest);
    rest.split(['/', '?', '#'])
        .next()
        .is_some_and(|authority| authority.contains('@'))
}

fn quoted(names: &[&str]) -> String {
    names
        .iter()
        .map(|n| format!("`{n}`"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// "16GiB", "512 MB", "2e9": bytes.
fn parse_size(text: &str) -> Option<u64> {
    let text = text.trim();
    let split = text
        .find(|c: char| c.is_ascii_alphabetic())
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let number: f64 = number.trim().parse().ok()?;
    let scale: f64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1.0,
        "kb" | "k" => 1e3,
        "mb" | "m" => 1e6,
        "gb" | "g" => 1e9,
        "tb" | "t" => 1e12,
        "kib" => 1024.0,
        "mib" => 1024.0 * 1024.0,
        "gib" => 1024.0 * 1024.0 * 1024.0,
        "tib" => 1024.0f64.powi(4),
        _ => return None,
    };
    let bytes = number * scale;
    (bytes >= 0.0 && bytes.is_finite()).then_some(bytes.round() as u64)
}

fn resolve_project(cx: &Ctx<'_>, dir: &Path, raw: RawProject) -> Result<Project, ManifestError> {
    let name = raw.name.clone().unwrap_or_else(|| {
        dir.file_name()
            .and_then(|n| n.to_str())
            .unwrap_or("symb")
            .to_string()
    });
    let output_label = raw.output.clone().unwrap_or_else(|| "dist".to_string());
    let output = normalize(&dir.join(&output_label));
    if !output.starts_with(dir) || output == dir {
        return Err(cx.at(
            &["project", "output"],
            format!(
                "`project.output` = \"{output_label}\" is outside the project folder; symb \
                replaces this folder on every build, so it must be a folder inside \
                `{}`",
                dir.display()
            ),
        ));
    }
    let cache = normalize(&dir.join(raw.cache.clone().unwrap_or_else(|| "cache".to_string())));
    if cache.starts_with(&output) || output.starts_with(&cache) {
        return Err(cx.at(
            &["project", "cache"],
            "`project.cache` and `project.output` must be separate folders",
        ));
    }
    if let Some(license) = &raw.license
        && (license.is_empty()
            || !license
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '+')))
    {
        return Err(cx.at(
            &["project", "license"],
            format!(
                "`project.license` = {license:?} is not a \
                license id (as the Hugging Face Hub lists them: \"apache-2.0\", \"mit\", \
                \"cc-by-4.0\", \"other\")"
            ),
        ));
    }
    let language = raw.language.unwrap_or_default();
    if let Some(bad) = language
        .iter()
        .find(|l| l.is_empty() || !l.chars().all(|c| c.is_ascii_alphanumeric() || c == '-'))
    {
        return Err(cx.at(
            &["project", "language"],
            format!(
                "`project.language`: {bad:?} is not a \
            language code (\"en\", \"fr\", or a private-use one such as \"x-symbiotic\")"
            ),
        ));
    }
    Ok(Project {
        name,
        output,
        output_label,
        cache,
        license: raw.license,
        language,
    })
}

/// The output and cache folders, checked on the real filesystem (symlinks
/// resolved): the output stays inside the project; neither holds, nor is held
/// by, an input of the build (the manifest, corpus files, a base model
/// folder) or the other; and each is symb's to write: absent, empty, or made
/// by symb (the output's marker, the cache's `CACHEDIR.TAG`). The cache may
/// live outside the project (one cache shared by several projects).
fn check_folders(
    cx: &Ctx<'_>,
    manifest: &Path,
    dir: &Path,
    project: &Project,
    corpus: Option<&Corpus>,
    base: Option<&Base>,
) -> Result<(), ManifestError> {
    let label = &project.output_label;
    let real_dir = real_path(dir);
    let output = real_path(&project.output);
    if !output.starts_with(&real_dir) || output == real_dir {
        return Err(cx.at(
            &["project", "output"],
            format!(
                "`project.output` = \"{label}\" leads outside the project folder, to `{}`, through \
                    a symlink; symb replaces this folder on every build, so it must be a folder \
                    inside `{}`",
                output.display(),
                real_dir.display()
            ),
        ));
    }
    let cache = real_path(&project.cache);
    if cache.starts_with(&output) || output.starts_with(&cache) {
        return Err(cx.at(
            &["project", "cache"],
            "`project.cache` and `project.output` must be \
            separate folders (after following symlinks)",
        ));
    }
    let mut inputs: Vec<(String, PathBuf)> = vec![(
        format!("the manifest `{}`", cx.display),
        real_path(manifest),
    )];
    if let Some(corpus) = corpus {
        inputs.extend(
            corpus
                .files
                .iter()
                .map(|f| (format!("the corpus file `{}`", f.label), real_path(&f.path))),
        );
    }
    if let Some(Base {
        model: BaseModel::Path(folder),
        ..
    }) = base
    {
        inputs.push((
            format!("the base model folder `{}`", folder.display()),
            real_path(folder),
        ));
        // Its files may be links elsewhere (a Hub snapshot links into `blobs/`).
        for entry in std::fs::read_dir(folder).into_iter().flatten().flatten() {
            inputs.push((
                format!("the base model file `{}`", entry.path().display()),
                real_path(&entry.path()),
            ));
        }
    }
    if let Some(Base {
        model: BaseModel::Gguf(file),
        ..
    }) = base
    {
        inputs.push((
            format!("the base model file `{}`", file.display()),
            real_path(file),
        ));
    }
    for (what, input) in &inputs {
        if input.starts_with(&output) || output.starts_with(input) {
            return Err(cx.at(
                &["project", "output"],
                format!(
                    "`project.output` = \"{label}\" \
                overlaps {what}; symb replaces its output folder on every build, so it must be a \
                folder of its own"
                ),
            ));
        }
        if input.starts_with(&cache) || cache.starts_with(input) {
            return Err(cx.at(
                &["project", "cache"],
                format!("`project.cache` overlaps {what}; the cache must be a folder of its own"),
            ));
        }
    }
    if let Err(refusal) = crate::engine::inspect_output(&project.output) {
        let hint = match refusal {
            crate::engine::OutputRefusal::NotOurs { .. } => {
                "; choose another folder, or move its contents away yourself"
            }
            _ => "",
        };
        return Err(cx.at(
            &["project", "output"],
            format!("`project.output` = \"{label}\": {refusal}{hint}"),
        ));
    }
    // A path the filesystem refuses (a name too long, a file where a folder
    // goes) is the manifest's, as it is for the output.
    match std::fs::metadata(&project.cache) {
        Ok(meta) if !meta.is_dir() => {
            return Err(cx.at(
                &["project", "cache"],
                format!(
                    "`project.cache` = `{}` is a file, not a folder",
                    project.cache.display()
                ),
            ));
        }
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            return Err(cx.at(
                &["project", "cache"],
                format!("`project.cache` cannot be used: {e}"),
            ));
        }
        _ => {}
    }
    // A folder kept in git by a `.gitignore` alone counts as empty.
    if !crate::engine::entries_besides_placeholders(&project.cache).is_empty()
        && !crate::cache::Cache::is_cache(&project.cache)
    {
        return Err(cx.at(
            &["project", "cache"],
            format!(
                "`project.cache` = `{}` holds files and is not a symb cache (it has no \
                `CACHEDIR.TAG`); symb writes and deletes in its cache, so it will not use this \
                folder: choose a new or empty one",
                project.cache.display()
            ),
        ));
    }
    Ok(())
}

/// `path` with symlinks resolved: the deepest part that exists is
/// canonicalized and the rest appended.
fn real_path(path: &Path) -> PathBuf {
    let mut existing = path.to_path_buf();
    let mut rest = Vec::new();
    loop {
        if let Ok(real) = existing.canonicalize() {
            return rest
                .iter()
                .rev()
                .fold(real, |acc: PathBuf, part| acc.join(part));
        }
        match (
            existing.file_name().map(|n| n.to_os_string()),
            existing.parent(),
        ) {
            (Some(name), Some(parent)) => {
                rest.push(name);
                existing = parent.to_path_buf();
            }
            _ => return path.to_path_buf(),
        }
    }
}

/// The files `pattern` (relative to `dir`) matches, sorted. `*` and `?`
/// stay within a path component, `**` crosses folders. The walk starts at
/// the pattern's literal folder (followed if it is a symlink) and does not
/// enter symlinked folders below it, so a link loop (`self -> .`) cannot
/// make it run away; symlinks to files are matched like files.
fn glob_files(dir: &Path, pattern: &str) -> Result<Vec<PathBuf>, String> {
    let full = dir.join(pattern);
    let full_text = full
        .to_str()
        .ok_or_else(|| format!("corpus pattern `{pattern}` is not valid UTF-8"))?;
    let compiled = glob::Pattern::new(full_text)
        .map_err(|e| format!("`{pattern}` in `corpus.files` is not a valid glob: {e}"))?;
    let is_literal = |part: &std::ffi::OsStr| !part.to_string_lossy().contains(['*', '?', '[']);
    let parts: Vec<_> = Path::new(pattern).components().collect();
    let literal = parts
        .iter()
        .take_while(|c| is_literal(c.as_os_str()))
        .count();
    let base = parts[..literal]
        .iter()
        .fold(dir.to_path_buf(), |acc, c| acc.join(c));
    if literal == parts.len() {
        return Ok(if base.is_file() {
            vec![base]
        } else {
            Vec::new()
        });
    }
    let depth = if parts[literal..].iter().any(|c| c.as_os_str() == "**") {
        usize::MAX
    } else {
        parts.len() - literal
    };
    let options = glob::MatchOptions {
        case_sensitive: true,
        require_literal_separator: true,
        require_literal_leading_dot: false,
    };
    let mut found = Vec::new();
    for entry in walkdir::WalkDir::new(&base)
        .follow_links(false)
        .min_depth(1)
        .max_depth(depth)
    {
        let entry = match entry {
            Ok(entry) => entry,
            Err(e)
                if e.io_error()
                    .is_some_and(|io| io.kind() == std::io::ErrorKind::NotFound)
                    && e.depth() == 0 =>
            {
                return Ok(Vec::new());
            }
            Err(e) => {
                return Err(format!(
                    "cannot read `{}` (under `{pattern}`): {e}",
                    e.path().unwrap_or(&base).display()
                ));
            }
        };
        let is_file =
            entry.file_type().is_file() || (entry.path_is_symlink() && entry.path().is_file());
        if is_file && compiled.matches_path_with(entry.path(), options) {
            found.push(entry.into_path());
        }
    }
    found.sort();
    Ok(found)
}

/// The files `patterns` (the value of `[corpus] key`) match in `dir`,
/// each once, as external files labelled by their path in the project.
fn resolve_files(
    cx: &Ctx<'_>,
    dir: &Path,
    key: &str,
    patterns: &[String],
) -> Result<Vec<ExternalFile>, ManifestError> {
    let mut seen = BTreeSet::new();
    let mut seen_real = BTreeSet::new();
    let mut files = Vec::new();
    for pattern in patterns {
        let matches = glob_files(dir, pattern).map_err(|e| cx.at(&["corpus", key], e))?;
        let mut matched = 0;
        for path in matches {
            let path = normalize(&path);
            let Ok(relative) = path.strip_prefix(dir) else {
                return Err(cx.at(
                    &["corpus", key],
                    format!(
                        "`{pattern}` in `corpus.{key}` matches `{}`, outside the project \
                        folder; copy the corpus into the project so builds are \
                        reproducible",
                        path.display()
                    ),
                ));
            };
            matched += 1;
            let label = relative
                .components()
                .map(|c| c.as_os_str().to_string_lossy())
                .collect::<Vec<_>>()
                .join("/");
            // One file reached by two names (a symlink) is read once.
            let real = path.canonicalize().unwrap_or_else(|_| path.clone());
            if seen.insert(label.clone()) && seen_real.insert(real) {
                files.push(ExternalFile { label, path });
            }
        }
        if matched == 0 {
            return Err(cx.at(
                &["corpus", key],
                format!(
                    "`{pattern}` in `corpus.{key}` matches no file (relative to `{}`)",
                    dir.display()
                ),
            ));
        }
    }
    Ok(files)
}

/// Whether the first record of a JSONL file holds a `messages` list (a
/// file of conversations, in OpenAI's form).
fn holds_conversations(file: &ExternalFile) -> bool {
    if !(file.label.ends_with(".jsonl") || file.label.ends_with(".ndjson")) {
        return false;
    }
    let Ok(text) = std::fs::read_to_string(&file.path) else {
        return false;
    };
    let Some(first) = text.lines().find(|l| !l.trim().is_empty()) else {
        return false;
    };
    serde_json::from_str::<serde_json::Value>(first.trim_start_matches('\u{feff}'))
        .is_ok_and(|v| v.get("text").is_none() && v.get("messages").is_some_and(|m| m.is_array()))
}

fn resolve_corpus(cx: &Ctx<'_>, dir: &Path, raw: RawCorpus) -> Result<Corpus, ManifestError> {
    let patterns = raw.files.ok_or_else(|| {
        cx.at(
            &["corpus"],
            "missing key `files` in `[corpus]`: \
        list the corpus files, e.g. `files = [\"corpus/*.txt\"]`",
        )
    })?;
    if patterns.is_empty() {
        return Err(cx.at(
            &["corpus", "files"],
            "`corpus.files` is empty: list at least one file or glob, e.g. \"corpus/*.txt\"",
        ));
    }
    let mut files = resolve_files(cx, dir, "files", &patterns)?;
    let mut eval_files = Vec::new();
    if let Some(eval_patterns) = &raw.eval_files {
        if raw.eval_fraction.is_some() {
            return Err(cx.at(
                &["corpus", "eval_files"],
                "set either `corpus.eval_files` (a held-out set) or `corpus.eval_fraction` (a \
                share drawn from `corpus.files`), not both",
            ));
        }
        if eval_patterns.is_empty() {
            return Err(cx.at(
                &["corpus", "eval_files"],
                "`corpus.eval_files` is empty: list the held-out files, or remove the key to \
                draw `corpus.eval_fraction` of the corpus",
            ));
        }
        for file in resolve_files(cx, dir, "eval_files", eval_patterns)? {
            if files.iter().any(|f| f.label == file.label) {
                return Err(cx.at(
                    &["corpus", "eval_files"],
                    format!(
                        "`{}` is in both `corpus.files` and `corpus.eval_files`: a held-out \
                        file cannot also train",
                        file.label
                    ),
                ));
            }
            eval_files.push(file.label.clone());
            files.push(file);
        }
    }
    files.sort_by(|a, b| a.label.cmp(&b.label));
    let mut format = raw.format.unwrap_or(CorpusFormat::Auto);
    let explicit_fields =
        raw.text_field.is_some() || raw.prompt_field.is_some() || raw.completion_field.is_some();
    if raw.messages_field.is_some() && explicit_fields {
        return Err(cx.at(
            &["corpus", "messages_field"],
            "set `corpus.messages_field` (conversations) or `corpus.text_field` / \
            `corpus.prompt_field` + `corpus.completion_field`, not both",
        ));
    }
    if format == CorpusFormat::Auto
        && !explicit_fields
        && (raw.messages_field.is_some() || files.iter().any(holds_conversations))
    {
        format = CorpusFormat::Chat;
    }
    if raw.messages_field.is_some() && !matches!(format, CorpusFormat::Chat) {
        return Err(cx.at(
            &["corpus", "messages_field"],
            "`corpus.messages_field` names the conversations of `format = \"chat\"` records; \
            this corpus is not chat",
        ));
    }
    let fields = match (raw.text_field, raw.prompt_field, raw.completion_field) {
        _ if format == CorpusFormat::Chat => {
            if explicit_fields {
                return Err(cx.at(
                    &["corpus", "format"],
                    "`corpus.format = \"chat\"` reads `messages` records; set \
                    `corpus.messages_field` to name another field, not `text_field` or \
                    `prompt_field`",
                ));
            }
            TextFields::Messages {
                messages_field: raw.messages_field.unwrap_or_else(|| "messages".to_string()),
            }
        }
        (Some(_), Some(_), _) | (Some(_), _, Some(_)) => {
            return Err(cx.at(
                &["corpus", "text_field"],
                "set either `corpus.text_field` or \
                `corpus.prompt_field` + `corpus.completion_field`, not both",
            ));
        }
        (_, Some(prompt), Some(completion)) => TextFields::PromptCompletion {
            prompt_field: prompt,
            completion_field: completion,
        },
        (_, Some(_), None) => {
            return Err(cx.at(
                &["corpus", "prompt_field"],
                "`corpus.prompt_field` needs `corpus.completion_field` too",
            ));
        }
        (_, None, Some(_)) => {
            return Err(cx.at(
                &["corpus", "completion_field"],
                "`corpus.completion_field` needs `corpus.prompt_field` too",
            ));
        }
        (text, None, None) => TextFields::Text {
            text_field: text.unwrap_or_else(|| "text".to_string()),
        },
    };
    let eval_fraction = if raw.eval_files.is_some() {
        0.0
    } else {
        raw.eval_fraction.unwrap_or(0.05)
    };
    if !(0.0..1.0).contains(&eval_fraction) {
        return Err(cx.at(
            &["corpus", "eval_fraction"],
            format!(
                "`corpus.eval_fraction` = \
            {eval_fraction} is out of range: use a fraction from 0 (no eval split) up to, but not \
            including, 1"
            ),
        ));
    }
    Ok(Corpus {
        patterns,
        files,
        format,
        fields,
        eval_fraction,
        eval_files,
        seed: raw.seed.unwrap_or(0),
    })
}

/// `[chat]`: on with conversations in the corpus (its defaults) or with the
/// section (which makes prompt/completion records conversations).
fn resolve_chat(
    cx: &Ctx<'_>,
    dir: &Path,
    raw: Option<RawChat>,
    corpus: Option<&Corpus>,
) -> Result<Option<Chat>, ManifestError> {
    let conversations = corpus.is_some_and(|c| c.format == CorpusFormat::Chat);
    let Some(raw) = raw else {
        return Ok(conversations.then_some(Chat {
            template: ChatTemplateSource::Base,
            train_on: TrainOn::Assistant,
        }));
    };
    match corpus.map(|c| &c.fields) {
        None => return Err(cx.at(&["chat"], "`[chat]` needs a `[corpus]` of conversations")),
        Some(TextFields::Text { .. }) => {
            return Err(cx.at(
                &["chat"],
                "`[chat]` needs conversations (`corpus.format = \"chat\"`, records of \
                `messages`) or prompt/completion records (`corpus.prompt_field` + \
                `corpus.completion_field`); this corpus is plain text",
            ));
        }
        Some(_) => {}
    }
    let template = match raw.template.as_deref() {
        None | Some("base") => ChatTemplateSource::Base,
        Some("chatml") => ChatTemplateSource::Chatml,
        Some(path) => {
            let full = dir.join(path);
            let source = std::fs::read_to_string(&full).map_err(|e| {
                cx.at(
                    &["chat", "template"],
                    format!(
                        "`chat.template` = \"{path}\": cannot read `{}` ({e}); use \"base\" \
                        (the base model's template), \"chatml\", or the path of a .jinja file",
                        full.display()
                    ),
                )
            })?;
            if let Err(e) = crate::chat::ChatTemplate::new(&source) {
                let detail = match &e {
                    crate::chat::ChatError::Syntax { line, message } => {
                        format!("`{path}`:{line}: {message}")
                    }
                    other => format!("`{path}`: {other}"),
                };
                return Err(cx.at(
                    &["chat", "template"],
                    format!("`chat.template`: the template does not parse: {detail}"),
                ));
            }
            ChatTemplateSource::File {
                label: path.to_string(),
                source,
            }
        }
    };
    Ok(Some(Chat {
        template,
        train_on: raw.train_on.unwrap_or(TrainOn::Assistant),
    }))
}

fn resolve_tokenizer(cx: &Ctx<'_>, raw: RawTokenizer) -> Result<Tokenizer, ManifestError> {
    let special_tokens = raw
        .special_tokens
        .unwrap_or_else(|| vec!["<|endoftext|>".to_string(), "<pad>".to_string()]);
    let mut seen = BTreeSet::new();
    for token in &special_tokens {
        if token.is_empty() {
            return Err(cx.at(
                &["tokenizer", "special_tokens"],
                "`tokenizer.special_tokens` contains an empty string",
            ));
        }
        if !seen.insert(token) {
            return Err(cx.at(
                &["tokenizer", "special_tokens"],
                format!("`tokenizer.special_tokens` lists `{token}` twice"),
            ));
        }
    }
    let pre_tokenizer = raw.pre_tokenizer.unwrap_or(PreTokenizer::ByteLevel);
    let vocab_size = raw.vocab_size.unwrap_or(8000);
    let floor = match pre_tokenizer {
        PreTokenizer::ByteLevel => BYTE_ALPHABET + special_tokens.len() as u64 + 1,
        PreTokenizer::Whitespace | PreTokenizer::Metaspace => special_tokens.len() as u64 + 2,
    };
    if vocab_size < floor {
        let why = match pre_tokenizer {
            PreTokenizer::ByteLevel => format!(
                "the byte alphabet (256) plus {} special tokens leave no room for a merge",
                special_tokens.len()
            ),
            _ => format!(
                "{} special tokens leave no room for the alphabet",
                special_tokens.len()
            ),
        };
        return Err(cx.at(
            &["tokenizer", "vocab_size"],
            format!(
                "`tokenizer.vocab_size` = {vocab_size} is too small: {why}; use at least {floor}"
            ),
        ));
    }
    if vocab_size > u32::MAX as u64 {
        return Err(cx.at(
            &["tokenizer", "vocab_size"],
            format!("`tokenizer.vocab_size` = {vocab_size} is too large"),
        ));
    }
    Ok(Tokenizer {
        vocab_size,
        min_frequency: raw.min_frequency.unwrap_or(2),
        pre_tokenizer,
        special_tokens,
    })
}

fn resolve_base(cx: &Ctx<'_>, dir: &Path, raw: RawBase) -> Result<Base, ManifestError> {
    let spec = raw.model.unwrap_or_else(|| "scratch".to_string());
    let model = if spec == "scratch" {
        BaseModel::Scratch
    } else if let Some(hub) = spec.strip_prefix("hf:") {
        let (repo, revision) = match hub.split_once('@') {
            Some((repo, revision)) => (repo, Some(revision.to_string())),
            None => (hub, None),
        };
        let parts: Vec<&str> = repo.split('/').collect();
        if parts.len() != 2 || parts.iter().any(|p| p.is_empty()) || revision.as_deref() == Some("")
        {
            return Err(cx.at(
                &["base", "model"],
                format!(
                    "`base.model` = \"{spec}\": a Hub model \
                is written \"hf:owner/name\" or \"hf:owner/name@revision\""
                ),
            ));
        }
        BaseModel::Hub {
            repo: repo.to_string(),
            revision,
        }
    } else if let Some(folder) = spec.strip_prefix("path:") {
        if folder.is_empty() {
            return Err(cx.at(
                &["base", "model"],
                "`base.model` = \"path:\" names no folder",
            ));
        }
        let path = normalize(&dir.join(folder));
        if !path.join("config.json").is_file() {
            return Err(cx.at(
                &["base", "model"],
                format!(
                    "`base.model` = \"{spec}\": `{}` is not a \
                model folder (it has no `config.json`)",
                    path.display()
                ),
            ));
        }
        BaseModel::Path(path)
    } else if let Some(file) = spec.strip_prefix("gguf:") {
        if file.is_empty() {
            return Err(cx.at(&["base", "model"], "`base.model` = \"gguf:\" names no file"));
        }
        let path = normalize(&dir.join(file));
        if !path.is_file() {
            return Err(cx.at(
                &["base", "model"],
                format!(
                    "`base.model` = \"{spec}\": `{}` is not a file",
                    path.display()
                ),
            ));
        }
        BaseModel::Gguf(path)
    } else {
        return Err(cx.at(
            &["base", "model"],
            format!(
                "`base.model` = \"{spec}\" is not understood: \
            use \"scratch\", \"hf:owner/name[@revision]\", \"path:folder\" or \
            \"gguf:file.gguf\""
            ),
        ));
    };
    let positive = |key: &str, value: Option<u64>, default: u64| -> Result<u64, ManifestError> {
        let value = value.unwrap_or(default);
        if value == 0 {
            return Err(cx.at(&["base", key], format!("`base.{key}` must be at least 1")));
        }
        Ok(value)
    };
    // Beyond the largest models there are (Llama 3's 405B: 126 layers,
    // 16,384 wide, 128 heads, a 131,072-token context): a typo, which would
    // otherwise end in a failed allocation.
    let bounded =
        |key: &str, value: Option<u64>, default: u64, most: u64| -> Result<u64, ManifestError> {
            let value = positive(key, value, default)?;
            if value > most {
                return Err(cx.at(
                    &["base", key],
                    format!("`base.{key}` = {value} is larger than symb takes ({most} at most)"),
                ));
            }
            Ok(value)
        };
    let n_layer = bounded("n_layer", raw.n_layer, 4, 256)?;
    let n_head = bounded("n_head", raw.n_head, 4, 256)?;
    let n_embd = bounded("n_embd", raw.n_embd, 128, 16_384)?;
    let n_positions = bounded("n_positions", raw.n_positions, 256, 131_072)?;
    if n_embd % n_head != 0 {
        return Err(cx.at(
            &["base", "n_embd"],
            format!("`base.n_embd` = {n_embd} is not divisible by `base.n_head` = {n_head}"),
        ));
    }
    Ok(Base {
        model,
        architecture: raw.architecture.unwrap_or(Architecture::Gpt2),
        n_layer,
        n_head,
        n_embd,
        n_positions,
        seed: raw.seed.unwrap_or(0),
    })
}

fn resolve_vocab(cx: &Ctx<'_>, raw: RawVocab) -> Result<Vocab, ManifestError> {
    let pad_to_multiple_of = raw.pad_to_multiple_of.unwrap_or(1);
    if pad_to_multiple_of == 0 {
        return Err(cx.at(
            &["vocab", "pad_to_multiple_of"],
            "`vocab.pad_to_multiple_of` must be at least 1",
        ));
    }
    Ok(Vocab {
        strategy: raw.strategy.unwrap_or(VocabStrategy::AddTokens),
        init: raw.init.unwrap_or(VocabInit::Mean),
        pad_to_multiple_of,
    })
}

fn resolve_finetune(
    cx: &Ctx<'_>,
    raw: RawFinetune,
    base: Option<&Base>,
) -> Result<Finetune, ManifestError> {
    let at_least_one =
        |key: &str, value: Option<u64>, default: u64| -> Result<u64, ManifestError> {
            let value = value.unwrap_or(default);
            if value == 0 {
                return Err(cx.at(
                    &["finetune", key],
                    format!("`finetune.{key}` must be at least 1"),
                ));
            }
            Ok(value)
        };
    let rank = at_least_one("rank", raw.rank, 8)?;
    if let Some(base) = base.filter(|b| b.model == BaseModel::Scratch)
        && rank > base.n_embd
    {
        return Err(cx.at(
            &["finetune", "rank"],
            format!(
                "`finetune.rank` = {rank} is larger than the model width `base.n_embd` = {}",
                base.n_embd
            ),
        ));
    }
    let alpha = raw.alpha.unwrap_or(16.0);
    if alpha <= 0.0 {
        return Err(cx.at(
            &["finetune", "alpha"],
            format!("`finetune.alpha` = {alpha} must be positive"),
        ));
    }
    let dropout = raw.dropout.unwrap_or(0.05);
    if !(0.0..1.0).contains(&dropout) {
        return Err(cx.at(
            &["finetune", "dropout"],
            format!("`finetune.dropout` = {dropout} must be in [0, 1)"),
        ));
    }
    // Unset: the base model's family's defaults (chosen when its config is known).
    let targets = match raw.targets {
        Some(targets) if targets.is_empty() => return Err(cx.at(
            &["finetune", "targets"],
            "`finetune.targets` is empty: name at least one layer, e.g. \"c_attn\" or \"q_proj\"",
        )),
        Some(targets) => targets,
        None => Vec::new(),
    };
    for target in &targets {
        let known = lora_target_names();
        if !known.contains(&target.as_str()) {
            let hint = suggest(target, known.iter().copied())
                .map(|b| format!(", did you mean `{b}`?"))
                .unwrap_or_default();
            return Err(cx.at(
                &["finetune", "targets"],
                format!(
                    "unknown LoRA target `{target}` in `finetune.targets`{hint} (known: {})",
                    known.join(", ")
                ),
            ));
        }
    }
    let learning_rate = raw.learning_rate.unwrap_or(2e-4);
    if learning_rate <= 0.0 || !learning_rate.is_finite() {
        return Err(cx.at(
            &["finetune", "learning_rate"],
            format!("`finetune.learning_rate` = {learning_rate} must be positive"),
        ));
    }
    let weight_decay = raw.weight_decay.unwrap_or(0.0);
    if weight_decay < 0.0 {
        return Err(cx.at(
            &["finetune", "weight_decay"],
            "`finetune.weight_decay` must not be negative",
        ));
    }
    let max_grad_norm = raw.max_grad_norm.unwrap_or(1.0);
    if max_grad_norm <= 0.0 {
        return Err(cx.at(
            &["finetune", "max_grad_norm"],
            "`finetune.max_grad_norm` must be positive",
        ));
    }
    let block_size = at_least_one("block_size", raw.block_size, 128)?;
    if let Some(base) = base.filter(|b| b.model == BaseModel::Scratch)
        && block_size > base.n_positions
    {
        return Err(cx.at(
            &["finetune", "block_size"],
            format!(
                "`finetune.block_size` = \
            {block_size} is longer than the model's context `base.n_positions` = \
            {}",
                base.n_positions
            ),
        ));
    }
    Ok(Finetune {
        method: raw.method.unwrap_or(FinetuneMethod::Lora),
        rank,
        alpha,
        dropout,
        rslora: raw.rslora.unwrap_or(false),
        targets,
        learning_rate,
        weight_decay,
        schedule: raw.schedule.unwrap_or(Schedule::Cosine),
        warmup_steps: raw.warmup_steps.unwrap_or(20),
        batch_size: at_least_one("batch_size", raw.batch_size, 8)?,
        block_size,
        epochs: at_least_one("epochs", raw.epochs, 1)?,
        max_steps: raw
            .max_steps
            .map(|s| at_least_one("max_steps", Some(s), 1))
            .transpose()?,
        gradient_accumulation: at_least_one("gradient_accumulation", raw.gradient_accumulation, 1)?,
        max_grad_norm,
        eval_every: at_least_one("eval_every", raw.eval_every, 100)?,
        early_stopping_patience: raw.early_stopping_patience,
        keep: raw.keep.unwrap_or(Keep::Best),
        checkpoint_every: at_least_one("checkpoint_every", raw.checkpoint_every, 50)?,
        seed: raw.seed.unwrap_or(0),
        train_new_tokens: raw.train_new_tokens.unwrap_or(true),
    })
}

fn check_dtype(cx: &Ctx<'_>, path: &[&str], dtype: &str) -> Result<Dtype, ManifestError> {
    if let Ok(dtype) = dtype.parse() {
        return Ok(dtype);
    }
    let hint = suggest(dtype, Dtype::ALL.map(Dtype::name))
        .map(|b| format!(", did you mean `{b}`?"))
        .unwrap_or_default();
    Err(cx.at(
        path,
        format!(
            "unknown dtype `{dtype}` in `{}`{hint} (known: {})",
            path.join("."),
            Dtype::list()
        ),
    ))
}

fn resolve_export(
    cx: &Ctx<'_>,
    raw: RawExport,
    finetune: Option<&Finetune>,
    corpus: bool,
    base: Option<&Base>,
) -> Result<Export, ManifestError> {
    let opset = raw.opset.unwrap_or(17);
    if !(17..=21).contains(&opset) {
        return Err(cx.at(
            &["export", "opset"],
            format!("`export.opset` = {opset} is not supported: use 17 to 21"),
        ));
    }
    let names = raw.targets.unwrap_or_else(|| {
        Dtype::DEFAULT_TARGETS
            .map(|d| d.name().to_string())
            .to_vec()
    });
    if names.is_empty() {
        return Err(cx.at(
            &["export", "targets"],
            "`export.targets` is empty: name at least one dtype, e.g. \"fp32\"",
        ));
    }
    let mut targets = Vec::new();
    for name in &names {
        let dtype = check_dtype(cx, &["export", "targets"], name)?;
        if targets.contains(&dtype) {
            return Err(cx.at(
                &["export", "targets"],
                format!("`export.targets` lists `{dtype}` twice"),
            ));
        }
        targets.push(dtype);
    }
    let accuracy_level = raw.accuracy_level.unwrap_or(4);
    if accuracy_level > 4 {
        return Err(cx.at(
            &["export", "accuracy_level"],
            format!(
                "`export.accuracy_level` = \
            {accuracy_level} is not a MatMulNBits level: use 0 (fp32) to 4 (int8)"
            ),
        ));
    }
    let head_bits = match raw.head_bits {
        None => crate::quant::HeadBits::default(),
        Some(n) => crate::quant::HeadBits::from_number(n).ok_or_else(|| {
            cx.at(
                &["export", "head_bits"],
                format!(
                    "`export.head_bits` = {n}: use 4, 8 (the default) or 16 (the file's float type)"
                ),
            )
        })?,
    };
    let adapter =
        match raw.adapter.as_deref() {
            None => AdapterFiles::default(),
            Some(name) => AdapterFiles::ALL
                .into_iter()
                .find(|a| a.name() == name)
                .ok_or_else(|| {
                    cx.at(
                &["export", "adapter"],
                format!("`export.adapter` = \"{name}\": use \"alone\" (the default: the adapter's \
                    files) or \"with-base\" (and the base it was trained on, in `adapter/base/`)"),
            )
                })?,
        };
    if adapter == AdapterFiles::WithBase
        && finetune.is_none_or(|f| f.method != FinetuneMethod::Lora)
    {
        return Err(cx.at(
            &["export", "adapter"],
            "`export.adapter` = \"with-base\" ships a LoRA \
            adapter's base, and this build trains no adapter (`finetune.method` = \"lora\")",
        ));
    }
    let calibration = match raw.calibration.as_deref() {
        None if corpus => Calibration::Corpus,
        None | Some("none") => Calibration::None,
        Some("corpus") if corpus => Calibration::Corpus,
        Some("corpus") => {
            return Err(cx.at(
                &["export", "calibration"],
                "`export.calibration` = \"corpus\" calibrates on the corpus's train split, and \
                this manifest has no `[corpus]`; add one, or set \"none\" (round to nearest)",
            ));
        }
        Some(other) => {
            return Err(cx.at(
                &["export", "calibration"],
                format!(
                    "`export.calibration` = \"{other}\": use \"corpus\" (the 4-bit blocks \
                    chosen with the train split's activations, GPTQ; the default with a corpus) \
                    or \"none\" (round to nearest)"
                ),
            ));
        }
    };
    let mixed = raw.mixed.unwrap_or(false);
    if mixed && calibration == Calibration::None {
        return Err(cx.at(
            &["export", "mixed"],
            "`export.mixed` measures each candidate file on the train split's calibration \
            windows, and `export.calibration` is \"none\" (or there is no `[corpus]`); set \
            `export.calibration = \"corpus\"`",
        ));
    }
    let q4_blocks = match raw.q4_blocks.as_deref() {
        // A GGUF base in Q4_1 keeps its grid: affine blocks hold it exactly.
        None => match base.map(|b| &b.model) {
            Some(BaseModel::Gguf(file)) if crate::model::gguf::stored_in_q4_1(file) => {
                crate::quant::Layout::Affine
            }
            _ => crate::quant::Layout::Symmetric,
        },
        Some("symmetric") => crate::quant::Layout::Symmetric,
        Some("affine") => crate::quant::Layout::Affine,
        Some(other) => {
            return Err(cx.at(
                &["export", "q4_blocks"],
                format!(
                    "`export.q4_blocks` = \"{other}\": use \"symmetric\" (a scale per block \
                    of 32, 20 bytes; the default) or \"affine\" (a scale and an offset per \
                    block, 24 bytes: the layout of GGUF's Q4_1 and K-quants; the default for \
                    a GGUF base stored in Q4_1)"
                ),
            ));
        }
    };
    Ok(Export {
        calibration,
        mixed,
        q4_blocks,
        opset,
        targets,
        quantize_embedding: raw.quantize_embedding.unwrap_or(false),
        head_bits,
        external_data: raw.external_data.unwrap_or(ExternalData::Auto),
        accuracy_level,
        adapter,
    })
}

fn resolve_web(cx: &Ctx<'_>, raw: RawWeb, export: Option<&Export>) -> Result<Web, ManifestError> {
    let built = |key: &'static str, name: Option<&str>| -> Result<Option<Dtype>, ManifestError> {
        let dtype = name
            .map(|name| check_dtype(cx, &["web", key], name))
            .transpose()?;
        if let (Some(dtype), Some(export)) = (dtype, export)
            && !export.targets.contains(&dtype)
        {
            let targets: Vec<&str> = export.targets.iter().map(|d| d.name()).collect();
            return Err(cx.at(
                &["web", key],
                format!(
                    "`web.{key}` = \"{dtype}\" is not in \
                `export.targets` ({}): the page would load a file the folder \
                lacks",
                    targets.join(", ")
                ),
            ));
        }
        Ok(dtype)
    };
    let dtype = built("dtype", raw.dtype.as_deref())?;
    let webgpu_dtype = built("webgpu_dtype", raw.webgpu_dtype.as_deref())?;
    let max_new_tokens = raw.max_new_tokens.unwrap_or(32);
    if !(1..=4096).contains(&max_new_tokens) {
        return Err(cx.at(
            &["web", "max_new_tokens"],
            format!("`web.max_new_tokens` = {max_new_tokens} must be between 1 and 4096"),
        ));
    }
    let transformers_js = match raw.transformers_js {
        None => TransformersJs::Bundle,
        Some(text) if text == "bundle" => TransformersJs::Bundle,
        Some(url)
            if url.starts_with("https://")
                || url.starts_with("http://")
                || url.starts_with('/')
                || url.starts_with("./") =>
        {
            TransformersJs::Url(url)
        }
        Some(_) => {
            return Err(cx.at(
                &["web", "transformers_js"],
                format!(
                    "`web.transformers_js` must be \"bundle\" (its files in the output folder: \
                    the page works offline), a URL (https://..., such as \"{TRANSFORMERS_JS_CDN}\") \
                    or a path on the server (/... or ./...)"
                ),
            ));
        }
    };
    Ok(Web {
        dtype,
        webgpu_dtype,
        prompt: raw.prompt.unwrap_or_default(),
        max_new_tokens,
        transformers_js,
    })
}

fn resolve_browser(cx: &Ctx<'_>, dir: &Path, raw: RawBrowser) -> Result<Browser, ManifestError> {
    let key = |name: &'static str| ["verify", "browser", name];
    let mut devices = Vec::new();
    for name in raw.devices.unwrap_or_else(|| vec!["webgpu".to_string()]) {
        let device = match name.as_str() {
            "webgpu" => Device::Webgpu,
            "wasm" => Device::Wasm,
            other => {
                return Err(cx.at(
                    &key("devices"),
                    format!(
                        "`{other}` in \
                `verify.browser.devices` is not a browser device (known: webgpu, wasm)"
                    ),
                ));
            }
        };
        if !devices.contains(&device) {
            devices.push(device);
        }
    }
    if devices.is_empty() {
        return Err(cx.at(
            &key("devices"),
            "`verify.browser.devices` is empty: list webgpu, wasm or both",
        ));
    }
    let adapter = match raw.adapter.as_deref().unwrap_or("gpu") {
        "gpu" => Adapter::Gpu,
        "swiftshader" => Adapter::Swiftshader,
        other => {
            return Err(cx.at(
                &key("adapter"),
                format!(
                    "`verify.browser.adapter` = \"{other}\" \
            is not an adapter (gpu: the machine's GPU; swiftshader: WebGPU in software)"
                ),
            ));
        }
    };
    let prompts = raw.prompts.unwrap_or(4);
    if prompts == 0 {
        return Err(cx.at(
            &key("prompts"),
            "`verify.browser.prompts` must be at least 1",
        ));
    }
    let timeout_s = raw.timeout_s.unwrap_or(900);
    if timeout_s == 0 {
        return Err(cx.at(
            &key("timeout_s"),
            "`verify.browser.timeout_s` must be at least 1",
        ));
    }
    let transformers_js = raw.transformers_js.map(|p| normalize(&dir.join(p)));
    Ok(Browser {
        devices,
        adapter,
        prompts: prompts as usize,
        chromium: raw.chromium.map(|p| normalize(&dir.join(p))),
        transformers_js,
        timeout: std::time::Duration::from_secs(timeout_s),
    })
}

fn resolve_verify(cx: &Ctx<'_>, dir: &Path, raw: RawVerify) -> Result<Verify, ManifestError> {
    let prompts = raw.prompts.unwrap_or(RawPrompts::Count(16));
    match &prompts {
        RawPrompts::Count(0) => {
            return Err(cx.at(
                &["verify", "prompts"],
                "`verify.prompts` must be at least 1",
            ));
        }
        RawPrompts::List(list) if list.is_empty() || list.iter().any(String::is_empty) => {
            return Err(cx.at(
                &["verify", "prompts"],
                "`verify.prompts` must list non-empty prompts",
            ));
        }
        _ => {}
    }
    let mut tolerance = BTreeMap::new();
    for (dtype, bounds) in raw.tolerance.unwrap_or_default() {
        tolerance.insert(
            check_dtype(cx, &["verify", "tolerance", &dtype], &dtype)?,
            bounds.clone(),
        );
        let dtype = dtype.as_str();
        for (name, value) in [
            ("top1_agreement", bounds.top1_agreement),
            ("greedy_match", bounds.greedy_match),
        ] {
            if let Some(v) = value
                && !(0.0..=1.0).contains(&v)
            {
                return Err(cx.at(
                    &["verify", "tolerance", dtype, name],
                    format!("`verify.tolerance.{dtype}.{name}` = {v} must be a fraction in [0, 1]"),
                ));
            }
        }
        for (name, value) in [
            ("max_abs_error", bounds.max_abs_error),
            ("max_relative_error", bounds.max_relative_error),
            ("kl_divergence", bounds.kl_divergence),
            ("perplexity_ratio", bounds.perplexity_ratio),
        ] {
            if let Some(v) = value
                && (v < 0.0 || !v.is_finite())
            {
                return Err(cx.at(
                    &["verify", "tolerance", dtype, name],
                    format!("`verify.tolerance.{dtype}.{name}` = {v} must be a finite number >= 0"),
                ));
            }
        }
    }
    let browser = raw
        .browser
        .map(|b| resolve_browser(cx, dir, b))
        .transpose()?;
    Ok(Verify {
        prompts,
        max_new_tokens: raw.max_new_tokens.unwrap_or(32),
        tolerance,
        browser,
    })
}

/// An absolute form of `path` without touching the filesystem beyond the cwd.
fn absolute(path: &Path) -> std::io::Result<PathBuf> {
    Ok(normalize(&std::path::absolute(path)?))
}

/// Removes `.` and resolves `..` lexically.
fn normalize(path: &Path) -> PathBuf {
    let mut out = PathBuf::new();
    for component in path.components() {
        match component {
            Component::CurDir => {}
            Component::ParentDir => {
                out.pop();
            }
            other => out.push(other.as_os_str()),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::parse_size;

    #[test]
    fn sizes_read_as_ray_wants_bytes() {
        assert_eq!(parse_size("16GiB"), Some(16 << 30));
        assert_eq!(parse_size("512 MB"), Some(512_000_000));
        assert_eq!(parse_size("1.5G"), Some(1_500_000_000));
        assert_eq!(parse_size("2048"), Some(2048));
        assert_eq!(parse_size("lots"), None);
        assert_eq!(parse_size("-1GB"), None);
        assert_eq!(parse_size("4 parsecs"), None);
    }
}
