//! The pieces every family is built from: a linear layer in either weight
//! layout, with LoRA; a token matrix (embedding or head) whose rows PEFT's
//! trainable tokens may replace; the KV cache; sampling.
//!
//! Norms and activations are custom ops in [`super::ops`], attention one in
//! [`super::attention`], each with an analytic backward: candle's fused
//! versions have none and would silently cut the gradient graph.

use candle_core::{D, DType, Tensor};

use super::lora::{Lora, TokenRows};
use super::{ModelError, Result};

/// How a checkpoint stores a linear layer's weight.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WeightLayout {
    /// `[in, out]`, applied as `x · W` (GPT-2's `Conv1D`; PEFT's `fan_in_fan_out`).
    InOut,
    /// `[out, in]`, applied as `x · Wᵀ` (`torch.nn.Linear`).
    OutIn,
}

/// A linear layer, `y = x·W (+ b)`, optionally with LoRA.
#[derive(Debug, Clone)]
pub struct Linear {
    pub weight: Tensor,
    pub bias: Option<Tensor>,
    pub layout: WeightLayout,
    pub lora: Option<Lora>,
}

impl Linear {
    /// Loads `weight` (and `bias` when `bias`) stored in `layout`.
    pub fn load(
        vb: &candle_nn::VarBuilder,
        n_in: usize,
        n_out: usize,
        bias: bool,
        layout: WeightLayout,
    ) -> Result<Self> {
        let weight = match layout {
            WeightLayout::InOut => vb.get((n_in, n_out), "weight")?,
            WeightLayout::OutIn => vb.get((n_out, n_in), "weight")?,
        };
        let bias = if bias {
            Some(vb.get(n_out, "bias")?)
        } else {
            None
        };
        Ok(Linear {
            weight,
            bias,
            layout,
            lora: None,
        })
    }

    /// `(in, out)`.
    pub fn dims(&self) -> Result<(usize, usize)> {
        let (a, b) = self.weight.dims2()?;
        Ok(match self.layout {
            WeightLayout::InOut => (a, b),
            WeightLayout::OutIn => (b, a),
        })
    }

    /// The weight as `[in, out]` (a view for `OutIn`).
    fn in_out(&self) -> Result<Tensor> {
        Ok(match self.layout {
            WeightLayout::InOut => self.weight.clone(),
            WeightLayout::OutIn => self.weight.t()?,
        })
    }

    /// `x` `[.., in]` → `[.., out]`. A frozen weight takes the input as it
    /// is, and with LoRA is one fused node (every node, a reshape too, has a
    /// gradient backward allocates and adds).
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (n_in, n_out) = self.dims()?;
        let weight = self.in_out()?;
        let mut out_shape = x.dims().to_vec();
        *out_shape
            .last_mut()
            .expect("inputs have a feature dimension") = n_out;
        let rows = x.elem_count() / n_in;
        let frozen = !trains(&self.weight);
        // A frozen layer's frozen bias is added inside the fused ops; any
        // other bias is a node of its own.
        let fused_bias = self.bias.as_ref().filter(|b| frozen && !trains(b));
        let add_bias = |y: Tensor| -> Result<Tensor> {
            match &self.bias {
                Some(bias) if fused_bias.is_none() => Ok(y.broadcast_add(bias)?),
                _ => Ok(y),
            }
        };
        if let Some(lora) = self.lora.as_ref().filter(|_| frozen) {
            return add_bias(super::ops::lora_linear(
                x,
                (&weight, fused_bias),
                &lora.a,
                &lora.b,
                lora.scale,
                lora.dropout_mask(x.dims())?,
            )?);
        }
        let mut y = add_bias(if frozen {
            super::ops::frozen_linear(x, &weight, fused_bias)?
        } else {
            x.reshape((rows, n_in))?
                .matmul(&weight)?
                .reshape(out_shape.as_slice())?
        })?;
        if let Some(lora) = &self.lora {
            y = (y + lora
                .forward(&x.reshape((rows, n_in))?)?
                .reshape(out_shape)?)?;
        }
        Ok(y)
    }

    /// Folds the LoRA update into the weight, in its stored layout; returns
    /// whether there was one.
    pub fn merge_lora(&mut self) -> Result<bool> {
        let Some(lora) = self.lora.take() else {
            return Ok(false);
        };
        // In f64, rounded once: the merged weight is W + scale·B·A to the
        // nearest float32.
        let delta = (lora
            .b
            .to_dtype(DType::F64)?
            .matmul(&lora.a.to_dtype(DType::F64)?)?
            * lora.scale)?;
        let delta = match self.layout {
            WeightLayout::InOut => delta.t()?,
            WeightLayout::OutIn => delta,
        };
        self.weight = (self.weight.to_dtype(DType::F64)? + delta)?.to_dtype(self.weight.dtype())?;
        Ok(true)
    }
}

