//! Failover drills: offer steady load from one cluster to a service, break
//! a cluster that serves it, restore it, and measure what callers saw.
//!
//! The analysis ([`analyze`]) is pure over the request samples, so the
//! figures a drill reports are tested without sockets. The runner breaks
//! the rig's clusters through [`FaultMode`]: the in-process rig has a UDP
//! relay in front of every gateway (kill, blackhole) and gateways drain.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;

use crate::error::Context;
use crate::faults::RelayMode;
use crate::load::{percentile, run_open_loop, LiveCounts, OpenLoopSpec, Sample};
use crate::rig::Rig;
use crate::RigError;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum FaultMode {
    /// The gateway process dies: its UDP port goes silent, its connection
    /// state is gone when it comes back.
    KillGateway,
    /// Packets to and from the gateway are dropped; nothing is closed.
    Blackhole,
    /// The gateway refuses new streams (callers fail over before sending
    /// payload) and lets open ones finish.
    Drain,
    /// UDP between the caller's gateway and the failed cluster's is
    /// dropped: QUIC dies, the TCP fallback carries (a gateway's drill API
    /// only).
    DropUdp,
    /// Datagrams to the failed cluster's gateway are delayed (a gateway's
    /// drill API only).
    Delay,
}

impl std::str::FromStr for FaultMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "kill-gateway" => Ok(Self::KillGateway),
            "blackhole" => Ok(Self::Blackhole),
            "drain" => Ok(Self::Drain),
            "drop-udp" => Ok(Self::DropUdp),
            "delay" => Ok(Self::Delay),
            other => Err(format!(
                "unknown mode {other:?}: expected kill-gateway, blackhole, drain, drop-udp or delay"
            )),
        }
    }
}

impl std::fmt::Display for FaultMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::KillGateway => "kill-gateway",
            Self::Blackhole => "blackhole",
            Self::Drain => "drain",
            Self::DropUdp => "drop-udp",
            Self::Delay => "delay",
        })
    }
}

#[derive(Debug, Clone)]
pub struct DrillSpec {
    /// `NAME.NS`
    pub service: String,
    /// The cluster whose client sidecar offers the load.
    pub from: String,
    /// The cluster to break.
    pub fail: String,
    pub mode: FaultMode,
    pub duration: Duration,
    /// Requests per second (each a new connection and one round trip, or
    /// one HTTP request with `http`).
    pub rate: u32,
    pub request_bytes: usize,
    /// A request slower than this failed.
    pub timeout: Duration,
    /// A request that succeeded but took longer than this was held up by
    /// the fault: it does not count toward "99% succeeding again".
    pub slo: Duration,
    /// HTTP requests on keep-alive connections (the service must speak
    /// HTTP) instead of one TCP connection per request.
    pub http: bool,
}

impl DrillSpec {
    /// The fault starts a quarter into the run and is repaired at 60%.
    pub fn break_at(&self) -> Duration {
        self.duration / 4
    }

    pub fn restore_at(&self) -> Duration {
        self.duration * 3 / 5
    }
}

