//! The shipped LoRA adapter on its own: `adapter/` holds the tokenizer
//! PEFT's `AutoPeftModelForCausalLM` grows the base's vocabulary from,
//! `export.adapter = "with-base"` adds the base it was trained on, and the
//! model card's PEFT snippet, run by PEFT in PyTorch where they are
//! installed, rebuilds the folder's merged model from the base and the
//! adapter.
#![allow(clippy::unwrap_used)] // a test: a panic is how it fails

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::{BIN, TestProject};

/// An untied SentencePiece-style Llama (both matrices grow), its
/// vocabulary grown by `add_tokens`, a LoRA that trains the new rows.
fn manifest(fixture: &Path, adapter: &str) -> String {
    format!(
        r#"[project]
name = "adapter"
output = "dist"

[corpus]
files = ["corpus/*.txt"]
eval_fraction = 0.1

[tokenizer]
vocab_size = 600
pre_tokenizer = "metaspace"

[base]
model = "path:{}"

[vocab]
strategy = "add_tokens"

[finetune]
method = "lora"
rank = 4
alpha = 8
learning_rate = 3e-2
warmup_steps = 2
batch_size = 4
block_size = 32
max_steps = 20
eval_every = 10

[export]
targets = ["fp32"]
adapter = "{adapter}"
"#,
        fixture.display()
    )
}

fn fixture() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tiny-llama-sp")
}

/// The card's fenced Python block that follows `heading`.
fn python_after(card: &str, heading: &str) -> Option<String> {
    let section = &card[card.find(heading)?..];
    let start = section.find("```python\n")? + "```python\n".len();
    let end = start + section[start..].find("```")?;
    Some(section[start..end].to_string())
}

/// `symb generate`'s greedy ids for `prompt` on a folder, with an adapter.
fn greedy(model: &Path, adapter: Option<&Path>, prompt: &str) -> serde_json::Value {
    let mut command = Command::new(BIN);
    command.args([
        "generate",
        "--model",
        model.to_str().unwrap(),
        "--prompt",
        prompt,
        "--max-new-tokens",
        "12",
        "--json",
    ]);
    if let Some(adapter) = adapter {
        command.args(["--adapter", adapter.to_str().unwrap()]);
    }
    let out = command.output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice::<serde_json::Value>(&out.stdout).unwrap()["generated_ids"].clone()
}

/// Whether `python3` has PyTorch, transformers and PEFT (not in CI: PEFT
/// needs PyTorch).
fn has_peft() -> bool {
    Command::new("python3")
        .args(["-c", "import torch, transformers, peft"])
        .output()
        .is_ok_and(|o| o.status.success())
}

