//! The Llama family: Llama (`LlamaForCausalLM`: SmolLM2, TinyLlama, Llama
//! 3.2) and Qwen2 (`Qwen2ForCausalLM`: Qwen2.5, which is Llama with biases
//! on the query, key and value projections). RMSNorm, rotary positions,
//! grouped-query attention, a SiLU-gated MLP. This file is the family: its
//! names, PEFT targets and config; `forward.rs` is the candle forward pass,
//! `onnx.rs` its lowering.

mod forward;
mod onnx;

use std::path::Path;

use candle_nn::VarBuilder;
use serde::{Deserialize, Serialize};

pub use forward::Llama;

use super::{Architecture, Dims, Family, ModelConfig, Network, invalid_config};
use crate::model::{ModelError, Result, read_json, rng::Rng};

/// Llama.
pub const LLAMA: Family = Family::new(&LlamaFamily {
    model_type: "llama",
    class: "LlamaForCausalLM",
});

/// Qwen2: Llama's network with biases on the query, key and value
/// projections.
pub const QWEN2: Family = Family::new(&LlamaFamily {
    model_type: "qwen2",
    class: "Qwen2ForCausalLM",
});

struct LlamaFamily {
    model_type: &'static str,
    class: &'static str,
}

impl Architecture for LlamaFamily {
    fn model_type(&self) -> &'static str {
        self.model_type
    }

    fn class(&self) -> &'static str {
        self.class
    }

    fn lora_targets(&self) -> &'static [&'static str] {
        &[
            "q_proj",
            "k_proj",
            "v_proj",
            "o_proj",
            "gate_proj",
            "up_proj",
            "down_proj",
            "attn",
            "mlp",
            "all-linear",
        ]
    }

    fn default_lora_targets(&self) -> &'static [&'static str] {
        &["q_proj", "v_proj"]
    }

    /// Llama's layer names are unique: a group is its layers' names.
    fn peft_target_modules(&self, targets: &[String]) -> serde_json::Value {
        if targets.iter().any(|t| t == "all-linear") {
            return "all-linear".into();
        }
        let mut names: Vec<&str> = Vec::new();
        for target in targets {
            let layers = match target.as_str() {
                "attn" => vec!["q_proj", "k_proj", "v_proj", "o_proj"],
                "mlp" => vec!["gate_proj", "up_proj", "down_proj"],
                other => vec![other],
            };
            for name in layers {
                if !names.contains(&name) {
                    names.push(name);
                }
            }
        }
        names.into()
    }

    fn fan_in_fan_out(&self) -> bool {
        false
    }

    fn embedding_module(&self) -> &'static str {
        "model.embed_tokens"
    }

    fn read_config(&self, path: &Path) -> Result<ModelConfig> {
        let config: Config = read_json(path)?;
        config.validate().map_err(|e| invalid_config(path, e))?;
        Ok(config.model_config(config.family()?))
    }

    /// SmolLM2's choices: a tied head, an MLP about 8/3 as wide (to a
    /// multiple of 64).
    fn scratch_config(&self, dims: &Dims, eos: Option<u32>) -> Result<ModelConfig> {
        let width = dims.width;
        let config = Config {
            vocab_size: dims.vocab_size,
            hidden_size: width,
            intermediate_size: dims.inner.unwrap_or((8 * width / 3).div_ceil(64) * 64),
            num_hidden_layers: dims.layers,
            num_attention_heads: dims.heads,
            num_key_value_heads: Some(dims.kv_heads),
            head_dim: Some(dims.head_dim),
            rms_norm_eps: 1e-5,
            rope_theta: 10_000.0,
            rope_scaling: None,
            max_position_embeddings: dims.context,
            tie_word_embeddings: true,
            attention_bias: false,
            mlp_bias: false,
            hidden_act: "silu".to_string(),
            bos_token_id: eos,
            eos_token_id: eos,
            model_type: Some(self.model_type.to_string()),
            use_sliding_window: false,
        };
        config.validate()?;
        Ok(config.model_config(config.family()?))
    }

    fn load(&self, config: &ModelConfig, vb: VarBuilder) -> Result<Box<dyn Network>> {
        Ok(Box::new(Llama::load(vb, &config.typed()?)?))
    }

    fn scratch(&self, config: &ModelConfig, rng: &mut Rng) -> Result<Box<dyn Network>> {
        Ok(Box::new(Llama::scratch(&config.typed()?, rng)?))
    }
}

