//! Tunnel I/O shared by the gateway and the sidecar: mTLS dial and accept
//! with SPIFFE identity checks, opening a tunnel (header out, status back)
//! and answering one, splicing bytes, the named limits every listener
//! enforces, and the admin endpoint that serves `/metrics`.
#![forbid(unsafe_code)]

pub mod admin;
mod identity;
mod limits;
mod tunnel;

pub use identity::{load_trust, BundleFile, IdentityFiles};
pub use limits::Limits;
pub use tunnel::{
    accept_tls, answer, check_hops, connect_first, dial_tls, expect_peer, open, read_request,
    splice, AcceptError, DialError, OpenError, Refusal, RequestError, TlsClient, TlsServer,
};
