//! `propagation`: time from a service change in one cluster to the changed
//! config applied in every subscribed proxy of every other cluster, at
//! federation scale, on the embedded store and on etcd, beside one etcd
//! put. Proxies are real config-API subscribers (gRPC over mTLS, snapshot
//! then deltas, validate, ACK), all in this process.

use std::sync::Arc;
use std::time::{Duration, Instant};

#[cfg_attr(not(feature = "etcd"), allow(unused_imports))]
use anyhow::Context;
use fedmesh_api::client::{self, ClientSettings, Subscription};
use fedmesh_api::controller_identity;
use fedmesh_api::server::{self, ApiHandle, ApiLimits, ApiMetrics, ConfigApi};
use fedmesh_catalog::mcs::{Port, Protocol, ServiceType};
use fedmesh_catalog::{Catalog, ClusterName};
use fedmesh_federation::records::Locality;
use fedmesh_federation::store::{EmbeddedLimits, EmbeddedStore};
use fedmesh_federation::{Controller, ControllerSettings, LocalService, Store};
use fedmesh_testkit::percentile;
use fedmesh_trust::{CertificateAuthority, TrustDomain};
use fedmesh_trust::{ClientAuth, PeerPolicy, SharedBundles, SvidSource, TrustBundles};
use fedmesh_wire::ServiceName;
use prometheus_client::registry::Registry;
use serde_json::json;

pub struct Params {
    pub clusters: usize,
    pub services: usize,
    pub subscribers: usize,
    pub changes: usize,
}

fn rss_mb() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<f64>().ok())
        })
        .map(|kb| kb / 1024.0)
        .unwrap_or(0.0)
}

struct Cluster {
    name: ClusterName,
    ctrl: Controller,
    local: Vec<LocalService>,
    _api: Option<ApiHandle>,
    subs: Vec<Subscription>,
}

/// Serves `ctrl`'s config API and subscribes `n` proxies to it.
async fn subscribe_all(
    ca: &CertificateAuthority,
    ctrl: &Controller,
    n: usize,
) -> anyhow::Result<(ApiHandle, Vec<Subscription>)> {
    let td = ca.trust_domain();
    let own = || SharedBundles::new(TrustBundles::new().with(ca.bundle()));
    let tls = fedmesh_trust::server_config_from(
        &SvidSource::new(ca.issue(&controller_identity(td), Duration::from_secs(3600))?)?,
        own(),
        PeerPolicy::trust_domain(td.clone()),
        &[b"h2"],
        ClientAuth::Required,
    )?;
    let api = ConfigApi::new(
        server::versioned(ctrl.catalog(), ctrl.bundles()),
        ApiLimits::default(),
        ApiMetrics::default(),
    );
    let handle = server::spawn("127.0.0.1:0".parse()?, tls, api, None).await?;
    let svid = ca.issue(&td.system_id("gateway"), Duration::from_secs(3600))?;
    let client_tls = Arc::new(fedmesh_trust::client_config(
        &svid,
        own(),
        PeerPolicy::id(controller_identity(td)),
        &[b"h2"],
    )?);
    let subs = (0..n)
        .map(|i| {
            client::subscribe(
                ClientSettings::new(handle.addr, format!("bench-{i}")),
                client_tls.clone(),
            )
        })
        .collect();
    Ok((handle, subs))
}

fn service(c: usize, i: usize, td: &TrustDomain) -> anyhow::Result<LocalService> {
    Ok(LocalService {
        vips: Vec::new(),
        hostnames: Default::default(),
        name: ServiceName::new(&format!("svc-{c}-{i}"), "bench")?,
        ports: vec![Port::new(8080, Protocol::Tcp)],
        meta: Default::default(),
        service_type: ServiceType::ClusterSetIP,
        export: true,
        audience: None,
        endpoints: vec![(
            format!("10.{c}.{}.{}:15006", i / 250, i % 250).parse()?,
            td.workload("bench", "app")?,
        )],
        exported_at_ms: None,
    })
}

