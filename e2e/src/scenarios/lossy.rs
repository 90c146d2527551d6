//! `lossy-wan`: east and west joined by the packet-level WAN
//! ([`crate::wan`]), which delays and drops QUIC datagrams and TCP
//! segments alike. The emulator's self-test runs first; then, per
//! transport (QUIC; the TCP fallback with Cubic; with BBR), one bulk
//! stream's goodput (east's `web` sidecar → gateway ═WAN═ gateway →
//! west's sidecar → echo app, echoed back) and small HTTP requests'
//! latency alone and beside that bulk stream on the same peer
//! connection, at 30 ms RTT with 1 % loss (and 0 % unless `--quick`).
//! Throughput and latency are reported, not asserted: the scenario fails
//! only when the self-test fails or a transport moves no data.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Serialize;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};

use super::{cut_path, finish_load, start_load, until_transport, Outcome, Params, Path, Timeline};
use crate::rig::Rig;
use crate::selftest;
use crate::wan::{DirStats, Impairment, Wan};

const RTT: Duration = Duration::from_millis(30);

/// One transport at one loss, measured.
#[derive(Debug, Clone, Serialize, Default)]
pub struct WanRun {
    pub transport: String,
    /// TCP's congestion control as `ss` shows it on east's fallback
    /// connection (set by the WAN's routes); for QUIC, quinn's.
    pub congestion: String,
    pub rtt_ms: f64,
    pub loss_percent: f64,
    pub bulk_mbit: f64,
    pub bulk_bytes: u64,
    pub bulk_secs: f64,
    /// The echo app's banner: who served the bulk stream.
    pub bulk_served_by: String,
    pub bulk_error: Option<String>,
    pub requests_alone: usize,
    pub failed_alone: usize,
    pub p50_alone_ms: f64,
    pub p99_alone_ms: f64,
    pub requests_beside: usize,
    pub failed_beside: usize,
    pub p50_beside_ms: f64,
    pub p99_beside_ms: f64,
    /// What the emulator dropped of what it was given, east → west and
    /// back, during the run.
    pub observed_loss_out_percent: f64,
    pub observed_loss_back_percent: f64,
    /// UDP receive-buffer drops (`RcvbufErrors`) in each namespace during
    /// the run.
    pub rcvbuf_errors: BTreeMap<String, u64>,
}

impl WanRun {
    /// p50 / p99, or `-` for the raw-quinn reference (no requests).
    fn latency(&self, p50: f64, p99: f64) -> String {
        if self.transport == "raw" {
            "-".to_owned()
        } else {
            format!("{p50:.1} / {p99:.1}")
        }
    }

    fn row(&self) -> String {
        let rcv = |c: &str| {
            self.rcvbuf_errors
                .get(c)
                .map_or("?".to_owned(), u64::to_string)
        };
        format!(
            "  {:<12} {:>5} {:>11.2} {:>18} {:>18} {:>15} {:>9}",
            format!("{} {}", self.transport, self.congestion),
            format!("{}%", self.loss_percent),
            self.bulk_mbit,
            self.latency(self.p50_alone_ms, self.p99_alone_ms),
            self.latency(self.p50_beside_ms, self.p99_beside_ms),
            format!(
                "{:.2} / {:.2}%",
                self.observed_loss_out_percent, self.observed_loss_back_percent
            ),
            format!("{} / {}", rcv("east"), rcv("west")),
        )
    }
}

fn header() -> String {
    format!(
        "  {:<12} {:>5} {:>11} {:>18} {:>18} {:>15} {:>9}",
        "transport",
        "loss",
        "bulk Mbit/s",
        "p50/p99 alone ms",
        "p50/p99 +bulk ms",
        "seen loss o/b",
        "RcvbufErr"
    )
}

fn loss_percent(s: &DirStats) -> f64 {
    100.0 * (s.lost + s.queue_drops) as f64 / s.packets.max(1) as f64
}

/// The WAN's counts and the namespaces' `RcvbufErrors` when a run
/// starts; [`Before::fill`] puts what changed since into the run.
struct Before {
    out: DirStats,
    back: DirStats,
    rcvbuf: [Option<u64>; 2],
}

impl Before {
    async fn take(wan: &Wan, ends: &Ends) -> Before {
        Before {
            out: wan.stats("east", "west").unwrap_or_default(),
            back: wan.stats("west", "east").unwrap_or_default(),
            rcvbuf: [
                rcvbuf_errors(&ends.east.1).await,
                rcvbuf_errors(&ends.west.1).await,
            ],
        }
    }

    async fn fill(self, wan: &Wan, ends: &Ends, r: &mut WanRun) {
        let now = |a, b| wan.stats(a, b).unwrap_or_default();
        r.observed_loss_out_percent = loss_percent(&now("east", "west").since(&self.out));
        r.observed_loss_back_percent = loss_percent(&now("west", "east").since(&self.back));
        for (m, before) in [&ends.east, &ends.west].into_iter().zip(self.rcvbuf) {
            if let (Some(a), Some(b)) = (rcvbuf_errors(&m.1).await, before) {
                r.rcvbuf_errors.insert(m.0.clone(), a.saturating_sub(b));
            }
        }
    }
}

pub(super) async fn lossy_wan(rig: &mut Rig, p: &Params, o: &mut Outcome, tl: &mut Timeline) {
    if wan_or_skip(rig, o, tl, "lossy-wan").is_none() {
        return;
    }
    // The gateways start with the default controller.
    let default = default_spec();
    let mut controller = Some(default.clone());
    let r = run(rig, p, o, tl, &mut controller).await;
    if controller != Some(default) {
        for c in ["east", "west"] {
            if let Err(e) = rig.restart_gateway_with_congestion(c, None).await {
                o.check(
                    format!("{c}'s gateway restarts with its default controller"),
                    false,
                    format!("{e:#}"),
                );
            }
        }
    }
    if let Ok(wan) = &rig.wan {
        restore(rig, wan, o, "lossy-wan", r);
    }
}

/// The WAN of a rig that has one.
fn the_wan(rig: &Rig) -> anyhow::Result<&Wan> {
    rig.wan.as_ref().map_err(|e| anyhow::anyhow!("no WAN: {e}"))
}

