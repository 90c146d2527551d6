//! Endorsements come from the store next to a cluster's bundle. Whatever a
//! store writer puts there, a bundle not signed by a root already trusted
//! for the cluster must never be accepted (write access to the store alone
//! cannot inject trust), and decoding and checking them never panics.
#![no_main]

use std::sync::OnceLock;
use std::time::Duration;

use fedmesh_trust::rotation::{accept, Endorsement};
use fedmesh_trust::{CertificateAuthority, TrustBundle, TrustDomain};
use libfuzzer_sys::fuzz_target;

/// The bundle trusted today and one its roots never signed.
fn bundles() -> &'static (TrustBundle, TrustBundle) {
    static B: OnceLock<(TrustBundle, TrustBundle)> = OnceLock::new();
    B.get_or_init(|| {
        let td = TrustDomain::new("east.mesh").expect("trust domain");
        let ttl = Duration::from_secs(3600);
        let old = CertificateAuthority::new_root(td.clone(), ttl).expect("CA");
        let new = CertificateAuthority::new_root(td, ttl).expect("CA");
        (old.bundle(), new.bundle())
    })
}

fuzz_target!(|data: &[u8]| {
    let Ok(endorsements) = serde_json::from_slice::<Vec<Endorsement>>(data) else {
        return;
    };
    let (trusted, offered) = bundles();
    let verdict = accept(Some(trusted), None, offered, &endorsements);
    assert!(verdict.is_err(), "accepted an unsigned bundle: {verdict:?}");
    // Without anything trusted or pinned, nothing is accepted either.
    assert!(accept(None, None, offered, &endorsements).is_err());
});
