//! Live events between nodes through Redis pub/sub.
//!
//! Each user has a channel, `confab:u:<id>`. A node subscribes to the
//! channels of the users connected to it (the hub tells it of a user's
//! first and last connection here) and publishes every event for a user to
//! that user's channel, besides handing it to its own hub. One publish per
//! recipient, whoever holds it and however many devices it has; a user on
//! no node costs Redis a lookup that finds no subscriber. A node skips what
//! it published itself: its own connections already have it.
//!
//! Pub/sub is at most once, and that is all this needs: everything a
//! message event carries is committed before it is published, and a
//! forward lost to a Redis restart, a full queue or a reconnect is found by
//! the repair round (`repair.rs`). While Redis is away, sends still commit
//! and are acked; messages reach other nodes' devices at their repair
//! round, and receipts, typing and presence changes of other nodes are
//! missed until the next sync. The connection manager reconnects by itself
//! and subscribes again to every channel it had.

use std::sync::Arc;
use std::time::{Duration, Instant};

use confab_protocol::{ConversationId, DeviceId, ErrorCode};
use confab_store::UserId;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{IntoConnectionInfo, ProtocolVersion, PushInfo, PushKind, Value};
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::directory::Directory;
use crate::hub::{Delivery, Event, Hub, PresenceChange, Receipt, Router};
use crate::socket::Utf8Bytes;

const CHANNEL_PREFIX: &str = "confab:u:";
/// What every node hears: device-list changes.
const EVERY_NODE: &str = "confab:all";
/// Events waiting to be published; past this they are dropped (and
/// repaired, for messages) rather than held without bound.
const PUBLISH_QUEUE: usize = 16_384;
/// Publishes sent to Redis in one pipeline at most.
const PIPELINE: usize = 256;

fn channel(user: UserId) -> String {
    format!("{CHANNEL_PREFIX}{}", user.0)
}

/// An event as it travels between nodes.
#[derive(Serialize, Deserialize)]
struct Forward {
    /// The node that published it.
    node: u64,
    event: Wire,
}

#[derive(Serialize, Deserialize)]
#[serde(tag = "t", rename_all = "snake_case")]
enum Wire {
    Message {
        conv: ConversationId,
        seq: i64,
        sender: i64,
        sender_device: DeviceId,
        membership: bool,
        msg: String,
        sent: String,
    },
    Receipt {
        conv: ConversationId,
        user: i64,
        username: String,
        delivered: i64,
        read: i64,
        shares_read: bool,
    },
    Presence {
        user: i64,
        frame: String,
    },
    Typing {
        frame: String,
    },
    BlockChanged {
        a: i64,
        b: i64,
    },
    ReadReceiptsSetting {
        on: bool,
    },
    Accepted {
        conv: ConversationId,
    },
    Kick {
        device: DeviceId,
        reason: ErrorCode,
    },
    /// On `EVERY_NODE`: the user's device list changed.
    DeviceList {
        user: i64,
    },
}

impl Wire {
    /// What crosses nodes; `None` for what only this node's connections
    /// need (the repair round's heads, which each node reads itself).
    fn from_event(event: &Event) -> Option<Wire> {
        Some(match event {
            Event::Message(d) => Wire::Message {
                conv: d.conv,
                seq: d.seq,
                sender: d.sender.0,
                sender_device: d.sender_device,
                membership: d.membership,
                msg: d.msg_frame.as_str().to_owned(),
                sent: d.sent_frame.as_str().to_owned(),
            },
            Event::Receipt(r) => Wire::Receipt {
                conv: r.conv,
                user: r.user.0,
                username: r.username.clone(),
                delivered: r.delivered,
                read: r.read,
                shares_read: r.shares_read,
            },
            Event::Presence(p) => Wire::Presence {
                user: p.user.0,
                frame: p.frame.as_str().to_owned(),
            },
            Event::Typing(frame) => Wire::Typing {
                frame: frame.as_str().to_owned(),
            },
            Event::BlockChanged { a, b } => Wire::BlockChanged { a: a.0, b: b.0 },
            Event::ReadReceiptsSetting(on) => Wire::ReadReceiptsSetting { on: *on },
            Event::Accepted(conv) => Wire::Accepted { conv: *conv },
            Event::Heads(_) => return None,
        })
    }

