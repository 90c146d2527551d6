//! The `clusterset.local` DNS server on real sockets: answers over UDP and
//! TCP, malformed packets dropped and counted, a flood answered at the
//! configured rate and the rest refused or dropped, counted.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use fedmesh_catalog::mcs::{ExportedMeta, Import, Port, Protocol, ServiceType};
use fedmesh_catalog::ClusterName;
use fedmesh_federation::dns::server::{spawn, DnsConfig, DnsMetrics};
use fedmesh_federation::dns::Zone;
use fedmesh_wire::ServiceName;
use hickory_proto::op::{Message, Query, ResponseCode};
use hickory_proto::rr::{Name, RData, RecordType};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UdpSocket};
use tokio::sync::watch;

fn zone() -> Zone {
    let echo = ServiceName::new("echo", "demo").unwrap();
    let west = ClusterName::new("west").unwrap();
    let imports: BTreeMap<_, _> = [(
        echo.clone(),
        Import {
            service: echo.clone(),
            service_type: ServiceType::ClusterSetIP,
            ports: vec![Port::named("http", 7000, Protocol::Tcp)],
            meta: ExportedMeta::default(),
            exporters: vec![west.clone()],
            clusters: vec![west],
            conflicts: Vec::new(),
            endpoints: Default::default(),
        },
    )]
    .into_iter()
    .collect();
    let ips: BTreeMap<_, _> = [(echo, vec!["241.0.0.8".parse().unwrap()])]
        .into_iter()
        .collect();
    Zone::build(&imports, &ips, Duration::from_secs(5), 1)
}

fn query(id: u16, name: &str) -> Vec<u8> {
    let mut m = Message::new();
    m.set_id(id)
        .add_query(Query::query(Name::from_ascii(name).unwrap(), RecordType::A));
    m.to_vec().unwrap()
}

async fn udp_ask(to: SocketAddr, bytes: &[u8]) -> Option<Message> {
    let sock = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    sock.send_to(bytes, to).await.unwrap();
    let mut buf = vec![0u8; 4096];
    let n = tokio::time::timeout(Duration::from_secs(5), sock.recv(&mut buf))
        .await
        .ok()?
        .ok()?;
    Some(Message::from_vec(&buf[..n]).unwrap())
}

async fn tcp_ask(conn: &mut TcpStream, bytes: &[u8]) -> Message {
    let len = u16::try_from(bytes.len()).unwrap();
    conn.write_all(&len.to_be_bytes()).await.unwrap();
    conn.write_all(bytes).await.unwrap();
    let n = conn.read_u16().await.unwrap();
    let mut buf = vec![0u8; usize::from(n)];
    conn.read_exact(&mut buf).await.unwrap();
    Message::from_vec(&buf).unwrap()
}

fn a(m: &Message) -> Vec<String> {
    m.answers()
        .iter()
        .filter_map(|r| match r.data() {
            RData::A(a) => Some(a.0.to_string()),
            _ => None,
        })
        .collect()
}

#[tokio::test]
async fn answers_over_udp_and_tcp_and_drops_what_is_not_dns() {
    let (_tx, rx) = watch::channel(Arc::new(zone()));
    let metrics = DnsMetrics::default();
    let server = spawn(
        &DnsConfig::new("127.0.0.1:0".parse().unwrap()),
        rx,
        metrics.clone(),
    )
    .await
    .unwrap();
    let addr = server.udp_addr();
    assert_eq!(server.tcp_addr().port(), addr.port());

    let r = udp_ask(addr, &query(1, "echo.demo.svc.clusterset.local."))
        .await
        .unwrap();
    assert_eq!((r.id(), a(&r)), (1, vec!["241.0.0.8".to_owned()]));
    let r = udp_ask(addr, &query(2, "nope.demo.svc.clusterset.local."))
        .await
        .unwrap();
    assert_eq!(r.response_code(), ResponseCode::NXDomain);

    // Garbage, a header cut short, a response: no answer, counted. Each
    // is followed on the same socket by a good query, whose answer must be
    // the next datagram to arrive.
    let mut resp = Message::from_vec(&query(4, "echo.demo.svc.clusterset.local.")).unwrap();
    resp.set_message_type(hickory_proto::op::MessageType::Response);
    let sock = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    for (i, junk) in [
        b"\x00".to_vec(),
        b"GET / HTTP/1.1\r\n\r\n".to_vec(),
        query(3, "echo.demo.svc.clusterset.local.")[..14].to_vec(),
        resp.to_vec().unwrap(),
    ]
    .into_iter()
    .enumerate()
    {
        let id = 100 + u16::try_from(i).unwrap();
        sock.send_to(&junk, addr).await.unwrap();
        sock.send_to(&query(id, "echo.demo.svc.clusterset.local."), addr)
            .await
            .unwrap();
        let mut buf = vec![0u8; 4096];
        let n = tokio::time::timeout(Duration::from_secs(5), sock.recv(&mut buf))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(
            Message::from_vec(&buf[..n]).unwrap().id(),
            id,
            "junk #{i} was answered"
        );
    }
    assert_eq!(metrics.malformed("udp"), 4);

    // TCP: several queries on one connection, then junk closes it.
    let mut conn = TcpStream::connect(server.tcp_addr()).await.unwrap();
    for id in 10..13 {
        let r = tcp_ask(&mut conn, &query(id, "echo.demo.svc.clusterset.local.")).await;
        assert_eq!((r.id(), a(&r)), (id, vec!["241.0.0.8".to_owned()]));
    }
    conn.write_all(&[0, 3, 1, 2, 3]).await.unwrap();
    let mut rest = Vec::new();
    let n = tokio::time::timeout(Duration::from_secs(2), conn.read_to_end(&mut rest))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(n, 0, "closed without an answer");
    assert_eq!(metrics.malformed("tcp"), 1);
    // The server still answers.
    let r = udp_ask(addr, &query(5, "echo.demo.svc.clusterset.local."))
        .await
        .unwrap();
    assert_eq!(a(&r), ["241.0.0.8"]);
    assert_eq!(metrics.responses("noerror"), 9);
    assert_eq!(metrics.responses("nxdomain"), 1);
}

