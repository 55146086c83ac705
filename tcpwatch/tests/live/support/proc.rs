//! Child processes whose output is collected line by line as they run, and
//! that are killed if a test fails.

use std::io::{BufRead, BufReader, Read, Write};
use std::process::{Child, ChildStdin, Command, ExitStatus, Stdio};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

#[derive(Default)]
struct Stream {
    lines: Vec<String>,
    eof: bool,
}

#[derive(Default)]
struct Shared {
    state: Mutex<Stream>,
    cv: Condvar,
}

impl Shared {
    fn collect(self: &Arc<Self>, pipe: impl Read + Send + 'static) -> JoinHandle<()> {
        let me = self.clone();
        std::thread::spawn(move || {
            let mut r = BufReader::with_capacity(256 * 1024, pipe);
            let mut buf = Vec::new();
            loop {
                buf.clear();
                match r.read_until(b'\n', &mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {
                        if buf.last() == Some(&b'\n') {
                            buf.pop();
                        }
                        let line = String::from_utf8_lossy(&buf).into_owned();
                        me.state.lock().unwrap().lines.push(line);
                        me.cv.notify_all();
                    }
                }
            }
            me.state.lock().unwrap().eof = true;
            me.cv.notify_all();
        })
    }

    fn snapshot(&self) -> Vec<String> {
        self.state.lock().unwrap().lines.clone()
    }

    /// Waits until `n` lines satisfy `pred`; `Err` on timeout or EOF.
    fn wait(
        &self,
        pred: &dyn Fn(&str) -> bool,
        n: usize,
        timeout: Duration,
    ) -> Result<Vec<String>, String> {
        let deadline = Instant::now() + timeout;
        let mut st = self.state.lock().unwrap();
        loop {
            let hits: Vec<String> = st.lines.iter().filter(|l| pred(l)).cloned().collect();
            if hits.len() >= n {
                return Ok(hits);
            }
            if st.eof {
                return Err("stream closed".into());
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(format!("timed out after {timeout:?}"));
            }
            st = self.cv.wait_timeout(st, deadline - now).unwrap().0;
        }
    }
}

/// What a finished child printed.
#[derive(Debug)]
pub struct Finished {
    pub status: ExitStatus,
    pub stdout: Vec<String>,
    pub stderr: Vec<String>,
}

/// A child whose stdout and stderr are collected line by line as it runs.
/// Dropping it kills the child, so a failing test leaves nothing behind.
pub struct Proc {
    pub name: String,
    child: Option<Child>,
    stdin: Option<ChildStdin>,
    out: Arc<Shared>,
    err: Arc<Shared>,
    readers: Vec<JoinHandle<()>>,
}

impl Proc {
    pub fn spawn(name: &str, cmd: Command, with_stdin: bool) -> Proc {
        Proc::start(name, cmd, with_stdin, None)
    }

    /// Like [`Proc::spawn`] without stdin, but stdout goes to `stdout` (a
    /// file, or `Stdio::null()` for a flood nobody reads) and only stderr
    /// is collected.
    pub fn spawn_stdout_to(name: &str, cmd: Command, stdout: Stdio) -> Proc {
        Proc::start(name, cmd, false, Some(stdout))
    }

