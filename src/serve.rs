//! `confab serve`: flags and environment variables into a server config.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::Args;
use confab_server::limits::LimitsConfig;
use confab_server::{BlobStore, Config, Server};

#[derive(Args, Debug)]
pub struct ServeArgs {
    /// Address to listen on.
    #[arg(long, env = "CONFAB_LISTEN", default_value = "127.0.0.1:8080")]
    listen: SocketAddr,
    /// Directory for the SQLite database and for files (created if missing).
    #[arg(long, env = "CONFAB_DATA_DIR", default_value = "confab-data")]
    data_dir: PathBuf,
    /// Settings from FILE: one `CONFAB_…=value` per line, the names of the
    /// environment variables beside each flag (`#` starts a comment). A
    /// flag or a variable set in the environment wins over the file.
    #[arg(long, env = "CONFAB_CONFIG", value_name = "FILE")]
    config: Option<PathBuf>,
    /// PostgreSQL instead of the embedded SQLite file, for several nodes:
    /// `postgres://user:password@host:port/database`.
    #[arg(long, env = "CONFAB_DATABASE_URL", value_parser = parse_database_url)]
    database: Option<String>,
    /// Where the bytes of files are kept: `s3://bucket[/prefix]?endpoint=URL&region=R`
    /// (S3-compatible storage the nodes share; `allow_http=true` for a plain
    /// http endpoint) or `file:///dir`. Default: `blobs/` in the data directory.
    #[arg(long, env = "CONFAB_BLOBS_URL", value_parser = BlobStore::from_url)]
    blobs: Option<BlobStore>,
    /// The S3 access key id (better in the environment or the config file
    /// than on the command line). Unset: AWS_* and the instance's role.
    #[arg(
        long,
        env = "CONFAB_BLOBS_ACCESS_KEY_ID",
        requires = "blobs",
        hide_env_values = true
    )]
    blobs_access_key_id: Option<String>,
    /// The S3 secret access key (in the environment or the config file:
    /// a command line is visible to every user of the machine).
    #[arg(
        long,
        env = "CONFAB_BLOBS_SECRET_ACCESS_KEY",
        requires = "blobs",
        hide_env_values = true
    )]
    blobs_secret_access_key: Option<String>,
    /// After SIGTERM or SIGINT, keep serving this long with /healthz
    /// answering 503 (draining), so that a load balancer's health check
    /// takes the node out before it closes its connections.
    #[arg(long, env = "CONFAB_SHUTDOWN_GRACE_MS", default_value_t = 0)]
    shutdown_grace_ms: u64,
    /// With --redis: a node silent for this long is taken for dead and
    /// its users for offline; nodes heartbeat every third of it.
    #[arg(long, env = "CONFAB_PRESENCE_TTL_MS", default_value_t = 15_000, value_parser = clap::value_parser!(u64).range(300..))]
    presence_ttl_ms: u64,
    /// Redis shared by the nodes on one `--database`, which carries live
    /// events between them: `redis://host:port/`. Without it a node's
    /// events reach only its own connections (others' at their repair
    /// round).
    #[arg(long, env = "CONFAB_REDIS_URL", requires = "database", value_parser = parse_redis_url)]
    redis: Option<String>,
    /// For tests: this node's clock runs this many ms ahead of the system's
    /// (negative: behind), as another machine's might.
    #[arg(long, hide = true, default_value_t = 0, allow_negative_numbers = true)]
    clock_skew_ms: i64,
    /// Connections to PostgreSQL this node keeps; every write in flight holds one.
    #[arg(long, env = "CONFAB_DATABASE_CONNECTIONS", default_value_t = 16)]
    database_connections: u32,
    #[command(flatten)]
    limits: LimitArgs,
    /// A load balancer whose `X-Forwarded-For` names the client's address
    /// (repeat, or comma-separate in the env var). Others' headers are ignored.
    #[arg(
        long = "trusted-proxy",
        env = "CONFAB_TRUSTED_PROXIES",
        value_delimiter = ','
    )]
    trusted_proxies: Vec<IpAddr>,
    /// Connections from a --trusted-proxy begin with a PROXY protocol
    /// header (HAProxy's `send-proxy-v2`; v1 too), which names the client;
    /// one without it is closed. Other peers never send one.
    #[arg(long, env = "CONFAB_PROXY_PROTOCOL", requires = "trusted_proxies")]
    proxy_protocol: bool,
    /// Time from TCP accept to a completed WebSocket `auth`.
    #[arg(long, env = "CONFAB_HANDSHAKE_TIMEOUT_MS", default_value_t = 5_000)]
    handshake_timeout_ms: u64,
    /// Heartbeat interval clients are told to keep.
    #[arg(long, env = "CONFAB_HEARTBEAT_MS", default_value_t = 25_000)]
    heartbeat_ms: u64,
    /// A connection that sends no frame for this long is closed (and its user
    /// shown offline if it was the last).
    #[arg(long, env = "CONFAB_IDLE_TIMEOUT_MS", default_value_t = 60_000)]
    idle_timeout_ms: u64,
    /// Largest message body accepted.
    #[arg(long, env = "CONFAB_MAX_BODY_BYTES", default_value_t = 64 * 1024)]
    max_body_bytes: usize,
    /// Largest WebSocket message read at all; larger ones close the connection.
    #[arg(long, env = "CONFAB_MAX_FRAME_BYTES", default_value_t = 256 * 1024)]
    max_frame_bytes: usize,
    /// MiB all sockets together may hold of messages still being read and of
    /// history pages being written; past it, reads wait and then close with
    /// `busy`, history requests get `busy`.
    #[arg(long, env = "CONFAB_MEMORY_BUDGET_MIB", default_value_t = 256)]
    memory_budget_mib: usize,
    /// Largest file accepted, in MiB (its encrypted size).
    #[arg(long, env = "CONFAB_MAX_FILE_MIB", default_value_t = 2048)]
    max_file_mib: u64,
    /// MiB one user's files may take together.
    #[arg(long, env = "CONFAB_FILE_QUOTA_MIB", default_value_t = 10 * 1024)]
    file_quota_mib: u64,
    /// An upload not completed within this many seconds of its last part is deleted.
    #[arg(long, env = "CONFAB_UPLOAD_EXPIRY_SECS", default_value_t = 24 * 3600)]
    upload_expiry_secs: u64,
    /// Files older than this many seconds are deleted (their messages show
    /// them as deleted), freeing their owners' quota; 0 keeps them.
    #[arg(long, env = "CONFAB_FILE_RETENTION_SECS", default_value_t = 0)]
    file_retention_secs: u64,
    /// How often expired uploads and files past the retention are deleted.
    #[arg(
        long,
        env = "CONFAB_BLOB_SWEEP_SECS",
        default_value_t = 60,
        hide = true
    )]
    blob_sweep_secs: u64,
    /// Sustained frames per second allowed per connection.
    #[arg(long, env = "CONFAB_FRAMES_PER_SECOND", default_value_t = 50)]
    frames_per_second: u32,
    /// Frames a connection may send in a burst above the sustained rate.
    #[arg(long, env = "CONFAB_FRAME_BURST", default_value_t = 200)]
    frame_burst: u32,
    /// Events queued per connection before it is closed as too slow.
    #[arg(long, env = "CONFAB_SEND_QUEUE", default_value_t = 1024)]
    send_queue: usize,
    /// How long a login token lasts, in seconds (the device outlives it).
    #[arg(long, env = "CONFAB_SESSION_TTL_SECS", default_value_t = 30 * 24 * 3600)]
    session_ttl_secs: u64,
    /// Do not track or show presence (online / last seen).
    #[arg(long, env = "CONFAB_NO_PRESENCE")]
    no_presence: bool,
    /// Browser origin allowed to open a WebSocket (repeat, or comma-separate
    /// in the env var). Default: same origin only.
    #[arg(
        long = "allowed-origin",
        env = "CONFAB_ALLOWED_ORIGINS",
        value_delimiter = ','
    )]
    allowed_origins: Vec<String>,
    /// Cap the database at this many MiB; writes beyond fail with
    /// storage_unavailable, as on a full disk. SQLite only: PostgreSQL's
    /// size is its operator's to cap.
    #[arg(long, env = "CONFAB_MAX_DB_MB", conflicts_with = "database")]
    max_db_mb: Option<u64>,
    /// Password hashes (logins, registrations) computed at once; more get "busy".
    #[arg(long, env = "CONFAB_PASSWORD_HASH_CONCURRENCY", default_value_t = 4)]
    password_hash_concurrency: usize,
    /// How often the node checks the store for messages its connections
    /// missed live (a lost publish; until Redis routing lands, any message
    /// committed by another node) and hands them over; they arrive within
    /// this time.
    #[arg(long, env = "CONFAB_REPAIR_INTERVAL_MS", default_value_t = 10_000,
          value_parser = clap::value_parser!(u64).range(100..))]
    repair_interval_ms: u64,
    /// How long a closing connection waits for its pending commits before
    /// leaving them to a task that publishes whatever commits later.
    #[arg(long, env = "CONFAB_DRAIN_TIMEOUT_MS", default_value_t = 10_000)]
    drain_timeout_ms: u64,
    /// Test hook: USER:SEQ drops the live delivery of message SEQ to one
    /// connection of USER, as a lost publish would.
    #[arg(long, hide = true, value_parser = parse_drop_live)]
    test_drop_live: Option<(String, i64)>,
    /// Log filter (tracing's EnvFilter syntax), e.g. info or confab_server=debug.
    #[arg(long, env = "CONFAB_LOG", default_value = "info")]
    log: String,
}

