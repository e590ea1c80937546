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
    /// A connection of `user` closed. True when the user just went offline.
    async fn disconnected(&self, user: UserId) -> bool;
    async fn is_online(&self, user: UserId) -> bool;
}

/// Presence of one node: a count of open connections per user.
#[derive(Default)]
pub struct LocalPresence {
    connections: Mutex<HashMap<UserId, u32>>,
}

#[async_trait]
impl Presence for LocalPresence {
    async fn connected(&self, user: UserId) -> bool {
        let mut map = self.connections.lock().expect("presence poisoned");
        let count = map.entry(user).or_insert(0);
        *count += 1;
        *count == 1
    }

    async fn disconnected(&self, user: UserId) -> bool {
        let mut map = self.connections.lock().expect("presence poisoned");
        match map.get_mut(&user) {
            Some(count) if *count > 1 => {
                *count -= 1;
                false
            }
            Some(_) => {
                map.remove(&user);
                true
            }
            None => false,
        }
    }

    async fn is_online(&self, user: UserId) -> bool {
        self.connections
            .lock()
            .expect("presence poisoned")
            .contains_key(&user)
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
        assert!(!p.disconnected(u).await);
        assert!(p.is_online(u).await);
        assert!(p.disconnected(u).await);
        assert!(!p.is_online(u).await);
        assert!(
            !p.disconnected(u).await,
            "an extra close is not a second offline"
        );
    }
}
