//! Fakes and the in-process multi-cluster rig, shared by tests, the demo
//! and the benchmarks: echo and sink apps, a load generator that checks
//! every byte, and [`Rig`], which starts whole clusters (CA, gateway,
//! sidecars, apps) on loopback.
#![forbid(unsafe_code)]
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod apps;
pub mod etcd;
pub mod fake_kube;
pub mod faults;
mod load;
mod rig;
pub mod tls;

pub use apps::{App, AppKind};
pub use load::{percentile, run_load, LoadReport, LoadSpec};
pub use rig::{ClusterTopo, ControlPlane, Rig, RigCluster, ServiceTopo, Topology};