fn default_spec() -> String {
    format!(
        "controller: {}",
        fedmesh_gateway::CongestionConfig::default().controller
    )
}

/// What each case runs: (transport, congestion control). For QUIC, both
/// gateways restart with that controller; for TCP, the WAN's routes set
/// it. `--quick` (CI) runs QUIC with the default controller only.
const CASES: [(&str, &str); 4] = [
    ("quic", "bbr"),
    ("quic", "cubic"),
    ("tcp", "cubic"),
    ("tcp", "bbr"),
];

/// The path-event case's runs: the [`CASES`], and Cubic without
/// fedmesh's path-event handling (quinn's Cubic as it is), to show what
/// that handling changes.
const EVENT_CASES: [(&str, &str, &str); 5] = [
    ("quic", "bbr", "controller: bbr"),
    ("quic", "cubic", "controller: cubic"),
    (
        "quic",
        "cubic-plain",
        "controller: cubic, path_event_recovery: false",
    ),
    ("tcp", "cubic", ""),
    ("tcp", "bbr", ""),
];

/// Restarts east's and west's gateways with `spec` as their config's
/// `congestion` mapping, unless they already run it.
async fn quic_controller(
    rig: &mut Rig,
    spec: &str,
    now: &mut Option<String>,
) -> anyhow::Result<()> {
    if now.as_deref() == Some(spec) {
        return Ok(());
    }
    for c in ["east", "west"] {
        rig.restart_gateway_with_congestion(c, Some(spec)).await?;
    }
    *now = Some(spec.to_owned());
    Ok(())
}

/// The WAN, or a passing check that says why the scenario `name` is
/// skipped without it.
pub(super) fn wan_or_skip<'r>(
    rig: &'r Rig,
    o: &mut Outcome,
    tl: &mut Timeline,
    name: &str,
) -> Option<&'r Wan> {
    match &rig.wan {
        Ok(w) => Some(w),
        Err(why) => {
            tl.note(format!("{name} skipped: {why}"));
            o.check(
                format!("{name} skipped (reported)"),
                true,
                format!("no packet-level WAN: {why}"),
            );
            None
        }
    }
}

/// Whatever a WAN scenario did: the clusters meet on the bridge again,
/// unimpaired and uncut; an error becomes a failed check.
pub(super) fn restore(rig: &Rig, wan: &Wan, o: &mut Outcome, name: &str, r: anyhow::Result<()>) {
    wan.detach();
    wan.impair_both("east", "west", Impairment::default()).ok();
    cut_path(rig, "east", "west", Path::Both, false, o);
    if let Err(e) = r {
        o.check(format!("{name} ran to the end"), false, format!("{e:#}"));
    }
}

/// (cluster, namespace, address).
pub(super) type Member = (String, String, std::net::IpAddr);

/// What every WAN scenario starts from: east and west on the attached WAN
/// after the emulator's self-test, and a CA for the raw-quinn probes.
pub(super) struct Ends {
    pub east: Member,
    pub west: Member,
    pub exe: std::path::PathBuf,
    pub ca_dir: std::path::PathBuf,
    pub selftest: selftest::SelfTest,
}

/// Attaches the WAN (Cubic on its routes) and runs its self-test between
/// east and west, each check reported in `o`; the caller goes on only if
/// it passed.
pub(super) async fn prepare(
    rig: &Rig,
    wan: &Wan,
    p: &Params,
    o: &mut Outcome,
    tl: &mut Timeline,
) -> anyhow::Result<Ends> {
    let ns = rig
        .netns
        .as_ref()
        .ok_or_else(|| anyhow::anyhow!("no namespaces"))?;
    let member = |c: &str| {
        ns.members()
            .iter()
            .find(|m| m.0 == c)
            .cloned()
            .ok_or_else(|| anyhow::anyhow!("{c} has no namespace"))
    };
    let (east, west) = (member("east")?, member("west")?);
    wan.attach("cubic")?;
    tl.note(format!("WAN attached: {}", wan.describe()));
    let exe = std::env::current_exe()?;
    // One TCP flow's goodput over 8 s scattered 0.79-1.30x Mathis in
    // seven runs: 16 s keeps CI's self-test from failing on chance.
    let st = selftest::run(
        wan,
        &exe,
        (&east.0, &east.1, east.2),
        (&west.0, &west.1, west.2),
        if p.quick { 16 } else { 30 },
    )
    .await?;
    tl.note(st.summary());
    for (what, ok, detail) in &st.checks {
        o.check(format!("WAN self-test: {what}"), *ok, detail.clone());
    }
    // The raw-quinn reference's identity: a CA of its own.
    let ca_dir = rig.dir.path().join("wan-ca");
    fedmesh_trust::CertificateAuthority::new_root(
        fedmesh_trust::TrustDomain::new("wan.e2e")?,
        Duration::from_secs(86_400),
    )?
    .save(&ca_dir)?;
    Ok(Ends {
        east,
        west,
        exe,
        ca_dir,
        selftest: st,
    })
}

