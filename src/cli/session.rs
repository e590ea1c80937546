//! Where the CLI keeps its login (server, user, device, token) and how it
//! gets a password and a connection.

use std::io::{BufRead, IsTerminal, Write};
use std::path::{Path, PathBuf};

use std::sync::Arc;

use anyhow::Context;
use confab_client::e2e::{E2e, Identity};
use confab_client::{Client, ClientError, ConnectOptions, Event, Events, ServerUrl};
use confab_protocol::{DeviceId, ErrorCode};
use serde::{Deserialize, Serialize};

use super::output;
use super::{Failure, exit};

const SESSION_FILE: &str = "session.json";
/// This device's private keys (mode 0600). Kept at logout, so that logging
/// in again keeps the device and its keys.
const IDENTITY_FILE: &str = "identity.json";
/// The device lists of contacts as first seen and verified since.
pub const CONTACTS_FILE: &str = "contacts.json";

/// Where this client keeps its files, and whether key changes are accepted
/// (`--accept-key-change`) or stop the command.
pub struct Local {
    pub dir: PathBuf,
    pub accept_key_change: bool,
}

impl Local {
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

pub fn forget_identity(dir: &Path) {
    let _ = std::fs::remove_file(dir.join(IDENTITY_FILE));
    let _ = std::fs::remove_file(dir.join(CONTACTS_FILE));
}

/// Writes a file only this user can read, atomically.
fn write_private(dir: &Path, name: &str, text: &str) -> anyhow::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
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
    file.sync_all()?;
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

/// A connection with the offline backlog already taken: messages that came
/// in are confirmed (the library does that) and announced on stderr, since
/// this client keeps no message store of its own.
pub struct Connected {
    pub client: Client,
    pub events: Events,
    pub session: Session,
    pub e2e: Arc<E2e>,
    /// Events that arrived during the sync, for commands that show them.
    pub backlog: Vec<Event>,
}

impl Connected {
    pub async fn open(local: &Local) -> Result<Connected, Failure> {
        let session = Session::load(&local.dir)?;
        let url = session.url()?;
        let e2e = Arc::new(local.e2e(&session)?);
        let options = ConnectOptions {
            e2e: Some(e2e.clone()),
            ..ConnectOptions::default()
        };
        let (client, mut events) = Client::connect(&url, &session.token, options)
            .await
            .map_err(|e| match e.code() {
                Some(ErrorCode::TokenExpired) => Failure::not_logged_in(format!(
                    "your session has expired; run `confab login {}` (this device is kept)",
                    session.user
                )),
                Some(ErrorCode::Unauthorized) => Failure::not_logged_in(format!(
                    "this device was logged out or removed; run `confab login {}`",
                    session.user
                )),
                _ => Failure::from(e),
            })?;
        let mut backlog = Vec::new();
        loop {
            match events.recv().await {
                Some(Event::Synced) => break,
                Some(Event::Closed(error)) => {
                    return Err(Failure::other(format!(
                        "the server closed the connection: {}",
                        error.map(|e| e.message).unwrap_or_default()
                    )));
                }
                Some(event) => backlog.push(event),
                None => return Err(Failure::other("the connection ended during sync")),
            }
        }
        Ok(Connected {
            client,
            events,
            session,
            e2e,
            backlog,
        })
    }

    /// For commands that do not show conversations themselves: the
    /// messages pulled in are announced on stderr, now and while the command
    /// runs, and events are consumed so the connection never stalls on them.
    pub fn into_client(self) -> Client {
        for event in &self.backlog {
            output::notify(event);
        }
        let mut events = self.events;
        tokio::spawn(async move {
            while let Some(event) = events.recv().await {
                output::notify(&event);
            }
        });
        self.client
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
            message: e.to_string(),
        }
    }
}
