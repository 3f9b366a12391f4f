//! The playground page in a real headless Chromium (Debian's, driven by
//! playwright-core), served by `symb serve` with a local transformers.js:
//! it generates what symb generates, and nothing leaves 127.0.0.1 (issue 5,
//! test 2). The screenshot is kept in target/test-artifacts/.
#![allow(clippy::unwrap_used)] // a test: a panic is how it fails

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

fn fixture() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tiny-gpt2")
}

/// tests/js/browser.mjs: the page's result for one prompt and dtype (`None`:
/// the page's choice), in a Chromium with a WebGPU adapter or without one.
fn in_chromium(
    url: &str,
    prompt: &str,
    dtype: Option<&str>,
    webgpu: bool,
    max_new_tokens: usize,
    screenshot: &Path,
) -> serde_json::Value {
    common::browser_page(
        url,
        &serde_json::json!({"prompt": prompt, "dtype": dtype, "max_new_tokens": max_new_tokens, "webgpu": webgpu}),
        screenshot,
    )
}

#[test]
fn the_served_playground_generates_in_chromium_what_symb_generates() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("symb.toml"),
        // accuracy_level 0: native ONNX Runtime computes MatMulNBits in fp32,
        // as its WebAssembly build always does.
        format!(
            "[project]\nname = \"tiny-gpt2\"\n\n[base]\nmodel = \
            \"path:{}\"\n\n[export]\ntargets = [\"fp32\", \"fp16\", \"q8\", \
            \"q4\"]\naccuracy_level = 0\n",
            fixture().display()
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
    let dist = dir.path().join("dist");
    // As a user serves it: transformers.js and ONNX Runtime's files come
    // from the folder's `web/`, and nothing leaves the server.
    let served = common::serve_bundled(&dist);
    assert!(
        served.url.starts_with("http://127.0.0.1:"),
        "{}",
        served.url
    );
    let artifacts = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/test-artifacts");
    std::fs::create_dir_all(&artifacts).unwrap();
    let golden: serde_json::Value =
        serde_json::from_slice(&std::fs::read(fixture().join("golden.json")).unwrap()).unwrap();
    let case = &golden["cases"][0];
    let prompt = case["prompt"].as_str().unwrap();
    for dtype in ["fp32", "fp16", "q8", "q4"] {
        let shot = artifacts.join(format!("playground-{dtype}.png"));
        let result = in_chromium(&served.url, prompt, Some(dtype), false, 20, &shot);
        assert_eq!(result["state"], "done", "{dtype}: {result}");
        assert_eq!(result["device"], "wasm", "no WebGPU adapter: WebAssembly");
        assert_eq!(
            result["crossOriginIsolated"], true,
            "COOP/COEP: multithreaded WebAssembly"
        );
        for url in result["requests"].as_array().unwrap() {
            assert!(
                url.as_str().unwrap().starts_with(&served.url),
                "{dtype}: a request left the server: {url}"
            );
        }
        for file in [
            "web/transformers.min.js",
            "web/ort-wasm-simd-threaded.asyncify.wasm",
        ] {
            let url = format!("{}/{file}", served.url.trim_end_matches('/'));
            assert!(
                result["requests"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .any(|r| r == &url),
                "{dtype}: the page loads {file} from the folder: {}",
                result["requests"]
            );
        }
        assert!(
            std::fs::metadata(&shot).unwrap().len() > 10_000,
            "a screenshot"
        );
        for page in ["phone", "report", "report-phone"] {
            assert!(
                std::fs::metadata(artifacts.join(format!("playground-{dtype}-{page}.png")))
                    .unwrap()
                    .len()
                    > 10_000,
                "a {page} screenshot"
            );
        }
        // Both pages fit a 390 px phone screen.
        assert!(
            result["phoneWidth"]["playground"].as_u64().unwrap() <= 390
                && result["phoneWidth"]["report"].as_u64().unwrap() <= 390,
            "{}",
            result["phoneWidth"]
        );
        assert!(
            result["report"].as_str().unwrap().contains("ONNX files"),
            "report.html loads"
        );
        // No column of the report out of sight: at 1280 px the table fits,
        // on a phone each file is a card.
        assert_eq!(
            (
                result["hiddenColumns"]["desktop"].as_u64(),
                result["hiddenColumns"]["phone"].as_u64()
            ),
            (Some(0), Some(0)),
            "{}",
            result["hiddenColumns"]
        );
        assert!(
            !result["examples"].as_array().unwrap().is_empty(),
            "example prompts: {result}"
        );
        let ids = result["ids"].as_array().unwrap();
        assert_eq!(ids.len(), 20, "{dtype}");
        // The time to the first token apart (the prefill, and a first call's
        // warm-up); the speed over the tokens after it.
        let (ttft, rate) = (
            result["speed"]["ttft"].as_f64().unwrap(),
            result["speed"]["rate"].as_f64().unwrap(),
        );
        assert!(
            ttft > 0.0
                && rate > 0.0
                && result["status"]
                    .as_str()
                    .unwrap()
                    .starts_with("20 tokens: the first after "),
            "{dtype}: {}",
            result["status"]
        );
        // The streamed text ends as the whole decoded output, after the prompt.
        assert!(
            result["output"].as_str().unwrap().starts_with(prompt)
                && result["output"].as_str().unwrap().len() > prompt.len(),
            "{}",
            result["output"]
        );
        assert!(
            result["streamed"].as_u64().unwrap() > 1,
            "tokens streamed as they came: {result}"
        );
        let symb = common::onnx_generate(&dist, dtype, prompt, 20);
        match dtype {
            // Dynamic int8 rounds differently in ONNX Runtime's WebAssembly
            // and native builds: on this random-weight model a near-tie flips
            // a token after 9 to 20 (measured on the five golden prompts).
            "q8" => assert_eq!(
                result["ids"].as_array().unwrap()[..8],
                symb.as_array().unwrap()[..8],
                "{dtype}: {} vs {symb}",
                result["ids"]
            ),
            // The same tokens as symb (ONNX Runtime, native).
            _ => assert_eq!(result["ids"], symb, "{dtype}"),
        }
        if dtype.starts_with("fp") {
            assert_eq!(
                result["ids"], case["greedy_20"],
                "{dtype}: PyTorch's greedy tokens"
            );
        }
    }
    // Issue 17, test 3: the page picks the device. With SwiftShader's WebGPU
    // adapter it runs on WebGPU with the folder's WebGPU dtype (q4, from
    // config.json's device_config), and gives native ONNX Runtime's tokens
    // (accuracy_level 0); without an adapter, WebAssembly and its dtype (q8).
    let result = in_chromium(
        &served.url,
        prompt,
        None,
        true,
        20,
        &artifacts.join("playground-webgpu.png"),
    );
    assert_eq!(
        (&result["state"], &result["device"], &result["dtype"]),
        (&"done".into(), &"webgpu".into(), &"q4".into()),
        "{result}"
    );
    assert!(
        result["status"]
            .as_str()
            .unwrap()
            .contains("(q4 on WebGPU, greedy)"),
        "{}",
        result["status"]
    );
    assert_eq!(
        result["ids"],
        common::onnx_generate(&dist, "q4", prompt, 20),
        "q4 on WebGPU against native ONNX Runtime"
    );
    let result = in_chromium(
        &served.url,
        prompt,
        None,
        false,
        20,
        &artifacts.join("playground-wasm.png"),
    );
    assert_eq!(
        (&result["state"], &result["device"], &result["dtype"]),
        (&"done".into(), &"wasm".into(), &"q8".into()),
        "{result}"
    );
    assert!(
        result["status"]
            .as_str()
            .unwrap()
            .contains("(q8 on WebAssembly, greedy)"),
        "{}",
        result["status"]
    );
    // fp16 on an adapter without shader-f16: said in words.
    let result = in_chromium(
        &served.url,
        prompt,
        Some("fp16"),
        true,
        20,
        &artifacts.join("playground-webgpu-fp16.png"),
    );
    assert_eq!(result["state"], "error", "{result}");
    assert!(
        result["status"]
            .as_str()
            .unwrap()
            .contains("fp16 needs a GPU with shader-f16"),
        "{}",
        result["status"]
    );
}

/// Issue 13, test 4: the playground on a Llama-family folder (tiny-llama-sp:
/// SentencePiece with byte fallback, multi-query attention, llama3 rope, an
/// untied head) gives in Chromium what symb gives, fp32 and q4, and fp32
/// PyTorch's greedy tokens.
#[test]
fn the_playground_runs_a_llama_folder_in_chromium() {
    let fixture = fixture().with_file_name("tiny-llama-sp");
    let dir = tempfile::tempdir().unwrap();
    let manifest = format!(
        "[project]\nname = \"tiny-llama-sp\"\n\n[base]\nmodel = \"path:{}\"\n\n[export]\ntargets = [\"fp32\", \"q4\"]\naccuracy_level = 0\n\n\
         # Random weights: onnxruntime's own MatMulNBits agrees no better (tests/llama_web.rs).\n[verify.tolerance.q4]\ntop1_agreement = 0.25\nkl_divergence = 0.6\n",
        fixture.display()
    );
    std::fs::write(dir.path().join("symb.toml"), manifest).unwrap();
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
    let dist = dir.path().join("dist");
    let served = common::serve(&dist);
    let artifacts = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/test-artifacts");
    std::fs::create_dir_all(&artifacts).unwrap();
    let golden: serde_json::Value =
        serde_json::from_slice(&std::fs::read(fixture.join("golden.json")).unwrap()).unwrap();
    let case = &golden["cases"][0];
    let prompt = case["prompt"].as_str().unwrap();
    for dtype in ["fp32", "q4"] {
        let shot = artifacts.join(format!("playground-llama-{dtype}.png"));
        let result = in_chromium(&served.url, prompt, Some(dtype), false, 20, &shot);
        assert_eq!(result["state"], "done", "{dtype}: {result}");
        for url in result["requests"].as_array().unwrap() {
            assert!(
                url.as_str().unwrap().starts_with(&served.url),
                "{dtype}: a request left the server: {url}"
            );
        }
        assert_eq!(
            result["ids"],
            common::onnx_generate(&dist, dtype, prompt, 20),
            "{dtype}: Chromium against symb"
        );
        if dtype == "fp32" {
            assert_eq!(result["ids"], case["greedy_20"], "PyTorch's greedy tokens");
        }
    }
}
