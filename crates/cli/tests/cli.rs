//! The `fedmesh` binary as users call it.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::process::{Command, Output};

fn fedmesh(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_fedmesh"))
        .args(args)
        .output()
        .expect("run fedmesh")
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

#[test]
fn ca_init_issue_and_verify() {
    let dir = tempfile::tempdir().unwrap();
    let east = dir.path().join("east-ca");
    let west = dir.path().join("west-ca");
    let svid = dir.path().join("api");
    assert!(fedmesh(&[
        "ca",
        "init",
        "--trust-domain",
        "east.acme",
        "--out",
        s(&east)
    ])
    .status
    .success());
    assert!(fedmesh(&[
        "ca",
        "init",
        "--trust-domain",
        "west.acme",
        "--out",
        s(&west)
    ])
    .status
    .success());
    // Refuses to overwrite a CA without --force.
    let again = fedmesh(&[
        "ca",
        "init",
        "--trust-domain",
        "east.acme",
        "--out",
        s(&east),
    ]);
    assert!(!again.status.success());
    let out = fedmesh(&[
        "ca",
        "issue",
        "--ca",
        s(&east),
        "--spiffe-id",
        "spiffe://east.acme/ns/shop/sa/api",
        "--out",
        s(&svid),
        "--ttl",
        "1h",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let eb = format!("east.acme={}", s(&east.join("bundle.pem")));
    let wb = format!("west.acme={}", s(&west.join("bundle.pem")));
    let cert = svid.join("svid.pem");
    let ok = fedmesh(&[
        "trust",
        "verify",
        "--bundle",
        &eb,
        "--bundle",
        &wb,
        "--cert",
        s(&cert),
    ]);
    assert_eq!(ok.status.code(), Some(0));
    assert_eq!(stdout(&ok).trim(), "spiffe://east.acme/ns/shop/sa/api");

    let json = fedmesh(&[
        "trust",
        "verify",
        "--bundle",
        &eb,
        "--cert",
        s(&cert),
        "--json",
    ]);
    let v: serde_json::Value = serde_json::from_str(&stdout(&json)).unwrap();
    assert_eq!(v["valid"], true);
    assert_eq!(v["trust_domain"], "east.acme");

    // Only west's bundle: east's leaf has no bundle of its own domain.
    let bad = fedmesh(&["trust", "verify", "--bundle", &wb, "--cert", s(&cert)]);
    assert_eq!(bad.status.code(), Some(1));
    assert!(
        stdout(&bad).contains("no trust bundle for trust domain east.acme"),
        "{}",
        stdout(&bad)
    );
    // West's roots filed under east's name are refused as a bundle (usage).
    let wrong = format!("east.acme={}", s(&west.join("bundle.pem")));
    let o = fedmesh(&["trust", "verify", "--bundle", &wrong, "--cert", s(&cert)]);
    assert_eq!(o.status.code(), Some(2));

    // Expired as of a later time.
    let later = fedmesh(&[
        "trust",
        "verify",
        "--bundle",
        &eb,
        "--cert",
        s(&cert),
        "--at",
        "2099-01-01T00:00:00Z",
        "--json",
    ]);
    assert_eq!(later.status.code(), Some(1));
    let v: serde_json::Value = serde_json::from_str(&stdout(&later)).unwrap();
    assert_eq!(v["valid"], false);
    assert!(v["error"].as_str().unwrap().contains("expired"));

    // An intermediate CA's SVIDs verify with the root bundle alone.
    let inter = dir.path().join("inter");
    assert!(
        fedmesh(&["ca", "intermediate", "--ca", s(&east), "--out", s(&inter)])
            .status
            .success()
    );
    let isvid = dir.path().join("isvid");
    assert!(fedmesh(&[
        "ca",
        "issue",
        "--ca",
        s(&inter),
        "--spiffe-id",
        "spiffe://east.acme/x",
        "--out",
        s(&isvid)
    ])
    .status
    .success());
    let o = fedmesh(&[
        "trust",
        "verify",
        "--bundle",
        &eb,
        "--cert",
        s(&isvid.join("svid.pem")),
    ]);
    assert_eq!(o.status.code(), Some(0), "{}", stdout(&o));
}

#[test]
fn usage_errors_exit_2() {
    let dir = tempfile::tempdir().unwrap();
    for args in [
        vec!["trust", "verify", "--bundle", "nodomain", "--cert", "x.pem"],
        vec![
            "trust",
            "verify",
            "--bundle",
            "East.acme=x.pem",
            "--cert",
            "x.pem",
        ],
        vec![
            "trust",
            "verify",
            "--bundle",
            "east.acme=/nonexistent.pem",
            "--cert",
            "x.pem",
        ],
        vec!["trust", "verify", "--cert", "x.pem"],
        vec![
            "ca",
            "init",
            "--trust-domain",
            "East",
            "--out",
            s(dir.path()),
        ],
        vec![
            "ca",
            "issue",
            "--ca",
            s(dir.path()),
            "--spiffe-id",
            "spiffe://e/a/../b",
            "--out",
            s(dir.path()),
        ],
    ] {
        let o = fedmesh(&args);
        assert_eq!(
            o.status.code(),
            Some(2),
            "{args:?}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
    }
    // A certificate file that is not a certificate: invalid, not usage.
    let ca = dir.path().join("ca");
    assert!(
        fedmesh(&["ca", "init", "--trust-domain", "east.acme", "--out", s(&ca)])
            .status
            .success()
    );
    let junk = dir.path().join("junk.pem");
    std::fs::write(&junk, "hello").unwrap();
    let b = format!("east.acme={}", s(&ca.join("bundle.pem")));
    assert_eq!(
        fedmesh(&["trust", "verify", "--bundle", &b, "--cert", s(&junk)])
            .status
            .code(),
        Some(1)
    );
}

#[test]
fn demo_json_reports_quic_and_zero_failures() {
    // The closing drill has its own test below.
    let o = fedmesh(&[
        "demo",
        "--json",
        "--connections",
        "8",
        "--requests",
        "5",
        "--no-drill",
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let v: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
    assert_eq!(v["requests"]["total"], 80);
    assert_eq!(v["requests"]["ok"], 80);
    assert_eq!(v["requests"]["failed"], 0);
    assert_eq!(v["cross_cluster"]["ok"], 40);
    assert_eq!(v["cross_cluster"]["failed"], 0);
    assert_eq!(v["cross_cluster"]["transport"], "quic");
    assert_eq!(v["cross_cluster"]["streams_out"], 8);
    // Measured from east's gateway: every connection rode QUIC.
    assert_eq!(v["cross_cluster"]["streams_by_transport"]["quic"], 8);
    assert_eq!(v["cross_cluster"]["streams_by_transport"]["tcp"], 0);
    let conns = v["cross_cluster"]["connections"].as_array().unwrap();
    assert_eq!(
        conns
            .iter()
            .map(|c| c["connections"].as_u64().unwrap())
            .sum::<u64>(),
        8
    );
    assert!(conns.iter().all(|c| c["transport"] == "quic"), "{conns:?}");
    let ids = v["identities"].as_array().unwrap();
    assert!(ids
        .iter()
        .any(|i| i["via"] == "gateway" && i["source"] == "spiffe://east.demo/ns/demo/sa/client"));
    // east's controller answers echo.demo's MCS name with its ClusterSet IP.
    let dns = &v["clusterset_dns"];
    assert_eq!(dns["name"], "echo.demo.svc.clusterset.local");
    let addrs = dns["addresses"]
        .as_array()
        .unwrap_or_else(|| panic!("{dns}"));
    assert_eq!(addrs.len(), 1, "{dns}");
    assert!(addrs[0].as_str().unwrap().starts_with("241.0.0."), "{dns}");
}

#[test]
fn drill_reports_failover_as_json() {
    // Drain is the deterministic mode: west refuses new streams before any
    // payload, so callers move to north at once and lose nothing.
    let o = fedmesh(&[
        "drill",
        "failover",
        "--mode",
        "drain",
        "--duration",
        "6s",
        "--rate",
        "50",
        "--output",
        "json",
    ]);
    let out = stdout(&o);
    assert!(
        o.status.success(),
        "{out}\n{}",
        String::from_utf8_lossy(&o.stderr)
    );
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["mode"], "drain");
    assert_eq!(v["requests"], 300);
    assert_eq!(v["failed"], 0);
    // West is preferred (the first requests may go north while its
    // connection comes up).
    assert!(
        v["failed_cluster_share_before"].as_f64().unwrap() > 0.9,
        "{v}"
    );
    assert!(v["first_elsewhere_ms"].as_f64().unwrap() < 1000.0, "{v}");
    assert!(v["recovery_ms"].is_number(), "{v}");
    assert!(v["served_by"]["north"].as_u64().unwrap() > 0);
    assert_eq!(v["pass"], true);
    let bad = fedmesh(&["drill", "failover", "--mode", "meteor"]);
    assert_eq!(bad.status.code(), Some(2));
    let bad = fedmesh(&["drill", "failover", "--on", "prod"]);
    assert_eq!(bad.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&bad.stderr).contains("--gateway-api"));
}

/// `drill failover --gateway-api` against a gateway that is not there:
/// a clear message within seconds, before any load; the flags it needs
/// are clap's to require; kill-gateway is the demo's only.
#[test]
fn a_drill_against_an_unreachable_gateway_fails_fast_and_clearly() {
    let dir = tempfile::tempdir().unwrap();
    let ca = dir.path().join("ca");
    let op = dir.path().join("op");
    assert!(
        fedmesh(&["ca", "init", "--trust-domain", "east.acme", "--out", s(&ca)])
            .status
            .success()
    );
    assert!(fedmesh(&[
        "ca",
        "issue",
        "--ca",
        s(&ca),
        "--spiffe-id",
        "spiffe://east.acme/ns/ops/sa/drill",
        "--out",
        s(&op),
    ])
    .status
    .success());
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let api = closed.local_addr().unwrap().to_string();
    drop(closed);
    let t = std::time::Instant::now();
    let o = fedmesh(&[
        "drill",
        "failover",
        "--gateway-api",
        &api,
        "--load",
        "127.0.0.1:9",
        "--operator",
        s(&op),
    ]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(
        t.elapsed() < std::time::Duration::from_secs(10),
        "{:?}",
        t.elapsed()
    );
    assert!(
        err.contains(&api) && err.contains("cannot connect"),
        "{err}"
    );
    assert!(o.stdout.is_empty());
    // The load and the operator go with the API.
    let o = fedmesh(&["drill", "failover", "--gateway-api", &api]);
    assert_eq!(o.status.code(), Some(2));
    let o = fedmesh(&[
        "drill",
        "failover",
        "--gateway-api",
        &api,
        "--load",
        "127.0.0.1:9",
        "--operator",
        s(&op),
        "--mode",
        "kill-gateway",
    ]);
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stderr).contains("demo only"));
}

#[test]
fn gateway_config_check_reports_every_problem() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("gw.yaml");
    std::fs::write(
        &cfg,
        r#"
listen: { quic: "127.0.0.1:0", tunnel: "127.0.0.1:0" }
identity: { cert: /nonexistent/svid.pem, key: /nonexistent/svid.key }
bundles: [ { trust_domain: "East", path: /nonexistent/b.pem } ]
catalog: { cluster: "Bad_Name", trust_domain: east.acme }
limits: { header_timeout: 0s }
"#,
    )
    .unwrap();
    let o = fedmesh(&["gateway", "--config", s(&cfg), "--check"]);
    assert_eq!(o.status.code(), Some(1));
    let err = String::from_utf8_lossy(&o.stderr);
    for needle in [
        "header_timeout",
        "cluster name",
        "identity",
        "trust_domain \"East\"",
    ] {
        assert!(err.contains(needle), "missing {needle:?} in {err}");
    }
}

/// A root rotation's endorsements, as an operator makes them: the old+new
/// bundle endorsed by the old root is accepted by a peer that trusts only
/// the old root; a bundle endorsed by a stranger is not; bad input is a
/// usage error.
#[test]
fn trust_endorse_makes_a_rotation_peers_accept() {
    use fedmesh_trust::rotation::{accept, Acceptance, Endorsement};
    use fedmesh_trust::{TrustBundle, TrustDomain};
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    for name in ["old", "new", "stranger"] {
        let o = fedmesh(&[
            "ca",
            "init",
            "--trust-domain",
            "west.acme",
            "--out",
            s(&d.join(name)),
        ]);
        assert!(o.status.success(), "{o:?}");
    }
    let td = TrustDomain::new("west.acme").unwrap();
    let read =
        |p: &Path| TrustBundle::from_pem(td.clone(), &std::fs::read_to_string(p).unwrap()).unwrap();
    let both = format!(
        "{}{}",
        std::fs::read_to_string(d.join("old/bundle.pem")).unwrap(),
        std::fs::read_to_string(d.join("new/bundle.pem")).unwrap()
    );
    std::fs::write(d.join("both.pem"), both).unwrap();
    let endorse = |by: &str, out: &str| {
        fedmesh(&[
            "trust",
            "endorse",
            "--bundle",
            s(&d.join("both.pem")),
            "--by",
            s(&d.join(by)),
            "--out",
            s(&d.join(out)),
        ])
    };
    let o = endorse("old", "by-old.json");
    assert!(o.status.success(), "{o:?}");
    let o = endorse("stranger", "by-stranger.json");
    assert!(o.status.success(), "{o:?}");
    let list = |f: &str| -> Vec<Endorsement> {
        serde_json::from_str(&std::fs::read_to_string(d.join(f)).unwrap()).unwrap()
    };
    let old = read(&d.join("old/bundle.pem"));
    let offered = read(&d.join("both.pem"));
    assert_eq!(offered.roots().len(), 2);
    assert_eq!(
        accept(Some(&old), None, &offered, &list("by-old.json")).unwrap(),
        Acceptance::Accept
    );
    assert!(accept(Some(&old), None, &offered, &list("by-stranger.json")).is_err());
    // Missing CA, unreadable bundle: exit 2 with the reason.
    let o = endorse("nope", "x.json");
    assert_eq!(o.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&o.stderr).contains("nope"));
}

/// A healthy demo is quiet: the report on stdout, nothing on a piped
/// stderr; with `-v`, logs on stderr and not one warning, drill included
/// (its fault is announced, so what it breaks is logged at debug).
#[test]
fn a_healthy_demo_warns_about_nothing() {
    let small = ["--connections", "4", "--requests", "3"];
    let o = fedmesh(&[&["demo", "--no-drill"][..], &small].concat());
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(stdout(&o).contains("PASS"), "{}", stdout(&o));
    assert_eq!(String::from_utf8_lossy(&o.stderr), "", "stderr not quiet");

    let o = fedmesh(&[&["demo", "-v", "--drill-duration", "3s"][..], &small].concat());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{}\n{err}", stdout(&o));
    assert!(err.contains(" INFO "), "-v logged nothing");
    let warnings: Vec<&str> = err
        .lines()
        .filter(|l| l.contains(" WARN ") || l.contains(" ERROR "))
        .collect();
    assert!(warnings.is_empty(), "{warnings:#?}");
    assert!(stdout(&o).contains("stream tries cut on west"));
}

#[test]
fn unknown_log_levels_are_refused() {
    for args in [
        &["--log", "verbose", "demo"][..],
        &["--log", "fedmesh_gateway=loud", "demo"][..],
    ] {
        let o = fedmesh(args);
        assert_eq!(o.status.code(), Some(2), "{args:?}");
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(err.contains("unknown log level"), "{args:?}: {err}");
        assert!(o.stdout.is_empty());
    }
    let o = Command::new(env!("CARGO_BIN_EXE_fedmesh"))
        .args(["demo"])
        .env("RUST_LOG", "chatty")
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&o.stderr).contains("RUST_LOG `chatty`"));
}

