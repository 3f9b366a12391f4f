//! `base.model = "hf:owner/name[@revision]"` against a local server in the
//! Hub's URL layout (there is no internet here): resolved to a commit,
//! downloaded once, cached by commit, usable offline afterwards.
#![allow(clippy::unwrap_used)] // a test: a panic is how it fails

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use common::{TestProject, set};

const COMMIT: &str = "0123456789abcdef0123456789abcdef01234567";
const FILES: [&str; 4] = [
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "tokenizer.json",
];

fn fixture() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tiny-gpt2")
}

/// A minimal Hub: `/api/models/{repo}/revision/{rev}` and
/// `/{repo}/resolve/{rev}/{file}` with ETag, X-Repo-Commit and Range.
struct Hub {
    port: u16,
    requests: Arc<Mutex<Vec<String>>>,
}

impl Hub {
    fn start() -> Hub {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let requests = Arc::new(Mutex::new(Vec::new()));
        let log = requests.clone();
        std::thread::spawn(move || {
            for stream in listener.incoming().take(200) {
                let Ok(mut stream) = stream else { continue };
                let mut reader = BufReader::new(stream.try_clone().unwrap());
                let mut request_line = String::new();
                if reader.read_line(&mut request_line).is_err() {
                    continue;
                }
                let mut range = None;
                loop {
                    let mut line = String::new();
                    if reader.read_line(&mut line).unwrap_or(0) == 0 || line == "\r\n" {
                        break;
                    }
                    if let Some(value) = line.to_ascii_lowercase().strip_prefix("range: bytes=") {
                        let (start, end) = value.trim().split_once('-').unwrap();
                        range = Some((start.parse::<usize>().unwrap(), end.parse::<usize>().ok()));
                    }
                }
                let path = request_line
                    .split_whitespace()
                    .nth(1)
                    .unwrap_or("/")
                    .to_string();
                log.lock().unwrap().push(path.clone());
                let response = respond(&path, range);
                let _ = stream.write_all(&response);
                let _ = stream.flush();
                let mut drain = [0u8; 0];
                let _ = reader.read(&mut drain);
            }
        });
        Hub { port, requests }
    }

    fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    fn downloads(&self) -> usize {
        self.requests
            .lock()
            .unwrap()
            .iter()
            .filter(|p| p.contains("/resolve/"))
            .count()
    }
}

fn respond(path: &str, range: Option<(usize, Option<usize>)>) -> Vec<u8> {
    let reply = |status: &str, headers: String, body: &[u8]| {
        let mut out = format!(
            "HTTP/1.1 {status}\r\nContent-Length: {}\r\nConnection: close\r\n{headers}\r\n",
            body.len()
        )
        .into_bytes();
        out.extend_from_slice(body);
        out
    };
    // Llama-family repositories serve the fixture that stands for them; any other name, GPT-2's.
    let dir = fixture_for(path);
    if path.starts_with("/api/models/") && path.contains("/revision/") {
        let siblings: Vec<_> = FILES
            .iter()
            .chain(instruct(path).then_some(&"tokenizer_config.json"))
            .map(|f| serde_json::json!({"rfilename": f}))
            .chain([serde_json::json!({"rfilename": "README.md"})])
            .collect();
        let body = serde_json::json!({"sha": COMMIT, "siblings": siblings}).to_string();
        return reply(
            "200 OK",
            "Content-Type: application/json\r\n".into(),
            body.as_bytes(),
        );
    }
    let file = path
        .split_once("/resolve/")
        .and_then(|(_, rest)| rest.split_once('/'))
        .map(|(_, f)| f.to_string());
    match file
        .filter(|f| FILES.contains(&f.as_str()) || (instruct(path) && f == "tokenizer_config.json"))
    {
        Some(file) => {
            let mut data = std::fs::read(dir.join(&file)).unwrap();
            // The instruct model's config holds its chat template (SmolLM2's ChatML).
            if instruct(path) && file == "tokenizer_config.json" {
                let mut config: serde_json::Value = serde_json::from_slice(&data).unwrap();
                config["chat_template"] =
                    std::fs::read_to_string(fixture().with_file_name("chat").join("smollm2.jinja"))
                        .unwrap()
                        .into();
                data = serde_json::to_vec_pretty(&config).unwrap();
            }
            let etag = blake3::hash(&data).to_hex().to_string();
            let (start, end) = range
                .map(|(s, e)| (s, e.unwrap_or(data.len() - 1).min(data.len() - 1)))
                .unwrap_or((0, data.len() - 1));
            let headers = format!(
                "ETag: \"{etag}\"\r\nX-Repo-Commit: {COMMIT}\r\nContent-Range: bytes {start}-{end}/{}\r\n",
                data.len()
            );
            reply("206 Partial Content", headers, &data[start..=end])
        }
        None => reply("404 Not Found", String::new(), b"not found"),
    }
}

