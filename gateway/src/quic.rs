//! quinn endpoint construction: rustls mTLS with SPIFFE verification,
//! ALPN `fedmesh/1`, keep-alives, idle timeout, stream caps, and a UDP
//! socket wrapper that counts datagrams that cannot be QUIC.

use std::fmt;
use std::io::{self, IoSliceMut};
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use fedmesh_transport::Limits;
use std::collections::BTreeMap;

use crate::congestion::{Algorithm, CongestionConfig};
use fedmesh_trust::{ClientAuth, PeerPolicy, SharedBundles, SvidSource};
use prometheus_client::metrics::counter::Counter;
use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use quinn::udp::{RecvMeta, Transmit};
use quinn::{AsyncUdpSocket, Endpoint, EndpointConfig, TransportConfig, UdpPoller, VarInt};

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum QuicError {
    #[error(transparent)]
    Tls(#[from] fedmesh_trust::TlsError),
    #[error("QUIC TLS setup: {0}")]
    Crypto(String),
    #[error("binding UDP {addr}: {source}")]
    Bind { addr: SocketAddr, source: io::Error },
}

/// Largest reordering, in packets, before a packet counts as lost by
/// number: RACK's view (RFC 8985) that on paths that reorder, time is
/// the signal. At 1 Gbit/s a packet overtaken by 1 ms is ~85 packets
/// behind; quinn's default of 3 would call it lost, and a loss-based
/// controller would cut its window for it.
const PACKET_THRESHOLD: u32 = 256;
/// A packet is lost once acknowledgements of later ones have arrived for
/// this many round trips: RACK's reordering window of a quarter round
/// trip (quinn's default is an eighth).
const TIME_THRESHOLD: f32 = 1.25;
/// Flow-control windows sized for a 100 ms × 1 Gbit/s path: its
/// bandwidth-delay product is 12.5 MB, so one stream may fill it with
/// room for the reader to lag. The connection window covers eight such
/// streams: data a stalled reader leaves unread counts against it, and
/// with room for only two, two stalled applications held back every
/// stream between the two clusters (`gateway/tests/pooled.rs`). What a
/// peer can make a gateway buffer stays bounded by it.
const STREAM_WINDOW: u32 = 16 << 20;
const CONNECTION_WINDOW: u32 = 128 << 20;

fn transport(
    limits: &Limits,
    congestion: &CongestionConfig,
    algorithm: Algorithm,
) -> Arc<TransportConfig> {
    let mut t = TransportConfig::default();
    t.max_concurrent_bidi_streams(VarInt::from_u32(limits.max_streams_per_connection));
    t.max_concurrent_uni_streams(VarInt::from_u32(0));
    t.keep_alive_interval(Some(limits.keep_alive));
    // Idle timeouts beyond QUIC's VarInt range are clamped to its maximum.
    let idle = quinn::IdleTimeout::try_from(limits.idle_timeout)
        .unwrap_or_else(|_| quinn::IdleTimeout::from(VarInt::MAX));
    t.max_idle_timeout(Some(idle));
    // Larger windows than quinn's defaults: one connection carries every
    // tunneled connection to a peer cluster.
    t.stream_receive_window(VarInt::from_u32(STREAM_WINDOW));
    t.receive_window(VarInt::from_u32(CONNECTION_WINDOW));
    t.send_window(u64::from(CONNECTION_WINDOW));
    t.packet_threshold(PACKET_THRESHOLD);
    t.time_threshold(TIME_THRESHOLD);
    t.congestion_controller_factory(congestion.factory(algorithm));
    // Path MTU discovery may grow packets up to the configured bound:
    // jumbo-frame cluster networks (and loopback) then carry ~6x fewer
    // packets, and fewer packets is what QUIC throughput is bound by.
    // After a black hole (a burst of large packets lost) quinn falls back
    // to 1200-byte packets; it probes again after 5 s rather than its
    // default minute, so a short path event costs seconds of small
    // packets, not a minute.
    let mut mtu = quinn::MtuDiscoveryConfig::default();
    mtu.upper_bound(limits.quic_max_udp_payload);
    mtu.black_hole_cooldown(BLACK_HOLE_COOLDOWN);
    t.mtu_discovery_config(Some(mtu));
    Arc::new(t)
}

const BLACK_HOLE_COOLDOWN: std::time::Duration = std::time::Duration::from_secs(5);

/// The QUIC server config for peers sending with `congestion.controller`.
pub fn server_config(
    svid: &SvidSource,
    bundles: SharedBundles,
    limits: &Limits,
    congestion: &CongestionConfig,
) -> Result<quinn::ServerConfig, QuicError> {
    // Any SVID that verifies against its own domain's bundle completes the
    // handshake; which peer gateways are welcome is decided right after,
    // against the catalog, so the peer set can change without a new config.
    let tls = fedmesh_trust::server_config_from(
        svid,
        bundles,
        PeerPolicy::AnyTrusted,
        &[fedmesh_wire::ALPN],
        ClientAuth::Required,
    )?;
    let crypto = QuicServerConfig::try_from(tls).map_err(|e| QuicError::Crypto(e.to_string()))?;
    let mut cfg = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    cfg.transport_config(transport(limits, congestion, congestion.controller));
    // Gateways have stable addresses; refusing migration means a peer's
    // connection cannot be moved to another address mid-flight.
    cfg.migration(false);
    Ok(cfg)
}

/// The QUIC client config for dialing with `congestion.controller`.
pub fn client_config(
    svid: &SvidSource,
    bundles: SharedBundles,
    limits: &Limits,
    congestion: &CongestionConfig,
) -> Result<quinn::ClientConfig, QuicError> {
    let tls = fedmesh_trust::client_config_from(
        svid,
        bundles,
        PeerPolicy::AnyTrusted,
        &[fedmesh_wire::ALPN],
    )?;
    let crypto = QuicClientConfig::try_from(tls).map_err(|e| QuicError::Crypto(e.to_string()))?;
    let mut cfg = quinn::ClientConfig::new(Arc::new(crypto));
    cfg.transport_config(transport(limits, congestion, congestion.controller));
    Ok(cfg)
}

/// The QUIC configs of a gateway: one server and one client config per
/// congestion controller some peer uses, the same TLS for all.
#[derive(Clone)]
pub struct PeerConfigs {
    congestion: CongestionConfig,
    server: BTreeMap<Algorithm, Arc<quinn::ServerConfig>>,
    client: BTreeMap<Algorithm, quinn::ClientConfig>,
    /// For `congestion.controller`, also in the maps.
    default_server: Arc<quinn::ServerConfig>,
    default_client: quinn::ClientConfig,
}

impl PeerConfigs {
    pub fn new(
        svid: &SvidSource,
        bundles: SharedBundles,
        limits: &Limits,
        congestion: &CongestionConfig,
    ) -> Result<Self, QuicError> {
        let server = server_config(svid, bundles.clone(), limits, congestion)?;
        let client = client_config(svid, bundles, limits, congestion)?;
        let mut configs = Self {
            congestion: congestion.clone(),
            server: BTreeMap::new(),
            client: BTreeMap::new(),
            default_server: Arc::new(server.clone()),
            default_client: client.clone(),
        };
        for a in congestion.in_use() {
            let t = transport(limits, congestion, a);
            let mut s = server.clone();
            s.transport_config(t.clone());
            let mut c = client.clone();
            c.transport_config(t);
            configs.server.insert(a, Arc::new(s));
            configs.client.insert(a, c);
        }
        Ok(configs)
    }

    /// The server config for connections no peer is known for yet.
    pub fn default_server(&self) -> quinn::ServerConfig {
        self.default_server.as_ref().clone()
    }

    /// The server config for a connection from `peer` (by its address;
    /// `None` when no peer has it).
    pub fn server_for(&self, peer: Option<&str>) -> Arc<quinn::ServerConfig> {
        let a = peer.map_or(self.congestion.controller, |p| self.congestion.for_peer(p));
        self.server.get(&a).unwrap_or(&self.default_server).clone()
    }

    pub fn client_for(&self, peer: &str) -> &quinn::ClientConfig {
        let a = self.congestion.for_peer(peer);
        self.client.get(&a).unwrap_or(&self.default_client)
    }
}

/// What the socket wrapper counts.
#[derive(Clone)]
pub struct SocketCounters {
    pub invalid: Counter,
    pub tx_datagrams: Counter,
    pub tx_calls: Counter,
    pub rx_datagrams: Counter,
    pub rx_calls: Counter,
}

impl SocketCounters {
    pub fn of(m: &crate::metrics::GatewayMetrics) -> Self {
        use crate::metrics::DirectionLabels;
        // One statement per counter: a family's guard from get_or_create
        // must be gone before the next call on it takes its write lock.
        let get =
            |f: &prometheus_client::metrics::family::Family<DirectionLabels, Counter>,
             direction| f.get_or_create(&DirectionLabels { direction }).clone();
        let tx_datagrams = get(&m.udp_datagrams, "tx");
        let rx_datagrams = get(&m.udp_datagrams, "rx");
        let tx_calls = get(&m.udp_calls, "tx");
        let rx_calls = get(&m.udp_calls, "rx");
        Self {
            invalid: m.invalid_datagrams.clone(),
            tx_datagrams,
            tx_calls,
            rx_datagrams,
            rx_calls,
        }
    }
}

/// A UDP socket bound to `addr` with buffers of `buffer` bytes (as far
/// as the kernel allows, which is logged when it is less).
fn bound_socket(addr: SocketAddr, buffer: usize) -> Result<std::net::UdpSocket, QuicError> {
    let bind = |source| QuicError::Bind { addr, source };
    let socket = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::DGRAM,
        Some(socket2::Protocol::UDP),
    )
    .map_err(bind)?;
    socket.bind(&addr.into()).map_err(bind)?;
    // Ask for large buffers; the kernel caps them at its maxima. Linux
    // reports twice what it grants (its bookkeeping share), hence the /2.
    let _ = socket.set_recv_buffer_size(buffer);
    let _ = socket.set_send_buffer_size(buffer);
    let got_rx = socket.recv_buffer_size().unwrap_or(0) / 2;
    let got_tx = socket.send_buffer_size().unwrap_or(0) / 2;
    if got_rx < buffer || got_tx < buffer {
        tracing::warn!(
            asked = buffer,
            recv = got_rx,
            send = got_tx,
            "UDP socket buffers capped by the kernel; raise net.core.rmem_max and net.core.wmem_max for lossless bursts"
        );
    }
    tracing::debug!(
        recv_buffer = got_rx,
        send_buffer = got_tx,
        "UDP socket bound"
    );
    Ok(socket.into())
}

