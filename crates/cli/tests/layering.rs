//! The crate layering `docs/architecture.md` promises, checked from the
//! dependency graph cargo resolves: test fakes never ship in the `fedmesh`
//! binary, and the pure crates (catalog, wire's codec) build without an
//! async runtime.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::process::Command;

/// Package names in the normal (non-dev, non-build) dependency tree of
/// `package`, with every feature of the workspace as this test sees it.
fn normal_deps(package: &str) -> Vec<String> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let out = Command::new(env!("CARGO"))
        .current_dir(&root)
        .args([
            "tree",
            "--offline",
            "--locked",
            "-e",
            "normal",
            "--prefix",
            "none",
        ])
        .args(["--format", "{p}", "-p", package])
        .output()
        .expect("cargo tree runs");
    assert!(
        out.status.success(),
        "cargo tree -p {package}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .map(str::to_owned)
        .collect()
}

#[test]
fn the_shipped_binary_carries_no_test_fakes() {
    let deps = normal_deps("fedmesh-cli");
    assert!(deps.iter().any(|d| d == "fedmesh-rig"), "{deps:?}");
    assert!(!deps.iter().any(|d| d == "fedmesh-testkit"), "{deps:?}");
}

#[test]
fn the_catalog_builds_without_tokio() {
    for package in ["fedmesh-catalog", "fedmesh-wire"] {
        let deps = normal_deps(package);
        assert!(deps.iter().any(|d| d == package), "{deps:?}");
        assert!(!deps.iter().any(|d| d == "tokio"), "{package}: {deps:?}");
    }
}
