//! One authenticated WebSocket: a single task that reads the client's
//! frames, writes events from the hub, and waits for the store's commits.
//!
//! Ordering and exactly-once per device rest on one rule, kept in
//! [`Connection::deliver_in_order`]: for each conversation the connection
//! remembers the highest seq it has written (its watermark) and writes only
//! seq = watermark + 1. An event from the hub that is already covered is
//! dropped; one that is ahead fills the gap from the store first. Sync at
//! connect, live fan-out and the store's commits from other connections all
//! go through it, in whatever order they arrive.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::ws::{CloseFrame, Message as WsMessage, Utf8Bytes, WebSocket};
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use confab_crypto::Envelope;
use confab_protocol::{
    ClientFrame, ConversationId, ConversationSummary, DeviceDiff, DeviceId, ErrorCode, ErrorFrame,
    FrameError, MessageId, PROTOCOL_VERSION, ServerFrame, Username, Welcome, parse_client_frame,
};
use confab_store::sqlite::now_ms;
use confab_store::{
    Appended, CursorUpdate, Member, MemberCursors, NewMessage, Page, SessionRecord, StoreError,
    UserId,
};
use futures_util::stream::FuturesOrdered;
use futures_util::{SinkExt, StreamExt};
use tokio::sync::mpsc;

use crate::AppState;
use crate::hub::{Delivery, Event, Kick, PresenceChange, Receipt};

/// Store operations one connection may have in flight before it stops
/// reading from its socket (backpressure onto the client).
const MAX_IN_FLIGHT: usize = 64;
/// Messages fetched per store read when catching up.
const SYNC_PAGE: u32 = 256;
/// A write that cannot complete in this time means the client stopped reading.
const WRITE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long pending commits are awaited when the connection ends.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(10);
/// At most one typing notice per conversation per this interval.
const TYPING_INTERVAL: Duration = Duration::from_secs(1);
const MAX_HISTORY_PAGE: u32 = 500;
/// Queued events written before one flush.
const EVENT_BURST: usize = 64;
/// Message bodies per store read (sync page or history reply): bounds the
/// memory a request costs and the size of a `history` frame, whatever the
/// bodies' sizes. A `history` reply may so hold fewer than asked for.
const PAGE_BYTES: usize = 1024 * 1024;
/// Conversations whose membership a connection remembers.
const MAX_CACHED_CONVERSATIONS: usize = 4096;

/// Why a connection ends.
#[derive(Debug)]
enum Closing {
    /// The client closed, or the socket failed: nothing more can be written.
    Gone,
    /// Tell the client why, then close.
    Because(ErrorCode, String),
}

impl Closing {
    fn because(code: ErrorCode, message: impl Into<String>) -> Self {
        Closing::Because(code, message.into())
    }
}

/// A request that failed: answered with an error frame, the connection stays.
enum Fault {
    /// The error frame to answer with; `ref` and `id` are filled in from
    /// the request.
    Refused(ErrorFrame),
    Close(Closing),
}

impl From<Closing> for Fault {
    fn from(c: Closing) -> Self {
        Fault::Close(c)
    }
}

fn refuse(code: ErrorCode, message: impl Into<String>) -> Fault {
    Fault::Refused(ErrorFrame::new(code, message))
}

impl From<StoreError> for Fault {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::NotFound => refuse(ErrorCode::NotMember, "no such conversation"),
            other => {
                tracing::error!(error = %other, "store failure");
                refuse(
                    ErrorCode::StorageUnavailable,
                    "storage is unavailable; retry",
                )
            }
        }
    }
}

/// What the connection knows of a conversation it has touched.
struct ConvInfo {
    members: Arc<[UserId]>,
    peer: Option<Member>,
    blocked: bool,
    /// Whether this user has sent here (its presence and typing are visible
    /// to the peer only after that).
    i_have_sent: bool,
}

enum Completed {
    Append {
        id: MessageId,
        conv: ConversationId,
        /// Who gets it, as known when it was sent.
        members: Arc<[UserId]>,
        accepted_at: Instant,
        result: Result<Appended, StoreError>,
    },
    Cursor {
        conv: ConversationId,
        result: Result<MemberCursors, StoreError>,
    },
}

type Pending = Pin<Box<dyn Future<Output = Completed> + Send>>;

struct RateLimit {
    tokens: f64,
    last: Instant,
    per_second: f64,
    burst: f64,
    /// Frames refused in a row; a client that keeps flooding is closed.
    refused: u32,
}

impl RateLimit {
    fn new(per_second: u32, burst: u32) -> Self {
        Self {
            tokens: burst as f64,
            last: Instant::now(),
            per_second: per_second as f64,
            burst: burst as f64,
            refused: 0,
        }
    }

    fn allow(&mut self) -> bool {
        let now = Instant::now();
        self.tokens = (self.tokens + now.duration_since(self.last).as_secs_f64() * self.per_second)
            .min(self.burst);
        self.last = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            self.refused = 0;
            true
        } else {
            self.refused += 1;
            false
        }
    }
}

pub async fn serve(state: AppState, mut ws: WebSocket, deadline: tokio::time::Instant) {
    metrics::gauge!("confab_connections").increment(1.0);
    match authenticate(&state, &mut ws, deadline).await {
        // Boxed, so that the authentication's state is not carried for the
        // connection's whole life (see `Connection::run`).
        Ok((session, token)) => Box::pin(run_session(&state, ws, session, &token)).await,
        Err(closing) => close(&mut ws, closing).await,
    }
    metrics::gauge!("confab_connections").decrement(1.0);
}

