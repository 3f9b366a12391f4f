//! Stage `export`: the model as an ONNX graph with KV cache
//! (`onnx/model.onnx`, fp32), named as transformers.js reads it.

use std::collections::BTreeMap;

use super::shared::{Artifact, ModelStage, onnx_artifacts, policy, write_onnx, writers};
use crate::engine::{Settings, Stage, StageContext, StageError, settings_of, spec_of};
use crate::manifest::ExternalData;

/// The stage is its settings.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct ExportStage {
    pub export: ExportSettings,
    /// The stage whose model folder it converts (`merge`, `vocab` or
    /// `base`): its artifacts are keyed by digest.
    #[serde(rename = "@model_stage")]
    pub model_stage: ModelStage,
}

/// What of `[export]` shapes the fp32 file.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct ExportSettings {
    pub opset: u64,
    pub external_data: ExternalData,
}

impl ExportStage {
    /// What it reads: the model.
    fn inputs(&self) -> Vec<Artifact> {
        self.model_stage.model().to_vec()
    }
}

impl Stage for ExportStage {
    fn name(&self) -> &str {
        "export"
    }
    fn kind(&self) -> &'static str {
        "export"
    }
    fn version(&self) -> u32 {
        // 2: tensors streamed (raw bytes after their other fields).
        2
    }
    fn settings(&self) -> Settings {
        settings_of(self)
    }
    fn spec(&self) -> Option<serde_json::Value> {
        spec_of(self)
    }
    fn dependencies(&self) -> Vec<String> {
        writers(&self.inputs())
    }
    fn tools(&self) -> BTreeMap<String, String> {
        super::shared::tools()
    }
    fn publishes(&self) -> Vec<(String, String)> {
        onnx_artifacts("model.onnx")
    }
    fn run(&self, ctx: &StageContext<'_>) -> Result<serde_json::Value, StageError> {
        let t = std::time::Instant::now();
        let model = super::shared::load_model(ctx, self.model_stage)?;
        tracing::debug!(seconds = t.elapsed().as_secs_f64(), "loaded the model");
        let graph = model
            .to_onnx(self.export.opset as i64)
            .map_err(super::shared::model_error)?;
        drop(model);
        tracing::debug!(seconds = t.elapsed().as_secs_f64(), "built the graph");
        let nodes = graph.graph.as_ref().map_or(0, |g| g.node.len());
        let matmuls = graph.graph.as_ref().map_or(0, |g| {
            g.node
                .iter()
                .filter(|n| n.op_type.as_deref() == Some("MatMul"))
                .count()
        });
        let written = write_onnx(
            graph,
            &ctx.output("model.onnx"),
            policy(self.export.external_data),
        )?;
        tracing::debug!(seconds = t.elapsed().as_secs_f64(), "wrote the file");
        Ok(
            serde_json::json!({ "bytes": written.total_bytes(), "model_bytes": written.model_bytes, "data_files": written.data_files, "nodes": nodes, "matmul_nodes": matmuls, "opset": self.export.opset }),
        )
    }
}
