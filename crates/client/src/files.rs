//! A file as it travels (docs/files.md): encrypted on the sending device in
//! the age format (age-encryption.org/v1: STREAM in 64 KiB chunks, so a
//! truncated, reordered or tampered file is detected, in constant memory)
//! to a fresh X25519 identity made for that one file, and, for a picture, a
//! small JPEG thumbnail made here. The identity is the file's key: it
//! travels inside the end-to-end encrypted message, so any age
//! implementation can open a downloaded blob with it.

use std::fs::File;
use std::io::{BufReader, BufWriter, Read, SeekFrom, Write};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use age::secrecy::ExposeSecret;
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use bytes::Bytes;
use confab_crypto::FileRef;

use crate::account::ServerUrl;
use crate::{ClientError, blobs};

/// The key of one file: an age X25519 identity, `AGE-SECRET-KEY-1…`.
pub struct FileKey(age::x25519::Identity);

impl FileKey {
    pub fn generate() -> Self {
        FileKey(age::x25519::Identity::generate())
    }

    pub fn parse(text: &str) -> Result<Self, ClientError> {
        text.parse()
            .map(FileKey)
            .map_err(|_| ClientError::Crypto("not an age X25519 identity".into()))
    }

    /// The form that travels in the message.
    pub fn to_secret_string(&self) -> String {
        self.0.to_string().expose_secret().to_string()
    }
}

fn crypto(e: impl std::fmt::Display) -> ClientError {
    ClientError::Crypto(format!("file: {e}"))
}

/// Encrypts all of `input` into `output` for `key`.
pub fn encrypt(key: &FileKey, input: impl Read, output: impl Write) -> Result<(), ClientError> {
    let recipient = key.0.to_public();
    let encryptor =
        age::Encryptor::with_recipients(std::iter::once(&recipient as &dyn age::Recipient))
            .map_err(crypto)?;
    let mut writer = encryptor.wrap_output(output).map_err(crypto)?;
    std::io::copy(&mut BufReader::new(input), &mut writer).map_err(crypto)?;
    writer.finish().map_err(crypto)?.flush().map_err(crypto)?;
    Ok(())
}

/// Decrypts `input` into `output` with `key`; returns the bytes written. A
/// file that was tampered with, truncated or reordered is an error: what was
/// written before the fault was found must then be thrown away
/// ([`decrypt_file`] does).
pub fn decrypt(key: &FileKey, input: impl Read, output: impl Write) -> Result<u64, ClientError> {
    let decryptor = age::Decryptor::new(BufReader::new(input)).map_err(crypto)?;
    let mut reader = decryptor
        .decrypt(std::iter::once(&key.0 as &dyn age::Identity))
        .map_err(crypto)?;
    let mut output = BufWriter::new(output);
    let written = std::io::copy(&mut reader, &mut output)
        .map_err(|e| ClientError::Crypto(format!("file: damaged or incomplete ({e})")))?;
    output.flush().map_err(crypto)?;
    Ok(written)
}

/// Decrypts the file at `encrypted` to `target` (which must not exist),
/// through a temporary file next to it: on any error nothing is left behind.
pub fn decrypt_file(key: &FileKey, encrypted: &Path, target: &Path) -> Result<u64, ClientError> {
    let dir = target.parent().unwrap_or(Path::new("."));
    let partial =
        tempfile::NamedTempFile::new_in(dir).map_err(|e| ClientError::Io(e.to_string()))?;
    let input = File::open(encrypted).map_err(|e| ClientError::Io(e.to_string()))?;
    let written = decrypt(key, input, partial.as_file())?;
    partial
        .persist_noclobber(target)
        .map_err(|e| ClientError::Io(format!("{}: {}", target.display(), e.error)))?;
    Ok(written)
}

/// The longest side of a thumbnail, in pixels.
const THUMBNAIL_SIDE: u32 = 96;
/// A thumbnail travels inside the message: it must stay small.
pub const MAX_THUMBNAIL_BYTES: usize = 6 * 1024;
/// Pictures larger than this are not decoded (a decompression bomb).
const MAX_DECODE_BYTES: u64 = 256 * 1024 * 1024;
const MAX_PICTURE_SIDE: u32 = 16_384;

