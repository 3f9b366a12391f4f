//! `symb generate --backend candle` on the PyTorch fixture, and its errors.
#![allow(clippy::unwrap_used)] // a test: a panic is how it fails

use std::path::{Path, PathBuf};
use std::process::Command;

const BIN: &str = env!("CARGO_BIN_EXE_symb");

fn fixture() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tiny-gpt2")
}

fn golden(name: &str) -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(fixture().join(format!("{name}.json"))).unwrap()).unwrap()
}

fn generate(model: &Path, extra: &[&str]) -> (i32, String, String) {
    let out = Command::new(BIN)
        .args(["generate", "--model", model.to_str().unwrap()])
        .args(extra)
        .output()
        .unwrap();
    (
        out.status.code().unwrap(),
        String::from_utf8(out.stdout).unwrap(),
        String::from_utf8(out.stderr).unwrap(),
    )
}

#[test]
fn json_output_matches_pytorch_with_and_without_the_adapter() {
    let adapter = fixture().join("lora");
    for (name, extra) in [
        ("golden", vec![]),
        ("golden-lora", vec!["--adapter", adapter.to_str().unwrap()]),
    ] {
        let logits = candle_core::safetensors::load(
            fixture().join(format!("{name}.safetensors")),
            &candle_core::Device::Cpu,
        )
        .unwrap();
        for (i, case) in golden(name)["cases"].as_array().unwrap().iter().enumerate() {
            let mut args = vec![
                "--prompt",
                case["prompt"].as_str().unwrap(),
                "--max-new-tokens",
                "20",
                "--json",
            ];
            args.extend(extra.iter().copied());
            let (code, stdout, stderr) = generate(&fixture(), &args);
            assert_eq!(code, 0, "{stderr}");
            let out: serde_json::Value = serde_json::from_str(&stdout).unwrap();
            assert_eq!(out["input_ids"], case["input_ids"]);
            assert_eq!(out["generated_ids"], case["greedy_20"], "{name} case {i}");
            let last: Vec<f32> = logits[&format!("logits.{i}")]
                .get(out["input_ids"].as_array().unwrap().len() - 1)
                .unwrap()
                .to_vec1()
                .unwrap();
            let ours: Vec<f32> = serde_json::from_value(out["logits"].clone()).unwrap();
            let error = ours
                .iter()
                .zip(&last)
                .map(|(a, b)| (a - b).abs())
                .fold(0f32, f32::max);
            assert!(error < 1e-4, "{name} case {i}: {error}");
        }
    }
}

/// A copy of the fixture with one file changed.
fn broken_copy(edit: impl FnOnce(&Path)) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for file in [
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "generation_config.json",
    ] {
        std::fs::copy(fixture().join(file), dir.path().join(file)).unwrap();
    }
    edit(dir.path());
    dir
}

fn edit_config(dir: &Path, from: &str, to: &str) {
    let text = std::fs::read_to_string(dir.join("config.json")).unwrap();
    assert!(text.contains(from));
    std::fs::write(dir.join("config.json"), text.replace(from, to)).unwrap();
}

#[test]
fn bad_model_folders_are_named_clearly() {
    type Edit = Box<dyn FnOnce(&Path)>;
    let cases: Vec<(Edit, &str)> = vec![
        (
            Box::new(|d: &Path| edit_config(d, "\"n_embd\": 64", "\"n_embd\": 32")),
            "does not match",
        ),
        (
            Box::new(|d: &Path| edit_config(d, "\"n_layer\": 2", "\"n_layer\": 3")),
            "transformer.h.2",
        ),
        (
            Box::new(|d: &Path| {
                edit_config(d, "\"model_type\": \"gpt2\"", "\"model_type\": \"mamba\"")
            }),
            "`model_type` = \"mamba\": symb supports \"gpt2\"",
        ),
        (
            Box::new(|d: &Path| std::fs::remove_file(d.join("model.safetensors")).unwrap()),
            "no `model.safetensors`",
        ),
        (
            Box::new(|d: &Path| {
                // Rename a tensor in the header (same length, so offsets hold).
                let mut bytes = std::fs::read(d.join("model.safetensors")).unwrap();
                let needle = b"transformer.ln_f.weight";
                let at = bytes
                    .windows(needle.len())
                    .position(|w| w == needle)
                    .unwrap();
                bytes[at + 15] = b'g';
                std::fs::write(d.join("model.safetensors"), bytes).unwrap();
            }),
            "ln_f.weight",
        ),
    ];
    for (edit, expected) in cases {
        let dir = broken_copy(edit);
        let (code, _, stderr) = generate(dir.path(), &["--prompt", "hello"]);
        assert_eq!(code, 2, "{stderr}");
        assert!(
            stderr.contains(expected),
            "expected {expected:?} in: {stderr}"
        );
    }
}

