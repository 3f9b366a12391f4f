//! The executor: runs ready stages in parallel on a rayon pool, serves cache
//! hits, and records why each stage ran.
//!
//! A stage becomes ready when all its dependencies have finished. It then
//! computes its key from its settings, the digests of its external files (via
//! the stat cache) and the digests of the upstream artifacts it reads. A key
//! with a committed action record whose blobs are present is a hit. A miss
//! runs the stage in a fresh work folder under the cache's `tmp/`; its files
//! are moved into the blob store and the action record is committed last.
//! A failed stage marks its dependents skipped; unrelated stages go on.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::Mutex;
use std::time::Instant;

use serde::{Deserialize, Serialize};

use super::dispatch::{Dispatch, DispatchError};
use super::inputs::{DirtyReason, StageInputs, explain, join};
use super::upload::{UPLOAD_THREADS, upload};
use super::{Event, FailureClass, Plan, Reporter, Stage, StageContext, StageError};
use crate::cache::{
    ActionRecord, BlobRef, Cache, CacheError, StatCache, Store, StoreError, fault,
    write_json_atomic,
};

/// A shared store behind the local cache: records missing here are looked
/// up there (and their blobs fetched), and what runs here is uploaded to it
/// when `write` says so.
#[derive(Clone)]
pub struct Remote {
    pub store: std::sync::Arc<dyn Store>,
    pub write: bool,
}

impl std::fmt::Debug for Remote {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Remote")
            .field("store", &self.store.describe())
            .field("write", &self.write)
            .finish()
    }
}

#[derive(Debug, Clone, Default)]
pub struct BuildOptions {
    /// The shared store, if any.
    pub remote: Option<Remote>,
    /// Worker threads for independent stages (at least 1).
    pub jobs: usize,
    /// Stages to re-run even when cached.
    pub force: BTreeSet<String>,
    /// Mixed into every key.
    pub salt: String,
    /// Tool versions that go into every key (symb's own).
    pub tools: BTreeMap<String, String>,
    /// Where dispatched stages run, if any stage is dispatched.
    pub dispatch: Option<Dispatch>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum StageStatus {
    Ran,
    Cached,
    /// Served by the remote store: its blobs were downloaded and checked.
    Fetched,
    /// Run elsewhere by the dispatch executor; its record came back through
    /// the remote store.
    Remote,
    Failed,
    Skipped,
}

#[derive(Debug, Clone)]
pub struct StageOutcome {
    pub stage: String,
    pub status: StageStatus,
    /// Why it ran, failed or was skipped; empty for a cache hit.
    pub reason: String,
    /// Why it ran (or failed while running), as data; empty otherwise.
    pub reasons: Vec<DirtyReason>,
    pub seconds: f64,
    /// Bytes downloaded, for `fetched`.
    pub fetched_bytes: u64,
    /// The record of the artifacts, for `ran` and `cached`.
    pub record: Option<ActionRecord>,
    pub error: Option<StageError>,
    /// The dispatch engine's id of the job that ran it, for `remote` (and a
    /// failed dispatched stage).
    pub job: Option<String>,
}

#[derive(Debug)]
pub struct BuildOutcome {
    /// One outcome per stage, in plan order.
    pub stages: Vec<StageOutcome>,
}

impl BuildOutcome {
    /// The worst failure class among the stages, if any failed.
    pub fn failure(&self) -> Option<FailureClass> {
        self.stages
            .iter()
            .filter_map(|s| s.error.as_ref().map(|e| e.class))
            .max()
    }

