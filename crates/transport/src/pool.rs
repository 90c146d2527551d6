//! Pooled, multiplexed mTLS legs: a few long-lived TLS connections per
//! next hop, each carrying many tunnel streams as HTTP/2 `CONNECT`
//! streams (ALPN `fedmesh-h2/1`), so a new tunneled connection costs a
//! stream, not a TCP and TLS handshake.
//!
//! Bounds (`limits`): `pool_connections` connections per next hop,
//! `pool_streams_per_connection` streams on each (a stream slot is held
//! by the stream and freed when it is dropped); when every slot of a full
//! pool is taken, a new stream waits for one up to `status_timeout`, then
//! is refused `overloaded`. HTTP/2 flow control is per stream, so a slow
//! reader holds back only its own stream. A connection with no stream for
//! `pool_idle_timeout` is closed; one that fails (reset, silent past its
//! keep-alive) fails only its own streams and leaves the pool, and the
//! next stream dials a fresh one. When this side's SVID is renewed, new
//! streams go to new connections (the new certificate is presented at
//! the next handshake) and the old connections drain: they close once
//! their last stream ends.
//!
//! A next hop of an older version that speaks only `fedmesh/1` (ALPN
//! tells, at the handshake) gets what it got before pooling: the dialed
//! connection carries the one stream, and until that hop answers
//! `fedmesh-h2/1` every stream to it dials a connection of its own,
//! outside the pool's bounds. So a mesh upgrades one proxy at a time.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use fedmesh_trust::{PeerPolicy, SharedBundles, SpiffeId, SvidSource, TlsError};
use fedmesh_wire::{Header, StatusCode};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use std::sync::atomic::{AtomicBool, Ordering};

use tokio::sync::{watch, OwnedSemaphorePermit, Semaphore};
use tokio_rustls::TlsConnector;

use crate::{dial_tls, open, Limits, Refusal, TlsClient, TunnelIo};

/// One pooled connection.
struct Leg {
    send: h2::client::SendRequest<crate::SendBuf>,
    /// Free stream slots.
    slots: Arc<Semaphore>,
    /// The SVID it was dialed with ([`SvidSource::generation`]).
    generation: u64,
    /// Set once the connection ended or is being retired.
    closed: Arc<AtomicBool>,
}

impl Leg {
    fn usable(&self, generation: u64) -> bool {
        !self.closed.load(Ordering::Acquire) && self.generation == generation
    }
}

struct Slot {
    legs: Vec<Arc<Leg>>,
    /// Dials in progress: counted against the bound.
    dialing: usize,
    /// Told whenever a dial ends: streams that found every connection the
    /// bound allows still being dialed wait for it.
    dialed: watch::Sender<()>,
    /// The last dial found a next hop that speaks only `fedmesh/1`.
    single: bool,
}

impl Slot {
    /// Nothing usable open, nothing being dialed, nobody waiting for a
    /// dial: the entry may go (a next hop reached again starts afresh).
    fn unused(&mut self, generation: u64) -> bool {
        self.legs.retain(|l| l.usable(generation));
        self.legs.is_empty() && self.dialing == 0 && self.dialed.receiver_count() == 0
    }
}

/// The map's size below which it is never swept.
const SWEEP_MIN: usize = 64;

/// Drops the entries of next hops no longer in use once the map has
/// doubled since the last sweep (so a sweep costs O(1) per new next hop,
/// amortised); returns the size at which the next sweep is due. Without
/// it every (address, identity) ever dialed stayed: pods come and go.
fn sweep<K: Eq + std::hash::Hash>(
    slots: &mut HashMap<K, Slot>,
    generation: u64,
    due: usize,
) -> usize {
    if slots.len() < due {
        return due;
    }
    slots.retain(|_, s| !s.unused(generation));
    (slots.len() * 2).max(SWEEP_MIN)
}

type HopKey = (SocketAddr, SpiffeId);

/// What the pool keeps per next hop, and the map's size at which it is
/// next swept ([`sweep`]).
struct Hops {
    slots: HashMap<HopKey, Slot>,
    sweep_due: usize,
}

