//! ClusterSet IP allocation against a real store (embedded, and etcd when
//! installed): controllers racing for the same services, restarts,
//! release and quarantine, exhaustion, records that do not parse.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use fedmesh_catalog::ClusterName;
use fedmesh_federation::clusterset::{
    self, ip_key, ClusterSetIpConfig, ClusterSetIps, Exported, IpMetrics, IpSettings, IPS_PREFIX,
};
use fedmesh_federation::store::{EmbeddedLimits, EmbeddedStore};
use fedmesh_federation::Store;
use fedmesh_wire::ServiceName;
use tokio::sync::watch;
use tokio::task::JoinHandle;

const WAIT: Duration = Duration::from_secs(15);

fn settings(cidrs: &[&str], release_after: Duration, quarantine: Duration) -> IpSettings {
    ClusterSetIpConfig {
        cidrs: cidrs.iter().map(|s| s.to_string()).collect(),
        quarantine,
        release_after,
    }
    .check(&[])
    .unwrap()
}

fn names(range: std::ops::Range<usize>) -> BTreeSet<ServiceName> {
    range
        .map(|i| ServiceName::new(&format!("svc{i}"), "demo").unwrap())
        .collect()
}

/// One controller's allocator, with the services it is told about.
struct Member {
    exported: watch::Sender<Exported>,
    out: watch::Receiver<Arc<ClusterSetIps>>,
    metrics: IpMetrics,
    task: JoinHandle<()>,
}

