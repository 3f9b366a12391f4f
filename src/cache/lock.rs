//! The cache lock: an exclusive advisory lock (std's `File::lock`, flock on
//! Linux) on `cache/lock`, held for a whole build. The kernel drops it when
//! the process dies, so a killed build never leaves a stale lock behind.
//!
//! A cache this process cannot write (a read-only mount, another user's
//! files) is still read: the lock file is opened read-only and locked
//! shared, which a writer's exclusive lock excludes; without a lock file
//! (nobody could have written one) nothing is locked. What then needs a
//! write fails on that write, with `cannot write` and the path.

use std::fs::{File, OpenOptions, TryLockError};
use std::io::ErrorKind;
use std::path::Path;

use super::CacheError;

#[derive(Debug)]
pub struct CacheLock {
    _file: Option<File>,
    read_only: bool,
}

impl CacheLock {
    /// Takes the lock; if another process holds it, calls `on_wait` once and
    /// blocks until it is free.
    pub fn acquire(path: &Path, on_wait: impl FnOnce()) -> Result<Self, CacheError> {
        let (file, read_only) = match OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(path)
        {
            Ok(file) => (Some(file), false),
            Err(e)
                if matches!(
                    e.kind(),
                    ErrorKind::ReadOnlyFilesystem | ErrorKind::PermissionDenied
                ) =>
            {
                match File::open(path) {
                    Ok(file) => (Some(file), true),
                    Err(e) if e.kind() == ErrorKind::NotFound => (None, true),
                    Err(e) => return Err(CacheError::io(path, e)),
                }
            }
            Err(e) => return Err(CacheError::write(path, e)),
        };
        if let Some(file) = &file {
            let attempt = if read_only {
                file.try_lock_shared()
            } else {
                file.try_lock()
            };
            match attempt {
                Ok(()) => {}
                Err(TryLockError::WouldBlock) => {
                    on_wait();
                    let locked = if read_only {
                        file.lock_shared()
                    } else {
                        file.lock()
                    };
                    locked.map_err(|e| CacheError::io(path, e))?;
                }
                Err(TryLockError::Error(e)) => return Err(CacheError::io(path, e)),
            }
        }
        Ok(CacheLock {
            _file: file,
            read_only,
        })
    }

    /// True when the cache cannot be written by this process: only what
    /// reads it may go on.
    pub fn read_only(&self) -> bool {
        self.read_only
    }
}
