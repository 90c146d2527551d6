//! Drill faults: what an operator may break on this gateway, for how long,
//! and for whom. A pure state machine (`on(event, now) -> outcome`) on an
//! injected clock; the admin API feeds it requests and a timer, and the
//! data path reads the [`FaultView`] it publishes.
//!
//! - One drill holds the gateway at a time: a request from another drill
//!   while faults are on is refused, never stacked. The holder may replace
//!   its faults (a drill moving from blackhole to drain) or clear them.
//! - Every fault has a time to live, at most `max_ttl`: it ends by itself
//!   even when the drill that set it died. Renewing means asking again.
//! - Requests are checked whole: one bad fault refuses all of them, so a
//!   drill never runs with half of what it asked for.

use std::collections::BTreeSet;
use std::fmt;
use std::time::{Duration, Instant};

use fedmesh_catalog::ClusterName;
use serde::{Deserialize, Serialize};

/// A drill's name, chosen by the operator: 1 to 64 of `[a-z0-9._-]`, so
/// it is safe in logs and metric labels as it is.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub struct DrillId(String);

impl DrillId {
    pub fn new(s: &str) -> Result<Self, FaultError> {
        let ok = !s.is_empty()
            && s.len() <= 64
            && s.bytes().all(|b| {
                b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'.' | b'_' | b'-')
            });
        if ok {
            Ok(Self(s.to_owned()))
        } else {
            Err(FaultError::BadDrillId(fedmesh_wire::bounded(s)))
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for DrillId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// What breaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FaultKind {
    /// Every packet to and from the peer's gateway is dropped (QUIC and
    /// the TCP fallback): callers see silence, then timeouts.
    Blackhole,
    /// UDP to and from the peer is dropped: QUIC dies, the TCP fallback
    /// carries the streams.
    DropUdp,
    /// Every datagram to the peer leaves this much later.
    Delay { delay: Duration },
    /// This gateway refuses new streams (peers and sidecars fail over)
    /// and lets open ones finish. Not aimed at a peer.
    Drain,
}

impl FaultKind {
    /// As a metric label.
    pub fn label(&self) -> &'static str {
        match self {
            Self::Blackhole => "blackhole",
            Self::DropUdp => "drop_udp",
            Self::Delay { .. } => "delay",
            Self::Drain => "drain",
        }
    }
}

/// One fault as asked for: `{"kind": "delay", "delay": "80ms", "peer":
/// "west", "ttl": "30s"}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "RawFault", into = "RawFault")]
pub struct FaultSpec {
    pub kind: FaultKind,
    /// The peer cluster it is aimed at (not for `drain`).
    pub peer: Option<ClusterName>,
    /// It ends by itself this long after it was set.
    pub ttl: Duration,
}

/// [`FaultSpec`] as JSON spells it (serde cannot refuse unknown fields
/// next to a flattened enum, so the shape is spelled out).
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFault {
    kind: String,
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        with = "humantime_serde"
    )]
    delay: Option<Duration>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    peer: Option<String>,
    #[serde(with = "humantime_serde")]
    ttl: Duration,
}

impl TryFrom<RawFault> for FaultSpec {
    type Error = String;
    fn try_from(r: RawFault) -> Result<Self, String> {
        let kind = match (r.kind.as_str(), r.delay) {
            ("blackhole", None) => FaultKind::Blackhole,
            ("drop-udp", None) => FaultKind::DropUdp,
            ("drain", None) => FaultKind::Drain,
            ("delay", Some(delay)) => FaultKind::Delay { delay },
            ("delay", None) => return Err("a delay fault needs `delay`".into()),
            ("blackhole" | "drop-udp" | "drain", Some(_)) => {
                return Err(format!("`delay` is for kind delay, not {}", r.kind))
            }
            (other, _) => {
                return Err(format!(
                    "kind `{}`: expected blackhole, drop-udp, delay or drain",
                    fedmesh_wire::bounded(other)
                ))
            }
        };
        let peer = r
            .peer
            .map(|p| ClusterName::new(&p).map_err(|e| e.to_string()))
            .transpose()?;
        Ok(Self {
            kind,
            peer,
            ttl: r.ttl,
        })
    }
}

impl From<FaultSpec> for RawFault {
    fn from(f: FaultSpec) -> Self {
        let (kind, delay) = match f.kind {
            FaultKind::Blackhole => ("blackhole", None),
            FaultKind::DropUdp => ("drop-udp", None),
            FaultKind::Drain => ("drain", None),
            FaultKind::Delay { delay } => ("delay", Some(delay)),
        };
        Self {
            kind: kind.into(),
            delay,
            peer: f.peer.map(|p| p.to_string()),
            ttl: f.ttl,
        }
    }
}

