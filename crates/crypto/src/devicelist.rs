//! Each user's list of devices, signed by one of that user's devices. Clients
//! pin a user's list and accept a change only when a device already on the
//! pinned list signed it, so a server cannot slip in a device of its own.

use serde::{Deserialize, Serialize};

use crate::keys::verify;
use crate::{CryptoError, DeviceKeys, PublicKeys};

/// Most devices one user may have.
pub const MAX_DEVICES: usize = 256;
/// Longest user name, in bytes.
pub const MAX_USER_LEN: usize = 64;

const LABEL: &[u8] = b"confab-devices-v1";

/// One device and its public keys. JSON: `{"device":3,"sign":"..","kem":".."}`.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct DeviceEntry {
    /// The device id.
    pub device: i64,
    /// Its keys.
    #[serde(flatten)]
    pub keys: PublicKeys,
}

/// A user's devices at one epoch. The epoch goes up by one with every change.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceList {
    /// The user's name, 1 to 64 bytes.
    pub user: String,
    /// Version of the list; each successor has the next epoch.
    pub epoch: u64,
    /// 1 to 256 devices, strictly ascending by id.
    pub devices: Vec<DeviceEntry>,
}

/// A device list with the signature of one device. JSON: the list's fields,
/// then `"signer"` (a device id) and `"signature"` (base64url).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SignedDeviceList {
    /// The list that was signed.
    #[serde(flatten)]
    pub list: DeviceList,
    /// The device that signed it.
    pub signer: i64,
    /// Ed25519 signature over [`DeviceList::signing_bytes`].
    #[serde(with = "crate::b64")]
    pub signature: [u8; 64],
}

impl DeviceList {
    /// Checks the shape rules: user 1–64 bytes, 1–256 devices, ids strictly ascending.
    pub fn validate(&self) -> Result<(), CryptoError> {
        if self.user.is_empty() || self.user.len() > MAX_USER_LEN {
            return Err(CryptoError::BadList("user must be 1 to 64 bytes"));
        }
        if self.devices.is_empty() || self.devices.len() > MAX_DEVICES {
            return Err(CryptoError::BadList("need 1 to 256 devices"));
        }
        if self.devices.windows(2).any(|w| w[0].device >= w[1].device) {
            return Err(CryptoError::BadList("devices not strictly ascending"));
        }
        Ok(())
    }

    /// The bytes a signature covers: `"confab-devices-v1"` || u8 len(user) ||
    /// user || u64 epoch || u32 count || per device: i64 id || sign (32) ||
    /// kem (32). Integers big-endian. Call on a validated list.
    pub fn signing_bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(LABEL.len() + 77 + self.devices.len() * 72);
        out.extend_from_slice(LABEL);
        out.push(self.user.len() as u8);
        out.extend_from_slice(self.user.as_bytes());
        out.extend_from_slice(&self.epoch.to_be_bytes());
        out.extend_from_slice(&(self.devices.len() as u32).to_be_bytes());
        for entry in &self.devices {
            out.extend_from_slice(&entry.device.to_be_bytes());
            out.extend_from_slice(&entry.keys.sign);
            out.extend_from_slice(&entry.keys.kem);
        }
        out
    }

    /// The entry for `device`, if listed.
    pub fn get(&self, device: i64) -> Option<&DeviceEntry> {
        self.devices.iter().find(|e| e.device == device)
    }

    /// Signs the list as device `signer`, whose private keys are `keys`.
    pub fn sign(self, signer: i64, keys: &DeviceKeys) -> Result<SignedDeviceList, CryptoError> {
        self.validate()?;
        let signature = keys.sign(&self.signing_bytes());
        Ok(SignedDeviceList {
            list: self,
            signer,
            signature,
        })
    }
}

impl SignedDeviceList {
    /// Accepts a list that vouches for itself: its signer is one of its own
    /// devices. For a user's first list, and for a reset.
    pub fn verify_self_signed(&self) -> Result<(), CryptoError> {
        self.list.validate()?;
        self.verify_signed_by(&self.list)
    }

    /// Accepts a list as the one after `prev`: same user, next epoch, signed by
    /// a device on `prev` under its key in `prev` (the signer may have left the
    /// new list).
    pub fn verify_successor(&self, prev: &DeviceList) -> Result<(), CryptoError> {
        self.list.validate()?;
        if self.list.user != prev.user {
            return Err(CryptoError::WrongUser);
        }
        let expected = prev
            .epoch
            .checked_add(1)
            .ok_or(CryptoError::BadList("epoch exhausted"))?;
        if self.list.epoch != expected {
            return Err(CryptoError::EpochNotNext {
                expected,
                got: self.list.epoch,
            });
        }
        self.verify_signed_by(prev)
    }

