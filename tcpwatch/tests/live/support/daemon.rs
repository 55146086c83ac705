//! A running `tcpwatch daemon` on a free loopback port (directly or under a
//! wrapper such as setpriv or strace), a plain HTTP client for it (written
//! by hand so the tests check the wire, not a library's view of it), the
//! Prometheus text format, and a real Prometheus server (Debian's
//! `prometheus`) scraping it and answering queries on its HTTP API.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use serde::de::DeserializeOwned;

use super::{free_port, tcpwatch_bin, Finished, Proc, Scratch, START_TIMEOUT, STOP_TIMEOUT};

// ---------------------------------------------------------------------------
// HTTP

/// One HTTP response.
#[derive(Debug)]
pub struct Response {
    pub status: u16,
    pub headers: String,
    pub body: String,
}

/// Sends `raw` to `addr` and reads the answer until the server closes the
/// connection. A refused connection is an error to retry, not a panic.
pub fn request(addr: SocketAddr, raw: &str) -> std::io::Result<Response> {
    let mut s = TcpStream::connect(addr)?;
    s.set_read_timeout(Some(Duration::from_secs(20)))?;
    s.write_all(raw.as_bytes())?;
    let mut buf = Vec::new();
    s.read_to_end(&mut buf)?;
    let text = String::from_utf8_lossy(&buf).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("no status line in {text:?}")))?;
    Ok(Response {
        status,
        headers: head.to_string(),
        body: body.to_string(),
    })
}

