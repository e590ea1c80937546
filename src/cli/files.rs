//! `confab send-file` and `confab download` (docs/files.md).
//!
//! A file is encrypted once, to a spool file in `<config dir>/uploads/`,
//! kept with the upload's URL and the message id (`<name>.json`, 0600: it
//! holds the file's key) until the message is sent. Run again after a cut
//! connection or a killed command, `send-file` finds them and goes on from
//! the server's offset; the message goes out under the same id, so it is
//! stored once.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};

use confab_client::blobs;
use confab_client::e2e::{FileMessage, Received};
use confab_client::files::{self, Prepared};
use confab_client::{ClientError, new_message_id};
use confab_protocol::MessageId;
use indicatif::{ProgressBar, ProgressStyle};
use serde::{Deserialize, Serialize};
use serde_json::json;

use super::Failure;
use super::output::{json_line, safe};
use super::session::{Connected, Device, Local, write_private};
use super::target::Target;

const UPLOADS: &str = "uploads";

/// What survives a killed `send-file`: enough to resume the upload and to
/// send the message under the same id.
#[derive(Serialize, Deserialize)]
struct Pending {
    source: PathBuf,
    prepared: Prepared,
    upload: String,
    id: MessageId,
}

/// Shows a transfer's progress: a bar on a terminal, else a line per
/// quarter on stderr.
struct Shown {
    bar: Option<ProgressBar>,
    what: &'static str,
    /// The last quarter said (0 to 4), on a non-terminal.
    said: Option<u64>,
}

impl Shown {
    fn new(what: &'static str) -> Self {
        let bar = std::io::stderr().is_terminal().then(|| {
            let bar = ProgressBar::new(0);
            let style = ProgressStyle::with_template(
                "{msg} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
            )
            .expect("a valid template")
            .progress_chars("=> ");
            bar.set_style(style);
            bar.set_message(what);
            bar
        });
        Shown {
            bar,
            what,
            said: None,
        }
    }

    fn update(&mut self, done: u64, total: u64) {
        match &self.bar {
            Some(bar) => {
                bar.set_length(total);
                bar.set_position(done);
            }
            None => {
                let quarter = (done * 4).checked_div(total).unwrap_or(4);
                if self.said.is_none_or(|said| quarter > said) {
                    eprintln!("{}: {done} of {total} bytes", self.what);
                    self.said = Some(quarter);
                }
            }
        }
    }

    fn finish(&self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
    }
}

/// The spool's name for `source`: the same file (name, size, modification
/// time) finds the same spool again.
fn spool_name(source: &Path) -> Result<String, Failure> {
    let meta = std::fs::metadata(source)
        .map_err(|e| Failure::other(format!("{}: {e}", source.display())))?;
    let modified = meta
        .modified()
        .ok()
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map_or(0, |d| d.as_nanos());
    let name: String = source
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '.' {
                c
            } else {
                '_'
            }
        })
        .take(64)
        .collect();
    Ok(format!("{name}-{}-{modified}", meta.len()))
}

pub async fn send_file(local: &Local, user: &str, path: &Path, json: bool) -> Result<(), Failure> {
    let device = Device::open(local)?;
    let (url, token) = (device.url.clone(), device.session.token.clone());
    let dir = local.dir.join(UPLOADS);
    let stem = spool_name(path)?;
    let (record, spool) = (format!("{stem}.json"), dir.join(format!("{stem}.age")));
    let saved = std::fs::read_to_string(dir.join(&record))
        .ok()
        .and_then(|text| serde_json::from_str::<Pending>(&text).ok())
        .filter(|p| spool.exists() && p.source == path);
    let mut pending = match saved {
        Some(pending) => pending,
        None => start(local, &url, &token, path, &spool, &record).await?,
    };
    let mut shown = Shown::new("uploading");
    let mut progress = |done, total| shown.update(done, total);
    let resumed = files::resume_upload(&url, &token, &pending.upload, &spool, &mut progress).await;
    shown.finish();
    match resumed {
        Ok(()) => {}
        // Expired or deleted meanwhile: start over with a new upload.
        Err(ClientError::Api { status: 404, .. }) => {
            pending = start(local, &url, &token, path, &spool, &record).await?;
            files::resume_upload(&url, &token, &pending.upload, &spool, &mut |_, _| {}).await?;
        }
        Err(e) => return Err(e.into()),
    }
    let file = pending.prepared.file_ref(files::blob_id(&pending.upload));
    let c = Connected::open(local).await?;
    let conv = Target::parse(user).conversation(&c.client).await?;
    let sent = c
        .client
        .send_file(conv, pending.id.clone(), "", file.clone())
        .await?;
    c.client.close().await;
    let _ = std::fs::remove_file(&spool);
    let _ = std::fs::remove_file(dir.join(&record));
    if json {
        json_line(
            json!({"id": sent.id, "conv": sent.conv, "seq": sent.seq, "ts": sent.ts,
                         "status": "sent", "name": file.name, "size": file.size}),
        );
    } else {
        println!(
            "sent: file {} ({} bytes) as message {} to {user}",
            safe(&file.name),
            file.size,
            sent.seq
        );
    }
    Ok(())
}