/// One slice of the run (100 ms, by when requests started), for the
/// timeline.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Slice {
    pub from_ms: u64,
    pub ok: u64,
    pub failed: u64,
    /// Successful requests the failed cluster served.
    pub by_failed_cluster: u64,
    /// Successful requests by the cluster that served them.
    pub served_by: BTreeMap<String, u64>,
    /// Latency percentiles of the slice's successes (0 without any).
    pub p50_us: u64,
    pub p99_us: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct DrillReport {
    pub service: String,
    pub from: String,
    pub fail: String,
    pub mode: FaultMode,
    pub rate: u32,
    pub duration_ms: u64,
    pub break_at_ms: u64,
    pub restore_at_ms: u64,
    pub requests: u64,
    pub ok: u64,
    pub failed: u64,
    /// Failed requests that started while the fault was on.
    pub failed_during_fault: u64,
    /// Failed requests that started after the repair.
    pub failed_after_restore: u64,
    /// Stream attempts toward the failed cluster that gateways saw fail
    /// during the drill (each then tried elsewhere or failed its request):
    /// the fault's cost below the requests.
    pub attempts_cut: u64,
    /// Successful requests slower than the SLO.
    pub slow: u64,
    pub slo_ms: f64,
    /// Successful requests by the cluster that answered.
    pub served_by: BTreeMap<String, u64>,
    /// Share of successes the failed cluster took before the fault: the
    /// drill only proves failover if it took traffic in the first place.
    pub failed_cluster_share_before: f64,
    /// From the fault until a request was first answered elsewhere.
    pub first_elsewhere_ms: Option<f64>,
    /// From the fault until the requests started from then on (to the
    /// repair) succeed at 99% or better.
    pub to_99_percent_ms: Option<f64>,
    /// From the repair until the failed cluster answered again (None: it
    /// never did, e.g. the policy does not prefer it).
    pub recovery_ms: Option<f64>,
    pub p50_ms: f64,
    pub p99_ms: f64,
    /// p99 of requests started while the fault was on.
    pub p99_during_fault_ms: f64,
    pub errors: BTreeMap<String, u64>,
    pub timeline: Vec<Slice>,
    /// Why the drill removed its fault early (a guarded service failed
    /// past the bound), when it did.
    pub halted: Option<Halted>,
}

/// A drill stopped on its own.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Halted {
    /// From the start of the run.
    pub at_ms: u64,
    pub guard: String,
    pub error_rate: f64,
    /// Requests in the window that broke the bound.
    pub requests: u64,
}

/// When a drill stops on its own: a guarded service (one outside the
/// drill) fails more than `max_error_rate` of at least `min_requests`
/// requests within `window` while the fault is on.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct HaltRule {
    pub max_error_rate: f64,
    pub window: Duration,
    pub min_requests: u64,
}

/// One guarded service's recent outcomes. Pure: fed running totals and
/// the time, says when the rule is broken.
#[derive(Debug, Clone)]
pub struct Guard {
    rule: HaltRule,
    /// (when, ok, failed) increments within the window.
    recent: std::collections::VecDeque<(Duration, u64, u64)>,
    last: (u64, u64),
}

impl Guard {
    pub fn new(rule: HaltRule) -> Self {
        Self {
            rule,
            recent: Default::default(),
            last: (0, 0),
        }
    }

    /// The running totals at `at`; `Some((error rate, requests))` when
    /// the window breaks the rule.
    pub fn on(&mut self, at: Duration, ok: u64, failed: u64) -> Option<(f64, u64)> {
        let (d_ok, d_failed) = (
            ok.saturating_sub(self.last.0),
            failed.saturating_sub(self.last.1),
        );
        self.last = (ok, failed);
        if d_ok + d_failed > 0 {
            self.recent.push_back((at, d_ok, d_failed));
        }
        while self
            .recent
            .front()
            .is_some_and(|(t, ..)| *t + self.rule.window < at)
        {
            self.recent.pop_front();
        }
        let (ok, failed) = self
            .recent
            .iter()
            .fold((0, 0), |(o, f), (_, a, b)| (o + a, f + b));
        let n = ok + failed;
        let rate = failed as f64 / n.max(1) as f64;
        (n >= self.rule.min_requests && rate > self.rule.max_error_rate).then_some((rate, n))
    }
}

/// A service outside the drill whose error rate the drill watches.
#[derive(Debug, Clone)]
pub struct GuardTarget {
    pub name: String,
    /// An outbound listener for it (as the drill's own load).
    pub addr: std::net::SocketAddr,
    /// Requests per second offered to it.
    pub rate: u32,
}

const SLICE: Duration = Duration::from_millis(100);
/// Resolution of the 99% search.
const STEP: Duration = Duration::from_millis(50);

fn ms(d: Duration) -> f64 {
    d.as_micros() as f64 / 1000.0
}

