//! The injected pod's data path without Kubernetes: `fedmesh redirect`
//! (the init container's job) and the sidecar's transparent listener.
//!
//! On loopback: a connection to a service's VIP reaches the service
//! through the mesh. In a network namespace this test creates (root, `ip`,
//! `nft`, `python3`, `setpriv`): real nftables REDIRECT of an unprivileged
//! app's connections, SO_ORIGINAL_DST, VIP → mesh, anything else passed
//! through as sent, skipped ports untouched, the sidecar's own UID exempt.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use fedmesh_testkit::{run_load, App, AppKind, LoadSpec};

mod common;
use common::{bin, free_tcp, http_get, p, Procs};

fn run(cmd: &str, args: &[&str]) -> Output {
    let o = Command::new(cmd).args(args).output().unwrap();
    assert!(
        o.status.success(),
        "{cmd} {args:?}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    o
}

/// A CA and one SVID for `spiffe://east.acme/ns/demo/sa/echo` in `d`.
fn identity(d: &Path) -> String {
    run(
        bin(),
        &[
            "ca",
            "init",
            "--trust-domain",
            "east.acme",
            "--out",
            &p(&d.join("ca")),
        ],
    );
    run(
        bin(),
        &[
            "ca",
            "issue",
            "--ca",
            &p(&d.join("ca")),
            "--spiffe-id",
            "spiffe://east.acme/ns/demo/sa/echo",
            "--out",
            &p(&d.join("svid")),
        ],
    );
    format!(
        "identity: {{ cert: {}, key: {} }}\nbundles: [ {{ trust_domain: east.acme, path: {} }} ]\n",
        p(&d.join("svid/svid.pem")),
        p(&d.join("svid/svid.key")),
        p(&d.join("ca/bundle.pem")),
    )
}

/// One sidecar that is both caller and callee: its transparent listener
/// routes `vip:port` as echo.demo, whose one endpoint is its own inbound
/// listener, which hands the stream to the app.
fn sidecar_yaml(
    ident: &str,
    vip: &str,
    port: u16,
    transparent: &str,
    inbound: &str,
    app: &str,
    admin: &str,
) -> String {
    format!(
        "{ident}catalog:\n  cluster: east\n  trust_domain: east.acme\n  services:\n    - name: echo.demo\n      ports: [{port}]\n      vips: [\"{vip}\"]\n      endpoints: [ {{ address: \"{inbound}\", identity: \"spiffe://east.acme/ns/demo/sa/echo\" }} ]\n\
         transparent: {{ listen: \"{transparent}\" }}\ninbound:\n  listen: \"{inbound}\"\n  services: [ {{ service: echo.demo, port: {port}, app: \"{app}\" }} ]\nadmin: \"{admin}\"\n"
    )
}

/// `fedmesh sidecar --config cfg`, once its admin endpoint says ready
/// (it comes up after every listener: the transparent one accepts before
/// the inbound one is bound).
async fn sidecar_ready(cfg: &Path, admin: SocketAddr) -> Procs {
    let child = Command::new(bin())
        .args(["sidecar", "--config", &p(cfg)])
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let procs = Procs(vec![child]);
    let deadline = Instant::now() + Duration::from_secs(15);
    while !http_get(admin, "/ready").starts_with("HTTP/1.1 200") {
        assert!(Instant::now() < deadline, "the sidecar never became ready");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    procs
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_service_vip_is_routed_through_the_mesh() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let ident = identity(d);
    let app = App::start(AppKind::Echo, "demo/echo").await.unwrap();
    // The VIP is a second loopback address the listener is bound to: a
    // connection made to it directly looks like one redirected to it.
    let port = free_tcp().port();
    let vip: SocketAddr = format!("127.0.0.2:{port}").parse().unwrap();
    let (inbound, admin) = (free_tcp(), free_tcp());
    let cfg = d.join("sidecar.yaml");
    std::fs::write(
        &cfg,
        sidecar_yaml(
            &ident,
            "127.0.0.2",
            port,
            &vip.to_string(),
            &inbound.to_string(),
            &app.addr.to_string(),
            &admin.to_string(),
        ),
    )
    .unwrap();
    let _procs = sidecar_ready(&cfg, admin).await;
    let spec = LoadSpec {
        connections: 4,
        requests_per_connection: 5,
        timeout: Duration::from_secs(2),
        ..LoadSpec::default()
    };
    let r = run_load(vip, &spec).await;
    assert_eq!((r.ok, r.failed), (20, 0), "{:?}", r.errors);
    assert_eq!(r.served_by.keys().collect::<Vec<_>>(), ["demo/echo"]);
    let metrics = http_get(admin, "/metrics");
    assert!(
        metrics.contains("fedmesh_sidecar_transparent_connections_total{result=\"mesh\"} 4"),
        "{metrics}"
    );
}

/// The same with a ClusterSet IP instead of the Service's own VIP: the
/// catalog a controller sends (`clusterset_ips`) routes a connection to it
/// as the multi-cluster service.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_clusterset_ip_is_routed_as_its_service() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let ident = identity(d);
    let app = App::start(AppKind::Echo, "demo/echo").await.unwrap();
    let port = free_tcp().port();
    let vip: SocketAddr = format!("127.0.0.3:{port}").parse().unwrap();
    let (inbound, admin) = (free_tcp(), free_tcp());
    let cfg = d.join("sidecar.yaml");
    let yaml = sidecar_yaml(
        &ident,
        "127.0.0.99",
        port,
        &vip.to_string(),
        &inbound.to_string(),
        &app.addr.to_string(),
        &admin.to_string(),
    )
    .replace(
        "transparent:",
        &format!(
            "  clusterset_ips: [ {{ service: echo.demo, ips: [\"127.0.0.3\"], ports: [{port}] }} ]\ntransparent:"
        ),
    );
    std::fs::write(&cfg, yaml).unwrap();
    let _procs = sidecar_ready(&cfg, admin).await;
    let spec = LoadSpec {
        connections: 2,
        requests_per_connection: 5,
        timeout: Duration::from_secs(2),
        ..LoadSpec::default()
    };
    let r = run_load(vip, &spec).await;
    assert_eq!((r.ok, r.failed), (10, 0), "{:?}", r.errors);
    assert_eq!(r.served_by.keys().collect::<Vec<_>>(), ["demo/echo"]);
    let metrics = http_get(admin, "/metrics");
    assert!(
        metrics.contains("fedmesh_sidecar_transparent_connections_total{result=\"mesh\"} 2"),
        "{metrics}"
    );
}

/// Runs `args` inside namespace `ns`.
fn in_ns(ns: &str, args: &[&str]) -> Command {
    let mut c = Command::new("ip");
    c.args(["netns", "exec", ns]).args(args);
    c
}

struct Netns(String);

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

const ECHO_SERVER: &str = r#"
import socket, sys, threading
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((sys.argv[1], int(sys.argv[2]))); s.listen(64)
def serve(c):
    with c:
        while True:
            b = c.recv(65536)
            if not b: return
            c.sendall(sys.argv[3].encode() + b)
while True:
    c, _ = s.accept(); threading.Thread(target=serve, args=(c,), daemon=True).start()
"#;

const CLIENT: &str = r#"
import socket, sys
try:
    c = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=3)
    c.sendall(b"ping"); c.shutdown(socket.SHUT_WR)
    out = b""
    while True:
        b = c.recv(65536)
        if not b: break
        out += b
    print(out.decode())
