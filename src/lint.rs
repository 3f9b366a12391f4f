//! The output folder against what transformers.js v4 requires to load it:
//! file names per dtype, config.json, the tokenizer files, and each ONNX
//! graph's inputs and outputs. `symb build` runs it on the new folder before
//! swapping it in; `symb lint FOLDER` runs it on any folder.

use std::path::Path;

use serde::Serialize;

use crate::onnx::proto::{self, tensor_proto::DataType};

/// One problem, in the file it is in.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Finding {
    /// The file, relative to the folder.
    pub file: String,
    pub message: String,
}

impl std::fmt::Display for Finding {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.file, self.message)
    }
}

/// The key that holds the layer count, per `model_type`.
fn layer_key(model_type: &str) -> &'static str {
    match model_type {
        "gpt2" | "gpt_neo" | "gptj" | "codegen" => "n_layer",
        _ => "num_hidden_layers",
    }
}

/// The KV cache's `(heads, head_dim)` as transformers.js computes them from
/// a config to feed an empty cache: GPT-2's `n_head` and `n_embd / n_head`;
/// otherwise `num_key_value_heads` (else `num_attention_heads`) and
/// `head_dim` (else `hidden_size / num_attention_heads`).
fn cache_shape(config: &serde_json::Value) -> Option<(&'static str, u64, u64)> {
    let get = |key: &str| config[key].as_u64();
    if config["model_type"] == "gpt2" {
        let heads = get("n_head").filter(|&h| h > 0)?;
        return Some(("n_head", heads, get("n_embd")? / heads));
    }
    let heads = get("num_attention_heads").filter(|&h| h > 0)?;
    let (key, kv) = match get("num_key_value_heads") {
        Some(kv) => ("num_key_value_heads", kv),
        None => ("num_attention_heads", heads),
    };
    Some((
        key,
        kv,
        get("head_dim").or_else(|| Some(get("hidden_size")? / heads))?,
    ))
}

