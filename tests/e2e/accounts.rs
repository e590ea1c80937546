//! Accounts, sessions and devices.

use confab_client::e2e::Enrollment;
use confab_client::{Client, ConnectOptions, Event, account};
use confab_protocol::ErrorCode;

use crate::harness::*;

#[tokio::test]
async fn registration_checks_names_and_passwords() {
    let server = TestServer::start().await;
    let url = &server.url;
    let code = |r: Result<String, confab_client::ClientError>| r.unwrap_err().code();
    assert_eq!(
        code(account::register(url, "a", PASSWORD).await),
        Some(ErrorCode::InvalidUsername)
    );
    assert_eq!(
        code(account::register(url, "no spaces", PASSWORD).await),
        Some(ErrorCode::InvalidUsername)
    );
    assert_eq!(
        code(account::register(url, "alice", "short").await),
        Some(ErrorCode::WeakPassword)
    );
    assert_eq!(
        code(account::register(url, "alice", "        ").await),
        Some(ErrorCode::WeakPassword),
        "eight spaces are no password"
    );
    assert_eq!(
        account::register(url, "Alice", PASSWORD).await.unwrap(),
        "alice"
    );
    assert_eq!(
        code(account::register(url, "ALICE", PASSWORD).await),
        Some(ErrorCode::UsernameTaken)
    );
}

#[tokio::test]
async fn login_does_not_say_which_usernames_exist() {
    let server = TestServer::start().await;
    server.user("alice").await;
    let wrong_password = account::login(&server.url, "alice", "not the password", None, None)
        .await
        .unwrap_err();
    let unknown_user = account::login(&server.url, "mallory", PASSWORD, None, None)
        .await
        .unwrap_err();
    let (
        confab_client::ClientError::Api {
            status: s1,
            error: e1,
        },
        confab_client::ClientError::Api {
            status: s2,
            error: e2,
        },
    ) = (wrong_password, unknown_user)
    else {
        panic!("both are API errors")
    };
    assert_eq!((s1, &e1), (s2, &e2), "identical answers");
    assert_eq!((s1, e1.code), (401, ErrorCode::InvalidCredentials));
}

#[tokio::test]
async fn a_login_flood_gets_busy_instead_of_exhausting_memory() {
    let server = TestServer::start_with(&[
        "--password-hash-concurrency",
        "1",
        "--password-attempts-per-account-address",
        "1000",
    ])
    .await;
    server.user("alice").await;
    let attempts =
        (0..24).map(|_| account::login(&server.url, "alice", "wrong password", None, None));
    let results = futures_util::future::join_all(attempts).await;
    let busy = results
        .iter()
        .filter(|r| matches!(r, Err(e) if e.code() == Some(ErrorCode::Busy)))
        .count();
    let denied = results
        .iter()
        .filter(|r| matches!(r, Err(e) if e.code() == Some(ErrorCode::InvalidCredentials)))
        .count();
    assert!(busy > 0, "some attempts are told to come back later");
    assert_eq!(busy + denied, 24);
}

#[tokio::test]
async fn logout_ends_the_session_and_a_listed_device_comes_back_with_its_keys() {
    let server = TestServer::start().await;
    let alice = server.user("alice").await;
    let (_a, mut events, _) = alice.connect_synced().await;
    account::logout(&server.url, alice.token()).await.unwrap();
    let closed = expect_event(&mut events, "socket closed", |e| {
        matches!(e, Event::Closed(_))
    })
    .await;
    assert!(
        matches!(&closed, Event::Closed(Some(e)) if e.code == ErrorCode::Unauthorized),
        "{closed:?}"
    );
    let err = Client::connect(&server.url, alice.token(), ConnectOptions::default())
        .await
        .err()
        .unwrap();
    assert_eq!(err.code(), Some(ErrorCode::Unauthorized));
    // The device is on alice's signed list: logging in again with its id
    // and keys gets it back, still listed.
    let again = alice.relogin().await;
    assert!(!again.login.new_device);
    assert_eq!(again.login.device, alice.login.device);
    assert_eq!(again.enrollment, Enrollment::Listed);

    // A device nobody approved is simply removed at logout.
    let pending = alice.new_device().await;
    assert_eq!(pending.enrollment, Enrollment::Pending);
    let (_p, mut p_events, _) = pending.connect_synced().await;
    account::logout(&server.url, pending.token()).await.unwrap();
    let closed = expect_event(&mut p_events, "socket closed", |e| {
        matches!(e, Event::Closed(_))
    })
    .await;
    assert!(
        matches!(&closed, Event::Closed(Some(e)) if e.code == ErrorCode::DeviceRemoved),
        "{closed:?}"
    );
    assert!(pending.relogin().await.login.new_device);
}

