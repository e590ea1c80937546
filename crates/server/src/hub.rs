//! Routing of live events to connected devices.
//!
//! [`Hub`] is this node's registry of open connections. [`Router`] is the
//! interface the rest of the server delivers through: [`LocalRouter`] hands
//! events straight to the hub; a Redis-backed router (several nodes) will
//! also forward to the nodes holding the other recipients. The hub never
//! holds the only copy of anything: every message it carries is already
//! committed, and a device that misses a live event catches up from the
//! store.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Instant;

use crate::socket::Utf8Bytes;
use confab_protocol::{ConversationId, DeviceId, ErrorCode, ServerFrame};
use confab_store::{StoredMessage, UserId};
use tokio::sync::{Notify, mpsc};

use crate::limits::{Limits, Over, Slot};

/// Something to tell connected devices. Cheap to clone: one event fans out
/// to every device of every recipient. Kept small (24 bytes): every
/// connection's queue allocates room for a block of them up front.
#[derive(Clone, Debug)]
pub enum Event {
    /// A committed message. Its sending device gets `sent`, others `msg`.
    Message(Arc<Delivery>),
    /// `user`'s cursors in `conv` moved.
    Receipt(Arc<Receipt>),
    Presence(Arc<PresenceChange>),
    /// The `typing` frame, ready to write.
    Typing(Arc<Utf8Bytes>),
    /// A block between the two users was set or lifted.
    BlockChanged {
        a: UserId,
        b: UserId,
    },
    /// The recipient user's own settings changed on another device.
    ReadReceiptsSetting(bool),
    /// The recipient user accepted this message request on another device.
    Accepted(ConversationId),
    /// The last seq of each of the user's conversations, as the store had
    /// them a moment ago (`repair.rs`): the connection writes what it lacks.
    Heads(Arc<[(ConversationId, i64)]>),
}

#[derive(Debug)]
pub struct Delivery {
    pub conv: ConversationId,
    pub seq: i64,
    pub sender: UserId,
    pub sender_device: DeviceId,
    /// A membership event: whoever passes it on drops what it knows of the
    /// conversation's members.
    pub membership: bool,
    /// The `msg` frame, serialized once for all recipients.
    pub msg_frame: Utf8Bytes,
    /// The `sent` frame for the sending device.
    pub sent_frame: Utf8Bytes,
    /// When the server read the `send` frame (for the latency histogram).
    pub accepted_at: Instant,
}

impl Delivery {
    pub fn new(stored: &StoredMessage, accepted_at: Instant) -> Self {
        let m = &stored.message;
        let sent = ServerFrame::Sent {
            id: m.id.clone(),
            conv: m.conv,
            seq: m.seq,
            ts: m.ts,
            resent: false,
        };
        Self {
            conv: m.conv,
            seq: m.seq,
            sender: stored.sender,
            sender_device: m.from_device,
            membership: m.event.is_some(),
            msg_frame: ServerFrame::Msg(m.clone()).to_json().into(),
            sent_frame: sent.to_json().into(),
            accepted_at,
        }
    }
}

#[derive(Debug)]
pub struct Receipt {
    pub conv: ConversationId,
    pub user: UserId,
    pub username: String,
    pub delivered: i64,
    pub read: i64,
    /// Whether `user` shares read receipts with others.
    pub shares_read: bool,
}

#[derive(Debug)]
pub struct PresenceChange {
    pub user: UserId,
    pub frame: Utf8Bytes,
}

/// Tells one connection to close, with the reason it should give.
#[derive(Default, Debug)]
pub struct Kick {
    reason: OnceLock<ErrorCode>,
    notify: Notify,
}

impl Kick {
    pub fn kick(&self, reason: ErrorCode) {
        let _ = self.reason.set(reason);
        // notify_one stores a permit, so a kick is not lost if the
        // connection is busy elsewhere when it arrives.
        self.notify.notify_one();
    }

    pub async fn kicked(&self) -> ErrorCode {
        self.notify.notified().await;
        self.reason.get().copied().unwrap_or(ErrorCode::Internal)
    }
}

struct Entry {
    id: u64,
    device: DeviceId,
    events: mpsc::Sender<Event>,
    kick: Arc<Kick>,
    /// The user's connection count this socket holds; handed to the newer
    /// socket that replaces it.
    slot: Option<Slot>,
}

const SHARDS: usize = 16;

/// Told, under the user's shard lock (so in order), when a user gets its
/// first connection on this node (`true`) and when it loses its last.
/// Must not block.
pub type Watcher = Box<dyn Fn(UserId, bool) + Send + Sync>;

/// The connections open on this node, by user.
pub struct Hub {
    shards: Vec<Mutex<HashMap<UserId, Vec<Entry>>>>,
    next_id: AtomicU64,
    watcher: OnceLock<Watcher>,
}

