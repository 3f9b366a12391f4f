//! The newcomer's path: the example manifest, `symb init`, and the commands
//! around a build.
#![allow(clippy::unwrap_used)] // a test: a panic is how it fails

mod common;

use std::process::Command;

use common::{BIN, TestProject, set};

const ROOT: &str = env!("CARGO_MANIFEST_DIR");

#[test]
fn the_example_is_the_recipe_and_builds_end_to_end() {
    let example = std::fs::read_to_string(format!("{ROOT}/symb.toml.example")).unwrap();
    // Build it where it would be built: beside the committed demo corpus.
    let project = TestProject::new(1);
    std::fs::remove_dir_all(project.path("corpus")).unwrap();
    project.write(
        "corpus/symbiotic.txt",
        &std::fs::read_to_string(format!("{ROOT}/corpus/symbiotic.txt")).unwrap(),
    );
    // With the cache folder as the repository keeps it (its `.gitignore`).
    project.write(
        "cache/.gitignore",
        &std::fs::read_to_string(format!("{ROOT}/cache/.gitignore")).unwrap(),
    );
    // The whole example, its two epochs too: a healthy run, which the
    // build does not warn of.
    project.write("symb.toml.example", &example);
    let build = project.build(&["-m", "symb.toml.example"]);
    assert_eq!(build.code, 0, "{}", build.stderr);
    assert_eq!(build.warnings(), Vec::new(), "{}", build.stderr);
    assert_eq!(
        build.ran(),
        set(&[
            "corpus",
            "tokenizer",
            "base",
            "finetune",
            "merge",
            "export",
            "quantize.fp16",
            "quantize.q8",
            "calibrate",
            "quantize.q4",
            "quantize.q4f16",
            "reference",
            "verify.fp32",
            "verify.fp16",
            "verify.q8",
            "verify.q4",
            "verify.q4f16",
            "bundle",
            "verify.tokenizer",
            "web"
        ])
    );
    for dtype in ["fp32", "fp16", "q8", "q4", "q4f16"] {
        let report: serde_json::Value =
            serde_json::from_str(&project.read(&format!("dist/reports/verify.{dtype}.json")))
                .unwrap();
        assert!(
            report["checks"]
                .as_array()
                .unwrap()
                .iter()
                .all(|c| c["passed"] == true),
            "{dtype}: {report}"
        );
        assert_eq!(report["prompts"].as_array().unwrap().len(), 16, "{dtype}");
    }
    for file in [
        "model.onnx",
        "model_fp16.onnx",
        "model_quantized.onnx",
        "model_q4.onnx",
        "model_q4f16.onnx",
    ] {
        assert!(project.path("dist/onnx").join(file).is_file(), "{file}");
    }
    let tokenizer: serde_json::Value =
        serde_json::from_str(&project.read("dist/tokenizer.json")).unwrap();
    assert_eq!(tokenizer["model"]["vocab"].as_object().unwrap().len(), 4000);
    let config: serde_json::Value =
        serde_json::from_str(&project.read("dist/config.json")).unwrap();
    // The pad token is declared: by name for the tokenizer, by id in the config.
    let tokenizer_config: serde_json::Value =
        serde_json::from_str(&project.read("dist/tokenizer_config.json")).unwrap();
    assert_eq!(tokenizer_config["pad_token"], "<pad>");
    assert_eq!(
        config["pad_token_id"].as_u64(),
        tokenizer["added_tokens"]
            .as_array()
            .unwrap()
            .iter()
            .find(|t| t["content"] == "<pad>")
            .and_then(|t| t["id"].as_u64())
    );
    assert_eq!(
        (
            config["n_layer"].as_u64(),
            config["n_embd"].as_u64(),
            config["vocab_size"].as_u64()
        ),
        (Some(4), Some(128), Some(4000))
    );
    let metrics: serde_json::Value =
        serde_json::from_str(&project.read("dist/training/metrics.json")).unwrap();
    assert_eq!(metrics["steps"], 228);
    assert!(
        metrics["final_eval_loss"].as_f64().unwrap() < 3.5,
        "{metrics}"
    );
    // README.md: a model card for the Hub.
    let card = project.read("dist/README.md");
    assert!(
        card.starts_with("---\nlibrary_name: transformers.js\npipeline_tag: text-generation\n")
            && card.contains("| q4 | `onnx/model_q4.onnx` |"),
        "{card}"
    );
    // report.html: the training and every file's verification, self-contained.
    let report = project.read("dist/report.html");
    assert!(
        report.contains("Eval perplexity") && report.contains("<svg"),
        "training in the report"
    );
    for (dtype, file) in [
        ("fp32", "model.onnx"),
        ("q4", "model_q4.onnx"),
        ("q4f16", "model_q4f16.onnx"),
    ] {
        assert!(
            report.contains(&format!(
                "<tr><td data-label=\"dtype\"><span>{dtype}</span></td><td \
                data-label=\"file\"><span>onnx/{file}</span></td>"
            )),
            "{dtype} row"
        );
    }
    assert!(
        !report.contains("failed") && report.matches(" passed</span></td>").count() == 5,
        "every file verified"
    );
    assert!(
        !report.contains("src=\"http") && !report.contains("href=\"http"),
        "no external resource"
    );
    // transformers.js loads the folder: each dtype's greedy tokens are
    // symb's, and its tokenizer is the Rust one on 2,000 corpus lines.
    let prompts: Vec<String> = ["Kan-ka", "Vo aestel", "Nouses"].map(String::from).to_vec();
    let lines: Vec<String> = common::demo_lines()
        .into_iter()
        .skip(1000)
        .take(2000)
        .collect();
    common::check_transformers_js(
        &project.path("dist"),
        &["fp32", "fp16", "q8", "q4", "q4f16"],
        &prompts,
        32,
        &lines,
    );
}

