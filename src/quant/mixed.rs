//! The smallest 4-bit file that meets its bounds (`export.mixed`): every
//! weight starts in 4-bit blocks (the head too, whatever `head_bits` says;
//! a float head, `head_bits = 16`, stays float); the weights whose rounding costs the most
//! for the bytes they would add go to 8-bit blocks, as few as the bounds
//! allow. Each weight's sensitivity is measured: the KL of the file with it
//! alone in 4 bits and the rest in 8; the weights go to 8 bits in the order
//! of that KL per parameter (the most saved per byte first), and how many is
//! found by bisection, each candidate file assembled from blocks made once
//! and measured whole in ONNX Runtime against the fp32 graph on calibration
//! windows of the train split. The verify stage then judges the chosen file
//! on the eval split, as every file.

use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};

use super::calibrate::Calibration;
use super::{Bits, Blocks, HEAD_OUTPUT, Options, Report, Result, err, quantize};
use crate::dtype::Dtype;
use crate::model::RowLayout;
use crate::onnx::external::{self, Policy};
use crate::onnx::proto::ModelProto;
use crate::onnx::proto::tensor_proto::DataType;
use crate::verify::session::{OnnxLm, Threads};

/// The bounds a mixed file is chosen to meet on the calibration windows
/// (tighter than the verify stage's by [`MARGIN`]).
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
pub struct Bounds {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kl_divergence: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub top1_agreement: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub perplexity_ratio: Option<f64>,
}

/// The share of each bound's room a candidate may use on the calibration
/// windows: the eval split is other text.
pub const MARGIN: f64 = 0.5;

impl Bounds {
    /// The bounds a candidate must meet on the calibration windows.
    fn tightened(self) -> Bounds {
        Bounds {
            kl_divergence: self.kl_divergence.map(|b| b * MARGIN),
            top1_agreement: self.top1_agreement.map(|b| 1.0 - (1.0 - b) * MARGIN),
            perplexity_ratio: self.perplexity_ratio.map(|b| 1.0 + (b - 1.0) * MARGIN),
        }
    }

    fn met_by(&self, m: &Measured) -> bool {
        self.kl_divergence.is_none_or(|b| m.kl_divergence <= b)
            && self.top1_agreement.is_none_or(|b| m.top1_agreement >= b)
            && self
                .perplexity_ratio
                .is_none_or(|b| m.perplexity_ratio <= b)
    }
}

/// A candidate's agreement with fp32 on the calibration windows.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Measured {
    pub kl_divergence: f64,
    pub top1_agreement: f64,
    pub perplexity_ratio: f64,
}

/// One file tried.
#[derive(Debug, Clone, Serialize)]
pub struct Candidate {
    /// How many of the costliest weights it holds in 8 bits.
    pub eight_bit: usize,
    pub bytes: u64,
    #[serde(flatten)]
    pub measured: Measured,
    pub meets: bool,
}

/// One weight's place in the search.
#[derive(Debug, Clone, Serialize)]
pub struct Weight {
    /// Its initializer (a tied head: the embedding's, with `(head)`).
    pub weight: String,
    /// Its MatMul's output (`logits` for the head).
    pub output: String,
    pub parameters: u64,
    /// Its 4-bit blocks' Hessian-weighted squared error over its weights'.
    pub relative_error: f64,
    /// The KL of the file with it alone in 4 bits, the rest in 8.
    pub alone_kl: f64,
    pub bits: u8,
}

/// What the search did, for the quantize report.
#[derive(Debug, Clone, Serialize)]
pub struct Search {
    pub bounds: Bounds,
    /// The bounds the candidates had to meet on the calibration windows.
    pub calibration_bounds: Bounds,
    pub windows: usize,
    /// Costliest first.
    pub weights: Vec<Weight>,
    pub candidates: Vec<Candidate>,
    pub chosen: usize,
    /// Whether the chosen file met the calibration bounds (all weights in
    /// 8 bits may not).
    pub met: bool,
    pub uniform_4bit_bytes: u64,
    pub uniform_8bit_bytes: u64,
}

