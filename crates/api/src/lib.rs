//! fedmesh control API: how a cluster's controller configures its own
//! proxies, and how they get their SVIDs.
//!
//! - [`server`]: the controller's side. Streams a versioned snapshot and
//!   then deltas of the cluster's [`ProxyConfig`] to each subscribed proxy,
//!   one update in flight per proxy; signs CSRs.
//! - [`client`]: the proxy's side. Subscribes, validates every update
//!   before applying it (ACK) or rejects it keeping the last good config
//!   (NACK), reconnects with backoff, and renews its SVID at two thirds of
//!   its lifetime.
//! - Transport: gRPC (tonic) over mutual TLS with X.509-SVIDs of the
//!   cluster's trust domain ([`net`]). Bootstrap callers without an SVID
//!   may only call `Sign`, with a token.
#![forbid(unsafe_code)]

pub mod addr;
pub mod certs;
pub mod client;
mod delta;
pub mod follow;
pub mod net;
pub mod server;

/// Generated protobuf and tonic code (`proto/fedmesh/v1/api.proto`).
#[allow(clippy::all, missing_docs)]
pub mod pb {
    tonic::include_proto!("fedmesh.v1");
}

pub use delta::{Applied, ApplyError, ProxyConfig};

use fedmesh_trust::{SpiffeId, TrustDomain};

/// The identity a cluster's controller serves the API with.
pub fn controller_identity(td: &TrustDomain) -> SpiffeId {
    td.system_id("controller")
}