    pub fn get(&self, stage: &str) -> Option<&StageOutcome> {
        self.stages.iter().find(|s| s.stage == stage)
    }
}

/// The last inputs a stage of this project was built with.
#[derive(Debug, Serialize, Deserialize)]
struct StageRef {
    /// The key of the last successful build of the stage.
    key: String,
    /// The inputs of that key, to explain the next change.
    inputs: StageInputs,
}

struct Shared<'a> {
    plan: &'a Plan,
    cache: &'a Cache,
    stat: &'a Mutex<StatCache>,
    project: &'a str,
    options: &'a BuildOptions,
    reporter: &'a dyn Reporter,
    state: Mutex<Schedule>,
    /// Records to upload to the remote, in the background.
    uploads: Mutex<Option<std::sync::mpsc::Sender<Upload>>>,
    /// Blobs the remote served with bytes that are not their digest's: the
    /// stage that then runs here replaces them.
    remote_corrupt: Mutex<BTreeSet<String>>,
    /// Set when the remote failed to answer: the rest of the build does not
    /// ask it again (one warning, not one wait per stage).
    remote_down: std::sync::atomic::AtomicBool,
    /// Blobs whose bytes this build has hashed already (written by one of its
    /// stages, or checked before an earlier stage read them): each blob is
    /// re-hashed at most once a build, not once per stage that reads it.
    known_good: Mutex<BTreeSet<String>>,
}

impl Shared<'_> {
    /// [`Cache::check_blob`], once a build for each blob.
    fn check_once(&self, blob: &BlobRef) -> Result<(), CacheError> {
        if self
            .known_good
            .lock()
            .expect("known-good lock")
            .contains(&blob.digest)
        {
            return Ok(());
        }
        self.cache.check_blob(blob)?;
        self.known_good
            .lock()
            .expect("known-good lock")
            .insert(blob.digest.clone());
        Ok(())
    }
}

impl<'a> Shared<'a> {
    fn new(
        plan: &'a Plan,
        cache: &'a Cache,
        stat: &'a Mutex<StatCache>,
        project: &'a str,
        options: &'a BuildOptions,
        reporter: &'a dyn Reporter,
    ) -> Self {
        let waiting_on = plan
            .stages()
            .map(|s| (s.name().to_string(), s.dependencies().len()))
            .collect();
        Shared {
            plan,
            cache,
            stat,
            project,
            options,
            reporter,
            state: Mutex::new(Schedule {
                waiting_on,
                outcomes: BTreeMap::new(),
            }),
            uploads: Mutex::new(None),
            remote_corrupt: Default::default(),
            remote_down: Default::default(),
            known_good: Default::default(),
        }
    }
}

struct Schedule {
    waiting_on: BTreeMap<String, usize>,
    outcomes: BTreeMap<String, StageOutcome>,
}

/// Runs the plan. Stage failures are in the outcome; an `Err` is returned
/// only for failures of the cache itself.
pub fn execute(
    plan: &Plan,
    cache: &Cache,
    stat: &Mutex<StatCache>,
    project: &str,
    options: &BuildOptions,
    reporter: &dyn Reporter,
) -> Result<BuildOutcome, CacheError> {
    let shared = Shared::new(plan, cache, stat, project, options, reporter);
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(options.jobs.max(1))
        .thread_name(|i| format!("symb-stage-{i}"))
        .build()
        .map_err(|e| CacheError::io("rayon thread pool", std::io::Error::other(e)))?;
    let roots: Vec<String> = plan
        .stages()
        .filter(|s| s.dependencies().is_empty())
        .map(|s| s.name().to_string())
        .collect();
    std::thread::scope(|threads| {
        // What runs is uploaded beside the build, by a few threads (each
        // waits on its own request): a stage's dependents start at once;
        // the build returns when all is uploaded. Records found in the local
        // cache go too when the remote lacks them (a build killed before it
        // uploaded, or a remote that was down): one HEAD each.
        if let Some(remote) = options.remote.as_ref().filter(|r| r.write) {
            let (sender, receiver) = std::sync::mpsc::channel::<Upload>();
            *shared.uploads.lock().expect("uploads lock") = Some(sender);
            let receiver = Mutex::new(receiver);
            let totals = Mutex::new(UploadTotals::default());
            let shared = &shared;
            threads.spawn(move || {
                std::thread::scope(|uploaders| {
                    for _ in 0..UPLOAD_THREADS {
                        uploaders.spawn(|| {
                            upload_loop(shared, remote.store.as_ref(), &receiver, &totals)
                        });
                    }
                });
                let totals = totals.into_inner().expect("upload totals lock");
                if totals.records > 0 {
                    let seconds = totals.started.map_or(0.0, |t| t.elapsed().as_secs_f64());
                    reporter.event(Event::Uploaded {
                        store: &remote.store.describe(),
                        records: totals.records,
                        bytes: totals.bytes,
                        seconds,
                    });
                }
            });
        }
        pool.scope(|scope| {
            for root in roots {
                spawn(scope, &shared, root);
            }
        });
        // Closing the channel lets the uploader finish; the scope joins it.
        shared.uploads.lock().expect("uploads lock").take();
    });
    let Schedule { mut outcomes, .. } = shared
        .state
        .into_inner()
        .expect("no worker panicked holding the lock");
    let stages = plan
        .names()
        .into_iter()
        .map(|n| outcomes.remove(n).expect("every stage finished"))
        .collect();
    Ok(BuildOutcome { stages })
}

