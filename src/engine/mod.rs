//! The build engine: a DAG of stages, content-hashed keys, an executor with
//! early cutoff, and the reasons behind every re-run. It knows nothing of
//! machine learning: a stage is anything that implements [`Stage`].
//!
//! What a stage key tracks (blake3 over the canonical JSON of [`StageInputs`]):
//!
//! | field      | what it covers                                               |
//! |------------|--------------------------------------------------------------|
//! | `kind`     | the stage kind (`corpus`, `tokenizer`, ...)                  |
//! | `version`  | the stage implementation's version, bumped when output changes |
//! | `tools`    | symb's version and the libraries that shape the output       |
//! | `settings` | every manifest setting the stage reads, canonical            |
//! | `files`    | content digests of external input files, by project path    |
//! | `upstream` | content digests of the upstream artifacts it reads          |
//! | `salt`     | a user-chosen salt for mass invalidation                     |
//!
//! Upstream artifacts enter by content, not by upstream key: a stage that
//! re-runs and writes byte-identical artifacts leaves its dependents fresh
//! (early cutoff).

mod dispatch;
mod executor;
mod inputs;
mod output;
mod plan;
mod upload;
mod worker;

pub use dispatch::{Description, Dispatch, DispatchError, Executor, Job, fetch_description};
pub use executor::{
    BuildOptions, BuildOutcome, Remote, StageOutcome, StageState, StageStatus, execute, status,
};
pub use inputs::{DirtyReason, StageInputs, explain, join};
pub use output::{
    AssembleError, Assembled, OUTPUT_MARKER, OutputCheck, OutputDrift, OutputFolder, OutputRefusal,
    OutputState, assemble_output, check_output, entries_besides_placeholders, foreign_files,
    inspect_output, mark_empty, output_drift, output_is_current, remove_owned, reusable_outputs,
};
pub use plan::{Plan, PlanError};
pub use upload::{UploadError, Uploaded, upload, upload_all};
pub use worker::run_described;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use crate::cache::CacheError;

/// Canonical settings of a stage: dotted manifest key -> value.
pub type Settings = BTreeMap<String, serde_json::Value>;

/// A file outside the cache that a stage reads.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ExternalFile {
    /// The path as shown to the user and recorded in keys: relative to the
    /// project folder, with `/` separators.
    pub label: String,
    /// The path to read.
    pub path: PathBuf,
}

/// How a stage failure maps to the exit code.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "snake_case")]
pub enum FailureClass {
    /// The stage itself failed (exit 1).
    Failed,
    /// The user's input is bad: a corpus that is not UTF-8, empty... (exit 2).
    BadInput,
    /// A verification missed its tolerance (exit 3).
    Verification,
}

/// Why a stage failed: whose fault it is, what went wrong (the cause's
/// words included), and the cause itself where there is one.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct StageError {
    pub class: FailureClass,
    pub message: String,
    /// The error that caused it (not sent between machines: a worker sends
    /// its words, in `message`).
    #[serde(skip)]
    pub source: Option<std::sync::Arc<dyn std::error::Error + Send + Sync>>,
}

impl std::fmt::Display for StageError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for StageError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.source
            .as_deref()
            .map(|e| e as &(dyn std::error::Error + 'static))
    }
}

impl StageError {
    fn new(class: FailureClass, message: String) -> Self {
        StageError {
            class,
            message,
            source: None,
        }
    }
    /// The machine failed (exit 1).
    pub fn failed(message: impl Into<String>) -> Self {
        StageError::new(FailureClass::Failed, message.into())
    }
    /// The input is wrong (exit 2).
    pub fn bad_input(message: impl Into<String>) -> Self {
        StageError::new(FailureClass::BadInput, message.into())
    }
    /// A file missed its bounds (exit 3).
    pub fn verification(message: impl Into<String>) -> Self {
        StageError::new(FailureClass::Verification, message.into())
    }
    /// The machine failed with `error`, in its own words.
    pub fn failed_from(error: impl std::error::Error + Send + Sync + 'static) -> Self {
        StageError::failed(error.to_string()).with_source(error)
    }
    /// The input is wrong, as `error` says.
    pub fn bad_input_from(error: impl std::error::Error + Send + Sync + 'static) -> Self {
        StageError::bad_input(error.to_string()).with_source(error)
    }
    /// Caused by `error`, whose words follow the message (`message: error`).
    pub fn because(mut self, error: impl std::error::Error + Send + Sync + 'static) -> Self {
        self.message = format!("{}: {error}", self.message);
        self.with_source(error)
    }
    fn with_source(mut self, error: impl std::error::Error + Send + Sync + 'static) -> Self {
        self.source = Some(std::sync::Arc::new(error));
        self
    }
}

