//! Payload as the owned chunks a carrier already holds it in.
//!
//! An HTTP/2 stream receives its payload as `Bytes` (DATA frames cut from
//! the TLS plaintext) and can send `Bytes` it is handed without copying
//! them; a QUIC stream does both too. Through `AsyncRead`/`AsyncWrite`
//! every byte is copied once more on the way between the two. The
//! gateway's QUIC splice asks the carrier for its chunks first
//! ([`Chunked`]) and falls back to reading and writing slices when it has
//! none (a TLS connection of its own, a plain TCP connection); the
//! sidecars' splice and the TCP fallback's still copy.

use std::io;
use std::task::{Context, Poll};

use bytes::{Buf, Bytes};

/// A carrier that may hand over and take payload as owned chunks.
pub trait Chunked {
    /// The next chunk received, without a copy; an empty chunk at the end
    /// of the stream. `None`: this carrier has no chunks of its own, read
    /// it with `AsyncRead`.
    fn poll_read_chunk(&mut self, cx: &mut Context<'_>) -> Option<Poll<io::Result<Bytes>>> {
        let _ = cx;
        None
    }

    /// Sends from the front of `chunks` as one write, without copying what
    /// it sends (it keeps references to the chunks' memory); the bytes
    /// taken, which may end inside a chunk. `None`: write with
    /// `AsyncWrite`.
    fn poll_write_chunks(
        &mut self,
        cx: &mut Context<'_>,
        chunks: &[Bytes],
    ) -> Option<Poll<io::Result<usize>>> {
        let _ = (cx, chunks);
        None
    }
}

impl Chunked for tokio::net::TcpStream {}
impl<IO> Chunked for tokio_rustls::client::TlsStream<IO> {}
impl<IO> Chunked for tokio_rustls::server::TlsStream<IO> {}

impl<T: Chunked + ?Sized> Chunked for Box<T> {
    fn poll_read_chunk(&mut self, cx: &mut Context<'_>) -> Option<Poll<io::Result<Bytes>>> {
        (**self).poll_read_chunk(cx)
    }

    fn poll_write_chunks(
        &mut self,
        cx: &mut Context<'_>,
        chunks: &[Bytes],
    ) -> Option<Poll<io::Result<usize>>> {
        (**self).poll_write_chunks(cx, chunks)
    }
}

/// What an HTTP/2 tunnel connection sends as one DATA frame's payload:
/// one buffer, or several chunks written out together (vectored) without
/// first being copied into one.
#[derive(Debug, Default)]
pub struct SendBuf {
    chunks: Vec<Bytes>,
    /// Chunks before this one are sent.
    at: usize,
    left: usize,
}

impl SendBuf {
    /// The first `limit` bytes of `chunks` (references, not copies).
    pub fn from_chunks(chunks: &[Bytes], limit: usize) -> SendBuf {
        let mut out = Vec::with_capacity(chunks.len());
        let mut left = 0;
        for c in chunks.iter().filter(|c| !c.is_empty()) {
            if left == limit {
                break;
            }
            let take = (limit - left).min(c.len());
            out.push(c.slice(..take));
            left += take;
        }
        SendBuf {
            chunks: out,
            at: 0,
            left,
        }
    }
}

impl From<Bytes> for SendBuf {
    fn from(b: Bytes) -> SendBuf {
        let left = b.len();
        SendBuf {
            chunks: if left == 0 { Vec::new() } else { vec![b] },
            at: 0,
            left,
        }
    }
}

impl Buf for SendBuf {
    fn remaining(&self) -> usize {
        self.left
    }

    fn chunk(&self) -> &[u8] {
        self.chunks.get(self.at).map_or(&[], |c| c.as_ref())
    }

    fn advance(&mut self, mut n: usize) {
        assert!(n <= self.left, "advance past the end of a SendBuf");
        self.left -= n;
        while n > 0 {
            let Some(c) = self.chunks.get_mut(self.at) else {
                return;
            };
            if n < c.len() {
                c.advance(n);
                return;
            }
            n -= c.len();
            // Sent: its memory may go now, not with the whole frame.
            *c = Bytes::new();
            self.at += 1;
        }
        while self.chunks.get(self.at).is_some_and(|c| c.is_empty()) {
            self.at += 1;
        }
    }

    fn chunks_vectored<'a>(&'a self, dst: &mut [io::IoSlice<'a>]) -> usize {
        let mut n = 0;
        for (slot, c) in dst.iter_mut().zip(self.chunks.iter().skip(self.at)) {
            *slot = io::IoSlice::new(c);
            n += 1;
        }
        n
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chunks() -> Vec<Bytes> {
        vec![
            Bytes::from_static(b"abc"),
            Bytes::new(),
            Bytes::from_static(b"defg"),
            Bytes::from_static(b"hi"),
        ]
    }

    #[test]
    fn a_sendbuf_yields_its_chunks_in_order_up_to_the_limit() {
        for limit in 0..=10 {
            let mut b = SendBuf::from_chunks(&chunks(), limit);
            let want = &b"abcdefghi"[..limit.min(9)];
            assert_eq!(b.remaining(), want.len());
            let mut got = Vec::new();
            while b.has_remaining() {
                let c = b.chunk().to_vec();
                assert!(!c.is_empty());
                // Advance in uneven steps, across chunk edges.
                let step = c.len().min(2);
                got.extend_from_slice(&c[..step]);
                b.advance(step);
            }
            assert_eq!(got, want, "limit {limit}");
        }
    }

    #[test]
    fn vectored_chunks_cover_what_remains() {
        let mut b = SendBuf::from_chunks(&chunks(), 8);
        b.advance(4);
        let mut io = [io::IoSlice::new(&[]); 8];
        let n = b.chunks_vectored(&mut io);
        let joined: Vec<u8> = io[..n].iter().flat_map(|s| s.iter().copied()).collect();
        assert_eq!(joined, b"efgh");
        let one = SendBuf::from(Bytes::from_static(b"xyz"));
        assert_eq!(one.chunk(), b"xyz");
        assert_eq!(SendBuf::from(Bytes::new()).remaining(), 0);
    }
}