/// A small JPEG of the picture at `path` (JPEG, PNG, WebP or GIF), at most
/// [`MAX_THUMBNAIL_BYTES`]; `None` for anything that is not such a picture,
/// or one too large to decode safely.
pub fn thumbnail(path: &Path) -> Option<Vec<u8>> {
    let mut reader = image::ImageReader::open(path)
        .ok()?
        .with_guessed_format()
        .ok()?;
    use image::ImageFormat::{Gif, Jpeg, Png, WebP};
    if !matches!(reader.format()?, Jpeg | Png | WebP | Gif) {
        return None;
    }
    let mut limits = image::Limits::default();
    limits.max_alloc = Some(MAX_DECODE_BYTES);
    limits.max_image_width = Some(MAX_PICTURE_SIDE);
    limits.max_image_height = Some(MAX_PICTURE_SIDE);
    reader.limits(limits);
    let picture = reader.decode().ok()?;
    let small = picture
        .thumbnail(THUMBNAIL_SIDE, THUMBNAIL_SIDE)
        .into_rgb8();
    // Lower the quality until it fits.
    for quality in [70, 50, 35, 20] {
        let mut jpeg = Vec::new();
        let encoder = image::codecs::jpeg::JpegEncoder::new_with_quality(&mut jpeg, quality);
        small.write_with_encoder(encoder).ok()?;
        if jpeg.len() <= MAX_THUMBNAIL_BYTES {
            return Some(jpeg);
        }
    }
    None
}

/// Bytes fetched per ranged `GET`: what a cut connection costs again, and
/// what one request holds in memory.
const CHUNK_BYTES: u64 = 4 * 1024 * 1024;
/// Bytes sent per `PATCH`, streamed from the spool: the server stores them
/// in parts as they arrive (writing one while the next comes), so longer
/// requests keep its disk busy; each answer confirms the offset.
const PATCH_BYTES: u64 = 64 * 1024 * 1024;
/// Bytes read from the spool at a time while a `PATCH` streams.
const SPOOL_READ: usize = 256 * 1024;

/// Failures in a row a transfer rides out (a dropped connection, a server
/// restarting or busy), waiting longer each time: about 20 s in all.
const TRIES: u32 = 8;

fn io(e: impl std::fmt::Display) -> ClientError {
    ClientError::Io(e.to_string())
}

/// Whether trying again may succeed: the network, or a server that is
/// restarting, busy, or still finishing a request that was cut off.
fn transient(e: &ClientError) -> bool {
    matches!(
        e,
        ClientError::Io(_)
            | ClientError::Api {
                status: 409 | 502 | 503 | 504,
                ..
            }
    )
}

/// The wait before try `failures + 1`: 250 ms, doubling up to 4 s.
async fn back_off(failures: u32) {
    let ms = 250u64 << failures.min(4);
    tokio::time::sleep(std::time::Duration::from_millis(ms)).await;
}

/// `step` again after transient failures, up to [`TRIES`] in a row.
async fn retrying<T, F>(mut step: impl FnMut() -> F) -> Result<T, ClientError>
where
    F: std::future::Future<Output = Result<T, ClientError>>,
{
    let mut failures = 0;
    loop {
        match step().await {
            Err(e) if transient(&e) && failures < TRIES => {
                failures += 1;
                back_off(failures).await;
            }
            done => return done,
        }
    }
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, ClientError> + Send + 'static,
) -> Result<T, ClientError> {
    tokio::task::spawn_blocking(f).await.map_err(io)?
}

/// A file encrypted to its spool file: what the message that carries it
/// will need, but the blob id. Kept (by the CLI, 0600) with the upload
/// until the message is sent: an age file cannot be made again with the
/// same key and nonce, so an interrupted upload resumes with these bytes.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Prepared {
    pub key: String,
    pub name: String,
    pub media_type: String,
    pub size: u64,
    pub thumbnail: Option<String>,
    /// Bytes of the spool file: the upload's length.
    pub length: u64,
}

