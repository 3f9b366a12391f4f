//! Chat LoRA training throughput in candle, for `bench/chat_train.py` (which
//! runs PyTorch + PEFT with axolotl-style masking on the same conversations).
//!
//!     cargo run --release --example chat_throughput -- CONVERSATIONS.json STEPS
//!
//! The SmolLM2-135M shape (30 layers, hidden 576, 9 / 3 heads, intermediate
//! 1536, vocab 49,152, tied), LoRA r 8 on `q_proj` and `v_proj`, random
//! weights. CONVERSATIONS: `[{"ids": [...], "trained": [true, ...]}, ...]`.
//! symb packs them whole into blocks of 512 (several to a block, none seeing
//! another), 8 blocks a batch. Prints one JSON line: real (not padding)
//! tokens per second over the timed steps, after one warm-up step.

use symb::model::families::llama::LLAMA;
use symb::model::lora::LoraSpec;
use symb::model::rng::Rng;
use symb::model::train::{AdamW, AdamWParams, attach_lora};
use symb::model::trainer::{Masked, batch_loss, pack_sequences};
use symb::model::{Dims, Model};

#[derive(serde::Deserialize)]
struct Conversation {
    ids: Vec<u32>,
    trained: Vec<bool>,
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    symb::model::ops::configure_threads();
    symb::model::ops::keep_freed_memory();
    let mut args = std::env::args().skip(1);
    let path = args
        .next()
        .ok_or("usage: chat_throughput CONVERSATIONS.json STEPS")?;
    let steps: usize = args.next().ok_or("STEPS")?.parse()?;
    let conversations: Vec<Conversation> = serde_json::from_str(&std::fs::read_to_string(path)?)?;
    let sequences: Vec<Masked> = conversations
        .into_iter()
        .map(|c| Masked {
            ids: c.ids,
            trained: c.trained,
        })
        .collect();
    let blocks = pack_sequences(&sequences, 512);
    let dims = Dims {
        vocab_size: 49_152,
        context: 2048,
        width: 576,
        layers: 30,
        heads: 9,
        kv_heads: 3,
        head_dim: 64,
        inner: Some(1536),
    };
    let mut rng = Rng::new(0);
    let mut model = Model::scratch(&LLAMA.scratch_config(&dims, None)?, &mut rng)?;
    let spec = LoraSpec {
        targets: vec!["q_proj".into(), "v_proj".into()],
        rank: 8,
        alpha: 16.0,
        rslora: false,
    };
    let lora = attach_lora(&mut model, &spec, None, &mut rng)?;
    let mut optimizer = AdamW::new(
        lora.vars(),
        AdamWParams {
            lr: 2e-4,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.0,
        },
    )?;
    let (mut timed, mut tokens) = (std::time::Duration::ZERO, 0usize);
    for (step, batch) in blocks.chunks(8).cycle().take(steps + 1).enumerate() {
        let started = std::time::Instant::now();
        let loss = batch_loss(&model, batch, true)?;
        optimizer.step(&loss.backward()?)?;
        if step > 0 {
            timed += started.elapsed();
            tokens += batch.iter().map(|b| b.inputs.len()).sum::<usize>();
        }
    }
    println!(
        "{}",
        serde_json::json!({
            "tokens_per_second": tokens as f64 / timed.as_secs_f64(),
            "blocks": blocks.len(),
            "steps": steps,
        })
    );
    Ok(())
}