/// Computes the report from the samples; `broke` and `restored` are when
/// the fault was actually applied and removed, from the start of the run.
pub fn analyze(
    spec: &DrillSpec,
    samples: &[Sample],
    broke: Duration,
    restored: Duration,
) -> DrillReport {
    let (b, r) = (broke, restored);
    let fail = spec.fail.as_str();
    let mut rep = DrillReport {
        service: spec.service.clone(),
        from: spec.from.clone(),
        fail: spec.fail.clone(),
        mode: spec.mode,
        rate: spec.rate,
        duration_ms: spec.duration.as_millis() as u64,
        break_at_ms: b.as_millis() as u64,
        restore_at_ms: r.as_millis() as u64,
        requests: samples.len() as u64,
        ok: 0,
        failed: 0,
        failed_during_fault: 0,
        failed_after_restore: 0,
        attempts_cut: 0,
        slow: 0,
        slo_ms: ms(spec.slo),
        served_by: BTreeMap::new(),
        failed_cluster_share_before: 0.0,
        first_elsewhere_ms: None,
        to_99_percent_ms: None,
        recovery_ms: None,
        p50_ms: 0.0,
        p99_ms: 0.0,
        p99_during_fault_ms: 0.0,
        errors: BTreeMap::new(),
        timeline: Vec::new(),
        halted: None,
    };
    let mut lat = Vec::new();
    let mut lat_fault = Vec::new();
    let (mut before_ok, mut before_fail_cluster) = (0u64, 0u64);
    let slices = (spec.duration.as_millis() / SLICE.as_millis()).max(1) as usize + 1;
    rep.timeline = (0..slices)
        .map(|i| Slice {
            from_ms: (SLICE * i as u32).as_millis() as u64,
            ..Default::default()
        })
        .collect();
    let mut slice_lat: Vec<Vec<Duration>> = vec![Vec::new(); slices];
    for s in samples {
        let during = s.start >= b && s.start < r;
        let at = ((s.start.as_millis() / SLICE.as_millis()) as usize).min(slices - 1);
        let slice = &mut rep.timeline[at];
        if s.ok {
            rep.ok += 1;
            slice.ok += 1;
            slice_lat[at].push(s.latency);
            *slice
                .served_by
                .entry(s.cluster().unwrap_or("?").to_owned())
                .or_default() += 1;
            rep.slow += u64::from(s.latency > spec.slo);
            lat.push(s.latency);
            if during {
                lat_fault.push(s.latency);
            }
            let c = s.cluster().unwrap_or("?");
            *rep.served_by.entry(c.to_owned()).or_default() += 1;
            if c == fail {
                slice.by_failed_cluster += 1;
            }
            if s.start < b {
                before_ok += 1;
                before_fail_cluster += u64::from(c == fail);
            }
            let done = s.start + s.latency;
            if c != fail && s.start >= b {
                let t = ms(done.saturating_sub(b));
                rep.first_elsewhere_ms = Some(rep.first_elsewhere_ms.map_or(t, |x: f64| x.min(t)));
            }
            if c == fail && s.start >= r {
                let t = ms(done.saturating_sub(r));
                rep.recovery_ms = Some(rep.recovery_ms.map_or(t, |x: f64| x.min(t)));
            }
        } else {
            rep.failed += 1;
            slice.failed += 1;
            if during {
                rep.failed_during_fault += 1;
            } else if s.start >= r {
                rep.failed_after_restore += 1;
            }
            let e = s.error.clone().unwrap_or_else(|| "unknown".into());
            *rep.errors.entry(e).or_default() += 1;
        }
    }
    if before_ok > 0 {
        rep.failed_cluster_share_before = before_fail_cluster as f64 / before_ok as f64;
    }
    // The earliest T in [break, restore) from which the requests started
    // up to the repair succeed, within the SLO, at 99% or better. One pass:
    // the window's samples sorted by start, suffix counts, then each step
    // finds its suffix by binary search.
    let mut window: Vec<(Duration, bool)> = samples
        .iter()
        .filter(|s| s.start >= b && s.start < r)
        .map(|s| (s.start, s.ok && s.latency <= spec.slo))
        .collect();
    window.sort_unstable_by_key(|w| w.0);
    let mut good_from = vec![0u64; window.len() + 1];
    for i in (0..window.len()).rev() {
        good_from[i] = good_from[i + 1] + u64::from(window[i].1);
    }
    let mut t = b;
    while t < r {
        let i = window.partition_point(|w| w.0 < t);
        let (ok, all) = (good_from[i], (window.len() - i) as u64);
        if all > 0 && ok * 100 >= all * 99 {
            rep.to_99_percent_ms = Some(ms(t - b));
            break;
        }
        t += STEP;
    }
    rep.p50_ms = ms(percentile(&mut lat, 50.0));
    rep.p99_ms = ms(percentile(&mut lat, 99.0));
    rep.p99_during_fault_ms = ms(percentile(&mut lat_fault, 99.0));
    for (slice, l) in rep.timeline.iter_mut().zip(slice_lat.iter_mut()) {
        slice.p50_us = percentile(l, 50.0).as_micros() as u64;
        slice.p99_us = percentile(l, 99.0).as_micros() as u64;
    }
    rep
}

