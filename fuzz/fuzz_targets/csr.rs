//! Certificate signing requests come from proxies over the control API
//! (after a token or SVID check, but their bytes are the proxy's): parsing
//! and verifying one must refuse anything malformed with a typed, bounded
//! error, and an accepted request names exactly one SPIFFE ID.
#![no_main]

use fedmesh_trust::csr::Csr;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    match Csr::parse(text) {
        Ok(csr) => assert!(csr.id().to_string().starts_with("spiffe://")),
        Err(e) => assert!(e.to_string().len() <= 4096, "{e}"),
    }
});
