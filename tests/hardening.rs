//! What an adversarial probe found (issue 31), each as it was reported:
//! `status` that sees the output folder, SIGTERM and SIGHUP handled as
//! Ctrl-C, corpus files with a byte-order mark or old Mac line ends, an eval
//! split emptied by identical documents, a tokenizer short of its
//! vocabulary, a read-only cache, and a cache path the filesystem refuses.
#![allow(clippy::unwrap_used)] // a test: a panic is how it fails

mod common;

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};

use common::{BIN, SCRATCH_TRAINING, TestProject};

fn status(project: &TestProject) -> (i32, String, serde_json::Value) {
    let text = project.symb(&["status", "--exit-code"]);
    let json = project.symb(&["status", "--json"]);
    (
        text.status.code().unwrap(),
        String::from_utf8(text.stdout).unwrap(),
        serde_json::from_slice(&json.stdout).unwrap(),
    )
}

/// D5: `status` compares the output folder with the plan: a folder that
/// is gone, a file edited, or a folder left from another build (a failed
/// swap) is stale, with `--exit-code` 1 and the file named.
#[test]
fn status_sees_the_output_folder() {
    let project = TestProject::new(100);
    project.build_ok();
    let (code, text, json) = status(&project);
    assert_eq!(code, 0, "{text}");
    assert_eq!(json["output"]["current"], true, "{json}");
    assert_eq!(json["fresh"], true);

    std::fs::remove_dir_all(project.path("dist")).unwrap();
    let (code, text, json) = status(&project);
    assert_eq!(code, 1, "a missing output folder is stale: {text}");
    assert!(
        text.contains("Stale output `dist`: it is not there; `symb build` writes it anew"),
        "{text}"
    );
    assert_eq!(
        (&json["fresh"], &json["output"]["absent"]),
        (&false.into(), &true.into()),
        "{json}"
    );
    project.build_ok();

    project.write("dist/tokenizer.json", "{}");
    let (code, text, json) = status(&project);
    assert_eq!(code, 1, "{text}");
    assert!(text.contains("`tokenizer.json` not as built"), "{text}");
    assert_eq!(
        json["output"]["differ"],
        serde_json::json!(["tokenizer.json"])
    );
    project.build_ok();
    assert_eq!(status(&project).0, 0);

    // The output of an earlier build, as a failed swap leaves it.
    let old = tempfile::tempdir().unwrap();
    for file in common::walk(&project.path("dist")) {
        let to = old
            .path()
            .join(file.strip_prefix(project.path("dist")).unwrap());
        std::fs::create_dir_all(to.parent().unwrap()).unwrap();
        std::fs::copy(&file, to).unwrap();
    }
    project.edit("vocab_size = 400", "vocab_size = 420");
    project.build_ok();
    std::fs::remove_dir_all(project.path("dist")).unwrap();
    for file in common::walk(old.path()) {
        let to = project
            .path("dist")
            .join(file.strip_prefix(old.path()).unwrap());
        std::fs::create_dir_all(to.parent().unwrap()).unwrap();
        std::fs::copy(&file, to).unwrap();
    }
    let (code, text, json) = status(&project);
    assert_eq!(code, 1, "{text}");
    assert!(
        json["stages"]
            .as_array()
            .unwrap()
            .iter()
            .all(|s| s["fresh"] == true),
        "every stage is fresh: {json}"
    );
    assert_eq!(
        json["output"]["differ"],
        serde_json::json!(["tokenizer.json"]),
        "{json}"
    );
}