#[test]
fn sampling_is_seeded_and_top_k_one_is_greedy() {
    let ids = |extra: &[&str]| -> serde_json::Value {
        let mut args = vec!["--prompt", "The river", "--max-new-tokens", "16", "--json"];
        args.extend_from_slice(extra);
        let (code, stdout, stderr) = generate(&fixture(), &args);
        assert_eq!(code, 0, "{stderr}");
        serde_json::from_str::<serde_json::Value>(&stdout).unwrap()["generated_ids"].clone()
    };
    let greedy = ids(&[]);
    let sampled = ids(&["--temperature", "1.5", "--seed", "3"]);
    assert_eq!(
        sampled,
        ids(&["--temperature", "1.5", "--seed", "3"]),
        "one seed, one text"
    );
    assert_ne!(sampled, greedy);
    assert_ne!(sampled, ids(&["--temperature", "1.5", "--seed", "4"]));
    assert_eq!(
        ids(&["--temperature", "1.5", "--top-k", "1", "--seed", "9"]),
        greedy
    );
    let (code, _, stderr) = generate(&fixture(), &["--prompt", "x", "--temperature=-1"]);
    assert_eq!(code, 2);
    assert!(
        stderr.contains("`--temperature` must be 0 (greedy) or positive"),
        "{stderr}"
    );
}

/// An architecture symb does not run is named as such, with the supported
/// ones, not reported as a missing field of another family's config.
#[test]
fn another_architecture_is_named_with_the_supported_ones() {
    let dir = tempfile::tempdir().unwrap();
    let config = r#"{"architectures": ["MambaForCausalLM"], "model_type": "mamba", "hidden_size": 64, "num_hidden_layers": 2, "vocab_size": 4096}"#;
    std::fs::write(dir.path().join("config.json"), config).unwrap();
    std::fs::write(dir.path().join("model.safetensors"), b"").unwrap();
    std::fs::copy(
        fixture().join("tokenizer.json"),
        dir.path().join("tokenizer.json"),
    )
    .unwrap();
    let (code, _, stderr) = generate(dir.path(), &["--prompt", "Hello"]);
    assert_eq!(code, 2, "{stderr}");
    assert!(
        stderr.contains("`model_type` = \"mamba\": symb supports \"gpt2\", \"llama\", \"qwen2\""),
        "{stderr}"
    );
    assert!(
        !stderr.contains("n_positions") && !stderr.contains("missing field"),
        "{stderr}"
    );
}

