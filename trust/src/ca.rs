//! Certificate authorities and X.509-SVID issuance (rcgen).
//!
//! A [`CertificateAuthority`] is a root or an intermediate of one trust
//! domain. It issues leaf SVIDs that follow the X.509-SVID standard: exactly
//! one URI SAN, `cA=false`, a critical keyUsage of digitalSignature only,
//! and EKU serverAuth + clientAuth so the same SVID serves both ends of an
//! mTLS hop.

use std::path::Path;
use std::time::Duration;

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType, SerialNumber,
};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use time::OffsetDateTime;

use crate::bundle::TrustBundle;
use crate::id::{SpiffeId, TrustDomain};
use crate::pem;
use crate::svid::Svid;

/// Certificates are valid from a little before they are issued, so a peer
/// whose clock is slightly behind still accepts them.
const BACKDATE: Duration = Duration::from_secs(5 * 60);

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CaError {
    #[error("certificate generation failed: {0}")]
    Generate(#[from] rcgen::Error),
    #[error("reading {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("writing {path}: {source}")]
    Write {
        path: String,
        source: std::io::Error,
    },
    #[error("{path}: {source}")]
    Pem { path: String, source: pem::PemError },
    #[error("{path}: expected exactly one CA certificate, found {found}")]
    CertCount { path: String, found: usize },
    #[error("CA certificate in {path} is not usable: {reason}")]
    NotACa { path: String, reason: String },
    #[error("TTL {0:?} is out of range")]
    Ttl(Duration),
    #[error("SPIFFE ID {id} is not in this CA's trust domain {trust_domain}")]
    ForeignId {
        id: SpiffeId,
        trust_domain: TrustDomain,
    },
}

/// A signing CA of one trust domain.
pub struct CertificateAuthority {
    trust_domain: TrustDomain,
    cert: CertificateDer<'static>,
    key: KeyPair,
    /// Intermediates between this CA and the root, nearest first; empty for a root.
    chain: Vec<CertificateDer<'static>>,
    root: CertificateDer<'static>,
}

impl std::fmt::Debug for CertificateAuthority {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CertificateAuthority")
            .field("trust_domain", &self.trust_domain)
            .field("intermediate", &!self.chain.is_empty())
            .finish_non_exhaustive()
    }
}

fn validity(ttl: Duration) -> Result<(OffsetDateTime, OffsetDateTime), CaError> {
    let now = OffsetDateTime::now_utc();
    let not_after = time::Duration::try_from(ttl)
        .ok()
        .and_then(|d| now.checked_add(d))
        .ok_or(CaError::Ttl(ttl))?;
    let not_before = now - BACKDATE;
    Ok((not_before, not_after))
}

fn random_serial() -> SerialNumber {
    let mut bytes: [u8; 16] = rand::random();
    // Positive and non-zero, as RFC 5280 asks.
    bytes[0] &= 0x7f;
    bytes[0] |= 0x01;
    SerialNumber::from_slice(&bytes)
}

fn ca_params(td: &TrustDomain, cn: &str, ttl: Duration) -> Result<CertificateParams, CaError> {
    let mut params = CertificateParams::default();
    let (nb, na) = validity(ttl)?;
    params.not_before = nb;
    params.not_after = na;
    params.serial_number = Some(random_serial());
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "fedmesh");
    // A per-CA suffix keeps subjects distinct, so a rotated or rogue root
    // with the same trust domain is a different issuer to path building.
    let tag: u32 = rand::random();
    dn.push(DnType::CommonName, format!("{cn} {td} {tag:08x}"));
    params.distinguished_name = dn;
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    params.subject_alt_names = vec![SanType::URI(td.id_string().try_into()?)];
    params.use_authority_key_identifier_extension = true;
    Ok(params)
}

impl CertificateAuthority {
    /// Creates a new self-signed root for `trust_domain`.
    pub fn new_root(trust_domain: TrustDomain, ttl: Duration) -> Result<Self, CaError> {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
        let params = ca_params(&trust_domain, "fedmesh root CA", ttl)?;
        let cert = params.self_signed(&key)?.der().clone();
        Ok(Self {
            trust_domain,
            root: cert.clone(),
            cert,
            key,
            chain: Vec::new(),
        })
    }

    /// Creates an intermediate CA signed by this one.
    pub fn new_intermediate(&self, ttl: Duration) -> Result<Self, CaError> {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
        let params = ca_params(&self.trust_domain, "fedmesh intermediate CA", ttl)?;
        let cert = params.signed_by(&key, &self.issuer()?)?.der().clone();
        let mut chain = Vec::with_capacity(self.chain.len() + 1);
        if !self.is_root() {
            chain.push(self.cert.clone());
        }
        chain.extend(self.chain.iter().cloned());
        Ok(Self {
            trust_domain: self.trust_domain.clone(),
            cert,
            key,
            chain,
            root: self.root.clone(),
        })
    }

    fn is_root(&self) -> bool {
        self.cert == self.root
    }

