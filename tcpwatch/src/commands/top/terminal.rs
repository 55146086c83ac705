//! The terminal while `top` runs: raw mode and the alternate screen (the
//! shell's screen comes back untouched), keys read on a thread of their
//! own, and stderr held back so that warnings do not scribble over the
//! view: the latest one is shown in the footer, and all of them are
//! written out once the terminal is restored. Restored on every way out:
//! `q`, Ctrl-C (a key in raw mode), SIGINT/SIGTERM (the caller returns
//! normally), an error, and a panic (a hook restores before the message).

use std::io::{self, BufRead, BufReader, IsTerminal, Stdout};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};
use std::sync::{Arc, Mutex, Once};
use std::thread::JoinHandle;
use std::time::Duration;

use crossterm::event::{self, Event, KeyCode, KeyEventKind, KeyModifiers};
use crossterm::terminal::{
    disable_raw_mode, enable_raw_mode, EnterAlternateScreen, LeaveAlternateScreen,
};
use crossterm::{cursor, execute};
use ratatui::backend::CrosstermBackend;
use ratatui::Terminal;
use tokio::sync::mpsc;

use crate::views::top::{draw, Screen, ViewState};

/// What a key asks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Key {
    Quit,
    Sort,
    Reverse,
    /// The terminal changed size.
    Redraw,
}

/// The key a terminal event means, if any.
pub fn key_of(e: &Event) -> Option<Key> {
    match e {
        Event::Key(k) if k.kind != KeyEventKind::Release => match k.code {
            KeyCode::Char('c') if k.modifiers.contains(KeyModifiers::CONTROL) => Some(Key::Quit),
            KeyCode::Char('q' | 'Q') | KeyCode::Esc => Some(Key::Quit),
            KeyCode::Char('s' | 'S') => Some(Key::Sort),
            KeyCode::Char('r' | 'R') => Some(Key::Reverse),
            _ => None,
        },
        Event::Resize(..) => Some(Key::Redraw),
        _ => None,
    }
}

#[derive(Debug, thiserror::Error)]
pub enum TerminalError {
    #[error("top draws a full-screen view and needs a terminal, but its standard output is not one (for piped output use `tcpwatch timewait` or `tcpwatch conns`)")]
    NotATerminal,
    #[error("cannot set up the terminal")]
    Setup(#[source] io::Error),
}

/// Fails when stdout is not a terminal: checked before anything is loaded.
pub fn check() -> Result<(), TerminalError> {
    if io::stdout().is_terminal() {
        Ok(())
    } else {
        Err(TerminalError::NotATerminal)
    }
}

/// The saved stderr while it is held back (-1: not held), for the panic
/// hook.
static SAVED_STDERR: AtomicI32 = AtomicI32::new(-1);

/// Puts the terminal back: stderr, raw mode, screen and cursor. Harmless
/// when they already are.
fn restore_terminal() {
    let saved = SAVED_STDERR.swap(-1, Ordering::SeqCst);
    if saved >= 0 {
        // SAFETY: `saved` is the descriptor `Capture` duplicated from fd 2
        // and still owns; dup2 onto 2 has no other precondition.
        unsafe { libc::dup2(saved, 2) };
    }
    let _ = execute!(io::stdout(), LeaveAlternateScreen, cursor::Show);
    let _ = disable_raw_mode();
}

/// A panic restores the terminal before its message is printed.
fn install_panic_hook() {
    static HOOK: Once = Once::new();
    HOOK.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            restore_terminal();
            previous(info);
        }));
    });
}

/// Most lines of stderr kept while it is held back.
const KEEP_LINES: usize = 1000;

/// Stderr redirected into a pipe that a thread reads.
struct Capture {
    saved: OwnedFd,
    reader: Option<JoinHandle<Vec<String>>>,
    latest: Arc<Mutex<Option<String>>>,
}

impl Capture {
    fn start() -> io::Result<Capture> {
        let mut fds = [0 as RawFd; 2];
        // SAFETY: fds has room for the two descriptors pipe2 writes.
        if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: pipe2 succeeded: both are open descriptors owned here.
        let (read, write) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        // SAFETY: fd 2 is open for the life of the process.
        let saved = unsafe { libc::fcntl(2, libc::F_DUPFD_CLOEXEC, 3) };
        if saved < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: fcntl returned a new descriptor owned by nobody else.
        let saved = unsafe { OwnedFd::from_raw_fd(saved) };
        // SAFETY: both descriptors are open; fd 2 now writes to the pipe,
        // and `write` is closed when it drops, so the pipe ends when fd 2
        // is given back.
        if unsafe { libc::dup2(write.as_raw_fd(), 2) } < 0 {
            return Err(io::Error::last_os_error());
        }
        drop(write);
        SAVED_STDERR.store(saved.as_raw_fd(), Ordering::SeqCst);
        let latest = Arc::new(Mutex::new(None));
        let seen = latest.clone();
        let reader = std::thread::Builder::new()
            .name("tcpwatch-stderr".into())
            .spawn(move || {
                let mut lines = std::collections::VecDeque::new();
                let mut dropped = 0u64;
                for line in BufReader::new(std::fs::File::from(read)).lines() {
                    let Ok(line) = line else { break };
                    if let Ok(mut l) = seen.lock() {
                        *l = Some(line.clone());
                    }
                    if lines.len() == KEEP_LINES {
                        lines.pop_front();
                        dropped += 1;
                    }
                    lines.push_back(line);
                }
                let mut held: Vec<String> = lines.into();
                if dropped > 0 {
                    held.insert(
                        0,
                        format!(
                            "tcpwatch: {dropped} earlier messages written while the view was up are left out; the last {KEEP_LINES} follow"
                        ),
                    );
                }
                held
            })?;
        Ok(Capture {
            saved,
            reader: Some(reader),
            latest,
        })
    }

