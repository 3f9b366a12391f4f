//! The executor seam: a stage runs here, or is dispatched to an engine that
//! runs it elsewhere (a Ray cluster). The engine's part is the same for every
//! such engine: it puts the stage's inputs and a self-contained description
//! of the stage in the shared store, hands the executor a [`Job`], and waits
//! for one thing: the record for the stage's key now exists in the store.
//! It then fetches that record as it fetches any other, so a dispatched stage
//! has the same key, the same early cutoff and the same output as a local run.
//!
//! The worker's half is in `worker.rs`.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use super::inputs::StageInputs;
use super::{Reporter, Stage, StageError};
use crate::cache::{ActionRecord, BlobRef, Cache, Store};

/// What the engine hands an executor: one stage to run.
#[derive(Debug, Clone)]
pub struct Job {
    /// The stage's name in the plan (`finetune`).
    pub stage: String,
    /// The key its record must be committed under.
    pub key: String,
    /// The [`Description`] blob, in the store.
    pub description: BlobRef,
}

/// Why a dispatched stage did not produce its record.
#[derive(Debug, Clone, thiserror::Error)]
pub enum DispatchError {
    /// The engine could not be reached: nothing was started. With a local
    /// fallback the stage runs here instead.
    #[error("{0}")]
    Unreachable(String),
    /// The job ran and failed, or was stopped.
    #[error("{0}")]
    Failed(StageError),
}

/// An engine that runs stages elsewhere.
pub trait Executor: Send + Sync {
    /// Where stages go, for messages (`Ray at http://…:8265`), no credentials.
    fn describe(&self) -> String;
    /// Whether the stage of this name is dispatched.
    fn dispatches(&self, stage: &str) -> bool;
    /// Runs the job, reporting its state and progress as events of the
    /// stage, and returns the engine's id for the job once it succeeded
    /// (its record is then in the store).
    fn run(&self, job: &Job, reporter: &dyn Reporter) -> Result<String, DispatchError>;
}

/// The executor of a build, and what happens when it cannot be reached.
#[derive(Clone)]
pub struct Dispatch {
    pub executor: Arc<dyn Executor>,
    /// Run the stage here when the engine is unreachable (with a warning).
    pub fallback_local: bool,
}

impl std::fmt::Debug for Dispatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Dispatch")
            .field("executor", &self.executor.describe())
            .field("fallback_local", &self.fallback_local)
            .finish()
    }
}

/// Everything a worker needs to run one stage, with no manifest and no
/// project folder: the stage's own description (its kind and settings, as
/// the stage writes them in [`Stage::spec`]) and, by digest, every byte it
/// reads. Stored as a JSON blob; its digest is the job's only argument.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Description {
    /// The format of this description.
    pub format: u32,
    pub stage: String,
    pub kind: String,
    /// The stage's settings in its own form.
    pub spec: serde_json::Value,
    /// The key the record must be committed under.
    pub key: String,
    /// The inputs that key was computed from (to explain a mismatch).
    pub inputs: StageInputs,
    /// `stage/artifact` -> blob, for each upstream artifact: all it reads
    /// (a stage that reads files of the project is not sent).
    pub upstream: BTreeMap<String, BlobRef>,
    /// Run even when the store has a record for the key (`--force`).
    #[serde(default)]
    pub force: bool,
}

pub const DESCRIPTION_FORMAT: u32 = 1;

/// Puts a stage's inputs and description in the store; returns the job.
pub(super) fn describe(
    cache: &Cache,
    store: &dyn Store,
    stage: &dyn Stage,
    key: &str,
    inputs: &StageInputs,
    upstream: &[ActionRecord],
    force: bool,
) -> Result<Job, StageError> {
    let name = stage.name();
    let send_error = |e: &dyn std::fmt::Display| {
        StageError::failed(format!(
            "cannot send the inputs of `{name}` through the shared store: {e}"
        ))
    };
    let spec = stage.spec().ok_or_else(|| {
        StageError::failed(format!(
            "`{name}` cannot run elsewhere: it has no description to send"
        ))
    })?;
    if let Some(file) = stage.files().first() {
        return Err(StageError::failed(format!(
            "`{name}` reads `{}` from the project folder, which a worker does not have: it cannot run elsewhere",
            file.label
        )));
    }
    for record in upstream {
        super::upload::upload(cache, store, record, &Default::default())
            .map_err(|e| send_error(&e))?;
    }
    let work = cache.work_dir("dispatch")?;
    let upstream = upstream
        .iter()
        .flat_map(|r| {
            r.outputs
                .iter()
                .map(move |(artifact, blob)| (format!("{}/{artifact}", r.stage), blob.clone()))
        })
        .collect();
    let description = Description {
        format: DESCRIPTION_FORMAT,
        stage: name.to_string(),
        kind: stage.kind().to_string(),
        spec,
        key: key.to_string(),
        inputs: inputs.clone(),
        upstream,
        force,
    };
    let path = work.path().join("description.json");
    std::fs::write(
        &path,
        serde_json::to_vec_pretty(&description).expect("descriptions serialise"),
    )
    .map_err(|e| StageError::failed(format!("cannot write `{}`", path.display())).because(e))?;
    let blob = cache.put_file(&path)?;
    put(cache, store, &blob).map_err(|e| send_error(&e))?;
    Ok(Job {
        stage: name.to_string(),
        key: key.to_string(),
        description: blob,
    })
}

fn put(cache: &Cache, store: &dyn Store, blob: &BlobRef) -> Result<(), crate::cache::StoreError> {
    let path = cache.blob_path(&blob.digest);
    if store.blob_state(blob, &path)? != crate::cache::Held::Same {
        store.put_blob(blob, &path)?;
    }
    Ok(())
}

/// A blob of the store, in the local cache (fetched and checked when absent).
pub(super) fn fetch_blob(
    cache: &Cache,
    store: &dyn Store,
    blob: &BlobRef,
) -> Result<PathBuf, StageError> {
    if !cache.blob_present(blob) {
        let work = cache.work_dir("fetch")?;
        let file = work.path().join(&blob.digest);
        store.get_blob(blob, &file).map_err(|e| {
            StageError::failed(format!(
                "cannot fetch {} from the cache remote",
                blob.digest
            ))
            .because(e)
        })?;
        let stored = cache.put_file(&file)?;
        if stored != *blob {
            return Err(StageError::failed(format!(
                "the cache remote's blob {} does not match its name",
                blob.digest
            )));
        }
    }
    Ok(cache.blob_path(&blob.digest))
}

/// The worker's first step: the description in the blob `blob` of the store.
pub fn fetch_description(
    cache: &Cache,
    store: &dyn Store,
    blob: &BlobRef,
) -> Result<Description, StageError> {
    let path = fetch_blob(cache, store, blob)?;
    let bytes = std::fs::read(&path)
        .map_err(|e| StageError::failed(format!("cannot read `{}`", path.display())).because(e))?;
    let description: Description = serde_json::from_slice(&bytes).map_err(|e| {
        StageError::failed(format!(
            "the job's description {} is not one this symb reads",
            blob.digest
        ))
        .because(e)
    })?;
    if description.format != DESCRIPTION_FORMAT {
        return Err(StageError::failed(format!(
            "the job's description has format {}; this symb reads format {DESCRIPTION_FORMAT}",
            description.format
        )));
    }
    Ok(description)
}
