//! fedmesh on Kubernetes.
//!
//! Owns what gets applied to a cluster: the install manifests
//! ([`install`], rendered by `fedmesh install` and, through it, by the
//! Terraform module, so there is one source for both), the sidecar
//! injection ([`inject`]) and the pod traffic redirect its init container
//! installs ([`redirect`]), and the name and port rules both enforce
//! ([`names`]) before anything is written.
#![forbid(unsafe_code)]

pub mod inject;
pub mod install;
pub mod names;
pub mod redirect;
mod yaml;

pub use yaml::{parse_documents, to_documents, YamlError};

/// The namespace every fedmesh component runs in: gateway and controller
/// SPIFFE IDs (`spiffe://<td>/ns/fedmesh-system/sa/<component>`) name it.
pub const NAMESPACE: &str = "fedmesh-system";

/// Ports, fixed so that manifests, probes, docs and firewalls agree.
pub mod ports {
    /// Gateway QUIC (UDP), peers' gateways connect here.
    pub const GATEWAY_QUIC: u16 = 15443;
    /// Gateway TLS/TCP fallback (HTTP/2 CONNECT) for paths that drop UDP.
    pub const GATEWAY_TCP: u16 = 15444;
    /// Gateway port for this cluster's sidecars (mTLS, in-cluster only).
    pub const GATEWAY_TUNNEL: u16 = 15008;
    /// Gateway admin: `/live`, `/ready`, `/metrics`, `/status`.
    pub const GATEWAY_ADMIN: u16 = 15021;
    /// Gateway drill API (mTLS, operators only), when installed with
    /// `--drill-operator`.
    pub const GATEWAY_DRILLS: u16 = 15022;
    /// Controller config and certificate API for proxies (gRPC, mTLS).
    pub const CONTROLLER_API: u16 = 15012;
    /// Controller admin: `/live`, `/ready`, `/metrics`, `/status`.
    pub const CONTROLLER_ADMIN: u16 = 15014;
    /// Controller `clusterset.local` DNS (UDP and TCP), behind the
    /// `fedmesh-dns` Service's port 53.
    pub const CONTROLLER_DNS: u16 = 15053;
    /// Sidecar inbound mTLS listener (what the controller advertises).
    pub const SIDECAR_INBOUND: u16 = 15006;
    /// Sidecar transparent outbound listener (redirect target).
    pub const SIDECAR_OUTBOUND: u16 = 15001;
    /// Sidecar admin.
    pub const SIDECAR_ADMIN: u16 = 15020;
}

/// UID the sidecar runs as: the redirect rules exempt its own traffic.
pub const PROXY_UID: i64 = 1337;
