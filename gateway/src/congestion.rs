//! Congestion control of what a gateway sends to its peers: which
//! controller (fedmesh's BBR, quinn's Cubic or NewReno), chosen per peer,
//! and a thin wrapper around it that the gateway's metrics read and that
//! keeps a long-lived connection from staying crippled after a path event.
//!
//! Why the wrapper: a gateway's one connection to a peer lives for days
//! and idles between bursts. A loss-based controller (Cubic, NewReno)
//! treats every loss as a full queue, also losses of keep-alives sent
//! while the connection was idle (nothing in flight but them) and the
//! persistent congestion RFC 9002 declares after a short outage. Cubic
//! then sets its slow-start threshold from the window it had when idle
//! (the initial window, or a few packets), and the next bulk transfer
//! starts in congestion avoidance from there: Cubic's curve
//! (0.4 packets/s³) needs about 20 s to reach a 30 ms × 1 Gbit/s window.
//! Neither loss measured the path's capacity. So:
//!
//! - persistent congestion (a path event: every packet of 3 PTOs lost)
//!   restarts the controller, any of the three: slow start (BBR:
//!   Startup) from the initial window with no threshold and no model,
//!   as on a new connection. Losses of packets sent before the restart
//!   belong to the same event and are not passed on (quinn may declare
//!   them in later batches); a path that is really congested sets a
//!   threshold again at the first loss of the new slow start;
//! - a loss while the connection is application-limited (as quinn last
//!   reported with an acknowledgement: it was not using its window) does
//!   not cut the window: the window was not what was sent, so the loss
//!   says nothing about it. (BBR does not cut for loss anyway.)
//!
//! `path_event_recovery: false` turns the two changes off (the
//! controllers as they are), so the rig can measure what they change.

use std::any::Any;
use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;
use std::time::Instant;

use quinn::congestion::{
    Controller, ControllerFactory, ControllerMetrics, CubicConfig, NewRenoConfig,
};
use serde::{Deserialize, Serialize};

/// One of quinn's congestion controllers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Algorithm {
    Cubic,
    NewReno,
    /// fedmesh's BBR (v1 with a delivery-rate sampler, `bbr.rs`).
    Bbr,
}

impl Algorithm {
    pub const ALL: [Self; 3] = [Self::Cubic, Self::NewReno, Self::Bbr];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Cubic => "cubic",
            Self::NewReno => "newreno",
            Self::Bbr => "bbr",
        }
    }
}

impl fmt::Display for Algorithm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for Algorithm {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Self::ALL
            .into_iter()
            .find(|a| a.as_str() == s)
            .ok_or_else(|| format!("unknown congestion controller {s:?} (cubic, newreno, bbr)"))
    }
}

/// The gateway config's `congestion` section.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CongestionConfig {
    /// Controller for every peer not named in `peers`.
    pub controller: Algorithm,
    /// Per peer cluster: the controller for what this gateway sends to it.
    pub peers: BTreeMap<String, Algorithm>,
    /// Congestion window of a new connection (and of a restarted one),
    /// bytes. 0: [`DEFAULT_INITIAL_WINDOW`] for all three.
    pub initial_window_bytes: u64,
    /// Restart the controller after persistent congestion, and (Cubic,
    /// NewReno) keep the window through losses while application-limited
    /// (the module docs say why). `false`: the controllers as they are,
    /// to compare.
    pub path_event_recovery: bool,
}

/// Chosen on the rig's packet-level WAN (`docs/performance.md`): at
/// 30 ms and 1 % loss BBR moves hundreds of Mbit/s where any loss-based
/// controller gets what Mathis allows (~5 Mbit/s), and on a clean path it
/// moves about what Cubic does.
pub const DEFAULT_ALGORITHM: Algorithm = Algorithm::Bbr;

impl Default for CongestionConfig {
    fn default() -> Self {
        Self {
            controller: DEFAULT_ALGORITHM,
            peers: BTreeMap::new(),
            initial_window_bytes: 0,
            path_event_recovery: true,
        }
    }
}

