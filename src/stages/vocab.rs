//! Stage `vocab`: brings the new language's tokens into a pretrained base.
//!
//! Strategies:
//! - `add_tokens`, after the reference workflow: the words of the new
//!   tokenizer's vocabulary that the base lacks become tokens of the base.
//!   The reference adds them as added tokens, which is wrong twice over:
//!   byte-level entries such as `Ġkan` would only match the literal text
//!   `Ġkan`, and a piece such as `ka` is cut out of English words. Added
//!   tokens with `single_word` fix that in Python and not in the browser
//!   (transformers.js ignores `single_word`: on SmolLM2 it tokenized 235 of
//!   300 held-out lines otherwise than training did). So each entry is
//!   decoded to its text, and a word of letters enters the BPE vocabulary
//!   in the base's pre-token form, matched whole through `ignore_merges`
//!   (see [`add_tokens`]). Text with no new word in it encodes exactly as
//!   before, in every implementation.
//! - `extend_bpe`: the new tokenizer's merges (those the base lacks) are
//!   appended to the base's BPE merges, with their tokens, at the lowest
//!   priority. Both tokenizers must split text the same way. New words
//!   become single tokens where the base's higher-priority merges leave the
//!   pieces the new merges join; other text can change where a new merge
//!   applies. The fertility report shows both effects.
//!
//! The embedding (and the tied head) grows to the new size, rounded up to
//! `pad_to_multiple_of`; new rows start at the old rows' mean (transformers'
//! `mean_resizing`) or N(0, 0.02²). Artifacts: the model files, and
//! `new_tokens.json` (the ids fine-tuning trains as embedding rows) and
//! `report.json` (fertility, tokens per word, before and after, on the eval
//! split and on an English sample).

use std::collections::{BTreeMap, HashMap, HashSet};

use serde_json::{Value, json};
use tokenizers::Tokenizer;

use super::shared::{
    Artifact, ENGLISH_SAMPLE, EVAL, ModelStage, TRAIN, TRAINED_TOKENIZER, document_lines,
    read_documents, writers,
};
use crate::engine::{Settings, Stage, StageContext, StageError, settings_of, spec_of};
use crate::manifest::{Vocab, VocabInit, VocabStrategy};
use crate::model::EmbeddingInit;
use crate::model::rng::Rng;
use crate::model::{self};

/// The seed of the new rows' noise: fixed, so the artifact depends only on
/// the settings and inputs.
const INIT_SEED: u64 = 0x0C0B_5EED;

/// `[vocab]`: the stage is its settings.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct VocabStage {
    pub vocab: Vocab,
    /// Where the output folder gets this model: not what the stage writes.
    #[serde(rename = "@publish")]
    pub publish: super::ModelPublish,
}

/// The new tokens: (id, text or vocabulary string).
pub type NewTokens = Vec<(u32, String)>;

fn tokenizer_error(what: &str, e: impl std::fmt::Display) -> StageError {
    StageError::failed(format!("{what}: {e}"))
}

/// Splits on `▁` that follows another character: SentencePiece-style
/// tokenizers (no pre-tokenizer, or `Metaspace` without `split`) see a whole
/// text as one pre-token, where `add_tokens` needs words. It cuts only
/// where no vocabulary entry spans (checked), so the base's tokens stay as
/// they were. (Metaspace's own `split` would do, but transformers.js ignores
/// it, and it cuts runs of `▁` apart.)
const WORD_SPLIT: &str = "▁*[^▁]+|▁+";

/// The pieces `tokenizer` cuts `text` into before its model runs.
fn pre_tokens(tokenizer: &Tokenizer, text: &str) -> Result<Vec<String>, String> {
    use tokenizers::{
        NormalizedString, Normalizer, OffsetReferential, OffsetType, PreTokenizedString,
        PreTokenizer,
    };
    let mut normalized = NormalizedString::from(text);
    if let Some(n) = tokenizer.get_normalizer() {
        n.normalize(&mut normalized).map_err(|e| e.to_string())?;
    }
    let mut pre = PreTokenizedString::from(normalized);
    if let Some(p) = tokenizer.get_pre_tokenizer() {
        p.pre_tokenize(&mut pre).map_err(|e| e.to_string())?;
    }
    Ok(pre
        .get_splits(OffsetReferential::Original, OffsetType::Byte)
        .into_iter()
        .map(|(s, _, _)| s.to_string())
        .collect())
}

