//! The stage kinds, and the one place that turns a manifest into a plan.

pub mod base;
pub mod browser;
pub mod bundle;
pub mod calibrate;
pub mod corpus;
pub mod export;
pub mod finetune;
pub mod merge;
pub mod quantize;
pub mod reference;
pub mod shared;
pub mod tokenizer;
pub mod verify;
pub mod verify_tokenizer;
pub mod vocab;
pub mod web;

use crate::dtype::Dtype;
use crate::engine::{Plan, Stage};
use crate::manifest::{
    AdapterFiles, BaseModel, FinetuneMethod, Manifest, ManifestError, VocabStrategy,
};
use shared::ModelStage;

/// Where a model stage (`base`, `vocab`) puts its model in the output folder.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum ModelPublish {
    /// Nowhere: a later stage's model is the folder's.
    Nowhere,
    /// At the top: nothing trains it.
    Root,
    /// Its tokenizer in `adapter/`, where PEFT's `AutoPeftModelForCausalLM`
    /// finds it and grows the base's vocabulary to match.
    AdapterTokenizer,
    /// Its model in `adapter/base/` (`export.adapter = "with-base"`), and its
    /// tokenizer in `adapter/` where the vocabulary grew.
    AdapterBase,
}

impl ModelPublish {
    /// (artifact, output path) for a model stage's files; `grew`: the stage
    /// grew the base's vocabulary.
    pub fn files(self, grew: bool) -> Vec<(String, String)> {
        const MODEL: [&str; 4] = [
            "config.json",
            "generation_config.json",
            "model.safetensors",
            "tokenizer.json",
        ];
        const TOKENIZER: [&str; 2] = ["tokenizer.json", "tokenizer_config.json"];
        let under = |folder: &str, files: &[&str]| {
            files
                .iter()
                .map(|f| (f.to_string(), format!("{folder}{f}")))
                .collect::<Vec<_>>()
        };
        let tokenizer = if grew {
            under("adapter/", &TOKENIZER)
        } else {
            Vec::new()
        };
        match self {
            ModelPublish::Nowhere => Vec::new(),
            ModelPublish::Root => under("", &MODEL),
            ModelPublish::AdapterTokenizer => tokenizer,
            ModelPublish::AdapterBase => [
                under("adapter/base/", &MODEL),
                under("adapter/base/", &["tokenizer_config.json"]),
                tokenizer,
            ]
            .concat(),
        }
    }
}

/// A Hub base's revision resolved to a commit, or why it could not be (the
/// `base` stage reports it when it runs, so commands that run nothing work
/// offline).
pub type HubCommit = Result<crate::model::hub::Resolved, crate::engine::StageError>;

