//! `tcpwatch conns --from` and `tcpwatch timewait --from`: read a running
//! daemon over plain HTTP instead of loading programs here.

use std::io::{self, Write};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper::body::Incoming;
use hyper::{Request, StatusCode};
use hyper_util::rt::TokioIo;
use serde::Deserialize;

use super::query::MAX_LIMIT;
use super::Health;
use crate::commands::timewait::write_snapshot;
use crate::host::clock::Zone;
use crate::model::filter::Filter;
use crate::model::timewait::Snapshot;
use crate::views::conns::{conns_header, record_json, record_text, ConnRecord};
use crate::views::summary::{FollowSummary, WatchSummary};
use crate::views::Format;

/// Longest a request may take.
const TIMEOUT: Duration = Duration::from_secs(10);

type Sender = hyper::client::conn::http1::SendRequest<Empty<Bytes>>;

/// Why `--from` could not read the daemon. Each message names the daemon;
/// the cause, when there is one, follows as the error's source.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error(
        "--from {url}: only http:// is supported (the daemon serves plain HTTP), not {scheme}://"
    )]
    Scheme { url: String, scheme: String },
    #[error("--from {url}: not a URL of the form http://HOST:PORT")]
    NotAUrl { url: String },
    #[error("cannot reach the tcpwatch daemon at {url}")]
    Connect {
        url: String,
        #[source]
        source: io::Error,
    },
    #[error("cannot reach the tcpwatch daemon at {url}")]
    Http {
        url: String,
        #[source]
        source: hyper::Error,
    },
    #[error("cannot reach the tcpwatch daemon at {url}")]
    Request {
        url: String,
        #[source]
        source: hyper::http::Error,
    },
    #[error("{url}{path}: no answer within {TIMEOUT:?}")]
    Timeout { url: String, path: String },
    #[error("{url}{path}: {status}: {why}")]
    Refused {
        url: String,
        path: String,
        status: StatusCode,
        why: String,
    },
    #[error("{url}{path}: not what a tcpwatch daemon answers")]
    Answer {
        url: String,
        path: String,
        #[source]
        source: serde_json::Error,
    },
    #[error("cannot install signal handler")]
    Signal(#[source] io::Error),
    /// The daemon answered, then stopped answering partway through.
    #[error("the daemon went away")]
    Gone(#[source] Box<ClientError>),
    #[error("writing output failed")]
    Output(#[source] io::Error),
}

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
    pub fn parse(url: &str) -> Result<Daemon, ClientError> {
        let not_a_url = || ClientError::NotAUrl {
            url: url.to_string(),
        };
        let rest = match url.split_once("://") {
            Some(("http", rest)) => rest,
            Some((scheme, _)) => {
                return Err(ClientError::Scheme {
                    url: url.to_string(),
                    scheme: scheme.to_string(),
                })
            }
            None => url,
        };
        let authority = rest.strip_suffix('/').unwrap_or(rest);
        let uri: hyper::Uri = format!("http://{authority}/")
            .parse()
            .map_err(|_| not_a_url())?;
        match uri.authority() {
            Some(a) if a.port_u16().is_some() && a.as_str() == authority => Ok(Daemon {
                authority: authority.to_string(),
                conn: tokio::sync::Mutex::new(None),
            }),
            _ => Err(not_a_url()),
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.authority)
    }

    /// GETs `path` and returns the body of a 200 answer.
    pub async fn get(&self, path: &str) -> Result<Bytes, ClientError> {
        tokio::time::timeout(TIMEOUT, self.get_inner(path))
            .await
            .map_err(|_| ClientError::Timeout {
                url: self.url(),
                path: path.to_string(),
            })?
    }

    async fn connect(&self) -> Result<Sender, ClientError> {
        let stream = tokio::net::TcpStream::connect(&self.authority)
            .await
            .map_err(|source| ClientError::Connect {
                url: self.url(),
                source,
            })?;
        let (send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| self.http_error(e))?;
        tokio::spawn(conn);
        Ok(send)
    }

    fn http_error(&self, source: hyper::Error) -> ClientError {
        ClientError::Http {
            url: self.url(),
            source,
        }
    }

    async fn get_inner(&self, path: &str) -> Result<Bytes, ClientError> {
        let mut conn = self.conn.lock().await;
        // The kept connection first; if the daemon closed it meanwhile (it
        // drops idle ones), once more on a new one.
        let mut reused = match conn.as_mut() {
            Some(send) => send.ready().await.is_ok(),
            None => false,
        };
        loop {
            if !reused {
                *conn = None;
            }
            let send = match conn.as_mut() {
                Some(send) => send,
                None => conn.insert(self.connect().await?),
            };
            let req = Request::get(path)
                .header(hyper::header::HOST, &self.authority)
                .body(Empty::<Bytes>::new())
                .map_err(|source| ClientError::Request {
                    url: self.url(),
                    source,
                })?;
            match send.send_request(req).await {
                Ok(resp) => return self.answer(path, resp).await,
                Err(_) if reused => reused = false,
                Err(e) => {
                    *conn = None;
                    return Err(self.http_error(e));
                }
            }
        }
    }

    async fn answer(
        &self,
        path: &str,
        resp: hyper::Response<Incoming>,
    ) -> Result<Bytes, ClientError> {
        let status = resp.status();
        let body = resp
            .into_body()
            .collect()
            .await
            .map_err(|e| self.http_error(e))?
            .to_bytes();
        if !status.is_success() {
            #[derive(Deserialize)]
            struct ErrorBody {
                error: String,
            }
            let why = serde_json::from_slice::<ErrorBody>(&body)
                .map(|e| e.error)
                .unwrap_or_else(|_| String::from_utf8_lossy(&body).chars().take(200).collect());
            return Err(ClientError::Refused {
                url: self.url(),
                path: path.to_string(),
                status,
                why,
            });
        }
        Ok(body)
    }

    pub async fn get_json<T: for<'de> Deserialize<'de>>(
        &self,
        path: &str,
    ) -> Result<T, ClientError> {
        let body = self.get(path).await?;
        serde_json::from_slice(&body).map_err(|source| ClientError::Answer {
            url: self.url(),
            path: path.to_string(),
            source,
        })
    }
}

/// `GET /api/conns`.
#[derive(Debug, Deserialize)]
pub struct ConnsPage {
    pub next: u64,
    pub missed: u64,
    /// Kept connections after this page (0 from a daemon that predates it).
    #[serde(default)]
    pub remaining: u64,
    pub conns: Vec<ConnRecord>,
}

/// How long `--from` runs, and what it does on Ctrl-C or SIGTERM. The
/// handlers are installed when this is called, not when the future is first
/// polled: a Ctrl-C during the first request still ends the command with its
/// summary instead of killing it.
fn until_stopped(
    duration: Option<Duration>,
) -> Result<impl std::future::Future<Output = ()>, ClientError> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).map_err(ClientError::Signal)?;
    let mut int = signal(SignalKind::interrupt()).map_err(ClientError::Signal)?;
    Ok(async move {
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
    })
}