/// What a drill runner reports while it runs.
#[derive(Debug, Clone, Copy)]
pub struct Progress {
    pub elapsed: Duration,
    pub total: Duration,
    pub ok: u64,
    pub failed: u64,
    /// `"steady"`, `"fault"` or `"restored"`.
    pub phase: &'static str,
}

/// Runs a drill on an in-process rig (built with `fault_relays`).
pub async fn run_on_rig(
    rig: &Rig,
    spec: &DrillSpec,
    mut progress: impl FnMut(Progress),
) -> Result<DrillReport, RigError> {
    let from = rig
        .cluster(&spec.from)
        .ok_or_else(|| RigError::Drill(format!("no cluster {:?}", spec.from)))?;
    let target = rig
        .cluster(&spec.fail)
        .ok_or_else(|| RigError::Drill(format!("no cluster {:?}", spec.fail)))?;
    let addr = from.client_addr(&spec.service).ok_or_else(|| {
        RigError::Drill(format!(
            "{} has no outbound listener for {}",
            spec.from, spec.service
        ))
    })?;
    if matches!(spec.mode, FaultMode::DropUdp | FaultMode::Delay) {
        return Err(RigError::Drill(format!(
            "mode {} is set through a gateway's drill API (--gateway-api), not on the in-process rig",
            spec.mode
        )));
    }
    let relay = target.relay.as_ref();
    if spec.mode != FaultMode::Drain && relay.is_none() {
        return Err(RigError::Drill(format!(
            "mode {} needs the rig's fault relays",
            spec.mode
        )));
    }
    // Gateways count what the fault cuts; the drill reports the difference.
    let cut = || -> u64 {
        rig.clusters
            .iter()
            .map(|c| c.gateway.metrics().peer_attempt_failure_count(&spec.fail))
            .sum()
    };
    let cut_before = cut();
    let announce = |on: bool| {
        for c in &rig.clusters {
            c.announce_fault(&spec.fail, on);
        }
    };
    let set = |on: bool| {
        // Announced first: what the fault causes is expected.
        if on {
            announce(true);
        }
        match (spec.mode, relay) {
            (FaultMode::Drain, _) => target.gateway.set_draining(on),
            (FaultMode::KillGateway, Some(r)) => {
                r.set(if on { RelayMode::Dead } else { RelayMode::Pass })
            }
            (FaultMode::Blackhole, Some(r)) => r.set(if on {
                RelayMode::Blackhole
            } else {
                RelayMode::Pass
            }),
            _ => {}
        }
        std::future::ready(Ok(()))
    };
    let no_halt = HaltRule {
        max_error_rate: 1.0,
        window: Duration::from_secs(1),
        min_requests: u64::MAX,
    };
    let run = drive(addr, spec, set, &[], no_halt, &mut progress).await;
    // Until the drill ends, not the repair: reconnecting is its aftermath.
    announce(false);
    let mut report = run?;
    report.attempts_cut = cut().saturating_sub(cut_before);
    Ok(report)
}

