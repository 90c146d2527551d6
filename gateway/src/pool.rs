//! One connection per peer cluster, kept up by a supervisor task per peer
//! and shared by every tunneled stream to that cluster: QUIC, or the TCP
//! fallback ([`crate::tcp`]) when UDP does not get through.
//!
//! Transport choice: QUIC first. When a QUIC connect meets silence (a
//! timeout, not a refusal) and the peer offers a fallback address, the
//! supervisor dials TCP and remembers that this peer needs it: reconnects
//! go to TCP first, and every `limits.quic_retry_interval` one QUIC
//! handshake is tried in the background; when it succeeds, new streams move
//! to QUIC and the TCP connection ends once its streams have.
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
//!
//! One QUIC connection per gateway pair: of two clusters, the one whose
//! name sorts first dials ([`dials`]) and serves the other's streams on
//! that connection too; the other adopts the accepted connection for its
//! own streams. It dials itself only when no connection from the peer
//! arrived within [`ADOPT_GRACE`] (the peer may not list us yet, or be
//! down), and folds that connection away as soon as the peer's arrives:
//! new streams move over at once, the old connection closes when the
//! streams it carries have ended.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use fedmesh_catalog::{ClusterName, Peer};
use fedmesh_transport::Limits;
use quinn::{Connection, Endpoint};
use rustls::pki_types::CertificateDer;
use tokio::sync::Notify;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_rustls::TlsConnector;

use crate::metrics::{GatewayMetrics, PeerLabels};
use crate::tcp::TcpConn;
pub use crate::transport::Transport;

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
/// Application close code for our own dial, folded into the pair's one
/// connection (the peer's dial) once its streams ended.
pub const CLOSE_FOLDED: u32 = 3;

/// How long the gateway that does not dial ([`dials`]) waits for the
/// peer's connection before dialing itself: a few handshakes' worth, so a
/// peer that does not list us yet (or is down) costs little.
pub const ADOPT_GRACE: Duration = Duration::from_millis(500);
/// A folded connection carrying long-lived streams is closed after this
/// even if they have not ended (bounds how long a pair holds two).
const DRAIN_MAX: Duration = Duration::from_secs(300);

