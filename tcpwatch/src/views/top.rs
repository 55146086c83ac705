//! `tcpwatch top`: one screen of what the host's TCP connections are doing
//! now, drawn with ratatui (which writes only the cells that changed, so a
//! redraw does not flicker).
//!
//! Top left, connections opened, closed by kind and failed by reason, per
//! second over the last refresh and in all since `top` started; top right,
//! lost events (always shown, first) and the TIME_WAIT totals; below, the
//! TIME_WAIT sockets by destination with the port forecast, and by the
//! command that closed first. Ports are held per (local address,
//! destination), as the kernel allocates them: a destination that several
//! local addresses connect to gets a row under it for each, with that
//! address's own forecast. The TIME_WAIT figures are the
//! [`Snapshot`] that `timewait` prints and the daemon serves, shown as they
//! are: nothing is recomputed here. What does not fit says how much more
//! there is.

use std::cmp::Ordering;
use std::net::{IpAddr, SocketAddr};

use ratatui::layout::{Alignment, Constraint, Layout, Rect};
use ratatui::style::{Color, Modifier, Style};
use ratatui::text::{Line, Span};
use ratatui::widgets::{Cell, Paragraph, Row, Table};
use ratatui::Frame;

use crate::model::timewait::{Destination, Group, Snapshot};

/// One counter: its rate over the last refresh and its count since start.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Rate {
    pub name: String,
    pub per_s: f64,
    pub total: u64,
}

/// Connections per second, each list ordered busiest first.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Activity {
    /// By direction: `active` (connect), `passive` (accept).
    pub opened: Vec<Rate>,
    /// Connections that opened and closed, by how they closed.
    pub closed: Vec<Rate>,
    /// Connections that never opened, by why.
    pub failed: Vec<Rate>,
}

/// Kernel events lost since the tracing began (the daemon's, with
/// `--from`), and how many in the last refresh.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct LostView {
    pub ring_full: u64,
    pub skipped: u64,
    pub last: u64,
}

impl LostView {
    pub fn total(&self) -> u64 {
        self.ring_full + self.skipped
    }
}

/// Everything one refresh shows.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Screen {
    /// Where the figures come from: this host, or a daemon's URL.
    pub source: String,
    /// Wall-clock time of the refresh.
    pub time: String,
    pub activity: Activity,
    pub lost: LostView,
    /// The latest TIME_WAIT snapshot, once there is one.
    pub timewait: Option<Snapshot>,
    /// The latest message (a warning, or why the daemon did not answer).
    pub status: Option<String>,
}

/// What the tables are sorted by; `s` moves to the next key.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum SortKey {
    /// Timewait sockets held.
    #[default]
    TimeWait,
    /// Timewait sockets made per second toward the destination.
    Rate,
    /// Soonest port exhaustion first.
    RunsOut,
    /// Destination address and port, process name.
    Name,
}

impl SortKey {
    pub fn next(self) -> SortKey {
        match self {
            SortKey::TimeWait => SortKey::Rate,
            SortKey::Rate => SortKey::RunsOut,
            SortKey::RunsOut => SortKey::Name,
            SortKey::Name => SortKey::TimeWait,
        }
    }

    pub fn label(self) -> &'static str {
        match self {
            SortKey::TimeWait => "TIME_WAIT",
            SortKey::Rate => "rate",
            SortKey::RunsOut => "runs out",
            SortKey::Name => "name",
        }
    }
}

/// How the user arranged the screen.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ViewState {
    pub sort: SortKey,
    pub reverse: bool,
}

/// Smallest screen drawn; below it a line says so.
pub const MIN_SIZE: (u16, u16) = (60, 12);
/// Width from which the tables get their extra columns.
const WIDE: u16 = 110;

fn bold() -> Style {
    Style::default().add_modifier(Modifier::BOLD)
}

fn heading() -> Style {
    Style::default().add_modifier(Modifier::BOLD | Modifier::REVERSED)
}

fn alarm() -> Style {
    Style::default().fg(Color::Red).add_modifier(Modifier::BOLD)
}

/// A rate: one decimal while it is small.
fn per_s(v: f64) -> String {
    if v < 1000.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.0}")
    }
}

/// Seconds as the forecast says them.
fn seconds(s: f64) -> String {
    if s < 120.0 {
        format!("{s:.0} s")
    } else if s < 7200.0 {
        format!("{:.0} min", s / 60.0)
    } else {
        format!("{:.0} h", s / 3600.0)
    }
}