/// Above this an initial window is a burst no path should take unpaced.
const MAX_INITIAL_WINDOW: u64 = 16 << 20;

impl CongestionConfig {
    /// The controller for what we send to peer cluster `peer`.
    pub fn for_peer(&self, peer: &str) -> Algorithm {
        self.peers.get(peer).copied().unwrap_or(self.controller)
    }

    /// Every controller some peer may use.
    pub fn in_use(&self) -> Vec<Algorithm> {
        let mut v: Vec<Algorithm> = self.peers.values().copied().collect();
        v.push(self.controller);
        v.sort();
        v.dedup();
        v
    }

    pub fn problems(&self) -> Vec<String> {
        let mut p = Vec::new();
        for name in self.peers.keys() {
            if let Err(e) = fedmesh_catalog::ClusterName::new(name) {
                p.push(format!(
                    "congestion.peers: {name:?} is no cluster name: {e}"
                ));
            }
        }
        if self.initial_window_bytes > MAX_INITIAL_WINDOW {
            p.push(format!(
                "congestion.initial_window_bytes {} is above {MAX_INITIAL_WINDOW}",
                self.initial_window_bytes
            ));
        }
        p
    }

    /// The factory quinn builds each connection's controller from.
    pub fn factory(&self, algorithm: Algorithm) -> Arc<ObservedFactory> {
        let iw = match self.initial_window_bytes {
            0 => DEFAULT_INITIAL_WINDOW,
            n => n,
        };
        let inner: Arc<dyn ControllerFactory + Send + Sync> = match algorithm {
            Algorithm::Cubic => Arc::new(CubicConfig::default().initial_window(iw).clone()),
            Algorithm::NewReno => Arc::new(NewRenoConfig::default().initial_window(iw).clone()),
            Algorithm::Bbr => Arc::new(crate::bbr::BbrFactory { initial_window: iw }),
        };
        Arc::new(ObservedFactory {
            algorithm,
            inner,
            restart: self.path_event_recovery,
            // BBR does not shrink its window for loss: nothing to keep.
            keep_idle_window: self.path_event_recovery && algorithm != Algorithm::Bbr,
        })
    }
}

/// RFC 9002's initial window for 1,200-byte datagrams:
/// min(10 × 1200, max(2 × 1200, 14,720)), as quinn's Cubic and NewReno.
pub const DEFAULT_INITIAL_WINDOW: u64 = 12_000;

/// Builds [`Observed`] controllers around one of quinn's.
pub struct ObservedFactory {
    algorithm: Algorithm,
    inner: Arc<dyn ControllerFactory + Send + Sync>,
    /// Persistent congestion restarts the controller.
    restart: bool,
    /// Losses while application-limited are not passed on.
    keep_idle_window: bool,
}

impl ControllerFactory for ObservedFactory {
    fn build(self: Arc<Self>, now: Instant, current_mtu: u16) -> Box<dyn Controller> {
        Box::new(Observed {
            inner: self.inner.clone().build(now, current_mtu),
            factory: self,
            mtu: current_mtu,
            in_flight: 0,
            app_limited: false,
            restarted_at: None,
            restarts: 0,
            forgiven: 0,
        })
    }
}

/// quinn's controller, plus what the metrics read and the path-event
/// handling described in the module docs.
pub struct Observed {
    inner: Box<dyn Controller>,
    factory: Arc<ObservedFactory>,
    mtu: u16,
    in_flight: u64,
    app_limited: bool,
    /// When the controller was last restarted.
    restarted_at: Option<Instant>,
    restarts: u64,
    forgiven: u64,
}

