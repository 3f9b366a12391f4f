//! Stage `finetune`: trains the model on the corpus (LoRA or all weights)
//! and writes a PEFT adapter or the full weights, `metrics.json` and
//! `loss.svg`.

use std::collections::BTreeMap;
use std::path::Path;

use super::shared::{
    Artifact, ChatSpec, Document, EVAL, ModelStage, NEW_TOKENS, TRAIN, io, load_base, model_error,
    read_documents, write_json, writers,
};
use crate::engine::{Settings, Stage, StageContext, StageError, settings_of, spec_of};
use crate::manifest::{Chat, Finetune, FinetuneMethod, TrainOn};
use crate::model::lora::LoraSpec;
use crate::model::trainer::{
    Block, Keep, Masked, Method, Progress, Schedule, TrainConfig, pack, pack_sequences, train,
};
use crate::model::{self, ModelConfig, lora};

/// The stage is its settings.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct FinetuneStage {
    pub finetune: FinetuneSettings,
    /// With LoRA: the base the adapter names (`base_model_name_or_path`),
    /// keyed as `base.model`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base: Option<AdapterBase>,
    /// The stage whose model it trains (`base`, or `vocab` when one grew
    /// it): its artifacts are keyed by digest.
    #[serde(rename = "@model_stage")]
    pub model_stage: ModelStage,
    /// With conversations: the template they are rendered with and what trains.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub chat: Option<Chat>,
}

/// What the adapter names as its base: the Hub id. A local folder is named
/// by its config's `_name_or_path` (what transformers saved it from) when
/// that is not a path of a machine.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct AdapterBase {
    pub model: Option<String>,
}

/// What of `[finetune]` shapes the adapter or the weights: LoRA's settings
/// only with LoRA, `train_new_tokens` only where it applies (LoRA after a
/// `vocab` stage).
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct FinetuneSettings {
    pub method: FinetuneMethod,
    #[serde(flatten, default, skip_serializing_if = "Option::is_none")]
    pub lora: Option<LoraSettings>,
    pub learning_rate: f64,
    pub weight_decay: f64,
    pub max_grad_norm: f64,
    pub schedule: Schedule,
    pub warmup_steps: u64,
    pub batch_size: u64,
    pub block_size: u64,
    pub epochs: u64,
    pub gradient_accumulation: u64,
    pub eval_every: u64,
    pub checkpoint_every: u64,
    pub seed: u64,
    pub max_steps: Option<u64>,
    pub early_stopping_patience: Option<u64>,
    pub keep: Keep,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub train_new_tokens: bool,
}

/// `[finetune]`'s LoRA settings.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct LoraSettings {
    pub rank: u64,
    pub alpha: f64,
    pub dropout: f64,
    pub rslora: bool,
    pub targets: Vec<String>,
}

impl FinetuneStage {
    /// The stage for `[finetune]`, training the model of `model_stage`.
    pub fn new(
        f: &Finetune,
        model_stage: ModelStage,
        base_name: Option<String>,
        chat: Option<Chat>,
    ) -> Self {
        let lora = f.method == FinetuneMethod::Lora;
        FinetuneStage {
            finetune: FinetuneSettings {
                method: f.method,
                lora: lora.then(|| LoraSettings {
                    rank: f.rank,
                    alpha: f.alpha,
                    dropout: f.dropout,
                    rslora: f.rslora,
                    targets: f.targets.clone(),
                }),
                learning_rate: f.learning_rate,
                weight_decay: f.weight_decay,
                max_grad_norm: f.max_grad_norm,
                schedule: f.schedule,
                warmup_steps: f.warmup_steps,
                batch_size: f.batch_size,
                block_size: f.block_size,
                epochs: f.epochs,
                gradient_accumulation: f.gradient_accumulation,
                eval_every: f.eval_every,
                checkpoint_every: f.checkpoint_every,
                seed: f.seed,
                max_steps: f.max_steps,
                early_stopping_patience: f.early_stopping_patience,
                keep: f.keep,
                train_new_tokens: lora && model_stage == ModelStage::Vocab && f.train_new_tokens,
            },
            base: lora.then_some(AdapterBase { model: base_name }),
            model_stage,
            chat,
        }
    }

