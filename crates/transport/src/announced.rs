//! Faults someone announced (a failover drill breaking a cluster on
//! purpose). What they cause (a peer gone silent, a stream cut, an
//! ejection) is expected: the proxy logs it at debug instead of warn, so
//! a drill's logs show what is wrong besides the fault, and counts it as
//! usual, so its report can say how much the fault cost.

use std::collections::BTreeSet;
use std::sync::{Arc, RwLock};

/// The clusters under an announced fault, shared by a proxy's tasks.
#[derive(Debug, Clone, Default)]
pub struct Announced(Arc<RwLock<BTreeSet<String>>>);

impl Announced {
    /// Marks `cluster` as broken on purpose (`on`) or repaired.
    pub fn set(&self, cluster: &str, on: bool) {
        let mut g = match self.0.write() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        };
        if on {
            g.insert(cluster.to_owned());
        } else {
            g.remove(cluster);
        }
    }

    /// Whether trouble with `peer`, seen from a proxy of cluster `local`,
    /// is expected: the peer is the one broken, or this proxy's own
    /// cluster is (then every peer looks gone).
    pub fn expects(&self, local: &str, peer: &str) -> bool {
        let g = match self.0.read() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        };
        !g.is_empty() && (g.contains(peer) || g.contains(local))
    }
}

/// `warn!` unless the trouble was announced, then `debug!`.
#[macro_export]
macro_rules! warn_unless_announced {
    ($expected:expr, $($arg:tt)+) => {
        if $expected {
            ::tracing::debug!($($arg)+)
        } else {
            ::tracing::warn!($($arg)+)
        }
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_broken_peer_or_a_broken_self_is_expected() {
        let a = Announced::default();
        assert!(!a.expects("east", "west"));
        a.set("west", true);
        assert!(a.expects("east", "west"));
        assert!(!a.expects("east", "north"));
        // west's own proxies see everyone go.
        assert!(a.expects("west", "north"));
        a.set("west", false);
        assert!(!a.expects("west", "north"));
    }
}
