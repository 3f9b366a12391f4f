//! Verification: an ONNX file run by ONNX Runtime against the model's own
//! forward pass in candle, on the same prompts.
//!
//! candle's side depends only on the model, so it is a [`Reference`]
//! computed once per model and read by every dtype's verification: per
//! prompt, candle's greedy tokens and its logits at every position (its
//! prefill pass over the prompt, then each step through its KV cache); and
//! its negative log-likelihood of windows of the eval split. Per file, ONNX
//! Runtime runs one prefill pass over each prompt from an empty cache, then
//! follows candle's tokens through its KV cache (one at a time, or the first
//! alone and the rest in one call: [`Stepping`]). Every
//! position's logits are compared (prefill rows and cache steps apart), and
//! the greedy match is the run of candle's tokens that are ONNX's argmax
//! too: exactly what ONNX's own greedy decoding gives before it first
//! differs, without decoding twice.

pub mod runtime;
pub mod session;
pub mod transformers_js;

use serde::{Deserialize, Serialize};

use crate::dtype::Dtype;
use crate::model::{Model, RowLayout};
use session::{OnnxLm, argmax};

/// The bounds a file must meet (`[verify.tolerance.D]`); a bound left out is
/// not checked.
#[derive(Debug, Default, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Tolerance {
    pub max_abs_error: Option<f64>,
    /// The largest logit error of a position over its largest logit's
    /// magnitude: a trained model's logits are larger than a random one's,
    /// and so are its rounding errors.
    pub max_relative_error: Option<f64>,
    pub top1_agreement: Option<f64>,
    pub kl_divergence: Option<f64>,
    pub perplexity_ratio: Option<f64>,
    pub greedy_match: Option<f64>,
}

/// The tolerance of each dtype when `[verify.tolerance.D]` says nothing,
/// set from measurement on the random-weight fixture (the hard case for
/// agreement) and on the real SmolLM2-135M-Instruct (GGUF, with the demo
/// language's tokens added; the hard case for error size: its logits reach
/// 35). Measured max abs error, max relative error, top-1 agreement, KL,
/// perplexity ratio, fixture / SmolLM2:
/// - fp32: 9e-6 / 1.5e-4, -, 1.0, 0, 1.0.
/// - fp16: 0.023 / 0.20 (so bounded relative to each position's largest
///   logit instead: 0.0038 / 0.0083), 0.998 / 0.997, 1.4e-6 / 1e-5, 1.0002 / 0.9997.
/// - q8 (8-bit storage): 0.34 / 2.1, 0.95 / 0.97, 6e-4 / 0.0018, 1.0003 / 0.987.
/// - int8, uint8 (dynamic): on the fixture 0.94, 0.906, 0.0022, 1.009; on
///   SmolLM2 they fail (KL 0.45: per-tensor activation scales meet its outliers).
/// - q4 (8-bit head): 3.5 / 17, 0.55 / 0.43 to 0.61, 0.096 / 0.33 to 0.61,
///   0.96 / 1.08 to 1.31 (over four eval sets); with a 4-bit head SmolLM2
///   loses KL 0.65. Rounding to 4 bits costs a real model this much: the
///   bounds catch a broken file, not a lossy one (calibration is the fix).
///
/// Each bound passes both with a margin and fails a file with one weight
/// scaled by 1.1 (tests/verify.rs). Greedy decoding is checked for fp32
/// only: after one near-tie flips a token the rest of a quantized decode
/// differs legitimately.
pub fn default_tolerance(dtype: Dtype) -> Tolerance {
    let t =
        |max_abs_error, top1_agreement, kl_divergence, perplexity_ratio, greedy_match| Tolerance {
            max_abs_error,
            max_relative_error: None,
            top1_agreement: Some(top1_agreement),
            kl_divergence: Some(kl_divergence),
            perplexity_ratio: Some(perplexity_ratio),
            greedy_match,
        };
    match dtype {
        Dtype::Fp32 => t(Some(1e-3), 0.999, 1e-6, 1.0001, Some(0.95)),
        Dtype::Fp16 => Tolerance {
            max_relative_error: Some(0.02),
            ..t(None, 0.98, 1e-4, 1.005, None)
        },
        Dtype::Q8 | Dtype::Int8 | Dtype::Uint8 => t(None, 0.85, 0.02, 1.05, None),
        Dtype::Q4 | Dtype::Q4f16 => t(None, 0.35, 1.0, 1.5, None),
    }
}

