//! `wan-matrix` (not in CI, not in the default set): bulk goodput per
//! transport over the packet-level WAN for every RTT (1, 30, 100 ms) ×
//! loss (0, 0.1, 1, 3 %) × reordering (0, 0.5 %), each way alike. A table
//! on stdout and an SVG plot: goodput against loss per transport, one
//! panel per RTT (solid: no reordering; dashed: 0.5 %). Every cell gets a
//! fresh peer connection (the pair's one connection would otherwise
//! carry the congestion window a lossy cell left into the next cell).

use std::fmt::Write as _;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;

use super::lossy::{bulk_echo, prepare, raw_quinn, restore, use_transport, wan_or_skip};
use super::{Outcome, Params, Timeline};
use crate::rig::Rig;
use crate::wan::{Impairment, Wan};

pub const RTTS_MS: [u64; 3] = [1, 30, 100];
pub const LOSSES: [f64; 4] = [0.0, 0.1, 1.0, 3.0];
pub const REORDERS: [f64; 2] = [0.0, 0.5];
/// (label, transport, congestion control); `raw` is one raw quinn stream.
const TRANSPORTS: [(&str, &str, &str); 4] = [
    ("QUIC", "quic", "cubic"),
    ("raw quinn", "raw", "cubic"),
    ("TCP Cubic", "tcp", "cubic"),
    ("TCP BBR", "tcp", "bbr"),
];

#[derive(Debug, Clone, Serialize)]
pub struct Cell {
    pub transport: String,
    pub rtt_ms: u64,
    pub loss_percent: f64,
    pub reorder_percent: f64,
    pub mbit: f64,
    pub error: Option<String>,
}

pub(super) async fn wan_matrix(rig: &mut Rig, p: &Params, o: &mut Outcome, tl: &mut Timeline) {
    let Some(wan) = wan_or_skip(rig, o, tl, "wan-matrix") else {
        return;
    };
    let r = run(rig, wan, p, o, tl).await;
    restore(rig, wan, o, "wan-matrix", r);
}

async fn run(
    rig: &Rig,
    wan: &Wan,
    p: &Params,
    o: &mut Outcome,
    tl: &mut Timeline,
) -> anyhow::Result<()> {
    let ends = prepare(rig, wan, p, o, tl).await?;
    if !ends.selftest.passed() {
        return Ok(());
    }
    let secs = p.len(10, 4);
    let echo = rig
        .cluster("east")
        .map(|c| c.echox_out)
        .ok_or_else(|| anyhow::anyhow!("no east"))?;
    let mut cells = Vec::new();
    for (label, transport, cc) in TRANSPORTS {
        wan.attach(cc)?;
        for rtt in RTTS_MS {
            for loss in LOSSES {
                for reorder in REORDERS {
                    let set = Impairment {
                        reorder_percent: reorder,
                        ..Impairment::path(Duration::from_millis(rtt), loss)
                    };
                    wan.impair_both("east", "west", set)?;
                    // Each cell on a fresh peer connection, made on the
                    // cell's path: no congestion state carried over from
                    // the cell before, no route change after the handshake.
                    if transport != "raw" {
                        use_transport(rig, wan, transport, cc, tl).await?;
                    }
                    let (mbit, error) = if transport == "raw" {
                        match raw_quinn(wan, &ends, secs, None).await {
                            Ok(r) => (r.bulk_mbit, r.bulk_error),
                            Err(e) => (0.0, Some(format!("{e:#}"))),
                        }
                    } else {
                        let stop = Arc::new(AtomicBool::new(false));
                        let started = Arc::new(tokio::sync::Notify::new());
                        let b = tokio::spawn(bulk_echo(echo, stop.clone(), started.clone()));
                        let _ =
                            tokio::time::timeout(Duration::from_secs(10), started.notified()).await;
                        tokio::time::sleep(secs).await;
                        stop.store(true, std::sync::atomic::Ordering::Relaxed);
                        match b.await {
                            Ok(Ok(e)) => (e.mbit(), e.error),
                            Ok(Err(e)) => (0.0, Some(format!("{e:#}"))),
                            Err(e) => (0.0, Some(e.to_string())),
                        }
                    };
                    // A cell counts only if the mesh stayed on its transport.
                    let mut error = error;
                    if transport != "raw" {
                        let on = super::gateway_peer(rig, "east", "west")
                            .await
                            .map(|(t, _)| t);
                        if on.as_deref() != Some(transport) {
                            error = Some(format!("east's gateway on {on:?}, not {transport}"));
                        }
                    }
                    wan.impair_both("east", "west", Impairment::default())?;
                    tl.note(format!(
                        "{label}: {rtt} ms, {loss}% loss, {reorder}% reordered: {mbit:.2} Mbit/s{}",
                        error
                            .as_deref()
                            .map(|e| format!(" ({e})"))
                            .unwrap_or_default()
                    ));
                    cells.push(Cell {
                        transport: label.to_owned(),
                        rtt_ms: rtt,
                        loss_percent: loss,
                        reorder_percent: reorder,
                        mbit,
                        error,
                    });
                }
            }
        }
    }
    o.table = table(&cells);
    let svg = plot(&cells);
    let path = p
        .report
        .as_ref()
        .map(|j| j.with_extension("svg"))
        .unwrap_or_else(|| std::path::PathBuf::from("wan-matrix.svg"));
    std::fs::write(&path, svg)?;
    tl.note(format!("plot written to {}", path.display()));
    o.wan = Some(serde_json::json!({ "cells": cells, "svg": path }));
    Ok(())
}

