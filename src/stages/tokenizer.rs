//! Stage `tokenizer`: trains a BPE tokenizer on the train split with the
//! `tokenizers` crate and writes `tokenizer.json`.
//!
//! Pre-tokenizers, each with the decoder that undoes it exactly:
//! - `byte_level`: GPT-2's byte-level pre-tokenizer and decoder (no prefix
//!   space), the 256-byte alphabet; any text encodes.
//! - `metaspace`: spaces become `▁` (prepended to the first word), as
//!   SentencePiece does; the Metaspace decoder undoes it.
//! - `whitespace`: pieces are runs of non-space characters with the
//!   whitespace before them (`Split` on `\s*\S+|\s+`, kept as matched), and the
//!   `Fuse` decoder joins tokens back without separators.
//!
//! For the character-level ones the alphabet is every character of the corpus
//! (train and eval), so every corpus line encodes without unknowns.
//!
//! Determinism: BPE training in `tokenizers` assigns ids from hash-map order
//! (randomly seeded `AHashMap`) for tokens made with a `continuing_subword_prefix`
//! or `end_of_word_suffix`, and `limit_alphabet` drops tied characters by an
//! unstable sort; with equal pair counts the merge order follows those ids
//! (huggingface/tokenizers#1794). We use neither option, so the alphabet is
//! assigned in sorted order, and merges are chosen by (count, pair ids):
//! byte-identical across processes. A test checks it in separate processes.
//!
//! Corpus lines are checked to round-trip (decode(encode(line)) == line):
//! every line for the character-level pre-tokenizers, which can lose text,
//! and a 1-in-64 sample for `byte_level`, which cannot.

use std::collections::HashSet;

use rayon::prelude::*;
use tokenizers::decoders::fuse::Fuse;
use tokenizers::models::bpe::{BPE, BpeTrainerBuilder};
use tokenizers::normalizers::NormalizerWrapper;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::metaspace::{Metaspace, PrependScheme};
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::tokenizer::SplitDelimiterBehavior;
use tokenizers::{
    AddedToken, DecoderWrapper, PostProcessorWrapper, PreTokenizerWrapper, TokenizerBuilder,
    TokenizerImpl,
};

use super::shared::{Artifact, Document, EVAL, TOKENIZERS_VERSION, TRAIN, read_documents, writers};
use crate::engine::{Settings, Stage, StageContext, StageError, settings_of, spec_of};
use crate::manifest::{PreTokenizer, Tokenizer};

/// `[tokenizer]`: the stage is its settings.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct TokenizerStage {
    pub tokenizer: Tokenizer,
}

type Bpe = TokenizerImpl<
    BPE,
    NormalizerWrapper,
    PreTokenizerWrapper,
    PostProcessorWrapper,
    DecoderWrapper,
>;

impl TokenizerStage {
    /// What it reads: the corpus's splits.
    fn inputs(&self) -> Vec<Artifact> {
        vec![TRAIN, EVAL]
    }
}

impl Stage for TokenizerStage {
    fn name(&self) -> &str {
        "tokenizer"
    }
    fn kind(&self) -> &'static str {
        "tokenizer"
    }
    fn version(&self) -> u32 {
        // 2: warnings.json.
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
    fn tools(&self) -> std::collections::BTreeMap<String, String> {
        [("tokenizers".to_string(), TOKENIZERS_VERSION.to_string())].into()
    }
    fn publishes(&self) -> Vec<(String, String)> {
        vec![("tokenizer.json".to_string(), "tokenizer.json".to_string())]
    }
    fn run(&self, ctx: &StageContext<'_>) -> Result<serde_json::Value, StageError> {
        let train = read_documents(TRAIN.path(ctx)?)?;
        let eval = read_documents(EVAL.path(ctx)?)?;
        ctx.progress(0, 2, "training BPE");
        let started = std::time::Instant::now();
        let tokenizer = train_bpe(&self.tokenizer, &train, &eval)?;
        let train_seconds = started.elapsed().as_secs_f64();
        ctx.progress(1, 2, "checking the round trip");
        let started = std::time::Instant::now();
        // Byte-level BPE round-trips any text by construction (every byte is
        // in the alphabet and the decoder inverts the byte mapping), so a
        // 1-in-64 sample guards it; the character-level pre-tokenizers can
        // lose text, so every line is checked. (Checking all 660k lines of a
        // 43 MB corpus took longer than training.)
        let stride = if self.tokenizer.pre_tokenizer == PreTokenizer::ByteLevel {
            64
        } else {
            1
        };
        let lines: Vec<&str> = train
            .iter()
            .chain(&eval)
            .flat_map(Document::texts)
            .step_by(stride)
            .collect();
        check_round_trip(&tokenizer, &lines, self.tokenizer.pre_tokenizer)?;
        let round_trip_seconds = started.elapsed().as_secs_f64();
        let tokens: usize = eval
            .par_iter()
            .flat_map_iter(Document::texts)
            .map(|t| tokenizer.encode(t, false).map(|e| e.len()).unwrap_or(0))
            .sum();
        let words: usize = eval
            .iter()
            .flat_map(Document::texts)
            .map(|t| t.split_whitespace().count())
            .sum();
        let json = tokenizer
            .to_string(true)
            .map_err(|e| StageError::failed(format!("cannot serialise the tokenizer: {e}")))?;
        let merges = serde_json::from_str::<serde_json::Value>(&json)
            .ok()
            .and_then(|v| v["model"]["merges"].as_array().map(Vec::len))
            .unwrap_or(0);
        std::fs::write(ctx.output("tokenizer.json"), json)
            .map_err(|e| StageError::failed("cannot write tokenizer.json").because(e))?;
        let reached = tokenizer.get_vocab_size(true);
        // A few percent short is the corpus's own size (SmolLM2's recipe on
        // the demo corpus reaches 7,862 of 8,000): not worth a warning.
        if (reached as f64) < SHORTFALL * self.tokenizer.vocab_size as f64 {
            ctx.warn(
                "vocab-shortfall",
                format!(
                    "the tokenizer reached {reached} tokens of the {} that `tokenizer.vocab_size` \
                    asks for: the corpus has no more pairs seen `tokenizer.min_frequency` = {} \
                    times",
                    self.tokenizer.vocab_size, self.tokenizer.min_frequency
                ),
                format!(
                    "add text, or set `tokenizer.vocab_size = {reached}` to say what this corpus \
                    gives; a lower `tokenizer.min_frequency` merges rarer pairs"
                ),
            );
        }
        super::shared::write_warnings(ctx)?;
        Ok(serde_json::json!({
            "vocab_size": tokenizer.get_vocab_size(true),
            "merges": merges,
            "round_trip_lines": lines.len(),
            "eval_tokens_per_word": if words > 0 { tokens as f64 / words as f64 } else { 0.0 },
            "train_seconds": train_seconds,
            "round_trip_seconds": round_trip_seconds,
        }))
    }
}