/// The `add_tokens` strategy. Returns the extended tokenizer, its new
/// tokens (id, vocabulary string), and how many words were left out
/// because their form did not encode to itself.
///
/// The words are the new tokenizer's vocabulary entries decoded to text,
/// trimmed, written in letters only, and new to the base. Each enters the
/// base's BPE vocabulary in the base's own pre-token form (byte-level
/// `Ġword` after a space and `word` without one; SentencePiece-style
/// `▁word`), where that form stands as a whole pre-token at least twice in
/// the training lines; the model's `ignore_merges` then makes a pre-token
/// that is a whole vocabulary entry that one token. So a new word is one
/// token where it stands as a word and is never cut out of a longer one,
/// text without new words encodes as before (every base entry is what BPE
/// makes of it anyway; `ignore_merges` changes nothing there), and every
/// implementation agrees: added tokens with `single_word` (Python's and
/// symb's whole-word matching) are matched inside words by transformers.js,
/// which ignores `single_word`.
pub fn add_tokens(
    base: &Tokenizer,
    new: &Tokenizer,
    train: &[String],
) -> Result<(Tokenizer, NewTokens, usize), String> {
    let mut json: Value = serde_json::from_str(&base.to_string(false).map_err(|e| e.to_string())?)
        .map_err(|e| e.to_string())?;
    if json["model"]["type"] != "BPE" {
        return Err(format!(
            "`add_tokens` extends a BPE tokenizer, and the base's model is {}",
            json["model"]["type"]
        ));
    }
    let byte_level = json["pre_tokenizer"].to_string().contains("ByteLevel");
    if !byte_level {
        let pre = json["pre_tokenizer"].clone();
        let metaspace = pre["type"] == "Metaspace" && pre["split"] != true;
        if !pre.is_null() && !metaspace {
            return Err(format!(
                "`add_tokens` reads byte-level and SentencePiece-style tokenizers, and the base's pre-tokenizer is {}",
                component_type(&json, "pre_tokenizer")
            ));
        }
        let vocab = json["model"]["vocab"]
            .as_object()
            .ok_or("the base BPE model has no `vocab`")?;
        if let Some(spanning) = vocab
            .keys()
            .find(|t| t.trim_start_matches('▁').contains('▁'))
        {
            return Err(format!(
                "`add_tokens` splits text into words, and the base has tokens that span words \
                    (`{spanning}`); use `vocab.strategy = \"extend_bpe\"`"
            ));
        }
        let split = json!({"type": "Split", "pattern": {"Regex": WORD_SPLIT}, "behavior": "Isolated", "invert": false});
        json["pre_tokenizer"] = if pre.is_null() {
            split
        } else {
            json!({"type": "Sequence", "pretokenizers": [pre, split]})
        };
    }
    let splitter: Tokenizer = json
        .to_string()
        .parse()
        .map_err(|e: tokenizers::Error| e.to_string())?;

    // The words.
    let base_vocab = base.get_vocab(true);
    let new_specials: HashSet<u32> = new.get_added_tokens_decoder().keys().copied().collect();
    let mut entries: Vec<(String, u32)> = new
        .get_vocab(false)
        .into_iter()
        .filter(|(_, id)| !new_specials.contains(id))
        .collect();
    entries.sort_by_key(|&(_, id)| id);
    let mut seen = HashSet::new();
    let mut words = Vec::new();
    for (_, id) in entries {
        let text = new.decode(&[id], false).map_err(|e| e.to_string())?;
        let text = text.trim();
        if text.is_empty()
            || !text.chars().all(char::is_alphabetic)
            || !seen.insert(text.to_string())
            || base_vocab.contains_key(text)
        {
            continue;
        }
        words.push(text.to_string());
    }

    // Their forms, where the training lines have them as whole pre-tokens.
    let mut counts: HashMap<String, usize> = HashMap::new();
    for line in train {
        for piece in pre_tokens(&splitter, line)? {
            *counts.entry(piece).or_default() += 1;
        }
    }
    let contexts = |w: &str| {
        if byte_level {
            vec![(format!(" {w}"), 0), (w.to_string(), 0)]
        } else {
            vec![(format!("x {w}"), 1)]
        }
    };
    let mut forms: Vec<(String, String)> = Vec::new();
    let mut taken = HashSet::new();
    for word in &words {
        for (context, skip) in contexts(word) {
            let pieces = pre_tokens(&splitter, &context)?;
            let [form] = &pieces[skip..] else { continue };
            if counts.get(form).copied().unwrap_or(0) >= 2
                && !base_vocab.contains_key(form)
                && taken.insert(form.clone())
            {
                forms.push((form.clone(), context));
            }
        }
    }

    // SentencePiece-style pre-tokens keep punctuation with the word
    // (`▁nouses-ni`): the frequent ones that hold a new word, whole.
    if !byte_level {
        let new_words: HashSet<&str> = words.iter().map(String::as_str).collect();
        let mut compounds: Vec<(&String, usize)> = counts
            .iter()
            .filter(|&(_, &n)| n >= 2)
            .map(|(p, &n)| (p, n))
            .collect();
        compounds.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(b.0)));
        for (piece, _) in compounds {
            let Some(text) = piece.strip_prefix('▁') else {
                continue;
            };
            if text.contains('▁')
                || text.chars().any(|c| c.is_numeric() || c.is_whitespace())
                || !text
                    .split(|c: char| !c.is_alphabetic())
                    .any(|w| new_words.contains(w))
            {
                continue;
            }
            if !base_vocab.contains_key(piece) && taken.insert(piece.clone()) {
                forms.push((piece.clone(), format!("x {text}")));
            }
        }
    }

    let added_ids = json["added_tokens"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|t| t["id"].as_u64());
    let next = base_vocab
        .values()
        .map(|&i| i as u64)
        .chain(added_ids)
        .max()
        .map_or(0, |m| m + 1);
    let build = |forms: &[(String, String)]| -> Result<(Tokenizer, NewTokens), String> {
        let mut json = json.clone();
        let vocab = json["model"]["vocab"]
            .as_object_mut()
            .ok_or("the base BPE model has no `vocab`")?;
        let mut added = Vec::with_capacity(forms.len());
        for (i, (form, _)) in forms.iter().enumerate() {
            let id = next + i as u64;
            vocab.insert(form.clone(), id.into());
            added.push((id as u32, form.clone()));
        }
        json["model"]["ignore_merges"] = true.into();
        let tokenizer: Tokenizer = json
            .to_string()
            .parse()
            .map_err(|e: tokenizers::Error| e.to_string())?;
        Ok((tokenizer, added))
    };
    let (tokenizer, added) = build(&forms)?;
    // Each form must come out as itself where it was seen.
    let mut kept = Vec::with_capacity(forms.len());
    for ((form, context), (id, _)) in forms.iter().zip(&added) {
        if tokenizer
            .encode(context.as_str(), false)
            .map_err(|e| e.to_string())?
            .get_ids()
            .contains(id)
        {
            kept.push((form.clone(), context.clone()));
        }
    }
    let left_out = forms.len() - kept.len();
    let (tokenizer, added) = if left_out == 0 {
        (tokenizer, added)
    } else {
        build(&kept)?
    };
    Ok((tokenizer, added, left_out))
}

