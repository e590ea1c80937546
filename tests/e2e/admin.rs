//! Operating a server: backup, health and metrics.

use crate::harness::*;

#[tokio::test]
async fn a_backup_taken_while_serving_restores_every_acked_message() {
    let server = TestServer::start().await;
    let (alice, bob) = (server.user("alice").await, server.user("bob").await);
    let (a, _a_events, _) = alice.connect_synced().await;
    let conv = a.open("bob").await.unwrap();
    for i in 0..50 {
        a.send(conv, format!("m{i}")).await.unwrap();
    }

    let restored = tempfile::tempdir().unwrap();
    std::fs::create_dir(restored.path().join("data")).unwrap();
    let file = match server.database_url() {
        Some(_) => restored.path().join("backup.dump"),
        None => restored.path().join("data").join("confab.db"),
    };
    let mut backup = std::process::Command::new(env!("CARGO_BIN_EXE_confab"));
    backup
        .args(["admin", "backup"])
        .arg(&file)
        .arg("--data-dir")
        .arg(server.data_dir());
    if let Some(url) = server.database_url() {
        backup.args(["--database", url]);
    }
    assert!(backup.status().unwrap().success());
    // Sending goes on while and after the copy is taken.
    a.send(conv, "after the backup").await.unwrap();

    let copy = match server.database_url() {
        // pg_dump's file is restored into a new database with pg_restore.
        Some(_) => {
            let url = confab_testpg::Postgres::shared().fresh_database();
            let status = std::process::Command::new("pg_restore")
                .args(["--no-owner", "--dbname", &url])
                .arg(&file)
                .status()
                .unwrap();
            assert!(status.success());
            TestServer::start_in(restored, &["--database", &url]).await
        }
        None => TestServer::start_in(restored, &[]).await,
    };
    let (_b, _b_events, backlog) = bob.relogin_at(&copy.url).await.connect_synced().await;
    let got = messages(&backlog);
    assert_eq!(
        got.len(),
        50,
        "the copy holds what was acked before it was taken"
    );
    assert_eq!(got[49].2, "m49");
}

#[tokio::test]
async fn health_and_metrics_report_the_traffic() {
    let server = TestServer::start().await;
    assert!(server.healthy().await);
    let (alice, bob) = (server.user("alice").await, server.user("bob").await);
    let (a, _a_events, _) = alice.connect_synced().await;
    let (_b, mut b_events, _) = bob.connect_synced().await;
    let conv = a.open("bob").await.unwrap();
    a.send(conv, "counted").await.unwrap();
    expect_event(&mut b_events, "delivery", is_message("counted")).await;

    let metrics = server.metrics().await;
    for line in [
        "confab_connections 2",
        "confab_messages_accepted_total 1",
        "confab_messages_delivered_total 1",
        "confab_send_to_deliver_seconds_count 1",
        "confab_store_commit_seconds_bucket",
    ] {
        assert!(metrics.contains(line), "missing {line:?} in\n{metrics}");
    }
    // SQLite commits in batches; PostgreSQL commits each call alone.
    assert_eq!(
        metrics.contains("confab_store_commit_batch_size_bucket"),
        !on_postgres(),
        "{metrics}"
    );
}

/// SIGTERM with a grace period: the node fails its health check at once
/// (a load balancer takes it out) but goes on serving until the grace
/// ends: alice, connected, still sends, and a new socket still connects.
/// Then it shuts down by itself.
#[tokio::test]
async fn a_draining_node_fails_its_health_check_but_serves_until_the_grace_ends() {
    let mut server = TestServer::start_with(&["--shutdown-grace-ms", "3000"]).await;
    let (alice, bob) = (server.user("alice").await, server.user("bob").await);
    bob.accepts("alice").await;
    let (a, _a_events, _) = alice.connect_synced().await;
    let conv = a.open("bob").await.unwrap();
    assert!(server.healthy().await);

    let started = std::time::Instant::now();
    server.terminate();
    let health = || async {
        raw_http(
            &server.url.authority,
            "GET /healthz HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n",
        )
        .await
    };
    let deadline = tokio::time::Instant::now() + WAIT;
    let answer = loop {
        let answer = health().await;
        if !answer.starts_with("HTTP/1.1 200") {
            break answer;
        }
        assert!(tokio::time::Instant::now() < deadline, "still healthy");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    };
    assert!(
        answer.starts_with("HTTP/1.1 503") && answer.contains("shutting_down"),
        "{answer}"
    );
    a.send(conv, "while draining").await.unwrap();
    let (b, _b_events, backlog) = bob.connect_synced().await;
    assert!(
        backlog.iter().any(is_message("while draining")),
        "a new socket during the grace: {backlog:?}"
    );
    drop(b);
    server.stop().await;
    assert!(
        started.elapsed() >= std::time::Duration::from_millis(2500),
        "it served out its grace"
    );
}

