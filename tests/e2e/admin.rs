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
    let file = restored.path().join("data").join("confab.db");
    let status = std::process::Command::new(env!("CARGO_BIN_EXE_confab"))
        .args(["admin", "backup"])
        .arg(&file)
        .arg("--data-dir")
        .arg(server.data_dir())
        .status()
        .unwrap();
    assert!(status.success());
    // Sending goes on while and after the copy is taken.
    a.send(conv, "after the backup").await.unwrap();

    let copy = TestServer::start_in(restored, &[]).await;
    let (_b, _b_events, backlog) = copy
        .login("bob", Some(bob.login.device))
        .await
        .connect_synced()
        .await;
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

    let metrics = raw_http(
        &server.url.authority,
        "GET /metrics HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n",
    )
    .await;
    for line in [
        "confab_connections 2",
        "confab_messages_accepted_total 1",
        "confab_messages_delivered_total 1",
        "confab_send_to_deliver_seconds_count 1",
        "confab_store_commit_batch_size_bucket",
        "confab_store_commit_seconds_bucket",
    ] {
        assert!(metrics.contains(line), "missing {line:?} in\n{metrics}");
    }
}