    fn train_config(&self, trainable_tokens: Vec<u32>) -> TrainConfig {
        let f = &self.finetune;
        let method = match &f.lora {
            None => Method::Full,
            Some(l) => Method::Lora {
                spec: LoraSpec {
                    targets: l.targets.clone(),
                    rank: l.rank as usize,
                    alpha: l.alpha,
                    rslora: l.rslora,
                },
                dropout: l.dropout,
            },
        };
        TrainConfig {
            method,
            learning_rate: f.learning_rate,
            weight_decay: f.weight_decay,
            schedule: f.schedule,
            warmup_steps: f.warmup_steps as usize,
            batch_size: f.batch_size as usize,
            block_size: f.block_size as usize,
            epochs: f.epochs as usize,
            max_steps: f.max_steps.map(|s| s as usize),
            gradient_accumulation: f.gradient_accumulation as usize,
            max_grad_norm: f.max_grad_norm,
            eval_every: f.eval_every as usize,
            early_stopping_patience: f.early_stopping_patience.map(|p| p as usize),
            keep: f.keep,
            checkpoint_every: f.checkpoint_every as usize,
            seed: f.seed,
            trainable_tokens,
        }
    }
}

/// The LoRA targets for a model of `family`: the family's defaults when the
/// manifest names none, and an error naming the setting when it names a
/// layer the family does not have.
fn check_targets(family: model::Family, targets: &mut Vec<String>) -> Result<(), StageError> {
    if targets.is_empty() {
        *targets = family
            .default_lora_targets()
            .iter()
            .map(|t| t.to_string())
            .collect();
    }
    let known = family.lora_targets();
    if let Some(bad) = targets.iter().find(|t| !known.contains(&t.as_str())) {
        return Err(StageError::bad_input(format!(
            "`finetune.targets`: `{bad}` is not a layer of a {family} model; {family} has {}",
            known.join(", ")
        )));
    }
    Ok(())
}

fn tokenize(
    tokenizer: &tokenizers::Tokenizer,
    docs: &[Document],
) -> Result<Vec<Vec<u32>>, StageError> {
    let texts: Vec<String> = docs
        .iter()
        .map(|d| match d {
            Document::Text { text } => text.clone(),
            Document::PromptCompletion { prompt, completion } => format!("{prompt}\n{completion}"),
            // Conversations are rendered with the chat template (`chat_blocks`).
            Document::Chat { messages, .. } => messages
                .iter()
                .map(|m| m.content.as_str())
                .collect::<Vec<_>>()
                .join("\n"),
        })
        .collect();
    // With the tokenizer's special tokens (a SentencePiece `<s>`), as
    // transformers encodes text by default.
    let encodings = tokenizer
        .encode_batch(texts, true)
        .map_err(|e| StageError::failed(format!("cannot tokenize the corpus: {e}")))?;
    Ok(encodings
        .into_iter()
        .map(|e| e.get_ids().to_vec())
        .collect())
}

impl FinetuneStage {
    /// What it reads: the corpus and the model (and the new tokens' ids).
    fn inputs(&self) -> Vec<Artifact> {
        let mut inputs = vec![TRAIN, EVAL];
        inputs.extend(self.model_stage.model());
        if self.finetune.train_new_tokens {
            inputs.push(NEW_TOKENS);
        }
        inputs
    }
}

