//! confab's durable storage.
//!
//! [`Store`] is the one interface the server uses. [`sqlite::SqliteStore`] is
//! the embedded implementation (one writer thread, one process per data
//! directory); [`postgres::PgStore`] serves several nodes sharing one
//! PostgreSQL database. Every implementation keeps this contract for
//! concurrent writers (docs/storage.md says why and how each store does):
//!
//! 1. A call that returns `Ok` is committed durably; a failed commit leaves
//!    nothing visible and uses no seq.
//! 2. A message's `seq` is taken under its conversation's lock (PostgreSQL:
//!    the row `FOR NO KEY UPDATE`; SQLite: the one writer), so when seq `n`
//!    is visible every seq below it is too, with no gap.
//! 3. Locks are taken in one order: the conversation, then shared locks on
//!    the members' device lists by user id, then the message's blobs by id.
//! 4. What must be read under a lock (members, the resend check, epochs) is
//!    read in a statement after the one taking it, never inside it.
//! 5. A resend (same sender, same client id) is recognised before a seq is
//!    taken and gets its original.
//! 6. A message's `ts` is `max(now, the conversation's last ts)`, inside the
//!    commit, with `now` from the store's [`Clock`].
//! 7. Cursors only move forward (`GREATEST`/`max` in the database), never to
//!    an absolute value from a cache, and never past the last seq.
//! 8. Membership, device-list epochs ([`NewMessage::device_epochs`]), blob
//!    references, the request limit and quotas are checked inside the commit.
//! 9. A lost unique-key race is an answer (`UsernameTaken`, a duplicate's
//!    original, else [`StoreError::Conflict`]), never an internal error;
//!    deadlocks and serialization failures are retried as a safety net.

mod group_plan;
pub mod postgres;
mod rows;
pub mod sqlite;

use async_trait::async_trait;
use confab_crypto::PublicKeys;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use confab_protocol::{
    ConvEvent, ConvKind, ConversationId, DeviceId, Message, MessageId, Role, Username,
};

/// Milliseconds since the Unix epoch, by the system clock.
pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// Where a store takes the time it assigns itself (a message's `ts`, when
/// a cursor moved). Injected, so that tests (and a simulation) can run
/// writers whose clocks differ, or stand still.
#[derive(Clone)]
pub struct Clock(Arc<dyn Fn() -> i64 + Send + Sync>);

impl Clock {
    pub fn system() -> Self {
        Self(Arc::new(now_ms))
    }

    /// A clock that reads `f`.
    pub fn from_fn(f: impl Fn() -> i64 + Send + Sync + 'static) -> Self {
        Self(Arc::new(f))
    }

    /// Milliseconds since the Unix epoch.
    pub fn now(&self) -> i64 {
        (self.0)()
    }
}

impl Default for Clock {
    fn default() -> Self {
        Self::system()
    }
}

impl std::fmt::Debug for Clock {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Clock")
    }
}

/// A user's internal id. Never on the wire: clients name users by username.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct UserId(pub i64);

#[derive(thiserror::Error, Debug, Clone, PartialEq, Eq)]
pub enum StoreError {
    #[error("username is taken")]
    UsernameTaken,
    #[error("not found")]
    NotFound,
    /// The write was not committed (disk full, I/O error, ...). Nothing
    /// of it is visible; the caller may retry.
    #[error("storage unavailable: {0}")]
    Unavailable(String),
    #[error(
        "database schema version {found} is newer than this build knows ({known}); upgrade confab"
    )]
    SchemaTooNew { found: i64, known: i64 },
    /// Someone else changed what this write builds on (a device list of
    /// that epoch exists already): reread and retry.
    #[error("conflicting write")]
    Conflict,
    #[error("the store is closed")]
    Closed,
}

pub type Result<T, E = StoreError> = std::result::Result<T, E>;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UserRecord {
    pub id: UserId,
    pub username: String,
    pub password_hash: String,
    pub read_receipts: bool,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeviceRecord {
    pub id: DeviceId,
    pub user: UserId,
    pub name: String,
    pub created_at: i64,
    /// Public keys uploaded by the device at login; none for a device that
    /// never sent any.
    pub keys: Option<PublicKeys>,
}

/// One version of a user's device list: the signed JSON exactly as a device
/// of the user sent it. The store does not look inside.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoredDeviceList {
    pub epoch: i64,
    pub signed: String,
}

