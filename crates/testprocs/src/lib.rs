//! Process plumbing shared by the private test servers (`confab-testpg`,
//! `confab-testredis`, `confab-tests3`): each starts a real server as a
//! child on a loopback port in a temp dir of its own, and must leave
//! nothing behind however the test process ends.

use std::path::Path;
use std::process::{Command, Stdio};

/// A loopback port free now (someone may take it before the caller binds
/// it: callers retry), never one of `avoid` (the machine's own services).
pub fn free_port(avoid: &[u16]) -> u16 {
    loop {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        if !avoid.contains(&port) {
            return port;
        }
    }
}

/// Once this test process ends, however it ends (a test binary's statics
/// are never dropped, and a killed one runs no `Drop`): send `signal` to
/// the pid on the first line of `pid_file`, wait up to 5 s for it to go,
/// and remove `dir`. In a process group of its own, so that a Ctrl-C meant
/// for the tests does not stop it too.
#[allow(
    clippy::zombie_processes,
    reason = "it outlives the test process on purpose"
)]
pub fn watchdog(dir: &Path, pid_file: &Path, signal: &str) {
    use std::os::unix::process::CommandExt;
    let script = format!(
        "while kill -0 {test} 2>/dev/null; do sleep 1; done; \
         pid=$(head -n1 '{pid_file}' 2>/dev/null); \
         [ -n \"$pid\" ] && kill -{signal} \"$pid\" 2>/dev/null; \
         for _ in $(seq 50); do [ -n \"$pid\" ] && kill -0 \"$pid\" 2>/dev/null || break; sleep 0.1; done; \
         rm -rf '{dir}'",
        test = std::process::id(),
        pid_file = pid_file.display(),
        dir = dir.display(),
    );
    Command::new("sh")
        .args(["-c", &script])
        .process_group(0)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start the watchdog");
}

/// `kill -NAME pid`; a process already gone is no error.
pub fn signal(name: &str, pid: u32) {
    let _ = Command::new("kill")
        .args([&format!("-{name}"), &pid.to_string()])
        .status();
}

/// Whether `pid` runs. A zombie counts as dead: whether anything reaps it
/// is up to its parent or the machine's init.
pub fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| {
        !s.rsplit(')')
            .next()
            .unwrap_or("")
            .trim_start()
            .starts_with('Z')
    })
}

/// `program` from the directory in the environment variable `var` if it
/// is set, else from `PATH` and then `extra` directories; the panic names
/// how to get it.
pub fn find_bin(program: &str, var: &str, extra: &[&str], install: &str) -> std::path::PathBuf {
    let dirs: Vec<std::path::PathBuf> = match std::env::var_os(var) {
        Some(dir) => vec![dir.into()],
        None => std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default())
            .chain(extra.iter().map(Into::into))
            .collect(),
    };
    dirs.iter()
        .map(|dir| dir.join(program))
        .find(|path| path.is_file())
        .unwrap_or_else(|| {
            panic!(
                "{program} not found in {}: {install}, or set {var} to the directory holding it",
                if std::env::var_os(var).is_some() {
                    var
                } else {
                    "PATH"
                }
            )
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn free_ports_avoid_what_they_are_told() {
        let first = free_port(&[]);
        for _ in 0..20 {
            assert_ne!(free_port(&[first]), first);
        }
    }

    #[test]
    fn a_dead_process_is_not_alive() {
        let mut child = Command::new("true").spawn().unwrap();
        let pid = child.id();
        child.wait().unwrap();
        assert!(!alive(pid));
        assert!(alive(std::process::id()));
    }

    #[test]
    #[should_panic(expected = "set CONFAB_NO_SUCH_BIN")]
    fn a_missing_binary_says_how_to_get_it() {
        find_bin("no-such-program", "CONFAB_NO_SUCH_BIN", &[], "install it");
    }
}
