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

    check_against_golden(&path);
}

/// Runs run_onnx.py on `model` for the golden prompts; checks every logit
/// row against PyTorch's and the greedy tokens.
fn check_against_golden(model_path: &std::path::Path) {
    let dir = tempfile::tempdir().unwrap();
    let golden: serde_json::Value = serde_json::from_slice(&std::fs::read(fixture().join("golden.json")).unwrap()).unwrap();
    let logits = candle_core::safetensors::load(fixture().join("golden.safetensors"), &Device::Cpu).unwrap();
    let cases = golden["cases"].as_array().unwrap();
    let prompts: Vec<Vec<u32>> = cases.iter().map(|c| serde_json::from_value(c["input_ids"].clone()).unwrap()).collect();
    let request = dir.path().join("request.json");
    std::fs::write(&request, serde_json::json!({"prompts": prompts, "max_new_tokens": 20}).to_string()).unwrap();
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/python/run_onnx.py");
    let out = Command::new("python3").arg(script).arg(model_path).arg(&request).output().expect("python3 runs");
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

/// Issue 4's converter case: a manifest with only [project], [base] (a
/// Hugging Face folder) and [export].
#[test]
fn a_base_and_export_manifest_converts_the_folder() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("symb.toml"),
        format!("[project]\nname = \"convert\"\n\n[base]\nmodel = \"path:{}\"\n\n[export]\nopset = 17\ntargets = [\"fp32\"]\n", fixture().display()),
    )
    .unwrap();
    let bin = env!("CARGO_BIN_EXE_symb");
    let out = Command::new(bin).args(["build", "--json"]).current_dir(dir.path()).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let stdout = String::from_utf8(out.stdout).unwrap();
    let ran: Vec<String> = stdout.lines().map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()).filter(|e| e["status"] == "ran").map(|e| e["stage"].as_str().unwrap().to_string()).collect();
    assert_eq!(ran, ["base", "export"]);
    check_against_golden(&dir.path().join("dist/onnx/model.onnx"));
    // Again: nothing runs.
    let again = Command::new(bin).args(["build", "--json"]).current_dir(dir.path()).output().unwrap();
    let last: serde_json::Value = serde_json::from_str(String::from_utf8(again.stdout).unwrap().lines().last().unwrap()).unwrap();
    assert_eq!(last["ran"], 0);
    // Quantized targets are refused clearly, for now.
    let text = std::fs::read_to_string(dir.path().join("symb.toml")).unwrap().replace("[\"fp32\"]", "[\"fp32\", \"q4\"]");
    std::fs::write(dir.path().join("symb.toml"), text).unwrap();
    let refused = Command::new(bin).args(["build"]).current_dir(dir.path()).output().unwrap();
    assert_eq!(refused.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&refused.stderr).contains("`export.targets` includes \"q4\""));
}

/// A model symb trained (scratch base, full fine-tuning) exported after
/// merge: ONNX Runtime's logits equal candle's on the output folder.
#[test]
fn a_trained_model_exports_after_merge() {
    let dir = tempfile::tempdir().unwrap();
    let lines: Vec<String> = std::fs::read_to_string(PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("corpus/symbiotic.txt")).unwrap().lines().take(300).map(str::to_string).collect();
    std::fs::create_dir_all(dir.path().join("corpus")).unwrap();
    std::fs::write(dir.path().join("corpus/a.txt"), lines.join("\n")).unwrap();
    std::fs::write(
        dir.path().join("symb.toml"),
        "[corpus]\nfiles = [\"corpus/*.txt\"]\n\n[tokenizer]\nvocab_size = 400\n\n[base]\nmodel = \"scratch\"\nn_layer = 2\nn_head = 2\nn_embd = 32\nn_positions = 64\n\n\
         [finetune]\nmethod = \"full\"\nlearning_rate = 3e-3\nbatch_size = 4\nblock_size = 32\nmax_steps = 10\neval_every = 10\n\n[export]\ntargets = [\"fp32\"]\n",
    )
    .unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_symb")).args(["build"]).current_dir(dir.path()).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let model = model::load_folder(&dir.path().join("dist")).unwrap();
    let tokenizer = tokenizers::Tokenizer::from_file(dir.path().join("dist/tokenizer.json")).unwrap();
    let prompt = tokenizer.encode(lines[0].as_str(), false).unwrap().get_ids()[..20].to_vec();
    let input = candle_core::Tensor::new(prompt.as_slice(), &Device::Cpu).unwrap().unsqueeze(0).unwrap();
    let expected: Vec<Vec<f32>> = model.forward(&input, None).unwrap().squeeze(0).unwrap().to_vec2().unwrap();
    let request = dir.path().join("request.json");
    std::fs::write(&request, serde_json::json!({"prompts": [prompt], "max_new_tokens": 8}).to_string()).unwrap();
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/python/run_onnx.py");
    let out = Command::new("python3").arg(script).arg(dir.path().join("dist/onnx/model.onnx")).arg(&request).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let rows: Vec<Vec<f32>> = serde_json::from_value(report["cases"][0]["stepped"].clone()).unwrap();
    for (row, want) in rows.iter().zip(&expected) {
        assert!(max_abs(row, want) < 1e-4);
    }
    let (greedy, _) = model.greedy(&prompt, 8, None).unwrap();
    assert_eq!(report["cases"][0]["greedy"], serde_json::json!(greedy));
}
