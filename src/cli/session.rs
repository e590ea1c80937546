//! Where the CLI keeps its login (server, user, device, token) and how it
//! gets a password and a connection.

use std::io::{BufRead, IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::Context;
use confab_client::e2e::{E2e, Identity};
use confab_client::{Client, ClientError, ConnectOptions, Event, Events, ServerUrl, SyncState};
use confab_protocol::{ConversationId, DeviceId, ErrorCode};
use serde::{Deserialize, Serialize};

use super::output;
use super::{Failure, exit};

const SESSION_FILE: &str = "session.json";
/// This device's private keys (mode 0600). Kept at logout, so that logging
/// in again keeps the device and its keys.
const IDENTITY_FILE: &str = "identity.json";
/// The device lists of contacts as first seen and verified since.
pub const CONTACTS_FILE: &str = "contacts.json";
/// Per conversation, the highest seq this client has shown (or otherwise
/// handed on): what a server sends again is then recognised and dropped,
/// also after a `chat` was killed and started again.
const SYNC_FILE: &str = "sync.json";
/// Messages typed in `chat` and not yet acknowledged by the server, one
/// file per peer: `outbox-<peer>.json`.
pub const OUTBOX_PREFIX: &str = "outbox-";

/// Where this client keeps its files, which server the command was told to
/// use, and whether key changes are accepted (`--accept-key-change`) or
/// stop the command.
pub struct Local {
    pub dir: PathBuf,
    pub server: Option<String>,
    pub accept_key_change: bool,
}

impl Local {
    /// The saved login; with `--server`, only if it is a login at that server.
    pub fn session(&self) -> Result<Session, Failure> {
        let session = Session::load(&self.dir)?;
        if let Some(server) = &self.server
            && !same_server(server, &session.server)
        {
            return Err(Failure::not_logged_in(format!(
                "logged in at {}, not at {server}; run `confab login {} --server {server}`",
                session.server, session.user
            )));
        }
        Ok(session)
    }

    /// This device's encryption state, for the saved session.
    pub fn e2e(&self, session: &Session) -> Result<E2e, Failure> {
        let identity = load_identity(&self.dir)?
            .filter(|i| i.device == session.device && i.user == session.user)
            .ok_or_else(|| {
                Failure::not_logged_in(format!(
                    "no keys for this device in {}; run `confab login {}`",
                    self.dir.join(IDENTITY_FILE).display(),
                    session.user
                ))
            })?;
        Ok(E2e::new(
            identity,
            session.url()?,
            session.token.clone(),
            Some(self.dir.join(CONTACTS_FILE)),
            self.accept_key_change,
        )?)
    }
}

pub fn load_identity(dir: &Path) -> Result<Option<Identity>, Failure> {
    let path = dir.join(IDENTITY_FILE);
    match std::fs::read_to_string(&path) {
        Ok(text) => serde_json::from_str(&text)
            .map(Some)
            .map_err(|e| Failure::other(format!("{}: {e}", path.display()))),
        Err(_) => Ok(None),
    }
}

pub fn save_identity(dir: &Path, identity: &Identity) -> anyhow::Result<()> {
    write_private(dir, IDENTITY_FILE, &serde_json::to_string_pretty(identity)?)
}

/// Forgets this directory's device: its keys, pinned contacts, what it
/// has shown and what it still had to send.
pub fn forget_identity(dir: &Path) {
    for file in [IDENTITY_FILE, CONTACTS_FILE, SYNC_FILE] {
        let _ = std::fs::remove_file(dir.join(file));
    }
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        if entry
            .file_name()
            .to_string_lossy()
            .starts_with(OUTBOX_PREFIX)
        {
            let _ = std::fs::remove_file(entry.path());
        }
    }
}

/// Whether two server URLs name the same server.
fn same_server(a: &str, b: &str) -> bool {
    a.trim_end_matches('/')
        .eq_ignore_ascii_case(b.trim_end_matches('/'))
}

