//! Store values decoded once, when they arrive, and indexed for the
//! view's computation.

use std::collections::{BTreeMap, BTreeSet};

use fedmesh_catalog::mcs;
use fedmesh_catalog::ClusterName;
use fedmesh_wire::ServiceName;

use super::ControllerMetrics;
use crate::keys::Key;
use crate::records::{ClusterInfo, LeftRecord, ServiceRecord, ValidInfo};
use crate::store::Delta;

// ---- watching and computing ----

/// A store value after decoding: usable, or why not.
pub(super) enum Decoded {
    Info(Box<ValidInfo>),
    Export(mcs::Export),
    Left(ClusterName),
    Rejected(String),
}

pub(super) fn decode(k: &str, v: &[u8], metrics: &ControllerMetrics) -> Decoded {
    let key = match Key::parse(k) {
        Ok(key) => key,
        Err(e) => {
            metrics.reject("bad_key");
            tracing::warn!(error = %e, "store key refused");
            return Decoded::Rejected(e.to_string());
        }
    };
    let r = match &key {
        Key::Info(_) => ClusterInfo::decode(&key, v).map(|i| Decoded::Info(Box::new(i))),
        Key::Service(..) => ServiceRecord::decode(&key, v).map(Decoded::Export),
        Key::Left(c) => LeftRecord::decode(v).map(|_| Decoded::Left(c.clone())),
    };
    r.unwrap_or_else(|e| {
        metrics.reject("bad_record");
        tracing::warn!(key = k, error = %e, "store value refused");
        Decoded::Rejected(format!("{k}: {e}"))
    })
}

/// What the controller knows from the store, indexed for the computation:
/// values are decoded once, when they arrive, and every change notes what
/// it touched, so a recompute redoes only that.
#[derive(Default)]
pub(super) struct Cache {
    /// Where each key's value went (to undo it when the key changes); the
    /// values themselves live once, in the indexes below.
    pub(super) by_key: BTreeMap<String, Indexed>,
    pub(super) infos: BTreeMap<ClusterName, ValidInfo>,
    pub(super) exports: BTreeMap<ServiceName, BTreeMap<ClusterName, mcs::Export>>,
    pub(super) export_counts: BTreeMap<ClusterName, usize>,
    pub(super) rejected: BTreeMap<String, String>,
    /// Services whose exports changed since the last computation.
    pub(super) dirty: BTreeSet<ServiceName>,
    /// Something beyond single services changed (a cluster's info, a
    /// re-list, local services): the next computation is a full one.
    pub(super) structural: bool,
    /// Clusters that left on purpose (their `left` marker is present).
    pub(super) leaving: BTreeSet<ClusterName>,
}

/// Which index a key's value is in.
pub(super) enum Indexed {
    Info(ClusterName),
    Export(ServiceName, ClusterName),
    Left(ClusterName),
    Rejected,
}

impl Cache {
    pub(super) fn forget(&mut self, key: &str) {
        match self.by_key.remove(key) {
            Some(Indexed::Info(cluster)) => {
                self.infos.remove(&cluster);
                self.structural = true;
            }
            Some(Indexed::Export(service, cluster)) => {
                if let Some(m) = self.exports.get_mut(&service) {
                    m.remove(&cluster);
                    if m.is_empty() {
                        self.exports.remove(&service);
                    }
                }
                if let Some(n) = self.export_counts.get_mut(&cluster) {
                    *n = n.saturating_sub(1);
                }
                self.dirty.insert(service);
            }
            Some(Indexed::Left(cluster)) => {
                self.leaving.remove(&cluster);
            }
            Some(Indexed::Rejected) => {
                self.rejected.remove(key);
            }
            None => {}
        }
    }

    pub(super) fn learn(&mut self, key: String, d: Decoded) {
        let marker = match d {
            Decoded::Info(i) => {
                self.structural = true;
                let cluster = i.cluster.clone();
                self.infos.insert(cluster.clone(), *i);
                Indexed::Info(cluster)
            }
            Decoded::Export(e) => {
                let (service, cluster) = (e.service.clone(), e.cluster.clone());
                *self.export_counts.entry(cluster.clone()).or_default() += 1;
                self.dirty.insert(service.clone());
                self.exports
                    .entry(service.clone())
                    .or_default()
                    .insert(cluster.clone(), e);
                Indexed::Export(service, cluster)
            }
            Decoded::Left(cluster) => {
                self.leaving.insert(cluster.clone());
                Indexed::Left(cluster)
            }
            Decoded::Rejected(why) => {
                self.rejected.insert(key.clone(), why);
                Indexed::Rejected
            }
        };
        self.by_key.insert(key, marker);
    }

    pub(super) fn apply(&mut self, delta: Delta, metrics: &ControllerMetrics) {
        if delta.replaced {
            *self = Cache {
                structural: true,
                ..Cache::default()
            };
        }
        for (k, v) in delta.changes {
            self.forget(&k);
            if let Some(v) = v {
                let d = decode(&k, &v, metrics);
                self.learn(k, d);
            }
        }
    }
}
