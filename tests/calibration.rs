//! Calibrated 4-bit files (issue 35): the blocks GPTQ chooses with the
//! train split's activations against rounding to nearest, on models
//! trained in the test; what re-runs calibration and what does not.
#![allow(clippy::unwrap_used)] // a test: a panic is how it fails

mod common;

use common::TestProject;

/// A scratch model of `architecture` trained for 150 steps on 2,700 lines
/// of the demo language, exported as fp32 and q4.
fn manifest(architecture: &str) -> String {
    format!(
        r#"[project]
name = "t"
output = "dist"

[corpus]
files = ["corpus/*.txt"]
eval_fraction = 0.1

[tokenizer]
vocab_size = 400

[base]
model = "scratch"
architecture = "{architecture}"
n_layer = 2
n_head = 2
n_embd = 64
n_positions = 128

[finetune]
method = "full"
batch_size = 8
block_size = 64
max_steps = 150
eval_every = 50
learning_rate = 3e-3

[export]
targets = ["fp32", "q4"]
"#
    )
}

fn report(project: &TestProject, name: &str) -> serde_json::Value {
    serde_json::from_str(&project.read(&format!("dist/reports/{name}.json"))).unwrap()
}

/// Issue 35, test 1: on a GPT-2 and a Llama trained in the test, calibrated
/// q4's KL against fp32 on the eval split (verify's prompts) is at most 0.6
/// times RTN's, in a file of the same size.
#[test]
fn calibrated_q4_moves_the_logits_less_than_rounding_to_nearest() {
    for architecture in ["gpt2", "llama"] {
        let project = TestProject::with_manifest(&manifest(architecture), 900);
        let build = project.build_ok();
        assert!(build.ran().contains("calibrate"), "{:?}", build.ran());
        let quantize = report(&project, "quantize.q4");
        let calibrated = report(&project, "verify.q4")["metrics"].clone();
        assert!(quantize["weights_calibrated"].as_u64().unwrap() > 0);
        assert!(quantize["calibration_tokens"].as_u64().unwrap() >= 4096);

        project.edit(
            "targets = [\"fp32\", \"q4\"]",
            "targets = [\"fp32\", \"q4\"]\ncalibration = \"none\"",
        );
        let build = project.build_ok();
        // Only the file and what reads it: the model is not trained again.
        assert!(!build.ran().contains("finetune"), "{:?}", build.ran());
        assert!(!build.ran().contains("calibrate"), "{:?}", build.ran());
        let rtn_quantize = report(&project, "quantize.q4");
        let rtn = report(&project, "verify.q4")["metrics"].clone();
        assert_eq!(rtn_quantize["weights_calibrated"], 0);
        assert_eq!(quantize["file_bytes"], rtn_quantize["file_bytes"]);

        let (kl, kl_rtn) = (
            calibrated["kl_divergence"].as_f64().unwrap(),
            rtn["kl_divergence"].as_f64().unwrap(),
        );
        eprintln!(
            "{architecture}: KL calibrated {kl:.3e}, RTN {kl_rtn:.3e} ({:.2}x); top-1 {} and {}",
            kl / kl_rtn,
            calibrated["top1_agreement"],
            rtn["top1_agreement"]
        );
        assert!(
            kl <= 0.6 * kl_rtn,
            "{architecture}: calibrated KL {kl} against RTN's {kl_rtn}"
        );

        // Affine blocks (a scale and an offset each), calibrated: closer
        // still, in a larger file; the calibration is reused.
        project.edit("calibration = \"none\"", "q4_blocks = \"affine\"");
        let build = project.build_ok();
        assert!(!build.ran().contains("calibrate"), "{:?}", build.ran());
        let affine_quantize = report(&project, "quantize.q4");
        let affine = report(&project, "verify.q4")["metrics"]["kl_divergence"]
            .as_f64()
            .unwrap();
        assert!(
            affine_quantize["weights_affine"].as_u64().unwrap() > 0,
            "{affine_quantize}"
        );
        assert!(affine_quantize["weights_calibrated"].as_u64().unwrap() > 0);
        let (bytes, affine_bytes) = (
            quantize["file_bytes"].as_u64().unwrap(),
            affine_quantize["file_bytes"].as_u64().unwrap(),
        );
        eprintln!(
            "{architecture}: affine calibrated KL {affine:.3e} ({:.2}x symmetric's), \
            {affine_bytes} bytes against {bytes}",
            affine / kl
        );
        assert!(affine_bytes > bytes);
        assert!(
            affine < kl,
            "{architecture}: affine KL {affine} against symmetric's {kl}"
        );
    }
}

