//! Accounts: register, log in and out, change the password.

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use confab_protocol::{
    ErrorCode, LoginRequest, LoginResponse, PasswordChangeRequest, RegisterRequest,
    RegisterResponse, Username,
};
use confab_store::{SessionRecord, StoreError, UserId};

use super::devices::{is_listed, remove};
use super::{Authed, ClientAddress, Failure, JsonBody};
use crate::AppState;
use crate::auth::{MAX_PASSWORD_LEN, MIN_PASSWORD_LEN, new_token, token_hash};
use crate::limits::Address;

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

pub(super) async fn register(
    State(state): State<AppState>,
    ClientAddress(from): ClientAddress,
    JsonBody(req): JsonBody<RegisterRequest>,
) -> Result<(StatusCode, Json<RegisterResponse>), Failure> {
    let username = Username::new(&req.username)
        .map_err(|e| Failure::new(StatusCode::BAD_REQUEST, ErrorCode::InvalidUsername, e.0))?;
    check_password(&req.password)?;
    // The hash slot first: a `busy` answer must cost no allowance.
    let slot = state.passwords.slot(from)?;
    // Before the name is looked up, so that trying names costs allowance.
    state
        .limits
        .registration(from)
        .await
        .map_err(|wait| Failure::throttled("too many new accounts from your address", wait))?;
    if state.store.user_by_name(username.as_str()).await?.is_some() {
        return Err(StoreError::UsernameTaken.into());
    }
    let hash = slot.hash(req.password).await?;
    state
        .store
        .create_user(&username, &hash, state.config.clock.now())
        .await?;
    tracing::info!(user = %username, "registered");
    Ok((
        StatusCode::CREATED,
        Json(RegisterResponse {
            user: username.into(),
        }),
    ))
}

const MAX_DEVICE_NAME: usize = 64;

pub(super) async fn login(
    State(state): State<AppState>,
    ClientAddress(from): ClientAddress,
    JsonBody(req): JsonBody<LoginRequest>,
) -> Result<Json<LoginResponse>, Failure> {
    // A name that breaks the rules cannot exist; saying so leaks nothing.
    let username = Username::new(&req.username).map_err(|_| invalid_credentials())?;
    let user = state.store.user_by_name(username.as_str()).await?;
    let now = state.config.clock.now();
    let kept = match (&user, req.device) {
        (Some(user), Some(id)) => state.store.device(id).await?.filter(|d| d.user == user.id),
        _ => None,
    };
    // Proving a device's key is what exempts a login from the account's
    // limit: a device id alone is no secret.
    let known_device = match (&kept, &req.proof) {
        (Some(device), Some(proof)) => device
            .keys
            .is_some_and(|keys| proof.verify(&keys, username.as_str(), device.id.0, now)),
        _ => false,
    };
    let slot = state.passwords.slot(from)?;
    state
        .limits
        .password_attempt(username.as_str(), from, known_device)
        .await
        .map_err(|wait| {
            tracing::warn!(user = %username, %from, "login refused: too many password attempts");
            Failure::throttled("too many password attempts", wait)
        })?;
    let verified = slot
        .verify(req.password, user.as_ref().map(|u| u.password_hash.clone()))
        .await?;
    let Some(user) = user.filter(|_| verified) else {
        tracing::warn!(user = %username, %from, "login failed: wrong password or unknown user");
        return Err(invalid_credentials());
    };
    let new_device = kept.is_none();
    if new_device {
        check_new_device(&state, user.id, from).await?;
    }
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

/// A new device counts against its address's hourly allowance and the
/// account's pending devices (those not yet on its signed list).
async fn check_new_device(state: &AppState, user: UserId, from: Address) -> Result<(), Failure> {
    state
        .limits
        .new_device(from)
        .await
        .map_err(|wait| Failure::throttled("too many new devices from your address", wait))?;
    let listed = state.directory.current(&*state.store, user).await?.devices;
    let pending = state
        .store
        .devices(user)
        .await?
        .iter()
        .filter(|d| !listed.contains(&d.id))
        .count();
    let max = state.limits.config().pending_devices_per_account;
    if pending >= max {
        return Err(Failure::new(
            StatusCode::CONFLICT,
            ErrorCode::TooManyDevices,
            format!(
                "this account has {pending} devices waiting for approval (at most {max}); approve or remove some first"
            ),
        ));
    }
    Ok(())
}

/// Ends this device's sessions and closes its sockets. A device on the
/// user's signed list stays (its owner logs in again with its key file and
/// gets it back; removing it from the list takes a signed list). Any other
/// device is removed with its cursors.
pub(super) async fn logout(
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

/// Sensitive changes to a logged-in account ask for the password again,
/// within the same limits as a login (a stolen token must not make
/// guessing any faster).
pub(super) async fn verify_password(
    state: &AppState,
    session: &SessionRecord,
    from: Address,
    password: String,
) -> Result<(), Failure> {
    let slot = state.passwords.slot(from)?;
    // A logged-in device asks: like a login that proves a device key, it is
    // not held to the account-wide allowance others can use up.
    state
        .limits
        .password_attempt(&session.username, from, true)
        .await
        .map_err(|wait| Failure::throttled("too many password attempts", wait))?;
    let user = state
        .store
        .user(session.user)
        .await?
        .ok_or(StoreError::NotFound)?;
    if slot.verify(password, Some(user.password_hash)).await? {
        Ok(())
    } else {
        tracing::warn!(user = %session.username, %from, "password check failed");
        Err(invalid_credentials())
    }
}

pub(super) async fn change_password(
    State(state): State<AppState>,
    Authed(session): Authed,
    ClientAddress(from): ClientAddress,
    JsonBody(req): JsonBody<PasswordChangeRequest>,
) -> Result<StatusCode, Failure> {
    check_password(&req.new_password)?;
    verify_password(&state, &session, from, req.old_password).await?;
    let hash = state.passwords.slot(from)?.hash(req.new_password).await?;
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
