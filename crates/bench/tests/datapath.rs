//! `fedmesh-bench datapath --quick`: every path starts as separate
//! processes, carries bulk data, round trips, paced requests and new
//! connections, and reports them. A smoke: no figure is asserted beyond
//! "it moved data and lost nothing".
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::PathBuf;
use std::process::Command;

/// The `fedmesh` binary of this build, next to the benchmark's; built
/// when a package-only test run has not built it.
fn fedmesh() -> PathBuf {
    let bench = PathBuf::from(env!("CARGO_BIN_EXE_fedmesh-bench"));
    let path = bench.parent().unwrap().join("fedmesh");
    if !path.is_file() {
        let release = bench.parent().unwrap().ends_with("release");
        let mut build = Command::new(env!("CARGO"));
        build.args(["build", "-p", "fedmesh-cli", "--bin", "fedmesh"]);
        if release {
            build.arg("--release");
        }
        assert!(build.status().unwrap().success(), "building fedmesh");
    }
    path
}

#[test]
fn every_path_runs_as_processes_and_loses_nothing() {
    let out = Command::new(env!("CARGO_BIN_EXE_fedmesh-bench"))
        .args(["datapath", "--quick", "--json", "--fedmesh"])
        .arg(fedmesh())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "datapath --quick failed:\n{stderr}");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let paths = v["paths"].as_array().unwrap();
    let ids: Vec<&str> = paths.iter().map(|p| p["id"].as_str().unwrap()).collect();
    assert_eq!(
        ids,
        ["direct", "haproxy", "stunnel", "sidecars", "quic", "tcp", "quinn"]
    );
    for p in paths {
        let id = p["id"].as_str().unwrap();
        for k in ["goodput_gbps_1", "goodput_gbps_8"] {
            assert!(p[k].as_f64().unwrap() > 0.0, "{id}: {k}");
        }
        assert!(p["round_trip"]["p50_us"].as_f64().unwrap() > 0.0, "{id}");
        assert_eq!(p["connect"]["failed"], 0, "{id}: new connections failed");
        assert!(p["connect"]["per_s"].as_f64().unwrap() > 0.0, "{id}");
        for r in p["fixed_rate"].as_array().unwrap() {
            assert_eq!(r["failed"], 0, "{id}: paced requests lost at {}", r["rate"]);
        }
        let procs = p["processes"].as_array().unwrap();
        let want = match id {
            "direct" => 0,
            "haproxy" | "quinn" => 1,
            "stunnel" | "sidecars" => 2,
            _ => 4,
        };
        assert_eq!(procs.len(), want, "{id}: proxy processes");
        for x in procs {
            assert!(x["rss_peak_mib"].as_f64().unwrap() > 1.0, "{id}: {x}");
        }
    }
    // Ratios are each path's figure over the baseline's from the same run.
    let (quic, stunnel, tcp) = (&paths[4], &paths[2], &paths[5]);
    let g1 = |p: &serde_json::Value| p["goodput_gbps_1"].as_f64().unwrap();
    let ratio = |to: &str, what: &str| quic["ratios"][to][what].as_f64().unwrap();
    assert!((ratio("to_stunnel_pair", "goodput_1") - g1(quic) / g1(stunnel)).abs() < 1e-9);
    assert!((ratio("to_tcp_fallback", "goodput_1") - g1(quic) / g1(tcp)).abs() < 1e-9);
    let conns = |p: &serde_json::Value| p["connect"]["per_s"].as_f64().unwrap();
    assert!(
        (ratio("to_stunnel_pair", "connects_per_s") - conns(quic) / conns(stunnel)).abs() < 1e-9
    );
    // Both gateways together, on the cross-cluster paths only.
    let f = |p: &serde_json::Value, k: &str| p[k].as_f64();
    for p in [quic, tcp] {
        let gws: f64 = p["processes"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|x| x["name"].as_str().unwrap().ends_with("-gateway"))
            .map(|x| x["cpu_s_per_gb"].as_f64().unwrap())
            .sum();
        let got = f(p, "gateways_cpu_s_per_gb").expect("gateways' CPU");
        assert!((got - gws).abs() < 1e-9 && got > 0.0, "{got} vs {gws}");
        let to_stunnel = f(p, "gateways_cpu_to_stunnel_pair").unwrap();
        assert!((to_stunnel - got / f(stunnel, "cpu_s_per_gb").unwrap()).abs() < 1e-9);
    }
    assert!(f(stunnel, "gateways_cpu_s_per_gb").is_none());
}

#[test]
fn unknown_path_is_refused() {
    let out = Command::new(env!("CARGO_BIN_EXE_fedmesh-bench"))
        .args(["datapath", "--quick", "--paths", "direct,ipsec"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("no path `ipsec`"), "{stderr}");
}

#[test]
fn missing_fedmesh_binary_is_refused() {
    let out = Command::new(env!("CARGO_BIN_EXE_fedmesh-bench"))
        .args(["datapath", "--quick", "--fedmesh", "/nonexistent/fedmesh"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("no fedmesh binary at /nonexistent/fedmesh"),
        "{stderr}"
    );
}
