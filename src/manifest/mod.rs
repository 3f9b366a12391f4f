//! The manifest (`symb.toml`): parsed strictly into raw serde types, then
//! resolved into a validated [`Manifest`] with defaults applied and paths made
//! absolute. Every error names the file, line, column and key, and says how to
//! fix it.

mod error;
mod raw;
mod resolve;

pub use error::{ManifestError, suggest};
pub use raw::{
    Architecture, CorpusFormat, ExternalData, FinetuneMethod, PreTokenizer, RawPrompts,
    RemoteEngine, RemoteFallback, TrainOn, VocabInit, VocabStrategy,
};
pub use resolve::{
    Adapter, AdapterFiles, Base, BaseModel, Browser, Calibration, Chat, ChatTemplateSource, Corpus,
    Device, Export, Finetune, Manifest, Project, REMOTE_STAGES, Remote, Resources,
    TRANSFORMERS_JS_CDN, TextFields, Tokenizer, TransformersJs, Verify, Vocab, Web, has_user_info,
};

use std::path::Path;

use error::Spans;

/// Reads, parses and validates the manifest at `path`. `display` is how the
/// path is shown in messages (as the user typed it).
pub fn load(path: &Path) -> Result<Manifest, ManifestError> {
    let display = path.display().to_string();
    let source = std::fs::read_to_string(path).map_err(|e| {
        let help = if e.kind() == std::io::ErrorKind::NotFound {
            "; write one with `symb init`, or name another with `-m FILE`"
        } else {
            ""
        };
        ManifestError::general(
            &display,
            format!("cannot read the manifest `{display}`: {e}{help}"),
        )
    })?;
    parse(path, &display, &source)
}

/// Parses and validates manifest text that lives at `path`.
pub fn parse(path: &Path, display: &str, source: &str) -> Result<Manifest, ManifestError> {
    let spans = Spans::new(source);
    let raw: raw::RawManifest =
        toml::from_str(source).map_err(|e| toml_error(display, source, &spans, &e))?;
    resolve::resolve(path, display, source, &spans, raw)
}

/// Rewrites serde/toml messages into ours: the full key path, and a
/// suggestion for a misspelt key or value.
fn toml_error(
    display: &str,
    source: &str,
    spans: &Spans<'_>,
    error: &toml::de::Error,
) -> ManifestError {
    let message = error
        .message()
        .trim()
        .replace("expected u64", "expected a non-negative integer")
        .replace("expected f64", "expected a number");
    let message = message.as_str();
    let span = error.span();
    let path = span
        .as_ref()
        .map(|s| spans.path_at(s.start))
        .unwrap_or_default();
    let table = match path.len() {
        0 | 1 => "the top level".to_string(),
        n => format!("`[{}]`", path[..n - 1].join(".")),
    };
    let key = path.join(".");
    let rewritten = if let Some(rest) = message.strip_prefix("unknown field `") {
        let (word, expected) = rest.split_once('`').unwrap_or((rest, ""));
        let candidates = backticked(expected);
        let hint = match suggest(word, candidates.iter().map(String::as_str)) {
            Some(best) => format!(", did you mean `{best}`?"),
            None if !candidates.is_empty() => format!(
                "; expected one of {}",
                candidates
                    .iter()
                    .map(|c| format!("`{c}`"))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
            None => String::new(),
        };
        let what = if path.len() <= 1 {
            "unknown section"
        } else {
            "unknown key"
        };
        format!("{what} `{word}` in {table}{hint}")
    } else if let Some(rest) = message.strip_prefix("unknown variant `") {
        let (word, expected) = rest.split_once('`').unwrap_or((rest, ""));
        let candidates = backticked(expected);
        let options = candidates
            .iter()
            .map(|c| format!("`{c}`"))
            .collect::<Vec<_>>()
            .join(", ");
        let hint = suggest(word, candidates.iter().map(String::as_str))
            .map(|b| format!(", did you mean `{b}`?"))
            .unwrap_or_default();
        format!("`{key}` = \"{word}\" is not one of {options}{hint}")
    } else if message.starts_with("invalid type") && !key.is_empty() {
        format!(
            "wrong type for `{key}`: {}",
            message.trim_start_matches("invalid type: ")
        )
    } else if !key.is_empty() {
        format!("`{key}`: {message}")
    } else {
        format!("invalid TOML: {message}")
    };
    ManifestError::at(display, source, span, rewritten)
}

fn backticked(text: &str) -> Vec<String> {
    text.split('`')
        .skip(1)
        .step_by(2)
        .map(str::to_string)
        .collect()
}
