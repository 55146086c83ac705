//! Arbitrary bytes as a recording file, read the way `tcpwatch replay`
//! reads one: header, snapshot, then records in batches through the
//! correlator and the `conns` and `ladder` views. It must not panic; the
//! reader's offsets must account for the file; a file cut mid-record gives
//! its whole records and a warning, never an error.
#![no_main]

use std::io;
use std::path::Path;

use libfuzzer_sys::fuzz_target;
use tcpwatch::host::clock::Clock;
use tcpwatch::commands::conns::{ConnsSink, View};
use tcpwatch::model::correlate::{Correlator, CorrelatorOptions};
use tcpwatch::model::decode::Rejects;
use tcpwatch::model::filter::Filter;
use tcpwatch::views::Format;
use tcpwatch::stream::record::{Replay, HEADER_LEN};
use tcpwatch::stream::session::Sink;
use tcpwatch_common::Event;

const BATCH: usize = 16;

fuzz_target!(|data: &[u8]| {
    let Ok(mut replay) = Replay::new(data, Path::new("fuzz.rec")) else {
        return;
    };
    let start = replay.offset();
    assert!(start >= HEADER_LEN as u64 && start <= data.len() as u64);
    let header = replay.header;
    let opts = CorrelatorOptions {
        max_sockets: 8,
        fin_timeout_ns: u64::from(header.fin_timeout_s) * 1_000_000_000,
        ..CorrelatorOptions::default()
    };
    let netns = Some(header.netns).filter(|n| *n != 0);
    let correlator = Correlator::new(opts, Some(replay.snapshot.clone()), netns);
    // The first byte picks the view, so both get exercised.
    let view = match data.get(HEADER_LEN).copied().unwrap_or(0) % 3 {
        0 => View::Ladder,
        1 => View::Records(Format::Text),
        _ => View::Records(Format::Json),
    };
    let clock = Clock::with_offset_ns(i128::from(header.clock_offset_ns));
    let mut sink = ConnsSink::new(
        io::sink(),
        view,
        Filter::default(),
        clock,
        correlator,
        Box::new(|_: &str| {}),
    );
    let mut batch = Vec::with_capacity(BATCH);
    let mut records = 0u64;
    let failed = loop {
        match replay.next_record() {
            Ok(Some((event, _))) => {
                records += 1;
                batch.push(event);
                if batch.len() == BATCH {
                    let settled = batch.last().map_or(0, |e: &Event| e.ts_ns);
                    sink.events(&batch, Rejects::default(), settled).unwrap();
                    batch.clear();
                }
            }
            Ok(None) => break false,
            Err(e) => {
                let msg = e.to_string();
                assert!(msg.contains("byte offset"), "{msg}");
                break true;
            }
        }
    };
    let settled = batch.last().map_or(0, |e| e.ts_ns);
    sink.events(&batch, Rejects::default(), settled).unwrap();
    sink.finish().unwrap();

    // Every byte is accounted for: whole records read, then at the end
    // either nothing or a partial record (a warning, not an error).
    let read = replay.offset();
    assert_eq!(read, start + records * Event::SIZE as u64);
    if !failed {
        let tail = replay.partial_tail();
        assert!(tail < Event::SIZE);
        assert_eq!(read + tail as u64, data.len() as u64);
        assert_eq!(replay.warning().is_some(), tail > 0);
    }
});
