//! One authenticated WebSocket connection and the task that drives it.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use confab_crypto::{Content, FileRef};
use confab_protocol::{
    ClientFrame, ConversationId, ConversationSummary, DeviceId, ErrorCode, ErrorFrame, Message,
    MessageId, PROTOCOL_VERSION, ServerFrame, Welcome,
};
use futures_util::{FutureExt, SinkExt, StreamExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::{self, Message as WsMessage};

use crate::e2e::{DevicesChanged, E2e, FileMessage, NotOpened, Received, Undecryptable};
use crate::{ClientError, ServerUrl};

/// One of this device's own messages, committed by the server.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Sent {
    pub id: MessageId,
    pub conv: ConversationId,
    pub seq: i64,
    pub ts: i64,
}

#[derive(Clone, Debug, PartialEq)]
pub enum Event {
    /// A message from someone else (or from another device of this user).
    /// With end-to-end encryption on, `body` is the decrypted text.
    Message(Message),
    /// A message that carries a file (`docs/files.md`): download it with
    /// [`crate::files::download_file`].
    File(FileMessage),
    /// A message this device could not verify or decrypt, with the reason.
    Undecryptable(Undecryptable),
    /// A contact's (or this user's) device list changed; show it.
    DevicesChanged(DevicesChanged),
    /// This device's own message is stored (live, or found again at sync).
    Sent(Sent),
    /// A group changed: `message.event` says how, `message.from` who did
    /// it; it has its place (seq) in the conversation like a message. The
    /// device that made the change gets it too (and its `sent`).
    GroupChange(Message),
    Receipt {
        conv: ConversationId,
        user: String,
        delivered: i64,
        read: Option<i64>,
    },
    Presence {
        user: String,
        online: bool,
        last_seen: Option<i64>,
    },
    Typing {
        conv: ConversationId,
        user: String,
    },
    /// Everything missed while offline has arrived.
    Synced,
    /// An error not tied to a request of this library.
    Error(ErrorFrame),
    /// The connection ended; the server's last error says why, if it gave one.
    Closed(Option<ErrorFrame>),
}

/// What the application has taken, per conversation: kept across
/// reconnects (and by the CLI across runs) so that messages the server sends
/// again are recognised and dropped, and counted.
///
/// It moves only when the application takes a message from [`Events`],
/// never when the frame is read from the socket: a message still in the
/// buffer when the connection drops is not confirmed, the server sends it
/// again at the next connect, and it must then be taken, not dropped.
#[derive(Default, Debug)]
pub struct SyncState {
    watermarks: Mutex<HashMap<ConversationId, i64>>,
    /// With `confirm_when_done`: how far the application has said it is
    /// done (`Events::done`). A duplicate is confirmed again only up to
    /// here: one taken but not finished is the application's to confirm.
    /// Without it, "done" is "taken" and this stays empty.
    done: Mutex<HashMap<ConversationId, i64>>,
    duplicates: AtomicU64,
    gaps: AtomicU64,
}

impl SyncState {
    /// A state saved earlier with [`SyncState::watermarks`]: what was
    /// taken then counts as done.
    pub fn from_watermarks(watermarks: impl IntoIterator<Item = (ConversationId, i64)>) -> Self {
        let watermarks: HashMap<_, _> = watermarks.into_iter().collect();
        Self {
            done: Mutex::new(watermarks.clone()),
            watermarks: Mutex::new(watermarks),
            ..Self::default()
        }
    }

    /// Messages received again and dropped.
    pub fn duplicates(&self) -> u64 {
        self.duplicates.load(Ordering::Relaxed)
    }

    /// Times a conversation skipped a seq (never, if the server keeps its promise).
    pub fn gaps(&self) -> u64 {
        self.gaps.load(Ordering::Relaxed)
    }

    /// Highest seq the application has taken in `conv`.
    pub fn watermark(&self, conv: ConversationId) -> i64 {
        *self.lock().get(&conv).unwrap_or(&0)
    }

    /// Every conversation's watermark, to save.
    pub fn watermarks(&self) -> Vec<(ConversationId, i64)> {
        let mut all: Vec<_> = self.lock().iter().map(|(c, s)| (*c, *s)).collect();
        all.sort_unstable();
        all
    }

    /// Whether the application has said it is done with `seq` of `conv`.
    fn is_done(&self, conv: ConversationId, seq: i64) -> bool {
        self.done
            .lock()
            .expect("sync state poisoned")
            .get(&conv)
            .is_some_and(|&d| seq <= d)
    }

    fn mark_done(&self, conv: ConversationId, seq: i64) {
        let mut done = self.done.lock().expect("sync state poisoned");
        let d = done.entry(conv).or_insert(0);
        *d = (*d).max(seq);
    }

