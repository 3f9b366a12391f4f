//! The tokenizer stage against independent references: separate processes
//! (determinism), the `tokenizers` crate loading the artifact (round trip),
//! and the Python `tokenizers` library (same model, same ids).
#![allow(clippy::unwrap_used)] // a test: a panic is how it fails

mod common;

use std::process::Command;

use common::{TestProject, demo_lines};

const PRE_TOKENIZERS: [&str; 3] = ["byte_level", "whitespace", "metaspace"];

fn project(pre_tokenizer: &str, vocab_size: u32, lines: usize) -> TestProject {
    let project = TestProject::new(lines);
    project.edit(
        "pre_tokenizer = \"byte_level\"",
        &format!("pre_tokenizer = \"{pre_tokenizer}\""),
    );
    project.edit("vocab_size = 400", &format!("vocab_size = {vocab_size}"));
    project
}

/// The corpus documents as the corpus stage sees them.
fn corpus_lines(project: &TestProject) -> Vec<String> {
    ["a", "b", "c"]
        .iter()
        .flat_map(|n| {
            project
                .read(&format!("corpus/{n}.txt"))
                .lines()
                .map(|l| l.trim().to_string())
                .collect::<Vec<_>>()
        })
        .filter(|l| !l.is_empty())
        .collect()
}

fn python() -> Command {
    let check = Command::new("python3")
        .args(["-c", "import tokenizers"])
        .output()
        .expect("python3 runs");
    assert!(
        check.status.success(),
        "the Python tokenizers library is missing: python3 -m pip install -r tests/requirements.txt"
    );
    let mut command = Command::new("python3");
    command.env("TOKENIZERS_PARALLELISM", "true");
    command
}

#[test]
fn tokenizer_json_is_byte_identical_across_processes() {
    for pre_tokenizer in PRE_TOKENIZERS {
        let (first, second) = (
            project(pre_tokenizer, 1500, 1000),
            project(pre_tokenizer, 1500, 1000),
        );
        first.build_ok();
        second.build_ok();
        let (a, b) = (
            std::fs::read(first.path("dist/tokenizer.json")).unwrap(),
            std::fs::read(second.path("dist/tokenizer.json")).unwrap(),
        );
        assert!(
            a == b,
            "{pre_tokenizer}: two processes trained different tokenizers"
        );
        let json: serde_json::Value = serde_json::from_slice(&a).unwrap();
        assert!(
            json["model"]["merges"].as_array().unwrap().len() > 500,
            "{pre_tokenizer}: the test should train real merges"
        );
    }
}

#[test]
fn every_corpus_line_round_trips() {
    for pre_tokenizer in PRE_TOKENIZERS {
        let project = project(pre_tokenizer, 800, 700);
        project.build_ok();
        let tokenizer =
            tokenizers::Tokenizer::from_file(project.path("dist/tokenizer.json")).unwrap();
        let lines = corpus_lines(&project);
        assert_eq!(lines.len(), 2100);
        for line in &lines {
            let encoding = tokenizer.encode(line.as_str(), false).unwrap();
            assert!(
                encoding.len() < line.len(),
                "{pre_tokenizer}: merges should shorten {line:?}"
            );
            assert_eq!(
                &tokenizer.decode(encoding.get_ids(), false).unwrap(),
                line,
                "{pre_tokenizer}"
            );
        }
    }
}

#[test]
fn the_model_equals_what_python_tokenizers_trains() {
    let project = TestProject::new(1);
    let corpus = demo_lines().join("\n") + "\n";
    project.write("corpus/a.txt", &corpus);
    project.write("corpus/b.txt", "");
    project.write("corpus/c.txt", "");
    project.edit("eval_fraction = 0.1", "eval_fraction = 0.0");
    project.edit("vocab_size = 400", "vocab_size = 6000");
    project.build_ok();
    let ours: serde_json::Value =
        serde_json::from_str(&project.read("dist/tokenizer.json")).unwrap();

    let script = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/python/train_tokenizer.py"
    );
    let output = python()
        .args([
            script,
            project.path("corpus/a.txt").to_str().unwrap(),
            "6000",
            "2",
            "<|endoftext|>",
            "<pad>",
        ])
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let theirs: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(
        ours["model"]["vocab"].as_object().unwrap().len(),
        theirs["model"]["vocab"].as_object().unwrap().len()
    );
    assert!(
        ours["model"] == theirs["model"],
        "the vocab or merges differ from Python's"
    );
    assert_eq!(ours["added_tokens"], theirs["added_tokens"]);
    assert_eq!(ours["pre_tokenizer"], theirs["pre_tokenizer"]);
    assert_eq!(ours["decoder"]["type"], theirs["decoder"]["type"]);

    // Python loads our file and encodes the corpus to the same ids as Rust.
    let encode = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/python/encode.py");
    let output = python()
        .args([
            encode,
            project.path("dist/tokenizer.json").to_str().unwrap(),
            project.path("corpus/a.txt").to_str().unwrap(),
        ])
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let tokenizer = tokenizers::Tokenizer::from_file(project.path("dist/tokenizer.json")).unwrap();
    let python_ids: Vec<Vec<u32>> = String::from_utf8(output.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let lines: Vec<&str> = corpus.lines().collect();
    assert_eq!(python_ids.len(), lines.len());
    for (line, ids) in lines.iter().zip(&python_ids) {
        assert_eq!(
            tokenizer.encode(*line, false).unwrap().get_ids(),
            ids.as_slice(),
            "{line:?}"
        );
    }
}

