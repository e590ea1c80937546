//! The WebSocket under a connection, opened by our own upgrade on
//! tungstenite rather than axum's, so that the connection holds
//! tungstenite's stream itself: it can then write a large frame as
//! fragments (tungstenite's write buffer keeps the size of the largest frame
//! it ever held, for the socket's life), and its reads go through a
//! [`Metered`] stream that charges the server's memory budget.

use axum::http::request::Parts;
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::response::Response;
use hyper::upgrade::{OnUpgrade, Upgraded};
use hyper_util::rt::TokioIo;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::{Role, WebSocketConfig};

pub use tokio_tungstenite::tungstenite::{Bytes, Error, Message, Utf8Bytes};

use crate::budget::Metered;

pub type Socket = WebSocketStream<Metered<TokioIo<Upgraded>>>;

/// Text longer than this is written as fragments of this size, so that
/// tungstenite's write buffer (which keeps its largest size) stays small
/// whatever the largest frame written was.
pub const FRAGMENT_BYTES: usize = 16 * 1024;

/// A request that asked for a WebSocket, checked as RFC 6455 §4.2.1 says.
pub struct Upgrade {
    on_upgrade: OnUpgrade,
    accept: HeaderValue,
}

/// Why a request is no WebSocket upgrade: the status and what to say.
pub struct NotUpgrade(pub StatusCode, pub &'static str);

impl Upgrade {
    pub fn from_parts(parts: &mut Parts) -> Result<Self, NotUpgrade> {
        let bad = |message| Err(NotUpgrade(StatusCode::BAD_REQUEST, message));
        if parts.method != Method::GET {
            return Err(NotUpgrade(
                StatusCode::METHOD_NOT_ALLOWED,
                "a WebSocket is opened with GET",
            ));
        }
        if !has_token(&parts.headers, header::CONNECTION, "upgrade")
            || !has_token(&parts.headers, header::UPGRADE, "websocket")
        {
            return bad("expected `Connection: upgrade` and `Upgrade: websocket`");
        }
        if parts.headers.get(header::SEC_WEBSOCKET_VERSION) != Some(&HeaderValue::from_static("13"))
        {
            return Err(NotUpgrade(
                StatusCode::UPGRADE_REQUIRED,
                "only WebSocket version 13 is spoken",
            ));
        }
        let Some(key) = parts.headers.get(header::SEC_WEBSOCKET_KEY) else {
            return bad("missing Sec-WebSocket-Key");
        };
        let accept = HeaderValue::from_str(&derive_accept_key(key.as_bytes()))
            .expect("base64 is a valid header value");
        let Some(on_upgrade) = parts.extensions.remove::<OnUpgrade>() else {
            return bad("this connection cannot be upgraded");
        };
        Ok(Upgrade { on_upgrade, accept })
    }

    /// The `101 Switching Protocols` answer; the socket opens once it is sent.
    pub fn response(&self) -> Response {
        Response::builder()
            .status(StatusCode::SWITCHING_PROTOCOLS)
            .header(header::CONNECTION, "upgrade")
            .header(header::UPGRADE, "websocket")
            .header(header::SEC_WEBSOCKET_ACCEPT, self.accept.clone())
            .body(axum::body::Body::empty())
            .expect("a valid response")
    }

    /// Waits for the client to take the answer and opens the socket, or
    /// `None` when the connection went away first.
    pub async fn open(
        self,
        config: WebSocketConfig,
        wrap: impl FnOnce(TokioIo<Upgraded>) -> Metered<TokioIo<Upgraded>>,
    ) -> Option<Socket> {
        let upgraded = self.on_upgrade.await.ok()?;
        let io = wrap(TokioIo::new(upgraded));
        Some(WebSocketStream::from_raw_socket(io, Role::Server, Some(config)).await)
    }
}

/// Whether a comma-separated header holds `token` (case-insensitive).
fn has_token(headers: &HeaderMap, name: header::HeaderName, token: &str) -> bool {
    headers.get_all(name).iter().any(|value| {
        value.to_str().is_ok_and(|v| {
            v.split(',')
                .any(|part| part.trim().eq_ignore_ascii_case(token))
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connection_header_may_list_several_tokens() {
        let mut headers = HeaderMap::new();
        headers.insert(header::CONNECTION, "keep-alive, Upgrade".parse().unwrap());
        assert!(has_token(&headers, header::CONNECTION, "upgrade"));
        assert!(!has_token(&headers, header::CONNECTION, "close"));
    }
}
