//! `datapath`: every data path with its proxies as separate processes,
//! measured in one run so the ratios between them hold on a noisy
//! machine: direct TCP, haproxy (one hop), a stunnel pair (mutual TLS
//! 1.3), a fedmesh sidecar pair, cross-cluster over QUIC and over the
//! TCP fallback (sidecar → gateway ═ gateway → sidecar), and one raw
//! quinn stream with a gateway's settings.
//!
//! Per path: goodput of 1 and of 8 parallel connections, CPU-seconds per
//! GB of each proxy process (`/proc/PID/stat`), 64-byte round trips back
//! to back and at fixed rates, new connections per second and the
//! latency of connect plus first byte, and each proxy's RSS idle and at
//! its peak. Paths run one after another, each with its own processes,
//! started before its turn and stopped after it.

mod load;
mod paths;
pub mod rawquic;

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context};
use fedmesh_testkit::percentile;
use serde::Serialize;

use crate::procs::{require, Proc};
pub use load::send_counted;
pub use paths::ALL;

pub struct Params {
    pub quick: bool,
    /// Bytes per bulk run (split over the connections of the 8-stream run).
    pub bytes: u64,
    /// Bulk runs per path and width; the best is reported.
    pub runs: usize,
    pub round_trips: usize,
    /// Fixed request rates, per second.
    pub rates: Vec<u32>,
    /// Length of each fixed-rate run and of each connection test.
    pub phase: Duration,
    /// Parallel clients of the connection-rate test.
    pub connect_workers: usize,
    pub paths: Vec<String>,
    pub fedmesh: Option<PathBuf>,
    /// Record a `perf` profile of each proxy during the bulk runs here.
    pub perf: Option<PathBuf>,
    /// `perf record --call-graph` mode, if any.
    pub perf_call_graph: Option<String>,
    /// QUIC congestion controller of every gateway (default: theirs).
    pub congestion: Option<fedmesh_gateway::Algorithm>,
    /// `limits.pool_connections` of every sidecar (default: theirs).
    pub sidecar_pool: Option<usize>,
    /// `--worker-threads` of every fedmesh proxy.
    pub proxy_threads: Option<u16>,
    pub json: bool,
}

#[derive(Serialize, Clone, Copy, Default)]
struct Latency {
    p50_us: f64,
    p99_us: f64,
    p999_us: f64,
}

impl Latency {
    fn of(v: &mut [Duration]) -> Latency {
        let us = |d: Duration| d.as_secs_f64() * 1e6;
        Latency {
            p50_us: us(percentile(v, 50.0)),
            p99_us: us(percentile(v, 99.0)),
            p999_us: us(percentile(v, 99.9)),
        }
    }
}

#[derive(Serialize)]
struct ProcReport {
    name: String,
    cpu_s_per_gb: f64,
    /// Context switches per MB moved in the bulk runs.
    switches_per_mb: f64,
    rss_idle_mib: f64,
    rss_peak_mib: f64,
}

#[derive(Serialize)]
struct RateReport {
    rate: u32,
    sent: u64,
    achieved_per_s: f64,
    failed: u64,
    #[serde(flatten)]
    latency: Latency,
}

#[derive(Serialize)]
struct ConnectReport {
    per_s: f64,
    p50_us: f64,
    p99_us: f64,
    failed: u64,
}

#[derive(Serialize)]
struct PathReport {
    id: &'static str,
    name: &'static str,
    proxy_hops: u32,
    goodput_gbps_1: f64,
    goodput_gbps_8: f64,
    /// All proxy processes of the path together.
    cpu_s_per_gb: Option<f64>,
    /// The two gateways together, on a cross-cluster path: each does two
    /// crypto passes (TLS inside the cluster, QUIC or TLS across), like a
    /// stunnel pair together.
    gateways_cpu_s_per_gb: Option<f64>,
    /// That over the stunnel pair's CPU s/GB, when both ran.
    gateways_cpu_to_stunnel_pair: Option<f64>,
    processes: Vec<ProcReport>,
    round_trip: Latency,
    added_p50_us_per_hop: Option<f64>,
    fixed_rate: Vec<RateReport>,
    connect: ConnectReport,
    ratios: serde_json::Value,
}

