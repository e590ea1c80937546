//! How the CLI shows things: times, notices, JSON lines.

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