/// The stages a manifest asks for, given its Hub base's commit
/// ([`resolve_hub`] finds it): a pure function of the two. A section whose stage this version of symb
/// does not have yet is refused rather than silently ignored.
pub fn plan(manifest: &Manifest, hub: Option<&HubCommit>) -> Result<Plan, ManifestError> {
    let mut stages: Vec<Box<dyn Stage>> = Vec::new();
    if let Some(corpus) = &manifest.corpus {
        stages.push(Box::new(corpus::CorpusStage {
            corpus: corpus.clone(),
        }));
    }
    if let Some(tokenizer) = &manifest.tokenizer {
        stages.push(Box::new(tokenizer::TokenizerStage {
            tokenizer: tokenizer.clone(),
        }));
    }
    let finetune = manifest
        .finetune
        .as_ref()
        .filter(|f| f.method != FinetuneMethod::None);
    let vocab = manifest
        .vocab
        .as_ref()
        .filter(|v| v.strategy != VocabStrategy::None);
    let lora = finetune.is_some_and(|f| f.method == FinetuneMethod::Lora);
    let with_base = lora
        && manifest
            .export
            .as_ref()
            .is_some_and(|e| e.adapter == AdapterFiles::WithBase);
    // The last model stage before training is the adapter's base.
    let publish = |last: bool| match () {
        _ if !last => ModelPublish::Nowhere,
        _ if finetune.is_none() => ModelPublish::Root,
        _ if with_base => ModelPublish::AdapterBase,
        _ if lora => ModelPublish::AdapterTokenizer,
        _ => ModelPublish::Nowhere,
    };
    let mut model_stage = ModelStage::Base;
    if let Some(base) = &manifest.base {
        let files = match &base.model {
            BaseModel::Path(dir) => base::folder_files(dir),
            BaseModel::Gguf(file) => base::gguf_files(file),
            _ => Vec::new(),
        };
        let hub = match &base.model {
            BaseModel::Hub { .. } => Some(hub.cloned().unwrap_or_else(|| {
                Err(crate::engine::StageError::failed(
                    "the Hub revision was not resolved before planning",
                ))
            })),
            _ => None,
        };
        stages.push(Box::new(base::BaseStage::new(
            base,
            files,
            hub,
            publish(vocab.is_none()),
        )));
        if let Some(vocab) = vocab {
            stages.push(Box::new(vocab::VocabStage {
                vocab: vocab.clone(),
                publish: publish(true),
            }));
            model_stage = ModelStage::Vocab;
        }
    }
    if let Some(finetune) = finetune {
        let base_name = manifest.base.as_ref().and_then(|b| match &b.model {
            BaseModel::Hub { repo, .. } => Some(repo.clone()),
            // Not the folder's path or name: keys hold no location.
            BaseModel::Path(_) | BaseModel::Gguf(_) | BaseModel::Scratch => None,
        });
        stages.push(Box::new(finetune::FinetuneStage::new(
            finetune,
            model_stage,
            base_name,
            manifest.chat.clone(),
        )));
        stages.push(Box::new(merge::MergeStage {
            lora: finetune.method == FinetuneMethod::Lora,
            model_stage,
            chat: manifest.chat.clone(),
        }));
    }
    if let Some(export) = &manifest.export {
        let model_stage = if finetune.is_some() {
            ModelStage::Merge
        } else {
            model_stage
        };
        stages.push(Box::new(export::ExportStage {
            export: export::ExportSettings {
                opset: export.opset,
                external_data: export.external_data,
            },
            model_stage,
        }));
        let calibrated = export.calibration == crate::manifest::Calibration::Corpus
            && export.targets.iter().any(|t| t.is_4bit());
        if calibrated {
            stages.push(Box::new(calibrate::CalibrateStage::new(
                model_stage,
                manifest.chat.is_some() && finetune.is_some(),
            )));
        }
        // Every file is verified; `[verify]` only tunes how.
        let settings = manifest.verify.clone().unwrap_or_default();
        for &dtype in export.targets.iter().filter(|t| **t != Dtype::Fp32) {
            let mixed = export.mixed.then(|| {
                let t = crate::verify::tolerance(dtype, settings.tolerance.get(&dtype));
                crate::quant::mixed::Bounds {
                    kl_divergence: t.kl_divergence,
                    top1_agreement: t.top1_agreement,
                    perplexity_ratio: t.perplexity_ratio,
                }
            });
            let options = crate::quant::Options {
                quantize_embedding: export.quantize_embedding,
                accuracy_level: export.accuracy_level as i64,
                head_bits: export.head_bits,
                layout: export.q4_blocks,
            };
            stages.push(Box::new(quantize::QuantizeStage::new(
                dtype,
                options,
                export.external_data,
                export.calibration,
                mixed,
            )));
        }
        stages.push(Box::new(reference::ReferenceStage {
            verify: reference::ReferenceSettings {
                prompts: settings.prompts.clone(),
                max_new_tokens: settings.max_new_tokens,
            },
            model_stage,
            corpus: manifest.corpus.is_some(),
            chat: manifest.chat.is_some() && finetune.is_some(),
        }));
        for &dtype in &export.targets {
            stages.push(Box::new(verify::VerifyStage::new(dtype, &settings)));
        }
        let browser = settings.browser.clone();
        if let Some(browser) = &browser {
            stages.push(Box::new(browser::BrowserStage::new(
                browser.clone(),
                export.targets.clone(),
                &settings,
                model_stage,
                manifest.web.transformers_js.clone(),
                manifest.corpus.is_some(),
            )));
        }
        let dtype = manifest
            .web
            .dtype
            .unwrap_or_else(|| bundle::default_dtype(&export.targets));
        let webgpu_dtype = manifest
            .web
            .webgpu_dtype
            .unwrap_or_else(|| bundle::webgpu_dtype(&export.targets));
        let model_stage_has_vocab = stages.iter().any(|s| s.name() == "vocab");
        stages.push(Box::new(bundle::BundleStage {
            model_stage,
            dtypes: export.targets.clone(),
            dtype,
            webgpu_dtype,
            title: manifest.project.name.clone(),
            web: manifest.web.clone(),
            finetune: finetune.is_some(),
            tokenizer: manifest.tokenizer.is_some(),
            vocab: model_stage_has_vocab,
            browser: browser.map(|b| b.devices),
            card: card(manifest),
            page_template: bundle::page_template(),
        }));
        if manifest.web.transformers_js == crate::manifest::TransformersJs::Bundle {
            stages.push(Box::new(web::WebStage::default()));
        }
        // The tokenizer where it runs: transformers.js over the folder's files.
        stages.push(Box::new(verify_tokenizer::VerifyTokenizerStage::new(
            model_stage,
            manifest.corpus.is_some(),
            &settings.prompts,
        )));
    }
    Plan::new(stages).map_err(|e| ManifestError::general(&manifest.display, e.to_string()))
}

