//! A running `tcpwatch daemon` on a free loopback port, and a plain HTTP/1.1
//! client for it (written by hand so the tests check the wire, not a
//! library's view of it).

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::Command;
use std::time::{Duration, Instant};

use super::{tcpwatch_bin, Finished, Proc, START_TIMEOUT, STOP_TIMEOUT};

/// A port free on 127.0.0.1 a moment ago.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free loopback port")
}

pub struct Daemon {
    pub proc: Proc,
    pub addr: SocketAddr,
}

impl Daemon {
    /// Starts `tcpwatch daemon` on a free port with `extra` arguments and
    /// waits until it serves.
    pub fn start(extra: &[&str]) -> Daemon {
        let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let mut cmd = Command::new(tcpwatch_bin());
        cmd.arg("daemon")
            .args(["--listen", &addr.to_string()])
            .args(extra);
        let proc = Proc::spawn(&format!("tcpwatch daemon {extra:?}"), cmd, false);
        proc.wait_stderr(|l| l.contains("listening on http://"), 1, START_TIMEOUT);
        Daemon { proc, addr }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn get(&self, path: &str) -> Response {
        request(
            self.addr,
            &format!("GET {path} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n"),
        )
    }

    pub fn get_json(&self, path: &str) -> serde_json::Value {
        let r = self.get(path);
        assert_eq!(r.status, 200, "GET {path}: {}", r.body);
        serde_json::from_str(&r.body).unwrap_or_else(|e| panic!("GET {path}: {e}: {}", r.body))
    }

    /// Polls `path` until `done` accepts the JSON, for up to `timeout`.
    pub fn wait_json(
        &self,
        path: &str,
        timeout: Duration,
        done: impl Fn(&serde_json::Value) -> bool,
    ) -> serde_json::Value {
        let deadline = Instant::now() + timeout;
        loop {
            let v = self.get_json(path);
            if done(&v) || Instant::now() > deadline {
                return v;
            }
            std::thread::sleep(Duration::from_millis(250));
        }
    }

    /// SIGTERM, and what it printed; asserts a clean exit.
    pub fn stop(self) -> Finished {
        self.proc.signal(libc::SIGTERM);
        let f = self.proc.finish(STOP_TIMEOUT);
        assert!(
            f.status.success(),
            "daemon exited with {}:\n{}",
            f.status,
            f.stderr.join("\n")
        );
        assert!(
            !f.stderr.iter().any(|l| l.contains("panicked")),
            "{}",
            f.stderr.join("\n")
        );
        f
    }
}

pub struct Response {
    pub status: u16,
    pub headers: String,
    pub body: String,
}

/// Sends `raw` and reads the answer until the server closes.
pub fn request(addr: SocketAddr, raw: &str) -> Response {
    let mut s = TcpStream::connect(addr).unwrap_or_else(|e| panic!("connect {addr}: {e}"));
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    s.write_all(raw.as_bytes()).unwrap();
    let mut buf = Vec::new();
    s.read_to_end(&mut buf)
        .unwrap_or_else(|e| panic!("reading the answer to {raw:?}: {e}"));
    let text = String::from_utf8_lossy(&buf).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status line in {text:?}"));
    Response {
        status,
        headers: head.to_string(),
        body: body.to_string(),
    }
}

/// The value of one series in a Prometheus text exposition: `series` is the
/// name with its labels exactly as written (`name{a="b"}`).
pub fn metric(text: &str, series: &str) -> Option<f64> {
    text.lines().filter(|l| !l.starts_with('#')).find_map(|l| {
        let (name, value) = l.rsplit_once(' ')?;
        (name == series).then(|| value.parse().ok()).flatten()
    })
}
