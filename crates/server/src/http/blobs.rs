//! The blob routes: uploads with tus 1.0 (core, creation, termination,
//! expiration) and downloads with `Range` (docs/files.md). A route group of
//! its own: bodies are streamed in parts, never read whole, and the JSON
//! body limit does not apply.

use std::time::Duration;

use axum::body::Body;
use axum::extract::{FromRequestParts, Path, Request, State};
use axum::http::request::Parts;
use axum::http::{HeaderMap, HeaderName, HeaderValue, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{Router, post};
use bytes::{Bytes, BytesMut};
use confab_protocol::ErrorCode;
use confab_store::{BlobCreated, BlobRecord, NewBlob, SessionRecord, StoreError, UserId};
use futures_util::StreamExt;

use super::{Authed, Failure};
use crate::AppState;
use crate::blobs::{Blobs, PART_BYTES};
use crate::budget::WAIT;
use crate::limits::RetryAfter;

const TUS_VERSION: &str = "1.0.0";
const TUS_RESUMABLE: HeaderName = HeaderName::from_static("tus-resumable");
const UPLOAD_LENGTH: HeaderName = HeaderName::from_static("upload-length");
const UPLOAD_OFFSET: HeaderName = HeaderName::from_static("upload-offset");
const UPLOAD_EXPIRES: HeaderName = HeaderName::from_static("upload-expires");
const OFFSET_OCTET_STREAM: &str = "application/offset+octet-stream";
/// A body that sends nothing for this long is cut off (what arrived stays).
const BODY_IDLE: Duration = Duration::from_secs(30);

pub(super) fn routes() -> Router<AppState> {
    Router::new()
        .route("/v1/blobs", post(create).options(options))
        .route(
            "/v1/blobs/{id}",
            axum::routing::head(offset)
                .patch(append)
                .delete(terminate)
                .get(download)
                .options(options),
        )
        // Anything else under /v1/blobs (a path that tries to leave it, say)
        // gets what a blob that is not the caller's gets.
        .route(
            "/v1/blobs/{id}/{*rest}",
            axum::routing::any(async || no_such_blob()),
        )
        .layer(middleware::from_fn(tus_resumable))
}

/// tus: every answer but `OPTIONS` says which protocol version it speaks.
async fn tus_resumable(request: Request, next: Next) -> Response {
    let mut response = next.run(request).await;
    response
        .headers_mut()
        .insert(TUS_RESUMABLE, HeaderValue::from_static(TUS_VERSION));
    response
}

fn bad_upload(status: StatusCode, message: impl Into<String>) -> Failure {
    Failure::new(status, ErrorCode::BadUpload, message)
}

/// The same answer for a blob that does not exist and one the caller may
/// not see, so that an id cannot be probed.
fn no_such_blob() -> Failure {
    Failure::new(StatusCode::NOT_FOUND, ErrorCode::NotFound, "no such blob")
}

/// tus lets a terminated upload answer 410: told only to those who may
/// see the blob, who also see the message that announced it.
fn deleted(blob: BlobRecord) -> Result<BlobRecord, Failure> {
    match blob.deleted_at {
        None => Ok(blob),
        Some(_) => Err(Failure::new(
            StatusCode::GONE,
            ErrorCode::FileDeleted,
            "the file was deleted",
        )),
    }
}

async fn options(State(state): State<AppState>) -> Response {
    let max = state.config.blobs.max_file_bytes.to_string();
    (
        StatusCode::NO_CONTENT,
        [
            ("tus-version", TUS_VERSION),
            ("tus-extension", "creation,termination,expiration"),
            ("tus-max-size", max.as_str()),
        ],
    )
        .into_response()
}

/// A request's `Tus-Resumable` must name the version spoken here: the
/// refusal when it does not.
fn wrong_version(headers: &HeaderMap) -> Option<Response> {
    if headers.get(&TUS_RESUMABLE).map(HeaderValue::as_bytes) == Some(TUS_VERSION.as_bytes()) {
        return None;
    }
    let mut refused = bad_upload(
        StatusCode::PRECONDITION_FAILED,
        "Tus-Resumable: 1.0.0 is spoken here",
    )
    .into_response();
    refused
        .headers_mut()
        .insert("tus-version", HeaderValue::from_static(TUS_VERSION));
    Some(refused)
}

fn number(headers: &HeaderMap, name: &HeaderName) -> Option<i64> {
    let value = headers.get(name)?.to_str().ok()?;
    // Digits only: no sign, no spaces, no leading `+`.
    if value.is_empty() || !value.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    value.parse().ok()
}

fn expires_header(at_ms: i64) -> HeaderValue {
    let at = std::time::UNIX_EPOCH + Duration::from_millis(at_ms.max(0) as u64);
    HeaderValue::from_str(&httpdate::fmt_http_date(at)).expect("an HTTP date is a header value")
}

/// A tus request: its `Tus-Resumable` names the version spoken here.
struct Tus;

impl FromRequestParts<AppState> for Tus {
    type Rejection = Response;

    async fn from_request_parts(parts: &mut Parts, _: &AppState) -> Result<Self, Response> {
        wrong_version(&parts.headers).map_or(Ok(Tus), Err)
    }
}

/// The caller's blob the path names, read from the store: the same 404
/// whether there is none or it is someone else's.
struct Owned(BlobRecord);

/// A blob the caller may download: theirs, or one a message in one of their
/// conversations refers to. The same 404 for any other.
struct Readable(BlobRecord);

impl FromRequestParts<AppState> for Owned {
    type Rejection = Failure;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, Failure> {
        let (session, id) = session_and_id(parts, state).await?;
        owned_blob(state, session.user, &id).await.map(Owned)
    }
}

impl FromRequestParts<AppState> for Readable {
    type Rejection = Failure;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, Failure> {
        let (session, id) = session_and_id(parts, state).await?;
        match state.store.visible_blob(&id, session.user).await? {
            Some(blob) => deleted(blob).map(Readable),
            None => Err(no_such_blob()),
        }
    }
}

/// The caller, and the blob id of the path if it can be one of ours.
async fn session_and_id(
    parts: &mut Parts,
    state: &AppState,
) -> Result<(SessionRecord, String), Failure> {
    let Authed(session) = Authed::from_request_parts(parts, state).await?;
    match Path::<String>::from_request_parts(parts, state).await {
        Ok(Path(id)) if Blobs::valid_id(&id) => Ok((session, id)),
        _ => Err(no_such_blob()),
    }
}

async fn owned_blob(state: &AppState, user: UserId, id: &str) -> Result<BlobRecord, Failure> {
    match state.store.blob(id).await? {
        Some(blob) if blob.owner == user => deleted(blob),
        _ => Err(no_such_blob()),
    }
}

/// `POST /v1/blobs`: a new upload of `Upload-Length` bytes.
async fn create(
    State(state): State<AppState>,
    _: Tus,
    authed: Authed,
    headers: HeaderMap,
) -> Result<Response, Response> {
    let limits = &state.config.blobs;
    let Some(length) = number(&headers, &UPLOAD_LENGTH) else {
        return Err(bad_upload(
            StatusCode::BAD_REQUEST,
            "Upload-Length (a number of bytes) is required; deferred lengths are not supported",
        )
        .into_response());
    };
    if length as u64 > limits.max_file_bytes {
        return Err(Failure::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            ErrorCode::TooLarge,
            format!("files are at most {} bytes", limits.max_file_bytes),
        )
        .into_response());
    }
    let now = state.config.clock.now();
    let expires_at = now + limits.upload_expiry.as_millis() as i64;
    let blob = NewBlob {
        id: Blobs::new_id(),
        owner: authed.0.user,
        length,
        now,
        expires_at,
        quota_bytes: limits.quota_bytes as i64,
    };
    let blob = match state.store.create_blob(blob).await.map_err(Failure::from)? {
        BlobCreated::Created(blob) => blob,
        BlobCreated::OverQuota { used } => {
            return Err(Failure::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                ErrorCode::QuotaExceeded,
                format!(
                    "your files take {used} of {} bytes; this one needs {length} more",
                    limits.quota_bytes
                ),
            )
            .into_response());
        }
    };
    tracing::info!(user = %authed.0.username, blob = %blob.id, length, "upload created");
    Ok((
        StatusCode::CREATED,
        [
            (header::LOCATION, format!("/v1/blobs/{}", blob.id)),
            (header::CACHE_CONTROL, "no-store".to_string()),
        ],
        [(UPLOAD_EXPIRES, expires_header(blob.expires_at))],
    )
        .into_response())
}

