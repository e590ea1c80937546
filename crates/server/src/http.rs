//! HTTP routes: the account API (register, login, logout, password,
//! devices), health, metrics, and the WebSocket upgrade.

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::rejection::JsonRejection;
use axum::extract::ws::WebSocketUpgrade;
use axum::extract::ws::rejection::WebSocketUpgradeRejection;
use axum::extract::{DefaultBodyLimit, FromRequest, FromRequestParts, Path, Query, Request, State};
use axum::http::{HeaderMap, StatusCode, header, request::Parts};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use axum::{Extension, Json, Router};
use confab_crypto::{CryptoError, SignedDeviceList};
use confab_protocol::{
    ApiError, DeviceId, DeviceInfo, DeviceListsResponse, ErrorCode, LoginRequest, LoginResponse,
    PasswordChangeRequest, RegisterRequest, RegisterResponse, ResetRequest, Username, WS_PATH,
};
use confab_store::sqlite::now_ms;
use confab_store::{SessionRecord, StoreError, StoredDeviceList, UserId};
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
        .route("/v1/devices/list", post(post_device_list))
        .route("/v1/devices/reset", post(reset_devices))
        .route("/v1/users/{name}/devices", get(device_lists))
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
        // A signed list of 256 devices is about 30 KB of JSON.
        .layer(DefaultBodyLimit::max(64 * 1024))
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
            StoreError::Conflict => stale_list(),
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
    // Eight spaces are eight characters, but no password.
    let blank = password.chars().all(char::is_whitespace);
    if chars < MIN_PASSWORD_LEN || password.len() > MAX_PASSWORD_LEN || blank {
        return Err(Failure::new(
            StatusCode::BAD_REQUEST,
            ErrorCode::WeakPassword,
            format!(
                "passwords are at least {MIN_PASSWORD_LEN} characters, not all of them spaces, and at most {MAX_PASSWORD_LEN} bytes"
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
    if let (Some(device), Some(keys)) = (&kept, &req.keys)
        && device.keys.is_some_and(|k| k != *keys)
    {
        return Err(Failure::new(
            StatusCode::CONFLICT,
            ErrorCode::KeysMismatch,
            "this device registered other keys; log in without its id to make a new device",
        ));
    }
    let device = match kept {
        Some(device) => device,
        None => {
            let name: String = req
                .device_name
                .as_deref()
                .unwrap_or("device")
                .chars()
                .filter(|c| !c.is_control() && !confab_protocol::text::is_hidden_or_bidi(*c))
                .take(MAX_DEVICE_NAME)
                .collect();
            state.store.create_device(user.id, &name, now).await?
        }
    };
    if let Some(keys) = req.keys
        && device.keys.is_none()
        && !state.store.set_device_keys(device.id, keys).await?
    {
        return Err(Failure::new(
            StatusCode::CONFLICT,
            ErrorCode::KeysMismatch,
            "this device registered other keys",
        ));
    }
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

/// Ends this device's sessions and closes its sockets. A device on the
/// user's signed list stays (its owner logs in again with its key file and
/// gets it back; removing it from the list takes a signed list). Any other
/// device is removed with its cursors.
async fn logout(
    State(state): State<AppState>,
    Authed(session): Authed,
) -> Result<StatusCode, Failure> {
    if is_listed(&state, session.user, session.device).await? {
        state.store.end_sessions(session.device).await?;
        state
            .router
            .kick_device(session.user, session.device, ErrorCode::Unauthorized);
        return Ok(StatusCode::NO_CONTENT);
    }
    remove(&state, &session, session.device).await
}

async fn is_listed(state: &AppState, user: UserId, device: DeviceId) -> Result<bool, Failure> {
    let listed = state.directory.current(&*state.store, user).await?.devices;
    Ok(listed.contains(&device))
}

async fn remove_device(
    State(state): State<AppState>,
    Authed(session): Authed,
    Path(id): Path<String>,
) -> Result<StatusCode, Failure> {
    let id = id
        .parse()
        .map_err(|_| Failure::new(StatusCode::NOT_FOUND, ErrorCode::NotFound, "no such device"))?;
    if is_listed(&state, session.user, DeviceId(id)).await? {
        return Err(Failure::new(
            StatusCode::CONFLICT,
            ErrorCode::ListedDevice,
            "this device is on your signed device list: post a list without it, signed by one of your devices",
        ));
    }
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

/// Sensitive changes to a logged-in account ask for the password again.
async fn verify_password(
    state: &AppState,
    session: &SessionRecord,
    password: String,
) -> Result<(), Failure> {
    let user = state
        .store
        .user(session.user)
        .await?
        .ok_or(StoreError::NotFound)?;
    if state
        .passwords
        .verify(password, Some(user.password_hash))
        .await?
    {
        Ok(())
    } else {
        Err(invalid_credentials())
    }
}

async fn change_password(
    State(state): State<AppState>,
    Authed(session): Authed,
    JsonBody(req): JsonBody<PasswordChangeRequest>,
) -> Result<StatusCode, Failure> {
    check_password(&req.new_password)?;
    verify_password(&state, &session, req.old_password).await?;
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
    let listed = state
        .directory
        .current(&*state.store, session.user)
        .await?
        .devices;
    Ok(Json(
        devices
            .into_iter()
            .map(|d| DeviceInfo {
                current: d.id == session.device,
                listed: listed.contains(&d.id),
                device: d.id,
                name: d.name,
                created_at: d.created_at,
                keys: d.keys,
            })
            .collect(),
    ))
}

#[derive(serde::Deserialize)]
struct ListsQuery {
    after: Option<String>,
}

/// A user's signed device lists, for clients to verify and pin. Any logged-in
/// user may read any user's lists: they hold public keys only.
async fn device_lists(
    State(state): State<AppState>,
    Authed(_): Authed,
    Path(name): Path<String>,
    Query(query): Query<ListsQuery>,
) -> Result<Json<DeviceListsResponse>, Failure> {
    let unknown = || {
        Failure::new(
            StatusCode::NOT_FOUND,
            ErrorCode::UnknownUser,
            "no such user",
        )
    };
    let user = state.store.user_by_name(&name).await?.ok_or_else(unknown)?;
    let after = query
        .after
        .map(|a| a.parse::<i64>())
        .transpose()
        .map_err(|_| {
            Failure::new(
                StatusCode::BAD_REQUEST,
                ErrorCode::BadFrame,
                "`after` is an epoch: a whole number",
            )
        })?;
    let stored = match after {
        Some(after) => state.store.device_lists(user.id, after).await?,
        None => state
            .store
            .latest_device_list(user.id)
            .await?
            .into_iter()
            .collect(),
    };
    let lists = stored
        .iter()
        .map(|s| crate::directory::parse(&s.signed))
        .collect::<Result<_, _>>()?;
    Ok(Json(DeviceListsResponse { lists }))
}

fn bad_list(why: impl std::fmt::Display) -> Failure {
    Failure::new(
        StatusCode::BAD_REQUEST,
        ErrorCode::BadDeviceList,
        format!("device list refused: {why}"),
    )
}

fn stale_list() -> Failure {
    Failure::new(
        StatusCode::CONFLICT,
        ErrorCode::StaleDeviceList,
        "the device list changed meanwhile; fetch the newest, check it and sign again",
    )
}

/// Adds or removes devices: the new list must follow the newest one, signed
/// by this device, which must be on the newest list (or, for a user's first
/// list, be its only device). Devices dropped from the list are removed.
async fn post_device_list(
    State(state): State<AppState>,
    Authed(session): Authed,
    JsonBody(signed): JsonBody<SignedDeviceList>,
) -> Result<StatusCode, Failure> {
    let previous = match state.store.latest_device_list(session.user).await? {
        Some(stored) => Some(crate::directory::parse(&stored.signed)?),
        None => None,
    };
    match &previous {
        None => {
            if signed.list.epoch != 1 || signed.list.devices.len() != 1 {
                return Err(bad_list(
                    "a first list holds only the device that signs it, at epoch 1",
                ));
            }
            signed.verify_self_signed().map_err(bad_list)?;
        }
        Some(previous) => {
            if signed.list.epoch != previous.list.epoch + 1 {
                return Err(stale_list());
            }
            signed.verify_successor(&previous.list).map_err(bad_list)?;
        }
    }
    let removed = previous
        .iter()
        .flat_map(|p| p.list.devices.iter().map(|d| DeviceId(d.device)))
        .filter(|id| !signed.list.devices.iter().any(|d| d.device == id.0))
        .collect();
    store_list(&state, &session, signed, removed).await
}

/// For a user who lost every device: after the password, the list restarts
/// with only this device (self-signed), every other device is removed, and
/// every contact's client sees a key change.
async fn reset_devices(
    State(state): State<AppState>,
    Authed(session): Authed,
    JsonBody(req): JsonBody<ResetRequest>,
) -> Result<StatusCode, Failure> {
    verify_password(&state, &session, req.password).await?;
    let latest = state
        .store
        .latest_device_list(session.user)
        .await?
        .map_or(0, |l| l.epoch);
    let list = &req.list.list;
    if list.epoch != latest as u64 + 1 {
        return Err(stale_list());
    }
    if list.devices.len() != 1 {
        return Err(bad_list("a reset list holds only the device that signs it"));
    }
    req.list.verify_self_signed().map_err(bad_list)?;
    let removed = state
        .store
        .devices(session.user)
        .await?
        .into_iter()
        .map(|d| d.id)
        .filter(|&id| id != session.device)
        .collect();
    store_list(&state, &session, req.list, removed).await
}

/// The checks every list shares, then the commit: it names the caller's
/// user, is signed by the calling device, and each device on it is a
/// current device of the user with exactly the keys it registered.
async fn store_list(
    state: &AppState,
    session: &SessionRecord,
    signed: SignedDeviceList,
    removed: Vec<DeviceId>,
) -> Result<StatusCode, Failure> {
    if signed.list.user != session.username {
        return Err(bad_list(CryptoError::WrongUser));
    }
    if signed.signer != session.device.0 {
        return Err(bad_list("it must be signed by the device that posts it"));
    }
    let devices = state.store.devices(session.user).await?;
    for entry in &signed.list.devices {
        let registered = devices.iter().find(|d| d.id.0 == entry.device);
        if registered.and_then(|d| d.keys) != Some(entry.keys) {
            return Err(bad_list(format!(
                "device {} is not a current device of yours with those keys",
                entry.device
            )));
        }
    }
    let stored = StoredDeviceList {
        epoch: signed.list.epoch as i64,
        signed: serde_json::to_string(&signed).expect("device lists serialize"),
    };
    state
        .store
        .put_device_list(session.user, stored, removed.clone(), now_ms())
        .await?;
    state
        .directory
        .set(session.user, signed.list.epoch as i64, &signed);
    for device in removed {
        state
            .router
            .kick_device(session.user, device, ErrorCode::DeviceRemoved);
    }
    tracing::info!(user = %session.username, epoch = signed.list.epoch, "device list changed");
    Ok(StatusCode::NO_CONTENT)
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
