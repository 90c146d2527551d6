//! The controller application built by the library from a config file, as
//! `fedmesh controller` builds it: bound addresses, what they serve, an
//! orderly shutdown, and a clear refusal of configs that cannot work.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use fedmesh_federation::config::ControllerConfig;
use fedmesh_federation::{AppError, ControllerApp, ServiceSource};
use fedmesh_trust::{CertificateAuthority, TrustDomain};
use prometheus_client::registry::Registry;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const SERVICES: &str = "services:\n  - name: echo.shop\n    ports: [8080]\n    export: true\n    endpoints:\n      - { address: \"127.0.0.1:9000\", identity: \"spiffe://east.acme/ns/shop/sa/echo\" }\n";

/// `dir/controller.yaml` for cluster `east` on the embedded store, the
/// file source and the control API signing with the CA in `dir/ca`;
/// `api` replaces the API section when given.
fn config(dir: &Path, api: Option<&str>) -> ControllerConfig {
    let ca = CertificateAuthority::new_root(
        TrustDomain::new("east.acme").unwrap(),
        Duration::from_secs(86_400),
    )
    .unwrap();
    ca.save(&dir.join("ca")).unwrap();
    std::fs::create_dir_all(dir.join("pins")).unwrap();
    std::fs::write(dir.join("services.yaml"), SERVICES).unwrap();
    let p = |f: &str| dir.join(f).display().to_string();
    let api = match api {
        Some(a) => a.to_owned(),
        None => format!("{{ listen: \"127.0.0.1:0\", ca_dir: \"{}\" }}", p("ca")),
    };
    let text = format!(
        "cluster: east\ntrust_domain: east.acme\ngateways: [\"127.0.0.1:15443\"]\nstore: {{ kind: embedded }}\n\
         bundle: \"{}\"\npins_dir: \"{}\"\nservices: \"{}\"\nadmin: \"127.0.0.1:0\"\napi: {api}\n",
        p("ca/bundle.pem"),
        p("pins"),
        p("services.yaml"),
    );
    let path = dir.join("controller.yaml");
    std::fs::write(&path, text).unwrap();
    ControllerConfig::load(&path).unwrap()
}

async fn build(cfg: &ControllerConfig) -> Result<ControllerApp, AppError> {
    let settings = cfg.settings().unwrap();
    let mut registry = Registry::default();
    let source = ServiceSource::start(cfg, &settings, &mut registry).await?;
    ControllerApp::build(cfg, settings, source, registry).await
}

/// `GET path`: the whole response, or `None` when nothing listens.
async fn get(addr: SocketAddr, path: &str) -> Option<String> {
    let mut s = tokio::net::TcpStream::connect(addr).await.ok()?;
    let req = format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
    s.write_all(req.as_bytes()).await.ok()?;
    let mut out = String::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_to_string(&mut out))
        .await
        .ok()?
        .ok()?;
    Some(out)
}

#[tokio::test]
async fn an_app_built_from_its_config_serves_and_stops_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path(), None);
    let app = build(&cfg).await.unwrap();
    let admin = app.admin_addr().expect("admin bound");
    let api = app.api_addr().expect("api bound");
    assert_ne!(admin.port(), 0);
    assert_ne!(api.port(), 0);

    // The first view is computed from the services file the source listed.
    let deadline = Instant::now() + Duration::from_secs(10);
    while !app.controller().status().synced {
        assert!(Instant::now() < deadline, "never synced");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let status = get(admin, "/status").await.unwrap();
    assert!(status.contains("\"cluster\": \"east\""), "{status}");
    assert!(status.contains("\"synced\": true"), "{status}");
    let metrics = get(admin, "/metrics").await.unwrap();
    assert!(
        metrics.contains("fedmesh_controller_recomputes_total"),
        "{metrics}"
    );
    assert!(
        metrics.contains("fedmesh_api_"),
        "API metrics registered: {metrics}"
    );
    assert!(tokio::net::TcpStream::connect(api).await.is_ok());

    tokio::time::timeout(Duration::from_secs(10), app.shutdown(true))
        .await
        .expect("shutdown completes");
    // Both ports are closed once shutdown returns.
    assert!(get(admin, "/status").await.is_none(), "admin still serves");
    assert!(
        tokio::net::TcpStream::connect(api).await.is_err(),
        "api still listens"
    );
}