/// Bounds on what an operator may ask for (the gateway config's
/// `drills:` section).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FaultLimits {
    pub max_ttl: Duration,
    pub max_delay: Duration,
    pub max_faults: usize,
}

impl Default for FaultLimits {
    fn default() -> Self {
        Self {
            max_ttl: Duration::from_secs(600),
            max_delay: Duration::from_secs(5),
            max_faults: 16,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum FaultError {
    #[error("drill id `{0}`: 1 to 64 of a-z, 0-9, '.', '_', '-'")]
    BadDrillId(String),
    #[error("drill {holder} holds this gateway's faults until {remaining_ms} ms from now; drills are not stacked")]
    Busy { holder: DrillId, remaining_ms: u64 },
    #[error("drill {asked} holds no faults here")]
    NotHolder { asked: DrillId },
    #[error("no fault asked for")]
    Empty,
    #[error("{0} faults asked for; at most {1}")]
    TooMany(usize, usize),
    #[error("fault {index} ({kind}): ttl {ttl_ms} ms; 1 ms to {max_ms} ms")]
    Ttl {
        index: usize,
        kind: &'static str,
        ttl_ms: u64,
        max_ms: u64,
    },
    #[error("fault {index} (delay): {delay_ms} ms; 1 ms to {max_ms} ms")]
    Delay {
        index: usize,
        delay_ms: u64,
        max_ms: u64,
    },
    #[error("fault {index} ({kind}): needs a peer")]
    NoPeer { index: usize, kind: &'static str },
    #[error("fault {index} (drain): aimed at no peer (it drains this gateway)")]
    DrainWithPeer { index: usize },
    #[error("fault {index} ({kind}): {peer} is not a peer of this gateway")]
    UnknownPeer {
        index: usize,
        kind: &'static str,
        peer: ClusterName,
    },
    #[error("fault {index}: the same peer and kind as fault {earlier}")]
    Duplicate { index: usize, earlier: usize },
}

impl FaultError {
    /// As a metric label.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::BadDrillId(_) => "bad_drill_id",
            Self::Busy { .. } => "busy",
            Self::NotHolder { .. } => "not_holder",
            Self::Empty | Self::TooMany(..) | Self::Duplicate { .. } => "bad_request",
            Self::Ttl { .. } => "bad_ttl",
            Self::Delay { .. } => "bad_delay",
            Self::NoPeer { .. } | Self::DrainWithPeer { .. } | Self::UnknownPeer { .. } => {
                "bad_peer"
            }
        }
    }
}

/// A fault in force, until `until`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Active {
    pub spec: FaultSpec,
    pub until: Instant,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Held {
    drill: DrillId,
    /// Who asked (the operator's SPIFFE ID), for the log and `/faults`.
    operator: String,
    faults: Vec<Active>,
}

/// What the data path applies now: a plain value, replaced whole on
/// every change.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FaultView {
    pub blackholed: BTreeSet<ClusterName>,
    pub udp_dropped: BTreeSet<ClusterName>,
    /// Added delay by peer (the largest, if asked twice).
    pub delayed: Vec<(ClusterName, Duration)>,
    pub draining: bool,
}

impl FaultView {
    pub fn is_empty(&self) -> bool {
        *self == Self::default()
    }

    /// The delay added toward `peer`, if any.
    pub fn delay(&self, peer: &ClusterName) -> Option<Duration> {
        self.delayed
            .iter()
            .find(|(p, _)| p == peer)
            .map(|(_, d)| *d)
    }
}

pub enum Event<'a> {
    /// Set (or, for the holder, replace) `faults` for `drill`; `peers`
    /// are the clusters this gateway knows.
    Set {
        drill: DrillId,
        operator: String,
        faults: Vec<FaultSpec>,
        peers: &'a BTreeSet<ClusterName>,
    },
    /// End `drill`'s faults now.
    Clear { drill: DrillId },
    /// Time passed: faults whose time is up end.
    Tick,
}

/// What one event did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Step {
    /// The request's answer (a tick always succeeds).
    pub result: Result<(), FaultError>,
    /// The faults in force now, when they changed (empty: none).
    pub changed: Option<FaultView>,
    /// Faults that ended by themselves at this step.
    pub ended: Vec<FaultSpec>,
}

/// The faults of one gateway.
#[derive(Debug, Clone)]
pub struct Faults {
    limits: FaultLimits,
    held: Option<Held>,
}

impl Faults {
    pub fn new(limits: FaultLimits) -> Self {
        Self { limits, held: None }
    }

