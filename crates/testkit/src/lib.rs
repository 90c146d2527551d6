//! Test-only fakes: a stand-in for the Kubernetes API server that speaks
//! its list/watch protocol, an etcd launcher, and TLS clients that
//! misbehave on purpose. A dev-dependency only: nothing here ships in the
//! `fedmesh` binary.
//!
//! The in-process rig, apps, load generator, drill and path faults are
//! production code in `fedmesh-rig`; they are re-exported here so tests
//! reach every helper through one crate.
#![forbid(unsafe_code)]
#![allow(clippy::unwrap_used, clippy::expect_used)]

pub mod etcd;
pub mod fake_kube;
pub mod tls;

pub use fedmesh_rig::{drill, faults};
pub use fedmesh_rig::{
    http_app, percentile, run_load, run_load_counted, run_open_loop, serve_app, App, AppKind,
    ClusterTopo, ControlPlane, HttpConn, HttpReply, LiveCounts, LoadReport, LoadSpec, OpenLoopSpec,
    Rig, RigCluster, RigError, Sample, ServiceTopo, Topology,
};