/// Writes a file only this user can read, atomically (a crash leaves the
/// old version or the new one) and durably (fsynced).
pub fn write_private(dir: &Path, name: &str, text: &str) -> anyhow::Result<()> {
    write_file(dir, name, text, true)
}

/// The same without the fsync: for state written after every message, where
/// a process kill (not a power cut) is what must not lose it, and the page
/// cache survives that.
pub fn write_private_quick(dir: &Path, name: &str, text: &str) -> anyhow::Result<()> {
    write_file(dir, name, text, false)
}

fn write_file(dir: &Path, name: &str, text: &str, durable: bool) -> anyhow::Result<()> {
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    std::fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
    // Keys, tokens and contacts: the directory is the owner's alone.
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
        .with_context(|| format!("chmod {}", dir.display()))?;
    let path = dir.join(name);
    let tmp = dir.join(format!("{name}.tmp"));
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .with_context(|| format!("write {}", tmp.display()))?;
    file.write_all(text.as_bytes())?;
    if durable {
        file.sync_all()?;
    }
    std::fs::rename(&tmp, &path)?;
    Ok(())
}

/// The login of this client, saved in the config directory (mode 0600: it
/// holds a bearer token).
#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct Session {
    pub server: String,
    pub user: String,
    pub device: DeviceId,
    pub token: String,
    pub expires_at: i64,
}

/// The config directory: `--config-dir`, else `$XDG_CONFIG_HOME/confab`,
/// else `~/.config/confab`.
pub fn config_dir(flag: Option<&Path>) -> anyhow::Result<PathBuf> {
    if let Some(dir) = flag {
        return Ok(dir.to_path_buf());
    }
    if let Some(xdg) = std::env::var_os("XDG_CONFIG_HOME").filter(|v| !v.is_empty()) {
        return Ok(PathBuf::from(xdg).join("confab"));
    }
    let home = std::env::var_os("HOME").context("HOME is not set; pass --config-dir")?;
    Ok(PathBuf::from(home).join(".config").join("confab"))
}

impl Session {
    pub fn load(dir: &Path) -> Result<Session, Failure> {
        let path = dir.join(SESSION_FILE);
        let text = std::fs::read_to_string(&path).map_err(|_| {
            Failure::not_logged_in(format!(
                "not logged in (no {}); run `confab login <user>`",
                path.display()
            ))
        })?;
        let session: Session = serde_json::from_str(&text)
            .map_err(|e| Failure::other(format!("{}: {e}", path.display())))?;
        if session.token.is_empty() {
            return Err(Failure::not_logged_in(format!(
                "logged out; run `confab login {}`",
                session.user
            )));
        }
        Ok(session)
    }

    /// A saved session, even an expired or logged-out one: it says which
    /// server and user this directory's keys belong to.
    pub fn load_any(dir: &Path) -> Option<Session> {
        let text = std::fs::read_to_string(dir.join(SESSION_FILE)).ok()?;
        serde_json::from_str(&text).ok()
    }

    /// Logged out, but this directory still holds the device's keys.
    pub fn logged_out(mut self, dir: &Path) -> anyhow::Result<()> {
        self.token.clear();
        self.expires_at = 0;
        self.save(dir)
    }

    pub fn save(&self, dir: &Path) -> anyhow::Result<()> {
        write_private(dir, SESSION_FILE, &serde_json::to_string_pretty(self)?)
    }

    pub fn forget(dir: &Path) {
        let _ = std::fs::remove_file(dir.join(SESSION_FILE));
    }

    pub fn url(&self) -> Result<ServerUrl, Failure> {
        ServerUrl::parse(&self.server).map_err(Failure::from)
    }
}

/// A password from `env` if set, else typed at a terminal prompt without
/// echo, else the next line of stdin (for scripts).
pub fn read_password(prompt: &str, env: &str) -> anyhow::Result<String> {
    if let Ok(password) = std::env::var(env) {
        return Ok(password);
    }
    if std::io::stdin().is_terminal() {
        return Ok(rpassword::prompt_password(prompt)?);
    }
    let mut line = String::new();
    std::io::stdin().lock().read_line(&mut line)?;
    let password = line.trim_end_matches(['\n', '\r']).to_string();
    anyhow::ensure!(!password.is_empty(), "no password on stdin (or set {env})");
    Ok(password)
}

