//! The chat as shown: to a person (lines with ticks) or to a script (one
//! JSON event per line). Everything from the network is made safe for the
//! terminal (`output::safe`, `output::json_text`) before it is shown.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use confab_client::e2e::{DevicesChanged, Received};
use confab_client::{Event, Sent};
use confab_protocol::ConversationId;
use serde_json::json;

use super::outbox::Queued;
use super::terminal::Printer;
use crate::cli::messages::{display_text, received_json};
use crate::cli::output::{self, ago, clock, json_text, safe};

/// Where each of my messages in this chat stands.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Debug)]
enum Tick {
    Sent,
    Delivered,
    Read,
}

pub struct ChatView {
    pub interactive: bool,
    out: Printer,
    me: String,
    /// The peer's name, or `#group`.
    peer: String,
    group: bool,
    /// In a group: the other current members, and how far each has it.
    others: Vec<String>,
    cursors: BTreeMap<String, (i64, i64)>,
    /// Known once the conversation is open.
    pub conv: ConversationId,
    /// My messages of this chat by seq, with their text and tick.
    mine: BTreeMap<i64, (String, Tick)>,
    last_typing_shown: Option<Instant>,
    /// Highest seq of this conversation shown so far.
    shown: i64,
}

impl ChatView {
    pub fn new(interactive: bool, out: Printer, me: &str, peer: &str, group: bool) -> Self {
        Self {
            interactive,
            out,
            me: me.to_string(),
            peer: peer.to_string(),
            group,
            others: Vec::new(),
            cursors: BTreeMap::new(),
            conv: ConversationId(0),
            mine: BTreeMap::new(),
            last_typing_shown: None,
            shown: 0,
        }
    }

    fn json(&self, value: serde_json::Value) {
        self.out.line(json_text(&value));
    }

    pub fn hello(&self) {
        if self.interactive {
            self.out.line(format!(
                "chatting with {} (type a line and press enter; ctrl-d or /quit to leave)",
                safe(&self.peer)
            ));
        }
    }

    /// Messages from before what is new, for context: marked as such.
    pub fn context(&mut self, earlier: &[Received]) {
        if !self.interactive || earlier.is_empty() {
            return;
        }
        self.out.line("· earlier ·");
        for r in earlier {
            self.received(r);
        }
        self.out.line("· now ·");
    }

    pub fn received(&mut self, r: &Received) {
        let m = r.message();
        if !self.interactive {
            return self.json(received_json(r));
        }
        if m.conv != self.conv {
            let what = match r {
                Received::Text(m) => format!(
                    "* new message from {} ({} UTC): {}",
                    safe(&m.from),
                    clock(m.ts),
                    display_text(r)
                ),
                Received::File(_) | Received::Undecryptable(_) | Received::GroupChange(_) => {
                    format!(
                        "* a message from {} ({} UTC) {}",
                        safe(&m.from),
                        clock(m.ts),
                        display_text(r)
                    )
                }
            };
            return self.out.line(what);
        }
        // History and live events can overlap right after connecting.
        if m.seq <= self.shown {
            return;
        }
        self.shown = m.seq;
        let who = if m.from == self.me {
            "you".into()
        } else {
            safe(&m.from)
        };
        self.out
            .line(format!("[{}] {who}: {}", clock(m.ts), display_text(r)));
    }

    pub fn devices(&self, change: &DevicesChanged) {
        if self.interactive {
            self.out.line(output::describe_devices(change));
        } else {
            self.json(json!({
                "event": "devices_changed",
                "user": change.user,
                "added": change.added,
                "removed": change.removed,
                "key_change": change.key_change,
                "accepted": change.accepted,
            }));
        }
    }

    /// A typed line waits for the connection.
    pub fn queued(&self, q: &Queued) {
        if self.interactive {
            self.out.line(format!(
                "  … queued, sent once the connection is back: {}",
                safe(&q.text)
            ));
        } else {
            self.json(json!({"event": "queued", "id": q.id, "text": q.text}));
        }
    }

    pub fn sent(&mut self, sent: &Sent, text: String) {
        if self.interactive {
            self.out
                .line(format!("[{}] you: {}  ✓", clock(sent.ts), safe(&text)));
        } else {
            self.json(
                json!({"event": "sent", "conv": sent.conv, "seq": sent.seq, "id": sent.id, "ts": sent.ts, "text": text}),
            );
        }
        self.mine.insert(sent.seq, (text, Tick::Sent));
    }

    /// A group's current members (this user among them).
    pub fn set_members(&mut self, members: Vec<String>) {
        self.others = members.into_iter().filter(|m| *m != self.me).collect();
        self.cursors.retain(|user, _| self.others.contains(user));
    }