/// What [`Observed`] knows beyond quinn's `PathStats`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Observation {
    pub algorithm: Option<Algorithm>,
    /// Bytes in flight after the last batch of acknowledgements, plus
    /// what was sent since.
    pub in_flight: u64,
    /// Slow-start threshold (loss-based controllers; `u64::MAX` in slow
    /// start from the beginning).
    pub ssthresh: Option<u64>,
    /// Restarts after persistent congestion (slow start, BBR's Startup).
    pub restarts: u64,
    /// Congestion events not passed on: losses while application-limited.
    pub forgiven: u64,
    /// BBR's estimate of the path's bottleneck bandwidth, bytes/s.
    pub bandwidth: Option<u64>,
}

impl Observed {
    /// The observation of a connection whose controller is an
    /// [`Observed`] (every gateway connection's is).
    pub fn of(conn: &quinn::Connection) -> Observation {
        let state = conn.congestion_state();
        match state.into_any().downcast::<Observed>() {
            Ok(o) => o.observation(),
            Err(_) => Observation::default(),
        }
    }

    fn observation(&self) -> Observation {
        let m: ControllerMetrics = self.inner.metrics();
        Observation {
            algorithm: Some(self.factory.algorithm),
            in_flight: self.in_flight,
            ssthresh: m.ssthresh,
            restarts: self.restarts,
            forgiven: self.forgiven,
            bandwidth: match self.factory.algorithm {
                Algorithm::Bbr => m.pacing_rate.map(|bits| bits / 8),
                _ => None,
            },
        }
    }
}

impl Controller for Observed {
    fn on_sent(&mut self, now: Instant, bytes: u64, last_packet_number: u64) {
        self.in_flight = self.in_flight.saturating_add(bytes);
        self.inner.on_sent(now, bytes, last_packet_number);
    }

    fn on_ack(
        &mut self,
        now: Instant,
        sent: Instant,
        bytes: u64,
        app_limited: bool,
        rtt: &quinn_proto::RttEstimator,
    ) {
        self.app_limited = app_limited;
        self.inner.on_ack(now, sent, bytes, app_limited, rtt);
    }

    fn on_end_acks(
        &mut self,
        now: Instant,
        in_flight: u64,
        app_limited: bool,
        largest_packet_num_acked: Option<u64>,
    ) {
        self.in_flight = in_flight;
        self.app_limited = app_limited;
        self.inner
            .on_end_acks(now, in_flight, app_limited, largest_packet_num_acked);
    }

    fn on_congestion_event(
        &mut self,
        now: Instant,
        sent: Instant,
        is_persistent_congestion: bool,
        lost_bytes: u64,
    ) {
        if self.factory.restart {
            if self.restarted_at.is_some_and(|t| sent <= t) {
                return;
            }
            if is_persistent_congestion {
                self.restarts += 1;
                self.restarted_at = Some(now);
                self.inner = self.factory.inner.clone().build(now, self.mtu);
                return;
            }
        }
        if self.factory.keep_idle_window && self.app_limited {
            self.forgiven += 1;
            return;
        }
        self.inner
            .on_congestion_event(now, sent, is_persistent_congestion, lost_bytes);
    }

    fn on_mtu_update(&mut self, new_mtu: u16) {
        self.mtu = new_mtu;
        self.inner.on_mtu_update(new_mtu);
    }

    fn window(&self) -> u64 {
        self.inner.window()
    }

    fn metrics(&self) -> ControllerMetrics {
        self.inner.metrics()
    }

    fn clone_box(&self) -> Box<dyn Controller> {
        Box::new(Observed {
            inner: self.inner.clone_box(),
            factory: self.factory.clone(),
            mtu: self.mtu,
            in_flight: self.in_flight,
            app_limited: self.app_limited,
            restarted_at: self.restarted_at,
            restarts: self.restarts,
            forgiven: self.forgiven,
        })
    }

    fn initial_window(&self) -> u64 {
        self.inner.initial_window()
    }

