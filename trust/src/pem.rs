//! PEM encoding and decoding of certificates and keys.

use base64::Engine;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PemError {
    #[error("malformed PEM: {0}")]
    Malformed(String),
    #[error("no certificate found in PEM input")]
    NoCertificates,
    #[error("no private key found in PEM input: {0}")]
    NoKey(String),
}

/// All `CERTIFICATE` blocks of `pem`, in order. Other block types are skipped.
pub fn decode_certs(pem: &str) -> Result<Vec<CertificateDer<'static>>, PemError> {
    let certs = CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| PemError::Malformed(e.to_string()))?;
    if certs.is_empty() {
        return Err(PemError::NoCertificates);
    }
    Ok(certs)
}

/// The first private key (PKCS#8, SEC1 or PKCS#1) of `pem`.
pub fn decode_key(pem: &str) -> Result<PrivateKeyDer<'static>, PemError> {
    PrivateKeyDer::from_pem_slice(pem.as_bytes()).map_err(|e| PemError::NoKey(e.to_string()))
}

/// Certificates as concatenated `CERTIFICATE` blocks.
pub fn encode_certs(certs: &[CertificateDer<'_>]) -> String {
    let mut out = String::new();
    for c in certs {
        encode_block(&mut out, "CERTIFICATE", c.as_ref());
    }
    out
}

/// A private key as the PEM block its encoding calls for.
pub fn encode_key(key: &PrivateKeyDer<'_>) -> String {
    let label = match key {
        PrivateKeyDer::Pkcs1(_) => "RSA PRIVATE KEY",
        PrivateKeyDer::Sec1(_) => "EC PRIVATE KEY",
        _ => "PRIVATE KEY",
    };
    let mut out = String::new();
    encode_block(&mut out, label, key.secret_der());
    out
}

fn encode_block(out: &mut String, label: &str, der: &[u8]) {
    let b64 = base64::engine::general_purpose::STANDARD.encode(der);
    out.push_str("-----BEGIN ");
    out.push_str(label);
    out.push_str("-----\n");
    // `b64` is ASCII, so every 64-byte chunk is valid UTF-8.
    for line in b64.as_bytes().chunks(64) {
        out.push_str(std::str::from_utf8(line).unwrap_or_default());
        out.push('\n');
    }
    out.push_str("-----END ");
    out.push_str(label);
    out.push_str("-----\n");
}
