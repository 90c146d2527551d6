//! Benchmark programs. `datapath`: every data path with its proxies as
//! separate processes against direct TCP, haproxy and a stunnel pair, in
//! one run. `tunnel`: the mesh's paths inside this process, for quick
//! A/B of one change. `http`: the sidecar's L7 path. `propagation`: the
//! control plane at federation scale.
//!
//! `cargo run --release -p fedmesh-bench -- datapath [--quick] [--json]`

mod datapath;
mod http;
mod procs;
mod propagation;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::{Parser, Subcommand};
use fedmesh_testkit::{percentile, AppKind, ClusterTopo, ControlPlane, Rig, ServiceTopo, Topology};
use serde_json::json;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

#[derive(Parser)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Every data path with its proxies as separate processes (direct TCP,
    /// haproxy, stunnel pair, sidecar pair, cross-cluster over QUIC and
    /// over the TCP fallback, raw quinn): goodput, CPU-seconds per GB per
    /// process, latency back to back and at fixed rates, new connections,
    /// RSS. Needs haproxy, stunnel4 and the `fedmesh` binary.
    Datapath {
        /// A seconds-long smoke (small transfers, short phases): checks
        /// that every path works; its figures mean nothing.
        #[arg(long)]
        quick: bool,
        /// Bytes per bulk run [default: 1 GiB, 16 MiB with --quick].
        #[arg(long)]
        bytes: Option<u64>,
        /// Bulk runs per path and width, best reported [default: 3, 1 with --quick].
        #[arg(long)]
        runs: Option<usize>,
        /// 64-byte round trips back to back [default: 20000, 300 with --quick].
        #[arg(long)]
        round_trips: Option<usize>,
        /// Fixed request rates per second, comma-separated.
        #[arg(long, value_delimiter = ',', default_value = "1000,10000")]
        rates: Vec<u32>,
        /// Length of each fixed-rate run and connection test [default: 2s, 300ms with --quick].
        #[arg(long, value_parser = humantime::parse_duration)]
        phase: Option<Duration>,
        /// Parallel clients of the new-connection rate test.
        #[arg(long, default_value_t = 16)]
        connect_workers: usize,
        /// Only these paths, comma-separated: direct, haproxy, stunnel,
        /// sidecars, quic, tcp, quinn.
        #[arg(long, value_delimiter = ',')]
        paths: Vec<String>,
        /// The fedmesh binary [default: `fedmesh` next to this program].
        #[arg(long)]
        fedmesh: Option<std::path::PathBuf>,
        /// Record a perf profile of every proxy process during the bulk
        /// runs into DIR (`<path>-<process>.data`).
        #[arg(long, value_name = "DIR")]
        perf: Option<std::path::PathBuf>,
        /// With --perf: record call graphs this way (`perf record
        /// --call-graph MODE`, e.g. `dwarf`), so copies and wake-ups are
        /// attributed to their callers; sampled at 499 Hz.
        #[arg(long, value_name = "MODE", requires = "perf")]
        perf_call_graph: Option<String>,
        /// QUIC congestion controller of every gateway (cubic, newreno,
        /// bbr) [default: the gateways' default].
        #[arg(long)]
        congestion: Option<fedmesh_gateway::Algorithm>,
        /// Pooled connections per next hop of every sidecar and gateway
        /// (`limits.pool_connections`; 0: one connection per tunneled
        /// connection) [default: theirs].
        #[arg(long = "pool")]
        sidecar_pool: Option<usize>,
        /// Worker threads of every fedmesh proxy (`--worker-threads`)
        /// [default: theirs, one per CPU].
        #[arg(long, value_parser = clap::value_parser!(u16).range(1..=1024))]
        proxy_threads: Option<u16>,
        #[arg(long)]
        json: bool,
    },
    /// The raw quinn path's far end (started by `datapath`).
    #[command(hide = true)]
    QuicPeer {
        /// A gateway config: its identity, bundles, limits and congestion.
        #[arg(long)]
        config: std::path::PathBuf,
    },
    /// Direct TCP vs local (sidecar → sidecar) vs cross-cluster
    /// (sidecar → gateway ═QUIC═ gateway → sidecar).
    Tunnel {
        /// Bytes sent per goodput run.
        #[arg(long, default_value_t = 1 << 30)]
        bytes: u64,
        /// Goodput runs per path (the best is reported).
        #[arg(long, default_value_t = 3)]
        runs: usize,
        /// 64-byte round trips per latency run.
        #[arg(long, default_value_t = 20_000)]
        round_trips: usize,
        /// Splice buffer per direction in every proxy (limits.splice_buffer_bytes).
        #[arg(long, default_value_t = 64 * 1024)]
        splice_buffer: usize,
        #[arg(long)]
        json: bool,
    },
    /// HTTP through the sidecars' L7 path vs direct vs a haproxy pair:
    /// latency added per hop and CPU per 1,000 requests/s.
    Http {
        #[arg(long, default_value_t = 1000)]
        rate: u32,
        /// Request and response body size.
        #[arg(long, default_value_t = 1024)]
        bytes: usize,
        /// Length of each path's turn.
        #[arg(long, default_value = "2s", value_parser = humantime::parse_duration)]
        phase: Duration,
        #[arg(long, default_value_t = 5)]
        rounds: usize,
        /// Keep-alive connections per path.
        #[arg(long, default_value_t = 8)]
        connections: usize,
        #[arg(long)]
        json: bool,
    },
    /// Control-plane propagation at federation scale.
    Propagation {
        #[arg(long, default_value_t = 10)]
        clusters: usize,
        /// Exported services across the whole federation.
        #[arg(long, default_value_t = 10_000)]
        services: usize,
        /// Subscribed proxies per cluster.
        #[arg(long, default_value_t = 100)]
        subscribers: usize,
        /// Service changes measured.
        #[arg(long, default_value_t = 20)]
        changes: usize,
        /// `embedded`, `etcd` or `both`.
        #[arg(long, default_value = "both")]
        stores: String,
        #[arg(long)]
        json: bool,
    },
}

