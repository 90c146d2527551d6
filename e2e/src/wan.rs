//! A packet-level WAN between the rig's cluster namespaces: one TUN
//! device per namespace, all joined by this process, which reads every IP
//! packet a namespace sends to another cluster and writes it into the
//! other namespace's device after the impairment set for that direction:
//! delay and jitter, random loss, reordering, and a rate limit with a
//! bounded queue. A QUIC datagram and a TCP segment meet the same fate,
//! and TCP recovers over the impaired path end to end, which a user-space
//! relay that terminates TCP cannot offer (this kernel has no `netem`;
//! nftables can drop but not delay).
//!
//! While [attached](Wan::attach), each namespace routes the other
//! clusters' addresses (`/32`, `src` its own) through its device, so
//! everything between clusters crosses the WAN and everything else (etcd
//! and the relays on the bridge) does not; the route also picks the TCP
//! congestion control (`congctl`), since a namespace may only set those
//! the host allows. Processes keep their addresses: a packet that comes
//! in on the device is addressed to the namespace's bridge address, which
//! Linux accepts on any interface.
//!
//! Timing is done by threads, not the async runtime, whose timers tick in
//! milliseconds: a reader per device (a blocking `read`) and a writer per
//! device that sleeps until the next packet is due (about 0.1 ms late at
//! most). Bounded: at most [`MAX_QUEUED`] packets wait per device; more
//! are dropped and counted. The devices are not persistent: they go when
//! this process ends, however it ends, and [`Wan`]'s drop deletes them.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::net::{IpAddr, Ipv4Addr};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use rand::Rng;
use serde::Serialize;

use crate::netns::ip;

/// Packets waiting per device at most (about 100 MB of full-size ones).
pub const MAX_QUEUED: usize = 65_536;
/// The MTU of every WAN device: a WAN's, not loopback's.
pub const MTU: u16 = 1500;
/// How far a reordered packet overtakes: it leaves this much earlier than
/// its place in line.
const REORDER_LEAD: Duration = Duration::from_millis(1);

/// What one direction of the WAN does to every packet.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct Impairment {
    /// One way.
    #[serde(with = "ms")]
    pub delay: Duration,
    /// Each packet's delay is uniform in `delay ± jitter`; packets keep
    /// their order unless reordered.
    #[serde(with = "ms")]
    pub jitter: Duration,
    pub loss_percent: f64,
    /// Packets sent [`REORDER_LEAD`] ahead of their place in line.
    pub reorder_percent: f64,
    /// Bits per second, `None` for the devices' own pace.
    pub rate_bps: Option<u64>,
    /// With a rate: the longest a packet may queue for it before it is
    /// dropped (the bottleneck's buffer, in time).
    #[serde(with = "ms")]
    pub queue: Duration,
}

mod ms {
    pub fn serialize<S: serde::Serializer>(
        d: &std::time::Duration,
        s: S,
    ) -> Result<S::Ok, S::Error> {
        s.serialize_f64(d.as_secs_f64() * 1e3)
    }
}

impl Impairment {
    /// `rtt` split evenly between the two ways, `loss` percent each way.
    pub fn path(rtt: Duration, loss_percent: f64) -> Self {
        Self {
            delay: rtt / 2,
            loss_percent,
            ..Self::default()
        }
    }

    pub fn describe(&self) -> String {
        let mut s = format!("{:.1} ms", self.delay.as_secs_f64() * 1e3);
        if !self.jitter.is_zero() {
            s += &format!(" ±{:.1} ms", self.jitter.as_secs_f64() * 1e3);
        }
        s += &format!(", {}% loss", self.loss_percent);
        if self.reorder_percent > 0.0 {
            s += &format!(", {}% reordered", self.reorder_percent);
        }
        if let Some(r) = self.rate_bps {
            s += &format!(
                ", {:.0} Mbit/s with {:.0} ms of queue",
                r as f64 / 1e6,
                self.queue.as_secs_f64() * 1e3
            );
        }
        s
    }
}

/// What one direction saw, counted since the WAN was made.
#[derive(Debug, Clone, Copy, Default, Serialize, PartialEq, Eq)]
pub struct DirStats {
    pub packets: u64,
    pub bytes: u64,
    /// Dropped by the set loss.
    pub lost: u64,
    /// Dropped because the rate limit's queue (or the device's) was full.
    pub queue_drops: u64,
    pub reordered: u64,
    pub delivered: u64,
}

