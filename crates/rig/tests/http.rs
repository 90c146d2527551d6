//! The sidecar's L7 path through the whole mesh: HTTP/1.1 and HTTP/2 are
//! detected on an outbound listener, routed per request (header canary,
//! cluster restriction), timed out, retried only when safe, denied with a
//! 403, and counted by response class; other bytes on the same kind of
//! listener stay L4.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::time::Duration;

use bytes::Bytes;
use fedmesh_rig::{AppKind, ClusterTopo, HttpConn, Rig, ServiceTopo, Topology};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn svc(name: &str, app: AppKind) -> ServiceTopo {
    ServiceTopo {
        name: name.into(),
        port: 8080,
        replicas: 1,
        export: true,
        audience: None,
        app,
    }
}

/// `east` calls; `west` and `north` serve `web.demo` (HTTP),
/// `api.demo` (HTTP, admits only another namespace) and `sink.demo`
/// (a client-first TCP protocol).
fn topology() -> Topology {
    let serving = |name: &str| ClusterTopo {
        name: name.into(),
        services: vec![
            svc("web.demo", AppKind::Http),
            svc("api.demo", AppKind::Http),
            svc("sink.demo", AppKind::Sink),
        ],
    };
    let mut t = Topology::demo();
    t.clusters = vec![
        ClusterTopo {
            name: "east".into(),
            services: vec![],
        },
        serving("west"),
        serving("north"),
    ];
    t.policies = serde_yaml_ng::from_str::<BTreeMap<_, _>>(
        r#"
web.demo:
  failover: [west, north]
  request_timeout: 300ms
  retry: { attempts: 2 }
  http:
    routes:
      - name: canary
        match: { headers: { x-canary: "1" } }
        to: { clusters: [north] }
      - match: { path_prefix: /any }
        to: {}
        retry_any_method: true
api.demo:
  authz: { allow: ["spiffe://east.demo/ns/other/*"] }
"#,
    )
    .unwrap();
    t
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_is_routed_retried_timed_out_and_denied_per_request() {
    let rig = Rig::start(&topology()).await.unwrap();
    let east = rig.cluster("east").unwrap();
    let web = east.client_addr("web.demo").unwrap();
    let m = east.client.metrics();

    for h2 in [false, true] {
        let mut c = HttpConn::connect(web, h2).await.unwrap();
        // Priority order: west serves; many requests on one app connection.
        for _ in 0..20 {
            let r = c.get("/", &[]).await.unwrap();
            assert_eq!(
                (r.status, r.served_by.as_str()),
                (200, "west/web-0"),
                "h2={h2}"
            );
        }
        // Header canary: only north.
        let r = c.get("/", &[("x-canary", "1")]).await.unwrap();
        assert_eq!(r.served_by, "north/web-0");
        // Bodies travel both ways.
        let body = Bytes::from(vec![7u8; 1024]);
        let r = c.request("PUT", "/echo", &[], body.clone()).await.unwrap();
        assert_eq!(r.body, body);
        // An idempotent request that west answers with 503 is retried on
        // north; a POST is not, unless its route says so.
        let r = c.get("/fail-if/west", &[]).await.unwrap();
        assert_eq!((r.status, r.served_by.as_str()), (200, "north/web-0"));
        let r = c
            .request("POST", "/fail-if/west", &[], Bytes::from_static(b"x"))
            .await
            .unwrap();
        assert_eq!((r.status, r.served_by.as_str()), (503, "west/web-0"));
        let r = c
            .request("POST", "/any/fail-if/west", &[], Bytes::from_static(b"x"))
            .await
            .unwrap();
        assert_eq!((r.status, r.served_by.as_str()), (200, "north/web-0"));
        // The service's request timeout answers 504, and the connection
        // still serves the next request.
        let t0 = std::time::Instant::now();
        let r = c.get("/slow/2000", &[]).await.unwrap();
        assert_eq!(r.status, 504);
        assert!(
            t0.elapsed() < Duration::from_millis(1500),
            "{:?}",
            t0.elapsed()
        );
        assert_eq!(c.get("/", &[]).await.unwrap().status, 200);
    }
    // Requests were counted by class and cluster; the app connections were
    // reused upstream rather than one tunnel per request (2 × 26 requests).
    assert_eq!(m.http_count("web.demo", "west", "2xx"), 2 * 22);
    assert_eq!(m.http_count("web.demo", "north", "2xx"), 2 * 3);
    assert_eq!(m.http_count("web.demo", "west", "5xx"), 2);
    assert_eq!(m.http_count("web.demo", "", "5xx"), 2, "the two 504s");
    assert_eq!(m.service(&m.http_retries, "web.demo"), 4);
    let west = rig.cluster("west").unwrap();
    let tunnels: u64 = west
        .sidecars
        .iter()
        .filter(|(s, _)| s.to_string() == "web.demo")
        .flat_map(|(_, sc)| sc.metrics().seen())
        .map(|s| s.connections)
        .sum();
    assert!(
        (1..=6).contains(&tunnels),
        "west's web sidecar took {tunnels} tunnels for 46 requests"
    );

    // A caller outside api.demo's allow list gets a 403 from the
    // destination's decision, not retried elsewhere; across clusters it
    // says only "denied" (the reason stays in the serving cluster's log
    // and metrics, as Istio's "RBAC: access denied" does).
    let mut c = HttpConn::connect(east.client_addr("api.demo").unwrap(), false)
        .await
        .unwrap();
    let r = c.get("/", &[]).await.unwrap();
    assert_eq!(r.status, 403, "{:?}", r.body);
    let body = String::from_utf8_lossy(&r.body);
    assert!(body.contains("denied"), "{body:?}");
    assert!(
        !body.contains("may not call"),
        "a peer learned the reason: {body:?}"
    );
    assert_eq!(m.http_count("api.demo", "", "4xx"), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bytes_that_are_not_http_stay_l4_and_nothing_is_lost() {
    let rig = Rig::start(&topology()).await.unwrap();
    let east = rig.cluster("east").unwrap();
    let addr = east.client_addr("sink.demo").unwrap();
    // Starts like an HTTP method, then is not one; sent in pieces.
    let mut payload = b"GET-NOT-HTTP\x00".to_vec();
    payload.extend((0..100_000u32).map(|i| i as u8));
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    for chunk in payload.chunks(3000) {
        s.write_all(chunk).await.unwrap();
    }
    s.shutdown().await.unwrap();
    let mut back = [0u8; 8];
    tokio::time::timeout(Duration::from_secs(10), s.read_exact(&mut back))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(u64::from_be_bytes(back), payload.len() as u64);
    let m = east.client.metrics();
    let opaque = m
        .protocols
        .get_or_create(&fedmesh_sidecar::metrics::ProtocolLabels { protocol: "opaque" })
        .get();
    assert_eq!(opaque, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http1_upgrade_becomes_a_byte_stream_across_clusters() {
    let rig = Rig::start(&topology()).await.unwrap();
    let east = rig.cluster("east").unwrap();
    let mut s = tokio::net::TcpStream::connect(east.client_addr("web.demo").unwrap())
        .await
        .unwrap();
    s.write_all(
        b"GET /upgrade HTTP/1.1\r\nHost: web\r\nConnection: upgrade\r\nUpgrade: echo\r\n\r\n",
    )
    .await
    .unwrap();
    let mut head = Vec::new();
    let mut b = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") && head.len() < 4096 {
        tokio::time::timeout(Duration::from_secs(5), s.read_exact(&mut b))
            .await
            .unwrap()
            .unwrap();
        head.push(b[0]);
    }
    let head = String::from_utf8_lossy(&head).to_lowercase();
    assert!(head.starts_with("http/1.1 101"), "{head}");
    assert!(head.contains("upgrade: echo"), "{head}");
    for msg in [&b"ping"[..], &[0u8, 1, 2, 255][..]] {
        s.write_all(msg).await.unwrap();
        let mut back = vec![0u8; msg.len()];
        tokio::time::timeout(Duration::from_secs(5), s.read_exact(&mut back))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(back, msg);
    }
}
