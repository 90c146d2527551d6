//! The WAN emulator's self-test, run first in every WAN scenario: is the
//! path what it was set to be? UDP datagrams measure loss each way and
//! the round-trip time; one TCP connection's goodput is compared with
//! what the Mathis et al. model predicts for that loss and RTT. The ends
//! are `fedmesh-e2e probe` processes inside the two namespaces, so the
//! traffic crosses the WAN exactly as the gateways' does.

use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use anyhow::{bail, Context};
use serde::Serialize;
use tokio::io::{AsyncBufReadExt, BufReader};

use crate::probe::{PingReport, SinkReport};
use crate::wan::{DirStats, Impairment, Wan};

/// TCP payload per full-size segment on the WAN: MTU 1500 less IPv4 and
/// TCP headers and the timestamp option.
pub const MSS: f64 = 1448.0;
/// Probe ports: a fresh namespace has them free (the rig's start at 20001).
const PING_PORT: u16 = 29_001;
const TCP_PORT: u16 = 29_002;

/// Goodput the Mathis model gives one Reno-like TCP flow: MSS/RTT ×
/// 1.22/√p, in Mbit/s.
pub fn mathis_mbit(rtt: Duration, loss_percent: f64) -> f64 {
    MSS * 8.0 / rtt.as_secs_f64() * 1.22 / (loss_percent / 100.0).sqrt() / 1e6
}

#[derive(Debug, Serialize, Clone)]
pub struct SelfTest {
    pub set: Impairment,
    pub rtt_ms: f64,
    pub ping: PingReport,
    pub loss_out_percent: f64,
    pub loss_back_percent: f64,
    /// What the emulator itself counted during the UDP probe.
    pub wan_out: DirStats,
    pub wan_back: DirStats,
    pub tcp_congestion: String,
    pub tcp_secs: f64,
    pub tcp_mbit: f64,
    pub mathis_mbit: f64,
    pub mathis_ratio: f64,
    /// (what, passed, detail)
    pub checks: Vec<(String, bool, String)>,
}

impl SelfTest {
    pub fn passed(&self) -> bool {
        self.checks.iter().all(|c| c.1)
    }

    pub fn summary(&self) -> String {
        format!(
            "WAN self-test ({}, {}): loss {:.2}% out / {:.2}% back, RTT p50 {:.2} ms (p10 {:.2}, p90 {:.2}); one TCP {} flow {:.2} Mbit/s = {:.2}x Mathis ({:.2})",
            self.set.describe(),
            if self.passed() { "passed" } else { "FAILED" },
            self.loss_out_percent,
            self.loss_back_percent,
            self.ping.rtt_p50_ms,
            self.ping.rtt_p10_ms,
            self.ping.rtt_p90_ms,
            self.tcp_congestion,
            self.tcp_mbit,
            self.mathis_ratio,
            self.mathis_mbit
        )
    }
}

/// A probe process in a namespace, read line by line.
pub(crate) struct Probe {
    child: tokio::process::Child,
    out: tokio::io::Lines<BufReader<tokio::process::ChildStdout>>,
}

impl Probe {
    pub(crate) fn start(exe: &Path, ns: &str, args: &[String]) -> anyhow::Result<Probe> {
        let mut child = tokio::process::Command::new("ip")
            .args(["netns", "exec", ns])
            .arg(exe)
            .arg("probe")
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("starting probe {args:?} in {ns}"))?;
        let out = BufReader::new(child.stdout.take().context("probe stdout")?).lines();
        Ok(Probe { child, out })
    }

    pub(crate) async fn line(&mut self, limit: Duration) -> anyhow::Result<String> {
        match tokio::time::timeout(limit, self.out.next_line()).await {
            Ok(Ok(Some(l))) => Ok(l),
            Ok(Ok(None)) => bail!("the probe ended without a report"),
            Ok(Err(e)) => Err(e.into()),
            Err(_) => bail!("no report from the probe within {limit:?}"),
        }
    }

    pub(crate) async fn finish(mut self, limit: Duration) -> anyhow::Result<String> {
        let l = self.line(limit).await?;
        let _ = tokio::time::timeout(Duration::from_secs(5), self.child.wait()).await;
        Ok(l)
    }
}

/// Runs the self-test between clusters `a` and `b` (namespaces and
/// addresses given) on an attached WAN with 1 % loss each way and a
/// 30 ms round trip, then leaves the WAN clean. `tcp_secs` is how long
/// the TCP flow runs.
pub async fn run(
    wan: &Wan,
    exe: &Path,
    a: (&str, &str, IpAddr),
    b: (&str, &str, IpAddr),
    tcp_secs: u64,
) -> anyhow::Result<SelfTest> {
    let rtt = Duration::from_millis(30);
    let set = Impairment::path(rtt, 1.0);
    wan.impair_both(a.0, b.0, set)?;
    let r = measure(wan, exe, a, b, set, rtt, tcp_secs).await;
    wan.impair_both(a.0, b.0, Impairment::default())?;
    r
}

