//! Stage `web`: transformers.js and the ONNX Runtime Web files it loads,
//! for the output folder's `web/` (`[web] transformers_js = "bundle"`, the
//! default), so that the playground works with no network. The files are
//! fetched once from the npm registry and checked against its integrity
//! hashes ([`crate::verify::transformers_js`]); the stage's key is the
//! packages' pinned versions.

use super::shared::{WEB_FOLDER, copy, io};
use crate::engine::{Settings, Stage, StageContext, StageError, settings_of, spec_of};
use crate::verify::transformers_js;

/// The stage is its settings.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct WebStage {
    /// The npm packages and versions the files come from.
    pub library: String,
}

impl Default for WebStage {
    fn default() -> Self {
        WebStage {
            library: transformers_js::identity(),
        }
    }
}

impl Stage for WebStage {
    fn name(&self) -> &str {
        "web"
    }
    fn kind(&self) -> &'static str {
        "web"
    }
    fn version(&self) -> u32 {
        1
    }
    fn settings(&self) -> Settings {
        settings_of(self)
    }
    fn spec(&self) -> Option<serde_json::Value> {
        spec_of(self)
    }
    fn publishes(&self) -> Vec<(String, String)> {
        transformers_js::file_names()
            .map(|name| (name.to_string(), format!("{WEB_FOLDER}{name}")))
            .collect()
    }
    fn run(&self, ctx: &StageContext<'_>) -> Result<serde_json::Value, StageError> {
        let library = transformers_js::library().map_err(|e| {
            StageError::failed("cannot provide transformers.js for the page").because(e)
        })?;
        let mut bytes = 0;
        for (name, path) in library.files() {
            let to = ctx.output(name);
            // A copy: the cache must never share an inode with the tools folder.
            copy(&path, &to)?;
            bytes += std::fs::metadata(&to).map_err(|e| io(&to, e))?.len();
        }
        Ok(serde_json::json!({ "library": self.library, "bytes": bytes }))
    }
}
