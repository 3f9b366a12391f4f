//! Stage `merge`: folds the adapter into the weights: a folder Python
//! transformers loads.

use std::collections::BTreeMap;
use std::path::PathBuf;

use super::shared::{
    ADAPTER_CONFIG, ADAPTER_WEIGHTS, Artifact, ModelStage, TRAINED_WEIGHTS, copy, load_base,
    model_error, tokenizer_config, write_json, writers,
};
use crate::engine::{Settings, Stage, StageContext, StageError, settings_of, spec_of};
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
