//! `confab chat`: a conversation that outlives its connections.
//!
//! The chat reconnects by itself after a lost connection or a server
//! restart (with backoff, saying so), keeps what the user types meanwhile in
//! an outbox and sends it, in order and under the ids it got when it was
//! typed, once the connection is back. It ends on ctrl-d, ctrl-c or `/quit`
//! (after the lines in flight are answered, for a few seconds at most), or
//! on what no reconnect can fix: a session that was ended, a device that
//! was removed, a peer that does not exist, and (from a script) a key change
//! that was not accepted.

mod outbox;
mod terminal;
mod view;

use std::io::IsTerminal;
use std::pin::Pin;
use std::time::Duration;

use confab_client::{Client, ClientError, Event, Events, Sent};
use confab_protocol::{ConversationId, ErrorCode, Username};

use crate::cli::target::Target;
use tokio::time::Instant;

use super::Failure;
use super::backoff::Backoff;
use super::session::{Device, Local, session_over, worth_retrying};
use outbox::{Outbox, Queued};
use terminal::{Terminal, Typed};
use view::ChatView;

/// After the input ends, how long lines in flight may take to be answered.
const LEAVE_INTERACTIVE: Duration = Duration::from_secs(5);
const LEAVE_SCRIPT: Duration = Duration::from_secs(30);
/// A send that failed without a verdict (a timeout, `rate_limited`) is
/// tried again after this pause.
const RESEND_PAUSE: Duration = Duration::from_secs(1);
/// A connection that lasted this long starts the backoff over; one that
/// dropped sooner (a server that accepts, then fails) makes it grow.
const STABLE: Duration = Duration::from_secs(5);

pub async fn chat(local: &Local, user: &str) -> Result<(), Failure> {
    let device = Device::open(local)?;
    let target = Target::parse(user);
    if let Target::User(name) = &target {
        // A valid username is also a safe file name (the outbox's).
        Username::new(name).map_err(|_| Failure::new(2, format!("{user:?} is not a user name")))?;
    }
    let terminal = Terminal::start();
    let interactive = std::io::stdin().is_terminal();
    let view = ChatView::new(
        interactive,
        terminal.printer(),
        &device.session.user,
        &target.to_string(),
        target.is_group(),
    );
    let mut chat = Chat {
        outbox: Outbox::load(&local.dir, &target.file_key()),
        device,
        target,
        terminal,
        view,
        leaving: None,
        marked: 0,
        connected_before: false,
        backoff: Backoff::default(),
    };
    let result = chat.run().await;
    chat.terminal.flush().await;
    result
}

struct Chat {
    device: Device,
    /// The user or `#group` chatted with.
    target: Target,
    terminal: Terminal,
    view: ChatView,
    outbox: Outbox,
    /// Set when the input ended: the chat ends once the outbox is empty, or
    /// at this deadline.
    leaving: Option<Instant>,
    /// Highest seq of this chat marked read.
    marked: i64,
    connected_before: bool,
    backoff: Backoff,
}

/// One connection, with the conversation opened; the offline backlog
/// follows on its events.
struct Live {
    client: Client,
    events: Events,
    conv: ConversationId,
}

enum Ended {
    /// The user left and nothing is left to wait for.
    Left,
    /// The connection was lost, for this reason.
    Lost(String),
}

type Sending<'a> = Pin<Box<dyn Future<Output = (Queued, Result<Sent, ClientError>)> + 'a>>;

impl Chat {
    async fn run(&mut self) -> Result<(), Failure> {
        self.view.hello();
        loop {
            let why = match self.connect().await {
                Ok(live) => {
                    let since = Instant::now();
                    let ended = self.live(live).await?;
                    if since.elapsed() >= STABLE {
                        self.backoff.reset();
                    }
                    match ended {
                        Ended::Left => return self.leave(),
                        Ended::Lost(why) => why,
                    }
                }
                Err(failure) if failure.retry => failure.message,
                Err(failure) => return Err(failure),
            };
            self.terminal.set_online(false);
            if self.may_leave_offline() {
                return self.leave();
            }
            let delay = self.backoff.next();
            self.view.offline(&why, delay);
            if self.wait_offline(delay).await {
                return self.leave();
            }
        }
    }

