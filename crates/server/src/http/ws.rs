//! The WebSocket upgrade: origin check, handshake deadline, buffer sizes.

use std::sync::Arc;
use std::time::Instant;

use axum::Extension;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use confab_protocol::ErrorCode;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;

use super::{ClientAddress, Failure};
use crate::AppState;
use crate::budget::{Meter, Metered};
use crate::listener::{AcceptedAt, TcpSlot};
use crate::socket::{NotUpgrade, Upgrade};

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

pub(super) async fn websocket(
    State(state): State<AppState>,
    Extension(accepted): Extension<AcceptedAt>,
    Extension(tcp): Extension<TcpSlot>,
    ClientAddress(from): ClientAddress,
    request: Request,
) -> Response {
    let (mut parts, _) = request.into_parts();
    let upgrade = match Upgrade::from_parts(&mut parts) {
        Ok(upgrade) => upgrade,
        Err(NotUpgrade(status, message)) => {
            return Failure::new(status, ErrorCode::BadFrame, message).into_response();
        }
    };
    if !origin_allowed(&state.config.allowed_origins, &parts.headers) {
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
    let socket_slot = match state.limits.socket(from) {
        Ok(slot) => slot,
        Err(over) => {
            metrics::counter!("confab_connections_refused_total").increment(1);
            // As at accept: a full server or address will not be free in a second.
            let failure = Failure::new(
                StatusCode::SERVICE_UNAVAILABLE,
                ErrorCode::TooManyConnections,
                over.message(),
            );
            return Failure {
                retry_after: Some(5),
                ..failure
            }
            .into_response();
        }
    };
    let max_frame = state.config.max_frame_bytes;
    let config = WebSocketConfig::default()
        // Small buffers keep an idle connection cheap; tungstenite's
        // defaults would cost ~135 KiB each.
        .read_buffer_size(crate::WS_READ_BUFFER_BYTES)
        .write_buffer_size(WRITE_BUFFER_BYTES)
        // The server writes large frames in fragments (connection/write.rs),
        // so the buffer never needs more than one fragment past its size.
        .max_write_buffer_size(WRITE_BUFFER_BYTES + 2 * crate::socket::FRAGMENT_BYTES)
        .max_message_size(Some(max_frame))
        .max_frame_size(Some(max_frame));
    let response = upgrade.response();
    let tasks = state.tasks.clone();
    tasks.spawn(async move {
        let meter = Arc::new(Meter::default());
        let budget = state.budget.clone();
        let wrap = |io| Metered::new(io, meter.clone(), &budget);
        if let Some(socket) = upgrade.open(config, wrap).await {
            crate::connection::serve(state, socket, meter, deadline.into()).await;
        }
        drop((socket_slot, tcp));
    });
    response
}

/// Bytes buffered before a write goes to the socket.
const WRITE_BUFFER_BYTES: usize = 4 * 1024;

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
