//! The command-line client, driven the way a script drives it: two users
//! from one shell, passwords from the environment or stdin, JSON output.

use std::path::Path;
use std::process::{Output, Stdio};

use serde_json::Value;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::process::Command;

use crate::harness::*;

pub fn cli(server: &TestServer, config: &Path) -> Command {
    cli_at(&server.url.authority, config)
}

/// `confab` talking to the server at `authority` (a relay in front of it).
pub fn cli_at(authority: &str, config: &Path) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_confab"));
    command
        .env("CONFAB_SERVER", format!("http://{authority}"))
        .env("CONFAB_CONFIG_DIR", config)
        .env("CONFAB_PASSWORD", PASSWORD)
        .kill_on_drop(true);
    command
}

pub async fn run(server: &TestServer, config: &Path, args: &[&str]) -> Output {
    run_at(&server.url.authority, config, args).await
}

/// [`run`] against the server at `authority` (a relay in front of it).
pub async fn run_at(authority: &str, config: &Path, args: &[&str]) -> Output {
    let output = cli_at(authority, config)
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

pub fn json(output: &Output) -> Value {
    serde_json::from_slice(&output.stdout).expect("JSON on stdout")
}

pub async fn signed_up(server: &TestServer, config: &Path, name: &str) {
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

    let (mut chat, mut to_chat, mut from_chat) = chat_from_script(&server, &bob, "alice");
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

/// `confab chat <target>` driven from a script: the process, its stdin and
/// its stdout's lines (one JSON event each).
fn chat_from_script(
    server: &TestServer,
    config: &Path,
    target: &str,
) -> (
    tokio::process::Child,
    tokio::process::ChildStdin,
    tokio::io::Lines<BufReader<tokio::process::ChildStdout>>,
) {
    let mut chat = cli(server, config)
        .args(["chat", target])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let stdin = chat.stdin.take().unwrap();
    let stdout = BufReader::new(chat.stdout.take().unwrap()).lines();
    (chat, stdin, stdout)
}

pub async fn next_event(
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

fn text(output: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

#[tokio::test]
async fn devices_are_approved_safety_numbers_match_and_a_key_change_stops_scripts() {
    let server = TestServer::start().await;
    let dirs = tempfile::tempdir().unwrap();
    let dir = |name: &str| dirs.path().join(name);
    signed_up(&server, &dir("alice"), "alice").await;
    signed_up(&server, &dir("bob"), "bob").await;
    assert!(
        run(&server, &dir("alice"), &["send", "bob", "hi"])
            .await
            .status
            .success()
    );
    let identity = std::fs::metadata(dir("alice").join("identity.json")).unwrap();
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(identity.permissions().mode() & 0o777, 0o600, "private keys");
    // Logging out keeps the key file; logging in again keeps the device.
    assert!(
        run(&server, &dir("alice"), &["logout"])
            .await
            .status
            .success()
    );
    let again = run(&server, &dir("alice"), &["login", "alice"]).await;
    assert!(text(&again).contains("(device 1)"), "{}", text(&again));

    // Both sides compute the same safety number.
    let from_alice = run(&server, &dir("alice"), &["keys", "bob", "--json"]).await;
    let from_bob = run(&server, &dir("bob"), &["keys", "alice", "--json"]).await;
    assert!(from_alice.status.success() && from_bob.status.success());
    let number = json(&from_alice)["safety_number"].clone();
    assert_eq!(number, json(&from_bob)["safety_number"]);
    assert_eq!(number.as_str().unwrap().len(), 12 * 5 + 11);

    // Bob's laptop logs in: it waits until his first device approves it,
    // and both show the same fingerprint.
    let login = run(&server, &dir("bob-laptop"), &["login", "bob"]).await;
    assert!(login.status.success());
    assert!(text(&login).contains("waiting for approval"));
    let devices = json(&run(&server, &dir("bob"), &["devices", "--json"]).await);
    let pending = devices
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["listed"] == false)
        .expect("a pending device")
        .clone();
    let id = pending["device"].to_string();
    let fingerprint = text(&login)
        .split("this fingerprint: ")
        .nth(1)
        .unwrap()
        .get(..24)
        .unwrap()
        .to_string();
    let blind = run(&server, &dir("bob"), &["devices", "approve", &id]).await;
    assert_eq!(
        blind.status.code(),
        Some(2),
        "a script must say what it saw"
    );
    assert!(text(&blind).contains(&fingerprint));
    let wrong = "0000 0000 0000 0000 0000";
    let refused = run(
        &server,
        &dir("bob"),
        &["devices", "approve", &id, "--fingerprint", wrong],
    )
    .await;
    assert_eq!(refused.status.code(), Some(1));
    assert!(text(&refused).contains("not approved"));
    let approved = run(
        &server,
        &dir("bob"),
        &["devices", "approve", &id, "--fingerprint", &fingerprint],
    )
    .await;
    assert!(approved.status.success(), "{}", text(&approved));
    // A signed addition does not stop alice; it is mentioned.
    let sent = run(&server, &dir("alice"), &["send", "bob", "to both"]).await;
    assert!(sent.status.success());
    assert!(text(&sent).contains("bob added device"), "{}", text(&sent));
    let history = run(&server, &dir("bob-laptop"), &["history", "alice"]).await;
    assert!(text(&history).contains("to both"));

    // Bob loses both and starts over: a key change stops alice's script
    // with exit code 5 until she accepts it.
    let phone = dir("bob-phone");
    assert!(
        run(&server, &phone, &["login", "bob"])
            .await
            .status
            .success()
    );
    assert!(
        run(&server, &phone, &["devices", "reset"])
            .await
            .status
            .success()
    );
    let refused = run(&server, &dir("alice"), &["send", "bob", "are you there?"]).await;
    assert_eq!(refused.status.code(), Some(5), "{}", text(&refused));
    assert!(text(&refused).contains("KEY CHANGE"));
    let mut chat = cli(&server, &dir("alice"))
        .args(["chat", "bob"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut to_chat = chat.stdin.take().unwrap();
    to_chat.write_all(b"are you there?\n").await.unwrap();
    let status = tokio::time::timeout(WAIT, chat.wait())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(status.code(), Some(5), "a chat from a script stops too");
    let keys = run(&server, &dir("alice"), &["keys", "bob", "--json"]).await;
    assert_eq!(keys.status.code(), Some(5));
    assert_eq!(json(&keys)["key_change"], true);
    assert_ne!(json(&keys)["safety_number"], number);
    let accepted = run(
        &server,
        &dir("alice"),
        &["send", "bob", "are you there?", "--accept-key-change"],
    )
    .await;
    assert!(accepted.status.success(), "{}", text(&accepted));
    let history = run(&server, &phone, &["history", "alice"]).await;
    assert!(text(&history).contains("are you there?"));
    assert!(
        run(&server, &dir("alice"), &["keys", "bob"])
            .await
            .status
            .success(),
        "accepted for good"
    );
}

#[tokio::test]
async fn settings_show_and_change_only_what_is_asked() {
    let server = TestServer::start().await;
    let dirs = tempfile::tempdir().unwrap();
    let alice = dirs.path().join("alice");
    signed_up(&server, &alice, "alice").await;
    let stdout = |o: &Output| String::from_utf8_lossy(&o.stdout).into_owned();

    let bare = run(&server, &alice, &["settings"]).await;
    assert!(bare.status.success());
    assert_eq!(stdout(&bare).trim(), "read receipts: on");
    let off = run(&server, &alice, &["settings", "--read-receipts", "off"]).await;
    assert_eq!(stdout(&off).trim(), "read receipts: off");
    let again = run(&server, &alice, &["settings"]).await;
    assert_eq!(
        stdout(&again).trim(),
        "read receipts: off",
        "a bare call changes nothing"
    );
    let bad = run(&server, &alice, &["settings", "--read-receipts", "maybe"]).await;
    assert_eq!(bad.status.code(), Some(2));

    // Every command takes --server; one that is not where this login lives
    // is refused rather than sent someone else's token.
    let elsewhere = run(
        &server,
        &alice,
        &["conversations", "--server", "http://127.0.0.1:9"],
    )
    .await;
    assert_eq!(elsewhere.status.code(), Some(3));
    assert!(String::from_utf8_lossy(&elsewhere.stderr).contains("logged in at"));
    let here = format!("http://{}", server.url.authority);
    let listed = run(&server, &alice, &["conversations", "--server", &here]).await;
    assert!(listed.status.success());
}

#[tokio::test]
async fn register_and_login_wait_out_a_busy_server() {
    // One password hash at a time: most of these find the slot taken.
    let server = TestServer::start_with(&["--password-hash-concurrency", "1"]).await;
    let dirs = tempfile::tempdir().unwrap();
    let names: Vec<String> = (0..6).map(|i| format!("user{i}")).collect();
    let signups = names.iter().map(|name| {
        let config = dirs.path().join(name);
        let server = &server;
        async move {
            let register = run(server, &config, &["register", name]).await;
            let login = run(server, &config, &["login", name]).await;
            (register.status.success(), login.status.success())
        }
    });
    for (registered, logged_in) in futures_util::future::join_all(signups).await {
        assert!(registered && logged_in, "busy is retried, not reported");
    }
}

#[tokio::test]
async fn requests_are_listed_and_accepted() {
    let server = TestServer::start().await;
    let dirs = tempfile::tempdir().unwrap();
    let (stranger, bob) = (dirs.path().join("stranger"), dirs.path().join("bob"));
    signed_up(&server, &stranger, "stranger").await;
    signed_up(&server, &bob, "bob").await;
    assert!(
        run(&server, &stranger, &["send", "bob", "hi, we have not met"])
            .await
            .status
            .success()
    );

    let requests = run(&server, &bob, &["requests", "--json"]).await;
    assert_eq!(json(&requests)[0]["peer"], "stranger");
    assert_eq!(json(&requests)[0]["request"], true);
    let listed = run(&server, &bob, &["conversations"]).await;
    assert!(String::from_utf8_lossy(&listed.stdout).contains("(request)"));

    let nobody = run(&server, &bob, &["accept", "alice"]).await;
    assert!(!nobody.status.success(), "no request from alice to accept");
    for _ in 0..2 {
        let accepted = run(&server, &bob, &["accept", "stranger"]).await;
        assert!(accepted.status.success(), "accepting twice is no error");
    }
    let none = run(&server, &bob, &["requests"]).await;
    assert!(String::from_utf8_lossy(&none.stdout).contains("no message requests"));
}

#[tokio::test]
async fn a_group_from_the_command_line_chat_history_info_and_admin_commands() {
    let server = TestServer::start().await;
    let dirs = tempfile::tempdir().unwrap();
    let [alice, bob, carol] = ["alice", "bob", "carol"].map(|n| dirs.path().join(n));
    for (dir, name) in [(&alice, "alice"), (&bob, "bob"), (&carol, "carol")] {
        signed_up(&server, dir, name).await;
    }
    let made = run(
        &server,
        &alice,
        &["group", "create", "Family", "bob", "carol"],
    )
    .await;
    assert!(made.status.success());
    // Bob and carol accept (by replying), so that alice sees their receipts.
    let (mut chat, mut to_chat, mut from_chat) = chat_from_script(&server, &bob, "#Family");
    to_chat.write_all(b"hello family\n").await.unwrap();
    let sent = next_event(&mut from_chat, "sent").await;
    assert_eq!(sent["text"], "hello family");
    let (mut carol_chat, mut to_carol, mut from_carol) =
        chat_from_script(&server, &carol, "#Family");
    to_carol.write_all(b"hi all\n").await.unwrap();
    next_event(&mut from_carol, "sent").await;

    // Alice's send waits until both have read it: their chats read what
    // they show.
    let waited = run(
        &server,
        &alice,
        &["send", "#Family", "dinner at 8", "--wait", "read", "--json"],
    )
    .await;
    assert!(waited.status.success(), "{}", text(&waited));
    assert_eq!(json(&waited)["status"], "read");
    let seq = json(&waited)["seq"].as_i64().unwrap();
    let mut seen = Vec::new();
    while !seen
        .iter()
        .any(|e: &Value| e["event"] == "receipts" && e["seq"] == sent["seq"])
    {
        seen.push(next_event(&mut from_chat, "").await);
    }
    let history = run(&server, &carol, &["history", "#Family", "--json"]).await;
    let lines = text(&history);
    assert!(
        lines.contains("dinner at 8") && lines.contains("\"event\":\"group\""),
        "{lines}"
    );

    let info = run(&server, &alice, &["info", "#Family", &seq.to_string()]).await;
    let shown = text(&info);
    assert!(
        shown.contains("delivered to 2 of 2, read by 2 of 2"),
        "{shown}"
    );

    // Bob is no admin; alice makes him one, and he renames the group.
    let refused = run(&server, &bob, &["group", "rename", "#Family", "Bobs"]).await;
    assert!(!refused.status.success());
    assert!(
        text(&refused).contains("not_admin") || text(&refused).contains("admin"),
        "{}",
        text(&refused)
    );
    assert!(
        run(&server, &alice, &["group", "admin", "#Family", "bob"])
            .await
            .status
            .success()
    );
    assert!(
        run(&server, &bob, &["group", "rename", "Family", "Family 2"])
            .await
            .status
            .success()
    );
    let members = run(&server, &carol, &["group", "info", "#Family 2"]).await;
    let shown = text(&members);
    assert!(
        shown.contains("3 members") && shown.contains("bob  admin"),
        "{shown}"
    );
    let listed = text(&run(&server, &carol, &["conversations"]).await);
    assert!(listed.contains("#Family 2 (3 members)"), "{listed}");
    assert!(
        run(&server, &carol, &["group", "leave", "#Family 2"])
            .await
            .status
            .success()
    );
    let listed = text(&run(&server, &carol, &["conversations"]).await);
    assert!(listed.contains("#Family 2 (you left)"), "{listed}");
    drop((to_chat, to_carol));
    assert!(chat.wait().await.unwrap().success());
    assert!(carol_chat.wait().await.unwrap().success());
}
