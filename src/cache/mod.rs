//! The content-addressed artifact store.
//!
//! Layout of a cache folder (the bucket is versioned, as uv does, so a future
//! change of format starts a new bucket instead of misreading an old one):
//!
//! ```text
//! cache/
//!   CACHEDIR.TAG             marks the folder as a cache (backup tools skip it)
//!   lock                     exclusive lock held by a build (std file lock)
//!   v1/blobs/ab/<hex>        artifact bytes, named by their blake3 digest
//!   v1/actions/<key>.json    one action record per stage key: the commit point
//!   v1/refs/<project>/...    the last key each stage of a project was built with
//!                            (to explain re-runs) and the state of its output folder
//!   v1/stat.json             stat cache: (path, size, mtime, inode) -> digest
//!   v1/tmp/                  work folders of running stages, temp files
//!   v1/checkpoints/<key>/    checkpoints of a long stage, kept until it commits
//! ```
//!
//! Every write goes to a temp file inside the cache, is fsynced, then renamed
//! into place, so a reader sees either nothing or the whole file. A stage's
//! action record is written after all of its blobs: a build killed at any
//! point leaves at worst unreferenced blobs and temp files, which `gc` and the
//! next build remove. Blob sizes are checked on every lookup; a blob that is
//! read to be used is re-hashed as it is read, and `verify` re-hashes all.

mod atomic;
pub mod fault;
mod lock;
pub mod remote;
mod stat;

pub use atomic::{write_atomic, write_json_atomic};
pub use lock::CacheLock;
pub use remote::{Held, S3Store, Store, StoreError};
pub use stat::StatCache;

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// Version of the on-disk layout; part of the bucket name.
const BUCKET: &str = "v1";

/// The Cache Directory Tagging Specification's file, as cargo writes in
/// `target/`: backup tools skip the folder, and symb knows it as its own.
pub const CACHEDIR_TAG: &str = "CACHEDIR.TAG";
const CACHEDIR_TAG_TEXT: &str = "Signature: 8a477f597d28d172789f06886806bc55\n# This file is a \
    cache directory tag created by symb.\n# For information about cache directory tags see \
    https://bford.info/cachedir/\n";

/// A blake3 digest as lowercase hex.
pub type Digest = String;

#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    #[error("cache I/O error on `{path}`: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// A write failed: a full disk, a read-only cache, permissions.
    #[error("cannot write `{path}`: {source}")]
    Write {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("corrupt cache entry `{path}`: {what}")]
    Corrupt { path: PathBuf, what: String },
}

impl CacheError {
    pub fn io(path: impl Into<PathBuf>, source: io::Error) -> Self {
        CacheError::Io {
            path: path.into(),
            source,
        }
    }

    pub fn write(path: impl Into<PathBuf>, source: io::Error) -> Self {
        CacheError::Write {
            path: path.into(),
            source,
        }
    }
}

/// One artifact a stage produced: its digest and size in bytes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlobRef {
    /// blake3 of the artifact's bytes, hex.
    pub digest: Digest,
    /// Length in bytes; checked against the blob file on every lookup.
    pub size: u64,
}

/// The record of one stage execution, keyed by its stage key. Written last:
/// its presence means every blob it names was complete when it was written.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ActionRecord {
    /// The stage key (blake3 of `inputs`, canonical JSON).
    pub key: Digest,
    /// The stage's name in the plan, e.g. `tokenizer`.
    pub stage: String,
    /// Everything the key was computed from, kept to explain later re-runs.
    pub inputs: serde_json::Value,
    /// Artifact name -> blob.
    pub outputs: BTreeMap<String, BlobRef>,
    /// Stage-specific figures (sizes, counts, losses) for reports.
    pub metrics: serde_json::Value,
    /// Wall time of the run that produced this record.
    pub seconds: f64,
    /// What the stage warned of, said again whenever the record is used.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub warnings: Vec<Warning>,
}

