//! A decoder ONNX file (transformers.js's layout) run by ONNX Runtime:
//! prefill, steps through the KV cache, greedy decoding.

use std::borrow::Cow;
use std::path::Path;

use ort::session::{Session, SessionInputValue};
use ort::value::{DynValue, Tensor, TensorElementType, ValueType};

use super::runtime::{RuntimeError, environment};
use crate::model::rng::Rng;
use crate::model::{RowLayout, Sampling};

/// The KV cache between calls: one `present.*` value per `past_key_values.*`
/// input, in the graph's input order.
pub struct Past {
    values: Vec<DynValue>,
    /// Positions already in the cache.
    pub len: usize,
}

/// Logits, the grown cache and the values of the outputs asked for.
pub type Captured = (Vec<f32>, Past, Vec<Vec<f32>>);

/// One decoder graph in a session.
pub struct OnnxLm {
    session: Session,
    past_names: Vec<String>,
    present_names: Vec<String>,
    past_type: TensorElementType,
    heads: i64,
    head_dim: i64,
    has_position_ids: bool,
    /// The logits' last dimension.
    pub vocab: usize,
}

fn bad(path: &Path, message: impl std::fmt::Display) -> RuntimeError {
    RuntimeError::Ort(format!("`{}`: {message}", path.display()))
}

/// How a session's intra-op threads use the cores.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Threads {
    /// Intra-op threads.
    pub count: usize,
    /// Whether an idle thread spins for its next op (ONNX Runtime's default:
    /// the lowest latency with the cores to itself) or sleeps, leaving the
    /// core to whatever runs beside it.
    pub spin: bool,
}

impl Threads {
    /// Every core, spinning: one session with the machine to itself
    /// (`symb generate`).
    pub fn alone(cores: usize) -> Threads {
        Threads {
            count: cores.max(1),
            spin: true,
        }
    }

    /// For a session among `jobs` run at once on `cores`: twice its share of
    /// the cores (never more than all of them), threads that sleep when idle.
    /// While the others run, the system shares the cores among their threads;
    /// when they are done (the last of five files on two cores runs alone),
    /// this one has the cores its share would leave idle. On 2 cores with 2
    /// jobs, the five verify stages of GPT-2 small (`bench/export.py`'s
    /// model) took 16.4 s this way and 16.9 s on one spinning thread each
    /// (means of six alternating runs; this way was faster in five).
    pub fn shared(cores: usize, jobs: usize) -> Threads {
        let share = (cores / jobs.max(1)).max(1);
        Threads {
            count: (2 * share).min(cores.max(1)),
            spin: false,
        }
    }
}

/// `tokens` has one list per prompt (the two `follow_batch` walks).
fn one_list_per_prompt(prompts: &[Vec<u32>], tokens: &[Vec<u32>]) -> Result<(), RuntimeError> {
    if tokens.len() != prompts.len() {
        return Err(RuntimeError::Ort(format!(
            "{} token lists for {} prompts",
            tokens.len(),
            prompts.len()
        )));
    }
    Ok(())
}

