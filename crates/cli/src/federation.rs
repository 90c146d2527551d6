//! `fedmesh controller`, `fedmesh cluster`, `fedmesh services`, `fedmesh status`.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use anyhow::{bail, Context};
use clap::{Subcommand, ValueEnum};
use fedmesh_catalog::mcs;
use fedmesh_catalog::ClusterName;
use fedmesh_federation::clusterset;
use fedmesh_federation::config::{open_store, read_pin, ControllerConfig, StoreConfig};
use fedmesh_federation::keys::{Key, ROOT};
use fedmesh_federation::records::{ClusterInfo, ServiceRecord};
use fedmesh_federation::{ControllerApp, ServiceSource, Store};
use prometheus_client::registry::Registry;
use serde_json::json;

#[derive(Clone, Copy, ValueEnum, Default, PartialEq, Eq)]
pub enum Output {
    #[default]
    Table,
    Json,
}

/// Where to read the federation from.
#[derive(clap::Args)]
pub struct StoreArgs {
    /// etcd endpoints, comma-separated (`http://10.0.0.1:2379,http://10.0.0.2:2379`).
    #[arg(long, env = "FEDMESH_STORE")]
    store: String,
    #[arg(long, value_enum, default_value_t = Output::Table)]
    output: Output,
}

#[derive(Subcommand)]
pub enum ClusterCmd {
    /// Admit a cluster: pin its trust bundle in the controller's pins directory.
    Join {
        /// The controller's `pins_dir`.
        #[arg(long)]
        pins: PathBuf,
        /// The cluster to admit.
        #[arg(long)]
        name: ClusterName,
        /// Its root bundle (PEM), obtained out of band.
        #[arg(long)]
        bundle: PathBuf,
    },
    /// Clusters in the federation store.
    List(StoreArgs),
}

#[derive(Subcommand)]
pub enum ServicesCmd {
    /// Exported services, per cluster, and what they merge into.
    List {
        #[command(flatten)]
        store: StoreArgs,
        /// Only this cluster's exports.
        #[arg(long)]
        cluster: Option<ClusterName>,
    },
}

#[derive(clap::Args)]
pub struct StatusArgs {
    /// etcd endpoints, comma-separated.
    #[arg(long, env = "FEDMESH_STORE", conflicts_with = "controller")]
    store: Option<String>,
    /// A controller's admin address: ask it for its own view.
    #[arg(long, conflicts_with = "gateway")]
    controller: Option<std::net::SocketAddr>,
    /// A gateway's admin address: how it reaches each peer gateway (QUIC
    /// or the TCP fallback) right now.
    #[arg(long, conflicts_with = "store")]
    gateway: Option<std::net::SocketAddr>,
    #[arg(long, value_enum, default_value_t = Output::Table)]
    output: Output,
}

