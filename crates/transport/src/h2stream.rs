//! A tunnel byte stream carried by one HTTP/2 stream (a `CONNECT`), built
//! on `h2` directly so a cut can be sent and told apart from an end.
//!
//! hyper's upgraded `CONNECT` stream can only end cleanly or be dropped,
//! and it reads a peer's `RST_STREAM` with `CANCEL` (what a dropped stream
//! sends) as an end of stream. Here a clean end is `END_STREAM`; a cut
//! ([`Cut::cut`]) is `RST_STREAM` with `CONNECT_ERROR`, the code RFC 9113
//! §8.5 gives a proxied connection that was reset; a dropped stream still
//! sends `CANCEL`. A reader sees any reset but `NO_ERROR` as a connection
//! reset, so the cut passes on.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use bytes::{Buf, Bytes};
use h2::{Reason, RecvStream, SendStream};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::{Cut, Limits, SendBuf};

/// Largest write handed to h2 at once (bounds the copy of one write).
const MAX_WRITE: usize = 256 * 1024;
/// What h2 buffers per stream before a writer waits.
const SEND_BUF: usize = 1 << 20;
/// Largest DATA frame either side accepts: bulk moves in few frames, so
/// few TLS records and syscalls (HTTP/2's default is 16 KiB).
const MAX_FRAME: u32 = 256 * 1024;
/// Plaintext rustls takes before a write must wait for the socket, on a
/// TLS connection carrying HTTP/2: a whole DATA frame and its 9-byte
/// header. With rustls's default (64 KiB) a 64 KiB frame spills its last
/// bytes into a second `writev`, doubling the syscalls of a bulk stream.
pub const TLS_BUFFER: usize = MAX_FRAME as usize + 64 * 1024;

/// The authority every `CONNECT` names; the tunnel header says where the
/// stream really goes.
const AUTHORITY: &str = "fedmesh.invalid:443";

#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    /// The connection under the stream failed (or is gone).
    #[error("HTTP/2: {0}")]
    H2(#[from] h2::Error),
    #[error("peer answered CONNECT with {0}")]
    Refused(http::StatusCode),
}

/// Opens one tunnel stream on `send`'s connection: a `CONNECT`, then
/// bytes both ways. Waits while the peer's stream cap is reached (the
/// caller bounds the wait), not for the answer: the tunnel header goes out
/// with the `CONNECT`, and the peer's 200 arrives with its status frame,
/// so opening a stream costs one round trip, not two. A refused `CONNECT`
/// is the first read's error (a [`ConnectError`] inside a
/// `ConnectionRefused` I/O error).
pub async fn open_connect(
    send: &h2::client::SendRequest<SendBuf>,
) -> Result<H2Stream, ConnectError> {
    let mut req = http::Request::new(());
    *req.method_mut() = http::Method::CONNECT;
    *req.uri_mut() = http::Uri::from_static(AUTHORITY);
    let mut send = send.clone().ready().await?;
    let (resp, stream) = send.send_request(req, false)?;
    Ok(H2Stream::with(stream, Recv::Answer(resp)))
}

/// A pooled leg's per-stream window: inside a cluster a round trip takes
/// tens of microseconds, so 256 KiB per round trip is gigabytes a second.
const POOLED_STREAM_WINDOW: u32 = 256 * 1024;

/// Flow-control windows and the stream cap of one HTTP/2 tunnel
/// connection, as the receiving side grants them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct H2Windows {
    pub stream: u32,
    pub connection: u32,
    /// Streams open at once.
    pub streams: u32,
}

impl H2Windows {
    /// Between gateways (the TCP fallback): a long, fast path needs large
    /// windows, as QUIC's.
    pub fn wan(limits: &Limits) -> Self {
        Self {
            stream: 8 << 20,
            connection: 32 << 20,
            streams: limits.max_streams_per_connection,
        }
    }

