//! The engine on synthetic stages: parallelism, failure isolation, early
//! cutoff in a diamond, and targets.

use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use super::*;
use crate::cache::{Cache, StatCache};

/// A stage that concatenates its inputs and its `value`; it can fail, or
/// wait for a number of stages to be running at once.
struct Fake {
    name: String,
    deps: Vec<String>,
    value: String,
    fail: bool,
    rendezvous: Option<&'static AtomicUsize>,
}

fn fake(name: &str, deps: &[&str], value: &str) -> Box<dyn Stage> {
    Box::new(Fake { name: name.into(), deps: deps.iter().map(|d| d.to_string()).collect(), value: value.into(), fail: false, rendezvous: None })
}

impl Stage for Fake {
    fn name(&self) -> &str {
        &self.name
    }
    fn kind(&self) -> &'static str {
        "fake"
    }
    fn version(&self) -> u32 {
        1
    }
    fn settings(&self) -> Settings {
        [(format!("{}.value", self.name), serde_json::json!(self.value))].into()
    }
    fn dependencies(&self) -> Vec<String> {
        self.deps.clone()
    }
    fn run(&self, ctx: &StageContext<'_>) -> Result<serde_json::Value, StageError> {
        if let Some(counter) = self.rendezvous {
            counter.fetch_add(1, Ordering::SeqCst);
            let deadline = Instant::now() + Duration::from_secs(10);
            while counter.load(Ordering::SeqCst) < 2 && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(1));
            }
            if counter.load(Ordering::SeqCst) < 2 {
                return Err(StageError::failed("ran alone"));
            }
        }
        if self.fail {
            return Err(StageError::failed(format!("{} fails", self.name)));
        }
        let mut text = String::new();
        for dep in &self.deps {
            text.push_str(&std::fs::read_to_string(ctx.input(dep, "out")?).unwrap());
        }
        // Only the first character of `value` reaches the output, so some
        // setting changes leave the artifact byte-identical.
        text.push_str(&self.value[..1]);
        std::fs::write(ctx.output("out"), text).unwrap();
        Ok(serde_json::json!({}))
    }
}

struct Env {
    _dir: tempfile::TempDir,
    cache: Cache,
    stat: Mutex<StatCache>,
}

impl Env {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let cache = Cache::open(dir.path()).unwrap();
        Env { _dir: dir, cache, stat: Mutex::new(StatCache::default()) }
    }

    fn run(&self, stages: Vec<Box<dyn Stage>>, jobs: usize) -> BuildOutcome {
        let plan = Plan::new(stages).unwrap();
        let options = BuildOptions { jobs, ..BuildOptions::default() };
        execute(&plan, &self.cache, &self.stat, "test", &options, &Silent).unwrap()
    }
}

fn with_status(outcome: &BuildOutcome, status: StageStatus) -> Vec<&str> {
    outcome.stages.iter().filter(|s| s.status == status).map(|s| s.stage.as_str()).collect()
}

fn diamond(a: &str, b: &str) -> Vec<Box<dyn Stage>> {
    vec![fake("a", &[], a), fake("b", &["a"], b), fake("c", &["a"], "c"), fake("d", &["b", "c"], "d")]
}

#[test]
fn early_cutoff_in_a_diamond() {
    let env = Env::new();
    assert_eq!(with_status(&env.run(diamond("x1", "y"), 2), StageStatus::Ran), ["a", "b", "c", "d"]);
    // `a` re-runs with a new setting but writes the same bytes: nothing else runs.
    let outcome = env.run(diamond("x2", "y"), 2);
    assert_eq!(with_status(&outcome, StageStatus::Ran), ["a"]);
    assert_eq!(outcome.get("a").unwrap().reason, "`a.value` changed \"x1\" -> \"x2\"");
    // `a`'s bytes change: everything downstream runs.
    let outcome = env.run(diamond("z", "y"), 2);
    assert_eq!(with_status(&outcome, StageStatus::Ran), ["a", "b", "c", "d"]);
    // `b` changes: only `b` and `d`.
    let outcome = env.run(diamond("z", "w"), 2);
    assert_eq!(with_status(&outcome, StageStatus::Ran), ["b", "d"]);
    assert_eq!(with_status(&outcome, StageStatus::Cached), ["a", "c"]);
}