impl Hops {
    /// `key`'s entry; before a new one is made, the map is swept if due.
    fn slot(&mut self, key: &HopKey, generation: u64) -> &mut Slot {
        if !self.slots.contains_key(key) {
            self.sweep_due = sweep(&mut self.slots, generation, self.sweep_due);
        }
        self.slots.entry(key.clone()).or_default()
    }
}

impl Default for Slot {
    fn default() -> Self {
        Self {
            legs: Vec::new(),
            dialing: 0,
            dialed: watch::channel(()).0,
            single: false,
        }
    }
}

/// What a stream does next to get a connection.
enum Next {
    Dial { counted: bool },
    Slot(Arc<Leg>),
    Dialed(watch::Receiver<()>),
}

/// A dialed connection: pooled, or one stream's own (`fedmesh/1`).
enum Dialed {
    Leg(Leg),
    Single(Box<TlsClient>),
}

/// Where the next stream goes.
enum Got {
    Leg(Arc<Leg>, OwnedSemaphorePermit),
    Single(Box<TlsClient>),
}

/// What the pool has done (Prometheus counters the owner registers).
#[derive(Debug, Default, Clone)]
pub struct PoolCounts {
    /// Connections dialed (TCP + TLS + HTTP/2 handshakes).
    pub dials: Counter,
    /// Streams opened on a pooled connection.
    pub streams: Counter,
    /// Streams refused because every slot stayed taken.
    pub overloaded: Counter,
    /// Streams on a connection of their own: the next hop speaks only
    /// `fedmesh/1` (an older version).
    pub unpooled: Counter,
    /// Streams waiting now for a stream slot (or for a dial under way).
    pub waiting: Gauge,
}

/// Counts a stream as waiting while it lives.
struct Waiting<'a>(&'a Gauge);

impl<'a> Waiting<'a> {
    fn new(g: &'a Gauge) -> Self {
        g.inc();
        Self(g)
    }
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.dec();
    }
}

impl PoolCounts {
    /// Registers the counters as `<prefix>_dials_total` and so on.
    pub fn register(
        &self,
        reg: &mut prometheus_client::registry::Registry,
        prefix: &str,
        what: &str,
    ) {
        reg.register(
            format!("{prefix}_dials"),
            format!("Pooled connections dialed to {what} (TCP, TLS and HTTP/2 handshakes)"),
            self.dials.clone(),
        );
        reg.register(
            format!("{prefix}_streams"),
            format!("Tunnel streams opened on pooled connections to {what}"),
            self.streams.clone(),
        );
        reg.register(
            format!("{prefix}_overloaded"),
            format!("Streams to {what} refused because every pooled stream slot stayed taken for the status timeout"),
            self.overloaded.clone(),
        );
        reg.register(
            format!("{prefix}_unpooled"),
            format!("Streams to {what} carried on a connection of their own because the next hop speaks only fedmesh/1 (an older version)"),
            self.unpooled.clone(),
        );
        reg.register(
            format!("{prefix}_waiting"),
            format!("Streams to {what} waiting now for a pooled stream slot (bounded by the status timeout)"),
            self.waiting.clone(),
        );
    }
}

pub struct LegPool {
    connector: TlsConnector,
    source: SvidSource,
    limits: Limits,
    hops: Mutex<Hops>,
    pub counts: PoolCounts,
}

impl LegPool {
    /// A pool presenting `source`'s SVID (renewals included) and checking
    /// each next hop's exact identity after the handshake.
    pub fn new(
        source: &SvidSource,
        bundles: SharedBundles,
        limits: Limits,
    ) -> Result<Self, TlsError> {
        let tls = fedmesh_trust::client_config_from(
            source,
            bundles,
            PeerPolicy::AnyTrusted,
            // Servers choose by their own preference: a current one
            // `fedmesh-h2/1`, an older one the only one it knows.
            &[fedmesh_wire::ALPN_H2, fedmesh_wire::ALPN],
        )?;
        Ok(Self {
            connector: TlsConnector::from(Arc::new(tls)),
            source: source.clone(),
            limits,
            hops: Mutex::new(Hops {
                slots: HashMap::new(),
                sweep_due: SWEEP_MIN,
            }),
            counts: PoolCounts::default(),
        })
    }