impl Prepared {
    pub fn file_ref(&self, blob: &str) -> FileRef {
        FileRef {
            blob: blob.to_string(),
            key: self.key.clone(),
            name: self.name.clone(),
            media_type: self.media_type.clone(),
            size: self.size,
            thumbnail: self.thumbnail.clone(),
        }
    }
}

/// How far a transfer got: bytes done, of all.
pub type Progress<'a> = &'a mut (dyn FnMut(u64, u64) + Send);

/// Encrypts the file at `path` into `spool` and makes its thumbnail.
pub async fn prepare(path: &Path, spool: &Path) -> Result<Prepared, ClientError> {
    let key = FileKey::generate();
    let secret = key.to_secret_string();
    let (source, target) = (path.to_path_buf(), spool.to_path_buf());
    let (size, thumbnail) = blocking(move || {
        let input = File::open(&source).map_err(io)?;
        let size = input.metadata().map_err(io)?.len();
        let output = File::create(&target).map_err(io)?;
        encrypt(&key, input, BufWriter::new(output))?;
        Ok((size, thumbnail(&source)))
    })
    .await?;
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "file".into());
    Ok(Prepared {
        key: secret,
        media_type: media_type(&name).into(),
        name,
        size,
        thumbnail: thumbnail.map(|t| URL_SAFE_NO_PAD.encode(t)),
        length: std::fs::metadata(spool).map_err(io)?.len(),
    })
}

/// Encrypts the file at `path` into `spool`, uploads it, and returns what
/// the message that carries it needs.
pub async fn upload_file(
    server: &ServerUrl,
    token: &str,
    path: &Path,
    spool: &Path,
) -> Result<FileRef, ClientError> {
    let prepared = prepare(path, spool).await?;
    let upload = blobs::create(server, token, prepared.length).await?;
    resume_upload(server, token, &upload, spool, &mut |_, _| {}).await?;
    Ok(prepared.file_ref(blob_id(&upload)))
}

/// The path of the blob a message names. The id comes from the sender: it
/// must be one the server could have made (22 characters of base64url), so
/// that it names nothing else on the server or on this device.
pub fn blob_path(file: &FileRef) -> Result<String, ClientError> {
    let id = &file.blob;
    let valid = id.len() == 22
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    if !valid {
        return Err(ClientError::Protocol(format!(
            "the message names no valid file ({:?})",
            id.escape_debug().to_string()
        )));
    }
    Ok(format!("/v1/blobs/{id}"))
}

/// The blob id of an upload's path.
pub fn blob_id(upload: &str) -> &str {
    upload.trim_start_matches("/v1/blobs/")
}