async fn close(ws: &mut WebSocket, closing: Closing) {
    if let Closing::Because(code, message) = closing {
        let frame = ServerFrame::error(code, message).to_json();
        let close_code = match code {
            ErrorCode::TooLarge => 1009,
            ErrorCode::ShuttingDown => 1001,
            _ => 1008,
        };
        let _ = tokio::time::timeout(Duration::from_secs(1), async {
            ws.send(WsMessage::Text(frame.into())).await?;
            ws.send(WsMessage::Close(Some(CloseFrame {
                code: close_code,
                reason: Utf8Bytes::from(code.as_str()),
            })))
            .await
        })
        .await;
    }
}

/// Reads the `auth` frame. Nothing else is accepted before it.
async fn authenticate(
    state: &AppState,
    ws: &mut WebSocket,
    deadline: tokio::time::Instant,
) -> Result<(SessionRecord, String), Closing> {
    let text = loop {
        let next = tokio::time::timeout_at(deadline, ws.recv())
            .await
            .map_err(|_| {
                Closing::because(
                    ErrorCode::AuthTimeout,
                    "authenticate within the handshake timeout",
                )
            })?;
        match next {
            Some(Ok(WsMessage::Text(text))) => break text,
            Some(Ok(WsMessage::Ping(_) | WsMessage::Pong(_))) => continue,
            Some(Ok(WsMessage::Binary(_))) => {
                return Err(Closing::because(
                    ErrorCode::BadFrame,
                    "frames are JSON text",
                ));
            }
            Some(Err(e)) => return Err(read_error(e)),
            Some(Ok(WsMessage::Close(_))) | None => return Err(Closing::Gone),
        }
    };
    match parse_client_frame(&text) {
        Ok(ClientFrame::Auth { v, token }) => {
            if v != PROTOCOL_VERSION {
                return Err(Closing::because(
                    ErrorCode::UnsupportedVersion,
                    format!("this server speaks protocol version {PROTOCOL_VERSION}"),
                ));
            }
            let session = crate::http::session_for_token(state, &token)
                .await
                .map_err(|(code, message)| Closing::because(code, message))?;
            Ok((session, token))
        }
        Ok(_) => Err(Closing::because(
            ErrorCode::Unauthorized,
            "the first frame must be auth",
        )),
        Err(e) => Err(Closing::because(e.code, e.message)),
    }
}

async fn run_session(state: &AppState, mut ws: WebSocket, session: SessionRecord, token: &str) {
    let read_receipts = match state.store.user(session.user).await {
        Ok(Some(user)) => user.read_receipts,
        // Failing closed: guessing the setting could show a read the user hides.
        _ => {
            let closing = Closing::because(
                ErrorCode::StorageUnavailable,
                "cannot load the account; reconnect later",
            );
            return close(&mut ws, closing).await;
        }
    };
    let (tx, rx) = mpsc::channel(state.config.send_queue.max(1));
    let kick = Arc::new(Kick::default());
    // Registered before the sync reads the store, so nothing committed in
    // between is missed: it is queued and the watermark sorts it out.
    let conn_id = state
        .hub
        .register(session.user, session.device, tx, kick.clone());
    // A device removed (or logged out) while this socket was authenticating
    // was kicked before it was registered: look again now that it is.
    if let Err((code, message)) = crate::http::session_for_token(state, token).await {
        state.hub.unregister(session.user, conn_id);
        return close(&mut ws, Closing::because(code, message)).await;
    }
    let mut conn = Connection {
        state: state.clone(),
        ws,
        user: session.user,
        username: session.username,
        device: session.device,
        expires_at: session.expires_at,
        events: rx,
        kick,
        watermarks: HashMap::new(),
        convs: HashMap::new(),
        pending: FuturesOrdered::new(),
        limit: RateLimit::new(state.config.frames_per_second, state.config.frame_burst),
        typing: HashMap::new(),
        read_receipts,
        unflushed: false,
        syncing: true,
        catch_up: HashMap::new(),
        session_ended: false,
    };
    if let Some(presence) = &state.presence
        && presence.connected(conn.user).await
    {
        Box::pin(conn.announce_presence(true, None)).await;
    }
    // Boxed like the handlers in `run`: see there.
    let closing = conn.run().await;
    // Still registered while draining, so the acks of the last commits
    // reach this socket through the hub like any other.
    // A connection whose session ended gets nothing new, only its own acks.
    conn.session_ended = matches!(
        &closing,
        Closing::Because(
            ErrorCode::DeviceRemoved | ErrorCode::Unauthorized | ErrorCode::TokenExpired,
            _
        )
    );
    Box::pin(conn.drain_pending()).await;
    state.hub.unregister(conn.user, conn_id);
    Box::pin(close(&mut conn.ws, closing)).await;
    if let Some(presence) = &state.presence
        && presence.disconnected(conn.user).await
    {
        let now = now_ms();
        if let Err(e) = state.store.set_last_seen(conn.user, now).await {
            tracing::warn!(error = %e, "could not store last seen");
        }
        // A quick reconnect may have announced "online" meanwhile; an
        // "offline" after it would be wrong until the next change.
        if !presence.is_online(conn.user).await {
            Box::pin(conn.announce_presence(false, Some(now))).await;
        }
    }
}