pub fn draw(f: &mut Frame, s: &Screen, v: &ViewState) {
    let area = f.area();
    if area.width < MIN_SIZE.0 || area.height < MIN_SIZE.1 {
        let msg = format!(
            "terminal {}x{}: tcpwatch top needs at least {}x{} (q quits)",
            area.width, area.height, MIN_SIZE.0, MIN_SIZE.1
        );
        f.render_widget(Paragraph::new(msg).style(alarm()), area);
        return;
    }
    let body = area.height - 2;
    let want = panel_rows(s).max(8);
    let panel = want.min((body / 3).max(8));
    let (dest_rows, proc_rows) = table_rows(s, body - panel);
    let [title, top, dest, procs, footer] = Layout::vertical([
        Constraint::Length(1),
        Constraint::Length(panel),
        Constraint::Length(dest_rows),
        Constraint::Length(proc_rows),
        Constraint::Length(1),
    ])
    .areas(area);
    draw_title(f, title, s);
    let [left, right] =
        Layout::horizontal([Constraint::Percentage(55), Constraint::Percentage(45)]).areas(top);
    f.render_widget(
        Paragraph::new(connection_lines(&s.activity, left.height, left.width)),
        left,
    );
    f.render_widget(
        Paragraph::new(timewait_lines(s, right.height, right.width)),
        right,
    );
    match &s.timewait {
        Some(snap) => {
            draw_destinations(f, dest, snap, v);
            draw_processes(f, procs, snap, v);
        }
        None => {
            f.render_widget(
                Paragraph::new(vec![
                    Line::styled(fill("DESTINATION", dest.width), heading()),
                    Line::raw("  waiting for the first TIME_WAIT snapshot"),
                ]),
                dest,
            );
        }
    }
    draw_footer(f, footer, s, v);
}

/// Rows the top panels would like: the longer of the two.
fn panel_rows(s: &Screen) -> u16 {
    let a = &s.activity;
    let left = 4 + a.opened.len() + a.closed.len() + a.failed.len();
    let right = 9;
    left.max(right).min(u16::MAX as usize) as u16
}

/// The rows of the two tables (each with its header) out of `rows`: each
/// gets what it needs if both fit, else a table that needs less than half
/// gives the rest to the other.
fn table_rows(s: &Screen, rows: u16) -> (u16, u16) {
    let need = |n: usize| (n + 1).min(usize::from(u16::MAX)) as u16;
    let (dest, procs) = match &s.timewait {
        Some(t) => (
            need(
                destination_rows(t, &ViewState::default())
                    .iter()
                    .map(dest_row_count)
                    .sum(),
            ),
            need(t.by_process.len()),
        ),
        None => (2, 0),
    };
    let half = rows / 2;
    if dest + procs <= rows {
        // Both fit: the spare rows go below both.
        (dest, rows - dest)
    } else if dest > rows - half {
        let procs = procs.min(half);
        (rows - procs, procs)
    } else {
        (dest, rows - dest)
    }
}

/// `text` padded with spaces to `width` (a heading's reversed bar).
fn fill(text: &str, width: u16) -> String {
    format!("{text:<w$}", w = usize::from(width))
}

fn draw_title(f: &mut Frame, area: Rect, s: &Screen) {
    let left = format!(" tcpwatch top · {} · {}", s.source, s.time);
    f.render_widget(
        Paragraph::new(fill(&left, area.width)).style(heading()),
        area,
    );
}

fn draw_footer(f: &mut Frame, area: Rect, s: &Screen, v: &ViewState) {
    let arrow = if v.reverse { "▲" } else { "▼" };
    let mut spans = vec![
        Span::styled(" s", bold()),
        Span::raw(format!(" sort: {} {arrow}  ", v.sort.label())),
        Span::styled("r", bold()),
        Span::raw(" reverse  "),
        Span::styled("q", bold()),
        Span::raw(" quit"),
    ];
    if let Some(msg) = &s.status {
        spans.push(Span::styled(
            format!("   {msg}"),
            Style::default().add_modifier(Modifier::DIM),
        ));
    }
    f.render_widget(Paragraph::new(Line::from(spans)), area);
}

/// One counter line of the connections panel.
fn rate_line(name: &str, per: f64, total: u64, width: u16, style: Style) -> Line<'static> {
    let name_w = usize::from(width).saturating_sub(19).max(8);
    let name: String = name.chars().take(name_w).collect();
    Line::styled(
        format!("{name:<name_w$} {:>8} {:>9}", per_s(per), total),
        style,
    )
}

/// How many of each list's rows fit in `budget` rows, taking one row in
/// turn from each list that has more, in the order given.
fn share_rows(lens: &[usize], mut budget: usize) -> Vec<usize> {
    let mut shown = vec![0; lens.len()];
    while budget > 0 {
        let mut gave = false;
        for (i, len) in lens.iter().enumerate() {
            if budget > 0 && shown[i] < *len {
                shown[i] += 1;
                budget -= 1;
                gave = true;
            }
        }
        if !gave {
            break;
        }
    }
    shown
}

