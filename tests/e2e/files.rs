//! Files: uploads with tus 1.0 (a standard client, tuspy, and the client
//! library), resumed after a cut connection and a killed server, downloads
//! whole and by range, and the rules: the same 404 for everything that is
//! not the caller's, size limit, quota, termination.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use bytes::Bytes;
use confab_client::ClientError;
use confab_client::blobs;
use rand::RngCore;
use tokio::io::AsyncWriteExt;

use crate::harness::*;

#[path = "../../scripts/interop/venv.rs"]
mod venv;

pub(crate) fn random_bytes(len: usize) -> Vec<u8> {
    let mut data = vec![0; len];
    rand::rng().fill_bytes(&mut data);
    data
}

/// An HTTP error's status, code and message.
fn answer(result: Result<impl std::fmt::Debug, ClientError>) -> (u16, String, String) {
    match result {
        Err(ClientError::Api { status, error }) => (status, error.code.to_string(), error.message),
        other => panic!("expected an HTTP error, got {other:?}"),
    }
}

pub(crate) fn status(result: Result<impl std::fmt::Debug, ClientError>) -> (u16, String) {
    let (status, code, _) = answer(result);
    (status, code)
}

/// What every blob that is not the caller's gets, word for word.
fn no_such_blob() -> (u16, String, String) {
    (404, "not_found".into(), "no such blob".into())
}