impl Stage for FinetuneStage {
    fn name(&self) -> &str {
        "finetune"
    }
    fn kind(&self) -> &'static str {
        "finetune"
    }
    fn version(&self) -> u32 {
        // 3: the adapter names its base; safetensors carry `{"format": "pt"}`.
        // 4: the loss plot has axes, ticks, a grid and a legend. 5: `keep`;
        // warnings.json.
        5
    }
    fn settings(&self) -> Settings {
        settings_of(self)
    }
    fn dependencies(&self) -> Vec<String> {
        writers(&self.inputs())
    }
    fn spec(&self) -> Option<serde_json::Value> {
        spec_of(self)
    }
    fn publishes(&self) -> Vec<(String, String)> {
        let mut files = vec![
            (
                "metrics.json".to_string(),
                "training/metrics.json".to_string(),
            ),
            ("loss.svg".to_string(), "training/loss.svg".to_string()),
        ];
        if self.finetune.method == FinetuneMethod::Lora {
            for file in ["adapter_config.json", "adapter_model.safetensors"] {
                files.push((file.to_string(), format!("adapter/{file}")));
            }
        }
        files
    }
    fn tools(&self) -> BTreeMap<String, String> {
        super::shared::tools()
    }
    fn run(&self, ctx: &StageContext<'_>) -> Result<serde_json::Value, StageError> {
        self.check_memory(ctx)?;
        let (model, tokenizer) = load_base(ctx, self.model_stage)?;
        let trainable_tokens = if self.finetune.train_new_tokens {
            super::shared::read_new_tokens(NEW_TOKENS.path(ctx)?)?
        } else {
            Vec::new()
        };
        let config = self.train_config(trainable_tokens);
        if config.block_size > model.context() {
            return Err(StageError::bad_input(format!(
                "`finetune.block_size` = {} is longer than the base model's context ({} positions)",
                config.block_size,
                model.context()
            )));
        }
        let mut config = config;
        if let Method::Lora { spec, .. } = &mut config.method {
            check_targets(model.family(), &mut spec.targets)?;
            if spec.rank > model.width() {
                return Err(StageError::bad_input(format!(
                    "`finetune.rank` = {} is larger than the base model's width ({})",
                    spec.rank,
                    model.width()
                )));
            }
        }
        let base_name = self
            .base
            .as_ref()
            .and_then(|b| b.model.clone())
            .or_else(|| {
                let config: serde_json::Value =
                    model::read_json(self.model_stage.file("config.json").path(ctx).ok()?).ok()?;
                config["_name_or_path"]
                    .as_str()
                    .filter(|n| !n.is_empty() && !Path::new(n).is_absolute() && !n.starts_with('.'))
                    .map(str::to_string)
            });
        let separator = model.config().eos_token_id();
        let train_docs = read_documents(TRAIN.path(ctx)?)?;
        let eval_docs = read_documents(EVAL.path(ctx)?)?;
        let mut counts = serde_json::Map::new();
        // The eval split's tokens before packing (a split shorter than a
        // block packs to none).
        let mut eval_tokens = 0;
        let (train_blocks, eval_blocks) = match &self.chat {
            None => {
                let eval = tokenize(&tokenizer, &eval_docs)?;
                eval_tokens = eval.iter().map(|d| d.len() + 1).sum();
                (
                    pack(
                        &tokenize(&tokenizer, &train_docs)?,
                        separator,
                        config.block_size,
                    ),
                    pack(&eval, separator, config.block_size),
                )
            }
            Some(chat) => {
                let spec = ChatSpec::resolve(ctx, self.model_stage, chat, &tokenizer)?;
                let mut blocks = Vec::new();
                for (split, docs) in [("train", &train_docs), ("eval", &eval_docs)] {
                    let (sequences, count) =
                        conversations(&spec, chat.train_on, &tokenizer, docs, config.block_size)?;
                    if split == "train" && sequences.is_empty() {
                        return Err(StageError::bad_input(match chat.train_on {
                            TrainOn::Assistant => format!(
                                "`chat.train_on` = \"assistant\", but none of the {} \
                                conversations of the train split has an assistant turn to train \
                                on; add the replies, or set `chat.train_on = \"all\"`",
                                count.conversations
                            ),
                            TrainOn::All => {
                                "the train split has no conversation to train on".into()
                            }
                        }));
                    }
                    if let Some(note) = count.note(split, config.block_size) {
                        ctx.note(&note);
                    }
                    if split == "eval" {
                        eval_tokens = sequences.iter().map(|s| s.ids.len()).sum();
                    }
                    counts.insert(split.into(), serde_json::to_value(&count).expect("counts"));
                    blocks.push(pack_sequences(&sequences, config.block_size));
                }
                let eval = blocks.pop().expect("two splits");
                (blocks.pop().expect("two splits"), eval)
            }
        };
        let unigram_loss =
            model::health::unigram_loss(&train_blocks, &eval_blocks, model.vocab_size());
        let started = std::time::Instant::now();
        let noted = std::cell::Cell::new(false);
        let trained = train(
            model,
            &config,
            &train_blocks,
            &eval_blocks,
            Some(ctx.checkpoint_dir()),
            |p: &Progress<'_>| {
                if p.resumed_from > 0 && !noted.replace(true) {
                    ctx.note(&format!(
                        "resumed from step {} of {} (a checkpoint of an interrupted build)",
                        p.resumed_from, p.total_steps
                    ));
                }
                let fields = [
                    ("loss", p.loss),
                    ("tokens_per_second", p.tokens_per_second),
                    ("eta_s", p.eta_seconds),
                ];
                ctx.progress_with(
                    p.step as u64,
                    p.total_steps as u64,
                    &format!(
                        "loss {:.3}, {:.0} tokens/s, ETA {:.0}s",
                        p.loss, p.tokens_per_second, p.eta_seconds
                    ),
                    &fields,
                );
            },
        )
        .map_err(model_error)?;
        let seconds = started.elapsed().as_secs_f64();
        match (&config.method, &trained.lora) {
            (Method::Lora { spec, dropout }, Some(lora)) => {
                write_json(
                    &ctx.output("adapter_config.json"),
                    &lora::peft_config(
                        trained.model.family(),
                        base_name.as_deref(),
                        spec,
                        *dropout,
                        &config.trainable_tokens,
                        &lora.token_modules(),
                    ),
                )?;
                model::save_safetensors(
                    &lora.peft_tensors(),
                    &ctx.output("adapter_model.safetensors"),
                )
                .map_err(model_error)?;
            }
            _ => model::save_safetensors(
                &trained.model.named_tensors(),
                &ctx.output("model.safetensors"),
            )
            .map_err(model_error)?,
        }
        let m = &trained.metrics;
        let trained_tokens = train_blocks.iter().map(Block::trained).sum::<usize>();
        let findings = model::health::findings(&model::health::Run {
            train_tokens: trained_tokens,
            train_documents: train_docs.len(),
            eval_tokens,
            eval_blocks: eval_blocks.len(),
            block_size: config.block_size,
            lora: self.finetune.lora.is_some(),
            keep: self.finetune.keep,
            metrics: m,
            unigram_loss,
        });
        for f in &findings {
            ctx.warn(f.code, &f.message, &f.help);
        }
        let first = m.eval_loss.first().map(|e| e.1);
        // The loss of the weights the run ended with.
        let last = m.kept.map(|k| k.1).or(m.eval_loss.last().map(|e| e.1));
        // The artifact holds only what the seed determines; timings and
        // whether the run resumed go to the record's metrics.
        let metrics = serde_json::json!({
            "steps": m.steps,
            "total_steps": m.total_steps,
            "tokens": m.tokens,
            "train_blocks": train_blocks.len(),
            "eval_blocks": eval_blocks.len(),
            "trained_tokens": trained_tokens,
            "trainable_parameters": m.trainable_parameters,
            "keep": self.finetune.keep,
            "kept_step": m.kept.map(|k| k.0),
            "unigram_eval_loss": unigram_loss,
            "initial_eval_loss": first,
            "final_eval_loss": last,
            "initial_perplexity": first.map(f64::exp),
            "final_perplexity": last.map(f64::exp),
            "stopped_early": m.stopped_early,
            "train_loss": m.train_loss,
            "eval_loss": m.eval_loss,
        });
        super::shared::write_warnings(ctx)?;
        let mut metrics = metrics;
        if !counts.is_empty() {
            metrics["conversations"] = counts.into();
        }
        write_json(&ctx.output("metrics.json"), &metrics)?;
        std::fs::write(
            ctx.output("loss.svg"),
            loss_svg(&m.train_loss, &m.eval_loss),
        )
        .map_err(|e| io(&ctx.output("loss.svg"), e))?;
        let mut summary = metrics;
        let object = summary.as_object_mut().expect("an object");
        object.retain(|k, _| k != "train_loss" && k != "eval_loss");
        object.insert("resumed_from_step".into(), m.resumed_from.into());
        object.insert("seconds_this_run".into(), seconds.into());
        object.insert(
            "tokens_per_second".into(),
            (trained.tokens_this_run as f64 / seconds.max(1e-9)).into(),
        );
        Ok(summary)
    }
}

