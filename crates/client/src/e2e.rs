//! End-to-end encryption on the client: this device's keys, the contacts'
//! device lists it has verified and pinned, and sealing and opening
//! messages (format in docs/encryption.md).
//!
//! Trust: the first device list seen for a user is pinned (trust on first
//! use, after checking its own chain of signatures). Later lists are
//! accepted silently only when each was signed by a device of the list
//! before it; anything else — a reset, a list the server changed, a bad
//! signature — is a *key change*, which is refused until the application
//! accepts it ([`E2e::accept_key_change`] or `accept_key_changes`).

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::Mutex;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use confab_crypto::{
    Content, DeviceEntry, DeviceKeys, DeviceList, Envelope, FileRef, LoginProof, MessageContext,
    PublicKeys, SignedDeviceList, verify_chain,
};
use confab_protocol::{
    ConversationId, DeviceDiff, DeviceId, LoginRequest, LoginResponse, Message, MessageId,
};
use serde::{Deserialize, Serialize};

use crate::{ClientError, ServerUrl, account};

/// This device: who it is and its private keys. The CLI keeps it in a file
/// only its user can read; nothing private ever leaves the device.
#[derive(Serialize, Deserialize, Clone)]
pub struct Identity {
    pub user: String,
    pub device: DeviceId,
    #[serde(with = "secret")]
    pub keys: DeviceKeys,
}

mod secret {
    use super::*;

    pub fn serialize<S: serde::Serializer>(keys: &DeviceKeys, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&URL_SAFE_NO_PAD.encode(keys.to_secret_bytes().as_slice()))
    }

    pub fn deserialize<'de, D: serde::Deserializer<'de>>(d: D) -> Result<DeviceKeys, D::Error> {
        let text = String::deserialize(d)?;
        let bytes: [u8; 64] = URL_SAFE_NO_PAD
            .decode(text)
            .ok()
            .and_then(|b| b.try_into().ok())
            .ok_or_else(|| serde::de::Error::custom("the secret keys are 64 bytes of base64url"))?;
        Ok(DeviceKeys::from_secret_bytes(&bytes))
    }
}

/// What the application should show loudly: a contact's devices changed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DevicesChanged {
    pub user: String,
    pub added: Vec<DeviceId>,
    pub removed: Vec<DeviceId>,
    /// Not a signed continuation of the pinned list: a reset, or a change
    /// the user's own devices did not sign. Until accepted, nothing is
    /// encrypted for this user and nothing from the new devices is shown.
    pub key_change: bool,
    /// Whether the change is now trusted (always for signed changes).
    pub accepted: bool,
}

/// A message this device could not open, and why. Receipts still work for it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Undecryptable {
    pub message: Message,
    pub reason: String,
}

/// Why a message was not opened.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum NotOpened {
    /// For good: it is shown as undecryptable, with this reason.
    Refused(String),
    /// Not now: the sender's device list could not be fetched (the server
    /// unreachable or busy). The message is not taken; it comes again.
    Unavailable(String),
}

impl From<String> for NotOpened {
    fn from(reason: String) -> Self {
        NotOpened::Refused(reason)
    }
}

/// A message as read from history: its text, or why it cannot be read.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Received {
    Text(Message),
    File(FileMessage),
    Undecryptable(Undecryptable),
    /// A membership event (`message.event`): written by the server, not
    /// encrypted.
    GroupChange(Message),
}

/// A message that carries a file: `message.body` is its caption (often
/// empty), `file` where the file is and the key that opens it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FileMessage {
    pub message: Message,
    pub file: FileRef,
}

impl FileMessage {
    /// Whether its sender deleted the file, or the server's retention did
    /// (known from `history` and catch-up pages, not from a live message).
    pub fn deleted(&self) -> bool {
        self.message.deleted_files.contains(&self.file.blob)
    }
}

impl Received {
    /// Who sent it, where and when (the body is the text when readable).
    pub fn message(&self) -> &Message {
        match self {
            Received::Text(m)
            | Received::File(FileMessage { message: m, .. })
            | Received::Undecryptable(Undecryptable { message: m, .. })
            | Received::GroupChange(m) => m,
        }
    }

    pub fn text(&self) -> Option<&str> {
        match self {
            Received::Text(m) | Received::File(FileMessage { message: m, .. }) => Some(&m.body),
            Received::Undecryptable(_) | Received::GroupChange(_) => None,
        }
    }
}

