//! Messaging commands: send, chat, conversations, history, block, settings.

use std::collections::BTreeMap;
use std::io::IsTerminal;
use std::time::{Duration, Instant};

use confab_client::e2e::{DevicesChanged, Received, Undecryptable};
use confab_client::{Client, ClientError, Event, Sent};
use confab_protocol::{ConversationId, Message};
use futures_util::StreamExt;
use futures_util::stream::FuturesUnordered;
use serde_json::json;
use tokio::io::{AsyncBufReadExt, BufReader};

use super::Failure;
use super::output::{self, ago, clock, json_line};
use super::session::{Connected, Local};

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum WaitFor {
    Delivered,
    Read,
}

pub async fn send(
    local: &Local,
    user: &str,
    text: String,
    wait: Option<WaitFor>,
    timeout_secs: u64,
    json: bool,
) -> Result<(), Failure> {
    let mut c = Connected::open(local).await?;
    for event in c.backlog.drain(..) {
        output::notify(&event);
    }
    let peer = user.to_ascii_lowercase();
    let conv = c.client.open(&peer).await?;
    let sent = c.client.send(conv, text).await;
    for notice in c.e2e.take_notices() {
        output::notify_devices(&notice);
    }
    let sent = sent?;
    let mut status = "sent";
    if let Some(wait) = wait {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(timeout_secs);
        loop {
            let event = tokio::time::timeout_at(deadline, c.events.recv())
                .await
                .map_err(|_| {
                    Failure::timed_out(
                        format!("stored, but not {wait:?} within {timeout_secs} s").to_lowercase(),
                    )
                })?;
            match event {
                Some(Event::Receipt {
                    conv: c2,
                    user,
                    delivered,
                    read,
                }) if c2 == conv && user == peer => {
                    if read.is_some_and(|r| r >= sent.seq) {
                        status = "read";
                    } else if delivered >= sent.seq && wait == WaitFor::Delivered {
                        status = "delivered";
                    }
                    if status != "sent" {
                        break;
                    }
                }
                Some(Event::Closed(_)) | None => {
                    return Err(Failure::other(
                        "stored, but the connection closed while waiting",
                    ));
                }
                Some(event) => output::notify(&event),
            }
        }
    }
    if json {
        json_line(
            json!({"id": sent.id, "conv": sent.conv, "seq": sent.seq, "ts": sent.ts, "status": status}),
        );
    } else {
        println!("{status}: message {} to {peer}", sent.seq);
    }
    c.client.close().await;
    Ok(())
}

pub async fn conversations(local: &Local, json: bool) -> Result<(), Failure> {
    let client = Connected::open(local).await?.into_client();
    let list = client.conversations().await?;
    if json {
        json_line(serde_json::to_value(&list).map_err(anyhow::Error::from)?);
    } else if list.is_empty() {
        println!("no conversations yet; start one with `confab send <user> <text>`");
    } else {
        for item in list {
            let last = item
                .last_ts
                .map(|t| format!("last {} UTC", clock(t)))
                .unwrap_or_default();
            println!("{:<20} {:>4} unread  {last}", item.peer, item.unread);
        }
    }
    client.close().await;
    Ok(())
}

pub async fn history(
    local: &Local,
    user: &str,
    limit: u32,
    before: Option<i64>,
    json: bool,
) -> Result<(), Failure> {
    let client = Connected::open(local).await?.into_client();
    let conv = client.open(user).await?;
    let messages = client.history(conv, before, limit).await?;
    for r in &messages {
        let m = r.message();
        if json {
            json_line(received_json(r));
        } else {
            println!(
                "#{:<5} {} {}: {}",
                m.seq,
                clock(m.ts),
                m.from,
                display_text(r)
            );
        }
    }
    client.close().await;
    Ok(())
}

pub async fn block(local: &Local, user: &str, on: bool) -> Result<(), Failure> {
    let client = Connected::open(local).await?.into_client();
    if on {
        client.block(user).await?;
        println!("blocked {user}");
    } else {
        client.unblock(user).await?;
        println!("unblocked {user}");
    }
    client.close().await;
    Ok(())
}

pub async fn settings(local: &Local, read_receipts: bool) -> Result<(), Failure> {
    let client = Connected::open(local).await?.into_client();
    client.set_read_receipts(read_receipts).await?;
    println!("read receipts {}", if read_receipts { "on" } else { "off" });
    client.close().await;
    Ok(())
}

fn message_json(m: &Message) -> serde_json::Value {
    json!({"event": "message", "conv": m.conv, "seq": m.seq, "id": m.id, "from": m.from, "ts": m.ts, "text": m.body})
}

