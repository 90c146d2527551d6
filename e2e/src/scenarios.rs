//! The scenarios: each drives load through the rig while it breaks and
//! repairs something, then checks outcomes that only hold if traffic
//! really flowed (a scenario with no requests, or with every request
//! served where nothing was broken, cannot pass by doing nothing).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use fedmesh_testkit::{percentile, run_open_loop, LiveCounts, OpenLoopSpec, Sample};
use serde::Serialize;

use crate::rig::{admin_get, Rig, CLUSTERS, SERVICES};

mod lossy;
mod matrix;

pub const ALL: [&str; 10] = [
    "steady",
    "clusterset-ip",
    "drill",
    "partition",
    "lossy-wan",
    "control-plane-outage",
    "etcd-member-loss",
    "gateway-restart",
    "udp-blocked",
    "root-rotation",
];

/// Not built yet; named so that asking for them says so.
pub const NOT_YET: [&str; 0] = [];

/// Run only when named (long; not in CI).
pub const ON_REQUEST: [&str; 1] = ["wan-matrix"];

#[derive(Debug, Clone)]
pub struct Params {
    /// Scales every scenario's length (CI runs short).
    pub quick: bool,
    /// Where the JSON report goes; plots go beside it.
    pub report: Option<PathBuf>,
    /// Where the `drill` scenario's HTML page goes (else beside `report`).
    pub drill_page: Option<PathBuf>,
}

impl Params {
    fn len(&self, full: u64, quick: u64) -> Duration {
        Duration::from_secs(if self.quick { quick } else { full })
    }