/// A contact's trusted devices.
#[derive(Serialize, Deserialize, Clone, Debug)]
struct Pin {
    /// The newest verified list: what messages are encrypted for.
    list: DeviceList,
    /// Every device ever verified for the user, so that older messages from
    /// since-removed devices can still be checked.
    known: BTreeMap<i64, PublicKeys>,
    /// A newer list that is a key change, waiting to be accepted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pending: Option<DeviceList>,
}

#[derive(Serialize, Deserialize, Default)]
struct Pins {
    users: BTreeMap<String, Pin>,
}

pub struct E2e {
    identity: Identity,
    server: ServerUrl,
    token: String,
    accept_key_changes: bool,
    /// Where pins are kept between runs (the CLI's contacts file).
    pins_file: Option<PathBuf>,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    pins: Pins,
    /// (sender device, message id) → where it was first accepted, so the
    /// same envelope stored again under another seq is rejected as a replay.
    seen: HashMap<(DeviceId, MessageId), (ConversationId, i64)>,
    notices: Vec<DevicesChanged>,
}

impl E2e {
    pub fn new(
        identity: Identity,
        server: ServerUrl,
        token: String,
        pins_file: Option<PathBuf>,
        accept_key_changes: bool,
    ) -> Result<Self, ClientError> {
        let pins = match &pins_file {
            Some(path) if path.exists() => {
                let text = std::fs::read_to_string(path)
                    .map_err(|e| ClientError::Io(format!("{}: {e}", path.display())))?;
                serde_json::from_str(&text)
                    .map_err(|e| ClientError::Protocol(format!("{}: {e}", path.display())))?
            }
            _ => Pins::default(),
        };
        Ok(Self {
            identity,
            server,
            token,
            accept_key_changes,
            pins_file,
            state: Mutex::new(State {
                pins,
                ..State::default()
            }),
        })
    }

    pub fn identity(&self) -> &Identity {
        &self.identity
    }

    /// Device-list changes seen since the last call, for the application
    /// to show.
    pub fn take_notices(&self) -> Vec<DevicesChanged> {
        std::mem::take(&mut self.lock().notices)
    }

    /// The user's devices as this device trusts them, refreshed from the
    /// server first when `refresh` is set (or nothing is pinned yet).
    pub async fn devices(&self, user: &str, refresh: bool) -> Result<DeviceList, ClientError> {
        let pinned = self.lock().pins.users.get(user).cloned();
        let Some(pin) = pinned else {
            let lists = self.fetch(user, Some(0)).await?;
            let list = trust_newest(&lists).map_err(|e| {
                ClientError::Crypto(format!("{user}'s device lists do not verify: {e}"))
            })?;
            self.pin(user, list.clone(), None);
            return Ok(list);
        };
        // A refresh looks again: the user may have changed the list since.
        if let Some(pending) = pin.pending.clone()
            && (!refresh || self.accept_key_changes)
        {
            if !self.accept_key_changes {
                return Err(key_change(user));
            }
            self.pin(user, pending.clone(), Some(&pin));
            return Ok(pending);
        }
        if !refresh {
            return Ok(pin.list);
        }
        let newer = self.fetch(user, Some(pin.list.epoch)).await?;
        if newer.is_empty() {
            return Ok(pin.list);
        }
        match verify_chain(&pin.list, &newer) {
            Ok(list) => {
                self.notice(user, &pin.list, &list, false, true);
                self.pin(user, list.clone(), Some(&pin));
                Ok(list)
            }
            Err(_) => {
                let Ok(candidate) = trust_newest(&newer) else {
                    // Not even signed by one of its own devices: nothing in
                    // it can be trusted, or accepted. Said as loudly as a
                    // key change, and refused the same way.
                    let newest = &newer[newer.len() - 1].list;
                    self.notice(user, &pin.list, newest, true, false);
                    return Err(key_change(user));
                };
                let accepted = self.accept_key_changes;
                self.notice(user, &pin.list, &candidate, true, accepted);
                if !accepted {
                    let mut state = self.lock();
                    if let Some(p) = state.pins.users.get_mut(user) {
                        p.pending = Some(candidate);
                    }
                    drop(state);
                    self.save();
                    return Err(key_change(user));
                }
                self.pin(user, candidate.clone(), Some(&pin));
                Ok(candidate)
            }
        }
    }