/// Encrypts the file to the spool, creates its upload and saves both.
async fn start(
    local: &Local,
    url: &confab_client::ServerUrl,
    token: &str,
    source: &Path,
    spool: &Path,
    record: &str,
) -> Result<Pending, Failure> {
    let dir = local.dir.join(UPLOADS);
    // Made 0700 before the spool lands in it.
    write_private(&dir, ".keep", "")?;
    let prepared = files::prepare(source, spool).await?;
    let upload = blobs::create(url, token, prepared.length).await?;
    let pending = Pending {
        source: source.to_path_buf(),
        prepared,
        upload,
        id: new_message_id(),
    };
    let text = serde_json::to_string(&pending).expect("pending upload serializes");
    write_private(&dir, record, &text)?;
    Ok(pending)
}

/// The file message `seq` of the conversation with `user`.
async fn file_message(local: &Local, user: &str, seq: i64) -> Result<FileMessage, Failure> {
    let client = Connected::open(local).await?.into_client();
    let conv = Target::parse(user).conversation(&client).await?;
    let page = client.history(conv, Some(seq + 1), 1).await?;
    client.close().await;
    match page.into_iter().next() {
        Some(Received::File(f)) if f.message.seq == seq => Ok(f),
        Some(r) if r.message().seq == seq => {
            Err(Failure::other(format!("message {seq} carries no file")))
        }
        _ => Err(Failure::other(format!("no message {seq} with {user}"))),
    }
}

fn gone(seq: i64) -> Failure {
    Failure::other(format!("the file of message {seq} was deleted"))
}

pub async fn delete_file(local: &Local, user: &str, seq: i64) -> Result<(), Failure> {
    let device = Device::open(local)?;
    let found = file_message(local, user, seq).await?;
    if found.message.from != device.session.user {
        return Err(Failure::other(format!(
            "message {seq} is {}'s: only its sender can delete its file",
            found.message.from
        )));
    }
    if found.deleted() {
        return Err(gone(seq));
    }
    let path = files::blob_path(&found.file)?;
    match blobs::delete(&device.url, &device.session.token, &path).await {
        Ok(()) | Err(ClientError::Api { status: 410, .. }) => {}
        Err(e) => return Err(e.into()),
    }
    println!("deleted: file {} of message {seq}", safe(&found.file.name));
    Ok(())
}

/// A name from someone else, made safe to create in `dir`: no directory
/// parts, no control characters, not hidden.
fn safe_file_name(name: &str) -> String {
    let last = name.rsplit(['/', '\\']).next().unwrap_or_default();
    let cleaned: String = last
        .chars()
        .filter(|c| !c.is_control())
        .collect::<String>()
        .trim_start_matches('.')
        .trim()
        .to_string();
    if cleaned.is_empty() {
        "file".into()
    } else {
        cleaned.chars().take(200).collect()
    }
}

pub async fn download(
    local: &Local,
    user: &str,
    seq: i64,
    dir: Option<&Path>,
    force: bool,
) -> Result<(), Failure> {
    let device = Device::open(local)?;
    let (url, token) = (device.url.clone(), device.session.token.clone());
    let found = file_message(local, user, seq).await?;
    if found.deleted() {
        return Err(gone(seq));
    }
    let file = found.file;
    let dir = dir.unwrap_or(Path::new("."));
    let target = dir.join(safe_file_name(&file.name));
    if target.exists() && !force {
        return Err(Failure::other(format!(
            "{} exists; --force replaces it",
            target.display()
        )));
    }
    // Decrypted beside the target and moved over it only once complete. The
    // encrypted bytes stay beside it until then, under the blob's id, so that
    // a download run again after a kill goes on from them.
    let fresh = dir.join(format!(".{}.confab-download", safe_file_name(&file.name)));
    let _ = std::fs::remove_file(&fresh);
    // The id is checked first: it comes from the sender.
    files::blob_path(&file)?;
    let partial = dir.join(format!(".{}.confab-part", file.blob));
    let mut shown = Shown::new("downloading");
    let progress = &mut |d, t| shown.update(d, t);
    let done = files::download_file(&url, &token, &file, &partial, &fresh, progress).await;
    shown.finish();
    let size = match done {
        Err(ClientError::Api { status: 410, .. }) => return Err(gone(seq)),
        other => other?,
    };
    std::fs::rename(&fresh, &target)
        .map_err(|e| Failure::other(format!("{}: {e}", target.display())))?;
    println!("saved: {} ({size} bytes)", target.display());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn progress_lines_come_once_per_quarter() {
        // Not a terminal under the test harness: lines, not a bar.
        let mut shown = Shown {
            bar: None,
            what: "uploading",
            said: None,
        };
        let mut said = Vec::new();
        for done in [0, 10, 30, 50, 60, 80, 99, 100] {
            let before = shown.said;
            shown.update(done, 100);
            if shown.said != before {
                said.push(done);
            }
        }
        assert_eq!(said, [0, 30, 50, 80, 100]);
    }

    #[test]
    fn names_from_others_stay_in_the_directory() {
        assert_eq!(safe_file_name("cat.jpg"), "cat.jpg");
        assert_eq!(safe_file_name("../../.bashrc"), "bashrc");
        assert_eq!(safe_file_name("C:\\Windows\\evil.exe"), "evil.exe");
        assert_eq!(safe_file_name("a\u{1b}[2Jb"), "a[2Jb");
        assert_eq!(safe_file_name(".."), "file");
        assert_eq!(safe_file_name(""), "file");
    }
}