impl OnnxLm {
    /// Loads `path` into a session with these intra-op threads.
    pub fn load(path: &Path, threads: Threads) -> Result<Self, RuntimeError> {
        let env = environment()?;
        let session = Session::builder(env)?
            .with_intra_threads(threads.count)
            .map_err(|e| bad(path, e))?
            .with_intra_op_spinning(threads.spin)
            .map_err(|e| bad(path, e))?
            .commit_from_file(path)
            .map_err(|e| bad(path, e))?;
        let names: Vec<&str> = session.inputs().iter().map(|i| i.name()).collect();
        for required in ["input_ids", "attention_mask"] {
            if !names.contains(&required) {
                return Err(bad(
                    path,
                    format!(
                        "the graph has no `{required}` input (it has: {})",
                        names.join(", ")
                    ),
                ));
            }
        }
        let pasts: Vec<_> = session
            .inputs()
            .iter()
            .filter(|i| i.name().starts_with("past_key_values."))
            .collect();
        let Some(first) = pasts.first() else {
            return Err(bad(
                path,
                "the graph has no `past_key_values.*` inputs: it was exported without a KV cache",
            ));
        };
        let ValueType::Tensor { ty, shape, .. } = first.dtype() else {
            return Err(bad(path, format!("`{}` is not a tensor", first.name())));
        };
        let (heads, head_dim) = (shape[1], shape[3]);
        if heads <= 0 || head_dim <= 0 {
            return Err(bad(
                path,
                format!(
                    "`{}` has symbolic heads or head_dim ({shape:?}); transformers.js needs numbers",
                    first.name()
                ),
            ));
        }
        let past_names: Vec<String> = pasts.iter().map(|p| p.name().to_string()).collect();
        let present_names: Vec<String> = past_names
            .iter()
            .map(|n| n.replacen("past_key_values.", "present.", 1))
            .collect();
        let outputs: Vec<&str> = session.outputs().iter().map(|o| o.name()).collect();
        if let Some(missing) = present_names
            .iter()
            .find(|n| !outputs.contains(&n.as_str()))
        {
            return Err(bad(
                path,
                format!("the graph has no `{missing}` output for its `past_key_values` input"),
            ));
        }
        let vocab = match session
            .outputs()
            .iter()
            .find(|o| o.name() == "logits")
            .map(|o| o.dtype())
        {
            Some(ValueType::Tensor { shape, .. }) if shape.len() == 3 && shape[2] > 0 => {
                shape[2] as usize
            }
            Some(_) => {
                return Err(bad(
                    path,
                    "`logits` is not a [batch, sequence, vocab] tensor with a fixed vocab",
                ));
            }
            None => {
                return Err(bad(
                    path,
                    format!(
                        "the graph has no `logits` output (it has: {})",
                        outputs.join(", ")
                    ),
                ));
            }
        };
        let past_type = *ty;
        let has_position_ids = names.contains(&"position_ids");
        Ok(OnnxLm {
            session,
            past_names,
            present_names,
            past_type,
            heads,
            head_dim,
            has_position_ids,
            vocab,
        })
    }

    /// An empty cache for one sequence.
    pub fn empty_past(&self) -> Result<Past, RuntimeError> {
        self.empty_past_for(1)
    }

    /// An empty cache for a batch of `batch` rows.
    pub fn empty_past_for(&self, batch: usize) -> Result<Past, RuntimeError> {
        let shape = [batch as i64, self.heads, 0, self.head_dim];
        let values = (0..self.past_names.len())
            .map(|_| match self.past_type {
                TensorElementType::Float16 => {
                    Ok(Tensor::<half::f16>::from_array((shape, Vec::new()))?.into_dyn())
                }
                _ => Ok(Tensor::<f32>::from_array((shape, Vec::new()))?.into_dyn()),
            })
            .collect::<Result<Vec<_>, RuntimeError>>()?;
        Ok(Past { values, len: 0 })
    }

    /// Runs `ids` (one sequence) after `past`: the logits of every new
    /// position (`[ids.len() * vocab]`) and the grown cache.
    pub fn run(&mut self, ids: &[u32], past: Past) -> Result<(Vec<f32>, Past), RuntimeError> {
        self.run_batch(&[ids.to_vec()], &RowLayout::default(), past)
    }

    /// Runs a left-padded batch: `rows` of one length after `past`, row `b`
    /// starting after `padding.of(b)` masked positions (counted from the start
    /// of the cache), its position ids counting from there as transformers'
    /// `generate()` makes them. The logits are `[rows, t, vocab]`, flat.
    pub fn run_batch(
        &mut self,
        rows: &[Vec<u32>],
        padding: &RowLayout,
        past: Past,
    ) -> Result<(Vec<f32>, Past), RuntimeError> {
        let (logits, past, _) = self.run_capturing(rows, padding, past, &[])?;
        Ok((logits, past))
    }

