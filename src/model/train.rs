//! Training pieces: the loss, LoRA parameters as trainable variables and
//! AdamW.
//!
//! AdamW is written here rather than taken from candle-nn because resuming a
//! run from a checkpoint needs the optimizer's moments and step count, which
//! candle-nn keeps private. The update is PyTorch's: decoupled weight decay
//! `θ ← θ(1 − lr·λ)`, then `θ ← θ − lr · m̂ / (√v̂ + ε)` with bias correction.

use std::collections::BTreeMap;

use candle_core::{DType, Device, Tensor, Var};

use super::lora::TokenRows;
use super::lora::{Lora, LoraSpec, LoraTarget};
use super::rng::Rng;
use super::{Model, ModelError, Result};

/// Mean next-token cross-entropy: `logits` `[n, vocab]`, `labels` `[n]` (u32);
/// the fused op of [`super::ops`].
pub fn cross_entropy(logits: &Tensor, labels: &Tensor) -> Result<Tensor> {
    super::ops::cross_entropy(logits, labels)
}

/// The trainable LoRA variables of a model, by PEFT module name.
pub struct LoraVars {
    /// The family of the model they adapt (its PEFT names).
    pub family: super::Family,
    pub modules: BTreeMap<String, (Var, Var)>,
    /// The token ids whose rows train (PEFT's trainable tokens).
    pub token_indices: Vec<u32>,
    /// Their rows, per token matrix (the embedding, and an untied head), by module name.
    pub token_rows: Vec<(String, Var)>,
}

impl LoraVars {
    /// Every variable, in a stable order (A then B, by module name; then the token rows).
    pub fn vars(&self) -> Vec<Var> {
        self.modules
            .values()
            .flat_map(|(a, b)| [a.clone(), b.clone()])
            .chain(self.token_rows.iter().map(|(_, v)| v.clone()))
            .collect()
    }

    /// Makes the rows `indices` of the model's token embedding (and of an
    /// untied head) trainable, starting from their current values (as PEFT does).
    pub fn train_token_rows(&mut self, model: &mut Model, indices: Vec<u32>) -> Result<()> {
        let index = Tensor::new(indices.as_slice(), model.device())?;
        for (module, matrix) in model.token_matrices_mut() {
            let var = Var::from_tensor(&matrix.weight.index_select(&index, 0)?)?;
            matrix.rows = Some(TokenRows::new(
                &matrix.weight,
                indices.clone(),
                var.as_tensor().clone(),
            )?);
            self.token_rows.push((module.to_string(), var));
        }
        self.token_indices = indices;
        Ok(())
    }

    /// The modules whose token rows train.
    pub fn token_modules(&self) -> Vec<String> {
        self.token_rows.iter().map(|(m, _)| m.clone()).collect()
    }

    /// The tensors under PEFT's names (`base_model.model.<module>.lora_A.weight`).
    pub fn peft_tensors(&self) -> BTreeMap<String, Tensor> {
        let mut out = BTreeMap::new();
        for (module, (a, b)) in &self.modules {
            out.insert(
                format!("base_model.model.{module}.lora_A.weight"),
                a.as_tensor().clone(),
            );
            out.insert(
                format!("base_model.model.{module}.lora_B.weight"),
                b.as_tensor().clone(),
            );
        }
        for (module, rows) in &self.token_rows {
            out.insert(
                super::Family::token_rows_key(module),
                rows.as_tensor().clone(),
            );
        }
        out
    }
}

