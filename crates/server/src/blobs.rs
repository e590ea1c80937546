//! Blob storage: the encrypted bytes of files, as part objects of a few MiB
//! in an object store (the local filesystem under the data directory; the
//! same code serves S3-compatible storage by configuration), listed in the
//! Store. object_store has no append, so an upload grows by whole parts,
//! and a download or a range is served from the parts (docs/files.md).

use std::collections::HashSet;
use std::ops::Range;
use std::path::Path as FsPath;
use std::sync::{Arc, Mutex};

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use bytes::Bytes;
use confab_store::BlobPart;
use futures_util::stream::{self, BoxStream, StreamExt};
use object_store::local::LocalFileSystem;
use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt, PutPayload};
use rand::RngCore;

/// Bytes an upload collects in memory before they become a part object:
/// bounds what one upload holds, and how much a cut connection loses.
pub const PART_BYTES: usize = 4 * 1024 * 1024;

/// Bytes a download reads from storage at a time: what one download holds
/// in memory. object_store's own file stream reads 8 KiB per blocking task,
/// which cost the server 5 CPU seconds per GiB served.
const READ_BYTES: i64 = 256 * 1024;

#[derive(Debug, thiserror::Error)]
#[error("blob storage: {0}")]
pub struct BlobError(#[from] object_store::Error);

pub struct Blobs {
    objects: Arc<dyn ObjectStore>,
    /// Uploads a request is writing to: a second request for one of them
    /// is refused rather than interleaved.
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

impl Blobs {
    /// Blob storage in `dir` on the local filesystem (made 0700 if new).
    pub fn local(dir: &FsPath) -> std::io::Result<Self> {
        use std::os::unix::fs::PermissionsExt;
        std::fs::create_dir_all(dir)?;
        // The objects inside get the umask's modes; the directory keeps
        // everyone else out of all of them.
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))?;
        // A part is on disk (file and directory synced) before its row is
        // committed and the PATCH answered, as the Store's commits are
        // (synchronous=FULL): an acknowledged offset survives a power cut.
        let objects = LocalFileSystem::new_with_prefix(dir)
            .map_err(std::io::Error::other)?
            .with_fsync(true);
        Ok(Blobs {
            objects: Arc::new(objects),
            writing: Mutex::new(HashSet::new()),
        })
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

    /// Bytes `range` of the blob made of `parts`, streamed part by part in
    /// pieces of [`READ_BYTES`].
    pub fn read(
        &self,
        parts: Vec<BlobPart>,
        range: Range<i64>,
    ) -> BoxStream<'static, Result<Bytes, BlobError>> {
        let objects = self.objects.clone();
        let pieces = parts.into_iter().flat_map(move |p| {
            // The part's bytes within the range, relative to the part.
            let from = range.start.max(p.start) - p.start;
            let to = range.end.min(p.start + p.len) - p.start;
            let object = Path::from(p.object.as_str());
            (from..to)
                .step_by(READ_BYTES as usize)
                .map(move |at| (object.clone(), at as u64..(at + READ_BYTES).min(to) as u64))
        });
        stream::iter(pieces)
            .then(move |(object, piece)| {
                let objects = objects.clone();
                async move {
                    let bytes = objects.get_range(&object, piece).await?;
                    metrics::counter!("confab_blob_bytes_sent_total").increment(bytes.len() as u64);
                    Ok(bytes)
                }
            })
            .boxed()
    }

    /// Deletes part objects; one that is already gone is no error.
    pub async fn delete_parts(&self, parts: &[BlobPart]) -> Result<(), BlobError> {
        for part in parts {
            match self.objects.delete(&Path::from(part.object.as_str())).await {
                Ok(()) | Err(object_store::Error::NotFound { .. }) => {}
                Err(e) => return Err(e.into()),
            }
        }
        Ok(())
    }
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
                if let Err(e) = state.blobs.delete_parts(parts).await {
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
        let len = 2 * READ_BYTES + 1234;
        let data: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
        let part = blobs
            .put_part(&Blobs::new_id(), 0, 0, Bytes::from(data.clone()))
            .await
            .unwrap();
        let edge = READ_BYTES;
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