struct Connection {
    state: AppState,
    ws: WebSocket,
    user: UserId,
    username: String,
    device: DeviceId,
    /// When the session's token expires (ms since epoch); the socket closes then.
    expires_at: i64,
    events: mpsc::Receiver<Event>,
    kick: Arc<Kick>,
    /// Per conversation, the highest seq written to this socket; everything
    /// up to it has been written, in order.
    watermarks: HashMap<ConversationId, i64>,
    convs: HashMap<ConversationId, ConvInfo>,
    /// Store operations in flight. Ordered: the writer commits them in the
    /// order they were queued, and publishing them in that order spares the
    /// recipients a gap fill.
    pending: FuturesOrdered<Pending>,
    limit: RateLimit,
    typing: HashMap<ConversationId, Instant>,
    read_receipts: bool,
    unflushed: bool,
    /// True while the connect-time sync runs: live messages are then not
    /// queued up behind it but noted here and fetched from the store.
    syncing: bool,
    catch_up: HashMap<ConversationId, i64>,
    /// Set when the connection ends because its session ended: from then on
    /// nothing but its own acks is written.
    session_ended: bool,
}

enum Step {
    Kicked(ErrorCode),
    Shutdown,
    Completed(Completed),
    Event(Option<Event>),
    Frame(Option<Result<WsMessage, axum::Error>>),
    Idle,
    Expired,
}

impl Connection {
    async fn run(&mut self) -> Closing {
        // The handlers are boxed: a task's future is as large as its largest
        // state, allocated for as long as the connection lives, and most
        // connections sit idle in the loop below. Boxed, the loop's state is
        // what an idle connection costs (docs/performance.md).
        if let Err(closing) = Box::pin(self.start()).await {
            return closing;
        }
        let kick = self.kick.clone();
        let shutdown = self.state.shutdown.clone();
        let idle_timeout = self.state.config.idle_timeout;
        let idle = tokio::time::sleep(idle_timeout);
        tokio::pin!(idle);
        let expiry = tokio::time::sleep(Duration::from_millis(
            (self.expires_at - now_ms()).max(0) as u64
        ));
        tokio::pin!(expiry);
        loop {
            let reading = self.pending.len() < MAX_IN_FLIGHT;
            let step = tokio::select! {
                biased;
                reason = kick.kicked() => Step::Kicked(reason),
                _ = shutdown.cancelled() => Step::Shutdown,
                Some(done) = self.pending.next(), if !self.pending.is_empty() => Step::Completed(done),
                event = self.events.recv() => Step::Event(event),
                frame = self.ws.recv(), if reading => Step::Frame(frame),
                // While the store holds the connection back, silence is not the client's fault.
                _ = &mut idle, if reading => Step::Idle,
                _ = &mut expiry => Step::Expired,
            };
            let handled = match step {
                Step::Kicked(reason) => return Closing::because(reason, kick_message(reason)),
                Step::Shutdown => {
                    return Closing::because(
                        ErrorCode::ShuttingDown,
                        "the server is shutting down",
                    );
                }
                Step::Idle => {
                    return Closing::because(
                        ErrorCode::IdleTimeout,
                        "no frame within the idle timeout",
                    );
                }
                Step::Expired => {
                    return Closing::because(
                        ErrorCode::TokenExpired,
                        "the session expired; log in again",
                    );
                }
                Step::Completed(done) => Box::pin(self.completed(done)).await,
                Step::Event(None) => return Closing::Gone,
                Step::Event(Some(event)) => Box::pin(self.on_events(event)).await,
                Step::Frame(frame) => {
                    idle.as_mut()
                        .reset(tokio::time::Instant::now() + idle_timeout);
                    Box::pin(self.on_frame(frame)).await
                }
            };
            if let Err(closing) = handled {
                return closing;
            }
            if let Err(closing) = self.flush().await {
                return closing;
            }
        }
    }

    /// Welcome, then everything missed while offline, then `synced`.
    async fn start(&mut self) -> Result<(), Closing> {
        let config = &self.state.config;
        let welcome = ServerFrame::Welcome(Welcome {
            v: PROTOCOL_VERSION,
            user: self.username.clone(),
            device: self.device,
            heartbeat_ms: config.heartbeat_interval.as_millis() as u64,
            idle_timeout_ms: config.idle_timeout.as_millis() as u64,
            max_body_bytes: config.max_body_bytes,
            max_frame_bytes: config.max_frame_bytes,
            expires_at: self.expires_at,
            server_time: now_ms(),
        });
        self.write_frame(&welcome).await?;
        let convs = self
            .state
            .store
            .conversations(self.user, self.device)
            .await
            .map_err(|e| storage_closing(e, "cannot sync now; reconnect later"))?;
        for c in &convs {
            self.watermarks.insert(c.conv, c.device_delivered);
        }
        // Receipts and presence as of the snapshot go first: anything newer
        // that arrives during the catch-up below is written after them.
        for c in &convs {
            if c.read > 0 || c.delivered > 0 {
                self.write_frame(&ServerFrame::Receipt {
                    conv: c.conv,
                    user: self.username.clone(),
                    delivered: c.delivered,
                    read: Some(c.read),
                })
                .await?;
            }
            if !c.blocked && c.peer_delivered > 0 {
                let read = (c.peer_read_receipts && self.read_receipts).then_some(c.peer_read);
                self.write_frame(&ServerFrame::Receipt {
                    conv: c.conv,
                    user: c.peer.username.clone(),
                    delivered: c.peer_delivered,
                    read,
                })
                .await?;
            }
        }
        if let Some(presence) = self.state.presence.clone() {
            for c in convs.iter().filter(|c| c.peer.has_sent && !c.blocked) {
                let online = presence.is_online(c.peer.user).await;
                self.write_frame(&ServerFrame::Presence {
                    user: c.peer.username.clone(),
                    online,
                    last_seen: if online { None } else { c.peer_last_seen },
                })
                .await?;
            }
        }
        for c in &convs {
            if c.last_seq > c.device_delivered {
                self.fill_gap(c.conv, c.last_seq).await?;
            }
        }
        // Messages that arrived during the sync, noted by `absorb_queued`.
        loop {
            self.absorb_queued().await?;
            let Some((&conv, &to)) = self.catch_up.iter().next() else {
                break;
            };
            self.catch_up.remove(&conv);
            self.fill_gap(conv, to).await?;
        }
        self.syncing = false;
        self.write_frame(&ServerFrame::Synced).await?;
        self.flush().await
    }