/// Whether a weight takes part in backpropagation (a variable, or computed from one).
pub fn trains(weight: &Tensor) -> bool {
    weight.is_variable() || weight.track_op()
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
        KvCache {
            layers: vec![None; n_layer],
        }
    }

    /// How many positions the cache holds.
    pub fn len(&self) -> usize {
        self.layers
            .first()
            .and_then(|l| l.as_ref())
            .map_or(0, |(k, _)| k.dim(2).unwrap_or(0))
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Appends `k` and `v` to layer `i`'s; returns the whole keys and values.
    pub fn append(
        slot: Option<&mut Option<(Tensor, Tensor)>>,
        k: Tensor,
        v: Tensor,
    ) -> Result<(Tensor, Tensor)> {
        let Some(slot) = slot else { return Ok((k, v)) };
        let (k, v) = match slot.as_ref() {
            Some((past_k, past_v)) => (
                Tensor::cat(&[past_k, &k], 2)?,
                Tensor::cat(&[past_v, &v], 2)?,
            ),
            None => (k, v),
        };
        *slot = Some((k.clone(), v.clone()));
        Ok((k, v))
    }
}

/// How each row of a batch is laid out: after its left padding (transformers'
/// and transformers.js's `padding_side = "left"`), or as several sequences
/// packed one after another, none attending to another and each counting
/// its positions from 0 (training on conversations). Empty: one sequence a
/// row, unpadded.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RowLayout {
    pads: Vec<usize>,
    /// Packed rows: for each position of each row, where its sequence starts.
    starts: Vec<Vec<u32>>,
}

impl RowLayout {
    /// Rows after `pads` positions of left padding each.
    pub fn padded(pads: Vec<usize>) -> Self {
        RowLayout {
            pads,
            starts: Vec::new(),
        }
    }

    /// Rows of sequences packed end to end: `lengths[b]` are row `b`'s
    /// sequence lengths, in order (they sum to the row's length).
    pub fn packed(lengths: &[Vec<usize>]) -> Self {
        let starts = lengths
            .iter()
            .map(|row| {
                let mut at = 0u32;
                row.iter()
                    .flat_map(|&n| {
                        let start = at;
                        at += n as u32;
                        std::iter::repeat_n(start, n)
                    })
                    .collect()
            })
            .collect();
        RowLayout {
            pads: Vec::new(),
            starts,
        }
    }

    /// From an attention mask `[b][t]` of zeros then ones.
    pub fn from_mask(mask: &[Vec<u32>]) -> Result<Self> {
        let mut pads = Vec::with_capacity(mask.len());
        for (row, m) in mask.iter().enumerate() {
            let pad = m.iter().take_while(|&&v| v == 0).count();
            if m[pad..].contains(&0) {
                return Err(ModelError::Config(format!(
                    "row {row} of the attention mask is not left-padded (zeros, then ones)"
                )));
            }
            pads.push(pad);
        }
        Ok(RowLayout::padded(pads))
    }

    /// `sequences` padded on the left with `pad_id` to the longest, and
    /// their padding (empty when no row needed any).
    pub fn pad(sequences: &[Vec<u32>], pad_id: u32) -> (Vec<Vec<u32>>, RowLayout) {
        let longest = sequences.iter().map(Vec::len).max().unwrap_or(0);
        let rows = sequences
            .iter()
            .map(|s| {
                std::iter::repeat_n(pad_id, longest - s.len())
                    .chain(s.iter().copied())
                    .collect()
            })
            .collect();
        let pads: Vec<usize> = sequences.iter().map(|s| longest - s.len()).collect();
        (
            rows,
            if pads.iter().all(|&p| p == 0) {
                RowLayout::default()
            } else {
                RowLayout::padded(pads)
            },
        )
    }

    /// The rows it describes (0: any number, each one unpadded sequence).
    pub fn rows(&self) -> usize {
        self.pads.len().max(self.starts.len())
    }

    /// Whether rows hold packed sequences.
    pub fn is_packed(&self) -> bool {
        !self.starts.is_empty()
    }

    /// The left padding of row `b`.
    pub fn of(&self, b: usize) -> usize {
        self.pads.get(b).copied().unwrap_or(0)
    }

    /// The first position that absolute index `j` of row `b` sees (and
    /// counts its position from): its sequence's start, or the row's padding.
    pub fn start(&self, b: usize, j: usize) -> usize {
        match self.starts.get(b) {
            Some(starts) => starts.get(j).map_or(0, |&s| s as usize),
            None => self.of(b),
        }
    }

    /// The position id of absolute index `j` in row `b`: `cumsum(mask) − 1`,
    /// clamped at 0 as transformers' `generate()` builds it; in a packed
    /// row, counted from its sequence's start.
    pub fn position(&self, b: usize, j: usize) -> usize {
        j.saturating_sub(self.start(b, j))
    }

    /// Position ids `[b·t]` for `t` positions after `past`.
    pub fn positions(&self, batch: usize, past: usize, t: usize) -> Vec<u32> {
        (0..batch)
            .flat_map(|b| (past..past + t).map(move |j| self.position(b, j) as u32))
            .collect()
    }

