//! HTTP routes: the account API (`accounts`: register, login, logout,
//! password), devices and their signed lists (`devices`), health, metrics,
//! and the WebSocket upgrade (`ws`). What they share is here: errors with
//! a code, JSON bodies, the bearer-token session and the client's address.

mod accounts;
mod blobs;
mod devices;
mod ws;

use std::net::IpAddr;
use std::time::Duration;

use axum::extract::rejection::JsonRejection;
use axum::extract::{DefaultBodyLimit, FromRequest, FromRequestParts, Request, State};
use axum::http::{HeaderMap, StatusCode, header, request::Parts};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use axum::{Json, Router};
use confab_protocol::{ApiError, ErrorCode, WS_PATH};
use confab_store::{SessionRecord, StoreError};
use serde::de::DeserializeOwned;

use crate::AppState;
use crate::auth::{PasswordError, token_hash};
use crate::limits::{Address, RetryAfter};
use crate::listener::Peer;

pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/metrics", get(metrics))
        .route("/v1/register", post(accounts::register))
        .route("/v1/login", post(accounts::login))
        .route("/v1/logout", post(accounts::logout))
        .route("/v1/password", post(accounts::change_password))
        .route("/v1/devices", get(devices::list_devices))
        .route("/v1/devices/{id}", delete(devices::remove_device))
        .route("/v1/devices/list", post(devices::post_device_list))
        .route("/v1/devices/reset", post(devices::reset_devices))
        .route("/v1/users/{name}/devices", get(devices::device_lists))
        .route(WS_PATH, get(ws::websocket))
        .merge(blobs::routes())
        .fallback(|| async {
            Failure::new(StatusCode::NOT_FOUND, ErrorCode::NotFound, "no such route")
        })
        .method_not_allowed_fallback(|| async {
            Failure::new(
                StatusCode::METHOD_NOT_ALLOWED,
                ErrorCode::NotFound,
                "method not allowed here",
            )
        })
        // A signed list of 256 devices is about 30 KB of JSON.
        .layer(DefaultBodyLimit::max(64 * 1024))
        .with_state(state)
}

/// An HTTP error: a status and an [`ApiError`] body.
#[derive(Debug)]
pub struct Failure {
    status: StatusCode,
    body: ApiError,
    /// Seconds for `retry-after`.
    retry_after: Option<u64>,
}

impl Failure {
    fn new(status: StatusCode, code: ErrorCode, message: impl Into<String>) -> Self {
        let retry_after = (status == StatusCode::SERVICE_UNAVAILABLE).then_some(1);
        Self {
            status,
            body: ApiError {
                code,
                message: message.into(),
            },
            retry_after,
        }
    }

    /// 429 `rate_limited`: `what` may be tried again after `wait`.
    fn throttled(what: &str, wait: RetryAfter) -> Self {
        // Rounded up: waiting exactly this long must be enough.
        let secs = (wait.0.as_secs_f64().ceil() as u64).max(1);
        Self {
            retry_after: Some(secs),
            ..Self::new(
                StatusCode::TOO_MANY_REQUESTS,
                ErrorCode::RateLimited,
                format!("{what}; retry in {secs} s"),
            )
        }
    }
}

impl IntoResponse for Failure {
    fn into_response(self) -> Response {
        let mut response = (self.status, Json(self.body)).into_response();
        if let Some(secs) = self.retry_after {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, secs.into());
        }
        response
    }
}

/// So that handlers answering with headers of their own (the blob routes)
/// can still use `?` on a `Failure`.
impl From<Failure> for Response {
    fn from(failure: Failure) -> Self {
        failure.into_response()
    }
}

impl From<StoreError> for Failure {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::UsernameTaken => Failure::new(
                StatusCode::CONFLICT,
                ErrorCode::UsernameTaken,
                "username is taken",
            ),
            StoreError::NotFound => {
                Failure::new(StatusCode::NOT_FOUND, ErrorCode::NotFound, "not found")
            }
            StoreError::Conflict => devices::stale_list(),
            other => {
                tracing::error!(error = %other, "store failure");
                Failure::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    ErrorCode::StorageUnavailable,
                    "storage is unavailable; retry later",
                )
            }
        }
    }
}

impl From<PasswordError> for Failure {
    fn from(e: PasswordError) -> Self {
        match e {
            PasswordError::Busy => Failure::new(
                StatusCode::SERVICE_UNAVAILABLE,
                ErrorCode::Busy,
                "too many logins at once; retry in a second",
            ),
            PasswordError::Internal(message) => {
                tracing::error!(%message, "password hashing failed");
                Failure::new(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    ErrorCode::Internal,
                    "internal error",
                )
            }
        }
    }
}

/// `Json<T>` whose rejections are [`Failure`]s with a code.
pub struct JsonBody<T>(pub T);