async fn run(
    rig: &mut Rig,
    p: &Params,
    o: &mut Outcome,
    tl: &mut Timeline,
    controller: &mut Option<String>,
) -> anyhow::Result<()> {
    if p.quick {
        tl.note("--quick: 1% loss only (not 0% too), QUIC with the default controller only, 8 s phases (not 20 s), a 16 s self-test flow (not 30 s), recovery series of 5 s (not 10 s), path event on QUIC only with 3 s transfers (not 10 s)");
    }
    let default_cc = fedmesh_gateway::CongestionConfig::default()
        .controller
        .to_string();
    let wanted = |transport: &str, cc: &str| !p.quick || transport == "tcp" || cc == default_cc;
    let ends = prepare(rig, the_wan(rig)?, p, o, tl).await?;
    let mut report = serde_json::json!({ "selftest": ends.selftest.clone(), "runs": [] });
    if !ends.selftest.passed() {
        o.wan = Some(report);
        return Ok(());
    }

    let phase = p.len(20, 8);
    let r_rtt = RTT.as_secs_f64() * 1e3;
    let losses: &[f64] = if p.quick { &[1.0] } else { &[0.0, 1.0] };
    let mut runs = Vec::new();
    for &loss in losses {
        for (transport, cc) in CASES {
            if !wanted(transport, cc) {
                continue;
            }
            if transport == "quic" {
                quic_controller(rig, &format!("controller: {cc}"), controller).await?;
            }
            let wan = the_wan(rig)?;
            // The connection is made on the path it is measured on: a
            // path whose round trip grows from 0.3 to 30 ms right after
            // the handshake is a route change, which BBR (quinn's, ours
            // and Linux's) takes up to 10 s to notice.
            let set = Impairment::path(RTT, loss);
            wan.impair_both("east", "west", set)?;
            let congestion = match use_transport(rig, wan, transport, cc, tl).await {
                Ok(c) => c,
                Err(e) => {
                    o.check(
                        format!("east reaches west over {transport} ({cc})"),
                        false,
                        format!("{e:#}"),
                    );
                    continue;
                }
            };
            tl.note(format!(
                "east–west: {}; {transport} {congestion}",
                set.describe()
            ));
            let (mut r, mut loads) = measure(rig, wan, p, phase, &ends).await;
            wan.impair_both("east", "west", Impairment::default())?;
            for (l, when) in loads.iter_mut().zip(["alone", "+bulk"]) {
                l.cluster = format!("east {transport}/{cc} {loss}% {when}");
            }
            o.loads.extend(loads);
            r.transport = transport.to_owned();
            r.congestion = congestion;
            r.rtt_ms = r_rtt;
            r.loss_percent = loss;
            tl.note(format!(
                "{} {} at {loss}% loss: bulk {:.2} Mbit/s ({} B in {:.1} s, served by {}{}), small requests p50/p99 {:.1}/{:.1} ms alone, {:.1}/{:.1} ms beside the bulk stream",
                r.transport,
                r.congestion,
                r.bulk_mbit,
                r.bulk_bytes,
                r.bulk_secs,
                r.bulk_served_by,
                r.bulk_error.as_deref().map(|e| format!("; {e}")).unwrap_or_default(),
                r.p50_alone_ms,
                r.p99_alone_ms,
                r.p50_beside_ms,
                r.p99_beside_ms
            ));
            o.check(
                format!("{transport} {cc} at {loss}% loss moves data"),
                r.bulk_bytes > 0 && r.requests_alone > r.failed_alone,
                format!(
                    "bulk {} B; small requests {} ({} failed) alone, {} ({} failed) beside",
                    r.bulk_bytes,
                    r.requests_alone,
                    r.failed_alone,
                    r.requests_beside,
                    r.failed_beside
                ),
            );
            runs.push(r);
            if transport == "quic" {
                wan.impair_both("east", "west", set)?;
                let raw = raw_quinn(wan, &ends, phase, Some(cc)).await;
                wan.impair_both("east", "west", Impairment::default())?;
                let mut raw = raw.unwrap_or_else(|e| WanRun {
                    transport: "raw".into(),
                    congestion: cc.into(),
                    bulk_error: Some(format!("{e:#}")),
                    ..WanRun::default()
                });
                raw.loss_percent = loss;
                raw.rtt_ms = r_rtt;
                tl.note(format!(
                    "raw quinn {cc} at {loss}% loss: {:.2} Mbit/s one way ({} B in {:.1} s){}",
                    raw.bulk_mbit,
                    raw.bulk_bytes,
                    raw.bulk_secs,
                    raw.bulk_error
                        .as_deref()
                        .map(|e| format!("; {e}"))
                        .unwrap_or_default()
                ));
                runs.push(raw);
            }
        }
    }
    let mut events = Vec::new();
    for (transport, cc, spec) in EVENT_CASES {
        if p.quick && (transport != "quic" || cc != default_cc) {
            continue;
        }
        if transport == "quic" {
            quic_controller(rig, spec, controller).await?;
        }
        match path_event(rig, the_wan(rig)?, p, transport, cc, tl).await {
            Ok(e) => events.push(e),
            Err(e) => o.check(
                format!("path event on {transport} {cc} ran"),
                false,
                format!("{e:#}"),
            ),
        }
    }
    quic_controller(rig, &default_spec(), controller).await?;
    let wan = the_wan(rig)?;
    match recovery(rig, wan, p, tl).await {
        Ok(rec) => {
            o.check(
                "recovery: a clean bulk stream moves data after the blackout (reported)",
                true,
                format!(
                    "before {:?} Mbit/s per second, after {:?}; QUIC back {:.1} s after the blackout (via {})",
                    rec.before_mbit,
                    rec.after_mbit,
                    rec.back_on_quic_after_s,
                    rec.transports_seen.join(" → ")
                ),
            );
            report["recovery"] = serde_json::to_value(&rec)?;
        }
        Err(e) => o.check("recovery case ran", false, format!("{e:#}")),
    }
    let mut faults = Vec::new();
    for case in FAULTS {
        match fault(rig, the_wan(rig)?, p, case, tl).await {
            Ok(f) => faults.push(f),
            Err(e) => o.check(format!("fault {} ran", case.0), false, format!("{e:#}")),
        }
    }
    for f in &faults {
        let grew = f
            .rss_max_mib
            .iter()
            .zip(&f.rss_start_mib)
            .map(|(m, s)| m - s);
        let grew = grew.fold(0.0, f64::max);
        o.check(
            format!("fault {}: the gateways' memory stays bounded", f.case),
            grew < RSS_BOUND_MIB,
            format!(
                "RSS east/west {:.0}/{:.0} MiB at the start, at most {:.0}/{:.0} (bound: {RSS_BOUND_MIB} MiB more)",
                f.rss_start_mib[0], f.rss_start_mib[1], f.rss_max_mib[0], f.rss_max_mib[1]
            ),
        );
    }
    report["faults"] = serde_json::to_value(&faults)?;
    o.table.push(format!(
        "  {} ms RTT; one bulk stream echoed (goodput of the payload each way), 64 B HTTP requests; raw quinn: one stream one way, the gateways' settings",
        RTT.as_millis()
    ));
    o.table.push(header());
    o.table.extend(runs.iter().map(WanRun::row));
    o.table.push(format!(
        "  path event, clean {} ms path: bulk Mbit/s (mean of 1 s windows) on a fresh connection, right after (warm), and after idling, a {} ms blackout and 1 s of small requests",
        RTT.as_millis(),
        BLIP.as_millis()
    ));
    o.table.push(PathEvent::header());
    o.table.extend(events.iter().map(PathEvent::row));
    report["runs"] = serde_json::to_value(&runs)?;
    report["path_events"] = serde_json::to_value(&events)?;
    o.wan = Some(report);
    Ok(())
}

