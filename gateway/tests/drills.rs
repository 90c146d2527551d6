//! The drill API of a running gateway: an operator proven by its client
//! SVID blackholes a peer cluster, traffic moves to the other cluster and
//! the fault ends by itself; whoever is not an operator, a second drill,
//! and the plain admin port are refused and counted.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use fedmesh_gateway::{DrillClient, DrillClientError, DrillId, FaultKind, FaultSpec};
use fedmesh_testkit::{run_load, LoadSpec, Rig, Topology};
use serde_json::{json, Value};

const OPERATORS: &str = "spiffe://east.demo/ns/ops/*";

/// Halt a drill when a guarded service fails over 5% of 10 requests in 2 s.
const HALT: fedmesh_testkit::drill::HaltRule = fedmesh_testkit::drill::HaltRule {
    max_error_rate: 0.05,
    window: Duration::from_secs(2),
    min_requests: 10,
};

/// A drill API client for `addr` presenting an SVID for `id` issued by
/// east's CA.
fn client_as(rig: &Rig, id: &str, addr: SocketAddr) -> DrillClient {
    let east = rig.cluster("east").unwrap();
    let svid = east
        .ca
        .issue(&id.parse().unwrap(), Duration::from_secs(600))
        .unwrap();
    DrillClient::new(addr, &svid, east.bundles.clone(), Duration::from_secs(5)).unwrap()
}

/// One call as `id`: the status code and the JSON body (an error's
/// reason as `{"error": …}`).
async fn call(
    rig: &Rig,
    id: &str,
    addr: SocketAddr,
    method: &str,
    path: &str,
    body: Option<Value>,
) -> (u16, Value) {
    let c = client_as(rig, id, addr);
    let drill = path
        .strip_prefix("/faults/")
        .map(|d| DrillId::new(d).unwrap());
    let r = match (method, drill) {
        ("GET", _) => c.status().await,
        ("PUT", Some(d)) => {
            let faults: Vec<FaultSpec> =
                serde_json::from_value(body.unwrap_or_default()["faults"].clone()).unwrap();
            c.set(&d, &faults).await
        }
        ("DELETE", Some(d)) => c.clear(&d).await,
        other => panic!("{other:?}"),
    };
    match r {
        Ok(v) => (200, v),
        Err(DrillClientError::Refused { code, error, .. }) => (code, json!({ "error": error })),
        Err(e) => panic!("{e}"),
    }
}

/// The demo's clusters, every gateway with a drill API for [`OPERATORS`].
async fn drill_rig() -> Rig {
    Rig::start(&Topology {
        drill_operators: vec![OPERATORS.into()],
        ..Topology::demo()
    })
    .await
    .unwrap()
}

