//! What a stage key is computed from, and the reasons a key changed.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::Settings;
use crate::cache::{Digest, short};

/// Everything that determines a stage's output. The key is blake3 over its
/// canonical JSON (BTreeMaps, fixed field order).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StageInputs {
    /// Stage kind.
    pub kind: String,
    /// Stage implementation version.
    pub version: u32,
    /// symb's version and the versions of the libraries that shape the output.
    pub tools: BTreeMap<String, String>,
    /// Canonical settings, by manifest key.
    pub settings: Settings,
    /// External file -> content digest.
    pub files: BTreeMap<String, Digest>,
    /// `stage/artifact` -> content digest of each upstream artifact read.
    pub upstream: BTreeMap<String, Digest>,
    /// The salt for mass invalidation (empty unless set).
    pub salt: String,
}

impl StageInputs {
    pub fn key(&self) -> Digest {
        let bytes = serde_json::to_vec(self).expect("inputs serialise");
        blake3::hash(&bytes).to_hex().to_string()
    }
}

/// Why a stage runs (or would run): reasons as data, as cargo's
/// `DirtyReason`. `Display` gives the whole reason (artifact digests
/// included); [`brief`](Self::brief) the short one a build line shows.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum DirtyReason {
    /// `--force` named the stage.
    Forced,
    /// Nothing of this stage was ever built with this cache.
    NoPreviousBuild,
    /// The inputs are what they were, but the result is not in the cache (removed by `gc`, `clean` or a repair).
    CachedResultMissing,
    /// The stage's implementation (its kind or version) changed.
    Implementation { stage: String, from: u32, to: u32 },
    /// A tool that shapes the output (symb, a library) changed version; `None` where it was not used.
    Tool {
        name: String,
        from: Option<String>,
        to: Option<String>,
    },
    /// A manifest setting changed; `None` where it was not set.
    Setting {
        key: String,
        from: Option<serde_json::Value>,
        to: Option<serde_json::Value>,
    },
    /// An external file (the corpus, a base model's file) changed, appeared or went.
    File {
        path: String,
        from: Option<Digest>,
        to: Option<Digest>,
    },
    /// An artifact of an upstream stage changed, or is newly or no longer read.
    Upstream {
        artifact: String,
        from: Option<Digest>,
        to: Option<Digest>,
    },
    /// An upstream stage is itself stale (in `status`: its artifacts are not known yet).
    UpstreamStale { stage: String },
    /// `SYMB_CACHE_SALT` changed.
    Salt { from: String, to: String },
}

impl DirtyReason {
    /// The reason without artifact digests, and with long values cut.
    pub fn brief(&self) -> String {
        match self {
            DirtyReason::Upstream {
                artifact,
                from: Some(_),
                to: Some(_),
            } => format!("upstream artifact `{artifact}` changed"),
            DirtyReason::Setting {
                key,
                from: Some(a),
                to: Some(b),
            } => format!("`{key}` changed {} -> {}", cut(&show(a)), cut(&show(b))),
            DirtyReason::Setting {
                key,
                from: None,
                to: Some(b),
            } => format!("`{key}` set to {}", cut(&show(b))),
            other => other.to_string(),
        }
    }
}

fn cut(text: &str) -> String {
    const MAX: usize = 40;
    if text.chars().count() <= MAX {
        text.to_string()
    } else {
        format!("{}…", text.chars().take(MAX - 1).collect::<String>())
    }
}