/// What became of a split's conversations.
#[derive(Debug, Default, serde::Serialize)]
struct ConversationCounts {
    conversations: usize,
    /// Trained as they are.
    kept: usize,
    /// Without an assistant turn (with `train_on = "assistant"`): skipped.
    no_assistant_turn: usize,
    /// Longer than a block: cut to `block_size + 1` tokens, later turns lost.
    truncated: usize,
    /// Longer than a block, with nothing to train in the part that fits: skipped.
    skipped_too_long: usize,
}

impl ConversationCounts {
    /// The build's note, when a conversation did not train whole.
    fn note(&self, split: &str, block_size: usize) -> Option<String> {
        let mut parts = Vec::new();
        if self.no_assistant_turn > 0 {
            parts.push(format!(
                "{} without an assistant turn were skipped (nothing to train on)",
                self.no_assistant_turn
            ));
        }
        if self.truncated > 0 {
            parts.push(format!(
                "{} longer than `finetune.block_size` = {block_size} tokens were truncated to it \
                (their later turns do not count)",
                self.truncated
            ));
        }
        if self.skipped_too_long > 0 {
            parts.push(format!(
                "{} were skipped: nothing they train fits in {block_size} tokens",
                self.skipped_too_long
            ));
        }
        (!parts.is_empty()).then(|| {
            format!(
                "{split} split, {} conversations: {}",
                self.conversations,
                parts.join("; ")
            )
        })
    }
}