impl ServeArgs {
    fn config(&self) -> Config {
        Config {
            listen: self.listen,
            data_dir: self.data_dir.clone(),
            database: self.database.clone(),
            blob_store: self.blob_store(),
            database_connections: self.database_connections,
            redis: self.redis.clone(),
            clock: match self.clock_skew_ms {
                0 => confab_store::Clock::system(),
                skew => confab_store::Clock::from_fn(move || confab_store::now_ms() + skew),
            },
            limits: self.limits.config(),
            trusted_proxies: self.trusted_proxies.clone(),
            proxy_protocol: self.proxy_protocol,
            handshake_timeout: Duration::from_millis(self.handshake_timeout_ms),
            heartbeat_interval: Duration::from_millis(self.heartbeat_ms),
            idle_timeout: Duration::from_millis(self.idle_timeout_ms),
            max_body_bytes: self.max_body_bytes,
            max_frame_bytes: self.max_frame_bytes,
            memory_budget_bytes: self.memory_budget_mib * 1024 * 1024,
            blobs: confab_server::config::BlobLimits {
                max_file_bytes: self.max_file_mib << 20,
                quota_bytes: self.file_quota_mib << 20,
                upload_expiry: Duration::from_secs(self.upload_expiry_secs),
                retention: (self.file_retention_secs > 0)
                    .then(|| Duration::from_secs(self.file_retention_secs)),
                sweep_every: Duration::from_secs(self.blob_sweep_secs.max(1)),
            },
            frames_per_second: self.frames_per_second,
            frame_burst: self.frame_burst,
            send_queue: self.send_queue,
            session_ttl: Duration::from_secs(self.session_ttl_secs),
            presence: !self.no_presence,
            presence_ttl: Duration::from_millis(self.presence_ttl_ms),
            shutdown_grace: Duration::from_millis(self.shutdown_grace_ms),
            allowed_origins: self.allowed_origins.clone(),
            max_db_bytes: self.max_db_mb.map(|mb| mb * 1024 * 1024),
            password_hash_concurrency: self.password_hash_concurrency,
            repair_interval: Duration::from_millis(self.repair_interval_ms),
            drain_timeout: Duration::from_millis(self.drain_timeout_ms),
            test_drop_live: self.test_drop_live.clone(),
        }
    }
}

