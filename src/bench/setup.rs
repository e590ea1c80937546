//! Before the measurement: a server to measure, accounts, connections and
//! conversations.

use std::net::IpAddr;
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use confab_client::e2e::{self, E2e, Enrollment};
use confab_client::{Client, ClientError, ConnectOptions, Events, ServerUrl, account};
use confab_protocol::{ConversationId, DeviceId, ErrorCode};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

/// Limits are for people: the load generator opens hundreds of accounts
/// from one address, many sockets per device, and sends as fast as it can,
/// so it raises them (documented in docs/performance.md). Everything else
/// runs with its defaults.
pub const SERVER_FLAGS: &[&str] = &[
    "--frames-per-second",
    "1000000",
    "--frame-burst",
    "1000000",
    "--messages-per-second",
    "1000000",
    "--message-burst",
    "1000000",
    "--message-mib-per-day",
    "1000000",
    "--connections-per-device",
    "1000000",
    "--connections-per-user",
    "1000000",
    "--connections-per-address",
    "1000000",
    "--registrations-per-address",
    "1000000",
    "--new-devices-per-address",
    "1000000",
    "--password-attempts-per-address",
    "1000000",
    // Each run logs every account in again; with Redis the counts outlive
    // the nodes of one run.
    "--password-attempts-per-account-address",
    "1000000",
    "--password-attempts-per-account",
    "1000000",
    "--new-conversations-per-day",
    "1000000",
];

const PASSWORD: &str = "benchmark password";

/// What to start for a run: nodes, on which storage, behind what.
#[derive(Clone, Debug, Default)]
pub struct Nodes {
    pub count: usize,
    /// Pin every node to this CPU with taskset.
    pub cpu: Option<usize>,
    pub database: Option<String>,
    pub redis: Option<String>,
    /// HAProxy in front of the nodes (its binary).
    pub haproxy: Option<std::path::PathBuf>,
}

/// The address HAProxy connects to the nodes from, which they trust as
/// their proxy (the PROXY protocol names the client behind it).
const PROXY_SOURCE: &str = "127.0.0.9";

/// The servers under measurement: nodes this process started (and HAProxy
/// in front of them), or ones given by URL and PID.
pub struct Target {
    /// Where HTTP requests go: HAProxy, or the first node.
    pub url: ServerUrl,
    /// User i's sockets go to `sockets[i % len]`: spread over the nodes
    /// when there is no load balancer to spread them.
    sockets: Vec<ServerUrl>,
    /// The nodes' PIDs, for their CPU time and memory.
    pub nodes: Vec<u32>,
    /// What the nodes run on (HAProxy, PostgreSQL, Redis…): its CPU time,
    /// child processes included, counted apart from the nodes'.
    pub infra: Vec<u32>,
    _children: Vec<Child>,
    _data: Vec<tempfile::TempDir>,
}

impl Target {
    /// The data directory of the first node this process started.
    pub fn data_dir(&self) -> Option<&std::path::Path> {
        self._data.first().map(|d| d.path())
    }

    /// Where the `i`th user's sockets connect.
    pub fn socket_url(&self, i: usize) -> &ServerUrl {
        &self.sockets[i % self.sockets.len()]
    }

