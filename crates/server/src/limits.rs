//! Every bound on what one user or one address can make the server hold or
//! do: open connections, password attempts, registrations, new devices,
//! message rate and bytes per day.
//!
//! This is the one place that keeps the counts: open connections and
//! uploads in this node's memory (they are this node's to hold; with
//! Redis, a user's uploads on every node together too, `held.rs`, and its
//! sockets are summed over the nodes by presence), and the short-term
//! rates (`rates.rs`: in memory, or in Redis for every node together). Daily allowances (message bytes, new conversations) are
//! counted by the store, in the commits that use them, so that they hold
//! for every node on one database together and across restarts; this
//! module only says what they are. Callers only see "take a slot" and
//! "may this happen now", never how the counts are kept.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use confab_store::{Store, UserId};

use crate::rates::Rate;
pub use crate::rates::Shared;

/// The limits, as configured. Rates are "N per period, N at once".
#[derive(Clone, Debug)]
pub struct LimitsConfig {
    /// Open TCP connections in all; `None`: just below the open-files limit.
    pub max_connections: Option<usize>,
    /// Open sockets of one device; a new one closes the device's oldest.
    pub connections_per_device: usize,
    /// Open sockets of one user, all devices together.
    pub connections_per_user: usize,
    /// Open sockets from one client address (an IPv6 /64 counts as one).
    pub connections_per_address: usize,
    /// Upload requests (`PATCH`) of one user at once, each holding up to one
    /// part in memory.
    pub uploads_per_user: usize,
    /// Password checks (login, password change, device reset) per account
    /// from one address, per hour.
    pub password_attempts_per_account_address: u32,
    /// Password checks per account from all addresses, per hour. A login
    /// that proves a device key the account already has is not counted.
    pub password_attempts_per_account: u32,
    /// Password checks from one address, all accounts together, per hour.
    pub password_attempts_per_address: u32,
    /// New accounts from one address, per hour.
    pub registrations_per_address: u32,
    /// New devices (logins without a known device) from one address, per hour.
    pub new_devices_per_address: u32,
    /// Devices of one account not yet on its signed list.
    pub pending_devices_per_account: usize,
    /// Messages one user may send per second (all its connections), and
    /// the burst above that.
    pub messages_per_second: u32,
    pub message_burst: u32,
    /// Message body bytes one user may send per UTC day (counted by the
    /// store).
    pub bytes_per_day: u64,
    /// Messages one may send into a conversation the other has not
    /// accepted yet (a message request).
    pub request_messages: u32,
    /// Conversations one user may start per UTC day (each is a request
    /// for the other until answered; counted by the store).
    pub new_conversations_per_day: u32,
    /// Members a group may have, its creator included. Each message is
    /// sealed for every device of every member (docs/encryption.md), so
    /// this bounds what one message costs.
    pub max_group_members: u32,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        Self::DEFAULT
    }
}

impl LimitsConfig {
    pub const DEFAULT: Self = Self {
        max_connections: None,
        connections_per_device: 4,
        connections_per_user: 16,
        connections_per_address: 256,
        uploads_per_user: 4,
        password_attempts_per_account_address: 10,
        password_attempts_per_account: 100,
        password_attempts_per_address: 300,
        registrations_per_address: 20,
        new_devices_per_address: 60,
        pending_devices_per_account: 10,
        messages_per_second: 20,
        message_burst: 200,
        bytes_per_day: 100 * 1024 * 1024,
        request_messages: 3,
        new_conversations_per_day: 50,
        max_group_members: 100,
    };
}

/// A client address as the limits count it: an IPv4 address, or the /64 an
/// IPv6 address is in (one subscriber usually holds a whole /64).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Address(IpAddr);

impl Address {
    pub fn new(ip: IpAddr) -> Self {
        match ip {
            IpAddr::V4(_) => Self(ip),
            IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
                Some(v4) => Self(IpAddr::V4(v4)),
                None => {
                    let prefix = u128::from(v6) & !((1u128 << 64) - 1);
                    Self(IpAddr::V6(prefix.into()))
                }
            },
        }
    }
}

impl std::fmt::Display for Address {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.0 {
            IpAddr::V6(v6) => write!(f, "{v6}/64"),
            v4 => v4.fmt(f),
        }
    }
}

