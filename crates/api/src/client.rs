//! The proxy's side of the config stream: subscribe, validate each update
//! before applying it (ACK) or reject it and keep the last good config
//! (NACK), and reconnect with backoff whenever the stream breaks. While
//! disconnected the proxy keeps serving with what it has.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use fedmesh_catalog::ClusterName;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio_stream::wrappers::ReceiverStream;

use crate::delta::{Applied, ProxyConfig};
use crate::net;
use crate::pb::{self, subscribe_request::Kind};

#[derive(Debug, Clone)]
pub struct ClientSettings {
    pub controller: SocketAddr,
    /// What this proxy is, for the controller's logs ("gateway", "sidecar/web").
    pub node: String,
    /// Updates for another cluster are rejected.
    pub cluster: Option<ClusterName>,
    pub connect_timeout: Duration,
    pub backoff_min: Duration,
    pub backoff_max: Duration,
    pub max_message_bytes: usize,
}

impl ClientSettings {
    pub fn new(controller: SocketAddr, node: impl Into<String>) -> Self {
        Self {
            controller,
            node: node.into(),
            cluster: None,
            connect_timeout: Duration::from_secs(5),
            backoff_min: Duration::from_millis(100),
            backoff_max: Duration::from_secs(5),
            max_message_bytes: 64 << 20,
        }
    }
}

/// What a subscription has done, for status and tests.
#[derive(Debug, Clone, Default)]
pub struct SubscriptionStatus {
    pub connected: bool,
    pub version: Option<u64>,
    pub applied: u64,
    pub rejected: u64,
    pub last_error: Option<String>,
    pub connects: u64,
}

/// A running subscription. Dropping it stops it.
pub struct Subscription {
    config: watch::Receiver<Option<ProxyConfig>>,
    status: Arc<Mutex<SubscriptionStatus>>,
    task: JoinHandle<()>,
}

impl Drop for Subscription {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Subscription {
    /// The last good config; `None` until the first update was applied.
    pub fn config(&self) -> watch::Receiver<Option<ProxyConfig>> {
        self.config.clone()
    }

    pub fn status(&self) -> SubscriptionStatus {
        match self.status.lock() {
            Ok(g) => g.clone(),
            Err(p) => p.into_inner().clone(),
        }
    }

    /// Reads the version of the config last applied (set before the
    /// config itself is published, so a follower sees at least its own).
    pub fn version_reader(&self) -> impl Fn() -> Option<u64> + Send + Sync + 'static {
        let status = self.status.clone();
        move || match status.lock() {
            Ok(g) => g.version,
            Err(p) => p.into_inner().version,
        }
    }
}

fn update_status(status: &Mutex<SubscriptionStatus>, f: impl FnOnce(&mut SubscriptionStatus)) {
    match status.lock() {
        Ok(mut g) => f(&mut g),
        Err(p) => f(&mut p.into_inner()),
    }
}

/// Subscribes to the controller at `settings.controller` with `tls` (which
/// presents this proxy's SVID and expects the controller's identity).
pub fn subscribe(settings: ClientSettings, tls: Arc<rustls::ClientConfig>) -> Subscription {
    let (config_tx, config_rx) = watch::channel(None);
    let status = Arc::new(Mutex::new(SubscriptionStatus::default()));
    let task = tokio::spawn(run(settings, tls, config_tx, status.clone()));
    Subscription {
        config: config_rx,
        status,
        task,
    }
}

/// Tries a controller that stopped on purpose gets before a warning.
const PLANNED_TRIES: u64 = 5;

async fn run(
    s: ClientSettings,
    tls: Arc<rustls::ClientConfig>,
    config_tx: watch::Sender<Option<ProxyConfig>>,
    status: Arc<Mutex<SubscriptionStatus>>,
) {
    let mut tls = (*tls).clone();
    tls.alpn_protocols = vec![b"h2".to_vec()];
    let tls = Arc::new(tls);
    // Survives reconnects: a delta is checked against what was applied,
    // whichever stream it came from.
    let mut applied = Applied::new(s.cluster.clone());
    let mut backoff = s.backoff_min;
    let mut failures = 0u64;
    // The controller said it stops on purpose: a restart gets a few tries
    // to come back before anyone is warned.
    let mut planned = false;
    loop {
        let progressed = match stream_once(&s, &tls, &mut applied, &config_tx, &status).await {
            Ok(p) => p,
            Err(e) => {
                failures += 1;
                let stopping =
                    e.code() == tonic::Code::Unavailable && e.message() == crate::server::STOPPING;
                planned |= stopping;
                // A controller that is down for long is logged, not shouted
                // about at every retry.
                let first = if planned { PLANNED_TRIES } else { 1 };
                if stopping {
                    tracing::info!(controller = %s.controller, "controller stopping (a restart or an upgrade); keeping the last good config and reconnecting");
                } else if failures == first || failures.is_multiple_of(20) {
                    tracing::warn!(controller = %s.controller, error = %e, failures, "config stream failed; keeping the last good config");
                } else {
                    tracing::debug!(controller = %s.controller, error = %e, failures, "config stream failed again");
                }
                update_status(&status, |st| st.last_error = Some(e.to_string()));
                false
            }
        };
        update_status(&status, |st| st.connected = false);
        if progressed {
            backoff = s.backoff_min;
            failures = 0;
            planned = false;
        }
        // Jitter spreads a fleet's reconnects after a controller restart.
        let jitter = rand::random::<f64>() * 0.5 + 0.75;
        tokio::time::sleep(backoff.mul_f64(jitter)).await;
        backoff = (backoff * 2).min(s.backoff_max);
    }
}

