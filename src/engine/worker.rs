//! The worker's half of a dispatched stage ([`run_described`]): it fetches
//! the inputs a description names, checks that the key it computes is the
//! key it was sent (another symb version, or another build of the
//! libraries, would write other bytes under that key), runs the stage, and
//! uploads blobs, then the record.

use std::collections::BTreeMap;
use std::time::Instant;

use super::dispatch::{Description, fetch_blob};
use super::inputs::{StageInputs, explain, join};
use super::{Reporter, Stage, StageError};
use crate::cache::{ActionRecord, Cache, Store};

/// Runs a described stage on a worker: fetches its upstream artifacts,
/// checks the key, runs it in `cache` and uploads blobs, then the record.
/// `tools` are this symb's versions, as a local build puts in every key.
pub fn run_described(
    cache: &Cache,
    store: &dyn Store,
    description: &Description,
    stage: &dyn Stage,
    tools: &BTreeMap<String, String>,
    reporter: &dyn Reporter,
) -> Result<ActionRecord, StageError> {
    let started = Instant::now();
    let mut all_tools = tools.clone();
    all_tools.extend(stage.tools());
    let inputs = StageInputs {
        kind: stage.kind().to_string(),
        version: stage.version(),
        tools: all_tools,
        settings: stage.settings(),
        files: BTreeMap::new(),
        upstream: description
            .upstream
            .iter()
            .map(|(artifact, blob)| (artifact.clone(), blob.digest.clone()))
            .collect(),
        salt: description.inputs.salt.clone(),
    };
    let key = inputs.key();
    if key != description.key {
        let why = join(
            &explain(&description.stage, &description.inputs, &inputs),
            false,
        );
        return Err(StageError::failed(format!(
            "this worker would build `{}` under another key than the build that sent it ({why}): \
                install the same symb on the workers as on the machine that builds",
            description.stage
        )));
    }
    // Already built (by a job that finished while the build looked, or by
    // an earlier run on this worker): nothing to train again.
    if !description.force
        && let Ok(Some(record)) = store.lookup(&key)
    {
        reporter.event(super::Event::StageNote {
            stage: &description.stage,
            message: "its record is already in the store: nothing to run",
        });
        return Ok(record);
    }
    let record = match cache.lookup(&key).filter(|_| !description.force) {
        Some(record) => record,
        None => {
            let mut paths = BTreeMap::new();
            for (artifact, blob) in &description.upstream {
                paths.insert(artifact.clone(), fetch_blob(cache, store, blob)?);
            }
            super::executor::run_in(cache, stage, &key, &inputs, paths, started, reporter)?
        }
    };
    super::upload::upload(cache, store, &record, &Default::default()).map_err(|e| {
        StageError::failed(format!(
            "cannot upload `{}` to the shared store",
            record.stage
        ))
        .because(e)
    })?;
    Ok(record)
}
