//! A user-space UDP relay in front of a gateway's QUIC port, to break the
//! path on purpose (this kernel has no `netem`): pass packets, drop them
//! silently both ways (a blackhole: no close, no ICMP), or drop them and
//! forget every flow (a dead process: whatever comes back later starts
//! from nothing). It can also impair the path like a WAN (delay, jitter,
//! loss, reordering; the decisions are the pure [`Impairment::fate`] and
//! [`DelayLine`]) and cut off chosen source addresses (a partition).
//!
//! Bounded: at most `MAX_FLOWS` client addresses, each with its own
//! upstream socket and task; idle flows end after `FLOW_IDLE`; at most
//! `MAX_QUEUED` packets wait in a delay line (more are dropped, like a
//! router's full queue).

use std::collections::{BTreeSet, BinaryHeap, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::net::UdpSocket;
use tokio::task::JoinHandle;

mod tcp;
pub use tcp::TcpRelay;

const MAX_FLOWS: usize = 256;
const FLOW_IDLE: Duration = Duration::from_secs(30);
const MAX_DATAGRAM: usize = 65_535;
const MAX_QUEUED: usize = 20_000;

/// What the path does to each packet, per direction.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Impairment {
    /// One-way delay.
    pub delay: Duration,
    /// Uniform extra delay in `0..=jitter`.
    pub jitter: Duration,
    /// Share of packets dropped, in percent.
    pub loss_percent: f64,
    /// Share of packets held back by another `delay` (so packets sent
    /// after them arrive first), in percent.
    pub reorder_percent: f64,
}

impl Impairment {
    pub fn is_none(&self) -> bool {
        *self == Impairment::default()
    }

    /// One packet's fate: dropped (`None`) or delivered after a delay.
    pub fn fate<R: rand::Rng>(&self, rng: &mut R) -> Option<Fate> {
        if self.loss_percent > 0.0 && rng.gen_range(0.0..100.0) < self.loss_percent {
            return None;
        }
        let mut delay = self.delay;
        if !self.jitter.is_zero() {
            delay += self.jitter.mul_f64(rng.gen_range(0.0..=1.0));
        }
        let reordered =
            self.reorder_percent > 0.0 && rng.gen_range(0.0..100.0) < self.reorder_percent;
        if reordered {
            delay += self.delay.max(Duration::from_millis(1));
        }
        Some(Fate { delay, reordered })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fate {
    pub delay: Duration,
    /// Held back on purpose: may overtake nothing, be overtaken by later
    /// packets.
    pub reordered: bool,
}

/// A link's queue: jitter varies delay but packets leave in order, as on
/// a real path; only packets chosen for reordering step out of line.
#[derive(Debug, Default, Clone, Copy)]
pub struct Fifo {
    last: Option<tokio::time::Instant>,
}

impl Fifo {
    /// When a packet that arrived at `now` with `fate` is delivered.
    pub fn at(&mut self, now: tokio::time::Instant, fate: Fate) -> tokio::time::Instant {
        let at = now + fate.delay;
        if fate.reordered {
            return at;
        }
        let at = self.last.map_or(at, |l| l.max(at));
        self.last = Some(at);
        at
    }
}

/// Packets waiting for their delivery time, earliest first (ties in
/// arrival order). Pure: the caller passes the time in.
#[derive(Debug, Default)]
pub struct DelayLine {
    heap: BinaryHeap<std::cmp::Reverse<(tokio::time::Instant, u64, Vec<u8>)>>,
    seq: u64,
}

impl DelayLine {
    /// Queues a packet; `false` (dropped) when `MAX_QUEUED` are waiting.
    pub fn push(&mut self, at: tokio::time::Instant, packet: Vec<u8>) -> bool {
        if self.heap.len() >= MAX_QUEUED {
            return false;
        }
        self.seq += 1;
        self.heap.push(std::cmp::Reverse((at, self.seq, packet)));
        true
    }

    /// The next packet due at or before `now`.
    pub fn pop_due(&mut self, now: tokio::time::Instant) -> Option<Vec<u8>> {
        if self.heap.peek()?.0 .0 > now {
            return None;
        }
        self.heap.pop().map(|r| r.0 .2)
    }

    /// When the next packet is due.
    pub fn next_at(&self) -> Option<tokio::time::Instant> {
        self.heap.peek().map(|r| r.0 .0)
    }

    pub fn len(&self) -> usize {
        self.heap.len()
    }

    pub fn is_empty(&self) -> bool {
        self.heap.is_empty()
    }
}

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
    impairment: Mutex<Impairment>,
    /// Whether `impairment` is not none: read per packet without the lock.
    impaired: AtomicBool,
    /// Clients whose packets are dropped both ways (a partition).
    blocked: Blocklist,
    bind_ip: IpAddr,
}

impl State {
    fn passing(&self, client: &SocketAddr) -> bool {
        let m = self.mode.load(Ordering::Relaxed);
        let blocked = self.blocked.contains(client.ip());
        if m != RelayMode::Pass as u8 || blocked {
            self.dropped.fetch_add(1, Ordering::Relaxed);
            false
        } else {
            true
        }
    }

