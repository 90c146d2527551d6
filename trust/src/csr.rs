//! Certificate signing requests for X.509-SVIDs: a proxy makes one with a
//! fresh key for the one SPIFFE ID it wants; a CA parses it, and signs only
//! the requested public key under the CA's own SVID profile. Nothing in a
//! CSR besides its key and its single URI SAN reaches a certificate.

use std::time::Duration;

use rcgen::{CertificateParams, CertificateSigningRequestParams, KeyPair, SanType};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};

use crate::ca::CertificateAuthority;
use crate::id::SpiffeId;

/// A CSR larger than this is refused before parsing (a P-256 CSR is ~400 B).
pub const MAX_CSR_PEM: usize = 8 * 1024;

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CsrError {
    #[error("CSR is {0} bytes; the limit is {MAX_CSR_PEM}")]
    TooLarge(usize),
    #[error("CSR does not parse or its signature does not verify: {0}")]
    Invalid(String),
    #[error("CSR must name exactly one URI SAN and no other SAN, found {0}")]
    Sans(usize),
    #[error("CSR SAN is not a SPIFFE ID: {0}")]
    NotSpiffe(String),
    #[error("making a CSR failed: {0}")]
    Make(#[from] rcgen::Error),
}

/// A verified request: the key it proves possession of and the ID it asks for.
pub struct Csr {
    id: SpiffeId,
    request: CertificateSigningRequestParams,
}

impl std::fmt::Debug for Csr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Csr")
            .field("id", &self.id)
            .finish_non_exhaustive()
    }
}

impl Csr {
    /// Parses a PEM CSR and checks its self-signature.
    pub fn parse(pem_text: &str) -> Result<Self, CsrError> {
        if pem_text.len() > MAX_CSR_PEM {
            return Err(CsrError::TooLarge(pem_text.len()));
        }
        let request = CertificateSigningRequestParams::from_pem(pem_text)
            .map_err(|e| CsrError::Invalid(e.to_string()))?;
        let sans = &request.params.subject_alt_names;
        let uri = match sans.as_slice() {
            [SanType::URI(uri)] => uri.as_str().to_owned(),
            other => return Err(CsrError::Sans(other.len())),
        };
        let id: SpiffeId = uri
            .parse()
            .map_err(|e| CsrError::NotSpiffe(format!("{}: {e}", fedmesh_wire::bounded(&uri))))?;
        Ok(Self { id, request })
    }

    /// The SPIFFE ID the requester asks for (not yet authorized by anyone).
    pub fn id(&self) -> &SpiffeId {
        &self.id
    }
}

/// A CSR for `id` with a fresh P-256 key: (PEM, private key).
pub fn new_request(id: &SpiffeId) -> Result<(String, PrivateKeyDer<'static>), CsrError> {
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
    let mut params = CertificateParams::default();
    params.subject_alt_names = vec![SanType::URI(id.as_str().try_into()?)];
    let pem_text = params.serialize_request(&key)?.pem()?;
    let der = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
    Ok((pem_text, der))
}

impl CertificateAuthority {
    /// Signs the key of an already authorized `csr` as an SVID for its ID,
    /// valid for `ttl`; returns the chain (leaf first, no root).
    pub fn sign_csr(
        &self,
        csr: &Csr,
        ttl: Duration,
    ) -> Result<Vec<CertificateDer<'static>>, crate::CaError> {
        self.sign_key(&csr.id, ttl, &csr.request.public_key)
    }
}
