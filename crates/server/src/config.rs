//! The server's settings, parsed once (by the `confab` binary) and passed down.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

#[derive(Clone, Debug)]
pub struct Config {
    pub listen: SocketAddr,
    pub data_dir: PathBuf,
    /// Where messages and accounts are kept: `None` for the embedded SQLite
    /// file in `data_dir`, or a PostgreSQL URL shared by several nodes.
    pub database: Option<String>,
    /// Redis shared by the nodes, for live events between them; `None`:
    /// this node's connections are the only ones.
    pub redis: Option<String>,
    /// Connections to PostgreSQL this node keeps (ignored for SQLite).
    pub database_connections: u32,
    /// Where the node and its store read the time: the system clock, or a
    /// test's (several nodes with clocks that differ, a simulation).
    pub clock: confab_store::Clock,
    /// What one user or address may hold or do (`limits.rs`).
    pub limits: crate::limits::LimitsConfig,
    /// Peers whose `X-Forwarded-For` header names the client's address
    /// (a load balancer in front). Anyone else's header is ignored.
    pub trusted_proxies: Vec<IpAddr>,
    /// Time allowed from TCP accept to a completed `auth` on the WebSocket.
    pub handshake_timeout: Duration,
    /// How often clients are told to send a heartbeat.
    pub heartbeat_interval: Duration,
    /// A connection that sends nothing for this long is closed.
    pub idle_timeout: Duration,
    /// Largest message body accepted (larger: `too_large`, connection stays).
    pub max_body_bytes: usize,
    /// Largest WebSocket message read at all (larger: `too_large` and close).
    pub max_frame_bytes: usize,
    /// Bytes all sockets together may hold of messages still being read,
    /// and of history pages being written (`budget.rs`).
    pub memory_budget_bytes: usize,
    /// Sustained frames per second per connection, and the burst above it.
    pub frames_per_second: u32,
    pub frame_burst: u32,
    /// Events queued for one connection before it counts as too slow and is closed.
    pub send_queue: usize,
    pub session_ttl: Duration,
    /// Track and show presence (online, last seen). Typing works either way.
    pub presence: bool,
    /// With Redis: a node that has not heartbeaten for this long is taken
    /// for dead, and its users for offline (heartbeats every third of it).
    pub presence_ttl: Duration,
    /// After SIGTERM, how long the node keeps serving while `/healthz`
    /// answers 503, so that a load balancer takes it out first.
    pub shutdown_grace: Duration,
    /// Browser origins allowed to open a WebSocket. Empty: same origin only.
    pub allowed_origins: Vec<String>,
    /// Cap on the database size; writes past it fail like a full disk.
    pub max_db_bytes: Option<u64>,
    /// Password hashes computed at once; further logins get `busy`.
    pub password_hash_concurrency: usize,
    /// How often each connection compares what it was written with the
    /// store's conversation heads, so that a lost live publish reaches a
    /// connected device within this time.
    pub repair_interval: Duration,
    /// How long a closing connection waits for its pending commits before
    /// handing them to a task that publishes whatever commits later.
    pub drain_timeout: Duration,
    /// Files: sizes, quota, expiry (docs/files.md).
    pub blobs: BlobLimits,
    /// Test hook: drop the live delivery of message `seq` to one connection
    /// of this user (the first that gets it), as a lost publish would.
    pub test_drop_live: Option<(String, i64)>,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            data_dir: PathBuf::from("confab-data"),
            database: None,
            database_connections: 16,
            redis: None,
            clock: confab_store::Clock::system(),
            limits: Default::default(),
            trusted_proxies: Vec::new(),
            handshake_timeout: Duration::from_secs(5),
            heartbeat_interval: Duration::from_secs(25),
            idle_timeout: Duration::from_secs(60),
            max_body_bytes: 64 * 1024,
            max_frame_bytes: 256 * 1024,
            memory_budget_bytes: 256 * 1024 * 1024,
            frames_per_second: 50,
            frame_burst: 200,
            send_queue: 1024,
            session_ttl: Duration::from_secs(30 * 24 * 3600),
            presence: true,
            presence_ttl: Duration::from_secs(15),
            shutdown_grace: Duration::ZERO,
            allowed_origins: Vec::new(),
            max_db_bytes: None,
            password_hash_concurrency: 4,
            repair_interval: Duration::from_secs(10),
            drain_timeout: Duration::from_secs(10),
            blobs: BlobLimits::default(),
            test_drop_live: None,
        }
    }
}

#[derive(Clone, Debug)]
pub struct BlobLimits {
    /// Largest file accepted (its encrypted size).
    pub max_file_bytes: u64,
    /// Bytes one user's files may take together.
    pub quota_bytes: u64,
    /// An upload not completed within this time of its last part is deleted.
    pub upload_expiry: Duration,
    /// Files older than this are deleted (a tombstone stays); `None` keeps
    /// them.
    pub retention: Option<Duration>,
    /// How often the sweep deletes expired uploads and retired files.
    pub sweep_every: Duration,
}

impl Default for BlobLimits {
    fn default() -> Self {
        Self {
            max_file_bytes: 2 << 30,
            quota_bytes: 10 << 30,
            upload_expiry: Duration::from_secs(24 * 3600),
            retention: None,
            sweep_every: Duration::from_secs(60),
        }
    }
}
