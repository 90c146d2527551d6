//! A drill report as one self-contained HTML page (no external scripts,
//! styles or fonts): the figures, and an SVG timeline per 100 ms slice —
//! success rate, latency p50/p99, which cluster served — with the fault
//! window shaded. Pure: a report in, a page out.

use std::collections::BTreeSet;
use std::fmt::Write;

use crate::drill::{render, DrillReport};

/// Escapes text for HTML (a report carries names an operator chose).
fn esc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

const W: f64 = 900.0;
const H: f64 = 160.0;
const LEFT: f64 = 60.0;
/// Colours for clusters, in name order (the failed one is always red).
const PALETTE: [&str; 6] = [
    "#2b7bb9", "#3aa76d", "#8e6bbf", "#e0a100", "#6b7b8c", "#1aa3a3",
];

struct Chart<'a> {
    rep: &'a DrillReport,
    /// Milliseconds of the whole run.
    span: f64,
}

impl Chart<'_> {
    fn x(&self, ms: f64) -> f64 {
        LEFT + (W - LEFT - 10.0) * (ms / self.span).clamp(0.0, 1.0)
    }

    /// The frame: title, the fault window shaded, axis labels.
    fn open(&self, out: &mut String, id: &str, title: &str, max_label: &str) {
        let (b, r) = (
            self.x(self.rep.break_at_ms as f64),
            self.x(self.rep.restore_at_ms as f64),
        );
        let _ = write!(
            out,
            r##"<figure><figcaption>{title}</figcaption><svg id="{id}" viewBox="0 0 {W} {h}" width="{W}" height="{h}" role="img" aria-label="{title}">
<rect class="fault" x="{b:.1}" y="0" width="{wf:.1}" height="{H}" fill="#f4c7c3"><title>fault on ({bm} ms to {rm} ms)</title></rect>
<line x1="{LEFT}" y1="{H}" x2="{W}" y2="{H}" stroke="#444"/><line x1="{LEFT}" y1="0" x2="{LEFT}" y2="{H}" stroke="#444"/>
<text x="{tx}" y="12" font-size="11" text-anchor="end">{max_label}</text><text x="{tx}" y="{H}" font-size="11" text-anchor="end">0</text>
<text x="{LEFT}" y="{ty}" font-size="11">0 s</text><text x="{W}" y="{ty}" font-size="11" text-anchor="end">{secs:.1} s</text>
"##,
            h = H + 16.0,
            wf = (r - b).max(1.0),
            bm = self.rep.break_at_ms,
            rm = self.rep.restore_at_ms,
            tx = LEFT - 4.0,
            ty = H + 14.0,
            secs = self.span / 1000.0,
        );
    }

    fn polyline(&self, out: &mut String, class: &str, colour: &str, points: &[(f64, f64)]) {
        let pts: Vec<String> = points
            .iter()
            .map(|(x, y)| format!("{x:.1},{y:.1}"))
            .collect();
        let _ = write!(
            out,
            r#"<polyline class="{class}" fill="none" stroke="{colour}" stroke-width="1.5" points="{}"/>"#,
            pts.join(" ")
        );
    }
}