    fn verify_signed_by(&self, approvers: &DeviceList) -> Result<(), CryptoError> {
        let signer = approvers
            .get(self.signer)
            .ok_or(CryptoError::UnknownSigner)?;
        if verify(
            &signer.keys.sign,
            &self.list.signing_bytes(),
            &self.signature,
        ) {
            Ok(())
        } else {
            Err(CryptoError::BadSignature)
        }
    }
}

/// Walks from a pinned list through `newer` (consecutive epochs, oldest
/// first), each approved by the one before, and returns the newest list.
pub fn verify_chain(
    pinned: &DeviceList,
    newer: &[SignedDeviceList],
) -> Result<DeviceList, CryptoError> {
    let mut current = pinned;
    for next in newer {
        next.verify_successor(current)?;
        current = &next.list;
    }
    Ok(current.clone())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys::test_keys;

    fn list(epoch: u64, devices: &[i64]) -> DeviceList {
        DeviceList {
            user: "bob".into(),
            epoch,
            devices: devices
                .iter()
                .map(|&d| test_keys(d as u8).entry(d))
                .collect(),
        }
    }

    fn signed(epoch: u64, devices: &[i64], signer: i64) -> SignedDeviceList {
        list(epoch, devices)
            .sign(signer, &test_keys(signer as u8))
            .unwrap()
    }

    #[test]
    fn self_signed_list_verifies_and_has_documented_json() {
        let first = signed(1, &[1, 2], 1);
        first.verify_self_signed().unwrap();
        assert_eq!(
            signed(1, &[1, 2], 3).verify_self_signed(),
            Err(CryptoError::UnknownSigner)
        );

        let json = serde_json::to_value(&first).unwrap();
        let keys = |v: &serde_json::Value| {
            let mut k: Vec<String> = v.as_object().unwrap().keys().cloned().collect();
            k.sort();
            k
        };
        assert_eq!(
            keys(&json),
            ["devices", "epoch", "signature", "signer", "user"]
        );
        assert_eq!(keys(&json["devices"][0]), ["device", "kem", "sign"]);
        assert_eq!(json["epoch"], 1);
        let back: SignedDeviceList = serde_json::from_value(json).unwrap();
        assert_eq!(back, first);
    }

    #[test]
    fn successor_rules() {
        let prev = list(1, &[1, 2]);
        // Device 2 approves a list without itself.
        signed(2, &[1, 3], 2).verify_successor(&prev).unwrap();
        assert_eq!(
            signed(2, &[1, 3], 3).verify_successor(&prev),
            Err(CryptoError::UnknownSigner)
        );
        assert_eq!(
            signed(3, &[1, 2], 1).verify_successor(&prev),
            Err(CryptoError::EpochNotNext {
                expected: 2,
                got: 3
            })
        );
        let mut other = list(2, &[1]);
        other.user = "mallory".into();
        let other = other.sign(1, &test_keys(1)).unwrap();
        assert_eq!(other.verify_successor(&prev), Err(CryptoError::WrongUser));

        // Swapping a key after signing breaks the signature.
        let mut swapped = signed(2, &[1, 2], 1);
        swapped.list.devices[1].keys = test_keys(9).public();
        assert_eq!(
            swapped.verify_successor(&prev),
            Err(CryptoError::BadSignature)
        );
        assert_eq!(swapped.verify_self_signed(), Err(CryptoError::BadSignature));
    }

    #[test]
    fn shape_rules() {
        let mut bad = list(1, &[2, 1]);
        assert!(matches!(
            bad.clone().sign(1, &test_keys(1)),
            Err(CryptoError::BadList(_))
        ));
        bad.devices.clear();
        assert!(matches!(bad.validate(), Err(CryptoError::BadList(_))));
        let mut dup = signed(1, &[1, 2], 1);
        dup.list.devices[1].device = 1;
        assert!(matches!(
            dup.verify_self_signed(),
            Err(CryptoError::BadList(_))
        ));
        let mut long = list(1, &[1]);
        long.user = "x".repeat(65);
        assert!(matches!(long.validate(), Err(CryptoError::BadList(_))));
    }

    #[test]
    fn chain_over_three_epochs() {
        let pinned = list(1, &[1]);
        let newer = [
            signed(2, &[1, 2], 1),
            signed(3, &[2, 3], 2),
            signed(4, &[3], 3),
        ];
        assert_eq!(verify_chain(&pinned, &newer).unwrap(), list(4, &[3]));
        assert_eq!(verify_chain(&pinned, &[]).unwrap(), pinned);
        // Device 1 left at epoch 3, so it cannot approve epoch 4.
        let forged = [newer[0].clone(), newer[1].clone(), signed(4, &[1], 1)];
        assert_eq!(
            verify_chain(&pinned, &forged),
            Err(CryptoError::UnknownSigner)
        );
        assert!(matches!(
            verify_chain(&pinned, &[newer[0].clone(), newer[2].clone()]),
            Err(CryptoError::EpochNotNext {
                expected: 3,
                got: 4
            })
        ));
    }
}
