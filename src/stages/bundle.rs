//! Stage `bundle`: what the output folder needs beyond the model's own
//! files: `config.json` with its `transformers.js_config` (the dtype a page
//! loads by default, which ONNX files keep their weights in external data and
//! in how many chunks) and `tokenizer_config.json`.

use std::collections::BTreeMap;

use super::export::data_inputs;
use crate::engine::{Settings, Stage, StageContext, StageError};

pub struct BundleStage {
    /// The stage whose model folder was exported.
    pub model_stage: &'static str,
    /// (stage, ONNX file name) of every dtype target.
    pub files: Vec<(String, &'static str)>,
    /// The dtype transformers.js loads when a page names none.
    pub dtype: String,
    /// The page's title (the project's name) and `[web]` defaults.
    pub title: String,
    pub web: crate::manifest::Web,
}

const PAGE: &str = include_str!("../web/index.html");

fn html_escape(text: &str) -> String {
    text.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('"', "&quot;")
}

impl BundleStage {
    /// The playground page (`index.html`): loads the folder with
    /// transformers.js and generates from a typed prompt, with tokens/s.
    fn page(&self) -> String {
        let options: String = self
            .files
            .iter()
            .filter_map(|(_, file)| crate::quant::DTYPES.iter().find(|(_, f)| f == file).map(|(d, _)| *d))
            .map(|d| format!("<option value=\"{d}\"{}>{d}</option>", if d == self.dtype { " selected" } else { "" }))
            .collect();
        PAGE.replace("{{NAME}}", &html_escape(&self.title))
            .replace("{{PROMPT}}", &html_escape(&self.web.prompt))
            .replace("{{DTYPE_OPTIONS}}", &options)
            .replace("{{MAX_NEW_TOKENS}}", &self.web.max_new_tokens.to_string())
            .replace("{{TRANSFORMERS_JS_URL}}", &serde_json::to_string(&self.web.transformers_js).expect("a string"))
    }
}

/// The default dtype among `targets`: 4-bit first (smallest, and fast in
/// WebAssembly), then 8-bit, then the first target.
pub fn default_dtype(targets: &[String]) -> String {
    ["q4", "q8", "fp32"].iter().find(|d| targets.iter().any(|t| t == *d)).map_or_else(|| targets[0].clone(), |d| d.to_string())
}

impl Stage for BundleStage {
    fn name(&self) -> &str {
        "bundle"
    }
    fn kind(&self) -> &'static str {
        "bundle"
    }
    fn version(&self) -> u32 {
        3
    }
    fn settings(&self) -> Settings {
        let mut s = Settings::new();
        s.insert("files".into(), self.files.iter().map(|(_, f)| *f).collect::<Vec<_>>().into());
        s.insert("dtype".into(), self.dtype.clone().into());
        s.insert("project.name".into(), self.title.clone().into());
        s.insert("web".into(), serde_json::to_value(&self.web).expect("serialises"));
        // The page template is data: its digest keys the stage, so editing it rebuilds the page.
        s.insert("page_template".into(), blake3::hash(PAGE.as_bytes()).to_hex().to_string().into());
        s
    }
    fn dependencies(&self) -> Vec<String> {
        let mut deps = vec![self.model_stage.to_string()];
        deps.extend(self.files.iter().map(|(stage, _)| stage.clone()));
        deps
    }
    /// The model stage publishes a `config.json` (and merge a
    /// `tokenizer_config.json`) too; these, later in the plan, replace them.
    fn publishes(&self) -> Vec<(String, String)> {
        ["config.json", "tokenizer_config.json", "index.html"].iter().map(|f| (f.to_string(), f.to_string())).collect()
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
        if !js.is_object() {
            *js = serde_json::json!({});
        }
        let js = js.as_object_mut().expect("an object");
        js.insert("dtype".into(), self.dtype.clone().into());
        if external.is_empty() {
            js.remove("use_external_data_format");
        } else {
            js.insert("use_external_data_format".into(), serde_json::to_value(&external).expect("serialises"));
        }
        super::model::write_json(&ctx.output("config.json"), &config)?;
        let tokenizer_config = super::model::tokenizer_config(ctx.input(self.model_stage, "config.json")?, ctx.input(self.model_stage, "tokenizer.json")?)?;
        super::model::write_json(&ctx.output("tokenizer_config.json"), &tokenizer_config)?;
        let page = ctx.output("index.html");
        std::fs::write(&page, self.page()).map_err(|e| super::model::io(&page, e))?;
        Ok(serde_json::json!({ "dtype": self.dtype, "external_data": external }))
    }
}
