//! Measuring ends the rig runs inside a namespace (`fedmesh-e2e probe
//! …` under `ip netns exec`): UDP echo and ping for loss and round-trip
//! time, a TCP sender and sink for goodput. Each prints one JSON line and
//! ends by itself within the time it is given.

use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Subcommand;
use serde::{Deserialize, Serialize};

#[derive(Subcommand, Debug)]
pub enum Probe {
    /// Echoes every datagram, stamped with how many it has received.
    UdpEcho {
        #[arg(long)]
        listen: SocketAddr,
        /// Ends after this long.
        #[arg(long)]
        secs: u64,
    },
    /// Sends `count` datagrams at `rate` per second to an echo and reports
    /// loss each way and round-trip times.
    UdpPing {
        #[arg(long)]
        to: SocketAddr,
        #[arg(long)]
        count: u64,
        #[arg(long)]
        rate: u64,
    },
    /// Accepts one TCP connection and reads it to the end.
    TcpSink {
        #[arg(long)]
        listen: SocketAddr,
        /// Gives up after this long.
        #[arg(long)]
        secs: u64,
    },
    /// Accepts one QUIC connection (the gateways' transport settings and
    /// socket buffers, an SVID of the CA in `ca_dir`), reads its first
    /// stream for `secs` from the first byte, then closes the connection.
    QuicSink {
        #[arg(long)]
        listen: SocketAddr,
        #[arg(long)]
        ca_dir: std::path::PathBuf,
        #[arg(long)]
        secs: f64,
        /// Congestion controller (cubic, newreno, bbr); the gateways' default when absent.
        #[arg(long)]
        congestion: Option<fedmesh_gateway::Algorithm>,
    },
    /// Sends on one stream of a fresh QUIC connection with the gateways'
    /// settings until the sink closes it (at most `secs`).
    QuicSend {
        #[arg(long)]
        to: SocketAddr,
        #[arg(long)]
        ca_dir: std::path::PathBuf,
        #[arg(long)]
        secs: f64,
        /// Congestion controller (cubic, newreno, bbr); the gateways' default when absent.
        #[arg(long)]
        congestion: Option<fedmesh_gateway::Algorithm>,
    },
    /// Runs the rig's echo load against `to` (as a meshed app in the
    /// namespace would: a redirected connection to a ClusterSet IP) and
    /// reports what was served, and by which app. `to` is `ip:port`, or
    /// `name:port` resolved (A record, over UDP) by the DNS server `dns`
    /// as a pod's resolver would.
    Load {
        #[arg(long)]
        to: String,
        #[arg(long)]
        dns: Option<SocketAddr>,
        #[arg(long, default_value_t = 4)]
        connections: usize,
        #[arg(long, default_value_t = 10)]
        requests: usize,
    },
    /// Sends for `secs` seconds on one TCP connection.
    TcpSend {
        #[arg(long)]
        to: SocketAddr,
        #[arg(long)]
        secs: f64,
        /// TCP congestion control for this socket (`cubic`, `bbr`, `reno`).
        #[arg(long)]
        congestion: Option<String>,
    },
}

#[derive(Debug, Serialize, Deserialize, Clone, Default)]
pub struct PingReport {
    pub sent: u64,
    /// How many the echo saw (the highest count stamped on an echo).
    pub peer_received: u64,
    pub received: u64,
    pub rtt_p10_ms: f64,
    pub rtt_p50_ms: f64,
    pub rtt_p90_ms: f64,
}

impl PingReport {
    pub fn loss_out_percent(&self) -> f64 {
        100.0 * (1.0 - self.peer_received as f64 / self.sent.max(1) as f64)
    }

    pub fn loss_back_percent(&self) -> f64 {
        100.0 * (1.0 - self.received as f64 / self.peer_received.max(1) as f64)
    }
}

#[derive(Debug, Serialize, Deserialize, Clone, Default)]
pub struct SinkReport {
    pub bytes: u64,
    /// From the first byte to the end.
    pub secs: f64,
}

impl SinkReport {
    pub fn mbit(&self) -> f64 {
        self.bytes as f64 * 8.0 / self.secs.max(1e-9) / 1e6
    }
}

