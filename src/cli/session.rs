//! Where the CLI keeps its login (server, user, device, token) and how it
//! gets a password and a connection.

use std::io::{BufRead, IsTerminal, Write};
use std::path::{Path, PathBuf};

use anyhow::Context;
use confab_client::{Client, ClientError, ConnectOptions, Event, Events, ServerUrl};
use confab_protocol::{DeviceId, ErrorCode};
use serde::{Deserialize, Serialize};

use super::Failure;
use super::output;

const SESSION_FILE: &str = "session.json";

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
        serde_json::from_str(&text).map_err(|e| Failure::other(format!("{}: {e}", path.display())))
    }

    /// A saved session, even an expired one (its device id is still good).
    pub fn load_any(dir: &Path) -> Option<Session> {
        Self::load(dir).ok()
    }

    pub fn save(&self, dir: &Path) -> anyhow::Result<()> {
        use std::os::unix::fs::OpenOptionsExt;
        std::fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
        let path = dir.join(SESSION_FILE);
        let tmp = dir.join(format!("{SESSION_FILE}.tmp"));
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)
            .with_context(|| format!("write {}", tmp.display()))?;
        file.write_all(serde_json::to_string_pretty(self)?.as_bytes())?;
        file.sync_all()?;
        std::fs::rename(&tmp, &path)?;
        Ok(())
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
    /// Events that arrived during the sync, for commands that show them.
    pub backlog: Vec<Event>,
}

impl Connected {
    pub async fn open(dir: &Path) -> Result<Connected, Failure> {
        let session = Session::load(dir)?;
        let url = session.url()?;
        let (client, mut events) = Client::connect(&url, &session.token, ConnectOptions::default())
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
            backlog,
        })
    }

    /// For commands that do not show conversations themselves: the
    /// messages pulled in are announced on stderr, now and while the command
    /// runs, and events are consumed so the connection never stalls on them.
    pub fn into_client(self) -> Client {
        for event in &self.backlog {
            if let Event::Message(m) = event {
                output::notify_message(m);
            }
        }
        let mut events = self.events;
        tokio::spawn(async move {
            while let Some(event) = events.recv().await {
                if let Event::Message(m) = event {
                    output::notify_message(&m);
                }
            }
        });
        self.client
    }
}

impl From<ClientError> for Failure {
    fn from(e: ClientError) -> Self {
        Failure::other(e.to_string())
    }
}
