//! Ending a spliced connection so that its far end sees a reset, never a
//! clean end of stream.
//!
//! When a tunneled connection fails in the middle (its peer is gone, one
//! side was reset, a transport under it was lost), the applications at
//! both ends must learn that their byte stream was cut: a clean end of
//! stream would make a truncated transfer look complete. Each hop passes
//! the cut on in its own terms: a TCP reset (RST, from closing with a zero
//! linger), a QUIC stream reset and stop-sending, an HTTP/2 stream reset.
//! The next hop reads that as an error, and cuts its own side in turn.

use tokio::net::TcpStream;

/// A connection that can be cut.
pub trait Cut {
    /// Marks the connection so that closing it (dropping it) tells the
    /// far end it was cut. Nothing may be shut down cleanly afterwards.
    fn cut(&mut self);
    /// Whether [`Cut::cut`] was called.
    fn is_cut(&self) -> bool;
}

impl Cut for TcpStream {
    fn cut(&mut self) {
        // With a zero linger, close() discards unsent data and sends RST.
        if let Err(e) = self.set_zero_linger() {
            tracing::debug!(error = %e, "could not set a zero linger; the close will be a FIN");
        }
    }

    fn is_cut(&self) -> bool {
        matches!(self.linger(), Ok(Some(d)) if d.is_zero())
    }
}

impl<IO: Cut> Cut for tokio_rustls::client::TlsStream<IO> {
    fn cut(&mut self) {
        // No close_notify: the TCP reset under it is the message.
        self.get_mut().0.cut();
    }

    fn is_cut(&self) -> bool {
        self.get_ref().0.is_cut()
    }
}

impl<IO: Cut> Cut for tokio_rustls::server::TlsStream<IO> {
    fn cut(&mut self) {
        self.get_mut().0.cut();
    }

    fn is_cut(&self) -> bool {
        self.get_ref().0.is_cut()
    }
}

impl<T: Cut + ?Sized> Cut for &mut T {
    fn cut(&mut self) {
        (**self).cut();
    }

    fn is_cut(&self) -> bool {
        (**self).is_cut()
    }
}

impl<T: Cut + ?Sized> Cut for Box<T> {
    fn cut(&mut self) {
        (**self).cut();
    }

    fn is_cut(&self) -> bool {
        (**self).is_cut()
    }
}

/// A tunnel stream of any carrier (its own TLS connection, a pooled
/// HTTP/2 stream), as the splice takes it.
pub trait TunnelIo:
    tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + Cut + crate::Chunked
{
}
impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + Cut + crate::Chunked> TunnelIo
    for T
{
}

/// How long [`close`] waits for the far end to finish after this end
/// did, and how much it reads meanwhile.
const LINGER: std::time::Duration = std::time::Duration::from_secs(1);
const LINGER_BYTES: usize = 64 * 1024;

/// Ends the write side cleanly (TLS `close_notify` and FIN, HTTP/2
/// `END_STREAM`) unless the connection was cut, in which case dropping it
/// is what ends it; then waits (bounded) for the far end to finish too.
/// The wait matters on a multiplexed stream: dropping an HTTP/2 stream the
/// peer has not finished resets it, and a reset discards what was still
/// queued, such as the status frame that just refused it.
pub async fn close<S>(s: &mut S)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Cut + ?Sized,
{
    use tokio::io::AsyncReadExt;
    if s.is_cut() {
        return;
    }
    let _ = tokio::io::AsyncWriteExt::shutdown(s).await;
    let drain = async {
        let mut buf = [0u8; 4096];
        let mut read = 0;
        while read < LINGER_BYTES {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => read += n,
            }
        }
    };
    let _ = tokio::time::timeout(LINGER, drain).await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    async fn pair() -> (TcpStream, TcpStream) {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let a = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
        let (b, _) = l.accept().await.unwrap();
        (a, b)
    }

    #[tokio::test]
    async fn a_cut_connection_is_read_as_a_reset_and_a_closed_one_as_the_end() {
        let (mut a, mut b) = pair().await;
        a.write_all(b"x").await.unwrap();
        let mut one = [0u8; 1];
        b.read_exact(&mut one).await.unwrap();
        assert!(!a.is_cut());
        a.cut();
        assert!(a.is_cut());
        close(&mut a).await; // a no-op once cut
        drop(a);
        let e = b.read(&mut one).await.unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::ConnectionReset);

        let (mut a, mut b) = pair().await;
        close(&mut a).await;
        drop(a);
        assert_eq!(b.read(&mut one).await.unwrap(), 0);
    }
}