    /// Inside a cluster (pooled legs): small stream windows, and a
    /// connection window that covers every stream's, so a stream whose
    /// reader stalls holds back only itself.
    pub fn pooled(limits: &Limits) -> Self {
        let streams = limits.pool_streams_per_connection.max(1);
        Self {
            stream: POOLED_STREAM_WINDOW,
            connection: u32::try_from(u64::from(POOLED_STREAM_WINDOW) * u64::from(streams))
                .unwrap_or(u32::MAX)
                .min((1 << 31) - 1),
            streams,
        }
    }
}

/// HTTP/2 header lists are bounded like tunnel headers.
fn header_list(limits: &Limits) -> u32 {
    u32::try_from(limits.max_header_bytes).unwrap_or(u32::MAX)
}

/// The client side of a tunnel-carrying HTTP/2 connection.
pub fn client_builder(limits: &Limits, windows: H2Windows) -> h2::client::Builder {
    let mut b = h2::client::Builder::new();
    b.initial_window_size(windows.stream)
        .initial_connection_window_size(windows.connection)
        .max_send_buffer_size(SEND_BUF)
        .max_frame_size(MAX_FRAME)
        .max_header_list_size(header_list(limits));
    b
}

/// The server side.
pub fn server_builder(limits: &Limits, windows: H2Windows) -> h2::server::Builder {
    let mut b = h2::server::Builder::new();
    b.initial_window_size(windows.stream)
        .initial_connection_window_size(windows.connection)
        .max_send_buffer_size(SEND_BUF)
        .max_frame_size(MAX_FRAME)
        .max_concurrent_streams(windows.streams)
        .max_header_list_size(header_list(limits));
    b
}

/// Pings every `interval` and returns when a ping goes unanswered for
/// `dead`, or pings cannot be sent (the connection is gone). Runs beside
/// the connection, which must be polled for pongs to arrive.
pub async fn keep_alive(
    pings: Option<h2::PingPong>,
    interval: std::time::Duration,
    dead: std::time::Duration,
) -> &'static str {
    let Some(mut pings) = pings else {
        return "no ping handle";
    };
    loop {
        tokio::time::sleep(interval).await;
        match tokio::time::timeout(dead, pings.ping(h2::Ping::opaque())).await {
            Ok(Ok(_)) => {}
            Ok(Err(_)) => return "ping failed",
            Err(_) => return "ping unanswered",
        }
    }
}

/// The receiving half: a client's `CONNECT` may still await its answer.
enum Recv {
    Answer(h2::client::ResponseFuture),
    Body(RecvStream),
}

pub struct H2Stream {
    send: SendStream<SendBuf>,
    recv: Recv,
    /// Received and not yet read.
    pending: Bytes,
    cut: bool,
    /// The connection under the stream failed (not just this stream).
    lost: bool,
    /// Released with the stream (a pooled connection's stream slot).
    _hold: Option<Box<dyn Send + Sync>>,
}

impl H2Stream {
    pub fn new(send: SendStream<SendBuf>, recv: RecvStream) -> Self {
        Self::with(send, Recv::Body(recv))
    }

    fn with(send: SendStream<SendBuf>, recv: Recv) -> Self {
        Self {
            send,
            recv,
            pending: Bytes::new(),
            cut: false,
            lost: false,
            _hold: None,
        }
    }

    /// Whether a read or write failed because the whole connection did
    /// (its TLS or TCP failed, or the peer sent `GOAWAY`), not this stream
    /// alone: a pool retires such a connection.
    pub fn connection_lost(&self) -> bool {
        self.lost
    }

    /// [`reset_error`], noting a lost connection.
    fn failed(&mut self, e: h2::Error) -> Option<io::Error> {
        if e.is_io() || e.is_go_away() {
            self.lost = true;
        }
        reset_error(e)
    }

    /// Keeps `hold` until the stream is dropped.
    pub fn holding(mut self, hold: impl Send + Sync + 'static) -> Self {
        self._hold = Some(Box::new(hold));
        self
    }
}

/// A peer's reset, or a lost connection, as an I/O error. `NO_ERROR` is
/// an early but orderly end (RFC 9113 §8.1).
fn reset_error(e: h2::Error) -> Option<io::Error> {
    match e.reason() {
        Some(Reason::NO_ERROR) => None,
        // Any other reset, or the connection under the stream lost (its
        // TLS or TCP failed): for the stream, a reset.
        _ => Some(io::Error::new(io::ErrorKind::ConnectionReset, e)),
    }
}

