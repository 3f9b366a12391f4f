//! GPT-2 in candle, written for both inference (with a KV cache) and training.
//!
//! Weight names follow the Hugging Face checkpoint (`h.{i}.attn.c_attn.weight`,
//! with or without the `transformer.` prefix of `GPT2LMHeadModel`). GPT-2's
//! linear layers are `Conv1D`: the weight is stored `[in, out]` and applied as
//! `x · W + b`. The language-model head is tied to the token embedding.
//!
//! LayerNorm and softmax are built from primitive tensor ops: candle's fused
//! versions have no backward pass and would silently cut the gradient graph.

use candle_core::{D, DType, Device, Tensor};
use candle_nn::VarBuilder;

use super::{Config, GPT2};
use crate::model::families::{Dims, Family, ModelConfig, Network};
use crate::model::layers::{KvCache, Linear, RowLayout, TokenMatrix, WeightLayout};
use crate::model::lora::LoraTarget;
use crate::model::{ModelError, Result, attention, ops, rng::Rng};
use crate::onnx::proto::ModelProto;

/// LayerNorm (one custom op with its backward; candle's fused one has none).
#[derive(Debug, Clone)]
pub struct LayerNorm {
    pub weight: Tensor,
    pub bias: Tensor,
    eps: f64,
}

impl LayerNorm {
    fn load(vb: VarBuilder, size: usize, eps: f64) -> Result<Self> {
        Ok(LayerNorm {
            weight: vb.get(size, "weight")?,
            bias: vb.get(size, "bias")?,
            eps,
        })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        ops::layer_norm(x, &self.weight, &self.bias, self.eps)
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
        Ok(Attention {
            c_attn: conv1d(&vb.pp("c_attn"), c, 3 * c)?,
            c_proj: conv1d(&vb.pp("c_proj"), c, c)?,
            n_head: config.n_head,
            head_dim: config.head_dim(),
        })
    }

    /// Causal self-attention; queries see the cached keys and those before them.
    fn forward(
        &self,
        x: &Tensor,
        cache: Option<&mut Option<(Tensor, Tensor)>>,
        padding: &RowLayout,
    ) -> Result<Tensor> {
        let (b, t, c) = x.dims3()?;
        let qkv = self.c_attn.forward(x)?;
        let scale = 1.0 / (self.head_dim as f64).sqrt();
        let out = match cache {
            // No cache (training, scoring): queries, keys and values are read in place.
            None => attention::attention_packed(&qkv, self.n_head, self.n_head, scale, padding)?,
            Some(slot) => {
                let split = |i: usize| -> Result<Tensor> {
                    Ok(qkv
                        .narrow(D::Minus1, i * c, c)?
                        .reshape((b, t, self.n_head, self.head_dim))?
                        .transpose(1, 2)?
                        .contiguous()?)
                };
                let (k, v) = KvCache::append(Some(slot), split(1)?, split(2)?)?;
                attention::attention(&split(0)?, &k, &v, scale, padding)?
            }
        };
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
            c_fc: conv1d(&vb.pp("c_fc"), config.n_embd, config.inner())?,
            c_proj: conv1d(&vb.pp("c_proj"), config.inner(), config.n_embd)?,
            exact_gelu: config.activation_function == "gelu",
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let h = self.c_fc.forward(x)?;
        // gelu_new (= gelu_pytorch_tanh): the tanh approximation GPT-2 uses.
        let h = if self.exact_gelu {
            h.gelu_erf()?
        } else {
            ops::gelu_tanh(&h)?
        };
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

    fn forward(
        &self,
        x: &Tensor,
        cache: Option<&mut Option<(Tensor, Tensor)>>,
        padding: &RowLayout,
    ) -> Result<Tensor> {
        let x = (x + self.attn.forward(&self.ln_1.forward(x)?, cache, padding)?)?;
        Ok((&x + self.mlp.forward(&self.ln_2.forward(&x)?)?)?)
    }
}

#[derive(Debug, Clone)]
pub struct Gpt2 {
    pub config: Config,
    /// The token embedding, which is the head too (tied); PEFT's trainable
    /// tokens replace rows of both.
    pub wte: TokenMatrix,
    pub wpe: Tensor,
    pub blocks: Vec<Block>,
    pub ln_f: LayerNorm,
}

/// A GPT-2 layer's weight and bias (every one has a bias).
fn bias_of(linear: &mut Linear) -> (&mut Tensor, &mut Tensor) {
    (
        &mut linear.weight,
        linear.bias.as_mut().expect("GPT-2's layers have biases"),
    )
}

/// A `Conv1D` layer: weight `[in, out]`, with a bias.
fn conv1d(vb: &VarBuilder, n_in: usize, n_out: usize) -> Result<Linear> {
    Linear::load(vb, n_in, n_out, true, WeightLayout::InOut)
}

impl Gpt2 {
    /// Loads from a VarBuilder over a checkpoint; `transformer.` prefixed
    /// names (GPT2LMHeadModel) and bare ones (GPT2Model) are both accepted.
    pub fn load(vb: VarBuilder, config: &Config) -> Result<Self> {
        config.validate()?;
        let vb = if vb.contains_tensor("transformer.wte.weight") {
            vb.pp("transformer")
        } else {
            vb
        };
        let c = config.n_embd;
        let blocks = (0..config.n_layer)
            .map(|i| Block::load(vb.pp(format!("h.{i}")), config))
            .collect::<Result<Vec<_>>>()?;
        Ok(Gpt2 {
            config: config.clone(),
            wte: TokenMatrix::new(vb.get((config.vocab_size, c), "wte.weight")?),
            wpe: vb.get((config.n_positions, c), "wpe.weight")?,
            blocks,
            ln_f: LayerNorm::load(vb.pp("ln_f"), c, config.layer_norm_epsilon)?,
        })
    }

