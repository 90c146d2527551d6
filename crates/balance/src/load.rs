//! Per-member load: an exponentially weighted moving average of latency
//! and the requests in flight. Cost = EWMA × (in-flight + 1), the measure
//! power-of-two-choices compares (as in Finagle's and Linkerd's balancers).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// How fast old latencies are forgotten.
const DECAY: Duration = Duration::from_secs(10);
/// What an unmeasured member is assumed to cost, so new members get tried.
const DEFAULT_RTT_NANOS: u64 = 1_000_000;

#[derive(Debug)]
struct Inner {
    /// EWMA in nanoseconds, as f64 bits.
    ewma: AtomicU64,
    /// When the EWMA was last updated, in nanos since `epoch`.
    stamp: AtomicU64,
    in_flight: AtomicU64,
    epoch: Instant,
}

/// Shared, lock-free load of one member. Clones share the same numbers.
#[derive(Debug, Clone)]
pub struct Load(Arc<Inner>);

impl Default for Load {
    fn default() -> Self {
        Self::new(Instant::now())
    }
}

impl Load {
    pub fn new(epoch: Instant) -> Self {
        Self(Arc::new(Inner {
            ewma: AtomicU64::new((DEFAULT_RTT_NANOS as f64).to_bits()),
            stamp: AtomicU64::new(0),
            in_flight: AtomicU64::new(0),
            epoch,
        }))
    }

    /// Cost for comparison: lower is better.
    pub fn cost(&self) -> f64 {
        let ewma = f64::from_bits(self.0.ewma.load(Ordering::Relaxed));
        ewma * (self.0.in_flight.load(Ordering::Relaxed) as f64 + 1.0)
    }

    pub fn in_flight(&self) -> u64 {
        self.0.in_flight.load(Ordering::Relaxed)
    }

    pub fn ewma(&self) -> Duration {
        Duration::from_nanos(f64::from_bits(self.0.ewma.load(Ordering::Relaxed)) as u64)
    }

    /// Counts a request in flight until the guard is dropped.
    pub fn start(&self) -> LoadGuard {
        self.0.in_flight.fetch_add(1, Ordering::Relaxed);
        LoadGuard { load: self.clone() }
    }

    /// Folds one latency sample in. Samples far apart weigh the new one
    /// more (time-based decay, not count-based).
    pub fn observe(&self, latency: Duration, now: Instant) {
        let t = now.saturating_duration_since(self.0.epoch).as_nanos() as u64;
        let last = self.0.stamp.swap(t, Ordering::Relaxed);
        let dt = t.saturating_sub(last) as f64;
        let w = (-dt / DECAY.as_nanos() as f64).exp();
        let sample = latency.as_nanos() as f64;
        // A lost update under a race costs one sample, never correctness.
        let old = f64::from_bits(self.0.ewma.load(Ordering::Relaxed));
        let new = old * w + sample * (1.0 - w);
        self.0.ewma.store(new.to_bits(), Ordering::Relaxed);
    }
}

/// A request in flight on a member.
#[derive(Debug)]
pub struct LoadGuard {
    load: Load,
}

impl Drop for LoadGuard {
    fn drop(&mut self) {
        self.load.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cost_follows_latency_and_in_flight() {
        let t0 = Instant::now();
        let fast = Load::new(t0);
        let slow = Load::new(t0);
        for i in 1..=20u64 {
            let now = t0 + Duration::from_secs(i);
            fast.observe(Duration::from_micros(100), now);
            slow.observe(Duration::from_millis(10), now);
        }
        assert!(fast.cost() < slow.cost());
        let guards: Vec<_> = (0..200).map(|_| fast.start()).collect();
        assert_eq!(fast.in_flight(), 200);
        assert!(fast.cost() > slow.cost(), "a busy fast member costs more");
        drop(guards);
        assert_eq!(fast.in_flight(), 0);
        let g = slow.start();
        assert_eq!(slow.in_flight(), 1);
        drop(g);
        assert_eq!(slow.in_flight(), 0);
    }
}