/// Headless Chromium (Debian's `chromium`, which `scripts/test.sh`
/// installs), or `None` outside CI when it is missing.
fn chromium(test: &str) -> Option<&'static str> {
    for bin in ["chromium", "chromium-browser"] {
        let ok = std::process::Command::new(bin)
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success());
        if ok {
            return Some(bin);
        }
    }
    assert!(
        std::env::var_os("CI").is_none(),
        "{test}: chromium is missing (apt-get install chromium)"
    );
    eprintln!("{test}: skipped, chromium is missing");
    None
}

/// `drill failover --report FILE` writes one self-contained page that a
/// real browser renders: the figures, three SVG charts with the fault
/// window shaded, bars by serving cluster.
#[test]
fn a_drill_report_renders_in_headless_chromium() {
    let Some(browser) = chromium("a_drill_report_renders_in_headless_chromium") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let page = dir.path().join("drill.html");
    let o = fedmesh(&[
        "drill",
        "failover",
        "--duration",
        "4s",
        "--rate",
        "100",
        "--output",
        "json",
        "--report",
        s(&page),
    ]);
    assert!(
        o.status.code().is_some_and(|c| c <= 1),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    let v: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
    let out = std::process::Command::new(browser)
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
        ])
        .arg(format!(
            "--user-data-dir={}",
            dir.path().join("profile").display()
        ))
        .arg("--dump-dom")
        .arg(format!("file://{}", page.display()))
        .output()
        .unwrap();
    let dom = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && dom.contains("</html>"),
        "chromium: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    // What the browser built, not what the file says: parsed elements.
    assert!(
        dom.contains("<h1>Drill: echo.demo from east with west blackhole</h1>"),
        "{dom}"
    );
    assert_eq!(dom.matches("<svg").count(), 3, "{dom}");
    assert_eq!(dom.matches("class=\"fault\"").count(), 3);
    let summary = format!("{} of {} requests succeeded", v["ok"], v["requests"]);
    assert!(dom.contains(&summary), "{summary} not in the page");
    assert!(dom.contains("data-cluster=\"north\""), "no bars for north");
    assert!(dom.contains("data-cluster=\"west\""), "no bars for west");
}