/// How a drill reaches its fault through a gateway's drill API, and what
/// halts it.
#[derive(Clone, Copy)]
pub struct ApiDrill<'a> {
    /// Every gateway process the fault goes to (each replica of one
    /// cluster's gateway: faults are per process).
    pub clients: &'a [fedmesh_gateway::DrillClient],
    pub drill: &'a fedmesh_gateway::DrillId,
    pub faults: &'a [fedmesh_gateway::FaultSpec],
    /// Services outside the drill it watches while the fault is on.
    pub guards: &'a [GuardTarget],
    pub halt: HaltRule,
}

/// A guarded service under watch: its load's counts and its guard.
struct Watched {
    name: String,
    live: Arc<LiveCounts>,
    guard: Guard,
    task: tokio::task::JoinHandle<Vec<Sample>>,
}

/// A drill against any deployment: load to `addr` (a sidecar's outbound
/// listener for the service), the fault set through a gateway's drill API
/// as `faults` (their ttl: the fault window and a margin, so a drill that
/// dies leaves nothing behind for long) and cleared at the repair.
pub async fn run_with_api(
    addr: std::net::SocketAddr,
    spec: &DrillSpec,
    api: &ApiDrill<'_>,
    mut progress: impl FnMut(Progress),
) -> Result<DrillReport, RigError> {
    let ApiDrill {
        clients,
        drill,
        faults,
        guards,
        halt,
    } = *api;
    if clients.is_empty() {
        return Err(RigError::Drill(
            "no gateway drill API to set the fault on".into(),
        ));
    }
    // Reachable and authorized before any load: a drill that cannot set
    // its fault fails within seconds and leaves nothing behind.
    for c in clients {
        c.status()
            .await
            .map_err(|e| RigError::Drill(e.to_string()))?;
    }
    // Which gateways hold the fault now.
    let held = std::sync::Mutex::new(vec![false; clients.len()]);
    let set = |want: bool| {
        let held = &held;
        async move {
            let mut first_error = None;
            for (i, c) in clients.iter().enumerate() {
                let is_on = held.lock().map(|h| h[i]).unwrap_or(false);
                if is_on == want {
                    continue;
                }
                let r = if want {
                    c.set(drill, faults).await.map(drop)
                } else {
                    c.clear(drill).await.map(drop)
                };
                match r {
                    Ok(()) => {
                        if let Ok(mut h) = held.lock() {
                            h[i] = want;
                        }
                        tracing::info!(gateway = %c.addr(), %drill, on = want, "drill: fault through the gateway's API");
                    }
                    Err(e) => {
                        first_error.get_or_insert(e.to_string());
                        // A fault half set is no drill: stop setting.
                        if want {
                            break;
                        }
                    }
                }
            }
            match first_error {
                None => Ok(()),
                Some(e) => Err(e),
            }
        }
    };
    drive(addr, spec, set, guards, halt, &mut progress).await
}

