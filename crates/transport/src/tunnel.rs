use std::net::SocketAddr;
use std::time::Duration;

use fedmesh_trust::SpiffeId;
use fedmesh_wire::io::{read_header, read_status, write_header, write_status, ReadError};
use fedmesh_wire::{Header, Status, StatusCode};
use rustls::pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio::time::timeout;
use tokio_rustls::{TlsAcceptor, TlsConnector};

use crate::Limits;

pub type TlsClient = tokio_rustls::client::TlsStream<TcpStream>;
pub type TlsServer = tokio_rustls::server::TlsStream<TcpStream>;

/// SPIFFE authenticates by URI SAN; this name only fills the SNI slot.
const SNI: &str = "fedmesh.invalid";

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DialError {
    #[error("connect to {addr} timed out after {after:?}")]
    Timeout { addr: SocketAddr, after: Duration },
    #[error("connect to {addr}: {source}")]
    Connect {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("TLS handshake with {addr}: {source}")]
    Handshake {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("{addr} presented {got}, expected {expected}")]
    WrongPeer {
        addr: SocketAddr,
        got: String,
        expected: SpiffeId,
    },
}

/// TCP connect plus TLS handshake within `limit`, then checks that the
/// server is exactly `expected` before anything is sent.
pub async fn dial_tls(
    addr: SocketAddr,
    connector: &TlsConnector,
    expected: &SpiffeId,
    limit: Duration,
) -> Result<TlsClient, DialError> {
    let fut = async {
        let tcp = TcpStream::connect(addr)
            .await
            .map_err(|source| DialError::Connect { addr, source })?;
        let _ = tcp.set_nodelay(true);
        let name = ServerName::try_from(SNI).map_err(|e| DialError::Handshake {
            addr,
            source: std::io::Error::other(e),
        })?;
        connector
            .connect(name, tcp)
            .await
            .map_err(|source| DialError::Handshake { addr, source })
    };
    let tls = timeout(limit, fut)
        .await
        .map_err(|_| DialError::Timeout { addr, after: limit })??;
    let got = fedmesh_trust::peer_id(tls.get_ref().1.peer_certificates());
    expect_peer(got.as_ref(), expected).map_err(|got| DialError::WrongPeer {
        addr,
        got,
        expected: expected.clone(),
    })?;
    Ok(tls)
}

/// `Ok` when `got` is `expected`; otherwise what was seen, for the error.
pub fn expect_peer(got: Option<&SpiffeId>, expected: &SpiffeId) -> Result<(), String> {
    match got {
        Some(id) if id == expected => Ok(()),
        Some(id) => Err(id.to_string()),
        None => Err("no SPIFFE ID".into()),
    }
}

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AcceptError {
    #[error("TLS handshake timed out after {0:?}")]
    Timeout(Duration),
    #[error("TLS handshake: {0}")]
    Handshake(std::io::Error),
    #[error("client presented no SPIFFE ID")]
    NoIdentity,
}

impl AcceptError {
    /// A short reason label for metrics.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::Timeout(_) => "handshake_timeout",
            Self::Handshake(_) => "handshake_failed",
            Self::NoIdentity => "no_identity",
        }
    }
}

/// Server-side TLS handshake within `limit`; returns the verified client ID.
pub async fn accept_tls(
    acceptor: &TlsAcceptor,
    tcp: TcpStream,
    limit: Duration,
) -> Result<(TlsServer, SpiffeId), AcceptError> {
    let _ = tcp.set_nodelay(true);
    let tls = timeout(limit, acceptor.accept(tcp))
        .await
        .map_err(|_| AcceptError::Timeout(limit))?
        .map_err(AcceptError::Handshake)?;
    let id = fedmesh_trust::peer_id(tls.get_ref().1.peer_certificates())
        .ok_or(AcceptError::NoIdentity)?;
    Ok((tls, id))
}

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum OpenError {
    #[error("sending header: {0}")]
    Write(std::io::Error),
    #[error("no status within {0:?}")]
    Timeout(Duration),
    #[error("reading status: {0}")]
    Read(ReadError),
    #[error("refused: {0}")]
    Refused(Status),
}

impl OpenError {
    /// The status to pass back when every attempt failed this way.
    pub fn status(&self) -> StatusCode {
        match self {
            Self::Refused(s) => s.code,
            Self::Timeout(_) => StatusCode::Timeout,
            _ => StatusCode::UpstreamRefused,
        }
    }

    /// Whether the next hop may do better. Transport failures are always
    /// worth another hop: no payload has been sent.
    pub fn retryable(&self) -> bool {
        match self {
            Self::Refused(s) => s.code.is_retryable_elsewhere(),
            _ => true,
        }
    }
}

/// Sends `header` on a fresh stream and waits for the status frame.
pub async fn open<S: AsyncRead + AsyncWrite + Unpin>(
    stream: &mut S,
    header: &Header,
    limits: &Limits,
) -> Result<(), OpenError> {
    write_header(stream, header, &limits.wire())
        .await
        .map_err(OpenError::Write)?;
    let status = timeout(limits.status_timeout, read_status(stream))
        .await
        .map_err(|_| OpenError::Timeout(limits.status_timeout))?
        .map_err(OpenError::Read)?;
    if status.is_ok() {
        Ok(())
    } else {
        Err(OpenError::Refused(status))
    }
}

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RequestError {
    #[error("no header within {0:?}")]
    Timeout(Duration),
    #[error("stream closed before a header")]
    Closed,
    #[error("{0}")]
    Bad(ReadError),
}

