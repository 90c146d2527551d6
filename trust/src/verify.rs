//! X.509-SVID chain verification against the bundle of the leaf's own trust
//! domain, and peer authorization policies.

use std::fmt;
use std::time::{Duration, SystemTime};

use rustls_pki_types::{CertificateDer, UnixTime};

use crate::bundle::TrustBundles;
use crate::id::{SpiffeId, TrustDomain};
use crate::svid::{inspect_leaf, SvidError};

/// Maximum chain length (leaf + intermediates) accepted from a peer.
pub const MAX_CHAIN_LEN: usize = 8;

/// Why a presented certificate chain was not accepted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum VerifyError {
    #[error("no certificate presented")]
    NoCertificate,
    #[error("chain has {0} certificates, more than the limit of {MAX_CHAIN_LEN}")]
    ChainTooLong(usize),
    #[error("leaf is not a valid X.509-SVID: {0}")]
    Leaf(#[from] SvidError),
    #[error("no trust bundle for trust domain {0} (the leaf's own domain)")]
    UnknownTrustDomain(String),
    #[error("certificate expired at {}", humanize(*.0))]
    Expired(SystemTime),
    #[error("certificate not valid before {}", humanize(*.0))]
    NotYetValid(SystemTime),
    #[error("chain does not lead to a root of the {0} bundle (untrusted issuer)")]
    UntrustedIssuer(String),
    #[error("a signature in the chain does not verify")]
    BadSignature,
    #[error("certificate is not valid for {0} (extendedKeyUsage)")]
    WrongUsage(&'static str),
    #[error("chain rejected: {0}")]
    Path(String),
    #[error("peer {id} is not authorized: expected {expected}")]
    NotAuthorized { id: SpiffeId, expected: String },
}

fn humanize(t: SystemTime) -> String {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| format!("unix {}", d.as_secs()))
        .unwrap_or_else(|_| "before 1970".into())
}

/// Which side of a TLS handshake the leaf is used for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Usage {
    Client,
    Server,
}

/// Verifies `chain` (leaf first, then intermediates) as an X.509-SVID at
/// `now`, against the bundle of the leaf's trust domain only.
pub fn verify_svid(
    bundles: &TrustBundles,
    chain: &[CertificateDer<'_>],
    now: SystemTime,
    usage: Usage,
) -> Result<SpiffeId, VerifyError> {
    let (leaf, intermediates) = chain.split_first().ok_or(VerifyError::NoCertificate)?;
    if chain.len() > MAX_CHAIN_LEN {
        return Err(VerifyError::ChainTooLong(chain.len()));
    }
    let info = inspect_leaf(leaf)?;
    let td = info.id.trust_domain_name();
    let bundle = bundles
        .get_by_name(td)
        .ok_or_else(|| VerifyError::UnknownTrustDomain(td.to_owned()))?;
    // Report validity in our own words before webpki's, with the dates.
    if now > info.not_after {
        return Err(VerifyError::Expired(info.not_after));
    }
    if now < info.not_before {
        return Err(VerifyError::NotYetValid(info.not_before));
    }
    let ee = webpki::EndEntityCert::try_from(leaf)
        .map_err(|e| VerifyError::Path(format!("leaf: {e}")))?;
    let since_epoch = now
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or(Duration::ZERO);
    let eku = match usage {
        Usage::Client => webpki::KeyUsage::client_auth(),
        Usage::Server => webpki::KeyUsage::server_auth(),
    };
    ee.verify_for_usage(
        webpki::ALL_VERIFICATION_ALGS,
        bundle.anchors(),
        intermediates,
        UnixTime::since_unix_epoch(since_epoch),
        eku,
        None,
        None,
    )
    .map_err(|e| map_webpki(e, td, usage))?;
    Ok(info.id)
}

fn map_webpki(e: webpki::Error, td: &str, usage: Usage) -> VerifyError {
    use webpki::Error as E;
    match e {
        E::UnknownIssuer => VerifyError::UntrustedIssuer(td.to_owned()),
        E::InvalidSignatureForPublicKey => VerifyError::BadSignature,
        E::CertExpired { .. } => VerifyError::Path("a certificate in the chain has expired".into()),
        E::CertNotValidYet { .. } => {
            VerifyError::Path("a certificate in the chain is not valid yet".into())
        }
        E::RequiredEkuNotFoundContext(_) => VerifyError::WrongUsage(match usage {
            Usage::Client => "client authentication",
            Usage::Server => "server authentication",
        }),
        other => VerifyError::Path(other.to_string()),
    }
}

/// Which verified peers a party accepts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PeerPolicy {
    /// Any SVID that verifies against its own domain's bundle.
    AnyTrusted,
    /// Only IDs in one of these trust domains.
    TrustDomains(Vec<TrustDomain>),
    /// Only exactly these IDs.
    Ids(Vec<SpiffeId>),
}

impl PeerPolicy {
    pub fn trust_domain(td: TrustDomain) -> Self {
        Self::TrustDomains(vec![td])
    }

    pub fn id(id: SpiffeId) -> Self {
        Self::Ids(vec![id])
    }

    pub fn authorize(&self, id: &SpiffeId) -> Result<(), VerifyError> {
        let ok = match self {
            Self::AnyTrusted => true,
            Self::TrustDomains(tds) => tds.iter().any(|t| t.as_str() == id.trust_domain_name()),
            Self::Ids(ids) => ids.contains(id),
        };
        if ok {
            Ok(())
        } else {
            Err(VerifyError::NotAuthorized {
                id: id.clone(),
                expected: self.to_string(),
            })
        }
    }
}

impl fmt::Display for PeerPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let join = |v: Vec<String>| v.join(" or ");
        match self {
            Self::AnyTrusted => f.write_str("any trusted identity"),
            Self::TrustDomains(t) => write!(
                f,
                "trust domain {}",
                join(t.iter().map(|t| t.to_string()).collect())
            ),
            Self::Ids(ids) => write!(f, "{}", join(ids.iter().map(|i| i.to_string()).collect())),
        }
    }
}