/// The Hub ids symb's README lists as known to work, and the fixture that
/// stands for each (same family, tokenizer kind and head).
const LLAMA_REPOS: [(&str, &str); 5] = [
    ("HuggingFaceTB/SmolLM2-135M", "tiny-llama"),
    ("HuggingFaceTB/SmolLM2-135M-Instruct", "tiny-llama"),
    ("Qwen/Qwen2.5-0.5B", "tiny-qwen2"),
    ("TinyLlama/TinyLlama-1.1B-Chat-v1.0", "tiny-llama-sp"),
    ("meta-llama/Llama-3.2-1B", "tiny-llama-sp"),
];

/// Whether `path` is the instruct model's, whose repository also has a
/// `tokenizer_config.json` (with its chat template).
fn instruct(path: &str) -> bool {
    path.contains("/SmolLM2-135M-Instruct/")
}

fn fixture_for(path: &str) -> PathBuf {
    let repo = path
        .trim_start_matches("/api/models/")
        .trim_start_matches('/');
    match LLAMA_REPOS
        .iter()
        .find(|(id, _)| repo.starts_with(&format!("{id}/")))
    {
        Some((_, name)) => fixture().with_file_name(name),
        None => fixture(),
    }
}

fn hub_project(endpoint: &str) -> TestProject {
    let project = TestProject::with_manifest("[base]\nmodel = \"hf:symb-test/tiny-gpt2\"\n", 1);
    project.write("endpoint", endpoint);
    project
}

fn build(project: &TestProject, endpoint: &str) -> common::Build {
    let output = std::process::Command::new(common::BIN)
        .args(["build", "--json"])
        .current_dir(project.dir.path())
        .env("HF_ENDPOINT", endpoint)
        .env("HF_TOKEN", "")
        // The project's own Hugging Face cache, never the machine's.
        .env("HF_HOME", project.path("hf-home"))
        .env_remove("HF_HUB_CACHE")
        .env_remove("HF_HUB_OFFLINE")
        .env_remove("http_proxy")
        .env_remove("HTTP_PROXY")
        .env_remove("https_proxy")
        .env_remove("HTTPS_PROXY")
        .env_remove("all_proxy")
        .env_remove("ALL_PROXY")
        .output()
        .unwrap();
    let stdout = String::from_utf8(output.stdout).unwrap();
    common::Build {
        code: output.status.code().unwrap(),
        events: stdout
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect(),
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
    }
}

#[test]
fn a_hub_model_is_downloaded_once_keyed_by_commit_and_usable_offline() {
    let hub = Hub::start();
    let project = hub_project(&hub.endpoint());
    let first = build(&project, &hub.endpoint());
    assert_eq!(first.code, 0, "{}", first.stderr);
    assert_eq!(first.ran(), set(&["base"]));
    assert_eq!(
        hub.downloads(),
        2 * FILES.len(),
        "a probe and a download per file"
    );
    // The output is the fixture's model: same greedy tokens as PyTorch.
    let golden: serde_json::Value =
        serde_json::from_slice(&std::fs::read(fixture().join("golden.json")).unwrap()).unwrap();
    let case = &golden["cases"][0];
    let out = std::process::Command::new(common::BIN)
        .args([
            "generate",
            "--model",
            "dist",
            "--prompt",
            case["prompt"].as_str().unwrap(),
            "--max-new-tokens",
            "20",
            "--json",
        ])
        .current_dir(project.dir.path())
        .output()
        .unwrap();
    let generated: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(generated["generated_ids"], case["greedy_20"]);
    // Nothing changed: resolved again, cached, nothing downloaded.
    let second = build(&project, &hub.endpoint());
    assert_eq!(second.ran(), set(&[]));
    assert_eq!(hub.downloads(), 2 * FILES.len());
    // Offline: the recorded resolution is used.
    let offline = build(&project, "http://127.0.0.1:9");
    assert_eq!(offline.code, 0, "{}", offline.stderr);
    assert_eq!(offline.ran(), set(&[]));
}

