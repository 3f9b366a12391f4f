//! GPT-2 (`GPT2LMHeadModel`): learned positions, LayerNorm, `Conv1D`
//! linear layers, a head tied to the token embedding. This file is the
//! family: its names, PEFT targets and config; `forward.rs` is the candle
//! forward pass, `onnx.rs` its lowering.

mod forward;
mod onnx;

use std::path::Path;

use candle_nn::VarBuilder;
use serde::Deserialize;

pub use forward::Gpt2;

use super::{Architecture, Dims, Family, ModelConfig, Network, invalid_config};
use crate::model::{ModelError, Result, read_json, rng::Rng};

/// GPT-2.
pub const GPT2: Family = Family::new(&Gpt2Family);

struct Gpt2Family;

impl Architecture for Gpt2Family {
    fn model_type(&self) -> &'static str {
        "gpt2"
    }

    fn class(&self) -> &'static str {
        "GPT2LMHeadModel"
    }

    fn lora_targets(&self) -> &'static [&'static str] {
        &["c_attn", "c_proj", "c_fc", "attn", "mlp", "all-linear"]
    }

    fn default_lora_targets(&self) -> &'static [&'static str] {
        &["c_attn"]
    }

    /// GPT-2's `c_proj` is in both the attention and the MLP: a group is a
    /// regular expression.
    fn peft_target_modules(&self, targets: &[String]) -> serde_json::Value {
        if targets.iter().any(|t| t == "all-linear") {
            return "all-linear".into();
        }
        if !targets.iter().any(|t| t == "mlp" || t == "attn") {
            return targets.to_vec().into();
        }
        let mut names: Vec<String> = Vec::new();
        for target in targets {
            match target.as_str() {
                "mlp" => names.extend(["mlp\\.c_fc".into(), "mlp\\.c_proj".into()]),
                "attn" => names.extend(["attn\\.c_attn".into(), "attn\\.c_proj".into()]),
                other => names.push(format!("\\w+\\.{other}")),
            }
        }
        format!(".*\\.({})$", names.join("|")).into()
    }

    fn fan_in_fan_out(&self) -> bool {
        true
    }

    fn embedding_module(&self) -> &'static str {
        "transformer.wte"
    }

    fn read_config(&self, path: &Path) -> Result<ModelConfig> {
        let config: Config = read_json(path)?;
        config.validate().map_err(|e| invalid_config(path, e))?;
        Ok(config.model_config())
    }

    fn scratch_config(&self, dims: &Dims, eos: Option<u32>) -> Result<ModelConfig> {
        let config = Config {
            vocab_size: dims.vocab_size,
            n_positions: dims.context,
            n_embd: dims.width,
            n_layer: dims.layers,
            n_head: dims.heads,
            n_inner: dims.inner,
            layer_norm_epsilon: 1e-5,
            activation_function: "gelu_new".to_string(),
            bos_token_id: eos,
            eos_token_id: eos,
            model_type: Some(self.model_type().to_string()),
            tie_word_embeddings: Some(true),
        };
        config.validate()?;
        Ok(config.model_config())
    }

    fn load(&self, config: &ModelConfig, vb: VarBuilder) -> Result<Box<dyn Network>> {
        Ok(Box::new(Gpt2::load(vb, &config.typed()?)?))
    }

    fn scratch(&self, config: &ModelConfig, rng: &mut Rng) -> Result<Box<dyn Network>> {
        Ok(Box::new(Gpt2::scratch(&config.typed()?, rng)?))
    }
}

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
    /// The dimensions every family has.
    pub fn dims(&self) -> Dims {
        Dims {
            vocab_size: self.vocab_size,
            context: self.n_positions,
            width: self.n_embd,
            layers: self.n_layer,
            heads: self.n_head,
            kv_heads: self.n_head,
            head_dim: self.head_dim(),
            inner: Some(self.inner()),
        }
    }

    /// What every family's config says, and this one as JSON.
    pub fn model_config(&self) -> ModelConfig {
        let (e, inner) = (self.n_embd as u128, self.inner() as u128);
        let layer = e * 3 * e + 3 * e + e * e + e + 2 * e * inner + inner + e + 4 * e;
        let parameters = self.vocab_size as u128 * e
            + self.n_positions as u128 * e
            + self.n_layer as u128 * layer
            + 2 * e;
        ModelConfig {
            family: GPT2,
            dims: self.dims(),
            parameters,
            bos_token_id: self.bos_token_id,
            eos_token_id: self.eos_token_id,
            json: serde_json::to_value(self).unwrap_or_default(),
        }
    }

    pub fn inner(&self) -> usize {
        self.n_inner.unwrap_or(4 * self.n_embd)
    }

    pub fn head_dim(&self) -> usize {
        self.n_embd / self.n_head.max(1)
    }

    /// Checks what the forward pass relies on.
    pub fn validate(&self) -> Result<()> {
        if Family::from_model_type(self.model_type.as_deref())? != GPT2 {
            return Err(ModelError::Unsupported(format!(
                "`model_type` = \"{}\" is not GPT-2",
                self.model_type.as_deref().unwrap_or_default()
            )));
        }
        if self.n_head == 0 || !self.n_embd.is_multiple_of(self.n_head) {
            return Err(ModelError::Config(format!(
                "`n_embd` = {} is not divisible by `n_head` = {}",
                self.n_embd, self.n_head
            )));
        }
        if !matches!(
            self.activation_function.as_str(),
            "gelu_new" | "gelu_pytorch_tanh" | "gelu"
        ) {
            return Err(ModelError::Unsupported(format!(
                "`activation_function` = \"{}\"",
                self.activation_function
            )));
        }
        if self.tie_word_embeddings == Some(false) {
            return Err(ModelError::Unsupported(
                "`tie_word_embeddings` = false (GPT-2's head is tied to `wte`)".to_string(),
            ));
        }
        Ok(())
    }
}
