//! A private HAProxy in front of the nodes a test started.
//!
//! The configuration is the one docs/scaling.md shows (TCP mode, health
//! checks on `/healthz`, the PROXY protocol v2 to the nodes, and with
//! [`Options::connections_per_source`] the cap per client address),
//! written into a temp dir; `haproxy -db` runs in the foreground as a
//! child of the test process, on a random loopback port. HAProxy connects
//! to the nodes from [`SOURCE`], so that nodes can trust that address as
//! their proxy while tests reach them directly from 127.0.0.1. The admin
//! socket answers [`HaProxy::servers`], [`HaProxy::set_state`] and
//! [`HaProxy::connections_from`].
//!
//! Debian's package installs the binary as /usr/sbin/haproxy, often not on
//! `PATH`: it is found through `CONFAB_HAPROXY_BIN` (its directory), `PATH`,
//! then /usr/sbin.

use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

/// The address HAProxy connects to the nodes from.
pub const SOURCE: IpAddr = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 9));

const START_TIMEOUT: Duration = Duration::from_secs(10);

/// How HAProxy is set up in front of the nodes.
#[derive(Clone, Debug)]
pub struct Options {
    /// `leastconn` (the default: WebSockets are long), `roundrobin`, or
    /// `source` (a client address always to the same node).
    pub balance: &'static str,
    /// Send the PROXY protocol v2 header to the nodes (and with the
    /// health checks).
    pub send_proxy: bool,
    /// At most this many connections at once from one client address (an
    /// IPv6 /64 counting as one), across all nodes: docs/haproxy.cfg's
    /// stick table. `None`: no cap.
    pub connections_per_source: Option<u32>,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            balance: "leastconn",
            send_proxy: true,
            connections_per_source: None,
        }
    }
}

pub struct HaProxy {
    dir: PathBuf,
    port: u16,
    server: Mutex<Option<Child>>,
}

