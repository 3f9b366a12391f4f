//! LoRA on GPT-2's `Conv1D` layers, in PEFT's format.
//!
//! PEFT stores, per adapted module, `lora_A.weight` `[r, in]` and
//! `lora_B.weight` `[out, r]` under `base_model.model.<module>`; the update is
//! `y += scale · (x · Aᵀ) · Bᵀ` with `scale = alpha / r` (`alpha / √r` with
//! rsLoRA). With `fan_in_fan_out` (GPT-2's `[in, out]` weights) merging adds
//! `scale · (B · A)ᵀ` to the stored weight.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::{Arc, Mutex};

use candle_core::{DType, Device, Tensor};
use serde::Deserialize;

use super::gpt2::Gpt2;
use super::train::Rng;
use super::{Family, ModelError, Result, read_json};

/// The linear layers a list of target names selects (layer names and
/// groups, as [`Family::lora_targets`] lists them).
#[derive(Debug, Clone, Copy)]
pub struct LoraTarget<'a>(pub &'a [String]);

impl LoraTarget<'_> {
    /// Whether a target selects `layer`, a layer's path inside a block of
    /// `family` (GPT-2: `attn.c_attn`, `attn.c_proj`, `mlp.c_fc`, `mlp.c_proj`).
    pub fn includes(&self, family: Family, layer: &str) -> bool {
        self.0.iter().any(|target| family.lora_selects(target, layer))
    }
}

#[derive(Debug, Clone)]
pub struct Lora {
    /// `[r, in]`
    pub a: Tensor,
    /// `[out, r]`
    pub b: Tensor,
    pub scale: f64,
    /// While training: the dropout probability on the input, and the seeded
    /// stream its masks come from.
    pub dropout: Option<(f64, Arc<Mutex<Rng>>)>,
}

impl Lora {
    /// The low-rank update for `x` `[rows, in]`: `[rows, out]`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let x = match &self.dropout {
            Some((p, rng)) if *p > 0.0 => {
                let mut rng = rng.lock().expect("dropout rng lock");
                let keep = 1.0 - p;
                let mask = rng.tensor(x.dims(), |r| if r.uniform() < keep { 1.0 / keep } else { 0.0 })?;
                (x * mask)?
            }
            _ => x.clone(),
        };
        Ok((x.matmul(&self.a.t()?)?.matmul(&self.b.t()?)? * self.scale)?)
    }

    /// The update in the stored `[in, out]` layout: `scale · (B · A)ᵀ`.
    pub fn delta(&self) -> Result<Tensor> {
        Ok((self.b.matmul(&self.a)?.t()? * self.scale)?)
    }
}

/// The fields of PEFT's `adapter_config.json` that shape the computation.
#[derive(Debug, Clone, Deserialize)]
pub struct AdapterConfig {
    pub r: usize,
    pub lora_alpha: f64,
    #[serde(default)]
    pub use_rslora: bool,
    #[serde(default)]
    pub fan_in_fan_out: bool,
    #[serde(default)]
    pub peft_type: Option<String>,
    #[serde(default)]
    pub use_dora: bool,
    /// A list of token ids, or `{module: ids}`.
    #[serde(default)]
    pub trainable_token_indices: Option<serde_json::Value>,
}

impl AdapterConfig {
    pub fn scale(&self) -> f64 {
        if self.use_rslora { self.lora_alpha / (self.r as f64).sqrt() } else { self.lora_alpha / self.r as f64 }
    }
}

/// Attaches a PEFT adapter folder to `model`; returns the adapted modules.
pub fn load_adapter(model: &mut Gpt2, dir: &Path) -> Result<Vec<String>> {
    load_adapter_files(model, &dir.join("adapter_config.json"), &dir.join("adapter_model.safetensors"))
}

