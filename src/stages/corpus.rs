//! Stage `corpus`: reads text, jsonl and csv files, normalises documents and
//! splits them into train and eval deterministically.
//!
//! A document goes to eval when blake3(seed, document) falls below
//! `eval_fraction`: the split depends only on the seed and the document's own
//! content, so adding a file moves no existing document across the split, and
//! duplicate documents always land on the same side (no train/eval leakage).
//!
//! Files of `corpus.eval_files` go to eval whole, and nothing is drawn.
//!
//! Artifacts: `train.jsonl` and `eval.jsonl`, one JSON document per line,
//! `{"text": ...}`, `{"prompt": ..., "completion": ...}` or `{"messages":
//! [...]}`.

use std::io::Write;
use std::path::Path;

use super::shared::Document;
use crate::chat::Message;
use crate::engine::{
    ExternalFile, Settings, Stage, StageContext, StageError, settings_of, spec_of,
};
use crate::manifest::{Corpus, CorpusFormat, TextFields};

/// The stage is its settings.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct CorpusStage {
    pub corpus: Corpus,
}

impl Stage for CorpusStage {
    fn name(&self) -> &str {
        "corpus"
    }
    fn kind(&self) -> &'static str {
        "corpus"
    }
    fn version(&self) -> u32 {
        // 2: a UTF-8 byte-order mark is not text; a lone CR ends a line.
        2
    }
    fn settings(&self) -> Settings {
        settings_of(self)
    }
    fn spec(&self) -> Option<serde_json::Value> {
        spec_of(self)
    }
    fn files(&self) -> &[ExternalFile] {
        &self.corpus.files
    }
    fn run(&self, ctx: &StageContext<'_>) -> Result<serde_json::Value, StageError> {
        let files = ctx.files();
        let mut documents: Vec<(Document, bool)> = Vec::new();
        let mut bytes = 0u64;
        for (i, file) in files.iter().enumerate() {
            ctx.progress(i as u64, files.len() as u64, &file.label);
            let raw = std::fs::read(&file.path).map_err(|e| {
                StageError::bad_input(format!("cannot read `{}`", file.label)).because(e)
            })?;
            bytes += raw.len() as u64;
            let text = utf8(&file.label, &raw)?;
            // A byte-order mark (Windows editors write one) is no text.
            let text = text.strip_prefix('\u{feff}').unwrap_or(text);
            let mut read = Vec::new();
            read_file(&self.corpus, file, text, &mut read)?;
            let held_out = self.corpus.eval_files.contains(&file.label);
            if held_out && read.is_empty() {
                return Err(StageError::bad_input(format!(
                    "`{}` (in `corpus.eval_files`) holds no documents",
                    file.label
                )));
            }
            documents.extend(read.into_iter().map(|d| (d, held_out)));
        }
        if documents.iter().all(|(_, held_out)| *held_out) {
            let names = files
                .iter()
                .filter(|f| !self.corpus.eval_files.contains(&f.label))
                .map(|f| format!("`{}`", f.label))
                .collect::<Vec<_>>()
                .join(", ");
            return Err(StageError::bad_input(format!(
                "the corpus is empty: {names} hold no documents (blank lines are skipped)"
            )));
        }
        let threshold = self.corpus.eval_fraction;
        let (mut train, mut eval) = (Vec::new(), Vec::new());
        for (doc, held_out) in &documents {
            if *held_out {
                eval.push(serde_json::to_string(doc).expect("documents serialise"));
                continue;
            }
            let line = serde_json::to_string(doc).expect("documents serialise");
            // Drawn by content, not by where it was read: the same
            // conversation twice lands on one side.
            let content = match doc {
                Document::Chat { messages, .. } => serde_json::to_string(&Document::Chat {
                    messages: messages.clone(),
                    at: None,
                })
                .expect("documents serialise"),
                _ => line.clone(),
            };
            let mut hasher = blake3::Hasher::new();
            hasher.update(&self.corpus.seed.to_le_bytes());
            hasher.update(content.as_bytes());
            let draw = u64::from_le_bytes(
                hasher.finalize().as_bytes()[..8]
                    .try_into()
                    .expect("8 bytes"),
            ) as f64
                / 2f64.powi(64);
            if draw < threshold {
                eval.push(line)
            } else {
                train.push(line)
            }
        }
        // An eval split asked for and not had fails here, before anything
        // trains (training's eval and verify read it), as a train/test split
        // that leaves its test part empty does in the libraries users know.
        if eval.is_empty() && threshold > 0.0 {
            let distinct = train
                .iter()
                .collect::<std::collections::BTreeSet<_>>()
                .len();
            return Err(StageError::bad_input(format!(
                "the eval split is empty: `corpus.eval_fraction` = {threshold} of {} documents \
                    ({distinct} distinct) drew none (identical documents always land on the same \
                    side); add distinct documents, raise `corpus.eval_fraction`, or set it to 0 \
                    for no eval split (and list `verify.prompts` where the manifest has \
                    `[export]`)",
                train.len()
            )));
        }
        write_lines(&ctx.output("train.jsonl"), &train)?;
        write_lines(&ctx.output("eval.jsonl"), &eval)?;
        Ok(serde_json::json!({
            "files": files.len(),
            "bytes": bytes,
            "documents": documents.len(),
            "train_documents": train.len(),
            "eval_documents": eval.len(),
        }))
    }
}

