//! Real etcd servers for tests: one member or a cluster, on free loopback
//! ports with a temporary data directory, stopped and removed on drop.

use std::net::{SocketAddr, TcpListener};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The etcd binary, if installed (Debian's `etcd-server` puts it in /usr/bin).
pub fn etcd_binary() -> Option<PathBuf> {
    std::env::var_os("FEDMESH_ETCD")
        .map(PathBuf::from)
        .or_else(|| {
            std::env::var_os("PATH").and_then(|paths| {
                std::env::split_paths(&paths)
                    .map(|p| p.join("etcd"))
                    .find(|p| p.is_file())
            })
        })
}

/// `None` when etcd is not installed and we are not in CI: the caller
/// skips, saying so. In CI (`CI=true`) a missing etcd is a failure, so a
/// broken install step cannot turn the etcd tests into no-ops.
pub fn etcd_or_skip(test: &str) -> Option<PathBuf> {
    match etcd_binary() {
        Some(p) => Some(p),
        None if std::env::var("CI").is_ok_and(|v| v == "true") => {
            panic!(
                "{test}: etcd is not installed, but CI=true (scripts/test.sh installs etcd-server)"
            )
        }
        None => {
            eprintln!("SKIP {test}: etcd not installed (apt-get install etcd-server)");
            None
        }
    }
}

fn free_port(ip: std::net::IpAddr) -> u16 {
    TcpListener::bind(SocketAddr::new(ip, 0))
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .unwrap_or(0)
}

struct Member {
    name: String,
    client: SocketAddr,
    peer: SocketAddr,
    dir: tempfile::TempDir,
    child: Option<Child>,
}

/// PEM material of a TLS etcd: its CA, and a client certificate it accepts.
#[derive(Clone)]
pub struct EtcdTlsMaterial {
    pub ca_pem: String,
    pub client_cert_pem: String,
    pub client_key_pem: String,
    /// Directory holding `ca.pem`, `server.pem`, `server.key`, `client.pem`, `client.key`.
    pub dir: PathBuf,
}

/// One or more etcd members forming a cluster.
pub struct EtcdCluster {
    bin: PathBuf,
    members: Vec<Member>,
    tls: Option<(tempfile::TempDir, EtcdTlsMaterial)>,
}

/// A CA, a server certificate for 127.0.0.1/localhost and a client
/// certificate, written into a fresh directory.
fn tls_material() -> anyhow::Result<(tempfile::TempDir, EtcdTlsMaterial)> {
    use rcgen::{
        BasicConstraints, CertificateParams, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    };
    let dir = tempfile::tempdir()?;
    let ca_key = KeyPair::generate()?;
    let mut ca = CertificateParams::new(Vec::<String>::new())?;
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.distinguished_name
        .push(rcgen::DnType::CommonName, "fedmesh test etcd CA");
    let ca_cert = ca.self_signed(&ca_key)?;
    let issuer = Issuer::new(ca, ca_key);
    let leaf = |sans: Vec<String>, eku| -> anyhow::Result<(String, String)> {
        let key = KeyPair::generate()?;
        let mut p = CertificateParams::new(sans)?;
        p.extended_key_usages = vec![eku];
        Ok((p.signed_by(&key, &issuer)?.pem(), key.serialize_pem()))
    };
    let (server_pem, server_key) = leaf(
        vec!["127.0.0.1".into(), "localhost".into()],
        ExtendedKeyUsagePurpose::ServerAuth,
    )?;
    let (client_pem, client_key) =
        leaf(vec!["fedmesh".into()], ExtendedKeyUsagePurpose::ClientAuth)?;
    let d = dir.path();
    std::fs::write(d.join("ca.pem"), ca_cert.pem())?;
    std::fs::write(d.join("server.pem"), &server_pem)?;
    std::fs::write(d.join("server.key"), &server_key)?;
    std::fs::write(d.join("client.pem"), &client_pem)?;
    std::fs::write(d.join("client.key"), &client_key)?;
    let m = EtcdTlsMaterial {
        ca_pem: ca_cert.pem(),
        client_cert_pem: client_pem,
        client_key_pem: client_key,
        dir: d.to_path_buf(),
    };
    Ok((dir, m))
}

impl EtcdCluster {
    /// Starts `n` members and waits (bounded) until every one answers.
    pub fn start(bin: PathBuf, n: usize) -> anyhow::Result<Self> {
        Self::start_with(bin, n, false, [127, 0, 0, 1].into())
    }

    /// Like [`start`](Self::start), with every member on `ip` (an address
    /// of this host that other network namespaces can reach).
    pub fn start_on(bin: PathBuf, n: usize, ip: std::net::IpAddr) -> anyhow::Result<Self> {
        Self::start_with(bin, n, false, ip)
    }

    /// Like [`start`](Self::start), but clients must use TLS and present a
    /// certificate of the test CA (`--client-cert-auth`).
    pub fn start_tls(bin: PathBuf, n: usize) -> anyhow::Result<Self> {
        Self::start_with(bin, n, true, [127, 0, 0, 1].into())
    }

    /// The TLS material, for a cluster started with [`start_tls`](Self::start_tls).
    pub fn tls(&self) -> Option<&EtcdTlsMaterial> {
        self.tls.as_ref().map(|t| &t.1)
    }

    fn start_with(bin: PathBuf, n: usize, tls: bool, ip: std::net::IpAddr) -> anyhow::Result<Self> {
        let mut members = Vec::new();
        for i in 0..n {
            members.push(Member {
                name: format!("m{i}"),
                client: SocketAddr::new(ip, free_port(ip)),
                peer: SocketAddr::new(ip, free_port(ip)),
                dir: tempfile::tempdir()?,
                child: None,
            });
        }
        let tls = if tls { Some(tls_material()?) } else { None };
        let mut c = Self { bin, members, tls };
        for i in 0..n {
            c.spawn(i, "new")?;
        }
        for i in 0..n {
            c.wait_ready(i, Duration::from_secs(20))?;
        }
        Ok(c)
    }

    fn initial_cluster(&self) -> String {
        self.members
            .iter()
            .map(|m| format!("{}=http://{}", m.name, m.peer))
            .collect::<Vec<_>>()
            .join(",")
    }

    fn spawn(&mut self, i: usize, state: &str) -> anyhow::Result<()> {
        let ic = self.initial_cluster();
        let scheme = self.scheme();
        let tls_args: Vec<String> = match &self.tls {
            None => Vec::new(),
            Some((_, t)) => vec![
                "--cert-file".into(),
                t.dir.join("server.pem").display().to_string(),
                "--key-file".into(),
                t.dir.join("server.key").display().to_string(),
                "--trusted-ca-file".into(),
                t.dir.join("ca.pem").display().to_string(),
                "--client-cert-auth".into(),
            ],
        };
        let m = &mut self.members[i];
        let child = Command::new(&self.bin)
            .args(tls_args)
            .args([
                "--name",
                &m.name,
                "--data-dir",
                &m.dir.path().display().to_string(),
                "--listen-client-urls",
                &format!("{scheme}://{}", m.client),
                "--advertise-client-urls",
                &format!("{scheme}://{}", m.client),
                "--listen-peer-urls",
                &format!("http://{}", m.peer),
                "--initial-advertise-peer-urls",
                &format!("http://{}", m.peer),
                "--initial-cluster",
                &ic,
                "--initial-cluster-state",
                state,
                "--initial-cluster-token",
                "fedmesh-test",
                "--heartbeat-interval",
                "50",
                "--election-timeout",
                "500",
                "--log-level",
                "error",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()?;
        m.child = Some(child);
        Ok(())
    }

    fn wait_ready(&mut self, i: usize, limit: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + limit;
        let addr = self.members[i].client;
        loop {
            if std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
                return Ok(());
            }
            if let Some(c) = self.members[i].child.as_mut() {
                if let Some(status) = c.try_wait()? {
                    anyhow::bail!("etcd member {i} exited: {status}");
                }
            }
            if Instant::now() > deadline {
                anyhow::bail!("etcd member {i} did not start within {limit:?}");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn scheme(&self) -> &'static str {
        if self.tls.is_some() {
            "https"
        } else {
            "http"
        }
    }

    /// Client URLs of the members that are running.
    pub fn endpoints(&self) -> Vec<String> {
        let scheme = self.scheme();
        self.members
            .iter()
            .filter(|m| m.child.is_some())
            .map(|m| format!("{scheme}://{}", m.client))
            .collect()
    }

    /// Kills member `i` (SIGKILL), keeping its data.
    pub fn kill(&mut self, i: usize) {
        if let Some(mut c) = self.members[i].child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Restarts a killed member on the same ports and data.
    pub fn restart(&mut self, i: usize) -> anyhow::Result<()> {
        self.spawn(i, "existing")?;
        self.wait_ready(i, Duration::from_secs(20))
    }
}

impl Drop for EtcdCluster {
    fn drop(&mut self) {
        for i in 0..self.members.len() {
            self.kill(i);
        }
    }
}
