//! X.509-SVIDs: a leaf certificate carrying one SPIFFE ID, its chain and key,
//! and the structural rules of the X.509-SVID standard for leaves and
//! signing certificates. Chain and signature checks live in [`crate::verify`].

use std::path::Path;
use std::time::{Duration, SystemTime};

use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use x509_parser::certificate::X509Certificate;
use x509_parser::extensions::GeneralName;
use x509_parser::prelude::FromDer;

use crate::id::{IdError, SpiffeId, TrustDomain};
use crate::pem::{self, PemError};

/// One way a certificate breaks the X.509-SVID rules.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SvidError {
    #[error("certificate does not parse as X.509: {0}")]
    Parse(String),
    #[error("certificate has trailing bytes after the DER structure")]
    TrailingData,
    #[error("certificate has no URI SAN (an X.509-SVID carries exactly one SPIFFE ID)")]
    NoUriSan,
    #[error("certificate has {0} URI SANs; an X.509-SVID carries exactly one")]
    MultipleUriSans(usize),
    #[error("URI SAN is not a valid SPIFFE ID: {0}")]
    BadId(IdError),
    #[error("leaf certificate is a CA (basicConstraints cA=true)")]
    LeafIsCa,
    #[error("leaf certificate has no keyUsage extension")]
    NoKeyUsage,
    #[error("leaf certificate keyUsage is not marked critical")]
    KeyUsageNotCritical,
    #[error("leaf certificate keyUsage lacks digitalSignature")]
    NoDigitalSignature,
    #[error("leaf certificate keyUsage allows keyCertSign")]
    LeafKeyCertSign,
    #[error("leaf certificate keyUsage allows cRLSign")]
    LeafCrlSign,
    #[error("certificate is not a CA (basicConstraints cA=false or missing)")]
    NotCa,
    #[error("CA certificate keyUsage lacks keyCertSign")]
    CaCannotSign,
    #[error("CA certificate names {0}, a SPIFFE ID with a path; signing certificates may only name a trust domain")]
    CaIdHasPath(String),
    #[error("{0}")]
    Extension(String),
}

/// What a leaf says about itself once it passed the structural rules.
#[derive(Debug, Clone)]
pub struct LeafInfo {
    pub id: SpiffeId,
    pub not_before: SystemTime,
    pub not_after: SystemTime,
}

fn parse(der: &[u8]) -> Result<X509Certificate<'_>, SvidError> {
    let (rest, cert) =
        X509Certificate::from_der(der).map_err(|e| SvidError::Parse(e.to_string()))?;
    if !rest.is_empty() {
        return Err(SvidError::TrailingData);
    }
    Ok(cert)
}

fn uri_sans<'a>(cert: &'a X509Certificate<'_>) -> Result<Vec<&'a str>, SvidError> {
    let san = cert
        .subject_alternative_name()
        .map_err(|e| SvidError::Extension(format!("bad subjectAltName: {e}")))?;
    Ok(san
        .map(|s| {
            s.value
                .general_names
                .iter()
                .filter_map(|n| match n {
                    GeneralName::URI(u) => Some(*u),
                    _ => None,
                })
                .collect()
        })
        .unwrap_or_default())
}

fn time_of(t: x509_parser::time::ASN1Time) -> SystemTime {
    let secs = t.timestamp();
    if secs >= 0 {
        SystemTime::UNIX_EPOCH + Duration::from_secs(secs.unsigned_abs())
    } else {
        SystemTime::UNIX_EPOCH - Duration::from_secs(secs.unsigned_abs())
    }
}

/// Checks the X.509-SVID leaf rules and returns the SPIFFE ID and validity.
pub fn inspect_leaf(der: &[u8]) -> Result<LeafInfo, SvidError> {
    let cert = parse(der)?;
    let uris = uri_sans(&cert)?;
    let id = match uris.as_slice() {
        [] => return Err(SvidError::NoUriSan),
        [one] => SpiffeId::new(one).map_err(SvidError::BadId)?,
        many => return Err(SvidError::MultipleUriSans(many.len())),
    };
    let bc = cert
        .basic_constraints()
        .map_err(|e| SvidError::Extension(format!("bad basicConstraints: {e}")))?;
    if bc.is_some_and(|b| b.value.ca) {
        return Err(SvidError::LeafIsCa);
    }
    let ku = cert
        .key_usage()
        .map_err(|e| SvidError::Extension(format!("bad keyUsage: {e}")))?
        .ok_or(SvidError::NoKeyUsage)?;
    if !ku.critical {
        return Err(SvidError::KeyUsageNotCritical);
    }
    if !ku.value.digital_signature() {
        return Err(SvidError::NoDigitalSignature);
    }
    if ku.value.key_cert_sign() {
        return Err(SvidError::LeafKeyCertSign);
    }
    if ku.value.crl_sign() {
        return Err(SvidError::LeafCrlSign);
    }
    let v = cert.validity();
    Ok(LeafInfo {
        id,
        not_before: time_of(v.not_before),
        not_after: time_of(v.not_after),
    })
}