/// Windows the candidates are measured on (the first of the calibration's).
const WINDOWS: usize = 16;
/// Windows each weight's sensitivity is measured on.
const SENSITIVITY_WINDOWS: usize = 4;

/// The 4-bit file of `dtype` from the fp32 graph `fp32` with the fewest
/// 8-bit weights that meets `bounds` on `windows` (from the train split).
#[allow(clippy::too_many_arguments)]
pub fn search(
    fp32: &ModelProto,
    dtype: Dtype,
    options: Options,
    calibration: &Calibration,
    windows: &[Vec<u32>],
    bounds: Bounds,
    scratch: &Path,
    threads: Threads,
    mut progress: impl FnMut(&str),
) -> Result<(ModelProto, Report, Search)> {
    let windows: Vec<Vec<u32>> = windows
        .iter()
        .filter(|w| w.len() >= 2)
        .take(WINDOWS)
        .cloned()
        .collect();
    if windows.is_empty() {
        return Err(err("no calibration windows to measure candidates on"));
    }
    let mut blocks = Blocks::new(Some(calibration), options.layout);
    let mut weights = costs(fp32, options, &blocks)?;
    progress("the fp32 graph on the calibration windows");
    let reference = logits(fp32.clone(), &windows, scratch, threads)?;
    // Each weight's sensitivity: the KL of the file with it alone in 4
    // bits (the rest in 8), on the first windows.
    let few = SENSITIVITY_WINDOWS.min(windows.len());
    for i in 0..weights.len() {
        blocks.bits = weights
            .iter()
            .enumerate()
            .map(|(j, w)| {
                (
                    w.output.clone(),
                    if i == j { Bits::Four } else { Bits::Eight },
                )
            })
            .collect();
        let (model, _) = quantize(fp32.clone(), dtype, options, &blocks)?;
        let (measured, _) = measure(&model, &windows[..few], &reference[..few], scratch, threads)?;
        weights[i].alone_kl = measured.kl_divergence;
        progress(&format!(
            "sensitivity {} of {}: {} alone in 4 bits, KL {:.2e}",
            i + 1,
            weights.len(),
            weights[i].weight,
            measured.kl_divergence
        ));
    }
    // The most KL saved per byte the 8 bits add first.
    weights.sort_by(|a, b| {
        let score = |w: &Weight| w.alone_kl / w.parameters.max(1) as f64;
        score(b).total_cmp(&score(a))
    });
    let target = bounds.tightened();
    let mut candidates: Vec<Candidate> = Vec::new();
    let mut files: BTreeMap<usize, (ModelProto, Report)> = BTreeMap::new();
    let mut tries =
        |eight: usize, blocks: &mut Blocks<'_>, candidates: &mut Vec<Candidate>| -> Result<bool> {
            blocks.bits = weights
                .iter()
                .enumerate()
                .map(|(i, w)| {
                    (
                        w.output.clone(),
                        if i < eight { Bits::Eight } else { Bits::Four },
                    )
                })
                .collect();
            let (model, report) = quantize(fp32.clone(), dtype, options, blocks)?;
            let (measured, bytes) = measure(&model, &windows, &reference, scratch, threads)?;
            let meets = target.met_by(&measured);
            progress(&format!(
                "{eight} of {} weights in 8 bits: {:.1} MB, KL {:.4}",
                weights.len(),
                bytes as f64 / 1e6,
                measured.kl_divergence
            ));
            candidates.push(Candidate {
                eight_bit: eight,
                bytes,
                measured,
                meets,
            });
            files.insert(eight, (model, report));
            Ok(meets)
        };
    let all = weights.len();
    let (mut low, mut high) = (0, all);
    let met = if tries(0, &mut blocks, &mut candidates)? {
        high = 0;
        true
    } else if !tries(all, &mut blocks, &mut candidates)? {
        false
    } else {
        // `low` fails, `high` meets.
        while high - low > 1 {
            let mid = low + (high - low) / 2;
            if tries(mid, &mut blocks, &mut candidates)? {
                high = mid;
            } else {
                low = mid;
            }
        }
        true
    };
    let chosen = high;
    let size = |eight: usize| {
        candidates
            .iter()
            .find(|c| c.eight_bit == eight)
            .map(|c| c.bytes)
    };
    let uniform_4bit_bytes = size(0).unwrap_or(0);
    let uniform_8bit_bytes = match size(all) {
        Some(bytes) => bytes,
        None => {
            blocks.bits = weights
                .iter()
                .map(|w| (w.output.clone(), Bits::Eight))
                .collect();
            let (model, _) = quantize(fp32.clone(), dtype, options, &blocks)?;
            file_bytes(model, scratch)?
        }
    };
    for w in &mut weights[..chosen] {
        w.bits = 8;
    }
    let (model, report) = files.remove(&chosen).expect("the chosen file was tried");
    let search = Search {
        bounds,
        calibration_bounds: target,
        windows: windows.len(),
        weights,
        candidates,
        chosen,
        met,
        uniform_4bit_bytes,
        uniform_8bit_bytes,
    };
    Ok((model, report, search))
}

