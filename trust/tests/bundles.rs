#![allow(clippy::unwrap_used, clippy::expect_used)]
use std::time::Duration;

use fedmesh_trust::*;

fn td(s: &str) -> TrustDomain {
    TrustDomain::new(s).unwrap()
}

const DAY: Duration = Duration::from_secs(86_400);

#[test]
fn pem_and_json_round_trip_with_one_fingerprint() {
    let a = CertificateAuthority::new_root(td("east.acme"), DAY).unwrap();
    let b = CertificateAuthority::new_root(td("east.acme"), DAY).unwrap();
    let bundle = TrustBundle::new(
        td("east.acme"),
        vec![a.certificate().clone(), b.certificate().clone()],
    )
    .unwrap()
    .with_sequence(7);
    let from_pem = TrustBundle::from_pem(td("east.acme"), &bundle.to_pem()).unwrap();
    assert_eq!(from_pem, bundle);
    let json = bundle.to_spiffe_json();
    let v: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert_eq!(v["keys"][0]["use"], "x509-svid");
    assert_eq!(v["keys"][0]["kty"], "EC");
    assert_eq!(v["keys"][0]["crv"], "P-256");
    assert_eq!(v["spiffe_sequence"], 7);
    let from_json = TrustBundle::from_spiffe_json(td("east.acme"), &json).unwrap();
    assert_eq!(from_json, bundle);
    assert_eq!(from_json.sequence(), 7);
    assert_eq!(from_json.fingerprint(), from_pem.fingerprint());
    assert!(bundle.fingerprint().starts_with("sha256:"));
}

#[test]
fn json_skips_jwt_keys_and_rejects_bad_x509_entries() {
    let a = CertificateAuthority::new_root(td("east.acme"), DAY).unwrap();
    let good: serde_json::Value = serde_json::from_str(&a.bundle().to_spiffe_json()).unwrap();
    let x5c = good["keys"][0]["x5c"][0].clone();
    let doc = serde_json::json!({"keys": [
        {"use": "jwt-svid", "kty": "EC", "kid": "k1", "crv": "P-256", "x": "AA", "y": "AA"},
        {"use": "x509-svid", "kty": "EC", "x5c": [x5c]},
    ]});
    let b = TrustBundle::from_spiffe_json(td("east.acme"), &doc.to_string()).unwrap();
    assert_eq!(b.roots().len(), 1);

    let two = serde_json::json!({"keys": [{"use": "x509-svid", "x5c": [x5c, x5c]}]});
    assert!(matches!(
        TrustBundle::from_spiffe_json(td("east.acme"), &two.to_string()),
        Err(BundleError::Json(_))
    ));
    let not_b64 = serde_json::json!({"keys": [{"use": "x509-svid", "x5c": ["%%%"]}]});
    assert!(matches!(
        TrustBundle::from_spiffe_json(td("east.acme"), &not_b64.to_string()),
        Err(BundleError::Json(_))
    ));
    assert!(matches!(
        TrustBundle::from_spiffe_json(td("east.acme"), "{not json"),
        Err(BundleError::Json(_))
    ));
    assert!(matches!(
        TrustBundle::from_spiffe_json(td("east.acme"), r#"{"keys": []}"#),
        Err(BundleError::Empty { .. })
    ));
}

#[test]
fn bundle_roots_must_be_cas_of_that_domain() {
    let east = CertificateAuthority::new_root(td("east.acme"), DAY).unwrap();
    // A root naming west cannot go into east's bundle.
    let west = CertificateAuthority::new_root(td("west.acme"), DAY).unwrap();
    assert!(matches!(
        TrustBundle::new(td("east.acme"), vec![west.certificate().clone()]),
        Err(BundleError::WrongDomain { .. })
    ));
    // A leaf is not a root.
    let leaf = east
        .issue(&SpiffeId::new("spiffe://east.acme/x").unwrap(), DAY)
        .unwrap();
    assert!(matches!(
        TrustBundle::new(td("east.acme"), leaf.chain().to_vec()),
        Err(BundleError::Root { .. })
    ));
    assert!(matches!(
        TrustBundle::from_pem(td("east.acme"), "not pem"),
        Err(BundleError::Pem(_))
    ));
    let huge = "A".repeat(2 << 20);
    assert!(matches!(
        TrustBundle::from_pem(td("east.acme"), &huge),
        Err(BundleError::TooLarge(_))
    ));
}