/// Who served `n` one-request connections from east to `echo.demo`.
async fn served_by(rig: &Rig, n: usize) -> (u64, std::collections::BTreeMap<String, u64>) {
    let addr = rig
        .cluster("east")
        .unwrap()
        .client_addr("echo.demo")
        .unwrap();
    let r = run_load(
        addr,
        &LoadSpec {
            connections: n,
            requests_per_connection: 1,
            request_bytes: 64,
            timeout: Duration::from_secs(3),
            concurrency: 4,
        },
    )
    .await;
    let by_cluster = r.served_by.iter().fold(
        Default::default(),
        |mut m: std::collections::BTreeMap<String, u64>, (k, v)| {
            *m.entry(k.split('/').next().unwrap_or("?").to_owned())
                .or_default() += v;
            m
        },
    );
    (r.failed, by_cluster)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operator_blackholes_a_peer_and_the_fault_ends_by_itself() {
    let rig = drill_rig().await;
    let east = rig.cluster("east").unwrap();
    let api = east.gateway.drills_addr().expect("a drill API");
    let operator = "spiffe://east.demo/ns/ops/sa/drill";
    // Both west and north serve echo.demo at first.
    let (_, before) = served_by(&rig, 40).await;
    assert!(before.get("west").is_some_and(|n| *n > 0), "{before:?}");

    let blackhole = json!({ "faults": [{ "kind": "blackhole", "peer": "west", "ttl": "8s" }] });
    let (code, body) = call(
        &rig,
        operator,
        api,
        "PUT",
        "/faults/game-day-1",
        Some(blackhole),
    )
    .await;
    assert_eq!(code, 200, "{body}");
    let set_at = Instant::now();
    assert_eq!(body["drill"], "game-day-1");
    assert_eq!(body["faults"][0]["kind"], "blackhole");
    assert!(body["faults"][0]["remaining_ms"].as_u64().unwrap() <= 8000);

    // While it holds: west serves nothing that east sends.
    let (failed, during) = served_by(&rig, 8).await;
    assert!(
        set_at.elapsed() < Duration::from_secs(8),
        "the load outlasted the fault: nothing to conclude"
    );
    assert!(
        !during.contains_key("west"),
        "west served under a blackhole: {during:?}"
    );
    assert!(during.get("north").is_some_and(|n| *n > 0), "{during:?}");
    eprintln!("under the blackhole: {during:?}, {failed} failed");

    // A second drill is refused, not stacked; so is a client that is no
    // operator, and the plain admin port takes no fault at all.
    let drain = json!({ "faults": [{ "kind": "drain", "ttl": "10s" }] });
    let (code, body) = call(
        &rig,
        operator,
        api,
        "PUT",
        "/faults/other",
        Some(drain.clone()),
    )
    .await;
    assert_eq!(code, 409, "{body}");
    assert!(
        body["error"].as_str().unwrap().contains("game-day-1"),
        "{body}"
    );
    let (code, _) = call(
        &rig,
        "spiffe://east.demo/ns/demo/sa/client",
        api,
        "PUT",
        "/faults/x",
        Some(drain),
    )
    .await;
    assert_eq!(code, 403);
    // (The plain admin port answers a fault request with 405:
    // `datapath.rs`, `admin_endpoint_serves_metrics`.)

    // It ends by itself: the API says so, and west serves again.
    let t = Instant::now();
    loop {
        let (code, body) = call(&rig, operator, api, "GET", "/faults", None).await;
        assert_eq!(code, 200);
        if body["drill"].is_null() {
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "never expired: {body}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(set_at.elapsed() >= Duration::from_secs(8), "ended early");
    let t = Instant::now();
    loop {
        let (_, after) = served_by(&rig, 12).await;
        if after.get("west").is_some_and(|n| *n > 0) {
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "west never served again: {after:?}"
        );
    }
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, &rig.registry).unwrap();
    let count = |name: &str, labels: &[&str]| -> u64 {
        text.lines()
            .filter(|l| l.starts_with(name) && l.contains("cluster=\"east\""))
            .filter(|l| labels.iter().all(|want| l.contains(want)))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .map(|v| v as u64)
            .sum()
    };
    let requests = "fedmesh_gateway_drill_requests_total";
    assert_eq!(count(requests, &["result=\"ok\"", "reason=\"set\""]), 1);
    assert_eq!(
        count(requests, &["result=\"refused\"", "reason=\"busy\""]),
        1
    );
    assert_eq!(
        count(requests, &["result=\"refused\"", "reason=\"not_operator\""]),
        1
    );
    assert_eq!(
        count(
            "fedmesh_gateway_drill_faults_expired_total",
            &["kind=\"blackhole\""]
        ),
        1
    );
    assert!(count("fedmesh_gateway_drill_datagrams_dropped_total", &[]) > 0);
}

/// The drill runner with the fault set through the API (what `fedmesh
/// drill` does against a deployment): traffic moves to north while west is
/// blackholed, and nothing is left behind; a gateway that cannot be
/// reached, or that does not take us as an operator, fails the drill
/// within seconds, before any load.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drill_through_the_api_moves_traffic_and_leaves_no_fault() {
    use fedmesh_testkit::drill::{run_with_api, ApiDrill, DrillSpec, FaultMode};
    let rig = drill_rig().await;
    let east = rig.cluster("east").unwrap();
    let client_as = |id: &str, addr: SocketAddr| client_as(&rig, id, addr);
    let api = east.gateway.drills_addr().unwrap();
    let operator = client_as("spiffe://east.demo/ns/ops/sa/drill", api);
    let spec = DrillSpec {
        service: "echo.demo".into(),
        from: "east".into(),
        fail: "west".into(),
        mode: FaultMode::Blackhole,
        duration: Duration::from_secs(6),
        rate: 100,
        request_bytes: 64,
        timeout: Duration::from_secs(2),
        slo: Duration::from_millis(250),
        http: false,
    };
    let faults = [FaultSpec {
        kind: FaultKind::Blackhole,
        peer: Some("west".parse().unwrap()),
        ttl: spec.restore_at() - spec.break_at() + Duration::from_secs(5),
    }];
    let drill = DrillId::new("api-drill").unwrap();
    let load = east.client_addr("echo.demo").unwrap();
    let report = run_with_api(
        load,
        &spec,
        &ApiDrill {
            clients: std::slice::from_ref(&operator),
            drill: &drill,
            faults: &faults,
            guards: &[],
            halt: HALT,
        },
        |_| {},
    )
    .await
    .unwrap();
    eprintln!("{}", fedmesh_testkit::drill::render(&report));
    assert!(report.failed_cluster_share_before > 0.0, "{report:?}");
    assert!(report.first_elsewhere_ms.is_some(), "{report:?}");
    assert!(
        report.served_by.get("north").is_some_and(|n| *n > 0),
        "{report:?}"
    );
    // West answered nothing while it was blackholed.
    let (b, r) = (report.break_at_ms, report.restore_at_ms);
    let from_slice =
        |s: &&fedmesh_testkit::drill::Slice| s.from_ms >= b + 250 && s.from_ms + 250 <= r;
    assert!(
        report
            .timeline
            .iter()
            .filter(from_slice)
            .all(|s| s.by_failed_cluster == 0),
        "{:?}",
        report.timeline
    );
    // Nothing left behind.
    assert!(operator.status().await.unwrap()["drill"].is_null());

    // A drill through `client` that must fail before any load: its error.
    let refused = async |client: &DrillClient| {
        let api = ApiDrill {
            clients: std::slice::from_ref(client),
            drill: &drill,
            faults: &faults,
            guards: &[],
            halt: HALT,
        };
        run_with_api(load, &spec, &api, |_| {})
            .await
            .unwrap_err()
            .to_string()
    };
    // Unreachable: a clear message within seconds, no load run.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let nowhere = client_as(
        "spiffe://east.demo/ns/ops/sa/drill",
        closed.local_addr().unwrap(),
    );
    drop(closed);
    let t = Instant::now();
    let e = refused(&nowhere).await;
    assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
    assert!(e.contains("cannot connect"), "{e}");
    // Not an operator: refused before any load.
    let e = refused(&client_as("spiffe://east.demo/ns/demo/sa/client", api)).await;
    assert!(e.contains("403") && e.contains("not an operator"), "{e}");
    assert!(operator.status().await.unwrap()["drill"].is_null());
}

