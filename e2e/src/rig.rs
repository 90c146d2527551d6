//! The multi-process rig: three clusters (`east`, `west`, `north`), each
//! in its own network namespace ([`crate::netns`], when root) or else on
//! its own loopback address (`127.0.11.1`, `127.0.12.1`, `127.0.13.1`),
//! with a controller, a gateway, two sidecars and three apps as separate
//! processes, and a three-member etcd cluster they all publish to.
//!
//! Every cluster serves and exports `echo.demo` and `echox.demo` (a TCP
//! echo app, port 7000), `http.demo` and `httpl.demo` (an HTTP app, port
//! 8080) and `sinkx.demo` (a sink app counting what it reads, port 7000)
//! behind its `srv` sidecar; its `web` sidecar has outbound listeners for
//! all five. Policy: `echo.demo` and `httpl.demo` stay local (locality);
//! `http.demo`, `echox.demo` and `sinkx.demo` prefer the next cluster in the
//! ring (east → west → north → east), so that load is cross-cluster and
//! fails over to the third cluster.
//!
//! In network namespaces with `nft`, peers reach each gateway directly:
//! cuts are nftables rules, and the WAN scenarios route every packet
//! between clusters through the packet-level WAN ([`crate::wan`]). On
//! loopback (or without `nft`) peers reach each gateway through relays
//! run by this process: a UDP relay in front of its QUIC port and a TCP
//! relay in front of its TCP fallback port, which cut either path.
//!
//! Proxies follow their controller (config and SVIDs); nothing is static
//! but their first SVID and their own trust bundle. Every process writes
//! to `<dir>/logs/<name>.log`; dropping the rig kills them all and
//! removes the directory.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use fedmesh_testkit::etcd::EtcdCluster;
use fedmesh_testkit::faults::{TcpRelay, UdpRelay};
use fedmesh_testkit::{run_load, HttpConn, LoadSpec};
use fedmesh_trust::{CertificateAuthority, TrustDomain};

use crate::netns::Netns;

pub const CLUSTERS: [&str; 3] = ["east", "west", "north"];

/// Where every controller allocates ClusterSet IPs from; in namespaces,
/// nftables redirects connections to it to the `web` sidecar.
pub const CLUSTERSET_CIDR: &str = "241.0.0.0/24";

/// How long a process gets to stop after SIGTERM before SIGKILL.
const STOP_LIMIT: Duration = Duration::from_secs(15);

/// One cluster's addresses.
#[derive(Debug, Clone)]
pub struct Cluster {
    pub name: String,
    pub ip: IpAddr,
    /// Where peers reach the gateway: its own address in namespaces with
    /// `nft`, else its relay.
    pub quic_public: SocketAddr,
    pub quic: SocketAddr,
    /// The gateway's TCP fallback listener, and where peers reach it.
    pub tcp: SocketAddr,
    pub tcp_public: SocketAddr,
    pub tunnel: SocketAddr,
    pub api: SocketAddr,
    pub controller_admin: SocketAddr,
    /// The controller's `clusterset.local` DNS server (UDP and TCP).
    pub controller_dns: SocketAddr,
    pub gateway_admin: SocketAddr,
    /// The gateway's drill API (mTLS; operators `spiffe://<td>/ns/ops/*`).
    pub gateway_drills: SocketAddr,
    pub web_admin: SocketAddr,
    /// The `web` sidecar's transparent listener (on 127.0.0.1 in a
    /// namespace, where nftables redirects ClusterSet IPs to it).
    pub web_transparent: SocketAddr,
    pub srv_admin: SocketAddr,
    pub srv_inbound: SocketAddr,
    /// The `web` sidecar's outbound listeners.
    pub echo_out: SocketAddr,
    pub http_out: SocketAddr,
    /// Cross-cluster TCP (`echox.demo`, prefers the next cluster) and
    /// local HTTP (`httpl.demo`, stays local), for `steady`'s mix.
    pub echox_out: SocketAddr,
    pub httpl_out: SocketAddr,
    /// Cross-cluster one-way TCP (`sinkx.demo`, prefers the next cluster
    /// like `echox.demo`), served by a sink app that counts what it read.
    pub sinkx_out: SocketAddr,
    pub echo_app: SocketAddr,
    pub http_app: SocketAddr,
    pub sink_app: SocketAddr,
    /// The cluster `http.demo` prefers (the next in the ring).
    pub http_prefers: String,
}

