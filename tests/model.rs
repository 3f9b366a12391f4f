//! Every family in candle against PyTorch's outputs on the fixtures in
//! tests/fixtures: GPT-2, and the Llama family (tiny-llama: SmolLM2-like,
//! GQA, tied; tiny-llama-sp: SentencePiece with byte fallback, MQA, llama3
//! rope scaling, untied; tiny-qwen2: q/k/v biases).
#![allow(clippy::unwrap_used)] // a test: a panic is how it fails

use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use symb::model::{self, lora};

fn fixture() -> PathBuf {
    fixture_named("tiny-gpt2")
}

fn fixture_named(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

struct Case {
    prompt: String,
    input_ids: Vec<u32>,
    greedy: Vec<u32>,
    logits: Tensor,
}

fn cases(golden: &str) -> Vec<Case> {
    cases_of(&fixture(), golden)
}

fn cases_of(dir: &Path, golden: &str) -> Vec<Case> {
    let json: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join(format!("{golden}.json"))).unwrap())
            .unwrap();
    let tensors =
        candle_core::safetensors::load(dir.join(format!("{golden}.safetensors")), &Device::Cpu)
            .unwrap();
    json["cases"]
        .as_array()
        .unwrap()
        .iter()
        .enumerate()
        .map(|(i, case)| Case {
            prompt: case["prompt"].as_str().unwrap().to_string(),
            input_ids: serde_json::from_value(case["input_ids"].clone()).unwrap(),
            greedy: serde_json::from_value(case["greedy_20"].clone()).unwrap(),
            logits: tensors[&format!("logits.{i}")].clone(),
        })
        .collect()
}

