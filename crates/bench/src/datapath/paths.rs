//! Each path of the data-path benchmark, started as separate processes
//! with generated certificates and configs, and stopped when dropped.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use fedmesh_trust::{CertificateAuthority, SpiffeId, TrustDomain};

use super::load::{self, Dialer};
use crate::procs::{free_tcp, free_udp, wait_listening, Proc};

/// Every path, in the order they run and print.
pub const ALL: [&str; 7] = [
    "direct", "haproxy", "stunnel", "sidecars", "quic", "tcp", "quinn",
];

const TTL: Duration = Duration::from_secs(24 * 3600);

/// A running path.
pub struct RunningPath {
    pub id: &'static str,
    pub name: &'static str,
    /// Proxies between client and app (none for the raw quinn stream,
    /// whose far end is the app's own process).
    pub hops: u32,
    pub procs: Vec<Proc>,
    pub dialer: Dialer,
    /// What must live as long as the path (a silent UDP port, a quinn
    /// endpoint).
    pub _keep: Vec<Box<dyn std::any::Any + Send>>,
}

/// Settings the benchmark changes in the proxies' configs.
pub struct Knobs {
    pub congestion: Option<fedmesh_gateway::Algorithm>,
    pub sidecar_pool: Option<usize>,
    pub proxy_threads: Option<u16>,
}

/// What every path is built from.
pub struct Env {
    pub dir: PathBuf,
    pub logs: PathBuf,
    pub fedmesh: PathBuf,
    pub self_exe: PathBuf,
    pub haproxy: PathBuf,
    pub stunnel: PathBuf,
    pub app: SocketAddr,
    /// `congestion:` of every gateway config (QUIC's controller), when
    /// not the default.
    pub congestion: Option<fedmesh_gateway::Algorithm>,
    /// `limits.pool_connections` of every sidecar and gateway, when not
    /// the default.
    pub sidecar_pool: Option<usize>,
    /// `--worker-threads` of every fedmesh proxy, when not the default.
    pub proxy_threads: Option<u16>,
    east: (TrustDomain, CertificateAuthority),
    west: (TrustDomain, CertificateAuthority),
}

fn p(x: &Path) -> String {
    x.display().to_string()
}

impl Env {
    pub fn new(
        dir: PathBuf,
        fedmesh: PathBuf,
        self_exe: PathBuf,
        haproxy: PathBuf,
        stunnel: PathBuf,
        app: SocketAddr,
        knobs: Knobs,
    ) -> anyhow::Result<Env> {
        let ca = |name: &str| -> anyhow::Result<(TrustDomain, CertificateAuthority)> {
            let td = TrustDomain::new(name)?;
            let ca = CertificateAuthority::new_root(td.clone(), TTL * 30)?;
            let pem = fedmesh_trust::pem::encode_certs(&[ca.certificate().clone()]);
            std::fs::write(dir.join(format!("{name}.pem")), pem)?;
            Ok((td, ca))
        };
        let logs = dir.join("logs");
        std::fs::create_dir_all(&logs)?;
        Ok(Env {
            east: ca("east.bench")?,
            west: ca("west.bench")?,
            logs,
            dir,
            fedmesh,
            self_exe,
            haproxy,
            stunnel,
            app,
            congestion: knobs.congestion,
            sidecar_pool: knobs.sidecar_pool,
            proxy_threads: knobs.proxy_threads,
        })
    }

    /// The lines every sidecar config of the benchmark adds (gateways
    /// too: the pool bound).
    fn sidecar_extra(&self) -> String {
        self.sidecar_pool
            .map(|n| format!("limits: {{ pool_connections: {n} }}\n"))
            .unwrap_or_default()
    }

    /// The lines every gateway config of the benchmark adds.
    fn gateway_extra(&self) -> String {
        let mut s = self
            .congestion
            .map(|a| format!("congestion: {{ controller: {a} }}\n"))
            .unwrap_or_default();
        s.push_str(&self.sidecar_extra());
        s
    }