#[test]
fn a_lossy_pre_tokenizer_is_reported_with_the_line() {
    let project = project("metaspace", 400, 50);
    // Metaspace marks spaces with `▁`, so a line that starts with `▁` comes back without it.
    project.write("corpus/c.txt", "▁Kan-ka zuraeima pa ?\n");
    let build = project.build(&[]);
    assert_eq!(build.code, 1);
    let reason = build.reason("tokenizer");
    assert!(reason.contains("does not round-trip 1 of"), "{reason}");
    assert!(
        reason.contains("\"▁Kan-ka zuraeima pa ?\" decodes to \"Kan-ka zuraeima pa ?\""),
        "{reason}"
    );
}

#[test]
fn the_recorded_tokenizers_version_is_the_one_built() {
    let lock = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/Cargo.lock")).unwrap();
    let version = lock
        .split("[[package]]")
        .find(|p| p.contains("name = \"tokenizers\"\n"))
        .and_then(|p| p.split("version = \"").nth(1))
        .and_then(|v| v.split('"').next());
    assert_eq!(
        version,
        Some(symb::stages::shared::TOKENIZERS_VERSION),
        "update TOKENIZERS_VERSION: it is part of every tokenizer key"
    );
}

/// Issue 34, test 1: symb renders the chat templates of the families it
/// supports (SmolLM2's ChatML, Llama 3.2's header ids with its date and
/// tools, TinyLlama's Zephyr) exactly as Python transformers'
/// `apply_chat_template` does: with and without a system message and the
/// generation prompt, on multi-turn conversations, with text that needs
/// trimming and non-ASCII words; and a template's own `raise_exception`
/// reaches the caller with its words.
#[test]
fn chat_templates_render_as_transformers_renders_them() {
    use symb::chat::{ChatTemplate, Message, Render};
    let fixtures = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/chat");
    let read = |name: &str| std::fs::read_to_string(fixtures.join(name)).unwrap();
    let templates = [
        (
            "smollm2",
            read("smollm2.jinja"),
            "<|im_start|>",
            "<|im_end|>",
        ),
        (
            "llama3_2",
            read("llama3_2.jinja"),
            "<|begin_of_text|>",
            "<|eot_id|>",
        ),
        ("zephyr", read("zephyr.jinja"), "<s>", "</s>"),
        (
            "raises",
            "{% for m in messages %}{% if m.role == 'system' %}\
            {{ raise_exception('no system messages, please') }}{% endif %}\
            {{ m.content.strip() + '|' }}{% endfor %}"
                .to_string(),
            "<s>",
            "</s>",
        ),
    ];
    let m = Message::new;
    let conversations = [
        vec![
            m("system", "Answer in Symbiotic.  "),
            m("user", " Kan-ka nouses-ni? "),
            m("assistant", "Ordo krishata, naistour pa.\nKa ŕo."),
            m("user", "And in English?"),
        ],
        vec![
            m("user", "Translate: the house"),
            m("assistant", "naistour"),
            m("user", "and the river?"),
            m("assistant", "  ŕiva  "),
        ],
        vec![m("user", "Hello")],
    ];
    let tools = serde_json::json!([{
        "type": "function",
        "function": {
            "name": "translate",
            "description": "Translate a text into Symbiotic",
            "parameters": {
                "type": "object",
                "properties": {"text": {"type": "string", "description": "the text"}},
                "required": ["text"]
            }
        }
    }]);
    let mut cases = Vec::new();
    for (name, template, bos, eos) in &templates {
        for messages in &conversations {
            for add_generation_prompt in [false, true] {
                let mut kwargs = vec![serde_json::Map::new()];
                if *name == "llama3_2" {
                    let mut dated = serde_json::Map::new();
                    dated.insert("date_string".into(), "01 Jan 2026".into());
                    let mut with_tools = serde_json::Map::new();
                    with_tools.insert("tools".into(), tools.clone());
                    with_tools.insert("tools_in_user_message".into(), false.into());
                    kwargs.extend([dated, with_tools]);
                }
                for kwargs in kwargs {
                    cases.push(serde_json::json!({
                        "name": name, "template": template, "messages": messages,
                        "add_generation_prompt": add_generation_prompt,
                        "bos_token": bos, "eos_token": eos, "kwargs": kwargs,
                    }));
                }
            }
        }
    }
    let file = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(file.path(), serde_json::to_vec(&cases).unwrap()).unwrap();
    let script =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/python/render_chat.py");
    // Python's `strftime_now` is the local time; symb's is UTC.
    let out = python()
        .env("TZ", "UTC")
        .arg(&script)
        .arg(file.path())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "render_chat.py (transformers: python3 -m pip install -r tests/requirements.txt): {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let python: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(python.len(), cases.len());
    let (mut rendered, mut raised) = (0, 0);
    for (case, theirs) in cases.iter().zip(&python) {
        let template = ChatTemplate::new(case["template"].as_str().unwrap()).unwrap();
        let messages: Vec<Message> = serde_json::from_value(case["messages"].clone()).unwrap();
        let options = Render {
            add_generation_prompt: case["add_generation_prompt"] == true,
            special_tokens: [
                (
                    "bos_token".to_string(),
                    case["bos_token"].as_str().unwrap().to_string(),
                ),
                (
                    "eos_token".to_string(),
                    case["eos_token"].as_str().unwrap().to_string(),
                ),
            ]
            .into(),
            extra: case["kwargs"].as_object().unwrap().clone(),
        };
        let ours = template.render(&messages, &options);
        let label = format!(
            "{} {} messages, generation prompt {}, {}",
            case["name"],
            messages.len(),
            options.add_generation_prompt,
            case["kwargs"]
        );
        match (&ours, theirs.get("text"), theirs.get("error")) {
            (Ok(text), Some(expected), _) => {
                assert_eq!(text, expected.as_str().unwrap(), "{label}");
                rendered += 1;
            }
            (Err(symb::chat::ChatError::Raised(message)), None, Some(error)) => {
                assert_eq!(message, error.as_str().unwrap(), "{label}");
                raised += 1;
            }
            _ => panic!("{label}: symb {ours:?}, transformers {theirs}"),
        }
    }
    eprintln!("{rendered} renderings equal transformers', {raised} refusals alike");
    assert!(rendered >= 30 && raised >= 2, "{rendered} {raised}");
}

