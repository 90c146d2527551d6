//! fedmesh's BBR: a model-based congestion controller (BBR v1, after
//! draft-cardwell-iccrg-bbr-congestion-control-00) with a real
//! delivery-rate sampler (draft-cheng-iccrg-delivery-rate-estimation),
//! behind quinn's `Controller` trait.
//!
//! Why not quinn's BBR: quinn 0.11's (labelled experimental, unmaintained)
//! estimates bandwidth per acknowledged *packet*, as one packet's bytes
//! over the time since the previous acknowledgement call. Every packet of
//! an ACK frame after the first is a zero interval (no sample), so its
//! estimate is one packet per gap between ACK frames. On a gateway's
//! echoed traffic the peer is itself window-limited and sends its ACKs
//! with its own data (quinn does not send an ACK-only packet while data
//! waits for the window), so ACK frames grow sparse, the estimate and so
//! the window shrink, and the peer's ACKs grow sparser still: the rig saw
//! 1–5 Mbit/s where one-way BBR moved 1.3 Gbit/s. A delivery-rate sample
//! here spans a packet's whole flight (bytes delivered between its send
//! and its acknowledgement, over that interval), so it measures the same
//! rate whether ACKs come every two packets or every twenty.
//!
//! What differs from the draft, and why: quinn paces from the window
//! (1.25 × window per smoothed RTT), not from a controller's pacing rate,
//! so this BBR steers through the window alone: the gains of each phase
//! (2.885 in Startup, the 1.25/0.75/1 cycle of ProbeBW) act as window
//! gains on the estimated bandwidth-delay product, plus the ACK
//! aggregation measured in the last 10 rounds, and never less than the
//! window the pacer turns into gain × the bandwidth estimate
//! ([`Bbr::paced_window`]); Drain holds the window at
//! one product until what Startup queued has left. Loss does not
//! shrink the window (BBR v1: random loss is not congestion); persistent
//! congestion (a path event) starts the model over, as a new connection,
//! done by the [`crate::congestion::Observed`] wrapper for every
//! controller.

use std::any::Any;
use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use quinn::congestion::{Controller, ControllerFactory, ControllerMetrics};

/// 2/ln 2: the smallest gain that doubles the delivery rate each round.
const HIGH_GAIN: f64 = 2.885;
/// Window gains of ProbeBW's eight phases, one minimum RTT each.
const CYCLE: [f64; 8] = [1.25, 0.75, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0];
/// Rounds the bandwidth and ACK-aggregation maxima are kept.
const BW_ROUNDS: u64 = 10;
/// How long a minimum RTT stands before ProbeRTT measures it again.
const MIN_RTT_WINDOW: Duration = Duration::from_secs(10);
/// How long ProbeRTT holds the window at its floor.
const PROBE_RTT_TIME: Duration = Duration::from_millis(200);
/// Startup ends after this many rounds without 25 % more bandwidth.
const FULL_BW_ROUNDS: u8 = 3;
const FULL_BW_GROWTH: f64 = 1.25;
/// A round trip this many times the minimum (and [`RTT_RISE_MIN`] above
/// it), for [`RTT_RISE_TIME`] and [`RTT_RISE_ROUNDS`], is a longer route.
const RTT_RISE: u32 = 4;
const RTT_RISE_MIN: Duration = Duration::from_millis(5);
const RTT_RISE_TIME: Duration = Duration::from_secs(1);
const RTT_RISE_ROUNDS: u64 = 8;
/// quinn paces at this many windows per smoothed RTT.
const PACER_GAIN: f64 = 1.25;
/// The window never goes below this many packets.
const MIN_WINDOW_PACKETS: u64 = 4;
/// Sends remembered for rate samples: a window of 1 Gbit/s × 100 ms is
/// ~9,000 packets in ~1,000 transmits of up to 10 (GSO), so this bounds
/// memory without losing samples on any path the gateway is sized for.
const MAX_SENDS: usize = 16_384;
/// Builds [`Bbr`] controllers.
#[derive(Debug, Clone)]
pub struct BbrFactory {
    pub initial_window: u64,
}

impl ControllerFactory for BbrFactory {
    fn build(self: Arc<Self>, _now: Instant, current_mtu: u16) -> Box<dyn Controller> {
        Box::new(Bbr::new(self.initial_window, current_mtu))
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Startup,
    Drain,
    ProbeBw,
    ProbeRtt,
}

/// The connection's delivery state when one transmit (a batch of up to
/// 10 packets sent at one instant) left.
#[derive(Debug, Clone, Copy)]
struct Sent {
    at: Instant,
    delivered: u64,
    delivered_at: Instant,
    first_sent_at: Instant,
    app_limited: bool,
}

/// A maximum over the last [`BW_ROUNDS`] rounds, one entry per round.
#[derive(Debug, Clone, Default)]
struct RoundMax {
    rounds: VecDeque<(u64, u64)>,
}

impl RoundMax {
    fn update(&mut self, round: u64, value: u64) {
        match self.rounds.back_mut() {
            Some((r, v)) if *r == round => *v = (*v).max(value),
            _ => self.rounds.push_back((round, value)),
        }
        while self
            .rounds
            .front()
            .is_some_and(|(r, _)| r + BW_ROUNDS <= round)
        {
            self.rounds.pop_front();
        }
    }