pub async fn run(p: Probe) -> anyhow::Result<()> {
    let line = match p {
        Probe::QuicSink {
            listen,
            ca_dir,
            secs,
            congestion,
        } => serde_json::to_string(
            &quic::sink(listen, &ca_dir, Duration::from_secs_f64(secs), congestion).await?,
        )?,
        Probe::QuicSend {
            to,
            ca_dir,
            secs,
            congestion,
        } => {
            let sent = quic::send(to, &ca_dir, Duration::from_secs_f64(secs), congestion).await?;
            serde_json::to_string(&serde_json::json!({ "bytes": sent }))?
        }
        Probe::Load {
            to,
            dns,
            connections,
            requests,
        } => {
            let to = match to.parse::<SocketAddr>() {
                Ok(a) => a,
                Err(_) => {
                    let (host, port) = to.rsplit_once(':').context("--to needs a port")?;
                    let dns = dns.context("--to names a host: give --dns")?;
                    SocketAddr::new(resolve(dns, host).await?.into(), port.parse()?)
                }
            };
            let spec = fedmesh_testkit::LoadSpec {
                connections,
                requests_per_connection: requests,
                timeout: Duration::from_secs(3),
                ..fedmesh_testkit::LoadSpec::default()
            };
            let r = fedmesh_testkit::run_load(to, &spec).await;
            serde_json::to_string(&serde_json::json!({
                "to": to.to_string(),
                "ok": r.ok,
                "failed": r.failed,
                "served_by": r.served_by,
                "errors": r.errors,
            }))?
        }
        // Blocking sockets and threads: their timing is their own.
        p => return tokio::task::spawn_blocking(move || run_blocking(p)).await?,
    };
    println!("{line}");
    Ok(())
}

fn run_blocking(p: Probe) -> anyhow::Result<()> {
    let line = match p {
        Probe::QuicSink { .. } | Probe::QuicSend { .. } | Probe::Load { .. } => {
            anyhow::bail!("QUIC and load probes run on the runtime")
        }
        Probe::UdpEcho { listen, secs } => {
            udp_echo(listen, Duration::from_secs(secs))?;
            return Ok(());
        }
        Probe::UdpPing { to, count, rate } => serde_json::to_string(&udp_ping(to, count, rate)?)?,
        Probe::TcpSink { listen, secs } => {
            serde_json::to_string(&tcp_sink(listen, Duration::from_secs(secs))?)?
        }
        Probe::TcpSend {
            to,
            secs,
            congestion,
        } => {
            let sent = tcp_send(to, Duration::from_secs_f64(secs), congestion.as_deref())?;
            serde_json::to_string(&serde_json::json!({ "bytes": sent }))?
        }
    };
    println!("{line}");
    Ok(())
}

/// `host`'s first A record, asked of the DNS server `dns` over UDP.
async fn resolve(dns: SocketAddr, host: &str) -> anyhow::Result<std::net::Ipv4Addr> {
    let ips = fedmesh_federation::dns::client::lookup(
        dns,
        host,
        fedmesh_federation::dns::client::RecordType::A,
        Duration::from_secs(1),
        3,
    )
    .await?;
    ips.into_iter()
        .find_map(|ip| match ip {
            std::net::IpAddr::V4(v4) => Some(v4),
            std::net::IpAddr::V6(_) => None,
        })
        .with_context(|| format!("{host}: no A record"))
}

/// The first line a listening probe prints: the runner starts the other
/// end only after it.
fn ready(listen: SocketAddr) {
    println!("{}", serde_json::json!({ "listening": listen.to_string() }));
}

fn udp_echo(listen: SocketAddr, limit: Duration) -> anyhow::Result<()> {
    let s = UdpSocket::bind(listen).with_context(|| format!("binding {listen}"))?;
    ready(listen);
    s.set_read_timeout(Some(Duration::from_millis(100)))?;
    let end = Instant::now() + limit;
    let mut buf = [0u8; 2048];
    let mut count = 0u64;
    while Instant::now() < end {
        let (n, from) = match s.recv_from(&mut buf) {
            Ok(r) => r,
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => continue,
            Err(e) => return Err(e.into()),
        };
        if n < 16 {
            continue;
        }
        count += 1;
        buf[8..16].copy_from_slice(&count.to_be_bytes());
        let _ = s.send_to(&buf[..n], from);
    }
    Ok(())
}

