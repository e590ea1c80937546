//! A private Redis server for tests.
//!
//! Each test process starts its own `redis-server` on a random loopback port
//! with a temp dir of its own, so runs never share keys and never touch the
//! machine's own Redis on 6379. Tests use the one from [`Redis::shared`];
//! tests that kill or restart the server start one of their own with
//! [`Redis::start`].
//!
//! Nothing is persisted (`--save ''`, `--appendonly no`): a server killed or
//! stopped and started again comes back empty, as a cache does after a
//! restart. Tests that need data to survive should not be using Redis.
//!
//! A test binary's statics are never dropped, so a watchdog shell waits for
//! the test process to end and then kills the server and removes its
//! directory: a test that panics or is killed leaves nothing behind.
//!
//! The server is driven only through its own binaries, `redis-server` and
//! `redis-cli` (Debian's `redis-server` and `redis-tools`), found on `PATH`
//! or in `CONFAB_REDIS_BIN`; this crate speaks no Redis protocol itself.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Mutex, MutexGuard, OnceLock, PoisonError};
use std::time::{Duration, Instant};

/// The machine's own Redis: never ours.
const MACHINE_PORT: u16 = 6379;

/// How long a starting server has to answer `PING`.
const START_TIMEOUT: Duration = Duration::from_secs(10);

pub struct Redis {
    dir: PathBuf,
    port: u16,
    server_bin: PathBuf,
    cli_bin: PathBuf,
    /// The running server, a child of this process (`--daemonize no`), so
    /// `kill` and `stop` can reap it; `None` once it is killed or stopped.
    server: Mutex<Option<Child>>,
}