/// `HEAD /v1/blobs/{id}`: how far the upload got.
async fn offset(_: Tus, Owned(blob): Owned) -> Response {
    upload_state(&blob, StatusCode::OK)
}

fn upload_state(blob: &BlobRecord, status: StatusCode) -> Response {
    let mut response = (
        status,
        [
            (UPLOAD_OFFSET, blob.received.to_string()),
            (UPLOAD_LENGTH, blob.length.to_string()),
            (header::CACHE_CONTROL, "no-store".to_string()),
        ],
    )
        .into_response();
    if !blob.complete() {
        response
            .headers_mut()
            .insert(UPLOAD_EXPIRES, expires_header(blob.expires_at));
    }
    response
}

/// `PATCH /v1/blobs/{id}`: bytes from `Upload-Offset` on. They are stored in
/// parts of [`PART_BYTES`] as they arrive; when the body is cut off, what
/// arrived is kept, so the client resumes from the new offset.
async fn append(
    State(state): State<AppState>,
    _: Tus,
    Owned(blob): Owned,
    request: Request,
) -> Result<Response, Response> {
    let headers = request.headers();
    if headers.get(header::CONTENT_TYPE).map(HeaderValue::as_bytes)
        != Some(OFFSET_OCTET_STREAM.as_bytes())
    {
        return Err(Response::from(bad_upload(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "Content-Type: application/offset+octet-stream",
        )));
    }
    let Some(offset) = number(headers, &UPLOAD_OFFSET) else {
        return Err(Response::from(bad_upload(
            StatusCode::BAD_REQUEST,
            "Upload-Offset is required",
        )));
    };
    let Some(_writing) = state.blobs.start_writing(&blob.id) else {
        return Err(Response::from(bad_upload(
            StatusCode::CONFLICT,
            "another request is writing to this upload",
        )));
    };
    // What this request may hold: the part being stored and the next one
    // arriving, charged to the memory budget.
    let _slot =
        state.limits.upload(blob.owner).await.map_err(|over| {
            Failure::throttled(over.message(), RetryAfter(Duration::from_secs(1)))
        })?;
    let Some(_charge) = state.budget.charge(2 * PART_BYTES, WAIT).await else {
        return Err(Response::from(Failure::new(
            StatusCode::SERVICE_UNAVAILABLE,
            ErrorCode::Busy,
            "the server is short of memory; resume the upload shortly",
        )));
    };
    // Read again under the lock: a request that just ended may have moved it.
    let mut blob = owned_blob(&state, blob.owner, &blob.id).await?;
    if offset != blob.received {
        return Err(Response::from(bad_upload(
            StatusCode::CONFLICT,
            format!("the upload is at offset {}", blob.received),
        )));
    }
    let mut body = request.into_body().into_data_stream();
    // Room for a whole part up front: growing by doubling would copy it
    // several times over, and grow past it (the budget counts whole parts).
    let mut part = BytesMut::with_capacity(PART_BYTES);
    let mut index = state
        .store
        .blob_parts(&blob.id)
        .await
        .map_err(Failure::from)?
        .len() as i64;
    let mut too_long = false;
    // A full part is stored (written, synced, recorded) while the next one
    // arrives; parts are recorded in order, each after the one before.
    let mut storing: Option<Storing> = None;
    loop {
        let chunk = match tokio::time::timeout(BODY_IDLE, body.next()).await {
            Ok(Some(Ok(chunk))) => chunk,
            Ok(None) => break,
            // Cut off or stalled: what arrived is kept, the client resumes.
            Ok(Some(Err(_))) | Err(_) => break,
        };
        let in_flight = storing.as_ref().map_or(0, |s| s.len);
        let room = (blob.length - blob.received) as usize - in_flight - part.len();
        if chunk.len() > room {
            // What fits is kept; nothing past the declared length.
            part.extend_from_slice(&chunk[..room]);
            too_long = true;
            break;
        }
        let mut chunk = chunk;
        while !chunk.is_empty() {
            // Filled to exactly one part, never grown past it.
            let take = (PART_BYTES - part.len()).min(chunk.len());
            part.extend_from_slice(&chunk.split_to(take));
            if part.len() < PART_BYTES {
                continue;
            }
            let full = std::mem::replace(&mut part, BytesMut::with_capacity(PART_BYTES));
            if let Some(previous) = storing.take() {
                blob = previous.finish().await?;
            }
            storing = Some(Storing::start(&state, &blob, index, full.freeze()));
            index += 1;
        }
    }
    if let Some(previous) = storing.take() {
        blob = previous.finish().await?;
    }
    if !part.is_empty() {
        blob = store_part(state.clone(), blob, index, part.freeze()).await?;
    }
    if too_long {
        return Err(Response::from(bad_upload(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("the upload is {} bytes long", blob.length),
        )));
    }
    Ok(upload_state(&blob, StatusCode::NO_CONTENT))
}

