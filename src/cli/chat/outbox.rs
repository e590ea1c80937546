//! What the user typed in `chat` and the server has not acknowledged yet,
//! in the order it was typed, each line with the message id it keeps for
//! every attempt. Saved in the config directory after every change, so a
//! chat that was killed sends it the next time (a resend of a message that
//! was stored after all is answered with the original: never twice).

use std::collections::VecDeque;
use std::path::{Path, PathBuf};

use confab_client::new_message_id;
use confab_protocol::MessageId;
use serde::{Deserialize, Serialize};

use crate::cli::session::{OUTBOX_FILE, write_private};

#[derive(Serialize, Deserialize, Clone, Debug)]
pub struct Queued {
    pub id: MessageId,
    pub peer: String,
    pub text: String,
}

pub struct Outbox {
    dir: PathBuf,
    peer: String,
    /// Every peer's queued lines: a chat with one peer keeps the others'.
    queued: VecDeque<Queued>,
}

impl Outbox {
    pub fn load(dir: &Path, peer: &str) -> Outbox {
        let queued = std::fs::read_to_string(dir.join(OUTBOX_FILE))
            .ok()
            .and_then(|text| serde_json::from_str(&text).ok())
            .unwrap_or_default();
        Outbox {
            dir: dir.to_path_buf(),
            peer: peer.to_string(),
            queued,
        }
    }

    /// Queues a typed line under a fresh id.
    pub fn push(&mut self, text: String) -> Queued {
        let queued = Queued {
            id: new_message_id(),
            peer: self.peer.clone(),
            text,
        };
        self.queued.push_back(queued.clone());
        self.save();
        queued
    }

    /// The oldest line for this chat's peer.
    pub fn next(&self) -> Option<&Queued> {
        self.queued.iter().find(|q| q.peer == self.peer)
    }

    /// Lines for this chat's peer still to send.
    pub fn len(&self) -> usize {
        self.queued.iter().filter(|q| q.peer == self.peer).count()
    }

    /// Sent, or refused for good: no longer queued.
    pub fn remove(&mut self, id: &MessageId) {
        self.queued.retain(|q| q.id != *id);
        self.save();
    }

    fn save(&self) {
        let text = serde_json::to_string(&self.queued).expect("the outbox serializes");
        if let Err(e) = write_private(&self.dir, OUTBOX_FILE, &text) {
            tracing::warn!(error = %e, "cannot save the outbox");
        }
    }
}
