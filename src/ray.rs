//! The Ray executor: dispatched stages run as Ray jobs, through Ray's Job
//! Submission REST API (the dashboard's `/api/jobs/`), from Rust.
//!
//! A job's entrypoint is `symb worker --store s3://… --job DIGEST:SIZE`: the
//! worker reads the stage's description and inputs from the shared store with
//! its own credentials (nothing secret is in the job), and writes the record
//! back there. Jobs are named by the stage's key and the store
//! (`symb-finetune-<key>-<store>-<n>`),
//! so a build that was killed and started again finds the job it submitted and
//! attaches to it instead of starting a second one. The worker prints one JSON
//! line per progress event (`{"symb": "progress", …}`), which the build reads
//! back from the job's logs.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::engine::{DispatchError, Event, Executor, FailureClass, Job, Reporter, StageError};
use crate::manifest::Resources;

/// The job's state is polled every `poll`; its logs every this many polls.
const LOG_EVERY: u32 = 4;

/// What the worker prints for the build to read from the job's logs, one
/// JSON object per line.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(tag = "symb", rename_all = "snake_case")]
pub enum WorkerLine {
    Progress {
        done: u64,
        total: u64,
        message: String,
        fields: BTreeMap<String, f64>,
    },
    Note {
        message: String,
    },
    Error {
        class: FailureClass,
        message: String,
    },
    Done {
        key: String,
        seconds: f64,
    },
}

impl WorkerLine {
    fn parse(line: &str) -> Option<WorkerLine> {
        let line = line.trim();
        if !line.starts_with("{\"symb\"") {
            return None;
        }
        serde_json::from_str(line).ok()
    }
}

/// Stages sent to a Ray cluster.
pub struct RayExecutor {
    address: String,
    store: String,
    worker_symb: String,
    stages: BTreeMap<String, Resources>,
    agent: ureq::Agent,
    /// For Ctrl-C: short timeouts, the user is waiting.
    stop_agent: ureq::Agent,
    /// Jobs this build submitted or attached to that have not finished.
    in_flight: Arc<Mutex<BTreeSet<String>>>,
    poll: Duration,
}

/// A job's state, as `GET /api/jobs/ID` answers it.
#[derive(Debug, Deserialize)]
struct JobInfo {
    status: String,
    #[serde(default)]
    message: Option<String>,
    #[serde(default)]
    metadata: BTreeMap<String, String>,
}

impl RayExecutor {
    /// `address`: the dashboard's URL; `store`: the cache remote's URL (what
    /// the worker opens); `stages`: the dispatched stages and their resources.
    pub fn new(
        address: &str,
        store: &str,
        worker_symb: &str,
        stages: BTreeMap<String, Resources>,
    ) -> Self {
        let agent = ureq::AgentBuilder::new()
            .timeout_connect(Duration::from_secs(5))
            .timeout(Duration::from_secs(30))
            .build();
        let stop_agent = ureq::AgentBuilder::new()
            .timeout_connect(Duration::from_secs(2))
            .timeout(Duration::from_secs(5))
            .build();
        RayExecutor {
            address: address.trim_end_matches('/').to_string(),
            store: store.to_string(),
            worker_symb: worker_symb.to_string(),
            stages,
            agent,
            stop_agent,
            in_flight: Default::default(),
            poll: Duration::from_millis(500),
        }
    }

    /// The address, as messages name it.
    pub fn address(&self) -> &str {
        &self.address
    }

    /// Stops every job this build is waiting on (Ctrl-C): each id, and
    /// whether Ray stopped it (`Ok(false)`: it had ended).
    pub fn stop_in_flight(&self) -> Vec<(String, Result<bool, String>)> {
        #[derive(Deserialize)]
        struct Stopped {
            stopped: bool,
        }
        let ids: Vec<String> = self
            .in_flight
            .lock()
            .expect("in-flight lock")
            .iter()
            .cloned()
            .collect();
        ids.into_iter()
            .map(|id| {
                let result = match self
                    .stop_agent
                    .post(&format!("{}/api/jobs/{id}/stop", self.address))
                    .call()
                {
                    Ok(response) => response
                        .into_json::<Stopped>()
                        .map(|s| s.stopped)
                        .map_err(|e| e.to_string()),
                    Err(e) => Err(self.http_error(e).to_string()),
                };
                (id, result)
            })
            .collect()
    }

