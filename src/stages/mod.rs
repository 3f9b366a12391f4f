//! The stage kinds, and the one place that turns a manifest into a plan.

pub mod corpus;
pub mod tokenizer;

use crate::engine::{Plan, Stage};
use crate::manifest::{Manifest, ManifestError};

/// The stages a manifest asks for. A section whose stage this version of symb
/// does not have yet is refused rather than silently ignored.
pub fn plan(manifest: &Manifest) -> Result<Plan, ManifestError> {
    let mut stages: Vec<Box<dyn Stage>> = Vec::new();
    if let Some(corpus) = &manifest.corpus {
        stages.push(Box::new(corpus::CorpusStage { corpus: corpus.clone() }));
    }
    if let Some(tokenizer) = &manifest.tokenizer {
        stages.push(Box::new(tokenizer::TokenizerStage { tokenizer: tokenizer.clone() }));
    }
    let unsupported = [
        ("base", manifest.base.is_some()),
        ("vocab", manifest.vocab.is_some()),
        ("finetune", manifest.finetune.is_some()),
        ("export", manifest.export.is_some()),
        ("verify", manifest.verify.is_some()),
    ];
    if let Some((section, _)) = unsupported.iter().find(|(_, present)| *present) {
        return Err(ManifestError::general(
            &manifest.display,
            format!("`[{section}]` is valid, but this version of symb (0.1) cannot build its stages yet; comment the section out to build the rest"),
        ));
    }
    if stages.is_empty() {
        return Err(ManifestError::general(&manifest.display, "the manifest asks for nothing to build: add a `[corpus]` and a `[tokenizer]` section"));
    }
    Plan::new(stages).map_err(|e| ManifestError::general(&manifest.display, e.to_string()))
}