    async fn on_frame(
        &mut self,
        frame: Option<Result<WsMessage, axum::Error>>,
    ) -> Result<(), Closing> {
        let message = match frame {
            Some(Ok(WsMessage::Ping(_) | WsMessage::Pong(_))) => return Ok(()),
            Some(Ok(WsMessage::Close(_))) | None => return Err(Closing::Gone),
            Some(Err(e)) => return Err(read_error(e)),
            Some(Ok(message)) => message,
        };
        let allowed = self.limit.allow();
        if !allowed && self.limit.refused > self.state.config.frame_burst {
            return Err(Closing::because(
                ErrorCode::RateLimited,
                "too many frames; closing",
            ));
        }
        let parsed = match message {
            WsMessage::Text(text) => parse_client_frame(&text),
            _ => Err(FrameError {
                code: ErrorCode::BadFrame,
                message: "frames are JSON text".into(),
                req: None,
                id: None,
            }),
        };
        let (req, id) = match &parsed {
            Ok(ClientFrame::Send { id, .. }) => (None, Some(id.clone())),
            Ok(
                ClientFrame::Open { req, .. }
                | ClientFrame::Conversations { req }
                | ClientFrame::History { req, .. }
                | ClientFrame::Block { req, .. }
                | ClientFrame::Unblock { req, .. }
                | ClientFrame::Settings { req, .. },
            ) => (Some(*req), None),
            Ok(_) => (None, None),
            Err(e) => (e.req, e.id.clone()),
        };
        if !allowed {
            // Named, so the client knows which request to retry.
            return self
                .write_error(
                    ErrorCode::RateLimited,
                    "too many frames; slow down",
                    req,
                    id,
                )
                .await;
        }
        let frame = match parsed {
            Ok(frame) => frame,
            Err(e) => {
                return self
                    .write_frame(&ServerFrame::Error(ErrorFrame::from(e)))
                    .await;
            }
        };
        match self.dispatch(frame).await {
            Ok(()) => Ok(()),
            Err(Fault::Refused(error)) => {
                let error = ErrorFrame { req, id, ..error };
                self.write_frame(&ServerFrame::Error(error)).await
            }
            Err(Fault::Close(closing)) => Err(closing),
        }
    }

    async fn dispatch(&mut self, frame: ClientFrame) -> Result<(), Fault> {
        match frame {
            ClientFrame::Auth { .. } => Err(refuse(ErrorCode::BadFrame, "already authenticated")),
            ClientFrame::Ping => Ok(self.write_frame(&ServerFrame::Pong).await?),
            ClientFrame::Send { id, conv, body } => self.on_send(id, conv, body).await,
            ClientFrame::Delivered { conv, seq } => self.on_cursor(conv, seq, 0).await,
            ClientFrame::Read { conv, seq } => self.on_cursor(conv, seq, seq).await,
            ClientFrame::Typing { conv } => self.on_typing(conv).await,
            ClientFrame::Open { req, peer } => self.on_open(req, &peer).await,
            ClientFrame::Conversations { req } => self.on_conversations(req).await,
            ClientFrame::History {
                req,
                conv,
                before,
                limit,
            } => self.on_history(req, conv, before, limit).await,
            ClientFrame::Block { req, user } => self.on_block(req, &user, true).await,
            ClientFrame::Unblock { req, user } => self.on_block(req, &user, false).await,
            ClientFrame::Settings { req, read_receipts } => {
                self.state
                    .store
                    .set_read_receipts(self.user, read_receipts)
                    .await?;
                self.read_receipts = read_receipts;
                self.state
                    .router
                    .deliver(&[self.user], Event::ReadReceiptsSetting(read_receipts));
                Ok(self.write_frame(&ServerFrame::Ok { req }).await?)
            }
        }
    }