/// One stream, until it ends. Returns whether any update arrived.
async fn stream_once(
    s: &ClientSettings,
    tls: &Arc<rustls::ClientConfig>,
    applied: &mut Applied,
    config_tx: &watch::Sender<Option<ProxyConfig>>,
    status: &Mutex<SubscriptionStatus>,
) -> Result<bool, tonic::Status> {
    let channel = net::channel(s.controller, tls.clone(), s.connect_timeout)
        .map_err(|e| tonic::Status::unavailable(e.to_string()))?;
    let mut client = pb::config_client::ConfigClient::new(channel)
        .max_decoding_message_size(s.max_message_bytes)
        .max_encoding_message_size(s.max_message_bytes);
    let (out_tx, out_rx) = mpsc::channel(4);
    let hello = pb::SubscribeRequest {
        kind: Some(Kind::Hello(pb::Hello {
            node: s.node.clone(),
        })),
    };
    let _ = out_tx.send(hello).await;
    let mut updates = client
        .subscribe(ReceiverStream::new(out_rx))
        .await?
        .into_inner();
    update_status(status, |st| {
        st.connected = true;
        st.connects += 1;
    });
    tracing::info!(controller = %s.controller, "config stream open");
    let mut progressed = false;
    while let Some(u) = updates.message().await? {
        progressed = true;
        let answer = match applied.apply(&u) {
            Ok(cfg) => {
                tracing::debug!(version = u.version, full = u.full, "config applied");
                // Status first: whoever sees the new config can read its version.
                update_status(status, |st| {
                    st.version = Some(u.version);
                    st.applied += 1;
                });
                config_tx.send_replace(Some(cfg));
                Kind::Ack(pb::Ack { version: u.version })
            }
            Err(e) => {
                tracing::warn!(version = u.version, reason = e.reason(), error = %e, "config update rejected; keeping the last good config");
                update_status(status, |st| {
                    st.rejected += 1;
                    st.last_error = Some(e.to_string());
                });
                Kind::Nack(pb::Nack {
                    version: u.version,
                    error: e.to_string(),
                })
            }
        };
        if out_tx
            .send(pb::SubscribeRequest { kind: Some(answer) })
            .await
            .is_err()
        {
            break;
        }
    }
    Ok(progressed)
}

/// Calls `apply` with every config the subscription applied (the latest
/// one when several arrive at once), until the subscription is dropped.
pub async fn follow(
    mut config: watch::Receiver<Option<ProxyConfig>>,
    apply: impl Fn(&ProxyConfig) + Send,
) {
    loop {
        let current = config.borrow_and_update().clone();
        if let Some(c) = current {
            apply(&c);
        }
        if config.changed().await.is_err() {
            return;
        }
    }
}

/// The `controller` section of a gateway's or sidecar's config file: where
/// its config (and SVID renewals) come from.
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct ControllerLink {
    /// `ip:port` or `name:port` (resolved once, when the proxy starts).
    pub address: crate::addr::HostPort,
    /// The cluster this proxy belongs to: updates for another are refused.
    pub cluster: String,
    /// Renew the SVID from the controller at two thirds of its lifetime
    /// (and write it back to the identity files).
    #[serde(default = "yes")]
    pub renew: bool,
}

fn yes() -> bool {
    true
}

/// The catalog a proxy starts with: its static one, or (when it follows a
/// controller) an empty one for its cluster until the first update.
/// `identity` is the proxy's own SVID ID (its trust domain is the cluster's).
pub fn initial_catalog(
    spec: Option<&fedmesh_catalog::CatalogSpec>,
    link: Option<&ControllerLink>,
    identity: Option<&fedmesh_trust::SpiffeId>,
) -> Result<fedmesh_catalog::Catalog, Vec<String>> {
    match (spec, link) {
        (Some(spec), _) => spec.build().map_err(|e| e.0),
        (None, Some(link)) => {
            let cluster = ClusterName::new(&link.cluster)
                .map_err(|e| vec![format!("controller.cluster: {e}")])?;
            let td = identity
                .and_then(|id| id.trust_domain_name().parse().ok())
                .ok_or_else(|| vec!["no identity to take the trust domain from".to_string()])?;
            Ok(fedmesh_catalog::Catalog::empty(cluster, td))
        }
        (None, None) => Err(vec![
            "either `catalog` (static config) or `controller` (config from the controller) is required".into(),
        ]),
    }
}