/// What this client keeps of the stream of messages, saved in `sync.json`
/// for the device it belongs to (another login starts afresh).
pub struct SyncFile {
    dir: PathBuf,
    saved: SavedSync,
    pub state: Arc<SyncState>,
}

#[derive(Serialize, Deserialize)]
struct SavedSync {
    server: String,
    user: String,
    device: DeviceId,
    /// (conversation, highest seq shown)
    shown: Vec<(ConversationId, i64)>,
}

impl SyncFile {
    /// What the file says was shown, if it is this device's.
    fn read(dir: &Path, this: &SavedSync) -> Option<Vec<(ConversationId, i64)>> {
        let text = std::fs::read_to_string(dir.join(SYNC_FILE)).ok()?;
        let saved: SavedSync = serde_json::from_str(&text).ok()?;
        (same_server(&saved.server, &this.server)
            && saved.user == this.user
            && saved.device == this.device)
            .then_some(saved.shown)
    }

    fn load(dir: &Path, session: &Session) -> SyncFile {
        let mut saved = SavedSync {
            server: session.server.clone(),
            user: session.user.clone(),
            device: session.device,
            shown: Vec::new(),
        };
        if let Some(shown) = Self::read(dir, &saved) {
            saved.shown = shown;
        }
        SyncFile {
            dir: dir.to_path_buf(),
            state: Arc::new(SyncState::from_watermarks(saved.shown.iter().copied())),
            saved,
        }
    }

    /// Saves what has been shown; call it after showing messages. Merged
    /// with what another command of this device saved meanwhile (a second
    /// chat, say): a watermark only moves forward.
    pub fn save(&mut self) {
        let shown = self.state.watermarks();
        if shown == self.saved.shown {
            return;
        }
        let mut merged: std::collections::BTreeMap<ConversationId, i64> =
            shown.into_iter().collect();
        if let Some(on_disk) = Self::read(&self.dir, &self.saved) {
            for (conv, seq) in on_disk {
                let entry = merged.entry(conv).or_insert(seq);
                *entry = (*entry).max(seq);
            }
        }
        self.saved.shown = merged.into_iter().collect();
        let text = serde_json::to_string(&self.saved).expect("sync state serializes");
        if let Err(e) = write_private_quick(&self.dir, SYNC_FILE, &text) {
            tracing::warn!(error = %e, "cannot save what was shown");
        }
    }
}

/// This client's device, ready to connect (again and again, for `chat`):
/// its login, keys, pinned contacts and what it has shown.
pub struct Device {
    pub session: Session,
    pub url: ServerUrl,
    pub e2e: Arc<E2e>,
    pub sync: SyncFile,
}

impl Device {
    pub fn open(local: &Local) -> Result<Device, Failure> {
        let session = local.session()?;
        let url = session.url()?;
        let e2e = Arc::new(local.e2e(&session)?);
        let sync = SyncFile::load(&local.dir, &session);
        Ok(Device {
            session,
            url,
            e2e,
            sync,
        })
    }

    /// Connects. The offline backlog follows on the events, up to
    /// `Event::Synced`. A message is confirmed to the server only once the
    /// command has shown it and saved that it did (`Events::done`, after
    /// `SyncFile::save`).
    pub async fn connect(&self) -> Result<(Client, Events), Failure> {
        let options = ConnectOptions {
            e2e: Some(self.e2e.clone()),
            state: self.sync.state.clone(),
            confirm_when_done: true,
            confirm_delivery: !test_silent_receipts(),
            ..ConnectOptions::default()
        };
        Client::connect(&self.url, &self.session.token, options)
            .await
            .map_err(|e| match e.code() {
                Some(code) if session_over(code) => self.session_over(code),
                _ => Failure::from(e),
            })
    }

