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

fn graph_mut(model: &mut ModelProto) -> &mut proto::GraphProto {
    model.graph.as_mut().expect("an exported model has a graph")
}

/// Choices beyond the dtype.
#[derive(Debug, Clone, Copy)]
pub struct Options {
    /// With q4 and q4f16: the token embedding in 4 bits too
    /// (`com.microsoft.GatherBlockQuantized`), sharing its packed data with
    /// the tied head's MatMulNBits.
    pub quantize_embedding: bool,
    /// MatMulNBits' `accuracy_level` (0 to 4; see [`ACCURACY_LEVEL`]).
    pub accuracy_level: i64,
    /// With q4 and q4f16: the head's precision.
    pub head_bits: HeadBits,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            quantize_embedding: false,
            accuracy_level: ACCURACY_LEVEL,
            head_bits: HeadBits::default(),
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
type Made = (Vec<u8>, Vec<f32>, bool);

/// How the 4-bit dtypes make each weight's blocks: with GPTQ where the
/// calibration has the weight's input (else by rounding to nearest), in the
/// bits `bits` gives the weight (by the name of its MatMul's output;
/// `logits` for the head) or else the dtype's, and once: blocks made for
/// one file are kept for the next (a search assembles many).
#[derive(Debug, Default)]
pub struct Blocks<'a> {
    pub calibration: Option<&'a calibrate::Calibration>,
    pub bits: HashMap<String, Bits>,
    made: std::sync::Mutex<HashMap<(String, Bits), Made>>,
}

impl<'a> Blocks<'a> {
    /// Blocks chosen with `calibration` where given, in the dtype's bits.
    pub fn new(calibration: Option<&'a calibrate::Calibration>) -> Self {
        Blocks {
            calibration,
            ..Blocks::default()
        }
    }

    fn bits_of(&self, output: &str, default: Bits) -> Bits {
        self.bits.get(output).copied().unwrap_or(default)
    }

