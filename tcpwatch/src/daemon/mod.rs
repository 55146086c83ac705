//! `tcpwatch daemon`: the correlator and TIME_WAIT accounting run for good,
//! served over HTTP to Prometheus and to `tcpwatch ... --from`.

pub mod query;