    /// [`run_batch`](Self::run_batch), also returning the values of the
    /// graph's float outputs `extra` (flat, in their order).
    pub fn run_capturing(
        &mut self,
        rows: &[Vec<u32>],
        padding: &RowLayout,
        past: Past,
        extra: &[String],
    ) -> Result<Captured, RuntimeError> {
        let (b, t) = (rows.len(), rows[0].len());
        debug_assert!(rows.iter().all(|r| r.len() == t));
        let total = past.len + t;
        let ids: Vec<i64> = rows.iter().flatten().map(|&i| i as i64).collect();
        let mask: Vec<i64> = (0..b)
            .flat_map(|row| (0..total).map(move |j| i64::from(j >= padding.of(row))))
            .collect();
        let mut inputs: Vec<(Cow<'_, str>, SessionInputValue<'_>)> = vec![
            (
                "input_ids".into(),
                Tensor::<i64>::from_array(([b, t], ids))?.into_dyn().into(),
            ),
            (
                "attention_mask".into(),
                Tensor::<i64>::from_array(([b, total], mask))?
                    .into_dyn()
                    .into(),
            ),
        ];
        if self.has_position_ids {
            let positions: Vec<i64> = (0..b)
                .flat_map(|row| (past.len..total).map(move |j| padding.position(row, j) as i64))
                .collect();
            inputs.push((
                "position_ids".into(),
                Tensor::<i64>::from_array(([b, t], positions))?
                    .into_dyn()
                    .into(),
            ));
        }
        for (name, value) in self.past_names.iter().zip(past.values) {
            inputs.push((Cow::Owned(name.clone()), value.into()));
        }
        let mut outputs = self.session.run(inputs)?;
        let logits = {
            let value = outputs.get("logits").expect("checked at load");
            match value.dtype() {
                ValueType::Tensor {
                    ty: TensorElementType::Float16,
                    ..
                } => value
                    .try_extract_tensor::<half::f16>()?
                    .1
                    .iter()
                    .map(|v| v.to_f32())
                    .collect(),
                _ => value.try_extract_tensor::<f32>()?.1.to_vec(),
            }
        };
        if logits.len() != b * t * self.vocab {
            return Err(RuntimeError::Ort(format!(
                "`logits` has {} values for {b} x {t} positions of {}",
                logits.len(),
                self.vocab
            )));
        }
        let values = self
            .present_names
            .iter()
            .map(|name| outputs.remove(name).expect("checked at load"))
            .collect();
        let captured = extra
            .iter()
            .map(|name| {
                let value = outputs.get(name.as_str()).ok_or_else(|| {
                    RuntimeError::Ort(format!("the graph has no `{name}` output"))
                })?;
                Ok(value.try_extract_tensor::<f32>()?.1.to_vec())
            })
            .collect::<Result<Vec<_>, RuntimeError>>()?;
        Ok((logits, Past { values, len: total }, captured))
    }

    /// Decoding with the cache, greedy or sampled exactly as candle's
    /// [`Model::decode`](crate::model::Model::decode) samples: up to
    /// `max_new_tokens` ids, stopping after `eos` (included) or at `context`.
    /// Returns the ids and the logits at the last prompt position.
    pub fn decode(
        &mut self,
        prompt: &[u32],
        max_new_tokens: usize,
        eos: Option<u32>,
        context: usize,
        sampling: Option<&Sampling>,
    ) -> Result<(Vec<u32>, Vec<f32>), RuntimeError> {
        if prompt.is_empty() {
            return Err(RuntimeError::Ort(
                "the prompt encodes to no tokens".to_string(),
            ));
        }
        let past = self.empty_past()?;
        let (logits, mut past) = self.run(prompt, past)?;
        let vocab = self.vocab;
        let prompt_logits = logits[(prompt.len() - 1) * vocab..].to_vec();
        let mut last = prompt_logits.clone();
        let mut generated = Vec::new();
        let mut rng = sampling.map(|s| Rng::new(s.seed));
        while generated.len() < max_new_tokens && prompt.len() + generated.len() < context {
            let next = match (sampling, rng.as_mut()) {
                (Some(s), Some(rng)) if s.temperature > 0.0 => s.pick(&last, rng),
                _ => argmax(&last),
            };
            generated.push(next);
            if Some(next) == eos || generated.len() == max_new_tokens {
                break;
            }
            let (logits, grown) = self.run(&[next], past)?;
            past = grown;
            last = logits;
        }
        Ok((generated, prompt_logits))
    }
}

/// What [`OnnxLm::decode_steps`] returns.
pub struct Decoded {
    pub generated: Vec<u32>,
    /// The prefill's logits, `[prompt.len() * vocab]`.
    pub prefill: Vec<f32>,
    /// The logits of each step through the cache, `[(generated.len() - 1) * vocab]` at most.
    pub steps: Vec<f32>,
}