#[tokio::test]
async fn a_flood_is_answered_at_the_rate_and_the_rest_refused_or_dropped() {
    let (_tx, rx) = watch::channel(Arc::new(zone()));
    let metrics = DnsMetrics::default();
    let cfg = DnsConfig {
        max_queries_per_second: 50,
        ..DnsConfig::new("127.0.0.1:0".parse().unwrap())
    };
    let server = spawn(&cfg, rx, metrics.clone()).await.unwrap();
    let sock = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let q = query(7, "echo.demo.svc.clusterset.local.");
    let sent = 1000u64;
    // In bursts the socket buffers hold (a kernel drop would be nobody's
    // count): 1,000 queries within about 50 ms.
    for i in 0..sent {
        sock.send_to(&q, server.udp_addr()).await.unwrap();
        if i % 50 == 49 {
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }
    let mut buf = vec![0u8; 4096];
    let (mut ok, mut refused) = (0u64, 0u64);
    while let Ok(Ok(n)) =
        tokio::time::timeout(Duration::from_millis(300), sock.recv(&mut buf)).await
    {
        match Message::from_vec(&buf[..n]).unwrap().response_code() {
            ResponseCode::NoError => ok += 1,
            ResponseCode::Refused => refused += 1,
            other => panic!("{other:?}"),
        }
    }
    // The burst is one second's worth; the sends take well under a
    // second more, which may add a few.
    assert!((50..=75).contains(&ok), "answered {ok}");
    assert!((50..=75).contains(&refused), "refused {refused}");
    let dropped = metrics.limited("dropped");
    // A datagram may be lost on loopback under the flood; none is answered
    // twice, and what was not answered or refused was counted dropped.
    assert!(ok + refused + dropped <= sent, "{ok} {refused} {dropped}");
    assert!(
        ok + refused + dropped >= sent - 20,
        "{ok} {refused} {dropped}"
    );
    assert_eq!(metrics.limited("refused"), refused);
}

/// The stub resolver the demo and the e2e probes use: addresses, the
/// server's error code, and a server that never answers, each as such.
#[tokio::test]
async fn the_stub_resolver_reports_answers_errors_and_silence() {
    use fedmesh_federation::dns::client::{lookup, LookupError, RecordType};
    let (_tx, rx) = watch::channel(Arc::new(zone()));
    let server = spawn(
        &DnsConfig::new("127.0.0.1:0".parse().unwrap()),
        rx,
        DnsMetrics::default(),
    )
    .await
    .unwrap();
    let addr = server.udp_addr();
    let short = Duration::from_millis(300);
    let ips = lookup(
        addr,
        "echo.demo.svc.clusterset.local",
        RecordType::A,
        short,
        2,
    )
    .await
    .unwrap();
    assert_eq!(ips, ["241.0.0.8".parse::<std::net::IpAddr>().unwrap()]);
    // NODATA: no address, no error.
    let none = lookup(
        addr,
        "echo.demo.svc.clusterset.local",
        RecordType::AAAA,
        short,
        2,
    )
    .await
    .unwrap();
    assert!(none.is_empty());
    let e = lookup(
        addr,
        "nope.demo.svc.clusterset.local",
        RecordType::A,
        short,
        2,
    )
    .await
    .unwrap_err();
    assert!(
        matches!(
            e,
            LookupError::Rcode {
                rcode: ResponseCode::NXDomain,
                ..
            }
        ),
        "{e}"
    );
    // A bound socket nobody reads: two tries, then NoAnswer.
    let silent = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let e = lookup(
        silent.local_addr().unwrap(),
        "echo.demo.svc.clusterset.local",
        RecordType::A,
        short,
        2,
    )
    .await
    .unwrap_err();
    assert!(matches!(e, LookupError::NoAnswer { tries: 2, .. }), "{e}");
    assert!(matches!(
        lookup(addr, "bad name..x", RecordType::A, short, 1).await,
        Err(LookupError::BadName(_))
    ));
}
