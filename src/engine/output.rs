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
//!
//! Ownership: symb only ever replaces or removes a folder it made. Each output
//! folder holds a marker, [`OUTPUT_MARKER`], that lists the files symb wrote
//! there with their digests. A folder without it that holds anything is
//! refused ([`inspect_output`]); files in a marked folder that the marker does
//! not list are the user's, and are carried into every new folder unchanged.
//! A file counts as untouched when its size, mtime, ctime and inode are those
//! recorded after it was written: restoring an edited file's mtime still
//! changes its ctime, so it is noticed and rewritten. As in git, an edit
//! within the same timestamp tick as symb's own write (milliseconds on older
//! kernels) is the one change stat cannot see; `symb cache verify` hashes.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::cache::{BlobRef, Cache, CacheError, fault, write_json_atomic};

/// The file in an output folder that says symb made it, and what it wrote.
pub const OUTPUT_MARKER: &str = ".symb-output.json";

/// The content of [`OUTPUT_MARKER`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OutputMarker {
    /// A sentence for whoever opens the file.
    pub about: String,
    /// Relative path -> the blob symb wrote there.
    pub files: BTreeMap<String, BlobRef>,
}

/// What is at an output path before a build writes it.
#[derive(Debug, Clone, PartialEq)]
pub enum OutputFolder {
    /// Nothing: the build creates it.
    Absent,
    /// An empty folder (a user may create it in advance).
    Empty,
    /// A folder symb made: the files it wrote there.
    Owned(BTreeMap<String, BlobRef>),
}

/// Why symb will not write (or remove) an output path.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum OutputRefusal {
    #[error("`{path}` is a file, not a folder")]
    NotAFolder { path: PathBuf },
    #[error("`{path}` is a symlink; name the folder it points to")]
    Symlink { path: PathBuf },
    #[error(
        "`{path}` holds {entries} entries (`{example}`, ...) and was not made by symb (it has no \
            `{OUTPUT_MARKER}`); symb replaces its output folder on every build, so it will not \
            touch this one"
    )]
    NotOurs {
        path: PathBuf,
        entries: usize,
        example: String,
    },
    #[error("`{path}` is unreadable: {message}")]
    Unreadable { path: PathBuf, message: String },
}

/// Files that keep an empty folder in version control; a folder holding only
/// these counts as empty.
const PLACEHOLDERS: [&str; 3] = [".gitignore", ".gitkeep", ".keep"];

/// The entries of `dir` other than [`PLACEHOLDERS`], sorted (none when it
/// cannot be read).
pub fn entries_besides_placeholders(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| !PLACEHOLDERS.contains(&n.as_str()))
        .collect();
    names.sort();
    names
}

/// Whether symb may write its output at `path`, and what it wrote there.
pub fn inspect_output(path: &Path) -> Result<OutputFolder, OutputRefusal> {
    let unreadable = |e: &dyn std::fmt::Display| OutputRefusal::Unreadable {
        path: path.to_path_buf(),
        message: e.to_string(),
    };
    let meta = match fs::symlink_metadata(path) {
        Ok(meta) => meta,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(OutputFolder::Absent),
        Err(e) => return Err(unreadable(&e)),
    };
    if meta.file_type().is_symlink() {
        return Err(OutputRefusal::Symlink {
            path: path.to_path_buf(),
        });
    }
    if !meta.is_dir() {
        return Err(OutputRefusal::NotAFolder {
            path: path.to_path_buf(),
        });
    }
    let marker = path.join(OUTPUT_MARKER);
    match fs::read(&marker) {
        Ok(bytes) => {
            let marker: OutputMarker =
                serde_json::from_slice(&bytes).map_err(|e| OutputRefusal::Unreadable {
                    path: marker.clone(),
                    message: e.to_string(),
                })?;
            Ok(OutputFolder::Owned(marker.files))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            fs::read_dir(path).map_err(|e| unreadable(&e))?;
            let names = entries_besides_placeholders(path);
            match names.first() {
                None => Ok(OutputFolder::Empty),
                Some(first) => Err(OutputRefusal::NotOurs {
                    path: path.to_path_buf(),
                    entries: names.len(),
                    example: first.clone(),
                }),
            }
        }
        Err(e) => Err(OutputRefusal::Unreadable {
            path: marker,
            message: e.to_string(),
        }),
    }
}

