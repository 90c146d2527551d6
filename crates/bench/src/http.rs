//! `http`: what the sidecar's L7 path costs per request, beside a direct
//! call and beside haproxy, in one run.
//!
//! Three paths to the same HTTP app, taken in turn for `--phase` each,
//! `--rounds` times, so machine noise falls on all of them alike:
//! - direct: client → app;
//! - mesh: client → sidecar A (outbound, HTTP detected, routed, balanced,
//!   pooled) ═mTLS tunnel═ sidecar B (inbound, authz) → app;
//! - haproxy: client → haproxy A (`mode http`, keep-alive reuse) ═mTLS═
//!   haproxy B (`mode tcp`, TLS terminated, client cert verified) → app:
//!   the same shape with the same crypto, one thread each.
//!
//! Load is open-loop at `--rate` requests/s of `--bytes` (PUT, echoed)
//! over keep-alive connections. Each sidecar runs on its own
//! single-threaded runtime so its CPU time is read from its thread's
//! `schedstat`; haproxy's from its process.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use bytes::Bytes;
use fedmesh_catalog::{CatalogSpec, EndpointSpec, ServiceSpec};
use fedmesh_sidecar::{
    InboundRoute, InboundSettings, OutboundProtocol, OutboundRoute, Sidecar, SidecarSettings,
};
use fedmesh_testkit::{percentile, HttpConn};
use fedmesh_trust::{CertificateAuthority, SharedBundles, TrustBundles, TrustDomain};
use fedmesh_wire::ServiceName;
use serde_json::json;

use crate::procs::{free_tcp, require, wait_listening, Proc};
use tokio::sync::Mutex;

#[derive(Clone, Copy)]
pub struct Params {
    pub rate: u32,
    pub bytes: usize,
    pub phase: Duration,
    pub rounds: usize,
    pub connections: usize,
}

const TTL: Duration = Duration::from_secs(24 * 3600);

