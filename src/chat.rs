//! Chat templates: a model's Jinja `chat_template` rendered as Python
//! transformers' `apply_chat_template` renders it, with minijinja.
//!
//! transformers compiles a template in a sandboxed jinja2 environment with
//! `trim_blocks` and `lstrip_blocks`, loop controls (`break`, `continue`),
//! and three names of its own: `raise_exception(message)`,
//! `strftime_now(format)` (the local time) and a `tojson` filter that is
//! Python's `json.dumps` (non-ASCII kept, `", "` and `": "` between items, or
//! `indent`). It renders with `messages`, `add_generation_prompt`, the
//! tokenizer's special tokens (`bos_token`, `eos_token`, ...) and whatever
//! else the caller passes (`tools`, `date_string`). This module does the
//! same; Python's string methods (`.strip()`, `.startswith()`, ...) come from
//! minijinja's Python compatibility layer.

use std::collections::BTreeMap;

use minijinja::value::Kwargs;
use minijinja::{Environment, Error, ErrorKind, Value};
use serde::{Deserialize, Serialize};

/// One turn of a conversation, in OpenAI's form.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Message {
    /// `system`, `user` or `assistant`.
    pub role: String,
    pub content: String,
}

impl Message {
    pub fn new(role: &str, content: &str) -> Self {
        Message {
            role: role.to_string(),
            content: content.to_string(),
        }
    }
}

/// What a template cannot do.
#[derive(Debug, thiserror::Error)]
pub enum ChatError {
    /// The template does not parse: where, and why.
    #[error("the chat template does not parse: {message} (line {line})")]
    Syntax { line: usize, message: String },
    /// The template called `raise_exception(message)`.
    #[error("the chat template refused the conversation: {0}")]
    Raised(String),
    /// Rendering failed otherwise (an undefined value used, a bad filter).
    #[error("the chat template failed: {message} (line {line})")]
    Render { line: usize, message: String },
    /// The template does not write a conversation as its turns one after
    /// another, so what an assistant wrote cannot be told from the rest.
    #[error("{0}")]
    Turns(String),
}

/// A conversation rendered for training: its text, and the byte ranges of
/// the text that train.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rendered {
    pub text: String,
    /// Each assistant message's span, in order: from the start of its
    /// content through the end-of-turn text that closes it.
    pub assistant: Vec<std::ops::Range<usize>>,
}

/// `raise_exception`'s message, carried through minijinja's error.
#[derive(Debug)]
struct Raised(String);

impl std::fmt::Display for Raised {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Raised {}

/// A compiled chat template.
pub struct ChatTemplate {
    env: Environment<'static>,
}

/// What a rendering gets besides the messages.
#[derive(Debug, Clone, Default)]
pub struct Render {
    /// Whether to end with the header of an assistant turn to be written.
    pub add_generation_prompt: bool,
    /// The tokenizer's special tokens by name (`bos_token`, `eos_token`, ...).
    pub special_tokens: BTreeMap<String, String>,
    /// Further variables (`tools`, `date_string`, ...), as JSON.
    pub extra: serde_json::Map<String, serde_json::Value>,
}

const NAME: &str = "chat_template";

/// ChatML as Qwen2 and SmolLM2 write it, without a default system message:
/// the template of a model symb trains from scratch (`chat.template =
/// "chatml"`).
pub const CHATML: &str = "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + \
    message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}{{ \
    '<|im_start|>assistant\\n' }}{% endif %}";

/// ChatML's special tokens: a turn's start and its end.
pub const CHATML_TOKENS: [&str; 2] = ["<|im_start|>", "<|im_end|>"];

impl ChatTemplate {
    /// Compiles `source`; a template that does not parse says where.
    pub fn new(source: &str) -> Result<Self, ChatError> {
        let mut env = Environment::new();
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function(
            "raise_exception",
            |message: String| -> Result<Value, Error> {
                Err(Error::new(ErrorKind::InvalidOperation, message.clone())
                    .with_source(Raised(message)))
            },
        );
        env.add_function("strftime_now", |format: String| -> Result<String, Error> {
            strftime_now(&format).map_err(|e| Error::new(ErrorKind::InvalidOperation, e))
        });
        env.add_filter("tojson", tojson);
        env.add_template_owned(NAME, source.to_string())
            .map_err(|e| ChatError::Syntax {
                line: e.line().unwrap_or(0),
                message: detail(&e),
            })?;
        Ok(ChatTemplate { env })
    }

