//! Stage `reference`: the verification workload (prompts and perplexity
//! windows, as token ids) and candle's answers to it: greedy tokens, the
//! logits along them, the log-likelihood of each window.

use std::collections::BTreeMap;

use super::shared::{
    Artifact, EVAL, ModelStage, REFERENCE_LOGITS, read_documents, write_json, writers,
};
use crate::engine::{Settings, Stage, StageContext, StageError, settings_of, spec_of};
use crate::manifest::RawPrompts;
use crate::model;
use crate::verify::{self, Workload};

/// Tokens of the eval split scored for perplexity (in windows).
const PERPLEXITY_TOKENS: usize = 4096;
/// Longest perplexity window.
const WINDOW: usize = 128;
/// Longest prompt, in tokens.
const PROMPT_TOKENS: usize = 48;

/// The workload and candle's side of it, shared by every `verify.<dtype>`.
/// The stage is its settings.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct ReferenceStage {
    pub verify: ReferenceSettings,
    /// The stage whose model folder candle runs (`merge`, `vocab` or
    /// `base`): its artifacts are keyed by digest.
    #[serde(rename = "@model_stage")]
    pub model_stage: ModelStage,
    /// Whether prompts come from the corpus's eval split (else an English
    /// sample): the eval split is an input, keyed by digest.
    #[serde(rename = "@corpus")]
    pub corpus: bool,
    /// A chat model: prompts are eval conversations rendered with its
    /// template (the folder's `tokenizer_config.json`, keyed by digest).
    #[serde(rename = "@chat", default, skip_serializing_if = "std::ops::Not::not")]
    pub chat: bool,
}

/// What of `[verify]` shapes the workload.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct ReferenceSettings {
    pub prompts: RawPrompts,
    pub max_new_tokens: u64,
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
        if self.chat {
            return self.chat_workload(ctx, tokenizer, context, eos);
        }
        // Each eval document's first text and its completion, if it has one
        // (without a corpus, the English sample's lines).
        let documents: Vec<(String, Option<String>)> = if self.corpus {
            read_documents(EVAL.path(ctx)?)?
                .iter()
                .filter_map(|d| {
                    let completion = match d {
                        super::shared::Document::PromptCompletion { completion, .. } => {
                            Some(completion.clone())
                        }
                        _ => None,
                    };
                    Some((d.texts().first()?.to_string(), completion))
                })
                .collect()
        } else {
            super::shared::ENGLISH_SAMPLE
                .lines()
                .map(|l| (l.to_string(), None))
                .collect()
        };
        let texts: Vec<String> = documents.iter().map(|d| d.0.clone()).collect();
        let encode = |text: &str| -> Result<Vec<u32>, StageError> {
            Ok(tokenizer
                .encode(text, true)
                .map_err(|e| StageError::failed(format!("cannot tokenize a verify prompt: {e}")))?
                .get_ids()
                .to_vec())
        };
        let max_new_tokens = (self.verify.max_new_tokens as usize).min(context.saturating_sub(2));
        let longest = PROMPT_TOKENS.min(context - max_new_tokens).max(1);
        let candidates: Vec<(String, Option<String>)> = match &self.verify.prompts {
            RawPrompts::List(list) => list.iter().map(|p| (p.clone(), None)).collect(),
            RawPrompts::Count(n) => {
                let usable: Vec<(String, Option<String>)> = documents
                    .into_iter()
                    .filter(|d| !d.0.trim().is_empty())
                    .collect();
                let n = (*n as usize).min(usable.len());
                // Spread through the split rather than its first lines.
                (0..n)
                    .map(|i| usable[i * usable.len() / n].clone())
                    .collect()
            }
        };
        let mut prompts = Vec::new();
        let mut expected = Vec::new();
        for (text, completion) in candidates {
            expected.push(completion);
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
        let stream = super::shared::token_stream(
            texts.iter().map(|t| t.as_str().into()),
            tokenizer,
            true,
            eos,
            PERPLEXITY_TOKENS + WINDOW.min(context),
        )?;
        Ok(workload(
            prompts,
            expected,
            &stream,
            context,
            max_new_tokens,
            eos,
        ))
    }
}