/// Files under `output` that symb did not write: every file (at any depth)
/// that `owned` does not list, the marker aside. Symlinks count as files and
/// are not followed.
pub fn foreign_files(output: &Path, owned: &BTreeMap<String, BlobRef>) -> Vec<String> {
    let mut found = Vec::new();
    let mut stack = vec![PathBuf::new()];
    while let Some(relative) = stack.pop() {
        let Ok(entries) = fs::read_dir(output.join(&relative)) else {
            continue;
        };
        for entry in entries.flatten() {
            let path = relative.join(entry.file_name());
            let label = path.to_string_lossy().into_owned();
            match entry.file_type() {
                Ok(kind) if kind.is_dir() => stack.push(path),
                Ok(_) if label != OUTPUT_MARKER && !owned.contains_key(&label) => found.push(label),
                _ => {}
            }
        }
    }
    found.sort();
    found
}

/// Whether `relative` is a plain path below `folder` that passes through no
/// symlink: only such paths of a marker are ever removed (a marker edited to
/// name `../x`, or a link the user put inside the folder, cannot make symb
/// remove a file elsewhere).
fn inside(folder: &Path, relative: &str) -> bool {
    let path = Path::new(relative);
    if relative.is_empty()
        || !path
            .components()
            .all(|c| matches!(c, std::path::Component::Normal(_)))
    {
        return false;
    }
    path.ancestors()
        .skip(1)
        .filter(|a| !a.as_os_str().is_empty())
        .all(|a| fs::symlink_metadata(folder.join(a)).is_ok_and(|m| m.is_dir()))
}

/// Removes from `folder` the files at `paths` (relative: what symb wrote
/// there) and the marker, and the folders they leave empty; returns what is
/// left, the user's (sorted).
pub fn remove_owned<'a>(
    folder: &Path,
    paths: impl IntoIterator<Item = &'a str>,
) -> Result<Vec<String>, CacheError> {
    let paths: Vec<&str> = paths
        .into_iter()
        .filter(|relative| inside(folder, relative))
        .collect();
    for &relative in paths.iter().chain(&[OUTPUT_MARKER]) {
        if !inside(folder, relative) {
            continue;
        }
        let path = folder.join(relative);
        match fs::remove_file(&path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                return Err(CacheError::io(&path, e));
            }
            _ => {}
        }
    }
    let mut folders: Vec<&Path> = paths
        .iter()
        .flat_map(|r| Path::new(r).ancestors().skip(1))
        .filter(|p| !p.as_os_str().is_empty())
        .collect();
    folders.sort_by_key(|p| (std::cmp::Reverse(p.components().count()), p.to_path_buf()));
    folders.dedup();
    for relative in folders {
        let _ = fs::remove_dir(folder.join(relative));
    }
    let mut left: Vec<String> = fs::read_dir(folder)
        .map_err(|e| CacheError::io(folder, e))?
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    left.sort();
    Ok(left)
}

/// Writes a marker that lists no files: the folder stays symb's, and all it
/// holds is the user's.
pub fn mark_empty(folder: &Path) -> Result<(), CacheError> {
    let marker = OutputMarker {
        about: MARKER_ABOUT.into(),
        files: BTreeMap::new(),
    };
    write_json_atomic(&folder.join(OUTPUT_MARKER), &marker, folder)
}

const MARKER_ABOUT: &str = "This folder was written by `symb build`, which replaces it on every \
    build. Files it does not list are yours: symb carries them into each new folder.";

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
    /// Status-change time (ns): changes on any write, even one whose mtime
    /// is then restored.
    pub ctime_ns: i128,
    /// The inode: a file replaced by another is noticed.
    pub inode: u64,
}

impl OutputFile {
    fn written(blob: BlobRef, meta: &fs::Metadata) -> Self {
        OutputFile {
            blob,
            mtime_ns: mtime_ns(meta),
            ctime_ns: ctime_ns(meta),
            inode: meta.ino(),
        }
    }

