//! Whom a command talks to: a user (their one-to-one conversation) or a
//! group, written `#name` (or `#<conversation id>` when names collide).

use confab_client::Client;
use confab_protocol::{ConvKind, ConversationId};

use super::Failure;

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Target {
    User(String),
    Group(String),
}

impl Target {
    pub fn parse(text: &str) -> Target {
        match text.strip_prefix('#') {
            Some(group) => Target::Group(group.to_string()),
            None => Target::User(text.to_ascii_lowercase()),
        }
    }

    pub fn is_group(&self) -> bool {
        matches!(self, Target::Group(_))
    }

    /// A name for files kept per conversation (the chat's outbox): only
    /// characters safe in a file name.
    pub fn file_key(&self) -> String {
        match self {
            Target::User(user) => user.clone(),
            Target::Group(name) => {
                let hex: String = name.bytes().map(|b| format!("{b:02x}")).collect();
                format!("group-{hex}")
            }
        }
    }

    /// The conversation: a user's is opened (made on first use); a group
    /// is looked up among this user's conversations.
    pub async fn conversation(&self, client: &Client) -> Result<ConversationId, Failure> {
        let name = match self {
            Target::User(user) => return Ok(client.open(user).await?),
            Target::Group(name) => name,
        };
        let groups: Vec<_> = client
            .conversations()
            .await?
            .into_iter()
            .filter(|c| c.kind == ConvKind::Group)
            .collect();
        let named: Vec<_> = groups
            .iter()
            .filter(|c| c.name.as_deref() == Some(name.as_str()))
            .collect();
        match named.as_slice() {
            [one] => return Ok(one.conv),
            [] => {}
            many => {
                let ids: Vec<String> = many.iter().map(|c| format!("#{}", c.conv)).collect();
                return Err(Failure::other(format!(
                    "{} groups are named {name:?}: name one by its number ({})",
                    many.len(),
                    ids.join(", ")
                )));
            }
        }
        if let Ok(id) = name.parse::<i64>()
            && let Some(group) = groups.iter().find(|c| c.conv.0 == id)
        {
            return Ok(group.conv);
        }
        Err(Failure::other(format!(
            "you are in no group named {name:?} (`confab conversations` lists them)"
        )))
    }
}

impl std::fmt::Display for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Target::User(user) => f.write_str(user),
            Target::Group(name) => write!(f, "#{name}"),
        }
    }
}
