//! Safety numbers: 60 digits two users read to each other to confirm that each
//! sees the other's real devices.

use sha2::{Digest, Sha512};

use crate::DeviceList;

/// The safety number of two users' device lists: 12 groups of 5 digits.
///
/// For each user, `fp = SHA-512("confab-safety-v1" || u8 len(user) || user ||
/// per device ascending: i64 id || sign || kem)`; its first 30 bytes, as six
/// 5-byte big-endian integers each taken mod 100000 and zero-padded, give 30
/// digits. The two users' digits are concatenated in ascending byte order of
/// user name (then of the digits, should the names be equal), so both sides
/// compute the same number: `safety_number(a, b) == safety_number(b, a)`.
/// Any change of device or key on either side changes it.
pub fn safety_number(a: &DeviceList, b: &DeviceList) -> String {
    let mut halves = [
        (a.user.as_bytes(), digits(a)),
        (b.user.as_bytes(), digits(b)),
    ];
    halves.sort();
    let all = format!("{}{}", halves[0].1, halves[1].1);
    let groups: Vec<&str> = (0..12).map(|i| &all[i * 5..i * 5 + 5]).collect();
    groups.join(" ")
}

fn digits(list: &DeviceList) -> String {
    let mut hash = Sha512::new()
        .chain_update(b"confab-safety-v1")
        .chain_update([list.user.len() as u8])
        .chain_update(list.user.as_bytes());
    for entry in &list.devices {
        hash.update(entry.device.to_be_bytes());
        hash.update(entry.keys.sign);
        hash.update(entry.keys.kem);
    }
    let fp = hash.finalize();
    fp[..30]
        .chunks(5)
        .map(|c| {
            let n = c.iter().fold(0u64, |n, &b| n << 8 | u64::from(b));
            format!("{:05}", n % 100_000)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys::test_keys;

    fn list(user: &str, seeds: &[u8]) -> DeviceList {
        let devices = seeds
            .iter()
            .map(|&s| test_keys(s).entry(s.into()))
            .collect();
        DeviceList {
            user: user.into(),
            epoch: 1,
            devices,
        }
    }

    #[test]
    fn symmetric_and_sensitive_to_every_key() {
        let (alice, bob) = (list("alice", &[1, 2]), list("bob", &[3]));
        let n = safety_number(&alice, &bob);
        assert_eq!(n, safety_number(&bob, &alice));
        assert_eq!(n.len(), 71);
        assert!(
            n.split(' ')
                .all(|g| g.len() == 5 && g.bytes().all(|b| b.is_ascii_digit()))
        );
        // Ordered by user name: alice's 30 digits come first whatever the argument order.
        assert_eq!(n.replace(' ', "")[..30], digits(&alice));

        let mut changed = Vec::new();
        for i in 0..2 {
            for part in 0..2 {
                let mut a = alice.clone();
                let key = &mut a.devices[i].keys;
                [&mut key.sign, &mut key.kem][part][0] ^= 1;
                changed.push(safety_number(&a, &bob));
            }
        }
        let mut b = bob.clone();
        b.devices[0].device = 4;
        changed.push(safety_number(&alice, &b));
        changed.push(safety_number(&alice, &list("bob", &[3, 4])));
        assert!(changed.iter().all(|c| *c != n), "{changed:?}");
    }
}