#[tokio::test]
async fn writes_are_committed_in_groups() {
    let server = TestServer::start_with(FAST_SENDERS).await;
    let mut clients = Vec::new();
    for name in ["ann", "ben", "cat", "dan"] {
        let user = server.user(name).await;
        let (client, events, _) = user.connect_synced().await;
        clients.push((std::sync::Arc::new(client), events));
    }
    let conv = clients[0].0.open("ben").await.unwrap();
    let other = clients[2].0.open("dan").await.unwrap();
    let mut sends = Vec::new();
    for (i, (client, _)) in clients.iter().enumerate() {
        let conv = if i < 2 { conv } else { other };
        for k in 0..50 {
            let client = client.clone();
            sends.push(tokio::spawn(async move {
                client.send(conv, format!("m{k}")).await.unwrap()
            }));
        }
    }
    // On PostgreSQL too: this burst once hung a node (store calls nobody
    // polled held the database's connections).
    for send in sends {
        send.await.unwrap();
    }
    if sqlite_only("group commit is the SQLite writer's; PostgreSQL commits each call") {
        return;
    }
    let metrics = server.metrics().await;
    let value =
        |name: &str| metric(&metrics, name).unwrap_or_else(|| panic!("no {name} in\n{metrics}"));
    let (operations, commits) = (
        value("confab_store_commit_batch_size_sum"),
        value("confab_store_commit_batch_size_count"),
    );
    assert!(operations >= 200.0);
    assert!(
        operations / commits > 1.5,
        "200 concurrent sends should share commits: {operations} operations in {commits} commits"
    );
}

#[tokio::test]
async fn tokens_are_not_stored_and_the_open_files_limit_is_raised() {
    let server = TestServer::start().await;
    let alice = server.user("alice").await;
    let token = alice.token().to_string();
    let (a, _events, _) = alice.connect_synced().await;
    a.close().await;
    server.dump_database();
    for file in ["confab.db", "confab.db-wal", "../database.sql"] {
        let bytes = std::fs::read(server.data_dir().join(file)).unwrap_or_default();
        let found = bytes.windows(token.len()).any(|w| w == token.as_bytes());
        assert!(!found, "the raw token is in {file}");
    }
    assert!(!server.log().contains(&token), "the token is in the log");

    let limits = std::fs::read_to_string(format!("/proc/{}/limits", server.pid())).unwrap();
    let open_files = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .unwrap();
    let numbers: Vec<&str> = open_files.split_whitespace().skip(3).take(2).collect();
    assert_eq!(
        numbers[0], numbers[1],
        "soft limit raised to the hard limit: {open_files}"
    );
}

pub fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

/// A regression guard, not the benchmark: idle connections must stay
/// cheap (small WebSocket buffers, nothing allocated per idle socket).
#[tokio::test]
async fn idle_connections_cost_little_server_memory() {
    const CONNECTIONS: usize = 1000;
    // One device holds them all, as a load generator would.
    let server = TestServer::start_with(MANY_SOCKETS).await;
    let alice = server.user("alice").await;
    // Warm up the allocator and the runtime with a first batch.
    let mut clients = Vec::new();
    for _ in 0..300 {
        clients.push(alice.connect_synced().await);
    }
    // Freed memory (the Argon2 buffers of the login) goes back to the OS
    // after a delay; measure once it has.
    tokio::time::sleep(std::time::Duration::from_secs(2)).await;
    let before = rss_kib(server.pid());
    for _ in 0..CONNECTIONS {
        clients.push(alice.connect_synced().await);
    }
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    let after = rss_kib(server.pid());
    let per_connection = after.saturating_sub(before) as f64 / CONNECTIONS as f64;
    println!("server RSS {before} KiB -> {after} KiB");
    println!("server RSS per idle connection: {per_connection:.1} KiB");
    assert!(
        per_connection < 24.0,
        "{per_connection:.1} KiB per idle connection"
    );
    drop(clients);
}

