//! What the CLI's process tests share: the binary, child processes that
//! die with the test, free ports, a plain HTTP GET of admin endpoints, a
//! kubeconfig for the API server stand-in.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::Duration;

pub fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_fedmesh")
}

pub fn p(path: &Path) -> String {
    path.display().to_string()
}

/// Runs `fedmesh ARGS` and asserts it succeeded.
pub fn ok(args: &[&str]) {
    let o = Command::new(bin()).args(args).output().unwrap();
    assert!(
        o.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
}

/// Children killed (and reaped) when the test ends, pass or fail.
pub struct Procs(pub Vec<Child>);

impl Drop for Procs {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// `fedmesh cluster join` both ways: `dir/A-pins` admits B by the bundle
/// in `dir/B-ca` and the other way round.
pub fn pin_each_other(dir: &Path, a: &str, b: &str) {
    for (c, other) in [(a, b), (b, a)] {
        ok(&[
            "cluster",
            "join",
            "--pins",
            &p(&dir.join(format!("{c}-pins"))),
            "--name",
            other,
            "--bundle",
            &p(&dir.join(format!("{other}-ca/bundle.pem"))),
        ]);
    }
}

/// `fedmesh ca init` for `trust_domain` into `dir/name`; returns that dir.
pub fn ca_init(dir: &Path, name: &str, trust_domain: &str) -> PathBuf {
    let out = dir.join(name);
    ok(&[
        "ca",
        "init",
        "--trust-domain",
        trust_domain,
        "--out",
        &p(&out),
    ]);
    out
}

/// `dir/controller.yaml` for cluster `east` (`east.acme`, the CA in
/// `dir/ca`) on the embedded store with the Kubernetes source and the
/// config API (bootstrap tokens from `dir/tokens.yaml`).
pub fn kube_controller_config(
    dir: &Path,
    gateway: SocketAddr,
    admin: SocketAddr,
    api: SocketAddr,
    write_back: bool,
) -> PathBuf {
    let path = dir.join("controller.yaml");
    std::fs::write(
        &path,
        format!(
            "cluster: east\ntrust_domain: east.acme\ngateways: [\"{gateway}\"]\nstore: {{ kind: embedded }}\nbundle: {}\npins_dir: {}\n\
             kubernetes: {{ inbound_port: 15006, write_back: {write_back} }}\nadmin: \"{admin}\"\napi: {{ listen: \"{api}\", ca_dir: {}, tokens: {} }}\n\
             clusterset_ips: {{ cidrs: [\"241.0.0.0/24\"] }}\ndns: {{ listen: \"127.0.0.1:0\" }}\n",
            p(&dir.join("ca/bundle.pem")),
            p(&dir.join("pins")),
            p(&dir.join("ca")),
            p(&dir.join("tokens.yaml")),
        ),
    )
    .unwrap();
    path
}

/// A loopback port free for both UDP and TCP (a DNS server takes both).
pub fn free_udp_tcp() -> SocketAddr {
    for _ in 0..32 {
        let udp = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let addr = udp.local_addr().unwrap();
        if std::net::TcpListener::bind(addr).is_ok() {
            return addr;
        }
    }
    panic!("no loopback port free for both UDP and TCP")
}

pub fn free_tcp() -> SocketAddr {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}

/// `GET path` on an admin endpoint: the whole response, or "" when the
/// port does not answer.
pub fn http_get(addr: SocketAddr, path: &str) -> String {
    use std::io::{Read, Write};
    let Ok(mut s) = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(2)) else {
        return String::new();
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
    let _ = write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    );
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    out
}

/// A kubeconfig in `dir` pointing at `server` (the fake API server).
pub fn kubeconfig(dir: &Path, server: &str) -> PathBuf {
    let path = dir.join("kubeconfig");
    std::fs::write(
        &path,
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: fake\n  cluster: {{ server: \"{server}\" }}\n\
             contexts:\n- name: fake\n  context: {{ cluster: fake, user: fake }}\ncurrent-context: fake\n\
             users:\n- name: fake\n  user: {{ token: x }}\n"
        ),
    )
    .unwrap();
    path
}