fn spawn<'s>(scope: &rayon::Scope<'s>, shared: &'s Shared<'s>, name: String) {
    scope.spawn(move |scope| {
        let stage = shared
            .plan
            .stage(&name)
            .expect("scheduled stages are in the plan");
        let outcome = run_stage(shared, stage);
        shared.reporter.event(Event::StageFinished(&outcome));
        let ready: Vec<String> = {
            let mut state = shared.state.lock().expect("schedule lock");
            state.outcomes.insert(name.clone(), outcome);
            let mut ready = Vec::new();
            for dependent in shared.plan.dependents(&name) {
                let count = state
                    .waiting_on
                    .get_mut(dependent)
                    .expect("dependents are in the plan");
                *count -= 1;
                if *count == 0 {
                    ready.push(dependent.to_string());
                }
            }
            ready
        };
        for next in ready {
            spawn(scope, shared, next);
        }
    });
}

fn outcome(
    stage: &str,
    status: StageStatus,
    reason: String,
    seconds: f64,
    record: Option<ActionRecord>,
    error: Option<StageError>,
) -> StageOutcome {
    StageOutcome {
        stage: stage.to_string(),
        status,
        reason,
        reasons: Vec::new(),
        seconds,
        fetched_bytes: 0,
        record,
        error,
        job: None,
    }
}