    fn get(&self) -> u64 {
        self.rounds.iter().map(|(_, v)| *v).max().unwrap_or(0)
    }
}

/// One rate sample (the draft's `rs`), from one batch of acknowledgements.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RateSample {
    /// Bytes per second delivered over the sample's interval.
    pub rate: u64,
    pub interval: Duration,
    pub app_limited: bool,
}

#[derive(Debug, Clone)]
pub struct Bbr {
    mtu: u64,
    initial_window: u64,
    // Delivery-rate sampler.
    delivered: u64,
    delivered_at: Option<Instant>,
    first_sent_at: Option<Instant>,
    /// Non-zero: `delivered` below which sends were application-limited.
    app_limited_until: u64,
    in_flight: u64,
    sends: VecDeque<Sent>,
    /// The most recently sent of the packets acknowledged in this batch.
    newest_acked: Option<Sent>,
    acked_in_batch: u64,
    rtt_in_batch: Option<Duration>,
    last_sample: Option<RateSample>,
    // Model.
    max_bw: RoundMax,
    min_rtt: Option<Duration>,
    min_rtt_at: Option<Instant>,
    /// quinn's smoothed RTT, which its pacer divides the window by.
    srtt: Option<Duration>,
    round: u64,
    next_round_delivered: u64,
    mode: Mode,
    filled_pipe: bool,
    full_bw: u64,
    full_bw_rounds: u8,
    cycle: usize,
    cycle_at: Option<Instant>,
    probe_rtt_until: Option<Instant>,
    probe_rtt_round_done: bool,
    prior_cwnd: u64,
    extra_acked: RoundMax,
    ack_epoch: Option<(Instant, u64)>,
    /// Since when (and which round) every round trip was far above
    /// the minimum.
    rtt_high_since: Option<(Instant, u64)>,
    cwnd: u64,
}

impl Bbr {
    pub fn new(initial_window: u64, mtu: u16) -> Self {
        let mtu = u64::from(mtu);
        Self {
            mtu,
            initial_window,
            delivered: 0,
            delivered_at: None,
            first_sent_at: None,
            app_limited_until: 0,
            in_flight: 0,
            sends: VecDeque::new(),
            newest_acked: None,
            acked_in_batch: 0,
            rtt_in_batch: None,
            last_sample: None,
            max_bw: RoundMax::default(),
            min_rtt: None,
            min_rtt_at: None,
            srtt: None,
            round: 0,
            next_round_delivered: 0,
            mode: Mode::Startup,
            filled_pipe: false,
            full_bw: 0,
            full_bw_rounds: 0,
            cycle: 2,
            cycle_at: None,
            probe_rtt_until: None,
            probe_rtt_round_done: false,
            prior_cwnd: 0,
            extra_acked: RoundMax::default(),
            ack_epoch: None,
            rtt_high_since: None,
            cwnd: initial_window.max(MIN_WINDOW_PACKETS * mtu),
        }
    }

    #[cfg(test)]
    pub fn mode(&self) -> Mode {
        self.mode
    }

    #[cfg(test)]
    /// Bottleneck bandwidth estimate, bytes per second.
    pub fn bandwidth(&self) -> u64 {
        self.max_bw.get()
    }

    #[cfg(test)]
    pub fn min_rtt(&self) -> Option<Duration> {
        self.min_rtt
    }

    #[cfg(test)]
    pub fn last_sample(&self) -> Option<RateSample> {
        self.last_sample
    }

    fn min_window(&self) -> u64 {
        MIN_WINDOW_PACKETS * self.mtu
    }

    /// `gain` × the estimated bandwidth-delay product, or `None` before
    /// the first sample.
    fn bdp(&self, gain: f64) -> Option<u64> {
        let bw = self.max_bw.get();
        let rtt = self.min_rtt?;
        if bw == 0 {
            return None;
        }
        Some((gain * bw as f64 * rtt.as_secs_f64()) as u64)
    }

    fn gain(&self) -> f64 {
        match self.mode {
            Mode::Startup => HIGH_GAIN,
            Mode::Drain => 1.0,
            Mode::ProbeBw => CYCLE[self.cycle],
            Mode::ProbeRtt => 1.0,
        }
    }

    /// The window this mode aims at.
    fn target(&self) -> u64 {
        let gain = self.gain();
        match self.bdp(gain) {
            Some(w) => (w + self.extra_acked.get())
                .max(self.paced_window(gain))
                .max(self.min_window()),
            None => self.initial_window,
        }
    }

