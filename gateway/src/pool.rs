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
    /// A background reconnect is under way.
    reconnecting: AtomicBool,
    slot: tokio::sync::Mutex<Slot>,
}

#[derive(Default)]
pub struct Pool {
    slots: Mutex<HashMap<ClusterName, Arc<Cell>>>,
    metrics: crate::metrics::GatewayMetrics,
    dead_after: Duration,
}

/// Application close code for a connection declared dead by the watcher.
pub const CLOSE_SILENT: u32 = 2;
/// How often the watcher looks at a connection.
const WATCH_TICK: Duration = Duration::from_millis(100);

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
    /// `dead_after`: a peer that sent nothing for this long (keep-alives
    /// included) is declared dead and its connection closed, which is
    /// faster than waiting for the QUIC idle timeout.
    pub fn new(metrics: crate::metrics::GatewayMetrics, dead_after: Duration) -> Self {
        Self {
            slots: Mutex::default(),
            metrics,
            dead_after,
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
        if cell.down.load(Ordering::Relaxed) {
            // A peer known to be down is reconnected in the background:
            // streams fail over at once instead of waiting for a connect
            // that may take `connect_timeout`.
            if !cell.reconnecting.swap(true, Ordering::AcqRel) {
                drop(s);
                let (cell, endpoint, client, peer, metrics, dead_after) = (
                    cell.clone(),
                    endpoint.clone(),
                    client.clone(),
                    peer.clone(),
                    self.metrics.clone(),
                    self.dead_after,
                );
                tokio::spawn(async move {
                    let mut s = cell.slot.lock().await;
                    let r = connect(&endpoint, &client, &peer, connect_timeout).await;
                    let _ = settle(&cell, &mut s, r, &peer, &metrics, dead_after);
                    cell.reconnecting.store(false, Ordering::Release);
                });
            }
            return Err(PoolError::Down {
                cluster: peer.cluster.clone(),
            });
        }
        let r = connect(endpoint, client, peer, connect_timeout).await;
        settle(&cell, &mut s, r, peer, &self.metrics, self.dead_after)
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

/// Records a connect's outcome in the slot.
fn settle(
    cell: &Arc<Cell>,
    s: &mut Slot,
    r: Result<Connection, PoolError>,
    peer: &Peer,
    metrics: &crate::metrics::GatewayMetrics,
    dead_after: Duration,
) -> Result<Connection, PoolError> {
    match r {
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
                metrics.clone(),
                dead_after,
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

/// Publishes the connection's RTT until it closes; declares the peer dead
/// when nothing arrived from it for `dead_after` (keep-alives make a live
/// peer send several packets in that time); then marks the peer down.
async fn watch(
    cell: Arc<Cell>,
    conn: Connection,
    cluster: ClusterName,
    metrics: crate::metrics::GatewayMetrics,
    dead_after: Duration,
) {
    let labels = crate::metrics::PeerLabels {
        peer: cluster.to_string(),
    };
    metrics.peer_up.get_or_create(&labels).set(1);
    let mut tick = tokio::time::interval(WATCH_TICK);
    let mut seen = conn.stats().udp_rx.datagrams;
    let mut heard = Instant::now();
    let reason = loop {
        tokio::select! {
            r = conn.closed() => break r,
            _ = tick.tick() => {
                let stats = conn.stats();
                metrics.peer_rtt.get_or_create(&labels).set(stats.path.rtt.as_secs_f64());
                if stats.udp_rx.datagrams != seen {
                    seen = stats.udp_rx.datagrams;
                    heard = Instant::now();
                } else if heard.elapsed() >= dead_after {
                    tracing::warn!(peer = %cluster, silent = ?heard.elapsed(), "peer gateway silent; declaring it dead");
                    conn.close(CLOSE_SILENT.into(), b"peer silent");
                }
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
