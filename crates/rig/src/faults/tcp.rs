//! A user-space TCP relay in front of a gateway's TCP fallback port, the
//! TCP twin of the UDP relay: pass bytes, hold them (a blackhole: nothing
//! closes, nothing arrives) for chosen client addresses, or delay them by
//! a one-way delay with jitter that keeps byte order.
//!
//! It terminates TCP, so it cannot drop segments: loss on a TCP path needs
//! a packet filter (nftables in a network namespace), not this relay.
//!
//! Bounded: at most `MAX_CONNS` relayed connections; per direction at most
//! `QUEUED_CHUNKS` reads of up to `CHUNK` bytes wait for their delivery
//! time (a full queue stops reading, so TCP flow control pushes back).

use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::{mpsc, Semaphore};
use tokio::task::JoinHandle;

use super::{lock, Blocklist, Fifo, Impairment};

const MAX_CONNS: usize = 256;
const CHUNK: usize = 64 * 1024;
const QUEUED_CHUNKS: usize = 64;
/// How often a held (blocked) direction looks whether it may go on.
const HOLD_TICK: Duration = Duration::from_millis(20);

#[derive(Default)]
struct TcpState {
    blocked: Blocklist,
    impairment: Mutex<Impairment>,
}

impl TcpState {
    fn is_blocked(&self, ip: IpAddr) -> bool {
        self.blocked.contains(ip)
    }
}

/// A running TCP relay; dropping it stops accepting and ends every relayed
/// connection.
pub struct TcpRelay {
    addr: SocketAddr,
    state: Arc<TcpState>,
    task: JoinHandle<()>,
    stop: tokio::sync::watch::Sender<bool>,
}

impl Drop for TcpRelay {
    fn drop(&mut self) {
        self.stop.send_replace(true);
        self.task.abort();
    }
}

impl TcpRelay {
    /// Relays `<ip>:<free port>` to `target`, dialing it from `ip`.
    pub async fn start_on(ip: IpAddr, target: SocketAddr) -> std::io::Result<Self> {
        let listener = TcpListener::bind(SocketAddr::new(ip, 0)).await?;
        let addr = listener.local_addr()?;
        let state = Arc::new(TcpState::default());
        let (stop, _) = tokio::sync::watch::channel(false);
        let task = tokio::spawn(accept_loop(
            listener,
            ip,
            target,
            state.clone(),
            stop.clone(),
        ));
        Ok(Self {
            addr,
            state,
            task,
            stop,
        })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Holds every byte from and to clients at `ip` (or stops doing so);
    /// their new connections are accepted but not relayed meanwhile.
    pub fn block(&self, ip: IpAddr, on: bool) {
        self.state.blocked.set(ip, on);
    }

    /// Delays both directions from now on (delay and jitter only: loss
    /// and reordering do not apply to a byte stream and are refused).
    pub fn impair(&self, i: Impairment) -> Result<(), &'static str> {
        if i.loss_percent > 0.0 || i.reorder_percent > 0.0 {
            return Err("a TCP relay cannot drop or reorder segments");
        }
        *lock(&self.state.impairment) = i;
        Ok(())
    }
}

async fn accept_loop(
    listener: TcpListener,
    ip: IpAddr,
    target: SocketAddr,
    state: Arc<TcpState>,
    stop: tokio::sync::watch::Sender<bool>,
) {
    let slots = Arc::new(Semaphore::new(MAX_CONNS));
    loop {
        let Ok(permit) = slots.clone().acquire_owned().await else {
            return;
        };
        let Ok((down, from)) = listener.accept().await else {
            continue;
        };
        let state = state.clone();
        let mut stopped = stop.subscribe();
        tokio::spawn(async move {
            tokio::select! {
                _ = relay(down, from.ip(), ip, target, &state) => {}
                _ = stopped.wait_for(|s| *s) => {}
            }
            drop(permit);
        });
    }
}

async fn relay(
    down: TcpStream,
    client: IpAddr,
    ip: IpAddr,
    target: SocketAddr,
    state: &Arc<TcpState>,
) {
    // A blocked client's connection waits here, like SYNs into a void.
    while state.is_blocked(client) {
        tokio::time::sleep(HOLD_TICK).await;
    }
    let up = async {
        let s = if target.is_ipv4() {
            TcpSocket::new_v4()?
        } else {
            TcpSocket::new_v6()?
        };
        s.bind(SocketAddr::new(ip, 0))?;
        s.connect(target).await
    };
    let Ok(up) = up.await else {
        return;
    };
    let _ = down.set_nodelay(true);
    let _ = up.set_nodelay(true);
    let (dr, dw) = down.into_split();
    let (ur, uw) = up.into_split();
    tokio::join!(
        pump(dr, uw, client, state.clone()),
        pump(ur, dw, client, state.clone())
    );
}

