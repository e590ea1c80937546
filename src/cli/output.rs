//! How the CLI shows things: times, notices, JSON lines.

use confab_client::Event;
use confab_client::e2e::{DevicesChanged, Undecryptable};
use confab_protocol::Message;

pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// `14:05` in UTC: the CLI avoids guessing a time zone.
pub fn clock(ts_ms: i64) -> String {
    let minutes = ts_ms.div_euclid(60_000).rem_euclid(24 * 60);
    format!("{:02}:{:02}", minutes / 60, minutes % 60)
}

pub fn ago(ts_ms: i64) -> String {
    let seconds = (now_ms() - ts_ms).max(0) / 1000;
    match seconds {
        0..=59 => "just now".into(),
        60..=3599 => format!("{} min ago", seconds / 60),
        3600..=86_399 => format!("{} h ago", seconds / 3600),
        _ => format!("{} days ago", seconds / 86_400),
    }
}

/// A message that arrived while a command did something else.
pub fn notify_message(m: &Message) {
    eprintln!(
        "new message from {} ({} UTC): {}",
        m.from,
        clock(m.ts),
        m.body
    );
}

/// Shows on stderr what a command that is busy with something else should
/// not swallow: new messages, unreadable ones, device and key changes.
pub fn notify(event: &Event) {
    match event {
        Event::Message(m) => notify_message(m),
        Event::Undecryptable(u) => notify_undecryptable(u),
        Event::DevicesChanged(change) => notify_devices(change),
        _ => {}
    }
}

pub fn notify_undecryptable(u: &Undecryptable) {
    eprintln!(
        "a message from {} ({} UTC) cannot be read: {}",
        u.message.from,
        clock(u.message.ts),
        u.reason
    );
}

/// Device changes are said loudly: a key change may be someone listening in.
pub fn notify_devices(change: &DevicesChanged) {
    eprintln!("{}", describe_devices(change));
}

pub fn describe_devices(c: &DevicesChanged) -> String {
    let ids = |v: &[confab_protocol::DeviceId]| {
        v.iter()
            .map(|d| d.to_string())
            .collect::<Vec<_>>()
            .join(", ")
    };
    let mut what = Vec::new();
    if !c.added.is_empty() {
        what.push(format!("added device {}", ids(&c.added)));
    }
    if !c.removed.is_empty() {
        what.push(format!("removed device {}", ids(&c.removed)));
    }
    let what = what.join(" and ");
    if !c.key_change {
        return format!("* {} {what} (signed by one of their devices)", c.user);
    }
    let then = if c.accepted {
        "accepted because of --accept-key-change"
    } else {
        "nothing is sent to them until you accept it"
    };
    format!(
        "!! KEY CHANGE: {}'s devices changed without a signature from their old devices ({what}). \
         Compare safety numbers with `confab keys {}`; {then}.",
        c.user, c.user
    )
}

pub fn json_line(value: serde_json::Value) {
    println!("{value}");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clock_is_utc_hours_and_minutes() {
        assert_eq!(clock(0), "00:00");
        assert_eq!(clock((13 * 60 + 7) * 60_000 + 59_999), "13:07");
        assert_eq!(clock(86_400_000 + 60_000), "00:01");
    }
}