/// The documents as conversations rendered with the chat template and
/// tokenized, each token marked trained when it overlaps a trained span of
/// the text (as transformers' `return_assistant_tokens_mask` marks them):
/// the assistant turns with `train_on = "assistant"`, else all of it.
fn conversations(
    spec: &ChatSpec,
    train_on: TrainOn,
    tokenizer: &tokenizers::Tokenizer,
    docs: &[Document],
    block_size: usize,
) -> Result<(Vec<Masked>, ConversationCounts), StageError> {
    let mut count = ConversationCounts::default();
    let mut sequences = Vec::new();
    for (n, doc) in docs.iter().enumerate() {
        let at = || {
            doc.at()
                .map_or_else(|| format!("document {}", n + 1), |a| format!("`{a}`"))
        };
        let Some(messages) = doc.conversation() else {
            return Err(StageError::bad_input(format!(
                "{}: plain text in a chat corpus; every record must be a conversation (or a \
                prompt/completion pair)",
                at()
            )));
        };
        count.conversations += 1;
        let refused = |e: crate::chat::ChatError| StageError::bad_input(format!("{}: {e}", at()));
        let (text, spans) = match train_on {
            TrainOn::Assistant => {
                let rendered = spec
                    .template
                    .render_for_training(&messages, &spec.render, &spec.end_of_turn)
                    .map_err(refused)?;
                (rendered.text, rendered.assistant)
            }
            TrainOn::All => {
                let text = spec
                    .template
                    .render(&messages, &spec.render)
                    .map_err(refused)?;
                let all = 0..text.len();
                (text, vec![all])
            }
        };
        if spans.is_empty() {
            count.no_assistant_turn += 1;
            continue;
        }
        // As apply_chat_template tokenizes: the template writes any BOS itself.
        let encoding = tokenizer
            .encode(text.as_str(), false)
            .map_err(|e| StageError::failed(format!("cannot tokenize a conversation: {e}")))?;
        let mut ids = encoding.get_ids().to_vec();
        let mut trained: Vec<bool> = encoding
            .get_offsets()
            .iter()
            .map(|&(start, end)| {
                end > start && spans.iter().any(|s| start < s.end && end > s.start)
            })
            .collect();
        if ids.len() > block_size + 1 {
            ids.truncate(block_size + 1);
            trained.truncate(block_size + 1);
            if !trained[1..].contains(&true) {
                count.skipped_too_long += 1;
                continue;
            }
            count.truncated += 1;
        } else if ids.len() < 2 || !trained[1..].contains(&true) {
            count.no_assistant_turn += 1;
            continue;
        } else {
            count.kept += 1;
        }
        sequences.push(Masked { ids, trained });
    }
    Ok((sequences, count))
}

