//! What a group change does, decided once for every store: given the
//! group's current members (read under the conversation's lock, inside the
//! commit), which rows change and which event the change writes. The
//! stores only read the members and apply the steps.

use std::collections::BTreeSet;

use confab_protocol::{ConvEvent, ConvKind, Role};

use crate::{Appended, GroupChange, GroupRefusal, NewGroupEvent, UserId};

/// A current member as a group change sees it.
#[derive(Clone, Debug)]
pub(crate) struct Current {
    pub user: UserId,
    pub username: String,
    pub role: Role,
    pub joined_seq: i64,
}

/// One row change of a group change.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Step {
    /// Becomes a current member seeing the messages after `joined_seq` (a
    /// former member starts a new span).
    Join {
        user: UserId,
        role: Role,
        joined_seq: i64,
    },
    /// Sees nothing after this change's seq.
    Leave(UserId),
    Promote(UserId),
    Rename(String),
}

/// Why a change may not be made.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Refused {
    NotMember,
    Group(GroupRefusal),
}

impl From<Refused> for Appended {
    fn from(refused: Refused) -> Self {
        match refused {
            Refused::NotMember => Appended::NotMember,
            Refused::Group(why) => Appended::Group(why),
        }
    }
}

/// The group as the change finds it.
pub(crate) struct Group<'a> {
    /// `None` for a change that creates the group.
    pub kind: Option<ConvKind>,
    pub name: Option<&'a str>,
    pub current: &'a [Current],
}

/// The event and the steps of `ev` on `group`, whose event takes `seq`; or
/// why it may not be made (nothing is written then).
pub(crate) fn plan(
    ev: &NewGroupEvent,
    group: &Group<'_>,
    seq: i64,
) -> Result<(ConvEvent, Vec<Step>), Refused> {
    let refuse = |why| Err(Refused::Group(why));
    let before = group.current;
    if let GroupChange::Create { name, members } = &ev.change {
        let members: Vec<_> = dedup(members)
            .into_iter()
            .filter(|(u, _)| *u != ev.actor)
            .collect();
        if members.len() + 1 > ev.max_members as usize {
            return refuse(GroupRefusal::TooManyMembers);
        }
        let mut steps = vec![Step::Join {
            user: ev.actor,
            role: Role::Admin,
            joined_seq: 0,
        }];
        steps.extend(members.iter().map(|(user, _)| Step::Join {
            user: *user,
            role: Role::Member,
            joined_seq: 0,
        }));
        let mut names = vec![ev.actor_name.clone()];
        names.extend(members.into_iter().map(|(_, name)| name));
        return Ok((
            ConvEvent::Created {
                name: name.clone(),
                members: names,
            },
            steps,
        ));
    }
    if group.kind != Some(ConvKind::Group) {
        return refuse(GroupRefusal::NotAGroup);
    }
    let Some(me) = before.iter().find(|m| m.user == ev.actor) else {
        return Err(Refused::NotMember);
    };
    if me.role != Role::Admin && !matches!(ev.change, GroupChange::Leave) {
        return refuse(GroupRefusal::NotAdmin);
    }
    let is_current = |user: UserId| before.iter().any(|m| m.user == user);
    let names = |users: Vec<(UserId, String)>| users.into_iter().map(|(_, name)| name).collect();
    Ok(match &ev.change {
        GroupChange::Create { .. } => unreachable!("handled above"),
        GroupChange::Add(users) => {
            let new: Vec<_> = dedup(users)
                .into_iter()
                .filter(|(u, _)| !is_current(*u))
                .collect();
            if new.is_empty() {
                return refuse(GroupRefusal::NoChange);
            }
            if before.len() + new.len() > ev.max_members as usize {
                return refuse(GroupRefusal::TooManyMembers);
            }
            // Sees its own `added` event and what follows.
            let steps = new
                .iter()
                .map(|(user, _)| Step::Join {
                    user: *user,
                    role: Role::Member,
                    joined_seq: seq - 1,
                })
                .collect();
            (ConvEvent::Added { users: names(new) }, steps)
        }
        GroupChange::Remove(users) => {
            let gone: Vec<_> = dedup(users)
                .into_iter()
                .filter(|(u, _)| is_current(*u) && *u != ev.actor)
                .collect();
            if gone.is_empty() {
                return refuse(GroupRefusal::NoChange);
            }
            let steps = gone.iter().map(|(user, _)| Step::Leave(*user)).collect();
            (ConvEvent::Removed { users: names(gone) }, steps)
        }
        GroupChange::Leave => {
            let mut steps = vec![Step::Leave(ev.actor)];
            let rest: Vec<&Current> = before.iter().filter(|m| m.user != ev.actor).collect();
            // A group is never left without an admin: the member who has
            // been in it longest takes over.
            let mut admins = Vec::new();
            if !rest.iter().any(|m| m.role == Role::Admin)
                && let Some(next) = rest.iter().min_by_key(|m| (m.joined_seq, m.user))
            {
                steps.push(Step::Promote(next.user));
                admins.push(next.username.clone());
            }
            (ConvEvent::Left { admins }, steps)
        }
        GroupChange::Rename(name) => {
            if group.name == Some(name.as_str()) {
                return refuse(GroupRefusal::NoChange);
            }
            (
                ConvEvent::Renamed { name: name.clone() },
                vec![Step::Rename(name.clone())],
            )
        }
        GroupChange::MakeAdmins(users) => {
            let promoted: Vec<_> = dedup(users)
                .into_iter()
                .filter(|(u, _)| {
                    before
                        .iter()
                        .any(|m| m.user == *u && m.role == Role::Member)
                })
                .collect();
            if promoted.is_empty() {
                return refuse(GroupRefusal::NoChange);
            }
            let steps = promoted.iter().map(|(u, _)| Step::Promote(*u)).collect();
            (
                ConvEvent::Admins {
                    users: names(promoted),
                },
                steps,
            )
        }
    })
}

/// Who gets the change's event: everyone before and after it (the removed
/// see their removal, the added their addition), ascending.
pub(crate) fn audience(before: &[Current], steps: &[Step]) -> Vec<UserId> {
    let mut members: BTreeSet<UserId> = before.iter().map(|m| m.user).collect();
    members.extend(steps.iter().filter_map(|s| match s {
        Step::Join { user, .. } => Some(*user),
        _ => None,
    }));
    members.into_iter().collect()
}

/// Each user once, in the order given.
fn dedup(users: &[(UserId, String)]) -> Vec<(UserId, String)> {
    let mut seen = BTreeSet::new();
    users
        .iter()
        .filter(|(u, _)| seen.insert(*u))
        .cloned()
        .collect()
}