impl From<CacheError> for StageError {
    fn from(e: CacheError) -> Self {
        StageError::failed_from(e)
    }
}

/// A stage's [`Settings`], derived from its serialised form: each field is
/// a setting named as the manifest names it, and a struct's fields one level
/// down as `section.field` (`finetune.learning_rate`). A field whose
/// serialised name starts with `@` shapes how the stage runs, not what it
/// writes (where the output folder gets a file, which upstream stage it
/// reads, whose artifacts the key holds by digest), and stays out of the key;
/// its doc says why.
pub fn settings_of(stage: &impl serde::Serialize) -> Settings {
    let value = serde_json::to_value(stage).expect("a stage's settings serialise to JSON");
    let serde_json::Value::Object(fields) = value else {
        panic!("a stage's settings serialise to a JSON object, not {value}");
    };
    let mut settings = Settings::new();
    for (name, value) in fields.into_iter().filter(|(n, _)| !n.starts_with('@')) {
        match value {
            serde_json::Value::Object(inner) => {
                for (field, value) in inner.into_iter().filter(|(n, _)| !n.starts_with('@')) {
                    settings.insert(format!("{name}.{field}"), value);
                }
            }
            value => {
                settings.insert(name, value);
            }
        }
    }
    settings
}

/// A stage's description for another machine ([`Stage::spec`]): its
/// serialised form, every field, `@` ones included.
pub fn spec_of(stage: &impl serde::Serialize) -> Option<serde_json::Value> {
    Some(serde_json::to_value(stage).expect("a stage serialises to JSON"))
}

/// One node of the build graph.
pub trait Stage: Send + Sync {
    /// The stage's name in the plan: `corpus`, `quantize.q4`.
    fn name(&self) -> &str;
    /// A stable kind name, part of the key.
    fn kind(&self) -> &'static str;
    /// The implementation version: bump it when the same inputs give other bytes.
    fn version(&self) -> u32;
    /// Every setting that changes the output, keyed by its manifest key
    /// (a stage that is its settings returns [`settings_of`] itself).
    fn settings(&self) -> Settings;
    /// Names of the stages whose artifacts this one reads.
    fn dependencies(&self) -> Vec<String> {
        Vec::new()
    }
    /// Whether it reads `artifact` of its dependency `stage`: only what it
    /// reads enters its key and its work's inputs, so a dependency's other
    /// files can change without running it again (default: all of them).
    fn reads(&self, stage: &str, artifact: &str) -> bool {
        let _ = (stage, artifact);
        true
    }
    /// External files this stage reads (resolved when the plan is made).
    fn files(&self) -> &[ExternalFile] {
        &[]
    }
    /// Versions of the libraries that shape this stage's output.
    fn tools(&self) -> BTreeMap<String, String> {
        BTreeMap::new()
    }
    /// The stage's settings in a form it can be rebuilt from on another
    /// machine (see [`Dispatch`]); `None` for a stage that only runs here.
    fn spec(&self) -> Option<serde_json::Value> {
        None
    }
    /// Artifacts copied into the output folder: (artifact name, relative path).
    fn publishes(&self) -> Vec<(String, String)> {
        Vec::new()
    }
    /// Does the work, writing artifacts through `ctx.output(name)`; returns
    /// metrics for the record.
    fn run(&self, ctx: &StageContext<'_>) -> Result<serde_json::Value, StageError>;
}

/// What the engine tells the outside world while it works.
#[derive(Debug)]
pub enum Event<'a> {
    /// Another build holds the cache lock.
    WaitingForLock,
    StageStarted {
        stage: &'a str,
        reason: &'a str,
    },
    StageProgress {
        stage: &'a str,
        done: u64,
        total: u64,
        message: &'a str,
        /// Named figures for machines (e.g. `loss`, `tokens_per_second`, `eta_s`).
        fields: &'a [(&'a str, f64)],
    },
    /// Something a running stage says once (e.g. that it resumed from a checkpoint).
    StageNote {
        stage: &'a str,
        message: &'a str,
    },
    /// A dispatched stage's job: submitted, attached to, queued, retried.
    StageJob {
        stage: &'a str,
        /// The engine's id for the job.
        job: &'a str,
        message: &'a str,
    },
    StageFinished(&'a StageOutcome),
    /// A corrupt cache entry was found and removed; the build goes on.
    CorruptBlob {
        message: &'a str,
    },
    /// The remote store failed (unreachable, refused, a corrupt object); the
    /// build goes on locally.
    RemoteWarning {
        message: &'a str,
    },
    /// What the build uploaded to the remote store, once all is sent.
    Uploaded {
        store: &'a str,
        /// Records committed there.
        records: usize,
        /// Blob bytes sent.
        bytes: u64,
        /// From the first upload's start to the last one's end.
        seconds: f64,
    },
}