/// What one user or one address may hold or do (SECURITY.md lists them).
/// Rates per hour allow that many at once, then one per hour / N.
#[derive(Args, Debug)]
struct LimitArgs {
    /// Open connections allowed at once; further ones get HTTP 503.
    /// Default: the open-files limit (raised to its hard limit at start) minus 256.
    #[arg(long, env = "CONFAB_MAX_CONNECTIONS")]
    max_connections: Option<usize>,
    /// Open sockets per device; a new one closes the device's oldest.
    #[arg(long, env = "CONFAB_CONNECTIONS_PER_DEVICE", default_value_t = DEFAULT.connections_per_device)]
    connections_per_device: usize,
    /// Open sockets per user, all its devices together.
    #[arg(long, env = "CONFAB_CONNECTIONS_PER_USER", default_value_t = DEFAULT.connections_per_user)]
    connections_per_user: usize,
    /// Upload requests of one user at once (each holds up to 4 MiB).
    #[arg(long, env = "CONFAB_UPLOADS_PER_USER", default_value_t = DEFAULT.uploads_per_user)]
    uploads_per_user: usize,
    /// Open sockets per client address (an IPv6 /64 counts as one).
    #[arg(long, env = "CONFAB_CONNECTIONS_PER_ADDRESS", default_value_t = DEFAULT.connections_per_address)]
    connections_per_address: usize,
    /// Password checks per hour for one account from one address.
    #[arg(long, env = "CONFAB_PASSWORD_ATTEMPTS_PER_ACCOUNT_ADDRESS", default_value_t = DEFAULT.password_attempts_per_account_address)]
    password_attempts_per_account_address: u32,
    /// Password checks per hour for one account from anywhere (a login that
    /// proves a key of one of the account's devices is not counted).
    #[arg(long, env = "CONFAB_PASSWORD_ATTEMPTS_PER_ACCOUNT", default_value_t = DEFAULT.password_attempts_per_account)]
    password_attempts_per_account: u32,
    /// Password checks per hour from one address, all accounts together.
    #[arg(long, env = "CONFAB_PASSWORD_ATTEMPTS_PER_ADDRESS", default_value_t = DEFAULT.password_attempts_per_address)]
    password_attempts_per_address: u32,
    /// New accounts per hour from one address.
    #[arg(long, env = "CONFAB_REGISTRATIONS_PER_ADDRESS", default_value_t = DEFAULT.registrations_per_address)]
    registrations_per_address: u32,
    /// New devices per hour from one address.
    #[arg(long, env = "CONFAB_NEW_DEVICES_PER_ADDRESS", default_value_t = DEFAULT.new_devices_per_address)]
    new_devices_per_address: u32,
    /// Devices of one account waiting for approval.
    #[arg(long, env = "CONFAB_PENDING_DEVICES_PER_ACCOUNT", default_value_t = DEFAULT.pending_devices_per_account)]
    pending_devices_per_account: usize,
    /// Messages per second one user may send, all connections together.
    #[arg(long, env = "CONFAB_MESSAGES_PER_SECOND", default_value_t = DEFAULT.messages_per_second)]
    messages_per_second: u32,
    /// Messages one user may send in a burst above that rate.
    #[arg(long, env = "CONFAB_MESSAGE_BURST", default_value_t = DEFAULT.message_burst)]
    message_burst: u32,
    /// Messages one may send into a conversation the other has not accepted
    /// (a message request) until they answer or accept.
    #[arg(long, env = "CONFAB_REQUEST_MESSAGES", default_value_t = DEFAULT.request_messages)]
    request_messages: u32,
    /// Conversations one user may start per day.
    #[arg(long, env = "CONFAB_NEW_CONVERSATIONS_PER_DAY", default_value_t = DEFAULT.new_conversations_per_day)]
    new_conversations_per_day: u32,
    /// Members a group may have, its creator included.
    #[arg(long, env = "CONFAB_MAX_GROUP_MEMBERS", default_value_t = DEFAULT.max_group_members)]
    max_group_members: u32,
    /// MiB of message bodies one user may send per UTC day.
    #[arg(long, env = "CONFAB_MESSAGE_MIB_PER_DAY", default_value_t = DEFAULT.bytes_per_day / MIB)]
    message_mib_per_day: u64,
}

