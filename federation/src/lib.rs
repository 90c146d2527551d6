//! fedmesh federation: the store every cluster publishes to and watches,
//! the records it holds, and the controller that turns them into each
//! cluster's catalog and trusted bundles.
#![forbid(unsafe_code)]

pub mod store;

pub use store::{KeyValue, LeaseId, Listing, Revision, Store, StoreError, WatchEvent};