/// D9: SIGTERM (CI cancelling, `timeout`, `docker stop`) and SIGHUP stop a
/// build as Ctrl-C does: what stopped is said, the JSON stream ends with an
/// `interrupted` event, and the exit code is 128 plus the signal.
#[test]
fn sigterm_and_sighup_stop_a_build_as_ctrl_c_does() {
    let manifest = SCRATCH_TRAINING
        .replace("max_steps = 6", "max_steps = 100000")
        .replace("eval_every = 3", "eval_every = 100000");
    let project = TestProject::with_manifest(&manifest, 40);
    for (signal, code) in [("TERM", 143), ("HUP", 129)] {
        let mut child = Command::new(BIN)
            .args(["build", "--json"])
            .current_dir(project.dir.path())
            .env_remove("RUST_LOG")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        loop {
            let line = lines
                .next()
                .expect("the build prints progress before it ends")
                .unwrap();
            let event: serde_json::Value = serde_json::from_str(&line).unwrap();
            if event["event"] == "progress"
                && event["stage"] == "finetune"
                && event["step"].as_u64().unwrap() >= 3
            {
                break;
            }
        }
        assert!(
            Command::new("kill")
                .args([&format!("-{signal}"), &child.id().to_string()])
                .status()
                .unwrap()
                .success()
        );
        let rest: Vec<String> = lines.map_while(Result::ok).collect();
        let status = child.wait().unwrap();
        let mut stderr = String::new();
        std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut stderr).unwrap();
        assert_eq!(status.code(), Some(code), "SIG{signal}: {stderr}");
        assert!(
            stderr.contains("Interrupted") && stderr.contains("stopped finetune at "),
            "SIG{signal}: {stderr}"
        );
        let last: serde_json::Value =
            serde_json::from_str(rest.last().expect("an interrupted event")).unwrap();
        assert_eq!(last["event"], "interrupted", "SIG{signal}: {rest:?}");
    }
}

/// The documents the corpus stage wrote (train and eval).
fn documents(project: &TestProject) -> Vec<String> {
    let mut texts = Vec::new();
    for record in std::fs::read_dir(project.path("cache/v1/actions"))
        .unwrap()
        .flatten()
    {
        let record: serde_json::Value =
            serde_json::from_slice(&std::fs::read(record.path()).unwrap()).unwrap();
        if record["stage"] != "corpus" {
            continue;
        }
        for split in ["train.jsonl", "eval.jsonl"] {
            let digest = record["outputs"][split]["digest"].as_str().unwrap();
            let text = project.read(&format!("cache/v1/blobs/{}/{digest}", &digest[..2]));
            texts.extend(text.lines().map(|l| {
                serde_json::from_str::<serde_json::Value>(l).unwrap()["text"]
                    .as_str()
                    .unwrap()
                    .to_string()
            }));
        }
    }
    texts
}

/// D10: a UTF-8 byte-order mark is not part of the first document, and a
/// file with old Mac line ends (CR alone) is one document a line.
#[test]
fn a_byte_order_mark_and_cr_line_ends_are_read_as_text_editors_do() {
    let project = TestProject::new(20);
    let lines = common::demo_lines();
    for name in ["a", "b", "c"] {
        std::fs::remove_file(project.path(&format!("corpus/{name}.txt"))).unwrap();
    }
    project.write(
        "corpus/bom.txt",
        &format!("\u{feff}{}\n{}\n", lines[0], lines[1]),
    );
    project.write("corpus/mac.txt", &lines[2..40].join("\r"));
    project.write("corpus/dos.txt", &(lines[40..60].join("\r\n") + "\r\n"));
    project.build_ok();
    let documents = documents(&project);
    assert_eq!(documents.len(), 60, "one document a line, whatever ends it");
    assert!(
        documents.contains(&lines[0]),
        "the first line has no byte-order mark"
    );
    assert!(
        documents
            .iter()
            .all(|d| !d.contains('\u{feff}') && !d.contains('\r'))
    );
}

/// An eval split that identical documents leave empty fails in `corpus`,
/// before anything trains (verify used to find it empty after training).
#[test]
fn an_eval_split_emptied_by_identical_documents_fails_in_corpus() {
    let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tiny-gpt2");
    let project = TestProject::with_manifest(
        &format!(
            "[project]\nname = \"t\"\n\n[corpus]\nfiles = [\"corpus/*.txt\"]\n\n[base]\nmodel = \
                \"path:{}\"\n\n[export]\ntargets = [\"fp32\"]\n",
            fixture.display()
        ),
        10,
    );
    for name in ["a", "b", "c"] {
        project.write(
            &format!("corpus/{name}.txt"),
            &"Kan-ka vo aestel .\n".repeat(50),
        );
    }
    let build = project.build(&[]);
    assert_eq!(build.code, 2, "{}", build.stderr);
    let corpus = build
        .events
        .iter()
        .find(|e| e["event"] == "stage" && e["stage"] == "corpus")
        .unwrap();
    assert_eq!(corpus["status"], "failed");
    let reason = corpus["reason"].as_str().unwrap();
    assert!(
        reason.contains(
            "the eval split is empty: `corpus.eval_fraction` = 0.05 of 150 \
        documents (1 distinct) drew none"
        ),
        "{reason}"
    );
    assert!(
        reason.contains("add distinct documents, raise `corpus.eval_fraction`, or set it to 0"),
        "{reason}"
    );
}