impl H2Stream {
    /// Waits until received data is pending; `false` at the end of the
    /// stream (or an orderly early end).
    fn poll_pending(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<bool>> {
        let this = self;
        while this.pending.is_empty() {
            let body = match &mut this.recv {
                Recv::Body(body) => body,
                Recv::Answer(answer) => {
                    let resp = match ready!(Pin::new(answer).poll(cx)) {
                        Ok(resp) => resp,
                        // No answer at all, even an orderly one: reset.
                        Err(e) => {
                            return Poll::Ready(Err(this
                                .failed(e)
                                .unwrap_or_else(|| io::ErrorKind::ConnectionReset.into())))
                        }
                    };
                    if resp.status() != http::StatusCode::OK {
                        return Poll::Ready(Err(io::Error::new(
                            io::ErrorKind::ConnectionRefused,
                            ConnectError::Refused(resp.status()),
                        )));
                    }
                    this.recv = Recv::Body(resp.into_body());
                    continue;
                }
            };
            match ready!(body.poll_data(cx)) {
                Some(Ok(data)) => this.pending = data,
                None => return Poll::Ready(Ok(false)),
                Some(Err(e)) => {
                    return Poll::Ready(match this.failed(e) {
                        Some(e) => Err(e),
                        None => Ok(false),
                    })
                }
            }
        }
        Poll::Ready(Ok(true))
    }

    /// `n` bytes were read by the application: the peer may send that
    /// much more.
    fn consumed(&mut self, n: usize) {
        if let Recv::Body(body) = &mut self.recv {
            let _ = body.flow_control().release_capacity(n);
        }
    }
}

impl AsyncRead for H2Stream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if !ready!(this.poll_pending(cx))? {
            return Poll::Ready(Ok(()));
        }
        let n = this.pending.len().min(buf.remaining());
        buf.put_slice(&this.pending[..n]);
        this.pending.advance(n);
        this.consumed(n);
        Poll::Ready(Ok(()))
    }
}

/// DATA frames are handed over as they arrived, and chunks handed in go
/// out as one DATA frame without being copied into one.
impl crate::Chunked for H2Stream {
    fn poll_read_chunk(&mut self, cx: &mut Context<'_>) -> Option<Poll<io::Result<Bytes>>> {
        // At the end `pending` is empty: taking it yields the empty chunk.
        Some(self.poll_pending(cx).map_ok(|_| {
            let chunk = std::mem::take(&mut self.pending);
            self.consumed(chunk.len());
            chunk
        }))
    }

    fn poll_write_chunks(
        &mut self,
        cx: &mut Context<'_>,
        chunks: &[Bytes],
    ) -> Option<Poll<io::Result<usize>>> {
        let total: usize = chunks.iter().map(Bytes::len).sum();
        if total == 0 {
            return Some(Poll::Ready(Ok(0)));
        }
        self.send.reserve_capacity(total.min(MAX_WRITE));
        let sent = match self.send.poll_capacity(cx) {
            Poll::Pending => return Some(Poll::Pending),
            Poll::Ready(Some(Ok(n))) if n > 0 => {
                let frame = SendBuf::from_chunks(chunks, n.min(total));
                let len = frame.remaining();
                self.send.send_data(frame, false).ok().map(|()| len)
            }
            Poll::Ready(_) => None,
        };
        Some(match sent {
            Some(n) => Poll::Ready(Ok(n)),
            None => self.poll_write_error(cx).map(Err),
        })
    }
}

impl H2Stream {
    /// Why writing failed: the peer's reset, read as [`reset_error`].
    fn poll_write_error(&mut self, cx: &mut Context<'_>) -> Poll<io::Error> {
        Poll::Ready(match ready!(self.send.poll_reset(cx)) {
            Ok(Reason::NO_ERROR) => io::ErrorKind::BrokenPipe.into(),
            Ok(reason) => io::Error::new(io::ErrorKind::ConnectionReset, h2::Error::from(reason)),
            Err(e) => self
                .failed(e)
                .unwrap_or_else(|| io::ErrorKind::BrokenPipe.into()),
        })
    }
}