    /// Hands the event to this node's connections of `user`.
    fn deliver(self, hub: &Hub, user: UserId) {
        let event = match self {
            Wire::Message {
                conv,
                seq,
                sender,
                sender_device,
                membership,
                msg,
                sent,
            } => Event::Message(Arc::new(Delivery {
                conv,
                seq,
                sender: UserId(sender),
                sender_device,
                membership,
                msg_frame: Utf8Bytes::from(msg),
                sent_frame: Utf8Bytes::from(sent),
                // The send was read on another node: its latency is
                // measured there.
                accepted_at: Instant::now(),
            })),
            Wire::Receipt {
                conv,
                user,
                username,
                delivered,
                read,
                shares_read,
            } => Event::Receipt(Arc::new(Receipt {
                conv,
                user: UserId(user),
                username,
                delivered,
                read,
                shares_read,
            })),
            Wire::Presence { user, frame } => Event::Presence(Arc::new(PresenceChange {
                user: UserId(user),
                frame: Utf8Bytes::from(frame),
            })),
            Wire::Typing { frame } => Event::Typing(Arc::new(Utf8Bytes::from(frame))),
            Wire::BlockChanged { a, b } => Event::BlockChanged {
                a: UserId(a),
                b: UserId(b),
            },
            Wire::ReadReceiptsSetting { on } => Event::ReadReceiptsSetting(on),
            Wire::Accepted { conv } => Event::Accepted(conv),
            Wire::Kick { device, reason } => return hub.kick_device(user, device, reason),
            Wire::DeviceList { .. } => return,
        };
        hub.deliver(user, &event);
    }
}

/// Several nodes: this node's hub, and every other node's through Redis.
pub struct RedisRouter {
    hub: Arc<Hub>,
    node: u64,
    publish: mpsc::Sender<(Channels, Arc<str>)>,
}

/// Where a forward goes: the channels of these users, or every node's.
enum Channels {
    Users(Arc<[UserId]>),
    EveryNode,
}

/// A connection to Redis at `url` that reconnects by itself, waiting for
/// it no longer than a few seconds (a node that cannot reach Redis at
/// start says so). RESP3, which subscriptions need: pushes arrive on the
/// same connection, and the manager subscribes again after a reconnect.
pub async fn connect(
    url: &str,
    config: ConnectionManagerConfig,
) -> redis::RedisResult<ConnectionManager> {
    let info = url.into_connection_info()?;
    let settings = info
        .redis_settings()
        .clone()
        .set_protocol(ProtocolVersion::RESP3);
    let client = redis::Client::open(info.set_redis_settings(settings))?;
    let config = config
        .set_connection_timeout(Some(Duration::from_secs(3)))
        .set_response_timeout(Some(Duration::from_secs(3)))
        .set_max_delay(Duration::from_secs(2));
    client.get_connection_manager_with_config(config).await
}

impl RedisRouter {
    /// Starts forwarding between `hub` and the other nodes through Redis
    /// at `url`, as node `node`, until `shutdown`; other nodes' device-list
    /// changes are dropped from `directory`.
    pub async fn start(
        url: &str,
        node: u64,
        hub: Arc<Hub>,
        directory: Arc<Directory>,
        shutdown: CancellationToken,
    ) -> Result<Self, redis::RedisError> {
        let inbound = hub.clone();
        let config = ConnectionManagerConfig::new()
            .set_automatic_resubscription()
            .set_push_sender(move |push: PushInfo| {
                received(&inbound, &directory, node, push);
                Ok::<(), std::convert::Infallible>(())
            });
        let mut subscriber = connect(url, config).await?;
        subscriber.subscribe(EVERY_NODE).await?;
        // Publishing on a connection of its own: a burst of publishes does
        // not hold up the pushes coming in.
        let publisher = connect(url, ConnectionManagerConfig::new()).await?;

        let (changes_tx, changes) = mpsc::unbounded_channel();
        hub.watch(Box::new(move |user, here| {
            let _ = changes_tx.send((user, here));
        }));
        tokio::spawn(subscribe(subscriber, changes, shutdown.clone()));
        let (publish, queue) = mpsc::channel(PUBLISH_QUEUE);
        tokio::spawn(publish_loop(publisher, queue, shutdown));
        tracing::info!(
            node = format_args!("{node:016x}"),
            "routing between nodes through Redis"
        );
        Ok(Self { hub, node, publish })
    }

    fn forward(&self, to: Channels, event: Wire) {
        let forward = Forward {
            node: self.node,
            event,
        };
        let payload = match serde_json::to_string(&forward) {
            Ok(payload) => payload,
            Err(e) => return tracing::error!(error = %e, "cannot serialize an event"),
        };
        if self.publish.try_send((to, Arc::from(payload))).is_err() {
            metrics::counter!("confab_forwards_dropped_total").increment(1);
        }
    }
}

