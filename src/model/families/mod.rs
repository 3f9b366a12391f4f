//! The model families symb runs, chosen by `config.json`'s `model_type`.
//! A family is one folder here (`gpt2/`, `llama/`): its `mod.rs` says what
//! the family is (names, PEFT targets, config) by implementing
//! [`Architecture`]; `forward.rs` is its candle forward pass, a [`Network`];
//! `onnx.rs` lowers that network to the decoder contract transformers.js
//! reads ([`crate::onnx::Decoder`]).
//!
//! Everything outside a folder holds a [`Family`] (a handle on its
//! `Architecture`) or a [`Model`](super::Model) (a boxed `Network`) and asks
//! it for what differs between architectures. Adding a family is its folder,
//! its `mod` line below and its entry in [`Family::ALL`].

pub mod gpt2;
pub mod llama;

use std::path::Path;

use candle_core::{Device, Tensor};
use candle_nn::VarBuilder;

use super::layers::{KvCache, Linear, RowLayout, TokenMatrix};
use super::lora::LoraTarget;
use super::{ModelError, Result, read_json, rng::Rng};
use crate::onnx::proto::ModelProto;

impl Family {
    /// Every family symb supports, one line each.
    pub const ALL: [Family; 3] = [gpt2::GPT2, llama::LLAMA, llama::QWEN2];
}

/// What a family is: implemented once, in its folder's `mod.rs`.
pub trait Architecture: Sync {
    /// `config.json`'s `model_type`.
    fn model_type(&self) -> &'static str;

    /// The class name `config.json` lists in `architectures`.
    fn class(&self) -> &'static str;

    /// The names `finetune.targets` may use for this family: its linear
    /// layers by their checkpoint names, and groups (`attn`, `mlp`,
    /// `all-linear`).
    fn lora_targets(&self) -> &'static [&'static str];

    /// The layers LoRA adapts when `finetune.targets` is not set: PEFT's
    /// defaults for the architecture.
    fn default_lora_targets(&self) -> &'static [&'static str];

    /// Whether `target` (a layer name or a group) selects `layer`, a
    /// layer's path inside a block (`attn.c_attn`, `mlp.c_fc`, ...).
    fn lora_selects(&self, target: &str, layer: &str) -> bool {
        match target {
            "all-linear" => true,
            "mlp" => layer.starts_with("mlp."),
            "attn" => layer.starts_with("attn.") || layer.starts_with("self_attn."),
            name => layer.rsplit('.').next() == Some(name),
        }
    }

    /// PEFT's `target_modules` for `targets` (PEFT matches names as module
    /// suffixes).
    fn peft_target_modules(&self, targets: &[String]) -> serde_json::Value;

    /// Whether linear weights are stored `[in, out]` (GPT-2's `Conv1D`),
    /// PEFT's `fan_in_fan_out`.
    fn fan_in_fan_out(&self) -> bool;

    /// The input embedding's module name in the checkpoint, as PEFT names it
    /// under `base_model.model.`.
    fn embedding_module(&self) -> &'static str;

    /// Reads `config.json` at `path` as this family's, checked against what
    /// the forward pass relies on.
    fn read_config(&self, path: &Path) -> Result<ModelConfig>;

    /// The config of a new model of `dims` (its `inner` width, when `None`,
    /// the family's own choice), ending sequences with `eos`.
    fn scratch_config(&self, dims: &Dims, eos: Option<u32>) -> Result<ModelConfig>;

    /// Loads a network of `config` from a VarBuilder over a checkpoint.
    fn load(&self, config: &ModelConfig, vb: VarBuilder) -> Result<Box<dyn Network>>;

    /// A new network of `config`, initialised as transformers does.
    fn scratch(&self, config: &ModelConfig, rng: &mut Rng) -> Result<Box<dyn Network>>;
}

/// A family's forward pass in candle, its weights under their checkpoint
/// names, and its ONNX lowering: implemented in its folder's `forward.rs`.
pub trait Network: std::fmt::Debug + Send + Sync {
    fn family(&self) -> Family;

