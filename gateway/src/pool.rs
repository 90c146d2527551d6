//! One QUIC connection per peer cluster, reused by every tunneled stream,
//! reconnected on demand with exponential backoff after failures.
//!
//! Liveness comes from QUIC itself: keep-alives every `limits.keep_alive`
//! and an idle timeout of `limits.idle_timeout` (1 s by default) close a
//! connection to a silent peer. A watcher per connection marks the peer
//! down the moment that happens, so streams for it fail at once (and the
//! caller tries another cluster) instead of queueing behind a reconnect
//! that may take `connect_timeout`.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use fedmesh_catalog::{ClusterName, Peer};
use quinn::{Connection, Endpoint};
use rustls::pki_types::CertificateDer;
use tokio::time::Instant;

const BACKOFF_BASE: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PoolError {
    #[error("peer {cluster} is backing off for {left:?} after {failures} failures")]
    Backoff {
        cluster: ClusterName,
        left: Duration,
        failures: u32,
    },
    #[error("connecting to peer {cluster} at {addr}: {reason}")]
    Connect {
        cluster: ClusterName,
        addr: std::net::SocketAddr,
        reason: String,
    },
    #[error("peer {cluster} is down and a reconnect is under way")]
    Down { cluster: ClusterName },
    #[error("peer {cluster} presented {got}, expected {expected}")]
    WrongPeer {
        cluster: ClusterName,
        got: String,
        expected: String,
    },
}

#[derive(Default)]
struct Slot {
    conn: Option<Connection>,
    failures: u32,
    retry_at: Option<Instant>,
}

#[derive(Default)]
struct Cell {
    /// Set when the connection died or a connect failed; cleared by a
    /// successful connect. Read without the lock.
    down: AtomicBool,
    slot: tokio::sync::Mutex<Slot>,
}

#[derive(Default)]
pub struct Pool {
    slots: Mutex<HashMap<ClusterName, Arc<Cell>>>,
    metrics: crate::metrics::GatewayMetrics,
}

/// Application close code for connections we close on purpose.
pub const CLOSE_POLICY: u32 = 1;

fn backoff(failures: u32) -> Duration {
    let exp = BACKOFF_BASE.saturating_mul(1u32 << failures.min(10));
    let capped = exp.min(BACKOFF_MAX);
    // Up to 25% jitter so peers that failed together do not retry together.
    let jitter = capped.mul_f64(rand::random::<f64>() * 0.25);
    capped + jitter
}

/// The verified SPIFFE ID of a QUIC connection's peer.
pub fn peer_id(conn: &Connection) -> Option<fedmesh_trust::SpiffeId> {
    let any = conn.peer_identity()?;
    let certs = any.downcast::<Vec<CertificateDer<'static>>>().ok()?;
    fedmesh_trust::peer_id(Some(&certs))
}

impl Pool {
    pub fn new(metrics: crate::metrics::GatewayMetrics) -> Self {
        Self {
            slots: Mutex::default(),
            metrics,
        }
    }