/// The endpoint config both ends of a gateway pair use: the largest UDP
/// payload we accept is the bound path MTU discovery climbs to. quinn's
/// default (1,472) is sent to the peer as the `max_udp_payload_size`
/// transport parameter, and the peer's MTU discovery stops there whatever
/// its own bound: before this, `limits.quic_max_udp_payload` had no effect
/// past 1,472 bytes.
fn endpoint_config(limits: &Limits) -> EndpointConfig {
    let mut cfg = EndpointConfig::default();
    // `Limits::validate` keeps the value within 1200..=65527, which is
    // what quinn accepts; a value it refuses leaves quinn's default.
    let _ = cfg.max_udp_payload_size(limits.quic_max_udp_payload);
    cfg
}

/// A plain quinn endpoint (quinn's own packet handling, no counting, QUIC
/// bit greasing as quinn does it) with the gateway's socket buffers and
/// largest datagram: the baseline the benchmarks and probes compare the
/// gateway against. Its socket splits GSO batches as the gateway's does
/// ([`GatewaySocket`]): quinn cannot send jumbo packets without that.
pub fn baseline_endpoint(
    addr: SocketAddr,
    server: Option<quinn::ServerConfig>,
    limits: &Limits,
) -> Result<Endpoint, QuicError> {
    let bind = |source| QuicError::Bind { addr, source };
    let socket = bound_socket(addr, limits.quic_socket_buffer_bytes)?;
    let runtime = Arc::new(quinn::TokioRuntime);
    let inner = quinn::Runtime::wrap_udp_socket(&*runtime, socket).map_err(bind)?;
    let socket = Arc::new(GatewaySocket {
        inner,
        counters: None,
        faults: None,
    });
    Endpoint::new_with_abstract_socket(endpoint_config(limits), server, socket, runtime)
        .map_err(bind)
}

