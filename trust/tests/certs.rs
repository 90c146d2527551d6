#![allow(clippy::unwrap_used, clippy::expect_used)]
//! One test per way a presented certificate can be wrong, plus the good paths.

use std::time::{Duration, SystemTime};

use fedmesh_trust::svid::SvidError;
use fedmesh_trust::*;
use rcgen::{
    CertificateParams, CustomExtension, ExtendedKeyUsagePurpose, IsCa, KeyUsagePurpose, SanType,
};
use rustls_pki_types::CertificateDer;

const DAY: Duration = Duration::from_secs(86_400);

fn td(s: &str) -> TrustDomain {
    TrustDomain::new(s).unwrap()
}

fn id(s: &str) -> SpiffeId {
    SpiffeId::new(s).unwrap()
}

struct Fixture {
    east: CertificateAuthority,
    west: CertificateAuthority,
    bundles: TrustBundles,
}

fn fixture() -> Fixture {
    let east = CertificateAuthority::new_root(td("east.acme"), 365 * DAY).unwrap();
    let west = CertificateAuthority::new_root(td("west.acme"), 365 * DAY).unwrap();
    let bundles = TrustBundles::new().with(east.bundle()).with(west.bundle());
    Fixture {
        east,
        west,
        bundles,
    }
}

fn api() -> SpiffeId {
    id("spiffe://east.acme/ns/shop/sa/api")
}

fn check(f: &Fixture, chain: &[CertificateDer<'_>]) -> Result<SpiffeId, VerifyError> {
    verify_svid(&f.bundles, chain, SystemTime::now(), Usage::Client)
}

fn custom(f: &Fixture, edit: impl FnOnce(&mut CertificateParams)) -> Vec<CertificateDer<'static>> {
    let mut p = CertificateAuthority::svid_params(&api(), DAY).unwrap();
    edit(&mut p);
    f.east.issue_custom(&p).unwrap().0
}

#[test]
fn valid_svid_from_root() {
    let f = fixture();
    let svid = f.east.issue(&api(), DAY).unwrap();
    assert_eq!(svid.id(), &api());
    assert_eq!(check(&f, svid.chain()).unwrap(), api());
    // Same SVID is good for the server side too (EKU has both).
    let got = verify_svid(&f.bundles, svid.chain(), SystemTime::now(), Usage::Server).unwrap();
    assert_eq!(got, api());
}

#[test]
fn valid_svid_through_intermediates() {
    let f = fixture();
    let i1 = f.east.new_intermediate(30 * DAY).unwrap();
    let i2 = i1.new_intermediate(30 * DAY).unwrap();
    let svid = i2.issue(&api(), DAY).unwrap();
    assert_eq!(svid.chain().len(), 3);
    assert_eq!(check(&f, svid.chain()).unwrap(), api());
    // Without the intermediates the chain cannot be built.
    assert_eq!(
        check(&f, &svid.chain()[..1]).unwrap_err(),
        VerifyError::UntrustedIssuer("east.acme".into())
    );
}

#[test]
fn expired() {
    let f = fixture();
    let svid = f.east.issue(&api(), DAY).unwrap();
    let later = SystemTime::now() + 2 * DAY;
    assert!(matches!(
        verify_svid(&f.bundles, svid.chain(), later, Usage::Client),
        Err(VerifyError::Expired(_))
    ));
}

#[test]
fn not_yet_valid() {
    let f = fixture();
    let svid = f.east.issue(&api(), DAY).unwrap();
    let earlier = SystemTime::now() - DAY;
    assert!(matches!(
        verify_svid(&f.bundles, svid.chain(), earlier, Usage::Client),
        Err(VerifyError::NotYetValid(_))
    ));
}

#[test]
fn untrusted_ca_of_the_same_domain() {
    let f = fixture();
    let rogue = CertificateAuthority::new_root(td("east.acme"), DAY).unwrap();
    let svid = rogue.issue(&api(), DAY).unwrap();
    assert_eq!(
        check(&f, svid.chain()).unwrap_err(),
        VerifyError::UntrustedIssuer("east.acme".into())
    );
}