#[test]
fn every_commented_section_of_the_example_is_valid() {
    // Uncommenting the model sections gives a manifest the validator accepts
    // and a plan with every stage.
    let example = std::fs::read_to_string(format!("{ROOT}/symb.toml.example")).unwrap();
    // Everything but [vocab], which belongs to pretrained bases, and
    // [chat], which belongs to conversations.
    let uncommented: String = example
        .lines()
        .filter(|l| {
            ![
                "# [vocab]",
                "# strategy",
                "# init",
                "# pad_to_multiple_of",
                "# [chat]",
                "# template",
                "# train_on",
            ]
            .iter()
            .any(|p| l.starts_with(p))
        })
        .map(|l| {
            let alternative = ["# prompt_field", "# completion_field", "# eval_files"]
                .iter()
                .any(|p| l.starts_with(p));
            if !alternative && (l.starts_with("# [") || (l.starts_with("# ") && l.contains(" = ")))
            {
                &l[2..]
            } else {
                l
            }
        })
        .map(|l| format!("{l}\n"))
        .collect();
    let project = TestProject::new(10);
    std::fs::rename(
        project.path("corpus/a.txt"),
        project.path("corpus/symbiotic.txt"),
    )
    .unwrap();
    project.write("symb.toml", &uncommented);
    let manifest =
        symb::manifest::load(&project.path("symb.toml")).unwrap_or_else(|e| panic!("{e}"));
    assert!(
        manifest.base.is_some()
            && manifest.finetune.is_some()
            && manifest.export.is_some()
            && manifest.verify.is_some()
    );
    assert_eq!(
        manifest.verify.unwrap().tolerance[&symb::dtype::Dtype::Q4].top1_agreement,
        Some(0.9)
    );
    let graph = project.symb(&["graph"]);
    assert!(
        graph.status.success(),
        "{}",
        String::from_utf8_lossy(&graph.stderr)
    );
    let tree = String::from_utf8_lossy(&graph.stdout);
    for stage in ["export", "quantize.q4", "verify.fp32", "verify.q4"] {
        assert!(tree.contains(stage), "{stage} in {tree}");
    }
}

