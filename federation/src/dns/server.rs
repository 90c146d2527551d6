//! The controller's DNS server for `clusterset.local`: UDP and TCP on one
//! address, answers from the current [`Zone`], every query counted.
//!
//! Untrusted input: a packet that does not decode as a DNS query is
//! dropped and counted; queries beyond `max_queries_per_second` are
//! answered `REFUSED` up to as many again per second, the rest dropped,
//! both counted (a flood costs at most twice the configured answer rate);
//! TCP connections are capped, idle ones closed.

use std::io;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hickory_proto::op::{Message, ResponseCode};
use hickory_proto::ProtoError;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use super::{Zone, MAX_UDP_PAYLOAD};

/// `dns:` in the controller config.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DnsConfig {
    /// UDP and TCP address the zone is served on; the cluster's CoreDNS
    /// forwards `clusterset.local` here.
    pub listen: SocketAddr,
    /// TTL of every record (and of negative answers).
    #[serde(default = "default_ttl", with = "humantime_serde")]
    pub ttl: Duration,
    /// Queries answered per second; beyond it, as many again are answered
    /// `REFUSED` and the rest dropped.
    #[serde(default = "default_rate")]
    pub max_queries_per_second: u32,
    #[serde(default = "default_tcp")]
    pub max_tcp_connections: usize,
    /// A TCP connection with no query for this long is closed.
    #[serde(default = "default_idle", with = "humantime_serde")]
    pub tcp_idle_timeout: Duration,
}

fn default_ttl() -> Duration {
    Duration::from_secs(5)
}
fn default_rate() -> u32 {
    5000
}
fn default_tcp() -> usize {
    64
}
fn default_idle() -> Duration {
    Duration::from_secs(10)
}

impl DnsConfig {
    pub fn new(listen: SocketAddr) -> Self {
        Self {
            listen,
            ttl: default_ttl(),
            max_queries_per_second: default_rate(),
            max_tcp_connections: default_tcp(),
            tcp_idle_timeout: default_idle(),
        }
    }