#[tokio::test]
async fn configs_that_cannot_work_are_refused_with_the_part_named() {
    let dir = tempfile::tempdir().unwrap();
    let cert_only = "{ listen: \"127.0.0.1:0\", cert: /nonexistent/cert.pem }";
    let cfg = config(dir.path(), Some(cert_only));
    let e = build(&cfg).await.err().expect("refused").to_string();
    assert!(e.contains("set either ca_dir, or cert and key"), "{e}");

    // A CA of another trust domain cannot sign for this cluster.
    let other = CertificateAuthority::new_root(
        TrustDomain::new("west.acme").unwrap(),
        Duration::from_secs(86_400),
    )
    .unwrap();
    other.save(&dir.path().join("west-ca")).unwrap();
    let wrong = format!(
        "{{ listen: \"127.0.0.1:0\", ca_dir: \"{}\" }}",
        dir.path().join("west-ca").display()
    );
    let cfg = config(dir.path(), Some(&wrong));
    let e = build(&cfg).await.err().expect("refused").to_string();
    assert!(e.contains("a CA of west.acme"), "{e}");

    // A services file that went missing after the config was read.
    let cfg = config(dir.path(), None);
    std::fs::remove_file(dir.path().join("services.yaml")).unwrap();
    let e = build(&cfg).await.err().expect("refused").to_string();
    assert!(e.contains("services file"), "{e}");
    assert!(e.contains("services.yaml"), "{e}");
}

/// `config` with `extra` appended to the file.
fn config_with(dir: &Path, extra: &str) -> ControllerConfig {
    config(dir, None);
    let path = dir.join("controller.yaml");
    let text = std::fs::read_to_string(&path).unwrap();
    std::fs::write(&path, format!("{text}{extra}")).unwrap();
    ControllerConfig::load(&path).unwrap()
}

