//! The status frame decoder (a peer's answer to every stream) must never
//! panic or over-read, and a decoded status re-encodes to the same value.
#![no_main]

use fedmesh_wire::{Status, MAX_STATUS_MESSAGE};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok((s, used)) = Status::decode(data) {
        assert!(used <= data.len());
        assert!(s.message.len() <= MAX_STATUS_MESSAGE);
        assert_eq!(Status::decode(&s.to_bytes()).expect("re-decodes").0, s);
        // What a gateway logs of it is bounded whatever the peer sent.
        assert!(fedmesh_wire::bounded(&s.message).len() <= 4 * fedmesh_wire::MAX_LOGGED + 32);
    }
});
