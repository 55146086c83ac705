//! Arbitrary request targets through the daemon's routing. It must not
//! panic; a refusal is 400 or 404 with a short message free of control
//! characters (it is echoed to the client and into logs); a `conns` query
//! that is accepted asks for 1 to MAX_LIMIT connections.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tcpwatch::daemon::query::{route, Route, MAX_LIMIT};

fuzz_target!(|data: &[u8]| {
    let target = String::from_utf8_lossy(data);
    match route(&target) {
        Ok(Route::Conns(q)) => {
            assert!((1..=MAX_LIMIT).contains(&q.limit), "{q:?}");
        }
        Ok(_) => {}
        Err(e) => {
            assert!(matches!(e.status(), 400 | 404), "{e:?}");
            let msg = e.message();
            assert!(msg.len() < 200, "{} bytes: {msg}", msg.len());
            assert!(!msg.contains(char::is_control), "{msg:?}");
        }
    }
});
