//! Why the kernel sent a RST: the `enum sk_rst_reason` that
//! `tcp:tcp_send_reset` carries since Linux 6.10, with a name and a few
//! words for each.

use std::borrow::Cow;
use std::fmt;

/// The kernel's `enum sk_rst_reason` number (include/net/rstreason.h).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ResetReason(pub u8);

/// The kernel's reasons as of Linux 6.18, in its order (the enum's value is
/// the index): the name without its `SK_RST_REASON_` prefix, as the
/// tracepoint prints it, and what it means in words.
const REASONS: [(&str, &str); 26] = [
    ("NOT_SPECIFIED", "no reason given"),
    ("NO_SOCKET", "no socket (port closed)"),
    ("TCP_INVALID_ACK_SEQUENCE", "ACK of data never sent"),
    ("TCP_RFC7323_PAWS", "stale timestamp (PAWS)"),
    ("TCP_TOO_OLD_ACK", "ACK too old"),
    ("TCP_ACK_UNSENT_DATA", "ACK of unsent data"),
    ("TCP_FLAGS", "unexpected flags"),
    ("TCP_OLD_ACK", "old ACK"),
    ("TCP_ABORT_ON_DATA", "data after close"),
    ("TCP_TIMEWAIT_SOCKET", "segment for a TIME_WAIT socket"),
    ("INVALID_SYN", "unexpected SYN"),
    ("TCP_ABORT_ON_CLOSE", "closed with unread data"),
    (
        "TCP_ABORT_ON_LINGER",
        "closed in FIN_WAIT2 with TCP_LINGER2 < 0",
    ),
    ("TCP_ABORT_ON_MEMORY", "out of memory for orphaned sockets"),
    (
        "TCP_STATE",
        "aborted (closed with SO_LINGER 0, or disconnected)",
    ),
    ("TCP_KEEPALIVE_TIMEOUT", "keepalive probes unanswered"),
    ("TCP_DISCONNECT_WITH_DATA", "disconnected with unsent data"),
    ("MPTCP_RST_EUNSPEC", "MPTCP: unspecified error"),
    ("MPTCP_RST_EMPTCP", "MPTCP: MPTCP-specific error"),
    ("MPTCP_RST_ERESOURCE", "MPTCP: out of resources"),
    ("MPTCP_RST_EPROHIBIT", "MPTCP: administratively prohibited"),
    ("MPTCP_RST_EWQ2BIG", "MPTCP: too much unacknowledged data"),
    ("MPTCP_RST_EBADPERF", "MPTCP: unacceptable performance"),
    ("MPTCP_RST_EMIDDLEBOX", "MPTCP: middlebox interference"),
    ("ERROR", "an error"),
    ("MAX", "an error"),
];

impl ResetReason {
    pub const NO_SOCKET: ResetReason = ResetReason(1);
    pub const TCP_ABORT_ON_CLOSE: ResetReason = ResetReason(11);
    pub const TCP_STATE: ResetReason = ResetReason(14);

    /// Every reason this build knows, in the kernel's order.
    pub fn known() -> impl Iterator<Item = ResetReason> {
        (0..REASONS.len() as u8).map(ResetReason)
    }

    fn entry(self) -> Option<&'static (&'static str, &'static str)> {
        REASONS.get(usize::from(self.0))
    }

    /// The kernel's name (`NO_SOCKET`), or `reason N` for a number newer
    /// than this build.
    pub fn name(self) -> Cow<'static, str> {
        match self.entry() {
            Some((name, _)) => Cow::Borrowed(name),
            None => Cow::Owned(format!("reason {}", self.0)),
        }
    }

    /// What it means, in a few words; the name again (`reason N`) for an
    /// unknown number.
    pub fn words(self) -> Cow<'static, str> {
        match self.entry() {
            Some((_, words)) => Cow::Borrowed(words),
            None => self.name(),
        }
    }

    /// A label with a bounded set of values (for metrics): the name, or
    /// `other` for a number this build does not know.
    pub fn label(self) -> &'static str {
        self.entry().map_or("other", |(name, _)| name)
    }

    /// Parses a name as [`ResetReason::name`] writes it.
    pub fn from_name(name: &str) -> Option<ResetReason> {
        if let Some(n) = name.strip_prefix("reason ") {
            return n.parse().ok().map(ResetReason);
        }
        REASONS
            .iter()
            .position(|(n, _)| *n == name)
            .map(|i| ResetReason(i as u8))
    }
}

/// `words (NAME)`, or `reason N` alone.
impl fmt::Display for ResetReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.entry() {
            Some((name, words)) => write!(f, "{words} ({name})"),
            None => write!(f, "reason {}", self.0),
        }
    }
}

/// What a trace or record says when the kernel gave no reason (before
/// Linux 6.10 its `tcp_send_reset` has none).
pub const UNKNOWN_REASON: &str = "reason unknown (this kernel does not say)";

/// A reason in words, or that the kernel did not give one.
pub fn explain(reason: Option<ResetReason>) -> String {
    reason.map_or_else(|| UNKNOWN_REASON.to_string(), |r| r.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_the_kernels_numbers() {
        assert_eq!(ResetReason(0).name(), "NOT_SPECIFIED");
        assert_eq!(ResetReason::NO_SOCKET.name(), "NO_SOCKET");
        assert_eq!(ResetReason::NO_SOCKET.words(), "no socket (port closed)");
        assert_eq!(ResetReason(8).name(), "TCP_ABORT_ON_DATA");
        assert_eq!(ResetReason(10).name(), "INVALID_SYN");
        assert_eq!(ResetReason::TCP_ABORT_ON_CLOSE.name(), "TCP_ABORT_ON_CLOSE");
        assert_eq!(
            ResetReason::TCP_ABORT_ON_CLOSE.words(),
            "closed with unread data"
        );
        assert_eq!(ResetReason(12).name(), "TCP_ABORT_ON_LINGER");
        assert_eq!(ResetReason(13).name(), "TCP_ABORT_ON_MEMORY");
        assert_eq!(ResetReason::TCP_STATE.name(), "TCP_STATE");
        assert_eq!(ResetReason(15).name(), "TCP_KEEPALIVE_TIMEOUT");
        assert_eq!(ResetReason(16).name(), "TCP_DISCONNECT_WITH_DATA");
        assert_eq!(ResetReason(24).name(), "ERROR");
        assert_eq!(
            explain(Some(ResetReason::TCP_ABORT_ON_CLOSE)),
            "closed with unread data (TCP_ABORT_ON_CLOSE)"
        );
        assert_eq!(explain(None), UNKNOWN_REASON);
    }

    #[test]
    fn unknown_numbers_say_their_number() {
        let r = ResetReason(26);
        assert_eq!(r.name(), "reason 26");
        assert_eq!(r.words(), "reason 26");
        assert_eq!(r.to_string(), "reason 26");
        assert_eq!(r.label(), "other");
        assert_eq!(ResetReason(255).name(), "reason 255");
    }

    #[test]
    fn names_parse_back() {
        for r in ResetReason::known().chain([ResetReason(40)]) {
            assert_eq!(ResetReason::from_name(&r.name()), Some(r), "{r}");
        }
        assert_eq!(ResetReason::from_name("NOPE"), None);
        assert_eq!(ResetReason::known().count(), 26);
    }
}
