//! Models from the Hugging Face Hub (or any server with its URL layout, set
//! by `HF_ENDPOINT`), through the hf-hub crate.
//!
//! A revision is resolved to its commit before the build is planned, so the
//! base stage is keyed by the commit: a branch that moves re-runs the stage,
//! a pinned commit never touches the network. Each resolution is recorded; an
//! offline build reuses the last one (with a warning) instead of failing.
//! A model already in the Hugging Face cache (`huggingface-cli download`,
//! transformers) is used from there, as `huggingface_hub` uses it: a pinned
//! commit, or any revision under `HF_HUB_OFFLINE=1`, without the network;
//! a branch when the Hub cannot be reached.

use std::path::{Path, PathBuf};

use hf_hub::api::sync::{Api, ApiBuilder, ApiError};
use hf_hub::{Cache, Repo, RepoType};

use super::{ModelError, Result};

/// The Hub's address: `HF_ENDPOINT`, or huggingface.co.
pub fn endpoint() -> String {
    std::env::var("HF_ENDPOINT")
        .ok()
        .filter(|e| !e.is_empty())
        .map(|e| e.trim_end_matches('/').to_string())
        .unwrap_or_else(|| "https://huggingface.co".to_string())
}

fn api(cache_dir: &Path) -> Result<Api> {
    ApiBuilder::from_cache(Cache::new(cache_dir.to_path_buf()))
        .with_endpoint(endpoint())
        .with_progress(false)
        .with_token(std::env::var("HF_TOKEN").ok().filter(|t| !t.is_empty()))
        .build()
        .map_err(|e| ModelError::Invalid {
            message: "cannot set up the Hub client".to_string(),
            source: Box::new(e),
        })
}

/// A Hub error with `context`: an HTTP status (no such repository or
/// revision, no access) is the input's fault; anything else (no connection,
/// a timeout, a broken transfer) the network's.
fn hub_error(context: String, error: ApiError) -> ModelError {
    let message = format!("{context}: {error}");
    match &error {
        ApiError::RequestError(inner) if matches!(**inner, ureq::Error::Status(..)) => {
            ModelError::Config(message)
        }
        _ => ModelError::Network(message),
    }
}

/// A revision resolved to a commit, with the repository's file list.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Resolved {
    pub commit: String,
    pub files: Vec<String>,
}

/// Asks the Hub which commit `revision` of `repo` is, and which files it has.
pub fn resolve(repo: &str, revision: &str, scratch: &Path) -> Result<Resolved> {
    let info = api(scratch)?
        .repo(Repo::with_revision(
            repo.to_string(),
            RepoType::Model,
            revision.to_string(),
        ))
        .info()
        .map_err(|e| {
            hub_error(
                format!("cannot resolve `hf:{repo}@{revision}` at {}", endpoint()),
                e,
            )
        })?;
    let mut files: Vec<String> = info.siblings.into_iter().map(|s| s.rfilename).collect();
    files.sort();
    Ok(Resolved {
        commit: info.sha,
        files,
    })
}

/// The Hugging Face cache's model folders, where `huggingface_hub` keeps
/// them: `HF_HUB_CACHE`, else `HF_HOME/hub`, else
/// `$XDG_CACHE_HOME/huggingface/hub` or `~/.cache/huggingface/hub`.
pub fn hf_cache() -> Option<PathBuf> {
    let var = |name: &str| {
        std::env::var_os(name)
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
    };
    var("HF_HUB_CACHE").or_else(|| {
        var("HF_HOME")
            .or_else(|| var("XDG_CACHE_HOME").map(|c| c.join("huggingface")))
            .or_else(|| var("HOME").map(|h| h.join(".cache/huggingface")))
            .map(|home| home.join("hub"))
    })
}

/// Whether `HF_HUB_OFFLINE` asks for no network, as `huggingface_hub` reads it.
pub fn offline() -> bool {
    std::env::var("HF_HUB_OFFLINE")
        .is_ok_and(|v| matches!(v.to_ascii_lowercase().as_str(), "1" | "true" | "yes" | "on"))
}