/// Every stage kind, each its settings: the one closed set a worker
/// rebuilds a stage from (a variant's name is its stage's [`Stage::kind`]).
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
#[serde(tag = "kind", content = "stage", rename_all = "snake_case")]
pub enum StageKind {
    Corpus(corpus::CorpusStage),
    Tokenizer(tokenizer::TokenizerStage),
    Base(base::BaseStage),
    Vocab(vocab::VocabStage),
    Finetune(finetune::FinetuneStage),
    Merge(merge::MergeStage),
    Export(export::ExportStage),
    Quantize(quantize::QuantizeStage),
    Reference(reference::ReferenceStage),
    Verify(verify::VerifyStage),
    Browser(browser::BrowserStage),
    Bundle(bundle::BundleStage),
    Web(web::WebStage),
    VerifyTokenizer(verify_tokenizer::VerifyTokenizerStage),
}

impl StageKind {
    /// The stage a build described ([`Stage::kind`] and [`Stage::spec`]),
    /// rebuilt on a worker.
    pub fn rebuild(kind: &str, spec: &serde_json::Value) -> Result<Box<dyn Stage>, String> {
        let tagged = serde_json::json!({ "kind": kind, "stage": spec });
        let stage: StageKind = serde_json::from_value(tagged)
            .map_err(|e| format!("this symb cannot rebuild the `{kind}` stage it was sent: {e}"))?;
        Ok(stage.into_stage())
    }

    pub fn into_stage(self) -> Box<dyn Stage> {
        match self {
            StageKind::Corpus(s) => Box::new(s),
            StageKind::Tokenizer(s) => Box::new(s),
            StageKind::Base(s) => Box::new(s),
            StageKind::Vocab(s) => Box::new(s),
            StageKind::Finetune(s) => Box::new(s),
            StageKind::Merge(s) => Box::new(s),
            StageKind::Export(s) => Box::new(s),
            StageKind::Quantize(s) => Box::new(s),
            StageKind::Reference(s) => Box::new(s),
            StageKind::Verify(s) => Box::new(s),
            StageKind::Browser(s) => Box::new(s),
            StageKind::Bundle(s) => Box::new(s),
            StageKind::Web(s) => Box::new(s),
            StageKind::VerifyTokenizer(s) => Box::new(s),
        }
    }
}

/// `text` as a Python string literal (JSON's escapes are Python's).
fn python_string(text: &str) -> String {
    serde_json::to_string(text).expect("a string")
}

