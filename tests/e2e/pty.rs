//! `confab chat` in a pseudo-terminal, driven as a person would: keys in,
//! the screen out (through a terminal emulator, vt100), and every byte the
//! program wrote to the terminal kept for checks.

use std::io::{Read, Write};
use std::path::Path;
use std::sync::{Arc, Mutex};

use portable_pty::{CommandBuilder, MasterPty, PtySize, native_pty_system};

use crate::harness::{TestServer, WAIT};

/// Tall enough that nothing of a test's chat scrolls off the screen.
const ROWS: u16 = 400;
const COLS: u16 = 160;

pub struct Pty {
    written: Arc<Mutex<Vec<u8>>>,
    keys: Box<dyn Write + Send>,
    child: Box<dyn portable_pty::Child + Send + Sync>,
    // Dropping the master hangs the program up.
    _master: Box<dyn MasterPty + Send>,
}

/// Keys as a terminal sends them.
pub const ENTER: &str = "\r";
pub const LEFT: &str = "\x1b[D";
pub const CTRL_D: &str = "\x04";

impl Pty {
    /// `confab <args>` for the user whose config directory is `config`.
    pub fn confab(server: &TestServer, config: &Path, args: &[&str]) -> Pty {
        let pair = native_pty_system()
            .openpty(PtySize {
                rows: ROWS,
                cols: COLS,
                pixel_width: 0,
                pixel_height: 0,
            })
            .expect("a pseudo-terminal");
        let mut command = CommandBuilder::new(env!("CARGO_BIN_EXE_confab"));
        command.args(args);
        command.cwd(config);
        command.env("TERM", "xterm");
        command.env("CONFAB_SERVER", format!("http://{}", server.url.authority));
        command.env("CONFAB_CONFIG_DIR", config);
        let child = pair.slave.spawn_command(command).expect("start confab");
        // The program holds the only other end: EOF when it exits.
        drop(pair.slave);
        let mut output = pair.master.try_clone_reader().expect("pty reader");
        let keys = pair.master.take_writer().expect("pty writer");
        let written = Arc::new(Mutex::new(Vec::new()));
        let sink = written.clone();
        // A thread of its own: it lives as long as the program writes.
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = output.read(&mut buf) {
                if n == 0 {
                    break;
                }
                sink.lock().unwrap().extend_from_slice(&buf[..n]);
            }
        });
        Pty {
            written,
            keys,
            child,
            _master: pair.master,
        }
    }

    pub fn keys(&mut self, keys: &str) {
        self.keys.write_all(keys.as_bytes()).expect("type");
        self.keys.flush().expect("type");
    }

    /// Types a line and presses enter.
    pub fn line(&mut self, text: &str) {
        self.keys(&format!("{text}{ENTER}"));
    }

    /// Every byte the program has written to the terminal.
    pub fn written(&self) -> Vec<u8> {
        self.written.lock().unwrap().clone()
    }

    /// What the terminal shows now, line by line.
    pub fn screen(&self) -> Vec<String> {
        let size = |n: u16| std::num::NonZero::new(n).expect("not zero");
        let mut terminal = vt100::Parser::new(size(ROWS), size(COLS), 0);
        terminal.process(&self.written());
        terminal
            .screen()
            .contents()
            .lines()
            .map(|l| l.trim_end().to_string())
            .collect()
    }

    /// How many lines of the screen contain `text`.
    pub fn count(&self, text: &str) -> usize {
        self.screen().iter().filter(|l| l.contains(text)).count()
    }

    /// Waits until a line of the screen contains `text`.
    pub async fn wait_for(&self, text: &str) {
        let deadline = tokio::time::Instant::now() + WAIT;
        while self.count(text) == 0 {
            assert!(
                tokio::time::Instant::now() < deadline,
                "the screen never showed {text:?}:\n{}",
                self.screen().join("\n")
            );
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
    }

    /// Waits for the program to exit; its exit code.
    pub async fn exit_code(&mut self) -> u32 {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            if let Some(status) = self.child.try_wait().expect("wait") {
                return status.exit_code();
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "still running:\n{}",
                self.screen().join("\n")
            );
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
    }
}

impl Drop for Pty {
    fn drop(&mut self) {
        let _ = self.child.kill();
    }
}
