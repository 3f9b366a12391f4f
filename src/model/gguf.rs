//! A GGUF file (llama.cpp's format) as a Hugging Face model folder: the
//! weights dequantized to float32 under transformers' names, `config.json`
//! from the file's `<arch>.*` metadata, and `tokenizer.json` built from its
//! `tokenizer.ggml.*` metadata so that it tokenizes as the model's own
//! Hugging Face tokenizer does.
//!
//! candle reads the file and dequantizes its blocks (Q4_0, Q4_1, Q8_0, the
//! K-quants, F16, F32, ...). What is decided here:
//! - names: llama.cpp's `blk.N.attn_q.weight` is `model.layers.N.self_attn.q_proj.weight`;
//! - Llama's query and key rows: llama.cpp's converter reorders them for its
//!   rotary kernel (`permute` in `convert_hf_to_gguf.py`), so they are put
//!   back as transformers' GGUF loader does (`reverse_permute_weights`);
//!   Qwen2's converter does not reorder them;
//! - the pre-tokenizer: `tokenizer.ggml.pre` names the regular expressions
//!   llama.cpp splits text with (`llama-vocab.cpp`), and each name symb reads
//!   maps to the `tokenizer.json` pre-tokenizer of the models that carry it.
//!   transformers' own GGUF tokenizer conversion gets `smollm` wrong (it
//!   does not split digits one by one, and it adds a BOS the file says not
//!   to add); this reading follows the file.

use std::collections::BTreeMap;
use std::path::Path;

use candle_core::quantized::gguf_file::{Content, Value};
use candle_core::{Device, Tensor};
use serde_json::json;

use super::{ModelError, Result};

/// Whether most of the matrices of the GGUF file at `path` are stored in
/// Q4_1 (per block of 32 along the input: `d * q + m`, q from 0 to 15,
/// the block's least value at 0 and its largest at 15), which affine 4-bit
/// blocks hold exactly. Reads the header only; a file it cannot read is
/// not (the base stage reports why).
pub fn stored_in_q4_1(path: &Path) -> bool {
    let Ok(mut file) = std::fs::File::open(path) else {
        return false;
    };
    let Ok(content) = Content::read(&mut file) else {
        return false;
    };
    let matrices: Vec<_> = content
        .tensor_infos
        .values()
        .filter(|t| t.shape.dims().len() == 2)
        .collect();
    let q4_1 = matrices
        .iter()
        .filter(|t| t.ggml_dtype == candle_core::quantized::GgmlDType::Q4_1)
        .count();
    2 * q4_1 > matrices.len()
}

/// A GGUF file read into a Hugging Face layout.
pub struct Converted {
    /// `config.json`.
    pub config: serde_json::Value,
    /// `generation_config.json`.
    pub generation_config: serde_json::Value,
    /// `tokenizer.json`.
    pub tokenizer: serde_json::Value,
    /// `tokenizer_config.json`: the special tokens and the chat template.
    pub tokenizer_config: serde_json::Value,
    /// The weights, float32, under transformers' names.
    pub tensors: BTreeMap<String, Tensor>,
    /// What the file stored the weights as (`Q4_1: 210, F32: 61, ...`).
    pub storage: BTreeMap<String, usize>,
}

/// The architectures (`general.architecture`) symb reads, with the
/// `model_type` they become.
const ARCHITECTURES: [(&str, &str); 2] = [("llama", "llama"), ("qwen2", "qwen2")];

struct Reader<'a> {
    path: &'a Path,
    content: Content,
}

