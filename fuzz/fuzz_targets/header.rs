//! `cargo +nightly fuzz run header`: the tunnel header and status decoders
//! must never panic, never claim more bytes than they were given, and
//! whatever decodes must re-encode to the same value.
#![no_main]

use fedmesh_wire::{Header, Limits, Status};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let limits = Limits::default();
    if let Ok((h, used)) = Header::decode(data, &limits) {
        assert!(used <= data.len());
        let again = h.to_bytes(&limits).expect("decoded header re-encodes");
        assert_eq!(Header::decode(&again, &limits).expect("re-decodes").0, h);
    }
    if let Ok((s, used)) = Status::decode(data) {
        assert!(used <= data.len());
        assert_eq!(Status::decode(&s.to_bytes()).expect("re-decodes").0, s);
    }
});