    /// What to tell a user whose session the server ended.
    pub fn session_over(&self, code: ErrorCode) -> Failure {
        let user = &self.session.user;
        Failure::not_logged_in(match code {
            ErrorCode::TokenExpired => {
                format!("your session has expired; run `confab login {user}` (this device is kept)")
            }
            ErrorCode::DeviceRemoved => {
                format!("this device was removed; run `confab login {user}`")
            }
            _ => format!("this device was logged out or removed; run `confab login {user}`"),
        })
    }
}

/// Codes with which the server ends a session: no reconnect fixes those.
pub fn session_over(code: ErrorCode) -> bool {
    matches!(
        code,
        ErrorCode::Unauthorized | ErrorCode::DeviceRemoved | ErrorCode::TokenExpired
    )
}

/// Test hook (`CONFAB_TEST_SILENT_RECEIPTS=1`): the client sends no
/// `delivered` and no `read`, as if every confirmation were lost, so that a
/// test can kill a client that showed messages the server has not heard of.
pub fn test_silent_receipts() -> bool {
    std::env::var_os("CONFAB_TEST_SILENT_RECEIPTS").is_some_and(|v| v == "1")
}

/// A connection with the offline backlog already taken, for the commands
/// that do one thing and end.
pub struct Connected {
    pub client: Client,
    pub events: Events,
    pub e2e: Arc<E2e>,
    /// Events that arrived during the sync, for commands that show them.
    pub backlog: Vec<Event>,
    pub sync: SyncFile,
}

impl Connected {
    /// Connects and takes the offline backlog, for the command to show.
    pub async fn open(local: &Local) -> Result<Connected, Failure> {
        let device = Device::open(local)?;
        let (client, mut events) = device.connect().await?;
        let mut backlog = Vec::new();
        loop {
            match events.recv().await {
                Some(Event::Synced) => break,
                Some(Event::Closed(Some(error))) if session_over(error.code) => {
                    return Err(device.session_over(error.code));
                }
                Some(Event::Closed(error)) => {
                    return Err(Failure::lost(format!(
                        "the server closed the connection: {}",
                        error.map(|e| e.message).unwrap_or_default()
                    )));
                }
                Some(event) => backlog.push(event),
                None => return Err(Failure::lost("the connection ended during sync")),
            }
        }
        Ok(Connected {
            client,
            events,
            e2e: device.e2e,
            backlog,
            sync: device.sync,
        })
    }

    /// What was taken from the events so far has been shown: saved as
    /// shown, and confirmed to the server.
    pub fn shown(&mut self) {
        self.sync.save();
        self.events.done();
    }

    /// For commands that do not show conversations themselves: the
    /// messages pulled in are announced on stderr, now and while the command
    /// runs, and events are consumed so the connection never stalls on them.
    pub fn into_client(self) -> Client {
        let Connected {
            client,
            mut events,
            backlog,
            mut sync,
            ..
        } = self;
        for event in &backlog {
            output::notify(event);
        }
        sync.save();
        events.done();
        tokio::spawn(async move {
            while let Some(event) = events.recv().await {
                output::notify(&event);
                sync.save();
                events.done();
            }
        });
        client
    }
}

impl From<ClientError> for Failure {
    fn from(e: ClientError) -> Self {
        let code = match e {
            ClientError::KeyChanged(_) => exit::KEY_CHANGED,
            _ => exit::FAILED,
        };
        Failure {
            code,
            retry: worth_retrying(&e),
            message: e.to_string(),
        }
    }
}

/// Whether trying again later may work: the server could not be reached,
/// went away or was busy, as opposed to a verdict.
pub fn worth_retrying(e: &ClientError) -> bool {
    match e {
        ClientError::Io(_) | ClientError::Disconnected(_) => true,
        ClientError::Api { status, .. } => *status == 503,
        ClientError::Server(frame) => matches!(
            frame.code,
            ErrorCode::StorageUnavailable
                | ErrorCode::RateLimited
                | ErrorCode::ShuttingDown
                | ErrorCode::TooSlow
                | ErrorCode::IdleTimeout
                | ErrorCode::Busy
        ),
        _ => false,
    }
}