    /// Servers already running (none yet, for [`Target::start`]).
    pub fn external(urls: &[String], pids: &[u32], infra: &[u32]) -> anyhow::Result<Self> {
        let sockets = urls
            .iter()
            .map(|u| ServerUrl::parse(u))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Self {
            url: match sockets.first() {
                Some(url) => url.clone(),
                None => ServerUrl::parse("http://127.0.0.1")?,
            },
            sockets,
            nodes: pids.to_vec(),
            infra: infra.to_vec(),
            _children: Vec::new(),
            _data: Vec::new(),
        })
    }

    /// Starts `nodes.count` times `confab serve` on free ports, each with a
    /// fresh data directory, and HAProxy in front when asked.
    pub async fn start(nodes: &Nodes, infra: &[u32]) -> anyhow::Result<Self> {
        let mut target = Self::external(&[], &[], infra)?;
        let mut ports = Vec::new();
        for _ in 0..nodes.count.max(1) {
            let (url, port) = target.start_node(nodes).await?;
            target.sockets.push(url);
            ports.push(port);
        }
        if let Some(bin) = &nodes.haproxy {
            target.sockets = vec![target.start_haproxy(bin, &ports).await?];
        }
        target.url = target.sockets[0].clone();
        Ok(target)
    }

    async fn start_node(&mut self, nodes: &Nodes) -> anyhow::Result<(ServerUrl, u16)> {
        let data = tempfile::tempdir()?;
        let exe = std::env::current_exe()?;
        let mut command = match nodes.cpu {
            Some(cpu) => {
                let mut c = Command::new("taskset");
                c.args(["-c", &cpu.to_string()]).arg(exe);
                c
            }
            None => Command::new(exe),
        };
        command
            .args(["serve", "--listen", "127.0.0.1:0", "--log", "warn"])
            .arg("--data-dir")
            .arg(data.path())
            .args(SERVER_FLAGS);
        if let Some(url) = &nodes.database {
            command.args(["--database", url]);
        }
        if let Some(url) = &nodes.redis {
            command.args(["--redis", url]);
        }
        if nodes.haproxy.is_some() {
            command.args(["--trusted-proxy", PROXY_SOURCE, "--proxy-protocol"]);
        }
        let mut child = command
            .stdout(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .context("start the server (is taskset installed?)")?;
        let stdout = child.stdout.take().context("server stdout")?;
        let mut lines = BufReader::new(stdout).lines();
        let line = tokio::time::timeout(Duration::from_secs(30), lines.next_line())
            .await
            .context("server did not start in time")??
            .context("server exited at start")?;
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        let url = line
            .rsplit(' ')
            .next()
            .context("unexpected server output")?;
        let port = url
            .rsplit(':')
            .next()
            .and_then(|p| p.trim_end_matches('/').parse().ok())
            .context("no port in the server's URL")?;
        // taskset execs the server, so the child's PID is the server's.
        self.nodes.push(child.id().context("server PID")?);
        self._children.push(child);
        self._data.push(data);
        Ok((ServerUrl::parse(url)?, port))
    }

    /// HAProxy as docs/haproxy.cfg has it, but round robin (the users are
    /// then spread evenly whatever order they connect in), on a free port.
    async fn start_haproxy(
        &mut self,
        bin: &std::path::Path,
        nodes: &[u16],
    ) -> anyhow::Result<ServerUrl> {
        let dir = tempfile::tempdir()?;
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let servers: String = nodes
            .iter()
            .enumerate()
            .map(|(i, p)| format!("  server n{} 127.0.0.1:{p}\n", i + 1))
            .collect();
        // Each connection takes two descriptors, and the open-files limit
        // here is often 20,000.
        let config = format!(
            "global\n  maxconn 9000\n\
             defaults\n  mode tcp\n  timeout connect 2s\n  timeout client 75s\n  \
             timeout server 75s\n  timeout tunnel 1h\n\
             frontend clients\n  bind 127.0.0.1:{port}\n  default_backend nodes\n\
             backend nodes\n  balance roundrobin\n  \
             default-server send-proxy-v2 source {PROXY_SOURCE}\n{servers}"
        );
        let file = dir.path().join("haproxy.cfg");
        std::fs::write(&file, config)?;
        let child = Command::new(bin)
            .arg("-db")
            .arg("-f")
            .arg(&file)
            .stdout(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("start {}", bin.display()))?;
        self.infra.push(child.id().context("haproxy PID")?);
        self._children.push(child);
        self._data.push(dir);
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_err()
        {
            anyhow::ensure!(
                std::time::Instant::now() < deadline,
                "HAProxy did not listen on port {port}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Ok(ServerUrl::parse(&format!("http://127.0.0.1:{port}"))?)
    }
}

/// A provisioned user: name, and one device on its signed device list.
#[derive(Clone)]
pub struct Account {
    pub name: String,
    pub token: String,
    pub device: DeviceId,
    /// The device's keys and pinned lists (to approve another device).
    pub keys: Arc<E2e>,
}

/// Registers (or reuses) `bench_0 … bench_{n-1}` and logs each in once.
/// Password hashing is deliberately slow; this runs before any measurement.
pub async fn provision(
    url: &ServerUrl,
    n: usize,
    progress: &indicatif::ProgressBar,
) -> anyhow::Result<Vec<Account>> {
    progress.set_length(n as u64);
    progress.set_message("provisioning accounts");
    let mut accounts = Vec::with_capacity(n);
    // The server computes a few hashes at once; two logins in flight keep it busy.
    for chunk in (0..n).collect::<Vec<_>>().chunks(2) {
        let logins = chunk
            .iter()
            .map(|i| provision_one(url, format!("bench_{i}")));
        for account in futures_util::future::join_all(logins).await {
            accounts.push(account?);
            progress.inc(1);
        }
    }
    Ok(accounts)
}

async fn provision_one(url: &ServerUrl, name: String) -> anyhow::Result<Account> {
    loop {
        match account::register(url, &name, PASSWORD).await {
            Ok(_) => break,
            Err(e) if e.code() == Some(ErrorCode::UsernameTaken) => break,
            Err(e) if e.code() == Some(ErrorCode::Busy) => {
                tokio::time::sleep(Duration::from_millis(20)).await
            }
            Err(e) => bail!("register {name}: {e}"),
        }
    }
    let (login, identity) = loop {
        match e2e::login(url, &name, PASSWORD, None, Some("bench")).await {
            Ok(done) => break done,
            Err(e) if e.code() == Some(ErrorCode::Busy) => {
                tokio::time::sleep(Duration::from_millis(20)).await
            }
            Err(e) => bail!("login {name}: {e}"),
        }
    };
    // Each run logs in a new device with new keys; a user left by an earlier
    // run starts its device list over, so that this device is its only one
    // (and the one every message is addressed to).
    let keys = E2e::new(identity, url.clone(), login.token.clone(), None, true)?;
    if keys.enroll().await? == Enrollment::Pending {
        loop {
            match keys.reset(PASSWORD).await {
                Ok(()) => break,
                Err(e) if e.code() == Some(ErrorCode::Busy) => {
                    tokio::time::sleep(Duration::from_millis(20)).await
                }
                Err(e) => bail!("reset the devices of {name}: {e}"),
            }
        }
    }
    Ok(Account {
        name,
        token: login.token,
        device: login.device,
        keys: Arc::new(keys),
    })
}

/// A second device of `account`'s user, approved by its first.
pub async fn second_device(url: &ServerUrl, account: &Account) -> anyhow::Result<Account> {
    let (login, identity) = e2e::login(url, &account.name, PASSWORD, None, Some("bench-2"))
        .await
        .map_err(|e| anyhow::anyhow!("login {}: {e}", account.name))?;
    let keys = E2e::new(identity, url.clone(), login.token.clone(), None, true)?;
    let public = account.keys.device_keys(login.device).await?;
    account.keys.approve(login.device, public).await?;
    anyhow::ensure!(
        keys.enroll().await? == Enrollment::Listed,
        "the second device of {} is not listed",
        account.name
    );
    Ok(Account {
        name: account.name.clone(),
        token: login.token,
        device: login.device,
        keys: Arc::new(keys),
    })
}

/// Opens one connection as `account`, from `source` if given.
pub async fn connect(
    url: &ServerUrl,
    account: &Account,
    source: Option<IpAddr>,
) -> Result<(Client, Events), ClientError> {
    let options = ConnectOptions {
        local_addr: source,
        event_buffer: 65_536,
        ..ConnectOptions::default()
    };
    Client::connect(url, &account.token, options).await
}

/// For each user, the conversations with its `peers` peers (the same set
/// every run: user i talks to i+1, i+1+step, …), as (peer index, conversation).
pub async fn open_conversations(
    clients: &[Arc<Client>],
    peers: usize,
    accounts: &[Account],
) -> anyhow::Result<Vec<Vec<(usize, ConversationId)>>> {
    let n = clients.len();
    anyhow::ensure!(n >= 2, "need at least two users");
    let peers = peers.clamp(1, n - 1);
    let step = ((n - 1) / peers).max(1);
    let mut all = Vec::with_capacity(n);
    for (i, client) in clients.iter().enumerate() {
        let mut mine = Vec::with_capacity(peers);
        for k in 0..peers {
            let peer = (i + 1 + k * step) % n;
            if peer == i || mine.iter().any(|(p, _)| *p == peer) {
                continue;
            }
            let conv = client.open(&accounts[peer].name).await?;
            // Friends, not strangers: a request would hold back receipts.
            clients[peer].accept(conv).await?;
            mine.push((peer, conv));
        }
        all.push(mine);
    }
    Ok(all)
}
