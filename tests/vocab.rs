//! Stage `vocab` on the PyTorch fixture's byte-level tokenizer: the new
//! language's tokens added (`add_tokens`) or merged in (`extend_bpe`), the
//! embedding grown, and the result read back by Python's `tokenizers`.
#![allow(clippy::unwrap_used)] // a test: a panic is how it fails

mod common;

use std::path::PathBuf;
use std::process::Command;

use common::{TestProject, set};

fn fixture() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tiny-gpt2")
}

fn manifest(strategy: &str, vocab_size: u32, extra: &str) -> String {
    format!(
        r#"[project]
output = "dist"

[corpus]
files = ["corpus/*.txt"]
eval_fraction = 0.1

[tokenizer]
vocab_size = {vocab_size}
pre_tokenizer = "byte_level"

[base]
model = "path:{}"

[vocab]
strategy = "{strategy}"
{extra}
"#,
        fixture().display()
    )
}

fn json(project: &TestProject, file: &str) -> serde_json::Value {
    serde_json::from_str(&project.read(file)).unwrap()
}

/// Embedding shape and rows, read with the safetensors layout directly.
fn wte(project: &TestProject, file: &str) -> (Vec<usize>, Vec<f32>) {
    let tensors =
        candle_core::safetensors::load(project.path(file), &candle_core::Device::Cpu).unwrap();
    let wte = &tensors["transformer.wte.weight"];
    (
        wte.dims().to_vec(),
        wte.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
    )
}

/// The extension's ids past the base's, special tokens aside: the new tokens.
fn new_token_ids(base: &std::path::Path, extended: &std::path::Path) -> Vec<u32> {
    let base = tokenizers::Tokenizer::from_file(base).unwrap();
    let extended = tokenizers::Tokenizer::from_file(extended).unwrap();
    let specials: std::collections::HashSet<u32> = extended
        .get_added_tokens_decoder()
        .iter()
        .filter(|(_, t)| t.special)
        .map(|(id, _)| *id)
        .collect();
    let ids: Vec<u32> = (base.get_vocab_size(true) as u32..extended.get_vocab_size(true) as u32)
        .filter(|i| !specials.contains(i))
        .collect();
    assert!(!ids.is_empty());
    ids
}