    /// Checks that it describes a batch of `batch` rows of `s` positions.
    pub fn check(&self, batch: usize, s: usize) -> Result<()> {
        if !self.pads.is_empty() && self.pads.len() != batch {
            return Err(ModelError::Config(format!(
                "{} padding lengths for a batch of {batch}",
                self.pads.len()
            )));
        }
        if self.is_packed()
            && (self.starts.len() != batch || self.starts.iter().any(|r| r.len() != s))
        {
            return Err(ModelError::Config(format!(
                "packed sequences for {} rows of {:?} positions, in a batch of {batch} x {s}",
                self.starts.len(),
                self.starts.iter().map(Vec::len).collect::<Vec<_>>()
            )));
        }
        Ok(())
    }
}

/// A `[vocab, width]` token matrix (an input embedding, or an output head)
/// whose rows PEFT's trainable tokens may replace.
#[derive(Debug, Clone)]
pub struct TokenMatrix {
    pub weight: Tensor,
    pub rows: Option<TokenRows>,
}

impl TokenMatrix {
    pub fn new(weight: Tensor) -> Self {
        TokenMatrix { weight, rows: None }
    }

    pub fn vocab_size(&self) -> usize {
        self.weight.dim(0).unwrap_or(0)
    }

    /// Rows for `ids` `[n]`: `[n, width]`.
    pub fn embed(&self, ids: &Tensor) -> Result<Tensor> {
        match &self.rows {
            Some(rows) => rows.embedding(ids),
            None => Ok(self.weight.embedding(ids)?),
        }
    }

    /// Logits `hidden · Wᵀ` for `hidden` `[n, width]`.
    pub fn logits(&self, hidden: &Tensor) -> Result<Tensor> {
        match &self.rows {
            Some(rows) => rows.head(hidden),
            None if trains(&self.weight) => Ok(hidden.matmul(&self.weight.t()?)?),
            None => super::ops::frozen_matmul(hidden, &self.weight.t()?),
        }
    }

    /// Mean cross-entropy of the logits of `hidden` `[n, width]` against
    /// `labels` `[n]`; with a frozen matrix the logits are never kept (a
    /// fused op). `grad` says whether backward will run.
    pub fn loss(&self, hidden: &Tensor, labels: &Tensor, grad: bool) -> Result<Tensor> {
        let cut = |t: Tensor| if grad { t } else { t.detach() };
        if let Some(rows) = &self.rows {
            return super::ops::linear_cross_entropy_rows(
                &cut(hidden.clone()),
                &rows.masked,
                &rows.indices,
                &cut(rows.values.clone()),
                labels,
            );
        }
        if !trains(&self.weight) {
            return super::ops::linear_cross_entropy(&cut(hidden.clone()), &self.weight, labels);
        }
        super::ops::cross_entropy(&cut(self.logits(hidden)?), labels)
    }

    /// Folds trainable rows into the weight; returns whether there were any.
    pub fn merge_rows(&mut self) -> Result<bool> {
        let Some(rows) = self.rows.take() else {
            return Ok(false);
        };
        self.weight = rows.apply()?.detach();
        Ok(true)
    }

    /// Grows the matrix to `new_size` rows, the new ones starting as `init`
    /// says, drawn from `rng`.
    pub fn grow(
        &mut self,
        new_size: usize,
        init: EmbeddingInit,
        rng: &mut super::rng::Rng,
    ) -> Result<()> {
        let (old_size, width) = self.weight.dims2()?;
        if new_size < old_size {
            return Err(ModelError::Config(format!(
                "cannot shrink the embedding from {old_size} to {new_size} rows"
            )));
        }
        if new_size == old_size {
            return Ok(());
        }
        let added = new_size - old_size;
        let rows = match init {
            EmbeddingInit::Normal => rng.tensor(&[added, width], |r| r.normal() * 0.02)?,
            EmbeddingInit::Mean => {
                let old = self.weight.to_dtype(DType::F32)?;
                let mean = old.mean(0)?;
                let std = (old.broadcast_sub(&mean)?.sqr()?.mean(0)? * 1e-9)?.sqrt()?;
                let noise = rng.tensor(&[added, width], |r| r.normal())?;
                noise.broadcast_mul(&std)?.broadcast_add(&mean)?
            }
        };
        self.weight = Tensor::cat(&[&self.weight, &rows.to_dtype(self.weight.dtype())?], 0)?;
        Ok(())
    }
}

/// How the rows a vocabulary adds to the embedding start.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EmbeddingInit {
    /// transformers' `mean_resizing`: the old rows' mean plus noise drawn
    /// with 1e-9 times their variance (the diagonal of the covariance
    /// transformers samples with).
    Mean,
    /// N(0, 0.02²), the usual `initializer_range`.
    Normal,
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
    pub fn pick(&self, logits: &[f32], rng: &mut super::rng::Rng) -> u32 {
        let mut order: Vec<u32> = (0..logits.len() as u32).collect();
        // Largest first; ties by id, so a seed gives one sequence.
        order.sort_by(|&a, &b| {
            logits[b as usize]
                .total_cmp(&logits[a as usize])
                .then(a.cmp(&b))
        });
        if self.top_k > 0 {
            order.truncate(self.top_k);
        }
        let max = logits[order[0] as usize] as f64;
        let weights: Vec<f64> = order
            .iter()
            .map(|&i| ((logits[i as usize] as f64 - max) / self.temperature).exp())
            .collect();
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