/// Round tick positions covering `lo..=hi`: steps of 1, 2 or 5 times a
/// power of ten, about `count` of them.
fn ticks(lo: f64, hi: f64, count: usize) -> Vec<f64> {
    let raw = (hi - lo) / count.max(1) as f64;
    if !(raw > 0.0 && raw.is_finite()) {
        return vec![lo];
    }
    let magnitude = 10f64.powf(raw.log10().floor());
    let multiple = [1.0, 2.0, 5.0, 10.0]
        .into_iter()
        .find(|m| m * magnitude >= raw)
        .unwrap_or(10.0);
    let step = multiple * magnitude;
    let first = (lo / step).ceil() as i64;
    let last = (hi / step).floor() as i64;
    // i·multiple·10^e, divided rather than multiplied for e < 0 so that the
    // values are the round decimals (2.4, not 2.4000000000000004).
    let value = |i: i64| {
        if magnitude < 1.0 {
            i as f64 * multiple / (1.0 / magnitude).round()
        } else {
            i as f64 * multiple * magnitude
        }
    };
    (first..=last).map(value).collect()
}

/// The loss curves as a small standalone SVG: training loss per step (a
/// line) and eval loss (dots), on axes with ticks, a grid and labels.
pub fn loss_svg(train: &[(usize, f64)], eval: &[(usize, f64)]) -> String {
    use std::fmt::Write;
    let (width, height) = (640.0, 360.0);
    let (left, right, top, bottom) = (56.0, 16.0, 36.0, 44.0);
    let max_step = train
        .iter()
        .chain(eval)
        .map(|p| p.0)
        .max()
        .unwrap_or(1)
        .max(1) as f64;
    let values = train
        .iter()
        .chain(eval)
        .map(|p| p.1)
        .filter(|v| v.is_finite());
    let (lo, hi) = values.fold((f64::MAX, f64::MIN), |(lo, hi), v| (lo.min(v), hi.max(v)));
    let (lo, hi) = if lo < hi {
        (lo, hi)
    } else if lo <= hi {
        (lo - 1.0, lo + 1.0)
    } else {
        (0.0, 1.0)
    };
    let margin = (hi - lo) * 0.05;
    let (lo, hi) = (lo - margin, hi + margin);
    let x = |step: f64| left + step / max_step * (width - left - right);
    let y = |v: f64| height - bottom - (v - lo) / (hi - lo) * (height - top - bottom);
    let mut svg = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" viewBox=\"0 0 {width} {height}\" \
            width=\"{width}\" height=\"{height}\" font-family=\"sans-serif\" \
            font-size=\"12\"><rect width=\"100%\" height=\"100%\" fill=\"white\"/>"
    );
    // Grid and ticks.
    let digits = if hi - lo < 0.5 { 3 } else { 2 };
    for v in ticks(lo, hi, 5) {
        let _ = write!(
            svg,
            "<line x1=\"{left}\" x2=\"{:.1}\" y1=\"{:.1}\" y2=\"{:.1}\" stroke=\"#e5e5e5\"/><text \
                x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"end\">{v:.digits$}</text>",
            width - right,
            y(v),
            y(v),
            left - 6.0,
            y(v) + 4.0
        );
    }
    for s in ticks(0.0, max_step, 6)
        .into_iter()
        .filter(|s| s.fract() == 0.0)
    {
        let _ = write!(
            svg,
            "<line x1=\"{:.1}\" x2=\"{:.1}\" y1=\"{top}\" y2=\"{:.1}\" stroke=\"#e5e5e5\"/><text \
                x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"middle\">{s}</text>",
            x(s),
            x(s),
            height - bottom,
            x(s),
            height - bottom + 16.0
        );
    }
    // Axes and their labels.
    let _ = write!(
        svg,
        "<line x1=\"{left}\" x2=\"{left}\" y1=\"{top}\" y2=\"{:.1}\" stroke=\"#333\"/><line x1=\"{left}\" x2=\"{:.1}\" y1=\"{:.1}\" y2=\"{:.1}\" stroke=\"#333\"/>\
<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"middle\">step</text><text transform=\"rotate(-90)\" \
    x=\"{:.1}\" y=\"14\" text-anchor=\"middle\">loss (nats per token)</text>",
        height - bottom,
        width - right,
        height - bottom,
        height - bottom,
        (left + width - right) / 2.0,
        height - 8.0,
        -(top + height - bottom) / 2.0,
    );
    // The curves.
    let line: Vec<String> = train
        .iter()
        .filter(|p| p.1.is_finite())
        .map(|&(s, v)| format!("{:.1},{:.1}", x(s as f64), y(v)))
        .collect();
    let _ = write!(
        svg,
        "<polyline fill=\"none\" stroke=\"#00798c\" stroke-width=\"1.5\" points=\"{}\"/>",
        line.join(" ")
    );
    for &(s, v) in eval.iter().filter(|p| p.1.is_finite()) {
        let _ = write!(
            svg,
            "<circle cx=\"{:.1}\" cy=\"{:.1}\" r=\"4\" fill=\"#d1495b\"/>",
            x(s as f64),
            y(v)
        );
    }
    // The legend.
    let _ = writeln!(
        svg,
        "<line x1=\"{left}\" x2=\"{:.1}\" y1=\"18\" y2=\"18\" stroke=\"#00798c\" \
            stroke-width=\"2\"/><text x=\"{:.1}\" y=\"22\">training loss</text><circle \
            cx=\"{:.1}\" cy=\"18\" r=\"4\" fill=\"#d1495b\"/><text x=\"{:.1}\" y=\"22\">eval \
            loss</text></svg>",
        left + 20.0,
        left + 26.0,
        left + 130.0,
        left + 140.0
    );
    svg
}