struct Proc {
    /// The network namespace to run in, if any.
    netns: Option<String>,
    program: PathBuf,
    args: Vec<String>,
    log: PathBuf,
    child: Option<Child>,
}

pub struct Rig {
    pub clusters: Vec<Cluster>,
    /// In front of each cluster's gateway QUIC port (by cluster): without
    /// namespaces and `nft`, peers reach the gateway only through it, so
    /// the rig can cut the path between clusters.
    pub relays: BTreeMap<String, UdpRelay>,
    /// In front of each cluster's gateway TCP fallback port.
    pub tcp_relays: BTreeMap<String, TcpRelay>,
    pub etcd: EtcdCluster,
    pub dir: tempfile::TempDir,
    procs: BTreeMap<String, Proc>,
    /// Cut cluster pairs (sorted names) → whether TCP is cut too.
    cuts: Mutex<BTreeMap<(String, String), bool>>,
    /// Clusters cut off from etcd (namespaces with nft only).
    store_cuts: Mutex<std::collections::BTreeSet<String>>,
    /// etcd members' client addresses.
    etcd_clients: Vec<SocketAddr>,
    /// The packet-level WAN between the namespaces (detached unless a WAN
    /// scenario runs); dropped before the namespaces.
    pub wan: Result<crate::wan::Wan, String>,
    /// Dropped after the processes (fields drop after `Drop::drop`).
    pub netns: Option<Netns>,
    /// As written into controller configs (all members, whatever runs).
    etcd_endpoints: String,
    /// Lifetime of every SVID: the rig's first ones and the controllers'.
    pub svid_ttl: Duration,
    /// The `fedmesh` binary the processes run.
    pub fedmesh: PathBuf,
}

/// Where a controller's trust comes from: its bundle file, endorsements
/// of it (after a rotation), and the CA directory it signs SVIDs with.
pub struct TrustFiles {
    pub bundle: PathBuf,
    pub endorsements: Option<PathBuf>,
    pub ca_dir: PathBuf,
}

fn controller_yaml(
    d: &Path,
    c: &Cluster,
    endpoints: &str,
    trust: &TrustFiles,
    svid_ttl: Duration,
) -> String {
    let td = format!("{}.e2e", c.name);
    let third = CLUSTERS
        .iter()
        .find(|n| **n != c.name && **n != c.http_prefers)
        .copied()
        .unwrap_or_default();
    format!(
        "cluster: {name}\ntrust_domain: {td}\ngateways: [\"{quic}\"]\ngateways_tcp: [\"{tcp}\"]\ngateway_tunnel: \"{tunnel}\"\nlease_ttl: 3s\n\
         store: {{ kind: etcd, endpoints: [{endpoints}] }}\nbundle: {bundle}\n{endorsements}pins_dir: {pins}\nservices: {services}\n\
         admin: \"{admin}\"\napi:\n  listen: \"{api}\"\n  ca_dir: {ca_dir}\n  limits: {{ svid_ttl: {ttl}s }}\n\
         policies:\n  http.demo:\n    failover: [{prefers}, {third}]\n    retry: {{ attempts: 3 }}\n    outlier: {{ consecutive_failures: 3, base_ejection: 1s }}\n  \
           echox.demo:\n    failover: [{prefers}, {third}]\n    outlier: {{ consecutive_failures: 3, base_ejection: 1s }}\n  \
           sinkx.demo:\n    failover: [{prefers}, {third}]\n\
         clusterset_ips: {{ cidrs: [\"{CLUSTERSET_CIDR}\"] }}\ndns: {{ listen: \"{dns}\" }}\n",
        dns = c.controller_dns,
        name = c.name,
        quic = c.quic_public,
        tcp = c.tcp_public,
        tunnel = c.tunnel,
        bundle = p(&trust.bundle),
        endorsements = trust
            .endorsements
            .as_ref()
            .map(|e| format!("endorsements: {}\n", p(e)))
            .unwrap_or_default(),
        pins = p(&d.join(format!("{}-pins", c.name))),
        services = p(&d.join(format!("{}-services.yaml", c.name))),
        admin = c.controller_admin,
        api = c.api,
        ca_dir = p(&trust.ca_dir),
        ttl = svid_ttl.as_secs(),
        prefers = c.http_prefers,
    )
}

