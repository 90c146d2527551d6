//! The smallest stub resolver: one question over UDP to one server, for
//! the demo and the e2e rig's probes (applications use their own
//! resolver; the controller never resolves anything).

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use hickory_proto::op::{Message, Query, ResponseCode};
/// The question's type (A, AAAA, ...).
pub use hickory_proto::rr::RecordType;
use hickory_proto::rr::{Name, RData};

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LookupError {
    #[error("{0:?} is not a DNS name")]
    BadName(String),
    #[error("{host}: no answer from {server} after {tries} tries")]
    NoAnswer {
        host: String,
        server: SocketAddr,
        tries: u32,
    },
    #[error("{host}: {rcode}")]
    Rcode { host: String, rcode: ResponseCode },
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

/// The addresses (A and AAAA records) `server` gives for `host`, asking
/// over UDP up to `tries` times, `timeout` each. An empty answer is
/// `Ok(vec![])`; NXDOMAIN and other errors are [`LookupError::Rcode`].
pub async fn lookup(
    server: SocketAddr,
    host: &str,
    qtype: RecordType,
    timeout: Duration,
    tries: u32,
) -> Result<Vec<IpAddr>, LookupError> {
    let name = Name::from_ascii(host).map_err(|_| LookupError::BadName(host.to_owned()))?;
    let mut q = Message::new();
    q.set_id(rand::random())
        .set_recursion_desired(true)
        .add_query(Query::query(name, qtype));
    let bytes = q
        .to_vec()
        .map_err(|_| LookupError::BadName(host.to_owned()))?;
    let any: IpAddr = match server {
        SocketAddr::V4(_) => std::net::Ipv4Addr::UNSPECIFIED.into(),
        SocketAddr::V6(_) => std::net::Ipv6Addr::UNSPECIFIED.into(),
    };
    let sock = tokio::net::UdpSocket::bind(SocketAddr::new(any, 0)).await?;
    sock.connect(server).await?;
    let mut buf = vec![0u8; 65_535];
    for _ in 0..tries {
        sock.send(&bytes).await?;
        let deadline = tokio::time::Instant::now() + timeout;
        // Anything that is not the answer to this query is skipped.
        while let Ok(n) = tokio::time::timeout_at(deadline, sock.recv(&mut buf)).await {
            let Ok(r) = Message::from_vec(&buf[..n?]) else {
                continue;
            };
            if r.id() != q.id() {
                continue;
            }
            if r.response_code() != ResponseCode::NoError {
                return Err(LookupError::Rcode {
                    host: host.to_owned(),
                    rcode: r.response_code(),
                });
            }
            return Ok(r
                .answers()
                .iter()
                .filter_map(|a| match a.data() {
                    RData::A(a) => Some(IpAddr::V4(a.0)),
                    RData::AAAA(a) => Some(IpAddr::V6(a.0)),
                    _ => None,
                })
                .collect());
        }
    }
    Err(LookupError::NoAnswer {
        host: host.to_owned(),
        server,
        tries,
    })
}
