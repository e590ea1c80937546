//! Files in S3-compatible storage that several nodes share: whatever node
//! an upload, a resume, a download or a deletion goes through, it is the
//! same file. Every node here is on PostgreSQL with a bucket of this
//! test's own on a private s3s-fs (confab-tests3).

use std::time::Duration;

use bytes::Bytes;
use confab_client::blobs;
use confab_testpg::Postgres;
use confab_tests3::S3;

use crate::files::{partial_patch, random_bytes, settled_offset, status};
use crate::harness::*;

/// Two nodes on one database and one bucket, with `more` flags.
async fn two_nodes(s3: &S3, bucket: &str, more: &[&str]) -> (TestServer, TestServer) {
    let url = Postgres::shared().fresh_database();
    let mut flags: Vec<String> = vec!["--database".into(), url];
    flags.extend(s3_flags(s3, bucket));
    flags.extend(more.iter().map(|s| s.to_string()));
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    (
        TestServer::start_with(&flags).await,
        TestServer::start_with(&flags).await,
    )
}

/// The blob id in an upload path `/v1/blobs/{id}`.
fn blob_id(path: &str) -> &str {
    path.strip_prefix("/v1/blobs/").expect("an upload path")
}

/// The bucket's objects of blob `id` (its parts).
fn parts_of(s3: &S3, bucket: &str, id: &str) -> Vec<String> {
    s3.objects(bucket)
        .into_iter()
        .filter(|key| key.starts_with(&format!("{id}/")))
        .collect()
}

