//! The fedmesh sidecar: the in-cluster proxy next to each app.
//!
//! Outbound, it listens on explicit local ports (`127.0.0.1:PORT → service`)
//! and carries each accepted TCP connection in a tunnel: straight to a local
//! endpoint's sidecar (mTLS), or through this cluster's gateway when the
//! service lives in other clusters; a failed status frame moves the
//! connection to the next hop before any payload is sent. Inbound, it
//! accepts mTLS tunnels from its own cluster, decides who the caller is, and
//! hands the bytes to the local app over plain TCP.
//!
//! Outbound connections that speak HTTP/1.x or HTTP/2 are proxied per
//! request (`http`): routing rules, timeouts, retries and response-class
//! metrics; everything else stays L4.
#![forbid(unsafe_code)]

mod app;
mod config;
pub mod detect;
mod http;
pub mod metrics;
mod proxy;

pub use app::{SidecarApp, SidecarAppError};
pub use config::{
    ConfigError, HttpLimits, Inbound, InboundRoute, InboundService, InboundSettings, Outbound,
    OutboundProtocol, OutboundRoute, SidecarConfig, SidecarSettings,
};
pub use metrics::{SeenCaller, SidecarMetrics};
pub use proxy::{Sidecar, SidecarError};
