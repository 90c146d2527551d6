//! A watcher state machine over a store prefix, in the manner of
//! kube-runtime's: list, then watch from the next revision; when the watch
//! breaks or its start was compacted, re-list and hand the consumer a full
//! replacement, so the consumer's cache never misses or keeps an entry.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;

use super::{Revision, Store, StoreError, WatchEvent};

/// What a consumer of a reflected prefix receives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CacheEvent {
    /// The complete contents as of `revision`; replaces everything before.
    Replace {
        revision: Revision,
        entries: BTreeMap<String, Vec<u8>>,
    },
    /// Changes since the last event.
    Apply(Vec<WatchEvent>),
}

const RETRY_MIN: Duration = Duration::from_millis(100);
const RETRY_MAX: Duration = Duration::from_secs(5);

/// Reflects `prefix` into a bounded channel until the receiver is dropped.
/// Store outages are retried with backoff; nothing is delivered twice out
/// of order, and after any gap a `Replace` re-establishes the truth.
pub fn reflect(
    store: Arc<dyn Store>,
    prefix: String,
    capacity: usize,
) -> mpsc::Receiver<CacheEvent> {
    let (tx, rx) = mpsc::channel(capacity.max(1));
    tokio::spawn(async move {
        let mut backoff = RETRY_MIN;
        loop {
            let started = tokio::time::Instant::now();
            match run_once(&*store, &prefix, &tx).await {
                Ok(()) => return, // consumer gone
                Err(e) => {
                    tracing::info!(%prefix, error = %e, "store watch broke; re-listing");
                    if tx.is_closed() {
                        return;
                    }
                    // A watch that ran for a while earns a fresh backoff.
                    if started.elapsed() > RETRY_MAX {
                        backoff = RETRY_MIN;
                    }
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(RETRY_MAX);
                }
            }
            if tx.is_closed() {
                return;
            }
        }
    });
    rx
}

async fn run_once(
    store: &dyn Store,
    prefix: &str,
    tx: &mpsc::Sender<CacheEvent>,
) -> Result<(), StoreError> {
    let listing = store.list(prefix).await?;
    let entries = listing
        .kvs
        .into_iter()
        .map(|kv| (kv.key, kv.value))
        .collect();
    if tx
        .send(CacheEvent::Replace {
            revision: listing.revision,
            entries,
        })
        .await
        .is_err()
    {
        return Ok(());
    }
    let mut watch = store.watch(prefix, listing.revision + 1).await?;
    loop {
        match watch.recv().await {
            Some(Ok(events)) => {
                if tx.send(CacheEvent::Apply(events)).await.is_err() {
                    return Ok(());
                }
            }
            Some(Err(e)) => return Err(e),
            None => return Err(StoreError::WatchLagged),
        }
    }
}