fn udp_ping(to: SocketAddr, count: u64, rate: u64) -> anyhow::Result<PingReport> {
    let s = UdpSocket::bind(if to.is_ipv4() { "0.0.0.0:0" } else { "[::]:0" })?;
    s.connect(to)?;
    s.set_read_timeout(Some(Duration::from_millis(50)))?;
    let t0 = Instant::now();
    let done = Arc::new(AtomicBool::new(false));
    let sender = {
        let s = s.try_clone()?;
        let done = done.clone();
        std::thread::spawn(move || {
            let gap = Duration::from_secs_f64(1.0 / rate.max(1) as f64);
            let mut sent = 0u64;
            for seq in 0..count {
                let due = t0 + gap * u32::try_from(seq).unwrap_or(u32::MAX);
                if let Some(wait) = due.checked_duration_since(Instant::now()) {
                    std::thread::sleep(wait);
                }
                let mut p = [0u8; 64];
                p[..8].copy_from_slice(&seq.to_be_bytes());
                let at = u64::try_from(t0.elapsed().as_nanos()).unwrap_or(u64::MAX);
                p[16..24].copy_from_slice(&at.to_be_bytes());
                if s.send(&p).is_ok() {
                    sent += 1;
                }
            }
            done.store(true, Ordering::Relaxed);
            sent
        })
    };
    let mut rtts = Vec::new();
    let mut peer_received = 0u64;
    let mut buf = [0u8; 2048];
    let mut quiet_since: Option<Instant> = None;
    // Bounded: the sender ends after count/rate, and we wait one second
    // of quiet after it for the last echoes.
    loop {
        match s.recv(&mut buf) {
            Ok(n) if n >= 24 => {
                let at = u64::from_be_bytes(buf[16..24].try_into().unwrap_or_default());
                let now = u64::try_from(t0.elapsed().as_nanos()).unwrap_or(u64::MAX);
                rtts.push(now.saturating_sub(at) as f64 / 1e6);
                peer_received = peer_received.max(u64::from_be_bytes(
                    buf[8..16].try_into().unwrap_or_default(),
                ));
            }
            Ok(_) => {}
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
            // An ICMP error from a port not yet open: keep going.
            Err(e) if e.kind() == ErrorKind::ConnectionRefused => {}
            Err(e) => return Err(e.into()),
        }
        if done.load(Ordering::Relaxed) {
            let q = *quiet_since.get_or_insert_with(Instant::now);
            if q.elapsed() > Duration::from_secs(1) {
                break;
            }
        }
    }
    let sent = sender.join().unwrap_or(0);
    rtts.sort_by(f64::total_cmp);
    let pct = |p: f64| {
        if rtts.is_empty() {
            0.0
        } else {
            rtts[((rtts.len() - 1) as f64 * p) as usize]
        }
    };
    Ok(PingReport {
        sent,
        peer_received,
        received: rtts.len() as u64,
        rtt_p10_ms: pct(0.1),
        rtt_p50_ms: pct(0.5),
        rtt_p90_ms: pct(0.9),
    })
}

fn tcp_sink(listen: SocketAddr, limit: Duration) -> anyhow::Result<SinkReport> {
    let l = TcpListener::bind(listen).with_context(|| format!("binding {listen}"))?;
    ready(listen);
    l.set_nonblocking(true)?;
    let end = Instant::now() + limit;
    let mut c = loop {
        match l.accept() {
            Ok((c, _)) => break c,
            Err(e) if e.kind() == ErrorKind::WouldBlock => {
                anyhow::ensure!(Instant::now() < end, "no connection within {limit:?}");
                std::thread::sleep(Duration::from_millis(5));
            }
            Err(e) => return Err(e.into()),
        }
    };
    c.set_nonblocking(false)?;
    c.set_read_timeout(Some(Duration::from_millis(200)))?;
    let mut buf = vec![0u8; 256 * 1024];
    let mut bytes = 0u64;
    let mut first: Option<Instant> = None;
    let mut last = Instant::now();
    while Instant::now() < end {
        match c.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                first.get_or_insert_with(Instant::now);
                last = Instant::now();
                bytes += n as u64;
            }
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(SinkReport {
        bytes,
        secs: first.map_or(0.0, |f| (last - f).as_secs_f64()),
    })
}

fn tcp_send(to: SocketAddr, secs: Duration, congestion: Option<&str>) -> anyhow::Result<u64> {
    let sock = socket2::Socket::new(
        socket2::Domain::for_address(to),
        socket2::Type::STREAM,
        None,
    )?;
    if let Some(cc) = congestion {
        sock.set_tcp_congestion(cc.as_bytes())
            .with_context(|| format!("TCP congestion control {cc}"))?;
    }
    sock.connect_timeout(&to.into(), Duration::from_secs(5))
        .with_context(|| format!("connecting to {to}"))?;
    let mut c: TcpStream = sock.into();
    c.set_write_timeout(Some(Duration::from_millis(200)))?;
    let buf = vec![0x5au8; 64 * 1024];
    let end = Instant::now() + secs;
    let mut sent = 0u64;
    while Instant::now() < end {
        match c.write(&buf) {
            Ok(n) => sent += n as u64,
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
            Err(e) => return Err(e.into()),
        }
    }
    c.shutdown(std::net::Shutdown::Write)?;
    Ok(sent)
}

