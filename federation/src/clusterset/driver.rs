//! Runs the [`Allocator`] against the store: reflects the address
//! records, plans on every change (and when a release or quarantine is
//! due), and carries out each action as one compare-and-set against the
//! record the plan saw.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use fedmesh_catalog::ClusterName;
use fedmesh_wire::ServiceName;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use super::{decode, ip_key, Action, Allocator, IpRecord, IpSettings, IPS_PREFIX};
use crate::store::{reflect, Store, StoreError};

/// What a controller knows of ClusterSet IPs: its view and write-back
/// read it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ClusterSetIps {
    /// Live addresses of every service (IPv4 first).
    pub assigned: BTreeMap<ServiceName, Vec<IpAddr>>,
    /// This cluster's services a configured family has no free address
    /// for, with that family's CIDR.
    pub exhausted: BTreeMap<ServiceName, Vec<String>>,
    /// False until the first look at the store.
    pub synced: bool,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Outcome {
    result: &'static str,
}

/// `fedmesh_clusterset_ip_*` metrics.
#[derive(Clone, Debug, Default)]
pub struct IpMetrics {
    /// Live addresses in the store (all clusters').
    allocated: Gauge,
    /// Compare-and-sets by result: `claimed`, `released`, `lost` (another
    /// controller changed the record first), `error`.
    writes: Family<Outcome, Counter>,
    /// This cluster's services that lack an address for want of one.
    exhausted: Gauge,
    /// Records under the prefix that do not parse (left untouched).
    unreadable: Gauge,
}

impl IpMetrics {
    pub fn register(&self, reg: &mut Registry) {
        reg.register(
            "fedmesh_clusterset_ips_allocated",
            "Live ClusterSet IPs in the federation store",
            self.allocated.clone(),
        );
        reg.register(
            "fedmesh_clusterset_ip_writes",
            "ClusterSet IP compare-and-sets by result",
            self.writes.clone(),
        );
        reg.register(
            "fedmesh_clusterset_ips_exhausted",
            "This cluster's exported services without a ClusterSet IP for want of a free address",
            self.exhausted.clone(),
        );
        reg.register(
            "fedmesh_clusterset_ip_records_unreadable",
            "ClusterSet IP records that do not parse (left untouched)",
            self.unreadable.clone(),
        );
    }

    pub fn writes(&self, result: &'static str) -> u64 {
        self.writes.get_or_create(&Outcome { result }).get()
    }

    pub fn unreadable(&self) -> i64 {
        self.unreadable.get()
    }
}

/// The ClusterSetIP services any cluster exports, and those this cluster
/// exports, as the controller last saw them.
pub type Exported = (BTreeSet<ServiceName>, BTreeSet<ServiceName>);

