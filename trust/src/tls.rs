//! rustls client and server configurations that authenticate peers by
//! X.509-SVID: the chain is checked against the bundle of the leaf's trust
//! domain (never a merged pool), then the SPIFFE ID against a [`PeerPolicy`].
//! TLS 1.3 only, ring only.

use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::ResolvesClientCert;
use rustls::crypto::{verify_tls13_signature, CryptoProvider};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::ResolvesServerCert;
use rustls::sign::CertifiedKey;
use rustls::{CertificateError, DigitallySignedStruct, DistinguishedName, SignatureScheme};

use crate::bundle::SharedBundles;
use crate::id::SpiffeId;
use crate::svid::{inspect_leaf, Svid};
use crate::verify::{verify_svid, PeerPolicy, Usage, VerifyError};

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TlsError {
    #[error("TLS configuration: {0}")]
    Config(#[from] rustls::Error),
    #[error("a renewed SVID must keep the identity {was}, got {now}")]
    IdentityChange { was: SpiffeId, now: SpiffeId },
}

/// The one crypto provider of fedmesh (rustls and quinn both use it):
/// ring, TLS 1.3 suites only, AES-128-GCM first. Every byte between
/// clusters is sealed and opened up to three times (sidecar, gateway,
/// gateway legs), so the cheaper AES key schedule is measurable; 128-bit
/// keys are what Go's and BoringSSL's defaults prefer too.
pub fn provider() -> Arc<CryptoProvider> {
    use rustls::crypto::ring::cipher_suite;
    let mut p = rustls::crypto::ring::default_provider();
    p.cipher_suites = vec![
        cipher_suite::TLS13_AES_128_GCM_SHA256,
        cipher_suite::TLS13_AES_256_GCM_SHA384,
        cipher_suite::TLS13_CHACHA20_POLY1305_SHA256,
    ];
    Arc::new(p)
}

fn to_rustls(e: VerifyError) -> rustls::Error {
    let ce = match e {
        VerifyError::Expired(_) => CertificateError::Expired,
        VerifyError::NotYetValid(_) => CertificateError::NotValidYet,
        VerifyError::UntrustedIssuer(_) | VerifyError::UnknownTrustDomain(_) => {
            CertificateError::UnknownIssuer
        }
        VerifyError::BadSignature => CertificateError::BadSignature,
        other => CertificateError::Other(rustls::OtherError(Arc::new(other))),
    };
    rustls::Error::InvalidCertificate(ce)
}

fn unix_to_system(now: UnixTime) -> SystemTime {
    SystemTime::UNIX_EPOCH + Duration::from_secs(now.as_secs())
}

#[derive(Debug)]
struct SpiffeVerifier {
    bundles: SharedBundles,
    policy: PeerPolicy,
    provider: Arc<CryptoProvider>,
    /// Servers only: a client may also come without a certificate (and is
    /// then anonymous to the application, which must check for that).
    optional: bool,
}

impl SpiffeVerifier {
    fn verify(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
        usage: Usage,
    ) -> Result<(), rustls::Error> {
        let mut chain = Vec::with_capacity(1 + intermediates.len());
        chain.push(end_entity.clone());
        chain.extend(intermediates.iter().cloned());
        let bundles = self.bundles.load();
        let id = verify_svid(&bundles, &chain, unix_to_system(now), usage).map_err(|e| {
            tracing::debug!(error = %e, ?usage, "peer certificate rejected");
            to_rustls(e)
        })?;
        self.policy.authorize(&id).map_err(|e| {
            tracing::debug!(error = %e, "peer identity not authorized");
            to_rustls(e)
        })
    }

    fn tls13(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

// Servers verify clients.
impl ClientCertVerifier for SpiffeVerifier {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn client_auth_mandatory(&self) -> bool {
        !self.optional
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.verify(end_entity, intermediates, now, Usage::Client)?;
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Err(rustls::Error::PeerIncompatible(
            rustls::PeerIncompatible::Tls12NotOffered,
        ))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.tls13(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.schemes()
    }
}

// Clients verify servers. SPIFFE authenticates by URI SAN, so the TLS server
// name is not consulted: the policy names who the server must be.
impl ServerCertVerifier for SpiffeVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        self.verify(end_entity, intermediates, now, Usage::Server)?;
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Err(rustls::Error::PeerIncompatible(
            rustls::PeerIncompatible::Tls12NotOffered,
        ))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.tls13(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.schemes()
    }
}

/// Whether a server requires a client certificate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientAuth {
    Required,
    /// Certificate-less clients are let in anonymous (bootstrap endpoints,
    /// where the application authenticates them another way).
    Optional,
}

/// The identity a TLS config presents. Storing a renewed SVID takes effect
/// at the next handshake, without rebuilding any config.
#[derive(Clone)]
pub struct SvidSource {
    current: Arc<RwLock<(Svid, Arc<CertifiedKey>)>>,
    /// Bumped by every [`SvidSource::store`]: lets a connection pool tell
    /// which SVID a connection was made with without copying it.
    generation: Arc<std::sync::atomic::AtomicU64>,
}

impl std::fmt::Debug for SvidSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SvidSource")
            .field("id", self.current().id())
            .finish()
    }
}

