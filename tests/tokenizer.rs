//! The tokenizer stage against independent references: separate processes
//! (determinism), the `tokenizers` crate loading the artifact (round trip),
//! and the Python `tokenizers` library (same model, same ids).
#![allow(clippy::unwrap_used)] // a test: a panic is how it fails

mod common;

use std::process::Command;

use common::{TestProject, demo_lines};

const PRE_TOKENIZERS: [&str; 3] = ["byte_level", "whitespace", "metaspace"];

fn project(pre_tokenizer: &str, vocab_size: u32, lines: usize) -> TestProject {
    let project = TestProject::new(lines);
    project.edit(
        "pre_tokenizer = \"byte_level\"",
        &format!("pre_tokenizer = \"{pre_tokenizer}\""),
    );
    project.edit("vocab_size = 400", &format!("vocab_size = {vocab_size}"));
    project
}

/// The corpus documents as the corpus stage sees them.
fn corpus_lines(project: &TestProject) -> Vec<String> {
    ["a", "b", "c"]
        .iter()
        .flat_map(|n| {
            project
                .read(&format!("corpus/{n}.txt"))
                .lines()
                .map(|l| l.trim().to_string())
                .collect::<Vec<_>>()
        })
        .filter(|l| !l.is_empty())
        .collect()
}

fn python() -> Command {
    let check = Command::new("python3")
        .args(["-c", "import tokenizers"])
        .output()
        .expect("python3 runs");
    assert!(
        check.status.success(),
        "the Python tokenizers library is missing: python3 -m pip install -r tests/requirements.txt"
    );
    let mut command = Command::new("python3");
    command.env("TOKENIZERS_PARALLELISM", "true");
    command
}

#[test]
fn tokenizer_json_is_byte_identical_across_processes() {
    for pre_tokenizer in PRE_TOKENIZERS {
        let (first, second) = (
            project(pre_tokenizer, 1500, 1000),
            project(pre_tokenizer, 1500, 1000),
        );
        first.build_ok();
        second.build_ok();
        let (a, b) = (
            std::fs::read(first.path("dist/tokenizer.json")).unwrap(),
            std::fs::read(second.path("dist/tokenizer.json")).unwrap(),
        );
        assert!(
            a == b,
            "{pre_tokenizer}: two processes trained different tokenizers"
        );
        let json: serde_json::Value = serde_json::from_slice(&a).unwrap();
        assert!(
            json["model"]["merges"].as_array().unwrap().len() > 500,
            "{pre_tokenizer}: the test should train real merges"
        );
    }
}

#[test]
fn every_corpus_line_round_trips() {
    for pre_tokenizer in PRE_TOKENIZERS {
        let project = project(pre_tokenizer, 800, 700);
        project.build_ok();
        let tokenizer =
            tokenizers::Tokenizer::from_file(project.path("dist/tokenizer.json")).unwrap();
        let lines = corpus_lines(&project);
        assert_eq!(lines.len(), 2100);
        for line in &lines {
            let encoding = tokenizer.encode(line.as_str(), false).unwrap();
            assert!(
                encoding.len() < line.len(),
                "{pre_tokenizer}: merges should shorten {line:?}"
            );
            assert_eq!(
                &tokenizer.decode(encoding.get_ids(), false).unwrap(),
                line,
                "{pre_tokenizer}"
            );
        }
    }
}

#[test]
fn the_model_equals_what_python_tokenizers_trains() {
    let project = TestProject::new(1);
    let corpus = demo_lines().join("\n") + "\n";
    project.write("corpus/a.txt", &corpus);
    project.write("corpus/b.txt", "");
    project.write("corpus/c.txt", "");
    project.edit("eval_fraction = 0.1", "eval_fraction = 0.0");
    project.edit("vocab_size = 400", "vocab_size = 6000");
    project.build_ok();
    let ours: serde_json::Value =
        serde_json::from_str(&project.read("dist/tokenizer.json")).unwrap();

    let script = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/python/train_tokenizer.py"
    );
    let output = python()
        .args([
            script,
            project.path("corpus/a.txt").to_str().unwrap(),
            "6000",
            "2",
            "<|endoftext|>",
            "<pad>",
        ])
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let theirs: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(
        ours["model"]["vocab"].as_object().unwrap().len(),
        theirs["model"]["vocab"].as_object().unwrap().len()
    );
    assert!(
        ours["model"] == theirs["model"],
        "the vocab or merges differ from Python's"
    );
    assert_eq!(ours["added_tokens"], theirs["added_tokens"]);
    assert_eq!(ours["pre_tokenizer"], theirs["pre_tokenizer"]);
    assert_eq!(ours["decoder"]["type"], theirs["decoder"]["type"]);

    // Python loads our file and encodes the corpus to the same ids as Rust.
    let encode = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/python/encode.py");
    let output = python()
        .args([
            encode,
            project.path("dist/tokenizer.json").to_str().unwrap(),
            project.path("corpus/a.txt").to_str().unwrap(),
        ])
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let tokenizer = tokenizers::Tokenizer::from_file(project.path("dist/tokenizer.json")).unwrap();
    let python_ids: Vec<Vec<u32>> = String::from_utf8(output.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let lines: Vec<&str> = corpus.lines().collect();
    assert_eq!(python_ids.len(), lines.len());
    for (line, ids) in lines.iter().zip(&python_ids) {
        assert_eq!(
            tokenizer.encode(*line, false).unwrap().get_ids(),
            ids.as_slice(),
            "{line:?}"
        );
    }
}

#[test]
fn a_lossy_pre_tokenizer_is_reported_with_the_line() {
    let project = project("metaspace", 400, 50);
    // Metaspace marks spaces with `▁`, so a line that starts with `▁` comes back without it.
    project.write("corpus/c.txt", "▁Kan-ka zuraeima pa ?\n");
    let build = project.build(&[]);
    assert_eq!(build.code, 1);
    let reason = build.reason("tokenizer");
    assert!(reason.contains("does not round-trip 1 of"), "{reason}");
    assert!(
        reason.contains("\"▁Kan-ka zuraeima pa ?\" decodes to \"Kan-ka zuraeima pa ?\""),
        "{reason}"
    );
}

#[test]
fn the_recorded_tokenizers_version_is_the_one_built() {
    let lock = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/Cargo.lock")).unwrap();
    let version = lock
        .split("[[package]]")
        .find(|p| p.contains("name = \"tokenizers\"\n"))
        .and_then(|p| p.split("version = \"").nth(1))
        .and_then(|v| v.split('"').next());
    assert_eq!(
        version,
        Some(symb::stages::shared::TOKENIZERS_VERSION),
        "update TOKENIZERS_VERSION: it is part of every tokenizer key"
    );
}