/// Runs the load, sets the fault at `break_at` and clears it at
/// `restore_at` (and, whatever happened, at the end), and analyzes.
async fn drive<F, Fut>(
    addr: std::net::SocketAddr,
    spec: &DrillSpec,
    mut set: F,
    guards: &[GuardTarget],
    halt: HaltRule,
    progress: &mut impl FnMut(Progress),
) -> Result<DrillReport, RigError>
where
    F: FnMut(bool) -> Fut,
    Fut: std::future::Future<Output = Result<(), String>>,
{
    let live = Arc::new(LiveCounts::default());
    let load = OpenLoopSpec {
        rate: spec.rate,
        duration: spec.duration,
        request_bytes: spec.request_bytes,
        timeout: spec.timeout,
        max_in_flight: 4096,
        http: spec.http,
    };
    let started = tokio::time::Instant::now();
    let runner = tokio::spawn({
        let (live, load) = (live.clone(), load.clone());
        async move { run_open_loop(addr, &load, live).await }
    });
    // Guarded services get load of their own for the whole run.
    let mut watched: Vec<Watched> = guards
        .iter()
        .map(|g| {
            let live = Arc::new(LiveCounts::default());
            let load = OpenLoopSpec {
                rate: g.rate,
                ..load.clone()
            };
            let (addr, counts) = (g.addr, live.clone());
            Watched {
                name: g.name.clone(),
                live,
                guard: Guard::new(halt),
                task: tokio::spawn(async move { run_open_loop(addr, &load, counts).await }),
            }
        })
        .collect();
    let mut halted = None;
    let (mut broken, mut restored) = (None, None);
    // Fine ticks so the fault lands on time; progress is reported less often.
    let mut tick = tokio::time::interval(Duration::from_millis(10));
    let mut n = 0u64;
    let mut failure = None;
    while !runner.is_finished() {
        tick.tick().await;
        n += 1;
        let elapsed = started.elapsed();
        if broken.is_none() && elapsed >= spec.break_at() {
            if let Err(e) = set(true).await {
                failure = Some(format!("setting the fault: {e}"));
                break;
            }
            broken = Some(started.elapsed());
            tracing::info!(cluster = %spec.fail, mode = %spec.mode, "drill: fault on");
        }
        // While the fault is on, services outside the drill must not fail
        // past the bound: if one does, the fault goes at once.
        if broken.is_some() && restored.is_none() {
            use std::sync::atomic::Ordering::Relaxed;
            let breach = watched.iter_mut().find_map(|w| {
                w.guard
                    .on(
                        elapsed,
                        w.live.ok.load(Relaxed),
                        w.live.failed.load(Relaxed),
                    )
                    .map(|(rate, n)| (w.name.clone(), rate, n))
            });
            if let Some((guard, error_rate, requests)) = breach {
                tracing::warn!(%guard, error_rate, "drill halted: a guarded service fails past the bound; removing the fault");
                if let Err(e) = set(false).await {
                    failure = Some(format!("removing the fault after a halt: {e}"));
                    break;
                }
                restored = Some(started.elapsed());
                halted = Some(Halted {
                    at_ms: elapsed.as_millis() as u64,
                    guard,
                    error_rate,
                    requests,
                });
            }
        }
        if restored.is_none() && elapsed >= spec.restore_at() {
            if let Err(e) = set(false).await {
                failure = Some(format!("repairing the fault: {e}"));
                break;
            }
            restored = Some(started.elapsed());
            tracing::info!(cluster = %spec.fail, "drill: fault repaired");
        }
        if !n.is_multiple_of(10) {
            continue;
        }
        use std::sync::atomic::Ordering::Relaxed;
        progress(Progress {
            elapsed,
            total: spec.duration,
            ok: live.ok.load(Relaxed),
            failed: live.failed.load(Relaxed),
            phase: match (broken, restored) {
                (None, _) => "steady",
                (Some(_), None) => "fault",
                (Some(_), Some(_)) => "restored",
            },
        });
    }
    // Whatever happened, the fault goes (a second try after a failure).
    if let Err(e) = set(false).await {
        tracing::warn!(error = %e, "drill: clearing the fault failed; it ends by its ttl");
    }
    for w in &watched {
        if failure.is_some() {
            w.task.abort();
        }
    }
    if let Some(why) = failure {
        runner.abort();
        return Err(RigError::Drill(why));
    }
    {
        use std::sync::atomic::Ordering::Relaxed;
        progress(Progress {
            elapsed: spec.duration,
            total: spec.duration,
            ok: live.ok.load(Relaxed),
            failed: live.failed.load(Relaxed),
            phase: "done",
        });
    }
    let samples = runner.await.ctx(|| "the drill's load".into())?;
    for w in watched.drain(..) {
        let _ = w.task.await;
    }
    let mut report = analyze(
        spec,
        &samples,
        broken.unwrap_or(spec.break_at()),
        restored.unwrap_or(spec.restore_at()),
    );
    report.halted = halted;
    Ok(report)
}