const DEFAULT: LimitsConfig = LimitsConfig::DEFAULT;
const MIB: u64 = 1024 * 1024;

impl LimitArgs {
    fn config(&self) -> LimitsConfig {
        LimitsConfig {
            max_connections: self.max_connections,
            connections_per_device: self.connections_per_device,
            connections_per_user: self.connections_per_user,
            connections_per_address: self.connections_per_address,
            uploads_per_user: self.uploads_per_user,
            password_attempts_per_account_address: self.password_attempts_per_account_address,
            password_attempts_per_account: self.password_attempts_per_account,
            password_attempts_per_address: self.password_attempts_per_address,
            registrations_per_address: self.registrations_per_address,
            new_devices_per_address: self.new_devices_per_address,
            pending_devices_per_account: self.pending_devices_per_account,
            messages_per_second: self.messages_per_second,
            message_burst: self.message_burst,
            bytes_per_day: self.message_mib_per_day * MIB,
            request_messages: self.request_messages,
            new_conversations_per_day: self.new_conversations_per_day,
            max_group_members: self.max_group_members,
        }
    }
}

impl ServeArgs {
    fn blob_store(&self) -> BlobStore {
        match self.blobs.clone() {
            None => BlobStore::DataDir,
            Some(BlobStore::S3(mut bucket)) => {
                bucket.access_key_id = self.blobs_access_key_id.clone();
                bucket.secret_access_key = self.blobs_secret_access_key.clone();
                BlobStore::S3(bucket)
            }
            Some(other) => other,
        }
    }
}

