//! The commands that do one thing with messages and end: send,
//! conversations, history, block, settings.

use std::collections::BTreeMap;
use std::time::Duration;

use confab_client::Event;
use confab_client::e2e::{Received, Undecryptable};
use confab_protocol::Message;
use serde_json::json;

use super::Failure;
use super::output::{self, clock, json_line, safe};
use super::session::{Connected, Local};
use super::target::Target;

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum WaitFor {
    Delivered,
    Read,
}

pub async fn send(
    local: &Local,
    user: &str,
    text: String,
    wait: Option<WaitFor>,
    timeout_secs: u64,
    json: bool,
) -> Result<(), Failure> {
    let mut c = Connected::open(local).await?;
    for event in c.backlog.drain(..) {
        output::notify(&event);
    }
    c.shown();
    let target = Target::parse(user);
    let conv = target.conversation(&c.client).await?;
    // Whose receipts the wait counts: the peer, or every other member.
    let others: Vec<String> = match &target {
        Target::User(peer) => vec![peer.clone()],
        Target::Group(_) => {
            let me = c.client.welcome().user.clone();
            let members = c.client.members(conv).await?.items;
            members
                .into_iter()
                .map(|m| m.user)
                .filter(|u| *u != me)
                .collect()
        }
    };
    let sent = c.client.send(conv, text).await;
    for notice in c.e2e.take_notices() {
        output::notify_devices(&notice);
    }
    let sent = sent?;
    let mut status = "sent";
    let mut have: BTreeMap<String, (i64, i64)> = BTreeMap::new();
    if let Some(wait) = wait {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(timeout_secs);
        loop {
            let event = tokio::time::timeout_at(deadline, c.events.recv())
                .await
                .map_err(|_| {
                    Failure::timed_out(
                        format!("stored, but not {wait:?} within {timeout_secs} s").to_lowercase(),
                    )
                })?;
            match event {
                Some(Event::Receipt {
                    conv: c2,
                    user,
                    delivered,
                    read,
                }) if c2 == conv && others.contains(&user) => {
                    let cursors = have.entry(user).or_default();
                    cursors.0 = cursors.0.max(delivered);
                    cursors.1 = cursors.1.max(read.unwrap_or(0));
                    // In a group: once every other member has it (read it).
                    let all = |f: &dyn Fn(&(i64, i64)) -> bool| {
                        have.len() == others.len() && have.values().all(f)
                    };
                    if all(&|c| c.1 >= sent.seq) {
                        status = "read";
                    } else if all(&|c| c.0 >= sent.seq) && wait == WaitFor::Delivered {
                        status = "delivered";
                    }
                    if status != "sent" {
                        break;
                    }
                }
                Some(Event::Closed(_)) | None => {
                    return Err(Failure::other(
                        "stored, but the connection closed while waiting",
                    ));
                }
                Some(event) => {
                    output::notify(&event);
                    c.shown();
                }
            }
        }
    }
    if json {
        json_line(
            json!({"id": sent.id, "conv": sent.conv, "seq": sent.seq, "ts": sent.ts, "status": status}),
        );
    } else {
        println!("{status}: message {} to {target}", sent.seq);
    }
    c.client.close().await;
    Ok(())
}

pub async fn conversations(local: &Local, json: bool) -> Result<(), Failure> {
    let client = Connected::open(local).await?.into_client();
    let list = client.conversations().await?;
    if json {
        json_line(serde_json::to_value(&list).map_err(anyhow::Error::from)?);
    } else if list.is_empty() {
        println!("no conversations yet; start one with `confab send <user> <text>`");
    } else {
        print_conversations(&list);
    }
    client.close().await;
    Ok(())
}

fn print_conversations(list: &[confab_protocol::ConversationSummary]) {
    for item in list {
        let last = item
            .last_ts
            .map(|t| format!("last {} UTC", clock(t)))
            .unwrap_or_default();
        let request = if item.request { "  (request)" } else { "" };
        let who = match item.kind {
            confab_protocol::ConvKind::Direct => safe(&item.peer).into_owned(),
            confab_protocol::ConvKind::Group => {
                let name = safe(item.name.as_deref().unwrap_or("")).into_owned();
                match item.left {
                    true => format!("#{name} (you left)"),
                    false => format!("#{name} ({} members)", item.members),
                }
            }
        };
        println!("{who:<30} {:>4} unread  {last}{request}", item.unread);
    }
}

/// The conversations others started that the user has not accepted.
pub async fn requests(local: &Local, json: bool) -> Result<(), Failure> {
    let client = Connected::open(local).await?.into_client();
    let list: Vec<_> = client
        .conversations()
        .await?
        .into_iter()
        .filter(|c| c.request)
        .collect();
    if json {
        json_line(serde_json::to_value(&list).map_err(anyhow::Error::from)?);
    } else if list.is_empty() {
        println!("no message requests");
    } else {
        print_conversations(&list);
        println!("`confab accept <user>` or a reply accepts one; `confab block <user>` stops it");
    }
    client.close().await;
    Ok(())
}