#[test]
fn a_failure_skips_its_dependents_only() {
    let env = Env::new();
    let mut stages = diamond("x", "y");
    stages[1] = Box::new(Fake { name: "b".into(), deps: vec!["a".into()], value: "y".into(), fail: true, rendezvous: None });
    let outcome = env.run(stages, 2);
    assert_eq!(with_status(&outcome, StageStatus::Ran), ["a", "c"]);
    assert_eq!(with_status(&outcome, StageStatus::Failed), ["b"]);
    assert_eq!(with_status(&outcome, StageStatus::Skipped), ["d"]);
    assert_eq!(outcome.get("d").unwrap().reason, "upstream `b` failed");
    assert_eq!(outcome.failure(), Some(FailureClass::Failed));
    // Nothing was committed for `b`: fixed, it runs; `a` and `c` are cached.
    let outcome = env.run(diamond("x", "y"), 2);
    assert_eq!(with_status(&outcome, StageStatus::Ran), ["b", "d"]);
}

#[test]
fn independent_stages_run_at_the_same_time() {
    static RUNNING: AtomicUsize = AtomicUsize::new(0);
    let env = Env::new();
    let stage = |name: &str| -> Box<dyn Stage> { Box::new(Fake { name: name.into(), deps: vec![], value: name.into(), fail: false, rendezvous: Some(&RUNNING) }) };
    let outcome = env.run(vec![stage("left"), stage("right")], 2);
    assert_eq!(outcome.failure(), None, "{:?}", outcome.stages);
    assert_eq!(with_status(&outcome, StageStatus::Ran), ["left", "right"]);
}

#[test]
fn targets_keep_what_they_need() {
    let plan = Plan::new(diamond("x", "y")).unwrap().restrict(&["b".to_string()]).unwrap();
    assert_eq!(plan.names(), ["a", "b"]);
    let plan = Plan::new(vec![fake("export", &[], "e"), fake("quantize.q4", &["export"], "q"), fake("quantize.fp16", &["export"], "f")]).unwrap().restrict(&["q4".to_string()]).unwrap();
    assert_eq!(plan.names(), ["export", "quantize.q4"]);
    assert!(matches!(Plan::new(diamond("x", "y")).unwrap().restrict(&["nope".to_string()]), Err(PlanError::UnknownTarget { .. })));
}

#[test]
fn a_cycle_and_a_missing_dependency_are_refused() {
    assert!(matches!(Plan::new(vec![fake("a", &["b"], "x"), fake("b", &["a"], "y")]), Err(PlanError::Cycle(_))));
    assert!(matches!(Plan::new(vec![fake("a", &["ghost"], "x")]), Err(PlanError::MissingDependency { .. })));
}

#[test]
fn a_rejected_output_folder_leaves_the_previous_one_and_unchanged_files_are_linked() {
    use std::collections::BTreeMap;
    let dir = tempfile::tempdir().unwrap();
    let cache = Cache::open(&dir.path().join("cache")).unwrap();
    let put = |name: &str, text: &str| {
        let path = dir.path().join(name);
        std::fs::write(&path, text).unwrap();
        cache.put_file(&path).unwrap()
    };
    let output = dir.path().join("dist");
    let first: BTreeMap<String, _> = [("a.txt".to_string(), put("a", "first a")), ("b.txt".to_string(), put("b", "first b"))].into();
    super::assemble_output(&cache, "p", &output, &first, &|_| Ok(())).unwrap();
    let second: BTreeMap<String, _> = [("a.txt".to_string(), first["a.txt"].clone()), ("b.txt".to_string(), put("b2", "second b"))].into();
    let error = super::assemble_output(&cache, "p", &output, &second, &|dir| Err(format!("refused {}", dir.join("b.txt").exists()))).unwrap_err();
    assert_eq!(error.to_string(), "refused true", "the check sees the new folder, complete");
    assert_eq!(std::fs::read_to_string(output.join("b.txt")).unwrap(), "first b", "the previous output stays");
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().filter(|e| e.as_ref().unwrap().file_name().to_string_lossy().starts_with(".dist")).count(), 0, "no staging folder left");
    let inode = |p: &std::path::Path| std::os::unix::fs::MetadataExt::ino(&std::fs::metadata(p).unwrap());
    let before = inode(&output.join("a.txt"));
    super::assemble_output(&cache, "p", &output, &second, &|_| Ok(())).unwrap();
    assert_eq!(std::fs::read_to_string(output.join("b.txt")).unwrap(), "second b");
    assert_eq!(inode(&output.join("a.txt")), before, "the unchanged file was linked, not copied");
}