/// A part being stored while the request reads on.
struct Storing {
    len: usize,
    task: tokio::task::JoinHandle<Result<BlobRecord, Failure>>,
}

impl Storing {
    fn start(state: &AppState, blob: &BlobRecord, index: i64, bytes: Bytes) -> Self {
        Storing {
            len: bytes.len(),
            task: tokio::spawn(store_part(state.clone(), blob.clone(), index, bytes)),
        }
    }

    /// The blob once the part is recorded.
    async fn finish(self) -> Result<BlobRecord, Failure> {
        self.task.await.unwrap_or_else(|e| {
            tracing::error!(error = %e, "storing a blob part failed");
            Err(Failure::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                ErrorCode::Internal,
                "storing the upload failed; resume it",
            ))
        })
    }
}

/// Stores one part and records it; a part that cannot be recorded is deleted.
async fn store_part(
    state: AppState,
    blob: BlobRecord,
    index: i64,
    bytes: Bytes,
) -> Result<BlobRecord, Failure> {
    let stored = state
        .blobs
        .put_part(&blob.id, index, blob.received, bytes)
        .await
        .map_err(|e| {
            tracing::error!(error = %e, "blob storage write failed");
            Failure::new(
                StatusCode::SERVICE_UNAVAILABLE,
                ErrorCode::StorageUnavailable,
                "blob storage is unavailable; resume later",
            )
        })?;
    let expires_at = state.config.clock.now() + state.config.blobs.upload_expiry.as_millis() as i64;
    match state
        .store
        .add_blob_part(&blob.id, stored.clone(), expires_at)
        .await
    {
        Ok(blob) => {
            metrics::counter!("confab_blob_bytes_received_total").increment(stored.len as u64);
            Ok(blob)
        }
        Err(e) => {
            let _ = state.blobs.delete_parts(&[stored]).await;
            Err(match e {
                StoreError::NotFound => no_such_blob(),
                StoreError::Conflict => bad_upload(StatusCode::CONFLICT, "the upload moved on"),
                other => other.into(),
            })
        }
    }
}