    async fn connect(&mut self) -> Result<Live, Failure> {
        let (client, events) = self.device.connect().await?;
        let conv = self.target.conversation(&client).await?;
        if self.target.is_group() {
            let members = client.members(conv).await?.items;
            self.view
                .set_members(members.into_iter().map(|m| m.user).collect());
        }
        Ok(Live {
            client,
            events,
            conv,
        })
    }

    /// Chats over one connection until it is lost or the user leaves.
    async fn live(&mut self, live: Live) -> Result<Ended, Failure> {
        let Live {
            client,
            mut events,
            conv,
        } = live;
        self.view.conv = conv;
        self.terminal.set_online(true);
        self.view.online(self.connected_before);
        if !self.connected_before && self.view.interactive {
            // Some context: what was shown before (the newest messages, on
            // a device that has shown nothing yet). What the backlog brings
            // again is then not shown twice (the view skips it).
            let shown = self.device.sync.state.watermark(conv);
            let before = (shown > 0).then_some(shown + 1);
            match client.history(conv, before, 20).await {
                Ok(earlier) => {
                    let last = earlier.last().map_or(0, |r| r.message().seq);
                    self.view.context(&earlier);
                    self.mark_read(&client, last).await;
                }
                Err(e) if worth_retrying(&e) => return Ok(Ended::Lost(e.to_string())),
                Err(e) => self
                    .view
                    .error("history", &format!("no earlier messages: {e}")),
            }
        }
        self.connected_before = true;

        let mut sending: Option<Sending<'_>> = None;
        let mut resend_at = Instant::now();
        loop {
            if let Some(deadline) = self.leaving
                && (self.outbox.is_empty() || Instant::now() >= deadline)
            {
                drop(sending);
                client.close().await;
                return Ok(Ended::Left);
            }
            // One line at a time, in the order typed.
            if sending.is_none()
                && Instant::now() >= resend_at
                && let Some(q) = self.outbox.next().cloned()
            {
                let client = &client;
                sending = Some(Box::pin(async move {
                    let result = client
                        .send_with_id(conv, q.id.clone(), q.text.clone())
                        .await;
                    (q, result)
                }));
            }
            // Woken for the next try of a line, or the deadline to leave.
            let retry = (sending.is_none() && !self.outbox.is_empty()).then_some(resend_at);
            let wake = self.leaving.into_iter().chain(retry).min();
            tokio::select! {
                typed = self.terminal.next(), if self.leaving.is_none() => self.typed(typed, true),
                (q, result) = async { sending.as_mut().expect("checked").await }, if sending.is_some() => {
                    sending = None;
                    if self.answered(q, result)? {
                        resend_at = Instant::now() + RESEND_PAUSE;
                    }
                }
                event = events.recv() => match event {
                    Some(Event::Closed(error)) => {
                        return match error {
                            Some(e) if session_over(e.code) => Err(self.device.session_over(e.code)),
                            // Reconnecting would close the newer one in turn.
                            Some(e) if e.code == ErrorCode::Replaced => Err(Failure::other(
                                "another connection of this device took this one's place; close other chats of this device, or log in as another device",
                            )),
                            Some(e) => Ok(Ended::Lost(format!("{}: {}", e.code, e.message))),
                            None => Ok(Ended::Lost("connection lost".into())),
                        };
                    }
                    None => return Ok(Ended::Lost("connection lost".into())),
                    Some(event) => {
                        let members_changed = matches!(&event, Event::GroupChange(m) if m.conv == conv);
                        let read = self.view.event(event);
                        if members_changed && let Ok(list) = client.members(conv).await {
                            self.view.set_members(list.items.into_iter().map(|m| m.user).collect());
                        }
                        self.shown(&mut events);
                        if let Some(seq) = read {
                            self.mark_read(&client, seq).await;
                        }
                    }
                },
                _ = tokio::time::sleep_until(wake.unwrap_or_else(Instant::now)), if wake.is_some() => {}
            }
        }
    }

