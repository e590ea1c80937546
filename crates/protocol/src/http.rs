//! JSON bodies of the HTTP account API (`/v1/register`, `/v1/login`, ...).

use confab_crypto::{LoginProof, PublicKeys, SignedDeviceList};
use serde::{Deserialize, Serialize};

use crate::{DeviceId, ErrorCode};

#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct RegisterRequest {
    pub username: String,
    pub password: String,
}

#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct RegisterResponse {
    pub user: String,
}

#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct LoginRequest {
    pub username: String,
    pub password: String,
    /// The device id this client got at an earlier login. When it is still a
    /// device of this user, the login keeps it; otherwise a new device is made.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device: Option<DeviceId>,
    /// A label for a new device ("laptop", "cli on host x").
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device_name: Option<String>,
    /// The device's public keys (docs/encryption.md). A new device keeps
    /// them; an existing one must present the keys it registered.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keys: Option<PublicKeys>,
    /// With `device`: a signature by that device's key, so the login counts
    /// as coming from a device the account knows (password limits, §2).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub proof: Option<LoginProof>,
}

#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct LoginResponse {
    pub user: String,
    pub device: DeviceId,
    /// Opaque bearer token for this device, sent in `auth` and as
    /// `Authorization: Bearer` on HTTP.
    pub token: String,
    /// When the token stops working (ms since epoch). The device outlives it.
    pub expires_at: i64,
    /// True when this login created the device.
    pub new_device: bool,
}

#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct PasswordChangeRequest {
    pub old_password: String,
    pub new_password: String,
    /// End the sessions of every other device of the user (their sockets
    /// close; they keep their device ids and can log in with the new password).
    #[serde(default)]
    pub logout_other_devices: bool,
}

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct DeviceInfo {
    pub device: DeviceId,
    pub name: String,
    pub created_at: i64,
    /// True for the device whose token made the request.
    pub current: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keys: Option<PublicKeys>,
    /// On the user's current signed device list. A device that is not can
    /// read nothing new and send nothing until another device approves it.
    #[serde(default)]
    pub listed: bool,
}

/// `GET /v1/users/{name}/devices?after=E`: the user's signed device lists
/// with an epoch after `E`, oldest first. Without `after`, only the newest.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct DeviceListsResponse {
    pub lists: Vec<SignedDeviceList>,
}

/// `POST /v1/devices/reset`: for a user who lost every device. Replaces the
/// device list with one holding only the calling device (self-signed), and
/// removes every other device.
#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct ResetRequest {
    pub password: String,
    pub list: SignedDeviceList,
}

/// Body of every HTTP error response.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    pub code: ErrorCode,
    pub message: String,
}
