//! Crashes, corruption and concurrency: a killed build, a flipped byte in
//! the cache and two simultaneous builds all end with a correct output.
#![allow(clippy::unwrap_used)] // a test: a panic is how it fails

mod common;

use std::process::{Command, Stdio};
use std::time::Duration;

use common::{BIN, TestProject, set, snapshot};

/// Reference output of a project's inputs, built from scratch elsewhere.
fn reference_output(project: &TestProject) -> std::collections::BTreeMap<String, Vec<u8>> {
    let reference = TestProject::new(1);
    for file in ["symb.toml", "corpus/a.txt", "corpus/b.txt", "corpus/c.txt"] {
        reference.write(file, &project.read(file));
    }
    reference.build_ok();
    snapshot(&reference.path("dist"))
}

/// Every action record parses and every blob matches its name.
fn assert_cache_sound(project: &TestProject) {
    let verify = project.symb(&["cache", "verify"]);
    let stderr = String::from_utf8_lossy(&verify.stderr);
    assert!(
        verify.status.success(),
        "cache verify after a kill: {stderr}"
    );
    assert!(stderr.contains(": 0 corrupt, 0 missing"), "{stderr}");
}

#[test]
fn kill_9_at_any_moment_then_build_gives_the_right_result() {
    let project = TestProject::new(1500);
    let expected = reference_output(&project);
    project.build_ok();
    // Build a different vocabulary size, killed at increasing delays: some
    // kills land before, some inside the tokenizer stage or the output swap.
    let mut vocab = 400;
    let mut killed_inside_a_stage = 0;
    for delay_ms in [0u64, 5, 20, 50, 100, 200, 300, 450, 700] {
        let previous = snapshot(&project.path("dist"));
        project.edit(
            &format!("vocab_size = {vocab}"),
            &format!("vocab_size = {}", vocab + 7),
        );
        vocab += 7;
        let tmp_entries = || -> std::collections::BTreeSet<_> {
            std::fs::read_dir(project.path("cache/v1/tmp"))
                .map(|d| d.flatten().map(|e| e.file_name()).collect())
                .unwrap_or_default()
        };
        let before = tmp_entries();
        let mut child = Command::new(BIN)
            .args(["build", "--json"])
            .current_dir(project.dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(Duration::from_millis(delay_ms));
        child.kill().unwrap(); // SIGKILL
        let status = child.wait().unwrap();
        let now = snapshot(&project.path("dist"));
        let work_folders = tmp_entries().difference(&before).count();
        if !status.success() && work_folders > 0 {
            killed_inside_a_stage += 1;
        }
        if !status.success() {
            // Killed: the output is the previous one or, if the swap had
            // already happened, the new one; never a mixture or a partial file.
            let complete_new = now.keys().eq(previous.keys())
                && now
                    .values()
                    .all(|v| serde_json::from_slice::<serde_json::Value>(v).is_ok());
            assert!(
                now == previous || complete_new,
                "partial output after a kill at {delay_ms} ms"
            );
        }
        assert_cache_sound(&project);
    }
    assert!(
        killed_inside_a_stage >= 1,
        "no kill landed inside a running stage; the test proves nothing"
    );
    project.edit(&format!("vocab_size = {vocab}"), "vocab_size = 400");
    project.build_ok();
    assert_eq!(snapshot(&project.path("dist")), expected);
    let leftovers: Vec<_> = std::fs::read_dir(project.dir.path())
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().contains("symb-new"))
        .collect();
    assert!(
        leftovers.is_empty(),
        "staging folders left behind: {leftovers:?}"
    );
}

fn blob_of(project: &TestProject, needle: &str) -> std::path::PathBuf {
    // The blob of the stage's artifact, found through its action record.
    let actions = project.path("cache/v1/actions");
    for entry in std::fs::read_dir(actions).unwrap().flatten() {
        let record: serde_json::Value =
            serde_json::from_slice(&std::fs::read(entry.path()).unwrap()).unwrap();
        if let Some(blob) = record["outputs"].get(needle) {
            let digest = blob["digest"].as_str().unwrap();
            return project.path(&format!("cache/v1/blobs/{}/{digest}", &digest[..2]));
        }
    }
    panic!("no artifact `{needle}` in the cache");
}