/// What a valid token stands for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SessionRecord {
    pub user: UserId,
    pub username: String,
    pub device: DeviceId,
    pub expires_at: i64,
}

#[derive(Clone, Debug)]
pub struct NewMessage {
    pub conv: ConversationId,
    pub sender: UserId,
    pub sender_name: String,
    pub sender_device: DeviceId,
    pub client_id: MessageId,
    pub body: String,
    /// The epoch of each member's device list the envelope was checked
    /// against (0: the member had none). The commit refuses the message
    /// with [`Appended::DevicesChanged`] if any of them is no longer the
    /// newest, so that a device added meanwhile never misses it. Empty: no
    /// check (tools and tests that store raw bodies).
    pub device_epochs: Vec<(UserId, i64)>,
    /// While another member has not accepted the conversation (a message
    /// request), the sender may have at most this many messages in it; the
    /// next is refused with [`Appended::NotAccepted`]. `None`: no limit.
    pub unanswered_limit: Option<u32>,
    /// Body bytes the sender may store per UTC day (by the store's clock),
    /// every node together: the message that would go past it is refused
    /// with [`Appended::OverQuota`]. Counted in the message's commit, after
    /// every other check, so that only what is stored counts. `None`: no
    /// limit.
    pub daily_bytes: Option<u64>,
    /// Blobs the message refers to. Each must be a complete upload of the
    /// sender's, or the message is refused with [`Appended::UnknownBlob`];
    /// the commit binds them to the message, and they no longer expire.
    pub blobs: Vec<String>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoredMessage {
    pub sender: UserId,
    pub message: Message,
}

impl NewMessage {
    /// The message as stored, at the seq and time its commit gave it.
    pub(crate) fn stored(self, seq: i64, ts: i64) -> StoredMessage {
        StoredMessage {
            sender: self.sender,
            message: Message {
                conv: self.conv,
                seq,
                id: self.client_id,
                from: self.sender_name,
                from_device: self.sender_device,
                ts,
                body: self.body,
                event: None,
                deleted_files: Vec::new(),
            },
        }
    }
}

impl NewGroupEvent {
    /// The change as stored in `conv`: an event with no body.
    pub(crate) fn stored(
        self,
        conv: ConversationId,
        seq: i64,
        ts: i64,
        event: ConvEvent,
    ) -> StoredMessage {
        StoredMessage {
            sender: self.actor,
            message: Message {
                conv,
                seq,
                id: self.client_id,
                from: self.actor_name,
                from_device: self.actor_device,
                ts,
                body: String::new(),
                event: Some(event),
                deleted_files: Vec::new(),
            },
        }
    }
}

/// A change of a group, made by one of its members (`actor`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum GroupChange {
    /// A new group with these members besides the actor (its first admin).
    Create {
        name: String,
        members: Vec<(UserId, String)>,
    },
    Add(Vec<(UserId, String)>),
    Remove(Vec<(UserId, String)>),
    Leave,
    Rename(String),
    MakeAdmins(Vec<(UserId, String)>),
}

/// A group change to commit: like a message, it takes the next seq of the
/// conversation (its event is the message) and a resend of its client id
/// gets the original.
#[derive(Clone, Debug)]
pub struct NewGroupEvent {
    /// `None` with [`GroupChange::Create`].
    pub conv: Option<ConversationId>,
    pub actor: UserId,
    pub actor_name: String,
    pub actor_device: DeviceId,
    pub client_id: MessageId,
    pub change: GroupChange,
    /// Members a group may have, the actor included.
    pub max_members: u32,
}