/// What is counted while it is open.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum Counted {
    /// TCP connections, upgraded or not.
    Tcp,
    TcpFrom(Address),
    /// WebSockets.
    Sockets,
    SocketsFrom(Address),
    SocketsOf(UserId),
    /// Upload requests being written.
    UploadsOf(UserId),
}

/// Which limit refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Over {
    Server,
    Address,
    User,
    Uploads,
}

impl Over {
    pub fn message(self) -> &'static str {
        match self {
            Over::Server => "the server has reached its connection limit; retry later",
            Over::Address => "too many connections from your address; close some and retry",
            Over::User => "too many connections for this account; close some and retry",
            Over::Uploads => "too many uploads at once for this account; finish one and retry",
        }
    }
}

/// A place counted for as long as this lives.
#[derive(Debug)]
pub struct Slot {
    limits: Arc<Limits>,
    counted: Vec<Counted>,
    /// Also counted in Redis for every node (`held.rs`): what and whose.
    held: Option<(&'static str, UserId)>,
}

impl Slot {
    /// Holds `other`'s counts too, released with this slot's.
    pub fn merge(&mut self, mut other: Slot) {
        self.counted.append(&mut other.counted);
        self.held = self.held.or(other.held.take());
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        if let Some((kind, user)) = self.held
            && let Some(held) = self.limits.held().cloned()
            && let Ok(runtime) = tokio::runtime::Handle::try_current()
        {
            runtime.spawn(async move { held.release(kind, user).await });
        }
        let mut open = self.limits.open.lock().expect("limits poisoned");
        for c in &self.counted {
            if let Some(n) = open.get_mut(c) {
                *n -= 1;
                if *n == 0 {
                    open.remove(c);
                }
            }
        }
    }
}

/// Refused for now; worth trying again after this long.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RetryAfter(pub Duration);

/// Plain HTTP connections kept free of WebSockets in all and per address,
/// so that health checks, logins and the refusals themselves get through
/// when sockets fill every other place.
const HTTP_RESERVE: usize = 64;
const HTTP_RESERVE_PER_ADDRESS: usize = 16;

pub struct Limits {
    config: LimitsConfig,
    max_connections: usize,
    open: Mutex<HashMap<Counted, usize>>,
    /// Where the rates are counted for every node; `None`: by this node.
    shared: Option<Shared>,
    passwords_pair: Rate<(String, Address)>,
    passwords_account: Rate<String>,
    passwords_address: Rate<Address>,
    registrations: Rate<Address>,
    new_devices: Rate<Address>,
    messages: Rate<UserId>,
}

impl std::fmt::Debug for Limits {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Limits")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

const HOUR: Duration = Duration::from_secs(3600);

impl Limits {
    /// The limits of one node; with `shared`, rates are counted in Redis
    /// for every node together.
    pub fn new(config: LimitsConfig, max_connections: usize, shared: Option<Shared>) -> Arc<Self> {
        let per_second = Duration::from_secs(1) / config.messages_per_second.max(1);
        Arc::new(Self {
            max_connections,
            open: Mutex::default(),
            shared,
            passwords_pair: Rate::per(
                "pw-pair",
                HOUR,
                config.password_attempts_per_account_address,
            ),
            passwords_account: Rate::per("pw-account", HOUR, config.password_attempts_per_account),
            passwords_address: Rate::per("pw-address", HOUR, config.password_attempts_per_address),
            registrations: Rate::per("registration", HOUR, config.registrations_per_address),
            new_devices: Rate::per("new-device", HOUR, config.new_devices_per_address),
            messages: Rate::new("message", per_second, config.message_burst),
            config,
        })
    }

    pub fn config(&self) -> &LimitsConfig {
        &self.config
    }

    /// Counts every key in `wanted` up by one if none is at its limit.
    fn take(self: &Arc<Self>, wanted: &[(Counted, usize, Over)]) -> Result<Slot, Over> {
        let mut open = self.open.lock().expect("limits poisoned");
        for &(counted, limit, over) in wanted {
            if open.get(&counted).copied().unwrap_or(0) >= limit {
                return Err(over);
            }
        }
        for (counted, _, _) in wanted {
            *open.entry(*counted).or_default() += 1;
        }
        Ok(Slot {
            limits: self.clone(),
            counted: wanted.iter().map(|w| w.0).collect(),
            held: None,
        })
    }