/// Gets east→west onto a fresh connection of `transport`: both paths are
/// cut until east sees west down, then QUIC gets through again, or only
/// TCP (the fallback, with congestion control `cc` from the WAN's
/// routes). Returns the congestion control in use.
pub(super) async fn use_transport(
    rig: &Rig,
    wan: &Wan,
    transport: &str,
    cc: &str,
    tl: &mut Timeline,
) -> anyhow::Result<String> {
    // The routes' TCP congestion control matters only to the fallback;
    // for QUIC `cc` names the gateways' controller.
    wan.attach(if transport == "tcp" { cc } else { "cubic" })?;
    let limit = Duration::from_secs(30);
    // A fresh peer connection every time: one carries every stream of
    // the pair, and the congestion state a run leaves (a window shrunk
    // by loss) would otherwise carry over into the next one.
    rig.cut("east", "west", true, true)?;
    let down = until_transport(rig, "east", "west", "down", Duration::from_secs(15)).await;
    anyhow::ensure!(
        down.is_some(),
        "east still reaches west with both paths cut"
    );
    if transport == "quic" {
        rig.cut("east", "west", true, false)?;
        // A dial that met the cut may land on TCP first; QUIC is taken
        // back within the retry interval.
        let waited = until_transport(rig, "east", "west", "quic", limit).await;
        anyhow::ensure!(
            waited.is_some(),
            "east is not on QUIC to west within {limit:?}"
        );
        tl.note("east reaches west over QUIC (a fresh connection)");
        return Ok(cc.to_owned());
    }
    rig.cut("east", "west", false, true)?;
    let waited = until_transport(rig, "east", "west", "tcp", limit).await;
    anyhow::ensure!(
        waited.is_some(),
        "east is not on the TCP fallback within {limit:?}"
    );
    let seen = tcp_congestion(rig).await.unwrap_or_else(|| "?".to_owned());
    tl.note(format!("east reaches west over the TCP fallback ({seen})"));
    Ok(seen)
}

/// The congestion control of east's TCP fallback connection to west, as
/// `ss -ti` shows it inside east's namespace.
async fn tcp_congestion(rig: &Rig) -> Option<String> {
    let ns = rig.netns.as_ref()?.namespace("east")?.to_owned();
    let to: SocketAddr = rig.cluster("west")?.tcp;
    let out = tokio::process::Command::new("ip")
        .args([
            "netns",
            "exec",
            &ns,
            "ss",
            "-tiH",
            "state",
            "established",
            "dst",
        ])
        .arg(to.to_string())
        .stdin(Stdio::null())
        .output()
        .await
        .ok()?;
    let text = String::from_utf8_lossy(&out.stdout);
    ["bbr", "cubic", "reno"]
        .into_iter()
        .find(|cc| text.split_whitespace().any(|w| w == *cc))
        .map(str::to_owned)
}

/// `RcvbufErrors` of UDP in namespace `ns` (`/proc/net/snmp`).
async fn rcvbuf_errors(ns: &str) -> Option<u64> {
    let out = tokio::process::Command::new("ip")
        .args(["netns", "exec", ns, "cat", "/proc/net/snmp"])
        .stdin(Stdio::null())
        .output()
        .await
        .ok()?;
    let text = String::from_utf8_lossy(&out.stdout);
    let mut udp = text.lines().filter(|l| l.starts_with("Udp: "));
    let names = udp.next()?.split_whitespace();
    let values = udp.next()?.split_whitespace();
    names
        .zip(values)
        .find(|(n, _)| *n == "RcvbufErrors")
        .and_then(|(_, v)| v.parse().ok())
}

/// One run: small requests alone, then beside the bulk stream; returns
/// the run and the two loads' summaries.
async fn measure(
    rig: &Rig,
    wan: &Wan,
    p: &Params,
    phase: Duration,
    ends: &Ends,
) -> (WanRun, Vec<super::LoadSummary>) {
    let mut r = WanRun::default();
    let before = Before::take(wan, ends).await;

    let alone = start_load(rig, p, phase, &["east"], false);
    tokio::time::sleep(phase).await;
    let mut alone = finish_load(alone).await;
    alone.truncate(1);
    if let Some(l) = alone.first() {
        (
            r.requests_alone,
            r.failed_alone,
            r.p50_alone_ms,
            r.p99_alone_ms,
        ) = (l.requests, l.failed, l.p50_ms, l.p99_ms);
    }

    let stop = Arc::new(AtomicBool::new(false));
    let started = Arc::new(tokio::sync::Notify::new());
    let bulk = rig
        .cluster("east")
        .map(|c| tokio::spawn(bulk_echo(c.echox_out, stop.clone(), started.clone())));
    // The small requests start once the bulk stream moves.
    let _ = tokio::time::timeout(Duration::from_secs(10), started.notified()).await;
    let beside = start_load(rig, p, phase, &["east"], false);
    let mut beside = finish_load(beside).await;
    beside.truncate(1);
    stop.store(true, Ordering::Relaxed);
    if let Some(l) = beside.first() {
        (
            r.requests_beside,
            r.failed_beside,
            r.p50_beside_ms,
            r.p99_beside_ms,
        ) = (l.requests, l.failed, l.p50_ms, l.p99_ms);
    }
    match bulk {
        Some(b) => match b.await {
            Ok(Ok(e)) => {
                r.bulk_mbit = e.mbit();
                r.bulk_bytes = e.bytes;
                r.bulk_secs = e.secs;
                r.bulk_served_by = e.served_by;
                r.bulk_error = e.error;
            }
            Ok(Err(e)) => r.bulk_error = Some(format!("{e:#}")),
            Err(e) => r.bulk_error = Some(e.to_string()),
        },
        None => r.bulk_error = Some("east has no echox listener".into()),
    }
    before.fill(wan, ends, &mut r).await;
    alone.extend(beside);
    (r, alone)
}

