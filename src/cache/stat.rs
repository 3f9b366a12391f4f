//! The stat cache: (path, size, mtime, ctime, inode) -> content digest, so an
//! unchanged input file is not re-read. As git does for its index, an entry
//! whose file was modified less than a second before it was recorded is not
//! trusted ("racily clean": a second write in the same timestamp tick would go
//! unseen), so such a file is simply hashed again next time.

use std::collections::BTreeMap;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use super::{CacheError, Digest, hash_file, write_json_atomic};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Entry {
    /// File length in bytes.
    size: u64,
    /// Modification time, nanoseconds since the epoch.
    mtime_ns: i128,
    /// Status change time, nanoseconds since the epoch.
    ctime_ns: i128,
    /// Inode number.
    inode: u64,
    /// blake3 of the content, hex.
    digest: Digest,
}

#[derive(Debug, Default)]
pub struct StatCache {
    entries: BTreeMap<PathBuf, Entry>,
    dirty: bool,
}

impl StatCache {
    /// Loads the stat cache; a missing or unreadable file gives an empty one.
    pub fn load(path: &Path) -> Self {
        let entries = std::fs::read(path)
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default();
        StatCache {
            entries,
            dirty: false,
        }
    }

    /// The digest of `path`'s content, from the cache when its stat matches.
    pub fn digest(&mut self, path: &Path) -> Result<Digest, CacheError> {
        let meta = std::fs::metadata(path).map_err(|e| CacheError::io(path, e))?;
        let stat = |digest: Digest| Entry {
            size: meta.len(),
            mtime_ns: meta.mtime() as i128 * 1_000_000_000 + meta.mtime_nsec() as i128,
            ctime_ns: meta.ctime() as i128 * 1_000_000_000 + meta.ctime_nsec() as i128,
            inode: meta.ino(),
            digest,
        };
        if let Some(entry) = self.entries.get(path)
            && *entry == stat(entry.digest.clone())
        {
            return Ok(entry.digest.clone());
        }
        tracing::debug!(path = %path.display(), "hashing input file");
        let (digest, _) = hash_file(path)?;
        let entry = stat(digest.clone());
        let now_ns = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos() as i128)
            .unwrap_or(0);
        if now_ns - entry.mtime_ns.max(entry.ctime_ns) > 1_000_000_000 {
            self.entries.insert(path.to_path_buf(), entry);
            self.dirty = true;
        }
        Ok(digest)
    }

    /// Writes the cache back if it changed.
    pub fn save(&mut self, path: &Path, tmp_dir: &Path) -> Result<(), CacheError> {
        if self.dirty {
            write_json_atomic(path, &self.entries, tmp_dir)?;
            self.dirty = false;
        }
        Ok(())
    }
}