    fn issuer(&self) -> Result<Issuer<'static, &KeyPair>, CaError> {
        Ok(Issuer::from_ca_cert_der(&self.cert, &self.key)?)
    }

    pub fn trust_domain(&self) -> &TrustDomain {
        &self.trust_domain
    }

    pub fn certificate(&self) -> &CertificateDer<'static> {
        &self.cert
    }

    /// The CA's signing key (endorsements of rotated bundles).
    pub(crate) fn key_pair(&self) -> &KeyPair {
        &self.key
    }

    /// The trust bundle other parties need to verify what this CA issues.
    pub fn bundle(&self) -> TrustBundle {
        // Built from our own root, which always parses as a CA.
        TrustBundle::new(self.trust_domain.clone(), vec![self.root.clone()])
            .unwrap_or_else(|_| TrustBundle::empty(self.trust_domain.clone()))
    }

    /// Issues an X.509-SVID for `id` with a fresh P-256 key.
    pub fn issue(&self, id: &SpiffeId, ttl: Duration) -> Result<Svid, CaError> {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
        let chain = self.sign_key(id, ttl, &key)?;
        let key_der = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
        Svid::new(chain, key_der).map_err(|e| CaError::NotACa {
            path: "<issued>".into(),
            reason: e.to_string(),
        })
    }

    /// Signs arbitrary leaf parameters with a fresh key, bypassing the SVID
    /// profile. For tests and tools that need certificates the normal path
    /// refuses to make; the result is returned as (chain, key).
    pub fn issue_custom(
        &self,
        params: &CertificateParams,
    ) -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>), CaError> {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
        let leaf = params.signed_by(&key, &self.issuer()?)?.der().clone();
        let mut chain = vec![leaf];
        if !self.is_root() {
            chain.push(self.cert.clone());
        }
        chain.extend(self.chain.iter().cloned());
        Ok((
            chain,
            PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
        ))
    }

    /// Signs an SVID for `id` over a key someone else holds (a CSR's),
    /// with this CA's chain appended.
    pub(crate) fn sign_key(
        &self,
        id: &SpiffeId,
        ttl: Duration,
        public_key: &impl rcgen::PublicKeyData,
    ) -> Result<Vec<CertificateDer<'static>>, CaError> {
        if id.trust_domain_name() != self.trust_domain.as_str() {
            return Err(CaError::ForeignId {
                id: id.clone(),
                trust_domain: self.trust_domain.clone(),
            });
        }
        let params = leaf_params(id, ttl)?;
        let leaf = params.signed_by(public_key, &self.issuer()?)?.der().clone();
        let mut chain = vec![leaf];
        if !self.is_root() {
            chain.push(self.cert.clone());
        }
        chain.extend(self.chain.iter().cloned());
        Ok(chain)
    }

    /// The parameters [`issue`](Self::issue) uses, for callers of
    /// [`issue_custom`](Self::issue_custom) that change one thing.
    pub fn svid_params(id: &SpiffeId, ttl: Duration) -> Result<CertificateParams, CaError> {
        leaf_params(id, ttl)
    }

    /// Writes `ca.pem`, `ca.key` (mode 0600), `chain.pem` and `bundle.pem` into `dir`.
    pub fn save(&self, dir: &Path) -> Result<(), CaError> {
        std::fs::create_dir_all(dir).map_err(|source| CaError::Write {
            path: dir.display().to_string(),
            source,
        })?;
        write(
            dir,
            "ca.pem",
            &pem::encode_certs(std::slice::from_ref(&self.cert)),
            false,
        )?;
        write(dir, "ca.key", &self.key.serialize_pem(), true)?;
        write(dir, "chain.pem", &pem::encode_certs(&self.chain), false)?;
        write(
            dir,
            "bundle.pem",
            &pem::encode_certs(std::slice::from_ref(&self.root)),
            false,
        )?;
        Ok(())
    }

    /// Loads a CA written by [`save`](Self::save).
    pub fn load(dir: &Path) -> Result<Self, CaError> {
        let certs = read_certs(&dir.join("ca.pem"))?;
        let [cert] = <[_; 1]>::try_from(certs).map_err(|v: Vec<_>| CaError::CertCount {
            path: dir.join("ca.pem").display().to_string(),
            found: v.len(),
        })?;
        let key_path = dir.join("ca.key");
        let key_pem = read(&key_path)?;
        let key = KeyPair::from_pem(&key_pem)?;
        let chain_path = dir.join("chain.pem");
        let chain = if chain_path.exists() && !read(&chain_path)?.trim().is_empty() {
            read_certs(&chain_path)?
        } else {
            Vec::new()
        };
        let roots = read_certs(&dir.join("bundle.pem"))?;
        let root = match roots.into_iter().next() {
            Some(r) => r,
            None => cert.clone(),
        };
        let info = crate::svid::inspect_ca(&cert).map_err(|e| CaError::NotACa {
            path: dir.join("ca.pem").display().to_string(),
            reason: e.to_string(),
        })?;
        Ok(Self {
            trust_domain: info,
            cert,
            key,
            chain,
            root,
        })
    }
}

fn leaf_params(id: &SpiffeId, ttl: Duration) -> Result<CertificateParams, CaError> {
    let mut params = CertificateParams::default();
    let (nb, na) = validity(ttl)?;
    params.not_before = nb;
    params.not_after = na;
    params.serial_number = Some(random_serial());
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "fedmesh");
    params.distinguished_name = dn;
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    params.subject_alt_names = vec![SanType::URI(id.as_str().try_into()?)];
    params.use_authority_key_identifier_extension = true;
    Ok(params)
}

fn read(path: &Path) -> Result<String, CaError> {
    std::fs::read_to_string(path).map_err(|source| CaError::Read {
        path: path.display().to_string(),
        source,
    })
}

fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, CaError> {
    pem::decode_certs(&read(path)?).map_err(|source| CaError::Pem {
        path: path.display().to_string(),
        source,
    })
}

fn write(dir: &Path, name: &str, contents: &str, secret: bool) -> Result<(), CaError> {
    let path = dir.join(name);
    let err = |source| CaError::Write {
        path: path.display().to_string(),
        source,
    };
    crate::write_file(&path, contents.as_bytes(), secret).map_err(err)
}
