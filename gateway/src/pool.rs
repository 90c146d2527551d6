//! One connection per peer cluster, shared by every tunneled stream to
//! that cluster: QUIC, or the TCP fallback ([`crate::tcp`]) when UDP does
//! not get through.
//!
//! What to do when is decided by a [`Link`] per peer, a state machine
//! with no I/O ([`crate::link`] describes its states). This module is its
//! driver: a task per peer that dials what the link asks for, a watcher
//! per connection that reports silence and closes, and the hand-out of
//! connections to streams, each counted by a lease the link sees.
//!
//! Transport choice: QUIC first. When a QUIC connect meets silence (a
//! timeout, not a refusal) and the peer offers a fallback address, the
//! link dials TCP and remembers that this peer needs it: reconnects go to
//! TCP first, and every `limits.quic_retry_interval` one QUIC handshake is
//! tried in the background; when it succeeds, new streams move to QUIC and
//! the TCP connection ends once its streams have.
//!
//! Reconnects back off exponentially (200 ms doubling to 2 s, with
//! jitter) whether or not any stream is waiting, so a repaired cluster is
//! back as soon as it answers. Liveness: keep-alives every
//! `limits.keep_alive`; a peer that sent nothing for
//! [`Limits::peer_dead_after`](fedmesh_transport::Limits::peer_dead_after)
//! (three keep-alives, 600 ms by default) is declared dead and its
//! connection closed, which fails its streams at once so callers go to
//! another cluster; the QUIC idle timeout is the backstop.
//!
//! Streams never wait for a reconnect to a peer known to be down: they get
//! [`PoolError::Down`] and the caller fails over. Only the very first
//! connect to a peer is waited for (up to twice `connect_timeout`).
//!
//! One QUIC connection per gateway pair: of two clusters, the one whose
//! name sorts first dials ([`dials`]) and serves the other's streams on
//! that connection too; the other adopts the accepted connection for its
//! own streams. It dials itself only when no connection from the peer
//! arrived within [`ADOPT_GRACE`] (the peer may not list us yet, or be
//! down), and folds that connection away as soon as the peer's arrives:
//! new streams move over at once, the old connection closes when the
//! streams it was handed have ended.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::Duration;

use fedmesh_catalog::{ClusterName, Peer};
use fedmesh_transport::Limits;
use quinn::{Connection, Endpoint};
use rustls::pki_types::CertificateDer;
use tokio::sync::Notify;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_rustls::TlsConnector;

pub use crate::link::CLOSE_POLICY;
use crate::link::{Action, Admit, ConnId, DialError, Event, Link, Note, Origin, Settings};
use crate::metrics::{GatewayMetrics, PeerLabels};
use crate::tcp::TcpConn;
pub use crate::transport::Transport;

/// How often a watcher looks at a QUIC connection.
const WATCH_TICK: Duration = Duration::from_millis(100);

/// How long the gateway that does not dial ([`dials`]) waits for the
/// peer's connection before dialing itself: a few handshakes' worth, so a
/// peer that does not list us yet (or is down) costs little.
pub const ADOPT_GRACE: Duration = Duration::from_millis(500);

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
    #[error("connecting to peer {cluster} at {addr}: no answer within {waited:?}")]
    Silent {
        cluster: ClusterName,
        addr: std::net::SocketAddr,
        waited: Duration,
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
    Quic(Connection),
    Tcp(TcpConn),
}

impl PeerConn {
    pub fn is_open(&self) -> bool {
        match self {
            Self::Quic(q) => q.close_reason().is_none(),
            Self::Tcp(t) => t.is_open(),
        }
    }

    fn close(&self, code: u32, reason: &'static str) {
        match self {
            Self::Quic(q) => q.close(code.into(), reason.as_bytes()),
            Self::Tcp(t) => t.close(),
        }
    }
}

/// A connection handed to one stream, and the stream's lease on it: the
/// link closes a connection it stopped handing out only once every lease
/// on it has been dropped.
pub struct Leased {
    pub conn: PeerConn,
    pub lease: Lease,
}

impl Leased {
    pub fn into_parts(self) -> (PeerConn, Lease) {
        (self.conn, self.lease)
    }
}

/// One stream's hold on a connection, returned when dropped.
pub struct Lease {
    cell: Arc<Cell>,
    conn: ConnId,
}