/// Binds the gateway's one UDP port, serving and dialing from it, with
/// socket buffers of `limits.quic_socket_buffer_bytes` (as far as the
/// kernel allows).
pub fn endpoint(
    addr: SocketAddr,
    server: quinn::ServerConfig,
    limits: &Limits,
    counters: SocketCounters,
    faults: Arc<SocketFaults>,
) -> Result<Endpoint, QuicError> {
    let bind = |source| QuicError::Bind { addr, source };
    let socket = bound_socket(addr, limits.quic_socket_buffer_bytes)?;
    let runtime = Arc::new(quinn::TokioRuntime);
    let inner = quinn::Runtime::wrap_udp_socket(&*runtime, socket).map_err(bind)?;
    tracing::info!(
        gso_segments = inner.max_transmit_segments(),
        gro_segments = inner.max_receive_segments(),
        max_udp_payload = limits.quic_max_udp_payload,
        "QUIC UDP socket ready"
    );
    let socket = Arc::new(GatewaySocket {
        inner,
        counters: Some(counters),
        faults: Some(faults),
    });
    let mut ep_cfg = endpoint_config(limits);
    // With greasing off, every QUIC packet we accept has the fixed bit set,
    // so a datagram without it is certainly not QUIC (RFC 9000 §17.2).
    ep_cfg.grease_quic_bit(false);
    Endpoint::new_with_abstract_socket(ep_cfg, Some(server), socket, runtime).map_err(bind)
}

