//! Calibration: what each weight of a graph multiplies, measured. The fp32
//! graph runs in ONNX Runtime over calibration windows with the input of
//! every MatMul against a weight as an extra output, and each input's
//! Hessian `Σ xᵀx` is summed over the windows' tokens.

use std::collections::BTreeMap;
use std::path::Path;

use super::gptq::Hessian;
use super::{Result, err};
use crate::model::RowLayout;
use crate::onnx::external::{self, Policy};
use crate::onnx::proto::tensor_proto::DataType;
use crate::onnx::proto::{self, GraphProto, ModelProto};
use crate::verify::session::{OnnxLm, Threads};

/// Each weight input's Hessian, by the name of the activation in the fp32
/// graph (what the quantizers look a weight's input up by).
#[derive(Debug, Clone, Default)]
pub struct Calibration {
    pub hessians: BTreeMap<String, Hessian>,
    /// Tokens the sums are over.
    pub tokens: usize,
}

/// Windows run together in one call.
const BATCH: usize = 8;

/// (activation, width) of each MatMul's input whose other input is a 2-D
/// float weight (an initializer, or the Transpose of one: a tied head),
/// each once.
pub fn weight_inputs(g: &GraphProto) -> Vec<(String, usize)> {
    let weights: BTreeMap<&str, &proto::TensorProto> = g
        .initializer
        .iter()
        .filter(|t| t.dims.len() == 2 && t.data_type == Some(DataType::Float as i32))
        .map(|t| (t.name.as_deref().unwrap_or(""), t))
        .collect();
    let transposed: BTreeMap<&str, &proto::TensorProto> = g
        .node
        .iter()
        .filter(|n| n.op_type.as_deref() == Some("Transpose"))
        .filter_map(|n| Some((n.output[0].as_str(), *weights.get(n.input[0].as_str())?)))
        .collect();
    let mut inputs: Vec<(String, usize)> = Vec::new();
    for n in g
        .node
        .iter()
        .filter(|n| n.op_type.as_deref() == Some("MatMul"))
    {
        let k = if let Some(w) = weights.get(n.input[1].as_str()) {
            w.dims[0] as usize
        } else if let Some(w) = transposed.get(n.input[1].as_str()) {
            w.dims[1] as usize
        } else {
            continue;
        };
        if !inputs.iter().any(|(name, _)| name == &n.input[0]) {
            inputs.push((n.input[0].clone(), k));
        }
    }
    inputs
}

/// The Hessian of every weight input of the fp32 graph `model` over
/// `windows` (token ids), run by ONNX Runtime from a copy of the graph
/// written under `scratch` with those inputs as outputs.
pub fn measure(
    mut model: ModelProto,
    windows: &[Vec<u32>],
    scratch: &Path,
    threads: Threads,
    mut progress: impl FnMut(usize, usize),
) -> Result<Calibration> {
    let g = model
        .graph
        .as_mut()
        .ok_or_else(|| err("the model has no graph"))?;
    let inputs = weight_inputs(g);
    if inputs.is_empty() {
        return Err(err("the graph has no MatMul against a weight to calibrate"));
    }
    for (name, _) in &inputs {
        g.output.push(proto::ValueInfoProto {
            name: Some(name.clone()),
            r#type: Some(proto::TypeProto {
                denotation: None,
                value: Some(proto::type_proto::Value::TensorType(
                    proto::type_proto::Tensor {
                        elem_type: Some(DataType::Float as i32),
                        shape: None,
                    },
                )),
            }),
            ..Default::default()
        });
    }
    let path = scratch.join("calibration.onnx");
    external::write(model, &path, Policy::Auto)
        .map_err(|e| err(format!("cannot write `{}`: {e}", path.display())))?;
    let mut lm = OnnxLm::load(&path, threads).map_err(|e| err(e.to_string()))?;
    let names: Vec<String> = inputs.iter().map(|(n, _)| n.clone()).collect();
    let mut sums: Vec<Vec<f64>> = inputs.iter().map(|(_, k)| vec![0f64; k * k]).collect();
    let mut tokens = 0;
    // Windows of one length run together.
    let mut order: Vec<&Vec<u32>> = windows.iter().filter(|w| !w.is_empty()).collect();
    order.sort_by_key(|w| w.len());
    let mut done = 0;
    for batch in order.chunk_by(|a, b| a.len() == b.len()) {
        for rows in batch.chunks(BATCH) {
            let rows: Vec<Vec<u32>> = rows.iter().map(|w| w.to_vec()).collect();
            let past = lm
                .empty_past_for(rows.len())
                .map_err(|e| err(e.to_string()))?;
            let (_, _, captured) = lm
                .run_capturing(&rows, &RowLayout::default(), past, &names)
                .map_err(|e| err(e.to_string()))?;
            let count = rows.len() * rows[0].len();
            for ((x, (name, k)), sum) in captured.iter().zip(&inputs).zip(&mut sums) {
                if x.len() != count * k {
                    return Err(err(format!(
                        "`{name}` has {} values for {count} tokens of width {k}",
                        x.len()
                    )));
                }
                add_gram(sum, x, *k)?;
            }
            tokens += count;
            done += rows.len();
            progress(done, windows.len());
        }
    }
    let _ = std::fs::remove_file(&path);
    let hessians = inputs
        .into_iter()
        .zip(sums)
        .map(|((name, k), values)| (name, Hessian { k, values }))
        .collect();
    Ok(Calibration { hessians, tokens })
}

