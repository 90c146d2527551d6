//! The fedmesh east-west gateway.
//!
//! One UDP port speaks QUIC (quinn, rustls mTLS with gateway SVIDs, ALPN
//! `fedmesh/1`) to peer cluster gateways: one reused connection per peer,
//! one bidirectional stream per tunneled connection. An optional TCP port
//! carries the same streams as HTTP/2 `CONNECT` over mTLS for peers whose
//! path drops UDP (chosen per peer, automatically). One TCP port accepts
//! mTLS tunnels from this cluster's sidecars. Every stream opens with a
//! tunnel header and is answered with a status frame before payload.
//! Routing decisions come from [`fedmesh_catalog`]; this crate is the I/O.
#![forbid(unsafe_code)]

mod app;
mod bbr;
mod config;
mod congestion;
mod drills;
mod fault;
mod link;
mod metrics;
mod pool;
mod quic;
mod server;
mod splice;
mod tcp;
mod transport;

pub use app::{GatewayApp, GatewayAppError};
pub use config::{ConfigError, GatewayConfig, GatewaySettings, Listen};
pub use congestion::{Algorithm, CongestionConfig, Observation, Observed};
pub use drills::{DrillClient, DrillClientError, DrillMetrics, DrillsConfig};
pub use fault::{DrillId, FaultError, FaultKind, FaultLimits, FaultSpec, FaultView};
pub use metrics::{GatewayMetrics, PeerLabels, TransportLabels};
pub use pool::PeerStatus;
pub use quic::{
    baseline_endpoint as quic_baseline_endpoint, client_config as quic_client_config,
    server_config as quic_server_config, PeerConfigs, QuicError,
};
pub use server::{Gateway, GatewayError};
pub use tcp::ALPN_H2;
pub use transport::Transport;
