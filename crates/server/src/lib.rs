//! The confab server: the HTTP account API, the WebSocket endpoint and what
//! sits behind it (hub, presence, receipts), on top of a [`Store`].
//!
//! [`Server::bind`] opens everything, [`Server::run`] serves until the
//! shutdown future resolves, then drains: no new connections, every pending
//! write committed and acked, the store closed.

pub mod auth;
pub mod blobs;
mod budget;
pub mod config;
mod connection;
pub mod directory;
mod held;
mod http;
pub mod hub;
pub mod limits;
mod listener;
pub mod presence;
pub mod proxy_header;
mod rates;
mod redis_presence;
mod redis_router;
mod repair;
mod socket;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use confab_store::Store;
use confab_store::postgres::{PgOptions, PgStore};
use confab_store::sqlite::{SqliteOptions, SqliteStore};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub use config::{BlobStore, Config};

use crate::auth::Passwords;
use crate::hub::{Hub, LocalRouter, Router};
use crate::presence::{LocalPresence, Presence};

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("cannot reach Redis: {0}")]
    Redis(redis::RedisError),
    #[error("cannot open the store: {0}")]
    Store(#[from] confab_store::StoreError),
    #[error(transparent)]
    Blobs(#[from] blobs::OpenError),
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
}

/// Everything a request or connection handler needs, shared by all of them.
pub struct Shared {
    pub config: Config,
    pub store: Arc<dyn Store>,
    pub hub: Arc<Hub>,
    pub router: Arc<dyn Router>,
    pub directory: Arc<directory::Directory>,
    /// `None` when the server runs with presence off.
    pub presence: Option<Arc<dyn Presence>>,
    pub passwords: Passwords,
    pub limits: Arc<limits::Limits>,
    /// Bytes in flight on sockets and in pages, for the whole server.
    pub budget: budget::Budget,
    /// Where the bytes of files are kept.
    pub blobs: blobs::Blobs,
    pub metrics: Option<PrometheusHandle>,
    pub meters: Meters,
    /// Cancelled when the server starts shutting down.
    pub shutdown: CancellationToken,
    /// Every connection task, so shutdown can wait for them.
    pub tasks: TaskTracker,
    /// Set when shutdown has begun and the node drains (`/healthz` 503).
    pub draining: std::sync::atomic::AtomicBool,
    /// Whether the test hook `Config::test_drop_live` has dropped its event.
    pub test_dropped: std::sync::atomic::AtomicBool,
}

pub type AppState = Arc<Shared>;

/// Metric handles used per message, registered once: the `metrics` macros
/// look the name up on every call.
pub struct Meters {
    pub accepted: metrics::Counter,
    pub delivered: metrics::Counter,
    pub send_to_deliver: metrics::Histogram,
    /// Messages a connected device got from the periodic comparison with
    /// the store, because their live publish never reached it.
    pub repaired: metrics::Counter,
}

impl Meters {
    fn register() -> Self {
        Self {
            accepted: metrics::counter!("confab_messages_accepted_total"),
            delivered: metrics::counter!("confab_messages_delivered_total"),
            send_to_deliver: metrics::histogram!("confab_send_to_deliver_seconds"),
            repaired: metrics::counter!("confab_messages_repaired_total"),
        }
    }
}

/// The embedded SQLite file, or PostgreSQL when `config.database` names it.
async fn open_store(config: &Config) -> Result<Arc<dyn Store>, ServerError> {
    Ok(match config.database.as_deref() {
        Some(url) => {
            let options = PgOptions {
                max_connections: config.database_connections,
                clock: config.clock.clone(),
                ..Default::default()
            };
            let store = PgStore::connect(url, options).await?;
            tracing::info!("storage: PostgreSQL");
            Arc::new(store)
        }
        None => {
            let options = SqliteOptions {
                max_size_bytes: config.max_db_bytes,
                clock: config.clock.clone(),
            };
            let store = SqliteStore::open(&config.data_dir, options)?;
            tracing::info!(path = %store.path().display(), "storage: SQLite");
            Arc::new(store)
        }
    })
}

pub struct Server {
    state: AppState,
    listener: TcpListener,
    /// Presence in Redis, whose heartbeats and sweeps `run` starts.
    redis_presence: Option<Arc<redis_presence::RedisPresence>>,
}

/// Read buffer of each WebSocket. Small, because it is allocated for every
/// idle connection; tungstenite's default (128 KiB) would dominate memory.
pub const WS_READ_BUFFER_BYTES: usize = 2 * 1024;

/// Open files kept back from the connection limit for the database, the
/// listener and the process's own needs.
const RESERVED_FILES: u64 = 256;

impl Server {
    pub async fn bind(config: Config) -> Result<Self, ServerError> {
        let files = rlimit::increase_nofile_limit(u64::MAX).unwrap_or(1024);
        let max_connections = config
            .limits
            .max_connections
            .unwrap_or_else(|| files.saturating_sub(RESERVED_FILES).max(16) as usize);
        let store = open_store(&config).await?;
        let blobs = blobs::Blobs::open(&config.blob_store, &config.data_dir).await?;
        if config.redis.is_some() && !matches!(config.blob_store, BlobStore::S3(_)) {
            tracing::warn!(
                "files are kept on this node's disk: other nodes cannot serve them (--blobs s3://…)"
            );
        }
        let listener =
            TcpListener::bind(config.listen)
                .await
                .map_err(|source| ServerError::Bind {
                    addr: config.listen,
                    source,
                })?;
        let hub = Arc::new(Hub::default());
        let shutdown = CancellationToken::new();
        let directory = Arc::new(directory::Directory::default());
        // This node's name in Redis: new at every start, so that a node
        // started again is not mistaken for the one that died.
        let node = rand::random::<u64>();
        let (router, redis_presence): (Arc<dyn Router>, _) = match &config.redis {
            Some(url) => {
                let router = redis_router::RedisRouter::start(
                    url,
                    node,
                    hub.clone(),
                    directory.clone(),
                    shutdown.clone(),
                )
                .await
                .map_err(ServerError::Redis)?;
                let presence = match config.presence {
                    true => {
                        let redis = redis_router::connect(url, Default::default())
                            .await
                            .map_err(ServerError::Redis)?;
                        Some(Arc::new(redis_presence::RedisPresence::new(
                            node,
                            redis,
                            config.clock.clone(),
                            config.presence_ttl,
                        )))
                    }
                    false => None,
                };
                (Arc::new(router), presence)
            }
            None => (Arc::new(LocalRouter::new(hub.clone())), None),
        };
        let shared_rates = match &config.redis {
            Some(url) => {
                let redis = redis_router::connect(url, Default::default())
                    .await
                    .map_err(ServerError::Redis)?;
                // Nodes are known alive by presence's heartbeats only.
                let held = redis_presence.is_some().then(|| {
                    held::Held::new(
                        redis.clone(),
                        node,
                        config.clock.clone(),
                        config.presence_ttl,
                    )
                });
                Some(limits::Shared::new(redis, held))
            }
            None => None,
        };
        let presence: Option<Arc<dyn Presence>> = match (&redis_presence, config.presence) {
            (Some(redis), _) => Some(redis.clone()),
            (None, true) => Some(Arc::new(LocalPresence::default())),
            (None, false) => None,
        };
        let state = Arc::new(Shared {
            passwords: Passwords::new(config.password_hash_concurrency),
            limits: limits::Limits::new(config.limits.clone(), max_connections, shared_rates),
            budget: budget::Budget::new(config.memory_budget_bytes),
            blobs,
            router,
            directory,
            hub,
            presence,
            store,
            metrics: install_metrics(),
            meters: Meters::register(),
            shutdown,
            tasks: TaskTracker::new(),
            test_dropped: Default::default(),
            draining: Default::default(),
            config,
        });
        tracing::info!(files, max_connections, "limits");
        Ok(Self {
            state,
            listener,
            redis_presence,
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.listener
            .local_addr()
            .expect("a bound listener has an address")
    }

    pub fn state(&self) -> &AppState {
        &self.state
    }

    /// Serves until `shutdown` resolves, then shuts down gracefully.
    pub async fn run(self, shutdown: impl std::future::Future<Output = ()>) {
        let state = self.state.clone();
        let repair = tokio::spawn(repair::run(state.clone()));
        tokio::spawn(limits::sweep(
            state.limits.clone(),
            state.store.clone(),
            state.shutdown.clone(),
        ));
        tokio::spawn(blobs::sweep(state.clone()));
        if let Some(presence) = self.redis_presence {
            tokio::spawn(redis_presence::run(
                presence,
                state.clone(),
                state.shutdown.clone(),
            ));
        }
        let grace = state.config.shutdown_grace;
        let draining = state.clone();
        let shutdown = async move {
            shutdown.await;
            if !grace.is_zero() {
                // Still serving, but failing its health check: a load
                // balancer stops sending new connections here first.
                tracing::info!(?grace, "draining: /healthz answers 503");
                draining
                    .draining
                    .store(true, std::sync::atomic::Ordering::Relaxed);
                tokio::time::sleep(grace).await;
            }
        };
        listener::accept_loop(self.listener, state.clone(), shutdown).await;
        tracing::info!("shutting down: closing connections");
        // Connections see the cancellation in their loop; one stuck writing
        // to a client that does not read gives up after its write timeout.
        state.shutdown.cancel();
        let _ = repair.await;
        state.tasks.close();
        if tokio::time::timeout(Duration::from_secs(15), state.tasks.wait())
            .await
            .is_err()
        {
            tracing::warn!("some connections did not close in time");
        }
        state.store.close().await;
        tracing::info!("stopped");
    }
}

/// The process-wide Prometheus recorder; `None` if another one was
/// installed first (only possible when several servers share a process).
fn install_metrics() -> Option<PrometheusHandle> {
    static HANDLE: std::sync::OnceLock<Option<PrometheusHandle>> = std::sync::OnceLock::new();
    HANDLE
        .get_or_init(|| {
            let latency = [
                0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25,
                0.5, 1.0,
            ];
            let batch = [
                1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0, 200.0, 500.0, 1000.0, 2000.0,
            ];
            let handle = PrometheusBuilder::new()
                .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), &latency)
                .and_then(|b| {
                    b.set_buckets_for_metric(Matcher::Suffix("_batch_size".into()), &batch)
                })
                .and_then(|b| b.install_recorder())
                .ok()?;
            let upkeep = handle.clone();
            std::thread::Builder::new()
                .name("confab-metrics".into())
                .spawn(move || {
                    loop {
                        std::thread::sleep(Duration::from_secs(5));
                        upkeep.run_upkeep();
                    }
                })
                .ok()?;
            Some(handle)
        })
        .clone()
}
