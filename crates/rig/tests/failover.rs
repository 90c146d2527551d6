//! Failover drills on the in-process rig: real QUIC and mTLS, a UDP relay
//! in front of every gateway. `east` calls `echo.demo`, which `west`
//! (preferred by policy) and `north` serve; `west` is broken and repaired.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use fedmesh_rig::drill::{run_on_rig, DrillReport, DrillSpec, FaultMode};
use fedmesh_rig::{ControlPlane, Rig, Topology};

fn topology(control_plane: ControlPlane) -> Topology {
    let mut t = Topology::demo();
    t.control_plane = control_plane;
    t.fault_relays = true;
    t.policies = serde_yaml_ng::from_str(
        r#"
echo.demo:
  failover: [west, north]
  outlier: { consecutive_failures: 3, base_ejection: 1s }
"#,
    )
    .unwrap();
    t
}

fn spec(mode: FaultMode) -> DrillSpec {
    DrillSpec {
        service: "echo.demo".into(),
        from: "east".into(),
        fail: "west".into(),
        mode,
        duration: Duration::from_secs(8),
        rate: 200,
        request_bytes: 1024,
        timeout: Duration::from_secs(2),
        slo: Duration::from_millis(250),
        http: false,
    }
}

/// Debug builds pay far more for the burst of TLS handshakes that follows a
/// failover than release builds (see the closing note's release figures),
/// so this test allows 2 s where the target (release) is 1 s. Detecting a
/// silent gateway by QUIC idle timeout alone would take longer than that.
const BOUND_MS: f64 = 2_000.0;

fn check(r: &DrillReport) {
    println!("{}", fedmesh_rig::drill::render(r));
    assert!(
        r.failed_cluster_share_before > 0.95,
        "west must take the traffic before the fault, or nothing is proven: {r:?}"
    );
    let first = r.first_elsewhere_ms.expect("north never answered");
    assert!(first < BOUND_MS, "first answer elsewhere after {first} ms");
    let to99 = r.to_99_percent_ms.expect("never back to 99%");
    assert!(to99 <= BOUND_MS, "99% only after {to99} ms");
    assert!(
        r.failed * 100 <= r.requests,
        "more than 1% of requests failed: {r:?}"
    );
    assert!(
        r.recovery_ms.is_some(),
        "west never served again after the repair"
    );
    assert_eq!(r.failed_after_restore, 0, "{r:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn blackhole_kill_and_drain_fail_over_within_a_second_and_recover() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            std::env::var("RUST_LOG").unwrap_or_else(|_| "warn,fedmesh_rig=info".into()),
        )
        .with_test_writer()
        .try_init();
    let rig = Rig::start(&topology(ControlPlane::Static)).await.unwrap();
    for mode in [
        FaultMode::Blackhole,
        FaultMode::KillGateway,
        FaultMode::Drain,
    ] {
        let r = run_on_rig(&rig, &spec(mode), |_| {}).await.unwrap();
        check(&r);
        // Let ejections expire so the next drill starts from a clean state.
        tokio::time::sleep(Duration::from_secs(3)).await;
    }
}

/// HTTP fails over per request: an idempotent request caught on the dead
/// path is retried on the next cluster, so none fails at all.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idempotent_http_requests_survive_blackhole_and_kill_without_a_failure() {
    let mut topo = topology(ControlPlane::Static);
    for s in topo
        .clusters
        .iter_mut()
        .flat_map(|c| c.services.iter_mut())
        .filter(|s| s.name == "echo.demo")
    {
        s.app = fedmesh_rig::AppKind::Http;
    }
    let rig = Rig::start(&topo).await.unwrap();
    for mode in [FaultMode::Blackhole, FaultMode::KillGateway] {
        let mut s = spec(mode);
        s.http = true;
        let r = run_on_rig(&rig, &s, |_| {}).await.unwrap();
        check(&r);
        assert_eq!(r.failed, 0, "{mode}: {r:?}");
        tokio::time::sleep(Duration::from_secs(3)).await;
    }
}