/// One direction: read, hold while blocked, deliver each chunk at its time.
async fn pump<R, W>(mut r: R, mut w: W, client: IpAddr, state: Arc<TcpState>)
where
    R: tokio::io::AsyncRead + Unpin + Send + 'static,
    W: tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (tx, mut rx) = mpsc::channel::<(tokio::time::Instant, Vec<u8>)>(QUEUED_CHUNKS);
    let writer = tokio::spawn(async move {
        while let Some((at, chunk)) = rx.recv().await {
            tokio::time::sleep_until(at).await;
            if w.write_all(&chunk).await.is_err() {
                return;
            }
        }
        let _ = w.shutdown().await;
    });
    let mut fifo = Fifo::default();
    let mut buf = vec![0u8; CHUNK];
    loop {
        let n = match r.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        while state.is_blocked(client) {
            tokio::time::sleep(HOLD_TICK).await;
        }
        let imp = *lock(&state.impairment);
        let now = tokio::time::Instant::now();
        let at = match imp.fate(&mut rand::thread_rng()) {
            Some(fate) => fifo.at(now, fate),
            None => now,
        };
        if tx.send((at, buf[..n].to_vec())).await.is_err() {
            break;
        }
    }
    drop(tx);
    let _ = writer.await;
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn echo_server() -> SocketAddr {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = l.accept().await {
                tokio::spawn(async move {
                    let (mut r, mut w) = s.split();
                    let _ = tokio::io::copy(&mut r, &mut w).await;
                });
            }
        });
        addr
    }

    async fn round_trip(relay: SocketAddr, bytes: &[u8]) -> std::io::Result<Vec<u8>> {
        let mut s = TcpStream::connect(relay).await?;
        s.write_all(bytes).await?;
        s.shutdown().await?;
        let mut out = Vec::new();
        s.read_to_end(&mut out).await?;
        Ok(out)
    }

    #[tokio::test]
    async fn bytes_pass_exactly_and_are_delayed_in_order() {
        let relay = TcpRelay::start_on([127, 0, 0, 1].into(), echo_server().await)
            .await
            .unwrap();
        let data: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
        assert_eq!(round_trip(relay.addr(), &data).await.unwrap(), data);
        relay
            .impair(Impairment {
                delay: Duration::from_millis(30),
                jitter: Duration::from_millis(10),
                ..Impairment::default()
            })
            .unwrap();
        let t0 = std::time::Instant::now();
        assert_eq!(round_trip(relay.addr(), &data).await.unwrap(), data);
        // Both ways delayed: at least one round trip of 60 ms.
        assert!(
            t0.elapsed() >= Duration::from_millis(60),
            "{:?}",
            t0.elapsed()
        );
        assert!(relay
            .impair(Impairment {
                loss_percent: 1.0,
                ..Impairment::default()
            })
            .is_err());
    }

    #[tokio::test]
    async fn a_blocked_client_is_held_not_closed_and_resumes() {
        let relay = TcpRelay::start_on([127, 0, 0, 1].into(), echo_server().await)
            .await
            .unwrap();
        let mut s = TcpStream::connect(relay.addr()).await.unwrap();
        s.write_all(b"one").await.unwrap();
        let mut got = [0u8; 3];
        s.read_exact(&mut got).await.unwrap();
        relay.block([127, 0, 0, 1].into(), true);
        s.write_all(b"two").await.unwrap();
        let held = tokio::time::timeout(Duration::from_millis(300), s.read_exact(&mut got)).await;
        assert!(held.is_err(), "bytes crossed a blocked relay");
        // A new connection is accepted but nothing is relayed.
        let mut s2 = TcpStream::connect(relay.addr()).await.unwrap();
        s2.write_all(b"new").await.unwrap();
        let mut got2 = [0u8; 3];
        let held = tokio::time::timeout(Duration::from_millis(300), s2.read_exact(&mut got2)).await;
        assert!(
            held.is_err(),
            "a blocked client's new connection was relayed"
        );
        relay.block([127, 0, 0, 1].into(), false);
        tokio::time::timeout(Duration::from_secs(2), s.read_exact(&mut got))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(&got, b"two");
        tokio::time::timeout(Duration::from_secs(2), s2.read_exact(&mut got2))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(&got2, b"new");
    }
}
