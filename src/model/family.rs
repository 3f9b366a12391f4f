//! The model families symb runs, chosen by `config.json`'s `model_type`, in
//! the spirit of the tokenizers crate's `ModelWrapper`: everything outside a
//! family's own file asks the family for what differs between architectures
//! (its LoRA target names, how PEFT names its modules, how its weights are
//! laid out) instead of knowing GPT-2's names.
//!
//! Adding a family is a variant here, its facts below, and one file beside
//! `gpt2.rs` with its `Config`, loading and forward pass.

use std::path::Path;

use super::{ModelError, Result, read_json};

/// An architecture symb can load, train and export.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Family {
    /// GPT-2 (`GPT2LMHeadModel`): learned positions, LayerNorm, `Conv1D`
    /// linear layers, a head tied to the token embedding.
    Gpt2,
    /// Llama (`LlamaForCausalLM`: SmolLM2, TinyLlama, Llama 3.2): RMSNorm,
    /// rotary positions, grouped-query attention, a SiLU-gated MLP.
    Llama,
    /// Qwen2 (`Qwen2ForCausalLM`: Qwen2.5): Llama with biases on the query,
    /// key and value projections.
    Qwen2,
}

impl Family {
    /// Every family symb supports.
    pub const ALL: [Family; 3] = [Family::Gpt2, Family::Llama, Family::Qwen2];

    /// `config.json`'s `model_type` for this family.
    pub const fn model_type(self) -> &'static str {
        match self {
            Family::Gpt2 => "gpt2",
            Family::Llama => "llama",
            Family::Qwen2 => "qwen2",
        }
    }

    /// The family of a `model_type`; a config without one is taken for GPT-2
    /// (early GPT-2 checkpoints carry none).
    pub fn from_model_type(model_type: Option<&str>) -> Result<Family> {
        match model_type {
            None => Ok(Family::Gpt2),
            Some(name) => Family::ALL
                .into_iter()
                .find(|f| f.model_type() == name)
                .ok_or_else(|| {
                    ModelError::Unsupported(format!(
                        "`model_type` = \"{name}\": symb supports {}",
                        Family::ALL
                            .map(|f| format!("\"{}\"", f.model_type()))
                            .join(", ")
                    ))
                }),
        }
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

    /// The names `finetune.targets` may use for this family: its linear
    /// layers by their checkpoint names, and groups (`mlp`, `all-linear`).
    pub const fn lora_targets(self) -> &'static [&'static str] {
        match self {
            Family::Gpt2 => &["c_attn", "c_proj", "c_fc", "attn", "mlp", "all-linear"],
            Family::Llama | Family::Qwen2 => &[
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
            ],
        }
    }

    /// The layers LoRA adapts when `finetune.targets` is not set: PEFT's
    /// defaults for the architecture.
    pub fn default_lora_targets(self) -> &'static [&'static str] {
        match self {
            Family::Gpt2 => &["c_attn"],
            Family::Llama | Family::Qwen2 => &["q_proj", "v_proj"],
        }
    }

    /// The architecture name `config.json` lists (`architectures`).
    pub const fn architecture(self) -> &'static str {
        match self {
            Family::Gpt2 => "GPT2LMHeadModel",
            Family::Llama => "LlamaForCausalLM",
            Family::Qwen2 => "Qwen2ForCausalLM",
        }
    }

    /// Whether `target` (a layer name or a group) selects `layer`, a
    /// layer's path inside a block (`attn.c_attn`, `mlp.c_fc`, ...).
    pub fn lora_selects(self, target: &str, layer: &str) -> bool {
        match (self, target) {
            (_, "all-linear") => true,
            (_, "mlp") => layer.starts_with("mlp."),
            (_, "attn") => layer.starts_with("attn.") || layer.starts_with("self_attn."),
            (_, name) => layer.rsplit('.').next() == Some(name),
        }
    }

    /// PEFT's `target_modules` for `targets`: PEFT matches names as module
    /// suffixes, so a group that is not a linear layer (GPT-2's `mlp`)
    /// becomes a regular expression.
    pub fn peft_target_modules(self, targets: &[String]) -> serde_json::Value {
        if targets.iter().any(|t| t == "all-linear") {
            return "all-linear".into();
        }
        let group = |t: &String| t == "mlp" || t == "attn";
        match self {
            // GPT-2's `c_proj` is in both the attention and the MLP: a group is a regular expression.
            Family::Gpt2 if targets.iter().any(group) => {
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
            Family::Gpt2 => targets.to_vec().into(),
            // Llama's layer names are unique: a group is its layers' names.
            Family::Llama | Family::Qwen2 => {
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
        }
    }

    /// Whether linear weights are stored `[in, out]` (GPT-2's `Conv1D`),
    /// PEFT's `fan_in_fan_out`.
    pub const fn fan_in_fan_out(self) -> bool {
        match self {
            Family::Gpt2 => true,
            Family::Llama | Family::Qwen2 => false,
        }
    }

    /// The input embedding's module name in the checkpoint, as PEFT names it
    /// under `base_model.model.`.
    pub const fn embedding_module(self) -> &'static str {
        match self {
            Family::Gpt2 => "transformer.wte",
            Family::Llama | Family::Qwen2 => "model.embed_tokens",
        }
    }

    /// PEFT's tensor name for the trainable rows of a token matrix
    /// (`trainable_token_indices`): `module` is the embedding's, or an
    /// untied head's (`lm_head`).
    pub fn token_rows_key(module: &str) -> String {
        format!("base_model.model.{module}.token_adapter.trainable_tokens_delta")
    }
}

impl std::fmt::Display for Family {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.model_type())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn model_types_choose_the_family_and_others_are_named_in_the_error() {
        assert_eq!(Family::from_model_type(Some("gpt2")).unwrap(), Family::Gpt2);
        assert_eq!(Family::from_model_type(None).unwrap(), Family::Gpt2);
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
        let gpt2 = Family::Gpt2;
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
