//! Issue 17: every dtype of a symb output folder on transformers.js's WebGPU
//! device, in a real headless Chromium with SwiftShader's WebGPU adapter (no
//! GPU needed), held to bounds against PyTorch's logits and tokens, against
//! the same file in WebAssembly and against native ONNX Runtime.
#![allow(clippy::unwrap_used)] // a test: a panic is how it fails

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

fn fixture() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tiny-gpt2")
}

fn golden() -> Vec<serde_json::Value> {
    let golden: serde_json::Value =
        serde_json::from_slice(&std::fs::read(fixture().join("golden.json")).unwrap()).unwrap();
    golden["cases"].as_array().unwrap().clone()
}

/// PyTorch's logits for each golden case, [positions, vocab] flattened.
fn golden_logits() -> Vec<Vec<f32>> {
    let bytes = std::fs::read(fixture().join("golden.safetensors")).unwrap();
    let tensors = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    (0..golden().len())
        .map(|i| {
            tensors
                .tensor(&format!("logits.{i}"))
                .unwrap()
                .data()
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
                .collect()
        })
        .collect()
}

/// tests/js/devices.mjs on `url` with the golden prompts.
fn in_chromium(
    url: &str,
    webgpu: bool,
    devices: &[&str],
    dtypes: &[&str],
    out: &Path,
) -> serde_json::Value {
    let prompts: Vec<String> = golden()
        .iter()
        .map(|c| c["prompt"].as_str().unwrap().to_string())
        .collect();
    common::chromium_devices(url, webgpu, devices, dtypes, &prompts, 20, out)
}

fn floats(path: &serde_json::Value) -> Vec<f32> {
    std::fs::read(path.as_str().unwrap())
        .unwrap()
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
        .collect()
}

/// What a run on one device measured against PyTorch.
#[derive(Debug)]
struct Measured {
    max_abs_error: f32,
    top1_agreement: f64,
    /// Per prompt: how many of PyTorch's 20 greedy tokens it gave before the first other one.
    greedy_match: Vec<usize>,
}

fn measure(run: &serde_json::Value, torch: &[Vec<f32>], vocab: usize) -> Measured {
    let (mut max_abs_error, mut agree, mut positions, mut greedy_match) = (0f32, 0, 0, Vec::new());
    let argmax = |row: &[f32]| {
        row.iter()
            .enumerate()
            .max_by(|a, b| a.1.total_cmp(b.1))
            .unwrap()
            .0
    };
    for ((case, logits), golden) in run["cases"]
        .as_array()
        .unwrap()
        .iter()
        .zip(torch)
        .zip(golden())
    {
        assert_eq!(
            case["input_ids"], golden["input_ids"],
            "transformers.js's tokenizer"
        );
        let ours = floats(&case["logits"]);
        assert_eq!(
            ours.len(),
            logits.len(),
            "logits for every position of {}",
            golden["prompt"]
        );
        for (a, b) in ours.chunks(vocab).zip(logits.chunks(vocab)) {
            max_abs_error = a
                .iter()
                .zip(b)
                .map(|(x, y)| (x - y).abs())
                .fold(max_abs_error, f32::max);
            agree += usize::from(argmax(a) == argmax(b));
            positions += 1;
        }
        let ids = case["ids"].as_array().unwrap();
        greedy_match.push(
            ids.iter()
                .zip(golden["greedy_20"].as_array().unwrap())
                .take_while(|(a, b)| a == b)
                .count(),
        );
    }
    Measured {
        max_abs_error,
        top1_agreement: agree as f64 / positions as f64,
        greedy_match,
    }
}