    /// The impairment, or `None` on the (lock-free) common path.
    fn impairment(&self) -> Option<Impairment> {
        self.impaired
            .load(Ordering::Relaxed)
            .then(|| *lock(&self.impairment))
    }
}

/// Packets for a flow's delay task: when to deliver, what.
type Delayed = tokio::sync::mpsc::Sender<(tokio::time::Instant, Vec<u8>)>;
type Delivery = std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>;

/// Delivers delayed packets in time order until the sender side closes.
async fn delay_task(
    mut rx: tokio::sync::mpsc::Receiver<(tokio::time::Instant, Vec<u8>)>,
    deliver: impl Fn(Vec<u8>) -> Delivery + Send + 'static,
) {
    let mut line = DelayLine::default();
    loop {
        while let Some(p) = line.pop_due(tokio::time::Instant::now()) {
            deliver(p).await;
        }
        let next = line.next_at();
        tokio::select! {
            got = rx.recv() => match got {
                Some((at, p)) => { let _ = line.push(at, p); }
                None => return,
            },
            _ = async {
                match next {
                    Some(at) => tokio::time::sleep_until(at).await,
                    None => std::future::pending().await,
                }
            } => {}
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
        Self::start_on(IpAddr::from([127, 0, 0, 1]), target).await
    }

    /// Relays `<ip>:<free port>` to `target`, its upstream sockets also on `ip`.
    pub async fn start_on(ip: IpAddr, target: SocketAddr) -> std::io::Result<Self> {
        let front = Arc::new(UdpSocket::bind(SocketAddr::new(ip, 0)).await?);
        let addr = front.local_addr()?;
        let state = Arc::new(State {
            mode: AtomicU8::new(RelayMode::Pass as u8),
            generation: AtomicU64::new(0),
            dropped: AtomicU64::new(0),
            flows: Mutex::new(HashMap::new()),
            impairment: Mutex::new(Impairment::default()),
            impaired: AtomicBool::new(false),
            blocked: Blocklist::default(),
            bind_ip: ip,
        });
        let task = tokio::spawn(front_loop(front, target, state.clone()));
        Ok(Self { addr, state, task })
    }

    /// Impairs both directions from now on.
    pub fn impair(&self, i: Impairment) {
        *lock(&self.state.impairment) = i;
        self.state.impaired.store(!i.is_none(), Ordering::Relaxed);
    }

    /// Drops every packet from and to clients at `ip` (or stops doing so).
    pub fn block(&self, ip: IpAddr, on: bool) {
        self.state.blocked.set(ip, on);
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

/// Source addresses a relay cuts off, read per packet or chunk: an atomic
/// says whether any is set, so the common case takes no lock.
#[derive(Debug, Default)]
struct Blocklist {
    set: Mutex<BTreeSet<IpAddr>>,
    any: AtomicBool,
}

impl Blocklist {
    fn set(&self, ip: IpAddr, on: bool) {
        let mut b = lock(&self.set);
        if on {
            b.insert(ip);
        } else {
            b.remove(&ip);
        }
        self.any.store(!b.is_empty(), Ordering::Relaxed);
    }

    fn contains(&self, ip: IpAddr) -> bool {
        self.any.load(Ordering::Relaxed) && lock(&self.set).contains(&ip)
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
    // Each flow's delay task (only while the path is impaired).
    let mut later: HashMap<SocketAddr, (Delayed, Fifo)> = HashMap::new();
    loop {
        let Ok((n, from)) = front.recv_from(&mut buf).await else {
            continue;
        };
        if !state.passing(&from) {
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
                let Ok(up) = UdpSocket::bind(SocketAddr::new(state.bind_ip, 0)).await else {
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
        let Some(imp) = state.impairment() else {
            let _ = up.send(&buf[..n]).await;
            continue;
        };
        let Some(fate) = imp.fate(&mut rand::thread_rng()) else {
            state.dropped.fetch_add(1, Ordering::Relaxed);
            continue;
        };
        if !later.contains_key(&from) {
            let flows = lock(&state.flows);
            later.retain(|k, _| flows.contains_key(k));
        }
        let (tx, fifo) = later.entry(from).or_insert_with(|| {
            let (tx, rx) = tokio::sync::mpsc::channel(MAX_QUEUED);
            let up = up.clone();
            tokio::spawn(delay_task(rx, move |p| {
                let up = up.clone();
                Box::pin(async move {
                    let _ = up.send(&p).await;
                })
            }));
            (tx, Fifo::default())
        });
        let at = fifo.at(tokio::time::Instant::now(), fate);
        if tx.try_send((at, buf[..n].to_vec())).is_err() {
            state.dropped.fetch_add(1, Ordering::Relaxed);
        }
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
    let mut later: Option<(Delayed, Fifo)> = None;
    loop {
        let n = match tokio::time::timeout(FLOW_IDLE, up.recv(&mut buf)).await {
            Ok(Ok(n)) => n,
            _ => break,
        };
        if state.generation.load(Ordering::Relaxed) != generation {
            return;
        }
        if !state.passing(&client) {
            continue;
        }
        let Some(imp) = state.impairment() else {
            let _ = front.send_to(&buf[..n], client).await;
            continue;
        };
        let Some(fate) = imp.fate(&mut rand::thread_rng()) else {
            state.dropped.fetch_add(1, Ordering::Relaxed);
            continue;
        };
        let (tx, fifo) = later.get_or_insert_with(|| {
            let (tx, rx) = tokio::sync::mpsc::channel(MAX_QUEUED);
            let front = front.clone();
            tokio::spawn(delay_task(rx, move |p| {
                let front = front.clone();
                Box::pin(async move {
                    let _ = front.send_to(&p, client).await;
                })
            }));
            (tx, Fifo::default())
        });
        let at = fifo.at(tokio::time::Instant::now(), fate);
        if tx.try_send((at, buf[..n].to_vec())).is_err() {
            state.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }
    let mut flows = lock(&state.flows);
    if flows.get(&client).is_some_and(|u| Arc::ptr_eq(u, &up)) {
        flows.remove(&client);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    #[test]
    fn impairment_drops_delays_and_reorders_as_configured() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let i = Impairment {
            delay: Duration::from_millis(30),
            jitter: Duration::from_millis(5),
            loss_percent: 1.0,
            reorder_percent: 2.0,
        };
        let fates: Vec<Option<Duration>> = (0..100_000)
            .map(|_| i.fate(&mut rng).map(|f| f.delay))
            .collect();
        let lost = fates.iter().filter(|f| f.is_none()).count();
        assert!((800..1200).contains(&lost), "{lost} lost of 100000");
        let delays: Vec<Duration> = fates.into_iter().flatten().collect();
        assert!(delays.iter().all(|d| *d >= Duration::from_millis(30)));
        let late = delays
            .iter()
            .filter(|d| **d > Duration::from_millis(35))
            .count();
        assert!((1500..2500).contains(&late), "{late} held back");
        assert!(delays.iter().all(|d| *d <= Duration::from_millis(65)));
        assert_eq!(
            Impairment::default().fate(&mut rng).map(|f| f.delay),
            Some(Duration::ZERO)
        );
    }

    #[test]
    fn jitter_keeps_order_but_reordered_packets_step_out() {
        let t0 = tokio::time::Instant::now();
        let ms = |n| Duration::from_millis(n);
        let mut f = Fifo::default();
        let fate = |d, reordered| Fate {
            delay: ms(d),
            reordered,
        };
        let a = f.at(t0, fate(20, false));
        let b = f.at(t0 + ms(1), fate(12, false));
        assert!(b >= a, "a later packet with less jitter waits its turn");
        let c = f.at(t0 + ms(2), fate(5, true));
        assert!(c < b, "a reordered packet may overtake");
        let d = f.at(t0 + ms(3), fate(10, false));
        assert!(d >= b);
    }

    #[test]
    fn the_delay_line_delivers_in_time_order_and_is_bounded() {
        let t0 = tokio::time::Instant::now();
        let ms = |n| t0 + Duration::from_millis(n);
        let mut l = DelayLine::default();
        assert!(l.push(ms(30), b"a".to_vec()));
        assert!(l.push(ms(10), b"b".to_vec()));
        assert!(l.push(ms(10), b"c".to_vec()));
        assert_eq!(l.pop_due(ms(5)), None);
        assert_eq!(l.next_at(), Some(ms(10)));
        assert_eq!(l.pop_due(ms(10)).as_deref(), Some(&b"b"[..]));
        assert_eq!(l.pop_due(ms(10)).as_deref(), Some(&b"c"[..]));
        assert_eq!(l.pop_due(ms(29)), None);
        assert_eq!(l.pop_due(ms(40)).as_deref(), Some(&b"a"[..]));
        assert!(l.is_empty());
        for i in 0..MAX_QUEUED {
            assert!(l.push(ms(i as u64), vec![]));
        }
        assert!(!l.push(ms(0), vec![]), "a full line drops");
        assert_eq!(l.len(), MAX_QUEUED);
    }

    #[tokio::test]
    async fn the_relay_delays_drops_and_partitions() {
        let server = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let relay = UdpRelay::start(server.local_addr().unwrap()).await.unwrap();
        let client = UdpSocket::bind("127.0.0.2:0").await.unwrap();
        client.connect(relay.addr()).await.unwrap();
        let mut buf = [0u8; 64];
        // Pass, then 40 ms each way.
        client.send(b"1").await.unwrap();
        let (_, back_to) = server.recv_from(&mut buf).await.unwrap();
        relay.impair(Impairment {
            delay: Duration::from_millis(40),
            ..Impairment::default()
        });
        let t0 = std::time::Instant::now();
        client.send(b"2").await.unwrap();
        server.recv_from(&mut buf).await.unwrap();
        server.send_to(b"r", back_to).await.unwrap();
        client.recv(&mut buf).await.unwrap();
        let rtt = t0.elapsed();
        assert!(rtt >= Duration::from_millis(80), "{rtt:?}");
        assert!(rtt < Duration::from_millis(400), "{rtt:?}");
        // A blocked source gets nothing through, either way.
        relay.impair(Impairment::default());
        relay.block("127.0.0.2".parse().unwrap(), true);
        client.send(b"3").await.unwrap();
        let got =
            tokio::time::timeout(Duration::from_millis(200), server.recv_from(&mut buf)).await;
        assert!(got.is_err(), "a partitioned client must not get through");
        assert!(relay.dropped() >= 1);
        relay.block("127.0.0.2".parse().unwrap(), false);
        client.send(b"4").await.unwrap();
        let (n, _) = tokio::time::timeout(Duration::from_secs(2), server.recv_from(&mut buf))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(&buf[..n], b"4");
    }
}