#[test]
fn an_unreachable_hub_is_a_clear_error() {
    let project = hub_project("http://127.0.0.1:9");
    let build = build(&project, "http://127.0.0.1:9");
    // The network failed, not the manifest: exit 1.
    assert_eq!(build.code, 1, "{}", build.stderr);
    let reason = build.reason("base");
    assert!(
        reason.contains("cannot resolve `hf:symb-test/tiny-gpt2@main` at http://127.0.0.1:9"),
        "{reason}"
    );
    assert!(reason.contains("Connection refused"), "{reason}");
    // Offline, what works instead: a downloaded folder as `path:`.
    assert!(
        reason.contains("\"path:FOLDER\"")
            && reason.contains("huggingface-cli download symb-test/tiny-gpt2"),
        "{reason}"
    );
    // Commands that run nothing still work offline.
    assert!(project.symb(&["graph"]).status.success());
}

#[test]
fn a_model_in_the_hugging_face_cache_needs_no_network() {
    // As `huggingface-cli download` leaves it: the files in a snapshot
    // named by the commit, the branch's ref naming that commit.
    let project = hub_project("http://127.0.0.1:9");
    let commit = "0123456789abcdef0123456789abcdef01234567";
    let repo = project.path("hf-home/hub/models--symb-test--tiny-gpt2");
    let snapshot = repo.join("snapshots").join(commit);
    std::fs::create_dir_all(&snapshot).unwrap();
    for file in FILES {
        std::fs::copy(fixture().join(file), snapshot.join(file)).unwrap();
    }
    project.write("hf-home/hub/models--symb-test--tiny-gpt2/refs/main", commit);
    // The Hub is unreachable: the cache's copy is the model.
    let held = build(&project, "http://127.0.0.1:9");
    assert_eq!(held.code, 0, "{}", held.stderr);
    assert!(held.ran().contains("base"), "{:?}", held.ran());
    // The output is the fixture's model: PyTorch's greedy tokens.
    let golden: serde_json::Value =
        serde_json::from_slice(&std::fs::read(fixture().join("golden.json")).unwrap()).unwrap();
    let case = &golden["cases"][0];
    let out = std::process::Command::new(common::BIN)
        .args(["generate", "--model", "dist", "--prompt"])
        .arg(case["prompt"].as_str().unwrap())
        .args(["--max-new-tokens", "20", "--json"])
        .current_dir(project.dir.path())
        .output()
        .unwrap();
    let generated: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(generated["generated_ids"], case["greedy_20"]);
    // A snapshot without its weights is no model: the Hub's error, which
    // says where the cache is looked for.
    std::fs::remove_file(snapshot.join("model.safetensors")).unwrap();
    std::fs::remove_dir_all(project.path("cache")).unwrap();
    let build = build(&project, "http://127.0.0.1:9");
    assert_eq!(build.code, 1, "{}", build.stderr);
    assert!(
        build
            .reason("base")
            .contains("a model in the Hugging Face cache is used"),
        "{}",
        build.reason("base")
    );
}