/// The WebGPU check of one dtype: the bounds tests/onnx.rs holds native ONNX
/// Runtime to against PyTorch (fp32 and fp16 also PyTorch's greedy tokens),
/// and, where the same file ran in WebAssembly, agreement with it (the
/// first 8 greedy tokens, logits within 0.05: measured on SwiftShader, at most
/// 1.8e-2 for uint8, below 1e-5 for the others). Failures, as text.
fn check(
    dtype: &str,
    webgpu: &serde_json::Value,
    wasm: Option<&serde_json::Value>,
    torch: &[Vec<f32>],
    vocab: usize,
) -> Vec<String> {
    let (max_abs, top1) = match dtype {
        "fp32" => (1e-4, 1.0),
        "fp16" => (0.05, 0.97),
        "q8" | "int8" | "uint8" => (1.5, 0.85),
        _ => (4.0, 0.4),
    };
    let m = measure(webgpu, torch, vocab);
    let mut failures = Vec::new();
    if m.max_abs_error > max_abs {
        failures.push(format!(
            "{dtype}: max abs error against PyTorch {} > {max_abs}",
            m.max_abs_error
        ));
    }
    if m.top1_agreement < top1 {
        failures.push(format!(
            "{dtype}: top-1 agreement with PyTorch {} < {top1}",
            m.top1_agreement
        ));
    }
    if dtype.starts_with("fp") && m.greedy_match.iter().any(|&n| n < 20) {
        failures.push(format!(
            "{dtype}: PyTorch's greedy tokens matched for {:?} of 20",
            m.greedy_match
        ));
    }
    if let Some(wasm) = wasm {
        for (i, (a, b)) in webgpu["cases"]
            .as_array()
            .unwrap()
            .iter()
            .zip(wasm["cases"].as_array().unwrap())
            .enumerate()
        {
            let error = floats(&a["logits"])
                .iter()
                .zip(floats(&b["logits"]))
                .map(|(x, y)| (x - y).abs())
                .fold(0f32, f32::max);
            if error > 0.05 {
                failures.push(format!(
                    "{dtype}: prompt {i}: logits differ from WebAssembly's by {error}"
                ));
            }
            if a["ids"].as_array().unwrap()[..8] != b["ids"].as_array().unwrap()[..8] {
                failures.push(format!(
                    "{dtype}: prompt {i}: greedy tokens {} where WebAssembly gives {}",
                    a["ids"], b["ids"]
                ));
            }
        }
    }
    failures
}

fn build(dir: &Path, targets: &[&str]) -> PathBuf {
    let targets: Vec<String> = targets.iter().map(|t| format!("\"{t}\"")).collect();
    // accuracy_level 0: WebGPU's MatMulNBits honours the level, WebAssembly's
    // computes in fp32 whatever it says; 0 makes them one computation.
    let manifest = format!(
        "[project]\nname = \"webgpu\"\n\n[base]\nmodel = \"path:{}\"\n\n[export]\ntargets = [{}]\naccuracy_level = 0\n",
        fixture().display(),
        targets.join(", ")
    );
    std::fs::write(dir.join("symb.toml"), manifest).unwrap();
    let out = Command::new(common::BIN)
        .arg("build")
        .current_dir(dir)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    dir.join("dist")
}

