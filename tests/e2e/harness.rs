//! The one harness: a real `confab serve` process on an ephemeral port with
//! a temporary data directory, driven over real sockets by the client library.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use confab_client::e2e::{self, E2e, Enrollment, Identity};
use confab_client::{Client, ConnectOptions, Event, Events, ServerUrl, account};
use confab_protocol::{ConversationId, LoginResponse};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

pub const PASSWORD: &str = "correct horse battery";
/// Flags for scenarios whose clients send as fast as acks come back, far
/// above a person's rate (and far above the per-user limits).
pub const FAST_SENDERS: &[&str] = &[
    "--frames-per-second",
    "100000",
    "--frame-burst",
    "100000",
    "--messages-per-second",
    "100000",
    "--message-burst",
    "100000",
];
/// Flags for scenarios that open many sockets for one device.
pub const MANY_SOCKETS: &[&str] = &[
    "--connections-per-device",
    "100000",
    "--connections-per-user",
    "100000",
    "--connections-per-address",
    "100000",
];
/// How long a test waits for something that should happen.
pub const WAIT: Duration = Duration::from_secs(10);
/// How long a test waits to be sure something does not happen.
pub const QUIET: Duration = Duration::from_millis(700);

pub struct TestServer {
    child: Option<Child>,
    pub url: ServerUrl,
    port: u16,
    dir: tempfile::TempDir,
    args: Vec<String>,
    /// The bucket of the shared S3 its files go to, when on S3.
    bucket: Option<String>,
}

/// Whether the servers keep their data in PostgreSQL: every scenario runs
/// on SQLite (the default) and again with `CONFAB_TEST_STORE=postgres`
/// (scripts/test.sh runs both), each server on a fresh database of the
/// test process's private PostgreSQL (confab-testpg).
pub fn on_postgres() -> bool {
    std::env::var("CONFAB_TEST_STORE").is_ok_and(|v| v == "postgres")
}

/// Whether the servers keep files in S3-compatible storage: with
/// `CONFAB_TEST_BLOBS=s3` (scripts/test.sh sets it for the PostgreSQL
/// run) each server gets a bucket of its own on the test process's
/// private s3s-fs (confab-tests3).
pub fn on_s3() -> bool {
    std::env::var("CONFAB_TEST_BLOBS").is_ok_and(|v| v == "s3")
}

/// The `serve` flags for files in `bucket` of `s3`, keys included.
pub fn s3_flags(s3: &confab_tests3::S3, bucket: &str) -> Vec<String> {
    [
        "--blobs",
        &s3.blobs_url(bucket),
        "--blobs-access-key-id",
        confab_tests3::ACCESS_KEY,
        "--blobs-secret-access-key",
        confab_tests3::SECRET_KEY,
    ]
    .map(String::from)
    .to_vec()
}

/// For the few scenarios about SQLite's own files: true (and a line in the
/// test's output) when the suite runs on PostgreSQL, where they do not apply.
pub fn sqlite_only(what: &str) -> bool {
    if on_postgres() {
        println!("not on PostgreSQL: {what}");
    }
    on_postgres()
}

impl TestServer {
    pub async fn start() -> Self {
        Self::start_with(&[]).await
    }

    /// Starts a server with extra `serve` flags.
    pub async fn start_with(args: &[&str]) -> Self {
        Self::start_in(tempfile::tempdir().expect("temp dir"), args).await
    }

    /// Starts a server on `dir`, whose `data` subdirectory may hold a database already.
    pub async fn start_in(dir: tempfile::TempDir, args: &[&str]) -> Self {
        let mut args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
        if on_postgres() && !args.iter().any(|a| a == "--database" || a == "--config") {
            let url = confab_testpg::Postgres::shared().fresh_database();
            args.splice(0..0, ["--database".to_string(), url]);
        }
        let mut bucket = None;
        if on_s3() && !args.iter().any(|a| a == "--blobs" || a == "--config") {
            let s3 = confab_tests3::S3::shared();
            let name = s3.bucket();
            args.splice(0..0, s3_flags(s3, &name));
            bucket = Some(name);
        }
        let (child, port) = spawn(dir.path(), 0, &args).await;
        TestServer {
            child: Some(child),
            url: ServerUrl::parse(&format!("http://127.0.0.1:{port}")).unwrap(),
            port,
            dir,
            args,
            bucket,
        }
    }

    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    /// The server's temp dir: its data directory, its log, and what a
    /// test writes beside them.
    pub fn root(&self) -> &Path {
        self.dir.path()
    }