fn run_stage(shared: &Shared<'_>, stage: &dyn Stage) -> StageOutcome {
    let name = stage.name();
    let started = Instant::now();
    // Upstream artifacts: all dependencies finished; any failure skips us.
    let mut upstream = Vec::new();
    {
        let state = shared.state.lock().expect("schedule lock");
        for dependency in stage.dependencies() {
            let done = &state.outcomes[&dependency];
            match &done.record {
                Some(record) => upstream.push(read_by(stage, record.clone())),
                None => {
                    let why = if done.status == StageStatus::Skipped {
                        "was skipped"
                    } else {
                        "failed"
                    };
                    return outcome(
                        name,
                        StageStatus::Skipped,
                        format!("upstream `{dependency}` {why}"),
                        0.0,
                        None,
                        None,
                    );
                }
            }
        }
    }
    let failed = |reason: String, error: StageError| {
        outcome(
            name,
            StageStatus::Failed,
            reason,
            started.elapsed().as_secs_f64(),
            None,
            Some(error),
        )
    };
    let mut inputs = match current_inputs(shared, stage, &upstream) {
        Ok(inputs) => inputs,
        Err(e) => return failed(String::new(), StageError::bad_input_from(e)),
    };
    let mut key = inputs.key();
    tracing::debug!(stage = name, key = %key, "computed stage key");
    let previous = load_ref(shared.cache, shared.project, name);
    let forced = shared.options.force.contains(name);
    if !forced && let Some(record) = shared.cache.lookup(&key) {
        if previous.as_ref().map(|p| &p.key) != Some(&key)
            && let Err(e) = save_ref(shared.cache, shared.project, name, &key, &inputs)
        {
            return failed(String::new(), e.into());
        }
        tracing::debug!(stage = name, "cache hit");
        shared.queue_upload(Upload::IfMissing(record.clone()));
        return outcome(
            name,
            StageStatus::Cached,
            String::new(),
            started.elapsed().as_secs_f64(),
            Some(record),
            None,
        );
    }
    if !forced
        && let Some(remote) = &shared.options.remote
        && !shared
            .remote_down
            .load(std::sync::atomic::Ordering::Relaxed)
        && let Some((record, bytes)) = fetch(shared, remote.store.as_ref(), &key)
    {
        if let Err(e) = save_ref(shared.cache, shared.project, name, &key, &inputs) {
            return failed(String::new(), e.into());
        }
        let seconds = started.elapsed().as_secs_f64();
        let done = outcome(
            name,
            StageStatus::Fetched,
            format!("from {}", remote.store.describe()),
            seconds,
            Some(record),
            None,
        );
        return StageOutcome {
            fetched_bytes: bytes,
            ..done
        };
    }
    let reasons = rerun_reasons(name, previous.as_ref(), &inputs, forced);
    let reason = join(&reasons, false);
    shared.reporter.event(Event::StageStarted {
        stage: name,
        reason: &reason,
    });
    let failed = |reason: String, error: StageError| StageOutcome {
        reasons: reasons.clone(),
        ..failed(reason, error)
    };
    // The upstream blobs are about to be read: re-hash them first.
    let paths = match ensure_inputs(shared, stage, &mut upstream) {
        Ok((paths, rebuilt)) => {
            if rebuilt {
                // An upstream stage was rebuilt from scratch; its bytes may differ.
                match current_inputs(shared, stage, &upstream) {
                    Ok(new) => inputs = new,
                    Err(e) => return failed(reason, StageError::bad_input_from(e)),
                }
                key = inputs.key();
                if !forced && let Some(record) = shared.cache.lookup(&key) {
                    return outcome(
                        name,
                        StageStatus::Cached,
                        String::new(),
                        started.elapsed().as_secs_f64(),
                        Some(record),
                        None,
                    );
                }
            }
            paths
        }
        Err(error) => return failed(reason, error),
    };
    if let Some(dispatch) = shared
        .options
        .dispatch
        .as_ref()
        .filter(|d| d.executor.dispatches(name))
    {
        match run_dispatched(shared, dispatch, stage, &key, &inputs, &upstream, forced) {
            Ok((record, job)) => {
                let seconds = started.elapsed().as_secs_f64();
                return StageOutcome {
                    reasons,
                    job: Some(job),
                    ..outcome(
                        name,
                        StageStatus::Remote,
                        reason,
                        seconds,
                        Some(record),
                        None,
                    )
                };
            }
            Err(DispatchError::Unreachable(message)) if dispatch.fallback_local => {
                let message = format!("{message}; `{name}` runs here instead");
                shared
                    .reporter
                    .event(Event::RemoteWarning { message: &message });
            }
            Err(DispatchError::Unreachable(message)) => {
                return failed(reason, StageError::failed(message));
            }
            Err(DispatchError::Failed(error)) => return failed(reason, error),
        }
    }
    match run_miss(shared, stage, &key, &inputs, paths, started) {
        Ok(record) => StageOutcome {
            reasons,
            ..outcome(
                name,
                StageStatus::Ran,
                reason,
                record.seconds,
                Some(record),
                None,
            )
        },
        Err(error) => failed(reason, error),
    }
}

/// The record for `key` from the remote, its blobs downloaded, checked
/// against their digests and stored locally, then the record committed here:
/// the record and the bytes fetched. Any failure is a warning and a miss.
fn fetch(shared: &Shared<'_>, remote: &dyn Store, key: &str) -> Option<(ActionRecord, u64)> {
    let warn = |message: String| {
        shared
            .reporter
            .event(Event::RemoteWarning { message: &message });
        None
    };
    let record = match remote.lookup(key) {
        Ok(Some(record)) => record,
        Ok(None) => return None,
        Err(e) => {
            shared
                .remote_down
                .store(true, std::sync::atomic::Ordering::Relaxed);
            return warn(format!(
                "the cache remote cannot be read: {e}; the build goes on locally without it"
            ));
        }
    };
    let cache = shared.cache;
    let tmp = match cache.work_dir("fetch") {
        Ok(dir) => dir,
        Err(e) => return warn(format!("cannot fetch from the cache remote: {e}")),
    };
    let mut bytes = 0;
    for blob in record.outputs.values() {
        if cache.blob_present(blob) {
            continue;
        }
        let file = tmp.path().join(&blob.digest);
        if let Err(e) = remote.get_blob(blob, &file) {
            let corrupt = matches!(e, StoreError::Corrupt { .. });
            if corrupt {
                shared
                    .remote_corrupt
                    .lock()
                    .expect("remote-corrupt lock")
                    .insert(blob.digest.clone());
            }
            let replaced = if corrupt && shared.options.remote.as_ref().is_some_and(|r| r.write) {
                ", and its bytes replace the remote's"
            } else {
                ""
            };
            return warn(format!(
                "cannot fetch `{}` from the cache remote: {e}; it runs here{replaced}",
                record.stage
            ));
        }
        match cache.put_file(&file) {
            Ok(stored) if stored == *blob => bytes += blob.size,
            Ok(_) => {
                return warn(format!(
                    "the cache remote's blob {} does not match its record; it runs here",
                    blob.digest
                ));
            }
            Err(e) => return warn(format!("cannot store a fetched blob: {e}")),
        }
    }
    if let Err(e) = cache.commit(&record) {
        return warn(format!("cannot store a fetched record: {e}"));
    }
    Some((record, bytes))
}