/// The page for `rep`.
pub fn html(rep: &DrillReport) -> String {
    let span = (rep.duration_ms.max(1)) as f64;
    let c = Chart { rep, span };
    let slice_ms = rep
        .timeline
        .get(1)
        .map_or(100.0, |s| s.from_ms as f64)
        .max(1.0);
    let mut out = String::new();
    let title = format!(
        "Drill: {} from {} with {} {}",
        rep.service, rep.from, rep.fail, rep.mode
    );
    let _ = write!(
        out,
        r#"<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{t}</title>
<style>body{{font-family:sans-serif;margin:2em;color:#222}}pre{{background:#f6f6f6;padding:1em}}figure{{margin:1.5em 0}}figcaption{{font-weight:bold;margin-bottom:.3em}}.legend span{{margin-right:1.2em}}.halted{{color:#b00;font-weight:bold}}</style>
</head><body><h1>{t}</h1>
"#,
        t = esc(&title)
    );
    let verdict = match &rep.halted {
        Some(h) => format!(
            r#"<p class="halted" id="halted">Halted at {} ms: {} failed {:.0}% of {} requests; the fault was removed at once.</p>"#,
            h.at_ms,
            esc(&h.guard),
            h.error_rate * 100.0,
            h.requests
        ),
        None => String::new(),
    };
    let _ = write!(
        out,
        r#"{verdict}<p id="summary">{ok} of {n} requests succeeded ({failed} failed); first request served elsewhere after {first}; 99% succeeding again after {to99}; {fail} serving again {rec} after the repair.</p>
<pre id="figures">{table}</pre>
"#,
        ok = rep.ok,
        n = rep.requests,
        failed = rep.failed,
        first = rep
            .first_elsewhere_ms
            .map_or("never".into(), |v| format!("{v:.0} ms")),
        to99 = rep
            .to_99_percent_ms
            .map_or("never".into(), |v| format!("{v:.0} ms")),
        fail = esc(&rep.fail),
        rec = rep
            .recovery_ms
            .map_or("never".into(), |v| format!("{v:.0} ms")),
        table = esc(&render(rep)),
    );

    // Success rate per slice.
    c.open(&mut out, "success", "Success rate per 100 ms", "100%");
    let points: Vec<(f64, f64)> = rep
        .timeline
        .iter()
        .filter(|s| s.ok + s.failed > 0)
        .map(|s| {
            let rate = s.ok as f64 / (s.ok + s.failed) as f64;
            (c.x(s.from_ms as f64 + slice_ms / 2.0), H * (1.0 - rate))
        })
        .collect();
    c.polyline(&mut out, "success", "#2b7bb9", &points);
    out.push_str("</svg></figure>\n");

    // Latency p50 and p99 per slice, on one scale.
    let max_us = rep
        .timeline
        .iter()
        .map(|s| s.p99_us)
        .max()
        .unwrap_or(0)
        .max(1) as f64;
    c.open(
        &mut out,
        "latency",
        "Latency p50 and p99 per 100 ms",
        &format!("{:.0} ms", max_us / 1000.0),
    );
    for (class, colour, f) in [
        (
            "p50",
            "#3aa76d",
            (|s: &crate::drill::Slice| s.p50_us) as fn(&_) -> u64,
        ),
        ("p99", "#d9534f", |s| s.p99_us),
    ] {
        let points: Vec<(f64, f64)> = rep
            .timeline
            .iter()
            .filter(|s| s.ok > 0)
            .map(|s| {
                (
                    c.x(s.from_ms as f64 + slice_ms / 2.0),
                    H * (1.0 - f(s) as f64 / max_us),
                )
            })
            .collect();
        c.polyline(&mut out, class, colour, &points);
    }
    out.push_str("</svg></figure>\n<p class=\"legend\"><span style=\"color:#3aa76d\">p50</span><span style=\"color:#d9534f\">p99</span></p>\n");

    // Who served: stacked bars per slice.
    let clusters: BTreeSet<&str> = rep
        .timeline
        .iter()
        .flat_map(|s| s.served_by.keys().map(String::as_str))
        .collect();
    let colour = |name: &str| -> &'static str {
        if name == rep.fail {
            return "#d9534f";
        }
        let i = clusters
            .iter()
            .filter(|c| **c != rep.fail)
            .position(|c| *c == name)
            .unwrap_or(0);
        PALETTE[i % PALETTE.len()]
    };
    let max_n = rep
        .timeline
        .iter()
        .map(|s| s.ok + s.failed)
        .max()
        .unwrap_or(0)
        .max(1) as f64;
    c.open(
        &mut out,
        "served",
        "Requests per 100 ms by the cluster that served them (grey: failed)",
        &format!("{max_n:.0}"),
    );
    let bar = (c.x(slice_ms) - c.x(0.0)).max(1.0) - 0.5;
    for s in &rep.timeline {
        let x = c.x(s.from_ms as f64);
        let mut y = H;
        let parts = s
            .served_by
            .iter()
            .map(|(k, v)| (k.as_str(), *v, colour(k)))
            .chain(std::iter::once(("failed", s.failed, "#bbbbbb")));
        for (name, n, fill) in parts {
            if n == 0 {
                continue;
            }
            let h = H * n as f64 / max_n;
            y -= h;
            let _ = write!(
                out,
                r#"<rect class="served" data-cluster="{}" x="{x:.1}" y="{y:.1}" width="{bar:.1}" height="{h:.1}" fill="{fill}"><title>{} ms: {} {}</title></rect>"#,
                esc(name),
                s.from_ms,
                n,
                esc(name)
            );
        }
    }
    out.push_str("</svg></figure>\n<p class=\"legend\">");
    for name in &clusters {
        let _ = write!(
            out,
            r#"<span style="color:{}">{}</span>"#,
            colour(name),
            esc(name)
        );
    }
    out.push_str("<span style=\"color:#999\">failed</span></p>\n</body></html>\n");
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::drill::{analyze, DrillSpec, FaultMode};
    use crate::load::Sample;
    use std::time::Duration;

    fn report() -> DrillReport {
        let spec = DrillSpec {
            service: "echo.<demo>".into(),
            from: "east".into(),
            fail: "west".into(),
            mode: FaultMode::Blackhole,
            duration: Duration::from_secs(4),
            rate: 10,
            request_bytes: 8,
            timeout: Duration::from_secs(1),
            slo: Duration::from_millis(250),
            http: false,
        };
        let samples: Vec<Sample> = (0..40u64)
            .map(|i| {
                let t = i * 100;
                let (ok, by) = match t {
                    0..1000 => (true, "west/echo-0"),
                    1000..1200 => (false, ""),
                    1200..2400 => (true, "north/echo-1"),
                    _ => (true, "west/echo-1"),
                };
                Sample {
                    start: Duration::from_millis(t),
                    latency: Duration::from_millis(2 + i % 5),
                    ok,
                    served_by: ok.then(|| by.to_owned()),
                    error: (!ok).then(|| "timeout".to_owned()),
                }
            })
            .collect();
        analyze(&spec, &samples, spec.break_at(), spec.restore_at())
    }

    #[test]
    fn the_page_is_self_contained_and_escapes_what_it_quotes() {
        let page = html(&report());
        assert!(page.starts_with("<!doctype html>"));
        for external in ["<script", "src=", "href=", "@import", "url("] {
            assert!(!page.contains(external), "{external}");
        }
        assert!(page.contains("echo.&lt;demo&gt;") && !page.contains("echo.<demo>"));
        assert_eq!(page.matches("<svg").count(), 3);
        assert_eq!(page.matches(r#"class="fault""#).count(), 3);
        // One bar segment per slice and cluster that served in it, plus
        // the failed ones.
        let segments = page.matches(r#"class="served""#).count();
        assert_eq!(segments, 40, "{segments}");
        assert!(
            page.contains(r#"data-cluster="north""#) && page.contains(r#"data-cluster="failed""#)
        );
    }
}
