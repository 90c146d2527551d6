//! Trust bundles: the root certificates of one trust domain, and the set of
//! bundles a party trusts, keyed by trust domain.
//!
//! Bundles travel as PEM or as SPIFFE bundle JSON (a JWK set whose X.509
//! entries have `use: x509-svid` and one certificate in `x5c`).

use std::collections::BTreeMap;
use std::sync::{Arc, RwLock};

use base64::Engine;
use rustls_pki_types::CertificateDer;
use rustls_pki_types::TrustAnchor;
use sha2::{Digest, Sha256};
use x509_parser::prelude::FromDer;
use x509_parser::public_key::PublicKey;
use x509_parser::x509::SubjectPublicKeyInfo;

use crate::id::TrustDomain;
use crate::pem::{self, PemError};
use crate::svid::{inspect_ca_cert, SvidError};

/// Upper bound on roots in one bundle; a bundle is a handful of roots during
/// a rotation, never hundreds.
pub const MAX_ROOTS: usize = 64;
/// Upper bound on the size of a bundle document we parse.
pub const MAX_BUNDLE_BYTES: usize = 1 << 20;

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BundleError {
    #[error("bundle for {trust_domain} has no root certificate")]
    Empty { trust_domain: TrustDomain },
    #[error("bundle for {trust_domain} has {count} roots, more than the limit of {MAX_ROOTS}")]
    TooManyRoots {
        trust_domain: TrustDomain,
        count: usize,
    },
    #[error("bundle document is {0} bytes, more than the limit of {MAX_BUNDLE_BYTES}")]
    TooLarge(usize),
    #[error("bundle for {trust_domain}: root #{index}: {source}")]
    Root {
        trust_domain: TrustDomain,
        index: usize,
        source: SvidError,
    },
    #[error("bundle for {trust_domain}: root #{index} names trust domain {named}")]
    WrongDomain {
        trust_domain: TrustDomain,
        index: usize,
        named: TrustDomain,
    },
    #[error("bundle for {trust_domain}: root #{index} is not a usable trust anchor: {reason}")]
    Anchor {
        trust_domain: TrustDomain,
        index: usize,
        reason: String,
    },
    #[error(transparent)]
    Pem(#[from] PemError),
    #[error("bundle JSON: {0}")]
    Json(String),
}

/// The roots of one trust domain, with their parsed trust anchors. Cheap
/// to clone (shared, immutable roots): bundle sets are rebuilt and handed
/// to every proxy on each config change.
#[derive(Clone)]
pub struct TrustBundle {
    trust_domain: TrustDomain,
    roots: Arc<[CertificateDer<'static>]>,
    anchors: Arc<[TrustAnchor<'static>]>,
    sequence: u64,
}

impl std::fmt::Debug for TrustBundle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TrustBundle")
            .field("trust_domain", &self.trust_domain)
            .field("roots", &self.roots.len())
            .field("fingerprint", &self.fingerprint())
            .finish()
    }
}

impl PartialEq for TrustBundle {
    fn eq(&self, other: &Self) -> bool {
        self.trust_domain == other.trust_domain && self.roots == other.roots
    }
}

impl TrustBundle {
    /// A bundle of `roots`, each checked to be a CA certificate that names
    /// no other trust domain.
    pub fn new(
        trust_domain: TrustDomain,
        roots: Vec<CertificateDer<'static>>,
    ) -> Result<Self, BundleError> {
        if roots.is_empty() {
            return Err(BundleError::Empty { trust_domain });
        }
        if roots.len() > MAX_ROOTS {
            return Err(BundleError::TooManyRoots {
                count: roots.len(),
                trust_domain,
            });
        }
        let mut anchors = Vec::with_capacity(roots.len());
        for (index, root) in roots.iter().enumerate() {
            match inspect_ca_cert(root) {
                Ok(Some(named)) if named != trust_domain => {
                    return Err(BundleError::WrongDomain {
                        trust_domain,
                        index,
                        named,
                    })
                }
                Ok(_) => {}
                Err(source) => {
                    return Err(BundleError::Root {
                        trust_domain,
                        index,
                        source,
                    })
                }
            }
            let anchor = webpki::anchor_from_trusted_cert(root)
                .map_err(|e| BundleError::Anchor {
                    trust_domain: trust_domain.clone(),
                    index,
                    reason: e.to_string(),
                })?
                .to_owned();
            anchors.push(anchor);
        }
        Ok(Self {
            trust_domain,
            roots: roots.into(),
            anchors: anchors.into(),
            sequence: 0,
        })
    }

    /// A bundle that trusts nothing; only used where a bundle must exist.
    pub(crate) fn empty(trust_domain: TrustDomain) -> Self {
        Self {
            trust_domain,
            roots: Arc::from(Vec::new()),
            anchors: Arc::from(Vec::new()),
            sequence: 0,
        }
    }

    pub fn trust_domain(&self) -> &TrustDomain {
        &self.trust_domain
    }

    pub fn roots(&self) -> &[CertificateDer<'static>] {
        &self.roots
    }

    pub(crate) fn anchors(&self) -> &[TrustAnchor<'static>] {
        &self.anchors
    }

    /// SPIFFE bundle sequence number (monotonic per publisher).
    pub fn sequence(&self) -> u64 {
        self.sequence
    }

    pub fn with_sequence(mut self, sequence: u64) -> Self {
        self.sequence = sequence;
        self
    }

    /// `sha256:` + hex of SHA-256 over the DER roots in order; stable across
    /// encodings, so PEM and JSON forms of one bundle match.
    pub fn fingerprint(&self) -> String {
        let mut h = Sha256::new();
        for r in self.roots.iter() {
            h.update((r.len() as u32).to_be_bytes());
            h.update(r.as_ref());
        }
        let digest = h.finalize();
        let mut s = String::with_capacity(7 + 64);
        s.push_str("sha256:");
        for b in digest {
            s.push_str(&format!("{b:02x}"));
        }
        s
    }

    pub fn from_pem(trust_domain: TrustDomain, pem_text: &str) -> Result<Self, BundleError> {
        if pem_text.len() > MAX_BUNDLE_BYTES {
            return Err(BundleError::TooLarge(pem_text.len()));
        }
        Self::new(trust_domain, pem::decode_certs(pem_text)?)
    }

    pub fn to_pem(&self) -> String {
        pem::encode_certs(&self.roots)
    }

    /// Parses a SPIFFE bundle JSON document. Entries whose `use` is not
    /// `x509-svid` (JWT keys) are skipped; every x509-svid entry must carry
    /// exactly one certificate.
    pub fn from_spiffe_json(trust_domain: TrustDomain, json: &str) -> Result<Self, BundleError> {
        if json.len() > MAX_BUNDLE_BYTES {
            return Err(BundleError::TooLarge(json.len()));
        }
        let doc: JwkSet = serde_json::from_str(json)
            .map_err(|e| BundleError::Json(fedmesh_wire::bounded(&e.to_string())))?;
        let mut roots = Vec::new();
        for (i, key) in doc.keys.iter().enumerate() {
            if key.use_.as_deref() != Some("x509-svid") {
                continue;
            }
            let x5c = key.x5c.as_deref().unwrap_or_default();
            let [one] = x5c else {
                return Err(BundleError::Json(format!(
                    "key #{i}: x509-svid entry must have exactly one x5c certificate, has {}",
                    x5c.len()
                )));
            };
            let der = base64::engine::general_purpose::STANDARD
                .decode(one)
                .map_err(|e| BundleError::Json(format!("key #{i}: x5c is not base64: {e}")))?;
            roots.push(CertificateDer::from(der));
        }
        Ok(Self::new(trust_domain, roots)?.with_sequence(doc.spiffe_sequence.unwrap_or(0)))
    }

    /// Serializes as a SPIFFE bundle JSON document.
    pub fn to_spiffe_json(&self) -> String {
        let keys = self
            .roots
            .iter()
            .map(|r| {
                let mut jwk = jwk_params(r);
                jwk.use_ = Some("x509-svid".into());
                jwk.x5c = Some(vec![base64::engine::general_purpose::STANDARD.encode(r)]);
                jwk
            })
            .collect();
        let doc = JwkSet {
            keys,
            spiffe_sequence: Some(self.sequence),
            spiffe_refresh_hint: Some(300),
        };
        serde_json::to_string_pretty(&doc).unwrap_or_default()
    }
}

#[derive(serde::Serialize, serde::Deserialize, Default)]
struct JwkSet {
    keys: Vec<Jwk>,
    #[serde(skip_serializing_if = "Option::is_none")]
    spiffe_sequence: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    spiffe_refresh_hint: Option<u64>,
}

#[derive(serde::Serialize, serde::Deserialize, Default)]
struct Jwk {
    #[serde(default)]
    kty: String,
    #[serde(rename = "use", skip_serializing_if = "Option::is_none")]
    use_: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    crv: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    x: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    y: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    n: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    e: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    x5c: Option<Vec<String>>,
}

/// The JWK public-key members for a certificate's key (RFC 7518 §6).
fn jwk_params(der: &[u8]) -> Jwk {
    let b64 = |b: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b);
    let mut jwk = Jwk::default();
    let Ok((_, cert)) = x509_parser::certificate::X509Certificate::from_der(der) else {
        return jwk;
    };
    let spki: &SubjectPublicKeyInfo = cert.public_key();
    match spki.parsed() {
        Ok(PublicKey::EC(point)) => {
            let data = point.data();
            let (crv, len) = match data.len() {
                65 => ("P-256", 32),
                97 => ("P-384", 48),
                133 => ("P-521", 66),
                _ => return jwk,
            };
            jwk.kty = "EC".into();
            jwk.crv = Some(crv.into());
            jwk.x = Some(b64(&data[1..1 + len]));
            jwk.y = Some(b64(&data[1 + len..]));
        }
        Ok(PublicKey::RSA(rsa)) => {
            jwk.kty = "RSA".into();
            jwk.n = Some(b64(rsa.modulus));
            jwk.e = Some(b64(rsa.exponent));
        }
        _ => {
            // Ed25519 keys come back as Unknown from x509-parser.
            jwk.kty = "OKP".into();
            jwk.crv = Some("Ed25519".into());
            jwk.x = Some(b64(&spki.subject_public_key.data));
        }
    }
    jwk
}