    /// The blocks (B, scales) of the weight written to `output` whose
    /// `columns` (`n` of `k`) multiply `input`, and whether GPTQ chose them.
    fn pack(
        &self,
        output: &str,
        columns: impl FnOnce() -> Vec<f32>,
        (k, n): (usize, usize),
        bits: Bits,
        input: &str,
    ) -> (Vec<u8>, Vec<f32>, bool) {
        let key = (output.to_string(), bits);
        if let Some(made) = self.made.lock().expect("blocks lock").get(&key) {
            return made.clone();
        }
        let columns = columns();
        let made = match self.calibration.and_then(|c| c.hessians.get(input)) {
            Some(h) if h.k == k => {
                let (b, s) = gptq::pack_columns(&columns, k, n, bits, h, true);
                (b, s, true)
            }
            _ => {
                let (b, s) = pack_columns(&columns, k, n, bits);
                (b, s, false)
            }
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
    report.matmul_float_nodes = count("MatMul");
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

/// Packs `w` `[k, n]` as MatMulNBits' B `[n, blocks, 32 * bits / 8]` and
/// scales `[n, blocks]`.
pub fn pack(w: &[f32], k: usize, n: usize, bits: Bits) -> (Vec<u8>, Vec<f32>) {
    // Transposed once (tiled) so that each column's values are adjacent.
    pack_columns(&transpose(w, k, n), k, n, bits)
}

/// [`pack`] of a weight given column by column: `columns` holds `n`
/// columns of `k` values each (W transposed, or a tied embedding's rows).
/// Each block of 32 gets scale m / -z, m its value of largest magnitude (the
/// first such) and z the implied zero point (8 for 4 bits, 128 for 8), and
/// q = round(w / scale) + z clamped to the stored range (onnxruntime's
/// symmetric blockwise quantizer); rows past `k` pad with z (zero). Four
/// bits pack two to a byte, the first in the low half.
fn pack_columns(columns: &[f32], k: usize, n: usize, bits: Bits) -> (Vec<u8>, Vec<f32>) {
    let blocks = k.div_ceil(BLOCK);
    let per_block = bits.block_bytes();
    let mut packed = vec![0u8; n * blocks * per_block];
    let mut scales = vec![0f32; n * blocks];
    let (zero, top) = (bits.zero(), bits.top());
    let columns = columns
        .chunks_exact(k)
        .zip(packed.chunks_exact_mut(blocks * per_block))
        .zip(scales.chunks_exact_mut(blocks));
    for ((column, out), column_scales) in columns {
        for ((block, out), scale_out) in column
            .chunks(BLOCK)
            .zip(out.chunks_exact_mut(per_block))
            .zip(column_scales.iter_mut())
        {
            let largest = block.iter().fold(0f32, |m, v| m.max(v.abs()));
            let extreme = block
                .iter()
                .copied()
                .find(|v| v.abs() == largest)
                .unwrap_or(0.0);
            let scale = extreme / -(zero as f32);
            *scale_out = scale;
            let inverse = if scale != 0.0 { 1.0 / scale } else { 0.0 };
            let mut q = [zero; BLOCK];
            for (q, &v) in q.iter_mut().zip(block) {
                *q = (round(v * inverse) + zero as f32).clamp(0.0, top) as u8;
            }
            write_block(&q, out, bits);
        }
    }
    (packed, scales)
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
/// ids)` becomes GatherBlockQuantized over the same bytes and scales. With
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
    let (packed, scales, calibrated) = blocks.pack(&logits, rows, (width, vocab), bits, &x);
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
/// (`packed` and `scales` from [`pack_columns`], explicit zero points)
/// added to `g`, and the nodes that replace the Gather at `gather` with a
/// GatherBlockQuantized over them; returns the packed data's and the
/// scales' names too (a tied head reads the same bytes).
fn gather_blockwise(
    g: &mut proto::GraphProto,
    gather: usize,
    wte_name: &str,
    (vocab, width): (usize, usize),
    packed: Vec<u8>,
    scales: &[f32],
    bits: Bits,
) -> (String, String, Vec<NodeProto>) {
    let blocks = width.div_ceil(32);
    let (b_name, s_name, zp_name) = (
        format!("{wte_name}_quantized"),
        format!("{wte_name}_scales"),
        format!("{wte_name}_zero_points"),
    );
    let (b_shape, s_shape) = (
        format!("{wte_name}_quantized_shape"),
        format!("{wte_name}_scales_shape"),
    );
    let (b_rows, s_rows) = (
        format!("{wte_name}_quantized_rows"),
        format!("{wte_name}_scales_rows"),
    );
    g.initializer.push(raw_tensor(
        &b_name,
        &[vocab, blocks, bits.block_bytes()],
        DataType::Uint8,
        packed,
    ));
    g.initializer
        .push(tensor_f32(&s_name, &[vocab * blocks], scales));
    // Zero points packed as the data is: two to a byte in 4 bits.
    let zero_points = match bits {
        Bits::Four => raw_tensor(
            &zp_name,
            &[vocab, blocks.div_ceil(2)],
            DataType::Uint8,
            vec![0x88; vocab * blocks.div_ceil(2)],
        ),
        Bits::Eight => raw_tensor(
            &zp_name,
            &[vocab, blocks],
            DataType::Uint8,
            vec![bits.zero(); vocab * blocks],
        ),
    };
    g.initializer.push(zero_points);
    g.initializer.push(crate::onnx::tensor_i64(
        &b_shape,
        &[2],
        &[vocab as i64, (width * bits.count() / 8) as i64],
    ));
    g.initializer.push(crate::onnx::tensor_i64(
        &s_shape,
        &[2],
        &[vocab as i64, blocks as i64],
    ));
    let ids = g.node[gather].input[1].clone();
    let gathered = g.node[gather].output[0].clone();
    let int = |v: usize| Attr::Int(v as i64);
    let nodes = vec![
        node(
            "Reshape",
            None,
            &[&b_name, &b_shape],
            &[&b_rows],
            &[],
            "embedding_quantized_rows",
        ),
        node(
            "Reshape",
            None,
            &[&s_name, &s_shape],
            &[&s_rows],
            &[],
            "embedding_scales_rows",
        ),
        node(
            "GatherBlockQuantized",
            Some("com.microsoft"),
            &[&b_rows, &ids, &s_rows, &zp_name],
            &[&gathered],
            &[
                ("gather_axis", int(0)),
                ("quantize_axis", int(1)),
                ("block_size", int(32)),
                ("bits", int(bits.count())),
            ],
            "embedding_quantized",
        ),
    ];
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
    let (packed, scales) = pack_columns(&rows, width, vocab, bits);
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
    let mut calibrated = 0;
    rewrite_weight_matmuls(model, report, |m| {
        let output = &m.node.output[0];
        let bits = if output == HEAD_OUTPUT {
            head?
        } else {
            blocks.bits_of(output, bits)
        };
        let (k, cols) = (m.dims[0], m.dims[1]);
        let columns = || transpose(&m.data, k, cols);
        let (packed, scales, gptq) =
            blocks.pack(output, columns, (k, cols), bits, &m.node.input[0]);
        calibrated += usize::from(gptq);
        let blocks = k.div_ceil(32);
        let (b_name, s_name) = (
            format!("{}_quantized", m.name),
            format!("{}_scales", m.name),
        );
        let initializers = vec![
            raw_tensor(
                &b_name,
                &[cols, blocks, bits.block_bytes()],
                DataType::Uint8,
                packed,
            ),
            tensor_f32(&s_name, &[cols * blocks], &scales),
        ];
        Some((
            vec![matmul_nbits_node(
                &m.node.input[0],
                &b_name,
                &s_name,
                &m.node.output[0],
                k,
                cols,
                bits,
                accuracy_level,
                &format!("{}_quantized", m.base),
            )],
            initializers,
        ))
    })?;
    report.weights_calibrated += calibrated;
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
            let (packed, scales) = super::pack(&w, k, n, bits);
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
}