impl HaProxy {
    /// HAProxy in front of the nodes on these loopback ports, named n1, n2…
    /// in that order.
    pub fn start(nodes: &[u16], options: Options) -> HaProxy {
        let dir = std::env::temp_dir().join(format!(
            "confab-haproxy-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&dir).expect("haproxy dir");
        confab_testprocs::watchdog(&dir, &dir.join("haproxy.pid"), "KILL");
        let bin = confab_testprocs::find_bin(
            "haproxy",
            "CONFAB_HAPROXY_BIN",
            &["/usr/sbin"],
            "scripts/test.sh installs it (apt-get install haproxy)",
        );
        let mut haproxy = HaProxy {
            dir,
            port: 0,
            server: Mutex::new(None),
        };
        // A port free now may be taken before HAProxy binds it: try again.
        for _ in 0..5 {
            haproxy.port = confab_testprocs::free_port(&[]);
            std::fs::write(haproxy.config_file(), config(&haproxy, nodes, &options))
                .expect("haproxy.cfg");
            if haproxy.try_start(&bin) {
                return haproxy;
            }
        }
        panic!("haproxy would not start: {}", haproxy.log());
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// `http://127.0.0.1:PORT`, for clients.
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Each node's name and status as HAProxy sees it: `UP`, `DOWN`,
    /// `DRAIN`, `MAINT`, or a transition (`UP 1/2`…).
    pub fn servers(&self) -> Vec<(String, String)> {
        let csv = self.admin("show stat");
        let mut lines = csv.lines();
        let header: Vec<&str> = lines
            .next()
            .unwrap_or_default()
            .trim_start_matches("# ")
            .split(',')
            .collect();
        let column = |name: &str| header.iter().position(|h| *h == name);
        let (Some(px), Some(sv), Some(status)) =
            (column("pxname"), column("svname"), column("status"))
        else {
            panic!("unexpected show stat output: {csv}");
        };
        lines
            .map(|l| l.split(',').collect::<Vec<_>>())
            .filter(|f| {
                f.get(px) == Some(&"nodes") && !matches!(f.get(sv), Some(&"BACKEND") | None)
            })
            .map(|f| (f[sv].to_string(), f[status].to_string()))
            .collect()
    }

    /// The status of node `name` (n1, n2…).
    pub fn status(&self, name: &str) -> String {
        self.servers()
            .into_iter()
            .find(|(n, _)| n == name)
            .map(|(_, s)| s)
            .unwrap_or_else(|| panic!("no server {name}"))
    }

    /// Waits until node `name`'s status is `status`.
    pub fn wait_for(&self, name: &str, status: &str, within: Duration) {
        let deadline = Instant::now() + within;
        loop {
            let now = self.status(name);
            if now == status {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{name} is {now}, not {status}, after {within:?}: {:?}",
                self.servers()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// `set server nodes/NAME state STATE`: `ready`, `drain` or `maint`.
    pub fn set_state(&self, name: &str, state: &str) {
        let answer = self.admin(&format!("set server nodes/{name} state {state}"));
        assert!(answer.trim().is_empty(), "set server: {answer}");
    }

    /// The connections from `source` open through HAProxy now, as its
    /// per-source stick table counts them (`conn_cur`); 0 if it has no
    /// entry. Needs [`Options::connections_per_source`].
    pub fn connections_from(&self, source: IpAddr) -> u32 {
        // The table's keys: IPv4 mapped into IPv6, IPv6 cut to its /64.
        let key = match source {
            IpAddr::V4(v4) => v4.to_ipv6_mapped(),
            IpAddr::V6(v6) => std::net::Ipv6Addr::from_bits(v6.to_bits() & (u128::MAX << 64)),
        };
        let table = self.admin(&format!("show table clients key {key}"));
        assert!(
            table.starts_with("# table: clients"),
            "no per-source table (connections_per_source unset?): {table}"
        );
        table
            .lines()
            .filter(|line| line.contains(&format!(" key={key} ")))
            .flat_map(|line| line.split(' '))
            .find_map(|field| field.strip_prefix("conn_cur="))
            .map(|n| n.parse().expect("conn_cur is a number"))
            .unwrap_or(0)
    }

    /// One command on the admin socket, its whole answer.
    fn admin(&self, command: &str) -> String {
        let mut socket =
            UnixStream::connect(self.dir.join("admin.sock")).expect("haproxy admin socket");
        socket
            .write_all(format!("{command}\n").as_bytes())
            .expect("write to haproxy");
        let mut answer = String::new();
        socket
            .read_to_string(&mut answer)
            .expect("read from haproxy");
        answer
    }

    fn config_file(&self) -> PathBuf {
        self.dir.join("haproxy.cfg")
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("haproxy.log")).unwrap_or_default()
    }

    /// Starts HAProxy and waits until its frontend accepts; false if it
    /// exited first, most likely because the port was taken.
    fn try_start(&self, bin: &std::path::Path) -> bool {
        let log = std::fs::File::create(self.dir.join("haproxy.log")).expect("haproxy.log");
        let mut child = Command::new(bin)
            .arg("-db")
            .arg("-f")
            .arg(self.config_file())
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("haproxy.log"))
            .stderr(log)
            .spawn()
            .expect("run haproxy");
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if child.try_wait().expect("wait for haproxy").is_some() {
                return false;
            }
            if std::net::TcpStream::connect(("127.0.0.1", self.port)).is_ok()
                && self.dir.join("admin.sock").exists()
            {
                break;
            }
            if Instant::now() >= deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!(
                    "haproxy did not listen within {START_TIMEOUT:?}: {}",
                    self.log()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        std::fs::write(self.dir.join("haproxy.pid"), child.id().to_string()).expect("pid file");
        *self.server() = Some(child);
        true
    }

    fn server(&self) -> MutexGuard<'_, Option<Child>> {
        self.server.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl Drop for HaProxy {
    fn drop(&mut self) {
        if let Some(mut child) = self.server().take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

static NEXT: AtomicU32 = AtomicU32::new(0);

/// docs/scaling.md's configuration, with this test's ports and paths.
fn config(haproxy: &HaProxy, nodes: &[u16], options: &Options) -> String {
    let proxy = if options.send_proxy {
        " send-proxy-v2"
    } else {
        ""
    };
    let servers: String = nodes
        .iter()
        .enumerate()
        .map(|(i, port)| format!("  server n{} 127.0.0.1:{port}\n", i + 1))
        .collect();
    let cap = match options.connections_per_source {
        Some(n) => format!(
            "  stick-table type ipv6 size 1m expire 10m store conn_cur
  tcp-request connection track-sc0 src,ipmask(32,64)
  tcp-request connection reject if {{ sc_conn_cur(0) gt {n} }}
"
        ),
        None => String::new(),
    };
    format!(
        "global
  stats socket {dir}/admin.sock mode 600 level admin
defaults
  mode tcp
  timeout connect 2s
  timeout client 75s
  timeout server 75s
  timeout tunnel 1h
  timeout check 2s
  retries 2
  option redispatch
frontend clients
  bind 127.0.0.1:{port}
{cap}  default_backend nodes
backend nodes
  balance {balance}
  source {source}
  option httpchk
  http-check send meth GET uri /healthz ver HTTP/1.1 hdr Host confab
  http-check expect status 200
  default-server inter 300ms fall 2 rise 2 check{proxy}
{servers}",
        dir = haproxy.dir.display(),
        port = haproxy.port,
        balance = options.balance,
        source = SOURCE,
    )
}