/// Longest wait between two looks when nothing changes.
const IDLE: Duration = Duration::from_secs(30);
/// Wait after a failed write before looking again.
const RETRY: Duration = Duration::from_secs(1);

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// Allocates for `cluster` until dropped; what it sees goes to `out`.
pub fn run(
    store: Arc<dyn Store>,
    settings: IpSettings,
    cluster: ClusterName,
    mut exported: watch::Receiver<Exported>,
    out: watch::Sender<Arc<ClusterSetIps>>,
    metrics: IpMetrics,
) -> JoinHandle<()> {
    tokio::spawn(async move {
        let reflected = reflect(store.clone(), IPS_PREFIX.to_owned());
        let mut raw: BTreeMap<String, Vec<u8>> = BTreeMap::new();
        let mut alloc = Allocator::default();
        let mut reported: BTreeSet<String> = BTreeSet::new();
        loop {
            let delta = reflected.take();
            if delta.replaced {
                raw.clear();
            }
            for (k, v) in delta.changes {
                match v {
                    Some(v) => raw.insert(k, v),
                    None => raw.remove(&k),
                };
            }
            let mut wait = IDLE;
            if reflected.synced() {
                let mut records = BTreeMap::new();
                let mut bad = BTreeSet::new();
                let mut blocked = BTreeSet::new();
                for (k, v) in &raw {
                    match decode(k, v) {
                        Ok((ip, h)) => {
                            records.insert(ip, h);
                        }
                        Err(e) => {
                            // Its address stays out of use: nobody knows
                            // whom it was for.
                            if let Some(ip) =
                                k.strip_prefix(IPS_PREFIX).and_then(|s| s.parse().ok())
                            {
                                blocked.insert(ip);
                            }
                            if !reported.contains(k) {
                                let key = fedmesh_wire::bounded(k);
                                tracing::warn!(%key, error = %e, "ClusterSet IP record does not parse; left untouched");
                            }
                            bad.insert(k.clone());
                        }
                    }
                }
                reported = bad;
                metrics.unreadable.set(reported.len() as i64);
                metrics.allocated.set(
                    records
                        .values()
                        .filter(|h| h.released_at_ms.is_none())
                        .count() as i64,
                );
                let (all, mine) = exported.borrow_and_update().clone();
                let now = now_ms();
                let plan = alloc.on(&settings, &records, &blocked, &all, &mine, now);
                metrics.exhausted.set(plan.exhausted.len() as i64);
                for (svc, cidrs) in &plan.exhausted {
                    tracing::warn!(service = %svc, cidrs = ?cidrs, "no free ClusterSet IP");
                }
                let mut failed = false;
                for a in &plan.actions {
                    let result = carry_out(&*store, a, &cluster, now).await;
                    let label = match &result {
                        Ok(true) if matches!(a, Action::Claim { .. }) => "claimed",
                        Ok(true) => "released",
                        Ok(false) => "lost",
                        Err(_) => "error",
                    };
                    metrics
                        .writes
                        .get_or_create(&Outcome { result: label })
                        .inc();
                    if let Err(e) = result {
                        failed = true;
                        tracing::warn!(action = ?a, error = %e, "ClusterSet IP write failed; retrying");
                    }
                }
                let seen = ClusterSetIps {
                    assigned: plan.assigned,
                    exhausted: plan.exhausted,
                    synced: true,
                };
                out.send_if_modified(|cur| {
                    let changed = **cur != seen;
                    if changed {
                        *cur = Arc::new(seen);
                    }
                    changed
                });
                if let Some(at) = plan.wake_at_ms {
                    wait = wait.min(Duration::from_millis(at.saturating_sub(now)));
                }
                if failed {
                    wait = wait.min(RETRY);
                }
            }
            tokio::select! {
                () = reflected.changed() => {}
                r = exported.changed() => {
                    if r.is_err() {
                        return;
                    }
                }
                () = tokio::time::sleep(wait) => {}
            }
        }
    })
}

/// One compare-and-set; `Ok(false)` when the record is no longer what
/// the plan saw (another controller got there first).
async fn carry_out(
    store: &dyn Store,
    a: &Action,
    cluster: &ClusterName,
    now: u64,
) -> Result<bool, StoreError> {
    let (ip, seen, next) = match a {
        Action::Claim { ip, service, seen } => (
            *ip,
            seen.as_ref(),
            IpRecord {
                service: service.to_string(),
                cluster: cluster.to_string(),
                allocated_at_ms: now,
                released_at_ms: None,
            },
        ),
        Action::Release { ip, seen } => (
            *ip,
            Some(seen),
            IpRecord {
                service: seen.service.to_string(),
                cluster: cluster.to_string(),
                allocated_at_ms: seen.allocated_at_ms,
                released_at_ms: Some(now),
            },
        ),
    };
    let key = ip_key(ip);
    let current = store.get(&key).await?;
    let expected = match (&current, seen) {
        (None, None) => 0,
        (Some(kv), Some(seen)) => match decode(&key, &kv.value) {
            Ok((_, h)) if &h == seen => kv.mod_revision,
            _ => return Ok(false),
        },
        _ => return Ok(false),
    };
    let value = serde_json::to_vec(&next).map_err(|e| StoreError::Other(e.to_string()))?;
    store.put_if(&key, value, None, expected).await
}