/// Why a group change was not made. Nothing was written.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GroupRefusal {
    NotAGroup,
    NotAdmin,
    TooManyMembers,
    /// It would change nothing.
    NoChange,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Appended {
    /// Newly stored. `first_from_sender` is true when this is the sender's
    /// first message in the conversation (its presence becomes visible there).
    /// `members`: who gets it, as of the commit, ascending: the current
    /// members (for a group change, those before and after it).
    New {
        message: StoredMessage,
        first_from_sender: bool,
        members: Arc<[UserId]>,
    },
    /// The sender already stored a message with this client id: this is the
    /// original, unchanged (its body may differ from the resend's). Found
    /// before any other check, so a resend always gets its original.
    Duplicate(StoredMessage),
    /// Not stored: a member's device list changed after the envelope was
    /// checked ([`NewMessage::device_epochs`]). Nothing was written.
    DevicesChanged,
    /// Not stored: the conversation is a request the other member has not
    /// accepted, and the sender has sent as many as it may there.
    NotAccepted,
    /// Not stored: a blob it lists is not a complete upload of the sender's.
    UnknownBlob,
    /// Not stored: the sender is not a current member (it was removed, or
    /// left, before this commit).
    NotMember,
    /// Not stored: a group change that may not be made.
    Group(GroupRefusal),
    /// Not stored: it would take the sender past its bytes for today
    /// ([`NewMessage::daily_bytes`]).
    OverQuota(OverQuota),
}

/// A daily allowance is used up until the next UTC midnight, this long
/// from now.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OverQuota {
    pub retry_after_ms: i64,
}

const DAY_MS: i64 = 86_400_000;

/// What a store's count of a user's conversations today answered: the
/// count after this one, or nothing when the upsert's limit held.
pub(crate) fn within(
    counted: Option<i64>,
    per_day: u32,
    over: OverQuota,
) -> std::result::Result<(), OverQuota> {
    match counted {
        Some(n) if n <= i64::from(per_day) => Ok(()),
        _ => Err(over),
    }
}

/// The UTC day `now` falls in (days since the epoch), and what an
/// allowance of that day answers when it is used up.
pub(crate) fn utc_day(now: i64) -> (i64, OverQuota) {
    let day = now.div_euclid(DAY_MS);
    let retry_after_ms = (day + 1) * DAY_MS - now;
    (day, OverQuota { retry_after_ms })
}

impl Appended {
    /// The stored message, new or original; `None` when nothing was stored.
    pub fn message(&self) -> Option<&StoredMessage> {
        match self {
            Appended::New { message, .. } | Appended::Duplicate(message) => Some(message),
            Appended::DevicesChanged
            | Appended::NotAccepted
            | Appended::UnknownBlob
            | Appended::NotMember
            | Appended::Group(_)
            | Appended::OverQuota(_) => None,
        }
    }
}

/// How much one read of messages may return: `limit` messages, and no
/// more once their bodies add up past `max_bytes` (but always at least one),
/// so that neither memory nor the reply frame depends on body sizes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Page {
    pub limit: u32,
    pub max_bytes: usize,
}

/// A device reporting how far it has received and/or read a conversation.
/// An update of 0 and 0 moves nothing; its answer names the authors of
/// everything up to the member's cursors (whom an accept tells of them).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CursorUpdate {
    pub conv: ConversationId,
    pub user: UserId,
    pub device: DeviceId,
    pub delivered: i64,
    /// Reading implies delivery; 0 when this update says nothing of reading.
    pub read: i64,
}

/// The member's cursors (highest over its devices) after an update.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MemberCursors {
    pub delivered: i64,
    pub read: i64,
    /// Whether the update moved each cursor.
    pub delivered_advanced: bool,
    pub read_advanced: bool,
}

/// A cursor update's outcome and whom it concerns.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CursorsMoved {
    pub cursors: MemberCursors,
    /// The other current members who wrote messages the moved cursors
    /// passed (in a direct conversation: the other member, whatever was
    /// passed): whom the receipt goes to. Empty when nothing moved, but
    /// for the 0, 0 probe ([`CursorUpdate`]).
    pub authors: Vec<UserId>,
}

