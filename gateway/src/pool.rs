//! One QUIC connection per peer cluster, kept up by a supervisor task per
//! peer and shared by every tunneled stream to that cluster.
//!
//! The supervisor connects, watches the connection, and reconnects with
//! exponential backoff (200 ms doubling to 2 s, with jitter) whenever it
//! closes — whether or not any stream is waiting, so a repaired cluster is
//! back as soon as it answers. Liveness: keep-alives every
//! `limits.keep_alive`; a peer that sent nothing for
//! [`Limits::peer_dead_after`](fedmesh_transport::Limits::peer_dead_after)
//! (three keep-alives, 600 ms by default) is declared dead and its
//! connection closed, which fails its streams at once so callers go to
//! another cluster; the QUIC idle timeout is the backstop.
//!
//! Streams never wait for a reconnect to a peer known to be down: they get
//! [`PoolError::Down`] and the caller fails over. Only the very first
//! connect to a peer is waited for (up to `connect_timeout`).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use fedmesh_catalog::{ClusterName, Peer};
use quinn::{Connection, Endpoint};
use rustls::pki_types::CertificateDer;
use tokio::sync::Notify;
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::metrics::{GatewayMetrics, PeerLabels};

const BACKOFF_BASE: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(2);
/// A connection that closes sooner than this after it opened counts as a
/// failure (a peer that accepts and then refuses us must not spin us).
const MIN_HEALTHY: Duration = Duration::from_secs(1);
/// How often the watcher looks at a connection.
const WATCH_TICK: Duration = Duration::from_millis(100);

/// Application close code for connections we close on purpose.
pub const CLOSE_POLICY: u32 = 1;
/// Application close code for a connection declared dead by the watcher.
pub const CLOSE_SILENT: u32 = 2;

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PoolError {
    #[error("peer {cluster} is down ({last}); reconnecting in the background")]
    Down { cluster: ClusterName, last: String },
    #[error("connecting to peer {cluster} at {addr}: {reason}")]
    Connect {
        cluster: ClusterName,
        addr: std::net::SocketAddr,
        reason: String,
    },
    #[error("peer {cluster} presented {got}, expected {expected}")]
    WrongPeer {
        cluster: ClusterName,
        got: String,
        expected: String,
    },
    #[error("no connection to peer {cluster} within {waited:?}")]
    FirstConnect {
        cluster: ClusterName,
        waited: Duration,
    },
}

#[derive(Default)]
struct Cell {
    conn: Mutex<Option<Connection>>,
    /// The last connect failed or the connection died; cleared by a
    /// successful connect.
    down: AtomicBool,
    /// A connect result (either way) is known.
    settled: Notify,
    /// Why the peer is down, for the callers it turns away.
    last_error: Mutex<String>,
    /// A connection to this peer once stayed up for `MIN_HEALTHY`. Until
    /// then the peer is "starting" (its catalog may not list us yet), and
    /// streams wait for a reconnect instead of failing over at once.
    healthy_once: AtomicBool,
    /// The peer answered the last attempt (it refused us, or closed soon
    /// after the handshake) rather than staying silent: it is alive, maybe
    /// not ready for us yet.
    answered: AtomicBool,
    /// Wakes the supervisor out of its backoff.
    kick: Notify,
    supervisor: Mutex<Option<JoinHandle<()>>>,
}

impl Cell {
    fn down_error(&self, cluster: &ClusterName) -> PoolError {
        PoolError::Down {
            cluster: cluster.clone(),
            last: lock(&self.last_error).clone(),
        }
    }

    fn live(&self) -> Option<Connection> {
        lock(&self.conn)
            .as_ref()
            .filter(|c| c.close_reason().is_none())
            .cloned()
    }
}

struct Inner {
    cells: Mutex<HashMap<ClusterName, Arc<Cell>>>,
    /// The peers as the catalog names them; supervisors read their current
    /// address here and stop when their peer is gone.
    peers: Mutex<HashMap<ClusterName, Peer>>,
    endpoint: Endpoint,
    client: quinn::ClientConfig,
    connect_timeout: Duration,
    dead_after: Duration,
    metrics: GatewayMetrics,
}