    /// A key change waiting to be accepted: the list it would trust.
    pub fn pending(&self, user: &str) -> Option<DeviceList> {
        self.lock().pins.users.get(user)?.pending.clone()
    }

    /// Trusts a key change that was refused before (the user compared the
    /// safety number, or decided to go on anyway).
    pub fn accept_key_change(&self, user: &str) -> bool {
        let mut state = self.lock();
        let Some(pin) = state.pins.users.get_mut(user) else {
            return false;
        };
        let Some(pending) = pin.pending.take() else {
            return false;
        };
        for d in &pending.devices {
            pin.known.insert(d.device, d.keys);
        }
        pin.list = pending;
        drop(state);
        self.save();
        true
    }

    /// Encrypts `content` for every device of `members` (this user
    /// included: its other devices read its history too).
    pub async fn seal(
        &self,
        conv: ConversationId,
        id: &MessageId,
        members: &[String],
        content: &Content,
        refresh: bool,
    ) -> Result<String, ClientError> {
        let mut recipients: Vec<DeviceEntry> = Vec::new();
        for user in members {
            recipients.extend(self.devices(user, refresh).await?.devices);
        }
        let ctx = MessageContext {
            conv: conv.0,
            message_id: id.as_str(),
            sender_device: self.identity.device.0,
        };
        let bytes = confab_crypto::seal(
            &ctx,
            &self.identity.keys,
            &recipients,
            &content.to_bytes(),
            &mut confab_crypto::os_rng(),
        )
        .map_err(|e| ClientError::Crypto(e.to_string()))?;
        Ok(URL_SAFE_NO_PAD.encode(bytes))
    }

    /// Verifies and decrypts a message for this device.
    pub async fn open(&self, message: &Message) -> Result<Content, NotOpened> {
        let bytes = URL_SAFE_NO_PAD
            .decode(&message.body)
            .map_err(|_| "not an envelope (bad base64url)".to_string())?;
        let envelope = Envelope::parse(&bytes).map_err(|e| format!("malformed envelope: {e}"))?;
        let sender = DeviceId(envelope.sender_device());
        if sender != message.from_device {
            return Err(NotOpened::Refused(format!(
                "signed by device {sender}, but the server says device {} sent it",
                message.from_device
            )));
        }
        let key = self.sender_key(&message.from, sender).await?;
        if let Some(&first) = self.lock().seen.get(&(sender, message.id.clone()))
            && first != (message.conv, message.seq)
        {
            return Err(NotOpened::Refused(format!(
                "replayed: this envelope was already accepted as message {} of conversation {}",
                first.1, first.0
            )));
        }
        let plaintext = envelope
            .open(
                message.conv.0,
                message.id.as_str(),
                self.identity.device.0,
                &self.identity.keys,
                &key.sign,
            )
            .map_err(|e| e.to_string())?;
        let content = Content::from_bytes(&plaintext).map_err(|e| e.to_string())?;
        self.lock()
            .seen
            .insert((sender, message.id.clone()), (message.conv, message.seq));
        Ok(content)
    }

    /// The signing key of a device of `user`. A device verified before is
    /// known even while a key change of its user waits for acceptance;
    /// an unknown one sends the client to fetch the user's lists once (the
    /// device may have been added since, or this is a first contact).
    async fn sender_key(&self, user: &str, device: DeviceId) -> Result<PublicKeys, NotOpened> {
        if let Some(keys) = self.known_key(user, device) {
            return Ok(keys);
        }
        let refreshed = self.devices(user, true).await;
        if let Some(keys) = self.known_key(user, device) {
            return Ok(keys);
        }
        Err(match refreshed {
            // The lists could not be fetched: nothing is known about the
            // device yet, so nothing may be concluded.
            Err(e) if e.is_transient() => {
                NotOpened::Unavailable(format!("cannot fetch {user}'s device list: {e}"))
            }
            Err(e) => NotOpened::Refused(format!("device {device} of {user} is not trusted: {e}")),
            Ok(_) => NotOpened::Refused(format!(
                "device {device} is not on {user}'s signed device list"
            )),
        })
    }

    fn known_key(&self, user: &str, device: DeviceId) -> Option<PublicKeys> {
        let state = self.lock();
        state.pins.users.get(user)?.known.get(&device.0).copied()
    }