/// Sends a stage to the dispatch executor and fetches the record it wrote:
/// the record and the job's id.
fn run_dispatched(
    shared: &Shared<'_>,
    dispatch: &Dispatch,
    stage: &dyn Stage,
    key: &str,
    inputs: &StageInputs,
    upstream: &[ActionRecord],
    forced: bool,
) -> Result<(ActionRecord, String), DispatchError> {
    let name = stage.name();
    let Some(remote) = shared.options.remote.as_ref().filter(|r| r.write) else {
        return Err(DispatchError::Failed(StageError::failed(format!(
            "`{name}` runs on {}, which reads its inputs from the shared store: this build has no writable one",
            dispatch.executor.describe()
        ))));
    };
    let store = remote.store.as_ref();
    let job = super::dispatch::describe(shared.cache, store, stage, key, inputs, upstream, forced)
        .map_err(DispatchError::Failed)?;
    let id = dispatch.executor.run(&job, shared.reporter)?;
    match fetch(shared, store, key) {
        Some((record, _)) => {
            save_ref(shared.cache, shared.project, name, key, inputs)
                .map_err(|e| DispatchError::Failed(e.into()))?;
            Ok((record, id))
        }
        None => Err(DispatchError::Failed(StageError::failed(format!(
            "job {id} finished, but {} holds no complete record of `{name}` under its key {key}",
            store.describe()
        )))),
    }
}

/// A record for the remote.
enum Upload {
    /// A stage that ran here.
    Ran(ActionRecord),
    /// A record found in the local cache: uploaded only if the remote has
    /// none for its key.
    IfMissing(ActionRecord),
}

#[derive(Default)]
struct UploadTotals {
    records: usize,
    bytes: u64,
    /// When the first upload began.
    started: Option<Instant>,
}

impl Shared<'_> {
    fn queue_upload(&self, upload: Upload) {
        if let Some(uploads) = self.uploads.lock().expect("uploads lock").as_ref() {
            let _ = uploads.send(upload);
        }
    }
}

/// One uploading thread: takes records until the build closes the queue.
/// The first failure marks the remote down (one warning; the rest is not
/// tried, and the next build uploads what this one could not).
fn upload_loop(
    shared: &Shared<'_>,
    remote: &dyn Store,
    queue: &Mutex<std::sync::mpsc::Receiver<Upload>>,
    totals: &Mutex<UploadTotals>,
) {
    use std::sync::atomic::Ordering;
    loop {
        let next = queue.lock().expect("upload queue lock").recv();
        let Ok(job) = next else { return };
        if shared.remote_down.load(Ordering::Relaxed) {
            continue;
        }
        let started = Instant::now();
        let (record, check) = match job {
            Upload::Ran(record) => (record, false),
            Upload::IfMissing(record) => (record, true),
        };
        let result = (|| {
            if check && remote.has_record(&record.key)? {
                return Ok(None);
            }
            let replace = shared
                .remote_corrupt
                .lock()
                .expect("remote-corrupt lock")
                .clone();
            upload(shared.cache, remote, &record, &replace).map(Some)
        })();
        match result {
            Ok(None) => {}
            Ok(Some(done)) => {
                for digest in &done.replaced {
                    let message = format!(
                        "the cache remote held other bytes under the blob {digest} of `{}` \
                            (corrupt); replaced with this build's",
                        record.stage
                    );
                    shared
                        .reporter
                        .event(Event::RemoteWarning { message: &message });
                }
                let mut totals = totals.lock().expect("upload totals lock");
                totals.records += 1;
                totals.bytes += done.bytes;
                totals.started = Some(totals.started.map_or(started, |t| t.min(started)));
            }
            Err(e) => {
                if !shared.remote_down.swap(true, Ordering::Relaxed) {
                    let message = format!(
                        "cannot upload `{}` to the cache remote: {e}; the build goes on without it \
                            (the next build uploads it)",
                        record.stage
                    );
                    shared
                        .reporter
                        .event(Event::RemoteWarning { message: &message });
                }
            }
        }
    }
}