/// No node kept a file of its own on disk.
fn no_local_blobs(nodes: &[&TestServer]) {
    for node in nodes {
        let dir = node.data_dir().join("blobs");
        let files = std::fs::read_dir(&dir).map(|d| d.count()).unwrap_or(0);
        assert_eq!(files, 0, "{} holds blobs", dir.display());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_file_uploaded_through_one_node_downloads_through_another_whole_and_by_range() {
    let s3 = S3::shared();
    let bucket = s3.bucket();
    let (one, two) = two_nodes(s3, &bucket, &[]).await;
    let alice = one.user("alice").await;
    // More than one part (4 MiB each), with a last one that is short.
    let data = random_bytes(9 * 1024 * 1024 + 123);
    let path = blobs::create(&one.url, alice.token(), data.len() as u64)
        .await
        .unwrap();
    let done = blobs::append(&one.url, alice.token(), &path, 0, Bytes::from(data.clone()))
        .await
        .unwrap();
    assert_eq!(done, data.len() as u64);
    assert_eq!(parts_of(s3, &bucket, blob_id(&path)).len(), 3);

    let whole = blobs::download(&two.url, alice.token(), &path, None)
        .await
        .unwrap();
    assert!(
        whole == data,
        "the file read through the other node differs"
    );
    let edge = 4 * 1024 * 1024;
    for range in [
        0..1,
        edge - 10..edge + 10,
        5_000_000..9_000_000,
        9 * 1024 * 1024..data.len(),
    ] {
        let got = blobs::download(
            &two.url,
            alice.token(),
            &path,
            Some(range.start as u64..range.end as u64),
        )
        .await
        .unwrap();
        assert!(got == data[range.clone()], "range {range:?} differs");
    }
    no_local_blobs(&[&one, &two]);
    one.assert_no_panics();
    two.assert_no_panics();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upload_cut_on_one_node_or_killed_with_it_resumes_on_another() {
    let s3 = S3::shared();
    let bucket = s3.bucket();
    let (mut one, two) = two_nodes(s3, &bucket, &[]).await;
    let alice = one.user("alice").await;
    let data = random_bytes(16 * 1024 * 1024);
    let path = blobs::create(&one.url, alice.token(), data.len() as u64)
        .await
        .unwrap();

    // The connection to the first node drops at about 60%.
    let cut = data.len() * 6 / 10;
    drop(partial_patch(&one, alice.token(), &path, 0, data.len(), &data[..cut]).await);
    let offset = settled_offset(&two, alice.token(), &path).await as usize;
    assert_eq!(offset, cut, "the other node sees what arrived");

    // A PATCH to the first node, which is killed with -9 halfway through
    // it, after one whole part (4 MiB) and with one more MiB in memory:
    // the other node goes on from the part the killed one recorded.
    let sent = offset + 5 * 1024 * 1024;
    let tcp = partial_patch(
        &one,
        alice.token(),
        &path,
        offset,
        data.len() - offset,
        &data[offset..sent],
    )
    .await;
    let recorded = settled_offset(&two, alice.token(), &path).await as usize;
    assert_eq!(recorded, offset + 4 * 1024 * 1024);
    one.kill9().await;
    drop(tcp);
    let offset = blobs::offset(&two.url, alice.token(), &path)
        .await
        .unwrap()
        .offset as usize;
    assert_eq!(
        offset, recorded,
        "the killed node's last part counts, its memory does not"
    );
    let rest = Bytes::copy_from_slice(&data[offset..]);
    let done = blobs::append(&two.url, alice.token(), &path, offset as u64, rest)
        .await
        .unwrap();
    assert_eq!(done, data.len() as u64);

    one.restart().await;
    let got = blobs::download(&one.url, alice.token(), &path, None)
        .await
        .unwrap();
    assert!(got == data, "the upload resumed across nodes differs");
    no_local_blobs(&[&one, &two]);
    two.assert_no_panics();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_file_deleted_or_expired_through_either_node_leaves_nothing_in_the_bucket() {
    let s3 = S3::shared();
    let bucket = s3.bucket();
    let (one, two) = two_nodes(
        s3,
        &bucket,
        &["--upload-expiry-secs", "2", "--blob-sweep-secs", "1"],
    )
    .await;
    let alice = one.user("alice").await;

    // Deleted through the other node.
    let data = random_bytes(5 * 1024 * 1024);
    let path = blobs::create(&one.url, alice.token(), data.len() as u64)
        .await
        .unwrap();
    blobs::append(&one.url, alice.token(), &path, 0, Bytes::from(data))
        .await
        .unwrap();
    assert_eq!(parts_of(s3, &bucket, blob_id(&path)).len(), 2);
    blobs::delete(&two.url, alice.token(), &path).await.unwrap();
    assert_eq!(parts_of(s3, &bucket, blob_id(&path)), Vec::<String>::new());
    assert_eq!(
        status(blobs::download(&one.url, alice.token(), &path, None).await).0,
        404
    );

    // An upload left unfinished expires, whichever node sweeps it.
    let path = blobs::create(&two.url, alice.token(), 1 << 20)
        .await
        .unwrap();
    blobs::append(
        &two.url,
        alice.token(),
        &path,
        0,
        Bytes::from(random_bytes(1000)),
    )
    .await
    .unwrap();
    assert_eq!(parts_of(s3, &bucket, blob_id(&path)).len(), 1);
    let deadline = tokio::time::Instant::now() + WAIT;
    while !parts_of(s3, &bucket, blob_id(&path)).is_empty() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the expired upload is still stored"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(s3.objects(&bucket).is_empty(), "{:?}", s3.objects(&bucket));
    one.assert_no_panics();
    two.assert_no_panics();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn while_the_object_store_is_down_uploads_get_storage_unavailable_and_resume_once_it_is_back()
{
    let s3 = S3::start();
    let bucket = s3.bucket();
    let (one, _two) = two_nodes(&s3, &bucket, &[]).await;
    let alice = one.user("alice").await;
    let data = random_bytes(6 * 1024 * 1024);
    let path = blobs::create(&one.url, alice.token(), data.len() as u64)
        .await
        .unwrap();
    let first = 4 * 1024 * 1024;
    blobs::append(
        &one.url,
        alice.token(),
        &path,
        0,
        Bytes::copy_from_slice(&data[..first]),
    )
    .await
    .unwrap();

    s3.kill();
    let refused = blobs::append(
        &one.url,
        alice.token(),
        &path,
        first as u64,
        Bytes::copy_from_slice(&data[first..]),
    )
    .await;
    assert_eq!(status(refused), (503, "storage_unavailable".to_string()));
    let refused = blobs::download(&one.url, alice.token(), &path, Some(0..10)).await;
    assert!(
        refused.is_err(),
        "a download while the bucket is away: {refused:?}"
    );
    assert!(one.healthy().await, "the node itself stays up");

    s3.start_again();
    let offset = blobs::offset(&one.url, alice.token(), &path)
        .await
        .unwrap()
        .offset;
    assert_eq!(offset, first as u64, "nothing half-stored counts");
    blobs::append(
        &one.url,
        alice.token(),
        &path,
        offset,
        Bytes::copy_from_slice(&data[first..]),
    )
    .await
    .unwrap();
    let got = blobs::download(&one.url, alice.token(), &path, None)
        .await
        .unwrap();
    assert!(got == data);
    one.assert_no_panics();
}

#[tokio::test]
async fn a_node_with_wrong_keys_or_an_unreachable_bucket_does_not_start() {
    let s3 = S3::shared();
    let bucket = s3.bucket();
    let url = Postgres::shared().fresh_database();
    let dir = tempfile::tempdir().unwrap();
    let serve = |blobs: &str, secret: &str| {
        let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_confab"))
            .args(["serve", "--listen", "127.0.0.1:0", "--database", &url])
            .arg("--data-dir")
            .arg(dir.path())
            .args(["--blobs", blobs])
            .env("CONFAB_BLOBS_ACCESS_KEY_ID", confab_tests3::ACCESS_KEY)
            .env("CONFAB_BLOBS_SECRET_ACCESS_KEY", secret)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        // A node that starts after all would run until killed.
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        while child.try_wait().unwrap().is_none() {
            if std::time::Instant::now() > deadline {
                let _ = child.kill();
                panic!("confab serve --blobs {blobs} started");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        child.wait_with_output().unwrap()
    };
    // Keys from the environment, as an operator should pass them.
    let wrong = serve(&s3.blobs_url(&bucket), "not-the-secret");
    assert!(!wrong.status.success());
    let said = String::from_utf8_lossy(&wrong.stderr);
    assert!(said.contains(&format!("the bucket {bucket}")), "{said}");
    assert!(
        !said.contains("not-the-secret"),
        "the secret is printed: {said}"
    );
    // Nothing listens there (s3s-fs makes a missing bucket on the first
    // PUT, so that case is not one it can show).
    let nowhere = format!(
        "s3://{bucket}?endpoint=http://127.0.0.1:{}&allow_http=true",
        confab_testprocs::free_port(&[])
    );
    let unreachable = serve(&nowhere, confab_tests3::SECRET_KEY);
    assert!(!unreachable.status.success());
    let said = String::from_utf8_lossy(&unreachable.stderr);
    assert!(said.contains(&format!("the bucket {bucket}")), "{said}");
}

/// Alice may write one upload at a time, on all nodes together: while one
/// stalls half-sent on the first node, the second refuses her another;
/// once it ends, the second takes it. A node killed with -9 in the middle
/// of one leaks nothing: its count stops counting with its heartbeat.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_users_uploads_in_flight_count_on_all_nodes_together() {
    let s3 = S3::shared();
    let bucket = s3.bucket();
    let redis = confab_testredis::Redis::start();
    let redis_url = redis.url();
    let (mut one, two) = two_nodes(
        s3,
        &bucket,
        &[
            "--redis",
            &redis_url,
            "--presence-ttl-ms",
            "1500",
            "--uploads-per-user",
            "1",
        ],
    )
    .await;
    let alice = one.user("alice").await;
    let token = alice.token().to_string();
    let blob = || blobs::create(&one.url, &token, 1 << 20);
    let (first, second, third) = (
        blob().await.unwrap(),
        blob().await.unwrap(),
        blob().await.unwrap(),
    );
    let append = |path: String| {
        let (url, token) = (two.url.clone(), token.clone());
        async move { blobs::append(&url, &token, &path, 0, Bytes::from_static(b"x")).await }
    };

    let stalled = partial_patch(&one, &token, &first, 0, 1 << 20, &[7; 1000]).await;
    assert_eq!(
        status(append(second.clone()).await),
        (429, "rate_limited".to_string()),
        "a second upload at once, through the other node"
    );
    drop(stalled);
    assert_eq!(settled_offset(&one, &token, &first).await, 1000);
    eventually("the ended upload is given back", || async {
        append(second.clone()).await.is_ok()
    })
    .await;

    let _stalled = partial_patch(&one, &token, &first, 1000, (1 << 20) - 1000, &[7; 1000]).await;
    assert_eq!(status(append(third.clone()).await).0, 429);
    one.kill9().await;
    eventually("the killed node's upload stops counting", || async {
        append(third.clone()).await.is_ok()
    })
    .await;
    two.assert_no_panics();
}

/// Polls `ok` every 100 ms for up to 10 s.
async fn eventually<F, Fut>(what: &str, ok: F)
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !ok().await {
        assert!(std::time::Instant::now() < deadline, "{what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