    /// Whether `seq` of `conv` was taken already (a duplicate to drop).
    fn taken(&self, conv: ConversationId, seq: i64) -> bool {
        let taken = self.lock().get(&conv).is_some_and(|&w| seq <= w);
        if taken {
            self.duplicates.fetch_add(1, Ordering::Relaxed);
        }
        taken
    }

    /// The application takes `seq` of `conv`: false when it had taken it
    /// before (through another connection's events, say), and then it must
    /// not see it again. Check and move are one step, so two event streams
    /// read at once still give each message once.
    fn take(&self, conv: ConversationId, seq: i64) -> bool {
        let mut map = self.lock();
        match map.get(&conv) {
            Some(&w) if seq <= w => {
                drop(map);
                self.duplicates.fetch_add(1, Ordering::Relaxed);
                return false;
            }
            // The first message of a conversation sets where this device starts.
            Some(&w) if seq > w + 1 => {
                self.gaps.fetch_add(1, Ordering::Relaxed);
            }
            _ => {}
        }
        map.insert(conv, seq);
        true
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<ConversationId, i64>> {
        self.watermarks.lock().expect("sync state poisoned")
    }
}

/// Where a message or own `sent` sits in its conversation's stream.
fn stream_position(event: &Event) -> Option<(ConversationId, i64)> {
    match event {
        Event::Message(m)
        | Event::File(FileMessage { message: m, .. })
        | Event::Undecryptable(Undecryptable { message: m, .. })
        | Event::GroupChange(m) => Some((m.conv, m.seq)),
        Event::Sent(s) => Some((s.conv, s.seq)),
        _ => None,
    }
}

#[derive(Clone, Debug)]
pub struct ConnectOptions {
    /// Confirm delivery of each message as it is read (what real clients do).
    pub confirm_delivery: bool,
    /// Send heartbeats at the interval the server asks for.
    pub heartbeat: bool,
    /// Carry over from an earlier connection of the same device.
    pub state: Arc<SyncState>,
    /// Source address to connect from (load tests use several).
    pub local_addr: Option<IpAddr>,
    /// An `Origin` header, as a browser would send.
    pub origin: Option<String>,
    /// Events buffered for the application before the connection stops reading.
    pub event_buffer: usize,
    /// How long to gather taken messages before confirming them in one
    /// `delivered` per conversation (a delivered tick comes this much later,
    /// and the server handles one frame instead of one per message).
    pub confirm_batch: Duration,
    /// This device's keys and trusted contacts. With it, `send` encrypts
    /// and messages arrive decrypted; without it (load tests, raw tools),
    /// bodies are passed through as they are.
    pub e2e: Option<Arc<E2e>>,
    /// Confirm messages only once the application says it is done with
    /// them ([`Events::done`]), for example after showing or storing them:
    /// then no message is confirmed that the application did not finish
    /// with, even if it dies in between. Off: confirmed once taken.
    pub confirm_when_done: bool,
}

impl Default for ConnectOptions {
    fn default() -> Self {
        Self {
            confirm_delivery: true,
            heartbeat: true,
            state: Arc::default(),
            local_addr: None,
            origin: None,
            event_buffer: 4096,
            confirm_batch: Duration::from_millis(20),
            e2e: None,
            confirm_when_done: false,
        }
    }
}

/// The application's side of the event stream. Taking a message from it is
/// what counts: only then is it confirmed to the server and recorded in the
/// [`SyncState`].
pub struct Events {
    rx: mpsc::Receiver<Event>,
    taken: Arc<Taken>,
    state: Arc<SyncState>,
    /// With `confirm_when_done`: per conversation, the highest seq taken
    /// and not yet declared done.
    held: HashMap<ConversationId, i64>,
    confirm_when_done: bool,
}

/// What the application has taken from [`Events`] since the last
/// confirmation, per conversation: only that is confirmed as delivered, so a
/// message still sitting in the buffer when the application dies is sent
/// again.
#[derive(Default)]
struct Taken {
    seqs: Mutex<HashMap<ConversationId, i64>>,
    more: tokio::sync::Notify,
}

impl Taken {
    fn mark(&self, conv: ConversationId, seq: i64) {
        let mut seqs = self.seqs.lock().expect("taken poisoned");
        let entry = seqs.entry(conv).or_insert(0);
        *entry = (*entry).max(seq);
        drop(seqs);
        self.more.notify_one();
    }

    fn drain(&self) -> Vec<(ConversationId, i64)> {
        self.seqs.lock().expect("taken poisoned").drain().collect()
    }
}

impl Events {
    /// The next event; `None` after `Closed` has been received.
    pub async fn recv(&mut self) -> Option<Event> {
        loop {
            let event = self.rx.recv().await?;
            if self.take(&event) {
                return Some(event);
            }
        }
    }

    pub fn try_recv(&mut self) -> Option<Event> {
        loop {
            let event = self.rx.try_recv().ok()?;
            if self.take(&event) {
                return Some(event);
            }
        }
    }