/// The halt condition: a guarded service outside the drill that fails
/// past the bound while the fault is on makes the drill remove its fault
/// at once and say why.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drill_halts_when_a_guarded_service_fails() {
    use fedmesh_testkit::drill::{run_with_api, ApiDrill, DrillSpec, FaultMode, GuardTarget};
    let rig = drill_rig().await;
    let east = rig.cluster("east").unwrap();
    let api = east.gateway.drills_addr().unwrap();
    let operator = client_as(&rig, "spiffe://east.demo/ns/ops/sa/drill", api);
    let spec = DrillSpec {
        service: "echo.demo".into(),
        from: "east".into(),
        fail: "west".into(),
        mode: FaultMode::Blackhole,
        duration: Duration::from_secs(8),
        rate: 50,
        request_bytes: 64,
        timeout: Duration::from_secs(1),
        slo: Duration::from_millis(250),
        http: false,
    };
    let faults = [FaultSpec {
        kind: FaultKind::Blackhole,
        peer: Some("west".parse().unwrap()),
        ttl: Duration::from_secs(30),
    }];
    // hello.demo is healthy; "payments" is a listener that closes every
    // connection at once: it fails from the start, and halts the drill as
    // soon as the fault is on.
    let broken = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let broken_addr = broken.local_addr().unwrap();
    let resets = tokio::spawn(async move {
        while let Ok((s, _)) = broken.accept().await {
            drop(s);
        }
    });
    let guards = [
        GuardTarget {
            name: "hello".into(),
            addr: east.client_addr("hello.demo").unwrap(),
            rate: 20,
        },
        GuardTarget {
            name: "payments".into(),
            addr: broken_addr,
            rate: 20,
        },
    ];
    let drill = DrillId::new("halting").unwrap();
    let load = east.client_addr("echo.demo").unwrap();
    let api = ApiDrill {
        clients: std::slice::from_ref(&operator),
        drill: &drill,
        faults: &faults,
        guards: &guards,
        halt: HALT,
    };
    let report = run_with_api(load, &spec, &api, |_| {}).await.unwrap();
    resets.abort();
    let halted = report.halted.clone().expect("halted");
    assert_eq!(halted.guard, "payments", "{halted:?}");
    assert!(
        halted.error_rate > 0.05 && halted.requests >= 10,
        "{halted:?}"
    );
    // Removed at once: within a few ticks of the fault, not at 60 %.
    assert!(
        report.restore_at_ms < report.break_at_ms + 1000,
        "fault from {} to {} ms",
        report.break_at_ms,
        report.restore_at_ms
    );
    assert!(fedmesh_testkit::drill::render(&report).contains("HALTED"));
    assert!(operator.status().await.unwrap()["drill"].is_null());
}

