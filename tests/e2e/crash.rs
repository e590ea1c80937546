//! The crash test: clients keep sending, in one-to-one conversations and in
//! a group of 4 users on 6 devices, while the server is killed with SIGKILL
//! three times; afterwards every acked message is found exactly once per
//! recipient device, in order, with no gaps.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use confab_client::e2e::E2e;
use confab_client::{Client, ConnectOptions, Event, Events, ServerUrl, SyncState};
use confab_protocol::{ConversationId, Message, MessageId};
use tokio::sync::watch;

use crate::harness::*;

const SENDERS: [&str; 4] = ["ann", "ben", "cat", "dan"];
const PER_SENDER: usize = 500;
/// Messages each sender also writes into the group of all four.
const GROUP_PER_SENDER: usize = 150;

/// One device: what it received (after the client library's dedup) and
/// the state that carries that dedup across reconnects.
#[derive(Clone)]
pub(crate) struct Device {
    pub(crate) name: String,
    token: String,
    e2e: Arc<E2e>,
    pub(crate) state: Arc<SyncState>,
    pub(crate) received: Arc<Mutex<Vec<Message>>>,
}

impl Device {
    pub(crate) fn new(user: &TestUser, name: &str) -> Self {
        Device {
            name: name.to_string(),
            token: user.token().to_string(),
            e2e: user.e2e.clone(),
            state: Arc::default(),
            received: Arc::default(),
        }
    }

    pub(crate) async fn connect(&self, url: &ServerUrl) -> Option<(Client, Events)> {
        let options = ConnectOptions {
            state: self.state.clone(),
            e2e: Some(self.e2e.clone()),
            ..ConnectOptions::default()
        };
        Client::connect(url, &self.token, options).await.ok()
    }

    /// Records messages until the connection ends (or `synced`, if asked).
    pub(crate) async fn record(&self, mut events: Events, stop_at_synced: bool) {
        while let Some(event) = events.recv().await {
            match event {
                Event::Message(m) => self.received.lock().unwrap().push(m),
                // Missing from `received`, so the checker fails on it; why
                // is in the test's output.
                Event::Undecryptable(u) => eprintln!(
                    "{} cannot open seq {} ({}): {}",
                    self.name, u.message.seq, u.message.id, u.reason
                ),
                Event::Synced if stop_at_synced => return,
                Event::Closed(_) => return,
                _ => {}
            }
        }
    }
}

/// What one sender sends: `count` messages tagged `tag`, or fewer if
/// `stop` comes first, `pause` apart.
pub(crate) struct Sending {
    pub(crate) tag: &'static str,
    pub(crate) count: usize,
    pub(crate) stop: Option<watch::Receiver<bool>>,
    pub(crate) pause: Duration,
}

impl Sending {
    fn count(tag: &'static str, count: usize) -> Self {
        Sending {
            tag,
            count,
            stop: None,
            pause: Duration::ZERO,
        }
    }
}

/// Sends messages one after another, each under a fixed id
/// (`<device>-<tag><k>`), reconnecting and resending whatever was not
/// acked; a message once sent is resent until acked even after `stop`,
/// since it may have been stored.
pub(crate) async fn send_all(
    url: ServerUrl,
    device: Device,
    conv: ConversationId,
    sending: Sending,
    progress: watch::Sender<usize>,
) -> Vec<(MessageId, i64)> {
    let mut acked = Vec::new();
    let mut pending = false;
    let done = |acked: &Vec<_>, pending: bool| {
        !pending
            && (acked.len() >= sending.count
                || sending.stop.as_ref().is_some_and(|stop| *stop.borrow()))
    };
    while !done(&acked, pending) {
        let Some((client, events)) = device.connect(&url).await else {
            tokio::time::sleep(Duration::from_millis(20)).await;
            continue;
        };
        let recorder = tokio::spawn({
            let device = device.clone();
            async move { device.record(events, false).await }
        });
        while !done(&acked, pending) {
            let id =
                MessageId::new(format!("{}-{}{}", device.name, sending.tag, acked.len())).unwrap();
            pending = true;
            match client
                .send_with_id(conv, id.clone(), format!("body of {id}"))
                .await
            {
                Ok(sent) => {
                    assert_eq!(sent.id, id);
                    acked.push((id, sent.seq));
                    pending = false;
                    progress.send_modify(|n| *n += 1);
                    tokio::time::sleep(sending.pause).await;
                }
                Err(_) => break,
            }
        }
        drop(client);
        let _ = recorder.await;
    }
    acked
}

