//! Incremental behaviour: each manifest key re-runs exactly what depends on
//! it, edits that change nothing re-run nothing, and random edit sequences
//! give the same output as a from-scratch build.
#![allow(clippy::unwrap_used)] // a test: a panic is how it fails

mod common;

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime};

use common::{TestProject, set, snapshot};

#[test]
fn first_build_runs_everything_and_a_second_runs_nothing() {
    let project = TestProject::new(150);
    let first = project.build_ok();
    assert_eq!(first.ran(), set(&["corpus", "tokenizer"]));
    assert_eq!(first.reason("corpus"), "no previous build");
    assert_eq!(first.last()["status"], "ok");
    assert_eq!(first.last()["output_updated"], true);
    assert!(project.path("dist/tokenizer.json").is_file());
    let second = project.build_ok();
    assert_eq!(second.ran(), set(&[]));
    assert_eq!(second.with_status("cached"), set(&["corpus", "tokenizer"]));
    assert_eq!(second.last()["output_updated"], false);
}

/// Each edit, then its revert: the edit re-runs exactly `expected` (early
/// cutoff included), the revert re-runs nothing (its results are cached).
#[test]
fn each_manifest_key_reruns_exactly_its_downstream() {
    let project = TestProject::new(150);
    project.build_ok();
    let cases: &[(&str, &str, &[&str])] = &[
        // Comments, whitespace and key order are not settings.
        ("[corpus]\n", "[corpus]   # the corpus\n\n", &[]),
        (
            "vocab_size = 400\nmin_frequency = 2",
            "min_frequency = 2\nvocab_size    = 400",
            &[],
        ),
        ("name = \"t\"", "name = \"renamed\"", &[]),
        // Settings the corpus reads but whose output is unchanged: early cutoff.
        (
            "files = [\"corpus/*.txt\"]",
            "files = [\"corpus/a.txt\", \"corpus/[bc].txt\"]",
            &["corpus"],
        ),
        (
            "files = [\"corpus/*.txt\"]",
            "files = [\"corpus/*.txt\"]\nformat = \"text\"",
            &["corpus"],
        ),
        (
            "files = [\"corpus/*.txt\"]",
            "files = [\"corpus/*.txt\"]\ntext_field = \"body\"",
            &["corpus"],
        ),
        // Settings that change the corpus artifacts.
        (
            "files = [\"corpus/*.txt\"]",
            "files = [\"corpus/a.txt\", \"corpus/b.txt\"]",
            &["corpus", "tokenizer"],
        ),
        (
            "eval_fraction = 0.1",
            "eval_fraction = 0.2",
            &["corpus", "tokenizer"],
        ),
        (
            "eval_fraction = 0.1",
            "eval_fraction = 0.0",
            &["corpus", "tokenizer"],
        ),
        ("seed = 0", "seed = 1", &["corpus", "tokenizer"]),
        // Tokenizer settings.
        ("vocab_size = 400", "vocab_size = 500", &["tokenizer"]),
        ("min_frequency = 2", "min_frequency = 3", &["tokenizer"]),
        (
            "pre_tokenizer = \"byte_level\"",
            "pre_tokenizer = \"metaspace\"",
            &["tokenizer"],
        ),
        (
            "pre_tokenizer = \"byte_level\"",
            "pre_tokenizer = \"whitespace\"",
            &["tokenizer"],
        ),
        (
            "special_tokens = [\"<|endoftext|>\", \"<pad>\"]",
            "special_tokens = [\"<|endoftext|>\", \"<pad>\", \"<unk>\"]",
            &["tokenizer"],
        ),
    ];
    for (from, to, expected) in cases {
        project.edit(from, to);
        let edited = project.build_ok();
        assert_eq!(edited.ran(), set(expected), "edit {from:?} -> {to:?}");
        project.edit(to, from);
        let reverted = project.build_ok();
        assert_eq!(reverted.ran(), set(&[]), "revert of {from:?} -> {to:?}");
    }
}

