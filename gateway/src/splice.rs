//! Tunnel stream payload between a local connection and a peer gateway.
//!
//! Over QUIC, chunks move into and out of quinn as `Bytes`
//! (`write_chunk`, `read_chunk`), so a byte is copied once in user space
//! per direction instead of twice as through `copy_bidirectional`'s buffer;
//! the TCP fallback's streams go through that buffer as before.

use std::io::{self, IoSlice};
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{Buf, Bytes, BytesMut};
use fedmesh_transport::{Chunked, Cut};
use quinn::{RecvStream, SendStream};
use std::sync::Mutex;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::pool::Lease;

/// Reads smaller than this would fragment chunks: refill the buffer first.
const MIN_READ: usize = 4096;
/// Received chunks taken per vectored write (each about one packet).
const CHUNKS: usize = 32;

/// A tunnel stream's I/O over the TCP fallback.
pub trait PeerIo: AsyncRead + AsyncWrite + Unpin + Send + Cut {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send + Cut> PeerIo for T {}

/// A tunnel stream to or from a peer gateway. QUIC streams stay typed so
/// their payload can be spliced chunk by chunk.
pub enum PeerStream {
    Quic {
        recv: RecvStream,
        send: SendStream,
        /// Holds the connection we opened it on until the stream ends.
        lease: Option<Lease>,
        /// Reset (see [`Cut`]).
        cut: bool,
    },
    Tcp {
        io: Box<dyn PeerIo>,
        /// Holds the connection we opened it on until the stream ends.
        lease: Option<Lease>,
        cut: bool,
    },
}

/// The stream reset and stop-sending code that says "the tunneled
/// connection was cut" (`docs/wire.md`).
pub const STREAM_CUT: u32 = 1;

impl Cut for PeerStream {
    fn cut(&mut self) {
        match self {
            Self::Quic {
                send, recv, cut, ..
            } => {
                // Both ways: the peer's reads fail with a reset, its
                // writes with stop-sending.
                let _ = send.reset(quinn::VarInt::from_u32(STREAM_CUT));
                let _ = recv.stop(quinn::VarInt::from_u32(STREAM_CUT));
                *cut = true;
            }
            // RST_STREAM with CONNECT_ERROR (`fedmesh_transport::H2Stream`).
            Self::Tcp { io, cut, .. } => {
                io.cut();
                *cut = true;
            }
        }
    }

    fn is_cut(&self) -> bool {
        match self {
            Self::Quic { cut, .. } | Self::Tcp { cut, .. } => *cut,
        }
    }
}

impl PeerStream {
    /// The connection under this stream failed: the pool closes it and
    /// reconnects (a stream the peer opened has nothing to report).
    pub fn failed(&self) {
        if let Self::Quic { lease: Some(l), .. } | Self::Tcp { lease: Some(l), .. } = self {
            l.failed();
        }
    }

    pub fn transport(&self) -> crate::transport::Transport {
        match self {
            Self::Quic { .. } => crate::transport::Transport::Quic,
            Self::Tcp { .. } => crate::transport::Transport::Tcp,
        }
    }