impl AsyncWrite for H2Stream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if buf.is_empty() {
            return Poll::Ready(Ok(0));
        }
        this.send.reserve_capacity(buf.len().min(MAX_WRITE));
        // Capacity is what flow control and h2's send buffer allow now; a
        // reset or a lost connection shows as no capacity.
        let sent = match ready!(this.send.poll_capacity(cx)) {
            Some(Ok(n)) if n > 0 => {
                let n = n.min(buf.len());
                this.send
                    .send_data(Bytes::copy_from_slice(&buf[..n]).into(), false)
                    .ok()
                    .map(|()| n)
            }
            _ => None,
        };
        match sent {
            Some(n) => Poll::Ready(Ok(n)),
            None => this.poll_write_error(cx).map(Err),
        }
    }

    /// Every slice ready goes out as one DATA frame (copied into it, since
    /// the slices are only borrowed): a frame per slice would cost the
    /// reader a wake-up and a write each. Owned chunks go out uncopied
    /// through [`crate::Chunked::poll_write_chunks`] instead.
    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let total: usize = bufs.iter().map(|b| b.len()).sum();
        if total == 0 {
            return Poll::Ready(Ok(0));
        }
        this.send.reserve_capacity(total.min(MAX_WRITE));
        let sent = match ready!(this.send.poll_capacity(cx)) {
            Some(Ok(n)) if n > 0 => {
                let mut frame = bytes::BytesMut::with_capacity(n.min(total));
                for b in bufs {
                    let take = (n - frame.len()).min(b.len());
                    frame.extend_from_slice(&b[..take]);
                    if frame.len() == n {
                        break;
                    }
                }
                let len = frame.len();
                this.send
                    .send_data(frame.freeze().into(), false)
                    .ok()
                    .map(|()| len)
            }
            _ => None,
        };
        match sent {
            Some(n) => Poll::Ready(Ok(n)),
            None => this.poll_write_error(cx).map(Err),
        }
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        // h2 sends what it holds as the connection task runs.
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.send.send_data(SendBuf::default(), true).is_ok() {
            return Poll::Ready(Ok(()));
        }
        this.poll_write_error(cx).map(Err)
    }
}

impl Cut for H2Stream {
    fn cut(&mut self) {
        if !self.cut {
            self.send.send_reset(Reason::CONNECT_ERROR);
            self.cut = true;
        }
    }

    fn is_cut(&self) -> bool {
        self.cut
    }
}

/// Serves one accepted HTTP/2 tunnel connection (the caller has checked
/// the peer's identity): every `CONNECT` becomes an [`H2Stream`] handed to
/// `handle`, at most `windows.streams` at once; any other request is answered
/// 405. Pings every `limits.keep_alive`; a peer that leaves one
/// unanswered for three times `peer_dead_after` is gone.
pub async fn serve<IO, F, Fut>(
    io: IO,
    limits: &Limits,
    windows: H2Windows,
    handle: F,
) -> Result<(), h2::Error>
where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    F: Fn(H2Stream) -> Fut + Clone + Send + Sync + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let mut conn = server_builder(limits, windows)
        .handshake::<_, SendBuf>(io)
        .await?;
    let pings = conn.ping_pong();
    let accept = async {
        while let Some(r) = conn.accept().await {
            let (req, mut respond) = r?;
            if req.method() != http::Method::CONNECT {
                let mut resp = http::Response::new(());
                *resp.status_mut() = http::StatusCode::METHOD_NOT_ALLOWED;
                let _ = respond.send_response(resp, true);
                continue;
            }
            match respond.send_response(http::Response::new(()), false) {
                Ok(send) => {
                    tokio::spawn(handle.clone()(H2Stream::new(send, req.into_body())));
                }
                Err(e) => tracing::debug!(error = %e, "CONNECT stream ended before it opened"),
            }
        }
        Ok(())
    };
    let dead = limits.h2_dead_after();
    tokio::select! {
        r = accept => r,
        why = keep_alive(pings, limits.keep_alive, dead) => {
            tracing::info!(reason = why, "HTTP/2 tunnel connection from a peer ended");
            Ok(())
        }
    }
}