/// `sum += xᵀx` for `x` `[m, k]` (candle's matmul, then added in f64).
fn add_gram(sum: &mut [f64], x: &[f32], k: usize) -> Result<()> {
    use candle_core::{Device, Tensor};
    let m = x.len() / k;
    let candle = |e: candle_core::Error| err(format!("calibration: {e}"));
    let t = Tensor::from_slice(x, (m, k), &Device::Cpu).map_err(candle)?;
    let gram = t
        .t()
        .and_then(|tt| tt.contiguous())
        .and_then(|tt| tt.matmul(&t))
        .and_then(|g| g.flatten_all())
        .and_then(|g| g.to_vec1::<f32>())
        .map_err(candle)?;
    for (s, g) in sum.iter_mut().zip(gram) {
        *s += g as f64;
    }
    Ok(())
}

/// The Hessians as safetensors (f32 `[k, k]` under their activation's
/// name) and back.
pub fn save(calibration: &Calibration, path: &Path) -> Result<()> {
    use safetensors::tensor::{Dtype, TensorView};
    let bytes: Vec<(String, Vec<u8>, usize)> = calibration
        .hessians
        .iter()
        .map(|(name, h)| {
            let data = h
                .values
                .iter()
                .flat_map(|&v| (v as f32).to_le_bytes())
                .collect();
            (name.clone(), data, h.k)
        })
        .collect();
    let views = bytes
        .iter()
        .map(|(name, data, k)| {
            TensorView::new(Dtype::F32, vec![*k, *k], data)
                .map(|v| (name.clone(), v))
                .map_err(|e| err(e.to_string()))
        })
        .collect::<Result<Vec<_>>>()?;
    let metadata = [("tokens".to_string(), calibration.tokens.to_string())].into();
    safetensors::serialize_to_file(views, Some(metadata), path)
        .map_err(|e| err(format!("cannot write `{}`: {e}", path.display())))
}

pub fn load(path: &Path) -> Result<Calibration> {
    let bytes =
        std::fs::read(path).map_err(|e| err(format!("cannot read `{}`: {e}", path.display())))?;
    let bad = |e: &dyn std::fmt::Display| err(format!("`{}`: {e}", path.display()));
    let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).map_err(|e| bad(&e))?;
    let tokens = meta
        .metadata()
        .as_ref()
        .and_then(|m| m.get("tokens"))
        .and_then(|t| t.parse().ok())
        .unwrap_or(0);
    let tensors = safetensors::SafeTensors::deserialize(&bytes).map_err(|e| bad(&e))?;
    let mut hessians = BTreeMap::new();
    for (name, view) in tensors.tensors() {
        let k = view.shape()[0];
        if view.shape() != [k, k] || view.dtype() != safetensors::Dtype::F32 {
            return Err(bad(&format!("`{name}` is not a square f32 matrix")));
        }
        let values = view
            .data()
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes(b.try_into().expect("4 bytes")) as f64)
            .collect();
        hessians.insert(name, Hessian { k, values });
    }
    Ok(Calibration { hessians, tokens })
}
