//! The fedmesh tunnel preface: a [`Header`] that opens every tunnel stream
//! and the [`Status`] frame that answers it before any payload flows.
//!
//! The codec is pure (bytes in, values or typed errors out) so it can be
//! property-tested and fuzzed; the `io` feature adds thin async read/write
//! helpers over tokio. The byte layout is specified in `docs/wire.md`.
#![forbid(unsafe_code)]

mod header;
mod name;
mod status;

#[cfg(feature = "io")]
pub mod io;

pub use header::{DecodeError, Header, Limits, Target, Traceparent, MAX_HOPS};
pub use name::{check_label, NameError, ServiceName};
pub use status::{bounded, Status, StatusCode, MAX_LOGGED, MAX_STATUS_MESSAGE};

/// Size of the fixed prefix of both frames: magic (4), version (1),
/// flags or code (1), length (2).
pub const PREFIX_LEN: usize = 8;
/// Protocol version spoken by this crate; ALPN names it too.
pub const VERSION: u8 = 1;
/// The fixed prefix at the start of `buf`, or how many bytes are missing.
pub(crate) fn split_prefix(buf: &[u8]) -> Result<&[u8; PREFIX_LEN], DecodeError> {
    buf.get(..PREFIX_LEN)
        .and_then(|p| p.try_into().ok())
        .ok_or(DecodeError::Incomplete {
            needed: PREFIX_LEN.saturating_sub(buf.len()),
        })
}

/// ALPN protocol id for tunnel connections (QUIC and TLS/TCP).
pub const ALPN: &[u8] = b"fedmesh/1";
/// ALPN protocol id for tunnel streams multiplexed over HTTP/2 on TLS/TCP:
/// one `CONNECT` stream per tunneled connection, each carrying exactly
/// what a [`ALPN`] connection carries (the gateways' TCP fallback, and a
/// sidecar's pooled connections to its gateway).
pub const ALPN_H2: &[u8] = b"fedmesh-h2/1";
