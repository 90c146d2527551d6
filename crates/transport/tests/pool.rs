//! The pooled legs against a real HTTP/2 tunnel server over mTLS: streams
//! share one connection; a connection that dies fails only its own
//! streams, as resets, and the next stream gets a fresh connection.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use fedmesh_transport::{answer, read_request, LegPool, Limits, TunnelIo};
use fedmesh_trust::{
    CertificateAuthority, ClientAuth, PeerPolicy, SharedBundles, SpiffeId, SvidSource,
    TrustBundles, TrustDomain,
};
use fedmesh_wire::{Header, Status, Target};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpListener;

const DAY: Duration = Duration::from_secs(86_400);

struct Server {
    addr: SocketAddr,
    identity: SpiffeId,
    /// Every accepted connection's task: aborting one kills it.
    conns: Arc<std::sync::Mutex<Vec<tokio::task::AbortHandle>>>,
    /// While set, the next stream to arrive kills its whole connection
    /// before reading the header (and clears it).
    kill_next: Arc<std::sync::atomic::AtomicBool>,
    /// While set, the server is of the version before pooling: ALPN
    /// `fedmesh/1` only, one stream per connection.
    old: Arc<std::sync::atomic::AtomicBool>,
    /// Connections accepted.
    accepted: Arc<std::sync::atomic::AtomicUsize>,
    /// While set, the next connection is accepted and held without a TLS
    /// handshake (and it clears); `held` is told.
    hold_next: Arc<std::sync::atomic::AtomicBool>,
    held: Arc<tokio::sync::Notify>,
}

/// Answers `ok` to a tunnel stream's header, then echoes it.
async fn echo_stream<S: AsyncRead + AsyncWrite + Unpin>(mut io: S) {
    let limits = Limits::default();
    if read_request(&mut io, &limits).await.is_err() {
        return;
    }
    answer(&mut io, &Status::ok()).await;
    let mut buf = [0u8; 1024];
    while let Ok(n) = io.read(&mut buf).await {
        if n == 0 || io.write_all(&buf[..n]).await.is_err() {
            break;
        }
    }
    let _ = io.shutdown().await;
}

/// An h2 tunnel server that answers `ok` and echoes every stream.
async fn server(ca: &CertificateAuthority, bundles: SharedBundles) -> Server {
    let identity = ca.trust_domain().workload("demo", "app").unwrap();
    let source = SvidSource::new(ca.issue(&identity, DAY).unwrap()).unwrap();
    let acceptor = |alpn: &[&[u8]]| {
        let tls = fedmesh_trust::server_config_from(
            &source,
            bundles.clone(),
            PeerPolicy::AnyTrusted,
            alpn,
            ClientAuth::Required,
        )
        .unwrap();
        tokio_rustls::TlsAcceptor::from(Arc::new(tls))
    };
    let current = acceptor(&[fedmesh_wire::ALPN_H2, fedmesh_wire::ALPN]);
    let before_pooling = acceptor(&[fedmesh_wire::ALPN]);
    let old = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let accepted = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let (is_old, count) = (old.clone(), accepted.clone());
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let conns: Arc<std::sync::Mutex<Vec<tokio::task::AbortHandle>>> = Arc::default();
    let kill_next = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let hold_next = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let held = Arc::new(tokio::sync::Notify::new());
    let (hold, told) = (hold_next.clone(), held.clone());
    let mut kept_tcp = Vec::new();
    let kept = conns.clone();
    let kill = kill_next.clone();
    tokio::spawn(async move {
        loop {
            let (tcp, _) = l.accept().await.unwrap();
            count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            if hold.swap(false, std::sync::atomic::Ordering::SeqCst) {
                kept_tcp.push(tcp);
                told.notify_one();
                continue;
            }
            if is_old.load(std::sync::atomic::Ordering::SeqCst) {
                let acceptor = before_pooling.clone();
                tokio::spawn(async move {
                    if let Ok(tls) = acceptor.accept(tcp).await {
                        assert_eq!(tls.get_ref().1.alpn_protocol(), Some(fedmesh_wire::ALPN));
                        echo_stream(tls).await;
                    }
                });
                continue;
            }
            let acceptor = current.clone();
            let (kill, all) = (kill.clone(), kept.clone());
            let task = tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let limits = Limits::default();
                let _ = fedmesh_transport::serve_h2(
                    tls,
                    &limits,
                    fedmesh_transport::H2Windows::pooled(&limits),
                    move |io| {
                        let (kill, all) = (kill.clone(), all.clone());
                        async move {
                            if kill.swap(false, std::sync::atomic::Ordering::SeqCst) {
                                for c in all.lock().unwrap().iter() {
                                    c.abort();
                                }
                                return;
                            }
                            echo_stream(io).await;
                        }
                    },
                )
                .await;
            });
            kept.lock().unwrap().push(task.abort_handle());
        }
    });
    Server {
        addr,
        identity,
        conns,
        kill_next,
        hold_next,
        held,
        old,
        accepted,
    }
}