#[derive(clap::Args)]
pub struct ControllerArgs {
    #[arg(long)]
    config: PathBuf,
    /// Validate the config and exit.
    #[arg(long)]
    check: bool,
    /// On SIGTERM, take this cluster out of the federation: peers stop
    /// routing to it at once. Without it a stop is a restart: the
    /// cluster's records live on for the lease TTL, so a controller that
    /// starts again within it is never missed.
    #[arg(long)]
    leave: bool,
    /// Several replicas: run only while holding the `fedmesh-controller`
    /// Lease in this pod's namespace (Kubernetes), standing by otherwise.
    #[arg(long)]
    leader_elect: bool,
    /// How long a leader that stopped renewing keeps the lease (a standby
    /// takes over after it); renewals every 1/7 of it, and the leader
    /// steps down when it could not renew for 2/3 of it.
    #[arg(long, default_value = "15s", value_parser = humantime::parse_duration)]
    leader_lease: Duration,
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

pub async fn controller(args: ControllerArgs) -> anyhow::Result<ExitCode> {
    let cfg =
        ControllerConfig::load(&args.config).map_err(|e| anyhow::anyhow!(e.join("\n  - ")))?;
    let settings = cfg.settings().map_err(|e| {
        anyhow::anyhow!(
            "controller config {}:\n  - {}",
            args.config.display(),
            e.join("\n  - ")
        )
    })?;
    if args.check && cfg.services.is_none() && cfg.kubernetes.is_some() {
        crate::emit(&format!(
            "config ok: cluster {} (Kubernetes source)\n",
            settings.cluster
        ));
        return Ok(ExitCode::SUCCESS);
    }
    let mut registry = Registry::default();
    // Started before the election: a standby keeps its listing warm.
    let source = ServiceSource::start(&cfg, &settings, &mut registry).await?;
    if args.check {
        crate::emit(&format!(
            "config ok: cluster {} ({} services, {} pinned clusters)\n",
            settings.cluster,
            source.current().map(|l| l.len()).unwrap_or(0),
            settings.pinned.len()
        ));
        return Ok(ExitCode::SUCCESS);
    }
    let mut leadership = if args.leader_elect {
        match crate::leader::elect(cfg.admin, args.leader_lease).await? {
            Some(l) => l,
            None => return Ok(ExitCode::SUCCESS),
        }
    } else {
        crate::leader::Leadership::alone()
    };
    registry.register(
        "fedmesh_controller_leader",
        "1 while this replica leads",
        leadership.gauge.clone(),
    );
    let app = ControllerApp::build(&cfg, settings, source, registry).await?;
    if let Some(addr) = app.api_addr() {
        crate::emit(&format!("controller api {addr}\n"));
    }
    if let Some(addr) = app.admin_addr() {
        crate::emit(&format!("controller admin http://{addr}/status\n"));
    }
    crate::emit(&format!("controller up: cluster {}\n", cfg.cluster));
    let lost = tokio::select! {
        r = crate::daemons::until_signal() => { r?; false }
        () = leadership.lost() => true,
    };
    app.shutdown(args.leave && !lost).await;
    if lost {
        // Another replica leads now (or will): exit so this pod comes
        // back as a standby; the records live on for the new leader.
        anyhow::bail!("lost the controller lease");
    }
    leadership.release().await;
    Ok(ExitCode::SUCCESS)
}

pub fn join(pins: PathBuf, name: ClusterName, bundle: PathBuf) -> anyhow::Result<ExitCode> {
    let b = read_pin(&bundle).map_err(|e| anyhow::anyhow!("{}: {e}", bundle.display()))?;
    std::fs::create_dir_all(&pins)?;
    let dest = pins.join(format!("{name}.pem"));
    std::fs::write(&dest, b.to_pem()).with_context(|| format!("writing {}", dest.display()))?;
    crate::emit(&format!(
        "pinned cluster {name} (trust domain {}, {} roots, {}) in {}\n",
        b.trust_domain(),
        b.roots().len(),
        b.fingerprint(),
        dest.display()
    ));
    Ok(ExitCode::SUCCESS)
}

async fn store_from(arg: &str) -> anyhow::Result<Arc<dyn Store>> {
    if arg == "embedded" {
        bail!("the embedded store lives inside one process; point --store at etcd, or use `fedmesh status --controller ADMIN`");
    }
    let endpoints: Vec<String> = arg
        .split(',')
        .map(|e| e.trim().replacen("etcd://", "http://", 1))
        .filter(|e| !e.is_empty())
        .collect();
    Ok(open_store(&StoreConfig::etcd(endpoints)).await?)
}

/// Everything decodable in the store, and what was not.
struct Snapshot {
    infos: BTreeMap<ClusterName, fedmesh_federation::records::ValidInfo>,
    exports: Vec<mcs::Export>,
    /// Live ClusterSet IPs by service.
    ips: BTreeMap<fedmesh_wire::ServiceName, Vec<std::net::IpAddr>>,
    rejected: Vec<String>,
}

async fn snapshot(store: &dyn Store) -> anyhow::Result<Snapshot> {
    let listing = store.list(ROOT).await?;
    let mut s = Snapshot {
        infos: BTreeMap::new(),
        exports: Vec::new(),
        ips: BTreeMap::new(),
        rejected: Vec::new(),
    };
    for kv in store.list(clusterset::IPS_PREFIX).await?.kvs {
        match clusterset::decode(&kv.key, &kv.value) {
            Ok((ip, h)) if h.released_at_ms.is_none() => {
                s.ips.entry(h.service).or_default().push(ip)
            }
            Ok(_) => {}
            Err(e) => s
                .rejected
                .push(format!("{}: {e}", fedmesh_wire::bounded(&kv.key))),
        }
    }
    for ips in s.ips.values_mut() {
        ips.sort_by_key(|ip| (!ip.is_ipv4(), *ip));
    }
    for kv in listing.kvs {
        let key = match Key::parse(&kv.key) {
            Ok(k) => k,
            Err(e) => {
                s.rejected.push(e.to_string());
                continue;
            }
        };
        match &key {
            Key::Info(c) => match ClusterInfo::decode(&key, &kv.value) {
                Ok(i) => {
                    s.infos.insert(c.clone(), i);
                }
                Err(e) => s.rejected.push(format!("{}: {e}", kv.key)),
            },
            Key::Service(..) => match ServiceRecord::decode(&key, &kv.value) {
                Ok(e) => s.exports.push(e),
                Err(e) => s.rejected.push(format!("{}: {e}", kv.key)),
            },
            // A cluster that left on purpose; it has no info any more.
            Key::Left(_) => {}
        }
    }
    Ok(s)
}

/// A JSON list of strings as one comma-separated cell.
fn joined(v: &serde_json::Value) -> String {
    v.as_array()
        .map(|p| {
            p.iter()
                .filter_map(|x| x.as_str())
                .collect::<Vec<_>>()
                .join(",")
        })
        .unwrap_or_default()
}

fn age(ms: u64) -> String {
    let secs = now_ms().saturating_sub(ms) / 1000;
    format!("{secs}s ago")
}

pub async fn cluster_list(a: StoreArgs) -> anyhow::Result<ExitCode> {
    let store = store_from(&a.store).await?;
    let snap = snapshot(&*store).await?;
    let rows: Vec<_> = snap
        .infos
        .values()
        .map(|i| {
            json!({
                "cluster": i.cluster.as_str(),
                "trust_domain": i.trust_domain.as_str(),
                "gateways": i.gateways,
                "region": i.locality.region,
                "zone": i.locality.zone,
                "bundle_fingerprint": i.bundle.fingerprint(),
                "published_at_ms": i.published_at_ms,
            })
        })
        .collect();
    if a.output == Output::Json {
        crate::emit(&format!("{}\n", serde_json::to_string_pretty(&rows)?));
    } else {
        let mut out = format!(
            "{:<12} {:<16} {:<24} {:<10} {:<20}\n",
            "CLUSTER", "TRUST DOMAIN", "GATEWAYS", "REGION", "PUBLISHED"
        );
        for i in snap.infos.values() {
            let gws: Vec<String> = i.gateways.iter().map(|g| g.to_string()).collect();
            out.push_str(&format!(
                "{:<12} {:<16} {:<24} {:<10} {:<20}\n",
                i.cluster.as_str(),
                i.trust_domain.as_str(),
                gws.join(","),
                i.locality.region,
                age(i.published_at_ms)
            ));
        }
        crate::emit(&out);
    }
    Ok(ExitCode::SUCCESS)
}

pub async fn services_list(a: StoreArgs, cluster: Option<ClusterName>) -> anyhow::Result<ExitCode> {
    let store = store_from(&a.store).await?;
    let snap = snapshot(&*store).await?;
    let rows: Vec<_> = snap
        .exports
        .iter()
        .filter(|e| cluster.as_ref().is_none_or(|c| &e.cluster == c))
        .map(|e| {
            json!({
                "service": e.service.to_string(),
                "cluster": e.cluster.as_str(),
                "ports": e.ports.iter().map(|p| if p.name.is_empty() {
                    format!("{}/{}", p.port, p.protocol.as_k8s())
                } else {
                    format!("{}:{}/{}", p.name, p.port, p.protocol.as_k8s())
                }).collect::<Vec<_>>(),
                "ready_endpoints": e.ready_endpoints,
                "clusterset_ips": snap.ips.get(&e.service).cloned().unwrap_or_default(),
                "exported_at_ms": e.exported_at,
                "audience": e.audience.as_ref().map(|a| a.iter().map(|c| c.to_string()).collect::<Vec<_>>()),
            })
        })
        .collect();
    if a.output == Output::Json {
        crate::emit(&format!("{}\n", serde_json::to_string_pretty(&rows)?));
    } else {
        let mut out = format!(
            "{:<28} {:<12} {:<20} {:>6} {}\n",
            "SERVICE", "CLUSTER", "PORTS", "READY", "CLUSTERSET IPS"
        );
        for r in &rows {
            out.push_str(&format!(
                "{:<28} {:<12} {:<20} {:>6} {}\n",
                r["service"].as_str().unwrap_or_default(),
                r["cluster"].as_str().unwrap_or_default(),
                joined(&r["ports"]),
                r["ready_endpoints"],
                joined(&r["clusterset_ips"]),
            ));
        }
        crate::emit(&out);
    }
    Ok(ExitCode::SUCCESS)
}

/// `GET /status` from a controller's or gateway's admin endpoint.
async fn admin_status(addr: std::net::SocketAddr, what: &str) -> anyhow::Result<serde_json::Value> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::time::timeout(Duration::from_secs(3), tokio::net::TcpStream::connect(addr))
        .await
        .with_context(|| format!("{what} admin {addr}: connect timed out"))??;
    s.write_all(b"GET /status HTTP/1.1\r\nhost: fedmesh\r\nconnection: close\r\n\r\n")
        .await?;
    let mut body = String::new();
    tokio::time::timeout(Duration::from_secs(3), s.read_to_string(&mut body))
        .await
        .with_context(|| format!("{what} admin {addr}: no answer"))??;
    let json = body.split_once("\r\n\r\n").map(|x| x.1).unwrap_or_default();
    serde_json::from_str(json).with_context(|| format!("{what} /status is not JSON"))
}