impl MemberCursors {
    pub fn advanced(&self) -> bool {
        self.delivered_advanced || self.read_advanced
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Member {
    pub user: UserId,
    pub username: String,
    /// Whether this member has sent a message in the conversation.
    pub has_sent: bool,
    /// Whether this member created, sent in or accepted the conversation;
    /// until then it is a message request for this member.
    pub accepted: bool,
    pub role: Role,
    /// The member sees the messages after this seq (0: all; for a member
    /// added to a group, those from its `added` event on).
    pub joined_seq: i64,
    /// Set once the member left or was removed: it sees nothing after this
    /// seq (its `left` or `removed` event).
    pub left_seq: Option<i64>,
}

impl Member {
    pub fn current(&self) -> bool {
        self.left_seq.is_none()
    }

    /// Whether message `seq` is one this member may see.
    pub fn sees(&self, seq: i64) -> bool {
        seq > self.joined_seq && self.left_seq.is_none_or(|left| seq <= left)
    }
}

/// Another current member of a conversation, as one of its members sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OtherMember {
    pub member: Member,
    pub delivered: i64,
    pub read: i64,
    pub read_receipts: bool,
    pub last_seen: Option<i64>,
    /// Either of the two has blocked the other.
    pub blocked: bool,
}

/// One conversation as seen by one device of one of its members.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConversationState {
    pub conv: ConversationId,
    pub kind: ConvKind,
    /// A group's name.
    pub name: Option<String>,
    /// The last seq this user sees: the conversation's, or where the user
    /// left it.
    pub last_seq: i64,
    pub last_ts: Option<i64>,
    /// Where this device's sync starts (never before the user joined).
    pub device_delivered: i64,
    /// The user's own cursors (highest over the user's devices).
    pub delivered: i64,
    pub read: i64,
    pub role: Role,
    /// The user left or was removed (at `last_seq`).
    pub left: bool,
    /// The other current members (none once the user left), by user id.
    pub others: Vec<OtherMember>,
    /// Whether this user has accepted the conversation (false: a request).
    pub accepted: bool,
}

impl ConversationState {
    /// The other member of a direct conversation.
    pub fn peer(&self) -> Option<&OtherMember> {
        match self.kind {
            ConvKind::Direct => self.others.first(),
            ConvKind::Group => None,
        }
    }
}

/// How far one member has one message (`Store::receipt_times`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MemberReceipt {
    pub user: UserId,
    pub username: String,
    pub read_receipts: bool,
    /// Whether the member accepted the conversation (until then its
    /// receipts are not shown).
    pub accepted: bool,
    pub delivered: bool,
    pub delivered_at: Option<i64>,
    pub read: bool,
    pub read_at: Option<i64>,
}

/// A file's encrypted bytes as the server keeps them: uploaded with tus, in
/// parts (docs/files.md).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BlobRecord {
    /// Random, made by the server; never derived from anything a client sent.
    pub id: String,
    pub owner: UserId,
    /// Bytes the upload will have (tus `Upload-Length`).
    pub length: i64,
    /// Bytes stored so far (tus `Upload-Offset`).
    pub received: i64,
    pub created_at: i64,
    /// An upload not complete by then is deleted.
    pub expires_at: i64,
    /// When its owner deleted it, or the retention did: its bytes are gone.
    pub deleted_at: Option<i64>,
}

impl BlobRecord {
    pub fn complete(&self) -> bool {
        self.received == self.length
    }
}

/// One part object of a blob: bytes `start..start + len`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BlobPart {
    pub index: i64,
    pub start: i64,
    pub len: i64,
    /// Its key in blob storage.
    pub object: String,
}

#[derive(Clone, Debug)]
pub struct NewBlob {
    pub id: String,
    pub owner: UserId,
    pub length: i64,
    pub now: i64,
    pub expires_at: i64,
    /// Bytes the owner's blobs may take together, this one included.
    pub quota_bytes: i64,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum BlobCreated {
    Created(BlobRecord),
    /// Not created: the owner's blobs take `used` bytes already.
    OverQuota {
        used: i64,
    },
}

/// Durable state of a confab server. Every method is a short transaction;
/// writes are batched by the implementation (group commit), so callers may
/// issue them concurrently and cheaply.
#[async_trait]
pub trait Store: Send + Sync + 'static {
    // Accounts.
    async fn create_user(
        &self,
        username: &Username,
        password_hash: &str,
        now: i64,
    ) -> Result<UserId>;
    async fn user_by_name(&self, username: &str) -> Result<Option<UserRecord>>;
    async fn user(&self, id: UserId) -> Result<Option<UserRecord>>;
    async fn set_password_hash(&self, user: UserId, password_hash: &str) -> Result<()>;
    async fn set_read_receipts(&self, user: UserId, on: bool) -> Result<()>;
    async fn set_last_seen(&self, user: UserId, ts: i64) -> Result<()>;

