//! What the person (or script) at the other end of `chat` types, and the
//! lines the chat shows them.
//!
//! At a terminal, input goes through a line editor (rustyline) running in a
//! thread of its own, so that arrow keys, Home, End and backspace edit the
//! line instead of being sent, and lines printed while the user types go
//! above the prompt instead of through what they are typing. The prompt says
//! whether the chat is online. From a script (stdin not a terminal), lines
//! are read as they come and output is plain.

use std::io::{BufRead, IsTerminal, Write};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use rustyline::error::ReadlineError;
use rustyline::{Config, DefaultEditor, ExternalPrinter as _, Prompt};
use tokio::sync::{mpsc, oneshot};

/// One width for every status: the editor measures the prompt once per
/// line but repaints its text whenever something is printed above it.
const PROMPTS: [&str; 2] = ["online  > ", "offline > "];

pub enum Typed {
    Line(String),
    /// ctrl-d, ctrl-c, or the end of a script's input.
    End,
}

/// Where the chat's lines go: above the editor's prompt, or to stdout.
#[derive(Clone)]
pub struct Printer(Option<mpsc::UnboundedSender<Print>>);

pub enum Print {
    Line(String),
    /// Answered once every line before it is out.
    Flush(oneshot::Sender<()>),
}

impl Printer {
    pub fn line(&self, text: impl Into<String>) {
        let text = text.into();
        match &self.0 {
            Some(tx) => {
                // The printer thread is gone only if the terminal went away.
                if let Err(mpsc::error::SendError(Print::Line(text))) = tx.send(Print::Line(text)) {
                    println!("{text}");
                }
            }
            None => println!("{text}"),
        }
    }
}

struct StatusPrompt(Arc<AtomicUsize>);

impl Prompt for StatusPrompt {
    fn raw(&self) -> &str {
        PROMPTS[self.0.load(Ordering::Relaxed)]
    }
}

pub struct Terminal {
    typed: mpsc::UnboundedReceiver<Typed>,
    printer: Printer,
    status: Arc<AtomicUsize>,
    /// The terminal's settings before the editor put it in raw mode: put
    /// back on every way out, also when the editor's thread is mid-line.
    saved: Option<nix::sys::termios::Termios>,
}

impl Terminal {
    /// A line editor when stdin and stdout are a terminal the editor can
    /// drive; lines from stdin otherwise.
    pub fn start() -> Terminal {
        let tty = std::io::stdin().is_terminal() && std::io::stdout().is_terminal();
        if tty && let Some(terminal) = Self::editor() {
            return terminal;
        }
        let (tx, typed) = mpsc::unbounded_channel();
        // A thread, not a task: a blocking read of stdin cannot be
        // cancelled, and the runtime would wait for it at exit.
        std::thread::spawn(move || {
            for line in std::io::stdin().lock().lines() {
                let Ok(line) = line else { break };
                if tx.send(Typed::Line(line)).is_err() {
                    return;
                }
            }
            let _ = tx.send(Typed::End);
        });
        Terminal {
            typed,
            printer: Printer(None),
            status: Arc::default(),
            saved: None,
        }
    }

    /// `None` when the terminal cannot be driven (`TERM=dumb`, say).
    fn editor() -> Option<Terminal> {
        let saved = nix::sys::termios::tcgetattr(std::io::stdin()).ok()?;
        let config = Config::builder().auto_add_history(true).build();
        let mut editor = DefaultEditor::with_config(config).ok()?;
        let mut printer = editor.create_external_printer().ok()?;
        // Printing can block; async code only ever queues a line.
        let (print_tx, mut print_rx) = mpsc::unbounded_channel::<Print>();
        std::thread::spawn(move || {
            while let Some(print) = print_rx.blocking_recv() {
                match print {
                    // A line printed between two prompts needs its own
                    // newline, or the next prompt overwrites it.
                    Print::Line(line) => {
                        if printer.print(format!("{line}\n")).is_err() {
                            break;
                        }
                    }
                    Print::Flush(done) => {
                        let _ = done.send(());
                    }
                }
            }
        });
        let status = Arc::new(AtomicUsize::new(1));
        let prompt = StatusPrompt(status.clone());
        let (tx, typed) = mpsc::unbounded_channel();
        std::thread::spawn(move || {
            loop {
                let typed = match editor.readline(&prompt) {
                    Ok(line) => Typed::Line(line),
                    Err(ReadlineError::Eof | ReadlineError::Interrupted) => Typed::End,
                    Err(e) => {
                        tracing::warn!(error = %e, "the line editor failed");
                        Typed::End
                    }
                };
                let end = matches!(typed, Typed::End);
                if tx.send(typed).is_err() || end {
                    return;
                }
            }
        });
        Some(Terminal {
            typed,
            printer: Printer(Some(print_tx)),
            status,
            saved: Some(saved),
        })
    }

    pub fn printer(&self) -> Printer {
        self.printer.clone()
    }

    /// The next line typed; `Typed::End` once input has ended (and forever
    /// after).
    pub async fn next(&mut self) -> Typed {
        self.typed.recv().await.unwrap_or(Typed::End)
    }

    /// Waits until every line printed so far is out.
    pub async fn flush(&self) {
        match &self.printer.0 {
            Some(tx) => {
                let (done, printed) = oneshot::channel();
                if tx.send(Print::Flush(done)).is_ok() {
                    let _ = printed.await;
                }
            }
            None => {
                let _ = std::io::stdout().flush();
            }
        }
    }

    /// Shown in the prompt from its next repaint on (a line printed above
    /// it repaints it).
    pub fn set_online(&self, online: bool) {
        self.status
            .store(if online { 0 } else { 1 }, Ordering::Relaxed);
    }
}

impl Drop for Terminal {
    fn drop(&mut self) {
        if let Some(saved) = &self.saved {
            // The editor may have been mid-line: bracketed paste off, and
            // the terminal's settings as they were.
            let mut stdout = std::io::stdout();
            let _ = stdout.write_all(b"\x1b[?2004l");
            let _ = stdout.flush();
            let _ = nix::sys::termios::tcsetattr(
                std::io::stdin(),
                nix::sys::termios::SetArg::TCSADRAIN,
                saved,
            );
        }
    }
}