/// Raw quinn between two namespaces: what QUIC itself moves on the path,
/// with the gateways' transport settings (windows, MTU discovery,
/// keep-alives) and their UDP socket buffers.
mod quic {
    use std::net::SocketAddr;
    use std::path::Path;
    use std::time::{Duration, Instant};

    use anyhow::Context;
    use fedmesh_transport::Limits;
    use fedmesh_trust::{CertificateAuthority, SharedBundles, SvidSource, TrustBundles};

    use super::SinkReport;
    use fedmesh_gateway::{Algorithm, CongestionConfig};

    fn congestion(cc: Option<Algorithm>) -> CongestionConfig {
        let mut c = CongestionConfig::default();
        if let Some(a) = cc {
            c.controller = a;
        }
        c
    }

    fn identity(ca_dir: &Path) -> anyhow::Result<(SvidSource, SharedBundles)> {
        let ca = CertificateAuthority::load(ca_dir)
            .with_context(|| format!("loading the CA in {}", ca_dir.display()))?;
        let id = ca.trust_domain().system_id("gateway");
        let svid = SvidSource::new(ca.issue(&id, Duration::from_secs(3600))?)?;
        let bundles = SharedBundles::new(TrustBundles::new().with(ca.bundle()));
        Ok((svid, bundles))
    }

    fn endpoint(
        addr: SocketAddr,
        server: Option<quinn::ServerConfig>,
        limits: &Limits,
    ) -> anyhow::Result<quinn::Endpoint> {
        Ok(fedmesh_gateway::quic_baseline_endpoint(
            addr, server, limits,
        )?)
    }

    pub async fn sink(
        listen: SocketAddr,
        ca_dir: &Path,
        window: Duration,
        cc: Option<Algorithm>,
    ) -> anyhow::Result<SinkReport> {
        let limits = Limits::default();
        let (svid, bundles) = identity(ca_dir)?;
        let server = fedmesh_gateway::quic_server_config(&svid, bundles, &limits, &congestion(cc))?;
        let ep = endpoint(listen, Some(server), &limits)?;
        super::ready(listen);
        // Goodput over `window` from the first byte; what the sender still
        // buffers after it would take long to drain on a lossy path.
        let run = async {
            let conn = ep.accept().await.context("no connection")?.await?;
            let (_send, mut recv) = conn.accept_bi().await?;
            let mut bytes = 0u64;
            let mut first: Option<Instant> = None;
            loop {
                let left = first.map_or(window, |f| window.saturating_sub(f.elapsed()));
                if left.is_zero() {
                    break;
                }
                match tokio::time::timeout(left, recv.read_chunk(1 << 20, true)).await {
                    Ok(Ok(Some(c))) => {
                        if first.is_none() {
                            first = Some(Instant::now());
                        } else {
                            bytes += c.bytes.len() as u64;
                        }
                    }
                    Ok(Ok(None)) => break,
                    Ok(Err(e)) => return Err(e.into()),
                    Err(_) => {}
                }
            }
            conn.close(0u32.into(), b"done");
            anyhow::Ok(SinkReport {
                bytes,
                secs: first.map_or(0.0, |f| f.elapsed().as_secs_f64()),
            })
        };
        tokio::time::timeout(window + Duration::from_secs(30), run)
            .await
            .context("no stream within 30 s")?
    }

    pub async fn send(
        to: SocketAddr,
        ca_dir: &Path,
        secs: Duration,
        cc: Option<Algorithm>,
    ) -> anyhow::Result<u64> {
        let limits = Limits::default();
        let (svid, bundles) = identity(ca_dir)?;
        let from: SocketAddr = if to.is_ipv4() { "0.0.0.0:0" } else { "[::]:0" }.parse()?;
        let mut ep = endpoint(from, None, &limits)?;
        ep.set_default_client_config(fedmesh_gateway::quic_client_config(
            &svid,
            bundles,
            &limits,
            &congestion(cc),
        )?);
        let conn =
            tokio::time::timeout(Duration::from_secs(10), ep.connect(to, "fedmesh.invalid")?)
                .await
                .context("no QUIC handshake within 10 s")??;
        // A bidirectional stream: the gateways allow no unidirectional ones.
        let (mut s, _recv) = conn.open_bi().await?;
        let chunk = bytes::Bytes::from(vec![0x5au8; 64 * 1024]);
        let end = Instant::now() + secs;
        let mut sent = 0u64;
        // The sink closes the connection when it has measured enough.
        while Instant::now() < end {
            match tokio::time::timeout_at(end.into(), s.write_chunk(chunk.clone())).await {
                Ok(Ok(())) => sent += chunk.len() as u64,
                Ok(Err(_)) | Err(_) => break,
            }
        }
        conn.close(0u32.into(), b"done");
        Ok(sent)
    }
}
