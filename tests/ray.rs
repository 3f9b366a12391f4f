//! `[remote]`: finetune runs as a job of a real Ray cluster (PyPI's `ray`,
//! which tests/setup.sh installs: a single-node head started here on
//! 127.0.0.1, in its own process group, ended at the end), with SeaweedFS
//! as the shared store between the build and the worker.
#![allow(clippy::unwrap_used)] // a test: a panic is how it fails

mod common;

use std::collections::BTreeSet;
use std::io::BufRead;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{Seaweed, TestProject, free_port};

const ACCESS_KEY: &str = "symb-test";
const SECRET: &str = "not-a-real-secret-4711";

/// A Ray head (GCS, raylet, dashboard with the Job API) in its own process
/// group; its jobs run `symb worker` with the store's credentials, given to
/// `ray start` as a cluster's nodes are given them.
struct RayHead {
    child: Child,
    dashboard: u16,
    _dir: tempfile::TempDir,
}

impl Drop for RayHead {
    fn drop(&mut self) {
        // `ray stop` would stop every Ray of the machine: end our group only.
        let group = format!("-{}", self.child.id());
        let _ = Command::new("kill").args(["-TERM", "--", &group]).status();
        let started = Instant::now();
        while started.elapsed() < Duration::from_secs(10)
            && self.child.try_wait().ok().flatten().is_none()
        {
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = Command::new("kill").args(["-KILL", "--", &group]).status();
        let _ = self.child.wait();
    }
}

fn ray() -> PathBuf {
    common::python_command(
        "ray",
        "Ray is not installed: run `bash tests/setup.sh` (pip install \"ray[default]\")",
    )
}

/// A free port away from Ray's worker ports (10002-19999).
fn ray_port() -> u16 {
    loop {
        let port = free_port();
        if !(10002..=19999).contains(&port) {
            return port;
        }
    }
}

impl RayHead {
    fn start(store_endpoint: &str, worker_cache: &Path) -> Self {
        let dir = tempfile::Builder::new()
            .prefix("ray")
            .tempdir_in("/tmp")
            .unwrap();
        let (gcs, dashboard) = (ray_port(), ray_port());
        let mut command = Command::new(ray());
        command
            .args([
                "start",
                "--head",
                "--block",
                "--node-ip-address=127.0.0.1",
                "--dashboard-host=127.0.0.1",
                "--num-cpus=2",
                "--disable-usage-stats",
                "--include-dashboard=true",
            ])
            .arg(format!("--port={gcs}"))
            .arg(format!("--dashboard-port={dashboard}"))
            .arg(format!("--temp-dir={}", dir.path().display()))
            .env("AWS_ACCESS_KEY_ID", ACCESS_KEY)
            .env("AWS_SECRET_ACCESS_KEY", SECRET)
            .env("AWS_ENDPOINT_URL", store_endpoint)
            .env("AWS_ALLOW_HTTP", "true")
            .env("AWS_REGION", "us-east-1")
            .env("SYMB_WORKER_CACHE", worker_cache)
            .env("RAY_USAGE_STATS_ENABLED", "0")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .process_group(0);
        let child = command.spawn().expect("ray starts");
        let head = RayHead {
            child,
            dashboard,
            _dir: dir,
        };
        let started = Instant::now();
        while head.get("/api/version").is_none() {
            assert!(
                started.elapsed() < Duration::from_secs(90),
                "Ray's dashboard did not answer in 90 s"
            );
            std::thread::sleep(Duration::from_millis(500));
        }
        head
    }

    fn address(&self) -> String {
        format!("http://127.0.0.1:{}", self.dashboard)
    }

    /// The JSON of a GET, if it answers 200.
    fn get(&self, path: &str) -> Option<serde_json::Value> {
        let response = ureq::get(&format!("{}{path}", self.address()))
            .timeout(Duration::from_secs(10))
            .call()
            .ok()?;
        response.into_json().ok()
    }

    /// The submission ids of the jobs Ray has for a stage key (or its start).
    fn jobs_for(&self, key: &str) -> BTreeSet<String> {
        let jobs = self.get("/api/jobs/").expect("the job list");
        jobs.as_array()
            .unwrap()
            .iter()
            .filter(|j| {
                j["metadata"]["symb_key"]
                    .as_str()
                    .is_some_and(|k| k.starts_with(key))
            })
            .map(|j| j["submission_id"].as_str().unwrap().to_string())
            .collect()
    }

    fn status(&self, job: &str) -> String {
        self.get(&format!("/api/jobs/{job}"))
            .map(|j| j["status"].as_str().unwrap_or_default().to_string())
            .unwrap_or_default()
    }
}

fn fixture() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tiny-gpt2")
}