impl RequestError {
    /// The status that answers a stream whose header failed this way.
    pub fn status(&self) -> StatusCode {
        match self {
            Self::Timeout(_) => StatusCode::Timeout,
            _ => StatusCode::BadHeader,
        }
    }

    pub fn reason(&self) -> &'static str {
        match self {
            Self::Timeout(_) => "header_timeout",
            Self::Closed => "closed_before_header",
            Self::Bad(_) => "bad_header",
        }
    }
}

/// Reads the header of an accepted stream within the header timeout.
pub async fn read_request<R: AsyncRead + Unpin>(
    r: &mut R,
    limits: &Limits,
) -> Result<Header, RequestError> {
    match timeout(limits.header_timeout, read_header(r, &limits.wire())).await {
        Err(_) => Err(RequestError::Timeout(limits.header_timeout)),
        Ok(Err(ReadError::Closed)) => Err(RequestError::Closed),
        Ok(Err(e)) => Err(RequestError::Bad(e)),
        Ok(Ok(h)) => Ok(h),
    }
}

/// Refuses a header that has taken too many hops (a routing loop).
pub fn check_hops(h: &Header) -> Result<(), String> {
    if h.hops >= fedmesh_wire::MAX_HOPS {
        Err(format!(
            "hop count {} reached the limit {}",
            h.hops,
            fedmesh_wire::MAX_HOPS
        ))
    } else {
        Ok(())
    }
}

/// Writes a status frame; errors are only logged since the stream is
/// being answered or closed either way.
pub async fn answer<W: AsyncWrite + Unpin>(w: &mut W, status: &Status) -> bool {
    match write_status(w, status).await {
        Ok(()) => true,
        Err(e) => {
            tracing::debug!(error = %e, %status, "could not send status");
            false
        }
    }
}

/// Copies both ways until both sides have closed; returns bytes (a→b, b→a).
/// A half-close on one side is passed on, so request/response protocols
/// that shut down their write side still get their answer. When either
/// side fails (reset, cut, lost), both are cut: each far end sees a reset,
/// not an end of stream ([`crate::Cut`]).
pub async fn splice<A, B>(a: &mut A, b: &mut B, buffer: usize) -> std::io::Result<(u64, u64)>
where
    A: AsyncRead + AsyncWrite + Unpin + crate::Cut + ?Sized,
    B: AsyncRead + AsyncWrite + Unpin + crate::Cut + ?Sized,
{
    let r = tokio::io::copy_bidirectional_with_sizes(a, b, buffer, buffer).await;
    if r.is_err() {
        a.cut();
        b.cut();
    }
    r
}

/// Why no next hop took a stream: the status to answer with, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub code: StatusCode,
    pub message: String,
}

impl Refusal {
    pub fn new(code: StatusCode, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
        }
    }

    /// Whether another hop could do better (a denial or a loop would not).
    pub fn retryable(&self) -> bool {
        self.code.is_retryable_elsewhere()
    }
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.code, self.message)
    }
}

/// Tries each `(address, identity)` in order, at most `limits.max_attempts`:
/// dial with mTLS, check the identity, send `header`, await the status.
/// Moves on after a transport failure or a retryable status (no payload has
/// been sent yet); stops at a final one. Returns the open stream and the
/// address that took it.
pub async fn connect_first<I>(
    targets: I,
    connector: &TlsConnector,
    header: &Header,
    limits: &Limits,
) -> Result<(TlsClient, SocketAddr), Refusal>
where
    I: IntoIterator<Item = (SocketAddr, SpiffeId)>,
{
    let mut last = Refusal::new(StatusCode::NoHealthyEndpoint, "no endpoint to try");
    for (addr, identity) in targets.into_iter().take(limits.max_attempts) {
        match connect_one(addr, &identity, connector, header, limits).await {
            Ok(tls) => return Ok((tls, addr)),
            Err(r) if r.retryable() => {
                tracing::debug!(code = %r.code, reason = %fedmesh_wire::bounded(&r.message), "next hop failed; trying the next");
                last = r;
            }
            Err(r) => return Err(r),
        }
    }
    Err(last)
}

/// Dials one hop and opens a tunnel stream on it: the stream, or why not.
/// A refusal another hop might not give is retryable (see
/// [`Refusal::retryable`]); nothing of the payload has been sent either way.
pub async fn connect_one(
    addr: SocketAddr,
    identity: &SpiffeId,
    connector: &TlsConnector,
    header: &Header,
    limits: &Limits,
) -> Result<TlsClient, Refusal> {
    let mut tls = dial_tls(addr, connector, identity, limits.connect_timeout)
        .await
        .map_err(|e| Refusal::new(StatusCode::UpstreamRefused, format!("{addr}: {e}")))?;
    match open(&mut tls, header, limits).await {
        Ok(()) => Ok(tls),
        Err(e) => Err(Refusal::new(e.status(), format!("{addr}: {e}"))),
    }
}
