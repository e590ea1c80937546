//! Account commands: register, login, logout, devices, password.

use std::io::{IsTerminal, Write};

use confab_client::e2e::{self, Enrollment};
use confab_client::{ClientError, ServerUrl, account};
use confab_crypto::{DeviceList, fingerprint, safety_number};
use confab_protocol::DeviceId;
use serde_json::json;

use super::backoff::Backoff;
use super::session::{self, Local, Session, read_password};
use super::{DevicesAction, Failure, output};

/// Retries a call the server refused with `busy` (all its password-hash
/// slots taken), with backoff, for about 8 s in all.
async fn while_busy<T, F, Fut>(mut call: F) -> Result<T, ClientError>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, ClientError>>,
{
    let mut backoff = Backoff::default();
    for _ in 0..5 {
        match call().await {
            Err(e) if e.code() == Some(confab_protocol::ErrorCode::Busy) => {
                tokio::time::sleep(backoff.next()).await;
            }
            other => return other,
        }
    }
    call().await
}

pub async fn register(server: &str, username: &str) -> Result<(), Failure> {
    let url = ServerUrl::parse(server)?;
    let password = read_password("password: ", "CONFAB_PASSWORD")?;
    let name = while_busy(|| account::register(&url, username, &password)).await?;
    let name = output::safe(&name);
    println!("registered {name} on {server}; now run `confab login {name}`");
    Ok(())
}

pub async fn login(
    local: &Local,
    server: &str,
    username: &str,
    device_name: &str,
) -> Result<(), Failure> {
    let dir = &local.dir;
    let url = ServerUrl::parse(server)?;
    let password = read_password("password: ", "CONFAB_PASSWORD")?;
    // Keep this client's device and keys when it logged in here before as
    // the same user on the same server (also after a logout, which keeps
    // them). Another account's keys and pinned contacts do not carry over.
    let same = Session::load_any(dir)
        .is_some_and(|s| s.server == server && s.user.eq_ignore_ascii_case(username));
    if !same {
        session::forget_identity(dir);
    }
    let existing = session::load_identity(dir)?;
    let (login, identity) = while_busy(|| {
        e2e::login(
            &url,
            username,
            &password,
            existing.clone(),
            Some(device_name),
        )
    })
    .await?;
    session::save_identity(dir, &identity)?;
    let session = Session {
        server: server.to_string(),
        user: login.user.clone(),
        device: login.device,
        token: login.token,
        expires_at: login.expires_at,
    };
    session.save(dir)?;
    let kind = if login.new_device {
        "new device"
    } else {
        "device"
    };
    let e2e = local.e2e(&session)?;
    match e2e.enroll().await? {
        Enrollment::Listed => println!(
            "logged in as {} ({kind} {})",
            output::safe(&login.user),
            login.device
        ),
        Enrollment::Pending => println!(
            "logged in as {user} ({kind} {id}), waiting for approval.\n\
             On one of your other devices run `confab devices approve {id}` and check that it \
             shows this fingerprint: {fp}\n\
             Lost all your other devices? `confab devices reset` starts over with this one \
             (your contacts will see a key change).",
            user = output::safe(&login.user),
            id = login.device,
            fp = fingerprint(&e2e.identity().keys.public()),
        ),
    }
    Ok(())
}

pub async fn logout(local: &Local) -> Result<(), Failure> {
    let dir = &local.dir;
    let session = local.session()?;
    let url = session.url()?;
    let listed = account::devices(&url, &session.token)
        .await?
        .iter()
        .any(|d| d.current && d.listed);
    account::logout(&url, &session.token).await?;
    if listed {
        session.clone().logged_out(dir)?;
        println!(
            "logged out; device {} stays on your device list with its keys (`confab login` \
             here gets it back, `confab devices remove {}` elsewhere removes it)",
            session.device, session.device
        );
    } else {
        Session::forget(dir);
        session::forget_identity(dir);
        println!("logged out; device {} removed", session.device);
    }
    Ok(())
}

pub async fn devices(
    local: &Local,
    action: Option<DevicesAction>,
    json: bool,
) -> Result<(), Failure> {
    let dir = &local.dir;
    let session = local.session()?;
    let url = session.url()?;
    match action {
        None => {}
        Some(DevicesAction::Approve {
            device,
            fingerprint: expected,
        }) => {
            let e2e = local.e2e(&session)?;
            let keys = e2e.device_keys(DeviceId(device)).await?;
            let shown = fingerprint(&keys);
            confirm_fingerprint(device, &shown, expected.as_deref())?;
            e2e.approve(DeviceId(device), keys).await?;
            println!("device {device} approved (fingerprint {shown})");
            return Ok(());
        }
        Some(DevicesAction::Remove { device }) => {
            let device = DeviceId(device);
            let listed = account::devices(&url, &session.token)
                .await?
                .iter()
                .any(|d| d.device == device && d.listed);
            if listed {
                local.e2e(&session)?.remove(device).await?;
            } else {
                account::remove_device(&url, &session.token, device).await?;
            }
            if device == session.device {
                Session::forget(dir);
                session::forget_identity(dir);
            }
            println!("device {device} removed");
            return Ok(());
        }
        Some(DevicesAction::Reset) => {
            let password = read_password("password: ", "CONFAB_PASSWORD")?;
            local.e2e(&session)?.reset(&password).await?;
            println!(
                "your device list now holds only this device ({}); every other device was \
                 removed, and your contacts will see a key change",
                session.device
            );
            return Ok(());
        }
    }
    let devices = account::devices(&url, &session.token).await?;
    if json {
        output::json_line(serde_json::to_value(&devices).map_err(anyhow::Error::from)?);
        return Ok(());
    }
    for d in devices {
        let current = if d.current { "  (this device)" } else { "" };
        let state = if d.listed { "listed " } else { "pending" };
        let fp = d.keys.as_ref().map(fingerprint).unwrap_or_default();
        println!(
            "{:>6}  {state}  {fp:<24}  {:<20} added {}{current}",
            d.device.0,
            output::safe(&d.name),
            output::ago(d.created_at)
        );
    }
    Ok(())
}