    /// The application is done with everything it has taken (with
    /// `confirm_when_done`; otherwise there is nothing to do): confirm it.
    pub fn done(&mut self) {
        for (conv, seq) in self.held.drain() {
            self.state.mark_done(conv, seq);
            self.taken.mark(conv, seq);
        }
    }

    /// Records a message as taken; false for one taken before. It is
    /// confirmed now, or with `confirm_when_done` once done; a duplicate
    /// too, since it means the server has not heard of it yet.
    fn take(&mut self, event: &Event) -> bool {
        let Some((conv, seq)) = stream_position(event) else {
            return true;
        };
        let fresh = self.state.take(conv, seq);
        if !self.confirm_when_done {
            self.taken.mark(conv, seq);
        } else if fresh {
            let held = self.held.entry(conv).or_insert(0);
            *held = (*held).max(seq);
        } else if self.state.is_done(conv, seq) {
            self.taken.mark(conv, seq);
        }
        fresh
    }
}

enum Command {
    Frame(ClientFrame),
    /// A frame answered like a `send` (by `sent` or an error with `id`):
    /// a send or a group change.
    Send {
        id: MessageId,
        frame: ClientFrame,
        reply: oneshot::Sender<Result<Sent, ClientError>>,
    },
    Request {
        req: u64,
        frame: ClientFrame,
        reply: oneshot::Sender<Result<ServerFrame, ClientError>>,
    },
    Close,
    /// Stop reading, writing and heartbeating, but keep the socket open.
    Stall,
}

/// An authenticated connection. Dropping it closes the socket without a
/// close frame; [`Client::close`] closes it politely.
pub struct Client {
    commands: mpsc::Sender<Command>,
    next_ref: AtomicU64,
    welcome: Welcome,
    state: Arc<SyncState>,
    e2e: Option<Arc<E2e>>,
    /// The current members of each conversation (this user included),
    /// learnt from `open`, `conversations` and `members`: whom to encrypt
    /// for. A membership event of the conversation drops its entry.
    pub(crate) members: Members,
    task: JoinHandle<()>,
}

pub(crate) type Members = Arc<Mutex<HashMap<ConversationId, Arc<[String]>>>>;

impl Drop for Client {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Client {
    pub async fn connect(
        server: &ServerUrl,
        token: &str,
        options: ConnectOptions,
    ) -> Result<(Client, Events), ClientError> {
        let mut ws = open_socket(server, &options).await?;
        let auth = ClientFrame::Auth {
            v: PROTOCOL_VERSION,
            token: token.to_string(),
        };
        ws.send(text(&auth)).await.map_err(io_error)?;
        let welcome = tokio::time::timeout(Duration::from_secs(10), read_welcome(&mut ws))
            .await
            .map_err(|_| ClientError::Io("no welcome from the server".into()))??;
        let (commands, command_rx) = mpsc::channel(1024);
        let (events, event_rx) = mpsc::channel(options.event_buffer.max(1));
        let taken = Arc::new(Taken::default());
        let members = Members::default();
        let task = Task {
            e2e: options.e2e.clone(),
            members: members.clone(),
            ws,
            commands: command_rx,
            events,
            state: options.state.clone(),
            device: welcome.device,
            confirm: options.confirm_delivery,
            confirm_when_done: options.confirm_when_done,
            confirm_batch: options.confirm_batch,
            sends: HashMap::new(),
            requests: HashMap::new(),
            taken: taken.clone(),
            last_error: None,
        };
        let heartbeat = options
            .heartbeat
            .then(|| Duration::from_millis(welcome.heartbeat_ms.max(100)));
        let task = tokio::spawn(task.run(heartbeat));
        let client = Client {
            commands,
            next_ref: AtomicU64::new(1),
            welcome,
            state: options.state.clone(),
            e2e: options.e2e,
            members,
            task,
        };
        Ok((
            client,
            Events {
                rx: event_rx,
                taken,
                state: options.state,
                held: HashMap::new(),
                confirm_when_done: options.confirm_when_done,
            },
        ))
    }

    pub fn welcome(&self) -> &Welcome {
        &self.welcome
    }

    pub fn device(&self) -> DeviceId {
        self.welcome.device
    }

    pub fn state(&self) -> &Arc<SyncState> {
        &self.state
    }

    /// Sends a message with a fresh id and waits for the server's `sent`.
    pub async fn send(
        &self,
        conv: ConversationId,
        body: impl Into<String>,
    ) -> Result<Sent, ClientError> {
        self.send_with_id(conv, new_message_id(), body).await
    }

    /// Sends (or resends) a message under `id`; a resend of a stored id is
    /// answered with the original's `sent`. With end-to-end encryption on,
    /// `body` is the text, encrypted here for every current device of the
    /// conversation; when the server says the devices changed, the lists
    /// are fetched and checked again and the message is resent (same id).
    pub async fn send_with_id(
        &self,
        conv: ConversationId,
        id: MessageId,
        body: impl Into<String>,
    ) -> Result<Sent, ClientError> {
        self.send_with_blobs(conv, id, body, Vec::new()).await
    }