    /// A failed request: unreachable (the connection, or Ray's own 5xx) or
    /// refused (a 4xx: the request is wrong, and another try would be too).
    fn http_error(&self, error: ureq::Error) -> DispatchError {
        match error {
            ureq::Error::Status(code, response) => {
                let body = response.into_string().unwrap_or_default();
                let message = format!(
                    "Ray at {} answered HTTP {code}: {}",
                    self.address,
                    body.trim().lines().last().unwrap_or_default()
                );
                if code >= 500 {
                    DispatchError::Unreachable(message)
                } else {
                    DispatchError::Failed(StageError::failed(message))
                }
            }
            ureq::Error::Transport(t) => DispatchError::Unreachable(format!(
                "cannot reach Ray at {}: {}{}",
                self.address,
                t.kind(),
                t.message().map(|m| format!(" ({m})")).unwrap_or_default()
            )),
        }
    }

    /// The job's state; `None` when Ray has no job of that id.
    fn info(&self, id: &str) -> Result<Option<JobInfo>, DispatchError> {
        match self
            .agent
            .get(&format!("{}/api/jobs/{id}", self.address))
            .call()
        {
            Ok(response) => response.into_json().map(Some).map_err(|e| {
                DispatchError::Unreachable(format!(
                    "Ray at {} answered a job's state that symb cannot read: {e}",
                    self.address
                ))
            }),
            Err(ureq::Error::Status(404, _)) => Ok(None),
            Err(e) => Err(self.http_error(e)),
        }
    }

    fn logs(&self, id: &str) -> Result<String, DispatchError> {
        #[derive(Deserialize)]
        struct Logs {
            logs: String,
        }
        let response = self
            .agent
            .get(&format!("{}/api/jobs/{id}/logs", self.address))
            .call()
            .map_err(|e| self.http_error(e))?;
        response.into_json::<Logs>().map(|l| l.logs).map_err(|e| {
            DispatchError::Unreachable(format!(
                "Ray at {} answered logs that symb cannot read: {e}",
                self.address
            ))
        })
    }

    /// Submits the job under `id`; `Ok(false)` when Ray already has a job
    /// of that id (another build submitted it a moment ago).
    fn submit(&self, id: &str, job: &Job) -> Result<bool, DispatchError> {
        // One word for the shell that runs the entrypoint: `worker_symb` is
        // a command name or a path, never a command line.
        let quote = |s: &str| format!("'{}'", s.replace('\'', r"'\''"));
        let entrypoint = format!(
            "{} worker --store {} --job {}",
            quote(&self.worker_symb),
            quote(&self.store),
            quote(&format!(
                "{}:{}",
                job.description.digest, job.description.size
            ))
        );
        let resources = self.stages.get(&job.stage).cloned().unwrap_or_default();
        let mut body = serde_json::json!({
            "entrypoint": entrypoint,
            "submission_id": id,
            "metadata": {"symb_stage": job.stage, "symb_key": job.key, "symb_store": self.store},
            "entrypoint_num_cpus": resources.num_cpus.unwrap_or(1.0),
        });
        if let Some(gpus) = resources.num_gpus {
            body["entrypoint_num_gpus"] = gpus.into();
        }
        if let Some(memory) = resources.memory {
            body["entrypoint_memory"] = memory.into();
        }
        match self
            .agent
            .post(&format!("{}/api/jobs/", self.address))
            .send_json(body)
        {
            Ok(_) => Ok(true),
            Err(ureq::Error::Status(code, response)) => {
                let text = response.into_string().unwrap_or_default();
                if text.contains("already exists") {
                    return Ok(false);
                }
                let message = format!(
                    "Ray at {} refused the job (HTTP {code}): {}",
                    self.address,
                    text.trim().lines().last().unwrap_or_default()
                );
                Err(if code >= 500 {
                    DispatchError::Unreachable(message)
                } else {
                    DispatchError::Failed(StageError::failed(message))
                })
            }
            Err(e) => Err(self.http_error(e)),
        }
    }

