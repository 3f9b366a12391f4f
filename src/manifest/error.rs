//! Manifest errors that point at the line, cargo style:
//!
//! ```text
//! error: unknown key `vocab_sise` in `[tokenizer]`, did you mean `vocab_size`?
//!   --> symb.toml:12:1
//!    |
//! 12 | vocab_sise = 8000
//!    | ^^^^^^^^^^
//! ```

use std::fmt;
use std::ops::Range;

use toml::de::{DeTable, DeValue};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ManifestError {
    /// The manifest path as the user named it.
    pub file: String,
    /// 1-based line and column, when the error has a place in the file.
    pub location: Option<(usize, usize)>,
    /// The offending source line and the span's width on it.
    pub snippet: Option<(String, usize, usize)>,
    pub message: String,
}

impl ManifestError {
    /// An error at a byte span of the manifest's source.
    pub fn at(
        file: &str,
        source: &str,
        span: Option<Range<usize>>,
        message: impl Into<String>,
    ) -> Self {
        let message = message.into();
        let Some(span) = span else {
            return ManifestError {
                file: file.to_string(),
                location: None,
                snippet: None,
                message,
            };
        };
        let start = span.start.min(source.len());
        let line_start = source[..start].rfind('\n').map_or(0, |i| i + 1);
        let line_end = source[start..]
            .find('\n')
            .map_or(source.len(), |i| start + i);
        let line_no = source[..start].matches('\n').count() + 1;
        let column = source[line_start..start].chars().count() + 1;
        let text = source[line_start..line_end]
            .trim_end_matches('\r')
            .to_string();
        let width = source[start..span.end.clamp(start, line_end)]
            .chars()
            .count()
            .max(1);
        ManifestError {
            file: file.to_string(),
            location: Some((line_no, column)),
            snippet: Some((text, column, width)),
            message,
        }
    }

    /// An error about the manifest as a whole (or a file it names).
    pub fn general(file: &str, message: impl Into<String>) -> Self {
        ManifestError {
            file: file.to_string(),
            location: None,
            snippet: None,
            message: message.into(),
        }
    }
}

impl fmt::Display for ManifestError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "error: {}", self.message)?;
        match self.location {
            Some((line, column)) => {
                let gutter = line.to_string().len();
                writeln!(f, "{:gutter$}--> {}:{line}:{column}", "", self.file)?;
                if let Some((text, column, width)) = &self.snippet {
                    writeln!(f, "{:gutter$} |", "")?;
                    writeln!(f, "{line} | {text}")?;
                    write!(
                        f,
                        "{:gutter$} | {}{}",
                        "",
                        " ".repeat(column - 1),
                        "^".repeat(*width)
                    )?;
                }
                Ok(())
            }
            None => write!(f, " --> {}", self.file),
        }
    }
}

impl std::error::Error for ManifestError {}

/// Spans of keys and values in the manifest, for pointing at them.
pub struct Spans<'a> {
    table: Option<toml::Spanned<DeTable<'a>>>,
}

impl<'a> Spans<'a> {
    pub fn new(source: &'a str) -> Self {
        Spans {
            table: DeTable::parse(source).ok(),
        }
    }

    /// The span of the value at `path` (`["tokenizer", "vocab_size"]`).
    pub fn value(&self, path: &[&str]) -> Option<Range<usize>> {
        self.find(path).map(|(_, value)| value)
    }

    /// The span of the key at `path`, falling back to its parent table's
    /// header when the key is absent.
    pub fn key(&self, path: &[&str]) -> Option<Range<usize>> {
        if let Some((key, _)) = self.find(path) {
            return Some(key);
        }
        if path.len() > 1 {
            self.key(&path[..path.len() - 1])
        } else {
            None
        }
    }

    fn find(&self, path: &[&str]) -> Option<(Range<usize>, Range<usize>)> {
        let mut table = self.table.as_ref()?.get_ref();
        let mut found = None;
        for (i, segment) in path.iter().enumerate() {
            let (key, value) = table
                .iter()
                .find(|(k, _)| k.get_ref().as_ref() == *segment)?;
            found = Some((key.span(), value.span()));
            if i + 1 < path.len() {
                match value.get_ref() {
                    DeValue::Table(inner) => table = inner,
                    _ => return None,
                }
            }
        }
        found
    }

    /// The dotted path of the key whose key or value span contains `offset`.
    pub fn path_at(&self, offset: usize) -> Vec<String> {
        fn search(table: &DeTable<'_>, offset: usize, path: &mut Vec<String>) -> bool {
            for (key, value) in table.iter() {
                path.push(key.get_ref().to_string());
                let contains =
                    |r: Range<usize>| r.start <= offset && offset < r.end.max(r.start + 1);
                // A table's own span may not cover its body (a `[header]`
                // table), so search inside tables before trusting spans.
                if let DeValue::Table(inner) = value.get_ref()
                    && search(inner, offset, path)
                {
                    return true;
                }
                if contains(key.span()) || contains(value.span()) {
                    return true;
                }
                path.pop();
            }
            false
        }
        let mut path = Vec::new();
        if let Some(root) = self.table.as_ref() {
            search(root.get_ref(), offset, &mut path);
        }
        path
    }
}

/// The closest candidate to `word`, if one is close enough to suggest.
pub fn suggest<'c>(word: &str, candidates: impl IntoIterator<Item = &'c str>) -> Option<&'c str> {
    candidates
        .into_iter()
        .map(|c| (strsim::jaro_winkler(word, c), c))
        .filter(|(score, _)| *score > 0.8)
        .max_by(|a, b| a.0.total_cmp(&b.0))
        .map(|(_, c)| c)
}