/// The q4 file of `dist` in a headless Chromium, on WebAssembly and on
/// WebGPU (SwiftShader): each gives `symb generate --backend onnx`'s greedy
/// tokens (the file's MatMulNBits at `accuracy_level` 0, which both
/// browser devices and native ONNX Runtime compute in fp32).
fn check_chromium(dist: &std::path::Path, prompts: &[String]) {
    let served = common::serve(dist);
    let out = tempfile::tempdir().unwrap();
    let devices = ["wasm", "webgpu"];
    let result =
        common::chromium_devices(&served.url, true, &devices, &["q4"], prompts, 8, out.path());
    assert_eq!(
        result["adapter"]["architecture"], "swiftshader",
        "a WebGPU adapter (SwiftShader): {result}"
    );
    for device in devices {
        let run = &result["runs"][device]["q4"];
        assert!(run.get("error").is_none(), "q4 on {device}: {run}");
        for (case, prompt) in run["cases"].as_array().unwrap().iter().zip(prompts) {
            let native = common::onnx_generate(dist, "q4", prompt, 8);
            assert_eq!(
                case["ids"], native,
                "q4 on {device} against native ONNX Runtime for {prompt:?}"
            );
        }
    }
}

/// Issue 35, test 4: calibration reads the train split only. A change of
/// the eval files re-runs verification and not calibration; a change of the
/// corpus re-runs calibration.
#[test]
fn the_corpus_reruns_calibration_and_the_eval_split_does_not() {
    let project = TestProject::with_manifest(
        &common::SCRATCH_TRAINING
            .replace("eval_fraction = 0.1", "eval_files = [\"eval/*.txt\"]")
            .replace(
                "[finetune]",
                "[export]\ntargets = [\"fp32\", \"q4\"]\n\n[finetune]",
            ),
        100,
    );
    let demo = common::demo_lines();
    project.write("eval/held.txt", &(demo[400..440].join("\n") + "\n"));
    let build = project.build_ok();
    assert!(build.ran().contains("calibrate"));

    project.write("eval/held.txt", &(demo[440..480].join("\n") + "\n"));
    let build = project.build_ok();
    let cached = build.with_status("cached");
    assert!(build.ran().contains("reference"), "{:?}", build.ran());
    assert!(
        cached.contains("calibrate") && cached.contains("quantize.q4"),
        "an eval change re-ran calibration: ran {:?}",
        build.ran()
    );

    project.write("corpus/c.txt", &(demo[500..600].join("\n") + "\n"));
    let build = project.build_ok();
    assert!(build.ran().contains("calibrate"), "{:?}", build.ran());
    assert!(
        build.reason("calibrate").contains("corpus/train.jsonl"),
        "{}",
        build.reason("calibrate")
    );
}

/// `export.calibration = "corpus"` without a corpus names the setting; so
/// does an unknown `export.q4_blocks`.
#[test]
fn corpus_calibration_without_a_corpus_is_refused_at_its_line() {
    let project = TestProject::with_manifest(
        r#"[project]
name = "t"

[base]
model = "scratch"
n_layer = 1
n_head = 2
n_embd = 32
n_positions = 64

[export]
targets = ["q4"]
calibration = "corpus"
"#,
        10,
    );
    let build = project.build(&[]);
    assert_eq!(build.code, 2, "{}", build.stderr);
    assert!(
        build.stderr.contains("symb.toml:13") && build.stderr.contains("no `[corpus]`"),
        "{}",
        build.stderr
    );
    // An unknown block layout: its line, and the two there are.
    project.edit("calibration = \"corpus\"", "q4_blocks = \"asymmetric\"");
    let build = project.build(&[]);
    assert_eq!(build.code, 2, "{}", build.stderr);
    assert!(
        build.stderr.contains("symb.toml:13")
            && build.stderr.contains("\"symmetric\"")
            && build.stderr.contains("\"affine\""),
        "{}",
        build.stderr
    );
}

