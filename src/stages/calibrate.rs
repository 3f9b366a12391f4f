//! Stage `calibrate`: what each weight of the fp32 export multiplies on the
//! corpus's train split (never the eval split that verification measures
//! on): the Hessian of every weight input over calibration windows, for the
//! 4-bit quantizers ([`crate::quant::calibrate`]).

use std::collections::BTreeMap;

use super::shared::{
    Artifact, CALIBRATION_WINDOWS as WINDOWS, FP32_ONNX, HESSIANS, ModelStage, TRAIN, data_inputs,
    read_documents, token_stream, writers,
};
use crate::engine::{Settings, Stage, StageContext, StageError, settings_of, spec_of};
use crate::onnx::external;
use crate::verify::session::Threads;

/// The stage is its settings.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct CalibrateStage {
    /// Windows of the train split run, and their length in tokens (at most
    /// the model's context).
    pub windows: usize,
    pub window: usize,
    /// The stage whose tokenizer encodes the corpus.
    #[serde(rename = "@model_stage")]
    pub model_stage: ModelStage,
    /// A chat model: conversations rendered with its template (the folder's
    /// `tokenizer_config.json`).
    #[serde(rename = "@chat", default, skip_serializing_if = "std::ops::Not::not")]
    pub chat: bool,
}

/// GPTQ's usual calibration is 128 sequences; 128 tokens each keeps one
/// pass of a 135M model under a minute on two cores.
pub const WINDOWS_DEFAULT: usize = 128;
pub const WINDOW_DEFAULT: usize = 128;

impl CalibrateStage {
    pub fn new(model_stage: ModelStage, chat: bool) -> Self {
        CalibrateStage {
            windows: WINDOWS_DEFAULT,
            window: WINDOW_DEFAULT,
            model_stage,
            chat,
        }
    }

    /// What it reads (the fp32 export's data chunks too).
    fn inputs(&self) -> Vec<Artifact> {
        let mut inputs = vec![
            FP32_ONNX,
            TRAIN,
            self.model_stage.file("tokenizer.json"),
            self.model_stage.file("config.json"),
            self.model_stage.file("generation_config.json"),
        ];
        if self.chat {
            inputs.push(self.model_stage.file("tokenizer_config.json"));
        }
        inputs
    }

    /// The train split as calibration windows: documents taken across the
    /// whole split (every `stride`-th first, then the ones between), until
    /// there are tokens for every window.
    fn windows(
        &self,
        ctx: &StageContext<'_>,
        tokenizer: &tokenizers::Tokenizer,
        context: usize,
        eos: Option<u32>,
    ) -> Result<Vec<Vec<u32>>, StageError> {
        let documents = read_documents(TRAIN.path(ctx)?)?;
        let stride = documents.len().div_ceil(256).max(1);
        let spread = (0..stride)
            .flat_map(|offset| (offset..documents.len()).step_by(stride))
            .map(|i| &documents[i]);
        let window = self.window.min(context).max(2);
        let limit = self.windows * window;
        let stream = if self.chat {
            let config: serde_json::Value =
                crate::model::read_json(self.model_stage.file("tokenizer_config.json").path(ctx)?)
                    .map_err(super::shared::model_error)?;
            let (template, render) = crate::chat::config_template(&config, None)
                .ok()
                .flatten()
                .ok_or_else(|| {
                    StageError::failed("the chat model's folder has no chat template")
                })?;
            let whole = crate::chat::Render {
                add_generation_prompt: false,
                ..render
            };
            token_stream(
                spread
                    .filter_map(super::shared::Document::conversation)
                    .filter_map(|m| template.render(&m, &whole).ok().map(Into::into)),
                tokenizer,
                false,
                None,
                limit,
            )?
        } else {
            token_stream(
                spread.map(|d| d.texts().concat().into()),
                tokenizer,
                true,
                eos,
                limit,
            )?
        };
        Ok(stream
            .chunks(window)
            .filter(|w| w.len() >= 2)
            .take(self.windows)
            .map(<[u32]>::to_vec)
            .collect())
    }
}

impl Stage for CalibrateStage {
    fn name(&self) -> &str {
        "calibrate"
    }
    fn kind(&self) -> &'static str {
        "calibrate"
    }
    fn version(&self) -> u32 {
        1
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
    fn reads(&self, stage: &str, artifact: &str) -> bool {
        self.inputs()
            .iter()
            .any(|a| a.stage == stage && a.file == artifact)
            || (stage == FP32_ONNX.stage
                && artifact.starts_with(&format!("{}_data", FP32_ONNX.file)))
    }
    fn tools(&self) -> BTreeMap<String, String> {
        super::shared::tools()
    }
    fn run(&self, ctx: &StageContext<'_>) -> Result<serde_json::Value, StageError> {
        let tokenizer_path = self.model_stage.file("tokenizer.json").path(ctx)?;
        let tokenizer = tokenizers::Tokenizer::from_file(tokenizer_path)
            .map_err(|e| StageError::failed(format!("cannot load the tokenizer: {e}")))?;
        let config =
            crate::model::ModelConfig::read(self.model_stage.file("config.json").path(ctx)?)
                .map_err(super::shared::model_error)?;
        let eos = crate::model::eos_token_from(
            self.model_stage
                .file("generation_config.json")
                .path(ctx)
                .ok(),
            &config,
        );
        let windows = self.windows(ctx, &tokenizer, config.context(), eos)?;
        if windows.is_empty() {
            return Err(StageError::bad_input(
                "the train split gives no calibration tokens; set `export.calibration = \"none\"`",
            ));
        }
        let source = FP32_ONNX.path(ctx)?;
        let data = data_inputs(ctx, FP32_ONNX);
        let fp32 = external::read(source, |location| {
            data.iter()
                .find(|(name, _)| name == location)
                .map(|(_, p)| p.to_path_buf())
        })
        .map_err(|e| StageError::failed("cannot read the fp32 export").because(e))?;
        let scratch = tempfile::tempdir()
            .map_err(|e| StageError::failed("cannot make a scratch folder").because(e))?;
        let started = std::time::Instant::now();
        let calibration = crate::quant::calibrate::measure(
            fp32,
            &windows,
            scratch.path(),
            Threads::shared(
                std::thread::available_parallelism().map_or(1, |n| n.get()),
                rayon::current_num_threads(),
            ),
            |done, total| ctx.progress(done as u64, total as u64, "calibration windows"),
        )
        .map_err(StageError::failed_from)?;
        let seconds = started.elapsed().as_secs_f64();
        crate::quant::calibrate::save(&calibration, &ctx.output(HESSIANS.file))
            .map_err(StageError::failed_from)?;
        let mut summary = serde_json::json!({
            "windows": windows.len(),
            "tokens": calibration.tokens,
            "inputs": calibration.hessians.len(),
        });
        let mut json = summary.clone();
        json["ids"] = serde_json::to_value(&windows).expect("ids serialise");
        super::shared::write_json(&ctx.output(WINDOWS.file), &json)?;
        summary["seconds"] = seconds.into();
        Ok(summary)
    }
}