    fn slot(&self, cluster: &ClusterName) -> Arc<Cell> {
        let mut slots = match self.slots.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        };
        slots.entry(cluster.clone()).or_default().clone()
    }

    /// The live connection to `peer`, connecting if there is none. Callers
    /// for the same peer wait for one connect instead of racing.
    pub async fn get(
        &self,
        endpoint: &Endpoint,
        client: &quinn::ClientConfig,
        peer: &Peer,
        connect_timeout: Duration,
    ) -> Result<Connection, PoolError> {
        let cell = self.slot(&peer.cluster);
        let mut s = match cell.slot.try_lock() {
            Ok(s) => s,
            // Someone is reconnecting to a peer that just died: fail now so
            // the caller can try another cluster.
            Err(_) if cell.down.load(Ordering::Relaxed) => {
                return Err(PoolError::Down {
                    cluster: peer.cluster.clone(),
                })
            }
            Err(_) => cell.slot.lock().await,
        };
        if let Some(c) = &s.conn {
            if c.close_reason().is_none() {
                return Ok(c.clone());
            }
            s.conn = None;
            // It died under us: count it, so a dead peer backs off.
            s.failures = s.failures.saturating_add(1);
            s.retry_at = Some(Instant::now() + backoff(s.failures));
        }
        if let Some(at) = s.retry_at {
            let now = Instant::now();
            if now < at {
                return Err(PoolError::Backoff {
                    cluster: peer.cluster.clone(),
                    left: at - now,
                    failures: s.failures,
                });
            }
        }
        match connect(endpoint, client, peer, connect_timeout).await {
            Ok(c) => {
                tracing::info!(peer = %peer.cluster, addr = %peer.address, "connected to peer gateway");
                s.failures = 0;
                s.retry_at = None;
                s.conn = Some(c.clone());
                cell.down.store(false, Ordering::Relaxed);
                tokio::spawn(watch(
                    cell.clone(),
                    c.clone(),
                    peer.cluster.clone(),
                    self.metrics.clone(),
                ));
                Ok(c)
            }
            Err(e) => {
                cell.down.store(true, Ordering::Relaxed);
                s.failures = s.failures.saturating_add(1);
                s.retry_at = Some(Instant::now() + backoff(s.failures));
                tracing::warn!(error = %e, failures = s.failures, "peer connect failed");
                Err(e)
            }
        }
    }

    /// Called when a stream on a pooled connection failed at the connection
    /// level (for example our certificate was refused, which TLS 1.3 only
    /// reveals at the first stream operation): drop it and back off.
    pub async fn failed(&self, cluster: &ClusterName, conn: &Connection) {
        let cell = self.slot(cluster);
        cell.down.store(true, Ordering::Relaxed);
        let mut s = cell.slot.lock().await;
        if s.conn
            .as_ref()
            .is_some_and(|c| c.stable_id() == conn.stable_id())
        {
            s.conn = None;
            s.failures = s.failures.saturating_add(1);
            s.retry_at = Some(Instant::now() + backoff(s.failures));
        }
    }
}

/// Publishes the connection's RTT until it closes, then marks the peer down.
async fn watch(
    cell: Arc<Cell>,
    conn: Connection,
    cluster: ClusterName,
    metrics: crate::metrics::GatewayMetrics,
) {
    let labels = crate::metrics::PeerLabels {
        peer: cluster.to_string(),
    };
    metrics.peer_up.get_or_create(&labels).set(1);
    let mut tick = tokio::time::interval(Duration::from_millis(500));
    let reason = loop {
        tokio::select! {
            r = conn.closed() => break r,
            _ = tick.tick() => {
                metrics.peer_rtt.get_or_create(&labels).set(conn.rtt().as_secs_f64());
            }
        }
    };
    // A newer connection may already have replaced this one.
    let current = cell
        .slot
        .try_lock()
        .map(|s| s.conn.as_ref().map(|c| c.stable_id()))
        .unwrap_or(None);
    if current.is_none() || current == Some(conn.stable_id()) {
        cell.down.store(true, Ordering::Relaxed);
        metrics.peer_up.get_or_create(&labels).set(0);
    }
    tracing::warn!(peer = %cluster, %reason, "connection to peer gateway closed");
}

async fn connect(
    endpoint: &Endpoint,
    client: &quinn::ClientConfig,
    peer: &Peer,
    limit: Duration,
) -> Result<Connection, PoolError> {
    let err = |reason: String| PoolError::Connect {
        cluster: peer.cluster.clone(),
        addr: peer.address,
        reason,
    };
    let connecting = endpoint
        .connect_with(client.clone(), peer.address, "fedmesh.invalid")
        .map_err(|e| err(e.to_string()))?;
    let conn = tokio::time::timeout(limit, connecting)
        .await
        .map_err(|_| err(format!("timed out after {limit:?}")))?
        .map_err(|e| err(e.to_string()))?;
    let got = peer_id(&conn);
    if got.as_ref() != Some(&peer.identity) {
        conn.close(CLOSE_POLICY.into(), b"unexpected peer identity");
        return Err(PoolError::WrongPeer {
            cluster: peer.cluster.clone(),
            got: got
                .map(|g| g.to_string())
                .unwrap_or_else(|| "no SPIFFE ID".into()),
            expected: peer.identity.to_string(),
        });
    }
    Ok(conn)
}