/// The model card's facts: license and languages, the Hub base, and how the
/// model was made, in words.
fn card(manifest: &Manifest) -> bundle::Card {
    let base = manifest.base.as_ref();
    let base_model = base.and_then(|b| match &b.model {
        BaseModel::Hub { repo, .. } => Some(repo.clone()),
        _ => None,
    });
    let base_words = match base.map(|b| &b.model) {
        Some(BaseModel::Hub { repo, .. }) => format!("`{repo}`"),
        Some(BaseModel::Path(_)) => "a local model".to_string(),
        Some(BaseModel::Gguf(file)) => format!(
            "`{}` (GGUF)",
            file.file_name()
                .map(|n| n.to_string_lossy())
                .unwrap_or_default()
        ),
        Some(BaseModel::Scratch) => {
            let b = base.expect("a base");
            let family = match b.architecture {
                crate::manifest::Architecture::Gpt2 => "GPT-2",
                crate::manifest::Architecture::Llama => "Llama",
            };
            format!(
                "a {family} model ({} layer{}, width {})",
                b.n_layer,
                if b.n_layer == 1 { "" } else { "s" },
                b.n_embd
            )
        }
        None => "a model".to_string(),
    };
    let scratch = matches!(base.map(|b| &b.model), Some(BaseModel::Scratch));
    let capital = |words: &str| words[..1].to_ascii_uppercase() + &words[1..];
    let (method, trained) = match &manifest.finetune {
        Some(f) if f.method == FinetuneMethod::Lora => {
            (format!("LoRA (rank {}) on {base_words}", f.rank), true)
        }
        Some(f) if f.method == FinetuneMethod::Full && scratch => (
            format!("{} trained from scratch", capital(&base_words)),
            true,
        ),
        Some(f) if f.method == FinetuneMethod::Full => {
            (format!("All weights of {base_words} fine-tuned"), true)
        }
        _ if scratch => (
            format!(
                "{} with random weights (nothing trains it: no `[finetune]`), converted",
                capital(&base_words)
            ),
            false,
        ),
        _ => (format!("{}, converted", capital(&base_words)), false),
    };
    let lora = manifest
        .finetune
        .as_ref()
        .is_some_and(|f| f.method == FinetuneMethod::Lora);
    let adapter = lora.then(|| bundle::AdapterCard {
        base: base.and_then(|b| match &b.model {
            BaseModel::Hub { repo, revision } => {
                let revision = revision.as_ref().map_or(String::new(), |r| {
                    format!(", revision={}", python_string(r))
                });
                Some((format!("{}{revision}", python_string(repo)), String::new()))
            }
            BaseModel::Gguf(file) => {
                let name = file
                    .file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_default();
                Some((
                    format!("\".\", gguf_file={}", python_string(&name)),
                    "the folder that holds \
                    the file; needs `pip install gguf`: transformers dequantizes it as symb \
                    did"
                    .to_string(),
                ))
            }
            BaseModel::Path(dir) => {
                let name = dir
                    .file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_default();
                Some((
                    python_string(&name),
                    "the folder symb.toml's base.model names".to_string(),
                ))
            }
            BaseModel::Scratch => None,
        }),
        with_base: manifest
            .export
            .as_ref()
            .is_some_and(|e| e.adapter == AdapterFiles::WithBase),
    });
    bundle::Card {
        adapter,
        license: manifest.project.license.clone(),
        language: manifest.project.language.clone(),
        base_model,
        method,
        corpus: if trained {
            manifest
                .corpus
                .as_ref()
                .map(|c| c.patterns.clone())
                .unwrap_or_default()
        } else {
            Vec::new()
        },
    }
}

/// The commit a Hub base's revision names (from the Hub, or as resolved
/// before when it cannot be reached); `None` for any other base. The one
/// step before planning that may use the network.
pub fn resolve_hub(manifest: &Manifest) -> Option<HubCommit> {
    match manifest.base.as_ref().map(|b| &b.model) {
        Some(BaseModel::Hub { repo, revision }) => Some(resolve_hub_revision(
            manifest,
            repo,
            revision.as_deref().unwrap_or("main"),
        )),
        _ => None,
    }
}

/// Resolves a Hub revision to its commit, recording the answer in the cache;
/// offline, the last recorded answer is used. An error is kept for the base
/// stage to report when it runs, so commands that run nothing work offline.
fn resolve_hub_revision(manifest: &Manifest, repo: &str, revision: &str) -> HubCommit {
    use crate::model::hub;
    let cache = crate::cache::Cache::open(&manifest.project.cache)?;
    let record = cache.refs_dir("hub").join(format!(
        "{}@{}.json",
        repo.replace('/', "--"),
        revision.replace('/', "--")
    ));
    let recorded: Option<hub::Resolved> = std::fs::read(&record)
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok());
    let pinned = revision.len() == 40 && revision.chars().all(|c| c.is_ascii_hexdigit());
    if pinned && let Some(resolved) = recorded.clone() {
        return Ok(resolved);
    }
    // What the Hugging Face cache holds, first where no network is needed.
    let held = hub::cached(repo, revision).map(|(resolved, _)| resolved);
    if (pinned || hub::offline())
        && let Some(resolved) = held.clone()
    {
        return Ok(resolved);
    }
    match hub::resolve(repo, revision, &cache.tmp_dir()) {
        Ok(resolved) => {
            if recorded.as_ref() != Some(&resolved) {
                crate::cache::write_json_atomic(&record, &resolved, &cache.tmp_dir())?;
            }
            Ok(resolved)
        }
        Err(error) => match recorded.or(held) {
            Some(resolved) => {
                tracing::warn!(
                    "{error}; using the commit resolved before, {}",
                    resolved.commit
                );
                Ok(resolved)
            }
            None => {
                let mut error = shared::model_error(error);
                error.message.push_str(&format!(
                    " (set HF_ENDPOINT for a mirror, or check the network; offline, a model \
                        in the Hugging Face cache is used, `huggingface-cli download {repo}` \
                        puts it there, and a downloaded copy of the model's folder works as \
                        `base.model = \"path:FOLDER\"`)"
                ));
                Err(error)
            }
        },
    }
}