/// A body that trickles in slower than this is refused, so slow clients
/// cannot hold connection slots (the headers have their own timeout).
const BODY_TIMEOUT: Duration = Duration::from_secs(10);

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for JsonBody<T> {
    type Rejection = Failure;

    async fn from_request(req: Request, state: &S) -> Result<Self, Failure> {
        let read = tokio::time::timeout(BODY_TIMEOUT, Json::<T>::from_request(req, state));
        let Ok(parsed) = read.await else {
            return Err(Failure::new(
                StatusCode::REQUEST_TIMEOUT,
                ErrorCode::RequestTimeout,
                "the request body did not arrive in time",
            ));
        };
        match parsed {
            Ok(Json(value)) => Ok(JsonBody(value)),
            Err(rejection) => {
                let code = match &rejection {
                    JsonRejection::JsonSyntaxError(_) => ErrorCode::BadJson,
                    JsonRejection::BytesRejection(_) => ErrorCode::TooLarge,
                    _ => ErrorCode::BadFrame,
                };
                Err(Failure::new(
                    rejection.status(),
                    code,
                    rejection.body_text(),
                ))
            }
        }
    }
}

/// The session behind an `Authorization: Bearer` token.
pub struct Authed(pub SessionRecord);

impl FromRequestParts<AppState> for Authed {
    type Rejection = Failure;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, Failure> {
        let token = parts
            .headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .ok_or_else(|| {
                Failure::new(
                    StatusCode::UNAUTHORIZED,
                    ErrorCode::Unauthorized,
                    "missing bearer token",
                )
            })?;
        match session_for_token(state, token).await {
            Ok(session) => Ok(Authed(session)),
            Err((code, message)) => {
                let status = match code {
                    ErrorCode::StorageUnavailable => StatusCode::SERVICE_UNAVAILABLE,
                    _ => StatusCode::UNAUTHORIZED,
                };
                Err(Failure::new(status, code, message))
            }
        }
    }
}

/// Resolves a token to its session, for HTTP and WebSocket alike.
pub async fn session_for_token(
    state: &AppState,
    token: &str,
) -> Result<SessionRecord, (ErrorCode, &'static str)> {
    match state.store.session(token_hash(token)).await {
        Ok(Some(session)) if session.expires_at > state.config.clock.now() => Ok(session),
        Ok(Some(_)) => Err((
            ErrorCode::TokenExpired,
            "the session has expired; log in again (the device is kept)",
        )),
        Ok(None) => Err((ErrorCode::Unauthorized, "unknown or revoked token")),
        Err(e) => {
            tracing::error!(error = %e, "session lookup failed");
            Err((
                ErrorCode::StorageUnavailable,
                "storage is unavailable; retry later",
            ))
        }
    }
}

/// The client's address as the limits count it: the TCP peer's, or, when
/// the peer is a trusted proxy, the address its `X-Forwarded-For` names
/// last (the one the proxy itself added; any before it came from the
/// client and prove nothing).
#[derive(Clone, Copy, Debug)]
pub struct ClientAddress(pub Address);

impl FromRequestParts<AppState> for ClientAddress {
    type Rejection = Failure;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, Failure> {
        let Some(Peer(peer)) = parts.extensions.get::<Peer>().copied() else {
            return Err(Failure::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                ErrorCode::Internal,
                "no peer address",
            ));
        };
        Ok(ClientAddress(client_address(
            &state.config.trusted_proxies,
            peer.ip(),
            &parts.headers,
        )))
    }
}

fn client_address(trusted: &[IpAddr], peer: IpAddr, headers: &HeaderMap) -> Address {
    let forwarded = || {
        let last = headers.get_all("x-forwarded-for").iter().next_back()?;
        last.to_str().ok()?.rsplit(',').next()?.trim().parse().ok()
    };
    // A dual-stack listener sees an IPv4 proxy as ::ffff:a.b.c.d.
    match trusted
        .contains(&peer.to_canonical())
        .then(forwarded)
        .flatten()
    {
        Some(client) => Address::new(client),
        None => Address::new(peer),
    }
}

async fn healthz(State(state): State<AppState>) -> Result<&'static str, Failure> {
    if state.draining.load(std::sync::atomic::Ordering::Relaxed) {
        return Err(Failure::new(
            StatusCode::SERVICE_UNAVAILABLE,
            ErrorCode::ShuttingDown,
            "draining: this node is shutting down",
        ));
    }
    state.store.user(confab_store::UserId(0)).await?;
    Ok("ok\n")
}

async fn metrics(State(state): State<AppState>) -> Response {
    // Read when asked: the budget changes with every large frame.
    metrics::gauge!("confab_memory_budget_in_use_bytes").set(state.budget.in_use() as f64);
    let body = state
        .metrics
        .as_ref()
        .map(|h| h.render())
        .unwrap_or_default();
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], body).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_trusted_proxy_names_the_client() {
        let proxy: IpAddr = "10.0.0.1".parse().unwrap();
        let mut headers = HeaderMap::new();
        headers.append("x-forwarded-for", "6.6.6.6, 192.0.2.7".parse().unwrap());
        let named = Address::new("192.0.2.7".parse().unwrap());
        assert_eq!(client_address(&[proxy], proxy, &headers), named);
        let stranger: IpAddr = "10.0.0.2".parse().unwrap();
        assert_eq!(
            client_address(&[proxy], stranger, &headers),
            Address::new(stranger)
        );
        assert_eq!(
            client_address(&[proxy], proxy, &HeaderMap::new()),
            Address::new(proxy)
        );
    }
}
