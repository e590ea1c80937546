//! A private S3-compatible server for tests: `s3s-fs`, which keeps each
//! bucket as a directory and each object as a file under it.
//!
//! Each test process starts its own on a loopback port the server picks
//! itself (`--port 0`, read back from its log), with a temp dir of its
//! own; each test takes a bucket of its own from [`S3::bucket`], so tests
//! sharing the server never see each other's objects. Tests that kill the
//! server start one of their own with [`S3::start`].
//!
//! s3s-fs is built once by scripts/test.sh (`cargo install s3s-fs@0.14.1
//! --features binary`; 0.17 needs a newer rustc) into a cache outside the
//! clone, so that a fresh clone does not pay its four-minute build again.
//! It is found through `CONFAB_S3S_BIN` (the binary), else in that cache,
//! else on `PATH`. Like the other test servers it is a child of the test
//! process, with a watchdog that kills it once the test process is gone.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Mutex, MutexGuard, OnceLock, PoisonError};
use std::time::{Duration, Instant};

/// The version scripts/test.sh installs, and the cache directory's name.
pub const VERSION: &str = "0.14.1";

/// Keys the server accepts (and nothing else: a request signed with
/// other keys is refused, as a real bucket would).
pub const ACCESS_KEY: &str = "confab-test";
pub const SECRET_KEY: &str = "confab-test-secret";

/// s3s-fs's region is whatever the request is signed for.
pub const REGION: &str = "us-east-1";

const START_TIMEOUT: Duration = Duration::from_secs(10);

pub struct S3 {
    dir: PathBuf,
    bin: PathBuf,
    /// 0 until the first start picks one; kept for `start_again`.
    port: Mutex<u16>,
    server: Mutex<Option<Child>>,
}

impl S3 {
    /// The test process's shared server, started on first use.
    pub fn shared() -> &'static S3 {
        static SHARED: OnceLock<S3> = OnceLock::new();
        SHARED.get_or_init(S3::start)
    }

    /// A server of its own: for tests that kill or restart it.
    pub fn start() -> S3 {
        let dir = std::env::temp_dir().join(format!(
            "confab-s3-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(dir.join("root")).expect("s3 dir");
        confab_testprocs::watchdog(&dir, &dir.join("s3s-fs.pid"), "KILL");
        let s3 = S3 {
            dir,
            bin: bin(),
            port: Mutex::new(0),
            server: Mutex::new(None),
        };
        s3.run();
        s3
    }

    pub fn port(&self) -> u16 {
        *lock(&self.port)
    }

    /// `http://127.0.0.1:PORT`
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port())
    }

    /// A new, empty bucket of this server.
    pub fn bucket(&self) -> String {
        let name = format!("bucket-{}", NEXT.fetch_add(1, Ordering::Relaxed));
        std::fs::create_dir_all(self.root().join(&name)).expect("make the bucket");
        name
    }

    /// What `confab serve --blobs` takes for `bucket` on this server (the
    /// keys go in CONFAB_BLOBS_ACCESS_KEY_ID and _SECRET_ACCESS_KEY).
    pub fn blobs_url(&self, bucket: &str) -> String {
        format!(
            "s3://{bucket}?endpoint={}&region={REGION}&allow_http=true",
            self.endpoint()
        )
    }

    /// The directory s3s-fs keeps `bucket` in: its objects are files
    /// there, as they were written.
    pub fn bucket_dir(&self, bucket: &str) -> PathBuf {
        self.root().join(bucket)
    }

    /// The keys of the objects in `bucket`, sorted (read from the server's
    /// directory, so they are there whatever a client was told).
    pub fn objects(&self, bucket: &str) -> Vec<String> {
        let root = self.bucket_dir(bucket);
        let mut keys = Vec::new();
        walk(&root, &root, &mut keys);
        keys.sort();
        keys
    }

    /// `kill -9` the server and wait until it is gone. Its objects stay.
    pub fn kill(&self) {
        let Some(mut child) = self.server().take() else {
            return;
        };
        let _ = child.kill();
        let _ = child.wait();
        let _ = std::fs::remove_file(self.pid_file());
    }

    /// Starts the server again, on its port and with its objects.
    pub fn start_again(&self) {
        assert!(self.server().is_none(), "s3s-fs is still running");
        self.run();
    }

    fn run(&self) {
        // A port that was free may be taken by the time the server binds
        // it again: retry for a moment.
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            match self.try_start() {
                Ok(()) => return,
                Err(why) if Instant::now() >= deadline => panic!("s3s-fs would not start: {why}"),
                Err(_) => std::thread::sleep(Duration::from_millis(100)),
            }
        }
    }

    fn try_start(&self) -> Result<(), String> {
        let log_path = self.dir.join("s3s-fs.log");
        let log = std::fs::File::create(&log_path).expect("s3s-fs.log");
        let port = self.port();
        let mut child = Command::new(&self.bin)
            .args(["--host", "127.0.0.1", "--port", &port.to_string()])
            .args(["--access-key", ACCESS_KEY, "--secret-key", SECRET_KEY])
            .arg(self.root())
            .env("RUST_LOG", "s3s_fs=info")
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("s3s-fs.log"))
            .stderr(log)
            .spawn()
            .map_err(|e| format!("cannot run {}: {e}", self.bin.display()))?;
        let deadline = Instant::now() + START_TIMEOUT;
        let text = loop {
            let text = std::fs::read_to_string(&log_path).unwrap_or_default();
            if text.contains("server is running at http://") {
                break text;
            }
            if child.try_wait().expect("wait for s3s-fs").is_some() {
                return Err(format!("it exited: {}", text.trim()));
            }
            if Instant::now() >= deadline {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!("no start line within {START_TIMEOUT:?}: {text}"));
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        let at = text
            .split("server is running at http://")
            .nth(1)
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|addr| addr.rsplit(':').next())
            .and_then(|port| port.parse::<u16>().ok())
            .ok_or_else(|| format!("no port in {text}"))?;
        std::fs::write(self.pid_file(), child.id().to_string()).expect("pid file");
        *lock(&self.port) = at;
        *self.server() = Some(child);
        Ok(())
    }

    fn root(&self) -> PathBuf {
        self.dir.join("root")
    }

    fn pid_file(&self) -> PathBuf {
        self.dir.join("s3s-fs.pid")
    }

    fn server(&self) -> MutexGuard<'_, Option<Child>> {
        lock(&self.server)
    }
}