/// Most bytes one UDP send may carry, GSO batch included: 65,535 minus
/// the IPv4 and UDP headers (IPv6 allows a little more).
const MAX_SEND_BYTES: usize = 65_507;

/// Delegates to quinn's socket. Splits a GSO batch larger than one UDP
/// send may carry: quinn batches up to ten packets of the path MTU, ten
/// jumbo packets are 89 kB, and quinn-udp takes the kernel's `EMSGSIZE`
/// as sent, so the whole batch would vanish. The gateway's socket also
/// counts datagrams and the calls that moved them (GSO/GRO batching shows
/// as several datagrams per call), and received datagrams that cannot be
/// QUIC packets: quinn drops those silently; operators want to see them.
struct GatewaySocket {
    inner: Arc<dyn AsyncUdpSocket>,
    counters: Option<SocketCounters>,
    /// Drill faults (the gateway's socket only).
    faults: Option<Arc<SocketFaults>>,
}

/// One UDP send, counted when it went out.
fn send_one(
    inner: &dyn AsyncUdpSocket,
    counters: Option<&SocketCounters>,
    transmit: &Transmit,
) -> io::Result<()> {
    inner.try_send(transmit)?;
    if let Some(counters) = counters {
        let segments = match transmit.segment_size {
            Some(s) if s > 0 => transmit.contents.len().div_ceil(s),
            _ => 1,
        };
        counters.tx_calls.inc();
        counters.tx_datagrams.inc_by(segments as u64);
    }
    Ok(())
}

/// `transmit` in sends of whole packets that one UDP send can carry.
fn send_split(
    inner: &dyn AsyncUdpSocket,
    counters: Option<&SocketCounters>,
    transmit: &Transmit,
) -> io::Result<()> {
    let seg = match transmit.segment_size {
        Some(s) if s > 0 && transmit.contents.len() > MAX_SEND_BYTES => s,
        _ => return send_one(inner, counters, transmit),
    };
    // Whole packets per send, each send counted as it goes out. If a
    // later part finds the socket full, quinn sends the whole batch
    // again once it drains: the parts already sent arrive twice and
    // the peer drops the duplicates, which costs less than losing
    // packets that were never lost.
    let per_send = (MAX_SEND_BYTES / seg).max(1) * seg;
    for part in transmit.contents.chunks(per_send) {
        send_one(
            inner,
            counters,
            &Transmit {
                destination: transmit.destination,
                ecn: transmit.ecn,
                contents: part,
                segment_size: (part.len() > seg).then_some(seg),
                src_ip: transmit.src_ip,
            },
        )?;
    }
    Ok(())
}

/// What a drill does to datagrams, by remote address.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AddrFaults {
    /// Datagrams to and from these addresses are dropped.
    pub drop: std::collections::HashSet<SocketAddr>,
    /// Datagrams to these addresses leave this much later.
    pub delay: std::collections::HashMap<SocketAddr, std::time::Duration>,
}

