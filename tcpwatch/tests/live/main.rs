//! The integration tests of tcpwatch, in one test binary: each module
//! tests one command (or the deployment files) on the running kernel,
//! and `support` holds what they share.
//!
//! Tests that cannot run (not root, no kernel BTF, binary built without
//! its eBPF object, a missing tool) print "skipped: <why>", or fail when
//! CI is set or TCPWATCH_REQUIRE_ROOT_TESTS=1. They must run one at a time
//! (they count what the whole host's kernel reports); `cargo xtask test`
//! does that. One module, for instance:
//! `cargo xtask test -- --test live -- trace:: --nocapture`.

mod support;

mod churn;
mod connfail;
mod conns;
mod daemon;
mod deploy;
mod hardening;
mod host;
mod netns;
mod overload;
mod prometheus;
mod real_servers;
mod resets;
mod timewait;
mod top;
mod trace;
mod truth;

/// Not a test of tcpwatch: the peer. When the test binary is re-executed
/// with TCPWATCH_PEER set, this runs the peer's command loop (see
/// `support::peer`) and exits. Otherwise it checks that the command
/// interpreter refuses what it cannot do.
#[test]
fn peer_entry() {
    support::peer::peer_main();
    let mut st = support::peer::PeerState::default();
    assert!(st.exec("bogus").is_err());
    assert!(st.exec("write 1").is_err(), "no connection yet");
    assert!(st.exec("listen nowhere").is_err());
    assert!(st.exec("listen_bound").is_err(), "nothing bound");
    assert!(st.exec("hold").is_err(), "no connection to hold");
    assert!(st.exec("send GET").is_err(), "no connection to send on");
    assert_eq!(st.exec("sleep 1").unwrap(), None);
}
