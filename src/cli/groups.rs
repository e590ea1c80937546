//! `confab group …` and `confab info`.

use clap::Subcommand;
use confab_protocol::Role;
use serde_json::json;

use super::Failure;
use super::output::{clock, json_line, safe};
use super::session::{Connected, Local};
use super::target::Target;

#[derive(Subcommand, Debug)]
pub enum GroupAction {
    /// Make a group with these members; you are its first admin.
    Create {
        name: String,
        #[arg(required = true)]
        members: Vec<String>,
    },
    /// Admins: add members to `#group`.
    Add {
        group: String,
        #[arg(required = true)]
        users: Vec<String>,
    },
    /// Admins: remove members from `#group`.
    Remove {
        group: String,
        #[arg(required = true)]
        users: Vec<String>,
    },
    /// Leave `#group` (what you saw stays readable).
    Leave { group: String },
    /// Admins: rename `#group`.
    Rename { group: String, name: String },
    /// Admins: make members admins of `#group`.
    Admin {
        group: String,
        #[arg(required = true)]
        users: Vec<String>,
    },
    /// The members of `#group` and their roles.
    Info {
        group: String,
        #[arg(long)]
        json: bool,
    },
}

/// A group named on the command line: `#name` (the `#` may be left out).
fn group_target(group: &str) -> Target {
    Target::Group(group.strip_prefix('#').unwrap_or(group).to_string())
}

pub async fn group(local: &Local, action: GroupAction) -> Result<(), Failure> {
    let client = Connected::open(local).await?.into_client();
    let refs = |users: &[String]| -> Vec<String> {
        users.iter().map(|u| u.to_ascii_lowercase()).collect()
    };
    let outcome = async {
        match &action {
            GroupAction::Create { name, members } => {
                let members = refs(members);
                let names: Vec<&str> = members.iter().map(String::as_str).collect();
                let sent = client.create_group(name, &names).await?;
                println!("made #{} (conversation {})", safe(name), sent.conv);
            }
            GroupAction::Add { group, users }
            | GroupAction::Remove { group, users }
            | GroupAction::Admin { group, users } => {
                let conv = group_target(group).conversation(&client).await?;
                let users = refs(users);
                let names: Vec<&str> = users.iter().map(String::as_str).collect();
                let (done, verb) = match &action {
                    GroupAction::Add { .. } => (client.add_members(conv, &names).await?, "added"),
                    GroupAction::Remove { .. } => {
                        (client.remove_members(conv, &names).await?, "removed")
                    }
                    _ => (client.make_admins(conv, &names).await?, "made admin"),
                };
                println!("{verb}: {} (event {})", safe(&names.join(", ")), done.seq);
            }
            GroupAction::Leave { group } => {
                let conv = group_target(group).conversation(&client).await?;
                client.leave_group(conv).await?;
                println!("you left {}", safe(group));
            }
            GroupAction::Rename { group, name } => {
                let conv = group_target(group).conversation(&client).await?;
                client.rename_group(conv, name).await?;
                println!("renamed to #{}", safe(name));
            }
            GroupAction::Info { group, json } => {
                let conv = group_target(group).conversation(&client).await?;
                let list = client.members(conv).await?;
                if *json {
                    json_line(json!({"conv": conv, "name": list.name, "members": list.items}));
                } else {
                    println!(
                        "#{} (conversation {conv}), {} members:",
                        safe(list.name.as_deref().unwrap_or("")),
                        list.items.len()
                    );
                    for m in &list.items {
                        let role = if m.role == Role::Admin { "  admin" } else { "" };
                        println!("  {}{role}", safe(&m.user));
                    }
                }
            }
        }
        Ok::<(), Failure>(())
    }
    .await;
    client.close().await;
    outcome
}

pub async fn info(local: &Local, conversation: &str, seq: i64, json: bool) -> Result<(), Failure> {
    let client = Connected::open(local).await?.into_client();
    let outcome = async {
        let conv = Target::parse(conversation).conversation(&client).await?;
        let items = client.info(conv, seq).await?;
        if json {
            json_line(json!({"conv": conv, "seq": seq, "members": items}));
            return Ok(());
        }
        let delivered = items.iter().filter(|i| i.delivered).count();
        let read = items.iter().filter(|i| i.read).count();
        let n = items.len();
        println!("message {seq}: delivered to {delivered} of {n}, read by {read} of {n}");
        let at = |t: Option<i64>| {
            t.map(|t| format!(" at {} UTC", clock(t)))
                .unwrap_or_default()
        };
        for i in &items {
            let state = match (i.delivered, i.read) {
                (_, true) => format!("read{}", at(i.read_at)),
                (true, false) => format!("delivered{}", at(i.delivered_at)),
                (false, _) => "not yet delivered".into(),
            };
            println!("  {:<20} {state}", safe(&i.user));
        }
        Ok(())
    }
    .await;
    client.close().await;
    outcome
}
