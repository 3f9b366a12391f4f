//! LoRA on any family's linear layers, in PEFT's format.
//!
//! PEFT stores, per adapted module, `lora_A.weight` `[r, in]` and
//! `lora_B.weight` `[out, r]` under `base_model.model.<module>`; the update is
//! `y += scale · (x · Aᵀ) · Bᵀ` with `scale = alpha / r` (`alpha / √r` with
//! rsLoRA). Merging adds `scale · B · A` to an `[out, in]` weight, and its
//! transpose to GPT-2's `[in, out]` ones (PEFT's `fan_in_fan_out`).

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::{Arc, Mutex};

use candle_core::{DType, Device, Tensor};
use serde::Deserialize;

use super::rng::Rng;
use super::{Family, Model, ModelError, Result, read_json};

/// LoRA settings.
#[derive(Debug, Clone)]
pub struct LoraSpec {
    pub targets: Vec<String>,
    pub rank: usize,
    pub alpha: f64,
    pub rslora: bool,
}

impl LoraSpec {
    pub fn scale(&self) -> f64 {
        if self.rslora {
            self.alpha / (self.rank as f64).sqrt()
        } else {
            self.alpha / self.rank as f64
        }
    }
}

/// Rows of a token matrix replaced by `values`, as PEFT's
/// `trainable_token_indices` does (`index_copy`; the values are rows, not
/// deltas, whatever PEFT's tensor name says).
#[derive(Debug, Clone)]
pub struct TokenRows {
    pub indices: Vec<u32>,
    /// `[indices.len(), width]`
    pub values: Tensor,
    /// The matrix with those rows zeroed (a constant).
    pub(super) masked: Tensor,
    index: Tensor,
    /// Token id → its row in `values`.
    slot: std::collections::HashMap<u32, u32>,
}

impl TokenRows {
    pub fn new(matrix: &Tensor, indices: Vec<u32>, values: Tensor) -> Result<Self> {
        let (vocab, width) = matrix.dims2()?;
        if let Some(bad) = indices.iter().find(|&&i| i as usize >= vocab) {
            return Err(ModelError::Config(format!(
                "trainable token {bad} is outside the vocabulary of {vocab}"
            )));
        }
        if values.dims() != [indices.len(), width] {
            return Err(ModelError::Config(format!(
                "trainable token rows have shape {:?}, expected [{}, {width}]",
                values.dims(),
                indices.len()
            )));
        }
        let mut keep = vec![1f32; vocab];
        for &i in &indices {
            keep[i as usize] = 0.0;
        }
        let keep = Tensor::from_vec(keep, (vocab, 1), matrix.device())?.to_dtype(matrix.dtype())?;
        let masked = matrix.detach().broadcast_mul(&keep)?;
        let index = Tensor::new(indices.as_slice(), matrix.device())?;
        let slot = indices
            .iter()
            .enumerate()
            .map(|(i, &id)| (id, i as u32))
            .collect();
        Ok(TokenRows {
            indices,
            values,
            masked,
            index,
            slot,
        })
    }

    /// The matrix with the rows replaced.
    pub fn apply(&self) -> Result<Tensor> {
        Ok(self.masked.index_add(&self.index, &self.values, 0)?)
    }

    /// Rows for `ids` `[n]`: the frozen rows gathered, plus the trainable
    /// rows where an id is one of them (a gather from `values` with a zero
    /// row appended), so backward touches only `values`.
    pub(super) fn embedding(&self, ids: &Tensor) -> Result<Tensor> {
        let zero = self.indices.len() as u32;
        let slots: Vec<u32> = ids
            .to_vec1::<u32>()?
            .iter()
            .map(|id| self.slot.get(id).copied().unwrap_or(zero))
            .collect();
        let slots = Tensor::new(slots, ids.device())?;
        let width = self.values.dim(1)?;
        let extended = Tensor::cat(
            &[
                &self.values,
                &Tensor::zeros((1, width), self.values.dtype(), self.values.device())?,
            ],
            0,
        )?;
        Ok((self.masked.embedding(ids)? + extended.embedding(&slots)?)?)
    }