    /// Where the shared S3 keeps this server's files, when it is on S3.
    pub fn bucket_dir(&self) -> Option<PathBuf> {
        let bucket = self.bucket.as_ref()?;
        Some(confab_tests3::S3::shared().bucket_dir(bucket))
    }

    /// The URL of the server's PostgreSQL database, when it has one.
    pub fn database_url(&self) -> Option<&str> {
        let at = self.args.iter().position(|a| a == "--database")?;
        self.args.get(at + 1).map(String::as_str)
    }

    fn database(&self) -> Option<&str> {
        self.database_url()?.rsplit('/').next()
    }

    /// Runs `sql` on the server's PostgreSQL database, as someone with
    /// access to the server's storage could.
    pub fn psql(&self, sql: &str) -> String {
        let db = self.database().expect("a server on PostgreSQL");
        confab_testpg::Postgres::shared().psql(db, sql)
    }

    /// Writes a dump of the server's PostgreSQL database (every row) next
    /// to its data directory, so that what scans those files for secrets
    /// scans the database too. Nothing on SQLite, whose files are there.
    pub fn dump_database(&self) {
        if let Some(db) = self.database() {
            let dump = confab_testpg::Postgres::shared().dump(db);
            assert!(dump.len() > 1000, "a dump with the schema in it");
            std::fs::write(self.dir.path().join("database.sql"), dump).expect("write dump");
        }
    }

    pub fn pid(&self) -> u32 {
        self.child
            .as_ref()
            .and_then(|c| c.id())
            .expect("server running")
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("server.log")).unwrap_or_default()
    }

    /// What `/metrics` says now.
    pub async fn metrics(&self) -> String {
        raw_http(
            &self.url.authority,
            "GET /metrics HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n",
        )
        .await
    }

    /// SIGKILL: no chance to flush or say goodbye.
    pub async fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            child.start_kill().expect("kill");
            child.wait().await.expect("wait");
        }
    }

    /// SIGTERM, without waiting for the shutdown.
    pub fn terminate(&self) {
        let child = self.child.as_ref().expect("running");
        let pid = child.id().expect("running");
        let status = std::process::Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .status()
            .expect("kill -TERM");
        assert!(status.success());
    }

    /// SIGTERM, and wait for the graceful shutdown to finish.
    pub async fn stop(&mut self) {
        if self.child.is_some() {
            self.terminate();
        }
        if let Some(mut child) = self.child.take() {
            let exit = tokio::time::timeout(Duration::from_secs(20), child.wait())
                .await
                .expect("graceful shutdown in time")
                .expect("wait");
            assert!(exit.success(), "server exited with {exit}");
        }
    }

    /// The `serve` flags used by the next [`TestServer::restart`].
    pub fn args_mut(&mut self) -> &mut Vec<String> {
        &mut self.args
    }

    /// Starts the server again on the same port and data directory.
    pub async fn restart(&mut self) {
        assert!(self.child.is_none(), "stop or kill the server first");
        let (child, _) = spawn(self.dir.path(), self.port, &self.args).await;
        self.child = Some(child);
    }

    /// Registers `name` and logs in a first device, which publishes the
    /// user's first signed device list.
    pub async fn user(&self, name: &str) -> TestUser {
        TestUser::register(&self.url, name).await
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub async fn healthy(&self) -> bool {
        let addr = format!("127.0.0.1:{}", self.port);
        raw_http(
            &addr,
            "GET /healthz HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n",
        )
        .await
        .starts_with("HTTP/1.1 200")
    }
}