    async fn fetch(
        &self,
        user: &str,
        after: Option<u64>,
    ) -> Result<Vec<SignedDeviceList>, ClientError> {
        account::device_lists(&self.server, &self.token, user, after).await
    }

    fn pin(&self, user: &str, list: DeviceList, old: Option<&Pin>) {
        let mut known = old.map(|p| p.known.clone()).unwrap_or_default();
        for d in &list.devices {
            known.insert(d.device, d.keys);
        }
        let pin = Pin {
            list,
            known,
            pending: None,
        };
        self.lock().pins.users.insert(user.to_string(), pin);
        self.save();
    }

    fn notice(
        &self,
        user: &str,
        old: &DeviceList,
        new: &DeviceList,
        key_change: bool,
        accepted: bool,
    ) {
        let ids = |l: &DeviceList| l.devices.iter().map(|d| d.device).collect::<Vec<_>>();
        let diff = DeviceDiff::between(&ids(new), &ids(old));
        // A device that stays but with other keys is, for trust, a new one.
        let rekeyed = new
            .devices
            .iter()
            .filter(|d| old.get(d.device).is_some_and(|o| o.keys != d.keys));
        let mut added = diff.missing;
        added.extend(rekeyed.map(|d| DeviceId(d.device)));
        self.lock().notices.push(DevicesChanged {
            user: user.to_string(),
            added,
            removed: diff.extra,
            key_change,
            accepted,
        });
    }

    fn save(&self) {
        let Some(path) = &self.pins_file else {
            return;
        };
        let text = serde_json::to_string_pretty(&self.lock().pins).expect("pins serialize");
        let tmp = path.with_extension("tmp");
        // Whom the user talks to is private: readable by the owner alone.
        let write = || -> std::io::Result<()> {
            use std::io::Write;
            use std::os::unix::fs::OpenOptionsExt;
            let mut file = std::fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o600)
                .open(&tmp)?;
            file.write_all(text.as_bytes())?;
            std::fs::rename(&tmp, path)
        };
        if let Err(e) = write() {
            tracing::warn!(error = %e, path = %path.display(), "cannot save pinned device lists");
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().expect("e2e state poisoned")
    }
}

/// Whether this device may send yet.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Enrollment {
    /// On its user's signed device list.
    Listed,
    /// Waiting for another device of the user to approve it (`confab
    /// devices approve <id>` there), or for a reset.
    Pending,
}

/// Logs in with this device's public keys. With `existing` (from an earlier
/// login of the same user), the device and its keys are kept; otherwise a
/// new device is made with fresh keys.
pub async fn login(
    server: &ServerUrl,
    username: &str,
    password: &str,
    existing: Option<Identity>,
    device_name: Option<&str>,
) -> Result<(LoginResponse, Identity), ClientError> {
    let existing = existing.filter(|i| i.user == username.to_ascii_lowercase());
    let (device, keys) = match existing {
        Some(identity) => (Some(identity.device), identity.keys),
        None => (None, DeviceKeys::generate(&mut confab_crypto::os_rng())),
    };
    // A device the account knows proves it, so that password guessing
    // elsewhere cannot lock it out.
    let proof = device.map(|d| {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_millis() as i64;
        LoginProof::new(&keys, username, d.0, now)
    });
    let request = LoginRequest {
        username: username.into(),
        password: password.into(),
        device,
        device_name: device_name.map(str::to_string),
        keys: Some(keys.public()),
        proof,
    };
    let login = account::login_with(server, &request).await?;
    let identity = Identity {
        user: login.user.clone(),
        device: login.device,
        keys,
    };
    Ok((login, identity))
}

impl E2e {
    /// Puts this device on its user's list when it can do so alone: as the
    /// first device of a user who has no list yet.
    pub async fn enroll(&self) -> Result<Enrollment, ClientError> {
        let me = &self.identity;
        let newest = self.fetch(&me.user, None).await?;
        if newest.is_empty() {
            let list = DeviceList {
                user: me.user.clone(),
                epoch: 1,
                devices: vec![self.own_entry()],
            };
            self.publish(list).await?;
            return Ok(Enrollment::Listed);
        }
        let own = self.devices(&me.user, true).await?;
        Ok(if own.devices.iter().any(|d| d.device == me.device.0) {
            Enrollment::Listed
        } else {
            Enrollment::Pending
        })
    }