#[test]
fn reasons_name_the_setting_and_its_values() {
    let project = TestProject::new(100);
    project.build_ok();
    project.edit("vocab_size = 400", "vocab_size = 450");
    let status = project.symb(&["status"]);
    let text = String::from_utf8(status.stdout).unwrap();
    assert!(text.contains("Fresh corpus"), "{text}");
    assert!(
        text.contains("Stale tokenizer: `tokenizer.vocab_size` changed 400 -> 450"),
        "{text}"
    );
    let build = project.build_ok();
    assert_eq!(
        build.reason("tokenizer"),
        "`tokenizer.vocab_size` changed 400 -> 450"
    );
    project.edit("seed = 0", "seed = 3");
    let status: serde_json::Value =
        serde_json::from_slice(&project.symb(&["status", "--json"]).stdout).unwrap();
    assert_eq!(status["fresh"], false);
    assert_eq!(
        status["stages"][0]["reason"],
        "`corpus.seed` changed 0 -> 3"
    );
    assert_eq!(status["stages"][1]["reason"], "upstream `corpus` is stale");
}

#[test]
fn moving_the_output_runs_nothing_and_writes_the_new_folder() {
    let project = TestProject::new(100);
    project.build_ok();
    project.edit("output = \"dist\"", "output = \"web/out\"");
    let build = project.build_ok();
    assert_eq!(build.ran(), set(&[]));
    assert_eq!(build.last()["output_updated"], true);
    assert_eq!(
        std::fs::read(project.path("web/out/tokenizer.json")).unwrap(),
        std::fs::read(project.path("dist/tokenizer.json")).unwrap()
    );
}

#[test]
fn an_edited_output_file_is_restored() {
    let project = TestProject::new(100);
    project.build_ok();
    let good = project.read("dist/tokenizer.json");
    project.write("dist/tokenizer.json", "{}");
    let build = project.build_ok();
    assert_eq!(build.ran(), set(&[]));
    assert_eq!(build.last()["output_updated"], true);
    assert_eq!(project.read("dist/tokenizer.json"), good);
}

#[test]
fn touching_a_corpus_file_reruns_nothing_and_one_changed_byte_reruns_corpus() {
    let project = TestProject::new(100);
    project.build_ok();
    let file = project.path("corpus/b.txt");
    let later = SystemTime::now() + Duration::from_secs(5);
    std::fs::File::options()
        .write(true)
        .open(&file)
        .unwrap()
        .set_modified(later)
        .unwrap();
    assert_eq!(project.build_ok().ran(), set(&[]));

    let mut bytes = std::fs::read(&file).unwrap();
    let at = bytes.iter().position(|&b| b == b'a').unwrap();
    bytes[at] = b'o';
    std::fs::write(&file, &bytes).unwrap();
    let build = project.build_ok();
    assert_eq!(build.ran(), set(&["corpus", "tokenizer"]));
    assert_eq!(build.reason("corpus"), "`corpus/b.txt` changed");
    assert!(
        build
            .reason("tokenizer")
            .starts_with("upstream artifact `corpus/"),
        "{}",
        build.reason("tokenizer")
    );
}

#[test]
fn a_corpus_edit_that_normalises_away_stops_at_the_corpus() {
    let project = TestProject::new(100);
    project.build_ok();
    let text = project.read("corpus/a.txt");
    project.write("corpus/a.txt", &format!("\n  \n{text}\n\n"));
    let build = project.build_ok();
    assert_eq!(
        build.ran(),
        set(&["corpus"]),
        "blank lines change the file, not the documents"
    );
    assert_eq!(build.with_status("cached"), set(&["tokenizer"]));
}

#[test]
fn adding_and_removing_a_corpus_file_is_explained() {
    let project = TestProject::new(100);
    project.build_ok();
    project.write("corpus/d.txt", "Kan-ka zuraeima pa ?\n");
    let build = project.build_ok();
    assert_eq!(build.reason("corpus"), "`corpus/d.txt` added");
    std::fs::remove_file(project.path("corpus/d.txt")).unwrap();
    let build = project.build_ok();
    assert_eq!(build.ran(), set(&[]), "the earlier result is still cached");
}