impl DirStats {
    pub fn since(&self, before: &DirStats) -> DirStats {
        DirStats {
            packets: self.packets - before.packets,
            bytes: self.bytes - before.bytes,
            lost: self.lost - before.lost,
            queue_drops: self.queue_drops - before.queue_drops,
            reordered: self.reordered - before.reordered,
            delivered: self.delivered - before.delivered,
        }
    }
}

/// One direction's state: what it does and where its line ends.
struct Dir {
    imp: Impairment,
    /// When the rate limit is free again.
    free_at: Instant,
    /// The latest release time given so far: packets keep their order.
    last_release: Instant,
    stats: DirStats,
}

/// A packet due to be written into a device at `.0` (then its arrival
/// number, the member it came from, and its bytes).
type Due = Reverse<(Instant, u64, usize, Vec<u8>)>;

/// Packets waiting to be written into one device, and buffers of ones
/// already written, so relaying a packet allocates nothing.
#[derive(Default)]
struct Line {
    due: BinaryHeap<Due>,
    /// Ties in `due` leave in arrival order.
    seq: u64,
    spare: Vec<Vec<u8>>,
}

/// Spare buffers kept per device at most.
const SPARE: usize = 1024;

struct Outbox {
    queue: Mutex<Line>,
    ready: Condvar,
}

struct Port {
    cluster: String,
    ns: String,
    dev_name: String,
    addr: Ipv4Addr,
    dev: tun_rs::SyncDevice,
    out: Outbox,
}

struct Shared {
    ports: Vec<Port>,
    /// `[from * n + to]`.
    dirs: Vec<Mutex<Dir>>,
    /// Delivered per direction, counted by the writers.
    delivered: Vec<AtomicU64>,
    stop: AtomicBool,
    /// Packets to no member, or not IPv4.
    unroutable: AtomicU64,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Shared {
    fn dir(&self, from: usize, to: usize) -> &Mutex<Dir> {
        &self.dirs[from * self.ports.len() + to]
    }
}

/// The running WAN; dropping it removes its devices and stops its threads.
pub struct Wan {
    shared: Arc<Shared>,
    attached: Mutex<Option<String>>,
}

/// An IPv4 packet's destination.
pub fn ipv4_dst(packet: &[u8]) -> Option<Ipv4Addr> {
    if packet.len() < 20 || packet[0] >> 4 != 4 {
        return None;
    }
    Some(Ipv4Addr::new(
        packet[16], packet[17], packet[18], packet[19],
    ))
}

impl Wan {
    /// One device per member (`(cluster, namespace, address)`), named
    /// `fmw<pid>x<index>`, moved into the member's namespace and up;
    /// nothing is routed through them until [`Wan::attach`].
    pub fn create(members: &[(String, String, IpAddr)]) -> anyhow::Result<Wan> {
        let pid = std::process::id();
        let mut ports = Vec::new();
        for (i, (cluster, ns, addr)) in members.iter().enumerate() {
            let IpAddr::V4(addr) = *addr else {
                bail!("the WAN carries IPv4 only ({cluster} has {addr})");
            };
            let name = format!("fmw{pid}x{i}");
            // Plain IP packets, one per read: no packet-information
            // header, no offloads (a WAN carries MTU-sized packets).
            let dev = tun_rs::DeviceBuilder::new()
                .name(&name)
                .mtu(MTU)
                .packet_information(false)
                .offload(false)
                .build_sync()
                .with_context(|| format!("creating TUN device {name}"))?;
            // The descriptor stays ours when the device moves.
            ip(&["link", "set", &name, "netns", ns])?;
            ip(&["-n", ns, "link", "set", &name, "up"])?;
            ports.push(Port {
                cluster: cluster.clone(),
                ns: ns.clone(),
                dev_name: name,
                addr,
                dev,
                out: Outbox {
                    queue: Mutex::new(Line::default()),
                    ready: Condvar::new(),
                },
            });
        }
        let n = ports.len();
        let now = Instant::now();
        let shared = Arc::new(Shared {
            ports,
            dirs: (0..n * n)
                .map(|_| {
                    Mutex::new(Dir {
                        imp: Impairment::default(),
                        free_at: now,
                        last_release: now,
                        stats: DirStats::default(),
                    })
                })
                .collect(),
            delivered: (0..n * n).map(|_| AtomicU64::new(0)).collect(),
            stop: AtomicBool::new(false),
            unroutable: AtomicU64::new(0),
        });
        for i in 0..n {
            let s = shared.clone();
            std::thread::Builder::new()
                .name(format!("wan-read-{i}"))
                .spawn(move || read_loop(&s, i))?;
            let s = shared.clone();
            std::thread::Builder::new()
                .name(format!("wan-write-{i}"))
                .spawn(move || write_loop(&s, i))?;
        }
        Ok(Wan {
            shared,
            attached: Mutex::new(None),
        })
    }

