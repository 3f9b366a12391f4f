//! Stage `verify.tokenizer`: the tokenizer checked where it runs. The
//! output folder's `tokenizer.json` and `tokenizer_config.json` are loaded
//! by transformers.js (the build a page loads, run in Node as a page runs
//! it: `AutoTokenizer.from_pretrained`), which tokenizes the eval lines,
//! an English sample and the prompts `verify.prompts` lists; any line whose
//! ids differ from symb's fails the build (exit 3), naming the lines, and
//! the output folder keeps its previous state. Without Node the check is
//! skipped, and says so.
//!
//! `tokenizer_config.json` is the one the bundle ships, made here by the
//! same function from the same files: depending on the bundle would check
//! again whenever the page or the card changes.

use std::path::PathBuf;
use std::process::{Command, Stdio};

use super::shared::{
    Artifact, EVAL, ModelStage, io, on_path, tokenized_lines, tokenizer_config,
    tokenizer_differences, write_json, writers,
};
use crate::engine::{Settings, Stage, StageContext, StageError, settings_of, spec_of};
use crate::manifest::RawPrompts;
use crate::verify::transformers_js;

/// The script Node runs.
const SCRIPT: &str = include_str!("../web/tokenize.mjs");

/// The stage is its settings.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct VerifyTokenizerStage {
    /// The transformers.js that tokenizes (npm packages and versions).
    pub library: String,
    /// The script that drives it: editing it checks again.
    pub script: String,
    /// The prompts `verify.prompts` lists (none when it counts them: they
    /// are eval lines).
    pub prompts: Vec<String>,
    /// The stage whose tokenizer the folder has (`merge`, `vocab` or
    /// `base`): its artifacts are keyed by digest.
    #[serde(rename = "@model_stage")]
    pub model_stage: ModelStage,
    /// Whether the build has a corpus, whose eval lines are tokenized: the
    /// eval split is an input, keyed by digest.
    #[serde(rename = "@corpus")]
    pub corpus: bool,
}

impl VerifyTokenizerStage {
    pub fn new(model_stage: ModelStage, corpus: bool, prompts: &RawPrompts) -> Self {
        VerifyTokenizerStage {
            library: transformers_js::identity(),
            script: blake3::hash(SCRIPT.as_bytes()).to_hex().to_string(),
            prompts: match prompts {
                RawPrompts::List(list) => list.clone(),
                RawPrompts::Count(_) => Vec::new(),
            },
            model_stage,
            corpus,
        }
    }

    /// What it reads: the model's config and tokenizer (and its
    /// `tokenizer_config.json` where it has one), the eval split.
    fn inputs(&self) -> Vec<Artifact> {
        let mut inputs = vec![
            self.model_stage.file("config.json"),
            self.model_stage.file("tokenizer.json"),
        ];
        if self.corpus {
            inputs.push(EVAL);
        }
        inputs
    }
}

/// Node: `$NODE`, or `node` on the PATH.
fn node() -> Option<PathBuf> {
    if let Some(path) = std::env::var_os("NODE").filter(|p| !p.is_empty()) {
        return Some(PathBuf::from(path));
    }
    on_path(&["node"])
}

/// Node's version (`v22.11.0`), or `None` where it does not run.
fn node_version() -> Option<String> {
    let out = Command::new(node()?)
        .arg("--version")
        .stderr(Stdio::null())
        .output()
        .ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
}

impl Stage for VerifyTokenizerStage {
    fn name(&self) -> &str {
        "verify.tokenizer"
    }
    fn kind(&self) -> &'static str {
        "verify_tokenizer"
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
    fn dependencies(&self) -> Vec<String> {
        writers(&self.inputs())
    }
    /// Node's version: installing Node (or another one) checks again.
    fn tools(&self) -> std::collections::BTreeMap<String, String> {
        [(
            "node".to_string(),
            node_version().unwrap_or_else(|| "missing".to_string()),
        )]
        .into()
    }
    fn publishes(&self) -> Vec<(String, String)> {
        vec![(
            "report.json".to_string(),
            "reports/verify.tokenizer.json".to_string(),
        )]
    }
    fn run(&self, ctx: &StageContext<'_>) -> Result<serde_json::Value, StageError> {
        let lines = tokenized_lines(ctx, self.corpus, &self.prompts)?;
        let report = ctx.output("report.json");
        let Some(version) = node_version() else {
            tracing::warn!(
                "verify.tokenizer: no Node.js (`$NODE`, or `node` on the PATH): the tokenizer \
                was not checked in transformers.js; install Node to check it"
            );
            let summary = serde_json::json!({
                "checked": false,
                "reason": "no Node.js (`$NODE`, or `node` on the PATH)",
                "lines": lines.len(),
            });
            write_json(&report, &summary)?;
            return Ok(summary);
        };
        let library = transformers_js::library().map_err(|e| {
            StageError::failed("cannot provide transformers.js for the tokenizer check").because(e)
        })?;
        // The folder transformers.js reads: the files the output folder ships.
        let work = tempfile::tempdir().map_err(|e| io(std::env::temp_dir().as_path(), e))?;
        let folder = work.path();
        let tokenizer_path = self.model_stage.file("tokenizer.json").path(ctx)?;
        super::shared::copy(tokenizer_path, &folder.join("tokenizer.json"))?;
        let shipped = tokenizer_config(
            self.model_stage.file("config.json").path(ctx)?,
            tokenizer_path,
            self.model_stage.optional_file(ctx, "tokenizer_config.json"),
        )?;
        write_json(&folder.join("tokenizer_config.json"), &shipped)?;
        let (script, lines_file) = (folder.join("tokenize.mjs"), folder.join("lines.json"));
        std::fs::write(&script, SCRIPT).map_err(|e| io(&script, e))?;
        write_json(&lines_file, &serde_json::json!(lines))?;
        let node = node().unwrap_or_else(|| PathBuf::from("node"));
        let out = Command::new(&node)
            .arg(&script)
            .arg(library.script())
            .arg(folder)
            .arg(&lines_file)
            .stdin(Stdio::null())
            .output()
            .map_err(|e| {
                StageError::failed(format!("cannot run `{}`", node.display())).because(e)
            })?;
        let posted: serde_json::Value = serde_json::from_slice(&out.stdout).map_err(|e| {
            StageError::failed(format!(
                "Node {version} ran the tokenizer check and printed no result (exit {}): {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            ))
            .because(e)
        })?;
        let tokenizer = tokenizers::Tokenizer::from_file(tokenizer_path)
            .map_err(|e| StageError::failed(format!("cannot load the tokenizer: {e}")))?;
        let (differing, problems) = tokenizer_differences(&tokenizer, &lines, &posted, 5)?;
        let summary = serde_json::json!({
            "checked": true,
            "node": version,
            "library": self.library,
            "lines": lines.len(),
            "differing_lines": differing,
        });
        write_json(&report, &summary)?;
        if !problems.is_empty() {
            return Err(StageError::verification(format!(
                "the output folder's tokenizer does not tokenize as symb's in transformers.js \
                (Node {version}, {}):\n{}",
                self.library,
                problems.join("\n")
            )));
        }
        Ok(summary)
    }
}