/// Profiles of a path's proxies while they run (`perf record`).
struct Perf(Vec<std::process::Child>);

impl Perf {
    async fn start(
        dir: &std::path::Path,
        call_graph: Option<&str>,
        path: &str,
        procs: &[Proc],
    ) -> anyhow::Result<Perf> {
        std::fs::create_dir_all(dir)?;
        let mut v = Vec::new();
        for p in procs {
            let out = dir.join(format!("{path}-{}.data", p.name));
            let mut cmd = std::process::Command::new("perf");
            match call_graph {
                // Unwinding copies each sample's stack: sample less often.
                Some(mode) => cmd.args(["record", "-F", "499", "--call-graph", mode]),
                None => cmd.args(["record", "-F", "999"]),
            };
            v.push(
                cmd.arg("-o")
                    .arg(&out)
                    .args(["-p", &p.pid().to_string()])
                    .stdout(std::process::Stdio::null())
                    .stderr(std::process::Stdio::null())
                    .spawn()
                    .context("starting perf record (apt-get install linux-perf)")?,
            );
        }
        // perf needs a moment to attach before the load starts.
        tokio::time::sleep(Duration::from_millis(300)).await;
        Ok(Perf(v))
    }

    fn stop(self) {
        for mut c in self.0 {
            // SIGINT makes perf write its file and exit.
            let _ = std::process::Command::new("kill")
                .args(["-INT", &c.id().to_string()])
                .status();
            let _ = c.wait();
        }
    }
}

async fn measure(path: &mut paths::RunningPath, p: &Params) -> anyhow::Result<PathReport> {
    let d = path.dialer.clone();
    // Idle: started, and one probe has crossed the path.
    let idle: Vec<u64> = path
        .procs
        .iter()
        .map(|x| x.memory_kib("VmRSS"))
        .collect::<anyhow::Result<_>>()?;
    // Warm the path (connections, pools, caches) outside the measurement.
    load::goodput(&d, 1, 4 << 20).await?;
    load::goodput(&d, 8, 4 << 20).await?;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let sw0: Vec<u64> = path.procs.iter().map(Proc::context_switches).collect();
    let cpu0: Vec<f64> = path
        .procs
        .iter()
        .map(Proc::cpu_seconds)
        .collect::<anyhow::Result<_>>()?;
    let perf = match &p.perf {
        Some(dir) if !path.procs.is_empty() => {
            Some(Perf::start(dir, p.perf_call_graph.as_deref(), path.id, &path.procs).await?)
        }
        _ => None,
    };
    let (mut best1, mut best8, mut moved) = (0f64, 0f64, 0u64);
    for _ in 0..p.runs.max(1) {
        best1 = best1.max(load::goodput(&d, 1, p.bytes).await?);
        moved += p.bytes;
    }
    for _ in 0..p.runs.max(1) {
        best8 = best8.max(load::goodput(&d, 8, p.bytes).await?);
        moved += p.bytes / 8 * 8;
    }
    let sw1: Vec<u64> = path.procs.iter().map(Proc::context_switches).collect();
    let cpu1: Vec<f64> = path
        .procs
        .iter()
        .map(Proc::cpu_seconds)
        .collect::<anyhow::Result<_>>()?;
    if let Some(perf) = perf {
        perf.stop();
    }
    let gb = moved as f64 / 1e9;
    let mut processes = Vec::new();
    for (i, x) in path.procs.iter().enumerate() {
        processes.push(ProcReport {
            name: x.name.clone(),
            cpu_s_per_gb: (cpu1[i] - cpu0[i]) / gb,
            switches_per_mb: sw1[i].saturating_sub(sw0[i]) as f64 / (gb * 1000.0),
            rss_idle_mib: idle[i] as f64 / 1024.0,
            rss_peak_mib: x.memory_kib("VmHWM")? as f64 / 1024.0,
        });
    }
    let mut rtt = load::round_trips(&d, p.round_trips).await?;
    let mut fixed_rate = Vec::new();
    for &rate in &p.rates {
        let mut r = load::fixed_rate(&d, rate, p.phase, 4).await?;
        fixed_rate.push(RateReport {
            rate,
            sent: r.sent,
            achieved_per_s: r.achieved_per_s,
            failed: r.failed,
            latency: Latency::of(&mut r.latencies),
        });
    }
    let max_connects = if p.quick { 300 } else { 50_000 };
    let mut c = load::connects(&d, p.phase, p.connect_workers, max_connects).await?;
    for x in &mut path.procs {
        x.alive()?;
    }
    let cl = Latency::of(&mut c.latencies);
    Ok(PathReport {
        id: path.id,
        name: path.name,
        proxy_hops: path.hops,
        goodput_gbps_1: best1 / 1e9,
        goodput_gbps_8: best8 / 1e9,
        cpu_s_per_gb: (!processes.is_empty())
            .then(|| processes.iter().map(|x| x.cpu_s_per_gb).sum()),
        gateways_cpu_s_per_gb: {
            let gws: Vec<f64> = processes
                .iter()
                .filter(|x| x.name.ends_with("-gateway"))
                .map(|x| x.cpu_s_per_gb)
                .collect();
            (gws.len() == 2).then(|| gws.iter().sum())
        },
        gateways_cpu_to_stunnel_pair: None,
        processes,
        round_trip: Latency::of(&mut rtt),
        added_p50_us_per_hop: None,
        fixed_rate,
        connect: ConnectReport {
            per_s: c.per_s,
            p50_us: cl.p50_us,
            p99_us: cl.p99_us,
            failed: c.failed,
        },
        ratios: serde_json::Value::Null,
    })
}

