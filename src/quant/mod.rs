//! Quantizers over ONNX graphs, in Rust: each takes the fp32 export and
//! returns a new model plus a report of what it changed.
//!
//! - `fp16`: every float initializer in half precision (clamped to its
//!   range); graph inputs and outputs, the KV cache included, stay fp32, with
//!   Casts at the edges, as the reference recipe does.
//! - `q8` / `int8`: dynamic quantization as onnxruntime's `quantize_dynamic`
//!   writes it for QInt8 weights: `DynamicQuantizeLinear` on the activation,
//!   `MatMulInteger` against int8 weights (per tensor, symmetric, scale
//!   max|W|/127), `Cast`, `Mul` by the two scales.
//! - `uint8`: the same with uint8 weights and a zero point (asymmetric).
//! - `q4`: `com.microsoft.MatMulNBits`, 4 bits, blocks of 32 along K,
//!   symmetric (scale = the block's value of largest magnitude / −8, zero
//!   point 8 implied).
//! - `q4f16`: q4, then fp16.
//!
//! Every MatMul against a weight is quantized, the tied head included: the
//! quantized files carry the head as its own transposed initializer (the
//! export multiplies by `Transpose(wte)`, which no quantizer can reach).

pub mod calibrate;
pub mod gptq;
pub mod mixed;

use std::collections::{HashMap, HashSet};

use half::f16;

use crate::dtype::Dtype;
use crate::onnx::proto::tensor_proto::DataType;
use crate::onnx::proto::{self, ModelProto, NodeProto, TensorProto};
use crate::onnx::{Attr, raw_tensor, tensor_f32};

/// MatMulNBits' default `accuracy_level`: 4 lets ONNX Runtime's CPU kernels
/// quantize the activations to int8 and use integer dot products, about 2.6
/// times faster on GPT-2 small than the fp32 path (level 0), at a small cost
/// in accuracy that verification measures. ONNX Runtime's WebAssembly build
/// computes in fp32 whatever the level: with 0, native runs (symb, Node)
/// give a browser's tokens exactly.
pub const ACCURACY_LEVEL: i64 = 4;

/// What a quantizer did.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct Report {
    pub dtype: String,
    /// Weights (initializers) whose storage changed type.
    pub weights_quantized: usize,
    /// Their element count.
    pub parameters_quantized: u64,
    /// Of those, the ones whose blocks GPTQ chose with their input's Hessian.
    pub weights_calibrated: usize,
    /// Of those, the ones in affine blocks (`export.q4_blocks`).
    #[serde(skip_serializing_if = "is_zero")]
    pub weights_affine: usize,
    /// Bytes of initializer data before and after.
    pub weight_bytes_before: u64,
    pub weight_bytes_after: u64,
    /// Nodes by op type after quantization, for the ones that matter.
    pub matmul_integer_nodes: usize,
    pub matmul_nbits_nodes: usize,
    pub matmul_float_nodes: usize,
}

#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct QuantError(String);

type Result<T> = std::result::Result<T, QuantError>;

fn err(message: impl Into<String>) -> QuantError {
    QuantError(message.into())
}

fn floats(t: &TensorProto) -> Result<Vec<f32>> {
    if t.data_type != Some(DataType::Float as i32) {
        return Err(err(format!(
            "`{}` is not a float tensor",
            t.name.as_deref().unwrap_or("?")
        )));
    }
    match &t.raw_data {
        Some(raw) => {
            let mut out = vec![0f32; raw.len() / 4];
            if cfg!(target_endian = "little") {
                // SAFETY: any bytes are a valid f32; `out` has exactly raw.len() / 4 * 4 bytes.
                let bytes = unsafe {
                    std::slice::from_raw_parts_mut(out.as_mut_ptr().cast::<u8>(), out.len() * 4)
                };
                bytes.copy_from_slice(&raw[..out.len() * 4]);
            } else {
                for (v, b) in out.iter_mut().zip(raw.chunks_exact(4)) {
                    *v = f32::from_le_bytes(b.try_into().expect("4 bytes"));
                }
            }
            Ok(out)
        }
        None => Ok(t.float_data.clone()),
    }
}

fn bytes_of(t: &TensorProto) -> u64 {
    t.raw_data.as_ref().map_or(0, |r| r.len() as u64)
        + 4 * t.float_data.len() as u64
        + 8 * t.int64_data.len() as u64
}

fn is_zero(n: &usize) -> bool {
    *n == 0
}

fn graph_mut(model: &mut ModelProto) -> &mut proto::GraphProto {
    model.graph.as_mut().expect("an exported model has a graph")
}

/// Choices beyond the dtype.
#[derive(Debug, Clone, Copy)]
pub struct Options {
    /// With q4 and q4f16: the token embedding in 4 bits too
    /// (decoded after the gather, in standard ops), sharing its packed data with
    /// the tied head's MatMulNBits.
    pub quantize_embedding: bool,
    /// MatMulNBits' `accuracy_level` (0 to 4; see [`ACCURACY_LEVEL`]).
    pub accuracy_level: i64,
    /// With q4 and q4f16: the head's precision.
    pub head_bits: HeadBits,
    /// With q4 and q4f16: the 4-bit blocks' layout.
    pub layout: Layout,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            quantize_embedding: false,
            accuracy_level: ACCURACY_LEVEL,
            head_bits: HeadBits::default(),
            layout: Layout::default(),
        }
    }
}

/// The head's precision in a 4-bit file (`export.head_bits`): the head maps
/// every position to the whole vocabulary, and on trained weights its
/// rounding costs more than the rest of the model's together (SmolLM2-135M:
/// KL 0.69 with a 4-bit head, 0.46 with a float one).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
pub enum HeadBits {
    /// 4-bit blocks, as the rest.
    #[serde(rename = "4")]
    Four,
    /// 8-bit blocks (MatMulNBits `bits = 8`): the default.
    #[default]
    #[serde(rename = "8")]
    Eight,
    /// The file's float type (fp32 in q4, fp16 in q4f16).
    #[serde(rename = "16")]
    Float,
}

impl HeadBits {
    /// The manifest's values, `4 | 8 | 16`.
    pub fn from_number(n: u64) -> Option<HeadBits> {
        match n {
            4 => Some(HeadBits::Four),
            8 => Some(HeadBits::Eight),
            16 => Some(HeadBits::Float),
            _ => None,
        }
    }

    pub const fn number(self) -> u64 {
        match self {
            HeadBits::Four => 4,
            HeadBits::Eight => 8,
            HeadBits::Float => 16,
        }
    }

    /// Its blocks, or None for float.
    pub const fn bits(self) -> Option<Bits> {
        match self {
            HeadBits::Four => Some(Bits::Four),
            HeadBits::Eight => Some(Bits::Eight),
            HeadBits::Float => None,
        }
    }
}