impl Echoed {
    pub fn mbit(&self) -> f64 {
        self.bytes as f64 * 8.0 / self.secs.max(1e-9) / 1e6
    }
}

pub(super) struct Echoed {
    pub bytes: u64,
    pub secs: f64,
    pub served_by: String,
    pub error: Option<String>,
}

/// Whose echo app a bulk stream must reach (its banner's start).
const EXPECT: &str = "west/";

/// One stream through `addr` (a sidecar's listener for the echo app):
/// writes and reads the echo until `stop`, then drops the stream (what
/// the proxies still buffer would take long to drain on a slow path and
/// is not goodput). `bytes` is what came back between the first echoed
/// byte and `stop`.
pub(super) async fn bulk_echo(
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    started: Arc<tokio::sync::Notify>,
) -> anyhow::Result<Echoed> {
    bulk_echo_marked(addr, stop, started, Arc::default()).await
}

/// [`bulk_echo`], also pushing the running byte count to `marks` at the
/// first echoed byte and every second after it.
async fn bulk_echo_marked(
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    started: Arc<tokio::sync::Notify>,
    marks: Arc<std::sync::Mutex<Vec<u64>>>,
) -> anyhow::Result<Echoed> {
    // The stream must cross the WAN to west: a stream the sidecar sent
    // elsewhere (west ejected for a moment, say) is not this path's
    // goodput. Bounded: five tries, a second apart.
    let mut tries = 0;
    let (mut rd, mut wr, banner) = loop {
        tries += 1;
        let c = tokio::time::timeout(
            Duration::from_secs(10),
            tokio::net::TcpStream::connect(addr),
        )
        .await??;
        let (rd, wr) = c.into_split();
        let mut rd = BufReader::new(rd);
        let mut banner = String::new();
        tokio::time::timeout(Duration::from_secs(10), rd.read_line(&mut banner)).await??;
        if banner.starts_with(EXPECT) {
            break (rd, wr, banner);
        }
        anyhow::ensure!(
            tries < 5,
            "the bulk stream was served by {:?}, not {EXPECT}, {tries} times",
            banner.trim()
        );
        tokio::time::sleep(Duration::from_secs(1)).await;
    };
    started.notify_one();
    let writer = tokio::spawn(async move {
        let chunk = vec![0x42u8; 64 * 1024];
        while wr.write_all(&chunk).await.is_ok() {}
    });
    let mut buf = vec![0u8; 256 * 1024];
    let mut bytes = 0u64;
    let mut first: Option<Instant> = None;
    let mut error = None;
    while !stop.load(Ordering::Relaxed) {
        match tokio::time::timeout(Duration::from_millis(100), rd.read(&mut buf)).await {
            Ok(Ok(0)) => {
                error = Some("the stream ended early".into());
                break;
            }
            Ok(Ok(n)) => {
                if first.is_none() {
                    first = Some(Instant::now());
                } else {
                    bytes += n as u64;
                }
            }
            Ok(Err(e)) => {
                error = Some(e.to_string());
                break;
            }
            Err(_) => {}
        }
        if let (Some(f), Ok(mut m)) = (first, marks.lock()) {
            // A mark at the first echoed byte and at every second after.
            while (m.len() as f64) <= f.elapsed().as_secs_f64() {
                m.push(bytes);
            }
        }
    }
    writer.abort();
    Ok(Echoed {
        bytes,
        secs: first.map_or(0.0, |f| f.elapsed().as_secs_f64()),
        served_by: banner.trim().to_owned(),
        error,
    })
}

/// One raw quinn stream east → west for `secs` (`probe quic-send` and
/// `quic-sink` in the two namespaces): what QUIC itself moves on the path.
pub(super) async fn raw_quinn(
    wan: &Wan,
    ends: &Ends,
    secs: Duration,
    cc: Option<&str>,
) -> anyhow::Result<WanRun> {
    use crate::selftest::Probe;
    let at = SocketAddr::new(ends.west.2, 29_003);
    let ca = ends.ca_dir.display().to_string();
    let before = Before::take(wan, ends).await;
    let mut sink = Probe::start(
        &ends.exe,
        &ends.west.1,
        &[
            "quic-sink".into(),
            "--listen".into(),
            at.to_string(),
            "--ca-dir".into(),
            ca.clone(),
            "--secs".into(),
            secs.as_secs_f64().to_string(),
        ]
        .into_iter()
        .chain(congestion_args(cc))
        .collect::<Vec<String>>(),
    )?;
    sink.line(Duration::from_secs(5)).await?;
    Probe::start(
        &ends.exe,
        &ends.east.1,
        &[
            "quic-send".into(),
            "--to".into(),
            at.to_string(),
            "--ca-dir".into(),
            ca,
            "--secs".into(),
            (secs.as_secs_f64() + 30.0).to_string(),
        ]
        .into_iter()
        .chain(congestion_args(cc))
        .collect::<Vec<String>>(),
    )?
    .finish(secs + Duration::from_secs(40))
    .await?;
    let got: crate::probe::SinkReport =
        serde_json::from_str(&sink.finish(Duration::from_secs(10)).await?)?;
    let mut r = WanRun {
        transport: "raw".into(),
        congestion: cc.unwrap_or("default").into(),
        bulk_bytes: got.bytes,
        bulk_secs: got.secs,
        bulk_mbit: got.mbit(),
        bulk_served_by: "quic-sink".into(),
        ..WanRun::default()
    };
    before.fill(wan, ends, &mut r).await;
    Ok(r)
}

fn congestion_args(cc: Option<&str>) -> Vec<String> {
    cc.map(|c| vec!["--congestion".to_owned(), c.to_owned()])
        .unwrap_or_default()
}

/// How long the path-event case's blackout lasts: long enough for QUIC
/// to declare persistent congestion (3 PTOs, ~200 ms at 30 ms), short
/// enough that the gateways keep the connection (they declare a peer
/// dead after 3 missed keep-alives, 600 ms by default).
const BLIP: Duration = Duration::from_millis(400);