/// A LoRA project on the fixture model; `remote` is the `[remote]` table's
/// body (none: a local build, with a cache of its own).
fn project(steps: u32, store: Option<&str>, remote: Option<&str>) -> TestProject {
    let mut manifest = format!(
        "[project]\nname = \"t\"\n\n[corpus]\nfiles = [\"corpus/*.txt\"]\neval_fraction = 0.1\n\n[base]\nmodel = \"path:model\"\n\n\
         [finetune]\nmethod = \"lora\"\nrank = 8\nbatch_size = 2\nblock_size = 16\nmax_steps = {steps}\neval_every = 1000\ncheckpoint_every = 1000\n\n\
         [export]\ntargets = [\"fp32\"]\n"
    );
    if let Some(store) = store {
        manifest.push_str(&format!("\n[cache]\nremote = \"{store}\"\n"));
    }
    if let Some(remote) = remote {
        manifest.push_str(&format!("\n[remote]\n{remote}"));
    }
    let project = TestProject::with_manifest(&manifest, 40);
    std::fs::create_dir_all(project.path("model")).unwrap();
    for entry in std::fs::read_dir(fixture()).unwrap() {
        let entry = entry.unwrap();
        if entry.path().is_file() {
            std::fs::copy(entry.path(), project.path("model").join(entry.file_name())).unwrap();
        }
    }
    project
}

fn remote_table(address: &str, extra: &str) -> String {
    format!(
        "engine = \"ray\"\naddress = \"{address}\"\nstages = [\"finetune\"]\nworker_symb = \"{}\"\n{extra}",
        common::BIN
    )
}

/// `symb build --json` with the store's credentials (what a CI runner has).
fn command(project: &TestProject, endpoint: &str, extra_env: &[(&str, &str)]) -> Command {
    let mut command = Command::new(common::BIN);
    command
        .args(["build", "--json"])
        .current_dir(project.dir.path());
    for var in [
        "RUST_LOG",
        "SYMB_CACHE_REMOTE",
        "SYMB_CACHE_REMOTE_WRITE",
        "SYMB_REMOTE_ADDRESS",
    ] {
        command.env_remove(var);
    }
    command
        .env("AWS_ACCESS_KEY_ID", ACCESS_KEY)
        .env("AWS_SECRET_ACCESS_KEY", SECRET)
        .env("AWS_ENDPOINT_URL", endpoint)
        .env("AWS_ALLOW_HTTP", "true")
        .env("AWS_REGION", "us-east-1");
    for (key, value) in extra_env {
        command.env(key, value);
    }
    command
}

fn build(project: &TestProject, endpoint: &str, extra_env: &[(&str, &str)]) -> common::Build {
    let output = command(project, endpoint, extra_env).output().unwrap();
    let stdout = String::from_utf8(output.stdout).unwrap();
    let events = stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("bad JSON line {l:?}: {e}")))
        .collect();
    common::Build {
        code: output.status.code().unwrap_or(-1),
        events,
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
    }
}

/// The stage line of `stage`.
fn stage_line<'a>(build: &'a common::Build, stage: &str) -> &'a serde_json::Value {
    build
        .events
        .iter()
        .find(|e| e["event"] == "stage" && e["stage"] == stage)
        .unwrap_or_else(|| panic!("no stage line for {stage}: {:?}", build.events))
}

fn output(project: &TestProject) -> Vec<(PathBuf, Vec<u8>)> {
    let dist = project.path("dist");
    let mut files: Vec<_> = common::walk(&dist)
        .into_iter()
        .map(|p| {
            (
                p.strip_prefix(&dist).unwrap().to_path_buf(),
                std::fs::read(&p).unwrap(),
            )
        })
        .collect();
    files.sort();
    files
}

/// The finetune key a project's last build used (its ref).
fn finetune_key(project: &TestProject) -> String {
    let refs = common::walk(&project.path("cache"))
        .into_iter()
        .find(|p| p.ends_with("finetune.json") && p.to_string_lossy().contains("refs"))
        .expect("a finetune ref");
    let value: serde_json::Value = serde_json::from_slice(&std::fs::read(refs).unwrap()).unwrap();
    value["key"].as_str().unwrap().to_string()
}