    pub async fn start(&self, id: &str) -> anyhow::Result<RunningPath> {
        match id {
            "direct" => Ok(RunningPath {
                id: "direct",
                name: "direct TCP",
                hops: 0,
                procs: Vec::new(),
                dialer: Dialer::Tcp(self.app),
                _keep: Vec::new(),
            }),
            "haproxy" => self.haproxy().await,
            "stunnel" => self.stunnel().await,
            "sidecars" => self.sidecars().await,
            "quic" => self.cross_cluster(false).await,
            "tcp" => self.cross_cluster(true).await,
            "quinn" => self.quinn().await,
            other => bail!("no path `{other}` (paths: {})", ALL.join(", ")),
        }
    }

    /// Writes an SVID for `id` as `<name>.crt` (chain) and `<name>.key`.
    fn svid(&self, west: bool, id: &SpiffeId, name: &str) -> anyhow::Result<(PathBuf, PathBuf)> {
        let ca = if west { &self.west.1 } else { &self.east.1 };
        let svid = ca.issue(id, TTL)?;
        let (crt, key) = (
            self.dir.join(format!("{name}.crt")),
            self.dir.join(format!("{name}.key")),
        );
        std::fs::write(&crt, fedmesh_trust::pem::encode_certs(svid.chain()))?;
        std::fs::write(&key, fedmesh_trust::pem::encode_key(&svid.key()))?;
        Ok((crt, key))
    }

    fn td(&self, west: bool) -> &TrustDomain {
        if west {
            &self.west.0
        } else {
            &self.east.0
        }
    }

    /// The `identity:` and `bundles:` lines of a fedmesh config.
    fn fedmesh_identity(&self, west: bool, id: &SpiffeId, name: &str) -> anyhow::Result<String> {
        let (crt, key) = self.svid(west, id, name)?;
        Ok(format!(
            "identity: {{ cert: {}, key: {} }}\nbundles:\n  - {{ trust_domain: east.bench, path: {} }}\n  - {{ trust_domain: west.bench, path: {} }}\n",
            p(&crt),
            p(&key),
            p(&self.dir.join("east.bench.pem")),
            p(&self.dir.join("west.bench.pem")),
        ))
    }

    fn spawn_fedmesh(&self, kind: &str, name: &str, yaml: &str) -> anyhow::Result<Proc> {
        let file = self.dir.join(format!("{name}.yaml"));
        std::fs::write(&file, yaml)?;
        let threads = self.proxy_threads.map(|n| n.to_string());
        let config = p(&file);
        let mut args = vec![kind, "--config", &config];
        if let Some(n) = &threads {
            args.extend(["--worker-threads", n]);
        }
        Proc::spawn(name, &self.fedmesh, &args, &self.logs)
    }

    async fn haproxy(&self) -> anyhow::Result<RunningPath> {
        let port = free_tcp()?;
        let cfg = self.dir.join("haproxy.cfg");
        std::fs::write(
            &cfg,
            format!(
                "global\n  maxconn 4096\ndefaults\n  mode tcp\n  timeout connect 5s\n  timeout client 60s\n  timeout server 60s\n\
                 frontend f\n  bind {port}\n  default_backend app\nbackend app\n  server app {}\n",
                self.app
            ),
        )?;
        let mut procs = vec![Proc::spawn(
            "haproxy",
            &self.haproxy,
            &["-db", "-f", &p(&cfg)],
            &self.logs,
        )?];
        wait_listening(port, &mut procs).await?;
        Ok(RunningPath {
            id: "haproxy",
            name: "haproxy 1 hop",
            hops: 1,
            procs,
            dialer: Dialer::Tcp(port),
            _keep: Vec::new(),
        })
    }

