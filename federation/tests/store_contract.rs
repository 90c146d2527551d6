//! One contract for every store: the embedded one always, etcd when the
//! `etcd` feature is on (scripts/test.sh builds with it and installs etcd).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use fedmesh_federation::store::{reflect, EmbeddedLimits, EmbeddedStore};
use fedmesh_federation::{Revision, Store, StoreError, WatchEvent};

type Compact = Box<dyn Fn(Revision) -> Pin<Box<dyn Future<Output = ()> + Send>> + Send + Sync>;

async fn next_events(w: &mut fedmesh_federation::store::WatchStream) -> Vec<WatchEvent> {
    tokio::time::timeout(Duration::from_secs(5), w.recv())
        .await
        .expect("watch delivered nothing within 5 s")
        .expect("watch closed")
        .expect("watch error")
}

/// Collects events until `n` have arrived.
async fn collect(w: &mut fedmesh_federation::store::WatchStream, n: usize) -> Vec<WatchEvent> {
    let mut out = Vec::new();
    while out.len() < n {
        out.extend(next_events(w).await);
    }
    out
}

async fn contract(store: Arc<dyn Store>, compact: Compact) {
    let p = "/t/";
    // put, get, list, revisions
    let r1 = store.put("/t/a", b"1".to_vec(), None).await.unwrap();
    let r2 = store.put("/t/b", b"2".to_vec(), None).await.unwrap();
    store
        .put("/u/x", b"other prefix".to_vec(), None)
        .await
        .unwrap();
    assert!(r2 > r1);
    let a = store.get("/t/a").await.unwrap().unwrap();
    assert_eq!(a.value, b"1");
    assert_eq!(a.create_revision, r1);
    let r3 = store.put("/t/a", b"1b".to_vec(), None).await.unwrap();
    let a = store.get("/t/a").await.unwrap().unwrap();
    assert_eq!((a.create_revision, a.mod_revision), (r1, r3));
    let l = store.list(p).await.unwrap();
    assert_eq!(
        l.kvs.iter().map(|k| k.key.as_str()).collect::<Vec<_>>(),
        ["/t/a", "/t/b"]
    );
    assert!(l.revision >= r3);
    assert!(store.get("/t/none").await.unwrap().is_none());

    // compare-and-set
    assert!(store.put_if("/t/c", b"x".to_vec(), None, 0).await.unwrap());
    assert!(!store.put_if("/t/c", b"y".to_vec(), None, 0).await.unwrap());
    let c = store.get("/t/c").await.unwrap().unwrap();
    assert!(!store
        .put_if("/t/c", b"y".to_vec(), None, c.mod_revision - 1)
        .await
        .unwrap());
    assert!(store
        .put_if("/t/c", b"y".to_vec(), None, c.mod_revision)
        .await
        .unwrap());
    assert_eq!(store.get("/t/c").await.unwrap().unwrap().value, b"y");

    // delete
    assert!(store.delete("/t/c").await.unwrap());
    assert!(!store.delete("/t/c").await.unwrap());

    // watch from now: puts and deletes under the prefix only, in order
    let now = store.list(p).await.unwrap().revision;
    let mut w = store.watch(p, now + 1).await.unwrap();
    store.put("/u/y", b"ignored".to_vec(), None).await.unwrap();
    store.put("/t/d", b"4".to_vec(), None).await.unwrap();
    store.delete("/t/b").await.unwrap();
    let ev = collect(&mut w, 2).await;
    assert!(matches!(&ev[0], WatchEvent::Put(kv) if kv.key == "/t/d" && kv.value == b"4"));
    assert!(matches!(&ev[1], WatchEvent::Delete { key, .. } if key == "/t/b"));

    // watch from the past replays history
    let mut past = store.watch(p, r1).await.unwrap();
    let ev = collect(&mut past, 3).await;
    assert_eq!(ev[0].key(), "/t/a");
    assert_eq!(ev[0].revision(), r1);
    assert_eq!(ev[1].key(), "/t/b");

    // leases: keys vanish with their lease, with a delete event
    let lease = store.grant(Duration::from_secs(1)).await.unwrap();
    store
        .put("/t/leased", b"l".to_vec(), Some(lease))
        .await
        .unwrap();
    assert!(store.keep_alive(lease).await.unwrap() >= Duration::from_secs(1));
    let rev = store.list(p).await.unwrap().revision;
    let mut w = store.watch(p, rev + 1).await.unwrap();
    let t0 = Instant::now();
    let ev = collect(&mut w, 1).await;
    assert!(matches!(&ev[0], WatchEvent::Delete { key, .. } if key == "/t/leased"));
    // etcd checks lease expiry about every 500 ms on top of the TTL.
    assert!(
        t0.elapsed() < Duration::from_secs(4),
        "lease expiry took {:?}",
        t0.elapsed()
    );
    assert!(store.get("/t/leased").await.unwrap().is_none());
    assert_eq!(
        store.keep_alive(lease).await.unwrap_err(),
        StoreError::LeaseNotFound(lease)
    );
    // a put under a dead lease is refused
    assert_eq!(
        store.put("/t/zombie", b"z".to_vec(), Some(lease)).await,
        Err(StoreError::LeaseNotFound(lease))
    );
    // revoke deletes at once
    let lease = store.grant(Duration::from_secs(30)).await.unwrap();
    store
        .put("/t/r1", b"1".to_vec(), Some(lease))
        .await
        .unwrap();
    store
        .put("/t/r2", b"2".to_vec(), Some(lease))
        .await
        .unwrap();
    store.revoke(lease).await.unwrap();
    assert!(store.get("/t/r1").await.unwrap().is_none());
    assert!(store.get("/t/r2").await.unwrap().is_none());

    // compaction: a watch that starts before it must re-list
    let rev = store.put("/t/e", b"5".to_vec(), None).await.unwrap();
    compact(rev).await;
    match store.watch(p, r1).await {
        Err(StoreError::Compacted { .. }) => {}
        Ok(mut w) => {
            // etcd reports compaction on the stream rather than at creation.
            let got = tokio::time::timeout(Duration::from_secs(5), w.recv())
                .await
                .unwrap();
            assert!(
                matches!(got, Some(Err(StoreError::Compacted { .. }))),
                "{got:?}"
            );
        }
        Err(e) => panic!("expected Compacted, got {e}"),
    }

    // the reflector: a full listing first, then exactly what changed
    let r = reflect(store.clone(), p.to_owned());
    let t0 = Instant::now();
    while !r.synced() {
        assert!(
            t0.elapsed() < Duration::from_secs(5),
            "reflector never synced"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let first = r.take();
    assert!(first.replaced);
    let keys: Vec<_> = first.changes.iter().map(|c| c.0.as_str()).collect();
    assert_eq!(keys, ["/t/a", "/t/d", "/t/e"]);
    store.put("/t/f", b"6".to_vec(), None).await.unwrap();
    store.delete("/t/a").await.unwrap();
    let t0 = Instant::now();
    let mut got = Vec::new();
    while got.len() < 2 {
        assert!(
            t0.elapsed() < Duration::from_secs(5),
            "reflector missed changes: {got:?}"
        );
        let _ = tokio::time::timeout(Duration::from_millis(200), r.changed()).await;
        let d = r.take();
        assert!(!d.replaced);
        got.extend(d.changes);
    }
    got.sort();
    assert_eq!(
        got,
        [
            ("/t/a".to_owned(), None),
            ("/t/f".to_owned(), Some(b"6".to_vec()))
        ]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_store_meets_the_contract() {
    let store = EmbeddedStore::new(EmbeddedLimits::default());
    let s2 = store.clone();
    let compact: Compact = Box::new(move |rev| {
        let s = s2.clone();
        Box::pin(async move { s.compact(rev) })
    });
    contract(Arc::new(store), compact).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_value_size_is_bounded() {
    let store = EmbeddedStore::new(EmbeddedLimits {
        max_value_bytes: 10,
        ..EmbeddedLimits::default()
    });
    assert!(matches!(
        store.put("/k", vec![0; 11], None).await,
        Err(StoreError::ValueTooLarge { len: 11, max: 10 })
    ));
}

#[cfg(feature = "etcd")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_store_meets_the_contract() {
    use fedmesh_federation::store::{EtcdOptions, EtcdStore};
    let Some(bin) = fedmesh_testkit::etcd::etcd_or_skip("etcd_store_meets_the_contract") else {
        return;
    };
    let cluster = fedmesh_testkit::etcd::EtcdCluster::start(bin, 1).unwrap();
    let store = EtcdStore::connect(&EtcdOptions {
        endpoints: cluster.endpoints(),
        ..EtcdOptions::default()
    })
    .await
    .unwrap();
    let s2 = store.clone();
    let compact: Compact = Box::new(move |rev| {
        let s = s2.clone();
        Box::pin(async move { s.compact(rev).await.unwrap() })
    });
    contract(Arc::new(store), compact).await;
}

#[cfg(feature = "etcd")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_store_meets_the_contract_over_mutual_tls() {
    use fedmesh_federation::store::{EtcdOptions, EtcdStore, EtcdTls};
    let Some(bin) = fedmesh_testkit::etcd::etcd_or_skip("etcd_store_over_mutual_tls") else {
        return;
    };
    let cluster = fedmesh_testkit::etcd::EtcdCluster::start_tls(bin, 1).unwrap();
    let m = cluster.tls().unwrap().clone();
    let opts = |tls: Option<EtcdTls>| EtcdOptions {
        endpoints: cluster.endpoints(),
        connect_timeout: Duration::from_secs(2),
        request_timeout: Duration::from_secs(2),
        tls,
        ..EtcdOptions::default()
    };
    let good = EtcdTls {
        ca_pem: m.ca_pem.clone(),
        identity: Some((m.client_cert_pem.clone(), m.client_key_pem.clone())),
        server_name: None,
    };
    let store = EtcdStore::connect(&opts(Some(good.clone()))).await.unwrap();
    let s2 = store.clone();
    let compact: Compact = Box::new(move |rev| {
        let s = s2.clone();
        Box::pin(async move { s.compact(rev).await.unwrap() })
    });
    contract(Arc::new(store), compact).await;

    // Refused: no client certificate; a CA that did not sign etcd's
    // certificate; plaintext to a TLS port.
    let without_cert = EtcdTls {
        identity: None,
        ..good.clone()
    };
    let other_ca = {
        let k = rcgen::KeyPair::generate().unwrap();
        let mut p = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        p.self_signed(&k).unwrap().pem()
    };
    let wrong_ca = EtcdTls {
        ca_pem: other_ca,
        ..good.clone()
    };
    for (what, tls) in [
        ("no client certificate", Some(without_cert)),
        ("wrong CA", Some(wrong_ca)),
    ] {
        let r = async {
            let s = EtcdStore::connect(&opts(tls)).await?;
            s.put("/fedmesh/v1/x", b"y".to_vec(), None).await
        };
        let r = tokio::time::timeout(Duration::from_secs(20), r)
            .await
            .expect("hung");
        assert!(r.is_err(), "{what}: accepted");
    }
    let plain = EtcdOptions {
        endpoints: cluster
            .endpoints()
            .iter()
            .map(|e| e.replace("https://", "http://"))
            .collect(),
        ..opts(None)
    };
    let r = tokio::time::timeout(Duration::from_secs(20), async {
        let s = EtcdStore::connect(&plain).await?;
        s.put("/fedmesh/v1/x", b"y".to_vec(), None).await
    })
    .await
    .expect("hung");
    assert!(r.is_err(), "plaintext accepted by a TLS etcd");
    // TLS options with an http:// endpoint are a config error, not a downgrade.
    let mixed = EtcdOptions {
        endpoints: vec!["http://127.0.0.1:1".into()],
        ..opts(Some(good))
    };
    assert!(EtcdStore::connect(&mixed).await.is_err());
}

/// A store whose watches can be cut on demand, as a network fault would.
struct Flaky {
    inner: EmbeddedStore,
    cut: Arc<tokio::sync::Notify>,
}

#[async_trait::async_trait]
impl Store for Flaky {
    async fn get(&self, key: &str) -> Result<Option<fedmesh_federation::KeyValue>, StoreError> {
        self.inner.get(key).await
    }
    async fn list(&self, prefix: &str) -> Result<fedmesh_federation::Listing, StoreError> {
        self.inner.list(prefix).await
    }
    async fn put(
        &self,
        key: &str,
        value: Vec<u8>,
        lease: Option<i64>,
    ) -> Result<Revision, StoreError> {
        self.inner.put(key, value, lease).await
    }
    async fn put_if(
        &self,
        key: &str,
        value: Vec<u8>,
        lease: Option<i64>,
        expected: Revision,
    ) -> Result<bool, StoreError> {
        self.inner.put_if(key, value, lease, expected).await
    }
    async fn delete(&self, key: &str) -> Result<bool, StoreError> {
        self.inner.delete(key).await
    }
    async fn grant(&self, ttl: Duration) -> Result<i64, StoreError> {
        self.inner.grant(ttl).await
    }
    async fn keep_alive(&self, lease: i64) -> Result<Duration, StoreError> {
        self.inner.keep_alive(lease).await
    }
    async fn revoke(&self, lease: i64) -> Result<(), StoreError> {
        self.inner.revoke(lease).await
    }
    async fn watch(
        &self,
        prefix: &str,
        from: Revision,
    ) -> Result<fedmesh_federation::store::WatchStream, StoreError> {
        let mut inner = self.inner.watch(prefix, from).await?;
        let (tx, rx) = tokio::sync::mpsc::channel(16);
        let cut = self.cut.clone();
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = cut.notified() => return,
                    ev = inner.recv() => match ev {
                        Some(ev) => if tx.send(ev).await.is_err() { return },
                        None => return,
                    },
                }
            }
        });
        Ok(rx)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reflector_recovers_from_a_cut_and_compacted_watch_exactly() {
    let inner = EmbeddedStore::new(EmbeddedLimits::default());
    let cut = Arc::new(tokio::sync::Notify::new());
    let store: Arc<dyn Store> = Arc::new(Flaky {
        inner: inner.clone(),
        cut: cut.clone(),
    });
    for i in 0..20 {
        store
            .put(&format!("/r/{i:03}"), b"v0".to_vec(), None)
            .await
            .unwrap();
    }
    let r = reflect(store.clone(), "/r/".into());
    let t0 = Instant::now();
    while !r.synced() {
        assert!(t0.elapsed() < Duration::from_secs(5));
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // Cut the watch, change things while it is down, and compact history
    // past the point it would resume from: only a re-list can recover.
    cut.notify_one();
    for round in 0..300 {
        let k = format!("/r/{:03}", round % 40);
        if round % 7 == 0 {
            store.delete(&k).await.unwrap();
        } else {
            store
                .put(&k, format!("v{round}").into_bytes(), None)
                .await
                .unwrap();
        }
    }
    inner.compact(inner.revision());
    let truth: std::collections::BTreeMap<String, Vec<u8>> = store
        .list("/r/")
        .await
        .unwrap()
        .kvs
        .into_iter()
        .map(|kv| (kv.key, kv.value))
        .collect();
    let t0 = Instant::now();
    while r.snapshot() != truth {
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "reflector never matched the store"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(r.relists() >= 1, "recovery must have been a re-list");
    // And a reader sees one replacement carrying exactly the truth.
    let d = r.take();
    assert!(d.replaced);
    let got: std::collections::BTreeMap<String, Vec<u8>> = d
        .changes
        .into_iter()
        .map(|(k, v)| (k, v.unwrap()))
        .collect();
    assert_eq!(got, truth);
}