    /// Copies both ways until both sides are done, passing half-closes on;
    /// returns bytes (local → peer, peer → local). When either side fails,
    /// both are cut, so the far ends see a reset, not an end of stream.
    pub async fn splice<L>(&mut self, local: &mut L, chunk: usize) -> io::Result<(u64, u64)>
    where
        L: AsyncRead + AsyncWrite + Unpin + Cut + Chunked,
    {
        let r = match self {
            Self::Quic { recv, send, .. } => splice_quic(local, send, recv, chunk).await,
            Self::Tcp { io, .. } => {
                tokio::io::copy_bidirectional_with_sizes(local, io, chunk, chunk).await
            }
        };
        if r.is_err() {
            local.cut();
            self.cut();
        }
        r
    }
}

async fn splice_quic<L>(
    local: &mut L,
    send: &mut SendStream,
    recv: &mut RecvStream,
    chunk: usize,
) -> io::Result<(u64, u64)>
where
    L: AsyncRead + AsyncWrite + Unpin + Chunked,
{
    // Both directions are polled by this one task, each taking the lock
    // only inside a poll, so it is never contended; a lock rather than a
    // `RefCell` keeps the future `Send`.
    let local = Mutex::new(local);
    let to_peer = async {
        let mut buf = BytesMut::new();
        let mut total = 0u64;
        loop {
            let data = std::future::poll_fn(|cx| {
                let mut l = lock(&local);
                // An HTTP/2 leg hands its DATA frames over as they are.
                if let Some(p) = l.poll_read_chunk(cx) {
                    return p;
                }
                if buf.capacity() < MIN_READ {
                    buf.reserve(chunk.max(MIN_READ));
                }
                poll_read_ready(Pin::new(&mut **l), cx, &mut buf).map_ok(|_| buf.split().freeze())
            })
            .await?;
            if data.is_empty() {
                // Already reset or stopped by the peer: nothing to finish.
                let _ = send.finish();
                return Ok(total);
            }
            total += data.len() as u64;
            // Chunks read here share the buffer's allocation until it is
            // used up, so small reads pin at most one buffer beyond the
            // data in flight.
            send.write_chunk(data).await?;
        }
    };
    let from_peer = async {
        // quinn hands over the stream as it arrived, about a packet per
        // chunk: take every chunk ready and write them in one go, so the
        // TLS side still sends large records in one syscall (an HTTP/2
        // leg takes the chunks themselves as one DATA frame).
        let mut chunks: [Bytes; CHUNKS] = Default::default();
        let mut total = 0u64;
        while let Some(n) = recv.read_chunks(&mut chunks).await? {
            let mut ready = &mut chunks[..n];
            total += ready.iter().map(|b| b.len() as u64).sum::<u64>();
            while !ready.is_empty() {
                let mut written = std::future::poll_fn(|cx| {
                    let mut l = lock(&local);
                    if let Some(p) = l.poll_write_chunks(cx, ready) {
                        return p;
                    }
                    let mut slices = [IoSlice::new(&[]); CHUNKS];
                    for (slot, b) in slices.iter_mut().zip(ready.iter()) {
                        *slot = IoSlice::new(b);
                    }
                    Pin::new(&mut **l).poll_write_vectored(cx, &slices[..ready.len()])
                })
                .await?;
                if written == 0 {
                    return Err(io::ErrorKind::WriteZero.into());
                }
                while let Some(first) = ready.first_mut() {
                    if written < first.len() {
                        first.advance(written);
                        break;
                    }
                    written -= first.len();
                    *first = Bytes::new();
                    ready = &mut ready[1..];
                }
            }
            std::future::poll_fn(|cx| Pin::new(&mut **lock(&local)).poll_flush(cx)).await?;
        }
        std::future::poll_fn(|cx| Pin::new(&mut **lock(&local)).poll_shutdown(cx)).await?;
        Ok(total)
    };
    tokio::try_join!(to_peer, from_peer)
}

/// The lock of [`splice_quic`]'s local side; a panic while holding it
/// leaves nothing half-updated that the other direction could misread.
fn lock<'a, T>(m: &'a Mutex<T>) -> std::sync::MutexGuard<'a, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Reads everything ready (at least a byte, or none at end of stream) up
/// to `buf`'s spare capacity, so a chunk spans many TLS records.
fn poll_read_ready<R: AsyncRead + ?Sized>(
    mut rd: Pin<&mut R>,
    cx: &mut Context<'_>,
    buf: &mut BytesMut,
) -> Poll<io::Result<usize>> {
    let mut read = 0;
    while buf.len() < buf.capacity() {
        match tokio_util::io::poll_read_buf(rd.as_mut(), cx, buf) {
            Poll::Ready(Ok(0)) => break,
            Poll::Ready(Ok(n)) => read += n,
            Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
            Poll::Pending if read == 0 => return Poll::Pending,
            Poll::Pending => break,
        }
    }
    Poll::Ready(Ok(read))
}

impl AsyncRead for PeerStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Quic { recv, .. } => Pin::new(recv).poll_read(cx, buf),
            Self::Tcp { io, .. } => Pin::new(io).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for PeerStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Self::Quic { send, .. } => AsyncWrite::poll_write(Pin::new(send), cx, buf),
            Self::Tcp { io, .. } => Pin::new(io).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Quic { send, .. } => Pin::new(send).poll_flush(cx),
            Self::Tcp { io, .. } => Pin::new(io).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Quic { send, .. } => Pin::new(send).poll_shutdown(cx),
            Self::Tcp { io, .. } => Pin::new(io).poll_shutdown(cx),
        }
    }
}
