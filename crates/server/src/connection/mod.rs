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

mod groups;
mod order;
mod presence;
pub(crate) use presence::announce;
mod rate;
mod receipts;
mod requests;
mod send;
mod sync;
mod write;

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use confab_protocol::{
    ClientFrame, ConvKind, ConversationId, DeviceId, ErrorCode, ErrorFrame, FrameError,
    PROTOCOL_VERSION, ServerFrame, parse_client_frame,
};
use confab_store::{CursorsMoved, Member, SessionRecord, StoreError, UserId};
use futures_util::StreamExt;
use futures_util::stream::FuturesOrdered;
use tokio::sync::mpsc;

use crate::AppState;
use crate::budget::{Charge, Meter};
use crate::hub::{Event, Kick};
use crate::limits::{Over, RetryAfter};
use crate::socket::{Bytes, Error as WsError, Message as WsMessage, Socket, Utf8Bytes};

use rate::{RateLimit, Verdict};
use write::{close, kick_message, read_error, storage_closing};

/// Store operations one connection may have in flight before it stops
/// reading from its socket (backpressure onto the client).
const MAX_IN_FLIGHT: usize = 64;
/// Messages fetched per store read when catching up.
const SYNC_PAGE: u32 = 256;
/// A write that cannot complete in this time means the client stopped reading.
const WRITE_TIMEOUT: Duration = Duration::from_secs(10);
/// At most one typing notice per conversation per this interval.
const TYPING_INTERVAL: Duration = Duration::from_secs(1);
const MAX_HISTORY_PAGE: u32 = 500;
/// Queued events written before one flush.
const EVENT_BURST: usize = 64;
/// Message bodies per store read (sync page or history reply): bounds the
/// memory a request costs and the size of a `history` frame, whatever the
/// bodies' sizes. A `history` reply may so hold fewer than asked for.
const PAGE_BYTES: usize = 1024 * 1024;
/// Bytes of JSON around one message body in a frame, at most.
const MESSAGE_OVERHEAD: usize = 512;
/// Pings and pongs a client may send before its `auth`.
const MAX_CONTROL_FRAMES_BEFORE_AUTH: u32 = 16;
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

fn flooded() -> Closing {
    Closing::because(
        ErrorCode::RateLimited,
        "too many frames over the connection's budget; closing",
    )
}

fn refuse(code: ErrorCode, message: impl Into<String>) -> Fault {
    Fault::Refused(ErrorFrame::new(code, message))
}

/// A refusal by one of the user's limits, saying when to try again.
fn throttled(code: ErrorCode, message: &str, RetryAfter(wait): RetryAfter) -> Fault {
    Fault::Refused(ErrorFrame {
        retry_after_ms: Some(wait.as_millis().max(1) as u64),
        ..ErrorFrame::new(code, message)
    })
}

/// The bytes of a data message.
fn payload(frame: &Option<Result<WsMessage, WsError>>) -> Option<&Bytes> {
    match frame {
        Some(Ok(WsMessage::Text(text))) => Some(text.as_ref()),
        Some(Ok(WsMessage::Binary(data))) => Some(data),
        _ => None,
    }
}