impl ReferenceStage {
    /// A chat model's workload: each eval conversation up to its last
    /// assistant turn, rendered with the generation prompt, is a prompt (its
    /// last tokens when long: the turn header must stay); the whole
    /// conversations give the perplexity windows.
    fn chat_workload(
        &self,
        ctx: &StageContext<'_>,
        tokenizer: &tokenizers::Tokenizer,
        context: usize,
        eos: Option<u32>,
    ) -> Result<Workload, StageError> {
        let config: serde_json::Value =
            crate::model::read_json(self.model_stage.file("tokenizer_config.json").path(ctx)?)
                .map_err(super::shared::model_error)?;
        let (template, render) = crate::chat::config_template(&config, None)
            .ok()
            .flatten()
            .ok_or_else(|| StageError::failed("the chat model's folder has no chat template"))?;
        let whole = crate::chat::Render {
            add_generation_prompt: false,
            ..render.clone()
        };
        let encode = |text: &str| -> Result<Vec<u32>, StageError> {
            Ok(tokenizer
                .encode(text, false)
                .map_err(|e| StageError::failed(format!("cannot tokenize a verify prompt: {e}")))?
                .get_ids()
                .to_vec())
        };
        let conversations: Vec<Vec<crate::chat::Message>> = if self.corpus {
            read_documents(EVAL.path(ctx)?)?
                .iter()
                .filter_map(super::shared::Document::conversation)
                .collect()
        } else {
            Vec::new()
        };
        let max_new_tokens = (self.verify.max_new_tokens as usize).min(context.saturating_sub(2));
        let longest = PROMPT_TOKENS.min(context - max_new_tokens).max(1);
        // Each prompt's messages, and the eval conversation's reply.
        let asked: Vec<(Vec<crate::chat::Message>, Option<String>)> = match &self.verify.prompts {
            RawPrompts::List(list) => list
                .iter()
                .map(|p| (vec![crate::chat::Message::new("user", p)], None))
                .collect(),
            RawPrompts::Count(n) => {
                let usable: Vec<(Vec<crate::chat::Message>, Option<String>)> = conversations
                    .iter()
                    .filter_map(|c| {
                        let last = c.iter().rposition(|m| m.role == "assistant")?;
                        (last > 0).then(|| (c[..last].to_vec(), Some(c[last].content.clone())))
                    })
                    .collect();
                let n = (*n as usize).min(usable.len());
                (0..n)
                    .map(|i| usable[i * usable.len() / n].clone())
                    .collect()
            }
        };
        let mut prompts = Vec::new();
        let mut expected = Vec::new();
        for (messages, reply) in asked {
            expected.push(reply);
            let text = template
                .render(&messages, &render)
                .map_err(|e| StageError::bad_input(format!("`chat.template`: {e}")))?;
            let mut ids = encode(&text)?;
            if ids.len() > longest {
                ids.drain(..ids.len() - longest);
            }
            let shown = tokenizer.decode(&ids, false).unwrap_or(text);
            prompts.push((shown, ids));
        }
        if prompts.is_empty() {
            return Err(StageError::bad_input(
                "no verify prompts: no eval conversation has an assistant turn; list prompts in \
                `verify.prompts`",
            ));
        }
        let stream = super::shared::token_stream(
            conversations
                .iter()
                .filter_map(|m| template.render(m, &whole).ok().map(Into::into)),
            tokenizer,
            false,
            None,
            PERPLEXITY_TOKENS + WINDOW.min(context),
        )?;
        Ok(workload(
            prompts,
            expected,
            &stream,
            context,
            max_new_tokens,
            eos,
        ))
    }
}

