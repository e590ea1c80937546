//! The connect-time sync: welcome, receipts and presence as of now, every
//! message missed while offline, then `synced`.

use std::collections::HashSet;

use super::{Closing, Connection, storage_closing};
use confab_protocol::{PROTOCOL_VERSION, ServerFrame, Settings, Welcome};
use confab_store::UserId;

impl Connection {
    /// Welcome, then everything missed while offline, then `synced`.
    pub(super) async fn start(&mut self) -> Result<(), Closing> {
        let config = &self.state.config;
        let welcome = ServerFrame::Welcome(Welcome {
            v: PROTOCOL_VERSION,
            user: self.username.clone(),
            device: self.device,
            heartbeat_ms: config.heartbeat_interval.as_millis() as u64,
            idle_timeout_ms: config.idle_timeout.as_millis() as u64,
            max_body_bytes: config.max_body_bytes,
            max_frame_bytes: config.max_frame_bytes,
            expires_at: self.expires_at,
            server_time: self.state.config.clock.now(),
            settings: Some(Settings {
                read_receipts: self.read_receipts,
            }),
        });
        self.write_frame(&welcome).await?;
        let convs = self
            .state
            .store
            .conversations(self.user, self.device)
            .await
            .map_err(|e| storage_closing(e, "cannot sync now; reconnect later"))?;
        for c in &convs {
            self.watermarks.insert(c.conv, c.device_delivered);
        }
        // Receipts and presence as of the snapshot go first: anything newer
        // that arrives during the catch-up below is written after them.
        for c in &convs {
            if c.read > 0 || c.delivered > 0 {
                self.write_frame(&ServerFrame::Receipt {
                    conv: c.conv,
                    user: self.username.clone(),
                    delivered: c.delivered,
                    read: Some(c.read),
                })
                .await?;
            }
            // A member that has not accepted the conversation (a message
            // request) shows the others nothing.
            for other in &c.others {
                if other.blocked || !other.member.accepted || other.delivered == 0 {
                    continue;
                }
                let read = (other.read_receipts && self.read_receipts).then_some(other.read);
                self.write_frame(&ServerFrame::Receipt {
                    conv: c.conv,
                    user: other.member.username.clone(),
                    delivered: other.delivered,
                    read,
                })
                .await?;
            }
        }
        if let Some(presence) = self.state.presence.clone() {
            // Each user once, however many conversations are shared.
            let mut shown = HashSet::new();
            let visible: Vec<_> = convs
                .iter()
                .flat_map(|c| &c.others)
                .filter(|o| o.member.has_sent && !o.blocked)
                .filter(|o| shown.insert(o.member.user))
                .collect();
            // One question for all of them (one round trip to Redis).
            let users: Vec<UserId> = visible.iter().map(|o| o.member.user).collect();
            let online = presence.online(&users).await;
            for (other, online) in visible.into_iter().zip(online) {
                self.write_frame(&ServerFrame::Presence {
                    user: other.member.username.clone(),
                    online,
                    last_seen: if online { None } else { other.last_seen },
                })
                .await?;
            }
        }
        for c in &convs {
            if c.last_seq > c.device_delivered {
                self.fill_gap(c.conv, c.last_seq).await?;
            }
        }
        // Messages that arrived during the sync, noted by `absorb_queued`.
        loop {
            self.absorb_queued().await?;
            let Some((&conv, &to)) = self.catch_up.iter().next() else {
                break;
            };
            self.catch_up.remove(&conv);
            self.fill_gap(conv, to).await?;
        }
        self.syncing = false;
        self.write_frame(&ServerFrame::Synced).await?;
        self.flush().await
    }
}