    fn index(&self, cluster: &str) -> anyhow::Result<usize> {
        self.shared
            .ports
            .iter()
            .position(|p| p.cluster == cluster)
            .with_context(|| format!("{cluster} is not on the WAN"))
    }

    /// Routes every cluster's traffic to every other cluster through the
    /// WAN, with TCP congestion control `congctl` (`cubic`, `bbr`,
    /// `reno`) on those routes. TCP connections made before keep their
    /// congestion control; their packets move to the WAN at once.
    pub fn attach(&self, congctl: &str) -> anyhow::Result<()> {
        for p in &self.shared.ports {
            for o in self.shared.ports.iter().filter(|o| o.addr != p.addr) {
                ip(&[
                    "-n",
                    &p.ns,
                    "route",
                    "replace",
                    &format!("{}/32", o.addr),
                    "dev",
                    &p.dev_name,
                    "src",
                    &p.addr.to_string(),
                    "congctl",
                    congctl,
                ])?;
            }
        }
        *lock(&self.attached) = Some(congctl.to_owned());
        Ok(())
    }

    /// Takes the routes away again: clusters reach each other over the
    /// bridge.
    pub fn detach(&self) {
        for p in &self.shared.ports {
            for o in self.shared.ports.iter().filter(|o| o.addr != p.addr) {
                let _ = ip(&[
                    "-n",
                    &p.ns,
                    "route",
                    "del",
                    &format!("{}/32", o.addr),
                    "dev",
                    &p.dev_name,
                ]);
            }
        }
        *lock(&self.attached) = None;
    }

    /// Sets what packets from `from` to `to` meet, from the next packet on.
    pub fn impair(&self, from: &str, to: &str, imp: Impairment) -> anyhow::Result<()> {
        let (f, t) = (self.index(from)?, self.index(to)?);
        let mut d = lock(self.shared.dir(f, t));
        d.imp = imp;
        Ok(())
    }

    /// Both directions between `a` and `b` alike.
    pub fn impair_both(&self, a: &str, b: &str, imp: Impairment) -> anyhow::Result<()> {
        self.impair(a, b, imp)?;
        self.impair(b, a, imp)
    }

    pub fn stats(&self, from: &str, to: &str) -> anyhow::Result<DirStats> {
        let (f, t) = (self.index(from)?, self.index(to)?);
        let mut s = lock(self.shared.dir(f, t)).stats;
        s.delivered =
            self.shared.delivered[f * self.shared.ports.len() + t].load(Ordering::Relaxed);
        Ok(s)
    }

    /// Packets the devices read that were for no member (or not IPv4:
    /// a namespace's IPv6 chatter, for example).
    pub fn unroutable(&self) -> u64 {
        self.shared.unroutable.load(Ordering::Relaxed)
    }