fn certified(svid: &Svid) -> Result<Arc<CertifiedKey>, TlsError> {
    let key = provider().key_provider.load_private_key(svid.key())?;
    Ok(Arc::new(CertifiedKey::new(svid.chain().to_vec(), key)))
}

impl SvidSource {
    pub fn new(svid: Svid) -> Result<Self, TlsError> {
        let key = certified(&svid)?;
        Ok(Self {
            current: Arc::new(RwLock::new((svid, key))),
            generation: Arc::default(),
        })
    }

    /// The SVID presented now.
    pub fn current(&self) -> Svid {
        match self.current.read() {
            Ok(g) => g.0.clone(),
            Err(p) => p.into_inner().0.clone(),
        }
    }

    fn key(&self) -> Arc<CertifiedKey> {
        match self.current.read() {
            Ok(g) => g.1.clone(),
            Err(p) => p.into_inner().1.clone(),
        }
    }

    /// Replaces the SVID (renewal). The identity may not change: a process
    /// is one workload for its whole life.
    pub fn store(&self, svid: Svid) -> Result<(), TlsError> {
        let was = self.current();
        if svid.id() != was.id() {
            return Err(TlsError::IdentityChange {
                was: was.id().clone(),
                now: svid.id().clone(),
            });
        }
        let key = certified(&svid)?;
        match self.current.write() {
            Ok(mut g) => *g = (svid, key),
            Err(p) => *p.into_inner() = (svid, key),
        }
        self.generation
            .fetch_add(1, std::sync::atomic::Ordering::Release);
        Ok(())
    }

    /// How many SVIDs were stored since this source was made: changes
    /// exactly when the SVID presented at the next handshake does.
    pub fn generation(&self) -> u64 {
        self.generation.load(std::sync::atomic::Ordering::Acquire)
    }
}

impl ResolvesServerCert for SvidSource {
    fn resolve(&self, _hello: rustls::server::ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.key())
    }
}

impl ResolvesClientCert for SvidSource {
    fn resolve(
        &self,
        _root_hint_subjects: &[&[u8]],
        _sigschemes: &[SignatureScheme],
    ) -> Option<Arc<CertifiedKey>> {
        Some(self.key())
    }

    fn has_certs(&self) -> bool {
        true
    }
}

/// A server config presenting `identity` and requiring a client SVID that
/// verifies against `bundles` and satisfies `policy`.
pub fn server_config(
    identity: &Svid,
    bundles: SharedBundles,
    policy: PeerPolicy,
    alpn: &[&[u8]],
) -> Result<rustls::ServerConfig, TlsError> {
    server_config_from(
        &SvidSource::new(identity.clone())?,
        bundles,
        policy,
        alpn,
        ClientAuth::Required,
    )
}

/// [`server_config`] with a renewable identity and a choice of client auth.
pub fn server_config_from(
    identity: &SvidSource,
    bundles: SharedBundles,
    policy: PeerPolicy,
    alpn: &[&[u8]],
    client_auth: ClientAuth,
) -> Result<rustls::ServerConfig, TlsError> {
    let provider = provider();
    let verifier = Arc::new(SpiffeVerifier {
        bundles,
        policy,
        provider: provider.clone(),
        optional: client_auth == ClientAuth::Optional,
    });
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier)
        .with_cert_resolver(Arc::new(identity.clone()));
    cfg.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Ok(cfg)
}

/// A client config presenting `identity` and requiring a server SVID that
/// verifies against `bundles` and satisfies `policy`.
pub fn client_config(
    identity: &Svid,
    bundles: SharedBundles,
    policy: PeerPolicy,
    alpn: &[&[u8]],
) -> Result<rustls::ClientConfig, TlsError> {
    client_config_from(&SvidSource::new(identity.clone())?, bundles, policy, alpn)
}

/// [`client_config`] with a renewable identity.
pub fn client_config_from(
    identity: &SvidSource,
    bundles: SharedBundles,
    policy: PeerPolicy,
    alpn: &[&[u8]],
) -> Result<rustls::ClientConfig, TlsError> {
    let mut cfg = anonymous_client_config(bundles, policy, alpn)?;
    cfg.client_auth_cert_resolver = Arc::new(identity.clone());
    Ok(cfg)
}

/// A client config without a certificate that still verifies the server's
/// SVID (first contact, before this process has an identity).
pub fn anonymous_client_config(
    bundles: SharedBundles,
    policy: PeerPolicy,
    alpn: &[&[u8]],
) -> Result<rustls::ClientConfig, TlsError> {
    let provider = provider();
    let verifier = Arc::new(SpiffeVerifier {
        bundles,
        policy,
        provider: provider.clone(),
        optional: false,
    });
    let mut cfg = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_no_client_auth();
    cfg.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Ok(cfg)
}

/// The SPIFFE ID of a peer whose chain a verifier above already accepted.
pub fn peer_id(certs: Option<&[CertificateDer<'_>]>) -> Option<SpiffeId> {
    let leaf = certs?.first()?;
    inspect_leaf(leaf).ok().map(|i| i.id)
}
