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

/// A base folder that keeps its chat template in `chat_template.jinja`
/// (transformers 4.50 on), with `template = "base"`: the template reaches
/// the output folder, and its turns end where it says.
#[test]
fn a_base_template_in_chat_template_jinja_is_the_base_template() {
    let project = llama_chat_project();
    let fixture = fixtures().join("tiny-llama");
    for file in [
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
    ] {
        std::fs::create_dir_all(project.path("model")).unwrap();
        std::fs::copy(fixture.join(file), project.path("model").join(file)).unwrap();
    }
    let template = std::fs::read_to_string(fixtures().join("chat/smollm2.jinja")).unwrap();
    project.write("model/chat_template.jinja", &template);
    let manifest = project
        .read("symb.toml")
        .replace(&format!("path:{}", fixture.display()), "path:model")
        .replace("template = \"chatml\"", "template = \"base\"");
    project.write("symb.toml", &manifest);
    project.build_ok();
    let config = read_json(&project.path("dist/tokenizer_config.json"));
    assert_eq!(config["chat_template"], template.as_str());
    assert_eq!(config["eos_token"], "<|im_end|>");
    assert_eq!(project.read("dist/chat_template.jinja"), template);
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

/// A small scratch model trained on the demo's conversations, in ChatML,
/// at the shape a test can afford; `max_new_tokens` for every client.
const SCRATCH_CHAT: &str = r#"[project]
name = "tiny-chat"

[corpus]
files = ["corpus/chat.jsonl"]
eval_files = ["corpus/chat_eval.jsonl"]

[tokenizer]
vocab_size = 600

[base]
model = "scratch"
n_layer = 2
n_head = 2
n_embd = 64
n_positions = 160

[finetune]
method = "full"
learning_rate = 3e-3
warmup_steps = 10
batch_size = 8
block_size = 128
max_steps = 120
eval_every = 60

[export]
targets = ["fp32", "q8"]

[verify]
prompts = 4

[web]
dtype = "fp32"
"#;

const REPLY_TOKENS: usize = 48;

fn scratch_chat_project() -> TestProject {
    let project = TestProject::with_manifest(SCRATCH_CHAT, 0);
    let corpus = Path::new(env!("CARGO_MANIFEST_DIR")).join("corpus");
    let take = |name: &str, n: usize| -> String {
        std::fs::read_to_string(corpus.join(name))
            .unwrap()
            .lines()
            .take(n)
            .map(|l| format!("{l}\n"))
            .collect()
    };
    project.write("corpus/chat.jsonl", &take("chat.jsonl", 600));
    project.write("corpus/chat_eval.jsonl", &take("chat_eval.jsonl", 30));
    project
}

fn generate_chat(dist: &Path, user: &str, onnx: bool) -> serde_json::Value {
    let n = REPLY_TOKENS.to_string();
    let mut args = vec![
        "generate",
        "--chat",
        "--user",
        user,
        "--json",
        "--max-new-tokens",
        &n,
    ];
    if onnx {
        args.extend(["--backend", "onnx", "--dtype", "fp32"]);
    }
    let out = std::process::Command::new(common::BIN)
        .args(&args)
        .arg("--model")
        .arg(dist)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// The chat model from conversations to the page: ChatML's tokens in the
/// trained tokenizer, `symb generate --chat` (candle and ONNX Runtime) ends
/// its reply at `<|im_end|>`; transformers.js in Node renders the folder's
/// template to Python transformers' ids and its pipeline answers a
/// `messages` input with symb's tokens, stopping there; the playground in
/// headless Chromium is a chat whose reply appears and stops.
#[test]
fn a_scratch_chat_model_answers_and_stops_in_symb_node_and_chromium() {
    let project = scratch_chat_project();
    project.build_ok();
    let dist = project.path("dist");
    let tokenizer = tokenizers::Tokenizer::from_file(dist.join("tokenizer.json")).unwrap();
    let end = tokenizer
        .token_to_id("<|im_end|>")
        .expect("ChatML's tokens were added");
    assert!(tokenizer.token_to_id("<|im_start|>").is_some());
    let m = metrics(&project);
    assert!(
        m["final_eval_loss"].as_f64().unwrap() < m["initial_eval_loss"].as_f64().unwrap() * 0.5,
        "{m}"
    );
    let user = "Translate to English: Tosoulso-ka merael-ni nunzaeima .";
    let candle = generate_chat(&dist, user, false);
    let ids: Vec<u64> = serde_json::from_value(candle["generated_ids"].clone()).unwrap();
    assert_eq!(
        ids.last(),
        Some(&u64::from(end)),
        "the reply ends at <|im_end|>: {candle}"
    );
    assert!(ids.len() < REPLY_TOKENS);
    let onnx = generate_chat(&dist, user, true);
    assert_eq!(onnx["generated_ids"], candle["generated_ids"]);
    assert_eq!(onnx["input_ids"], candle["input_ids"]);
    // The conversation from a file: the same prompt as from the flags.
    let file = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(
        file.path(),
        serde_json::json!({"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": user}]}).to_string(),
    )
    .unwrap();
    let run = |args: &[&str]| -> serde_json::Value {
        let out = std::process::Command::new(common::BIN)
            .args([
                "generate",
                "--chat",
                "--json",
                "--max-new-tokens",
                "4",
                "--model",
            ])
            .arg(&dist)
            .args(args)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).unwrap()
    };
    let from_file = run(&["--messages", file.path().to_str().unwrap()]);
    let from_flags = run(&["--system", "Be brief.", "--user", user]);
    assert_eq!(from_file["input_ids"], from_flags["input_ids"]);
    // Verify's prompts are eval conversations, rendered to the assistant's turn.
    let report = read_json(&dist.join("reports/verify.fp32.json"));
    for prompt in report["prompts"].as_array().unwrap() {
        assert!(
            prompt["text"]
                .as_str()
                .unwrap()
                .ends_with("<|im_start|>assistant\n"),
            "{prompt}"
        );
    }
    // transformers.js in Node, on the folder as it ships.
    let messages = tempfile::NamedTempFile::new().unwrap();
    let conversation = serde_json::json!([{"role": "user", "content": user}]);
    std::fs::write(messages.path(), conversation.to_string()).unwrap();
    let js = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/js");
    let out = std::process::Command::new("node")
        .arg(js.join("chat.mjs"))
        .arg(&dist)
        .arg(messages.path())
        .arg("fp32")
        .arg(REPLY_TOKENS.to_string())
        .current_dir(&js)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let node: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(node["template_ids"], candle["input_ids"], "{node}");
    assert_eq!(node["reply_ids"], candle["generated_ids"], "{node}");
    assert_eq!(node["stopped_at_eos"], true);
    // Python transformers renders and tokenizes the folder's template alike.
    let out = std::process::Command::new("python3")
        .args([
            "-c",
            "import json, sys\nfrom transformers import AutoTokenizer\n\
             t = AutoTokenizer.from_pretrained(sys.argv[1])\n\
             ids = t.apply_chat_template(json.loads(sys.argv[2]), add_generation_prompt=True, tokenize=True)\n\
             ids = ids['input_ids'] if isinstance(ids, dict) or hasattr(ids, 'keys') else ids\n\
             print(json.dumps(list(ids)))",
        ])
        .arg(&dist)
        .arg(conversation.to_string())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let python_ids: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(python_ids, node["template_ids"]);
    // The playground, served as a user serves it, is a chat.
    let served = common::serve_bundled(&dist);
    let artifacts = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/test-artifacts");
    std::fs::create_dir_all(&artifacts).unwrap();
    let page = common::browser_page(
        &served.url,
        &serde_json::json!({"chat": user, "system": "", "max_new_tokens": REPLY_TOKENS, "webgpu": false}),
        &artifacts.join("chat-playground.png"),
    );
    assert_eq!(page["mode"], "chat", "{page}");
    let turn = &page["chat"][0];
    assert_eq!(turn["done"], true, "{page}");
    assert_eq!(
        turn["eos"], true,
        "the reply stops at the end of the turn: {page}"
    );
    assert_eq!(turn["ids"], candle["generated_ids"], "{page}");
    assert!(!turn["reply"].as_str().unwrap().trim().is_empty());
}
