//! The command-line client, driven the way a script drives it: two users
//! from one shell, passwords from the environment or stdin, JSON output.

use std::path::Path;
use std::process::{Output, Stdio};

use serde_json::Value;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::process::Command;

use crate::harness::*;

fn cli(server: &TestServer, config: &Path) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_confab"));
    command
        .env("CONFAB_SERVER", format!("http://{}", server.url.authority))
        .env("CONFAB_CONFIG_DIR", config)
        .env("CONFAB_PASSWORD", PASSWORD)
        .kill_on_drop(true);
    command
}

async fn run(server: &TestServer, config: &Path, args: &[&str]) -> Output {
    let output = cli(server, config)
        .args(args)
        .output()
        .await
        .expect("run confab");
    eprintln!(
        "$ confab {}\n{}{}",
        args.join(" "),
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    output
}

fn json(output: &Output) -> Value {
    serde_json::from_slice(&output.stdout).expect("JSON on stdout")
}

async fn signed_up(server: &TestServer, config: &Path, name: &str) {
    assert!(
        run(server, config, &["register", name])
            .await
            .status
            .success()
    );
    assert!(run(server, config, &["login", name]).await.status.success());
}

#[tokio::test]
async fn two_users_from_one_shell() {
    let server = TestServer::start().await;
    let dirs = tempfile::tempdir().unwrap();
    let (alice, bob) = (dirs.path().join("alice"), dirs.path().join("bob"));
    signed_up(&server, &alice, "alice").await;

    // A password on stdin works as well as the environment variable.
    let mut register = cli(&server, &bob)
        .env_remove("CONFAB_PASSWORD")
        .args(["register", "bob"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    register
        .stdin
        .take()
        .unwrap()
        .write_all(format!("{PASSWORD}\n").as_bytes())
        .await
        .unwrap();
    assert!(register.wait().await.unwrap().success());
    assert!(run(&server, &bob, &["login", "bob"]).await.status.success());

    let sent = run(
        &server,
        &alice,
        &["send", "bob", "hello from a script", "--json"],
    )
    .await;
    assert!(sent.status.success());
    assert_eq!(json(&sent)["seq"], 1);
    assert_eq!(json(&sent)["status"], "sent");

    let list = run(&server, &bob, &["conversations", "--json"]).await;
    assert_eq!(json(&list)[0]["peer"], "alice");
    assert_eq!(json(&list)[0]["unread"], 1);
    let stderr = String::from_utf8_lossy(&list.stderr);
    assert!(
        stderr.contains("hello from a script"),
        "a command that connects shows what it pulled: {stderr}"
    );

    let history = run(&server, &bob, &["history", "alice", "--json"]).await;
    let line: Value =
        serde_json::from_slice(history.stdout.split(|b| *b == b'\n').next().unwrap()).unwrap();
    assert_eq!(
        (line["seq"].as_i64(), line["text"].as_str()),
        (Some(1), Some("hello from a script"))
    );

    let devices = run(&server, &alice, &["devices", "--json"]).await;
    assert_eq!(json(&devices)[0]["current"], true);
}

#[tokio::test]
async fn send_waits_for_read_while_the_peer_chats_from_a_script() {
    let server = TestServer::start().await;
    let dirs = tempfile::tempdir().unwrap();
    let (alice, bob) = (dirs.path().join("alice"), dirs.path().join("bob"));
    signed_up(&server, &alice, "alice").await;
    signed_up(&server, &bob, "bob").await;

    let mut chat = cli(&server, &bob)
        .args(["chat", "alice"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut to_chat = chat.stdin.take().unwrap();
    let mut from_chat = BufReader::new(chat.stdout.take().unwrap()).lines();
    to_chat.write_all(b"hi alice, I'm here\n").await.unwrap();
    let sent = next_event(&mut from_chat, "sent").await;
    assert_eq!(sent["text"], "hi alice, I'm here");

    let waited = run(
        &server,
        &alice,
        &[
            "send",
            "bob",
            "did you read this?",
            "--wait",
            "read",
            "--json",
        ],
    )
    .await;
    assert!(waited.status.success());
    assert_eq!(json(&waited)["status"], "read");
    // Alice's send pulled bob's message too, so bob's chat shows it delivered.
    let mut seen = Vec::new();
    while !(seen.iter().any(|e: &Value| e["event"] == "message")
        && seen.iter().any(|e| e["event"] == "delivered"))
    {
        seen.push(next_event(&mut from_chat, "").await);
    }
    let got = seen.iter().find(|e| e["event"] == "message").unwrap();
    assert_eq!(
        (got["from"].as_str(), got["text"].as_str()),
        (Some("alice"), Some("did you read this?"))
    );
    let delivered = seen.iter().find(|e| e["event"] == "delivered").unwrap();
    assert_eq!(delivered["seq"], sent["seq"]);

    drop(to_chat);
    assert!(
        chat.wait().await.unwrap().success(),
        "chat ends cleanly at end of input"
    );
}

async fn next_event(
    lines: &mut tokio::io::Lines<BufReader<tokio::process::ChildStdout>>,
    kind: &str,
) -> Value {
    loop {
        let line = tokio::time::timeout(WAIT, lines.next_line())
            .await
            .unwrap_or_else(|_| panic!("no {kind} event in time"))
            .unwrap()
            .unwrap_or_else(|| panic!("chat ended before a {kind} event"));
        let event: Value = serde_json::from_str(&line).expect("one JSON event per line");
        if kind.is_empty() || event["event"] == kind {
            return event;
        }
    }
}

#[tokio::test]
async fn exit_codes_say_what_went_wrong() {
    let server = TestServer::start().await;
    let dirs = tempfile::tempdir().unwrap();
    let (alice, nobody) = (dirs.path().join("alice"), dirs.path().join("nobody"));
    signed_up(&server, &alice, "alice").await;
    let bob = dirs.path().join("bob");
    signed_up(&server, &bob, "bob").await;

    assert_eq!(
        run(&server, &nobody, &["conversations"])
            .await
            .status
            .code(),
        Some(3),
        "not logged in"
    );
    let timed_out = run(
        &server,
        &alice,
        &["send", "bob", "anyone?", "--wait", "read", "--timeout", "1"],
    )
    .await;
    assert_eq!(
        timed_out.status.code(),
        Some(4),
        "stored but not read in time"
    );

    assert!(
        run(&server, &bob, &["block", "alice"])
            .await
            .status
            .success()
    );
    let blocked = run(&server, &alice, &["send", "bob", "hello?"]).await;
    assert_eq!(blocked.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&blocked.stderr).contains("blocked"));
    assert_eq!(
        run(&server, &alice, &["send", "nobody_here", "x"])
            .await
            .status
            .code(),
        Some(1)
    );

    assert!(run(&server, &alice, &["logout"]).await.status.success());
    assert_eq!(
        run(&server, &alice, &["conversations"]).await.status.code(),
        Some(3)
    );
}

#[tokio::test]
async fn logging_in_again_keeps_the_device() {
    let server = TestServer::start().await;
    let dirs = tempfile::tempdir().unwrap();
    let alice = dirs.path().join("alice");
    signed_up(&server, &alice, "alice").await;
    let again = run(&server, &alice, &["login", "alice"]).await;
    let text = String::from_utf8_lossy(&again.stdout);
    assert!(text.contains("(device 1)"), "{text}");
}
