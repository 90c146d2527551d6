use std::time::Duration;

use serde::{Deserialize, Serialize};

/// The bounds every fedmesh listener enforces, named in config.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Limits {
    /// Largest tunnel header accepted.
    pub max_header_bytes: usize,
    /// How long a new stream may take to send its header.
    #[serde(with = "humantime_serde")]
    pub header_timeout: Duration,
    /// TCP connect + TLS handshake to the next hop.
    #[serde(with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// How long the next hop may take to answer with a status frame.
    #[serde(with = "humantime_serde")]
    pub status_timeout: Duration,
    /// TLS handshake of an accepted connection.
    #[serde(with = "humantime_serde")]
    pub handshake_timeout: Duration,
    /// Concurrent accepted TCP connections per listener.
    pub max_connections: usize,
    /// Concurrent tunnel streams per QUIC connection (the peer's cap).
    pub max_streams_per_connection: u32,
    /// QUIC keep-alive interval: a few per idle timeout, so one lost
    /// packet does not look like a dead peer.
    #[serde(with = "humantime_serde")]
    pub keep_alive: Duration,
    /// QUIC idle timeout: a peer silent this long is gone, its streams
    /// fail and its cluster is failed over. Raise it on lossy long paths.
    #[serde(with = "humantime_serde")]
    pub idle_timeout: Duration,
    /// Next hops tried for one stream before giving up.
    pub max_attempts: usize,
    /// Buffer size per direction when splicing bytes.
    pub splice_buffer_bytes: usize,
    /// Largest UDP payload QUIC path-MTU discovery may probe up to, and
    /// the largest a gateway accepts (its `max_udp_payload_size` transport
    /// parameter, which bounds the peer's discovery). 1452 fits any
    /// Ethernet path; 8952 suits jumbo-frame networks and loopback.
    /// Discovery only ever uses what the path proves it carries.
    pub quic_max_udp_payload: u16,
    /// While a peer is reached over the TCP fallback because UDP did not
    /// get through, one QUIC handshake is tried this often; when one
    /// succeeds, new streams move back to QUIC.
    #[serde(with = "humantime_serde")]
    pub quic_retry_interval: Duration,
    /// Send and receive buffer asked for on the gateway's UDP socket. The
    /// kernel caps it at `net.core.{r,w}mem_max` (the gateway logs what
    /// it got); too small a receive buffer drops bursts of datagrams that
    /// QUIC then has to retransmit.
    pub quic_socket_buffer_bytes: usize,
    /// Pooled connections a sidecar keeps to its gateway (mTLS, HTTP/2,
    /// one stream per tunneled connection). 0: no pooling, one connection
    /// and handshake per tunneled connection.
    pub pool_connections: usize,
    /// Tunneled connections one pooled connection carries at once; past
    /// every connection's cap a new one waits up to `status_timeout`.
    pub pool_streams_per_connection: u32,
    /// A pooled connection with no stream for this long is closed.
    #[serde(with = "humantime_serde")]
    pub pool_idle_timeout: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_header_bytes: 16 * 1024,
            header_timeout: Duration::from_secs(5),
            connect_timeout: Duration::from_secs(2),
            status_timeout: Duration::from_secs(5),
            handshake_timeout: Duration::from_secs(5),
            max_connections: 10_000,
            max_streams_per_connection: 1_024,
            keep_alive: Duration::from_millis(200),
            idle_timeout: Duration::from_secs(1),
            max_attempts: 4,
            splice_buffer_bytes: 64 * 1024,
            quic_max_udp_payload: 8952,
            quic_retry_interval: Duration::from_secs(10),
            quic_socket_buffer_bytes: 4 << 20,
            pool_connections: 4,
            pool_streams_per_connection: 256,
            pool_idle_timeout: Duration::from_secs(90),
        }
    }
}

impl Limits {
    /// When a dialed peer gateway that sent nothing counts as dead: three
    /// missed keep-alives, and never later than the idle timeout.
    pub fn peer_dead_after(&self) -> Duration {
        (self.keep_alive * 3).min(self.idle_timeout)
    }

    /// How long an HTTP/2 ping may go unanswered before the connection
    /// counts as dead: three times [`Limits::peer_dead_after`]. A PING
    /// queued behind a full TCP send buffer on a slow or lossy path
    /// (retransmission timeouts start at 200 ms and double) can take longer
    /// than QUIC's silence bound to be answered, and a false "dead" fails
    /// every stream on the connection.
    pub fn h2_dead_after(&self) -> Duration {
        self.peer_dead_after() * 3
    }

    pub fn wire(&self) -> fedmesh_wire::Limits {
        fedmesh_wire::Limits {
            max_header_bytes: self.max_header_bytes,
        }
    }

    /// Every problem with these limits, for the caller's config report.
    pub fn problems(&self) -> Vec<String> {
        let mut v = Vec::new();
        if self.max_header_bytes < 64 || self.max_header_bytes > 65_535 + fedmesh_wire::PREFIX_LEN {
            v.push(format!(
                "limits.max_header_bytes {} must be within 64..=65543",
                self.max_header_bytes
            ));
        }
        for (name, d) in [
            ("header_timeout", self.header_timeout),
            ("connect_timeout", self.connect_timeout),
            ("status_timeout", self.status_timeout),
            ("handshake_timeout", self.handshake_timeout),
            ("keep_alive", self.keep_alive),
            ("idle_timeout", self.idle_timeout),
            ("quic_retry_interval", self.quic_retry_interval),
            ("pool_idle_timeout", self.pool_idle_timeout),
        ] {
            if d.is_zero() {
                v.push(format!("limits.{name} must be more than zero"));
            }
        }
        if self.keep_alive >= self.idle_timeout {
            v.push("limits.keep_alive must be shorter than limits.idle_timeout".into());
        }
        if self.max_connections == 0 {
            v.push("limits.max_connections must be at least 1".into());
        }
        if self.max_streams_per_connection == 0 {
            v.push("limits.max_streams_per_connection must be at least 1".into());
        }
        if self.max_attempts == 0 || self.max_attempts > 16 {
            v.push("limits.max_attempts must be within 1..=16".into());
        }
        if !(1200..=65527).contains(&self.quic_max_udp_payload) {
            v.push("limits.quic_max_udp_payload must be within 1200..=65527".into());
        }
        if self.quic_socket_buffer_bytes < 64 * 1024 || self.quic_socket_buffer_bytes > 256 << 20 {
            v.push("limits.quic_socket_buffer_bytes must be within 64KiB..=256MiB".into());
        }
        if self.pool_connections > 64 {
            v.push("limits.pool_connections must be within 0..=64".into());
        }
        if self.pool_streams_per_connection == 0
            || self.pool_streams_per_connection > self.max_streams_per_connection
        {
            v.push(
                "limits.pool_streams_per_connection must be within 1..=limits.max_streams_per_connection"
                    .into(),
            );
        }
        if self.splice_buffer_bytes < 1024 || self.splice_buffer_bytes > 16 << 20 {
            v.push("limits.splice_buffer_bytes must be within 1KiB..=16MiB".into());
        }
        v
    }
}