fn write_lines(path: &Path, lines: &[String]) -> Result<(), StageError> {
    let file = std::fs::File::create(path)
        .map_err(|e| StageError::failed(format!("cannot write `{}`", path.display())).because(e))?;
    let mut out = std::io::BufWriter::new(file);
    for line in lines {
        writeln!(out, "{line}").map_err(|e| {
            StageError::failed(format!("cannot write `{}`", path.display())).because(e)
        })?;
    }
    out.flush()
        .map_err(|e| StageError::failed(format!("cannot write `{}`", path.display())).because(e))
}

/// Validates UTF-8, naming the line and column of the first bad byte.
fn utf8<'a>(label: &str, raw: &'a [u8]) -> Result<&'a str, StageError> {
    std::str::from_utf8(raw).map_err(|e| {
        let good = &raw[..e.valid_up_to()];
        let line = good.iter().filter(|&&b| b == b'\n').count() + 1;
        let line_start = good.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1);
        let column = String::from_utf8_lossy(&good[line_start..]).chars().count() + 1;
        StageError::bad_input(format!(
            "`{label}`:{line}:{column}: not valid UTF-8 (byte 0x{:02x}); \
            convert the file to UTF-8, e.g. `iconv -f latin1 -t utf-8`",
            raw[e.valid_up_to()]
        ))
    })
}

fn format_of(corpus: &Corpus, file: &ExternalFile) -> CorpusFormat {
    match corpus.format {
        CorpusFormat::Auto if matches!(corpus.fields, TextFields::Messages { .. }) => {
            CorpusFormat::Chat
        }
        CorpusFormat::Auto => match file.label.rsplit('.').next() {
            Some("jsonl") | Some("ndjson") => CorpusFormat::Jsonl,
            Some("csv") => CorpusFormat::Csv,
            _ => CorpusFormat::Text,
        },
        other => other,
    }
}

/// The longest document accepted, in bytes. Longer ones (a whole file on one
/// line, most often) are refused: tokenizer training and its round-trip check
/// grow with the longest document, not with the corpus.
pub const MAX_DOCUMENT_BYTES: usize = 1 << 20;

fn too_long(label: &str, line: usize, bytes: usize) -> StageError {
    StageError::bad_input(format!(
        "`{label}`:{line}: a document of {bytes} bytes, over the bound of {} bytes (1 MiB) for one \
            document (a line of a text file, a record of JSONL or CSV); split it, e.g. one \
            sentence or paragraph per line",
        MAX_DOCUMENT_BYTES
    ))
}