/// What a verification is given: token ids only, so both sides see the same.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Workload {
    /// (text, ids) per prompt.
    pub prompts: Vec<(String, Vec<u32>)>,
    /// The eval data's own reply to each prompt, where it has one (a
    /// completion, an assistant turn).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub expected: Vec<Option<String>>,
    /// Windows of the eval split for perplexity.
    pub windows: Vec<Vec<u32>>,
    pub max_new_tokens: usize,
    pub eos: Option<u32>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Agreement {
    pub positions: usize,
    pub max_abs_error: f32,
    /// The largest of each position's max abs error over its largest |logit|.
    pub max_relative_error: f32,
    pub top1_agreement: f64,
    pub kl_divergence: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct PromptResult {
    pub text: String,
    pub tokens: usize,
    /// candle's greedy tokens.
    pub reference_greedy: Vec<u32>,
    /// How many of them ONNX Runtime's greedy decoding gives too (before the first difference).
    pub matched: usize,
    /// ONNX Runtime's token where the two first differ.
    pub onnx_at_divergence: Option<u32>,
    /// ONNX Runtime's own greedy tokens, where they differ from candle's.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub onnx_greedy: Option<Vec<u32>>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Metrics {
    pub max_abs_error: f32,
    pub max_relative_error: f32,
    pub top1_agreement: f64,
    pub kl_divergence: f64,
    pub perplexity_ratio: f64,
    pub greedy_match: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct Check {
    pub metric: &'static str,
    pub value: f64,
    pub bound: f64,
    /// `max` (the value may not exceed the bound) or `min`.
    pub kind: &'static str,
    pub passed: bool,
}

#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub metrics: Metrics,
    pub checks: Vec<Check>,
    /// One prefill pass per prompt, from an empty cache.
    pub prefill: Agreement,
    /// Each position after it, candle's greedy tokens fed through the KV cache.
    pub cache: Agreement,
    pub perplexity_tokens: usize,
    pub perplexity_reference: f64,
    pub perplexity_onnx: f64,
    pub greedy_identical: usize,
    pub prompts: Vec<PromptResult>,
}

impl Report {
    pub fn failures(&self) -> impl Iterator<Item = &Check> {
        self.checks.iter().filter(|c| !c.passed)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    #[error(transparent)]
    Runtime(#[from] runtime::RuntimeError),
    #[error(transparent)]
    Model(#[from] crate::model::ModelError),
    #[error("the verification reference does not match its workload: {0}")]
    Reference(String),
    #[error("cannot {0} the reference logits: {1}")]
    Io(&'static str, std::io::Error),
}

impl From<candle_core::Error> for VerifyError {
    fn from(e: candle_core::Error) -> Self {
        VerifyError::Model(e.into())
    }
}

/// `symb generate --backend onnx`: the output folder's `onnx/model{suffix}.onnx`
/// for `dtype`, with the folder's tokenizer, config and generation config.
pub fn generate(
    dir: &std::path::Path,
    dtype: Dtype,
    prompt: &str,
    max_new_tokens: usize,
    sampling: Option<&crate::model::Sampling>,
    special: bool,
) -> Result<crate::model::Generation, VerifyError> {
    use crate::model::ModelError;
    let path = dir.join("onnx").join(dtype.file_name());
    if !path.is_file() {
        let present: Vec<&str> = Dtype::ALL
            .into_iter()
            .filter(|d| dir.join("onnx").join(d.file_name()).is_file())
            .map(Dtype::name)
            .collect();
        let have = if present.is_empty() {
            "no ONNX files".to_string()
        } else {
            format!("these dtypes: {}", present.join(", "))
        };
        return Err(ModelError::Config(format!(
            "`{}` does not exist; the folder has {have}",
            path.display()
        ))
        .into());
    }
    let config = crate::model::ModelConfig::read(&dir.join("config.json"))?;
    let tokenizer_path = dir.join("tokenizer.json");
    let tokenizer = tokenizers::Tokenizer::from_file(&tokenizer_path)
        .map_err(|e| ModelError::io(&tokenizer_path, e))?;
    let input_ids = tokenizer
        .encode(prompt, special)
        .map_err(|e| ModelError::io(&tokenizer_path, e))?
        .get_ids()
        .to_vec();
    let eos = crate::model::eos_token(dir, &config);
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let mut onnx = OnnxLm::load(&path, session::Threads::alone(cores))?;
    let (generated_ids, logits) =
        onnx.decode(&input_ids, max_new_tokens, eos, config.context(), sampling)?;
    let text = tokenizer
        .decode(&generated_ids, true)
        .map_err(|e| ModelError::io(&tokenizer_path, e))?;
    Ok(crate::model::Generation {
        input_ids,
        generated_ids,
        text,
        logits,
    })
}

/// The larger of two errors, NaN if either is (`f32::max` passes a NaN over).
fn nan_max(a: f32, b: f32) -> f32 {
    if a.is_nan() || b.is_nan() {
        f32::NAN
    } else {
        a.max(b)
    }
}

/// Running sums for an [`Agreement`].
#[derive(Default)]
struct Tally {
    positions: usize,
    max_abs: f32,
    max_relative: f32,
    top1: usize,
    kl: f64,
}

impl Tally {
    /// Compares `[n, vocab]` rows of reference and candidate logits.
    fn add(&mut self, reference: &[f32], candidate: &[f32], vocab: usize) {
        for (r, c) in reference
            .chunks_exact(vocab)
            .zip(candidate.chunks_exact(vocab))
        {
            self.positions += 1;
            let err = r
                .iter()
                .zip(c)
                .map(|(a, b)| (a - b).abs())
                .fold(0f32, |m, e| if e.is_nan() || e > m { e } else { m });
            self.max_abs = nan_max(self.max_abs, err);
            let scale = r.iter().fold(0f32, |m, v| m.max(v.abs()));
            self.max_relative = nan_max(
                self.max_relative,
                if scale > 0.0 { err / scale } else { err },
            );
            let (best_r, best_c) = (argmax(r) as usize, argmax(c) as usize);
            self.top1 += usize::from(best_r == best_c);
            self.kl += kl_with_maxima(r, c, r[best_r] as f64, c[best_c] as f64);
        }
    }

    fn finish(&self) -> Agreement {
        let n = self.positions.max(1) as f64;
        Agreement {
            positions: self.positions,
            max_abs_error: self.max_abs,
            max_relative_error: self.max_relative,
            top1_agreement: self.top1 as f64 / n,
            kl_divergence: self.kl / n,
        }
    }
}

/// The largest value of a row, in f64 (a NaN is passed over here; the sums
/// that use the maximum carry it).
fn row_max(logits: &[f32]) -> f64 {
    logits.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v)) as f64
}

/// `e^x` for `x ≤ 0`, to 1 ulp or so of `f64::exp` (a test holds it to
/// 4e-16 relative), in code the compiler can run on several lanes at once:
/// no call, no branch. `x = k ln 2 + r` with `|r| ≤ ln 2 / 2`, `e^r` by its
/// Taylor series to degree 13 (the rest is under 1e-17 of it), `2^k` built
/// in the exponent bits. Below −700 it gives `e^−700` (1e−304), which none
/// of the sums here, each holding a term of 1, can tell from zero; a NaN
/// stays NaN.
#[inline(always)]
fn exp_nonpositive(x: f64) -> f64 {
    // 1.5 * 2^52: adding it rounds to an integer, held in the low bits.
    const ROUND: f64 = 6_755_399_441_055_744.0;
    // ln 2 in two parts, the first with its low 32 bits zero, so k * LN2_HI
    // is exact for the k here (fdlibm's).
    const LN2_HI: f64 = f64::from_bits(0x3fe6_2e42_fee0_0000);
    const LN2_LO: f64 = f64::from_bits(0x3dea_39ef_3579_3c76);
    let x = if x < -700.0 { -700.0 } else { x };
    let shifted = x * std::f64::consts::LOG2_E + ROUND;
    let k = shifted - ROUND;
    let r = (x - k * LN2_HI) - k * LN2_LO;
    let mut p = INVERSE_FACTORIALS[13];
    for n in (0..13).rev() {
        p = p * r + INVERSE_FACTORIALS[n];
    }
    let scale = f64::from_bits(
        shifted
            .to_bits()
            .wrapping_sub(ROUND.to_bits())
            .wrapping_add(1023)
            << 52,
    );
    p * scale
}

/// `1 / n!` for `n` ≤ 13.
const INVERSE_FACTORIALS: [f64; 14] = {
    let (mut table, mut factorial, mut n) = ([0f64; 14], 1f64, 0);
    while n < 14 {
        table[n] = 1.0 / factorial;
        n += 1;
        factorial *= n as f64;
    }
    table
};

/// Lanes summed apart (and added in a fixed order at the end): the sums run
/// on vector lanes and give the same bits on every machine.
const LANES: usize = 4;

/// `log Σ exp(v)` over a row, in f64.
fn log_sum_exp(logits: &[f32]) -> f64 {
    let max = row_max(logits);
    let mut lanes = [0f64; LANES];
    let chunks = logits.chunks_exact(LANES);
    let rest: f64 = chunks
        .remainder()
        .iter()
        .map(|&v| exp_nonpositive(v as f64 - max))
        .sum();
    for chunk in chunks {
        for (lane, &v) in lanes.iter_mut().zip(chunk) {
            *lane += exp_nonpositive(v as f64 - max);
        }
    }
    max + (lanes.iter().sum::<f64>() + rest).ln()
}

/// KL(p || q) of the softmaxes of two logit rows, in nats, in one pass and
/// two exponentials an entry: with `p = e^a / S_p` and `q = e^b / S_q`,
/// `Σ p (log p − log q) = Σ p (a − b) − (log S_p − log S_q)`.
pub fn kl(p_logits: &[f32], q_logits: &[f32]) -> f64 {
    kl_with_maxima(p_logits, q_logits, row_max(p_logits), row_max(q_logits))
}

/// [`kl`] given each row's largest value (known to a caller that found its
/// argmax: the value there; a NaN there makes the result infinite, as a NaN
/// anywhere does).
fn kl_with_maxima(p_logits: &[f32], q_logits: &[f32], max_p: f64, max_q: f64) -> f64 {
    assert_eq!(p_logits.len(), q_logits.len(), "rows of one vocabulary");
    // Per lane: Σ e^(a − max_p), Σ e^(b − max_q), Σ e^(a − max_p) (a − b).
    let mut lanes = [[0f64; LANES]; 3];
    let mut add = |lane: usize, a: f32, b: f32| {
        let (a, b) = (a as f64, b as f64);
        let e = exp_nonpositive(a - max_p);
        lanes[0][lane] += e;
        lanes[1][lane] += exp_nonpositive(b - max_q);
        lanes[2][lane] += e * (a - b);
    };
    let (p_chunks, q_chunks) = (p_logits.chunks_exact(LANES), q_logits.chunks_exact(LANES));
    for (i, (&a, &b)) in p_chunks
        .remainder()
        .iter()
        .zip(q_chunks.remainder())
        .enumerate()
    {
        add(i, a, b);
    }
    for (pc, qc) in p_chunks.zip(q_chunks) {
        for lane in 0..LANES {
            add(lane, pc[lane], qc[lane]);
        }
    }
    let [sum_p, sum_q, weighted] = lanes.map(|l| l.iter().sum::<f64>());
    let value = weighted / sum_p - (max_p + sum_p.ln()) + (max_q + sum_q.ln());
    if value.is_nan() {
        f64::INFINITY
    } else {
        value.max(0.0)
    }
}

/// Negative log-likelihood of each next token in `ids` under `logits`.
fn nll(logits: &[f32], ids: &[u32], vocab: usize) -> f64 {
    ids[1..]
        .iter()
        .enumerate()
        .map(|(i, &next)| {
            let row = &logits[i * vocab..(i + 1) * vocab];
            log_sum_exp(row) - row[next as usize] as f64
        })
        .sum()
}

/// Values per chunk read or written (64 KiB).
const CHUNK: usize = 1 << 14;

/// Reads `out.len()` little-endian f32 values.
fn read_f32(reader: &mut impl std::io::Read, out: &mut [f32]) -> Result<(), VerifyError> {
    let mut bytes = [0u8; CHUNK * 4];
    for values in out.chunks_mut(CHUNK) {
        let bytes = &mut bytes[..values.len() * 4];
        reader
            .read_exact(bytes)
            .map_err(|e| VerifyError::Io("read", e))?;
        for (v, b) in values.iter_mut().zip(bytes.chunks_exact(4)) {
            *v = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
        }
    }
    Ok(())
}

/// Writes `values` as little-endian f32.
fn write_f32(writer: &mut impl std::io::Write, values: &[f32]) -> Result<(), VerifyError> {
    let mut bytes = [0u8; CHUNK * 4];
    for values in values.chunks(CHUNK) {
        for (b, v) in bytes.chunks_exact_mut(4).zip(values) {
            b.copy_from_slice(&v.to_le_bytes());
        }
        writer
            .write_all(&bytes[..values.len() * 4])
            .map_err(|e| VerifyError::Io("write", e))?;
    }
    Ok(())
}

/// Rows per batch: the prompts decoded together, and the windows scored
/// together (the logits of a batch are `rows x length x vocab` floats).
const BATCH: usize = 8;

/// What candle's decoding of one batch of prompts may keep in logits (each
/// position's, until the batch ends): 256 MiB.
const REFERENCE_LOGITS_BYTES: usize = 256 << 20;

/// Prompts per batch in candle's decoding: up to twice [`BATCH`] while their
/// logits fit in [`REFERENCE_LOGITS_BYTES`], never fewer than [`BATCH`]. Its
/// steps, one position a row, read every weight once a step whatever the
/// batch: with GPT-2 small's 15 prompts in one batch instead of two, the
/// `reference` stage took 8.2 s instead of 10.1 s (`bench/export.py`'s
/// model, 32 new tokens, 2 cores).
fn reference_batch(work: &Workload, vocab: usize) -> usize {
    let longest = work
        .prompts
        .iter()
        .map(|(_, ids)| ids.len())
        .max()
        .unwrap_or(0);
    let per_prompt = (longest + work.max_new_tokens) * vocab * std::mem::size_of::<f32>();
    (REFERENCE_LOGITS_BYTES / per_prompt.max(1)).clamp(BATCH, 2 * BATCH)
}

/// candle's logits for each sequence (`[len * vocab]` each), the sequences
/// left-padded into one batch (with id 0, which no query sees).
fn reference_logits(model: &Model, sequences: &[Vec<u32>]) -> Result<Vec<Vec<f32>>, VerifyError> {
    let (rows, padding) = RowLayout::pad(sequences, 0);
    let longest = rows[0].len();
    let logits = model.forward_padded(
        &candle_core::Tensor::new(rows, model.device())?,
        None,
        &padding,
    )?;
    sequences
        .iter()
        .enumerate()
        .map(|(b, s)| {
            Ok(logits
                .get(b)?
                .narrow(0, longest - s.len(), s.len())?
                .flatten_all()?
                .to_vec1::<f32>()?)
        })
        .collect()
}

/// ONNX Runtime's logits for each sequence, as [`reference_logits`].
fn onnx_logits(onnx: &mut OnnxLm, sequences: &[Vec<u32>]) -> Result<Vec<Vec<f32>>, VerifyError> {
    let (rows, padding) = RowLayout::pad(sequences, 0);
    let (longest, vocab) = (rows[0].len(), onnx.vocab);
    let (logits, _) = onnx.run_batch(&rows, &padding, onnx.empty_past_for(rows.len())?)?;
    Ok(sequences
        .iter()
        .enumerate()
        .map(|(b, s)| {
            logits[(b * longest + longest - s.len()) * vocab..(b + 1) * longest * vocab].to_vec()
        })
        .collect())
}

/// The part of verification that only the model decides, computed once and
/// read by every dtype's. Its logits are apart (see [`reference`]): as JSON
/// they would be ten times the size.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Reference {
    pub workload: Workload,
    /// Logits per position.
    pub vocab: usize,
    /// candle's greedy tokens per prompt. Its logits rows for the prompt are
    /// `prompt.len() + tokens.len() - 1` (every token but the last is fed),
    /// at least the prompt's.
    pub greedy: Vec<Vec<u32>>,
    /// Summed over each window's next-token predictions.
    pub window_nll: Vec<f64>,
}

impl Reference {
    /// Rows of logits for prompt `i`.
    fn rows(&self, i: usize) -> usize {
        self.workload.prompts[i].1.len() + self.greedy[i].len().saturating_sub(1)
    }
}

/// candle's side of `work`: its greedy tokens and the perplexity windows'
/// scores, and (written to `logits`, prompt after prompt, `[rows, vocab]`
/// little-endian f32) its logits over each prompt and its tokens.
pub fn reference(
    model: &Model,
    work: Workload,
    logits: &mut impl std::io::Write,
    progress: impl Fn(usize, usize),
) -> Result<Reference, VerifyError> {
    let vocab = model.vocab_size();
    let total = work.prompts.len() + work.windows.len();
    let mut greedy = Vec::with_capacity(work.prompts.len());
    for batch in work.prompts.chunks(reference_batch(&work, vocab)) {
        let ids: Vec<Vec<u32>> = batch.iter().map(|(_, ids)| ids.clone()).collect();
        // The logits of candle's own decoding (prefill, then each step through its cache).
        let (tokens, rows) = model.decode_batch_logits(&ids, work.max_new_tokens, work.eos)?;
        for ((prompt, generated), rows) in ids.iter().zip(&tokens).zip(&rows) {
            let expected = prompt.len() + generated.len().saturating_sub(1);
            if rows.len() != expected * vocab {
                return Err(VerifyError::Reference(format!(
                    "candle's decoding kept {} rows for {expected} positions",
                    rows.len() / vocab
                )));
            }
        }
        for rows in rows {
            write_f32(logits, &rows)?;
        }
        greedy.extend(tokens);
        progress(greedy.len(), total);
    }
    tracing::debug!(
        prompts = work.prompts.len(),
        "decoded the prompts in candle"
    );
    let mut window_nll = Vec::with_capacity(work.windows.len());
    for batch in work.windows.chunks(BATCH) {
        for (window, logits) in batch.iter().zip(reference_logits(model, batch)?) {
            window_nll.push(nll(&logits, window, vocab));
        }
        progress(greedy.len() + window_nll.len(), total);
    }
    tracing::debug!(
        windows = work.windows.len(),
        "scored the perplexity windows in candle"
    );
    Ok(Reference {
        workload: work,
        vocab,
        greedy,
        window_nll,
    })
}

/// How ONNX Runtime goes along candle's tokens after a prompt's prefill.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stepping {
    /// One call per token, as a browser decodes
    /// ([`OnnxLm::follow_batch`]).
    EachToken,
    /// The first token alone, then the rest in one call through the cache
    /// ([`OnnxLm::follow_batch_chunked`]): the same logits where a position's
    /// are its own, in three calls instead of one per token.
    Chunked,
}

impl Stepping {
    /// Chunked, unless the dtype's activations are scaled over each whole
    /// call (a chunk would then measure another quantization than a
    /// browser's steps).
    pub fn for_dtype(dtype: crate::dtype::Dtype) -> Stepping {
        if dtype.scales_activations_per_call() {
            Stepping::EachToken
        } else {
            Stepping::Chunked
        }
    }
}

/// Runs the file's side of the workload and checks it against the reference
/// (`logits` as [`reference`] wrote them) and `tolerance`.
pub fn verify(
    onnx: &mut OnnxLm,
    reference: &Reference,
    logits: &mut impl std::io::Read,
    tolerance: &Tolerance,
    stepping: Stepping,
    progress: impl Fn(usize, usize),
) -> Result<Report, VerifyError> {
    let work = &reference.workload;
    if reference.window_nll.len() != work.windows.len()
        || reference.greedy.len() != work.prompts.len()
    {
        return Err(VerifyError::Reference(format!(
            "{} window scores for {} windows, {} greedy decodings for {} prompts",
            reference.window_nll.len(),
            work.windows.len(),
            reference.greedy.len(),
            work.prompts.len()
        )));
    }
    let vocab = reference.vocab;
    if onnx.vocab != vocab {
        return Err(runtime::RuntimeError::Ort(format!(
            "the ONNX file has {} logits per position, the model {vocab}",
            onnx.vocab
        ))
        .into());
    }
    let total = work.prompts.len() + work.windows.len();
    let (mut prefill, mut cache) = (Tally::default(), Tally::default());
    let mut prompts = Vec::new();
    let mut expected = Vec::new();
    for (start, batch) in (0..).step_by(BATCH).zip(work.prompts.chunks(BATCH)) {
        let ids: Vec<Vec<u32>> = batch.iter().map(|(_, ids)| ids.clone()).collect();
        let tokens = &reference.greedy[start..start + batch.len()];
        let followed = match stepping {
            Stepping::EachToken => onnx.follow_batch(&ids, tokens, work.eos.unwrap_or(0))?,
            Stepping::Chunked => onnx.follow_batch_chunked(&ids, tokens, work.eos.unwrap_or(0))?,
        };
        for (
            i,
            (
                (text, ids),
                session::Decoded {
                    generated,
                    prefill: prefill_logits,
                    steps: step_logits,
                },
            ),
        ) in (start..).zip(batch.iter().zip(followed))
        {
            let (n, rows) = (ids.len(), reference.rows(i));
            let steps = step_logits.len() / vocab;
            if rows != n + steps {
                return Err(VerifyError::Reference(format!(
                    "prompt {i} has {rows} reference rows for {} positions",
                    n + steps
                )));
            }
            expected.resize(rows * vocab, 0.0);
            read_f32(logits, &mut expected)?;
            prefill.add(&expected[..n * vocab], &prefill_logits, vocab);
            cache.add(&expected[n * vocab..], &step_logits, vocab);
            // ONNX's argmax after the prompt and after each fed token.
            let choices = std::iter::once(&prefill_logits[(n - 1) * vocab..])
                .chain(step_logits.chunks_exact(vocab))
                .map(argmax);
            let matched = choices
                .clone()
                .zip(&generated)
                .take_while(|(a, b)| a == *b)
                .count();
            let onnx_at_divergence = choices
                .clone()
                .nth(matched)
                .filter(|_| matched < generated.len());
            prompts.push(PromptResult {
                text: text.clone(),
                tokens: n,
                reference_greedy: generated,
                matched,
                onnx_at_divergence,
                onnx_greedy: None,
            });
        }
        progress(prompts.len(), total);
    }
    // Where the file's greedy tokens leave candle's, its own continuation
    // (what a page shows).
    for (result, (_, ids)) in prompts.iter_mut().zip(&work.prompts) {
        if result.matched < result.reference_greedy.len() {
            let (own, _) = onnx.decode(
                ids,
                work.max_new_tokens,
                work.eos,
                ids.len() + work.max_new_tokens,
                None,
            )?;
            result.onnx_greedy = Some(own);
        }
    }
    if logits
        .read(&mut [0u8; 1])
        .map_err(|e| VerifyError::Io("read", e))?
        != 0
    {
        return Err(VerifyError::Reference(
            "the reference logits are longer than its prompts".to_string(),
        ));
    }
    tracing::debug!(prompts = work.prompts.len(), "compared the prompts");
    let (mut nll_reference, mut nll_onnx, mut tokens, mut scored) = (0.0, 0.0, 0usize, 0usize);
    for batch in work.windows.chunks(BATCH) {
        for (window, logits) in batch.iter().zip(onnx_logits(onnx, batch)?) {
            nll_reference += reference.window_nll[scored];
            nll_onnx += nll(&logits, window, vocab);
            tokens += window.len() - 1;
            scored += 1;
        }
        progress(work.prompts.len() + scored, total);
    }
    tracing::debug!(
        windows = work.windows.len(),
        tokens,
        "scored the perplexity windows"
    );
    let perplexity = |nll: f64| {
        if tokens == 0 {
            f64::NAN
        } else {
            (nll / tokens as f64).exp()
        }
    };
    let (perplexity_reference, perplexity_onnx) = (perplexity(nll_reference), perplexity(nll_onnx));
    let (prefill, cache) = (prefill.finish(), cache.finish());
    let generated: usize = prompts.iter().map(|p| p.reference_greedy.len()).sum();
    let matched: usize = prompts.iter().map(|p| p.matched).sum();
    let metrics = Metrics {
        max_abs_error: nan_max(prefill.max_abs_error, cache.max_abs_error),
        max_relative_error: nan_max(prefill.max_relative_error, cache.max_relative_error),
        top1_agreement: (prefill.top1_agreement * prefill.positions as f64
            + cache.top1_agreement * cache.positions as f64)
            / (prefill.positions + cache.positions).max(1) as f64,
        kl_divergence: (prefill.kl_divergence * prefill.positions as f64
            + cache.kl_divergence * cache.positions as f64)
            / (prefill.positions + cache.positions).max(1) as f64,
        perplexity_ratio: if tokens == 0 {
            1.0
        } else {
            perplexity_onnx / perplexity_reference
        },
        greedy_match: if generated == 0 {
            1.0
        } else {
            matched as f64 / generated as f64
        },
    };
    let checks = checks(&metrics, tolerance);
    let greedy_identical = prompts
        .iter()
        .filter(|p| p.matched == p.reference_greedy.len())
        .count();
    Ok(Report {
        metrics,
        checks,
        prefill,
        cache,
        perplexity_tokens: tokens,
        perplexity_reference,
        perplexity_onnx,
        greedy_identical,
        prompts,
    })
}

/// One file run in a browser by transformers.js, on the first prompts of a
/// [`Reference`]: per prompt, its logits along candle's path (the prompt and
/// candle's greedy tokens but the last, one forward pass: the reference's
/// rows) and its own greedy tokens.
pub struct BrowserRun {
    pub logits: Vec<Vec<f32>>,
    pub generated: Vec<Vec<u32>>,
}

/// What a browser run measured against candle, and the bounds it met.
#[derive(Debug, Clone, Serialize)]
pub struct BrowserReport {
    /// As verify's, but `perplexity_ratio` is not measured (null).
    pub metrics: Metrics,
    pub checks: Vec<Check>,
    pub positions: usize,
    /// Per prompt: how many of candle's greedy tokens the browser gave before the first other one.
    pub matched: Vec<usize>,
}

impl BrowserReport {
    pub fn failures(&self) -> impl Iterator<Item = &Check> {
        self.checks.iter().filter(|c| !c.passed)
    }
}

/// Compares `run` with `reference` (its logits read from `logits`, which
/// starts at its first prompt) under verify's bounds for the file's dtype.
pub fn compare_browser(
    reference: &Reference,
    logits: &mut impl std::io::Read,
    run: &BrowserRun,
    tolerance: &Tolerance,
) -> Result<BrowserReport, VerifyError> {
    let vocab = reference.vocab;
    if run.logits.len() != run.generated.len() || run.logits.len() > reference.greedy.len() {
        return Err(VerifyError::Reference(format!(
            "{} prompts of logits and {} of tokens for {} prompts",
            run.logits.len(),
            run.generated.len(),
            reference.greedy.len()
        )));
    }
    let mut tally = Tally::default();
    let mut expected = Vec::new();
    let (mut matched, mut generated) = (Vec::new(), 0);
    for (i, (candidate, tokens)) in run.logits.iter().zip(&run.generated).enumerate() {
        let rows = reference.rows(i);
        if candidate.len() != rows * vocab {
            return Err(VerifyError::Reference(format!(
                "prompt {i}: the browser gave {} logits, candle {rows} rows of {vocab}",
                candidate.len()
            )));
        }
        expected.resize(rows * vocab, 0.0);
        read_f32(logits, &mut expected)?;
        tally.add(&expected, candidate, vocab);
        matched.push(
            tokens
                .iter()
                .zip(&reference.greedy[i])
                .take_while(|(a, b)| a == b)
                .count(),
        );
        generated += reference.greedy[i].len();
    }
    let agreement = tally.finish();
    let metrics = Metrics {
        max_abs_error: agreement.max_abs_error,
        max_relative_error: agreement.max_relative_error,
        top1_agreement: agreement.top1_agreement,
        kl_divergence: agreement.kl_divergence,
        perplexity_ratio: f64::NAN,
        greedy_match: if generated == 0 {
            1.0
        } else {
            matched.iter().sum::<usize>() as f64 / generated as f64
        },
    };
    let checks = checks(
        &metrics,
        &Tolerance {
            perplexity_ratio: None,
            ..tolerance.clone()
        },
    );
    Ok(BrowserReport {
        metrics,
        checks,
        positions: agreement.positions,
        matched,
    })
}

/// Each bound that is set, against its metric. NaN fails every check.
pub fn checks(metrics: &Metrics, tolerance: &Tolerance) -> Vec<Check> {
    let mut checks = Vec::new();
    let mut check = |metric, value: f64, bound: Option<f64>, kind| {
        if let Some(bound) = bound {
            let passed = if kind == "max" {
                value <= bound
            } else {
                value >= bound
            };
            checks.push(Check {
                metric,
                value,
                bound,
                kind,
                passed,
            });
        }
    };
    check(
        "max_abs_error",
        metrics.max_abs_error as f64,
        tolerance.max_abs_error,
        "max",
    );
    check(
        "max_relative_error",
        metrics.max_relative_error as f64,
        tolerance.max_relative_error,
        "max",
    );
    check(
        "top1_agreement",
        metrics.top1_agreement,
        tolerance.top1_agreement,
        "min",
    );
    check(
        "kl_divergence",
        metrics.kl_divergence,
        tolerance.kl_divergence,
        "max",
    );
    check(
        "perplexity_ratio",
        metrics.perplexity_ratio,
        tolerance.perplexity_ratio,
        "max",
    );
    check(
        "greedy_match",
        metrics.greedy_match,
        tolerance.greedy_match,
        "min",
    );
    checks
}

/// `[verify.tolerance.D]` over the defaults, field by field.
pub fn tolerance(dtype: Dtype, overrides: Option<&Tolerance>) -> Tolerance {
    let mut t = default_tolerance(dtype);
    if let Some(o) = overrides {
        t.max_abs_error = o.max_abs_error.or(t.max_abs_error);
        t.max_relative_error = o.max_relative_error.or(t.max_relative_error);
        t.top1_agreement = o.top1_agreement.or(t.top1_agreement);
        t.kl_divergence = o.kl_divergence.or(t.kl_divergence);
        t.perplexity_ratio = o.perplexity_ratio.or(t.perplexity_ratio);
        t.greedy_match = o.greedy_match.or(t.greedy_match);
    }
    t
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kl_is_zero_for_equal_rows_and_matches_a_hand_computation() {
        assert_eq!(kl(&[1.0, 2.0, 3.0], &[1.0, 2.0, 3.0]), 0.0);
        // p = softmax(0, ln 3) = (1/4, 3/4); q = (1/2, 1/2).
        let expected = 0.25 * (0.25f64 / 0.5).ln() + 0.75 * (0.75f64 / 0.5).ln();
        assert!((kl(&[0.0, 3f32.ln()], &[0.0, 0.0]) - expected).abs() < 1e-7);
    }

    #[test]
    fn exp_nonpositive_is_exp_to_the_last_bits() {
        let mut worst = 0f64;
        for i in 0..700_000 {
            for x in [-(i as f64) / 1000.0, -(i as f64) / 1000.0 - 0.000_37] {
                let (got, want) = (exp_nonpositive(x), x.exp());
                worst = worst.max(((got - want) / want).abs());
            }
        }
        assert!(worst < 4e-16, "worst relative error {worst:e}");
        assert_eq!(exp_nonpositive(0.0), 1.0);
        assert_eq!(exp_nonpositive(-1e9), (-700f64).exp());
        assert_eq!(exp_nonpositive(f64::NEG_INFINITY), (-700f64).exp());
        assert!(exp_nonpositive(f64::NAN).is_nan());
    }

    /// The one-pass form against the definition, `Σ p (log p − log q)` with
    /// both softmaxes written out, on rows of a vocabulary's size whose
    /// logits are large (so a missing max shift would overflow) and whose
    /// maxima sit at different entries.
    #[test]
    fn one_pass_kl_is_the_definition() {
        let softmax = |row: &[f32]| -> Vec<f64> {
            let max = row.iter().fold(f64::NEG_INFINITY, |m, &v| m.max(v as f64));
            let e: Vec<f64> = row.iter().map(|&v| (v as f64 - max).exp()).collect();
            let s: f64 = e.iter().sum();
            e.into_iter().map(|v| v / s).collect()
        };
        let mut state = 0x2545_f491_4f6c_dd1du64;
        let mut next = || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state >> 40) as f32 / (1u64 << 24) as f32
        };
        for scale in [0.1f32, 4.0, 30.0] {
            let p: Vec<f32> = (0..5000).map(|_| 800.0 + scale * next()).collect();
            let q: Vec<f32> = p.iter().map(|v| v + scale * 0.3 * (next() - 0.5)).collect();
            let (sp, sq) = (softmax(&p), softmax(&q));
            let definition: f64 = sp.iter().zip(&sq).map(|(a, b)| a * (a.ln() - b.ln())).sum();
            let got = kl(&p, &q);
            assert!(
                got.is_finite() && (got - definition).abs() <= 1e-9 + 1e-6 * definition,
                "scale {scale}: {got} against {definition}"
            );
        }
        assert_eq!(
            kl(&[0.0, f32::NAN], &[0.0, 0.0]),
            f64::INFINITY,
            "a NaN fails the bound"
        );
    }

    #[test]
    fn a_nan_fails_every_check_and_overrides_replace_single_fields() {
        let metrics = Metrics {
            max_abs_error: f32::NAN,
            max_relative_error: f32::NAN,
            top1_agreement: f64::NAN,
            kl_divergence: f64::NAN,
            perplexity_ratio: f64::NAN,
            greedy_match: f64::NAN,
        };
        let all = Tolerance {
            max_abs_error: Some(1.0),
            max_relative_error: Some(1.0),
            top1_agreement: Some(0.0),
            kl_divergence: Some(1.0),
            perplexity_ratio: Some(2.0),
            greedy_match: Some(0.0),
        };
        assert!(checks(&metrics, &all).iter().all(|c| !c.passed));
        let t = tolerance(
            Dtype::Q4,
            Some(&Tolerance {
                top1_agreement: Some(0.5),
                ..Default::default()
            }),
        );
        assert_eq!(t.top1_agreement, Some(0.5));
        assert_eq!(t.kl_divergence, default_tolerance(Dtype::Q4).kl_divergence);
    }

    #[test]
    fn tally_reports_the_largest_error_and_agreement() {
        let mut tally = Tally::default();
        tally.add(&[0.0, 1.0, 5.0, 0.0], &[0.5, 1.0, 4.0, 6.0], 2);
        let a = tally.finish();
        assert_eq!(a.positions, 2);
        assert_eq!(a.max_abs_error, 6.0);
        assert_eq!(a.top1_agreement, 0.5);
    }

    #[test]
    fn a_browser_run_is_held_to_the_dtypes_bounds_along_candles_tokens() {
        // One prompt of 2 tokens, candle's greedy [2, 0]: 3 rows of 3 logits.
        let workload = Workload {
            prompts: vec![("p".into(), vec![1, 2])],
            expected: Vec::new(),
            windows: vec![],
            max_new_tokens: 2,
            eos: None,
        };
        let reference = Reference {
            workload,
            vocab: 3,
            greedy: vec![vec![2, 0]],
            window_nll: vec![],
        };
        let rows: Vec<f32> = vec![0.0, 1.0, 2.0, 1.0, 0.5, 3.0, 4.0, 1.0, 0.0];
        let bytes: Vec<u8> = rows.iter().flat_map(|v| v.to_le_bytes()).collect();
        let tolerance = tolerance(Dtype::Fp32, None);
        let same = BrowserRun {
            logits: vec![rows.clone()],
            generated: vec![vec![2, 0]],
        };
        let report = compare_browser(&reference, &mut bytes.as_slice(), &same, &tolerance).unwrap();
        assert_eq!(
            (
                report.positions,
                report.metrics.max_abs_error,
                report.metrics.greedy_match,
                report.failures().count()
            ),
            (3, 0.0, 1.0, 0)
        );
        assert!(
            report.metrics.perplexity_ratio.is_nan()
                && report.checks.iter().all(|c| c.metric != "perplexity_ratio"),
            "not measured in a browser"
        );
        // A damaged file: logits 10% off and its own tokens parting at once.
        let damaged = BrowserRun {
            logits: vec![rows.iter().map(|v| v * 1.1).collect()],
            generated: vec![vec![1, 0]],
        };
        let report =
            compare_browser(&reference, &mut bytes.as_slice(), &damaged, &tolerance).unwrap();
        let failed: Vec<&str> = report.failures().map(|c| c.metric).collect();
        assert_eq!(
            failed,
            ["max_abs_error", "kl_divergence", "greedy_match"],
            "{:?}",
            report.checks
        );
        assert_eq!(report.matched, [0]);
        // Logits for fewer positions than candle's rows are refused, not compared.
        let short = BrowserRun {
            logits: vec![rows[..6].to_vec()],
            generated: vec![vec![2, 0]],
        };
        assert!(compare_browser(&reference, &mut bytes.as_slice(), &short, &tolerance).is_err());
    }
}
