//! The ONNX export of the PyTorch fixture, run by ONNX Runtime (Python's
//! `onnxruntime`), against PyTorch's golden logits and greedy tokens: in one
//! prefill pass, token by token through the KV cache, and left-padded.

use std::path::PathBuf;
use std::process::Command;

use candle_core::Device;
use symb::model;

fn fixture() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../shared/fixtures/tiny-gpt2")
}

fn max_abs(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max)
}

#[test]
fn the_fixture_exported_runs_in_onnx_runtime_as_pytorch_does() {
    let model = model::load_folder(&fixture()).unwrap();
    let onnx = symb::onnx::gpt2::export(&model, 17).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("model.onnx");
    symb::onnx::save(&onnx, &path).unwrap();

    let golden: serde_json::Value = serde_json::from_slice(&std::fs::read(fixture().join("golden.json")).unwrap()).unwrap();
    let logits = candle_core::safetensors::load(fixture().join("golden.safetensors"), &Device::Cpu).unwrap();
    let cases = golden["cases"].as_array().unwrap();
    let prompts: Vec<Vec<u32>> = cases.iter().map(|c| serde_json::from_value(c["input_ids"].clone()).unwrap()).collect();
    let request = dir.path().join("request.json");
    std::fs::write(&request, serde_json::json!({"prompts": prompts, "max_new_tokens": 20}).to_string()).unwrap();
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/python/run_onnx.py");
    let out = Command::new("python3").arg(script).arg(&path).arg(&request).output().expect("python3 runs");
    assert!(out.status.success(), "run_onnx.py: {}", String::from_utf8_lossy(&out.stderr));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();

    for (i, case) in cases.iter().enumerate() {
        let expected: Vec<Vec<f32>> = logits[&format!("logits.{i}")].to_vec2().unwrap();
        let got = &report["cases"][i];
        for (mode, rows) in [("prefill", &got["prefill"]), ("stepped", &got["stepped"]), ("padded", &report["padded"][i])] {
            let rows: Vec<Vec<f32>> = serde_json::from_value(rows.clone()).unwrap();
            assert_eq!(rows.len(), expected.len(), "{mode} case {i}");
            for (position, (row, want)) in rows.iter().zip(&expected).enumerate() {
                let error = max_abs(row, want);
                assert!(error < 1e-4, "{mode} case {i} position {position}: max abs logits error {error}");
            }
        }
        assert_eq!(got["greedy"], case["greedy_20"], "greedy tokens of case {i}");
    }
}