/// The connections panel: a heading, then opened, closed and failed, each
/// with as many of its kinds as fit (closed kinds and failure reasons
/// before the split of opened by direction).
fn connection_lines(a: &Activity, rows: u16, width: u16) -> Vec<Line<'static>> {
    let name_w = usize::from(width).saturating_sub(19).max(8);
    let mut out = vec![Line::styled(
        format!("{:<name_w$} {:>8} {:>9}", "CONNECTIONS", "/s", "TOTAL"),
        heading(),
    )];
    let budget = usize::from(rows).saturating_sub(4);
    // Closed kinds and failure reasons first; the split of opened by
    // direction only when all of it fits.
    let [closed, failed] = match share_rows(&[a.closed.len(), a.failed.len()], budget)[..] {
        [c, f] => [c, f],
        _ => [0, 0],
    };
    let left = budget - closed - failed;
    let opened = if left >= a.opened.len() {
        a.opened.len()
    } else {
        0
    };
    for (head, list, shown) in [
        ("opened", &a.opened, opened),
        ("closed", &a.closed, closed),
        ("failed", &a.failed, failed),
    ] {
        // (A fold from 0.0: an empty f64 sum is -0.0.)
        let per = list.iter().fold(0.0, |sum, r| sum + r.per_s);
        let total: u64 = list.iter().map(|r| r.total).sum();
        let style = if head == "failed" && per > 0.0 {
            alarm()
        } else {
            bold()
        };
        out.push(rate_line(head, per, total, width, style));
        let hidden = list.len() - shown;
        for (i, r) in list.iter().take(shown).enumerate() {
            if hidden > 0 && i + 1 == shown {
                out.push(Line::raw(format!("  … {} more", hidden + 1)));
            } else {
                out.push(rate_line(
                    &format!("  {}", r.name),
                    r.per_s,
                    r.total,
                    width,
                    Style::default(),
                ));
            }
        }
    }
    out
}

/// The right panel: lost events first (never cut), then the TIME_WAIT
/// totals of the snapshot.
fn timewait_lines(s: &Screen, rows: u16, width: u16) -> Vec<Line<'static>> {
    let w = usize::from(width).saturating_sub(1);
    let l = &s.lost;
    let lost_style = if l.total() > 0 { alarm() } else { bold() };
    let mut out = vec![
        Line::styled(format!(" {:<w$}", "LOST EVENTS"), heading()),
        Line::styled(
            format!(
                " {} (ring full {}, kernel skipped {})",
                l.total(),
                l.ring_full,
                l.skipped
            ),
            lost_style,
        ),
    ];
    if l.last > 0 {
        out.push(Line::styled(
            format!(" {} in the last refresh", l.last),
            alarm(),
        ));
    }
    out.push(Line::styled(
        format!(" {:<w$}", "TIME_WAIT SOCKETS"),
        heading(),
    ));
    let Some(t) = &s.timewait else {
        out.push(Line::raw(" waiting for the first snapshot"));
        return out;
    };
    let k = &t.kernel;
    let opt = |v: Option<u64>| v.map_or_else(|| "?".to_string(), |v| v.to_string());
    let mut lines = vec![
        Line::styled(
            format!(" held      {} (FIN_WAIT2 {})", t.total, t.fin_wait2),
            bold(),
        ),
        Line::raw(format!(
            " kernel    {} of max {}",
            opt(k.sockstat_tw),
            opt(k.max_tw_buckets)
        )),
        Line::raw(format!(
            " made/s    {} (minute {})",
            per_s(t.rate_last_interval),
            per_s(t.rate_last_minute)
        )),
    ];
    if t.unattributed > 0 {
        lines.push(Line::styled(
            format!(" {} not seen made: lost", t.unattributed),
            alarm(),
        ));
    }
    if let Some(n) = k.overflow_since_start.filter(|n| *n > 0) {
        lines.push(Line::styled(format!(" {n} not made: max reached"), alarm()));
    }
    lines.push(Line::raw(format!(
        " ports     {} each, tw_reuse {}",
        opt(k.port_range.map(u64::from)),
        opt(k.tw_reuse.map(u64::from))
    )));
    lines.push(Line::raw(format!(" snapshot  {}", short_time(&t.ts))));
    let room = usize::from(rows).saturating_sub(out.len());
    out.extend(lines.into_iter().take(room));
    out
}

/// `2026-11-23T23:41:07.123456789Z` → `23:41:07`.
pub fn short_time(ts: &str) -> &str {
    ts.get(11..19).unwrap_or(ts)
}

/// The rest of the groups, summed: always the last row.
fn is_rest(key: &str) -> bool {
    key == "other"
}

/// Groups named in parentheses ("(before tracing)") come after the named
/// ones when sorted by name.
fn name_key(key: &str) -> (bool, &str) {
    (key.starts_with('('), key)
}

/// A name ordered as an address where it is one (`ADDR:PORT`, `ADDR:*`).
fn name_order(a: &str, b: &str) -> Ordering {
    fn addr(s: &str) -> Option<(IpAddr, u16)> {
        if let Ok(sa) = s.parse::<SocketAddr>() {
            return Some((sa.ip(), sa.port()));
        }
        let host = s.strip_suffix(":*")?;
        let host = host
            .strip_prefix('[')
            .and_then(|h| h.strip_suffix(']'))
            .unwrap_or(host);
        host.parse().ok().map(|ip| (ip, 0))
    }
    match (addr(a), addr(b)) {
        (Some(x), Some(y)) => x.cmp(&y),
        (Some(_), None) => Ordering::Less,
        (None, Some(_)) => Ordering::Greater,
        (None, None) => a.cmp(b),
    }
}