    /// A new TCP connection. `from` is `None` for a trusted proxy, whose
    /// connections carry many clients (each counted when it opens a socket).
    pub fn tcp(self: &Arc<Self>, from: Option<Address>) -> Result<Slot, Over> {
        let all = (Counted::Tcp, self.max_connections, Over::Server);
        match from {
            Some(a) => self.take(&[all, self.per_address(a)]),
            None => self.take(&[all]),
        }
    }

    /// A TCP connection from `from`, already counted in all (a client
    /// a proxy's PROXY header named after the proxy's socket was taken).
    pub fn tcp_from(self: &Arc<Self>, from: Address) -> Result<Slot, Over> {
        self.take(&[self.per_address(from)])
    }

    fn per_address(&self, from: Address) -> (Counted, usize, Over) {
        (
            Counted::TcpFrom(from),
            self.config.connections_per_address + HTTP_RESERVE_PER_ADDRESS,
            Over::Address,
        )
    }

    /// A WebSocket from `from`, before it authenticates.
    pub fn socket(self: &Arc<Self>, from: Address) -> Result<Slot, Over> {
        let sockets = self.max_connections.saturating_sub(HTTP_RESERVE).max(1);
        self.take(&[
            (Counted::Sockets, sockets, Over::Server),
            (
                Counted::SocketsFrom(from),
                self.config.connections_per_address,
                Over::Address,
            ),
        ])
    }

    /// An authenticated socket of `user`.
    pub fn user_socket(self: &Arc<Self>, user: UserId) -> Result<Slot, Over> {
        self.take(&[(
            Counted::SocketsOf(user),
            self.config.connections_per_user,
            Over::User,
        )])
    }

    /// An upload request of `user`, while it is written: counted on this
    /// node, and with Redis on all nodes together (while Redis cannot be
    /// asked, on this node alone).
    pub async fn upload(self: &Arc<Self>, user: UserId) -> Result<Slot, Over> {
        let limit = self.config.uploads_per_user;
        let mut slot = self.take(&[(Counted::UploadsOf(user), limit, Over::Uploads)])?;
        if let Some(held) = self.held() {
            match held.take("uploads", user, limit).await {
                Ok(true) => slot.held = Some(("uploads", user)),
                Ok(false) => return Err(Over::Uploads),
                Err(e) => {
                    tracing::debug!(error = %e, "uploads counted by this node alone");
                }
            }
        }
        Ok(slot)
    }

    fn held(&self) -> Option<&crate::held::Held> {
        self.shared.as_ref()?.held.as_ref()
    }

    /// A password is about to be checked for `account` (as typed, for
    /// accounts that do not exist too, so that the answer does not say which
    /// exist). `known_device`: the client proved a key of one of the
    /// account's devices, so the account-wide limit, which an attacker
    /// elsewhere could exhaust, does not apply.
    pub async fn password_attempt(
        &self,
        account: &str,
        from: Address,
        known_device: bool,
    ) -> Result<(), RetryAfter> {
        let account = account.to_ascii_lowercase();
        let shared = self.shared.as_ref();
        self.passwords_address.check(shared, &from, from).await?;
        let pair = (account.clone(), from);
        self.passwords_pair
            .check(shared, &pair, format!("{account}:{from}"))
            .await?;
        if !known_device {
            self.passwords_account
                .check(shared, &account, &account)
                .await?;
        }
        Ok(())
    }

    pub async fn registration(&self, from: Address) -> Result<(), RetryAfter> {
        self.registrations
            .check(self.shared.as_ref(), &from, from)
            .await
    }

    pub async fn new_device(&self, from: Address) -> Result<(), RetryAfter> {
        self.new_devices
            .check(self.shared.as_ref(), &from, from)
            .await
    }

    /// One message or group change from `user`, within its rate.
    pub async fn message(&self, user: UserId) -> Result<(), RetryAfter> {
        self.messages
            .check(self.shared.as_ref(), &user, user.0)
            .await
    }