    /// True when `meta` is still the file symb wrote from `blob`.
    fn untouched(&self, blob: &BlobRef, meta: &fs::Metadata) -> bool {
        self.blob == *blob
            && meta.is_file()
            && meta.len() == blob.size
            && mtime_ns(meta) == self.mtime_ns
            && ctime_ns(meta) == self.ctime_ns
            && meta.ino() == self.inode
    }
}

fn state_path(cache: &Cache, project: &str) -> PathBuf {
    cache.refs_dir(project).join("output.json")
}

fn previous_state(cache: &Cache, project: &str) -> Option<OutputState> {
    fs::read(state_path(cache, project))
        .ok()
        .and_then(|b| serde_json::from_slice::<OutputState>(&b).ok())
}

/// The files of `wanted` that the current output already holds, untouched
/// since symb wrote them: the next assembly links them instead of copying.
pub fn reusable_outputs(
    cache: &Cache,
    project: &str,
    output: &Path,
    wanted: &BTreeMap<String, BlobRef>,
) -> BTreeSet<String> {
    let Some(state) = previous_state(cache, project) else {
        return Default::default();
    };
    wanted
        .iter()
        .filter(|(path, blob)| {
            let Some(file) = state.files.get(*path) else {
                return false;
            };
            fs::symlink_metadata(output.join(path)).is_ok_and(|meta| file.untouched(blob, &meta))
        })
        .map(|(path, _)| path.clone())
        .collect()
}

/// True when `output` still holds exactly the files `wanted` names, untouched
/// since symb wrote them, and its marker.
pub fn output_is_current(
    cache: &Cache,
    project: &str,
    output: &Path,
    wanted: &BTreeMap<String, BlobRef>,
) -> bool {
    let Some(state) = previous_state(cache, project) else {
        return false;
    };
    state.files.len() == wanted.len()
        && reusable_outputs(cache, project, output, wanted).len() == wanted.len()
        && output.join(OUTPUT_MARKER).is_file()
}

/// How an output folder differs from what a build would write there.
#[derive(Debug, Default, Clone, PartialEq, Serialize)]
pub struct OutputDrift {
    /// The folder is not there at all.
    pub absent: bool,
    /// Files the build writes that the folder lacks.
    pub missing: Vec<String>,
    /// Files whose bytes are not the build's: edited since, or left by
    /// another build (a failed swap, an older plan).
    pub differ: Vec<String>,
    /// Files symb wrote there that the build no longer writes.
    pub extra: Vec<String>,
}

impl OutputDrift {
    pub fn is_current(&self) -> bool {
        !self.absent && self.missing.is_empty() && self.differ.is_empty() && self.extra.is_empty()
    }
}

/// Compares `output` with `wanted` without writing anything: a file is
/// taken as it was written when its stat is the one recorded after symb
/// wrote it, and hashed otherwise.
pub fn output_drift(
    cache: &Cache,
    project: &str,
    output: &Path,
    wanted: &BTreeMap<String, BlobRef>,
) -> OutputDrift {
    let owned = match inspect_output(output) {
        Ok(OutputFolder::Owned(owned)) => owned,
        Ok(OutputFolder::Absent) => {
            return OutputDrift {
                absent: true,
                missing: wanted.keys().cloned().collect(),
                ..OutputDrift::default()
            };
        }
        // An empty folder, or one symb cannot take: every file is missing.
        _ => BTreeMap::new(),
    };
    let untouched = reusable_outputs(cache, project, output, wanted);
    let mut drift = OutputDrift {
        extra: owned
            .keys()
            .filter(|path| !wanted.contains_key(*path))
            .cloned()
            .collect(),
        ..OutputDrift::default()
    };
    for (path, blob) in wanted {
        if untouched.contains(path) && owned.get(path) == Some(blob) {
            continue;
        }
        match crate::cache::hash_file(&output.join(path)) {
            Err(_) => drift.missing.push(path.clone()),
            Ok((digest, size)) if digest == blob.digest && size == blob.size => {}
            Ok(_) => drift.differ.push(path.clone()),
        }
    }
    drift
}

