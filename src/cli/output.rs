//! How the CLI shows things: times, notices, JSON lines, and text from the
//! network made safe for a terminal.
//!
//! Anything that came from the network (message text, names, reasons,
//! error messages) goes through [`safe`] before it reaches the terminal,
//! and JSON lines through [`json_line`]: a peer must not be able to move
//! the cursor, clear the screen, set the window title or reorder text
//! with escape sequences or bidirectional controls.

use std::borrow::Cow;

use confab_client::Event;
use confab_client::e2e::{DevicesChanged, Received, Undecryptable};
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
    notify_text(m, &safe(&m.body));
}

fn notify_text(m: &Message, text: &str) {
    eprintln!(
        "new message from {} ({} UTC): {text}",
        safe(&m.from),
        clock(m.ts)
    );
}

/// Shows on stderr what a command that is busy with something else should
/// not swallow: new messages, unreadable ones, device and key changes.
pub fn notify(event: &Event) {
    match event {
        Event::Message(m) => notify_message(m),
        Event::File(f) => {
            let text = super::messages::display_text(&Received::File(f.clone()));
            notify_text(&f.message, &text);
        }
        Event::Undecryptable(u) => notify_undecryptable(u),
        Event::DevicesChanged(change) => notify_devices(change),
        _ => {}
    }
}

pub fn notify_undecryptable(u: &Undecryptable) {
    eprintln!(
        "a message from {} ({} UTC) cannot be read: {}",
        safe(&u.message.from),
        clock(u.message.ts),
        safe(&u.reason)
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
    let user = safe(&c.user);
    if !c.key_change {
        return format!("* {user} {what} (signed by one of their devices)");
    }
    let then = if c.accepted {
        "accepted because of --accept-key-change"
    } else {
        "nothing is sent to them until you accept it"
    };
    format!(
        "!! KEY CHANGE: {user}'s devices changed without a signature from their old devices ({what}). \
         Compare safety numbers with `confab keys {user}`; {then}."
    )
}

/// One JSON value per line. JSON escapes C0 controls itself; DEL, C1
/// controls (U+009B is a CSI to some terminals) and bidirectional controls
/// are escaped here too, so the line is the same JSON and still harmless
/// when a script's output ends up on a terminal.
pub fn json_line(value: serde_json::Value) {
    println!("{}", json_text(&value));
}

pub fn json_text(value: &serde_json::Value) -> String {
    let text = value.to_string();
    if !text.chars().any(unsafe_char) {
        return text;
    }
    let mut escaped = String::with_capacity(text.len() + 16);
    for c in text.chars() {
        if unsafe_char(c) {
            // Only inside strings: JSON's own syntax is ASCII without controls.
            escaped.push_str(&format!("\\u{:04x}", c as u32));
        } else {
            escaped.push(c);
        }
    }
    escaped
}

/// Text from the network as it may be shown on a terminal: C0 controls and
/// DEL as their visible symbols (␛ for ESC), C1, bidirectional and line
/// separator controls as `<U+XXXX>`. A newline becomes a newline and an
/// indent, so a message cannot start a line that looks like another one.
pub fn safe(text: &str) -> Cow<'_, str> {
    if !text.chars().any(|c| unsafe_char(c) || c.is_control()) {
        return Cow::Borrowed(text);
    }
    let mut shown = String::with_capacity(text.len() + 16);
    for c in text.chars() {
        match c {
            '\n' => shown.push_str("\n    "),
            '\t' => shown.push(' '),
            '\u{0}'..='\u{1f}' => shown.push(char::from_u32(0x2400 + c as u32).unwrap_or('?')),
            '\u{7f}' => shown.push('\u{2421}'),
            c if unsafe_char(c) => shown.push_str(&format!("<U+{:04X}>", c as u32)),
            c => shown.push(c),
        }
    }
    Cow::Owned(shown)
}

/// DEL, C1 controls, and what `is_hidden_or_bidi` names: nothing a
/// terminal should get raw from a peer (C0 controls are handled apart).
fn unsafe_char(c: char) -> bool {
    matches!(c, '\u{7f}'..='\u{9f}') || confab_protocol::text::is_hidden_or_bidi(c)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escape_sequences_from_the_network_are_made_visible() {
        let evil = "x\u{1b}]0;pwned\u{7}\u{1b}[2J\u{9b}31m\u{202e}abc\r\u{7f}";
        let shown = safe(evil);
        assert_eq!(shown, "x␛]0;pwned␇␛[2J<U+009B>31m<U+202E>abc␍␡");
        assert!(!shown.chars().any(|c| c.is_control()));
        assert_eq!(safe("two\nlines"), "two\n    lines");
        assert!(matches!(safe("plain ✓ text"), Cow::Borrowed(_)));
    }

    #[test]
    fn json_lines_stay_exact_and_carry_no_raw_controls() {
        let evil = "x\u{1b}]0;\u{7}\u{9b}\u{202e}\u{7f}y";
        let line = json_text(&serde_json::json!({"text": evil}));
        assert!(
            !line.chars().any(|c| c.is_control() || unsafe_char(c)),
            "{line}"
        );
        let back: serde_json::Value = serde_json::from_str(&line).unwrap();
        assert_eq!(back["text"], evil);
    }

    #[test]
    fn clock_is_utc_hours_and_minutes() {
        assert_eq!(clock(0), "00:00");
        assert_eq!(clock((13 * 60 + 7) * 60_000 + 59_999), "13:07");
        assert_eq!(clock(86_400_000 + 60_000), "00:01");
    }
}