impl Reader<'_> {
    fn error(&self, message: impl std::fmt::Display) -> ModelError {
        ModelError::Config(format!("`{}`: {message}", self.path.display()))
    }

    fn get(&self, key: &str) -> Option<&Value> {
        self.content.metadata.get(key)
    }

    fn u64(&self, key: &str) -> Result<Option<u64>> {
        let Some(value) = self.get(key) else {
            return Ok(None);
        };
        let n = match value {
            Value::U8(v) => *v as u64,
            Value::U16(v) => *v as u64,
            Value::U32(v) => *v as u64,
            Value::U64(v) => *v,
            Value::I8(v) if *v >= 0 => *v as u64,
            Value::I16(v) if *v >= 0 => *v as u64,
            Value::I32(v) if *v >= 0 => *v as u64,
            Value::I64(v) if *v >= 0 => *v as u64,
            other => return Err(self.error(format!("metadata `{key}` is {other:?}, not a count"))),
        };
        Ok(Some(n))
    }

    fn required(&self, key: &str) -> Result<u64> {
        self.u64(key)?
            .ok_or_else(|| self.error(format!("metadata `{key}` is missing")))
    }

    fn f64(&self, key: &str) -> Result<Option<f64>> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::F32(v)) => Ok(Some(*v as f64)),
            Some(Value::F64(v)) => Ok(Some(*v)),
            Some(other) => Err(self.error(format!("metadata `{key}` is {other:?}, not a number"))),
        }
    }

    fn bool(&self, key: &str) -> Result<Option<bool>> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::Bool(v)) => Ok(Some(*v)),
            Some(other) => {
                Err(self.error(format!("metadata `{key}` is {other:?}, not true or false")))
            }
        }
    }

    fn string(&self, key: &str) -> Result<Option<&str>> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s)),
            Some(other) => Err(self.error(format!("metadata `{key}` is {other:?}, not a string"))),
        }
    }

    fn strings(&self, key: &str) -> Result<Vec<&str>> {
        match self.get(key) {
            Some(Value::Array(items)) => items
                .iter()
                .map(|v| {
                    v.to_string().map(String::as_str).map_err(|_| {
                        self.error(format!(
                            "metadata `{key}` holds a value that is not a string"
                        ))
                    })
                })
                .collect(),
            Some(_) => Err(self.error(format!("metadata `{key}` is not a list"))),
            None => Err(self.error(format!("metadata `{key}` is missing"))),
        }
    }

    fn ints(&self, key: &str) -> Result<Option<Vec<i64>>> {
        match self.get(key) {
            Some(Value::Array(items)) => items
                .iter()
                .map(|v| match v {
                    Value::I32(x) => Ok(*x as i64),
                    Value::U32(x) => Ok(*x as i64),
                    Value::I8(x) => Ok(*x as i64),
                    Value::U8(x) => Ok(*x as i64),
                    _ => Err(self.error(format!(
                        "metadata `{key}` holds a value that is not an integer"
                    ))),
                })
                .collect::<Result<Vec<_>>>()
                .map(Some),
            Some(_) => Err(self.error(format!("metadata `{key}` is not a list"))),
            None => Ok(None),
        }
    }
}