/// The lines of a text: each ends at LF, CRLF, or a lone CR (old Mac
/// files, which would otherwise be one document).
fn lines(text: &str) -> impl Iterator<Item = &str> {
    let mut rest = Some(text);
    std::iter::from_fn(move || {
        let text = rest?;
        match text.find(['\n', '\r']) {
            Some(at) => {
                let skip = if text[at..].starts_with("\r\n") { 2 } else { 1 };
                rest = Some(&text[at + skip..]).filter(|r| !r.is_empty());
                Some(&text[..at])
            }
            None => {
                rest = None;
                Some(text)
            }
        }
    })
}

fn read_file(
    corpus: &Corpus,
    file: &ExternalFile,
    text: &str,
    out: &mut Vec<Document>,
) -> Result<(), StageError> {
    let label = &file.label;
    match format_of(corpus, file) {
        CorpusFormat::Text | CorpusFormat::Auto => {
            for (i, line) in lines(text).enumerate() {
                let line = line.trim();
                if line.len() > MAX_DOCUMENT_BYTES {
                    return Err(too_long(label, i + 1, line.len()));
                }
                if !line.is_empty() {
                    out.push(Document::Text {
                        text: line.to_string(),
                    });
                }
            }
        }
        CorpusFormat::Chat => {
            if !(label.ends_with(".jsonl")
                || label.ends_with(".ndjson")
                || label.ends_with(".json"))
            {
                return Err(StageError::bad_input(format!(
                    "`{label}`: `corpus.format = \"chat\"` reads JSONL files, one conversation \
                    (`{{\"messages\": [...]}}`) a line; this file is not `.jsonl`"
                )));
            }
            let field = match &corpus.fields {
                TextFields::Messages { messages_field } => messages_field.as_str(),
                _ => "messages",
            };
            for (i, line) in lines(text).enumerate() {
                if line.trim().is_empty() {
                    continue;
                }
                if line.len() > MAX_DOCUMENT_BYTES {
                    return Err(too_long(label, i + 1, line.len()));
                }
                let at =
                    |what: String| StageError::bad_input(format!("`{label}`:{}: {what}", i + 1));
                let value: serde_json::Value =
                    serde_json::from_str(line).map_err(|e| at(format!("invalid JSON: {e}")))?;
                out.push(Document::Chat {
                    messages: conversation(&value, field).map_err(at)?,
                    at: Some(format!("{label}:{}", i + 1)),
                });
            }
        }
        CorpusFormat::Jsonl => {
            for (i, line) in lines(text).enumerate() {
                if line.trim().is_empty() {
                    continue;
                }
                if line.len() > MAX_DOCUMENT_BYTES {
                    return Err(too_long(label, i + 1, line.len()));
                }
                let at =
                    |what: String| StageError::bad_input(format!("`{label}`:{}: {what}", i + 1));
                let value: serde_json::Value =
                    serde_json::from_str(line).map_err(|e| at(format!("invalid JSON: {e}")))?;
                let field = |name: &str| -> Result<String, StageError> {
                    match value.get(name) {
                        Some(serde_json::Value::String(s)) => Ok(s.clone()),
                        Some(_) => Err(at(format!("field `{name}` is not a string"))),
                        None if value.get("messages").is_some_and(|m| m.is_array()) => {
                            Err(at(format!(
                                "no field `{name}`, but `messages`: the record is a conversation; \
                                set `corpus.format = \"chat\"` (and remove `corpus.{}`)",
                                match &corpus.fields {
                                    TextFields::PromptCompletion { .. } => "prompt_field",
                                    _ => "text_field",
                                }
                            )))
                        }
                        None => Err(at(format!(
                            "no field `{name}`; set `corpus.text_field` (or `prompt_field` + \
                                `completion_field`) to the record's field names"
                        ))),
                    }
                };
                push_record(&corpus.fields, field, out)?;
            }
        }
        CorpusFormat::Csv => {
            let mut reader = csv::ReaderBuilder::new()
                .has_headers(true)
                .from_reader(text.as_bytes());
            let headers = reader
                .headers()
                .map_err(|e| {
                    StageError::bad_input(format!("`{label}`: cannot read the CSV header"))
                        .because(e)
                })?
                .clone();
            for record in reader.records() {
                let record = record.map_err(|e| {
                    let line = e.position().map_or(0, |p| p.line());
                    StageError::bad_input(format!("`{label}`:{line}: invalid CSV")).because(e)
                })?;
                let line = record.position().map_or(0, |p| p.line());
                if record.as_slice().len() > MAX_DOCUMENT_BYTES {
                    return Err(too_long(label, line as usize, record.as_slice().len()));
                }
                let field = |name: &str| -> Result<String, StageError> {
                    let column = headers.iter().position(|h| h == name).ok_or_else(|| {
                        StageError::bad_input(format!(
                            "`{label}`: no column `{name}` (columns: {})",
                            headers.iter().collect::<Vec<_>>().join(", ")
                        ))
                    })?;
                    record.get(column).map(str::to_string).ok_or_else(|| {
                        StageError::bad_input(format!(
                            "`{label}`:{line}: the row has no column `{name}`"
                        ))
                    })
                };
                push_record(&corpus.fields, field, out)?;
            }
        }
    }
    Ok(())
}

