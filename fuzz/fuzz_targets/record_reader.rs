//! Arbitrary bytes as a recording file, read the way `tcpwatch replay`
//! reads one (the same replay driver and pipeline): header, snapshot, then
//! records in batches through the correlator and the `conns` and `ladder`
//! views. It must not panic; the
//! reader's offsets must account for the file; a file cut mid-record gives
//! its whole records and a warning, never an error.
#![no_main]

use std::io;
use std::path::Path;

use libfuzzer_sys::fuzz_target;
use tcpwatch::commands::conns::{ConnsOptions, ConnsSink, View};
use tcpwatch::host::clock::Zone;
use tcpwatch::model::filter::Filter;
use tcpwatch::stream::record::{Replay, HEADER_LEN};
use tcpwatch::stream::replay;
use tcpwatch::views::Format;
use tcpwatch_common::Event;

fuzz_target!(|data: &[u8]| {
    let Ok(mut replay) = Replay::new(data, Path::new("fuzz.rec")) else {
        return;
    };
    let start = replay.offset();
    assert!(start >= HEADER_LEN as u64 && start <= data.len() as u64);
    // The first byte picks the view, so each gets exercised.
    let view = match data.get(HEADER_LEN).copied().unwrap_or(0) % 4 {
        0 => View::Ladder(Format::Text),
        1 => View::Ladder(Format::Json),
        2 => View::Records(Format::Text),
        _ => View::Records(Format::Json),
    };
    let opts = ConnsOptions {
        view,
        filter: Filter::default(),
        max_sockets: 8,
        header: true,
        zone: Zone::Utc,
    };
    let ended = replay::run(&mut replay, |ctx| {
        Ok(ConnsSink::build(io::sink(), opts, ctx))
    })
    .expect("a reader that opened builds its consumer");
    let records = ended.totals.events;
    let failed = match ended.result() {
        Ok(()) => false,
        Err(e) => {
            let msg = e.to_string();
            assert!(msg.contains("byte offset"), "{msg}");
            true
        }
    };

    // Every byte is accounted for: whole records read, then at the end
    // either nothing or a partial record (a warning, not an error).
    let read = replay.offset();
    let size = replay.record_size();
    assert!(size >= Event::SIZE);
    assert_eq!(read, start + records * size as u64);
    if !failed {
        let tail = replay.partial_tail();
        assert!(tail < size);
        assert_eq!(read + tail as u64, data.len() as u64);
        assert_eq!(replay.warning().is_some(), tail > 0);
    }
});
