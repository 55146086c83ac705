//! The daemon's HTTP/1.1 server. Every endpoint answers from what the
//! daemon's consumer last published (`/healthz`: 503 until it is live);
//! nothing a client sends reaches the tracing side. A client that sends
//! garbage gets 400 and is dropped; one that sends nothing is dropped after
//! `HEADER_TIMEOUT`; at most `MAX_CLIENTS` are served at once.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{HeaderValue, ALLOW, CONTENT_TYPE};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::{watch, Semaphore};

use super::query::{route, Route, RouteError};
use super::Shared;

/// Time a client has to send its request headers.
const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// Connections served at once; more wait in the listen backlog.
const MAX_CLIENTS: usize = 64;

const JSON: &str = "application/json";
/// prometheus-client writes the OpenMetrics text format.
const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// The address could not be listened on.
#[derive(Debug, thiserror::Error)]
#[error("cannot listen on {addr}")]
pub struct ListenError {
    pub addr: SocketAddr,
    #[source]
    pub source: std::io::Error,
}

/// Binds the listening socket.
pub fn bind(addr: SocketAddr) -> Result<TcpListener, ListenError> {
    let fail = |source| ListenError { addr, source };
    let std = std::net::TcpListener::bind(addr)
        .and_then(|l| l.set_nonblocking(true).map(|()| l))
        .map_err(fail)?;
    TcpListener::from_std(std).map_err(fail)
}

/// Serves until `stop` turns true.
pub async fn serve(listener: TcpListener, shared: Arc<Shared>, mut stop: watch::Receiver<bool>) {
    let slots = Arc::new(Semaphore::new(MAX_CLIENTS));
    loop {
        let permit = tokio::select! {
            p = slots.clone().acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => return,
            },
            _ = stop.changed() => return,
        };
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Out of file descriptors, say: wait rather than spin.
                    tracing::warn!("accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            _ = stop.changed() => return,
        };
        let shared = shared.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req| {
                let shared = shared.clone();
                async move { Ok::<_, Infallible>(respond(&req, &shared)) }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT)
                .max_buf_size(64 * 1024)
                .serve_connection(TokioIo::new(stream), service);
            if let Err(e) = conn.await {
                tracing::debug!(%peer, "client dropped: {e}");
            }
            drop(permit);
        });
    }
}

fn reply(status: StatusCode, content_type: &'static str, body: String) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    r.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    r
}

fn error(status: StatusCode, message: &str) -> Response<Full<Bytes>> {
    let body = serde_json::json!({ "error": message }).to_string();
    reply(status, JSON, body)
}

/// Answers one request.
pub fn respond(req: &Request<Incoming>, shared: &Shared) -> Response<Full<Bytes>> {
    if req.method() != Method::GET && req.method() != Method::HEAD {
        let mut r = error(
            StatusCode::METHOD_NOT_ALLOWED,
            &format!("method {} not allowed: use GET", req.method()),
        );
        r.headers_mut()
            .insert(ALLOW, HeaderValue::from_static("GET, HEAD"));
        return r;
    }
    let target = req.uri().path_and_query().map_or("/", |p| p.as_str());
    match route(target) {
        Ok(Route::Metrics) => reply(StatusCode::OK, OPENMETRICS, shared.metrics()),
        Ok(Route::Health) => match shared.health() {
            (true, body) => reply(StatusCode::OK, JSON, body),
            // Not live yet (or never, for a probe that fails to load): a
            // readiness probe must not pass.
            (false, body) => reply(StatusCode::SERVICE_UNAVAILABLE, JSON, body),
        },
        Ok(Route::Timewait(q)) => match shared.timewait(&q) {
            Some(Ok(j)) => reply(StatusCode::OK, JSON, j),
            Some(Err(why)) => error(StatusCode::NOT_FOUND, &why),
            None => error(
                StatusCode::SERVICE_UNAVAILABLE,
                "no timewait snapshot yet: the daemon is starting",
            ),
        },
        Ok(Route::Conns(q)) => reply(StatusCode::OK, JSON, shared.conns(q)),
        Err(e @ RouteError::NotFound(_)) => error(StatusCode::NOT_FOUND, e.message()),
        Err(e @ RouteError::BadQuery(_)) => error(StatusCode::BAD_REQUEST, e.message()),
    }
}