/// Why a stage whose key missed the cache must run.
fn rerun_reasons(
    name: &str,
    previous: Option<&StageRef>,
    inputs: &StageInputs,
    forced: bool,
) -> Vec<DirtyReason> {
    if forced {
        return vec![DirtyReason::Forced];
    }
    let Some(previous) = previous else {
        return vec![DirtyReason::NoPreviousBuild];
    };
    let reasons = explain(name, &previous.inputs, inputs);
    if reasons.is_empty() {
        vec![DirtyReason::CachedResultMissing]
    } else {
        reasons
    }
}

/// `record` with only the outputs `stage` reads.
fn read_by(stage: &dyn Stage, mut record: ActionRecord) -> ActionRecord {
    record
        .outputs
        .retain(|artifact, _| stage.reads(&record.stage, artifact));
    record
}

/// Re-hashes every upstream blob `stage` is about to read. A corrupt blob is
/// deleted and its producer rebuilt (recursively), so corrupt bytes are never
/// served. Returns the blob paths by `stage/artifact`, and whether anything
/// was rebuilt.
fn ensure_inputs(
    shared: &Shared<'_>,
    stage: &dyn Stage,
    upstream: &mut [ActionRecord],
) -> Result<(BTreeMap<String, PathBuf>, bool), StageError> {
    let mut rebuilt = false;
    for record in upstream.iter_mut() {
        let corrupt = record
            .outputs
            .values()
            .find_map(|blob| shared.check_once(blob).err());
        if let Some(error) = corrupt {
            let message = format!("{error}; rebuilding `{}`", record.stage);
            shared
                .reporter
                .event(Event::CorruptBlob { message: &message });
            *record = read_by(stage, rebuild(shared, &record.stage)?);
            rebuilt = true;
        }
    }
    let paths = upstream
        .iter()
        .flat_map(|r| {
            r.outputs.iter().map(move |(artifact, blob)| {
                (
                    format!("{}/{artifact}", r.stage),
                    shared.cache.blob_path(&blob.digest),
                )
            })
        })
        .collect();
    Ok((paths, rebuilt))
}

/// Runs a finished stage again because one of its blobs was found corrupt.
fn rebuild(shared: &Shared<'_>, name: &str) -> Result<ActionRecord, StageError> {
    let stage = shared
        .plan
        .stage(name)
        .expect("records name stages of the plan");
    let mut upstream: Vec<ActionRecord> = {
        let state = shared.state.lock().expect("schedule lock");
        stage
            .dependencies()
            .iter()
            .map(|d| {
                read_by(
                    stage,
                    state.outcomes[d]
                        .record
                        .clone()
                        .expect("a finished upstream has a record"),
                )
            })
            .collect()
    };
    let (paths, _) = ensure_inputs(shared, stage, &mut upstream)?;
    let inputs = current_inputs(shared, stage, &upstream).map_err(StageError::bad_input_from)?;
    let record = run_miss(shared, stage, &inputs.key(), &inputs, paths, Instant::now())?;
    if let Some(done) = shared
        .state
        .lock()
        .expect("schedule lock")
        .outcomes
        .get_mut(name)
    {
        done.record = Some(record.clone());
    }
    Ok(record)
}

