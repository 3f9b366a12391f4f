//! GPT-2 in candle, written for both inference (with a KV cache) and training.
//!
//! Weight names follow the Hugging Face checkpoint (`h.{i}.attn.c_attn.weight`,
//! with or without the `transformer.` prefix of `GPT2LMHeadModel`). GPT-2's
//! linear layers are `Conv1D`: the weight is stored `[in, out]` and applied as
//! `x · W + b`. The language-model head is tied to the token embedding.
//!
//! LayerNorm and softmax are built from primitive tensor ops: candle's fused
//! versions have no backward pass and would silently cut the gradient graph.

use candle_core::{D, DType, Device, Module, Tensor};
use candle_nn::VarBuilder;
use serde::Deserialize;

use super::Family;
use super::lora::{Lora, LoraTarget};
use super::{ModelError, Result};

/// The parts of `config.json` GPT-2 needs.
#[derive(Debug, Clone, PartialEq, Deserialize, serde::Serialize)]
pub struct Config {
    pub vocab_size: usize,
    pub n_positions: usize,
    pub n_embd: usize,
    pub n_layer: usize,
    pub n_head: usize,
    #[serde(default)]
    pub n_inner: Option<usize>,
    #[serde(default = "default_epsilon")]
    pub layer_norm_epsilon: f64,
    #[serde(default = "default_activation")]
    pub activation_function: String,
    #[serde(default)]
    pub bos_token_id: Option<u32>,
    #[serde(default)]
    pub eos_token_id: Option<u32>,
    #[serde(default)]
    pub model_type: Option<String>,
    #[serde(default)]
    pub tie_word_embeddings: Option<bool>,
}

fn default_epsilon() -> f64 {
    1e-5
}

fn default_activation() -> String {
    "gelu_new".to_string()
}

impl Config {
    pub fn inner(&self) -> usize {
        self.n_inner.unwrap_or(4 * self.n_embd)
    }

    pub fn head_dim(&self) -> usize {
        self.n_embd / self.n_head
    }

    /// Checks what the forward pass relies on.
    pub fn validate(&self) -> Result<()> {
        if Family::from_model_type(self.model_type.as_deref())? != Family::Gpt2 {
            return Err(ModelError::Unsupported(format!("`model_type` = \"{}\" is not GPT-2", self.model_type.as_deref().unwrap_or_default())));
        }
        if self.n_head == 0 || !self.n_embd.is_multiple_of(self.n_head) {
            return Err(ModelError::Config(format!("`n_embd` = {} is not divisible by `n_head` = {}", self.n_embd, self.n_head)));
        }
        if !matches!(self.activation_function.as_str(), "gelu_new" | "gelu_pytorch_tanh" | "gelu") {
            return Err(ModelError::Unsupported(format!("`activation_function` = \"{}\"", self.activation_function)));
        }
        if self.tie_word_embeddings == Some(false) {
            return Err(ModelError::Unsupported("`tie_word_embeddings` = false (GPT-2's head is tied to `wte`)".to_string()));
        }
        Ok(())
    }
}

/// A `Conv1D` layer (`x · W + b`, W stored `[in, out]`), optionally with LoRA.
#[derive(Debug, Clone)]
pub struct Linear {
    pub weight: Tensor,
    pub bias: Tensor,
    pub lora: Option<Lora>,
}

impl Linear {
    fn load(vb: VarBuilder, n_in: usize, n_out: usize) -> Result<Self> {
        Ok(Linear { weight: vb.get((n_in, n_out), "weight")?, bias: vb.get(n_out, "bias")?, lora: None })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (n_in, n_out) = self.weight.dims2()?;
        let shape = x.dims().to_vec();
        let rows = x.elem_count() / n_in;
        let flat = x.reshape((rows, n_in))?;
        let product = if trains(&self.weight) { flat.matmul(&self.weight)? } else { super::ops::frozen_matmul(&flat, &self.weight)? };
        let mut y = product.broadcast_add(&self.bias)?;
        if let Some(lora) = &self.lora {
            y = (y + lora.forward(&flat)?)?;
        }
        let mut out_shape = shape;
        *out_shape.last_mut().expect("inputs have a feature dimension") = n_out;
        Ok(y.reshape(out_shape)?)
    }
}