/// Receives events; rendering is the CLI's business.
pub trait Reporter: Sync {
    fn event(&self, event: Event<'_>);
}

/// A reporter that ignores everything.
pub struct Silent;

impl Reporter for Silent {
    fn event(&self, _: Event<'_>) {}
}

/// What a running stage sees.
pub struct StageContext<'a> {
    stage: &'a str,
    inputs: BTreeMap<String, PathBuf>,
    files: &'a [ExternalFile],
    out_dir: &'a Path,
    checkpoints: PathBuf,
    reporter: &'a dyn Reporter,
    warnings: std::sync::Mutex<Vec<crate::cache::Warning>>,
}

impl StageContext<'_> {
    /// The path of an upstream artifact (read-only; it is a cache blob).
    pub fn input(&self, stage: &str, artifact: &str) -> Result<&Path, StageError> {
        self.inputs
            .get(&format!("{stage}/{artifact}"))
            .map(PathBuf::as_path)
            .ok_or_else(|| {
                StageError::failed(format!(
                    "stage `{}` has no input `{stage}/{artifact}`",
                    self.stage
                ))
            })
    }

    /// The external files of this stage.
    pub fn files(&self) -> &[ExternalFile] {
        self.files
    }

    /// Where to write the artifact `name`.
    pub fn output(&self, name: &str) -> PathBuf {
        self.out_dir.join(name)
    }

    /// A folder that survives a killed build, private to this stage key: a
    /// long stage keeps checkpoints here and resumes from them. It is removed
    /// once the stage's result is committed.
    pub fn checkpoint_dir(&self) -> &Path {
        &self.checkpoints
    }

    /// Reports progress (`total` 0 when unknown).
    pub fn progress(&self, done: u64, total: u64, message: &str) {
        self.progress_with(done, total, message, &[]);
    }

    /// Progress with named figures, which JSON output carries as fields.
    pub fn progress_with(&self, done: u64, total: u64, message: &str, fields: &[(&str, f64)]) {
        self.reporter.event(Event::StageProgress {
            stage: self.stage,
            done,
            total,
            message,
            fields,
        });
    }

    /// Says something once, on its own line.
    pub fn note(&self, message: &str) {
        self.reporter.event(Event::StageNote {
            stage: self.stage,
            message,
        });
    }

    /// Warns of something the user should act on: kept in the stage's
    /// record, so that the build says it again while the result is cached.
    pub fn warn(&self, code: &str, message: impl Into<String>, help: impl Into<String>) {
        self.warnings
            .lock()
            .expect("warnings lock")
            .push(crate::cache::Warning {
                code: code.to_string(),
                message: message.into(),
                help: help.into(),
            });
    }

    /// The warnings so far.
    pub fn warnings(&self) -> Vec<crate::cache::Warning> {
        self.warnings.lock().expect("warnings lock").clone()
    }
}

#[cfg(test)]
mod tests;
