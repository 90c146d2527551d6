//! An in-process store with etcd's semantics (revisions, prefix watches
//! from a revision, leases, compare-and-set, compaction), for the demo,
//! single-machine use and tests.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::time::Instant;

use super::{
    KeyValue, LeaseId, Listing, Revision, Store, StoreError, WatchEvent, WatchStream, WATCH_CHANNEL,
};

/// Bounds of the embedded store.
#[derive(Debug, Clone)]
pub struct EmbeddedLimits {
    /// Past events kept for watches that start in the past; older starts
    /// get `Compacted`.
    pub history: usize,
    pub max_value_bytes: usize,
    /// How often expired leases are collected.
    pub lease_tick: Duration,
}

impl Default for EmbeddedLimits {
    fn default() -> Self {
        Self {
            history: 100_000,
            max_value_bytes: 1536 * 1024, // etcd's default request limit
            lease_tick: Duration::from_millis(50),
        }
    }
}

struct Lease {
    ttl: Duration,
    deadline: Instant,
    keys: Vec<String>,
}

struct Watcher {
    prefix: String,
    tx: mpsc::Sender<Result<Vec<WatchEvent>, StoreError>>,
}

#[derive(Default)]
struct State {
    revision: Revision,
    data: BTreeMap<String, KeyValue>,
    history: VecDeque<WatchEvent>,
    compacted: Revision,
    leases: HashMap<LeaseId, Lease>,
    watchers: Vec<Watcher>,
    next_lease: LeaseId,
}

/// The embedded store. Cheap to clone; clones share state.
#[derive(Clone)]
pub struct EmbeddedStore {
    state: Arc<Mutex<State>>,
    limits: EmbeddedLimits,
    reaper: Arc<tokio::task::JoinHandle<()>>,
}

impl Drop for EmbeddedStore {
    fn drop(&mut self) {
        // The last handle stops the lease reaper.
        if Arc::strong_count(&self.reaper) == 1 {
            self.reaper.abort();
        }
    }
}

impl EmbeddedStore {
    /// Must be called inside a tokio runtime (it starts the lease reaper).
    pub fn new(limits: EmbeddedLimits) -> Self {
        let state = Arc::new(Mutex::new(State {
            next_lease: 0x1000,
            ..State::default()
        }));
        let weak = Arc::downgrade(&state);
        let tick = limits.lease_tick;
        let history = limits.history;
        let reaper = tokio::spawn(async move {
            let mut iv = tokio::time::interval(tick);
            loop {
                iv.tick().await;
                let Some(state) = weak.upgrade() else { return };
                let mut s = lock(&state);
                let now = Instant::now();
                let expired: Vec<LeaseId> = s
                    .leases
                    .iter()
                    .filter(|(_, l)| l.deadline <= now)
                    .map(|(id, _)| *id)
                    .collect();
                for id in expired {
                    tracing::debug!(lease = id, "lease expired");
                    revoke_locked(&mut s, id, history);
                }
            }
        });
        Self {
            state,
            limits,
            reaper: Arc::new(reaper),
        }
    }

    /// Drops history up to `revision`, as etcd compaction does.
    pub fn compact(&self, revision: Revision) {
        let mut s = lock(&self.state);
        while s.history.front().is_some_and(|e| e.revision() <= revision) {
            s.history.pop_front();
        }
        s.compacted = s.compacted.max(revision);
    }

    pub fn revision(&self) -> Revision {
        lock(&self.state).revision
    }

    fn check_size(&self, v: &[u8]) -> Result<(), StoreError> {
        if v.len() > self.limits.max_value_bytes {
            return Err(StoreError::ValueTooLarge {
                len: v.len(),
                max: self.limits.max_value_bytes,
            });
        }
        Ok(())
    }
}

fn lock(m: &Mutex<State>) -> MutexGuard<'_, State> {
    match m.lock() {
        Ok(g) => g,
        Err(p) => p.into_inner(),
    }
}

fn record(s: &mut State, events: Vec<WatchEvent>, history: usize) {
    if events.is_empty() {
        return;
    }
    for e in &events {
        s.history.push_back(e.clone());
    }
    while s.history.len() > history {
        if let Some(e) = s.history.pop_front() {
            s.compacted = e.revision();
        }
    }
    s.watchers.retain(|w| {
        let mine: Vec<WatchEvent> = events
            .iter()
            .filter(|e| e.key().starts_with(&w.prefix))
            .cloned()
            .collect();
        if mine.is_empty() {
            return !w.tx.is_closed();
        }
        // A watcher that cannot keep up is dropped; its reader sees the
        // channel close and re-lists, which loses nothing.
        w.tx.try_send(Ok(mine)).is_ok()
    });
}

