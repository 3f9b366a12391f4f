//! The store seam: what a build needs from a place that holds action records
//! and blobs (look a record up, has/get/put a blob, commit a record), and a
//! remote one over S3 (`object_store`), which the local cache sits in front
//! of. A record is written after its blobs, so a record never names a blob
//! the store lacks; blobs are named by their blake3 digest and checked
//! against it when fetched.
//!
//! Layout under the remote's prefix, as the local cache's: `v1/actions/<key>.json`
//! and `v1/blobs/<digest>`.

use std::io::Write;
use std::path::{Path, PathBuf};

use super::{ActionRecord, BlobRef};

/// Why a remote store could not be used. Messages never carry credentials.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{0}")]
    Config(String),
    #[error("{store}: {message}")]
    Remote { store: String, message: String },
    #[error("`{}`: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{store}: the blob {digest} has the content {actual}: not used")]
    Corrupt {
        store: String,
        digest: String,
        actual: String,
    },
}

/// What a store holds under a blob's name, against the blob's own bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Held {
    /// Nothing.
    Missing,
    /// The blob (as far as the store can tell without a download: its size,
    /// and its content's MD5 where the store's ETag is one).
    Same,
    /// Other bytes under the blob's name: a corrupt object, to be replaced.
    Differs,
}

/// A store of action records and blobs.
pub trait Store: Send + Sync {
    /// Where it is, for messages (no credentials).
    fn describe(&self) -> String;
    /// The record for `key`, if the store has one.
    fn lookup(&self, key: &str) -> Result<Option<ActionRecord>, StoreError>;
    /// Whether the store has a record for `key` (without reading it).
    fn has_record(&self, key: &str) -> Result<bool, StoreError>;
    /// What the store holds under `blob`'s name, against its bytes in the
    /// file `local`.
    fn blob_state(&self, blob: &BlobRef, local: &Path) -> Result<Held, StoreError>;
    /// Writes the blob to `dest` (a new file), checked against its digest.
    fn get_blob(&self, blob: &BlobRef, dest: &Path) -> Result<(), StoreError>;
    /// Stores the file `src` as `blob`; nothing half-written is visible.
    fn put_blob(&self, blob: &BlobRef, src: &Path) -> Result<(), StoreError>;
    /// Commits a record whose blobs are all stored.
    fn commit(&self, record: &ActionRecord) -> Result<(), StoreError>;
}

/// Blobs above this go up in parts.
const MULTIPART_ABOVE: u64 = 16 << 20;
/// Part size of a multipart upload.
const PART: usize = 8 << 20;

/// An S3 bucket (or an S3-compatible server) under a prefix.
pub struct S3Store {
    store: object_store::aws::AmazonS3,
    prefix: String,
    url: String,
    runtime: tokio::runtime::Runtime,
}

impl S3Store {
    /// `s3://bucket/prefix`, with credentials, region and endpoint from the
    /// standard AWS variables (`AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`,
    /// `AWS_REGION`, `AWS_ENDPOINT_URL`, `AWS_ALLOW_HTTP`).
    pub fn open(url: &str) -> Result<Self, StoreError> {
        let env: Vec<(String, String)> = std::env::vars_os()
            .filter_map(|(k, v)| Some((k.into_string().ok()?, v.into_string().ok()?)))
            .filter(|(k, _)| k.starts_with("AWS_"))
            .collect();
        Self::open_with(url, &env)
    }

    /// [`open`](Self::open) with the AWS variables given, not read from the
    /// environment.
    pub fn open_with(url: &str, variables: &[(String, String)]) -> Result<Self, StoreError> {
        let rest = url.strip_prefix("s3://").ok_or_else(|| {
            StoreError::Config(format!(
                "the cache remote `{url}` is not an s3://bucket/prefix URL"
            ))
        })?;
        let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
        if bucket.is_empty() {
            return Err(StoreError::Config(format!(
                "the cache remote `{url}` names no bucket"
            )));
        }
        // The standard AWS variables, as `from_env` reads them, but an empty
        // one counts as unset (CI templates often set `AWS_ENDPOINT_URL: ""`).
        // A remote that is down must not stall a build: a few quick retries
        // (object_store's default retries for up to three minutes). Set
        // first: the variables below (AWS_ALLOW_HTTP) adjust these options.
        let retry = object_store::RetryConfig {
            max_retries: 2,
            retry_timeout: std::time::Duration::from_secs(20),
            backoff: object_store::BackoffConfig::default(),
        };
        // TLS through rustls on ring, the one provider in the build (see
        // Cargo.toml); installed once per process, here where it is needed.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let client = object_store::ClientOptions::new()
            .with_connect_timeout(std::time::Duration::from_secs(5));
        let mut builder = object_store::aws::AmazonS3Builder::new()
            .with_retry(retry)
            .with_client_options(client)
            .with_bucket_name(bucket);
        for (key, value) in variables {
            if key.starts_with("AWS_")
                && !value.is_empty()
                && let Ok(config) = key
                    .to_ascii_lowercase()
                    .parse::<object_store::aws::AmazonS3ConfigKey>()
            {
                builder = builder.with_config(config, value);
            }
        }
        if !variables
            .iter()
            .any(|(k, v)| (k == "AWS_REGION" || k == "AWS_DEFAULT_REGION") && !v.is_empty())
        {
            builder = builder.with_region("us-east-1");
        }
        let store = builder.build().map_err(|e| {
            StoreError::Config(format!(
                "the cache remote `{url}`: {}",
                redact(&e.to_string())
            ))
        })?;
        // Several threads upload at once (each blocks on its own request).
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("symb-s3")
            .enable_all()
            .build()
            .map_err(|e| StoreError::Config(format!("cannot start the I/O runtime: {e}")))?;
        let prefix = prefix.trim_matches('/').to_string();
        Ok(S3Store {
            store,
            prefix,
            url: url.to_string(),
            runtime,
        })
    }

