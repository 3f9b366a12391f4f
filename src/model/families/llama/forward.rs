//! The Llama family in candle (`LlamaForCausalLM`, and `Qwen2ForCausalLM`,
//! which is Llama with biases on the query, key and value projections):
//! SmolLM2, TinyLlama, Llama 3.2, Qwen2.5.
//!
//! RMSNorm, rotary position embeddings (with `rope_scaling` of type
//! `linear` or `llama3`), grouped- or multi-query attention, a SiLU-gated
//! MLP, and a head tied to the embedding or not. Weight names follow the
//! Hugging Face checkpoint (`model.layers.{i}.self_attn.q_proj.weight`, ...);
//! linear weights are stored `[out, in]`.
//!
//! RMSNorm, RoPE and the SiLU gate are custom ops with an analytic backward
//! ([`ops`]); grouped-query attention never repeats the keys: the
//! queries of a group are stacked against their shared key-value head.

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;

use super::{Config, QWEN2};
use crate::model::families::{Dims, Family, ModelConfig, Network};
use crate::model::layers::{KvCache, Linear, RowLayout, TokenMatrix, WeightLayout};
use crate::model::lora::LoraTarget;
use crate::model::{ModelError, Result, attention, ops, rng::Rng};
use crate::onnx::proto::ModelProto;

/// RMSNorm (one custom op with its backward).
#[derive(Debug, Clone)]
pub struct RmsNorm {
    pub weight: Tensor,
    eps: f64,
}

impl RmsNorm {
    fn load(vb: VarBuilder, size: usize, eps: f64) -> Result<Self> {
        Ok(RmsNorm {
            weight: vb.get(size, "weight")?,
            eps,
        })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        ops::rms_norm(x, &self.weight, self.eps)
    }
}

#[derive(Debug, Clone)]
pub struct Attention {
    pub q_proj: Linear,
    pub k_proj: Linear,
    pub v_proj: Linear,
    pub o_proj: Linear,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
}

/// What every layer's attention shares: the rotary frequencies.
struct Rotary<'a> {
    inv_freq: &'a [f32],
    scaling: f32,
}

impl Attention {
    fn load(vb: VarBuilder, config: &Config, family: Family) -> Result<Self> {
        let (c, d) = (config.hidden_size, config.head_dim());
        let (heads, kv_heads) = (config.num_attention_heads, config.kv_heads());
        let qkv_bias = config.attention_bias || family == QWEN2;
        Ok(Attention {
            q_proj: linear(&vb.pp("q_proj"), c, heads * d, qkv_bias)?,
            k_proj: linear(&vb.pp("k_proj"), c, kv_heads * d, qkv_bias)?,
            v_proj: linear(&vb.pp("v_proj"), c, kv_heads * d, qkv_bias)?,
            o_proj: linear(&vb.pp("o_proj"), heads * d, c, config.attention_bias)?,
            heads,
            kv_heads,
            head_dim: d,
        })
    }

    fn forward(
        &self,
        x: &Tensor,
        cache: Option<&mut Option<(Tensor, Tensor)>>,
        padding: &RowLayout,
        rotary: &Rotary<'_>,
        past: usize,
    ) -> Result<Tensor> {
        let (b, t, _) = x.dims3()?;
        let (h, kv, d) = (self.heads, self.kv_heads, self.head_dim);
        let positions = padding.positions(b, past, t);
        let rotate = Some((positions.as_slice(), rotary.inv_freq, rotary.scaling));
        // [b, heads, t, d], queries and keys rotated (one node each).
        let q = ops::split_heads(&self.q_proj.forward(x)?, h, rotate)?;
        let k = ops::split_heads(&self.k_proj.forward(x)?, kv, rotate)?;
        let v = ops::split_heads(&self.v_proj.forward(x)?, kv, None)?;
        let (k, v) = KvCache::append(cache, k, v)?;
        // [b, t, heads · d]: query head i reads key-value head i / (h / kv).
        let out = attention::attention(&q, &k, &v, 1.0 / (d as f64).sqrt(), padding)?;
        self.o_proj.forward(&out)
    }
}