    /// The id of the job to wait on, and its attempt number: the first of
    /// `symb-<stage>-<key>-<store>-0, -1, …` that is live, or a new one after
    /// those that ended. The id is recorded as in flight before it is
    /// submitted, so Ctrl-C at any point stops it.
    fn find_or_submit(
        &self,
        job: &Job,
        first: usize,
        reporter: &dyn Reporter,
    ) -> Result<(String, usize), DispatchError> {
        // The store is in the id: two builds of one key into two stores are
        // two jobs (each worker writes to its own build's store).
        let store = blake3::hash(self.store.as_bytes()).to_hex();
        let base = format!(
            "symb-{}-{}-{}",
            job.stage.replace('.', "-"),
            &job.key[..job.key.len().min(16)],
            &store[..6]
        );
        let mut attempt = first;
        let mut races = 0;
        loop {
            let id = format!("{base}-{attempt}");
            match self.info(&id)? {
                Some(info)
                    if (info.status == "PENDING" || info.status == "RUNNING")
                        && info.metadata.get("symb_key") == Some(&job.key) =>
                {
                    self.in_flight
                        .lock()
                        .expect("in-flight lock")
                        .insert(id.clone());
                    let message = format!(
                        "attached to Ray job {id} ({}), which an earlier build submitted",
                        info.status.to_ascii_lowercase()
                    );
                    reporter.event(Event::StageJob {
                        stage: &job.stage,
                        job: &id,
                        message: &message,
                    });
                    return Ok((id, attempt));
                }
                // Ended (its record, if any, was not in the store when the
                // build looked; the worker of a new one finds it), or
                // another key's: the next id.
                Some(_) => attempt += 1,
                None => {
                    self.in_flight
                        .lock()
                        .expect("in-flight lock")
                        .insert(id.clone());
                    let submitted = self.submit(&id, job);
                    if !matches!(submitted, Ok(true)) {
                        self.in_flight.lock().expect("in-flight lock").remove(&id);
                    }
                    if submitted? {
                        let message = format!("submitted Ray job {id} to {}", self.address);
                        reporter.event(Event::StageJob {
                            stage: &job.stage,
                            job: &id,
                            message: &message,
                        });
                        return Ok((id, attempt));
                    }
                    // Submitted by another build a moment ago: look again.
                    races += 1;
                    if races > 20 {
                        return Err(DispatchError::Unreachable(format!(
                            "Ray at {} says job {id} exists but does not show it",
                            self.address
                        )));
                    }
                    std::thread::sleep(self.poll);
                }
            }
        }
    }

    /// Waits for the job to end, reporting what its logs say; the job's last
    /// state, its message and logs.
    fn wait(
        &self,
        id: &str,
        stage: &str,
        reporter: &dyn Reporter,
    ) -> Result<(JobInfo, String), DispatchError> {
        let mut seen_lines = 0;
        let mut last_status = String::new();
        let mut failing_since: Option<Instant> = None;
        let mut polls = 0u32;
        loop {
            let state = match self.info(id) {
                Ok(Some(info)) => Ok(info),
                Ok(None) => Err(format!("Ray at {} no longer knows job {id}", self.address)),
                Err(e) => Err(e.to_string()),
            };
            let info = match state {
                Ok(info) => {
                    failing_since = None;
                    info
                }
                Err(message) => {
                    // A cluster that stops answering for a minute: the job
                    // may still run, and the next build attaches to it.
                    let since = *failing_since.get_or_insert_with(Instant::now);
                    if since.elapsed() > Duration::from_secs(60) {
                        return Err(DispatchError::Failed(StageError::failed(format!(
                            "{message}; job {id} may still be running: the next `symb build` attaches to it"
                        ))));
                    }
                    std::thread::sleep(self.poll);
                    continue;
                }
            };
            if info.status != last_status {
                if info.status == "PENDING" {
                    reporter.event(Event::StageJob {
                        stage,
                        job: id,
                        message: "pending: Ray is placing and starting it",
                    });
                }
                last_status = info.status.clone();
            }
            // The logs come whole each time: read them every few polls.
            polls += 1;
            let ended = matches!(info.status.as_str(), "SUCCEEDED" | "FAILED" | "STOPPED");
            if !ended && polls % LOG_EVERY != 1 {
                std::thread::sleep(self.poll);
                continue;
            }
            let logs = self.logs(id).unwrap_or_default();
            let lines: Vec<&str> = logs.lines().collect();
            // Only whole lines: the last may still be being written.
            let whole = if logs.ends_with('\n') {
                lines.len()
            } else {
                lines.len().saturating_sub(1)
            };
            for line in lines.iter().take(whole).skip(seen_lines) {
                match WorkerLine::parse(line) {
                    Some(WorkerLine::Progress {
                        done,
                        total,
                        message,
                        fields,
                    }) => {
                        let fields: Vec<(&str, f64)> =
                            fields.iter().map(|(k, v)| (k.as_str(), *v)).collect();
                        reporter.event(Event::StageProgress {
                            stage,
                            done,
                            total,
                            message: &message,
                            fields: &fields,
                        });
                    }
                    Some(WorkerLine::Note { message }) => reporter.event(Event::StageNote {
                        stage,
                        message: &message,
                    }),
                    _ => {}
                }
            }
            seen_lines = seen_lines.max(whole);
            if ended {
                return Ok((info, logs));
            }
            std::thread::sleep(self.poll);
        }
    }
}

