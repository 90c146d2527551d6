//! fedmesh federation: the store every cluster publishes to and watches,
//! the records it holds, and the controller that turns them into each
//! cluster's catalog and trusted bundles; [`ControllerApp`] runs it with
//! everything its config names.
#![forbid(unsafe_code)]

pub mod app;
pub mod clusterset;
pub mod config;
pub mod controller;
pub mod dns;
#[cfg(feature = "kube")]
pub mod k8s;
pub mod keys;
#[cfg(feature = "kube")]
pub mod leader;
pub mod records;
pub mod source;
pub mod store;

pub use app::{AppError, ControllerApp, ServiceSource};
pub use controller::{Controller, ControllerSettings, Gateways, LocalService, McsView, Status};
pub use store::{KeyValue, LeaseId, Listing, Revision, Store, StoreError, WatchEvent};
