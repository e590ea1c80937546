//! A user's devices and signed device lists.

use axum::Json;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use confab_crypto::{CryptoError, SignedDeviceList};
use confab_protocol::{DeviceId, DeviceInfo, DeviceListsResponse, ErrorCode, ResetRequest};
use confab_store::{SessionRecord, StoredDeviceList, UserId};

use super::accounts::verify_password;
use super::{Authed, ClientAddress, Failure, JsonBody};
use crate::AppState;

pub(super) async fn is_listed(
    state: &AppState,
    user: UserId,
    device: DeviceId,
) -> Result<bool, Failure> {
    let listed = state.directory.current(&*state.store, user).await?.devices;
    Ok(listed.contains(&device))
}

pub(super) async fn remove_device(
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

pub(super) async fn remove(
    state: &AppState,
    session: &SessionRecord,
    device: DeviceId,
) -> Result<StatusCode, Failure> {
    if !state
        .store
        .remove_device(session.user, device, state.config.clock.now())
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

pub(super) async fn list_devices(
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
pub(super) struct ListsQuery {
    after: Option<String>,
}

/// A user's signed device lists, for clients to verify and pin. Any logged-in
/// user may read any user's lists: they hold public keys only.
pub(super) async fn device_lists(
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

pub(super) fn stale_list() -> Failure {
    Failure::new(
        StatusCode::CONFLICT,
        ErrorCode::StaleDeviceList,
        "the device list changed meanwhile; fetch the newest, check it and sign again",
    )
}

/// Adds or removes devices: the new list must follow the newest one, signed
/// by this device, which must be on the newest list (or, for a user's first
/// list, be its only device). Devices dropped from the list are removed.
pub(super) async fn post_device_list(
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
pub(super) async fn reset_devices(
    State(state): State<AppState>,
    Authed(session): Authed,
    ClientAddress(from): ClientAddress,
    JsonBody(req): JsonBody<ResetRequest>,
) -> Result<StatusCode, Failure> {
    verify_password(&state, &session, from, req.password).await?;
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
        .put_device_list(
            session.user,
            stored,
            removed.clone(),
            state.config.clock.now(),
        )
        .await?;
    state
        .directory
        .set(session.user, signed.list.epoch as i64, &signed);
    state.router.device_list_changed(session.user);
    for device in removed {
        state
            .router
            .kick_device(session.user, device, ErrorCode::DeviceRemoved);
    }
    tracing::info!(user = %session.username, epoch = signed.list.epoch, "device list changed");
    Ok(StatusCode::NO_CONTENT)
}