/// `fedmesh drill echo`: the app a deployment runs to be drilled against
/// says who it is, then echoes.
#[test]
fn the_drill_echo_app_names_itself_and_echoes() {
    use std::io::{BufRead, Read, Write};
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut app = std::process::Command::new(env!("CARGO_BIN_EXE_fedmesh"))
        .args([
            "drill",
            "echo",
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--name",
            "west/echo-7",
        ])
        .spawn()
        .unwrap();
    let t = std::time::Instant::now();
    let conn = loop {
        match std::net::TcpStream::connect(("127.0.0.1", port)) {
            Ok(c) => break c,
            Err(_) if t.elapsed() < std::time::Duration::from_secs(10) => {
                std::thread::sleep(std::time::Duration::from_millis(20))
            }
            Err(e) => panic!("{e}"),
        }
    };
    conn.set_read_timeout(Some(std::time::Duration::from_secs(5)))
        .unwrap();
    let mut r = std::io::BufReader::new(conn.try_clone().unwrap());
    let mut banner = String::new();
    r.read_line(&mut banner).unwrap();
    assert_eq!(banner, "west/echo-7\n");
    (&conn).write_all(b"ping").unwrap();
    let mut back = [0u8; 4];
    r.read_exact(&mut back).unwrap();
    assert_eq!(&back, b"ping");
    app.kill().unwrap();
    app.wait().unwrap();
    let bad = fedmesh(&["drill", "echo", "--name", ""]);
    assert_eq!(bad.status.code(), Some(1));
}
