//! The TCP fallback transport between peer gateways, for networks that drop
//! UDP: TLS over TCP (the same gateway SVIDs and SPIFFE checks as QUIC,
//! ALPN [`ALPN_H2`]) carrying HTTP/2, one `CONNECT` stream per tunneled
//! connection. The multiplexing, flow control and keep-alive pings are
//! hyper's (h2); this module owns only the connection setup on both sides
//! and turning a `CONNECT` into the byte stream the tunnel protocol runs
//! on, so a peer stream is served the same whichever transport carried it.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use fedmesh_catalog::Peer;
use fedmesh_transport::{H2Stream, Limits};
use h2::client::SendRequest;
use http::StatusCode;
use tokio::net::TcpSocket;
use tokio::sync::watch;
use tokio_rustls::TlsConnector;

/// ALPN of the fallback: fedmesh tunnel streams inside HTTP/2 `CONNECT`.
/// Distinct from the one-stream tunnel's `fedmesh/1`, so neither port can
/// be mistaken for the other.
pub const ALPN_H2: &[u8] = fedmesh_wire::ALPN_H2;
/// A tunneled byte stream over the fallback.
pub type TcpStream = H2Stream;

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TcpError {
    #[error("TCP connect to {addr}: {source}")]
    Connect {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("TLS handshake with {addr}: {source}")]
    Tls {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("timed out after {0:?}")]
    Timeout(Duration),
    #[error("peer presented {got}, expected {expected}")]
    WrongPeer { got: String, expected: String },
    #[error("HTTP/2: {0}")]
    Http(#[from] h2::Error),
    #[error("peer answered CONNECT with {0}")]
    Refused(StatusCode),
}

/// A live fallback connection to one peer gateway. Clones share it. When
/// the last clone is dropped the connection ends by itself once its open
/// streams have (h2 closes a client connection with no `SendRequest` left
/// after its last stream), which is how a move back to QUIC drains it.
#[derive(Clone)]
pub struct TcpConn {
    send: SendRequest<fedmesh_transport::SendBuf>,
    closed: watch::Receiver<bool>,
    task: tokio::task::AbortHandle,
}

impl TcpConn {
    pub fn is_open(&self) -> bool {
        !*self.closed.borrow()
    }

    /// Resolves once the connection has ended (either side, or pings went
    /// unanswered for `Limits::h2_dead_after`).
    pub async fn closed(&self) {
        let mut rx = self.closed.clone();
        let _ = rx.wait_for(|c| *c).await;
    }

    /// Ends the connection now, open streams included (the peer refused us,
    /// or we no longer want it).
    pub fn close(&self) {
        self.task.abort();
    }

    /// Opens one tunnel stream: a `CONNECT` the peer answers with 200, then
    /// bytes both ways. Waits while the peer's stream cap is reached; the
    /// caller bounds the wait.
    pub async fn open(&self) -> Result<TcpStream, TcpError> {
        fedmesh_transport::h2_open(&self.send)
            .await
            .map_err(|e| match e {
                fedmesh_transport::ConnectError::H2(e) => TcpError::Http(e),
                fedmesh_transport::ConnectError::Refused(s) => TcpError::Refused(s),
            })
    }
}

/// Dials `peer`'s fallback address, checks its SPIFFE ID and starts HTTP/2.
/// `from`: the address to dial from (the gateway's own, so that firewall
/// rules and partitions that name it apply to both transports).
pub async fn connect(
    peer: &Peer,
    addr: SocketAddr,
    from: Option<IpAddr>,
    tls: &TlsConnector,
    limits: &Limits,
) -> Result<TcpConn, TcpError> {
    let limit = limits.connect_timeout;
    let dial = async {
        let io_err = |source| TcpError::Connect { addr, source };
        let socket = if addr.is_ipv4() {
            TcpSocket::new_v4()
        } else {
            TcpSocket::new_v6()
        }
        .map_err(io_err)?;
        if let Some(ip) = from.filter(|ip| !ip.is_unspecified() && ip.is_ipv4() == addr.is_ipv4()) {
            socket.bind(SocketAddr::new(ip, 0)).map_err(io_err)?;
        }
        let tcp = socket.connect(addr).await.map_err(io_err)?;
        let _ = tcp.set_nodelay(true);
        let name = rustls::pki_types::ServerName::try_from("fedmesh.invalid")
            .map_err(|e| io_err(std::io::Error::other(e)))?;
        let mut stream = tls
            .connect(name, tcp)
            .await
            .map_err(|source| TcpError::Tls { addr, source })?;
        stream
            .get_mut()
            .1
            .set_buffer_limit(Some(fedmesh_transport::H2_TLS_BUFFER));
        let got = fedmesh_trust::peer_id(stream.get_ref().1.peer_certificates());
        if got.as_ref() != Some(&peer.identity) {
            return Err(TcpError::WrongPeer {
                got: got.map_or_else(|| "no SPIFFE ID".into(), |g| g.to_string()),
                expected: peer.identity.to_string(),
            });
        }
        let (send, mut conn) =
            fedmesh_transport::h2_client(limits, fedmesh_transport::H2Windows::wan(limits))
                .handshake::<_, fedmesh_transport::SendBuf>(stream)
                .await?;
        let pings = conn.ping_pong();
        let (tx, rx) = watch::channel(false);
        let cluster = peer.cluster.clone();
        let (interval, dead) = (limits.keep_alive, limits.h2_dead_after());
        let task = tokio::spawn(async move {
            tokio::select! {
                r = &mut conn => {
                    if let Err(e) = r {
                        tracing::info!(peer = %cluster, error = %e, "TCP fallback connection ended");
                    }
                }
                why = fedmesh_transport::h2_keep_alive(pings, interval, dead) => {
                    tracing::info!(peer = %cluster, reason = why, "TCP fallback connection ended");
                }
            }
            let _ = tx.send(true);
        });
        Ok(TcpConn {
            send,
            closed: rx,
            task: task.abort_handle(),
        })
    };
    tokio::time::timeout(limit, dial)
        .await
        .map_err(|_| TcpError::Timeout(limit))?
}

/// Serves one accepted fallback connection: after the TLS handshake (the
/// caller has checked the peer's identity) every `CONNECT` becomes a byte
/// stream handed to `stream`; any other request is answered 405.
pub async fn serve<F, Fut>(
    tls: tokio_rustls::server::TlsStream<tokio::net::TcpStream>,
    limits: &Limits,
    stream: F,
) -> Result<(), h2::Error>
where
    F: Fn(TcpStream) -> Fut + Clone + Send + Sync + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    fedmesh_transport::serve_h2(
        tls,
        limits,
        fedmesh_transport::H2Windows::wan(limits),
        stream,
    )
    .await
}