/// Whether `local` dials `peer` for the pair's one QUIC connection. Both
/// sides compute the same answer from the two names alone.
pub fn dials(local: &ClusterName, peer: &ClusterName) -> bool {
    local.as_str() < peer.as_str()
}

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
    /// Nothing came back: the path may drop UDP (or the peer is gone).
    #[error("connecting to peer {cluster} at {addr}: no answer within {waited:?}{}", .fallback.as_deref().map(|f| format!("; {f}")).unwrap_or_default())]
    Silent {
        cluster: ClusterName,
        addr: std::net::SocketAddr,
        waited: Duration,
        /// Why the TCP fallback did not work either, when it was tried.
        fallback: Option<String>,
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

/// A connection to a peer gateway over either transport.
#[derive(Clone)]
pub enum PeerConn {
    Quic(QuicPeer),
    Tcp(TcpConn),
}

/// A QUIC connection to a peer and a count of the tunnel streams this
/// gateway opened on it, so a connection folded away closes only once
/// they are done.
#[derive(Clone)]
pub struct QuicPeer {
    pub conn: Connection,
    /// The peer dialed it and we adopted it ([`dials`]).
    pub adopted: bool,
    streams: Arc<Streams>,
}

/// Tunnel streams open on one connection; `idle` fires when the last ends.
#[derive(Default)]
struct Streams {
    open: AtomicUsize,
    idle: Notify,
}

impl QuicPeer {
    /// A connection this gateway dialed.
    pub fn dialed(conn: Connection) -> Self {
        Self {
            conn,
            adopted: false,
            streams: Arc::default(),
        }
    }

    /// The peer's dial, used for our streams too.
    pub fn adopted(conn: Connection) -> Self {
        Self {
            adopted: true,
            ..Self::dialed(conn)
        }
    }

    /// Counts a stream opened on this connection until the guard drops.
    pub fn open_stream(&self) -> OpenStream {
        self.streams.open.fetch_add(1, Ordering::Relaxed);
        OpenStream(self.streams.clone())
    }
}

/// A stream counted as open on its connection until dropped.
pub struct OpenStream(Arc<Streams>);

/// A connection handed to one stream. On QUIC the stream is counted from
/// the hand-out (not from when `open_bi` returns, which can wait for the
/// peer's stream cap): a drain that starts after it waits for it.
pub struct Leased {
    pub conn: PeerConn,
    lease: Option<OpenStream>,
}

impl Leased {
    pub fn into_parts(self) -> (PeerConn, Option<OpenStream>) {
        (self.conn, self.lease)
    }
}

impl Drop for OpenStream {
    fn drop(&mut self) {
        if self.0.open.fetch_sub(1, Ordering::AcqRel) == 1 {
            // notify_one keeps a permit, so a drain that checks the count
            // and then waits cannot miss this.
            self.0.idle.notify_one();
        }
    }
}

/// Ends a connection we no longer hand out (folded away, or dialed to an
/// address the peer no longer has) once the streams we opened on it are
/// done (or [`DRAIN_MAX`] passed). It lingers a few round trips more to
/// give their last bytes time to be acknowledged, since a QUIC close
/// abandons unacknowledged data; this is a heuristic, not a guarantee.
async fn drain(q: QuicPeer, code: u32, reason: &'static [u8]) {
    let deadline = Instant::now() + DRAIN_MAX;
    while q.streams.open.load(Ordering::Acquire) > 0 {
        tokio::select! {
            _ = q.streams.idle.notified() => {}
            _ = q.conn.closed() => return,
            _ = tokio::time::sleep_until(deadline) => break,
        }
    }
    let linger = (q.conn.rtt() * 4).max(Duration::from_millis(100));
    tokio::time::sleep(linger).await;
    q.conn.close(code.into(), reason);
}

impl PeerConn {
    pub fn transport(&self) -> Transport {
        match self {
            Self::Quic(_) => Transport::Quic,
            Self::Tcp(_) => Transport::Tcp,
        }
    }

    pub fn is_open(&self) -> bool {
        match self {
            Self::Quic(q) => q.conn.close_reason().is_none(),
            Self::Tcp(t) => t.is_open(),
        }
    }

    /// Ends the connection now, streams included.
    fn close(&self, reason: &'static [u8]) {
        match self {
            Self::Quic(q) => q.conn.close(CLOSE_POLICY.into(), reason),
            Self::Tcp(t) => t.close(),
        }
    }
}

/// One row of the gateway's `/status`: how a peer is reached.
#[derive(Debug, Clone, serde::Serialize)]
pub struct PeerStatus {
    pub cluster: String,
    pub address: std::net::SocketAddr,
    pub tcp_address: Option<std::net::SocketAddr>,
    /// `quic`, `tcp`, or `down`.
    pub transport: &'static str,
    /// Who dialed the connection in use: `us`, or `peer` when this gateway
    /// adopted the peer's QUIC dial (one connection per pair).
    pub dialed_by: Option<&'static str>,
    /// Seconds since the current connection opened.
    pub connected_for_s: Option<f64>,
    /// This peer's UDP path failed and TCP worked: reconnects try TCP
    /// first and QUIC is retried in the background.
    pub udp_blocked: bool,
    pub last_error: String,
}

#[derive(Default)]
struct Cell {
    conn: Mutex<Option<PeerConn>>,
    /// When the current connection opened.
    opened: Mutex<Option<Instant>>,
    /// QUIC met silence and the TCP fallback worked; cleared when a QUIC
    /// handshake succeeds again.
    prefer_tcp: AtomicBool,
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
    /// The peer's dial, accepted and waiting to become this pair's
    /// connection (only when the peer is the one that [`dials`]).
    adopted: Mutex<Option<Connection>>,
    adopted_ready: Notify,
    supervisor: Mutex<Option<JoinHandle<()>>>,
}

impl Cell {
    fn down_error(&self, cluster: &ClusterName) -> PoolError {
        PoolError::Down {
            cluster: cluster.clone(),
            last: lock(&self.last_error).clone(),
        }
    }

    fn live(&self) -> Option<PeerConn> {
        lock(&self.conn).as_ref().filter(|c| c.is_open()).cloned()
    }

    /// The live connection, leased to one stream. Taken under the same
    /// lock a replacement is installed under, so a lease on the old
    /// connection happens before its drain starts and the drain sees it.
    fn lease(&self) -> Option<Leased> {
        let g = lock(&self.conn);
        let conn = g.as_ref().filter(|c| c.is_open())?.clone();
        let lease = match &conn {
            PeerConn::Quic(q) => Some(q.open_stream()),
            PeerConn::Tcp(_) => None,
        };
        Some(Leased { conn, lease })
    }

    fn take_adopted(&self) -> Option<Connection> {
        lock(&self.adopted)
            .take()
            .filter(|c| c.close_reason().is_none())
    }

    /// The peer's dial, waiting up to `grace` for it to arrive.
    async fn adopted_within(&self, grace: Duration) -> Option<Connection> {
        if let Some(c) = self.take_adopted() {
            return Some(c);
        }
        tokio::time::timeout(grace, async {
            loop {
                self.adopted_ready.notified().await;
                if let Some(c) = self.take_adopted() {
                    return c;
                }
            }
        })
        .await
        .ok()
    }
}

/// Serves the peer's streams on a connection this gateway dialed.
pub type ServeDialed = Arc<dyn Fn(Connection, Peer) + Send + Sync>;

struct Inner {
    cells: Mutex<HashMap<ClusterName, Arc<Cell>>>,
    /// The peers as the catalog names them; supervisors read their current
    /// address here and stop when their peer is gone.
    peers: Mutex<HashMap<ClusterName, Peer>>,
    dialer: Dialer,
    serve_dialed: ServeDialed,
}

/// What a supervisor needs to dial a peer over either transport.
#[derive(Clone)]
pub struct Dialer {
    /// This gateway's cluster, for the pair's tie-break ([`dials`]).
    pub local: ClusterName,
    pub endpoint: Endpoint,
    pub quic: quinn::ClientConfig,
    /// TLS for the TCP fallback (ALPN `fedmesh-h2/1`).
    pub tcp: TlsConnector,
    /// The gateway's own address, to dial TCP from.
    pub from: Option<IpAddr>,
    pub limits: Limits,
    pub metrics: GatewayMetrics,
    /// Faults announced by a drill: what they cause is logged at debug.
    pub announced: fedmesh_transport::Announced,
}

impl Dialer {
    fn expects_trouble(&self, peer: &ClusterName) -> bool {
        self.announced.expects(self.local.as_str(), peer.as_str())
    }

    fn dead_after(&self) -> Duration {
        self.limits.peer_dead_after()
    }

    async fn quic(&self, peer: &Peer) -> Result<Connection, PoolError> {
        connect(
            &self.endpoint,
            &self.quic,
            peer,
            self.limits.connect_timeout,
        )
        .await
    }

    async fn tcp(&self, peer: &Peer) -> Result<Option<TcpConn>, String> {
        let Some(addr) = peer.tcp_address else {
            return Ok(None);
        };
        crate::tcp::connect(peer, addr, self.from, &self.tcp, &self.limits)
            .await
            .map(Some)
            .map_err(|e| format!("TCP fallback {addr}: {e}"))
    }

    /// A connection to `peer` by the transport it is known to need: QUIC
    /// first unless its UDP path was found blocked; TCP when QUIC meets
    /// silence and the peer offers it.
    async fn establish(&self, cell: &Cell, peer: &Peer) -> Result<PeerConn, PoolError> {
        if cell.prefer_tcp.load(Ordering::Relaxed) {
            match self.tcp(peer).await {
                Ok(Some(t)) => return Ok(PeerConn::Tcp(t)),
                // The TCP path broke too; next time start again from QUIC.
                Ok(None) | Err(_) => cell.prefer_tcp.store(false, Ordering::Relaxed),
            }
        }
        let e = match self.quic(peer).await {
            Ok(c) => return Ok(PeerConn::Quic(QuicPeer::dialed(c))),
            Err(e @ PoolError::Silent { .. }) => e,
            Err(e) => return Err(e),
        };
        match self.tcp(peer).await {
            Ok(Some(t)) => {
                tracing::warn!(peer = %peer.cluster, quic = %e, "no answer over UDP; using the TCP fallback and retrying QUIC in the background");
                cell.prefer_tcp.store(true, Ordering::Relaxed);
                self.metrics.fallback(peer.cluster.as_str());
                Ok(PeerConn::Tcp(t))
            }
            Ok(None) => Err(e),
            Err(t) => {
                let mut e = e;
                if let PoolError::Silent { fallback, .. } = &mut e {
                    *fallback = Some(t);
                }
                Err(e)
            }
        }
    }
}

pub struct Pool {
    inner: Arc<Inner>,
}

impl Drop for Pool {
    fn drop(&mut self) {
        self.close_all();
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
    /// A peer that sent nothing for `dialer.limits.peer_dead_after()`
    /// (keep-alives included) is declared dead and its connection closed.
    /// `serve_dialed` serves the peer's streams on a connection this
    /// gateway dialed (the pair shares that one connection); taken here so
    /// no connection can be dialed before it is known.
    pub fn new(dialer: Dialer, serve_dialed: ServeDialed) -> Self {
        Self {
            inner: Arc::new(Inner {
                cells: Mutex::default(),
                peers: Mutex::default(),
                dialer,
                serve_dialed,
            }),
        }
    }

    /// A QUIC connection the peer dialed and we accepted (and identified):
    /// when the peer is the one that [`dials`], it becomes the pair's
    /// connection for our streams too, replacing any we dialed ourselves.
    pub fn adopt(&self, peer: &Peer, conn: &Connection) {
        if dials(&self.inner.dialer.local, &peer.cluster) {
            return;
        }
        // The accept path knows the peer from the catalog, which can reach
        // it before `set_peers` does: the cell is made here then, not
        // skipped (a dial dropped here would never be adopted, and the
        // pair would keep two connections).
        let cell = self.cell(peer);
        *lock(&cell.adopted) = Some(conn.clone());
        cell.adopted_ready.notify_one();
    }

    /// Stops every supervisor and ends every connection at once.
    pub fn close_all(&self) {
        for cell in lock(&self.inner.cells).values() {
            if let Some(t) = lock(&cell.supervisor).take() {
                t.abort();
            }
            if let Some(c) = lock(&cell.conn).take() {
                c.close(b"gateway shutting down");
            }
        }
    }

    /// How each peer is reached, for `/status`.
    pub fn status(&self) -> Vec<PeerStatus> {
        let peers = lock(&self.inner.peers).clone();
        let cells = lock(&self.inner.cells).clone();
        let mut rows: Vec<PeerStatus> = peers
            .values()
            .map(|p| {
                let cell = cells.get(&p.cluster);
                let live = cell.and_then(|c| c.live());
                PeerStatus {
                    cluster: p.cluster.to_string(),
                    address: p.address,
                    tcp_address: p.tcp_address,
                    transport: live.as_ref().map_or("down", |c| c.transport().as_str()),
                    dialed_by: live.as_ref().map(|c| match c {
                        PeerConn::Quic(q) if q.adopted => "peer",
                        _ => "us",
                    }),
                    connected_for_s: live.and_then(|_| {
                        cell.and_then(|c| *lock(&c.opened))
                            .map(|t| t.elapsed().as_secs_f64())
                    }),
                    udp_blocked: cell.is_some_and(|c| c.prefer_tcp.load(Ordering::Relaxed)),
                    last_error: cell
                        .map(|c| lock(&c.last_error).clone())
                        .unwrap_or_default(),
                }
            })
            .collect();
        rows.sort_by(|a, b| a.cluster.cmp(&b.cluster));
        rows
    }

    /// The catalog's peers: each gets a supervised connection (kept warm,
    /// so failing over to a cluster that took no traffic yet does not wait
    /// for a handshake); peers no longer listed lose theirs.
    pub fn set_peers<'a>(&self, peers: impl IntoIterator<Item = &'a Peer>) {
        let peers: HashMap<ClusterName, Peer> = peers
            .into_iter()
            .map(|p| (p.cluster.clone(), p.clone()))
            .collect();
        // A peer that is gone, or whose addresses or identity changed,
        // loses its supervisor (a changed one gets a new one below).
        let gone: Vec<(ClusterName, Arc<Cell>)> = {
            let old = lock(&self.inner.peers).clone();
            let same = |a: &Peer, b: &Peer| {
                (a.address, a.tcp_address, &a.identity) == (b.address, b.tcp_address, &b.identity)
            };
            let keep = |c: &ClusterName| {
                peers
                    .get(c)
                    .zip(old.get(c))
                    .is_some_and(|(new, old)| same(new, old))
            };
            let mut cells = lock(&self.inner.cells);
            let gone = cells
                .iter()
                .filter(|(c, _)| !keep(c))
                .map(|(c, cell)| (c.clone(), cell.clone()))
                .collect();
            cells.retain(|c, _| keep(c));
            gone
        };
        for (_, cell) in &gone {
            if let Some(t) = lock(&cell.supervisor).take() {
                t.abort();
            }
        }
        *lock(&self.inner.peers) = peers.clone();
        for p in peers.values() {
            self.cell(p);
        }
        for (cluster, old) in gone {
            let conn = lock(&old.conn).take();
            // Only the side that does not dial ever holds the peer's dial.
            let waiting = old.take_adopted();
            let Some(new) = peers.get(&cluster).map(|p| self.cell(p)) else {
                // Removed from the catalog: nothing of it stays.
                if let Some(c) = conn {
                    c.close(b"peer removed");
                }
                if let Some(c) = waiting {
                    c.close(CLOSE_POLICY.into(), b"peer removed");
                }
                continue;
            };
            // Changed: the peer's own dial does not depend on what we
            // think its address is, so the new supervisor adopts it (its
            // streams live on); our dial to the old address ends once its
            // streams have.
            let adopt = match conn {
                Some(PeerConn::Quic(q)) if q.adopted => Some(q.conn),
                Some(PeerConn::Quic(q)) => {
                    tokio::spawn(drain(q, CLOSE_POLICY, b"peer address changed"));
                    waiting
                }
                Some(c @ PeerConn::Tcp(_)) => {
                    c.close(b"peer address changed");
                    waiting
                }
                None => waiting,
            };
            if let Some(c) = adopt {
                *lock(&new.adopted) = Some(c);
                new.adopted_ready.notify_one();
            }
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
    pub async fn get(&self, peer: &Peer) -> Result<Leased, PoolError> {
        let cell = self.cell(peer);
        if let Some(c) = cell.lease() {
            return Ok(c);
        }
        let starting =
            !cell.healthy_once.load(Ordering::Relaxed) && cell.answered.load(Ordering::Relaxed);
        if cell.down.load(Ordering::Relaxed) && !starting {
            return Err(cell.down_error(&peer.cluster));
        }
        // A first connect may take a QUIC timeout and then a TCP one.
        let waited = self.inner.dialer.limits.connect_timeout * 2;
        let settled = cell.settled.notified();
        tokio::pin!(settled);
        settled.as_mut().enable();
        // The connect may have finished between the checks above.
        if let Some(c) = cell.lease() {
            return Ok(c);
        }
        cell.kick.notify_one();
        if tokio::time::timeout(waited, settled).await.is_err() {
            return Err(PoolError::FirstConnect {
                cluster: peer.cluster.clone(),
                waited,
            });
        }
        cell.lease().ok_or_else(|| cell.down_error(&peer.cluster))
    }

    /// A stream on `conn` failed at the connection level (for example our
    /// certificate was refused, which TLS 1.3 only reveals at the first
    /// stream operation): close it; the supervisor reconnects with backoff.
    pub fn failed(&self, cluster: &ClusterName, conn: &PeerConn) {
        let cell = lock(&self.inner.cells).get(cluster).cloned();
        if let Some(cell) = cell {
            cell.down.store(true, Ordering::Relaxed);
        }
        conn.close(b"connection failed");
    }
}

/// Keeps one connection to `cluster` up for as long as it is a peer.
async fn supervise(inner: Weak<Inner>, cell: Arc<Cell>, cluster: ClusterName) {
    let mut failures = 0u32;
    // A QUIC connection that replaced a TCP fallback one, to install next.
    let mut next: Option<PeerConn> = None;
    loop {
        let Some(strong) = inner.upgrade() else {
            return;
        };
        let Some(peer) = lock(&strong.peers).get(&cluster).cloned() else {
            return;
        };
        let dialer = strong.dialer.clone();
        let serve_dialed = strong.serve_dialed.clone();
        drop(strong);
        let we_dial = dials(&dialer.local, &peer.cluster);
        let result = match next.take() {
            Some(c) => Ok(c),
            None => {
                // Over QUIC the pair shares the connection the peer dials;
                // a peer known to need TCP is dialed at once.
                let grace = if we_dial || cell.prefer_tcp.load(Ordering::Relaxed) {
                    Duration::ZERO
                } else {
                    ADOPT_GRACE
                };
                match cell.adopted_within(grace).await {
                    Some(c) => Ok(PeerConn::Quic(QuicPeer::adopted(c))),
                    None => dialer.establish(&cell, &peer).await,
                }
            }
        };
        match result {
            Ok(c) => {
                let transport = c.transport().as_str();
                tracing::info!(peer = %peer.cluster, addr = %peer.address, transport, "connected to peer gateway");
                if let (PeerConn::Quic(q), true) = (&c, we_dial) {
                    serve_dialed(q.conn.clone(), peer.clone());
                }
                let opened = Instant::now();
                *lock(&cell.conn) = Some(c.clone());
                *lock(&cell.opened) = Some(opened);
                cell.down.store(false, Ordering::Relaxed);
                cell.settled.notify_waiters();
                match watch(&cell, &c, &peer, &dialer).await {
                    Watched::Replaced(q) => {
                        failures = 0;
                        // Installed before the old one drains: from here
                        // no stream is handed the old connection, and every
                        // one handed it before holds a lease its drain sees.
                        *lock(&cell.conn) = Some(q.clone());
                        next = Some(q);
                        if let PeerConn::Quic(old) = c {
                            tokio::spawn(drain(
                                old,
                                CLOSE_FOLDED,
                                b"folded into the pair's connection",
                            ));
                        }
                    }
                    Watched::Closed if opened.elapsed() < MIN_HEALTHY => {
                        cell.answered.store(true, Ordering::Relaxed);
                        failures = failures.saturating_add(1);
                        pause(&cell, backoff(failures)).await;
                    }
                    Watched::Closed => failures = 0,
                }
            }
            Err(e) => {
                // A timeout is silence; anything else came from the peer.
                cell.answered
                    .store(!matches!(e, PoolError::Silent { .. }), Ordering::Relaxed);
                *lock(&cell.last_error) = e.to_string();
                cell.down.store(true, Ordering::Relaxed);
                cell.settled.notify_waiters();
                failures = failures.saturating_add(1);
                // Once per outage; the retries that follow are debug.
                fedmesh_transport::warn_unless_announced!(
                    failures > 1 || dialer.expects_trouble(&peer.cluster),
                    error = %e, failures, "peer connect failed"
                );
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

enum Watched {
    Closed,
    /// QUIC works again and replaces the TCP fallback, or the peer's dial
    /// replaces ours.
    Replaced(PeerConn),
}

/// Watches a connection until it closes. QUIC: publishes its RTT and
/// declares the peer dead when nothing arrived for `dead_after` (keep-alives
/// make a live peer send several packets in that time). TCP fallback:
/// hyper's pings do the same; meanwhile QUIC is retried every
/// `quic_retry_interval`, and a QUIC connection that comes up replaces it.
async fn watch(cell: &Cell, conn: &PeerConn, peer: &Peer, dialer: &Dialer) -> Watched {
    let cluster = &peer.cluster;
    let metrics = &dialer.metrics;
    let labels = PeerLabels {
        peer: cluster.to_string(),
    };
    metrics.peer_up.get_or_create(&labels).set(1);
    let transport = conn.transport();
    metrics.set_transport(cluster.as_str(), Some(transport));
    let mut tick = tokio::time::interval(WATCH_TICK);
    let opened = Instant::now();
    let outcome = match conn {
        PeerConn::Quic(q) => {
            let conn = &q.conn;
            let mut seen = conn.stats().udp_rx.datagrams;
            let mut heard = opened;
            let reason = loop {
                tokio::select! {
                    r = conn.closed() => break r,
                    _ = cell.adopted_ready.notified() => {
                        if let Some(theirs) = cell.take_adopted() {
                            tracing::info!(peer = %cluster, "the peer's dial replaces ours: one connection per gateway pair");
                            return Watched::Replaced(PeerConn::Quic(QuicPeer::adopted(theirs)));
                        }
                    }
                    _ = tick.tick() => {
                        let stats = conn.stats();
                        if opened.elapsed() >= MIN_HEALTHY {
                            cell.healthy_once.store(true, Ordering::Relaxed);
                        }
                        metrics.peer_rtt.get_or_create(&labels).set(stats.path.rtt.as_secs_f64());
                        if stats.udp_rx.datagrams != seen {
                            seen = stats.udp_rx.datagrams;
                            heard = Instant::now();
                        } else if heard.elapsed() >= dialer.dead_after() {
                            fedmesh_transport::warn_unless_announced!(
                                dialer.expects_trouble(cluster),
                                peer = %cluster, silent = ?heard.elapsed(), "peer gateway silent; declaring it dead"
                            );
                            conn.close(CLOSE_SILENT.into(), b"peer silent");
                        }
                    }
                }
            };
            *lock(&cell.last_error) = format!("QUIC connection closed: {reason}");
            Watched::Closed
        }
        PeerConn::Tcp(tcp) => {
            let retry = dialer.limits.quic_retry_interval;
            // Kept across loop turns: a tick must not cancel a handshake.
            let mut probing = Box::pin(probe(dialer, peer, opened + retry));
            loop {
                tokio::select! {
                    _ = tcp.closed() => {
                        *lock(&cell.last_error) = "TCP fallback connection closed".into();
                        break Watched::Closed;
                    }
                    _ = tick.tick() => {
                        if opened.elapsed() >= MIN_HEALTHY {
                            cell.healthy_once.store(true, Ordering::Relaxed);
                        }
                    }
                    _ = cell.adopted_ready.notified() => {
                        if let Some(theirs) = cell.take_adopted() {
                            tracing::info!(peer = %cluster, "the peer's QUIC dial got through; new streams move off the TCP fallback");
                            cell.prefer_tcp.store(false, Ordering::Relaxed);
                            break Watched::Replaced(PeerConn::Quic(QuicPeer::adopted(theirs)));
                        }
                    }
                    q = &mut probing => match q {
                        Ok(q) => {
                            tracing::info!(peer = %cluster, "QUIC gets through again; new streams move off the TCP fallback");
                            cell.prefer_tcp.store(false, Ordering::Relaxed);
                            break Watched::Replaced(PeerConn::Quic(QuicPeer::dialed(q)));
                        }
                        Err(e) => {
                            tracing::debug!(peer = %cluster, error = %e, "QUIC still does not get through");
                            probing.set(probe(dialer, peer, Instant::now() + retry));
                        }
                    },
                }
            }
        }
    };
    if let Watched::Closed = outcome {
        cell.down.store(true, Ordering::Relaxed);
        metrics.peer_up.get_or_create(&labels).set(0);
        metrics.set_transport(cluster.as_str(), None);
        fedmesh_transport::warn_unless_announced!(
            dialer.expects_trouble(cluster),
            peer = %cluster, transport = transport.as_str(), reason = %lock(&cell.last_error), "connection to peer gateway closed"
        );
    }
    outcome
}

/// One background QUIC handshake at `at`.
async fn probe(dialer: &Dialer, peer: &Peer, at: Instant) -> Result<Connection, PoolError> {
    tokio::time::sleep_until(at).await;
    dialer.quic(peer).await
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
        .map_err(|_| PoolError::Silent {
            cluster: peer.cluster.clone(),
            addr: peer.address,
            waited: limit,
            fallback: None,
        })?
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

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;
    use fedmesh_trust::{
        CertificateAuthority, SharedBundles, SvidSource, TrustBundles, TrustDomain,
    };

    /// A gateway identity of `ca`'s trust domain and the QUIC endpoint it
    /// serves and dials from, trusting `bundles`.
    fn side(
        ca: &CertificateAuthority,
        bundles: &SharedBundles,
        limits: &Limits,
    ) -> (Endpoint, quinn::ClientConfig, SvidSource) {
        let id = ca.trust_domain().system_id("gateway");
        let svid = SvidSource::new(ca.issue(&id, Duration::from_secs(600)).unwrap()).unwrap();
        let server = crate::quic::server_config(&svid, bundles.clone(), limits).unwrap();
        let ep = Endpoint::server(server, "127.0.0.1:0".parse().unwrap()).unwrap();
        let client = crate::quic::client_config(&svid, bundles.clone(), limits).unwrap();
        (ep, client, svid)
    }

    /// Echoes every stream of every connection `ep` accepts.
    fn echo_server(ep: Endpoint) {
        tokio::spawn(async move {
            while let Some(incoming) = ep.accept().await {
                tokio::spawn(async move {
                    let Ok(conn) = incoming.await else { return };
                    serve_echo(conn).await;
                });
            }
        });
    }

    async fn serve_echo(conn: Connection) {
        while let Ok((mut send, mut recv)) = conn.accept_bi().await {
            tokio::spawn(async move {
                let _ = tokio::io::copy(&mut recv, &mut send).await;
                let _ = send.finish();
            });
        }
    }

    /// West's pool facing a bare east endpoint that echoes. East sorts
    /// first: it is the side that dials; west adopts its dial, and dials
    /// itself only when none came within [`ADOPT_GRACE`].
    struct Pair {
        pool: Pool,
        east: Peer,
        east_ep: Endpoint,
        east_client: quinn::ClientConfig,
        west_ep: Endpoint,
    }

    impl Pair {
        fn new() -> Self {
            let limits = Limits {
                connect_timeout: Duration::from_secs(2),
                ..Limits::default()
            };
            let ca = |td: &str| {
                CertificateAuthority::new_root(
                    TrustDomain::new(td).unwrap(),
                    Duration::from_secs(600),
                )
                .unwrap()
            };
            let (east_ca, west_ca) = (ca("east.test"), ca("west.test"));
            let bundles = SharedBundles::new(
                TrustBundles::new()
                    .with(east_ca.bundle())
                    .with(west_ca.bundle()),
            );
            let (east_ep, east_client, east_svid) = side(&east_ca, &bundles, &limits);
            let (west_ep, west_client, west_svid) = side(&west_ca, &bundles, &limits);
            echo_server(east_ep.clone());
            let tls = fedmesh_trust::client_config_from(
                &west_svid,
                bundles,
                fedmesh_trust::PeerPolicy::AnyTrusted,
                &[crate::tcp::ALPN_H2],
            )
            .unwrap();
            let pool = Pool::new(
                Dialer {
                    local: ClusterName::new("west").unwrap(),
                    endpoint: west_ep.clone(),
                    quic: west_client,
                    tcp: TlsConnector::from(Arc::new(tls)),
                    from: None,
                    limits,
                    metrics: GatewayMetrics::default(),
                    announced: fedmesh_transport::Announced::default(),
                },
                Arc::new(|_, _| {}),
            );
            let east = Peer {
                cluster: ClusterName::new("east").unwrap(),
                trust_domain: east_ca.trust_domain().clone(),
                address: east_ep.local_addr().unwrap(),
                tcp_address: None,
                identity: east_svid.current().id().clone(),
                region: String::new(),
            };
            Self {
                pool,
                east,
                east_ep,
                east_client,
                west_ep,
            }
        }

        /// East dials west; returns west's side of it (as its accept loop
        /// would hand it to the pool) and keeps east's side serving echo.
        async fn east_dials(&self) -> Connection {
            let accepting = tokio::spawn({
                let west_ep = self.west_ep.clone();
                async move { west_ep.accept().await.unwrap().await.unwrap() }
            });
            let east_side = self
                .east_ep
                .connect_with(
                    self.east_client.clone(),
                    self.west_ep.local_addr().unwrap(),
                    "fedmesh.invalid",
                )
                .unwrap()
                .await
                .unwrap();
            tokio::spawn(serve_echo(east_side));
            accepting.await.unwrap()
        }

        fn dialed_by(&self) -> Option<&'static str> {
            self.pool.status().first().and_then(|s| s.dialed_by)
        }

        async fn until_dialed_by(&self, who: &str) {
            let t0 = Instant::now();
            while self.dialed_by() != Some(who) {
                assert!(
                    t0.elapsed() < Duration::from_secs(5),
                    "dialed by {:?}, not {who}",
                    self.dialed_by()
                );
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }
    }

    /// Opens a stream on `conn`, writes, waits `pause`, writes again and
    /// reads the echo of both.
    async fn echo_across(conn: &Connection, pause: Duration) -> Result<Vec<u8>, String> {
        let (mut send, mut recv) = conn.open_bi().await.map_err(|e| e.to_string())?;
        send.write_all(b"before").await.map_err(|e| e.to_string())?;
        tokio::time::sleep(pause).await;
        send.write_all(b" and after")
            .await
            .map_err(|e| e.to_string())?;
        send.finish().map_err(|e| e.to_string())?;
        recv.read_to_end(1024).await.map_err(|e| e.to_string())
    }

    fn quic(c: &PeerConn) -> &Connection {
        match c {
            PeerConn::Quic(q) => &q.conn,
            PeerConn::Tcp(_) => panic!("not QUIC"),
        }
    }

    /// Defect 1 of the fold: a stream handed the pair's old connection just
    /// before the peer's dial replaces it must not be cut by the drain of
    /// that connection, however long it opens and runs after the fold.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_stream_handed_the_old_connection_survives_the_fold() {
        let p = Pair::new();
        p.pool.set_peers([&p.east]);
        let old = p.pool.get(&p.east).await.unwrap();
        assert_eq!(p.dialed_by(), Some("us"));

        // East's dial arrives and west adopts it: the fold.
        let accepted = p.east_dials().await;
        p.pool.adopt(&p.east, &accepted);
        p.until_dialed_by("peer").await;

        // The stream handed `old` before the fold opens now and runs for
        // well past the drain's linger.
        let got = echo_across(quic(&old.conn), Duration::from_millis(600)).await;
        assert_eq!(
            got.as_deref(),
            Ok(&b"before and after"[..]),
            "the fold cut a stream handed the old connection"
        );
    }

    /// Defect 2a: the side that does not dial sees the peer's address
    /// change in its catalog. The connection it uses is the peer's own
    /// dial, which does not depend on that address: it stays, and so do
    /// the streams on it.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_address_change_keeps_the_peers_own_dial() {
        let p = Pair::new();
        p.pool.set_peers([&p.east]);
        let accepted = p.east_dials().await;
        p.pool.adopt(&p.east, &accepted);
        p.until_dialed_by("peer").await;
        // A stream in flight on it: half sent before the change, half after.
        let before = p.pool.get(&p.east).await.unwrap();
        let (mut send, mut recv) = quic(&before.conn).open_bi().await.unwrap();
        send.write_all(b"before").await.unwrap();

        let mut moved = p.east.clone();
        moved.address = "127.0.0.1:9".parse().unwrap();
        p.pool.set_peers([&moved]);
        send.write_all(b" and after").await.unwrap();
        send.finish().unwrap();
        let got = recv.read_to_end(1024).await.map_err(|e| e.to_string());
        assert_eq!(got.as_deref(), Ok(&b"before and after"[..]));
        assert!(
            accepted.close_reason().is_none(),
            "the peer's dial was closed"
        );
        p.until_dialed_by("peer").await;
        let after = p.pool.get(&moved).await.unwrap();
        assert_eq!(quic(&after.conn).stable_id(), accepted.stable_id());
    }

    /// Defect 2b: the peer's dial can arrive before the catalog that names
    /// the peer reaches the pool. It is kept and adopted once the peer is
    /// set, instead of forgotten (and the pair holding two connections).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_dial_that_beats_the_catalog_is_adopted() {
        let p = Pair::new();
        let accepted = p.east_dials().await;
        p.pool.adopt(&p.east, &accepted);
        p.pool.set_peers([&p.east]);
        p.until_dialed_by("peer").await;
        // Past the adoption grace: still the peer's dial, no second one.
        tokio::time::sleep(ADOPT_GRACE + Duration::from_millis(200)).await;
        assert_eq!(p.dialed_by(), Some("peer"));
        assert_eq!(p.west_ep.open_connections(), 1);
    }

    /// The fold under load: 200 new streams per second, each handed a
    /// connection by the pool and running 150 ms (longer than the folded
    /// connection lingers after its last counted stream), while the peer's
    /// dial replaces ours. Not one may fail, 20 times over.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn folding_under_load_fails_no_stream() {
        for round in 0..20 {
            let p = Arc::new(Pair::new());
            p.pool.set_peers([&p.east]);
            drop(p.pool.get(&p.east).await.unwrap());
            assert_eq!(p.dialed_by(), Some("us"));
            let load = tokio::spawn({
                let p = p.clone();
                async move {
                    let mut streams = Vec::new();
                    let mut tick = tokio::time::interval(Duration::from_millis(5));
                    for _ in 0..80 {
                        tick.tick().await;
                        let p = p.clone();
                        streams.push(tokio::spawn(async move {
                            let leased = p.pool.get(&p.east).await.map_err(|e| e.to_string())?;
                            echo_across(quic(&leased.conn), Duration::from_millis(150)).await
                        }));
                    }
                    let mut failed = Vec::new();
                    for s in streams {
                        match s.await.unwrap() {
                            Ok(b) if b == b"before and after" => {}
                            other => failed.push(format!("{other:?}")),
                        }
                    }
                    failed
                }
            });
            tokio::time::sleep(Duration::from_millis(150)).await;
            let accepted = p.east_dials().await;
            p.pool.adopt(&p.east, &accepted);
            let failed = load.await.unwrap();
            assert!(failed.is_empty(), "round {round}: {failed:?}");
            assert_eq!(p.dialed_by(), Some("peer"), "round {round}: no fold");
        }
    }
}