#[test]
fn other_domains_ca_cannot_vouch_for_an_id() {
    // west's CA signs a leaf claiming an east identity. Both roots are
    // trusted, but only east's bundle may vouch for east IDs.
    let f = fixture();
    let p = CertificateAuthority::svid_params(&api(), DAY).unwrap();
    let (chain, _) = f.west.issue_custom(&p).unwrap();
    assert_eq!(
        check(&f, &chain).unwrap_err(),
        VerifyError::UntrustedIssuer("east.acme".into())
    );
    // And the CA refuses to make such a leaf on its normal path.
    assert!(matches!(
        f.west.issue(&api(), DAY),
        Err(CaError::ForeignId { .. })
    ));
}

#[test]
fn unknown_trust_domain() {
    let f = fixture();
    let north = CertificateAuthority::new_root(td("north.acme"), DAY).unwrap();
    let svid = north
        .issue(&id("spiffe://north.acme/ns/a/sa/b"), DAY)
        .unwrap();
    assert_eq!(
        check(&f, svid.chain()).unwrap_err(),
        VerifyError::UnknownTrustDomain("north.acme".into())
    );
}

#[test]
fn no_uri_san() {
    let f = fixture();
    let chain = custom(&f, |p| {
        p.subject_alt_names = vec![SanType::DnsName("api.shop".try_into().unwrap())]
    });
    assert_eq!(
        check(&f, &chain).unwrap_err(),
        VerifyError::Leaf(SvidError::NoUriSan)
    );
}

#[test]
fn two_uri_sans() {
    let f = fixture();
    let chain = custom(&f, |p| {
        p.subject_alt_names.push(SanType::URI(
            "spiffe://east.acme/ns/x/sa/y".try_into().unwrap(),
        ))
    });
    assert_eq!(
        check(&f, &chain).unwrap_err(),
        VerifyError::Leaf(SvidError::MultipleUriSans(2))
    );
}

#[test]
fn uri_san_is_not_a_spiffe_id() {
    let f = fixture();
    let chain = custom(&f, |p| {
        p.subject_alt_names = vec![SanType::URI(
            "spiffe://east.acme/a/../b".try_into().unwrap(),
        )]
    });
    assert_eq!(
        check(&f, &chain).unwrap_err(),
        VerifyError::Leaf(SvidError::BadId(IdError::DotSegment))
    );
}

#[test]
fn leaf_is_a_ca() {
    let f = fixture();
    let chain = custom(&f, |p| {
        p.is_ca = IsCa::Ca(rcgen::BasicConstraints::Unconstrained)
    });
    assert_eq!(
        check(&f, &chain).unwrap_err(),
        VerifyError::Leaf(SvidError::LeafIsCa)
    );
}

#[test]
fn no_key_usage() {
    let f = fixture();
    let chain = custom(&f, |p| p.key_usages.clear());
    assert_eq!(
        check(&f, &chain).unwrap_err(),
        VerifyError::Leaf(SvidError::NoKeyUsage)
    );
}

#[test]
fn key_usage_not_critical() {
    let f = fixture();
    let chain = custom(&f, |p| {
        p.key_usages.clear();
        // keyUsage = BIT STRING { digitalSignature }, written by hand so it
        // can be non-critical (rcgen always marks its own critical).
        let mut ext =
            CustomExtension::from_oid_content(&[2, 5, 29, 15], vec![0x03, 0x02, 0x07, 0x80]);
        ext.set_criticality(false);
        p.custom_extensions.push(ext);
    });
    assert_eq!(
        check(&f, &chain).unwrap_err(),
        VerifyError::Leaf(SvidError::KeyUsageNotCritical)
    );
}

