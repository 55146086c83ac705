//! Parsing what a client asks the daemon for: the request path and its
//! query string. Kept apart from the server so it can be tested and fuzzed
//! on its own; everything here is total (no input panics).

/// The daemon's endpoints.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Route {
    Metrics,
    Timewait(TimewaitQuery),
    Conns(ConnsQuery),
    Health,
}

/// `GET /api/timewait?netns=NS`: the snapshot of one network namespace
/// (by its name in /run/netns or its inode; without `netns`, the daemon's
/// own, or the first it reports), or of every one (`all`: a JSON array).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TimewaitQuery {
    pub netns: Option<NetnsKey>,
}

/// Which namespace's snapshot.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum NetnsKey {
    All,
    Inode(u32),
    Name(String),
}

/// `GET /api/conns?limit=N&since=SEQ`: the next `limit` finished
/// connections numbered above `since`, oldest first; without `since`, the
/// `limit` most recent.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConnsQuery {
    pub limit: usize,
    pub since: Option<u64>,
}

/// Connections returned when the client gives no `limit`.
pub const DEFAULT_LIMIT: usize = 100;
/// The most a client may ask for at once.
pub const MAX_LIMIT: usize = 100_000;

/// Why a request was refused: 404 for a path, 400 for a query.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RouteError {
    NotFound(String),
    BadQuery(String),
}

impl RouteError {
    pub fn status(&self) -> u16 {
        match self {
            RouteError::NotFound(_) => 404,
            RouteError::BadQuery(_) => 400,
        }
    }

    pub fn message(&self) -> &str {
        match self {
            RouteError::NotFound(m) | RouteError::BadQuery(m) => m,
        }
    }
}

/// Splits a request target (`/api/conns?limit=5`) into its route.
pub fn route(target: &str) -> Result<Route, RouteError> {
    let (path, query) = match target.split_once('?') {
        Some((p, q)) => (p, Some(q)),
        None => (target, None),
    };
    let no_query = |route: Route| match query {
        Some(q) if !q.is_empty() => Err(RouteError::BadQuery(format!(
            "{path} takes no query parameters"
        ))),
        _ => Ok(route),
    };
    match path {
        "/metrics" => no_query(Route::Metrics),
        "/healthz" => no_query(Route::Health),
        "/api/timewait" => parse_timewait_query(query.unwrap_or("")).map(Route::Timewait),
        "/api/conns" => parse_conns_query(query.unwrap_or("")).map(Route::Conns),
        _ => Err(RouteError::NotFound(format!(
            "no such path: {}",
            printable(path)
        ))),
    }
}

/// Parses `limit=N&since=SEQ` (either, both, or neither; each at most once).
pub fn parse_conns_query(query: &str) -> Result<ConnsQuery, RouteError> {
    let mut q = ConnsQuery {
        limit: DEFAULT_LIMIT,
        since: None,
    };
    let (mut seen_limit, mut seen_since) = (false, false);
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (key, value) = pair.split_once('=').ok_or_else(|| {
            RouteError::BadQuery(format!("parameter {} has no value", printable(pair)))
        })?;
        match key {
            "limit" if !seen_limit => {
                seen_limit = true;
                let n = number(key, value)?;
                if n == 0 || n > MAX_LIMIT as u64 {
                    return Err(RouteError::BadQuery(format!(
                        "limit must be between 1 and {MAX_LIMIT}, not {n}"
                    )));
                }
                q.limit = n as usize;
            }
            "since" if !seen_since => {
                seen_since = true;
                q.since = Some(number(key, value)?);
            }
            "limit" | "since" => {
                return Err(RouteError::BadQuery(format!("{key} given twice")));
            }
            _ => {
                return Err(RouteError::BadQuery(format!(
                    "unknown parameter {} (expected limit or since)",
                    printable(key)
                )));
            }
        }
    }
    Ok(q)
}

/// Parses `netns=NS` (or nothing).
pub fn parse_timewait_query(query: &str) -> Result<TimewaitQuery, RouteError> {
    let mut q = TimewaitQuery::default();
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (key, value) = pair.split_once('=').ok_or_else(|| {
            RouteError::BadQuery(format!("parameter {} has no value", printable(pair)))
        })?;
        if key != "netns" {
            return Err(RouteError::BadQuery(format!(
                "unknown parameter {} (expected netns)",
                printable(key)
            )));
        }
        if q.netns.is_some() {
            return Err(RouteError::BadQuery("netns given twice".into()));
        }
        let name_like = !value.is_empty()
            && value.len() <= 255
            && value
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b));
        q.netns = Some(match value {
            "all" => NetnsKey::All,
            v if !v.is_empty() && v.bytes().all(|b| b.is_ascii_digit()) => NetnsKey::Inode(
                u32::try_from(number(key, v)?)
                    .map_err(|_| RouteError::BadQuery("netns is out of range".into()))?,
            ),
            v if name_like => NetnsKey::Name(v.to_string()),
            v => {
                return Err(RouteError::BadQuery(format!(
                    "netns must be a name, an inode number or all, not {}",
                    printable(v)
                )))
            }
        });
    }
    Ok(q)
}