/// Serves one accepted tunnel connection (the caller has checked the
/// peer's identity) by the protocol its handshake agreed on: with
/// `fedmesh-h2/1` every `CONNECT` stream goes to `handle` (see [`serve`]);
/// with `fedmesh/1` the connection is the one stream. `handle` ends each
/// stream it is given ([`crate::close`]).
pub async fn serve_streams<F, Fut>(
    tls: crate::TlsServer,
    limits: &Limits,
    handle: F,
) -> Result<(), h2::Error>
where
    F: Fn(Box<dyn crate::TunnelIo>) -> Fut + Clone + Send + Sync + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    if tls.get_ref().1.alpn_protocol() == Some(fedmesh_wire::ALPN_H2) {
        let mut tls = tls;
        tls.get_mut().1.set_buffer_limit(Some(TLS_BUFFER));
        let windows = H2Windows::pooled(limits);
        serve(tls, limits, windows, move |io| handle(Box::new(io))).await
    } else {
        handle(Box::new(tls)).await;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;
    use crate::Chunked;

    /// A client and a server `H2Stream` over an in-memory pipe.
    async fn pair() -> (H2Stream, H2Stream) {
        let limits = Limits::default();
        let windows = H2Windows::pooled(&limits);
        let (a, b) = tokio::io::duplex(1 << 20);
        let (accepted_tx, mut accepted) = tokio::sync::mpsc::channel(1);
        tokio::spawn(async move {
            let _ = serve(b, &limits, windows, move |s| {
                let tx = accepted_tx.clone();
                async move {
                    let _ = tx.send(s).await;
                }
            })
            .await;
        });
        let (send, conn) = client_builder(&Limits::default(), windows)
            .handshake::<_, SendBuf>(a)
            .await
            .unwrap();
        tokio::spawn(conn);
        // The CONNECT goes out at once; the server hands its stream over.
        let client = open_connect(&send).await.unwrap();
        (client, accepted.recv().await.unwrap())
    }

    async fn read_chunk(s: &mut H2Stream) -> Bytes {
        std::future::poll_fn(|cx| s.poll_read_chunk(cx).unwrap())
            .await
            .unwrap()
    }

    /// Packet-sized chunks handed in go out as one DATA frame, uncopied,
    /// and the far end's chunk read hands that frame over whole.
    #[tokio::test]
    async fn chunks_cross_as_one_frame_and_arrive_as_one_chunk() {
        let (mut client, mut server) = pair().await;
        let chunks: Vec<Bytes> = (0..7u8).map(|i| Bytes::from(vec![i; 8952])).collect();
        let ptrs: Vec<*const u8> = chunks.iter().map(|c| c.as_ptr()).collect();
        let frame = SendBuf::from_chunks(&chunks, usize::MAX);
        // The frame refers to the chunks' own memory.
        let mut io = [io::IoSlice::new(&[]); 8];
        let n = frame.chunks_vectored(&mut io);
        assert_eq!(n, 7);
        for (s, p) in io[..n].iter().zip(&ptrs) {
            assert_eq!(s.as_ptr(), *p);
        }
        let sent = std::future::poll_fn(|cx| client.poll_write_chunks(cx, &chunks).unwrap())
            .await
            .unwrap();
        assert_eq!(sent, 7 * 8952);
        let got = read_chunk(&mut server).await;
        assert_eq!(got.len(), 7 * 8952, "one DATA frame for all seven");
        for (i, part) in got.chunks(8952).enumerate() {
            assert!(part.iter().all(|&b| usize::from(b) == i));
        }
        // The end of the stream reads as an empty chunk.
        tokio::io::AsyncWriteExt::shutdown(&mut client)
            .await
            .unwrap();
        assert!(read_chunk(&mut server).await.is_empty());
    }
}
