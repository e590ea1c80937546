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
    /// Connections from a trusted proxy start with a PROXY protocol header
    /// (v1 or v2) naming the client; one without it is closed.
    pub proxy_protocol: bool,
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
    /// Where the bytes of files are kept.
    pub blob_store: BlobStore,
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
            proxy_protocol: false,
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
            blob_store: BlobStore::DataDir,
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

/// Where the bytes of files are kept (docs/files.md, "Storage").
#[derive(Clone, Debug, PartialEq)]
pub enum BlobStore {
    /// `blobs/` in the data directory.
    DataDir,
    /// A directory of this machine: `file:///absolute/dir`.
    Dir(PathBuf),
    /// An S3-compatible bucket, shared by the nodes.
    S3(S3Bucket),
}

/// `s3://bucket[/prefix]?endpoint=…&region=…&allow_http=true`: the bucket,
/// a key prefix inside it, and object_store's S3 settings by their names.
#[derive(Clone, PartialEq)]
pub struct S3Bucket {
    pub bucket: String,
    pub prefix: String,
    pub options: Vec<(String, String)>,
    /// Unset: object_store's own lookup (`AWS_*`, then instance roles).
    pub access_key_id: Option<String>,
    pub secret_access_key: Option<String>,
}

impl std::fmt::Debug for S3Bucket {
    // The secret never reaches a log line.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("S3Bucket")
            .field("bucket", &self.bucket)
            .field("prefix", &self.prefix)
            .field("options", &self.options)
            .field("access_key_id", &self.access_key_id)
            .finish_non_exhaustive()
    }
}

impl BlobStore {
    /// `file:///dir` or `s3://bucket[/prefix][?name=value&…]`.
    pub fn from_url(url: &str) -> Result<Self, String> {
        if let Some(path) = url.strip_prefix("file://") {
            // file://dir would name a host, not a directory.
            if !path.starts_with('/') {
                return Err("file:///absolute/path (three slashes)".into());
            }
            return Ok(BlobStore::Dir(PathBuf::from(path)));
        }
        let Some(rest) = url.strip_prefix("s3://") else {
            return Err("file:///absolute/path or s3://bucket[/prefix]?endpoint=…".into());
        };
        let (location, query) = rest.split_once('?').unwrap_or((rest, ""));
        let (bucket, prefix) = location.split_once('/').unwrap_or((location, ""));
        if bucket.is_empty() {
            return Err("s3://BUCKET: the bucket is missing".into());
        }
        let mut options = Vec::new();
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            let (name, value) = pair
                .split_once('=')
                .ok_or_else(|| format!("{pair:?}: expected name=value"))?;
            let name = name.to_ascii_lowercase();
            // A key in a URL ends up in shell histories and process lists.
            if name.contains("key") || name.contains("token") || name.contains("secret") {
                return Err(format!(
                    "{name}: pass keys in CONFAB_BLOBS_ACCESS_KEY_ID and CONFAB_BLOBS_SECRET_ACCESS_KEY, not in the URL"
                ));
            }
            options.push((name, value.to_string()));
        }
        Ok(BlobStore::S3(S3Bucket {
            bucket: bucket.to_string(),
            prefix: prefix.trim_matches('/').to_string(),
            options,
            access_key_id: None,
            secret_access_key: None,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blob_store_urls() {
        assert_eq!(
            BlobStore::from_url("file:///srv/confab").unwrap(),
            BlobStore::Dir("/srv/confab".into())
        );
        let BlobStore::S3(s3) = BlobStore::from_url(
            "s3://files/confab/a/?endpoint=http://127.0.0.1:9000&allow_http=true",
        )
        .unwrap() else {
            panic!("not s3")
        };
        assert_eq!(
            (s3.bucket.as_str(), s3.prefix.as_str()),
            ("files", "confab/a")
        );
        assert_eq!(
            s3.options,
            [
                ("endpoint".to_string(), "http://127.0.0.1:9000".to_string()),
                ("allow_http".to_string(), "true".to_string())
            ]
        );
        for bad in [
            "file://relative",
            "/srv/confab",
            "s3://",
            "s3:///x",
            "s3://b?region",
            "s3://b?secret_access_key=x",
            "s3://b?access_key_id=x",
        ] {
            assert!(BlobStore::from_url(bad).is_err(), "{bad}");
        }
    }
}
