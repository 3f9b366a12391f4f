//! Atomic file writes: a temp file in a folder on the same filesystem, fsync,
//! rename over the destination. Readers see the old file or the new one.

use std::io::Write;
use std::path::Path;

use serde::Serialize;

use super::CacheError;

/// Writes `bytes` to `dest` atomically, staging the temp file in `tmp_dir`
/// (which must be on the same filesystem as `dest`).
pub fn write_atomic(dest: &Path, bytes: &[u8], tmp_dir: &Path) -> Result<(), CacheError> {
    if let Some(parent) = dest.parent() {
        std::fs::create_dir_all(parent).map_err(|e| CacheError::write(parent, e))?;
    }
    let mut file =
        tempfile::NamedTempFile::new_in(tmp_dir).map_err(|e| CacheError::write(tmp_dir, e))?;
    file.write_all(bytes)
        .map_err(|e| CacheError::write(file.path(), e))?;
    file.as_file()
        .sync_all()
        .map_err(|e| CacheError::write(file.path(), e))?;
    file.persist(dest)
        .map_err(|e| CacheError::write(dest, e.error))?;
    Ok(())
}

pub fn write_json_atomic<T: Serialize>(
    dest: &Path,
    value: &T,
    tmp_dir: &Path,
) -> Result<(), CacheError> {
    let mut bytes = serde_json::to_vec_pretty(value).expect("records serialise");
    bytes.push(b'\n');
    write_atomic(dest, &bytes, tmp_dir)
}
