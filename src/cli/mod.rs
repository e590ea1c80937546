//! The command-line client. Every command works from scripts: passwords
//! from `CONFAB_PASSWORD` or stdin, `--config-dir` to drive several users
//! from one shell, `--json` for listings, exit codes that mean something.

mod account;
mod backoff;
mod chat;
mod files;
mod groups;
mod messages;
pub mod output;
mod session;
mod target;

use std::path::PathBuf;

use clap::{Args, Subcommand};

/// Where `register` and `login` go without `--server` or `CONFAB_SERVER`.
const DEFAULT_SERVER: &str = "http://127.0.0.1:8080";

/// Exit codes beyond 0 (success) and 2 (bad usage, from clap).
pub mod exit {
    pub const FAILED: i32 = 1;
    pub const NOT_LOGGED_IN: i32 = 3;
    pub const TIMED_OUT: i32 = 4;
    /// A contact's keys changed and the change was not accepted.
    pub const KEY_CHANGED: i32 = 5;
}

/// Why a command failed, and the exit code that says so.
#[derive(Debug)]
pub struct Failure {
    pub code: i32,
    pub message: String,
    /// Whether trying again later may work (the server could not be reached
    /// or was busy), as opposed to a verdict.
    pub retry: bool,
}

impl Failure {
    pub fn new(code: i32, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
            retry: false,
        }
    }

    pub fn other(message: impl Into<String>) -> Self {
        Self::new(exit::FAILED, message)
    }

    pub fn not_logged_in(message: impl Into<String>) -> Self {
        Self::new(exit::NOT_LOGGED_IN, message)
    }

    pub fn timed_out(message: impl Into<String>) -> Self {
        Self::new(exit::TIMED_OUT, message)
    }

    /// The server could not be reached or went away: worth another try.
    pub fn lost(message: impl Into<String>) -> Self {
        Self {
            retry: true,
            ..Self::other(message)
        }
    }
}

impl From<anyhow::Error> for Failure {
    fn from(e: anyhow::Error) -> Self {
        Failure::other(format!("{e:#}"))
    }
}

/// Options every client command takes.
#[derive(Args, Debug, Clone)]
pub struct Common {
    /// Where the login is kept (default: $XDG_CONFIG_HOME/confab or ~/.config/confab).
    #[arg(long, env = "CONFAB_CONFIG_DIR", global = true)]
    pub config_dir: Option<PathBuf>,
    /// The server, e.g. http://chat.example.org:8080. `register` and `login`
    /// use it (default http://127.0.0.1:8080); other commands use the server
    /// of the saved login and, given this, check that it is that one.
    #[arg(long, env = "CONFAB_SERVER", global = true)]
    pub server: Option<String>,
    /// Trust a contact whose keys changed without a signature from their old
    /// devices (a reset, or a device list the server made up). Without it,
    /// such a change stops the command with exit code 5.
    #[arg(long, global = true)]
    pub accept_key_change: bool,
}

#[derive(Subcommand, Debug)]
pub enum ClientCommand {
    /// Create an account. Password: CONFAB_PASSWORD, stdin, or a prompt.
    Register { username: String },
    /// Log in and save the session; a device is made at the first login and
    /// kept at later ones.
    Login {
        username: String,
        /// A name for this device, shown in `confab devices`.
        #[arg(long, default_value = "cli")]
        device_name: String,
    },
    /// Log out: end this device's session and forget it here. A device on
    /// your signed list keeps its id and keys (log in again to get it back).
    Logout,
    /// The safety number with a user: compare it with theirs (in person, or
    /// over another channel) to know no one else holds keys in between.
    Keys {
        user: String,
        #[arg(long)]
        json: bool,
    },
    /// List this account's devices (with key fingerprints), or change them.
    Devices {
        #[command(subcommand)]
        action: Option<DevicesAction>,
        #[arg(long)]
        json: bool,
    },
    /// Change the password (old one from CONFAB_PASSWORD or the first stdin
    /// line, new one from CONFAB_NEW_PASSWORD or the next line).
    Password {
        /// Also log out every other device of the account.
        #[arg(long)]
        logout_other_devices: bool,
    },
    /// Send one message; exit 0 once the server has stored it.
    Send {
        user: String,
        text: String,
        /// Also wait until the message is delivered to, or read by, the peer.
        #[arg(long, value_enum)]
        wait: Option<messages::WaitFor>,
        /// Give up waiting after this many seconds (exit code 4).
        #[arg(long, default_value_t = 30)]
        timeout: u64,
        #[arg(long)]
        json: bool,
    },
    /// Send a file: encrypted here, uploaded with a progress bar, then sent
    /// as a message. Interrupted (a lost connection, a killed command), run
    /// it again: it goes on where the upload stopped.
    SendFile {
        user: String,
        path: PathBuf,
        #[arg(long)]
        json: bool,
    },
    /// Download and decrypt the file of message SEQ of the conversation with
    /// a user, to DIR (default: here) under its own name, made safe.
    Download {
        user: String,
        seq: i64,
        dir: Option<PathBuf>,
        /// Replace a file of that name.
        #[arg(long)]
        force: bool,
    },
    /// Delete the file you sent in message SEQ of the conversation with a
    /// user: its bytes leave the server, the message stays and shows it as
    /// deleted, and it no longer counts against your quota.
    DeleteFile { user: String, seq: i64 },
    /// Chat with a user: lines typed are sent, the conversation is shown
    /// live with ticks, presence and typing. A lost connection is retried
    /// (lines typed meanwhile are sent once it is back); ctrl-d or /quit
    /// ends it. When stdin is not a terminal, one message per input line and
    /// one JSON event per output line.
    Chat { user: String },
    /// List conversations with unread counts.
    Conversations {
        #[arg(long)]
        json: bool,
    },
    /// Show the messages of the conversation with a user.
    History {
        user: String,
        /// How many messages (at most 500).
        #[arg(long, default_value_t = 20)]
        limit: u32,
        /// Only messages before this seq (to page back).
        #[arg(long)]
        before: Option<i64>,
        #[arg(long)]
        json: bool,
    },
    /// List message requests: conversations someone else started that you
    /// have neither answered nor accepted. Until then they see no receipts
    /// from you and can send only a few messages.
    Requests {
        #[arg(long)]
        json: bool,
    },
    /// Accept a user's message request (replying accepts it too).
    Accept { user: String },
    /// Block a user: no messages, presence, typing or receipts either way.
    Block { user: String },
    /// Lift a block.
    Unblock { user: String },
    /// Make and change groups. A group is named `#name` wherever a user
    /// can be (send, chat, history, send-file, download).
    Group {
        #[command(subcommand)]
        action: groups::GroupAction,
    },
    /// Who has one of your messages and who read it, and when: message SEQ
    /// of the conversation with a user or `#group`.
    Info {
        conversation: String,
        seq: i64,
        #[arg(long)]
        json: bool,
    },
    /// Show the settings, or change the ones given.
    Settings {
        /// Send read receipts (and see others'): on or off.
        #[arg(long, value_parser = parse_on_off)]
        read_receipts: Option<bool>,
    },
}

