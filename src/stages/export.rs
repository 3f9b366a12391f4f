//! Stage `export`: the model as an ONNX graph with KV cache
//! (`onnx/model.onnx`, fp32), named as transformers.js reads it.

use std::collections::BTreeMap;

use crate::engine::{Settings, Stage, StageContext, StageError};
use crate::manifest::Export;
use crate::model;

pub struct ExportStage {
    pub export: Export,
    /// The stage whose model folder it converts: `merge`, `vocab` or `base`.
    pub model_stage: &'static str,
}

impl Stage for ExportStage {
    fn name(&self) -> &str {
        "export"
    }
    fn kind(&self) -> &'static str {
        "export"
    }
    fn version(&self) -> u32 {
        1
    }
    fn settings(&self) -> Settings {
        let mut s = Settings::new();
        s.insert("export.opset".into(), self.export.opset.into());
        s
    }
    fn dependencies(&self) -> Vec<String> {
        vec![self.model_stage.to_string()]
    }
    fn tools(&self) -> BTreeMap<String, String> {
        super::model::tools()
    }
    fn publishes(&self) -> Vec<(String, String)> {
        vec![("model.onnx".to_string(), "onnx/model.onnx".to_string())]
    }
    fn run(&self, ctx: &StageContext<'_>) -> Result<serde_json::Value, StageError> {
        let stage = self.model_stage;
        let model = model::load_files(ctx.input(stage, "config.json")?, &[ctx.input(stage, "model.safetensors")?.to_path_buf()]).map_err(super::model::model_error)?;
        let graph = crate::onnx::gpt2::export(&model, self.export.opset as i64).map_err(super::model::model_error)?;
        let nodes = graph.graph.as_ref().map_or(0, |g| g.node.len());
        let matmuls = graph.graph.as_ref().map_or(0, |g| g.node.iter().filter(|n| n.op_type.as_deref() == Some("MatMul")).count());
        let path = ctx.output("model.onnx");
        let bytes = crate::onnx::save(&graph, &path).map_err(|e| StageError::failed(format!("cannot write `{}`: {e}", path.display())))?;
        Ok(serde_json::json!({ "bytes": bytes, "nodes": nodes, "matmul_nodes": matmuls, "opset": self.export.opset }))
    }
}

/// Stage `quantize.<dtype>`: one quantized file from the fp32 export.
pub struct QuantizeStage {
    pub dtype: String,
    pub options: crate::quant::Options,
    name: String,
    file: &'static str,
}

impl QuantizeStage {
    pub fn new(dtype: &str, options: crate::quant::Options) -> Option<Self> {
        let file = crate::quant::file_name(dtype)?;
        Some(QuantizeStage { dtype: dtype.to_string(), options, name: format!("quantize.{dtype}"), file })
    }
}

impl Stage for QuantizeStage {
    fn name(&self) -> &str {
        &self.name
    }
    fn kind(&self) -> &'static str {
        "quantize"
    }
    fn version(&self) -> u32 {
        2
    }
    fn settings(&self) -> Settings {
        let mut s = Settings::new();
        s.insert("dtype".into(), self.dtype.clone().into());
        if self.options.quantize_embedding && self.dtype.starts_with("q4") {
            s.insert("export.quantize_embedding".into(), true.into());
        }
        s
    }
    fn dependencies(&self) -> Vec<String> {
        vec!["export".to_string()]
    }
    fn publishes(&self) -> Vec<(String, String)> {
        vec![(self.file.to_string(), format!("onnx/{}", self.file)), ("report.json".to_string(), format!("reports/quantize.{}.json", self.dtype))]
    }
    fn run(&self, ctx: &StageContext<'_>) -> Result<serde_json::Value, StageError> {
        use prost::Message;
        let source = ctx.input("export", "model.onnx")?;
        let bytes = std::fs::read(source).map_err(|e| StageError::failed(format!("cannot read `{}`: {e}", source.display())))?;
        let fp32 = crate::onnx::proto::ModelProto::decode(bytes.as_slice()).map_err(|e| StageError::failed(format!("`{}` is not an ONNX model: {e}", source.display())))?;
        let (model, mut report) = crate::quant::quantize(fp32, &self.dtype, self.options).map_err(|e| StageError::failed(e.to_string()))?;
        let path = ctx.output(self.file);
        let size = crate::onnx::save(&model, &path).map_err(|e| StageError::failed(format!("cannot write `{}`: {e}", path.display())))?;
        report.dtype = self.dtype.clone();
        let mut json = serde_json::to_value(&report).expect("report serialises");
        json["file"] = self.file.into();
        json["file_bytes"] = size.into();
        json["fp32_file_bytes"] = (bytes.len() as u64).into();
        super::model::write_json(&ctx.output("report.json"), &json)?;
        Ok(json)
    }
}
