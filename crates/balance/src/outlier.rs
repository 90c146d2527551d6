//! Passive outlier detection: consecutive failures eject a member (an
//! endpoint, or a whole remote cluster) for a growing interval.
//!
//! Ejection time is `base × n` for the n-th ejection in a row, capped at
//! `max`; the count decays by one for every `base` a member stays healthy
//! after it returns. A flapping member therefore stays out longer each time
//! and cannot oscillate faster than `base`. At most `max_ejected_percent`
//! of the members are out at once (but always one may be), so a bad
//! detector cannot empty a service.

use std::collections::HashMap;
use std::hash::Hash;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct OutlierConfig {
    /// Failures in a row that eject a member.
    pub consecutive_failures: u32,
    /// First ejection lasts this long; the n-th in a row n times as long.
    #[serde(with = "humantime_serde")]
    pub base_ejection: Duration,
    /// Upper bound of one ejection.
    #[serde(with = "humantime_serde")]
    pub max_ejection: Duration,
    /// Share of members that may be ejected at once (at least one may).
    pub max_ejected_percent: u8,
}

impl Default for OutlierConfig {
    fn default() -> Self {
        Self {
            consecutive_failures: 5,
            base_ejection: Duration::from_secs(2),
            max_ejection: Duration::from_secs(60),
            max_ejected_percent: 50,
        }
    }
}

impl OutlierConfig {
    pub fn problems(&self, what: &str) -> Vec<String> {
        let mut v = Vec::new();
        if self.consecutive_failures == 0 {
            v.push(format!("{what}.consecutive_failures must be at least 1"));
        }
        if self.base_ejection.is_zero() {
            v.push(format!("{what}.base_ejection must be more than zero"));
        }
        if self.max_ejection < self.base_ejection {
            v.push(format!(
                "{what}.max_ejection must be at least base_ejection"
            ));
        }
        if self.max_ejected_percent > 100 {
            v.push(format!("{what}.max_ejected_percent must be within 0..=100"));
        }
        v
    }
}

/// What a recorded result changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ejection {
    /// The member is now out for this long.
    Ejected(Duration),
    /// It would have been ejected, but the cap on ejected members says no.
    CapReached,
}

#[derive(Debug, Clone, Default)]
struct Member {
    consecutive: u32,
    ejected_until: Option<Instant>,
    /// Ejections in a row (decays while healthy).
    streak: u32,
    /// When the streak last changed (ejection or decay step).
    streak_at: Option<Instant>,
}

/// Outlier state for the members of one set (a service's endpoints, or
/// the clusters serving it).
#[derive(Debug, Clone)]
pub struct Outlier<K> {
    config: OutlierConfig,
    members: HashMap<K, Member>,
}

impl<K: Eq + Hash + Clone> Outlier<K> {
    pub fn new(config: OutlierConfig) -> Self {
        Self {
            config,
            members: HashMap::new(),
        }
    }

    /// Takes a new config, keeping what is known about every member.
    pub fn set_config(&mut self, config: OutlierConfig) {
        self.config = config;
    }

    /// Forgets members that are no longer in the set, and counts new ones
    /// (the ejection cap is a share of the set).
    pub fn retain(&mut self, members: &[K]) {
        self.members.retain(|k, _| members.contains(k));
        for k in members {
            self.members.entry(k.clone()).or_default();
        }
    }

    pub fn is_ejected(&self, key: &K, now: Instant) -> bool {
        self.members
            .get(key)
            .and_then(|m| m.ejected_until)
            .is_some_and(|t| now < t)
    }

    /// When `key` comes back, if it is out now.
    pub fn ejected_until(&self, key: &K, now: Instant) -> Option<Instant> {
        self.members
            .get(key)
            .and_then(|m| m.ejected_until)
            .filter(|t| now < *t)
    }

    fn ejected_count(&self, now: Instant) -> usize {
        self.members
            .values()
            .filter(|m| m.ejected_until.is_some_and(|t| now < t))
            .count()
    }

    /// A successful attempt on `key`.
    pub fn success(&mut self, key: &K, now: Instant) {
        let base = self.config.base_ejection;
        let m = self.members.entry(key.clone()).or_default();
        m.consecutive = 0;
        decay(m, base, now);
    }

    /// A failed attempt on `key`; returns what it changed.
    pub fn failure(&mut self, key: &K, now: Instant) -> Option<Ejection> {
        let cfg = self.config.clone();
        let ejected_now = self.ejected_count(now);
        let total = self.members.len().max(1);
        let m = self.members.entry(key.clone()).or_default();
        if m.ejected_until.is_some_and(|t| now < t) {
            // Attempts that were already under way when it went out.
            return None;
        }
        decay(m, cfg.base_ejection, now);
        m.consecutive = m.consecutive.saturating_add(1);
        if m.consecutive < cfg.consecutive_failures {
            return None;
        }
        let cap = (total * usize::from(cfg.max_ejected_percent) / 100).max(1);
        if ejected_now >= cap {
            return Some(Ejection::CapReached);
        }
        m.consecutive = 0;
        m.streak = m.streak.saturating_add(1);
        m.streak_at = Some(now);
        let d = cfg
            .base_ejection
            .saturating_mul(m.streak)
            .min(cfg.max_ejection);
        m.ejected_until = Some(now + d);
        Some(Ejection::Ejected(d))
    }
}