/// Runs tests/python/check_vocab.py: Python's tokenizers reads both files.
fn python_check(
    base: &std::path::Path,
    extended: &std::path::Path,
    lines: &std::path::Path,
    mode: &str,
) -> serde_json::Value {
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/python/check_vocab.py");
    let output = Command::new("python3")
        .arg(script)
        .arg(base)
        .arg(extended)
        .arg(lines)
        .arg(mode)
        .output()
        .expect("python3 runs");
    assert!(
        output.status.success(),
        "check_vocab.py failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_slice(&output.stdout).unwrap()
}

#[test]
fn add_tokens_keeps_other_text_and_lowers_fertility() {
    let project = TestProject::with_manifest(
        &manifest("add_tokens", 2000, "pad_to_multiple_of = 64"),
        300,
    );
    let build = project.build_ok();
    assert_eq!(build.ran(), set(&["corpus", "tokenizer", "base", "vocab"]));
    let report = json(&project, "dist/reports/vocab.json");
    eprintln!("{report:#}");
    let new_tokens = report["new_tokens"].as_u64().unwrap() as usize;
    assert!(new_tokens > 50, "{report}");
    let f = &report["fertility"];
    let before = f["eval"]["base"]["tokens_per_word"].as_f64().unwrap();
    let after = f["eval"]["extended"]["tokens_per_word"].as_f64().unwrap();
    // A new word costs its leading space as a token of its own: single_word
    // tokens cannot hold the space before them.
    assert!(after < 0.85 * before, "eval fertility {before} -> {after}");
    assert_eq!(f["english"]["of_those_encoded_differently"], 0, "{report}");
    assert!(
        f["english"]["lines_without_new_words"].as_u64().unwrap() >= 5,
        "{report}"
    );

    // The embedding grew to a multiple of 64; old rows kept, new rows at their mean.
    let config = json(&project, "dist/config.json");
    let size = config["vocab_size"].as_u64().unwrap() as usize;
    assert_eq!(size % 64, 0);
    assert!(size >= 4096 + new_tokens && size < 4096 + new_tokens + 64);
    let (dims, rows) = wte(&project, "dist/model.safetensors");
    let (base_dims, base_rows) = {
        let t = candle_core::safetensors::load(
            fixture().join("model.safetensors"),
            &candle_core::Device::Cpu,
        )
        .unwrap();
        let w = &t["transformer.wte.weight"];
        (
            w.dims().to_vec(),
            w.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
        )
    };
    assert_eq!(dims, vec![size, base_dims[1]]);
    assert_eq!(&rows[..base_rows.len()], &base_rows[..]);
    let width = base_dims[1];
    for d in 0..width {
        let mean = (0..4096)
            .map(|r| base_rows[r * width + d] as f64)
            .sum::<f64>()
            / 4096.0;
        for r in 4096..size {
            assert!(
                (rows[r * width + d] as f64 - mean).abs() < 1e-3,
                "row {r} dim {d}"
            );
        }
    }

    // Python's tokenizers: English encodes as with the base, corpus lines
    // round-trip, and each new word is one token.
    let new_ids: serde_json::Value = json(&project, "dist/reports/vocab.json");
    assert!(new_ids["tokenizer_size"].as_u64().unwrap() as usize == 4096 + new_tokens);
    let english = project.path("english.txt");
    std::fs::write(&english, symb::stages::shared::ENGLISH_SAMPLE).unwrap();
    let checked = python_check(
        &fixture().join("tokenizer.json"),
        &project.path("dist/tokenizer.json"),
        &english,
        "same",
    );
    assert_eq!(checked["different"], 0, "{checked}");
    assert!(checked["plain"].as_u64().unwrap() >= 5, "{checked}");
    let lines = project.path("lines.txt");
    std::fs::write(&lines, common::demo_lines()[..300].join("\n")).unwrap();
    let checked = python_check(
        &fixture().join("tokenizer.json"),
        &project.path("dist/tokenizer.json"),
        &lines,
        "roundtrip",
    );
    assert_eq!(checked["lossy"], 0, "{checked}");
    assert!(
        checked["added_token_hits"].as_u64().unwrap() > 100,
        "{checked}"
    );
}

#[test]
fn extend_bpe_appends_merges_and_stays_lossless() {
    let project =
        TestProject::with_manifest(&manifest("extend_bpe", 1000, "init = \"normal\""), 300);
    project.build_ok();
    let report = json(&project, "dist/reports/vocab.json");
    eprintln!("{report:#}");
    let f = &report["fertility"];
    let before = f["eval"]["base"]["tokens_per_word"].as_f64().unwrap();
    let after = f["eval"]["extended"]["tokens_per_word"].as_f64().unwrap();
    assert!(after < 0.8 * before, "eval fertility {before} -> {after}");
    // Every new word is one token, as with the new tokenizer.
    let own = f["eval"]["new_tokenizer"]["tokens_per_word"]
        .as_f64()
        .unwrap();
    assert!(
        after <= own * 1.02,
        "eval fertility {after} against the new tokenizer's {own}"
    );
    let size = json(&project, "dist/config.json")["vocab_size"]
        .as_u64()
        .unwrap() as usize;
    let (dims, rows) = wte(&project, "dist/model.safetensors");
    assert_eq!(dims[0], size);
    // N(0, 0.02²) rows.
    let new: Vec<f64> = rows[4096 * dims[1]..].iter().map(|&v| v as f64).collect();
    let std = (new.iter().map(|v| v * v).sum::<f64>() / new.len() as f64).sqrt();
    assert!((std - 0.02).abs() < 0.002, "std {std}");
    let lines = project.path("lines.txt");
    std::fs::write(&lines, common::demo_lines()[..300].join("\n")).unwrap();
    let checked = python_check(
        &fixture().join("tokenizer.json"),
        &project.path("dist/tokenizer.json"),
        &lines,
        "roundtrip",
    );
    assert_eq!(checked["lossy"], 0, "{checked}");
}

#[test]
fn contradictory_sections_and_mismatched_splitters_are_clear_errors() {
    let project = TestProject::with_manifest(
        &manifest("extend_bpe", 500, "").replace("\"byte_level\"", "\"metaspace\""),
        50,
    );
    let build = project.build(&[]);
    assert_eq!(build.code, 2, "{}", build.stderr);
    let reason = build.reason("vocab");
    assert!(
        reason.contains("pre_tokenizers differ (base: byte-level, new: metaspace)")
            && reason.contains("add_tokens"),
        "{reason}"
    );
    assert!(
        !project.path("dist").exists(),
        "a failed build writes no output"
    );

    let scratch = manifest("add_tokens", 500, "")
        .replace(&format!("path:{}", fixture().display()), "scratch");
    project.write("symb.toml", &scratch);
    let build = project.build(&[]);
    assert_eq!(build.code, 2);
    assert!(
        build
            .stderr
            .contains("`[vocab]` adds tokens to a pretrained base, but `base.model` = \"scratch\""),
        "{}",
        build.stderr
    );

    let no_vocab =
        manifest("add_tokens", 500, "").replace("[vocab]\nstrategy = \"add_tokens\"", "");
    project.write("symb.toml", &no_vocab);
    let build = project.build(&[]);
    assert_eq!(build.code, 2);
    assert!(
        build.stderr.contains("needs a `[vocab]` section"),
        "{}",
        build.stderr
    );
}

#[test]
fn lora_after_add_tokens_trains_the_new_rows_as_peft_trainable_tokens() {
    let finetune = r#"
[finetune]
method = "lora"
rank = 4
alpha = 8
learning_rate = 1e-2
warmup_steps = 2
batch_size = 4
block_size = 32
max_steps = 20
eval_every = 10
"#;
    let project = TestProject::with_manifest(&(manifest("add_tokens", 600, "") + finetune), 150);
    let build = project.build_ok();
    assert_eq!(
        build.ran(),
        set(&["corpus", "tokenizer", "base", "vocab", "finetune", "merge"])
    );
    let new_ids = new_token_ids(
        &fixture().join("tokenizer.json"),
        &project.path("dist/tokenizer.json"),
    );
    assert!(!new_ids.is_empty());
    let config = json(&project, "dist/adapter/adapter_config.json");
    assert_eq!(
        config["trainable_token_indices"],
        serde_json::json!(new_ids)
    );
    let adapter = candle_core::safetensors::load(
        project.path("dist/adapter/adapter_model.safetensors"),
        &candle_core::Device::Cpu,
    )
    .unwrap();
    let rows = &adapter[&symb::model::Family::token_rows_key(
        symb::model::families::gpt2::GPT2.embedding_module(),
    )];
    assert_eq!(rows.dims(), [new_ids.len(), 64]);

    // The merged embedding: old rows untouched, new rows trained away from
    // their common starting point (the old rows' mean).
    let (dims, merged) = wte(&project, "dist/model.safetensors");
    let width = dims[1];
    let base = candle_core::safetensors::load(
        fixture().join("model.safetensors"),
        &candle_core::Device::Cpu,
    )
    .unwrap();
    let base_rows = base["transformer.wte.weight"]
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    assert_eq!(&merged[..base_rows.len()], &base_rows[..]);
    let trained = rows.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    for (i, id) in new_ids.iter().enumerate() {
        assert_eq!(
            &merged[*id as usize * width..(*id as usize + 1) * width],
            &trained[i * width..(i + 1) * width]
        );
    }
    let spread = (0..width)
        .map(|d| (trained[d] - trained[width + d]).abs())
        .fold(0f32, f32::max);
    assert!(spread > 1e-3, "the new rows moved apart: {spread}");
    let metrics = json(&project, "dist/training/metrics.json");
    assert!(
        metrics["final_eval_loss"].as_f64().unwrap()
            < metrics["initial_eval_loss"].as_f64().unwrap() - 0.5,
        "{metrics}"
    );

    // Turning it off re-runs fine-tuning with a reason, and the adapter is plain LoRA.
    project.edit("max_steps = 20", "max_steps = 20\ntrain_new_tokens = false");
    let build = project.build_ok();
    assert_eq!(build.ran(), set(&["finetune", "merge"]));
    assert!(
        build
            .reason("finetune")
            .contains("finetune.train_new_tokens"),
        "{}",
        build.reason("finetune")
    );
    assert!(
        json(&project, "dist/adapter/adapter_config.json")["trainable_token_indices"].is_null()
    );
}

// The Llama family's tokenizers: SentencePiece-style BPE with byte fallback
// and a metaspace (tiny-llama-sp, untied head), byte-level with Qwen's NFC
// normalizer and split regex (tiny-qwen2), byte-level as SmolLM2 has
// (tiny-llama, tied head).

fn llama_manifest(fixture: &str, pre_tokenizer: &str, strategy: &str, vocab_size: u32) -> String {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(fixture);
    manifest(strategy, vocab_size, "")
        .replace(
            &format!("path:{}", fixture_path().display()),
            &format!("path:{}", dir.display()),
        )
        .replace("\"byte_level\"", &format!("\"{pre_tokenizer}\""))
}

fn fixture_path() -> PathBuf {
    fixture()
}

fn tensor(path: &std::path::Path, name: &str) -> (Vec<usize>, Vec<f32>) {
    let tensors = candle_core::safetensors::load(path, &candle_core::Device::Cpu).unwrap();
    let t = &tensors[name];
    (
        t.dims().to_vec(),
        t.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
    )
}

/// The rows after the base's `old` are each the mean of the base's rows (to 1e-3).
fn assert_mean_rows(base: &[f32], grown: &[f32], width: usize, what: &str) {
    let old = base.len() / width;
    assert_eq!(&grown[..base.len()], base, "{what}: old rows kept");
    for d in 0..width {
        let mean = (0..old).map(|r| base[r * width + d] as f64).sum::<f64>() / old as f64;
        for r in old..grown.len() / width {
            assert!(
                (grown[r * width + d] as f64 - mean).abs() < 1e-3,
                "{what}: row {r} dim {d}"
            );
        }
    }
}

#[test]
fn sentencepiece_base_add_tokens_keeps_other_text_and_grows_both_untied_matrices() {
    let fixture = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tiny-llama-sp");
    let project = TestProject::with_manifest(
        &llama_manifest("tiny-llama-sp", "metaspace", "add_tokens", 800),
        300,
    );
    project.build_ok();
    let report = json(&project, "dist/reports/vocab.json");
    eprintln!("{report:#}");
    let f = &report["fertility"];
    let (before, after) = (
        f["eval"]["base"]["tokens_per_word"].as_f64().unwrap(),
        f["eval"]["extended"]["tokens_per_word"].as_f64().unwrap(),
    );
    assert!(after < 0.9 * before, "eval fertility {before} -> {after}");
    assert_eq!(f["english"]["of_those_encoded_differently"], 0, "{report}");
    // Python's tokenizers: English encodes as with the base, corpus lines round-trip.
    let english = project.path("english.txt");
    std::fs::write(&english, symb::stages::shared::ENGLISH_SAMPLE).unwrap();
    let checked = python_check(
        &fixture.join("tokenizer.json"),
        &project.path("dist/tokenizer.json"),
        &english,
        "same",
    );
    assert_eq!(checked["different"], 0, "{checked}");
    let lines = project.path("lines.txt");
    std::fs::write(&lines, common::demo_lines()[..300].join("\n")).unwrap();
    let checked = python_check(
        &fixture.join("tokenizer.json"),
        &project.path("dist/tokenizer.json"),
        &lines,
        "roundtrip",
    );
    assert_eq!(checked["lossy"], 0, "{checked}");
    assert!(
        checked["added_token_hits"].as_u64().unwrap() > 100,
        "{checked}"
    );
    // The embedding and the untied head both grew, new rows at each one's mean.
    for name in ["model.embed_tokens.weight", "lm_head.weight"] {
        let (base_dims, base) = tensor(&fixture.join("model.safetensors"), name);
        let (dims, grown) = tensor(&project.path("dist/model.safetensors"), name);
        assert_eq!(
            dims[0],
            json(&project, "dist/config.json")["vocab_size"]
                .as_u64()
                .unwrap() as usize,
            "{name}"
        );
        assert!(dims[0] > base_dims[0], "{name}");
        assert_mean_rows(&base, &grown, base_dims[1], name);
    }
    // `<s>` is still prepended, and byte fallback still spells what the vocabulary lacks.
    let tokenizer = tokenizers::Tokenizer::from_file(project.path("dist/tokenizer.json")).unwrap();
    let encoding = tokenizer.encode("kan 🦀", true).unwrap();
    assert_eq!(encoding.get_tokens()[0], "<s>");
    assert!(
        encoding.get_tokens().iter().any(|t| t == "<0xF0>"),
        "{:?}",
        encoding.get_tokens()
    );
    // (The fixture's `<0xNN>` tokens are special: decoded with them kept.)
    assert_eq!(
        tokenizer.decode(&encoding.get_ids()[1..], false).unwrap(),
        "kan 🦀"
    );
}

#[test]
fn sentencepiece_qwen_and_smollm2_bases_take_extend_bpe_losslessly() {
    for (fixture, pre_tokenizer) in [
        ("tiny-llama-sp", "metaspace"),
        ("tiny-qwen2", "byte_level"),
        ("tiny-llama", "byte_level"),
    ] {
        let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures")
            .join(fixture);
        let project = TestProject::with_manifest(
            &llama_manifest(fixture, pre_tokenizer, "extend_bpe", 800),
            300,
        );
        project.build_ok();
        let report = json(&project, "dist/reports/vocab.json");
        let f = &report["fertility"];
        let (before, after) = (
            f["eval"]["base"]["tokens_per_word"].as_f64().unwrap(),
            f["eval"]["extended"]["tokens_per_word"].as_f64().unwrap(),
        );
        assert!(
            after < 0.8 * before,
            "{fixture}: eval fertility {before} -> {after}"
        );
        let lines = project.path("lines.txt");
        std::fs::write(&lines, common::demo_lines()[..300].join("\n")).unwrap();
        let checked = python_check(
            &dir.join("tokenizer.json"),
            &project.path("dist/tokenizer.json"),
            &lines,
            "roundtrip",
        );
        assert_eq!(checked["lossy"], 0, "{fixture}: {checked}");
        let vocab = |path: &std::path::Path| -> std::collections::HashSet<String> {
            let json: serde_json::Value =
                serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap();
            json["model"]["vocab"]
                .as_object()
                .unwrap()
                .keys()
                .cloned()
                .collect()
        };
        let old = vocab(&dir.join("tokenizer.json"));
        let tokens: Vec<String> = vocab(&project.path("dist/tokenizer.json"))
            .into_iter()
            .filter(|t| !old.contains(t))
            .collect();
        assert!(tokens.len() > 50, "{fixture}: {} new tokens", tokens.len());
        let marker = if fixture == "tiny-llama-sp" {
            "▁"
        } else {
            "Ġ"
        };
        // Whole words carry the word-start marker (the rest are word pieces).
        assert!(
            tokens.iter().filter(|t| t.starts_with(marker)).count() > tokens.len() / 3,
            "{fixture}: new words carry `{marker}`: {tokens:?}"
        );
        let tokenizer =
            tokenizers::Tokenizer::from_file(project.path("dist/tokenizer.json")).unwrap();
        let text = "Nouses-ka 🦀 straße";
        let ids = tokenizer.encode(text, false).unwrap();
        assert_eq!(
            tokenizer.decode(ids.get_ids(), false).unwrap(),
            text,
            "{fixture}: {:?}",
            ids.get_tokens()
        );
        if fixture == "tiny-llama-sp" {
            assert!(
                ids.get_tokens().iter().any(|t| t == "<0xF0>"),
                "byte fallback spells the crab: {:?}",
                ids.get_tokens()
            );
        }
    }
}

/// LoRA with the new rows on Llama bases: tied (tiny-llama, SmolLM2-like:
/// PEFT's plain list of ids, one tensor) and untied (tiny-llama-sp: the
/// embedding's and `lm_head`'s rows, PEFT's `{module: ids}` form); the
/// family's default targets (PEFT's `q_proj`, `v_proj`); the merge folds
/// the trained rows into both matrices.
#[test]
fn lora_on_llama_bases_trains_new_rows_of_the_embedding_and_an_untied_head() {
    let finetune = r#"
[finetune]
method = "lora"
rank = 4
alpha = 8
learning_rate = 3e-2
warmup_steps = 2
batch_size = 4
block_size = 32
max_steps = 30
eval_every = 15
"#;
    for (fixture, pre_tokenizer, untied) in [
        ("tiny-llama", "byte_level", false),
        ("tiny-llama-sp", "metaspace", true),
    ] {
        let project = TestProject::with_manifest(
            &(llama_manifest(fixture, pre_tokenizer, "add_tokens", 600) + finetune),
            150,
        );
        let build = project.build_ok();
        assert_eq!(
            build.ran(),
            set(&["corpus", "tokenizer", "base", "vocab", "finetune", "merge"]),
            "{fixture}"
        );
        let config = json(&project, "dist/adapter/adapter_config.json");
        assert_eq!(
            config["target_modules"],
            serde_json::json!(["q_proj", "v_proj"]),
            "{fixture}"
        );
        assert_eq!(config["fan_in_fan_out"], false);
        let base_tokenizer = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures")
            .join(fixture)
            .join("tokenizer.json");
        let new_ids = new_token_ids(&base_tokenizer, &project.path("dist/tokenizer.json"));
        let adapter = candle_core::safetensors::load(
            project.path("dist/adapter/adapter_model.safetensors"),
            &candle_core::Device::Cpu,
        )
        .unwrap();
        let modules: Vec<&str> = if untied {
            vec!["model.embed_tokens", "lm_head"]
        } else {
            vec!["model.embed_tokens"]
        };
        if untied {
            assert_eq!(
                config["trainable_token_indices"],
                serde_json::json!({"embed_tokens": new_ids, "lm_head": new_ids}),
                "{fixture}"
            );
        } else {
            assert_eq!(
                config["trainable_token_indices"],
                serde_json::json!(new_ids),
                "{fixture}"
            );
            assert!(!adapter.contains_key(&symb::model::Family::token_rows_key("lm_head")));
        }
        let merged = candle_core::safetensors::load(
            project.path("dist/model.safetensors"),
            &candle_core::Device::Cpu,
        )
        .unwrap();
        assert_eq!(
            merged.contains_key("lm_head.weight"),
            untied,
            "{fixture}: a tied head is not written"
        );
        for module in modules {
            let rows = &adapter[&symb::model::Family::token_rows_key(module)];
            let matrix = &merged[&format!("{module}.weight")];
            let index =
                candle_core::Tensor::new(new_ids.as_slice(), &candle_core::Device::Cpu).unwrap();
            let folded = matrix.index_select(&index, 0).unwrap();
            let error = (&folded - rows)
                .unwrap()
                .abs()
                .unwrap()
                .flatten_all()
                .unwrap()
                .max(0)
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            assert_eq!(
                error, 0.0,
                "{fixture}: {module}'s new rows are the trained ones"
            );
        }
        let metrics = json(&project, "dist/training/metrics.json");
        assert!(
            metrics["final_eval_loss"].as_f64().unwrap()
                < metrics["initial_eval_loss"].as_f64().unwrap() - 0.5,
            "{fixture}: {metrics}"
        );
        // The merged folder runs, and is what the base plus the adapter compute.
        let merged_model = symb::model::load_folder(&project.path("dist")).unwrap();
        assert_eq!(merged_model.family(), symb::model::families::llama::LLAMA);
    }
}