    /// [`Client::send_with_id`] for a message that refers to `blobs`, files
    /// this user uploaded (`docs/files.md`): the server binds them to the
    /// message, and the conversation's members may then download them.
    pub async fn send_with_blobs(
        &self,
        conv: ConversationId,
        id: MessageId,
        body: impl Into<String>,
        blobs: Vec<String>,
    ) -> Result<Sent, ClientError> {
        self.send_content(conv, id, Content::text(body), blobs)
            .await
    }

    /// Sends a message that carries a file already uploaded
    /// ([`crate::files::upload_file`]), with `caption` as its text. Needs
    /// end-to-end encryption: the file's key travels in the message.
    pub async fn send_file(
        &self,
        conv: ConversationId,
        id: MessageId,
        caption: impl Into<String>,
        file: FileRef,
    ) -> Result<Sent, ClientError> {
        if self.e2e.is_none() {
            return Err(ClientError::Usage(
                "files travel only end-to-end encrypted".into(),
            ));
        }
        let blobs = vec![file.blob.clone()];
        let content = Content {
            text: caption.into(),
            file: Some(file),
        };
        self.send_content(conv, id, content, blobs).await
    }

    async fn send_content(
        &self,
        conv: ConversationId,
        id: MessageId,
        content: Content,
        blobs: Vec<String>,
    ) -> Result<Sent, ClientError> {
        let Some(e2e) = &self.e2e else {
            return self.send_command(conv, id, content.text, blobs).await;
        };
        let mut refresh = false;
        loop {
            // After `devices_changed` the members may have changed too.
            let members = self.conv_members(conv, refresh).await?;
            if !members.contains(&e2e.identity().user) {
                // What the server would answer: there is no one to seal for.
                return Err(ClientError::Server(ErrorFrame::new(
                    ErrorCode::NotMember,
                    "you are no longer a member of this conversation",
                )));
            }
            let envelope = e2e.seal(conv, &id, &members, &content, refresh).await?;
            match self
                .send_command(conv, id.clone(), envelope, blobs.clone())
                .await
            {
                Err(ClientError::Server(e)) if e.code == ErrorCode::DevicesChanged && !refresh => {
                    refresh = true;
                }
                other => return other,
            }
        }
    }

    /// Sends `body` exactly as given (an envelope already sealed, or the
    /// load generator's stand-in).
    pub async fn send_raw(
        &self,
        conv: ConversationId,
        id: MessageId,
        body: String,
    ) -> Result<Sent, ClientError> {
        self.send_command(conv, id, body, Vec::new()).await
    }

    async fn send_command(
        &self,
        conv: ConversationId,
        id: MessageId,
        body: String,
        blobs: Vec<String>,
    ) -> Result<Sent, ClientError> {
        let frame = ClientFrame::Send {
            id: id.clone(),
            conv,
            body,
            blobs,
        };
        self.send_like(id, frame).await
    }

    /// Writes a frame answered like a `send` and waits for its answer.
    pub(crate) async fn send_like(
        &self,
        id: MessageId,
        frame: ClientFrame,
    ) -> Result<Sent, ClientError> {
        let (reply, rx) = oneshot::channel();
        self.command(Command::Send { id, frame, reply }).await?;
        answer_within(rx).await
    }

    /// This device has received `conv` up to `seq` (done automatically
    /// unless `confirm_delivery` is off).
    pub async fn delivered(&self, conv: ConversationId, seq: i64) -> Result<(), ClientError> {
        self.command(Command::Frame(ClientFrame::Delivered { conv, seq }))
            .await
    }

    /// The user has read `conv` up to `seq`.
    pub async fn read(&self, conv: ConversationId, seq: i64) -> Result<(), ClientError> {
        self.command(Command::Frame(ClientFrame::Read { conv, seq }))
            .await
    }

    pub async fn typing(&self, conv: ConversationId) -> Result<(), ClientError> {
        self.command(Command::Frame(ClientFrame::Typing { conv }))
            .await
    }

    /// Sends a raw frame (tests use it to send what a well-behaved client wouldn't).
    pub async fn send_frame(&self, frame: ClientFrame) -> Result<(), ClientError> {
        self.command(Command::Frame(frame)).await
    }

    /// Opens (or finds) the 1:1 conversation with `peer`.
    pub async fn open(&self, peer: &str) -> Result<ConversationId, ClientError> {
        let req = self.next_ref();
        match self
            .request(
                req,
                ClientFrame::Open {
                    req,
                    peer: peer.into(),
                },
            )
            .await?
        {
            ServerFrame::Conversation { conv, peer, .. } => {
                if let Some(me) = &self.e2e {
                    let pair: Arc<[String]> = [me.identity().user.clone(), peer].into();
                    self.members
                        .lock()
                        .expect("members poisoned")
                        .insert(conv, pair);
                }
                Ok(conv)
            }
            other => Err(unexpected(&other)),
        }
    }

