//! `confab chat` as people and scripts use it: it rides out a server that
//! dies and comes back, sends what was typed meanwhile, never shows a
//! message twice (also when it is killed and started again), edits the line
//! being typed, and shows what a peer sends without letting it drive the
//! terminal.

use std::path::PathBuf;
use std::process::Stdio;

use serde_json::Value;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

use crate::cli::{cli, json, next_event, run, signed_up};
use crate::harness::*;
use crate::pty::{CTRL_D, LEFT, Pty};

/// Alice and bob, registered and logged in, each in a config directory.
async fn alice_and_bob(server: &TestServer) -> (tempfile::TempDir, PathBuf, PathBuf) {
    let dirs = tempfile::tempdir().unwrap();
    let (alice, bob) = (dirs.path().join("alice"), dirs.path().join("bob"));
    signed_up(server, &alice, "alice").await;
    signed_up(server, &bob, "bob").await;
    (dirs, alice, bob)
}

#[tokio::test]
async fn two_chats_in_terminals_go_on_across_a_server_kill() {
    let mut server = TestServer::start().await;
    let (_dirs, alice_dir, bob_dir) = alice_and_bob(&server).await;
    let mut alice = Pty::confab(&server, &alice_dir, &["chat", "bob"]);
    let mut bob = Pty::confab(&server, &bob_dir, &["chat", "alice"]);
    alice.wait_for("chatting with bob").await;
    bob.wait_for("chatting with alice").await;

    alice.line("hello bob");
    bob.wait_for("alice: hello bob").await;
    bob.line("hi alice");
    alice.wait_for("bob: hi alice").await;
    alice.wait_for("you: hello bob  ✓").await;

    server.kill9().await;
    alice.wait_for("* offline").await;
    bob.wait_for("* offline").await;
    alice.line("typed while the server was down");
    alice
        .wait_for("queued, sent once the connection is back")
        .await;
    server.restart().await;
    alice.wait_for("* connected again").await;
    bob.wait_for("* connected again").await;
    bob.wait_for("alice: typed while the server was down").await;
    bob.line("and after it came back");
    alice.wait_for("bob: and after it came back").await;

    for (screen, text) in [
        (&bob, "alice: hello bob"),
        (&bob, "alice: typed while the server was down"),
        (&alice, "bob: hi alice"),
        (&alice, "bob: and after it came back"),
        (&alice, "you: typed while the server was down  ✓"),
    ] {
        assert_eq!(
            screen.count(text),
            1,
            "{text:?} once:\n{}",
            screen.screen().join("\n")
        );
    }
    alice.keys(CTRL_D);
    bob.line("/quit");
    assert_eq!(alice.exit_code().await, 0);
    assert_eq!(bob.exit_code().await, 0);
}

