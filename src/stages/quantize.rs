//! Stage `quantize.D`: the fp32 export in dtype D, by the quantizers of
//! `crate::quant`, with its report.

use super::shared::{data_inputs, onnx_artifacts, policy, write_onnx};
use crate::dtype::Dtype;
use crate::engine::{Settings, Stage, StageContext, StageError};
use crate::manifest::ExternalData;
use crate::onnx::external::{self};

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
        super::shared::write_json(&ctx.output("report.json"), &json)?;
        Ok(json)
    }
}
