//! The output folder, assembled from the cache and swapped into place whole.
//!
//! A new folder is filled beside the output (same filesystem), every file
//! copied from its blob with its hash checked as it is read, fsynced, and then
//! exchanged with the old folder in one `renameat2(RENAME_EXCHANGE)`; the old
//! content is deleted only after the new one is in place. Where the exchange
//! is not supported, two renames are used (the output is briefly absent, never
//! half-written). The last assembled state is kept in the cache so that a
//! no-op build only stats the output files, and a rebuild hard-links the
//! files the old output holds unchanged instead of copying them again.

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::cache::{BlobRef, Cache, CacheError, write_json_atomic};

/// What the output folder held when symb last wrote it.
#[derive(Debug, Default, Clone, PartialEq, Serialize, Deserialize)]
pub struct OutputState {
    /// Relative path -> the file written there.
    pub files: BTreeMap<String, OutputFile>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OutputFile {
    /// The blob the file was copied from.
    pub blob: BlobRef,
    /// Modification time (ns) of the written file, to notice later edits.
    pub mtime_ns: i128,
}

fn state_path(cache: &Cache, project: &str) -> std::path::PathBuf {
    cache.refs_dir(project).join("output.json")
}

fn previous_state(cache: &Cache, project: &str) -> Option<OutputState> {
    fs::read(state_path(cache, project)).ok().and_then(|b| serde_json::from_slice::<OutputState>(&b).ok())
}

/// The files of `wanted` that the current output already holds, untouched
/// since symb wrote them: the next assembly links them instead of copying.
pub fn reusable_outputs(cache: &Cache, project: &str, output: &Path, wanted: &BTreeMap<String, BlobRef>) -> std::collections::BTreeSet<String> {
    let Some(state) = previous_state(cache, project) else { return Default::default() };
    wanted
        .iter()
        .filter(|(path, blob)| {
            let Some(file) = state.files.get(*path) else { return false };
            let Ok(meta) = fs::symlink_metadata(output.join(path)) else { return false };
            file.blob == **blob && meta.is_file() && meta.len() == blob.size && mtime_ns(&meta) == file.mtime_ns
        })
        .map(|(path, _)| path.clone())
        .collect()
}

/// True when `output` still holds exactly the files `wanted` names, untouched
/// since symb wrote them.
pub fn output_is_current(cache: &Cache, project: &str, output: &Path, wanted: &BTreeMap<String, BlobRef>) -> bool {
    let Some(state) = previous_state(cache, project) else {
        return false;
    };
    if state.files.len() != wanted.len() {
        return false;
    }
    wanted.iter().all(|(path, blob)| {
        let Some(file) = state.files.get(path) else { return false };
        let Ok(meta) = fs::metadata(output.join(path)) else { return false };
        file.blob == *blob && meta.len() == blob.size && mtime_ns(&meta) == file.mtime_ns
    })
}

/// Why the output folder was not updated.
#[derive(Debug, thiserror::Error)]
pub enum AssembleError {
    #[error(transparent)]
    Cache(#[from] CacheError),
    /// `check` refused the new folder (which was removed).
    #[error("{0}")]
    Rejected(String),
}

/// Builds the output folder from `files` (relative path -> blob), runs
/// `check` on the new folder, and swaps it in only if `check` passes.
pub fn assemble_output(cache: &Cache, project: &str, output: &Path, files: &BTreeMap<String, BlobRef>, check: &dyn Fn(&Path) -> Result<(), String>) -> Result<(), AssembleError> {
    let parent = output.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    fs::create_dir_all(parent).map_err(|e| CacheError::io(parent, e))?;
    let name = output.file_name().and_then(|n| n.to_str()).unwrap_or("output");
    let staging = tempfile::Builder::new().prefix(&format!(".{name}.symb-new-")).tempdir_in(parent).map_err(|e| CacheError::io(parent, e))?;
    let mut state = OutputState::default();
    // Files the old output holds unchanged are hard-linked into the new one
    // (the old folder keeps its own link until the swap): an edit to one
    // dtype's settings copies that dtype's files, not the whole folder.
    let reusable = reusable_outputs(cache, project, output, files);
    for (relative, blob) in files {
        let dest = staging.path().join(relative);
        if let Some(dir) = dest.parent() {
            fs::create_dir_all(dir).map_err(|e| CacheError::io(dir, e))?;
        }
        if !(reusable.contains(relative) && fs::hard_link(output.join(relative), &dest).is_ok()) {
            cache.copy_blob_to(blob, &dest)?;
        }
        state.files.insert(relative.clone(), OutputFile { blob: blob.clone(), mtime_ns: 0 });
    }
    check(staging.path()).map_err(AssembleError::Rejected)?;
    let staged = staging.keep();
    fs::File::open(&staged).and_then(|d| d.sync_all()).map_err(|e| CacheError::io(&staged, e))?;
    if output.exists() {
        match rustix::fs::renameat_with(rustix::fs::CWD, &staged, rustix::fs::CWD, output, rustix::fs::RenameFlags::EXCHANGE) {
            Ok(()) => {}
            Err(_) => {
                let old = staged.with_extension("old");
                fs::rename(output, &old).map_err(|e| CacheError::io(output, e))?;
                fs::rename(&staged, output).map_err(|e| CacheError::io(output, e))?;
                fs::rename(&old, &staged).map_err(|e| CacheError::io(&old, e))?;
            }
        }
        // `staged` now holds the previous output.
        fs::remove_dir_all(&staged).map_err(|e| CacheError::io(&staged, e))?;
    } else {
        fs::rename(&staged, output).map_err(|e| CacheError::io(output, e))?;
    }
    for (relative, file) in state.files.iter_mut() {
        let path = output.join(relative);
        let meta = fs::metadata(&path).map_err(|e| CacheError::io(&path, e))?;
        file.mtime_ns = mtime_ns(&meta);
    }
    Ok(write_json_atomic(&state_path(cache, project), &state, &cache.tmp_dir())?)
}

fn mtime_ns(meta: &fs::Metadata) -> i128 {
    meta.mtime() as i128 * 1_000_000_000 + meta.mtime_nsec() as i128
}