/// Tests 1 and 2: every dtype on SwiftShader's WebGPU within its bounds, the
/// dtypes that need `shader-f16` refused as such (the adapter has none), and
/// a damaged file caught by the same check.
#[test]
fn every_dtype_runs_on_webgpu_within_its_bounds_and_a_damaged_file_fails() {
    let dtypes = ["fp32", "fp16", "q8", "uint8", "q4", "q4f16"];
    let dir = tempfile::tempdir().unwrap();
    let dist = build(dir.path(), &dtypes);
    let served = common::serve(&dist);
    let out = tempfile::tempdir().unwrap();
    let result = in_chromium(&served.url, true, &["wasm", "webgpu"], &dtypes, out.path());
    assert_eq!(
        result["adapter"]["architecture"], "swiftshader",
        "a WebGPU adapter (SwiftShader): {result}"
    );
    let has_f16 = result["features"]
        .as_array()
        .unwrap()
        .iter()
        .any(|f| f == "shader-f16");
    let torch = golden_logits();
    let vocab = 4096;
    let mut table = Vec::new();
    for dtype in dtypes {
        let (webgpu, wasm) = (
            &result["runs"]["webgpu"][dtype],
            &result["runs"]["wasm"][dtype],
        );
        assert!(
            wasm.get("error").is_none(),
            "{dtype} in WebAssembly: {wasm}"
        );
        let needs_f16 = dtype.contains("16");
        if needs_f16 && !has_f16 {
            // transformers.js refuses fp16 itself; q4f16's Gather kernel says so.
            let error = webgpu["error"].as_str().unwrap_or_else(|| {
                panic!("{dtype} ran on an adapter without shader-f16: {webgpu}")
            });
            assert!(
                error.contains("does not support fp16")
                    || error.contains("requires f16 but the device does not support it"),
                "{dtype}: {error}"
            );
            table.push(format!("{dtype}: needs shader-f16 ({error})"));
            continue;
        }
        assert!(webgpu.get("error").is_none(), "{dtype} on WebGPU: {webgpu}");
        let failures = check(dtype, webgpu, Some(wasm), &torch, vocab);
        assert!(failures.is_empty(), "{failures:#?}");
        // The same file natively (symb generate, ONNX Runtime): the first 8
        // greedy tokens (dynamic int8 rounds differently in each build).
        for (case, golden) in webgpu["cases"].as_array().unwrap().iter().zip(golden()) {
            let native =
                common::onnx_generate(&dist, dtype, golden["prompt"].as_str().unwrap(), 20);
            assert_eq!(
                case["ids"].as_array().unwrap()[..8],
                native.as_array().unwrap()[..8],
                "{dtype}: WebGPU against native ONNX Runtime"
            );
        }
        let m = measure(webgpu, &torch, vocab);
        table.push(format!(
            "{dtype}: {m:?}, {:.1} tokens/s (WebAssembly {:.1})",
            webgpu["tokens_per_second"].as_f64().unwrap(),
            wasm["tokens_per_second"].as_f64().unwrap()
        ));
    }
    eprintln!(
        "WebGPU (SwiftShader) against PyTorch:\n{}",
        table.join("\n")
    );

    // One weight of the fp32 file scaled by 1.1: it loads and runs, and the
    // WebGPU check fails it.
    use prost::Message;
    let broken = dir.path().join("broken");
    std::fs::create_dir(&broken).unwrap();
    for entry in common::walk(&dist) {
        let relative = entry.strip_prefix(&dist).unwrap();
        std::fs::create_dir_all(broken.join(relative).parent().unwrap()).unwrap();
        std::fs::copy(&entry, broken.join(relative)).unwrap();
    }
    let path = broken.join("onnx/model.onnx");
    let mut model =
        symb::onnx::proto::ModelProto::decode(std::fs::read(&path).unwrap().as_slice()).unwrap();
    let weight = model
        .graph
        .as_mut()
        .unwrap()
        .initializer
        .iter_mut()
        .find(|t| t.name.as_deref() == Some("transformer.h.1.mlp.c_fc.weight"))
        .expect("the weight");
    let raw: Vec<u8> = weight
        .raw_data
        .as_ref()
        .unwrap()
        .chunks_exact(4)
        .flat_map(|b| (f32::from_le_bytes(b.try_into().unwrap()) * 1.1).to_le_bytes())
        .collect();
    weight.raw_data = Some(raw.into());
    std::fs::write(&path, model.encode_to_vec()).unwrap();
    let served = common::serve(&broken);
    let result = in_chromium(&served.url, true, &["webgpu"], &["fp32"], out.path());
    let run = &result["runs"]["webgpu"]["fp32"];
    assert!(
        run.get("error").is_none(),
        "the damaged file still runs: {run}"
    );
    let failures = check("fp32", run, None, &torch, vocab);
    assert!(
        failures
            .iter()
            .any(|f| f.contains("max abs error against PyTorch")),
        "{failures:#?}"
    );
}