impl Router for RedisRouter {
    fn deliver(&self, users: &[UserId], event: Event) {
        for &user in users {
            self.hub.deliver(user, &event);
        }
        if let Some(wire) = Wire::from_event(&event) {
            self.forward(Channels::Users(Arc::from(users)), wire);
        }
    }

    fn kick_device(&self, user: UserId, device: DeviceId, reason: ErrorCode) {
        self.hub.kick_device(user, device, reason);
        self.forward(
            Channels::Users(Arc::from([user])),
            Wire::Kick { device, reason },
        );
    }

    fn device_list_changed(&self, user: UserId) {
        self.forward(Channels::EveryNode, Wire::DeviceList { user: user.0 });
    }
}

/// A push from Redis: a message on a user's channel goes to the hub, a
/// device-list change to the directory.
fn received(hub: &Hub, directory: &Directory, me: u64, push: PushInfo) {
    if push.kind != PushKind::Message {
        return;
    }
    let [Value::BulkString(name), Value::BulkString(payload)] = push.data.as_slice() else {
        return;
    };
    let forward = match serde_json::from_slice::<Forward>(payload) {
        Ok(forward) if forward.node == me => return,
        Ok(forward) => forward,
        Err(e) => {
            return tracing::warn!(error = %e, "an event from another node was not understood");
        }
    };
    metrics::counter!("confab_forwards_received_total").increment(1);
    if let Wire::DeviceList { user } = forward.event {
        return directory.forget(UserId(user));
    }
    let user = std::str::from_utf8(name)
        .ok()
        .and_then(|n| n.strip_prefix(CHANNEL_PREFIX))
        .and_then(|id| id.parse().ok())
        .map(UserId);
    if let Some(user) = user {
        forward.event.deliver(hub, user);
    }
}

/// Follows the hub: subscribes to a user's channel at its first connection
/// here and unsubscribes at its last, in the order they happened.
async fn subscribe(
    mut redis: ConnectionManager,
    mut changes: mpsc::UnboundedReceiver<(UserId, bool)>,
    shutdown: CancellationToken,
) {
    // The manager stops reconnecting after a few failed attempts, and
    // nothing else is sent on this connection: a ping now and then makes
    // it try again, and subscribe again, once Redis is back.
    let mut keepalive = tokio::time::interval(Duration::from_secs(1));
    keepalive.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let (user, here) = tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = keepalive.tick() => {
                let _ = redis::cmd("PING").query_async::<()>(&mut redis).await;
                continue;
            }
            change = changes.recv() => match change {
                Some(change) => change,
                None => return,
            },
        };
        let name = channel(user);
        // Tried until it is done: a subscription missed would leave the
        // user's devices here on repair rounds alone.
        loop {
            let done = if here {
                redis.subscribe(&name).await
            } else {
                redis.unsubscribe(&name).await
            };
            match done {
                Ok(()) => break,
                Err(e) => {
                    tracing::warn!(error = %e, user = user.0, here, "Redis subscription failed; retrying");
                    tokio::select! {
                        _ = shutdown.cancelled() => return,
                        _ = tokio::time::sleep(Duration::from_millis(500)) => {}
                    }
                }
            }
        }
    }
}

/// Publishes queued events, many to a pipeline. What fails is dropped:
/// the repair round finds the messages among it.
async fn publish_loop(
    mut redis: ConnectionManager,
    mut queue: mpsc::Receiver<(Channels, Arc<str>)>,
    shutdown: CancellationToken,
) {
    let mut batch = Vec::with_capacity(PIPELINE);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            n = queue.recv_many(&mut batch, PIPELINE) => if n == 0 { return },
        }
        let mut pipe = redis::pipe();
        for (to, payload) in batch.drain(..) {
            match to {
                Channels::Users(users) => {
                    for &user in users.iter() {
                        pipe.publish(channel(user), payload.as_ref()).ignore();
                    }
                }
                Channels::EveryNode => {
                    pipe.publish(EVERY_NODE, payload.as_ref()).ignore();
                }
            }
        }
        if let Err(e) = pipe.query_async::<()>(&mut redis).await {
            metrics::counter!("confab_forwards_dropped_total").increment(1);
            tracing::warn!(error = %e, "events not forwarded to other nodes");
        }
    }
}
