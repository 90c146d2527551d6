//! `fedmesh demo`: three clusters in one process on loopback, traffic from
//! `east` to a service exported by `west` and `north` and to a local one,
//! every response checked byte for byte, and a report.

use std::collections::BTreeMap;
use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use fedmesh_gateway::Transport;
use fedmesh_rig::drill::{self, DrillSpec, FaultMode};
use fedmesh_rig::{percentile, run_load_counted, ControlPlane, LoadReport, LoadSpec, Rig};
use serde_json::json;

#[derive(clap::Args)]
pub struct Args {
    /// Print one JSON object instead of the text report.
    #[arg(long)]
    json: bool,
    /// Connections per service.
    #[arg(long, default_value_t = 40)]
    connections: usize,
    /// Request/response round trips per connection.
    #[arg(long, default_value_t = 25)]
    requests: usize,
    /// Bytes per request (echoed back and compared).
    #[arg(long, default_value_t = 1024)]
    bytes: usize,
    /// Skip the federation controllers: catalogs computed up front.
    #[arg(long)]
    static_config: bool,
    /// Skip the closing failover drill.
    #[arg(long)]
    no_drill: bool,
    /// Length of the closing failover drill (blackholes west's gateway).
    #[arg(long, default_value = "8s", value_parser = humantime::parse_duration)]
    drill_duration: Duration,
}

struct Flow {
    service: &'static str,
    kind: &'static str,
    report: LoadReport,
}

/// Streams east's gateway opened to each peer, by transport: (QUIC, TCP).
type StreamsByPeer = BTreeMap<String, (u64, u64)>;

fn peer_streams(rig: &Rig, from: &fedmesh_rig::RigCluster) -> StreamsByPeer {
    let m = from.gateway.metrics();
    rig.clusters
        .iter()
        .filter(|c| c.name != from.name)
        .map(|c| {
            let quic = m.peer_stream_count(&c.name, Transport::Quic);
            let tcp = m.peer_stream_count(&c.name, Transport::Tcp);
            (c.name.clone(), (quic, tcp))
        })
        .collect()
}

/// What the streams to one peer rode on.
fn transport_name((quic, tcp): (u64, u64)) -> &'static str {
    match (quic > 0, tcp > 0) {
        (true, false) => "quic",
        (false, true) => "tcp",
        (true, true) => "quic+tcp",
        (false, false) => "none",
    }
}

fn us(d: Duration) -> u64 {
    d.as_micros() as u64
}

fn human_bytes(n: u64) -> String {
    if n >= 1 << 20 {
        format!("{:.1} MiB", n as f64 / (1u64 << 20) as f64)
    } else {
        format!("{:.1} KiB", n as f64 / 1024.0)
    }
}

/// Appends a line to the report; the report is written once at the end, so
/// a closed pipe (`| head`) ends the output instead of panicking.
const CLUSTERSET_NAME: &str = "echo.demo.svc.clusterset.local";

/// `echo.demo`'s MCS name as east's controller answers it, once its
/// ClusterSet IP is allocated (bounded wait); `None` without a DNS server
/// (`--static-config`).
async fn clusterset_name(
    east: &fedmesh_rig::RigCluster,
) -> Option<(std::net::SocketAddr, Result<Vec<std::net::IpAddr>, String>)> {
    use fedmesh_federation::dns::client::{lookup, LookupError, RecordType};
    let server = east.dns_addr()?;
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let r = lookup(
            server,
            CLUSTERSET_NAME,
            RecordType::A,
            Duration::from_millis(500),
            2,
        )
        .await;
        match r {
            Ok(ips) if !ips.is_empty() => return Some((server, Ok(ips))),
            // Not allocated yet: NXDOMAIN until then.
            Ok(_) | Err(LookupError::Rcode { .. }) if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Ok(_) => return Some((server, Err("no address".into()))),
            Err(e) => return Some((server, Err(e.to_string()))),
        }
    }
}

macro_rules! say {
    ($out:expr, $($t:tt)*) => {{
        use std::fmt::Write as _;
        let _ = writeln!($out, $($t)*);
    }};
}