impl Lease {
    /// A stream on this connection failed at the connection level (for
    /// example our certificate was refused, which TLS 1.3 reveals only at
    /// the first stream operation): the connection is closed and the link
    /// reconnects with backoff.
    pub fn failed(&self) {
        self.cell.event(Event::Failed(self.conn));
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.cell.event(Event::StreamEnded(self.conn));
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

/// One peer: its link, the connections the link numbers, and what the
/// driver still has to do.
struct Cell {
    peer: Mutex<Peer>,
    state: Mutex<State>,
    /// Wakes the driver: actions queued, or the next deadline moved.
    wake: Notify,
    /// A connect result is known ([`Action::Settled`]).
    settled: Notify,
    driver: Mutex<Option<JoinHandle<()>>>,
}

struct State {
    link: Link,
    conns: HashMap<ConnId, PeerConn>,
    /// Dials, serves and notes for the driver, in order.
    queue: Vec<Action>,
}

impl Cell {
    fn peer(&self) -> Peer {
        lock(&self.peer).clone()
    }

    /// Feeds the link one event now and carries out what it says.
    fn event(&self, event: Event) {
        let mut st = lock(&self.state);
        let actions = st.link.on(event, Instant::now());
        self.apply(st, actions);
    }

    /// A connection (ours or the peer's) arrives: numbered and kept
    /// before the link hears of it, so every action on it finds it.
    fn arrive(self: &Arc<Self>, conn: PeerConn, event: impl FnOnce(ConnId) -> Event, ctx: &Ctx) {
        let id = ctx.next_id.fetch_add(1, Ordering::Relaxed);
        let mut st = lock(&self.state);
        st.conns.insert(id, conn.clone());
        let actions = st.link.on(event(id), Instant::now());
        self.apply(st, actions);
        tokio::spawn(watch(self.clone(), id, conn, ctx.clone()));
    }

    /// Closes and wakes at once; dials, serves and notes go to the driver
    /// (a lease dropped anywhere can end a drain, and a removed peer's
    /// driver is gone).
    fn apply(&self, mut st: MutexGuard<'_, State>, actions: Vec<Action>) {
        let staged = stage(&mut st, actions);
        drop(st);
        self.finish(staged);
    }

    fn finish(&self, s: Staged) {
        for (c, code, reason, linger) in s.closes {
            close_later(c, code, reason, linger);
        }
        if s.settled {
            self.settled.notify_waiters();
        }
        if s.queued {
            self.wake.notify_one();
        }
    }

    /// The installed connection, leased to one stream. A connection found
    /// closed is reported first, so it is never handed out.
    fn lease(self: &Arc<Self>, st: &mut MutexGuard<'_, State>) -> Option<Leased> {
        // Bounded: each turn forgets one closed connection.
        for _ in 0..4 {
            let id = st.link.installed()?;
            match st.conns.get(&id) {
                Some(c) if c.is_open() => {
                    let conn = c.clone();
                    st.link.lease();
                    return Some(Leased {
                        conn,
                        lease: Lease {
                            cell: self.clone(),
                            conn: id,
                        },
                    });
                }
                _ => {
                    let actions = st.link.on(
                        Event::Closed {
                            conn: id,
                            reason: "found closed".into(),
                        },
                        Instant::now(),
                    );
                    st.conns.remove(&id);
                    let staged = stage(st, actions);
                    self.finish(staged);
                }
            }
        }
        None
    }

    fn down_error(&self, st: &State) -> PoolError {
        PoolError::Down {
            cluster: self.peer().cluster,
            last: st.link.last_error().to_owned(),
        }
    }
}

/// Closes taken out of the registry, and whether to wake waiters or the
/// driver: what [`Cell::finish`] does once the state lock is let go.
#[derive(Default)]
struct Staged {
    closes: Vec<(PeerConn, u32, &'static str, bool)>,
    settled: bool,
    queued: bool,
}

fn stage(st: &mut State, actions: Vec<Action>) -> Staged {
    let mut s = Staged::default();
    for a in actions {
        match a {
            Action::Close {
                conn,
                code,
                reason,
                linger,
            } => {
                if let Some(c) = st.conns.remove(&conn) {
                    s.closes.push((c, code, reason, linger));
                }
            }
            Action::Settled => s.settled = true,
            other => {
                st.queue.push(other);
                s.queued = true;
            }
        }
    }
    s
}

/// Closes `conn`; with `linger`, a few round trips from now, since a QUIC
/// close abandons data not yet acknowledged (a heuristic, not a
/// guarantee).
fn close_later(conn: PeerConn, code: u32, reason: &'static str, linger: bool) {
    let runtime = tokio::runtime::Handle::try_current();
    match (&conn, linger, runtime) {
        (PeerConn::Quic(q), true, Ok(rt)) => {
            let wait = (q.rtt() * 4).max(Duration::from_millis(100));
            rt.spawn(async move {
                tokio::time::sleep(wait).await;
                conn.close(code, reason);
            });
        }
        _ => conn.close(code, reason),
    }
}

/// Serves the peer's streams on a connection this gateway dialed.
pub type ServeDialed = Arc<dyn Fn(Connection, Peer) + Send + Sync>;

/// What drivers and watchers share.
#[derive(Clone)]
struct Ctx {
    dialer: Dialer,
    serve_dialed: ServeDialed,
    next_id: Arc<AtomicU64>,
}

/// What the pool needs to dial a peer over either transport.
#[derive(Clone)]
pub struct Dialer {
    /// This gateway's cluster, for the pair's tie-break ([`dials`]).
    pub local: ClusterName,
    pub endpoint: Endpoint,
    /// QUIC client configs, one per congestion controller in use.
    pub quic: crate::quic::PeerConfigs,
    /// TLS for the TCP fallback (ALPN `fedmesh-h2/1`).
    pub tcp: TlsConnector,
    /// The gateway's own address, to dial TCP from.
    pub from: Option<IpAddr>,
    pub limits: Limits,
    pub metrics: GatewayMetrics,
    /// Faults announced by a drill: what they cause is logged at debug.
    pub announced: fedmesh_transport::Announced,
    /// Peers a drill blackholed: their TCP fallback is not dialed (their
    /// UDP is dropped at the socket).
    pub blocked: Arc<std::sync::RwLock<std::collections::BTreeSet<ClusterName>>>,
}

impl Dialer {
    pub fn is_blocked(&self, peer: &ClusterName) -> bool {
        match self.blocked.read() {
            Ok(g) => g.contains(peer),
            Err(p) => p.into_inner().contains(peer),
        }
    }

    fn expects_trouble(&self, peer: &ClusterName) -> bool {
        self.announced.expects(self.local.as_str(), peer.as_str())
    }

    async fn dial(&self, peer: &Peer, transport: Transport) -> Result<PeerConn, DialError> {
        match transport {
            Transport::Quic => connect(
                &self.endpoint,
                self.quic.client_for(peer.cluster.as_str()),
                peer,
                self.limits.connect_timeout,
            )
            .await
            .map(PeerConn::Quic)
            .map_err(|e| match e {
                PoolError::Silent { .. } => DialError::Silent(e.to_string()),
                e => DialError::Refused(e.to_string()),
            }),
            Transport::Tcp => {
                if self.is_blocked(&peer.cluster) {
                    return Err(DialError::Refused("blackholed by a drill".into()));
                }
                let Some(addr) = peer.tcp_address else {
                    return Err(DialError::Refused("the peer offers no TCP fallback".into()));
                };
                crate::tcp::connect(peer, addr, self.from, &self.tcp, &self.limits)
                    .await
                    .map(PeerConn::Tcp)
                    .map_err(|e| DialError::Refused(format!("TCP fallback {addr}: {e}")))
            }
        }
    }

    fn settings(&self, peer: &Peer) -> Settings {
        Settings {
            we_dial: dials(&self.local, &peer.cluster),
            has_tcp: peer.tcp_address.is_some(),
            adopt_grace: ADOPT_GRACE,
            quic_retry: self.limits.quic_retry_interval,
            ..Settings::default()
        }
    }
}

pub struct Pool {
    cells: Mutex<HashMap<ClusterName, Arc<Cell>>>,
    ctx: Arc<Ctx>,
}

impl Drop for Pool {
    fn drop(&mut self) {
        self.close_all();
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    match m.lock() {
        Ok(g) => g,
        Err(p) => p.into_inner(),
    }
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
            cells: Mutex::default(),
            ctx: Arc::new(Ctx {
                dialer,
                serve_dialed,
                next_id: Arc::new(AtomicU64::new(1)),
            }),
        }
    }

    /// A QUIC connection the peer dialed and we accepted (and identified):
    /// when the peer is the one that [`dials`], it becomes the pair's
    /// connection for our streams too, replacing any we dialed ourselves.
    pub fn adopt(&self, peer: &Peer, conn: &Connection) {
        if dials(&self.ctx.dialer.local, &peer.cluster) {
            return;
        }
        // The accept path knows the peer from the catalog, which can reach
        // it before `set_peers` does: the cell is made here then (a dial
        // dropped here would never be adopted, and the pair would keep
        // two connections).
        self.cell(peer)
            .arrive(PeerConn::Quic(conn.clone()), Event::Adopted, &self.ctx);
    }

    /// Ends every connection at once and stops every driver.
    pub fn close_all(&self) {
        for cell in lock(&self.cells).drain().map(|(_, c)| c) {
            if let Some(t) = lock(&cell.driver).take() {
                t.abort();
            }
            // Removed: dials still under way are closed when they end.
            cell.event(Event::Removed);
            for (_, c) in lock(&cell.state).conns.drain() {
                c.close(CLOSE_POLICY, "gateway shutting down");
            }
        }
    }

    /// How each peer is reached, for `/status`.
    pub fn status(&self) -> Vec<PeerStatus> {
        let cells: Vec<Arc<Cell>> = lock(&self.cells).values().cloned().collect();
        let mut rows: Vec<PeerStatus> = cells
            .iter()
            .map(|cell| {
                let p = cell.peer();
                let st = lock(&cell.state);
                let live = st.link.installed_info().filter(|_| {
                    st.link
                        .installed()
                        .and_then(|id| st.conns.get(&id))
                        .is_some_and(PeerConn::is_open)
                });
                PeerStatus {
                    cluster: p.cluster.to_string(),
                    address: p.address,
                    tcp_address: p.tcp_address,
                    transport: live.map_or("down", |(t, ..)| t.as_str()),
                    dialed_by: live.map(|(_, o, _)| o.as_str()),
                    connected_for_s: live.map(|(.., at)| at.elapsed().as_secs_f64()),
                    udp_blocked: st.link.udp_blocked(),
                    last_error: st.link.last_error().to_owned(),
                }
            })
            .collect();
        rows.sort_by(|a, b| a.cluster.cmp(&b.cluster));
        rows
    }

    /// The catalog's peers: each gets a connection kept warm (failing over
    /// to a cluster that took no traffic yet does not wait for a
    /// handshake); a peer whose address or identity changed reconnects,
    /// keeping the peer's own dial; peers no longer listed lose theirs.
    pub fn set_peers<'a>(&self, peers: impl IntoIterator<Item = &'a Peer>) {
        let peers: HashMap<ClusterName, Peer> = peers
            .into_iter()
            .map(|p| (p.cluster.clone(), p.clone()))
            .collect();
        let mut events = Vec::new();
        {
            let mut cells = lock(&self.cells);
            cells.retain(|name, cell| {
                let Some(new) = peers.get(name) else {
                    events.push((cell.clone(), Event::Removed));
                    return false;
                };
                let mut old = lock(&cell.peer);
                if (old.address, old.tcp_address, &old.identity)
                    != (new.address, new.tcp_address, &new.identity)
                {
                    let identity = old.identity != new.identity;
                    *old = new.clone();
                    let has_tcp = new.tcp_address.is_some();
                    events.push((cell.clone(), Event::Moved { identity, has_tcp }));
                }
                true
            });
        }
        for (cell, event) in events {
            cell.event(event);
        }
        for p in peers.values() {
            self.cell(p);
        }
    }

    /// Whether a drill blackholed `peer`.
    pub fn is_blocked(&self, peer: &ClusterName) -> bool {
        self.ctx.dialer.is_blocked(peer)
    }

    /// Every connection's remote address, by peer.
    pub fn remote_addresses(&self) -> Vec<(ClusterName, std::net::SocketAddr)> {
        let cells: Vec<Arc<Cell>> = lock(&self.cells).values().cloned().collect();
        let mut out = Vec::new();
        for cell in cells {
            let cluster = cell.peer().cluster.clone();
            for c in lock(&cell.state).conns.values() {
                if let PeerConn::Quic(q) = c {
                    out.push((cluster.clone(), q.remote_address()));
                }
            }
        }
        out
    }

    /// A drill blackholes `peers` (and no others): their TCP fallback
    /// connections close and are not dialed again until it ends.
    pub fn set_blocked(&self, peers: std::collections::BTreeSet<ClusterName>) {
        match self.ctx.dialer.blocked.write() {
            Ok(mut g) => *g = peers.clone(),
            Err(p) => *p.into_inner() = peers.clone(),
        }
        let cells: Vec<Arc<Cell>> = lock(&self.cells)
            .iter()
            .filter(|(name, _)| peers.contains(*name))
            .map(|(_, c)| c.clone())
            .collect();
        for cell in cells {
            for c in lock(&cell.state).conns.values() {
                if matches!(c, PeerConn::Tcp(_)) {
                    c.close(CLOSE_POLICY, "blackholed by a drill");
                }
            }
        }
    }

    /// Peers with a live connection right now.
    pub fn live_peers(&self) -> usize {
        let cells: Vec<Arc<Cell>> = lock(&self.cells).values().cloned().collect();
        cells
            .iter()
            .filter(|c| {
                let st = lock(&c.state);
                st.link
                    .installed()
                    .and_then(|id| st.conns.get(&id))
                    .is_some_and(PeerConn::is_open)
            })
            .count()
    }

    /// The peer's cell, with its driver started.
    fn cell(&self, peer: &Peer) -> Arc<Cell> {
        let mut cells = lock(&self.cells);
        if let Some(c) = cells.get(&peer.cluster) {
            return c.clone();
        }
        let (link, actions) = Link::new(
            self.ctx.dialer.settings(peer),
            rand::random(),
            Instant::now(),
        );
        let cell = Arc::new(Cell {
            peer: Mutex::new(peer.clone()),
            state: Mutex::new(State {
                link,
                conns: HashMap::new(),
                queue: Vec::new(),
            }),
            wake: Notify::new(),
            settled: Notify::new(),
            driver: Mutex::new(None),
        });
        cells.insert(peer.cluster.clone(), cell.clone());
        drop(cells);
        let task = tokio::spawn(drive(Arc::downgrade(&self.ctx), cell.clone()));
        *lock(&cell.driver) = Some(task);
        cell.apply(lock(&cell.state), actions);
        cell
    }

    /// The live connection to `peer`, leased. Waits for a connect only
    /// while the peer has never been down, or is starting and answering;
    /// a peer that was up and went down turns streams away at once.
    pub async fn get(&self, peer: &Peer) -> Result<Leased, PoolError> {
        let cell = self.cell(peer);
        // A first connect may take a QUIC timeout and then a TCP one.
        let waited = self.ctx.dialer.limits.connect_timeout * 2;
        let settled = cell.settled.notified();
        tokio::pin!(settled);
        {
            let mut st = lock(&cell.state);
            if let Some(l) = cell.lease(&mut st) {
                return Ok(l);
            }
            if st.link.admit() == Admit::Down {
                return Err(cell.down_error(&st));
            }
            // Registered before the lock is let go: a result that comes
            // after this check wakes us.
            settled.as_mut().enable();
            let actions = st.link.on(Event::Wanted, Instant::now());
            cell.apply(st, actions);
        }
        if tokio::time::timeout(waited, settled).await.is_err() {
            return Err(PoolError::FirstConnect {
                cluster: peer.cluster.clone(),
                waited,
            });
        }
        let mut st = lock(&cell.state);
        match cell.lease(&mut st) {
            Some(l) => Ok(l),
            None => Err(cell.down_error(&st)),
        }
    }
}

/// Carries out what a peer's link asks for until the peer is removed:
/// dials, serves, notes, and ticks at the link's deadlines.
async fn drive(ctx: Weak<Ctx>, cell: Arc<Cell>) {
    loop {
        let (queue, deadline, removed) = {
            let mut st = lock(&cell.state);
            (
                std::mem::take(&mut st.queue),
                st.link.poll_timeout(),
                st.link.is_removed(),
            )
        };
        if !queue.is_empty() {
            let Some(ctx) = ctx.upgrade() else {
                return;
            };
            for action in queue {
                run(&ctx, &cell, action);
            }
        }
        if removed {
            return;
        }
        match deadline {
            Some(at) => tokio::select! {
                _ = cell.wake.notified() => {}
                _ = tokio::time::sleep_until(at) => cell.event(Event::Tick),
            },
            None => cell.wake.notified().await,
        }
    }
}

fn run(ctx: &Ctx, cell: &Arc<Cell>, action: Action) {
    let peer = cell.peer();
    let dialer = &ctx.dialer;
    let metrics = &dialer.metrics;
    let cluster = peer.cluster.as_str();
    match action {
        Action::Dial { attempt, transport } => {
            let (cell, ctx) = (cell.clone(), ctx.clone());
            tokio::spawn(async move {
                match ctx.dialer.dial(&peer, transport).await {
                    Ok(conn) => cell.arrive(
                        conn,
                        |id| Event::Dialed {
                            attempt,
                            result: Ok((id, transport)),
                        },
                        &ctx,
                    ),
                    Err(e) => cell.event(Event::Dialed {
                        attempt,
                        result: Err(e),
                    }),
                }
            });
        }
        Action::Serve(id) => {
            let conn = lock(&cell.state).conns.get(&id).cloned();
            if let Some(PeerConn::Quic(q)) = conn {
                (ctx.serve_dialed)(q, peer);
            }
        }
        Action::Note(note) => {
            let labels = PeerLabels {
                peer: cluster.to_owned(),
            };
            let trouble = dialer.expects_trouble(&peer.cluster);
            match note {
                Note::Up {
                    transport,
                    origin,
                    replaced,
                    ..
                } => {
                    metrics.peer_up.get_or_create(&labels).set(1);
                    metrics.set_transport(cluster, Some(transport));
                    match (replaced, origin) {
                        (None, _) => {
                            tracing::info!(peer = %cluster, addr = %peer.address, transport = transport.as_str(), dialed_by = origin.as_str(), "connected to peer gateway");
                        }
                        (Some(_), Origin::Peer) => {
                            tracing::info!(peer = %cluster, "the peer's dial replaces ours: one connection per gateway pair");
                        }
                        (Some(_), Origin::Us) => {
                            tracing::info!(peer = %cluster, "QUIC gets through again; new streams move off the TCP fallback");
                        }
                    }
                }
                Note::Down { reason } => {
                    metrics.peer_up.get_or_create(&labels).set(0);
                    metrics.set_transport(cluster, None);
                    fedmesh_transport::warn_unless_announced!(
                        trouble,
                        peer = %cluster, %reason, "connection to peer gateway closed"
                    );
                }
                Note::ConnectFailed { error, failures } => {
                    // Once per outage; the retries that follow are debug.
                    fedmesh_transport::warn_unless_announced!(
                        failures > 1 || trouble,
                        peer = %cluster, %error, failures, "peer connect failed"
                    );
                }
                Note::FellBack => {
                    tracing::warn!(peer = %cluster, "no answer over UDP; using the TCP fallback and retrying QUIC in the background");
                    metrics.fallback(cluster);
                }
                Note::ProbeFailed { error } => {
                    tracing::debug!(peer = %cluster, %error, "QUIC still does not get through");
                }
                Note::Removed => {
                    metrics.peer_up.get_or_create(&labels).set(0);
                    metrics.set_transport(cluster, None);
                    tracing::info!(peer = %cluster, "peer left the catalog; its connections are closed");
                }
                Note::Silent => {
                    fedmesh_transport::warn_unless_announced!(
                        trouble,
                        peer = %cluster, "peer gateway silent; declaring it dead"
                    );
                }
            }
        }
        // Handled where they arise (`Cell::apply`).
        Action::Close { .. } | Action::Settled => {}
    }
}

/// Watches one connection until it closes. QUIC: publishes its RTT while
/// installed and reports silence when nothing arrived for the dead-after
/// time (keep-alives make a live peer send several packets in that time).
/// TCP: hyper's pings close a silent connection.
async fn watch(cell: Arc<Cell>, id: ConnId, conn: PeerConn, ctx: Ctx) {
    let reason = match &conn {
        PeerConn::Quic(q) => {
            let metrics = &ctx.dialer.metrics;
            let labels = PeerLabels {
                peer: cell.peer().cluster.to_string(),
            };
            let dead_after = ctx.dialer.limits.peer_dead_after();
            let mut tick = tokio::time::interval(WATCH_TICK);
            let mut seen = q.stats().udp_rx.datagrams;
            let mut heard = Instant::now();
            let mut reported = false;
            let mut totals = crate::metrics::PathTotals::default();
            let publish = |totals: &mut crate::metrics::PathTotals| {
                let stats = q.stats();
                let in_use = lock(&cell.state).link.installed() == Some(id);
                if in_use {
                    metrics
                        .peer_rtt
                        .get_or_create(&labels)
                        .set(stats.path.rtt.as_secs_f64());
                }
                let observed = crate::congestion::Observed::of(q);
                metrics
                    .path
                    .publish(&labels.peer, &stats.path, &observed, in_use, totals);
                stats
            };
            loop {
                tokio::select! {
                    r = q.closed() => {
                        publish(&mut totals);
                        metrics.path.clear(&labels.peer);
                        break r.to_string();
                    }
                    _ = tick.tick() => {
                        let stats = publish(&mut totals);
                        if stats.udp_rx.datagrams != seen {
                            seen = stats.udp_rx.datagrams;
                            heard = Instant::now();
                        } else if heard.elapsed() >= dead_after && !reported {
                            reported = true;
                            cell.event(Event::Silent(id));
                        }
                    }
                }
            }
        }
        PeerConn::Tcp(t) => {
            t.closed().await;
            "TCP connection ended".to_owned()
        }
    };
    cell.event(Event::Closed { conn: id, reason });
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
    ) -> (Endpoint, crate::quic::PeerConfigs, SvidSource) {
        let id = ca.trust_domain().system_id("gateway");
        let svid = SvidSource::new(ca.issue(&id, Duration::from_secs(600)).unwrap()).unwrap();
        let configs = crate::quic::PeerConfigs::new(
            &svid,
            bundles.clone(),
            limits,
            &crate::congestion::CongestionConfig::default(),
        )
        .unwrap();
        let ep =
            Endpoint::server(configs.default_server(), "127.0.0.1:0".parse().unwrap()).unwrap();
        (ep, configs, svid)
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
                    blocked: Default::default(),
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
                east_client: east_client.client_for("west").clone(),
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

    /// `n` streams, one every 5 ms (200/s), each handed a connection by
    /// the pool and echoing across 150 ms (longer than a folded
    /// connection lingers after its last lease); returns the failures.
    async fn load(p: Arc<Pair>, n: usize) -> Vec<String> {
        let mut streams = Vec::new();
        let mut tick = tokio::time::interval(Duration::from_millis(5));
        for _ in 0..n {
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

    fn quic(c: &PeerConn) -> &Connection {
        match c {
            PeerConn::Quic(q) => q,
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

    /// 200 new streams per second from a cold start while both sides dial
    /// at once: west dials when the adoption grace ends, east's dial
    /// lands from 40 ms before that to 40 ms after (before, during or
    /// after west's handshake). Streams wait for the first connection,
    /// then every one must get through, and one connection stays.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn both_sides_dialing_under_load_fails_no_stream() {
        for round in 0..20u32 {
            let p = Arc::new(Pair::new());
            p.pool.set_peers([&p.east]);
            let load = tokio::spawn(load(p.clone(), 160));
            let offset = Duration::from_millis(u64::from(round % 5) * 20);
            tokio::time::sleep(ADOPT_GRACE - Duration::from_millis(40) + offset).await;
            let accepted = p.east_dials().await;
            p.pool.adopt(&p.east, &accepted);
            let failed = load.await.unwrap();
            assert!(failed.is_empty(), "round {round}: {failed:?}");
            assert_eq!(p.dialed_by(), Some("peer"), "round {round}: no fold");
            // West's own dial, superseded or folded, is gone.
            let t0 = Instant::now();
            while p.west_ep.open_connections() > 1 {
                assert!(
                    t0.elapsed() < Duration::from_secs(5),
                    "round {round}: two connections stay"
                );
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
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
            let load = tokio::spawn(load(p.clone(), 80));
            tokio::time::sleep(Duration::from_millis(150)).await;
            let accepted = p.east_dials().await;
            p.pool.adopt(&p.east, &accepted);
            let failed = load.await.unwrap();
            assert!(failed.is_empty(), "round {round}: {failed:?}");
            assert_eq!(p.dialed_by(), Some("peer"), "round {round}: no fold");
        }
    }
}