impl Drop for Member {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn member(store: &Arc<dyn Store>, cluster: &str, s: &IpSettings, exported: Exported) -> Member {
    let (etx, erx) = watch::channel(exported);
    let (otx, orx) = watch::channel(Arc::new(ClusterSetIps::default()));
    let metrics = IpMetrics::default();
    let task = clusterset::run(
        store.clone(),
        s.clone(),
        ClusterName::new(cluster).unwrap(),
        erx,
        otx,
        metrics.clone(),
    );
    Member {
        exported: etx,
        out: orx,
        metrics,
        task,
    }
}

async fn until(
    m: &mut Member,
    what: &str,
    f: impl Fn(&ClusterSetIps) -> bool,
) -> Arc<ClusterSetIps> {
    let got = tokio::time::timeout(WAIT, m.out.wait_for(|o| o.synced && f(o)))
        .await
        .map(|r| r.unwrap().clone());
    got.unwrap_or_else(|_| panic!("not within {WAIT:?}: {what}: {:?}", m.out.borrow()))
}

/// Live addresses in the store, by service.
async fn live(store: &Arc<dyn Store>) -> BTreeMap<ServiceName, Vec<IpAddr>> {
    let mut out: BTreeMap<ServiceName, Vec<IpAddr>> = BTreeMap::new();
    for kv in store.list(IPS_PREFIX).await.unwrap().kvs {
        if let Ok((ip, h)) = clusterset::decode(&kv.key, &kv.value) {
            if h.released_at_ms.is_none() {
                out.entry(h.service).or_default().push(ip);
            }
        }
    }
    out
}

fn embedded() -> Arc<dyn Store> {
    Arc::new(EmbeddedStore::new(EmbeddedLimits::default()))
}

/// Two controllers export overlapping sets of services at once: every
/// service ends with exactly one address per family, no address serves
/// two services, and both agree.
async fn racing_controllers_never_share_an_address(store: Arc<dyn Store>) {
    let s = settings(
        &["241.0.0.0/26", "fd00:fe::/120"],
        Duration::from_secs(60),
        Duration::from_secs(600),
    );
    let all = names(0..40);
    let mut east = member(&store, "east", &s, (all.clone(), names(0..30)));
    let mut west = member(&store, "west", &s, (all.clone(), names(10..40)));
    let full =
        |o: &ClusterSetIps| o.assigned.len() == 40 && o.assigned.values().all(|v| v.len() == 2);
    let e = until(&mut east, "east sees 40 services with two addresses", full).await;
    let w = until(&mut west, "west agrees", |o| {
        full(o) && o.assigned == e.assigned
    })
    .await;
    assert_eq!(w.assigned, e.assigned);
    let addresses: BTreeSet<IpAddr> = e.assigned.values().flatten().copied().collect();
    assert_eq!(addresses.len(), 80, "an address serves two services");
    // The store holds exactly that: one live address per family each
    // (duplicates from the race released).
    tokio::time::timeout(WAIT, async {
        loop {
            if live(&store).await == e.assigned {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
    .expect("the store settles on what the controllers show");
    let claimed = east.metrics.writes("claimed") + west.metrics.writes("claimed");
    eprintln!(
        "claimed {claimed}, lost {}, released {}",
        east.metrics.writes("lost") + west.metrics.writes("lost"),
        east.metrics.writes("released") + west.metrics.writes("released"),
    );
    assert!(claimed >= 80);

    // Both restart: the same addresses, and nothing written.
    drop(east);
    drop(west);
    let mut again = member(&store, "east", &s, (all.clone(), names(0..30)));
    let o = until(&mut again, "the restarted controller", |o| {
        o.assigned.len() == 40
    })
    .await;
    assert_eq!(o.assigned, e.assigned);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(again.metrics.writes("claimed"), 0);
    assert_eq!(again.metrics.writes("released"), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_racing_controllers_never_share_an_address() {
    racing_controllers_never_share_an_address(embedded()).await;
}

#[cfg(feature = "etcd")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_racing_controllers_never_share_an_address() {
    use fedmesh_federation::store::{EtcdOptions, EtcdStore};
    let Some(bin) =
        fedmesh_testkit::etcd::etcd_or_skip("etcd_racing_controllers_never_share_an_address")
    else {
        return;
    };
    let etcd = fedmesh_testkit::etcd::EtcdCluster::start(bin, 1).unwrap();
    let store = EtcdStore::connect(&EtcdOptions {
        endpoints: etcd.endpoints(),
        ..EtcdOptions::default()
    })
    .await
    .unwrap();
    racing_controllers_never_share_an_address(Arc::new(store)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_address_is_released_when_nobody_exports_and_quarantined_before_reuse() {
    let store = embedded();
    // Two usable addresses: 241.0.0.1 and .2.
    let s = settings(
        &["241.0.0.0/30"],
        Duration::from_millis(300),
        Duration::from_secs(2),
    );
    let one = names(0..1);
    let mut m = member(&store, "east", &s, (one.clone(), one.clone()));
    let first = until(&mut m, "svc0 gets an address", |o| o.assigned.len() == 1).await;
    let ip = first.assigned.values().next().unwrap()[0];

    // Unexported: released after release_after.
    m.exported.send_replace((BTreeSet::new(), BTreeSet::new()));
    until(&mut m, "svc0 released", |o| o.assigned.is_empty()).await;
    let rec = store.get(&ip_key(ip)).await.unwrap().unwrap();
    let released_at = clusterset::decode(&rec.key, &rec.value)
        .unwrap()
        .1
        .released_at_ms
        .expect("released");

    // Two new services: one gets the free address at once; the other
    // only gets svc0's once its quarantine is over (the store's own
    // record says when, whatever the machine's load made the test see).
    let two = names(1..3);
    m.exported.send_replace((two.clone(), two.clone()));
    let o = until(&mut m, "both allocated after the quarantine", |o| {
        o.assigned.len() == 2
    })
    .await;
    assert!(o.exhausted.is_empty());
    assert!(o.assigned.values().flatten().any(|a| *a == ip));
    let rec = store.get(&ip_key(ip)).await.unwrap().unwrap();
    let (_, h) = clusterset::decode(&rec.key, &rec.value).unwrap();
    assert!(two.contains(&h.service) && h.released_at_ms.is_none());
    assert!(
        h.allocated_at_ms >= released_at + 2_000,
        "handed out {} ms after its release, within the 2 s quarantine",
        h.allocated_at_ms.saturating_sub(released_at)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_exhausted_range_is_reported_and_unreadable_records_are_left_alone() {
    let store = embedded();
    let bad_ip = ip_key("241.0.0.1".parse().unwrap());
    store
        .put(&bad_ip, b"not json".to_vec(), None)
        .await
        .unwrap();
    let bad_key = format!("{IPS_PREFIX}not-an-ip");
    store.put(&bad_key, b"{}".to_vec(), None).await.unwrap();
    let s = settings(
        &["241.0.0.0/30"],
        Duration::from_secs(60),
        Duration::from_secs(60),
    );
    let three = names(0..3);
    let mut m = member(&store, "east", &s, (three.clone(), three.clone()));
    // 241.0.0.1 is unreadable, so only 241.0.0.2 is free.
    let o = until(&mut m, "one allocated, two exhausted", |o| {
        o.assigned.len() == 1 && o.exhausted.len() == 2
    })
    .await;
    assert_eq!(
        o.assigned.values().next().unwrap(),
        &["241.0.0.2".parse::<IpAddr>().unwrap()]
    );
    assert_eq!(m.metrics.unreadable(), 2);
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(
        store.get(&bad_ip).await.unwrap().unwrap().value,
        b"not json"
    );
    assert_eq!(store.get(&bad_key).await.unwrap().unwrap().value, b"{}");
}
