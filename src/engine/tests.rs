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
    Box::new(Fake {
        name: name.into(),
        deps: deps.iter().map(|d| d.to_string()).collect(),
        value: value.into(),
        fail: false,
        rendezvous: None,
    })
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
        [(
            format!("{}.value", self.name),
            serde_json::json!(self.value),
        )]
        .into()
    }
    fn dependencies(&self) -> Vec<String> {
        self.deps.clone()
    }
    fn spec(&self) -> Option<serde_json::Value> {
        Some(serde_json::json!({"name": self.name, "deps": self.deps, "value": self.value}))
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
        Env {
            _dir: dir,
            cache,
            stat: Mutex::new(StatCache::default()),
        }
    }

    fn run(&self, stages: Vec<Box<dyn Stage>>, jobs: usize) -> BuildOutcome {
        let plan = Plan::new(stages).unwrap();
        let options = BuildOptions {
            jobs,
            ..BuildOptions::default()
        };
        execute(&plan, &self.cache, &self.stat, "test", &options, &Silent).unwrap()
    }
}

fn with_status(outcome: &BuildOutcome, status: StageStatus) -> Vec<&str> {
    outcome
        .stages
        .iter()
        .filter(|s| s.status == status)
        .map(|s| s.stage.as_str())
        .collect()
}

fn diamond(a: &str, b: &str) -> Vec<Box<dyn Stage>> {
    vec![
        fake("a", &[], a),
        fake("b", &["a"], b),
        fake("c", &["a"], "c"),
        fake("d", &["b", "c"], "d"),
    ]
}

#[test]
fn early_cutoff_in_a_diamond() {
    let env = Env::new();
    assert_eq!(
        with_status(&env.run(diamond("x1", "y"), 2), StageStatus::Ran),
        ["a", "b", "c", "d"]
    );
    // `a` re-runs with a new setting but writes the same bytes: nothing else runs.
    let outcome = env.run(diamond("x2", "y"), 2);
    assert_eq!(with_status(&outcome, StageStatus::Ran), ["a"]);
    assert_eq!(
        outcome.get("a").unwrap().reason,
        "`a.value` changed \"x1\" -> \"x2\""
    );
    // `a`'s bytes change: everything downstream runs.
    let outcome = env.run(diamond("z", "y"), 2);
    assert_eq!(
        with_status(&outcome, StageStatus::Ran),
        ["a", "b", "c", "d"]
    );
    // `b` changes: only `b` and `d`.
    let outcome = env.run(diamond("z", "w"), 2);
    assert_eq!(with_status(&outcome, StageStatus::Ran), ["b", "d"]);
    assert_eq!(with_status(&outcome, StageStatus::Cached), ["a", "c"]);
}

/// A stage that writes `out` (its value's first character) and `note` (the
/// whole value); with `only_out` it reads its dependencies' `out` alone.
struct TwoFiles {
    name: &'static str,
    deps: Vec<String>,
    value: String,
    only_out: bool,
}

impl Stage for TwoFiles {
    fn name(&self) -> &str {
        self.name
    }
    fn kind(&self) -> &'static str {
        "two-files"
    }
    fn version(&self) -> u32 {
        1
    }
    fn settings(&self) -> Settings {
        [("value".to_string(), serde_json::json!(self.value))].into()
    }
    fn dependencies(&self) -> Vec<String> {
        self.deps.clone()
    }
    fn reads(&self, _stage: &str, artifact: &str) -> bool {
        !self.only_out || artifact == "out"
    }
    fn run(&self, ctx: &StageContext<'_>) -> Result<serde_json::Value, StageError> {
        let mut text = String::new();
        for dep in &self.deps {
            text.push_str(&std::fs::read_to_string(ctx.input(dep, "out")?).unwrap());
            if self.only_out && ctx.input(dep, "note").is_ok() {
                return Err(StageError::failed("was handed a file it does not read"));
            }
        }
        text.push_str(&self.value[..1]);
        std::fs::write(ctx.output("out"), text).unwrap();
        std::fs::write(ctx.output("note"), &self.value).unwrap();
        Ok(serde_json::json!({}))
    }
}

