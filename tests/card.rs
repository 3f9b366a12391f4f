//! The model card's own code: the JavaScript and Python snippets of a built
//! folder's README.md, taken from the file and run as a user would run them
//! on that folder (transformers.js in Node; Python transformers), give the
//! text `symb generate` gives.
#![allow(clippy::unwrap_used)] // a test: a panic is how it fails

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::TestProject;

/// The fenced block of `language` in the card.
fn snippet(card: &str, language: &str) -> String {
    let start = card
        .find(&format!("```{language}\n"))
        .unwrap_or_else(|| panic!("the card has no ```{language} block:\n{card}"))
        + language.len()
        + 4;
    let end = start + card[start..].find("```").expect("the block is closed");
    card[start..end].to_string()
}

/// `symb generate --json` on the output folder.
fn generate(
    dist: &Path,
    prompt: &str,
    max_new_tokens: usize,
    backend: &[&str],
) -> serde_json::Value {
    let n = max_new_tokens.to_string();
    let out = Command::new(common::BIN)
        .args([
            "generate",
            "--model",
            dist.to_str().unwrap(),
            "--prompt",
            prompt,
            "--max-new-tokens",
            &n,
            "--json",
        ])
        .args(backend)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// The prompt and token ids of `symb generate`'s answer, decoded whole.
fn full_text(dist: &Path, answer: &serde_json::Value, skip_special_tokens: bool) -> String {
    let tokenizer = tokenizers::Tokenizer::from_file(dist.join("tokenizer.json")).unwrap();
    let ids: Vec<u32> = answer["input_ids"]
        .as_array()
        .unwrap()
        .iter()
        .chain(answer["generated_ids"].as_array().unwrap())
        .map(|v| v.as_u64().unwrap() as u32)
        .collect();
    tokenizer.decode(&ids, skip_special_tokens).unwrap()
}

/// Whether `python` can import `modules`.
fn python_has(python: &Path, modules: &str) -> bool {
    Command::new(python)
        .args(["-c", &format!("import {modules}")])
        .output()
        .is_ok_and(|o| o.status.success())
}

/// The version of transformers `python` imports, if it does.
fn python_version(python: &Path) -> Option<String> {
    let out = Command::new(python)
        .args(["-c", "import transformers; print(transformers.__version__)"])
        .output()
        .ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
}

#[test]
fn the_cards_javascript_and_python_give_symbs_text() {
    card_gives_symbs_text("tiny-gpt2", "q8");
}

/// A tokenizer that starts every prompt with its BOS (`<s>`, as SmolLM2's
/// `<|im_start|>` and Llama's): transformers.js's pipeline adds it only when
/// tokenizer_config.json says `add_bos_token`.
#[test]
fn the_cards_javascript_and_python_give_symbs_text_with_a_bos() {
    // Only fp32: the random-weight fixture's q8 misses the default bounds.
    card_gives_symbs_text("tiny-llama-sp", "fp32");
}

/// Builds the fixture with `dtype` (the folder's default) and runs the card's code.
fn card_gives_symbs_text(fixture: &str, dtype: &str) {
    let fixture = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(fixture);
    let targets: Vec<&str> = if dtype == "fp32" {
        vec!["fp32"]
    } else {
        vec!["fp32", dtype]
    };
    let project = TestProject::with_manifest(
        &format!(
            "[project]\nname = \"card\"\n\n[corpus]\nfiles = [\"corpus/*.txt\"]\n\n[base]\nmodel = \
                \"path:{}\"\n\n[export]\ntargets = {targets:?}\n\n[web]\nmax_new_tokens = 12\n",
            fixture.display()
        ),
        30,
    );
    project.build_ok();
    let dist = project.path("dist");
    let card = project.read("dist/README.md");
    let id = "\"OWNER/card\"";
    let prompt_line = card
        .lines()
        .find(|l| l.contains("await generator("))
        .expect("the JavaScript calls the generator");
    let prompt: String = serde_json::from_str(
        &prompt_line[prompt_line.find('"').unwrap()..prompt_line.find(", {").unwrap()],
    )
    .unwrap();
    assert!(!prompt.is_empty());

    // JavaScript: the snippet verbatim, the Hub id pointed at the folder
    // (as its comment says: env.localModelPath), in a folder that sees the
    // tests' node_modules.
    let js = snippet(&card, "js");
    assert!(
        js.contains(id) && js.contains(&format!("dtype: '{dtype}'")),
        "{js}"
    );
    let script = tempfile::tempdir().unwrap();
    std::os::unix::fs::symlink(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/js/node_modules"),
        script.path().join("node_modules"),
    )
    .unwrap();
    let setup = format!(
        "import {{ env }} from '@huggingface/transformers';\nenv.allowLocalModels = \
            true;\nenv.allowRemoteModels = false;\nenv.localModelPath = {};\n",
        serde_json::to_string(project.dir.path().to_str().unwrap()).unwrap()
    );
    std::fs::write(
        script.path().join("card.mjs"),
        setup + &js.replace(id, "\"dist\""),
    )
    .unwrap();
    let out = Command::new("node")
        .arg("card.mjs")
        .current_dir(script.path())
        .output()
        .expect("node runs");
    assert!(
        out.status.success(),
        "the card's JavaScript failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let printed = String::from_utf8(out.stdout).unwrap();
    let symb = generate(&dist, &prompt, 12, &["--backend", "onnx", "--dtype", dtype]);
    assert_eq!(
        printed.trim_end_matches('\n'),
        full_text(&dist, &symb, true),
        "transformers.js ran the card's JavaScript"
    );

    // Python, with transformers 5 (tests/requirements.txt) and 4.57 (the
    // venv tests/setup.sh makes): where PyTorch is installed, the snippet
    // verbatim on the folder's model.safetensors, against symb's candle;
    // everywhere, its tokenizer part, whose inputs are what went wrong
    // (transformers 4 returned token_type_ids, and GPT-2 added wte[0]).
    let python = snippet(&card, "python")
        .replace(id, &serde_json::to_string(dist.to_str().unwrap()).unwrap());
    let candle = generate(&dist, &prompt, 12, &["--backend", "candle"]);
    let venv = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/.venv-transformers4/bin/python");
    for interpreter in [PathBuf::from("python3"), venv] {
        let version = python_version(&interpreter).unwrap_or_else(|| {
            panic!(
                "`{}` cannot import transformers: run `bash tests/setup.sh`",
                interpreter.display()
            )
        });
        if python_has(&interpreter, "torch, transformers") {
            let out = Command::new(&interpreter)
                .args(["-c", &python])
                .output()
                .unwrap();
            assert!(
                out.status.success(),
                "the card's Python failed with transformers {version}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            assert_eq!(
                String::from_utf8(out.stdout)
                    .unwrap()
                    .trim_end_matches('\n'),
                full_text(&dist, &candle, false),
                "PyTorch and transformers {version} ran the card's Python"
            );
        }
        let tokenizer_part: String = python
            .lines()
            .take_while(|l| !l.starts_with("model ="))
            .map(|l| {
                if l.starts_with("from transformers import") {
                    "from transformers import AutoTokenizer"
                } else {
                    l
                }
            })
            .collect::<Vec<_>>()
            .join("\n");
        let check = format!(
            "{tokenizer_part}\nimport json\nprint(json.dumps({{k: list(v) for k, v in tokenizer({}).items()}}))\n",
            serde_json::to_string(&prompt).unwrap()
        );
        let out = Command::new(&interpreter)
            .args(["-c", &check])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let inputs: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        let names: Vec<&String> = inputs.as_object().unwrap().keys().collect();
        assert_eq!(
            names,
            ["input_ids", "attention_mask"],
            "what transformers {version}'s AutoTokenizer returns for the model"
        );
        assert_eq!(
            inputs["input_ids"], symb["input_ids"],
            "AutoTokenizer's ids are symb's"
        );
    }
}
