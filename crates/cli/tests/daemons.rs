//! Real processes: two clusters' gateways and sidecars started as
//! `fedmesh gateway|sidecar --config FILE` from static YAML, with
//! certificates made by `fedmesh ca`, carrying traffic over QUIC.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use fedmesh_testkit::{run_load, App, AppKind, LoadSpec};

mod common;
use common::{bin, free_tcp, ok as run, p, Procs};

fn free_udp() -> SocketAddr {
    std::net::UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gateways_and_sidecars_from_yaml_as_processes() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    for (td, name) in [("east.acme", "east-ca"), ("west.acme", "west-ca")] {
        run(&[
            "ca",
            "init",
            "--trust-domain",
            td,
            "--out",
            &p(&d.join(name)),
        ]);
    }
    for (ca, id, out) in [
        (
            "east-ca",
            "spiffe://east.acme/ns/fedmesh-system/sa/gateway",
            "east-gw",
        ),
        ("east-ca", "spiffe://east.acme/ns/shop/sa/web", "east-web"),
        (
            "west-ca",
            "spiffe://west.acme/ns/fedmesh-system/sa/gateway",
            "west-gw",
        ),
        ("west-ca", "spiffe://west.acme/ns/shop/sa/echo", "west-echo"),
    ] {
        run(&[
            "ca",
            "issue",
            "--ca",
            &p(&d.join(ca)),
            "--spiffe-id",
            id,
            "--out",
            &p(&d.join(out)),
        ]);
    }
    let app = App::start(AppKind::Echo, "west/echo").await.unwrap();
    let (q1, t1, q2, t2, i2, o1) = (
        free_udp(),
        free_tcp(),
        free_udp(),
        free_tcp(),
        free_tcp(),
        free_tcp(),
    );
    // east's gateway admin endpoint; west's TCP fallback listener.
    let (a1, f2) = (free_tcp(), free_tcp());
    let bundles = format!(
        "bundles:\n  - {{ trust_domain: east.acme, path: {} }}\n  - {{ trust_domain: west.acme, path: {} }}\n",
        p(&d.join("east-ca/bundle.pem")),
        p(&d.join("west-ca/bundle.pem"))
    );
    let ident = |n: &str| {
        format!(
            "identity: {{ cert: {}, key: {} }}\n",
            p(&d.join(n).join("svid.pem")),
            p(&d.join(n).join("svid.key"))
        )
    };
    let east_catalog = format!(
        "catalog:\n  cluster: east\n  trust_domain: east.acme\n  gateway: {{ address: \"{t1}\" }}\n  imports: [ {{ service: echo.shop, clusters: [west] }} ]\n  peers: [ {{ cluster: west, trust_domain: west.acme, gateway: \"{q2}\", gateway_tcp: \"{f2}\" }} ]\n"
    );
    let west_catalog = format!(
        "catalog:\n  cluster: west\n  trust_domain: west.acme\n  gateway: {{ address: \"{t2}\" }}\n  services:\n    - name: echo.shop\n      ports: [8080]\n      export: true\n      endpoints: [ {{ address: \"{i2}\", identity: \"spiffe://west.acme/ns/shop/sa/echo\" }} ]\n  peers: [ {{ cluster: east, trust_domain: east.acme, gateway: \"{q1}\" }} ]\n"
    );
    let files = [
        ("east-gw.yaml", format!("listen: {{ quic: \"{q1}\", tunnel: \"{t1}\", admin: \"{a1}\" }}\n{}{bundles}{east_catalog}", ident("east-gw"))),
        ("west-gw.yaml", format!("listen: {{ quic: \"{q2}\", tunnel: \"{t2}\", tcp_fallback: \"{f2}\" }}\n{}{bundles}{west_catalog}", ident("west-gw"))),
        (
            "east-web.yaml",
            format!(
                "{}{bundles}{east_catalog}outbound: [ {{ listen: \"{o1}\", service: echo.shop, port: 8080, protocol: tcp }} ]\n",
                ident("east-web")
            ),
        ),
        (
            "west-echo.yaml",
            format!(
                "{}{bundles}{west_catalog}inbound:\n  listen: \"{i2}\"\n  services: [ {{ service: echo.shop, port: 8080, app: \"{}\" }} ]\n",
                ident("west-echo"),
                app.addr
            ),
        ),
    ];
    for (name, text) in &files {
        std::fs::write(d.join(name), text).unwrap();
    }
    let mut procs = Procs(Vec::new());
    for (kind, file) in [
        ("gateway", "east-gw.yaml"),
        ("gateway", "west-gw.yaml"),
        ("sidecar", "east-web.yaml"),
        ("sidecar", "west-echo.yaml"),
    ] {
        let child = Command::new(bin())
            .args([kind, "--config", &p(&d.join(file))])
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        procs.0.push(child);
    }
    // Wait (bounded) until the path answers end to end.
    let spec = LoadSpec {
        connections: 1,
        requests_per_connection: 1,
        timeout: Duration::from_secs(2),
        ..LoadSpec::default()
    };
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let r = run_load(o1, &spec).await;
        if r.ok == 1 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "path never came up: {:?}",
            r.errors
        );
        for c in &mut procs.0 {
            assert!(c.try_wait().unwrap().is_none(), "a daemon exited early");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let r = run_load(
        o1,
        &LoadSpec {
            connections: 10,
            requests_per_connection: 10,
            request_bytes: 16 * 1024,
            ..LoadSpec::default()
        },
    )
    .await;
    assert_eq!(r.failed, 0, "{:?}", r.errors);
    assert_eq!(r.served_by.keys().collect::<Vec<_>>(), ["west/echo"]);

    // The operator's view of how east's gateway reaches west: QUIC, with
    // the TCP fallback known and unused.
    let o = Command::new(bin())
        .args(["status", "--gateway", &a1.to_string()])
        .output()
        .unwrap();
    let table = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "{table}");
    let row = table
        .lines()
        .find(|l| l.starts_with("west "))
        .unwrap_or_else(|| panic!("no row for west:\n{table}"));
    assert!(
        row.contains(" quic ") && row.contains(&f2.to_string()) && row.contains(" no "),
        "{table}"
    );
    let o = Command::new(bin())
        .args(["status", "--gateway", &a1.to_string(), "--output", "json"])
        .output()
        .unwrap();
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["cluster"], "east");
    assert_eq!(v["peers"][0]["transport"], "quic");
    assert_eq!(v["peers"][0]["udp_blocked"], false);
}