    /// What the view has shown is saved as shown, then confirmed.
    fn shown(&mut self, events: &mut Events) {
        self.device.sync.save();
        events.done();
    }

    fn typed(&mut self, typed: Typed, online: bool) {
        match typed {
            Typed::Line(text) if text.trim() == "/quit" => self.leave_soon(),
            Typed::Line(text) if text.trim().is_empty() => {}
            Typed::Line(text) => {
                let queued = self.outbox.push(text);
                if !online {
                    self.view.queued(&queued);
                }
            }
            Typed::End => self.leave_soon(),
        }
    }

    fn leave_soon(&mut self) {
        let wait = if self.view.interactive {
            LEAVE_INTERACTIVE
        } else {
            LEAVE_SCRIPT
        };
        self.leaving = Some(Instant::now() + wait);
    }

    /// The server answered a queued line. True when it should be sent again
    /// after a pause (no verdict yet); a refusal removes it from the outbox.
    fn answered(&mut self, q: Queued, result: Result<Sent, ClientError>) -> Result<bool, Failure> {
        for notice in self.device.e2e.take_notices() {
            self.view.devices(&notice);
        }
        match result {
            Ok(sent) => {
                self.outbox.remove(&q.id);
                self.view.sent(&sent, q.text);
                Ok(false)
            }
            Err(e @ ClientError::KeyChanged(_)) => {
                // A script must not go on talking to keys nobody checked.
                if !self.view.interactive {
                    return Err(e.into());
                }
                self.outbox.remove(&q.id);
                self.view
                    .error("key_changed", &format!("not sent: {}: {e}", q.text));
                Ok(false)
            }
            Err(e) if worth_retrying(&e) => Ok(true),
            Err(e) => {
                self.outbox.remove(&q.id);
                let code = e.code().map(|c| c.as_str()).unwrap_or("failed");
                self.view.error(code, &format!("not sent: {}: {e}", q.text));
                Ok(false)
            }
        }
    }

    /// What the chat shows, the user has read.
    async fn mark_read(&mut self, client: &Client, seq: i64) {
        if seq > self.marked && !super::session::test_silent_receipts() {
            self.marked = seq;
            let _ = client.read(self.view.conv, seq).await;
        }
    }

    /// Waits before the next attempt, taking what is typed meanwhile. True
    /// when the user has left and nothing keeps the chat.
    async fn wait_offline(&mut self, delay: Duration) -> bool {
        let until = Instant::now() + delay;
        loop {
            if self.may_leave_offline() {
                return true;
            }
            let wake = self.leaving.map_or(until, |deadline| deadline.min(until));
            tokio::select! {
                typed = self.terminal.next(), if self.leaving.is_none() => self.typed(typed, false),
                _ = tokio::time::sleep_until(wake) => {
                    if Instant::now() >= until {
                        return false;
                    }
                }
            }
        }
    }

    /// Offline after the input ended: a person has gone (what is queued
    /// stays for the next chat); a script waits for its lines to go out,
    /// until its deadline.
    fn may_leave_offline(&self) -> bool {
        match self.leaving {
            Some(deadline) => {
                self.view.interactive || self.outbox.is_empty() || Instant::now() >= deadline
            }
            None => false,
        }
    }

    fn leave(&self) -> Result<(), Failure> {
        let unsent = self.outbox.len();
        self.view.unsent(unsent);
        if unsent > 0 && !self.view.interactive {
            return Err(Failure::timed_out(format!(
                "{unsent} message(s) not sent; they stay queued for the next `confab chat {}`",
                self.target
            )));
        }
        Ok(())
    }
}