    /// A new GPT-2 initialised as transformers does (`_init_weights`):
    /// weights and embeddings ~ N(0, 0.02), the two `c_proj` weights
    /// ~ N(0, 0.02 / √(2·n_layer)), biases 0, LayerNorm weights 1.
    pub fn scratch(config: &Config, rng: &mut Rng) -> Result<Self> {
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
            normal(
                format!("h.{i}.mlp.c_proj.weight"),
                &[config.inner(), c],
                projection_std,
            )?;
        }
        let mut constant = |name: String, size: usize, value: f64| -> Result<()> {
            tensors.insert(
                name,
                (Tensor::ones(size, DType::F32, &Device::Cpu)? * value)?,
            );
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
        Gpt2::load(
            VarBuilder::from_tensors(tensors, DType::F32, &Device::Cpu),
            config,
        )
    }

    /// Calls `f` on every weight with its checkpoint name
    /// (`transformer.h.0.attn.c_attn.weight`, ...), in a fixed order.
    pub fn visit_mut(&mut self, mut f: impl FnMut(&str, &mut Tensor) -> Result<()>) -> Result<()> {
        f("transformer.wte.weight", &mut self.wte.weight)?;
        f("transformer.wpe.weight", &mut self.wpe)?;
        for (i, block) in self.blocks.iter_mut().enumerate() {
            let prefix = format!("transformer.h.{i}");
            let Block {
                ln_1,
                attn,
                ln_2,
                mlp,
            } = block;
            let (c_attn, attn_proj) = (bias_of(&mut attn.c_attn), bias_of(&mut attn.c_proj));
            let (c_fc, mlp_proj) = (bias_of(&mut mlp.c_fc), bias_of(&mut mlp.c_proj));
            let weights = [
                ("ln_1.weight", &mut ln_1.weight),
                ("ln_1.bias", &mut ln_1.bias),
                ("attn.c_attn.weight", c_attn.0),
                ("attn.c_attn.bias", c_attn.1),
                ("attn.c_proj.weight", attn_proj.0),
                ("attn.c_proj.bias", attn_proj.1),
                ("ln_2.weight", &mut ln_2.weight),
                ("ln_2.bias", &mut ln_2.bias),
                ("mlp.c_fc.weight", c_fc.0),
                ("mlp.c_fc.bias", c_fc.1),
                ("mlp.c_proj.weight", mlp_proj.0),
                ("mlp.c_proj.bias", mlp_proj.1),
            ];
            for (name, tensor) in weights {
                f(&format!("{prefix}.{name}"), tensor)?;
            }
        }
        f("transformer.ln_f.weight", &mut self.ln_f.weight)?;
        f("transformer.ln_f.bias", &mut self.ln_f.bias)
    }