    /// The public keys the server holds for one of this user's devices.
    /// They come from the server: show [`confab_crypto::fingerprint`] of
    /// them and have the user compare it with what the new device shows
    /// before [`E2e::approve`].
    pub async fn device_keys(&self, device: DeviceId) -> Result<PublicKeys, ClientError> {
        account::devices(&self.server, &self.token)
            .await?
            .iter()
            .find(|d| d.device == device)
            .and_then(|d| d.keys)
            .ok_or_else(|| {
                ClientError::Usage(format!(
                    "device {device} is not a device of yours with keys (has it logged in?)"
                ))
            })
    }

    /// Adds one of this user's new devices, with these keys, to the list.
    pub async fn approve(&self, device: DeviceId, keys: PublicKeys) -> Result<(), ClientError> {
        let mut list = self.devices(&self.identity.user, true).await?;
        list.devices.retain(|d| d.device != device.0);
        list.devices.push(DeviceEntry {
            device: device.0,
            keys,
        });
        list.devices.sort_by_key(|d| d.device);
        list.epoch = list.epoch.saturating_add(1);
        self.publish(list).await
    }

    /// Takes a device off the list; the server then removes it and ends its
    /// sessions. This device may remove itself.
    pub async fn remove(&self, device: DeviceId) -> Result<(), ClientError> {
        let mut list = self.devices(&self.identity.user, true).await?;
        let before = list.devices.len();
        list.devices.retain(|d| d.device != device.0);
        if list.devices.len() == before {
            return Err(ClientError::Usage(format!(
                "device {device} is not on your device list"
            )));
        }
        if list.devices.is_empty() {
            return Err(ClientError::Usage(
                "this is your only device; use a reset from a new device instead".into(),
            ));
        }
        list.epoch = list.epoch.saturating_add(1);
        self.publish(list).await
    }

    /// For a user who lost every other device: the list starts over with
    /// only this one. Every contact sees a key change.
    pub async fn reset(&self, password: &str) -> Result<(), ClientError> {
        let me = &self.identity;
        let newest = self.fetch(&me.user, None).await?;
        let epoch = newest.last().map_or(0, |l| l.list.epoch).saturating_add(1);
        let list = DeviceList {
            user: me.user.clone(),
            epoch,
            devices: vec![self.own_entry()],
        };
        let signed = self.sign(list.clone())?;
        account::reset_devices(&self.server, &self.token, password, &signed).await?;
        self.pin(&me.user, list, None);
        Ok(())
    }

    fn own_entry(&self) -> DeviceEntry {
        DeviceEntry {
            device: self.identity.device.0,
            keys: self.identity.keys.public(),
        }
    }

    fn sign(&self, list: DeviceList) -> Result<SignedDeviceList, ClientError> {
        list.sign(self.identity.device.0, &self.identity.keys)
            .map_err(|e| ClientError::Crypto(e.to_string()))
    }

    async fn publish(&self, list: DeviceList) -> Result<(), ClientError> {
        let signed = self.sign(list.clone())?;
        account::post_device_list(&self.server, &self.token, &signed).await?;
        let old = self.lock().pins.users.get(&self.identity.user).cloned();
        self.pin(&self.identity.user, list, old.as_ref());
        Ok(())
    }
}

impl std::fmt::Debug for E2e {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("E2e")
            .field("user", &self.identity.user)
            .field("device", &self.identity.device)
            .finish_non_exhaustive()
    }
}

fn key_change(user: &str) -> ClientError {
    ClientError::KeyChanged(user.to_string())
}

/// The newest list of `lists` (oldest first) that a chain of signatures
/// supports: it follows, link by link, from a self-signed list (a user's
/// first list, or a reset). The server cannot make one up without a
/// device's private key.
pub fn trust_newest(lists: &[SignedDeviceList]) -> Result<DeviceList, confab_crypto::CryptoError> {
    let mut last_error = confab_crypto::CryptoError::BadList("the user has no device list yet");
    for start in (0..lists.len()).rev() {
        let root = &lists[start];
        if let Err(e) = root.verify_self_signed() {
            last_error = e;
            continue;
        }
        match verify_chain(&root.list, &lists[start + 1..]) {
            Ok(list) => return Ok(list),
            Err(e) => last_error = e,
        }
    }
    Err(last_error)
}