impl OnnxLm {
    /// Greedy decoding that keeps every logit: the prefill's rows
    /// (`[prompt.len() * vocab]`), the ids, and the rows of each step through
    /// the cache (one per generated id fed back, `[(ids.len() - 1) * vocab]`
    /// at most).
    pub fn decode_steps(
        &mut self,
        prompt: &[u32],
        max_new_tokens: usize,
        eos: Option<u32>,
        context: usize,
    ) -> Result<Decoded, RuntimeError> {
        if prompt.is_empty() {
            return Err(RuntimeError::Ort(
                "the prompt encodes to no tokens".to_string(),
            ));
        }
        let vocab = self.vocab;
        let (prefill, mut past) = self.run(prompt, self.empty_past()?)?;
        let mut next = argmax(&prefill[(prompt.len() - 1) * vocab..]);
        let (mut generated, mut steps) = (Vec::new(), Vec::new());
        while generated.len() < max_new_tokens && prompt.len() + generated.len() < context {
            generated.push(next);
            if Some(next) == eos
                || generated.len() == max_new_tokens
                || prompt.len() + generated.len() == context
            {
                break;
            }
            let (logits, grown) = self.run(&[next], past)?;
            past = grown;
            next = argmax(&logits);
            steps.extend(logits);
        }
        Ok(Decoded {
            generated,
            prefill,
            steps,
        })
    }

    /// [`decode_steps`](Self::decode_steps) for several prompts at once,
    /// left-padded into one batch with one cache (a step costs about what one
    /// row's does: the weights are read once for the whole batch). Each
    /// row's ids and logits are what it would get alone, to rounding.
    pub fn decode_steps_batch(
        &mut self,
        prompts: &[Vec<u32>],
        max_new_tokens: usize,
        eos: Option<u32>,
        context: usize,
    ) -> Result<Vec<Decoded>, RuntimeError> {
        self.steps_batch(prompts, eos.unwrap_or(0), |b, generated, logits| {
            let length = prompts[b].len() + generated.len();
            if generated.len() >= max_new_tokens || length >= context {
                return None;
            }
            let next = argmax(logits);
            Some((
                next,
                Some(next) == eos || generated.len() + 1 == max_new_tokens || length + 1 == context,
            ))
        })
    }

    /// Teacher forcing through the cache: one prefill pass over each prompt,
    /// then `tokens[b]` fed one at a time (all but the last, whose logits
    /// nothing reads), as [`decode_steps_batch`](Self::decode_steps_batch)
    /// feeds its own choices. `generated` is the given tokens.
    pub fn follow_batch(
        &mut self,
        prompts: &[Vec<u32>],
        tokens: &[Vec<u32>],
        pad_id: u32,
    ) -> Result<Vec<Decoded>, RuntimeError> {
        one_list_per_prompt(prompts, tokens)?;
        self.steps_batch(prompts, pad_id, |b, generated, _| {
            let j = generated.len();
            tokens[b].get(j).map(|&t| (t, j + 1 == tokens[b].len()))
        })
    }

    /// [`follow_batch`](Self::follow_batch) in three calls instead of one per
    /// token: the prefill, the first token of every row alone through the
    /// cache (one position after the prompt, the shape of a browser's decoding
    /// step), then the rest of the tokens together through the cache (their
    /// causal mask offset by what the cache holds). The same rows of logits
    /// come back; each is what the per-token steps give, to rounding, where a
    /// position's logits depend on it alone (not so for a file that scales its
    /// activations over the whole call: see
    /// [`Dtype::scales_activations_per_call`](crate::dtype::Dtype::scales_activations_per_call)).
    /// A row with fewer tokens is padded with `pad_id` after its end; no
    /// position of its own sees those.
    pub fn follow_batch_chunked(
        &mut self,
        prompts: &[Vec<u32>],
        tokens: &[Vec<u32>],
        pad_id: u32,
    ) -> Result<Vec<Decoded>, RuntimeError> {
        one_list_per_prompt(prompts, tokens)?;
        let vocab = self.vocab;
        let (mut out, padding, mut past) = self.prefill_batch(prompts, pad_id)?;
        for (row, tokens) in out.iter_mut().zip(tokens) {
            row.generated = tokens.clone();
        }
        // Every token but a row's last is fed (nothing reads the last's logits).
        let fed: Vec<&[u32]> = tokens
            .iter()
            .map(|t| &t[..t.len().saturating_sub(1)])
            .collect();
        let width = fed.iter().map(|f| f.len()).max().unwrap_or(0);
        let column = |range: std::ops::Range<usize>| -> Vec<Vec<u32>> {
            fed.iter()
                .map(|f| {
                    range
                        .clone()
                        .map(|j| f.get(j).copied().unwrap_or(pad_id))
                        .collect()
                })
                .collect()
        };
        for range in [0..width.min(1), 1.min(width)..width] {
            if range.is_empty() {
                continue;
            }
            let (t, start) = (range.len(), range.start);
            let (logits, grown) = self.run_batch(&column(range), &padding, past)?;
            past = grown;
            for (b, row) in out.iter_mut().enumerate() {
                let own = fed[b].len().saturating_sub(start).min(t);
                row.steps
                    .extend_from_slice(&logits[b * t * vocab..(b * t + own) * vocab]);
            }
        }
        Ok(out)
    }