/// Runs the card's snippet with PEFT in the folder; what it reports.
fn peft_against_merged(dist: &Path, snippet: &str, texts: &[String]) -> serde_json::Value {
    let file = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(file.path(), snippet).unwrap();
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/python/peft_adapter.py");
    let out = Command::new("python3")
        .arg(script)
        .arg(dist)
        .arg(file.path())
        .args(texts)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "the card's PEFT snippet failed:\n{snippet}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

fn assert_same_model(report: &serde_json::Value, what: &str) {
    eprintln!("PEFT against the merged model, {what}: {report}");
    assert_eq!(report["vocab"][0], report["vocab"][1], "{what}: {report}");
    assert!(
        report["positions"].as_u64().unwrap() > 20,
        "{what}: {report}"
    );
    assert!(
        report["max_abs_error"].as_f64().unwrap() < 1e-4,
        "{what}: {report}"
    );
    assert_eq!(report["top1_agreement"], 1.0, "{what}: {report}");
}

#[test]
fn the_adapter_and_its_base_rebuild_the_merged_model() {
    let project = TestProject::with_manifest(&manifest(&fixture(), "with-base"), 150);
    project.build_ok();
    let dist = project.path("dist");
    let config: serde_json::Value =
        serde_json::from_str(&project.read("dist/config.json")).unwrap();
    let vocab_size = config["vocab_size"].as_u64().unwrap();

    // What PEFT reads: the adapter's tokenizer is the folder's, the base's
    // config has the grown vocabulary, and the base's tokenizer files load.
    for file in [
        "adapter_config.json",
        "adapter_model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
    ] {
        assert!(dist.join("adapter").join(file).is_file(), "adapter/{file}");
    }
    assert_eq!(
        project.read("dist/adapter/tokenizer.json"),
        project.read("dist/tokenizer.json")
    );
    for file in [
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
    ] {
        assert!(
            dist.join("adapter/base").join(file).is_file(),
            "adapter/base/{file}"
        );
    }
    let base_config: serde_json::Value =
        serde_json::from_str(&project.read("dist/adapter/base/config.json")).unwrap();
    assert_eq!(base_config["vocab_size"].as_u64(), Some(vocab_size));
    // The base is the vocab stage's model: the fixture's rows, then new ones.
    let fixture_weights = candle_core::safetensors::load(
        fixture().join("model.safetensors"),
        &candle_core::Device::Cpu,
    )
    .unwrap();
    let base_weights = candle_core::safetensors::load(
        dist.join("adapter/base/model.safetensors"),
        &candle_core::Device::Cpu,
    )
    .unwrap();
    let old = fixture_weights["model.embed_tokens.weight"].dim(0).unwrap();
    let grown = &base_weights["model.embed_tokens.weight"];
    assert_eq!(grown.dim(0).unwrap() as u64, vocab_size);
    let kept = grown.narrow(0, 0, old).unwrap();
    assert_eq!(
        (&kept - &fixture_weights["model.embed_tokens.weight"])
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap(),
        0.0
    );

    // symb's own reading: the base plus the adapter decode as the merged folder does.
    let prompts: Vec<String> = common::demo_lines().into_iter().skip(200).take(4).collect();
    for prompt in &prompts {
        assert_eq!(
            greedy(
                &dist.join("adapter/base"),
                Some(&dist.join("adapter")),
                prompt
            ),
            greedy(&dist, None, prompt),
            "{prompt}"
        );
    }

    // The card says how, in PEFT's words, and with PEFT it holds.
    let card = project.read("dist/README.md");
    let with_base = python_after(&card, "## The LoRA adapter")
        .unwrap_or_else(|| panic!("the card has an adapter snippet:\n{card}"));
    assert!(
        with_base.contains("from_pretrained(\"adapter/base\")")
            && with_base.contains("PeftModel.from_pretrained(base, \"adapter\")"),
        "{with_base}"
    );
    if has_peft() {
        assert_same_model(
            &peft_against_merged(&dist, &with_base, &prompts),
            "with-base",
        );
    }

    // The adapter alone: no base in the folder (nothing re-runs), and the
    // card loads the manifest's base and grows its vocabulary.
    project.edit("adapter = \"with-base\"", "adapter = \"alone\"");
    let build = project.build_ok();
    assert_eq!(
        build.ran(),
        common::set(&["bundle"]),
        "only the card changes"
    );
    assert!(!dist.join("adapter/base").exists());
    assert!(dist.join("adapter/tokenizer.json").is_file());
    let card = project.read("dist/README.md");
    let alone = python_after(&card, "## The LoRA adapter").unwrap();
    assert!(
        alone.contains("from_pretrained(\"tiny-llama-sp\")")
            && alone.contains(&format!("base.resize_token_embeddings({vocab_size})")),
        "{alone}"
    );
    if has_peft() {
        let snippet = alone.replace(
            "\"tiny-llama-sp\"",
            &serde_json::to_string(fixture().to_str().unwrap()).unwrap(),
        );
        assert_same_model(&peft_against_merged(&dist, &snippet, &prompts), "alone");
    }
}

#[test]
fn with_base_needs_an_adapter() {
    let project = TestProject::with_manifest(
        &manifest(&fixture(), "with-base").replace("method = \"lora\"", "method = \"full\""),
        30,
    );
    let out = project.symb(&["build"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("symb.toml:")
            && stderr.contains("export.adapter")
            && stderr.contains("trains no adapter"),
        "{stderr}"
    );
    let project = TestProject::with_manifest(&manifest(&fixture(), "both"), 30);
    let stderr = String::from_utf8_lossy(&project.symb(&["build"]).stderr).to_string();
    assert!(
        stderr.contains("`export.adapter` = \"both\"") && stderr.contains("with-base"),
        "{stderr}"
    );
}
