//! Files over HTTP: uploads with tus 1.0 and downloads with `Range`
//! (docs/files.md). Upload in chunks: each `append` sends one, and after a
//! cut connection `offset` says where to go on.

use std::ops::Range;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Method, Request, Response, StatusCode, header};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

use crate::ClientError;
use crate::account::{ServerUrl, api_error};

const TUS_VERSION: &str = "1.0.0";

/// Where an upload is, and how far it got.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UploadState {
    pub offset: u64,
    pub length: u64,
}

async fn send(
    server: &ServerUrl,
    token: &str,
    request: hyper::http::request::Builder,
    body: Bytes,
) -> Result<Response<hyper::body::Incoming>, ClientError> {
    send_body(server, token, request, Full::new(body)).await
}

async fn send_body<B>(
    server: &ServerUrl,
    token: &str,
    request: hyper::http::request::Builder,
    body: B,
) -> Result<Response<hyper::body::Incoming>, ClientError>
where
    B: hyper::body::Body + Send + Unpin + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let client = Client::builder(TokioExecutor::new()).build_http::<B>();
    let request = request
        .header(header::AUTHORIZATION, format!("Bearer {token}"))
        .header("tus-resumable", TUS_VERSION)
        .body(body)
        .map_err(|e| ClientError::Usage(e.to_string()))?;
    client
        .request(request)
        .await
        .map_err(|e| ClientError::Io(format!("{}: {e}", server.authority)))
}

/// The answer, or the error it carries.
async fn checked(
    response: Response<hyper::body::Incoming>,
) -> Result<Response<Bytes>, ClientError> {
    let (parts, body) = response.into_parts();
    let bytes = body
        .collect()
        .await
        .map_err(|e| ClientError::Io(e.to_string()))?
        .to_bytes();
    if !parts.status.is_success() {
        return Err(api_error(parts.status, &bytes));
    }
    Ok(Response::from_parts(parts, bytes))
}

fn number(response: &Response<Bytes>, name: &str) -> Result<u64, ClientError> {
    response
        .headers()
        .get(name)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| ClientError::Protocol(format!("no {name} in the answer")))
}

/// A new upload of `length` bytes; returns its path (`/v1/blobs/{id}`).
pub async fn create(server: &ServerUrl, token: &str, length: u64) -> Result<String, ClientError> {
    let request = Request::builder()
        .method(Method::POST)
        .uri(server.http("/v1/blobs"))
        .header("upload-length", length);
    let response = checked(send(server, token, request, Bytes::new()).await?).await?;
    let location = response
        .headers()
        .get(header::LOCATION)
        .and_then(|v| v.to_str().ok())
        .filter(|l| l.starts_with("/v1/blobs/") && !l.contains(".."))
        .ok_or_else(|| ClientError::Protocol("no upload location in the answer".into()))?;
    Ok(location.to_string())
}

/// How far the upload at `path` got.
pub async fn offset(
    server: &ServerUrl,
    token: &str,
    path: &str,
) -> Result<UploadState, ClientError> {
    let request = Request::builder()
        .method(Method::HEAD)
        .uri(server.http(path));
    let response = send(server, token, request, Bytes::new()).await?;
    if !response.status().is_success() {
        return Err(api_error(response.status(), b""));
    }
    let response = checked(response).await?;
    Ok(UploadState {
        offset: number(&response, "upload-offset")?,
        length: number(&response, "upload-length")?,
    })
}

/// Sends `chunk` as the bytes from `offset` on; returns the new offset.
pub async fn append(
    server: &ServerUrl,
    token: &str,
    path: &str,
    offset: u64,
    chunk: Bytes,
) -> Result<u64, ClientError> {
    let request = Request::builder()
        .method(Method::PATCH)
        .uri(server.http(path))
        .header(header::CONTENT_TYPE, "application/offset+octet-stream")
        .header("upload-offset", offset);
    let response = checked(send(server, token, request, chunk).await?).await?;
    number(&response, "upload-offset")
}

/// Sends the `length` bytes `body` yields as the bytes from `offset` on, in
/// one `PATCH`, as they come; returns the new offset. The server stores
/// them as they arrive, so a cut-off `PATCH` leaves what arrived.
pub async fn append_stream<S>(
    server: &ServerUrl,
    token: &str,
    path: &str,
    offset: u64,
    length: u64,
    body: S,
) -> Result<u64, ClientError>
where
    S: futures_util::Stream<Item = std::io::Result<Bytes>> + Send + 'static,
{
    use futures_util::StreamExt;
    let frames = body.map(|chunk| chunk.map(hyper::body::Frame::data));
    let request = Request::builder()
        .method(Method::PATCH)
        .uri(server.http(path))
        .header(header::CONTENT_TYPE, "application/offset+octet-stream")
        .header(header::CONTENT_LENGTH, length)
        .header("upload-offset", offset);
    let body = http_body_util::StreamBody::new(Box::pin(frames));
    let response = checked(send_body(server, token, request, body).await?).await?;
    number(&response, "upload-offset")
}

/// Ends an upload, or deletes a file: its bytes are gone from the server.
pub async fn delete(server: &ServerUrl, token: &str, path: &str) -> Result<(), ClientError> {
    let request = Request::builder()
        .method(Method::DELETE)
        .uri(server.http(path));
    checked(send(server, token, request, Bytes::new()).await?).await?;
    Ok(())
}

/// The bytes of the file at `path`, or of `range` of it.
pub async fn download(
    server: &ServerUrl,
    token: &str,
    path: &str,
    range: Option<Range<u64>>,
) -> Result<Bytes, ClientError> {
    let mut request = Request::builder()
        .method(Method::GET)
        .uri(server.http(path));
    if let Some(r) = &range {
        request = request.header(header::RANGE, format!("bytes={}-{}", r.start, r.end - 1));
    }
    let response = checked(send(server, token, request, Bytes::new()).await?).await?;
    let expected = if range.is_some() {
        StatusCode::PARTIAL_CONTENT
    } else {
        StatusCode::OK
    };
    if response.status() != expected {
        return Err(ClientError::Protocol(format!(
            "expected {expected}, got {}",
            response.status()
        )));
    }
    Ok(response.into_body())
}