impl Drop for Rig {
    fn drop(&mut self) {
        for p in self.procs.values_mut() {
            if let Some(mut c) = p.child.take() {
                let _ = c.kill();
                let _ = c.wait();
            }
        }
    }
}

/// A free port on `ip` (TCP or UDP), chosen by the kernel.
fn free(ip: IpAddr, udp: bool) -> anyhow::Result<SocketAddr> {
    let any = SocketAddr::new(ip, 0);
    Ok(if udp {
        std::net::UdpSocket::bind(any)?.local_addr()?
    } else {
        std::net::TcpListener::bind(any)?.local_addr()?
    })
}

/// A port free for both UDP and TCP on `ip` (a DNS server takes both).
fn free_both(ip: IpAddr) -> anyhow::Result<SocketAddr> {
    for _ in 0..32 {
        let udp = std::net::UdpSocket::bind(SocketAddr::new(ip, 0))?;
        let addr = udp.local_addr()?;
        if std::net::TcpListener::bind(addr).is_ok() {
            return Ok(addr);
        }
    }
    anyhow::bail!("no port free for both UDP and TCP on {ip}")
}

fn p(x: &Path) -> String {
    x.display().to_string()
}

impl Rig {
    /// Writes every certificate and config, starts etcd and every process,
    /// and waits (bounded) until each cluster serves local and
    /// cross-cluster traffic.
    pub async fn start(
        fedmesh: &Path,
        self_exe: &Path,
        etcd_bin: PathBuf,
        netns: Option<Netns>,
        svid_ttl: Duration,
    ) -> anyhow::Result<Rig> {
        let dir = tempfile::Builder::new().prefix("fedmesh-e2e-").tempdir()?;
        let d = dir.path().to_path_buf();
        std::fs::create_dir_all(d.join("logs"))?;
        // Shared parts (etcd, relays) live where every cluster reaches them.
        let host: IpAddr = netns.as_ref().map_or([127, 0, 0, 1].into(), |n| n.host_ip);
        // Gateways are reached directly where nftables can cut the paths.
        let direct = netns.as_ref().is_some_and(|n| n.nft);
        let wan = match &netns {
            None => Err("no network namespaces (the WAN needs root and `ip`)".to_owned()),
            Some(n) if !n.nft => Err("nft is not installed (apt-get install nftables)".to_owned()),
            Some(n) => crate::wan::Wan::create(n.members()).map_err(|e| format!("{e:#}")),
        };
        let etcd = EtcdCluster::start_on(etcd_bin, 3, host)
            .context("starting the 3-member etcd cluster")?;
        let etcd_clients: Vec<SocketAddr> = etcd
            .endpoints()
            .iter()
            .filter_map(|e| e.rsplit('/').next()?.parse().ok())
            .collect();
        let endpoints = etcd
            .endpoints()
            .iter()
            .map(|e| format!("\"{e}\""))
            .collect::<Vec<_>>()
            .join(", ");

        let mut clusters = Vec::new();
        let mut cas = Vec::new();
        let mut relays = BTreeMap::new();
        let mut tcp_relays = BTreeMap::new();
        for (i, name) in CLUSTERS.iter().enumerate() {
            let ns_ip = netns.as_ref().and_then(|n| n.addr(name));
            let ip: IpAddr = match ns_ip {
                Some(a) => a,
                None => format!("127.0.{}.1", 11 + i).parse()?,
            };
            // A fresh namespace has every port free; on loopback the
            // kernel picks.
            let mut next = 20_000u16;
            let mut port = |udp: Option<bool>| -> anyhow::Result<SocketAddr> {
                if ns_ip.is_some() {
                    next += 1;
                    return Ok(SocketAddr::new(ip, next));
                }
                match udp {
                    Some(udp) => free(ip, udp),
                    // Both (the controller's DNS server).
                    None => free_both(ip),
                }
            };
            let relay_ip = if ns_ip.is_some() { host } else { ip };
            let ca = CertificateAuthority::new_root(
                TrustDomain::new(&format!("{name}.e2e"))?,
                Duration::from_secs(30 * 86_400),
            )?;
            ca.save(&d.join(format!("{name}-ca")))?;
            cas.push(ca);
            let quic = port(Some(true))?;
            let relay = UdpRelay::start_on(relay_ip, quic).await?;
            let quic_public = if direct { quic } else { relay.addr() };
            relays.insert((*name).to_owned(), relay);
            let tcp = port(Some(false))?;
            let tcp_relay = TcpRelay::start_on(relay_ip, tcp).await?;
            let tcp_public = if direct { tcp } else { tcp_relay.addr() };
            tcp_relays.insert((*name).to_owned(), tcp_relay);
            clusters.push(Cluster {
                name: (*name).to_owned(),
                ip,
                quic_public,
                quic,
                tcp,
                tcp_public,
                tunnel: port(Some(false))?,
                api: port(Some(false))?,
                controller_admin: port(Some(false))?,
                controller_dns: port(None)?,
                gateway_admin: port(Some(false))?,
                gateway_drills: port(Some(false))?,
                web_admin: port(Some(false))?,
                web_transparent: {
                    let a = port(Some(false))?;
                    if ns_ip.is_some() {
                        SocketAddr::new([127, 0, 0, 1].into(), a.port())
                    } else {
                        a
                    }
                },
                srv_admin: port(Some(false))?,
                srv_inbound: port(Some(false))?,
                echo_out: port(Some(false))?,
                http_out: port(Some(false))?,
                echox_out: port(Some(false))?,
                httpl_out: port(Some(false))?,
                sinkx_out: port(Some(false))?,
                echo_app: port(Some(false))?,
                http_app: port(Some(false))?,
                sink_app: port(Some(false))?,
                http_prefers: CLUSTERS[(i + 1) % CLUSTERS.len()].to_owned(),
            });
        }
        let mut rig = Rig {
            clusters: clusters.clone(),
            relays,
            tcp_relays,
            etcd,
            dir,
            procs: BTreeMap::new(),
            cuts: Mutex::new(BTreeMap::new()),
            store_cuts: Mutex::new(Default::default()),
            etcd_clients,
            wan,
            netns,
            etcd_endpoints: endpoints.clone(),
            svid_ttl,
            fedmesh: fedmesh.to_path_buf(),
        };
        for (c, ca) in clusters.iter().zip(&cas) {
            let td = ca.trust_domain().clone();
            // Pins: this cluster admits every other one's root.
            let pins = d.join(format!("{}-pins", c.name));
            std::fs::create_dir_all(&pins)?;
            for o in clusters.iter().filter(|o| o.name != c.name) {
                std::fs::copy(
                    d.join(format!("{}-ca/bundle.pem", o.name)),
                    pins.join(format!("{}.pem", o.name)),
                )?;
            }
            for (who, id) in [
                ("gw", td.system_id("gateway")),
                ("web", td.workload("demo", "web")?),
                ("srv", td.workload("demo", "srv")?),
                // An operator of the gateway's drill API.
                ("ops", td.workload("ops", "drill")?),
            ] {
                ca.issue(&id, svid_ttl)?
                    .save(&d.join(format!("{}-{who}", c.name)))?;
            }
            // The operator's directory as `fedmesh ca issue --out` writes it.
            std::fs::copy(
                d.join(format!("{}-ca/bundle.pem", c.name)),
                d.join(format!("{}-ops/bundle.pem", c.name)),
            )?;
            let srv_id = td.workload("demo", "srv")?;
            std::fs::write(
                d.join(format!("{}-services.yaml", c.name)),
                services_file(c, &srv_id.to_string(), false),
            )?;
            let controller = controller_yaml(
                &d,
                c,
                &endpoints,
                &TrustFiles {
                    bundle: d.join(format!("{}-ca/bundle.pem", c.name)),
                    endorsements: None,
                    ca_dir: d.join(format!("{}-ca", c.name)),
                },
                svid_ttl,
            );
            let common = |who: &str| {
                format!(
                    "identity: {{ cert: {}, key: {} }}\nbundles: [ {{ trust_domain: {td}, path: {} }} ]\ncontroller: {{ address: \"{}\", cluster: {} }}\n",
                    p(&d.join(format!("{}-{who}/svid.pem", c.name))),
                    p(&d.join(format!("{}-{who}/svid.key", c.name))),
                    p(&d.join(format!("{}-ca/bundle.pem", c.name))),
                    c.api,
                    c.name,
                )
            };
            let gateway = format!(
                "listen: {{ quic: \"{}\", tunnel: \"{}\", tcp_fallback: \"{}\", admin: \"{}\" }}\n\
                 drills: {{ listen: \"{}\", operators: [\"spiffe://{}/ns/ops/*\"] }}\n{}",
                c.quic,
                c.tunnel,
                c.tcp,
                c.gateway_admin,
                c.gateway_drills,
                ca.trust_domain(),
                common("gw")
            );
            let web = format!(
                "{}admin: \"{}\"\ntransparent: {{ listen: \"{}\" }}\noutbound:\n  - {{ listen: \"{}\", service: echo.demo, port: 7000, protocol: tcp }}\n  - {{ listen: \"{}\", service: http.demo, port: 8080 }}\n  - {{ listen: \"{}\", service: echox.demo, port: 7000, protocol: tcp }}\n  - {{ listen: \"{}\", service: httpl.demo, port: 8080 }}\n  - {{ listen: \"{}\", service: sinkx.demo, port: 7000, protocol: tcp }}\n",
                common("web"),
                c.web_admin,
                c.web_transparent,
                c.echo_out,
                c.http_out,
                c.echox_out,
                c.httpl_out,
                c.sinkx_out
            );
            let srv = format!(
                "{}admin: \"{}\"\ninbound:\n  listen: \"{}\"\n  services:\n    - {{ service: echo.demo, port: 7000, app: \"{}\" }}\n    - {{ service: http.demo, port: 8080, app: \"{}\" }}\n    - {{ service: echox.demo, port: 7000, app: \"{}\" }}\n    - {{ service: httpl.demo, port: 8080, app: \"{}\" }}\n    - {{ service: sinkx.demo, port: 7000, app: \"{}\" }}\n",
                common("srv"),
                c.srv_admin,
                c.srv_inbound,
                c.echo_app,
                c.http_app,
                c.echo_app,
                c.http_app,
                c.sink_app
            );
            for (file, text) in [
                ("controller", controller),
                ("gateway", gateway),
                ("web", web),
                ("srv", srv),
            ] {
                std::fs::write(d.join(format!("{}-{file}.yaml", c.name)), text)?;
            }
            let ns = rig
                .netns
                .as_ref()
                .and_then(|n| n.namespace(&c.name))
                .map(str::to_owned);
            for (kind, listen) in [
                ("echo", c.echo_app),
                ("sink", c.sink_app),
                ("http", c.http_app),
            ] {
                rig.add(
                    &format!("{}-{kind}", c.name),
                    ns.clone(),
                    self_exe,
                    &[
                        "app",
                        "--kind",
                        kind,
                        "--name",
                        &format!("{}/{kind}", c.name),
                        "--listen",
                        &listen.to_string(),
                    ],
                );
            }
            for (kind, file) in [
                ("controller", "controller"),
                ("gateway", "gateway"),
                ("sidecar", "web"),
                ("sidecar", "srv"),
            ] {
                let cfg = p(&d.join(format!("{}-{file}.yaml", c.name)));
                let mut args = vec![kind, "--config", &cfg];
                if kind == "gateway" {
                    args.extend(["--drain", "3s"]);
                }
                rig.add(&format!("{}-{file}", c.name), ns.clone(), fedmesh, &args);
            }
        }
        if let Some(n) = rig.netns.as_ref().filter(|n| n.nft) {
            for c in &rig.clusters {
                n.redirect_tcp(&c.name, CLUSTERSET_CIDR, c.web_transparent.port())?;
            }
        }
        let names: Vec<String> = rig.procs.keys().cloned().collect();
        for n in &names {
            rig.start_proc(n)?;
        }
        rig.wait_serving(Duration::from_secs(60)).await?;
        Ok(rig)
    }