    /// The conversation's members, checking that this user is one.
    async fn conv_info(&mut self, conv: ConversationId) -> Result<&mut ConvInfo, Fault> {
        if !self.convs.contains_key(&conv) {
            let not_member = || {
                refuse(
                    ErrorCode::NotMember,
                    "no such conversation, or you are not in it",
                )
            };
            let members = match self.state.store.members(conv).await {
                Err(StoreError::NotFound) => return Err(not_member()),
                other => other?,
            };
            let Some(me) = members.iter().find(|m| m.user == self.user) else {
                return Err(not_member());
            };
            let i_have_sent = me.has_sent;
            let peer = members.iter().find(|m| m.user != self.user).cloned();
            let blocked = match &peer {
                Some(peer) => self.state.store.is_blocked(self.user, peer.user).await?,
                None => false,
            };
            if self.convs.len() >= MAX_CACHED_CONVERSATIONS {
                self.convs.clear();
            }
            let info = ConvInfo {
                members: members.iter().map(|m| m.user).collect(),
                peer,
                blocked,
                i_have_sent,
            };
            self.convs.insert(conv, info);
        }
        Ok(self.convs.get_mut(&conv).expect("inserted above"))
    }

    async fn on_send(
        &mut self,
        id: MessageId,
        conv: ConversationId,
        body: String,
    ) -> Result<(), Fault> {
        let max = self.state.config.max_body_bytes;
        if body.len() > max {
            return Err(refuse(
                ErrorCode::TooLarge,
                format!("message bodies are at most {max} bytes"),
            ));
        }
        let accepted_at = Instant::now();
        let info = self.conv_info(conv).await?;
        if info.blocked {
            return Err(refuse(
                ErrorCode::Blocked,
                "messages cannot pass between these users",
            ));
        }
        let members = info.members.clone();
        self.check_envelope(&body, &members).await?;
        let message = NewMessage {
            conv,
            sender: self.user,
            sender_name: self.username.clone(),
            sender_device: self.device,
            client_id: id.clone(),
            body,
        };
        let store = self.state.store.clone();
        self.pending.push_back(Box::pin(async move {
            let result = store.append(message).await;
            Completed::Append {
                id,
                conv,
                members,
                accepted_at,
                result,
            }
        }));
        Ok(())
    }

    /// The server cannot read a message, but it makes sure the sender
    /// encrypted it for every current device of every member and no other:
    /// a device added to a list is never silently left out, and a device
    /// taken off one is never written to again.
    async fn check_envelope(&mut self, body: &str, members: &[UserId]) -> Result<(), Fault> {
        let bad = |why: &str| refuse(ErrorCode::BadEnvelope, format!("bad envelope: {why}"));
        let bytes = URL_SAFE_NO_PAD
            .decode(body)
            .map_err(|_| bad("the body is not base64url"))?;
        let envelope = Envelope::parse(&bytes).map_err(|e| bad(&e.to_string()))?;
        if envelope.sender_device() != self.device.0 {
            return Err(bad("it names another sender device"));
        }
        let directory = &self.state.directory;
        let store = &*self.state.store;
        let mut expected = Vec::with_capacity(4);
        for &member in members {
            let devices = directory.devices(store, member).await?;
            if member == self.user && !devices.contains(&self.device) {
                return Err(refuse(
                    ErrorCode::DeviceNotListed,
                    "this device is not on your signed device list yet: approve it from another of your devices",
                ));
            }
            expected.extend(devices.iter().map(|d| d.0));
        }
        expected.sort_unstable();
        // Both ascending: the envelope's order is checked by its parser.
        if envelope.devices().eq(expected.iter().copied()) {
            return Ok(());
        }
        let wrapped: Vec<i64> = envelope.devices().collect();
        Err(Fault::Refused(ErrorFrame {
            devices: Some(DeviceDiff::between(&expected, &wrapped)),
            ..ErrorFrame::new(
                ErrorCode::DevicesChanged,
                "encrypt for exactly the current devices of the members",
            )
        }))
    }

    async fn on_cursor(
        &mut self,
        conv: ConversationId,
        delivered: i64,
        read: i64,
    ) -> Result<(), Fault> {
        if delivered < 0 {
            return Err(refuse(ErrorCode::BadFrame, "seq must not be negative"));
        }
        self.conv_info(conv).await?;
        let update = CursorUpdate {
            conv,
            user: self.user,
            device: self.device,
            delivered,
            read,
        };
        let store = self.state.store.clone();
        self.pending.push_back(Box::pin(async move {
            Completed::Cursor {
                conv,
                result: store.advance_cursors(update).await,
            }
        }));
        Ok(())
    }

