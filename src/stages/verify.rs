//! Stage `reference`: the verification workload (prompts and perplexity
//! windows, as token ids) and candle's side of it (greedy tokens, logits,
//! perplexity), once per model. Stage `verify.<dtype>`: one ONNX file run by
//! ONNX Runtime and compared with that reference of the model it came from;
//! it loads no candle model. A missed tolerance fails the build (exit 3) and
//! the output folder keeps its previous state.

use std::collections::BTreeMap;

use super::corpus::read_documents;
use super::model::write_json;
use crate::dtype::Dtype;
use crate::engine::{FailureClass, Settings, Stage, StageContext, StageError};
use crate::manifest::{RawPrompts, RawTolerance, Verify};
use crate::model;
use crate::verify::{self, Workload, runtime};

/// Tokens of the eval split scored for perplexity (in windows).
const PERPLEXITY_TOKENS: usize = 4096;
/// Longest perplexity window.
const WINDOW: usize = 128;
/// Longest prompt, in tokens.
const PROMPT_TOKENS: usize = 48;
/// candle's logits over the prompts and its greedy tokens (see [`verify::reference`]).
const LOGITS: &str = "logits.f32";

/// The workload and candle's side of it, shared by every `verify.<dtype>`.
pub struct ReferenceStage {
    pub verify: Verify,
    /// The stage whose model folder candle runs: `merge`, `vocab` or `base`.
    pub model_stage: &'static str,
    /// Whether prompts come from the corpus's eval split (else an English sample).
    pub corpus: bool,
}

pub struct VerifyStage {
    pub dtype: Dtype,
    pub verify: Verify,
    name: String,
    file: &'static str,
    tolerance: RawTolerance,
}

impl VerifyStage {
    pub fn new(dtype: Dtype, verify: Verify) -> Self {
        let tolerance = verify::tolerance(dtype, verify.tolerance.get(&dtype));
        VerifyStage {
            dtype,
            verify,
            name: dtype.verify_stage(),
            file: dtype.file_name(),
            tolerance,
        }
    }

    /// The stage that wrote the file, and the file.
    fn source(&self) -> (String, &'static str) {
        (self.dtype.producer_stage(), self.file)
    }
}

impl ReferenceStage {
    /// The prompts and perplexity windows, as token ids.
    fn workload(
        &self,
        ctx: &StageContext<'_>,
        tokenizer: &tokenizers::Tokenizer,
        context: usize,
        eos: Option<u32>,
    ) -> Result<Workload, StageError> {
        let texts: Vec<String> = if self.corpus {
            read_documents(ctx.input("corpus", "eval.jsonl")?)?
                .iter()
                .filter_map(|d| d.texts().first().map(|t| t.to_string()))
                .collect()
        } else {
            super::vocab::ENGLISH_SAMPLE
                .lines()
                .map(str::to_string)
                .collect()
        };
        let encode = |text: &str| -> Result<Vec<u32>, StageError> {
            Ok(tokenizer
                .encode(text, true)
                .map_err(|e| StageError::failed(format!("cannot tokenize a verify prompt: {e}")))?
                .get_ids()
                .to_vec())
        };
        let max_new_tokens = (self.verify.max_new_tokens as usize).min(context.saturating_sub(2));
        let longest = PROMPT_TOKENS.min(context - max_new_tokens).max(1);
        let candidates: Vec<String> = match &self.verify.prompts {
            RawPrompts::List(list) => list.clone(),
            RawPrompts::Count(n) => {
                let usable: Vec<&String> = texts.iter().filter(|t| !t.trim().is_empty()).collect();
                let n = (*n as usize).min(usable.len());
                // Spread through the split rather than its first lines.
                (0..n)
                    .map(|i| usable[i * usable.len() / n].clone())
                    .collect()
            }
        };
        let mut prompts = Vec::new();
        for text in candidates {
            let mut ids = encode(&text)?;
            if ids.is_empty() {
                return Err(StageError::bad_input(format!(
                    "the verify prompt {text:?} encodes to no tokens"
                )));
            }
            ids.truncate(longest);
            let shown = tokenizer.decode(&ids, false).unwrap_or(text);
            prompts.push((shown, ids));
        }
        if prompts.is_empty() {
            return Err(StageError::bad_input(
                "no verify prompts: the eval split is empty; list prompts in `verify.prompts`"
                    .to_string(),
            ));
        }
        // Shortest first (ties in their order): a batch is padded to its
        // longest prompt, so batches of like lengths pad least, in candle and
        // in every `verify.<dtype>` (GPT-2 small's 15 English prompts of 26
        // to 46 tokens: 610 prefill positions instead of 669).
        prompts.sort_by_key(|(_, ids)| ids.len());
        let window = WINDOW.min(context);
        let mut stream = Vec::new();
        for text in &texts {
            if stream.len() >= PERPLEXITY_TOKENS + window {
                break;
            }
            stream.extend(encode(text)?);
            stream.extend(eos);
        }
        let windows = stream
            .chunks(window)
            .filter(|w| w.len() >= 2)
            .take(PERPLEXITY_TOKENS.div_ceil(window))
            .map(<[u32]>::to_vec)
            .collect();
        Ok(Workload {
            prompts,
            windows,
            max_new_tokens,
            eos,
        })
    }
}