#[derive(Subcommand, Debug)]
pub enum DevicesAction {
    /// Put a new device of yours on your signed device list, so that
    /// messages are encrypted for it. Its keys come from the server, so the
    /// fingerprint the new device printed at login must match: pass it with
    /// --fingerprint, or confirm it at the prompt.
    Approve {
        device: i64,
        /// What the new device showed, e.g. "1445 e55d 0571 5d94 248d".
        #[arg(long)]
        fingerprint: Option<String>,
    },
    /// Remove a device: it is taken off your device list, logged out, and
    /// its sockets close.
    Remove { device: i64 },
    /// Lost every other device? Start your device list over with this one
    /// alone (asks for the password). Every other device is removed and
    /// your contacts see a key change.
    Reset,
}

fn parse_on_off(s: &str) -> Result<bool, String> {
    match s {
        "on" | "true" | "yes" => Ok(true),
        "off" | "false" | "no" => Ok(false),
        _ => Err("use on or off".into()),
    }
}

pub async fn run(common: Common, command: ClientCommand) -> Result<(), Failure> {
    let dir = session::config_dir(common.config_dir.as_deref())?;
    let local = session::Local {
        dir: dir.clone(),
        server: common.server.clone(),
        accept_key_change: common.accept_key_change,
    };
    let local = &local;
    let server = common.server.unwrap_or_else(|| DEFAULT_SERVER.to_string());
    match command {
        ClientCommand::Register { username } => account::register(&server, &username).await,
        ClientCommand::Login {
            username,
            device_name,
        } => account::login(local, &server, &username, &device_name).await,
        ClientCommand::Logout => account::logout(local).await,
        ClientCommand::Keys { user, json } => account::keys(local, &user, json).await,
        ClientCommand::Devices { action, json } => account::devices(local, action, json).await,
        ClientCommand::Password {
            logout_other_devices,
        } => account::password(local, logout_other_devices).await,
        ClientCommand::Send {
            user,
            text,
            wait,
            timeout,
            json,
        } => messages::send(local, &user, text, wait, timeout, json).await,
        ClientCommand::Chat { user } => chat::chat(local, &user).await,
        ClientCommand::SendFile { user, path, json } => {
            files::send_file(local, &user, &path, json).await
        }
        ClientCommand::Download {
            user,
            seq,
            dir,
            force,
        } => files::download(local, &user, seq, dir.as_deref(), force).await,
        ClientCommand::DeleteFile { user, seq } => files::delete_file(local, &user, seq).await,
        ClientCommand::Conversations { json } => messages::conversations(local, json).await,
        ClientCommand::History {
            user,
            limit,
            before,
            json,
        } => messages::history(local, &user, limit, before, json).await,
        ClientCommand::Requests { json } => messages::requests(local, json).await,
        ClientCommand::Accept { user } => messages::accept(local, &user).await,
        ClientCommand::Block { user } => messages::block(local, &user, true).await,
        ClientCommand::Unblock { user } => messages::block(local, &user, false).await,
        ClientCommand::Settings { read_receipts } => messages::settings(local, read_receipts).await,
        ClientCommand::Group { action } => groups::group(local, action).await,
        ClientCommand::Info {
            conversation,
            seq,
            json,
        } => groups::info(local, &conversation, seq, json).await,
    }
}