/// The BPE merges of a tokenizer.json model, in either serialised form.
fn merges(model: &Value) -> Result<Vec<(String, String)>, String> {
    let list = model["merges"]
        .as_array()
        .ok_or("the BPE model has no `merges`")?;
    list.iter()
        .map(|m| match m {
            Value::String(s) => s
                .split_once(' ')
                .map(|(a, b)| (a.to_string(), b.to_string()))
                .ok_or_else(|| format!("malformed merge `{s}`")),
            Value::Array(pair) if pair.len() == 2 => match (&pair[0], &pair[1]) {
                (Value::String(a), Value::String(b)) => Ok((a.clone(), b.clone())),
                _ => Err(format!("malformed merge `{m}`")),
            },
            _ => Err(format!("malformed merge `{m}`")),
        })
        .collect()
}

/// How a tokenizer cuts text before BPE, and how it joins tokens back, as
/// far as extending its merges goes: byte-level (GPT-2's, and Qwen's split
/// regex before its byte-level step), metaspace (a `Metaspace`
/// pre-tokenizer, or SentencePiece-style `▁` written by the normalizer, as
/// converted Llama 2 tokenizers have), or the component's own kind.
fn splitting(tokenizer: &Value, component: &str) -> String {
    let kind = component_type(tokenizer, component);
    let normalizer = tokenizer["normalizer"].to_string();
    if kind.contains("ByteLevel") {
        "byte-level".to_string()
    } else if kind.contains("Metaspace")
        || (component == "pre_tokenizer" && kind == "none" && normalizer.contains('▁'))
        || (component == "decoder" && tokenizer[component].to_string().contains('▁'))
    {
        "metaspace".to_string()
    } else {
        kind
    }
}