/// The model files a build needs from a repository.
fn wanted(f: &str) -> bool {
    matches!(
        f,
        "config.json"
            | "tokenizer.json"
            | "tokenizer_config.json"
            | "chat_template.jinja"
            | "generation_config.json"
            | "model.safetensors"
            | "model.safetensors.index.json"
    ) || (f.starts_with("model-") && f.ends_with(".safetensors"))
}

/// `repo` at `revision` (a branch, a tag or a commit) as the Hugging Face
/// cache holds it (`models--OWNER--NAME/refs/REVISION`, then
/// `snapshots/COMMIT/`), when its snapshot has a whole model: a config, a
/// tokenizer and the weights (every shard an index names). The files listed
/// are the snapshot's.
pub fn cached(repo: &str, revision: &str) -> Option<(Resolved, PathBuf)> {
    let folder = hf_cache()?.join(format!("models--{}", repo.replace('/', "--")));
    let pinned = revision.len() == 40 && revision.chars().all(|c| c.is_ascii_hexdigit());
    let commit = if pinned {
        revision.to_string()
    } else {
        std::fs::read_to_string(folder.join("refs").join(revision))
            .ok()?
            .trim()
            .to_string()
    };
    let snapshot = folder.join("snapshots").join(&commit);
    let mut files: Vec<String> = std::fs::read_dir(&snapshot)
        .ok()?
        .filter_map(|e| e.ok())
        // A link to a blob that is not there is not a file.
        .filter(|e| e.path().is_file())
        .filter_map(|e| e.file_name().into_string().ok())
        .collect();
    files.sort();
    let has = |f: &str| files.iter().any(|x| x == f);
    let weights = has("model.safetensors")
        || (has("model.safetensors.index.json")
            && super::read_json::<serde_json::Value>(
                &snapshot.join("model.safetensors.index.json"),
            )
            .ok()
            .and_then(|index| {
                index["weight_map"]
                    .as_object()
                    .map(|m| m.values().filter_map(|v| v.as_str()).all(&has))
            })
            .unwrap_or(false));
    (has("config.json") && has("tokenizer.json") && weights)
        .then_some((Resolved { commit, files }, snapshot))
}

/// Downloads the model files of `repo` at `commit` into `cache_dir` (an
/// interrupted download resumes from its `.part` file) and returns the folder;
/// a model already in the Hugging Face cache at that commit is taken from
/// there, with no network.
pub fn download(repo: &str, resolved: &Resolved, cache_dir: &Path) -> Result<PathBuf> {
    if let Some((held, snapshot)) = cached(repo, &resolved.commit)
        && resolved
            .files
            .iter()
            .filter(|f| wanted(f))
            .all(|f| held.files.contains(f))
    {
        return Ok(snapshot);
    }
    let api = api(cache_dir)?;
    let handle = api.repo(Repo::with_revision(
        repo.to_string(),
        RepoType::Model,
        resolved.commit.clone(),
    ));
    let mut folder = None;
    for file in resolved.files.iter().filter(|f| wanted(f)) {
        let path = handle.get(file).map_err(|e| {
            hub_error(
                format!(
                    "cannot download `{file}` of `hf:{repo}` from {}",
                    endpoint()
                ),
                e,
            )
        })?;
        folder = path.parent().map(Path::to_path_buf);
    }
    folder.ok_or_else(|| {
        ModelError::Config(format!(
            "`hf:{repo}` has none of config.json, model.safetensors, tokenizer.json"
        ))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_repository_is_the_inputs_fault_and_a_dead_network_is_not() {
        let status = ureq::Error::Status(404, ureq::Response::new(404, "Not Found", "").unwrap());
        assert!(matches!(
            hub_error(
                "cannot resolve".into(),
                ApiError::RequestError(Box::new(status))
            ),
            ModelError::Config(_)
        ));
        let io = ApiError::IoError(std::io::Error::new(
            std::io::ErrorKind::ConnectionRefused,
            "refused",
        ));
        assert!(matches!(
            hub_error("cannot resolve".into(), io),
            ModelError::Network(_)
        ));
    }
}