impl std::fmt::Display for DirtyReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let absent = "";
        match self {
            DirtyReason::Forced => write!(f, "forced by `--force`"),
            DirtyReason::NoPreviousBuild => write!(f, "no previous build"),
            DirtyReason::CachedResultMissing => write!(f, "its cached result is missing"),
            DirtyReason::Implementation { stage, from, to } => write!(
                f,
                "the implementation of `{stage}` changed (version {from} -> {to})"
            ),
            DirtyReason::Tool {
                name,
                from: Some(a),
                to: Some(b),
            } => write!(f, "`{name}` version changed {a} -> {b}"),
            DirtyReason::Tool {
                name,
                from: None,
                to,
            } => write!(
                f,
                "`{name}` {} is now used",
                to.as_deref().unwrap_or(absent)
            ),
            DirtyReason::Tool {
                name,
                from: Some(a),
                to: None,
            } => write!(f, "`{name}` {a} is no longer used"),
            DirtyReason::Setting {
                key,
                from: Some(a),
                to: Some(b),
            } => write!(f, "`{key}` changed {} -> {}", show(a), show(b)),
            DirtyReason::Setting {
                key,
                from: None,
                to,
            } => write!(
                f,
                "`{key}` set to {}",
                to.as_ref().map(show).unwrap_or_default()
            ),
            DirtyReason::Setting {
                key,
                from: Some(a),
                to: None,
            } => write!(f, "`{key}` removed (was {})", show(a)),
            DirtyReason::File {
                path,
                from: Some(_),
                to: Some(_),
            } => write!(f, "`{path}` changed"),
            DirtyReason::File {
                path, from: None, ..
            } => write!(f, "`{path}` added"),
            DirtyReason::File {
                path,
                from: Some(_),
                to: None,
            } => write!(f, "`{path}` removed"),
            DirtyReason::Upstream {
                artifact,
                from: Some(a),
                to: Some(b),
            } => write!(
                f,
                "upstream artifact `{artifact}` changed ({} -> {})",
                short(a),
                short(b)
            ),
            DirtyReason::Upstream {
                artifact,
                from: None,
                ..
            } => write!(f, "now reads upstream artifact `{artifact}`"),
            DirtyReason::Upstream {
                artifact,
                from: Some(_),
                to: None,
            } => write!(f, "no longer reads upstream artifact `{artifact}`"),
            DirtyReason::UpstreamStale { stage } => write!(f, "upstream `{stage}` is stale"),
            DirtyReason::Salt { from, to } => {
                write!(f, "the cache salt changed `{from}` -> `{to}`")
            }
        }
    }
}

/// Reasons joined for one line.
pub fn join(reasons: &[DirtyReason], brief: bool) -> String {
    if !brief {
        return reasons
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join("; ");
    }
    // Brief: changed upstream artifacts by their stage, in one part, and at
    // most three parts (`-v` has them all).
    const PARTS: usize = 3;
    let mut stages: Vec<&str> = Vec::new();
    let mut parts: Vec<String> = Vec::new();
    for reason in reasons {
        match reason {
            DirtyReason::Upstream {
                artifact,
                from: Some(_),
                to: Some(_),
            } => {
                let stage = artifact.split('/').next().unwrap_or(artifact);
                if !stages.contains(&stage) {
                    stages.push(stage);
                }
            }
            other => parts.push(other.brief()),
        }
    }
    if !stages.is_empty() {
        let named: Vec<String> = stages.iter().map(|s| format!("`{s}`")).collect();
        let what = match named.len() {
            1 => format!("{}'s output changed", named[0]),
            n if n <= PARTS => format!("the output of {} changed", named.join(", ")),
            n => format!(
                "the output of {} and {} more stages changed",
                named[..2].join(", "),
                n - 2
            ),
        };
        parts.insert(0, what);
    }
    if parts.len() > PARTS {
        let more = parts.len() - PARTS;
        parts.truncate(PARTS);
        parts.push(format!("{more} more (-v)"));
    }
    parts.join("; ")
}

/// Why `current` differs from `previous`, most specific first.
pub fn explain(stage: &str, previous: &StageInputs, current: &StageInputs) -> Vec<DirtyReason> {
    let mut reasons = Vec::new();
    if previous.version != current.version || previous.kind != current.kind {
        reasons.push(DirtyReason::Implementation {
            stage: stage.to_string(),
            from: previous.version,
            to: current.version,
        });
    }
    diff_maps(
        &previous.tools,
        &current.tools,
        &mut reasons,
        |name, from, to| DirtyReason::Tool { name, from, to },
    );
    diff_maps(
        &previous.settings,
        &current.settings,
        &mut reasons,
        |key, from, to| DirtyReason::Setting { key, from, to },
    );
    diff_maps(
        &previous.files,
        &current.files,
        &mut reasons,
        |path, from, to| DirtyReason::File { path, from, to },
    );
    diff_maps(
        &previous.upstream,
        &current.upstream,
        &mut reasons,
        |artifact, from, to| DirtyReason::Upstream { artifact, from, to },
    );
    if previous.salt != current.salt {
        reasons.push(DirtyReason::Salt {
            from: previous.salt.clone(),
            to: current.salt.clone(),
        });
    }
    reasons
}