/// `symb init p1` makes the folder and the project inside it, named after
/// it, as `cargo new` does; `symb build` there finds its manifest; `-q`
/// prints nothing.
#[test]
fn init_dir_makes_the_project_folder() {
    let dir = tempfile::tempdir().unwrap();
    let init = Command::new(BIN)
        .args(["init", "-q", "p1"])
        .current_dir(dir.path())
        .output()
        .unwrap();
    assert!(
        init.status.success(),
        "{}",
        String::from_utf8_lossy(&init.stderr)
    );
    assert!(
        init.stderr.is_empty(),
        "{}",
        String::from_utf8_lossy(&init.stderr)
    );
    let p1 = dir.path().join("p1");
    let manifest = std::fs::read_to_string(p1.join("symb.toml")).unwrap();
    assert!(manifest.contains("name = \"p1\""), "{manifest}");
    assert!(p1.join("corpus").is_dir() && p1.join(".gitignore").is_file());
    assert!(!dir.path().join("corpus").exists(), "nothing beside p1");
    // A newcomer's first corpus: 300 short lines, on the default manifest.
    let lines: Vec<String> = common::demo_lines()[..300]
        .iter()
        .map(|l| l.split_whitespace().take(2).collect::<Vec<_>>().join(" "))
        .collect();
    std::fs::write(p1.join("corpus/text.txt"), lines.join("\n") + "\n").unwrap();
    let build = Command::new(BIN)
        .args(["build", "--json"])
        .current_dir(&p1)
        .output()
        .unwrap();
    assert!(
        build.status.success(),
        "{}",
        String::from_utf8_lossy(&build.stderr)
    );
    assert!(p1.join("cache").is_dir(), "the cache is the project's");
    // It builds, every check passes, and the build says the model is poor
    // and what to do about it.
    let events: Vec<serde_json::Value> = String::from_utf8(build.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let warnings = common::warnings(&events);
    for expected in [
        ("tokenizer", "vocab-shortfall"),
        ("finetune", "small-corpus"),
        ("finetune", "no-eval"),
    ] {
        assert!(
            warnings.contains(&(expected.0.into(), expected.1.into())),
            "{expected:?} in {warnings:?}"
        );
    }
    let said = |code: &str| {
        events
            .iter()
            .find(|e| e["event"] == "warning" && e["code"] == code)
            .map(|e| format!("{} {}", e["message"], e["help"]))
            .unwrap()
    };
    assert!(
        said("vocab-shortfall").contains("reached")
            && said("vocab-shortfall").contains("`tokenizer.vocab_size = "),
        "{}",
        said("vocab-shortfall")
    );
    assert!(
        said("small-corpus").contains("tokens per parameter")
            && said("small-corpus").contains("tokens would do"),
        "{}",
        said("small-corpus")
    );
    assert!(
        said("no-eval").contains("less than one block of 129")
            && said("no-eval").contains("`corpus.eval_fraction = "),
        "{}",
        said("no-eval")
    );
    let last = events.last().unwrap();
    assert_eq!(last["warnings"], warnings.len(), "{last}");
    // The report and the model card say them too.
    let report = std::fs::read_to_string(p1.join("dist/report.html")).unwrap();
    let card = std::fs::read_to_string(p1.join("dist/README.md")).unwrap();
    for (_, code) in &warnings {
        assert!(
            report.contains(&format!("<b>{code}</b>")),
            "{code} in report.html"
        );
        assert!(card.contains(&format!("**{code}**")), "{code} in README.md");
    }
    // A build with nothing to do says them again, as cargo replays a
    // cached crate's warnings.
    let again = Command::new(BIN)
        .arg("build")
        .current_dir(&p1)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&again.stderr);
    assert!(
        again.status.success()
            && stderr.contains("warning[no-eval]: finetune: the eval split has")
            && stderr.contains("help: hold out at least 258 tokens")
            && stderr.contains(&format!("0 ran, 20 cached, {} warnings", warnings.len())),
        "{stderr}"
    );
    // On a terminal (util-linux's `script` gives it one), `symb clean` asks
    // before it removes the trained model; "n" keeps everything.
    let mut asked = Command::new("script")
        .args(["-qec", &format!("{BIN} clean"), "/dev/null"])
        .current_dir(&p1)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::io::Write::write_all(&mut asked.stdin.take().unwrap(), b"n\n").unwrap();
    let asked = asked.wait_with_output().unwrap();
    let said = String::from_utf8_lossy(&asked.stdout);
    assert!(
        asked.status.success()
            && said.contains("with the trained model")
            && said.contains("[y/N]")
            && said.contains("Nothing removed."),
        "{said}"
    );
    assert!(p1.join("dist/model.safetensors").is_file() && p1.join("cache/v1").is_dir());
    // Not on a terminal (a script), or with --yes, it removes them.
    let cleaned = Command::new(BIN)
        .args(["clean", "--yes"])
        .current_dir(&p1)
        .output()
        .unwrap();
    assert!(
        cleaned.status.success(),
        "{}",
        String::from_utf8_lossy(&cleaned.stderr)
    );
    assert!(!p1.join("dist").exists());
}

