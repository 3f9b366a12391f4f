//! Chat models (issue 34): conversations trained on their assistant turns
//! with the chat template, the loss held to PyTorch's, the template and the
//! end of turn in the output folder, and bad conversations refused at their
//! file and line.
#![allow(clippy::unwrap_used)] // a test: a panic is how it fails

mod common;

use std::path::{Path, PathBuf};

use common::{TestProject, snapshot};

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

/// LoRA on the tiny Llama fixture (whose tokenizer has `<|im_start|>` and
/// `<|im_end|>`), trained on `data/train.jsonl` and evaluated on
/// `data/eval.jsonl`, conversations in ChatML.
fn llama_chat_manifest() -> String {
    format!(
        r#"[corpus]
files = ["data/train.jsonl"]
eval_files = ["data/eval.jsonl"]

[base]
model = "path:{}"

[chat]
template = "chatml"

[finetune]
method = "lora"
rank = 4
batch_size = 2
block_size = 128
max_steps = 2
eval_every = 2
"#,
        fixtures().join("tiny-llama").display()
    )
}

fn llama_chat_project() -> TestProject {
    let project = TestProject::with_manifest(&llama_chat_manifest(), 0);
    let conversations =
        std::fs::read_to_string(fixtures().join("chat/conversations.jsonl")).unwrap();
    project.write("data/train.jsonl", &conversations);
    project.write("data/eval.jsonl", &conversations);
    project
}

fn metrics(project: &TestProject) -> serde_json::Value {
    serde_json::from_str(&project.read("dist/training/metrics.json")).unwrap()
}

/// The eval loss before training is the token-weighted mean cross-entropy
/// over the assistant turns (content through `<|im_end|>`), as PyTorch
/// computes it with transformers' own assistant mask
/// (`tests/python/chat_loss.py`, `tests/fixtures/chat/tiny-llama-loss.json`),
/// each conversation alone; symb packs them, several to a block.
#[test]
fn the_masked_eval_loss_is_pytorchs_and_packing_changes_nothing() {
    let project = llama_chat_project();
    project.build_ok();
    let reference: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(fixtures().join("chat/tiny-llama-loss.json")).unwrap(),
    )
    .unwrap();
    let m = metrics(&project);
    let (ours, theirs) = (
        m["initial_eval_loss"].as_f64().unwrap(),
        reference["mean_loss"].as_f64().unwrap(),
    );
    assert!(
        (ours - theirs).abs() < 1e-4,
        "masked eval loss {ours}, PyTorch {theirs}"
    );
    let tokens: u64 = reference["conversations"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["tokens"].as_u64().unwrap())
        .sum();
    assert_eq!(
        m["trained_tokens"], tokens,
        "the trained tokens are transformers'"
    );
    assert_eq!(m["conversations"]["eval"]["kept"], 7);
    assert!(
        m["eval_blocks"].as_u64().unwrap() < 7,
        "conversations are packed: {m}"
    );
    // The folder ships the template, and ends turns at `<|im_end|>`.
    let dist = project.path("dist");
    let config: serde_json::Value = read_json(&dist.join("tokenizer_config.json"));
    assert_eq!(config["chat_template"], symb::chat::CHATML);
    assert_eq!(config["eos_token"], "<|im_end|>");
    assert_eq!(
        std::fs::read_to_string(dist.join("chat_template.jinja")).unwrap(),
        symb::chat::CHATML
    );
    let tokenizer = tokenizers::Tokenizer::from_file(dist.join("tokenizer.json")).unwrap();
    let end = tokenizer.token_to_id("<|im_end|>").unwrap();
    let generation: serde_json::Value = read_json(&dist.join("generation_config.json"));
    assert_eq!(generation["eos_token_id"][0], end);
    assert_eq!(read_json(&dist.join("config.json"))["eos_token_id"], end);
}

/// What a build said: its stderr and its JSON events.
fn said(build: &common::Build) -> String {
    let events: Vec<String> = build
        .events
        .iter()
        .flat_map(|e| {
            ["reason", "message", "error"].map(|k| e[k].as_str().unwrap_or("").to_string())
        })
        .collect();
    format!("{}\n{}", build.stderr, events.join("\n"))
}