/// Uploads `data` with tuspy in chunks of `chunk` bytes; the upload's path.
fn tuspy_upload(server: &TestServer, token: &str, data: &[u8], chunk: usize) -> String {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let python = venv::venv_python(root);
    let file = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(file.path(), data).unwrap();
    let out = Command::new(python)
        .arg(root.join("scripts/interop/tus_upload.py"))
        .arg(server.url.http(""))
        .arg(token)
        .arg(file.path())
        .arg(chunk.to_string())
        .output()
        .expect("run tus_upload.py");
    assert!(
        out.status.success(),
        "tuspy failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let url = String::from_utf8(out.stdout).unwrap();
    let path = url.trim().strip_prefix(&server.url.http("")).unwrap();
    path.to_string()
}

#[tokio::test]
async fn tuspy_uploads_a_file_and_its_owner_downloads_it_whole_and_by_range() {
    let server = TestServer::start().await;
    let alice = server.user("alice").await;
    // Three 4 MiB parts and a bit; tuspy's 3 MiB chunks do not line up with them.
    let data = random_bytes(12 * 1024 * 1024 + 123);
    let path = tuspy_upload(&server, alice.token(), &data, 3 * 1024 * 1024);

    let state = blobs::offset(&server.url, alice.token(), &path)
        .await
        .unwrap();
    assert_eq!(
        (state.offset, state.length),
        (data.len() as u64, data.len() as u64)
    );
    let whole = blobs::download(&server.url, alice.token(), &path, None)
        .await
        .unwrap();
    assert!(whole == data, "the download differs from the upload");
    let part = 4 * 1024 * 1024u64;
    let len = data.len() as u64;
    for range in [
        0..1,
        part - 1..part + 1,
        2 * part - 5..3 * part + 5,
        len - 10..len,
    ] {
        let got = blobs::download(&server.url, alice.token(), &path, Some(range.clone()))
            .await
            .unwrap();
        assert!(
            got == data[range.start as usize..range.end as usize],
            "range {range:?}"
        );
    }
    server.assert_no_panics();
}

#[tokio::test]
async fn a_blob_is_the_same_404_to_everyone_but_its_owner() {
    let server = TestServer::start().await;
    let (alice, bob) = (server.user("alice").await, server.user("bob").await);
    let path = blobs::create(&server.url, alice.token(), 5).await.unwrap();
    blobs::append(
        &server.url,
        alice.token(),
        &path,
        0,
        Bytes::from_static(b"hello"),
    )
    .await
    .unwrap();

    let not_found = no_such_blob();
    let url = &server.url;
    let token = bob.token();
    assert_eq!(
        answer(blobs::download(url, token, &path, None).await),
        not_found
    );
    assert_eq!(status(blobs::offset(url, token, &path).await).0, 404);
    assert_eq!(
        answer(blobs::append(url, token, &path, 5, Bytes::from_static(b"!")).await),
        not_found
    );
    assert_eq!(answer(blobs::delete(url, token, &path).await), not_found);
    // Guessed ids and paths that try to leave the blob store: the same.
    for guess in [
        "/v1/blobs/AAAAAAAAAAAAAAAAAAAAAA",
        "/v1/blobs/..%2F..%2Fconfab.db",
        "/v1/blobs/%2E%2E/confab.db",
        "/v1/blobs/x/../../confab.db",
        "/v1/blobs/confab.db",
    ] {
        assert_eq!(
            answer(blobs::download(url, alice.token(), guess, None).await),
            not_found,
            "{guess}"
        );
    }
    // Still the owner's, unharmed.
    let got = blobs::download(url, alice.token(), &path, None)
        .await
        .unwrap();
    assert_eq!(&got[..], b"hello");
    server.assert_no_panics();
}

/// A PATCH that declares `length` bytes from `offset` and has sent only
/// `sent` of them: the open connection, for the caller to keep or drop.
pub(crate) async fn partial_patch(
    server: &TestServer,
    token: &str,
    path: &str,
    offset: usize,
    length: usize,
    sent: &[u8],
) -> tokio::net::TcpStream {
    let mut tcp = tokio::net::TcpStream::connect(&server.url.authority)
        .await
        .unwrap();
    let head = format!(
        "PATCH {path} HTTP/1.1\r\nHost: {}\r\nAuthorization: Bearer {token}\r\nTus-Resumable: 1.0.0\r\n\
         Content-Type: application/offset+octet-stream\r\nUpload-Offset: {offset}\r\nContent-Length: {length}\r\n\r\n",
        server.url.authority,
    );
    tcp.write_all(head.as_bytes()).await.unwrap();
    tcp.write_all(sent).await.unwrap();
    tcp.flush().await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    tcp
}

/// The upload's offset once it stops moving.
pub(crate) async fn settled_offset(server: &TestServer, token: &str, path: &str) -> u64 {
    let mut last = u64::MAX;
    loop {
        tokio::time::sleep(Duration::from_millis(200)).await;
        let now = blobs::offset(&server.url, token, path)
            .await
            .unwrap()
            .offset;
        if now == last {
            return now;
        }
        last = now;
    }
}

#[tokio::test]
async fn an_upload_cut_off_or_interrupted_by_a_killed_server_resumes_where_it_stopped() {
    let mut server = TestServer::start().await;
    let alice = server.user("alice").await;
    let data = random_bytes(10 * 1024 * 1024);
    let path = blobs::create(&server.url, alice.token(), data.len() as u64)
        .await
        .unwrap();

    // The connection drops at about 60%: what arrived is kept.
    let cut = data.len() * 6 / 10;
    let tcp = partial_patch(&server, alice.token(), &path, 0, data.len(), &data[..cut]).await;
    drop(tcp);
    let offset = settled_offset(&server, alice.token(), &path).await as usize;
    assert_eq!(offset, cut, "the server keeps exactly what arrived");
    // Resuming from anywhere else is refused.
    let wrong = blobs::append(
        &server.url,
        alice.token(),
        &path,
        0,
        Bytes::from_static(b"x"),
    )
    .await;
    assert_eq!(status(wrong), (409, "bad_upload".to_string()));

    // Part of the rest, then the server is killed and started again.
    let next = offset + 3 * 1024 * 1024;
    let sent = Bytes::copy_from_slice(&data[offset..next]);
    blobs::append(&server.url, alice.token(), &path, offset as u64, sent)
        .await
        .unwrap();
    server.kill9().await;
    server.restart().await;
    let offset = blobs::offset(&server.url, alice.token(), &path)
        .await
        .unwrap()
        .offset as usize;
    assert_eq!(offset, next, "the offset survives a kill -9");
    let rest = Bytes::copy_from_slice(&data[offset..]);
    let done = blobs::append(&server.url, alice.token(), &path, offset as u64, rest)
        .await
        .unwrap();
    assert_eq!(done, data.len() as u64);

    let got = blobs::download(&server.url, alice.token(), &path, None)
        .await
        .unwrap();
    assert!(got == data, "the resumed upload differs");
    server.assert_no_panics();
}

#[tokio::test]
async fn file_size_and_quota_are_refused_before_the_bytes_and_deleting_frees_the_quota() {
    let server = TestServer::start_with(&["--max-file-mib", "1", "--file-quota-mib", "2"]).await;
    let alice = server.user("alice").await;
    let (url, token) = (&server.url, alice.token());
    let too_big = blobs::create(url, token, 1024 * 1024 + 1).await;
    assert_eq!(status(too_big), (413, "too_large".to_string()));

    let kib = 1024u64;
    let first = blobs::create(url, token, 900 * kib).await.unwrap();
    let _second = blobs::create(url, token, 900 * kib).await.unwrap();
    let over = blobs::create(url, token, 900 * kib).await;
    assert_eq!(status(over), (413, "quota_exceeded".to_string()));

    // An upload past its declared length keeps what fits and is refused.
    let long = Bytes::from(random_bytes(900 * 1024 + 10));
    let refused = blobs::append(url, token, &first, 0, long).await;
    assert_eq!(status(refused), (413, "bad_upload".to_string()));
    assert_eq!(
        blobs::offset(url, token, &first).await.unwrap().offset,
        900 * kib
    );

    // Terminated: gone, and its room in the quota is back.
    blobs::delete(url, token, &first).await.unwrap();
    assert_eq!(
        status(blobs::download(url, token, &first, None).await).0,
        404
    );
    blobs::create(url, token, 900 * kib).await.unwrap();
    server.assert_no_panics();
}

/// Uploads `data` in one request with the client library; the upload's path.
async fn upload(server: &TestServer, token: &str, data: &[u8]) -> String {
    let path = blobs::create(&server.url, token, data.len() as u64)
        .await
        .unwrap();
    let chunk = Bytes::copy_from_slice(data);
    blobs::append(&server.url, token, &path, 0, chunk)
        .await
        .unwrap();
    path
}

#[tokio::test]
async fn a_sent_file_downloads_for_the_conversation_and_nobody_else() {
    use confab_client::new_message_id;
    use confab_protocol::ErrorCode;
    let server = TestServer::start().await;
    let (alice, bob, carol) = (
        server.user("alice").await,
        server.user("bob").await,
        server.user("carol").await,
    );
    bob.accepts("alice").await;
    let (a, _a_events, _) = alice.connect_synced().await;
    let (b, mut b_events, _) = bob.connect_synced().await;
    let conv = a.open("bob").await.unwrap();
    let url = &server.url;
    let data = random_bytes(100_000);
    let path = upload(&server, alice.token(), &data).await;
    let id = path.strip_prefix("/v1/blobs/").unwrap().to_string();
    let not_found = no_such_blob();
    assert_eq!(
        answer(blobs::download(url, bob.token(), &path, None).await),
        not_found,
        "before any message refers to it"
    );

    a.send_with_blobs(conv, new_message_id(), "a file", vec![id.clone()])
        .await
        .unwrap();
    expect_event(&mut b_events, "bob gets the message", is_message("a file")).await;
    let got = blobs::download(url, bob.token(), &path, None)
        .await
        .unwrap();
    assert!(got == data, "bob's download differs");
    assert_eq!(
        answer(blobs::download(url, carol.token(), &path, None).await),
        not_found
    );
    // Reading is all bob may do with it.
    assert_eq!(
        answer(blobs::delete(url, bob.token(), &path).await),
        not_found
    );

    // A message may list only complete uploads of its sender's: the same
    // refusal for someone else's, an unfinished one, a guess and a non-id.
    let unfinished = blobs::create(url, alice.token(), 10).await.unwrap();
    let unfinished = unfinished.strip_prefix("/v1/blobs/").unwrap().to_string();
    let attempts = [
        (&b, id.clone()),
        (&a, unfinished),
        (&a, "AAAAAAAAAAAAAAAAAAAAAA".to_string()),
        (&a, "../confab.db".to_string()),
    ];
    for (client, blob) in attempts {
        let refused = client
            .send_with_blobs(conv, new_message_id(), "not mine", vec![blob.clone()])
            .await;
        let Err(ClientError::Server(error)) = refused else {
            panic!("a send listing {blob} was not refused: {refused:?}");
        };
        assert_eq!(error.code, ErrorCode::UnknownBlob, "{blob}");
    }
    server.assert_no_panics();
}

#[tokio::test]
async fn a_file_encrypted_here_downloads_and_opens_with_another_age_implementation() {
    use confab_client::files::{FileKey, encrypt};
    let server = TestServer::start().await;
    let alice = server.user("alice").await;
    let data = random_bytes(300_000);
    let key = FileKey::generate();
    let mut encrypted = Vec::new();
    encrypt(&key, &data[..], &mut encrypted).unwrap();
    let path = upload(&server, alice.token(), &encrypted).await;
    let downloaded = blobs::download(&server.url, alice.token(), &path, None)
        .await
        .unwrap();

    let dir = tempfile::tempdir().unwrap();
    let (blob, opened) = (dir.path().join("blob.age"), dir.path().join("opened"));
    std::fs::write(&blob, &downloaded).unwrap();
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    venv::run(
        Command::new(venv::venv_python(root))
            .arg(root.join("scripts/interop/age_decrypt.py"))
            .arg(key.to_secret_string())
            .arg(&blob)
            .arg(&opened),
        "pyrage decrypting the downloaded blob",
    );
    assert!(
        std::fs::read(&opened).unwrap() == data,
        "pyrage opened something else"
    );
    server.assert_no_panics();
}

#[tokio::test]
async fn alice_sends_a_picture_and_bob_sees_its_thumbnail_and_downloads_the_same_bytes() {
    use confab_client::e2e::Received;
    use confab_client::files::{download_file, upload_file};
    use confab_client::{Event, new_message_id};
    let server = TestServer::start().await;
    let (alice, bob) = (server.user("alice").await, server.user("bob").await);
    bob.accepts("alice").await;
    let (a, _a_events, _) = alice.connect_synced().await;
    let (b, mut b_events, _) = bob.connect_synced().await;
    let conv = a.open("bob").await.unwrap();

    let dir = tempfile::tempdir().unwrap();
    let picture = dir.path().join("sunset.png");
    image::RgbImage::from_fn(300, 200, |x, y| image::Rgb([x as u8, y as u8, 128]))
        .save(&picture)
        .unwrap();
    let spool = dir.path().join("sunset.png.age");
    let file = upload_file(&server.url, alice.token(), &picture, &spool)
        .await
        .unwrap();
    a.send_file(conv, new_message_id(), "look", file)
        .await
        .unwrap();

    let got = expect_event(&mut b_events, "bob gets the file", |e| {
        matches!(e, Event::File(_))
    })
    .await;
    let Event::File(message) = got else {
        unreachable!()
    };
    let file = &message.file;
    assert_eq!(message.message.body, "look");
    assert_eq!(
        (file.name.as_str(), file.media_type.as_str()),
        ("sunset.png", "image/png")
    );
    assert_eq!(file.size, std::fs::metadata(&picture).unwrap().len());
    assert!(file.thumbnail.is_some(), "a picture comes with a thumbnail");
    let target = dir.path().join("downloaded.png");
    let partial = dir.path().join("downloaded.png.part");
    download_file(
        &server.url,
        bob.token(),
        file,
        &partial,
        &target,
        &mut |_, _| {},
    )
    .await
    .unwrap();
    assert!(
        !partial.exists(),
        "the encrypted bytes are removed once opened"
    );
    assert_eq!(
        std::fs::read(&target).unwrap(),
        std::fs::read(&picture).unwrap()
    );

    // History shows it as a file too.
    let history = b.history(conv, None, 10).await.unwrap();
    assert!(matches!(&history[..], [Received::File(f)] if f.file == *file));
    server.assert_no_panics();
}

/// Upload bytes the server has stored so far (the counter appears with the first).
async fn blob_bytes_received(server: &TestServer) -> u64 {
    metric(&server.metrics().await, "confab_blob_bytes_received_total").unwrap_or(0.0) as u64
}

async fn blob_bytes_sent(server: &TestServer) -> u64 {
    metric(&server.metrics().await, "confab_blob_bytes_sent_total").unwrap_or(0.0) as u64
}

/// `confab send-file` killed with -9 at about 60%, run again: it sends only
/// the rest; `confab download` saves the same bytes under the file's own
/// name, and never overwrites without `--force`.
#[tokio::test]
async fn the_cli_sends_a_file_resumes_after_being_killed_and_the_peer_downloads_it() {
    use crate::cli::json;
    let server = TestServer::start().await;
    // Alice's link stalls at 60%, so that the kill lands there.
    let relay = CutRelay::start(&server.url.authority).await;
    let dirs = tempfile::tempdir().unwrap();
    let (alice, bob) = (dirs.path().join("alice"), dirs.path().join("bob"));
    for args in [["register", "alice"], ["login", "alice"]] {
        assert!(run_via(&relay, &alice, &args).await.status.success());
    }
    // Bob's link too, for his download.
    let bob_relay = CutRelay::start(&server.url.authority).await;
    for args in [["register", "bob"], ["login", "bob"]] {
        assert!(run_via(&bob_relay, &bob, &args).await.status.success());
    }
    run_via(&bob_relay, &bob, &["send", "alice", "send me the report"]).await;
    let source = dirs.path().join("report.bin");
    let data = random_bytes(10 * 1024 * 1024 + 7);
    std::fs::write(&source, &data).unwrap();
    let source = source.to_str().unwrap();
    let encrypted = encrypted_len(data.len() as u64);

    relay.stall_after(encrypted * 6 / 10);
    let mut sending = crate::cli::cli_at(&relay.authority, &alice)
        .args(["send-file", "bob", source])
        .spawn()
        .unwrap();
    relay.tripped().await;
    sending.start_kill().unwrap();
    let killed = sending.wait().await.unwrap();
    assert_eq!(killed.code(), None, "killed by a signal");
    relay.mend();
    // The server keeps what arrived once it sees the connection end.
    let deadline = tokio::time::Instant::now() + WAIT;
    let first = loop {
        let received = blob_bytes_received(&server).await;
        if received >= encrypted / 2 || tokio::time::Instant::now() > deadline {
            break received;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(
        first >= encrypted / 2,
        "the first run uploaded {first} bytes"
    );
    let sent = run_via(&relay, &alice, &["send-file", "bob", source, "--json"]).await;
    assert!(sent.status.success());
    let sent = json(&sent);
    assert_eq!(
        (sent["name"].as_str(), sent["size"].as_u64()),
        (Some("report.bin"), Some(data.len() as u64))
    );
    let total = blob_bytes_received(&server).await;
    assert!(
        total < encrypted + 1024,
        "{total} bytes received: the rerun uploaded it again"
    );
    let uploads = alice.join("uploads");
    let left: Vec<_> = std::fs::read_dir(&uploads)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .filter(|n| n != ".keep")
        .collect();
    assert!(left.is_empty(), "spool left behind: {left:?}");

    let history = run_via(&bob_relay, &bob, &["history", "alice"]).await;
    let shown = String::from_utf8_lossy(&history.stdout);
    assert!(
        shown.contains("[file: report.bin (application/octet-stream, 10485767 bytes)]"),
        "{shown}"
    );
    let seq = sent["seq"].as_i64().unwrap().to_string();
    let into = dirs.path().join("downloads");
    std::fs::create_dir(&into).unwrap();
    let into = into.to_str().unwrap();
    // Killed at about 60% of the download, run again: it goes on from the
    // encrypted bytes it kept.
    bob_relay.stall_after(encrypted * 6 / 10);
    let mut fetching = crate::cli::cli_at(&bob_relay.authority, &bob)
        .args(["download", "alice", &seq, into])
        .spawn()
        .unwrap();
    bob_relay.tripped().await;
    fetching.start_kill().unwrap();
    fetching.wait().await.unwrap();
    bob_relay.mend();
    let kept: u64 = std::fs::read_dir(into)
        .unwrap()
        .map(|e| e.unwrap())
        .filter(|e| e.file_name().to_string_lossy().ends_with(".confab-part"))
        .map(|e| e.metadata().unwrap().len())
        .sum();
    assert!(kept >= 4 * 1024 * 1024, "{kept} encrypted bytes kept");
    let served = blob_bytes_sent(&server).await;
    let got = run_via(&bob_relay, &bob, &["download", "alice", &seq, into]).await;
    assert!(got.status.success());
    let rest = blob_bytes_sent(&server).await - served;
    // Give or take what the server read for the killed request after the
    // count was taken.
    assert!(
        rest <= encrypted - kept + 1024 * 1024,
        "{rest} bytes served again for {encrypted}, {kept} kept"
    );
    let saved = Path::new(into).join("report.bin");
    assert!(
        std::fs::read(&saved).unwrap() == data,
        "the download differs"
    );
    let again = run_via(&bob_relay, &bob, &["download", "alice", &seq, into]).await;
    assert!(!again.status.success(), "never overwrites without --force");
    let forced = run_via(
        &bob_relay,
        &bob,
        &["download", "alice", &seq, into, "--force"],
    )
    .await;
    assert!(forced.status.success());
    let text_message = run_via(&bob_relay, &bob, &["download", "alice", "1", into]).await;
    assert!(!text_message.status.success(), "message 1 carries no file");
    server.assert_no_panics();
}

/// A 200 MiB file through the server (the 2 GiB case works the same
/// way, with `CONFAB_BIG_FILE_MIB=2048`; it is too slow for CI): the server
/// streams it in parts, so its memory stays near idle throughout.
#[tokio::test]
async fn a_large_file_goes_up_and_down_in_bounded_server_memory() {
    let mib: u64 = std::env::var("CONFAB_BIG_FILE_MIB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(200);
    let server =
        TestServer::start_with(&["--max-file-mib", "4096", "--file-quota-mib", "8192"]).await;
    let alice = server.user("alice").await;
    let (url, token) = (&server.url, alice.token());
    let length = mib << 20;
    let chunk = 4u64 << 20;
    // One random chunk, varied by its index, stands for the file: the test
    // process does not hold 200 MiB either.
    let base = random_bytes(chunk as usize);
    let piece = |i: u64| {
        let mut p = base.clone();
        p[..8].copy_from_slice(&i.to_le_bytes());
        Bytes::from(p)
    };
    let path = blobs::create(url, token, length).await.unwrap();
    let idle = crate::admin::rss_kib(server.pid());
    let mut peak = idle;
    for i in 0..length / chunk {
        blobs::append(url, token, &path, i * chunk, piece(i))
            .await
            .unwrap();
        peak = peak.max(crate::admin::rss_kib(server.pid()));
    }
    for i in 0..length / chunk {
        let range = i * chunk..(i + 1) * chunk;
        let got = blobs::download(url, token, &path, Some(range))
            .await
            .unwrap();
        assert!(got == piece(i), "chunk {i} differs");
        peak = peak.max(crate::admin::rss_kib(server.pid()));
    }
    println!("server RSS {idle} KiB idle, {peak} KiB at most while {mib} MiB went up and down");
    assert!(
        peak < idle + 40 * 1024,
        "server RSS grew from {idle} to {peak} KiB"
    );
    server.assert_no_panics();
}

/// Each upload request holds up to one part in memory: a user may have only
/// a few at once (`--uploads-per-user`), and they are charged to the memory
/// budget.
#[tokio::test]
async fn a_user_has_only_so_many_uploads_in_flight() {
    let server = TestServer::start_with(&["--uploads-per-user", "1"]).await;
    let (alice, bob) = (server.user("alice").await, server.user("bob").await);
    let (url, token) = (&server.url, alice.token());
    let first = blobs::create(url, token, 1 << 20).await.unwrap();
    let second = blobs::create(url, token, 1 << 20).await.unwrap();

    // A PATCH that has sent part of its body and waits.
    let stalled = partial_patch(&server, token, &first, 0, 1 << 20, &[7; 1000]).await;

    let refused = blobs::append(url, token, &second, 0, Bytes::from_static(b"x")).await;
    assert_eq!(status(refused), (429, "rate_limited".to_string()));
    // Another user is not held back.
    let bobs = blobs::create(url, bob.token(), 1).await.unwrap();
    blobs::append(url, bob.token(), &bobs, 0, Bytes::from_static(b"b"))
        .await
        .unwrap();

    drop(stalled);
    assert_eq!(settled_offset(&server, token, &first).await, 1000);
    blobs::append(url, token, &second, 0, Bytes::from_static(b"x"))
        .await
        .unwrap();
    server.assert_no_panics();
}

/// Runs `confab` for the user whose config is `dir`, through `relay`.
async fn run_via(relay: &CutRelay, dir: &Path, args: &[&str]) -> std::process::Output {
    crate::cli::run_at(&relay.authority, dir, args).await
}

/// The bytes age makes of `plain` bytes: a header and 16 per 64 KiB chunk.
fn encrypted_len(plain: u64) -> u64 {
    plain + 200 + 16 * (plain / 65536 + 1)
}

/// `confab send-file` rides out the network dropping at about 60% of the
/// upload, and separately the server being killed and started again there:
/// each time it asks the server's offset and sends only the rest.
#[tokio::test]
async fn the_cli_upload_goes_on_after_a_dropped_connection_and_a_server_restart() {
    use crate::cli::{run, signed_up};
    let mut server = TestServer::start().await;
    let relay = CutRelay::start(&server.url.authority).await;
    let dirs = tempfile::tempdir().unwrap();
    let (alice, bob) = (dirs.path().join("alice"), dirs.path().join("bob"));
    for args in [["register", "alice"], ["login", "alice"]] {
        assert!(run_via(&relay, &alice, &args).await.status.success());
    }
    signed_up(&server, &bob, "bob").await;
    run(&server, &bob, &["send", "alice", "send me both"]).await;
    let size = 10 * 1024 * 1024;
    let encrypted = encrypted_len(size as u64);

    for (name, restart) in [("dropped.bin", false), ("restarted.bin", true)] {
        let data = random_bytes(size);
        let source = dirs.path().join(name);
        std::fs::write(&source, &data).unwrap();
        let before = blob_bytes_received(&server).await;
        relay.cut_after(encrypted * 6 / 10);
        let source = source.to_str().unwrap().to_string();
        let alice_dir = alice.clone();
        let authority = relay.authority.clone();
        let sending = tokio::spawn(async move {
            crate::cli::cli_at(&authority, &alice_dir)
                .args(["send-file", "bob", &source, "--json"])
                .output()
                .await
                .unwrap()
        });
        relay.tripped().await;
        let counted_from = if restart {
            // Killed once the first part is recorded: what a crash keeps.
            let deadline = tokio::time::Instant::now() + WAIT;
            while blob_bytes_received(&server).await < before + 4 * 1024 * 1024 {
                assert!(tokio::time::Instant::now() < deadline, "no part recorded");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            server.kill9().await;
            server.restart().await;
            0
        } else {
            // Down for a moment: the command's retries are refused meanwhile.
            tokio::time::sleep(Duration::from_millis(700)).await;
            before
        };
        relay.mend();
        let sent = sending.await.unwrap();
        eprintln!("{}", String::from_utf8_lossy(&sent.stderr));
        assert!(sent.status.success(), "{name}: send-file failed");
        let received = blob_bytes_received(&server).await - counted_from;
        if restart {
            // Since the restart: the rest only, not the parts stored before.
            assert!(
                received < encrypted - 3 * 1024 * 1024,
                "{name}: {received} of {encrypted} bytes sent after the restart"
            );
        } else {
            assert!(
                received < encrypted + 1024,
                "{name}: {received} bytes received for {encrypted}: sent again"
            );
        }
        let seq = crate::cli::json(&sent)["seq"].as_i64().unwrap().to_string();
        let into = dirs.path().join(format!("{name}.d"));
        std::fs::create_dir(&into).unwrap();
        let into = into.to_str().unwrap();
        assert!(
            run(&server, &bob, &["download", "alice", &seq, into])
                .await
                .status
                .success()
        );
        let saved = std::fs::read(Path::new(into).join(name)).unwrap();
        assert!(saved == data, "{name}: the download differs");
    }
    server.assert_no_panics();
}

/// Alice deletes a file she sent: its bytes leave the server and her
/// quota, the message stays and shows it deleted to both, a download says
/// so (410 `file_deleted` to the members, the same 404 as ever to others).
#[tokio::test]
async fn alice_deletes_a_sent_file_and_the_message_shows_it_deleted() {
    use crate::cli::{json, run, signed_up};
    use confab_client::e2e::Received;
    let server = TestServer::start_with(&["--file-quota-mib", "1"]).await;
    let dirs = tempfile::tempdir().unwrap();
    let alice_dir = dirs.path().join("alice");
    signed_up(&server, &alice_dir, "alice").await;
    let (bob, carol) = (server.user("bob").await, server.user("carol").await);
    bob.accepts("alice").await;
    let source = dirs.path().join("photo.bin");
    std::fs::write(&source, random_bytes(700 * 1024)).unwrap();
    let source = source.to_str().unwrap();
    let sent = run(&server, &alice_dir, &["send-file", "bob", source, "--json"]).await;
    assert!(sent.status.success());
    let seq = json(&sent)["seq"].as_i64().unwrap();

    let (b, _b_events, _) = bob.connect_synced().await;
    let conv = b.open("alice").await.unwrap();
    let file_of = |page: Vec<Received>| match page.into_iter().find(|r| r.message().seq == seq) {
        Some(Received::File(f)) => f,
        other => panic!("no file message {seq}: {other:?}"),
    };
    let file = file_of(b.history(conv, None, 10).await.unwrap());
    assert!(!file.deleted());
    let path = format!("/v1/blobs/{}", file.file.blob);
    assert!(
        blobs::download(&server.url, bob.token(), &path, None)
            .await
            .is_ok()
    );
    // Reading is all bob may do with it.
    assert_eq!(
        answer(blobs::delete(&server.url, bob.token(), &path).await),
        no_such_blob()
    );

    let seq_arg = seq.to_string();
    let deleted = run(&server, &alice_dir, &["delete-file", "bob", &seq_arg]).await;
    assert!(deleted.status.success());
    assert!(String::from_utf8_lossy(&deleted.stdout).contains("deleted: file photo.bin"));

    let gone = (
        410,
        "file_deleted".to_string(),
        "the file was deleted".to_string(),
    );
    assert_eq!(
        answer(blobs::download(&server.url, bob.token(), &path, None).await),
        gone
    );
    assert_eq!(
        answer(blobs::download(&server.url, carol.token(), &path, None).await),
        no_such_blob(),
        "not a member: nothing to learn"
    );
    assert!(file_of(b.history(conv, None, 10).await.unwrap()).deleted());
    let history = run(&server, &alice_dir, &["history", "bob"]).await;
    let shown = String::from_utf8_lossy(&history.stdout);
    assert!(shown.contains("[file deleted: photo.bin ("), "{shown}");
    let into = dirs.path().to_str().unwrap();
    let download = run(&server, &alice_dir, &["download", "bob", &seq_arg, into]).await;
    assert!(!download.status.success());
    assert!(String::from_utf8_lossy(&download.stderr).contains("was deleted"));
    let twice = run(&server, &alice_dir, &["delete-file", "bob", &seq_arg]).await;
    assert!(!twice.status.success(), "already deleted");

    // Its 700 KiB no longer count against alice's 1 MiB.
    let again = run(&server, &alice_dir, &["send-file", "bob", source]).await;
    assert!(again.status.success(), "the quota was freed");
    server.assert_no_panics();
}

/// With a retention, files older than it are deleted by the server: the
/// messages stay and show them deleted.
#[tokio::test]
async fn files_past_the_retention_are_deleted_and_their_messages_stay() {
    use confab_client::new_message_id;
    let server =
        TestServer::start_with(&["--file-retention-secs", "3", "--blob-sweep-secs", "1"]).await;
    let (alice, bob) = (server.user("alice").await, server.user("bob").await);
    bob.accepts("alice").await;
    let (a, _a_events, _) = alice.connect_synced().await;
    let conv = a.open("bob").await.unwrap();
    let path = upload(&server, alice.token(), &random_bytes(1000)).await;
    let id = path.strip_prefix("/v1/blobs/").unwrap().to_string();
    a.send_with_blobs(conv, new_message_id(), "old news", vec![id.clone()])
        .await
        .unwrap();
    // 410, not 404: a tombstone the message still refers to.
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        match blobs::download(&server.url, bob.token(), &path, None).await {
            Err(ClientError::Api { status: 410, error })
                if error.code.as_str() == "file_deleted" =>
            {
                break;
            }
            other => {
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "still there: {other:?}"
                );
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    }
    let (b, _b_events, _) = bob.connect_synced().await;
    let page = b.history(conv, None, 10).await.unwrap();
    let shown: Vec<_> = page
        .iter()
        .map(|r| r.message().deleted_files.clone())
        .collect();
    assert_eq!(
        shown,
        [vec![id]],
        "the message stays, its file marked deleted"
    );
    server.assert_no_panics();
}
