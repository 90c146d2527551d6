//! A watcher over a store prefix, in the manner of kube-runtime's
//! reflector: one writer task lists, then watches from the next revision,
//! and applies every change to a shared cache; when the watch breaks or its
//! start was compacted it re-lists and replaces the cache wholesale. Readers
//! take the keys changed since their last look whenever they are ready, so
//! a slow reader never backs up the store's watch (which would make the
//! store drop it) and never misses or keeps an entry.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::sync::Notify;

use super::{Store, StoreError, WatchEvent};

const RETRY_MIN: Duration = Duration::from_millis(100);
const RETRY_MAX: Duration = Duration::from_secs(5);

#[derive(Default)]
struct Shared {
    entries: BTreeMap<String, Vec<u8>>,
    changed: BTreeSet<String>,
    /// A re-list happened since the reader last looked.
    replaced: bool,
    synced: bool,
    relists: u64,
}

/// What changed since the last [`Reflected::take`].
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Delta {
    /// The reader must drop everything it had: `changes` is the full content.
    pub replaced: bool,
    /// Key and new value (`None`: deleted).
    pub changes: Vec<(String, Option<Vec<u8>>)>,
}

/// The reading side of a reflected prefix. Dropping it stops the writer.
pub struct Reflected {
    shared: Arc<Mutex<Shared>>,
    notify: Arc<Notify>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Reflected {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn lock(m: &Mutex<Shared>) -> MutexGuard<'_, Shared> {
    match m.lock() {
        Ok(g) => g,
        Err(p) => p.into_inner(),
    }
}

impl Reflected {
    /// Waits until something changed since the last `take` (returns at
    /// once if it already has).
    pub async fn changed(&self) {
        self.notify.notified().await;
    }

    /// Whether the first full listing has arrived.
    pub fn synced(&self) -> bool {
        lock(&self.shared).synced
    }

    /// How many times the prefix was re-listed after the first listing.
    pub fn relists(&self) -> u64 {
        lock(&self.shared).relists
    }

    pub fn take(&self) -> Delta {
        let mut s = lock(&self.shared);
        let changed = std::mem::take(&mut s.changed);
        if std::mem::take(&mut s.replaced) {
            let changes = s
                .entries
                .iter()
                .map(|(k, v)| (k.clone(), Some(v.clone())))
                .collect();
            return Delta {
                replaced: true,
                changes,
            };
        }
        let changes = changed
            .into_iter()
            .map(|k| {
                let v = s.entries.get(&k).cloned();
                (k, v)
            })
            .collect();
        Delta {
            replaced: false,
            changes,
        }
    }

    /// A copy of the whole reflected content.
    pub fn snapshot(&self) -> BTreeMap<String, Vec<u8>> {
        lock(&self.shared).entries.clone()
    }
}

/// Reflects `prefix` until the returned handle is dropped. Store outages
/// are retried with backoff; after any gap a re-list re-establishes the
/// truth.
pub fn reflect(store: Arc<dyn Store>, prefix: String) -> Reflected {
    let shared = Arc::new(Mutex::new(Shared::default()));
    let notify = Arc::new(Notify::new());
    let (s2, n2) = (shared.clone(), notify.clone());
    let task = tokio::spawn(async move {
        let mut backoff = RETRY_MIN;
        loop {
            let started = tokio::time::Instant::now();
            let e = run_once(&*store, &prefix, &s2, &n2).await;
            tracing::info!(%prefix, error = %e, "store watch broke; re-listing");
            // A watch that ran for a while earns a fresh backoff.
            if started.elapsed() > RETRY_MAX {
                backoff = RETRY_MIN;
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(RETRY_MAX);
        }
    });
    Reflected {
        shared,
        notify,
        task,
    }
}

async fn run_once(
    store: &dyn Store,
    prefix: &str,
    shared: &Mutex<Shared>,
    notify: &Notify,
) -> StoreError {
    let listing = match store.list(prefix).await {
        Ok(l) => l,
        Err(e) => return e,
    };
    {
        let mut s = lock(shared);
        s.entries = listing
            .kvs
            .into_iter()
            .map(|kv| (kv.key, kv.value))
            .collect();
        s.changed.clear();
        if s.synced {
            s.relists += 1;
        }
        s.replaced = true;
        s.synced = true;
    }
    notify.notify_one();
    let mut watch = match store.watch(prefix, listing.revision + 1).await {
        Ok(w) => w,
        Err(e) => return e,
    };
    loop {
        match watch.recv().await {
            Some(Ok(events)) => {
                let mut s = lock(shared);
                for e in events {
                    match e {
                        WatchEvent::Put(kv) => {
                            s.changed.insert(kv.key.clone());
                            s.entries.insert(kv.key, kv.value);
                        }
                        WatchEvent::Delete { key, .. } => {
                            s.entries.remove(&key);
                            s.changed.insert(key);
                        }
                    }
                }
                drop(s);
                notify.notify_one();
            }
            Some(Err(e)) => return e,
            None => return StoreError::WatchLagged,
        }
    }
}