    /// Forgets rate-limit state that is back to full, so that the maps
    /// hold only keys seen lately. Called now and then.
    pub fn sweep(&self) {
        self.passwords_pair.retain_recent();
        self.passwords_account.retain_recent();
        self.passwords_address.retain_recent();
        self.registrations.retain_recent();
        self.new_devices.retain_recent();
        self.messages.retain_recent();
    }
}

/// Sweeps the limits every minute, and the store's usage of past days,
/// until `shutdown`.
pub async fn sweep(
    limits: Arc<Limits>,
    store: Arc<dyn Store>,
    shutdown: tokio_util::sync::CancellationToken,
) {
    let mut ticker = tokio::time::interval(Duration::from_secs(60));
    loop {
        tokio::select! {
            _ = ticker.tick() => {
                limits.sweep();
                if let Err(e) = store.forget_old_usage().await {
                    tracing::warn!(error = %e, "cannot forget past days' usage");
                }
            }
            _ = shutdown.cancelled() => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(config: LimitsConfig) -> Arc<Limits> {
        Limits::new(config, 1000, None)
    }

    #[test]
    fn ipv6_addresses_count_by_their_64() {
        let a = Address::new("2001:db8:1:2:aaaa::1".parse().unwrap());
        let b = Address::new("2001:db8:1:2:bbbb::9".parse().unwrap());
        let c = Address::new("2001:db8:1:3::1".parse().unwrap());
        assert_eq!(a, b);
        assert_ne!(a, c);
        let mapped = Address::new("::ffff:10.0.0.1".parse().unwrap());
        assert_eq!(mapped, Address::new("10.0.0.1".parse().unwrap()));
    }

    #[test]
    fn slots_free_their_place_when_dropped() {
        let l = limits(LimitsConfig {
            connections_per_user: 2,
            ..Default::default()
        });
        let first = l.user_socket(UserId(1)).unwrap();
        let _second = l.user_socket(UserId(1)).unwrap();
        assert_eq!(l.user_socket(UserId(1)).unwrap_err(), Over::User);
        assert!(
            l.user_socket(UserId(2)).is_ok(),
            "another user is not affected"
        );
        drop(first);
        assert!(l.user_socket(UserId(1)).is_ok());
    }

    #[test]
    fn a_proxied_connection_holds_its_address_until_the_whole_slot_goes() {
        let l = limits(LimitsConfig {
            connections_per_address: 1,
            ..Default::default()
        });
        let a = Address::new("203.0.113.7".parse().unwrap());
        let per_address = 1 + HTTP_RESERVE_PER_ADDRESS;
        // The proxy's socket, then the client its header names.
        let mut slot = l.tcp(None).unwrap();
        let mut held = Vec::new();
        for _ in 0..per_address {
            let mut more = l.tcp(None).unwrap();
            more.merge(l.tcp_from(a).unwrap());
            held.push(more);
        }
        assert_eq!(l.tcp_from(a).unwrap_err(), Over::Address);
        slot.merge(
            l.tcp_from(Address::new("203.0.113.8".parse().unwrap()))
                .unwrap(),
        );
        drop(held.pop());
        let again = l.tcp_from(a).unwrap();
        drop((slot, again, held));
        assert!(l.open.lock().unwrap().is_empty(), "every count released");
    }

    #[test]
    fn a_refused_slot_counts_nothing() {
        let l = limits(LimitsConfig {
            connections_per_address: 1,
            ..Default::default()
        });
        let a = Address::new("10.0.0.1".parse().unwrap());
        let _held = l.socket(a).unwrap();
        assert_eq!(l.socket(a).unwrap_err(), Over::Address);
        assert_eq!(l.open.lock().unwrap()[&Counted::Sockets], 1);
    }

    #[tokio::test]
    async fn a_known_device_skips_the_account_limit_only() {
        let l = limits(LimitsConfig {
            password_attempts_per_account: 2,
            ..Default::default()
        });
        let addrs: Vec<Address> = (1..=3)
            .map(|i| Address::new(format!("10.0.0.{i}").parse().unwrap()))
            .collect();
        assert!(l.password_attempt("alice", addrs[0], false).await.is_ok());
        assert!(l.password_attempt("Alice", addrs[1], false).await.is_ok());
        assert!(l.password_attempt("alice", addrs[2], false).await.is_err());
        assert!(l.password_attempt("alice", addrs[2], true).await.is_ok());
        assert!(l.password_attempt("bob", addrs[2], false).await.is_ok());
    }
}