pub struct Pool {
    inner: Arc<Inner>,
}

impl Drop for Pool {
    fn drop(&mut self) {
        for cell in lock(&self.inner.cells).values() {
            if let Some(t) = lock(&cell.supervisor).take() {
                t.abort();
            }
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    match m.lock() {
        Ok(g) => g,
        Err(p) => p.into_inner(),
    }
}

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
    /// included) is declared dead and its connection closed.
    pub fn new(
        endpoint: Endpoint,
        client: quinn::ClientConfig,
        metrics: GatewayMetrics,
        connect_timeout: Duration,
        dead_after: Duration,
    ) -> Self {
        Self {
            inner: Arc::new(Inner {
                cells: Mutex::default(),
                peers: Mutex::default(),
                endpoint,
                client,
                connect_timeout,
                dead_after,
                metrics,
            }),
        }
    }

    /// The catalog's peers: each gets a supervised connection (kept warm,
    /// so failing over to a cluster that took no traffic yet does not wait
    /// for a handshake); peers no longer listed lose theirs.
    pub fn set_peers<'a>(&self, peers: impl IntoIterator<Item = &'a Peer>) {
        let peers: HashMap<ClusterName, Peer> = peers
            .into_iter()
            .map(|p| (p.cluster.clone(), p.clone()))
            .collect();
        let gone: Vec<Arc<Cell>> = {
            let mut cells = lock(&self.inner.cells);
            let gone = cells
                .iter()
                .filter(|(c, _)| !peers.contains_key(*c))
                .map(|(_, cell)| cell.clone())
                .collect();
            cells.retain(|c, _| peers.contains_key(c));
            gone
        };
        for cell in gone {
            if let Some(t) = lock(&cell.supervisor).take() {
                t.abort();
            }
            if let Some(c) = lock(&cell.conn).take() {
                c.close(CLOSE_POLICY.into(), b"no longer a peer");
            }
        }
        let list: Vec<Peer> = peers.values().cloned().collect();
        *lock(&self.inner.peers) = peers;
        for p in &list {
            self.cell(p);
        }
    }

    /// Peers with a live connection right now.
    pub fn live_peers(&self) -> usize {
        lock(&self.inner.cells)
            .values()
            .filter(|c| c.live().is_some())
            .count()
    }

    /// The peer's cell, with its supervisor started.
    fn cell(&self, peer: &Peer) -> Arc<Cell> {
        lock(&self.inner.peers)
            .entry(peer.cluster.clone())
            .or_insert_with(|| peer.clone());
        let mut cells = lock(&self.inner.cells);
        if let Some(c) = cells.get(&peer.cluster) {
            return c.clone();
        }
        let cell = Arc::new(Cell::default());
        cells.insert(peer.cluster.clone(), cell.clone());
        let task = tokio::spawn(supervise(
            Arc::downgrade(&self.inner),
            cell.clone(),
            peer.cluster.clone(),
        ));
        *lock(&cell.supervisor) = Some(task);
        cell
    }

    /// The live connection to `peer`. Waits for a connect only while the
    /// peer has never been healthy; a peer that was up and went down turns
    /// streams away at once.
    pub async fn get(&self, peer: &Peer) -> Result<Connection, PoolError> {
        let cell = self.cell(peer);
        if let Some(c) = cell.live() {
            return Ok(c);
        }
        let starting =
            !cell.healthy_once.load(Ordering::Relaxed) && cell.answered.load(Ordering::Relaxed);
        if cell.down.load(Ordering::Relaxed) && !starting {
            return Err(cell.down_error(&peer.cluster));
        }
        let waited = self.inner.connect_timeout;
        let settled = cell.settled.notified();
        tokio::pin!(settled);
        settled.as_mut().enable();
        // The connect may have finished between the checks above.
        if let Some(c) = cell.live() {
            return Ok(c);
        }
        cell.kick.notify_one();
        if tokio::time::timeout(waited, settled).await.is_err() {
            return Err(PoolError::FirstConnect {
                cluster: peer.cluster.clone(),
                waited,
            });
        }
        cell.live().ok_or_else(|| cell.down_error(&peer.cluster))
    }