/// A socket that waited for the memory budget in vain.
fn short_of_memory() -> Closing {
    Closing::because(
        ErrorCode::Busy,
        "the server is short of memory; reconnect in a few seconds",
    )
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

/// What the connection knows of a conversation it has touched. Dropped
/// when a membership event of the conversation passes through this
/// connection, and when a block of this user changes; the store checks
/// membership again at every commit, so a stale copy never lets a message
/// through.
struct ConvInfo {
    kind: ConvKind,
    /// The current members, ascending.
    members: Arc<[UserId]>,
    /// Members with a block between them and this user: they get no
    /// receipts, typing or presence from it. In a direct conversation a
    /// block stops messages too.
    blocked_with: Vec<UserId>,
    /// This user's own membership: its role, and the span it sees.
    me: Member,
    /// Whether this user has sent here (its presence and typing are visible
    /// to the others only after that).
    i_have_sent: bool,
    /// Whether this user created, sent in or accepted the conversation;
    /// until then it is a message request and the others see no receipts.
    i_accepted: bool,
}

impl ConvInfo {
    /// A direct conversation across a block: nothing passes.
    fn blocked(&self) -> bool {
        self.kind.is_direct() && !self.blocked_with.is_empty()
    }

    /// The other current members who may see this user's receipts, typing
    /// and presence.
    fn audience(&self, me: UserId) -> Vec<UserId> {
        self.members
            .iter()
            .copied()
            .filter(|u| *u != me && !self.blocked_with.contains(u))
            .collect()
    }
}

enum Completed {
    /// Boxed: a committed message is large, a cursor move small.
    Append(Box<send::AppendDone>),
    Cursor {
        conv: ConversationId,
        result: Result<CursorsMoved, StoreError>,
    },
}

type Pending = Pin<Box<dyn Future<Output = Completed> + Send>>;

/// Whether a queued store call must commit after those queued before it:
/// messages and group changes (the protocol promises a connection's are
/// committed in the order read), not cursor moves (they only go forward).
#[derive(Clone, Copy, PartialEq, Eq)]
enum Order {
    Kept,
    Any,
}

impl Connection {
    /// Queues a store call whose answer is taken in order.
    ///
    /// The SQLite store commits calls in the order they are first polled
    /// (one queue to its writer), and the queue polls them in order.
    ///
    /// Otherwise (PostgreSQL) each call drives its own I/O and runs as a
    /// task of its own, because this connection may be waiting on the store
    /// itself (a gap read): calls holding the database's connections while
    /// nobody polled them stalled every caller of the node (a burst of 200
    /// sends from four clients hung until it timed out). A call whose order
    /// is kept starts when the one before it has committed.
    fn queue(&mut self, order: Order, call: impl Future<Output = Completed> + Send + 'static) {
        if self.state.store.commits_in_call_order() {
            self.pending.push_back(Box::pin(call));
            return;
        }
        let turn = (order == Order::Kept).then(|| {
            let (done, committed) = tokio::sync::oneshot::channel::<()>();
            (self.last_kept.replace(committed), done)
        });
        let task = tokio::spawn(async move {
            let Some((before, done)) = turn else {
                return call.await;
            };
            if let Some(before) = before {
                // Sent or dropped: the call before has ended either way.
                let _ = before.await;
            }
            let result = call.await;
            let _ = done.send(());
            result
        });
        self.pending.push_back(Box::pin(async move {
            match task.await {
                Ok(done) => done,
                Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
                // The runtime is shutting down.
                Err(_) => std::future::pending().await,
            }
        }));
    }
}

pub async fn serve(
    state: AppState,
    mut ws: Socket,
    meter: Arc<Meter>,
    deadline: tokio::time::Instant,
) {
    metrics::gauge!("confab_connections").increment(1.0);
    match authenticate(&state, &mut ws, &meter, deadline).await {
        // Boxed, so that the authentication's state is not carried for the
        // connection's whole life (see `Connection::run`).
        Ok((session, token)) => {
            Box::pin(run_session(&state, ws, meter, session, &token)).await;
        }
        Err(closing) => close(&mut ws, closing, false).await,
    }
    metrics::gauge!("confab_connections").decrement(1.0);
}

/// Reads the `auth` frame. Nothing else is accepted before it.
async fn authenticate(
    state: &AppState,
    ws: &mut Socket,
    meter: &Meter,
    deadline: tokio::time::Instant,
) -> Result<(SessionRecord, String), Closing> {
    let mut control_frames = 0;
    let text = loop {
        let next = tokio::time::timeout_at(deadline, ws.next())
            .await
            .map_err(|_| {
                Closing::because(
                    ErrorCode::AuthTimeout,
                    "authenticate within the handshake timeout",
                )
            })?;
        match next {
            Some(Ok(WsMessage::Text(text))) => {
                meter.settle();
                break text;
            }
            Some(Ok(WsMessage::Ping(_) | WsMessage::Pong(_))) => {
                control_frames += 1;
                if control_frames > MAX_CONTROL_FRAMES_BEFORE_AUTH {
                    return Err(flooded());
                }
            }
            Some(Ok(WsMessage::Binary(_) | WsMessage::Frame(_))) => {
                return Err(Closing::because(
                    ErrorCode::BadFrame,
                    "frames are JSON text",
                ));
            }
            Some(Err(e)) => return Err(read_error(e, meter)),
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

async fn run_session(
    state: &AppState,
    mut ws: Socket,
    meter: Arc<Meter>,
    session: SessionRecord,
    token: &str,
) {
    let read_receipts = match state.store.user(session.user).await {
        Ok(Some(user)) => user.read_receipts,
        // Failing closed: guessing the setting could show a read the user hides.
        _ => {
            let closing = Closing::because(
                ErrorCode::StorageUnavailable,
                "cannot load the account; reconnect later",
            );
            return close(&mut ws, closing, false).await;
        }
    };
    let (tx, rx) = mpsc::channel(state.config.send_queue.max(1));
    let kick = Arc::new(Kick::default());
    // Registered before the sync reads the store, so nothing committed in
    // between is missed: it is queued and the watermark sorts it out.
    let registration = match state.hub.register(
        session.user,
        session.device,
        tx,
        kick.clone(),
        &state.limits,
    ) {
        Ok(registration) => registration,
        Err(over) => {
            let closing = Closing::because(ErrorCode::TooManyConnections, over.message());
            return close(&mut ws, closing, false).await;
        }
    };
    // The node counted this socket against the user's limit; with Redis,
    // the user's sockets on the other nodes count too.
    if let Some(presence) = &state.presence {
        let elsewhere = presence.connections_elsewhere(session.user).await;
        if elsewhere + state.hub.connections_of(session.user)
            > state.limits.config().connections_per_user
        {
            drop(registration);
            metrics::counter!("confab_connections_refused_total").increment(1);
            let closing = Closing::because(ErrorCode::TooManyConnections, Over::User.message());
            return close(&mut ws, closing, false).await;
        }
    }
    // A device removed (or logged out) while this socket was authenticating
    // was kicked before it was registered: look again now that it is.
    if let Err((code, message)) = crate::http::session_for_token(state, token).await {
        drop(registration);
        return close(&mut ws, Closing::because(code, message), false).await;
    }
    let mut conn = Connection {
        state: state.clone(),
        ws,
        meter,
        large_frame: None,
        charge: None,
        user: session.user,
        username: session.username,
        device: session.device,
        expires_at: session.expires_at,
        events: rx,
        kick,
        watermarks: HashMap::new(),
        convs: HashMap::new(),
        pending: FuturesOrdered::new(),
        last_kept: None,
        limit: RateLimit::new(state.config.frames_per_second, state.config.frame_burst),
        typing: HashMap::new(),
        read_receipts,
        unflushed: false,
        mid_message: false,
        syncing: true,
        catch_up: HashMap::new(),
        session_ended: false,
        last_active_ms: state.config.clock.now(),
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
    drop(registration);
    Box::pin(close(&mut conn.ws, closing, conn.mid_message)).await;
    if let Some(presence) = &state.presence
        && let Some(last_seen) = presence.disconnected(conn.user, conn.last_active_ms).await
    {
        if let Err(e) = state.store.set_last_seen(conn.user, last_seen).await {
            tracing::warn!(error = %e, "could not store last seen");
        }
        // A quick reconnect may have announced "online" meanwhile; an
        // "offline" after it would be wrong until the next change.
        if !presence.is_online(conn.user).await {
            Box::pin(conn.announce_presence(false, Some(last_seen))).await;
        }
    }
}

struct Connection {
    state: AppState,
    ws: Socket,
    /// What the socket has read of the message it is receiving.
    meter: Arc<Meter>,
    /// The last large message, while tungstenite's read buffer may still
    /// point into it (see [`Connection::keep_large_frame`]).
    large_frame: Option<Bytes>,
    /// The budget charged for the frame being handled (a `send` keeps it
    /// until its commit).
    charge: Option<Charge>,
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
    /// Ends when the last queued call whose order is kept has committed.
    last_kept: Option<tokio::sync::oneshot::Receiver<()>>,
    limit: RateLimit,
    typing: HashMap<ConversationId, Instant>,
    read_receipts: bool,
    unflushed: bool,
    /// A fragmented write was cut off: nothing but a close may follow.
    mid_message: bool,
    /// True while the connect-time sync runs: live messages are then not
    /// queued up behind it but noted here and fetched from the store.
    syncing: bool,
    catch_up: HashMap<ConversationId, i64>,
    /// Set when the connection ends because its session ended: from then on
    /// nothing but its own acks is written.
    session_ended: bool,
    /// When the client last sent a frame (ms since epoch): its user's last
    /// seen, if this is the user's last connection to close.
    last_active_ms: i64,
}

enum Step {
    Kicked(ErrorCode),
    Shutdown,
    Completed(Completed),
    Event(Option<Event>),
    Frame(Option<Result<WsMessage, WsError>>),
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
            (self.expires_at - self.state.config.clock.now()).max(0) as u64,
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
                frame = self.ws.next(), if reading => Step::Frame(frame),
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
                // WebSocket pings are no sign of a client at work (any
                // library sends them): only data frames keep it open.
                Step::Frame(Some(Ok(WsMessage::Ping(_) | WsMessage::Pong(_)))) => {
                    match self.limit.check() {
                        Verdict::Close => Err(flooded()),
                        _ => Ok(()),
                    }
                }
                Step::Frame(frame) => {
                    idle.as_mut()
                        .reset(tokio::time::Instant::now() + idle_timeout);
                    self.last_active_ms = self.state.config.clock.now();
                    self.charge = self.meter.settle();
                    self.keep_large_frame(payload(&frame));
                    let handled = Box::pin(self.on_frame(frame)).await;
                    self.charge = None;
                    handled
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

    async fn on_frame(&mut self, frame: Option<Result<WsMessage, WsError>>) -> Result<(), Closing> {
        let message = match frame {
            Some(Ok(WsMessage::Close(_))) | None => return Err(Closing::Gone),
            Some(Err(e)) => return Err(read_error(e, &self.meter)),
            Some(Ok(message)) => message,
        };
        let allowed = match self.limit.check() {
            Verdict::Allow => true,
            Verdict::Refuse => false,
            Verdict::Close => return Err(flooded()),
        };
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
            Ok(frame) => {
                let (req, id) = frame.reference();
                (req, id.cloned())
            }
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
            ClientFrame::Send {
                id,
                conv,
                body,
                blobs,
            } => self.on_send(id, conv, body, blobs).await,
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
            ClientFrame::Accept { req, conv } => self.on_accept(req, conv).await,
            ClientFrame::Block { req, user } => self.on_block(req, &user, true).await,
            ClientFrame::Unblock { req, user } => self.on_block(req, &user, false).await,
            ClientFrame::GroupCreate { id, name, members } => {
                self.on_group_create(id, name, members).await
            }
            ClientFrame::GroupAdd { id, conv, users } => {
                self.on_group_change(id, conv, groups::Asked::Add(users))
                    .await
            }
            ClientFrame::GroupRemove { id, conv, users } => {
                self.on_group_change(id, conv, groups::Asked::Remove(users))
                    .await
            }
            ClientFrame::GroupLeave { id, conv } => {
                self.on_group_change(id, conv, groups::Asked::Leave).await
            }
            ClientFrame::GroupRename { id, conv, name } => {
                self.on_group_change(id, conv, groups::Asked::Rename(name))
                    .await
            }
            ClientFrame::GroupAdmin { id, conv, users } => {
                self.on_group_change(id, conv, groups::Asked::MakeAdmins(users))
                    .await
            }
            ClientFrame::Members { req, conv } => self.on_members(req, conv).await,
            ClientFrame::Info { req, conv, seq } => self.on_info(req, conv, seq).await,
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
            Event::Message(delivery) if self.test_drops(delivery.seq) => Ok(()),
            Event::Message(delivery) => self.deliver_in_order(&delivery).await,
            Event::Heads(heads) => self.repair(&heads).await,
            other => self.on_other_event(other).await,
        }
    }

    /// Keeps a large message a while. tungstenite reads a frame into one
    /// buffer grown to the frame's size, hands the message out as a slice of
    /// it and reads on into what is left; when that runs out and nothing
    /// else holds the slice, it takes the whole grown allocation back, for
    /// the socket's life. With the slice still held, it starts a small
    /// buffer instead; once the slice is the allocation's only holder it is
    /// let go. (A message in fragments is copied out of the buffer inside
    /// tungstenite, out of reach: the buffer keeps its largest fragment.)
    fn keep_large_frame(&mut self, message: Option<&Bytes>) {
        if self.large_frame.as_ref().is_some_and(Bytes::is_unique) {
            self.large_frame = None;
        }
        if let Some(message) = message.filter(|m| m.len() > crate::WS_READ_BUFFER_BYTES) {
            self.large_frame = Some(message.clone());
        }
    }

    /// What a page of at most `limit` messages may cost in memory: the
    /// messages read, and the frames made of them.
    fn page_charge(&self, limit: u32) -> usize {
        let per_message = self.state.config.max_body_bytes + MESSAGE_OVERHEAD;
        let bodies =
            (limit as usize * per_message).min(PAGE_BYTES + limit as usize * MESSAGE_OVERHEAD);
        2 * bodies
    }

    /// The test hook `Config::test_drop_live`: loses one live publish.
    fn test_drops(&self, seq: i64) -> bool {
        use std::sync::atomic::Ordering;
        match &self.state.config.test_drop_live {
            Some((user, at)) if *user == self.username && *at == seq => {
                let drop = !self.state.test_dropped.swap(true, Ordering::Relaxed);
                if drop {
                    tracing::info!(user, seq, "test hook: live delivery dropped");
                }
                drop
            }
            _ => false,
        }
    }

    async fn completed(&mut self, done: Completed) -> Result<(), Closing> {
        match done {
            Completed::Append(append) => self.appended(*append).await,
            Completed::Cursor { conv, result } => self.cursor_moved(conv, result).await,
        }
    }

    /// Every event but messages; never reads the store.
    async fn on_other_event(&mut self, event: Event) -> Result<(), Closing> {
        match event {
            Event::Message(_) => unreachable!("messages go through deliver_in_order"),
            // Only the live loop repairs (the sync and the drain read the
            // store anyway).
            Event::Heads(_) => Ok(()),
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
                self.convs.retain(|_, info| !info.members.contains(&other));
                Ok(())
            }
            Event::ReadReceiptsSetting(on) => {
                self.read_receipts = on;
                Ok(())
            }
            Event::Accepted(conv) => {
                if let Some(info) = self.convs.get_mut(&conv) {
                    info.i_accepted = true;
                }
                Ok(())
            }
        }
    }

    /// Publishes what the store commits for this connection after it ended
    /// (what commits after the drain timeout, by a task of its own) and
    /// writes what is queued for it, if the socket still takes writes.
    /// After the session ended, only this device's own acks that are next
    /// in their conversation are written.
    async fn drain_pending(&mut self) {
        let deadline = tokio::time::Instant::now() + self.state.config.drain_timeout;
        while let Ok(Some(done)) = tokio::time::timeout_at(deadline, self.pending.next()).await {
            // An error means the socket is gone; keep publishing the rest.
            let _ = self.completed(done).await;
        }
        if !self.pending.is_empty() {
            // The store may still commit these. Whatever it does is
            // published, so no recipient waits for a later message or a
            // reconnect; the sender learns of it when it resends (answered
            // with the original) or at its next sync.
            let pending = std::mem::take(&mut self.pending);
            let state = self.state.clone();
            self.state.tasks.spawn(send::publish_late(state, pending));
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
}