    fn latest(&self) -> Option<String> {
        self.latest.lock().ok().and_then(|l| l.clone())
    }

    /// Gives fd 2 back and returns what was written to it meanwhile.
    fn stop(&mut self) -> Vec<String> {
        if SAVED_STDERR
            .compare_exchange(
                self.saved.as_raw_fd(),
                -1,
                Ordering::SeqCst,
                Ordering::SeqCst,
            )
            .is_ok()
        {
            // SAFETY: `saved` is open and owned here.
            unsafe { libc::dup2(self.saved.as_raw_fd(), 2) };
        }
        self.reader
            .take()
            .and_then(|r| r.join().ok())
            .unwrap_or_default()
    }
}

/// The terminal in full-screen mode, and the keys typed on it.
pub struct Ui {
    terminal: Terminal<CrosstermBackend<Stdout>>,
    keys: mpsc::UnboundedReceiver<Key>,
    stop: Arc<AtomicBool>,
    reader: Option<JoinHandle<()>>,
    capture: Option<Capture>,
    active: bool,
}

impl Ui {
    /// Raw mode, the alternate screen, the cursor hidden, the key reader
    /// started, and stderr held back when it is the terminal too.
    pub fn enter() -> Result<Ui, TerminalError> {
        check()?;
        install_panic_hook();
        let capture = if io::stderr().is_terminal() {
            Some(Capture::start().map_err(TerminalError::Setup)?)
        } else {
            None
        };
        let setup = || -> io::Result<Terminal<CrosstermBackend<Stdout>>> {
            enable_raw_mode()?;
            execute!(io::stdout(), EnterAlternateScreen, cursor::Hide)?;
            let mut t = Terminal::new(CrosstermBackend::new(io::stdout()))?;
            t.clear()?;
            Ok(t)
        };
        let terminal = match setup() {
            Ok(t) => t,
            Err(e) => {
                restore_terminal();
                return Err(TerminalError::Setup(e));
            }
        };
        let (tx, keys) = mpsc::unbounded_channel();
        let stop = Arc::new(AtomicBool::new(false));
        let stopped = stop.clone();
        let reader = std::thread::Builder::new()
            .name("tcpwatch-keys".into())
            .spawn(move || {
                while !stopped.load(Ordering::Relaxed) {
                    match event::poll(Duration::from_millis(100)) {
                        Ok(true) => {}
                        Ok(false) => continue,
                        Err(_) => break,
                    }
                    match event::read() {
                        Ok(e) => {
                            if let Some(k) = key_of(&e) {
                                if tx.send(k).is_err() {
                                    break;
                                }
                            }
                        }
                        Err(_) => break,
                    }
                }
            })
            .map_err(TerminalError::Setup)?;
        Ok(Ui {
            terminal,
            keys,
            stop,
            reader: Some(reader),
            capture,
            active: true,
        })
    }

    /// Draws the screen; ratatui writes only the cells that changed.
    pub fn draw(&mut self, screen: &Screen, view: &ViewState) -> io::Result<()> {
        self.terminal.draw(|f| draw(f, screen, view)).map(|_| ())
    }

    /// A key typed since the last call, without waiting.
    pub fn try_key(&mut self) -> Option<Key> {
        self.keys.try_recv().ok()
    }

    /// The next key; `None` once the key reader stopped.
    pub async fn key(&mut self) -> Option<Key> {
        self.keys.recv().await
    }

    /// The latest line written to stderr while it is held back.
    pub fn latest_message(&self) -> Option<String> {
        self.capture.as_ref().and_then(Capture::latest)
    }

    /// Restores the terminal and returns what was written to stderr while
    /// it was held back (for the caller to write out now).
    pub fn leave(&mut self) -> Vec<String> {
        if !self.active {
            return Vec::new();
        }
        self.active = false;
        self.stop.store(true, Ordering::Relaxed);
        if let Some(r) = self.reader.take() {
            let _ = r.join();
        }
        let held = self.capture.as_mut().map(Capture::stop).unwrap_or_default();
        let _ = execute!(
            self.terminal.backend_mut(),
            LeaveAlternateScreen,
            cursor::Show
        );
        let _ = disable_raw_mode();
        held
    }

    /// [`Ui::leave`], writing out what stderr held.
    pub fn close(&mut self) {
        for line in self.leave() {
            eprintln!("{line}");
        }
    }
}

impl Drop for Ui {
    fn drop(&mut self) {
        self.close();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crossterm::event::{KeyEvent, KeyEventState};

    fn press(code: KeyCode, modifiers: KeyModifiers) -> Event {
        Event::Key(KeyEvent {
            code,
            modifiers,
            kind: KeyEventKind::Press,
            state: KeyEventState::NONE,
        })
    }

    #[test]
    fn keys_mean_what_the_footer_says() {
        let none = KeyModifiers::NONE;
        assert_eq!(key_of(&press(KeyCode::Char('q'), none)), Some(Key::Quit));
        assert_eq!(
            key_of(&press(KeyCode::Char('c'), KeyModifiers::CONTROL)),
            Some(Key::Quit)
        );
        assert_eq!(key_of(&press(KeyCode::Char('c'), none)), None);
        assert_eq!(key_of(&press(KeyCode::Char('s'), none)), Some(Key::Sort));
        assert_eq!(key_of(&press(KeyCode::Char('r'), none)), Some(Key::Reverse));
        assert_eq!(key_of(&Event::Resize(100, 30)), Some(Key::Redraw));
        assert_eq!(key_of(&press(KeyCode::Char('x'), none)), None);
    }
}
