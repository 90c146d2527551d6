//! Trust bundle federation and rotation: a cluster publishes its bundle
//! with endorsements (signatures by roots of its previous bundle), and
//! others accept a new bundle only when a root they already trust for that
//! cluster endorsed it, or when an operator pinned it. Write access to the
//! store alone therefore cannot inject trust.

use base64::Engine;
use rcgen::SigningKey;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use x509_parser::prelude::FromDer;

use crate::bundle::TrustBundle;
use crate::ca::CertificateAuthority;

/// A root's signature over a bundle's fingerprint.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Endorsement {
    /// `sha256:<hex>` of the endorsing root certificate (DER).
    pub root: String,
    /// Base64 ECDSA P-256 SHA-256 signature (ASN.1 DER).
    pub signature: String,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum RotationError {
    #[error(
        "no bundle is pinned or trusted for this cluster yet; admit it with `fedmesh cluster join`"
    )]
    NotJoined,
    #[error("bundle {fingerprint} is not endorsed by any root trusted for {trust_domain}")]
    NotEndorsed {
        trust_domain: String,
        fingerprint: String,
    },
    #[error("signing failed: {0}")]
    Sign(String),
}

/// What to do with an offered bundle.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Acceptance {
    /// Same roots as already trusted.
    Unchanged,
    /// Trust the offered bundle from now on.
    Accept,
}

fn message(bundle: &TrustBundle) -> Vec<u8> {
    format!(
        "fedmesh bundle endorsement v1\n{}\n{}",
        bundle.trust_domain(),
        bundle.fingerprint()
    )
    .into_bytes()
}

/// `sha256:<hex>` of one certificate's DER.
pub fn cert_fingerprint(der: &[u8]) -> String {
    let d = Sha256::digest(der);
    let mut s = String::from("sha256:");
    for b in d {
        s.push_str(&format!("{b:02x}"));
    }
    s
}

/// Endorses `bundle` with the key of `root` (which must be a root CA).
pub fn endorse(
    root: &CertificateAuthority,
    bundle: &TrustBundle,
) -> Result<Endorsement, RotationError> {
    let sig = root
        .key_pair()
        .sign(&message(bundle))
        .map_err(|e| RotationError::Sign(e.to_string()))?;
    Ok(Endorsement {
        root: cert_fingerprint(root.certificate()),
        signature: base64::engine::general_purpose::STANDARD.encode(sig),
    })
}

fn verifies(root_der: &[u8], bundle: &TrustBundle, e: &Endorsement) -> bool {
    let Ok(sig) = base64::engine::general_purpose::STANDARD.decode(&e.signature) else {
        return false;
    };
    let Ok((_, cert)) = x509_parser::certificate::X509Certificate::from_der(root_der) else {
        return false;
    };
    let key = &cert.public_key().subject_public_key.data;
    let msg = message(bundle);
    [
        webpki::ring::ECDSA_P256_SHA256,
        webpki::ring::ECDSA_P384_SHA384,
    ]
    .iter()
    .any(|alg| alg.verify_signature(key, &msg, &sig).is_ok())
}

/// Decides whether to trust `offered` for a cluster, given what is already
/// trusted (`current`) and what an operator pinned.
pub fn accept(
    current: Option<&TrustBundle>,
    pinned: Option<&TrustBundle>,
    offered: &TrustBundle,
    endorsements: &[Endorsement],
) -> Result<Acceptance, RotationError> {
    if current.is_some_and(|c| c == offered) {
        return Ok(Acceptance::Unchanged);
    }
    if pinned.is_some_and(|p| offered.roots().iter().all(|r| p.roots().contains(r))) {
        return Ok(Acceptance::Accept);
    }
    let trusted: Vec<&[u8]> = current
        .into_iter()
        .chain(pinned)
        .flat_map(|b| b.roots().iter().map(|r| r.as_ref()))
        .collect();
    if trusted.is_empty() {
        return Err(RotationError::NotJoined);
    }
    let endorsed = endorsements.iter().any(|e| {
        trusted
            .iter()
            .any(|root| cert_fingerprint(root) == e.root && verifies(root, offered, e))
    });
    if endorsed {
        Ok(Acceptance::Accept)
    } else {
        Err(RotationError::NotEndorsed {
            trust_domain: offered.trust_domain().to_string(),
            fingerprint: offered.fingerprint(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::TrustDomain;
    use std::time::Duration;

    const T: Duration = Duration::from_secs(3600);

    #[test]
    fn rotation_needs_an_endorsement_from_a_trusted_root() {
        let td = TrustDomain::new("west.acme").unwrap();
        let old = CertificateAuthority::new_root(td.clone(), T).unwrap();
        let new = CertificateAuthority::new_root(td.clone(), T).unwrap();
        let rogue = CertificateAuthority::new_root(td.clone(), T).unwrap();
        let current = old.bundle();
        // Overlap bundle: old + new, endorsed by the old root.
        let overlap = TrustBundle::new(
            td.clone(),
            vec![old.certificate().clone(), new.certificate().clone()],
        )
        .unwrap();
        let e = endorse(&old, &overlap).unwrap();
        assert_eq!(
            accept(Some(&current), None, &overlap, std::slice::from_ref(&e)),
            Ok(Acceptance::Accept)
        );
        assert_eq!(
            accept(Some(&overlap), None, &overlap, &[]),
            Ok(Acceptance::Unchanged)
        );
        // New only, endorsed by the new root, which the overlap made trusted.
        let new_only = new.bundle();
        let e2 = endorse(&new, &new_only).unwrap();
        assert_eq!(
            accept(Some(&overlap), None, &new_only, std::slice::from_ref(&e2)),
            Ok(Acceptance::Accept)
        );
        // But not straight from the old bundle: old never endorsed it.
        assert!(matches!(
            accept(Some(&current), None, &new_only, &[e2]),
            Err(RotationError::NotEndorsed { .. })
        ));
        // A rogue bundle with a rogue endorsement, or a copied endorsement
        // of another bundle, is refused.
        let rb = rogue.bundle();
        let re = endorse(&rogue, &rb).unwrap();
        assert!(accept(Some(&current), None, &rb, &[re]).is_err());
        let copied = Endorsement {
            root: e.root.clone(),
            signature: e.signature.clone(),
        };
        assert!(accept(Some(&current), None, &rb, &[copied]).is_err());
        // Nothing trusted and nothing pinned: not joined.
        assert_eq!(
            accept(None, None, &current, &[]),
            Err(RotationError::NotJoined)
        );
        // A pin admits exactly the pinned roots.
        assert_eq!(
            accept(None, Some(&current), &current, &[]),
            Ok(Acceptance::Accept)
        );
        assert!(accept(None, Some(&current), &rb, &[]).is_err());
    }
}