fn current_inputs(
    shared: &Shared<'_>,
    stage: &dyn Stage,
    upstream: &[ActionRecord],
) -> Result<StageInputs, CacheError> {
    let mut files = BTreeMap::new();
    {
        let mut stat = shared.stat.lock().expect("stat cache lock");
        for file in stage.files() {
            files.insert(file.label.clone(), stat.digest(&file.path)?);
        }
    }
    let mut tools = shared.options.tools.clone();
    tools.extend(stage.tools());
    let upstream = upstream
        .iter()
        .flat_map(|r| {
            r.outputs.iter().map(move |(artifact, blob)| {
                (format!("{}/{artifact}", r.stage), blob.digest.clone())
            })
        })
        .collect();
    Ok(StageInputs {
        kind: stage.kind().to_string(),
        version: stage.version(),
        tools,
        settings: stage.settings(),
        files,
        upstream,
        salt: shared.options.salt.clone(),
    })
}

/// Runs a stage in a fresh work folder, stores its files as blobs and
/// commits the action record (last).
fn run_miss(
    shared: &Shared<'_>,
    stage: &dyn Stage,
    key: &str,
    inputs: &StageInputs,
    input_paths: BTreeMap<String, PathBuf>,
    started: Instant,
) -> Result<ActionRecord, StageError> {
    let record = run_in(
        shared.cache,
        stage,
        key,
        inputs,
        input_paths,
        started,
        shared.reporter,
    )?;
    // `put_file` hashed these bytes as it stored them.
    shared
        .known_good
        .lock()
        .expect("known-good lock")
        .extend(record.outputs.values().map(|b| b.digest.clone()));
    save_ref(shared.cache, shared.project, stage.name(), key, inputs)?;
    shared.queue_upload(Upload::Ran(record.clone()));
    Ok(record)
}

/// [`run_miss`] without a project: what a worker runs.
pub(super) fn run_in(
    cache: &Cache,
    stage: &dyn Stage,
    key: &str,
    inputs: &StageInputs,
    input_paths: BTreeMap<String, PathBuf>,
    started: Instant,
    reporter: &dyn Reporter,
) -> Result<ActionRecord, StageError> {
    let work = cache.work_dir(stage.name())?;
    let checkpoints = cache.checkpoint_dir(key);
    let ctx = StageContext {
        stage: stage.name(),
        inputs: input_paths,
        files: stage.files(),
        out_dir: work.path(),
        checkpoints: checkpoints.clone(),
        reporter,
        warnings: Default::default(),
    };
    let _span = tracing::info_span!("stage", name = stage.name()).entered();
    let metrics = stage.run(&ctx);
    // What the stage freed goes back to the system before the next stage
    // starts, or a build of several stages peaks at their sum.
    release_freed_memory();
    let metrics = metrics?;
    tracing::debug!(seconds = started.elapsed().as_secs_f64(), "ran");
    let mut produced: Vec<PathBuf> = std::fs::read_dir(work.path())
        .map_err(|e| CacheError::io(work.path(), e))?
        .map(|entry| entry.map(|e| e.path()))
        .collect::<Result<_, _>>()
        .map_err(|e| CacheError::io(work.path(), e))?;
    produced.sort();
    let mut outputs = BTreeMap::new();
    for path in produced {
        let artifact = path
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or_default()
            .to_string();
        outputs.insert(artifact, cache.put_file(&path)?);
    }
    let record = ActionRecord {
        key: key.to_string(),
        stage: stage.name().to_string(),
        inputs: serde_json::to_value(inputs).expect("inputs serialise"),
        outputs,
        metrics,
        seconds: started.elapsed().as_secs_f64(),
        warnings: ctx.warnings(),
    };
    tracing::debug!(
        seconds = started.elapsed().as_secs_f64(),
        "stored the artifacts"
    );
    fault::point(&format!("after-blobs:{}", stage.name()));
    cache.commit(&record)?;
    fault::point(&format!("after-record:{}", stage.name()));
    if checkpoints.exists() {
        let _ = std::fs::remove_dir_all(&checkpoints);
    }
    tracing::debug!(
        stage = stage.name(),
        key,
        artifacts = record.outputs.len(),
        "committed action record"
    );
    Ok(record)
}

