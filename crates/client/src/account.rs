//! The HTTP account API: register, login, logout, password, devices.

use bytes::Bytes;
use confab_crypto::SignedDeviceList;
use confab_protocol::{
    ApiError, DeviceId, DeviceInfo, DeviceListsResponse, ErrorCode, LoginRequest, LoginResponse,
    PasswordChangeRequest, RegisterRequest, RegisterResponse, ResetRequest,
};
use http_body_util::{BodyExt, Full};
use hyper::{Method, Request, StatusCode, header};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::ClientError;

/// Where a server is: `http://host:port` (a trailing slash is ignored).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServerUrl {
    /// `host:port`
    pub authority: String,
}

impl ServerUrl {
    pub fn parse(url: &str) -> Result<Self, ClientError> {
        let rest = url
            .strip_prefix("http://")
            .or_else(|| url.strip_prefix("ws://"))
            .ok_or_else(|| {
                ClientError::Usage(format!(
                    "server URL must start with http:// (TLS is expected at a proxy in front of confab): {url}"
                ))
            })?;
        let authority = rest.trim_end_matches('/');
        if authority.is_empty() || authority.contains('/') {
            return Err(ClientError::Usage(format!(
                "server URL must be http://host:port, got {url}"
            )));
        }
        Ok(Self {
            authority: authority.to_string(),
        })
    }

    pub fn http(&self, path: &str) -> String {
        format!("http://{}{path}", self.authority)
    }

    pub fn ws(&self) -> String {
        format!("ws://{}{}", self.authority, confab_protocol::WS_PATH)
    }
}

async fn call<T: DeserializeOwned>(
    server: &ServerUrl,
    method: Method,
    path: &str,
    token: Option<&str>,
    body: Option<&impl Serialize>,
) -> Result<Option<T>, ClientError> {
    let client = Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
    let mut request = Request::builder().method(method).uri(server.http(path));
    if let Some(token) = token {
        request = request.header(header::AUTHORIZATION, format!("Bearer {token}"));
    }
    let body = match body {
        Some(body) => {
            request = request.header(header::CONTENT_TYPE, "application/json");
            Full::new(Bytes::from(
                serde_json::to_vec(body).map_err(|e| ClientError::Protocol(e.to_string()))?,
            ))
        }
        None => Full::new(Bytes::new()),
    };
    let request = request
        .body(body)
        .map_err(|e| ClientError::Usage(e.to_string()))?;
    let response = client
        .request(request)
        .await
        .map_err(|e| ClientError::Io(format!("{}: {e}", server.authority)))?;
    let status = response.status();
    let bytes = response
        .into_body()
        .collect()
        .await
        .map_err(|e| ClientError::Io(e.to_string()))?
        .to_bytes();
    if !status.is_success() {
        return Err(api_error(status, &bytes));
    }
    if status == StatusCode::NO_CONTENT {
        return Ok(None);
    }
    serde_json::from_slice(&bytes)
        .map(Some)
        .map_err(|e| ClientError::Protocol(format!("unexpected response: {e}")))
}

/// An error answer: its JSON body, or what there was of it.
pub(crate) fn api_error(status: StatusCode, body: &[u8]) -> ClientError {
    let error = serde_json::from_slice::<ApiError>(body).unwrap_or_else(|_| ApiError {
        code: ErrorCode::Internal,
        message: format!("HTTP {status}: {}", String::from_utf8_lossy(body)),
    });
    ClientError::Api {
        status: status.as_u16(),
        error,
    }
}

fn expect<T>(value: Option<T>) -> Result<T, ClientError> {
    value.ok_or_else(|| ClientError::Protocol("empty response".into()))
}

/// Registers a user; returns the username as the server normalised it.
pub async fn register(
    server: &ServerUrl,
    username: &str,
    password: &str,
) -> Result<String, ClientError> {
    let body = RegisterRequest {
        username: username.into(),
        password: password.into(),
    };
    let response: Option<RegisterResponse> =
        call(server, Method::POST, "/v1/register", None, Some(&body)).await?;
    Ok(expect(response)?.user)
}

