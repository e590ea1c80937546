//! The load: every user sends from one task and receives in another, like a
//! real client (delivery confirmed as it reads, a read cursor every 100 ms).
//! Each body carries its sender, a per-sender counter and the send time, so
//! receivers can measure latency and find loss, duplicates and reordering.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use confab_client::{Client, Event, Events};
use confab_protocol::ConversationId;
use futures_util::StreamExt;
use futures_util::stream::FuturesUnordered;
use hdrhistogram::Histogram;
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use tokio::sync::{mpsc, watch};

/// Shared time base and phase of a run. Times are nanoseconds since `start`.
pub struct Clock {
    start: Instant,
    window_from: AtomicU64,
    window_until: AtomicU64,
    stop_sending: AtomicBool,
    pub received: AtomicU64,
}

impl Clock {
    pub fn new() -> Arc<Self> {
        Arc::new(Self {
            start: Instant::now(),
            window_from: AtomicU64::new(u64::MAX),
            window_until: AtomicU64::new(u64::MAX),
            stop_sending: AtomicBool::new(false),
            received: AtomicU64::new(0),
        })
    }

    pub fn now_ns(&self) -> u64 {
        self.start.elapsed().as_nanos() as u64
    }

    pub fn open_window(&self) {
        self.window_from.store(self.now_ns(), Ordering::SeqCst);
    }

    pub fn close_window(&self) {
        self.window_until.store(self.now_ns(), Ordering::SeqCst);
    }

    pub fn stop_sending(&self) {
        self.stop_sending.store(true, Ordering::SeqCst);
    }

    pub fn sending(&self) -> bool {
        !self.stop_sending.load(Ordering::Relaxed)
    }

    fn in_window(&self, t: u64) -> bool {
        t >= self.window_from.load(Ordering::Relaxed)
            && t < self.window_until.load(Ordering::Relaxed)
    }

    pub fn at(&self, ns: u64) -> tokio::time::Instant {
        (self.start + Duration::from_nanos(ns)).into()
    }
}

pub fn histogram() -> Histogram<u64> {
    // Nanoseconds from 1 ns to 100 s, three significant digits.
    Histogram::new_with_bounds(1, 100_000_000_000, 3).expect("valid histogram bounds")
}

/// One send the open-loop scheduler asks for, with the time it was due.
pub struct Due {
    pub conv: ConversationId,
    pub peer: u32,
    pub due_ns: u64,
}

pub struct SenderReport {
    pub ack: Histogram<u64>,
    /// Open loop: how late each send left after it was due.
    pub lateness: Vec<u64>,
    /// (recipient, counter) of every acked message.
    pub acked: Vec<(u32, u64)>,
    pub errors: u64,
}

impl SenderReport {
    fn new() -> Self {
        Self {
            ack: histogram(),
            lateness: Vec::new(),
            acked: Vec::new(),
            errors: 0,
        }
    }
}

/// How one user's messages look on the wire: the real envelope layout
/// (docs/encryption.md), addressed to the sender's device and the peer's
/// (what the server checks), with random bytes where the wrapped keys, the
/// nonce and the signature go. Real encryption would make the load
/// generator, not the server, the limit; the server cannot tell the
/// difference. The "ciphertext" starts with sender, counter and send time.
pub struct Bodies {
    me: u32,
    /// The one device of every user, by user index.
    devices: Arc<Vec<i64>>,
    padding: Vec<u8>,
    rng: SmallRng,
}

impl Bodies {
    /// `content_bytes`: the size of each message's ciphertext.
    pub fn new(me: u32, devices: Arc<Vec<i64>>, content_bytes: usize) -> Self {
        let mut rng = SmallRng::from_rng(&mut rand::rng());
        let mut padding = vec![0u8; content_bytes.saturating_sub(40).max(16)];
        rng.fill(&mut padding[..]);
        Self {
            me,
            devices,
            padding,
            rng,
        }
    }

    fn make(&mut self, peer: usize, counter: u64, sent_ns: u64) -> String {
        use base64::Engine;
        let me = self.me;
        let mut content = format!("{me:x}.{counter:x}.{sent_ns:x}.").into_bytes();
        content.extend_from_slice(&self.padding);
        let device = self.devices[me as usize];
        let mut to = [device, self.devices[peer]];
        to.sort_unstable();
        let rng = &mut self.rng;
        let envelope = confab_crypto::stand_in(device, &to, &content, &mut |b| rng.fill(b));
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(envelope)
    }
}

fn parse_body(body: &str) -> Option<(u32, u64, u64)> {
    use base64::Engine;
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(body)
        .ok()?;
    let envelope = confab_crypto::Envelope::parse(&bytes).ok()?;
    // The content is the marker, then random bytes.
    let mut parts = envelope
        .ciphertext()
        .splitn(4, |&b| b == b'.')
        .map(|p| std::str::from_utf8(p).ok());
    let mut field = || parts.next().flatten();
    let sender = u32::from_str_radix(field()?, 16).ok()?;
    let counter = u64::from_str_radix(field()?, 16).ok()?;
    let sent_ns = u64::from_str_radix(field()?, 16).ok()?;
    Some((sender, counter, sent_ns))
}