/// Reads the GGUF file at `path`.
pub fn read(path: &Path) -> Result<Converted> {
    let mut file = std::fs::File::open(path).map_err(|e| ModelError::io(path, e))?;
    let content = Content::read(&mut file).map_err(|e| {
        ModelError::Config(format!(
            "`{}` is not a GGUF file symb can read: {}",
            path.display(),
            super::candle_message(&e)
        ))
    })?;
    let r = Reader { path, content };
    let arch = r
        .string("general.architecture")?
        .ok_or_else(|| r.error("metadata `general.architecture` is missing"))?
        .to_string();
    let Some(&(_, model_type)) = ARCHITECTURES.iter().find(|(a, _)| *a == arch) else {
        let known = ARCHITECTURES.map(|(a, _)| format!("\"{a}\"")).join(", ");
        return Err(ModelError::Unsupported(format!(
            "`{}`: the GGUF architecture \"{arch}\" is not one symb reads ({known})",
            path.display()
        )));
    };
    let key = |name: &str| format!("{arch}.{name}");
    let hidden = r.required(&key("embedding_length"))?;
    let layers = r.required(&key("block_count"))?;
    let heads = r.required(&key("attention.head_count"))?;
    let kv_heads = r.u64(&key("attention.head_count_kv"))?.unwrap_or(heads);
    let intermediate = r.required(&key("feed_forward_length"))?;
    let context = r.required(&key("context_length"))?;
    let eps = r
        .f64(&key("attention.layer_norm_rms_epsilon"))?
        .ok_or_else(|| {
            r.error(format!(
                "metadata `{}` is missing",
                key("attention.layer_norm_rms_epsilon")
            ))
        })?;
    let theta = r.f64(&key("rope.freq_base"))?.unwrap_or(10_000.0);
    if heads == 0 || kv_heads == 0 || hidden % heads != 0 || heads % kv_heads != 0 {
        return Err(r.error(format!(
            "{hidden} wide with {heads} heads and {kv_heads} key-value \
            heads is not a model symb can run"
        )));
    }
    if r.get(&key("rope.scaling.type")).is_some()
        || r.content.tensor_infos.contains_key("rope_freqs.weight")
    {
        return Err(ModelError::Unsupported(format!(
            "`{}`: rotary position scaling (`rope_freqs`, `rope.scaling.*`) is not read from GGUF files yet",
            path.display()
        )));
    }
    let head_dim = hidden / heads;
    if let Some(rot) = r.u64(&key("rope.dimension_count"))?
        && rot != head_dim
    {
        return Err(ModelError::Unsupported(format!(
            "`{}`: rotary embedding over {rot} of {head_dim} dimensions per head (partial rotary) is not supported",
            path.display()
        )));
    }

    // The weights.
    let names = tensor_names(layers, r.content.tensor_infos.contains_key("output.weight"));
    for gguf in r.content.tensor_infos.keys() {
        if !names.iter().any(|(g, _)| g == gguf) {
            return Err(ModelError::Unsupported(format!(
                "`{}`: the tensor `{gguf}` is not one a {arch} model symb runs has",
                path.display()
            )));
        }
    }
    let mut tensors = BTreeMap::new();
    let mut storage: BTreeMap<String, usize> = BTreeMap::new();
    for (gguf, hf) in &names {
        let Some(info) = r.content.tensor_infos.get(gguf) else {
            // Qwen2's biases are all there or none; Llama's are optional.
            if gguf.ends_with(".bias") {
                continue;
            }
            return Err(r.error(format!("the tensor `{gguf}` is missing")));
        };
        *storage.entry(format!("{:?}", info.ggml_dtype)).or_default() += 1;
        let q = info
            .read(&mut file, r.content.tensor_data_offset, &Device::Cpu)
            .map_err(|e| {
                r.error(format!(
                    "cannot read the tensor `{gguf}`: {}",
                    super::candle_message(&e)
                ))
            })?;
        let mut t = q.dequantize(&Device::Cpu).map_err(|e| {
            r.error(format!(
                "cannot dequantize the tensor `{gguf}`: {}",
                super::candle_message(&e)
            ))
        })?;
        if arch == "llama" && (hf.ends_with("q_proj.weight") || hf.ends_with("k_proj.weight")) {
            let n = if hf.ends_with("q_proj.weight") {
                heads
            } else {
                kv_heads
            };
            t = unpermute(&t, n as usize).map_err(|e| {
                r.error(format!(
                    "the tensor `{gguf}`: {}",
                    super::candle_message(&e)
                ))
            })?;
        }
        tensors.insert(hf.clone(), t);
    }
    let attention_bias = tensors.contains_key("model.layers.0.self_attn.q_proj.bias");
    if model_type == "qwen2" && !attention_bias {
        return Err(r.error("a qwen2 model without the query, key and value biases"));
    }

    // The tokenizer.
    let tok = tokenizer(&r)?;
    let vocab_size = tensors["model.embed_tokens.weight"]
        .dim(0)
        .map_err(ModelError::Candle)?;
    if tok.tokens > vocab_size {
        return Err(r.error(format!(
            "the tokenizer has {} tokens, the embedding {vocab_size} rows",
            tok.tokens
        )));
    }
    let tied = !tensors.contains_key("lm_head.weight");
    let class = super::Family::from_model_type(Some(model_type))?.class();
    let mut config = json!({
        "architectures": [class],
        "model_type": model_type,
        "vocab_size": vocab_size,
        "hidden_size": hidden,
        "intermediate_size": intermediate,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "head_dim": head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": context,
        "rms_norm_eps": eps,
        "rope_theta": theta,
        "rope_scaling": null,
        "tie_word_embeddings": tied,
        "bos_token_id": tok.bos,
        "eos_token_id": tok.eos,
        "torch_dtype": "float32",
    });
    if model_type == "llama" {
        config["attention_bias"] = attention_bias.into();
        config["mlp_bias"] = false.into();
    }
    if let Some(pad) = tok.pad {
        config["pad_token_id"] = pad.into();
    }
    let generation_config =
        json!({ "bos_token_id": tok.bos, "eos_token_id": tok.eos, "pad_token_id": tok.pad });
    Ok(Converted {
        config,
        generation_config,
        tokenizer: tok.json,
        tokenizer_config: tok.config,
        tensors,
        storage,
    })
}

