//! Presence and typing: ephemeral, never stored, visible under the same rule.

use std::sync::Arc;
use std::time::Instant;

use crate::socket::Utf8Bytes;
use confab_protocol::{ConversationId, ServerFrame};
use confab_store::UserId;

use super::{Connection, Fault, MAX_CACHED_CONVERSATIONS, TYPING_INTERVAL};
use crate::AppState;
use crate::hub::{Event, PresenceChange};

impl Connection {
    pub(super) async fn on_typing(&mut self, conv: ConversationId) -> Result<(), Fault> {
        let me = self.user;
        let info = self.current_conv(conv).await?;
        // Typing is visible under the presence rule: only once this user has
        // written here, and never across a block. Otherwise it is dropped
        // silently, like any excess typing notice.
        if !info.i_have_sent {
            return Ok(());
        }
        let audience = info.audience(me);
        if audience.is_empty() {
            return Ok(());
        }
        let now = Instant::now();
        if let Some(last) = self.typing.get(&conv)
            && now.duration_since(*last) < TYPING_INTERVAL
        {
            return Ok(());
        }
        if self.typing.len() >= MAX_CACHED_CONVERSATIONS {
            self.typing.clear();
        }
        self.typing.insert(conv, now);
        let frame = ServerFrame::Typing {
            conv,
            user: self.username.clone(),
        };
        let frame = Utf8Bytes::from(frame.to_json());
        self.state
            .router
            .deliver(&audience, Event::Typing(Arc::new(frame)));
        Ok(())
    }

    pub(super) fn presence_event(&self, online: bool, last_seen: Option<i64>) -> Event {
        presence_event(self.user, &self.username, online, last_seen)
    }

    /// Tells everyone allowed to see this user's presence that it changed.
    pub(super) async fn announce_presence(&mut self, online: bool, last_seen: Option<i64>) {
        announce(&self.state, self.user, &self.username, online, last_seen).await;
    }
}

fn presence_event(user: UserId, username: &str, online: bool, last_seen: Option<i64>) -> Event {
    let frame = ServerFrame::Presence {
        user: username.to_owned(),
        online,
        last_seen,
    };
    Event::Presence(Arc::new(PresenceChange {
        user,
        frame: frame.to_json().into(),
    }))
}

/// Tells everyone allowed to see `user`'s presence that it changed.
pub(crate) async fn announce(
    state: &AppState,
    user: UserId,
    username: &str,
    online: bool,
    last_seen: Option<i64>,
) {
    match state.store.presence_watchers(user).await {
        Ok(watchers) if !watchers.is_empty() => {
            let event = presence_event(user, username, online, last_seen);
            state.router.deliver(&watchers, event);
        }
        Ok(_) => {}
        Err(e) => tracing::warn!(error = %e, "presence not announced"),
    }
}
