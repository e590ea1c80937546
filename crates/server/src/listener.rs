//! The accept loop: the connection limits (in all and per address) checked
//! before any work is done, the PROXY protocol header of a trusted load
//! balancer, a header-read timeout against slow clients, and HTTP/1.1 with
//! upgrades served by hyper for the axum router.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use confab_protocol::{ApiError, ErrorCode};
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tower::ServiceExt;

use crate::AppState;
use crate::limits::{Address, Over, Slot};
use crate::proxy_header::{self, Source};

/// When the TCP connection was accepted; the WebSocket handshake and
/// authentication must finish within the handshake timeout from it.
#[derive(Clone, Copy, Debug)]
pub struct AcceptedAt(pub Instant);

/// The TCP peer: the client, or a proxy in front of it (the client its
/// PROXY protocol header named, if it sent one).
#[derive(Clone, Copy, Debug)]
pub struct Peer(pub SocketAddr);

/// Counts one open TCP connection for as long as any clone lives (the HTTP
/// task holds one, an upgraded WebSocket another): in all, and for the
/// client's address once it is known.
#[derive(Clone, Debug)]
pub struct TcpSlot {
    _held: Arc<Slot>,
}

/// Refusals being written at once; past this, excess sockets are just closed.
const MAX_REFUSALS_IN_FLIGHT: usize = 64;

pub async fn accept_loop(
    listener: TcpListener,
    state: AppState,
    shutdown: impl std::future::Future<Output = ()>,
) {
    let refusing = Arc::new(AtomicUsize::new(0));
    let app = crate::http::router(state.clone());
    tokio::pin!(shutdown);
    loop {
        let (stream, peer) = tokio::select! {
            _ = &mut shutdown => return,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    // Out of file descriptors, most likely: back off instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        // A trusted proxy carries many clients: each is counted by the
        // address the proxy gives, in its PROXY header (read below, off
        // this loop) or when it opens a socket.
        let trusted = state
            .config
            .trusted_proxies
            .contains(&peer.ip().to_canonical());
        let from = (!trusted).then(|| Address::new(peer.ip()));
        let slot = match state.limits.tcp(from) {
            Ok(slot) => slot,
            Err(over) => {
                metrics::counter!("confab_connections_refused_total").increment(1);
                if over == Over::Address {
                    tracing::debug!(%peer, "refused: too many connections from this address");
                }
                if refusing.fetch_add(1, Ordering::Relaxed) < MAX_REFUSALS_IN_FLIGHT {
                    let refusing = refusing.clone();
                    tokio::spawn(async move {
                        refuse(stream, over).await;
                        refusing.fetch_sub(1, Ordering::Relaxed);
                    });
                } else {
                    refusing.fetch_sub(1, Ordering::Relaxed);
                }
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let app = app.clone();
        let state2 = state.clone();
        let proxied = trusted && state.config.proxy_protocol;
        state.tasks.spawn(async move {
            let accepted_at = AcceptedAt(Instant::now());
            let (stream, peer, slot) = if proxied {
                match from_proxy(stream, peer, slot, &state2).await {
                    Some(client) => client,
                    None => return,
                }
            } else {
                (stream, Peer(peer), slot)
            };
            let slot = TcpSlot {
                _held: Arc::new(slot),
            };
            let service = hyper::service::service_fn(move |mut req: hyper::Request<Incoming>| {
                req.extensions_mut().insert(accepted_at);
                req.extensions_mut().insert(peer);
                req.extensions_mut().insert(slot.clone());
                app.clone().oneshot(req)
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(state2.config.handshake_timeout)
                .serve_connection(TokioIo::new(stream), service)
                .with_upgrades();
            tokio::pin!(conn);
            tokio::select! {
                _ = conn.as_mut() => {}
                _ = state2.shutdown.cancelled() => {
                    conn.as_mut().graceful_shutdown();
                    let _ = conn.await;
                }
            }
        });
    }
}

/// The client a trusted proxy's connection is for, from its PROXY header,
/// counted against the per-address limit; `None` once the connection is
/// refused (over the limit) or closed (no valid header in time).
async fn from_proxy(
    mut stream: TcpStream,
    proxy: SocketAddr,
    mut slot: Slot,
    state: &AppState,
) -> Option<(TcpStream, Peer, Slot)> {
    let header = tokio::time::timeout(
        state.config.handshake_timeout,
        proxy_header::read(&mut stream),
    )
    .await;
    match header {
        Ok(Ok(Source::Client(client))) => {
            match state.limits.tcp_from(Address::new(client.ip())) {
                Ok(more) => slot.merge(more),
                Err(over) => {
                    metrics::counter!("confab_connections_refused_total").increment(1);
                    tracing::debug!(%client, "refused: too many connections from this address");
                    refuse(stream, over).await;
                    return None;
                }
            }
            Some((stream, Peer(client), slot))
        }
        // The proxy's own connection: its health check.
        Ok(Ok(Source::Proxy)) => Some((stream, Peer(proxy), slot)),
        Ok(Err(e)) => {
            metrics::counter!("confab_proxy_headers_refused_total").increment(1);
            // Most likely a proxy without send-proxy-v2: every connection
            // from it fails, so say it plainly.
            tracing::warn!(%proxy, error = %e, "closed a connection from a trusted proxy: --proxy-protocol expects a PROXY header first");
            None
        }
        Err(_) => {
            metrics::counter!("confab_proxy_headers_refused_total").increment(1);
            tracing::debug!(%proxy, "closed: no PROXY header within the handshake timeout");
            None
        }
    }
}

/// Answers a connection over a limit with a plain 503, so the client sees
/// why instead of a reset.
async fn refuse(mut stream: TcpStream, over: Over) {
    let body = serde_json::to_string(&ApiError {
        code: ErrorCode::TooManyConnections,
        message: over.message().into(),
    })
    .unwrap_or_default();
    let response = format!(
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\ncontent-length: {}\r\nretry-after: 5\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = tokio::time::timeout(Duration::from_secs(2), async {
        let _ = stream.write_all(response.as_bytes()).await;
        let _ = stream.shutdown().await;
        // Read what the client sent so that closing does not reset the
        // connection before it has read the answer.
        let mut sink = [0u8; 1024];
        while let Ok(n) = stream.read(&mut sink).await {
            if n == 0 {
                break;
            }
        }
    })
    .await;
}