#[test]
fn a_file_a_stage_does_not_read_neither_keys_it_nor_reaches_it() {
    let env = Env::new();
    let stages = |value: &str, only_out: bool| -> Vec<Box<dyn Stage>> {
        let stage = |name, deps: &[&str], value: &str, only_out| {
            Box::new(TwoFiles {
                name,
                deps: deps.iter().map(|d| d.to_string()).collect(),
                value: value.to_string(),
                only_out,
            }) as Box<dyn Stage>
        };
        vec![
            stage("a", &[], value, false),
            stage("b", &["a"], "b", only_out),
        ]
    };
    assert_eq!(
        with_status(&env.run(stages("x1", true), 1), StageStatus::Ran),
        ["a", "b"]
    );
    // `a`'s note changes, its `out` does not: `b` reads only `out`.
    let outcome = env.run(stages("x2", true), 1);
    assert_eq!(with_status(&outcome, StageStatus::Ran), ["a"]);
    assert_eq!(with_status(&outcome, StageStatus::Cached), ["b"]);
    // A stage that reads both runs again when the note changes.
    env.run(stages("x3", false), 1);
    let outcome = env.run(stages("x4", false), 1);
    assert_eq!(with_status(&outcome, StageStatus::Ran), ["a", "b"]);
}

#[test]
fn a_failure_skips_its_dependents_only() {
    let env = Env::new();
    let mut stages = diamond("x", "y");
    stages[1] = Box::new(Fake {
        name: "b".into(),
        deps: vec!["a".into()],
        value: "y".into(),
        fail: true,
        rendezvous: None,
    });
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
    let stage = |name: &str| -> Box<dyn Stage> {
        Box::new(Fake {
            name: name.into(),
            deps: vec![],
            value: name.into(),
            fail: false,
            rendezvous: Some(&RUNNING),
        })
    };
    let outcome = env.run(vec![stage("left"), stage("right")], 2);
    assert_eq!(outcome.failure(), None, "{:?}", outcome.stages);
    assert_eq!(with_status(&outcome, StageStatus::Ran), ["left", "right"]);
}

#[test]
fn targets_keep_what_they_need() {
    let plan = Plan::new(diamond("x", "y"))
        .unwrap()
        .restrict(&["b".to_string()])
        .unwrap();
    assert_eq!(plan.names(), ["a", "b"]);
    let plan = Plan::new(vec![
        fake("export", &[], "e"),
        fake("quantize.q4", &["export"], "q"),
        fake("quantize.fp16", &["export"], "f"),
    ])
    .unwrap()
    .restrict(&["q4".to_string()])
    .unwrap();
    assert_eq!(plan.names(), ["export", "quantize.q4"]);
    assert!(matches!(
        Plan::new(diamond("x", "y"))
            .unwrap()
            .restrict(&["nope".to_string()]),
        Err(PlanError::UnknownTarget { .. })
    ));
}