async fn spawn(dir: &Path, port: u16, extra: &[String]) -> (Child, u16) {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join("server.log"))
        .expect("log file");
    // Under the usual umask (022), so that the modes of the files the
    // server makes are tested as users get them; `exec` keeps the pid.
    let mut child = Command::new("sh")
        .args(["-c", "umask 022 && exec \"$0\" \"$@\""])
        .arg(env!("CARGO_BIN_EXE_confab"))
        .arg("serve")
        .args(["--listen", &format!("127.0.0.1:{port}")])
        .arg("--data-dir")
        .arg(dir.join("data"))
        .args(["--log", "info", "--password-hash-concurrency", "16"])
        // Most scenarios write between users who never answer each other:
        // friends, not strangers. The abuse and request scenarios set the
        // defaults back (a flag given again wins).
        .args(["--request-messages", "1000000"])
        .args(extra)
        // Freed memory goes back to the OS at once, so that RSS measures
        // what is in use (mimalloc otherwise keeps it a while).
        .env("MIMALLOC_PURGE_DELAY", "0")
        .stdout(Stdio::piped())
        .stderr(log)
        .kill_on_drop(true)
        .spawn()
        .expect("start confab serve");
    let stdout = child.stdout.take().expect("stdout");
    let mut lines = BufReader::new(stdout).lines();
    let line = tokio::time::timeout(WAIT, lines.next_line())
        .await
        .expect("server started in time")
        .expect("read stdout")
        .unwrap_or_else(|| {
            panic!(
                "server exited: {}",
                std::fs::read_to_string(dir.join("server.log")).unwrap()
            )
        });
    let port = line
        .rsplit(':')
        .next()
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("unexpected first line {line:?}"));
    // Keep draining stdout so the server never blocks on it.
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    (child, port)
}

/// The value of the metric line `name value` in `metrics`, if there is one.
pub fn metric(metrics: &str, name: &str) -> Option<f64> {
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
}

/// Sends a raw HTTP request and returns the whole response as text.
pub async fn raw_http(addr: &str, request: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
    stream.write_all(request.as_bytes()).await.expect("write");
    let mut response = Vec::new();
    let _ = tokio::time::timeout(WAIT, stream.read_to_end(&mut response)).await;
    String::from_utf8_lossy(&response).into_owned()
}

/// A user logged in on one device, with its keys and the device lists it
/// has pinned.
pub struct TestUser {
    pub url: ServerUrl,
    pub name: String,
    pub login: LoginResponse,
    pub e2e: Arc<E2e>,
    pub enrollment: Enrollment,
}

impl TestUser {
    /// Registers `name` at `url` (a node, or a load balancer in front of
    /// several) and logs in a first device.
    pub async fn register(url: &ServerUrl, name: &str) -> TestUser {
        account::register(url, name, PASSWORD)
            .await
            .expect("register");
        let user = TestUser::login(url, name, None).await;
        assert_eq!(user.enrollment, Enrollment::Listed);
        user
    }

    /// Logs in (keeping `existing`'s device and keys when given) and puts
    /// the device on the list when it can do so alone.
    pub async fn login(url: &ServerUrl, name: &str, existing: Option<Identity>) -> TestUser {
        let (login, identity) = e2e::login(url, name, PASSWORD, existing, Some("test"))
            .await
            .expect("login");
        let e2e =
            E2e::new(identity, url.clone(), login.token.clone(), None, false).expect("e2e state");
        let enrollment = e2e.enroll().await.expect("enroll");
        TestUser {
            url: url.clone(),
            name: name.to_string(),
            login,
            e2e: Arc::new(e2e),
            enrollment,
        }
    }

    /// Another device of this user, approved by this one.
    pub async fn add_device(&self) -> TestUser {
        let mut new = self.new_device().await;
        let keys = self.e2e.device_keys(new.login.device).await.expect("keys");
        assert_eq!(keys, new.e2e.identity().keys.public(), "the server's copy");
        self.e2e
            .approve(new.login.device, keys)
            .await
            .expect("approve the new device");
        new.enrollment = new.e2e.enroll().await.expect("enroll");
        assert_eq!(new.enrollment, Enrollment::Listed);
        new
    }

