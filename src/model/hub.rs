//! Models from the Hugging Face Hub (or any server with its URL layout, set
//! by `HF_ENDPOINT`), through the hf-hub crate.
//!
//! A revision is resolved to its commit before the build is planned, so the
//! base stage is keyed by the commit: a branch that moves re-runs the stage,
//! a pinned commit never touches the network. Each resolution is recorded; an
//! offline build reuses the last one (with a warning) instead of failing.

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

/// Downloads the model files of `repo` at `commit` into `cache_dir` (an
/// interrupted download resumes from its `.part` file) and returns the folder.
pub fn download(repo: &str, resolved: &Resolved, cache_dir: &Path) -> Result<PathBuf> {
    let api = api(cache_dir)?;
    let handle = api.repo(Repo::with_revision(
        repo.to_string(),
        RepoType::Model,
        resolved.commit.clone(),
    ));
    let wanted = |f: &str| {
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
    };
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