/// Whether a weight takes part in backpropagation (a variable, or computed from one).
fn trains(weight: &Tensor) -> bool {
    weight.is_variable() || weight.track_op()
}

/// LayerNorm (one custom op with its backward; candle's fused one has none).
#[derive(Debug, Clone)]
pub struct LayerNorm {
    pub weight: Tensor,
    pub bias: Tensor,
    eps: f64,
}

impl LayerNorm {
    fn load(vb: VarBuilder, size: usize, eps: f64) -> Result<Self> {
        Ok(LayerNorm { weight: vb.get(size, "weight")?, bias: vb.get(size, "bias")?, eps })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        super::ops::layer_norm(x, &self.weight, &self.bias, self.eps)
    }
}

/// Softmax over the last dimension from primitive ops (differentiable).
pub fn softmax_last_dim(x: &Tensor) -> Result<Tensor> {
    let max = x.max_keepdim(D::Minus1)?;
    let exp = x.broadcast_sub(&max)?.exp()?;
    Ok(exp.broadcast_div(&exp.sum_keepdim(D::Minus1)?)?)
}

/// Keys and values of the positions already seen, per layer: `[b, h, t, d]`.
#[derive(Debug, Clone, Default)]
pub struct KvCache {
    pub layers: Vec<Option<(Tensor, Tensor)>>,
}

impl KvCache {
    pub fn new(n_layer: usize) -> Self {
        KvCache { layers: vec![None; n_layer] }
    }

