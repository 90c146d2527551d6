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

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
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

/// One or more etcd members forming a cluster.
pub struct EtcdCluster {
    bin: PathBuf,
    members: Vec<Member>,
}

impl EtcdCluster {
    /// Starts `n` members and waits (bounded) until every one answers.
    pub fn start(bin: PathBuf, n: usize) -> anyhow::Result<Self> {
        let mut members = Vec::new();
        for i in 0..n {
            members.push(Member {
                name: format!("m{i}"),
                client: SocketAddr::from(([127, 0, 0, 1], free_port())),
                peer: SocketAddr::from(([127, 0, 0, 1], free_port())),
                dir: tempfile::tempdir()?,
                child: None,
            });
        }
        let mut c = Self { bin, members };
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
        let m = &mut self.members[i];
        let child = Command::new(&self.bin)
            .args([
                "--name",
                &m.name,
                "--data-dir",
                &m.dir.path().display().to_string(),
                "--listen-client-urls",
                &format!("http://{}", m.client),
                "--advertise-client-urls",
                &format!("http://{}", m.client),
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

    /// Client URLs of the members that are running.
    pub fn endpoints(&self) -> Vec<String> {
        self.members
            .iter()
            .filter(|m| m.child.is_some())
            .map(|m| format!("http://{}", m.client))
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
