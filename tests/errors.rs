//! Bad input: each error is short, names the file, line and key, exits
//! with 2, and leaves the cache and the previous output as they were.
#![allow(clippy::unwrap_used)] // a test: a panic is how it fails

mod common;

use common::{TestProject, snapshot};

/// The cache's meaningful contents: records, blobs and refs.
fn cache_state(project: &TestProject) -> Vec<std::collections::BTreeMap<String, Vec<u8>>> {
    ["actions", "blobs", "refs"]
        .iter()
        .map(|d| snapshot(&project.path(&format!("cache/v1/{d}"))))
        .collect()
}

/// Builds a good project, applies `break_it`, and checks that `symb build`
/// fails with exit 2 and exactly `expected` on stderr (timings and the temp
/// path filtered), with nothing changed.
fn assert_rejected(break_it: impl FnOnce(&TestProject), expected: &str) {
    let project = TestProject::new(100);
    project.build_ok();
    let (cache, output) = (cache_state(&project), snapshot(&project.path("dist")));
    break_it(&project);
    let run = project.symb(&["build"]);
    let stderr = String::from_utf8(run.stderr).unwrap();
    let root = project.dir.path().to_str().unwrap();
    let filtered: String = stderr
        .replace(root, "[PROJECT]")
        .lines()
        .map(|line| match line.find(" in ").zip(line.rfind('s')) {
            Some((at, _)) if line.trim_start().starts_with("Failed 0 ran") => format!(
                "{} in [TIME]{}",
                &line[..at],
                &line[line.find("s;").unwrap() + 1..]
            ),
            _ => line.to_string(),
        })
        .collect::<Vec<_>>()
        .join("\n");
    assert_eq!(
        filtered.trim_end(),
        expected.trim_end(),
        "\n--- actual ---\n{stderr}"
    );
    assert_eq!(run.status.code(), Some(2));
    assert!(cache_state(&project) == cache, "the cache changed");
    assert!(
        snapshot(&project.path("dist")) == output,
        "the output changed"
    );
}

