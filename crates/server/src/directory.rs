//! Each user's current signed device list, as the set of device ids every
//! `send` must be encrypted for.
//!
//! The server cannot sign lists; it only checks that a list posted by one of
//! the user's devices follows the previous one (docs/encryption.md), stores
//! it, and holds the newest one's device ids here. Clients verify the
//! signatures themselves and never trust this set.
//!
//! One node: this cache is the truth after the store. Several nodes will
//! need the Redis router to broadcast list changes so that every node drops
//! its copy (not built).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use confab_crypto::SignedDeviceList;
use confab_protocol::DeviceId;
use confab_store::{Store, StoreError, UserId};

#[derive(Default)]
pub struct Directory {
    current: Mutex<HashMap<UserId, Arc<[DeviceId]>>>,
}

impl Directory {
    /// The devices on the user's newest list, ascending; empty when the user
    /// has none yet.
    pub async fn devices(
        &self,
        store: &dyn Store,
        user: UserId,
    ) -> Result<Arc<[DeviceId]>, StoreError> {
        if let Some(ids) = self.current.lock().unwrap().get(&user) {
            return Ok(ids.clone());
        }
        let ids: Arc<[DeviceId]> = match store.latest_device_list(user).await? {
            Some(stored) => device_ids(&parse(&stored.signed)?),
            None => Arc::from([]),
        };
        // A list stored while this one was read has been `set` already and
        // is newer: keep it.
        let mut current = self.current.lock().unwrap();
        Ok(current.entry(user).or_insert(ids).clone())
    }

    /// Called after a new list of the user committed.
    pub fn set(&self, user: UserId, list: &SignedDeviceList) {
        self.current.lock().unwrap().insert(user, device_ids(list));
    }
}

/// A stored list, which the server itself checked before storing it.
pub fn parse(signed: &str) -> Result<SignedDeviceList, StoreError> {
    serde_json::from_str(signed)
        .map_err(|e| StoreError::Unavailable(format!("stored device list is unreadable: {e}")))
}

fn device_ids(list: &SignedDeviceList) -> Arc<[DeviceId]> {
    list.list
        .devices
        .iter()
        .map(|d| DeviceId(d.device))
        .collect()
}