/// One destination: its timewait sockets (client and server side), and
/// the port forecasts when this host is the client, one per local address
/// the ports are taken from.
#[derive(Clone, Debug, PartialEq)]
pub struct DestRow<'a> {
    pub name: &'a str,
    pub timewait: u64,
    pub share: f64,
    /// The forecasts toward it, per local address: the one that runs out
    /// first (then the one holding the most ports) first.
    pub ports: Vec<&'a Destination>,
}

impl<'a> DestRow<'a> {
    /// The forecast that matters most: the local address that runs out
    /// first. The table is sorted by it.
    pub fn first(&self) -> Option<&'a Destination> {
        self.ports.first().copied()
    }
}

/// Soonest exhaustion first, then the most ports held, then by address.
fn forecast_order(a: &Destination, b: &Destination) -> Ordering {
    soonest(a.exhaustion_s, b.exhaustion_s)
        .then(b.ports_held.cmp(&a.ports_held))
        .then(name_order(&a.local, &b.local))
}

/// Times to exhaustion, soonest first; none after any.
fn soonest(a: Option<f64>, b: Option<f64>) -> Ordering {
    match (a, b) {
        (Some(x), Some(y)) => x.total_cmp(&y),
        (Some(_), None) => Ordering::Less,
        (None, Some(_)) => Ordering::Greater,
        (None, None) => Ordering::Equal,
    }
}

/// The snapshot's destinations in the order `v` asks for.
pub fn destination_rows<'a>(s: &'a Snapshot, v: &ViewState) -> Vec<DestRow<'a>> {
    let mut rows: Vec<DestRow<'a>> = s
        .by_remote
        .iter()
        .map(|g| {
            let mut ports: Vec<&Destination> = s
                .destinations
                .iter()
                .filter(|d| d.remote == g.key)
                .collect();
            ports.sort_by(|a, b| forecast_order(a, b));
            DestRow {
                name: &g.key,
                timewait: g.count,
                share: g.share,
                ports,
            }
        })
        .collect();
    let rate = |r: &DestRow<'_>| r.first().map_or(0.0, |d| d.rate_per_s);
    let runs_out = |r: &DestRow<'_>| r.first().and_then(|d| d.exhaustion_s);
    rows.sort_by(|a, b| {
        let placed = is_rest(a.name).cmp(&is_rest(b.name));
        let by = match v.sort {
            SortKey::TimeWait => b.timewait.cmp(&a.timewait),
            SortKey::Rate => rate(b).total_cmp(&rate(a)),
            SortKey::RunsOut => soonest(runs_out(a), runs_out(b)),
            SortKey::Name => name_order(a.name, b.name),
        };
        let by = if v.reverse { by.reverse() } else { by };
        placed
            .then(by)
            .then(b.timewait.cmp(&a.timewait))
            .then(name_order(a.name, b.name))
    });
    rows
}

/// The snapshot's processes in the order `v` asks for (by name, or by
/// timewait sockets for every other key).
pub fn process_rows<'a>(s: &'a Snapshot, v: &ViewState) -> Vec<&'a Group> {
    let mut rows: Vec<&Group> = s.by_process.iter().collect();
    rows.sort_by(|a, b| {
        let placed = is_rest(&a.key).cmp(&is_rest(&b.key));
        let by = match v.sort {
            SortKey::Name => name_key(&a.key).cmp(&name_key(&b.key)),
            _ => b.count.cmp(&a.count),
        };
        let by = if v.reverse { by.reverse() } else { by };
        placed.then(by).then(a.key.cmp(&b.key))
    });
    rows
}

fn right(text: String) -> Cell<'static> {
    Cell::from(Line::from(text).alignment(Alignment::Right))
}

/// The table rows of `items`, each item one or more rows kept together,
/// in at most `room` rows; when some items do not fit, the last row says
/// how many.
fn fit<'a>(items: Vec<Vec<Row<'a>>>, room: usize, what: &str) -> Vec<Row<'a>> {
    let all: usize = items.iter().map(Vec::len).sum();
    if all <= room || room == 0 {
        return items.into_iter().flatten().collect();
    }
    let mut out = Vec::new();
    let mut shown = 0;
    for item in &items {
        if out.len() + item.len() > room - 1 {
            break;
        }
        out.extend(item.iter().cloned());
        shown += 1;
    }
    out.push(Row::new(vec![Cell::from(format!(
        "  … {} more {what}",
        items.len() - shown
    ))]));
    out
}

fn runs_out(d: Option<&Destination>) -> (String, Style) {
    match d {
        None => ("-".into(), Style::default()),
        Some(d) => match (d.exhaustion_s, d.tw_reuse_applies) {
            (Some(s), _) => (seconds(s), alarm()),
            (None, true) => ("never (reuse)".into(), Style::default()),
            (None, false) => ("never".into(), Style::default()),
        },
    }
}