#[test]
fn target_builds_only_what_it_needs_and_force_reruns_one_stage() {
    let project = TestProject::new(100);
    let build = project.build(&["--target", "corpus"]);
    assert_eq!(build.code, 0);
    assert_eq!(build.ran(), set(&["corpus"]));
    assert!(
        !project.path("dist").exists(),
        "a partial build leaves the output alone"
    );
    let build = project.build_ok();
    assert_eq!(build.ran(), set(&["tokenizer"]));
    let build = project.build(&["--force", "corpus"]);
    assert_eq!(build.code, 0);
    assert_eq!(
        build.ran(),
        set(&["corpus"]),
        "a forced stage with identical output leaves its dependents fresh"
    );
    assert_eq!(build.reason("corpus"), "forced by `--force`");
    let unknown = project.build(&["--target", "nope"]);
    assert_eq!(unknown.code, 2);
}

#[test]
fn graph_prints_the_plan() {
    let project = TestProject::new(10);
    let tree = String::from_utf8(project.symb(&["graph"]).stdout).unwrap();
    assert_eq!(tree, "corpus\n└── tokenizer\n");
    let dot = String::from_utf8(project.symb(&["graph", "--dot"]).stdout).unwrap();
    assert!(dot.contains("\"corpus\" -> \"tokenizer\";"), "{dot}");
    let mermaid = String::from_utf8(project.symb(&["graph", "--mermaid"]).stdout).unwrap();
    assert!(mermaid.contains("corpus --> tokenizer"), "{mermaid}");
}

#[test]
fn gc_keeps_what_the_plan_uses() {
    let project = TestProject::new(100);
    project.build_ok();
    project.edit("vocab_size = 400", "vocab_size = 420");
    project.build_ok();
    let dry = String::from_utf8(project.symb(&["gc", "--dry-run"]).stderr).unwrap();
    assert!(
        dry.contains("Would remove 1 action records, 1 blobs and 0 abandoned checkpoints"),
        "{dry}"
    );
    // A dry run lists what it would remove, by stage and artifact.
    assert!(
        dry.contains("Would remove the record of `tokenizer` (key ")
            && dry.contains("Would remove `tokenizer/"),
        "{dry}"
    );
    let gc = project.symb(&["gc"]);
    assert!(gc.status.success());
    assert_eq!(
        project.build_ok().ran(),
        set(&[]),
        "what the plan uses survives gc"
    );
    project.edit("vocab_size = 420", "vocab_size = 400");
    assert_eq!(
        project.build_ok().ran(),
        set(&["tokenizer"]),
        "what it did not use is gone"
    );
    let clean = project.symb(&["clean"]);
    assert!(clean.status.success());
    assert!(!project.path("dist").exists());
    assert_eq!(project.build_ok().ran(), set(&["corpus", "tokenizer"]));
}

#[test]
fn jsonl_and_csv_corpora_with_prompt_and_completion() {
    let project = TestProject::new(10);
    std::fs::remove_dir_all(project.path("corpus")).unwrap();
    let lines = common::demo_lines();
    let mut jsonl = String::new();
    let mut csv = String::from("prompt,completion,other\n");
    for pair in lines[..200].chunks(2) {
        jsonl.push_str(
            &serde_json::json!({"prompt": pair[0], "completion": pair[1], "id": 1}).to_string(),
        );
        jsonl.push('\n');
        csv.push_str(&format!(
            "\"{}\",\"{}\",x\n",
            pair[0].replace('"', "\"\""),
            pair[1].replace('"', "\"\"")
        ));
    }
    project.write("data/pairs.jsonl", &jsonl);
    project.write("data/pairs.csv", &csv);
    project.edit(
        "files = [\"corpus/*.txt\"]",
        "files = [\"data/*\"]\nprompt_field = \"prompt\"\ncompletion_field = \"completion\"",
    );
    let build = project.build_ok();
    assert_eq!(build.ran(), set(&["corpus", "tokenizer"]));
    project.edit(
        "completion_field = \"completion\"",
        "completion_field = \"answer\"",
    );
    let build = project.build(&[]);
    assert_eq!(build.code, 2, "{}", build.stderr);
    assert!(
        build
            .reason("corpus")
            .contains("`data/pairs.csv`: no column `answer` (columns: prompt, completion, other)"),
        "{}",
        build.reason("corpus")
    );
}