/// Most bytes of delayed datagrams held at once; beyond it a delayed
/// datagram is dropped (a long delay on a fast path must not hold memory
/// without bound).
const MAX_DELAYED_BYTES: usize = 32 * 1024 * 1024;

/// Drill faults at the gateway's UDP socket. Off, they cost one relaxed
/// load per datagram.
#[derive(Debug, Default)]
pub struct SocketFaults {
    on: std::sync::atomic::AtomicBool,
    table: std::sync::RwLock<Arc<AddrFaults>>,
    delayed_bytes: Arc<std::sync::atomic::AtomicUsize>,
    /// Datagrams dropped, and delayed, on purpose.
    pub dropped: Counter,
    pub delayed: Counter,
}

impl SocketFaults {
    pub fn set(&self, t: AddrFaults) {
        let on = !t.drop.is_empty() || !t.delay.is_empty();
        match self.table.write() {
            Ok(mut g) => *g = Arc::new(t),
            Err(p) => *p.into_inner() = Arc::new(t),
        }
        self.on.store(on, std::sync::atomic::Ordering::Release);
    }

    pub fn get(&self) -> Arc<AddrFaults> {
        match self.table.read() {
            Ok(g) => g.clone(),
            Err(p) => p.into_inner().clone(),
        }
    }

    /// The table, when any fault is on.
    fn active(&self) -> Option<Arc<AddrFaults>> {
        self.on
            .load(std::sync::atomic::Ordering::Acquire)
            .then(|| self.get())
    }
}

impl GatewaySocket {
    /// Sends a copy of `transmit` after `delay` (dropped when the socket
    /// is full then, or too much is held already: both count as loss).
    fn send_later(&self, f: &Arc<SocketFaults>, transmit: &Transmit, delay: std::time::Duration) {
        use std::sync::atomic::Ordering;
        let len = transmit.contents.len();
        if f.delayed_bytes.fetch_add(len, Ordering::AcqRel) + len > MAX_DELAYED_BYTES {
            f.delayed_bytes.fetch_sub(len, Ordering::AcqRel);
            f.dropped.inc();
            return;
        }
        f.delayed.inc();
        let (inner, counters, held) = (
            self.inner.clone(),
            self.counters.clone(),
            f.delayed_bytes.clone(),
        );
        let (destination, ecn, segment_size, src_ip) = (
            transmit.destination,
            transmit.ecn,
            transmit.segment_size,
            transmit.src_ip,
        );
        let contents = transmit.contents.to_vec();
        tokio::spawn(async move {
            tokio::time::sleep(delay).await;
            let t = Transmit {
                destination,
                ecn,
                contents: &contents,
                segment_size,
                src_ip,
            };
            let _ = send_split(&*inner, counters.as_ref(), &t);
            held.fetch_sub(len, Ordering::AcqRel);
        });
    }
}

impl fmt::Debug for GatewaySocket {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GatewaySocket").finish_non_exhaustive()
    }
}

/// Shortest datagram that can hold a QUIC short-header packet with a
/// 1-byte packet number and a 16-byte AEAD tag.
const MIN_QUIC_DATAGRAM: usize = 1 + 1 + 16 + 3;

impl AsyncUdpSocket for GatewaySocket {
    fn create_io_poller(self: Arc<Self>) -> Pin<Box<dyn UdpPoller>> {
        self.inner.clone().create_io_poller()
    }

    fn try_send(&self, transmit: &Transmit) -> io::Result<()> {
        if let Some((f, t)) = self
            .faults
            .as_ref()
            .and_then(|f| f.active().map(|t| (f, t)))
        {
            if t.drop.contains(&transmit.destination) {
                f.dropped.inc();
                return Ok(());
            }
            if let Some(delay) = t.delay.get(&transmit.destination).copied() {
                self.send_later(f, transmit, delay);
                return Ok(());
            }
        }
        send_split(&*self.inner, self.counters.as_ref(), transmit)
    }