fn max_abs(a: &Tensor, b: &Tensor) -> f32 {
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

fn logits(model: &model::Model, ids: &[u32]) -> Tensor {
    let input = Tensor::new(ids, &Device::Cpu)
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    model.forward(&input, None).unwrap().squeeze(0).unwrap()
}

fn check(model: &model::Model, golden: &str) {
    check_at(&fixture(), model, golden)
}

/// Token ids as the Python tokenizer gave them (with special tokens, as
/// transformers encodes by default), logits within 1e-4, the same 20
/// greedy tokens with the KV cache.
fn check_at(dir: &Path, model: &model::Model, golden: &str) {
    let tokenizer = tokenizers::Tokenizer::from_file(dir.join("tokenizer.json")).unwrap();
    for case in cases_of(dir, golden) {
        let ids = tokenizer
            .encode(case.prompt.as_str(), true)
            .unwrap()
            .get_ids()
            .to_vec();
        assert_eq!(
            ids, case.input_ids,
            "{golden}: token ids of {:?}",
            case.prompt
        );
        let error = max_abs(&logits(model, &ids), &case.logits);
        assert!(
            error < 1e-4,
            "{golden}: max abs logits error {error} on {:?}",
            case.prompt
        );
        let (generated, _) = model.greedy(&ids, 20, None).unwrap();
        assert_eq!(
            generated, case.greedy,
            "{golden}: greedy tokens of {:?}",
            case.prompt
        );
    }
}

#[test]
fn logits_and_greedy_tokens_match_pytorch() {
    check(&model::load_folder(&fixture()).unwrap(), "golden");
}

#[test]
fn the_peft_adapter_matches_pytorch_and_merging_changes_nothing() {
    let mut adapted = model::load_folder(&fixture()).unwrap();
    let modules = lora::load_adapter(&mut adapted, &fixture().join("lora")).unwrap();
    assert_eq!(
        modules,
        ["transformer.h.0.attn.c_attn", "transformer.h.1.attn.c_attn"]
    );
    check(&adapted, "golden-lora");
    let mut merged = adapted.clone();
    assert_eq!(lora::merge(&mut merged).unwrap(), 2);
    for case in cases("golden-lora") {
        let error = max_abs(
            &logits(&merged, &case.input_ids),
            &logits(&adapted, &case.input_ids),
        );
        assert!(error < 1e-5, "merged vs adapter: {error}");
    }
}

/// An adapter PEFT wrote with `trainable_token_indices` (rows of the tied
/// embedding replaced): tests/python/make_trainable_tokens_fixture.py.
#[test]
fn peft_trainable_tokens_match_pytorch_adapted_and_merged() {
    let data =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/data/tiny-gpt2-trainable-tokens");
    let golden =
        candle_core::safetensors::load(data.join("golden.safetensors"), &Device::Cpu).unwrap();
    let ids: Vec<u32> = golden["input_ids"]
        .flatten_all()
        .unwrap()
        .to_vec1::<i64>()
        .unwrap()
        .iter()
        .map(|&i| i as u32)
        .collect();
    let mut adapted = model::load_folder(&fixture()).unwrap();
    lora::load_adapter(&mut adapted, &data).unwrap();
    assert_eq!(
        adapted.embedding().rows.as_ref().unwrap().indices,
        [4090, 4091, 4092, 4093, 4094, 4095]
    );
    let expected = golden["logits"].squeeze(0).unwrap();
    let error = max_abs(&logits(&adapted, &ids), &expected);
    assert!(error < 1e-4, "adapter: max abs logits error {error}");
    let base = model::load_folder(&fixture()).unwrap();
    assert!(
        max_abs(&logits(&base, &ids), &expected) > 1.0,
        "the fixture changes the logits"
    );
    let mut merged = adapted.clone();
    assert_eq!(lora::merge(&mut merged).unwrap(), 3);
    assert!(merged.embedding().rows.is_none());
    let error = max_abs(
        &logits(&merged, &ids),
        &golden["merged_logits"].squeeze(0).unwrap(),
    );
    assert!(error < 1e-4, "merged: max abs logits error {error}");
}

#[test]
fn the_kv_cache_gives_the_full_forward_logits() {
    check_kv_cache(&fixture());
}

/// The logits of golden case 2 computed in three chunks through the KV
/// cache equal one full forward pass (within 1e-5).
fn check_kv_cache(dir: &Path) {
    let model = model::load_folder(dir).unwrap();
    let ids: Vec<u32> = cases_of(dir, "golden")[2].input_ids.clone();
    let full = logits(&model, &ids);
    let mut cache = model::KvCache::new(model.n_layer());
    let mut steps = Vec::new();
    for chunk in [&ids[..5], &ids[5..6], &ids[6..]] {
        let input = Tensor::new(chunk, &Device::Cpu)
            .unwrap()
            .unsqueeze(0)
            .unwrap();
        steps.push(
            model
                .forward(&input, Some(&mut cache))
                .unwrap()
                .squeeze(0)
                .unwrap(),
        );
    }
    assert!(
        max_abs(&full, &Tensor::cat(&steps, 0).unwrap()) < 1e-5,
        "{}",
        dir.display()
    );
}

/// One LoRA training step against PyTorch + PEFT: the loss, every gradient
/// and every tensor after AdamW within 1e-5.
#[test]
fn one_lora_training_step_matches_pytorch() {
    check_training_step(&fixture(), &["c_attn"]);
}

/// The fixture's `train-step/` with LoRA on `targets` (PyTorch + PEFT's
/// initial tensors): the loss, every gradient and every tensor after AdamW
/// within 1e-5 of PyTorch's. The training path: the fused head + loss op.
fn check_training_step(dir: &Path, targets: &[&str]) {
    use symb::model::lora::LoraSpec;
    use symb::model::rng::Rng;
    use symb::model::train::{AdamW, AdamWParams, attach_lora};
    let name = dir.file_name().unwrap().to_string_lossy();
    let step = dir.join("train-step");
    let golden: serde_json::Value =
        serde_json::from_slice(&std::fs::read(step.join("golden.json")).unwrap()).unwrap();
    let batch: serde_json::Value =
        serde_json::from_slice(&std::fs::read(step.join("batch.json")).unwrap()).unwrap();
    let load = |file: &str| {
        candle_core::safetensors::load(step.join(file), &Device::Cpu)
            .unwrap()
            .into_iter()
            .collect()
    };
    let init = load("lora_init.safetensors");
    let (grads_golden, after_golden): (
        std::collections::BTreeMap<String, Tensor>,
        std::collections::BTreeMap<String, Tensor>,
    ) = (load("grads.safetensors"), load("after_adamw.safetensors"));
    let mut model = model::load_folder(dir).unwrap();
    let spec = LoraSpec {
        targets: targets.iter().map(|t| t.to_string()).collect(),
        rank: 4,
        alpha: 8.0,
        rslora: false,
    };
    let vars = attach_lora(&mut model, &spec, Some(&init), &mut Rng::new(0)).unwrap();
    let ids: Vec<Vec<u32>> = serde_json::from_value(batch["input_ids"].clone()).unwrap();
    let labels: Vec<Vec<u32>> = serde_json::from_value(batch["labels"].clone()).unwrap();
    let ids = Tensor::new(ids, &Device::Cpu).unwrap();
    let labels = Tensor::new(labels, &Device::Cpu)
        .unwrap()
        .flatten_all()
        .unwrap();
    let loss = model
        .loss(&ids, &labels, &symb::model::RowLayout::default(), true)
        .unwrap();
    let loss_value = loss.to_scalar::<f32>().unwrap() as f64;
    assert!(
        (loss_value - golden["loss"].as_f64().unwrap()).abs() < 1e-5,
        "{name}: loss {loss_value} vs {}",
        golden["loss"]
    );
    let grads = loss.backward().unwrap();
    let named = vars.peft_tensors();
    assert_eq!(
        named.keys().collect::<Vec<_>>(),
        grads_golden.keys().collect::<Vec<_>>(),
        "{name}"
    );
    for (tensor_name, tensor) in &named {
        let grad = grads
            .get(tensor)
            .unwrap_or_else(|| panic!("{name}: no gradient reached `{tensor_name}`"));
        let error = max_abs(grad, &grads_golden[tensor_name]);
        assert!(error < 1e-5, "{name}: gradient of {tensor_name}: {error}");
    }
    let mut optimizer = AdamW::new(
        vars.vars(),
        AdamWParams {
            lr: 1e-3,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.01,
        },
    )
    .unwrap();
    optimizer.step(&grads).unwrap();
    for (tensor_name, tensor) in vars.peft_tensors() {
        let error = max_abs(&tensor, &after_golden[&tensor_name]);
        assert!(error < 1e-5, "{name}: {tensor_name} after AdamW: {error}");
    }
}

/// The trainable-token path (frozen rows plus a gather from the trainable
/// ones, the head likewise) gives the gradient of the plain formulation:
/// the embedding with the rows replaced, used by both ends.
#[test]
fn trainable_token_rows_get_the_gradient_of_the_replaced_embedding() {
    use symb::model::train::{LoraVars, cross_entropy};
    let ids = Tensor::new(&[[4090u32, 5, 4091, 17, 4095, 300, 4090, 9]], &Device::Cpu).unwrap();
    let labels = Tensor::new(&[5u32, 4091, 17, 4095, 300, 4090, 9, 4092], &Device::Cpu).unwrap();
    let mut model = model::load_folder(&fixture()).unwrap();
    let mut vars = LoraVars {
        family: model.family(),
        modules: Default::default(),
        token_indices: Vec::new(),
        token_rows: Vec::new(),
    };
    vars.train_token_rows(&mut model, vec![4090, 4091, 4092, 4095])
        .unwrap();
    let (_, rows) = &vars.token_rows[0];
    rows.set(&(rows.as_tensor() * 1.5).unwrap()).unwrap();
    let loss = |m: &model::Model| {
        cross_entropy(&m.forward(&ids, None).unwrap().squeeze(0).unwrap(), &labels).unwrap()
    };
    let fast = loss(&model);
    let grad_fast = fast
        .backward()
        .unwrap()
        .get(rows.as_tensor())
        .unwrap()
        .clone();

    let mut plain = model.clone();
    let (_, wte) = plain.token_matrices_mut().remove(0);
    wte.weight = model.embedding().rows.as_ref().unwrap().apply().unwrap();
    wte.rows = None;
    let reference = loss(&plain);
    let grad_reference = reference
        .backward()
        .unwrap()
        .get(rows.as_tensor())
        .unwrap()
        .clone();
    assert!(
        (fast.to_scalar::<f32>().unwrap() - reference.to_scalar::<f32>().unwrap()).abs() < 1e-5
    );
    assert!(
        max_abs(&grad_fast, &grad_reference) < 1e-5,
        "{}",
        max_abs(&grad_fast, &grad_reference)
    );
    assert!(
        max_abs(&grad_fast, &grad_fast.zeros_like().unwrap()) > 1e-4,
        "4092 appears only as a label, the others as inputs too"
    );
    // The training path: the fused head + loss op with the rows as its second input.
    let fused = model
        .loss(&ids, &labels, &symb::model::RowLayout::default(), true)
        .unwrap();
    assert!(
        (fused.to_scalar::<f32>().unwrap() - reference.to_scalar::<f32>().unwrap()).abs() < 1e-5
    );
    let grad_fused = fused
        .backward()
        .unwrap()
        .get(rows.as_tensor())
        .unwrap()
        .clone();
    assert!(
        max_abs(&grad_fused, &grad_reference) < 1e-5,
        "{}",
        max_abs(&grad_fused, &grad_reference)
    );
}

// The Llama family: each fixture through the same checks as GPT-2's, and
// the left-padded batch.

const LLAMA_FIXTURES: [&str; 3] = ["tiny-llama", "tiny-llama-sp", "tiny-qwen2"];

#[test]
fn llama_family_logits_and_greedy_tokens_match_pytorch() {
    for name in LLAMA_FIXTURES {
        let dir = fixture_named(name);
        let model = model::load_folder(&dir).unwrap();
        check_at(&dir, &model, "golden");
    }
}

#[test]
fn llama_family_families_and_heads_are_read_from_the_config() {
    let family = |name: &str| model::load_folder(&fixture_named(name)).unwrap();
    let (llama, sp, qwen) = (
        family("tiny-llama"),
        family("tiny-llama-sp"),
        family("tiny-qwen2"),
    );
    assert_eq!(
        (llama.family(), sp.family(), qwen.family()),
        (
            model::families::llama::LLAMA,
            model::families::llama::LLAMA,
            model::families::llama::QWEN2
        )
    );
    let heads = |m: &mut model::Model| {
        m.token_matrices_mut()
            .into_iter()
            .map(|(name, _)| name)
            .collect::<Vec<_>>()
    };
    assert_eq!(
        heads(&mut llama.clone()),
        ["model.embed_tokens"],
        "SmolLM2-like: tied"
    );
    assert_eq!(
        heads(&mut sp.clone()),
        ["model.embed_tokens", "lm_head"],
        "TinyLlama-like: untied"
    );
    // Qwen2's q/k/v projections have biases; o_proj has none.
    let mut qwen = qwen;
    let biased: Vec<String> = qwen
        .linears_mut(lora::LoraTarget(&["attn".to_string()]))
        .into_iter()
        .filter(|(_, l)| l.bias.is_some())
        .map(|(n, _)| n)
        .collect();
    assert_eq!(biased.len(), 6, "{biased:?}");
    assert!(biased.iter().all(|n| !n.ends_with("o_proj")));
}

#[test]
fn llama_family_peft_adapters_match_pytorch_and_merging_changes_nothing() {
    for name in LLAMA_FIXTURES {
        let dir = fixture_named(name);
        let mut adapted = model::load_folder(&dir).unwrap();
        let modules = lora::load_adapter(&mut adapted, &dir.join("lora")).unwrap();
        assert_eq!(modules.len(), 14, "{name}: seven projections in two layers");
        check_at(&dir, &adapted, "golden-lora");
        let mut merged = adapted.clone();
        assert_eq!(lora::merge(&mut merged).unwrap(), 14);
        for case in cases_of(&dir, "golden-lora") {
            let error = max_abs(
                &logits(&merged, &case.input_ids),
                &logits(&adapted, &case.input_ids),
            );
            // float32 noise: two orders of rounding through two layers with
            // sharp attention (weights at 0.2). Measured 1.0e-5 to 1.6e-5 at
            // logits up to 7.8, about 2e-6 of the largest; GPT-2's is under 1e-5.
            let largest = logits(&adapted, &case.input_ids)
                .abs()
                .unwrap()
                .flatten_all()
                .unwrap()
                .max(0)
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            assert!(
                error < 4e-6 * largest.max(1.0),
                "{name}: merged vs adapter: {error} at logits up to {largest}"
            );
        }
    }
}

#[test]
fn llama_family_left_padded_batches_match_pytorch() {
    for name in LLAMA_FIXTURES {
        let dir = fixture_named(name);
        let model = model::load_folder(&dir).unwrap();
        let json: serde_json::Value =
            serde_json::from_slice(&std::fs::read(dir.join("golden-batch.json")).unwrap()).unwrap();
        let golden =
            candle_core::safetensors::load(dir.join("golden-batch.safetensors"), &Device::Cpu)
                .unwrap();
        let ids: Vec<Vec<u32>> = serde_json::from_value(json["input_ids"].clone()).unwrap();
        let mask: Vec<Vec<u32>> = serde_json::from_value(json["attention_mask"].clone()).unwrap();
        let positions: Vec<Vec<u32>> =
            serde_json::from_value(json["position_ids"].clone()).unwrap();
        let padding = model::RowLayout::from_mask(&mask).unwrap();
        // Our position ids are PyTorch's.
        let t = ids[0].len();
        assert_eq!(
            padding.positions(ids.len(), 0, t),
            positions.concat(),
            "{name}: position ids"
        );
        let out = model
            .forward_padded(
                &Tensor::new(ids.clone(), &Device::Cpu).unwrap(),
                None,
                &padding,
            )
            .unwrap();
        let last = out.narrow(1, t - 1, 1).unwrap().squeeze(1).unwrap();
        let expected = golden.values().next().unwrap();
        let error = max_abs(&last, expected);
        assert!(
            error < 1e-4,
            "{name}: last-position logits of the padded batch: {error}"
        );
        // Batched greedy decoding gives each prompt's own greedy tokens.
        let prompts: Vec<Vec<u32>> = ids
            .iter()
            .enumerate()
            .map(|(b, row)| row[padding.of(b)..].to_vec())
            .collect();
        let (generated, _) = model.decode_batch(&prompts, 20, None, None).unwrap();
        for (case, tokens) in cases_of(&dir, "golden").iter().zip(&generated) {
            assert_eq!(
                &case.greedy, tokens,
                "{name}: batched greedy tokens of {:?}",
                case.prompt
            );
        }
    }
}

#[test]
fn llama_family_kv_cache_gives_the_full_forward_logits() {
    for name in LLAMA_FIXTURES {
        check_kv_cache(&fixture_named(name));
    }
}

/// One LoRA training step (q_proj, v_proj) against PyTorch + PEFT for each
/// Llama-family fixture: the loss, every gradient and every tensor after
/// AdamW within 1e-5.
#[test]
fn llama_family_one_lora_training_step_matches_pytorch() {
    for name in LLAMA_FIXTURES {
        check_training_step(&fixture_named(name), &["q_proj", "v_proj"]);
    }
}

/// Conversations packed into one block (each attending only to itself,
/// positions from 0) give the loss and the gradients of every weight that
/// they give run one at a time, weighted by their trained tokens; padding
/// rows to the longest in a batch changes nothing either. Both families
/// (GPT-2: learned positions and the fused projection; Llama: rotary
/// positions and grouped heads).
#[test]
fn packed_conversations_train_as_if_each_ran_alone() {
    use symb::model::trainer::{Masked, batch_loss, pack_sequences};
    for name in ["tiny-gpt2", "tiny-llama"] {
        let mut model = model::load_folder(&fixture_named(name)).unwrap();
        let mut vars = Vec::new();
        model
            .visit_mut(|name, tensor| {
                let var = candle_core::Var::from_tensor(tensor)?;
                *tensor = var.as_tensor().clone();
                vars.push((name.to_string(), var));
                Ok(())
            })
            .unwrap();
        // Lengths 9, 14, 5, 20 with masks of assorted spans (one trains every
        // token, one a single token).
        let mut rng = 7u64;
        let mut next = move || {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            rng
        };
        let sequences: Vec<Masked> = [(9, 3..7), (14, 0..14), (5, 4..5), (20, 6..18)]
            .into_iter()
            .map(|(n, span)| Masked {
                ids: (0..n).map(|_| (next() % 200) as u32 + 3).collect(),
                trained: (0..n).map(|i| span.contains(&i)).collect(),
            })
            .collect();
        let blocks = pack_sequences(&sequences, 64);
        assert_eq!(blocks.len(), 1, "{name}: all four fit one block of 64");
        assert_eq!(blocks[0].sequences, vec![19, 13, 8, 4]);
        let packed = batch_loss(&model, &blocks, true).unwrap();
        let packed_grads = packed.backward().unwrap();
        // One at a time: each its own block, its loss weighted by its share
        // of the trained tokens.
        let total: usize = blocks[0].trained();
        let (mut loss, mut grads): (f64, Vec<Option<Tensor>>) = (0.0, vec![None; vars.len()]);
        for sequence in &sequences {
            let alone = pack_sequences(std::slice::from_ref(sequence), 64);
            let weight = alone[0].trained() as f64 / total as f64;
            let l = batch_loss(&model, &alone, true).unwrap();
            loss += l.to_scalar::<f32>().unwrap() as f64 * weight;
            let g = l.backward().unwrap();
            for (slot, (_, var)) in grads.iter_mut().zip(&vars) {
                let part = (g.get(var.as_tensor()).unwrap() * weight).unwrap();
                *slot = Some(match slot.take() {
                    Some(sum) => (sum + part).unwrap(),
                    None => part,
                });
            }
        }
        let packed_loss = packed.to_scalar::<f32>().unwrap() as f64;
        assert!(
            (packed_loss - loss).abs() < 1e-5,
            "{name}: packed loss {packed_loss}, one by one {loss}"
        );
        for ((var_name, var), alone) in vars.iter().zip(&grads) {
            let (a, b) = (
                packed_grads.get(var.as_tensor()).unwrap(),
                alone.as_ref().unwrap(),
            );
            let scale = max_abs(b, &b.zeros_like().unwrap()).max(1e-3);
            assert!(
                max_abs(a, b) < 1e-4 * scale,
                "{name}: the gradient of `{var_name}` differs by {} (largest {scale})",
                max_abs(a, b)
            );
        }
        // Two blocks of unequal length in one batch: the shorter is padded,
        // and the loss is still the token-weighted mean.
        let two = pack_sequences(&sequences, 24);
        assert!(two.len() >= 2 && two.iter().any(|b| b.inputs.len() < 24));
        let batched = batch_loss(&model, &two, false)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap() as f64;
        assert!(
            (batched - loss).abs() < 1e-5,
            "{name}: padded batch {batched}, {loss}"
        );
    }
}
