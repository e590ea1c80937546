//! The WebSocket upgrade: origin check, handshake deadline, buffer sizes.

use std::time::Instant;

use axum::Extension;
use axum::extract::State;
use axum::extract::ws::WebSocketUpgrade;
use axum::extract::ws::rejection::WebSocketUpgradeRejection;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use confab_protocol::ErrorCode;

use super::{ClientAddress, Failure};
use crate::AppState;
use crate::listener::{AcceptedAt, TcpSlot};

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
                drop((socket_slot, tcp));
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