/// `confab bench` in every mode, briefly: it runs, measures something, and
/// its delivery checks find nothing wrong.
#[tokio::test]
async fn the_benchmark_runs_and_checks_its_deliveries() {
    let modes: [&[&str]; 3] = [
        &[
            "throughput",
            "--users",
            "6",
            "--peers",
            "2",
            "--duration",
            "1",
            "--warmup",
            "1",
        ],
        &[
            "latency",
            "--users",
            "6",
            "--peers",
            "2",
            "--duration",
            "1",
            "--warmup",
            "1",
            "--rate",
            "200",
        ],
        &["idle", "--users", "3", "--connections", "60", "--hold", "1"],
    ];
    for args in modes {
        let output = tokio::process::Command::new(env!("CARGO_BIN_EXE_confab"))
            .arg("bench")
            .args(args)
            .arg("--json")
            .output()
            .await
            .unwrap();
        assert!(
            output.status.success(),
            "bench {args:?} failed:\n{}",
            String::from_utf8_lossy(&output.stderr)
        );
        let report: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
        let median = &report["median"];
        for fault in [
            "lost",
            "duplicated",
            "out_of_order",
            "wire_duplicates",
            "gaps",
            "errors",
            "disconnects",
        ] {
            assert_eq!(median["faults"][fault], 0, "{fault} in {args:?}");
        }
        if args[0] == "idle" {
            assert_eq!(median["idle"]["connections"], 60);
        } else {
            assert!(
                median["delivered"].as_u64().unwrap() > 0,
                "{args:?} delivered nothing"
            );
            assert!(median["send_to_deliver"]["p50_ms"].as_f64().unwrap() > 0.0);
        }
    }
}

/// The mode bits of a file, as `ls -l` shows them in octal.
fn mode(path: &std::path::Path) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .permissions()
        .mode()
        & 0o777
}

/// `confab <args>` under umask 022.
fn confab_umask_022(args: &[&str]) -> std::process::Command {
    let mut command = std::process::Command::new("sh");
    command
        .args(["-c", "umask 022 && exec \"$0\" \"$@\""])
        .arg(env!("CARGO_BIN_EXE_confab"))
        .args(args);
    command
}

#[tokio::test]
async fn what_the_server_and_the_cli_write_is_the_owners_alone() {
    // The harness starts the server under umask 022.
    let server = TestServer::start().await;
    let (alice, _bob) = (server.user("alice").await, server.user("bob").await);
    let (a, _a_events, _) = alice.connect_synced().await;
    let conv = a.open("bob").await.unwrap();
    a.send(conv, "on disk now").await.unwrap();
    let data = server.data_dir();
    if on_postgres() && on_s3() {
        // Messages in the database, files in the bucket: nothing here.
        assert!(!data.exists(), "{} made for nothing", data.display());
    } else {
        assert_eq!(mode(&data), 0o700, "data directory");
    }
    if !on_postgres() {
        for file in ["confab.db", "confab.db-wal", "confab.db-shm"] {
            assert_eq!(mode(&data.join(file)), 0o600, "{file}");
        }
    }

    let out = tempfile::tempdir().unwrap();
    let backup = out.path().join("backup.db");
    let mut command = confab_umask_022(&["admin", "backup"]);
    command.arg(&backup).arg("--data-dir").arg(&data);
    if let Some(url) = server.database_url() {
        command.args(["--database", url]);
    }
    assert!(command.status().unwrap().success());
    assert_eq!(mode(&backup), 0o600, "backup");

    // The CLI's directory and files: keys, token, contacts, what it showed.
    let config = out.path().join("carol");
    let server_url = format!("http://{}", server.url.authority);
    for args in [
        &["register", "carol"][..],
        &["login", "carol"],
        &["send", "alice", "hello"],
    ] {
        let status = confab_umask_022(args)
            .env("CONFAB_SERVER", &server_url)
            .env("CONFAB_CONFIG_DIR", &config)
            .env("CONFAB_PASSWORD", PASSWORD)
            .status()
            .unwrap();
        assert!(status.success(), "confab {args:?}");
    }
    assert_eq!(mode(&config), 0o700, "config directory");
    let files: Vec<_> = std::fs::read_dir(&config)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert!(
        files.iter().any(|f| f.ends_with("contacts.json")),
        "{files:?}"
    );
    for file in files {
        assert_eq!(mode(&file), 0o600, "{}", file.display());
    }
}