/// The path-event case of one transport: what users feel on a gateway
/// pair whose one connection lives for days.
#[derive(Debug, Clone, Serialize, Default)]
pub struct PathEvent {
    pub transport: String,
    pub congestion: String,
    /// Per 1 s window: the first bulk stream on a fresh connection, the
    /// next one right after it, and the first after the event.
    pub fresh_mbit: Vec<f64>,
    pub warm_mbit: Vec<f64>,
    pub after_mbit: Vec<f64>,
    /// The same three with one-way bulk streams (`sinkx.demo`: east →
    /// west's sink app), on a second fresh connection: the goodput of
    /// each whole stream, drained. An echo couples the two directions'
    /// congestion controllers (each sends what the other delivered),
    /// which a bandwidth-probing controller may not get out of.
    pub oneway_fresh_mbit: f64,
    pub oneway_warm_mbit: f64,
    pub oneway_after_mbit: f64,
    /// East's gateway's path metrics for west just before and just after
    /// the bulk stream after the event (QUIC only).
    pub before_bulk: BTreeMap<String, f64>,
    pub after_bulk: BTreeMap<String, f64>,
}

fn mean(v: &[f64]) -> f64 {
    v.iter().sum::<f64>() / v.len().max(1) as f64
}

impl PathEvent {
    fn header() -> String {
        format!(
            "  {:<17} {:>23} {:>23}  {}",
            "transport",
            "echo fresh/warm/after",
            "one-way fresh/warm/after",
            "echo after event, per second"
        )
    }

    fn row(&self) -> String {
        format!(
            "  {:<17} {:>23} {:>23}  {:?}",
            format!("{} {}", self.transport, self.congestion),
            format!(
                "{:.1} / {:.1} / {:.1}",
                mean(&self.fresh_mbit),
                mean(&self.warm_mbit),
                mean(&self.after_mbit)
            ),
            format!(
                "{:.1} / {:.1} / {:.1}",
                self.oneway_fresh_mbit, self.oneway_warm_mbit, self.oneway_after_mbit
            ),
            self.after_mbit
        )
    }
}

/// `from`'s gateway's `fedmesh_gateway_peer_*` samples for `peer`, by
/// name without the prefix.
async fn peer_path(rig: &Rig, from: &str, peer: &str) -> BTreeMap<String, f64> {
    let mut out = BTreeMap::new();
    let Some(c) = rig.cluster(from) else {
        return out;
    };
    let Some((200, body)) = crate::rig::admin_get(c.gateway_admin, "/metrics").await else {
        return out;
    };
    let label = format!("peer=\"{peer}\"");
    for line in body.lines() {
        let Some(rest) = line.strip_prefix("fedmesh_gateway_peer_") else {
            continue;
        };
        let Some((name, tail)) = rest.split_once('{') else {
            continue;
        };
        let Some((labels, value)) = tail.split_once("} ") else {
            continue;
        };
        if !labels.split(',').any(|l| l == label) {
            continue;
        }
        let key = match labels.split(',').find(|l| l.starts_with("controller=")) {
            Some(c) => format!("{name}{{{c}}}"),
            None => name.to_owned(),
        };
        if let Ok(v) = value.trim().parse::<f64>() {
            out.insert(key, v);
        }
    }
    out
}

/// A fresh connection of `transport` on a clean 30 ms path: a bulk
/// stream, another right after, then the connection idles, the WAN drops
/// everything for [`BLIP`], 1 s of small requests follow, and a last bulk
/// stream shows how the connection came back.
async fn path_event(
    rig: &Rig,
    wan: &Wan,
    p: &Params,
    transport: &str,
    cc: &str,
    tl: &mut Timeline,
) -> anyhow::Result<PathEvent> {
    let clean = Impairment::path(RTT, 0.0);
    wan.impair_both("east", "west", clean)?;
    let congestion = use_transport(rig, wan, transport, cc, tl).await?;
    let windows = if p.quick { 3 } else { 10 };
    let east = rig
        .cluster("east")
        .ok_or_else(|| anyhow::anyhow!("no east"))?;
    let fresh = series(east.echox_out, windows).await?;
    let warm = series(east.echox_out, windows).await?;
    blip(rig, wan, p, transport).await?;
    let before_bulk = peer_path(rig, "east", "west").await;
    let after = series(east.echox_out, windows).await?;
    let after_bulk = peer_path(rig, "east", "west").await;

    // One way, on a fresh connection of its own.
    use_transport(rig, wan, transport, cc, tl).await?;
    let secs = Duration::from_secs(windows as u64);
    let oneway_fresh = one_way(rig, secs).await?;
    let oneway_warm = one_way(rig, secs).await?;
    blip(rig, wan, p, transport).await?;
    let oneway_after = one_way(rig, secs).await?;
    wan.impair_both("east", "west", Impairment::default())?;
    let e = PathEvent {
        transport: transport.to_owned(),
        congestion,
        fresh_mbit: fresh,
        warm_mbit: warm,
        after_mbit: after,
        oneway_fresh_mbit: oneway_fresh,
        oneway_warm_mbit: oneway_warm,
        oneway_after_mbit: oneway_after,
        before_bulk,
        after_bulk,
    };
    tl.note(format!(
        "path event {} {}: echoed bulk Mbit/s fresh {:?}, warm {:?}, after a {} ms blackout {:?}; one way {:.1} / {:.1} / {:.1}; east's path to west before the echoed bulk after the event {:?}, after it {:?}",
        e.transport,
        e.congestion,
        e.fresh_mbit,
        e.warm_mbit,
        BLIP.as_millis(),
        e.after_mbit,
        e.oneway_fresh_mbit,
        e.oneway_warm_mbit,
        e.oneway_after_mbit,
        e.before_bulk,
        e.after_bulk
    ));
    Ok(e)
}

/// The path event: the connection idles 2 s, the WAN drops everything
/// for [`BLIP`], then 1 s of small requests; the connection must have
/// survived it.
async fn blip(rig: &Rig, wan: &Wan, p: &Params, transport: &str) -> anyhow::Result<()> {
    tokio::time::sleep(Duration::from_secs(2)).await;
    blackout(wan, BLIP).await?;
    let small = start_load(rig, p, Duration::from_secs(1), &["east"], false);
    tokio::time::sleep(Duration::from_secs(1)).await;
    finish_load(small).await;
    let now = super::gateway_peer(rig, "east", "west")
        .await
        .map(|(t, _)| t);
    anyhow::ensure!(
        now.as_deref() == Some(transport),
        "east is on {now:?} to west after the blackout, not {transport}: the case needs the connection to survive it"
    );
    Ok(())
}

