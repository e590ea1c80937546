//! A store to test, and the values scenarios build.

use std::sync::Arc;

use confab_protocol::{ConversationId, DeviceId, MessageId, Username};
use confab_store::postgres::{PgOptions, PgStore};
use confab_store::sqlite::{SqliteOptions, SqliteStore};
use confab_store::{
    Clock, GroupChange, NewGroupEvent, NewMessage, Page, Store, StoredDeviceList, UserId,
};
use confab_testpg::Postgres;

/// A store under test, and how to open it again.
pub struct Backend {
    pub store: Arc<dyn Store>,
    place: Place,
}

enum Place {
    Sqlite(tempfile::TempDir),
    Postgres(String),
}

impl Backend {
    pub async fn sqlite() -> Backend {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(SqliteStore::open(dir.path(), SqliteOptions::default()).unwrap());
        Backend {
            store,
            place: Place::Sqlite(dir),
        }
    }

    /// A fresh database on the test process's PostgreSQL server.
    pub async fn postgres() -> Backend {
        let url = Postgres::shared().fresh_database();
        let store = Arc::new(pg(&url, Clock::system()).await);
        Backend {
            store,
            place: Place::Postgres(url),
        }
    }

    /// Another writer on the same data, reading `clock`: on PostgreSQL a
    /// store of its own (another node); SQLite has one writer by design,
    /// so there it is the same store, and `clock` is not used.
    pub async fn other_writer(&self, clock: Clock) -> Arc<dyn Store> {
        match &self.place {
            Place::Sqlite(_) => self.store.clone(),
            Place::Postgres(url) => Arc::new(pg(url, clock).await),
        }
    }

    /// On PostgreSQL, keeps the server from breaking deadlocks (a
    /// `deadlock_timeout` of an hour for this database), and reopens: a
    /// scenario that must not deadlock then hangs and fails, rather than
    /// passing a little slower on the retry after a victim was chosen.
    pub async fn without_deadlock_detection(self) -> Backend {
        if let Place::Postgres(url) = &self.place {
            let db = url.rsplit('/').next().unwrap();
            Postgres::shared().psql(
                db,
                &format!("ALTER DATABASE {db} SET deadlock_timeout = '1h'"),
            );
        }
        self.reopen(Clock::system()).await
    }

    /// Closes the store and opens the same data again, reading `clock`.
    pub async fn reopen(mut self, clock: Clock) -> Backend {
        self.store.close().await;
        self.store = match &self.place {
            Place::Sqlite(dir) => {
                let options = SqliteOptions {
                    clock,
                    ..Default::default()
                };
                Arc::new(SqliteStore::open(dir.path(), options).unwrap())
            }
            Place::Postgres(url) => Arc::new(pg(url, clock).await),
        };
        self
    }
}

async fn pg(url: &str, clock: Clock) -> PgStore {
    let options = PgOptions {
        clock,
        ..Default::default()
    };
    PgStore::connect(url, options).await.unwrap()
}

pub async fn user(store: &dyn Store, name: &str) -> (UserId, DeviceId) {
    let id = store
        .create_user(&Username::new(name).unwrap(), "hash", 1)
        .await
        .unwrap();
    let device = store.create_device(id, "test", 1).await.unwrap();
    (id, device.id)
}

/// Alice and Bob, a device each, and their conversation.
pub async fn pair(store: &dyn Store) -> ((UserId, DeviceId), (UserId, DeviceId), ConversationId) {
    let alice = user(store, "alice").await;
    let bob = user(store, "bob").await;
    let conv = store.open_direct(alice.0, bob.0, 1).await.unwrap();
    (alice, bob, conv)
}

pub fn page(limit: u32) -> Page {
    Page {
        limit,
        max_bytes: 1 << 20,
    }
}

pub fn msg(
    conv: ConversationId,
    (user, device): (UserId, DeviceId),
    name: &str,
    id: &str,
) -> NewMessage {
    NewMessage {
        conv,
        sender: user,
        sender_name: name.into(),
        sender_device: device,
        client_id: MessageId::new(id).unwrap(),
        body: format!("body of {id}"),
        device_epochs: Vec::new(),
        unanswered_limit: None,
        daily_bytes: None,
        blobs: Vec::new(),
    }
}

pub fn list(epoch: i64) -> StoredDeviceList {
    StoredDeviceList {
        epoch,
        signed: format!("{{\"epoch\":{epoch}}}"),
    }
}

pub fn part(index: i64, start: i64, len: i64) -> confab_store::BlobPart {
    confab_store::BlobPart {
        index,
        start,
        len,
        object: format!("b/{index}"),
    }
}

pub fn change(
    conv: Option<ConversationId>,
    (actor, device): (UserId, DeviceId),
    name: &str,
    id: &str,
    change: GroupChange,
) -> NewGroupEvent {
    NewGroupEvent {
        conv,
        actor,
        actor_name: name.into(),
        actor_device: device,
        client_id: MessageId::new(id).unwrap(),
        change,
        max_members: 3,
    }
}