impl Default for Hub {
    fn default() -> Self {
        Self {
            shards: (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect(),
            next_id: AtomicU64::new(1),
            watcher: OnceLock::new(),
        }
    }
}

/// A connection in the hub, for as long as this lives: dropping it (a
/// connection's end, or its task's panic) takes it out.
#[must_use]
pub struct Registration {
    hub: Arc<Hub>,
    user: UserId,
    id: u64,
}

impl Drop for Registration {
    fn drop(&mut self) {
        self.hub.unregister(self.user, self.id);
    }
}

impl Hub {
    fn shard(&self, user: UserId) -> &Mutex<HashMap<UserId, Vec<Entry>>> {
        &self.shards[user.0.rem_euclid(SHARDS as i64) as usize]
    }

    /// Sets who is told of users arriving and leaving (once; the router
    /// that forwards between nodes).
    pub fn watch(&self, watcher: Watcher) {
        if self.watcher.set(watcher).is_err() {
            tracing::error!("the hub already has a watcher");
        }
    }

    fn tell(&self, user: UserId, here: bool) {
        if let Some(watcher) = self.watcher.get() {
            watcher(user, here);
        }
    }

    /// Adds a connection; events for the user reach `events` from now on.
    /// A device at its connection limit has its oldest socket closed (a
    /// phone's dead sockets must not lock it out until they time out); a
    /// user at its limit is refused.
    pub fn register(
        self: &Arc<Self>,
        user: UserId,
        device: DeviceId,
        events: mpsc::Sender<Event>,
        kick: Arc<Kick>,
        limits: &Arc<Limits>,
    ) -> Result<Registration, Over> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let mut shard = self.shard(user).lock().expect("hub poisoned");
        let entries = shard.entry(user).or_default();
        let mut open = entries
            .iter_mut()
            .filter(|e| e.device == device && e.slot.is_some());
        let slot = match open.next() {
            // Entries are in the order they registered: the first is the oldest.
            Some(oldest) if open.count() + 1 >= limits.config().connections_per_device => {
                oldest.kick.kick(ErrorCode::Replaced);
                oldest.slot.take()
            }
            _ => None,
        };
        let slot = match slot {
            Some(slot) => slot,
            None => match limits.user_socket(user) {
                Ok(slot) => slot,
                Err(over) => {
                    if entries.is_empty() {
                        shard.remove(&user);
                    }
                    return Err(over);
                }
            },
        };
        let first = entries.is_empty();
        entries.push(Entry {
            id,
            device,
            events,
            kick,
            slot: Some(slot),
        });
        if first {
            self.tell(user, true);
        }
        Ok(Registration {
            hub: self.clone(),
            user,
            id,
        })
    }

    /// The sockets `user` holds here (one being replaced no longer counts).
    pub fn connections_of(&self, user: UserId) -> usize {
        let shard = self.shard(user).lock().expect("hub poisoned");
        shard.get(&user).map_or(0, |entries| {
            entries.iter().filter(|e| e.slot.is_some()).count()
        })
    }

    fn unregister(&self, user: UserId, id: u64) {
        let mut shard = self.shard(user).lock().expect("hub poisoned");
        if let Some(entries) = shard.get_mut(&user) {
            entries.retain(|e| e.id != id);
            if entries.is_empty() {
                shard.remove(&user);
                self.tell(user, false);
            }
        }
    }

    /// Queues `event` for every connection of `user`. A connection whose
    /// queue is full cannot keep up: it is kicked and will catch up from the
    /// store when it reconnects, instead of being buffered without bound.
    pub fn deliver(&self, user: UserId, event: &Event) {
        let shard = self.shard(user).lock().expect("hub poisoned");
        let Some(entries) = shard.get(&user) else {
            return;
        };
        for entry in entries {
            if let Err(mpsc::error::TrySendError::Full(_)) = entry.events.try_send(event.clone()) {
                entry.kick.kick(ErrorCode::TooSlow);
            }
        }
    }

    /// Every user with a connection on this node.
    pub fn users(&self) -> Vec<UserId> {
        let mut users = Vec::new();
        for shard in &self.shards {
            users.extend(shard.lock().expect("hub poisoned").keys().copied());
        }
        users
    }

    pub fn kick_device(&self, user: UserId, device: DeviceId, reason: ErrorCode) {
        let shard = self.shard(user).lock().expect("hub poisoned");
        for entry in shard
            .get(&user)
            .into_iter()
            .flatten()
            .filter(|e| e.device == device)
        {
            entry.kick.kick(reason);
        }
    }
}

/// Delivers events to users' connected devices, wherever they are connected.
pub trait Router: Send + Sync + 'static {
    fn deliver(&self, users: &[UserId], event: Event);
    fn kick_device(&self, user: UserId, device: DeviceId, reason: ErrorCode);
    /// `user`'s device list changed (this node's directory has the new
    /// one): other nodes drop what they hold of it.
    fn device_list_changed(&self, user: UserId);
}