    /// The network's config as it stands (its vocabulary grown, if it was).
    fn config(&self) -> ModelConfig;

    /// Its dimensions (cheaper than its whole [`config`](Self::config)).
    fn dims(&self) -> Dims;

    fn device(&self) -> &Device;

    /// The input embedding.
    fn embedding(&self) -> &TokenMatrix;

    /// The matrix the logits come from (the embedding when tied).
    fn head(&self) -> &TokenMatrix;

    /// The token matrices under their module names: the input embedding
    /// first, then an untied head.
    fn token_matrices_mut(&mut self) -> Vec<(&'static str, &mut TokenMatrix)>;

    /// Records a vocabulary grown to `size` rows in the config.
    fn set_vocab_size(&mut self, size: usize);

    /// Calls `f` on every weight with its checkpoint name, in a fixed order
    /// (a tied head is not repeated).
    fn visit_mut(&mut self, f: &mut dyn FnMut(&str, &mut Tensor) -> Result<()>) -> Result<()>;

    /// The linear layers `target` selects, with their PEFT module names.
    fn linears_mut(&mut self, target: LoraTarget) -> Vec<(String, &mut Linear)>;

    /// Final hidden states `[b·t, width]` of `input_ids` `[b, t]`,
    /// continuing from `cache` (updated in place) when given, each row
    /// starting after its left padding.
    fn hidden(
        &self,
        input_ids: &Tensor,
        cache: Option<&mut KvCache>,
        padding: &RowLayout,
    ) -> Result<Tensor>;

    /// The network as an ONNX graph at standard opset `opset`, filling the
    /// decoder contract ([`crate::onnx::Decoder`]).
    fn lower(&self, opset: i64) -> Result<ModelProto>;

    fn boxed_clone(&self) -> Box<dyn Network>;
}

/// A family: a handle on its [`Architecture`], compared and printed by its
/// `model_type`.
#[derive(Clone, Copy)]
pub struct Family(&'static dyn Architecture);

impl Family {
    /// The handle on `architecture` (a family's `const`).
    pub const fn new(architecture: &'static dyn Architecture) -> Family {
        Family(architecture)
    }

    /// The family of a `model_type`; a config without one is taken for GPT-2
    /// (early GPT-2 checkpoints carry none).
    pub fn from_model_type(model_type: Option<&str>) -> Result<Family> {
        let name = model_type.unwrap_or(gpt2::GPT2.model_type());
        Family::ALL
            .into_iter()
            .find(|f| f.model_type() == name)
            .ok_or_else(|| {
                ModelError::Unsupported(format!(
                    "`model_type` = \"{name}\": symb supports {}",
                    Family::ALL
                        .map(|f| format!("\"{}\"", f.model_type()))
                        .join(", ")
                ))
            })
    }

    /// The family of the model whose `config.json` is at `path`, read before
    /// the family's own config (so that another architecture's config gets
    /// this error, not a missing field of GPT-2's).
    pub fn of_config(path: &Path) -> Result<Family> {
        let config: serde_json::Value = read_json(path)?;
        Family::from_model_type(config.get("model_type").and_then(|t| t.as_str())).map_err(|e| {
            ModelError::Unsupported(format!(
                "`{}`: {}",
                path.display(),
                e.to_string().trim_start_matches("unsupported model: ")
            ))
        })
    }

    /// PEFT's tensor name for the trainable rows of a token matrix
    /// (`trainable_token_indices`): `module` is the embedding's, or an
    /// untied head's (`lm_head`).
    pub fn token_rows_key(module: &str) -> String {
        format!("base_model.model.{module}.token_adapter.trainable_tokens_delta")
    }
}

impl std::ops::Deref for Family {
    type Target = dyn Architecture;

    fn deref(&self) -> &Self::Target {
        self.0
    }
}

impl PartialEq for Family {
    fn eq(&self, other: &Self) -> bool {
        self.model_type() == other.model_type()
    }
}

impl Eq for Family {}

impl std::fmt::Debug for Family {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.model_type())
    }
}