/// Only PostgreSQL URLs: the embedded store needs no URL.
fn parse_database_url(s: &str) -> Result<String, String> {
    if s.starts_with("postgres://") || s.starts_with("postgresql://") {
        Ok(s.to_string())
    } else {
        Err("a postgres:// URL (without --database, confab keeps its data in SQLite)".into())
    }
}

fn parse_redis_url(s: &str) -> Result<String, String> {
    if s.starts_with("redis://") {
        Ok(s.to_string())
    } else {
        // rediss:// needs a TLS build of the redis crate, not made yet.
        Err("a redis:// URL (TLS to Redis is not built: keep Redis on a private network)".into())
    }
}

fn parse_drop_live(s: &str) -> Result<(String, i64), String> {
    let (user, seq) = s.split_once(':').ok_or("USER:SEQ")?;
    let seq = seq.parse().map_err(|_| "SEQ is a number")?;
    Ok((user.to_string(), seq))
}

pub async fn run(args: ServeArgs) -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_new(&args.log).context("bad --log filter")?,
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    // The only TLS provider confab links (object_store's S3 client); named
    // so that rustls never has to choose among several.
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let server = Server::bind(args.config()).await?;
    // Test harnesses and scripts read this line to learn the port.
    println!("confab listening on http://{}", server.local_addr());
    server.run(shutdown_signal()).await;
    Ok(())
}

async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).expect("can listen for SIGTERM");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}

/// One setting of `serve`: its environment variable and its flag.
pub struct Setting {
    pub env: String,
    pub flag: String,
    pub takes_value: bool,
}

/// The arguments with `serve`'s config file (`--config FILE` or
/// `CONFAB_CONFIG`) put in: each line's setting becomes its flag, right
/// after `serve`, so that a flag given on the command line (later, so it
/// wins) and a variable set in the environment (skipped here) both win
/// over the file.
pub fn with_config_file(
    mut args: Vec<std::ffi::OsString>,
    settings: &[Setting],
) -> anyhow::Result<Vec<std::ffi::OsString>> {
    use anyhow::Context;
    let given = args.iter().enumerate().find_map(|(i, a)| {
        let a = a.to_str()?;
        match a.strip_prefix("--config") {
            Some("") => args.get(i + 1).map(PathBuf::from),
            Some(rest) => rest.strip_prefix('=').map(PathBuf::from),
            None => None,
        }
    });
    let Some(path) = given.or_else(|| std::env::var_os("CONFAB_CONFIG").map(PathBuf::from)) else {
        return Ok(args);
    };
    let text = std::fs::read_to_string(&path)
        .with_context(|| format!("cannot read the config file {}", path.display()))?;
    let mut from_file = Vec::new();
    for (number, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let at = || format!("{}:{}", path.display(), number + 1);
        let (name, value) = line
            .split_once('=')
            .with_context(|| format!("{}: expected NAME=value", at()))?;
        let (name, value) = (name.trim(), value.trim());
        let Some(setting) = settings
            .iter()
            .find(|s| s.env == name && name != "CONFAB_CONFIG")
        else {
            anyhow::bail!(
                "{}: unknown setting {name:?} (the names are those of the environment variables in `confab serve --help`)",
                at()
            );
        };
        if std::env::var_os(name).is_some() {
            continue;
        }
        if setting.takes_value {
            from_file.push(format!("--{}={value}", setting.flag).into());
        } else if matches!(value, "true" | "1" | "yes" | "on") {
            from_file.push(format!("--{}", setting.flag).into());
        } else if !matches!(value, "false" | "0" | "no" | "off") {
            anyhow::bail!(
                "{}: {name} is on or off (true or false), not {value:?}",
                at()
            );
        }
    }
    let serve = args.iter().position(|a| a == "serve").unwrap_or(1);
    args.splice(serve + 1..serve + 1, from_file);
    Ok(args)
}