/// Every weight a 4-bit file of `options` holds in blocks, with the
/// relative error of its 4-bit blocks (made here, and kept in `blocks`).
fn costs(fp32: &ModelProto, options: Options, blocks: &Blocks<'_>) -> Result<Vec<Weight>> {
    let g = fp32
        .graph
        .as_ref()
        .ok_or_else(|| err("the model has no graph"))?;
    let initializers: BTreeMap<&str, &crate::onnx::proto::TensorProto> = g
        .initializer
        .iter()
        .filter(|t| t.dims.len() == 2 && t.data_type == Some(DataType::Float as i32))
        .map(|t| (t.name.as_deref().unwrap_or(""), t))
        .collect();
    let transposed: BTreeMap<&str, &str> = g
        .node
        .iter()
        .filter(|n| n.op_type.as_deref() == Some("Transpose"))
        .filter(|n| initializers.contains_key(n.input[0].as_str()))
        .map(|n| (n.output[0].as_str(), n.input[0].as_str()))
        .collect();
    let mut weights = Vec::new();
    for n in g
        .node
        .iter()
        .filter(|n| n.op_type.as_deref() == Some("MatMul"))
    {
        let output = n.output[0].as_str();
        if output == HEAD_OUTPUT && options.head_bits.bits().is_none() {
            continue;
        }
        // (columns, k, n): a weight `[k, n]`, or a tied head's rows.
        let (columns, k, cols, weight) = if let Some(w) = initializers.get(n.input[1].as_str()) {
            let (k, cols) = (w.dims[0] as usize, w.dims[1] as usize);
            let columns = super::transpose(&super::floats(w)?, k, cols);
            (columns, k, cols, n.input[1].clone())
        } else if let Some(name) = transposed.get(n.input[1].as_str()) {
            let w = initializers[name];
            let (rows, width) = (w.dims[0] as usize, w.dims[1] as usize);
            (super::floats(w)?, width, rows, format!("{name} (head)"))
        } else {
            continue;
        };
        let owned = columns.clone();
        // A tied head's blocks are symmetric (the embedding may share them).
        let tied = !initializers.contains_key(n.input[1].as_str());
        let packed = blocks.pack(
            output,
            move || owned,
            (k, cols),
            Bits::Four,
            &n.input[0],
            !tied,
        );
        let diag: Vec<f64> = match blocks.calibration.and_then(|c| c.hessians.get(&n.input[0])) {
            Some(h) if h.k == k => (0..k).map(|i| h.values[i * k + i]).collect(),
            _ => vec![1.0; k],
        };
        let restored = packed.dequantize(k, cols, Bits::Four);
        let (mut error, mut total) = (0f64, 0f64);
        for (w, q) in columns.chunks(k).zip(restored.chunks(k)) {
            for i in 0..k {
                let (a, b) = (w[i] as f64, q[i] as f64);
                error += diag[i] * (a - b) * (a - b);
                total += diag[i] * a * a;
            }
        }
        weights.push(Weight {
            weight,
            output: output.to_string(),
            parameters: (k * cols) as u64,
            relative_error: if total > 0.0 { error / total } else { 0.0 },
            alone_kl: 0.0,
            bits: 4,
        });
    }
    Ok(weights)
}

