//! A private PostgreSQL server for tests.
//!
//! Each test process starts its own cluster (`initdb` into a temp dir,
//! `postgres` on a random loopback port, its socket in that dir), so runs
//! never share state and never touch the machine's own PostgreSQL on 5432.
//! Tests take a fresh database each from [`Postgres::shared`]; crash tests
//! start a cluster of their own with [`Postgres::start`] and `kill -9` it.
//!
//! A test binary's statics are never dropped, so a watchdog shell waits for
//! the test process to end and then stops the server and removes its
//! directory: a test that panics or is killed leaves nothing behind.
//!
//! The server runs with `fsync=off`: tests crash processes, not machines,
//! and a killed postgres loses nothing the OS already holds. Commits stay
//! synchronous, so what a test saw committed survives `kill -9`.
//! Benchmarks take [`Postgres::start_durable`], with fsync on.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

/// Where Debian puts each version's server binaries; `CONFAB_PG_BIN`
/// overrides.
const DEBIAN_DIR: &str = "/usr/lib/postgresql";

pub struct Postgres {
    dir: PathBuf,
    port: u16,
    bin: PathBuf,
    /// Run the server binaries as this user: PostgreSQL refuses to run as
    /// root, and tests here often do.
    run_as: Option<&'static str>,
    /// fsync on: for benchmarks, which must not flatter PostgreSQL against
    /// SQLite's synced commits. Tests run without.
    durable: bool,
}

