//! The controller's side of the control API: config streaming and CSR
//! signing, served on one mutual-TLS port.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use fedmesh_catalog::Catalog;
use fedmesh_trust::csr::Csr;
use fedmesh_trust::{CertificateAuthority, SpiffeId, TrustBundles};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use sha2::{Digest, Sha256};
use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch, Semaphore};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use crate::delta::{diff, ProxyConfig};
use crate::net::{self, PeerInfo};
use crate::pb::{self, subscribe_request::Kind};

/// The message of the `Unavailable` status a controller ends its config
/// streams with when it stops on purpose (a restart, an upgrade).
pub const STOPPING: &str = "controller stopping";

/// Bounds of the API server, named in the controller's config.
#[derive(Debug, Clone, serde::Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct ApiLimits {
    pub max_connections: usize,
    pub max_subscribers: usize,
    #[serde(with = "humantime_serde")]
    pub handshake_timeout: Duration,
    /// A subscriber must say Hello within this.
    #[serde(with = "humantime_serde")]
    pub hello_timeout: Duration,
    /// Largest message either way (a full snapshot of a big federation).
    pub max_message_bytes: usize,
    /// SVID lifetime for signed CSRs.
    #[serde(with = "humantime_serde")]
    pub svid_ttl: Duration,
    /// Least time between two updates to one proxy. The first change after
    /// a quiet spell goes out at once; a burst is coalesced, so a fleet of
    /// proxies is not re-sent every intermediate version.
    #[serde(with = "humantime_serde")]
    pub min_push_interval: Duration,
}