    /// A commit came back: publish it, then answer. Publishing never
    /// depends on this socket still working, so whatever the store accepted
    /// is forwarded even if the sender vanished meanwhile.
    async fn completed(&mut self, done: Completed) -> Result<(), Closing> {
        match done {
            Completed::Append {
                id,
                conv,
                members,
                accepted_at,
                result,
            } => match result {
                Ok(Appended::New {
                    message,
                    first_from_sender,
                }) => {
                    // Published before anything else, and whatever the state
                    // of this socket: the store has accepted it.
                    self.state.meters.accepted.increment(1);
                    let delivery = Arc::new(Delivery::new(&message, accepted_at));
                    self.state
                        .router
                        .deliver(&members, Event::Message(delivery));
                    let peer = match self.convs.get_mut(&conv) {
                        Some(info) => {
                            info.i_have_sent = true;
                            info.peer.clone()
                        }
                        None => None,
                    };
                    if first_from_sender
                        && let (Some(presence), Some(peer)) = (self.state.presence.clone(), peer)
                        && presence.is_online(self.user).await
                    {
                        // The peer may see this user's presence from now on.
                        let event = self.presence_event(true, None);
                        self.state.router.deliver(&[peer.user], event);
                    }
                    Ok(())
                }
                Ok(Appended::Duplicate(original)) => {
                    let m = original.message;
                    // Not written on this socket yet (and this device's own,
                    // and the session still valid): write it in its place in
                    // the stream. Otherwise acknowledge only.
                    if m.from_device == self.device
                        && m.seq > self.watermark(m.conv)
                        && !self.session_ended
                    {
                        self.fill_gap(m.conv, m.seq).await
                    } else {
                        self.write_frame(&ServerFrame::Sent {
                            id: m.id,
                            conv: m.conv,
                            seq: m.seq,
                            ts: m.ts,
                            resent: true,
                        })
                        .await
                    }
                }
                Err(e) => {
                    tracing::error!(error = %e, "message not stored");
                    self.write_error(
                        ErrorCode::StorageUnavailable,
                        "the message was not stored; resend it with the same id",
                        None,
                        Some(id),
                    )
                    .await
                }
            },
            Completed::Cursor { conv, result } => match result {
                Ok(cursors) if cursors.advanced() => {
                    let receipt = Arc::new(Receipt {
                        conv,
                        user: self.user,
                        username: self.username.clone(),
                        delivered: cursors.delivered,
                        read: cursors.read,
                        shares_read: self.read_receipts,
                    });
                    // Others care when either cursor they may see moved; this
                    // user's own devices only about reading (unread counts).
                    let others_see =
                        cursors.delivered_advanced || (cursors.read_advanced && self.read_receipts);
                    let me = self.user;
                    let mut targets: Vec<UserId> = match self.conv_info(conv).await {
                        Ok(info) if !info.blocked && others_see => {
                            info.members.iter().copied().filter(|u| *u != me).collect()
                        }
                        _ => Vec::new(),
                    };
                    if cursors.read_advanced {
                        targets.push(self.user);
                    }
                    if !targets.is_empty() {
                        self.state.router.deliver(&targets, Event::Receipt(receipt));
                    }
                    Ok(())
                }
                Ok(_) => Ok(()),
                Err(e) => {
                    tracing::error!(error = %e, "cursor not stored");
                    self.write_error(
                        ErrorCode::StorageUnavailable,
                        "receipt not stored; send it again",
                        None,
                        None,
                    )
                    .await
                }
            },
        }
    }

    /// Handles `first` and whatever else is already queued (up to a bound),
    /// so that a burst costs one flush, not one per event.
    async fn on_events(&mut self, first: Event) -> Result<(), Closing> {
        self.on_event(first).await?;
        for _ in 0..EVENT_BURST {
            match self.events.try_recv() {
                Ok(event) => self.on_event(event).await?,
                Err(_) => break,
            }
        }
        Ok(())
    }

    async fn on_event(&mut self, event: Event) -> Result<(), Closing> {
        match event {
            Event::Message(delivery) => self.deliver_in_order(&delivery).await,
            other => self.on_other_event(other).await,
        }
    }

    /// Every event but messages; never reads the store.
    async fn on_other_event(&mut self, event: Event) -> Result<(), Closing> {
        match event {
            Event::Message(_) => unreachable!("messages go through deliver_in_order"),
            Event::Receipt(r) => {
                let own = r.user == self.user;
                let read = (own || (r.shares_read && self.read_receipts)).then_some(r.read);
                self.write_frame(&ServerFrame::Receipt {
                    conv: r.conv,
                    user: r.username.clone(),
                    delivered: r.delivered,
                    read,
                })
                .await
            }
            Event::Presence(change) => self.write_text(change.frame.clone()).await,
            Event::Typing(frame) => self.write_text(Utf8Bytes::clone(&frame)).await,
            Event::BlockChanged { a, b } => {
                let other = if a == self.user { b } else { a };
                self.convs
                    .retain(|_, info| info.peer.as_ref().map(|p| p.user) != Some(other));
                Ok(())
            }
            Event::ReadReceiptsSetting(on) => {
                self.read_receipts = on;
                Ok(())
            }
        }
    }

    /// Writes `delivery` if it is next in its conversation, after filling
    /// any gap before it from the store; drops it if already written.
    fn watermark(&self, conv: ConversationId) -> i64 {
        *self.watermarks.get(&conv).unwrap_or(&0)
    }

    async fn deliver_in_order(&mut self, delivery: &Delivery) -> Result<(), Closing> {
        let watermark = self.watermark(delivery.conv);
        if delivery.seq <= watermark {
            return Ok(());
        }
        if delivery.seq > watermark + 1 {
            self.fill_gap(delivery.conv, delivery.seq - 1).await?;
        }
        if delivery.sender == self.user
            && let Some(info) = self.convs.get_mut(&delivery.conv)
        {
            info.i_have_sent = true;
        }
        if delivery.sender_device == self.device {
            self.write_text(delivery.sent_frame.clone()).await?;
        } else {
            self.write_text(delivery.msg_frame.clone()).await?;
            self.state.meters.delivered.increment(1);
            self.state
                .meters
                .send_to_deliver
                .record(delivery.accepted_at.elapsed().as_secs_f64());
        }
        self.watermarks.insert(delivery.conv, delivery.seq);
        Ok(())
    }