    pub fn on(&mut self, ev: Event<'_>, now: Instant) -> Step {
        // Time is settled first: a request right after a fault expired
        // finds the gateway free.
        let ended = self.expire(now);
        let tick = matches!(ev, Event::Tick);
        let result = match ev {
            Event::Tick => Ok(()),
            Event::Clear { drill } => match &self.held {
                Some(h) if h.drill == drill => {
                    self.held = None;
                    Ok(())
                }
                _ => Err(FaultError::NotHolder { asked: drill }),
            },
            Event::Set {
                drill,
                operator,
                faults,
                peers,
            } => self.set(drill, operator, faults, peers, now),
        };
        let changed = (!ended.is_empty() || (result.is_ok() && !tick)).then(|| self.view());
        Step {
            changed,
            ended,
            result,
        }
    }

    fn set(
        &mut self,
        drill: DrillId,
        operator: String,
        faults: Vec<FaultSpec>,
        peers: &BTreeSet<ClusterName>,
        now: Instant,
    ) -> Result<(), FaultError> {
        if let Some(h) = &self.held {
            if h.drill != drill {
                let until = h.faults.iter().map(|f| f.until).max().unwrap_or(now);
                return Err(FaultError::Busy {
                    holder: h.drill.clone(),
                    remaining_ms: ms(until.saturating_duration_since(now)),
                });
            }
        }
        self.check(&faults, peers)?;
        self.held = Some(Held {
            drill,
            operator,
            faults: faults
                .into_iter()
                .map(|spec| Active {
                    until: now + spec.ttl,
                    spec,
                })
                .collect(),
        });
        Ok(())
    }

    fn check(&self, faults: &[FaultSpec], peers: &BTreeSet<ClusterName>) -> Result<(), FaultError> {
        let l = &self.limits;
        if faults.is_empty() {
            return Err(FaultError::Empty);
        }
        if faults.len() > l.max_faults {
            return Err(FaultError::TooMany(faults.len(), l.max_faults));
        }
        for (index, f) in faults.iter().enumerate() {
            let kind = f.kind.label();
            if f.ttl.is_zero() || f.ttl > l.max_ttl {
                return Err(FaultError::Ttl {
                    index,
                    kind,
                    ttl_ms: ms(f.ttl),
                    max_ms: ms(l.max_ttl),
                });
            }
            if let FaultKind::Delay { delay } = f.kind {
                if delay.is_zero() || delay > l.max_delay {
                    return Err(FaultError::Delay {
                        index,
                        delay_ms: ms(delay),
                        max_ms: ms(l.max_delay),
                    });
                }
            }
            match (&f.kind, &f.peer) {
                (FaultKind::Drain, Some(_)) => return Err(FaultError::DrainWithPeer { index }),
                (FaultKind::Drain, None) => {}
                (_, None) => return Err(FaultError::NoPeer { index, kind }),
                (_, Some(p)) if !peers.contains(p) => {
                    return Err(FaultError::UnknownPeer {
                        index,
                        kind,
                        peer: p.clone(),
                    })
                }
                (_, Some(_)) => {}
            }
            let same = |g: &FaultSpec| {
                std::mem::discriminant(&g.kind) == std::mem::discriminant(&f.kind)
                    && g.peer == f.peer
            };
            if let Some(earlier) = faults[..index].iter().position(same) {
                return Err(FaultError::Duplicate { index, earlier });
            }
        }
        Ok(())
    }

    /// Ends the faults whose time is up; the drill lets go of the gateway
    /// when its last one ends.
    fn expire(&mut self, now: Instant) -> Vec<FaultSpec> {
        let Some(h) = &mut self.held else {
            return Vec::new();
        };
        let (ended, left): (Vec<Active>, Vec<Active>) =
            h.faults.drain(..).partition(|f| f.until <= now);
        h.faults = left;
        if h.faults.is_empty() {
            self.held = None;
        }
        ended.into_iter().map(|a| a.spec).collect()
    }

    /// When the next fault ends by itself (the driver's timer).
    pub fn next_deadline(&self) -> Option<Instant> {
        self.held.as_ref()?.faults.iter().map(|f| f.until).min()
    }

    /// The drill holding the gateway, who asked, and its faults.
    pub fn holder(&self) -> Option<(&DrillId, &str, &[Active])> {
        self.held
            .as_ref()
            .map(|h| (&h.drill, h.operator.as_str(), h.faults.as_slice()))
    }