    /// A stunnel pair with mutual TLS 1.3: the client end presents a
    /// certificate and checks the server's against the CA, the server end
    /// requires and checks the client's.
    async fn stunnel(&self) -> anyhow::Result<RunningPath> {
        let (a, b) = (free_tcp()?, free_tcp()?);
        let (a_crt, a_key) = self.svid(
            false,
            &self.td(false).workload("bench", "client")?,
            "stunnel-a",
        )?;
        let (b_crt, b_key) = self.svid(
            false,
            &self.td(false).workload("bench", "app")?,
            "stunnel-b",
        )?;
        let ca = p(&self.dir.join("east.bench.pem"));
        let conf = |name: &str,
                    client: bool,
                    accept: SocketAddr,
                    connect: SocketAddr,
                    crt: &Path,
                    key: &Path| {
            format!(
                "foreground = yes\npid =\ndebug = 3\n[{name}]\nclient = {}\naccept = {accept}\nconnect = {connect}\ncert = {}\nkey = {}\nCAfile = {ca}\nverifyChain = yes\nsslVersionMin = TLSv1.3\n",
                if client { "yes" } else { "no" },
                p(crt),
                p(key),
            )
        };
        let mut procs = Vec::new();
        for (name, text) in [
            (
                "stunnel-server",
                conf("server", false, b, self.app, &b_crt, &b_key),
            ),
            ("stunnel-client", conf("client", true, a, b, &a_crt, &a_key)),
        ] {
            let file = self.dir.join(format!("{name}.conf"));
            std::fs::write(&file, text)?;
            procs.push(Proc::spawn(name, &self.stunnel, &[&p(&file)], &self.logs)?);
        }
        wait_listening(b, &mut procs).await?;
        wait_listening(a, &mut procs).await?;
        Ok(RunningPath {
            id: "stunnel",
            name: "stunnel pair",
            hops: 2,
            procs,
            dialer: Dialer::Tcp(a),
            _keep: Vec::new(),
        })
    }

    /// Two sidecars of one cluster: client → A (outbound) ═mTLS═ B
    /// (inbound) → app.
    async fn sidecars(&self) -> anyhow::Result<RunningPath> {
        let (out, inb) = (free_tcp()?, free_tcp()?);
        let td = self.td(false);
        let app_id = td.workload("bench", "app")?;
        let catalog = format!(
            "catalog:\n  cluster: east\n  trust_domain: east.bench\n  services:\n    - name: app.bench\n      ports: [7000]\n      endpoints: [ {{ address: \"{inb}\", identity: \"{app_id}\" }} ]\n"
        );
        let a = format!(
            "{}{}{catalog}outbound: [ {{ listen: \"{out}\", service: app.bench, port: 7000, protocol: tcp }} ]\n",
            self.sidecar_extra(),
            self.fedmesh_identity(false, &td.workload("bench", "client")?, "sidecar-a")?
        );
        let b = format!(
            "{}{catalog}inbound:\n  listen: \"{inb}\"\n  services: [ {{ service: app.bench, port: 7000, app: \"{}\" }} ]\n",
            self.fedmesh_identity(false, &app_id, "sidecar-b")?,
            self.app
        );
        let procs = vec![
            self.spawn_fedmesh("sidecar", "sidecar-a", &a)?,
            self.spawn_fedmesh("sidecar", "sidecar-b", &b)?,
        ];
        let mut path = RunningPath {
            id: "sidecars",
            name: "fedmesh sidecar pair",
            hops: 2,
            procs,
            dialer: Dialer::Tcp(out),
            _keep: Vec::new(),
        };
        ready(&mut path).await?;
        Ok(path)
    }

