//! Training throughput of LoRA in candle, for the benchmark in
//! `bench/train_throughput.py` (which runs PyTorch + PEFT on the same shapes).
//!
//!     cargo run --release --example train_throughput -- gpt2 LAYERS WIDTH HEADS VOCAB STEPS
//!     cargo run --release --example train_throughput -- llama LAYERS WIDTH HEADS KV_HEADS INTERMEDIATE VOCAB STEPS
//!
//! GPT-2: LoRA on `c_attn`; Llama (tied head, as SmolLM2): LoRA on `q_proj`
//! and `v_proj`. Prints one JSON line: tokens/s over the timed steps (after
//! one warm-up step) and the peak resident memory of the process.

use candle_core::{Device, Tensor};
use symb::model::families::{gpt2::GPT2, llama::LLAMA};
use symb::model::lora::LoraSpec;
use symb::model::rng::Rng;
use symb::model::train::{AdamW, AdamWParams, attach_lora};
use symb::model::{Dims, Model};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    symb::model::ops::configure_threads();
    let mut args = std::env::args().skip(1);
    let family = args.next().unwrap_or_default();
    let numbers: Vec<usize> = args.map(|a| a.parse()).collect::<Result<_, _>>()?;
    let (batch, block) = (8, 128);
    symb::model::ops::keep_freed_memory();
    let mut rng = Rng::new(0);
    // The family's own scratch config of these dimensions (the
    // throughput does not depend on its other settings).
    let (family, dims, targets, steps) = match (family.as_str(), &numbers[..]) {
        ("gpt2", &[layers, width, heads, vocab_size, steps]) => {
            let dims = Dims {
                vocab_size,
                context: 1024,
                width,
                layers,
                heads,
                kv_heads: heads,
                head_dim: width / heads.max(1),
                inner: None,
            };
            (GPT2, dims, vec!["c_attn"], steps)
        }
        ("llama", &[layers, width, heads, kv_heads, inner, vocab_size, steps]) => {
            let dims = Dims {
                vocab_size,
                context: 2048,
                width,
                layers,
                heads,
                kv_heads,
                head_dim: width / heads.max(1),
                inner: Some(inner),
            };
            (LLAMA, dims, vec!["q_proj", "v_proj"], steps)
        }
        _ => {
            return Err(concat!(
                "usage: train_throughput gpt2 LAYERS WIDTH HEADS VOCAB STEPS",
                " | llama LAYERS WIDTH HEADS KV_HEADS INTERMEDIATE VOCAB STEPS"
            )
            .into());
        }
    };
    let vocab_size = dims.vocab_size;
    let mut model = Model::scratch(&family.scratch_config(&dims, None)?, &mut rng)?;
    let targets: Vec<String> = targets.into_iter().map(String::from).collect();
    let spec = LoraSpec {
        targets,
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
    let mut timed = std::time::Duration::ZERO;
    for step in 0..=steps {
        let ids: Vec<u32> = (0..batch * (block + 1))
            .map(|_| (rng.next_u64() % vocab_size as u64) as u32)
            .collect();
        let ids = Tensor::from_vec(ids, (batch, block + 1), &Device::Cpu)?;
        let started = std::time::Instant::now();
        let loss = model.loss(
            &ids.narrow(1, 0, block)?,
            &ids.narrow(1, 1, block)?.flatten_all()?,
            &symb::model::RowLayout::default(),
            true,
        )?;
        let forward = started.elapsed();
        let grads = loss.backward()?;
        let backward = started.elapsed();
        optimizer.step(&grads)?;
        if std::env::var_os("SYMB_STEP_TIMES").is_some() {
            eprintln!(
                "step {step}: forward {:.2}s, backward {:.2}s, optimizer {:.2}s",
                forward.as_secs_f64(),
                (backward - forward).as_secs_f64(),
                (started.elapsed() - backward).as_secs_f64()
            );
        }
        if step > 0 {
            timed += started.elapsed();
        }
    }
    let status = std::fs::read_to_string("/proc/self/status")?;
    let peak_kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0);
    let tokens = (steps * batch * block) as f64;
    println!(
        "{}",
        serde_json::json!({"tokens_per_second": tokens / timed.as_secs_f64(), "peak_memory_mb": peak_kb as f64 / 1024.0, "steps": steps})
    );
    Ok(())
}