    /// The current members of `conv` (this user included), asking the
    /// server when not known or when `refresh`.
    async fn conv_members(
        &self,
        conv: ConversationId,
        refresh: bool,
    ) -> Result<Arc<[String]>, ClientError> {
        if !refresh && let Some(members) = self.members.lock().expect("members poisoned").get(&conv)
        {
            return Ok(members.clone());
        }
        let listed = self.members(conv).await?;
        Ok(listed.items.into_iter().map(|m| m.user).collect())
    }

    pub async fn conversations(&self) -> Result<Vec<ConversationSummary>, ClientError> {
        let req = self.next_ref();
        match self
            .request(req, ClientFrame::Conversations { req })
            .await?
        {
            ServerFrame::Conversations { items, .. } => {
                if let Some(me) = &self.e2e {
                    let mut members = self.members.lock().expect("members poisoned");
                    for c in items.iter().filter(|c| c.kind.is_direct()) {
                        let pair: Arc<[String]> =
                            [me.identity().user.clone(), c.peer.clone()].into();
                        members.insert(c.conv, pair);
                    }
                }
                Ok(items)
            }
            other => Err(unexpected(&other)),
        }
    }

    /// Up to `limit` messages before `before` (newest when `None`), oldest
    /// first, each decrypted (or why not) when end-to-end encryption is on.
    pub async fn history(
        &self,
        conv: ConversationId,
        before: Option<i64>,
        limit: u32,
    ) -> Result<Vec<Received>, ClientError> {
        let req = self.next_ref();
        let frame = ClientFrame::History {
            req,
            conv,
            before,
            limit,
        };
        let messages = match self.request(req, frame).await? {
            ServerFrame::History { messages, .. } => messages,
            other => return Err(unexpected(&other)),
        };
        let mut opened = Vec::with_capacity(messages.len());
        for m in messages {
            opened.push(match &self.e2e {
                _ if m.event.is_some() => Received::GroupChange(m),
                Some(e2e) => decrypt(e2e, m).await.map_err(ClientError::Io)?,
                None => Received::Text(m),
            });
        }
        Ok(opened)
    }

    pub async fn block(&self, user: &str) -> Result<(), ClientError> {
        let req = self.next_ref();
        self.request(
            req,
            ClientFrame::Block {
                req,
                user: user.into(),
            },
        )
        .await
        .map(drop)
    }

    /// Accepts the message request `conv` (see `ConversationSummary::request`).
    pub async fn accept(&self, conv: ConversationId) -> Result<(), ClientError> {
        let req = self.next_ref();
        self.request(req, ClientFrame::Accept { req, conv })
            .await
            .map(drop)
    }

    pub async fn unblock(&self, user: &str) -> Result<(), ClientError> {
        let req = self.next_ref();
        self.request(
            req,
            ClientFrame::Unblock {
                req,
                user: user.into(),
            },
        )
        .await
        .map(drop)
    }

    pub async fn set_read_receipts(&self, on: bool) -> Result<(), ClientError> {
        let req = self.next_ref();
        self.request(
            req,
            ClientFrame::Settings {
                req,
                read_receipts: on,
            },
        )
        .await
        .map(drop)
    }

    /// Closes with a close frame and waits for the socket to end.
    pub async fn close(self) {
        let _ = self.commands.send(Command::Close).await;
        let _ = tokio::time::timeout(Duration::from_secs(5), self.commands.closed()).await;
    }

    /// Goes silent with the socket left open, like a peer whose network died.
    pub async fn stall(&self) {
        let _ = self.commands.send(Command::Stall).await;
    }

    pub(crate) fn next_ref(&self) -> u64 {
        self.next_ref.fetch_add(1, Ordering::Relaxed)
    }

    async fn command(&self, command: Command) -> Result<(), ClientError> {
        self.commands
            .send(command)
            .await
            .map_err(|_| disconnected())
    }