/// The parts of `config.json` a Llama or Qwen2 model needs.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
pub struct Config {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    /// Key-value heads (grouped-query attention); defaults to the query heads.
    #[serde(default)]
    pub num_key_value_heads: Option<usize>,
    #[serde(default)]
    pub head_dim: Option<usize>,
    #[serde(default = "default_rms_norm_eps")]
    pub rms_norm_eps: f64,
    #[serde(default = "default_rope_theta")]
    pub rope_theta: f64,
    /// `{"rope_type": "llama3", "factor": 8.0, ...}`, or null.
    #[serde(default)]
    pub rope_scaling: Option<serde_json::Value>,
    #[serde(default = "default_max_positions")]
    pub max_position_embeddings: usize,
    #[serde(default)]
    pub tie_word_embeddings: bool,
    /// Llama: biases on all four attention projections.
    #[serde(default)]
    pub attention_bias: bool,
    #[serde(default)]
    pub mlp_bias: bool,
    #[serde(default = "default_activation")]
    pub hidden_act: String,
    #[serde(default, deserialize_with = "one_or_first")]
    pub bos_token_id: Option<u32>,
    /// The end-of-sequence id (the first, when the config lists several).
    #[serde(default, deserialize_with = "one_or_first")]
    pub eos_token_id: Option<u32>,
    #[serde(default)]
    pub model_type: Option<String>,
    /// Qwen2's sliding-window attention (symb supports it switched off).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub use_sliding_window: bool,
}

fn default_rms_norm_eps() -> f64 {
    1e-6
}

fn default_rope_theta() -> f64 {
    10_000.0
}

fn default_max_positions() -> usize {
    2048
}

fn default_activation() -> String {
    "silu".to_string()
}

/// A token id, or a list of them (the first is taken).
fn one_or_first<'de, D: serde::Deserializer<'de>>(
    deserializer: D,
) -> std::result::Result<Option<u32>, D::Error> {
    let value = Option::<serde_json::Value>::deserialize(deserializer)?;
    Ok(match value {
        Some(serde_json::Value::Array(ids)) => {
            ids.first().and_then(|v| v.as_u64()).map(|v| v as u32)
        }
        Some(v) => v.as_u64().map(|v| v as u32),
        None => None,
    })
}

impl Config {
    /// The dimensions every family has.
    pub fn dims(&self) -> Dims {
        Dims {
            vocab_size: self.vocab_size,
            context: self.max_position_embeddings,
            width: self.hidden_size,
            layers: self.num_hidden_layers,
            heads: self.num_attention_heads,
            kv_heads: self.kv_heads(),
            head_dim: self.head_dim(),
            inner: Some(self.intermediate_size),
        }
    }

    /// What every family's config says, and this one as JSON.
    pub fn model_config(&self, family: Family) -> ModelConfig {
        let n = |v: usize| v as u128;
        let (e, heads, head_dim, kv) = (
            n(self.hidden_size),
            n(self.num_attention_heads),
            n(self.head_dim()),
            n(self.kv_heads()),
        );
        let attention = e * heads * head_dim
            + 2 * e * kv * head_dim
            + heads * head_dim * e
            + (heads + 2 * kv) * head_dim;
        let layer = attention + 3 * e * n(self.intermediate_size) + 2 * e;
        let head = if self.tie_word_embeddings {
            0
        } else {
            n(self.vocab_size) * e
        };
        ModelConfig {
            family,
            dims: self.dims(),
            parameters: n(self.vocab_size) * e + head + n(self.num_hidden_layers) * layer + e,
            bos_token_id: self.bos_token_id,
            eos_token_id: self.eos_token_id,
            json: serde_json::to_value(self).unwrap_or_default(),
        }
    }

    pub fn head_dim(&self) -> usize {
        self.head_dim
            .unwrap_or(self.hidden_size / self.num_attention_heads.max(1))
    }

