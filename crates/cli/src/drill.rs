//! `fedmesh drill failover`: steady load from one cluster to a service,
//! one serving cluster broken and repaired, and what callers saw.

use std::process::ExitCode;
use std::time::Duration;

use fedmesh_rig::drill::{self, DrillReport, DrillSpec, FaultMode, Progress};
use fedmesh_rig::{ControlPlane, Rig, Topology};

#[derive(clap::Subcommand)]
pub enum Command {
    /// Break one cluster serving a service under load and measure failover.
    Failover(FailoverArgs),
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
    /// kill-gateway, blackhole or drain.
    #[arg(long, default_value = "blackhole", value_parser = parse_mode)]
    pub mode: FaultMode,
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
    /// Where to run it. Only `demo` today: the three demo clusters in this
    /// process, with a UDP relay in front of every gateway.
    #[arg(long, default_value = "demo")]
    pub on: String,
    #[arg(long, value_enum, default_value = "table")]
    pub output: Output,
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

pub async fn run(cmd: Command) -> anyhow::Result<ExitCode> {
    let Command::Failover(a) = cmd;
    if a.on != "demo" {
        anyhow::bail!(
            "--on {}: only `demo` is supported yet (drills against processes and real clusters come with the e2e rig)",
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
    let rig = Rig::start(&demo_topology(&a.service, &a.fail, a.http)?).await?;
    let report = drill::run_on_rig(&rig, &a.spec(), progress_bar()).await?;
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