/// Table rows a destination takes: its own, and one per local address
/// when several hold ports toward it.
fn dest_row_count(r: &DestRow<'_>) -> usize {
    match r.ports.len() {
        0 | 1 => 1,
        n => 1 + n,
    }
}

/// The forecast cells of one (local address, destination): PORTS, RATE/s,
/// the wide RANGE and STEADY, RUNS OUT.
fn forecast_cells(d: Option<&Destination>, wide: bool) -> Vec<Cell<'static>> {
    let (out, style) = runs_out(d);
    let mut cells = vec![
        right(d.map_or("-".into(), |d| d.ports_held.to_string())),
        right(d.map_or("-".into(), |d| per_s(d.rate_per_s))),
    ];
    if wide {
        cells.push(right(
            d.and_then(|d| d.port_range)
                .map_or("-".into(), |n| n.to_string()),
        ));
        cells.push(right(
            d.map_or("-".into(), |d| format!("{:.0}", d.steady_state_ports)),
        ));
    }
    cells.push(Cell::from(Line::styled(out, style)));
    cells
}

fn draw_destinations(f: &mut Frame, area: Rect, s: &Snapshot, v: &ViewState) {
    let wide = area.width >= WIDE;
    let mut head = vec!["DESTINATION", "TIME_WAIT", "SHARE", "PORTS", "RATE/s"];
    let mut widths = vec![
        Constraint::Min(16),
        Constraint::Length(9),
        Constraint::Length(6),
        Constraint::Length(7),
        Constraint::Length(8),
    ];
    if wide {
        head.extend(["RANGE", "STEADY"]);
        widths.extend([Constraint::Length(7), Constraint::Length(8)]);
    }
    head.push("RUNS OUT");
    widths.push(Constraint::Length(13));
    let rows: Vec<Vec<Row>> = destination_rows(s, v)
        .into_iter()
        .map(|r| {
            let mut cells = vec![
                Cell::from(r.name.to_string()),
                right(r.timewait.to_string()),
                right(format!("{:.0}%", r.share * 100.0)),
            ];
            if r.ports.len() <= 1 {
                cells.extend(forecast_cells(r.first(), wide));
                return vec![Row::new(cells)];
            }
            // Each local address has its own ports toward it: a row each,
            // never a sum.
            let mut rows = vec![Row::new(cells)];
            rows.extend(r.ports.iter().map(|d| {
                let mut cells = vec![
                    Cell::from(format!("  from {}", d.local)),
                    Cell::from(""),
                    Cell::from(""),
                ];
                cells.extend(forecast_cells(Some(d), wide));
                Row::new(cells)
            }));
            rows
        })
        .collect();
    let room = usize::from(area.height).saturating_sub(1);
    let rows = if rows.is_empty() {
        vec![Row::new(vec![Cell::from("  no timewait sockets")])]
    } else {
        fit(rows, room, "destinations")
    };
    let table = Table::new(rows, widths)
        .header(Row::new(head).style(heading()))
        .column_spacing(1);
    f.render_widget(table, area);
}

/// The pid of a one-process group, how many processes a larger one has
/// (`5 procs`), `-` for groups that are not processes.
fn pids(g: &Group) -> String {
    match (g.pid, g.processes) {
        (Some(pid), _) => pid.to_string(),
        (None, Some(n)) => format!("{n} procs"),
        (None, None) => "-".into(),
    }
}