/// Why the output folder was not updated.
#[derive(Debug, thiserror::Error)]
pub enum AssembleError {
    #[error(transparent)]
    Cache(#[from] CacheError),
    /// `check` refused the new folder (which was removed).
    #[error("{0}")]
    Rejected(String),
    /// The output path is not symb's to replace.
    #[error(transparent)]
    Refused(#[from] OutputRefusal),
    /// A file the user put in the output is where the build now writes one.
    #[error(
        "`{path}` in the output folder was not written by symb, and the build now writes a file \
            there; move it away and build again"
    )]
    Collision { path: String },
}

/// What an assembly did.
#[derive(Debug, Default)]
pub struct Assembled {
    /// Files of the user's found in the old folder and carried into the new one.
    pub kept: Vec<String>,
}

/// Builds the output folder from `files` (relative path -> blob), runs
/// `check` on the new folder, and swaps it in only if `check` passes.
pub fn assemble_output(
    cache: &Cache,
    project: &str,
    output: &Path,
    files: &BTreeMap<String, BlobRef>,
    check: &dyn Fn(&Path) -> Result<(), String>,
) -> Result<Assembled, AssembleError> {
    let owned = match inspect_output(output)? {
        OutputFolder::Owned(owned) => owned,
        OutputFolder::Absent | OutputFolder::Empty => BTreeMap::new(),
    };
    let kept = foreign_files(output, &owned);
    if let Some(path) = kept
        .iter()
        .find(|path| files.contains_key(*path) || path.as_str() == OUTPUT_MARKER)
    {
        return Err(AssembleError::Collision { path: path.clone() });
    }
    let parent = output
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    fs::create_dir_all(parent).map_err(|e| CacheError::io(parent, e))?;
    let name = output
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or("output");
    let staging = tempfile::Builder::new()
        .prefix(&format!(".{name}.symb-new-"))
        .tempdir_in(parent)
        .map_err(|e| CacheError::io(parent, e))?;
    // Files the old output holds unchanged are hard-linked into the new one
    // (the old folder keeps its own link until the swap): an edit to one
    // dtype's settings copies that dtype's files, not the whole folder.
    let reusable = reusable_outputs(cache, project, output, files);
    // Names with the same bytes are one file under several names (hard
    // links): the bytes are written, and take space, once.
    let mut written: BTreeMap<&str, PathBuf> = BTreeMap::new();
    for (relative, blob) in files {
        let dest = staging.path().join(relative);
        if let Some(dir) = dest.parent() {
            fs::create_dir_all(dir).map_err(|e| CacheError::io(dir, e))?;
        }
        let linked = match written.get(blob.digest.as_str()) {
            Some(first) => fs::hard_link(first, &dest).is_ok(),
            None => {
                reusable.contains(relative) && fs::hard_link(output.join(relative), &dest).is_ok()
            }
        };
        if !linked {
            cache.copy_blob_to(blob, &dest)?;
        }
        written.entry(blob.digest.as_str()).or_insert(dest);
    }
    let marker = OutputMarker {
        about: MARKER_ABOUT.into(),
        files: files.clone(),
    };
    write_json_atomic(&staging.path().join(OUTPUT_MARKER), &marker, staging.path())?;
    if let Err(findings) = check(staging.path()) {
        drop(staging);
        // Linking into the staging folder and removing it changed the ctime
        // of the reused files, not their content: record it, or the next
        // build would take them for edited.
        if let Some(mut state) = previous_state(cache, project) {
            for relative in &reusable {
                if let (Some(file), Ok(meta)) = (
                    state.files.get_mut(relative),
                    fs::symlink_metadata(output.join(relative)),
                ) {
                    file.ctime_ns = ctime_ns(&meta);
                }
            }
            write_json_atomic(&state_path(cache, project), &state, &cache.tmp_dir())?;
        }
        return Err(AssembleError::Rejected(findings));
    }
    // The user's files come along after the check, which judges what symb wrote.
    for relative in &kept {
        let (source, dest) = (output.join(relative), staging.path().join(relative));
        if let Some(dir) = dest.parent() {
            fs::create_dir_all(dir).map_err(|e| CacheError::io(dir, e))?;
        }
        if fs::hard_link(&source, &dest).is_err() {
            fs::copy(&source, &dest).map_err(|e| CacheError::io(&source, e))?;
        }
    }
    let staged = staging.keep();
    fs::File::open(&staged)
        .and_then(|d| d.sync_all())
        .map_err(|e| CacheError::io(&staged, e))?;
    fault::point("output-staged");
    if output.exists() {
        match rustix::fs::renameat_with(
            rustix::fs::CWD,
            &staged,
            rustix::fs::CWD,
            output,
            rustix::fs::RenameFlags::EXCHANGE,
        ) {
            Ok(()) => {}
            Err(_) => {
                // Without an atomic exchange: the old folder moves aside
                // (under a name the next build restores if this one dies
                // before the new folder is in place), then the new one in.
                let old = PathBuf::from(format!("{}.old", staged.display()));
                fs::rename(output, &old).map_err(|e| CacheError::io(output, e))?;
                fault::point("output-moved-aside");
                fs::rename(&staged, output).map_err(|e| CacheError::io(output, e))?;
                fs::rename(&old, &staged).map_err(|e| CacheError::io(&old, e))?;
            }
        }
        fault::point("output-swapped");
        // `staged` now holds the previous output: symb's files go, and what
        // the user put there after the listing above (or an empty folder)
        // moves into the new output.
        let mut stranded = false;
        for name in remove_owned(&staged, owned.keys().chain(&kept).map(String::as_str))? {
            let (from, to) = (staged.join(&name), output.join(&name));
            if fs::symlink_metadata(&to).is_ok() || fs::rename(&from, &to).is_err() {
                stranded = true;
            }
        }
        if stranded {
            let name = staged
                .file_name()
                .and_then(|n| n.to_str())
                .unwrap_or_default()
                .replace(".symb-new-", ".symb-kept-");
            let _ = fs::rename(&staged, staged.with_file_name(name));
        } else {
            let _ = fs::remove_dir(&staged);
        }
    } else {
        fs::rename(&staged, output).map_err(|e| CacheError::io(output, e))?;
        fault::point("output-swapped");
    }
    // Read after the old folder is gone: unlinking it changed the ctime of
    // the files the two shared.
    let mut state = OutputState::default();
    for (relative, blob) in files {
        let path = output.join(relative);
        let meta = fs::symlink_metadata(&path).map_err(|e| CacheError::io(&path, e))?;
        state
            .files
            .insert(relative.clone(), OutputFile::written(blob.clone(), &meta));
    }
    write_json_atomic(&state_path(cache, project), &state, &cache.tmp_dir())?;
    Ok(Assembled { kept })
}