impl Postgres {
    /// The test process's shared cluster, started on first use.
    pub fn shared() -> &'static Postgres {
        static SHARED: OnceLock<Postgres> = OnceLock::new();
        SHARED.get_or_init(Postgres::start)
    }

    /// A cluster of its own: for tests that kill or restart the server.
    pub fn start() -> Postgres {
        Self::start_with(false)
    }

    /// A cluster that syncs its commits to disk, as in production: for
    /// benchmarks.
    pub fn start_durable() -> Postgres {
        Self::start_with(true)
    }

    fn start_with(durable: bool) -> Postgres {
        let bin = bin_dir();
        let run_as = am_root().then_some("postgres");
        let dir = std::env::temp_dir().join(format!(
            "confab-pg-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&dir).expect("pg dir");
        if let Some(user) = run_as {
            chown(&dir, user);
        }
        let pg = Postgres {
            port: 0,
            dir,
            bin,
            run_as,
            durable,
        };
        let out = pg
            .command("initdb")
            .args([
                "--auth=trust",
                "--username=postgres",
                "--encoding=UTF8",
                "--no-sync",
            ])
            .arg("--pgdata")
            .arg(pg.data())
            .output()
            .expect("run initdb");
        assert!(
            out.status.success(),
            "initdb failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        // An immediate shutdown: nothing there is worth a checkpoint.
        confab_testprocs::watchdog(&pg.dir, &pg.data().join("postmaster.pid"), "QUIT");
        let mut pg = pg;
        // A port free now may be taken before postgres binds it: try again.
        for _ in 0..5 {
            pg.port = confab_testprocs::free_port(&[5432]);
            if pg.try_start() {
                return pg;
            }
        }
        panic!("postgres would not start; log: {}", pg.log());
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// A URL for database `db` on this server.
    pub fn url(&self, db: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{db}", self.port)
    }

    /// A new, empty database; its URL.
    pub fn fresh_database(&self) -> String {
        static DBS: AtomicU32 = AtomicU32::new(0);
        let name = format!("t{}", DBS.fetch_add(1, Ordering::Relaxed));
        self.psql("postgres", &format!("CREATE DATABASE {name}"));
        self.url(&name)
    }

    /// Runs `sql` in database `db`; its output, unaligned and without headers.
    pub fn psql(&self, db: &str, sql: &str) -> String {
        let out = Command::new(self.bin.join("psql"))
            .args([
                "-X",
                "-q",
                "-A",
                "-t",
                "-v",
                "ON_ERROR_STOP=1",
                "-h",
                "127.0.0.1",
            ])
            .args([
                "-p",
                &self.port.to_string(),
                "-U",
                "postgres",
                "-d",
                db,
                "-c",
                sql,
            ])
            .output()
            .expect("run psql");
        assert!(
            out.status.success(),
            "psql {sql:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    }

    /// A plain-text dump of database `db` (`pg_dump`): every row it holds.
    pub fn dump(&self, db: &str) -> Vec<u8> {
        let out = Command::new(self.bin.join("pg_dump"))
            .args([
                "-h",
                "127.0.0.1",
                "-p",
                &self.port.to_string(),
                "-U",
                "postgres",
                db,
            ])
            .output()
            .expect("run pg_dump");
        assert!(
            out.status.success(),
            "pg_dump: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        out.stdout
    }

    /// `kill -9` the postmaster and every backend, as a crash would, and
    /// wait until they are gone (a restart needs their shared memory freed).
    pub fn kill(&self) {
        let Some(pid) = self.pid() else { return };
        let mut pids = children(pid);
        pids.push(pid);
        for p in &pids {
            confab_testprocs::signal("KILL", *p);
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        while pids.iter().any(|p| confab_testprocs::alive(*p)) {
            assert!(Instant::now() < deadline, "postgres did not die");
            std::thread::sleep(Duration::from_millis(20));
        }
        // A crash leaves postmaster.pid behind; postgres checks the pid in
        // it is not running and starts anyway.
    }

    /// A clean, fast shutdown (`pg_ctl stop -m fast`).
    pub fn stop(&self) {
        let out = self
            .command("pg_ctl")
            .args(["stop", "-m", "fast", "-w", "-D"])
            .arg(self.data())
            .output()
            .expect("run pg_ctl");
        assert!(
            out.status.success(),
            "pg_ctl stop: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// Starts the server again on the same port and data, after `kill` or
    /// `stop`; it recovers from its WAL first.
    pub fn start_again(&self) {
        for _ in 0..50 {
            if self.try_start() {
                return;
            }
            // The port may still be held by the dying server's sockets.
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!("postgres would not start again; log: {}", self.log());
    }

    fn data(&self) -> PathBuf {
        self.dir.join("data")
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("log")).unwrap_or_default()
    }

    /// The postmaster's PID (its backends are its children).
    pub fn pid(&self) -> Option<u32> {
        let text = std::fs::read_to_string(self.data().join("postmaster.pid")).ok()?;
        text.lines().next()?.trim().parse().ok()
    }

    fn try_start(&self) -> bool {
        let sync = match self.durable {
            true => "",
            false => "-c fsync=off -c full_page_writes=off",
        };
        let options = format!(
            "-p {} -k {} -c listen_addresses=127.0.0.1 {sync} \
             -c max_connections=300 -c shared_buffers=32MB -c log_min_messages=warning",
            self.port,
            self.dir.display()
        );
        let status = self
            .command("pg_ctl")
            .args(["start", "-w", "-t", "60", "-D"])
            .arg(self.data())
            .arg("-l")
            .arg(self.dir.join("log"))
            .args(["-o", &options])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .expect("run pg_ctl");
        status.success()
    }

    fn command(&self, program: &str) -> Command {
        let path = self.bin.join(program);
        match self.run_as {
            Some(user) => {
                let mut c = Command::new("runuser");
                c.args(["-u", user, "--"]).arg(path);
                c
            }
            None => Command::new(path),
        }
    }
}

static NEXT: AtomicU32 = AtomicU32::new(0);

fn bin_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("CONFAB_PG_BIN") {
        return dir.into();
    }
    // The newest version installed.
    std::fs::read_dir(DEBIAN_DIR)
        .into_iter()
        .flatten()
        .filter_map(|e| e.ok())
        .filter_map(|e| Some((e.file_name().to_str()?.parse::<u32>().ok()?, e.path())))
        .filter(|(_, dir)| dir.join("bin/initdb").exists())
        .max()
        .map(|(_, dir)| dir.join("bin"))
        .expect("PostgreSQL server binaries not found: scripts/test.sh installs them (apt-get install postgresql), or set CONFAB_PG_BIN")
}

fn am_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| o.stdout.trim_ascii() == b"0")
}

fn chown(dir: &Path, user: &str) {
    let status = Command::new("chown")
        .arg(user)
        .arg(dir)
        .status()
        .expect("run chown");
    assert!(status.success(), "chown {user} {}", dir.display());
}

fn children(pid: u32) -> Vec<u32> {
    Command::new("pgrep")
        .args(["-P", &pid.to_string()])
        .output()
        .map(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .filter_map(|l| l.trim().parse().ok())
                .collect()
        })
        .unwrap_or_default()
}