    /// The conversation as the template writes it.
    pub fn render(&self, messages: &[Message], options: &Render) -> Result<String, ChatError> {
        let mut context: BTreeMap<String, Value> = options
            .extra
            .iter()
            .map(|(k, v)| (k.clone(), Value::from_serialize(v)))
            .collect();
        for (name, token) in &options.special_tokens {
            context.insert(name.clone(), Value::from(token.clone()));
        }
        context.insert("messages".into(), Value::from_serialize(messages));
        context.insert(
            "add_generation_prompt".into(),
            Value::from(options.add_generation_prompt),
        );
        let template = self.env.get_template(NAME).map_err(|e| ChatError::Syntax {
            line: e.line().unwrap_or(0),
            message: detail(&e),
        })?;
        template.render(context).map_err(|e| {
            let mut source: Option<&(dyn std::error::Error + 'static)> = Some(&e);
            while let Some(error) = source {
                if let Some(raised) = error.downcast_ref::<Raised>() {
                    return ChatError::Raised(raised.0.clone());
                }
                source = error.source();
            }
            ChatError::Render {
                line: e.line().unwrap_or(0),
                message: detail(&e),
            }
        })
    }
}

impl ChatTemplate {
    /// The whole conversation, and where each assistant message is in it.
    /// The spans are found by rendering, as the template writes them: the
    /// conversation up to an assistant message with the generation prompt
    /// is where its content starts, and the conversation through it ends
    /// with its content and `end_of_turn` (`<|im_end|>`, `<|eot_id|>`,
    /// `</s>`), after which nothing trains (ChatML's newline).
    pub fn render_for_training(
        &self,
        messages: &[Message],
        options: &Render,
        end_of_turn: &str,
    ) -> Result<Rendered, ChatError> {
        let with = |prompt: bool| Render {
            add_generation_prompt: prompt,
            ..options.clone()
        };
        let text = self.render(messages, &with(false))?;
        let mut assistant = Vec::new();
        for (i, message) in messages.iter().enumerate() {
            if message.role != "assistant" {
                continue;
            }
            if i == 0 {
                return Err(ChatError::Turns(
                    "the conversation starts with an assistant turn: nothing asked for it".into(),
                ));
            }
            let before = self.render(&messages[..i], &with(true))?;
            let through = self.render(&messages[..=i], &with(false))?;
            if !through.starts_with(&before) || !text.starts_with(&through) {
                return Err(ChatError::Turns(format!(
                    "the chat template does not write turn {} after the turns before it as it \
                    writes them alone (with the generation prompt), so its tokens cannot be found",
                    i + 1
                )));
            }
            let span = &through[before.len()..];
            let end = span
                .rfind(end_of_turn)
                .map(|at| at + end_of_turn.len())
                .ok_or_else(|| {
                    ChatError::Turns(format!(
                        "the chat template does not end assistant turn {} with {end_of_turn:?}",
                        i + 1
                    ))
                })?;
            assistant.push(before.len()..before.len() + end);
        }
        Ok(Rendered { text, assistant })
    }
}

impl ChatTemplate {
    /// The text that ends an assistant's turn: the first of `special`
    /// (the tokenizer's special tokens) that the template writes after an
    /// assistant message's content (`<|im_end|>`, `<|eot_id|>`, `</s>`).
    pub fn end_of_turn(&self, options: &Render, special: &[String]) -> Result<String, ChatError> {
        const MARK: &str = "\u{E000}symb\u{E000}";
        let messages = [Message::new("user", "Hi"), Message::new("assistant", MARK)];
        let text = self.render(&messages, options)?;
        let after = text
            .find(MARK)
            .map(|at| &text[at + MARK.len()..])
            .ok_or_else(|| {
                ChatError::Turns("the chat template does not write the assistant's messages".into())
            })?;
        special
            .iter()
            .filter(|t| !t.is_empty())
            .filter_map(|t| after.find(t.as_str()).map(|at| (at, t)))
            .min_by_key(|(at, t)| (*at, std::cmp::Reverse(t.len())))
            .map(|(_, t)| t.clone())
            .ok_or_else(|| {
                ChatError::Turns(format!(
                    "the chat template ends an assistant's turn with {:?}, which holds none of the \
                    tokenizer's special tokens; a model must end its turn with one token",
                    after.lines().next().unwrap_or("")
                ))
            })
    }
}

/// A model folder's chat template (`tokenizer_config.json`'s
/// `chat_template`, else `chat_template.jinja`) and the special tokens it
/// renders with; `None` when the folder has none.
pub fn folder_template(dir: &std::path::Path) -> Result<Option<(ChatTemplate, Render)>, ChatError> {
    let config: serde_json::Value = std::fs::read_to_string(dir.join("tokenizer_config.json"))
        .ok()
        .and_then(|t| serde_json::from_str(&t).ok())
        .unwrap_or_default();
    let file = std::fs::read_to_string(dir.join("chat_template.jinja")).ok();
    config_template(&config, file)
}

/// A `chat_template` value: a string, or transformers' list of named
/// templates (the `default` one).
pub fn template_source(value: &serde_json::Value) -> Option<String> {
    match value {
        serde_json::Value::String(s) => Some(s.clone()),
        serde_json::Value::Array(list) => list
            .iter()
            .find(|t| t["name"] == "default")
            .and_then(|t| t["template"].as_str())
            .map(str::to_string),
        _ => None,
    }
}

/// The chat template a `tokenizer_config.json` holds (else `file`'s), with
/// the special tokens it names, rendering with the generation prompt.
pub fn config_template(
    config: &serde_json::Value,
    file: Option<String>,
) -> Result<Option<(ChatTemplate, Render)>, ChatError> {
    let source = template_source(&config["chat_template"]).or(file);
    let Some(source) = source else {
        return Ok(None);
    };
    let mut render = Render {
        add_generation_prompt: true,
        ..Render::default()
    };
    for key in ["bos_token", "eos_token", "unk_token", "pad_token"] {
        // A string, or transformers' AddedToken object.
        let token = config[key]
            .as_str()
            .or_else(|| config[key]["content"].as_str());
        if let Some(token) = token {
            render
                .special_tokens
                .insert(key.to_string(), token.to_string());
        }
    }
    Ok(Some((ChatTemplate::new(&source)?, render)))
}

/// An error's own words, without minijinja's location suffix.
fn detail(error: &Error) -> String {
    match error.detail() {
        Some(detail) => format!("{}: {detail}", error.kind()),
        None => error.kind().to_string(),
    }
}

/// transformers' `tojson`: Python's `json.dumps(value, ensure_ascii=False,
/// indent=indent)`.
fn tojson(value: Value, kwargs: Kwargs) -> Result<Value, Error> {
    let indent: Option<usize> = kwargs.get("indent")?;
    kwargs.assert_all_used()?;
    let json = serde_json::to_value(&value)
        .map_err(|e| Error::new(ErrorKind::InvalidOperation, e.to_string()))?;
    let mut out = String::new();
    python_json(&json, indent, 0, &mut out);
    Ok(Value::from_safe_string(out))
}

/// `json.dumps`'s layout: `", "` and `": "` on one line, or with `indent`,
/// one item a line and `","` at line ends.
fn python_json(value: &serde_json::Value, indent: Option<usize>, level: usize, out: &mut String) {
    use serde_json::Value as J;
    let newline = |out: &mut String, level: usize| {
        if let Some(width) = indent {
            out.push('\n');
            out.push_str(&" ".repeat(width * level));
        }
    };
    let separator = if indent.is_some() { "," } else { ", " };
    match value {
        J::Array(items) if !items.is_empty() => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push_str(separator);
                }
                newline(out, level + 1);
                python_json(item, indent, level + 1, out);
            }
            newline(out, level);
            out.push(']');
        }
        J::Object(fields) if !fields.is_empty() => {
            out.push('{');
            for (i, (key, item)) in fields.iter().enumerate() {
                if i > 0 {
                    out.push_str(separator);
                }
                newline(out, level + 1);
                out.push_str(&serde_json::Value::from(key.as_str()).to_string());
                out.push_str(": ");
                python_json(item, indent, level + 1, out);
            }
            newline(out, level);
            out.push('}');
        }
        other => out.push_str(&other.to_string()),
    }
}