/// A weight's blocks (B, scales) and whether GPTQ chose them.
/// A weight `[k, n]` in MatMulNBits' blocks.
#[derive(Debug, Clone, PartialEq)]
pub struct Packed {
    /// B: `[n, blocks, 32 * bits / 8]`.
    pub data: Vec<u8>,
    /// `[n, blocks]`.
    pub scales: Vec<f32>,
    /// Affine blocks' offsets, `[n, blocks]`: block `b` of column `c`
    /// stands for `(q - z) * scale + offset`.
    pub offsets: Option<Vec<f32>>,
    /// Chosen by GPTQ with the input's Hessian.
    pub calibrated: bool,
}

impl Packed {
    /// The weight the blocks stand for, column by column (`n` of `k`).
    pub fn dequantize(&self, k: usize, n: usize, bits: Bits) -> Vec<f32> {
        let blocks = k.div_ceil(BLOCK);
        let per = bits.block_bytes();
        let zero = bits.zero() as f32;
        let mut out = vec![0f32; n * k];
        for c in 0..n {
            for i in 0..k {
                let (b, j) = (i / BLOCK, i % BLOCK);
                let bytes = &self.data[(c * blocks + b) * per..];
                let q = match bits {
                    Bits::Four => (bytes[j / 2] >> (4 * (j % 2))) & 0xF,
                    Bits::Eight => bytes[j],
                };
                let offset = self.offsets.as_ref().map_or(0.0, |o| o[c * blocks + b]);
                out[c * k + i] = (q as f32 - zero) * self.scales[c * blocks + b] + offset;
            }
        }
        out
    }

    /// From each block's stored values (`codes`, 32 per block, column by
    /// column) and steps on `grid`.
    fn new(
        codes: &[u8],
        steps: &[symb_kernels::Step],
        bits: Bits,
        grid: symb_kernels::Grid,
    ) -> Packed {
        let mut data = vec![0u8; steps.len() * bits.block_bytes()];
        for (q, out) in codes
            .chunks_exact(BLOCK)
            .zip(data.chunks_exact_mut(bits.block_bytes()))
        {
            write_block(q.try_into().expect("a block"), out, bits);
        }
        Packed {
            data,
            scales: steps.iter().map(|s| s.scale).collect(),
            offsets: grid
                .affine
                .then(|| steps.iter().map(|s| s.offset).collect()),
            calibrated: false,
        }
    }
}

/// Whether `packed` gives back `columns` (`n` of `k`) to within float
/// rounding: each value within a thousandth of its block's step.
fn exact(packed: &Packed, columns: &[f32], k: usize, n: usize, bits: Bits) -> bool {
    let back = packed.dequantize(k, n, bits);
    let blocks = k.div_ceil(BLOCK);
    columns.iter().zip(&back).enumerate().all(|(i, (w, q))| {
        let step = packed.scales[(i / k) * blocks + (i % k) / BLOCK].abs();
        (w - q).abs() <= 1e-3 * step
    })
}

/// How a 4-bit block stands for its 32 weights (`export.q4_blocks`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Layout {
    /// `(q - 8) * scale`: MatMulNBits alone (onnxruntime's symmetric
    /// blocks), 20 bytes per 32 weights.
    #[default]
    Symmetric,
    /// `(q - 8) * scale + offset`, from the block's least value to its
    /// largest (the layout of GGUF's Q4_1 and K-quants): MatMulNBits plus a
    /// MatMul of the input's block sums by the offsets, 24 bytes per 32
    /// weights. Weights whose input width is not a multiple of 32 stay
    /// symmetric.
    Affine,
}

/// How the 4-bit dtypes make each weight's blocks: with GPTQ where the
/// calibration has the weight's input (else by rounding to nearest), in the
/// bits `bits` gives the weight (by the name of its MatMul's output;
/// `logits` for the head) or else the dtype's, and once: blocks made for
/// one file are kept for the next (a search assembles many).
#[derive(Debug, Default)]
pub struct Blocks<'a> {
    pub calibration: Option<&'a calibrate::Calibration>,
    pub bits: HashMap<String, Bits>,
    /// The 4-bit blocks' layout.
    pub layout: Layout,
    made: std::sync::Mutex<HashMap<(String, Bits, bool), Packed>>,
}

impl<'a> Blocks<'a> {
    /// Blocks chosen with `calibration` where given, in the dtype's bits.
    pub fn new(calibration: Option<&'a calibrate::Calibration>, layout: Layout) -> Self {
        Blocks {
            calibration,
            layout,
            ..Blocks::default()
        }
    }

    /// The grid of a weight `k` long in `bits`: affine only in 4 bits and
    /// where blocks tile `k` (the offsets' sums read whole blocks).
    fn grid(&self, bits: Bits, k: usize) -> symb_kernels::Grid {
        symb_kernels::Grid {
            zero: bits.zero() as f32,
            top: bits.top(),
            affine: self.layout == Layout::Affine && bits == Bits::Four && k.is_multiple_of(BLOCK),
        }
    }

    fn bits_of(&self, output: &str, default: Bits) -> Bits {
        self.bits.get(output).copied().unwrap_or(default)
    }

    /// The blocks of the weight written to `output` whose `columns` (`n`
    /// of `k`) multiply `input`.
    fn pack(
        &self,
        output: &str,
        columns: impl FnOnce() -> Vec<f32>,
        (k, n): (usize, usize),
        bits: Bits,
        input: &str,
        may_be_affine: bool,
    ) -> Packed {
        let mut grid = self.grid(bits, k);
        grid.affine &= may_be_affine;
        let key = (output.to_string(), bits, grid.affine);
        if let Some(made) = self.made.lock().expect("blocks lock").get(&key) {
            return made.clone();
        }
        let columns = columns();
        let rtn = pack_columns(&columns, k, n, bits, grid);
        let made = match self.calibration.and_then(|c| c.hessians.get(input)) {
            // Blocks that hold the weight as it is (a GGUF base's grid in
            // affine blocks) leave GPTQ nothing to correct.
            Some(h) if h.k == k && !exact(&rtn, &columns, k, n, bits) => {
                gptq::pack_columns(&columns, k, n, bits, grid, h, true)
            }
            _ => rtn,
        };
        self.made
            .lock()
            .expect("blocks lock")
            .insert(key, made.clone());
        made
    }
}

