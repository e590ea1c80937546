//! Blob storage: the encrypted bytes of files, as part objects of a few MiB
//! in an object store (a directory of this machine, or an S3-compatible
//! bucket that several nodes share), listed in the Store. object_store has
//! no append, so an upload grows by whole parts, and a download or a range
//! is served from the parts (docs/files.md).

use std::collections::HashSet;
use std::ops::Range;
use std::path::{Path as FsPath, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use bytes::Bytes;
use confab_store::BlobPart;
use futures_util::stream::{self, BoxStream, StreamExt, TryStreamExt};
use object_store::aws::AmazonS3Builder;
use object_store::local::LocalFileSystem;
use object_store::path::Path;
use object_store::prefix::PrefixStore;
use object_store::{
    ClientOptions, GetOptions, GetRange, ObjectStore, ObjectStoreExt, PutPayload, RetryConfig,
};
use rand::RngCore;

use crate::config::{BlobStore, S3Bucket};

/// Bytes an upload collects in memory before they become a part object:
/// bounds what one upload holds, and how much a cut connection loses.
pub const PART_BYTES: usize = 4 * 1024 * 1024;

/// Bytes a download reads from a local directory at a time: what one
/// download holds in memory. object_store's own file stream reads 8 KiB
/// per blocking task, which cost the server 5 CPU seconds per GiB served.
const READ_BYTES: u64 = 256 * 1024;

#[derive(Debug, thiserror::Error)]
#[error("blob storage: {0}")]
pub struct BlobError(#[from] object_store::Error);

/// Why blob storage cannot be used at startup.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error("cannot open blob storage in {dir}: {source}")]
    Dir {
        dir: PathBuf,
        source: std::io::Error,
    },
    #[error("bad S3 settings: {0}")]
    Settings(object_store::Error),
    #[error("cannot write, read and delete an object in the bucket {bucket}: {reason}")]
    Probe { bucket: String, reason: String },
}

pub struct Blobs {
    objects: Arc<dyn ObjectStore>,
    /// A part is read in one streamed request (remote storage, where each
    /// request costs a round trip and a signature), or in [`READ_BYTES`]
    /// pieces (a local file).
    streamed: bool,
    /// Uploads a request of this node is writing to: a second request for
    /// one of them is refused rather than interleaved. Across nodes the
    /// Store refuses a part that does not start where the upload ends.
    writing: Mutex<HashSet<String>>,
}

/// The right to write to one upload, for as long as it is held.
pub struct Writing<'a> {
    blobs: &'a Blobs,
    id: String,
}

impl Drop for Writing<'_> {
    fn drop(&mut self) {
        self.blobs
            .writing
            .lock()
            .expect("blob lock")
            .remove(&self.id);
    }
}

/// Requests to S3 are retried for this long at most: a PATCH holds its
/// memory budget and upload slot while they run.
const S3_RETRY_FOR: Duration = Duration::from_secs(15);

impl Blobs {
    /// The storage `store` names, checked to be usable.
    pub async fn open(store: &BlobStore, data_dir: &FsPath) -> Result<Self, OpenError> {
        let dir = |dir: &FsPath| {
            Blobs::local(dir).map_err(|source| OpenError::Dir {
                dir: dir.to_path_buf(),
                source,
            })
        };
        match store {
            BlobStore::DataDir => {
                private_dir(data_dir).map_err(|source| OpenError::Dir {
                    dir: data_dir.to_path_buf(),
                    source,
                })?;
                dir(&data_dir.join("blobs"))
            }
            BlobStore::Dir(path) => dir(path),
            BlobStore::S3(bucket) => {
                let blobs = Blobs::s3(bucket).map_err(OpenError::Settings)?;
                blobs.probe().await.map_err(|reason| OpenError::Probe {
                    bucket: bucket.bucket.clone(),
                    reason,
                })?;
                Ok(blobs)
            }
        }
    }