    /// Whether streams go through the pool at all (`pool_connections` > 0).
    pub fn enabled(&self) -> bool {
        self.limits.pool_connections > 0
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Hops> {
        self.hops.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Opens a tunnel stream to `addr` (which must be `identity`): sends
    /// `header` and awaits the status, as [`crate::connect_one`] does on a
    /// connection of its own.
    pub async fn open(
        &self,
        addr: SocketAddr,
        identity: &SpiffeId,
        header: &Header,
    ) -> Result<Box<dyn TunnelIo>, Refusal> {
        let refuse = |code, why: String| Refusal::new(code, format!("{addr}: {why}"));
        let limit = self.limits.status_timeout;
        // A connection that died before its task noticed fails the first
        // try (opening the stream, or the header and status on it); it
        // leaves the pool and the second try dials a fresh one.
        let mut tries = 0;
        loop {
            tries += 1;
            let (leg, slot) = match self.leg(addr, identity).await? {
                Got::Leg(leg, slot) => (leg, slot),
                Got::Single(mut tls) => {
                    self.counts.unpooled.inc();
                    return match open(&mut *tls, header, &self.limits).await {
                        Ok(()) => Ok(tls),
                        Err(e) => Err(refuse(e.status(), e.to_string())),
                    };
                }
            };
            // Opening fails only on a connection that is gone.
            let lost = match tokio::time::timeout(limit, crate::h2_open(&leg.send)).await {
                Err(_) => {
                    return Err(refuse(
                        StatusCode::Timeout,
                        "no pooled stream slot freed in time".into(),
                    ))
                }
                Ok(Err(e)) => e.to_string(),
                Ok(Ok(io)) => {
                    let mut io = io.holding(slot);
                    self.counts.streams.inc();
                    match open(&mut io, header, &self.limits).await {
                        Ok(()) => return Ok(Box::new(io)),
                        Err(e) if io.connection_lost() => e.to_string(),
                        Err(e) => return Err(refuse(e.status(), e.to_string())),
                    }
                }
            };
            leg.closed.store(true, Ordering::Release);
            if tries >= 2 {
                return Err(refuse(
                    StatusCode::UpstreamRefused,
                    format!("pooled connection: {lost}"),
                ));
            }
        }
    }

    /// [`LegPool::open`] on each `(address, identity)` in order, at most
    /// `limits.max_attempts`, moving on after a retryable refusal, as
    /// [`crate::connect_first`] does with connections of their own.
    pub async fn open_first<I>(
        &self,
        targets: I,
        header: &Header,
    ) -> Result<(Box<dyn TunnelIo>, SocketAddr), Refusal>
    where
        I: IntoIterator<Item = (SocketAddr, SpiffeId)>,
    {
        let mut last = Refusal::new(StatusCode::NoHealthyEndpoint, "no endpoint to try");
        for (addr, identity) in targets.into_iter().take(self.limits.max_attempts) {
            match self.open(addr, &identity, header).await {
                Ok(s) => return Ok((s, addr)),
                Err(r) if r.retryable() => {
                    tracing::debug!(code = %r.code, reason = %fedmesh_wire::bounded(&r.message), "next hop failed; trying the next");
                    last = r;
                }
                Err(r) => return Err(r),
            }
        }
        Err(last)
    }

    /// A pooled connection with a free stream slot: an open one, else a
    /// new one while the bound allows, else the first slot freed; or a
    /// connection of the stream's own to a next hop that does not pool.
    async fn leg(&self, addr: SocketAddr, identity: &SpiffeId) -> Result<Got, Refusal> {
        let generation = self.source.generation();
        let key = (addr, identity.clone());
        let deadline = tokio::time::Instant::now() + self.limits.status_timeout;
        let overloaded = || {
            self.counts.overloaded.inc();
            Refusal::new(
                StatusCode::Overloaded,
                format!("{addr}: every pooled stream slot stayed taken"),
            )
        };
        let counted = loop {
            let next = {
                let mut hops = self.lock();
                let slot = hops.slot(&key, generation);
                // Closed and pre-renewal connections leave the pool; a
                // pre-renewal one drains as its streams end.
                slot.legs.retain(|l| l.usable(generation));
                for l in &slot.legs {
                    if let Ok(p) = l.slots.clone().try_acquire_owned() {
                        return Ok(Got::Leg(l.clone(), p));
                    }
                }
                if slot.single && slot.legs.is_empty() {
                    // A connection per stream, as before pooling.
                    Next::Dial { counted: false }
                } else if slot.legs.len() + slot.dialing < self.limits.pool_connections {
                    slot.dialing += 1;
                    Next::Dial { counted: true }
                } else if let Some(l) = slot.legs.iter().max_by_key(|l| l.slots.available_permits())
                {
                    Next::Slot(l.clone())
                } else {
                    // Every connection the bound allows is being dialed.
                    Next::Dialed(slot.dialed.subscribe())
                }
            };
            match next {
                Next::Dial { counted } => break counted,
                Next::Slot(l) => {
                    let _waiting = Waiting::new(&self.counts.waiting);
                    return match tokio::time::timeout_at(deadline, l.slots.clone().acquire_owned())
                        .await
                    {
                        Ok(Ok(p)) if l.usable(generation) => Ok(Got::Leg(l, p)),
                        _ => Err(overloaded()),
                    };
                }
                Next::Dialed(mut done) => {
                    let _waiting = Waiting::new(&self.counts.waiting);
                    if tokio::time::timeout_at(deadline, done.changed())
                        .await
                        .is_err()
                    {
                        return Err(overloaded());
                    }
                }
            }
        };
        // Settled when the dial ends, or when the caller gives up on it
        // mid-dial: a dial counted forever would hold a connection's place
        // in the bound, and streams waiting for it would wait in vain.
        let dialing = DialGuard {
            pool: self,
            key: Some(key.clone()),
            counted,
        };
        let dialed = self.dial(addr, identity, generation).await;
        let mut hops = self.lock();
        dialing.settle(&mut hops);
        let slot = hops.slot(&key, generation);
        let leg = match dialed? {
            Dialed::Single(tls) => {
                if !slot.single {
                    tracing::info!(%addr, "next hop speaks only fedmesh/1 (an older version): one connection per stream to it until it pools");
                    slot.single = true;
                }
                return Ok(Got::Single(tls));
            }
            Dialed::Leg(leg) => Arc::new(leg),
        };
        if slot.single {
            tracing::info!(%addr, "next hop now pools streams (fedmesh-h2/1)");
            slot.single = false;
        }
        slot.legs.push(leg.clone());
        let permit =
            leg.slots.clone().try_acquire_owned().map_err(|_| {
                Refusal::new(StatusCode::Overloaded, format!("{addr}: no stream slot"))
            })?;
        Ok(Got::Leg(leg, permit))
    }

    async fn dial(
        &self,
        addr: SocketAddr,
        identity: &SpiffeId,
        generation: u64,
    ) -> Result<Dialed, Refusal> {
        let refuse =
            |why: String| Refusal::new(StatusCode::UpstreamRefused, format!("{addr}: {why}"));
        let mut tls = dial_tls(addr, &self.connector, identity, self.limits.connect_timeout)
            .await
            .map_err(|e| refuse(e.to_string()))?;
        match tls.get_ref().1.alpn_protocol() {
            Some(p) if p == fedmesh_wire::ALPN_H2 => {
                self.counts.dials.inc();
                tls.get_mut().1.set_buffer_limit(Some(crate::H2_TLS_BUFFER));
            }
            Some(p) if p == fedmesh_wire::ALPN => return Ok(Dialed::Single(Box::new(tls))),
            _ => return Err(refuse("agreed on no tunnel protocol (ALPN)".into())),
        }
        let (send, mut conn) = tokio::time::timeout(
            self.limits.connect_timeout,
            crate::h2_client(&self.limits, crate::H2Windows::pooled(&self.limits))
                .handshake::<_, crate::SendBuf>(tls),
        )
        .await
        .map_err(|_| refuse("HTTP/2 handshake timed out".into()))?
        .map_err(|e| refuse(format!("HTTP/2 handshake: {e}")))?;
        let streams = self.limits.pool_streams_per_connection as usize;
        let slots = Arc::new(Semaphore::new(streams));
        let closed = Arc::new(AtomicBool::new(false));
        let tx = closed.clone();
        let pings = conn.ping_pong();
        let (interval, dead) = (self.limits.keep_alive, self.limits.h2_dead_after());
        let idle = self.limits.pool_idle_timeout;
        let watch_slots = slots.clone();
        tokio::spawn(async move {
            let why = tokio::select! {
                r = &mut conn => match r {
                    Ok(()) => "closed",
                    Err(e) => {
                        tracing::debug!(%addr, error = %e, "pooled connection failed");
                        "failed"
                    }
                },
                why = crate::h2_keep_alive(pings, interval, dead) => why,
                () = idle_out(&watch_slots, streams, idle, &tx) => "idle",
            };
            tracing::debug!(%addr, reason = why, "pooled connection ended");
            tx.store(true, Ordering::Release);
        });
        Ok(Dialed::Leg(Leg {
            send,
            slots,
            generation,
            closed,
        }))
    }
}

/// A dial under way: when it ends or is dropped, it no longer counts
/// against the bound, and the streams waiting for it look again.
struct DialGuard<'a> {
    pool: &'a LegPool,
    key: Option<HopKey>,
    counted: bool,
}

impl DialGuard<'_> {
    fn settle(mut self, hops: &mut Hops) {
        if let Some(key) = self.key.take() {
            Self::release(hops, &key, self.counted);
        }
    }