/// Attaches a PEFT adapter given its two files.
pub fn load_adapter_files(model: &mut Gpt2, config_path: &Path, path: &Path) -> Result<Vec<String>> {
    let config: AdapterConfig = read_json(config_path)?;
    if config.peft_type.as_deref().is_some_and(|t| t != "LORA") || config.use_dora {
        return Err(ModelError::Unsupported(format!("`{}`: only plain LoRA adapters are supported", config_path.display())));
    }
    if config.r == 0 {
        return Err(ModelError::Config(format!("`{}`: `r` is 0", config_path.display())));
    }
    let family = model.family();
    let embedding = family.embedding_module().rsplit('.').next().expect("a module name");
    let mut tensors = candle_core::safetensors::load(path, &Device::Cpu).map_err(|e| ModelError::io_candle(path, e))?;
    let token_indices: Option<Vec<u32>> = match &config.trainable_token_indices {
        None | Some(serde_json::Value::Null) => None,
        Some(serde_json::Value::Object(map)) => match map.iter().find(|(k, _)| k.rsplit('.').next() == Some(embedding)) {
            Some((_, ids)) if map.len() == 1 => Some(serde_json::from_value(ids.clone()).map_err(|e| ModelError::io(config_path, e))?),
            _ => return Err(ModelError::Unsupported(format!("`{}`: trainable tokens are supported on the input embedding only", config_path.display()))),
        },
        Some(ids) => Some(serde_json::from_value(ids.clone()).map_err(|e| ModelError::io(config_path, e))?),
    };
    let token_rows_key = family.token_rows_key();
    let token_values = tensors.remove(&token_rows_key);
    match (token_indices, token_values) {
        (Some(indices), Some(values)) => {
            let values = values.to_dtype(DType::F32)?.to_device(model.device())?;
            let rows = super::gpt2::TokenRows::new(&model.wte, indices, values).map_err(|e| ModelError::Config(format!("`{}`: {e}", path.display())))?;
            model.token_rows = Some(rows);
        }
        (Some(_), None) => return Err(ModelError::Config(format!("`{}` lists trainable tokens, but `{}` has no `{token_rows_key}`", config_path.display(), path.display()))),
        (None, Some(_)) => return Err(ModelError::Config(format!("`{}` has trainable token rows, but `{}` lists no `trainable_token_indices`", path.display(), config_path.display()))),
        (None, None) => {}
    }
    let mut pairs: BTreeMap<String, (Option<Tensor>, Option<Tensor>)> = BTreeMap::new();
    for (name, tensor) in tensors {
        let module = name.strip_prefix("base_model.model.").unwrap_or(&name);
        let (module, which) = if let Some(m) = module.strip_suffix(".lora_A.weight") {
            (m, 0)
        } else if let Some(m) = module.strip_suffix(".lora_B.weight") {
            (m, 1)
        } else {
            return Err(ModelError::Unsupported(format!("`{}`: tensor `{name}` is not a LoRA A or B weight", path.display())));
        };
        let entry = pairs.entry(module.to_string()).or_default();
        let tensor = tensor.to_dtype(DType::F32)?.to_device(model.device())?;
        if which == 0 { entry.0 = Some(tensor) } else { entry.1 = Some(tensor) }
    }
    let mut linears: BTreeMap<String, &mut super::gpt2::Linear> = model.linears_mut(LoraTarget(&["all-linear".to_string()])).into_iter().collect();
    let mut adapted = Vec::new();
    for (module, (a, b)) in pairs {
        let (Some(a), Some(b)) = (a, b) else {
            return Err(ModelError::Config(format!("`{}`: `{module}` lacks its lora_A or lora_B weight", path.display())));
        };
        let linear = linears.get_mut(&module).ok_or_else(|| ModelError::Config(format!("`{}`: the adapter targets `{module}`, which the model does not have", path.display())))?;
        let (n_in, n_out) = linear.weight.dims2()?;
        if a.dims() != [config.r, n_in] || b.dims() != [n_out, config.r] {
            return Err(ModelError::Config(format!(
                "`{}`: `{module}` has lora_A {:?} and lora_B {:?}, expected [{}, {n_in}] and [{n_out}, {}]",
                path.display(),
                a.dims(),
                b.dims(),
                config.r,
                config.r
            )));
        }
        linear.lora = Some(Lora { a, b, scale: config.scale(), dropout: None });
        adapted.push(module);
    }
    Ok(adapted)
}

/// Folds every LoRA update into its weight (W + scale · (B·A)ᵀ) and any
/// trainable token rows into the embedding, and drops them.
pub fn merge(model: &mut Gpt2) -> Result<usize> {
    let mut merged = 0;
    if let Some(rows) = model.token_rows.take() {
        model.wte = rows.apply()?.detach();
        merged += 1;
    }
    for (_, linear) in model.linears_mut(LoraTarget(&["all-linear".to_string()])) {
        if let Some(lora) = linear.lora.take() {
            linear.weight = (&linear.weight + lora.delta()?)?;
            merged += 1;
        }
    }
    Ok(merged)
}

/// PEFT's `adapter_config.json` for an adapter trained by symb on a model of `family`.
pub fn peft_config(family: Family, spec: &super::train::LoraSpec, dropout: f64, trainable_tokens: &[u32]) -> serde_json::Value {
    let targets = family.peft_target_modules(&spec.targets);
    serde_json::json!({
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": null,
        "r": spec.rank,
        "lora_alpha": spec.alpha,
        "lora_dropout": dropout,
        "use_rslora": spec.rslora,
        "target_modules": targets,
        "fan_in_fan_out": family.fan_in_fan_out(),
        "bias": "none",
        "inference_mode": true,
        "init_lora_weights": true,
        "modules_to_save": null,
        "use_dora": false,
        "trainable_token_indices": if trainable_tokens.is_empty() { serde_json::Value::Null } else { serde_json::json!(trainable_tokens) },
    })
}