/// Logs in. Pass the device id from an earlier login to keep that device.
pub async fn login(
    server: &ServerUrl,
    username: &str,
    password: &str,
    device: Option<DeviceId>,
    device_name: Option<&str>,
) -> Result<LoginResponse, ClientError> {
    let body = LoginRequest {
        username: username.into(),
        password: password.into(),
        device,
        device_name: device_name.map(str::to_string),
        keys: None,
        proof: None,
    };
    login_with(server, &body).await
}

/// Logs in with every field of the request, such as the device's keys.
pub async fn login_with(
    server: &ServerUrl,
    request: &LoginRequest,
) -> Result<LoginResponse, ClientError> {
    expect(call(server, Method::POST, "/v1/login", None, Some(request)).await?)
}

/// A user's signed device lists after epoch `after`, oldest first; without
/// `after`, only the newest. Unverified: see [`crate::e2e`].
pub async fn device_lists(
    server: &ServerUrl,
    token: &str,
    user: &str,
    after: Option<u64>,
) -> Result<Vec<SignedDeviceList>, ClientError> {
    let path = match after {
        Some(after) => format!("/v1/users/{user}/devices?after={after}"),
        None => format!("/v1/users/{user}/devices"),
    };
    let response: DeviceListsResponse =
        expect(call(server, Method::GET, &path, Some(token), None::<&()>).await?)?;
    Ok(response.lists)
}

/// Publishes this user's next device list, signed by this device.
pub async fn post_device_list(
    server: &ServerUrl,
    token: &str,
    list: &SignedDeviceList,
) -> Result<(), ClientError> {
    call::<()>(
        server,
        Method::POST,
        "/v1/devices/list",
        Some(token),
        Some(list),
    )
    .await?;
    Ok(())
}

/// Starts the user's device list over with only this device.
pub async fn reset_devices(
    server: &ServerUrl,
    token: &str,
    password: &str,
    list: &SignedDeviceList,
) -> Result<(), ClientError> {
    let body = ResetRequest {
        password: password.into(),
        list: list.clone(),
    };
    call::<()>(
        server,
        Method::POST,
        "/v1/devices/reset",
        Some(token),
        Some(&body),
    )
    .await?;
    Ok(())
}

/// Ends this device's session. A device on the signed list stays (log in
/// again with its id and keys); any other is removed.
pub async fn logout(server: &ServerUrl, token: &str) -> Result<(), ClientError> {
    call::<()>(server, Method::POST, "/v1/logout", Some(token), None::<&()>).await?;
    Ok(())
}

pub async fn change_password(
    server: &ServerUrl,
    token: &str,
    old_password: &str,
    new_password: &str,
    logout_other_devices: bool,
) -> Result<(), ClientError> {
    let body = PasswordChangeRequest {
        old_password: old_password.into(),
        new_password: new_password.into(),
        logout_other_devices,
    };
    call::<()>(
        server,
        Method::POST,
        "/v1/password",
        Some(token),
        Some(&body),
    )
    .await?;
    Ok(())
}

pub async fn devices(server: &ServerUrl, token: &str) -> Result<Vec<DeviceInfo>, ClientError> {
    expect(call(server, Method::GET, "/v1/devices", Some(token), None::<&()>).await?)
}

pub async fn remove_device(
    server: &ServerUrl,
    token: &str,
    device: DeviceId,
) -> Result<(), ClientError> {
    call::<()>(
        server,
        Method::DELETE,
        &format!("/v1/devices/{device}"),
        Some(token),
        None::<&()>,
    )
    .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_server_urls() {
        let url = ServerUrl::parse("http://127.0.0.1:8080/").unwrap();
        assert_eq!(url.ws(), "ws://127.0.0.1:8080/v1/ws");
        assert_eq!(url.http("/v1/login"), "http://127.0.0.1:8080/v1/login");
        assert!(ServerUrl::parse("https://x").is_err());
        assert!(ServerUrl::parse("http://x/y").is_err());
        assert!(ServerUrl::parse("127.0.0.1:8080").is_err());
    }
}