fn flip_byte(path: &std::path::Path) {
    let mut bytes = std::fs::read(path).unwrap();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0x20;
    std::fs::write(path, bytes).unwrap();
}

#[test]
fn a_flipped_byte_is_found_by_cache_verify() {
    let project = TestProject::new(100);
    project.build_ok();
    flip_byte(&blob_of(&project, "train.jsonl"));
    let verify = project.symb(&["cache", "verify"]);
    let stderr = String::from_utf8_lossy(&verify.stderr);
    assert_eq!(verify.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("does not match its content\n"),
        "reported, not removed: {stderr}"
    );
    let repair = project.symb(&["cache", "verify", "--repair"]);
    let stderr = String::from_utf8_lossy(&repair.stderr);
    assert!(
        stderr.contains("does not match its content (removed)"),
        "{stderr}"
    );
    assert!(
        stderr.contains("corpus: artifact `train.jsonl`"),
        "{stderr}"
    );
    // The corrupt entry is gone: the next build re-runs the stage that made it.
    let build = project.build_ok();
    assert_eq!(build.ran(), set(&["corpus"]));
    assert_eq!(build.reason("corpus"), "its cached result is missing");
    assert_cache_sound(&project);
}

#[test]
fn a_flipped_byte_is_found_by_the_next_build_that_reads_it() {
    let project = TestProject::new(100);
    project.build_ok();
    let expected_after_edit = {
        let reference = TestProject::new(100);
        reference.edit("vocab_size = 400", "vocab_size = 430");
        reference.build_ok();
        snapshot(&reference.path("dist"))
    };
    // The tokenizer must re-run and read the corrupt corpus artifact.
    flip_byte(&blob_of(&project, "train.jsonl"));
    project.edit("vocab_size = 400", "vocab_size = 430");
    let build = project.build_ok();
    assert!(
        build.stderr.contains("corrupt cache entry"),
        "{}",
        build.stderr
    );
    assert_eq!(snapshot(&project.path("dist")), expected_after_edit);
    assert_cache_sound(&project);
}

#[test]
fn a_flipped_byte_in_a_published_artifact_is_never_served() {
    let project = TestProject::new(100);
    project.build_ok();
    let good = snapshot(&project.path("dist"));
    flip_byte(&blob_of(&project, "tokenizer.json"));
    std::fs::remove_dir_all(project.path("dist")).unwrap();
    let build = project.build_ok();
    assert!(
        build.stderr.contains("corrupt cache entry"),
        "{}",
        build.stderr
    );
    assert_eq!(snapshot(&project.path("dist")), good);
}

#[test]
fn two_builds_started_together_both_succeed_with_identical_outputs() {
    let project = TestProject::new(1000);
    let spawn = || {
        Command::new(BIN)
            .args(["build", "--json"])
            .current_dir(project.dir.path())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    };
    let (first, second) = (spawn(), spawn());
    let (first, second) = (
        first.wait_with_output().unwrap(),
        second.wait_with_output().unwrap(),
    );
    assert!(
        first.status.success(),
        "{}",
        String::from_utf8_lossy(&first.stderr)
    );
    assert!(
        second.status.success(),
        "{}",
        String::from_utf8_lossy(&second.stderr)
    );
    let ran = |out: &std::process::Output| {
        String::from_utf8_lossy(&out.stdout)
            .matches("\"status\":\"ran\"")
            .count()
    };
    assert_eq!(
        ran(&first) + ran(&second),
        2,
        "each stage ran once, in one of the two builds"
    );
    let output = snapshot(&project.path("dist"));
    assert_eq!(output, reference_output(&project));
    assert_cache_sound(&project);
}