pub(super) fn link_or_copy(from: &std::path::Path, to: &std::path::Path) -> Result<(), StageError> {
    if std::fs::hard_link(from, to).is_err() {
        std::fs::copy(from, to)
            .map_err(|e| StageError::failed(format!("cannot copy `{}`: {e}", from.display())))?;
    }
    Ok(())
}

impl Stage for ReferenceStage {
    fn name(&self) -> &str {
        "reference"
    }
    fn kind(&self) -> &'static str {
        "reference"
    }
    fn version(&self) -> u32 {
        // 2: candle's greedy tokens and its logits along them. 3: those
        // logits from its decoding (prefill and cache steps), not a second pass.
        // 4: the prompts shortest first.
        4
    }
    fn settings(&self) -> Settings {
        let mut s = Settings::new();
        s.insert(
            "verify.prompts".into(),
            serde_json::to_value(&self.verify.prompts).expect("prompts serialise"),
        );
        s.insert(
            "verify.max_new_tokens".into(),
            self.verify.max_new_tokens.into(),
        );
        s
    }
    fn dependencies(&self) -> Vec<String> {
        let mut deps = vec![self.model_stage.to_string()];
        if self.corpus {
            deps.push("corpus".to_string());
        }
        deps
    }
    fn tools(&self) -> BTreeMap<String, String> {
        super::model::tools()
    }
    fn run(&self, ctx: &StageContext<'_>) -> Result<serde_json::Value, StageError> {
        let stage = self.model_stage;
        let model = super::model::load_model(ctx, stage)?;
        let tokenizer_path = ctx.input(stage, "tokenizer.json")?;
        let tokenizer = tokenizers::Tokenizer::from_file(tokenizer_path)
            .map_err(|e| StageError::failed(format!("cannot load the tokenizer: {e}")))?;
        let eos = model::eos_token_from(
            ctx.input(stage, "generation_config.json").ok(),
            &model.config(),
        );
        let work = self.workload(ctx, &tokenizer, model.context(), eos)?;
        let (prompts, windows) = (work.prompts.len(), work.windows.len());
        let path = ctx.output(LOGITS);
        let file = std::fs::File::create(&path)
            .map_err(|e| StageError::failed(format!("cannot create `{}`: {e}", path.display())))?;
        let mut logits = std::io::BufWriter::new(file);
        let reference = verify::reference(&model, work, &mut logits, |done, total| {
            ctx.progress(
                done as u64,
                total as u64,
                "prompts and eval windows in candle",
            )
        })
        .map_err(|e| StageError::failed(e.to_string()))?;
        logits
            .into_inner()
            .map_err(|e| e.into_error())
            .and_then(|f| f.sync_all())
            .map_err(|e| StageError::failed(format!("cannot write `{}`: {e}", path.display())))?;
        write_json(
            &ctx.output("reference.json"),
            &serde_json::to_value(&reference).expect("the reference serialises"),
        )?;
        Ok(serde_json::json!({ "prompts": prompts, "windows": windows }))
    }
}

