//! Writes a GPT-2 of a given size with random (seeded) weights as a Hugging
//! Face folder: config.json, model.safetensors, and a tokenizer.json copied
//! from a given file. For benchmarks that need a model of a real size.
//!
//!     cargo run --release --example make_gpt2 -- OUT LAYERS WIDTH HEADS VOCAB TOKENIZER_JSON

use symb::model::families::gpt2::GPT2;
use symb::model::rng::Rng;
use symb::model::{Dims, Model};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [out, layers, width, heads, vocab, tokenizer] = &args[..] else {
        return Err("usage: make_gpt2 OUT LAYERS WIDTH HEADS VOCAB TOKENIZER_JSON".into());
    };
    let (width, heads): (usize, usize) = (width.parse()?, heads.parse()?);
    let dims = Dims {
        vocab_size: vocab.parse()?,
        context: 1024,
        width,
        layers: layers.parse()?,
        heads,
        kv_heads: heads,
        head_dim: width / heads.max(1),
        inner: None,
    };
    let config = GPT2.scratch_config(&dims, Some(0))?;
    let model = Model::scratch(&config, &mut Rng::new(0))?;
    let out = std::path::Path::new(out);
    std::fs::create_dir_all(out)?;
    symb::model::save_safetensors(&model.named_tensors(), &out.join("model.safetensors"))?;
    let mut json = config.json.clone();
    json["architectures"] = serde_json::json!([GPT2.class()]);
    std::fs::write(
        out.join("config.json"),
        serde_json::to_string_pretty(&json)?,
    )?;
    std::fs::copy(tokenizer, out.join("tokenizer.json"))?;
    Ok(())
}
