//! Sending records to the shared store: each blob the remote lacks (or
//! holds with other bytes) re-hashed before it goes, then the record, last,
//! as the commit point. The executor uploads what a build ran; the
//! dispatcher and the worker upload what a job needs and made.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Mutex;

use crate::cache::{ActionRecord, BlobRef, Cache, CacheError, Held, Store, StoreError};

/// Threads that upload at once.
pub(super) const UPLOAD_THREADS: usize = 4;

/// What [`upload`] sent.
#[derive(Debug, Default, Clone)]
pub struct Uploaded {
    /// Bytes sent.
    pub bytes: u64,
    /// Blobs the remote held with other bytes, replaced.
    pub replaced: Vec<String>,
}

/// Why a record could not be uploaded.
#[derive(Debug, thiserror::Error)]
pub enum UploadError {
    #[error("{0}")]
    Store(#[from] StoreError),
    /// A local blob's bytes are not its digest's: refused (and removed, so
    /// that the next build rebuilds it).
    #[error("{0}")]
    Local(#[from] CacheError),
}

/// Uploads a record's blobs that the remote lacks or holds with other bytes
/// (and those in `replace`, found corrupt there), each re-hashed before it
/// goes, then the record (last: the commit point).
pub fn upload(
    cache: &Cache,
    remote: &dyn Store,
    record: &ActionRecord,
    replace: &BTreeSet<String>,
) -> Result<Uploaded, UploadError> {
    let mut done = Uploaded::default();
    for blob in record.outputs.values() {
        done.add(
            blob,
            send_blob(cache, remote, blob, replace.contains(&blob.digest))?,
        );
    }
    remote.commit(record)?;
    Ok(done)
}

/// What [`send_blob`] did: nothing (the remote has the bytes), or sent
/// them, over other bytes or not.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Sent {
    Nothing,
    New,
    Replaced,
}

impl Uploaded {
    fn add(&mut self, blob: &BlobRef, sent: Sent) {
        if sent != Sent::Nothing {
            self.bytes += blob.size;
        }
        if sent == Sent::Replaced {
            self.replaced.push(blob.digest.clone());
        }
    }
}

/// One blob to the remote unless it holds the same bytes (or `replace`).
fn send_blob(
    cache: &Cache,
    remote: &dyn Store,
    blob: &BlobRef,
    replace: bool,
) -> Result<Sent, UploadError> {
    let path = cache.blob_path(&blob.digest);
    let held = if replace {
        Held::Differs
    } else {
        remote.blob_state(blob, &path)?
    };
    let sent = match held {
        Held::Same => return Ok(Sent::Nothing),
        Held::Missing => Sent::New,
        Held::Differs => Sent::Replaced,
    };
    // The digest is the blob's name: bytes that are not its own never go.
    cache.check_blob(blob)?;
    remote.put_blob(blob, &path)?;
    Ok(sent)
}

/// [`upload`] of several records: their blobs, each once however many
/// records name it, [`UPLOAD_THREADS`] at a time, then each record whose
/// blobs all went. The results in the records' order (a failed blob fails
/// every record that names it); a blob's bytes count for the first record
/// that names it.
pub fn upload_all(
    cache: &Cache,
    remote: &dyn Store,
    records: &[ActionRecord],
) -> Vec<Result<Uploaded, std::sync::Arc<UploadError>>> {
    let blobs: Vec<&BlobRef> = records
        .iter()
        .flat_map(|r| r.outputs.values())
        .map(|b| (&b.digest, b))
        .collect::<BTreeMap<_, _>>()
        .into_values()
        .collect();
    let next = std::sync::atomic::AtomicUsize::new(0);
    let sent: Mutex<BTreeMap<String, Result<Sent, std::sync::Arc<UploadError>>>> = Mutex::default();
    std::thread::scope(|threads| {
        for _ in 0..UPLOAD_THREADS.min(blobs.len()) {
            threads.spawn(|| {
                while let Some(blob) =
                    blobs.get(next.fetch_add(1, std::sync::atomic::Ordering::Relaxed))
                {
                    let result = send_blob(cache, remote, blob, false).map_err(std::sync::Arc::new);
                    sent.lock()
                        .expect("sent lock")
                        .insert(blob.digest.clone(), result);
                }
            });
        }
    });
    let mut sent = sent.into_inner().expect("sent lock");
    records
        .iter()
        .map(|record| {
            let mut done = Uploaded::default();
            for blob in record.outputs.values() {
                match sent.get_mut(&blob.digest).expect("every blob was tried") {
                    Ok(result) => done.add(blob, std::mem::replace(result, Sent::Nothing)),
                    Err(e) => return Err(e.clone()),
                }
            }
            remote
                .commit(record)
                .map_err(|e| std::sync::Arc::new(e.into()))?;
            Ok(done)
        })
        .collect()
}
