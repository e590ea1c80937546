//! `confab bench group`: one group of many members (one device each, some
//! with two), one message at a time from a rotating sender: the bytes one
//! message puts on the wire, the time until every member's device has it,
//! the server's CPU per delivered copy, and the receipt frames it causes.
//!
//! Bodies are the real envelope layout for every listed device (what the
//! server checks) with random bytes for the keys, as in the load generator.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::Engine;
use confab_client::{Client, Event, Events, new_message_id};
use confab_protocol::{ClientFrame, ConversationId, ServerFrame};
use indicatif::ProgressBar;
use rand::Rng;
use serde::Serialize;

use super::load::histogram;
use super::procfs::CpuMeter;
use super::report::{Percentiles, Report};
use super::setup::{self, Target};

#[derive(Serialize, Debug, Clone, Copy, Default)]
pub struct GroupFigures {
    pub members: usize,
    pub devices: usize,
    pub messages: usize,
    pub content_bytes: usize,
    /// The `send` frame, one `msg` frame, and all the `msg` frames of one
    /// message together (one per other device), in bytes.
    pub send_frame_bytes: usize,
    pub msg_frame_bytes: usize,
    pub fan_out_bytes: usize,
    /// From the send until the last device has it.
    pub to_every_device: Percentiles,
    pub server_cpu_us_per_delivered_copy: f64,
    /// Receipt frames all devices got, per message (delivered and read).
    pub receipt_frames_per_message: f64,
}

/// What every device saw: per message counter, how many devices have it
/// and when the last one got it; receipt frames in all.
#[derive(Default)]
struct Seen {
    copies: HashMap<u64, (usize, Instant)>,
    receipts: u64,
    msg_frame_bytes: usize,
}

pub async fn run(
    target: &Target,
    members: usize,
    second_devices: usize,
    messages: usize,
    content_bytes: usize,
    bar: &ProgressBar,
) -> anyhow::Result<Report> {
    let url = &target.url;
    let mut accounts = setup::provision(url, members, bar).await?;
    bar.set_message("second devices");
    for i in 0..second_devices.min(members) {
        let second = setup::second_device(url, &accounts[i]).await?;
        accounts.push(second);
    }
    bar.set_message("connecting");
    let mut clients = Vec::new();
    let mut streams = Vec::new();
    for account in &accounts {
        let (client, events) = setup::connect(url, account, None).await?;
        clients.push(Arc::new(client));
        streams.push(events);
    }
    let names: Vec<&str> = accounts[1..members]
        .iter()
        .map(|a| a.name.as_str())
        .collect();
    let conv = clients[0].create_group("bench", &names).await?.conv;
    // Friends, not strangers: a request holds receipts back.
    for client in &clients[1..members] {
        client.accept(conv).await?;
    }
    let mut devices: Vec<i64> = accounts.iter().map(|a| a.device.0).collect();
    devices.sort_unstable();

    let seen = Arc::new(Mutex::new(Seen::default()));
    let receivers: Vec<_> = clients
        .iter()
        .zip(streams)
        .map(|(client, events)| tokio::spawn(receive(client.clone(), events, conv, seen.clone())))
        .collect();
    // Let the accepts' and the creation's receipts pass before counting.
    tokio::time::sleep(Duration::from_millis(500)).await;
    seen.lock().unwrap().receipts = 0;

    bar.set_message("sending");
    bar.set_length(messages as u64);
    bar.set_position(0);
    let mut latency = histogram();
    let mut rng = rand::rng();
    let mut send_frame_bytes = 0;
    let server = CpuMeter::start(&target.nodes, false);
    for counter in 0..messages as u64 {
        let sender = counter as usize % members;
        let device = accounts[sender].device.0;
        let mut content = format!("{sender:x}.{counter:x}.").into_bytes();
        let marker = content.len();
        content.resize(content_bytes.max(marker), 0);
        rng.fill(&mut content[marker..]);
        let envelope = confab_crypto::stand_in(device, &devices, &content, &mut |b| rng.fill(b));
        let body = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(envelope);
        let id = new_message_id();
        let frame = ClientFrame::Send {
            id: id.clone(),
            conv,
            body: body.clone(),
            blobs: Vec::new(),
        };
        send_frame_bytes = serde_json::to_string(&frame)?.len();
        let started = Instant::now();
        clients[sender].send_raw(conv, id, body).await?;
        // Everyone but the sending device.
        let wanted = accounts.len() - 1;
        let deadline = started + Duration::from_secs(30);
        let last = loop {
            if let Some(&(n, at)) = seen.lock().unwrap().copies.get(&counter)
                && n >= wanted
            {
                break at;
            }
            anyhow::ensure!(
                Instant::now() < deadline,
                "message {counter} not everywhere in 30 s"
            );
            tokio::time::sleep(Duration::from_micros(200)).await;
        };
        let _ = latency.record(last.duration_since(started).as_nanos().max(1) as u64);
        bar.inc(1);
    }
    let (cpu_seconds, _) = server.read();
    // Receipts of the last message settle.
    tokio::time::sleep(Duration::from_millis(500)).await;
    for receiver in receivers {
        receiver.abort();
    }
    let seen = seen.lock().unwrap();
    let copies = messages * (accounts.len() - 1);
    let figures = GroupFigures {
        members,
        devices: accounts.len(),
        messages,
        content_bytes,
        send_frame_bytes,
        msg_frame_bytes: seen.msg_frame_bytes,
        fan_out_bytes: seen.msg_frame_bytes * (accounts.len() - 1),
        to_every_device: Percentiles::of(&latency),
        server_cpu_us_per_delivered_copy: cpu_seconds * 1e6 / copies as f64,
        receipt_frames_per_message: seen.receipts as f64 / messages as f64,
    };
    Ok(Report {
        mode: "group".into(),
        users: members,
        settings: format!(
            "{} devices, {content_bytes} byte messages, one at a time",
            accounts.len()
        ),
        delivered: copies as u64,
        group: Some(figures),
        ..Report::default()
    })
}

/// Takes every event as an application would, reading each message at once
/// (so that read receipts flow), and counts.
async fn receive(
    client: Arc<Client>,
    mut events: Events,
    conv: ConversationId,
    seen: Arc<Mutex<Seen>>,
) {
    while let Some(event) = events.recv().await {
        match event {
            Event::Message(m) if m.conv == conv => {
                let at = Instant::now();
                let counter = counter_of(&m.body);
                let bytes = ServerFrame::Msg(m.clone()).to_json().len();
                {
                    let mut seen = seen.lock().unwrap();
                    seen.msg_frame_bytes = bytes;
                    if let Some(counter) = counter {
                        let entry = seen.copies.entry(counter).or_insert((0, at));
                        entry.0 += 1;
                        entry.1 = entry.1.max(at);
                    }
                }
                let _ = client.read(conv, m.seq).await;
            }
            Event::Receipt { .. } => seen.lock().unwrap().receipts += 1,
            Event::Closed(_) => return,
            _ => {}
        }
    }
}

fn counter_of(body: &str) -> Option<u64> {
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(body)
        .ok()?;
    let envelope = confab_crypto::Envelope::parse(&bytes).ok()?;
    let mut parts = envelope.ciphertext().splitn(3, |&b| b == b'.');
    let _sender = parts.next()?;
    u64::from_str_radix(std::str::from_utf8(parts.next()?).ok()?, 16).ok()
}
