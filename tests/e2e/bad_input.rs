//! Bad input and limits: each gets a clear error code, the connection stays
//! open where that makes sense, nothing stored is lost, nothing panics.

use std::time::{Duration, Instant};

use confab_client::{ConnectOptions, Event};
use confab_protocol::ErrorCode;
use tokio::io::AsyncReadExt;

use crate::harness::*;

#[tokio::test]
async fn malformed_frames_get_error_codes_and_the_socket_stays_open() {
    let server = TestServer::start().await;
    let (alice, _bob) = (server.user("alice").await, server.user("bob").await);
    let (a, _events, _) = alice.connect_synced().await;
    let conv = a.open("bob").await.unwrap();
    a.send(conv, "kept").await.unwrap();

    let mut raw = RawSocket::authed(&alice).await;
    raw.send_text("{nope").await;
    raw.expect_error("bad_json").await;
    // A JSON array is not a frame, even with the fields in order, and
    // gets no `ref` it never sent.
    raw.send_text(r#"["open",5,"bob"]"#).await;
    let error = raw.expect_error("bad_json").await;
    assert_eq!(error.get("ref"), None, "{error}");
    raw.send_text("[1,2,3]").await;
    raw.expect_error("bad_json").await;
    raw.send_text(r#"{"type":"dance"}"#).await;
    raw.expect_error("unknown_type").await;
    raw.send_text(r#"{"conv":1}"#).await;
    raw.expect_error("bad_frame").await;
    raw.send_text(&format!(r#"{{"type":"send","conv":{}}}"#, conv.0))
        .await;
    raw.expect_error("bad_frame").await;
    raw.send_text(r#"{"type":"history","ref":7,"conv":"x","limit":1}"#)
        .await;
    let e = raw.expect_error("bad_frame").await;
    assert_eq!(e["ref"], 7, "the error names the request: {e}");
    raw.send_text(r#"{"type":"send","id":"has space","conv":1,"body":""}"#)
        .await;
    raw.expect_error("bad_frame").await;
    raw.send_text(r#"{"type":"delivered","conv":1,"seq":-5}"#)
        .await;
    raw.expect_error("bad_frame").await;
    assert!(raw.send_binary(b"\x00\x01").await);
    raw.expect_error("bad_frame").await;
    raw.send_text(r#"{"type":"auth","v":2,"token":"again"}"#)
        .await;
    raw.expect_error("bad_frame").await;
    assert!(raw.answers_ping().await, "still open after all that");

    let history = a.history(conv, None, 10).await.unwrap();
    assert_eq!(history.len(), 1, "nothing stored was lost");
    server.assert_no_panics();
}

#[tokio::test]
async fn conversations_of_others_and_unknown_users_are_refused() {
    let server = TestServer::start().await;
    let (alice, bob, carol) = (
        server.user("alice").await,
        server.user("bob").await,
        server.user("carol").await,
    );
    let (b, _b_events, _) = bob.connect_synced().await;
    let private = b.open("carol").await.unwrap();
    b.send(private, "for carol only").await.unwrap();
    let _ = carol;

    let (a, mut a_events, _) = alice.connect_synced().await;
    assert_eq!(
        a.open("nobody").await.unwrap_err().code(),
        Some(ErrorCode::UnknownUser)
    );
    assert_eq!(
        a.open("not a name!").await.unwrap_err().code(),
        Some(ErrorCode::UnknownUser)
    );
    assert_eq!(
        a.open("alice").await.unwrap_err().code(),
        Some(ErrorCode::SelfConversation)
    );
    assert_eq!(
        a.send(private, "let me in").await.unwrap_err().code(),
        Some(ErrorCode::NotMember)
    );
    assert_eq!(
        a.history(private, None, 10).await.unwrap_err().code(),
        Some(ErrorCode::NotMember)
    );
    let missing = confab_protocol::ConversationId(9_999);
    assert_eq!(
        a.send(missing, "x").await.unwrap_err().code(),
        Some(ErrorCode::NotMember)
    );
    a.read(private, 1).await.unwrap();
    let refused = expect_event(&mut a_events, "error for read", |e| {
        matches!(e, Event::Error(_))
    })
    .await;
    assert!(matches!(refused, Event::Error(e) if e.code == ErrorCode::NotMember));
    assert_eq!(
        a.block("nobody").await.unwrap_err().code(),
        Some(ErrorCode::UnknownUser)
    );
    server.assert_no_panics();
}

#[tokio::test]
async fn oversized_bodies_are_refused_and_oversized_frames_close() {
    let server =
        TestServer::start_with(&["--max-body-bytes", "2000", "--max-frame-bytes", "8192"]).await;
    let (alice, _bob) = (server.user("alice").await, server.user("bob").await);
    let (a, _events, _) = alice.connect_synced().await;
    let conv = a.open("bob").await.unwrap();
    let err = a.send(conv, "x".repeat(2000)).await.unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::TooLarge), "{err}");
    assert_eq!(
        a.send(conv, "x".repeat(1000)).await.unwrap().seq,
        1,
        "a body under the limit passes (its envelope is about 1.7 KB)"
    );

    let mut raw = RawSocket::authed(&alice).await;
    raw.send_text(&format!(
        r#"{{"type":"send","id":"big","conv":1,"body":"{}"}}"#,
        "y".repeat(20_000)
    ))
    .await;
    raw.expect_error("too_large").await;
    assert!(
        raw.closed().await,
        "a frame over the hard limit closes the socket"
    );
    let mut early = RawSocket::connect(&server.url).await;
    early.send_text(&"z".repeat(20_000)).await;
    early.expect_error("too_large").await;
    assert!(early.closed().await, "also before auth");
    assert_eq!(a.history(conv, None, 10).await.unwrap().len(), 1);
    server.assert_no_panics();
}

#[tokio::test]
async fn a_flood_is_rate_limited_then_closed() {
    let server = TestServer::start_with(&["--frames-per-second", "5", "--frame-burst", "10"]).await;
    let alice = server.user("alice").await;
    let mut raw = RawSocket::authed(&alice).await;
    for _ in 0..12 {
        raw.send_text(r#"{"type":"ping"}"#).await;
    }
    raw.send_text(r#"{"type":"send","id":"late","conv":1,"body":"x"}"#)
        .await;
    let e = raw.expect_error("rate_limited").await;
    let e = if e["id"].is_null() {
        raw.expect_error("rate_limited").await
    } else {
        e
    };
    let e = if e["id"].is_null() {
        raw.expect_error("rate_limited").await
    } else {
        e
    };
    assert_eq!(e["id"], "late", "the refusal names the message: {e}");
    tokio::time::sleep(Duration::from_millis(1200)).await;
    assert!(
        raw.answers_ping().await,
        "a short burst over the limit is forgiven"
    );

    let mut flood = RawSocket::authed(&alice).await;
    for _ in 0..100 {
        if !flood.try_send_text(r#"{"type":"ping"}"#).await {
            break;
        }
    }
    assert!(flood.closed().await, "a sustained flood is closed");
    let mut binary = RawSocket::authed(&alice).await;
    for _ in 0..100 {
        if !binary.send_binary(b"x").await {
            break;
        }
    }
    assert!(binary.closed().await, "binary frames count too");
    server.assert_no_panics();
}

#[tokio::test]
async fn an_unauthenticated_socket_can_do_nothing() {
    let server = TestServer::start().await;
    let alice = server.user("alice").await;

    let mut raw = RawSocket::connect(&server.url).await;
    raw.send_text(r#"{"type":"conversations","ref":1}"#).await;
    raw.expect_error("unauthorized").await;
    assert!(raw.closed().await);

    let mut raw = RawSocket::connect(&server.url).await;
    raw.send_text(r#"{"type":"auth","v":2,"token":"forged"}"#)
        .await;
    raw.expect_error("unauthorized").await;
    assert!(raw.closed().await);

    let mut raw = RawSocket::connect(&server.url).await;
    raw.send_text(&format!(
        r#"{{"type":"auth","v":99,"token":"{}"}}"#,
        alice.token()
    ))
    .await;
    raw.expect_error("unsupported_version").await;
    assert!(raw.closed().await);
    server.assert_no_panics();
}

#[tokio::test]
async fn slow_handshakes_are_cut_off() {
    let server = TestServer::start_with(&["--handshake-timeout-ms", "500"]).await;
    let _alice = server.user("alice").await;

    // A TCP connection that never sends its HTTP request.
    let started = Instant::now();
    let mut tcp = tokio::net::TcpStream::connect(&server.url.authority)
        .await
        .unwrap();
    let mut buf = [0u8; 64];
    let n = tokio::time::timeout(WAIT, tcp.read(&mut buf))
        .await
        .expect("closed in time");
    assert_eq!(n.unwrap_or(0), 0);
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "{:?}",
        started.elapsed()
    );

    // A WebSocket that never authenticates.
    let started = Instant::now();
    let mut raw = RawSocket::connect(&server.url).await;
    raw.expect_error("auth_timeout").await;
    assert!(raw.closed().await);
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "{:?}",
        started.elapsed()
    );
    server.assert_no_panics();
}

#[tokio::test]
async fn connections_over_the_limit_get_a_clear_503() {
    let server = TestServer::start_with(&["--max-connections", "2"]).await;
    let held1 = tokio::net::TcpStream::connect(&server.url.authority)
        .await
        .unwrap();
    let _held2 = tokio::net::TcpStream::connect(&server.url.authority)
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    let response = raw_http(
        &server.url.authority,
        "GET /healthz HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n",
    )
    .await;
    assert!(response.starts_with("HTTP/1.1 503"), "{response}");
    assert!(response.contains("too_many_connections"), "{response}");

    drop(held1);
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(server.healthy().await, "a freed slot is usable again");
}

#[tokio::test]
async fn browsers_from_other_origins_are_refused() {
    let server = TestServer::start().await;
    let alice = server.user("alice").await;
    let from = |origin: &str| ConnectOptions {
        origin: Some(origin.to_string()),
        ..ConnectOptions::default()
    };
    let err =
        confab_client::Client::connect(&server.url, alice.token(), from("https://evil.example"))
            .await
            .err()
            .expect("refused");
    assert_eq!(err.code(), Some(ErrorCode::ForbiddenOrigin), "{err}");
    let same = format!("http://{}", server.url.authority);
    assert!(
        confab_client::Client::connect(&server.url, alice.token(), from(&same))
            .await
            .is_ok()
    );

    let server = TestServer::start_with(&["--allowed-origin", "https://app.example"]).await;
    let alice = server.user("alice").await;
    assert!(
        confab_client::Client::connect(&server.url, alice.token(), from("https://app.example"))
            .await
            .is_ok()
    );
    let same = format!("http://{}", server.url.authority);
    let err = confab_client::Client::connect(&server.url, alice.token(), from(&same))
        .await
        .err()
        .expect("refused");
    assert_eq!(err.code(), Some(ErrorCode::ForbiddenOrigin));
}
