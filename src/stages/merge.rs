//! Stage `merge`: folds the adapter into the weights: a folder Python
//! transformers loads.

use std::collections::BTreeMap;
use std::path::PathBuf;

use super::shared::{
    ADAPTER_CONFIG, ADAPTER_WEIGHTS, Artifact, ChatSpec, ModelStage, TRAINED_WEIGHTS, copy,
    load_base, model_error, tokenizer_config, write_json, writers,
};
use crate::engine::{Settings, Stage, StageContext, StageError, settings_of, spec_of};
use crate::manifest::Chat;
use crate::model::{self, lora};

/// The stage is its settings: none of its own (what it merges is its inputs).
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct MergeStage {
    /// Whether an adapter is folded in (else the trained weights are
    /// copied): the inputs it reads differ, and their digests are keyed.
    #[serde(rename = "@lora")]
    pub lora: bool,
    /// The stage whose model the adapter was trained on: its artifacts are
    /// keyed by digest.
    #[serde(rename = "@model_stage")]
    pub model_stage: ModelStage,
    /// A chat model: the template it was trained with goes into the folder,
    /// and its end-of-turn token ends generation.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub chat: Option<Chat>,
}

impl MergeStage {
    /// What it reads: the model and what training made of it.
    fn inputs(&self) -> Vec<Artifact> {
        let mut inputs = self.model_stage.model().to_vec();
        if self.lora {
            inputs.extend([ADAPTER_CONFIG, ADAPTER_WEIGHTS]);
        } else {
            inputs.push(TRAINED_WEIGHTS);
        }
        inputs
    }
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
        settings_of(self)
    }
    fn spec(&self) -> Option<serde_json::Value> {
        spec_of(self)
    }
    fn dependencies(&self) -> Vec<String> {
        writers(&self.inputs())
    }
    fn tools(&self) -> BTreeMap<String, String> {
        super::shared::tools()
    }
    fn publishes(&self) -> Vec<(String, String)> {
        let mut files = vec![
            "config.json",
            "generation_config.json",
            "model.safetensors",
            "tokenizer.json",
            "tokenizer_config.json",
        ];
        if self.chat.is_some() {
            files.push(CHAT_TEMPLATE_FILE);
        }
        files
            .iter()
            .map(|f| (f.to_string(), f.to_string()))
            .collect()
    }
    fn run(&self, ctx: &StageContext<'_>) -> Result<serde_json::Value, StageError> {
        let weights: PathBuf = if self.lora {
            let (mut model, _) = load_base(ctx, self.model_stage)?;
            lora::load_adapter_files(
                &mut model,
                ADAPTER_CONFIG.path(ctx)?,
                ADAPTER_WEIGHTS.path(ctx)?,
            )
            .map_err(model_error)?;
            lora::merge(&mut model).map_err(model_error)?;
            model::save_safetensors(&model.named_tensors(), &ctx.output("model.safetensors"))
                .map_err(model_error)?;
            ctx.output("model.safetensors")
        } else {
            let trained = TRAINED_WEIGHTS.path(ctx)?;
            copy(trained, &ctx.output("model.safetensors"))?;
            ctx.output("model.safetensors")
        };
        for file in ["config.json", "generation_config.json", "tokenizer.json"] {
            match self.model_stage.file(file).path(ctx) {
                Ok(from) => {
                    copy(from, &ctx.output(file))?;
                }
                Err(_) if file == "generation_config.json" => {}
                Err(e) => return Err(e),
            }
        }
        let base = ctx
            .input(self.model_stage.name(), "tokenizer_config.json")
            .ok();
        let chat = match &self.chat {
            Some(chat) => {
                let tokenizer = tokenizers::Tokenizer::from_file(ctx.output("tokenizer.json"))
                    .map_err(|e| StageError::failed(format!("cannot load the tokenizer: {e}")))?;
                let spec = ChatSpec::resolve(ctx, self.model_stage, chat, &tokenizer)?;
                end_turns(ctx, &spec)?;
                Some(spec)
            }
            None => None,
        };
        let mut config = tokenizer_config(
            &ctx.output("config.json"),
            &ctx.output("tokenizer.json"),
            base,
        )?;
        if let Some(spec) = &chat {
            // Where transformers (4.43 on) and transformers.js read it; and
            // a file of its own, as transformers 4.50 on saves it.
            config["chat_template"] = spec.source.clone().into();
            std::fs::write(ctx.output(CHAT_TEMPLATE_FILE), &spec.source)
                .map_err(|e| super::shared::io(&ctx.output(CHAT_TEMPLATE_FILE), e))?;
        }
        write_json(&ctx.output("tokenizer_config.json"), &config)?;
        let size = std::fs::metadata(&weights).map(|m| m.len()).unwrap_or(0);
        Ok(serde_json::json!({ "model_bytes": size }))
    }
}

/// The chat template's own file in a model folder.
pub const CHAT_TEMPLATE_FILE: &str = "chat_template.jinja";

/// A chat model ends its replies with the end-of-turn token: `config.json`'s
/// `eos_token_id` is it (and so the tokenizer config's `eos_token`), and
/// `generation_config.json` lists it first, then the ids it listed before
/// (transformers and transformers.js stop at any of them).
fn end_turns(ctx: &StageContext<'_>, spec: &ChatSpec) -> Result<(), StageError> {
    let id = spec.end_of_turn_id;
    let path = ctx.output("config.json");
    let mut config: serde_json::Value = model::read_json(&path).map_err(model_error)?;
    let before = config["eos_token_id"].clone();
    config["eos_token_id"] = id.into();
    write_json(&path, &config)?;
    let path = ctx.output("generation_config.json");
    let mut generation: serde_json::Value = if path.is_file() {
        model::read_json(&path).map_err(model_error)?
    } else {
        serde_json::json!({ "bos_token_id": config["bos_token_id"] })
    };
    let mut ids = vec![u64::from(id)];
    for old in [&generation["eos_token_id"], &before] {
        let listed: Vec<u64> = match old {
            serde_json::Value::Array(list) => list.iter().filter_map(|v| v.as_u64()).collect(),
            other => other.as_u64().into_iter().collect(),
        };
        for old in listed {
            if !ids.contains(&old) {
                ids.push(old);
            }
        }
    }
    generation["eos_token_id"] = ids.into();
    write_json(&path, &generation)
}
