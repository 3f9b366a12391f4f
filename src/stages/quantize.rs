//! Stage `quantize.D`: the fp32 export in dtype D, by the quantizers of
//! `crate::quant`, with its report.

use super::shared::{
    Artifact, FP32_ONNX, data_inputs, onnx_artifacts, policy, write_onnx, writers,
};
use crate::dtype::Dtype;
use crate::engine::{Settings, Stage, StageContext, StageError, settings_of, spec_of};
use crate::manifest::{Calibration, ExternalData};
use crate::onnx::external::{self};

/// Stage `quantize.<dtype>`: one quantized file from the fp32 export. The
/// stage is its settings.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct QuantizeStage {
    pub dtype: Dtype,
    pub export: QuantizeSettings,
}

/// What of `[export]` shapes one quantized file: each option only where
/// the dtype has it, and `accuracy_level` only when not the default.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct QuantizeSettings {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quantize_embedding: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub head_bits: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub accuracy_level: Option<i64>,
    pub external_data: ExternalData,
    /// A 4-bit file's blocks chosen with the corpus's activations (GPTQ),
    /// read from the `calibrate` stage's Hessians.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub calibrated: bool,
    /// A 4-bit file with 8-bit weights where these bounds need them
    /// (`export.mixed`; the dtype's verify tolerance).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mixed: Option<crate::quant::mixed::Bounds>,
    /// A 4-bit file's blocks when not symmetric (`export.q4_blocks`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub q4_blocks: Option<crate::quant::Layout>,
}

impl QuantizeStage {
    pub fn new(
        dtype: Dtype,
        options: crate::quant::Options,
        external_data: ExternalData,
        calibration: Calibration,
        mixed: Option<crate::quant::mixed::Bounds>,
    ) -> Self {
        let export = QuantizeSettings {
            quantize_embedding: (options.quantize_embedding && dtype.is_4bit()).then_some(true),
            head_bits: dtype.is_4bit().then(|| options.head_bits.number()),
            accuracy_level: (dtype.uses_blocks()
                && options.accuracy_level != crate::quant::ACCURACY_LEVEL)
                .then_some(options.accuracy_level),
            external_data,
            calibrated: dtype.is_4bit() && calibration == Calibration::Corpus,
            mixed: mixed.filter(|_| dtype.is_4bit() && calibration == Calibration::Corpus),
            q4_blocks: Some(options.layout)
                .filter(|l| dtype.is_4bit() && *l != crate::quant::Layout::Symmetric),
        };
        QuantizeStage { dtype, export }
    }

    /// The quantizer's options from the settings.
    fn options(&self) -> crate::quant::Options {
        let e = &self.export;
        crate::quant::Options {
            quantize_embedding: e.quantize_embedding.unwrap_or(false),
            accuracy_level: e.accuracy_level.unwrap_or(crate::quant::ACCURACY_LEVEL),
            head_bits: e
                .head_bits
                .and_then(crate::quant::HeadBits::from_number)
                .unwrap_or_default(),
            layout: e.q4_blocks.unwrap_or_default(),
        }
    }
}

impl QuantizeStage {
    /// What it reads: the fp32 export.
    fn inputs(&self) -> Vec<Artifact> {
        let mut inputs = vec![FP32_ONNX];
        if self.export.calibrated {
            inputs.push(super::shared::HESSIANS);
        }
        inputs
    }
}

impl Stage for QuantizeStage {
    fn name(&self) -> &str {
        self.dtype.producer_stage()
    }
    fn kind(&self) -> &'static str {
        "quantize"
    }
    fn version(&self) -> u32 {
        // 3: the tied head's 4 bits packed from the embedding rows; streamed writes.
        // 4: q8 is weight-only 8-bit blocks; the 4-bit files' head in `head_bits`.
        // 5: a 4-bit embedding gathered as bytes and decoded in standard ops
        //    (no GatherBlockQuantized); GPTQ's errors applied in batches.
        5
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
    fn publishes(&self) -> Vec<(String, String)> {
        let mut files = onnx_artifacts(self.dtype.file_name());
        files.push((
            "report.json".to_string(),
            format!("reports/quantize.{}.json", self.dtype),
        ));
        files
    }
    fn run(&self, ctx: &StageContext<'_>) -> Result<serde_json::Value, StageError> {
        let source = FP32_ONNX.path(ctx)?;
        let data = data_inputs(ctx, FP32_ONNX);
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
        .map_err(|e| StageError::failed("cannot read the fp32 export").because(e))?;
        tracing::debug!(seconds = t.elapsed().as_secs_f64(), "read the fp32 export");
        let calibration = self
            .export
            .calibrated
            .then(|| {
                super::shared::HESSIANS
                    .path(ctx)
                    .and_then(|p| crate::quant::calibrate::load(p).map_err(StageError::failed_from))
            })
            .transpose()?;
        let started = std::time::Instant::now();
        let (model, report, search) = match (self.export.mixed, &calibration) {
            (Some(bounds), Some(calibration)) => {
                let windows: Vec<Vec<u32>> =
                    std::fs::read(super::shared::CALIBRATION_WINDOWS.path(ctx)?)
                        .ok()
                        .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
                        .and_then(|v| serde_json::from_value(v["ids"].clone()).ok())
                        .ok_or_else(|| StageError::failed("the calibration windows do not read"))?;
                let scratch = tempfile::tempdir()
                    .map_err(|e| StageError::failed("cannot make a scratch folder").because(e))?;
                let threads = crate::verify::session::Threads::shared(
                    std::thread::available_parallelism().map_or(1, |n| n.get()),
                    rayon::current_num_threads(),
                );
                let (model, report, search) = crate::quant::mixed::search(
                    &fp32,
                    self.dtype,
                    self.options(),
                    calibration,
                    &windows,
                    bounds,
                    scratch.path(),
                    threads,
                    |message| ctx.progress(0, 0, message),
                )
                .map_err(StageError::failed_from)?;
                (model, report, Some(search))
            }
            _ => {
                let blocks = crate::quant::Blocks::new(calibration.as_ref(), self.options().layout);
                let (model, report) =
                    crate::quant::quantize(fp32, self.dtype, self.options(), &blocks)
                        .map_err(StageError::failed_from)?;
                (model, report, None)
            }
        };
        let seconds = started.elapsed().as_secs_f64();
        tracing::debug!(seconds = t.elapsed().as_secs_f64(), "quantized");
        let file = self.dtype.file_name();
        let written = write_onnx(model, &ctx.output(file), policy(self.export.external_data))?;
        tracing::debug!(seconds = t.elapsed().as_secs_f64(), "wrote the file");
        let size = written.total_bytes();
        let mut json = serde_json::to_value(&report).expect("report serialises");
        json["file"] = file.into();
        json["file_bytes"] = size.into();
        json["fp32_file_bytes"] = fp32_bytes.into();

        if let Some(search) = &search {
            json["mixed"] = serde_json::to_value(search).expect("the search serialises");
        }
        json["calibration_tokens"] = calibration.as_ref().map_or(0, |c| c.tokens).into();
        json["data_files"] = serde_json::to_value(&written.data_files).expect("serialises");
        // The report holds no timing: the same inputs give the same bytes.
        super::shared::write_json(&ctx.output("report.json"), &json)?;
        json["seconds"] = seconds.into();
        Ok(json)
    }
}
