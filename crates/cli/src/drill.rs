//! `fedmesh drill failover`: steady load from one cluster to a service,
//! one serving cluster broken and repaired, and what callers saw.

use std::process::ExitCode;
use std::time::Duration;

use fedmesh_rig::drill::{self, DrillReport, DrillSpec, FaultMode, Progress};
use fedmesh_rig::{ControlPlane, Rig, Topology};

#[derive(clap::Subcommand)]
pub enum Command {
    /// Break one cluster serving a service under load and measure failover.
    Failover(Box<FailoverArgs>),
    /// Serve the drill's echo app (a banner naming who serves, then the
    /// bytes back): deploy it as a service to drill against, so the
    /// report knows which cluster answered each request.
    Echo(EchoArgs),
}

#[derive(clap::Args, Clone)]
pub struct EchoArgs {
    #[arg(long, default_value = "0.0.0.0:7000")]
    pub listen: std::net::SocketAddr,
    /// The banner: `CLUSTER/INSTANCE` (the part before `/` is the cluster
    /// the report counts), e.g. `west/$(POD_NAME)`.
    #[arg(long)]
    pub name: String,
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Output {
    Table,
    Json,
}

#[derive(clap::Args, Clone)]
pub struct FailoverArgs {
    /// The service to call (`NAME.NAMESPACE`).
    #[arg(long, default_value = "echo.demo")]
    pub service: String,
    /// The cluster whose workloads call it.
    #[arg(long, default_value = "east")]
    pub from: String,
    /// The cluster to break (it is made the preferred one first, so the
    /// drill proves traffic moves).
    #[arg(long, default_value = "west")]
    pub fail: String,
    /// kill-gateway, blackhole or drain; with `--gateway-api` also
    /// drop-udp and delay (kill-gateway is the demo's only).
    #[arg(long, default_value = "blackhole", value_parser = parse_mode)]
    pub mode: FaultMode,
    /// Run against a deployment: the drill API (`drills.listen`) of the
    /// gateway that takes the fault — the `--from` cluster's for
    /// blackhole, drop-udp and delay (it stops reaching `--fail`), the
    /// `--fail` cluster's for drain.
    /// Repeatable: one address per gateway replica (faults are per
    /// process; `fedmesh-gateway-drills` resolves to every replica).
    #[arg(long = "gateway-api", requires_all = ["load", "operator"])]
    pub gateway_api: Vec<std::net::SocketAddr>,
    /// With `--gateway-api`: a sidecar's outbound listener for the service
    /// in the `--from` cluster (the drill's load goes through it).
    #[arg(long, requires = "gateway_api")]
    pub load: Option<std::net::SocketAddr>,
    /// With `--gateway-api`: the operator's SVID directory (`svid.pem`,
    /// `svid.key`, `bundle.pem` of its trust domain, as `fedmesh ca issue`
    /// writes it), an identity the gateway's `drills.operators` allows.
    #[arg(long, requires = "gateway_api")]
    pub operator: Option<std::path::PathBuf>,
    /// With `--gateway-api`: a service outside the drill to watch,
    /// `NAME=ADDR` (an outbound listener for it, as `--load`); repeatable.
    /// If one fails more than `--halt-error-rate` while the fault is on,
    /// the drill removes its fault at once and says why.
    #[arg(long = "guard", requires = "gateway_api", value_parser = parse_guard)]
    pub guards: Vec<(String, std::net::SocketAddr)>,
    /// The error rate (0 to 1, over 2 s, at least 10 requests) of a
    /// guarded service that halts the drill.
    #[arg(long, default_value_t = 0.05)]
    pub halt_error_rate: f64,
    /// Requests per second offered to each guarded service.
    #[arg(long, default_value_t = 20)]
    pub guard_rate: u32,
    /// The added delay of `--mode delay`.
    #[arg(long, default_value = "100ms", value_parser = humantime::parse_duration)]
    pub delay: Duration,
    #[arg(long, default_value = "20s", value_parser = humantime::parse_duration)]
    pub duration: Duration,
    /// Requests per second (each a new connection and one echo round
    /// trip; with `--http`, one PUT on a keep-alive connection).
    #[arg(long, default_value_t = 200)]
    pub rate: u32,
    /// Drive the service with HTTP/1.1 requests instead (the demo serves
    /// it with an HTTP app then): failover happens per request, and
    /// idempotent requests are retried on the next cluster.
    #[arg(long)]
    pub http: bool,
    #[arg(long, default_value_t = 1024)]
    pub bytes: usize,
    /// A request slower than this failed.
    #[arg(long, default_value = "2s", value_parser = humantime::parse_duration)]
    pub timeout: Duration,
    /// A success slower than this does not count toward "99% succeeding".
    #[arg(long, default_value = "250ms", value_parser = humantime::parse_duration)]
    pub slo: Duration,
    /// Failover must reach 99% within this for the drill to pass.
    #[arg(long, default_value = "1s", value_parser = humantime::parse_duration)]
    pub target: Duration,
    /// Where to run it without `--gateway-api`: `demo`, the three demo
    /// clusters in this process, with a UDP relay in front of every gateway.
    #[arg(long, default_value = "demo")]
    pub on: String,
    #[arg(long, value_enum, default_value = "table")]
    pub output: Output,
    /// Also write the report as one self-contained HTML page (figures and
    /// an SVG timeline per 100 ms, the fault window shaded).
    #[arg(long)]
    pub report: Option<std::path::PathBuf>,
}

fn parse_guard(s: &str) -> Result<(String, std::net::SocketAddr), String> {
    let (name, addr) = s
        .split_once('=')
        .ok_or_else(|| format!("`{s}`: expected NAME=IP:PORT"))?;
    let addr = addr
        .parse()
        .map_err(|_| format!("`{addr}`: expected IP:PORT"))?;
    Ok((name.to_owned(), addr))
}

fn parse_mode(s: &str) -> Result<FaultMode, String> {
    s.parse()
}

impl FailoverArgs {
    pub fn spec(&self) -> DrillSpec {
        DrillSpec {
            service: self.service.clone(),
            from: self.from.clone(),
            fail: self.fail.clone(),
            mode: self.mode,
            duration: self.duration,
            rate: self.rate,
            request_bytes: self.bytes,
            timeout: self.timeout,
            slo: self.slo,
            http: self.http,
        }
    }
}

/// The demo topology, set up for drills: embedded control plane, fault
/// relays, and `service` preferring `fail` over the other clusters.
pub fn demo_topology(service: &str, fail: &str, http: bool) -> anyhow::Result<Topology> {
    let mut t = Topology::demo();
    if http {
        for s in t
            .clusters
            .iter_mut()
            .flat_map(|c| c.services.iter_mut())
            .filter(|s| s.name == service)
        {
            s.app = fedmesh_rig::AppKind::Http;
        }
    }
    t.control_plane = ControlPlane::Embedded;
    t.fault_relays = true;
    let mut order = vec![fail.to_owned()];
    order.extend(
        t.clusters
            .iter()
            .map(|c| c.name.clone())
            .filter(|c| c != fail),
    );
    // Short ejections, so a drill of a few seconds also shows the
    // repaired cluster taking traffic again.
    let policy: fedmesh_catalog::ServicePolicy = serde_json::from_value(serde_json::json!({
        "failover": order,
        "outlier": { "base_ejection": "1s" },
    }))?;
    t.policies.insert(service.to_owned(), policy);
    Ok(t)
}

/// Whether the drill met its target.
pub fn passed(r: &DrillReport, target: Duration) -> bool {
    r.failed_cluster_share_before > 0.5
        && r.first_elsewhere_ms.is_some()
        && r.to_99_percent_ms
            .is_some_and(|t| t <= target.as_secs_f64() * 1000.0)
        && r.recovery_ms.is_some()
}

/// Draws a progress bar on stderr when it is a terminal.
pub fn progress_bar() -> impl FnMut(Progress) {
    let bar = crate::progress::Bar::new();
    move |p: Progress| {
        bar.draw(
            p.elapsed.as_secs_f64() / p.total.as_secs_f64(),
            &format!(
                "{:>5.1}/{:.1} s  {:<8} ok {:>6}  failed {:>5}",
                p.elapsed.as_secs_f64().min(p.total.as_secs_f64()),
                p.total.as_secs_f64(),
                p.phase,
                p.ok,
                p.failed
            ),
        );
    }
}

/// The faults a drill sets through a gateway's API for `mode`; they live
/// for the fault window and a margin (a drill that dies leaves nothing
/// behind for long).
pub fn api_faults(a: &FailoverArgs) -> anyhow::Result<Vec<fedmesh_gateway::FaultSpec>> {
    use fedmesh_gateway::{FaultKind, FaultSpec};
    let spec = a.spec();
    let ttl = spec.restore_at() - spec.break_at() + Duration::from_secs(10);
    let peer = Some(a.fail.parse().map_err(|e| anyhow::anyhow!("--fail: {e}"))?);
    let (kind, peer) = match a.mode {
        FaultMode::Blackhole => (FaultKind::Blackhole, peer),
        FaultMode::DropUdp => (FaultKind::DropUdp, peer),
        FaultMode::Delay => (FaultKind::Delay { delay: a.delay }, peer),
        FaultMode::Drain => (FaultKind::Drain, None),
        FaultMode::KillGateway => anyhow::bail!(
            "--mode kill-gateway runs on the demo only; a gateway's API offers blackhole, drop-udp, delay and drain"
        ),
    };
    Ok(vec![FaultSpec { kind, peer, ttl }])
}

/// A drill against a deployment through a gateway's drill API.
async fn run_api(a: &FailoverArgs, apis: &[std::net::SocketAddr]) -> anyhow::Result<DrillReport> {
    use anyhow::Context;
    let (Some(load), Some(dir)) = (a.load, &a.operator) else {
        anyhow::bail!("--gateway-api needs --load and --operator");
    };
    let svid = fedmesh_trust::Svid::load(&dir.join("svid.pem"), &dir.join("svid.key"))
        .with_context(|| format!("--operator {}", dir.display()))?;
    let (svid, bundles) = fedmesh_transport::load_trust(
        &fedmesh_transport::IdentityFiles {
            cert: dir.join("svid.pem"),
            key: dir.join("svid.key"),
        },
        &[fedmesh_transport::BundleFile {
            trust_domain: svid.id().trust_domain_name().to_owned(),
            path: dir.join("bundle.pem"),
        }],
    )
    .map_err(|e| anyhow::anyhow!("--operator {}: {}", dir.display(), e.join("; ")))?;
    let clients = apis
        .iter()
        .map(|api| {
            fedmesh_gateway::DrillClient::new(*api, &svid, bundles.clone(), Duration::from_secs(5))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let faults = api_faults(a)?;
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or_default();
    let drill = fedmesh_gateway::DrillId::new(&format!("drill-{}-{secs}", a.fail))?;
    if !(0.0..1.0).contains(&a.halt_error_rate) || !(1..=1000).contains(&a.guard_rate) {
        anyhow::bail!("--halt-error-rate must be within 0..1 and --guard-rate within 1..=1000");
    }
    let guards: Vec<drill::GuardTarget> = a
        .guards
        .iter()
        .map(|(name, addr)| drill::GuardTarget {
            name: name.clone(),
            addr: *addr,
            rate: a.guard_rate,
        })
        .collect();
    let halt = drill::HaltRule {
        max_error_rate: a.halt_error_rate,
        window: Duration::from_secs(2),
        min_requests: 10,
    };
    let api = drill::ApiDrill {
        clients: &clients,
        drill: &drill,
        faults: &faults,
        guards: &guards,
        halt,
    };
    Ok(drill::run_with_api(load, &a.spec(), &api, progress_bar()).await?)
}

pub async fn run(cmd: Command) -> anyhow::Result<ExitCode> {
    let a = match cmd {
        Command::Failover(a) => *a,
        Command::Echo(e) => {
            if e.name.is_empty() || e.name.len() > 253 || e.name.contains('\n') {
                anyhow::bail!("--name: 1 to 253 bytes on one line");
            }
            let l = tokio::net::TcpListener::bind(e.listen)
                .await
                .map_err(|err| anyhow::anyhow!("--listen {}: {err}", e.listen))?;
            tracing::info!(listen = %e.listen, name = %e.name, "drill echo app serving");
            fedmesh_rig::serve_app(fedmesh_rig::AppKind::Echo, l, e.name).await;
            return Ok(ExitCode::SUCCESS);
        }
    };
    if a.gateway_api.is_empty() && a.on != "demo" {
        anyhow::bail!(
            "--on {}: `demo` runs in this process; against a deployment give --gateway-api, --load and --operator",
            a.on
        );
    }
    // Every request of the run is kept for the report: bound the run.
    if !(1..=10_000).contains(&a.rate)
        || a.duration < Duration::from_secs(2)
        || a.duration > Duration::from_secs(600)
    {
        anyhow::bail!("--rate must be within 1..=10000 and --duration within 2s..=10m");
    }
    let report = match a.gateway_api.as_slice() {
        [_, ..] => run_api(&a, &a.gateway_api).await?,
        [] => {
            let rig = Rig::start(&demo_topology(&a.service, &a.fail, a.http)?).await?;
            drill::run_on_rig(&rig, &a.spec(), progress_bar()).await?
        }
    };
    if let Some(path) = &a.report {
        std::fs::write(path, fedmesh_rig::report::html(&report))
            .map_err(|e| anyhow::anyhow!("--report {}: {e}", path.display()))?;
    }
    let ok = passed(&report, a.target);
    let text = match a.output {
        Output::Json => {
            let mut v = serde_json::to_value(&report)?;
            v["pass"] = serde_json::Value::Bool(ok);
            v["target_ms"] = serde_json::json!(a.target.as_millis() as u64);
            serde_json::to_string_pretty(&v)? + "\n"
        }
        Output::Table => format!(
            "{}{}: failover target {} ms\n",
            drill::render(&report),
            if ok { "PASS" } else { "FAIL" },
            a.target.as_millis()
        ),
    };
    crate::emit(&text);
    Ok(if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}
