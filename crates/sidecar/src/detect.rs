//! Outbound protocol detection: is an app connection HTTP/1.x, HTTP/2
//! (prior knowledge) or something else? The decision is pure
//! ([`classify`]); [`detect`] reads the first bytes under a deadline and
//! [`Rewind`] gives them back to whichever path takes the connection, so
//! nothing the app sent is lost.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    Http1,
    Http2,
    /// Not HTTP, or the app did not speak first in time: bytes are spliced.
    Opaque,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Detected {
    Is(Protocol),
    NeedMore,
}

pub const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Longest method token looked at; real ones are at most 7 bytes
/// (`OPTIONS`), extension methods rarely longer.
const MAX_METHOD: usize = 24;

/// Classifies the first bytes of a connection. `max_line` bounds how much
/// is read looking for the end of an HTTP/1 request line.
pub fn classify(buf: &[u8], max_line: usize) -> Detected {
    if buf.is_empty() {
        return Detected::NeedMore;
    }
    let n = buf.len().min(H2_PREFACE.len());
    if buf[..n] == H2_PREFACE[..n] {
        return if n == H2_PREFACE.len() {
            Detected::Is(Protocol::Http2)
        } else {
            Detected::NeedMore
        };
    }
    // `METHOD SP request-target SP HTTP/1.x CRLF`: give up at the first
    // byte that cannot be part of it.
    let method_len = buf.iter().take_while(|b| is_tchar(**b)).count();
    if method_len == buf.len() {
        return if method_len <= MAX_METHOD {
            Detected::NeedMore
        } else {
            Detected::Is(Protocol::Opaque)
        };
    }
    if method_len == 0 || method_len > MAX_METHOD || buf[method_len] != b' ' {
        return Detected::Is(Protocol::Opaque);
    }
    let Some(end) = buf.iter().position(|b| *b == b'\n') else {
        let line_ok = buf[method_len..]
            .iter()
            .all(|b| b.is_ascii_graphic() || *b == b' ' || *b == b'\r');
        return if buf.len() < max_line && line_ok {
            Detected::NeedMore
        } else {
            Detected::Is(Protocol::Opaque)
        };
    };
    let line = buf[..end].strip_suffix(b"\r").unwrap_or(&buf[..end]);
    if line.ends_with(b" HTTP/1.1") || line.ends_with(b" HTTP/1.0") {
        Detected::Is(Protocol::Http1)
    } else {
        Detected::Is(Protocol::Opaque)
    }
}

fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

/// Reads from `io` until [`classify`] decides, the app stops sending for
/// `timeout` (server-speaks-first protocols land here: opaque), or it
/// closes. Everything read is in `buf`.
pub async fn detect<S: AsyncRead + Unpin>(
    io: &mut S,
    buf: &mut BytesMut,
    max_line: usize,
    timeout: Duration,
) -> io::Result<Protocol> {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if let Detected::Is(p) = classify(buf, max_line) {
            return Ok(p);
        }
        buf.reserve(1024);
        match tokio::time::timeout_at(deadline, io.read_buf(buf)).await {
            Err(_) | Ok(Ok(0)) => return Ok(Protocol::Opaque),
            Ok(Ok(_)) => {}
            Ok(Err(e)) => return Err(e),
        }
    }
}

/// A stream that first yields bytes already read from it.
pub struct Rewind<S> {
    pre: BytesMut,
    inner: S,
}

impl<S> Rewind<S> {
    pub fn new(pre: BytesMut, inner: S) -> Self {
        Self { pre, inner }
    }
}

impl<S: fedmesh_transport::Cut> fedmesh_transport::Cut for Rewind<S> {
    fn cut(&mut self) {
        self.inner.cut();
    }

    fn is_cut(&self) -> bool {
        self.inner.is_cut()
    }
}

/// Read through `AsyncRead`: the bytes already read come first.
impl<S> fedmesh_transport::Chunked for Rewind<S> {}

impl<S: AsyncRead + Unpin> AsyncRead for Rewind<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        out: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if !self.pre.is_empty() {
            let n = self.pre.len().min(out.remaining());
            out.put_slice(&self.pre[..n]);
            self.pre.advance(n);
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.inner).poll_read(cx, out)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Rewind<S> {
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

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;

    fn c(b: &[u8]) -> Detected {
        classify(b, 64)
    }

    #[test]
    fn classifies_first_bytes() {
        use Detected::*;
        use Protocol::*;
        assert_eq!(c(b"GET / HTTP/1.1\r\nHost: x\r\n"), Is(Http1));
        assert_eq!(c(b"POST /a?b=c HTTP/1.0\n"), Is(Http1));
        assert_eq!(c(H2_PREFACE), Is(Http2));
        assert_eq!(c(&H2_PREFACE[..10]), NeedMore);
        assert_eq!(c(b"GET / HT"), NeedMore);
        assert_eq!(c(b"GE"), NeedMore);
        assert_eq!(c(b""), NeedMore);
        // Not HTTP: binary, a banner-less echo payload, TLS, a missing version.
        assert_eq!(c(b"\x16\x03\x01\x02\x00"), Is(Opaque));
        assert_eq!(c(b"hello\n"), Is(Opaque));
        assert_eq!(c(b"GET /\r\n"), Is(Opaque));
        assert_eq!(c(b"GET / HTTP/2.0\r\n"), Is(Opaque));
        assert_eq!(c(b"GET /\x00"), Is(Opaque));
        assert_eq!(c(b" GET"), Is(Opaque));
        // A request line longer than the bound is not waited for.
        let mut long = b"GET /".to_vec();
        long.extend(std::iter::repeat_n(b'a', 100));
        assert_eq!(c(&long), Is(Opaque));
        assert_eq!(c(&[b'A'; 30]), Is(Opaque));
    }

    #[test]
    fn any_split_of_a_request_decides_the_same() {
        let req = b"OPTIONS * HTTP/1.1\r\n\r\n";
        for i in 1..req.len() {
            let d = c(&req[..i]);
            let want = if i >= 20 {
                Detected::Is(Protocol::Http1)
            } else {
                Detected::NeedMore
            };
            assert_eq!(d, want, "after {i} bytes");
        }
    }

    #[tokio::test]
    async fn detect_times_out_to_opaque_and_rewinds_everything() {
        let (mut a, mut b) = tokio::io::duplex(1024);
        a.write_all(b"GET / HT").await.unwrap();
        let mut buf = BytesMut::new();
        let p = detect(&mut b, &mut buf, 8192, Duration::from_millis(50))
            .await
            .unwrap();
        assert_eq!(p, Protocol::Opaque, "a silent app is not waited for");
        a.write_all(b"rest").await.unwrap();
        drop(a);
        let mut r = Rewind::new(buf, b);
        let mut all = Vec::new();
        r.read_to_end(&mut all).await.unwrap();
        assert_eq!(all, b"GET / HTrest");
    }
}