/// A tokenizer that cannot reach `vocab_size` says so, with both numbers.
#[test]
fn a_tokenizer_short_of_its_vocabulary_says_so() {
    let project = TestProject::new(20);
    project.edit("vocab_size = 400", "vocab_size = 100000");
    let build = project.build_ok();
    let warning = build
        .events
        .iter()
        .find(|e| e["event"] == "warning" && e["code"] == "vocab-shortfall")
        .unwrap_or_else(|| panic!("{:?}", build.events));
    assert_eq!(warning["stage"], "tokenizer");
    let message = warning["message"].as_str().unwrap();
    let reached: u64 = message
        .strip_prefix("the tokenizer reached ")
        .and_then(|m| m.split(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("{message}"));
    assert!(
        reached < 100_000 && message.contains("of the 100000 that `tokenizer.vocab_size` asks for"),
        "{message}"
    );
    assert!(
        warning["help"]
            .as_str()
            .unwrap()
            .contains(&format!("`tokenizer.vocab_size = {reached}`")),
        "{warning}"
    );
}

/// symb with `cache/` mounted read-only (in a user and mount namespace of
/// its own, so no privilege is needed).
fn read_only_symb(project: &TestProject, args: &[&str]) -> (i32, String, String) {
    let script = "mount --bind cache cache && mount -o remount,ro,bind cache && exec \"$0\" \"$@\"";
    let out = Command::new("unshare")
        .args(["-rm", "sh", "-c", script, BIN])
        .args(args)
        .current_dir(project.dir.path())
        .env_remove("RUST_LOG")
        .output()
        .expect("unshare runs");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A read-only cache serves what reads it (a no-op build, `status`, `cache
/// verify`); a build that must write says `cannot write` and the path.
#[test]
fn a_read_only_cache_serves_reads_and_says_cannot_write() {
    let project = TestProject::new(100);
    project.build_ok();
    let (code, stdout, stderr) = read_only_symb(&project, &["build", "--json"]);
    assert_eq!(code, 0, "a no-op build on a read-only cache: {stderr}");
    assert!(
        stdout.contains("\"status\":\"cached\"") && !stdout.contains("\"status\":\"ran\""),
        "{stdout}"
    );
    let (code, _, stderr) = read_only_symb(&project, &["cache", "verify"]);
    assert_eq!(code, 0, "{stderr}");
    let (code, _, stderr) = read_only_symb(&project, &["status", "--exit-code"]);
    assert_eq!(code, 0, "{stderr}");
    project.edit("vocab_size = 400", "vocab_size = 430");
    let (code, _, stderr) = read_only_symb(&project, &["build"]);
    assert_eq!(code, 1, "{stderr}");
    assert!(
        stderr.contains("cannot write `") && stderr.contains("Read-only file system"),
        "{stderr}"
    );
    assert!(!stderr.contains("cache I/O error"), "{stderr}");
}

/// A cache path the filesystem refuses is the manifest's error, at its
/// line, as the same output path is.
#[test]
fn a_cache_path_the_filesystem_refuses_points_at_its_line() {
    let project = TestProject::new(10);
    let long: String = "c".repeat(5000);
    let text = project.read("symb.toml").replace(
        "output = \"dist\"",
        &format!("output = \"dist\"\ncache = \"{long}\""),
    );
    project.write("symb.toml", &text);
    let out = project.symb(&["build"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("`project.cache` cannot be used: File name too long")
            && stderr.contains("symb.toml:4:"),
        "{stderr}"
    );
}
