//! What the user typed in `chat` and the server has not acknowledged yet,
//! in the order it was typed, each line with the message id it keeps for
//! every attempt. Saved in the config directory after every change, one
//! file per peer (`outbox-<peer>.json`, so chats with different people do
//! not overwrite each other's), so a chat that was killed sends it the next
//! time (a resend of a message that was stored after all is answered with
//! the original: never twice).

use std::collections::VecDeque;
use std::path::{Path, PathBuf};

use confab_client::new_message_id;
use confab_protocol::MessageId;
use serde::{Deserialize, Serialize};

use crate::cli::session::{OUTBOX_PREFIX, write_private};

#[derive(Serialize, Deserialize, Clone, Debug)]
pub struct Queued {
    pub id: MessageId,
    pub text: String,
}

pub struct Outbox {
    dir: PathBuf,
    file: String,
    queued: VecDeque<Queued>,
}

impl Outbox {
    /// The outbox for `key` (a username, or `group-<hex of the name>`: a
    /// safe file name, `Target::file_key`). One
    /// that cannot be read is moved aside, not overwritten.
    pub fn load(dir: &Path, key: &str) -> Outbox {
        let file = format!("{OUTBOX_PREFIX}{key}.json");
        let path = dir.join(&file);
        let queued = match std::fs::read_to_string(&path) {
            Ok(text) => serde_json::from_str(&text).unwrap_or_else(|e| {
                let aside = path.with_extension("json.unreadable");
                tracing::warn!(error = %e, "unreadable outbox moved to {}", aside.display());
                let _ = std::fs::rename(&path, &aside);
                VecDeque::new()
            }),
            Err(_) => VecDeque::new(),
        };
        Outbox {
            dir: dir.to_path_buf(),
            file,
            queued,
        }
    }

    /// Queues a typed line under a fresh id.
    pub fn push(&mut self, text: String) -> Queued {
        let queued = Queued {
            id: new_message_id(),
            text,
        };
        self.queued.push_back(queued.clone());
        self.save();
        queued
    }

    /// The oldest line.
    pub fn next(&self) -> Option<&Queued> {
        self.queued.front()
    }

    /// Lines still to send.
    pub fn len(&self) -> usize {
        self.queued.len()
    }

    pub fn is_empty(&self) -> bool {
        self.queued.is_empty()
    }

    /// Sent, or refused for good: no longer queued.
    pub fn remove(&mut self, id: &MessageId) {
        self.queued.retain(|q| q.id != *id);
        self.save();
    }

    fn save(&self) {
        let text = serde_json::to_string(&self.queued).expect("the outbox serializes");
        if let Err(e) = write_private(&self.dir, &self.file, &text) {
            tracing::warn!(error = %e, "cannot save the outbox");
        }
    }
}
