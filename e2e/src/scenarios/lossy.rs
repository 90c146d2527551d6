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
            format!("{:.1} / {:.1}", self.p50_alone_ms, self.p99_alone_ms),
            format!("{:.1} / {:.1}", self.p50_beside_ms, self.p99_beside_ms),
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

pub(super) async fn lossy_wan(rig: &mut Rig, p: &Params, o: &mut Outcome, tl: &mut Timeline) {
    let Ok(wan) = &rig.wan else {
        let why = rig.wan.as_ref().err().cloned().unwrap_or_default();
        tl.note(format!("lossy-wan skipped: {why}"));
        o.check(
            "lossy-wan skipped (reported)",
            true,
            format!("no packet-level WAN: {why}"),
        );
        return;
    };
    let r = run(rig, wan, p, o, tl).await;
    // Whatever happened: the clusters meet on the bridge again, uncut.
    wan.detach();
    wan.impair_both("east", "west", Impairment::default()).ok();
    cut_path(rig, "east", "west", Path::Both, false, o);
    if let Err(e) = r {
        o.check("lossy-wan ran to the end", false, format!("{e:#}"));
    }
}

async fn run(
    rig: &Rig,
    wan: &Wan,
    p: &Params,
    o: &mut Outcome,
    tl: &mut Timeline,
) -> anyhow::Result<()> {
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
    let st = selftest::run(
        wan,
        &exe,
        (&east.0, &east.1, east.2),
        (&west.0, &west.1, west.2),
        if p.quick { 8 } else { 20 },
    )
    .await?;
    tl.note(st.summary());
    for (what, ok, detail) in &st.checks {
        o.check(format!("WAN self-test: {what}"), *ok, detail.clone());
    }
    let mut report = serde_json::json!({ "selftest": st.clone(), "runs": [] });
    if !st.passed() {
        o.wan = Some(report);
        return Ok(());
    }

    let phase = p.len(20, 8);
    let losses: &[f64] = if p.quick { &[1.0] } else { &[0.0, 1.0] };
    let mut runs = Vec::new();
    for &loss in losses {
        for (transport, cc) in [("quic", "cubic"), ("tcp", "cubic"), ("tcp", "bbr")] {
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
            let set = Impairment::path(RTT, loss);
            wan.impair_both("east", "west", set)?;
            tl.note(format!(
                "east–west: {}; {transport} {congestion}",
                set.describe()
            ));
            let (mut r, mut loads) = measure(rig, wan, p, phase, (&east.1, &west.1)).await;
            wan.impair_both("east", "west", Impairment::default())?;
            for (l, when) in loads.iter_mut().zip(["alone", "+bulk"]) {
                l.cluster = format!("east {transport}/{cc} {loss}% {when}");
            }
            o.loads.extend(loads);
            r.transport = transport.to_owned();
            r.congestion = congestion;
            r.rtt_ms = RTT.as_secs_f64() * 1e3;
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
        }
    }
    o.table.push(format!(
        "  {} ms RTT; one bulk stream echoed (goodput of the payload), 64 B HTTP requests",
        RTT.as_millis()
    ));
    o.table.push(header());
    o.table.extend(runs.iter().map(WanRun::row));
    report["runs"] = serde_json::to_value(&runs)?;
    o.wan = Some(report);
    Ok(())
}

/// Gets east→west onto `transport`: QUIC with nothing cut, or the TCP
/// fallback with congestion control `cc` (a new fallback connection:
/// both paths are cut until east sees west down, then TCP passes again).
/// Returns the congestion control in use.
async fn use_transport(
    rig: &Rig,
    wan: &Wan,
    transport: &str,
    cc: &str,
    tl: &mut Timeline,
) -> anyhow::Result<String> {
    wan.attach(cc)?;
    let limit = Duration::from_secs(30);
    if transport == "quic" {
        rig.cut("east", "west", true, false)?;
        let waited = until_transport(rig, "east", "west", "quic", limit).await;
        anyhow::ensure!(
            waited.is_some(),
            "east is not on QUIC to west within {limit:?}"
        );
        tl.note("east reaches west over QUIC");
        return Ok("quinn".to_owned());
    }
    rig.cut("east", "west", true, true)?;
    let down = until_transport(rig, "east", "west", "down", Duration::from_secs(15)).await;
    anyhow::ensure!(
        down.is_some(),
        "east still reaches west with both paths cut"
    );
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
    ns: (&str, &str),
) -> (WanRun, Vec<super::LoadSummary>) {
    let mut r = WanRun::default();
    let (out0, back0) = (
        wan.stats("east", "west").unwrap_or_default(),
        wan.stats("west", "east").unwrap_or_default(),
    );
    let rcv0 = (rcvbuf_errors(ns.0).await, rcvbuf_errors(ns.1).await);

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
                r.bulk_bytes = e.bytes;
                r.bulk_secs = e.secs;
                r.bulk_mbit = e.bytes as f64 * 8.0 / e.secs.max(1e-9) / 1e6;
                r.bulk_served_by = e.served_by;
                r.bulk_error = e.error;
            }
            Ok(Err(e)) => r.bulk_error = Some(format!("{e:#}")),
            Err(e) => r.bulk_error = Some(e.to_string()),
        },
        None => r.bulk_error = Some("east has no echox listener".into()),
    }
    r.observed_loss_out_percent =
        loss_percent(&wan.stats("east", "west").unwrap_or_default().since(&out0));
    r.observed_loss_back_percent =
        loss_percent(&wan.stats("west", "east").unwrap_or_default().since(&back0));
    for (who, n, before) in [("east", ns.0, rcv0.0), ("west", ns.1, rcv0.1)] {
        if let (Some(a), Some(b)) = (rcvbuf_errors(n).await, before) {
            r.rcvbuf_errors.insert(who.to_owned(), a.saturating_sub(b));
        }
    }
    alone.extend(beside);
    (r, alone)
}

struct Echoed {
    bytes: u64,
    secs: f64,
    served_by: String,
    error: Option<String>,
}

/// One stream through `addr` (a sidecar's listener for the echo app):
/// writes and reads the echo until `stop`, then drops the stream (what
/// the proxies still buffer would take long to drain on a slow path and
/// is not goodput). `bytes` is what came back between the first echoed
/// byte and `stop`.
async fn bulk_echo(
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    started: Arc<tokio::sync::Notify>,
) -> anyhow::Result<Echoed> {
    let c = tokio::time::timeout(
        Duration::from_secs(10),
        tokio::net::TcpStream::connect(addr),
    )
    .await??;
    let (rd, mut wr) = c.into_split();
    let mut rd = BufReader::new(rd);
    let mut banner = String::new();
    tokio::time::timeout(Duration::from_secs(10), rd.read_line(&mut banner)).await??;
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
    }
    writer.abort();
    Ok(Echoed {
        bytes,
        secs: first.map_or(0.0, |f| f.elapsed().as_secs_f64()),
        served_by: banner.trim().to_owned(),
        error,
    })
}
