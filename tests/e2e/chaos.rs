//! The chaos test: three nodes behind HAProxy on one PostgreSQL and one
//! Redis, many users sending in one-to-one conversations and in groups,
//! while a random node is killed with -9 every few seconds and started
//! again, Redis is restarted once and PostgreSQL once. At the end every
//! acked message has reached every recipient device exactly once, in
//! order, and the checker prints what it counted.
//!
//! Shortened for CI; `CONFAB_CHAOS_SECS` (default 20) and
//! `CONFAB_CHAOS_USERS` (default 50) set the full length, e.g.
//! `CONFAB_CHAOS_SECS=120 CONFAB_CHAOS_USERS=100 cargo test --test e2e chaos -- --nocapture`.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use confab_client::ServerUrl;
use confab_protocol::{ConversationId, MessageId};
use confab_testhaproxy::{HaProxy, Options, SOURCE};
use confab_testpg::Postgres;
use confab_testredis::Redis;
use tokio::sync::watch;

use crate::crash::{Device, Sending, listen, send_all};
use crate::harness::*;

/// Users per group (consecutive users form one).
const GROUP: usize = 5;
/// Every this many users, one has a second device that only receives.
const PHONE_EVERY: usize = 5;

fn setting(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn three_nodes_killed_at_random_and_redis_and_postgres_restarted_lose_and_repeat_nothing() {
    if on_postgres() {
        // Already on PostgreSQL in the first pass; once is enough.
        return;
    }
    let secs = setting("CONFAB_CHAOS_SECS", 20);
    let users_n = setting("CONFAB_CHAOS_USERS", 50) as usize;
    let pg = Postgres::start();
    let redis = Redis::start();
    let db = pg.fresh_database();
    let redis_url = redis.url();
    let proxy = SOURCE.to_string();
    let mut flags = vec![
        "--database",
        &db,
        "--redis",
        &redis_url,
        "--trusted-proxy",
        &proxy,
        "--proxy-protocol",
        "--presence-ttl-ms",
        "1500",
        "--repair-interval-ms",
        "1000",
        // Every account and device here comes from 127.0.0.1.
        "--registrations-per-address",
        "100000",
        "--new-devices-per-address",
        "100000",
    ];
    flags.extend_from_slice(FAST_SENDERS);
    flags.extend_from_slice(MANY_SOCKETS);
    let mut nodes = Vec::new();
    for _ in 0..3 {
        nodes.push(TestServer::start_with(&flags).await);
    }
    let ports: Vec<u16> = nodes.iter().map(TestServer::port).collect();
    let haproxy = HaProxy::start(&ports, Options::default());
    for i in 1..=3 {
        haproxy.wait_for(&format!("n{i}"), "UP", WAIT);
    }
    let url = ServerUrl::parse(&haproxy.url()).unwrap();

    // Users registered through the nodes directly, three at a time.
    let names: Vec<String> = (0..users_n).map(|i| format!("user{i}")).collect();
    let mut users = Vec::new();
    for chunk in names.chunks(3) {
        let registered = futures_util::future::join_all(
            chunk.iter().zip(&nodes).map(|(name, node)| node.user(name)),
        )
        .await;
        users.extend(registered);
    }
    let mut phones = Vec::new();
    for (i, user) in users.iter().enumerate().step_by(PHONE_EVERY) {
        phones.push((
            i,
            Device::new(&user.add_device().await, &format!("{}-phone", names[i])),
        ));
    }
    // u{i} writes to u{i+1}: each one-to-one conversation has one sender.
    let mut direct = Vec::new();
    for (i, user) in users.iter().enumerate() {
        let (client, _events) = user.connect().await;
        direct.push(client.open(&names[(i + 1) % users_n]).await.unwrap());
        client.close().await;
    }
    let mut groups = Vec::new();
    for members in names.chunks(GROUP).filter(|m| m.len() > 1) {
        let first = names.iter().position(|n| *n == members[0]).unwrap();
        let (client, _events) = users[first].connect().await;
        let rest: Vec<&str> = members[1..].iter().map(String::as_str).collect();
        groups.push(client.create_group("chaos", &rest).await.unwrap().conv);
        client.close().await;
    }
    let devices: Vec<Device> = users
        .iter()
        .zip(&names)
        .map(|(u, n)| Device::new(u, n))
        .collect();

    // Everyone sends through HAProxy until told to stop.
    let (progress, acked_so_far) = watch::channel(0usize);
    let (stop, stopped) = watch::channel(false);
    let sending = |tag| Sending {
        tag,
        count: usize::MAX,
        stop: Some(stopped.clone()),
        pause: Duration::from_millis(50),
    };
    let mut direct_senders = Vec::new();
    let mut group_senders = Vec::new();
    for (i, device) in devices.iter().enumerate() {
        let d = tokio::spawn(send_all(
            url.clone(),
            device.clone(),
            direct[i],
            sending(""),
            progress.clone(),
        ));
        direct_senders.push(d);
        if let Some(group) = groups.get(i / GROUP) {
            let g = tokio::spawn(send_all(
                url.clone(),
                device.clone(),
                *group,
                sending("g"),
                progress.clone(),
            ));
            group_senders.push((i, g));
        }
    }
    let (listening, listeners_stop) = watch::channel(false);
    let listeners: Vec<_> = phones
        .iter()
        .map(|(_, p)| tokio::spawn(listen(url.clone(), p.clone(), listeners_stop.clone())))
        .collect();

    // The chaos: a random node killed and started again every 1-3 s; Redis
    // at a third of the run, PostgreSQL at two thirds.
    let started = Instant::now();
    let length = Duration::from_secs(secs);
    let (mut kills, mut redis_done, mut pg_done) = (0, false, false);
    while started.elapsed() < length {
        tokio::time::sleep(Duration::from_millis(rand::random_range(1000..3000))).await;
        let at = started.elapsed();
        if !redis_done && at > length / 3 {
            redis.kill();
            tokio::time::sleep(Duration::from_millis(500)).await;
            redis.start_again();
            redis_done = true;
            continue;
        }
        if !pg_done && at > length * 2 / 3 {
            pg.kill();
            tokio::time::sleep(Duration::from_millis(500)).await;
            pg.start_again();
            pg_done = true;
            continue;
        }
        let victim = rand::random_range(0..nodes.len());
        nodes[victim].kill9().await;
        tokio::time::sleep(Duration::from_millis(rand::random_range(0..500))).await;
        nodes[victim].restart().await;
        kills += 1;
    }
    assert!(
        redis_done && pg_done,
        "the run is too short for both restarts"
    );
    let acked_before_stop = *acked_so_far.borrow();
    stop.send(true).unwrap();

    let mut direct_acked = Vec::new();
    for sender in direct_senders {
        direct_acked.push(
            tokio::time::timeout(Duration::from_secs(120), sender)
                .await
                .expect("senders finish")
                .unwrap(),
        );
    }
    let mut group_acked: BTreeMap<ConversationId, Vec<(i64, MessageId, String)>> = BTreeMap::new();
    for (i, sender) in group_senders {
        let acked = tokio::time::timeout(Duration::from_secs(120), sender)
            .await
            .expect("senders finish")
            .unwrap();
        let entry = group_acked.entry(groups[i / GROUP]).or_default();
        entry.extend(
            acked
                .into_iter()
                .map(|(id, seq)| (seq, id, names[i].clone())),
        );
    }
    listening.send(true).unwrap();
    for listener in listeners {
        listener.await.unwrap();
    }
    // Every device connects once more and takes whatever it still lacks.
    for device in devices.iter().chain(phones.iter().map(|(_, p)| p)) {
        let (client, events) = device.connect(&url).await.expect("final connect");
        device.record(events, true).await;
        client.close().await;
    }

    // The checker.
    // A device's two connections record into one list, so two messages
    // taken in order may land in it the other way round: sorted here. The
    // order the application saw is the client library's to keep, and it
    // does: a message older than one taken is dropped, so it would be
    // missing below, and a skipped seq counts as a gap.
    let received = |device: &Device, conv: ConversationId| -> Vec<(i64, String)> {
        let got = device.received.lock().unwrap();
        let mut got: Vec<(i64, String)> = got
            .iter()
            .filter(|m| m.conv == conv)
            .map(|m| (m.seq, m.id.to_string()))
            .collect();
        got.sort();
        got
    };
    let mut copies = 0;
    for (i, acked) in direct_acked.iter().enumerate() {
        let expected: Vec<(i64, String)> = acked
            .iter()
            .map(|(id, seq)| (*seq, id.to_string()))
            .collect();
        let seqs: Vec<i64> = expected.iter().map(|(seq, _)| *seq).collect();
        assert_eq!(
            seqs,
            (1..=acked.len() as i64).collect::<Vec<_>>(),
            "{}'s acks: one seq each, in order",
            names[i]
        );
        // The recipient's devices, and the sender's other one, which gets
        // a copy of what its user sent.
        let to = (i + 1) % users_n;
        let recipients = std::iter::once(&devices[to]).chain(
            phones
                .iter()
                .filter(|(u, _)| *u == to || *u == i)
                .map(|(_, p)| p),
        );
        for device in recipients {
            let got = received(device, direct[i]);
            assert!(
                got == expected,
                "{} must have {}'s {} acked messages exactly once, in order; has {} (first difference: {:?})",
                device.name,
                names[i],
                expected.len(),
                got.len(),
                got.iter().zip(&expected).find(|(a, b)| a != b)
            );
            copies += got.len();
        }
    }
    for (g, conv) in groups.iter().enumerate() {
        let mut acked = group_acked.remove(conv).unwrap_or_default();
        acked.sort();
        let seqs: Vec<i64> = acked.iter().map(|(seq, ..)| *seq).collect();
        // Seq 1 is the group's `created` event.
        assert_eq!(
            seqs,
            (2..2 + acked.len() as i64).collect::<Vec<_>>(),
            "group {g}: one seq per acked message"
        );
        let members = g * GROUP..((g + 1) * GROUP).min(users_n);
        let member_devices = members.clone().map(|m| (m, &devices[m])).chain(
            phones
                .iter()
                .filter(|(u, _)| members.contains(u))
                .map(|(u, p)| (*u, p)),
        );
        for (_, device) in member_devices {
            // A phone has its own user's messages too: only the device
            // that sent a message lacks it.
            let expected: Vec<(i64, String)> = acked
                .iter()
                .filter(|(.., from)| *from != device.name)
                .map(|(seq, id, _)| (*seq, id.to_string()))
                .collect();
            let got = received(device, *conv);
            assert!(
                got == expected,
                "{} must have group {g}'s {} messages from others exactly once, in order; has {} (first difference: {:?})",
                device.name,
                expected.len(),
                got.len(),
                got.iter().zip(&expected).find(|(a, b)| a != b)
            );
            copies += got.len();
        }
    }
    let acked_total = *acked_so_far.borrow();
    for device in devices.iter().chain(phones.iter().map(|(_, p)| p)) {
        assert_eq!(device.state.gaps(), 0, "{} skipped a seq", device.name);
    }
    let wire_duplicates: u64 = devices
        .iter()
        .chain(phones.iter().map(|(_, p)| p))
        .map(|d| d.state.duplicates())
        .sum();
    println!(
        "chaos: {secs} s, {users_n} users, {} phones, {} groups; {kills} node kills, 1 Redis and 1 PostgreSQL restart; \
         {acked_total} messages acked ({acked_before_stop} before the stop), {copies} copies delivered to devices, \
         each exactly once and in order; {wire_duplicates} duplicates dropped by clients after reconnects",
        phones.len(),
        groups.len(),
    );
    for node in &nodes {
        node.assert_no_panics();
    }
}