/// How the output folder differs from what symb wrote there.
#[derive(Debug, Default, Clone, PartialEq, Serialize)]
pub struct OutputCheck {
    /// Files the marker lists and the folder holds.
    pub checked: usize,
    /// Files whose bytes differ from what symb wrote.
    pub changed: Vec<String>,
    /// Files the marker lists that are gone.
    pub missing: Vec<String>,
    /// Files symb did not write (kept as they are).
    pub foreign: Vec<String>,
}

/// Re-hashes every file symb wrote into `output` against its marker.
pub fn check_output(output: &Path) -> Result<OutputCheck, OutputRefusal> {
    let owned = match inspect_output(output)? {
        OutputFolder::Owned(owned) => owned,
        OutputFolder::Absent | OutputFolder::Empty => return Ok(OutputCheck::default()),
    };
    let mut report = OutputCheck {
        foreign: foreign_files(output, &owned),
        ..OutputCheck::default()
    };
    for (relative, blob) in &owned {
        match crate::cache::hash_file(&output.join(relative)) {
            Ok((digest, size)) if digest == blob.digest && size == blob.size => report.checked += 1,
            Ok(_) => {
                report.checked += 1;
                report.changed.push(relative.clone());
            }
            Err(_) => report.missing.push(relative.clone()),
        }
    }
    Ok(report)
}

fn mtime_ns(meta: &fs::Metadata) -> i128 {
    meta.mtime() as i128 * 1_000_000_000 + meta.mtime_nsec() as i128
}

fn ctime_ns(meta: &fs::Metadata) -> i128 {
    meta.ctime() as i128 * 1_000_000_000 + meta.ctime_nsec() as i128
}