    fn into_any(self: Box<Self>) -> Box<dyn Any> {
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    const MTU: u16 = 1200;

    fn build(cfg: &CongestionConfig, a: Algorithm, now: Instant) -> Box<dyn Controller> {
        cfg.factory(a).build(now, MTU)
    }

    fn observe(c: &dyn Controller) -> Observation {
        match c.clone_box().into_any().downcast::<Observed>() {
            Ok(o) => o.observation(),
            Err(_) => panic!("not an Observed"),
        }
    }

    /// Sends a window's worth and ends an ack batch with `app_limited`.
    fn busy(c: &mut dyn Controller, now: Instant, app_limited: bool) {
        let w = c.window();
        c.on_sent(now, w, 1);
        c.on_end_acks(now, w, app_limited, Some(1));
    }

    /// A default Cubic that lost a packet of a window in use at `t0`.
    fn loaded_loss(t0: Instant) -> Box<dyn Controller> {
        let mut c = build(&CongestionConfig::default(), Algorithm::Cubic, t0);
        busy(c.as_mut(), t0, false);
        c.on_congestion_event(t0 + Duration::from_millis(40), t0, false, 1200);
        c
    }

    #[test]
    fn a_loss_of_a_window_in_use_cuts_it_like_cubic() {
        let t0 = Instant::now();
        let iw = build(&CongestionConfig::default(), Algorithm::Cubic, t0).window();
        let c = loaded_loss(t0);
        assert_eq!(c.window(), (iw as f64 * 0.7) as u64);
        let o = observe(c.as_ref());
        assert_eq!(o.ssthresh, Some(c.window()));
        assert_eq!((o.forgiven, o.restarts), (0, 0));
        assert_eq!(o.in_flight, iw);
    }

    #[test]
    fn a_loss_while_application_limited_leaves_the_window_alone() {
        let t0 = Instant::now();
        let cfg = CongestionConfig::default();
        for a in [Algorithm::Cubic, Algorithm::NewReno] {
            let mut c = build(&cfg, a, t0);
            let iw = c.window();
            busy(c.as_mut(), t0, true);
            c.on_congestion_event(t0 + Duration::from_millis(40), t0, false, 1200);
            assert_eq!(c.window(), iw, "{a}");
            let o = observe(c.as_ref());
            assert_eq!(o.ssthresh, Some(u64::MAX), "{a}: still in slow start");
            assert_eq!(o.forgiven, 1, "{a}");
        }
    }

    #[test]
    fn persistent_congestion_restarts_slow_start_instead_of_crippling_it() {
        let t0 = Instant::now();
        let iw = build(&CongestionConfig::default(), Algorithm::Cubic, t0).window();
        // A loss under load first: a threshold is set.
        let mut c = loaded_loss(t0);
        assert!(observe(c.as_ref()).ssthresh < Some(u64::MAX));
        // Then a path event: everything of 3 PTOs lost. Plain Cubic would
        // now sit at 2 packets with a threshold of 0.7 of a cut window.
        let t1 = t0 + Duration::from_secs(5);
        busy(c.as_mut(), t1, false);
        c.on_congestion_event(t1 + Duration::from_millis(500), t1, true, 12_000);
        assert_eq!(c.window(), iw);
        let o = observe(c.as_ref());
        assert_eq!(o.ssthresh, Some(u64::MAX));
        assert_eq!(o.restarts, 1);
        // More packets of the outage declared lost in a later batch are
        // the same event: the new slow start keeps its window.
        let t2 = t1 + Duration::from_millis(600);
        c.on_congestion_event(t2, t1 + Duration::from_millis(300), false, 1200);
        assert_eq!(c.window(), iw);
        // A loss of a packet sent after the restart, under load, is news.
        busy(c.as_mut(), t2, false);
        c.on_congestion_event(t2 + Duration::from_millis(40), t2, false, 1200);
        assert!(c.window() < iw, "{}", c.window());
    }

    #[test]
    fn plain_cubic_is_what_the_restart_avoids() {
        // The state the wrapper exists for, on quinn's own Cubic: after
        // persistent congestion the window is 2 packets and the threshold
        // 0.7 of the already-cut window, so growth is Cubic's from there.
        let t0 = Instant::now();
        let mut c = Arc::new(CubicConfig::default()).build(t0, MTU);
        c.on_congestion_event(t0 + Duration::from_millis(500), t0, true, 12_000);
        assert_eq!(c.window(), 2 * u64::from(MTU));
        let th = c.metrics().ssthresh.unwrap_or(u64::MAX);
        assert!(th < 14_720, "threshold {th}");
    }

    #[test]
    fn without_path_event_recovery_it_is_quinns_cubic() {
        let t0 = Instant::now();
        let cfg = CongestionConfig {
            path_event_recovery: false,
            ..CongestionConfig::default()
        };
        let mut c = build(&cfg, Algorithm::Cubic, t0);
        busy(c.as_mut(), t0, true);
        c.on_congestion_event(t0 + Duration::from_millis(500), t0, true, 12_000);
        assert_eq!(c.window(), 2 * u64::from(MTU));
        let o = observe(c.as_ref());
        assert_eq!((o.restarts, o.forgiven), (0, 0));
    }

    #[test]
    fn bbr_ignores_random_loss_and_starts_over_after_a_path_event() {
        let t0 = Instant::now();
        let cfg = CongestionConfig::default();
        let mut c = build(&cfg, Algorithm::Bbr, t0);
        let iw = c.window();
        busy(c.as_mut(), t0, false);
        let grown = c.window();
        c.on_congestion_event(t0 + Duration::from_millis(40), t0, false, 1200);
        assert_eq!(c.window(), grown);
        let t1 = t0 + Duration::from_secs(1);
        busy(c.as_mut(), t1, false);
        c.on_congestion_event(t1 + Duration::from_millis(500), t1, true, 12_000);
        assert_eq!(c.window(), iw);
        let o = observe(c.as_ref());
        assert_eq!((o.restarts, o.forgiven), (1, 0));
        assert_eq!(o.algorithm, Some(Algorithm::Bbr));
        assert_eq!(o.ssthresh, None);
        assert_eq!(o.bandwidth, Some(0), "no sample yet after the restart");
        // A loss while application-limited is BBR's to ignore, not one
        // the wrapper keeps from it (and counts as an idle loss).
        let t2 = t1 + Duration::from_secs(1);
        busy(c.as_mut(), t2, true);
        c.on_congestion_event(t2 + Duration::from_millis(40), t2, false, 1200);
        assert_eq!(observe(c.as_ref()).forgiven, 0);
    }

    #[test]
    fn the_initial_window_is_configurable() {
        let t0 = Instant::now();
        let cfg = CongestionConfig {
            initial_window_bytes: 100 * 1200,
            ..CongestionConfig::default()
        };
        for a in Algorithm::ALL {
            assert_eq!(build(&cfg, a, t0).window(), 120_000, "{a}");
        }
    }

    #[test]
    fn config_per_peer_and_its_problems() {
        let cfg: CongestionConfig =
            serde_yaml_ng::from_str("controller: cubic\npeers: { west: bbr, south: newreno }\n")
                .unwrap();
        assert_eq!(cfg.for_peer("west"), Algorithm::Bbr);
        assert_eq!(cfg.for_peer("east"), Algorithm::Cubic);
        assert_eq!(
            cfg.in_use(),
            vec![Algorithm::Cubic, Algorithm::NewReno, Algorithm::Bbr]
        );
        assert!(cfg.problems().is_empty());
        assert_eq!(CongestionConfig::default().controller, DEFAULT_ALGORITHM);

        let bad: CongestionConfig = serde_yaml_ng::from_str(
            "peers: { \"Not A Cluster\": bbr }\ninitial_window_bytes: 999999999\n",
        )
        .unwrap();
        let p = bad.problems();
        assert_eq!(p.len(), 2, "{p:?}");
        let e = serde_yaml_ng::from_str::<CongestionConfig>("controller: vegas\n").unwrap_err();
        assert!(e.to_string().contains("vegas"), "{e}");
        assert!("vegas".parse::<Algorithm>().is_err());
        assert_eq!("newreno".parse::<Algorithm>(), Ok(Algorithm::NewReno));
    }
}