/// `drop-udp`: QUIC to west dies at east's gateway, the TCP fallback
/// carries east's streams to west (no failover: west still serves), and
/// QUIC comes back after the fault ends by itself.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropping_udp_moves_a_peer_to_the_tcp_fallback() {
    let rig = Rig::start(&Topology {
        drill_operators: vec![OPERATORS.into()],
        tcp_fallback: true,
        ..Topology::demo()
    })
    .await
    .unwrap();
    let east = rig.cluster("east").unwrap();
    let api = east.gateway.drills_addr().unwrap();
    let operator = client_as(&rig, "spiffe://east.demo/ns/ops/sa/drill", api);
    let transport = |peer: &str| {
        east.gateway
            .peer_status()
            .into_iter()
            .find(|p| p.cluster == peer)
            .map(|p| p.transport)
            .unwrap_or("none")
    };
    // Traffic first, so east holds a connection to west.
    served_by(&rig, 20).await;
    assert_eq!(transport("west"), "quic");
    let faults = [FaultSpec {
        kind: FaultKind::DropUdp,
        peer: Some("west".parse().unwrap()),
        ttl: Duration::from_secs(6),
    }];
    operator
        .set(&DrillId::new("udp").unwrap(), &faults)
        .await
        .unwrap();
    // Requests keep going; the link notices the silence and moves to TCP.
    let t = Instant::now();
    while transport("west") != "tcp" {
        served_by(&rig, 4).await;
        assert!(
            t.elapsed() < Duration::from_secs(5),
            "west never moved to TCP: {}",
            transport("west")
        );
    }
    let (failed, during) = served_by(&rig, 12).await;
    assert!(
        during.get("west").is_some_and(|n| *n > 0),
        "west serves over TCP: {during:?} ({failed} failed)"
    );
    // After the fault ends by itself, QUIC is retried and comes back.
    let t = Instant::now();
    while transport("west") != "quic" {
        served_by(&rig, 4).await;
        assert!(
            t.elapsed() < Duration::from_secs(40),
            "QUIC never came back: {}",
            transport("west")
        );
    }
}

/// `delay`: every datagram east's gateway sends to west leaves 150 ms
/// later, so a request west serves takes at least that much longer; north
/// is untouched.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delay_fault_slows_only_the_delayed_peer() {
    let rig = drill_rig().await;
    let east = rig.cluster("east").unwrap();
    let api = east.gateway.drills_addr().unwrap();
    let operator = client_as(&rig, "spiffe://east.demo/ns/ops/sa/drill", api);
    let addr = east.client_addr("echo.demo").unwrap();
    let spec = LoadSpec {
        connections: 16,
        requests_per_connection: 1,
        request_bytes: 64,
        timeout: Duration::from_secs(3),
        concurrency: 4,
    };
    // Warm: both peers connected and serving.
    run_load(addr, &spec).await;
    let faults = [FaultSpec {
        kind: FaultKind::Delay {
            delay: Duration::from_millis(150),
        },
        peer: Some("west".parse().unwrap()),
        ttl: Duration::from_secs(20),
    }];
    operator
        .set(&DrillId::new("slow-west").unwrap(), &faults)
        .await
        .unwrap();
    let r = run_load(addr, &spec).await;
    operator
        .clear(&DrillId::new("slow-west").unwrap())
        .await
        .unwrap();
    assert_eq!(r.failed, 0, "{:?}", r.errors);
    // Latencies by who served: the run's samples are not kept per
    // request, so compare the slowest success with the fastest.
    let mut lat = r.latencies.clone();
    lat.sort();
    let served_west = r.served_by.iter().any(|(k, _)| k.starts_with("west/"));
    let served_north = r.served_by.iter().any(|(k, _)| k.starts_with("north/"));
    assert!(served_west, "west took none of it: {:?}", r.served_by);
    if served_north {
        // North answers at loopback speed, west after the delay.
        assert!(lat[0] < Duration::from_millis(100), "{lat:?}");
    }
    assert!(
        *lat.last().unwrap() >= Duration::from_millis(150),
        "no request waited for the delay: {lat:?}"
    );
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, &rig.registry).unwrap();
    let delayed: f64 = text
        .lines()
        .filter(|l| {
            l.starts_with("fedmesh_gateway_drill_datagrams_delayed_total")
                && l.contains("cluster=\"east\"")
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum();
    assert!(delayed > 0.0, "nothing was delayed");
}
