//! Stage `bundle`: what the output folder needs beyond the model's own
//! files. For now `config.json` with its `transformers.js_config`: which ONNX
//! files keep their weights in external data, and in how many chunks.

use std::collections::BTreeMap;

use super::export::data_inputs;
use crate::engine::{Settings, Stage, StageContext, StageError};

pub struct BundleStage {
    /// The stage whose model folder was exported.
    pub model_stage: &'static str,
    /// (stage, ONNX file name) of every dtype target.
    pub files: Vec<(String, &'static str)>,
}

impl Stage for BundleStage {
    fn name(&self) -> &str {
        "bundle"
    }
    fn kind(&self) -> &'static str {
        "bundle"
    }
    fn version(&self) -> u32 {
        1
    }
    fn settings(&self) -> Settings {
        let mut s = Settings::new();
        s.insert("files".into(), self.files.iter().map(|(_, f)| *f).collect::<Vec<_>>().into());
        s
    }
    fn dependencies(&self) -> Vec<String> {
        let mut deps = vec![self.model_stage.to_string()];
        deps.extend(self.files.iter().map(|(stage, _)| stage.clone()));
        deps
    }
    /// The model stage publishes a `config.json` too; this one, later in the
    /// plan, replaces it.
    fn publishes(&self) -> Vec<(String, String)> {
        vec![("config.json".to_string(), "config.json".to_string())]
    }
    fn run(&self, ctx: &StageContext<'_>) -> Result<serde_json::Value, StageError> {
        let mut config: serde_json::Value = crate::model::read_json(ctx.input(self.model_stage, "config.json")?).map_err(super::model::model_error)?;
        let mut external = BTreeMap::new();
        for (stage, file) in &self.files {
            let chunks = data_inputs(ctx, stage, file).len();
            if chunks > 0 {
                external.insert(file.to_string(), chunks);
            }
        }
        let object = config.as_object_mut().ok_or_else(|| StageError::failed("the model's config.json is not an object"))?;
        let js = object.entry("transformers.js_config").or_insert_with(|| serde_json::json!({}));
        if let Some(js) = js.as_object_mut() {
            if external.is_empty() {
                js.remove("use_external_data_format");
            } else {
                js.insert("use_external_data_format".into(), serde_json::to_value(&external).expect("serialises"));
            }
        }
        if js.as_object().is_some_and(|o| o.is_empty()) {
            object.remove("transformers.js_config");
        }
        super::model::write_json(&ctx.output("config.json"), &config)?;
        Ok(serde_json::json!({ "external_data": external }))
    }
}