    /// A new device of this user that nobody has approved yet.
    pub async fn new_device(&self) -> TestUser {
        TestUser::login(&self.url, &self.name, None).await
    }

    /// Logs this device in again with its id and keys.
    pub async fn relogin(&self) -> TestUser {
        self.relogin_at(&self.url).await
    }

    /// The same, at another server (a restored backup).
    pub async fn relogin_at(&self, url: &ServerUrl) -> TestUser {
        TestUser::login(url, &self.name, Some(self.e2e.identity().clone())).await
    }

    pub async fn connect(&self) -> (Client, Events) {
        self.connect_with(ConnectOptions::default()).await
    }

    pub async fn connect_with(&self, mut options: ConnectOptions) -> (Client, Events) {
        options.e2e.get_or_insert_with(|| self.e2e.clone());
        Client::connect(&self.url, &self.login.token, options)
            .await
            .unwrap_or_else(|e| panic!("{} cannot connect: {e}", self.name))
    }

    /// Connects and waits until the offline backlog has arrived; returns the
    /// events that came before `synced`.
    pub async fn connect_synced(&self) -> (Client, Events, Vec<Event>) {
        let (client, mut events) = self.connect().await;
        let backlog = until(&mut events, |e| matches!(e, Event::Synced)).await;
        (client, events, backlog)
    }

    /// Accepts `peer`'s message request, as a friend would (from a
    /// connection of its own, closed after).
    pub async fn accepts(&self, peer: &str) {
        let (client, _events) = self.connect().await;
        let conv = client.open(peer).await.expect("open");
        client.accept(conv).await.expect("accept");
        client.close().await;
    }

    pub fn token(&self) -> &str {
        &self.login.token
    }
}

/// Waits for the first event matching `pred`; panics after [`WAIT`].
pub async fn expect_event(events: &mut Events, what: &str, pred: impl Fn(&Event) -> bool) -> Event {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        match tokio::time::timeout_at(deadline, events.recv()).await {
            Ok(Some(event)) if pred(&event) => return event,
            Ok(Some(_)) => continue,
            Ok(None) => panic!("event stream ended while waiting for {what}"),
            Err(_) => panic!("timed out waiting for {what}"),
        }
    }
}

/// Collects events up to (not including) the first that matches `stop`.
pub async fn until(events: &mut Events, stop: impl Fn(&Event) -> bool) -> Vec<Event> {
    let mut seen = Vec::new();
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        match tokio::time::timeout_at(deadline, events.recv()).await {
            Ok(Some(event)) if stop(&event) => return seen,
            Ok(Some(event)) => seen.push(event),
            Ok(None) => panic!("event stream ended; saw {seen:?}"),
            Err(_) => panic!("timed out; saw {seen:?}"),
        }
    }
}

/// Everything that arrives within `period`.
pub async fn collect_for(events: &mut Events, period: Duration) -> Vec<Event> {
    let deadline = tokio::time::Instant::now() + period;
    let mut seen = Vec::new();
    while let Ok(Some(event)) = tokio::time::timeout_at(deadline, events.recv()).await {
        seen.push(event);
    }
    seen
}

/// Asserts that no event matching `pred` arrives within [`QUIET`].
pub async fn expect_no_event(events: &mut Events, what: &str, pred: impl Fn(&Event) -> bool) {
    let deadline = tokio::time::Instant::now() + QUIET;
    while let Ok(Some(event)) = tokio::time::timeout_at(deadline, events.recv()).await {
        assert!(!pred(&event), "unexpected {what}: {event:?}");
    }
}

/// The sender sends `body` in `conv`; the recipient gets it, and the
/// sender sees it sent (the ack), delivered, and read once the recipient
/// reads it: all three ticks.
pub async fn every_tick(
    (sender, sender_events): (&Client, &mut Events),
    (recipient, recipient_events, name): (&Client, &mut Events, &str),
    conv: ConversationId,
    body: &str,
) {
    let sent = sender.send(conv, body).await.unwrap();
    expect_event(recipient_events, "the recipient gets it", is_message(body)).await;
    expect_event(
        sender_events,
        "the sender sees it delivered",
        is_receipt(name, |delivered, _| delivered >= sent.seq),
    )
    .await;
    recipient.read(conv, sent.seq).await.unwrap();
    expect_event(
        sender_events,
        "the sender sees it read",
        is_receipt(name, |_, read| read == Some(sent.seq)),
    )
    .await;
}

