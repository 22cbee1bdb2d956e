//! `cargo +nightly fuzz run pgoutput`: the pgoutput decoder on arbitrary bytes must return a
//! message or an error, never panic, loop or read out of bounds; a decoded Insert's tuple must
//! be walkable to its end.

#![no_main]

use libfuzzer_sys::fuzz_target;
use outbox_cdc::source::pgoutput::{Message, decode};

fuzz_target!(|data: &[u8]| {
    if let Ok(Message::Insert(insert)) = decode(data) {
        for value in insert.tuple.values() {
            let _ = value;
        }
    }
});