    /// Logits over `hidden` `[n, width]`: the frozen rows' logits, with the
    /// trainable rows' columns added in.
    pub(super) fn head(&self, hidden: &Tensor) -> Result<Tensor> {
        let frozen = super::ops::frozen_matmul(hidden, &self.masked.t()?)?;
        Ok(frozen.index_add(&self.index, &hidden.matmul(&self.values.t()?)?, 1)?)
    }
}

/// The linear layers a list of target names selects (layer names and
/// groups, as [`Family::lora_targets`] lists them).
#[derive(Debug, Clone, Copy)]
pub struct LoraTarget<'a>(pub &'a [String]);

impl LoraTarget<'_> {
    /// Whether a target selects `layer`, a layer's path inside a block of
    /// `family` (GPT-2: `attn.c_attn`, `mlp.c_fc`, ...; Llama:
    /// `self_attn.q_proj`, `mlp.gate_proj`, ...).
    pub fn includes(&self, family: Family, layer: &str) -> bool {
        self.0
            .iter()
            .any(|target| family.lora_selects(target, layer))
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
        let x = match self.dropout_mask(x.dims())? {
            Some(mask) => (x * mask)?,
            None => x.clone(),
        };
        Ok((x.matmul(&self.a.t()?)?.matmul(&self.b.t()?)? * self.scale)?)
    }

    /// While training with dropout: the next mask for an input of `dims`
    /// (`0`, or `1 / keep`), drawn from the seeded stream.
    pub fn dropout_mask(&self, dims: &[usize]) -> Result<Option<Tensor>> {
        match &self.dropout {
            Some((p, rng)) if *p > 0.0 => {
                let mut rng = rng.lock().expect("dropout rng lock");
                let keep = 1.0 - p;
                Ok(Some(rng.tensor(dims, |r| {
                    if r.uniform() < keep { 1.0 / keep } else { 0.0 }
                })?))
            }
            _ => Ok(None),
        }
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
        if self.use_rslora {
            self.lora_alpha / (self.r as f64).sqrt()
        } else {
            self.lora_alpha / self.r as f64
        }
    }
}

/// Attaches a PEFT adapter folder to `model`; returns the adapted modules.
pub fn load_adapter(model: &mut Model, dir: &Path) -> Result<Vec<String>> {
    load_adapter_files(
        model,
        &dir.join("adapter_config.json"),
        &dir.join("adapter_model.safetensors"),
    )
}