fn read_json(path: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

/// Each bad conversation or template fails with exit 2, names its file and
/// line, and leaves the output folder as it was.
#[test]
fn bad_conversations_and_templates_are_refused_at_their_line() {
    let project = llama_chat_project();
    project.build_ok();
    let good = project.read("data/train.jsonl");
    let before = snapshot(&project.path("dist"));
    let lines: Vec<&str> = good.lines().collect();
    let with_line_3 = |bad: &str| {
        let mut edited = lines.clone();
        edited[2] = bad;
        edited.join("\n") + "\n"
    };
    let cases: Vec<(String, &str)> = vec![
        (
            with_line_3(r#"{"text": "no messages here"}"#),
            "`data/train.jsonl`:3: no field `messages`",
        ),
        (
            with_line_3(r#"{"messages": [{"role": "tool", "content": "x"}]}"#),
            "`data/train.jsonl`:3: message 1: role `tool` is not one of system, user, assistant",
        ),
        (
            with_line_3(r#"{"messages": [{"role": "user", "content": ["a", "b"]}]}"#),
            "`data/train.jsonl`:3: message 1: `content` is a list, not a string",
        ),
        (
            with_line_3(
                r#"{"messages": [{"role": "system", "content": "a"}, {"role": "system", "content": "b"}, {"role": "user", "content": "c"}]}"#,
            ),
            "`data/train.jsonl`:3: message 2: a system message after the first message (a second system message)",
        ),
        (
            with_line_3(r#"{"messages": [{"role": "assistant", "content": "I start."}]}"#),
            "`data/train.jsonl:3`: the conversation starts with an assistant turn",
        ),
    ];
    for (train, expected) in &cases {
        project.write("data/train.jsonl", train);
        let build = project.build(&[]);
        assert_eq!(build.code, 2, "{expected}: {}", build.stderr);
        assert!(
            said(&build).contains(expected),
            "expected {expected:?} in:\n{}",
            said(&build)
        );
        assert_eq!(
            snapshot(&project.path("dist")),
            before,
            "{expected}: dist changed"
        );
    }
    // No assistant turn anywhere, with `train_on = "assistant"`.
    let questions: String = (0..4)
        .map(|i| {
            format!("{{\"messages\": [{{\"role\": \"user\", \"content\": \"Question {i}?\"}}]}}\n")
        })
        .collect();
    project.write("data/train.jsonl", &questions);
    let build = project.build(&[]);
    assert_eq!(build.code, 2, "{}", build.stderr);
    assert!(
        said(&build).contains("`chat.train_on` = \"assistant\", but none of the 4 conversations"),
        "{}",
        said(&build)
    );
    assert_eq!(snapshot(&project.path("dist")), before);
    project.write("data/train.jsonl", &good);
    // A template that refuses a system message: its own message, at the line.
    project.write(
        "no_system.jinja",
        "{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}\
         {% endif %}{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n\
         {% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}",
    );
    project.edit("template = \"chatml\"", "template = \"no_system.jinja\"");
    let build = project.build(&[]);
    assert_eq!(build.code, 2, "{}", build.stderr);
    assert!(
        said(&build).contains(
            "`data/train.jsonl:2`: the chat template refused the conversation: System role not supported"
        ),
        "{}",
        said(&build)
    );
    assert_eq!(snapshot(&project.path("dist")), before);
    // A template that does not parse: the manifest's line, the template's line.
    project.write(
        "broken.jinja",
        "{% for m in messages %}\n{{ m['content'] }\n{% endfor %}",
    );
    project.edit(
        "template = \"no_system.jinja\"",
        "template = \"broken.jinja\"",
    );
    let build = project.build(&[]);
    assert_eq!(build.code, 2, "{}", build.stderr);
    assert!(
        said(&build).contains("symb.toml:")
            && said(&build)
                .contains("`chat.template`: the template does not parse: `broken.jinja`:2:"),
        "{}",
        said(&build)
    );
    assert_eq!(snapshot(&project.path("dist")), before);
}