fn header() -> Header {
    Header::new(Target::Service {
        name: fedmesh_wire::ServiceName::parse("app.demo").unwrap(),
        port: 80,
    })
}

async fn echo(s: &mut Box<dyn TunnelIo>, msg: &[u8]) {
    s.write_all(msg).await.unwrap();
    let mut got = vec![0u8; msg.len()];
    tokio::time::timeout(Duration::from_secs(5), s.read_exact(&mut got))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(got, msg);
}

/// A server and a pool of one trust domain.
async fn setup() -> (Server, LegPool, TrustDomain) {
    setup_with(Limits::default()).await
}

async fn setup_with(limits: Limits) -> (Server, LegPool, TrustDomain) {
    let td = TrustDomain::new("pool.test").unwrap();
    let ca = CertificateAuthority::new_root(td.clone(), DAY * 30).unwrap();
    let bundles = SharedBundles::new(TrustBundles::new().with(ca.bundle()));
    let srv = server(&ca, bundles.clone()).await;
    let me = SvidSource::new(ca.issue(&td.workload("demo", "web").unwrap(), DAY).unwrap()).unwrap();
    let pool = LegPool::new(&me, bundles, limits).unwrap();
    (srv, pool, td)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_pooled_connection_fails_only_its_streams_and_is_replaced() {
    let (srv, pool, _) = setup().await;

    let mut a = pool.open(srv.addr, &srv.identity, &header()).await.unwrap();
    let mut b = pool.open(srv.addr, &srv.identity, &header()).await.unwrap();
    echo(&mut a, b"one").await;
    echo(&mut b, b"two").await;
    assert_eq!(pool.counts.dials.get(), 1);
    assert_eq!(pool.counts.streams.get(), 2);

    // The connection dies under both streams: each fails, as a reset.
    for c in srv.conns.lock().unwrap().iter() {
        c.abort();
    }
    for s in [&mut a, &mut b] {
        let mut buf = [0u8; 8];
        let r = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf))
            .await
            .expect("the dead connection was never noticed");
        match r {
            Err(e) => assert_eq!(e.kind(), std::io::ErrorKind::ConnectionReset, "{e}"),
            Ok(n) => panic!("a stream of a dead connection read {n} bytes and a clean end"),
        }
    }

    // The next stream gets a fresh connection.
    let mut c = match pool.open(srv.addr, &srv.identity, &header()).await {
        Ok(c) => c,
        Err(e) => panic!("{e} after {} dials", pool.counts.dials.get()),
    };
    echo(&mut c, b"three").await;
    assert_eq!(pool.counts.dials.get(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_next_hop_with_another_identity_is_refused() {
    let (srv, pool, td) = setup().await;
    let other = td.workload("demo", "not-the-app").unwrap();
    let r = pool.open(srv.addr, &other, &header()).await;
    let e = r.err().expect("a wrong identity must not get a stream");
    assert!(e.message.contains("presented"), "{e}");
}

/// A stream opens without waiting for the peer's `CONNECT` answer, so a
/// connection that died unnoticed fails at the header's status instead:
/// that too retires the connection and the stream is retried on a fresh
/// one, invisibly to the caller.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_lost_under_a_new_streams_header_is_replaced_and_retried() {
    let (srv, pool, _) = setup().await;
    let mut a = pool.open(srv.addr, &srv.identity, &header()).await.unwrap();
    echo(&mut a, b"one").await;
    drop(a);

    srv.kill_next
        .store(true, std::sync::atomic::Ordering::SeqCst);
    let mut b = match pool.open(srv.addr, &srv.identity, &header()).await {
        Ok(b) => b,
        Err(e) => panic!("{e} after {} dials", pool.counts.dials.get()),
    };
    echo(&mut b, b"two").await;
    assert!(
        !srv.kill_next.load(std::sync::atomic::Ordering::SeqCst),
        "the first try never reached the server"
    );
    assert_eq!(pool.counts.dials.get(), 2);
    assert_eq!(
        pool.counts.streams.get(),
        3,
        "two tries and the first stream"
    );
}

/// A next hop of the version before pooling speaks only `fedmesh/1`: each
/// stream gets a connection of its own, as before, and once the hop is
/// upgraded the next stream is pooled again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_next_hop_that_does_not_pool_gets_a_connection_per_stream() {
    use std::sync::atomic::Ordering::SeqCst;
    let (srv, pool, _) = setup().await;
    srv.old.store(true, SeqCst);
    let mut a = pool.open(srv.addr, &srv.identity, &header()).await.unwrap();
    let mut b = pool.open(srv.addr, &srv.identity, &header()).await.unwrap();
    echo(&mut a, b"one").await;
    echo(&mut b, b"two").await;
    assert_eq!(srv.accepted.load(SeqCst), 2);
    assert_eq!(pool.counts.unpooled.get(), 2);
    assert_eq!(pool.counts.dials.get(), 0, "no pooled connection");
    // More than the pool's bound at once: not held to it (nothing is
    // pooled), every stream gets through.
    let mut many = Vec::new();
    for _ in 0..Limits::default().pool_connections + 2 {
        many.push(pool.open(srv.addr, &srv.identity, &header()).await.unwrap());
    }
    for s in &mut many {
        echo(s, b"many").await;
    }
    drop(many);

    // The hop is upgraded: the next stream dials a pooled connection and
    // the one after shares it.
    srv.old.store(false, SeqCst);
    let before = srv.accepted.load(SeqCst);
    let mut c = pool.open(srv.addr, &srv.identity, &header()).await.unwrap();
    let mut d = pool.open(srv.addr, &srv.identity, &header()).await.unwrap();
    echo(&mut c, b"three").await;
    echo(&mut d, b"four").await;
    assert_eq!(srv.accepted.load(SeqCst), before + 1);
    assert_eq!(pool.counts.dials.get(), 1);
}

