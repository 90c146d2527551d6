//! Helpers for tests against testkit's `Ends` app (how connections end):
//! a two-cluster topology serving `ends.demo` from west, and a client that
//! holds, closes, cuts and asks.
#![allow(clippy::unwrap_used, clippy::expect_used, dead_code)]

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use fedmesh_testkit::{AppKind, ClusterTopo, ServiceTopo, Topology};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

pub const LIMIT: Duration = Duration::from_secs(10);

/// east (callers only) and west (serving and exporting `ends.demo`).
pub fn ends_topology(limits: fedmesh_transport::Limits) -> Topology {
    Topology {
        clusters: vec![
            ClusterTopo {
                name: "east".into(),
                services: vec![],
            },
            ClusterTopo {
                name: "west".into(),
                services: vec![ServiceTopo {
                    name: "ends.demo".into(),
                    port: 7000,
                    replicas: 1,
                    export: true,
                    audience: None,
                    app: AppKind::Ends,
                }],
            },
        ],
        limits,
        ..Topology::demo()
    }
}

pub async fn line(s: &mut BufReader<TcpStream>) -> String {
    let mut l = String::new();
    tokio::time::timeout(LIMIT, s.read_line(&mut l))
        .await
        .expect("no line in time")
        .expect("read a line");
    l.trim_end().to_owned()
}

/// A connection through `addr` holding `id` open, checked end to end.
pub async fn hold(addr: SocketAddr, id: &str) -> BufReader<TcpStream> {
    let mut s = BufReader::new(TcpStream::connect(addr).await.unwrap());
    s.get_mut()
        .write_all(format!("hold {id}\nping\n").as_bytes())
        .await
        .unwrap();
    assert_eq!(line(&mut s).await, "ping", "{id}");
    s
}

/// Ends a held connection cleanly and waits for the far end's close.
pub async fn close(mut s: BufReader<TcpStream>) {
    s.get_mut().shutdown().await.unwrap();
    let mut rest = Vec::new();
    tokio::time::timeout(LIMIT, s.read_to_end(&mut rest))
        .await
        .unwrap()
        .unwrap();
}

/// How the app saw `id` end, once it has (bounded).
pub async fn ended(addr: SocketAddr, id: &str) -> String {
    let t0 = Instant::now();
    loop {
        let mut s = BufReader::new(TcpStream::connect(addr).await.unwrap());
        s.get_mut()
            .write_all(format!("ended {id}\n").as_bytes())
            .await
            .unwrap();
        let how = line(&mut s).await;
        if how != "open" {
            return how;
        }
        assert!(t0.elapsed() < LIMIT, "{id} still open after {LIMIT:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// `s`'s next read must fail with a connection reset, not end cleanly.
pub async fn expect_reset<R: tokio::io::AsyncRead + Unpin>(s: &mut R, what: &str) {
    let mut buf = [0u8; 16];
    match tokio::time::timeout(LIMIT, s.read(&mut buf))
        .await
        .unwrap_or_else(|_| panic!("{what}: never noticed"))
    {
        Err(e) => assert_eq!(e.kind(), std::io::ErrorKind::ConnectionReset, "{what}: {e}"),
        Ok(n) => panic!("{what}: arrived as {n} bytes and a clean end"),
    }
}

/// The app resets its side: the client through `addr` sees a reset.
pub async fn app_cut_reaches_client(addr: SocketAddr, what: &str) {
    let mut s = BufReader::new(TcpStream::connect(addr).await.unwrap());
    s.get_mut().write_all(b"cut\n").await.unwrap();
    assert_eq!(line(&mut s).await, "ok", "{what}");
    s.get_mut().write_all(b"x").await.unwrap();
    expect_reset(&mut s, what).await;
}

/// The client resets `id`: the app sees a reset; a clean close of another
/// stays clean.
pub async fn client_cut_reaches_app(addr: SocketAddr, id: &str) {
    let cut = hold(addr, &format!("{id}-cut")).await;
    cut.get_ref().set_zero_linger().unwrap();
    drop(cut);
    assert_eq!(ended(addr, &format!("{id}-cut")).await, "reset", "{id}");
    close(hold(addr, &format!("{id}-clean")).await).await;
    assert_eq!(ended(addr, &format!("{id}-clean")).await, "fin", "{id}");
}