/// Python's `datetime.now().strftime(format)` for the directives chat
/// templates use (`%d %b %Y`, `%B`, `%m`, `%y`, `%H:%M:%S`, `%A`, `%a`,
/// `%%`), in UTC.
pub fn strftime_now(format: &str) -> Result<String, String> {
    let seconds = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_err(|e| e.to_string())?
        .as_secs();
    Ok(strftime(format, seconds))
}

const MONTHS: [&str; 12] = [
    "January",
    "February",
    "March",
    "April",
    "May",
    "June",
    "July",
    "August",
    "September",
    "October",
    "November",
    "December",
];
const DAYS: [&str; 7] = [
    "Monday",
    "Tuesday",
    "Wednesday",
    "Thursday",
    "Friday",
    "Saturday",
    "Sunday",
];

/// `strftime` of a UTC time, `seconds` after the epoch; a directive it does
/// not know is written as it is.
fn strftime(format: &str, seconds: u64) -> String {
    let days = seconds / 86_400;
    let (year, month, day) = civil_from_days(days as i64);
    let secs = seconds % 86_400;
    let (hour, minute, second) = (secs / 3600, secs % 3600 / 60, secs % 60);
    // 1970-01-01 was a Thursday.
    let weekday = DAYS[((days + 3) % 7) as usize];
    let month_name = MONTHS[(month - 1) as usize];
    let mut out = String::new();
    let mut chars = format.chars();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('d') => out.push_str(&format!("{day:02}")),
            Some('m') => out.push_str(&format!("{month:02}")),
            Some('Y') => out.push_str(&year.to_string()),
            Some('y') => out.push_str(&format!("{:02}", year % 100)),
            Some('b') => out.push_str(&month_name[..3]),
            Some('B') => out.push_str(month_name),
            Some('a') => out.push_str(&weekday[..3]),
            Some('A') => out.push_str(weekday),
            Some('H') => out.push_str(&format!("{hour:02}")),
            Some('M') => out.push_str(&format!("{minute:02}")),
            Some('S') => out.push_str(&format!("{second:02}")),
            Some('%') => out.push('%'),
            Some(other) => {
                out.push('%');
                out.push(other);
            }
            None => out.push('%'),
        }
    }
    out
}

