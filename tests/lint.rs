//! `symb lint`: the folder checks that transformers.js needs, on a converted
//! fixture and on copies of it broken one way each (issue 5, test 3).
#![allow(clippy::unwrap_used)] // a test: a panic is how it fails

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use prost::Message;
use symb::onnx::proto;

fn fixture() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tiny-gpt2")
}

/// The fixture converted to fp32 and q4 (built once per test).
fn converted() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("symb.toml"),
        format!(
            "[project]\nname = \
        \"convert\"\n\n[base]\nmodel = \"path:{}\"\n\n[export]\ntargets = [\"fp32\", \
        \"q4\"]\n",
            fixture().display()
        ),
    )
    .unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_symb"))
        .arg("build")
        .current_dir(dir.path())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    dir
}

fn lint(folder: &Path) -> (i32, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_symb"))
        .arg("lint")
        .arg(folder)
        .output()
        .unwrap();
    (
        out.status.code().unwrap(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A copy of `dist` changed by `edit`.
fn broken(dist: &Path, edit: impl FnOnce(&Path)) -> tempfile::TempDir {
    let copy = tempfile::tempdir().unwrap();
    for entry in common::walk(dist) {
        let to = copy.path().join(entry.strip_prefix(dist).unwrap());
        std::fs::create_dir_all(to.parent().unwrap()).unwrap();
        std::fs::copy(&entry, &to).unwrap();
    }
    edit(copy.path());
    copy
}

fn edit_graph(path: &Path, edit: impl FnOnce(&mut proto::GraphProto)) {
    let mut model = proto::ModelProto::decode(std::fs::read(path).unwrap().as_slice()).unwrap();
    edit(model.graph.as_mut().unwrap());
    std::fs::write(path, model.encode_to_vec()).unwrap();
}

#[test]
fn a_built_folder_passes_and_each_defect_is_named() {
    let project = converted();
    let dist = project.path().join("dist");
    let (code, stderr) = lint(&dist);
    assert_eq!(code, 0, "{stderr}");
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dist.join("config.json")).unwrap()).unwrap();
    assert_eq!(
        config["transformers.js_config"]["dtype"], "fp32",
        "a dtype the folder has (not the browsers' q8 default), and not 4-bit, slow in WebAssembly"
    );
    let tokenizer_config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dist.join("tokenizer_config.json")).unwrap())
            .unwrap();
    assert_eq!(tokenizer_config["clean_up_tokenization_spaces"], false);
    assert_eq!(
        tokenizer_config["model_input_names"],
        serde_json::json!(["input_ids", "attention_mask"])
    );

    type Case<'a> = (&'a str, Box<dyn FnOnce(&Path)>, &'a str);
    let cases: Vec<Case> = vec![
        (
            "a missing tokenizer_config.json",
            Box::new(|d: &Path| std::fs::remove_file(d.join("tokenizer_config.json")).unwrap()),
            "tokenizer_config.json: is missing",
        ),
        (
            "int32 input_ids",
            Box::new(|d: &Path| {
                edit_graph(&d.join("onnx/model.onnx"), |g| {
                    let input = g
                        .input
                        .iter_mut()
                        .find(|i| i.name.as_deref() == Some("input_ids"))
                        .unwrap();
                    if let Some(proto::type_proto::Value::TensorType(t)) =
                        input.r#type.as_mut().unwrap().value.as_mut()
                    {
                        t.elem_type = Some(proto::tensor_proto::DataType::Int32 as i32);
                    }
                })
            }),
            "onnx/model.onnx: `input_ids` is int32; transformers.js feeds int64",
        ),
        (
            "an output named other than logits",
            Box::new(|d: &Path| {
                edit_graph(&d.join("onnx/model_q4.onnx"), |g| {
                    g.output[0].name = Some("scores".into());
                    for node in g.node.iter_mut() {
                        for o in node.output.iter_mut().filter(|o| *o == "logits") {
                            *o = "scores".into();
                        }
                    }
                })
            }),
            "onnx/model_q4.onnx: the first output is `scores`, not `logits`",
        ),
        (
            "a config whose layer count is below the graph's",
            Box::new(|d: &Path| {
                let path = d.join("config.json");
                let mut config: serde_json::Value =
                    serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
                config["n_layer"] = 1.into();
                std::fs::write(&path, config.to_string()).unwrap();
            }),
            "the graph has 2 layers of KV cache, but config.json says `n_layer` = 1",
        ),
        (
            "a tokenizer_config.json without model_input_names (Python's AutoTokenizer then returns token_type_ids)",
            Box::new(|d: &Path| {
                let path = d.join("tokenizer_config.json");
                let mut config: serde_json::Value =
                    serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
                config.as_object_mut().unwrap().remove("model_input_names");
                std::fs::write(&path, config.to_string()).unwrap();
            }),
            "tokenizer_config.json: `model_input_names` is missing or names `token_type_ids`",
        ),
        (
            "an added token with single_word (transformers.js matches it inside words too)",
            Box::new(|d: &Path| {
                let path = d.join("tokenizer.json");
                let mut tokenizer: serde_json::Value =
                    serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
                let id = tokenizer["model"]["vocab"]["ou"].clone();
                tokenizer["added_tokens"]
                    .as_array_mut()
                    .unwrap()
                    .push(serde_json::json!({"id": id, "content": "ou", "single_word": true, "lstrip": false, "rstrip": false, "normalized": false, "special": false}));
                std::fs::write(&path, tokenizer.to_string()).unwrap();
            }),
            "tokenizer.json: 1 added tokens have `single_word` (`ou`, ...), which transformers.js ignores",
        ),
        (
            "a dtype file named wrongly",
            Box::new(|d: &Path| {
                std::fs::rename(d.join("onnx/model_q4.onnx"), d.join("onnx/model_4bit.onnx"))
                    .unwrap()
            }),
            "onnx/model_4bit.onnx: is not a name transformers.js loads",
        ),
    ];
    for (what, edit, expected) in cases {
        let copy = broken(&dist, edit);
        let (code, stderr) = lint(copy.path());
        assert_eq!(code, 1, "{what}: {stderr}");
        assert!(
            stderr.contains(expected),
            "{what}: expected `{expected}` in:\n{stderr}"
        );
    }
    // A renamed file leaves the config's dtype without a file.
    let copy = broken(&dist, |d| {
        std::fs::rename(d.join("onnx/model.onnx"), d.join("onnx/model_full.onnx")).unwrap()
    });
    assert!(lint(copy.path()).1.contains(
        "`transformers.js_config.dtype` is `fp32`, but onnx/ has no file for it (it has: q4)"
    ));
    // And the WebGPU dtype (transformers.js_config.device_config.webgpu).
    let copy = broken(&dist, |d| {
        std::fs::remove_file(d.join("onnx/model_q4.onnx")).unwrap()
    });
    assert!(
        lint(copy.path()).1.contains(
            "`transformers.js_config.device_config.webgpu.dtype` is \
        `q4`, but onnx/ has no file for it (it has: fp32)"
        ),
        "{}",
        lint(copy.path()).1
    );
}