#[test]
fn init_writes_the_recipe_and_never_overwrites() {
    let dir = tempfile::tempdir().unwrap();
    let run = |args: &[&str]| {
        Command::new(BIN)
            .args(args)
            .current_dir(dir.path())
            .output()
            .unwrap()
    };
    assert!(run(&["init"]).status.success());
    let written = std::fs::read_to_string(dir.path().join("symb.toml")).unwrap();
    // The project is named after its folder; the rest is the recipe.
    let folder = dir
        .path()
        .file_name()
        .unwrap()
        .to_string_lossy()
        .into_owned();
    let named = format!("name = \"{folder}\"");
    assert!(written.contains(&named), "{written}");
    assert_eq!(
        written.replacen(&named, "name = \"symbiotic\"", 1),
        std::fs::read_to_string(format!("{ROOT}/symb.toml.example")).unwrap(),
        "the example is the `symbiotic` recipe"
    );
    // The scaffold: a corpus folder with a note, and a .gitignore for what builds make.
    assert!(
        std::fs::read_to_string(dir.path().join("corpus/README.md"))
            .unwrap()
            .contains("one document per line")
    );
    let ignore = std::fs::read_to_string(dir.path().join(".gitignore")).unwrap();
    assert!(
        ignore.lines().any(|l| l == "/dist/") && ignore.lines().any(|l| l == "/cache/"),
        "{ignore}"
    );
    // A user's .gitignore keeps its lines and gets only what it lacks.
    let other = tempfile::tempdir().unwrap();
    std::fs::write(
        other.path().join(".gitignore"),
        "*.log
dist/",
    )
    .unwrap();
    assert!(
        Command::new(BIN)
            .args(["init", "--recipe", "gpt2-lora"])
            .current_dir(other.path())
            .output()
            .unwrap()
            .status
            .success()
    );
    assert_eq!(
        std::fs::read_to_string(other.path().join(".gitignore")).unwrap(),
        "*.log
dist/
# symb's output folder and cache (rebuilt by `symb build`)
/cache/
"
    );
    let again = run(&["init"]);
    assert_eq!(again.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&again.stderr).contains("already exists"));
    let unknown = run(&["init", "--recipe", "nope", "other.toml"]);
    assert_eq!(unknown.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&unknown.stderr);
    assert!(
        stderr.contains("nope") && stderr.contains("symbiotic") && stderr.contains("gpt2-lora"),
        "{stderr}"
    );
    // `init --help` lists the recipes.
    let help = String::from_utf8_lossy(&run(&["init", "--help"]).stdout).into_owned();
    for (name, _) in symb::cli::RECIPES {
        assert!(help.contains(name), "{name} in {help}");
    }
    // The chat recipe comes with the demo's conversations and plans as it is.
    let chat = tempfile::tempdir().unwrap();
    let init = Command::new(BIN)
        .args(["init", "--recipe", "chat"])
        .current_dir(chat.path())
        .output()
        .unwrap();
    assert!(
        init.status.success(),
        "{}",
        String::from_utf8_lossy(&init.stderr)
    );
    for name in ["chat.jsonl", "chat_eval.jsonl"] {
        assert_eq!(
            std::fs::read(chat.path().join("corpus").join(name)).unwrap(),
            std::fs::read(format!("{ROOT}/corpus/{name}")).unwrap()
        );
    }
    let status = Command::new(BIN)
        .args(["status", "--json"])
        .current_dir(chat.path())
        .output()
        .unwrap();
    assert!(
        status.status.success(),
        "{}",
        String::from_utf8_lossy(&status.stderr)
    );
    assert!(String::from_utf8_lossy(&status.stdout).contains("finetune"));
    // Without a corpus the manifest says exactly what is missing.
    let build = run(&["build"]);
    assert_eq!(build.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&build.stderr)
            .contains("`corpus/*.txt` in `corpus.files` matches no file")
    );
}

#[test]
fn a_missing_manifest_is_a_usage_error() {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(BIN)
        .args(["build", "-m", "nope.toml"])
        .current_dir(dir.path())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot read the manifest `nope.toml`"));
}