async fn measure(
    wan: &Wan,
    exe: &Path,
    a: (&str, &str, IpAddr),
    b: (&str, &str, IpAddr),
    set: Impairment,
    rtt: Duration,
    tcp_secs: u64,
) -> anyhow::Result<SelfTest> {
    // UDP: 10,000 datagrams at 5,000/s; at 1 % loss the count's standard
    // error is 0.1 %, so ±20 % of the set loss is two of them.
    let (count, rate) = (10_000u64, 5_000u64);
    let echo_at = SocketAddr::new(b.2, PING_PORT);
    let echo_secs = count / rate + 10;
    let mut echo = Probe::start(
        exe,
        b.1,
        &[
            "udp-echo".into(),
            "--listen".into(),
            echo_at.to_string(),
            "--secs".into(),
            echo_secs.to_string(),
        ],
    )?;
    echo.line(Duration::from_secs(5))
        .await
        .context("the UDP echo did not start")?;
    let (out0, back0) = (wan.stats(a.0, b.0)?, wan.stats(b.0, a.0)?);
    let ping = Probe::start(
        exe,
        a.1,
        &[
            "udp-ping".into(),
            "--to".into(),
            echo_at.to_string(),
            "--count".into(),
            count.to_string(),
            "--rate".into(),
            rate.to_string(),
        ],
    )?
    .finish(Duration::from_secs(count / rate + 10))
    .await?;
    drop(echo);
    let ping: PingReport = serde_json::from_str(&ping).context("the ping's report")?;
    let (wan_out, wan_back) = (
        wan.stats(a.0, b.0)?.since(&out0),
        wan.stats(b.0, a.0)?.since(&back0),
    );

    // TCP: one flow, Cubic (Reno-like at this BDP), for `tcp_secs`.
    let sink_at = SocketAddr::new(b.2, TCP_PORT);
    let mut sink = Probe::start(
        exe,
        b.1,
        &[
            "tcp-sink".into(),
            "--listen".into(),
            sink_at.to_string(),
            "--secs".into(),
            (tcp_secs + 20).to_string(),
        ],
    )?;
    sink.line(Duration::from_secs(5))
        .await
        .context("the TCP sink did not start")?;
    let congestion = "cubic";
    let send = Probe::start(
        exe,
        a.1,
        &[
            "tcp-send".into(),
            "--to".into(),
            sink_at.to_string(),
            "--secs".into(),
            tcp_secs.to_string(),
            "--congestion".into(),
            congestion.into(),
        ],
    )?;
    send.finish(Duration::from_secs(tcp_secs + 15)).await?;
    let sink: SinkReport = serde_json::from_str(&sink.finish(Duration::from_secs(20)).await?)
        .context("the sink's report")?;

    let mathis = mathis_mbit(rtt, set.loss_percent);
    let mbit = sink.mbit();
    let (lo, lb) = (ping.loss_out_percent(), ping.loss_back_percent());
    // Within 4 standard deviations of a Bernoulli count over `n` packets
    // (at 1 % and 10,000 packets: ±0.4 points), at least ±20 %: a
    // tighter bound failed about one run in ten by chance alone (2 σ).
    let within = |got: f64, want: f64, n: u64| {
        let p = want / 100.0;
        let sigma = 100.0 * (p * (1.0 - p) / n.max(1) as f64).sqrt();
        (got - want).abs() <= (want * 0.2).max(4.0 * sigma)
    };
    let rtt_ms = rtt.as_secs_f64() * 1e3;
    let checks = vec![
        (
            "observed loss out within ±4σ (≥ ±20%) of the set loss".to_owned(),
            within(lo, set.loss_percent, ping.sent),
            format!("{lo:.2}% of {} (set {}%)", ping.sent, set.loss_percent),
        ),
        (
            "observed loss back within ±4σ (≥ ±20%) of the set loss".to_owned(),
            within(lb, set.loss_percent, ping.peer_received),
            format!(
                "{lb:.2}% of {} (set {}%)",
                ping.peer_received, set.loss_percent
            ),
        ),
        (
            "RTT p50 within ±2 ms of the set RTT".to_owned(),
            (ping.rtt_p50_ms - rtt_ms).abs() <= 2.0,
            format!("{:.2} ms (set {rtt_ms:.0} ms)", ping.rtt_p50_ms),
        ),
        (
            "one TCP flow's goodput within 0.7-1.4x the Mathis estimate".to_owned(),
            (0.7..=1.4).contains(&(mbit / mathis)),
            format!(
                "{mbit:.2} Mbit/s over {:.1} s, Mathis {mathis:.2} Mbit/s: {:.2}x",
                sink.secs,
                mbit / mathis
            ),
        ),
    ];
    Ok(SelfTest {
        set,
        rtt_ms,
        loss_out_percent: lo,
        loss_back_percent: lb,
        ping,
        wan_out,
        wan_back,
        tcp_congestion: congestion.into(),
        tcp_secs: sink.secs,
        tcp_mbit: mbit,
        mathis_mbit: mathis,
        mathis_ratio: mbit / mathis,
        checks,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mathis_at_30_ms_and_1_percent() {
        // 1448 B × 8 / 30 ms × 1.22 / 0.1 = 4.71 Mbit/s.
        let m = mathis_mbit(Duration::from_millis(30), 1.0);
        assert!((m - 4.711).abs() < 0.01, "{m}");
    }
}
