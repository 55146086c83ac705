//! The integration tests of tcpwatch, in one test binary: each module
//! tests one command (or the deployment files) against the running kernel,
//! and `support` holds what they share.

mod support;

mod conns;
mod daemon;
mod deploy;
mod hardening;
mod overload;
mod prometheus;
mod timewait;
mod top;
mod trace;

/// Not a test: the peer program. When the test binary is re-executed with
/// TCPWATCH_PEER set, this runs a server or client (see
/// `support::peer_main`).
#[test]
fn peer_entry() {
    support::peer_main();
}

/// Not a test: the peer program of the timewait tests.
#[test]
fn tw_peer_entry() {
    support::timewait::peer_main();
}

/// Not a test of tcpwatch: the socket actor. When the test binary is
/// re-executed with TCPWATCH_CONNS_ACTOR set, this runs the actor's command
/// loop (see `support::conns::actor_main`) and exits. Otherwise it checks
/// that the command interpreter refuses what it cannot do.
#[test]
fn actor_entry() {
    support::conns::actor_main();
    let mut st = support::conns::ActorState::default();
    assert!(st.exec("bogus").is_err());
    assert!(st.exec("write 1").is_err(), "no connection yet");
    assert!(st.exec("listen nowhere").is_err());
    assert_eq!(st.exec("sleep 1").unwrap(), None);
}
