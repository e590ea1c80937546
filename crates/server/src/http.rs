//! HTTP routes: the account API (register, login, logout, password,
//! devices), health, metrics, and the WebSocket upgrade.

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::rejection::JsonRejection;
use axum::extract::ws::WebSocketUpgrade;
use axum::extract::ws::rejection::WebSocketUpgradeRejection;
use axum::extract::{DefaultBodyLimit, FromRequest, FromRequestParts, Path, Request, State};
use axum::http::{HeaderMap, StatusCode, header, request::Parts};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use axum::{Extension, Json, Router};
use confab_protocol::{
    ApiError, DeviceId, DeviceInfo, ErrorCode, LoginRequest, LoginResponse, PasswordChangeRequest,
    RegisterRequest, RegisterResponse, Username, WS_PATH,
};
use confab_store::sqlite::now_ms;
use confab_store::{SessionRecord, StoreError};
use serde::de::DeserializeOwned;

use crate::AppState;
use crate::auth::{MAX_PASSWORD_LEN, MIN_PASSWORD_LEN, PasswordError, new_token, token_hash};
use crate::listener::{AcceptedAt, ConnectionSlot};

pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/metrics", get(metrics))
        .route("/v1/register", post(register))
        .route("/v1/login", post(login))
        .route("/v1/logout", post(logout))
        .route("/v1/password", post(change_password))
        .route("/v1/devices", get(list_devices))
        .route("/v1/devices/{id}", delete(remove_device))
        .route(WS_PATH, get(websocket))
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
        .layer(DefaultBodyLimit::max(16 * 1024))
        .with_state(state)
}

/// An HTTP error: a status and an [`ApiError`] body.
#[derive(Debug)]
pub struct Failure {
    status: StatusCode,
    body: ApiError,
}

impl Failure {
    fn new(status: StatusCode, code: ErrorCode, message: impl Into<String>) -> Self {
        Self {
            status,
            body: ApiError {
                code,
                message: message.into(),
            },
        }
    }
}

impl IntoResponse for Failure {
    fn into_response(self) -> Response {
        let mut response = (self.status, Json(self.body)).into_response();
        if self.status == StatusCode::SERVICE_UNAVAILABLE {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, header::HeaderValue::from_static("1"));
        }
        response
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
        Ok(Some(session)) if session.expires_at > now_ms() => Ok(session),
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

async fn healthz(State(state): State<AppState>) -> Result<&'static str, Failure> {
    state.store.user(confab_store::UserId(0)).await?;
    Ok("ok\n")
}

async fn metrics(State(state): State<AppState>) -> Response {
    let body = state
        .metrics
        .as_ref()
        .map(|h| h.render())
        .unwrap_or_default();
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], body).into_response()
}

fn check_password(password: &str) -> Result<(), Failure> {
    let chars = password.chars().count();
    if chars < MIN_PASSWORD_LEN || password.len() > MAX_PASSWORD_LEN {
        return Err(Failure::new(
            StatusCode::BAD_REQUEST,
            ErrorCode::WeakPassword,
            format!(
                "passwords are at least {MIN_PASSWORD_LEN} characters and at most {MAX_PASSWORD_LEN} bytes"
            ),
        ));
    }
    Ok(())
}

fn invalid_credentials() -> Failure {
    Failure::new(
        StatusCode::UNAUTHORIZED,
        ErrorCode::InvalidCredentials,
        "unknown user or wrong password",
    )
}

async fn register(
    State(state): State<AppState>,
    JsonBody(req): JsonBody<RegisterRequest>,
) -> Result<(StatusCode, Json<RegisterResponse>), Failure> {
    let username = Username::new(&req.username)
        .map_err(|e| Failure::new(StatusCode::BAD_REQUEST, ErrorCode::InvalidUsername, e.0))?;
    check_password(&req.password)?;
    if state.store.user_by_name(username.as_str()).await?.is_some() {
        return Err(StoreError::UsernameTaken.into());
    }
    let hash = state.passwords.hash(req.password).await?;
    state.store.create_user(&username, &hash, now_ms()).await?;
    tracing::info!(user = %username, "registered");
    Ok((
        StatusCode::CREATED,
        Json(RegisterResponse {
            user: username.into(),
        }),
    ))
}