mod property {
    //! Random edit sequences: the incremental build's output equals a
    //! from-scratch build of the same inputs in a fresh cache.
    use super::common::{TestProject, snapshot};
    use proptest::prelude::*;
    use symb::engine::Silent;
    use symb::project::Project;

    #[derive(Debug, Clone)]
    enum Edit {
        VocabSize(u32),
        MinFrequency(u32),
        EvalFraction(u8),
        Seed(u8),
        PreTokenizer(u8),
        AppendLine(usize, usize),
        Comment,
    }

    fn edit() -> impl Strategy<Value = Edit> {
        prop_oneof![
            (300u32..420).prop_map(Edit::VocabSize),
            (1u32..4).prop_map(Edit::MinFrequency),
            (0u8..3).prop_map(Edit::EvalFraction),
            (0u8..3).prop_map(Edit::Seed),
            (0u8..3).prop_map(Edit::PreTokenizer),
            (0usize..3, 0usize..200).prop_map(|(f, l)| Edit::AppendLine(f, l)),
            Just(Edit::Comment),
        ]
    }

    #[derive(Debug, Clone)]
    struct Inputs {
        vocab_size: u32,
        min_frequency: u32,
        eval_fraction: u8,
        seed: u8,
        pre_tokenizer: u8,
        files: [String; 3],
        comments: usize,
    }

    impl Inputs {
        fn manifest(&self) -> String {
            let pre = ["byte_level", "metaspace", "whitespace"][self.pre_tokenizer as usize];
            let fraction = [0.0, 0.1, 0.3][self.eval_fraction as usize];
            format!(
                "{}[corpus]\nfiles = [\"corpus/*.txt\"]\neval_fraction = {fraction:?}\nseed = \
                    {}\n[tokenizer]\nvocab_size = {}\nmin_frequency = {}\npre_tokenizer = \
                    \"{pre}\"\n",
                "# a comment\n".repeat(self.comments),
                self.seed,
                self.vocab_size,
                self.min_frequency
            )
        }

        fn write(&self, project: &TestProject) {
            project.write("symb.toml", &self.manifest());
            for (name, text) in ["a", "b", "c"].iter().zip(&self.files) {
                project.write(&format!("corpus/{name}.txt"), text);
            }
        }

        fn apply(&mut self, edit: &Edit, pool: &[String]) {
            match *edit {
                Edit::VocabSize(v) => self.vocab_size = v,
                Edit::MinFrequency(v) => self.min_frequency = v,
                Edit::EvalFraction(v) => self.eval_fraction = v,
                Edit::Seed(v) => self.seed = v,
                Edit::PreTokenizer(v) => self.pre_tokenizer = v,
                Edit::AppendLine(file, line) => {
                    self.files[file].push_str(&pool[line]);
                    self.files[file].push('\n');
                }
                Edit::Comment => self.comments += 1,
            }
        }
    }

    fn build(project: &TestProject) -> Project {
        let opened = Project::open(&project.path("symb.toml"), &[]).expect("valid manifest");
        let report = opened
            .build(&Project::default_options(2), &Silent)
            .expect("the cache works");
        assert_eq!(report.outcome.failure(), None, "{:?}", report.outcome);
        opened
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 8, .. ProptestConfig::default() })]
        #[test]
        fn incremental_equals_from_scratch(edits in proptest::collection::vec(edit(), 1..5)) {
            let pool = super::common::demo_lines();
            let files = [0, 1, 2].map(|i| pool[i * 60..(i + 1) * 60].join("\n") + "\n");
            let mut inputs = Inputs { vocab_size: 350, min_frequency: 2, eval_fraction: 1, seed: 0, pre_tokenizer: 0, files, comments: 0 };
            let incremental = TestProject::new(1);
            inputs.write(&incremental);
            build(&incremental);
            for edit in &edits {
                inputs.apply(edit, &pool[1000..1200]);
                inputs.write(&incremental);
                build(&incremental);
                let reference = TestProject::new(1);
                inputs.write(&reference);
                build(&reference);
                prop_assert_eq!(snapshot(&incremental.path("dist")), snapshot(&reference.path("dist")), "after {:?}", edit);
            }
        }
    }
}