#[test]
fn the_gpt2_lora_recipe_builds_against_the_hub() {
    let hub = Hub::start();
    let dir = tempfile::tempdir().unwrap();
    let init = std::process::Command::new(common::BIN)
        .args(["init", "--recipe", "gpt2-lora"])
        .current_dir(dir.path())
        .output()
        .unwrap();
    assert!(init.status.success());
    let project = TestProject { dir };
    let lines = common::demo_lines();
    project.write("corpus/symbiotic.txt", &(lines[..400].join("\n") + "\n"));
    project.edit("epochs = 1 ", "max_steps = 3 ");
    project.edit("block_size = 128", "block_size = 32");
    let build = build(&project, &hub.endpoint());
    assert_eq!(build.code, 0, "{}", build.stderr);
    // The recipe ends in a web folder: export, quantize, verify, bundle.
    assert_eq!(
        build.ran(),
        set(&[
            "corpus",
            "tokenizer",
            "base",
            "vocab",
            "finetune",
            "merge",
            "export",
            "quantize.q8",
            "calibrate",
            "quantize.q4",
            "reference",
            "verify.fp32",
            "verify.q8",
            "verify.q4",
            "bundle",
            "verify.tokenizer",
            "web"
        ])
    );
    assert!(
        hub.requests
            .lock()
            .unwrap()
            .iter()
            .any(|p| p.starts_with("/api/models/openai-community/gpt2/revision/main"))
    );
    assert!(
        project
            .path("dist/adapter/adapter_model.safetensors")
            .is_file()
            && project.path("dist/index.html").is_file()
    );
    // The adapter names its base as PEFT does: the Hub id.
    let adapter: serde_json::Value =
        serde_json::from_str(&project.read("dist/adapter/adapter_config.json")).unwrap();
    assert_eq!(adapter["base_model_name_or_path"], "openai-community/gpt2");
    // The report has the vocabulary's section: tokens per word before and after.
    let report = project.read("dist/report.html");
    assert!(
        report.contains("<h2>Vocabulary</h2><p><code>add_tokens</code>: ")
            && report.contains("<td>eval split</td>"),
        "{report}"
    );
}

/// SmolLM2, Qwen2.5, TinyLlama and Llama 3.2 ids resolve and download as
/// GPT-2's do (each served as the fixture that stands for it), and the
/// output folder is that model: PyTorch's greedy tokens.
#[test]
fn llama_family_hub_ids_resolve_download_and_generate() {
    let hub = Hub::start();
    for (id, fixture_name) in LLAMA_REPOS {
        let project = TestProject::with_manifest(&format!("[base]\nmodel = \"hf:{id}\"\n"), 1);
        let build = build(&project, &hub.endpoint());
        assert_eq!(build.code, 0, "{id}: {}", build.stderr);
        let dir = fixture().with_file_name(fixture_name);
        let golden: serde_json::Value =
            serde_json::from_slice(&std::fs::read(dir.join("golden.json")).unwrap()).unwrap();
        let case = &golden["cases"][0];
        let out = std::process::Command::new(common::BIN)
            .args([
                "generate",
                "--model",
                project.path("dist").to_str().unwrap(),
                "--prompt",
                case["prompt"].as_str().unwrap(),
                "--max-new-tokens",
                "20",
                "--json",
            ])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{id}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let out: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(out["generated_ids"], case["greedy_20"], "{id}");
        assert!(
            hub.requests
                .lock()
                .unwrap()
                .iter()
                .any(|p| p.starts_with(&format!("/api/models/{id}/revision/main"))),
            "{id}"
        );
    }
}

/// `symb init --recipe smollm2-chat` builds against the Hub (the instruct
/// model served as the Llama fixture with SmolLM2's chat template): LoRA on
/// the demo's conversations in the base's own template, and a chat folder
/// whose turns end at `<|im_end|>`.
#[test]
fn the_smollm2_chat_recipe_builds_a_chat_folder_against_the_hub() {
    let hub = Hub::start();
    let dir = tempfile::tempdir().unwrap();
    let init = std::process::Command::new(common::BIN)
        .args(["init", "--recipe", "smollm2-chat"])
        .current_dir(dir.path())
        .output()
        .unwrap();
    assert!(
        init.status.success(),
        "{}",
        String::from_utf8_lossy(&init.stderr)
    );
    let project = TestProject { dir };
    assert!(
        project.path("corpus/chat.jsonl").is_file(),
        "the demo's conversations"
    );
    // A test's budget: a few steps on 200 conversations.
    let few: String = project
        .read("corpus/chat.jsonl")
        .lines()
        .take(200)
        .map(|l| format!("{l}\n"))
        .collect();
    project.write("corpus/chat.jsonl", &few);
    project.edit("epochs = 1\n", "max_steps = 3\n");
    project.edit("block_size = 256", "block_size = 128");
    project.write("symb.toml", &(project.read("symb.toml") + "\n[verify.tolerance.q8]\ntop1_agreement = 0.7\n[verify.tolerance.q4]\ntop1_agreement = 0.2\nkl_divergence = 1.0\n"));
    let build = build(&project, &hub.endpoint());
    assert_eq!(build.code, 0, "{}\n{:?}", build.stderr, build.events);
    assert!(build.ran().contains("finetune") && build.ran().contains("bundle"));
    let config: serde_json::Value =
        serde_json::from_str(&project.read("dist/tokenizer_config.json")).unwrap();
    let template =
        std::fs::read_to_string(fixture().with_file_name("chat").join("smollm2.jinja")).unwrap();
    assert_eq!(
        config["chat_template"],
        template.as_str(),
        "the base's own template"
    );
    assert_eq!(config["eos_token"], "<|im_end|>");
    assert_eq!(project.read("dist/chat_template.jinja"), template);
    let generation: serde_json::Value =
        serde_json::from_str(&project.read("dist/generation_config.json")).unwrap();
    let tokenizer = tokenizers::Tokenizer::from_file(project.path("dist/tokenizer.json")).unwrap();
    assert_eq!(
        generation["eos_token_id"][0],
        tokenizer.token_to_id("<|im_end|>").unwrap()
    );
    let metrics: serde_json::Value =
        serde_json::from_str(&project.read("dist/training/metrics.json")).unwrap();
    assert_eq!(metrics["conversations"]["train"]["conversations"], 200);
    assert!(metrics["trained_tokens"].as_u64().unwrap() > 0);
}