/// Every problem found in `folder` (empty: transformers.js can load it).
pub fn lint(folder: &Path) -> Vec<Finding> {
    let mut findings = Vec::new();
    let mut add = |file: &str, message: String| {
        findings.push(Finding {
            file: file.to_string(),
            message,
        })
    };
    let read_json = |name: &str| -> Result<serde_json::Value, String> {
        let path = folder.join(name);
        let text = std::fs::read_to_string(&path).map_err(|e| {
            if e.kind() == std::io::ErrorKind::NotFound {
                "is missing".to_string()
            } else {
                format!("cannot be read: {e}")
            }
        })?;
        serde_json::from_str(&text).map_err(|e| format!("is not valid JSON: {e}"))
    };

    // config.json
    let config = read_json("config.json")
        .map_err(|e| {
            add(
                "config.json",
                format!("{e}; transformers.js reads the model type and layer count from it"),
            )
        })
        .ok();
    let mut layers = None;
    let mut cache = None;
    // (where transformers.js reads it, the dtype)
    let mut dtypes: Vec<(String, String)> = Vec::new();
    let mut external = serde_json::Map::new();
    if let Some(config) = &config {
        match config["model_type"].as_str() {
            None => add(
                "config.json",
                "has no `model_type`: transformers.js picks the model class by it".into(),
            ),
            Some(model_type) => {
                let key = layer_key(model_type);
                match config[key].as_u64() {
                    Some(n) => layers = Some((key, n)),
                    None => add(
                        "config.json",
                        format!(
                            "has no `{key}`: transformers.js sizes the KV cache of a `{model_type}` model by it"
                        ),
                    ),
                }
            }
        }
        cache = cache_shape(config);
        for key in ["bos_token_id", "eos_token_id"] {
            if config.get(key).is_none() {
                add(
                    "config.json",
                    format!("has no `{key}`: generation needs it"),
                );
            }
        }
        let js = &config["transformers.js_config"];
        let per_device = js
            .get("device_config")
            .and_then(serde_json::Value::as_object)
            .into_iter()
            .flatten()
            .map(|(device, c)| (format!("device_config.{device}.dtype"), c.get("dtype")));
        for (key, d) in std::iter::once(("dtype".to_string(), js.get("dtype"))).chain(per_device) {
            match d.map(serde_json::Value::as_str) {
                None => {}
                Some(Some(d)) => dtypes.push((key, d.to_string())),
                Some(None) => add(
                    "config.json",
                    format!("`transformers.js_config.{key}` is not a string"),
                ),
            }
        }
        if let Some(map) = js.get("use_external_data_format") {
            match map.as_object() {
                Some(map) => external = map.clone(),
                None if map.as_bool() == Some(false) => {}
                None => add(
                    "config.json",
                    "`transformers.js_config.use_external_data_format` \
                    should map each file to its chunk count"
                        .into(),
                ),
            }
        }
    }

    // onnx/: names, and each graph.
    let onnx = folder.join("onnx");
    let mut present = Vec::new();
    match std::fs::read_dir(&onnx) {
        Err(_) => add("onnx/", "is missing: there is no model to load".into()),
        Ok(entries) => {
            let mut names: Vec<String> = entries
                .flatten()
                .filter_map(|e| e.file_name().to_str().map(str::to_string))
                .collect();
            names.sort();
            for name in &names {
                if let Some(dtype) = crate::dtype::Dtype::from_file_name(name) {
                    present.push((dtype.name().to_string(), name.clone()));
                } else if name.ends_with(".onnx") {
                    let expected: Vec<&str> = crate::dtype::Dtype::ALL
                        .map(crate::dtype::Dtype::file_name)
                        .to_vec();
                    add(
                        &format!("onnx/{name}"),
                        format!(
                            "is not a name transformers.js loads: a dtype's file is one of {}",
                            expected.join(", ")
                        ),
                    );
                } else if !names
                    .iter()
                    .any(|n| n.ends_with(".onnx") && name.starts_with(&format!("{n}_data")))
                {
                    add(
                        &format!("onnx/{name}"),
                        "belongs to no ONNX file in the folder".into(),
                    );
                }
            }
        }
    }
    for (key, d) in &dtypes {
        if !present.iter().any(|(p, _)| p == d) {
            let have: Vec<&str> = present.iter().map(|(d, _)| d.as_str()).collect();
            add(
                "config.json",
                format!(
                    "`transformers.js_config.{key}` is `{d}`, but onnx/ has no file for it (it has: {})",
                    have.join(", ")
                ),
            );
        }
    }
    for (file, chunks) in &external {
        let chunks = chunks.as_u64().unwrap_or(0) as usize;
        for i in 0..chunks {
            let data = crate::onnx::external::data_file_name(file, i);
            if !onnx.join(&data).is_file() {
                add(
                    &format!("onnx/{data}"),
                    format!("is missing: config.json says `{file}` has {chunks} data file(s)"),
                );
            }
        }
    }
    for (_, name) in &present {
        let label = format!("onnx/{name}");
        match crate::onnx::read_model(&onnx.join(name)) {
            Err(e) => add(&label, format!("cannot be read: {e}")),
            Ok(model) => lint_graph(&model, name, (layers, cache), &external, &mut |m| {
                add(&label, m)
            }),
        }
    }

    // The tokenizer files.
    match read_json("tokenizer.json") {
        Err(e) => add("tokenizer.json", e),
        Ok(t) => {
            for key in [
                "normalizer",
                "pre_tokenizer",
                "model",
                "post_processor",
                "decoder",
            ] {
                if t.get(key).is_none() {
                    add(
                        "tokenizer.json",
                        format!(
                            "has no `{key}` key (transformers.js expects all five components, null when unused)"
                        ),
                    );
                }
            }
            if !t["added_tokens"].is_array() {
                add("tokenizer.json", "`added_tokens` is not an array".into());
            }
            let model = &t["model"];
            if model["type"] == "BPE" && !model["merges"].is_array() {
                add("tokenizer.json", "a BPE model without `merges`".into());
            }
            if let Some(unk) = model["unk_token"].as_str()
                && model["vocab"].get(unk).is_none()
            {
                add(
                    "tokenizer.json",
                    format!("`model.unk_token` is `{unk}`, which is not in the vocabulary"),
                );
            }
            // What transformers.js reads and ignores: it would tokenize
            // otherwise than Python and symb.
            let single_word: Vec<&str> = t["added_tokens"]
                .as_array()
                .into_iter()
                .flatten()
                .filter(|a| a["single_word"] == true)
                .filter_map(|a| a["content"].as_str())
                .collect();
            if let Some(first) = single_word.first() {
                add(
                    "tokenizer.json",
                    format!(
                        "{} added tokens have `single_word` (`{first}`, ...), which \
                            transformers.js ignores: it matches them inside words too, and gives \
                            other ids than Python",
                        single_word.len()
                    ),
                );
            }
            if t["pre_tokenizer"].to_string().contains(r#""split":true"#)
                && t["pre_tokenizer"].to_string().contains("Metaspace")
            {
                add(
                    "tokenizer.json",
                    "a `Metaspace` pre-tokenizer with `split: true`, which \
                    transformers.js ignores: it would see the text as one piece and give other ids \
                    than Python"
                        .into(),
                );
            }
        }
    }
    match read_json("tokenizer_config.json") {
        Err(e) => add(
            "tokenizer_config.json",
            format!("{e}; transformers.js needs it to build the tokenizer"),
        ),
        Ok(t) => {
            if !t["tokenizer_class"].is_string() {
                add("tokenizer_config.json", "has no `tokenizer_class`".into());
            }
            // PreTrainedTokenizerFast's default inputs include token type ids,
            // which a decoder takes as an embedding to add (GPT-2's `wte[0]`).
            let names = t["model_input_names"]
                .as_array()
                .map(|names| names.iter().filter_map(|n| n.as_str()).collect::<Vec<_>>());
            if t["tokenizer_class"] == "PreTrainedTokenizerFast"
                && names.as_ref().is_none_or(|n| n.contains(&"token_type_ids"))
            {
                add(
                    "tokenizer_config.json",
                    "`model_input_names` is missing or names `token_type_ids`: Python's \
                        AutoTokenizer would return token type ids, which the model does not take; \
                        write [\"input_ids\", \"attention_mask\"]"
                        .into(),
                );
            }
            for key in ["bos_token", "eos_token", "unk_token", "pad_token"] {
                if let Some(v) = t.get(key)
                    && !(v.is_string() || v.is_null())
                {
                    add(
                        "tokenizer_config.json",
                        format!("`{key}` is not a plain string"),
                    );
                }
            }
            if t["clean_up_tokenization_spaces"] == true {
                add(
                    "tokenizer_config.json",
                    "`clean_up_tokenization_spaces` is true: decoding \
                    would change the text (\" .\" becomes \".\")"
                        .into(),
                );
            }
        }
    }
    findings
}

fn elem_type(v: &proto::ValueInfoProto) -> Option<i32> {
    match v.r#type.as_ref()?.value.as_ref()? {
        proto::type_proto::Value::TensorType(t) => t.elem_type,
        _ => None,
    }
}