#[tokio::test]
async fn a_message_full_of_escape_sequences_reaches_the_screen_defused() {
    let server = TestServer::start().await;
    let (_dirs, alice_dir, bob_dir) = alice_and_bob(&server).await;
    let mut alice = Pty::confab(&server, &alice_dir, &["chat", "bob"]);
    alice.wait_for("chatting with bob").await;

    // Sets the window title, clears the screen, then a C1 CSI and a
    // right-to-left override.
    let payload = "x\x1b]0;pwned\x07\x1b[2J\u{9b}31m\u{202e}gnp.exe";
    assert!(
        run(&server, &bob_dir, &["send", "alice", payload])
            .await
            .status
            .success()
    );
    alice
        .wait_for("bob: x␛]0;pwned␇␛[2J<U+009B>31m<U+202E>gnp.exe")
        .await;
    let written = alice.written();
    for bad in [
        &b"\x1b]0;"[..],
        b"\x1b[2J",
        "\u{9b}".as_bytes(),
        "\u{202e}".as_bytes(),
    ] {
        assert!(
            !written.windows(bad.len()).any(|w| w == bad),
            "{bad:?} reached the terminal"
        );
    }

    // Arrow keys edit the line being typed; they are not sent.
    alice.keys("abc");
    alice.keys(LEFT);
    alice.keys(LEFT);
    alice.line("X");
    alice.wait_for("you: aXbc  ✓").await;
    let history = run(&server, &bob_dir, &["history", "alice", "--json"]).await;
    let texts: Vec<String> = String::from_utf8(history.stdout.clone())
        .unwrap()
        .lines()
        .map(|l| {
            serde_json::from_str::<Value>(l).unwrap()["text"]
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect();
    assert_eq!(texts, [payload, "aXbc"], "JSON keeps the text exact");
    // ...and escapes what a terminal would act on.
    for bad in [&b"\x1b"[..], "\u{9b}".as_bytes(), "\u{202e}".as_bytes()] {
        assert!(!history.stdout.windows(bad.len()).any(|w| w == bad));
    }
    let shown = run(&server, &bob_dir, &["history", "alice"]).await;
    assert!(
        !shown.stdout.contains(&0x1b),
        "history shows it defused too"
    );
    alice.keys(CTRL_D);
    assert_eq!(alice.exit_code().await, 0);
}

/// A scripted chat: its stdin, and its stdout as JSON events.
struct Script {
    child: tokio::process::Child,
    stdin: tokio::process::ChildStdin,
    stdout: tokio::io::Lines<BufReader<tokio::process::ChildStdout>>,
}

impl Script {
    fn start(mut command: tokio::process::Command) -> Script {
        let mut child = command
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        Script {
            stdin: child.stdin.take().unwrap(),
            stdout: BufReader::new(child.stdout.take().unwrap()).lines(),
            child,
        }
    }

    async fn line(&mut self, text: &str) {
        self.stdin
            .write_all(format!("{text}\n").as_bytes())
            .await
            .unwrap();
    }

    async fn event(&mut self, kind: &str) -> Value {
        next_event(&mut self.stdout, kind).await
    }

    /// Events up to (and including) the first message with this text.
    async fn until_message(&mut self, text: &str) -> Vec<Value> {
        let mut seen = Vec::new();
        loop {
            let event = self.event("").await;
            let done = event["event"] == "message" && event["text"] == text;
            seen.push(event);
            if done {
                return seen;
            }
        }
    }
}

fn texts(events: &[Value]) -> Vec<&str> {
    events
        .iter()
        .filter(|e| e["event"] == "message")
        .map(|e| e["text"].as_str().unwrap())
        .collect()
}

#[tokio::test]
async fn a_scripted_chat_reports_the_outage_and_reconnects() {
    let mut server = TestServer::start().await;
    let (_dirs, alice, bob) = alice_and_bob(&server).await;
    let mut chat = Script::start({
        let mut c = cli(&server, &bob);
        c.args(["chat", "alice"]);
        c
    });
    chat.event("connected").await;
    assert!(
        run(&server, &alice, &["send", "bob", "before"])
            .await
            .status
            .success()
    );
    chat.until_message("before").await;

    server.kill9().await;
    let down = chat.event("disconnected").await;
    assert!(down["retry_in_ms"].as_u64().is_some(), "{down}");
    chat.line("while the server is down").await;
    let queued = chat.event("queued").await;
    server.restart().await;
    chat.event("connected").await;
    let sent = chat.event("sent").await;
    assert_eq!(
        sent["id"], queued["id"],
        "sent under the id it was queued with"
    );
    assert_eq!(sent["text"], "while the server is down");

    assert!(
        run(&server, &alice, &["send", "bob", "after"])
            .await
            .status
            .success()
    );
    let seen = chat.until_message("after").await;
    assert_eq!(texts(&seen), ["after"], "nothing again: {seen:?}");
    drop(chat.stdin);
    assert!(chat.child.wait().await.unwrap().success());
}

#[tokio::test]
async fn a_chat_killed_and_started_again_shows_nothing_twice() {
    let server = TestServer::start().await;
    let (_dirs, alice, bob) = alice_and_bob(&server).await;

    // This chat shows messages but its confirmations are lost: the server
    // still thinks bob's device lacks them when it is killed.
    let mut first = Script::start({
        let mut c = cli(&server, &bob);
        c.args(["chat", "alice"])
            .env("CONFAB_TEST_SILENT_RECEIPTS", "1");
        c
    });
    first.event("connected").await;
    for text in ["one", "two", "three"] {
        assert!(
            run(&server, &alice, &["send", "bob", text])
                .await
                .status
                .success()
        );
    }
    let seen = first.until_message("three").await;
    assert_eq!(texts(&seen), ["one", "two", "three"]);
    first.child.start_kill().unwrap();
    first.child.wait().await.unwrap();
    let sent = run(&server, &alice, &["send", "bob", "four", "--json"]).await;
    let four = json(&sent)["seq"].as_i64().unwrap();

    let mut again = Script::start({
        let mut c = cli(&server, &bob);
        c.args(["chat", "alice"]);
        c
    });
    let seen = again.until_message("four").await;
    assert_eq!(
        texts(&seen),
        ["four"],
        "only what it had not shown: {seen:?}"
    );
    // What it had shown is confirmed now: alice sees it delivered.
    let waited = run(
        &server,
        &alice,
        &["send", "bob", "five", "--wait", "delivered", "--json"],
    )
    .await;
    // (Read, even: the chat shows it, so bob has read it.)
    let status = json(&waited)["status"].clone();
    assert!(status == "delivered" || status == "read", "{status}");
    assert_eq!(json(&waited)["seq"], four + 1);
    drop(again.stdin);
    assert!(again.child.wait().await.unwrap().success());
}