/// The share of `tokenizer.vocab_size` below which the build warns.
const SHORTFALL: f64 = 0.95;

/// Trains the BPE tokenizer on the train documents; the character alphabet
/// (for character-level pre-tokenizers) also covers the eval documents.
pub fn train_bpe(
    settings: &Tokenizer,
    train: &[Document],
    eval: &[Document],
) -> Result<Bpe, StageError> {
    let (pre_tokenizer, decoder, alphabet): (PreTokenizerWrapper, DecoderWrapper, HashSet<char>) =
        match settings.pre_tokenizer {
            PreTokenizer::ByteLevel => {
                let byte_level = ByteLevel::new(false, true, true);
                (
                    byte_level.into(),
                    byte_level.into(),
                    ByteLevel::alphabet().into_iter().collect(),
                )
            }
            PreTokenizer::Metaspace => {
                let metaspace = Metaspace::new('▁', PrependScheme::First, true);
                let mut alphabet = characters(train.iter().chain(eval));
                alphabet.remove(&' ');
                alphabet.insert('▁');
                (metaspace.clone().into(), metaspace.into(), alphabet)
            }
            PreTokenizer::Whitespace => {
                let split = Split::new(
                    SplitPattern::Regex(r"\s*\S+|\s+".to_string()),
                    SplitDelimiterBehavior::Isolated,
                    true,
                )
                .map_err(|e| {
                    StageError::failed(format!("cannot build the whitespace pre-tokenizer: {e}"))
                })?;
                (
                    split.into(),
                    Fuse::new().into(),
                    characters(train.iter().chain(eval)),
                )
            }
        };
    let mut trainer = BpeTrainerBuilder::new()
        .vocab_size(settings.vocab_size as usize)
        .min_frequency(settings.min_frequency)
        .special_tokens(
            settings
                .special_tokens
                .iter()
                .map(|t| AddedToken::from(t.clone(), true))
                .collect(),
        )
        .initial_alphabet(alphabet)
        .show_progress(false)
        .build();
    let mut tokenizer: Bpe = TokenizerBuilder::new()
        .with_model(BPE::default())
        .with_normalizer(None)
        .with_pre_tokenizer(Some(pre_tokenizer))
        .with_post_processor(None)
        .with_decoder(Some(decoder))
        .build()
        .map_err(|e| StageError::failed(format!("cannot build the tokenizer: {e}")))?;
    let texts: Vec<&str> = train.iter().flat_map(Document::texts).collect();
    tokenizer
        .train(&mut trainer, texts.into_iter())
        .map_err(|e| StageError::failed(format!("BPE training failed: {e}")))?;
    Ok(tokenizer)
}

fn characters<'a>(docs: impl Iterator<Item = &'a Document>) -> HashSet<char> {
    docs.flat_map(Document::texts)
        .flat_map(str::chars)
        .collect()
}

/// Fails with the first line that does not decode back to itself.
fn check_round_trip(
    tokenizer: &Bpe,
    lines: &[&str],
    pre_tokenizer: PreTokenizer,
) -> Result<(), StageError> {
    let failures: Vec<(usize, String)> = lines
        .par_iter()
        .enumerate()
        .filter_map(|(i, line)| {
            let decoded = tokenizer
                .encode(*line, false)
                .and_then(|e| tokenizer.decode(e.get_ids(), false))
                .unwrap_or_else(|e| format!("<error: {e}>"));
            (decoded != *line).then_some((i, decoded))
        })
        .collect();
    if let Some((i, decoded)) = failures.first() {
        let hint = match pre_tokenizer {
            PreTokenizer::ByteLevel => "",
            _ => "; `pre_tokenizer = \"byte_level\"` round-trips any text",
        };
        return Err(StageError::failed(format!(
            "the tokenizer does not round-trip {} of {} corpus lines checked; the first: {:?} decodes to {:?}{hint}",
            failures.len(),
            lines.len(),
            lines[*i],
            decoded
        )));
    }
    Ok(())
}