fn draw_processes(f: &mut Frame, area: Rect, s: &Snapshot, v: &ViewState) {
    let head = vec![
        "PROCESS (closed first)",
        "PIDS",
        "CGROUP",
        "TIME_WAIT",
        "SHARE",
    ];
    let widths = [
        Constraint::Min(16),
        Constraint::Length(10),
        Constraint::Length(if area.width >= WIDE { 20 } else { 10 }),
        Constraint::Length(9),
        Constraint::Length(6),
    ];
    let rows: Vec<Vec<Row>> = process_rows(s, v)
        .into_iter()
        .map(|g| {
            vec![Row::new(vec![
                Cell::from(g.key.clone()),
                right(pids(g)),
                right(g.cgroup.map_or("-".into(), |c| c.to_string())),
                right(g.count.to_string()),
                right(format!("{:.0}%", g.share * 100.0)),
            ])]
        })
        .collect();
    let room = usize::from(area.height).saturating_sub(1);
    let rows = if rows.is_empty() {
        vec![Row::new(vec![Cell::from("  no timewait sockets")])]
    } else {
        fit(rows, room, "processes")
    };
    let table = Table::new(rows, widths)
        .header(Row::new(head).style(heading()))
        .column_spacing(1);
    f.render_widget(table, area);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::timewait::KernelView;
    use ratatui::backend::TestBackend;
    use ratatui::Terminal;

    fn group(key: &str, count: u64, total: u64) -> Group {
        Group {
            key: key.into(),
            pid: None,
            pids: Vec::new(),
            processes: None,
            comm: None,
            cgroup: None,
            count,
            share: count as f64 / total as f64,
        }
    }

    /// A process group: its command, and its pid or how many processes.
    fn process(comm: &str, pids: &[u32], count: u64, total: u64) -> Group {
        Group {
            pid: (pids.len() == 1).then(|| pids[0]),
            pids: pids.to_vec(),
            processes: Some(pids.len() as u64),
            comm: Some(comm.into()),
            ..group(comm, count, total)
        }
    }

    fn dest(remote: &str, held: u64, rate: f64, exhaustion_s: Option<f64>) -> Destination {
        Destination {
            local: "10.0.0.1".into(),
            remote: remote.into(),
            ports_held: held,
            port_range: Some(28_232),
            rate_per_s: rate,
            exhaustion_s,
            steady_state_ports: rate * 60.0,
            tw_reuse_applies: false,
        }
    }

    /// Three destinations whose orders differ by every key, two processes,
    /// and an "other" group that stays last.
    fn snapshot() -> Snapshot {
        let total = 160;
        Snapshot {
            ts: "2026-11-24T10:20:30.000000000Z".into(),
            interval_s: 1.0,
            total,
            time_wait: 150,
            fin_wait2: 10,
            before_tracing: 0,
            unattributed: 0,
            just_closed: 0,
            other_netns: 0,
            kernel_listed: Some(160),
            check: None,
            kernel: KernelView {
                sockstat_tw: Some(161),
                max_tw_buckets: Some(131_072),
                port_range: Some(28_232),
                tw_reuse: Some(2),
                ..KernelView::default()
            },
            created_last_interval: 12,
            rate_last_interval: 12.0,
            rate_last_minute: 2.5,
            by_process: vec![
                process("client", &[4242], 100, total),
                group("(before tracing)", 60, total),
                process("aserver", &[77, 78, 79], 50, total),
                group("other", 10, total),
            ],
            by_remote: vec![
                group("10.0.0.9:80", 100, total),
                group("10.0.0.2:5432", 40, total),
                group("10.0.0.10:443", 10, total),
                group("other", 10, total),
            ],
            destinations: vec![
                dest("10.0.0.9:80", 100, 1.0, None),
                dest("10.0.0.2:5432", 40, 600.0, Some(30.0)),
                dest("10.0.0.10:443", 10, 5.0, Some(3000.0)),
            ],
            by_local: vec![],
            by_container: vec![],
            netns: None,
            netns_name: None,
            churn: vec![],
            findings: vec![],
            from_recording: false,
            untracked: 0,
        }
    }

    fn screen() -> Screen {
        let r = |name: &str, per_s: f64, total: u64| Rate {
            name: name.into(),
            per_s,
            total,
        };
        Screen {
            source: "this host".into(),
            time: "10:20:31".into(),
            activity: Activity {
                opened: vec![r("active", 6.0, 60), r("passive", 6.0, 60)],
                closed: vec![r("orderly", 10.0, 100), r("reset_received", 2.0, 20)],
                failed: vec![r("refused", 1.0, 3)],
            },
            lost: LostView {
                ring_full: 5,
                skipped: 2,
                last: 0,
            },
            timewait: Some(snapshot()),
            status: None,
        }
    }

    fn render(s: &Screen, v: &ViewState, w: u16, h: u16) -> Vec<String> {
        let mut t = Terminal::new(TestBackend::new(w, h)).unwrap();
        t.draw(|f| draw(f, s, v)).unwrap();
        let buf = t.backend().buffer().clone();
        (0..h)
            .map(|y| {
                (0..w)
                    .map(|x| buf[(x, y)].symbol().to_string())
                    .collect::<String>()
                    .trim_end()
                    .to_string()
            })
            .collect()
    }

    fn names(rows: &[DestRow<'_>]) -> Vec<String> {
        rows.iter().map(|r| r.name.to_string()).collect()
    }

    #[test]
    fn every_key_orders_the_destinations_its_own_way() {
        let s = snapshot();
        let mut v = ViewState::default();
        let mut seen = Vec::new();
        for _ in 0..4 {
            seen.push((v.sort, names(&destination_rows(&s, &v))));
            v.sort = v.sort.next();
        }
        assert_eq!(v.sort, SortKey::TimeWait, "the keys cycle");
        let order = |k| seen.iter().find(|(s, _)| *s == k).unwrap().1.clone();
        assert_eq!(
            order(SortKey::TimeWait),
            ["10.0.0.9:80", "10.0.0.2:5432", "10.0.0.10:443", "other"]
        );
        assert_eq!(
            order(SortKey::Rate),
            ["10.0.0.2:5432", "10.0.0.10:443", "10.0.0.9:80", "other"]
        );
        // Soonest first; a destination that never runs out after those that do.
        assert_eq!(
            order(SortKey::RunsOut),
            ["10.0.0.2:5432", "10.0.0.10:443", "10.0.0.9:80", "other"]
        );
        // As addresses (10.0.0.10 after 10.0.0.9), not as strings.
        assert_eq!(
            order(SortKey::Name),
            ["10.0.0.2:5432", "10.0.0.9:80", "10.0.0.10:443", "other"]
        );
        v.reverse = true;
        assert_eq!(
            names(&destination_rows(&s, &v)),
            ["10.0.0.9:80", "10.0.0.2:5432", "10.0.0.10:443", "other"]
                .iter()
                .rev()
                .skip(1)
                .chain(["other"].iter())
                .copied()
                .collect::<Vec<_>>(),
            "reversed, with other still last"
        );
    }

    #[test]
    fn processes_sort_by_count_or_name() {
        let s = snapshot();
        let keys = |v: &ViewState| -> Vec<String> {
            process_rows(&s, v).iter().map(|g| g.key.clone()).collect()
        };
        // Sockets from before tracing are counted like any group.
        assert_eq!(
            keys(&ViewState::default()),
            ["client", "(before tracing)", "aserver", "other"]
        );
        let by_name = ViewState {
            sort: SortKey::Name,
            reverse: false,
        };
        assert_eq!(
            keys(&by_name),
            ["aserver", "client", "(before tracing)", "other"]
        );
        let by_name_rev = ViewState {
            sort: SortKey::Name,
            reverse: true,
        };
        assert_eq!(
            keys(&by_name_rev),
            ["(before tracing)", "client", "aserver", "other"]
        );
    }

    #[test]
    fn fits_80_by_24_with_everything_in_view() {
        let lines = render(&screen(), &ViewState::default(), 80, 24);
        let all = lines.join("\n");
        assert!(
            lines[0].starts_with(" tcpwatch top · this host · 10:20:31"),
            "{all}"
        );
        assert!(lines.iter().all(|l| l.chars().count() <= 80));
        // The connections panel: totals per head and each kind.
        let row = |prefix: &str| {
            lines
                .iter()
                .find(|l| l.trim_start().starts_with(prefix))
                .unwrap_or_else(|| panic!("no {prefix:?} in\n{all}"))
                .split_whitespace()
                .map(str::to_string)
                .collect::<Vec<_>>()
        };
        assert_eq!(row("opened")[1..3], ["12.0", "120"]);
        assert_eq!(row("closed")[1..3], ["12.0", "120"]);
        assert_eq!(row("orderly")[1..3], ["10.0", "100"]);
        assert_eq!(row("failed")[1..3], ["1.0", "3"]);
        assert!(all.contains("refused"), "{all}");
        // Lost events are shown with both causes.
        assert!(all.contains(" 7 (ring full 5, kernel skipped 2)"), "{all}");
        assert!(all.contains(" held      160 (FIN_WAIT2 10)"), "{all}");
        assert!(all.contains(" kernel    161 of max 131072"), "{all}");
        assert!(all.contains(" ports     28232 each, tw_reuse 2"), "{all}");
        // The destination table, with the forecast.
        let d = row("10.0.0.2:5432");
        assert_eq!(d[1..5], ["40", "25%", "40", "600.0"], "{all}");
        assert_eq!(d[5..], ["30", "s"]);
        assert!(!all.contains("STEADY"), "no wide columns at 80");
        // Processes by command: the pid of one, how many of several.
        let p = row("client");
        assert_eq!(p[1..], ["4242", "-", "100", "62%"], "{all}");
        let p = row("aserver");
        assert_eq!(p[1..], ["3", "procs", "-", "50", "31%"], "{all}");
        assert!(lines[23].contains("s sort: TIME_WAIT ▼"), "{all}");
        assert!(lines[23].contains("q quit"), "{all}");
    }

    #[test]
    fn a_wider_taller_terminal_shows_more() {
        let mut s = screen();
        let snap = s.timewait.as_mut().unwrap();
        let total = 400;
        for i in 0..30u64 {
            snap.by_remote
                .push(group(&format!("10.1.0.{i}:80"), 1, total));
        }
        let small = render(&s, &ViewState::default(), 80, 24).join("\n");
        let big = render(&s, &ViewState::default(), 120, 40).join("\n");
        assert!(small.contains("more destinations"), "{small}");
        assert!(big.contains("STEADY") && big.contains("RANGE"), "{big}");
        let shown = |t: &str| t.matches("10.1.0.").count();
        assert!(shown(&big) > shown(&small), "{small}\n{big}");
        // The count of hidden rows is true: the rows shown between the
        // table's header and the "more" line, and the hidden ones, make
        // all 34 (three destinations, 30 more, and other).
        let lines: Vec<&str> = small.lines().collect();
        let header = lines
            .iter()
            .position(|l| l.starts_with("DESTINATION"))
            .unwrap();
        let more = lines
            .iter()
            .position(|l| l.contains("more destinations"))
            .unwrap();
        let hidden: usize = lines[more]
            .trim()
            .strip_prefix("… ")
            .and_then(|l| l.strip_suffix(" more destinations"))
            .and_then(|n| n.parse().ok())
            .unwrap();
        assert_eq!(more - header - 1 + hidden, 34, "{small}");
        // The processes keep their rows: all three fit.
        assert!(
            small.contains("other") && small.contains("aserver"),
            "{small}"
        );
    }

    /// Two local addresses connect to one destination: each has its own
    /// ports, so each gets its own row and forecast under it, never a sum;
    /// the destination sorts by the address that runs out first.
    #[test]
    fn ports_of_each_local_address_get_their_own_row() {
        let mut s = screen();
        let snap = s.timewait.as_mut().unwrap();
        let mut other = dest("10.0.0.9:80", 1500, 1500.0, Some(18.0));
        other.local = "10.0.0.3".into();
        snap.destinations.push(other);
        let v = ViewState {
            sort: SortKey::RunsOut,
            reverse: false,
        };
        let rows = destination_rows(snap, &v);
        assert_eq!(names(&rows)[0], "10.0.0.9:80", "runs out first, in 18 s");
        let locals: Vec<&str> = rows[0].ports.iter().map(|d| d.local.as_str()).collect();
        assert_eq!(locals, ["10.0.0.3", "10.0.0.1"], "soonest first");

        let lines = render(&s, &v, 80, 24);
        let all = lines.join("\n");
        let at = |prefix: &str| {
            lines
                .iter()
                .position(|l| l.trim_start().starts_with(prefix))
                .unwrap_or_else(|| panic!("no {prefix:?} in\n{all}"))
        };
        let words = |i: usize| lines[i].split_whitespace().collect::<Vec<_>>();
        let head = at("10.0.0.9:80");
        // The destination's own row: its timewait sockets, no ports summed.
        assert_eq!(words(head), ["10.0.0.9:80", "100", "62%"], "{all}");
        assert_eq!(at("from 10.0.0.3"), head + 1, "{all}");
        assert_eq!(
            words(head + 1),
            ["from", "10.0.0.3", "1500", "1500", "18", "s"],
            "{all}"
        );
        assert_eq!(
            words(head + 2),
            ["from", "10.0.0.1", "100", "1.0", "never"],
            "{all}"
        );
        // A destination with one local address keeps one row.
        assert_eq!(words(at("10.0.0.2:5432"))[3..5], ["40", "600.0"], "{all}");
        assert!(!all.contains("more destinations"), "{all}");

        // When they do not all fit, a destination's rows stay together
        // and the count of hidden destinations is true.
        for i in 0..30u64 {
            let snap = s.timewait.as_mut().unwrap();
            let name = format!("10.1.0.{i}:80");
            snap.by_remote.push(group(&name, 1, 400));
            for local in ["10.0.0.1", "10.0.0.3"] {
                let mut d = dest(&name, 1, 0.0, None);
                d.local = local.into();
                snap.destinations.push(d);
            }
        }
        let v = ViewState::default();
        let lines = render(&s, &v, 120, 40);
        let all = lines.join("\n");
        let hidden: usize = lines
            .iter()
            .find_map(|l| {
                l.trim()
                    .strip_prefix("… ")?
                    .strip_suffix(" more destinations")?
                    .parse()
                    .ok()
            })
            .unwrap_or_else(|| panic!("{all}"));
        let shown = lines.iter().filter(|l| l.starts_with("10.")).count();
        assert_eq!(shown + hidden, 34, "{all}");
        let last = lines
            .iter()
            .rposition(|l| l.starts_with("10.1.0."))
            .unwrap();
        assert!(
            lines[last + 1].trim_start().starts_with("from 10.0.0.1")
                && lines[last + 2].trim_start().starts_with("from 10.0.0.3"),
            "the last destination shown keeps both its rows:\n{all}"
        );
    }

    #[test]
    fn kinds_that_do_not_fit_are_counted() {
        let mut s = screen();
        s.activity.closed = (0..12)
            .map(|i| Rate {
                name: format!("kind{i}"),
                per_s: 1.0,
                total: 1,
            })
            .collect();
        let all = render(&s, &ViewState::default(), 80, 24).join("\n");
        assert!(all.contains("closed") && all.contains("12.0"), "{all}");
        let shown = all.matches("kind").count();
        let hidden: usize = all
            .lines()
            .find_map(|l| {
                let rest = l.trim().strip_prefix("… ")?;
                rest.split_whitespace().next()?.parse().ok()
            })
            .unwrap_or_else(|| panic!("{all}"));
        assert_eq!(shown + hidden, 12, "{all}");
    }

    #[test]
    fn before_the_first_snapshot_it_says_so() {
        let mut s = screen();
        s.timewait = None;
        s.activity.failed.clear();
        let all = render(&s, &ViewState::default(), 80, 24).join("\n");
        let failed = all.lines().find(|l| l.starts_with("failed")).unwrap();
        assert_eq!(
            failed.split_whitespace().collect::<Vec<_>>(),
            ["failed", "0.0", "0"],
            "{all}"
        );
        assert!(all.contains("waiting for the first"), "{all}");
        assert!(all.contains(" 7 (ring full 5"), "{all}");
    }

    #[test]
    fn a_tiny_terminal_gets_one_line() {
        let lines = render(&screen(), &ViewState::default(), 40, 10);
        assert!(lines[0].starts_with("terminal 40x10"), "{lines:?}");
    }
}