    /// client → east sidecar → east gateway ═QUIC or TCP fallback═ west
    /// gateway → west sidecar → app. For the fallback, east knows west's
    /// QUIC port as a UDP socket that never answers, so its gateway falls
    /// back to TCP by itself, as on a path that drops UDP.
    async fn cross_cluster(&self, fallback: bool) -> anyhow::Result<RunningPath> {
        let (q1, t1, a1) = (free_udp()?, free_tcp()?, free_tcp()?);
        let (q2, t2, f2, i2, out) = (
            free_udp()?,
            free_tcp()?,
            free_tcp()?,
            free_tcp()?,
            free_tcp()?,
        );
        let silent = std::net::UdpSocket::bind("127.0.0.1:0")?;
        let (east, west) = (self.td(false), self.td(true));
        let app_id = west.workload("bench", "app")?;
        let (west_quic, west_tcp, west_listen_tcp) = if fallback {
            (
                silent.local_addr()?,
                format!(", gateway_tcp: \"{f2}\""),
                format!(", tcp_fallback: \"{f2}\""),
            )
        } else {
            (q2, String::new(), String::new())
        };
        let east_catalog = format!(
            "catalog:\n  cluster: east\n  trust_domain: east.bench\n  gateway: {{ address: \"{t1}\" }}\n  imports: [ {{ service: app.bench, clusters: [west] }} ]\n  peers: [ {{ cluster: west, trust_domain: west.bench, gateway: \"{west_quic}\"{west_tcp} }} ]\n"
        );
        let west_catalog = format!(
            "catalog:\n  cluster: west\n  trust_domain: west.bench\n  gateway: {{ address: \"{t2}\" }}\n  services:\n    - name: app.bench\n      ports: [7000]\n      export: true\n      endpoints: [ {{ address: \"{i2}\", identity: \"{app_id}\" }} ]\n  peers: [ {{ cluster: east, trust_domain: east.bench, gateway: \"{q1}\" }} ]\n"
        );
        let gw_id = |west: bool| self.td(west).system_id("gateway");
        let files = [
            ("gateway", "east-gateway", format!(
                "listen: {{ quic: \"{q1}\", tunnel: \"{t1}\", admin: \"{a1}\" }}\n{}{}{east_catalog}",
                self.gateway_extra(),
                self.fedmesh_identity(false, &gw_id(false), "east-gateway")?
            )),
            ("gateway", "west-gateway", format!(
                "listen: {{ quic: \"{q2}\", tunnel: \"{t2}\"{west_listen_tcp} }}\n{}{}{west_catalog}",
                self.gateway_extra(),
                self.fedmesh_identity(true, &gw_id(true), "west-gateway")?
            )),
            ("sidecar", "east-sidecar", format!(
                "{}{}{east_catalog}outbound: [ {{ listen: \"{out}\", service: app.bench, port: 7000, protocol: tcp }} ]\n",
                self.sidecar_extra(),
                self.fedmesh_identity(false, &east.workload("bench", "client")?, "east-sidecar")?
            )),
            ("sidecar", "west-sidecar", format!(
                "{}{west_catalog}inbound:\n  listen: \"{i2}\"\n  services: [ {{ service: app.bench, port: 7000, app: \"{}\" }} ]\n",
                self.fedmesh_identity(true, &app_id, "west-sidecar")?,
                self.app
            )),
        ];
        let mut procs = Vec::new();
        for (kind, name, yaml) in &files {
            procs.push(self.spawn_fedmesh(kind, name, yaml)?);
        }
        let (id, name) = if fallback {
            ("tcp", "cross-cluster TCP fallback")
        } else {
            ("quic", "cross-cluster QUIC")
        };
        let mut path = RunningPath {
            id,
            name,
            hops: 4,
            procs,
            dialer: Dialer::Tcp(out),
            _keep: vec![Box::new(silent)],
        };
        wait_listening(a1, &mut path.procs).await?;
        // The path must be the one named: wait (bounded) until east's
        // gateway reaches west over the transport this path measures.
        let want = if fallback { "tcp" } else { "quic" };
        let t0 = Instant::now();
        loop {
            // Traffic makes the gateway dial (and, for the fallback, give
            // up on QUIC); a failure here is expected until then.
            let _ =
                tokio::time::timeout(Duration::from_secs(2), load::goodput(&path.dialer, 1, 1024))
                    .await;
            if peer_transport(a1).await.ok().as_deref() == Some(want) {
                break;
            }
            for p in &mut path.procs {
                p.alive()?;
            }
            if t0.elapsed() > Duration::from_secs(30) {
                bail!(
                    "east's gateway did not reach west over {want} within 30 s (logs in {})",
                    self.logs.display()
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        ready(&mut path).await?;
        Ok(path)
    }

    /// One quinn stream between the benchmark and a `fedmesh-bench
    /// quic-peer` process that runs the app itself, both with a gateway's
    /// TLS, transport and socket settings (from gateway configs).
    async fn quinn(&self) -> anyhow::Result<RunningPath> {
        let q = free_udp()?;
        let (east, west) = (
            self.td(false).system_id("gateway"),
            self.td(true).system_id("gateway"),
        );
        let server_yaml = self.dir.join("quinn-server.yaml");
        std::fs::write(
            &server_yaml,
            format!(
                "listen: {{ quic: \"{q}\", tunnel: \"127.0.0.1:1\" }}\ncatalog: {{ cluster: west, trust_domain: west.bench }}\n{}{}",
                self.gateway_extra(),
                self.fedmesh_identity(true, &west, "quinn-server")?
            ),
        )?;
        let client_yaml = self.dir.join("quinn-client.yaml");
        std::fs::write(
            &client_yaml,
            format!(
                "listen: {{ quic: \"127.0.0.1:0\", tunnel: \"127.0.0.1:1\" }}\ncatalog: {{ cluster: east, trust_domain: east.bench }}\n{}{}",
                self.gateway_extra(),
                self.fedmesh_identity(false, &east, "quinn-client")?
            ),
        )?;
        let mut server = Proc::spawn(
            "quinn-server",
            &self.self_exe,
            &["quic-peer", "--config", &p(&server_yaml)],
            &self.logs,
        )?;
        let log = self.logs.join("quinn-server.log");
        let t0 = Instant::now();
        while !std::fs::read_to_string(&log)
            .unwrap_or_default()
            .contains(super::rawquic::UP)
        {
            server.alive()?;
            if t0.elapsed() > Duration::from_secs(10) {
                bail!(
                    "the quinn server did not start within 10 s:\n{}",
                    server.log_tail()
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let (endpoint, conn) = super::rawquic::connect(&client_yaml, q).await?;
        let mut path = RunningPath {
            id: "quinn",
            name: "raw quinn stream",
            hops: 0,
            procs: vec![server],
            dialer: Dialer::Quic(conn),
            _keep: vec![Box::new(endpoint)],
        };
        ready(&mut path).await?;
        Ok(path)
    }
}

/// Waits (bounded) until a probe crosses the whole path.
async fn ready(path: &mut RunningPath) -> anyhow::Result<()> {
    let t0 = Instant::now();
    loop {
        match tokio::time::timeout(Duration::from_secs(2), load::goodput(&path.dialer, 1, 1024))
            .await
        {
            Ok(Ok(_)) => return Ok(()),
            Ok(Err(e)) if t0.elapsed() > Duration::from_secs(20) => {
                return Err(e).context(format!("{} never carried traffic", path.name))
            }
            _ if t0.elapsed() > Duration::from_secs(20) => {
                bail!("{} never carried traffic", path.name)
            }
            _ => {}
        }
        for p in &mut path.procs {
            p.alive()?;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// How a gateway reaches its (one) peer, from its admin `/status`.
async fn peer_transport(admin: SocketAddr) -> anyhow::Result<String> {
    let mut c = fedmesh_testkit::HttpConn::connect(admin, false).await?;
    let r = c
        .request("GET", "/status", &[], bytes::Bytes::new())
        .await?;
    let v: serde_json::Value = serde_json::from_slice(&r.body)?;
    v["peers"][0]["transport"]
        .as_str()
        .map(str::to_string)
        .context("no peer transport in /status")
}