/// Each key whose value changed, appeared (`from` None) or went (`to` None).
fn diff_maps<V: PartialEq + Clone>(
    previous: &BTreeMap<String, V>,
    current: &BTreeMap<String, V>,
    out: &mut Vec<DirtyReason>,
    reason: impl Fn(String, Option<V>, Option<V>) -> DirtyReason,
) {
    for (key, new) in current {
        match previous.get(key) {
            Some(old) if old != new => {
                out.push(reason(key.clone(), Some(old.clone()), Some(new.clone())))
            }
            None => out.push(reason(key.clone(), None, Some(new.clone()))),
            _ => {}
        }
    }
    for (key, old) in previous {
        if !current.contains_key(key) {
            out.push(reason(key.clone(), Some(old.clone()), None));
        }
    }
}

fn show(value: &serde_json::Value) -> String {
    match value {
        serde_json::Value::String(s) => format!("\"{s}\""),
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn inputs() -> StageInputs {
        StageInputs {
            kind: "tokenizer".into(),
            version: 1,
            tools: BTreeMap::new(),
            settings: [("tokenizer.vocab_size".to_string(), serde_json::json!(8000))].into(),
            files: [("corpus/a.txt".to_string(), "aa".to_string())].into(),
            upstream: BTreeMap::new(),
            salt: String::new(),
        }
    }

    #[test]
    fn reasons_name_the_setting_and_the_file() {
        let old = inputs();
        let mut new = inputs();
        new.settings
            .insert("tokenizer.vocab_size".into(), serde_json::json!(12000));
        new.files.insert("corpus/a.txt".into(), "bb".into());
        new.files.insert("corpus/b.txt".into(), "cc".into());
        assert_eq!(
            explain("tokenizer", &old, &new)
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>(),
            vec![
                "`tokenizer.vocab_size` changed 8000 -> 12000".to_string(),
                "`corpus/a.txt` changed".to_string(),
                "`corpus/b.txt` added".to_string(),
            ]
        );
        assert_ne!(old.key(), new.key());
        assert_eq!(old.key(), inputs().key());
    }

    #[test]
    fn a_brief_reason_has_no_digest_and_no_long_value() {
        let upstream = DirtyReason::Upstream {
            artifact: "merge/model.safetensors".into(),
            from: Some("a".repeat(64)),
            to: Some("b".repeat(64)),
        };
        assert!(upstream.to_string().contains("aaaa"), "{upstream}");
        assert_eq!(
            upstream.brief(),
            "upstream artifact `merge/model.safetensors` changed"
        );
        let long = serde_json::json!([
            "c_attn", "c_proj", "c_fc", "q_proj", "k_proj", "v_proj", "o_proj"
        ]);
        let setting = DirtyReason::Setting {
            key: "finetune.targets".into(),
            from: Some(serde_json::json!("attn")),
            to: Some(long),
        };
        assert!(
            setting.brief().ends_with('…')
                && setting.brief().chars().count() < setting.to_string().chars().count(),
            "{}",
            setting.brief()
        );
        let epochs = DirtyReason::Setting {
            key: "finetune.epochs".into(),
            from: Some(serde_json::json!(2)),
            to: Some(serde_json::json!(1)),
        };
        assert_eq!(epochs.brief(), "`finetune.epochs` changed 2 -> 1");
        assert_eq!(
            serde_json::to_value(&epochs).unwrap(),
            serde_json::json!({"kind": "setting", "key": "finetune.epochs", "from": 2, "to": 1})
        );
    }
}