/// `DELETE /v1/blobs/{id}`: the upload and its bytes are gone; a file that
/// was sent leaves a tombstone, and its messages show it as deleted.
async fn terminate(
    State(state): State<AppState>,
    _: Tus,
    Owned(blob): Owned,
) -> Result<Response, Response> {
    let id = blob.id;
    let Some(_writing) = state.blobs.start_writing(&id) else {
        return Err(Response::from(bad_upload(
            StatusCode::CONFLICT,
            "a request is writing to this upload",
        )));
    };
    let deleted = state.store.delete_blob(&id, state.config.clock.now()).await;
    if let Some(parts) = deleted.map_err(Failure::from)? {
        // The rows are gone first: a part object left behind by a failure
        // here is unreachable, never half a blob.
        if let Err(e) = state.blobs.delete_blob(&id, &parts).await {
            tracing::warn!(error = %e, blob = %id, "could not delete a blob's parts");
        }
    }
    Ok(StatusCode::NO_CONTENT.into_response())
}

/// `GET /v1/blobs/{id}`: a complete blob, whole or one `Range`.
async fn download(
    State(state): State<AppState>,
    Readable(blob): Readable,
    headers: HeaderMap,
) -> Result<Response, Failure> {
    if !blob.complete() {
        return Err(no_such_blob());
    }
    let (status, range) = match headers.get(header::RANGE) {
        None => (StatusCode::OK, 0..blob.length),
        Some(value) => match byte_range(value, blob.length) {
            Some(range) => (StatusCode::PARTIAL_CONTENT, range),
            None => {
                let mut refused = Failure::new(
                    StatusCode::RANGE_NOT_SATISFIABLE,
                    ErrorCode::BadUpload,
                    "one range of bytes=START-END within the file",
                )
                .into_response();
                refused.headers_mut().insert(
                    header::CONTENT_RANGE,
                    HeaderValue::from_str(&format!("bytes */{}", blob.length)).expect("ascii"),
                );
                return Ok(refused);
            }
        },
    };
    let parts = state.store.blob_parts(&blob.id).await?;
    let stream = state.blobs.read(parts, range.clone());
    let mut response = Response::new(Body::from_stream(stream));
    *response.status_mut() = status;
    let h = response.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/octet-stream"),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(
        header::CONTENT_DISPOSITION,
        HeaderValue::from_static("attachment"),
    );
    h.insert(header::ACCEPT_RANGES, HeaderValue::from_static("bytes"));
    h.insert(
        header::CACHE_CONTROL,
        HeaderValue::from_static("private, no-store"),
    );
    h.insert(header::CONTENT_LENGTH, (range.end - range.start).into());
    if status == StatusCode::PARTIAL_CONTENT {
        let value = format!("bytes {}-{}/{}", range.start, range.end - 1, blob.length);
        h.insert(
            header::CONTENT_RANGE,
            HeaderValue::from_str(&value).expect("ascii"),
        );
    }
    Ok(response)
}