/// One streak step forgiven per `base` spent back in service.
fn decay(m: &mut Member, base: Duration, now: Instant) {
    if m.ejected_until.is_some_and(|t| now < t) {
        return;
    }
    let Some(since) = m.ejected_until.or(m.streak_at) else {
        return;
    };
    if m.streak == 0 {
        return;
    }
    let healthy = now.saturating_duration_since(since);
    let steps = (healthy.as_nanos() / base.as_nanos().max(1)) as u32;
    if steps > 0 {
        m.streak = m.streak.saturating_sub(steps);
        // Later steps count from here.
        m.ejected_until = None;
        m.streak_at = Some(since + base.saturating_mul(steps));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> OutlierConfig {
        OutlierConfig {
            consecutive_failures: 3,
            base_ejection: Duration::from_secs(1),
            max_ejection: Duration::from_secs(5),
            max_ejected_percent: 50,
        }
    }

    fn fail_n(
        o: &mut Outlier<&'static str>,
        k: &'static str,
        n: u32,
        now: Instant,
    ) -> Option<Ejection> {
        (0..n).map(|_| o.failure(&k, now)).last().flatten()
    }

    #[test]
    fn consecutive_failures_eject_and_a_success_resets_the_count() {
        let t0 = Instant::now();
        let mut o = Outlier::new(cfg());
        o.retain(&["a", "b"]);
        assert_eq!(fail_n(&mut o, "a", 2, t0), None);
        o.success(&"a", t0);
        assert_eq!(
            fail_n(&mut o, "a", 2, t0),
            None,
            "the success reset the count"
        );
        assert_eq!(
            o.failure(&"a", t0),
            Some(Ejection::Ejected(Duration::from_secs(1)))
        );
        assert!(o.is_ejected(&"a", t0));
        assert!(!o.is_ejected(&"a", t0 + Duration::from_secs(1)));
        assert!(!o.is_ejected(&"b", t0));
    }

    #[test]
    fn a_flapping_member_stays_out_longer_each_time_up_to_the_cap() {
        let mut now = Instant::now();
        let mut o = Outlier::new(cfg());
        o.retain(&["a", "b"]);
        let mut outs = Vec::new();
        for _ in 0..8 {
            match fail_n(&mut o, "a", 3, now) {
                Some(Ejection::Ejected(d)) => {
                    outs.push(d.as_secs());
                    // Comes back, fails again at once.
                    now += d;
                }
                other => panic!("expected an ejection, got {other:?}"),
            }
        }
        assert_eq!(outs, vec![1, 2, 3, 4, 5, 5, 5, 5]);
        // Flapping cannot be faster than base: every period out is >= 1 s.
    }

    #[test]
    fn the_streak_decays_while_healthy() {
        let mut now = Instant::now();
        let mut o = Outlier::new(cfg());
        o.retain(&["a", "b"]);
        for _ in 0..3 {
            let Some(Ejection::Ejected(d)) = fail_n(&mut o, "a", 3, now) else {
                panic!()
            };
            now += d;
        }
        // Streak 3. Healthy for 2 s forgives two steps: next ejection is 2 s.
        now += Duration::from_secs(2);
        o.success(&"a", now);
        assert_eq!(
            fail_n(&mut o, "a", 3, now),
            Some(Ejection::Ejected(Duration::from_secs(2)))
        );
        // Long healthy: back to base.
        now += Duration::from_secs(100);
        assert_eq!(
            fail_n(&mut o, "a", 3, now),
            Some(Ejection::Ejected(Duration::from_secs(1)))
        );
    }

    #[test]
    fn the_cap_keeps_some_members_in() {
        let now = Instant::now();
        let mut o = Outlier::new(cfg());
        o.retain(&["a", "b", "c", "d"]);
        assert!(matches!(
            fail_n(&mut o, "a", 3, now),
            Some(Ejection::Ejected(_))
        ));
        assert!(matches!(
            fail_n(&mut o, "b", 3, now),
            Some(Ejection::Ejected(_))
        ));
        assert_eq!(fail_n(&mut o, "c", 3, now), Some(Ejection::CapReached));
        assert!(!o.is_ejected(&"c", now));
        // With one member of two, the one may still go (at least one may).
        let mut two = Outlier::new(OutlierConfig {
            max_ejected_percent: 10,
            ..cfg()
        });
        two.retain(&["x", "y"]);
        assert!(matches!(
            fail_n(&mut two, "x", 3, now),
            Some(Ejection::Ejected(_))
        ));
        assert_eq!(fail_n(&mut two, "y", 3, now), Some(Ejection::CapReached));
    }

    #[test]
    fn failures_while_ejected_do_not_extend_it_and_removed_members_are_forgotten() {
        let now = Instant::now();
        let mut o = Outlier::new(cfg());
        o.retain(&["a", "b"]);
        fail_n(&mut o, "a", 3, now);
        let until = o.ejected_until(&"a", now);
        assert_eq!(fail_n(&mut o, "a", 10, now), None);
        assert_eq!(o.ejected_until(&"a", now), until);
        o.retain(&["b"]);
        assert!(!o.is_ejected(&"a", now));
    }

    #[test]
    fn bad_configs_are_named() {
        let bad = OutlierConfig {
            consecutive_failures: 0,
            base_ejection: Duration::ZERO,
            max_ejection: Duration::ZERO,
            max_ejected_percent: 101,
        };
        assert_eq!(bad.problems("outlier").len(), 3);
        assert!(OutlierConfig::default().problems("o").is_empty());
    }
}