pub fn messages(events: &[Event]) -> Vec<(ConversationId, i64, String)> {
    events
        .iter()
        .filter_map(|e| match e {
            Event::Message(m) => Some((m.conv, m.seq, m.body.clone())),
            _ => None,
        })
        .collect()
}

pub fn is_message(body: &str) -> impl Fn(&Event) -> bool + '_ {
    move |e| matches!(e, Event::Message(m) if m.body == body)
}

pub fn is_receipt(user: &str, pred: impl Fn(i64, Option<i64>) -> bool) -> impl Fn(&Event) -> bool {
    let user = user.to_string();
    move |e| matches!(e, Event::Receipt { user: u, delivered, read, .. } if *u == user && pred(*delivered, *read))
}

pub fn is_presence(user: &str, online: bool) -> impl Fn(&Event) -> bool + '_ {
    move |e| matches!(e, Event::Presence { user: u, online: o, .. } if u == user && *o == online)
}

/// A WebSocket driven frame by frame, for what the client library would never send.
pub struct RawSocket {
    ws: tokio_tungstenite::WebSocketStream<
        tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>,
    >,
}

impl RawSocket {
    pub async fn connect(url: &ServerUrl) -> Self {
        let (ws, _) = tokio_tungstenite::connect_async(url.ws())
            .await
            .expect("websocket handshake");
        RawSocket { ws }
    }

    /// A WebSocket from the loopback address `source` (127.0.0.2, …), as
    /// from another machine; the handshake's refusal is returned.
    pub async fn connect_from(
        url: &ServerUrl,
        source: std::net::IpAddr,
    ) -> Result<Self, Box<tokio_tungstenite::tungstenite::Error>> {
        let socket = tokio::net::TcpSocket::new_v4().expect("socket");
        socket
            .bind(std::net::SocketAddr::new(source, 0))
            .expect("bind the source address");
        let addr = tokio::net::lookup_host(&url.authority)
            .await
            .expect("resolve")
            .next()
            .expect("an address");
        let stream = socket.connect(addr).await.expect("connect");
        let stream = tokio_tungstenite::MaybeTlsStream::Plain(stream);
        let (ws, _) = tokio_tungstenite::client_async(url.ws(), stream).await?;
        Ok(RawSocket { ws })
    }

    /// Authenticates as `user` on a socket connected some other way.
    pub async fn auth(mut self, user: &TestUser) -> Self {
        self.send_text(&format!(
            r#"{{"type":"auth","v":2,"token":"{}"}}"#,
            user.token()
        ))
        .await;
        loop {
            let frame = self.next_json().await.expect("frames until synced");
            if frame["type"] == "synced" {
                return self;
            }
        }
    }

    /// Connects and authenticates as `user`, reading up to `synced`.
    pub async fn authed(user: &TestUser) -> Self {
        Self::connect(&user.url).await.auth(user).await
    }

    pub async fn send_text(&mut self, text: &str) {
        use futures_util::SinkExt;
        self.ws
            .send(tokio_tungstenite::tungstenite::Message::Text(text.into()))
            .await
            .expect("send");
    }

    /// Sends unless the server has already closed the socket.
    pub async fn try_send_text(&mut self, text: &str) -> bool {
        use futures_util::SinkExt;
        let message = tokio_tungstenite::tungstenite::Message::Text(text.into());
        self.ws.send(message).await.is_ok()
    }

    /// Sends a binary frame; false once the server has closed the socket.
    pub async fn send_binary(&mut self, bytes: &[u8]) -> bool {
        use futures_util::SinkExt;
        let message = tokio_tungstenite::tungstenite::Message::Binary(bytes.to_vec().into());
        self.ws.send(message).await.is_ok()
    }

