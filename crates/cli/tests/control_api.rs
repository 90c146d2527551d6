//! The whole control path as real processes on a real etcd: two clusters'
//! controllers serve the config API; gateways and sidecars get their SVIDs
//! by bootstrap token (`fedmesh cert request`), their config only from the
//! controller (no static catalog, only their own bundle), renew their
//! SVIDs, carry traffic, and keep carrying it when the controller dies.
#![cfg(feature = "etcd")]
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use fedmesh_testkit::{run_load, App, AppKind, LoadSpec};

mod common;

struct Procs(Vec<(String, Child)>);

impl Drop for Procs {
    fn drop(&mut self) {
        for (_, c) in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Procs {
    fn spawn(&mut self, name: &str, args: &[&str]) {
        let child = Command::new(env!("CARGO_BIN_EXE_fedmesh"))
            .args(args)
            .env("FEDMESH_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        self.0.push((name.to_owned(), child));
    }

    fn kill(&mut self, name: &str) {
        let i = self.0.iter().position(|(n, _)| n == name).unwrap();
        let (_, mut c) = self.0.remove(i);
        c.kill().unwrap();
        c.wait().unwrap();
    }

    fn all_running(&mut self) {
        for (n, c) in &mut self.0 {
            assert!(c.try_wait().unwrap().is_none(), "{n} exited early");
        }
    }
}

fn fedmesh(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_fedmesh"))
        .args(args)
        .output()
        .unwrap()
}

fn ok(args: &[&str]) {
    let o = fedmesh(args);
    assert!(
        o.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
}

fn p(x: &Path) -> String {
    x.display().to_string()
}

fn tcp() -> SocketAddr {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}

fn udp() -> SocketAddr {
    std::net::UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}

async fn until_traffic(procs: &mut Procs, addr: SocketAddr, limit: Duration) {
    let spec = LoadSpec {
        connections: 1,
        requests_per_connection: 1,
        timeout: Duration::from_secs(2),
        ..LoadSpec::default()
    };
    let t0 = Instant::now();
    loop {
        let r = run_load(addr, &spec).await;
        if r.ok == 1 {
            return;
        }
        assert!(
            t0.elapsed() < limit,
            "no traffic within {limit:?}: {:?}",
            r.errors
        );
        procs.all_running();
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxies_follow_their_controller_as_processes() {
    let Some(bin) =
        fedmesh_testkit::etcd::etcd_or_skip("proxies_follow_their_controller_as_processes")
    else {
        return;
    };
    let etcd = fedmesh_testkit::etcd::EtcdCluster::start(bin, 1).unwrap();
    let endpoints = etcd
        .endpoints()
        .iter()
        .map(|e| format!("\"{e}\""))
        .collect::<Vec<_>>()
        .join(", ");
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let app = App::start(AppKind::Echo, "west/echo").await.unwrap();
    let (eq, et, wq, wt) = (udp(), tcp(), udp(), tcp());
    let (e_api, w_api, w_inbound, e_out) = (tcp(), tcp(), tcp(), tcp());
    for c in ["east", "west"] {
        common::ca_init(d, &format!("{c}-ca"), &format!("{c}.acme"));
    }
    common::pin_each_other(d, "east", "west");
    for c in ["east", "west"] {
        std::fs::write(
            d.join(format!("{c}-tokens.yaml")),
            format!("tokens:\n  - token: {c}-boot\n    identities: [\"spiffe://{c}.acme/ns/fedmesh-system/sa/gateway\", \"spiffe://{c}.acme/ns/shop/*\"]\n"),
        )
        .unwrap();
        std::fs::write(d.join(format!("{c}-token")), format!("{c}-boot\n")).unwrap();
    }
    std::fs::write(d.join("east-services.yaml"), "services: []\n").unwrap();
    std::fs::write(
        d.join("west-services.yaml"),
        format!("services:\n  - name: echo.shop\n    ports: [8080]\n    export: true\n    endpoints:\n      - {{ address: \"{w_inbound}\", identity: \"spiffe://west.acme/ns/shop/sa/echo\" }}\n"),
    )
    .unwrap();
    let mut procs = Procs(Vec::new());
    for (c, q, t, api) in [("east", eq, et, e_api), ("west", wq, wt, w_api)] {
        let cfg = format!(
            "cluster: {c}\ntrust_domain: {c}.acme\ngateways: [\"{q}\"]\ngateway_tunnel: \"{t}\"\nlease_ttl: 2s\n\
             store: {{ kind: etcd, endpoints: [{endpoints}] }}\nbundle: {}\npins_dir: {}\nservices: {}\n\
             api:\n  listen: \"{api}\"\n  ca_dir: {}\n  tokens: {}\n  limits: {{ svid_ttl: 8s }}\n",
            p(&d.join(format!("{c}-ca/bundle.pem"))),
            p(&d.join(format!("{c}-pins"))),
            p(&d.join(format!("{c}-services.yaml"))),
            p(&d.join(format!("{c}-ca"))),
            p(&d.join(format!("{c}-tokens.yaml"))),
        );
        std::fs::write(d.join(format!("{c}.yaml")), cfg).unwrap();
        procs.spawn(
            &format!("{c}-controller"),
            &["controller", "--config", &p(&d.join(format!("{c}.yaml")))],
        );
    }

    // First contact: each proxy trades the bootstrap token for an SVID.
    let request = |c: &str, api: SocketAddr, id: &str, out: &str| {
        let args = [
            "cert",
            "request",
            "--controller",
            &api.to_string(),
            "--bundle",
            &p(&d.join(format!("{c}-ca/bundle.pem"))),
            "--spiffe-id",
            id,
            "--token-file",
            &p(&d.join(format!("{c}-token"))),
            "--out",
            &p(&d.join(out)),
        ];
        let t0 = Instant::now();
        loop {
            let o = fedmesh(&args);
            if o.status.success() {
                return;
            }
            assert!(
                t0.elapsed() < Duration::from_secs(15),
                "{args:?}: {}",
                String::from_utf8_lossy(&o.stderr)
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    };
    request(
        "east",
        e_api,
        "spiffe://east.acme/ns/fedmesh-system/sa/gateway",
        "east-gw",
    );
    request(
        "east",
        e_api,
        "spiffe://east.acme/ns/shop/sa/web",
        "east-web",
    );
    request(
        "west",
        w_api,
        "spiffe://west.acme/ns/fedmesh-system/sa/gateway",
        "west-gw",
    );
    request(
        "west",
        w_api,
        "spiffe://west.acme/ns/shop/sa/echo",
        "west-echo",
    );
    // A token does not stretch beyond what it allows.
    let o = fedmesh(&[
        "cert",
        "request",
        "--controller",
        &e_api.to_string(),
        "--bundle",
        &p(&d.join("east-ca/bundle.pem")),
        "--spiffe-id",
        "spiffe://east.acme/ns/bank/sa/vault",
        "--token-file",
        &p(&d.join("east-token")),
        "--out",
        &p(&d.join("nope")),
    ]);
    assert!(!o.status.success());
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("does not allow"),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );

    // Proxies know only their own bundle and where their controller is.
    let common = |c: &str, who: &str, api: SocketAddr| {
        format!(
            "identity: {{ cert: {}, key: {} }}\nbundles: [ {{ trust_domain: {c}.acme, path: {} }} ]\ncontroller: {{ address: \"{api}\", cluster: {c} }}\n",
            p(&d.join(who).join("svid.pem")),
            p(&d.join(who).join("svid.key")),
            p(&d.join(format!("{c}-ca/bundle.pem"))),
        )
    };
    let files = [
        ("east-gw", "gateway", format!("listen: {{ quic: \"{eq}\", tunnel: \"{et}\" }}\n{}", common("east", "east-gw", e_api))),
        ("west-gw", "gateway", format!("listen: {{ quic: \"{wq}\", tunnel: \"{wt}\" }}\n{}", common("west", "west-gw", w_api))),
        ("east-web", "sidecar", format!("{}outbound: [ {{ listen: \"{e_out}\", service: echo.shop, port: 8080, protocol: tcp }} ]\n", common("east", "east-web", e_api))),
        (
            "west-echo",
            "sidecar",
            format!(
                "{}inbound:\n  listen: \"{w_inbound}\"\n  services: [ {{ service: echo.shop, port: 8080, app: \"{}\" }} ]\n",
                common("west", "west-echo", w_api),
                app.addr
            ),
        ),
    ];
    for (name, kind, text) in &files {
        let path = d.join(format!("{name}.yaml"));
        std::fs::write(&path, text).unwrap();
        ok(&[kind, "--config", &p(&path), "--check"]);
        procs.spawn(name, &[kind, "--config", &p(&path)]);
    }
    until_traffic(&mut procs, e_out, Duration::from_secs(20)).await;

    // SVIDs live 8 s: each proxy renews at two thirds and writes it back.
    let first = std::fs::read(d.join("east-gw/svid.pem")).unwrap();
    let t0 = Instant::now();
    while std::fs::read(d.join("east-gw/svid.pem")).unwrap() == first {
        assert!(
            t0.elapsed() < Duration::from_secs(15),
            "gateway SVID not renewed"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // Past the first SVID's expiry, new handshakes still succeed.
    let first_leaf = fedmesh_trust::pem::decode_certs(&String::from_utf8_lossy(&first)).unwrap();
    let expiry = fedmesh_trust::svid::inspect_leaf(&first_leaf[0])
        .unwrap()
        .not_after;
    let left = expiry
        .duration_since(std::time::SystemTime::now())
        .unwrap_or_default();
    tokio::time::sleep(left + Duration::from_millis(500)).await;
    let load = LoadSpec {
        connections: 5,
        requests_per_connection: 10,
        request_bytes: 4096,
        ..LoadSpec::default()
    };
    let r = run_load(e_out, &load).await;
    assert_eq!(r.failed, 0, "after renewal: {:?}", r.errors);
    assert_eq!(r.served_by.keys().collect::<Vec<_>>(), ["west/echo"]);

    // Both controllers die: proxies keep serving with their last config.
    procs.kill("east-controller");
    procs.kill("west-controller");
    tokio::time::sleep(Duration::from_secs(1)).await;
    let r = run_load(e_out, &load).await;
    assert_eq!(r.failed, 0, "without controllers: {:?}", r.errors);
}