/// Runs one scenario on `make_store` (one store handle per controller).
async fn scenario<F, Fut>(
    p: &Params,
    label: &str,
    make_store: F,
) -> anyhow::Result<serde_json::Value>
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<Arc<dyn Store>>>,
{
    let rss0 = rss_mb();
    let per = p.services / p.clusters;
    let mut cas = Vec::new();
    for c in 0..p.clusters {
        let td = TrustDomain::new(&format!("c{c}.bench"))?;
        cas.push((
            ClusterName::new(&format!("c{c}"))?,
            CertificateAuthority::new_root(td, Duration::from_secs(3600))?,
        ));
    }
    let t0 = Instant::now();
    let mut clusters = Vec::new();
    for (c, (name, ca)) in cas.iter().enumerate() {
        let local: Vec<LocalService> = (0..per)
            .map(|i| service(c, i, ca.trust_domain()))
            .collect::<anyhow::Result<_>>()?;
        let settings = ControllerSettings {
            cluster: name.clone(),
            trust_domain: ca.trust_domain().clone(),
            locality: Locality::default(),
            gateways: vec![format!("127.0.0.{}:15443", c + 1).parse()?],
            gateways_tcp: Vec::new(),
            gateway_tunnel: None,
            lease_ttl: Duration::from_secs(10),
            bundle: ca.bundle(),
            endorsements: vec![],
            pinned: cas
                .iter()
                .filter(|(n, _)| n != name)
                .map(|(n, ca)| (n.clone(), ca.bundle()))
                .collect(),
            policies: Default::default(),
            clusterset_ips: None,
        };
        let mut reg = Registry::default();
        let ctrl = Controller::start(make_store().await?, settings, local.clone(), &mut reg);
        clusters.push(Cluster {
            name: name.clone(),
            ctrl,
            local,
            _api: None,
            subs: Vec::new(),
        });
    }
    // Converged: every cluster imports every other cluster's services.
    let want = per * (p.clusters - 1);
    loop {
        let done = clusters.iter().all(|c| {
            let rx = c.ctrl.catalog();
            let cat = rx.borrow();
            cat.as_ref()
                .is_some_and(|cat| cat.peers().count() == p.clusters - 1 && imported(cat) == want)
        });
        if done {
            break;
        }
        anyhow::ensure!(
            t0.elapsed() < Duration::from_secs(300),
            "{label}: no convergence in 300 s"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let converge = t0.elapsed();
    // Controllers only: measured before any proxy subscribes.
    let rss = rss_mb();

    // Proxies subscribe and take their full snapshots.
    let t1 = Instant::now();
    for (c, (_, ca)) in clusters.iter_mut().zip(&cas) {
        let (api, subs) = subscribe_all(ca, &c.ctrl, p.subscribers).await?;
        c._api = Some(api);
        c.subs = subs;
    }
    for c in &clusters {
        for s in &c.subs {
            let mut rx = s.config();
            let r = tokio::time::timeout(
                Duration::from_secs(120),
                rx.wait_for(|cfg| {
                    cfg.as_ref()
                        .is_some_and(|cfg| imported(&cfg.catalog) == want)
                }),
            )
            .await;
            if r.is_err() {
                for c in &clusters {
                    let ctrl = c
                        .ctrl
                        .catalog()
                        .borrow()
                        .as_ref()
                        .map(|cat| (imported(cat), cat.peers().count()));
                    let mut counts: Vec<usize> = c
                        .subs
                        .iter()
                        .map(|s| {
                            s.config()
                                .borrow()
                                .as_ref()
                                .map(|cfg| imported(&cfg.catalog))
                                .unwrap_or(0)
                        })
                        .collect();
                    counts.dedup();
                    eprintln!(
                        "{}: controller (imports, peers) {ctrl:?}, proxies' imports {counts:?}, first proxy {:?}",
                        c.name,
                        c.subs.first().map(|s| s.status())
                    );
                }
                anyhow::bail!("a proxy never got the full config ({want} imports)");
            }
        }
    }
    let proxies_synced = t1.elapsed();
    let rss_with_proxies = rss_mb();

    // Subscribers: `subscribers` per cluster, each holding the catalog the
    // way a proxy would and reporting when a change reached it.
    let mut latencies = Vec::new();
    for k in 0..p.changes {
        let src = k % p.clusters;
        let idx = (k * 7919) % per;
        let target = clusters[src].local[idx].name.clone();
        let src_name = clusters[src].name.clone();
        let mut waiters = Vec::new();
        for (ci, c) in clusters.iter().enumerate() {
            if ci == src {
                continue;
            }
            for sub in &c.subs {
                let mut rx = sub.config();
                let target = target.clone();
                let src_name = src_name.clone();
                waiters.push(tokio::spawn(async move {
                    loop {
                        let seen = {
                            let cfg = rx.borrow_and_update();
                            cfg.as_ref().is_some_and(|cfg| {
                                !cfg.catalog.imports(&target).contains(&src_name)
                            })
                        };
                        if seen {
                            return Instant::now();
                        }
                        if rx.changed().await.is_err() {
                            return Instant::now();
                        }
                    }
                }));
            }
        }
        let start = Instant::now();
        let mut local = clusters[src].local.clone();
        local[idx].export = false;
        clusters[src].ctrl.set_local(local);
        for w in waiters {
            let Ok(at) = tokio::time::timeout(Duration::from_secs(30), w).await else {
                // Say where it got stuck: controller or proxies.
                for c in clusters.iter().filter(|c| c.name != src_name) {
                    let ctrl_has = c
                        .ctrl
                        .catalog()
                        .borrow()
                        .as_ref()
                        .is_some_and(|cat| cat.imports(&target).contains(&src_name));
                    let stale =
                        c.subs
                            .iter()
                            .filter(|s| {
                                s.config().borrow().as_ref().is_some_and(|cfg| {
                                    cfg.catalog.imports(&target).contains(&src_name)
                                })
                            })
                            .count();
                    let st = c.subs.first().map(|s| s.status());
                    eprintln!(
                        "{}: controller still imports {target} from {src_name}: {ctrl_has}; proxies still importing: {stale}/{}; first proxy: {st:?}",
                        c.name,
                        c.subs.len()
                    );
                }
                anyhow::bail!("change {k}: a subscriber did not see {target} withdrawn from {src_name} within 30 s");
            };
            latencies.push(at?.saturating_duration_since(start));
        }
        // Restore, and wait for it to settle before the next change.
        clusters[src].ctrl.set_local(clusters[src].local.clone());
        let t = Instant::now();
        loop {
            let back = clusters
                .iter()
                .enumerate()
                .filter(|(i, _)| *i != src)
                .all(|(_, c)| {
                    c.subs.iter().all(|s| {
                        let rx = s.config();
                        let cfg = rx.borrow();
                        cfg.as_ref()
                            .is_some_and(|cfg| cfg.catalog.imports(&target).contains(&src_name))
                    })
                });
            if back {
                break;
            }
            anyhow::ensure!(
                t.elapsed() < Duration::from_secs(30),
                "restore did not settle"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
    let n = latencies.len();
    let p50 = percentile(&mut latencies, 50.0);
    let p99 = percentile(&mut latencies, 99.0);
    let max = latencies.last().copied().unwrap_or_default();
    drop(clusters);
    Ok(json!({
        "store": label,
        "clusters": p.clusters,
        "services": p.services,
        "subscribers_per_cluster": p.subscribers,
        "changes": p.changes,
        "observations": n,
        "initial_convergence_ms": converge.as_secs_f64() * 1e3,
        "proxies_synced_ms": proxies_synced.as_secs_f64() * 1e3,
        "rss_mb_with_proxies": rss_with_proxies,
        "p50_ms": p50.as_secs_f64() * 1e3,
        "p99_ms": p99.as_secs_f64() * 1e3,
        "max_ms": max.as_secs_f64() * 1e3,
        "rss_mb_all_controllers": rss,
        "rss_mb_before": rss0,
    }))
}

fn imported(cat: &Catalog) -> usize {
    cat.import_count()
}

pub async fn run(p: Params, stores: &str, as_json: bool) -> anyhow::Result<()> {
    let mut results = Vec::new();
    if stores == "embedded" || stores == "both" {
        let store = EmbeddedStore::new(EmbeddedLimits::default());
        let r = scenario(&p, "embedded", || {
            let s = store.clone();
            async move { Ok(Arc::new(s) as Arc<dyn Store>) }
        })
        .await?;
        results.push(r);
    }
    #[cfg(feature = "etcd")]
    if stores == "etcd" || stores == "both" {
        use fedmesh_federation::store::{EtcdOptions, EtcdStore};
        let bin = fedmesh_testkit::etcd::etcd_binary()
            .context("etcd not installed (apt-get install etcd-server)")?;
        let etcd = fedmesh_testkit::etcd::EtcdCluster::start(bin, 1)?;
        let opts = EtcdOptions {
            endpoints: etcd.endpoints(),
            ..EtcdOptions::default()
        };
        // One etcd put, for scale.
        let s = EtcdStore::connect(&opts).await?;
        let mut puts = Vec::new();
        for i in 0..200 {
            let t = Instant::now();
            s.put(&format!("/bench/put/{i}"), vec![0u8; 200], None)
                .await?;
            puts.push(t.elapsed());
        }
        let put_p50 = percentile(&mut puts, 50.0);
        let mut r = scenario(&p, "etcd", || {
            let opts = opts.clone();
            async move { Ok(Arc::new(EtcdStore::connect(&opts).await?) as Arc<dyn Store>) }
        })
        .await?;
        r["etcd_put_p50_ms"] = json!(put_p50.as_secs_f64() * 1e3);
        results.push(r);
    }
    #[cfg(not(feature = "etcd"))]
    if stores == "etcd" || stores == "both" {
        eprintln!("etcd skipped: this fedmesh-bench was built without its default `etcd` feature");
    }
    if as_json {
        println!("{}", serde_json::to_string_pretty(&results)?);
    } else {
        println!(
            "{:<9} {:>8} {:>9} {:>5} {:>12} {:>10} {:>9} {:>9} {:>9} {:>10} {:>12}",
            "store",
            "clusters",
            "services",
            "subs",
            "converge ms",
            "proxies ms",
            "p50 ms",
            "p99 ms",
            "max ms",
            "RSS MB",
            "etcd put ms"
        );
        for r in &results {
            println!(
                "{:<9} {:>8} {:>9} {:>5} {:>12.0} {:>10.0} {:>9.1} {:>9.1} {:>9.1} {:>10.0} {:>12}",
                r["store"].as_str().unwrap_or_default(),
                r["clusters"].as_u64().unwrap_or(0),
                r["services"].as_u64().unwrap_or(0),
                r["subscribers_per_cluster"].as_u64().unwrap_or(0),
                r["initial_convergence_ms"].as_f64().unwrap_or(0.0),
                r["proxies_synced_ms"].as_f64().unwrap_or(0.0),
                r["p50_ms"].as_f64().unwrap_or(0.0),
                r["p99_ms"].as_f64().unwrap_or(0.0),
                r["max_ms"].as_f64().unwrap_or(0.0),
                r["rss_mb_all_controllers"].as_f64().unwrap_or(0.0),
                r["etcd_put_p50_ms"]
                    .as_f64()
                    .map(|v| format!("{v:.2}"))
                    .unwrap_or_else(|| "-".into()),
            );
        }
        println!("\nconverge: controllers start until every controller imports everything; proxies: subscriptions start until every proxy applied its full snapshot");
        println!("latency: a service withdrawn in one cluster until every subscribed proxy (gRPC, mTLS) in every other cluster applied a config without it");
        println!("RSS: all controllers together, measured before any proxy subscribed (one controller is at most that)");
    }
    Ok(())
}