    /// In a group, a member's cursor moved: my messages it passed say how
    /// many of the others have them, and have read them.
    fn group_receipt(&mut self, user: String, delivered: i64, read: Option<i64>) {
        if !self.others.contains(&user) {
            return;
        }
        let (old_delivered, old_read) = self.cursors.get(&user).copied().unwrap_or((0, 0));
        let now = (
            old_delivered.max(delivered),
            old_read.max(read.unwrap_or(0)),
        );
        self.cursors.insert(user, now);
        let n = self.others.len();
        let count = |seq: i64, pick: fn(&(i64, i64)) -> i64| {
            self.cursors.values().filter(|c| pick(c) >= seq).count()
        };
        let moved: Vec<(i64, String)> = self
            .mine
            .range(old_delivered.min(old_read) + 1..=now.0)
            .map(|(seq, (text, _))| (*seq, text.clone()))
            .collect();
        for (seq, text) in moved {
            let (has, read) = (count(seq, |c| c.0), count(seq, |c| c.1));
            if self.interactive {
                self.out.line(format!(
                    "  ✓✓ delivered to {has} of {n}, read by {read} of {n}: {}",
                    safe(&text)
                ));
            } else {
                self.json(json!({"event": "receipts", "conv": self.conv, "seq": seq,
                                 "delivered": has, "read": read, "members": n}));
            }
        }
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
                self.out.line(format!("  ✓✓ {name}: {}", safe(&text)));
            } else {
                self.json(json!({"event": name, "conv": self.conv, "seq": seq}));
            }
        }
    }

    fn presence(&self, online: bool, last_seen: Option<i64>) {
        if !self.interactive {
            return self.json(
                json!({"event": "presence", "user": self.peer, "online": online, "last_seen": last_seen}),
            );
        }
        let peer = safe(&self.peer);
        self.out.line(match (online, last_seen) {
            (true, _) => format!("* {peer} is online"),
            (false, Some(t)) => format!("* {peer} was last seen {}", ago(t)),
            (false, None) => format!("* {peer} is offline"),
        });
    }

    fn typing(&mut self, user: &str) {
        if !self.interactive {
            return self.json(json!({"event": "typing", "user": user}));
        }
        if self
            .last_typing_shown
            .is_none_or(|t| t.elapsed() > Duration::from_secs(3))
        {
            self.last_typing_shown = Some(Instant::now());
            self.out.line(format!("* {} is typing…", safe(user)));
        }
    }

    pub fn error(&self, code: &str, message: &str) {
        if self.interactive {
            self.out.line(format!("! {code}: {}", safe(message)));
        } else {
            self.json(json!({"event": "error", "code": code, "message": message}));
        }
    }

    /// The connection is up (again).
    pub fn online(&self, again: bool) {
        if !self.interactive {
            self.json(json!({"event": "connected"}));
        } else if again {
            self.out.line("* connected again");
        }
    }

    /// The connection is gone: why, and when the next attempt is.
    pub fn offline(&self, why: &str, retry_in: Duration) {
        if self.interactive {
            self.out.line(format!(
                "* offline ({}); reconnecting in {:.1} s; what you type is sent once connected",
                safe(why),
                retry_in.as_secs_f64()
            ));
        } else {
            self.json(json!({
                "event": "disconnected",
                "reason": why,
                "retry_in_ms": retry_in.as_millis() as u64,
            }));
        }
    }

    /// Leaving with lines not yet sent: they stay queued for the next chat.
    pub fn unsent(&self, count: usize) {
        if count == 0 {
            return;
        }
        if self.interactive {
            self.out.line(format!(
                "* {count} message(s) not sent yet; they go out the next time you chat with {}",
                safe(&self.peer)
            ));
        } else {
            self.json(json!({"event": "unsent", "count": count}));
        }
    }

    /// Shows a message; returns its seq when it belongs to this chat.
    fn show(&mut self, r: Received) -> Option<i64> {
        self.received(&r);
        let m = r.message();
        (m.conv == self.conv).then_some(m.seq)
    }

    /// Shows an event; returns the seq to mark read when it is a message of this chat.
    pub fn event(&mut self, event: Event) -> Option<i64> {
        match event {
            Event::Message(m) => self.show(Received::Text(m)),
            Event::File(f) => self.show(Received::File(f)),
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
            } if conv == self.conv && self.group => {
                self.group_receipt(user, delivered, read);
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
            Event::Typing { conv, user }
                if conv == self.conv && (user == self.peer || (self.group && user != self.me)) =>
            {
                self.typing(&user);
                None
            }
            Event::GroupChange(m) => self.show(Received::GroupChange(m)),
            Event::Error(e) => {
                self.error(e.code.as_str(), &e.message);
                None
            }
            _ => None,
        }
    }
}
