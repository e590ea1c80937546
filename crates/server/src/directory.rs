//! Each user's current signed device list, as the set of device ids every
//! `send` must be encrypted for, and the list's epoch.
//!
//! The server cannot sign lists; it only checks that a list posted by one of
//! the user's devices follows the previous one (docs/encryption.md), stores
//! it, and holds the newest one's device ids here. Clients verify the
//! signatures themselves and never trust this set.
//!
//! This cache may lag behind the store for a moment (a list is `set` here
//! after its commit), and with several nodes for longer (with Redis, the
//! node that stores a list tells the others, which `forget` it; the news
//! can be lost): that is safe,
//! because every message carries the epochs it was checked against and the
//! store's commit refuses it if a newer list committed meanwhile. A refused
//! send (here or at the commit) makes the connection `forget` the members'
//! entries and read them again, so a stale entry lives until the first send
//! that meets it.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use confab_crypto::SignedDeviceList;
use confab_protocol::DeviceId;
use confab_store::{Store, StoreError, UserId};

/// A user's newest device list: its epoch (0 when the user has none) and
/// its device ids, ascending.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CurrentList {
    pub epoch: i64,
    pub devices: Arc<[DeviceId]>,
}

#[derive(Default)]
pub struct Directory {
    current: Mutex<HashMap<UserId, CurrentList>>,
}

impl Directory {
    /// The user's newest list as far as this node knows.
    pub async fn current(
        &self,
        store: &dyn Store,
        user: UserId,
    ) -> Result<CurrentList, StoreError> {
        if let Some(list) = self.current.lock().unwrap().get(&user) {
            return Ok(list.clone());
        }
        let list = match store.latest_device_list(user).await? {
            Some(stored) => CurrentList {
                epoch: stored.epoch,
                devices: device_ids(&parse(&stored.signed)?),
            },
            None => CurrentList {
                epoch: 0,
                devices: Arc::from([]),
            },
        };
        Ok(self.keep_newer(user, list))
    }

    /// Called after a new list of the user committed.
    pub fn set(&self, user: UserId, epoch: i64, list: &SignedDeviceList) {
        self.keep_newer(
            user,
            CurrentList {
                epoch,
                devices: device_ids(list),
            },
        );
    }

    /// Drops what this node holds of the user's list: the store refused a
    /// message checked against it.
    pub fn forget(&self, user: UserId) {
        self.current.lock().unwrap().remove(&user);
    }

    /// Stores `list` unless a newer one is there already (a list stored
    /// while this one was read from the store), and returns the newest.
    fn keep_newer(&self, user: UserId, list: CurrentList) -> CurrentList {
        let mut current = self.current.lock().unwrap();
        let entry = current.entry(user).or_insert_with(|| list.clone());
        if list.epoch > entry.epoch {
            *entry = list;
        }
        entry.clone()
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

#[cfg(test)]
mod tests {
    use super::*;

    fn list(epoch: i64, devices: &[i64]) -> CurrentList {
        CurrentList {
            epoch,
            devices: devices.iter().map(|d| DeviceId(*d)).collect(),
        }
    }

    #[test]
    fn an_older_list_read_late_never_replaces_a_newer_one() {
        let directory = Directory::default();
        let user = UserId(1);
        assert_eq!(
            directory.keep_newer(user, list(2, &[1, 2])),
            list(2, &[1, 2])
        );
        assert_eq!(directory.keep_newer(user, list(1, &[1])), list(2, &[1, 2]));
        assert_eq!(directory.keep_newer(user, list(3, &[2])), list(3, &[2]));
        directory.forget(user);
        assert_eq!(directory.keep_newer(user, list(1, &[1])), list(1, &[1]));
    }
}