#[test]
fn malformed_toml() {
    assert_rejected(
        |p| p.edit("[tokenizer]", "[tokenizer"),
        r#"
error: invalid TOML: unclosed table, expected `]`
  --> symb.toml:10:11
   |
10 | [tokenizer
   |           ^"#
            .trim_start(),
    );
}

#[test]
fn unknown_key_with_a_suggestion() {
    assert_rejected(
        |p| p.edit("vocab_size = 400", "vocab_sise = 400"),
        r#"
error: unknown key `vocab_sise` in `[tokenizer]`, did you mean `vocab_size`?
  --> symb.toml:11:1
   |
11 | vocab_sise = 400
   | ^^^^^^^^^^"#
            .trim_start(),
    );
}

#[test]
fn unknown_section() {
    assert_rejected(
        |p| p.edit("[corpus]", "[corpuss]"),
        r#"
error: unknown section `corpuss` in the top level, did you mean `corpus`?
 --> symb.toml:5:2
  |
5 | [corpuss]
  |  ^^^^^^^"#
            .trim_start(),
    );
}

#[test]
fn wrong_type() {
    assert_rejected(
        |p| p.edit("vocab_size = 400", "vocab_size = \"big\""),
        r#"
error: wrong type for `tokenizer.vocab_size`: string "big", expected a non-negative integer
  --> symb.toml:11:14
   |
11 | vocab_size = "big"
   |              ^^^^^"#
            .trim_start(),
    );
}

#[test]
fn unknown_value_with_a_suggestion() {
    assert_rejected(
        |p| p.edit("\"byte_level\"", "\"bytelevel\""),
        r#"
error: `tokenizer.pre_tokenizer` = "bytelevel" is not one of `byte_level`, `whitespace`, `metaspace`, did you mean `byte_level`?
  --> symb.toml:13:17
   |
13 | pre_tokenizer = "bytelevel"
   |                 ^^^^^^^^^^^"#
            .trim_start(),
    );
}

#[test]
fn missing_corpus() {
    assert_rejected(
        |p| p.edit("corpus/*.txt", "texts/*.txt"),
        r#"
error: `texts/*.txt` in `corpus.files` matches no file (relative to `[PROJECT]`)
 --> symb.toml:6:9
  |
6 | files = ["texts/*.txt"]
  |         ^^^^^^^^^^^^^^^"#
            .trim_start(),
    );
}

#[test]
fn empty_corpus() {
    assert_rejected(
        |p| {
            for name in ["a", "b", "c"] {
                p.write(&format!("corpus/{name}.txt"), "\n   \n");
            }
        },
        r#"
      Failed corpus (`corpus/a.txt` changed; `corpus/b.txt` changed; `corpus/c.txt` changed)
error: stage `corpus` failed: the corpus is empty: `corpus/a.txt`, `corpus/b.txt`, `corpus/c.txt` hold no documents (blank lines are skipped)
      Failed 0 ran, 0 cached, 1 failed, 1 skipped (`tokenizer`) in [TIME]; output `dist` left as it was"#
            .trim_start_matches('\n'),
    );
}

#[test]
fn non_utf8_corpus() {
    assert_rejected(
        |p| std::fs::write(p.path("corpus/b.txt"), b"Kan-ka zuraeima pa ?\nWes-ka tais-zo \xe9 yiliima .\n").unwrap(),
        r#"
      Failed corpus (`corpus/b.txt` changed)
error: stage `corpus` failed: `corpus/b.txt`:2:16: not valid UTF-8 (byte 0xe9); convert the file to UTF-8, e.g. `iconv -f latin1 -t utf-8`
      Failed 0 ran, 0 cached, 1 failed, 1 skipped (`tokenizer`) in [TIME]; output `dist` left as it was"#
            .trim_start_matches('\n'),
    );
}

#[test]
fn vocab_too_small() {
    assert_rejected(
        |p| p.edit("vocab_size = 400", "vocab_size = 200"),
        r#"
error: `tokenizer.vocab_size` = 200 is too small: the byte alphabet (256) plus 2 special tokens leave no room for a merge; use at least 259
  --> symb.toml:11:14
   |
11 | vocab_size = 200
   |              ^^^"#
            .trim_start(),
    );
}

#[test]
fn output_outside_the_project() {
    assert_rejected(
        |p| p.edit("output = \"dist\"", "output = \"../elsewhere\""),
        r#"
error: `project.output` = "../elsewhere" is outside the project folder; symb replaces this folder on every build, so it must be a folder inside `[PROJECT]`
 --> symb.toml:3:10
  |
3 | output = "../elsewhere"
  |          ^^^^^^^^^^^^^^"#
            .trim_start(),
    );
}

#[test]
fn eval_fraction_out_of_range() {
    assert_rejected(
        |p| p.edit("eval_fraction = 0.1", "eval_fraction = 1.0"),
        r#"
error: `corpus.eval_fraction` = 1 is out of range: use a fraction from 0 (no eval split) up to, but not including, 1
 --> symb.toml:7:17
  |
7 | eval_fraction = 1.0
  |                 ^^^"#
            .trim_start(),
    );
}

#[test]
fn rank_larger_than_the_model_width() {
    assert_rejected(
        |p| {
            p.write(
                "symb.toml",
                "[base]\nmodel = \"scratch\"\nn_embd = 64\n\n[finetune]\nrank = 100\n",
            )
        },
        r#"
error: `finetune.rank` = 100 is larger than the model width `base.n_embd` = 64
 --> symb.toml:6:8
  |
6 | rank = 100
  |        ^^^"#
            .trim_start(),
    );
}

#[test]
fn unknown_dtype() {
    assert_rejected(
        |p| p.write("symb.toml", "[export]\ntargets = [\"fp32\", \"q4f61\"]\n"),
        r#"
error: unknown dtype `q4f61` in `export.targets`, did you mean `q4f16`? (known: fp32, fp16, q8, int8, uint8, q4, q4f16)
 --> symb.toml:2:11
  |
2 | targets = ["fp32", "q4f61"]
  |           ^^^^^^^^^^^^^^^^^"#
            .trim_start(),
    );
}

#[test]
fn json_mode_reports_the_manifest_error_as_the_last_line() {
    let project = TestProject::new(10);
    project.edit("vocab_size = 400", "vocab_size = 10");
    let build = project.build(&[]);
    assert_eq!(build.code, 2);
    assert_eq!(build.last()["event"], "build");
    assert_eq!(build.last()["status"], "failed");
    assert!(
        build.last()["error"]
            .as_str()
            .unwrap()
            .contains("symb.toml:11:14")
    );
}

#[test]
fn an_unknown_web_dtype() {
    assert_rejected(
        |p| {
            p.write(
                "symb.toml",
                &format!("{}\n[web]\ndtype = \"q5\"\n", p.read("symb.toml")),
            )
        },
        r#"
error: unknown dtype `q5` in `web.dtype` (known: fp32, fp16, q8, int8, uint8, q4, q4f16)
  --> symb.toml:17:9
   |
17 | dtype = "q5"
   |         ^^^^"#
            .trim_start(),
    );
}

#[test]
fn a_webgpu_dtype_the_folder_lacks() {
    assert_rejected(
        |p| p.write("symb.toml", &format!("{}\n[export]\ntargets = [\"fp32\", \
            \"q4\"]\n\n[web]\nwebgpu_dtype = \"q4f16\"\n", p.read("symb.toml"))),
        r#"
error: `web.webgpu_dtype` = "q4f16" is not in `export.targets` (fp32, q4): the page would load a file the folder lacks
  --> symb.toml:20:16
   |
20 | webgpu_dtype = "q4f16"
   |                ^^^^^^^"#
            .trim_start(),
    );
}

#[test]
fn an_unknown_browser_device() {
    assert_rejected(
        |p| {
            p.write(
                "symb.toml",
                &format!(
                    "{}\n[verify.browser]\ndevices = [\"webgpu\", \"webnn\"]\n",
                    p.read("symb.toml")
                ),
            )
        },
        r#"
error: `webnn` in `verify.browser.devices` is not a browser device (known: webgpu, wasm)
  --> symb.toml:17:11
   |
17 | devices = ["webgpu", "webnn"]
   |           ^^^^^^^^^^^^^^^^^^^"#
            .trim_start(),
    );
}

/// `[remote]` mistakes are caught before anything runs, each pointing at its
/// line; those that depend on the environment name the setting to fix.
#[test]
fn remote_section_mistakes() {
    let base = common::SCRATCH_TRAINING;
    let cases: [(&str, &str, &str); 9] = [
        (
            "[remote]\nengine = \"ray\"\naddress = \"http://me:hunter2@head:8265\"\nstages = [\"finetune\"]\n",
            "`remote.address` holds a user name or password",
            "symb.toml:29:",
        ),
        (
            "[remote]\nengine = \"dask\"\nstages = [\"finetune\"]\n",
            "`remote.engine` = \"dask\" is not one of `ray`",
            "symb.toml:28:",
        ),
        (
            "[remote]\nengine = \"ray\"\naddress = \"ray-head:8265\"\nstages = [\"finetune\"]\n",
            "`remote.address` = \"ray-head:8265\" is not an http:// or https:// URL",
            "symb.toml:29:",
        ),
        (
            "[remote]\nengine = \"ray\"\nstages = [\"finetnue\"]\n",
            "`remote.stages`: `finetnue` cannot run remotely, did you mean `finetune`?",
            "symb.toml:29:",
        ),
        (
            "[remote]\nengine = \"ray\"\nstages = []\n",
            "`remote.stages` is empty",
            "symb.toml:29:",
        ),
        (
            "[remote]\nengine = \"ray\"\nstages = [\"finetune\"]\n\n[remote.resources.export]\nnum_gpus = 1\n",
            "`[remote.resources.export]`: `export` is not in `remote.stages`",
            "symb.toml:31:",
        ),
        (
            "[remote]\nengine = \"ray\"\nstages = [\"finetune\"]\n\n[remote.resources.finetune]\nmemory = \"lots\"\n",
            "`remote.resources.finetune.memory` = \"lots\" is not a size",
            "symb.toml:32:",
        ),
        // The environment's part: no address anywhere, no cache remote.
        (
            "[remote]\nengine = \"ray\"\nstages = [\"finetune\"]\n",
            "`[remote]` has no `address`: set `remote.address`",
            "symb.toml",
        ),
        (
            "[remote]\nengine = \"ray\"\naddress = \"http://127.0.0.1:1\"\nstages = [\"finetune\"]\n",
            "`[remote]` stages send their inputs and get their results through the shared cache: set `[cache] remote`",
            "symb.toml",
        ),
    ];
    for (table, message, place) in cases {
        let project = TestProject::with_manifest(&format!("{base}\n{table}"), 20);
        let mut command = std::process::Command::new(common::BIN);
        command
            .args(["build"])
            .current_dir(project.dir.path())
            .env_remove("SYMB_REMOTE_ADDRESS")
            .env_remove("SYMB_CACHE_REMOTE");
        let run = command.output().unwrap();
        let stderr = String::from_utf8(run.stderr).unwrap();
        assert_eq!(run.status.code(), Some(2), "{table}: {stderr}");
        assert!(
            stderr.contains(message) && stderr.contains(place),
            "{table}\n--- expected {message:?} at {place}, got ---\n{stderr}"
        );
        assert!(
            !project.path("cache/v1/actions").exists()
                || snapshot(&project.path("cache/v1/actions")).is_empty(),
            "nothing ran"
        );
    }
    // A manifest that trains nothing cannot send `finetune`.
    let project = TestProject::with_manifest(
        &format!(
            "{}\n[remote]\nengine = \"ray\"\nstages = [\"finetune\"]\n",
            common::MANIFEST
        ),
        20,
    );
    let stderr = String::from_utf8(project.symb(&["build"]).stderr).unwrap();
    assert!(
        stderr.contains("`remote.stages` names `finetune`, but this manifest trains nothing"),
        "{stderr}"
    );
}

/// A model size past any real model's is a typo: refused at its line
/// (it used to end in a failed allocation, an abort with exit 134).
#[test]
fn model_sizes_past_any_real_model() {
    assert_rejected(
        |p| p.write("symb.toml", "[base]\nmodel = \"scratch\"\nn_embd = 65536\n"),
        r#"
error: `base.n_embd` = 65536 is larger than symb takes (16384 at most)
 --> symb.toml:3:10
  |
3 | n_embd = 65536
  |          ^^^^^"#
            .trim_start(),
    );
    assert_rejected(
        |p| {
            p.write(
                "symb.toml",
                "[base]\nmodel = \"scratch\"\nn_positions = 4294967296\n",
            )
        },
        r#"
error: `base.n_positions` = 4294967296 is larger than symb takes (131072 at most)
 --> symb.toml:3:15
  |
3 | n_positions = 4294967296
  |               ^^^^^^^^^^"#
            .trim_start(),
    );
}

/// A model within the bounds but larger than the machine: the stage that
/// would allocate it says how much it needs and which settings to lower,
/// and exits with 2 before allocating anything.
#[test]
fn a_model_larger_than_the_machine_is_refused_before_it_is_allocated() {
    let project = TestProject::new(40);
    let text = project.read("symb.toml");
    project.write(
        "symb.toml",
        &format!(
            "{text}\n[base]\nmodel = \"scratch\"\nn_layer = 200\nn_embd = 16384\nn_head = 16\n"
        ),
    );
    let build = project.build(&[]);
    assert_eq!(build.code, 2, "{}", build.stderr);
    let base = build
        .events
        .iter()
        .find(|e| e["event"] == "stage" && e["stage"] == "base")
        .unwrap();
    assert_eq!(base["status"], "failed");
    let reason = base["reason"].as_str().unwrap();
    assert!(
        reason.contains("needs about")
            && reason.contains("GB of memory")
            && reason.contains("lower `base.n_embd`, `base.n_layer` or `base.n_positions`"),
        "{reason}"
    );
}

/// The same before training: the weights, AdamW's state and a batch's
/// activations against the machine, before the model is loaded.
#[test]
fn a_training_larger_than_the_machine_is_refused_before_it_starts() {
    let project = TestProject::with_manifest(common::SCRATCH_TRAINING, 40);
    project.edit("batch_size = 4", "batch_size = 1000000");
    let build = project.build(&[]);
    assert_eq!(build.code, 2, "{}", build.stderr);
    let finetune = build
        .events
        .iter()
        .find(|e| e["event"] == "stage" && e["stage"] == "finetune")
        .unwrap();
    assert_eq!(finetune["status"], "failed");
    let reason = finetune["reason"].as_str().unwrap();
    assert!(
        reason.contains("batches of 1000000 x 32 tokens needs about")
            && reason.contains("lower `finetune.batch_size` or `finetune.block_size`"),
        "{reason}"
    );
}

/// The rules between sections (what a stage needs from the others) point at
/// the section or key that breaks them, as every other manifest error does.
#[test]
fn rules_between_sections_point_at_their_line() {
    let fixture = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tiny-gpt2");
    let head = format!(
        "[project]\nname = \"t\"\n\n[corpus]\nfiles = [\"corpus/*.txt\"]\n\n[base]\nmodel = \"path:{}\"\n",
        fixture.display()
    );
    let cases = [
        // (what follows the head, the line the error points at, what it says)
        (
            "\n[export]\ntargets = [\"fp32\"]\n\n[verify.tolerance.q8]\nkl_divergence = 0.1\n",
            "symb.toml:13:1",
            "`[verify.tolerance.q8]` sets bounds for `q8`, which `export.targets` does not build",
        ),
        (
            "\n[vocab]\nstrategy = \"add_tokens\"\n",
            "symb.toml:10:1",
            "`[vocab]` adds the tokens of a trained tokenizer to the base's",
        ),
        (
            "\n[tokenizer]\nvocab_size = 300\n",
            "symb.toml:10:1",
            "a `[tokenizer]` with a pretrained base needs a `[vocab]` section",
        ),
        (
            "\n[verify]\nprompts = 2\n",
            "symb.toml:10:1",
            "`[verify]` checks the ONNX files that `[export]` writes",
        ),
    ];
    for (tail, at, message) in cases {
        let project = TestProject::with_manifest(&(head.clone() + tail), 10);
        let run = project.symb(&["build"]);
        let stderr = String::from_utf8(run.stderr).unwrap();
        assert_eq!(run.status.code(), Some(2), "{stderr}");
        assert!(
            stderr.starts_with(&format!("error: {message}"))
                && stderr.contains(&format!("--> {at}")),
            "{tail}: {stderr}"
        );
    }
    let scratch = "[project]\nname = \"t\"\n\n[corpus]\nfiles = [\"corpus/*.txt\"]\n\n[base]\nmodel = \"scratch\"\n";
    let project = TestProject::with_manifest(scratch, 10);
    let stderr = String::from_utf8(project.symb(&["build"]).stderr).unwrap();
    assert!(
        stderr.contains("needs a `[tokenizer]` section") && stderr.contains("--> symb.toml:8:9"),
        "{stderr}"
    );
}