fn table(cells: &[Cell]) -> Vec<String> {
    let mut out = vec![format!(
        "  {:>6} {:>6} {:>8} {:>10} {:>10} {:>10} {:>10}   Mbit/s (QUIC and TCP: one echoed stream through the mesh; raw quinn: one way)",
        "RTT ms", "loss %", "reorder%", "QUIC", "raw quinn", "TCP Cubic", "TCP BBR"
    )];
    for rtt in RTTS_MS {
        for loss in LOSSES {
            for reorder in REORDERS {
                let mut row = format!("  {rtt:>6} {loss:>6} {reorder:>8}");
                for (label, ..) in TRANSPORTS {
                    let v = cells.iter().find(|c| {
                        c.transport == label
                            && c.rtt_ms == rtt
                            && c.loss_percent == loss
                            && c.reorder_percent == reorder
                    });
                    let _ = write!(
                        row,
                        " {:>10}",
                        v.map_or("-".to_owned(), |c| format!("{:.2}", c.mbit))
                    );
                }
                out.push(row);
            }
        }
    }
    out
}

/// Goodput (log scale) against loss (one column per loss level), one
/// panel per RTT, one line per transport; dashed with reordering.
pub fn plot(cells: &[Cell]) -> String {
    let (pw, ph, m) = (320.0, 260.0, 50.0);
    let width = m + RTTS_MS.len() as f64 * (pw + m);
    let height = ph + 2.0 * m + 40.0;
    let colors = ["#1f77b4", "#7f7f7f", "#d62728", "#2ca02c"];
    let (lo, hi) = (0.1f64, 10_000f64);
    let y = |mbit: f64| {
        let v = mbit.clamp(lo, hi);
        m + ph - (v.log10() - lo.log10()) / (hi.log10() - lo.log10()) * ph
    };
    let x = |i: usize| (i as f64 + 0.5) * pw / LOSSES.len() as f64;
    let mut s = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{width}\" height=\"{height}\" font-family=\"sans-serif\" font-size=\"12\">\n<rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n"
    );
    for (k, rtt) in RTTS_MS.iter().enumerate() {
        let ox = m + k as f64 * (pw + m);
        let _ = writeln!(
            s,
            "<g transform=\"translate({ox},0)\"><rect x=\"0\" y=\"{m}\" width=\"{pw}\" height=\"{ph}\" fill=\"none\" stroke=\"#333\"/><text x=\"{}\" y=\"{}\" text-anchor=\"middle\" font-weight=\"bold\">{rtt} ms RTT</text>",
            pw / 2.0,
            m - 10.0
        );
        for decade in [0.1, 1.0, 10.0, 100.0, 1000.0, 10000.0] {
            let yy = y(decade);
            let _ = writeln!(
                s,
                "<line x1=\"0\" x2=\"{pw}\" y1=\"{yy}\" y2=\"{yy}\" stroke=\"#ddd\"/><text x=\"-4\" y=\"{}\" text-anchor=\"end\">{decade}</text>",
                yy + 4.0
            );
        }
        for (i, loss) in LOSSES.iter().enumerate() {
            let _ = writeln!(
                s,
                "<text x=\"{}\" y=\"{}\" text-anchor=\"middle\">{loss}%</text>",
                x(i),
                m + ph + 16.0
            );
        }
        for (t, (label, ..)) in TRANSPORTS.iter().enumerate() {
            for (r, reorder) in REORDERS.iter().enumerate() {
                let pts: Vec<String> = LOSSES
                    .iter()
                    .enumerate()
                    .filter_map(|(i, loss)| {
                        cells
                            .iter()
                            .find(|c| {
                                c.transport == *label
                                    && c.rtt_ms == *rtt
                                    && c.loss_percent == *loss
                                    && c.reorder_percent == *reorder
                                    && c.error.is_none()
                            })
                            .map(|c| format!("{:.1},{:.1}", x(i), y(c.mbit)))
                    })
                    .collect();
                let _ =
                    writeln!(
                    s,
                    "<polyline fill=\"none\" stroke=\"{}\" stroke-width=\"2\"{} points=\"{}\"/>",
                    colors[t],
                    if r == 1 { " stroke-dasharray=\"5,4\"" } else { "" },
                    pts.join(" ")
                );
            }
        }
        s.push_str("</g>\n");
    }
    let ly = height - 20.0;
    for (t, (label, ..)) in TRANSPORTS.iter().enumerate() {
        let lx = m + t as f64 * 150.0;
        let _ = writeln!(
            s,
            "<line x1=\"{lx}\" x2=\"{}\" y1=\"{ly}\" y2=\"{ly}\" stroke=\"{}\" stroke-width=\"2\"/><text x=\"{}\" y=\"{}\">{label}</text>",
            lx + 24.0,
            colors[t],
            lx + 30.0,
            ly + 4.0
        );
    }
    let _ = writeln!(
        s,
        "<text x=\"{}\" y=\"{ly}\" >Mbit/s (log) against loss each way; dashed: 0.5% reordered</text>\n</svg>",
        m + 4.0 * 150.0
    );
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_plot_is_svg_with_a_panel_per_rtt_and_a_line_per_transport_and_reordering() {
        let cells: Vec<Cell> = TRANSPORTS
            .iter()
            .flat_map(|(label, ..)| {
                RTTS_MS.iter().flat_map(move |rtt| {
                    LOSSES.iter().flat_map(move |loss| {
                        REORDERS.iter().map(move |reorder| Cell {
                            transport: (*label).to_owned(),
                            rtt_ms: *rtt,
                            loss_percent: *loss,
                            reorder_percent: *reorder,
                            mbit: 100.0 / (1.0 + loss),
                            error: None,
                        })
                    })
                })
            })
            .collect();
        let svg = plot(&cells);
        assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"));
        assert_eq!(svg.matches("<polyline").count(), 3 * 4 * 2);
        assert_eq!(svg.matches(" ms RTT</text>").count(), 3);
        // Every line has a point per loss level.
        for line in svg.lines().filter(|l| l.starts_with("<polyline")) {
            let pts = line.split("points=\"").nth(1).unwrap_or_default();
            assert_eq!(pts.split_whitespace().count(), LOSSES.len(), "{line}");
        }
        assert_eq!(table(&cells).len(), 1 + 3 * 4 * 2);
    }
}