    // Devices and sessions.
    /// Creates a device whose cursors start at the current end of every
    /// conversation of the user.
    async fn create_device(&self, user: UserId, name: &str, now: i64) -> Result<DeviceRecord>;
    /// A device that exists and has not been removed.
    async fn device(&self, id: DeviceId) -> Result<Option<DeviceRecord>>;
    async fn devices(&self, user: UserId) -> Result<Vec<DeviceRecord>>;
    /// Marks the device removed and ends its sessions. False when it was not
    /// a current device of `user`.
    async fn remove_device(&self, user: UserId, device: DeviceId, now: i64) -> Result<bool>;
    async fn create_session(
        &self,
        token_hash: [u8; 32],
        user: UserId,
        device: DeviceId,
        now: i64,
        expires_at: i64,
    ) -> Result<()>;
    /// The session of a token hash, if it exists and its device is current.
    /// Expiry is the caller's check (it answers differently).
    async fn session(&self, token_hash: [u8; 32]) -> Result<Option<SessionRecord>>;
    /// Ends every session of the device (it stays a device of the user).
    async fn end_sessions(&self, device: DeviceId) -> Result<()>;
    /// Ends every session of the user except those of `keep`; returns the
    /// user's other current devices (whose sockets the caller closes).
    async fn end_other_sessions(&self, user: UserId, keep: DeviceId) -> Result<Vec<DeviceId>>;

    // End-to-end encryption: public keys and signed device lists.
    /// Sets the device's public keys if it has none yet. True when the device
    /// now has exactly `keys` (false: other keys, or no such device).
    async fn set_device_keys(&self, device: DeviceId, keys: PublicKeys) -> Result<bool>;
    /// The user's device lists with `epoch > after`, oldest first.
    async fn device_lists(&self, user: UserId, after: i64) -> Result<Vec<StoredDeviceList>>;
    async fn latest_device_list(&self, user: UserId) -> Result<Option<StoredDeviceList>>;
    /// Stores the user's next device list, and removes the `remove` devices
    /// (ending their sessions) in the same commit. `Conflict` unless
    /// `list.epoch` is one past the newest stored epoch (1 for the first).
    async fn put_device_list(
        &self,
        user: UserId,
        list: StoredDeviceList,
        remove: Vec<DeviceId>,
        now: i64,
    ) -> Result<()>;

    // Conversations.
    /// The 1:1 conversation of the pair, created on first use; `a` opens
    /// it (has accepted it), for `b` it is a request.
    async fn open_direct(&self, a: UserId, b: UserId, now: i64) -> Result<ConversationId>;
    /// Counts a conversation `user` starts today (UTC, by the store's
    /// clock), every node together, unless it has started `per_day`.
    async fn count_new_conversation(
        &self,
        user: UserId,
        per_day: u32,
    ) -> Result<std::result::Result<(), OverQuota>>;
    /// Forgets what users used on days before today (by the store's clock).
    async fn forget_old_usage(&self) -> Result<()>;
    /// The pair's 1:1 conversation, if there is one.
    async fn find_direct(&self, a: UserId, b: UserId) -> Result<Option<ConversationId>>;
    /// `user` accepts the message request `conv` (no change if it had).
    async fn accept(&self, conv: ConversationId, user: UserId) -> Result<()>;
    /// Members of a conversation, current and former, by user id, with its
    /// kind and name; `NotFound` when it does not exist.
    async fn members(
        &self,
        conv: ConversationId,
    ) -> Result<(ConvKind, Option<String>, Vec<Member>)>;
    /// Makes a group change: in one commit, the members table changes and
    /// the change's event takes the conversation's next seq.
    async fn change_group(&self, event: NewGroupEvent) -> Result<Appended>;
    /// The users among `others` with a block between them and `user`.
    async fn blocked_among(&self, user: UserId, others: &[UserId]) -> Result<Vec<UserId>>;
    /// For message `seq` of `conv`: each member who may see it (the sender
    /// too), and how far its cursors have it.
    async fn receipt_times(&self, conv: ConversationId, seq: i64) -> Result<Vec<MemberReceipt>>;
    async fn conversations(&self, user: UserId, device: DeviceId)
    -> Result<Vec<ConversationState>>;
    /// Per conversation of the user: messages from others after the user's
    /// read cursor. Costs a scan of the unread messages; for listings only.
    async fn unread_counts(&self, user: UserId) -> Result<Vec<(ConversationId, i64)>>;