/// Something a stage found that its user should act on (the build still
/// succeeds): a stable code for machines, what was found, and the fix.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Warning {
    pub code: String,
    pub message: String,
    pub help: String,
}

/// A handle on one cache folder.
#[derive(Debug, Clone)]
pub struct Cache {
    root: PathBuf,
    bucket: PathBuf,
}

impl Cache {
    /// Opens (creating if needed) the cache at `root`.
    pub fn open(root: &Path) -> Result<Self, CacheError> {
        // The tag first, then the bucket: a build starting beside this one
        // then never sees the folder holding files without the tag (see
        // [`Cache::is_cache`]). Created in place, not through `tmp/`: a build
        // holding the lock empties `tmp/` while another may be opening it.
        fs::create_dir_all(root).map_err(|e| CacheError::write(root, e))?;
        let tag = root.join(CACHEDIR_TAG);
        match fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&tag)
        {
            Ok(mut file) => file
                .write_all(CACHEDIR_TAG_TEXT.as_bytes())
                .map_err(|e| CacheError::write(&tag, e))?,
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
            // A read-only cache that has its tag is still read.
            Err(_) if tag.is_file() => {}
            Err(e) => return Err(CacheError::write(&tag, e)),
        }
        let bucket = root.join(BUCKET);
        for sub in ["blobs", "actions", "refs", "tmp"] {
            let dir = bucket.join(sub);
            fs::create_dir_all(&dir).map_err(|e| CacheError::write(&dir, e))?;
        }
        Ok(Cache {
            root: root.to_path_buf(),
            bucket,
        })
    }

    /// True when `root` holds a symb cache: symb's own tag (other tools,
    /// cargo among them, write the same standard file), or an empty tag
    /// (another build has just created it and is writing it, one write; no
    /// tool leaves a tag without its signature), or its bucket.
    pub fn is_cache(root: &Path) -> bool {
        fs::read_to_string(root.join(CACHEDIR_TAG))
            .is_ok_and(|tag| tag.is_empty() || tag == CACHEDIR_TAG_TEXT)
            || root.join(BUCKET).join("blobs").is_dir()
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The versioned folder that holds everything the cache stores.
    pub fn bucket(&self) -> PathBuf {
        self.bucket.clone()
    }

    pub fn tmp_dir(&self) -> PathBuf {
        self.bucket.join("tmp")
    }

    pub fn stat_cache_path(&self) -> PathBuf {
        self.bucket.join("stat.json")
    }

    pub fn refs_dir(&self, project: &str) -> PathBuf {
        self.bucket.join("refs").join(project)
    }

    /// Takes the cache's exclusive lock, waiting for another build to finish.
    pub fn lock(&self, on_wait: impl FnOnce()) -> Result<CacheLock, CacheError> {
        CacheLock::acquire(&self.root.join("lock"), on_wait)
    }

    /// Removes leftovers of killed builds (work folders and temp files).
    /// Call only while holding the lock.
    pub fn clear_tmp(&self) -> Result<(), CacheError> {
        let tmp = self.tmp_dir();
        let entries = fs::read_dir(&tmp).map_err(|e| CacheError::io(&tmp, e))?;
        for entry in entries {
            let path = entry.map_err(|e| CacheError::io(&tmp, e))?.path();
            let result = if path.is_dir() {
                fs::remove_dir_all(&path)
            } else {
                fs::remove_file(&path)
            };
            result.map_err(|e| CacheError::io(&path, e))?;
        }
        Ok(())
    }

    /// A fresh, empty folder under `tmp/` for a stage to write its artifacts in.
    pub fn work_dir(&self, label: &str) -> Result<tempfile::TempDir, CacheError> {
        tempfile::Builder::new()
            .prefix(&format!("{label}-"))
            .tempdir_in(self.tmp_dir())
            .map_err(|e| CacheError::write(self.tmp_dir(), e))
    }

    /// Where a stage with this key keeps checkpoints across killed builds.
    pub fn checkpoint_dir(&self, key: &str) -> PathBuf {
        self.bucket.join("checkpoints").join(key)
    }

    pub fn blob_path(&self, digest: &str) -> PathBuf {
        let prefix = digest.get(..2).unwrap_or("00");
        self.bucket.join("blobs").join(prefix).join(digest)
    }

    fn action_path(&self, key: &str) -> PathBuf {
        self.bucket.join("actions").join(format!("{key}.json"))
    }

    /// Moves a finished artifact file into the store and returns its reference.
    /// The file is hashed, fsynced and renamed; an identical blob already
    /// present is kept and the file dropped.
    pub fn put_file(&self, file: &Path) -> Result<BlobRef, CacheError> {
        let (digest, size) = hash_file(file)?;
        let dest = self.blob_path(&digest);
        if let Ok(meta) = fs::metadata(&dest)
            && meta.len() == size
        {
            fs::remove_file(file).map_err(|e| CacheError::io(file, e))?;
            return Ok(BlobRef { digest, size });
        }
        let parent = dest.parent().expect("blob paths have a parent");
        fs::create_dir_all(parent).map_err(|e| CacheError::write(parent, e))?;
        fs::File::open(file)
            .and_then(|f| f.sync_all())
            .map_err(|e| CacheError::io(file, e))?;
        fs::rename(file, &dest).map_err(|e| CacheError::write(&dest, e))?;
        Ok(BlobRef { digest, size })
    }

    /// True when the blob exists with the recorded size (the cheap check made
    /// on every lookup).
    pub fn blob_present(&self, blob: &BlobRef) -> bool {
        fs::metadata(self.blob_path(&blob.digest)).is_ok_and(|m| m.len() == blob.size)
    }

    /// Re-hashes a blob. A blob whose bytes no longer match its name is
    /// deleted (so the next lookup misses and the stage re-runs) and reported.
    pub fn check_blob(&self, blob: &BlobRef) -> Result<(), CacheError> {
        let path = self.blob_path(&blob.digest);
        let (digest, size) = hash_file(&path)?;
        if digest != blob.digest || size != blob.size {
            let _ = fs::remove_file(&path);
            return Err(CacheError::Corrupt {
                path,
                what: format!(
                    "content hashes to {} ({size} bytes), expected {} ({} bytes)",
                    short(&digest),
                    short(&blob.digest),
                    blob.size
                ),
            });
        }
        Ok(())
    }

    /// Copies a blob to `dest`, hashing what it reads; a mismatch deletes the
    /// blob and fails, so corrupt bytes are never served.
    pub fn copy_blob_to(&self, blob: &BlobRef, dest: &Path) -> Result<(), CacheError> {
        let src = self.blob_path(&blob.digest);
        let mut reader = fs::File::open(&src).map_err(|e| CacheError::io(&src, e))?;
        let mut writer = fs::File::create(dest).map_err(|e| CacheError::io(dest, e))?;
        let mut hasher = blake3::Hasher::new();
        let mut buf = vec![0u8; 1 << 20];
        let mut size = 0u64;
        loop {
            let n = reader.read(&mut buf).map_err(|e| CacheError::io(&src, e))?;
            if n == 0 {
                break;
            }
            hasher.update(&buf[..n]);
            writer
                .write_all(&buf[..n])
                .map_err(|e| CacheError::io(dest, e))?;
            size += n as u64;
        }
        let digest = hasher.finalize().to_hex().to_string();
        if digest != blob.digest || size != blob.size {
            let _ = fs::remove_file(&src);
            return Err(CacheError::Corrupt {
                path: src,
                what: "content does not match its digest".into(),
            });
        }
        writer.sync_all().map_err(|e| CacheError::io(dest, e))
    }

    /// The action record for `key`, if one was committed and all its blobs
    /// are present with their recorded sizes.
    pub fn lookup(&self, key: &str) -> Option<ActionRecord> {
        let bytes = fs::read(self.action_path(key)).ok()?;
        let record: ActionRecord = serde_json::from_slice(&bytes).ok()?;
        if record.key != key || !record.outputs.values().all(|b| self.blob_present(b)) {
            return None;
        }
        Some(record)
    }

    /// Commits an action record (after its blobs are in place).
    pub fn commit(&self, record: &ActionRecord) -> Result<(), CacheError> {
        write_json_atomic(&self.action_path(&record.key), record, &self.tmp_dir())
    }

    /// Every committed action record (for gc and verify).
    pub fn actions(&self) -> Result<Vec<(PathBuf, Option<ActionRecord>)>, CacheError> {
        let dir = self.bucket.join("actions");
        let mut out = Vec::new();
        for entry in fs::read_dir(&dir).map_err(|e| CacheError::io(&dir, e))? {
            let path = entry.map_err(|e| CacheError::io(&dir, e))?.path();
            let record = fs::read(&path)
                .ok()
                .and_then(|b| serde_json::from_slice(&b).ok());
            out.push((path, record));
        }
        out.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(out)
    }

    /// Every blob file: (digest named by the file, path).
    pub fn blobs(&self) -> Result<Vec<(String, PathBuf)>, CacheError> {
        let dir = self.bucket.join("blobs");
        let mut out = Vec::new();
        for prefix in fs::read_dir(&dir).map_err(|e| CacheError::io(&dir, e))? {
            let prefix = prefix.map_err(|e| CacheError::io(&dir, e))?.path();
            for entry in fs::read_dir(&prefix).map_err(|e| CacheError::io(&prefix, e))? {
                let path = entry.map_err(|e| CacheError::io(&prefix, e))?.path();
                let name = path
                    .file_name()
                    .and_then(|n| n.to_str())
                    .unwrap_or_default()
                    .to_string();
                out.push((name, path));
            }
        }
        out.sort();
        Ok(out)
    }

    /// Re-hashes every blob and checks every action record. What is corrupt
    /// is reported; with `repair` it is also removed, so that the next build
    /// recomputes it (a build also removes a corrupt blob it is about to use).
    pub fn verify(&self, repair: bool) -> Result<VerifyReport, CacheError> {
        let mut report = VerifyReport {
            repaired: repair,
            ..VerifyReport::default()
        };
        let remove = |path: &Path| {
            if repair {
                fs::remove_file(path).map_err(|e| CacheError::io(path, e))
            } else {
                Ok(())
            }
        };
        for (name, path) in self.blobs()? {
            report.blobs += 1;
            let (digest, _) = hash_file(&path)?;
            if digest != name {
                remove(&path)?;
                report
                    .corrupt
                    .push(format!("blob {} does not match its content", short(&name)));
            }
        }
        for (path, record) in self.actions()? {
            report.actions += 1;
            match record {
                None => {
                    remove(&path)?;
                    report
                        .corrupt
                        .push(format!("action record `{}` is unreadable", path.display()));
                }
                Some(record) => {
                    for (name, blob) in &record.outputs {
                        if !self.blob_present(blob) {
                            report.missing.push(format!(
                                "{}: artifact `{name}` ({}) is missing; the stage will re-run",
                                record.stage,
                                short(&blob.digest)
                            ));
                        }
                    }
                }
            }
        }
        Ok(report)
    }

    /// Deletes action records not in `keep`, blobs no kept record names, and
    /// the checkpoints of keys not in `keep` (abandoned trainings).
    pub fn gc(&self, keep: &BTreeSet<String>, dry_run: bool) -> Result<GcReport, CacheError> {
        let mut report = GcReport::default();
        let mut live_blobs = BTreeSet::new();
        // What each blob of a dropped record was, to name it.
        let mut dropped_names: BTreeMap<Digest, String> = BTreeMap::new();
        for (path, record) in self.actions()? {
            match record {
                Some(r) if keep.contains(&r.key) => {
                    live_blobs.extend(r.outputs.values().map(|b| b.digest.clone()));
                }
                other => {
                    report.actions_removed += 1;
                    let name = match &other {
                        Some(r) => {
                            for (artifact, blob) in &r.outputs {
                                dropped_names
                                    .entry(blob.digest.clone())
                                    .or_insert_with(|| format!("{}/{artifact}", r.stage));
                            }
                            format!("the record of `{}` (key {})", r.stage, short(&r.key))
                        }
                        None => format!("an unreadable record `{}`", path.display()),
                    };
                    let bytes = fs::metadata(&path).map_or(0, |m| m.len());
                    report.bytes_freed += bytes;
                    report.removed.push(GcEntry { what: name, bytes });
                    if !dry_run {
                        fs::remove_file(&path).map_err(|e| CacheError::io(&path, e))?;
                    }
                }
            }
        }
        let checkpoints = self.bucket.join("checkpoints");
        for entry in fs::read_dir(&checkpoints).into_iter().flatten().flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if keep.contains(&name) {
                continue;
            }
            let path = entry.path();
            let bytes = folder_size(&path);
            report.checkpoints_removed += 1;
            report.bytes_freed += bytes;
            report.removed.push(GcEntry {
                what: format!(
                    "the checkpoints of an interrupted stage (key {})",
                    short(&name)
                ),
                bytes,
            });
            if !dry_run {
                fs::remove_dir_all(&path).map_err(|e| CacheError::io(&path, e))?;
            }
        }
        for (name, path) in self.blobs()? {
            if live_blobs.contains(&name) {
                continue;
            }
            let bytes = fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
            report.blobs_removed += 1;
            report.bytes_freed += bytes;
            let what = match dropped_names.get(&name) {
                Some(artifact) => format!("`{artifact}` ({})", short(&name)),
                None => format!("blob {} (no record names it)", short(&name)),
            };
            report.removed.push(GcEntry { what, bytes });
            if !dry_run {
                fs::remove_file(&path).map_err(|e| CacheError::io(&path, e))?;
            }
        }
        Ok(report)
    }
}