#[tokio::test]
async fn devices_are_listed_and_removing_one_closes_its_sockets() {
    let server = TestServer::start().await;
    let laptop = server.user("alice").await;
    let phone = laptop.new_device().await;
    let devices = account::devices(&server.url, laptop.token()).await.unwrap();
    assert_eq!(devices.len(), 2);
    assert!(
        devices
            .iter()
            .any(|d| d.device == laptop.login.device && d.current)
    );
    assert!(
        devices
            .iter()
            .any(|d| d.device == phone.login.device && !d.current)
    );

    let (_p, mut phone_events, _) = phone.connect_synced().await;
    account::remove_device(&server.url, laptop.token(), phone.login.device)
        .await
        .unwrap();
    expect_event(&mut phone_events, "phone closed", |e| {
        matches!(e, Event::Closed(_))
    })
    .await;
    assert_eq!(
        account::devices(&server.url, laptop.token())
            .await
            .unwrap()
            .len(),
        1
    );
    let err = account::remove_device(&server.url, laptop.token(), phone.login.device)
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::NotFound));

    let mallory = server.user("mallory").await;
    let err = account::remove_device(&server.url, mallory.token(), laptop.login.device)
        .await
        .unwrap_err();
    assert_eq!(
        err.code(),
        Some(ErrorCode::NotFound),
        "nobody removes another user's device"
    );
    assert_eq!(
        account::devices(&server.url, laptop.token())
            .await
            .unwrap()
            .len(),
        1,
        "and the attempt left the device's session alone"
    );
}

#[tokio::test]
async fn a_password_change_can_log_out_the_other_devices() {
    let server = TestServer::start().await;
    let laptop = server.user("alice").await;
    let phone = laptop.new_device().await;
    let (_p, mut phone_events, _) = phone.connect_synced().await;

    let err =
        account::change_password(&server.url, laptop.token(), "wrong", "new password 1", true)
            .await
            .unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::InvalidCredentials));
    account::change_password(
        &server.url,
        laptop.token(),
        PASSWORD,
        "new password 1",
        true,
    )
    .await
    .unwrap();
    expect_event(&mut phone_events, "phone logged out", |e| {
        matches!(e, Event::Closed(_))
    })
    .await;
    assert!(
        Client::connect(&server.url, phone.token(), ConnectOptions::default())
            .await
            .is_err()
    );
    assert!(
        Client::connect(&server.url, laptop.token(), ConnectOptions::default())
            .await
            .is_ok()
    );

    let err = account::login(&server.url, "alice", PASSWORD, None, None)
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::InvalidCredentials));
    let back = account::login(
        &server.url,
        "alice",
        "new password 1",
        Some(phone.login.device),
        None,
    )
    .await
    .unwrap();
    assert_eq!(
        back.device, phone.login.device,
        "the phone keeps its device"
    );
}

#[tokio::test]
async fn an_expired_token_is_refused_but_the_device_survives() {
    let server = TestServer::start_with(&["--session-ttl-secs", "2"]).await;
    let alice = server.user("alice").await;
    let (_a, mut events) = alice.connect().await;
    let closed = expect_event(&mut events, "the open socket closes at expiry", |e| {
        matches!(e, Event::Closed(_))
    })
    .await;
    assert!(
        matches!(&closed, Event::Closed(Some(e)) if e.code == ErrorCode::TokenExpired),
        "{closed:?}"
    );
    let err = Client::connect(&server.url, alice.token(), ConnectOptions::default())
        .await
        .err()
        .unwrap();
    assert_eq!(err.code(), Some(ErrorCode::TokenExpired));
    let err = account::devices(&server.url, alice.token())
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::TokenExpired));
    let again = alice.relogin().await;
    assert_eq!(again.login.device, alice.login.device);
    assert!(!again.login.new_device);
}

#[tokio::test]
async fn device_names_lose_bidirectional_and_invisible_characters() {
    let server = TestServer::start().await;
    account::register(&server.url, "alice", PASSWORD)
        .await
        .unwrap();
    let name = "phone\u{202e}gnp.exe\u{200b}\u{2066}\u{7}";
    let login = account::login(&server.url, "alice", PASSWORD, None, Some(name))
        .await
        .unwrap();
    let devices = account::devices(&server.url, &login.token).await.unwrap();
    assert_eq!(devices[0].name, "phonegnp.exe");
}