/// The text of a message, or why it cannot be read.
fn display_text(r: &Received) -> String {
    match r {
        Received::Text(m) => m.body.clone(),
        Received::Undecryptable(u) => format!("[cannot be read: {}]", u.reason),
    }
}

fn undecryptable_json(u: &Undecryptable) -> serde_json::Value {
    let m = &u.message;
    json!({"event": "undecryptable", "conv": m.conv, "seq": m.seq, "id": m.id, "from": m.from, "ts": m.ts, "reason": u.reason})
}

fn received_json(r: &Received) -> serde_json::Value {
    match r {
        Received::Text(m) => message_json(m),
        Received::Undecryptable(u) => undecryptable_json(u),
    }
}

/// Where each of my messages in this chat stands.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Debug)]
enum Tick {
    Sent,
    Delivered,
    Read,
}

/// The chat as shown: to a person (lines with ticks) or to a script (JSON lines).
struct ChatView {
    interactive: bool,
    me: String,
    peer: String,
    conv: ConversationId,
    /// My messages of this session by seq, with their text and tick.
    mine: BTreeMap<i64, (String, Tick)>,
    last_typing_shown: Option<Instant>,
    /// Highest seq of this conversation shown so far.
    shown: i64,
}

impl ChatView {
    fn received(&mut self, r: &Received) {
        let m = r.message();
        if !self.interactive {
            return json_line(received_json(r));
        }
        if m.conv != self.conv {
            return match r {
                Received::Text(m) => output::notify_message(m),
                Received::Undecryptable(u) => output::notify_undecryptable(u),
            };
        }
        // History and live events can overlap right after connecting.
        if m.seq <= self.shown {
            return;
        }
        self.shown = m.seq;
        let who = if m.from == self.me {
            "you"
        } else {
            m.from.as_str()
        };
        println!("[{}] {who}: {}", clock(m.ts), display_text(r));
    }

    fn devices(&self, change: &DevicesChanged) {
        if self.interactive {
            println!("{}", output::describe_devices(change));
        } else {
            json_line(json!({
                "event": "devices_changed",
                "user": change.user,
                "added": change.added,
                "removed": change.removed,
                "key_change": change.key_change,
                "accepted": change.accepted,
            }));
        }
    }

    fn sent(&mut self, sent: &Sent, text: String) {
        if self.interactive {
            println!("[{}] you: {text}  ✓", clock(sent.ts));
        } else {
            json_line(
                json!({"event": "sent", "conv": sent.conv, "seq": sent.seq, "id": sent.id, "ts": sent.ts, "text": text}),
            );
        }
        self.mine.insert(sent.seq, (text, Tick::Sent));
    }

    /// A receipt cursor moved: every message of mine at or below it advances.
    fn receipt(&mut self, delivered: i64, read: Option<i64>) {
        let mut changed = Vec::new();
        for (seq, (text, tick)) in self.mine.iter_mut() {
            let now = if read.is_some_and(|r| *seq <= r) {
                Tick::Read
            } else if *seq <= delivered {
                Tick::Delivered
            } else {
                continue;
            };
            if now > *tick {
                *tick = now;
                changed.push((*seq, text.clone(), now));
            }
        }
        for (seq, text, tick) in changed {
            let name = if tick == Tick::Read {
                "read"
            } else {
                "delivered"
            };
            if self.interactive {
                println!("  ✓✓ {name}: {text}");
            } else {
                json_line(json!({"event": name, "conv": self.conv, "seq": seq}));
            }
        }
    }

    fn presence(&self, online: bool, last_seen: Option<i64>) {
        if !self.interactive {
            return json_line(
                json!({"event": "presence", "user": self.peer, "online": online, "last_seen": last_seen}),
            );
        }
        match (online, last_seen) {
            (true, _) => println!("* {} is online", self.peer),
            (false, Some(t)) => println!("* {} was last seen {}", self.peer, ago(t)),
            (false, None) => println!("* {} is offline", self.peer),
        }
    }

    fn typing(&mut self) {
        if !self.interactive {
            return json_line(json!({"event": "typing", "user": self.peer}));
        }
        if self
            .last_typing_shown
            .is_none_or(|t| t.elapsed() > Duration::from_secs(3))
        {
            self.last_typing_shown = Some(Instant::now());
            println!("* {} is typing…", self.peer);
        }
    }

    fn error(&self, code: &str, message: &str) {
        if self.interactive {
            eprintln!("! {code}: {message}");
        } else {
            json_line(json!({"event": "error", "code": code, "message": message}));
        }
    }