    fn release(hops: &mut Hops, key: &HopKey, counted: bool) {
        if let Some(slot) = hops.slots.get_mut(key) {
            if counted {
                slot.dialing = slot.dialing.saturating_sub(1);
            }
            slot.dialed.send_replace(());
        }
    }
}

impl Drop for DialGuard<'_> {
    fn drop(&mut self) {
        if let Some(key) = self.key.take() {
            Self::release(&mut self.pool.lock(), &key, self.counted);
        }
    }
}

/// Returns once the connection has had no stream for `idle`; it is marked
/// closed first, so the pool hands out none of its slots meanwhile.
async fn idle_out(slots: &Semaphore, all: usize, idle: Duration, closed: &AtomicBool) {
    let tick = (idle / 4).max(Duration::from_millis(10));
    let mut idle_since: Option<Instant> = None;
    loop {
        tokio::time::sleep(tick).await;
        if slots.available_permits() < all {
            idle_since = None;
            continue;
        }
        let since = *idle_since.get_or_insert_with(Instant::now);
        if since.elapsed() >= idle {
            closed.store(true, Ordering::Release);
            // A stream that took a slot just before the mark keeps the
            // connection until it ends.
            let _ = slots.acquire_many(all as u32).await;
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Entries of next hops no longer in use go once the map has doubled;
    /// one with a dial under way, or a stream waiting for one, stays.
    #[test]
    fn next_hops_no_longer_used_are_swept() {
        let mut slots: HashMap<u32, Slot> = (0..100).map(|k| (k, Slot::default())).collect();
        if let Some(s) = slots.get_mut(&7) {
            s.dialing = 1;
        }
        let waiter = slots[&8].dialed.subscribe();
        // Below the size due: untouched.
        assert_eq!(sweep(&mut slots, 0, 101), 101);
        assert_eq!(slots.len(), 100);
        let due = sweep(&mut slots, 0, 100);
        let mut left: Vec<u32> = slots.keys().copied().collect();
        left.sort_unstable();
        assert_eq!(left, [7, 8]);
        assert_eq!(due, SWEEP_MIN);
        drop(waiter);
        if let Some(s) = slots.get_mut(&7) {
            s.dialing = 0;
        }
        sweep(&mut slots, 0, 0);
        assert!(slots.is_empty());
    }
}