    /// Writes every message after the watermark up to `to` from the store.
    async fn fill_gap(&mut self, conv: ConversationId, to: i64) -> Result<(), Closing> {
        loop {
            let watermark = self.watermark(conv);
            if watermark >= to {
                return Ok(());
            }
            let page = Page {
                limit: (to - watermark).min(SYNC_PAGE as i64) as u32,
                max_bytes: PAGE_BYTES,
            };
            let page = self
                .state
                .store
                .messages_after(conv, watermark, page)
                .await
                .map_err(|e| storage_closing(e, "cannot catch up now; reconnect"))?;
            let Some(last) = page.last().map(|m| m.message.seq) else {
                // Seqs up to `to` are committed, so this cannot happen
                // unless the store breaks its promise; don't spin on it.
                tracing::error!(%conv, watermark, to, "store returned no messages for a committed range");
                return Err(Closing::because(
                    ErrorCode::Internal,
                    "inconsistent store; reconnect",
                ));
            };
            for stored in page {
                if stored.sender == self.user
                    && let Some(info) = self.convs.get_mut(&conv)
                {
                    info.i_have_sent = true;
                }
                self.state.meters.delivered.increment(1);
                self.write_frame(&ServerFrame::Msg(stored.message)).await?;
            }
            self.watermarks.insert(conv, last);
            if self.syncing {
                self.absorb_queued().await?;
            }
        }
    }

    /// During the sync, empties the event queue so that a long catch-up is
    /// not cut off as too slow: messages are only noted (the store has
    /// them), everything else is written now.
    async fn absorb_queued(&mut self) -> Result<(), Closing> {
        while let Ok(event) = self.events.try_recv() {
            match event {
                Event::Message(delivery) => {
                    let to = self.catch_up.entry(delivery.conv).or_insert(0);
                    *to = (*to).max(delivery.seq);
                }
                other => self.on_other_event(other).await?,
            }
        }
        Ok(())
    }

    async fn on_typing(&mut self, conv: ConversationId) -> Result<(), Fault> {
        let info = self.conv_info(conv).await?;
        // Typing is visible under the presence rule: only once this user has
        // written here, and never across a block. Otherwise it is dropped
        // silently, like any excess typing notice.
        if !info.i_have_sent || info.blocked {
            return Ok(());
        }
        let Some(peer) = info.peer.as_ref().map(|p| p.user) else {
            return Ok(());
        };
        let now = Instant::now();
        if let Some(last) = self.typing.get(&conv)
            && now.duration_since(*last) < TYPING_INTERVAL
        {
            return Ok(());
        }
        if self.typing.len() >= MAX_CACHED_CONVERSATIONS {
            self.typing.clear();
        }
        self.typing.insert(conv, now);
        let frame = ServerFrame::Typing {
            conv,
            user: self.username.clone(),
        };
        let frame = Utf8Bytes::from(frame.to_json());
        self.state
            .router
            .deliver(&[peer], Event::Typing(Arc::new(frame)));
        Ok(())
    }

    async fn lookup_user(&mut self, name: &str) -> Result<confab_store::UserRecord, Fault> {
        let unknown = || refuse(ErrorCode::UnknownUser, format!("no user named {name:?}"));
        let name = Username::new(name).map_err(|_| unknown())?;
        self.state
            .store
            .user_by_name(name.as_str())
            .await?
            .ok_or_else(unknown)
    }

    async fn on_open(&mut self, req: u64, peer: &str) -> Result<(), Fault> {
        let peer = self.lookup_user(peer).await?;
        if peer.id == self.user {
            return Err(refuse(
                ErrorCode::SelfConversation,
                "a conversation needs someone else",
            ));
        }
        let conv = self
            .state
            .store
            .open_direct(self.user, peer.id, now_ms())
            .await?;
        Ok(self
            .write_frame(&ServerFrame::Conversation {
                req,
                conv,
                peer: peer.username,
            })
            .await?)
    }

    async fn on_conversations(&mut self, req: u64) -> Result<(), Fault> {
        let store = &self.state.store;
        let unread: HashMap<ConversationId, i64> =
            store.unread_counts(self.user).await?.into_iter().collect();
        let items = store
            .conversations(self.user, self.device)
            .await?
            .into_iter()
            .map(|c| ConversationSummary {
                unread: unread.get(&c.conv).copied().unwrap_or(0),
                conv: c.conv,
                peer: c.peer.username,
                last_seq: c.last_seq,
                last_ts: c.last_ts,
            })
            .collect();
        Ok(self
            .write_frame(&ServerFrame::Conversations { req, items })
            .await?)
    }

    async fn on_history(
        &mut self,
        req: u64,
        conv: ConversationId,
        before: Option<i64>,
        limit: u32,
    ) -> Result<(), Fault> {
        self.conv_info(conv).await?;
        let page = Page {
            limit: limit.clamp(1, MAX_HISTORY_PAGE),
            max_bytes: PAGE_BYTES,
        };
        let messages = self
            .state
            .store
            .history(conv, before.unwrap_or(i64::MAX), page)
            .await?
            .into_iter()
            .map(|m| m.message)
            .collect();
        Ok(self
            .write_frame(&ServerFrame::History {
                req,
                conv,
                messages,
            })
            .await?)
    }