#[test]
fn a_cycle_and_a_missing_dependency_are_refused() {
    assert!(matches!(
        Plan::new(vec![fake("a", &["b"], "x"), fake("b", &["a"], "y")]),
        Err(PlanError::Cycle(_))
    ));
    assert!(matches!(
        Plan::new(vec![fake("a", &["ghost"], "x")]),
        Err(PlanError::MissingDependency { .. })
    ));
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
    let first: BTreeMap<String, _> = [
        ("a.txt".to_string(), put("a", "first a")),
        ("b.txt".to_string(), put("b", "first b")),
    ]
    .into();
    super::assemble_output(&cache, "p", &output, &first, &|_| Ok(())).unwrap();
    let second: BTreeMap<String, _> = [
        ("a.txt".to_string(), first["a.txt"].clone()),
        ("b.txt".to_string(), put("b2", "second b")),
    ]
    .into();
    let error = super::assemble_output(&cache, "p", &output, &second, &|dir| {
        Err(format!("refused {}", dir.join("b.txt").exists()))
    })
    .unwrap_err();
    assert_eq!(
        error.to_string(),
        "refused true",
        "the check sees the new folder, complete"
    );
    assert_eq!(
        std::fs::read_to_string(output.join("b.txt")).unwrap(),
        "first b",
        "the previous output stays"
    );
    assert_eq!(
        std::fs::read_dir(dir.path())
            .unwrap()
            .filter(|e| e
                .as_ref()
                .unwrap()
                .file_name()
                .to_string_lossy()
                .starts_with(".dist"))
            .count(),
        0,
        "no staging folder left"
    );
    let inode =
        |p: &std::path::Path| std::os::unix::fs::MetadataExt::ino(&std::fs::metadata(p).unwrap());
    let before = inode(&output.join("a.txt"));
    super::assemble_output(&cache, "p", &output, &second, &|_| Ok(())).unwrap();
    assert_eq!(
        std::fs::read_to_string(output.join("b.txt")).unwrap(),
        "second b"
    );
    assert_eq!(
        inode(&output.join("a.txt")),
        before,
        "the unchanged file was linked, not copied"
    );
}

/// A cache with blobs of the given texts, and an output path beside it.
fn output_fixture(
    texts: &[(&str, &str)],
) -> (
    tempfile::TempDir,
    Cache,
    std::path::PathBuf,
    std::collections::BTreeMap<String, crate::cache::BlobRef>,
) {
    let dir = tempfile::tempdir().unwrap();
    let cache = Cache::open(&dir.path().join("cache")).unwrap();
    let mut files = std::collections::BTreeMap::new();
    for (name, text) in texts {
        let path = dir.path().join(format!("blob-{}", name.replace('/', "-")));
        std::fs::write(&path, text).unwrap();
        files.insert(name.to_string(), cache.put_file(&path).unwrap());
    }
    let output = dir.path().join("dist");
    (dir, cache, output, files)
}

#[test]
fn a_folder_symb_did_not_make_is_never_replaced() {
    let (_dir, cache, output, files) = output_fixture(&[("a.txt", "a")]);
    std::fs::create_dir_all(&output).unwrap();
    std::fs::write(output.join("notes.txt"), "mine").unwrap();
    let error = super::assemble_output(&cache, "p", &output, &files, &|_| Ok(())).unwrap_err();
    assert!(
        error
            .to_string()
            .contains("was not made by symb (it has no `.symb-output.json`)"),
        "{error}"
    );
    assert_eq!(
        std::fs::read_to_string(output.join("notes.txt")).unwrap(),
        "mine"
    );
    assert!(!output.join("a.txt").exists());
    // An empty folder is fine, and then carries the marker.
    std::fs::remove_file(output.join("notes.txt")).unwrap();
    super::assemble_output(&cache, "p", &output, &files, &|_| Ok(())).unwrap();
    assert!(
        matches!(super::inspect_output(&output), Ok(super::OutputFolder::Owned(owned)) if owned == files)
    );
    // A symlink or a file in its place is refused.
    let link = output.with_file_name("link");
    std::os::unix::fs::symlink(&output, &link).unwrap();
    assert!(matches!(
        super::inspect_output(&link),
        Err(super::OutputRefusal::Symlink { .. })
    ));
    assert!(matches!(
        super::inspect_output(&output.join("a.txt")),
        Err(super::OutputRefusal::NotAFolder { .. })
    ));
}