/// Quantizes the fp32 export `model` to `dtype`, the 4-bit dtypes' blocks
/// made as `blocks` says.
pub fn quantize(
    mut model: ModelProto,
    dtype: Dtype,
    options: Options,
    blocks: &Blocks<'_>,
) -> Result<(ModelProto, Report)> {
    let before: u64 = model
        .graph
        .as_ref()
        .map_or(0, |g| g.initializer.iter().map(bytes_of).sum());
    let mut report = Report {
        dtype: dtype.name().to_string(),
        weight_bytes_before: before,
        ..Report::default()
    };
    match dtype {
        Dtype::Fp32 => {}
        Dtype::Fp16 => to_fp16(&mut model, &mut report)?,
        Dtype::Q8 => stored_int8(&mut model, &mut report)?,
        Dtype::Int8 => {
            materialise_head(&mut model)?;
            dynamic_int8(&mut model, false, &mut report)?
        }
        Dtype::Uint8 => {
            materialise_head(&mut model)?;
            dynamic_int8(&mut model, true, &mut report)?
        }
        Dtype::Q4 | Dtype::Q4f16 => {
            // The head in `head_bits`: a tied one (and with
            // `quantize_embedding` the embedding) from the embedding's rows.
            let head = options
                .head_bits
                .bits()
                .map(|b| blocks.bits_of(HEAD_OUTPUT, b));
            head_and_embedding(
                &mut model,
                &mut report,
                Bits::Four,
                head,
                options.quantize_embedding,
                options.accuracy_level,
                blocks,
            )?;
            if head.is_some() {
                materialise_head(&mut model)?;
            }
            matmul_nbits(
                &mut model,
                &mut report,
                Bits::Four,
                head,
                options.accuracy_level,
                blocks,
            )?;
            if dtype == Dtype::Q4f16 {
                to_fp16(&mut model, &mut report)?;
            }
        }
    }
    let g = model.graph.as_ref().expect("a graph");
    report.weight_bytes_after = g.initializer.iter().map(bytes_of).sum();
    let count = |op: &str| {
        g.node
            .iter()
            .filter(|n| n.op_type.as_deref() == Some(op))
            .count()
    };
    report.matmul_integer_nodes = count("MatMulInteger");
    report.matmul_nbits_nodes = count("MatMulNBits");
    // Not the float MatMuls of affine blocks' sums and offsets.
    report.matmul_float_nodes = g
        .node
        .iter()
        .filter(|n| {
            n.op_type.as_deref() == Some("MatMul")
                && !n
                    .input
                    .get(1)
                    .is_some_and(|w| w.starts_with("block_ones_") || w.ends_with("_offsets"))
        })
        .count();
    Ok((model, report))
}

/// Replaces `MatMul(x, Transpose(W))` with `W` an initializer by a MatMul
/// against a new transposed initializer, so quantizers see the weight.
fn materialise_head(model: &mut ModelProto) -> Result<()> {
    let g = graph_mut(model);
    let initializers: HashMap<String, usize> = g
        .initializer
        .iter()
        .enumerate()
        .map(|(i, t)| (t.name.clone().unwrap_or_default(), i))
        .collect();
    let mut replaced = Vec::new();
    for (i, node) in g.node.iter().enumerate() {
        if node.op_type.as_deref() == Some("Transpose")
            && let Some(&source) = initializers.get(&node.input[0])
            && g.initializer[source].dims.len() == 2
        {
            replaced.push((i, source, node.output[0].clone()));
        }
    }
    for (i, source, output) in replaced.into_iter().rev() {
        let t = &g.initializer[source];
        let (rows, cols) = (t.dims[0] as usize, t.dims[1] as usize);
        let transposed = transpose(&floats(t)?, rows, cols);
        g.initializer
            .push(tensor_f32(&output, &[cols, rows], &transposed));
        g.node.remove(i);
    }
    Ok(())
}

/// `data` `[rows, cols]` transposed, in 64 x 64 tiles (cache-friendly).
fn transpose(data: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    const TILE: usize = 64;
    let mut out = vec![0f32; data.len()];
    for r0 in (0..rows).step_by(TILE) {
        for c0 in (0..cols).step_by(TILE) {
            for r in r0..(r0 + TILE).min(rows) {
                for c in c0..(c0 + TILE).min(cols) {
                    out[c * rows + r] = data[r * cols + c];
                }
            }
        }
    }
    out
}

/// MatMul nodes whose second input is a 2-D float initializer: (node index, weight index).
fn weight_matmuls(g: &proto::GraphProto) -> Vec<(usize, usize)> {
    let initializers: HashMap<&str, usize> = g
        .initializer
        .iter()
        .enumerate()
        .map(|(i, t)| (t.name.as_deref().unwrap_or(""), i))
        .collect();
    g.node
        .iter()
        .enumerate()
        .filter(|(_, n)| n.op_type.as_deref() == Some("MatMul"))
        .filter_map(|(i, n)| initializers.get(n.input[1].as_str()).map(|&w| (i, w)))
        .filter(|&(_, w)| {
            g.initializer[w].dims.len() == 2
                && g.initializer[w].data_type == Some(DataType::Float as i32)
        })
        .collect()
}

fn node(
    op: &str,
    domain: Option<&str>,
    inputs: &[&str],
    outputs: &[&str],
    attrs: &[(&str, Attr)],
    name: &str,
) -> NodeProto {
    crate::onnx::node_proto(name, op, domain, inputs, attrs, outputs)
}

/// Replaces nodes (by index, each with its replacement sequence), keeping order.
fn splice(g: &mut proto::GraphProto, mut replacements: Vec<(usize, Vec<NodeProto>)>) {
    replacements.sort_by_key(|(i, _)| *i);
    let mut out = Vec::with_capacity(g.node.len() + replacements.len() * 4);
    let mut next = replacements.into_iter().peekable();
    for (i, n) in std::mem::take(&mut g.node).into_iter().enumerate() {
        match next.peek() {
            Some((j, _)) if *j == i => out.extend(next.next().expect("peeked").1),
            _ => out.push(n),
        }
    }
    g.node = out;
}

/// Drops initializers nothing reads any more.
fn prune(g: &mut proto::GraphProto) {
    let used: HashSet<String> = g
        .node
        .iter()
        .flat_map(|n| n.input.iter().cloned())
        .chain(g.output.iter().filter_map(|o| o.name.clone()))
        .collect();
    g.initializer
        .retain(|t| t.name.as_ref().is_some_and(|n| used.contains(n)));
}

/// One MatMul against a weight, as a rewrite sees it.
struct WeightMatMul<'a> {
    node: &'a NodeProto,
    /// The node's name (or a stand-in).
    base: String,
    /// The weight's initializer name, shape `[k, n]` and values.
    name: String,
    dims: Vec<usize>,
    data: Vec<f32>,
}