const MAX_DEVICE_NAME: usize = 64;

async fn login(
    State(state): State<AppState>,
    JsonBody(req): JsonBody<LoginRequest>,
) -> Result<Json<LoginResponse>, Failure> {
    // A name that breaks the rules cannot exist; saying so leaks nothing.
    let username = Username::new(&req.username).map_err(|_| invalid_credentials())?;
    let user = state.store.user_by_name(username.as_str()).await?;
    let verified = state
        .passwords
        .verify(req.password, user.as_ref().map(|u| u.password_hash.clone()))
        .await?;
    let Some(user) = user.filter(|_| verified) else {
        return Err(invalid_credentials());
    };
    let now = now_ms();
    let kept = match req.device {
        Some(id) => state.store.device(id).await?.filter(|d| d.user == user.id),
        None => None,
    };
    let new_device = kept.is_none();
    let device = match kept {
        Some(device) => device,
        None => {
            let name: String = req
                .device_name
                .as_deref()
                .unwrap_or("device")
                .chars()
                .filter(|c| !c.is_control())
                .take(MAX_DEVICE_NAME)
                .collect();
            state.store.create_device(user.id, &name, now).await?
        }
    };
    let token = new_token();
    let expires_at = now + state.config.session_ttl.as_millis() as i64;
    state
        .store
        .create_session(token_hash(&token), user.id, device.id, now, expires_at)
        .await?;
    tracing::info!(user = %user.username, device = %device.id, new_device, "logged in");
    Ok(Json(LoginResponse {
        user: user.username,
        device: device.id,
        token,
        expires_at,
        new_device,
    }))
}

/// Ends this device: its sessions, its cursors and its open sockets.
async fn logout(
    State(state): State<AppState>,
    Authed(session): Authed,
) -> Result<StatusCode, Failure> {
    remove(&state, &session, session.device).await
}

async fn remove_device(
    State(state): State<AppState>,
    Authed(session): Authed,
    Path(id): Path<String>,
) -> Result<StatusCode, Failure> {
    let id = id
        .parse()
        .map_err(|_| Failure::new(StatusCode::NOT_FOUND, ErrorCode::NotFound, "no such device"))?;
    remove(&state, &session, DeviceId(id)).await
}

async fn remove(
    state: &AppState,
    session: &SessionRecord,
    device: DeviceId,
) -> Result<StatusCode, Failure> {
    if !state
        .store
        .remove_device(session.user, device, now_ms())
        .await?
    {
        return Err(Failure::new(
            StatusCode::NOT_FOUND,
            ErrorCode::NotFound,
            "no such device",
        ));
    }
    state
        .router
        .kick_device(session.user, device, ErrorCode::DeviceRemoved);
    tracing::info!(user = %session.username, %device, "device removed");
    Ok(StatusCode::NO_CONTENT)
}

async fn change_password(
    State(state): State<AppState>,
    Authed(session): Authed,
    JsonBody(req): JsonBody<PasswordChangeRequest>,
) -> Result<StatusCode, Failure> {
    check_password(&req.new_password)?;
    let user = state
        .store
        .user(session.user)
        .await?
        .ok_or(StoreError::NotFound)?;
    if !state
        .passwords
        .verify(req.old_password, Some(user.password_hash))
        .await?
    {
        return Err(invalid_credentials());
    }
    let hash = state.passwords.hash(req.new_password).await?;
    state.store.set_password_hash(session.user, &hash).await?;
    if req.logout_other_devices {
        for device in state
            .store
            .end_other_sessions(session.user, session.device)
            .await?
        {
            state
                .router
                .kick_device(session.user, device, ErrorCode::Unauthorized);
        }
    }
    Ok(StatusCode::NO_CONTENT)
}