impl std::fmt::Display for Family {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.model_type())
    }
}

/// The dimensions every family has, under one set of names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Dims {
    pub vocab_size: usize,
    /// The longest sequence the model takes.
    pub context: usize,
    /// The hidden width.
    pub width: usize,
    pub layers: usize,
    /// Query heads.
    pub heads: usize,
    /// Key-value heads (fewer than `heads` under grouped-query attention).
    pub kv_heads: usize,
    pub head_dim: usize,
    /// The MLP's inner width.
    pub inner: Option<usize>,
}

/// A model's `config.json`, read by its family: the family's own fields as
/// JSON (what `config.json` holds), and what every family shares.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelConfig {
    pub family: Family,
    pub dims: Dims,
    /// How many parameters a model of this config holds (a tied head
    /// counted once); u128, so that no setting, however large, overflows it.
    pub parameters: u128,
    pub bos_token_id: Option<u32>,
    pub eos_token_id: Option<u32>,
    /// The family's config, serialised.
    pub json: serde_json::Value,
}

impl ModelConfig {
    /// Reads `config.json`, choosing the family by `model_type`.
    pub fn read(path: &Path) -> Result<Self> {
        Family::of_config(path)?.read_config(path)
    }

    /// The family's typed config back from [`json`](Self::json).
    pub fn typed<T: serde::de::DeserializeOwned>(&self) -> Result<T> {
        serde_json::from_value(self.json.clone()).map_err(|e| {
            ModelError::Config(format!("a {} config that does not parse: {e}", self.family))
        })
    }

    pub fn vocab_size(&self) -> usize {
        self.dims.vocab_size
    }

    /// The longest sequence the model takes.
    pub fn context(&self) -> usize {
        self.dims.context
    }

    /// The hidden width.
    pub fn width(&self) -> usize {
        self.dims.width
    }

    pub fn n_layer(&self) -> usize {
        self.dims.layers
    }

    pub fn parameters(&self) -> u128 {
        self.parameters
    }

    pub fn eos_token_id(&self) -> Option<u32> {
        self.eos_token_id
    }

    pub fn bos_token_id(&self) -> Option<u32> {
        self.bos_token_id
    }
}

/// A config that fails the family's checks: the error, named after its file.
pub(crate) fn invalid_config(path: &Path, error: ModelError) -> ModelError {
    ModelError::Config(format!(
        "`{}`: {}",
        path.display(),
        error.to_string().trim_start_matches("unsupported model: ")
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn model_types_choose_the_family_and_others_are_named_in_the_error() {
        assert_eq!(Family::from_model_type(Some("gpt2")).unwrap(), gpt2::GPT2);
        assert_eq!(Family::from_model_type(None).unwrap(), gpt2::GPT2);
        let error = Family::from_model_type(Some("mamba"))
            .unwrap_err()
            .to_string();
        assert_eq!(
            error,
            "unsupported model: `model_type` = \"mamba\": symb supports \"gpt2\", \"llama\", \"qwen2\""
        );
    }

    #[test]
    fn gpt2_facts_are_pefts() {
        let gpt2 = gpt2::GPT2;
        assert_eq!(
            Family::token_rows_key(gpt2.embedding_module()),
            "base_model.model.transformer.wte.token_adapter.trainable_tokens_delta"
        );
        assert!(gpt2.lora_selects("mlp", "mlp.c_proj") && !gpt2.lora_selects("mlp", "attn.c_proj"));
        assert!(
            gpt2.lora_selects("c_proj", "attn.c_proj") && gpt2.lora_selects("c_proj", "mlp.c_proj")
        );
        assert_eq!(
            gpt2.peft_target_modules(&["c_attn".into()]),
            serde_json::json!(["c_attn"])
        );
        assert_eq!(
            gpt2.peft_target_modules(&["mlp".into(), "c_attn".into()]),
            serde_json::json!(".*\\.(mlp\\.c_fc|mlp\\.c_proj|\\w+\\.c_attn)$")
        );
    }
}