/// Closed loop: keep `window` sends in flight to random peers until told to stop.
pub async fn send_closed(
    client: Arc<Client>,
    convs: Vec<(usize, ConversationId)>,
    window: usize,
    clock: Arc<Clock>,
    mut bodies: Bodies,
) -> SenderReport {
    let mut rng = SmallRng::from_rng(&mut rand::rng());
    let mut report = SenderReport::new();
    let mut inflight = FuturesUnordered::new();
    let mut counter = 0u64;
    loop {
        while clock.sending() && inflight.len() < window {
            let (peer, conv) = convs[rng.random_range(0..convs.len())];
            let sent_ns = clock.now_ns();
            let text = bodies.make(peer, counter, sent_ns);
            let client = &client;
            inflight.push(
                async move { (peer as u32, counter, sent_ns, client.send(conv, text).await) },
            );
            counter += 1;
        }
        let Some((peer, counter, sent_ns, result)) = inflight.next().await else {
            return report;
        };
        record_ack(&clock, &mut report, peer, counter, sent_ns, result.is_ok());
    }
}

/// Open loop: send whatever the scheduler says is due, without waiting for
/// earlier sends.
pub async fn send_open(
    client: Arc<Client>,
    mut due: mpsc::UnboundedReceiver<Due>,
    clock: Arc<Clock>,
    mut bodies: Bodies,
) -> SenderReport {
    let mut report = SenderReport::new();
    let mut inflight = FuturesUnordered::new();
    let mut counter = 0u64;
    let mut open = true;
    let mut lateness = Vec::new();
    loop {
        tokio::select! {
            next = due.recv(), if open => match next {
                Some(Due { conv, peer, due_ns }) => {
                    // Latency counts from the moment the frame is handed to
                    // the connection. Sends never wait for earlier ones, so
                    // a slow server cannot hide its queueing (no coordinated
                    // omission); how late the scheduler itself ran is kept
                    // apart, since tokio's timers tick in milliseconds.
                    let sent_ns = clock.now_ns();
                    lateness.push(sent_ns.saturating_sub(due_ns));
                    let text = bodies.make(peer as usize, counter, sent_ns);
                    let client = &client;
                    inflight.push(async move { (peer, counter, sent_ns, client.send(conv, text).await) });
                    counter += 1;
                }
                None => open = false,
            },
            Some((peer, counter, due_ns, result)) = inflight.next(), if !inflight.is_empty() => {
                record_ack(&clock, &mut report, peer, counter, due_ns, result.is_ok());
            }
            else => {
                report.lateness = lateness;
                return report;
            }
        }
    }
}

fn record_ack(
    clock: &Clock,
    report: &mut SenderReport,
    peer: u32,
    counter: u64,
    sent_ns: u64,
    ok: bool,
) {
    if !ok {
        report.errors += 1;
        return;
    }
    if clock.in_window(sent_ns) {
        let _ = report
            .ack
            .record(clock.now_ns().saturating_sub(sent_ns).max(1));
    }
    report.acked.push((peer, counter));
}

pub struct ReceiverReport {
    pub deliver: Histogram<u64>,
    /// (sender, counter) of every message received, once.
    pub received: HashSet<(u32, u64)>,
    pub delivered_in_window: u64,
    pub duplicates: u64,
    pub out_of_order: u64,
    pub disconnected: bool,
}

/// Reads everything, as a client application would; stops when told.
pub async fn receive(
    client: Arc<Client>,
    mut events: Events,
    clock: Arc<Clock>,
    mut stop: watch::Receiver<bool>,
) -> ReceiverReport {
    let mut report = ReceiverReport {
        deliver: histogram(),
        received: HashSet::new(),
        delivered_in_window: 0,
        duplicates: 0,
        out_of_order: 0,
        disconnected: false,
    };
    let mut last_counter: HashMap<(ConversationId, u32), u64> = HashMap::new();
    let mut to_read: HashMap<ConversationId, i64> = HashMap::new();
    let mut read_cursor = tokio::time::interval(Duration::from_millis(100));
    loop {
        tokio::select! {
            event = events.recv() => match event {
                Some(Event::Message(m)) => {
                    let now = clock.now_ns();
                    let Some((sender, counter, sent_ns)) = parse_body(&m.body) else { continue };
                    if !report.received.insert((sender, counter)) {
                        report.duplicates += 1;
                        continue;
                    }
                    clock.received.fetch_add(1, Ordering::Relaxed);
                    let last = last_counter.entry((m.conv, sender)).or_insert(0);
                    if counter < *last {
                        report.out_of_order += 1;
                    }
                    *last = counter;
                    if clock.in_window(sent_ns) {
                        let _ = report.deliver.record(now.saturating_sub(sent_ns).max(1));
                    }
                    if clock.in_window(now) {
                        report.delivered_in_window += 1;
                    }
                    to_read.insert(m.conv, m.seq);
                }
                Some(Event::Closed(_)) | None => {
                    report.disconnected = true;
                    return report;
                }
                Some(_) => {}
            },
            _ = read_cursor.tick() => {
                for (conv, seq) in to_read.drain() {
                    let _ = client.read(conv, seq).await;
                }
            }
            _ = stop.changed() => return report,
        }
    }
}