/// Sends what the server lacks of `spool` to the upload at `upload`, from
/// the offset the server reports. A dropped connection or a restarting
/// server is ridden out: the offset is asked again and the upload goes on
/// from there.
pub async fn resume_upload(
    server: &ServerUrl,
    token: &str,
    upload: &str,
    spool: &Path,
    progress: Progress<'_>,
) -> Result<(), ClientError> {
    let ask = || blobs::offset(server, token, upload);
    let mut state = retrying(ask).await?;
    progress(state.offset, state.length);
    let mut failures = 0;
    while state.offset < state.length {
        let length = PATCH_BYTES.min(state.length - state.offset);
        let sent = Arc::new(AtomicU64::new(0));
        let body = read_spool(spool, state.offset, length, sent.clone()).await?;
        let patch = blobs::append_stream(server, token, upload, state.offset, length, body);
        tokio::pin!(patch);
        let mut tick = tokio::time::interval(std::time::Duration::from_millis(100));
        let patched = loop {
            tokio::select! {
                done = &mut patch => break done,
                _ = tick.tick() => progress(state.offset + sent.load(Ordering::Relaxed), state.length),
            }
        };
        match patched {
            Ok(offset) => {
                state.offset = offset;
                failures = 0;
                progress(state.offset, state.length);
            }
            Err(e) if transient(&e) && failures < TRIES => {
                failures += 1;
                back_off(failures).await;
                // Part of the chunk may have arrived and been kept.
                state = retrying(ask).await?;
                progress(state.offset, state.length);
            }
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Bytes `offset..offset + length` of the spool, read as they are sent;
/// `sent` counts them.
async fn read_spool(
    spool: &Path,
    offset: u64,
    length: u64,
    sent: Arc<AtomicU64>,
) -> Result<impl futures_util::Stream<Item = std::io::Result<Bytes>> + Send + 'static, ClientError>
{
    use tokio::io::{AsyncReadExt, AsyncSeekExt};
    let mut file = tokio::fs::File::open(spool).await.map_err(io)?;
    file.seek(SeekFrom::Start(offset)).await.map_err(io)?;
    Ok(futures_util::stream::try_unfold(
        (file, length),
        move |(mut file, left)| {
            let sent = sent.clone();
            async move {
                if left == 0 {
                    return Ok(None);
                }
                let mut buf = vec![0; SPOOL_READ.min(left as usize)];
                file.read_exact(&mut buf).await?;
                sent.fetch_add(buf.len() as u64, Ordering::Relaxed);
                let n = buf.len() as u64;
                Ok(Some((Bytes::from(buf), (file, left - n))))
            }
        },
    ))
}

/// Downloads the file a message carries into `partial`, its encrypted
/// bytes (0600), and decrypts them to `target`, which must not exist. A
/// download stopped part way (a killed command) goes on from what `partial`
/// holds; `partial` is removed once decrypted, or when it proves damaged,
/// and a refused file leaves nothing at `target`.
pub async fn download_file(
    server: &ServerUrl,
    token: &str,
    file: &FileRef,
    partial: &Path,
    target: &Path,
    progress: Progress<'_>,
) -> Result<u64, ClientError> {
    use std::os::unix::fs::OpenOptionsExt;
    let key = FileKey::parse(&file.key)?;
    let path = blob_path(file)?;
    let mut encrypted = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .open(partial)
        .map_err(io)?;
    let mut offset = encrypted.metadata().map_err(io)?.len();
    progress(offset, offset.max(file.size));
    loop {
        let range = offset..offset + CHUNK_BYTES;
        let fetch = || blobs::download(server, token, &path, Some(range.clone()));
        let chunk = match retrying(fetch).await {
            Ok(chunk) => chunk,
            // Past the end: the whole file is here.
            Err(ClientError::Api { status: 416, .. }) if offset > 0 => break,
            Err(e) => return Err(e),
        };
        encrypted.write_all(&chunk).map_err(io)?;
        offset += chunk.len() as u64;
        progress(offset, offset.max(file.size));
        if (chunk.len() as u64) < CHUNK_BYTES {
            break;
        }
    }
    drop(encrypted);
    let (source, target) = (partial.to_path_buf(), target.to_path_buf());
    let opened = blocking(move || decrypt_file(&key, &source, &target)).await;
    // Kept only when the target could not be written: the bytes are good.
    if !matches!(opened, Err(ClientError::Io(_))) {
        let _ = std::fs::remove_file(partial);
    }
    opened
}

/// The media type a file's name suggests.
fn media_type(name: &str) -> &'static str {
    let extension = name.rsplit_once('.').map(|(_, e)| e.to_ascii_lowercase());
    match extension.as_deref() {
        Some("jpg" | "jpeg") => "image/jpeg",
        Some("png") => "image/png",
        Some("webp") => "image/webp",
        Some("gif") => "image/gif",
        Some("pdf") => "application/pdf",
        Some("txt") => "text/plain",
        Some("mp4") => "video/mp4",
        _ => "application/octet-stream",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sealed(data: &[u8]) -> (FileKey, Vec<u8>) {
        let key = FileKey::generate();
        let mut out = Vec::new();
        encrypt(&key, data, &mut out).unwrap();
        (key, out)
    }

    #[test]
    fn a_file_round_trips_and_its_key_travels_as_text() {
        let data: Vec<u8> = (0..200_000u32).map(|i| (i * 7 % 251) as u8).collect();
        let (key, encrypted) = sealed(&data);
        assert!(encrypted.starts_with(b"age-encryption.org/v1\n"));
        let key = FileKey::parse(&key.to_secret_string()).unwrap();
        let mut out = Vec::new();
        assert_eq!(
            decrypt(&key, &encrypted[..], &mut out).unwrap(),
            data.len() as u64
        );
        assert_eq!(out, data);
    }

    #[test]
    fn tampered_truncated_and_reordered_files_are_refused_and_leave_nothing() {
        // Three 64 KiB chunks and a bit.
        let data = vec![42u8; 3 * 65536 + 100];
        let (key, encrypted) = sealed(&data);
        let header = encrypted.len() - (data.len() + 4 * 16);
        let chunk = 65536 + 16;
        let mut tampered = encrypted.clone();
        tampered[header + 10] ^= 1;
        let truncated = encrypted[..header + 2 * chunk].to_vec();
        let mut reordered = encrypted.clone();
        let (first, second) = (header..header + chunk, header + chunk..header + 2 * chunk);
        let a = encrypted[first.clone()].to_vec();
        reordered[first.start..first.end].copy_from_slice(&encrypted[second]);
        reordered[first.end..first.end + chunk].copy_from_slice(&a);
        let dir = tempfile::tempdir().unwrap();
        for (name, bad) in [
            ("tampered", tampered),
            ("truncated", truncated),
            ("reordered", reordered),
        ] {
            let src = dir.path().join(name);
            std::fs::write(&src, bad).unwrap();
            let target = dir.path().join(format!("{name}.out"));
            let error = decrypt_file(&key, &src, &target).unwrap_err();
            assert!(matches!(error, ClientError::Crypto(_)), "{name}: {error}");
            assert!(!target.exists(), "{name}: output left behind");
        }
        // Nothing but the inputs remains in the directory.
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 3);
        let good = dir.path().join("good");
        std::fs::write(&good, &encrypted).unwrap();
        let target = dir.path().join("good.out");
        decrypt_file(&key, &good, &target).unwrap();
        assert_eq!(std::fs::read(&target).unwrap(), data);
        assert!(
            decrypt_file(&key, &good, &target).is_err(),
            "never overwrites"
        );
    }

    #[test]
    fn thumbnails_for_each_picture_type_and_none_for_the_rest() {
        let dir = tempfile::tempdir().unwrap();
        let picture = image::RgbImage::from_fn(640, 480, |x, y| {
            image::Rgb([(x % 256) as u8, (y % 256) as u8, ((x * y) % 256) as u8])
        });
        for (name, format) in [
            ("a.jpg", image::ImageFormat::Jpeg),
            ("a.png", image::ImageFormat::Png),
            ("a.webp", image::ImageFormat::WebP),
            ("a.gif", image::ImageFormat::Gif),
        ] {
            let path = dir.path().join(name);
            image::DynamicImage::ImageRgb8(picture.clone())
                .save_with_format(&path, format)
                .unwrap();
            let thumb = thumbnail(&path).unwrap_or_else(|| panic!("no thumbnail for {name}"));
            assert!(
                thumb.len() <= MAX_THUMBNAIL_BYTES,
                "{name}: {} bytes",
                thumb.len()
            );
            let small = image::load_from_memory(&thumb).unwrap();
            assert_eq!((small.width(), small.height()), (96, 72), "{name}");
        }
        let text = dir.path().join("notes.txt");
        std::fs::write(&text, "not a picture").unwrap();
        assert!(thumbnail(&text).is_none());
        // A PNG header that claims a huge picture, and a broken one: no
        // thumbnail, no crash.
        let mut bomb = Vec::new();
        image::DynamicImage::ImageRgb8(image::RgbImage::new(1, 1))
            .write_to(
                &mut std::io::Cursor::new(&mut bomb),
                image::ImageFormat::Png,
            )
            .unwrap();
        bomb[16..24].copy_from_slice(&[0, 1, 0, 0, 0, 1, 0, 0]); // 65536 x 65536
        let huge = dir.path().join("huge.png");
        std::fs::write(&huge, &bomb).unwrap();
        assert!(thumbnail(&huge).is_none());
        let broken = dir.path().join("broken.jpg");
        std::fs::write(&broken, b"\xff\xd8\xff\xe0 not really").unwrap();
        assert!(thumbnail(&broken).is_none());
    }
}