    /// The window quinn's pacer turns into `gain` × the bandwidth
    /// estimate: BBR's pacing rate. quinn paces at [`PACER_GAIN`] windows
    /// per *smoothed* RTT, so where that is well above the minimum (on a
    /// loaded host, scheduling delays: loopback's minimum is tens of
    /// microseconds, its smoothed RTT under load hundreds) a window of
    /// gain × bandwidth × minimum RTT paces far below the bandwidth, the
    /// samples follow the pacing down, and so does the estimate: 1–2
    /// Gbit/s on loopback where Cubic moved 2.8. A real standing queue
    /// still drains: in ProbeBW's steady phases this window is 0.8 of
    /// what is in flight (bandwidth × smoothed RTT).
    fn paced_window(&self, gain: f64) -> u64 {
        match self.srtt {
            Some(srtt) => {
                (gain / PACER_GAIN * self.max_bw.get() as f64 * srtt.as_secs_f64()) as u64
            }
            None => 0,
        }
    }

    /// quinn's smoothed RTT after an acknowledgement.
    pub fn smoothed_rtt(&mut self, srtt: Duration) {
        self.srtt = Some(srtt);
    }

    pub fn sent(&mut self, now: Instant, bytes: u64) {
        if self.in_flight == 0 {
            // A new flight: its samples measure from now, not from the
            // last acknowledgement before an idle period.
            self.first_sent_at = Some(now);
            self.delivered_at = Some(now);
        }
        self.in_flight = self.in_flight.saturating_add(bytes);
        if self.sends.back().is_some_and(|s| s.at == now) {
            return;
        }
        if self.sends.len() >= MAX_SENDS {
            self.sends.pop_front();
        }
        self.sends.push_back(Sent {
            at: now,
            delivered: self.delivered,
            delivered_at: self.delivered_at.unwrap_or(now),
            first_sent_at: self.first_sent_at.unwrap_or(now),
            app_limited: self.app_limited_until != 0,
        });
    }

    /// One packet sent at `sent` acknowledged. `rtt_floor`: the
    /// connection's minimum RTT from ACK frames (quinn's), below which no
    /// sample of this packet's round trip is believed: quinn also reports
    /// packets as acknowledged when it infers it (handshake packets once
    /// the handshake is confirmed), and their `now - sent` can be a
    /// fraction of a millisecond on a 30 ms path, which would shrink the
    /// estimated bandwidth-delay product, and the window, to nothing.
    pub fn acked(&mut self, now: Instant, sent: Instant, bytes: u64, rtt_floor: Duration) {
        self.delivered += bytes;
        self.delivered_at = Some(now);
        self.acked_in_batch += bytes;
        if self.app_limited_until != 0 && self.delivered > self.app_limited_until {
            self.app_limited_until = 0;
        }
        let rtt = now.saturating_duration_since(sent).max(rtt_floor);
        self.rtt_in_batch = Some(self.rtt_in_batch.map_or(rtt, |r| r.min(rtt)));
        if self.newest_acked.is_some_and(|p| p.at >= sent) {
            return;
        }
        if let Ok(i) = self.sends.binary_search_by(|s| s.at.cmp(&sent)) {
            let p = self.sends[i];
            self.newest_acked = Some(p);
            // Sends before it are acknowledged or lost by now (a packet
            // acknowledged later still counts as delivered, just without
            // a sample of its own).
            self.sends.drain(..=i);
        }
    }

