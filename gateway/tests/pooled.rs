//! Pooled, multiplexed connections from a sidecar to its gateway and
//! from a gateway to its sidecars: new tunneled connections cost a
//! stream, the pool and its queue are bounded, and a renewed SVID moves
//! new streams to a new connection while the old one drains.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use common::{close, ends_topology as topology, hold, line, LIMIT};
use fedmesh_testkit::Rig;
use tokio::io::{AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn new_connections_to_the_gateway_share_one_pooled_connection() {
    let rig = Rig::start(&topology(Default::default())).await.unwrap();
    let east = rig.cluster("east").unwrap();
    let addr = east.client_addr("ends.demo").unwrap();
    for i in 0..30 {
        close(hold(addr, &format!("seq-{i}")).await).await;
    }
    let mut held = Vec::new();
    for i in 0..8 {
        held.push(hold(addr, &format!("par-{i}")).await);
    }
    let pool = east.client.gateway_pool();
    assert_eq!(
        pool.dials.get(),
        1,
        "one handshake with the gateway for 38 connections"
    );
    assert!(pool.streams.get() >= 38, "{}", pool.streams.get());
    for s in held {
        close(s).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn past_every_stream_slot_a_connection_waits_then_is_refused() {
    let rig = Rig::start(&topology(fedmesh_transport::Limits {
        pool_connections: 1,
        pool_streams_per_connection: 2,
        status_timeout: Duration::from_millis(1500),
        ..Default::default()
    }))
    .await
    .unwrap();
    let east = rig.cluster("east").unwrap();
    let addr = east.client_addr("ends.demo").unwrap();
    let a = hold(addr, "a").await;
    let _b = hold(addr, "b").await;
    // A third waits for a slot rather than dialing past the bound...
    let pool = east.client.gateway_pool();
    let mut c = BufReader::new(TcpStream::connect(addr).await.unwrap());
    c.get_mut().write_all(b"hold c\nping\n").await.unwrap();
    let t0 = std::time::Instant::now();
    while pool.waiting.get() != 1 {
        assert!(t0.elapsed() < LIMIT, "the third stream never waited");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(pool.dials.get(), 1, "the third stream dialed past the cap");
    // ...and takes the slot the first frees.
    close(a).await;
    assert_eq!(line(&mut c).await, "ping");
    // With every slot still taken, a fourth is refused after the wait.
    let mut d = TcpStream::connect(addr).await.unwrap();
    d.write_all(b"hold d\nping\n").await.unwrap();
    let mut buf = [0u8; 16];
    let r = tokio::time::timeout(LIMIT, d.read(&mut buf)).await.unwrap();
    assert!(matches!(r, Ok(0) | Err(_)), "the fourth got {r:?}");
    assert_eq!(pool.dials.get(), 1);
    assert!(pool.overloaded.get() >= 1);
    assert_eq!(pool.waiting.get(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_renewed_svid_moves_new_streams_and_the_old_connection_drains() {
    let rig = Rig::start(&topology(Default::default())).await.unwrap();
    let east = rig.cluster("east").unwrap();
    let addr = east.client_addr("ends.demo").unwrap();
    let mut old = hold(addr, "old").await;
    let pool = east.client.gateway_pool();
    assert_eq!(pool.dials.get(), 1);

    let renewed = east
        .ca
        .issue(east.client.identity(), Duration::from_secs(3600))
        .unwrap();
    east.client.identity_source().store(renewed).unwrap();
    let new = hold(addr, "new").await;
    assert_eq!(
        pool.dials.get(),
        2,
        "new streams go to a connection with the new SVID"
    );

    // The old stream is not failed by the move.
    old.get_mut().write_all(b"again\n").await.unwrap();
    assert_eq!(line(&mut old).await, "again");
    close(old).await;
    // The drained connection closes once its last stream has ended.
    let open = || east.gateway.metrics().sidecar_connections.get();
    let t0 = std::time::Instant::now();
    while open() != 1 {
        assert!(
            t0.elapsed() < LIMIT,
            "{} sidecar connections still open",
            open()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    close(new).await;
    let more = hold(addr, "more").await;
    assert_eq!(pool.dials.get(), 2, "the new connection is the pool's now");
    close(more).await;
}

/// Six streams push up to 128 MiB each and never read their echo, so
/// every window and socket buffer along their path fills (QUIC's 16 MiB
/// per stream each way included: 48 MiB was sometimes all taken in);
/// another stream on the same pooled connections still gets through.
/// With a connection window smaller than its streams' windows together
/// (8 MiB per stream, 32 MiB per connection, as between gateways), four
/// stalled streams would hold back every other.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_whose_readers_stall_do_not_hold_back_the_others() {
    let rig = Rig::start(&topology(Default::default())).await.unwrap();
    let east = rig.cluster("east").unwrap();
    let addr = east.client_addr("ends.demo").unwrap();
    const CHUNK: usize = 64 * 1024;
    const CHUNKS: usize = 2048;
    let mut stuck = Vec::new();
    let mut pushed = Vec::new();
    for i in 0..6 {
        let (r, mut w) = tokio::io::split(hold(addr, &format!("stuck-{i}")).await);
        let n = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        pushed.push(n.clone());
        let push = tokio::spawn(async move {
            let chunk = vec![b'x'; CHUNK];
            for _ in 0..CHUNKS {
                if w.write_all(&chunk).await.is_err() {
                    break;
                }
                n.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            }
            w
        });
        stuck.push((r, push));
    }
    // Wait until every window along the way is full: no pusher has moved
    // for a while (200 ms is ages at loopback speed) and none is done.
    let total = || -> Vec<usize> {
        pushed
            .iter()
            .map(|n| n.load(std::sync::atomic::Ordering::SeqCst))
            .collect()
    };
    let t0 = std::time::Instant::now();
    let mut last = total();
    loop {
        tokio::time::sleep(Duration::from_millis(200)).await;
        let now = total();
        if now == last && now.iter().all(|&n| n > 0) {
            break;
        }
        assert!(
            t0.elapsed() < LIMIT * 2,
            "the pushers never stalled: {now:?}"
        );
        last = now;
    }
    assert!(
        last.iter().all(|&n| n < CHUNKS),
        "a pusher got everything through, so nothing stalled: {last:?}"
    );
    let mut free = hold(addr, "free").await;
    free.get_mut().write_all(b"again\n").await.unwrap();
    assert_eq!(line(&mut free).await, "again");
    assert_eq!(
        east.client.gateway_pool().dials.get(),
        1,
        "all on one pooled connection"
    );
    for (_, push) in stuck {
        push.abort();
    }
}