#[derive(Debug, Default, Serialize)]
pub struct VerifyReport {
    pub blobs: usize,
    pub actions: usize,
    pub corrupt: Vec<String>,
    pub missing: Vec<String>,
    /// Whether what is corrupt was removed.
    pub repaired: bool,
}

#[derive(Debug, Default, Serialize)]
pub struct GcReport {
    pub actions_removed: usize,
    pub blobs_removed: usize,
    pub checkpoints_removed: usize,
    pub bytes_freed: u64,
    /// Each thing removed (or, in a dry run, that would be).
    pub removed: Vec<GcEntry>,
}

/// One thing `gc` removes: what it was, and its size.
#[derive(Debug, Clone, Serialize)]
pub struct GcEntry {
    pub what: String,
    pub bytes: u64,
}

/// The bytes of the files under `path`.
fn folder_size(path: &Path) -> u64 {
    let Ok(entries) = fs::read_dir(path) else {
        return fs::metadata(path).map_or(0, |m| m.len());
    };
    entries
        .flatten()
        .map(|e| {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                folder_size(&e.path())
            } else {
                e.metadata().map_or(0, |m| m.len())
            }
        })
        .sum()
}

/// blake3 of a file's bytes, streaming, with its length.
pub fn hash_file(path: &Path) -> Result<(Digest, u64), CacheError> {
    let mut hasher = blake3::Hasher::new();
    let file = fs::File::open(path).map_err(|e| CacheError::io(path, e))?;
    hasher
        .update_reader(file)
        .map_err(|e| CacheError::io(path, e))?;
    let size = hasher.count();
    Ok((hasher.finalize().to_hex().to_string(), size))
}

/// The first 12 hex digits of a digest, for messages.
pub fn short(digest: &str) -> &str {
    digest.get(..12).unwrap_or(digest)
}