    async fn on_block(&mut self, req: u64, name: &str, on: bool) -> Result<(), Fault> {
        let other = self.lookup_user(name).await?;
        if other.id == self.user {
            return Err(refuse(ErrorCode::BadFrame, "you cannot block yourself"));
        }
        self.state
            .store
            .set_blocked(self.user, other.id, on, now_ms())
            .await?;
        self.state.router.deliver(
            &[self.user, other.id],
            Event::BlockChanged {
                a: self.user,
                b: other.id,
            },
        );
        Ok(self.write_frame(&ServerFrame::Ok { req }).await?)
    }

    fn presence_event(&self, online: bool, last_seen: Option<i64>) -> Event {
        let frame = ServerFrame::Presence {
            user: self.username.clone(),
            online,
            last_seen,
        };
        Event::Presence(Arc::new(PresenceChange {
            user: self.user,
            frame: frame.to_json().into(),
        }))
    }

    /// Tells everyone allowed to see this user's presence that it changed.
    async fn announce_presence(&mut self, online: bool, last_seen: Option<i64>) {
        match self.state.store.presence_watchers(self.user).await {
            Ok(watchers) if !watchers.is_empty() => {
                let event = self.presence_event(online, last_seen);
                self.state.router.deliver(&watchers, event);
            }
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "presence not announced"),
        }
    }

    /// Publishes what the store commits for this connection after it ended,
    /// and acks it if the socket still takes writes.
    /// Publishes what the store commits for this connection after it ended
    /// and writes what is queued for it, if the socket still takes writes.
    /// After the session ended, only this device's own acks that are next
    /// in their conversation are written.
    async fn drain_pending(&mut self) {
        let deadline = tokio::time::Instant::now() + DRAIN_TIMEOUT;
        while let Ok(Some(done)) = tokio::time::timeout_at(deadline, self.pending.next()).await {
            // An error means the socket is gone; keep publishing the rest.
            let _ = self.completed(done).await;
        }
        while let Ok(event) = self.events.try_recv() {
            let written = match event {
                event if !self.session_ended => self.on_event(event).await,
                Event::Message(delivery)
                    if delivery.sender_device == self.device
                        && delivery.seq == self.watermark(delivery.conv) + 1 =>
                {
                    self.deliver_in_order(&delivery).await
                }
                _ => Ok(()),
            };
            if written.is_err() {
                break;
            }
        }
        let _ = self.flush().await;
    }

    async fn write_error(
        &mut self,
        code: ErrorCode,
        message: impl Into<String>,
        req: Option<u64>,
        id: Option<MessageId>,
    ) -> Result<(), Closing> {
        let error = ErrorFrame {
            req,
            id,
            ..ErrorFrame::new(code, message)
        };
        self.write_frame(&ServerFrame::Error(error)).await
    }

    async fn write_frame(&mut self, frame: &ServerFrame) -> Result<(), Closing> {
        self.write_text(frame.to_json().into()).await
    }

    /// Queues a frame; [`Connection::flush`] sends what is queued, so that a
    /// burst of events costs one write to the socket.
    async fn write_text(&mut self, text: Utf8Bytes) -> Result<(), Closing> {
        self.unflushed = true;
        bounded_write(&self.kick, self.ws.feed(WsMessage::Text(text))).await
    }

    async fn flush(&mut self) -> Result<(), Closing> {
        if !self.unflushed {
            return Ok(());
        }
        self.unflushed = false;
        bounded_write(&self.kick, self.ws.flush()).await
    }
}

/// A socket write that gives up when the client stops reading, or when the
/// connection is kicked meanwhile: a kick (say, for a full event queue) must
/// not wait behind a socket the client no longer reads.
async fn bounded_write(
    kick: &Kick,
    write: impl Future<Output = Result<(), axum::Error>>,
) -> Result<(), Closing> {
    tokio::select! {
        written = tokio::time::timeout(WRITE_TIMEOUT, write) => match written {
            Ok(Ok(())) => Ok(()),
            Ok(Err(_)) => Err(Closing::Gone),
            Err(_) => Err(Closing::because(ErrorCode::TooSlow, "the client is not reading")),
        },
        reason = kick.kicked() => Err(Closing::because(reason, kick_message(reason))),
    }
}

/// The store failed where the connection cannot go on without it.
fn storage_closing(error: StoreError, message: &str) -> Closing {
    tracing::error!(%error, "store read failed; closing the connection");
    Closing::because(ErrorCode::StorageUnavailable, message)
}

fn kick_message(reason: ErrorCode) -> &'static str {
    match reason {
        ErrorCode::TooSlow => "the connection could not keep up; reconnect to catch up",
        ErrorCode::DeviceRemoved => "this device was removed",
        ErrorCode::Unauthorized => "the session was ended",
        ErrorCode::ShuttingDown => "the server is shutting down",
        _ => "closed by the server",
    }
}

/// A read error: an oversized message gets a reason; anything else means
/// the socket is gone.
fn read_error(e: axum::Error) -> Closing {
    let inner = e.into_inner();
    match inner.downcast_ref::<tokio_tungstenite::tungstenite::Error>() {
        Some(tokio_tungstenite::tungstenite::Error::Capacity(_)) => {
            Closing::because(ErrorCode::TooLarge, "frame larger than the server accepts")
        }
        _ => Closing::Gone,
    }
}