/// One node: every connection is in the local hub.
pub struct LocalRouter {
    hub: Arc<Hub>,
}

impl LocalRouter {
    pub fn new(hub: Arc<Hub>) -> Self {
        Self { hub }
    }
}

impl Router for LocalRouter {
    fn deliver(&self, users: &[UserId], event: Event) {
        for &user in users {
            self.hub.deliver(user, &event);
        }
    }

    fn kick_device(&self, user: UserId, device: DeviceId, reason: ErrorCode) {
        self.hub.kick_device(user, device, reason);
    }

    fn device_list_changed(&self, _: UserId) {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_stay_small() {
        assert!(
            std::mem::size_of::<Event>() <= 24,
            "{}",
            std::mem::size_of::<Event>()
        );
    }

    fn limits() -> Arc<Limits> {
        Limits::new(Default::default(), 1000, None)
    }

    #[tokio::test]
    async fn a_device_over_its_limit_loses_its_oldest_socket() {
        let hub = Arc::new(Hub::default());
        let user = UserId(1);
        let limits = Limits::new(
            crate::limits::LimitsConfig {
                connections_per_device: 2,
                connections_per_user: 2,
                ..Default::default()
            },
            1000,
            None,
        );
        let (tx, _rx) = mpsc::channel(2);
        let kicks: Vec<Arc<Kick>> = (0..3).map(|_| Arc::default()).collect();
        let mut held = Vec::new();
        for kick in &kicks {
            held.push(
                hub.register(user, DeviceId(1), tx.clone(), kick.clone(), &limits)
                    .expect("a device replaces its oldest socket, even at the user's limit"),
            );
        }
        assert_eq!(kicks[0].kicked().await, ErrorCode::Replaced);
        let quiet = tokio::time::timeout(std::time::Duration::from_millis(20), kicks[1].kicked());
        assert!(quiet.await.is_err(), "only the oldest is closed");
        let other = hub.register(user, DeviceId(2), tx, Arc::default(), &limits);
        assert!(matches!(other, Err(Over::User)));
    }

    #[tokio::test]
    async fn a_full_queue_kicks_the_connection() {
        let hub = Arc::new(Hub::default());
        let (tx, mut rx) = mpsc::channel(2);
        let kick = Arc::new(Kick::default());
        let user = UserId(7);
        let _held = hub
            .register(user, DeviceId(1), tx, kick.clone(), &limits())
            .unwrap();
        let event = Event::ReadReceiptsSetting(true);
        for _ in 0..3 {
            hub.deliver(user, &event);
        }
        assert_eq!(kick.kicked().await, ErrorCode::TooSlow);
        assert!(rx.recv().await.is_some());
    }

    #[tokio::test]
    async fn kicks_only_the_named_device() {
        let hub = Arc::new(Hub::default());
        let user = UserId(1);
        let (tx, _rx) = mpsc::channel(2);
        let (k1, k2) = (Arc::new(Kick::default()), Arc::new(Kick::default()));
        let limits = limits();
        let _first = hub
            .register(user, DeviceId(1), tx.clone(), k1.clone(), &limits)
            .unwrap();
        let second = hub
            .register(user, DeviceId(2), tx, k2.clone(), &limits)
            .unwrap();
        hub.kick_device(user, DeviceId(1), ErrorCode::DeviceRemoved);
        assert_eq!(k1.kicked().await, ErrorCode::DeviceRemoved);
        drop(second);
        hub.kick_device(user, DeviceId(2), ErrorCode::DeviceRemoved);
        let notified =
            tokio::time::timeout(std::time::Duration::from_millis(20), k2.kicked()).await;
        assert!(
            notified.is_err(),
            "an unregistered connection is not kicked"
        );
    }

    #[test]
    fn the_watcher_hears_of_a_users_first_and_last_connection_only() {
        let hub = Arc::new(Hub::default());
        let heard = Arc::new(Mutex::new(Vec::new()));
        let log = heard.clone();
        hub.watch(Box::new(move |user, here| {
            log.lock().unwrap().push((user.0, here))
        }));
        let (tx, _rx) = mpsc::channel(2);
        let limits = limits();
        let register = |device| {
            hub.register(
                UserId(1),
                DeviceId(device),
                tx.clone(),
                Arc::default(),
                &limits,
            )
            .unwrap()
        };
        let (a, b) = (register(1), register(2));
        drop(a);
        assert_eq!(*heard.lock().unwrap(), [(1, true)]);
        drop(b);
        let _c = register(1);
        assert_eq!(*heard.lock().unwrap(), [(1, true), (1, false), (1, true)]);
    }
}