impl FinetuneStage {
    /// Refuses a training that cannot fit in memory before the model is
    /// loaded: the weights, the optimizer's state (AdamW: a gradient and two
    /// moments per trained parameter) and, at the least, each layer's
    /// activations and the logits of one batch.
    fn check_memory(&self, ctx: &StageContext<'_>) -> Result<(), StageError> {
        let config = ModelConfig::read(self.model_stage.file("config.json").path(ctx)?)
            .map_err(model_error)?;
        let f = &self.finetune;
        let parameters = config.parameters();
        let trained = if f.method == FinetuneMethod::Lora {
            0
        } else {
            parameters
        };
        let tokens = f.batch_size as u128 * f.block_size as u128;
        let activations = tokens
            * (config.n_layer() as u128 * config.width() as u128 * 8
                + config.vocab_size() as u128 * 3);
        let needed = (parameters + 3 * trained + activations) * 4;
        let fix = if f.method == FinetuneMethod::Lora {
            "lower `finetune.batch_size` or `finetune.block_size` (or choose a smaller base)"
        } else {
            "lower `finetune.batch_size` or `finetune.block_size`, or train with `finetune.method = \"lora\"`"
        };
        model::check_memory(
            needed,
            &format!(
                "training {parameters} parameters on batches of {} x {} tokens",
                f.batch_size, f.block_size
            ),
            fix,
        )
        .map_err(model_error)
    }
}

#[cfg(test)]
mod svg_tests {
    use super::*;

    #[test]
    fn ticks_are_round_and_cover_the_range() {
        assert_eq!(
            ticks(0.0, 100.0, 5),
            vec![0.0, 20.0, 40.0, 60.0, 80.0, 100.0]
        );
        assert_eq!(ticks(2.31, 3.07, 5), vec![2.4, 2.6, 2.8, 3.0]);
        assert_eq!(ticks(0.0, 7.0, 6), vec![0.0, 2.0, 4.0, 6.0]);
    }

    #[test]
    fn the_loss_plot_has_axes_ticks_grid_labels_and_a_legend() {
        let train: Vec<(usize, f64)> = (1..=40).map(|s| (s, 5.0 - s as f64 * 0.05)).collect();
        let svg = loss_svg(&train, &[(0, 5.1), (20, 4.1), (40, 3.2)]);
        assert!(svg.contains(">step</text>") && svg.contains(">loss (nats per token)</text>"));
        assert!(svg.contains(">training loss</text>") && svg.contains(">eval loss</text>"));
        assert!(
            svg.contains(">40</text>") && svg.contains(">3.50</text>"),
            "{svg}"
        );
        assert_eq!(
            svg.matches("<circle").count(),
            4,
            "three eval points and the legend's"
        );
        assert!(svg.matches("stroke=\"#e5e5e5\"").count() >= 8, "grid lines");
    }
}
