//! The embedded store: one SQLite file in WAL mode.
//!
//! Every write goes through one writer thread that drains its queue into a
//! single transaction per round (group commit) with `synchronous=FULL`, so a
//! commit's fsync is shared by every message that arrived while the previous
//! one ran. Replies are sent only after the commit. Reads run on a small pool
//! of read-only connections, which in WAL mode never block the writer.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use confab_crypto::PublicKeys;
use confab_protocol::{ConversationId, DeviceId, Message, MessageId, Username};
use rusqlite::{Connection, OpenFlags, OptionalExtension, params};
use tokio::sync::{mpsc, oneshot};

mod blobs;
mod groups;

use crate::rows::{
    KEPT_MOVES, MOVE_BYTES, conv_kind, cursor_move, direct_key, passed_at, role, take_within,
};
use crate::{
    Appended, BlobCreated, BlobPart, BlobRecord, Clock, ConversationState, CursorUpdate,
    CursorsMoved, DeviceRecord, Member, MemberCursors, MemberReceipt, NewBlob, NewGroupEvent,
    NewMessage, OtherMember, OverQuota, Page, Result, SessionRecord, Store, StoreError,
    StoredDeviceList, StoredMessage, UserId, UserRecord, utc_day, within,
};
use confab_protocol::ConvKind;

/// Migrations, in order; the schema version is the number of the last one
/// applied (kept in `PRAGMA user_version`).
const MIGRATIONS: &[(i64, &str)] = &[
    (1, include_str!("../migrations/sqlite/0001_init.sql")),
    (
        2,
        include_str!("../migrations/sqlite/0002_session_indexes.sql"),
    ),
    (
        3,
        include_str!("../migrations/sqlite/0003_derived_heads.sql"),
    ),
    (4, include_str!("../migrations/sqlite/0004_device_keys.sql")),
    (
        5,
        include_str!("../migrations/sqlite/0005_message_requests.sql"),
    ),
    (6, include_str!("../migrations/sqlite/0006_blobs.sql")),
    (7, include_str!("../migrations/sqlite/0007_blob_refs.sql")),
    (
        8,
        include_str!("../migrations/sqlite/0008_blob_deletion.sql"),
    ),
    (9, include_str!("../migrations/sqlite/0009_groups.sql")),
    (10, include_str!("../migrations/sqlite/0010_usage.sql")),
];

/// Upper bound on operations per transaction; keeps one commit's latency
/// bounded under a flood.
const MAX_BATCH: usize = 2048;
/// Queue between callers and the writer; callers wait when it is full.
const QUEUE_DEPTH: usize = 16 * 1024;
/// Read connections, each used by one blocking read at a time.
const MAX_READERS: usize = 8;
/// The writer's caches (heads, cursors) are dropped when they grow past this.
const MAX_CACHED: usize = 300_000;

pub const DB_FILE: &str = "confab.db";
const LOCK_FILE: &str = "confab.db.lock";

#[derive(Clone, Debug, Default)]
pub struct SqliteOptions {
    /// Refuse writes that would grow the database past this size (SQLite's
    /// `max_page_count`). Writes past it fail with `Unavailable`, like a
    /// full disk.
    pub max_size_bytes: Option<u64>,
    pub clock: Clock,
}

pub struct SqliteStore {
    path: PathBuf,
    ops: mpsc::Sender<Op>,
    readers: Arc<ReaderPool>,
    writer: Mutex<Option<std::thread::JoinHandle<()>>>,
    writer_thread: std::thread::Thread,
    checkpointer: Mutex<Option<Checkpointer>>,
    /// The lock that makes this the data directory's only writer, released
    /// at `close`.
    only_writer: Mutex<Option<std::fs::File>>,
    clock: Clock,
}

type Reply<T> = oneshot::Sender<Result<T>>;
/// What to do once the commit's outcome is known (`None`: committed).
type Completion = Box<dyn FnOnce(Option<&StoreError>) + Send>;

/// A write of the rarer kinds (accounts, devices, blocks), run in a
/// savepoint of the batch transaction.
trait Job: Send {
    fn run(self: Box<Self>, conn: &Connection) -> Completion;
    /// Answers without running, when the batch failed before this job's turn.
    fn fail(self: Box<Self>, error: &StoreError);
}

struct TypedJob<F, T> {
    f: F,
    reply: Reply<T>,
}

impl<F, T> Job for TypedJob<F, T>
where
    T: Send + 'static,
    F: FnOnce(&Connection) -> Result<T> + Send,
{
    fn run(self: Box<Self>, conn: &Connection) -> Completion {
        let TypedJob { f, reply } = *self;
        let result = in_savepoint(conn, f);
        Box::new(move |commit_error| {
            let _ = reply.send(match commit_error {
                Some(e) => Err(e.clone()),
                None => result,
            });
        })
    }

    fn fail(self: Box<Self>, error: &StoreError) {
        let _ = self.reply.send(Err(error.clone()));
    }
}

enum Op {
    Append(NewMessage, Reply<Appended>),
    Group(NewGroupEvent, Reply<Appended>),
    Cursor(CursorUpdate, Reply<CursorsMoved>),
    /// A job that writes a user's next device list: the writer drops its
    /// cached epoch of that user, which appends are checked against.
    DeviceList(UserId, Box<dyn Job>),
    Job(Box<dyn Job>),
    /// Commit what came before, then stop; later operations fail with `Closed`.
    Stop,
}

enum Done {
    Append(Reply<Appended>, Appended),
    Cursor(Reply<CursorsMoved>, CursorsMoved),
    Job(Completion),
}

impl From<rusqlite::Error> for StoreError {
    fn from(e: rusqlite::Error) -> Self {
        StoreError::Unavailable(e.to_string())
    }
}