/// A storm of new streams to a hop with no connection yet dials only as
/// many connections as the bound allows; the rest wait for those dials.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_storm_of_first_streams_dials_no_more_than_the_bound() {
    use std::sync::atomic::Ordering::SeqCst;
    let (srv, pool, _) = setup().await;
    let pool = Arc::new(pool);
    let n = 4 * Limits::default().pool_connections;
    let mut tasks = Vec::new();
    for _ in 0..n {
        let (pool, addr, id) = (pool.clone(), srv.addr, srv.identity.clone());
        tasks.push(tokio::spawn(async move {
            let mut s = pool.open(addr, &id, &header()).await.unwrap();
            echo(&mut s, b"storm").await;
            s
        }));
    }
    let mut open = Vec::new();
    for t in tasks {
        open.push(t.await.unwrap());
    }
    assert_eq!(open.len(), n);
    let dials = pool.counts.dials.get();
    assert!(
        (1..=Limits::default().pool_connections as u64).contains(&dials),
        "{dials} dials for a bound of {}",
        Limits::default().pool_connections
    );
    assert_eq!(srv.accepted.load(SeqCst) as u64, dials);
}

/// A caller that gives up while its stream's connection is being dialed
/// (its own deadline, its app gone) must not leave that dial counted: with
/// a bound of one, every later stream would wait for a dial that never
/// ends, then be refused `overloaded`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dial_given_up_midway_frees_its_place_in_the_bound() {
    use std::sync::atomic::Ordering::SeqCst;
    let (srv, pool, _) = setup_with(Limits {
        pool_connections: 1,
        status_timeout: Duration::from_secs(2),
        ..Limits::default()
    })
    .await;
    srv.hold_next.store(true, SeqCst);
    let h = header();
    tokio::select! {
        r = pool.open(srv.addr, &srv.identity, &h) => {
            panic!("the held dial finished: {:?}", r.err());
        }
        () = srv.held.notified() => {}
    }
    let mut s = match pool.open(srv.addr, &srv.identity, &header()).await {
        Ok(s) => s,
        Err(e) => panic!("{e} after a dial was given up"),
    };
    echo(&mut s, b"after").await;
    assert_eq!(pool.counts.dials.get(), 1);
}