/// A second device that only receives, reconnecting after every crash.
pub(crate) async fn listen(url: ServerUrl, device: Device, mut stop: watch::Receiver<bool>) {
    while !*stop.borrow() {
        let Some((client, events)) = device.connect(&url).await else {
            tokio::time::sleep(Duration::from_millis(20)).await;
            continue;
        };
        tokio::select! {
            _ = device.record(events, false) => {}
            _ = stop.changed() => {}
        }
        drop(client);
    }
}

#[tokio::test]
async fn acked_messages_survive_kill_9_exactly_once_in_order() {
    // Clients here send as fast as acks come back, far above a human's
    // rate, and into conversations the recipients never answer.
    let mut server = TestServer::start_with(FAST_SENDERS).await;
    let url = server.url.clone();
    let mut users = Vec::new();
    for name in SENDERS {
        users.push(server.user(name).await);
    }
    let ben_phone = users[1].add_device().await;
    let cat_phone = users[2].add_device().await;
    // Each sender writes to the next: ann -> ben -> cat -> dan -> ann.
    let mut convs = Vec::new();
    for (i, user) in users.iter().enumerate() {
        let (client, _events) = user.connect().await;
        convs.push(client.open(SENDERS[(i + 1) % SENDERS.len()]).await.unwrap());
    }
    let group = {
        let (client, _events) = users[0].connect().await;
        client
            .create_group("crash", &SENDERS[1..])
            .await
            .unwrap()
            .conv
    };
    let devices: Vec<Device> = users
        .iter()
        .zip(SENDERS)
        .map(|(u, n)| Device::new(u, n))
        .collect();
    let phone = Device::new(&ben_phone, "ben-phone");
    let phones = [phone.clone(), Device::new(&cat_phone, "cat-phone")];

    let (progress, mut acked_so_far) = watch::channel(0usize);
    let (stop, stopped) = watch::channel(false);
    let listeners: Vec<_> = phones
        .iter()
        .map(|p| tokio::spawn(listen(url.clone(), p.clone(), stopped.clone())))
        .collect();
    let senders: Vec<_> = devices
        .iter()
        .zip(&convs)
        .map(|(d, conv)| {
            tokio::spawn(send_all(
                url.clone(),
                d.clone(),
                *conv,
                Sending::count("", PER_SENDER),
                progress.clone(),
            ))
        })
        .collect();
    // The same devices write into the group at the same time, over a
    // second connection each.
    let group_senders: Vec<_> = devices
        .iter()
        .map(|d| {
            tokio::spawn(send_all(
                url.clone(),
                d.clone(),
                group,
                Sending::count("g", GROUP_PER_SENDER),
                progress.clone(),
            ))
        })
        .collect();

    let total = SENDERS.len() * (PER_SENDER + GROUP_PER_SENDER);
    let kill_points = [
        (rand::random_range(total / 10..total / 4), false),
        // The second kill lands right after an ack reached a client.
        (rand::random_range(total * 2 / 5..total / 2), true),
        (rand::random_range(total * 3 / 5..total * 4 / 5), false),
    ];
    for (at, right_after_ack) in kill_points {
        acked_so_far.wait_for(|n| *n >= at).await.unwrap();
        if !right_after_ack {
            tokio::time::sleep(Duration::from_millis(rand::random_range(0..30))).await;
        }
        let when = *acked_so_far.borrow();
        server.kill9().await;
        assert!(
            when < total,
            "the kill must land while clients are still sending"
        );
        tokio::time::sleep(Duration::from_millis(rand::random_range(0..100))).await;
        server.restart().await;
    }

    let mut acked = Vec::new();
    for sender in senders {
        let result = tokio::time::timeout(Duration::from_secs(120), sender)
            .await
            .expect("senders finish")
            .unwrap();
        acked.push(result);
    }
    let mut group_acked = Vec::new();
    for (sender, device) in group_senders.into_iter().zip(&devices) {
        let result = tokio::time::timeout(Duration::from_secs(120), sender)
            .await
            .expect("group senders finish")
            .unwrap();
        group_acked.extend(
            result
                .into_iter()
                .map(|(id, seq)| (seq, id, device.name.clone())),
        );
    }
    stop.send(true).unwrap();
    for listener in listeners {
        listener.await.unwrap();
    }

    // Every device connects once more and takes whatever it still lacks.
    for device in devices.iter().chain(&phones) {
        let (client, events) = device.connect(&url).await.expect("final connect");
        device.record(events, true).await;
        client.close().await;
    }

    // The checker.
    for (i, sent) in acked.iter().enumerate() {
        let expected_ids: Vec<String> = (0..PER_SENDER)
            .map(|k| format!("{}-{k}", SENDERS[i]))
            .collect();
        let ids: Vec<String> = sent.iter().map(|(id, _)| id.to_string()).collect();
        assert_eq!(
            ids, expected_ids,
            "{} got an ack for each message",
            SENDERS[i]
        );
        let seqs: Vec<i64> = sent.iter().map(|(_, seq)| *seq).collect();
        assert_eq!(
            seqs,
            (1..=PER_SENDER as i64).collect::<Vec<_>>(),
            "one seq per message, in order"
        );

        let conv = convs[i];
        let recipient = (i + 1) % SENDERS.len();
        let mut recipients = vec![&devices[recipient]];
        let their_phone = format!("{}-phone", SENDERS[recipient]);
        recipients.extend(phones.iter().filter(|p| p.name == their_phone));
        for device in recipients {
            let received: Vec<(i64, String)> = device
                .received
                .lock()
                .unwrap()
                .iter()
                .filter(|m| m.conv == conv)
                .map(|m| (m.seq, m.id.to_string()))
                .collect();
            let expected: Vec<(i64, String)> = (1..=PER_SENDER as i64)
                .zip(expected_ids.iter().cloned())
                .collect();
            assert!(
                received == expected,
                "{} must receive {}'s {} messages exactly once, in order; got {} (first differences: {:?})",
                device.name,
                SENDERS[i],
                PER_SENDER,
                received.len(),
                received.iter().zip(&expected).find(|(a, b)| a != b)
            );
            assert_eq!(device.state.gaps(), 0, "{} saw a gap", device.name);
        }
    }
    // The group: its seqs are 2.. (1 is its `created` event) without a gap,
    // and every device has every message but its own, once, in order.
    group_acked.sort();
    let seqs: Vec<i64> = group_acked.iter().map(|(seq, ..)| *seq).collect();
    let all = SENDERS.len() * GROUP_PER_SENDER;
    assert_eq!(seqs, (2..2 + all as i64).collect::<Vec<_>>());
    for device in devices.iter().chain(&phones) {
        let received: Vec<(i64, String)> = device
            .received
            .lock()
            .unwrap()
            .iter()
            .filter(|m| m.conv == group)
            .map(|m| (m.seq, m.id.to_string()))
            .collect();
        let expected: Vec<(i64, String)> = group_acked
            .iter()
            .filter(|(.., from)| *from != device.name)
            .map(|(seq, id, _)| (*seq, id.to_string()))
            .collect();
        assert!(
            received == expected,
            "{} must receive the group's {} messages from others exactly once, in order; got {} (first differences: {:?})",
            device.name,
            expected.len(),
            received.len(),
            received.iter().zip(&expected).find(|(a, b)| a != b)
        );
    }
    let (client, _events) = users[0].connect().await;
    let stored = client
        .history(convs[0], None, PER_SENDER as u32)
        .await
        .unwrap();
    assert_eq!(
        stored.len(),
        PER_SENDER,
        "the store holds each message once"
    );
    let wire_duplicates: u64 = devices
        .iter()
        .chain(&phones)
        .map(|d| d.state.duplicates())
        .sum();
    println!(
        "crash test: 3 kills, {wire_duplicates} duplicates dropped by clients after reconnects"
    );
    server.assert_no_panics();
}