    /// The next JSON frame; `None` once the socket is closed.
    pub async fn next_json(&mut self) -> Option<serde_json::Value> {
        use futures_util::StreamExt;
        loop {
            let next = tokio::time::timeout(WAIT, self.ws.next())
                .await
                .expect("a frame in time");
            match next {
                Some(Ok(tokio_tungstenite::tungstenite::Message::Text(t))) => {
                    return Some(serde_json::from_str(&t).expect("server frames are JSON"));
                }
                Some(Ok(tokio_tungstenite::tungstenite::Message::Close(_)))
                | Some(Err(_))
                | None => return None,
                Some(Ok(_)) => continue,
            }
        }
    }

    /// Reads frames until an error frame, which must carry `code`.
    pub async fn expect_error(&mut self, code: &str) -> serde_json::Value {
        loop {
            let frame = self
                .next_json()
                .await
                .unwrap_or_else(|| panic!("closed before error {code}"));
            if frame["type"] == "error" {
                assert_eq!(frame["code"], code, "{frame}");
                return frame;
            }
        }
    }

    /// Sends the first fragment of a text message and never the rest.
    pub async fn send_unfinished_text(&mut self, part: &[u8]) {
        use futures_util::SinkExt;
        use tokio_tungstenite::tungstenite::protocol::frame::{
            Frame,
            coding::{Data, OpCode},
        };
        let frame = Frame::message(part.to_vec(), OpCode::Data(Data::Text), false);
        self.ws
            .send(tokio_tungstenite::tungstenite::Message::Frame(frame))
            .await
            .expect("send a fragment");
    }

    /// Sends a WebSocket ping control frame; false once the server closed.
    pub async fn try_ping(&mut self) -> bool {
        use futures_util::SinkExt;
        let ping = tokio_tungstenite::tungstenite::Message::Ping(Vec::new().into());
        self.ws.send(ping).await.is_ok()
    }

    /// The next JSON frame if one comes within `period`.
    pub async fn next_json_within(&mut self, period: Duration) -> Option<serde_json::Value> {
        tokio::time::timeout(period, self.next_json())
            .await
            .ok()
            .flatten()
    }

    /// Whether the server has closed the socket, looking at what has
    /// already arrived only.
    pub async fn closed_now(&mut self) -> bool {
        use futures_util::StreamExt;
        loop {
            match tokio::time::timeout(Duration::from_millis(1), self.ws.next()).await {
                Err(_) => return false,
                Ok(None)
                | Ok(Some(Err(_)))
                | Ok(Some(Ok(tokio_tungstenite::tungstenite::Message::Close(_)))) => return true,
                Ok(Some(Ok(_))) => continue,
            }
        }
    }

    /// The socket still answers a ping.
    pub async fn answers_ping(&mut self) -> bool {
        self.send_text(r#"{"type":"ping"}"#).await;
        while let Some(frame) = self.next_json().await {
            if frame["type"] == "pong" {
                return true;
            }
        }
        false
    }

    /// Reads until the server closes; false if it stays open past [`WAIT`].
    pub async fn closed(&mut self) -> bool {
        use futures_util::StreamExt;
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            match tokio::time::timeout_at(deadline, self.ws.next()).await {
                Err(_) => return false,
                Ok(None)
                | Ok(Some(Err(_)))
                | Ok(Some(Ok(tokio_tungstenite::tungstenite::Message::Close(_)))) => {
                    return true;
                }
                Ok(Some(Ok(_))) => continue,
            }
        }
    }
}

impl TestServer {
    pub fn assert_no_panics(&self) {
        let log = self.log();
        assert!(!log.contains("panicked"), "the server panicked:\n{log}");
    }
}