    /// How many positions the cache holds.
    pub fn len(&self) -> usize {
        self.layers.first().and_then(|l| l.as_ref()).map_or(0, |(k, _)| k.dim(2).unwrap_or(0))
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[derive(Debug, Clone)]
pub struct Attention {
    pub c_attn: Linear,
    pub c_proj: Linear,
    n_head: usize,
    head_dim: usize,
}

impl Attention {
    fn load(vb: VarBuilder, config: &Config) -> Result<Self> {
        let c = config.n_embd;
        Ok(Attention { c_attn: Linear::load(vb.pp("c_attn"), c, 3 * c)?, c_proj: Linear::load(vb.pp("c_proj"), c, c)?, n_head: config.n_head, head_dim: config.head_dim() })
    }

    /// Causal self-attention; queries see the cached keys and those before them.
    fn forward(&self, x: &Tensor, cache: Option<&mut Option<(Tensor, Tensor)>>) -> Result<Tensor> {
        let (b, t, c) = x.dims3()?;
        let qkv = self.c_attn.forward(x)?;
        let split = |i: usize| -> Result<Tensor> { Ok(qkv.narrow(D::Minus1, i * c, c)?.reshape((b, t, self.n_head, self.head_dim))?.transpose(1, 2)?.contiguous()?) };
        let (q, mut k, mut v) = (split(0)?, split(1)?, split(2)?);
        if let Some(cache) = cache {
            if let Some((past_k, past_v)) = cache.as_ref() {
                k = Tensor::cat(&[past_k, &k], 2)?;
                v = Tensor::cat(&[past_v, &v], 2)?;
            }
            *cache = Some((k.clone(), v.clone()));
        }
        let past = k.dim(2)? - t;
        let probs = super::ops::causal_softmax(&q.matmul(&k.t()?)?, 1.0 / (self.head_dim as f64).sqrt(), past)?;
        let out = probs.matmul(&v)?.transpose(1, 2)?.reshape((b, t, c))?;
        self.c_proj.forward(&out)
    }
}

#[derive(Debug, Clone)]
pub struct Mlp {
    pub c_fc: Linear,
    pub c_proj: Linear,
    /// `gelu` (the exact, erf form) rather than the tanh approximation.
    exact_gelu: bool,
}

impl Mlp {
    fn load(vb: VarBuilder, config: &Config) -> Result<Self> {
        Ok(Mlp {
            c_fc: Linear::load(vb.pp("c_fc"), config.n_embd, config.inner())?,
            c_proj: Linear::load(vb.pp("c_proj"), config.inner(), config.n_embd)?,
            exact_gelu: config.activation_function == "gelu",
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let h = self.c_fc.forward(x)?;
        // gelu_new (= gelu_pytorch_tanh): the tanh approximation GPT-2 uses.
        let h = if self.exact_gelu { h.gelu_erf()? } else { super::ops::gelu_tanh(&h)? };
        self.c_proj.forward(&h)
    }
}

#[derive(Debug, Clone)]
pub struct Block {
    pub ln_1: LayerNorm,
    pub attn: Attention,
    pub ln_2: LayerNorm,
    pub mlp: Mlp,
}

impl Block {
    fn load(vb: VarBuilder, config: &Config) -> Result<Self> {
        let eps = config.layer_norm_epsilon;
        Ok(Block {
            ln_1: LayerNorm::load(vb.pp("ln_1"), config.n_embd, eps)?,
            attn: Attention::load(vb.pp("attn"), config)?,
            ln_2: LayerNorm::load(vb.pp("ln_2"), config.n_embd, eps)?,
            mlp: Mlp::load(vb.pp("mlp"), config)?,
        })
    }

    fn forward(&self, x: &Tensor, cache: Option<&mut Option<(Tensor, Tensor)>>) -> Result<Tensor> {
        let x = (x + self.attn.forward(&self.ln_1.forward(x)?, cache)?)?;
        Ok((&x + self.mlp.forward(&self.ln_2.forward(&x)?)?)?)
    }
}

#[derive(Debug, Clone)]
pub struct Gpt2 {
    pub config: Config,
    pub wte: Tensor,
    pub wpe: Tensor,
    pub blocks: Vec<Block>,
    pub ln_f: LayerNorm,
    /// PEFT's trainable tokens: embedding rows (tied to the head) replaced.
    pub token_rows: Option<TokenRows>,
}

/// Rows of the token embedding replaced by `values`, as PEFT's
/// `trainable_token_indices` does (`index_copy`; the values are rows, not
/// deltas, whatever PEFT's tensor name says). The tied head sees them too.
#[derive(Debug, Clone)]
pub struct TokenRows {
    pub indices: Vec<u32>,
    /// `[indices.len(), n_embd]`
    pub values: Tensor,
    /// The embedding with those rows zeroed (a constant).
    masked: Tensor,
    index: Tensor,
    /// Token id → its row in `values`.
    slot: std::collections::HashMap<u32, u32>,
}

impl TokenRows {
    pub fn new(wte: &Tensor, indices: Vec<u32>, values: Tensor) -> Result<Self> {
        let (vocab, width) = wte.dims2()?;
        if let Some(bad) = indices.iter().find(|&&i| i as usize >= vocab) {
            return Err(ModelError::Config(format!("trainable token {bad} is outside the vocabulary of {vocab}")));
        }
        if values.dims() != [indices.len(), width] {
            return Err(ModelError::Config(format!("trainable token rows have shape {:?}, expected [{}, {width}]", values.dims(), indices.len())));
        }
        let mut keep = vec![1f32; vocab];
        for &i in &indices {
            keep[i as usize] = 0.0;
        }
        let keep = Tensor::from_vec(keep, (vocab, 1), wte.device())?.to_dtype(wte.dtype())?;
        let masked = wte.detach().broadcast_mul(&keep)?;
        let index = Tensor::new(indices.as_slice(), wte.device())?;
        let slot = indices.iter().enumerate().map(|(i, &id)| (id, i as u32)).collect();
        Ok(TokenRows { indices, values, masked, index, slot })
    }

    /// The embedding with the rows replaced.
    pub fn apply(&self) -> Result<Tensor> {
        Ok(self.masked.index_add(&self.index, &self.values, 0)?)
    }

    /// Embeddings of `ids` `[n]`: the frozen rows gathered, plus the
    /// trainable rows where an id is one of them (a gather from `values`
    /// with a zero row appended), so backward touches only `values`.
    fn embedding(&self, ids: &Tensor) -> Result<Tensor> {
        let zero = self.indices.len() as u32;
        let slots: Vec<u32> = ids.to_vec1::<u32>()?.iter().map(|id| self.slot.get(id).copied().unwrap_or(zero)).collect();
        let slots = Tensor::new(slots, ids.device())?;
        let width = self.values.dim(1)?;
        let extended = Tensor::cat(&[&self.values, &Tensor::zeros((1, width), self.values.dtype(), self.values.device())?], 0)?;
        Ok((self.masked.embedding(ids)? + extended.embedding(&slots)?)?)
    }

    /// The tied head over `hidden` `[n, width]`: the frozen rows' logits,
    /// with the trainable rows' columns added in.
    fn head(&self, hidden: &Tensor) -> Result<Tensor> {
        let frozen = super::ops::frozen_matmul(hidden, &self.masked.t()?)?;
        Ok(frozen.index_add(&self.index, &hidden.matmul(&self.values.t()?)?, 1)?)
    }
}

impl Gpt2 {
    /// Loads from a VarBuilder over a checkpoint; `transformer.` prefixed
    /// names (GPT2LMHeadModel) and bare ones (GPT2Model) are both accepted.
    pub fn load(vb: VarBuilder, config: &Config) -> Result<Self> {
        config.validate()?;
        let vb = if vb.contains_tensor("transformer.wte.weight") { vb.pp("transformer") } else { vb };
        let c = config.n_embd;
        let blocks = (0..config.n_layer).map(|i| Block::load(vb.pp(format!("h.{i}")), config)).collect::<Result<Vec<_>>>()?;
        Ok(Gpt2 {
            config: config.clone(),
            wte: vb.get((config.vocab_size, c), "wte.weight")?,
            wpe: vb.get((config.n_positions, c), "wpe.weight")?,
            blocks,
            ln_f: LayerNorm::load(vb.pp("ln_f"), c, config.layer_norm_epsilon)?,
            token_rows: None,
        })
    }

    /// The family this model belongs to (what its PEFT names and LoRA
    /// targets are).
    pub const fn family(&self) -> Family {
        Family::Gpt2
    }

    pub fn device(&self) -> &Device {
        self.wte.device()
    }

    /// A new GPT-2 initialised as transformers does (`_init_weights`):
    /// weights and embeddings ~ N(0, 0.02), the two `c_proj` weights
    /// ~ N(0, 0.02 / √(2·n_layer)), biases 0, LayerNorm weights 1.
    pub fn scratch(config: &Config, rng: &mut super::train::Rng) -> Result<Self> {
        const STD: f64 = 0.02;
        let c = config.n_embd;
        let mut tensors = std::collections::HashMap::new();
        let mut normal = |name: String, shape: &[usize], std: f64| -> Result<()> {
            tensors.insert(name, rng.tensor(shape, |r| r.normal() * std)?);
            Ok(())
        };
        normal("wte.weight".into(), &[config.vocab_size, c], STD)?;
        normal("wpe.weight".into(), &[config.n_positions, c], STD)?;
        let projection_std = STD / (2.0 * config.n_layer as f64).sqrt();
        for i in 0..config.n_layer {
            normal(format!("h.{i}.attn.c_attn.weight"), &[c, 3 * c], STD)?;
            normal(format!("h.{i}.attn.c_proj.weight"), &[c, c], projection_std)?;
            normal(format!("h.{i}.mlp.c_fc.weight"), &[c, config.inner()], STD)?;
            normal(format!("h.{i}.mlp.c_proj.weight"), &[config.inner(), c], projection_std)?;
        }
        let mut constant = |name: String, size: usize, value: f64| -> Result<()> {
            tensors.insert(name, (Tensor::ones(size, DType::F32, &Device::Cpu)? * value)?);
            Ok(())
        };
        for i in 0..config.n_layer {
            constant(format!("h.{i}.attn.c_attn.bias"), 3 * c, 0.0)?;
            constant(format!("h.{i}.attn.c_proj.bias"), c, 0.0)?;
            constant(format!("h.{i}.mlp.c_fc.bias"), config.inner(), 0.0)?;
            constant(format!("h.{i}.mlp.c_proj.bias"), c, 0.0)?;
            for ln in ["ln_1", "ln_2"] {
                constant(format!("h.{i}.{ln}.weight"), c, 1.0)?;
                constant(format!("h.{i}.{ln}.bias"), c, 0.0)?;
            }
        }
        constant("ln_f.weight".into(), c, 1.0)?;
        constant("ln_f.bias".into(), c, 0.0)?;
        Gpt2::load(VarBuilder::from_tensors(tensors, DType::F32, &Device::Cpu), config)
    }

    /// Calls `f` on every weight with its checkpoint name
    /// (`transformer.h.0.attn.c_attn.weight`, ...), in a fixed order.
    pub fn visit_mut(&mut self, mut f: impl FnMut(&str, &mut Tensor) -> Result<()>) -> Result<()> {
        f("transformer.wte.weight", &mut self.wte)?;
        f("transformer.wpe.weight", &mut self.wpe)?;
        for (i, block) in self.blocks.iter_mut().enumerate() {
            let prefix = format!("transformer.h.{i}");
            let weights = [
                ("ln_1.weight", &mut block.ln_1.weight),
                ("ln_1.bias", &mut block.ln_1.bias),
                ("attn.c_attn.weight", &mut block.attn.c_attn.weight),
                ("attn.c_attn.bias", &mut block.attn.c_attn.bias),
                ("attn.c_proj.weight", &mut block.attn.c_proj.weight),
                ("attn.c_proj.bias", &mut block.attn.c_proj.bias),
                ("ln_2.weight", &mut block.ln_2.weight),
                ("ln_2.bias", &mut block.ln_2.bias),
                ("mlp.c_fc.weight", &mut block.mlp.c_fc.weight),
                ("mlp.c_fc.bias", &mut block.mlp.c_fc.bias),
                ("mlp.c_proj.weight", &mut block.mlp.c_proj.weight),
                ("mlp.c_proj.bias", &mut block.mlp.c_proj.bias),
            ];
            for (name, tensor) in weights {
                f(&format!("{prefix}.{name}"), tensor)?;
            }
        }
        f("transformer.ln_f.weight", &mut self.ln_f.weight)?;
        f("transformer.ln_f.bias", &mut self.ln_f.bias)
    }

    /// Every weight under its checkpoint name (the head is tied: not repeated).
    pub fn named_tensors(&self) -> std::collections::BTreeMap<String, Tensor> {
        let mut out = std::collections::BTreeMap::new();
        let mut copy = self.clone();
        copy.visit_mut(|name, tensor| {
            out.insert(name.to_string(), tensor.clone());
            Ok(())
        })
        .expect("collecting cannot fail");
        out
    }

    /// The linear layers a LoRA target name selects, with their PEFT module names.
    pub fn linears_mut(&mut self, target: LoraTarget) -> Vec<(String, &mut Linear)> {
        let mut out = Vec::new();
        for (i, block) in self.blocks.iter_mut().enumerate() {
            let prefix = format!("transformer.h.{i}");
            let layers = [("attn.c_attn", &mut block.attn.c_attn), ("attn.c_proj", &mut block.attn.c_proj), ("mlp.c_fc", &mut block.mlp.c_fc), ("mlp.c_proj", &mut block.mlp.c_proj)];
            for (layer, linear) in layers {
                if target.includes(Family::Gpt2, layer) {
                    out.push((format!("{prefix}.{layer}"), linear));
                }
            }
        }
        out
    }

    /// Logits `[b, t, vocab]` for `input_ids` `[b, t]`, continuing from
    /// `cache` (updated in place) when given.
    pub fn forward(&self, input_ids: &Tensor, cache: Option<&mut KvCache>) -> Result<Tensor> {
        let (b, t) = input_ids.dims2()?;
        let hidden = self.hidden(input_ids, cache)?;
        let logits = match &self.token_rows {
            Some(rows) => rows.head(&hidden)?,
            None if trains(&self.wte) => hidden.matmul(&self.wte.t()?)?,
            None => super::ops::frozen_matmul(&hidden, &self.wte.t()?)?,
        };
        Ok(logits.reshape((b, t, self.config.vocab_size))?)
    }

    /// Mean next-token loss of `input_ids` `[b, t]` against `labels` `[b·t]`;
    /// `grad` says whether backward will run (otherwise the graph is cut).
    /// With a frozen head the logits are never kept (a fused op).
    pub fn loss(&self, input_ids: &Tensor, labels: &Tensor, grad: bool) -> Result<Tensor> {
        let cut = |t: Tensor| if grad { t } else { t.detach() };
        if let Some(rows) = &self.token_rows {
            let hidden = cut(self.hidden(input_ids, None)?);
            return super::ops::linear_cross_entropy_rows(&hidden, &rows.masked, &rows.indices, &cut(rows.values.clone()), labels);
        }
        if !trains(&self.wte) {
            let hidden = cut(self.hidden(input_ids, None)?);
            return super::ops::linear_cross_entropy(&hidden, &self.wte, labels);
        }
        let logits = cut(self.forward(input_ids, None)?);
        super::ops::cross_entropy(&logits.reshape(((), self.config.vocab_size))?, labels)
    }

    /// The final hidden states `[b·t, n_embd]` (after `ln_f`).
    fn hidden(&self, input_ids: &Tensor, mut cache: Option<&mut KvCache>) -> Result<Tensor> {
        let (b, t) = input_ids.dims2()?;
        let past = cache.as_ref().map_or(0, |c| c.len());
        if past + t > self.config.n_positions {
            return Err(ModelError::Config(format!("{} positions exceed the model's context of {}", past + t, self.config.n_positions)));
        }
        let positions = Tensor::arange(past as u32, (past + t) as u32, self.device())?;
        let ids = input_ids.flatten_all()?;
        let tokens = match &self.token_rows {
            Some(rows) => rows.embedding(&ids)?,
            None => self.wte.embedding(&ids)?,
        };
        let tokens = tokens.reshape((b, t, self.config.n_embd))?;
        let mut x = tokens.broadcast_add(&self.wpe.embedding(&positions)?)?;
        for (i, block) in self.blocks.iter().enumerate() {
            let layer_cache = cache.as_deref_mut().map(|c| &mut c.layers[i]);
            x = block.forward(&x, layer_cache)?;
        }
        let x = self.ln_f.forward(&x)?;
        Ok(x.reshape((b * t, self.config.n_embd))?)
    }

    /// Greedy decoding with the KV cache: up to `max_new_tokens` ids, stopping
    /// after `eos` (included) as transformers' `generate()` does. Returns the
    /// new ids and the logits at the last prompt position.
    pub fn greedy(&self, prompt: &[u32], max_new_tokens: usize, eos: Option<u32>) -> Result<(Vec<u32>, Vec<f32>)> {
        self.decode(prompt, max_new_tokens, eos, None)
    }

    /// Decoding with the KV cache, greedy or sampled (see [`greedy`](Self::greedy)).
    pub fn decode(&self, prompt: &[u32], max_new_tokens: usize, eos: Option<u32>, sampling: Option<&Sampling>) -> Result<(Vec<u32>, Vec<f32>)> {
        if prompt.is_empty() {
            return Err(ModelError::Config("the prompt encodes to no tokens".to_string()));
        }
        let mut cache = KvCache::new(self.config.n_layer);
        let input = Tensor::new(prompt, self.device())?.unsqueeze(0)?;
        let logits = self.forward(&input, Some(&mut cache))?;
        let mut last = logits.get(0)?.get(prompt.len() - 1)?;
        let prompt_logits = last.to_vec1::<f32>()?;
        let mut generated = Vec::new();
        let mut rng = sampling.map(|s| super::train::Rng::new(s.seed));
        while generated.len() < max_new_tokens && prompt.len() + generated.len() < self.config.n_positions {
            let next = match (sampling, rng.as_mut()) {
                (Some(s), Some(rng)) if s.temperature > 0.0 => s.pick(&last.to_vec1::<f32>()?, rng),
                _ => last.argmax(0)?.to_scalar::<u32>()?,
            };
            generated.push(next);
            if Some(next) == eos || generated.len() == max_new_tokens {
                break;
            }
            let input = Tensor::new(&[next], self.device())?.unsqueeze(0)?;
            last = self.forward(&input, Some(&mut cache))?.get(0)?.get(0)?;
        }
        Ok((generated, prompt_logits))
    }
}

/// Sampling settings: `temperature` 0 is greedy; `top_k` 0 keeps every token.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Sampling {
    pub temperature: f64,
    pub top_k: usize,
    pub seed: u64,
}

impl Sampling {
    /// Draws a token from `softmax(logits / temperature)` over the `top_k` largest.
    pub fn pick(&self, logits: &[f32], rng: &mut super::train::Rng) -> u32 {
        let mut order: Vec<u32> = (0..logits.len() as u32).collect();
        // Largest first; ties by id, so a seed gives one sequence.
        order.sort_by(|&a, &b| logits[b as usize].total_cmp(&logits[a as usize]).then(a.cmp(&b)));
        if self.top_k > 0 {
            order.truncate(self.top_k);
        }
        let max = logits[order[0] as usize] as f64;
        let weights: Vec<f64> = order.iter().map(|&i| ((logits[i as usize] as f64 - max) / self.temperature).exp()).collect();
        let mut target = rng.uniform() * weights.iter().sum::<f64>();
        for (&id, w) in order.iter().zip(&weights) {
            if target < *w {
                return id;
            }
            target -= w;
        }
        *order.last().expect("at least one token")
    }
}

impl Module for Gpt2 {
    fn forward(&self, input_ids: &Tensor) -> candle_core::Result<Tensor> {
        Gpt2::forward(self, input_ids, None).map_err(|e| candle_core::Error::Msg(e.to_string()))
    }
}

/// How the rows a vocabulary adds to the embedding start.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EmbeddingInit {
    /// transformers' `mean_resizing`: the old rows' mean plus noise drawn
    /// with 1e-9 times their variance (the diagonal of the covariance
    /// transformers samples with).
    Mean,
    /// N(0, 0.02²), GPT-2's `initializer_range`.
    Normal,
}

impl Gpt2 {
    /// Grows the token embedding (and the tied head) to `new_size` rows;
    /// the new rows start as `init` says, drawn from `rng`.
    pub fn resize_token_embeddings(&mut self, new_size: usize, init: EmbeddingInit, rng: &mut super::train::Rng) -> Result<()> {
        let (old_size, width) = self.wte.dims2()?;
        if new_size < old_size {
            return Err(ModelError::Config(format!("cannot shrink the embedding from {old_size} to {new_size} rows")));
        }
        if new_size == old_size {
            return Ok(());
        }
        let added = new_size - old_size;
        let rows = match init {
            EmbeddingInit::Normal => rng.tensor(&[added, width], |r| r.normal() * 0.02)?,
            EmbeddingInit::Mean => {
                let old = self.wte.to_dtype(DType::F32)?;
                let mean = old.mean(0)?;
                let std = (old.broadcast_sub(&mean)?.sqr()?.mean(0)? * 1e-9)?.sqrt()?;
                let noise = rng.tensor(&[added, width], |r| r.normal())?;
                noise.broadcast_mul(&std)?.broadcast_add(&mean)?
            }
        };
        self.wte = Tensor::cat(&[&self.wte, &rows.to_dtype(self.wte.dtype())?], 0)?;
        self.config.vocab_size = new_size;
        Ok(())
    }
}