impl Drop for S3 {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A test that panicked mid-call leaves no broken state here.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

static NEXT: AtomicU32 = AtomicU32::new(0);

fn walk(root: &Path, dir: &Path, keys: &mut Vec<String>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        if path.is_dir() {
            walk(root, &path, keys);
        } else if let Ok(key) = path.strip_prefix(root) {
            keys.push(key.to_string_lossy().into_owned());
        }
    }
}

/// Where scripts/test.sh installs s3s-fs: outside any clone.
pub fn cache_dir() -> PathBuf {
    let cache = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .unwrap_or_else(|| PathBuf::from("/tmp"));
    cache.join("confab").join(format!("s3s-fs-{VERSION}"))
}

fn bin() -> PathBuf {
    if let Some(path) = std::env::var_os("CONFAB_S3S_BIN") {
        return path.into();
    }
    let cached = cache_dir().join("bin");
    confab_testprocs::find_bin(
        "s3s-fs",
        "CONFAB_S3S_DIR",
        &[cached.to_str().expect("a UTF-8 cache path")],
        &format!(
            "scripts/test.sh builds it (cargo install s3s-fs@{VERSION} --features binary --locked --root {})",
            cache_dir().display()
        ),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};

    /// One unsigned request, for what needs no signature: a refusal.
    fn get(port: u16, path: &str) -> String {
        let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
        write!(
            s,
            "GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
        )
        .unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).unwrap();
        out
    }

    #[test]
    fn it_listens_and_refuses_unsigned_requests() {
        let s3 = S3::shared();
        let bucket = s3.bucket();
        assert!(
            s3.blobs_url(&bucket)
                .starts_with(&format!("s3://{bucket}?endpoint=http://127.0.0.1:"))
        );
        let answer = get(s3.port(), &format!("/{bucket}/x"));
        assert!(answer.starts_with("HTTP/1.1 403"), "{answer}");
        assert!(s3.objects(&bucket).is_empty());
    }

    #[test]
    fn killed_and_started_again_it_keeps_its_port_and_objects() {
        let s3 = S3::start();
        let bucket = s3.bucket();
        std::fs::write(s3.root().join(&bucket).join("kept"), b"x").unwrap();
        let port = s3.port();
        s3.kill();
        assert!(std::net::TcpStream::connect(("127.0.0.1", port)).is_err());
        s3.start_again();
        assert_eq!(s3.port(), port);
        assert_eq!(s3.objects(&bucket), ["kept"]);
        assert!(get(port, "/").starts_with("HTTP/1.1 "));
    }
}
