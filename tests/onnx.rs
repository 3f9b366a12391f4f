//! The ONNX export of the PyTorch fixture, run by ONNX Runtime (Python's
//! `onnxruntime`), against PyTorch's golden logits and greedy tokens: in one
//! prefill pass, token by token through the KV cache, and left-padded.
#![allow(clippy::unwrap_used)] // a test: a panic is how it fails

use std::path::PathBuf;
use std::process::Command;

use candle_core::Device;
use symb::model;

fn fixture() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tiny-gpt2")
}

fn max_abs(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0f32, f32::max)
}

#[test]
fn the_fixture_exported_runs_in_onnx_runtime_as_pytorch_does() {
    let model = model::load_folder(&fixture()).unwrap();
    let onnx = model.to_onnx(17).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("model.onnx");
    symb::onnx::save(&onnx, &path).unwrap();

    check_against_golden(&path);
}

/// The fixture's golden cases, their logits, and a run_onnx.py request for
/// their prompts written in `dir`.
fn golden_request(
    dir: &std::path::Path,
    max_new_tokens: usize,
) -> (
    Vec<serde_json::Value>,
    std::collections::HashMap<String, candle_core::Tensor>,
    PathBuf,
) {
    golden_request_of(&fixture(), dir, max_new_tokens)
}

fn golden_request_of(
    fixture: &std::path::Path,
    dir: &std::path::Path,
    max_new_tokens: usize,
) -> (
    Vec<serde_json::Value>,
    std::collections::HashMap<String, candle_core::Tensor>,
    PathBuf,
) {
    let golden: serde_json::Value =
        serde_json::from_slice(&std::fs::read(fixture.join("golden.json")).unwrap()).unwrap();
    let logits =
        candle_core::safetensors::load(fixture.join("golden.safetensors"), &Device::Cpu).unwrap();
    let cases = golden["cases"].as_array().unwrap().clone();
    let prompts: Vec<Vec<u32>> = cases
        .iter()
        .map(|c| serde_json::from_value(c["input_ids"].clone()).unwrap())
        .collect();
    let request = dir.join("request.json");
    std::fs::write(
        &request,
        serde_json::json!({"prompts": prompts, "max_new_tokens": max_new_tokens}).to_string(),
    )
    .unwrap();
    (cases, logits, request)
}

