//! Tunnel I/O shared by the gateway and the sidecar: mTLS dial and accept
//! with SPIFFE identity checks, opening a tunnel (header out, status back)
//! and answering one, splicing bytes, the named limits every listener
//! enforces, and the admin endpoint that serves `/metrics`.
#![forbid(unsafe_code)]

pub mod admin;
mod announced;
mod chunks;
mod cut;
mod h2stream;
mod identity;
mod limits;
mod pool;
mod tunnel;

pub use announced::Announced;
pub use chunks::{Chunked, SendBuf};
pub use cut::{close, Cut, TunnelIo};
pub use h2stream::{
    client_builder as h2_client, keep_alive as h2_keep_alive, open_connect as h2_open,
    serve as serve_h2, serve_streams, server_builder as h2_server, ConnectError, H2Stream,
    H2Windows, TLS_BUFFER as H2_TLS_BUFFER,
};
pub use identity::{load_trust, read_yaml, BundleFile, IdentityFiles};
pub use limits::Limits;
pub use pool::{LegPool, PoolCounts};
pub use tunnel::{
    accept_tls, answer, check_hops, connect_first, connect_one, dial_tls, expect_peer, open,
    read_request, splice, AcceptError, DialError, OpenError, Refusal, RequestError, TlsClient,
    TlsServer,
};

/// Accepts TCP connections on `listener` until the task is dropped and runs
/// `handle` for each, at most `limit` at once. A connection over the limit
/// is closed at once and reported to `over_limit`; accept errors (out of
/// descriptors) back off briefly instead of spinning.
pub async fn serve_tcp<H, Fut>(
    listener: tokio::net::TcpListener,
    what: &'static str,
    limit: usize,
    over_limit: impl Fn(std::net::SocketAddr) + Send + 'static,
    handle: H,
) where
    H: Fn(tokio::net::TcpStream, std::net::SocketAddr) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let slots = std::sync::Arc::new(tokio::sync::Semaphore::new(limit));
    loop {
        let (tcp, remote) = match listener.accept().await {
            Ok(x) => x,
            Err(e) => {
                tracing::warn!(error = %e, listener = what, "accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            }
        };
        // A proxy forwards what it is given as it is given: Nagle's
        // algorithm would hold a small write back until the previous one
        // is acknowledged.
        let _ = tcp.set_nodelay(true);
        let Ok(permit) = slots.clone().try_acquire_owned() else {
            tracing::warn!(%remote, limit, listener = what, "connection over the limit; closing");
            over_limit(remote);
            continue;
        };
        let fut = handle(tcp, remote);
        tokio::spawn(async move {
            fut.await;
            drop(permit);
        });
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    /// Every accepted connection has Nagle's algorithm off, so a small
    /// write behind an unacknowledged one goes out at once.
    #[tokio::test]
    async fn accepted_connections_do_not_wait_for_acks() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, mut rx) = tokio::sync::mpsc::channel(1);
        let server = tokio::spawn(super::serve_tcp(
            listener,
            "test",
            4,
            |_| {},
            move |tcp, _| {
                let tx = tx.clone();
                async move {
                    let _ = tx.send(tcp.nodelay().unwrap()).await;
                }
            },
        ));
        let _client = tokio::net::TcpStream::connect(addr).await.unwrap();
        assert!(
            rx.recv().await.unwrap(),
            "TCP_NODELAY on the accepted socket"
        );
        server.abort();
    }
}