/// One stream through `addr` (a sidecar's listener for a sink app):
/// writes for `secs`, closes its side, and waits (bounded) for the sink's
/// count of what it read. Goodput of the whole stream, drained.
async fn one_way(rig: &Rig, secs: Duration) -> anyhow::Result<f64> {
    let addr = rig
        .cluster("east")
        .map(|c| c.sinkx_out)
        .ok_or_else(|| anyhow::anyhow!("no east"))?;
    let before = sink_connections_to_west(rig).await;
    let t0 = Instant::now();
    let mut c = tokio::time::timeout(
        Duration::from_secs(10),
        tokio::net::TcpStream::connect(addr),
    )
    .await??;
    let chunk = vec![0x42u8; 64 * 1024];
    while t0.elapsed() < secs {
        tokio::time::timeout(Duration::from_secs(10), c.write_all(&chunk)).await??;
    }
    c.shutdown().await?;
    let mut count = [0u8; 8];
    tokio::time::timeout(Duration::from_secs(60), c.read_exact(&mut count)).await??;
    let bytes = u64::from_be_bytes(count);
    let mbit = bytes as f64 * 8.0 / t0.elapsed().as_secs_f64() / 1e6;
    // What crossed the WAN to west is this path's goodput; a stream the
    // sidecar sent elsewhere (west ejected for a moment) is not.
    anyhow::ensure!(
        sink_connections_to_west(rig).await > before,
        "east's web sidecar did not send the one-way stream to west"
    );
    Ok(tenths(mbit))
}

/// The recovery case, on QUIC over a clean 30 ms path: a bulk stream's
/// goodput per second, then the peer connection idles, the WAN drops
/// everything for a moment (long enough for the gateways to declare each
/// other dead), and a new bulk stream's goodput per second once east is
/// back on QUIC: a slow climb shows in the series.
#[derive(Debug, Clone, Serialize)]
pub struct Recovery {
    pub blackout_s: f64,
    pub back_on_quic_after_s: f64,
    /// How east reached west from the end of the blackout until QUIC, as
    /// its gateway's `/status` said (each change once).
    pub transports_seen: Vec<String>,
    pub before_mbit: Vec<f64>,
    pub after_mbit: Vec<f64>,
}