fn component_type(tokenizer: &Value, component: &str) -> String {
    match &tokenizer[component] {
        Value::Null => "none".to_string(),
        v => {
            let kind = v["type"].as_str().unwrap_or("?");
            match v
                .get("pretokenizers")
                .or_else(|| v.get("decoders"))
                .and_then(Value::as_array)
            {
                Some(inner) => format!(
                    "{kind}({})",
                    inner
                        .iter()
                        .map(|i| i["type"].as_str().unwrap_or("?"))
                        .collect::<Vec<_>>()
                        .join(",")
                ),
                None => kind.to_string(),
            }
        }
    }
}

/// BPE as `tokenizers` applies it to one pre-token: repeatedly merge the
/// leftmost occurrence of the pair with the lowest rank.
fn segment(mut pieces: Vec<u32>, ranks: &HashMap<(u32, u32), (usize, u32)>) -> Vec<u32> {
    loop {
        let best = pieces
            .windows(2)
            .enumerate()
            .filter_map(|(i, w)| ranks.get(&(w[0], w[1])).map(|&(rank, id)| (rank, i, id)))
            .min();
        let Some((_, i, id)) = best else {
            return pieces;
        };
        pieces[i] = id;
        pieces.remove(i + 1);
    }
}

/// The `extend_bpe` strategy over tokenizer.json documents. Returns the
/// extended document and its new tokens (vocabulary strings).
///
/// The new tokenizer's tokens are taken in its merge order; each is
/// segmented with the merges so far, and where the base's merges leave it in
/// pieces, merges joining those pieces are appended (the new tokenizer's own
/// merge where its halves survive; otherwise the pieces the base leaves), so
/// that every new token, as a whole pre-token, encodes to itself.
pub fn extend_bpe(base: &Value, new: &Value) -> Result<(Value, NewTokens), String> {
    for (name, t) in [("base", base), ("new", new)] {
        if t["model"]["type"] != "BPE" {
            return Err(format!(
                "`extend_bpe` needs BPE tokenizers, and the {name} tokenizer's model is {}",
                t["model"]["type"]
            ));
        }
    }
    for component in ["pre_tokenizer", "decoder"] {
        let (b, n) = (splitting(base, component), splitting(new, component));
        if b != n {
            return Err(format!(
                "`extend_bpe` needs the new tokenizer to split text as the base's does, but their {component}s differ (base: {b}, new: {n}); \
                 choose the base's kind in `tokenizer.pre_tokenizer`, or use `vocab.strategy = \"add_tokens\"`"
            ));
        }
    }
    let mut out = base.clone();
    let strings = matches!(
        base["model"]["merges"].as_array().and_then(|m| m.first()),
        Some(Value::String(_))
    );
    let base_vocab = base["model"]["vocab"]
        .as_object()
        .ok_or("the base BPE model has no `vocab`")?;
    let mut ids: HashMap<String, u32> = base_vocab
        .iter()
        .filter_map(|(t, id)| Some((t.clone(), id.as_u64()? as u32)))
        .collect();
    let added_ids = base["added_tokens"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|t| t["id"].as_u64());
    let mut next = ids
        .values()
        .map(|&i| i as u64)
        .chain(added_ids)
        .max()
        .map_or(0, |m| m + 1) as u32;
    let mut ranks: HashMap<(u32, u32), (usize, u32)> = HashMap::new();
    for (rank, (a, b)) in merges(&base["model"])?.into_iter().enumerate() {
        if let (Some(&x), Some(&y), Some(&z)) =
            (ids.get(&a), ids.get(&b), ids.get(&format!("{a}{b}")))
        {
            ranks.entry((x, y)).or_insert((rank, z));
        }
    }
    let mut strings_of: HashMap<u32, String> = ids.iter().map(|(t, &i)| (i, t.clone())).collect();
    let new_specials: HashSet<&str> = new["added_tokens"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|t| t["content"].as_str())
        .collect();
    let mut added: NewTokens = Vec::new();
    let mut appended = Vec::new();
    let mut id_of = |token: &str,
                     ids: &mut HashMap<String, u32>,
                     strings_of: &mut HashMap<u32, String>,
                     added: &mut NewTokens|
     -> u32 {
        if let Some(&id) = ids.get(token) {
            return id;
        }
        let id = next;
        next += 1;
        ids.insert(token.to_string(), id);
        strings_of.insert(id, token.to_string());
        added.push((id, token.to_string()));
        id
    };
    // Characters of the new alphabet the base lacks come first.
    let mut new_vocab: Vec<(&String, u64)> = new["model"]["vocab"]
        .as_object()
        .into_iter()
        .flatten()
        .filter_map(|(t, id)| Some((t, id.as_u64()?)))
        .collect();
    new_vocab.sort_by_key(|&(_, id)| id);
    for (token, _) in &new_vocab {
        if token.chars().count() == 1 && !new_specials.contains(token.as_str()) {
            id_of(token, &mut ids, &mut strings_of, &mut added);
        }
    }
    for (a, b) in merges(&new["model"])? {
        let target = format!("{a}{b}");
        let chars: Vec<u32> = target
            .chars()
            .map(|c| id_of(&c.to_string(), &mut ids, &mut strings_of, &mut added))
            .collect();
        let mut pieces = segment(chars, &ranks);
        while pieces.len() > 1 {
            // Join the new tokenizer's halves when the pieces are exactly
            // them; otherwise the first adjacent pair.
            let (x, y) = (pieces[0], pieces[1]);
            let joined = format!("{}{}", strings_of[&x], strings_of[&y]);
            let z = id_of(&joined, &mut ids, &mut strings_of, &mut added);
            let rank = ranks.len() + appended.len() + 1_000_000_000;
            ranks.insert((x, y), (rank, z));
            let (sx, sy) = (&strings_of[&x], &strings_of[&y]);
            appended.push(if strings {
                Value::String(format!("{sx} {sy}"))
            } else {
                json!([sx, sy])
            });
            pieces = segment(pieces, &ranks);
        }
    }
    let vocab = out["model"]["vocab"]
        .as_object_mut()
        .expect("checked above");
    for (id, token) in &added {
        vocab.insert(token.clone(), (*id).into());
    }
    out["model"]["merges"]
        .as_array_mut()
        .ok_or("the base BPE model has no `merges`")?
        .extend(appended);
    Ok((out, added))
}

