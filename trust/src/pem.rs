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

/// What went wrong in a PEM document, as text that may be logged: the
/// decoder's own messages print the offending line (which whoever wrote
/// the document chose, of any length) as a list of byte values.
fn describe(e: &rustls_pki_types::pem::Error) -> String {
    use rustls_pki_types::pem::Error;
    let quoted = |b: &[u8]| fedmesh_wire::bounded(&String::from_utf8_lossy(b));
    match e {
        Error::MissingSectionEnd { end_marker } => {
            format!("missing section end `{}`", quoted(end_marker))
        }
        Error::IllegalSectionStart { line } => {
            format!("illegal section start `{}`", quoted(line))
        }
        other => fedmesh_wire::bounded(&other.to_string()),
    }
}

/// All `CERTIFICATE` blocks of `pem`, in order. Other block types are skipped.
pub fn decode_certs(pem: &str) -> Result<Vec<CertificateDer<'static>>, PemError> {
    let certs = CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| PemError::Malformed(describe(&e)))?;
    if certs.is_empty() {
        return Err(PemError::NoCertificates);
    }
    Ok(certs)
}

/// The first private key (PKCS#8, SEC1 or PKCS#1) of `pem`.
pub fn decode_key(pem: &str) -> Result<PrivateKeyDer<'static>, PemError> {
    PrivateKeyDer::from_pem_slice(pem.as_bytes()).map_err(|e| PemError::NoKey(describe(&e)))
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

#[cfg(test)]
mod tests {
    use super::*;

    /// Found by the `bundle` fuzz target: a bundle whose `-----BEGIN` line
    /// is broken made an error of four bytes of text per byte of that line
    /// (it reaches the log from a store record).
    #[test]
    fn malformed_pem_errors_stay_bounded() {
        let long = "x".repeat(10_000);
        for text in [
            format!("-----BEGIN CERTIFICATE\u{1}{long}\n"),
            format!("-----BEGIN {long}-----\nAAAA\n"),
        ] {
            let e = decode_certs(&text).unwrap_err().to_string();
            assert!(e.len() < 400, "{} bytes: {}", e.len(), &e[..100]);
            assert!(e.contains("xxxx") && e.contains("bytes)"), "{e}");
            assert!(!e.contains('\u{1}'), "{e}");
        }
    }
}