/// One range of `bytes=START-END`, `bytes=START-` or `bytes=-SUFFIX`, as a
/// half-open range within `length`; `None` for anything else (several
/// ranges included).
fn byte_range(value: &HeaderValue, length: i64) -> Option<std::ops::Range<i64>> {
    let spec = value.to_str().ok()?.strip_prefix("bytes=")?.trim();
    let (start, end) = spec.split_once('-')?;
    let digits = |s: &str| -> Option<i64> {
        (!s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()))
            .then(|| s.parse().ok())
            .flatten()
    };
    let range = match (start, end) {
        ("", suffix) => {
            let n = digits(suffix)?.min(length);
            length - n..length
        }
        (start, "") => digits(start)?..length,
        (start, end) => digits(start)?..digits(end)?.saturating_add(1).min(length),
    };
    (range.start < range.end && range.start < length).then_some(range)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges() {
        let r = |s: &str| byte_range(&HeaderValue::from_str(s).unwrap(), 100);
        assert_eq!(r("bytes=0-9"), Some(0..10));
        assert_eq!(r("bytes=90-"), Some(90..100));
        assert_eq!(r("bytes=-10"), Some(90..100));
        assert_eq!(r("bytes=95-200"), Some(95..100));
        assert_eq!(r("bytes=-200"), Some(0..100));
        for bad in [
            "bytes=100-",
            "bytes=5-2",
            "bytes=0-1,5-6",
            "items=0-1",
            "bytes=-0",
            "bytes=+1-2",
        ] {
            assert_eq!(r(bad), None, "{bad}");
        }
    }
}