pub async fn status(a: StatusArgs) -> anyhow::Result<ExitCode> {
    if let Some(addr) = a.gateway {
        let v = admin_status(addr, "gateway").await?;
        if a.output == Output::Json {
            crate::emit(&format!("{}\n", serde_json::to_string_pretty(&v)?));
            return Ok(ExitCode::SUCCESS);
        }
        let mut out = format!(
            "gateway of {} — draining: {}\n{:<12} {:<10} {:<7} {:>10} {:<12} {:<22} {:<22} {}\n",
            v["cluster"].as_str().unwrap_or("?"),
            v["draining"],
            "PEER",
            "TRANSPORT",
            "DIALED",
            "CONNECTED",
            "UDP BLOCKED",
            "QUIC ADDRESS",
            "TCP ADDRESS",
            "LAST ERROR"
        );
        for p in v["peers"].as_array().cloned().unwrap_or_default() {
            out.push_str(&format!(
                "{:<12} {:<10} {:<7} {:>10} {:<12} {:<22} {:<22} {}\n",
                p["cluster"].as_str().unwrap_or_default(),
                p["transport"].as_str().unwrap_or_default(),
                p["dialed_by"].as_str().unwrap_or("-"),
                p["connected_for_s"]
                    .as_f64()
                    .map(|s| format!("{s:.0}s"))
                    .unwrap_or_else(|| "-".into()),
                if p["udp_blocked"] == true {
                    "yes"
                } else {
                    "no"
                },
                p["address"].as_str().unwrap_or_default(),
                p["tcp_address"].as_str().unwrap_or("-"),
                p["last_error"].as_str().unwrap_or_default()
            ));
        }
        crate::emit(&out);
        return Ok(ExitCode::SUCCESS);
    }
    if let Some(addr) = a.controller {
        let v = admin_status(addr, "controller").await?;
        if a.output == Output::Json {
            crate::emit(&format!("{}\n", serde_json::to_string_pretty(&v)?));
        } else {
            let mut out = format!(
                "controller of {} — synced: {}, imported services: {}, catalog version {}\n{:<12} {:<16} {:<24} {:>8} {:<8} {:<9} {:<20}\n",
                v["cluster"].as_str().unwrap_or("?"),
                v["synced"],
                v["imported"],
                v["catalog_version"],
                "CLUSTER",
                "TRUST DOMAIN",
                "GATEWAYS",
                "EXPORTS",
                "TRUSTED",
                "TRUSTS US",
                "PUBLISHED"
            );
            for c in v["clusters"].as_array().cloned().unwrap_or_default() {
                out.push_str(&format!(
                    "{:<12} {:<16} {:<24} {:>8} {:<8} {:<9} {:<20}\n",
                    c["cluster"].as_str().unwrap_or_default(),
                    c["trust_domain"].as_str().unwrap_or_default(),
                    // Values as text: a JSON value ignores width and alignment.
                    c["gateways"].to_string(),
                    c["exported"].to_string(),
                    c["bundle_trusted"].to_string(),
                    c["trusts_us"].to_string(),
                    age(c["published_at_ms"].as_u64().unwrap_or(0))
                ));
            }
            for r in v["rejected"].as_array().cloned().unwrap_or_default() {
                out.push_str(&format!("rejected: {}\n", r.as_str().unwrap_or_default()));
            }
            crate::emit(&out);
        }
        return Ok(ExitCode::SUCCESS);
    }
    let Some(store_arg) = a.store else {
        bail!("give --store ETCD_ENDPOINTS, --controller ADMIN_ADDRESS or --gateway ADMIN_ADDRESS");
    };
    let store = store_from(&store_arg).await?;
    let snap = snapshot(&*store).await?;
    let mut rows = Vec::new();
    for (c, i) in &snap.infos {
        let exported = snap.exports.iter().filter(|e| &e.cluster == c).count();
        let imports = mcs::merge(c, &snap.exports);
        let conflicts: Vec<String> = imports
            .iter()
            .flat_map(|(n, imp)| imp.conflicts.iter().map(move |x| format!("{n}: {x}")))
            .collect();
        rows.push(json!({
            "cluster": c.as_str(),
            "trust_domain": i.trust_domain.as_str(),
            "gateways": i.gateways,
            "gateways_tcp": i.gateways_tcp,
            "exported": exported,
            "imported": imports.values().filter(|i| i.remote(c)).count(),
            "bundle_fingerprint": i.bundle.fingerprint(),
            "last_publish_ms_ago": now_ms().saturating_sub(i.published_at_ms),
            "conflicts": conflicts,
        }));
    }
    if a.output == Output::Json {
        crate::emit(&format!(
            "{}\n",
            serde_json::to_string_pretty(&json!({"clusters": rows, "rejected": snap.rejected}))?
        ));
    } else {
        let mut out = format!(
            "{:<12} {:<16} {:<24} {:>8} {:>8} {:<18} {:<12} {}\n",
            "CLUSTER",
            "TRUST DOMAIN",
            "GATEWAYS",
            "EXPORTED",
            "IMPORTED",
            "BUNDLE",
            "PUBLISHED",
            "CONFLICTS"
        );
        for r in &rows {
            out.push_str(&format!(
                "{:<12} {:<16} {:<24} {:>8} {:>8} {:<18} {:<12} {}\n",
                r["cluster"].as_str().unwrap_or_default(),
                r["trust_domain"].as_str().unwrap_or_default(),
                r["gateways"].to_string(),
                r["exported"].to_string(),
                r["imported"].to_string(),
                r["bundle_fingerprint"]
                    .as_str()
                    .unwrap_or_default()
                    .chars()
                    .take(18)
                    .collect::<String>(),
                format!(
                    "{}s ago",
                    r["last_publish_ms_ago"].as_u64().unwrap_or(0) / 1000
                ),
                r["conflicts"].as_array().map(|c| c.len()).unwrap_or(0)
            ));
        }
        for r in &snap.rejected {
            out.push_str(&format!("rejected: {r}\n"));
        }
        crate::emit(&out);
    }
    Ok(ExitCode::SUCCESS)
}