/// Tokens and words over `texts`.
fn count(tokenizer: &Tokenizer, texts: &[String]) -> Result<(usize, usize), String> {
    let encodings = tokenizer
        .encode_batch(texts.to_vec(), false)
        .map_err(|e| e.to_string())?;
    let tokens = encodings.iter().map(|e| e.get_ids().len()).sum();
    let words = texts.iter().map(|t| t.split_whitespace().count()).sum();
    Ok((tokens, words))
}

fn fertility(tokenizer: &Tokenizer, texts: &[String]) -> Result<Value, String> {
    let (tokens, words) = count(tokenizer, texts)?;
    Ok(
        json!({ "tokens": tokens, "words": words, "tokens_per_word": tokens as f64 / words.max(1) as f64 }),
    )
}

/// The first line whose decoding differs from it, if any.
fn first_lossy(
    tokenizer: &Tokenizer,
    texts: &[String],
) -> Result<Option<(String, String)>, String> {
    for text in texts {
        let ids = tokenizer
            .encode(text.as_str(), false)
            .map_err(|e| e.to_string())?;
        let back = tokenizer
            .decode(ids.get_ids(), false)
            .map_err(|e| e.to_string())?;
        if back != *text {
            return Ok(Some((text.clone(), back)));
        }
    }
    Ok(None)
}

impl VocabStage {
    /// What it reads: the corpus, the trained tokenizer, the base.
    fn inputs(&self) -> Vec<Artifact> {
        [
            vec![TRAIN, EVAL, TRAINED_TOKENIZER],
            ModelStage::Base.model().to_vec(),
        ]
        .concat()
    }
}