/// The workload of `prompts` (each with the eval data's reply, if any) and
/// of perplexity windows cut from `stream`.
fn workload(
    prompts: Vec<(String, Vec<u32>)>,
    expected: Vec<Option<String>>,
    stream: &[u32],
    context: usize,
    max_new_tokens: usize,
    eos: Option<u32>,
) -> Workload {
    // Shortest first (ties in their order): a batch is padded to its
    // longest prompt, so batches of like lengths pad least, in candle and
    // in every `verify.<dtype>` (GPT-2 small's 15 English prompts of 26
    // to 46 tokens: 610 prefill positions instead of 669).
    let mut paired: Vec<_> = prompts.into_iter().zip(expected).collect();
    paired.sort_by_key(|((_, ids), _)| ids.len());
    let (prompts, expected): (Vec<_>, Vec<_>) = paired.into_iter().unzip();
    // No reply at all: none recorded.
    let expected = if expected.iter().all(Option::is_none) {
        Vec::new()
    } else {
        expected
    };
    let window = WINDOW.min(context);
    let windows = stream
        .chunks(window)
        .filter(|w| w.len() >= 2)
        .take(PERPLEXITY_TOKENS.div_ceil(window))
        .map(<[u32]>::to_vec)
        .collect();
    Workload {
        prompts,
        expected,
        windows,
        max_new_tokens,
        eos,
    }
}

impl ReferenceStage {
    /// What it reads: the model, and the eval split for its prompts.
    fn inputs(&self) -> Vec<Artifact> {
        let mut inputs = self.model_stage.model().to_vec();
        if self.corpus {
            inputs.push(EVAL);
        }
        if self.chat {
            inputs.push(self.model_stage.file("tokenizer_config.json"));
        }
        inputs
    }
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
        // 4: the prompts shortest first. 5: warnings.json; the eval data's
        // replies.
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
    fn tools(&self) -> BTreeMap<String, String> {
        super::shared::tools()
    }
    fn run(&self, ctx: &StageContext<'_>) -> Result<serde_json::Value, StageError> {
        let model = super::shared::load_model(ctx, self.model_stage)?;
        let tokenizer_path = self.model_stage.file("tokenizer.json").path(ctx)?;
        let tokenizer = tokenizers::Tokenizer::from_file(tokenizer_path)
            .map_err(|e| StageError::failed(format!("cannot load the tokenizer: {e}")))?;
        let eos = model::eos_token_from(
            self.model_stage
                .file("generation_config.json")
                .path(ctx)
                .ok(),
            &model.config(),
        );
        let work = self.workload(ctx, &tokenizer, model.context(), eos)?;
        let (prompts, windows) = (work.prompts.len(), work.windows.len());
        let path = ctx.output(REFERENCE_LOGITS.file);
        let file = std::fs::File::create(&path).map_err(|e| {
            StageError::failed(format!("cannot create `{}`", path.display())).because(e)
        })?;
        let mut logits = std::io::BufWriter::new(file);
        let reference = verify::reference(&model, work, &mut logits, |done, total| {
            ctx.progress(
                done as u64,
                total as u64,
                "prompts and eval windows in candle",
            )
        })
        .map_err(StageError::failed_from)?;
        logits
            .into_inner()
            .map_err(|e| e.into_error())
            .and_then(|f| f.sync_all())
            .map_err(|e| {
                StageError::failed(format!("cannot write `{}`", path.display())).because(e)
            })?;
        let continuations: Vec<(String, String, Vec<u32>)> = reference
            .workload
            .prompts
            .iter()
            .zip(&reference.greedy)
            .map(|((shown, _), greedy)| {
                let tokens: Vec<u32> = greedy
                    .iter()
                    .copied()
                    .filter(|&t| Some(t) != reference.workload.eos)
                    .collect();
                let text = tokenizer.decode(&tokens, true).unwrap_or_default();
                (shown.clone(), text, tokens)
            })
            .collect();
        if let Some(f) = model::health::repetition(&continuations) {
            ctx.warn(f.code, f.message, f.help);
        }
        super::shared::write_warnings(ctx)?;
        write_json(
            &ctx.output("reference.json"),
            &serde_json::to_value(&reference).expect("the reference serialises"),
        )?;
        Ok(serde_json::json!({ "prompts": prompts, "windows": windows }))
    }
}
