//! Controllers as real processes on a real etcd: join by pinned bundles,
//! publish, converge, follow a services file, expire a killed cluster; and
//! the operator commands that read it all.
#![cfg(feature = "etcd")]
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

mod common;
use common::{p, Procs};

fn fedmesh(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_fedmesh"))
        .args(args)
        .output()
        .unwrap()
}

fn ok(args: &[&str]) -> String {
    let o = fedmesh(args);
    assert!(
        o.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn status(admin: u16) -> Option<serde_json::Value> {
    let o = fedmesh(&[
        "status",
        "--controller",
        &format!("127.0.0.1:{admin}"),
        "--output",
        "json",
    ]);
    o.status
        .success()
        .then(|| serde_json::from_slice(&o.stdout).ok())
        .flatten()
}

fn wait_for(what: &str, limit: Duration, mut f: impl FnMut() -> bool) -> Duration {
    let t0 = Instant::now();
    while !f() {
        assert!(t0.elapsed() < limit, "{what}: not within {limit:?}");
        std::thread::sleep(Duration::from_millis(100));
    }
    t0.elapsed()
}

#[test]
fn controllers_federate_through_etcd_as_processes() {
    let Some(bin) =
        fedmesh_testkit::etcd::etcd_or_skip("controllers_federate_through_etcd_as_processes")
    else {
        return;
    };
    let etcd = fedmesh_testkit::etcd::EtcdCluster::start(bin, 1).unwrap();
    let endpoints = etcd.endpoints().join(",");
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    for c in ["east", "west"] {
        ok(&[
            "ca",
            "init",
            "--trust-domain",
            &format!("{c}.acme"),
            "--out",
            &p(&d.join(format!("{c}-ca"))),
        ]);
    }
    // The operators of each cluster admit the other (bundles exchanged out of band).
    ok(&[
        "cluster",
        "join",
        "--pins",
        &p(&d.join("east-pins")),
        "--name",
        "west",
        "--bundle",
        &p(&d.join("west-ca/bundle.pem")),
    ]);
    ok(&[
        "cluster",
        "join",
        "--pins",
        &p(&d.join("west-pins")),
        "--name",
        "east",
        "--bundle",
        &p(&d.join("east-ca/bundle.pem")),
    ]);
    std::fs::write(d.join("east-services.yaml"), "services: []\n").unwrap();
    let west_services = "services:\n  - name: echo.shop\n    ports: [8080]\n    export: true\n    endpoints:\n      - { address: \"127.0.0.1:9000\", identity: \"spiffe://west.acme/ns/shop/sa/echo\" }\n";
    std::fs::write(d.join("west-services.yaml"), west_services).unwrap();
    let (ea, wa) = (free_port(), free_port());
    for (c, admin, gw) in [("east", ea, 15443), ("west", wa, 16443)] {
        let cfg = format!(
            "cluster: {c}\ntrust_domain: {c}.acme\ngateways: [\"127.0.0.1:{gw}\"]\nlease_ttl: 2s\nstore: {{ kind: etcd, endpoints: [{}] }}\nbundle: {}\npins_dir: {}\nservices: {}\nadmin: \"127.0.0.1:{admin}\"\n",
            etcd.endpoints().iter().map(|e| format!("\"{e}\"")).collect::<Vec<_>>().join(", "),
            p(&d.join(format!("{c}-ca/bundle.pem"))),
            p(&d.join(format!("{c}-pins"))),
            p(&d.join(format!("{c}-services.yaml"))),
        );
        std::fs::write(d.join(format!("{c}.yaml")), cfg).unwrap();
        ok(&[
            "controller",
            "--config",
            &p(&d.join(format!("{c}.yaml"))),
            "--check",
        ]);
    }
    let spawn = |c: &str| {
        Command::new(env!("CARGO_BIN_EXE_fedmesh"))
            .args(["controller", "--config", &p(&d.join(format!("{c}.yaml")))])
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap()
    };
    let mut procs = Procs(vec![spawn("east"), spawn("west")]);

    let took = wait_for(
        "east imports echo.shop from west",
        Duration::from_secs(15),
        || {
            status(ea).is_some_and(|s| {
                s["imported"] == 1
                    && s["clusters"].as_array().is_some_and(|c| {
                        c.iter()
                            .any(|c| c["cluster"] == "west" && c["bundle_trusted"] == true)
                    })
            })
        },
    );
    eprintln!("converged in {took:?}");

    // Operator views straight from the store.
    let list: serde_json::Value = serde_json::from_str(&ok(&[
        "cluster", "list", "--store", &endpoints, "--output", "json",
    ]))
    .unwrap();
    assert_eq!(list.as_array().unwrap().len(), 2);
    let svcs: serde_json::Value = serde_json::from_str(&ok(&[
        "services",
        "list",
        "--store",
        &endpoints,
        "--cluster",
        "west",
        "--output",
        "json",
    ]))
    .unwrap();
    assert_eq!(svcs[0]["service"], "echo.shop");
    assert_eq!(svcs[0]["ready_endpoints"], 1);
    let table = ok(&["status", "--store", &endpoints]);
    assert!(
        table.contains("west.acme") && table.contains("EXPORTED"),
        "{table}"
    );

    // The services file changes: the export is withdrawn everywhere.
    std::fs::write(
        d.join("west-services.yaml"),
        west_services.replace("export: true", "export: false"),
    )
    .unwrap();
    wait_for("export withdrawn", Duration::from_secs(10), || {
        status(ea).is_some_and(|s| s["imported"] == 0)
    });
    std::fs::write(d.join("west-services.yaml"), west_services).unwrap();
    wait_for("export back", Duration::from_secs(10), || {
        status(ea).is_some_and(|s| s["imported"] == 1)
    });

    // west dies hard: its lease (2 s) expires and east forgets it.
    let mut west = procs.0.remove(1);
    west.kill().unwrap();
    west.wait().unwrap();
    let gone = wait_for("west expired", Duration::from_secs(6), || {
        status(ea).is_some_and(|s| s["clusters"].as_array().is_some_and(|c| c.is_empty()))
    });
    assert!(
        gone < Duration::from_secs(4),
        "west vanished after {gone:?} (TTL 2 s)"
    );
}
