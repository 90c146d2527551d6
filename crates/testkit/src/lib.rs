//! Fakes and the in-process multi-cluster rig, shared by tests, the demo
//! and the benchmarks: echo and sink apps, a load generator that checks
//! every byte, and [`Rig`], which starts whole clusters (CA, gateway,
//! sidecars, apps) on loopback.
#![forbid(unsafe_code)]
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod apps;
pub mod drill;
pub mod etcd;
pub mod fake_kube;
pub mod faults;
mod load;
mod rig;
pub mod tls;

pub use apps::{http_app, serve as serve_app, App, AppKind, HttpConn, HttpReply};
pub use load::{
    percentile, run_load, run_load_counted, run_open_loop, LiveCounts, LoadReport, LoadSpec,
    OpenLoopSpec, Sample,
};
pub use rig::{ClusterTopo, ControlPlane, Rig, RigCluster, ServiceTopo, Topology};