    /// End of one ACK frame's acknowledgements: take the rate sample and
    /// update the model.
    pub fn end_acks(&mut self, now: Instant, in_flight: u64, app_limited: bool) {
        let mode_before = self.mode;
        let acked = std::mem::take(&mut self.acked_in_batch);
        let rtt = self.rtt_in_batch.take();
        let newest = self.newest_acked.take();
        self.in_flight = in_flight;
        if app_limited {
            self.app_limited_until = (self.delivered + in_flight).max(1);
        }
        let mut round_start = false;
        let mut sample = None;
        if let Some(p) = newest {
            if p.delivered >= self.next_round_delivered {
                self.next_round_delivered = self.delivered;
                self.round += 1;
                round_start = true;
            }
            self.first_sent_at = Some(p.at);
            let send_elapsed = p.at.saturating_duration_since(p.first_sent_at);
            let ack_elapsed = now.saturating_duration_since(p.delivered_at);
            let interval = send_elapsed.max(ack_elapsed);
            // Shorter than a round trip is an ACK burst, not a rate.
            let floor = self.min_rtt.or(rtt).unwrap_or_default();
            if !interval.is_zero() && interval >= floor {
                let rate = ((self.delivered - p.delivered) as f64 / interval.as_secs_f64()) as u64;
                sample = Some(RateSample {
                    rate,
                    interval,
                    app_limited: p.app_limited,
                });
            }
        }
        self.update_min_rtt(now, rtt);
        if let Some(s) = sample {
            self.last_sample = Some(s);
            if !s.app_limited || s.rate >= self.max_bw.get() {
                self.max_bw.update(self.round, s.rate);
            }
        }
        self.update_extra_acked(now, acked);
        if self.mode == Mode::ProbeBw {
            self.advance_cycle(now, in_flight + acked, in_flight);
        }
        // Only a round that used its window says the pipe is full: the
        // handshake and keep-alives of an idle connection deliver a
        // packet a round, and quinn does not always call them
        // application-limited.
        let full_flight = newest.is_some_and(|p| self.delivered - p.delivered >= self.cwnd / 4);
        if round_start && full_flight && !self.filled_pipe && !sample.is_some_and(|s| s.app_limited)
        {
            self.check_full_pipe();
        }
        if self.mode == Mode::Startup && self.filled_pipe {
            self.mode = Mode::Drain;
        }
        if self.mode == Mode::Drain && self.bdp(1.0).is_some_and(|b| in_flight <= b) {
            self.enter_probe_bw(now);
        }
        self.check_probe_rtt(now, in_flight, round_start);
        self.set_cwnd(acked);
        if self.mode != mode_before {
            tracing::debug!(
                mode = ?self.mode,
                was = ?mode_before,
                bandwidth_mbit = self.max_bw.get() * 8 / 1_000_000,
                min_rtt_ms = self.min_rtt.map(|r| r.as_secs_f64() * 1e3),
                cwnd = self.cwnd,
                in_flight,
                round = self.round,
                "bbr state"
            );
        }
    }

    fn update_min_rtt(&mut self, now: Instant, rtt: Option<Duration>) {
        let mut expired = self.min_rtt_at.is_some_and(|t| now > t + MIN_RTT_WINDOW);
        // A route change to a longer path: no sample comes near the old
        // minimum again. BBR v1 waits out its 10 s window at a window
        // sized for the old path (from 0.3 ms to 30 ms: 1 % of it); a
        // round trip this far above the minimum for a second and several
        // rounds is not a queue this sender built (its window is at most
        // ~3 × the product), so the minimum is measured again now.
        if let (Some(r), Some(m)) = (rtt, self.min_rtt) {
            if r > m * RTT_RISE && r > m + RTT_RISE_MIN {
                let (since, round) = *self.rtt_high_since.get_or_insert((now, self.round));
                if now >= since + RTT_RISE_TIME && self.round >= round + RTT_RISE_ROUNDS {
                    expired = true;
                    self.rtt_high_since = None;
                }
            } else {
                self.rtt_high_since = None;
            }
        }
        if let Some(r) = rtt {
            if self.min_rtt.is_none_or(|m| r <= m) || expired {
                self.min_rtt = Some(r);
                self.min_rtt_at = Some(now);
            }
        }
        if expired && self.mode != Mode::ProbeRtt {
            self.mode = Mode::ProbeRtt;
            self.prior_cwnd = self.cwnd;
            self.probe_rtt_until = None;
        }
    }

    fn update_extra_acked(&mut self, now: Instant, acked: u64) {
        let bw = self.max_bw.get();
        let (start, mut bytes) = self.ack_epoch.unwrap_or((now, 0));
        let expected = (bw as f64 * now.saturating_duration_since(start).as_secs_f64()) as u64;
        if bytes <= expected || bw == 0 {
            self.ack_epoch = Some((now, acked));
            return;
        }
        bytes += acked;
        self.ack_epoch = Some((start, bytes));
        let extra = (bytes - expected).min(self.cwnd);
        self.extra_acked.update(self.round, extra);
    }

    fn check_full_pipe(&mut self) {
        let bw = self.max_bw.get();
        if bw as f64 >= self.full_bw as f64 * FULL_BW_GROWTH {
            self.full_bw = bw;
            self.full_bw_rounds = 0;
            return;
        }
        self.full_bw_rounds += 1;
        if self.full_bw_rounds >= FULL_BW_ROUNDS {
            self.filled_pipe = true;
        }
    }

    fn enter_probe_bw(&mut self, now: Instant) {
        self.mode = Mode::ProbeBw;
        // Start in a steady phase; which one spreads flows' probes apart.
        self.cycle = 2 + (self.round % 6) as usize;
        self.cycle_at = Some(now);
    }

    fn advance_cycle(&mut self, now: Instant, prior_in_flight: u64, in_flight: u64) {
        let Some(min_rtt) = self.min_rtt else { return };
        let gain = CYCLE[self.cycle];
        let mut next = self.cycle_at.is_none_or(|t| now > t + min_rtt);
        // A probe lasts until the window it asked for was used.
        if gain > 1.0 && self.bdp(gain).is_some_and(|w| prior_in_flight < w) {
            next = false;
        }
        // A drain ends as soon as the queue it made is gone.
        if gain < 1.0 && self.bdp(1.0).is_some_and(|b| in_flight <= b) {
            next = true;
        }
        if next {
            self.cycle = (self.cycle + 1) % CYCLE.len();
            self.cycle_at = Some(now);
        }
    }