    fn path(&self, tail: &str) -> object_store::path::Path {
        if self.prefix.is_empty() {
            object_store::path::Path::from(format!("v1/{tail}"))
        } else {
            object_store::path::Path::from(format!("{}/v1/{tail}", self.prefix))
        }
    }

    fn remote(&self, error: impl std::fmt::Display) -> StoreError {
        StoreError::Remote {
            store: self.url.clone(),
            message: redact(&error.to_string()),
        }
    }
}

/// The ETag S3 gives the bytes of `path`: their MD5, or uploaded in parts
/// of `part` bytes, the MD5 of the parts' MD5s and `-<parts>`.
fn content_etag(path: &Path, part: Option<u64>) -> std::io::Result<String> {
    use md5::Digest;
    use std::io::Read;
    let hex = |bytes: &[u8]| bytes.iter().map(|b| format!("{b:02x}")).collect::<String>();
    let mut file = std::fs::File::open(path)?;
    let part = part.unwrap_or(u64::MAX);
    let mut buffer = vec![0u8; 1 << 20];
    let (mut outer, mut parts) = (md5::Md5::new(), 0usize);
    loop {
        // One part: up to `part` bytes.
        let (mut hasher, mut read) = (md5::Md5::new(), 0u64);
        while read < part {
            let want = buffer
                .len()
                .min((part - read).min(usize::MAX as u64) as usize);
            let n = file.read(&mut buffer[..want])?;
            if n == 0 {
                break;
            }
            hasher.update(&buffer[..n]);
            read += n as u64;
        }
        if read == 0 && parts > 0 {
            break;
        }
        let digest = hasher.finalize();
        if part == u64::MAX {
            return Ok(hex(&digest));
        }
        outer.update(digest);
        parts += 1;
        if read < part {
            break;
        }
    }
    Ok(format!("{}-{parts}", hex(&outer.finalize())))
}

/// Drops anything that looks like a credential from a message.
fn redact(message: &str) -> String {
    let mut out = message.to_string();
    for var in [
        "AWS_SECRET_ACCESS_KEY",
        "AWS_SESSION_TOKEN",
        "AWS_ACCESS_KEY_ID",
    ] {
        if let Ok(value) = std::env::var(var)
            && !value.is_empty()
        {
            out = out.replace(&value, "***");
        }
    }
    out
}

impl Store for S3Store {
    fn describe(&self) -> String {
        self.url.clone()
    }

    fn lookup(&self, key: &str) -> Result<Option<ActionRecord>, StoreError> {
        use object_store::ObjectStoreExt;
        let path = self.path(&format!("actions/{key}.json"));
        let bytes = self.runtime.block_on(async {
            match self.store.get(&path).await {
                Ok(result) => result.bytes().await.map(Some),
                Err(object_store::Error::NotFound { .. }) => Ok(None),
                Err(e) => Err(e),
            }
        });
        match bytes.map_err(|e| self.remote(e))? {
            None => Ok(None),
            // A record that does not parse, or names another key, is no record.
            Some(bytes) => Ok(serde_json::from_slice::<ActionRecord>(&bytes)
                .ok()
                .filter(|r| r.key == key)),
        }
    }

    fn has_record(&self, key: &str) -> Result<bool, StoreError> {
        use object_store::ObjectStoreExt;
        let path = self.path(&format!("actions/{key}.json"));
        self.runtime.block_on(async {
            match self.store.head(&path).await {
                Ok(_) => Ok(true),
                Err(object_store::Error::NotFound { .. }) => Ok(false),
                Err(e) => Err(self.remote(e)),
            }
        })
    }