/// The server hands out the new device's keys: approving them blind would
/// let it slip in keys of its own. The user checks them against what the
/// new device itself printed.
fn confirm_fingerprint(device: i64, shown: &str, expected: Option<&str>) -> Result<(), Failure> {
    let same = |a: &str, b: &str| a.split_whitespace().eq(b.split_whitespace());
    match expected {
        Some(expected) if same(expected, shown) => Ok(()),
        Some(expected) => Err(Failure::other(format!(
            "not approved: the server offers device {device} with fingerprint {shown}, \
             not {expected}"
        ))),
        None if std::io::stdin().is_terminal() => {
            print!(
                "device {device} has the fingerprint {shown}\n\
                 does it match what the new device showed at login? [y/N] "
            );
            std::io::stdout().flush().map_err(anyhow::Error::from)?;
            let mut answer = String::new();
            std::io::stdin()
                .read_line(&mut answer)
                .map_err(anyhow::Error::from)?;
            if answer.trim().eq_ignore_ascii_case("y") {
                Ok(())
            } else {
                Err(Failure::other("not approved"))
            }
        }
        None => Err(Failure::new(
            2,
            format!(
                "device {device} has the fingerprint {shown}; pass --fingerprint with what the \
                 new device showed at login to approve it"
            ),
        )),
    }
}

/// Prints the safety number with `user` and both sides' device fingerprints.
pub async fn keys(local: &Local, user: &str, json: bool) -> Result<(), Failure> {
    let session = local.session()?;
    let e2e = local.e2e(&session)?;
    let user = user.to_ascii_lowercase();
    let mine = e2e.devices(&session.user, true).await?;
    let (theirs, changed) = match e2e.devices(&user, true).await {
        Ok(list) => (list, false),
        Err(ClientError::KeyChanged(_)) => {
            let pending = e2e.pending(&user).ok_or_else(|| {
                Failure::new(
                    super::exit::KEY_CHANGED,
                    format!(
                        "{user}'s newest device list is not signed by any device on it: it \
                         cannot be trusted or accepted"
                    ),
                )
            })?;
            (pending, true)
        }
        Err(e) => return Err(e.into()),
    };
    let number = safety_number(&mine, &theirs);
    let notices = e2e.take_notices();
    if json {
        let devices = |l: &DeviceList| {
            l.devices
                .iter()
                .map(|d| json!({"device": d.device, "fingerprint": fingerprint(&d.keys)}))
                .collect::<Vec<_>>()
        };
        output::json_line(json!({
            "user": user,
            "safety_number": number,
            "key_change": changed,
            "accepted": !changed,
            "mine": devices(&mine),
            "theirs": devices(&theirs),
        }));
    } else {
        for notice in &notices {
            println!("{}", output::describe_devices(notice));
        }
        println!("safety number with {user}:");
        let groups: Vec<&str> = number.split(' ').collect();
        for line in groups.chunks(4) {
            println!("    {}", line.join(" "));
        }
        for (who, list) in [(session.user.as_str(), &mine), (user.as_str(), &theirs)] {
            for d in &list.devices {
                println!(
                    "  {who:<20} device {:<6} {}",
                    d.device,
                    fingerprint(&d.keys)
                );
            }
        }
    }
    if changed {
        return Err(Failure::new(
            super::exit::KEY_CHANGED,
            format!(
                "{user}'s keys changed; if the safety number matches theirs, run `confab keys {user} --accept-key-change`"
            ),
        ));
    }
    Ok(())
}

pub async fn password(local: &Local, logout_other_devices: bool) -> Result<(), Failure> {
    let session = local.session()?;
    let old = read_password("current password: ", "CONFAB_PASSWORD")?;
    let new = read_password("new password: ", "CONFAB_NEW_PASSWORD")?;
    account::change_password(
        &session.url()?,
        &session.token,
        &old,
        &new,
        logout_other_devices,
    )
    .await?;
    println!(
        "password changed{}",
        if logout_other_devices {
            "; other devices logged out"
        } else {
            ""
        }
    );
    Ok(())
}