impl Redis {
    /// The test process's shared server, started on first use.
    pub fn shared() -> &'static Redis {
        static SHARED: OnceLock<Redis> = OnceLock::new();
        SHARED.get_or_init(Redis::start)
    }

    /// A server of its own: for tests that kill or restart it.
    pub fn start() -> Redis {
        let server_bin = bin("redis-server");
        let cli_bin = bin("redis-cli");
        let dir = std::env::temp_dir().join(format!(
            "confab-redis-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&dir).expect("redis dir");
        // Nothing there is worth a clean shutdown.
        confab_testprocs::watchdog(&dir, &dir.join("redis.pid"), "KILL");
        let mut redis = Redis {
            dir,
            port: 0,
            server_bin,
            cli_bin,
            server: Mutex::new(None),
        };
        // A port free now may be taken before redis-server binds it: try
        // again.
        for _ in 0..5 {
            redis.port = confab_testprocs::free_port(&[MACHINE_PORT]);
            if redis.try_start() {
                return redis;
            }
        }
        panic!("redis-server would not start; {}", redis.log());
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// A URL for this server's database 0.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    /// Runs one command through `redis-cli`; its reply as `redis-cli` prints
    /// it to a pipe (raw: no `(integer)`, a nil is an empty string), trimmed.
    /// An error reply panics, as a failed connection does.
    pub fn cli(&self, args: &[&str]) -> String {
        let out = self
            .cli_command()
            .args(args)
            .output()
            .expect("run redis-cli");
        assert!(
            out.status.success(),
            "redis-cli {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    }

    /// `kill -9` the server, as a crash would, and wait until it is gone.
    pub fn kill(&self) {
        let mut server = self.server();
        let Some(mut child) = server.take() else {
            return;
        };
        let _ = child.kill();
        let _ = child.wait();
        // A killed server leaves its pid file behind: the watchdog must not
        // find a pid that may since have been reused.
        let _ = std::fs::remove_file(self.pid_file());
    }

    /// A clean shutdown (SIGTERM), waited for. Nothing is saved.
    pub fn stop(&self) {
        let Some(pid) = self.pid() else { return };
        confab_testprocs::signal("TERM", pid);
        let mut server = self.server();
        let Some(child) = server.as_mut() else { return };
        let deadline = Instant::now() + Duration::from_secs(10);
        while child.try_wait().expect("wait for redis-server").is_none() {
            assert!(
                Instant::now() < deadline,
                "redis-server did not stop; {}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        *server = None;
        let _ = std::fs::remove_file(self.pid_file());
    }

    /// Starts the server again on the same port and dir, after `kill` or
    /// `stop`; it comes back empty.
    pub fn start_again(&self) {
        assert!(self.pid().is_none(), "redis-server is still running");
        for _ in 0..50 {
            if self.try_start() {
                return;
            }
            // Something else may hold the port for a moment.
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!("redis-server would not start again; {}", self.log());
    }

    /// The server's PID while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.server().as_ref().map(Child::id)
    }

    fn server(&self) -> MutexGuard<'_, Option<Child>> {
        // A test that panicked mid-call leaves no broken state here.
        self.server.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Written by the server, read only by the watchdog, which cannot ask
    /// this process for the pid once it is gone.
    fn pid_file(&self) -> PathBuf {
        self.dir.join("redis.pid")
    }

    /// The tail of the server's log, and anything it printed before it
    /// opened the log (a bad option, say).
    fn log(&self) -> String {
        let log = std::fs::read_to_string(self.dir.join("redis.log")).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        let tail = lines[lines.len().saturating_sub(20)..].join("\n");
        let mut text = format!("redis.log ends:\n{tail}");
        let out = std::fs::read_to_string(self.dir.join("redis.out")).unwrap_or_default();
        if !out.trim().is_empty() {
            text += &format!("\nit printed:\n{}", out.trim());
        }
        text
    }

    fn cli_command(&self) -> Command {
        let mut c = Command::new(&self.cli_bin);
        // `-e`: an error reply fails the command, not just a lost connection.
        c.args(["-h", "127.0.0.1", "-p", &self.port.to_string(), "-e"]);
        c
    }

    fn ping(&self) -> bool {
        self.cli_command()
            .arg("PING")
            .output()
            .is_ok_and(|o| o.status.success() && o.stdout.trim_ascii() == b"PONG")
    }

    /// Starts the server and waits until it answers; false if it exited
    /// first, most likely because the port was taken.
    fn try_start(&self) -> bool {
        let mut server = self.server();
        let out = std::fs::File::create(self.dir.join("redis.out")).expect("redis.out");
        let mut child = Command::new(&self.server_bin)
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .args(["--notify-keyspace-events", ""])
            .args(["--daemonize", "no"])
            .arg("--dir")
            .arg(&self.dir)
            .arg("--logfile")
            .arg(self.dir.join("redis.log"))
            .arg("--pidfile")
            .arg(self.pid_file())
            .stdin(Stdio::null())
            .stdout(out.try_clone().expect("redis.out"))
            .stderr(out)
            .spawn()
            .expect("run redis-server");
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if child.try_wait().expect("wait for redis-server").is_some() {
                return false;
            }
            if self.ping() {
                break;
            }
            if Instant::now() >= deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!(
                    "redis-server did not answer PING on port {} within {START_TIMEOUT:?}; {}",
                    self.port,
                    self.log()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        // Whoever answered may be another test's server that got the port
        // first; ours will fail to bind and exit.
        let ours = format!("process_id:{}", child.id());
        let info = self.cli_command().args(["INFO", "server"]).output();
        if info.is_ok_and(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .any(|l| l.trim() == ours)
        }) {
            *server = Some(child);
            true
        } else {
            let _ = child.kill();
            let _ = child.wait();
            false
        }
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

static NEXT: AtomicU32 = AtomicU32::new(0);

fn bin(program: &str) -> PathBuf {
    confab_testprocs::find_bin(
        program,
        "CONFAB_REDIS_BIN",
        &[],
        "scripts/test.sh installs it (apt-get install redis-server)",
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use confab_testprocs::alive;
    use std::io::{BufRead, BufReader};

    #[test]
    fn killed_and_started_again_it_has_forgotten_everything() {
        let redis = Redis::start();
        assert_ne!(redis.port(), MACHINE_PORT);
        assert_eq!(redis.url(), format!("redis://127.0.0.1:{}/", redis.port()));
        assert_eq!(redis.cli(&["SET", "greeting", "hello world"]), "OK");
        assert_eq!(redis.cli(&["GET", "greeting"]), "hello world");

        redis.kill();
        assert!(!redis.ping());
        let out = redis.cli_command().arg("PING").output().unwrap();
        assert!(!out.status.success(), "redis-cli ping after kill succeeded");

        redis.start_again();
        assert!(redis.ping());
        assert_eq!(redis.cli(&["DBSIZE"]), "0");
        assert_eq!(redis.cli(&["GET", "greeting"]), "");
    }

    #[test]
    fn stopped_it_saves_nothing() {
        let redis = Redis::start();
        redis.cli(&["SET", "k", "v"]);
        redis.stop();
        assert!(!redis.ping());
        assert!(!redis.dir.join("dump.rdb").exists());
        redis.start_again();
        assert_eq!(redis.cli(&["DBSIZE"]), "0");
        assert_eq!(redis.cli(&["CONFIG", "GET", "save"]), "save");
        assert_eq!(
            redis.cli(&["CONFIG", "GET", "appendonly"]),
            "appendonly\nno"
        );
    }

    #[test]
    #[should_panic(expected = "WRONGTYPE")]
    fn an_error_reply_panics() {
        let redis = Redis::shared();
        redis.cli(&["RPUSH", "a-list", "x"]);
        redis.cli(&["GET", "a-list"]);
    }

    #[test]
    fn shared_is_one_server() {
        assert!(std::ptr::eq(Redis::shared(), Redis::shared()));
        assert_eq!(Redis::shared().cli(&["PING"]), "PONG");
    }

    #[test]
    fn dropped_it_leaves_nothing() {
        let redis = Redis::start();
        let pid = redis.pid().unwrap();
        let dir = redis.dir.clone();
        assert!(alive(pid));
        drop(redis);
        assert!(!alive(pid));
        assert!(!dir.exists());
    }

    /// The watchdog's case: a test process killed outright, no `Drop`.
    #[test]
    fn a_killed_test_process_leaves_nothing() {
        let mut victim = Command::new(std::env::current_exe().unwrap())
            .args(["--exact", "tests::victim", "--ignored", "--nocapture"])
            .env(VICTIM, "1")
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let line = BufReader::new(victim.stdout.take().unwrap())
            .lines()
            .map_while(Result::ok)
            .find(|l| l.starts_with("victim "))
            .expect("the victim's server");
        let mut words = line.split(' ').skip(1);
        let pid: u32 = words.next().unwrap().parse().unwrap();
        let dir = PathBuf::from(words.next().unwrap());
        assert!(alive(pid) && dir.exists());

        victim.kill().unwrap();
        victim.wait().unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        while alive(pid) || dir.exists() {
            assert!(Instant::now() < deadline, "the watchdog did not clean up");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    const VICTIM: &str = "CONFAB_TESTREDIS_VICTIM";

    #[test]
    #[ignore = "run by a_killed_test_process_leaves_nothing"]
    fn victim() {
        if std::env::var_os(VICTIM).is_none() {
            return;
        }
        let redis = Redis::start();
        println!("victim {} {}", redis.pid().unwrap(), redis.dir.display());
        loop {
            std::thread::sleep(Duration::from_secs(60));
        }
    }
}
