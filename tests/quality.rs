//! Whether the model is any good, as the output folder says it: the
//! samples in report.html, and exact match and chrF of the greedy replies
//! on prompt/completion data, checked against sacreBLEU's chrF.
#![allow(clippy::unwrap_used)] // a test: a panic is how it fails

mod common;

use std::process::Command;

use common::TestProject;

/// sacreBLEU's corpus chrF (its defaults) of `pairs` (hypothesis, reference).
fn sacrebleu_chrf(pairs: &[(String, String)]) -> f64 {
    let script = "import json, sys, sacrebleu\n\
        pairs = json.load(sys.stdin)\n\
        print(sacrebleu.corpus_chrf([h for h, _ in pairs], [[r for _, r in pairs]]).score)";
    let mut child = Command::new("python3")
        .args(["-c", script])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    serde_json::to_writer(child.stdin.take().unwrap(), &pairs).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "sacrebleu is installed (tests/setup.sh)"
    );
    String::from_utf8(out.stdout)
        .unwrap()
        .trim()
        .parse()
        .unwrap()
}

#[test]
fn chrf_is_sacrebleus() {
    let cases: Vec<Vec<(&str, &str)>> = vec![
        vec![(
            "The relationship between Obama and Netanyahu is not exactly friendly.",
            "The ties between Obama and Netanyahu are not particularly friendly.",
        )],
        vec![
            ("Kan-ka zuraeima pa ?", "Kan-ka zuraeima pa ?"),
            ("Woyil-ka zou-ni", "Woyil-ka zou-ni ne raiquis ."),
            ("", "Nouses-ka poulkain-ni"),
            ("ñandú çà 東京 x", "ñandú ça 東京"),
        ],
        vec![("a", "b")],
    ];
    for pairs in cases {
        let ours = symb::model::health::chrf(pairs.iter().copied());
        let owned: Vec<(String, String)> = pairs
            .iter()
            .map(|(h, r)| (h.to_string(), r.to_string()))
            .collect();
        let theirs = sacrebleu_chrf(&owned);
        assert!(
            (ours - theirs).abs() < 1e-9,
            "{pairs:?}: symb {ours}, sacreBLEU {theirs}"
        );
    }
}

#[test]
fn prompt_completion_data_gets_samples_and_task_metrics() {
    let project = TestProject::with_manifest(common::SCRATCH_TRAINING, 10);
    std::fs::remove_dir_all(project.path("corpus")).unwrap();
    // Each line's first three words ask for the rest.
    let mut jsonl = String::new();
    for line in &common::demo_lines()[..1500] {
        let words: Vec<&str> = line.split_whitespace().collect();
        if words.len() < 5 {
            continue;
        }
        jsonl.push_str(
            &serde_json::json!({"prompt": words[..3].join(" "), "completion": words[3..].join(" ")})
                .to_string(),
        );
        jsonl.push('\n');
    }
    project.write("data/pairs.jsonl", &jsonl);
    project.edit(
        "files = [\"corpus/*.txt\"]",
        "files = [\"data/*.jsonl\"]\nprompt_field = \"prompt\"\ncompletion_field = \"completion\"",
    );
    project.edit("max_steps = 6", "max_steps = 40");
    project.write(
        "symb.toml",
        &(project.read("symb.toml") + "\n[export]\ntargets = [\"fp32\", \"q8\"]\n"),
    );
    project.build_ok();
    let samples: serde_json::Value =
        serde_json::from_str(&project.read("dist/reports/samples.json")).unwrap();
    assert_eq!(samples["dtype"], "q8", "the page's dtype");
    let rows = samples["samples"].as_array().unwrap();
    assert!(
        rows.len() >= 8 && rows.iter().all(|r| r["expected"].is_string()),
        "{samples}"
    );
    // The task metrics are sacreBLEU's chrF and a count of exact replies.
    let task = &samples["task"];
    assert_eq!(task["prompts"].as_u64(), Some(rows.len() as u64));
    for side in ["fp32", "q8"] {
        let pairs: Vec<(String, String)> = rows
            .iter()
            .map(|r| {
                (
                    r[side].as_str().unwrap().to_string(),
                    r["expected"].as_str().unwrap().to_string(),
                )
            })
            .collect();
        let chrf = task[side]["chrf"].as_f64().unwrap();
        let theirs = sacrebleu_chrf(&pairs);
        assert!(
            (chrf - theirs).abs() < 1e-9 && chrf > 0.0,
            "{side}: symb {chrf}, sacreBLEU {theirs}"
        );
        let exact = pairs.iter().filter(|(a, b)| a == b).count() as f64 / pairs.len() as f64;
        assert_eq!(task[side]["exact_match"].as_f64(), Some(exact), "{side}");
    }
    // The replies are the model's: not empty, and each a continuation.
    assert!(
        rows.iter()
            .filter(|r| !r["fp32"].as_str().unwrap().is_empty())
            .count()
            > rows.len() / 2,
        "{samples}"
    );
    let report = project.read("dist/report.html");
    assert!(
        report.contains("<h2>Samples</h2>")
            && report.contains("exact match")
            && report.contains("chrF")
            && report.contains("<th>reference</th>"),
        "samples in report.html"
    );
    let first = rows[0]["prompt"].as_str().unwrap();
    assert!(report.contains(first), "{first} in report.html");
    let card = project.read("dist/README.md");
    assert!(
        card.contains("## Task metrics") && card.contains("chrF") && card.contains("## Samples"),
        "{card}"
    );
}