    fn check_probe_rtt(&mut self, now: Instant, in_flight: u64, round_start: bool) {
        if self.mode != Mode::ProbeRtt {
            return;
        }
        match self.probe_rtt_until {
            None => {
                if in_flight <= self.min_window() + self.mtu {
                    self.probe_rtt_until = Some(now + PROBE_RTT_TIME);
                    self.probe_rtt_round_done = false;
                    self.next_round_delivered = self.delivered;
                }
            }
            Some(until) => {
                self.probe_rtt_round_done |= round_start;
                if self.probe_rtt_round_done && now >= until {
                    self.min_rtt_at = Some(now);
                    self.cwnd = self.cwnd.max(self.prior_cwnd);
                    if self.filled_pipe {
                        self.enter_probe_bw(now);
                    } else {
                        self.mode = Mode::Startup;
                    }
                }
            }
        }
    }

    fn set_cwnd(&mut self, acked: u64) {
        if self.mode == Mode::ProbeRtt {
            return;
        }
        let target = self.target();
        if self.filled_pipe {
            self.cwnd = (self.cwnd + acked).min(target);
        } else if self.cwnd < target || self.delivered < self.initial_window {
            self.cwnd += acked;
        }
        self.cwnd = self.cwnd.max(self.min_window());
    }

    pub fn cwnd(&self) -> u64 {
        if self.mode == Mode::ProbeRtt {
            return self.min_window();
        }
        self.cwnd
    }
}

impl Controller for Bbr {
    fn on_sent(&mut self, now: Instant, bytes: u64, _last_packet_number: u64) {
        self.sent(now, bytes);
    }

    fn on_ack(
        &mut self,
        now: Instant,
        sent: Instant,
        bytes: u64,
        _app_limited: bool,
        rtt: &quinn_proto::RttEstimator,
    ) {
        self.smoothed_rtt(rtt.get());
        self.acked(now, sent, bytes, rtt.min());
    }

    fn on_end_acks(
        &mut self,
        now: Instant,
        in_flight: u64,
        app_limited: bool,
        _largest_packet_num_acked: Option<u64>,
    ) {
        self.end_acks(now, in_flight, app_limited);
    }

    fn on_congestion_event(
        &mut self,
        _now: Instant,
        _sent: Instant,
        _is_persistent_congestion: bool,
        _lost_bytes: u64,
    ) {
        // Random loss is not congestion (module docs); a path event is
        // the wrapper's to handle.
    }

    fn on_mtu_update(&mut self, new_mtu: u16) {
        self.mtu = u64::from(new_mtu);
        self.cwnd = self.cwnd.max(self.min_window());
    }

    fn window(&self) -> u64 {
        self.cwnd()
    }

    fn metrics(&self) -> ControllerMetrics {
        let mut m = ControllerMetrics::default();
        m.congestion_window = self.cwnd();
        // quinn paces from the window; the rate BBR would pace at with
        // gain 1 is its bandwidth estimate, which the metrics read.
        m.pacing_rate = Some(self.max_bw.get().saturating_mul(8));
        m
    }

    fn clone_box(&self) -> Box<dyn Controller> {
        Box::new(self.clone())
    }

    fn initial_window(&self) -> u64 {
        self.initial_window
    }