/// The report as a table for people.
pub fn render(rep: &DrillReport) -> String {
    let opt = |v: Option<f64>| v.map_or_else(|| "never".to_owned(), |v| format!("{v:.0} ms"));
    let mut out = String::new();
    let line = |out: &mut String, k: &str, v: String| out.push_str(&format!("  {k:<38} {v}\n"));
    out.push_str(&format!(
        "drill: {} from {} with {} {} ({} req/s for {:.1} s; fault at {:.1} s, repaired at {:.1} s)\n",
        rep.service,
        rep.from,
        rep.fail,
        rep.mode,
        rep.rate,
        rep.duration_ms as f64 / 1000.0,
        rep.break_at_ms as f64 / 1000.0,
        rep.restore_at_ms as f64 / 1000.0,
    ));
    line(
        &mut out,
        "requests (ok / failed)",
        format!("{} ({} / {})", rep.requests, rep.ok, rep.failed),
    );
    line(
        &mut out,
        "failed during the fault",
        rep.failed_during_fault.to_string(),
    );
    line(
        &mut out,
        "failed after the repair",
        rep.failed_after_restore.to_string(),
    );
    line(
        &mut out,
        &format!("stream tries cut on {} (retried)", rep.fail),
        rep.attempts_cut.to_string(),
    );
    line(
        &mut out,
        &format!("succeeded but slower than {:.0} ms", rep.slo_ms),
        rep.slow.to_string(),
    );
    line(
        &mut out,
        &format!("{}'s share before the fault", rep.fail),
        format!("{:.0}%", rep.failed_cluster_share_before * 100.0),
    );
    line(
        &mut out,
        "first request served elsewhere",
        opt(rep.first_elsewhere_ms),
    );
    line(&mut out, "99% succeeding again", opt(rep.to_99_percent_ms));
    line(
        &mut out,
        &format!("{} serving again after repair", rep.fail),
        opt(rep.recovery_ms),
    );
    line(
        &mut out,
        "latency p50 / p99 (p99 during fault)",
        format!(
            "{:.2} / {:.2} ms ({:.2} ms)",
            rep.p50_ms, rep.p99_ms, rep.p99_during_fault_ms
        ),
    );
    let served: Vec<String> = rep
        .served_by
        .iter()
        .map(|(k, v)| format!("{k} {v}"))
        .collect();
    line(&mut out, "served by", served.join(", "));
    for (e, n) in &rep.errors {
        line(&mut out, "error", format!("{n} × {e}"));
    }
    if let Some(h) = &rep.halted {
        line(
            &mut out,
            "HALTED (fault removed early)",
            format!(
                "at {} ms: {} failed {:.0}% of {} requests",
                h.at_ms,
                h.guard,
                h.error_rate * 100.0,
                h.requests
            ),
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> DrillSpec {
        DrillSpec {
            service: "echo.demo".into(),
            from: "east".into(),
            fail: "west".into(),
            mode: FaultMode::Blackhole,
            duration: Duration::from_secs(10),
            rate: 10,
            request_bytes: 16,
            timeout: Duration::from_secs(2),
            slo: Duration::from_millis(250),
            http: false,
        }
    }

    fn sample(start_ms: u64, ok: bool, by: &str) -> Sample {
        Sample {
            start: Duration::from_millis(start_ms),
            latency: Duration::from_millis(5),
            ok,
            served_by: ok.then(|| format!("{by}/echo-0")),
            error: (!ok).then(|| "io".into()),
        }
    }

    #[test]
    fn the_figures_follow_the_samples() {
        // 10 s at 10/s: west until the fault at 2.5 s, two failures, then
        // north, west again 1 s after the repair at 6 s.
        let mut v = Vec::new();
        for i in 0..100u64 {
            let t = i * 100;
            let s = match t {
                0..2500 => sample(t, true, "west"),
                2500..2700 => sample(t, false, ""),
                2700..7000 => sample(t, true, "north"),
                _ => sample(t, true, "west"),
            };
            v.push(s);
        }
        let sp = spec();
        let r = analyze(&sp, &v, sp.break_at(), sp.restore_at());
        assert_eq!((r.requests, r.ok, r.failed), (100, 98, 2));
        assert_eq!(r.failed_during_fault, 2);
        assert_eq!(r.failed_cluster_share_before, 1.0);
        assert_eq!(r.first_elsewhere_ms, Some(205.0));
        assert_eq!(
            r.to_99_percent_ms,
            Some(150.0),
            "from 2.65 s on, everything succeeds"
        );
        assert_eq!(r.recovery_ms, Some(1005.0));
        assert_eq!(r.served_by["north"], 43);
        // 100 ms slices: the two failures started at 2.5 and 2.6 s.
        assert_eq!((r.timeline[25].failed, r.timeline[26].failed), (1, 1));
        assert_eq!(r.timeline[30].served_by["north"], 1);
        assert!(r.timeline[30].p99_us > 0);
        let table = render(&r);
        assert!(
            table.contains("99% succeeding again") && table.contains("150 ms"),
            "{table}"
        );
    }

    #[test]
    fn slow_successes_do_not_count_as_recovered() {
        // Everything succeeds, but what starts in the first 800 ms of the
        // fault takes 1 s: that is not "succeeding again".
        let v: Vec<Sample> = (0..100u64)
            .map(|i| {
                let t = i * 100;
                let mut s = sample(t, true, if t < 2500 { "west" } else { "north" });
                if (2500..3300).contains(&t) {
                    s.latency = Duration::from_secs(1);
                }
                s
            })
            .collect();
        let sp = spec();
        let r = analyze(&sp, &v, sp.break_at(), sp.restore_at());
        assert_eq!(r.failed, 0);
        assert_eq!(r.slow, 8);
        // The last slow one started 700 ms in; the search steps by 50 ms.
        assert_eq!(r.to_99_percent_ms, Some(750.0));
    }

    #[test]
    fn a_drill_that_never_recovers_says_so() {
        let v: Vec<Sample> = (0..100u64)
            .map(|i| {
                let t = i * 100;
                sample(t, t < 2500, "west")
            })
            .collect();
        let sp = spec();
        let r = analyze(&sp, &v, sp.break_at(), sp.restore_at());
        assert_eq!(r.first_elsewhere_ms, None);
        assert_eq!(r.to_99_percent_ms, None);
        assert_eq!(r.recovery_ms, None);
        assert!(render(&r).contains("never"));
    }

    #[test]
    fn a_guard_halts_on_errors_within_its_window_only() {
        let rule = HaltRule {
            max_error_rate: 0.1,
            window: Duration::from_secs(2),
            min_requests: 10,
        };
        let mut g = Guard::new(rule);
        let s = Duration::from_secs;
        // 20 ok, then 1 failure of 21: 5%, fine.
        assert_eq!(g.on(s(1), 20, 0), None);
        assert_eq!(g.on(s(2), 20, 1), None);
        // Too few requests to judge, however bad.
        let mut few = Guard::new(rule);
        assert_eq!(few.on(s(1), 0, 5), None);
        // Failures pile up: 5 of 25 within the window, 20%: halt.
        let (rate, n) = g.on(s(3), 20, 5).unwrap();
        assert_eq!(n, 25);
        assert!((rate - 0.2).abs() < 1e-9);
        // Old failures leave the window: later requests are judged alone.
        assert_eq!(g.on(s(10), 40, 5), None);
        assert_eq!(g.on(s(11), 60, 5), None);
    }
}