    /// Blob storage in `dir` on the local filesystem (made 0700 if new).
    pub fn local(dir: &FsPath) -> std::io::Result<Self> {
        private_dir(dir)?;
        // A part is on disk (file and directory synced) before its row is
        // committed and the PATCH answered, as the Store's commits are
        // (synchronous=FULL): an acknowledged offset survives a power cut.
        // A blob's directory goes with its last part.
        let objects = LocalFileSystem::new_with_prefix(dir)
            .map_err(std::io::Error::other)?
            .with_fsync(true)
            .with_automatic_cleanup(true);
        Ok(Blobs::with(Arc::new(objects), false))
    }

    /// Blob storage in an S3-compatible bucket. An object is durable once
    /// its PUT is answered.
    pub fn s3(bucket: &S3Bucket) -> Result<Self, object_store::Error> {
        // Settings not given here come from AWS_* and the instance's role.
        let mut builder = AmazonS3Builder::from_env()
            .with_bucket_name(&bucket.bucket)
            .with_retry(RetryConfig {
                max_retries: 3,
                retry_timeout: S3_RETRY_FOR,
                ..Default::default()
            })
            .with_client_options(
                ClientOptions::new()
                    .with_timeout(Duration::from_secs(30))
                    .with_connect_timeout(Duration::from_secs(5)),
            );
        // After the client options, which would replace allow_http.
        for (name, value) in &bucket.options {
            builder = builder.with_config(name.parse()?, value);
        }
        if let Some(id) = &bucket.access_key_id {
            builder = builder.with_access_key_id(id);
        }
        if let Some(secret) = &bucket.secret_access_key {
            builder = builder.with_secret_access_key(secret);
        }
        let s3 = builder.build()?;
        let objects: Arc<dyn ObjectStore> = if bucket.prefix.is_empty() {
            Arc::new(s3)
        } else {
            Arc::new(PrefixStore::new(s3, bucket.prefix.as_str()))
        };
        Ok(Blobs::with(objects, true))
    }

    fn with(objects: Arc<dyn ObjectStore>, streamed: bool) -> Self {
        Blobs {
            objects,
            streamed,
            writing: Mutex::new(HashSet::new()),
        }
    }

    /// Writes, reads back and deletes an object, so that wrong keys, a
    /// missing bucket or an unreachable endpoint stop the node at startup
    /// rather than fail its first upload. Bounded: without keys off a
    /// cloud, object_store would ask an instance-metadata address that
    /// never answers.
    async fn probe(&self) -> Result<(), String> {
        // Not a blob id (22 characters), so never one of a blob's parts.
        let path = Path::from(format!("confab-probe/{}", Blobs::new_id()));
        let round_trip = async {
            self.objects
                .put(&path, PutPayload::from_static(b"confab"))
                .await?;
            let read = self.objects.get(&path).await?.bytes().await?;
            self.objects.delete(&path).await?;
            Ok::<_, object_store::Error>(read)
        };
        match tokio::time::timeout(S3_RETRY_FOR * 2, round_trip).await {
            Ok(Ok(read)) if read.as_ref() == b"confab" => Ok(()),
            Ok(Ok(_)) => Err("an object read back differs from the one written".into()),
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => Err(format!(
                "no answer within {} s (are the endpoint and the keys set?)",
                (S3_RETRY_FOR * 2).as_secs()
            )),
        }
    }

    /// A new blob id: 128 random bits, base64url. Never derived from
    /// anything a client sent, so no path is built from user input.
    pub fn new_id() -> String {
        let mut id = [0u8; 16];
        rand::rng().fill_bytes(&mut id);
        URL_SAFE_NO_PAD.encode(id)
    }

    /// Whether `id` could be one of ours: anything else is not looked up.
    pub fn valid_id(id: &str) -> bool {
        id.len() == 22
            && id
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    }