    fn rates(&self) -> (u32, u32) {
        // (echo connections/s, HTTP requests/s) per cluster.
        if self.quick {
            (20, 50)
        } else {
            (50, 200)
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct LoadSummary {
    pub cluster: String,
    /// `echo` (a new TCP connection per request, local) or `http`
    /// (keep-alive PUTs, cross-cluster).
    pub kind: &'static str,
    pub requests: usize,
    pub failed: usize,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub served_by: BTreeMap<String, usize>,
    pub errors: BTreeMap<String, usize>,
    #[serde(skip)]
    pub samples: Vec<Sample>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Check {
    pub what: String,
    pub ok: bool,
    pub detail: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct Outcome {
    pub scenario: String,
    pub passed: bool,
    pub duration_ms: u64,
    pub events: Vec<(u64, String)>,
    pub loads: Vec<LoadSummary>,
    pub checks: Vec<Check>,
    /// Lines of a scenario's own table (`lossy-wan`'s transports).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub table: Vec<String>,
    /// The WAN scenarios' report: self-test and measured runs.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub wan: Option<serde_json::Value>,
}

impl Outcome {
    fn check(&mut self, what: impl Into<String>, ok: bool, detail: impl Into<String>) {
        self.checks.push(Check {
            what: what.into(),
            ok,
            detail: detail.into(),
        });
    }
}

struct Timeline {
    t0: Instant,
    events: Vec<(u64, String)>,
}

impl Timeline {
    fn note(&mut self, what: impl Into<String>) -> Duration {
        let at = self.t0.elapsed();
        let what = what.into();
        tracing::info!(at_ms = at.as_millis() as u64, "{what}");
        self.events.push((at.as_millis() as u64, what));
        at
    }

    async fn until(&self, at: Duration) {
        tokio::time::sleep_until((self.t0 + at).into()).await;
    }
}

type LoadTask = tokio::task::JoinHandle<(String, &'static str, Vec<Sample>)>;

/// The loads a scenario can run from each cluster's `web` sidecar.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// TCP, a new connection per request, served locally (`echo.demo`).
    Echo,
    /// TCP like `Echo`, served by the next cluster (`echox.demo`).
    EchoX,
    /// HTTP keep-alive `PUT`s, served by the next cluster (`http.demo`).
    Http,
    /// HTTP like `Http`, served locally (`httpl.demo`).
    HttpLocal,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Echo => "echo",
            Kind::EchoX => "echo-x",
            Kind::Http => "http",
            Kind::HttpLocal => "http-l",
        }
    }

    /// Whether the cluster's own replica is the one that should answer.
    fn local(name: &str) -> bool {
        name == "echo" || name == "http-l"
    }
}

fn start_load(rig: &Rig, p: &Params, d: Duration, clusters: &[&str], echo: bool) -> Vec<LoadTask> {
    let kinds: &[Kind] = if echo {
        &[Kind::Echo, Kind::Http]
    } else {
        &[Kind::Http]
    };
    start_loads(rig, p, d, clusters, kinds)
}

fn start_loads(
    rig: &Rig,
    p: &Params,
    d: Duration,
    clusters: &[&str],
    kinds: &[Kind],
) -> Vec<LoadTask> {
    let (echo_rate, http_rate) = p.rates();
    let mut tasks = Vec::new();
    for c in rig
        .clusters
        .iter()
        .filter(|c| clusters.contains(&c.name.as_str()))
    {
        let kinds: Vec<(&'static str, std::net::SocketAddr, u32, bool)> = kinds
            .iter()
            .map(|k| match k {
                Kind::Echo => (k.name(), c.echo_out, echo_rate, false),
                Kind::EchoX => (k.name(), c.echox_out, echo_rate, false),
                Kind::Http => (k.name(), c.http_out, http_rate, true),
                Kind::HttpLocal => (k.name(), c.httpl_out, http_rate, true),
            })
            .collect();
        for (kind, addr, rate, http) in kinds {
            let name = c.name.clone();
            let spec = OpenLoopSpec {
                rate,
                duration: d,
                request_bytes: 256,
                timeout: Duration::from_secs(5),
                max_in_flight: 2048,
                http,
            };
            tasks.push(tokio::spawn(async move {
                let s = run_open_loop(addr, &spec, Arc::new(LiveCounts::default())).await;
                (name, kind, s)
            }));
        }
    }
    tasks
}

async fn finish_load(tasks: Vec<LoadTask>) -> Vec<LoadSummary> {
    let mut out = Vec::new();
    for t in tasks {
        let Ok((cluster, kind, samples)) = t.await else {
            continue;
        };
        let mut lat: Vec<Duration> = samples.iter().filter(|s| s.ok).map(|s| s.latency).collect();
        let mut served_by = BTreeMap::new();
        let mut errors = BTreeMap::new();
        for s in &samples {
            if s.ok {
                *served_by
                    .entry(s.cluster().unwrap_or("?").to_owned())
                    .or_default() += 1;
            } else {
                *errors
                    .entry(s.error.clone().unwrap_or_default())
                    .or_default() += 1;
            }
        }
        out.push(LoadSummary {
            cluster,
            kind,
            requests: samples.len(),
            failed: samples.iter().filter(|s| !s.ok).count(),
            p50_ms: percentile(&mut lat, 50.0).as_secs_f64() * 1e3,
            p99_ms: percentile(&mut lat, 99.0).as_secs_f64() * 1e3,
            served_by,
            errors,
            samples,
        });
    }
    out
}

/// Every load ran and nothing failed (but what `exempt` excuses); with
/// `preferred`, echo stayed local and HTTP went to the preferred cluster
/// (at least 90 %).
fn check_loads(
    o: &mut Outcome,
    rig: &Rig,
    preferred: bool,
    exempt: &dyn Fn(&LoadSummary, &Sample) -> bool,
) {
    for l in o.loads.clone() {
        let failed: Vec<&Sample> = l
            .samples
            .iter()
            .filter(|s| !s.ok && !exempt(&l, s))
            .collect();
        o.check(
            format!("{} {}: requests ran", l.cluster, l.kind),
            l.requests > 0 && l.served_by.values().sum::<usize>() > 0,
            format!("{} requests", l.requests),
        );
        o.check(
            format!("{} {}: no failed request", l.cluster, l.kind),
            failed.is_empty(),
            format!(
                "{} failed of {}{}",
                failed.len(),
                l.requests,
                failed
                    .first()
                    .and_then(|s| s.error.as_ref())
                    .map(|e| format!(", first: {e}"))
                    .unwrap_or_default()
            ),
        );
        if !preferred {
            continue;
        }
        let expect = match l.kind {
            k if Kind::local(k) => l.cluster.clone(),
            _ => rig
                .cluster(&l.cluster)
                .map(|c| c.http_prefers.clone())
                .unwrap_or_default(),
        };
        let by = l.served_by.get(&expect).copied().unwrap_or(0);
        let ok = l.served_by.values().sum::<usize>();
        o.check(
            format!("{} {}: served by {expect}", l.cluster, l.kind),
            ok > 0 && by * 100 >= ok * 90,
            format!("{by} of {ok}"),
        );
    }
}

/// A cluster's controller `/status`, when it answers 200 with JSON.
async fn controller_status(rig: &Rig, cluster: &str) -> Option<serde_json::Value> {
    let c = rig.cluster(cluster)?;
    match admin_get(c.controller_admin, "/status").await? {
        (200, body) => serde_json::from_str(&body).ok(),
        _ => None,
    }
}

/// `fedmesh drill failover` against the rig's processes, as an operator
/// runs it against a deployment: load from east through east's `web`
/// sidecar to `echox.demo` (which prefers west from east), west
/// blackholed through east's gateway's drill API (mTLS, the rig's
/// operator SVID), repaired; the drill's own JSON report is checked, and
/// no fault is left on the gateway.
async fn drill(rig: &Rig, p: &Params, o: &mut Outcome) -> anyhow::Result<()> {
    let Some(east) = rig.cluster("east") else {
        anyhow::bail!("no east cluster");
    };
    let d = p.len(20, 8);
    let operator = rig.dir.path().join("east-ops");
    let mut args: Vec<String> = [
        "drill",
        "failover",
        "--service",
        "echox.demo",
        "--from",
        "east",
        "--fail",
        "west",
        "--mode",
        "blackhole",
        "--output",
        "json",
    ]
    .iter()
    .map(|a| (*a).to_owned())
    .collect();
    args.extend([
        "--gateway-api".into(),
        east.gateway_drills.to_string(),
        "--load".into(),
        east.echox_out.to_string(),
        "--operator".into(),
        operator.display().to_string(),
        "--duration".into(),
        format!("{}s", d.as_secs()),
        "--rate".into(),
        if p.quick { "50" } else { "200" }.into(),
    ]);
    // Beside the e2e report: the drill's page.
    let beside = |ext: &str| {
        p.report.as_ref().map(|path| {
            path.with_file_name(format!(
                "{}-drill.{ext}",
                path.file_stem().and_then(|s| s.to_str()).unwrap_or("e2e")
            ))
        })
    };
    if let Some(page) = p.drill_page.clone().or_else(|| beside("html")) {
        args.extend(["--report".into(), page.display().to_string()]);
    }
    // The drill client runs where east's workloads do.
    let (program, mut argv) = match rig.namespace("east") {
        Some(ns) => (
            std::path::PathBuf::from("ip"),
            vec![
                "netns".to_owned(),
                "exec".into(),
                ns.to_owned(),
                rig.fedmesh.display().to_string(),
            ],
        ),
        None => (rig.fedmesh.clone(), Vec::new()),
    };
    argv.extend(args);
    let run = move || std::process::Command::new(&program).args(&argv).output();
    let out = tokio::time::timeout(
        d + Duration::from_secs(60),
        tokio::task::spawn_blocking(run),
    )
    .await
    .map_err(|_| anyhow::anyhow!("the drill did not end"))???;
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_else(
        |_| serde_json::json!({ "stderr": String::from_utf8_lossy(&out.stderr).to_string() }),
    );
    if let Some(file) = beside("json") {
        std::fs::write(&file, serde_json::to_string_pretty(&report)?)?;
    }
    let num = |k: &str| report[k].as_f64();
    o.check(
        "the drill ran and reported (JSON)",
        report["requests"].as_u64().is_some_and(|n| n > 0),
        report
            .get("stderr")
            .map_or_else(String::new, |e| e.to_string()),
    );
    o.check(
        "west took traffic before the fault",
        num("failed_cluster_share_before").is_some_and(|s| s > 0.5),
        format!("{:?}", num("failed_cluster_share_before")),
    );
    o.check(
        "a request was answered elsewhere after the fault",
        num("first_elsewhere_ms").is_some(),
        format!(
            "first elsewhere {:?} ms, 99% again after {:?} ms",
            num("first_elsewhere_ms"),
            num("to_99_percent_ms")
        ),
    );
    o.check(
        "north served while west was blackholed",
        report["served_by"]["north"].as_u64().is_some_and(|n| n > 0),
        report["served_by"].to_string(),
    );
    // Nothing left behind on the gateway.
    let left = match admin_get(east.gateway_admin, "/status").await {
        Some((200, body)) => serde_json::from_str::<serde_json::Value>(&body)
            .map(|v| v["drill_faults"].clone())
            .unwrap_or_default(),
        _ => serde_json::Value::Null,
    };
    o.check(
        "no drill fault is left on east's gateway",
        left["blackholed"].as_array().is_some_and(|a| a.is_empty()) && left["draining"] == false,
        left.to_string(),
    );
    let (failed, total) = (
        report["failed"].as_u64().unwrap_or(u64::MAX),
        report["requests"].as_u64().unwrap_or(0),
    );
    o.check(
        "at most 10% of the drill's requests failed",
        total > 0 && failed * 10 <= total,
        format!(
            "failed {failed} of {total} (during the fault {}), p99 during the fault {:?} ms, west serving again after {:?} ms",
            report["failed_during_fault"], num("p99_during_fault_ms"), num("recovery_ms")
        ),
    );
    Ok(())
}

/// A meshed app in east connects to `echox.demo`'s ClusterSet IP (as
/// a pod does: its connection is redirected to its sidecar's transparent
/// listener) and is served by west, which `echox.demo` prefers from east.
async fn clusterset_ip(rig: &Rig, o: &mut Outcome) -> anyhow::Result<()> {
    let Some(ns) = rig
        .namespace("east")
        .filter(|_| rig.netns.as_ref().is_some_and(|n| n.nft))
    else {
        o.check(
            "skipped: needs network namespaces with nftables (root, `ip`, `nft`)",
            true,
            "",
        );
        return Ok(());
    };
    let ips = |v: &serde_json::Value| -> Vec<String> {
        v["clusterset_ips"]["echox.demo"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|x| x.as_str().map(str::to_owned))
            .collect()
    };
    let t0 = Instant::now();
    let mut seen: BTreeMap<&str, Vec<String>> = BTreeMap::new();
    let mut agree = false;
    while !agree && t0.elapsed() < Duration::from_secs(20) {
        seen.clear();
        for c in CLUSTERS {
            if let Some(v) = controller_status(rig, c).await {
                seen.insert(c, ips(&v));
            }
        }
        agree = seen.len() == CLUSTERS.len()
            && seen
                .values()
                .all(|v| !v.is_empty() && Some(v) == seen.get("east"));
        if !agree {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    o.check(
        "every controller gives echox.demo the same ClusterSet IP",
        agree,
        format!("{seen:?}"),
    );
    let Some(ip) = seen.get("east").and_then(|v| v.first()).cloned() else {
        return Ok(());
    };
    let me = std::env::current_exe()?;
    let ns = ns.to_owned();
    let ns_name = ns.clone();
    let want = format!("{ip}:7000");
    let run = move || {
        std::process::Command::new("ip")
            .args(["netns", "exec", &ns])
            .arg(&me)
            .args(["probe", "load", "--to", &format!("{ip}:7000")])
            .args(["--connections", "4", "--requests", "10"])
            .output()
    };
    // The sidecar's catalog may trail its controller by an update.
    let mut last = serde_json::Value::Null;
    for _ in 0..20 {
        let out = tokio::task::spawn_blocking(run.clone()).await??;
        last = serde_json::from_slice(&out.stdout).unwrap_or(serde_json::json!({
            "stderr": String::from_utf8_lossy(&out.stderr).to_string(),
        }));
        if last["ok"] == 40 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    o.check(
        "a meshed app in east reaches echox.demo at its ClusterSet IP, port 7000",
        last["ok"] == 40 && last["failed"] == 0,
        last.to_string(),
    );
    let by_west = last["served_by"]
        .as_object()
        .is_some_and(|m| !m.is_empty() && m.keys().all(|k| k.starts_with("west/")));
    o.check(
        "served by west (echox.demo prefers the next cluster)",
        by_west,
        last["served_by"].to_string(),
    );

    // By name: the app resolves echox.demo.svc.clusterset.local with
    // east's controller (what east's CoreDNS forwards clusterset.local
    // to) and connects to what it gets.
    let Some(east) = rig.cluster("east") else {
        return Ok(());
    };
    let (me, ns, dns) = (std::env::current_exe()?, ns_name, east.controller_dns);
    let by_name = move || {
        std::process::Command::new("ip")
            .args(["netns", "exec", &ns])
            .arg(&me)
            .args([
                "probe",
                "load",
                "--to",
                "echox.demo.svc.clusterset.local:7000",
            ])
            .args(["--dns", &dns.to_string()])
            .args(["--connections", "4", "--requests", "10"])
            .output()
    };
    let out = tokio::task::spawn_blocking(by_name).await??;
    let named: serde_json::Value =
        serde_json::from_slice(&out.stdout).unwrap_or(serde_json::json!({
            "stderr": String::from_utf8_lossy(&out.stderr).to_string(),
        }));
    o.check(
        "east's controller resolves echox.demo.svc.clusterset.local to its ClusterSet IP",
        named["to"] == want,
        named.to_string(),
    );
    let by_west = named["served_by"]
        .as_object()
        .is_some_and(|m| !m.is_empty() && m.keys().all(|k| k.starts_with("west/")));
    o.check(
        "a meshed app in east reaches echox.demo.svc.clusterset.local:7000 by name, served by west",
        named["ok"] == 40 && named["failed"] == 0 && by_west,
        named.to_string(),
    );
    Ok(())
}

async fn controller_imported(rig: &Rig, cluster: &str) -> Option<u64> {
    let v = controller_status(rig, cluster).await?;
    if v["synced"] != true {
        return None;
    }
    v["imported"].as_u64()
}

/// Whether `cluster`'s controller serves `other` stale (lease gone).
async fn serves_stale(rig: &Rig, cluster: &str, other: &str) -> Option<bool> {
    let v = controller_status(rig, cluster).await?;
    Some(v["stale"].get(other).is_some())
}

/// Polls `ready` every 100 ms until it holds (how long that took) or
/// `limit` has passed (`None`).
async fn poll_until<F, Fut>(limit: Duration, mut ready: F) -> Option<Duration>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let t0 = Instant::now();
    loop {
        if ready().await {
            return Some(t0.elapsed());
        }
        if t0.elapsed() > limit {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Waits until every other cluster's controller imports `want` services.
async fn until_imported(rig: &Rig, except: &str, want: u64, limit: Duration) -> Option<Duration> {
    poll_until(limit, move || async move {
        let mut all = true;
        for c in CLUSTERS.iter().filter(|c| **c != except) {
            all &= controller_imported(rig, c).await == Some(want);
        }
        all
    })
    .await
}

pub async fn run(rig: &mut Rig, name: &str, p: &Params) -> anyhow::Result<Outcome> {
    let t0 = Instant::now();
    let mut tl = Timeline {
        t0,
        events: Vec::new(),
    };
    let mut o = Outcome {
        scenario: name.to_owned(),
        passed: false,
        duration_ms: 0,
        events: Vec::new(),
        loads: Vec::new(),
        checks: Vec::new(),
        table: Vec::new(),
        wan: None,
    };
    match name {
        "steady" => {
            // Local and cross-cluster, TCP and HTTP, from every cluster.
            let d = p.len(60, 8);
            let all = [Kind::Echo, Kind::EchoX, Kind::Http, Kind::HttpLocal];
            let load = start_loads(rig, p, d, &CLUSTERS, &all);
            tl.until(d).await;
            o.loads = finish_load(load).await;
            check_loads(&mut o, rig, true, &|_, _| false);
        }
        "clusterset-ip" => clusterset_ip(rig, &mut o).await?,
        "drill" => drill(rig, p, &mut o).await?,
        "partition" => {
            // west is cut off from the other clusters' gateways (both
            // ways, no close: packets vanish) for `cut`, then healed; in
            // namespaces with nftables from etcd too (its lease expires:
            // the others serve it stale), otherwise its controller still
            // publishes ("lease alive, gateway silent").
            let cut = p.len(60, 30);
            let d = cut + p.len(30, 12);
            let load = start_load(rig, p, d, &CLUSTERS, true);
            let at = Duration::from_secs(if p.quick { 4 } else { 10 });
            tl.until(at).await;
            // Both transports: a partition leaves no TCP fallback either.
            let set = |rig: &Rig, on: bool, o: &mut Outcome| -> bool {
                for other in ["east", "north"] {
                    cut_path(rig, "west", other, Path::Both, on, o);
                }
                match rig.cut_store("west", on) {
                    Ok(cut) => cut,
                    Err(e) => {
                        o.check("cutting west from etcd", false, e.to_string());
                        false
                    }
                }
            };
            let store_cut = set(rig, true, &mut o);
            let broke = tl.note(if store_cut {
                "west cut off from east, north and etcd"
            } else {
                "west cut off from east and north (its controller still reaches etcd)"
            });
            if store_cut {
                // Its lease (3 s) runs out: the others keep serving it stale.
                tl.until(at + Duration::from_secs(8)).await;
                let stale = serves_stale(rig, "east", "west").await == Some(true);
                tl.note(format!("east's controller serves west stale: {stale}"));
                o.check(
                    "east's controller serves west stale while its lease is gone",
                    stale,
                    "",
                );
            }
            tl.until(at + cut).await;
            set(rig, false, &mut o);
            let healed = tl.note("partition healed");
            o.loads = finish_load(load).await;
            if store_cut {
                let back = poll_until(Duration::from_secs(15), || async {
                    serves_stale(rig, "east", "west").await == Some(false)
                })
                .await;
                o.check(
                    "west published again after healing (not stale)",
                    back.is_some(),
                    format!("{back:?} after the load ended"),
                );
            }
            // Only east's HTTP (which prefers west) must move: the drill
            // analysis gives its failover figures.
            let east_http = o
                .loads
                .iter()
                .find(|l| l.cluster == "east" && l.kind == "http")
                .cloned();
            if let Some(l) = east_http {
                let spec = fedmesh_testkit::drill::DrillSpec {
                    service: "http.demo".into(),
                    from: "east".into(),
                    fail: "west".into(),
                    mode: fedmesh_testkit::drill::FaultMode::Blackhole,
                    duration: d,
                    rate: p.rates().1,
                    request_bytes: 256,
                    timeout: Duration::from_secs(5),
                    slo: Duration::from_millis(250),
                    http: true,
                };
                let r = fedmesh_testkit::drill::analyze(&spec, &l.samples, broke, healed);
                tl.note(format!(
                    "east → http.demo: first answer from north {:?} ms after the cut, 99% within 250 ms again after {:?} ms, west serving again {:?} ms after healing, {} failed during the cut",
                    r.first_elsewhere_ms, r.to_99_percent_ms, r.recovery_ms, r.failed_during_fault
                ));
                o.check(
                    "east failed over to north within 2 s",
                    r.to_99_percent_ms.is_some_and(|t| t <= 2000.0),
                    format!("{:?} ms", r.to_99_percent_ms),
                );
                o.check(
                    "at most 1% of east's HTTP requests failed",
                    r.failed * 100 <= r.requests,
                    format!("{} of {}", r.failed, r.requests),
                );
                o.check(
                    "west serves east again after healing",
                    r.recovery_ms.is_some(),
                    format!("{:?} ms", r.recovery_ms),
                );
                o.check(
                    "west took east's traffic before the cut",
                    r.failed_cluster_share_before > 0.9,
                    format!("{:.0}%", r.failed_cluster_share_before * 100.0),
                );
            }
            // Everyone else: nothing failed (west's own callers fall back
            // to west's local replica; north never needed west).
            let exempt = |l: &LoadSummary, _: &Sample| l.cluster == "east" && l.kind == "http";
            check_loads(&mut o, rig, false, &exempt);
            let west_http_local = o
                .loads
                .iter()
                .find(|l| l.cluster == "west" && l.kind == "http")
                .and_then(|l| l.served_by.get("west").copied())
                .unwrap_or(0);
            o.check(
                "west's callers fell back to west's own replica while cut off",
                west_http_local > 0,
                format!("{west_http_local} served by west"),
            );
        }
        "lossy-wan" => lossy::lossy_wan(rig, p, &mut o, &mut tl).await,
        "wan-matrix" => matrix::wan_matrix(rig, p, &mut o, &mut tl).await,
        "udp-blocked" => {
            // UDP between east and west is dropped both ways (TCP passes):
            // their gateways must move to the TCP fallback by themselves,
            // keep it while UDP stays blocked, and take QUIC back when it
            // returns. east's HTTP prefers west, so its load crosses the
            // blocked path the whole time.
            let before = p.len(10, 5);
            let blocked = p.len(40, 20);
            let d = before + blocked + p.len(30, 20);
            let load = start_load(rig, p, d, &CLUSTERS, true);
            tl.until(before).await;
            cut_path(rig, "east", "west", Path::Udp, true, &mut o);
            let cut_at = tl.note("UDP between east and west dropped (TCP passes)");
            let limit = Duration::from_secs(15);
            let (ew, we) = tokio::join!(
                until_transport(rig, "east", "west", "tcp", limit),
                until_transport(rig, "west", "east", "tcp", limit)
            );
            let moved = tl.note(format!(
                "east reaches west over TCP after {ew:?}, west reaches east over TCP after {we:?}"
            ));
            o.check(
                "both gateways moved to the TCP fallback within 10 s",
                ew.zip(we)
                    .is_some_and(|(a, b)| a.max(b) <= Duration::from_secs(10)),
                format!("east→west {ew:?}, west→east {we:?}"),
            );
            // Remembered: it stays on TCP (no flapping back to a QUIC that
            // cannot work, no moment down) while UDP is blocked.
            let mut looks = 0;
            let mut other = Vec::new();
            while tl.t0.elapsed() + Duration::from_millis(500) < before + blocked {
                tokio::time::sleep(Duration::from_millis(500)).await;
                for (a, b) in [("east", "west"), ("west", "east")] {
                    looks += 1;
                    match gateway_peer(rig, a, b).await {
                        Some((t, true)) if t == "tcp" => {}
                        x => other.push(format!("{a}→{b}: {x:?}")),
                    }
                }
            }
            o.check(
                "the TCP fallback was kept (and marked) while UDP stayed blocked",
                looks > 0 && other.is_empty(),
                format!("{looks} looks; otherwise: {other:?}"),
            );
            let north_quic = [("north", "east"), ("north", "west"), ("east", "north")];
            let mut north_ok = true;
            for (a, b) in north_quic {
                north_ok &= gateway_peer(rig, a, b)
                    .await
                    .is_some_and(|(t, _)| t == "quic");
            }
            o.check("paths not involving the block stayed on QUIC", north_ok, "");
            cut_path(rig, "east", "west", Path::Udp, false, &mut o);
            let back_at = tl.note("UDP between east and west passes again");
            let limit = Duration::from_secs(25);
            let (ew, we) = tokio::join!(
                until_transport(rig, "east", "west", "quic", limit),
                until_transport(rig, "west", "east", "quic", limit)
            );
            tl.note(format!(
                "QUIC taken back: east→west after {ew:?}, west→east after {we:?}"
            ));
            o.check(
                "QUIC taken back within the retry interval (10 s) + 5 s",
                ew.zip(we)
                    .is_some_and(|(a, b)| a.max(b) <= Duration::from_secs(15)),
                format!("east→west {ew:?}, west→east {we:?}"),
            );
            o.loads = finish_load(load).await;
            check_loads(&mut o, rig, false, &|_, _| false);
            // Traffic really crossed the blocked path over TCP: once moved
            // (plus time for any ejection to expire), west served east.
            let window = (moved + Duration::from_secs(3), back_at);
            let (by_west, all) = o
                .loads
                .iter()
                .find(|l| l.cluster == "east" && l.kind == "http")
                .map(|l| {
                    let w: Vec<&Sample> = l
                        .samples
                        .iter()
                        .filter(|s| s.ok && s.start >= window.0 && s.start < window.1)
                        .collect();
                    (
                        w.iter().filter(|s| s.cluster() == Some("west")).count(),
                        w.len(),
                    )
                })
                .unwrap_or_default();
            o.check(
                "west served east's HTTP over the TCP fallback (≥ 90% while UDP was blocked)",
                all > 0 && by_west * 100 >= all * 90,
                format!(
                    "{by_west} of {all} after {:?}",
                    window.0.saturating_sub(cut_at)
                ),
            );
        }
        "control-plane-outage" => {
            let d = p.len(60, 16);
            let load = start_load(rig, p, d, &CLUSTERS, true);
            tl.until(d / 5).await;
            for c in CLUSTERS {
                rig.kill(&format!("{c}-controller"));
            }
            for i in 0..3 {
                rig.etcd.kill(i);
            }
            tl.note("every controller and every etcd member killed");
            tl.until(d * 3 / 5).await;
            for i in 0..3 {
                rig.etcd.restart(i)?;
            }
            tl.note("etcd members restarted");
            for c in CLUSTERS {
                rig.start_proc(&format!("{c}-controller"))?;
            }
            tl.note("controllers restarted");
            o.loads = finish_load(load).await;
            check_loads(&mut o, rig, true, &|_, _| false);
            // Resynced: a change made now reaches every other cluster.
            let before = until_imported(rig, "west", SERVICES, Duration::from_secs(30)).await;
            o.check(
                "controllers resynced after restart",
                before.is_some(),
                format!("{before:?}"),
            );
            rig.set_extra_service("west", true)?;
            let took = until_imported(rig, "west", SERVICES + 1, Duration::from_secs(20)).await;
            tl.note(format!(
                "west exported extra.demo; everyone imported it after {took:?}"
            ));
            o.check(
                "a change after the restart propagates",
                took.is_some(),
                format!("{took:?}"),
            );
            rig.set_extra_service("west", false)?;
            let back = until_imported(rig, "west", SERVICES, Duration::from_secs(20)).await;
            o.check("and its removal too", back.is_some(), format!("{back:?}"));
        }
        "etcd-member-loss" => {
            let d = p.len(40, 14);
            let load = start_load(rig, p, d, &CLUSTERS, true);
            tl.until(d / 4).await;
            rig.etcd.kill(0);
            tl.note("etcd member 0 killed");
            rig.set_extra_service("west", true)?;
            let took = until_imported(rig, "west", SERVICES + 1, Duration::from_secs(10)).await;
            tl.note(format!("extra.demo imported everywhere after {took:?}"));
            o.check(
                "catalog updates go on with 2 of 3 etcd members",
                took.is_some(),
                format!("{took:?}"),
            );
            rig.set_extra_service("west", false)?;
            let back = until_imported(rig, "west", SERVICES, Duration::from_secs(10)).await;
            o.check("and removals", back.is_some(), format!("{back:?}"));
            tl.until(d * 3 / 4).await;
            rig.etcd.restart(0)?;
            tl.note("etcd member 0 restarted");
            o.loads = finish_load(load).await;
            check_loads(&mut o, rig, true, &|_, _| false);
        }
        "gateway-restart" => {
            // HTTP only: a request is retried on the next cluster when the
            // gateway it went to drains. Each gateway in turn: SIGTERM
            // (3 s drain), exit, start again, ready.
            let d = p.len(90, 36);
            let load = start_load(rig, p, d, &CLUSTERS, false);
            let mut own_restart: BTreeMap<String, (Duration, Duration)> = BTreeMap::new();
            tl.until(Duration::from_secs(2)).await;
            for c in ["west", "north", "east"] {
                let from = tl.note(format!("{c} gateway: SIGTERM"));
                let took = rig.stop(&format!("{c}-gateway")).await?;
                tl.note(format!("{c} gateway exited after {took:?}"));
                rig.start_proc(&format!("{c}-gateway"))?;
                let admin = rig.cluster(c).map(|x| x.gateway_admin);
                let t = Instant::now();
                let mut ready = false;
                while !ready && t.elapsed() < Duration::from_secs(20) {
                    if let Some(a) = admin {
                        ready = matches!(admin_get(a, "/ready").await, Some((200, _)));
                    }
                    if !ready {
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                }
                o.check(
                    format!("{c} gateway ready again after its restart"),
                    ready,
                    format!("{:?}", t.elapsed()),
                );
                let to = tl.note(format!("{c} gateway ready again"));
                own_restart.insert(c.to_owned(), (from, to + Duration::from_secs(1)));
                tokio::time::sleep(p.len(10, 3)).await;
            }
            o.loads = finish_load(load).await;
            // A cluster whose own (only) gateway restarts cannot reach
            // others meanwhile: those requests are reported, not required.
            let windows = own_restart.clone();
            let exempt = move |l: &LoadSummary, s: &Sample| {
                windows
                    .get(&l.cluster)
                    .is_some_and(|(a, b)| s.start + s.latency >= *a && s.start <= *b)
            };
            // Traffic moves during restarts by design: no preference check.
            check_loads(&mut o, rig, false, &exempt);
            for l in &o.loads.clone() {
                let n = l.samples.iter().filter(|s| !s.ok && exempt(l, s)).count();
                o.check(
                    format!(
                        "{}: failed while its own gateway restarted (reported)",
                        l.cluster
                    ),
                    true,
                    format!("{n}"),
                );
            }
            // The restarts moved traffic: the third cluster answered.
            let moved = o.loads.iter().all(|l| l.served_by.len() >= 2);
            o.check(
                "callers were served by their fallback cluster during restarts",
                moved,
                format!(
                    "{:?}",
                    o.loads
                        .iter()
                        .map(|l| (&l.cluster, &l.served_by))
                        .collect::<Vec<_>>()
                ),
            );
        }
        "root-rotation" => root_rotation(rig, p, &mut tl, &mut o).await?,
        other => anyhow::bail!("unknown scenario {other:?}"),
    }
    let dead = rig.exited();
    o.check(
        "no process exited on its own",
        dead.is_empty(),
        dead.join(", "),
    );
    o.passed = o.checks.iter().all(|c| c.ok);
    o.duration_ms = t0.elapsed().as_millis() as u64;
    o.events = tl.events;
    Ok(o)
}

/// west's root CA is rotated under load in three steps, each a controller
/// restart with new trust files: (1) bundle old+new, endorsed by the old
/// root, still signing with the old; (2) signing with the new root, until
/// every west proxy has renewed onto it; (3) bundle new only, endorsed by
/// the new root. Nothing may fail, and no handshake may be refused.
async fn root_rotation(
    rig: &mut Rig,
    p: &Params,
    tl: &mut Timeline,
    o: &mut Outcome,
) -> anyhow::Result<()> {
    use fedmesh_trust::{rotation, CertificateAuthority, TrustBundle};
    let d = rig.dir.path().to_path_buf();
    let old = CertificateAuthority::load(&d.join("west-ca"))?;
    let td = old.trust_domain().clone();
    let new = CertificateAuthority::new_root(td.clone(), Duration::from_secs(30 * 86_400))?;
    new.save(&d.join("west-ca2"))?;
    let both = TrustBundle::new(
        td.clone(),
        old.bundle()
            .roots()
            .iter()
            .chain(new.bundle().roots())
            .cloned()
            .collect(),
    )?;
    let write = |name: &str,
                 b: &TrustBundle,
                 by: &CertificateAuthority|
     -> anyhow::Result<(PathBuf, PathBuf)> {
        let (bp, ep) = (
            d.join(format!("{name}.pem")),
            d.join(format!("{name}-endorsements.json")),
        );
        std::fs::write(&bp, b.to_pem())?;
        std::fs::write(
            &ep,
            serde_json::to_string(&vec![rotation::endorse(by, b)?])?,
        )?;
        Ok((bp, ep))
    };
    let (both_pem, both_end) = write("west-bundle-both", &both, &old)?;
    let (new_pem, new_end) = write("west-bundle-new", &new.bundle(), &new)?;

    let before = p.len(10, 5);
    // Renewal happens at 2/3 of an SVID's life: every west proxy has moved
    // to the new root at most that long after step 2 (plus retries).
    let renew_limit = rig.svid_ttl * 2 / 3 + Duration::from_secs(20);
    let d_total = before * 3 + renew_limit + Duration::from_secs(20);
    let load = start_load(rig, p, d_total, &CLUSTERS, true);
    let handshakes_before = handshake_refusals(rig).await;
    tl.until(before).await;

    // Step 1: trust both roots everywhere.
    rig.restart_controller_with(
        "west",
        &crate::rig::TrustFiles {
            bundle: both_pem.clone(),
            endorsements: Some(both_end),
            ca_dir: d.join("west-ca"),
        },
    )
    .await?;
    tl.note("step 1: west publishes old+new roots (endorsed by the old), still signs with the old");
    let t = until_bundle(rig, &both.fingerprint(), Duration::from_secs(20)).await;
    tl.note(format!(
        "east and north trust west's old+new bundle after {t:?}"
    ));
    o.check(
        "others accepted the old+new bundle",
        t.is_some(),
        format!("{t:?}"),
    );
    // Nothing may be signed by the new root before every proxy that will
    // see it trusts it (west's own reach their controller only through a
    // certificate chaining to a root they trust).
    let t = until_proxies_trust(
        rig,
        "west.e2e",
        &both.fingerprint(),
        Duration::from_secs(30),
    )
    .await;
    tl.note(format!(
        "every proxy of every cluster trusts west's old+new bundle after {t:?}"
    ));
    o.check(
        "every proxy got the old+new bundle",
        t.is_some(),
        format!("{t:?}"),
    );

    // Step 2: sign with the new root; proxies renew onto it.
    rig.restart_controller_with(
        "west",
        &crate::rig::TrustFiles {
            bundle: both_pem,
            endorsements: None,
            ca_dir: d.join("west-ca2"),
        },
    )
    .await?;
    let step2 = tl.note("step 2: west's controller signs with the new root");
    let new_only = fedmesh_trust::TrustBundles::new().with(new.bundle());
    let renewed = |who: &str| {
        std::fs::read_to_string(rig.svid_file("west", who))
            .ok()
            .and_then(|pem| fedmesh_trust::pem::decode_certs(&pem).ok())
            .is_some_and(|chain| {
                fedmesh_trust::verify_svid(
                    &new_only,
                    &chain,
                    std::time::SystemTime::now(),
                    fedmesh_trust::Usage::Client,
                )
                .is_ok()
            })
    };
    let moved = poll_until(renew_limit, || async {
        ["gw", "web", "srv"].iter().all(|who| renewed(who))
    })
    .await
    .is_some();
    tl.note(format!(
        "every west proxy presents a new-root SVID: {moved} ({:?} after step 2)",
        tl.t0.elapsed().saturating_sub(step2)
    ));
    o.check(
        "every west proxy renewed onto the new root (gateway, web, srv)",
        moved,
        format!("within {renew_limit:?}"),
    );

    // Step 3: drop the old root.
    rig.restart_controller_with(
        "west",
        &crate::rig::TrustFiles {
            bundle: new_pem,
            endorsements: Some(new_end),
            ca_dir: d.join("west-ca2"),
        },
    )
    .await?;
    tl.note("step 3: west publishes the new root only (endorsed by the new)");
    let t = until_bundle(rig, &new.bundle().fingerprint(), Duration::from_secs(20)).await;
    tl.note(format!(
        "east and north trust only west's new root after {t:?}"
    ));
    o.check(
        "others accepted the new-only bundle",
        t.is_some(),
        format!("{t:?}"),
    );
    o.loads = finish_load(load).await;
    let handshakes_after = handshake_refusals(rig).await;
    check_loads(o, rig, false, &|_, _| false);
    o.check(
        "no TLS handshake refused by any gateway or sidecar",
        handshakes_after == handshakes_before,
        format!("{handshakes_before} before, {handshakes_after} after"),
    );
    Ok(())
}

/// Waits (bounded) until every gateway and sidecar of every cluster
/// verifies `td` with the bundle of `fingerprint` (their `/config_dump`).
async fn until_proxies_trust(
    rig: &Rig,
    td: &str,
    fingerprint: &str,
    limit: Duration,
) -> Option<Duration> {
    poll_until(limit, move || async move {
        let mut all = true;
        for c in &rig.clusters {
            for admin in [c.gateway_admin, c.web_admin, c.srv_admin] {
                let fp = async {
                    let (_, body) = admin_get(admin, "/config_dump").await?;
                    let v: serde_json::Value = serde_json::from_str(&body).ok()?;
                    v["bundles"][td].as_str().map(str::to_owned)
                };
                all &= fp.await.as_deref() == Some(fingerprint);
            }
        }
        all
    })
    .await
}

/// TLS handshakes refused so far by every gateway and sidecar (their
/// `rejected` counters for handshake reasons).
async fn handshake_refusals(rig: &Rig) -> u64 {
    let mut n = 0;
    for c in &rig.clusters {
        for admin in [c.gateway_admin, c.web_admin, c.srv_admin] {
            let Some((200, text)) = admin_get(admin, "/metrics").await else {
                continue;
            };
            n += text
                .lines()
                .filter(|l| l.contains("rejected_total") && l.contains("handshake"))
                .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
                .sum::<f64>() as u64;
        }
    }
    n
}

/// Waits (bounded) until east's and north's controllers trust west with
/// the bundle of `fingerprint`.
async fn until_bundle(rig: &Rig, fingerprint: &str, limit: Duration) -> Option<Duration> {
    poll_until(limit, move || async move {
        let mut all = true;
        for c in ["east", "north"] {
            let ok = async {
                let v = controller_status(rig, c).await?;
                let w = v["clusters"]
                    .as_array()?
                    .iter()
                    .find(|x| x["cluster"] == "west")?
                    .clone();
                Some(w["bundle_fingerprint"] == fingerprint && w["bundle_trusted"] == true)
            };
            all &= ok.await == Some(true);
        }
        all
    })
    .await
}

/// Which transport between two clusters a cut drops.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Path {
    Udp,
    Both,
}

/// Cuts (or restores) the path between clusters `a` and `b`, both ways.
fn cut_path(rig: &Rig, a: &str, b: &str, path: Path, on: bool, o: &mut Outcome) {
    if let Err(e) = rig.cut(a, b, path == Path::Both, on) {
        o.check(
            format!("cut {a}–{b} ({path:?}, {on})"),
            false,
            e.to_string(),
        );
    }
}

/// How `from`'s gateway reaches `to` (transport, whether its UDP path is
/// known blocked), from the gateway's `/status`.
async fn gateway_peer(rig: &Rig, from: &str, to: &str) -> Option<(String, bool)> {
    let c = rig.cluster(from)?;
    let (code, body) = admin_get(c.gateway_admin, "/status").await?;
    if code != 200 {
        return None;
    }
    let v: serde_json::Value = serde_json::from_str(&body).ok()?;
    let peer = v["peers"].as_array()?.iter().find(|p| p["cluster"] == to)?;
    Some((
        peer["transport"].as_str()?.to_owned(),
        peer["udp_blocked"].as_bool()?,
    ))
}

/// Waits (bounded) until `from`'s gateway reaches `to` by `transport`.
async fn until_transport(
    rig: &Rig,
    from: &str,
    to: &str,
    transport: &str,
    limit: Duration,
) -> Option<Duration> {
    poll_until(limit, move || async move {
        gateway_peer(rig, from, to)
            .await
            .is_some_and(|(t, _)| t == transport)
    })
    .await
}

pub fn render(o: &Outcome) -> String {
    let mut s = format!(
        "== {} ({:.1} s): {}\n",
        o.scenario,
        o.duration_ms as f64 / 1000.0,
        if o.passed { "PASS" } else { "FAIL" }
    );
    s.push_str(&format!(
        "  {:<7} {:<6} {:>8} {:>7} {:>8} {:>8}  served by\n",
        "from", "kind", "requests", "failed", "p50 ms", "p99 ms"
    ));
    for l in &o.loads {
        s.push_str(&format!(
            "  {:<7} {:<6} {:>8} {:>7} {:>8.2} {:>8.2}  {}\n",
            l.cluster,
            l.kind,
            l.requests,
            l.failed,
            l.p50_ms,
            l.p99_ms,
            l.served_by
                .iter()
                .map(|(k, v)| format!("{k} {v}"))
                .collect::<Vec<_>>()
                .join(", ")
        ));
    }
    for l in &o.table {
        s.push_str(l);
        s.push('\n');
    }
    for (at, e) in &o.events {
        s.push_str(&format!("  {:>7.1} s  {e}\n", *at as f64 / 1000.0));
    }
    for c in &o.checks {
        if !c.ok || !c.detail.is_empty() && c.what.contains("reported") {
            s.push_str(&format!(
                "  [{}] {}: {}\n",
                if c.ok { "ok" } else { "FAIL" },
                c.what,
                c.detail
            ));
        }
    }
    s
}