/// A decimal number of at most 19 digits (no sign, no spaces).
fn number(key: &str, value: &str) -> Result<u64, RouteError> {
    if value.is_empty() || value.len() > 19 || !value.bytes().all(|b| b.is_ascii_digit()) {
        return Err(RouteError::BadQuery(format!(
            "{key} must be a whole number, not {}",
            printable(value)
        )));
    }
    value
        .parse()
        .map_err(|_| RouteError::BadQuery(format!("{key} is out of range")))
}

/// Client text echoed in an error, quoted: at most 64 bytes of it once
/// escaped (a character can take 4 bytes, or 10 escaped), control
/// characters shown as `?`.
fn printable(s: &str) -> String {
    let mut out = String::from("\"");
    for c in s.chars() {
        let before = out.len();
        match c {
            c if c.is_control() => out.push('?'),
            '\'' => out.push(c),
            c => out.extend(c.escape_debug()),
        }
        if out.len() > 1 + 64 {
            out.truncate(before);
            out.push('…');
            break;
        }
    }
    out.push('"');
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes() {
        assert_eq!(route("/metrics"), Ok(Route::Metrics));
        assert_eq!(route("/healthz"), Ok(Route::Health));
        assert_eq!(
            route("/api/timewait"),
            Ok(Route::Timewait(TimewaitQuery::default()))
        );
        for (q, key) in [
            ("all", NetnsKey::All),
            ("4026531840", NetnsKey::Inode(4026531840)),
            ("blue-1.a_b", NetnsKey::Name("blue-1.a_b".into())),
        ] {
            assert_eq!(
                route(&format!("/api/timewait?netns={q}")),
                Ok(Route::Timewait(TimewaitQuery { netns: Some(key) }))
            );
        }
        assert_eq!(
            route("/api/conns"),
            Ok(Route::Conns(ConnsQuery {
                limit: DEFAULT_LIMIT,
                since: None
            }))
        );
        assert_eq!(
            route("/api/conns?limit=5&since=17"),
            Ok(Route::Conns(ConnsQuery {
                limit: 5,
                since: Some(17)
            }))
        );
    }

    #[test]
    fn unknown_paths_are_404() {
        for p in ["/", "/api", "/api/conns/1", "/metricsx", "", "x"] {
            let e = route(p).unwrap_err();
            assert_eq!(e.status(), 404, "{p}");
        }
    }

    #[test]
    fn bad_queries_are_400() {
        for q in [
            "limit=",
            "limit=-1",
            "limit=0",
            "limit=abc",
            "limit=1e3",
            "limit=100001",
            "limit=99999999999999999999",
            "limit",
            "limit=1&limit=2",
            "since=1&since=1",
            "colour=red",
            "limit=+5",
            "limit= 5",
        ] {
            let e = parse_conns_query(q).unwrap_err();
            assert_eq!(e.status(), 400, "{q}: {e:?}");
        }
        assert_eq!(route("/metrics?x=1").unwrap_err().status(), 400);
        for q in [
            "netns=",
            "netns=a/b",
            "netns=99999999999",
            "netns=a&netns=b",
            "ns=a",
            "netns",
        ] {
            let e = parse_timewait_query(q).unwrap_err();
            assert_eq!(e.status(), 400, "{q}: {e:?}");
        }
    }

    #[test]
    fn error_text_is_bounded_in_bytes_not_characters() {
        // Found by the http_query fuzzer: 64 characters of 3 bytes each, or
        // escaped to 10, made messages of 200 bytes and more.
        for c in ["\u{fffd}", "\u{301}", "\u{10ffff}", "\"", "\\", "\u{85}"] {
            for target in [
                format!("/{}", c.repeat(100)),
                format!("/api/conns?{}", c.repeat(100)),
                format!("/api/conns?{}=1", c.repeat(100)),
                format!("/api/conns?limit={}", c.repeat(100)),
            ] {
                let e = route(&target).unwrap_err();
                let m = e.message();
                assert!(m.len() < 120 && m.contains("…\""), "{m}");
                assert!(!m.contains(char::is_control), "{m:?}");
            }
        }
        assert_eq!(printable("a'b\"c\u{7}"), r#""a'b\"c?""#);
    }

    #[test]
    fn error_text_is_bounded_and_printable() {
        let long = format!("/{}\u{7}", "a".repeat(1000));
        let e = route(&long).unwrap_err();
        assert!(e.message().len() < 120, "{}", e.message());
        assert!(!e.message().contains('\u{7}'));
    }
}