fn ref_path(cache: &Cache, project: &str, stage: &str) -> std::path::PathBuf {
    cache.refs_dir(project).join(format!("{stage}.json"))
}

fn load_ref(cache: &Cache, project: &str, stage: &str) -> Option<StageRef> {
    let bytes = std::fs::read(ref_path(cache, project, stage)).ok()?;
    serde_json::from_slice(&bytes).ok()
}

fn save_ref(
    cache: &Cache,
    project: &str,
    stage: &str,
    key: &str,
    inputs: &StageInputs,
) -> Result<(), CacheError> {
    let reference = StageRef {
        key: key.to_string(),
        inputs: inputs.clone(),
    };
    write_json_atomic(
        &ref_path(cache, project, stage),
        &reference,
        &cache.tmp_dir(),
    )
}

/// Freshness of one stage without running anything.
#[derive(Debug, Clone, Serialize)]
pub struct StageState {
    pub stage: String,
    pub fresh: bool,
    /// Why it would run; empty when fresh.
    pub reason: String,
    /// The same, as data.
    pub reasons: Vec<DirtyReason>,
    /// Its key, when its inputs are known (it is fresh, or stale with fresh
    /// upstream stages): what `gc` keeps, checkpoints of a stage that was
    /// interrupted included.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
}

/// What `build` would do, and why, without running a stage.
pub fn status(
    plan: &Plan,
    cache: &Cache,
    stat: &Mutex<StatCache>,
    project: &str,
    options: &BuildOptions,
) -> Result<Vec<StageState>, CacheError> {
    let shared = Shared::new(plan, cache, stat, project, options, &super::Silent);
    let mut known: BTreeMap<String, Option<ActionRecord>> = BTreeMap::new();
    let mut states = Vec::new();
    for stage in plan.stages() {
        let name = stage.name();
        let previous = load_ref(cache, project, name);
        let stale_upstream: Vec<String> = stage
            .dependencies()
            .into_iter()
            .filter(|d| known[d].is_none())
            .collect();
        let upstream: Vec<ActionRecord> = stage
            .dependencies()
            .iter()
            .filter_map(|d| known[d].clone().map(|r| read_by(stage, r)))
            .collect();
        let mut inputs = current_inputs(&shared, stage, &upstream)?;
        let mut key = None;
        let (fresh, reasons, record) = if stale_upstream.is_empty() {
            let current = inputs.key();
            let forced = options.force.contains(name);
            let found = cache.lookup(&current);
            key = Some(current);
            match found {
                Some(record) if !forced => (true, Vec::new(), Some(record)),
                _ => (
                    false,
                    rerun_reasons(name, previous.as_ref(), &inputs, forced),
                    None,
                ),
            }
        } else {
            // Compare our own inputs only: upstream artifacts are not known yet.
            let mut reasons = Vec::new();
            if let Some(p) = &previous {
                for (artifact, digest) in &p.inputs.upstream {
                    let producer = artifact.split('/').next().unwrap_or_default();
                    if stale_upstream.iter().any(|s| s == producer) {
                        inputs.upstream.insert(artifact.clone(), digest.clone());
                    }
                }
                reasons = explain(name, &p.inputs, &inputs);
            }
            reasons.extend(
                stale_upstream
                    .iter()
                    .map(|s| DirtyReason::UpstreamStale { stage: s.clone() }),
            );
            (false, reasons, None)
        };
        known.insert(name.to_string(), record);
        states.push(StageState {
            stage: name.to_string(),
            fresh,
            reason: join(&reasons, false),
            reasons,
            key,
        });
    }
    Ok(states)
}

/// Returns the memory the allocator holds free to the system. A stage may
/// ask glibc's malloc to keep what it frees (training does, to reuse it step
/// after step), and blocks below the mmap threshold stay in its arenas anyway:
/// without this, a build of export plus four quantizers peaked at 1.5 GB
/// where its largest stage alone takes 1.07 GB. A no-op elsewhere.
fn release_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        unsafe extern "C" {
            fn malloc_trim(pad: usize) -> std::ffi::c_int;
        }
        // SAFETY: malloc_trim only hands free pages back; it takes no pointer.
        unsafe {
            malloc_trim(0);
        }
    }
}