/// `symb generate` on the Llama-family fixtures, with and without their
/// adapters: PyTorch's input ids (a SentencePiece `<s>` included), greedy
/// tokens and last-position logits; then all four prompts as one
/// left-padded batch give each prompt's own tokens.
#[test]
fn llama_family_generation_matches_pytorch_alone_and_batched() {
    for name in ["tiny-llama", "tiny-llama-sp", "tiny-qwen2"] {
        let dir = fixture().with_file_name(name);
        let adapter = dir.join("lora");
        for (golden, extra) in [
            ("golden", vec![]),
            ("golden-lora", vec!["--adapter", adapter.to_str().unwrap()]),
        ] {
            let json: serde_json::Value =
                serde_json::from_slice(&std::fs::read(dir.join(format!("{golden}.json"))).unwrap())
                    .unwrap();
            let logits = candle_core::safetensors::load(
                dir.join(format!("{golden}.safetensors")),
                &candle_core::Device::Cpu,
            )
            .unwrap();
            let cases = json["cases"].as_array().unwrap();
            let mut batch = vec!["--max-new-tokens", "20", "--json"];
            batch.extend(extra.iter().copied());
            for case in cases {
                batch.extend(["--prompt", case["prompt"].as_str().unwrap()]);
            }
            let (code, stdout, stderr) = generate(&dir, &batch);
            assert_eq!(code, 0, "{stderr}");
            let lines: Vec<serde_json::Value> = stdout
                .lines()
                .map(|l| serde_json::from_str(l).unwrap())
                .collect();
            assert_eq!(lines.len(), cases.len());
            for (i, (case, out)) in cases.iter().zip(&lines).enumerate() {
                assert_eq!(
                    out["input_ids"], case["input_ids"],
                    "{name} {golden} case {i}"
                );
                assert_eq!(
                    out["generated_ids"], case["greedy_20"],
                    "{name} {golden} case {i}"
                );
                let last: Vec<f32> = logits[&format!("logits.{i}")]
                    .get(out["input_ids"].as_array().unwrap().len() - 1)
                    .unwrap()
                    .to_vec1()
                    .unwrap();
                let ours: Vec<f32> = serde_json::from_value(out["logits"].clone()).unwrap();
                let error = ours
                    .iter()
                    .zip(&last)
                    .map(|(a, b)| (a - b).abs())
                    .fold(0f32, f32::max);
                assert!(error < 1e-4, "{name} {golden} case {i}: {error}");
            }
        }
    }
}

/// Inside a project, `--model` defaults to its output folder (from a
/// subfolder too, as the manifest is found); outside one, or before a
/// build, the error says what to do.
#[test]
fn inside_a_project_the_model_is_its_output_folder() {
    let dir = tempfile::tempdir().unwrap();
    let run = |cwd: &Path, args: &[&str]| {
        let out = Command::new(BIN)
            .args(args)
            .current_dir(cwd)
            .output()
            .unwrap();
        (
            out.status.code().unwrap(),
            String::from_utf8(out.stdout).unwrap(),
            String::from_utf8(out.stderr).unwrap(),
        )
    };
    let (code, _, stderr) = run(dir.path(), &["generate", "--prompt", "Hello"]);
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains("--model PATH"), "{stderr}");

    std::fs::write(
        dir.path().join("symb.toml"),
        format!(
            "[project]\nname = \"g\"\noutput = \"dist\"\n\n[base]\nmodel = \"path:{}\"\n\n\
             [export]\ntargets = [\"fp32\"]\n",
            fixture().display()
        ),
    )
    .unwrap();
    let (code, _, stderr) = run(dir.path(), &["generate", "--prompt", "Hello"]);
    assert_eq!(code, 2, "{stderr}");
    assert!(
        stderr.contains("holds no model yet") && stderr.contains("symb build"),
        "{stderr}"
    );

    let (code, _, stderr) = run(dir.path(), &["build"]);
    assert_eq!(code, 0, "{stderr}");
    let args = [
        "generate",
        "--prompt",
        "Hello",
        "--json",
        "--max-new-tokens",
        "8",
    ];
    let (code, named, stderr) = generate(&dir.path().join("dist"), &args[1..]);
    assert_eq!(code, 0, "{stderr}");
    std::fs::create_dir(dir.path().join("sub")).unwrap();
    for cwd in [dir.path().to_path_buf(), dir.path().join("sub")] {
        let (code, found, stderr) = run(&cwd, &args);
        assert_eq!(code, 0, "{stderr}");
        assert_eq!(found, named, "from {}", cwd.display());
    }
}