    pub(crate) async fn request(
        &self,
        req: u64,
        frame: ClientFrame,
    ) -> Result<ServerFrame, ClientError> {
        let (reply, rx) = oneshot::channel();
        self.command(Command::Request { req, frame, reply }).await?;
        answer_within(rx).await
    }
}

/// Replaces an envelope with its text (and, for a file message, the
/// file), or says why it cannot be read; `Err` when it cannot be opened
/// now (the sender's device list could not be fetched), with why.
async fn decrypt(e2e: &E2e, mut message: Message) -> Result<Received, String> {
    match e2e.open(&message).await {
        Ok(content) => {
            message.body = content.text;
            Ok(match content.file {
                Some(file) => Received::File(FileMessage { message, file }),
                None => Received::Text(message),
            })
        }
        Err(NotOpened::Refused(reason)) => {
            Ok(Received::Undecryptable(Undecryptable { message, reason }))
        }
        Err(NotOpened::Unavailable(why)) => Err(why),
    }
}

/// A fresh message id: a UUIDv7, so ids sort by creation time.
pub fn new_message_id() -> MessageId {
    MessageId::new(uuid::Uuid::now_v7().to_string()).expect("a UUID is a valid message id")
}

/// How long a request or a send waits for its answer. A stuck answer (an
/// application that stopped reading events, so the connection stopped
/// reading too) then fails instead of hanging.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(30);

async fn answer_within<T>(rx: oneshot::Receiver<Result<T, ClientError>>) -> Result<T, ClientError> {
    match tokio::time::timeout(ANSWER_TIMEOUT, rx).await {
        Ok(Ok(answer)) => answer,
        Ok(Err(_)) => Err(disconnected()),
        Err(_) => Err(ClientError::Io("no answer from the server in time".into())),
    }
}

fn disconnected() -> ClientError {
    ClientError::Disconnected("the connection closed".into())
}

pub(crate) fn unexpected(frame: &ServerFrame) -> ClientError {
    ClientError::Protocol(format!("unexpected answer: {}", frame.to_json()))
}

fn io_error(e: tungstenite::Error) -> ClientError {
    ClientError::Io(e.to_string())
}

fn text(frame: &ClientFrame) -> WsMessage {
    WsMessage::Text(
        serde_json::to_string(frame)
            .expect("client frames serialize")
            .into(),
    )
}

async fn open_socket(
    server: &ServerUrl,
    options: &ConnectOptions,
) -> Result<WebSocketStream<TcpStream>, ClientError> {
    let addr = tokio::net::lookup_host(&server.authority)
        .await
        .map_err(|e| ClientError::Io(format!("{}: {e}", server.authority)))?
        .next()
        .ok_or_else(|| ClientError::Io(format!("{}: no address", server.authority)))?;
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()
    } else {
        TcpSocket::new_v6()
    }
    .map_err(|e| ClientError::Io(e.to_string()))?;
    if let Some(local) = options.local_addr {
        // Lets many short-lived runs reuse ports still in TIME_WAIT.
        let _ = socket.set_reuseaddr(true);
        socket
            .bind(SocketAddr::new(local, 0))
            .map_err(|e| ClientError::Io(format!("bind {local}: {e}")))?;
    }
    let stream = socket
        .connect(addr)
        .await
        .map_err(|e| ClientError::Io(format!("{addr}: {e}")))?;
    let _ = stream.set_nodelay(true);
    let mut request = server.ws().into_client_request().map_err(io_error)?;
    if let Some(origin) = &options.origin {
        let value = origin
            .parse()
            .map_err(|_| ClientError::Usage(format!("bad origin {origin:?}")))?;
        request.headers_mut().insert("origin", value);
    }
    let config = WebSocketConfig::default()
        .read_buffer_size(8 * 1024)
        .write_buffer_size(16 * 1024)
        .max_message_size(Some(64 << 20))
        .max_frame_size(Some(16 << 20));
    match tokio_tungstenite::client_async_with_config(request, stream, Some(config)).await {
        Ok((ws, _)) => Ok(ws),
        Err(tungstenite::Error::Http(response)) => {
            let status = response.status().as_u16();
            let body = response.body().clone().unwrap_or_default();
            match serde_json::from_slice(&body) {
                Ok(error) => Err(ClientError::Api { status, error }),
                Err(_) => Err(ClientError::Io(format!(
                    "HTTP {status}: {}",
                    String::from_utf8_lossy(&body)
                ))),
            }
        }
        Err(e) => Err(io_error(e)),
    }
}

async fn read_welcome(ws: &mut WebSocketStream<TcpStream>) -> Result<Welcome, ClientError> {
    loop {
        let frame = match ws.next().await {
            Some(Ok(WsMessage::Text(text))) => serde_json::from_str::<ServerFrame>(&text)
                .map_err(|e| ClientError::Protocol(format!("bad frame {text}: {e}")))?,
            Some(Ok(WsMessage::Close(_))) | None => {
                return Err(ClientError::Disconnected("closed before welcome".into()));
            }
            Some(Ok(_)) => continue,
            Some(Err(e)) => return Err(io_error(e)),
        };
        return match frame {
            ServerFrame::Welcome(welcome) => Ok(welcome),
            ServerFrame::Error(e) => Err(ClientError::Server(e)),
            other => Err(unexpected(&other)),
        };
    }
}

struct Task {
    ws: WebSocketStream<TcpStream>,
    commands: mpsc::Receiver<Command>,
    events: mpsc::Sender<Event>,
    state: Arc<SyncState>,
    device: DeviceId,
    confirm: bool,
    confirm_when_done: bool,
    confirm_batch: Duration,
    /// Sends waiting for their answer, by message id, oldest first (a
    /// resend may wait beside the original).
    sends: HashMap<MessageId, Vec<oneshot::Sender<Result<Sent, ClientError>>>>,
    requests: HashMap<u64, oneshot::Sender<Result<ServerFrame, ClientError>>>,
    /// Highest seq per conversation read since the last delivery confirmation.
    taken: Arc<Taken>,
    last_error: Option<ErrorFrame>,
    e2e: Option<Arc<E2e>>,
    members: Members,
}

impl Task {
    async fn run(mut self, heartbeat: Option<Duration>) {
        let mut ticker = tokio::time::interval(heartbeat.unwrap_or(Duration::from_secs(3600)));
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        ticker.tick().await;
        let taken = self.taken.clone();
        let confirm_due = tokio::time::sleep(Duration::ZERO);
        tokio::pin!(confirm_due);
        let mut confirming = false;
        loop {
            let alive = tokio::select! {
                command = self.commands.recv() => match command {
                    None | Some(Command::Close) => {
                        // Confirm what the application took before saying goodbye.
                        self.confirm_delivery().await;
                        let _ = tokio::time::timeout(Duration::from_secs(2), self.ws.close(None)).await;
                        // Read until the server's close arrives.
                        let _ = tokio::time::timeout(Duration::from_secs(2), async {
                            while let Some(Ok(_)) = self.ws.next().await {}
                        }).await;
                        false
                    }
                    Some(Command::Stall) => {
                        while self.commands.recv().await.is_some() {}
                        false
                    }
                    Some(command) => self.command(command).await,
                },
                frame = self.ws.next() => {
                    let mut alive = self.incoming(frame).await;
                    // Take whatever else is already buffered in one go.
                    while alive {
                        match self.ws.next().now_or_never() {
                            Some(frame) => alive = self.incoming(frame).await,
                            None => break,
                        }
                    }
                    alive
                }
                _ = taken.more.notified(), if !confirming => {
                    confirm_due.as_mut().reset(tokio::time::Instant::now() + self.confirm_batch);
                    confirming = true;
                    true
                }
                _ = &mut confirm_due, if confirming => {
                    confirming = false;
                    self.confirm_delivery().await
                }
                _ = ticker.tick(), if heartbeat.is_some() => self.write(&ClientFrame::Ping).await && self.flush().await,
            };
            if !alive {
                break;
            }
        }
        for (_, waiting) in self.sends.drain() {
            for reply in waiting {
                let _ = reply.send(Err(disconnected()));
            }
        }
        for (_, reply) in self.requests.drain() {
            let _ = reply.send(Err(disconnected()));
        }
        let _ = self
            .events
            .send(Event::Closed(self.last_error.take()))
            .await;
    }