/// llama.cpp's tensor names and transformers' for a model of `layers` blocks.
fn tensor_names(layers: u64, untied: bool) -> Vec<(String, String)> {
    let mut names = vec![
        (
            "token_embd.weight".to_string(),
            "model.embed_tokens.weight".to_string(),
        ),
        (
            "output_norm.weight".to_string(),
            "model.norm.weight".to_string(),
        ),
    ];
    if untied {
        names.push(("output.weight".to_string(), "lm_head.weight".to_string()));
    }
    let per_layer = [
        ("attn_norm.weight", "input_layernorm.weight"),
        ("ffn_norm.weight", "post_attention_layernorm.weight"),
        ("attn_q.weight", "self_attn.q_proj.weight"),
        ("attn_k.weight", "self_attn.k_proj.weight"),
        ("attn_v.weight", "self_attn.v_proj.weight"),
        ("attn_output.weight", "self_attn.o_proj.weight"),
        ("ffn_gate.weight", "mlp.gate_proj.weight"),
        ("ffn_up.weight", "mlp.up_proj.weight"),
        ("ffn_down.weight", "mlp.down_proj.weight"),
        ("attn_q.bias", "self_attn.q_proj.bias"),
        ("attn_k.bias", "self_attn.k_proj.bias"),
        ("attn_v.bias", "self_attn.v_proj.bias"),
    ];
    for i in 0..layers {
        for (g, h) in per_layer {
            names.push((format!("blk.{i}.{g}"), format!("model.layers.{i}.{h}")));
        }
    }
    names
}

/// Undoes llama.cpp's reordering of a query or key projection's rows: within
/// each of `heads` heads, llama.cpp interleaves the two rotary halves
/// (`[h, 2, d/2] -> [h, d/2, 2]`); transformers keeps them apart.
fn unpermute(w: &Tensor, heads: usize) -> candle_core::Result<Tensor> {
    let (rows, cols) = w.dims2()?;
    let half = rows / heads / 2;
    w.reshape((heads, half, 2, cols))?
        .transpose(1, 2)?
        .contiguous()?
        .reshape((rows, cols))
}

struct Tok {
    json: serde_json::Value,
    config: serde_json::Value,
    tokens: usize,
    bos: Option<u64>,
    eos: Option<u64>,
    pad: Option<u64>,
}

/// The pre-tokenizers symb reads, by `tokenizer.ggml.pre`, as the
/// `tokenizer.json` of the models that carry them has them; the regular
/// expressions are llama.cpp's (`llama-vocab.cpp`).
fn pre_tokenizer(pre: &str) -> Option<(serde_json::Value, serde_json::Value, bool)> {
    const LLAMA3: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
    const QWEN2: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
    let byte_level = |use_regex: bool| json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": use_regex});
    let split = |regex: &str| json!({"type": "Split", "pattern": {"Regex": regex}, "behavior": "Isolated", "invert": false});
    // (normalizer, pre-tokenizer, ignore_merges)
    Some(match pre {
        "default" | "gpt2" | "gpt-2" | "mpt" | "olmo" | "jais" => {
            (serde_json::Value::Null, byte_level(true), false)
        }
        "smollm" | "starcoder" | "refact" | "codeshell" => (
            serde_json::Value::Null,
            json!({"type": "Sequence", "pretokenizers": [{"type": "Digits", "individual_digits": true}, byte_level(true)]}),
            false,
        ),
        "llama-bpe" | "llama3" | "smaug-bpe" => (
            serde_json::Value::Null,
            json!({"type": "Sequence", "pretokenizers": [split(LLAMA3), byte_level(false)]}),
            true,
        ),
        "qwen2" | "stablelm2" => (
            json!({"type": "NFC"}),
            json!({"type": "Sequence", "pretokenizers": [split(QWEN2), byte_level(false)]}),
            false,
        ),
        _ => return None,
    })
}