/// tests/python/run_onnx.py's report on `model` for `request`.
fn run_onnx(model: &std::path::Path, request: &std::path::Path) -> serde_json::Value {
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/python/run_onnx.py");
    let out = Command::new("python3")
        .arg(script)
        .arg(model)
        .arg(request)
        .output()
        .expect("python3 runs");
    assert!(
        out.status.success(),
        "run_onnx.py on {}: {}",
        model.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// Runs run_onnx.py on `model` for the golden prompts; checks every logit
/// row against PyTorch's and the greedy tokens.
fn check_against_golden(model_path: &std::path::Path) {
    check_against_golden_of(&fixture(), model_path)
}

fn check_against_golden_of(fixture: &std::path::Path, model_path: &std::path::Path) {
    let dir = tempfile::tempdir().unwrap();
    let (cases, logits, request) = golden_request_of(fixture, dir.path(), 20);
    let report = run_onnx(model_path, &request);
    for (i, case) in cases.iter().enumerate() {
        let expected: Vec<Vec<f32>> = logits[&format!("logits.{i}")].to_vec2().unwrap();
        let got = &report["cases"][i];
        for (mode, rows) in [
            ("prefill", &got["prefill"]),
            ("stepped", &got["stepped"]),
            ("padded", &report["padded"][i]),
        ] {
            let rows: Vec<Vec<f32>> = serde_json::from_value(rows.clone()).unwrap();
            assert_eq!(rows.len(), expected.len(), "{mode} case {i}");
            for (position, (row, want)) in rows.iter().zip(&expected).enumerate() {
                let error = max_abs(row, want);
                assert!(
                    error < 1e-4,
                    "{mode} case {i} position {position}: max abs logits error {error}"
                );
            }
        }
        assert_eq!(
            got["greedy"], case["greedy_20"],
            "greedy tokens of case {i}"
        );
    }
}

/// Issue 4's converter case: a manifest with only [project], [base] (a
/// Hugging Face folder) and [export].
#[test]
fn a_base_and_export_manifest_converts_the_folder() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("symb.toml"),
        format!(
            "[project]\nname = \
        \"convert\"\n\n[base]\nmodel = \"path:{}\"\n\n[export]\nopset = 17\ntargets = \
        [\"fp32\"]\n",
            fixture().display()
        ),
    )
    .unwrap();
    let bin = env!("CARGO_BIN_EXE_symb");
    let out = Command::new(bin)
        .args(["build", "--json"])
        .current_dir(dir.path())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8(out.stdout).unwrap();
    let ran: Vec<String> = stdout
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|e| e["status"] == "ran")
        .map(|e| e["stage"].as_str().unwrap().to_string())
        .collect();
    let mut ran = ran;
    ran.sort();
    assert_eq!(
        ran,
        [
            "base",
            "bundle",
            "export",
            "reference",
            "verify.fp32",
            "verify.tokenizer",
            "web"
        ]
    );
    let verified: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(dir.path().join("dist/reports/verify.fp32.json")).unwrap(),
    )
    .unwrap();
    assert!(
        verified["metrics"]["max_abs_error"].as_f64().unwrap() < 1e-4
            && verified["metrics"]["greedy_match"] == 1.0,
        "{verified}"
    );
    check_against_golden(&dir.path().join("dist/onnx/model.onnx"));
    // Again: nothing runs.
    let again = Command::new(bin)
        .args(["build", "--json"])
        .current_dir(dir.path())
        .output()
        .unwrap();
    let last: serde_json::Value = serde_json::from_str(
        String::from_utf8(again.stdout)
            .unwrap()
            .lines()
            .last()
            .unwrap(),
    )
    .unwrap();
    assert_eq!(last["ran"], 0);
    // Adding a dtype runs its quantize stage only; the report proves every
    // linear weight (4 per layer and the head) is 4-bit.
    let text = std::fs::read_to_string(dir.path().join("symb.toml"))
        .unwrap()
        .replace("[\"fp32\"]", "[\"fp32\", \"q4\"]");
    std::fs::write(dir.path().join("symb.toml"), text).unwrap();
    let out = Command::new(bin)
        .args(["build", "--json"])
        .current_dir(dir.path())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let ran: Vec<String> = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|e| e["status"] == "ran")
        .map(|e| e["stage"].as_str().unwrap().to_string())
        .collect();
    let mut ran = ran;
    ran.sort();
    assert_eq!(
        ran,
        ["bundle", "quantize.q4", "verify.q4"],
        "the config is rewritten: it may have to name the new file's external data"
    );
    let report: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(dir.path().join("dist/reports/quantize.q4.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(report["matmul_nbits_nodes"], 9);
    assert_eq!(
        report["matmul_float_nodes"], 4,
        "the attention products stay float"
    );
    assert!(
        dir.path().join("dist/onnx/model.onnx").is_file()
            && dir.path().join("dist/onnx/model_q4.onnx").is_file()
    );
}

/// A model symb trained (scratch base, full fine-tuning) exported after
/// merge: ONNX Runtime's logits equal candle's on the output folder.
#[test]
fn a_trained_model_exports_after_merge() {
    let dir = tempfile::tempdir().unwrap();
    let lines: Vec<String> = std::fs::read_to_string(
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("corpus/symbiotic.txt"),
    )
    .unwrap()
    .lines()
    .take(300)
    .map(str::to_string)
    .collect();
    std::fs::create_dir_all(dir.path().join("corpus")).unwrap();
    std::fs::write(dir.path().join("corpus/a.txt"), lines.join("\n")).unwrap();
    std::fs::write(
        dir.path().join("symb.toml"),
        "[corpus]\nfiles = [\"corpus/*.txt\"]\n\n[tokenizer]\nvocab_size = 400\n\n[base]\nmodel = \"scratch\"\nn_layer = 2\nn_head = 2\nn_embd = 32\nn_positions = 64\n\n\
         [finetune]\nmethod = \"full\"\nlearning_rate = 3e-3\nbatch_size = 4\nblock_size = \
             32\nmax_steps = 10\neval_every = 10\n\n[export]\ntargets = [\"fp32\"]\n",
    )
    .unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_symb"))
        .args(["build"])
        .current_dir(dir.path())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let model = model::load_folder(&dir.path().join("dist")).unwrap();
    let tokenizer =
        tokenizers::Tokenizer::from_file(dir.path().join("dist/tokenizer.json")).unwrap();
    let prompt = tokenizer
        .encode(lines[0].as_str(), false)
        .unwrap()
        .get_ids()[..20]
        .to_vec();
    let input = candle_core::Tensor::new(prompt.as_slice(), &Device::Cpu)
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    let expected: Vec<Vec<f32>> = model
        .forward(&input, None)
        .unwrap()
        .squeeze(0)
        .unwrap()
        .to_vec2()
        .unwrap();
    let request = dir.path().join("request.json");
    std::fs::write(
        &request,
        serde_json::json!({"prompts": [prompt], "max_new_tokens": 8}).to_string(),
    )
    .unwrap();
    let report = run_onnx(&dir.path().join("dist/onnx/model.onnx"), &request);
    let rows: Vec<Vec<f32>> =
        serde_json::from_value(report["cases"][0]["stepped"].clone()).unwrap();
    for (row, want) in rows.iter().zip(&expected) {
        assert!(max_abs(row, want) < 1e-4);
    }
    let (greedy, _) = model.greedy(&prompt, 8, None).unwrap();
    assert_eq!(report["cases"][0]["greedy"], serde_json::json!(greedy));
}

/// Every dtype of the fixture's export, run by ONNX Runtime against
/// PyTorch's golden logits: how far each is, and that each quantized every
/// linear weight (4 per layer and the head).
#[test]
fn every_dtype_runs_in_onnx_runtime_near_pytorch() {
    let model = model::load_folder(&fixture()).unwrap();
    let fp32 = model.to_onnx(17).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (cases, logits, request) = golden_request(dir.path(), 4);
    let linear = 4 * model.n_layer() + 1;
    for (label, bound, agreement) in [
        ("fp16", 0.05, 0.97),
        ("q8", 1.5, 0.85),
        ("int8", 1.5, 0.85),
        ("uint8", 1.5, 0.85),
        ("q4", 4.0, 0.4),
        ("q4f16", 4.0, 0.4),
        ("q4+embedding", 4.0, 0.4),
        ("q4f16+embedding", 4.0, 0.4),
        ("q4+affine", 4.0, 0.4),
        ("q4f16+affine", 4.0, 0.4),
    ] {
        let (dtype, variant) = label.split_once('+').unwrap_or((label, ""));
        let embedding = variant == "embedding";
        let layout = if variant == "affine" {
            symb::quant::Layout::Affine
        } else {
            symb::quant::Layout::Symmetric
        };
        let options = symb::quant::Options {
            quantize_embedding: embedding,
            layout,
            ..Default::default()
        };
        let (quantized, report) = symb::quant::quantize(
            fp32.clone(),
            dtype.parse().unwrap(),
            options,
            &symb::quant::Blocks::new(None, layout),
        )
        .unwrap();
        if embedding {
            let g = quantized.graph.as_ref().unwrap();
            // The embedding's 4 or 8 bits are gathered as bytes and decoded in
            // standard ops (onnxruntime-web's WebAssembly has no GatherBlockQuantized).
            assert!(
                g.node.iter().any(|n| n.op_type.as_deref() == Some("Gather")
                    && n.input[0] == "transformer.wte.weight_quantized"),
                "{label}"
            );
            assert!(
                !g.node
                    .iter()
                    .any(|n| n.op_type.as_deref() == Some("GatherBlockQuantized")),
                "{label}"
            );
            assert!(
                !g.initializer
                    .iter()
                    .any(|t| t.name.as_deref() == Some("transformer.wte.weight")),
                "no float embedding is left"
            );
        }
        match dtype {
            "int8" | "uint8" => assert_eq!(
                (report.matmul_integer_nodes, report.weights_quantized),
                (linear, linear),
                "{report:?}"
            ),
            // 8-bit storage, float compute: every matrix (the tied
            // embedding once) as int8 blocks turned back into floats by
            // constant Cast, Reshape and Mul.
            "q8" => {
                // GPT-2's position table is gathered too.
                assert_eq!(
                    (
                        report.matmul_nbits_nodes,
                        report.matmul_integer_nodes,
                        report.weights_quantized
                    ),
                    (0, 0, linear + 1),
                    "{report:?}"
                );
                let g = quantized.graph.as_ref().unwrap();
                let int8 = g
                    .initializer
                    .iter()
                    .filter(|t| t.data_type == Some(3))
                    .count();
                assert_eq!(int8, linear + 1, "one int8 matrix per weight");
            }
            "q4" | "q4f16" => assert_eq!(report.matmul_nbits_nodes, linear, "{report:?}"),
            _ => {}
        }
        // Affine: every body weight whose width tiles into blocks (the
        // tied head stays symmetric: the embedding may share its blocks).
        assert_eq!(report.weights_affine > 0, variant == "affine", "{report:?}");
        assert!(
            report.weight_bytes_after < report.weight_bytes_before,
            "{report:?}"
        );
        let path = dir.path().join(format!("{label}.onnx"));
        symb::onnx::save(&quantized, &path).unwrap();
        let run = run_onnx(&path, &request);
        let (mut worst, mut agree, mut total) = (0f32, 0, 0);
        for (i, _) in cases.iter().enumerate() {
            let expected: Vec<Vec<f32>> = logits[&format!("logits.{i}")].to_vec2().unwrap();
            for mode in ["prefill", "stepped"] {
                let rows: Vec<Vec<f32>> =
                    serde_json::from_value(run["cases"][i][mode].clone()).unwrap();
                for (row, want) in rows.iter().zip(&expected) {
                    assert!(
                        row.iter().all(|v| v.is_finite()),
                        "{dtype}: non-finite logits"
                    );
                    worst = worst.max(max_abs(row, want));
                    let argmax = |v: &[f32]| {
                        v.iter()
                            .enumerate()
                            .max_by(|a, b| a.1.total_cmp(b.1))
                            .unwrap()
                            .0
                    };
                    agree += (argmax(row) == argmax(want)) as usize;
                    total += 1;
                }
            }
            let padded: Vec<Vec<f32>> = serde_json::from_value(run["padded"][i].clone()).unwrap();
            assert!(
                padded.iter().flatten().all(|v| v.is_finite()),
                "{dtype}: non-finite logits with left padding"
            );
        }
        let top1 = agree as f64 / total as f64;
        let size = std::fs::metadata(&path).unwrap().len();
        eprintln!(
            "{label}: max abs logits error {worst:.4}, top-1 agreement {top1:.3}, {size} bytes, {report:?}"
        );
        assert!(
            worst < bound && top1 >= agreement,
            "{label}: max abs error {worst} (bound {bound}), top-1 {top1} (bound {agreement})"
        );
    }
}

/// The 4-bit packing is exact: ONNX Runtime runs symb's q4 graph of one
/// MatMul as an fp32 MatMul over the same weights dequantized here from the
/// blocks (B `[N, blocks, 16]`, two values per byte, low nibble first):
/// symmetric, w = (q − 8) · scale, on a K that is not a multiple of the
/// block (one MatMulNBits); affine, w = (q − 8) · scale + offset (MatMulNBits
/// plus the input's block sums times the offsets).
#[test]
fn q4_packing_matches_onnx_runtime_exactly() {
    use symb::onnx::proto::tensor_proto::DataType;
    use symb::onnx::{Dim, GraphBuilder, tensor_f32};
    use symb::quant::{Bits, Blocks, Layout, Options};
    let mut state = 1u64;
    let mut next = || {
        state = state
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((state >> 33) as f32 / (1u64 << 31) as f32) * 2.0 - 1.0
    };
    let dir = tempfile::tempdir().unwrap();
    for (layout, k, ops) in [
        (Layout::Symmetric, 80usize, vec!["MatMulNBits"]),
        (
            Layout::Affine,
            96,
            vec!["MatMul", "MatMulNBits", "MatMul", "Add"],
        ),
    ] {
        let n = 24usize;
        // Shifted so that the blocks do not straddle zero evenly.
        let w: Vec<f32> = (0..k * n).map(|_| next() + 0.3).collect();
        let packed = symb::quant::pack(&w, k, n, Bits::Four, layout);
        assert_eq!(packed.offsets.is_some(), layout == Layout::Affine);
        let blocks = k.div_ceil(32);
        let mut dequantized = vec![0f32; k * n];
        for col in 0..n {
            for row in 0..k {
                let (b, j) = (row / 32, row % 32);
                let byte = packed.data[(col * blocks + b) * 16 + j / 2];
                let q = if j % 2 == 0 { byte & 15 } else { byte >> 4 };
                let offset = packed.offsets.as_ref().map_or(0.0, |o| o[col * blocks + b]);
                dequantized[row * n + col] =
                    (q as f32 - 8.0) * packed.scales[col * blocks + b] + offset;
            }
        }
        let graph = |w: &[f32]| {
            let mut g = GraphBuilder::new("one");
            let x = g.input(
                "x",
                DataType::Float,
                &[Dim::from("rows"), Dim::Fixed(k as i64)],
            );
            let w = g.initializer(tensor_f32("W", &[k, n], w));
            g.node_named("MatMul", None, &[&x, &w], &[], &["y"]);
            g.output(
                "y",
                DataType::Float,
                &[Dim::from("rows"), Dim::Fixed(n as i64)],
            );
            g.finish(17)
        };
        // Level 0: fp32 compute, as the dense MatMul's.
        let options = Options {
            layout,
            accuracy_level: 0,
            ..Options::default()
        };
        let (quantized, report) = symb::quant::quantize(
            graph(&w),
            symb::dtype::Dtype::Q4,
            options,
            &Blocks::new(None, layout),
        )
        .unwrap();
        let g = quantized.graph.as_ref().unwrap();
        let found: Vec<&str> = g.node.iter().filter_map(|n| n.op_type.as_deref()).collect();
        assert_eq!(found, ops, "{layout:?}");
        assert_eq!(report.weights_affine, usize::from(layout == Layout::Affine));
        let script = "import sys, numpy as np, onnxruntime as ort\n\
                      x = np.random.default_rng(0).standard_normal((5, int(sys.argv[3]))).astype(np.float32)\n\
                      a, b = (ort.InferenceSession(p, providers=['CPUExecutionProvider']).run(['y'], {'x': x})[0] for p in sys.argv[1:3])\n\
                      print(float(np.abs(a - b).max()))";
        symb::onnx::save(&quantized, &dir.path().join("nbits.onnx")).unwrap();
        symb::onnx::save(&graph(&dequantized), &dir.path().join("dense.onnx")).unwrap();
        let out = Command::new("python3")
            .args(["-c", script])
            .arg(dir.path().join("nbits.onnx"))
            .arg(dir.path().join("dense.onnx"))
            .arg(k.to_string())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let error: f32 = String::from_utf8(out.stdout)
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        assert!(
            error < 1e-5,
            "{layout:?}: ONNX Runtime vs dequantized MatMul: {error}"
        );
    }
}

/// `export.external_data = "always"`: every file keeps its weights in
/// `NAME.onnx_data` beside it (as past 2 GiB), ONNX Runtime (Python's, and
/// symb's verify stages through `ort`) loads them, and config.json tells
/// transformers.js which files have data and in how many chunks.
#[test]
fn external_data_files_load_and_the_config_names_them() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("symb.toml"),
        format!(
            "[project]\nname = \"convert\"\n\n[base]\nmodel = \"path:{}\"\n\n[export]\ntargets \
            = [\"fp32\", \"fp16\", \"q8\", \"q4\"]\nexternal_data = \
            \"always\"\n",
            fixture().display()
        ),
    )
    .unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_symb"))
        .args(["build"])
        .current_dir(dir.path())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let onnx = dir.path().join("dist/onnx");
    for file in [
        "model.onnx",
        "model_fp16.onnx",
        "model_quantized.onnx",
        "model_q4.onnx",
    ] {
        let model = std::fs::metadata(onnx.join(file)).unwrap().len();
        let data = std::fs::metadata(onnx.join(format!("{file}_data")))
            .unwrap()
            .len();
        assert!(
            model < 64 * 1024 && data > 4 * model,
            "{file}: {model} bytes of graph, {data} of data"
        );
        assert!(!onnx.join(format!("{file}_data_1")).exists());
    }
    let config: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(dir.path().join("dist/config.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(
        config["transformers.js_config"]["use_external_data_format"],
        serde_json::json!({"model.onnx": 1, "model_fp16.onnx": 1, "model_quantized.onnx": 1, "model_q4.onnx": 1})
    );
    assert_eq!(config["n_layer"], 2, "the model's own config is kept");
    check_against_golden(&onnx.join("model.onnx"));
    for dtype in ["fp32", "fp16", "q8", "q4"] {
        assert!(
            dir.path()
                .join(format!("dist/reports/verify.{dtype}.json"))
                .is_file()
        );
    }
    // Back to one file each: the data files and the config key go.
    let text = std::fs::read_to_string(dir.path().join("symb.toml"))
        .unwrap()
        .replace("external_data = \"always\"\n", "");
    std::fs::write(dir.path().join("symb.toml"), text).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_symb"))
        .args(["build"])
        .current_dir(dir.path())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!onnx.join("model.onnx_data").exists());
    let config: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(dir.path().join("dist/config.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(
        config["transformers.js_config"],
        serde_json::json!({"dtype": "q8", "device_config": {"wasm": {"dtype": "q8"}, "webgpu": {"dtype": "q4"}}}),
        "no external data named any more"
    );
    check_against_golden(&onnx.join("model.onnx"));
}

/// The Llama family's export (grouped- and multi-query KV cache, RoPE with
/// llama3 scaling, RMSNorm, the SiLU gate, Qwen2's biases, tied and untied
/// heads) in ONNX Runtime against PyTorch: every logit within 1e-4 in one
/// prefill pass, token by token through the KV cache, and left-padded; the
/// same greedy tokens. At opset 17 and 18 (ReduceMean's axes as an attribute,
/// then as an input).
#[test]
fn llama_family_exports_run_in_onnx_runtime_as_pytorch_does() {
    for (name, opset) in [
        ("tiny-llama", 17),
        ("tiny-llama-sp", 18),
        ("tiny-qwen2", 17),
    ] {
        let dir = fixture().with_file_name(name);
        let model = model::load_folder(&dir).unwrap();
        let onnx = model.to_onnx(opset).unwrap();
        let out = tempfile::tempdir().unwrap();
        let path = out.path().join("model.onnx");
        symb::onnx::save(&onnx, &path).unwrap();
        check_against_golden_of(&dir, &path);
    }
}
