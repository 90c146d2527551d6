//! Retry budgets: retries may add at most a fixed share to the requests
//! seen in a sliding window, plus a small floor so a quiet service can
//! still retry. This is what stops a retry storm: when everything fails,
//! load grows by the budget's share, not by the attempt count.

use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct BudgetConfig {
    /// Retries allowed per original request, as a percentage.
    pub percent: u32,
    /// Retries always allowed per second, whatever the request rate.
    pub min_per_second: u32,
    /// How far back requests and retries are counted.
    #[serde(with = "humantime_serde")]
    pub window: Duration,
}

impl Default for BudgetConfig {
    fn default() -> Self {
        Self {
            percent: 20,
            min_per_second: 10,
            window: Duration::from_secs(10),
        }
    }
}

impl BudgetConfig {
    pub fn problems(&self, what: &str) -> Vec<String> {
        let mut v = Vec::new();
        if self.percent > 1000 {
            v.push(format!("{what}.percent must be within 0..=1000"));
        }
        if self.window < Duration::from_secs(1) || self.window > Duration::from_secs(600) {
            v.push(format!("{what}.window must be within 1s..=10m"));
        }
        v
    }
}

const SLOTS: usize = 10;

/// Requests and retries counted in `SLOTS` buckets over the window.
#[derive(Debug, Clone)]
pub struct RetryBudget {
    config: BudgetConfig,
    slot_len: Duration,
    start: Instant,
    /// Index of the newest bucket, in slot lengths since `start`.
    head: u64,
    requests: [u64; SLOTS],
    retries: [u64; SLOTS],
}

impl RetryBudget {
    pub fn new(config: BudgetConfig, now: Instant) -> Self {
        let slot_len = (config.window / SLOTS as u32).max(Duration::from_millis(1));
        Self {
            config,
            slot_len,
            start: now,
            head: 0,
            requests: [0; SLOTS],
            retries: [0; SLOTS],
        }
    }

    fn advance(&mut self, now: Instant) {
        let idx = (now.saturating_duration_since(self.start).as_nanos()
            / self.slot_len.as_nanos().max(1)) as u64;
        if idx <= self.head {
            return;
        }
        let clear = (idx - self.head).min(SLOTS as u64);
        for i in 1..=clear {
            let s = ((self.head + i) % SLOTS as u64) as usize;
            self.requests[s] = 0;
            self.retries[s] = 0;
        }
        self.head = idx;
    }

    fn slot(&self) -> usize {
        (self.head % SLOTS as u64) as usize
    }

    /// An original request (not a retry) started.
    pub fn request(&mut self, now: Instant) {
        self.advance(now);
        let s = self.slot();
        self.requests[s] += 1;
    }

    /// Whether one more retry fits; if so it is counted.
    pub fn try_retry(&mut self, now: Instant) -> bool {
        self.advance(now);
        let requests: u64 = self.requests.iter().sum();
        let retries: u64 = self.retries.iter().sum();
        let window_secs = self.config.window.as_secs_f64();
        let allowed = requests as f64 * f64::from(self.config.percent) / 100.0
            + f64::from(self.config.min_per_second) * window_secs;
        if (retries as f64) < allowed {
            let s = self.slot();
            self.retries[s] += 1;
            true
        } else {
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_retry_storm_is_held_to_the_budget() {
        let t0 = Instant::now();
        let cfg = BudgetConfig {
            percent: 20,
            min_per_second: 1,
            window: Duration::from_secs(10),
        };
        let mut b = RetryBudget::new(cfg, t0);
        // 1,000 requests in one second, every one wants 3 retries.
        let mut granted = 0;
        for i in 0..1000u32 {
            let now = t0 + Duration::from_millis(u64::from(i));
            b.request(now);
            for _ in 0..3 {
                if b.try_retry(now) {
                    granted += 1;
                }
            }
        }
        // 20% of 1,000 plus the floor of 1/s over 10 s.
        assert!((200..=211).contains(&granted), "{granted}");
    }

    #[test]
    fn the_floor_lets_a_quiet_service_retry_and_the_window_forgets() {
        let t0 = Instant::now();
        let cfg = BudgetConfig {
            percent: 0,
            min_per_second: 1,
            window: Duration::from_secs(10),
        };
        let mut b = RetryBudget::new(cfg, t0);
        let granted = (0..50).filter(|_| b.try_retry(t0)).count();
        assert_eq!(granted, 10);
        assert!(!b.try_retry(t0 + Duration::from_secs(5)));
        // A whole window later the old retries no longer count.
        assert!(b.try_retry(t0 + Duration::from_secs(11)));
    }
}