/// A model's size as written.
fn file_bytes(model: ModelProto, scratch: &Path) -> Result<u64> {
    let path = scratch.join("candidate.onnx");
    let written = external::write(model, &path, Policy::Auto)
        .map_err(|e| err(format!("cannot write `{}`: {e}", path.display())))?;
    Ok(written.total_bytes())
}

/// Per window, log-softmax of every position's logits (`[len, vocab]`),
/// from `model` written to `scratch`.
fn logits(
    model: ModelProto,
    windows: &[Vec<u32>],
    scratch: &Path,
    threads: Threads,
) -> Result<Vec<Vec<f32>>> {
    let path = scratch.join("candidate.onnx");
    external::write(model, &path, Policy::Auto)
        .map_err(|e| err(format!("cannot write `{}`: {e}", path.display())))?;
    logits_of(&path, windows, threads)
}

/// `model`'s agreement with the reference's log-probabilities, and its size.
fn measure(
    model: &ModelProto,
    windows: &[Vec<u32>],
    reference: &[Vec<f32>],
    scratch: &Path,
    threads: Threads,
) -> Result<(Measured, u64)> {
    let path = scratch.join("candidate.onnx");
    let written = external::write(model.clone(), &path, Policy::Auto)
        .map_err(|e| err(format!("cannot write `{}`: {e}", path.display())))?;
    let candidate = logits_of(&path, windows, threads)?;
    let (mut kl, mut agree, mut positions) = (0f64, 0usize, 0usize);
    let (mut nll_ref, mut nll_q, mut targets) = (0f64, 0f64, 0usize);
    for ((w, p), q) in windows.iter().zip(reference).zip(&candidate) {
        let vocab = p.len() / w.len();
        let (window_kl, window_agree) = symb_kernels::kl_and_agreement(p, q, vocab);
        kl += window_kl;
        agree += window_agree;
        positions += w.len();
        for (t, (p, q)) in p.chunks(vocab).zip(q.chunks(vocab)).enumerate() {
            if let Some(&next) = w.get(t + 1) {
                nll_ref -= p[next as usize] as f64;
                nll_q -= q[next as usize] as f64;
                targets += 1;
            }
        }
    }
    let measured = Measured {
        kl_divergence: kl / positions.max(1) as f64,
        top1_agreement: agree as f64 / positions.max(1) as f64,
        perplexity_ratio: ((nll_q - nll_ref) / targets.max(1) as f64).exp(),
    };
    Ok((measured, written.total_bytes()))
}

fn logits_of(path: &Path, windows: &[Vec<u32>], threads: Threads) -> Result<Vec<Vec<f32>>> {
    let mut lm = OnnxLm::load(path, threads).map_err(|e| err(e.to_string()))?;
    let mut out = Vec::new();
    for w in windows {
        let past = lm.empty_past().map_err(|e| err(e.to_string()))?;
        let (mut values, _) = lm
            .run_batch(std::slice::from_ref(w), &RowLayout::default(), past)
            .map_err(|e| err(e.to_string()))?;
        for row in values.chunks_mut(lm.vocab) {
            symb_kernels::log_softmax(row);
        }
        out.push(values);
    }
    Ok(out)
}