/// Checks that `der` is a signing certificate and returns the trust domain
/// its URI SAN names, if it names one.
pub fn inspect_ca_cert(der: &[u8]) -> Result<Option<TrustDomain>, SvidError> {
    let cert = parse(der)?;
    let bc = cert
        .basic_constraints()
        .map_err(|e| SvidError::Extension(format!("bad basicConstraints: {e}")))?;
    if !bc.is_some_and(|b| b.value.ca) {
        return Err(SvidError::NotCa);
    }
    let ku = cert
        .key_usage()
        .map_err(|e| SvidError::Extension(format!("bad keyUsage: {e}")))?;
    if ku.is_some_and(|k| !k.value.key_cert_sign()) {
        return Err(SvidError::CaCannotSign);
    }
    match uri_sans(&cert)?.as_slice() {
        [] => Ok(None),
        [one] => {
            if let Ok(id) = SpiffeId::new(one) {
                return Err(SvidError::CaIdHasPath(id.to_string()));
            }
            TrustDomain::new(one).map(Some).map_err(SvidError::BadId)
        }
        many => Err(SvidError::MultipleUriSans(many.len())),
    }
}

/// Like [`inspect_ca_cert`], but requires the trust domain to be named.
pub fn inspect_ca(der: &[u8]) -> Result<TrustDomain, SvidError> {
    inspect_ca_cert(der)?.ok_or(SvidError::NoUriSan)
}

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LoadError {
    #[error("reading {path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("{path}: {source}")]
    Pem { path: String, source: PemError },
    #[error("{path}: leaf certificate: {source}")]
    Svid { path: String, source: SvidError },
}

/// An identity this process can present: leaf SVID, intermediates, key.
pub struct Svid {
    id: SpiffeId,
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    not_after: SystemTime,
}

impl Clone for Svid {
    fn clone(&self) -> Self {
        Self {
            id: self.id.clone(),
            chain: self.chain.clone(),
            key: self.key.clone_key(),
            not_after: self.not_after,
        }
    }
}

impl std::fmt::Debug for Svid {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Svid")
            .field("id", &self.id)
            .field("chain_len", &self.chain.len())
            .finish_non_exhaustive()
    }
}

impl Svid {
    /// `chain` is leaf first, then intermediates (no root).
    pub fn new(
        chain: Vec<CertificateDer<'static>>,
        key: PrivateKeyDer<'static>,
    ) -> Result<Self, SvidError> {
        let leaf = chain.first().ok_or(SvidError::NoUriSan)?;
        let info = inspect_leaf(leaf)?;
        Ok(Self {
            id: info.id,
            chain,
            key,
            not_after: info.not_after,
        })
    }

    /// Loads an SVID from a PEM chain (leaf first) and a PEM key.
    pub fn load(cert_path: &Path, key_path: &Path) -> Result<Self, LoadError> {
        let read = |p: &Path| {
            std::fs::read_to_string(p).map_err(|source| LoadError::Io {
                path: p.display().to_string(),
                source,
            })
        };
        let chain = pem::decode_certs(&read(cert_path)?).map_err(|source| LoadError::Pem {
            path: cert_path.display().to_string(),
            source,
        })?;
        let key = pem::decode_key(&read(key_path)?).map_err(|source| LoadError::Pem {
            path: key_path.display().to_string(),
            source,
        })?;
        Self::new(chain, key).map_err(|source| LoadError::Svid {
            path: cert_path.display().to_string(),
            source,
        })
    }

    /// Writes `svid.pem` (chain) and `svid.key` (mode 0600) into `dir`.
    pub fn save(&self, dir: &Path) -> std::io::Result<()> {
        std::fs::create_dir_all(dir)?;
        crate::write_file(
            &dir.join("svid.pem"),
            pem::encode_certs(&self.chain).as_bytes(),
            false,
        )?;
        crate::write_file(
            &dir.join("svid.key"),
            pem::encode_key(&self.key).as_bytes(),
            true,
        )
    }

    /// Writes the chain and the key (mode 0600) to the given paths.
    pub fn save_to(&self, cert_path: &Path, key_path: &Path) -> std::io::Result<()> {
        crate::write_file(cert_path, pem::encode_certs(&self.chain).as_bytes(), false)?;
        crate::write_file(key_path, pem::encode_key(&self.key).as_bytes(), true)
    }

    pub fn id(&self) -> &SpiffeId {
        &self.id
    }

    pub fn chain(&self) -> &[CertificateDer<'static>] {
        &self.chain
    }

    pub fn key(&self) -> PrivateKeyDer<'static> {
        self.key.clone_key()
    }

    pub fn not_after(&self) -> SystemTime {
        self.not_after
    }
}