/// Attaches a PEFT adapter given its two files.
pub fn load_adapter_files(
    model: &mut Model,
    config_path: &Path,
    path: &Path,
) -> Result<Vec<String>> {
    let config: AdapterConfig = read_json(config_path)?;
    if config.peft_type.as_deref().is_some_and(|t| t != "LORA") || config.use_dora {
        return Err(ModelError::Unsupported(format!(
            "`{}`: only plain LoRA adapters are supported",
            config_path.display()
        )));
    }
    if config.r == 0 {
        return Err(ModelError::Config(format!(
            "`{}`: `r` is 0",
            config_path.display()
        )));
    }
    let family = model.family();
    let device = model.device().clone();
    let mut tensors = candle_core::safetensors::load(path, &Device::Cpu)
        .map_err(|e| ModelError::io_candle(path, e))?;
    let ids = |value: &serde_json::Value| -> Result<Vec<u32>> {
        serde_json::from_value(value.clone()).map_err(|e| ModelError::io(config_path, e))
    };
    // Token ids per module name: a plain list is the input embedding's;
    // a map names modules by a suffix of their path (`embed_tokens`, `lm_head`).
    let mut token_indices: Vec<(String, Vec<u32>)> = match &config.trainable_token_indices {
        None | Some(serde_json::Value::Null) => Vec::new(),
        Some(serde_json::Value::Object(map)) => map
            .iter()
            .map(|(k, v)| Ok((k.clone(), ids(v)?)))
            .collect::<Result<_>>()?,
        Some(list) => vec![(family.embedding_module().to_string(), ids(list)?)],
    };
    for (module, matrix) in model.token_matrices_mut() {
        let key = Family::token_rows_key(module);
        let listed = token_indices
            .iter()
            .position(|(name, _)| module == name || module.ends_with(&format!(".{name}")));
        match (listed, tensors.remove(&key)) {
            (Some(i), Some(values)) => {
                let (_, indices) = token_indices.remove(i);
                let values = values.to_dtype(DType::F32)?.to_device(&device)?;
                matrix.rows = Some(TokenRows::new(&matrix.weight, indices, values).map_err(
                    |e| ModelError::Invalid {
                        message: format!("`{}`", path.display()),
                        source: Box::new(e),
                    },
                )?);
            }
            (Some(_), None) => {
                return Err(ModelError::Config(format!(
                    "`{}` lists trainable tokens, but `{}` has no `{key}`",
                    config_path.display(),
                    path.display()
                )));
            }
            (None, Some(_)) => {
                return Err(ModelError::Config(format!(
                    "`{}` has trainable token rows `{key}`, but `{}` lists no `trainable_token_indices` for it",
                    path.display(),
                    config_path.display()
                )));
            }
            (None, None) => {}
        }
    }
    if let Some((module, _)) = token_indices.first() {
        return Err(ModelError::Unsupported(format!(
            "`{}`: trainable tokens on `{module}`: symb supports them on the token embedding and an untied head",
            config_path.display()
        )));
    }
    let mut pairs: BTreeMap<String, (Option<Tensor>, Option<Tensor>)> = BTreeMap::new();
    for (name, tensor) in tensors {
        let module = name.strip_prefix("base_model.model.").unwrap_or(&name);
        let (module, which) = if let Some(m) = module.strip_suffix(".lora_A.weight") {
            (m, 0)
        } else if let Some(m) = module.strip_suffix(".lora_B.weight") {
            (m, 1)
        } else {
            return Err(ModelError::Unsupported(format!(
                "`{}`: tensor `{name}` is not a LoRA A or B weight",
                path.display()
            )));
        };
        let entry = pairs.entry(module.to_string()).or_default();
        let tensor = tensor.to_dtype(DType::F32)?.to_device(model.device())?;
        if which == 0 {
            entry.0 = Some(tensor)
        } else {
            entry.1 = Some(tensor)
        }
    }
    let mut linears: BTreeMap<String, &mut super::Linear> = model
        .linears_mut(LoraTarget(&["all-linear".to_string()]))
        .into_iter()
        .collect();
    let mut adapted = Vec::new();
    for (module, (a, b)) in pairs {
        let (Some(a), Some(b)) = (a, b) else {
            return Err(ModelError::Config(format!(
                "`{}`: `{module}` lacks its lora_A or lora_B weight",
                path.display()
            )));
        };
        let linear = linears.get_mut(&module).ok_or_else(|| {
            ModelError::Config(format!(
                "`{}`: the adapter targets `{module}`, which the model does not have",
                path.display()
            ))
        })?;
        let (n_in, n_out) = linear.dims()?;
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
        linear.lora = Some(Lora {
            a,
            b,
            scale: config.scale(),
            dropout: None,
        });
        adapted.push(module);
    }
    Ok(adapted)
}

/// Folds every LoRA update into its weight and any trainable token rows
/// into their matrix, and drops them; returns how many were folded.
pub fn merge(model: &mut Model) -> Result<usize> {
    let mut merged = 0;
    for (_, matrix) in model.token_matrices_mut() {
        merged += usize::from(matrix.merge_rows()?);
    }
    for (_, linear) in model.linears_mut(LoraTarget(&["all-linear".to_string()])) {
        merged += usize::from(linear.merge_lora()?);
    }
    Ok(merged)
}

/// PEFT's `adapter_config.json` for an adapter trained by symb on a model of
/// `family` (named `base`, as PEFT's `base_model_name_or_path`);
/// `token_modules` are the modules whose rows of `trainable_tokens` train
/// (the embedding, and an untied head).
pub fn peft_config(
    family: Family,
    base: Option<&str>,
    spec: &LoraSpec,
    dropout: f64,
    trainable_tokens: &[u32],
    token_modules: &[String],
) -> serde_json::Value {
    let targets = family.peft_target_modules(&spec.targets);
    serde_json::json!({
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base,
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
        "trainable_token_indices": match token_modules {
            _ if trainable_tokens.is_empty() => serde_json::Value::Null,
            // One module, the embedding (a tied head follows it in PEFT too).
            [_] | [] => serde_json::json!(trainable_tokens),
            modules => modules.iter().map(|m| (m.rsplit('.').next().unwrap_or(m).to_string(), serde_json::json!(trainable_tokens))).collect::<serde_json::Map<_, _>>().into(),
        },
    })
}
