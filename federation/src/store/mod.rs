//! The federation store: a small key-value API with revisions, prefix
//! watches, leases and compare-and-set, implemented in-process
//! ([`EmbeddedStore`]) and over etcd (`EtcdStore`, feature `etcd`).
//! One contract test suite (`tests/store_contract.rs`) runs against both.

mod embedded;
#[cfg(feature = "etcd")]
mod etcd;
mod reflector;

use std::time::Duration;

pub use embedded::{EmbeddedLimits, EmbeddedStore};
#[cfg(feature = "etcd")]
pub use etcd::{EtcdOptions, EtcdStore, EtcdTls};
pub use reflector::{reflect, Delta, Reflected};

/// A store revision: increases with every change.
pub type Revision = i64;
/// A lease id; keys put under a lease vanish when it expires.
pub type LeaseId = i64;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyValue {
    pub key: String,
    pub value: Vec<u8>,
    pub create_revision: Revision,
    pub mod_revision: Revision,
    pub lease: Option<LeaseId>,
}

/// One change seen by a watch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WatchEvent {
    Put(KeyValue),
    Delete { key: String, mod_revision: Revision },
}

impl WatchEvent {
    pub fn key(&self) -> &str {
        match self {
            Self::Put(kv) => &kv.key,
            Self::Delete { key, .. } => key,
        }
    }

    pub fn revision(&self) -> Revision {
        match self {
            Self::Put(kv) => kv.mod_revision,
            Self::Delete { mod_revision, .. } => *mod_revision,
        }
    }
}

/// A consistent listing: every key under a prefix as of `revision`.
#[derive(Debug, Clone, Default)]
pub struct Listing {
    pub revision: Revision,
    pub kvs: Vec<KeyValue>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// The requested watch start is older than what the store keeps; the
    /// caller must re-list.
    #[error("revision {requested} was compacted (oldest kept: {compact_revision})")]
    Compacted {
        requested: Revision,
        compact_revision: Revision,
    },
    #[error("lease {0} not found or expired")]
    LeaseNotFound(LeaseId),
    #[error("value of {len} bytes exceeds the limit of {max}")]
    ValueTooLarge { len: usize, max: usize },
    #[error("watch fell behind and was closed; re-list")]
    WatchLagged,
    #[error("store unavailable: {0}")]
    Unavailable(String),
    #[error("store: {0}")]
    Other(String),
}

/// Batches a watch delivers; a closed channel or an `Err` ends the watch.
pub type WatchStream = tokio::sync::mpsc::Receiver<Result<Vec<WatchEvent>, StoreError>>;

/// Events a watch channel may hold before the watch is dropped as lagging.
pub const WATCH_CHANNEL: usize = 1024;

#[async_trait::async_trait]
pub trait Store: Send + Sync + 'static {
    async fn get(&self, key: &str) -> Result<Option<KeyValue>, StoreError>;
    async fn list(&self, prefix: &str) -> Result<Listing, StoreError>;
    /// Unconditional put; returns the new revision.
    async fn put(
        &self,
        key: &str,
        value: Vec<u8>,
        lease: Option<LeaseId>,
    ) -> Result<Revision, StoreError>;
    /// Puts only if the key's current `mod_revision` is `expected` (0: the
    /// key must not exist). `Ok(false)` when the comparison failed.
    async fn put_if(
        &self,
        key: &str,
        value: Vec<u8>,
        lease: Option<LeaseId>,
        expected: Revision,
    ) -> Result<bool, StoreError>;
    /// Returns whether the key existed.
    async fn delete(&self, key: &str) -> Result<bool, StoreError>;
    async fn grant(&self, ttl: Duration) -> Result<LeaseId, StoreError>;
    /// Refreshes a lease once; returns the TTL it now has left.
    async fn keep_alive(&self, lease: LeaseId) -> Result<Duration, StoreError>;
    async fn revoke(&self, lease: LeaseId) -> Result<(), StoreError>;
    /// Changes under `prefix` from `from` (inclusive) on.
    async fn watch(&self, prefix: &str, from: Revision) -> Result<WatchStream, StoreError>;
}