    /// A stream on `conn` failed at the connection level (for example our
    /// certificate was refused, which TLS 1.3 only reveals at the first
    /// stream operation): close it; the supervisor reconnects with backoff.
    pub fn failed(&self, cluster: &ClusterName, conn: &Connection) {
        let cell = lock(&self.inner.cells).get(cluster).cloned();
        if let Some(cell) = cell {
            cell.down.store(true, Ordering::Relaxed);
        }
        conn.close(CLOSE_POLICY.into(), b"connection failed");
    }
}

/// Keeps one connection to `cluster` up for as long as it is a peer.
async fn supervise(inner: Weak<Inner>, cell: Arc<Cell>, cluster: ClusterName) {
    let mut failures = 0u32;
    loop {
        let Some(strong) = inner.upgrade() else {
            return;
        };
        let Some(peer) = lock(&strong.peers).get(&cluster).cloned() else {
            return;
        };
        let (endpoint, client, timeout, dead_after, metrics) = (
            strong.endpoint.clone(),
            strong.client.clone(),
            strong.connect_timeout,
            strong.dead_after,
            strong.metrics.clone(),
        );
        drop(strong);
        match connect(&endpoint, &client, &peer, timeout).await {
            Ok(c) => {
                tracing::info!(peer = %peer.cluster, addr = %peer.address, "connected to peer gateway");
                *lock(&cell.conn) = Some(c.clone());
                cell.down.store(false, Ordering::Relaxed);
                cell.settled.notify_waiters();
                let opened = Instant::now();
                watch(&cell, &c, &cluster, &metrics, dead_after).await;
                if opened.elapsed() < MIN_HEALTHY {
                    cell.answered.store(true, Ordering::Relaxed);
                    failures = failures.saturating_add(1);
                    pause(&cell, backoff(failures)).await;
                } else {
                    failures = 0;
                }
            }
            Err(e) => {
                // A timeout is silence; anything else came from the peer.
                let silent = matches!(&e, PoolError::Connect { reason, .. } if reason.starts_with("timed out"));
                cell.answered.store(!silent, Ordering::Relaxed);
                *lock(&cell.last_error) = e.to_string();
                cell.down.store(true, Ordering::Relaxed);
                cell.settled.notify_waiters();
                failures = failures.saturating_add(1);
                tracing::warn!(error = %e, failures, "peer connect failed");
                pause(&cell, backoff(failures)).await;
            }
        }
    }
}

/// Backs off, unless a stream for a peer that was never healthy asks for
/// a connection now.
async fn pause(cell: &Cell, d: Duration) {
    if cell.healthy_once.load(Ordering::Relaxed) {
        tokio::time::sleep(d).await;
    } else {
        tokio::select! {
            _ = tokio::time::sleep(d) => {}
            _ = cell.kick.notified() => {}
        }
    }
}

/// Publishes the connection's RTT until it closes; declares the peer dead
/// when nothing arrived from it for `dead_after` (keep-alives make a live
/// peer send several packets in that time); then marks the peer down.
async fn watch(
    cell: &Cell,
    conn: &Connection,
    cluster: &ClusterName,
    metrics: &GatewayMetrics,
    dead_after: Duration,
) {
    let labels = PeerLabels {
        peer: cluster.to_string(),
    };
    metrics.peer_up.get_or_create(&labels).set(1);
    let mut tick = tokio::time::interval(WATCH_TICK);
    let mut seen = conn.stats().udp_rx.datagrams;
    let opened = Instant::now();
    let mut heard = opened;
    let reason = loop {
        tokio::select! {
            r = conn.closed() => break r,
            _ = tick.tick() => {
                let stats = conn.stats();
                if opened.elapsed() >= MIN_HEALTHY {
                    cell.healthy_once.store(true, Ordering::Relaxed);
                }
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
    *lock(&cell.last_error) = format!("connection closed: {reason}");
    cell.down.store(true, Ordering::Relaxed);
    metrics.peer_up.get_or_create(&labels).set(0);
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