#[tokio::test]
async fn clusterset_ips_work_with_the_file_source_and_bad_ranges_are_refused_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config_with(
        dir.path(),
        "clusterset_ips: { cidrs: [\"241.0.0.0/24\"] }\n",
    );
    let app = build(&cfg).await.unwrap();
    let admin = app.admin_addr().unwrap();
    let t = Instant::now();
    let status = loop {
        let s = get(admin, "/status").await.unwrap_or_default();
        if s.contains("\"clusterset_ips\"") {
            break s;
        }
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "no ClusterSet IP: {s}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let body: serde_json::Value =
        serde_json::from_str(status.split("\r\n\r\n").nth(1).unwrap()).unwrap();
    let ip = body["clusterset_ips"]["echo.shop"][0].as_str().unwrap();
    assert!(ip.starts_with("241.0.0."), "{body}");
    // Sidecars get it in their catalog: a connection to it on the
    // service's port is routed as the service.
    let catalog = app.controller().catalog();
    let t = Instant::now();
    let vip: std::net::IpAddr = ip.parse().unwrap();
    loop {
        let routed = catalog
            .borrow()
            .as_ref()
            .and_then(|c| c.service_for_vip(vip, 8080).map(ToString::to_string));
        if routed.as_deref() == Some("echo.shop") {
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "not routed: {routed:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(catalog
        .borrow()
        .as_ref()
        .unwrap()
        .service_for_vip(vip, 9999)
        .is_none());
    app.shutdown(false).await;

    for (cidrs, want) in [
        ("[\"241.0.0.0/16\", \"241.0.1.0/24\"]", "overlaps"),
        ("[\"127.0.0.0/24\"]", "special-purpose"),
        ("[\"241.0.0.0/31\"]", "no address"),
        (
            "[\"241.0.0.0/16\", \"242.0.0.0/16\"]",
            "one CIDR per IP family",
        ),
        ("[\"10.0.0.0/8\", \"nonsense\"]", "not a CIDR"),
    ] {
        let cfg = config_with(
            dir.path(),
            &format!("clusterset_ips: {{ cidrs: {cidrs} }}\n"),
        );
        let errs = cfg.settings().expect_err("refused").join("; ");
        assert!(
            errs.contains("clusterset_ips: ") && errs.contains(want),
            "{cidrs}: {errs}"
        );
    }
    // A range holding a gateway address is refused too.
    let cfg = config_with(
        dir.path(),
        "clusterset_ips: { cidrs: [\"241.0.0.0/24\"] }\n",
    );
    let mut text = std::fs::read_to_string(dir.path().join("controller.yaml")).unwrap();
    text = text.replace("127.0.0.1:15443", "241.0.0.9:15443");
    std::fs::write(dir.path().join("controller.yaml"), text).unwrap();
    drop(cfg);
    let cfg = ControllerConfig::load(&dir.path().join("controller.yaml")).unwrap();
    let errs = cfg.settings().expect_err("refused").join("; ");
    assert!(errs.contains("overlaps 241.0.0.9"), "{errs}");
}

/// `dns:` with the file source: the app serves `clusterset.local` from
/// its imports and ClusterSet IPs; a DNS config that cannot work is
/// refused, naming the part.
#[tokio::test]
async fn dns_serves_the_file_source_and_configs_that_cannot_work_are_refused() {
    use hickory_proto::op::{Message, Query, ResponseCode};
    use hickory_proto::rr::{Name, RData, RecordType};
    let dir = tempfile::tempdir().unwrap();
    let cfg = config_with(
        dir.path(),
        "clusterset_ips: { cidrs: [\"241.0.0.0/24\"] }\ndns: { listen: \"127.0.0.1:0\" }\n",
    );
    // A headless service beside it, with a StatefulSet-like hostname.
    let headless = "  - name: db.shop\n    ports: [5432]\n    export: true\n    headless: true\n    endpoints:\n      - { address: \"127.0.0.7:9000\", identity: \"spiffe://east.acme/ns/shop/sa/db\", hostname: db-0 }\n";
    std::fs::write(
        dir.path().join("services.yaml"),
        format!("{SERVICES}{headless}"),
    )
    .unwrap();
    let app = build(&cfg).await.unwrap();
    let dns = app.dns_addr().unwrap();
    let sock = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let mut buf = vec![0u8; 1500];
    // The first A record of `name`, once there is one.
    let mut resolve = async |name: &str| {
        let mut m = Message::new();
        m.set_id(1)
            .add_query(Query::query(Name::from_ascii(name).unwrap(), RecordType::A));
        let ask = m.to_vec().unwrap();
        let t = Instant::now();
        loop {
            sock.send_to(&ask, dns).await.unwrap();
            let n = tokio::time::timeout(Duration::from_secs(2), sock.recv(&mut buf))
                .await
                .unwrap()
                .unwrap();
            let r = Message::from_vec(&buf[..n]).unwrap();
            if let Some(RData::A(a)) = r.answers().first().map(|a| a.data()) {
                break a.0;
            }
            assert_eq!(r.response_code(), ResponseCode::NXDomain, "{r:?}");
            assert!(
                t.elapsed() < Duration::from_secs(10),
                "{name} never resolved"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    let ip = resolve("echo.shop.svc.clusterset.local.").await;
    for name in [
        "db.shop.svc.clusterset.local.",
        "db-0.east.db.shop.svc.clusterset.local.",
    ] {
        assert_eq!(resolve(name).await.to_string(), "127.0.0.7", "{name}");
    }
    assert!(ip.to_string().starts_with("241.0.0."), "{ip}");
    // The port is taken now: a second controller on it is refused.
    let taken = config_with(
        dir.path(),
        &format!("clusterset_ips: {{ cidrs: [\"241.0.0.0/24\"] }}\ndns: {{ listen: \"{dns}\" }}\n"),
    );
    let e = build(&taken).await.err().expect("refused").to_string();
    assert!(e.contains("dns.listen"), "{e}");
    app.shutdown(false).await;

    for (extra, want) in [
        ("dns: { listen: \"127.0.0.1:0\" }\n", "dns: needs clusterset_ips"),
        (
            "clusterset_ips: { cidrs: [\"241.0.0.0/24\"] }\ndns: { listen: \"127.0.0.1:0\", max_queries_per_second: 0 }\n",
            "dns.max_queries_per_second",
        ),
        (
            "kubernetes: { coredns: { dns_service: \"fedmesh-system/fedmesh-dns\" } }\n",
            "kubernetes.coredns: needs dns",
        ),
        (
            "clusterset_ips: { cidrs: [\"241.0.0.0/24\"] }\ndns: { listen: \"127.0.0.1:0\" }\nkubernetes: { coredns: { dns_service: \"fedmesh-dns\", configmap: \"a/b/c\" } }\n",
            "kubernetes.coredns.dns_service `fedmesh-dns`: expected NAMESPACE/NAME",
        ),
    ] {
        let cfg = config_with(dir.path(), extra);
        let errs = cfg.settings().expect_err("refused").join("; ");
        assert!(errs.contains(want), "{extra}: {errs}");
    }
}