/// 1-3 of the issue: the job runs on Ray and the folder is byte-identical to
/// a local build's; nothing re-runs, a new rank sends one new job; Ray down is
/// an error naming it (or a local run with `fallback = "local"`); a setting
/// that only the worker finds wrong fails the build with the job's words.
#[test]
fn finetune_runs_as_a_ray_job_and_builds_what_a_local_build_builds() {
    let store = Seaweed::start("symb");
    let endpoint = store.endpoint();
    let worker_cache = tempfile::tempdir().unwrap();
    let head = RayHead::start(&endpoint, worker_cache.path());
    let address = head.address();

    // 1. Remote: finetune is a Ray job, with progress from its logs.
    let remote = project(6, Some("s3://symb/ray"), Some(&remote_table(&address, "")));
    let built = build(&remote, &endpoint, &[]);
    assert_eq!(built.code, 0, "{}\n{:?}", built.stderr, built.events);
    let line = stage_line(&built, "finetune");
    assert_eq!(line["status"], "remote", "{line}");
    let job = line["job"].as_str().expect("the job id").to_string();
    assert!(job.starts_with("symb-finetune-"), "{job}");
    assert!(
        built.events.iter().any(|e| e["event"] == "job"
            && e["job"] == job.as_str()
            && e["message"].as_str().unwrap().contains("submitted")),
        "{:?}",
        built.events
    );
    assert!(
        built
            .events
            .iter()
            .any(|e| e["event"] == "progress" && e["stage"] == "finetune" && e["loss"].is_number()),
        "the worker's progress comes back: {:?}",
        built.events
    );
    assert_eq!(head.status(&job), "SUCCEEDED");
    // What a remote run costs over the stage itself (submit, job start,
    // upload and fetch), for the record.
    eprintln!(
        "remote finetune: {:.2} s in all, {:.2} s of it the stage on the worker",
        line["seconds"].as_f64().unwrap(),
        line["stage_seconds"].as_f64().unwrap()
    );
    let key = finetune_key(&remote);
    assert_eq!(head.jobs_for(&key), BTreeSet::from([job.clone()]));
    // The other stages ran here.
    for stage in [
        "corpus",
        "base",
        "merge",
        "export",
        "reference",
        "verify.fp32",
        "bundle",
    ] {
        assert_eq!(stage_line(&built, stage)["status"], "ran", "{stage}");
    }

    // The same project built locally, with no store: the same bytes.
    let local = project(6, None, None);
    let local_build = build(&local, &endpoint, &[]);
    assert_eq!(local_build.code, 0, "{}", local_build.stderr);
    assert_eq!(stage_line(&local_build, "finetune")["status"], "ran");
    let (a, b) = (output(&remote), output(&local));
    assert_eq!(
        a.iter().map(|f| &f.0).collect::<Vec<_>>(),
        b.iter().map(|f| &f.0).collect::<Vec<_>>()
    );
    for ((path, x), (_, y)) in a.iter().zip(&b) {
        assert!(
            x == y,
            "`{}` differs between the remote and the local build",
            path.display()
        );
    }

    // 2. Again: nothing runs, no job. A new rank: exactly one new job.
    let again = build(&remote, &endpoint, &[]);
    assert_eq!(again.code, 0, "{}", again.stderr);
    assert!(
        again.ran().is_empty() && again.with_status("remote").is_empty(),
        "{:?}",
        again.events
    );
    assert_eq!(head.jobs_for(&key).len(), 1);
    remote.edit("rank = 8", "rank = 4");
    let changed = build(&remote, &endpoint, &[]);
    assert_eq!(changed.code, 0, "{}", changed.stderr);
    assert_eq!(changed.with_status("remote"), common::set(&["finetune"]));
    let new_key = finetune_key(&remote);
    assert_ne!(new_key, key);
    assert_eq!(head.jobs_for(&new_key).len(), 1);
    assert_eq!(head.jobs_for(&key).len(), 1);

    // 3a. Ray unreachable: an error naming the address; nothing is submitted.
    remote.edit("rank = 4", "rank = 2");
    let nowhere = format!("http://127.0.0.1:{}", free_port());
    let down = build(&remote, &endpoint, &[("SYMB_REMOTE_ADDRESS", &nowhere)]);
    assert_eq!(down.code, 1, "{:?}", down.events);
    let reason = stage_line(&down, "finetune")["reason"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(
        reason.contains(&nowhere) && reason.contains("cannot reach Ray"),
        "{reason}"
    );
    assert_eq!(down.last()["failed"], serde_json::json!(["finetune"]));
    // With `fallback = "local"`: a warning, and finetune runs here.
    remote.edit(
        "stages = [\"finetune\"]",
        "stages = [\"finetune\"]\nfallback = \"local\"",
    );
    let fallback = build(&remote, &endpoint, &[("SYMB_REMOTE_ADDRESS", &nowhere)]);
    assert_eq!(fallback.code, 0, "{}", fallback.stderr);
    assert_eq!(stage_line(&fallback, "finetune")["status"], "ran");
    assert!(
        fallback
            .events
            .iter()
            .any(|e| e["event"] == "warning" && e["message"].as_str().unwrap().contains(&nowhere)),
        "{:?}",
        fallback.events
    );

    // 3b. A rank wider than the model (64) is found by the worker, which
    // loads the model: the build fails with its words and the job named.
    remote.edit("rank = 2", "rank = 100");
    let failed = build(&remote, &endpoint, &[]);
    assert_eq!(
        failed.code, 2,
        "a bad setting is exit 2, as locally: {:?}",
        failed.events
    );
    let reason = stage_line(&failed, "finetune")["reason"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(
        reason.contains("`finetune.rank` = 100 is larger than the base model's width (64)")
            && reason.contains("Ray job symb-finetune-"),
        "{reason}"
    );
    // Not retried: the worker said why.
    let job = failed
        .events
        .iter()
        .find(|e| e["event"] == "job")
        .expect("a job event")["job"]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(head.jobs_for(&key_of(&job)).len(), 1);

    // A worker that never says a word (here: no symb where the manifest
    // says): the job is retried once, then the build fails with its log.
    remote.edit("rank = 100", "rank = 16");
    remote.edit(
        &format!("worker_symb = \"{}\"", common::BIN),
        "worker_symb = \"/nonexistent/symb\"",
    );
    let lost = build(&remote, &endpoint, &[]);
    assert_eq!(lost.code, 1, "{:?}", lost.events);
    let reason = stage_line(&lost, "finetune")["reason"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(
        reason.contains("failed")
            && reason.contains("its log ends")
            && reason.contains("/nonexistent/symb"),
        "{reason}"
    );
    assert!(
        lost.events.iter().any(
            |e| e["event"] == "job" && e["message"].as_str().unwrap().contains("retrying once")
        ),
        "{:?}",
        lost.events
    );
    let job = lost.events.iter().find(|e| e["event"] == "job").unwrap()["job"]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(head.jobs_for(&key_of(&job)).len(), 2, "one retry");
    remote.edit(
        "worker_symb = \"/nonexistent/symb\"",
        &format!("worker_symb = \"{}\"", common::BIN),
    );

    // 4. A killed build attaches to its job when started again; Ctrl-C
    // stops the job and says so.
    remote.edit("rank = 16", "rank = 8");
    remote.edit("max_steps = 6", "max_steps = 600");
    let (job, key) = start_and_kill(&remote, &endpoint, "KILL");
    assert!(
        matches!(head.status(&job).as_str(), "PENDING" | "RUNNING"),
        "the job runs on after its build was killed: {}",
        head.status(&job)
    );
    let resumed = build(&remote, &endpoint, &[]);
    assert_eq!(resumed.code, 0, "{}", resumed.stderr);
    let line = stage_line(&resumed, "finetune");
    eprintln!(
        "the attached build waited {:.1} s; the stage took {:.1} s on the worker",
        line["seconds"].as_f64().unwrap(),
        line["stage_seconds"].as_f64().unwrap_or(f64::NAN)
    );
    assert_eq!(line["status"], "remote", "{line}");
    assert_eq!(
        line["job"],
        job.as_str(),
        "the second build waits on the first one's job"
    );
    assert!(
        resumed
            .events
            .iter()
            .any(|e| e["event"] == "job" && e["message"].as_str().unwrap().contains("attached")),
        "{:?}",
        resumed.events
    );
    assert_eq!(head.jobs_for(&key), BTreeSet::from([job]));

    remote.edit("max_steps = 600", "max_steps = 601");
    let (job, _) = start_and_kill(&remote, &endpoint, "INT");
    let started = Instant::now();
    while head.status(&job) != "STOPPED" {
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "Ctrl-C stops the job: {}",
            head.status(&job)
        );
        std::thread::sleep(Duration::from_millis(300));
    }
}

/// The start of the stage key a job id carries.
fn key_of(job: &str) -> String {
    job.trim_start_matches("symb-finetune-")[..16].to_string()
}

/// Starts a build, waits for its job to run, and sends the build `signal`:
/// the job id and its stage key. For SIGINT, also checks what it printed.
fn start_and_kill(project: &TestProject, endpoint: &str, signal: &str) -> (String, String) {
    let mut child = command(project, endpoint, &[])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = std::io::BufReader::new(child.stdout.take().unwrap());
    let mut job = None;
    for line in stdout.lines() {
        let event: serde_json::Value = serde_json::from_str(&line.unwrap()).unwrap();
        if event["event"] == "job" {
            job = event["job"].as_str().map(str::to_string);
        }
        // Killed once the worker reports progress: the job is running.
        if event["event"] == "progress" && event["stage"] == "finetune" && job.is_some() {
            break;
        }
    }
    let job = job.expect("the build submitted a job");
    assert!(
        Command::new("kill")
            .args([&format!("-{signal}"), &child.id().to_string()])
            .status()
            .unwrap()
            .success()
    );
    let status = child.wait().unwrap();
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut stderr).unwrap();
    if signal == "INT" {
        assert_eq!(status.code(), Some(130));
        assert!(
            stderr.contains(&format!("Ray job {job}")) && stderr.contains("Stopped"),
            "{stderr}"
        );
    }
    let key = key_of(&job);
    (job, key)
}