#[test]
fn the_users_files_in_the_output_survive_every_build() {
    let (_dir, cache, output, first) = output_fixture(&[("a.txt", "a"), ("onnx/b.txt", "b")]);
    super::assemble_output(&cache, "p", &output, &first, &|_| Ok(())).unwrap();
    std::fs::write(output.join("notes.txt"), "mine").unwrap();
    std::fs::write(output.join("onnx/readme.md"), "also mine").unwrap();
    let second: std::collections::BTreeMap<_, _> = first
        .iter()
        .filter(|(k, _)| *k == "a.txt")
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    let assembled = super::assemble_output(&cache, "p", &output, &second, &|dir| {
        if dir.join("notes.txt").exists() {
            Err("the check saw the user's file".into())
        } else {
            Ok(())
        }
    })
    .unwrap();
    assert_eq!(assembled.kept, ["notes.txt", "onnx/readme.md"]);
    assert_eq!(
        std::fs::read_to_string(output.join("notes.txt")).unwrap(),
        "mine"
    );
    assert_eq!(
        std::fs::read_to_string(output.join("onnx/readme.md")).unwrap(),
        "also mine"
    );
    assert!(
        !output.join("onnx/b.txt").exists(),
        "what symb wrote and no longer builds is gone"
    );
    let check = super::check_output(&output).unwrap();
    assert_eq!(check.foreign, ["notes.txt", "onnx/readme.md"]);
    // A user's file where the build now writes one stops the build.
    let (_d2, cache2, _, third) = output_fixture(&[("notes.txt", "symb's")]);
    let error = super::assemble_output(&cache2, "p", &output, &third, &|_| Ok(())).unwrap_err();
    assert!(
        matches!(&error, super::AssembleError::Collision { path } if path == "notes.txt"),
        "{error}"
    );
    assert_eq!(
        std::fs::read_to_string(output.join("notes.txt")).unwrap(),
        "mine"
    );
}

#[test]
fn an_edit_with_its_mtime_restored_is_noticed_and_rewritten() {
    let (_dir, cache, output, files) = output_fixture(&[("a.txt", "aaaa")]);
    super::assemble_output(&cache, "p", &output, &files, &|_| Ok(())).unwrap();
    assert!(super::output_is_current(&cache, "p", &output, &files));
    let path = output.join("a.txt");
    let mtime = std::fs::metadata(&path).unwrap().modified().unwrap();
    // Past the filesystem's timestamp tick (coarse on older kernels): an edit
    // within the tick of symb's own write is the one case stat cannot see.
    std::thread::sleep(std::time::Duration::from_millis(50));
    std::fs::write(&path, "bbbb").unwrap();
    std::fs::File::options()
        .write(true)
        .open(&path)
        .unwrap()
        .set_modified(mtime)
        .unwrap();
    assert_eq!(
        std::fs::metadata(&path).unwrap().modified().unwrap(),
        mtime,
        "same size, same mtime"
    );
    assert!(!super::output_is_current(&cache, "p", &output, &files));
    assert_eq!(super::check_output(&output).unwrap().changed, ["a.txt"]);
    super::assemble_output(&cache, "p", &output, &files, &|_| Ok(())).unwrap();
    assert_eq!(
        std::fs::read_to_string(&path).unwrap(),
        "aaaa",
        "rewritten from the cache, not linked"
    );
    let check = super::check_output(&output).unwrap();
    assert_eq!(
        (check.checked, check.changed.len(), check.missing.len()),
        (1, 0, 0)
    );
    std::fs::remove_file(&path).unwrap();
    assert_eq!(super::check_output(&output).unwrap().missing, ["a.txt"]);
}

