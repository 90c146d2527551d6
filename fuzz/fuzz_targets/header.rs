//! The tunnel header decoder (what a peer gateway or a sidecar sends first
//! on every stream) must never panic, never claim more bytes than it was
//! given, quote at most a bounded prefix of what it was sent in its errors,
//! and whatever decodes must re-encode to the same value.
#![no_main]

use fedmesh_wire::{Header, Limits, MAX_LOGGED};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let limits = Limits::default();
    match Header::decode(data, &limits) {
        Ok((h, used)) => {
            assert!(used <= data.len());
            let again = h.to_bytes(&limits).expect("decoded header re-encodes");
            assert_eq!(Header::decode(&again, &limits).expect("re-decodes").0, h);
        }
        Err(e) => assert!(e.to_string().len() <= 4 * MAX_LOGGED, "{e}"),
    }
    // The body alone, as the HTTP/2 fallback and the pool hand it over.
    if let Err(e) = Header::decode_body(data) {
        assert!(e.to_string().len() <= 4 * MAX_LOGGED, "{e}");
    }
});
