//! Finds live publishes that never reached a connected device.
//!
//! The hub carries committed messages to connections, and a publish can be
//! lost on its way (between nodes later; through a test hook today). Every
//! `Config::repair_interval`, this task reads, in one store query per 500
//! users, the head of every conversation of every user connected to this
//! node, and hands each connection its user's heads as an event. The
//! connection writes whatever it lacks up to them, in order, as for a gap
//! (`connection/order.rs`, `repair`). One query per node per interval
//! instead of one per connection: 19,000 idle connections cost one read,
//! not 19,000 (docs/performance.md). Each node checks its own connections
//! against the shared store, so the same task serves several nodes.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use confab_protocol::ConversationId;
use confab_store::UserId;

use crate::AppState;
use crate::hub::Event;

/// Users per store read.
const USERS_PER_READ: usize = 500;
/// The shortest interval honoured, whatever the configuration says.
const MIN_INTERVAL: Duration = Duration::from_millis(100);

pub async fn run(state: AppState) {
    let interval = state.config.repair_interval.max(MIN_INTERVAL);
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    ticker.tick().await;
    loop {
        tokio::select! {
            _ = state.shutdown.cancelled() => return,
            _ = ticker.tick() => check(&state).await,
        }
    }
}

/// One round: every connected user's heads to its connections.
async fn check(state: &AppState) {
    let users = state.hub.users();
    for chunk in users.chunks(USERS_PER_READ) {
        let rows = match state.store.heads(chunk).await {
            Ok(rows) => rows,
            Err(e) => {
                // The next round tries again.
                tracing::warn!(error = %e, "repair check postponed");
                return;
            }
        };
        let mut by_user: HashMap<UserId, Vec<(ConversationId, i64)>> = HashMap::new();
        for (user, conv, head) in rows {
            by_user.entry(user).or_default().push((conv, head));
        }
        for (user, heads) in by_user {
            state.hub.deliver(user, &Event::Heads(Arc::from(heads)));
        }
    }
}
