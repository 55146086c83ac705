//! `tcpwatch conns --from` and `tcpwatch timewait --from`: read a running
//! daemon over plain HTTP instead of loading programs here.

use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper::body::Incoming;
use hyper::Request;
use hyper_util::rt::TokioIo;
use serde::Deserialize;

use std::io::Write;

use super::query::MAX_LIMIT;
use crate::commands::timewait::write_snapshot;
use crate::model::filter::Filter;
use crate::model::timewait::Snapshot;
use crate::views::conns::{record_json, record_text, ConnRecord, CONNS_HEADER};
use crate::views::Format;

/// Longest a request may take.
const TIMEOUT: Duration = Duration::from_secs(10);

type Sender = hyper::client::conn::http1::SendRequest<Empty<Bytes>>;

/// Where a daemon is: `http://HOST:PORT` (or just `HOST:PORT`). One
/// connection is kept open and reused, so polling makes no new connection
/// (and no TIME_WAIT socket) each time.
#[derive(Debug)]
pub struct Daemon {
    /// `HOST:PORT`, as connected to and sent in `Host:`.
    authority: String,
    conn: tokio::sync::Mutex<Option<Sender>>,
}

impl Daemon {
    pub fn parse(url: &str) -> Result<Daemon, String> {
        let rest = match url.split_once("://") {
            Some(("http", rest)) => rest,
            Some((scheme, _)) => {
                return Err(format!(
                    "--from {url}: only http:// is supported (the daemon serves plain HTTP), not {scheme}://"
                ))
            }
            None => url,
        };
        let authority = rest.strip_suffix('/').unwrap_or(rest);
        let uri: hyper::Uri = format!("http://{authority}/")
            .parse()
            .map_err(|_| format!("--from {url}: not a URL of the form http://HOST:PORT"))?;
        match uri.authority() {
            Some(a) if a.port_u16().is_some() && a.as_str() == authority => Ok(Daemon {
                authority: authority.to_string(),
                conn: tokio::sync::Mutex::new(None),
            }),
            _ => Err(format!(
                "--from {url}: not a URL of the form http://HOST:PORT"
            )),
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.authority)
    }

    /// GETs `path` and returns the body of a 200 answer.
    pub async fn get(&self, path: &str) -> Result<Bytes, String> {
        tokio::time::timeout(TIMEOUT, self.get_inner(path))
            .await
            .map_err(|_| format!("{}{path}: no answer within {TIMEOUT:?}", self.url()))?
    }

    async fn connect(&self) -> Result<Sender, String> {
        let stream = tokio::net::TcpStream::connect(&self.authority)
            .await
            .map_err(|e| self.unreachable(&e))?;
        let (send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| self.unreachable(&e))?;
        tokio::spawn(conn);
        Ok(send)
    }

    fn unreachable(&self, e: &dyn std::fmt::Display) -> String {
        format!("cannot reach the tcpwatch daemon at {}: {e}", self.url())
    }

    async fn get_inner(&self, path: &str) -> Result<Bytes, String> {
        let mut conn = self.conn.lock().await;
        // The kept connection first; if the daemon closed it meanwhile (it
        // drops idle ones), once more on a new one.
        let mut reused = match conn.as_mut() {
            Some(send) => send.ready().await.is_ok(),
            None => false,
        };
        loop {
            if !reused {
                *conn = Some(self.connect().await?);
            }
            let Some(send) = conn.as_mut() else {
                return Err(self.unreachable(&"no connection"));
            };
            let req = Request::get(path)
                .header(hyper::header::HOST, &self.authority)
                .body(Empty::<Bytes>::new())
                .map_err(|e| self.unreachable(&e))?;
            match send.send_request(req).await {
                Ok(resp) => return self.answer(path, resp).await,
                Err(_) if reused => reused = false,
                Err(e) => {
                    *conn = None;
                    return Err(self.unreachable(&e));
                }
            }
        }
    }

    async fn answer(&self, path: &str, resp: hyper::Response<Incoming>) -> Result<Bytes, String> {
        let fail = |e: &dyn std::fmt::Display| self.unreachable(e);
        let status = resp.status();
        let body = resp
            .into_body()
            .collect()
            .await
            .map_err(|e| fail(&e))?
            .to_bytes();
        if !status.is_success() {
            #[derive(Deserialize)]
            struct ErrorBody {
                error: String,
            }
            let why = serde_json::from_slice::<ErrorBody>(&body)
                .map(|e| e.error)
                .unwrap_or_else(|_| String::from_utf8_lossy(&body).chars().take(200).collect());
            return Err(format!("{}{path}: {status}: {why}", self.url()));
        }
        Ok(body)
    }

    pub async fn get_json<T: for<'de> Deserialize<'de>>(&self, path: &str) -> Result<T, String> {
        let body = self.get(path).await?;
        serde_json::from_slice(&body).map_err(|e| {
            format!(
                "{}{path}: not what a tcpwatch daemon answers: {e}",
                self.url()
            )
        })
    }
}

/// `GET /api/conns`.
#[derive(Debug, Deserialize)]
pub struct ConnsPage {
    pub next: u64,
    pub missed: u64,
    pub conns: Vec<ConnRecord>,
}