    pub fn view(&self) -> FaultView {
        let mut v = FaultView::default();
        for f in self.held.iter().flat_map(|h| &h.faults) {
            match (&f.spec.kind, &f.spec.peer) {
                (FaultKind::Drain, _) => v.draining = true,
                (FaultKind::Blackhole, Some(p)) => {
                    v.blackholed.insert(p.clone());
                }
                (FaultKind::DropUdp, Some(p)) => {
                    v.udp_dropped.insert(p.clone());
                }
                (FaultKind::Delay { delay }, Some(p)) => v.delayed.push((p.clone(), *delay)),
                (_, None) => {}
            }
        }
        v
    }
}

fn ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    fn c(s: &str) -> ClusterName {
        ClusterName::new(s).unwrap()
    }

    fn d(s: &str) -> DrillId {
        DrillId::new(s).unwrap()
    }

    fn spec(kind: FaultKind, peer: Option<&str>, ttl_s: u64) -> FaultSpec {
        FaultSpec {
            kind,
            peer: peer.map(c),
            ttl: Duration::from_secs(ttl_s),
        }
    }

    fn peers() -> BTreeSet<ClusterName> {
        [c("west"), c("north")].into()
    }

    fn set(f: &mut Faults, drill: &str, faults: Vec<FaultSpec>, now: Instant) -> Step {
        f.on(
            Event::Set {
                drill: d(drill),
                operator: "spiffe://east.acme/ns/ops/sa/drill".into(),
                faults,
                peers: &peers(),
            },
            now,
        )
    }

    fn secs(t0: Instant, s: u64) -> Instant {
        t0 + Duration::from_secs(s)
    }

    #[test]
    fn a_fault_ends_by_itself_and_frees_the_gateway() {
        let t0 = Instant::now();
        let mut f = Faults::new(FaultLimits::default());
        let faults = vec![
            spec(FaultKind::Blackhole, Some("west"), 10),
            spec(FaultKind::Drain, None, 20),
        ];
        let step = set(&mut f, "d1", faults, t0);
        assert_eq!(step.result, Ok(()));
        assert!(step.ended.is_empty());
        let view = step.changed.unwrap();
        assert_eq!(view.blackholed, [c("west")].into());
        assert!(view.draining);
        assert_eq!(f.next_deadline(), Some(secs(t0, 10)));
        // Nothing is due before 10 s.
        let step = f.on(Event::Tick, secs(t0, 9));
        assert_eq!((step.result, step.changed), (Ok(()), None));
        // At 10 s the blackhole ends, the drain goes on.
        let step = f.on(Event::Tick, secs(t0, 10));
        assert_eq!(step.ended, [spec(FaultKind::Blackhole, Some("west"), 10)]);
        let view = step.changed.unwrap();
        assert!(view.blackholed.is_empty() && view.draining);
        // Another drill is refused while d1 holds anything...
        let step = set(
            &mut f,
            "d2",
            vec![spec(FaultKind::Drain, None, 5)],
            secs(t0, 15),
        );
        assert_eq!(
            step.result,
            Err(FaultError::Busy {
                holder: d("d1"),
                remaining_ms: 5000
            })
        );
        assert_eq!(step.changed, None);
        // ...and takes the gateway once the last fault ended, even though
        // d1 never said goodbye.
        let step = set(
            &mut f,
            "d2",
            vec![spec(FaultKind::DropUdp, Some("north"), 5)],
            secs(t0, 20),
        );
        assert_eq!(step.result, Ok(()));
        assert_eq!(
            step.ended,
            [spec(FaultKind::Drain, None, 20)],
            "d1's drain ended first"
        );
        let view = step.changed.unwrap();
        assert_eq!(view.udp_dropped, [c("north")].into());
        assert!(!view.draining);
        assert_eq!(f.holder().unwrap().0, &d("d2"));
        // A refusal at the moment a fault ends still reports the end.
        let step = set(
            &mut f,
            "d3",
            vec![spec(FaultKind::Drain, None, 0)],
            secs(t0, 25),
        );
        assert_eq!(step.result.unwrap_err().reason(), "bad_ttl");
        assert_eq!(step.ended.len(), 1);
        assert!(step.changed.unwrap().is_empty());
    }

    #[test]
    fn the_holder_replaces_or_clears_its_faults_and_nobody_else_can() {
        let t0 = Instant::now();
        let mut f = Faults::new(FaultLimits::default());
        set(
            &mut f,
            "d1",
            vec![spec(FaultKind::Blackhole, Some("west"), 60)],
            t0,
        );
        let delay = FaultKind::Delay {
            delay: Duration::from_millis(80),
        };
        let view = set(&mut f, "d1", vec![spec(delay, Some("west"), 60)], t0)
            .changed
            .unwrap();
        assert!(view.blackholed.is_empty());
        assert_eq!(view.delay(&c("west")), Some(Duration::from_millis(80)));
        let step = f.on(Event::Clear { drill: d("d2") }, t0);
        assert_eq!(step.result, Err(FaultError::NotHolder { asked: d("d2") }));
        assert_eq!(step.changed, None);
        let step = f.on(Event::Clear { drill: d("d1") }, t0);
        assert!(step.changed.unwrap().is_empty());
        assert!(f.holder().is_none() && f.next_deadline().is_none());
        // Clearing twice: nothing held.
        let step = f.on(Event::Clear { drill: d("d1") }, t0);
        assert_eq!(step.result.unwrap_err().reason(), "not_holder");
    }

    #[test]
    fn a_bad_request_is_refused_whole_and_changes_nothing() {
        let t0 = Instant::now();
        let mut f = Faults::new(FaultLimits {
            max_ttl: Duration::from_secs(60),
            max_delay: Duration::from_secs(1),
            max_faults: 2,
        });
        let good = spec(FaultKind::Blackhole, Some("west"), 10);
        let delay = |ms| FaultKind::Delay {
            delay: Duration::from_millis(ms),
        };
        let cases = [
            (vec![], "bad_request", "no fault"),
            (vec![good.clone(); 3], "bad_request", "at most 2"),
            (
                vec![good.clone(), good.clone()],
                "bad_request",
                "same peer and kind",
            ),
            (
                vec![good.clone(), spec(FaultKind::Drain, None, 61)],
                "bad_ttl",
                "fault 1 (drain): ttl 61000 ms",
            ),
            (vec![spec(FaultKind::Drain, None, 0)], "bad_ttl", "ttl 0 ms"),
            (
                vec![spec(delay(1001), Some("west"), 5)],
                "bad_delay",
                "1001 ms",
            ),
            (vec![spec(delay(0), Some("west"), 5)], "bad_delay", "0 ms"),
            (
                vec![spec(FaultKind::Blackhole, None, 5)],
                "bad_peer",
                "needs a peer",
            ),
            (
                vec![spec(FaultKind::Drain, Some("west"), 5)],
                "bad_peer",
                "aimed at no peer",
            ),
            (
                vec![spec(FaultKind::DropUdp, Some("south"), 5)],
                "bad_peer",
                "south is not a peer",
            ),
        ];
        for (faults, reason, text) in cases {
            let step = set(&mut f, "d1", faults.clone(), t0);
            let e = step.result.unwrap_err();
            assert_eq!(e.reason(), reason, "{e}");
            assert!(e.to_string().contains(text), "{e}");
            assert_eq!(step.changed, None);
            assert!(f.holder().is_none(), "{faults:?} left something held");
        }
        // A bad request from the holder keeps what it had.
        set(&mut f, "d1", vec![good.clone()], t0);
        let step = set(&mut f, "d1", vec![spec(FaultKind::Drain, None, 0)], t0);
        assert!(step.result.is_err());
        assert_eq!(f.view().blackholed, [c("west")].into());
        for bad in ["", "D1", "a b", "x\u{1b}[2J", &"a".repeat(65)] {
            assert!(DrillId::new(bad).is_err(), "{bad:?}");
        }
        // The error quotes a bounded, escaped prefix.
        let e = DrillId::new(&"\u{1b}".repeat(10_000))
            .unwrap_err()
            .to_string();
        assert!(e.len() < 400 && !e.contains('\u{1b}'), "{e}");
    }

    #[test]
    fn faults_read_and_write_as_json() {
        let text = r#"[{"kind":"delay","delay":"80ms","peer":"west","ttl":"30s"},{"kind":"drain","ttl":"1m"}]"#;
        let faults: Vec<FaultSpec> = serde_json::from_str(text).unwrap();
        assert_eq!(
            faults,
            [
                spec(
                    FaultKind::Delay {
                        delay: Duration::from_millis(80)
                    },
                    Some("west"),
                    30
                ),
                spec(FaultKind::Drain, None, 60),
            ]
        );
        for bad in [
            r#"[{"kind":"melt","ttl":"1s"}]"#,
            r#"[{"kind":"drain"}]"#,
            r#"[{"kind":"drain","ttl":"1s","extra":1}]"#,
            r#"[{"kind":"blackhole","peer":"West","ttl":"1s"}]"#,
            r#"[{"kind":"delay","peer":"west","ttl":"1s"}]"#,
            r#"[{"kind":"drain","delay":"1s","ttl":"1s"}]"#,
        ] {
            assert!(
                serde_json::from_str::<Vec<FaultSpec>>(bad).is_err(),
                "{bad}"
            );
        }
    }
}