    // Messages and receipts.
    async fn append(&self, message: NewMessage) -> Result<Appended>;
    /// The message `sender` stored under `client_id`, if any.
    async fn sent_message(
        &self,
        sender: UserId,
        client_id: &MessageId,
    ) -> Result<Option<StoredMessage>>;
    /// The last seq (0 when empty) of every conversation of each of
    /// `users`, as (user, conversation, seq): what a node compares with what
    /// its connections were written, to find live publishes they missed.
    /// One read for many users.
    async fn heads(&self, users: &[UserId]) -> Result<Vec<(UserId, ConversationId, i64)>>;
    /// Messages with `seq > after`, oldest first, at most `page.limit` and
    /// stopping once their bodies pass `page.max_bytes` (at least one).
    async fn messages_after(
        &self,
        conv: ConversationId,
        after: i64,
        page: Page,
    ) -> Result<Vec<StoredMessage>>;
    /// The newest messages with `seq < before` that fit `page`, oldest first.
    async fn history(
        &self,
        conv: ConversationId,
        before: i64,
        page: Page,
    ) -> Result<Vec<StoredMessage>>;
    /// Moves the device's and the member's cursors forward (never back, and
    /// never past the conversation's last seq, or where the member left).
    async fn advance_cursors(&self, update: CursorUpdate) -> Result<CursorsMoved>;

    // Blocks.
    async fn set_blocked(&self, blocker: UserId, blocked: UserId, on: bool, now: i64)
    -> Result<()>;
    /// Whether either user has blocked the other.
    async fn is_blocked(&self, a: UserId, b: UserId) -> Result<bool>;

    /// Users allowed to see `user`'s presence and typing: the other
    /// current members of conversations where `user` is a current member
    /// and has sent a message, minus blocks.
    async fn presence_watchers(&self, user: UserId) -> Result<Vec<UserId>>;

    // Blobs (docs/files.md).
    /// Creates an empty upload, if the owner's blobs leave room for it.
    async fn create_blob(&self, blob: NewBlob) -> Result<BlobCreated>;
    async fn blob(&self, id: &str) -> Result<Option<BlobRecord>>;
    /// The blob, if `user` may download it: its owner, or a member of a
    /// conversation with a message that refers to it.
    async fn visible_blob(&self, id: &str, user: UserId) -> Result<Option<BlobRecord>>;
    /// The blob's parts, in order.
    async fn blob_parts(&self, id: &str) -> Result<Vec<BlobPart>>;
    /// Records a part already in blob storage, if it starts where the bytes
    /// received so far end and stays within the length (otherwise it is
    /// not recorded: `Conflict`); moves the expiry to `expires_at`. Returns
    /// the blob as it is now; `NotFound` when there is none.
    async fn add_blob_part(&self, id: &str, part: BlobPart, expires_at: i64) -> Result<BlobRecord>;
    /// Deletes the blob and returns its parts (whose objects the caller
    /// deletes); `None` when there was no such blob. A blob messages refer
    /// to stays as a tombstone (`deleted_at`), so that they show it as
    /// deleted; any other goes entirely.
    async fn delete_blob(&self, id: &str, now: i64) -> Result<Option<Vec<BlobPart>>>;
    /// In one commit, deletes at most `limit` blobs: uploads whose expiry is
    /// before `now`, then blobs created before `retired_before` (the
    /// retention), as [`Store::delete_blob`] does. Returns each one's id and
    /// parts.
    async fn sweep_blobs(
        &self,
        now: i64,
        retired_before: Option<i64>,
        limit: u32,
    ) -> Result<Vec<(String, Vec<BlobPart>)>>;

    /// Waits for queued writes to commit and stops the writer.
    async fn close(&self);

    /// Whether calls commit in the order they were first polled, so that a
    /// caller may keep several writes in flight and still have them
    /// committed in its order (SQLite: one queue to one writer). When
    /// false, a caller that needs the order waits for each write to return
    /// before it starts the next.
    fn commits_in_call_order(&self) -> bool {
        false
    }
}