    fn add(&mut self, name: &str, netns: Option<String>, program: &Path, args: &[&str]) {
        let log = self.dir.path().join("logs").join(format!("{name}.log"));
        self.procs.insert(
            name.to_owned(),
            Proc {
                netns,
                program: program.to_path_buf(),
                args: args.iter().map(|a| (*a).to_owned()).collect(),
                log,
                child: None,
            },
        );
    }

    /// Starts (or restarts) a process by name.
    pub fn start_proc(&mut self, name: &str) -> anyhow::Result<()> {
        let p = self
            .procs
            .get_mut(name)
            .with_context(|| format!("no process {name}"))?;
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&p.log)?;
        // `ip netns exec` execs the program: the child is the process itself.
        let mut cmd = match &p.netns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns]).arg(&p.program);
                c
            }
            None => Command::new(&p.program),
        };
        let child = cmd
            .args(&p.args)
            .env("FEDMESH_LOG", "warn,fedmesh_gateway=info")
            .stdout(log.try_clone()?)
            .stderr(log)
            .stdin(Stdio::null())
            .spawn()
            .with_context(|| format!("starting {name} ({})", p.program.display()))?;
        p.child = Some(child);
        Ok(())
    }

    /// A running process's resident set, KiB (`/proc/<pid>/status`).
    pub fn rss_kib(&self, name: &str) -> Option<u64> {
        let pid = self.procs.get(name)?.child.as_ref()?.id();
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))?
            .trim()
            .trim_end_matches("kB")
            .trim()
            .parse()
            .ok()
    }

    /// SIGKILL: a crash.
    pub fn kill(&mut self, name: &str) {
        if let Some(mut c) = self.procs.get_mut(name).and_then(|p| p.child.take()) {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM, then waits (bounded) for it to exit: a graceful stop.
    pub async fn stop(&mut self, name: &str) -> anyhow::Result<Duration> {
        let Some(mut c) = self.procs.get_mut(name).and_then(|p| p.child.take()) else {
            bail!("{name} is not running");
        };
        let t0 = Instant::now();
        let _ = Command::new("kill")
            .args(["-TERM", &c.id().to_string()])
            .status();
        loop {
            if c.try_wait()?.is_some() {
                return Ok(t0.elapsed());
            }
            if t0.elapsed() > STOP_LIMIT {
                let _ = c.kill();
                let _ = c.wait();
                bail!("{name} did not stop within {STOP_LIMIT:?} of SIGTERM");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Processes that exited on their own (a crash the scenario did not cause).
    pub fn exited(&mut self) -> Vec<String> {
        let mut out = Vec::new();
        for (n, p) in &mut self.procs {
            if let Some(c) = p.child.as_mut() {
                if let Ok(Some(st)) = c.try_wait() {
                    out.push(format!("{n} ({st})"));
                }
            }
        }
        out
    }

    /// The last lines of a process's log, for failure reports.
    pub fn log_tail(&self, name: &str, lines: usize) -> String {
        let Some(p) = self.procs.get(name) else {
            return String::new();
        };
        let text = std::fs::read_to_string(&p.log).unwrap_or_default();
        let v: Vec<&str> = text.lines().collect();
        v[v.len().saturating_sub(lines)..].join("\n")
    }

    /// `ip netns exec`'s namespace of `cluster`, when the rig runs in
    /// namespaces.
    pub fn namespace(&self, cluster: &str) -> Option<&str> {
        self.netns.as_ref()?.namespace(cluster)
    }

    pub fn cluster(&self, name: &str) -> Option<&Cluster> {
        self.clusters.iter().find(|c| c.name == name)
    }

    fn nft(&self) -> bool {
        self.netns.as_ref().is_some_and(|n| n.nft)
    }

    /// Cuts (or restores) `cluster`'s path to etcd, when that can be done
    /// (namespaces with nft: `Ok(false)` otherwise, nothing changed).
    pub fn cut_store(&self, cluster: &str, on: bool) -> anyhow::Result<bool> {
        if !self.nft() {
            return Ok(false);
        }
        {
            let mut sc = self.store_cuts.lock().unwrap_or_else(|p| p.into_inner());
            if on {
                sc.insert(cluster.to_owned());
            } else {
                sc.remove(cluster);
            }
        }
        let cuts = self.cuts.lock().unwrap_or_else(|p| p.into_inner()).clone();
        self.apply_nft(&cuts)?;
        Ok(true)
    }

    /// Rewrites every namespace's rules from the cuts in force.
    fn apply_nft(&self, cuts: &BTreeMap<(String, String), bool>) -> anyhow::Result<()> {
        let Some(n) = self.netns.as_ref() else {
            return Ok(());
        };
        let store_cuts = self
            .store_cuts
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        for c in &self.clusters {
            let mut rules = Vec::new();
            for ((x, y), tcp) in cuts {
                let other = match (x == &c.name, y == &c.name) {
                    (true, _) => y,
                    (_, true) => x,
                    _ => continue,
                };
                let Some(o) = self.cluster(other) else {
                    continue;
                };
                let mut paths = vec![("udp", o.quic_public)];
                if *tcp {
                    paths.push(("tcp", o.tcp_public));
                }
                for (proto, at) in paths {
                    let (ip, port) = (at.ip(), at.port());
                    rules.push(("output", format!("ip daddr {ip} {proto} dport {port} drop")));
                    rules.push(("input", format!("ip saddr {ip} {proto} sport {port} drop")));
                }
            }
            if store_cuts.contains(&c.name) {
                for at in &self.etcd_clients {
                    let (ip, port) = (at.ip(), at.port());
                    rules.push(("output", format!("ip daddr {ip} tcp dport {port} drop")));
                    rules.push(("input", format!("ip saddr {ip} tcp sport {port} drop")));
                }
            }
            n.set_rules(&c.name, &rules)?;
        }
        Ok(())
    }

    /// Cuts (or restores) the path between clusters `a` and `b`, both
    /// ways: UDP (QUIC), and with `tcp` the TCP fallback too. With
    /// namespaces and `nft`, by nftables rules in both namespaces (a
    /// dropped SYN, a dropped datagram); otherwise by the relays.
    pub fn cut(&self, a: &str, b: &str, tcp: bool, on: bool) -> anyhow::Result<()> {
        let key = if a < b { (a, b) } else { (b, a) };
        let key = (key.0.to_owned(), key.1.to_owned());
        let cuts = {
            let mut cuts = self.cuts.lock().unwrap_or_else(|p| p.into_inner());
            if on {
                cuts.insert(key, tcp);
            } else {
                cuts.remove(&key);
            }
            cuts.clone()
        };
        if self.nft() {
            return self.apply_nft(&cuts);
        }
        for (me, them) in [(a, b), (b, a)] {
            let Some(ip) = self.cluster(them).map(|c| c.ip) else {
                continue;
            };
            if let Some(r) = self.relays.get(me) {
                r.block(ip, on);
            }
            if tcp || !on {
                if let Some(r) = self.tcp_relays.get(me) {
                    r.block(ip, on);
                }
            }
        }
        Ok(())
    }

    /// Waits until every cluster's `web` sidecar gets an echo answered
    /// locally and an HTTP answer from another cluster.
    pub async fn wait_serving(&mut self, limit: Duration) -> anyhow::Result<Duration> {
        let t0 = Instant::now();
        for c in self.clusters.clone() {
            loop {
                if serves(&c).await {
                    break;
                }
                let dead = self.exited();
                if !dead.is_empty() {
                    let tails: Vec<String> = dead
                        .iter()
                        .map(|d| {
                            let n = d.split(' ').next().unwrap_or("");
                            format!("--- {d}\n{}", self.log_tail(n, 20))
                        })
                        .collect();
                    bail!("processes exited: {}", tails.join("\n"));
                }
                if t0.elapsed() > limit {
                    bail!(
                        "{} did not serve within {limit:?}; web sidecar log:\n{}",
                        c.name,
                        self.log_tail(&format!("{}-web", c.name), 20)
                    );
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
        Ok(t0.elapsed())
    }

    /// Rewrites `cluster`'s controller config with other trust files and
    /// restarts the controller the way an operator would (SIGTERM, start).
    pub async fn restart_controller_with(
        &mut self,
        cluster: &str,
        trust: &TrustFiles,
    ) -> anyhow::Result<()> {
        let c = self.cluster(cluster).context("no such cluster")?.clone();
        let d = self.dir.path().to_path_buf();
        std::fs::write(
            d.join(format!("{cluster}-controller.yaml")),
            controller_yaml(&d, &c, &self.etcd_endpoints, trust, self.svid_ttl),
        )?;
        let name = format!("{cluster}-controller");
        self.stop(&name).await?;
        self.start_proc(&name)
    }

    /// Restarts `cluster`'s gateway (SIGTERM, start) with `congestion`
    /// as its config's `congestion` mapping (inline YAML without braces,
    /// e.g. `controller: bbr`; `None`: the defaults), and waits until
    /// every cluster serves again.
    pub async fn restart_gateway_with_congestion(
        &mut self,
        cluster: &str,
        congestion: Option<&str>,
    ) -> anyhow::Result<()> {
        let file = self.dir.path().join(format!("{cluster}-gateway.yaml"));
        let text = std::fs::read_to_string(&file)?;
        let mut kept: String = text
            .lines()
            .filter(|l| !l.starts_with("congestion:"))
            .map(|l| format!("{l}\n"))
            .collect();
        if let Some(c) = congestion {
            kept.push_str(&format!("congestion: {{ {c} }}\n"));
        }
        std::fs::write(&file, kept)?;
        let name = format!("{cluster}-gateway");
        self.stop(&name).await?;
        self.start_proc(&name)?;
        self.wait_serving(Duration::from_secs(30)).await?;
        Ok(())
    }

    /// The SVID file a cluster's proxy (`gw`, `web`, `srv`) presents; the
    /// proxy rewrites it on every renewal.
    pub fn svid_file(&self, cluster: &str, who: &str) -> PathBuf {
        self.dir.path().join(format!("{cluster}-{who}/svid.pem"))
    }

    /// Rewrites a cluster's services file, with or without `extra.demo`
    /// (exported, served by the same sidecar): a catalog change the
    /// controllers must carry to every other cluster.
    pub fn set_extra_service(&self, cluster: &str, on: bool) -> anyhow::Result<()> {
        let c = self.cluster(cluster).context("no such cluster")?;
        let id = format!("spiffe://{cluster}.e2e/ns/demo/sa/srv");
        std::fs::write(
            self.dir.path().join(format!("{cluster}-services.yaml")),
            services_file(c, &id, on),
        )?;
        Ok(())
    }
}

/// Services every cluster exports (`services_file` without `extra.demo`).
pub const SERVICES: u64 = 5;

fn services_file(c: &Cluster, srv_id: &str, extra: bool) -> String {
    let mut s = String::from("services:\n");
    let mut svc = |name: &str, port: u16| {
        s.push_str(&format!(
            "  - name: {name}\n    ports: [{port}]\n    export: true\n    endpoints: [ {{ address: \"{}\", identity: \"{srv_id}\" }} ]\n",
            c.srv_inbound
        ));
    };
    svc("echo.demo", 7000);
    svc("http.demo", 8080);
    svc("echox.demo", 7000);
    svc("httpl.demo", 8080);
    svc("sinkx.demo", 7000);
    if extra {
        svc("extra.demo", 7000);
    }
    s
}

/// One echo round trip served by this cluster, and one HTTP request
/// served by another.
async fn serves(c: &Cluster) -> bool {
    let spec = LoadSpec {
        connections: 1,
        requests_per_connection: 1,
        timeout: Duration::from_secs(2),
        ..LoadSpec::default()
    };
    let echo = run_load(c.echo_out, &spec).await;
    let local = echo.ok == 1
        && echo
            .served_by
            .keys()
            .all(|k| k.starts_with(&format!("{}/", c.name)));
    if !local {
        return false;
    }
    let http = async {
        let mut h = HttpConn::connect(c.http_out, false).await?;
        h.get("/", &[]).await
    };
    matches!(
        tokio::time::timeout(Duration::from_secs(2), http).await,
        Ok(Ok(r)) if r.status == 200 && !r.served_by.starts_with(&format!("{}/", c.name))
    )
}

/// GETs `path` from an admin endpoint: (status code, body).
pub async fn admin_get(addr: SocketAddr, path: &str) -> Option<(u16, String)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let io = async {
        let mut s = tokio::net::TcpStream::connect(addr).await?;
        s.write_all(format!("GET {path} HTTP/1.1\r\nhost: x\r\n\r\n").as_bytes())
            .await?;
        let mut out = String::new();
        s.read_to_string(&mut out).await?;
        Ok::<_, std::io::Error>(out)
    };
    let out = tokio::time::timeout(Duration::from_secs(2), io)
        .await
        .ok()?
        .ok()?;
    let code = out.split(' ').nth(1)?.parse().ok()?;
    let body = out.split_once("\r\n\r\n").map(|x| x.1).unwrap_or("");
    Some((code, body.to_owned()))
}
