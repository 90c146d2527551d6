//! A user-space UDP relay in front of a gateway's QUIC port, to break the
//! path on purpose (this kernel has no `netem`): pass packets, drop them
//! silently both ways (a blackhole: no close, no ICMP), or drop them and
//! forget every flow (a dead process: whatever comes back later starts
//! from nothing).
//!
//! Bounded: at most `MAX_FLOWS` client addresses, each with its own
//! upstream socket and task; idle flows end after `FLOW_IDLE`.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::net::UdpSocket;
use tokio::task::JoinHandle;

const MAX_FLOWS: usize = 256;
const FLOW_IDLE: Duration = Duration::from_secs(30);
const MAX_DATAGRAM: usize = 65_535;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum RelayMode {
    Pass = 0,
    /// Drop every packet, both ways; keep flows.
    Blackhole = 1,
    /// Drop every packet and forget every flow.
    Dead = 2,
}

struct State {
    mode: AtomicU8,
    /// Bumped on `Dead`: flows of an older generation stop.
    generation: AtomicU64,
    dropped: AtomicU64,
    flows: Mutex<HashMap<SocketAddr, Arc<UdpSocket>>>,
}

impl State {
    fn passing(&self) -> bool {
        let m = self.mode.load(Ordering::Relaxed);
        if m != RelayMode::Pass as u8 {
            self.dropped.fetch_add(1, Ordering::Relaxed);
            false
        } else {
            true
        }
    }
}

/// A running relay; dropping it stops it.
pub struct UdpRelay {
    addr: SocketAddr,
    state: Arc<State>,
    task: JoinHandle<()>,
}

impl Drop for UdpRelay {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl UdpRelay {
    /// Relays `127.0.0.1:<free port>` to `target`.
    pub async fn start(target: SocketAddr) -> std::io::Result<Self> {
        let front = Arc::new(UdpSocket::bind("127.0.0.1:0").await?);
        let addr = front.local_addr()?;
        let state = Arc::new(State {
            mode: AtomicU8::new(RelayMode::Pass as u8),
            generation: AtomicU64::new(0),
            dropped: AtomicU64::new(0),
            flows: Mutex::new(HashMap::new()),
        });
        let task = tokio::spawn(front_loop(front, target, state.clone()));
        Ok(Self { addr, state, task })
    }

    /// Where peers should send.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn set(&self, mode: RelayMode) {
        self.state.mode.store(mode as u8, Ordering::Relaxed);
        if mode == RelayMode::Dead {
            self.state.generation.fetch_add(1, Ordering::Relaxed);
            lock(&self.state.flows).clear();
        }
    }

    /// Packets dropped on purpose so far.
    pub fn dropped(&self) -> u64 {
        self.state.dropped.load(Ordering::Relaxed)
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    match m.lock() {
        Ok(g) => g,
        Err(p) => p.into_inner(),
    }
}

async fn front_loop(front: Arc<UdpSocket>, target: SocketAddr, state: Arc<State>) {
    let mut buf = vec![0u8; MAX_DATAGRAM];
    loop {
        let Ok((n, from)) = front.recv_from(&mut buf).await else {
            continue;
        };
        if !state.passing() {
            continue;
        }
        let existing = lock(&state.flows).get(&from).cloned();
        let up = match existing {
            Some(up) => up,
            None => {
                if lock(&state.flows).len() >= MAX_FLOWS {
                    tracing::warn!(%from, "relay flow table full; dropping");
                    continue;
                }
                let Ok(up) = UdpSocket::bind("127.0.0.1:0").await else {
                    continue;
                };
                if up.connect(target).await.is_err() {
                    continue;
                }
                let up = Arc::new(up);
                lock(&state.flows).insert(from, up.clone());
                tokio::spawn(back_loop(
                    front.clone(),
                    up.clone(),
                    from,
                    state.clone(),
                    state.generation.load(Ordering::Relaxed),
                ));
                up
            }
        };
        let _ = up.send(&buf[..n]).await;
    }
}

async fn back_loop(
    front: Arc<UdpSocket>,
    up: Arc<UdpSocket>,
    client: SocketAddr,
    state: Arc<State>,
    generation: u64,
) {
    let mut buf = vec![0u8; MAX_DATAGRAM];
    loop {
        let n = match tokio::time::timeout(FLOW_IDLE, up.recv(&mut buf)).await {
            Ok(Ok(n)) => n,
            _ => break,
        };
        if state.generation.load(Ordering::Relaxed) != generation {
            return;
        }
        if !state.passing() {
            continue;
        }
        let _ = front.send_to(&buf[..n], client).await;
    }
    let mut flows = lock(&state.flows);
    if flows.get(&client).is_some_and(|u| Arc::ptr_eq(u, &up)) {
        flows.remove(&client);
    }
}
