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
use symb::model::gpt2::{Config, Gpt2};
use symb::model::lora::LoraSpec;
use symb::model::rng::Rng;
use symb::model::train::{AdamW, AdamWParams, attach_lora};
use symb::model::{Llama, Model, llama};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    symb::model::ops::configure_threads();
    let mut args = std::env::args().skip(1);
    let family = args.next().unwrap_or_default();
    let numbers: Vec<usize> = args.map(|a| a.parse()).collect::<Result<_, _>>()?;
    let (batch, block) = (8, 128);
    symb::model::ops::keep_freed_memory();
    let mut rng = Rng::new(0);
    let (mut model, targets, vocab_size, steps) = match (family.as_str(), &numbers[..]) {
        ("gpt2", &[n_layer, n_embd, n_head, vocab_size, steps]) => {
            let config = Config {
                vocab_size,
                n_positions: 1024,
                n_embd,
                n_layer,
                n_head,
                n_inner: None,
                layer_norm_epsilon: 1e-5,
                activation_function: "gelu_new".into(),
                bos_token_id: None,
                eos_token_id: None,
                model_type: Some("gpt2".into()),
                tie_word_embeddings: Some(true),
            };
            (Model::Gpt2(Gpt2::scratch(&config, &mut rng)?), vec!["c_attn".to_string()], vocab_size, steps)
        }
        ("llama", &[layers, hidden, heads, kv_heads, intermediate, vocab_size, steps]) => {
            let config = llama::Config {
                vocab_size,
                hidden_size: hidden,
                intermediate_size: intermediate,
                num_hidden_layers: layers,
                num_attention_heads: heads,
                num_key_value_heads: Some(kv_heads),
                head_dim: None,
                rms_norm_eps: 1e-5,
                rope_theta: 100_000.0,
                rope_scaling: None,
                max_position_embeddings: 2048,
                tie_word_embeddings: true,
                attention_bias: false,
                mlp_bias: false,
                hidden_act: "silu".into(),
                bos_token_id: None,
                eos_token_id: None,
                model_type: Some("llama".into()),
                use_sliding_window: false,
            };
            (Model::Llama(Llama::scratch(&config, &mut rng)?), vec!["q_proj".to_string(), "v_proj".to_string()], vocab_size, steps)
        }
        _ => return Err("usage: train_throughput gpt2 LAYERS WIDTH HEADS VOCAB STEPS | llama LAYERS WIDTH HEADS KV_HEADS INTERMEDIATE VOCAB STEPS".into()),
    };
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