    /// A HEAD request: the size, then the ETag. S3 and the servers that
    /// speak its protocol (SeaweedFS, MinIO, R2) make an object's ETag the
    /// MD5 of its bytes, or for a multipart upload the MD5 of its parts'
    /// MD5s with `-<parts>`: both are computed here from the local file and
    /// compared, so an object of the right size with other bytes is seen.
    /// An ETag of another form (encrypted objects) leaves the size alone.
    fn blob_state(&self, blob: &BlobRef, local: &Path) -> Result<Held, StoreError> {
        use object_store::ObjectStoreExt;
        let path = self.path(&format!("blobs/{}", blob.digest));
        let meta = self.runtime.block_on(async {
            match self.store.head(&path).await {
                Ok(meta) => Ok(Some(meta)),
                Err(object_store::Error::NotFound { .. }) => Ok(None),
                Err(e) => Err(self.remote(e)),
            }
        })?;
        let Some(meta) = meta else {
            return Ok(Held::Missing);
        };
        if meta.size != blob.size {
            return Ok(Held::Differs);
        }
        let Some(etag) = meta
            .e_tag
            .as_deref()
            .map(|t| t.trim_matches('"').to_ascii_lowercase())
        else {
            return Ok(Held::Same);
        };
        let (md5, parts) = match etag.split_once('-') {
            Some((md5, parts)) => (md5, parts.parse::<u64>().ok()),
            None => (etag.as_str(), None),
        };
        if md5.len() != 32 || !md5.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Ok(Held::Same);
        }
        let expected =
            content_etag(local, parts.map(|_| PART as u64)).map_err(|e| StoreError::Io {
                path: local.to_path_buf(),
                source: e,
            })?;
        Ok(if expected == etag {
            Held::Same
        } else {
            Held::Differs
        })
    }

    fn get_blob(&self, blob: &BlobRef, dest: &Path) -> Result<(), StoreError> {
        use futures_util::StreamExt;
        use object_store::ObjectStoreExt;
        let path = self.path(&format!("blobs/{}", blob.digest));
        let io = |e| StoreError::Io {
            path: dest.to_path_buf(),
            source: e,
        };
        let mut file = std::io::BufWriter::new(std::fs::File::create(dest).map_err(io)?);
        let mut hasher = blake3::Hasher::new();
        self.runtime.block_on(async {
            let mut stream = self
                .store
                .get(&path)
                .await
                .map_err(|e| self.remote(e))?
                .into_stream();
            while let Some(chunk) = stream.next().await {
                let chunk = chunk.map_err(|e| self.remote(e))?;
                hasher.update(&chunk);
                file.write_all(&chunk).map_err(io)?;
            }
            Ok::<_, StoreError>(())
        })?;
        file.into_inner()
            .map_err(|e| io(e.into_error()))?
            .sync_all()
            .map_err(io)?;
        let actual = hasher.finalize().to_hex().to_string();
        if actual != blob.digest {
            let _ = std::fs::remove_file(dest);
            return Err(StoreError::Corrupt {
                store: self.url.clone(),
                digest: blob.digest.clone(),
                actual,
            });
        }
        Ok(())
    }

    fn put_blob(&self, blob: &BlobRef, src: &Path) -> Result<(), StoreError> {
        use object_store::ObjectStoreExt;
        use std::io::Read;
        let path = self.path(&format!("blobs/{}", blob.digest));
        let io = |e| StoreError::Io {
            path: src.to_path_buf(),
            source: e,
        };
        let mut file = std::fs::File::open(src).map_err(io)?;
        self.runtime.block_on(async {
            if blob.size <= MULTIPART_ABOVE {
                let mut bytes = Vec::with_capacity(blob.size as usize);
                file.read_to_end(&mut bytes).map_err(io)?;
                self.store
                    .put(&path, bytes.into())
                    .await
                    .map_err(|e| self.remote(e))?;
                return Ok(());
            }
            // In parts: the object appears only when the upload completes.
            let upload = self
                .store
                .put_multipart(&path)
                .await
                .map_err(|e| self.remote(e))?;
            let mut writer = object_store::WriteMultipart::new_with_chunk_size(upload, PART);
            let mut buffer = vec![0u8; PART];
            loop {
                let n = file.read(&mut buffer).map_err(io)?;
                if n == 0 {
                    break;
                }
                writer
                    .wait_for_capacity(4)
                    .await
                    .map_err(|e| self.remote(e))?;
                writer.write(&buffer[..n]);
            }
            writer.finish().await.map_err(|e| self.remote(e))?;
            Ok(())
        })
    }

    fn commit(&self, record: &ActionRecord) -> Result<(), StoreError> {
        use object_store::ObjectStoreExt;
        let path = self.path(&format!("actions/{}.json", record.key));
        let bytes = serde_json::to_vec_pretty(record).expect("records serialise");
        // Two machines committing the same key write records naming the same
        // blobs; the last one stays, and either is right.
        self.runtime
            .block_on(self.store.put(&path, bytes.into()))
            .map_err(|e| self.remote(e))?;
        Ok(())
    }
}
