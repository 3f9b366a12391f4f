//! Stage `verify.<dtype>`: one ONNX file run by ONNX Runtime and compared
//! with the `reference` stage's answers for the model it came from; it loads
//! no candle model. A missed tolerance fails the build (exit 3) and
//! the output folder keeps its previous state.

use std::collections::BTreeMap;

use super::shared::{Artifact, REFERENCE_LOGITS, WORKLOAD, link_or_copy, write_json, writers};
use crate::dtype::Dtype;
use crate::engine::{Settings, Stage, StageContext, StageError, settings_of, spec_of};
use crate::manifest::Verify;
use crate::model;
use crate::verify::Tolerance;
use crate::verify::{self, runtime};

/// The stage is its settings.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct VerifyStage {
    pub dtype: Dtype,
    pub verify: VerifySettings,
    /// The bounds `[verify.tolerance.D]` itself set: what a failure names as
    /// the bound's origin, not what is checked (`verify.tolerance` is).
    #[serde(rename = "@overrides")]
    overrides: Option<Tolerance>,
}

/// The bounds the file must meet: `[verify.tolerance.D]` over symb's defaults.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct VerifySettings {
    pub tolerance: Tolerance,
}

impl VerifyStage {
    pub fn new(dtype: Dtype, verify: &Verify) -> Self {
        let overrides = verify.tolerance.get(&dtype).cloned();
        VerifyStage {
            dtype,
            verify: VerifySettings {
                tolerance: verify::tolerance(dtype, overrides.as_ref()),
            },
            overrides,
        }
    }
}

impl VerifyStage {
    /// What it reads: the reference's answers and the file.
    fn inputs(&self) -> Vec<Artifact> {
        vec![WORKLOAD, REFERENCE_LOGITS, Artifact::onnx(self.dtype)]
    }
}

impl Stage for VerifyStage {
    fn name(&self) -> &str {
        self.dtype.verify_stage()
    }
    fn kind(&self) -> &'static str {
        "verify"
    }
    fn version(&self) -> u32 {
        // 2: candle teacher-forced over ONNX's greedy tokens. 3: the workload
        // and candle's perplexity from `reference`; prompts in batches. 4: the
        // report holds no timing (the same inputs give the same bytes, so
        // builds on two machines agree; the time is in the build's log).
        // 5: ONNX follows candle's greedy tokens, all of candle's side from
        // `reference`. 6: ONNX goes along those tokens in three calls (the
        // first token alone, then the rest together) unless the file scales
        // its activations over each call. 7: the stage is its settings (its
        // bounds keyed as `verify.tolerance`). 8: where ONNX's greedy tokens
        // leave candle's, its own continuation.
        8
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
        BTreeMap::from([("onnxruntime".to_string(), runtime::identity())])
    }
    fn publishes(&self) -> Vec<(String, String)> {
        vec![(
            "report.json".to_string(),
            format!("reports/verify.{}.json", self.dtype),
        )]
    }
    fn run(&self, ctx: &StageContext<'_>) -> Result<serde_json::Value, StageError> {
        let reference: verify::Reference =
            model::read_json(WORKLOAD.path(ctx)?).map_err(super::shared::model_error)?;
        let logits_path = REFERENCE_LOGITS.path(ctx)?;
        let mut logits =
            std::io::BufReader::new(std::fs::File::open(logits_path).map_err(|e| {
                StageError::failed(format!("cannot open `{}`", logits_path.display())).because(e)
            })?);
        let onnx = Artifact::onnx(self.dtype);
        let path = onnx.path(ctx)?;
        // With external data, ONNX Runtime reads the chunks by name beside the
        // model (and refuses symbolic links out of its folder): the cache's
        // blobs are hard-linked under those names, in the cache.
        let data = super::shared::data_inputs(ctx, onnx);
        let staging = ctx.checkpoint_dir().join("onnx");
        let path = if data.is_empty() {
            path.to_path_buf()
        } else {
            let _ = std::fs::remove_dir_all(&staging);
            std::fs::create_dir_all(&staging).map_err(|e| {
                StageError::failed(format!("cannot create `{}`", staging.display())).because(e)
            })?;
            for (name, blob) in std::iter::once((onnx.file.to_string(), path)).chain(data) {
                link_or_copy(blob, &staging.join(name))?;
            }
            staging.join(onnx.file)
        };
        let path = path.as_path();
        // The cores shared with the stages that run beside this one: the
        // engine runs up to `jobs` at once, and its pool has `jobs` threads.
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        let threads = verify::session::Threads::shared(cores, rayon::current_num_threads());
        let runtime_error =
            |e: runtime::RuntimeError| StageError::failed(self.dtype.file_name()).because(e);
        let mut onnx = verify::session::OnnxLm::load(path, threads).map_err(runtime_error)?;
        tracing::debug!("loaded the ONNX file in ONNX Runtime");
        let report = verify::verify(
            &mut onnx,
            &reference,
            &mut logits,
            &self.verify.tolerance,
            verify::Stepping::for_dtype(self.dtype),
            |done, total| ctx.progress(done as u64, total as u64, "prompts and eval windows"),
        )
        .map_err(|e| StageError::failed(self.dtype.file_name()).because(e))?;
        let mut json = serde_json::to_value(&report).expect("report serialises");
        json["dtype"] = self.dtype.name().into();
        json["file"] = format!("onnx/{}", self.dtype.file_name()).into();
        json["onnxruntime"] = runtime::identity().into();
        json["tolerance"] =
            serde_json::to_value(&self.verify.tolerance).expect("tolerance serialises");
        let failures: Vec<_> = report.failures().collect();
        if !failures.is_empty() {
            let overridden = self.overrides.as_ref();
            let lines: Vec<String> = failures
                .iter()
                .map(|c| {
                    let (relation, by) = if c.kind == "max" {
                        ("above its maximum", c.value - c.bound)
                    } else {
                        ("below its minimum", c.bound - c.value)
                    };
                    let set = overridden
                        .and_then(|o| serde_json::to_value(o).ok())
                        .is_some_and(|o| !o[c.metric].is_null());
                    let origin = if set {
                        format!("set in `[verify.tolerance.{}]`", self.dtype)
                    } else {
                        "symb's default".to_string()
                    };
                    format!(
                        "  {}: {} = {:.6} is {relation} {} ({origin}) by {:.6}",
                        self.dtype, c.metric, c.value, c.bound, by
                    )
                })
                .collect();
            return Err(StageError::verification(format!(
                "onnx/{} (dtype {}) failed verification against candle:\n{}\n  (the output folder \
                    was not updated; loosen the bound in `[verify.tolerance.{}]` if this loss is \
                    acceptable)",
                self.dtype.file_name(),
                self.dtype,
                lines.join("\n"),
                self.dtype
            )));
        }
        write_json(&ctx.output("report.json"), &json)?;
        Ok(serde_json::json!({
            "max_abs_error": report.metrics.max_abs_error,
            "max_relative_error": report.metrics.max_relative_error,
            "top1_agreement": report.metrics.top1_agreement,
            "kl_divergence": report.metrics.kl_divergence,
            "perplexity_ratio": report.metrics.perplexity_ratio,
            "greedy_match": report.metrics.greedy_match,
        }))
    }
}