/// A Llama-family folder (grouped-query cache: 2 key-value heads of 16) lints
/// clean, and a config whose `num_key_value_heads` or `head_dim` disagrees
/// with the graph's cache is named: transformers.js would feed an empty
/// cache of the config's shape.
#[test]
fn the_kv_heads_and_head_dim_of_the_config_must_match_the_cache() {
    let dir = tempfile::tempdir().unwrap();
    let llama = fixture().with_file_name("tiny-llama");
    std::fs::write(
        dir.path().join("symb.toml"),
        format!(
            "[project]\nname = \
        \"convert\"\n\n[base]\nmodel = \"path:{}\"\n\n[export]\ntargets = \
        [\"fp32\"]\n",
            llama.display()
        ),
    )
    .unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_symb"))
        .arg("build")
        .current_dir(dir.path())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let dist = dir.path().join("dist");
    let (code, stderr) = lint(&dist);
    assert_eq!(code, 0, "{stderr}");
    for (from, to, expected) in [
        (
            "\"num_key_value_heads\": 2",
            "\"num_key_value_heads\": 4",
            "holds 2 heads of 16, but config.json gives 4 (`num_key_value_heads`) of 16",
        ),
        (
            "\"head_dim\": 16",
            "\"head_dim\": 32",
            "holds 2 heads of 16, but config.json gives 2 (`num_key_value_heads`) of 32",
        ),
    ] {
        let copy = broken(&dist, |d| {
            let text = std::fs::read_to_string(d.join("config.json")).unwrap();
            assert!(text.contains(from), "{from} in {text}");
            std::fs::write(d.join("config.json"), text.replace(from, to)).unwrap();
        });
        let (code, stderr) = lint(copy.path());
        assert_eq!(code, 1, "{stderr}");
        assert!(stderr.contains(expected), "{stderr}");
    }
}