    async fn command(&mut self, command: Command) -> bool {
        let frame = match command {
            Command::Frame(frame) => frame,
            Command::Send { id, frame, reply } => {
                self.sends.entry(id).or_default().push(reply);
                frame
            }
            Command::Request { req, frame, reply } => {
                self.requests.insert(req, reply);
                frame
            }
            Command::Close | Command::Stall => unreachable!("handled by run"),
        };
        self.write(&frame).await && self.flush().await
    }

    async fn incoming(&mut self, frame: Option<Result<WsMessage, tungstenite::Error>>) -> bool {
        let text = match frame {
            Some(Ok(WsMessage::Text(text))) => text,
            Some(Ok(WsMessage::Close(_))) | Some(Err(_)) | None => return false,
            Some(Ok(_)) => return true,
        };
        match serde_json::from_str::<ServerFrame>(&text) {
            Ok(frame) => self.server_frame(frame).await,
            Err(e) => {
                tracing::warn!(error = %e, frame = %text, "unreadable frame from the server");
                true
            }
        }
    }

    async fn server_frame(&mut self, frame: ServerFrame) -> bool {
        match frame {
            ServerFrame::Msg(m) if m.event.is_some() => {
                // Whom to encrypt for has changed.
                self.members
                    .lock()
                    .expect("members poisoned")
                    .remove(&m.conv);
                if m.from_device == self.device {
                    self.answer(&Sent {
                        id: m.id.clone(),
                        conv: m.conv,
                        seq: m.seq,
                        ts: m.ts,
                    });
                }
                if self.seen_before(m.conv, m.seq) {
                    return true;
                }
                self.emit(Event::GroupChange(m)).await
            }
            ServerFrame::Msg(m) if m.from_device == self.device => {
                let sent = Sent {
                    id: m.id,
                    conv: m.conv,
                    seq: m.seq,
                    ts: m.ts,
                };
                self.on_sent(sent).await
            }
            ServerFrame::Msg(m) => {
                if self.seen_before(m.conv, m.seq) {
                    return true;
                }
                let Some(e2e) = self.e2e.clone() else {
                    return self.emit(Event::Message(m)).await;
                };
                let event = match decrypt(&e2e, m).await {
                    Ok(Received::Text(m)) => Event::Message(m),
                    Ok(Received::File(f)) => Event::File(f),
                    Ok(Received::GroupChange(m)) => Event::GroupChange(m),
                    Ok(Received::Undecryptable(u)) => Event::Undecryptable(u),
                    // Not taken, so not confirmed: the connection ends, and
                    // the next one gets the message again, with the sender's
                    // keys fetched then.
                    Err(why) => {
                        tracing::debug!(%why, "closing: a message cannot be verified now");
                        return false;
                    }
                };
                for notice in e2e.take_notices() {
                    self.emit(Event::DevicesChanged(notice)).await;
                }
                self.emit(event).await
            }
            ServerFrame::Sent {
                id,
                conv,
                seq,
                ts,
                resent,
            } => {
                let sent = Sent { id, conv, seq, ts };
                if resent {
                    // Outside the ordered stream: answer the sender, nothing more.
                    self.answer(&sent);
                    true
                } else {
                    self.on_sent(sent).await
                }
            }
            ServerFrame::Receipt {
                conv,
                user,
                delivered,
                read,
            } => {
                self.emit(Event::Receipt {
                    conv,
                    user,
                    delivered,
                    read,
                })
                .await
            }
            ServerFrame::Presence {
                user,
                online,
                last_seen,
            } => {
                self.emit(Event::Presence {
                    user,
                    online,
                    last_seen,
                })
                .await
            }
            ServerFrame::Typing { conv, user } => self.emit(Event::Typing { conv, user }).await,
            ServerFrame::Synced => self.emit(Event::Synced).await,
            ServerFrame::Conversation { req, .. }
            | ServerFrame::Conversations { req, .. }
            | ServerFrame::History { req, .. }
            | ServerFrame::Members { req, .. }
            | ServerFrame::Info { req, .. }
            | ServerFrame::Ok { req } => {
                if let Some(reply) = self.requests.remove(&req) {
                    let _ = reply.send(Ok(frame));
                }
                true
            }
            ServerFrame::Error(error) => {
                if let Some(reply) = error.req.and_then(|req| self.requests.remove(&req)) {
                    let _ = reply.send(Err(ClientError::Server(error)));
                    return true;
                }
                if let Some(id) = &error.id {
                    if let Some(reply) = self.next_waiting(id) {
                        let _ = reply.send(Err(ClientError::Server(error)));
                        return true;
                    }
                } else {
                    // An error tied to no request is the one a close comes with.
                    self.last_error = Some(error.clone());
                }
                self.emit(Event::Error(error)).await
            }
            ServerFrame::Pong | ServerFrame::Welcome(_) => true,
        }
    }