    /// Shows a message; returns its seq when it belongs to this chat.
    fn show(&mut self, r: Received) -> Option<i64> {
        self.received(&r);
        let m = r.message();
        (m.conv == self.conv).then_some(m.seq)
    }

    /// Shows an event; returns the seq to mark read when it is a message of this chat.
    fn event(&mut self, event: Event) -> Option<i64> {
        match event {
            Event::Message(m) => self.show(Received::Text(m)),
            Event::Undecryptable(u) => self.show(Received::Undecryptable(u)),
            Event::DevicesChanged(change) => {
                self.devices(&change);
                None
            }
            Event::Receipt {
                conv,
                user,
                delivered,
                read,
            } if conv == self.conv && user == self.peer => {
                self.receipt(delivered, read);
                None
            }
            Event::Presence {
                user,
                online,
                last_seen,
            } if user == self.peer => {
                self.presence(online, last_seen);
                None
            }
            Event::Typing { conv, user } if conv == self.conv && user == self.peer => {
                self.typing();
                None
            }
            Event::Error(e) => {
                self.error(e.code.as_str(), &e.message);
                None
            }
            _ => None,
        }
    }
}

pub async fn chat(local: &Local, user: &str) -> Result<(), Failure> {
    let interactive = std::io::stdin().is_terminal();
    let Connected {
        client,
        mut events,
        session,
        e2e,
        backlog,
    } = Connected::open(local).await?;
    let peer = user.to_ascii_lowercase();
    let conv = client.open(&peer).await?;
    let mut view = ChatView {
        interactive,
        me: session.user.clone(),
        peer: peer.clone(),
        conv,
        mine: BTreeMap::new(),
        last_typing_shown: None,
        shown: 0,
    };
    let mut last_read = 0;
    if interactive {
        println!("chatting with {peer} (type a line and press enter; ctrl-d to quit)");
        // Some context from before what is new to this device.
        let first_new = backlog.iter().find_map(|e| match e {
            Event::Message(m) if m.conv == conv => Some(m.seq),
            Event::Undecryptable(u) if u.message.conv == conv => Some(u.message.seq),
            _ => None,
        });
        for r in client.history(conv, first_new, 20).await? {
            last_read = r.message().seq;
            view.received(&r);
        }
    }
    for event in backlog {
        if let Some(seq) = view.event(event) {
            last_read = last_read.max(seq);
        }
    }
    mark_read(&client, conv, &mut 0, last_read).await;
    let mut marked = last_read;

    let mut lines = BufReader::new(tokio::io::stdin()).lines();
    let mut sending = FuturesUnordered::new();
    let mut reading = true;
    loop {
        tokio::select! {
            line = lines.next_line(), if reading => match line {
                Ok(Some(text)) if !text.trim().is_empty() => {
                    let client = &client;
                    sending.push(async move { (client.send(conv, text.clone()).await, text) });
                }
                Ok(Some(_)) => {}
                Ok(None) | Err(_) => reading = false,
            },
            Some((result, text)) = sending.next(), if !sending.is_empty() => match result {
                Ok(sent) => {
                    for notice in e2e.take_notices() {
                        view.devices(&notice);
                    }
                    view.sent(&sent, text)
                }
                Err(e @ ClientError::KeyChanged(_)) => {
                    for notice in e2e.take_notices() {
                        view.devices(&notice);
                    }
                    // A script must not go on talking to keys nobody checked.
                    if !interactive {
                        return Err(e.into());
                    }
                    view.error("key_changed", &format!("not sent: {text}: {e}"));
                }
                Err(e) => view.error(e.code().map(|c| c.as_str()).unwrap_or("failed"), &format!("not sent: {text}: {e}")),
            },
            event = events.recv() => match event {
                Some(Event::Closed(Some(error))) => {
                    return Err(Failure::other(format!("disconnected: {}", error.message)));
                }
                Some(Event::Closed(None)) | None => return Err(Failure::other("disconnected: connection lost")),
                Some(event) => {
                    if let Some(seq) = view.event(event) {
                        mark_read(&client, conv, &mut marked, seq).await;
                    }
                }
            },
        }
        if !reading && sending.is_empty() {
            break;
        }
    }
    drop(sending);
    client.close().await;
    Ok(())
}

/// What the chat shows, the user has read.
async fn mark_read(client: &Client, conv: ConversationId, marked: &mut i64, seq: i64) {
    if seq > *marked {
        *marked = seq;
        let _ = client.read(conv, seq).await;
    }
}
