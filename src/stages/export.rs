//! Stage `export`: the model as an ONNX graph with KV cache
//! (`onnx/model.onnx`, fp32), named as transformers.js reads it.

use std::collections::BTreeMap;

use crate::dtype::Dtype;
use crate::engine::{Settings, Stage, StageContext, StageError};
use crate::manifest::{Export, ExternalData};
use crate::onnx::external::{self, Policy, Written};

/// transformers.js reads at most this many data chunks per file.
const MAX_CHUNKS: usize = 100;

fn policy(external_data: ExternalData) -> Policy {
    match external_data {
        ExternalData::Auto => Policy::Auto,
        ExternalData::Always => Policy::Always,
    }
}

/// The artifacts of one ONNX file: the file, then every data chunk it may have.
fn onnx_artifacts(file: &str) -> Vec<(String, String)> {
    let mut files = vec![(file.to_string(), format!("onnx/{file}"))];
    files.extend(
        (0..MAX_CHUNKS)
            .map(|i| external::data_file_name(file, i))
            .map(|name| (name.clone(), format!("onnx/{name}"))),
    );
    files
}

/// The data chunks of `file` that stage `stage` wrote, as (name, path).
pub(super) fn data_inputs<'a>(
    ctx: &'a StageContext<'_>,
    stage: &str,
    file: &str,
) -> Vec<(String, &'a std::path::Path)> {
    (0..MAX_CHUNKS)
        .map_while(|i| {
            let name = external::data_file_name(file, i);
            ctx.input(stage, &name).ok().map(|path| (name, path))
        })
        .collect()
}

fn write_onnx(
    model: crate::onnx::proto::ModelProto,
    path: &std::path::Path,
    policy: Policy,
) -> Result<Written, StageError> {
    let written = external::write(model, path, policy)
        .map_err(|e| StageError::failed(format!("cannot write `{}`: {e}", path.display())))?;
    if written.data_files.len() > MAX_CHUNKS {
        return Err(StageError::failed(format!(
            "`{}` needs {} external data files; transformers.js reads at most {MAX_CHUNKS}",
            path.display(),
            written.data_files.len()
        )));
    }
    Ok(written)
}

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
        // 2: tensors streamed (raw bytes after their other fields).
        2
    }
    fn settings(&self) -> Settings {
        let mut s = Settings::new();
        s.insert("export.opset".into(), self.export.opset.into());
        s.insert(
            "export.external_data".into(),
            serde_json::to_value(self.export.external_data).expect("serialises"),
        );
        s
    }
    fn dependencies(&self) -> Vec<String> {
        vec![self.model_stage.to_string()]
    }
    fn tools(&self) -> BTreeMap<String, String> {
        super::model::tools()
    }
    fn publishes(&self) -> Vec<(String, String)> {
        onnx_artifacts("model.onnx")
    }
    fn run(&self, ctx: &StageContext<'_>) -> Result<serde_json::Value, StageError> {
        let stage = self.model_stage;
        let t = std::time::Instant::now();
        let model = super::model::load_model(ctx, stage)?;
        tracing::debug!(seconds = t.elapsed().as_secs_f64(), "loaded the model");
        let graph = crate::onnx::export(&model, self.export.opset as i64)
            .map_err(super::model::model_error)?;
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

/// Stage `quantize.<dtype>`: one quantized file from the fp32 export.
pub struct QuantizeStage {
    pub dtype: Dtype,
    pub options: crate::quant::Options,
    pub external_data: ExternalData,
    name: String,
}

impl QuantizeStage {
    pub fn new(dtype: Dtype, options: crate::quant::Options, external_data: ExternalData) -> Self {
        QuantizeStage {
            dtype,
            options,
            external_data,
            name: dtype.producer_stage(),
        }
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
        // 3: the tied head's 4 bits packed from the embedding rows; streamed writes.
        // 4: q8 is weight-only 8-bit blocks; the 4-bit files' head in `head_bits`.
        4
    }
    fn settings(&self) -> Settings {
        let mut s = Settings::new();
        s.insert("dtype".into(), self.dtype.name().into());
        if self.options.quantize_embedding && self.dtype.is_4bit() {
            s.insert("export.quantize_embedding".into(), true.into());
        }
        if self.dtype.is_4bit() {
            s.insert(
                "export.head_bits".into(),
                self.options.head_bits.number().into(),
            );
        }
        if self.dtype.uses_blocks() && self.options.accuracy_level != crate::quant::ACCURACY_LEVEL {
            s.insert(
                "export.accuracy_level".into(),
                self.options.accuracy_level.into(),
            );
        }
        s.insert(
            "export.external_data".into(),
            serde_json::to_value(self.external_data).expect("serialises"),
        );
        s
    }
    fn dependencies(&self) -> Vec<String> {
        vec!["export".to_string()]
    }
    fn publishes(&self) -> Vec<(String, String)> {
        let mut files = onnx_artifacts(self.dtype.file_name());
        files.push((
            "report.json".to_string(),
            format!("reports/quantize.{}.json", self.dtype),
        ));
        files
    }
    fn run(&self, ctx: &StageContext<'_>) -> Result<serde_json::Value, StageError> {
        let source = ctx.input("export", "model.onnx")?;
        let data = data_inputs(ctx, "export", "model.onnx");
        let fp32_bytes = std::fs::metadata(source).map(|m| m.len()).unwrap_or(0)
            + data
                .iter()
                .map(|(_, p)| std::fs::metadata(p).map_or(0, |m| m.len()))
                .sum::<u64>();
        let t = std::time::Instant::now();
        let fp32 = external::read(source, |location| {
            data.iter()
                .find(|(name, _)| name == location)
                .map(|(_, p)| p.to_path_buf())
        })
        .map_err(|e| StageError::failed(format!("cannot read the fp32 export: {e}")))?;
        tracing::debug!(seconds = t.elapsed().as_secs_f64(), "read the fp32 export");
        let (model, report) = crate::quant::quantize(fp32, self.dtype, self.options)
            .map_err(|e| StageError::failed(e.to_string()))?;
        tracing::debug!(seconds = t.elapsed().as_secs_f64(), "quantized");
        let file = self.dtype.file_name();
        let written = write_onnx(model, &ctx.output(file), policy(self.external_data))?;
        tracing::debug!(seconds = t.elapsed().as_secs_f64(), "wrote the file");
        let size = written.total_bytes();
        let mut json = serde_json::to_value(&report).expect("report serialises");
        json["file"] = file.into();
        json["file_bytes"] = size.into();
        json["fp32_file_bytes"] = fp32_bytes.into();
        json["data_files"] = serde_json::to_value(&written.data_files).expect("serialises");
        super::model::write_json(&ctx.output("report.json"), &json)?;
        Ok(json)
    }
}