    pub fn describe(&self) -> String {
        format!(
            "TUN devices {} in the cluster namespaces, MTU {MTU}, relayed by this process{}",
            self.shared
                .ports
                .iter()
                .map(|p| p.dev_name.as_str())
                .collect::<Vec<_>>()
                .join(", "),
            match lock(&self.attached).as_deref() {
                Some(cc) => format!(" (routes attached, congctl {cc})"),
                None => String::new(),
            }
        )
    }
}

impl Drop for Wan {
    fn drop(&mut self) {
        self.detach();
        self.shared.stop.store(true, Ordering::Relaxed);
        for p in &self.shared.ports {
            p.out.ready.notify_all();
            // Deleting the device wakes its reader with an error.
            let _ = ip(&["-n", &p.ns, "link", "del", &p.dev_name]);
        }
    }
}

/// What a packet from `from` to `to` meets now: dropped (`None`), or the
/// time it leaves.
fn fate(d: &mut Dir, len: usize, now: Instant, rng: &mut impl Rng) -> Option<Instant> {
    d.stats.packets += 1;
    d.stats.bytes += len as u64;
    let imp = d.imp;
    if imp.loss_percent > 0.0 && rng.gen::<f64>() * 100.0 < imp.loss_percent {
        d.stats.lost += 1;
        return None;
    }
    let mut leave = now;
    if let Some(rate) = imp.rate_bps.filter(|r| *r > 0) {
        let start = d.free_at.max(now);
        if start.saturating_duration_since(now) > imp.queue {
            d.stats.queue_drops += 1;
            return None;
        }
        let tx = Duration::from_secs_f64(len as f64 * 8.0 / rate as f64);
        d.free_at = start + tx;
        leave = d.free_at;
    }
    let jitter = if imp.jitter.is_zero() {
        Duration::ZERO
    } else {
        imp.jitter.mul_f64(rng.gen::<f64>() * 2.0)
    };
    let at = (leave + imp.delay + jitter)
        .checked_sub(imp.jitter)
        .unwrap_or(leave)
        .max(leave);
    if imp.reorder_percent > 0.0 && rng.gen::<f64>() * 100.0 < imp.reorder_percent {
        d.stats.reordered += 1;
        let ahead = d
            .last_release
            .max(at)
            .checked_sub(REORDER_LEAD)
            .unwrap_or(now);
        return Some(ahead.max(now));
    }
    d.last_release = d.last_release.max(at);
    Some(d.last_release)
}

fn read_loop(s: &Shared, from: usize) {
    let mut buf = vec![0u8; usize::from(MTU) + 64];
    let mut rng = rand::thread_rng();
    let port = &s.ports[from];
    while !s.stop.load(Ordering::Relaxed) {
        let n = match port.dev.recv(&mut buf) {
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(_) => return,
        };
        let packet = &buf[..n];
        let to = ipv4_dst(packet).and_then(|d| s.ports.iter().position(|p| p.addr == d));
        let Some(to) = to.filter(|t| *t != from) else {
            s.unroutable.fetch_add(1, Ordering::Relaxed);
            continue;
        };
        let now = Instant::now();
        let at = {
            let mut d = lock(s.dir(from, to));
            fate(&mut d, n, now, &mut rng)
        };
        let Some(at) = at else { continue };
        let out = &s.ports[to].out;
        let mut q = lock(&out.queue);
        if q.due.len() >= MAX_QUEUED {
            drop(q);
            lock(s.dir(from, to)).stats.queue_drops += 1;
            continue;
        }
        // Wake the writer only when this packet is due before what it
        // sleeps for (with a constant delay: when the line was empty).
        let wake = q.due.peek().is_none_or(|Reverse(head)| at < head.0);
        let seq = q.seq;
        q.seq += 1;
        let mut copy = q.spare.pop().unwrap_or_default();
        copy.clear();
        copy.extend_from_slice(packet);
        q.due.push(Reverse((at, seq, from, copy)));
        drop(q);
        if wake {
            out.ready.notify_one();
        }
    }
}

fn write_loop(s: &Shared, to: usize) {
    let port = &s.ports[to];
    let n = s.ports.len();
    let mut due = Vec::new();
    // Buffers written, handed back to the readers under the lock taken
    // anyway for the next batch.
    let mut done: Vec<Vec<u8>> = Vec::new();
    loop {
        {
            let mut q = lock(&port.out.queue);
            let room = SPARE.saturating_sub(q.spare.len());
            q.spare.extend(done.drain(..).take(room));
            loop {
                if s.stop.load(Ordering::Relaxed) {
                    return;
                }
                let now = Instant::now();
                match q.due.peek() {
                    Some(Reverse(head)) if head.0 <= now => break,
                    Some(Reverse(head)) => {
                        let wait = head.0 - now;
                        q = port
                            .out
                            .ready
                            .wait_timeout(q, wait)
                            .map(|(g, _)| g)
                            .unwrap_or_else(|p| p.into_inner().0);
                    }
                    None => {
                        q = port
                            .out
                            .ready
                            .wait_timeout(q, Duration::from_millis(100))
                            .map(|(g, _)| g)
                            .unwrap_or_else(|p| p.into_inner().0);
                    }
                }
            }
            let now = Instant::now();
            while let Some(Reverse(head)) = q.due.peek() {
                if head.0 > now {
                    break;
                }
                if let Some(Reverse((_, _, from, p))) = q.due.pop() {
                    due.push((from, p));
                }
            }
        }
        for (from, p) in due.drain(..) {
            // A write hands the packet to the namespace's stack; if it
            // fails the packet is lost, as on any wire.
            if port.dev.send(&p).is_ok() {
                s.delivered[from * n + to].fetch_add(1, Ordering::Relaxed);
            } else {
                lock(s.dir(from, to)).stats.queue_drops += 1;
            }
            done.push(p);
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use rand::SeedableRng;

    fn dir(imp: Impairment, now: Instant) -> Dir {
        Dir {
            imp,
            free_at: now,
            last_release: now,
            stats: DirStats::default(),
        }
    }

    #[test]
    fn only_ipv4_packets_are_routed() {
        let mut p = [0u8; 20];
        p[0] = 0x45;
        p[16..20].copy_from_slice(&[10, 0, 0, 2]);
        assert_eq!(ipv4_dst(&p), Some(Ipv4Addr::new(10, 0, 0, 2)));
        p[0] = 0x60;
        assert_eq!(ipv4_dst(&p), None, "IPv6 is not carried");
        assert_eq!(ipv4_dst(&p[..10]), None, "a short packet");
        assert_eq!(ipv4_dst(&[]), None);
    }

    #[test]
    fn delay_keeps_order_and_loss_is_what_was_set() {
        let now = Instant::now();
        let mut rng = rand::rngs::StdRng::seed_from_u64(1);
        let mut d = dir(
            Impairment {
                delay: Duration::from_millis(15),
                jitter: Duration::from_millis(5),
                loss_percent: 1.0,
                ..Impairment::default()
            },
            now,
        );
        let mut last = now;
        let mut kept = 0u32;
        for i in 0..100_000u32 {
            let t = now + Duration::from_micros(u64::from(i) * 10);
            if let Some(at) = fate(&mut d, 1200, t, &mut rng) {
                assert!(at >= last, "jitter reordered a packet");
                assert!(
                    at >= t + Duration::from_millis(10),
                    "less than delay - jitter"
                );
                assert!(at <= t + Duration::from_millis(20) || at == last);
                last = at;
                kept += 1;
            }
        }
        let loss = 100.0 - f64::from(kept) / 1000.0;
        assert!((0.9..1.1).contains(&loss), "{loss}% lost");
        assert_eq!(d.stats.lost, u64::from(100_000 - kept));
    }

    #[test]
    fn a_rate_limit_paces_and_its_queue_is_bounded() {
        let now = Instant::now();
        let mut rng = rand::rngs::StdRng::seed_from_u64(2);
        // 12 Mbit/s: a 1500-byte packet takes 1 ms; 10 ms of queue.
        let mut d = dir(
            Impairment {
                rate_bps: Some(12_000_000),
                queue: Duration::from_millis(10),
                ..Impairment::default()
            },
            now,
        );
        let times: Vec<Option<Instant>> =
            (0..20).map(|_| fate(&mut d, 1500, now, &mut rng)).collect();
        let kept: Vec<Instant> = times.iter().flatten().copied().collect();
        assert_eq!(kept.len(), 11, "a burst beyond the queue is dropped");
        for (i, at) in kept.iter().enumerate() {
            let want = now + Duration::from_millis(i as u64 + 1);
            assert!(at.saturating_duration_since(want) < Duration::from_micros(10));
        }
        assert_eq!(d.stats.queue_drops, 9);
    }

    #[test]
    fn a_reordered_packet_overtakes_the_line() {
        let now = Instant::now();
        let mut rng = rand::rngs::StdRng::seed_from_u64(3);
        let mut d = dir(
            Impairment {
                delay: Duration::from_millis(10),
                reorder_percent: 100.0,
                ..Impairment::default()
            },
            now,
        );
        d.last_release = now + Duration::from_millis(12);
        let at = fate(&mut d, 100, now, &mut rng).unwrap();
        assert_eq!(at, now + Duration::from_millis(11));
        assert_eq!(
            d.last_release,
            now + Duration::from_millis(12),
            "the line keeps its end"
        );
    }
}
