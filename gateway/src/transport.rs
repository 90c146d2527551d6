//! How a peer gateway is reached: a plain value both the pool and the
//! metrics name, so neither depends on the other for it.

/// QUIC, or the HTTP/2-over-TLS fallback on TCP.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    Quic,
    Tcp,
}

impl Transport {
    /// The `transport` label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Quic => "quic",
            Self::Tcp => "tcp",
        }
    }
}
