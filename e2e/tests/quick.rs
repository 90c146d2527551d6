//! The e2e scenarios at CI length, as a user runs them: the `fedmesh-e2e`
//! binary against the `fedmesh` binary built beside it (the workspace
//! build builds both; `fedmesh` has the etcd store in its default build).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::PathBuf;
use std::process::Command;

#[test]
fn scenarios_pass_at_ci_length() {
    let Some(_) = fedmesh_testkit::etcd::etcd_or_skip("scenarios_pass_at_ci_length") else {
        return;
    };
    let me = PathBuf::from(env!("CARGO_BIN_EXE_fedmesh-e2e"));
    let fedmesh = me.with_file_name("fedmesh");
    assert!(
        fedmesh.exists(),
        "{} is missing: build the workspace (cargo build --workspace --all-features)",
        fedmesh.display()
    );
    let json = tempfile::NamedTempFile::new().unwrap();
    let out = Command::new(&me)
        .args(["run", "--quick", "--json"])
        .arg(json.path())
        .arg("--fedmesh")
        .arg(&fedmesh)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    println!("{stdout}");
    eprintln!("{}", String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "e2e scenarios failed:\n{stdout}");
    // The report is there and says what ran.
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(json.path()).unwrap()).unwrap();
    let names: Vec<&str> = v
        .as_array()
        .unwrap()
        .iter()
        .map(|o| o["scenario"].as_str().unwrap())
        .collect();
    assert_eq!(
        names,
        [
            "steady",
            "clusterset-ip",
            "drill",
            "partition",
            "lossy-wan",
            "control-plane-outage",
            "etcd-member-loss",
            "gateway-restart",
            "udp-blocked",
            "root-rotation"
        ]
    );
    assert!(v.as_array().unwrap().iter().all(|o| o["passed"] == true));
    // The drill's own report went beside it.
    let stem = json
        .path()
        .file_stem()
        .unwrap()
        .to_string_lossy()
        .into_owned();
    let drill = json.path().with_file_name(format!("{stem}-drill.json"));
    let d: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&drill).unwrap()).unwrap();
    std::fs::remove_file(&drill).unwrap();
    assert!(d["requests"].as_u64().unwrap() > 0, "{d}");
    let page = json.path().with_file_name(format!("{stem}-drill.html"));
    let html = std::fs::read_to_string(&page).unwrap();
    std::fs::remove_file(&page).unwrap();
    assert!(html.contains("<svg"), "the drill's page");
}

#[test]
fn unknown_scenarios_are_refused() {
    let me = env!("CARGO_BIN_EXE_fedmesh-e2e");
    let out = Command::new(me).args(["run", "nope"]).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("unknown scenario"));
}