    fn start(name: &str, mut cmd: Command, with_stdin: bool, stdout: Option<Stdio>) -> Proc {
        cmd.stdout(stdout.unwrap_or_else(Stdio::piped))
            .stderr(Stdio::piped());
        cmd.stdin(if with_stdin {
            Stdio::piped()
        } else {
            Stdio::null()
        });
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {name} ({cmd:?}): {e}"));
        let out = Arc::new(Shared::default());
        let err = Arc::new(Shared::default());
        let mut readers = vec![err.collect(child.stderr.take().unwrap())];
        match child.stdout.take() {
            Some(pipe) => readers.push(out.collect(pipe)),
            None => out.state.lock().unwrap().eof = true,
        }
        Proc {
            name: name.to_string(),
            stdin: child.stdin.take(),
            child: Some(child),
            out,
            err,
            readers,
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("child still owned").id()
    }

    pub fn describe(&self) -> String {
        format!(
            "--- {} stdout (last lines) ---\n{}\n--- {} stderr ---\n{}",
            self.name,
            tail(&self.out.snapshot(), 30),
            self.name,
            tail(&self.err.snapshot(), 60)
        )
    }

    pub fn wait_stdout(&self, pred: impl Fn(&str) -> bool, n: usize, t: Duration) -> Vec<String> {
        self.out.wait(&pred, n, t).unwrap_or_else(|e| {
            panic!(
                "{}: waiting for stdout: {e}\n{}",
                self.name,
                self.describe()
            )
        })
    }

    /// Whether a stdout line satisfying `pred` comes within `t`.
    pub fn try_wait_stdout(&self, pred: impl Fn(&str) -> bool, t: Duration) -> bool {
        self.out.wait(&pred, 1, t).is_ok()
    }

    pub fn wait_stderr(&self, pred: impl Fn(&str) -> bool, n: usize, t: Duration) -> Vec<String> {
        self.err.wait(&pred, n, t).unwrap_or_else(|e| {
            panic!(
                "{}: waiting for stderr: {e}\n{}",
                self.name,
                self.describe()
            )
        })
    }

    pub fn try_wait_stderr(&self, pred: impl Fn(&str) -> bool, t: Duration) -> bool {
        self.err.wait(&pred, 1, t).is_ok()
    }

    pub fn stderr_now(&self) -> Vec<String> {
        self.err.snapshot()
    }

    pub fn send_line(&mut self, line: &str) {
        let stdin = self.stdin.as_mut().expect("started with stdin");
        writeln!(stdin, "{line}")
            .and_then(|_| stdin.flush())
            .unwrap_or_else(|e| panic!("{}: writing stdin: {e}\n{}", self.name, self.describe()));
    }

    pub fn signal(&self, sig: libc::c_int) {
        // SAFETY: kill has no memory-safety preconditions; the pid is our
        // own child, not yet reaped (we still own the Child).
        unsafe { libc::kill(self.pid() as libc::pid_t, sig) };
    }

    /// Waits for the child to exit on its own (after a signal, its stdin
    /// closing, or by itself) and returns everything it printed. Kills it
    /// and panics on timeout.
    pub fn finish(mut self, timeout: Duration) -> Finished {
        self.stdin.take();
        let deadline = Instant::now() + timeout;
        let status = loop {
            let child = self.child.as_mut().unwrap();
            match child.try_wait() {
                Ok(Some(s)) => break s,
                Ok(None) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(20))
                }
                Ok(None) => {
                    let _ = child.kill();
                    let _ = child.wait();
                    panic!(
                        "{} did not exit within {timeout:?}\n{}",
                        self.name,
                        self.describe()
                    );
                }
                Err(e) => panic!("{}: wait: {e}", self.name),
            }
        };
        self.child = None;
        for r in self.readers.drain(..) {
            let _ = r.join();
        }
        Finished {
            status,
            stdout: std::mem::take(&mut self.out.state.lock().unwrap().lines),
            stderr: std::mem::take(&mut self.err.state.lock().unwrap().lines),
        }
    }

    /// SIGINT (how a user stops tcpwatch), then [`Proc::finish`]; checks a
    /// clean exit without a panic.
    pub fn interrupt(self, timeout: Duration) -> Finished {
        self.signal(libc::SIGINT);
        let name = self.name.clone();
        let f = self.finish(timeout);
        let stderr = f.stderr.join("\n");
        assert!(
            f.status.success() && !stderr.contains("panicked"),
            "{name} exited with {}\nstderr:\n{stderr}",
            f.status
        );
        f
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

pub fn tail(lines: &[String], n: usize) -> String {
    lines[lines.len().saturating_sub(n)..].join("\n")
}
