//! The in-process multi-cluster rig that `fedmesh demo` and `fedmesh
//! drill` run: [`Rig`] starts whole clusters (CA, gateway, sidecars,
//! controllers, apps) from the real library types on loopback; echo, sink
//! and HTTP apps; a load generator that checks every byte; the failover
//! drill and the path faults it breaks a cluster with (user-space UDP and
//! TCP relays: this kernel has no `netem`).
//!
//! Production code, shipped in the `fedmesh` binary. Test-only fakes (a
//! Kubernetes API stand-in, an etcd launcher, TLS clients that misbehave)
//! live in `fedmesh-testkit`, a dev-dependency only.
#![forbid(unsafe_code)]

mod apps;
pub mod drill;
mod error;
pub mod faults;
mod load;
pub mod report;
mod rig;

pub use apps::{http_app, serve as serve_app, App, AppKind, HttpConn, HttpReply};
pub use error::RigError;
pub use load::{
    percentile, run_load, run_load_counted, run_open_loop, LiveCounts, LoadReport, LoadSpec,
    OpenLoopSpec, Sample,
};
pub use rig::{ClusterTopo, ControlPlane, Rig, RigCluster, ServiceTopo, Topology};