#[cfg(test)]
mod tests {
    /// What a worker rebuilds from a finetune stage's spec (sent as JSON
    /// text) has the same settings, so the same key, as what the build made
    /// from the manifest.
    #[test]
    fn a_finetune_stage_survives_the_trip_to_a_worker() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("corpus")).unwrap();
        std::fs::write(dir.path().join("corpus/a.txt"), "ka ta\n").unwrap();
        let text = "[corpus]\nfiles = [\"corpus/*.txt\"]\n\n[base]\nmodel = \"hf:org/model\"\n\n\
                    [finetune]\nmethod = \"lora\"\nrank = 12\nalpha = 24.5\nlearning_rate = 3.3e-4\nweight_decay = 0.1\ndropout = 0.05\n\
                    targets = [\"c_attn\", \"c_proj\"]\nmax_steps = 7\nearly_stopping_patience = 3\nseed = 11\n";
        let path = dir.path().join("symb.toml");
        std::fs::write(&path, text).unwrap();
        let manifest = crate::manifest::load(&path).unwrap();
        let plan = super::plan(&manifest, None).unwrap();
        let stage = plan.stage("finetune").unwrap();
        let sent = serde_json::to_string(&stage.spec().unwrap()).unwrap();
        let rebuilt =
            super::StageKind::rebuild("finetune", &serde_json::from_str(&sent).unwrap()).unwrap();
        assert_eq!(rebuilt.settings(), stage.settings());
        assert_eq!(rebuilt.dependencies(), stage.dependencies());
        assert_eq!(
            (rebuilt.kind(), rebuilt.version(), rebuilt.tools()),
            (stage.kind(), stage.version(), stage.tools())
        );
        assert!(super::StageKind::rebuild("corpus", &serde_json::json!({})).is_err());
    }

    /// Every stage kind.
    const DERIVED: [&str; 14] = [
        "base",
        "browser",
        "bundle",
        "corpus",
        "finetune",
        "tokenizer",
        "vocab",
        "merge",
        "export",
        "quantize",
        "reference",
        "verify",
        "verify_tokenizer",
        "web",
    ];

    /// The paths to the leaves of a stage's serialised form, `@` fields aside
    /// (an array is one leaf).
    fn leaves(value: &serde_json::Value, path: &mut Vec<String>, out: &mut Vec<Vec<String>>) {
        match value {
            serde_json::Value::Object(fields) => {
                for (name, value) in fields.iter().filter(|(n, _)| !n.starts_with('@')) {
                    path.push(name.clone());
                    leaves(value, path, out);
                    path.pop();
                }
            }
            _ => out.push(path.clone()),
        }
    }

    /// Other values for a leaf, of its own type where it has one.
    fn variants(leaf: &serde_json::Value) -> Vec<serde_json::Value> {
        use serde_json::{Value, json};
        match leaf {
            Value::Bool(b) => vec![json!(!b)],
            Value::Number(n) if n.is_u64() => vec![json!(n.as_u64().unwrap() + 1)],
            Value::Number(n) if n.is_i64() => vec![json!(n.as_i64().unwrap() + 1)],
            Value::Number(n) => vec![json!(n.as_f64().unwrap() * 1.5 + 0.25)],
            Value::String(s) => vec![json!(format!("{s}x"))],
            Value::Array(items) => {
                let mut longer = items.clone();
                longer.push(items.last().cloned().unwrap_or(json!("x")));
                let mut out = vec![Value::Array(longer)];
                if let Some(first) = items.first() {
                    out.push(Value::Array(items[..items.len() - 1].to_vec()));
                    // The same length, its first item changed (a tuple).
                    for other in variants(first) {
                        let mut same = items.clone();
                        same[0] = other;
                        out.push(Value::Array(same));
                    }
                }
                out
            }
            Value::Null | Value::Object(_) => vec![json!(1), json!("x"), json!(true), json!([])],
        }
    }

    /// The variants serde names when it refuses one (`unknown variant `x`,
    /// expected one of `a`, `b``).
    fn named_variants(error: &str) -> Vec<serde_json::Value> {
        let Some(expected) = error.split("expected").nth(1) else {
            return Vec::new();
        };
        expected
            .split('`')
            .skip(1)
            .step_by(2)
            .map(|v| serde_json::json!(v))
            .collect()
    }

    /// Every field of a stage that is its settings enters its key: each leaf
    /// of the stage's serialised form (its `@` fields aside), changed,
    /// changes `settings()`, so the key. The cases come from the stage's own
    /// form, not from a list: a field added to a stage is covered the day
    /// it is added.
    #[test]
    fn every_field_of_a_stage_enters_its_key() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("corpus")).unwrap();
        std::fs::write(dir.path().join("corpus/a.txt"), "ka ta\n").unwrap();
        let fixture =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tiny-llama");
        let text = format!(
            "[corpus]\nfiles = [\"corpus/*.txt\"]\n\n[tokenizer]\nvocab_size = 600\nspecial_tokens = [\"<a>\"]\n\n\
             [base]\nmodel = \"path:{}\"\n\n[vocab]\nstrategy = \"add_tokens\"\n\n[finetune]\nmethod = \"lora\"\n\n\
             [export]\ntargets = [\"fp32\", \"fp16\", \"q8\", \"int8\", \"q4\", \"q4f16\"]\nquantize_embedding = true\naccuracy_level = 0\n\n\
             [verify]\nprompts = [\"ka\", \"ta\"]\nmax_new_tokens = \
                 5\n\n[verify.tolerance.q8]\nkl_divergence = 0.5\n\n[verify.browser]\ndevices = \
                 [\"webgpu\", \"wasm\"]\nprompts = 1\n",
            fixture.display()
        );
        // A scratch model trained whole, and a Hub base whose commit is known.
        let scratch = "[corpus]\nfiles = [\"corpus/*.txt\"]\n\n[tokenizer]\nvocab_size = 300\n\n\
                       [base]\nmodel = \"scratch\"\narchitecture = \"llama\"\nn_layer = \
                           2\n\n[finetune]\nmethod = \"full\"\n";
        let hub = "[corpus]\nfiles = [\"corpus/*.txt\"]\n\n[base]\nmodel = \"hf:org/model\"\n";
        let commit: super::HubCommit = Ok(crate::model::hub::Resolved {
            commit: "0123456789abcdef0123456789abcdef01234567".to_string(),
            files: vec!["config.json".to_string()],
        });
        let mut plans = Vec::new();
        for (text, hub) in [(text.as_str(), None), (scratch, None), (hub, Some(&commit))] {
            std::fs::write(dir.path().join("symb.toml"), text).unwrap();
            let manifest = crate::manifest::load(&dir.path().join("symb.toml")).unwrap();
            plans.push(super::plan(&manifest, hub).unwrap());
        }
        let mut kinds = std::collections::BTreeSet::new();
        let stages = plans.iter().flat_map(|p| p.stages());
        for stage in stages.filter(|s| DERIVED.contains(&s.kind())) {
            let (name, kind) = (stage.name(), stage.kind());
            kinds.insert(kind);
            let spec = stage
                .spec()
                .unwrap_or_else(|| panic!("`{name}` has no spec"));
            let rebuild = |spec: &serde_json::Value| super::StageKind::rebuild(kind, spec);
            assert_eq!(
                rebuild(&spec).unwrap().settings(),
                stage.settings(),
                "`{name}` survives its own spec"
            );
            let mut paths = Vec::new();
            leaves(&spec, &mut Vec::new(), &mut paths);
            for path in paths {
                let pointer = format!("/{}", path.join("/"));
                let leaf = spec.pointer(&pointer).unwrap().clone();
                let mut tried = Vec::new();
                let mut candidates = variants(&leaf);
                let mut changed = false;
                while let Some(candidate) = candidates.pop() {
                    if candidate == leaf || tried.contains(&candidate) {
                        continue;
                    }
                    tried.push(candidate.clone());
                    let mut edited = spec.clone();
                    *edited.pointer_mut(&pointer).unwrap() = candidate;
                    match rebuild(&edited) {
                        Ok(other) => {
                            changed = other.settings() != stage.settings();
                            if changed {
                                break;
                            }
                        }
                        Err(error) => candidates.extend(named_variants(&error)),
                    }
                }
                eprintln!("{name}: {}", path.join("."));
                assert!(
                    changed,
                    "`{name}`: changing `{}` ({leaf}; tried {tried:?}) leaves its key as it was",
                    path.join(".")
                );
            }
        }
        assert_eq!(
            kinds,
            DERIVED.into_iter().collect(),
            "the manifest plans every kind"
        );
    }
}
