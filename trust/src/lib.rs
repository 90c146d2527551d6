//! fedmesh trust: SPIFFE identities, per-cluster CAs, trust bundles, and the
//! rustls configurations every fedmesh hop uses for mutual TLS.
#![forbid(unsafe_code)]

pub mod bundle;
pub mod ca;
pub mod csr;
pub mod id;
pub mod pem;
pub mod rotation;
pub mod svid;
pub mod tls;
pub mod verify;

pub use bundle::{BundleError, SharedBundles, TrustBundle, TrustBundles};
pub use ca::{CaError, CertificateAuthority};
pub use csr::{Csr, CsrError};
pub use id::{IdError, SpiffeId, TrustDomain};
pub use svid::{LoadError, Svid, SvidError};
pub use tls::{
    anonymous_client_config, client_config, client_config_from, peer_id, provider, server_config,
    server_config_from, ClientAuth, SvidSource, TlsError,
};
pub use verify::{verify_svid, PeerPolicy, Usage, VerifyError};

/// Writes `contents` to `path`, creating it with mode 0600 when `secret`
/// (private keys must never be world-readable, not even for an instant).
pub(crate) fn write_file(
    path: &std::path::Path,
    contents: &[u8],
    secret: bool,
) -> std::io::Result<()> {
    use std::io::Write;
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create(true).truncate(true);
    #[cfg(unix)]
    if secret {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    let _ = secret;
    let mut f = opts.open(path)?;
    f.write_all(contents)?;
    f.sync_all()
}