#[test]
fn a_no_op_build_leaves_the_output_folder_untouched() {
    let project = TestProject::new(50);
    project.build_ok();
    let before = snapshot(&project.path("dist"));
    let inode =
        std::os::unix::fs::MetadataExt::ino(&std::fs::metadata(project.path("dist")).unwrap());
    project.build_ok();
    assert_eq!(snapshot(&project.path("dist")), before);
    assert_eq!(
        std::os::unix::fs::MetadataExt::ino(&std::fs::metadata(project.path("dist")).unwrap()),
        inode
    );
}

#[test]
fn a_new_cache_salt_reruns_everything_with_the_reason() {
    let project = TestProject::new(50);
    project.build_ok();
    let salted = std::process::Command::new(common::BIN)
        .args(["build", "--json"])
        .current_dir(project.dir.path())
        .env("SYMB_CACHE_SALT", "2026-11")
        .output()
        .unwrap();
    let stdout = String::from_utf8(salted.stdout).unwrap();
    assert!(
        stdout.contains(
            r#""stage":"corpus","status":"ran","reason":"the cache salt changed `` -> `2026-11`""#
        ),
        "{stdout}"
    );
    assert!(
        stdout.contains(r#""stage":"tokenizer","status":"cached""#)
            || stdout.contains(r#""stage":"tokenizer","status":"ran""#)
    );
    assert!(
        !stdout.contains(r#""stage":"tokenizer","status":"cached""#),
        "the salt is in every key: {stdout}"
    );
}

/// Keys hold content, never where it lies: the same manifest in two folders,
/// its base model inside one project and outside the other, has the same
/// key for every stage (what lets a shared cache serve another checkout or
/// machine). The bundle aside: its inputs include the verify reports, which
/// record how long each check took.
#[test]
fn the_same_manifest_in_two_folders_has_the_same_keys() {
    let fixture = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tiny-gpt2");
    let manifest = |model: &str| {
        format!(
            "[project]\nname = \"t\"\n\n[corpus]\nfiles = [\"corpus/*.txt\"]\neval_fraction = \
                0.1\n\n[base]\nmodel = \"path:{model}\"\n\n[finetune]\nmethod = \
                \"lora\"\nbatch_size = 2\nblock_size = 16\nmax_steps = 2\n\n[export]\ntargets = \
                [\"fp32\"]\n"
        )
    };
    let copy_model = |to: &std::path::Path| {
        std::fs::create_dir_all(to).unwrap();
        for entry in std::fs::read_dir(&fixture).unwrap() {
            let entry = entry.unwrap();
            if entry.path().is_file() {
                std::fs::copy(entry.path(), to.join(entry.file_name())).unwrap();
            }
        }
    };
    let a = TestProject::with_manifest(&manifest("models/tiny"), 30);
    copy_model(&a.path("models/tiny"));
    let outside = tempfile::tempdir().unwrap();
    copy_model(&outside.path().join("elsewhere/gpt2"));
    let b = TestProject::with_manifest(
        &manifest(&outside.path().join("elsewhere/gpt2").display().to_string()),
        30,
    );
    let keys = |project: &TestProject| -> BTreeMap<String, String> {
        project.build_ok();
        let out = project.symb(&["status", "--json"]);
        let status: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        status["stages"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|s| s["stage"] != "bundle")
            .map(|s| {
                (
                    s["stage"].as_str().unwrap().to_string(),
                    s["key"].as_str().unwrap().to_string(),
                )
            })
            .collect()
    };
    let (keys_a, keys_b) = (keys(&a), keys(&b));
    assert_eq!(
        keys_a.keys().cloned().collect::<Vec<_>>(),
        [
            "base",
            "corpus",
            "export",
            "finetune",
            "merge",
            "reference",
            "verify.fp32",
            "verify.tokenizer",
            "web"
        ]
    );
    assert_eq!(keys_a, keys_b);
}