/// `GET /healthz`, as far as `--from` needs it.
#[derive(Debug, Deserialize)]
pub struct Health {
    pub lost_ring_full: u64,
    pub lost_kernel_skipped: u64,
}

/// How long `--from` runs, and what it does on Ctrl-C or SIGTERM.
async fn until_stopped(duration: Option<Duration>) -> Result<(), String> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).map_err(|e| e.to_string())?;
    let mut int = signal(SignalKind::interrupt()).map_err(|e| e.to_string())?;
    let wait = async {
        match duration {
            Some(d) => tokio::time::sleep(d).await,
            None => std::future::pending().await,
        }
    };
    tokio::select! {
        _ = int.recv() => {}
        _ = term.recv() => {}
        _ = wait => {}
    }
    Ok(())
}

/// Time between polls of `/api/conns`.
const CONNS_POLL: Duration = Duration::from_millis(500);

/// `tcpwatch conns --from`: the connections the daemon finishes from now
/// on, written as `conns` writes them, until stopped.
pub async fn follow_conns<W: Write>(
    daemon: &Daemon,
    out: &mut W,
    format: Format,
    filter: &Filter,
    header: bool,
    duration: Option<Duration>,
) -> Result<FollowSummary, String> {
    // Where the daemon is now: only what finishes after this is shown.
    let first: ConnsPage = daemon.get_json("/api/conns?limit=1").await?;
    eprintln!(
        "tcpwatch: reading TCP connections from {}; Ctrl-C to stop",
        daemon.url()
    );
    if header && format == Format::Text {
        writeln!(out, "{CONNS_HEADER}").map_err(|e| e.to_string())?;
        out.flush().map_err(|e| e.to_string())?;
    }
    let mut summary = FollowSummary::default();
    let mut since = first.next;
    let stop = until_stopped(duration);
    tokio::pin!(stop);
    loop {
        let page: ConnsPage = daemon
            .get_json(&format!("/api/conns?since={since}&limit={MAX_LIMIT}"))
            .await?;
        since = page.next.max(since);
        summary.missed += page.missed;
        for r in page.conns {
            summary.received += 1;
            if !filter.matches(r.family(), &r.local(), &r.remote(), r.owner().as_ref()) {
                continue;
            }
            summary.shown += 1;
            let line = match format {
                Format::Text => record_text(&r),
                Format::Json => record_json(&r),
            };
            if let Err(e) = writeln!(out, "{line}") {
                return quiet_pipe(e, summary);
            }
        }
        if let Err(e) = out.flush() {
            return quiet_pipe(e, summary);
        }
        tokio::select! {
            r = &mut stop => { r?; break; }
            _ = tokio::time::sleep(CONNS_POLL) => {}
        }
    }
    Ok(summary)
}

/// A closed pipe (`| head`) ends the command quietly.
fn quiet_pipe(e: std::io::Error, summary: FollowSummary) -> Result<FollowSummary, String> {
    if e.kind() == std::io::ErrorKind::BrokenPipe {
        Ok(summary)
    } else {
        Err(format!("writing output failed: {e}"))
    }
}

#[derive(Clone, Copy, Debug, Default)]
pub struct FollowSummary {
    pub received: u64,
    pub shown: u64,
    /// Finished connections the daemon no longer held when asked.
    pub missed: u64,
}

/// `tcpwatch timewait --from`: the daemon's snapshot every `interval`,
/// written as `timewait` writes its own.
pub async fn watch_timewait<W: Write>(
    daemon: &Daemon,
    out: &mut W,
    format: Format,
    redraw: bool,
    interval: Duration,
    duration: Option<Duration>,
) -> Result<u64, String> {
    let mut written = 0u64;
    let stop = until_stopped(duration);
    tokio::pin!(stop);
    eprintln!(
        "tcpwatch: reading TIME_WAIT snapshots from {}; Ctrl-C to stop",
        daemon.url()
    );
    loop {
        let snapshot: Snapshot = daemon.get_json("/api/timewait").await?;
        let health: Health = daemon.get_json("/healthz").await?;
        let lost = health.lost_ring_full + health.lost_kernel_skipped;
        match write_snapshot(out, &snapshot, format, redraw, written, lost) {
            Ok(()) => written += 1,
            Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => return Ok(written),
            Err(e) => return Err(format!("writing output failed: {e}")),
        }
        tokio::select! {
            r = &mut stop => { r?; break; }
            _ = tokio::time::sleep(interval) => {}
        }
    }
    Ok(written)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_daemon_urls() {
        for ok in [
            "http://127.0.0.1:9977",
            "127.0.0.1:9977",
            "http://[::1]:9977/",
            "http://localhost:1",
        ] {
            assert!(Daemon::parse(ok).is_ok(), "{ok}");
        }
        assert_eq!(
            Daemon::parse("http://127.0.0.1:9977").unwrap().url(),
            "http://127.0.0.1:9977"
        );
        for bad in [
            "https://127.0.0.1:9977",
            "http://127.0.0.1",
            "http://h:1/x",
            "",
            "http://",
            "::::",
        ] {
            let e = Daemon::parse(bad).unwrap_err();
            assert!(e.starts_with("--from") && !e.contains('\n'), "{bad}: {e}");
        }
    }
}