except Exception as e:
    print("error:", e)
"#;

fn tools() -> Result<(), String> {
    let uid = Command::new("id")
        .arg("-u")
        .output()
        .map_err(|e| e.to_string())?;
    if String::from_utf8_lossy(&uid.stdout).trim() != "0" {
        return Err("not root".into());
    }
    for t in ["ip", "nft", "/usr/bin/python3", "setpriv"] {
        let ok = Command::new("sh")
            .args(["-c", &format!("command -v {t}")])
            .output()
            .is_ok_and(|o| o.status.success());
        if !ok {
            return Err(format!("no `{t}`"));
        }
    }
    Ok(())
}

#[test]
fn redirect_sends_an_apps_connections_through_the_sidecar() {
    if let Err(why) = tools() {
        // CI runs as root with these installed (scripts/test.sh).
        assert!(
            std::env::var_os("CI").is_none(),
            "redirect test cannot run in CI: {why}"
        );
        eprintln!("skipped: {why}");
        return;
    }
    let ns = Netns(format!("fmredir-{}", std::process::id()));
    run("ip", &["netns", "add", &ns.0]);
    for args in [
        vec!["link", "set", "lo", "up"],
        // A veth pair inside the namespace (no dummy module here): the
        // /16 on one end makes the VIP routable.
        vec!["link", "add", "v0", "type", "veth", "peer", "name", "v1"],
        vec!["addr", "add", "10.77.0.1/16", "dev", "v0"],
        vec!["link", "set", "v0", "up"],
        vec!["link", "set", "v1", "up"],
    ] {
        let mut a = vec!["-n", ns.0.as_str()];
        a.extend(args);
        run("ip", &a);
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let ident = identity(d);
    let cfg = d.join("sidecar.yaml");
    std::fs::write(
        &cfg,
        sidecar_yaml(
            &ident,
            "10.77.5.5",
            80,
            "0.0.0.0:15001",
            "10.77.0.1:15006",
            "10.77.0.1:9000",
            "127.0.0.1:15020",
        ),
    )
    .unwrap();
    let mut procs = Procs(Vec::new());
    for (port, tag) in [("9000", "app:"), ("9001", "skipped:")] {
        procs.0.push(
            in_ns(
                &ns.0,
                &["python3", "-c", ECHO_SERVER, "10.77.0.1", port, tag],
            )
            .spawn()
            .unwrap(),
        );
    }
    // The sidecar runs as root here, so root is the proxy UID the
    // redirect exempts; the app runs as nobody.
    procs.0.push(
        in_ns(&ns.0, &[bin(), "sidecar", "--config", &p(&cfg)])
            .stdout(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let o = in_ns(
        &ns.0,
        &[
            bin(),
            "redirect",
            "--proxy-uid",
            "0",
            "--outbound-port",
            "15001",
            "--skip-ports",
            "9001",
        ],
    )
    .output()
    .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let client = |host: &str, port: &str| {
        // The system python: a per-user install (pyenv) is not readable
        // by nobody.
        let o = in_ns(
            &ns.0,
            &[
                "setpriv",
                "--reuid=65534",
                "--regid=65534",
                "--clear-groups",
                "/usr/bin/python3",
                "-c",
                CLIENT,
                host,
                port,
            ],
        )
        .output()
        .unwrap();
        String::from_utf8_lossy(&o.stdout).trim().to_owned()
    };
    // Wait (bounded) for the sidecar and the echo servers.
    let deadline = Instant::now() + Duration::from_secs(15);
    while client("10.77.5.5", "80") != "app:ping" {
        assert!(
            Instant::now() < deadline,
            "the VIP never answered: {}",
            client("10.77.5.5", "80")
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    // Not a VIP: passed through to where the app was going.
    assert_eq!(client("10.77.0.1", "9000"), "app:ping");
    // A skipped port: the sidecar never sees it.
    assert_eq!(client("10.77.0.1", "9001"), "skipped:ping");
    // Nothing listens there: the app sees a failed connection, as without
    // the mesh (accepted by the sidecar, then closed).
    assert!(!client("10.77.0.1", "9002").starts_with("app:"));
    let metrics = in_ns(&ns.0, &["python3", "-c", "import urllib.request;print(urllib.request.urlopen('http://127.0.0.1:15020/metrics').read().decode())"]).output().unwrap();
    let m = String::from_utf8_lossy(&metrics.stdout);
    let count = |r: &str| {
        m.lines()
            .find(|l| {
                l.starts_with(&format!(
                    "fedmesh_sidecar_transparent_connections_total{{result=\"{r}\"}}"
                ))
            })
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0)
    };
    assert!(count("mesh") >= 1, "{m}");
    assert_eq!(count("passthrough"), 1, "{m}");
    assert_eq!(count("refused"), 1, "{m}");
    // The sidecar's own connections (UID 0 here) are not redirected: its
    // inbound hop to 10.77.0.1:15006 and the app hop worked above.
    // Running the redirect again leaves one table; --undo removes it.
    let o = in_ns(
        &ns.0,
        &[
            bin(),
            "redirect",
            "--proxy-uid",
            "0",
            "--skip-ports",
            "9001",
        ],
    )
    .output()
    .unwrap();
    assert!(o.status.success());
    let list = in_ns(&ns.0, &["nft", "list", "tables"]).output().unwrap();
    assert_eq!(
        String::from_utf8_lossy(&list.stdout)
            .matches("fedmesh")
            .count(),
        1
    );
    assert!(in_ns(&ns.0, &[bin(), "redirect", "--undo"])
        .output()
        .unwrap()
        .status
        .success());
    let list = in_ns(&ns.0, &["nft", "list", "tables"]).output().unwrap();
    assert!(!String::from_utf8_lossy(&list.stdout).contains("fedmesh"));
}
