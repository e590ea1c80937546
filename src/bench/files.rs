//! `confab bench files`: one large file up and down through the server, beside
//! the disk's own sequential write speed, and server memory while many users
//! upload at once (docs/files.md, docs/performance.md).
//!
//! The client side is the library's real transfer path (`files::resume_upload`
//! from a spool file, 4 MiB ranged `GET`s); the bytes are random, not age
//! output, since what is measured is the server: age encryption on the
//! sending device costs its own CPU and is not counted here.

use std::io::Write;
use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use confab_client::{ServerUrl, blobs, files};
use indicatif::ProgressBar;
use rand::RngCore;
use serde::Serialize;

use super::procfs::{self, CpuMeter};
use super::report::Report;
use super::setup::{self, Target};

const MIB: u64 = 1024 * 1024;
const RANGE: u64 = 4 * MIB;

#[derive(Serialize, Debug, Clone, Copy, Default)]
pub struct Transfer {
    pub file_mib: u64,
    /// `dd if=/dev/zero bs=4M conv=fsync` of the same size into the
    /// server's data directory, in this run: the median of three.
    pub disk_write_mib_per_second: f64,
    pub upload_mib_per_second: f64,
    pub download_mib_per_second: f64,
    /// Upload speed over the disk's.
    pub upload_of_disk: f64,
    pub server_cpu_seconds_per_gib_up: f64,
    pub server_cpu_seconds_per_gib_down: f64,
    pub concurrent_uploads: usize,
    pub concurrent_file_mib: u64,
    pub concurrent_mib_per_second: f64,
    pub server_rss_idle_mib: f64,
    /// The most the server held while the concurrent uploads ran.
    pub server_rss_max_mib: f64,
}

pub async fn run(
    target: &Target,
    file_mib: u64,
    concurrent: usize,
    concurrent_mib: u64,
    bar: &ProgressBar,
) -> anyhow::Result<Report> {
    let accounts = setup::provision(&target.url, concurrent.max(1), bar).await?;
    let scratch = tempfile::tempdir()?;
    let dir = target
        .data_dir()
        .map(Path::to_path_buf)
        .unwrap_or_else(std::env::temp_dir);
    bar.set_message("disk write speed (dd)");
    // This machine's disk comes in bursts: the median of three.
    let mut disk = [0.0; 3];
    for d in &mut disk {
        *d = dd_mib_per_second(&dir, file_mib)?;
    }
    disk.sort_by(f64::total_cmp);
    let disk = disk[1];

    bar.set_message("writing the file to send");
    let spool = scratch.path().join("file.bin");
    write_random(&spool, file_mib * MIB)?;
    let (url, token) = (&target.url, accounts[0].token.as_str());

    bar.set_message(format!("uploading {file_mib} MiB"));
    let upload = blobs::create(url, token, file_mib * MIB).await?;
    let server = CpuMeter::start(&target.nodes, false);
    let started = Instant::now();
    files::resume_upload(url, token, &upload, &spool, &mut |_, _| {}).await?;
    let up_seconds = started.elapsed().as_secs_f64();
    let (up_cpu, _) = server.read();

    bar.set_message(format!("downloading {file_mib} MiB"));
    let server = CpuMeter::start(&target.nodes, false);
    let started = Instant::now();
    let got = download(url, token, &upload, file_mib * MIB).await?;
    let down_seconds = started.elapsed().as_secs_f64();
    let (down_cpu, _) = server.read();
    anyhow::ensure!(got == file_mib * MIB, "downloaded {got} bytes");
    blobs::delete(url, token, &upload).await?;

    bar.set_message(format!(
        "{concurrent} uploads of {concurrent_mib} MiB at once"
    ));
    let spool = scratch.path().join("each.bin");
    write_random(&spool, concurrent_mib * MIB)?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let idle = procfs::rss_kib(&target.nodes);
    let peak = Arc::new(AtomicU64::new(idle));
    let sampling = tokio::spawn(sample_peak(target.nodes.clone(), peak.clone()));
    let started = Instant::now();
    let uploads = accounts.iter().take(concurrent).map(|account| {
        let spool = spool.clone();
        async move {
            let token = account.token.as_str();
            let upload = blobs::create(url, token, concurrent_mib * MIB).await?;
            files::resume_upload(url, token, &upload, &spool, &mut |_, _| {}).await?;
            blobs::delete(url, token, &upload).await?;
            anyhow::Ok(())
        }
    });
    for done in futures_util::future::join_all(uploads).await {
        done.context("a concurrent upload")?;
    }
    let together = started.elapsed().as_secs_f64();
    sampling.abort();
    let max = peak.load(Ordering::Relaxed);

    let gib = file_mib as f64 / 1024.0;
    let up = file_mib as f64 / up_seconds;
    let transfer = Transfer {
        file_mib,
        disk_write_mib_per_second: disk,
        upload_mib_per_second: up,
        download_mib_per_second: file_mib as f64 / down_seconds,
        upload_of_disk: up / disk,
        server_cpu_seconds_per_gib_up: up_cpu / gib,
        server_cpu_seconds_per_gib_down: down_cpu / gib,
        concurrent_uploads: concurrent,
        concurrent_file_mib: concurrent_mib,
        concurrent_mib_per_second: (concurrent as u64 * concurrent_mib) as f64 / together,
        server_rss_idle_mib: idle as f64 / 1024.0,
        server_rss_max_mib: max as f64 / 1024.0,
    };
    Ok(Report {
        mode: "files".into(),
        users: concurrent,
        settings: format!(
            "one {file_mib} MiB file up and down, then {concurrent} uploads of {concurrent_mib} MiB at once"
        ),
        duration_seconds: up_seconds + down_seconds + together,
        files: Some(transfer),
        ..Report::default()
    })
}