    /// Own message stored, in its place in the stream: answer whoever waits
    /// for it, and tell the application unless it has taken it before.
    async fn on_sent(&mut self, sent: Sent) -> bool {
        self.answer(&sent);
        if self.seen_before(sent.conv, sent.seq) {
            return true;
        }
        self.emit(Event::Sent(sent)).await
    }

    /// A message the application took before (through an earlier
    /// connection): dropped. The server has not heard that it was taken,
    /// its confirmation having been lost with that connection, so it is
    /// confirmed again, once the application is done with it.
    fn seen_before(&mut self, conv: ConversationId, seq: i64) -> bool {
        if !self.state.taken(conv, seq) {
            return false;
        }
        if !self.confirm_when_done || self.state.is_done(conv, seq) {
            self.taken.mark(conv, seq);
        }
        true
    }

    /// The server answers every `send` frame once, in the order they were
    /// written, so each answer settles the oldest send waiting on that id.
    fn answer(&mut self, sent: &Sent) {
        if let Some(reply) = self.next_waiting(&sent.id) {
            let _ = reply.send(Ok(sent.clone()));
        }
    }

    fn next_waiting(
        &mut self,
        id: &MessageId,
    ) -> Option<oneshot::Sender<Result<Sent, ClientError>>> {
        let waiting = self.sends.get_mut(id)?;
        let reply = (!waiting.is_empty()).then(|| waiting.remove(0));
        if waiting.is_empty() {
            self.sends.remove(id);
        }
        reply
    }

    /// Confirms what the application has taken since the last time.
    async fn confirm_delivery(&mut self) -> bool {
        let confirmations = self.taken.drain();
        if !self.confirm || confirmations.is_empty() {
            return true;
        }
        for (conv, seq) in confirmations {
            if !self.write(&ClientFrame::Delivered { conv, seq }).await {
                return false;
            }
        }
        self.flush().await
    }

    async fn emit(&mut self, event: Event) -> bool {
        // A closed receiver means the application stopped listening; the
        // connection stays useful for requests.
        let _ = self.events.send(event).await;
        true
    }

    async fn write(&mut self, frame: &ClientFrame) -> bool {
        self.ws.feed(text(frame)).await.is_ok()
    }

    async fn flush(&mut self) -> bool {
        self.ws.flush().await.is_ok()
    }
}
