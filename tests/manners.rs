//! The command line's manners, as cargo's and uv's users expect them: the
//! manifest found from a subfolder, one line per stage with a short reason,
//! colour only when asked or on a terminal, quiet, `status --exit-code`,
//! stage names alike in `--target` and `--force`, progress and notes as
//! JSON events, Ctrl-C that says what it stopped (and the next build
//! resumes), completions and `--version` with the commit.
#![allow(clippy::unwrap_used)] // a test: a panic is how it fails

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};

use common::{BIN, SCRATCH_TRAINING, TestProject, set};

fn run(dir: &std::path::Path, args: &[&str], envs: &[(&str, &str)]) -> (i32, String, String) {
    let mut command = Command::new(BIN);
    command
        .args(args)
        .current_dir(dir)
        .env_remove("RUST_LOG")
        .env_remove("NO_COLOR");
    for (k, v) in envs {
        command.env(k, v);
    }
    let out = command.output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn the_manifest_is_found_from_a_subfolder_and_its_absence_says_what_to_do() {
    let project = TestProject::new(40);
    std::fs::create_dir_all(project.path("notes/deeper")).unwrap();
    let (code, stdout, stderr) = run(&project.path("notes/deeper"), &["status"], &[]);
    assert_eq!(code, 0, "{stderr}");
    assert!(
        stdout.contains("corpus") && stdout.contains("tokenizer"),
        "{stdout}"
    );
    // -m is global: before or after the subcommand.
    let (code, _, stderr) = run(
        project.path("").as_path(),
        &["-m", "symb.toml", "status"],
        &[],
    );
    assert_eq!(code, 0, "{stderr}");

    let empty = tempfile::tempdir().unwrap();
    let (code, _, stderr) = run(empty.path(), &["build"], &[]);
    assert_eq!(code, 2);
    assert!(
        stderr.contains("no `symb.toml` in")
            && stderr.contains("symb init")
            && stderr.contains("-m FILE"),
        "{stderr}"
    );
    let (code, _, stderr) = run(empty.path(), &["build", "-m", "nope.toml"], &[]);
    assert_eq!(code, 2);
    assert!(
        stderr.contains("cannot read the manifest `nope.toml`") && stderr.contains("symb init"),
        "{stderr}"
    );
}

#[test]
fn a_build_says_one_line_per_stage_with_a_short_reason_in_colour_only_when_asked() {
    let project = TestProject::new(40);
    let (code, _, stderr) = run(project.path("").as_path(), &["build"], &[]);
    assert_eq!(code, 0, "{stderr}");
    let ran: Vec<&str> = stderr
        .lines()
        .filter(|l| l.trim_start().starts_with("Ran "))
        .collect();
    assert_eq!(ran.len(), 2, "{stderr}");
    assert!(
        ran.iter().all(|l| l.contains("(no previous build)")),
        "{stderr}"
    );
    assert!(
        !stderr.contains("Running") && !stderr.contains('\x1b'),
        "no colour in a pipe:\n{stderr}"
    );

    // A changed setting: the reason names it and its values, without digests.
    project.edit("vocab_size = 400", "vocab_size = 300");
    let (code, _, stderr) = run(
        project.path("").as_path(),
        &["build", "--color", "always"],
        &[],
    );
    assert_eq!(code, 0, "{stderr}");
    assert!(
        stderr.contains("tokenizer in ")
            && stderr.contains("`tokenizer.vocab_size` changed 400 -> 300"),
        "{stderr}"
    );
    assert!(
        stderr.contains("\x1b[1;32m         Ran\x1b[0m"),
        "cargo's green status word:\n{stderr:?}"
    );
    // -v gives the whole reason: the digests of the upstream artifacts too.
    project.edit("vocab_size = 300", "vocab_size = 350");
    let (_, _, verbose) = run(
        project.path("").as_path(),
        &["build", "-v"],
        &[("NO_COLOR", "1")],
    );
    assert!(
        verbose.contains("Running tokenizer (") && !verbose.contains('\x1b'),
        "{verbose}"
    );
    // -q: nothing on success.
    project.edit("vocab_size = 350", "vocab_size = 320");
    let (code, stdout, stderr) = run(project.path("").as_path(), &["build", "-q"], &[]);
    assert_eq!((code, stdout.as_str(), stderr.as_str()), (0, "", ""));

    // status --exit-code: 1 while something is stale, 0 when all is fresh.
    project.edit("vocab_size = 320", "vocab_size = 310");
    assert_eq!(
        run(project.path("").as_path(), &["status", "--exit-code"], &[]).0,
        1
    );
    assert_eq!(
        run(project.path("").as_path(), &["status"], &[]).0,
        0,
        "without the flag, stale is not an error"
    );
    assert_eq!(run(project.path("").as_path(), &["build", "-q"], &[]).0, 0);
    let (code, stdout, _) = run(
        project.path("").as_path(),
        &["status", "--exit-code", "--json"],
        &[],
    );
    assert_eq!(code, 0, "{stdout}");
}

#[test]
fn target_and_force_take_the_same_names_and_a_missing_dtype_names_export_targets() {
    let manifest = format!("{SCRATCH_TRAINING}\n[export]\ntargets = [\"fp32\", \"q8\"]\n");
    let project = TestProject::with_manifest(&manifest, 40);
    let build = project.build(&["--target", "q8"]);
    assert_eq!(build.code, 0, "{}", build.stderr);
    assert!(
        build.ran().contains("quantize.q8") && build.ran().contains("verify.q8"),
        "{:?}",
        build.ran()
    );
    let forced = project.build(&["--target", "q8", "--force", "q8"]);
    assert_eq!(forced.code, 0, "{}", forced.stderr);
    assert_eq!(
        forced.ran(),
        set(&["quantize.q8", "verify.q8"]),
        "`--force q8` means what `--target q8` does"
    );
    // A stage that `--target` leaves out cannot be forced: said as such.
    let outside = project.build(&["--target", "q8", "--force", "fp32"]);
    assert_eq!(outside.code, 2);
    assert!(
        outside
            .stderr
            .contains("`fp32` (verify.fp32) is not part of this build: `--target` leaves it out"),
        "{}",
        outside.stderr
    );
    for args in [&["--target", "int8"][..], &["--force", "int8"]] {
        let refused = project.build(args);
        assert_eq!(refused.code, 2);
        assert!(
            refused
                .stderr
                .contains("`int8` is not built by this manifest: add it to `export.targets`")
                && refused.stderr.contains("fp32, q8"),
            "{}",
            refused.stderr
        );
    }
    for args in [&["--target", "nope"][..], &["--force", "nope"]] {
        let refused = project.build(args);
        assert_eq!(refused.code, 2);
        assert!(
            refused
                .stderr
                .contains("unknown target `nope`; the plan has: `corpus`"),
            "{}",
            refused.stderr
        );
    }
}

/// Training reports progress as JSON events with its figures; Ctrl-C says
/// what it stopped and exits 130; the next build resumes from the
/// checkpoint and says so.
#[test]
fn ctrl_c_says_what_it_stopped_and_the_next_build_resumes_and_says_so() {
    let manifest = SCRATCH_TRAINING
        .replace("max_steps = 6", "max_steps = 100000")
        .replace("checkpoint_every = 2", "checkpoint_every = 5")
        .replace("eval_every = 3", "eval_every = 100000");
    let project = TestProject::with_manifest(&manifest, 40);
    let start = |project: &TestProject| {
        Command::new(BIN)
            .args(["build", "--json"])
            .current_dir(project.dir.path())
            .env_remove("RUST_LOG")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    };
    let mut child = start(&project);
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut started = false;
    let progress = loop {
        let line = lines
            .next()
            .expect("the build prints progress before it ends")
            .unwrap();
        let event: serde_json::Value = serde_json::from_str(&line).unwrap();
        started |= event["event"] == "stage_started" && event["stage"] == "finetune";
        if event["event"] == "progress"
            && event["stage"] == "finetune"
            && event["step"].as_u64().unwrap() >= 12
        {
            break event;
        }
    };
    assert!(started, "a stage_started event comes first");
    assert_eq!(progress["total"], 100000);
    for field in ["loss", "tokens_per_second", "eta_s"] {
        assert!(
            progress[field]
                .as_f64()
                .is_some_and(|v| v.is_finite() && v >= 0.0),
            "{field} in {progress}"
        );
    }
    assert!(
        Command::new("kill")
            .args(["-INT", &child.id().to_string()])
            .status()
            .unwrap()
            .success()
    );
    let rest: Vec<String> = lines.map_while(Result::ok).collect();
    let status = child.wait().unwrap();
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut stderr).unwrap();
    assert_eq!(status.code(), Some(130), "{stderr}");
    assert!(
        stderr.contains("Interrupted")
            && stderr.contains("stopped finetune at ")
            && stderr.contains("of 100000")
            && stderr.contains("run `symb build` again"),
        "{stderr}"
    );
    let interrupted: serde_json::Value =
        serde_json::from_str(rest.last().expect("an interrupted event")).unwrap();
    assert_eq!(interrupted["event"], "interrupted", "{rest:?}");
    assert_eq!(interrupted["running"][0]["stage"], "finetune");

    // The next build takes up from the last checkpoint and says so.
    let mut child = start(&project);
    let mut note = None;
    for line in BufReader::new(child.stdout.take().unwrap()).lines() {
        let event: serde_json::Value = serde_json::from_str(&line.unwrap()).unwrap();
        if event["event"] == "note" {
            note = Some(event);
            break;
        }
        assert_ne!(
            event["event"], "progress",
            "the note comes before the first step: {event}"
        );
    }
    child.kill().unwrap();
    child.wait().unwrap();
    let note = note.expect("a resumed build notes it");
    assert_eq!(note["stage"], "finetune");
    let message = note["message"].as_str().unwrap();
    let step: u64 = message
        .strip_prefix("resumed from step ")
        .and_then(|m| m.split(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("{message}"));
    assert!(
        step >= 10 && step.is_multiple_of(5) && message.contains("of 100000"),
        "{message}"
    );
}

#[test]
fn completions_and_the_version_with_its_commit() {
    let dir = tempfile::tempdir().unwrap();
    for shell in ["bash", "zsh", "fish"] {
        let (code, stdout, stderr) = run(dir.path(), &["completions", shell], &[]);
        assert_eq!(code, 0, "{stderr}");
        assert!(
            stdout.contains("symb")
                && stdout.contains("build")
                && stdout.contains("manifest")
                && stdout.contains("completions"),
            "{shell}"
        );
    }
    let (code, stdout, _) = run(dir.path(), &["--version"], &[]);
    assert_eq!(code, 0);
    // "symb 0.1.0 (1a2b3c4 2026-12-01)" from a checkout; "(no commit)" from a tarball.
    let inner = stdout
        .trim()
        .strip_prefix(&format!("symb {} (", env!("CARGO_PKG_VERSION")))
        .and_then(|s| s.strip_suffix(')'))
        .unwrap_or_else(|| panic!("{stdout}"));
    let from_git = inner
        .split(' ')
        .next()
        .is_some_and(|h| h.len() >= 7 && h.chars().all(|c| c.is_ascii_hexdigit()));
    assert!(from_git || inner == "no commit", "{stdout}");
}

#[test]
fn every_recipe_ends_in_a_web_folder() {
    let root = env!("CARGO_MANIFEST_DIR");
    let mut recipes: Vec<_> = std::fs::read_dir(format!("{root}/recipes"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    recipes.push(format!("{root}/symb.toml.example").into());
    assert!(recipes.len() >= 4);
    for recipe in recipes {
        let text = std::fs::read_to_string(&recipe).unwrap();
        assert!(
            text.lines().any(|l| l.trim() == "[export]"),
            "{} has no [export] section",
            recipe.display()
        );
    }
}

/// The output folder is Hub-ready: a model card with the Hub's metadata
/// (license and languages from `[project]`), each file's verification and
/// how to load it; a license that is no license id is refused at its line.
#[test]
fn the_output_folder_has_a_model_card() {
    let manifest = format!("{SCRATCH_TRAINING}\n[export]\ntargets = [\"fp32\", \"q8\"]\n").replace(
        "name = \"t\"",
        "name = \"t\"\nlicense = \"apache-2.0\"\nlanguage = [\"x-symbiotic\"]",
    );
    let project = TestProject::with_manifest(&manifest, 40);
    project.build_ok();
    let card = project.read("dist/README.md");
    let (front, body) = card
        .strip_prefix("---\n")
        .and_then(|c| c.split_once("\n---\n"))
        .unwrap_or_else(|| panic!("no YAML front matter:\n{card}"));
    for line in [
        "library_name: transformers.js",
        "pipeline_tag: text-generation",
        "license: \"apache-2.0\"",
        "language:\n- \"x-symbiotic\"",
        "- onnx",
    ] {
        assert!(front.contains(line), "{line} in\n{front}");
    }
    assert!(
        !front.contains("base_model"),
        "a scratch model has no base_model:\n{front}"
    );
    assert!(
        body.contains(
            "# t\n\nA GPT-2 model (1 layer, width 32) trained from scratch on `corpus/*.txt`"
        ),
        "{body}"
    );
    for row in [
        "| fp32 | `onnx/model.onnx` |",
        "| q8 (default) | `onnx/model_quantized.onnx` |",
    ] {
        assert!(body.contains(row), "{row} in\n{body}");
    }
    assert!(
        body.contains("pipeline('text-generation', \"OWNER/t\", { dtype: 'q8' })")
            && body.contains("AutoModelForCausalLM.from_pretrained(\"OWNER/t\")"),
        "{body}"
    );

    let bad = TestProject::with_manifest(&manifest.replace("apache-2.0", "Apache 2.0"), 5);
    let (code, _, stderr) = run(bad.path("").as_path(), &["build"], &[]);
    assert_eq!(code, 2);
    assert!(
        stderr.contains("`project.license` = \"Apache 2.0\" is not a license id")
            && stderr.contains("symb.toml:3"),
        "{stderr}"
    );
}