/// Time between polls of `/api/conns`.
const CONNS_POLL: Duration = Duration::from_millis(500);

/// `tcpwatch conns --from`: the connections the daemon finishes from now
/// on, written as `conns` writes them, until stopped. A poll that finds the
/// daemon dropped connections this client had not asked for yet says so at
/// once. `Err` when the daemon cannot be read at the start; once following,
/// the summary comes back with why it stopped early, if it did (the daemon
/// went away, or the output failed).
pub async fn follow_conns<W: Write>(
    daemon: &Daemon,
    out: &mut W,
    format: Format,
    filter: &Filter,
    zone: Zone,
    header: bool,
    duration: Option<Duration>,
) -> Result<(FollowSummary, Option<ClientError>), ClientError> {
    let stop = until_stopped(duration)?;
    tokio::pin!(stop);
    // Where the daemon is now: only what finishes after this is shown.
    let first: ConnsPage = daemon.get_json("/api/conns?limit=1").await?;
    tracing::info!(
        "reading TCP connections from {}; Ctrl-C to stop",
        daemon.url()
    );
    let mut summary = FollowSummary {
        daemon: daemon.url(),
        ..FollowSummary::default()
    };
    // Output that fails (other than a closed pipe) stops following.
    let ended =
        |e: io::Error| (e.kind() != io::ErrorKind::BrokenPipe).then_some(ClientError::Output(e));
    if header && format == Format::Text {
        if let Err(e) = writeln!(out, "{}", conns_header(zone)).and_then(|()| out.flush()) {
            return Ok((summary, ended(e)));
        }
    }
    let mut since = first.next;
    loop {
        let page: ConnsPage = match daemon
            .get_json(&format!("/api/conns?since={since}&limit={MAX_LIMIT}"))
            .await
        {
            Ok(page) => page,
            Err(e) => {
                let _ = out.flush();
                return Ok((summary, Some(ClientError::Gone(Box::new(e)))));
            }
        };
        since = page.next.max(since);
        summary.missed += page.missed;
        if page.missed > 0 {
            tracing::warn!(
                "fell behind: {} finished connections were dropped by the daemon before this client asked for them (it keeps its last --keep)",
                page.missed
            );
        }
        for r in page.conns {
            summary.received += 1;
            if !filter.matches(r.family(), &r.local(), &r.remote(), r.owner().as_ref()) {
                continue;
            }
            summary.shown += 1;
            let line = match format {
                Format::Text => record_text(&r, zone),
                Format::Json => record_json(&r),
            };
            if let Err(e) = writeln!(out, "{line}") {
                return Ok((summary, ended(e)));
            }
        }
        if let Err(e) = out.flush() {
            return Ok((summary, ended(e)));
        }
        // Pages follow at once until caught up; a stop still ends it.
        let pause = match page.remaining {
            0 => CONNS_POLL,
            _ => Duration::ZERO,
        };
        tokio::select! {
            biased;
            _ = &mut stop => break,
            _ = tokio::time::sleep(pause) => {}
        }
    }
    Ok((summary, None))
}

