//! One contract for every store: the embedded one always, etcd when the
//! `etcd` feature is on (scripts/test.sh builds with it and installs etcd).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use fedmesh_federation::store::{reflect, CacheEvent, EmbeddedLimits, EmbeddedStore};
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

    // the reflector turns all of this into Replace + Apply, exactly
    let mut r = reflect(store.clone(), p.to_owned(), 16);
    let first = tokio::time::timeout(Duration::from_secs(5), r.recv())
        .await
        .unwrap()
        .unwrap();
    let CacheEvent::Replace { entries, .. } = first else {
        panic!("reflector must start with Replace")
    };
    let mut keys: Vec<_> = entries.keys().cloned().collect();
    keys.sort();
    assert_eq!(keys, ["/t/a", "/t/d", "/t/e"]);
    store.put("/t/f", b"6".to_vec(), None).await.unwrap();
    let next = tokio::time::timeout(Duration::from_secs(5), r.recv())
        .await
        .unwrap()
        .unwrap();
    assert!(matches!(next, CacheEvent::Apply(ev) if ev[0].key() == "/t/f"));
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reflector_recovers_from_a_dropped_and_compacted_watch_exactly() {
    use std::collections::BTreeMap;
    let store = EmbeddedStore::new(EmbeddedLimits {
        history: 50,
        ..EmbeddedLimits::default()
    });
    let dyn_store: Arc<dyn Store> = Arc::new(store.clone());
    for i in 0..20 {
        store
            .put(&format!("/r/{i:03}"), b"v0".to_vec(), None)
            .await
            .unwrap();
    }
    let mut rx = reflect(dyn_store.clone(), "/r/".into(), 4);
    let mut cache: BTreeMap<String, Vec<u8>> = BTreeMap::new();
    let mut replaces = 0;
    let apply =
        |cache: &mut BTreeMap<String, Vec<u8>>, ev: CacheEvent, replaces: &mut usize| match ev {
            CacheEvent::Replace { entries, .. } => {
                *replaces += 1;
                *cache = entries;
            }
            CacheEvent::Apply(list) => {
                for e in list {
                    match e {
                        WatchEvent::Put(kv) => {
                            cache.insert(kv.key, kv.value);
                        }
                        WatchEvent::Delete { key, .. } => {
                            cache.remove(&key);
                        }
                    }
                }
            }
        };
    let ev = tokio::time::timeout(Duration::from_secs(5), rx.recv())
        .await
        .unwrap()
        .unwrap();
    apply(&mut cache, ev, &mut replaces);
    // Far more changes than the watch channel (1024) and the history (50)
    // hold, while the consumer is not reading: the store drops the watch
    // and compacts past it.
    for round in 0..1500 {
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
    let truth: BTreeMap<String, Vec<u8>> = store
        .list("/r/")
        .await
        .unwrap()
        .kvs
        .into_iter()
        .map(|kv| (kv.key, kv.value))
        .collect();
    let t0 = Instant::now();
    while cache != truth {
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "cache never matched the store"
        );
        if let Ok(Some(ev)) = tokio::time::timeout(Duration::from_millis(200), rx.recv()).await {
            apply(&mut cache, ev, &mut replaces);
        }
    }
    assert!(
        replaces >= 2,
        "the broken watch should have been replaced by a re-list"
    );
}