    /// The upload `id` for writing, unless a request is writing to it now.
    pub fn start_writing(&self, id: &str) -> Option<Writing<'_>> {
        let mut writing = self.writing.lock().expect("blob lock");
        writing.insert(id.to_string()).then(|| Writing {
            blobs: self,
            id: id.to_string(),
        })
    }

    /// Stores `bytes` as part `index` of blob `id`, starting at `start`.
    /// The key is new each time, so a part written but never recorded (a
    /// crash in between) is never mistaken for a recorded one.
    pub async fn put_part(
        &self,
        id: &str,
        index: i64,
        start: i64,
        bytes: Bytes,
    ) -> Result<BlobPart, BlobError> {
        let object = format!("{id}/{index:06}-{}", Self::new_id());
        let len = bytes.len() as i64;
        self.objects
            .put(&Path::from(object.as_str()), PutPayload::from_bytes(bytes))
            .await?;
        Ok(BlobPart {
            index,
            start,
            len,
            object,
        })
    }

    /// Bytes `range` of the blob made of `parts`, streamed part by part.
    pub fn read(
        &self,
        parts: Vec<BlobPart>,
        range: Range<i64>,
    ) -> BoxStream<'static, Result<Bytes, BlobError>> {
        let (objects, streamed) = (self.objects.clone(), self.streamed);
        let piece_bytes = if streamed { u64::MAX } else { READ_BYTES };
        let pieces = parts.into_iter().flat_map(move |p| {
            // The part's bytes within the range, relative to the part.
            let from = (range.start.max(p.start) - p.start).max(0) as u64;
            let to = (range.end.min(p.start + p.len) - p.start).max(0) as u64;
            let object = Path::from(p.object.as_str());
            let mut at = from;
            std::iter::from_fn(move || {
                (at < to).then(|| {
                    let piece = at..to.min(at.saturating_add(piece_bytes));
                    at = piece.end;
                    (object.clone(), piece)
                })
            })
        });
        stream::iter(pieces)
            .then(move |(object, piece)| {
                let objects = objects.clone();
                async move {
                    if streamed {
                        let options = GetOptions {
                            range: Some(GetRange::Bounded(piece)),
                            ..Default::default()
                        };
                        Ok::<_, object_store::Error>(
                            objects.get_opts(&object, options).await?.into_stream(),
                        )
                    } else {
                        let bytes = objects.get_range(&object, piece).await;
                        Ok(stream::once(async { bytes }).boxed())
                    }
                }
            })
            .try_flatten()
            .inspect_ok(|bytes: &Bytes| {
                metrics::counter!("confab_blob_bytes_sent_total").increment(bytes.len() as u64);
            })
            .map_err(BlobError)
            .boxed()
    }

    /// Deletes part objects (in bulk where the storage can); one that is
    /// already gone is no error.
    pub async fn delete_parts(&self, parts: &[BlobPart]) -> Result<(), BlobError> {
        let paths = parts.iter().map(|p| Path::from(p.object.as_str()));
        self.delete_paths(paths.collect()).await
    }

    /// Deletes a whole blob: its recorded parts and whatever else is under
    /// its id, such as a part a crash left stored but unrecorded, in one
    /// bulk delete.
    pub async fn delete_blob(&self, id: &str, parts: &[BlobPart]) -> Result<(), BlobError> {
        let mut paths: Vec<Path> = self
            .objects
            .list(Some(&Path::from(id)))
            .map_ok(|meta| meta.location)
            .try_collect()
            .await
            .or_else(|e| match e {
                object_store::Error::NotFound { .. } => Ok(Vec::new()),
                e => Err(e),
            })?;
        // A listing may lag a write on some stores: the recorded parts go
        // whatever it says.
        for part in parts {
            let path = Path::from(part.object.as_str());
            if !paths.contains(&path) {
                paths.push(path);
            }
        }
        self.delete_paths(paths).await
    }

    async fn delete_paths(&self, paths: Vec<Path>) -> Result<(), BlobError> {
        if paths.is_empty() {
            return Ok(());
        }
        let mut deleted = self
            .objects
            .delete_stream(stream::iter(paths.into_iter().map(Ok)).boxed());
        while let Some(result) = deleted.next().await {
            match result {
                Ok(_) | Err(object_store::Error::NotFound { .. }) => {}
                Err(e) => return Err(e.into()),
            }
        }
        Ok(())
    }
}