    /// The prompts as one left-padded batch from an empty cache: each row's
    /// prompt logits (nothing generated or stepped yet), the padding and the
    /// cache after them.
    fn prefill_batch(
        &mut self,
        prompts: &[Vec<u32>],
        pad_id: u32,
    ) -> Result<(Vec<Decoded>, RowLayout, Past), RuntimeError> {
        if prompts.is_empty() || prompts.iter().any(Vec::is_empty) {
            return Err(RuntimeError::Ort(
                "the prompt encodes to no tokens".to_string(),
            ));
        }
        let vocab = self.vocab;
        let (rows, padding) = RowLayout::pad(prompts, pad_id);
        let longest = rows[0].len();
        let (logits, past) =
            self.run_batch(&rows, &padding, self.empty_past_for(prompts.len())?)?;
        let out = (0..prompts.len())
            .map(|b| Decoded {
                generated: Vec::new(),
                prefill: logits[(b * longest + padding.of(b)) * vocab..(b + 1) * longest * vocab]
                    .to_vec(),
                steps: Vec::new(),
            })
            .collect();
        Ok((out, padding, past))
    }

    /// The loop both share. `next(b, generated, logits)` gives row `b`'s next
    /// token from its latest logits, and whether it is the row's last (not
    /// fed); `None` when the row has nothing more.
    fn steps_batch(
        &mut self,
        prompts: &[Vec<u32>],
        pad_id: u32,
        mut next: impl FnMut(usize, &[u32], &[f32]) -> Option<(u32, bool)>,
    ) -> Result<Vec<Decoded>, RuntimeError> {
        let vocab = self.vocab;
        let (mut out, padding, mut past) = self.prefill_batch(prompts, pad_id)?;
        let mut last: Vec<Vec<f32>> = out
            .iter()
            .map(|row| row.prefill[row.prefill.len() - vocab..].to_vec())
            .collect();
        let mut done = vec![false; prompts.len()];
        loop {
            let mut fed = Vec::with_capacity(prompts.len());
            for (b, row) in out.iter_mut().enumerate() {
                let token = if done[b] {
                    None
                } else {
                    next(b, &row.generated, &last[b])
                };
                match token {
                    Some((token, is_last)) => {
                        row.generated.push(token);
                        done[b] = is_last;
                        fed.push(vec![if is_last { pad_id } else { token }]);
                    }
                    None => {
                        done[b] = true;
                        fed.push(vec![pad_id]);
                    }
                }
            }
            if done.iter().all(|&d| d) {
                break;
            }
            let (logits, grown) = self.run_batch(&fed, &padding, past)?;
            past = grown;
            for (b, row) in out.iter_mut().enumerate() {
                if !done[b] {
                    last[b] = logits[b * vocab..(b + 1) * vocab].to_vec();
                    row.steps.extend_from_slice(&last[b]);
                }
            }
        }
        Ok(out)
    }
}

/// The index of the largest value (the first one on ties, as torch.argmax).
pub fn argmax(values: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &v) in values.iter().enumerate() {
        if v > values[best] {
            best = i;
        }
    }
    best as u32
}