/// The bundles one party trusts, one per trust domain. Never merged into one
/// pool: a chain is checked only against the bundle of its leaf's domain.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct TrustBundles {
    by_domain: BTreeMap<TrustDomain, TrustBundle>,
}

impl TrustBundles {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds or replaces the bundle of its trust domain.
    pub fn insert(&mut self, bundle: TrustBundle) {
        self.by_domain.insert(bundle.trust_domain.clone(), bundle);
    }

    pub fn with(mut self, bundle: TrustBundle) -> Self {
        self.insert(bundle);
        self
    }

    pub fn get(&self, td: &TrustDomain) -> Option<&TrustBundle> {
        self.by_domain.get(td)
    }

    pub(crate) fn get_by_name(&self, name: &str) -> Option<&TrustBundle> {
        // Trust domains are few; a linear scan avoids allocating a key.
        self.by_domain
            .values()
            .find(|b| b.trust_domain.as_str() == name)
    }

    pub fn domains(&self) -> impl Iterator<Item = &TrustDomain> {
        self.by_domain.keys()
    }

    /// The bundles, ordered by trust domain.
    pub fn iter(&self) -> impl Iterator<Item = &TrustBundle> {
        self.by_domain.values()
    }

    pub fn len(&self) -> usize {
        self.by_domain.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_domain.is_empty()
    }
}

/// A [`TrustBundles`] that can be swapped while connections use it: every
/// handshake reads the current set, so a rotation needs no restart.
#[derive(Clone, Debug, Default)]
pub struct SharedBundles(Arc<RwLock<Arc<TrustBundles>>>);

impl SharedBundles {
    pub fn new(bundles: TrustBundles) -> Self {
        Self(Arc::new(RwLock::new(Arc::new(bundles))))
    }

    pub fn load(&self) -> Arc<TrustBundles> {
        // A poisoned lock only means a writer panicked mid-swap of an Arc;
        // the Arc inside is still whole.
        match self.0.read() {
            Ok(g) => g.clone(),
            Err(p) => p.into_inner().clone(),
        }
    }

    pub fn store(&self, bundles: TrustBundles) {
        let mut g = match self.0.write() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        };
        *g = Arc::new(bundles);
    }
}