/// Issue 35, tests 2 and 3: with a q4 KL bound between uniform q4's and
/// q8's, q4 fails its check (exit 3); with `mixed = true` the build passes
/// with a q4 file smaller than q8's that meets the bound on the eval split,
/// and transformers.js in Node gives its tokens as symb does, as it does in
/// Chromium on WebAssembly and WebGPU; the same with affine blocks.
#[test]
fn a_mixed_q4_meets_a_bound_uniform_q4_misses_in_fewer_bytes_than_q8() {
    let project = TestProject::with_manifest(
        &manifest("gpt2").replace(
            "targets = [\"fp32\", \"q4\"]",
            // The embedding in blocks too, shared with the tied head: this
            // small model's embedding is a third of its weights.
            // Level 0: the browsers' arithmetic, so their tokens are native's.
            "targets = [\"fp32\", \"q8\", \"q4\"]\nquantize_embedding = true\naccuracy_level = 0",
        ),
        900,
    );
    project.build_ok();
    let kl = |dtype: &str| {
        report(&project, &format!("verify.{dtype}"))["metrics"]["kl_divergence"]
            .as_f64()
            .unwrap()
    };
    let (q4, q8) = (kl("q4"), kl("q8"));
    assert!(q8 < q4, "q8's KL {q8} is not below q4's {q4}");
    let bound = (q4 + q8) / 2.0;
    let text = project.read("symb.toml");
    project.write(
        "symb.toml",
        &format!("{text}\n[verify.tolerance.q4]\nkl_divergence = {bound:e}\n"),
    );
    let build = project.build(&[]);
    assert_eq!(
        build.code, 3,
        "uniform q4 (KL {q4}) met {bound}: {}",
        build.stderr
    );

    project.edit(
        "quantize_embedding = true",
        "quantize_embedding = true\nmixed = true",
    );
    let build = project.build_ok();
    assert!(!build.ran().contains("calibrate"), "{:?}", build.ran());
    let mixed = report(&project, "quantize.q4");
    let search = &mixed["mixed"];
    let (bytes, q8_bytes) = (
        mixed["file_bytes"].as_u64().unwrap(),
        report(&project, "quantize.q8")["file_bytes"]
            .as_u64()
            .unwrap(),
    );
    let chosen = search["chosen"].as_u64().unwrap();
    let eight_bit = search["weights"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|w| w["bits"] == 8)
        .count() as u64;
    eprintln!(
        "bound {bound:.3e} (q4 {q4:.3e}, q8 {q8:.3e}): mixed q4 KL {:.3e}, {bytes} bytes \
        ({eight_bit} weights in 8 bits) against q8's {q8_bytes} and uniform q4's {}",
        kl("q4"),
        search["uniform_4bit_bytes"]
    );
    assert!(chosen > 0 && chosen == eight_bit, "{search}");
    assert!(kl("q4") <= bound, "mixed q4's KL {} > {bound}", kl("q4"));
    assert!(
        bytes < q8_bytes,
        "{bytes} bytes against q8s {q8_bytes}: {search:#}"
    );
    assert!(bytes > search["uniform_4bit_bytes"].as_u64().unwrap());

    // report.html says which weights went to 8 bits and draws the candidates.
    let html = project.read("dist/report.html");
    assert!(
        html.contains("4-bit files")
            && html.contains("in 8-bit blocks")
            && html.contains("<circle"),
        "{html}"
    );

    let prompts: Vec<String> = common::demo_lines()[2800..2803].to_vec();
    common::check_transformers_js(&project.path("dist"), &["q4"], &prompts, 8, &prompts);
    check_chromium(&project.path("dist"), &prompts);

    // Affine 4-bit blocks beside the 8-bit ones: the search runs again and
    // the file meets the bound, in Node and in Chromium as natively.
    project.edit("mixed = true", "mixed = true\nq4_blocks = \"affine\"");
    let build = project.build_ok();
    assert!(!build.ran().contains("calibrate"), "{:?}", build.ran());
    let affine = report(&project, "quantize.q4");
    assert!(affine["weights_affine"].as_u64().unwrap() > 0, "{affine}");
    eprintln!(
        "affine mixed q4: KL {:.3e}, {} bytes, {} weights in 8 bits",
        kl("q4"),
        affine["file_bytes"],
        affine["mixed"]["chosen"]
    );
    assert!(
        kl("q4") <= bound,
        "affine mixed q4's KL {} > {bound}",
        kl("q4")
    );
    common::check_transformers_js(&project.path("dist"), &["q4"], &prompts, 8, &prompts);
    check_chromium(&project.path("dist"), &prompts);
}