/// The (year, month, day) of a day count since 1970-01-01 (Howard
/// Hinnant's `civil_from_days`).
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates_are_pythons() {
        // 2024-07-26 12:34:56 UTC, a Friday.
        let t = 1_721_997_296;
        assert_eq!(strftime("%d %b %Y", t), "26 Jul 2024");
        assert_eq!(
            strftime("%A %d %B %y %H:%M:%S %% %q", t),
            "Friday 26 July 24 12:34:56 % %q"
        );
        assert_eq!(strftime("%Y-%m-%d %a", 951_782_400), "2000-02-29 Tue");
    }

    #[test]
    fn tojson_is_json_dumps() {
        let value = serde_json::json!({"name": "tŕanslate", "n": [1, 2.5, null, true], "e": {}});
        let mut flat = String::new();
        python_json(&value, None, 0, &mut flat);
        assert_eq!(
            flat,
            r#"{"name": "tŕanslate", "n": [1, 2.5, null, true], "e": {}}"#
        );
        let mut indented = String::new();
        python_json(&value, Some(4), 0, &mut indented);
        assert_eq!(
            indented,
            "{\n    \"name\": \"tŕanslate\",\n    \"n\": [\n        1,\n        2.5,\n        \
            null,\n        true\n    ],\n    \"e\": {}\n}"
        );
    }

    #[test]
    fn raise_exception_and_syntax_errors_say_what_and_where() {
        let template = ChatTemplate::new("{{ raise_exception('roles must alternate') }}").unwrap();
        let error = template.render(&[], &Render::default()).unwrap_err();
        assert!(
            matches!(&error, ChatError::Raised(m) if m == "roles must alternate"),
            "{error}"
        );
        let Err(error) = ChatTemplate::new("line one\n{% for m in messages %}\n{{ m.content }")
        else {
            panic!("an unclosed tag parses");
        };
        assert!(
            matches!(error, ChatError::Syntax { line: 3, .. }),
            "{error}"
        );
    }
}