impl Default for ApiLimits {
    fn default() -> Self {
        Self {
            max_connections: 1024,
            max_subscribers: 1024,
            handshake_timeout: Duration::from_secs(10),
            hello_timeout: Duration::from_secs(10),
            max_message_bytes: 64 << 20,
            svid_ttl: Duration::from_secs(24 * 3600),
            min_push_interval: Duration::from_millis(100),
        }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Reason {
    reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct UpdateKind {
    kind: &'static str,
}

/// `fedmesh_api_*` metrics.
#[derive(Clone, Debug, Default)]
pub struct ApiMetrics {
    subscribers: Gauge,
    updates: Family<UpdateKind, Counter>,
    acks: Counter,
    nacks: Counter,
    rejected: Family<Reason, Counter>,
    signed: Counter,
}

impl ApiMetrics {
    pub fn register(&self, reg: &mut Registry) {
        let reg = reg.sub_registry_with_prefix("fedmesh_api");
        reg.register(
            "subscribers",
            "Proxies subscribed now",
            self.subscribers.clone(),
        );
        reg.register(
            "updates",
            "Config updates sent, full or delta",
            self.updates.clone(),
        );
        reg.register("acks", "Updates proxies applied", self.acks.clone());
        reg.register("nacks", "Updates proxies rejected", self.nacks.clone());
        reg.register(
            "rejected",
            "Callers or requests refused, by reason",
            self.rejected.clone(),
        );
        reg.register("signed", "SVIDs signed", self.signed.clone());
    }

    pub fn reject(&self, reason: &'static str) {
        self.rejected.get_or_create(&Reason { reason }).inc();
    }

    pub fn rejected_count(&self, reason: &'static str) -> u64 {
        self.rejected.get_or_create(&Reason { reason }).get()
    }

    pub fn nack_count(&self) -> u64 {
        self.nacks.get()
    }

    pub fn ack_count(&self) -> u64 {
        self.acks.get()
    }

    pub fn signed_count(&self) -> u64 {
        self.signed.get()
    }
}

/// One version of the cluster's proxy config.
#[derive(Debug)]
pub struct Versioned {
    pub version: u64,
    pub config: ProxyConfig,
}

/// Follows a controller's catalog and bundles and numbers every change.
/// Versions start at the current time in milliseconds, so they keep rising
/// across controller restarts (useful in logs; proxies do not rely on it).
pub fn versioned(
    mut catalog: watch::Receiver<Option<Arc<Catalog>>>,
    mut bundles: watch::Receiver<Arc<TrustBundles>>,
) -> watch::Receiver<Option<Arc<Versioned>>> {
    let start = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(1);
    let (tx, rx) = watch::channel::<Option<Arc<Versioned>>>(None);
    tokio::spawn(async move {
        let mut version = start;
        loop {
            let c = catalog.borrow_and_update().clone();
            let b = bundles.borrow_and_update().clone();
            if let Some(c) = c {
                let config = ProxyConfig {
                    catalog: c,
                    bundles: b,
                };
                let same = tx.borrow().as_ref().is_some_and(|v| v.config == config);
                if !same {
                    version += 1;
                    tx.send_replace(Some(Arc::new(Versioned { version, config })));
                }
            }
            tokio::select! {
                r = catalog.changed() => if r.is_err() { return },
                r = bundles.changed() => if r.is_err() { return },
                _ = tx.closed() => return,
            }
        }
    });
    rx
}

/// Updates computed recently, shared by every subscriber making the same
/// step (they all go from the last version to the next one).
const DELTA_CACHE: usize = 8;

/// (base version, version) and the update between them.
type CachedUpdate = ((u64, u64), Arc<pb::ConfigUpdate>);

struct Shared {
    source: watch::Receiver<Option<Arc<Versioned>>>,
    limits: ApiLimits,
    metrics: ApiMetrics,
    slots: Arc<Semaphore>,
    /// Set when the server stops: sessions end their streams, so a
    /// graceful shutdown does not wait on streams that never end.
    closing: watch::Sender<bool>,
    deltas: Mutex<VecDeque<CachedUpdate>>,
}

impl Shared {
    fn update_for(&self, base: Option<&Versioned>, next: &Versioned) -> Arc<pb::ConfigUpdate> {
        let key = (base.map(|b| b.version).unwrap_or(0), next.version);
        let mut cache = match self.deltas.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        };
        if let Some((_, u)) = cache.iter().find(|(k, _)| *k == key) {
            return u.clone();
        }
        let u = Arc::new(diff(
            next.version,
            base.map(|b| (b.version, &b.config)),
            &next.config,
        ));
        if cache.len() >= DELTA_CACHE {
            cache.pop_front();
        }
        cache.push_back((key, u.clone()));
        u
    }
}

/// The `Config` service.
#[derive(Clone)]
pub struct ConfigApi {
    shared: Arc<Shared>,
}

impl ConfigApi {
    pub fn new(
        source: watch::Receiver<Option<Arc<Versioned>>>,
        limits: ApiLimits,
        metrics: ApiMetrics,
    ) -> Self {
        Self {
            shared: Arc::new(Shared {
                source,
                slots: Arc::new(Semaphore::new(limits.max_subscribers)),
                limits,
                metrics,
                closing: watch::channel(false).0,
                deltas: Mutex::new(VecDeque::new()),
            }),
        }
    }
}

fn caller<T>(req: &Request<T>, metrics: &ApiMetrics) -> Result<PeerInfo, Status> {
    match net::peer(req) {
        Some(p) if p.id.is_some() => Ok(p.clone()),
        _ => {
            metrics.reject("no_svid");
            tracing::info!(remote = ?net::peer(req).map(|p| p.remote), "control API call without an SVID refused");
            Err(Status::unauthenticated("this call needs a client SVID"))
        }
    }
}

#[tonic::async_trait]
impl pb::config_server::Config for ConfigApi {
    type SubscribeStream = ReceiverStream<Result<pb::ConfigUpdate, Status>>;

    async fn subscribe(
        &self,
        req: Request<Streaming<pb::SubscribeRequest>>,
    ) -> Result<Response<Self::SubscribeStream>, Status> {
        let shared = &self.shared;
        let peer = caller(&req, &shared.metrics)?;
        let Ok(permit) = shared.slots.clone().try_acquire_owned() else {
            shared.metrics.reject("subscriber_limit");
            tracing::warn!(remote = %peer.remote, limit = shared.limits.max_subscribers, "subscriber over the limit");
            return Err(Status::resource_exhausted("too many subscribers"));
        };
        let (tx, rx) = mpsc::channel(1);
        let shared = self.shared.clone();
        let inbound = req.into_inner();
        tokio::spawn(async move {
            shared.metrics.subscribers.inc();
            session(&shared, &peer, inbound, &tx).await;
            shared.metrics.subscribers.dec();
            drop(permit);
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}

async fn session(
    shared: &Shared,
    peer: &PeerInfo,
    mut inbound: Streaming<pb::SubscribeRequest>,
    tx: &mpsc::Sender<Result<pb::ConfigUpdate, Status>>,
) {
    let id = peer
        .id
        .as_ref()
        .map(ToString::to_string)
        .unwrap_or_default();
    let refuse = |why: &'static str, text: String| {
        shared.metrics.reject(why);
        tracing::warn!(peer = %fedmesh_wire::bounded(&id), remote = %peer.remote, reason = why, "{text}");
        Err(Status::invalid_argument(text))
    };
    let node = match tokio::time::timeout(shared.limits.hello_timeout, inbound.message()).await {
        Ok(Ok(Some(pb::SubscribeRequest {
            kind: Some(Kind::Hello(h)),
        }))) => h.node,
        Ok(Ok(None)) | Ok(Err(_)) => return,
        Ok(Ok(Some(_))) => {
            let _ = tx
                .send(refuse("no_hello", "the first message must be Hello".into()))
                .await;
            return;
        }
        Err(_) => {
            let _ = tx
                .send(refuse("hello_timeout", "no Hello in time".into()))
                .await;
            return;
        }
    };
    tracing::info!(peer = %fedmesh_wire::bounded(&id), node = %fedmesh_wire::bounded(&node), "proxy subscribed");
    let mut closing = shared.closing.subscribe();
    let stopping = || Err(Status::unavailable(STOPPING));
    let mut source = shared.source.clone();
    // What the proxy has applied (None: nothing, or unknown after a NACK).
    let mut base: Option<Arc<Versioned>> = None;
    let mut nacked: Option<u64> = None;
    let mut last_push: Option<tokio::time::Instant> = None;
    loop {
        if let Some(at) = last_push {
            tokio::select! {
                _ = tokio::time::sleep_until(at + shared.limits.min_push_interval) => {}
                _ = tx.closed() => return,
                _ = stopped(&mut closing) => {
                    let _ = tx.send(stopping()).await;
                    return;
                }
            }
        }
        let next = loop {
            let current = source.borrow_and_update().clone();
            if let Some(v) = current {
                let applied = base.as_ref().map(|b| b.version) == Some(v.version);
                if !applied && nacked != Some(v.version) {
                    break v;
                }
            }
            tokio::select! {
                r = source.changed() => if r.is_err() { return },
                _ = tx.closed() => return,
                _ = stopped(&mut closing) => {
                    let _ = tx.send(stopping()).await;
                    return;
                }
            }
        };
        let update = shared.update_for(base.as_deref(), &next);
        let kind = if update.full { "full" } else { "delta" };
        shared
            .metrics
            .updates
            .get_or_create(&UpdateKind { kind })
            .inc();
        if tx.send(Ok((*update).clone())).await.is_err() {
            return;
        }
        last_push = Some(tokio::time::Instant::now());
        let answer = tokio::select! {
            m = inbound.message() => m,
            _ = tx.closed() => return,
            _ = stopped(&mut closing) => {
                let _ = tx.send(stopping()).await;
                return;
            }
        };
        match answer {
            Ok(Some(pb::SubscribeRequest {
                kind: Some(Kind::Ack(a)),
            })) if a.version == next.version => {
                shared.metrics.acks.inc();
                tracing::debug!(peer = %id, version = next.version, "update applied");
                base = Some(next);
                nacked = None;
            }
            Ok(Some(pb::SubscribeRequest {
                kind: Some(Kind::Nack(n)),
            })) if n.version == next.version => {
                shared.metrics.nacks.inc();
                tracing::warn!(peer = %fedmesh_wire::bounded(&id), node = %fedmesh_wire::bounded(&node), version = next.version, error = %fedmesh_wire::bounded(&n.error), "proxy rejected an update; it keeps its last good config");
                // The proxy's state is its last good one, which may not be
                // `base` (it may have restarted); resync with a full snapshot
                // when the config changes again.
                base = None;
                nacked = Some(next.version);
            }
            Ok(None) | Err(_) => return,
            Ok(Some(other)) => {
                let _ = tx
                    .send(refuse(
                        "protocol",
                        format!(
                            "expected Ack or Nack for version {}, got {other:?}",
                            next.version
                        ),
                    ))
                    .await;
                return;
            }
        }
    }
}

async fn stopped(closing: &mut watch::Receiver<bool>) {
    let _ = closing.wait_for(|c| *c).await;
}

/// A bootstrap token and the identities it may ask for: exact SPIFFE IDs,
/// or prefixes ending in `/*` (`spiffe://west.mesh/ns/shop/*`).
#[derive(Debug, Clone, serde::Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct BootstrapToken {
    pub token: String,
    pub identities: Vec<String>,
}

fn allows(patterns: &[String], id: &SpiffeId) -> bool {
    patterns.iter().any(|p| match p.strip_suffix('*') {
        Some(prefix) => prefix.ends_with('/') && id.as_str().starts_with(prefix),
        None => p == id.as_str(),
    })
}

/// Why a CSR was not signed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SignError {
    #[error("bad CSR: {0}")]
    Csr(#[from] fedmesh_trust::CsrError),
    #[error("caller {caller} may not get a certificate for {requested}")]
    NotOwnIdentity { caller: String, requested: String },
    #[error("no SVID and no bootstrap token")]
    NoCredentials,
    #[error("unknown bootstrap token")]
    UnknownToken,
    #[error("the bootstrap token does not allow {0}")]
    TokenScope(String),
    #[error("signing failed: {0}")]
    Ca(#[from] fedmesh_trust::CaError),
    #[error("Kubernetes token refused: {0}")]
    K8sToken(String),
    #[error("the service account token is for {allowed}, not {requested}")]
    K8sScope { allowed: String, requested: String },
    #[error("this controller does not take Kubernetes tokens")]
    K8sOff,
}

/// Checks a Kubernetes service account token (a TokenReview, in the
/// controller): the namespace and service account it proves.
#[tonic::async_trait]
pub trait TokenReviewer: Send + Sync {
    async fn review(&self, token: &str) -> Result<(String, String), String>;
}

impl SignError {
    fn reason(&self) -> &'static str {
        match self {
            Self::Csr(_) => "bad_csr",
            Self::NotOwnIdentity { .. } => "not_own_identity",
            Self::NoCredentials => "no_credentials",
            Self::UnknownToken => "unknown_token",
            Self::TokenScope(_) => "token_scope",
            Self::Ca(_) => "ca_error",
            Self::K8sToken(_) => "k8s_token",
            Self::K8sScope { .. } => "k8s_token_scope",
            Self::K8sOff => "k8s_token_off",
        }
    }

    fn status(&self) -> Status {
        match self {
            Self::Csr(_) => Status::invalid_argument(self.to_string()),
            Self::NoCredentials | Self::UnknownToken | Self::K8sToken(_) | Self::K8sOff => {
                Status::unauthenticated(self.to_string())
            }
            Self::K8sScope { .. } => Status::permission_denied(self.to_string()),
            Self::NotOwnIdentity { .. } | Self::TokenScope(_) => {
                Status::permission_denied(self.to_string())
            }
            Self::Ca(_) => Status::permission_denied(self.to_string()),
        }
    }
}

/// The `Certificates` service: the cluster CA signing proxies' CSRs.
pub struct Signer {
    ca: Arc<CertificateAuthority>,
    /// SHA-256 of each token: the tokens themselves are not kept around.
    tokens: Vec<([u8; 32], Vec<String>)>,
    ttl: Duration,
    metrics: ApiMetrics,
    reviewer: Option<Arc<dyn TokenReviewer>>,
}

impl Signer {
    pub fn new(
        ca: Arc<CertificateAuthority>,
        tokens: Vec<BootstrapToken>,
        ttl: Duration,
        metrics: ApiMetrics,
    ) -> Self {
        let tokens = tokens
            .into_iter()
            .map(|t| (Sha256::digest(t.token.as_bytes()).into(), t.identities))
            .collect();
        Self {
            ca,
            tokens,
            ttl,
            metrics,
            reviewer: None,
        }
    }

    /// Also sign for callers that prove a Kubernetes service account.
    pub fn with_reviewer(mut self, reviewer: Arc<dyn TokenReviewer>) -> Self {
        self.reviewer = Some(reviewer);
        self
    }

    /// First contact from a pod: its service account token, reviewed by
    /// the API server, allows exactly that service account's ID.
    pub async fn sign_for_k8s(
        &self,
        csr_pem: &str,
        k8s_token: &str,
    ) -> Result<Vec<rustls::pki_types::CertificateDer<'static>>, SignError> {
        let csr = Csr::parse(csr_pem)?;
        let reviewer = self.reviewer.as_ref().ok_or(SignError::K8sOff)?;
        let (ns, sa) = reviewer
            .review(k8s_token)
            .await
            .map_err(SignError::K8sToken)?;
        let allowed = self
            .ca
            .trust_domain()
            .id(&["ns", &ns, "sa", &sa])
            .map_err(|e| SignError::K8sToken(e.to_string()))?;
        if &allowed != csr.id() {
            return Err(SignError::K8sScope {
                allowed: allowed.to_string(),
                requested: csr.id().to_string(),
            });
        }
        Ok(self.ca.sign_csr(&csr, self.ttl)?)
    }

    /// Decides and signs; pure apart from the CA.
    pub fn sign_for(
        &self,
        caller: Option<&SpiffeId>,
        csr_pem: &str,
        token: &str,
    ) -> Result<Vec<rustls::pki_types::CertificateDer<'static>>, SignError> {
        let csr = Csr::parse(csr_pem)?;
        match caller {
            // Renewal: a workload renews exactly itself, token or not.
            Some(id) if id == csr.id() => {}
            Some(id) => {
                return Err(SignError::NotOwnIdentity {
                    caller: id.to_string(),
                    requested: csr.id().to_string(),
                })
            }
            None => {
                if token.is_empty() {
                    return Err(SignError::NoCredentials);
                }
                let digest: [u8; 32] = Sha256::digest(token.as_bytes()).into();
                let (_, patterns) = self
                    .tokens
                    .iter()
                    .find(|(d, _)| *d == digest)
                    .ok_or(SignError::UnknownToken)?;
                if !allows(patterns, csr.id()) {
                    return Err(SignError::TokenScope(csr.id().to_string()));
                }
            }
        }
        Ok(self.ca.sign_csr(&csr, self.ttl)?)
    }
}

#[tonic::async_trait]
impl pb::certificates_server::Certificates for Signer {
    async fn sign(
        &self,
        req: Request<pb::SignRequest>,
    ) -> Result<Response<pb::SignResponse>, Status> {
        let peer = net::peer(&req).cloned();
        let caller = peer.as_ref().and_then(|p| p.id.clone());
        let remote = peer.map(|p| p.remote);
        let body = req.into_inner();
        let signed = if caller.is_none() && !body.k8s_token.is_empty() {
            self.sign_for_k8s(&body.csr_pem, &body.k8s_token).await
        } else {
            self.sign_for(caller.as_ref(), &body.csr_pem, &body.token)
        };
        match signed {
            Ok(chain) => {
                self.metrics.signed.inc();
                tracing::info!(caller = ?caller.as_ref().map(|c| c.to_string()), ?remote, "SVID signed");
                Ok(Response::new(pb::SignResponse {
                    chain_pem: fedmesh_trust::pem::encode_certs(&chain),
                    bundle_pem: self.ca.bundle().to_pem(),
                }))
            }
            Err(e) => {
                self.metrics.reject(e.reason());
                tracing::warn!(caller = ?caller.as_ref().map(|c| c.to_string()), ?remote, error = %e, "CSR refused");
                Err(e.status())
            }
        }
    }
}

/// Serves `config` (and `signer`, if the controller holds the CA) on
/// `listener` until `shutdown` resolves, then ends every subscription
/// (proxies keep their config and reconnect elsewhere or later). `tls`
/// must make client certificates optional when `signer` takes bootstrap
/// tokens; `Subscribe` refuses certificate-less callers itself.
pub async fn serve(
    listener: TcpListener,
    tls: rustls::ServerConfig,
    config: ConfigApi,
    signer: Option<Signer>,
    shutdown: impl std::future::Future<Output = ()> + Send,
) -> Result<(), tonic::transport::Error> {
    let limits = config.shared.limits.clone();
    let metrics = config.shared.metrics.clone();
    let shared = config.shared.clone();
    let mut tls = tls;
    tls.alpn_protocols = vec![b"h2".to_vec()];
    let incoming = net::incoming(
        listener,
        tokio_rustls::TlsAcceptor::from(Arc::new(tls)),
        limits.max_connections,
        limits.handshake_timeout,
        move |reason| metrics.reject(reason),
    );
    let max = limits.max_message_bytes;
    let shutdown = async move {
        shutdown.await;
        shared.closing.send_replace(true);
    };
    tonic::transport::Server::builder()
        .http2_keepalive_interval(Some(Duration::from_secs(10)))
        .http2_keepalive_timeout(Some(Duration::from_secs(10)))
        .max_concurrent_streams(Some(16))
        .add_service(
            pb::config_server::ConfigServer::new(config)
                .max_decoding_message_size(max)
                .max_encoding_message_size(max),
        )
        .add_optional_service(signer.map(pb::certificates_server::CertificatesServer::new))
        .serve_with_incoming_shutdown(incoming, shutdown)
        .await
}

/// A server started by [`spawn`]. Dropping it stops the server too, but
/// only [`ApiHandle::shutdown`] waits until the port is free.
pub struct ApiHandle {
    pub addr: SocketAddr,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl ApiHandle {
    pub async fn shutdown(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            if tokio::time::timeout(Duration::from_secs(5), task)
                .await
                .is_err()
            {
                tracing::warn!("control API did not stop within 5 s");
            }
        }
    }
}

impl Drop for ApiHandle {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

/// Binds `addr` and serves in a task.
pub async fn spawn(
    addr: SocketAddr,
    tls: rustls::ServerConfig,
    config: ConfigApi,
    signer: Option<Signer>,
) -> std::io::Result<ApiHandle> {
    let listener = TcpListener::bind(addr).await?;
    let local = listener.local_addr()?;
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(async move {
        let shutdown = async move {
            let _ = stopped.await;
        };
        if let Err(e) = serve(listener, tls, config, signer, shutdown).await {
            tracing::error!(error = %e, "control API server stopped");
        }
    });
    Ok(ApiHandle {
        addr: local,
        stop: Some(stop),
        task: Some(task),
    })
}

/// The `api` section of a controller's config file.
#[derive(Debug, Clone, serde::Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct ApiConfig {
    /// TCP address proxies reach the controller at.
    pub listen: SocketAddr,
    /// The cluster CA (`fedmesh ca init --out DIR`). With it the controller
    /// issues its own SVID and signs proxies' CSRs.
    #[serde(default)]
    pub ca_dir: Option<std::path::PathBuf>,
    /// The controller's SVID (PEM chain and key) when it does not hold
    /// the CA; then no CSRs are signed.
    #[serde(default)]
    pub cert: Option<std::path::PathBuf>,
    #[serde(default)]
    pub key: Option<std::path::PathBuf>,
    /// YAML `tokens: [{token, identities}]`: bootstrap tokens.
    #[serde(default)]
    pub tokens: Option<std::path::PathBuf>,
    #[serde(default)]
    pub limits: ApiLimits,
}

#[derive(Debug, Clone, Default, serde::Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct TokensFile {
    pub tokens: Vec<BootstrapToken>,
}