fn private_dir(dir: &FsPath) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::create_dir_all(dir)?;
    // The objects inside get the umask's modes; the directory keeps
    // everyone else out of all of them.
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
}

/// Now and then, deletes the uploads past their expiry and the files past
/// the retention: rows first, so a part object left behind by a failure is
/// unreachable, never half a blob.
pub async fn sweep(state: crate::AppState) {
    let limits = state.config.blobs.clone();
    let mut every = tokio::time::interval(limits.sweep_every);
    loop {
        tokio::select! {
            _ = every.tick() => {}
            _ = state.shutdown.cancelled() => return,
        }
        loop {
            let now = state.config.clock.now();
            let retired_before = limits.retention.map(|r| now - r.as_millis() as i64);
            let swept = match state.store.sweep_blobs(now, retired_before, 1000).await {
                Ok(swept) => swept,
                Err(e) => {
                    tracing::warn!(error = %e, "cannot sweep blobs");
                    break;
                }
            };
            for (id, parts) in &swept {
                if let Err(e) = state.blobs.delete_blob(id, parts).await {
                    tracing::warn!(error = %e, blob = %id, "could not delete a blob's parts");
                }
                tracing::info!(blob = %id, "expired upload or retired file deleted");
            }
            // A full batch: more may be waiting.
            if swept.len() < 1000 {
                break;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures_util::TryStreamExt;

    #[test]
    fn ids_are_random_and_checked() {
        let (a, b) = (Blobs::new_id(), Blobs::new_id());
        assert_ne!(a, b);
        assert!(Blobs::valid_id(&a), "{a}");
        for bad in [
            "",
            "../../etc/passwd",
            "a/b",
            &a[1..],
            &format!("{}.", &a[1..]),
        ] {
            assert!(!Blobs::valid_id(bad), "{bad}");
        }
    }

    #[tokio::test]
    async fn ranges_are_served_across_parts() {
        let dir = tempfile::tempdir().unwrap();
        let blobs = Blobs::local(dir.path()).unwrap();
        let id = Blobs::new_id();
        let data: Vec<u8> = (0..=255u8).cycle().take(10_000).collect();
        let mut parts = Vec::new();
        for (index, chunk) in data.chunks(3000).enumerate() {
            let start = index as i64 * 3000;
            let part = blobs
                .put_part(&id, index as i64, start, Bytes::copy_from_slice(chunk))
                .await
                .unwrap();
            parts.push(part);
        }
        for range in [0..10_000, 2999..3001, 4000..4001, 5500..9999] {
            let read: Vec<Bytes> = blobs
                .read(parts.clone(), range.clone())
                .try_collect()
                .await
                .unwrap();
            assert_eq!(
                read.concat(),
                data[range.start as usize..range.end as usize],
                "{range:?}"
            );
        }
        blobs.delete_parts(&parts).await.unwrap();
        blobs.delete_parts(&parts).await.unwrap();
    }

    #[tokio::test]
    async fn a_part_larger_than_a_read_is_served_in_pieces() {
        let dir = tempfile::tempdir().unwrap();
        let blobs = Blobs::local(dir.path()).unwrap();
        let len = 2 * READ_BYTES as i64 + 1234;
        let data: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
        let part = blobs
            .put_part(&Blobs::new_id(), 0, 0, Bytes::from(data.clone()))
            .await
            .unwrap();
        let edge = READ_BYTES as i64;
        for range in [0..len, edge - 1..edge + 1, 10..2 * edge + 5, len - 1..len] {
            let read: Vec<Bytes> = blobs
                .read(vec![part.clone()], range.clone())
                .try_collect()
                .await
                .unwrap();
            assert!(read.iter().all(|b| b.len() <= READ_BYTES as usize));
            assert!(
                read.concat() == data[range.start as usize..range.end as usize],
                "{range:?}"
            );
        }
    }
}