/// The names `tokenizer.ggml.pre` may have, for messages.
const PRE_NAMES: &str = "gpt2, smollm, starcoder, llama-bpe, qwen2";

fn tokenizer(r: &Reader<'_>) -> Result<Tok> {
    let model = r.string("tokenizer.ggml.model")?.ok_or_else(|| {
        r.error("metadata `tokenizer.ggml.model` is missing: the file has no tokenizer")
    })?;
    if model != "gpt2" {
        return Err(ModelError::Unsupported(format!(
            "`{}`: the GGUF tokenizer model \"{model}\" is not read yet (symb reads byte-level BPE \
                tokenizers, \"gpt2\"); convert the model to a Hugging Face folder and use \
                `base.model = \"path:...\"`",
            r.path.display()
        )));
    }
    let pre = r.string("tokenizer.ggml.pre")?.unwrap_or("default");
    let (normalizer, pre_tokenizer, ignore_merges) = pre_tokenizer(pre).ok_or_else(|| {
        ModelError::Unsupported(format!(
            "`{}`: the GGUF pre-tokenizer \"{pre}\" is not one symb reads ({PRE_NAMES})",
            r.path.display()
        ))
    })?;
    let tokens = r.strings("tokenizer.ggml.tokens")?;
    let merges = r.strings("tokenizer.ggml.merges")?;
    let types = r.ints("tokenizer.ggml.token_type")?;
    if let Some(types) = &types
        && types.len() != tokens.len()
    {
        return Err(r.error(format!(
            "{} token types for {} tokens",
            types.len(),
            tokens.len()
        )));
    }
    let mut vocab = serde_json::Map::with_capacity(tokens.len());
    for (id, token) in tokens.iter().enumerate() {
        if vocab.insert(token.to_string(), id.into()).is_some() {
            return Err(r.error(format!("the token `{token}` is listed twice")));
        }
    }
    let mut merge_list = Vec::with_capacity(merges.len());
    for m in &merges {
        let (a, b) = m
            .split_once(' ')
            .ok_or_else(|| r.error(format!("the merge `{m}` is not two tokens")))?;
        if !vocab.contains_key(a)
            || !vocab.contains_key(b)
            || !vocab.contains_key(&format!("{a}{b}"))
        {
            return Err(r.error(format!(
                "the merge `{m}` names a token the vocabulary lacks"
            )));
        }
        merge_list.push(json!([a, b]));
    }
    let id = |key: &str| -> Result<Option<u64>> {
        match r.u64(key)? {
            Some(id) if id as usize >= tokens.len() => Err(r.error(format!(
                "metadata `{key}` = {id} is past the {} tokens",
                tokens.len()
            ))),
            other => Ok(other),
        }
    };
    let (bos, eos, unk, pad) = (
        id("tokenizer.ggml.bos_token_id")?,
        id("tokenizer.ggml.eos_token_id")?,
        id("tokenizer.ggml.unknown_token_id")?,
        id("tokenizer.ggml.padding_token_id")?,
    );
    // Control tokens (type 3) are special; user-defined ones (4) are added
    // tokens matched as they are written.
    let mut added = Vec::new();
    for (i, token) in tokens.iter().enumerate() {
        let ty = types.as_ref().map_or(1, |t| t[i]);
        if ty == 3 || ty == 4 {
            added.push(json!({"id": i, "content": token, "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": ty == 3}));
        }
    }
    let add_bos = r.bool("tokenizer.ggml.add_bos_token")?.unwrap_or(false);
    let add_eos = r.bool("tokenizer.ggml.add_eos_token")?.unwrap_or(false);
    let name = |id: Option<u64>| id.map(|i| tokens[i as usize].to_string());
    let post_processor = if add_bos || add_eos {
        let mut specials = serde_json::Map::new();
        let mut special = |add: bool, id: Option<u64>, what: &str| -> Result<Option<String>> {
            if !add {
                return Ok(None);
            }
            let id = id.ok_or_else(|| {
                r.error(format!("the tokenizer adds a {what} token but names none"))
            })?;
            let token = tokens[id as usize].to_string();
            specials.insert(
                token.clone(),
                json!({"id": token, "ids": [id], "tokens": [token]}),
            );
            Ok(Some(token))
        };
        let (bos_token, eos_token) = (special(add_bos, bos, "BOS")?, special(add_eos, eos, "EOS")?);
        // The template of one sequence: its BOS, itself, its EOS.
        let sequence = |seq: &str, type_id: u32| -> Vec<serde_json::Value> {
            let bos = bos_token
                .iter()
                .map(|b| json!({"SpecialToken": {"id": b, "type_id": type_id}}));
            let eos = eos_token
                .iter()
                .map(|e| json!({"SpecialToken": {"id": e, "type_id": type_id}}));
            bos.chain(std::iter::once(
                json!({"Sequence": {"id": seq, "type_id": type_id}}),
            ))
            .chain(eos)
            .collect()
        };
        let single = sequence("A", 0);
        let pair: Vec<serde_json::Value> = single.iter().cloned().chain(sequence("B", 1)).collect();
        json!({"type": "TemplateProcessing", "single": single, "pair": pair, "special_tokens": specials})
    } else {
        json!({"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": false, "use_regex": true})
    };
    let json = json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": normalizer,
        "pre_tokenizer": pre_tokenizer,
        "post_processor": post_processor,
        "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
        "model": {
            "type": "BPE",
            "dropout": null,
            "unk_token": null,
            "continuing_subword_prefix": null,
            "end_of_word_suffix": null,
            "fuse_unk": false,
            "byte_fallback": false,
            "ignore_merges": ignore_merges,
            "vocab": vocab,
            "merges": merge_list,
        },
    });
    let mut config = json!({
        "bos_token": name(bos),
        "eos_token": name(eos),
        "unk_token": name(unk),
        "pad_token": name(pad),
        "add_bos_token": add_bos,
        "add_eos_token": add_eos,
    });
    if let Some(template) = r.string("tokenizer.chat_template")? {
        config["chat_template"] = template.into();
    }
    Ok(Tok {
        json,
        config,
        tokens: tokens.len(),
        bos,
        eos,
        pad,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// llama.cpp's `permute` (convert_hf_to_gguf.py), written out: the
    /// inverse this file applies must give the rows back.
    #[test]
    fn unpermute_inverts_llama_cpp_permute() {
        let (heads, half, cols) = (3usize, 2usize, 5usize);
        let rows = heads * half * 2;
        let hf: Vec<f32> = (0..rows * cols).map(|x| x as f32).collect();
        // permute: reshape(n_head, 2, half, cols).swapaxes(1, 2)
        let mut gguf = vec![0f32; rows * cols];
        for h in 0..heads {
            for two in 0..2 {
                for j in 0..half {
                    let src = ((h * 2 + two) * half + j) * cols;
                    let dst = ((h * half + j) * 2 + two) * cols;
                    gguf[dst..dst + cols].copy_from_slice(&hf[src..src + cols]);
                }
            }
        }
        let t = Tensor::from_vec(gguf, (rows, cols), &Device::Cpu).unwrap();
        let back: Vec<f32> = unpermute(&t, heads)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        assert_eq!(back, hf);
    }

    #[test]
    fn every_pre_tokenizer_named_in_messages_is_read() {
        for name in PRE_NAMES.split(", ") {
            assert!(pre_tokenizer(name).is_some(), "{name}");
        }
        assert!(pre_tokenizer("deepseek-llm").is_none());
    }
}