/// The messages of a chat record, checked: roles system, user or
/// assistant, string contents, at most one system message and only first.
fn conversation(value: &serde_json::Value, field: &str) -> Result<Vec<Message>, String> {
    let list = match value.get(field) {
        Some(serde_json::Value::Array(list)) => list,
        Some(other) => {
            return Err(format!(
                "`{field}` is not a list of messages (it is {})",
                json_kind(other)
            ));
        }
        None => {
            return Err(format!(
                "no field `{field}`: a chat record is `{{\"{field}\": [{{\"role\": \"user\", \
                \"content\": \"...\"}}, ...]}}`{}",
                if field == "messages" {
                    "; set `corpus.messages_field` if the record names it otherwise"
                } else {
                    ""
                }
            ));
        }
    };
    if list.is_empty() {
        return Err(format!(
            "`{field}` is empty: a conversation needs a message"
        ));
    }
    let mut messages = Vec::with_capacity(list.len());
    for (n, message) in list.iter().enumerate() {
        let n = n + 1;
        let role = match message.get("role") {
            Some(serde_json::Value::String(role)) => role.as_str(),
            Some(other) => {
                return Err(format!(
                    "message {n}: `role` is {}, not a string",
                    json_kind(other)
                ));
            }
            None => return Err(format!("message {n} has no `role`")),
        };
        if !matches!(role, "system" | "user" | "assistant") {
            return Err(format!(
                "message {n}: role `{role}` is not one of system, user, assistant"
            ));
        }
        let content = match message.get("content") {
            Some(serde_json::Value::String(content)) => content,
            Some(other) => {
                return Err(format!(
                    "message {n}: `content` is {}, not a string",
                    json_kind(other)
                ));
            }
            None => return Err(format!("message {n} has no `content`")),
        };
        if role == "system" && n > 1 {
            return Err(format!(
                "message {n}: a system message after the first message{}; a conversation has at \
                most one, first",
                if messages.iter().any(|m: &Message| m.role == "system") {
                    " (a second system message)"
                } else {
                    ""
                }
            ));
        }
        messages.push(Message::new(role, content));
    }
    Ok(messages)
}

fn json_kind(value: &serde_json::Value) -> &'static str {
    match value {
        serde_json::Value::Null => "null",
        serde_json::Value::Bool(_) => "a boolean",
        serde_json::Value::Number(_) => "a number",
        serde_json::Value::String(_) => "a string",
        serde_json::Value::Array(_) => "a list",
        serde_json::Value::Object(_) => "an object",
    }
}

fn push_record(
    fields: &TextFields,
    field: impl Fn(&str) -> Result<String, StageError>,
    out: &mut Vec<Document>,
) -> Result<(), StageError> {
    match fields {
        TextFields::Text { text_field: name } => {
            let text = field(name)?;
            if !text.trim().is_empty() {
                out.push(Document::Text { text });
            }
        }
        TextFields::PromptCompletion {
            prompt_field: prompt,
            completion_field: completion,
        } => {
            out.push(Document::PromptCompletion {
                prompt: field(prompt)?,
                completion: field(completion)?,
            });
        }
        // Conversations are read by `CorpusFormat::Chat`, never as fields.
        TextFields::Messages { .. } => {}
    }
    Ok(())
}