/// Attaches trainable LoRA layers to the targeted linears. With `init`
/// (PEFT-named tensors) they start from it; otherwise as PEFT initialises
/// them: A ~ U(−1/√in, 1/√in) (kaiming-uniform with a = √5), B = 0.
pub fn attach_lora(
    model: &mut Model,
    spec: &LoraSpec,
    init: Option<&BTreeMap<String, Tensor>>,
    rng: &mut Rng,
) -> Result<LoraVars> {
    let scale = spec.scale();
    let mut modules = BTreeMap::new();
    for (module, linear) in model.linears_mut(LoraTarget(&spec.targets)) {
        let (n_in, n_out) = linear.dims()?;
        let (a, b) = match init {
            Some(tensors) => {
                let get = |which: &str| -> Result<Tensor> {
                    let name = format!("base_model.model.{module}.lora_{which}.weight");
                    tensors.get(&name).cloned().ok_or_else(|| {
                        ModelError::Config(format!("the initial adapter has no `{name}`"))
                    })
                };
                (get("A")?, get("B")?)
            }
            None => {
                let bound = 1.0 / (n_in as f64).sqrt();
                (
                    rng.tensor(&[spec.rank, n_in], |r| (r.uniform() * 2.0 - 1.0) * bound)?,
                    Tensor::zeros((n_out, spec.rank), DType::F32, &Device::Cpu)?,
                )
            }
        };
        let (a, b) = (Var::from_tensor(&a)?, Var::from_tensor(&b)?);
        linear.lora = Some(Lora {
            a: a.as_tensor().clone(),
            b: b.as_tensor().clone(),
            scale,
            dropout: None,
        });
        modules.insert(module, (a, b));
    }
    if modules.is_empty() {
        return Err(ModelError::Config(format!(
            "no layer matches the LoRA targets {:?}",
            spec.targets
        )));
    }
    Ok(LoraVars {
        family: model.family(),
        modules,
        token_indices: Vec::new(),
        token_rows: Vec::new(),
    })
}

#[derive(Debug, Clone, Copy)]
pub struct AdamWParams {
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
}

/// AdamW with its state in the open (see the module header).
pub struct AdamW {
    pub params: AdamWParams,
    /// Steps taken so far.
    pub step: u64,
    /// Per variable: (variable, first moment, second moment).
    pub state: Vec<(Var, Tensor, Tensor)>,
}

impl AdamW {
    pub fn new(vars: Vec<Var>, params: AdamWParams) -> Result<Self> {
        let state = vars
            .into_iter()
            .map(|v| {
                let zeros = v.zeros_like()?;
                Ok((v, zeros.clone(), zeros))
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(AdamW {
            params,
            step: 0,
            state,
        })
    }

    /// One step with the gradients in a GradStore (variables without one are left alone).
    pub fn step(&mut self, grads: &candle_core::backprop::GradStore) -> Result<()> {
        let grads: Vec<Option<Tensor>> = self
            .state
            .iter()
            .map(|(var, _, _)| grads.get(var.as_tensor()).cloned())
            .collect();
        self.update(&grads)
    }

    /// One step with one gradient per variable, in the order given to `new`.
    pub fn step_with(&mut self, grads: &[Tensor]) -> Result<()> {
        let grads: Vec<Option<Tensor>> = grads.iter().cloned().map(Some).collect();
        self.update(&grads)
    }

    fn update(&mut self, grads: &[Option<Tensor>]) -> Result<()> {
        self.step += 1;
        let AdamWParams {
            lr,
            beta1,
            beta2,
            eps,
            weight_decay,
        } = self.params;
        let correction1 = 1.0 - beta1.powi(self.step as i32);
        let correction2 = 1.0 - beta2.powi(self.step as i32);
        for ((var, m, v), grad) in self.state.iter_mut().zip(grads) {
            let Some(grad) = grad else { continue };
            // Detached: the moments must not chain one step's graph to the next.
            let grad = grad.detach();
            *m = ((&*m * beta1)? + (&grad * (1.0 - beta1))?)?.detach();
            *v = ((&*v * beta2)? + (grad.sqr()? * (1.0 - beta2))?)?.detach();
            let update = ((&*m / correction1)? / ((&*v / correction2)?.sqrt()? + eps)?)?;
            let decayed = (var.as_tensor().detach() * (1.0 - lr * weight_decay))?;
            var.set(&(decayed - (update * lr)?)?)?;
        }
        Ok(())
    }
}
