//! Arbitrary bytes as ring-buffer records: the reader's batch decoding
//! (length check and copy), then each record's meaning, then the owner and
//! the `trace` output of every transition that made sense. A text line
//! stays one line whatever a process names itself.
//!
//! Input: a sequence of records, each a one-byte length code and then that
//! many bytes. A code below 0xc0 means a record of the right size (most
//! records are); from 0xc0 up, `code - 0xc0` scaled to up to twice the size,
//! so short, long and empty records come too.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tcpwatch::host::clock::{Clock, Zone};
use tcpwatch::model::decode::{decode, decode_raw, encode, interpret_all, Record, Rejects};
use tcpwatch::views::{trace_json, trace_text, TraceLine};
use tcpwatch::model::owner::OwnerTracker;
use tcpwatch::kernel::ringbuf::Batch;
use tcpwatch_common::Event;

fn record_len(code: u8) -> usize {
    match code {
        0..=0xbf => Event::SIZE,
        c => usize::from(c - 0xc0) * 2 * Event::SIZE / 63,
    }
}

fuzz_target!(|data: &[u8]| {
    let mut batch = Batch::default();
    let mut records = 0u64;
    let mut rest = data;
    while let Some((&code, tail)) = rest.split_first() {
        let (record, next) = tail.split_at(record_len(code).min(tail.len()));
        rest = next;
        records += 1;
        batch.add(record);
        // The one-step decoder agrees with the two steps.
        match decode_raw(record) {
            Ok(e) => {
                assert_eq!(record.len(), Event::SIZE);
                assert_eq!(&encode(&e)[..], record, "copy is not byte-exact");
            }
            Err(_) => {
                assert_ne!(record.len(), Event::SIZE);
                assert!(decode(record).is_err());
            }
        }
    }
    assert_eq!(batch.events.len() as u64 + batch.undecodable, records);
    assert_eq!(batch.first_error.is_some(), batch.undecodable > 0);

    let mut rejects = Rejects::default();
    let decoded = interpret_all(&batch.events, &mut rejects);
    assert_eq!(
        decoded.len() as u64 + rejects.count,
        batch.events.len() as u64
    );
    assert_eq!(rejects.warning().is_some(), rejects.count > 0);

    // The clock offset comes from the input too: any recording header's.
    let offset = data
        .get(..8)
        .map_or(0, |b| i64::from_le_bytes(b.try_into().unwrap_or_default()));
    let clock = Clock::with_offset_ns(i128::from(offset));
    let mut owners = OwnerTracker::new(4, None, None);
    let mut previous = None;
    for r in &decoded {
        let Record::State(t) = r else { continue };
        let owner = owners.observe(t);
        assert!(owners.tracked() <= 4);
        let line = TraceLine {
            t,
            owner: owner.as_ref(),
            delta_ns: previous.map(|p: u64| t.ts_ns.saturating_sub(p)),
            cgroup: None,
        };
        previous = Some(t.ts_ns);
        let text = trace_text(&line, &clock, Zone::Utc);
        assert!(!text.contains(char::is_control), "{text:?}");
        let json = trace_json(&line, &clock);
        assert!(json.starts_with('{') && !json.contains('\n'), "{json}");
    }
});