/// The `fedmesh` binary: `--fedmesh`, else the one built next to this
/// benchmark.
fn fedmesh_binary(given: Option<PathBuf>) -> anyhow::Result<PathBuf> {
    let path = match given {
        Some(p) => p,
        None => std::env::current_exe()?
            .parent()
            .context("no directory for this executable")?
            .join("fedmesh"),
    };
    if !path.is_file() {
        bail!(
            "no fedmesh binary at {}: build it first (cargo build --release -p fedmesh-cli) or pass --fedmesh PATH",
            path.display()
        );
    }
    Ok(path)
}

pub async fn run(p: Params) -> anyhow::Result<()> {
    for id in &p.paths {
        if !ALL.contains(&id.as_str()) {
            bail!("no path `{id}` (paths: {})", ALL.join(", "));
        }
    }
    let wanted = |id: &str| p.paths.is_empty() || p.paths.iter().any(|x| x == id);
    // Every baseline must be there: ratios against a missing one are not
    // a result.
    let haproxy = require("haproxy", "haproxy")?;
    let stunnel = require("stunnel4", "stunnel4").or_else(|_| require("stunnel", "stunnel4"))?;
    let fedmesh = fedmesh_binary(p.fedmesh.clone())?;
    if p.perf.is_some() {
        require("perf", "linux-perf")?;
    }
    let dir = tempfile::Builder::new()
        .prefix("fedmesh-datapath-")
        .tempdir()?;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let app = listener.local_addr()?;
    let app_task = tokio::spawn(load::serve_app(listener));
    let env = paths::Env::new(
        dir.path().to_path_buf(),
        fedmesh,
        std::env::current_exe()?,
        haproxy,
        stunnel,
        app,
        paths::Knobs {
            congestion: p.congestion,
            sidecar_pool: p.sidecar_pool,
            proxy_threads: p.proxy_threads,
        },
    )?;
    let mut reports = Vec::new();
    for id in ALL.iter().filter(|id| wanted(id)) {
        let mut path = env
            .start(id)
            .await
            .with_context(|| format!("starting path `{id}`"))?;
        if !p.json {
            let pids: Vec<String> = path
                .procs
                .iter()
                .map(|x| format!("{} {}", x.name, x.pid()))
                .collect();
            eprintln!(
                "measuring {} ({})",
                path.name,
                if pids.is_empty() {
                    "no proxy".into()
                } else {
                    pids.join(", ")
                }
            );
        }
        let r = measure(&mut path, &p).await.with_context(|| {
            let tails: Vec<String> = path
                .procs
                .iter()
                .map(|x| format!("--- {}:\n{}", x.name, x.log_tail()))
                .collect();
            format!("measuring {}\n{}", path.name, tails.join("\n"))
        })?;
        reports.push(r);
        drop(path);
    }
    app_task.abort();
    finish(&mut reports);
    if p.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&serde_json::json!({
                "quick": p.quick, "bytes_per_run": p.bytes, "runs": p.runs,
                "round_trips": p.round_trips, "phase_ms": p.phase.as_millis() as u64,
                "connect_workers": p.connect_workers,
                "congestion": p.congestion.map(|a| a.to_string()),
                "pool": p.sidecar_pool, "proxy_threads": p.proxy_threads, "paths": reports,
            }))?
        );
    } else {
        print_tables(&p, &reports);
    }
    Ok(())
}

