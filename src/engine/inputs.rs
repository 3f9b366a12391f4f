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

/// Human reasons why `current` differs from `previous`, most specific first.
pub fn explain(stage: &str, previous: &StageInputs, current: &StageInputs) -> Vec<String> {
    let mut reasons = Vec::new();
    if previous.version != current.version || previous.kind != current.kind {
        reasons.push(format!("the implementation of `{stage}` changed (version {} -> {})", previous.version, current.version));
    }
    diff_maps(&previous.tools, &current.tools, &mut reasons, |name, change| match change {
        Change::Changed(a, b) => format!("`{name}` version changed {a} -> {b}"),
        Change::Added(b) => format!("`{name}` {b} is now used"),
        Change::Removed(a) => format!("`{name}` {a} is no longer used"),
    });
    diff_maps(&previous.settings, &current.settings, &mut reasons, |key, change| match change {
        Change::Changed(a, b) => format!("`{key}` changed {} -> {}", show(a), show(b)),
        Change::Added(b) => format!("`{key}` set to {}", show(b)),
        Change::Removed(a) => format!("`{key}` removed (was {})", show(a)),
    });
    diff_maps(&previous.files, &current.files, &mut reasons, |path, change| match change {
        Change::Changed(..) => format!("`{path}` changed"),
        Change::Added(_) => format!("`{path}` added"),
        Change::Removed(_) => format!("`{path}` removed"),
    });
    diff_maps(&previous.upstream, &current.upstream, &mut reasons, |artifact, change| match change {
        Change::Changed(a, b) => format!("upstream artifact `{artifact}` changed ({} -> {})", short(a), short(b)),
        Change::Added(_) => format!("now reads upstream artifact `{artifact}`"),
        Change::Removed(_) => format!("no longer reads upstream artifact `{artifact}`"),
    });
    if previous.salt != current.salt {
        reasons.push(format!("the cache salt changed `{}` -> `{}`", previous.salt, current.salt));
    }
    reasons
}

enum Change<'a, V> {
    Changed(&'a V, &'a V),
    Added(&'a V),
    Removed(&'a V),
}

fn diff_maps<V: PartialEq>(previous: &BTreeMap<String, V>, current: &BTreeMap<String, V>, out: &mut Vec<String>, describe: impl Fn(&str, Change<'_, V>) -> String) {
    for (key, new) in current {
        match previous.get(key) {
            Some(old) if old != new => out.push(describe(key, Change::Changed(old, new))),
            None => out.push(describe(key, Change::Added(new))),
            _ => {}
        }
    }
    for (key, old) in previous {
        if !current.contains_key(key) {
            out.push(describe(key, Change::Removed(old)));
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
        new.settings.insert("tokenizer.vocab_size".into(), serde_json::json!(12000));
        new.files.insert("corpus/a.txt".into(), "bb".into());
        new.files.insert("corpus/b.txt".into(), "cc".into());
        assert_eq!(explain("tokenizer", &old, &new), vec!["`tokenizer.vocab_size` changed 8000 -> 12000".to_string(), "`corpus/a.txt` changed".to_string(), "`corpus/b.txt` added".to_string(),]);
        assert_ne!(old.key(), new.key());
        assert_eq!(old.key(), inputs().key());
    }
}