/// A closed pipe (`| head`) ends the command quietly.
fn quiet_pipe<T>(e: io::Error, summary: T) -> Result<T, ClientError> {
    if e.kind() == io::ErrorKind::BrokenPipe {
        Ok(summary)
    } else {
        Err(ClientError::Output(e))
    }
}

/// Where a daemon serves the TIME_WAIT snapshot of its namespace `netns`
/// (a name or an inode; `None`: its own).
pub fn timewait_path(netns: Option<&str>) -> String {
    match netns {
        Some(ns) => format!("/api/timewait?netns={ns}"),
        None => "/api/timewait".to_string(),
    }
}

/// `tcpwatch timewait --from`: the daemon's snapshot every `interval`,
/// written as `timewait` writes its own, in `format` (text in `zone`).
pub async fn watch_timewait<W: Write>(
    daemon: &Daemon,
    netns: Option<&str>,
    out: &mut W,
    (format, zone): (Format, Zone),
    redraw: bool,
    interval: Duration,
    duration: Option<Duration>,
) -> Result<WatchSummary, ClientError> {
    let mut summary = WatchSummary {
        snapshots: 0,
        daemon: daemon.url(),
    };
    let path = timewait_path(netns);
    let stop = until_stopped(duration)?;
    tokio::pin!(stop);
    tracing::info!(
        "reading TIME_WAIT snapshots from {}; Ctrl-C to stop",
        daemon.url()
    );
    loop {
        let snapshot: Snapshot = daemon.get_json(&path).await?;
        let health: Health = daemon.get_json("/healthz").await?;
        let lost = health.lost_ring_full + health.lost_kernel_skipped;
        match write_snapshot(
            out,
            &snapshot,
            format,
            zone,
            redraw,
            summary.snapshots,
            lost,
        ) {
            Ok(()) => summary.snapshots += 1,
            Err(e) => return quiet_pipe(e, summary),
        }
        tokio::select! {
            _ = &mut stop => break,
            _ = tokio::time::sleep(interval) => {}
        }
    }
    Ok(summary)
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
            let e = Daemon::parse(bad).unwrap_err().to_string();
            assert!(e.starts_with("--from") && !e.contains('\n'), "{bad}: {e}");
        }
    }
}
