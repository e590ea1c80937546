//! Account commands: register, login, logout, devices, password.

use std::path::Path;

use confab_client::{ServerUrl, account};
use confab_protocol::DeviceId;

use super::session::{Session, read_password};
use super::{DevicesAction, Failure, output};

pub async fn register(server: &str, username: &str) -> Result<(), Failure> {
    let url = ServerUrl::parse(server)?;
    let password = read_password("password: ", "CONFAB_PASSWORD")?;
    let name = account::register(&url, username, &password).await?;
    println!("registered {name} on {server}; now run `confab login {name}`");
    Ok(())
}

pub async fn login(
    dir: &Path,
    server: &str,
    username: &str,
    device_name: &str,
) -> Result<(), Failure> {
    let url = ServerUrl::parse(server)?;
    let password = read_password("password: ", "CONFAB_PASSWORD")?;
    // Keep this client's device when it logged in here before as the same user.
    let known_device = Session::load_any(dir)
        .filter(|s| s.server == server && s.user.eq_ignore_ascii_case(username))
        .map(|s| s.device);
    let login = account::login(&url, username, &password, known_device, Some(device_name)).await?;
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
    println!("logged in as {} ({kind} {})", login.user, login.device);
    Ok(())
}

pub async fn logout(dir: &Path) -> Result<(), Failure> {
    let session = Session::load(dir)?;
    account::logout(&session.url()?, &session.token).await?;
    Session::forget(dir);
    println!("logged out; device {} removed", session.device);
    Ok(())
}

pub async fn devices(dir: &Path, action: Option<DevicesAction>, json: bool) -> Result<(), Failure> {
    let session = Session::load(dir)?;
    let url = session.url()?;
    if let Some(DevicesAction::Remove { device }) = action {
        account::remove_device(&url, &session.token, DeviceId(device)).await?;
        if DeviceId(device) == session.device {
            Session::forget(dir);
        }
        println!("device {device} removed");
        return Ok(());
    }
    let devices = account::devices(&url, &session.token).await?;
    if json {
        output::json_line(serde_json::to_value(&devices).map_err(anyhow::Error::from)?);
        return Ok(());
    }
    for d in devices {
        let current = if d.current { "  (this device)" } else { "" };
        println!(
            "{:>6}  {:<20} added {}{current}",
            d.device.0,
            d.name,
            output::ago(d.created_at)
        );
    }
    Ok(())
}

pub async fn password(dir: &Path, logout_other_devices: bool) -> Result<(), Failure> {
    let session = Session::load(dir)?;
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