/// A TCP relay in front of a server, standing for the network: once it has
/// carried a given number of bytes (both ways) it either cuts every
/// connection and refuses new ones (a dropped link), or holds them still (a
/// stalled one), until [`CutRelay::mend`].
pub struct CutRelay {
    pub authority: String,
    state: Arc<RelayState>,
    task: tokio::task::JoinHandle<()>,
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Link {
    Up,
    Cut,
    Stalled,
}

struct RelayState {
    upstream: String,
    /// Bytes both ways, in all connections so far.
    carried: AtomicU64,
    /// The link trips when `carried` reaches this.
    trip_at: AtomicU64,
    /// What it does then: true stalls, false cuts.
    stall: std::sync::atomic::AtomicBool,
    link: tokio::sync::watch::Sender<Link>,
}

impl CutRelay {
    /// A relay that carries everything until armed.
    pub async fn start(upstream: &str) -> CutRelay {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let authority = listener.local_addr().unwrap().to_string();
        let state = Arc::new(RelayState {
            upstream: upstream.to_string(),
            carried: AtomicU64::new(0),
            trip_at: AtomicU64::new(u64::MAX),
            stall: Default::default(),
            link: tokio::sync::watch::channel(Link::Up).0,
        });
        let relay = state.clone();
        let task = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                if *relay.link.borrow() == Link::Cut {
                    continue; // dropped: the client sees a reset
                }
                tokio::spawn(relay.clone().carry(client));
            }
        });
        CutRelay {
            authority,
            state,
            task,
        }
    }

    /// The link is cut after `bytes` more.
    pub fn cut_after(&self, bytes: u64) {
        self.arm(bytes, false);
    }

    /// The link stalls after `bytes` more.
    pub fn stall_after(&self, bytes: u64) {
        self.arm(bytes, true);
    }

    fn arm(&self, bytes: u64, stall: bool) {
        let carried = self.state.carried.load(Ordering::SeqCst);
        self.state.stall.store(stall, Ordering::SeqCst);
        self.state.trip_at.store(carried + bytes, Ordering::SeqCst);
    }

    /// Waits until the link is cut or stalled.
    pub async fn tripped(&self) {
        let mut link = self.state.link.subscribe();
        tokio::time::timeout(Duration::from_secs(60), link.wait_for(|l| *l != Link::Up))
            .await
            .expect("the link trips in time")
            .unwrap();
    }

    /// The link works again, and stays up.
    pub fn mend(&self) {
        self.state.trip_at.store(u64::MAX, Ordering::SeqCst);
        self.state.link.send_replace(Link::Up);
    }
}

impl Drop for CutRelay {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl RelayState {
    async fn carry(self: Arc<Self>, client: tokio::net::TcpStream) {
        let Ok(server) = tokio::net::TcpStream::connect(&self.upstream).await else {
            return;
        };
        let (client_read, client_write) = client.into_split();
        let (server_read, server_write) = server.into_split();
        let mut link = self.link.subscribe();
        tokio::select! {
            _ = self.forward(client_read, server_write) => {}
            _ = self.forward(server_read, client_write) => {}
            _ = link.wait_for(|l| *l == Link::Cut) => {}
        }
        // Dropping both halves of both sockets ends the connection.
    }

    /// Carries bytes one way, counting them (both ways count) and tripping
    /// the link where it is armed to.
    async fn forward(
        &self,
        mut from: tokio::net::tcp::OwnedReadHalf,
        mut to: tokio::net::tcp::OwnedWriteHalf,
    ) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = match from.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            };
            let before = self.carried.fetch_add(n as u64, Ordering::SeqCst);
            let trip_at = self.trip_at.load(Ordering::SeqCst);
            let mut start = 0;
            if before + n as u64 >= trip_at {
                start = trip_at.saturating_sub(before) as usize;
                if to.write_all(&buf[..start]).await.is_err() {
                    return;
                }
                self.trip_at.store(u64::MAX, Ordering::SeqCst);
                if !self.stall.load(Ordering::SeqCst) {
                    self.link.send_replace(Link::Cut);
                    return;
                }
                self.link.send_replace(Link::Stalled);
                let mut held = self.link.subscribe();
                let _ = held.wait_for(|l| *l == Link::Up).await;
            }
            if to.write_all(&buf[start..n]).await.is_err() {
                return;
            }
        }
    }
}