/// Replaces every MatMul against a float weight with the nodes `rewrite`
/// returns (and adds its initializers), where it returns any; drops the
/// weights no longer read.
fn rewrite_weight_matmuls(
    model: &mut ModelProto,
    report: &mut Report,
    mut rewrite: impl FnMut(&WeightMatMul<'_>) -> Option<(Vec<NodeProto>, Vec<TensorProto>)>,
) -> Result<()> {
    let g = graph_mut(model);
    let mut replacements = Vec::new();
    let mut new_initializers = Vec::new();
    for (index, w) in weight_matmuls(g) {
        let t = &g.initializer[w];
        let matmul = WeightMatMul {
            node: &g.node[index],
            base: g.node[index]
                .name
                .clone()
                .unwrap_or_else(|| format!("matmul_{index}")),
            name: t.name.clone().unwrap_or_default(),
            dims: t.dims.iter().map(|&d| d as usize).collect(),
            data: floats(t)?,
        };
        let Some((nodes, initializers)) = rewrite(&matmul) else {
            continue;
        };
        report.weights_quantized += 1;
        report.parameters_quantized += matmul.data.len() as u64;
        replacements.push((index, nodes));
        new_initializers.extend(initializers);
    }
    splice(g, replacements);
    g.initializer.extend(new_initializers);
    prune(g);
    Ok(())
}

fn dynamic_int8(model: &mut ModelProto, unsigned: bool, report: &mut Report) -> Result<()> {
    rewrite_weight_matmuls(model, report, |m| {
        let (n, name, dims, data, base) = (m.node, &m.name, &m.dims, &m.data, &m.base);
        let mut new_initializers = Vec::new();
        let (raw, scale, zero_point): (Vec<u8>, f32, Option<u8>) = if unsigned {
            // Asymmetric uint8 over [min(w, 0), max(w, 0)], as QUInt8 weights are.
            let lo = data.iter().copied().fold(0f32, f32::min);
            let hi = data.iter().copied().fold(0f32, f32::max);
            let scale = if hi > lo { (hi - lo) / 255.0 } else { 1.0 };
            let zp = round(-lo / scale).clamp(0.0, 255.0) as u8;
            (
                data.iter()
                    .map(|&v| (round(v / scale) + zp as f32).clamp(0.0, 255.0) as u8)
                    .collect(),
                scale,
                Some(zp),
            )
        } else {
            let max = data.iter().fold(0f32, |m, v| m.max(v.abs()));
            let scale = if max > 0.0 { max / 127.0 } else { 1.0 };
            (
                data.iter()
                    .map(|&v| round(v / scale).clamp(-127.0, 127.0) as i8 as u8)
                    .collect(),
                scale,
                None,
            )
        };
        let q_name = format!("{name}_quantized");
        let scale_name = format!("{name}_scale");
        new_initializers.push(raw_tensor(
            &q_name,
            dims,
            if unsigned {
                DataType::Uint8
            } else {
                DataType::Int8
            },
            raw,
        ));
        new_initializers.push(tensor_f32(&scale_name, &[], &[scale]));
        let mut inputs_mmi = vec![];
        let zp_name = format!("{name}_zero_point");
        if let Some(zp) = zero_point {
            new_initializers.push(raw_tensor(&zp_name, &[], DataType::Uint8, vec![zp]));
        }
        let x = n.input[0].clone();
        let out = n.output[0].clone();
        let (xq, xs, xz) = (
            format!("{out}_x_quantized"),
            format!("{out}_x_scale"),
            format!("{out}_x_zero_point"),
        );
        let (int_out, float_out, scale_out) = (
            format!("{out}_int32"),
            format!("{out}_float"),
            format!("{out}_scale"),
        );
        inputs_mmi.extend([xq.as_str(), q_name.as_str(), xz.as_str()]);
        if zero_point.is_some() {
            inputs_mmi.push(zp_name.as_str());
        }
        let nodes = vec![
            node(
                "DynamicQuantizeLinear",
                None,
                &[&x],
                &[&xq, &xs, &xz],
                &[],
                &format!("{base}_quantize"),
            ),
            node(
                "MatMulInteger",
                None,
                &inputs_mmi,
                &[&int_out],
                &[],
                &format!("{base}_integer"),
            ),
            node(
                "Cast",
                None,
                &[&int_out],
                &[&float_out],
                &[("to", Attr::Int(DataType::Float as i64))],
                &format!("{base}_cast"),
            ),
            node(
                "Mul",
                None,
                &[&xs, &scale_name],
                &[&scale_out],
                &[],
                &format!("{base}_scales"),
            ),
            node(
                "Mul",
                None,
                &[&float_out, &scale_out],
                &[&out],
                &[],
                &format!("{base}_output"),
            ),
        ];
        Some((nodes, new_initializers))
    })
}

/// A MatMulNBits node (blocks of 32) computing `output = input · W` with W
/// `[k, n]` packed in `b` and `scales`.
#[allow(clippy::too_many_arguments)]
fn matmul_nbits_node(
    input: &str,
    b: &str,
    scales: &str,
    output: &str,
    k: usize,
    n: usize,
    bits: Bits,
    accuracy_level: i64,
    name: &str,
) -> NodeProto {
    let int = |v: usize| Attr::Int(v as i64);
    let attrs = [
        ("K", int(k)),
        ("N", int(n)),
        ("bits", int(bits.count())),
        ("block_size", int(32)),
        ("accuracy_level", Attr::Int(accuracy_level)),
    ];
    node(
        "MatMulNBits",
        Some("com.microsoft"),
        &[input, b, scales],
        &[output],
        &attrs,
        name,
    )
}

/// Declares the `com.microsoft` operator domain (once).
fn use_microsoft_domain(model: &mut ModelProto) {
    if !model
        .opset_import
        .iter()
        .any(|o| o.domain.as_deref() == Some("com.microsoft"))
    {
        model.opset_import.push(proto::OperatorSetIdProto {
            domain: Some("com.microsoft".to_string()),
            version: Some(1),
        });
    }
}

/// Bits per weight in a MatMulNBits block of 32: 4 or 8.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize)]
pub enum Bits {
    Four,
    Eight,
}

impl Bits {
    pub const fn count(self) -> usize {
        match self {
            Bits::Four => 4,
            Bits::Eight => 8,
        }
    }

    /// The zero point MatMulNBits implies when it is given none: 2^(bits-1).
    const fn zero(self) -> u8 {
        1 << (self.count() - 1)
    }

    /// The largest stored value.
    const fn top(self) -> f32 {
        ((1u32 << self.count()) - 1) as f32
    }

    /// Bytes a block of 32 weights takes.
    pub const fn block_bytes(self) -> usize {
        32 * self.count() / 8
    }
}

/// Packs `w` `[k, n]` in MatMulNBits' blocks of `bits`, laid out as
/// `layout` says, by round to nearest.
pub fn pack(w: &[f32], k: usize, n: usize, bits: Bits, layout: Layout) -> Packed {
    // Transposed once (tiled) so that each column's values are adjacent.
    let grid = Blocks::new(None, layout).grid(bits, k);
    pack_columns(&transpose(w, k, n), k, n, bits, grid)
}

/// [`pack`] of a weight given column by column: `columns` holds `n`
/// columns of `k` values each (W transposed, or a tied embedding's rows).
/// On a symmetric grid each block of 32 gets scale m / -z, m its value of
/// largest magnitude (the first such) and z the implied zero point (8 for 4
/// bits, 128 for 8), and q = round(w / scale) + z clamped to the stored
/// range (onnxruntime's symmetric blockwise quantizer); on an affine one,
/// scale (max - min) / 15 and offset min + 8 * scale, and q = round((w -
/// offset) / scale) + 8. Rows past `k` pad with z. Four bits pack two to a
/// byte, the first in the low half.
fn pack_columns(
    columns: &[f32],
    k: usize,
    n: usize,
    bits: Bits,
    grid: symb_kernels::Grid,
) -> Packed {
    let blocks = k.div_ceil(BLOCK);
    let mut codes = vec![bits.zero(); n * blocks * BLOCK];
    let mut steps = vec![symb_kernels::Step::default(); n * blocks];
    symb_kernels::round_rows(columns, k, grid, BLOCK, &mut codes, &mut steps);
    Packed::new(&codes, &steps, bits, grid)
}

/// Values in a MatMulNBits block.
const BLOCK: usize = 32;

/// The output of the MatMul that computes the head (the decoder contract's).
pub const HEAD_OUTPUT: &str = "logits";

/// One block's stored values `q` into its bytes: four bits two to a byte,
/// the first in the low half.
fn write_block(q: &[u8; BLOCK], out: &mut [u8], bits: Bits) {
    match bits {
        Bits::Four => {
            for (j, byte) in out.iter_mut().enumerate() {
                *byte = q[2 * j] | (q[2 * j + 1] << 4);
            }
        }
        Bits::Eight => out.copy_from_slice(q),
    }
}

/// `v.round()` (half away from zero) for |v| < 2³¹, without a libm call:
/// the quantizers round every weight.
#[inline]
fn round(v: f32) -> f32 {
    symb_kernels::round(v)
}

/// The head and the embedding in blocks: a tied head (`MatMul(x,
/// Transpose(wte))`) becomes MatMulNBits over the embedding's rows (B
/// `[vocab, blocks, bytes]` holds row `v` of `wte` blocked along the width,
/// which is column `v` of `wteᵀ`), and with `embedding` the `Gather(wte,
/// ids)` gathers and decodes the same bytes and scales. With
/// the head in float (`head` None) a tied head keeps its Transpose, and the
/// embedding, when asked for, gets `body` bits of its own; an untied head
/// is left to [`matmul_nbits`].
fn head_and_embedding(
    model: &mut ModelProto,
    report: &mut Report,
    body: Bits,
    head: Option<Bits>,
    embedding: bool,
    accuracy_level: i64,
    blocks: &Blocks<'_>,
) -> Result<()> {
    let g = graph_mut(model);
    let initializers: HashMap<String, usize> = g
        .initializer
        .iter()
        .enumerate()
        .map(|(i, t)| (t.name.clone().unwrap_or_default(), i))
        .collect();
    let transpose = g.node.iter().position(|n| {
        n.op_type.as_deref() == Some("Transpose") && initializers.contains_key(&n.input[0])
    });
    let tied = transpose.and_then(|transpose| {
        let wte_name = g.node[transpose].input[0].clone();
        let head_out = &g.node[transpose].output[0];
        let gather = g
            .node
            .iter()
            .position(|n| n.op_type.as_deref() == Some("Gather") && n.input[0] == wte_name)?;
        let head_at = g
            .node
            .iter()
            .position(|n| n.op_type.as_deref() == Some("MatMul") && &n.input[1] == head_out)?;
        Some((transpose, gather, head_at, wte_name))
    });
    let (Some((transpose, gather, head_at, wte_name)), Some(bits)) = (tied, head) else {
        // An untied head, or one left float: the embedding on its own.
        if embedding {
            untied_embedding(model, report, body)?;
        }
        return Ok(());
    };
    let wte = &g.initializer[initializers[&wte_name]];
    let (vocab, width) = (wte.dims[0] as usize, wte.dims[1] as usize);
    if embedding && width % 32 != 0 {
        return Err(err(format!(
            "a quantized embedding needs a width divisible by 32, and this model's is {width}"
        )));
    }
    report.weights_quantized += 1;
    report.parameters_quantized += (vocab * width) as u64;
    let (x, logits) = (
        g.node[head_at].input[0].clone(),
        g.node[head_at].output[0].clone(),
    );
    let rows = || floats(wte).unwrap_or_default();
    // Symmetric: the embedding's gather may read the same blocks, with no offsets.
    let Packed {
        data: packed,
        scales,
        calibrated,
        offsets,
    } = blocks.pack(&logits, rows, (width, vocab), bits, &x, false);
    debug_assert!(offsets.is_none(), "blocks packed symmetric have no offsets");
    report.weights_calibrated += usize::from(calibrated);
    let blocks = width.div_ceil(32);
    let head_node = |b: &str, s: &str| {
        matmul_nbits_node(
            &x,
            b,
            s,
            &logits,
            width,
            vocab,
            bits,
            accuracy_level,
            "head_quantized",
        )
    };
    if !embedding {
        // The head alone, packed straight from the embedding's rows; the
        // Gather keeps the float embedding.
        let (b_name, s_name) = (
            format!("{wte_name}_head_quantized"),
            format!("{wte_name}_head_scales"),
        );
        g.initializer.push(raw_tensor(
            &b_name,
            &[vocab, blocks, bits.block_bytes()],
            DataType::Uint8,
            packed,
        ));
        g.initializer
            .push(tensor_f32(&s_name, &[vocab, blocks], &scales));
        splice(
            g,
            vec![
                (transpose, vec![]),
                (head_at, vec![head_node(&b_name, &s_name)]),
            ],
        );
        use_microsoft_domain(model);
        return Ok(());
    }
    let (b_name, s_name, gathering) =
        gather_blockwise(g, gather, &wte_name, (vocab, width), packed, &scales, bits);
    splice(
        g,
        vec![
            (gather, gathering),
            (transpose, vec![]),
            (head_at, vec![head_node(&b_name, &s_name)]),
        ],
    );
    prune(g);
    use_microsoft_domain(model);
    Ok(())
}

/// The initializers of an embedding `[vocab, width]` in blocks of `bits`
/// (`packed` and `scales` from [`pack_columns`]) added to `g`, and the
/// nodes that replace the Gather at `gather` with a gather of each id's
/// blocks and scales and their decoding, `(q - z) * scale` (four-bit
/// values split from their bytes by Div, Floor and Sub), in standard ops:
/// onnxruntime-web's WebAssembly build has no GatherBlockQuantized
/// kernel. Returns the packed data's and the scales' names (a tied head's
/// MatMulNBits reads the same bytes).
fn gather_blockwise(
    g: &mut proto::GraphProto,
    gather: usize,
    wte_name: &str,
    (vocab, width): (usize, usize),
    packed: Vec<u8>,
    scales: &[f32],
    bits: Bits,
) -> (String, String, Vec<NodeProto>) {
    let blocks = width.div_ceil(BLOCK);
    let name = |suffix: &str| format!("{wte_name}_{suffix}");
    let (b_name, s_name) = (name("quantized"), name("scales"));
    g.initializer.push(raw_tensor(
        &b_name,
        &[vocab, blocks, bits.block_bytes()],
        DataType::Uint8,
        packed,
    ));
    g.initializer
        .push(tensor_f32(&s_name, &[vocab * blocks], scales));
    let constants = [
        crate::onnx::tensor_i64(&name("scales_shape"), &[2], &[vocab as i64, blocks as i64]),
        crate::onnx::tensor_i64(&name("last_axis"), &[1], &[-1]),
        crate::onnx::tensor_i64(&name("rows_shape"), &[3], &[0, 0, width as i64]),
        tensor_f32(&name("zero_point"), &[], &[bits.zero() as f32]),
    ];
    g.initializer.extend(constants);
    if bits == Bits::Four {
        g.initializer
            .push(tensor_f32(&name("sixteen"), &[], &[16.0]));
        g.initializer.push(crate::onnx::tensor_i64(
            &name("codes_shape"),
            &[4],
            &[0, 0, 0, BLOCK as i64],
        ));
    }
    let ids = g.node[gather].input[1].clone();
    let gathered = g.node[gather].output[0].clone();
    let mut nodes = Vec::new();
    let mut op = |op: &str, inputs: &[String], output: &str, attrs: &[(&str, Attr)]| {
        let inputs: Vec<&str> = inputs.iter().map(String::as_str).collect();
        nodes.push(node(op, None, &inputs, &[output], attrs, output));
        output.to_string()
    };
    // Each id's scales `[.., blocks, 1]` and bytes `[.., blocks, bytes]`.
    let rows = op(
        "Reshape",
        &[s_name.clone(), name("scales_shape")],
        &name("scale_rows"),
        &[],
    );
    let step = op(
        "Gather",
        &[rows, ids.clone()],
        &name("gathered_scales"),
        &[],
    );
    let step = op(
        "Unsqueeze",
        &[step, name("last_axis")],
        &name("token_scales"),
        &[],
    );
    let bytes = op(
        "Gather",
        &[b_name.clone(), ids],
        &name("gathered_bytes"),
        &[],
    );
    let to_float = [("to", Attr::Int(DataType::Float as i64))];
    let bytes = op("Cast", &[bytes], &name("byte_values"), &to_float);
    let codes = match bits {
        Bits::Eight => bytes,
        // Two values a byte, the first in the low half.
        Bits::Four => {
            let high = op(
                "Div",
                &[bytes.clone(), name("sixteen")],
                &name("sixteenths"),
                &[],
            );
            let high = op("Floor", &[high], &name("high_values"), &[]);
            let shifted = op(
                "Mul",
                &[high.clone(), name("sixteen")],
                &name("high_part"),
                &[],
            );
            let low = op("Sub", &[bytes, shifted], &name("low_values"), &[]);
            let low = op(
                "Unsqueeze",
                &[low, name("last_axis")],
                &name("low_pairs"),
                &[],
            );
            let high = op(
                "Unsqueeze",
                &[high, name("last_axis")],
                &name("high_pairs"),
                &[],
            );
            let pairs = op(
                "Concat",
                &[low, high],
                &name("value_pairs"),
                &[("axis", Attr::Int(-1))],
            );
            op(
                "Reshape",
                &[pairs, name("codes_shape")],
                &name("codes"),
                &[],
            )
        }
    };
    let centred = op("Sub", &[codes, name("zero_point")], &name("centred"), &[]);
    let values = op("Mul", &[centred, step], &name("values"), &[]);
    op("Reshape", &[values, name("rows_shape")], &gathered, &[]);
    (b_name, s_name, nodes)
}

/// The embedding (the float initializer gathered by `input_ids`) in blocks
/// of its own, where the head does not share it.
fn untied_embedding(model: &mut ModelProto, report: &mut Report, bits: Bits) -> Result<()> {
    let g = graph_mut(model);
    let initializers: HashMap<String, usize> = g
        .initializer
        .iter()
        .enumerate()
        .map(|(i, t)| (t.name.clone().unwrap_or_default(), i))
        .collect();
    let gather = g.node.iter().position(|n| {
        n.op_type.as_deref() == Some("Gather")
            && n.input.get(1).map(String::as_str) == Some("input_ids")
            && initializers.contains_key(&n.input[0])
    });
    let Some(gather) = gather else {
        return Err(err(
            "a quantized embedding: the graph gathers no embedding initializer by `input_ids`",
        ));
    };
    let wte_name = g.node[gather].input[0].clone();
    let wte = &g.initializer[initializers[&wte_name]];
    let (vocab, width) = (wte.dims[0] as usize, wte.dims[1] as usize);
    if width % 32 != 0 {
        return Err(err(format!(
            "a quantized embedding needs a width divisible by 32, and this model's is {width}"
        )));
    }
    let rows = floats(wte)?;
    report.weights_quantized += 1;
    report.parameters_quantized += rows.len() as u64;
    let Packed {
        data: packed,
        scales,
        ..
    } = pack_columns(
        &rows,
        width,
        vocab,
        bits,
        Blocks::new(None, Layout::Symmetric).grid(bits, width),
    );
    // A tied head that stays float reads the float embedding still.
    let keep = g
        .node
        .iter()
        .any(|n| n.op_type.as_deref() == Some("Transpose") && n.input[0] == wte_name);
    let (_, _, gathering) =
        gather_blockwise(g, gather, &wte_name, (vocab, width), packed, &scales, bits);
    splice(g, vec![(gather, gathering)]);
    if !keep {
        prune(g);
    }
    use_microsoft_domain(model);
    Ok(())
}

/// Every MatMul against a float weight as MatMulNBits of `bits`; the head
/// (the MatMul that writes `logits`) with `head` bits, or left float.
fn matmul_nbits(
    model: &mut ModelProto,
    report: &mut Report,
    bits: Bits,
    head: Option<Bits>,
    accuracy_level: i64,
    blocks: &Blocks<'_>,
) -> Result<()> {
    let (mut calibrated, mut affine) = (0, 0);
    // Affine blocks' offsets multiply the input's sums over each block:
    // `x · ones`, the ones `[k, k / 32]` one per width, the sums one per input.
    let mut ones: HashSet<usize> = HashSet::new();
    let mut sums: HashSet<String> = HashSet::new();
    rewrite_weight_matmuls(model, report, |m| {
        let output = &m.node.output[0];
        let input = &m.node.input[0];
        let bits = if output == HEAD_OUTPUT {
            head?
        } else {
            blocks.bits_of(output, bits)
        };
        let (k, cols) = (m.dims[0], m.dims[1]);
        let columns = || transpose(&m.data, k, cols);
        let packed = blocks.pack(output, columns, (k, cols), bits, input, true);
        calibrated += usize::from(packed.calibrated);
        let count = k.div_ceil(BLOCK);
        let (b_name, s_name) = (
            format!("{}_quantized", m.name),
            format!("{}_scales", m.name),
        );
        let mut initializers = vec![
            raw_tensor(
                &b_name,
                &[cols, count, bits.block_bytes()],
                DataType::Uint8,
                packed.data,
            ),
            tensor_f32(&s_name, &[cols * count], &packed.scales),
        ];
        let name = format!("{}_quantized", m.base);
        let Some(offsets) = packed.offsets else {
            let nbits = matmul_nbits_node(
                input,
                &b_name,
                &s_name,
                output,
                k,
                cols,
                bits,
                accuracy_level,
                &name,
            );
            return Some((vec![nbits], initializers));
        };
        affine += 1;
        let (ones_name, sums_name) = (format!("block_ones_{k}"), format!("{input}_block_sums"));
        let mut nodes = Vec::new();
        if ones.insert(k) {
            let mut e = vec![0f32; k * count];
            for i in 0..k {
                e[i * count + i / BLOCK] = 1.0;
            }
            initializers.push(tensor_f32(&ones_name, &[k, count], &e));
        }
        if sums.insert(input.clone()) {
            nodes.push(node(
                "MatMul",
                None,
                &[input, &ones_name],
                &[&sums_name],
                &[],
                &format!("{name}_block_sums"),
            ));
        }
        // Offsets `[blocks, n]`: row b holds each column's offset of block b.
        let o_name = format!("{}_offsets", m.name);
        let o = transpose(&offsets, cols, count);
        initializers.push(tensor_f32(&o_name, &[count, cols], &o));
        let (scaled, shifted) = (format!("{output}_scaled"), format!("{output}_shifted"));
        nodes.push(matmul_nbits_node(
            input,
            &b_name,
            &s_name,
            &scaled,
            k,
            cols,
            bits,
            accuracy_level,
            &name,
        ));
        nodes.push(node(
            "MatMul",
            None,
            &[&sums_name, &o_name],
            &[&shifted],
            &[],
            &format!("{name}_offsets"),
        ));
        nodes.push(node(
            "Add",
            None,
            &[&scaled, &shifted],
            &[output],
            &[],
            &format!("{name}_affine"),
        ));
        Some((nodes, initializers))
    })?;
    report.weights_calibrated += calibrated;
    report.weights_affine += affine;
    use_microsoft_domain(model);
    Ok(())
}

/// Weights stored in 8 bits, computed in float: every matrix a MatMul or a
/// Gather reads (the embedding and a tied head once) is held as int8 in
/// blocks of 32 along its reduction axis with one fp32 scale per block
/// (symmetric: scale = max |w| / 127), and turned back into floats by
/// Cast, Reshape and Mul, under its own name, so that nothing else in the
/// graph changes. Every input of that chain is a constant: ONNX Runtime
/// folds it when it loads the file (its constant folding skips
/// DequantizeLinear, not Cast and Mul), so the file downloads at 8 bits and
/// runs at fp32's speed and memory, in WebAssembly (where MatMulNBits and
/// DequantizeLinear dequantize every weight on every call) as elsewhere.
fn stored_int8(model: &mut ModelProto, report: &mut Report) -> Result<()> {
    const BLOCK: usize = 32;
    let g = graph_mut(model);
    // Each matrix and the axis its products run along: a MatMul's weight
    // [k, n] along k; a gathered embedding [vocab, width] along its width,
    // which a tied head (`Transpose`, then MatMul) runs along too.
    let mut axis: HashMap<String, usize> = HashMap::new();
    for n in &g.node {
        match n.op_type.as_deref() {
            Some("MatMul") if n.input.len() == 2 => {
                axis.entry(n.input[1].clone()).or_insert(0);
            }
            Some("Gather") if !n.input.is_empty() => {
                axis.insert(n.input[0].clone(), 1);
            }
            Some("Transpose") if !n.input.is_empty() => {
                axis.insert(n.input[0].clone(), 1);
            }
            _ => {}
        }
    }
    let mut chains = Vec::new();
    let mut kept = Vec::with_capacity(g.initializer.len());
    for t in std::mem::take(&mut g.initializer) {
        let name = t.name.clone().unwrap_or_default();
        let Some(&along) = axis.get(&name) else {
            kept.push(t);
            continue;
        };
        if t.dims.len() != 2
            || t.data_type != Some(DataType::Float as i32)
            || t.dims.iter().product::<i64>() < 1024
        {
            kept.push(t);
            continue;
        }
        let (rows, cols) = (t.dims[0] as usize, t.dims[1] as usize);
        let data = floats(&t)?;
        report.weights_quantized += 1;
        report.parameters_quantized += data.len() as u64;
        // Blocks of 32 along the axis where it divides, else the whole axis.
        let length = if along == 0 { rows } else { cols };
        let block = if length % BLOCK == 0 { BLOCK } else { length };
        let blocks = length / block;
        // Laid out so that a block is contiguous after a reshape: along
        // axis 1, [rows, blocks, block]; along axis 0, [blocks, block, cols].
        let (q_shape, s_shape): (Vec<usize>, Vec<usize>) = if along == 1 {
            (vec![rows, blocks, block], vec![rows, blocks, 1])
        } else {
            (vec![blocks, block, cols], vec![blocks, 1, cols])
        };
        let mut quantized = vec![0u8; data.len()];
        let mut scales = vec![0f32; rows * cols / block];
        let index = |r: usize, c: usize| r * cols + c;
        for (b, scale_out) in scales.iter_mut().enumerate() {
            // Block b: along axis 1, row b / blocks, columns (b % blocks) * block..;
            // along axis 0, column b % cols, rows (b / cols) * block...
            let at = |j: usize| {
                if along == 1 {
                    index(b / blocks, (b % blocks) * block + j)
                } else {
                    index((b / cols) * block + j, b % cols)
                }
            };
            let largest = (0..block).fold(0f32, |m, j| m.max(data[at(j)].abs()));
            let scale = if largest > 0.0 { largest / 127.0 } else { 1.0 };
            *scale_out = scale;
            for j in 0..block {
                quantized[at(j)] = round(data[at(j)] / scale).clamp(-127.0, 127.0) as i8 as u8;
            }
        }
        let (q_name, s_name) = (format!("{name}_int8"), format!("{name}_scales"));
        let (shape_name, back_name) = (format!("{name}_blocks_shape"), format!("{name}_shape"));
        let (cast, blocked, scaled) = (
            format!("{name}_float"),
            format!("{name}_blocked"),
            format!("{name}_dequantized"),
        );
        kept.push(raw_tensor(
            &q_name,
            &[rows, cols],
            DataType::Int8,
            quantized,
        ));
        kept.push(tensor_f32(&s_name, &s_shape, &scales));
        kept.push(crate::onnx::tensor_i64(
            &shape_name,
            &[3],
            &q_shape.iter().map(|&d| d as i64).collect::<Vec<_>>(),
        ));
        kept.push(crate::onnx::tensor_i64(
            &back_name,
            &[2],
            &[rows as i64, cols as i64],
        ));
        chains.extend([
            node(
                "Cast",
                None,
                &[&q_name],
                &[&cast],
                &[("to", Attr::Int(DataType::Float as i64))],
                &format!("{name}_cast"),
            ),
            node(
                "Reshape",
                None,
                &[&cast, &shape_name],
                &[&blocked],
                &[],
                &format!("{name}_to_blocks"),
            ),
            node(
                "Mul",
                None,
                &[&blocked, &s_name],
                &[&scaled],
                &[],
                &format!("{name}_scale"),
            ),
            node(
                "Reshape",
                None,
                &[&scaled, &back_name],
                &[&name],
                &[],
                &format!("{name}_from_blocks"),
            ),
        ]);
    }
    g.initializer = kept;
    chains.append(&mut g.node);
    g.node = chains;
    Ok(())
}

/// Float initializers and constants to fp16; fp32 graph inputs and outputs
/// kept, with Casts at the edges.
fn to_fp16(model: &mut ModelProto, report: &mut Report) -> Result<()> {
    let g = graph_mut(model);
    for t in g.initializer.iter_mut() {
        if t.data_type == Some(DataType::Float as i32) {
            let data = floats(t)?;
            report.weights_quantized += 1;
            report.parameters_quantized += data.len() as u64;
            // The attention fill value (the lowest float) becomes −10⁴: at
            // −65504 a masked score would overflow to −∞, and a row with
            // every key masked would give NaN.
            let halves: Vec<f16> = data
                .iter()
                .map(|&v| f16::from_f32(if v <= -65504.0 { -1e4 } else { v.min(65504.0) }))
                .collect();
            let raw = crate::onnx::le_bytes(&halves, f16::to_le_bytes);
            t.data_type = Some(DataType::Float16 as i32);
            t.raw_data = Some(raw.into());
            t.float_data.clear();
        }
    }
    let is_float = |v: &proto::ValueInfoProto| matches!(v.r#type.as_ref().and_then(|t| t.value.as_ref()), Some(proto::type_proto::Value::TensorType(t)) if t.elem_type == Some(DataType::Float as i32));
    let float_inputs: Vec<String> = g
        .input
        .iter()
        .filter(|v| is_float(v))
        .filter_map(|v| v.name.clone())
        .collect();
    let float_outputs: Vec<String> = g
        .output
        .iter()
        .filter(|v| is_float(v))
        .filter_map(|v| v.name.clone())
        .collect();
    // Casts to float inside the graph now cast to fp16.
    for n in g.node.iter_mut() {
        if n.op_type.as_deref() == Some("Cast") {
            for a in n.attribute.iter_mut() {
                if a.name.as_deref() == Some("to") && a.i == Some(DataType::Float as i64) {
                    a.i = Some(DataType::Float16 as i64);
                }
            }
        }
    }
    let rename: HashMap<String, String> = float_inputs
        .iter()
        .map(|i| (i.clone(), format!("{i}_fp16")))
        .chain(
            float_outputs
                .iter()
                .map(|o| (o.clone(), format!("{o}_fp16"))),
        )
        .collect();
    for n in g.node.iter_mut() {
        for name in n.input.iter_mut().chain(n.output.iter_mut()) {
            if let Some(new) = rename.get(name.as_str()) {
                *name = new.clone();
            }
        }
    }
    let mut head = Vec::new();
    for i in &float_inputs {
        head.push(node(
            "Cast",
            None,
            &[i],
            &[&rename[i]],
            &[("to", Attr::Int(DataType::Float16 as i64))],
            &format!("{i}_to_fp16"),
        ));
    }
    for o in &float_outputs {
        g.node.push(node(
            "Cast",
            None,
            &[&rename[o]],
            &[o],
            &[("to", Attr::Int(DataType::Float as i64))],
            &format!("{o}_to_fp32"),
        ));
    }
    head.append(&mut g.node);
    g.node = head;
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn tiled_transpose_and_fast_round_agree_with_the_plain_ones() {
        let (rows, cols) = (130, 67);
        let data: Vec<f32> = (0..rows * cols).map(|i| i as f32).collect();
        let t = super::transpose(&data, rows, cols);
        for r in 0..rows {
            for c in 0..cols {
                assert_eq!(t[c * rows + r], data[r * cols + c]);
            }
        }
        for v in [
            0.0f32,
            0.5,
            -0.5,
            1.5,
            -1.5,
            2.4999998,
            -2.5000002,
            0.49999997,
            7.5,
            -8.5,
            126.5,
            1e-8,
            -3.7,
            f32::MIN_POSITIVE,
        ] {
            assert_eq!(super::round(v), v.round(), "{v}");
        }
    }

    #[test]
    fn the_block_packers_follow_their_definition() {
        let (k, n): (usize, usize) = (80, 7);
        let w: Vec<f32> = (0..k * n)
            .map(|i| ((i * 37 % 101) as f32 - 50.0) / 13.0)
            .collect();
        let blocks = k.div_ceil(32);
        for (bits, zero, top) in [
            (super::Bits::Four, 8.0f32, 15.0f32),
            (super::Bits::Eight, 128.0, 255.0),
        ] {
            let super::Packed {
                data: packed,
                scales,
                offsets,
                ..
            } = super::pack(&w, k, n, bits, super::Layout::Symmetric);
            assert_eq!(offsets, None);
            assert_eq!(packed.len(), n * blocks * bits.block_bytes());
            for c in 0..n {
                for b in 0..blocks {
                    let rows: Vec<usize> = (b * 32..(b * 32 + 32).min(k)).collect();
                    let extreme = rows
                        .iter()
                        .map(|&r| w[r * n + c])
                        .fold(0f32, |m, v| if v.abs() > m.abs() { v } else { m });
                    let scale = extreme / -zero;
                    assert_eq!(scales[c * blocks + b], scale);
                    for j in 0..32 {
                        let q = rows.get(j).map_or(zero as u8, |&r| {
                            ((w[r * n + c] / scale).round() + zero).clamp(0.0, top) as u8
                        });
                        let at = (c * blocks + b) * bits.block_bytes();
                        let stored = match bits {
                            super::Bits::Four => {
                                let byte = packed[at + j / 2];
                                if j % 2 == 0 { byte & 15 } else { byte >> 4 }
                            }
                            super::Bits::Eight => packed[at + j],
                        };
                        assert_eq!(stored, q, "{bits:?}: column {c} block {b} row {j}");
                    }
                }
            }
        }
    }

    /// Weights on GGUF's Q4_1 grid (per block of 32: `d * q + m`, q from 0
    /// to 15, both ends used) come back from affine blocks as they were;
    /// symmetric blocks cannot hold them.
    #[test]
    fn affine_blocks_hold_a_q4_1_grid_exactly() {
        let (k, n) = (64usize, 6usize);
        let mut w = vec![0f32; k * n];
        for c in 0..n {
            for b in 0..k / 32 {
                let d = 0.01 + 0.003 * (c * 2 + b) as f32;
                let m = -0.05 - 0.01 * c as f32 + 0.02 * b as f32;
                for j in 0..32 {
                    let q = match j {
                        0 => 0,
                        1 => 15,
                        _ => (j * 7 + c * 3 + b) % 16,
                    };
                    w[(b * 32 + j) * n + c] = d * q as f32 + m;
                }
            }
        }
        let worst = |layout| {
            let packed = super::pack(&w, k, n, super::Bits::Four, layout);
            let back = packed.dequantize(k, n, super::Bits::Four);
            (0..k * n).fold(0f32, |m, i| {
                let (r, c) = (i / n, i % n);
                m.max((back[c * k + r] - w[i]).abs())
            })
        };
        let affine = worst(super::Layout::Affine);
        let symmetric = worst(super::Layout::Symmetric);
        assert!(affine < 1e-6, "affine: {affine}");
        assert!(symmetric > 1e-3, "symmetric: {symmetric}");
    }
}