fn main() -> anyhow::Result<()> {
    // The proxies' allocator settings for the client, the app and the raw
    // quinn baseline too, so no path gains from them alone.
    fedmesh_malloc::tune();
    let cli = Cli::parse();
    if let Ok(filter) = std::env::var("FEDMESH_LOG") {
        tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
            .with_writer(std::io::stderr)
            .init();
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    match cli.cmd {
        Cmd::Datapath {
            quick,
            bytes,
            runs,
            round_trips,
            rates,
            phase,
            connect_workers,
            paths,
            fedmesh,
            perf,
            perf_call_graph,
            congestion,
            sidecar_pool,
            proxy_threads,
            json,
        } => {
            if rates.iter().any(|r| *r == 0 || *r > 200_000) || connect_workers == 0 {
                bail!("--rates must be within 1..=200000, --connect-workers at least 1");
            }
            let pick = |given: Option<u64>, full: u64, smoke: u64| {
                given.unwrap_or(if quick { smoke } else { full })
            };
            rt.block_on(datapath::run(datapath::Params {
                quick,
                bytes: pick(bytes, 1 << 30, 16 << 20).max(8),
                runs: pick(runs.map(|r| r as u64), 3, 1).max(1) as usize,
                round_trips: pick(round_trips.map(|r| r as u64), 20_000, 300).max(1) as usize,
                rates,
                phase: phase.unwrap_or(if quick {
                    Duration::from_millis(300)
                } else {
                    Duration::from_secs(2)
                }),
                connect_workers,
                paths,
                fedmesh,
                perf,
                perf_call_graph,
                congestion,
                sidecar_pool,
                proxy_threads,
                json,
            }))
        }
        Cmd::QuicPeer { config } => rt.block_on(datapath::rawquic::serve(&config)),
        Cmd::Tunnel {
            bytes,
            runs,
            round_trips,
            splice_buffer,
            json,
        } => rt.block_on(tunnel(bytes, runs, round_trips, splice_buffer, json)),
        Cmd::Http {
            rate,
            bytes,
            phase,
            rounds,
            connections,
            json,
        } => {
            if rate == 0 || rate > 50_000 || connections == 0 || rounds == 0 {
                bail!("--rate must be within 1..=50000, --connections and --rounds at least 1");
            }
            rt.block_on(http::run(
                http::Params {
                    rate,
                    bytes,
                    phase,
                    rounds,
                    connections,
                },
                json,
            ))
        }
        Cmd::Propagation {
            clusters,
            services,
            subscribers,
            changes,
            stores,
            json,
        } => rt.block_on(propagation::run(
            propagation::Params {
                clusters,
                services,
                subscribers,
                changes,
            },
            &stores,
            json,
        )),
    }
}

fn topology(splice_buffer: usize) -> Topology {
    let svc = |name: &str, app| ServiceTopo {
        name: name.into(),
        port: 7000,
        replicas: 1,
        export: true,
        audience: None,
        app,
    };
    Topology {
        mesh: "bench".into(),
        clusters: vec![
            ClusterTopo {
                name: "east".into(),
                services: vec![],
            },
            ClusterTopo {
                name: "west".into(),
                services: vec![
                    svc("echo.bench", AppKind::Echo),
                    svc("sink.bench", AppKind::Sink),
                ],
            },
        ],
        limits: fedmesh_transport::Limits {
            splice_buffer_bytes: splice_buffer,
            ..Default::default()
        },
        control_plane: ControlPlane::Static,
        policies: Default::default(),
        fault_relays: false,
        // Listening, but used only once the bench makes QUIC unreachable.
        tcp_fallback: true,
        clusterset_dns: false,
        drill_operators: Vec::new(),
    }
}

/// Sends `bytes` to a sink and waits for its count; returns bits/s.
async fn goodput(addr: SocketAddr, bytes: u64) -> anyhow::Result<f64> {
    let mut s = TcpStream::connect(addr).await?;
    s.set_nodelay(true)?;
    let t0 = Instant::now();
    datapath::send_counted(&mut s, bytes).await?;
    Ok(bytes as f64 * 8.0 / t0.elapsed().as_secs_f64())
}

/// 64-byte request/response round trips on one connection.
async fn latency(addr: SocketAddr, n: usize) -> anyhow::Result<Vec<Duration>> {
    let s = TcpStream::connect(addr).await?;
    s.set_nodelay(true)?;
    let mut s = BufReader::new(s);
    let mut banner = String::new();
    s.read_line(&mut banner).await?;
    let req = [7u8; 64];
    let mut resp = [0u8; 64];
    let warmup = n / 10;
    let mut out = Vec::with_capacity(n);
    for i in 0..n + warmup {
        let t0 = Instant::now();
        s.get_mut().write_all(&req).await?;
        s.read_exact(&mut resp).await?;
        if i >= warmup {
            out.push(t0.elapsed());
        }
        if resp != req {
            bail!("echo mismatch");
        }
    }
    Ok(out)
}

/// One QUIC stream between two quinn endpoints with the gateways' own
/// configs and certificates: the ceiling for the cross-cluster path.
async fn raw_quic_goodput(
    west: &fedmesh_testkit::RigCluster,
    east: &fedmesh_testkit::RigCluster,
    bytes: u64,
) -> anyhow::Result<f64> {
    let limits = fedmesh_transport::Limits::default();
    let day = Duration::from_secs(3600);
    let server_id = west
        .ca
        .issue(&west.trust_domain.system_id("gateway"), day)?;
    let server_id = fedmesh_trust::SvidSource::new(server_id)?;
    let client_id = east
        .ca
        .issue(&east.trust_domain.system_id("gateway"), day)?;
    let client_id = fedmesh_trust::SvidSource::new(client_id)?;
    let server_cfg = fedmesh_gateway::quic_server_config(
        &server_id,
        west.bundles.clone(),
        &limits,
        &Default::default(),
    )?;
    let server =
        fedmesh_gateway::quic_baseline_endpoint("127.0.0.1:0".parse()?, Some(server_cfg), &limits)?;
    let addr = server.local_addr()?;
    let srv = tokio::spawn(async move {
        let conn = server.accept().await.context("no incoming")?.await?;
        let (mut send, mut recv) = conn.accept_bi().await?;
        let mut buf = vec![0u8; 256 * 1024];
        let mut total = 0u64;
        while let Some(n) = recv.read(&mut buf).await? {
            total += n as u64;
        }
        send.write_all(&total.to_be_bytes()).await?;
        send.finish()?;
        let _ = conn.closed().await;
        anyhow::Ok(())
    });
    let mut client =
        fedmesh_gateway::quic_baseline_endpoint("127.0.0.1:0".parse()?, None, &limits)?;
    client.set_default_client_config(fedmesh_gateway::quic_client_config(
        &client_id,
        east.bundles.clone(),
        &limits,
        &Default::default(),
    )?);
    let conn = client.connect(addr, "fedmesh.invalid")?.await?;
    let (mut send, mut recv) = conn.open_bi().await?;
    let buf = vec![0x5au8; 256 * 1024];
    let t0 = Instant::now();
    let mut left = bytes;
    while left > 0 {
        let n = left.min(buf.len() as u64) as usize;
        send.write_all(&buf[..n]).await?;
        left -= n as u64;
    }
    send.finish()?;
    let mut count = [0u8; 8];
    recv.read_exact(&mut count).await?;
    let secs = t0.elapsed().as_secs_f64();
    conn.close(0u32.into(), b"done");
    let _ = srv.await;
    if u64::from_be_bytes(count) != bytes {
        bail!(
            "raw QUIC sink saw {} of {bytes} bytes",
            u64::from_be_bytes(count)
        );
    }
    Ok(bytes as f64 * 8.0 / secs)
}

struct PathResult {
    name: &'static str,
    hops: u32,
    gbps: f64,
    p50: Duration,
    p99: Duration,
}

async fn tunnel(
    bytes: u64,
    runs: usize,
    round_trips: usize,
    splice_buffer: usize,
    as_json: bool,
) -> anyhow::Result<()> {
    let rig = Rig::start(&topology(splice_buffer)).await?;
    let east = rig.cluster("east").context("east")?;
    let west = rig.cluster("west").context("west")?;
    let app = |name: &str| {
        west.apps
            .iter()
            .find(|a| a.name.contains(name))
            .map(|a| a.addr)
            .context("app")
    };
    let paths: [(&str, u32, SocketAddr, SocketAddr); 3] = [
        ("direct TCP", 0, app("sink")?, app("echo")?),
        (
            "local sidecar→sidecar",
            2,
            west.client_addr("sink.bench").context("west sink")?,
            west.client_addr("echo.bench").context("west echo")?,
        ),
        (
            "cross-cluster via QUIC",
            4,
            east.client_addr("sink.bench").context("east sink")?,
            east.client_addr("echo.bench").context("east echo")?,
        ),
    ];
    // Best goodput of `runs` and latency of `round_trips` on one path.
    let measure = |name: &'static str, hops: u32, sink: SocketAddr, echo: SocketAddr| async move {
        // Warm the path (peer connection, caches) before measuring.
        goodput(sink, 8 << 20).await?;
        let mut best = 0f64;
        for _ in 0..runs.max(1) {
            best = best.max(goodput(sink, bytes).await?);
        }
        let mut l = latency(echo, round_trips).await?;
        anyhow::Ok(PathResult {
            name,
            hops,
            gbps: best / 1e9,
            p50: percentile(&mut l, 50.0),
            p99: percentile(&mut l, 99.0),
        })
    };
    let mut results = Vec::new();
    // Only the cross-cluster path moves gateway datagrams (plus a few
    // keep-alives), so the counters' deltas are its GSO/GRO batch sizes.
    let udp = |c: &fedmesh_testkit::RigCluster, dir| c.gateway.metrics().udp_counts(dir);
    let before = [udp(east, "tx"), udp(west, "rx")];
    for (name, hops, sink, echo) in paths {
        results.push(measure(name, hops, sink, echo).await?);
    }
    let after = [udp(east, "tx"), udp(west, "rx")];
    let per_call = |i: usize| {
        let (d, c) = (after[i].0 - before[i].0, after[i].1 - before[i].1);
        d as f64 / c.max(1) as f64
    };
    let (gso, gro) = (per_call(0), per_call(1));
    let mut raw = 0f64;
    raw_quic_goodput(west, east, 8 << 20).await?;
    for _ in 0..runs.max(1) {
        raw = raw.max(raw_quic_goodput(west, east, bytes).await?);
    }
    let raw_gbps = raw / 1e9;
    // The same cross-cluster path over the TCP fallback: east is told that
    // west's QUIC port is a UDP socket that never answers, so its gateway
    // falls back to TCP (HTTP/2 CONNECT over TLS) by itself.
    let silent = std::net::UdpSocket::bind("127.0.0.1:0")?;
    let mut spec = east.catalog_spec().clone();
    for p in spec.peers.iter_mut().filter(|p| p.cluster == "west") {
        p.gateway = silent.local_addr()?;
    }
    east.gateway
        .set_catalog(spec.build().map_err(|e| anyhow::anyhow!("{e}"))?);
    let t0 = Instant::now();
    while east
        .gateway
        .peer_status()
        .iter()
        .all(|p| p.cluster != "west" || p.transport != "tcp")
    {
        if t0.elapsed() > Duration::from_secs(15) {
            bail!("east never moved to the TCP fallback for west");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    results.push(measure("cross-cluster via TCP", 4, paths[2].2, paths[2].3).await?);
    let direct_p50 = results[0].p50;
    let direct_gbps = results[0].gbps;
    let per_hop = |r: &PathResult| {
        if r.hops == 0 {
            0.0
        } else {
            (r.p50.as_secs_f64() - direct_p50.as_secs_f64()) * 1e6 / f64::from(r.hops)
        }
    };
    if as_json {
        let v: Vec<_> = results
            .iter()
            .map(|r| {
                json!({
                    "path": r.name, "proxy_hops": r.hops, "goodput_gbps": r.gbps,
                    "goodput_ratio_to_direct": r.gbps / direct_gbps,
                    "p50_us": r.p50.as_secs_f64() * 1e6, "p99_us": r.p99.as_secs_f64() * 1e6,
                    "added_p50_us_per_hop": per_hop(r),
                })
            })
            .collect();
        println!(
            "{}",
            serde_json::to_string_pretty(&json!({
                "bytes_per_run": bytes, "round_trips": round_trips, "paths": v,
                "raw_quic_gbps": raw_gbps,
                "quic_datagrams_per_send_call": gso, "quic_datagrams_per_recv_call": gro,
            }))?
        );
    } else {
        println!("fedmesh tunnel benchmark: {} MiB per goodput run (best of {runs}), {round_trips} x 64 B round trips\n", bytes >> 20);
        println!(
            "{:<24} {:>5} {:>10} {:>8} {:>9} {:>9} {:>14}",
            "path", "hops", "Gbit/s", "ratio", "p50 µs", "p99 µs", "+p50 µs/hop"
        );
        for r in &results {
            println!(
                "{:<24} {:>5} {:>10.2} {:>8.2} {:>9.1} {:>9.1} {:>14.1}",
                r.name,
                r.hops,
                r.gbps,
                r.gbps / direct_gbps,
                r.p50.as_secs_f64() * 1e6,
                r.p99.as_secs_f64() * 1e6,
                per_hop(r)
            );
        }
        println!(
            "{:<24} {:>5} {:>10.2} {:>8.2}   (one quinn stream, same certs and transport config, no proxies)",
            "raw QUIC stream", "-", raw_gbps, raw_gbps / direct_gbps
        );
        println!(
            "\ncross-cluster goodput is {:.0}% of a raw QUIC stream in this run; over the TCP fallback {:.0}% of over QUIC",
            100.0 * results[2].gbps / raw_gbps,
            100.0 * results[3].gbps / results[2].gbps
        );
        println!(
            "QUIC batching on the cross-cluster path: {gso:.1} datagrams per send call (GSO), {gro:.1} per receive (GRO)"
        );
        println!("hops = proxies on the path (sidecar, gateway, gateway, sidecar); targets: ≥ 2 Gbit/s cross-cluster, ≤ 30 µs added p50 per hop");
    }
    Ok(())
}