/// A sidecar running on its own thread and runtime.
struct Isolated {
    tid: u32,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Drop for Isolated {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// This thread's kernel id (the first field of its `stat`).
fn own_tid() -> std::io::Result<u32> {
    let s = std::fs::read_to_string("/proc/thread-self/stat")?;
    s.split(' ')
        .next()
        .and_then(|t| t.parse().ok())
        .ok_or_else(|| std::io::Error::other("unreadable /proc/thread-self/stat"))
}

/// CPU time a thread (or a whole process with `task = None`) has run.
fn cpu_ns(pid: u32, task: Option<u32>) -> u64 {
    let read = |p: &Path| -> u64 {
        std::fs::read_to_string(p)
            .ok()
            .and_then(|s| s.split(' ').next().and_then(|n| n.parse().ok()))
            .unwrap_or(0)
    };
    match task {
        Some(t) => read(Path::new(&format!("/proc/{pid}/task/{t}/schedstat"))),
        None => std::fs::read_dir(format!("/proc/{pid}/task"))
            .map(|d| {
                d.filter_map(Result::ok)
                    .map(|e| read(&e.path().join("schedstat")))
                    .sum()
            })
            .unwrap_or(0),
    }
}

fn isolated(
    settings: SidecarSettings,
) -> anyhow::Result<(Isolated, Option<SocketAddr>, Vec<OutboundRoute>)> {
    let (tx, rx) = std::sync::mpsc::channel();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let thread = std::thread::spawn(move || {
        let rt = match tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
        {
            Ok(rt) => rt,
            Err(e) => {
                let _ = tx.send(Err(anyhow::anyhow!("runtime: {e}")));
                return;
            }
        };
        rt.block_on(async move {
            let mut reg = prometheus_client::registry::Registry::default();
            match Sidecar::build(settings, &mut reg).await {
                Ok(sc) => {
                    let tid = own_tid().unwrap_or(0);
                    let _ = tx.send(Ok((tid, sc.inbound_addr(), sc.outbound().to_vec())));
                    let _ = stopped.await;
                    drop(sc);
                }
                Err(e) => {
                    let _ = tx.send(Err(anyhow::anyhow!("sidecar: {e}")));
                }
            }
        });
    });
    let (tid, inbound, outbound) = rx
        .recv()
        .context("sidecar thread ended before it started")??;
    Ok((
        Isolated {
            tid,
            stop: Some(stop),
            thread: Some(thread),
        },
        inbound,
        outbound,
    ))
}

fn start_haproxy(dir: &Path, name: &str, config: &str) -> anyhow::Result<Proc> {
    let cfg = dir.join(format!("{name}.cfg"));
    std::fs::write(&cfg, config)?;
    Proc::spawn(
        &format!("haproxy-{name}"),
        &require("haproxy", "haproxy")?,
        &["-db", "-f", &cfg.display().to_string()],
        dir,
    )
}

#[derive(Default)]
struct PathStats {
    latencies: Vec<Duration>,
    failed: u64,
    sent: u64,
    wall: Duration,
}

/// One phase of open-loop load against `conns`.
async fn phase(conns: &[Arc<Mutex<HttpConn>>], p: &Params, body: &Bytes, out: &mut PathStats) {
    let interval = Duration::from_secs(1) / p.rate.max(1);
    let n = (u64::from(p.rate) * p.phase.as_millis() as u64 / 1000).max(1);
    let started = Instant::now();
    let mut tasks = Vec::with_capacity(n as usize);
    for i in 0..n {
        tokio::time::sleep_until((started + interval * i as u32).into()).await;
        let c = conns[i as usize % conns.len()].clone();
        let body = body.clone();
        tasks.push(tokio::spawn(async move {
            // A connection still busy with its last request means the
            // path fell behind the rate: that shows as latency here.
            let mut c = c.lock().await;
            let t0 = Instant::now();
            match tokio::time::timeout(
                Duration::from_secs(5),
                c.request("PUT", "/echo", &[], body.clone()),
            )
            .await
            {
                Ok(Ok(r)) if r.status == 200 && r.body == body => Some(t0.elapsed()),
                _ => None,
            }
        }));
    }
    for t in tasks {
        out.sent += 1;
        match t.await {
            Ok(Some(l)) => out.latencies.push(l),
            _ => out.failed += 1,
        }
    }
    out.wall += started.elapsed();
}

async fn connect_all(addr: SocketAddr, n: usize) -> anyhow::Result<Vec<Arc<Mutex<HttpConn>>>> {
    let mut v = Vec::new();
    for _ in 0..n {
        v.push(Arc::new(Mutex::new(HttpConn::connect(addr, false).await?)));
    }
    Ok(v)
}

pub async fn run(p: Params, json_out: bool) -> anyhow::Result<()> {
    let app_listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let app = app_listener.local_addr()?;
    tokio::spawn(fedmesh_testkit::http_app(app_listener, "app".into()));

    // One cluster: sidecar B serves bench.demo, sidecar A calls it.
    let td = TrustDomain::new("east.bench")?;
    let ca = CertificateAuthority::new_root(td.clone(), TTL * 30)?;
    let bundles = SharedBundles::new(TrustBundles::new().with(ca.bundle()));
    let service = ServiceName::parse("bench.demo")?;
    let bare = CatalogSpec {
        cluster: "east".into(),
        trust_domain: td.to_string(),
        ..Default::default()
    };
    let server_id = td.workload("demo", "bench")?;
    let settings = |catalog, identity, outbound, inbound| SidecarSettings {
        catalog,
        identity,
        bundles: bundles.clone(),
        outbound,
        inbound,
        transparent: None,
        admin: None,
        limits: Default::default(),
        http: Default::default(),
        controller: None,
    };
    let (b, b_in, _) = isolated(settings(
        bare.clone().build().map_err(|e| anyhow::anyhow!("{e}"))?,
        ca.issue(&server_id, TTL)?,
        vec![],
        Some(InboundSettings {
            app_ports: Vec::new(),
            listen: "127.0.0.1:0".parse()?,
            routes: vec![InboundRoute {
                service: service.clone(),
                port: 8080,
                app,
            }],
        }),
    ))?;
    let b_in = b_in.context("sidecar B has no inbound address")?;
    let catalog = CatalogSpec {
        services: vec![ServiceSpec {
            vips: Vec::new(),
            name: service.to_string(),
            ports: vec![8080],
            export: false,
            audience: None,
            endpoints: vec![EndpointSpec {
                address: b_in,
                identity: Some(server_id.to_string()),
            }],
        }],
        ..bare
    }
    .build()
    .map_err(|e| anyhow::anyhow!("{e}"))?;
    let (a, _, a_out) = isolated(settings(
        catalog,
        ca.issue(&td.workload("demo", "client")?, TTL)?,
        vec![OutboundRoute {
            listen: "127.0.0.1:0".parse()?,
            service: service.clone(),
            port: 8080,
            protocol: OutboundProtocol::Detect,
        }],
        None,
    ))?;
    let mesh = a_out.first().context("sidecar A has no outbound")?.listen;

    // haproxy pair with the same certificates, if haproxy is installed.
    let dir = tempfile::tempdir()?;
    let mut haproxy = None;
    if require("haproxy", "haproxy").is_ok() {
        let ca_pem = dir.path().join("ca.pem");
        std::fs::write(
            &ca_pem,
            fedmesh_trust::pem::encode_certs(&[ca.certificate().clone()]),
        )?;
        let pem =
            |name: &str, id: &fedmesh_trust::SpiffeId| -> anyhow::Result<std::path::PathBuf> {
                let svid = ca.issue(id, TTL)?;
                let path = dir.path().join(format!("{name}.pem"));
                let mut text = fedmesh_trust::pem::encode_certs(svid.chain());
                text.push_str(&fedmesh_trust::pem::encode_key(&svid.key()));
                std::fs::write(&path, text)?;
                Ok(path)
            };
        let a_pem = pem("a", &td.workload("demo", "client")?)?;
        let b_pem = pem("b", &server_id)?;
        let (pa, pb) = (free_tcp()?.port(), free_tcp()?.port());
        let common = "global\n  nbthread 1\n  maxconn 4096\ndefaults\n  timeout connect 5s\n  timeout client 60s\n  timeout server 60s\n";
        let hb = start_haproxy(
            dir.path(),
            "b",
            &format!(
                "{common}  mode tcp\nfrontend f\n  bind 127.0.0.1:{pb} ssl crt {} verify required ca-file {}\n  default_backend app\nbackend app\n  server app {app}\n",
                b_pem.display(),
                ca_pem.display()
            ),
        )
        ?;
        let ha = start_haproxy(
            dir.path(),
            "a",
            &format!(
                "{common}  mode http\n  option http-keep-alive\nfrontend f\n  bind 127.0.0.1:{pa}\n  default_backend b\nbackend b\n  http-reuse always\n  server b 127.0.0.1:{pb} ssl verify required ca-file {} crt {}\n",
                ca_pem.display(),
                a_pem.display()
            ),
        )
        ?;
        let addr: SocketAddr = format!("127.0.0.1:{pa}").parse()?;
        wait_listening(addr, &mut []).await?;
        wait_listening(format!("127.0.0.1:{pb}").parse()?, &mut []).await?;
        haproxy = Some((addr, ha, hb));
    } else {
        eprintln!("haproxy is not installed: its column is skipped (apt-get install haproxy)");
    }

    let body = Bytes::from(vec![b'x'; p.bytes]);
    let direct_c = connect_all(app, p.connections).await?;
    let mesh_c = connect_all(mesh, p.connections).await?;
    let ha_c = match &haproxy {
        Some((addr, ..)) => Some(connect_all(*addr, p.connections).await?),
        None => None,
    };
    // Warm up every path (handshakes, pools) outside the measurement.
    let warm = Params {
        phase: Duration::from_millis(300),
        ..p
    };
    let mut scratch = PathStats::default();
    phase(&direct_c, &warm, &body, &mut scratch).await;
    phase(&mesh_c, &warm, &body, &mut scratch).await;
    if let Some(c) = &ha_c {
        phase(c, &warm, &body, &mut scratch).await;
        if scratch.failed > 0 {
            bail!("{} warm-up requests failed (haproxy path?)", scratch.failed);
        }
    }
    if scratch.failed > 0 {
        bail!("{} warm-up requests failed", scratch.failed);
    }

    let pid = std::process::id();
    let (mut direct, mut mesh_s, mut ha_s) = (
        PathStats::default(),
        PathStats::default(),
        PathStats::default(),
    );
    let (mut cpu_a, mut cpu_b, mut cpu_ha, mut cpu_hb) = (0u64, 0u64, 0u64, 0u64);
    for _ in 0..p.rounds {
        phase(&direct_c, &p, &body, &mut direct).await;
        let (a0, b0) = (cpu_ns(pid, Some(a.tid)), cpu_ns(pid, Some(b.tid)));
        phase(&mesh_c, &p, &body, &mut mesh_s).await;
        cpu_a += cpu_ns(pid, Some(a.tid)) - a0;
        cpu_b += cpu_ns(pid, Some(b.tid)) - b0;
        if let (Some(c), Some((_, ha, hb))) = (&ha_c, &haproxy) {
            let (x0, y0) = (cpu_ns(ha.pid(), None), cpu_ns(hb.pid(), None));
            phase(c, &p, &body, &mut ha_s).await;
            cpu_ha += cpu_ns(ha.pid(), None) - x0;
            cpu_hb += cpu_ns(hb.pid(), None) - y0;
        }
    }

    let summary = |s: &mut PathStats| {
        let p50 = percentile(&mut s.latencies, 50.0);
        let p99 = percentile(&mut s.latencies, 99.0);
        (p50, p99)
    };
    let (d50, d99) = summary(&mut direct);
    let (m50, m99) = summary(&mut mesh_s);
    let us = |d: Duration| d.as_secs_f64() * 1e6;
    // CPU per proxy per 1,000 requests/s: core-ms per second of load,
    // scaled to 1,000 requests/s.
    let per_krps = |ns: u64, s: &PathStats| {
        let rate = s.sent as f64 / s.wall.as_secs_f64().max(1e-9);
        ns as f64 / 1e6 / s.wall.as_secs_f64().max(1e-9) * (1000.0 / rate.max(1e-9))
    };
    let mut report = json!({
        "rate": p.rate, "bytes": p.bytes, "rounds": p.rounds,
        "phase_ms": p.phase.as_millis() as u64, "connections": p.connections,
        "direct": {"p50_us": us(d50), "p99_us": us(d99), "failed": direct.failed, "requests": direct.sent},
        "mesh": {"p50_us": us(m50), "p99_us": us(m99), "failed": mesh_s.failed, "requests": mesh_s.sent,
                 "added_p50_us": us(m50.saturating_sub(d50)), "added_p99_us": us(m99.saturating_sub(d99)),
                 "added_per_hop_p50_us": us(m50.saturating_sub(d50)) / 2.0,
                 "added_per_hop_p99_us": us(m99.saturating_sub(d99)) / 2.0,
                 "cpu_ms_per_s_per_krps": {"sidecar_a_l7": per_krps(cpu_a, &mesh_s), "sidecar_b_l4": per_krps(cpu_b, &mesh_s)}},
    });
    if ha_c.is_some() {
        let (h50, h99) = summary(&mut ha_s);
        report["haproxy"] = json!({
            "p50_us": us(h50), "p99_us": us(h99), "failed": ha_s.failed, "requests": ha_s.sent,
            "added_p50_us": us(h50.saturating_sub(d50)), "added_p99_us": us(h99.saturating_sub(d99)),
            "added_per_hop_p50_us": us(h50.saturating_sub(d50)) / 2.0,
            "added_per_hop_p99_us": us(h99.saturating_sub(d99)) / 2.0,
            "cpu_ms_per_s_per_krps": {"haproxy_a_http": per_krps(cpu_ha, &ha_s), "haproxy_b_tcp_tls": per_krps(cpu_hb, &ha_s)},
        });
    }
    if json_out {
        println!("{}", serde_json::to_string_pretty(&report)?);
        return Ok(());
    }
    println!(
        "HTTP/1.1 keep-alive, PUT {} B echoed, {} req/s open loop, {} rounds × {:?} per path, {} connections",
        p.bytes, p.rate, p.rounds, p.phase, p.connections
    );
    println!(
        "{:<10} {:>9} {:>9} {:>13} {:>13} {:>8}   CPU ms/s per 1k req/s (hop 1, hop 2)",
        "path", "p50 µs", "p99 µs", "+p50/hop µs", "+p99/hop µs", "failed"
    );
    let row = |name: &str, v: &serde_json::Value, cpu: String| {
        println!(
            "{:<10} {:>9.0} {:>9.0} {:>13} {:>13} {:>8}   {}",
            name,
            v["p50_us"].as_f64().unwrap_or(0.0),
            v["p99_us"].as_f64().unwrap_or(0.0),
            v["added_per_hop_p50_us"]
                .as_f64()
                .map_or("-".into(), |x| format!("{x:.0}")),
            v["added_per_hop_p99_us"]
                .as_f64()
                .map_or("-".into(), |x| format!("{x:.0}")),
            v["failed"],
            cpu
        )
    };
    row("direct", &report["direct"], String::new());
    let m = &report["mesh"]["cpu_ms_per_s_per_krps"];
    row(
        "mesh",
        &report["mesh"],
        format!(
            "{:.0}, {:.0}",
            m["sidecar_a_l7"].as_f64().unwrap_or(0.0),
            m["sidecar_b_l4"].as_f64().unwrap_or(0.0)
        ),
    );
    if ha_c.is_some() {
        let h = &report["haproxy"]["cpu_ms_per_s_per_krps"];
        row(
            "haproxy",
            &report["haproxy"],
            format!(
                "{:.0}, {:.0}",
                h["haproxy_a_http"].as_f64().unwrap_or(0.0),
                h["haproxy_b_tcp_tls"].as_f64().unwrap_or(0.0)
            ),
        );
    }
    drop((a, b));
    Ok(())
}
