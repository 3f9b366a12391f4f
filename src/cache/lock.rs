//! The cache lock: an exclusive advisory lock (std's `File::lock`, flock on
//! Linux) on `cache/lock`, held for a whole build. The kernel drops it when
//! the process dies, so a killed build never leaves a stale lock behind.

use std::fs::{File, OpenOptions, TryLockError};
use std::path::Path;

use super::CacheError;

#[derive(Debug)]
pub struct CacheLock {
    _file: File,
}

impl CacheLock {
    /// Takes the lock; if another process holds it, calls `on_wait` once and
    /// blocks until it is free.
    pub fn acquire(path: &Path, on_wait: impl FnOnce()) -> Result<Self, CacheError> {
        let file = OpenOptions::new().create(true).truncate(false).write(true).open(path).map_err(|e| CacheError::io(path, e))?;
        match file.try_lock() {
            Ok(()) => {}
            Err(TryLockError::WouldBlock) => {
                on_wait();
                file.lock().map_err(|e| CacheError::io(path, e))?;
            }
            Err(TryLockError::Error(e)) => return Err(CacheError::io(path, e)),
        }
        Ok(CacheLock { _file: file })
    }
}
