//! Stage `verify.<dtype>` and `symb generate --backend onnx`: ONNX Runtime
//! (through `ort`, the library provisioned as a user gets it) against
//! candle, and against PyTorch's golden tokens.
#![allow(clippy::unwrap_used)] // a test: a panic is how it fails

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use symb::model;
use symb::verify::session::{OnnxLm, Threads};
use symb::verify::{self, Workload};

fn fixture() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tiny-gpt2")
}

fn golden() -> Vec<serde_json::Value> {
    let golden: serde_json::Value =
        serde_json::from_slice(&std::fs::read(fixture().join("golden.json")).unwrap()).unwrap();
    golden["cases"].as_array().unwrap().clone()
}

/// A converter project for the fixture with these dtype targets.
fn converter(targets: &[&str]) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let targets: Vec<String> = targets.iter().map(|t| format!("\"{t}\"")).collect();
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
    dir
}

fn symb(dir: &Path, args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_symb"))
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap()
}

/// Issue 4, test 4: a bound too tight fails the build with exit 3 and a
/// message naming the dtype, the metric, its value and the bound; the output
/// folder stays as the last good build left it.
#[test]
fn a_tolerance_too_tight_fails_with_exit_3_and_the_output_folder_is_untouched() {
    let dir = converter(&["fp32", "q8"]);
    let out = symb(dir.path(), &["build"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(dir.path().join("dist/reports/verify.q8.json")).unwrap(),
    )
    .unwrap();
    let error = report["metrics"]["max_abs_error"].as_f64().unwrap();
    assert!(error > 1e-3, "q8 moves the logits: {error}");
    let before = common::snapshot(&dir.path().join("dist"));

    let manifest = std::fs::read_to_string(dir.path().join("symb.toml")).unwrap();
    std::fs::write(
        dir.path().join("symb.toml"),
        format!("{manifest}\n[verify.tolerance.q8]\nmax_abs_error = 0.001\n"),
    )
    .unwrap();
    let out = symb(dir.path(), &["build"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(3), "{stderr}");
    assert!(stderr.contains("(dtype q8)"), "{stderr}");
    assert!(
        stderr.contains(&format!(
            "q8: max_abs_error = {error:.6} is above its maximum 0.001 \
        (set in `[verify.tolerance.q8]`)"
        )),
        "{stderr}"
    );
    assert!(stderr.contains("output `dist` left as it was"), "{stderr}");
    assert_eq!(
        common::snapshot(&dir.path().join("dist")),
        before,
        "the output folder changed"
    );
}

/// `symb generate --backend onnx` on a converted fixture: PyTorch's greedy
/// tokens, through ONNX Runtime and the KV cache.
#[test]
fn generate_with_the_onnx_backend_gives_pytorchs_greedy_tokens() {
    let dir = converter(&["fp32", "q4"]);
    let out = symb(dir.path(), &["build"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for case in golden() {
        let out = symb(
            dir.path(),
            &[
                "generate",
                "--model",
                "dist",
                "--backend",
                "onnx",
                "--dtype",
                "fp32",
                "--max-new-tokens",
                "20",
                "--json",
                "--prompt",
                case["prompt"].as_str().unwrap(),
            ],
        );
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let generation: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(generation["input_ids"], case["input_ids"]);
        assert_eq!(generation["generated_ids"], case["greedy_20"]);
    }
    // q4 runs too (its tokens differ: the fixture is a random model).
    let out = symb(
        dir.path(),
        &[
            "generate",
            "--model",
            "dist",
            "--backend",
            "onnx",
            "--dtype",
            "q4",
            "--max-new-tokens",
            "5",
            "--json",
            "--prompt",
            "The",
        ],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let generation: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(generation["generated_ids"].as_array().unwrap().len(), 5);
    // A dtype the folder lacks: exit 2, naming the ones it has.
    let out = symb(
        dir.path(),
        &[
            "generate",
            "--model",
            "dist",
            "--backend",
            "onnx",
            "--dtype",
            "fp16",
            "--prompt",
            "The",
        ],
    );
    assert_eq!(out.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("the folder has these dtypes: fp32, q4"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The workload of the golden prompts.
fn golden_workload() -> Workload {
    let prompts = golden()
        .iter()
        .map(|c| {
            (
                c["prompt"].as_str().unwrap().to_string(),
                serde_json::from_value(c["input_ids"].clone()).unwrap(),
            )
        })
        .collect::<Vec<(String, Vec<u32>)>>();
    let windows = prompts.iter().map(|(_, ids)| ids.clone()).collect();
    Workload {
        prompts,
        expected: Vec::new(),
        windows,
        max_new_tokens: 8,
        eos: None,
    }
}

/// The default bounds catch a file that loads and runs but is wrong: one
/// layer's MLP weight off by 10% (a bad scale). The same file undamaged passes.
#[test]
fn default_tolerances_catch_a_damaged_file_that_still_runs() {
    use prost::Message;
    let model = model::load_folder(&fixture()).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let good = dir.path().join("good.onnx");
    let mut graph = model.to_onnx(17).unwrap();
    symb::onnx::save(&graph, &good).unwrap();
    let weight = graph
        .graph
        .as_mut()
        .unwrap()
        .initializer
        .iter_mut()
        .find(|t| t.name.as_deref() == Some("transformer.h.1.mlp.c_fc.weight"))
        .unwrap();
    let mut raw = weight.raw_data.as_ref().unwrap().to_vec();
    for chunk in raw.chunks_exact_mut(4) {
        let value = f32::from_le_bytes(chunk.try_into().unwrap()) * 1.1;
        chunk.copy_from_slice(&value.to_le_bytes());
    }
    weight.raw_data = Some(raw.into());
    let bad = dir.path().join("bad.onnx");
    std::fs::write(&bad, graph.encode_to_vec()).unwrap();

    let work = golden_workload();
    let mut logits = Vec::new();
    let reference = verify::reference(&model, work.clone(), &mut logits, |_, _| {}).unwrap();
    let tolerance = verify::tolerance(symb::dtype::Dtype::Fp32, None);
    for stepping in [verify::Stepping::EachToken, verify::Stepping::Chunked] {
        let report = verify::verify(
            &mut OnnxLm::load(&good, Threads::alone(2)).unwrap(),
            &reference,
            &mut logits.as_slice(),
            &tolerance,
            stepping,
            |_, _| {},
        )
        .unwrap();
        assert!(
            report.failures().next().is_none(),
            "{stepping:?}: {:?}",
            report.checks
        );
        assert!(
            report.metrics.max_abs_error < 1e-4 && report.metrics.greedy_match == 1.0,
            "{stepping:?}: {:?}",
            report.metrics
        );
        // 8 greedy tokens per prompt: 7 of them fed back through the cache.
        assert_eq!(
            report.cache.positions,
            7 * work.prompts.len(),
            "{stepping:?}: every greedy step is compared"
        );
        assert_eq!(
            report.prefill.positions,
            work.prompts.iter().map(|(_, ids)| ids.len()).sum::<usize>()
        );
    }

    let mut bad_onnx = OnnxLm::load(&bad, Threads::alone(2)).unwrap();
    let each = verify::verify(
        &mut bad_onnx,
        &reference,
        &mut logits.as_slice(),
        &tolerance,
        verify::Stepping::EachToken,
        |_, _| {},
    )
    .unwrap();
    let report = verify::verify(
        &mut bad_onnx,
        &reference,
        &mut logits.as_slice(),
        &tolerance,
        verify::Stepping::Chunked,
        |_, _| {},
    )
    .unwrap();
    for report in [&each, &report] {
        let failed: Vec<&str> = report.failures().map(|c| c.metric).collect();
        assert!(
            failed.contains(&"max_abs_error") && failed.contains(&"kl_divergence"),
            "{:?}",
            report.checks
        );
    }
    // The two ways along candle's tokens measure the same file alike.
    assert!(
        (each.metrics.max_abs_error - report.metrics.max_abs_error).abs() < 1e-4,
        "{:?} against {:?}",
        each.metrics,
        report.metrics
    );
    assert!(
        (each.metrics.kl_divergence - report.metrics.kl_divergence).abs()
            < 1e-6 * (1.0 + each.metrics.kl_divergence),
        "{:?} against {:?}",
        each.metrics,
        report.metrics
    );
    assert_eq!(
        (each.metrics.top1_agreement, each.metrics.greedy_match),
        (report.metrics.top1_agreement, report.metrics.greedy_match)
    );

    // Following candle's tokens gives the greedy match that ONNX's own
    // greedy decoding gives: the run it shares with candle's, and its token
    // where they part.
    let mut parted = 0;
    for ((_, ids), result) in work.prompts.iter().zip(&report.prompts) {
        let (own, _) = bad_onnx
            .decode(ids, work.max_new_tokens, work.eos, 128, None)
            .unwrap();
        let (candle, _) = model.greedy(ids, work.max_new_tokens, work.eos).unwrap();
        assert_eq!(result.reference_greedy, candle);
        let shared = own.iter().zip(&candle).take_while(|(a, b)| a == b).count();
        assert_eq!(
            (result.matched, result.onnx_at_divergence),
            (
                shared,
                own.get(shared).copied().filter(|_| shared < candle.len())
            ),
            "{result:?} against ONNX's own {own:?}"
        );
        parted += usize::from(shared < candle.len());
    }
    assert!(
        parted > 0,
        "the damaged file parts from candle's greedy tokens on some prompt"
    );

    // A reference whose logits are cut short is refused, not read as zeros.
    let short = &logits[..logits.len() / 2];
    assert!(
        verify::verify(
            &mut bad_onnx,
            &reference,
            &mut &short[..],
            &tolerance,
            verify::Stepping::Chunked,
            |_, _| {}
        )
        .is_err()
    );
    let mut long = logits.clone();
    long.extend_from_slice(&[0; 4]);
    assert!(
        verify::verify(
            &mut bad_onnx,
            &reference,
            &mut long.as_slice(),
            &tolerance,
            verify::Stepping::Chunked,
            |_, _| {}
        )
        .is_err(),
        "a longer file is refused too"
    );
}

/// verify decodes its prompts as one left-padded batch: each row gets the
/// ids it gets alone and the same logits to rounding, prefill, steps, a row
/// that stops early at `eos` and the context limit included; on GPT-2 and on
/// a Llama-family graph (position ids from the padding).
#[test]
fn batched_onnx_decoding_gives_each_prompt_what_it_gets_alone() {
    for fixture in [
        fixture(),
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tiny-llama"),
    ] {
        let model = model::load_folder(&fixture).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("model.onnx");
        symb::onnx::save(&model.to_onnx(17).unwrap(), &path).unwrap();
        let mut onnx = OnnxLm::load(&path, Threads::shared(2, 1)).unwrap();
        let prompts: Vec<Vec<u32>> = vec![
            vec![5, 9, 31, 7, 2, 40],
            vec![11],
            vec![3, 3, 8],
            vec![17, 4, 4, 19, 23, 1, 2, 3, 4],
        ];
        let alone: Vec<_> = prompts
            .iter()
            .map(|p| onnx.decode_steps(p, 12, None, 64).unwrap())
            .collect();
        // An eos that the second row meets first: it stops there, the others go on.
        let eos = alone[1].generated[3];
        let alone_eos: Vec<_> = prompts
            .iter()
            .map(|p| onnx.decode_steps(p, 12, Some(eos), 64).unwrap())
            .collect();
        // A context that cuts the longest prompt's row short.
        let alone_short: Vec<_> = prompts
            .iter()
            .map(|p| onnx.decode_steps(p, 12, None, 14).unwrap())
            .collect();
        for (expected, (eos, context)) in [
            (alone, (None, 64)),
            (alone_eos, (Some(eos), 64)),
            (alone_short, (None, 14)),
        ] {
            let batched = onnx.decode_steps_batch(&prompts, 12, eos, context).unwrap();
            for (row, (a, b)) in expected.iter().zip(&batched).enumerate() {
                let what = format!(
                    "{}: row {row}, eos {eos:?}, context {context}",
                    fixture.display()
                );
                assert_eq!(a.generated, b.generated, "{what}");
                assert_eq!(
                    (a.prefill.len(), a.steps.len()),
                    (b.prefill.len(), b.steps.len()),
                    "{what}"
                );
                let err = a
                    .prefill
                    .iter()
                    .chain(&a.steps)
                    .zip(b.prefill.iter().chain(&b.steps))
                    .map(|(x, y)| (x - y).abs())
                    .fold(0f32, f32::max);
                assert!(err < 1e-4, "{what}: {err}");
            }
            assert!(
                expected[1].generated.len() < expected[0].generated.len() || eos.is_none(),
                "the eos row stops early"
            );
        }
        // Going along given tokens in three calls (prefill, the first token,
        // the rest) gives the rows that one call per token gives: rows of
        // different lengths (one with a single token, one with none fed).
        let tokens: Vec<Vec<u32>> = vec![
            vec![4, 8, 15, 16, 23, 42],
            vec![7],
            vec![1, 2, 3],
            vec![9, 9, 9, 9, 9, 9, 9, 9, 9, 9],
        ];
        let each = onnx.follow_batch(&prompts, &tokens, 0).unwrap();
        let chunked = onnx.follow_batch_chunked(&prompts, &tokens, 0).unwrap();
        for (row, (a, b)) in each.iter().zip(&chunked).enumerate() {
            let what = format!("{}: row {row}", fixture.display());
            assert_eq!(a.generated, b.generated, "{what}");
            assert_eq!(
                (a.prefill.len(), a.steps.len()),
                (b.prefill.len(), b.steps.len()),
                "{what}"
            );
            assert_eq!(
                a.steps.len(),
                (tokens[row].len() - 1) * onnx.vocab,
                "{what}: every token but the last is fed"
            );
            let err = a
                .prefill
                .iter()
                .chain(&a.steps)
                .zip(b.prefill.iter().chain(&b.steps))
                .map(|(x, y)| (x - y).abs())
                .fold(0f32, f32::max);
            assert!(err < 1e-4, "{what}: {err}");
        }
    }
}

/// A wheel that does not have the published sha256 is refused, and nothing
/// is installed: served here by a local HTTP server.
#[test]
fn a_runtime_download_with_the_wrong_checksum_installs_nothing() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for stream in listener.incoming().take(1) {
            use std::io::{Read, Write};
            let mut stream = stream.unwrap();
            let mut request = [0u8; 4096];
            let _ = stream.read(&mut request);
            let body = b"PK\x03\x04 not the onnxruntime wheel";
            let _ = write!(
                stream,
                "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                body.len()
            );
            let _ = stream.write_all(body);
        }
    });
    let tools = tempfile::tempdir().unwrap();
    let error = symb::verify::runtime::provision_from(
        tools.path(),
        &format!("http://127.0.0.1:{port}/onnxruntime.whl"),
    )
    .unwrap_err()
    .to_string();
    assert!(
        error.contains("has sha256")
            && error.contains("not the published")
            && error.contains("nothing was installed"),
        "{error}"
    );
    let installed: Vec<_> = common::walk(tools.path())
        .into_iter()
        .filter(|p| !p.ends_with(".lock"))
        .collect();
    assert!(installed.is_empty(), "left behind: {installed:?}");
}

/// Issue 4, test 2 on the fixture: every dtype passes its verification with
/// symb's default bounds, the 4-bit files have one MatMulNBits per linear
/// weight (4 per layer and the head), the dynamic int8 ones one
/// MatMulInteger each, and q8 stores each of those weights in 8 bits.
#[test]
fn every_dtype_of_the_fixture_passes_its_verification() {
    let dtypes = ["fp32", "fp16", "q8", "int8", "uint8", "q4", "q4f16"];
    let dir = converter(&dtypes);
    let out = symb(dir.path(), &["build"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for dtype in dtypes {
        let report: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(dir.path().join(format!("dist/reports/verify.{dtype}.json")))
                .unwrap(),
        )
        .unwrap();
        let checks = report["checks"].as_array().unwrap();
        assert!(
            checks.len() >= 3 && checks.iter().all(|c| c["passed"] == true),
            "{dtype}: {checks:?}"
        );
        assert_eq!(
            report["prompts"].as_array().unwrap().len(),
            15,
            "{dtype}: the English sample's 15 lines (no corpus)"
        );
        assert!(
            report["cache"]["positions"].as_u64().unwrap() > 100,
            "{dtype}"
        );
        if dtype == "fp32" {
            continue;
        }
        let quantized: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(
                dir.path()
                    .join(format!("dist/reports/quantize.{dtype}.json")),
            )
            .unwrap(),
        )
        .unwrap();
        let (nbits, integer) = (
            quantized["matmul_nbits_nodes"].as_u64().unwrap(),
            quantized["matmul_integer_nodes"].as_u64().unwrap(),
        );
        match dtype {
            "q4" | "q4f16" => assert_eq!((nbits, integer), (9, 0), "{dtype}"),
            // The position table too.
            "q8" => assert_eq!(
                (
                    nbits,
                    integer,
                    quantized["weights_quantized"].as_u64().unwrap()
                ),
                (0, 0, 10),
                "{dtype}"
            ),
            "int8" | "uint8" => assert_eq!((nbits, integer), (0, 9), "{dtype}"),
            _ => assert_eq!((nbits, integer), (0, 0), "{dtype}"),
        }
    }
}

/// Issue 32: the tokenizer is checked where it runs. transformers.js (the
/// bundled browser build, in Node) tokenizes the eval lines, the English
/// sample and the prompts as symb does; a tokenizer that transformers.js
/// reads otherwise (an added token with `single_word`, which it ignores)
/// fails the build with exit 3, naming the lines, and the output folder
/// stays as the last good build left it. The folder carries transformers.js
/// and ONNX Runtime Web's files (`web/`), which the page imports.
#[test]
fn a_tokenizer_transformers_js_reads_otherwise_fails_verify_and_the_folder_stays() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("model");
    std::fs::create_dir(&model).unwrap();
    for file in [
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "generation_config.json",
    ] {
        if fixture().join(file).is_file() {
            std::fs::copy(fixture().join(file), model.join(file)).unwrap();
        }
    }
    std::fs::write(
        dir.path().join("symb.toml"),
        "[project]\nname = \"t\"\n\n[base]\nmodel = \"path:model\"\n\n[export]\n\
        targets = [\"fp32\"]\n",
    )
    .unwrap();
    let out = symb(dir.path(), &["build"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let dist = dir.path().join("dist");
    let report: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(dist.join("reports/verify.tokenizer.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(report["checked"], true, "{report}");
    assert_eq!(report["differing_lines"], 0, "{report}");
    // No corpus: the English sample.
    assert!(report["lines"].as_u64().unwrap() >= 10, "{report}");
    for (file, bytes) in [
        ("transformers.min.js", 586_230),
        ("ort-wasm-simd-threaded.asyncify.mjs", 53_057),
        ("ort-wasm-simd-threaded.asyncify.wasm", 26_861_777),
    ] {
        let len = std::fs::metadata(dist.join("web").join(file))
            .unwrap()
            .len();
        assert_eq!(len, bytes, "web/{file}");
    }
    let page = std::fs::read_to_string(dist.join("index.html")).unwrap();
    assert!(
        page.contains("\"./web/transformers.min.js\"") && !page.contains("cdn.jsdelivr"),
        "the page imports the folder's transformers.js"
    );
    let before = common::snapshot(&dist);

    // An added token transformers.js matches inside words too.
    let path = model.join("tokenizer.json");
    let mut tokenizer: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    let id = tokenizer["model"]["vocab"]["ou"].clone();
    assert!(id.is_u64(), "the fixture's vocabulary has `ou`");
    tokenizer["added_tokens"]
        .as_array_mut()
        .unwrap()
        .push(serde_json::json!({
            "id": id, "content": "ou", "single_word": true, "lstrip": false,
            "rstrip": false, "normalized": false, "special": false
        }));
    std::fs::write(&path, tokenizer.to_string()).unwrap();
    let out = symb(dir.path(), &["build"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(3), "{stderr}");
    assert!(
        stderr.contains("verify.tokenizer")
            && stderr.contains("does not tokenize as symb's in transformers.js")
            && stderr.contains("transformers.js ["),
        "{stderr}"
    );
    assert!(stderr.contains("output `dist` left as it was"), "{stderr}");
    assert_eq!(common::snapshot(&dist), before, "the output folder changed");
}

/// A transformers.js tarball that is not the one the registry published is
/// refused, and nothing is installed.
#[test]
fn a_transformers_js_tarball_with_the_wrong_integrity_installs_nothing() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let requests = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let seen = requests.clone();
    std::thread::spawn(move || {
        for stream in listener.incoming().take(1) {
            use std::io::{Read, Write};
            let mut stream = stream.unwrap();
            let mut request = [0u8; 4096];
            let n = stream.read(&mut request).unwrap_or(0);
            let line = String::from_utf8_lossy(&request[..n])
                .lines()
                .next()
                .unwrap_or_default()
                .to_string();
            seen.lock().unwrap().push(line);
            let body = b"\x1f\x8b not the package";
            let _ = write!(
                stream,
                "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                body.len()
            );
            let _ = stream.write_all(body);
        }
    });
    let tools = tempfile::tempdir().unwrap();
    let error = symb::verify::transformers_js::provision(
        tools.path(),
        &format!("http://127.0.0.1:{port}/"),
    )
    .unwrap_err()
    .to_string();
    assert!(
        error.contains("has integrity sha512-")
            && error.contains("not the registry's sha512-5+voSeUCFK6PCKlY15dPhNOKq3")
            && error.contains("nothing was installed"),
        "{error}"
    );
    assert_eq!(
        requests.lock().unwrap().as_slice(),
        ["GET /@huggingface/transformers/-/transformers-4.3.1.tgz HTTP/1.1"],
        "the registry's tarball path"
    );
    let installed: Vec<_> = common::walk(tools.path())
        .into_iter()
        .filter(|p| !p.ends_with(".lock"))
        .collect();
    assert!(installed.is_empty(), "left behind: {installed:?}");
}
