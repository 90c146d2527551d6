//! Trust bundles arrive as PEM (store records, pinned files, `fedmesh
//! cluster join`) and as SPIFFE bundle JSON: both decoders must refuse
//! anything malformed with a typed error, and a bundle that decodes must
//! survive its own encodings unchanged.
#![no_main]

use fedmesh_trust::{TrustBundle, TrustDomain};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&kind, rest)) = data.split_first() else {
        return;
    };
    let Ok(text) = std::str::from_utf8(rest) else {
        return;
    };
    let td = TrustDomain::new("east.mesh").expect("trust domain");
    let decoded = if kind % 2 == 0 {
        TrustBundle::from_pem(td.clone(), text)
    } else {
        TrustBundle::from_spiffe_json(td.clone(), text)
    };
    match decoded {
        Ok(b) => {
            let pem = TrustBundle::from_pem(td.clone(), &b.to_pem()).expect("own PEM decodes");
            assert_eq!(pem.roots(), b.roots());
            let json = TrustBundle::from_spiffe_json(td, &b.to_spiffe_json())
                .expect("own SPIFFE JSON decodes");
            assert_eq!(json.roots(), b.roots());
        }
        Err(e) => assert!(e.to_string().len() <= 4096, "{e}"),
    }
});