/// `symb init --recipe smollm2-lora` and `--recipe qwen2.5-lora` build
/// against the Hub (each base served as the fixture of its family) through
/// vocab, LoRA with the new rows, merge, ONNX and the web folder.
#[test]
fn the_llama_family_recipes_build_to_a_web_folder_against_the_hub() {
    let hub = Hub::start();
    for (recipe, repo) in [
        ("smollm2-lora", "HuggingFaceTB/SmolLM2-135M"),
        ("qwen2.5-lora", "Qwen/Qwen2.5-0.5B"),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let init = std::process::Command::new(common::BIN)
            .args(["init", "--recipe", recipe])
            .current_dir(dir.path())
            .output()
            .unwrap();
        assert!(
            init.status.success(),
            "{}",
            String::from_utf8_lossy(&init.stderr)
        );
        let project = TestProject { dir };
        let lines = common::demo_lines();
        project.write("corpus/symbiotic.txt", &(lines[..400].join("\n") + "\n"));
        project.edit("epochs = 1 ", "max_steps = 3 ");
        project.edit("block_size = 128", "block_size = 32");
        project.edit("vocab_size = 8000", "vocab_size = 600");
        // The fixtures' random weights: the reference quantizer agrees no better (tests/llama_web.rs).
        project.write("symb.toml", &(project.read("symb.toml") + "\n[verify.tolerance.q8]\ntop1_agreement = 0.7\n[verify.tolerance.q4]\ntop1_agreement = 0.2\nkl_divergence = 1.0\n"));
        let build = build(&project, &hub.endpoint());
        assert_eq!(build.code, 0, "{recipe}: {}", build.stderr);
        assert_eq!(
            build.ran(),
            set(&[
                "corpus",
                "tokenizer",
                "base",
                "vocab",
                "finetune",
                "merge",
                "export",
                "quantize.q8",
                "calibrate",
                "quantize.q4",
                "reference",
                "verify.fp32",
                "verify.q8",
                "verify.q4",
                "bundle",
                "verify.tokenizer",
                "web"
            ]),
            "{recipe}"
        );
        assert!(
            hub.requests
                .lock()
                .unwrap()
                .iter()
                .any(|p| p.starts_with(&format!("/api/models/{repo}/revision/main"))),
            "{recipe}"
        );
        for file in [
            "adapter/adapter_model.safetensors",
            "onnx/model.onnx",
            "onnx/model_quantized.onnx",
            "onnx/model_q4.onnx",
            "index.html",
            "config.json",
            "tokenizer_config.json",
        ] {
            assert!(
                project.path("dist").join(file).is_file(),
                "{recipe}: {file}"
            );
        }
        let config: serde_json::Value =
            serde_json::from_str(&project.read("dist/config.json")).unwrap();
        assert_eq!(
            config["transformers.js_config"]["dtype"], "q8",
            "{recipe}: the page's default is the dtype fastest in WebAssembly"
        );
    }
}