/// "its log ends:" and the last lines of a job's logs that are neither
/// symb's JSON lines nor Ray's own preamble; `None` when nothing else was said.
fn log_ending(logs: &str, count: usize) -> Option<String> {
    let ray_preamble = |l: &str| {
        l.contains("Runtime env is setting up") || l.starts_with("Running entrypoint for job ")
    };
    let lines: Vec<&str> = logs
        .lines()
        .filter(|l| WorkerLine::parse(l).is_none() && !l.trim().is_empty() && !ray_preamble(l))
        .collect();
    let last: Vec<String> = lines[lines.len().saturating_sub(count)..]
        .iter()
        .map(|l| format!("  | {l}"))
        .collect();
    (!last.is_empty()).then(|| format!("its log ends:\n{}", last.join("\n")))
}

impl Executor for RayExecutor {
    fn describe(&self) -> String {
        format!("Ray at {}", self.address)
    }

    fn dispatches(&self, stage: &str) -> bool {
        self.stages.contains_key(stage)
    }

    fn run(&self, job: &Job, reporter: &dyn Reporter) -> Result<String, DispatchError> {
        let mut first = 0;
        let mut retried = false;
        loop {
            let (id, attempt) = self.find_or_submit(job, first, reporter)?;
            let waited = self.wait(&id, &job.stage, reporter);
            self.in_flight.lock().expect("in-flight lock").remove(&id);
            let (info, logs) = waited?;
            let ray_message = info.message.clone().unwrap_or_default();
            match info.status.as_str() {
                "SUCCEEDED" => return Ok(id),
                "STOPPED" => {
                    return Err(DispatchError::Failed(StageError::failed(format!(
                        "Ray job {id} was stopped ({})",
                        ray_message.trim()
                    ))));
                }
                _ => {}
            }
            // The worker said why the stage failed: that is the error.
            if let Some((class, message)) =
                logs.lines().rev().find_map(|l| match WorkerLine::parse(l) {
                    Some(WorkerLine::Error { class, message }) => Some((class, message)),
                    _ => None,
                })
            {
                let message = format!(
                    "{message} (in Ray job {id}{})",
                    log_ending(&logs, 8)
                        .map(|l| format!("; {l}"))
                        .unwrap_or_default()
                );
                return Err(DispatchError::Failed(StageError {
                    class,
                    message,
                    source: None,
                }));
            }
            // No word from the worker: it was lost (killed, out of memory, a
            // node that went away) or never started. Once more, then fail.
            let why = if ray_message.trim().is_empty() {
                "no reason given".to_string()
            } else {
                ray_message.trim().to_string()
            };
            if !retried {
                retried = true;
                first = attempt + 1;
                let message =
                    format!("Ray job {id} failed without a word from symb ({why}); retrying once");
                reporter.event(Event::StageJob {
                    stage: &job.stage,
                    job: &id,
                    message: &message,
                });
                continue;
            }
            let logged = log_ending(&logs, 15).unwrap_or_else(|| "its log is empty".to_string());
            return Err(DispatchError::Failed(StageError::failed(format!(
                "Ray job {id} failed ({why}); {logged}"
            ))));
        }
    }
}
