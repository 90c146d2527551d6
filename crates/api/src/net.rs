//! gRPC over our own mutual TLS: the listener side hands tonic connections
//! whose TLS handshake already ran (with the caller's verified SPIFFE ID
//! attached to every request), and the dialing side gives tonic a
//! connector that does the handshake. tonic's own TLS is not used because
//! peers are authenticated by SPIFFE ID, not by DNS name.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use fedmesh_trust::SpiffeId;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};
use tokio_rustls::{TlsAcceptor, TlsConnector};
use tonic::transport::server::Connected;
use tonic::transport::{Channel, Endpoint};

/// Who is calling: attached by tonic to every request's extensions.
#[derive(Debug, Clone)]
pub struct PeerInfo {
    pub remote: SocketAddr,
    /// The verified SPIFFE ID, or `None` for a caller without a certificate
    /// (allowed only where the server's TLS config makes it optional).
    pub id: Option<SpiffeId>,
}

/// The caller of `req`, if the request came through [`incoming`].
pub fn peer<T>(req: &tonic::Request<T>) -> Option<&PeerInfo> {
    req.extensions().get::<PeerInfo>()
}

/// A server-side TLS connection that counts against the connection limit
/// for as long as it lives.
pub struct TlsConn {
    inner: tokio_rustls::server::TlsStream<TcpStream>,
    info: PeerInfo,
    _permit: OwnedSemaphorePermit,
}

impl Connected for TlsConn {
    type ConnectInfo = PeerInfo;
    fn connect_info(&self) -> PeerInfo {
        self.info.clone()
    }
}

impl AsyncRead for TlsConn {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for TlsConn {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

/// Accepts on `listener`, runs each TLS handshake in its own task (a slow
/// or silent client never delays the others) within `handshake_timeout`,
/// and yields finished connections. At most `max_connections` live at once;
/// one over that is closed at accept.
pub fn incoming(
    listener: TcpListener,
    acceptor: TlsAcceptor,
    max_connections: usize,
    handshake_timeout: Duration,
    on_reject: impl Fn(&'static str) + Send + Sync + 'static,
) -> tokio_stream::wrappers::ReceiverStream<io::Result<TlsConn>> {
    let (tx, rx) = mpsc::channel(16);
    let slots = Arc::new(Semaphore::new(max_connections));
    let on_reject = Arc::new(on_reject);
    tokio::spawn(async move {
        loop {
            // Stop (and free the port) as soon as the server is gone.
            let accepted = tokio::select! {
                a = listener.accept() => a,
                _ = tx.closed() => return,
            };
            let (tcp, remote) = match accepted {
                Ok(x) => x,
                Err(e) => {
                    tracing::warn!(error = %e, "control API accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let Ok(permit) = slots.clone().try_acquire_owned() else {
                tracing::warn!(%remote, max_connections, "control API connection over the limit; closing");
                on_reject("connection_limit");
                continue;
            };
            let _ = tcp.set_nodelay(true);
            if tx.is_closed() {
                return;
            }
            let (acceptor, tx, on_reject) = (acceptor.clone(), tx.clone(), on_reject.clone());
            tokio::spawn(async move {
                let tls = match tokio::time::timeout(handshake_timeout, acceptor.accept(tcp)).await
                {
                    Ok(Ok(tls)) => tls,
                    Ok(Err(e)) => {
                        tracing::info!(%remote, error = %e, "control API TLS handshake failed");
                        on_reject("handshake_failed");
                        return;
                    }
                    Err(_) => {
                        tracing::info!(%remote, "control API TLS handshake timed out");
                        on_reject("handshake_timeout");
                        return;
                    }
                };
                let id = fedmesh_trust::peer_id(tls.get_ref().1.peer_certificates());
                let conn = TlsConn {
                    inner: tls,
                    info: PeerInfo { remote, id },
                    _permit: permit,
                };
                let _ = tx.send(Ok(conn)).await;
            });
        }
    });
    tokio_stream::wrappers::ReceiverStream::new(rx)
}

/// A lazily connecting channel to `addr` over our TLS: connects at the
/// first call and reconnects after a failure by itself.
pub fn channel(
    addr: SocketAddr,
    tls: Arc<rustls::ClientConfig>,
    connect_timeout: Duration,
) -> Result<Channel, tonic::transport::Error> {
    let connector = TlsConnector::from(tls);
    let endpoint = Endpoint::from_shared(format!("http://{addr}"))?
        .connect_timeout(connect_timeout)
        .http2_keep_alive_interval(Duration::from_secs(10))
        .keep_alive_timeout(Duration::from_secs(10))
        .keep_alive_while_idle(true);
    Ok(
        endpoint.connect_with_connector_lazy(tower::service_fn(move |_uri| {
            let connector = connector.clone();
            async move {
                let tcp = TcpStream::connect(addr).await?;
                let _ = tcp.set_nodelay(true);
                // The SPIFFE verifier ignores the name; it checks the ID.
                let name = rustls::pki_types::ServerName::try_from("controller.fedmesh.invalid")
                    .map_err(io::Error::other)?;
                let tls = connector.connect(name, tcp).await?;
                Ok::<_, io::Error>(TokioIo::new(tls))
            }
        })),
    )
}