impl Stage for VocabStage {
    fn name(&self) -> &str {
        "vocab"
    }
    fn kind(&self) -> &'static str {
        "vocab"
    }
    fn version(&self) -> u32 {
        // 2: safetensors carry `{"format": "pt"}`. 3: `add_tokens` writes
        // vocabulary entries matched through `ignore_merges`, not added tokens.
        3
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
        let mut files = vec![("report.json".to_string(), "reports/vocab.json".to_string())];
        files.extend(self.publish.files(true));
        files
    }
    fn run(&self, ctx: &StageContext<'_>) -> Result<Value, StageError> {
        let base_path = ModelStage::Base.file("tokenizer.json").path(ctx)?;
        let new_path = TRAINED_TOKENIZER.path(ctx)?;
        let base = Tokenizer::from_file(base_path)
            .map_err(|e| tokenizer_error("cannot load the base tokenizer", e))?;
        let new = Tokenizer::from_file(new_path)
            .map_err(|e| tokenizer_error("cannot load the trained tokenizer", e))?;
        let mut left_out = 0;
        let (tokenizer, added) = match self.vocab.strategy {
            VocabStrategy::AddTokens => {
                let train = document_lines(&read_documents(TRAIN.path(ctx)?)?);
                let (tokenizer, added, undecodable) = add_tokens(&base, &new, &train)
                    .map_err(|e| tokenizer_error("cannot add the tokens", e))?;
                left_out = undecodable;
                (tokenizer, added)
            }
            VocabStrategy::None => {
                return Err(StageError::failed(
                    "`vocab.strategy` = \"none\" has no stage to run",
                ));
            }
            VocabStrategy::ExtendBpe => {
                let read = |p: &std::path::Path| -> Result<Value, StageError> {
                    model::read_json(p).map_err(StageError::failed_from)
                };
                let (json, added) = extend_bpe(&read(base_path)?, &read(new_path)?)
                    .map_err(StageError::bad_input)?;
                let text = serde_json::to_string(&json).expect("json serialises");
                let tokenizer: Tokenizer = text
                    .parse()
                    .map_err(|e| tokenizer_error("the extended tokenizer does not load", e))?;
                (tokenizer, added)
            }
        };
        tokenizer
            .save(ctx.output("tokenizer.json"), true)
            .map_err(|e| tokenizer_error("cannot write tokenizer.json", e))?;

        // Weights: the embedding grows to cover every id, padded.
        let mut model = super::shared::load_model(ctx, ModelStage::Base)?;
        let old_size = model.vocab_size();
        let needed = (tokenizer.get_vocab_size(true)).max(old_size);
        let multiple = self.vocab.pad_to_multiple_of as usize;
        let new_size = needed.div_ceil(multiple) * multiple;
        let init = match self.vocab.init {
            VocabInit::Mean => EmbeddingInit::Mean,
            VocabInit::Normal => EmbeddingInit::Normal,
        };
        model
            .resize_token_embeddings(new_size, init, &mut Rng::new(INIT_SEED))
            .map_err(super::shared::model_error)?;
        let parameters = super::shared::save_weights(&model, ctx)?["parameters"].clone();
        let mut config: Value = model::read_json(ModelStage::Base.file("config.json").path(ctx)?)
            .map_err(StageError::failed_from)?;
        config["vocab_size"] = new_size.into();
        super::shared::write_json(&ctx.output("config.json"), &config)?;
        for file in ["generation_config.json", "tokenizer_config.json"] {
            if let Ok(from) = ModelStage::Base.file(file).path(ctx) {
                super::shared::copy(from, &ctx.output(file))?;
            }
        }

        // The report: fertility before and after, losslessness, English kept.
        let eval = document_lines(&read_documents(EVAL.path(ctx)?)?);
        let english: Vec<String> = ENGLISH_SAMPLE.lines().map(str::to_string).collect();
        let report_error = |e: String| tokenizer_error("cannot measure fertility", e);
        for texts in [&eval, &english] {
            if let Some((line, back)) = first_lossy(&tokenizer, texts).map_err(report_error)? {
                return Err(StageError::failed(format!(
                    "the extended tokenizer does not decode text back: {line:?} became {back:?}"
                )));
            }
        }
        // Lines with no new word in them, and how many of those encode differently.
        let mut new_words = HashSet::new();
        for (id, _) in &added {
            new_words.insert(
                tokenizer
                    .decode(&[*id], false)
                    .map_err(|e| report_error(e.to_string()))?
                    .trim()
                    .to_string(),
            );
        }
        let (mut plain_lines, mut plain_changed) = (0, Vec::new());
        for line in &english {
            if line
                .split(|c: char| !c.is_alphanumeric() && c != '_')
                .any(|w| new_words.contains(w))
            {
                continue;
            }
            plain_lines += 1;
            let ids = |t: &Tokenizer| {
                t.encode(line.as_str(), false)
                    .map(|e| e.get_ids().to_vec())
                    .map_err(|e| report_error(e.to_string()))
            };
            if ids(&base)? != ids(&tokenizer)? {
                plain_changed.push(line.clone());
            }
        }
        let new_ids: Vec<u32> = added.iter().map(|(id, _)| *id).collect();
        super::shared::write_json(
            &ctx.output("new_tokens.json"),
            &json!({ "ids": new_ids, "tokens": added.iter().map(|(_, t)| t).collect::<Vec<_>>() }),
        )?;
        let report = json!({
            "strategy": self.vocab.strategy,
            "init": self.vocab.init,
            "base_vocab_size": old_size,
            "tokenizer_size": tokenizer.get_vocab_size(true),
            "vocab_size": new_size,
            "new_tokens": added.len(),
            "left_out_undecodable": left_out,
            "padding_rows": new_size - needed,
            "fertility": {
                "eval": {
                    "base": fertility(&base, &eval).map_err(report_error)?,
                    "new_tokenizer": fertility(&new, &eval).map_err(report_error)?,
                    "extended": fertility(&tokenizer, &eval).map_err(report_error)?,
                },
                "english": {
                    "base": fertility(&base, &english).map_err(report_error)?,
                    "extended": fertility(&tokenizer, &english).map_err(report_error)?,
                    "lines": english.len(),
                    "lines_without_new_words": plain_lines,
                    "of_those_encoded_differently": plain_changed.len(),
                    "examples_encoded_differently": plain_changed.iter().take(3).collect::<Vec<_>>(),
                },
            },
        });
        super::shared::write_json(&ctx.output("report.json"), &report)?;
        let per_word = |v: &Value| v["tokens_per_word"].as_f64().unwrap_or(0.0);
        let f = &report["fertility"];
        Ok(json!({
            "new_tokens": added.len(),
            "vocab_size": new_size,
            "parameters": parameters,
            "eval_tokens_per_word_before": per_word(&f["eval"]["base"]),
            "eval_tokens_per_word_after": per_word(&f["eval"]["extended"]),
            "english_tokens_per_word_before": per_word(&f["english"]["base"]),
            "english_tokens_per_word_after": per_word(&f["english"]["extended"]),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixture_tokenizer() -> Tokenizer {
        Tokenizer::from_file(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/fixtures/tiny-gpt2/tokenizer.json"
        ))
        .unwrap()
    }

    /// A byte-level BPE "new tokenizer" with the given vocabulary strings.
    fn byte_level(tokens: &[&str]) -> Tokenizer {
        let vocab: serde_json::Map<String, Value> = tokens
            .iter()
            .enumerate()
            .map(|(i, t)| (t.to_string(), json!(i)))
            .collect();
        let json = json!({
            "version": "1.0", "truncation": null, "padding": null, "added_tokens": [], "normalizer": null,
            "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true},
            "post_processor": null,
            "decoder": {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true},
            "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null, "end_of_word_suffix": null,
                      "fuse_unk": false, "byte_fallback": false, "ignore_merges": false, "vocab": vocab, "merges": []}
        });
        json.to_string().parse().unwrap()
    }

    /// GPT-2's byte-to-character table applied to `text`'s UTF-8 bytes.
    fn byte_level_form(text: &str) -> String {
        let printable = |b: u8| (33..=126).contains(&b) || (161..=172).contains(&b) || b >= 174;
        let mut table = [0u32; 256];
        let mut next = 256;
        for b in 0..=255u8 {
            table[b as usize] = if printable(b) {
                b as u32
            } else {
                next += 1;
                next - 1
            };
        }
        text.bytes()
            .map(|b| char::from_u32(table[b as usize]).unwrap())
            .collect()
    }

    fn tokens(t: &Tokenizer, text: &str) -> Vec<String> {
        t.encode(text, false).unwrap().get_tokens().to_vec()
    }

    #[test]
    fn added_words_are_whole_pre_tokens_and_lossless() {
        let base = fixture_tokenizer();
        // `Ġqzx` is " qzx" in byte-level form; `Ã©` is "é".
        let greek = byte_level_form("λόγος");
        let new = byte_level(&["Ġqzx", "qzx", "Ġ", "Ã©Ã©q", "the", "q9", &greek, "Ġrare"]);
        let train: Vec<String> = [
            "a qzx b qzx",
            "qzx qzx",
            "qzx!",
            "ééq ééq ééq",
            "λόγος λόγος λόγος",
            "q9 q9 q9",
            "one rare word",
        ]
        .map(str::to_string)
        .to_vec();
        let (extended, added, left_out) = add_tokens(&base, &new, &train).unwrap();
        assert_eq!(left_out, 0);
        let forms: Vec<&str> = added.iter().map(|(_, t)| t.as_str()).collect();
        // Both forms of a word the lines have twice or more, in the base's
        // byte-level alphabet; not a word the base has, not one with a
        // digit, not one seen once.
        for form in ["Ġqzx", "qzx", "ĠÃ©Ã©q", &byte_level_form(" λόγος")] {
            assert!(forms.contains(&form), "{form} in {forms:?}");
        }
        assert!(
            !forms
                .iter()
                .any(|f| f.contains("the") || f.contains("q9") || f.contains("rare")),
            "{forms:?}"
        );
        // Vocabulary entries, not added tokens: every implementation matches them alike.
        let json: Value = serde_json::from_str(&extended.to_string(false).unwrap()).unwrap();
        assert_eq!(json["model"]["ignore_merges"], true);
        assert_eq!(
            json["added_tokens"],
            serde_json::from_str::<Value>(&base.to_string(false).unwrap()).unwrap()["added_tokens"]
        );
        // A whole word is one token; the same letters inside a word are not.
        assert_eq!(tokens(&extended, "a qzx b"), ["a", "Ġqzx", "Ġb"]);
        assert_eq!(tokens(&extended, "qzx."), ["qzx", "."]);
        for other in [
            "qzxy",
            "aqzx",
            "a qzxy",
            "a-qzxqzx",
            "the cat sat on the mat",
        ] {
            assert_eq!(tokens(&extended, other), tokens(&base, other), "{other}");
        }
        for text in ["a qzx b", "qzx-qzx.", "ééq café λόγος", "  two  spaces "] {
            let ids = extended.encode(text, false).unwrap();
            assert_eq!(extended.decode(ids.get_ids(), false).unwrap(), text);
        }
    }

    #[test]
    fn sentencepiece_bases_split_words_where_no_token_spans() {
        let base = Tokenizer::from_file(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/fixtures/tiny-llama-sp/tokenizer.json"
        ))
        .unwrap();
        let new = byte_level(&["Ġqzxw", "Ġthe"]);
        let train: Vec<String> = ["a qzxw b qzxw", "qzxw qzxw"].map(str::to_string).to_vec();
        let (extended, added, _) = add_tokens(&base, &new, &train).unwrap();
        assert_eq!(
            added.iter().map(|(_, t)| t.as_str()).collect::<Vec<_>>(),
            ["▁qzxw"]
        );
        assert!(tokens(&extended, "a qzxw b").contains(&"▁qzxw".to_string()));
        for text in ["qzxwy and    four spaces", "    code();", "the qzxwx"] {
            assert_eq!(
                extended.encode(text, false).unwrap().get_ids(),
                base.encode(text, false).unwrap().get_ids(),
                "{text}"
            );
        }
    }

    #[test]
    fn extend_bpe_reaches_every_new_token_and_refuses_other_splitters() {
        let read = |p: &str| -> Value {
            serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
        };
        let base = read(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/fixtures/tiny-gpt2/tokenizer.json"
        ));
        let mut new = serde_json::to_value(byte_level(&[
            "Ġ", "q", "z", "x", "e", "l", "Ġq", "zx", "Ġqzx", "el", "Ġqzxel",
        ]))
        .unwrap();
        new["model"]["merges"] = json!([
            ["Ġ", "q"],
            ["z", "x"],
            ["Ġq", "zx"],
            ["e", "l"],
            ["Ġqzx", "el"]
        ]);
        let (extended, added) = extend_bpe(&base, &new).unwrap();
        let tokenizer: Tokenizer = extended.to_string().parse().unwrap();
        assert_eq!(tokens(&tokenizer, " qzx qzxel"), ["Ġqzx", "Ġqzxel"]);
        assert!(added.iter().any(|(_, t)| t == "Ġqzxel"));
        // Base merges keep their ranks: the prefix is the base's, unchanged.
        let n = base["model"]["merges"].as_array().unwrap().len();
        assert_eq!(
            extended["model"]["merges"].as_array().unwrap()[..n],
            base["model"]["merges"].as_array().unwrap()[..]
        );

        let mut metaspace = new.clone();
        metaspace["pre_tokenizer"] = json!({"type": "Metaspace", "replacement": "▁", "prepend_scheme": "always", "split": true});
        let error = extend_bpe(&base, &metaspace).unwrap_err();
        assert!(
            error.contains("pre_tokenizers differ (base: byte-level, new: metaspace)"),
            "{error}"
        );
    }
}