    pub fn kv_heads(&self) -> usize {
        self.num_key_value_heads.unwrap_or(self.num_attention_heads)
    }

    /// The family the config's `model_type` names.
    pub fn family(&self) -> Result<Family> {
        Family::from_model_type(self.model_type.as_deref())
    }

    /// Checks what the forward pass relies on.
    pub fn validate(&self) -> Result<()> {
        if ![LLAMA, QWEN2].contains(&self.family()?) {
            return Err(ModelError::Unsupported(format!(
                "`model_type` = \"{}\" is not a Llama-family model",
                self.model_type.as_deref().unwrap_or_default()
            )));
        }
        let (heads, kv) = (self.num_attention_heads, self.kv_heads());
        if heads == 0 || kv == 0 || !heads.is_multiple_of(kv) {
            return Err(ModelError::Config(format!(
                "`num_attention_heads` = {heads} is not a multiple of `num_key_value_heads` = {kv}"
            )));
        }
        if self.head_dim.is_none() && !self.hidden_size.is_multiple_of(heads) {
            return Err(ModelError::Config(format!(
                "`hidden_size` = {} is not divisible by `num_attention_heads` = {heads}",
                self.hidden_size
            )));
        }
        if !self.head_dim().is_multiple_of(2) {
            return Err(ModelError::Config(format!(
                "`head_dim` = {} is odd; rotary embeddings rotate pairs",
                self.head_dim()
            )));
        }
        if self.hidden_act != "silu" {
            return Err(ModelError::Unsupported(format!(
                "`hidden_act` = \"{}\" (symb supports \"silu\")",
                self.hidden_act
            )));
        }
        if self.use_sliding_window {
            return Err(ModelError::Unsupported(
                "`use_sliding_window` = true".to_string(),
            ));
        }
        self.rope()?;
        Ok(())
    }

    /// The rotary frequencies `[head_dim / 2]` and the attention factor, as
    /// transformers' `ROPE_INIT_FUNCTIONS` compute them.
    pub fn rope(&self) -> Result<(Vec<f32>, f32)> {
        let d = self.head_dim();
        let base: Vec<f64> = (0..d / 2)
            .map(|i| 1.0 / self.rope_theta.powf((2 * i) as f64 / d as f64))
            .collect();
        let Some(scaling) = self.rope_scaling.as_ref().filter(|s| !s.is_null()) else {
            return Ok((base.iter().map(|&f| f as f32).collect(), 1.0));
        };
        let kind = scaling
            .get("rope_type")
            .or_else(|| scaling.get("type"))
            .and_then(|t| t.as_str())
            .unwrap_or("default");
        let number = |key: &str| -> Result<f64> {
            scaling.get(key).and_then(|v| v.as_f64()).ok_or_else(|| {
                ModelError::Config(format!("`rope_scaling` of type \"{kind}\" lacks `{key}`"))
            })
        };
        // transformers computes the frequencies in float32.
        let base: Vec<f32> = base.iter().map(|&f| f as f32).collect();
        match kind {
            "default" => Ok((base, 1.0)),
            "linear" => {
                let factor = number("factor")? as f32;
                Ok((base.iter().map(|f| f / factor).collect(), 1.0))
            }
            "llama3" => {
                let factor = number("factor")? as f32;
                let low = number("low_freq_factor")? as f32;
                let high = number("high_freq_factor")? as f32;
                let old_context = number("original_max_position_embeddings")? as f32;
                let (low_wavelen, high_wavelen) = (old_context / low, old_context / high);
                let frequencies = base
                    .iter()
                    .map(|&f| {
                        let wavelen = 2.0 * std::f32::consts::PI / f;
                        if wavelen < high_wavelen {
                            f
                        } else if wavelen > low_wavelen {
                            f / factor
                        } else {
                            let smooth = (old_context / wavelen - low) / (high - low);
                            (1.0 - smooth) * f / factor + smooth * f
                        }
                    })
                    .collect();
                Ok((frequencies, 1.0))
            }
            other => Err(ModelError::Unsupported(format!(
                "`rope_scaling` type \"{other}\" (symb supports \"default\", \"linear\", \"llama3\")"
            ))),
        }
    }
}