impl Stage for VerifyStage {
    fn name(&self) -> &str {
        &self.name
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
        // its activations over each call.
        6
    }
    fn settings(&self) -> Settings {
        let mut s = Settings::new();
        s.insert("dtype".into(), self.dtype.name().into());
        s.insert(
            format!("verify.tolerance.{}", self.dtype),
            serde_json::to_value(&self.tolerance).expect("tolerance serialises"),
        );
        s
    }
    fn dependencies(&self) -> Vec<String> {
        vec!["reference".to_string(), self.source().0]
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
            model::read_json(ctx.input("reference", "reference.json")?)
                .map_err(super::model::model_error)?;
        let logits_path = ctx.input("reference", LOGITS)?;
        let mut logits =
            std::io::BufReader::new(std::fs::File::open(logits_path).map_err(|e| {
                StageError::failed(format!("cannot open `{}`: {e}", logits_path.display()))
            })?);
        let (source, artifact) = self.source();
        let path = ctx.input(&source, artifact)?;
        // With external data, ONNX Runtime reads the chunks by name beside the
        // model (and refuses symbolic links out of its folder): the cache's
        // blobs are hard-linked under those names, in the cache.
        let data = super::export::data_inputs(ctx, &source, artifact);
        let staging = ctx.checkpoint_dir().join("onnx");
        let path = if data.is_empty() {
            path.to_path_buf()
        } else {
            let _ = std::fs::remove_dir_all(&staging);
            std::fs::create_dir_all(&staging).map_err(|e| {
                StageError::failed(format!("cannot create `{}`: {e}", staging.display()))
            })?;
            for (name, blob) in std::iter::once((artifact.to_string(), path)).chain(data) {
                link_or_copy(blob, &staging.join(name))?;
            }
            staging.join(artifact)
        };
        let path = path.as_path();
        // The cores shared with the stages that run beside this one: the
        // engine runs up to `jobs` at once, and its pool has `jobs` threads.
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        let threads = verify::session::Threads::shared(cores, rayon::current_num_threads());
        let runtime_error =
            |e: runtime::RuntimeError| StageError::failed(format!("{}: {e}", self.file));
        let mut onnx = verify::session::OnnxLm::load(path, threads).map_err(runtime_error)?;
        tracing::debug!("loaded the ONNX file in ONNX Runtime");
        let report = verify::verify(
            &mut onnx,
            &reference,
            &mut logits,
            &self.tolerance,
            verify::Stepping::for_dtype(self.dtype),
            |done, total| ctx.progress(done as u64, total as u64, "prompts and eval windows"),
        )
        .map_err(|e| StageError::failed(format!("{}: {e}", self.file)))?;
        let mut json = serde_json::to_value(&report).expect("report serialises");
        json["dtype"] = self.dtype.name().into();
        json["file"] = format!("onnx/{}", self.file).into();
        json["onnxruntime"] = runtime::identity().into();
        json["tolerance"] = serde_json::to_value(&self.tolerance).expect("tolerance serialises");
        let failures: Vec<_> = report.failures().collect();
        if !failures.is_empty() {
            let overridden = self.verify.tolerance.get(&self.dtype);
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
            return Err(StageError {
                class: FailureClass::Verification,
                message: format!(
                    "onnx/{} (dtype {}) failed verification against candle:\n{}\n  (the output folder was not updated; loosen the bound in `[verify.tolerance.{}]` if this loss is acceptable)",
                    self.file,
                    self.dtype,
                    lines.join("\n"),
                    self.dtype
                ),
            });
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