/// Added latency per hop against direct TCP, and ratios against the
/// stunnel pair and the TCP fallback, for the paths that ran.
fn finish(reports: &mut [PathReport]) {
    let find = |id: &str| reports.iter().position(|r| r.id == id);
    let (direct, stunnel, tcp) = (find("direct"), find("stunnel"), find("tcp"));
    let base = |i: Option<usize>| {
        i.map(|i| {
            let r = &reports[i];
            (
                r.goodput_gbps_1,
                r.goodput_gbps_8,
                r.cpu_s_per_gb,
                r.connect.per_s,
                r.round_trip.p50_us,
            )
        })
    };
    let (direct_p50, s, t) = (
        direct.map(|i| reports[i].round_trip.p50_us),
        base(stunnel),
        base(tcp),
    );
    for r in reports.iter_mut() {
        if let (Some(d), true) = (direct_p50, r.proxy_hops > 0) {
            r.added_p50_us_per_hop = Some((r.round_trip.p50_us - d) / f64::from(r.proxy_hops));
        }
        let ratio = |b: Option<(f64, f64, Option<f64>, f64, f64)>| {
            b.map(|(g1, g8, cpu, conns, p50)| {
                serde_json::json!({
                    "goodput_1": r.goodput_gbps_1 / g1, "goodput_8": r.goodput_gbps_8 / g8,
                    "cpu_s_per_gb": match (r.cpu_s_per_gb, cpu) { (Some(a), Some(b)) if b > 0.0 => Some(a / b), _ => None },
                    "connects_per_s": r.connect.per_s / conns, "round_trip_p50": r.round_trip.p50_us / p50,
                })
            })
        };
        r.ratios = serde_json::json!({ "to_stunnel_pair": ratio(s), "to_tcp_fallback": ratio(t) });
        r.gateways_cpu_to_stunnel_pair = match (r.gateways_cpu_s_per_gb, s.and_then(|s| s.2)) {
            (Some(g), Some(b)) if b > 0.0 => Some(g / b),
            _ => None,
        };
    }
}

