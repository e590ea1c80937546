//! Who is online. [`Presence`] counts a user's connections across the
//! cluster: [`LocalPresence`] for one node; a Redis implementation (heartbeat
//! keys with a TTL, as in the seed design) will serve several nodes.

use std::collections::HashMap;
use std::sync::Mutex;

use async_trait::async_trait;
use confab_store::UserId;

#[async_trait]
pub trait Presence: Send + Sync + 'static {
    /// A connection of `user` opened. True when the user just came online.
    async fn connected(&self, user: UserId) -> bool;
    /// A connection of `user` closed; the client last sent a frame on it at
    /// `last_active` (ms). When that was the user's last connection, returns
    /// the user's last seen: the latest frame on any of the connections it
    /// had while online, not the time the server noticed it had gone.
    async fn disconnected(&self, user: UserId, last_active: i64) -> Option<i64>;
    /// Whether each of `users` is online, in their order.
    async fn online(&self, users: &[UserId]) -> Vec<bool>;

    async fn is_online(&self, user: UserId) -> bool {
        self.online(&[user]).await.first().copied().unwrap_or(false)
    }

    /// The connections `user` has open on the other nodes (none on one
    /// node), so that a per-user limit holds for the cluster.
    async fn connections_elsewhere(&self, _user: UserId) -> usize {
        0
    }
}

/// Presence of one node: per user, its open connections and the latest
/// frame of those that closed since it came online.
#[derive(Default)]
pub struct LocalPresence {
    online: Mutex<HashMap<UserId, Online>>,
}

struct Online {
    connections: u32,
    last_active: i64,
}

impl LocalPresence {
    /// Every user with a connection here.
    pub fn users(&self) -> Vec<UserId> {
        self.online
            .lock()
            .expect("presence poisoned")
            .keys()
            .copied()
            .collect()
    }

    /// The connections `user` has open here.
    pub fn connections(&self, user: UserId) -> u32 {
        let map = self.online.lock().expect("presence poisoned");
        map.get(&user).map_or(0, |o| o.connections)
    }
}

#[async_trait]
impl Presence for LocalPresence {
    async fn connected(&self, user: UserId) -> bool {
        let mut map = self.online.lock().expect("presence poisoned");
        let online = map.entry(user).or_insert(Online {
            connections: 0,
            last_active: 0,
        });
        online.connections += 1;
        online.connections == 1
    }

    async fn disconnected(&self, user: UserId, last_active: i64) -> Option<i64> {
        let mut map = self.online.lock().expect("presence poisoned");
        let online = map.get_mut(&user)?;
        online.last_active = online.last_active.max(last_active);
        online.connections -= 1;
        if online.connections > 0 {
            return None;
        }
        map.remove(&user).map(|o| o.last_active)
    }

    async fn online(&self, users: &[UserId]) -> Vec<bool> {
        let map = self.online.lock().expect("presence poisoned");
        users.iter().map(|u| map.contains_key(u)).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn several_connections_are_one_presence() {
        let p = LocalPresence::default();
        let u = UserId(1);
        assert!(p.connected(u).await);
        assert!(!p.connected(u).await);
        assert_eq!(p.disconnected(u, 10).await, None);
        assert!(p.is_online(u).await);
        assert_eq!(p.disconnected(u, 5).await, Some(10), "the latest frame");
        assert!(!p.is_online(u).await);
        assert_eq!(
            p.disconnected(u, 20).await,
            None,
            "an extra close is not a second offline"
        );
        assert!(p.connected(u).await);
        assert_eq!(p.disconnected(u, 30).await, Some(30), "a new online period");
    }
}