    pub fn problems(&self) -> Vec<String> {
        let mut p = Vec::new();
        if self.ttl > Duration::from_secs(86_400) {
            p.push("dns.ttl: at most 24h".into());
        }
        if self.max_queries_per_second == 0 || self.max_queries_per_second > 1_000_000 {
            p.push("dns.max_queries_per_second: 1 to 1000000".into());
        }
        if self.max_tcp_connections == 0 || self.max_tcp_connections > 65_536 {
            p.push("dns.max_tcp_connections: 1 to 65536".into());
        }
        if self.tcp_idle_timeout.is_zero() || self.tcp_idle_timeout > Duration::from_secs(3600) {
            p.push("dns.tcp_idle_timeout: more than 0, at most 1h".into());
        }
        p
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RcodeLabels {
    rcode: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TransportLabels {
    transport: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ActionLabels {
    action: &'static str,
}

/// `fedmesh_dns_*`.
#[derive(Clone, Debug, Default)]
pub struct DnsMetrics {
    responses: Family<RcodeLabels, Counter>,
    malformed: Family<TransportLabels, Counter>,
    limited: Family<ActionLabels, Counter>,
    truncated: Counter,
    names: Gauge,
}

fn rcode_label(c: ResponseCode) -> &'static str {
    match c {
        ResponseCode::NoError => "noerror",
        ResponseCode::NXDomain => "nxdomain",
        ResponseCode::Refused => "refused",
        ResponseCode::FormErr => "formerr",
        ResponseCode::NotImp => "notimp",
        ResponseCode::ServFail => "servfail",
        _ => "other",
    }
}

impl DnsMetrics {
    pub fn register(&self, reg: &mut Registry) {
        let reg = reg.sub_registry_with_prefix("fedmesh_dns");
        reg.register(
            "responses",
            "DNS answers sent for clusterset.local, by response code",
            self.responses.clone(),
        );
        reg.register(
            "malformed",
            "Packets or TCP messages that are not DNS queries, dropped",
            self.malformed.clone(),
        );
        reg.register(
            "rate_limited",
            "Queries beyond dns.max_queries_per_second: answered REFUSED (refused) or not at all (dropped); TCP connections beyond the cap (tcp_full)",
            self.limited.clone(),
        );
        reg.register(
            "truncated",
            "UDP answers too large for the client, sent truncated (it retries over TCP)",
            self.truncated.clone(),
        );
        reg.register(
            "names",
            "Names in the clusterset.local zone with records",
            self.names.clone(),
        );
    }

    pub fn responses(&self, rcode: &'static str) -> u64 {
        self.responses.get_or_create(&RcodeLabels { rcode }).get()
    }

    pub fn malformed(&self, transport: &'static str) -> u64 {
        self.malformed
            .get_or_create(&TransportLabels { transport })
            .get()
    }

    pub fn limited(&self, action: &'static str) -> u64 {
        self.limited.get_or_create(&ActionLabels { action }).get()
    }

    fn limit(&self, action: &'static str) {
        self.limited.get_or_create(&ActionLabels { action }).inc();
    }
}

/// Tokens per second with a one-second burst.
#[derive(Debug)]
struct Bucket {
    rate: f64,
    tokens: f64,
    last: Instant,
}

impl Bucket {
    fn new(rate: u32, now: Instant) -> Self {
        Self {
            rate: f64::from(rate),
            tokens: f64::from(rate),
            last: now,
        }
    }

    fn take(&mut self, now: Instant) -> bool {
        let dt = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = now;
        self.tokens = (self.tokens + dt * self.rate).min(self.rate);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// What to do with one query, by the rate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Admit {
    Answer,
    Refuse,
    Drop,
}

#[derive(Debug)]
struct Limiter {
    answer: Bucket,
    refuse: Bucket,
}

impl Limiter {
    fn new(rate: u32, now: Instant) -> Self {
        Self {
            answer: Bucket::new(rate, now),
            refuse: Bucket::new(rate, now),
        }
    }

    fn on_query(&mut self, now: Instant) -> Admit {
        if self.answer.take(now) {
            Admit::Answer
        } else if self.refuse.take(now) {
            Admit::Refuse
        } else {
            Admit::Drop
        }
    }
}

struct Shared {
    zone: watch::Receiver<Arc<Zone>>,
    limiter: Mutex<Limiter>,
    metrics: DnsMetrics,
    cfg: DnsConfig,
}

/// What becomes of one received message.
enum Outcome {
    /// These bytes go back.
    Reply(Vec<u8>),
    /// Nothing goes back (the rate's drop).
    Silent,
    /// Not a DNS query: dropped, counted; a TCP stream carrying one can no
    /// longer be trusted and is closed.
    Malformed,
}

impl Shared {
    fn malformed(&self, transport: &'static str, bytes: usize) -> Outcome {
        self.metrics
            .malformed
            .get_or_create(&TransportLabels { transport })
            .inc();
        tracing::debug!(transport, bytes, "malformed DNS message dropped");
        Outcome::Malformed
    }

    /// What to do with `packet`. Over UDP the answer is truncated to what
    /// the client said it receives.
    fn handle(&self, packet: &[u8], transport: &'static str, udp: bool) -> Outcome {
        let Ok(req) = Message::from_vec(packet) else {
            return self.malformed(transport, packet.len());
        };
        let admit = self
            .limiter
            .lock()
            .map(|mut l| l.on_query(Instant::now()))
            .unwrap_or(Admit::Drop);
        let resp = match admit {
            Admit::Drop => {
                self.metrics.limit("dropped");
                return Outcome::Silent;
            }
            Admit::Refuse => {
                self.metrics.limit("refused");
                let mut m = Message::error_msg(req.id(), req.op_code(), ResponseCode::Refused);
                m.add_queries(req.queries().iter().take(1).cloned());
                m
            }
            Admit::Answer => match self.zone.borrow().answer(&req) {
                Some(resp) => resp,
                // A response sent to us: not a query.
                None => return self.malformed(transport, packet.len()),
            },
        };
        self.metrics
            .responses
            .get_or_create(&RcodeLabels {
                rcode: rcode_label(resp.response_code()),
            })
            .inc();
        let max = match (udp, req.extensions()) {
            (false, _) => usize::from(u16::MAX),
            (true, Some(e)) => usize::from(e.max_payload().clamp(512, MAX_UDP_PAYLOAD)),
            (true, None) => 512,
        };
        let (bytes, truncated) = fit(&resp, max);
        if truncated {
            self.metrics.truncated.inc();
        }
        match bytes {
            Ok(b) => Outcome::Reply(b),
            Err(e) => {
                tracing::warn!(error = %e, "a DNS answer did not encode");
                Outcome::Silent
            }
        }
    }
}

/// `resp` encoded in at most `max` bytes, and whether it had to be
/// truncated (TC: the client asks again over TCP). Additional records are
/// optional (RFC 2181 §9): an answer that fits without them goes without
/// them, and without TC.
fn fit(resp: &Message, max: usize) -> (Result<Vec<u8>, ProtoError>, bool) {
    match resp.to_vec() {
        Ok(b) if b.len() > max => {
            let mut lean = resp.clone();
            lean.take_additionals();
            match lean.to_vec() {
                Ok(b) if b.len() <= max => (Ok(b), false),
                _ => (resp.truncate().to_vec(), true),
            }
        }
        other => (other, false),
    }
}

struct Abort(JoinHandle<()>);

impl Drop for Abort {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// A running DNS server; dropping it stops it.
pub struct DnsServer {
    udp: SocketAddr,
    tcp: SocketAddr,
    _tasks: Vec<Abort>,
}

impl DnsServer {
    pub fn udp_addr(&self) -> SocketAddr {
        self.udp
    }

    pub fn tcp_addr(&self) -> SocketAddr {
        self.tcp
    }
}

/// Binds UDP and TCP on `cfg.listen` (the same port for both, also when
/// it is 0) and serves `zone` until dropped.
pub async fn spawn(
    cfg: &DnsConfig,
    zone: watch::Receiver<Arc<Zone>>,
    metrics: DnsMetrics,
) -> io::Result<DnsServer> {
    let (udp, tcp) = bind(cfg.listen).await?;
    let udp_addr = udp.local_addr()?;
    let tcp_addr = tcp.local_addr()?;
    let names = {
        let metrics = metrics.clone();
        let mut zone = zone.clone();
        tokio::spawn(async move {
            loop {
                let n = zone.borrow_and_update().len();
                metrics.names.set(i64::try_from(n).unwrap_or(i64::MAX));
                if zone.changed().await.is_err() {
                    return;
                }
            }
        })
    };
    let shared = Arc::new(Shared {
        zone,
        limiter: Mutex::new(Limiter::new(cfg.max_queries_per_second, Instant::now())),
        metrics,
        cfg: cfg.clone(),
    });
    tracing::info!(udp = %udp_addr, tcp = %tcp_addr, "serving clusterset.local");
    Ok(DnsServer {
        udp: udp_addr,
        tcp: tcp_addr,
        _tasks: vec![
            Abort(names),
            Abort(tokio::spawn(serve_udp(udp, shared.clone()))),
            Abort(tokio::spawn(serve_tcp(tcp, shared))),
        ],
    })
}

async fn bind(addr: SocketAddr) -> io::Result<(UdpSocket, TcpListener)> {
    if addr.port() != 0 {
        return Ok((UdpSocket::bind(addr).await?, TcpListener::bind(addr).await?));
    }
    // A free port for both: the one the system gives UDP is usually free
    // for TCP too; try a few.
    let mut last = None;
    for _ in 0..16 {
        let udp = UdpSocket::bind(addr).await?;
        match TcpListener::bind(udp.local_addr()?).await {
            Ok(tcp) => return Ok((udp, tcp)),
            Err(e) => last = Some(e),
        }
    }
    Err(last.unwrap_or_else(|| io::Error::other("no free port")))
}

async fn serve_udp(sock: UdpSocket, shared: Arc<Shared>) {
    let mut buf = vec![0u8; 4096];
    loop {
        let (n, from) = match sock.recv_from(&mut buf).await {
            Ok(r) => r,
            Err(e) => {
                // ICMP errors of earlier sends surface here on some systems.
                tracing::debug!(error = %e, "DNS UDP receive failed");
                continue;
            }
        };
        if let Outcome::Reply(out) = shared.handle(&buf[..n], "udp", true) {
            if let Err(e) = sock.send_to(&out, from).await {
                tracing::debug!(%from, error = %e, "DNS UDP send failed");
            }
        }
    }
}

async fn serve_tcp(listener: TcpListener, shared: Arc<Shared>) {
    let open = Arc::new(tokio::sync::Semaphore::new(shared.cfg.max_tcp_connections));
    loop {
        let (conn, from) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(error = %e, "DNS TCP accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Ok(permit) = open.clone().try_acquire_owned() else {
            shared.metrics.limit("tcp_full");
            drop(conn);
            continue;
        };
        let shared = shared.clone();
        tokio::spawn(async move {
            if let Err(e) = serve_conn(conn, &shared).await {
                tracing::debug!(%from, error = %e, "DNS TCP connection ended");
            }
            drop(permit);
        });
    }
}

/// Queries on one TCP connection, each a 2-byte length and a message (RFC
/// 7766), until the client closes or stays idle.
async fn serve_conn(mut conn: TcpStream, shared: &Shared) -> io::Result<()> {
    let idle = shared.cfg.tcp_idle_timeout;
    let mut buf = vec![0u8; usize::from(u16::MAX)];
    loop {
        let len = match tokio::time::timeout(idle, conn.read_u16()).await {
            Err(_) => return Ok(()),
            Ok(Err(e)) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(()),
            Ok(r) => usize::from(r?),
        };
        let msg = &mut buf[..len];
        tokio::time::timeout(idle, conn.read_exact(msg))
            .await
            .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "query cut short"))??;
        let out = match shared.handle(msg, "tcp", false) {
            Outcome::Reply(out) => out,
            Outcome::Silent => continue,
            Outcome::Malformed => return Ok(()),
        };
        let len = u16::try_from(out.len()).map_err(|_| io::Error::other("answer too long"))?;
        let mut framed = Vec::with_capacity(out.len() + 2);
        framed.extend_from_slice(&len.to_be_bytes());
        framed.extend_from_slice(&out);
        conn.write_all(&framed).await?;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_flood_is_answered_at_the_rate_then_refused_then_dropped() {
        let t0 = Instant::now();
        let mut l = Limiter::new(100, t0);
        let mut seen = std::collections::BTreeMap::new();
        // 1,000 queries within one instant: 100 answered, 100 refused.
        for _ in 0..1000 {
            *seen.entry(format!("{:?}", l.on_query(t0))).or_insert(0) += 1;
        }
        assert_eq!(seen["Answer"], 100);
        assert_eq!(seen["Refuse"], 100);
        assert_eq!(seen["Drop"], 800);
        // Half a second later, half a second's worth again.
        let t1 = t0 + Duration::from_millis(500);
        let answered = (0..1000)
            .filter(|_| l.on_query(t1) == Admit::Answer)
            .count();
        assert_eq!(answered, 50);
    }

    #[test]
    fn additionals_go_first_then_the_answer_is_truncated() {
        use crate::dns::Zone;
        use fedmesh_catalog::mcs::{HeadlessEndpoint, Import, Port, Protocol, ServiceType};
        use hickory_proto::op::Query;
        use hickory_proto::rr::{Name, RecordType};
        let zone = |n: u32| {
            let svc = fedmesh_wire::ServiceName::new("db", "demo").unwrap();
            let c = fedmesh_catalog::ClusterName::new("east").unwrap();
            let eps = (0..n)
                .map(|i| HeadlessEndpoint {
                    ip: std::net::Ipv4Addr::from(0x0a00_0000 + i).into(),
                    hostname: Some(format!("db-{i}")),
                })
                .collect();
            let imp = Import {
                service: svc.clone(),
                service_type: ServiceType::Headless,
                ports: vec![Port::named("pg", 5432, Protocol::Tcp)],
                meta: Default::default(),
                exporters: vec![c.clone()],
                clusters: vec![],
                conflicts: vec![],
                endpoints: [(c, eps)].into(),
            };
            Zone::build(
                [(&svc, &imp)],
                &Default::default(),
                Duration::from_secs(5),
                1,
            )
        };
        let mut q = Message::new();
        q.add_query(Query::query(
            Name::from_ascii("_pg._tcp.db.demo.svc.clusterset.local.").unwrap(),
            RecordType::SRV,
        ));
        let decode = |z: &Zone| {
            let (bytes, tc) = fit(&z.answer(&q).unwrap(), 512);
            let m = Message::from_vec(&bytes.unwrap()).unwrap();
            assert!(m.to_vec().unwrap().len() <= 512);
            (m, tc)
        };
        // 3 SRV records and their addresses fit.
        let (m, tc) = decode(&zone(3));
        assert_eq!(
            (m.answers().len(), m.additionals().len(), tc),
            (3, 3, false)
        );
        // 7 fit only without the addresses: sent whole, no TC.
        let (m, tc) = decode(&zone(7));
        assert_eq!(
            (m.answers().len(), m.additionals().len(), tc),
            (7, 0, false)
        );
        assert!(!m.truncated());
        // 40 do not fit at all: truncated, TC set.
        let (m, tc) = decode(&zone(40));
        assert!(tc && m.truncated());
        assert!(m.answers().is_empty());
    }

    #[test]
    fn config_bounds() {
        let mut c = DnsConfig::new("127.0.0.1:53".parse().unwrap());
        assert!(c.problems().is_empty());
        c.max_queries_per_second = 0;
        c.max_tcp_connections = 0;
        c.tcp_idle_timeout = Duration::ZERO;
        c.ttl = Duration::from_secs(100_000);
        assert_eq!(c.problems().len(), 4, "{:?}", c.problems());
    }
}