fn put_locked(
    s: &mut State,
    key: &str,
    value: Vec<u8>,
    lease: Option<LeaseId>,
    history: usize,
) -> Result<Revision, StoreError> {
    if let Some(id) = lease {
        if !s.leases.contains_key(&id) {
            return Err(StoreError::LeaseNotFound(id));
        }
    }
    s.revision += 1;
    let rev = s.revision;
    let create = s.data.get(key).map(|kv| kv.create_revision).unwrap_or(rev);
    let old_lease = s.data.get(key).and_then(|kv| kv.lease);
    if let Some(old) = old_lease.filter(|o| Some(*o) != lease) {
        if let Some(l) = s.leases.get_mut(&old) {
            l.keys.retain(|k| k != key);
        }
    }
    if let Some(id) = lease {
        if let Some(l) = s.leases.get_mut(&id) {
            if !l.keys.iter().any(|k| k == key) {
                l.keys.push(key.to_owned());
            }
        }
    }
    let kv = KeyValue {
        key: key.to_owned(),
        value,
        create_revision: create,
        mod_revision: rev,
        lease,
    };
    s.data.insert(key.to_owned(), kv.clone());
    record(s, vec![WatchEvent::Put(kv)], history);
    Ok(rev)
}

fn revoke_locked(s: &mut State, id: LeaseId, history: usize) -> bool {
    let Some(lease) = s.leases.remove(&id) else {
        return false;
    };
    let mut events = Vec::new();
    for key in lease.keys {
        if s.data.get(&key).is_some_and(|kv| kv.lease == Some(id)) {
            s.data.remove(&key);
            s.revision += 1;
            events.push(WatchEvent::Delete {
                key,
                mod_revision: s.revision,
            });
        }
    }
    record(s, events, history);
    true
}

#[async_trait::async_trait]
impl Store for EmbeddedStore {
    async fn get(&self, key: &str) -> Result<Option<KeyValue>, StoreError> {
        Ok(lock(&self.state).data.get(key).cloned())
    }

    async fn list(&self, prefix: &str) -> Result<Listing, StoreError> {
        let s = lock(&self.state);
        let kvs = s
            .data
            .range(prefix.to_owned()..)
            .take_while(|(k, _)| k.starts_with(prefix))
            .map(|(_, v)| v.clone())
            .collect();
        Ok(Listing {
            revision: s.revision,
            kvs,
        })
    }

    async fn put(
        &self,
        key: &str,
        value: Vec<u8>,
        lease: Option<LeaseId>,
    ) -> Result<Revision, StoreError> {
        self.check_size(&value)?;
        let mut s = lock(&self.state);
        put_locked(&mut s, key, value, lease, self.limits.history)
    }

    async fn put_if(
        &self,
        key: &str,
        value: Vec<u8>,
        lease: Option<LeaseId>,
        expected: Revision,
    ) -> Result<bool, StoreError> {
        self.check_size(&value)?;
        let mut s = lock(&self.state);
        let current = s.data.get(key).map(|kv| kv.mod_revision).unwrap_or(0);
        if current != expected {
            return Ok(false);
        }
        put_locked(&mut s, key, value, lease, self.limits.history)?;
        Ok(true)
    }

    async fn delete(&self, key: &str) -> Result<bool, StoreError> {
        let mut s = lock(&self.state);
        let Some(kv) = s.data.remove(key) else {
            return Ok(false);
        };
        if let Some(l) = kv.lease.and_then(|id| s.leases.get_mut(&id)) {
            l.keys.retain(|k| k != key);
        }
        s.revision += 1;
        let rev = s.revision;
        record(
            &mut s,
            vec![WatchEvent::Delete {
                key: key.to_owned(),
                mod_revision: rev,
            }],
            self.limits.history,
        );
        Ok(true)
    }

    async fn grant(&self, ttl: Duration) -> Result<LeaseId, StoreError> {
        let mut s = lock(&self.state);
        s.next_lease += 1;
        let id = s.next_lease;
        s.leases.insert(
            id,
            Lease {
                ttl,
                deadline: Instant::now() + ttl,
                keys: Vec::new(),
            },
        );
        Ok(id)
    }

    async fn keep_alive(&self, lease: LeaseId) -> Result<Duration, StoreError> {
        let mut s = lock(&self.state);
        let l = s
            .leases
            .get_mut(&lease)
            .ok_or(StoreError::LeaseNotFound(lease))?;
        l.deadline = Instant::now() + l.ttl;
        Ok(l.ttl)
    }

    async fn revoke(&self, lease: LeaseId) -> Result<(), StoreError> {
        let mut s = lock(&self.state);
        if revoke_locked(&mut s, lease, self.limits.history) {
            Ok(())
        } else {
            Err(StoreError::LeaseNotFound(lease))
        }
    }

    async fn watch(&self, prefix: &str, from: Revision) -> Result<WatchStream, StoreError> {
        let mut s = lock(&self.state);
        if from <= s.compacted {
            return Err(StoreError::Compacted {
                requested: from,
                compact_revision: s.compacted,
            });
        }
        let (tx, rx) = mpsc::channel(WATCH_CHANNEL);
        let past: Vec<WatchEvent> = s
            .history
            .iter()
            .filter(|e| e.revision() >= from && e.key().starts_with(prefix))
            .cloned()
            .collect();
        if !past.is_empty() && tx.try_send(Ok(past)).is_err() {
            return Err(StoreError::WatchLagged);
        }
        s.watchers.push(Watcher {
            prefix: prefix.to_owned(),
            tx,
        });
        Ok(rx)
    }
}