fn dims(v: &proto::ValueInfoProto) -> Vec<Option<i64>> {
    use proto::tensor_shape_proto::dimension::Value;
    match v.r#type.as_ref().and_then(|t| t.value.as_ref()) {
        Some(proto::type_proto::Value::TensorType(t)) => {
            t.shape.as_ref().map_or_else(Vec::new, |s| {
                s.dim
                    .iter()
                    .map(|d| match d.value {
                        Some(Value::DimValue(n)) => Some(n),
                        _ => None,
                    })
                    .collect()
            })
        }
        _ => Vec::new(),
    }
}

/// What config.json says of the graph: its layer count (and the key), and
/// its cache's heads (and the key) and head size.
type ConfigShape<'a> = (Option<(&'a str, u64)>, Option<(&'static str, u64, u64)>);

fn lint_graph(
    model: &proto::ModelProto,
    name: &str,
    (layers, cache): ConfigShape<'_>,
    external: &serde_json::Map<String, serde_json::Value>,
    add: &mut dyn FnMut(String),
) {
    let Some(g) = &model.graph else {
        return add("has no graph".into());
    };
    let input = |n: &str| g.input.iter().find(|i| i.name.as_deref() == Some(n));
    for (id, required) in [
        ("input_ids", true),
        ("attention_mask", true),
        ("position_ids", false),
    ] {
        match input(id) {
            None if required => add(format!("has no `{id}` input")),
            None => {}
            Some(v) if elem_type(v) != Some(DataType::Int64 as i32) => {
                let ty = elem_type(v)
                    .and_then(|t| DataType::try_from(t).ok())
                    .map_or("an unknown type".to_string(), |t| {
                        format!("{t:?}").to_lowercase()
                    });
                add(format!("`{id}` is {ty}; transformers.js feeds int64"));
            }
            Some(_) => {}
        }
    }
    match g.output.first().and_then(|o| o.name.as_deref()) {
        Some("logits") => {}
        other => add(format!(
            "the first output is `{}`, not `logits`: transformers.js reads the logits by that name",
            other.unwrap_or("(none)")
        )),
    }
    let pasts: Vec<&proto::ValueInfoProto> = g
        .input
        .iter()
        .filter(|i| {
            i.name
                .as_deref()
                .is_some_and(|n| n.starts_with("past_key_values."))
        })
        .collect();
    let presents = g
        .output
        .iter()
        .filter(|o| o.name.as_deref().is_some_and(|n| n.starts_with("present.")))
        .count();
    if pasts.len() != presents {
        add(format!(
            "{} `past_key_values.*` inputs but {presents} `present.*` outputs",
            pasts.len()
        ));
    }
    for past in &pasts {
        let d = dims(past);
        let past_name = past.name.as_deref().unwrap_or("");
        if d.len() != 4 || d[1].is_none() || d[3].is_none() {
            add(format!(
                "`{past_name}` should be [batch_size, heads, past_sequence_length, head_dim] with \
                    numeric heads and head_dim"
            ));
            break;
        }
        if let Some((key, heads, head_dim)) = cache
            && (d[1] != Some(heads as i64) || d[3] != Some(head_dim as i64))
        {
            let (h, hd) = (d[1].unwrap_or(0), d[3].unwrap_or(0));
            add(format!(
                "`{past_name}` holds {h} heads of {hd}, but config.json gives {heads} (`{key}`) of \
                    {head_dim}: transformers.js would feed an empty cache of the config's shape"
            ));
            break;
        }
    }
    let graph_layers = pasts.len() / 2;
    if let Some((key, n)) = layers
        && !pasts.is_empty()
        && n as usize != graph_layers
    {
        add(format!(
            "the graph has {graph_layers} layers of KV cache, but config.json says `{key}` = {n}: \
                transformers.js would feed {} past inputs",
            2 * n
        ));
    }
    let external_tensors = g
        .initializer
        .iter()
        .filter(|t| t.data_location == Some(proto::tensor_proto::DataLocation::External as i32))
        .count();
    if external_tensors > 0 && !external.contains_key(name) {
        add(format!(
            "keeps {external_tensors} tensors in external data, but config.json's \
                `transformers.js_config.use_external_data_format` does not name it"
        ));
    }
}