/// `GET path` as HTTP/1.0 (Prometheus answers HTTP/1.1 in chunks; 1.0
/// gets the body as it is).
pub fn http_get(addr: SocketAddr, path: &str) -> std::io::Result<Response> {
    request(
        addr,
        &format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\nAccept: */*\r\nConnection: close\r\n\r\n"),
    )
}

/// Percent-encodes a query-string value.
pub fn url_encode(text: &str) -> String {
    text.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

// ---------------------------------------------------------------------------
// tcpwatch daemon

/// A running `tcpwatch daemon` (killed if dropped).
pub struct Daemon {
    pub proc: Proc,
    pub addr: SocketAddr,
}

impl Daemon {
    /// `tcpwatch daemon` on a free port with `extra` arguments, once it
    /// serves.
    pub fn start(extra: &[&str]) -> Daemon {
        Daemon::start_as("tcpwatch daemon", &[], Path::new(tcpwatch_bin()), extra)
    }

    /// `tcpwatch daemon --listen 127.0.0.1:<free port> <extra>`, run as
    /// `wrapper + [binary]` (e.g. setpriv ...), once it says it is live.
    /// Panics with its output if it exits first.
    pub fn start_as(name: &str, wrapper: &[String], binary: &Path, extra: &[&str]) -> Daemon {
        Daemon::try_start(name, wrapper, binary, extra)
            .unwrap_or_else(|output| panic!("{name}: tcpwatch daemon did not start:\n{output}"))
    }

    /// Like [`Daemon::start_as`], but a daemon that exits before it is live
    /// gives `Err(everything it printed, with its exit status)`.
    pub fn try_start(
        name: &str,
        wrapper: &[String],
        binary: &Path,
        extra: &[&str],
    ) -> Result<Daemon, String> {
        let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let mut words: Vec<String> = wrapper.to_vec();
        words.push(binary.display().to_string());
        words.extend(["daemon".into(), "--listen".into(), addr.to_string()]);
        words.extend(extra.iter().map(|s| s.to_string()));
        let mut cmd = Command::new(&words[0]);
        cmd.args(&words[1..]);
        let proc = Proc::spawn(&format!("{name}: {}", words.join(" ")), cmd, false);
        let live = format!("listening on http://{addr}");
        if proc.try_wait_stderr(
            |l| l.contains(&live) && l.contains("tracing"),
            START_TIMEOUT,
        ) {
            return Ok(Daemon { proc, addr });
        }
        let f = proc.finish(STOP_TIMEOUT);
        Err(format!(
            "{}\nstdout:\n{}\nstderr:\n{}",
            f.status,
            f.stdout.join("\n"),
            f.stderr.join("\n")
        ))
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// `GET path` as HTTP/1.1, whatever the status.
    pub fn get(&self, path: &str) -> Response {
        request(
            self.addr,
            &format!("GET {path} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n"),
        )
        .unwrap_or_else(|e| panic!("GET {}{path}: {e}", self.url()))
    }

    /// `GET path`, which must answer 200, read as `T`.
    pub fn get_as<T: DeserializeOwned>(&self, path: &str) -> T {
        let r = self.get(path);
        assert_eq!(r.status, 200, "GET {path}: {}", r.body);
        serde_json::from_str(&r.body).unwrap_or_else(|e| panic!("GET {path}: {e}: {}", r.body))
    }

    /// Polls `path` until `done` accepts the answer, for up to `timeout`.
    pub fn wait_for<T: DeserializeOwned>(
        &self,
        path: &str,
        timeout: Duration,
        done: impl Fn(&T) -> bool,
    ) -> T {
        let deadline = Instant::now() + timeout;
        loop {
            let v = self.get_as(path);
            if done(&v) || Instant::now() > deadline {
                return v;
            }
            std::thread::sleep(Duration::from_millis(250));
        }
    }

    /// `/metrics`, parsed.
    pub fn metrics(&self) -> Vec<Sample> {
        let r = self.get("/metrics");
        assert_eq!(r.status, 200, "/metrics: {}", r.body);
        parse_exposition(&r.body).unwrap_or_else(|e| panic!("/metrics: {e}"))
    }

    /// SIGTERM, and what it printed; asserts a clean exit.
    pub fn stop(self) -> Finished {
        self.proc.signal(libc::SIGTERM);
        let name = self.proc.name.clone();
        let f = self.proc.finish(STOP_TIMEOUT);
        assert!(
            f.status.success() && !f.stderr.iter().any(|l| l.contains("panicked")),
            "{name} exited with {} on SIGTERM\nstderr:\n{}",
            f.status,
            f.stderr.join("\n")
        );
        f
    }
}

// ---------------------------------------------------------------------------
// Prometheus text format

/// One sample of an exposition: name, labels, value.
#[derive(Clone, Debug, PartialEq)]
pub struct Sample {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub value: f64,
}

/// Parses the samples of a Prometheus text exposition (comments skipped).
pub fn parse_exposition(text: &str) -> Result<Vec<Sample>, String> {
    text.lines()
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(|l| parse_sample(l).ok_or_else(|| format!("not a sample line: {l:?}")))
        .collect()
}

fn parse_sample(line: &str) -> Option<Sample> {
    let name_end = line.find(['{', ' '])?;
    let name = line[..name_end].to_string();
    let mut labels = BTreeMap::new();
    let mut rest = &line[name_end..];
    if let Some(body) = rest.strip_prefix('{') {
        let mut chars = body.char_indices();
        loop {
            // label name up to '=' (or the closing brace)
            let (start, c) = chars.next()?;
            if c == '}' {
                rest = &body[start + 1..];
                break;
            }
            if c == ',' {
                continue;
            }
            let eq = start + body[start..].find('=')?;
            let key = body[start..eq].trim().to_string();
            while chars.next()?.0 < eq {}
            if chars.next()?.1 != '"' {
                return None;
            }
            let mut value = String::new();
            loop {
                match chars.next()?.1 {
                    '\\' => match chars.next()?.1 {
                        'n' => value.push('\n'),
                        other => value.push(other),
                    },
                    '"' => break,
                    other => value.push(other),
                }
            }
            labels.insert(key, value);
        }
    }
    let value = rest.split_whitespace().next()?;
    let value = match value {
        "+Inf" => f64::INFINITY,
        "-Inf" => f64::NEG_INFINITY,
        v => v.parse().ok()?,
    };
    Some(Sample {
        name,
        labels,
        value,
    })
}

/// The value of the one sample named `name` whose labels include `labels`.
pub fn find_sample(samples: &[Sample], name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    let hits: Vec<&Sample> = samples
        .iter()
        .filter(|s| s.name == name)
        .filter(|s| {
            labels
                .iter()
                .all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v))
        })
        .collect();
    match hits.as_slice() {
        [one] => Some(one.value),
        [] => None,
        many => panic!("{} samples of {name} {labels:?}: {many:?}", many.len()),
    }
}

/// The value of one series, written as in an exposition: `name` or
/// `name{a="b",...}` with exactly these labels.
pub fn metric(samples: &[Sample], series: &str) -> Option<f64> {
    let want =
        parse_sample(&format!("{series} 0")).unwrap_or_else(|| panic!("not a series: {series}"));
    samples
        .iter()
        .find(|s| s.name == want.name && s.labels == want.labels)
        .map(|s| s.value)
}

// ---------------------------------------------------------------------------
// Prometheus server

/// A Prometheus server on 127.0.0.1 scraping one target every second, with
/// its own storage in a scratch directory. Killed if dropped.
pub struct Prometheus {
    proc: Option<Proc>,
    pub addr: SocketAddr,
    _dir: Scratch,
}

impl Prometheus {
    /// Starts `prometheus` scraping `target` (HOST:PORT) as job "tcpwatch",
    /// evaluating `rule_files`, and waits until it is ready.
    pub fn start(prometheus: &Path, target: &str, rule_files: &[PathBuf]) -> Prometheus {
        let dir = Scratch::new("prometheus");
        let rules: String = rule_files
            .iter()
            .map(|p| format!("  - {}\n", p.display()))
            .collect();
        let config = dir.write(
            "prometheus.yml",
            &format!(
                "global:\n  scrape_interval: 1s\n  scrape_timeout: 900ms\n  \
                 evaluation_interval: 1s\nrule_files:\n{rules}scrape_configs:\n  \
                 - job_name: tcpwatch\n    static_configs:\n      - targets: ['{target}']\n"
            ),
        );
        let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let mut cmd = Command::new(prometheus);
        cmd.arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("data").display()
            ))
            .arg(format!("--web.listen-address={addr}"))
            .arg("--storage.tsdb.retention.time=1h")
            .arg("--log.level=warn");
        let proc = Proc::spawn("prometheus", cmd, false);
        let p = Prometheus {
            proc: Some(proc),
            addr,
            _dir: dir,
        };
        let deadline = Instant::now() + START_TIMEOUT;
        while !http_get(p.addr, "/-/ready").is_ok_and(|r| r.status == 200) {
            assert!(
                Instant::now() < deadline,
                "prometheus not ready on {} after {START_TIMEOUT:?}; stderr:\n{}",
                p.addr,
                p.proc().stderr_now().join("\n")
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        p
    }

    fn proc(&self) -> &Proc {
        self.proc.as_ref().expect("running")
    }

    /// `GET /api/v1/<path>`; the `data` of a successful answer.
    pub fn api(&self, path: &str) -> serde_json::Value {
        let r = http_get(self.addr, &format!("/api/v1/{path}"))
            .unwrap_or_else(|e| panic!("prometheus /api/v1/{path}: {e}"));
        let v: serde_json::Value = serde_json::from_str(&r.body)
            .unwrap_or_else(|e| panic!("prometheus /api/v1/{path} ({e}): {}", r.body));
        assert!(
            r.status == 200 && v["status"] == "success",
            "prometheus /api/v1/{path}: {} {}",
            r.status,
            r.body
        );
        v["data"].clone()
    }

    /// An instant query: each series' labels and value.
    pub fn query(&self, promql: &str) -> Vec<Sample> {
        let data = self.api(&format!("query?query={}", url_encode(promql)));
        assert_eq!(data["resultType"], "vector", "{promql}: {data}");
        data["result"]
            .as_array()
            .expect("result array")
            .iter()
            .map(|s| Sample {
                name: s["metric"]["__name__"].as_str().unwrap_or("").to_string(),
                labels: s["metric"]
                    .as_object()
                    .expect("metric object")
                    .iter()
                    .filter(|(k, _)| k.as_str() != "__name__")
                    .map(|(k, v)| (k.clone(), v.as_str().unwrap_or("").to_string()))
                    .collect(),
                value: s["value"][1]
                    .as_str()
                    .and_then(|v| v.parse().ok())
                    .unwrap_or_else(|| panic!("{promql}: value of {s}")),
            })
            .collect()
    }

    /// The value of a query that must give exactly one series, or `None`
    /// while it gives none.
    pub fn scalar(&self, promql: &str) -> Option<f64> {
        let r = self.query(promql);
        assert!(r.len() <= 1, "{promql} gave {} series: {r:?}", r.len());
        r.first().map(|s| s.value)
    }

    /// Polls `promql` (one series) until `done(value)` or `timeout`; the
    /// last value seen.
    pub fn wait_scalar(
        &self,
        promql: &str,
        timeout: Duration,
        done: impl Fn(f64) -> bool,
    ) -> Option<f64> {
        let deadline = Instant::now() + timeout;
        loop {
            let v = self.scalar(promql);
            if v.is_some_and(&done) || Instant::now() >= deadline {
                return v;
            }
            std::thread::sleep(Duration::from_millis(250));
        }
    }

    /// SIGTERM and wait: Prometheus shuts down cleanly.
    pub fn stop(mut self) {
        let proc = self.proc.take().expect("running");
        proc.signal(libc::SIGTERM);
        let f = proc.finish(STOP_TIMEOUT);
        assert!(
            f.status.success(),
            "prometheus exited with {}: {}",
            f.status,
            f.stderr.join("\n")
        );
    }
}
