//! Authorization and outlier policy through the whole data path: the
//! destination sidecar decides on the source identity the gateways carried.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use fedmesh_rig::{run_load, LoadSpec, Rig, Topology};

fn topology(policies: &str) -> Topology {
    let mut t = Topology::demo();
    t.policies = serde_yaml_ng::from_str(policies).unwrap();
    t
}

fn spec() -> LoadSpec {
    LoadSpec {
        connections: 6,
        requests_per_connection: 2,
        request_bytes: 64,
        timeout: Duration::from_secs(5),
        concurrency: 3,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_caller_outside_the_allow_list_is_denied_where_the_request_lands() {
    // echo.demo admits only north's workloads; hello.demo admits east's
    // demo namespace.
    let rig = Rig::start(&topology(
        r#"
echo.demo:
  authz: { allow: ["spiffe://north.demo/*"] }
hello.demo:
  authz: { allow: ["spiffe://east.demo/ns/demo/*"] }
"#,
    ))
    .await
    .unwrap();
    let east = rig.cluster("east").unwrap();

    let denied = run_load(east.client_addr("echo.demo").unwrap(), &spec()).await;
    assert_eq!(denied.ok, 0, "east's client must not reach echo.demo");
    assert_eq!(denied.failed, 12);
    // Refused by the serving sidecars (not by a gateway), counted there.
    let count = |cluster: &str| -> u64 {
        rig.cluster(cluster)
            .unwrap()
            .sidecars
            .iter()
            .map(|(_, sc)| sc.metrics().service(&sc.metrics().denied, "echo.demo"))
            .sum()
    };
    let (west, north) = (count("west"), count("north"));
    // One denial per connection: a denial is final, never failed over to
    // the other cluster as if it were an outage.
    assert_eq!(west + north, 6, "{west} + {north}");
    let failovers = east
        .client
        .metrics()
        .service(&east.client.metrics().failovers, "echo.demo");
    assert_eq!(failovers, 0);

    let allowed = run_load(east.client_addr("hello.demo").unwrap(), &spec()).await;
    assert_eq!(allowed.failed, 0, "{:?}", allowed.errors);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_endpoint_is_ejected_and_the_rest_take_the_traffic() {
    let mut rig = Rig::start(&topology(
        r#"
hello.demo:
  outlier: { consecutive_failures: 2, base_ejection: 30s }
"#,
    ))
    .await
    .unwrap();
    let i = rig.clusters.iter().position(|c| c.name == "east").unwrap();
    let j = rig.clusters[i]
        .apps
        .iter()
        .position(|a| a.name == "east/hello-0")
        .unwrap();
    // Its sidecar stays up and answers "upstream refused" before payload.
    drop(rig.clusters[i].apps.remove(j));
    let east = &rig.clusters[i];
    let r = run_load(east.client_addr("hello.demo").unwrap(), &spec()).await;
    assert_eq!(
        r.failed, 0,
        "connect-level failover hides the dead app: {:?}",
        r.errors
    );
    assert_eq!(r.served_by.keys().collect::<Vec<_>>(), ["east/hello-1"]);
    let m = east.client.metrics();
    let ejections: u64 = m
        .ejections
        .get_or_create(&fedmesh_sidecar::metrics::MemberLabels {
            service: "hello.demo".into(),
            kind: "endpoint",
        })
        .get();
    assert_eq!(ejections, 1);
    // Two failures eject it (a few more may have been in flight at once);
    // after that nothing is sent its way.
    let failovers = m.service(&m.failovers, "hello.demo");
    assert!((2..=4).contains(&failovers), "{failovers}");
    let r2 = run_load(east.client_addr("hello.demo").unwrap(), &spec()).await;
    assert_eq!(r2.failed, 0);
    assert_eq!(
        m.service(&m.failovers, "hello.demo"),
        failovers,
        "ejected: not tried again"
    );
}