#[test]
fn key_usage_without_digital_signature() {
    let f = fixture();
    let chain = custom(&f, |p| {
        p.key_usages = vec![KeyUsagePurpose::KeyEncipherment]
    });
    assert_eq!(
        check(&f, &chain).unwrap_err(),
        VerifyError::Leaf(SvidError::NoDigitalSignature)
    );
}

#[test]
fn leaf_may_not_sign_certificates() {
    let f = fixture();
    let chain = custom(&f, |p| p.key_usages.push(KeyUsagePurpose::KeyCertSign));
    assert_eq!(
        check(&f, &chain).unwrap_err(),
        VerifyError::Leaf(SvidError::LeafKeyCertSign)
    );
}

#[test]
fn leaf_may_not_sign_crls() {
    let f = fixture();
    let chain = custom(&f, |p| p.key_usages.push(KeyUsagePurpose::CrlSign));
    assert_eq!(
        check(&f, &chain).unwrap_err(),
        VerifyError::Leaf(SvidError::LeafCrlSign)
    );
}

#[test]
fn server_only_eku_used_as_client() {
    let f = fixture();
    let chain = custom(&f, |p| {
        p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth]
    });
    assert_eq!(
        check(&f, &chain).unwrap_err(),
        VerifyError::WrongUsage("client authentication")
    );
}

#[test]
fn tampered_signature() {
    let f = fixture();
    let svid = f.east.issue(&api(), DAY).unwrap();
    let mut der = svid.chain()[0].to_vec();
    let n = der.len();
    der[n - 3] ^= 0x55; // inside the ECDSA signature
    let chain = vec![CertificateDer::from(der)];
    let err = check(&f, &chain).unwrap_err();
    assert!(
        matches!(err, VerifyError::BadSignature | VerifyError::Path(_)),
        "{err:?}"
    );
}

#[test]
fn garbage_and_empty_and_overlong() {
    let f = fixture();
    assert!(matches!(
        check(&f, &[CertificateDer::from(vec![0x30, 0x03, 0x01, 0x02])]),
        Err(VerifyError::Leaf(SvidError::Parse(_)))
    ));
    assert_eq!(check(&f, &[]).unwrap_err(), VerifyError::NoCertificate);
    let svid = f.east.issue(&api(), DAY).unwrap();
    let long: Vec<_> = std::iter::repeat_n(svid.chain()[0].clone(), 9).collect();
    assert_eq!(check(&f, &long).unwrap_err(), VerifyError::ChainTooLong(9));
}

#[test]
fn peer_policies() {
    let a = api();
    assert!(PeerPolicy::AnyTrusted.authorize(&a).is_ok());
    assert!(PeerPolicy::trust_domain(td("east.acme"))
        .authorize(&a)
        .is_ok());
    assert!(PeerPolicy::trust_domain(td("west.acme"))
        .authorize(&a)
        .is_err());
    assert!(PeerPolicy::id(a.clone()).authorize(&a).is_ok());
    let err = PeerPolicy::id(id("spiffe://east.acme/gw"))
        .authorize(&a)
        .unwrap_err();
    assert!(err.to_string().contains("spiffe://east.acme/gw"), "{err}");
}

#[test]
fn ca_save_load_round_trip() {
    let dir = tempfile::tempdir().unwrap();
    let f = fixture();
    f.east.save(dir.path()).unwrap();
    let loaded = CertificateAuthority::load(dir.path()).unwrap();
    assert_eq!(loaded.trust_domain().as_str(), "east.acme");
    let svid = loaded.issue(&api(), DAY).unwrap();
    assert_eq!(check(&f, svid.chain()).unwrap(), api());
    svid.save(dir.path()).unwrap();
    let again = Svid::load(&dir.path().join("svid.pem"), &dir.path().join("svid.key")).unwrap();
    assert_eq!(again.id(), &api());
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        for f in ["ca.key", "svid.key"] {
            let mode = std::fs::metadata(dir.path().join(f))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o077, 0, "{f} is readable by others");
        }
    }
}