async fn list_devices(
    State(state): State<AppState>,
    Authed(session): Authed,
) -> Result<Json<Vec<DeviceInfo>>, Failure> {
    let devices = state.store.devices(session.user).await?;
    Ok(Json(
        devices
            .into_iter()
            .map(|d| DeviceInfo {
                current: d.id == session.device,
                device: d.id,
                name: d.name,
                created_at: d.created_at,
            })
            .collect(),
    ))
}

/// A browser sends `Origin`; only allowed origins may open a socket, so
/// another site cannot use a logged-in user's browser against us. Clients
/// that are not browsers send no `Origin` and are let through (they must
/// still authenticate).
fn origin_allowed(allowed: &[String], headers: &HeaderMap) -> bool {
    let Some(origin) = headers.get(header::ORIGIN) else {
        return true;
    };
    let Ok(origin) = origin.to_str() else {
        return false;
    };
    if !allowed.is_empty() {
        return allowed
            .iter()
            .any(|a| a == "*" || a.eq_ignore_ascii_case(origin));
    }
    let host = headers.get(header::HOST).and_then(|h| h.to_str().ok());
    let origin_host = origin
        .strip_prefix("https://")
        .or_else(|| origin.strip_prefix("http://"));
    matches!((origin_host, host), (Some(o), Some(h)) if o.eq_ignore_ascii_case(h))
}

async fn websocket(
    State(state): State<AppState>,
    Extension(accepted): Extension<AcceptedAt>,
    Extension(slot): Extension<Arc<ConnectionSlot>>,
    headers: HeaderMap,
    upgrade: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
) -> Response {
    let upgrade = match upgrade {
        Ok(upgrade) => upgrade,
        Err(rejection) => {
            return Failure::new(
                rejection.status(),
                ErrorCode::BadFrame,
                rejection.body_text(),
            )
            .into_response();
        }
    };
    if !origin_allowed(&state.config.allowed_origins, &headers) {
        return Failure::new(
            StatusCode::FORBIDDEN,
            ErrorCode::ForbiddenOrigin,
            "this origin may not open a socket here",
        )
        .into_response();
    }
    let deadline = accepted.0 + state.config.handshake_timeout;
    if Instant::now() >= deadline {
        return Failure::new(
            StatusCode::REQUEST_TIMEOUT,
            ErrorCode::AuthTimeout,
            "handshake took too long",
        )
        .into_response();
    }
    let max_frame = state.config.max_frame_bytes;
    let tasks = state.tasks.clone();
    upgrade
        // Small buffers keep an idle connection cheap; tungstenite's
        // defaults would cost ~135 KiB each.
        .read_buffer_size(crate::WS_READ_BUFFER_BYTES)
        .write_buffer_size(4 * 1024)
        // Room for the largest frame the server writes: a history page
        // (PAGE_BYTES of bodies, up to 6x when JSON escapes them).
        .max_write_buffer_size(8 * 1024 * 1024)
        .max_message_size(max_frame)
        .max_frame_size(max_frame)
        .on_upgrade(move |socket| {
            tasks.track_future(async move {
                crate::connection::serve(state, socket, deadline.into()).await;
                drop(slot);
            })
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(origin: Option<&str>, host: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(header::HOST, host.parse().unwrap());
        if let Some(o) = origin {
            h.insert(header::ORIGIN, o.parse().unwrap());
        }
        h
    }

    #[test]
    fn same_origin_by_default() {
        assert!(origin_allowed(&[], &headers(None, "chat.example:8080")));
        assert!(origin_allowed(
            &[],
            &headers(Some("https://chat.example:8080"), "chat.example:8080")
        ));
        assert!(!origin_allowed(
            &[],
            &headers(Some("https://evil.example"), "chat.example:8080")
        ));
        assert!(!origin_allowed(
            &[],
            &headers(Some("null"), "chat.example:8080")
        ));
    }

    #[test]
    fn allowlist_replaces_same_origin() {
        let allowed = vec!["https://app.example".to_string()];
        assert!(origin_allowed(
            &allowed,
            &headers(Some("https://app.example"), "api.example")
        ));
        assert!(!origin_allowed(
            &allowed,
            &headers(Some("https://api.example"), "api.example")
        ));
    }
}
