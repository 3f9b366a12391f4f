//! The output folder in transformers.js (Node, onnxruntime-node): a
//! conversion of the PyTorch fixture, every dtype (issue 5, test 1).
#![allow(clippy::unwrap_used)] // a test: a panic is how it fails

mod common;

use std::path::PathBuf;
use std::process::Command;

fn fixture() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tiny-gpt2")
}

#[test]
fn transformers_js_runs_every_dtype_of_the_converted_fixture_as_symb_and_pytorch_do() {
    let dtypes = ["fp32", "fp16", "q8", "int8", "uint8", "q4", "q4f16"];
    let dir = tempfile::tempdir().unwrap();
    let targets: Vec<String> = dtypes.iter().map(|t| format!("\"{t}\"")).collect();
    std::fs::write(
        dir.path().join("symb.toml"),
        format!(
            "[project]\nname = \
        \"convert\"\n\n[base]\nmodel = \"path:{}\"\n\n[export]\ntargets = \
        [{}]\n",
            fixture().display(),
            targets.join(", ")
        ),
    )
    .unwrap();
    let out = Command::new(common::BIN)
        .arg("build")
        .current_dir(dir.path())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // q8 (8-bit storage) and int8 (dynamic) are different files now.
    use std::os::unix::fs::MetadataExt;
    let onnx = dir.path().join("dist/onnx");
    let (q8, int8, uint8) = (
        onnx.join("model_quantized.onnx").metadata().unwrap(),
        onnx.join("model_int8.onnx").metadata().unwrap(),
        onnx.join("model_uint8.onnx").metadata().unwrap(),
    );
    assert_ne!(q8.ino(), int8.ino());
    assert_ne!(q8.ino(), uint8.ino());
    let golden: serde_json::Value =
        serde_json::from_slice(&std::fs::read(fixture().join("golden.json")).unwrap()).unwrap();
    let cases = golden["cases"].as_array().unwrap();
    let prompts: Vec<String> = cases
        .iter()
        .map(|c| c["prompt"].as_str().unwrap().to_string())
        .collect();
    // The fixture's GPT-2 tokenizer on 2,000 lines of the demo corpus.
    let lines: Vec<String> = common::demo_lines().into_iter().take(2000).collect();
    let result =
        common::check_transformers_js(&dir.path().join("dist"), &dtypes, &prompts, 32, &lines);
    for (case, got) in cases
        .iter()
        .zip(result["generations"]["fp32"].as_array().unwrap())
    {
        assert_eq!(got["input_ids"], case["input_ids"], "{}", case["prompt"]);
        let first: Vec<serde_json::Value> = got["generated_ids"].as_array().unwrap()[..20].to_vec();
        assert_eq!(
            serde_json::Value::Array(first),
            case["greedy_20"],
            "PyTorch's greedy tokens for {}",
            case["prompt"]
        );
    }
}