/// `[verify.browser]`: the build itself runs every file in Chromium on
/// SwiftShader's WebGPU and compares it with candle, as `verify` does
/// natively; the report says what ran, what passed, and what is unproven.
#[test]
fn the_build_checks_every_file_on_webgpu_when_asked() {
    let dir = tempfile::tempdir().unwrap();
    let modules = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/js/node_modules");
    let manifest = format!(
        // head_bits 4: the bound below was measured with a 4-bit head.
        "[project]\nname = \"webgpu\"\n\n[base]\nmodel = \"path:{}\"\n\n[export]\ntargets = \
            [\"fp32\", \"q4\", \"q4f16\"]\naccuracy_level = 0\nhead_bits = \
            4\n\n[verify.browser]\nadapter = \"swiftshader\"\ntransformers_js = \"{}\"\n",
        fixture().display(),
        modules.display()
    );
    std::fs::write(dir.path().join("symb.toml"), &manifest).unwrap();
    let out = Command::new(common::BIN)
        .args(["build", "--json"])
        .current_dir(dir.path())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: serde_json::Value = serde_json::from_slice(
        &std::fs::read(dir.path().join("dist/reports/browser.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(report["adapter"]["architecture"], "swiftshader", "{report}");
    let webgpu = &report["devices"]["webgpu"];
    assert_eq!(
        (
            &webgpu["fp32"]["status"],
            &webgpu["q4"]["status"],
            &webgpu["q4f16"]["status"]
        ),
        (&"passed".into(), &"passed".into(), &"unproven".into()),
        "{report}"
    );
    // fp32 on WebGPU: candle's logits and all its greedy tokens.
    assert!(
        webgpu["fp32"]["metrics"]["max_abs_error"].as_f64().unwrap() < 1e-4
            && webgpu["fp32"]["metrics"]["greedy_match"] == 1.0,
        "{report}"
    );
    assert!(
        webgpu["fp32"]["positions"].as_u64().unwrap() > 100,
        "every position of the prompts and candle's tokens: {report}"
    );
    let page = std::fs::read_to_string(dir.path().join("dist/report.html")).unwrap();
    assert!(
        page.contains("<th>WebGPU</th>")
            && page.contains("unproven<span class=\"bound\">needs shader-f16")
            && page.contains("WebGPU adapter: google swiftshader, without shader-f16"),
        "{page}"
    );
    assert!(
        page.contains("The page loads fp32 on WebAssembly and q4 on WebGPU."),
        "{page}"
    );
    let before = common::snapshot(&dir.path().join("dist"));

    // A bound q4 meets natively (top-1 0.535 on all 15 prompts) but not on
    // WebGPU's first 2 (0.525; the prompts go shortest first): the build
    // fails with the device named, exit 3, and the folder keeps its previous
    // state.
    let manifest = manifest.replace("[verify.browser]\n", "[verify.browser]\nprompts = 2\n");
    std::fs::write(
        dir.path().join("symb.toml"),
        format!("{manifest}\n[verify.tolerance.q4]\ntop1_agreement = 0.53\n"),
    )
    .unwrap();
    let out = Command::new(common::BIN)
        .arg("build")
        .current_dir(dir.path())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(3), "{stderr}");
    assert!(
        stderr.contains("the browser check failed")
            && stderr.contains("q4 on WebGPU: top1_agreement = "),
        "{stderr}"
    );
    assert_eq!(
        common::snapshot(&dir.path().join("dist")),
        before,
        "the previous output stays"
    );
}

/// A tokenizer transformers.js reads otherwise than symb (an added token
/// with `single_word`, which it ignores and matches inside words: `ou` in
/// `around`) fails the build's browser check, naming lines and ids, and the
/// output folder keeps its previous state.
#[test]
fn a_tokenizer_the_browser_reads_otherwise_fails_the_browser_check() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base");
    std::fs::create_dir(&base).unwrap();
    for entry in std::fs::read_dir(fixture()).unwrap() {
        let path = entry.unwrap().path();
        if path.is_file() {
            std::fs::copy(&path, base.join(path.file_name().unwrap())).unwrap();
        }
    }
    let modules = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/js/node_modules");
    let manifest = format!(
        "[project]\nname = \"divergent\"\n\n[base]\nmodel = \"path:base\"\n\n[export]\ntargets = \
            [\"fp32\"]\n\n[verify.browser]\ndevices = [\"wasm\"]\nprompts = 1\ntransformers_js = \
            \"{}\"\n",
        modules.display()
    );
    std::fs::write(dir.path().join("symb.toml"), &manifest).unwrap();
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
    let report: serde_json::Value = serde_json::from_slice(
        &std::fs::read(dir.path().join("dist/reports/browser.json")).unwrap(),
    )
    .unwrap();
    assert!(
        report["tokenized_lines"].as_u64().unwrap() >= 15,
        "the English sample and the prompts: {report}"
    );
    let before = common::snapshot(&dir.path().join("dist"));

    let mut tokenizer: serde_json::Value =
        serde_json::from_slice(&std::fs::read(base.join("tokenizer.json")).unwrap()).unwrap();
    // The vocabulary's own `ou`, as an added token too: Python matches it
    // as a whole word only, and no line has it alone.
    let id = tokenizer["model"]["vocab"]["ou"].as_u64().unwrap();
    tokenizer["added_tokens"]
        .as_array_mut()
        .unwrap()
        .push(serde_json::json!({"id": id, "content": "ou", "single_word": true, "lstrip": false, "rstrip": false, "normalized": false, "special": false}));
    std::fs::write(base.join("tokenizer.json"), tokenizer.to_string()).unwrap();
    let out = Command::new(common::BIN)
        .arg("build")
        .current_dir(dir.path())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(3), "{stderr}");
    assert!(
        stderr.contains("the tokenizer gives other ids in transformers.js than in symb on")
            && stderr.contains("symb [")
            && stderr.contains("transformers.js ["),
        "{stderr}"
    );
    assert_eq!(
        common::snapshot(&dir.path().join("dist")),
        before,
        "the previous output stays"
    );
}