    fn into_any(self: Box<Self>) -> Box<dyn Any> {
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    const MTU: u16 = 1200;
    const PKT: u64 = MTU as u64;
    const STEP: Duration = Duration::from_micros(50);

    /// A bottleneck link on virtual time: a drop-tail queue served at
    /// `rate`, a fixed one-way delay each way, random loss on the way
    /// out, and a receiver that acknowledges every `ack_every` packets
    /// (or 25 ms after the first unacknowledged one, as QUIC's
    /// max_ack_delay). The sender batches up to 10 packets per transmit
    /// and paces like quinn (1.25 × window per smoothed RTT).
    struct Link {
        rate: f64,
        one_way: Duration,
        queue_limit: u64,
        loss: f64,
        ack_every: usize,
    }

    impl Link {
        fn wan(mbit: f64) -> Self {
            let rate = mbit * 1e6 / 8.0;
            Self {
                rate,
                one_way: Duration::from_millis(15),
                queue_limit: (rate * 0.030) as u64,
                loss: 0.0,
                ack_every: 2,
            }
        }

        fn bdp(&self) -> f64 {
            self.rate * 2.0 * self.one_way.as_secs_f64()
        }
    }

    #[derive(Default)]
    struct Run {
        /// Bytes delivered to the receiver after `measure_from`.
        goodput: f64,
        mean_queue: f64,
        modes: Vec<Mode>,
    }

    /// xorshift64*: reproducible loss without a dependency.
    struct Rng(u64);
    impl Rng {
        fn chance(&mut self, p: f64) -> bool {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            let x = self.0.wrapping_mul(0x2545_F491_4F6C_DD1D);
            ((x >> 11) as f64 / (1u64 << 53) as f64) < p
        }
    }

    fn simulate(bbr: &mut Bbr, link: &Link, secs: f64, measure_from: f64) -> Run {
        simulate_from(Instant::now(), bbr, link, secs, measure_from)
    }

    fn simulate_from(t0: Instant, bbr: &mut Bbr, link: &Link, secs: f64, measure_from: f64) -> Run {
        let end = t0 + Duration::from_secs_f64(secs);
        let measure_from = t0 + Duration::from_secs_f64(measure_from);
        let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
        let mut now = t0;
        let mut next_pn = 0u64;
        let mut outstanding: BTreeMap<u64, Instant> = BTreeMap::new();
        let mut in_flight = 0u64;
        let mut queue: VecDeque<(u64, u64)> = VecDeque::new(); // (pn, bytes)
        let mut queued = 0u64;
        let mut credit = 0.0f64;
        let mut wire: VecDeque<(Instant, u64)> = VecDeque::new();
        let mut unacked: Vec<u64> = Vec::new();
        let mut first_unacked: Option<Instant> = None;
        let mut acks: VecDeque<(Instant, Vec<u64>)> = VecDeque::new();
        let mut tokens = 0.0f64;
        let mut srtt = Duration::from_millis(100);
        let mut run = Run::default();
        let (mut queue_sum, mut samples) = (0.0f64, 0.0f64);
        while now < end {
            // Sender: transmits of up to 10 packets, window and pacer
            // permitting.
            let w = bbr.cwnd();
            tokens = (tokens + 1.25 * w as f64 / srtt.as_secs_f64() * STEP.as_secs_f64())
                .min((w as f64 * 0.002 / srtt.as_secs_f64()).max(10.0 * PKT as f64));
            loop {
                let mut batch = 0;
                while batch < 10 && in_flight + PKT <= bbr.cwnd() && tokens >= PKT as f64 {
                    tokens -= PKT as f64;
                    in_flight += PKT;
                    outstanding.insert(next_pn, now);
                    if !rng.chance(link.loss) && queued + PKT <= link.queue_limit {
                        queue.push_back((next_pn, PKT));
                        queued += PKT;
                    }
                    next_pn += 1;
                    batch += 1;
                }
                if batch == 0 {
                    break;
                }
                bbr.sent(now, batch * PKT);
            }
            // Bottleneck.
            credit += link.rate * STEP.as_secs_f64();
            while let Some(&(pn, bytes)) = queue.front() {
                if credit < bytes as f64 {
                    break;
                }
                credit -= bytes as f64;
                queued -= bytes;
                queue.pop_front();
                wire.push_back((now + link.one_way, pn));
            }
            if queue.is_empty() {
                credit = credit.min(PKT as f64);
            }
            // Receiver.
            while wire.front().is_some_and(|(t, _)| *t <= now) {
                let (_, pn) = wire.pop_front().unwrap();
                if now >= measure_from {
                    run.goodput += PKT as f64;
                }
                unacked.push(pn);
                first_unacked.get_or_insert(now);
            }
            if unacked.len() >= link.ack_every
                || first_unacked.is_some_and(|t| now >= t + Duration::from_millis(25))
            {
                acks.push_back((now + link.one_way, std::mem::take(&mut unacked)));
                first_unacked = None;
            }
            // Sender: acknowledgements, then loss detection.
            while acks.front().is_some_and(|(t, _)| *t <= now) {
                let (_, pns) = acks.pop_front().unwrap();
                let Some(&largest) = pns.iter().max() else {
                    continue;
                };
                for pn in pns {
                    if let Some(sent) = outstanding.remove(&pn) {
                        in_flight -= PKT;
                        let rtt = now - sent;
                        srtt = (srtt * 7 + rtt) / 8;
                        bbr.smoothed_rtt(srtt);
                        bbr.acked(now, sent, PKT, Duration::ZERO);
                    }
                }
                let lost: Vec<u64> = outstanding
                    .range(..largest.saturating_sub(3))
                    .map(|(pn, _)| *pn)
                    .collect();
                for pn in lost {
                    outstanding.remove(&pn);
                    in_flight -= PKT;
                }
                bbr.end_acks(now, in_flight, false);
            }
            // Tail losses: nothing later was acknowledged.
            let lost: Vec<u64> = outstanding
                .iter()
                .take_while(|(_, t)| now > **t + srtt * 3)
                .map(|(pn, _)| *pn)
                .collect();
            for pn in lost {
                outstanding.remove(&pn);
                in_flight -= PKT;
            }
            if run.modes.last() != Some(&bbr.mode()) {
                run.modes.push(bbr.mode());
            }
            if now >= measure_from {
                queue_sum += queued as f64;
                samples += 1.0;
            }
            now += STEP;
        }
        run.goodput /= (end - measure_from).as_secs_f64();
        run.mean_queue = queue_sum / samples.max(1.0);
        run
    }

    fn bbr() -> Bbr {
        Bbr::new(crate::congestion::DEFAULT_INITIAL_WINDOW, MTU)
    }

    /// The run delivered more than `share` of `rate` (bytes/s).
    fn fills(r: &Run, rate: f64, share: f64, what: &str) {
        assert!(
            r.goodput > share * rate,
            "{what}: {:.0} of {:.0} B/s ({:.2})",
            r.goodput,
            rate,
            r.goodput / rate
        );
    }

    #[test]
    fn it_fills_a_clean_path_without_a_standing_queue() {
        let link = Link::wan(100.0);
        let mut b = bbr();
        let r = simulate(&mut b, &link, 8.0, 3.0);
        fills(&r, link.rate, 0.9, "");
        let bw = b.bandwidth() as f64;
        assert!((bw / link.rate - 1.0).abs() < 0.15, "estimate {bw}");
        let rtt = b.min_rtt().unwrap();
        assert!(rtt >= Duration::from_millis(30) && rtt < Duration::from_millis(33));
        assert!(r.mean_queue < 0.5 * link.bdp(), "queue {}", r.mean_queue);
        assert_eq!(
            &r.modes[..3],
            &[Mode::Startup, Mode::Drain, Mode::ProbeBw],
            "{:?}",
            r.modes
        );
    }

    /// Loopback on a busy host: the smoothed RTT (scheduling delays) far
    /// above the minimum. The window is then what quinn's pacer, which
    /// divides by the smoothed RTT, turns into gain × the bandwidth
    /// estimate; where the two RTTs agree (the WAN tests above, which feed
    /// quinn's smoothed RTT too) it is the bandwidth-delay product's.
    #[test]
    fn a_smoothed_rtt_far_above_the_minimum_still_paces_at_the_estimate() {
        let link = Link::wan(100.0);
        let mut b = bbr();
        simulate(&mut b, &link, 6.0, 3.0);
        assert_eq!(b.mode(), Mode::ProbeBw);
        let bw = b.bandwidth() as f64;
        let min_rtt = b.min_rtt().unwrap();
        b.smoothed_rtt(min_rtt);
        let at_min = b.target() as f64;
        let bdp = b.gain() * bw * min_rtt.as_secs_f64();
        assert!(at_min < 1.5 * bdp, "{at_min} for a product of {bdp}");
        b.smoothed_rtt(min_rtt * 10);
        let paced = PACER_GAIN * b.target() as f64 / (min_rtt * 10).as_secs_f64();
        let want = b.gain() * bw;
        assert!(
            (paced / want - 1.0).abs() < 0.02,
            "paces at {paced:.0} B/s, wants {want:.0}"
        );
    }

    #[test]
    fn sparse_acknowledgements_still_measure_the_rate() {
        // A peer that is itself window-limited sends its ACKs with its
        // data: few per round trip. quinn's BBR collapses here.
        for every in [20, 100] {
            let link = Link {
                ack_every: every,
                ..Link::wan(100.0)
            };
            let mut b = bbr();
            let r = simulate(&mut b, &link, 8.0, 3.0);
            fills(&r, link.rate, 0.85, &format!("ack every {every}"));
        }
    }

    #[test]
    fn random_loss_is_not_congestion() {
        for loss in [0.01, 0.05] {
            let link = Link {
                loss,
                ..Link::wan(100.0)
            };
            let mut b = bbr();
            let r = simulate(&mut b, &link, 8.0, 3.0);
            fills(&r, (1.0 - loss) * link.rate, 0.8, &format!("loss {loss}"));
        }
    }

    #[test]
    fn a_longer_route_is_found_by_probe_rtt() {
        // The route changes from 30 to 40 ms: no sample reaches the old
        // minimum again, so after 10 s ProbeRTT measures the new one.
        let t0 = Instant::now();
        let mut b = bbr();
        simulate_from(t0, &mut b, &Link::wan(50.0), 5.0, 4.0);
        let longer = Link {
            one_way: Duration::from_millis(20),
            ..Link::wan(50.0)
        };
        let r = simulate_from(t0 + Duration::from_secs(5), &mut b, &longer, 20.0, 15.0);
        let probes = r.modes.iter().filter(|m| **m == Mode::ProbeRtt).count();
        assert!((1..=2).contains(&probes), "{:?}", r.modes);
        let rtt = b.min_rtt().unwrap();
        assert!(rtt >= Duration::from_millis(40) && rtt < Duration::from_millis(43));
        fills(&r, longer.rate, 0.85, "");
    }

    #[test]
    fn an_idle_connection_does_not_end_startup() {
        // A connection that carried only its handshake and keep-alives
        // for 5 s (which quinn may not call application-limited), then
        // a bulk transfer: it must still find the path's bandwidth.
        let t0 = Instant::now();
        let mut b = bbr();
        let ms = Duration::from_millis;
        for i in 0..20u32 {
            let t = t0 + ms(250) * i;
            b.sent(t, 60);
            b.acked(t + ms(55), t, 60, Duration::ZERO);
            b.end_acks(t + ms(55), 0, false);
        }
        assert_eq!(b.mode(), Mode::Startup);
        let link = Link::wan(100.0);
        let r = simulate_from(t0 + Duration::from_secs(5), &mut b, &link, 4.0, 2.0);
        fills(&r, link.rate, 0.9, "");
    }

    #[test]
    fn a_much_longer_route_is_found_within_seconds() {
        // Connected over a 0.3 ms path, then routed over 30 ms (the rig
        // saw this; so does a real failover to a far path): waiting out
        // the 10 s minimum-RTT window would move ~1 % of the path.
        let t0 = Instant::now();
        let mut b = bbr();
        let near = Link {
            one_way: Duration::from_micros(150),
            ..Link::wan(100.0)
        };
        simulate_from(t0, &mut b, &near, 2.0, 1.0);
        let far = Link::wan(100.0);
        let r = simulate_from(t0 + Duration::from_secs(2), &mut b, &far, 6.0, 3.0);
        fills(&r, far.rate, 0.85, "");
        let rtt = b.min_rtt().unwrap();
        assert!(rtt >= Duration::from_millis(30) && rtt < Duration::from_millis(33));
    }

    #[test]
    fn a_sample_spans_the_flight_not_the_gap_between_acks() {
        let t0 = Instant::now();
        let mut b = bbr();
        let ms = Duration::from_millis;
        // 10 packets sent 1 ms apart, all acknowledged by one ACK 30 ms
        // after the last: 12,000 bytes over 39 ms of delivery.
        for i in 0..10 {
            b.sent(t0 + ms(i), PKT);
        }
        let now = t0 + ms(39);
        for i in 0..10 {
            b.acked(now, t0 + ms(i), PKT, Duration::ZERO);
        }
        b.end_acks(now, 0, false);
        let s = b.last_sample().unwrap();
        assert_eq!(s.interval, ms(39));
        assert_eq!(s.rate, (10.0 * PKT as f64 / 0.039) as u64);
        assert!(!s.app_limited);
        assert_eq!(b.min_rtt(), Some(ms(30)));
    }

    #[test]
    fn application_limited_samples_do_not_lower_the_estimate() {
        let link = Link::wan(100.0);
        let mut b = bbr();
        simulate(&mut b, &link, 4.0, 3.0);
        let bw = b.bandwidth();
        // Then a trickle, application-limited: the estimate stays.
        let mut now = Instant::now() + Duration::from_secs(10);
        for _ in 0..50 {
            b.end_acks(now, 0, true);
            b.sent(now, PKT);
            now += Duration::from_millis(31);
            b.acked(now, now - Duration::from_millis(31), PKT, Duration::ZERO);
            b.end_acks(now, 0, true);
            now += Duration::from_millis(100);
        }
        assert!(b.last_sample().unwrap().app_limited);
        assert!(b.bandwidth() >= bw / 2, "{} from {bw}", b.bandwidth());
    }

    #[test]
    fn an_inferred_acknowledgement_does_not_shrink_the_round_trip() {
        // quinn acknowledges handshake packets it infers were received:
        // `now - sent` of 0.1 ms on a 30 ms path. Its own minimum RTT
        // (from ACK frames) is the floor.
        let t0 = Instant::now();
        let ms = Duration::from_millis;
        let mut b = bbr();
        b.sent(t0, PKT);
        b.acked(t0 + ms(30), t0, PKT, ms(30));
        b.end_acks(t0 + ms(30), 0, false);
        let t1 = t0 + ms(40);
        b.sent(t1, PKT);
        b.acked(t1 + Duration::from_micros(100), t1, PKT, ms(30));
        b.end_acks(t1 + Duration::from_micros(100), 0, false);
        assert_eq!(b.min_rtt(), Some(ms(30)));
    }

    #[test]
    fn memory_for_rate_samples_is_bounded() {
        let t0 = Instant::now();
        let mut b = bbr();
        for i in 0..(MAX_SENDS as u64 + 100) {
            b.sent(t0 + Duration::from_micros(i), PKT);
        }
        assert_eq!(b.sends.len(), MAX_SENDS);
    }
}