/// Keeps the largest RSS of `pids` together (KiB) in `peak`, every 20 ms, until aborted.
async fn sample_peak(pids: Vec<u32>, peak: Arc<AtomicU64>) {
    loop {
        peak.fetch_max(procfs::rss_kib(&pids), Ordering::Relaxed);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Fetches the blob at `path` in 4 MiB ranges, as `files::download_file`
/// does, and counts the bytes instead of keeping them.
async fn download(url: &ServerUrl, token: &str, path: &str, length: u64) -> anyhow::Result<u64> {
    let mut offset = 0;
    while offset < length {
        let range = offset..(offset + RANGE).min(length);
        offset += blobs::download(url, token, path, Some(range)).await?.len() as u64;
    }
    Ok(offset)
}

/// `bytes` of random data (one random 4 MiB block, repeated: nothing on
/// the way compresses).
fn write_random(path: &Path, bytes: u64) -> anyhow::Result<()> {
    let mut block = vec![0u8; RANGE as usize];
    rand::rng().fill_bytes(&mut block);
    let mut file = std::io::BufWriter::new(std::fs::File::create(path)?);
    let mut left = bytes;
    while left > 0 {
        let n = left.min(RANGE) as usize;
        file.write_all(&block[..n])?;
        left -= n as u64;
    }
    file.flush()?;
    Ok(())
}

/// The disk's sequential write speed where the server keeps its blobs.
fn dd_mib_per_second(dir: &Path, mib: u64) -> anyhow::Result<f64> {
    let target = dir.join("dd.bin");
    let started = Instant::now();
    let status = Command::new("dd")
        .arg("if=/dev/zero")
        .arg(format!("of={}", target.display()))
        .args([
            "bs=4M",
            &format!("count={}", mib.div_ceil(4)),
            "conv=fsync",
            "status=none",
        ])
        .status()
        .context("run dd")?;
    let seconds = started.elapsed().as_secs_f64();
    let _ = std::fs::remove_file(&target);
    anyhow::ensure!(status.success(), "dd failed: {status}");
    Ok(mib.div_ceil(4) as f64 * 4.0 / seconds)
}