#[derive(Debug, Clone)]
pub struct Mlp {
    pub gate_proj: Linear,
    pub up_proj: Linear,
    pub down_proj: Linear,
}

impl Mlp {
    fn load(vb: VarBuilder, config: &Config) -> Result<Self> {
        let (c, i, bias) = (
            config.hidden_size,
            config.intermediate_size,
            config.mlp_bias,
        );
        Ok(Mlp {
            gate_proj: linear(&vb.pp("gate_proj"), c, i, bias)?,
            up_proj: linear(&vb.pp("up_proj"), c, i, bias)?,
            down_proj: linear(&vb.pp("down_proj"), i, c, bias)?,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.down_proj.forward(&ops::silu_mul(
            &self.gate_proj.forward(x)?,
            &self.up_proj.forward(x)?,
        )?)
    }
}

#[derive(Debug, Clone)]
pub struct Layer {
    pub input_layernorm: RmsNorm,
    pub self_attn: Attention,
    pub post_attention_layernorm: RmsNorm,
    pub mlp: Mlp,
}

impl Layer {
    fn load(vb: VarBuilder, config: &Config, family: Family) -> Result<Self> {
        let (c, eps) = (config.hidden_size, config.rms_norm_eps);
        Ok(Layer {
            input_layernorm: RmsNorm::load(vb.pp("input_layernorm"), c, eps)?,
            self_attn: Attention::load(vb.pp("self_attn"), config, family)?,
            post_attention_layernorm: RmsNorm::load(vb.pp("post_attention_layernorm"), c, eps)?,
            mlp: Mlp::load(vb.pp("mlp"), config)?,
        })
    }

    /// The layer's linears by their path inside it, in checkpoint order.
    fn linears_mut(&mut self) -> [(&'static str, &mut Linear); 7] {
        let (a, m) = (&mut self.self_attn, &mut self.mlp);
        [
            ("self_attn.q_proj", &mut a.q_proj),
            ("self_attn.k_proj", &mut a.k_proj),
            ("self_attn.v_proj", &mut a.v_proj),
            ("self_attn.o_proj", &mut a.o_proj),
            ("mlp.gate_proj", &mut m.gate_proj),
            ("mlp.up_proj", &mut m.up_proj),
            ("mlp.down_proj", &mut m.down_proj),
        ]
    }
}

/// A `torch.nn.Linear` (weight `[out, in]`).
fn linear(vb: &VarBuilder, n_in: usize, n_out: usize, bias: bool) -> Result<Linear> {
    Linear::load(vb, n_in, n_out, bias, WeightLayout::OutIn)
}

#[derive(Debug, Clone)]
pub struct Llama {
    pub config: Config,
    pub family: Family,
    pub embed_tokens: TokenMatrix,
    pub layers: Vec<Layer>,
    pub norm: RmsNorm,
    /// The output head; `None` when it is tied to `embed_tokens`.
    pub lm_head: Option<TokenMatrix>,
    inv_freq: Vec<f32>,
    attention_scaling: f32,
}

impl Llama {
    /// Loads from a VarBuilder over a checkpoint (`model.` prefixed names, as
    /// `LlamaForCausalLM` saves them, or bare ones).
    pub fn load(vb: VarBuilder, config: &Config) -> Result<Self> {
        config.validate()?;
        let family = config.family()?;
        let head = (!config.tie_word_embeddings)
            .then(|| vb.get((config.vocab_size, config.hidden_size), "lm_head.weight"))
            .transpose()?
            .map(TokenMatrix::new);
        let vb = if vb.contains_tensor("model.embed_tokens.weight") {
            vb.pp("model")
        } else {
            vb
        };
        let layers = (0..config.num_hidden_layers)
            .map(|i| Layer::load(vb.pp(format!("layers.{i}")), config, family))
            .collect::<Result<Vec<_>>>()?;
        let (inv_freq, attention_scaling) = config.rope()?;
        Ok(Llama {
            config: config.clone(),
            family,
            embed_tokens: TokenMatrix::new(vb.get(
                (config.vocab_size, config.hidden_size),
                "embed_tokens.weight",
            )?),
            layers,
            norm: RmsNorm::load(vb.pp("norm"), config.hidden_size, config.rms_norm_eps)?,
            lm_head: head,
            inv_freq,
            attention_scaling,
        })
    }

    /// A new model initialised as transformers does (`_init_weights`):
    /// linear weights and the embedding ~ N(0, 0.02), biases 0, norms 1.
    pub fn scratch(config: &Config, rng: &mut Rng) -> Result<Self> {
        const STD: f64 = 0.02;
        let (c, d, i) = (
            config.hidden_size,
            config.head_dim(),
            config.intermediate_size,
        );
        let (h, kv) = (config.num_attention_heads, config.kv_heads());
        let family = config.family()?;
        let mut tensors = std::collections::HashMap::new();
        let mut normal = |name: String, shape: &[usize]| -> Result<()> {
            tensors.insert(name, rng.tensor(shape, |r| r.normal() * STD)?);
            Ok(())
        };
        normal("model.embed_tokens.weight".into(), &[config.vocab_size, c])?;
        let shapes = [
            ("self_attn.q_proj", h * d, c),
            ("self_attn.k_proj", kv * d, c),
            ("self_attn.v_proj", kv * d, c),
            ("self_attn.o_proj", c, h * d),
            ("mlp.gate_proj", i, c),
            ("mlp.up_proj", i, c),
            ("mlp.down_proj", c, i),
        ];
        for layer in 0..config.num_hidden_layers {
            for (name, out, n_in) in shapes {
                normal(format!("model.layers.{layer}.{name}.weight"), &[out, n_in])?;
            }
        }
        if !config.tie_word_embeddings {
            normal("lm_head.weight".into(), &[config.vocab_size, c])?;
        }
        let mut constant = |name: String, size: usize, value: f64| -> Result<()> {
            tensors.insert(
                name,
                (Tensor::ones(size, DType::F32, &Device::Cpu)? * value)?,
            );
            Ok(())
        };
        for layer in 0..config.num_hidden_layers {
            let prefix = format!("model.layers.{layer}");
            constant(format!("{prefix}.input_layernorm.weight"), c, 1.0)?;
            constant(format!("{prefix}.post_attention_layernorm.weight"), c, 1.0)?;
            for (name, out, _) in shapes {
                let biased = if name.starts_with("mlp.") {
                    config.mlp_bias
                } else {
                    config.attention_bias || (family == QWEN2 && name != "self_attn.o_proj")
                };
                if biased {
                    constant(format!("{prefix}.{name}.bias"), out, 0.0)?;
                }
            }
        }
        constant("model.norm.weight".into(), c, 1.0)?;
        Llama::load(
            VarBuilder::from_tensors(tensors, DType::F32, &Device::Cpu),
            config,
        )
    }

    /// The rotary frequencies `[head_dim / 2]` and the attention factor.
    pub fn rotary(&self) -> (&[f32], f32) {
        (&self.inv_freq, self.attention_scaling)
    }

    /// The matrix the logits come from: `lm_head`, or the tied embedding.
    pub fn head(&self) -> &TokenMatrix {
        self.lm_head.as_ref().unwrap_or(&self.embed_tokens)
    }

    /// The token matrices under their module names: the embedding, then an untied head.
    pub fn token_matrices_mut(&mut self) -> Vec<(&'static str, &mut TokenMatrix)> {
        let mut out = vec![("model.embed_tokens", &mut self.embed_tokens)];
        if let Some(head) = self.lm_head.as_mut() {
            out.push(("lm_head", head));
        }
        out
    }

    /// Calls `f` on every weight with its checkpoint name, in a fixed order.
    pub fn visit_mut(&mut self, mut f: impl FnMut(&str, &mut Tensor) -> Result<()>) -> Result<()> {
        f("model.embed_tokens.weight", &mut self.embed_tokens.weight)?;
        for (i, layer) in self.layers.iter_mut().enumerate() {
            let prefix = format!("model.layers.{i}");
            f(
                &format!("{prefix}.input_layernorm.weight"),
                &mut layer.input_layernorm.weight,
            )?;
            f(
                &format!("{prefix}.post_attention_layernorm.weight"),
                &mut layer.post_attention_layernorm.weight,
            )?;
            for (name, linear) in layer.linears_mut() {
                f(&format!("{prefix}.{name}.weight"), &mut linear.weight)?;
                if let Some(bias) = linear.bias.as_mut() {
                    f(&format!("{prefix}.{name}.bias"), bias)?;
                }
            }
        }
        f("model.norm.weight", &mut self.norm.weight)?;
        if let Some(head) = self.lm_head.as_mut() {
            f("lm_head.weight", &mut head.weight)?;
        }
        Ok(())
    }

    /// The linear layers a LoRA target name selects, with their PEFT module names.
    pub fn linears_mut(&mut self, target: LoraTarget) -> Vec<(String, &mut Linear)> {
        let family = self.family;
        let mut out = Vec::new();
        for (i, layer) in self.layers.iter_mut().enumerate() {
            for (name, linear) in layer.linears_mut() {
                if target.includes(family, name) {
                    out.push((format!("model.layers.{i}.{name}"), linear));
                }
            }
        }
        out
    }

    /// The final hidden states `[b·t, hidden]` (after `norm`) of `input_ids`
    /// `[b, t]`, continuing from `cache` (updated in place) when given, each
    /// row starting after its left padding.
    pub fn hidden(
        &self,
        input_ids: &Tensor,
        mut cache: Option<&mut KvCache>,
        padding: &RowLayout,
    ) -> Result<Tensor> {
        let (b, t) = input_ids.dims2()?;
        let past = cache.as_ref().map_or(0, |c| c.len());
        if past + t > self.config.max_position_embeddings {
            return Err(ModelError::Config(format!(
                "{} positions exceed the model's context of {}",
                past + t,
                self.config.max_position_embeddings
            )));
        }
        let c = self.config.hidden_size;
        let mut x = self
            .embed_tokens
            .embed(&input_ids.flatten_all()?)?
            .reshape((b, t, c))?;
        let rotary = Rotary {
            inv_freq: &self.inv_freq,
            scaling: self.attention_scaling,
        };
        for (i, layer) in self.layers.iter().enumerate() {
            let layer_cache = cache.as_deref_mut().map(|c| &mut c.layers[i]);
            let attended = layer.self_attn.forward(
                &layer.input_layernorm.forward(&x)?,
                layer_cache,
                padding,
                &rotary,
                past,
            )?;
            x = (x + attended)?;
            x = (&x
                + layer
                    .mlp
                    .forward(&layer.post_attention_layernorm.forward(&x)?)?)?;
        }
        Ok(self.norm.forward(&x)?.reshape((b * t, c))?)
    }
}

impl Network for Llama {
    fn family(&self) -> Family {
        self.family
    }

    fn config(&self) -> ModelConfig {
        self.config.model_config(self.family)
    }

    fn dims(&self) -> Dims {
        self.config.dims()
    }

    fn device(&self) -> &Device {
        self.embed_tokens.weight.device()
    }

    fn embedding(&self) -> &TokenMatrix {
        &self.embed_tokens
    }

    fn head(&self) -> &TokenMatrix {
        Llama::head(self)
    }

    fn token_matrices_mut(&mut self) -> Vec<(&'static str, &mut TokenMatrix)> {
        Llama::token_matrices_mut(self)
    }

    fn set_vocab_size(&mut self, size: usize) {
        self.config.vocab_size = size;
    }

    fn visit_mut(&mut self, f: &mut dyn FnMut(&str, &mut Tensor) -> Result<()>) -> Result<()> {
        Llama::visit_mut(self, f)
    }

    fn linears_mut(&mut self, target: LoraTarget) -> Vec<(String, &mut Linear)> {
        Llama::linears_mut(self, target)
    }

    fn hidden(
        &self,
        input_ids: &Tensor,
        cache: Option<&mut KvCache>,
        padding: &RowLayout,
    ) -> Result<Tensor> {
        Llama::hidden(self, input_ids, cache, padding)
    }

    fn lower(&self, opset: i64) -> Result<ModelProto> {
        super::onnx::export(self, opset)
    }

    fn boxed_clone(&self) -> Box<dyn Network> {
        Box::new(self.clone())
    }
}