    fn poll_recv(
        &self,
        cx: &mut Context,
        bufs: &mut [IoSliceMut<'_>],
        meta: &mut [RecvMeta],
    ) -> Poll<io::Result<usize>> {
        loop {
            let r = self.inner.poll_recv(cx, bufs, meta);
            let Poll::Ready(Ok(n)) = r else {
                return r;
            };
            self.count_received(bufs, meta, n);
            let Some((f, t)) = self
                .faults
                .as_ref()
                .and_then(|f| f.active().map(|t| (f, t)))
                .filter(|(_, t)| !t.drop.is_empty())
            else {
                return Poll::Ready(Ok(n));
            };
            // Datagrams from dropped addresses go; the rest move up.
            let mut kept = 0;
            for i in 0..n {
                let m = meta[i];
                if t.drop.contains(&m.addr) {
                    f.dropped.inc();
                    continue;
                }
                if kept != i {
                    let (head, tail) = bufs.split_at_mut(i);
                    let (Some(to), Some(from)) =
                        (head[kept].get_mut(..m.len), tail[0].get(..m.len))
                    else {
                        f.dropped.inc();
                        continue;
                    };
                    to.copy_from_slice(from);
                    meta[kept] = m;
                }
                kept += 1;
            }
            if kept > 0 {
                return Poll::Ready(Ok(kept));
            }
            // Everything was dropped: read on (the inner socket registers
            // the waker when it has nothing).
        }
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        self.inner.local_addr()
    }

    fn max_transmit_segments(&self) -> usize {
        self.inner.max_transmit_segments()
    }

    fn max_receive_segments(&self) -> usize {
        self.inner.max_receive_segments()
    }

    fn may_fragment(&self) -> bool {
        self.inner.may_fragment()
    }
}

impl GatewaySocket {
    fn count_received(&self, bufs: &[IoSliceMut<'_>], meta: &[RecvMeta], n: usize) {
        if let Some(counters) = &self.counters {
            for (buf, m) in bufs.iter().zip(meta.iter()).take(n) {
                let data = buf.get(..m.len).unwrap_or_default();
                let stride = m.stride.max(1);
                counters.rx_calls.inc();
                counters
                    .rx_datagrams
                    .inc_by(data.len().div_ceil(stride) as u64);
                for dgram in data.chunks(stride) {
                    let fixed_bit = dgram.first().is_some_and(|b| b & 0x40 != 0);
                    if !fixed_bit || dgram.len() < MIN_QUIC_DATAGRAM {
                        counters.invalid.inc();
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    /// Ten jumbo packets in one GSO batch are more than one UDP send can
    /// carry: quinn-udp reports the kernel's refusal as sent, so without
    /// the split none of them would arrive.
    #[tokio::test]
    async fn a_gso_batch_past_one_send_arrives_whole() {
        let rx = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        rx.set_read_timeout(Some(std::time::Duration::from_secs(5)))
            .unwrap();
        let tx = bound_socket("127.0.0.1:0".parse().unwrap(), 1 << 20).unwrap();
        let inner = quinn::Runtime::wrap_udp_socket(&quinn::TokioRuntime, tx).unwrap();
        if inner.max_transmit_segments() < 10 {
            eprintln!("no UDP GSO here: nothing to split");
            return;
        }
        let metrics = crate::metrics::GatewayMetrics::default();
        let socket = Arc::new(GatewaySocket {
            inner,
            counters: Some(SocketCounters::of(&metrics)),
            faults: None,
        });
        let mut writable = socket.clone().create_io_poller();
        const SEG: usize = 8952;
        let contents: Vec<u8> = (0..10 * SEG - 100).map(|i| (i / SEG) as u8).collect();
        let transmit = Transmit {
            destination: rx.local_addr().unwrap(),
            ecn: None,
            contents: &contents,
            segment_size: Some(SEG),
            src_ip: None,
        };
        // Bounded: tokio learns the socket is writable on the first poll.
        let mut sent = false;
        for _ in 0..10 {
            std::future::poll_fn(|cx| writable.as_mut().poll_writable(cx))
                .await
                .unwrap();
            match socket.try_send(&transmit) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                r => {
                    r.unwrap();
                    sent = true;
                    break;
                }
            }
        }
        assert!(sent, "the socket never took the batch");
        let mut buf = vec![0u8; 65536];
        for i in 0..10 {
            let n = rx
                .recv(&mut buf)
                .expect("every packet of the batch arrives");
            let want = if i == 9 { SEG - 100 } else { SEG };
            assert_eq!(n, want, "packet {i}");
            assert!(
                buf[..n].iter().all(|&b| b == i as u8),
                "packet {i} in order"
            );
        }
        // Two sends (seven packets, then three), each counted.
        assert_eq!(metrics.udp_counts("tx"), (10, 2));
    }

    /// A drill's drop and delay, at the socket: datagrams to and from a
    /// dropped address vanish both ways, datagrams to a delayed one arrive
    /// that much later, others pass; off again, everything passes.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn drill_faults_drop_and_delay_datagrams_by_address() {
        use std::time::{Duration, Instant};
        let bind = || std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let (a, b, c) = (bind(), bind(), bind());
        for s in [&a, &b, &c] {
            s.set_read_timeout(Some(Duration::from_millis(500)))
                .unwrap();
        }
        let tx = bound_socket("127.0.0.1:0".parse().unwrap(), 1 << 20).unwrap();
        let inner = quinn::Runtime::wrap_udp_socket(&quinn::TokioRuntime, tx).unwrap();
        let faults = Arc::new(SocketFaults::default());
        let socket = Arc::new(GatewaySocket {
            inner,
            counters: None,
            faults: Some(faults.clone()),
        });
        let ours = socket.local_addr().unwrap();
        // tokio learns the socket is writable on the first poll.
        let mut writable = socket.clone().create_io_poller();
        std::future::poll_fn(|cx| writable.as_mut().poll_writable(cx))
            .await
            .unwrap();
        let send = |to: &std::net::UdpSocket, byte: u8| {
            let t = Transmit {
                destination: to.local_addr().unwrap(),
                ecn: None,
                contents: &[byte; 64],
                segment_size: None,
                src_ip: None,
            };
            socket.try_send(&t).unwrap();
        };
        let got = |s: &std::net::UdpSocket| {
            let mut buf = [0u8; 128];
            s.recv(&mut buf).ok().map(|_| buf[0])
        };
        let mut t = AddrFaults::default();
        t.drop.insert(a.local_addr().unwrap());
        t.delay
            .insert(b.local_addr().unwrap(), Duration::from_millis(150));
        faults.set(t);
        let t0 = Instant::now();
        send(&a, 1);
        send(&b, 2);
        send(&c, 3);
        assert_eq!(got(&c), Some(3), "an address without a fault passes");
        assert_eq!(got(&b), Some(2), "a delayed datagram arrives");
        assert!(
            t0.elapsed() >= Duration::from_millis(150),
            "{:?}",
            t0.elapsed()
        );
        assert_eq!(got(&a), None, "a dropped address gets nothing");
        assert_eq!((faults.dropped.get(), faults.delayed.get()), (1, 1));

        // Received from a dropped address: gone; from others: kept.
        let recv = || async {
            let mut storage = [[0u8; 128]; 4];
            let mut bufs: Vec<IoSliceMut<'_>> =
                storage.iter_mut().map(|b| IoSliceMut::new(b)).collect();
            let mut meta = [RecvMeta::default(); 4];
            let n = tokio::time::timeout(
                Duration::from_secs(5),
                std::future::poll_fn(|cx| socket.poll_recv(cx, &mut bufs, &mut meta)),
            )
            .await
            .expect("a datagram")
            .unwrap();
            meta[..n]
                .iter()
                .zip(&bufs)
                .map(|(m, b)| (m.addr, b[0]))
                .collect::<Vec<_>>()
        };
        a.send_to(&[7; 40], ours).unwrap();
        c.send_to(&[9; 40], ours).unwrap();
        // a's went first: had it been kept, it would come first.
        let seen = recv().await;
        assert_eq!(
            seen,
            [(c.local_addr().unwrap(), 9)],
            "a's datagram was dropped"
        );
        assert_eq!(faults.dropped.get(), 2);
        faults.set(AddrFaults::default());
        a.send_to(&[8; 40], ours).unwrap();
        send(&a, 4);
        assert_eq!(got(&a), Some(4));
        assert_eq!(recv().await, [(a.local_addr().unwrap(), 8)]);
    }
}