async fn recovery(rig: &Rig, wan: &Wan, p: &Params, tl: &mut Timeline) -> anyhow::Result<Recovery> {
    wan.impair_both("east", "west", Impairment::path(RTT, 0.0))?;
    use_transport(rig, wan, "quic", "cubic", tl).await?;
    let windows = if p.quick { 5 } else { 10 };
    let addr = rig
        .cluster("east")
        .map(|c| c.echox_out)
        .ok_or_else(|| anyhow::anyhow!("no east"))?;
    let before = series(addr, windows).await?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let dark = Duration::from_secs(2);
    tl.note(format!("recovery: the WAN drops everything for {dark:?}"));
    blackout(wan, dark).await?;
    let t0 = Instant::now();
    let mut seen: Vec<String> = Vec::new();
    // Bounded: 30 s of looks, 10 a second.
    let back = loop {
        let now = super::gateway_peer(rig, "east", "west")
            .await
            .map_or_else(|| "unknown".to_owned(), |(t, _)| t);
        if seen.last() != Some(&now) {
            seen.push(now.clone());
        }
        if now == "quic" {
            break t0.elapsed();
        }
        anyhow::ensure!(
            t0.elapsed() < Duration::from_secs(30),
            "east not back on QUIC within 30 s (seen: {seen:?})"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let after = series(addr, windows).await?;
    wan.impair_both("east", "west", Impairment::default())?;
    let r = Recovery {
        blackout_s: dark.as_secs_f64(),
        back_on_quic_after_s: back.as_secs_f64(),
        transports_seen: seen,
        before_mbit: before,
        after_mbit: after,
    };
    tl.note(format!(
        "recovery: QUIC back after {:.1} s (east's gateway on {}); bulk Mbit/s per second before {:?}, after {:?}",
        r.back_on_quic_after_s,
        r.transports_seen.join(" → "),
        r.before_mbit,
        r.after_mbit
    ));
    Ok(r)
}

/// A bulk stream's echoed goodput in each of `windows` one-second
/// windows from its first echoed byte.
async fn series(addr: SocketAddr, windows: usize) -> anyhow::Result<Vec<f64>> {
    let stop = Arc::new(AtomicBool::new(false));
    let started = Arc::new(tokio::sync::Notify::new());
    let marks = Arc::new(std::sync::Mutex::new(Vec::new()));
    let b = tokio::spawn(bulk_echo_marked(addr, stop.clone(), started, marks.clone()));
    let t0 = Instant::now();
    // Bounded: the windows, plus time for the stream to open.
    while marks.lock().map(|m| m.len()).unwrap_or(0) <= windows
        && t0.elapsed() < Duration::from_secs(30 + windows as u64)
    {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    stop.store(true, Ordering::Relaxed);
    let e = b.await??;
    if let Some(err) = e.error {
        anyhow::bail!("bulk stream: {err}");
    }
    let m = marks.lock().map(|m| m.clone()).unwrap_or_default();
    Ok(m.windows(2)
        .take(windows)
        .map(|w| tenths((w[1] - w[0]) as f64 * 8.0 / 1e6))
        .collect())
}

/// Rounded to 0.1, for reports.
fn tenths(x: f64) -> f64 {
    (x * 10.0).round() / 10.0
}

/// Fault cases on a fresh QUIC connection made on a clean 30 ms path:
/// (name, loss east → west %, loss west → east %, seconds, `--quick`
/// seconds). A peer that "stops acknowledging" still receives everything
/// but nothing of its comes back.
const FAULTS: [(&str, f64, f64, u64, u64); 3] = [
    ("3% loss", 3.0, 3.0, 60, 10),
    ("30% loss", 30.0, 30.0, 20, 6),
    ("west stops acknowledging", 0.0, 100.0, 10, 5),
];

/// How much a gateway's resident memory may grow during a fault case:
/// a connection may hold its flow-control windows (32 MB received, 32 MB
/// to send) and the splices their buffers, far below this.
const RSS_BOUND_MIB: f64 = 256.0;

/// One fault case: a bulk stream echoed through it, the gateways'
/// resident memory each second, how east reached west meanwhile, and how
/// long after the fault QUIC was back.
#[derive(Debug, Clone, Serialize)]
pub struct Fault {
    pub case: String,
    pub secs: f64,
    pub echoed_mbit: f64,
    pub stream_error: Option<String>,
    /// East's gateway's `/status` for west, each change once.
    pub transports_seen: Vec<String>,
    /// East, west.
    pub rss_start_mib: [f64; 2],
    pub rss_max_mib: [f64; 2],
    pub quic_back_after_s: Option<f64>,
}

async fn fault(
    rig: &Rig,
    wan: &Wan,
    p: &Params,
    (case, out, back, secs, quick_secs): (&str, f64, f64, u64, u64),
    tl: &mut Timeline,
) -> anyhow::Result<Fault> {
    let clean = Impairment::path(RTT, 0.0);
    wan.impair_both("east", "west", clean)?;
    use_transport(rig, wan, "quic", "default", tl).await?;
    let addr = rig
        .cluster("east")
        .map(|c| c.echox_out)
        .ok_or_else(|| anyhow::anyhow!("no east"))?;
    let names = ["east-gateway", "west-gateway"];
    // A gateway whose memory cannot be read fails the case rather than
    // passing the bound with 0.
    let rss = |name: &str| {
        rig.rss_kib(name)
            .map(|k| k as f64 / 1024.0)
            .ok_or_else(|| anyhow::anyhow!("no resident set for {name}"))
    };
    let start = [rss(names[0])?, rss(names[1])?];
    let mut max = start;
    let stop = Arc::new(AtomicBool::new(false));
    let started = Arc::new(tokio::sync::Notify::new());
    let bulk = tokio::spawn(bulk_echo(addr, stop.clone(), started.clone()));
    tokio::time::timeout(Duration::from_secs(10), started.notified()).await?;
    wan.impair(
        "east",
        "west",
        Impairment {
            loss_percent: out,
            ..clean
        },
    )?;
    wan.impair(
        "west",
        "east",
        Impairment {
            loss_percent: back,
            ..clean
        },
    )?;
    tl.note(format!(
        "fault {case}: {out}% loss east → west, {back}% back"
    ));
    let length = Duration::from_secs(if p.quick { quick_secs } else { secs });
    let t0 = Instant::now();
    let mut seen: Vec<String> = Vec::new();
    // Bounded: one look a second for the case's length.
    while t0.elapsed() < length {
        tokio::time::sleep(Duration::from_secs(1)).await;
        for (m, n) in max.iter_mut().zip(names) {
            *m = m.max(rss(n)?);
        }
        let now = super::gateway_peer(rig, "east", "west")
            .await
            .map_or_else(|| "unknown".to_owned(), |(t, _)| t);
        if seen.last() != Some(&now) {
            seen.push(now);
        }
    }
    stop.store(true, Ordering::Relaxed);
    wan.impair_both("east", "west", clean)?;
    let restored = Instant::now();
    let echoed = match tokio::time::timeout(Duration::from_secs(15), bulk).await {
        Ok(Ok(r)) => r,
        Ok(Err(e)) => Err(anyhow::anyhow!("bulk task: {e}")),
        Err(_) => Err(anyhow::anyhow!("the bulk stream did not stop within 15 s")),
    };
    let back_after = until_transport(rig, "east", "west", "quic", Duration::from_secs(30))
        .await
        .map(|_| restored.elapsed());
    wan.impair_both("east", "west", Impairment::default())?;
    let (mbit, error) = match echoed {
        Ok(e) => (
            tenths(e.bytes as f64 * 8.0 / e.secs.max(0.001) / 1e6),
            e.error,
        ),
        Err(e) => (0.0, Some(format!("{e:#}"))),
    };
    let f = Fault {
        case: case.to_owned(),
        secs: length.as_secs_f64(),
        echoed_mbit: mbit,
        stream_error: error,
        transports_seen: seen,
        rss_start_mib: start,
        rss_max_mib: max,
        quic_back_after_s: back_after.map(|d| d.as_secs_f64()),
    };
    tl.note(format!(
        "fault {}: {:.0} s, echoed {:.2} Mbit/s{}, east's gateway on {}; RSS east {:.0} → max {:.0} MiB, west {:.0} → {:.0} MiB; QUIC {}",
        f.case,
        f.secs,
        f.echoed_mbit,
        f.stream_error.as_deref().map(|e| format!(" (stream: {e})")).unwrap_or_default(),
        f.transports_seen.join(" → "),
        f.rss_start_mib[0],
        f.rss_max_mib[0],
        f.rss_start_mib[1],
        f.rss_max_mib[1],
        f.quic_back_after_s.map_or("not back within 30 s".to_owned(), |s| format!("back {s:.1} s after")),
    ));
    Ok(f)
}

/// The WAN between east and west drops everything for `dark`, then is a
/// clean 30 ms path again.
async fn blackout(wan: &Wan, dark: Duration) -> anyhow::Result<()> {
    let clean = Impairment::path(RTT, 0.0);
    wan.impair_both(
        "east",
        "west",
        Impairment {
            loss_percent: 100.0,
            ..clean
        },
    )?;
    tokio::time::sleep(dark).await;
    wan.impair_both("east", "west", clean)
}

/// Connections east's `web` sidecar has sent to `sinkx.demo` in west.
async fn sink_connections_to_west(rig: &Rig) -> u64 {
    let Some(c) = rig.cluster("east") else {
        return 0;
    };
    let Some((200, body)) = crate::rig::admin_get(c.web_admin, "/metrics").await else {
        return 0;
    };
    body.lines()
        .filter(|l| {
            l.starts_with("fedmesh_sidecar_outbound_connections_total{")
                && l.contains("service=\"sinkx.demo\"")
                && l.contains("cluster=\"west\"")
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum::<f64>() as u64
}
