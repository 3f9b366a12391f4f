//! Fault injection at every commit point (issue 11): for every stage of a
//! whole pipeline (corpus to bundle, two dtypes), the process is aborted
//! (`SYMB_FAULT`, as `kill -9` would end it) after the stage's blobs are
//! written and again after its record is committed, then while the new
//! output folder is staged and right after it is swapped in. After each
//! crash the output folder is whole and `cache verify` is clean; each next
//! build goes on from where the last one died, and the last one's output
//! equals an uninterrupted build's.
#![allow(clippy::unwrap_used)] // a test: a panic is how it fails

mod common;

use std::os::unix::process::ExitStatusExt;
use std::process::Command;

use common::{BIN, TestProject, snapshot};

/// The small training pipeline, exported in two dtypes and verified.
fn pipeline() -> String {
    format!(
        "{}\n[export]\ntargets = [\"fp32\", \"q4\"]\n\n[verify]\nprompts = 2\nmax_new_tokens = 4\n",
        common::SCRATCH_TRAINING
    )
}

fn build(
    project: &TestProject,
    salt: &str,
    fault: Option<&str>,
    json: bool,
) -> std::process::Output {
    let mut command = Command::new(BIN);
    command
        .args(["build", "-j", "1"])
        .args(json.then_some("--json"))
        .current_dir(project.dir.path())
        .env_remove("RUST_LOG")
        .env("SYMB_CACHE_SALT", salt);
    match fault {
        Some(point) => command.env("SYMB_FAULT", point),
        None => command.env_remove("SYMB_FAULT"),
    };
    command.output().expect("symb runs")
}

/// Files that say how long verification took (so differ between two runs
/// of the same build), and the marker that lists their digests.
const TIMED: [&str; 4] = [
    "reports/verify.fp32.json",
    "reports/verify.q4.json",
    "report.html",
    ".symb-output.json",
];

/// The same files as `reference`, with the same bytes but for timings; the
/// timed files are whole (they parse, the page ends).
fn assert_same_build(
    now: &std::collections::BTreeMap<String, Vec<u8>>,
    reference: &std::collections::BTreeMap<String, Vec<u8>>,
    after: &str,
) {
    assert!(
        now.keys().eq(reference.keys()),
        "after `{after}`: {:?} vs {:?}",
        now.keys(),
        reference.keys()
    );
    for (path, bytes) in now {
        if TIMED.contains(&path.as_str()) {
            let whole = if path.ends_with(".json") {
                serde_json::from_slice::<serde_json::Value>(bytes).is_ok()
            } else {
                String::from_utf8_lossy(bytes)
                    .trim_end()
                    .ends_with("</html>")
            };
            assert!(whole, "after `{after}`: `{path}` is not whole");
        } else {
            assert!(
                *bytes == reference[path],
                "after `{after}`: `{path}` differs from an uninterrupted build's"
            );
        }
    }
}

fn assert_cache_clean(project: &TestProject, after: &str) {
    let verify = project.symb(&["cache", "verify"]);
    let stderr = String::from_utf8_lossy(&verify.stderr);
    assert!(
        verify.status.success() && stderr.contains(": 0 corrupt, 0 missing, 0 changed"),
        "cache verify after a crash at `{after}`: {stderr}"
    );
}

#[test]
fn a_crash_at_any_commit_point_loses_nothing() {
    let project = TestProject::with_manifest(&pipeline(), 100);
    let first = build(&project, "a", None, true);
    assert!(
        first.status.success(),
        "{}",
        String::from_utf8_lossy(&first.stderr)
    );
    let reference = snapshot(&project.path("dist"));
    assert!(
        reference.contains_key("onnx/model_q4.onnx") && reference.contains_key(".symb-output.json")
    );
    // The order the stages ran in (one job: the schedule is the same each time).
    let stages: Vec<String> = String::from_utf8_lossy(&first.stdout)
        .lines()
        .map(|line| serde_json::from_str::<serde_json::Value>(line).unwrap())
        .filter(|event| event["event"] == "stage" && event["status"] == "ran")
        .map(|event| event["stage"].as_str().unwrap().to_string())
        .collect();
    assert!(stages.len() >= 10, "{stages:?}");

    // A new salt gives every stage a new key: each runs again, and crashes.
    let mut points: Vec<String> = Vec::new();
    for stage in &stages {
        if stage == "finetune" {
            // Mid-checkpoint at step 4: step 4's parameters beside step 2's
            // optimizer state and step count. Resuming from that mixture would
            // give another model; the next build must notice and start over.
            points.push("checkpoint-partial:4".to_string());
        }
        points.extend([
            format!("after-blobs:{stage}"),
            format!("after-record:{stage}"),
        ]);
    }
    points.extend(["output-staged".to_string(), "output-swapped".to_string()]);
    for point in &points {
        if point.starts_with("output-") {
            // Stage results are identical, so the folder is current: change a
            // file's status (its ctime) to make the build assemble it again.
            let file = project.path("dist/config.json");
            let mode = std::fs::metadata(&file).unwrap().permissions();
            std::fs::set_permissions(&file, mode).unwrap();
        }
        let crashed = build(&project, "b", Some(point), false);
        let stderr = String::from_utf8_lossy(&crashed.stderr);
        assert_eq!(
            crashed.status.signal(),
            Some(6),
            "`{point}` was not reached (exit {:?}): {stderr}",
            crashed.status.code()
        );
        assert!(
            stderr.contains(&format!("aborting at `{point}`")),
            "{stderr}"
        );
        // Until the swap the previous folder is there, byte for byte; after
        // it, the new one, whole.
        let now = snapshot(&project.path("dist"));
        if point == "output-swapped" {
            assert_same_build(&now, &reference, point);
        } else {
            assert!(
                now == reference,
                "the output folder changed after a crash at `{point}`"
            );
        }
        assert_cache_clean(&project, point);
    }

    let last = build(&project, "b", None, false);
    assert!(
        last.status.success(),
        "{}",
        String::from_utf8_lossy(&last.stderr)
    );
    assert_same_build(&snapshot(&project.path("dist")), &reference, "the end");
    assert_cache_clean(&project, "the end");
    let leftovers: Vec<_> = std::fs::read_dir(project.dir.path())
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().contains("symb-new"))
        .collect();
    assert!(
        leftovers.is_empty(),
        "staging folders left behind: {leftovers:?}"
    );
    eprintln!("{} crash points, every one survived", points.len());
}