/// Accepts `user`'s request. Looked up among the conversations, not
/// opened: opening would start a conversation with someone who never wrote.
pub async fn accept(local: &Local, user: &str) -> Result<(), Failure> {
    let client = Connected::open(local).await?.into_client();
    let name = user.to_ascii_lowercase();
    let found = client
        .conversations()
        .await?
        .into_iter()
        .find(|c| c.peer == name);
    let outcome = match found {
        Some(c) if c.request => {
            client.accept(c.conv).await?;
            println!("accepted {user}: they now see your receipts");
            Ok(())
        }
        Some(_) => {
            println!("{user} is not a message request: you have accepted them already");
            Ok(())
        }
        None => Err(Failure::other(format!("no message request from {user}"))),
    };
    client.close().await;
    outcome
}

pub async fn history(
    local: &Local,
    user: &str,
    limit: u32,
    before: Option<i64>,
    json: bool,
) -> Result<(), Failure> {
    let client = Connected::open(local).await?.into_client();
    let conv = Target::parse(user).conversation(&client).await?;
    let messages = client.history(conv, before, limit).await?;
    for r in &messages {
        let m = r.message();
        if json {
            json_line(received_json(r));
        } else {
            println!(
                "#{:<5} {} {}: {}",
                m.seq,
                clock(m.ts),
                safe(&m.from),
                display_text(r)
            );
        }
    }
    client.close().await;
    Ok(())
}

pub async fn block(local: &Local, user: &str, on: bool) -> Result<(), Failure> {
    let client = Connected::open(local).await?.into_client();
    if on {
        client.block(user).await?;
        println!("blocked {user}");
    } else {
        client.unblock(user).await?;
        println!("unblocked {user}");
    }
    client.close().await;
    Ok(())
}

pub async fn settings(local: &Local, read_receipts: Option<bool>) -> Result<(), Failure> {
    let connected = Connected::open(local).await?;
    let mut now = connected.client.welcome().settings;
    let client = connected.into_client();
    if let Some(on) = read_receipts {
        client.set_read_receipts(on).await?;
        now = Some(confab_protocol::Settings { read_receipts: on });
    }
    match now {
        Some(s) => println!(
            "read receipts: {}",
            if s.read_receipts { "on" } else { "off" }
        ),
        None => println!("this server does not tell its settings"),
    }
    client.close().await;
    Ok(())
}

fn message_json(m: &Message) -> serde_json::Value {
    json!({"event": "message", "conv": m.conv, "seq": m.seq, "id": m.id, "from": m.from, "ts": m.ts, "text": m.body})
}

/// The text of a message, or why it cannot be read, safe for a terminal.
pub fn display_text(r: &Received) -> String {
    match r {
        Received::Text(m) => safe(&m.body).into_owned(),
        Received::File(f) => {
            let file = &f.file;
            let picture = if file.thumbnail.is_some() {
                ", with a thumbnail"
            } else {
                ""
            };
            let what = if f.deleted() { "file deleted" } else { "file" };
            let about = format!(
                "[{what}: {} ({}, {} bytes{picture})]",
                safe(&file.name),
                safe(&file.media_type),
                file.size
            );
            match f.message.body.is_empty() {
                true => about,
                false => format!("{about} {}", safe(&f.message.body)),
            }
        }
        Received::Undecryptable(u) => format!("[cannot be read: {}]", safe(&u.reason)),
        Received::GroupChange(m) => format!("[{}]", group_change_text(m)),
    }
}

/// What a membership event says, safe for a terminal: "added bob, carol".
pub fn group_change_text(m: &Message) -> String {
    use confab_protocol::ConvEvent;
    let list = |users: &[String]| {
        users
            .iter()
            .map(|u| safe(u).into_owned())
            .collect::<Vec<_>>()
            .join(", ")
    };
    match &m.event {
        Some(ConvEvent::Created { name, members }) => {
            format!("made the group {:?} with {}", safe(name), list(members))
        }
        Some(ConvEvent::Added { users }) => format!("added {}", list(users)),
        Some(ConvEvent::Removed { users }) => format!("removed {}", list(users)),
        Some(ConvEvent::Left { admins }) if admins.is_empty() => "left".into(),
        Some(ConvEvent::Left { admins }) => format!("left; {} now admin", list(admins)),
        Some(ConvEvent::Renamed { name }) => format!("renamed the group {:?}", safe(name)),
        Some(ConvEvent::Admins { users }) => format!("made {} admin", list(users)),
        None => String::new(),
    }
}

fn undecryptable_json(u: &Undecryptable) -> serde_json::Value {
    let m = &u.message;
    json!({"event": "undecryptable", "conv": m.conv, "seq": m.seq, "id": m.id, "from": m.from, "ts": m.ts, "reason": u.reason})
}

pub fn received_json(r: &Received) -> serde_json::Value {
    match r {
        Received::Text(m) => message_json(m),
        Received::File(f) => {
            let (m, file) = (&f.message, &f.file);
            json!({"event": "file", "conv": m.conv, "seq": m.seq, "id": m.id, "from": m.from, "ts": m.ts, "text": m.body,
                   "file": {"name": file.name, "media_type": file.media_type, "size": file.size, "thumbnail": file.thumbnail.is_some(),
                            "deleted": f.deleted()}})
        }
        Received::Undecryptable(u) => undecryptable_json(u),
        Received::GroupChange(m) => {
            json!({"event": "group", "conv": m.conv, "seq": m.seq, "id": m.id, "from": m.from, "ts": m.ts, "change": m.event,
                   "text": group_change_text(m)})
        }
    }
}