impl SqliteStore {
    /// Opens (creating if needed) `dir/confab.db`, applies pending migrations
    /// and starts the writer thread.
    pub fn open(dir: &Path, options: SqliteOptions) -> Result<Self> {
        let path = dir.join(DB_FILE);
        private_files(dir, &path)
            .map_err(|e| StoreError::Unavailable(format!("{}: {e}", dir.display())))?;
        let only_writer = only_writer(dir)?;
        let mut conn = Connection::open(&path)?;
        // Only takes effect when the file is created. Small pages: the hot
        // indexes take random inserts, and each page they dirty is written
        // whole to the WAL at every commit; 1 KiB pages appended 30% more
        // messages per second than 4 KiB ones (crates/store/benches).
        conn.pragma_update(None, "page_size", 1024)?;
        conn.execute_batch(
            "PRAGMA journal_mode = WAL;
             PRAGMA synchronous = FULL;
             PRAGMA busy_timeout = 5000;
             PRAGMA cache_size = -32000;",
        )?;
        migrate(&mut conn)?;
        if let Some(max) = options.max_size_bytes {
            let page_size: i64 = conn.pragma_query_value(None, "page_size", |r| r.get(0))?;
            let pages = (max as i64 / page_size).max(1);
            conn.pragma_update(None, "max_page_count", pages)?;
        }
        // The checkpointer thread does the copying; the writer falls back to
        // it only if the WAL grows far past the checkpointer's pace.
        conn.pragma_update(None, "wal_autocheckpoint", WRITER_CHECKPOINT_PAGES)?;
        conn.pragma_update(None, "journal_size_limit", WAL_SIZE_LIMIT_BYTES)?;
        let checkpointer = Checkpointer::start(&path)?;
        let (tx, rx) = mpsc::channel(QUEUE_DEPTH);
        let clock = options.clock.clone();
        let writer = std::thread::Builder::new()
            .name("confab-store-writer".into())
            .spawn(move || Writer::new(conn, clock).run(rx))
            .map_err(|e| StoreError::Unavailable(format!("cannot start writer: {e}")))?;
        Ok(Self {
            readers: Arc::new(ReaderPool {
                path: path.clone(),
                idle: Mutex::new(Vec::new()),
                slots: tokio::sync::Semaphore::new(MAX_READERS),
            }),
            path,
            ops: tx,
            writer_thread: writer.thread().clone(),
            writer: Mutex::new(Some(writer)),
            checkpointer: Mutex::new(Some(checkpointer)),
            only_writer: Mutex::new(Some(only_writer)),
            clock: options.clock,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Writes a consistent copy of the database in `data_dir` to `dest`
    /// (`VACUUM INTO`), safe while a server is writing to it.
    pub fn backup(data_dir: &Path, dest: &Path) -> Result<()> {
        if dest.exists() {
            return Err(StoreError::Unavailable(format!(
                "{} already exists",
                dest.display()
            )));
        }
        let conn =
            Connection::open_with_flags(data_dir.join(DB_FILE), OpenFlags::SQLITE_OPEN_READ_ONLY)?;
        conn.busy_timeout(std::time::Duration::from_secs(10))?;
        let dest_text = dest
            .to_str()
            .ok_or_else(|| StoreError::Unavailable("backup path is not UTF-8".into()))?;
        // VACUUM INTO fills an empty file: made here, readable by the owner
        // alone, whatever the umask.
        private_file(dest, true)
            .map_err(|e| StoreError::Unavailable(format!("{}: {e}", dest.display())))?;
        conn.execute("VACUUM INTO ?1", [dest_text])?;
        Ok(())
    }

    async fn submit(&self, op: Op) -> Result<()> {
        let urgent = !matches!(op, Op::Cursor(..));
        self.ops.send(op).await.map_err(|_| StoreError::Closed)?;
        if urgent {
            // A writer holding back a batch of cursors commits now.
            self.writer_thread.unpark();
        }
        Ok(())
    }

    /// Runs `f` inside the writer's next transaction (in a savepoint of its
    /// own, so its failure leaves the rest of the batch alone) and returns
    /// its result once the transaction has committed.
    async fn write<T, F>(&self, f: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> Result<T> + Send + 'static,
    {
        self.job(f, Op::Job).await
    }

    /// [`SqliteStore::write`], queued as the operation `op` makes of it.
    async fn job<T, F>(&self, f: F, op: impl FnOnce(Box<dyn Job>) -> Op) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> Result<T> + Send + 'static,
    {
        let (reply, rx) = oneshot::channel();
        self.submit(op(Box::new(TypedJob { f, reply }))).await?;
        rx.await.map_err(|_| StoreError::Closed)?
    }

    async fn read<T, F>(&self, f: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> Result<T> + Send + 'static,
    {
        let pool = self.readers.clone();
        let _slot = pool.slots.acquire().await.map_err(|_| StoreError::Closed)?;
        let pool = pool.clone();
        tokio::task::spawn_blocking(move || {
            let conn = pool.take()?;
            let result = f(&conn);
            pool.give_back(conn);
            result
        })
        .await
        .map_err(|e| StoreError::Unavailable(format!("read task failed: {e}")))?
    }
}

/// Locks `dir` for this store. The writer's caches (each conversation's
/// head, cursors, members) are the truth only while it is the only writer:
/// a second process on the same files would reuse seqs and move cursors
/// back, so it is refused here rather than trusted to not exist. The lock
/// is the kernel's (flock): a killed process holds it no longer.
fn only_writer(dir: &Path) -> Result<std::fs::File> {
    let path = dir.join(LOCK_FILE);
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(|e| StoreError::Unavailable(format!("{}: {e}", path.display())))?;
    match file.try_lock() {
        Ok(()) => Ok(file),
        Err(std::fs::TryLockError::WouldBlock) => Err(StoreError::Unavailable(format!(
            "{} is in use by another confab process (SQLite has one writer; several nodes need --database postgres://…)",
            dir.display()
        ))),
        Err(std::fs::TryLockError::Error(e)) => {
            Err(StoreError::Unavailable(format!("{}: {e}", path.display())))
        }
    }
}

/// The data directory readable by its owner alone (0700), and the database
/// file too (0600): SQLite gives its `-wal` and `-shm` files the mode of the
/// database file. Whatever the umask, and also for files made by an older
/// version.
fn private_files(dir: &Path, db: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::create_dir_all(dir)?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))?;
    private_file(db, false)?;
    for suffix in ["-wal", "-shm"] {
        let mut name = db.as_os_str().to_owned();
        name.push(suffix);
        let side = Path::new(&name);
        if side.exists() {
            std::fs::set_permissions(side, std::fs::Permissions::from_mode(0o600))?;
        }
    }
    Ok(())
}

/// Creates `path` with mode 0600 (`new`: it must not exist yet), or makes
/// an existing one 0600.
fn private_file(path: &Path, new: bool) -> std::io::Result<()> {
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    let mut options = std::fs::OpenOptions::new();
    options.write(true).mode(0o600);
    if new {
        options.create_new(true);
    } else {
        options.create(true);
    }
    drop(options.open(path)?);
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
}

const FIND_DIRECT: &str = "SELECT id FROM conversations WHERE direct_key = ?1";

fn migrate(conn: &mut Connection) -> Result<()> {
    let current: i64 = conn.pragma_query_value(None, "user_version", |r| r.get(0))?;
    let known = MIGRATIONS.last().map(|(v, _)| *v).unwrap_or(0);
    if current > known {
        return Err(StoreError::SchemaTooNew {
            found: current,
            known,
        });
    }
    for (version, sql) in MIGRATIONS.iter().filter(|(v, _)| *v > current) {
        let tx = conn.transaction()?;
        tx.execute_batch(sql)?;
        tx.pragma_update(None, "user_version", version)?;
        tx.commit()?;
        tracing::info!(version, "applied migration");
    }
    Ok(())
}

fn in_savepoint<T>(conn: &Connection, f: impl FnOnce(&Connection) -> Result<T>) -> Result<T> {
    conn.execute_batch("SAVEPOINT job")?;
    let result = f(conn);
    let end = if result.is_ok() {
        "RELEASE job"
    } else {
        "ROLLBACK TO job; RELEASE job"
    };
    conn.execute_batch(end)?;
    result
}

/// How long a batch holding only receipt cursors may wait for more
/// operations before it commits.
const CURSOR_DELAY: Duration = Duration::from_millis(5);

/// How often the WAL is copied back into the database file.
const CHECKPOINT_INTERVAL: Duration = Duration::from_secs(1);
/// The writer checkpoints by itself only past this many WAL pages (~200 MB
/// of 1 KiB pages). Under sustained load that is also what lets the WAL
/// start over: the checkpointer has copied most of it by then.
const WRITER_CHECKPOINT_PAGES: i64 = 200_000;
/// After a checkpoint, the WAL file is truncated to this size.
const WAL_SIZE_LIMIT_BYTES: i64 = 64 * 1024 * 1024;

/// Copies the WAL back into the database file once a second, on a
/// connection of its own. The writer then never stops a commit to do it,
/// and a page written many times within the second is copied once: with
/// SQLite's default (every 1,000 pages, by the writer) the store appended
/// about 40% fewer messages per second under load.
struct Checkpointer {
    stop: Arc<(Mutex<bool>, std::sync::Condvar)>,
    thread: std::thread::JoinHandle<()>,
}

impl Checkpointer {
    fn start(path: &Path) -> Result<Self> {
        let conn = Connection::open(path)?;
        conn.busy_timeout(Duration::from_secs(5))?;
        let stop = Arc::new((Mutex::new(false), std::sync::Condvar::new()));
        let signal = stop.clone();
        let thread = std::thread::Builder::new()
            .name("confab-store-checkpoint".into())
            .spawn(move || {
                let (lock, wake) = &*signal;
                let mut stopped = lock.lock().expect("checkpointer poisoned");
                while !*stopped {
                    stopped = wake
                        .wait_timeout(stopped, CHECKPOINT_INTERVAL)
                        .expect("checkpointer poisoned")
                        .0;
                    let mode = if *stopped { "TRUNCATE" } else { "PASSIVE" };
                    if let Err(e) =
                        conn.query_row(&format!("PRAGMA wal_checkpoint({mode})"), [], |_| Ok(()))
                    {
                        tracing::warn!(error = %e, "checkpoint failed; the next one retries");
                    }
                }
            })
            .map_err(|e| StoreError::Unavailable(format!("cannot start checkpointer: {e}")))?;
        Ok(Self { stop, thread })
    }

    /// Runs a last, complete checkpoint and stops.
    fn stop(self) {
        let (lock, wake) = &*self.stop;
        *lock.lock().expect("checkpointer poisoned") = true;
        wake.notify_one();
        let _ = self.thread.join();
    }
}

struct ReaderPool {
    path: PathBuf,
    idle: Mutex<Vec<Connection>>,
    /// Reads at once; more wait, so a burst cannot open connections without bound.
    slots: tokio::sync::Semaphore,
}

impl ReaderPool {
    fn take(&self) -> Result<Connection> {
        if let Some(conn) = self.idle.lock().expect("reader pool poisoned").pop() {
            return Ok(conn);
        }
        let conn = Connection::open_with_flags(
            &self.path,
            OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )?;
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
        Ok(conn)
    }

    fn give_back(&self, conn: Connection) {
        let mut idle = self.idle.lock().expect("reader pool poisoned");
        if idle.len() < MAX_READERS {
            idle.push(conn);
        }
    }
}

/// A conversation's kind and current members, ascending.
#[derive(Clone)]
struct Membership {
    kind: ConvKind,
    current: Arc<[UserId]>,
}

/// The writer thread's state. `heads` caches each conversation's last
/// (seq, ts) including writes of the open transaction; it is the source of
/// truth for seq assignment because this thread is the only writer (of
/// this process, and the only process: `only_writer`).
struct Writer {
    conn: Connection,
    clock: Clock,
    heads: HashMap<ConversationId, (i64, i64)>,
    has_sent: HashSet<(ConversationId, UserId)>,
    /// Each conversation's kind and current members: what every append
    /// is checked against, and who gets it. Only this thread changes
    /// members, so the cache is the truth.
    memberships: HashMap<ConversationId, Membership>,
    /// Conversations every member has accepted (acceptance is never taken
    /// back, so only this answer is cached).
    accepted: HashSet<ConversationId>,
    /// Messages each sender has in a conversation that is still a request
    /// (counted once, then kept up to date), so that a large limit does not
    /// make every append count them again.
    request_sent: HashMap<(ConversationId, UserId), i64>,
    /// Cursors as stored (a device's delivered; a member's delivered and
    /// read, and where it left), so that updates that move nothing read
    /// and write nothing.
    device_cursors: HashMap<(DeviceId, ConversationId), i64>,
    member_cursors: HashMap<(ConversationId, UserId), (i64, i64, Option<i64>)>,
    /// Each user's newest device-list epoch (0: none), for the check that
    /// makes a message's device check and its commit one decision.
    epochs: HashMap<UserId, i64>,
    /// Body bytes each sender stored on a UTC day, as in `usage` once the
    /// open transaction commits.
    bytes_used: HashMap<(i64, UserId), i64>,
    /// Entries of `bytes_used` the open transaction changed: written once
    /// per batch, not once per message.
    bytes_changed: HashSet<(i64, UserId)>,
}

impl Writer {
    fn new(conn: Connection, clock: Clock) -> Self {
        Self {
            conn,
            clock,
            heads: HashMap::new(),
            has_sent: HashSet::new(),
            memberships: HashMap::new(),
            accepted: HashSet::new(),
            request_sent: HashMap::new(),
            device_cursors: HashMap::new(),
            member_cursors: HashMap::new(),
            epochs: HashMap::new(),
            bytes_used: HashMap::new(),
            bytes_changed: HashSet::new(),
        }
    }

    fn run(mut self, mut rx: mpsc::Receiver<Op>) {
        let mut batch = Vec::with_capacity(MAX_BATCH);
        let mut stop = false;
        while let Some(op) = rx.blocking_recv() {
            let first_at = Instant::now();
            let mut next = Some(op);
            loop {
                while let Some(op) = next.take() {
                    if matches!(op, Op::Stop) {
                        stop = true;
                        break;
                    }
                    batch.push(op);
                    if batch.len() < MAX_BATCH {
                        next = rx.try_recv().ok();
                    }
                }
                // A batch of receipt cursors only may wait a little for
                // company: nobody waits on those commits but a tick, and at
                // low load every commit's fsync costs more CPU than the
                // writes in it (docs/performance.md). Messages never wait.
                let only_cursors = batch.iter().all(|op| matches!(op, Op::Cursor(..)));
                if stop
                    || !only_cursors
                    || batch.len() >= MAX_BATCH
                    || first_at.elapsed() >= CURSOR_DELAY
                {
                    break;
                }
                // Woken early by any operation that is not a cursor (`submit`).
                std::thread::park_timeout(CURSOR_DELAY.saturating_sub(first_at.elapsed()));
                next = rx.try_recv().ok();
            }
            if !batch.is_empty() {
                self.commit_batch(&mut batch);
            }
            if stop {
                break;
            }
        }
        tracing::debug!("store writer stopped");
    }

    fn commit_batch(&mut self, batch: &mut Vec<Op>) {
        let started = Instant::now();
        let size = batch.len();
        let mut done = Vec::with_capacity(size);
        let error = self.execute(batch.drain(..), &mut done).err().map(|e| {
            tracing::error!(error = %e, size, "store commit failed; nothing of the batch is acked");
            let _ = self.conn.execute_batch("ROLLBACK");
            self.forget();
            StoreError::Unavailable(e.to_string())
        });
        metrics::histogram!("confab_store_commit_batch_size").record(size as f64);
        metrics::histogram!("confab_store_commit_seconds").record(started.elapsed().as_secs_f64());
        for d in done {
            match (d, &error) {
                (Done::Append(reply, value), None) => {
                    let _ = reply.send(Ok(value));
                }
                (Done::Cursor(reply, value), None) => {
                    let _ = reply.send(Ok(value));
                }
                (Done::Append(reply, _), Some(e)) => {
                    let _ = reply.send(Err(e.clone()));
                }
                (Done::Cursor(reply, _), Some(e)) => {
                    let _ = reply.send(Err(e.clone()));
                }
                (Done::Job(complete), e) => complete(e.as_ref()),
            }
        }
        let cached = self.heads.len()
            + self.memberships.len()
            + self.member_cursors.len()
            + self.device_cursors.len()
            + self.accepted.len()
            + self.request_sent.len()
            + self.epochs.len()
            + self.bytes_used.len();
        if cached > MAX_CACHED {
            self.forget();
        }
    }

    /// Drops every cache; they refill from the table as needed.
    fn forget(&mut self) {
        self.heads.clear();
        self.has_sent.clear();
        self.memberships.clear();
        self.accepted.clear();
        self.request_sent.clear();
        self.device_cursors.clear();
        self.member_cursors.clear();
        self.epochs.clear();
        self.bytes_used.clear();
        self.bytes_changed.clear();
    }

    /// Runs the whole batch in one transaction. After the first error the
    /// rest of the batch is answered with it without running (SQLite may
    /// already have rolled the transaction back, and later statements would
    /// then commit on their own); the caller rolls back and fails `done`.
    fn execute(&mut self, ops: impl Iterator<Item = Op>, done: &mut Vec<Done>) -> Result<()> {
        let mut outcome = self
            .conn
            .execute_batch("BEGIN IMMEDIATE")
            .map_err(StoreError::from);
        let now = self.clock.now();
        for op in ops {
            match &outcome {
                Err(e) => fail(op, e),
                Ok(()) => outcome = self.apply(op, now, done),
            }
        }
        outcome?;
        self.write_bytes_used()?;
        if self.conn.is_autocommit() {
            return Err(StoreError::Unavailable(
                "the transaction was rolled back".into(),
            ));
        }
        self.conn.execute_batch("COMMIT")?;
        Ok(())
    }

    /// Runs one operation and records how to answer it; an error here
    /// fails the whole batch (the operation itself is already answered).
    fn apply(&mut self, op: Op, now: i64, done: &mut Vec<Done>) -> Result<()> {
        match op {
            Op::Append(message, reply) => match self.append(message, now) {
                Ok(appended) => done.push(Done::Append(reply, appended)),
                Err(e) => return Err(fail_with(reply, e)),
            },
            Op::Group(event, reply) => match self.change_group(event, now) {
                Ok(appended) => done.push(Done::Append(reply, appended)),
                Err(e) => return Err(fail_with(reply, e)),
            },
            Op::Cursor(update, reply) => match self.advance(update, now) {
                Ok(cursors) => done.push(Done::Cursor(reply, cursors)),
                Err(e) => return Err(fail_with(reply, e)),
            },
            Op::DeviceList(user, job) => {
                // Read again, inside this transaction, at the next append.
                self.epochs.remove(&user);
                return self.apply(Op::Job(job), now, done);
            }
            Op::Job(job) => {
                done.push(Done::Job(job.run(&self.conn)));
                // SQLite may roll the whole transaction back on some errors
                // (full disk, I/O); a savepoint cannot contain that, and later
                // statements would then commit one by one.
                if self.conn.is_autocommit() {
                    return Err(StoreError::Unavailable(
                        "the transaction was rolled back".into(),
                    ));
                }
            }
            Op::Stop => unreachable!("run() never batches Stop"),
        }
        Ok(())
    }

    fn head(&mut self, conv: ConversationId) -> Result<(i64, i64)> {
        if let Some(head) = self.heads.get(&conv) {
            return Ok(*head);
        }
        let head = self
            .conn
            .prepare_cached(
                "SELECT COALESCE(m.seq, 0), COALESCE(m.ts, 0) FROM conversations c
                 LEFT JOIN messages m ON m.conv_id = c.id
                 WHERE c.id = ?1 ORDER BY m.seq DESC LIMIT 1",
            )?
            .query_row([conv.0], |r| Ok((r.get(0)?, r.get(1)?)))
            .optional()?
            .ok_or(StoreError::NotFound)?;
        self.heads.insert(conv, head);
        Ok(head)
    }

    /// The user's newest device-list epoch, 0 when there is none.
    fn epoch(&mut self, user: UserId) -> Result<i64> {
        if let Some(epoch) = self.epochs.get(&user) {
            return Ok(*epoch);
        }
        let epoch = newest_epoch(&self.conn, user)?;
        self.epochs.insert(user, epoch);
        Ok(epoch)
    }

    /// The conversation's kind and current members.
    fn membership(&mut self, conv: ConversationId) -> Result<Membership> {
        if let Some(membership) = self.memberships.get(&conv) {
            return Ok(membership.clone());
        }
        let mut kind = None;
        let mut current = Vec::new();
        let mut stmt = self.conn.prepare_cached(
            "SELECT c.kind, m.user_id FROM conversations c
             LEFT JOIN members m ON m.conv_id = c.id AND m.left_seq IS NULL
             WHERE c.id = ?1 ORDER BY m.user_id",
        )?;
        let mut rows = stmt.query([conv.0])?;
        while let Some(row) = rows.next()? {
            kind = Some(conv_kind(&row.get::<_, String>(0)?));
            if let Some(user) = row.get::<_, Option<i64>>(1)? {
                current.push(UserId(user));
            }
        }
        drop(rows);
        drop(stmt);
        let membership = Membership {
            kind: kind.ok_or(StoreError::NotFound)?,
            current: current.into(),
        };
        self.memberships.insert(conv, membership.clone());
        Ok(membership)
    }

    /// Drops what is cached of a conversation whose members changed.
    fn members_changed(&mut self, conv: ConversationId) {
        self.memberships.remove(&conv);
        self.accepted.remove(&conv);
        self.member_cursors.retain(|(c, _), _| *c != conv);
        self.request_sent.retain(|(c, _), _| *c != conv);
    }

    fn append(&mut self, m: NewMessage, now: i64) -> Result<Appended> {
        let membership = self.membership(m.conv)?;
        let members = &membership.current;
        // Checked in the commit, so that a send racing the sender's removal
        // is refused, never stored.
        if members.binary_search(&m.sender).is_err() {
            return self.refused(&m, Appended::NotMember);
        }
        // The envelope was checked against the lists of exactly the current
        // members: a member added or removed since makes it stale.
        if !m.device_epochs.is_empty()
            && (m.device_epochs.len() != members.len()
                || m.device_epochs
                    .iter()
                    .any(|(user, _)| members.binary_search(user).is_err()))
        {
            return self.refused(&m, Appended::DevicesChanged);
        }
        for &(user, epoch) in &m.device_epochs {
            if self.epoch(user)? != epoch {
                return self.refused(&m, Appended::DevicesChanged);
            }
        }
        // A group a member has not accepted yet is still open to everyone
        // else: the request limit is for one-to-one conversations.
        if let Some(limit) = m.unanswered_limit
            && membership.kind.is_direct()
            && self.waiting_at_limit(&m, limit)?
        {
            return self.refused(&m, Appended::NotAccepted);
        }
        if !blobs::all_ready(&self.conn, m.sender, &m.blobs)? {
            return self.refused(&m, Appended::UnknownBlob);
        }
        // Last, so that only what is stored counts.
        let (day, over) = utc_day(now);
        let bytes_used = match m.daily_bytes {
            None => None,
            Some(limit) => {
                let used = self.bytes_used(day, m.sender)? + m.body.len() as i64;
                if used as u64 > limit {
                    return self.refused(&m, Appended::OverQuota(over));
                }
                Some(used)
            }
        };
        let (last_seq, last_ts) = self.head(m.conv)?;
        let seq = last_seq + 1;
        // Timestamps never go backwards within a conversation, even if the clock does.
        let ts = now.max(last_ts);
        let inserted = self
            .conn
            .prepare_cached(
                "INSERT INTO messages (conv_id, seq, sender_id, sender_device, client_id, ts, body)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)
                 ON CONFLICT (sender_id, client_id) DO NOTHING",
            )?
            .execute(params![
                m.conv.0,
                seq,
                m.sender.0,
                m.sender_device.0,
                m.client_id.as_str(),
                ts,
                m.body
            ])?;
        if inserted == 0 {
            let original = sent_message(&self.conn, m.sender, &m.client_id)?
                .ok_or_else(|| StoreError::Unavailable("a conflicting row vanished".into()))?;
            return Ok(Appended::Duplicate(original));
        }
        self.heads.insert(m.conv, (seq, ts));
        if let Some(used) = bytes_used {
            self.bytes_used.insert((day, m.sender), used);
            self.bytes_changed.insert((day, m.sender));
        }
        blobs::bind(&self.conn, &m.blobs, m.conv, seq)?;
        if let Some(sent) = self.request_sent.get_mut(&(m.conv, m.sender)) {
            *sent += 1;
        }
        let first_from_sender = if self.has_sent.contains(&(m.conv, m.sender)) {
            false
        } else {
            let changed = self
                .conn
                .prepare_cached("UPDATE members SET has_sent = 1, accepted = 1 WHERE conv_id = ?1 AND user_id = ?2 AND has_sent = 0")?
                .execute(params![m.conv.0, m.sender.0])?;
            self.has_sent.insert((m.conv, m.sender));
            changed == 1
        };
        Ok(Appended::New {
            message: m.stored(seq, ts),
            first_from_sender,
            members: membership.current,
        })
    }

    /// Writes the senders' bytes of the day this batch changed.
    fn write_bytes_used(&mut self) -> Result<()> {
        let mut stmt = self.conn.prepare_cached(
            "INSERT INTO usage (day, user_id, bytes) VALUES (?1, ?2, ?3)
             ON CONFLICT (day, user_id) DO UPDATE SET bytes = excluded.bytes",
        )?;
        for (day, user) in self.bytes_changed.drain() {
            stmt.execute(params![day, user.0, self.bytes_used[&(day, user)]])?;
        }
        Ok(())
    }

    /// Body bytes `user` has stored on `day`.
    fn bytes_used(&mut self, day: i64, user: UserId) -> Result<i64> {
        if let Some(used) = self.bytes_used.get(&(day, user)) {
            return Ok(*used);
        }
        let used = self
            .conn
            .prepare_cached("SELECT bytes FROM usage WHERE day = ?1 AND user_id = ?2")?
            .query_row(params![day, user.0], |r| r.get(0))
            .optional()?
            .unwrap_or(0);
        self.bytes_used.insert((day, user), used);
        Ok(used)
    }

    /// A message the commit refuses for `why`; a resend still gets its
    /// original, whatever changed since.
    fn refused(&self, m: &NewMessage, why: Appended) -> Result<Appended> {
        Ok(match sent_message(&self.conn, m.sender, &m.client_id)? {
            Some(original) => Appended::Duplicate(original),
            None => why,
        })
    }

    /// Whether another member has not accepted the conversation yet and the
    /// sender already has `limit` messages in it.
    fn waiting_at_limit(&mut self, m: &NewMessage, limit: u32) -> Result<bool> {
        if self.accepted.contains(&m.conv) {
            return Ok(false);
        }
        let waiting: i64 = self
            .conn
            .prepare_cached(
                "SELECT COUNT(*) FROM members WHERE conv_id = ?1 AND user_id != ?2 AND accepted = 0",
            )?
            .query_row(params![m.conv.0, m.sender.0], |r| r.get(0))?;
        if waiting == 0 {
            // The sender accepts by sending, in this same commit (and a
            // commit that fails drops every cache): from now on everyone has.
            self.accepted.insert(m.conv);
            return Ok(false);
        }
        let key = (m.conv, m.sender);
        let sent = match self.request_sent.get(&key) {
            Some(sent) => *sent,
            None => {
                let sent = self
                    .conn
                    .prepare_cached(
                        "SELECT COUNT(*) FROM messages WHERE conv_id = ?1 AND sender_id = ?2",
                    )?
                    .query_row(params![m.conv.0, m.sender.0], |r| r.get(0))?;
                self.request_sent.insert(key, sent);
                sent
            }
        };
        Ok(sent >= i64::from(limit))
    }

    fn advance(&mut self, u: CursorUpdate, now: i64) -> Result<CursorsMoved> {
        let (last_seq, _) = self.head(u.conv)?;
        let (old_delivered, old_read, left) = match self.member_cursors.get(&(u.conv, u.user)) {
            Some(cursors) => *cursors,
            None => self
                .conn
                .prepare_cached("SELECT delivered_seq, read_seq, left_seq FROM members WHERE conv_id = ?1 AND user_id = ?2")?
                .query_row(params![u.conv.0, u.user.0], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
                .optional()?
                .ok_or(StoreError::NotFound)?,
        };
        // A member who left has nothing past its leaving to confirm.
        let last_seq = left.map_or(last_seq, |left: i64| left.min(last_seq));
        let read = u.read.clamp(0, last_seq);
        let delivered = u.delivered.max(read).clamp(0, last_seq);
        // Rows are written only when a cursor really moves: most updates
        // repeat what another device (or an earlier frame) already said,
        // and every row written is a page in the WAL.
        let device = self
            .device_cursors
            .get(&(u.device, u.conv))
            .copied()
            .unwrap_or(0);
        if delivered > device {
            self.conn
                .prepare_cached(
                    "INSERT INTO device_cursors (device_id, conv_id, delivered_seq) VALUES (?1, ?2, ?3)
                     ON CONFLICT (device_id, conv_id)
                     DO UPDATE SET delivered_seq = max(delivered_seq, excluded.delivered_seq)",
                )?
                .execute(params![u.device.0, u.conv.0, delivered])?;
            self.device_cursors.insert((u.device, u.conv), delivered);
        }
        let cursors = MemberCursors {
            delivered: old_delivered.max(delivered),
            read: old_read.max(read),
            delivered_advanced: delivered > old_delivered,
            read_advanced: read > old_read,
        };
        self.member_cursors
            .insert((u.conv, u.user), (cursors.delivered, cursors.read, left));
        if !cursors.advanced() {
            // The probe that moves nothing (an accept): whom the cursors as
            // they are concern.
            let authors = match (u.delivered, u.read) {
                (0, 0) if cursors.delivered > 0 => {
                    self.authors(u.conv, u.user, 0, cursors.delivered)?
                }
                _ => Vec::new(),
            };
            return Ok(CursorsMoved { cursors, authors });
        }
        // Each moved cursor's move joins the newest ones kept in the row,
        // in groups only: the moves make a member's row some 500 bytes, and
        // the many small rows of one-to-one conversations then spread over
        // ten times the pages, each commit writing most of them (1:1
        // throughput fell to half). A group's rows sit together.
        let timed = !self.membership(u.conv)?.kind.is_direct();
        let moved = |advanced: bool, seq: i64| (timed && advanced).then(|| cursor_move(seq, now));
        self.conn
            .prepare_cached(
                "UPDATE members SET delivered_seq = max(delivered_seq, ?3), read_seq = max(read_seq, ?4),
                   delivered_moves = CASE WHEN ?5 IS NULL THEN delivered_moves
                                          WHEN delivered_moves IS NULL THEN ?5
                                          ELSE CAST(substr(delivered_moves, -?7) || ?5 AS BLOB) END,
                   read_moves = CASE WHEN ?6 IS NULL THEN read_moves
                                     WHEN read_moves IS NULL THEN ?6
                                     ELSE CAST(substr(read_moves, -?7) || ?6 AS BLOB) END
                 WHERE conv_id = ?1 AND user_id = ?2",
            )?
            .execute(params![
                u.conv.0,
                u.user.0,
                cursors.delivered,
                cursors.read,
                moved(cursors.delivered_advanced, cursors.delivered),
                moved(cursors.read_advanced, cursors.read),
                (KEPT_MOVES - 1) * MOVE_BYTES
            ])?;
        // From the lowest cursor that moved to the highest new one.
        let from = match (cursors.delivered_advanced, cursors.read_advanced) {
            (true, true) => old_delivered.min(old_read),
            (true, false) => old_delivered,
            _ => old_read,
        };
        let authors = self.authors(u.conv, u.user, from, cursors.delivered)?;
        Ok(CursorsMoved { cursors, authors })
    }

    /// The other current members who wrote messages `after..=to` of
    /// `conv`: whom a receipt covering them goes to. In a direct
    /// conversation, the other member without a read.
    fn authors(
        &mut self,
        conv: ConversationId,
        user: UserId,
        after: i64,
        to: i64,
    ) -> Result<Vec<UserId>> {
        let membership = self.membership(conv)?;
        let others = membership.current.iter().copied().filter(|m| *m != user);
        if membership.kind.is_direct() {
            return Ok(others.collect());
        }
        let mut stmt = self.conn.prepare_cached(
            "SELECT DISTINCT sender_id FROM messages WHERE conv_id = ?1 AND seq > ?2 AND seq <= ?3 AND sender_id != ?4",
        )?;
        let wrote = stmt
            .query_map(params![conv.0, after, to, user.0], |r| {
                Ok(UserId(r.get(0)?))
            })?
            .collect::<rusqlite::Result<Vec<_>>>()?;
        Ok(others.filter(|m| wrote.contains(m)).collect())
    }
}

fn fail(op: Op, error: &StoreError) {
    match op {
        Op::Append(_, reply) => {
            let _ = reply.send(Err(error.clone()));
        }
        Op::Cursor(_, reply) => {
            let _ = reply.send(Err(error.clone()));
        }
        Op::Group(_, reply) => {
            let _ = reply.send(Err(error.clone()));
        }
        Op::DeviceList(_, job) | Op::Job(job) => job.fail(error),
        Op::Stop => {}
    }
}

fn fail_with<T>(reply: Reply<T>, error: StoreError) -> StoreError {
    let _ = reply.send(Err(error.clone()));
    error
}

const SELECT_MESSAGE: &str = "SELECT m.conv_id, m.seq, m.client_id, u.username, m.sender_device, m.ts, m.body, m.sender_id, m.event
     FROM messages m JOIN users u ON u.id = m.sender_id";

/// The columns `member` reads, of a `members <alias> JOIN users u` row.
fn member_columns(alias: &str) -> String {
    [
        "user_id",
        "has_sent",
        "accepted",
        "role",
        "joined_seq",
        "left_seq",
    ]
    .map(|c| format!("{alias}.{c}"))
    .join(", ")
    .replacen(", ", ", u.username, ", 1)
}
const MEMBER_FIELDS: usize = 7;

fn member(r: &rusqlite::Row<'_>, at: usize) -> rusqlite::Result<Member> {
    Ok(Member {
        user: UserId(r.get(at)?),
        username: r.get(at + 1)?,
        has_sent: r.get(at + 2)?,
        accepted: r.get(at + 3)?,
        role: role(&r.get::<_, String>(at + 4)?),
        joined_seq: r.get(at + 5)?,
        left_seq: r.get(at + 6)?,
    })
}

/// User ids as a JSON array, for `json_each`: one statement whatever
/// their number.
fn json_ids(users: &[UserId]) -> String {
    let ids: Vec<String> = users.iter().map(|u| u.0.to_string()).collect();
    format!("[{}]", ids.join(","))
}

fn stored_message(r: &rusqlite::Row<'_>) -> rusqlite::Result<StoredMessage> {
    let client_id: String = r.get(2)?;
    let id = MessageId::new(client_id).map_err(|e| {
        rusqlite::Error::FromSqlConversionFailure(2, rusqlite::types::Type::Text, Box::new(e))
    })?;
    let event = match r.get::<_, Option<String>>(8)? {
        Some(json) => Some(serde_json::from_str(&json).map_err(|e| {
            rusqlite::Error::FromSqlConversionFailure(8, rusqlite::types::Type::Text, Box::new(e))
        })?),
        None => None,
    };
    Ok(StoredMessage {
        sender: UserId(r.get(7)?),
        message: Message {
            conv: ConversationId(r.get(0)?),
            seq: r.get(1)?,
            id,
            from: r.get(3)?,
            from_device: DeviceId(r.get(4)?),
            ts: r.get(5)?,
            body: r.get(6)?,
            event,
            deleted_files: Vec::new(),
        },
    })
}

fn remove_device(conn: &Connection, user: UserId, device: DeviceId, now: i64) -> Result<bool> {
    let removed = conn.execute(
        "UPDATE devices SET removed_at = ?3 WHERE id = ?1 AND user_id = ?2 AND removed_at IS NULL",
        params![device.0, user.0, now],
    )?;
    if removed == 0 {
        return Ok(false);
    }
    conn.execute("DELETE FROM sessions WHERE device_id = ?1", [device.0])?;
    conn.execute(
        "DELETE FROM device_cursors WHERE device_id = ?1",
        [device.0],
    )?;
    Ok(true)
}

/// The user's newest device-list epoch, 0 when there is none.
fn newest_epoch(conn: &Connection, user: UserId) -> Result<i64> {
    Ok(conn
        .prepare_cached("SELECT COALESCE(max(epoch), 0) FROM device_lists WHERE user_id = ?1")?
        .query_row([user.0], |r| r.get(0))?)
}

/// The message `sender` stored under `client_id`, if any.
fn sent_message(
    conn: &Connection,
    sender: UserId,
    client_id: &MessageId,
) -> Result<Option<StoredMessage>> {
    Ok(conn
        .prepare_cached(&format!(
            "{SELECT_MESSAGE} WHERE m.client_id = ?1 AND m.sender_id = ?2"
        ))?
        .query_row(params![client_id.as_str(), sender.0], stored_message)
        .optional()?)
}

fn user_record(r: &rusqlite::Row<'_>) -> rusqlite::Result<UserRecord> {
    Ok(UserRecord {
        id: UserId(r.get(0)?),
        username: r.get(1)?,
        password_hash: r.get(2)?,
        read_receipts: r.get(3)?,
    })
}

const SELECT_USER: &str = "SELECT id, username, password_hash, read_receipts FROM users";

fn device_record(r: &rusqlite::Row<'_>) -> rusqlite::Result<DeviceRecord> {
    Ok(DeviceRecord {
        id: DeviceId(r.get(0)?),
        user: UserId(r.get(1)?),
        name: r.get(2)?,
        created_at: r.get(3)?,
        keys: match (
            r.get::<_, Option<[u8; 32]>>(4)?,
            r.get::<_, Option<[u8; 32]>>(5)?,
        ) {
            (Some(sign), Some(kem)) => Some(PublicKeys { sign, kem }),
            _ => None,
        },
    })
}

const SELECT_DEVICE: &str = "SELECT id, user_id, name, created_at, sign_key, kem_key FROM devices";

fn device_list(r: &rusqlite::Row<'_>) -> rusqlite::Result<StoredDeviceList> {
    Ok(StoredDeviceList {
        epoch: r.get(0)?,
        signed: r.get(1)?,
    })
}

#[async_trait]
impl Store for SqliteStore {
    async fn create_user(
        &self,
        username: &Username,
        password_hash: &str,
        now: i64,
    ) -> Result<UserId> {
        let (username, hash) = (username.to_string(), password_hash.to_string());
        self.write(move |conn| {
            let inserted = conn
                .prepare_cached(
                    "INSERT INTO users (username, password_hash, created_at) VALUES (?1, ?2, ?3)
                     ON CONFLICT (username) DO NOTHING",
                )?
                .execute(params![username, hash, now])?;
            if inserted == 0 {
                return Err(StoreError::UsernameTaken);
            }
            Ok(UserId(conn.last_insert_rowid()))
        })
        .await
    }

    async fn user_by_name(&self, username: &str) -> Result<Option<UserRecord>> {
        let username = username.to_ascii_lowercase();
        self.read(move |conn| {
            Ok(conn
                .prepare_cached(&format!("{SELECT_USER} WHERE username = ?1"))?
                .query_row([username], user_record)
                .optional()?)
        })
        .await
    }

    async fn user(&self, id: UserId) -> Result<Option<UserRecord>> {
        self.read(move |conn| {
            Ok(conn
                .prepare_cached(&format!("{SELECT_USER} WHERE id = ?1"))?
                .query_row([id.0], user_record)
                .optional()?)
        })
        .await
    }

    async fn set_password_hash(&self, user: UserId, password_hash: &str) -> Result<()> {
        let hash = password_hash.to_string();
        self.write(move |conn| {
            conn.execute(
                "UPDATE users SET password_hash = ?2 WHERE id = ?1",
                params![user.0, hash],
            )?;
            Ok(())
        })
        .await
    }

    async fn set_read_receipts(&self, user: UserId, on: bool) -> Result<()> {
        self.write(move |conn| {
            conn.execute(
                "UPDATE users SET read_receipts = ?2 WHERE id = ?1",
                params![user.0, on],
            )?;
            Ok(())
        })
        .await
    }

    async fn set_last_seen(&self, user: UserId, ts: i64) -> Result<()> {
        self.write(move |conn| {
            conn.prepare_cached(
                "UPDATE users SET last_seen = max(COALESCE(last_seen, 0), ?2) WHERE id = ?1",
            )?
            .execute(params![user.0, ts])?;
            Ok(())
        })
        .await
    }

    async fn create_device(&self, user: UserId, name: &str, now: i64) -> Result<DeviceRecord> {
        let name = name.to_string();
        self.write(move |conn| {
            conn.execute(
                "INSERT INTO devices (user_id, name, created_at) VALUES (?1, ?2, ?3)",
                params![user.0, name, now],
            )?;
            let id = DeviceId(conn.last_insert_rowid());
            conn.execute(
                "INSERT INTO device_cursors (device_id, conv_id, delivered_seq)
                 SELECT ?1, m.conv_id, (SELECT max(seq) FROM messages WHERE conv_id = m.conv_id)
                 FROM members m
                 WHERE m.user_id = ?2 AND EXISTS (SELECT 1 FROM messages WHERE conv_id = m.conv_id)",
                params![id.0, user.0],
            )?;
            Ok(DeviceRecord {
                id,
                user,
                name,
                created_at: now,
                keys: None,
            })
        })
        .await
    }

    async fn device(&self, id: DeviceId) -> Result<Option<DeviceRecord>> {
        self.read(move |conn| {
            Ok(conn
                .prepare_cached(&format!(
                    "{SELECT_DEVICE} WHERE id = ?1 AND removed_at IS NULL"
                ))?
                .query_row([id.0], device_record)
                .optional()?)
        })
        .await
    }

    async fn devices(&self, user: UserId) -> Result<Vec<DeviceRecord>> {
        self.read(move |conn| {
            let mut stmt = conn.prepare_cached(&format!(
                "{SELECT_DEVICE} WHERE user_id = ?1 AND removed_at IS NULL ORDER BY id"
            ))?;
            let rows = stmt.query_map([user.0], device_record)?;
            Ok(rows.collect::<rusqlite::Result<_>>()?)
        })
        .await
    }

    async fn remove_device(&self, user: UserId, device: DeviceId, now: i64) -> Result<bool> {
        self.write(move |conn| remove_device(conn, user, device, now))
            .await
    }

    async fn create_session(
        &self,
        token_hash: [u8; 32],
        user: UserId,
        device: DeviceId,
        now: i64,
        expires_at: i64,
    ) -> Result<()> {
        self.write(move |conn| {
            conn.execute(
                "INSERT INTO sessions (token_hash, user_id, device_id, created_at, expires_at) VALUES (?1, ?2, ?3, ?4, ?5)",
                params![&token_hash[..], user.0, device.0, now, expires_at],
            )?;
            // Expired sessions are swept here rather than by a timer: logins
            // are rare enough and this keeps the table small.
            conn.execute("DELETE FROM sessions WHERE expires_at < ?1", [now])?;
            Ok(())
        })
        .await
    }

    async fn session(&self, token_hash: [u8; 32]) -> Result<Option<SessionRecord>> {
        self.read(move |conn| {
            Ok(conn
                .prepare_cached(
                    "SELECT s.user_id, u.username, s.device_id, s.expires_at
                     FROM sessions s JOIN users u ON u.id = s.user_id JOIN devices d ON d.id = s.device_id
                     WHERE s.token_hash = ?1 AND d.removed_at IS NULL",
                )?
                .query_row([&token_hash[..]], |r| {
                    Ok(SessionRecord {
                        user: UserId(r.get(0)?),
                        username: r.get(1)?,
                        device: DeviceId(r.get(2)?),
                        expires_at: r.get(3)?,
                    })
                })
                .optional()?)
        })
        .await
    }

    async fn end_sessions(&self, device: DeviceId) -> Result<()> {
        self.write(move |conn| {
            conn.execute("DELETE FROM sessions WHERE device_id = ?1", [device.0])?;
            Ok(())
        })
        .await
    }

    async fn end_other_sessions(&self, user: UserId, keep: DeviceId) -> Result<Vec<DeviceId>> {
        self.write(move |conn| {
            // Every other current device, also those whose sessions already
            // expired: their open sockets must close too.
            let devices = conn
                .prepare(
                    "SELECT id FROM devices WHERE user_id = ?1 AND id != ?2 AND removed_at IS NULL",
                )?
                .query_map(params![user.0, keep.0], |r| Ok(DeviceId(r.get(0)?)))?
                .collect::<rusqlite::Result<Vec<_>>>()?;
            conn.execute(
                "DELETE FROM sessions WHERE user_id = ?1 AND device_id != ?2",
                params![user.0, keep.0],
            )?;
            Ok(devices)
        })
        .await
    }

    async fn count_new_conversation(
        &self,
        user: UserId,
        per_day: u32,
    ) -> Result<std::result::Result<(), OverQuota>> {
        let (day, over) = utc_day(self.clock.now());
        let counted: Option<i64> = self
            .write(move |conn| {
                Ok(conn
                    .prepare_cached(
                        "INSERT INTO usage (day, user_id, conversations) VALUES (?1, ?2, 1)
                         ON CONFLICT (day, user_id) DO UPDATE SET conversations = conversations + 1
                          WHERE conversations < ?3
                         RETURNING conversations",
                    )?
                    .query_row(params![day, user.0, per_day], |r| r.get(0))
                    .optional()?)
            })
            .await?;
        Ok(within(counted, per_day, over))
    }

    async fn forget_old_usage(&self) -> Result<()> {
        let (today, _) = utc_day(self.clock.now());
        self.write(move |conn| {
            conn.prepare_cached("DELETE FROM usage WHERE day < ?1")?
                .execute([today])?;
            Ok(())
        })
        .await
    }

    async fn find_direct(&self, a: UserId, b: UserId) -> Result<Option<ConversationId>> {
        let key = direct_key(a, b);
        self.read(move |conn| {
            Ok(conn
                .prepare_cached(FIND_DIRECT)?
                .query_row([key], |r| r.get(0))
                .optional()?
                .map(ConversationId))
        })
        .await
    }

    async fn open_direct(&self, a: UserId, b: UserId, now: i64) -> Result<ConversationId> {
        if let Some(conv) = self.find_direct(a, b).await? {
            return Ok(conv);
        }
        let key = direct_key(a, b);
        self.write(move |conn| {
            conn.execute(
                "INSERT INTO conversations (kind, direct_key, created_at) VALUES ('direct', ?1, ?2)
                 ON CONFLICT (direct_key) DO NOTHING",
                params![key, now],
            )?;
            let id: i64 = conn.query_row(FIND_DIRECT, [&key], |r| r.get(0))?;
            // The one who opens it has accepted it; for the other it is a request.
            for (user, accepted) in [(a, true), (b, false)] {
                conn.execute(
                    "INSERT INTO members (conv_id, user_id, accepted) VALUES (?1, ?2, ?3)
                     ON CONFLICT DO NOTHING",
                    params![id, user.0, accepted],
                )?;
            }
            Ok(ConversationId(id))
        })
        .await
    }

    async fn accept(&self, conv: ConversationId, user: UserId) -> Result<()> {
        self.write(move |conn| {
            conn.prepare_cached(
                "UPDATE members SET accepted = 1 WHERE conv_id = ?1 AND user_id = ?2",
            )?
            .execute(params![conv.0, user.0])?;
            Ok(())
        })
        .await
    }

    async fn members(
        &self,
        conv: ConversationId,
    ) -> Result<(ConvKind, Option<String>, Vec<Member>)> {
        self.read(move |conn| {
            let (kind, name): (String, Option<String>) = conn
                .prepare_cached("SELECT kind, name FROM conversations WHERE id = ?1")?
                .query_row([conv.0], |r| Ok((r.get(0)?, r.get(1)?)))
                .optional()?
                .ok_or(StoreError::NotFound)?;
            let mut stmt = conn.prepare_cached(&format!(
                "SELECT {} FROM members m JOIN users u ON u.id = m.user_id
                 WHERE m.conv_id = ?1 ORDER BY m.user_id",
                member_columns("m")
            ))?;
            let members = stmt
                .query_map([conv.0], |r| member(r, 0))?
                .collect::<rusqlite::Result<Vec<_>>>()?;
            Ok((conv_kind(&kind), name, members))
        })
        .await
    }

    async fn change_group(&self, event: NewGroupEvent) -> Result<Appended> {
        let (tx, rx) = oneshot::channel();
        self.submit(Op::Group(event, tx)).await?;
        rx.await.map_err(|_| StoreError::Closed)?
    }

    async fn blocked_among(&self, user: UserId, others: &[UserId]) -> Result<Vec<UserId>> {
        let ids = json_ids(others);
        self.read(move |conn| {
            let mut stmt = conn.prepare_cached(
                "SELECT o.value FROM json_each(?2) AS o
                 WHERE EXISTS (SELECT 1 FROM blocks b
                                WHERE (b.blocker = ?1 AND b.blocked = o.value)
                                   OR (b.blocker = o.value AND b.blocked = ?1))",
            )?;
            let rows = stmt.query_map(params![user.0, ids], |r| Ok(UserId(r.get(0)?)))?;
            Ok(rows.collect::<rusqlite::Result<_>>()?)
        })
        .await
    }

    async fn receipt_times(&self, conv: ConversationId, seq: i64) -> Result<Vec<MemberReceipt>> {
        self.read(move |conn| {
            // One row per member: O(members).
            let mut stmt = conn.prepare_cached(
                "SELECT m.user_id, u.username, u.read_receipts, m.accepted, m.delivered_seq >= ?2, m.read_seq >= ?2,
                        m.delivered_moves, m.read_moves
                 FROM members m JOIN users u ON u.id = m.user_id
                 WHERE m.conv_id = ?1 AND m.joined_seq < ?2 AND (m.left_seq IS NULL OR m.left_seq >= ?2)
                 ORDER BY m.user_id",
            )?;
            let rows = stmt.query_map(params![conv.0, seq], |r| {
                let delivered: bool = r.get(4)?;
                let read: bool = r.get(5)?;
                Ok(MemberReceipt {
                    user: UserId(r.get(0)?),
                    username: r.get(1)?,
                    read_receipts: r.get(2)?,
                    accepted: r.get(3)?,
                    delivered,
                    read,
                    delivered_at: delivered.then(|| passed_at(r.get(6).ok()?, seq)).flatten(),
                    read_at: read.then(|| passed_at(r.get(7).ok()?, seq)).flatten(),
                })
            })?;
            Ok(rows.collect::<rusqlite::Result<_>>()?)
        })
        .await
    }

    async fn conversations(
        &self,
        user: UserId,
        device: DeviceId,
    ) -> Result<Vec<ConversationState>> {
        self.read(move |conn| {
            // The user's own rows first, then the other current members of
            // every conversation the user is still in: O(members) rows.
            let mut stmt = conn.prepare_cached(
                "SELECT c.id, c.kind, c.name,
                        CASE WHEN me.left_seq IS NULL THEN COALESCE(last.seq, 0) ELSE me.left_seq END,
                        last.ts, max(COALESCE(dc.delivered_seq, 0), me.joined_seq),
                        me.delivered_seq, me.read_seq, me.role, me.left_seq IS NOT NULL, me.accepted
                 FROM members me
                 JOIN conversations c ON c.id = me.conv_id
                 LEFT JOIN device_cursors dc ON dc.device_id = ?2 AND dc.conv_id = me.conv_id
                 LEFT JOIN messages last ON last.conv_id = c.id
                      AND last.seq = (SELECT max(seq) FROM messages WHERE conv_id = c.id)
                 WHERE me.user_id = ?1
                 ORDER BY last.ts DESC NULLS LAST, c.id",
            )?;
            let rows = stmt.query_map(params![user.0, device.0], |r| {
                Ok(ConversationState {
                    conv: ConversationId(r.get(0)?),
                    kind: conv_kind(&r.get::<_, String>(1)?),
                    name: r.get(2)?,
                    last_seq: r.get(3)?,
                    last_ts: r.get(4)?,
                    device_delivered: r.get(5)?,
                    delivered: r.get(6)?,
                    read: r.get(7)?,
                    role: role(&r.get::<_, String>(8)?),
                    left: r.get(9)?,
                    accepted: r.get(10)?,
                    others: Vec::new(),
                })
            })?;
            let mut convs: Vec<ConversationState> = rows.collect::<rusqlite::Result<_>>()?;
            let mut stmt = conn.prepare_cached(&format!(
                "SELECT p.conv_id, {}, p.delivered_seq, p.read_seq, u.read_receipts, u.last_seen,
                        EXISTS (SELECT 1 FROM blocks b
                                 WHERE (b.blocker = ?1 AND b.blocked = p.user_id)
                                    OR (b.blocker = p.user_id AND b.blocked = ?1))
                 FROM members me
                 JOIN members p ON p.conv_id = me.conv_id AND p.user_id != me.user_id AND p.left_seq IS NULL
                 JOIN users u ON u.id = p.user_id
                 WHERE me.user_id = ?1 AND me.left_seq IS NULL
                 ORDER BY p.conv_id, p.user_id",
                member_columns("p")
            ))?;
            let others = stmt.query_map([user.0], |r| {
                let at = MEMBER_FIELDS + 1;
                Ok((
                    ConversationId(r.get(0)?),
                    OtherMember {
                        member: member(r, 1)?,
                        delivered: r.get(at)?,
                        read: r.get(at + 1)?,
                        read_receipts: r.get(at + 2)?,
                        last_seen: r.get(at + 3)?,
                        blocked: r.get(at + 4)?,
                    },
                ))
            })?;
            let mut by_conv: HashMap<ConversationId, Vec<OtherMember>> = HashMap::new();
            for row in others {
                let (conv, other) = row?;
                by_conv.entry(conv).or_default().push(other);
            }
            for c in &mut convs {
                c.others = by_conv.remove(&c.conv).unwrap_or_default();
            }
            Ok(convs)
        })
        .await
    }

    async fn unread_counts(&self, user: UserId) -> Result<Vec<(ConversationId, i64)>> {
        self.read(move |conn| {
            let mut stmt = conn.prepare_cached(
                "SELECT me.conv_id,
                        (SELECT count(*) FROM messages m
                          WHERE m.conv_id = me.conv_id AND m.seq > max(me.read_seq, me.joined_seq)
                            AND m.seq <= COALESCE(me.left_seq, 9223372036854775807)
                            AND m.sender_id != me.user_id AND m.event IS NULL)
                 FROM members me WHERE me.user_id = ?1",
            )?;
            let rows = stmt.query_map([user.0], |r| Ok((ConversationId(r.get(0)?), r.get(1)?)))?;
            Ok(rows.collect::<rusqlite::Result<_>>()?)
        })
        .await
    }

    async fn append(&self, message: NewMessage) -> Result<Appended> {
        let (tx, rx) = oneshot::channel();
        self.submit(Op::Append(message, tx)).await?;
        rx.await.map_err(|_| StoreError::Closed)?
    }

    async fn sent_message(
        &self,
        sender: UserId,
        client_id: &MessageId,
    ) -> Result<Option<StoredMessage>> {
        let client_id = client_id.clone();
        self.read(move |conn| sent_message(conn, sender, &client_id))
            .await
    }

    async fn heads(&self, users: &[UserId]) -> Result<Vec<(UserId, ConversationId, i64)>> {
        // One statement whatever the number of users.
        let ids = json_ids(users);
        self.read(move |conn| {
            // A member who left sees the conversation end where it left.
            let mut stmt = conn.prepare_cached(
                "SELECT me.user_id, me.conv_id,
                        COALESCE(me.left_seq, (SELECT max(seq) FROM messages WHERE conv_id = me.conv_id), 0)
                 FROM json_each(?1) AS u JOIN members me ON me.user_id = u.value",
            )?;
            let rows = stmt.query_map([ids], |r| {
                Ok((UserId(r.get(0)?), ConversationId(r.get(1)?), r.get(2)?))
            })?;
            Ok(rows.collect::<rusqlite::Result<_>>()?)
        })
        .await
    }

    async fn messages_after(
        &self,
        conv: ConversationId,
        after: i64,
        page: Page,
    ) -> Result<Vec<StoredMessage>> {
        self.read(move |conn| {
            let mut stmt = conn.prepare_cached(&format!(
                "{SELECT_MESSAGE} WHERE m.conv_id = ?1 AND m.seq > ?2 ORDER BY m.seq LIMIT ?3"
            ))?;
            let rows = stmt.query_map(params![conv.0, after, page.limit], stored_message)?;
            let mut rows = take_within(rows, page.max_bytes)?;
            blobs::mark_deleted(conn, conv, &mut rows)?;
            Ok(rows)
        })
        .await
    }

    async fn history(
        &self,
        conv: ConversationId,
        before: i64,
        page: Page,
    ) -> Result<Vec<StoredMessage>> {
        self.read(move |conn| {
            let mut stmt = conn.prepare_cached(&format!(
                "{SELECT_MESSAGE} WHERE m.conv_id = ?1 AND m.seq < ?2 ORDER BY m.seq DESC LIMIT ?3"
            ))?;
            let rows = stmt.query_map(params![conv.0, before, page.limit], stored_message)?;
            let mut rows = take_within(rows, page.max_bytes)?;
            rows.reverse();
            blobs::mark_deleted(conn, conv, &mut rows)?;
            Ok(rows)
        })
        .await
    }

    async fn advance_cursors(&self, update: CursorUpdate) -> Result<CursorsMoved> {
        let (tx, rx) = oneshot::channel();
        self.submit(Op::Cursor(update, tx)).await?;
        rx.await.map_err(|_| StoreError::Closed)?
    }

    async fn set_blocked(
        &self,
        blocker: UserId,
        blocked: UserId,
        on: bool,
        now: i64,
    ) -> Result<()> {
        self.write(move |conn| {
            if on {
                conn.execute(
                    "INSERT INTO blocks (blocker, blocked, created_at) VALUES (?1, ?2, ?3) ON CONFLICT DO NOTHING",
                    params![blocker.0, blocked.0, now],
                )?;
            } else {
                conn.execute(
                    "DELETE FROM blocks WHERE blocker = ?1 AND blocked = ?2",
                    params![blocker.0, blocked.0],
                )?;
            }
            Ok(())
        })
        .await
    }

    async fn is_blocked(&self, a: UserId, b: UserId) -> Result<bool> {
        self.read(move |conn| {
            Ok(conn
                .prepare_cached(
                    "SELECT EXISTS (SELECT 1 FROM blocks WHERE (blocker = ?1 AND blocked = ?2) OR (blocker = ?2 AND blocked = ?1))",
                )?
                .query_row(params![a.0, b.0], |r| r.get(0))?)
        })
        .await
    }

    async fn presence_watchers(&self, user: UserId) -> Result<Vec<UserId>> {
        self.read(move |conn| {
            let mut stmt = conn.prepare_cached(
                "SELECT DISTINCT p.user_id FROM members me
                 JOIN members p ON p.conv_id = me.conv_id AND p.user_id != me.user_id AND p.left_seq IS NULL
                 WHERE me.user_id = ?1 AND me.has_sent = 1 AND me.left_seq IS NULL
                   AND NOT EXISTS (SELECT 1 FROM blocks b
                                    WHERE (b.blocker = ?1 AND b.blocked = p.user_id)
                                       OR (b.blocker = p.user_id AND b.blocked = ?1))",
            )?;
            let rows = stmt.query_map([user.0], |r| Ok(UserId(r.get(0)?)))?;
            Ok(rows.collect::<rusqlite::Result<_>>()?)
        })
        .await
    }

    async fn set_device_keys(&self, device: DeviceId, keys: PublicKeys) -> Result<bool> {
        self.write(move |conn| {
            conn.execute(
                "UPDATE devices SET sign_key = ?2, kem_key = ?3
                 WHERE id = ?1 AND sign_key IS NULL AND removed_at IS NULL",
                params![device.0, keys.sign, keys.kem],
            )?;
            let now: Option<(Option<[u8; 32]>, Option<[u8; 32]>)> = conn
                .query_row(
                    "SELECT sign_key, kem_key FROM devices WHERE id = ?1",
                    [device.0],
                    |r| Ok((r.get(0)?, r.get(1)?)),
                )
                .optional()?;
            Ok(now == Some((Some(keys.sign), Some(keys.kem))))
        })
        .await
    }

    async fn device_lists(&self, user: UserId, after: i64) -> Result<Vec<StoredDeviceList>> {
        self.read(move |conn| {
            let mut stmt = conn.prepare_cached(
                "SELECT epoch, signed FROM device_lists
                 WHERE user_id = ?1 AND epoch > ?2 ORDER BY epoch",
            )?;
            let rows = stmt.query_map([user.0, after], device_list)?;
            Ok(rows.collect::<rusqlite::Result<_>>()?)
        })
        .await
    }

    async fn latest_device_list(&self, user: UserId) -> Result<Option<StoredDeviceList>> {
        self.read(move |conn| {
            Ok(conn
                .prepare_cached(
                    "SELECT epoch, signed FROM device_lists
                     WHERE user_id = ?1 ORDER BY epoch DESC LIMIT 1",
                )?
                .query_row([user.0], device_list)
                .optional()?)
        })
        .await
    }

    async fn put_device_list(
        &self,
        user: UserId,
        list: StoredDeviceList,
        remove: Vec<DeviceId>,
        now: i64,
    ) -> Result<()> {
        let write = move |conn: &Connection| {
            if list.epoch != newest_epoch(conn, user)? + 1 {
                return Err(StoreError::Conflict);
            }
            conn.execute(
                "INSERT INTO device_lists (user_id, epoch, signed, created_at) VALUES (?1, ?2, ?3, ?4)",
                params![user.0, list.epoch, list.signed, now],
            )?;
            for device in remove {
                remove_device(conn, user, device, now)?;
            }
            Ok(())
        };
        self.job(write, |job| Op::DeviceList(user, job)).await
    }

    async fn create_blob(&self, blob: NewBlob) -> Result<BlobCreated> {
        self.write(move |conn| blobs::create(conn, &blob)).await
    }

    async fn blob(&self, id: &str) -> Result<Option<BlobRecord>> {
        let id = id.to_string();
        self.read(move |conn| blobs::get(conn, &id)).await
    }

    async fn visible_blob(&self, id: &str, user: UserId) -> Result<Option<BlobRecord>> {
        let id = id.to_string();
        self.read(move |conn| blobs::visible(conn, &id, user)).await
    }

    async fn blob_parts(&self, id: &str) -> Result<Vec<BlobPart>> {
        let id = id.to_string();
        self.read(move |conn| blobs::parts(conn, &id)).await
    }

    async fn add_blob_part(&self, id: &str, part: BlobPart, expires_at: i64) -> Result<BlobRecord> {
        let id = id.to_string();
        self.write(move |conn| blobs::add_part(conn, &id, &part, expires_at))
            .await
    }

    async fn delete_blob(&self, id: &str, now: i64) -> Result<Option<Vec<BlobPart>>> {
        let id = id.to_string();
        self.write(move |conn| blobs::delete(conn, &id, now)).await
    }

    async fn sweep_blobs(
        &self,
        now: i64,
        retired_before: Option<i64>,
        limit: u32,
    ) -> Result<Vec<(String, Vec<BlobPart>)>> {
        self.write(move |conn| blobs::sweep(conn, now, retired_before, limit))
            .await
    }

    fn commits_in_call_order(&self) -> bool {
        true
    }

    async fn close(&self) {
        let handle = self.writer.lock().expect("writer handle poisoned").take();
        let Some(handle) = handle else { return };
        if self.ops.send(Op::Stop).await.is_ok() {
            let _ = tokio::task::spawn_blocking(move || handle.join()).await;
        }
        let checkpointer = self
            .checkpointer
            .lock()
            .expect("checkpointer poisoned")
            .take();
        if let Some(checkpointer) = checkpointer {
            let _ = tokio::task::spawn_blocking(move || checkpointer.stop()).await;
        }
        self.only_writer.lock().expect("lock poisoned").take();
    }
}
