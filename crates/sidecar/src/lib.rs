//! The fedmesh sidecar: the in-cluster proxy next to each app.
//!
//! Outbound, it listens on explicit local ports (`127.0.0.1:PORT → service`)
//! and carries each accepted TCP connection in a tunnel: straight to a local
//! endpoint's sidecar (mTLS), or through this cluster's gateway when the
//! service lives in other clusters; a failed status frame moves the
//! connection to the next hop before any payload is sent. Inbound, it
//! accepts mTLS tunnels from its own cluster, decides who the caller is, and
//! hands the bytes to the local app over plain TCP. L4 only for now.
#![forbid(unsafe_code)]

mod config;
pub mod metrics;
mod proxy;

pub use config::{
    ConfigError, Inbound, InboundRoute, InboundService, InboundSettings, Outbound, OutboundRoute,
    SidecarConfig, SidecarSettings,
};
pub use metrics::{SeenCaller, SidecarMetrics};
pub use proxy::{Sidecar, SidecarError};