pub async fn run(args: Args) -> anyhow::Result<ExitCode> {
    let mut out = String::new();
    let started = Instant::now();
    // echo.demo prefers west, then north: the closing drill breaks west.
    let mut topo = crate::drill::demo_topology("echo.demo", "west", false)?;
    if args.static_config {
        topo.control_plane = ControlPlane::Static;
    } else {
        topo.clusterset_dns = true;
    }
    let rig = Rig::start(&topo).await?;
    let startup = started.elapsed();
    let east = rig
        .cluster("east")
        .ok_or_else(|| anyhow::anyhow!("no east cluster"))?;
    let spec = LoadSpec {
        connections: args.connections,
        requests_per_connection: args.requests,
        request_bytes: args.bytes,
        ..LoadSpec::default()
    };
    let mut flows = Vec::new();
    let bar = crate::progress::Bar::new();
    let services = [("echo.demo", "cross-cluster"), ("hello.demo", "local")];
    let per_service = (spec.connections * spec.requests_per_connection) as u64;
    let all = per_service * services.len() as u64;
    let streams_before = peer_streams(&rig, east);
    for (i, (service, kind)) in services.into_iter().enumerate() {
        let addr = east
            .client_addr(service)
            .ok_or_else(|| anyhow::anyhow!("east has no outbound listener for {service}"))?;
        let done = Arc::new(AtomicU64::new(0));
        let offset = i as u64 * per_service;
        let ticker = tokio::spawn({
            let done = done.clone();
            async move {
                loop {
                    let n = offset + done.load(Ordering::Relaxed);
                    bar.draw(
                        n as f64 / all as f64 * 0.999,
                        &format!("traffic  {service:<10} {n:>5}/{all} requests"),
                    );
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        });
        let report = run_load_counted(addr, &spec, done).await;
        ticker.abort();
        flows.push(Flow {
            service,
            kind,
            report,
        });
    }
    bar.draw(1.0, &format!("traffic  done       {all:>5}/{all} requests"));
    let dns = clusterset_name(east).await;
    // Measured, not assumed: the streams east's gateway opened to each
    // peer during the traffic, by the transport they rode.
    let streams_after = peer_streams(&rig, east);
    let by_peer: StreamsByPeer = streams_after
        .iter()
        .map(|(p, (q, t))| {
            let (q0, t0) = streams_before.get(p).copied().unwrap_or_default();
            (p.clone(), (q - q0, t - t0))
        })
        .collect();
    let total_by_transport = by_peer
        .values()
        .fold((0, 0), |(q, t), (dq, dt)| (q + dq, t + dt));
    let transport_of =
        |cluster: &str| transport_name(by_peer.get(cluster).copied().unwrap_or_default());

    // Evidence of the path, from the gateways' own counters.
    let streams_out = east.gateway.metrics().stream_count("from_sidecar", "ok");
    let streams_in: u64 = rig
        .clusters
        .iter()
        .filter(|c| c.name != "east")
        .map(|c| c.gateway.metrics().stream_count("from_peer", "ok"))
        .sum();
    let mut identities = Vec::new();
    for c in &rig.clusters {
        // Sidecar i fronts app i: name rows after the app replica.
        for ((_, sc), app) in c.sidecars.iter().zip(&c.apps) {
            for s in sc.metrics().seen() {
                identities.push((c.name.clone(), app.name.clone(), s));
            }
        }
    }
    let drill = if args.no_drill {
        None
    } else {
        let spec = DrillSpec {
            service: "echo.demo".into(),
            from: "east".into(),
            fail: "west".into(),
            mode: FaultMode::Blackhole,
            duration: args.drill_duration.max(Duration::from_secs(2)),
            rate: 200,
            request_bytes: args.bytes,
            timeout: Duration::from_secs(2),
            slo: Duration::from_millis(250),
            http: false,
        };
        Some(drill::run_on_rig(&rig, &spec, crate::drill::progress_bar()).await?)
    };
    // The drill must show traffic moving and coming back; its timing
    // target is reported, not required (a loaded machine can miss it).
    let drill_ok = drill
        .as_ref()
        .is_none_or(|d| d.first_elsewhere_ms.is_some() && d.recovery_ms.is_some());
    let total: u64 = flows.iter().map(|f| f.report.total()).sum();
    let ok: u64 = flows.iter().map(|f| f.report.ok).sum();
    let failed: u64 = flows.iter().map(|f| f.report.failed).sum();
    let cross = &flows[0].report;
    let elapsed = started.elapsed();

    if args.json {
        let flow_json = |f: &Flow| {
            let mut l = f.report.latencies.clone();
            json!({
                "service": f.service,
                "kind": f.kind,
                "total": f.report.total(),
                "ok": f.report.ok,
                "failed": f.report.failed,
                "p50_us": us(percentile(&mut l, 50.0)),
                "p99_us": us(percentile(&mut l, 99.0)),
                "bytes": f.report.bytes_sent + f.report.bytes_received,
                "served_by": f.report.served_by,
                "errors": f.report.errors,
            })
        };
        let mut cl = cross.latencies.clone();
        let v = json!({
            "requests": {"total": total, "ok": ok, "failed": failed},
            "cross_cluster": {
                "ok": cross.ok,
                "failed": cross.failed,
                "transport": transport_name(total_by_transport),
                "streams_by_transport": {"quic": total_by_transport.0, "tcp": total_by_transport.1},
                "connections": cross.served_by.iter().map(|(by, n)| {
                    let cluster = by.split('/').next().unwrap_or("?");
                    json!({"served_by": by, "connections": n, "transport": transport_of(cluster)})
                }).collect::<Vec<_>>(),
                "streams_out": streams_out,
                "streams_in": streams_in,
                "p50_us": us(percentile(&mut cl, 50.0)),
                "p99_us": us(percentile(&mut cl, 99.0)),
            },
            "flows": flows.iter().map(flow_json).collect::<Vec<_>>(),
            "identities": identities.iter().map(|(c, svc, s)| json!({
                "cluster": c, "server": svc, "source": s.source, "via": s.via, "connections": s.connections,
            })).collect::<Vec<_>>(),
            "clusters": rig.clusters.iter().map(|c| json!({
                "name": c.name,
                "trust_domain": c.trust_domain.as_str(),
                "gateway_quic": c.gateway.quic_addr().to_string(),
                "gateway_tunnel": c.gateway.tunnel_addr().to_string(),
                "sidecars": c.sidecars.len() + 1,
                "bundle_fingerprint": c.ca.bundle().fingerprint(),
            })).collect::<Vec<_>>(),
            "clusterset_dns": dns.as_ref().map(|(server, r)| json!({
                "name": CLUSTERSET_NAME,
                "server": server.to_string(),
                "addresses": r.as_ref().map(|ips| ips.iter().map(ToString::to_string).collect::<Vec<_>>()).ok(),
                "error": r.as_ref().err(),
            })),
            "startup_ms": startup.as_millis() as u64,
            "control_plane": if args.static_config { "static" } else { "embedded-store" },
            "catalog_converged_ms": rig.converged_in.map(|d| d.as_secs_f64() * 1e3),
            "elapsed_ms": elapsed.as_millis() as u64,
            "drill": drill.as_ref().map(|d| {
                let mut v = serde_json::to_value(d).unwrap_or_default();
                v["pass"] = json!(crate::drill::passed(d, Duration::from_secs(1)));
                v
            }),
            "pass": failed == 0 && total > 0 && drill_ok,
        });
        say!(out, "{}", serde_json::to_string_pretty(&v)?);
    } else {
        say!(
            out,
            "fedmesh demo: {} clusters in one process on loopback, real QUIC and mTLS\n",
            rig.clusters.len()
        );
        say!(out, "clusters (started in {} ms)", startup.as_millis());
        match rig.converged_in {
            Some(d) => say!(out,
                "  control plane: one federation controller per cluster on the embedded store, config streamed to every proxy over gRPC+mTLS; converged in {:.1} ms",
                d.as_secs_f64() * 1e3
            ),
            None => say!(out, "  control plane: static (--static-config)"),
        }
        for c in &rig.clusters {
            say!(
                out,
                "  {:<6} trust domain {:<11} gateway quic {} / tunnel {}  {} sidecars",
                c.name,
                c.trust_domain.as_str(),
                c.gateway.quic_addr(),
                c.gateway.tunnel_addr(),
                c.sidecars.len() + 1
            );
        }
        say!(
            out,
            "\ntraffic from east ({} connections x {} requests x {} bytes per service)",
            spec.connections,
            spec.requests_per_connection,
            spec.request_bytes
        );
        say!(
            out,
            "  {:<12} {:<14} {:>8} {:>8} {:>7} {:>9} {:>9} {:>10}",
            "service",
            "path",
            "requests",
            "ok",
            "failed",
            "p50",
            "p99",
            "bytes"
        );
        for f in &flows {
            let mut l = f.report.latencies.clone();
            say!(
                out,
                "  {:<12} {:<14} {:>8} {:>8} {:>7} {:>7}µs {:>7}µs {:>10}",
                f.service,
                f.kind,
                f.report.total(),
                f.report.ok,
                f.report.failed,
                us(percentile(&mut l, 50.0)),
                us(percentile(&mut l, 99.0)),
                human_bytes(f.report.bytes_sent + f.report.bytes_received)
            );
        }
        if let Some((server, r)) = &dns {
            say!(
                out,
                "\nclusterset.local, asked of east's controller ({server})"
            );
            match r {
                Ok(ips) => say!(
                    out,
                    "  {CLUSTERSET_NAME}  A {}  (its ClusterSet IP: a meshed app dials it, served by west or north)",
                    ips.iter().map(ToString::to_string).collect::<Vec<_>>().join(", ")
                ),
                Err(e) => say!(out, "  {CLUSTERSET_NAME}: {e}"),
            }
        }
        say!(out, "\npaths taken (connections)");
        for f in &flows {
            for (by, n) in &f.report.served_by {
                let cluster = by.split('/').next().unwrap_or("?");
                let path = if cluster == "east" {
                    format!("app → sidecar(east) ─mTLS→ sidecar(east) → {by}")
                } else {
                    let wan = match transport_of(cluster) {
                        "quic" => "═QUIC═",
                        "tcp" => "═TCP fallback═",
                        "quic+tcp" => "═QUIC or TCP fallback═",
                        _ => "═?═",
                    };
                    format!("app → sidecar(east) ─mTLS→ gateway(east) {wan} gateway({cluster}) ─mTLS→ sidecar({cluster}) → {by}")
                };
                say!(out, "  {n:>4}  {path}");
            }
        }
        say!(
            out,
            "  streams gateway(east) opened to peers: {} over QUIC, {} over the TCP fallback; {streams_in} accepted by the peers",
            total_by_transport.0,
            total_by_transport.1
        );
        say!(out, "\ncaller identity as the server-side sidecar saw it");
        for (c, svc, s) in &identities {
            let how = if s.via == "gateway" {
                format!("relayed by gateway({c})")
            } else {
                "peer certificate".to_owned()
            };
            say!(
                out,
                "  {svc:<14} saw {:<40} {how:<26} {:>4} connections",
                s.source,
                s.connections
            );
        }
        for f in flows.iter().filter(|f| !f.report.errors.is_empty()) {
            say!(out, "\nerrors for {}:", f.service);
            for (e, n) in &f.report.errors {
                say!(out, "  {n:>4}  {e}");
            }
        }
        if let Some(d) = &drill {
            say!(
                out,
                "\nfailover drill (policy: echo.demo prefers west, then north)"
            );
            for l in drill::render(d).lines() {
                say!(out, "  {l}");
            }
            say!(
                out,
                "  target (99% again within 1 s): {}",
                if crate::drill::passed(d, Duration::from_secs(1)) {
                    "met"
                } else {
                    "missed"
                }
            );
        }
        let verdict = if failed == 0 && total > 0 && drill_ok {
            "PASS"
        } else {
            "FAIL"
        };
        say!(out,
            "\n{verdict}: {ok}/{total} requests ok, {failed} failed; every response checked byte for byte ({:.1} s)",
            elapsed.as_secs_f64()
        );
    }
    crate::emit(&out);
    Ok(if failed == 0 && total > 0 && drill_ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}
