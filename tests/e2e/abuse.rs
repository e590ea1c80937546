//! Abuse: one account or one address must not take the server down, guess
//! passwords, or crowd out everyone else. Each scenario is an attack from
//! the abuse-resistance issue; the attacker and the victims use different
//! loopback addresses (127.0.0.x), as they would different machines.

use std::net::IpAddr;
use std::time::{Duration, Instant};

use confab_client::{Client, ClientError, ConnectOptions, Event, Events};
use confab_crypto::LoginProof;
use confab_protocol::{ConversationId, ErrorCode, LoginRequest};
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::harness::*;

fn address(last: u8) -> IpAddr {
    IpAddr::from([127, 0, 0, last])
}

/// An HTTP answer: status, `retry-after`, JSON body.
struct Answer {
    status: u16,
    retry_after: Option<u64>,
    body: Value,
}

/// One HTTP request from `source`, as a client on another machine would
/// send it.
async fn http_from(source: IpAddr, server: &str, path: &str, body: &str) -> Answer {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind((source, 0).into()).unwrap();
    let addr: std::net::SocketAddr = server.parse().unwrap();
    let mut stream = socket.connect(addr).await.expect("connect");
    let request = format!(
        "POST {path} HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut response = Vec::new();
    tokio::time::timeout(WAIT, stream.read_to_end(&mut response))
        .await
        .expect("an answer in time")
        .expect("read");
    let text = String::from_utf8_lossy(&response);
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head[9..12].parse().expect("a status");
    let retry_after = head
        .lines()
        .find_map(|l| {
            l.to_ascii_lowercase()
                .strip_prefix("retry-after: ")
                .map(str::to_string)
        })
        .and_then(|v| v.trim().parse().ok());
    Answer {
        status,
        retry_after,
        body: serde_json::from_str(body).unwrap_or(Value::Null),
    }
}

async fn login_from(source: IpAddr, server: &TestServer, user: &str, password: &str) -> Answer {
    let body = serde_json::json!({"username": user, "password": password}).to_string();
    http_from(source, &server.url.authority, "/v1/login", &body).await
}

/// A login of `user`'s own device, proving its key.
async fn device_login_from(source: IpAddr, user: &TestUser, proof: bool) -> Answer {
    let identity = user.e2e.identity();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64;
    let request = LoginRequest {
        username: user.name.clone(),
        password: PASSWORD.into(),
        device: Some(identity.device),
        device_name: None,
        keys: Some(identity.keys.public()),
        proof: proof.then(|| LoginProof::new(&identity.keys, &user.name, identity.device.0, now)),
    };
    let body = serde_json::to_string(&request).unwrap();
    http_from(source, &user.url.authority, "/v1/login", &body).await
}

fn from(source: IpAddr) -> ConnectOptions {
    ConnectOptions {
        local_addr: Some(source),
        ..Default::default()
    }
}

#[tokio::test]
async fn one_user_cannot_take_every_connection_while_others_connect() {
    let server = TestServer::start_with(&[
        "--connections-per-device",
        "2",
        "--connections-per-user",
        "3",
    ])
    .await;
    let alice = server.user("alice").await;
    let alice_laptop = alice.add_device().await;
    let bob = server.user("bob").await;

    // A phone whose old sockets are dead but not yet timed out: each new
    // one closes the oldest, so the phone is never locked out.
    let (_oldest, mut oldest_events) = alice.connect().await;
    let (_older, mut older_events) = alice.connect().await;
    let (_newest, _) = alice.connect().await;
    let closed = expect_event(&mut oldest_events, "the oldest socket closed", |e| {
        matches!(e, Event::Closed(_))
    })
    .await;
    assert!(
        matches!(&closed, Event::Closed(Some(e)) if e.code == ErrorCode::Replaced),
        "{closed:?}"
    );
    expect_no_event(&mut older_events, "the second socket closed", |e| {
        matches!(e, Event::Closed(_))
    })
    .await;

    // The user's third socket fits; a fourth, from another device, does not.
    let (_laptop, _) = alice_laptop.connect().await;
    let refused = confab_client::Client::connect(
        &server.url,
        alice_laptop.token(),
        ConnectOptions::default(),
    )
    .await
    .err()
    .expect("over the user's limit");
    assert_eq!(
        refused.code(),
        Some(ErrorCode::TooManyConnections),
        "{refused}"
    );

    // Everyone else connects, and the server answers its health check.
    let (b, _b_events, _) = bob.connect_synced().await;
    b.open("alice").await.unwrap();
    assert!(server.healthy().await);
    server.assert_no_panics();
}

#[tokio::test]
async fn one_address_cannot_take_every_socket() {
    let server = TestServer::start_with(&["--connections-per-address", "3"]).await;
    let mut users = Vec::new();
    for name in ["ann", "ben", "cat", "dan"] {
        users.push(server.user(name).await);
    }
    let attacker = address(2);
    let mut held = Vec::new();
    for user in &users[..3] {
        held.push(user.connect_with(from(attacker)).await);
    }
    let refused = confab_client::Client::connect(&server.url, users[3].token(), from(attacker))
        .await
        .err()
        .expect("over the address's limit");
    let ClientError::Api { status, error } = &refused else {
        panic!("an HTTP refusal: {refused}")
    };
    assert_eq!((*status, error.code), (503, ErrorCode::TooManyConnections));

    // Another address connects; the attacker's own address still gets its
    // health check and logins (plain HTTP has room of its own).
    let (d, _d_events, _) = users[3].connect_synced().await;
    d.open("ann").await.unwrap();
    let health = http_from(attacker, &server.url.authority, "/healthz", "").await;
    assert_eq!(
        health.status, 405,
        "healthz is a GET; this proves it was served"
    );
    assert_eq!(
        login_from(attacker, &server, "dan", PASSWORD).await.status,
        200
    );
    drop(held);
    server.assert_no_panics();
}

#[tokio::test]
async fn password_guessing_is_slowed_while_the_owner_logs_in_elsewhere() {
    let server = TestServer::start().await;
    server.user("victim").await;
    let (attacker, owner) = (address(2), address(3));

    let mut denied = 0;
    let mut throttled = None;
    for i in 0..30 {
        let answer = login_from(attacker, &server, "victim", &format!("guess number {i}")).await;
        match answer.status {
            401 => denied += 1,
            429 => {
                throttled = Some(answer);
                break;
            }
            other => panic!("unexpected {other}: {}", answer.body),
        }
    }
    let throttled = throttled.expect("guessing is throttled");
    assert_eq!(
        denied, 10,
        "the default allows 10 attempts an hour per account and address"
    );
    assert_eq!(throttled.body["code"], "rate_limited");
    assert!(
        throttled.retry_after.is_some_and(|s| s > 0),
        "says when to retry"
    );
    // While throttled, even the right password from that address is refused.
    let right = login_from(attacker, &server, "victim", PASSWORD).await;
    assert_eq!(right.status, 429);
    // The owner, elsewhere, is not locked out.
    assert_eq!(
        login_from(owner, &server, "victim", PASSWORD).await.status,
        200
    );
    // Failures are logged with the address they came from.
    let log = server.log();
    assert!(
        log.lines()
            .any(|l| l.contains("login failed") && l.contains("127.0.0.2") && l.contains("victim")),
        "{log}"
    );
    server.assert_no_panics();
}

#[tokio::test]
async fn guessing_from_many_addresses_does_not_lock_out_a_known_device() {
    let server = TestServer::start_with(&["--password-attempts-per-account", "5"]).await;
    // The owner's own first login is one of the five.
    let owner = server.user("owner").await;
    for last in 10..14 {
        let answer = login_from(address(last), &server, "owner", "a wrong guess").await;
        assert_eq!(answer.status, 401);
    }
    // The account's allowance is used up: a new device must wait...
    let elsewhere = address(20);
    assert_eq!(
        login_from(elsewhere, &server, "owner", PASSWORD)
            .await
            .status,
        429
    );
    // ...and a device id alone proves nothing...
    assert_eq!(
        device_login_from(elsewhere, &owner, false).await.status,
        429
    );
    // ...but the owner's own device, proving its key, logs in.
    assert_eq!(device_login_from(elsewhere, &owner, true).await.status, 200);
    server.assert_no_panics();
}

#[tokio::test]
async fn a_login_flood_from_one_address_leaves_others_their_logins() {
    // Attempt limits off, so that only the sharing of hash slots is tested.
    let server = TestServer::start_with(&[
        "--password-hash-concurrency",
        "4",
        "--password-attempts-per-address",
        "1000000",
        "--password-attempts-per-account-address",
        "1000000",
        "--password-attempts-per-account",
        "1000000",
    ])
    .await;
    server.user("victim").await;
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut flood = Vec::new();
    let busy_seen = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    for worker in 0..8 {
        let (stop, busy_seen) = (stop.clone(), busy_seen.clone());
        let server = server.url.authority.clone();
        flood.push(tokio::spawn(async move {
            let mut i = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                i += 1;
                let body =
                    format!(r#"{{"username":"user{worker}x{i}","password":"wrong password"}}"#);
                if http_from(address(2), &server, "/v1/login", &body)
                    .await
                    .status
                    == 503
                {
                    busy_seen.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                }
            }
        }));
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut answers = Vec::new();
    for _ in 0..10 {
        answers.push(
            login_from(address(3), &server, "victim", PASSWORD)
                .await
                .status,
        );
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for worker in flood {
        worker.await.unwrap();
    }
    assert!(
        busy_seen.load(std::sync::atomic::Ordering::Relaxed) > 0,
        "the flood was big enough to be refused"
    );
    assert_eq!(
        answers,
        vec![200; 10],
        "every login of the victim's went through"
    );
    server.assert_no_panics();
}

/// Bob (connected) opens a conversation with alice, who has three sockets.
async fn alice_with_three_sockets(
    server: &TestServer,
) -> (Client, Events, ConversationId, Vec<Client>) {
    let (alice, bob) = (server.user("alice").await, server.user("bob").await);
    let (b, b_events, _) = bob.connect_synced().await;
    let conv = b.open("alice").await.unwrap();
    let mut sockets = Vec::new();
    for _ in 0..3 {
        sockets.push(alice.connect_synced().await.0);
    }
    (b, b_events, conv, sockets)
}

#[tokio::test]
async fn a_user_hits_one_quota_from_all_its_connections() {
    let server = TestServer::start_with(&["--message-mib-per-day", "1"]).await;
    let (b, _b_events, conv, sockets) = alice_with_three_sockets(&server).await;
    // All three send at once, 30 KB of text each (about 40 KB of envelope):
    // about 1 MiB fits.
    let text = "q".repeat(30_000);
    let sends = sockets
        .iter()
        .flat_map(|a| (0..15).map(|_| a.send(conv, text.clone())));
    let results = futures_util::future::join_all(sends).await;
    let sent = results.iter().filter(|r| r.is_ok()).count();
    let over: Vec<&ClientError> = results.iter().filter_map(|r| r.as_ref().err()).collect();
    assert!(
        over.iter()
            .all(|e| e.code() == Some(ErrorCode::QuotaExceeded)),
        "{over:?}"
    );
    assert!(
        (25..=35).contains(&sent),
        "about 1 MiB of 30 KB messages: {sent}"
    );
    let ClientError::Server(frame) = over[0] else {
        panic!("an error frame")
    };
    assert!(
        frame.retry_after_ms.is_some_and(|ms| ms <= 86_400_000),
        "{frame:?}"
    );
    // Bob's allowance is his own.
    b.send(conv, "still fine").await.unwrap();
    let history = b.history(conv, None, 100).await.unwrap();
    assert_eq!(history.len(), sent + 1, "nothing refused was stored");
    server.assert_no_panics();
}

#[tokio::test]
async fn a_users_send_rate_holds_across_its_connections() {
    let server =
        TestServer::start_with(&["--messages-per-second", "2", "--message-burst", "10"]).await;
    let (_b, _b_events, conv, sockets) = alice_with_three_sockets(&server).await;
    let sends = sockets
        .iter()
        .flat_map(|a| (0..8).map(|i| a.send(conv, format!("m{i}"))));
    let results = futures_util::future::join_all(sends).await;
    let sent = results.iter().filter(|r| r.is_ok()).count();
    assert!(
        (10..=12).contains(&sent),
        "the burst, for all sockets together: {sent}"
    );
    let limited = results
        .iter()
        .filter(|r| matches!(r, Err(e) if e.code() == Some(ErrorCode::RateLimited)))
        .count();
    assert_eq!(sent + limited, 24);
    server.assert_no_panics();
}

/// A WebSocket opened by hand, for frames no WebSocket library would send.
struct RawFrames {
    stream: tokio::net::TcpStream,
}

impl RawFrames {
    async fn open(server: &TestServer) -> Self {
        let mut stream = tokio::net::TcpStream::connect(&server.url.authority)
            .await
            .unwrap();
        let request = format!(
            "GET {} HTTP/1.1\r\nhost: x\r\nupgrade: websocket\r\nconnection: upgrade\r\nsec-websocket-version: 13\r\nsec-websocket-key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n",
            confab_protocol::WS_PATH
        );
        stream.write_all(request.as_bytes()).await.unwrap();
        let mut head = Vec::new();
        while !head.ends_with(b"\r\n\r\n") {
            head.push(stream.read_u8().await.unwrap());
        }
        assert!(
            head.starts_with(b"HTTP/1.1 101"),
            "{}",
            String::from_utf8_lossy(&head)
        );
        RawFrames { stream }
    }

    /// Writes one frame: FIN, `opcode`, masked with a zero key unless `unmasked`.
    async fn write(&mut self, opcode: u8, payload: &[u8], unmasked: bool) {
        assert!(payload.len() < 126);
        let mut frame = vec![0x80 | opcode];
        if unmasked {
            frame.push(payload.len() as u8);
        } else {
            frame.push(0x80 | payload.len() as u8);
            frame.extend_from_slice(&[0, 0, 0, 0]);
        }
        frame.extend_from_slice(payload);
        let _ = self.stream.write_all(&frame).await;
    }

    /// Reads frames until a close frame; returns the texts before it and
    /// the close code.
    async fn until_close(&mut self) -> (Vec<String>, Option<u16>) {
        let mut texts = Vec::new();
        loop {
            let Ok(Ok(b0)) = tokio::time::timeout(WAIT, self.stream.read_u8()).await else {
                return (texts, None);
            };
            let len = match self.stream.read_u8().await.unwrap() & 0x7f {
                126 => self.stream.read_u16().await.unwrap() as usize,
                127 => self.stream.read_u64().await.unwrap() as usize,
                n => n as usize,
            };
            let mut payload = vec![0; len];
            self.stream.read_exact(&mut payload).await.unwrap();
            match b0 & 0x0f {
                0x1 => texts.push(String::from_utf8(payload).unwrap()),
                0x8 => return (texts, Some(u16::from_be_bytes([payload[0], payload[1]]))),
                _ => {}
            }
        }
    }
}

#[tokio::test]
async fn broken_frames_close_with_1002_and_bad_text_with_1007() {
    let server = TestServer::start().await;

    let mut raw = RawFrames::open(&server).await;
    raw.write(0x1, br#"{"type":"ping"}"#, true).await;
    let (texts, code) = raw.until_close().await;
    assert_eq!(code, Some(1002), "an unmasked client frame: {texts:?}");
    assert!(texts.iter().any(|t| t.contains("bad_frame")), "{texts:?}");

    let mut raw = RawFrames::open(&server).await;
    raw.write(0x1, b"{\"type\":\"\xff\xfe\"}", false).await;
    let (texts, code) = raw.until_close().await;
    assert_eq!(code, Some(1007), "text that is not UTF-8: {texts:?}");
    assert!(texts.iter().any(|t| t.contains("bad_json")), "{texts:?}");
    assert!(server.healthy().await);
    server.assert_no_panics();
}

#[tokio::test]
async fn a_ping_flood_is_closed_and_pings_do_not_keep_a_socket_open() {
    let server = TestServer::start_with(&["--idle-timeout-ms", "1500"]).await;
    let alice = server.user("alice").await;

    // As fast as the socket takes them: closed within the budget (a burst
    // of 200, then 200 refusals), far below the issue's 442k a second.
    let mut raw = RawSocket::authed(&alice).await;
    let mut sent = 0;
    while sent < 100_000 && raw.try_ping().await {
        sent += 1;
        if sent % 100 == 0 && raw.closed_now().await {
            break;
        }
    }
    assert!(raw.closed().await, "a ping flood is closed");
    assert!(sent < 2_000, "closed after {sent} pings");

    // A socket that only pings, well within its budget, is idle.
    let mut idle = RawSocket::authed(&alice).await;
    let started = Instant::now();
    let error = loop {
        assert!(started.elapsed() < WAIT, "never closed for idleness");
        if !idle.try_ping().await {
            break None;
        }
        if let Some(frame) = idle.next_json_within(Duration::from_millis(200)).await
            && frame["type"] == "error"
        {
            break Some(frame);
        }
    };
    let error = error.expect("an error frame before the close");
    assert_eq!(error["code"], "idle_timeout", "{error}");
    assert!(started.elapsed() >= Duration::from_millis(1400));
    server.assert_no_panics();
}

/// `count` sockets of `user`, each holding the first `part` bytes of a
/// message it never finishes; with the server's RSS (KiB) before and after.
async fn holding_unfinished(
    server: &TestServer,
    user: &TestUser,
    count: usize,
    part: usize,
) -> (Vec<RawSocket>, u64, u64) {
    let mut sockets = Vec::new();
    for _ in 0..count {
        sockets.push(RawSocket::authed(user).await);
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let before = crate::admin::rss_kib(server.pid());
    for socket in &mut sockets {
        socket.send_unfinished_text(&vec![b'x'; part]).await;
    }
    tokio::time::sleep(Duration::from_millis(1000)).await;
    (sockets, before, crate::admin::rss_kib(server.pid()))
}

/// Sockets that start a fragmented message and never finish it, pinging
/// between fragments: each holds its part for at most the idle timeout
/// (WebSocket pings no longer keep a socket open), and what they hold is
/// measured against the message size limit.
#[tokio::test]
async fn unfinished_fragments_are_held_only_until_the_idle_timeout() {
    const SOCKETS: usize = 40;
    const PART: usize = 200 * 1024;
    let server =
        TestServer::start_with(&[MANY_SOCKETS, &["--idle-timeout-ms", "3000"]].concat()).await;
    let alice = server.user("alice").await;
    let (mut sockets, before, holding) = holding_unfinished(&server, &alice, SOCKETS, PART).await;
    let per_socket = holding.saturating_sub(before) as f64 / SOCKETS as f64;
    println!(
        "RSS {before} -> {holding} KiB: {per_socket:.0} KiB per socket with {} KiB unfinished",
        PART / 1024
    );
    // tungstenite reserves the whole declared frame, then copies it into
    // the message being assembled: about three times the part (measured
    // 2.8), bounded by max_frame_bytes (SECURITY.md).
    assert!(
        per_socket < 3.5 * (PART / 1024) as f64,
        "{per_socket:.0} KiB per socket"
    );
    // Pings between fragments do not keep them: every socket is closed
    // within the idle timeout, and the memory goes back.
    let started = Instant::now();
    for socket in &mut sockets {
        while started.elapsed() < WAIT && socket.try_ping().await && !socket.closed_now().await {
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        assert!(
            started.elapsed() < WAIT,
            "an unfinished message kept a socket open"
        );
    }
    drop(sockets);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let after = crate::admin::rss_kib(server.pid());
    println!("RSS after the sockets closed: {after} KiB");
    // Most of it goes back (the allocator keeps some pages).
    let held = holding - before;
    assert!(
        after < before + held / 2,
        "freed: {before} -> {holding} -> {after} KiB"
    );
    server.assert_no_panics();
}

/// A large `history` page is written in fragments, so the socket's write
/// buffer (which never shrinks) stays small: measured per socket at rest
/// after a 1 MiB page (it was 1.2 MiB when the page went as one frame).
#[tokio::test]
async fn memory_after_a_large_history_page_stays_within_the_page_bound() {
    const SOCKETS: usize = 30;
    let server = TestServer::start_with(MANY_SOCKETS).await;
    let (alice, bob) = (server.user("alice").await, server.user("bob").await);
    bob.accepts("alice").await;
    let (a, _a_events, _) = alice.connect_synced().await;
    let conv = a.open("bob").await.unwrap();
    // About 54 KB each once encrypted: a 1 MiB page holds ~19.
    let big = "y".repeat(40_000);
    for _ in 0..25 {
        a.send(conv, big.clone()).await.unwrap();
    }
    let mut readers = Vec::new();
    for _ in 0..SOCKETS {
        readers.push(RawSocket::authed(&bob).await);
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let before = crate::admin::rss_kib(server.pid());
    for (i, reader) in readers.iter_mut().enumerate() {
        reader
            .send_text(&format!(
                r#"{{"type":"history","ref":{i},"conv":{},"limit":500}}"#,
                conv.0
            ))
            .await;
        let page = loop {
            let frame = reader.next_json().await.expect("a history page");
            if frame["type"] == "history" {
                break frame;
            }
        };
        assert!(page["messages"].as_array().unwrap().len() >= 15);
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let after = crate::admin::rss_kib(server.pid());
    let per_socket = after.saturating_sub(before) as f64 / SOCKETS as f64;
    println!("RSS {before} -> {after} KiB: {per_socket:.0} KiB per socket after a 1 MiB page");
    assert!(per_socket < 512.0, "{per_socket:.0} KiB per socket");
    for reader in &mut readers {
        assert!(reader.answers_ping().await, "still open");
    }
    server.assert_no_panics();
}

/// A socket that once read a large frame may keep tungstenite's read
/// buffer at that size (it never shrinks by itself; `Connection::keep_large_frame` makes
/// it let go once the socket reads on): measured, and bounded by twice the
/// frame (SECURITY.md).
#[tokio::test]
async fn memory_after_a_large_incoming_frame_stays_within_the_frame_bound() {
    const SOCKETS: usize = 40;
    const FRAME: usize = 200 * 1024;
    let server = TestServer::start_with(MANY_SOCKETS).await;
    let alice = server.user("alice").await;
    let mut sockets = Vec::new();
    for _ in 0..SOCKETS {
        sockets.push(RawSocket::authed(&alice).await);
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let before = crate::admin::rss_kib(server.pid());
    let body = "z".repeat(FRAME);
    for socket in &mut sockets {
        socket
            .send_text(&format!(
                r#"{{"type":"send","id":"m1","conv":1,"body":"{body}"}}"#
            ))
            .await;
        let error = socket.next_json().await.expect("an answer");
        assert_eq!(error["code"], "too_large", "{error}");
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let after = crate::admin::rss_kib(server.pid());
    let per_socket = after.saturating_sub(before) as f64 / SOCKETS as f64;
    println!(
        "RSS {before} -> {after} KiB: {per_socket:.0} KiB per socket after a {} KiB frame",
        FRAME / 1024
    );
    assert!(
        per_socket < 2.2 * (FRAME / 1024) as f64,
        "{per_socket:.0} KiB per socket"
    );
    for socket in &mut sockets {
        for _ in 0..100 {
            assert!(socket.answers_ping().await, "still open");
        }
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let later = crate::admin::rss_kib(server.pid());
    let per_socket = later.saturating_sub(before) as f64 / SOCKETS as f64;
    println!("RSS {later} KiB: {per_socket:.0} KiB per socket after 100 pings more");
    // Read on, a socket lets the grown buffer go (`keep_large_frame`): most
    // runs end near 40 KiB per socket, about one in three near 130 KiB (not
    // yet understood: which allocations stay is up to the allocator), never
    // the whole frame.
    assert!(
        per_socket < 0.9 * (FRAME / 1024) as f64,
        "{per_socket:.0} KiB per socket still held"
    );
    server.assert_no_panics();
}

/// The memory budget: sockets that hold unfinished messages take it up; a
/// socket that needs more than is left waits, then is closed with `busy`;
/// a history page is refused with `busy` (and a time to retry) while it is
/// spent; small frames go on as ever, and the server's memory stays near
/// the budget instead of growing with the sockets.
#[tokio::test]
async fn a_spent_memory_budget_sheds_load_instead_of_growing() {
    const SOCKETS: usize = 120;
    const PART: usize = 200 * 1024;
    const BUDGET_MIB: usize = 4;
    let budget = BUDGET_MIB.to_string();
    let flags = [
        MANY_SOCKETS,
        &["--memory-budget-mib", &budget, "--idle-timeout-ms", "60000"],
    ]
    .concat();
    let server = TestServer::start_with(&flags).await;
    let (mallory, bob, carol) = (
        server.user("mallory").await,
        server.user("bob").await,
        server.user("carol").await,
    );
    carol.accepts("bob").await;
    let (b, _b_events, _) = bob.connect_synced().await;
    let (_c, mut c_events, _) = carol.connect_synced().await;
    let conv = b.open("carol").await.unwrap();
    b.send(conv, "before".to_string()).await.unwrap();
    expect_event(&mut c_events, "carol gets it", is_message("before")).await;

    let (mut sockets, before, holding) = holding_unfinished(&server, &mallory, SOCKETS, PART).await;
    let grown = holding.saturating_sub(before);
    println!(
        "RSS {before} -> {holding} KiB with {SOCKETS} sockets of {} KiB unfinished, budget {BUDGET_MIB} MiB",
        PART / 1024
    );
    // What the sockets hold is bounded by the budget, plus 16 KiB read each
    // (held twice: tungstenite's frame buffer, and the message it is copied
    // into). Without the budget: ~400 KiB per socket, 48 MiB.
    let bound = 3 * (BUDGET_MIB as u64 * 1024 + SOCKETS as u64 * 2 * 16) / 2;
    assert!(grown < bound, "grew {grown} KiB, bound {bound} KiB");

    // Small frames need no budget: bob and carol chat on.
    b.send(conv, "during".to_string()).await.unwrap();
    expect_event(&mut c_events, "carol gets it", is_message("during")).await;
    // A page would need more than is left.
    let Err(ClientError::Server(refused)) = b.history(conv, None, 100).await else {
        panic!("a history page while the budget is spent");
    };
    assert_eq!(refused.code, ErrorCode::Busy, "{refused:?}");
    assert!(refused.retry_after_ms.is_some(), "{refused:?}");

    // The sockets that could not be covered are closed with `busy`.
    let mut busy = 0;
    for socket in &mut sockets {
        if let Some(frame) = socket.next_json_within(Duration::from_millis(200)).await
            && frame["code"] == "busy"
        {
            busy += 1;
        }
    }
    let started = Instant::now();
    while busy == 0 && started.elapsed() < WAIT {
        for socket in &mut sockets {
            if let Some(frame) = socket.next_json_within(Duration::from_millis(100)).await
                && frame["code"] == "busy"
            {
                busy += 1;
            }
        }
    }
    assert!(busy > 0, "no socket was closed for want of budget");
    println!("{busy} of {SOCKETS} sockets closed with busy");
    let metrics = server.metrics().await;
    let in_use = metric(&metrics, "confab_memory_budget_in_use_bytes")
        .unwrap_or_else(|| panic!("no budget gauge in\n{metrics}"));
    // The sockets still holding their parts keep it nearly spent.
    assert!(in_use > (BUDGET_MIB << 19) as f64, "{in_use} bytes in use");

    // Once they are gone, the budget is back and pages are served.
    drop(sockets);
    let started = Instant::now();
    let page = loop {
        match b.history(conv, None, 100).await {
            Ok(page) => break page,
            Err(ClientError::Server(e)) if e.code == ErrorCode::Busy => {
                assert!(started.elapsed() < WAIT, "the budget never came back");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(e) => panic!("{e}"),
        }
    };
    assert_eq!(page.len(), 2);
    server.assert_no_panics();
}