    /// The linear layers a LoRA target name selects, with their PEFT module names.
    pub fn linears_mut(&mut self, target: LoraTarget) -> Vec<(String, &mut Linear)> {
        let mut out = Vec::new();
        for (i, block) in self.blocks.iter_mut().enumerate() {
            let prefix = format!("transformer.h.{i}");
            let layers = [
                ("attn.c_attn", &mut block.attn.c_attn),
                ("attn.c_proj", &mut block.attn.c_proj),
                ("mlp.c_fc", &mut block.mlp.c_fc),
                ("mlp.c_proj", &mut block.mlp.c_proj),
            ];
            for (layer, linear) in layers {
                if target.includes(GPT2, layer) {
                    out.push((format!("{prefix}.{layer}"), linear));
                }
            }
        }
        out
    }

    /// The final hidden states `[b·t, n_embd]` (after `ln_f`) of
    /// `input_ids` `[b, t]`, continuing from `cache` (updated in place) when
    /// given, each row starting after its left padding.
    pub fn hidden(
        &self,
        input_ids: &Tensor,
        mut cache: Option<&mut KvCache>,
        padding: &RowLayout,
    ) -> Result<Tensor> {
        let (b, t) = input_ids.dims2()?;
        let past = cache.as_ref().map_or(0, |c| c.len());
        if past + t > self.config.n_positions {
            return Err(ModelError::Config(format!(
                "{} positions exceed the model's context of {}",
                past + t,
                self.config.n_positions
            )));
        }
        let positions = Tensor::new(padding.positions(b, past, t), self.device())?;
        let ids = input_ids.flatten_all()?;
        let tokens = self.wte.embed(&ids)?.reshape((b, t, self.config.n_embd))?;
        let mut x = (tokens
            + self
                .wpe
                .embedding(&positions)?
                .reshape((b, t, self.config.n_embd))?)?;
        for (i, block) in self.blocks.iter().enumerate() {
            let layer_cache = cache.as_deref_mut().map(|c| &mut c.layers[i]);
            x = block.forward(&x, layer_cache, padding)?;
        }
        let x = self.ln_f.forward(&x)?;
        Ok(x.reshape((b * t, self.config.n_embd))?)
    }
}

impl Network for Gpt2 {
    fn family(&self) -> Family {
        GPT2
    }

    fn config(&self) -> ModelConfig {
        self.config.model_config()
    }

    fn dims(&self) -> Dims {
        self.config.dims()
    }

    fn device(&self) -> &Device {
        self.wte.weight.device()
    }

    fn embedding(&self) -> &TokenMatrix {
        &self.wte
    }

    fn head(&self) -> &TokenMatrix {
        &self.wte
    }

    fn token_matrices_mut(&mut self) -> Vec<(&'static str, &mut TokenMatrix)> {
        vec![("transformer.wte", &mut self.wte)]
    }

    fn set_vocab_size(&mut self, size: usize) {
        self.config.vocab_size = size;
    }

    fn visit_mut(&mut self, f: &mut dyn FnMut(&str, &mut Tensor) -> Result<()>) -> Result<()> {
        Gpt2::visit_mut(self, f)
    }

    fn linears_mut(&mut self, target: LoraTarget) -> Vec<(String, &mut Linear)> {
        Gpt2::linears_mut(self, target)
    }

    fn hidden(
        &self,
        input_ids: &Tensor,
        cache: Option<&mut KvCache>,
        padding: &RowLayout,
    ) -> Result<Tensor> {
        Gpt2::hidden(self, input_ids, cache, padding)
    }

    fn lower(&self, opset: i64) -> Result<ModelProto> {
        super::onnx::export(self, opset)
    }

    fn boxed_clone(&self) -> Box<dyn Network> {
        Box::new(self.clone())
    }
}