fn print_tables(p: &Params, reports: &[PathReport]) {
    let ratio = |r: &PathReport, to: &str, what: &str| {
        r.ratios[to][what]
            .as_f64()
            .map_or_else(|| "-".to_string(), |x| format!("{x:.2}"))
    };
    println!(
        "fedmesh data-path benchmark: {} MiB per bulk run (best of {}), {} x 64 B round trips, {:?} per rate and per connection test{}\n",
        p.bytes >> 20,
        p.runs,
        p.round_trips,
        p.phase,
        if p.quick { " (--quick: a smoke, figures are not meaningful)" } else { "" }
    );
    println!(
        "{:<28} {:>4} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9}",
        "goodput and CPU",
        "hops",
        "Gbit/s 1",
        "Gbit/s 8",
        "xstunnel",
        "x tcp-fb",
        "CPU s/GB",
        "xstunnel",
        "x tcp-fb"
    );
    for r in reports {
        println!(
            "{:<28} {:>4} {:>9.2} {:>9.2} {:>9} {:>9} {:>9} {:>9} {:>9}",
            r.name,
            r.proxy_hops,
            r.goodput_gbps_1,
            r.goodput_gbps_8,
            ratio(r, "to_stunnel_pair", "goodput_1"),
            ratio(r, "to_tcp_fallback", "goodput_1"),
            r.cpu_s_per_gb.map_or("-".into(), |c| format!("{c:.2}")),
            ratio(r, "to_stunnel_pair", "cpu_s_per_gb"),
            ratio(r, "to_tcp_fallback", "cpu_s_per_gb"),
        );
    }
    let l = |x: &Latency| format!("{:.0}/{:.0}/{:.0}", x.p50_us, x.p99_us, x.p999_us);
    print!(
        "\n{:<28} {:>20} {:>10}",
        "64 B latency, µs", "back to back", "+p50/hop"
    );
    for rate in &p.rates {
        print!(" {:>20}", format!("{rate}/s"));
    }
    println!("   (p50/p99/p99.9)");
    for r in reports {
        print!(
            "{:<28} {:>20} {:>10}",
            r.name,
            l(&r.round_trip),
            r.added_p50_us_per_hop
                .map_or("-".into(), |x| format!("{x:.1}"))
        );
        for f in &r.fixed_rate {
            let lost = if f.failed > 0 {
                format!(" ({} lost)", f.failed)
            } else {
                String::new()
            };
            print!(" {:>20}", format!("{}{lost}", l(&f.latency)));
        }
        println!();
    }
    println!(
        "\n{:<28} {:>9} {:>9} {:>9} {:>12} {:>12} {:>7}",
        "new connections", "per s", "xstunnel", "x tcp-fb", "1st byte p50", "p99 µs", "failed"
    );
    for r in reports {
        println!(
            "{:<28} {:>9.0} {:>9} {:>9} {:>12.0} {:>12.0} {:>7}",
            r.name,
            r.connect.per_s,
            ratio(r, "to_stunnel_pair", "connects_per_s"),
            ratio(r, "to_tcp_fallback", "connects_per_s"),
            r.connect.p50_us,
            r.connect.p99_us,
            r.connect.failed
        );
    }
    println!(
        "\n{:<28} {:<16} {:>9} {:>11} {:>9} {:>9}",
        "per process", "", "CPU s/GB", "switches/MB", "RSS idle", "RSS peak"
    );
    for r in reports {
        for x in &r.processes {
            println!(
                "{:<28} {:<16} {:>9.2} {:>11.1} {:>8.1}M {:>8.1}M",
                r.name, x.name, x.cpu_s_per_gb, x.switches_per_mb, x.rss_idle_mib, x.rss_peak_mib
            );
        }
    }
    for r in reports {
        if let Some(g) = r.gateways_cpu_s_per_gb {
            println!(
                "{:<28} {:<16} {:>9.2}{}",
                r.name,
                "both gateways",
                g,
                r.gateways_cpu_to_stunnel_pair
                    .map_or(String::new(), |x| format!(
                        "   ({x:.2}x the stunnel pair's)"
                    ))
            );
        }
    }
    println!("\nhops = proxy processes between client and app; the raw quinn stream's far end is the app's own process (its CPU includes the app's reads).");
    println!("CPU s/GB and context switches per MB count the bulk runs (1 and 8 connections); RSS idle is taken once the path carried its first probe, RSS peak is the process's high-water mark.");
}