#[test]
fn what_the_user_adds_while_the_folder_is_assembled_is_not_lost() {
    let (_dir, cache, output, files) = output_fixture(&[("a.txt", "a")]);
    super::assemble_output(&cache, "p", &output, &files, &|_| Ok(())).unwrap();
    // Between the listing of the user's files and the swap, as a long
    // assembly would allow: a file and an empty folder appear.
    let late = |_: &std::path::Path| {
        std::fs::write(output.join("late.txt"), "written meanwhile").unwrap();
        std::fs::create_dir_all(output.join("empty")).unwrap();
        Ok(())
    };
    super::assemble_output(&cache, "p", &output, &files, &late).unwrap();
    assert_eq!(
        std::fs::read_to_string(output.join("late.txt")).unwrap(),
        "written meanwhile"
    );
    assert!(output.join("empty").is_dir());
    let parent = output.parent().unwrap();
    let leftovers: Vec<_> = std::fs::read_dir(parent)
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with(".dist.symb"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
}

#[test]
fn a_marker_cannot_make_symb_remove_anything_outside_its_folder() {
    let dir = tempfile::tempdir().unwrap();
    let (output, outside) = (dir.path().join("dist"), dir.path().join("outside"));
    std::fs::create_dir_all(&output).unwrap();
    std::fs::create_dir_all(&outside).unwrap();
    std::fs::write(dir.path().join("victim.txt"), "keep").unwrap();
    std::fs::write(outside.join("x"), "keep").unwrap();
    std::os::unix::fs::symlink(&outside, output.join("link")).unwrap();
    std::fs::write(output.join("own.txt"), "symb's").unwrap();
    let left = super::remove_owned(
        &output,
        ["../victim.txt", "link/x", "/etc/hostname", "own.txt"],
    )
    .unwrap();
    assert_eq!(left, ["link"], "only symb's own file went");
    assert_eq!(
        std::fs::read_to_string(dir.path().join("victim.txt")).unwrap(),
        "keep"
    );
    assert_eq!(std::fs::read_to_string(outside.join("x")).unwrap(), "keep");
}

#[test]
fn names_with_the_same_bytes_are_one_file_in_the_output() {
    use std::os::unix::fs::MetadataExt;
    let (_dir, cache, output, mut files) = output_fixture(&[("a.txt", "same"), ("c.txt", "other")]);
    files.insert("sub/b.txt".to_string(), files["a.txt"].clone());
    super::assemble_output(&cache, "p", &output, &files, &|_| Ok(())).unwrap();
    let meta = |name: &str| std::fs::metadata(output.join(name)).unwrap();
    assert_eq!(
        (meta("a.txt").ino(), meta("a.txt").nlink()),
        (meta("sub/b.txt").ino(), 2)
    );
    assert_ne!(meta("a.txt").ino(), meta("c.txt").ino());
    assert!(
        super::output_is_current(&cache, "p", &output, &files),
        "linking does not look like an edit"
    );
    // Assembled again (each file reused from the old folder): still one file.
    super::assemble_output(&cache, "p", &output, &files, &|_| Ok(())).unwrap();
    assert_eq!(
        (meta("a.txt").ino(), meta("a.txt").nlink()),
        (meta("sub/b.txt").ino(), 2)
    );
    assert!(super::output_is_current(&cache, "p", &output, &files));
    assert_eq!(
        std::fs::read_to_string(output.join("sub/b.txt")).unwrap(),
        "same"
    );
}

/// A store in memory, standing for a remote one.
#[derive(Default)]
struct MemoryStore {
    records: Mutex<std::collections::BTreeMap<String, crate::cache::ActionRecord>>,
    blobs: Mutex<std::collections::BTreeMap<String, Vec<u8>>>,
}

impl crate::cache::Store for MemoryStore {
    fn describe(&self) -> String {
        "memory".into()
    }
    fn lookup(
        &self,
        key: &str,
    ) -> Result<Option<crate::cache::ActionRecord>, crate::cache::StoreError> {
        Ok(self.records.lock().unwrap().get(key).cloned())
    }
    fn has_record(&self, key: &str) -> Result<bool, crate::cache::StoreError> {
        Ok(self.records.lock().unwrap().contains_key(key))
    }
    fn blob_state(
        &self,
        blob: &crate::cache::BlobRef,
        local: &std::path::Path,
    ) -> Result<crate::cache::Held, crate::cache::StoreError> {
        Ok(match self.blobs.lock().unwrap().get(&blob.digest) {
            None => crate::cache::Held::Missing,
            Some(bytes) if *bytes == std::fs::read(local).unwrap() => crate::cache::Held::Same,
            Some(_) => crate::cache::Held::Differs,
        })
    }
    fn get_blob(
        &self,
        blob: &crate::cache::BlobRef,
        dest: &std::path::Path,
    ) -> Result<(), crate::cache::StoreError> {
        std::fs::write(dest, &self.blobs.lock().unwrap()[&blob.digest]).unwrap();
        Ok(())
    }
    fn put_blob(
        &self,
        blob: &crate::cache::BlobRef,
        src: &std::path::Path,
    ) -> Result<(), crate::cache::StoreError> {
        self.blobs
            .lock()
            .unwrap()
            .insert(blob.digest.clone(), std::fs::read(src).unwrap());
        Ok(())
    }
    fn commit(&self, record: &crate::cache::ActionRecord) -> Result<(), crate::cache::StoreError> {
        self.records
            .lock()
            .unwrap()
            .insert(record.key.clone(), record.clone());
        Ok(())
    }
}

/// An executor whose jobs run "elsewhere": in a cache of their own, from
/// nothing but the description and the store, as a worker does.
struct Elsewhere {
    store: std::sync::Arc<MemoryStore>,
    worker: Env,
    down: bool,
    jobs: AtomicUsize,
}

impl Executor for Elsewhere {
    fn describe(&self) -> String {
        "elsewhere".into()
    }
    fn dispatches(&self, stage: &str) -> bool {
        stage == "b"
    }
    fn run(&self, job: &Job, _: &dyn Reporter) -> Result<String, DispatchError> {
        if self.down {
            return Err(DispatchError::Unreachable("elsewhere is down".into()));
        }
        let description =
            fetch_description(&self.worker.cache, self.store.as_ref(), &job.description)
                .map_err(DispatchError::Failed)?;
        let spec = &description.spec;
        let deps = spec["deps"]
            .as_array()
            .unwrap()
            .iter()
            .map(|d| d.as_str().unwrap().to_string())
            .collect();
        let stage = Fake {
            name: spec["name"].as_str().unwrap().into(),
            deps,
            value: spec["value"].as_str().unwrap().into(),
            fail: false,
            rendezvous: None,
        };
        run_described(
            &self.worker.cache,
            self.store.as_ref(),
            &description,
            &stage,
            &Default::default(),
            &Silent,
        )
        .map_err(DispatchError::Failed)?;
        Ok(format!("job-{}", self.jobs.fetch_add(1, Ordering::SeqCst)))
    }
}

impl Env {
    fn run_with(
        &self,
        stages: Vec<Box<dyn Stage>>,
        store: &std::sync::Arc<MemoryStore>,
        dispatch: Option<Dispatch>,
    ) -> BuildOutcome {
        let plan = Plan::new(stages).unwrap();
        let remote = Remote {
            store: store.clone(),
            write: true,
        };
        let options = BuildOptions {
            jobs: 2,
            remote: Some(remote),
            dispatch,
            ..BuildOptions::default()
        };
        execute(&plan, &self.cache, &self.stat, "test", &options, &Silent).unwrap()
    }
}

#[test]
fn a_dispatched_stage_comes_back_through_the_store_under_its_key() {
    let store = std::sync::Arc::new(MemoryStore::default());
    let elsewhere = std::sync::Arc::new(Elsewhere {
        store: store.clone(),
        worker: Env::new(),
        down: false,
        jobs: AtomicUsize::new(0),
    });
    let dispatch = Some(Dispatch {
        executor: elsewhere.clone(),
        fallback_local: false,
    });
    let env = Env::new();
    let outcome = env.run_with(diamond("x", "y"), &store, dispatch.clone());
    assert_eq!(outcome.failure(), None, "{:?}", outcome.stages);
    assert_eq!(with_status(&outcome, StageStatus::Remote), ["b"]);
    assert_eq!(with_status(&outcome, StageStatus::Ran), ["a", "c", "d"]);
    assert_eq!(outcome.get("b").unwrap().job.as_deref(), Some("job-0"));
    // The same key and bytes as a local build's.
    let local = Env::new().run(diamond("x", "y"), 2);
    for stage in ["b", "d"] {
        let (remote, here) = (
            outcome.get(stage).unwrap().record.as_ref().unwrap(),
            local.get(stage).unwrap().record.as_ref().unwrap(),
        );
        assert_eq!(
            (&remote.key, &remote.outputs),
            (&here.key, &here.outputs),
            "{stage}"
        );
    }
    // Again: nothing runs, nothing is sent.
    let again = env.run_with(diamond("x", "y"), &store, dispatch.clone());
    assert_eq!(
        with_status(&again, StageStatus::Cached),
        ["a", "b", "c", "d"]
    );
    assert_eq!(elsewhere.jobs.load(Ordering::SeqCst), 1);
    // A change to `b` sends one job; `d` runs here once it is back.
    let changed = env.run_with(diamond("x", "w"), &store, dispatch);
    assert_eq!(with_status(&changed, StageStatus::Remote), ["b"]);
    assert_eq!(with_status(&changed, StageStatus::Ran), ["d"]);
    assert_eq!(elsewhere.jobs.load(Ordering::SeqCst), 2);
}

#[test]
fn an_unreachable_executor_fails_the_stage_or_falls_back() {
    let store = std::sync::Arc::new(MemoryStore::default());
    let down = std::sync::Arc::new(Elsewhere {
        store: store.clone(),
        worker: Env::new(),
        down: true,
        jobs: AtomicUsize::new(0),
    });
    let env = Env::new();
    let outcome = env.run_with(
        diamond("x", "y"),
        &store,
        Some(Dispatch {
            executor: down.clone(),
            fallback_local: false,
        }),
    );
    assert_eq!(with_status(&outcome, StageStatus::Failed), ["b"]);
    assert_eq!(with_status(&outcome, StageStatus::Skipped), ["d"]);
    assert_eq!(
        outcome.get("b").unwrap().error.as_ref().unwrap().message,
        "elsewhere is down"
    );
    let outcome = env.run_with(
        diamond("x", "y"),
        &store,
        Some(Dispatch {
            executor: down,
            fallback_local: true,
        }),
    );
    assert_eq!(outcome.failure(), None);
    assert_eq!(with_status(&outcome, StageStatus::Ran), ["b", "d"]);
}

#[test]
fn a_worker_refuses_a_description_whose_key_it_would_not_compute() {
    let store = std::sync::Arc::new(MemoryStore::default());
    let elsewhere = std::sync::Arc::new(Elsewhere {
        store: store.clone(),
        worker: Env::new(),
        down: false,
        jobs: AtomicUsize::new(0),
    });
    let env = Env::new();
    // The build's tools differ from the worker's (none): another symb.
    let plan = Plan::new(diamond("x", "y")).unwrap();
    let options = BuildOptions {
        jobs: 2,
        tools: [("symb".to_string(), "9.9.9".to_string())].into(),
        remote: Some(Remote {
            store: store.clone(),
            write: true,
        }),
        dispatch: Some(Dispatch {
            executor: elsewhere,
            fallback_local: false,
        }),
        ..BuildOptions::default()
    };
    let outcome = execute(&plan, &env.cache, &env.stat, "test", &options, &Silent).unwrap();
    let message = &outcome.get("b").unwrap().error.as_ref().unwrap().message;
    assert!(
        message.contains("another key") && message.contains("symb") && message.contains("9.9.9"),
        "{message}"
    );
}

/// A stage error says its cause in its words and keeps the cause itself, so
/// `source()` walks from what the stage was doing to what failed under it.
#[test]
fn a_stage_error_keeps_its_cause() {
    use std::error::Error;
    let cause = std::io::Error::new(std::io::ErrorKind::NotFound, "no such file");
    let error = StageError::failed("cannot read `corpus/a.txt`").because(cause);
    assert_eq!(
        error.to_string(),
        "cannot read `corpus/a.txt`: no such file"
    );
    let source = error.source().expect("the cause is kept");
    assert_eq!(source.to_string(), "no such file");
    let io = source
        .downcast_ref::<std::io::Error>()
        .expect("as the io::Error it was");
    assert_eq!(io.kind(), std::io::ErrorKind::NotFound);
    // In its own words, and whose fault it was.
    let error = StageError::bad_input_from(std::io::Error::other("bad bytes"));
    assert_eq!(
        (error.class, error.to_string().as_str()),
        (FailureClass::BadInput, "bad bytes")
    );
    assert!(error.source().is_some());
    assert!(StageError::failed("plain").source().is_none());
}
