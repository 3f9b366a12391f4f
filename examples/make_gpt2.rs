//! Writes a GPT-2 of a given size with random (seeded) weights as a Hugging
//! Face folder: config.json, model.safetensors, and a tokenizer.json copied
//! from a given file. For benchmarks that need a model of a real size.
//!
//!     cargo run --release --example make_gpt2 -- OUT LAYERS WIDTH HEADS VOCAB TOKENIZER_JSON

use symb::model::gpt2::{Config, Gpt2};
use symb::model::rng::Rng;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [out, layers, width, heads, vocab, tokenizer] = &args[..] else {
        return Err("usage: make_gpt2 OUT LAYERS WIDTH HEADS VOCAB TOKENIZER_JSON".into());
    };
    let config = Config {
        vocab_size: vocab.parse()?,
        n_positions: 1024,
        n_embd: width.parse()?,
        n_layer: layers.parse()?,
        n_head: heads.parse()?,
        n_inner: None,
        layer_norm_epsilon: 1e-5,
        activation_function: "gelu_new".into(),
        bos_token_id: Some(0),
        eos_token_id: Some(0),
        model_type: Some("gpt2".into()),
        tie_word_embeddings: Some(true),
    };
    let model = symb::model::Model::Gpt2(Gpt2::scratch(&config, &mut Rng::new(0))?);
    let out = std::path::Path::new(out);
    std::fs::create_dir_all(out)?;
    symb::model::save_safetensors(&model.named_tensors(), &out.join("model.safetensors"))?;
    let mut json = serde_json::to_value(&config)?;
    json["architectures"] = serde_json::json!(["GPT2LMHeadModel"]);
    std::fs::write(
        out.join("config.json"),
        serde_json::to_string_pretty(&json)?,
    )?;
    std::fs::copy(tokenizer, out.join("tokenizer.json"))?;
    Ok(())
}