/// Issue 34: the tokens that train are found by rendering. Each assistant
/// message's span is its content as the template writes it (Llama 3.2 trims
/// it) through the end-of-turn token that closes it, and nothing of the
/// role headers, the system or the user turns; a conversation that opens
/// with the assistant is refused.
#[test]
fn assistant_spans_are_the_assistant_turns_and_their_end_of_turn() {
    use symb::chat::{ChatError, ChatTemplate, Message, Render};
    let fixtures = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/chat");
    let m = Message::new;
    let conversation = [
        m("system", "Answer in Symbiotic."),
        m("user", "Kan-ka nouses-ni?"),
        m("assistant", " Ordo krishata, naistour pa.\nKa ŕo. "),
        m("user", "And the river?"),
        m("assistant", "ŕiva"),
    ];
    for (file, bos, eot, trims) in [
        ("smollm2.jinja", "<|im_start|>", "<|im_end|>", false),
        ("llama3_2.jinja", "<|begin_of_text|>", "<|eot_id|>", true),
        ("zephyr.jinja", "<s>", "</s>", false),
    ] {
        let template =
            ChatTemplate::new(&std::fs::read_to_string(fixtures.join(file)).unwrap()).unwrap();
        let options = Render {
            special_tokens: [
                ("bos_token".to_string(), bos.to_string()),
                ("eos_token".to_string(), eot.to_string()),
            ]
            .into(),
            ..Render::default()
        };
        let rendered = template
            .render_for_training(&conversation, &options, eot)
            .unwrap();
        assert_eq!(
            rendered.text,
            template.render(&conversation, &options).unwrap(),
            "{file}"
        );
        let spans: Vec<&str> = rendered
            .assistant
            .iter()
            .map(|r| &rendered.text[r.clone()])
            .collect();
        let expected: Vec<String> = conversation
            .iter()
            .filter(|m| m.role == "assistant")
            .map(|m| {
                let content = if trims { m.content.trim() } else { &m.content };
                format!("{content}{eot}")
            })
            .collect();
        assert_eq!(spans, expected, "{file}");
        // What does not train: the rest, with every other turn in it whole.
        let mut rest = rendered.text.clone();
        for range in rendered.assistant.iter().rev() {
            rest.replace_range(range.clone(), "|");
        }
        for turn in conversation.iter().filter(|m| m.role != "assistant") {
            assert!(rest.contains(&turn.content), "{file}: {rest:?}");
        }
        assert!(
            !rest.contains("krishata") && !rest.contains("ŕiva"),
            "{file}: {rest:?}"
        );
        let opening = template.render_for_training(&conversation[2..3], &options, eot);
        assert!(
            matches!(opening, Err(ChatError::Turns(_))),
            "{file}: {opening:?}"
        );
    }
}
