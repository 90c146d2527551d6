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

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use fedmesh_trust::{PeerPolicy, SharedBundles, SpiffeId, SvidSource, TlsError};
use fedmesh_wire::{Header, StatusCode};
use prometheus_client::metrics::counter::Counter;
use std::sync::atomic::{AtomicBool, Ordering};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_rustls::TlsConnector;

use crate::{dial_tls, open, H2Stream, Limits, Refusal};

/// One pooled connection.
struct Leg {
    send: h2::client::SendRequest<Bytes>,
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

#[derive(Default)]
struct Slot {
    legs: Vec<Arc<Leg>>,
    /// Dials in progress: counted against the bound.
    dialing: usize,
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
    }
}

pub struct LegPool {
    connector: TlsConnector,
    source: SvidSource,
    limits: Limits,
    slots: Mutex<HashMap<(SocketAddr, SpiffeId), Slot>>,
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
            &[fedmesh_wire::ALPN_H2],
        )?;
        Ok(Self {
            connector: TlsConnector::from(Arc::new(tls)),
            source: source.clone(),
            limits,
            slots: Mutex::new(HashMap::new()),
            counts: PoolCounts::default(),
        })
    }

    /// Whether streams go through the pool at all (`pool_connections` > 0).
    pub fn enabled(&self) -> bool {
        self.limits.pool_connections > 0
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<(SocketAddr, SpiffeId), Slot>> {
        self.slots.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Opens a tunnel stream to `addr` (which must be `identity`): sends
    /// `header` and awaits the status, as [`crate::connect_one`] does on a
    /// connection of its own.
    pub async fn open(
        &self,
        addr: SocketAddr,
        identity: &SpiffeId,
        header: &Header,
    ) -> Result<H2Stream, Refusal> {
        let refuse = |code, why: String| Refusal::new(code, format!("{addr}: {why}"));
        let limit = self.limits.status_timeout;
        // A connection that died before its task noticed fails the first
        // try (opening the stream, or the header and status on it); it
        // leaves the pool and the second try dials a fresh one.
        let mut tries = 0;
        loop {
            tries += 1;
            let (leg, slot) = self.leg(addr, identity).await?;
            let mut io = match tokio::time::timeout(limit, crate::h2_open(&leg.send)).await {
                Ok(Ok(io)) => io.holding(slot),
                Ok(Err(crate::ConnectError::H2(e))) => {
                    leg.closed.store(true, Ordering::Release);
                    if tries >= 2 {
                        return Err(refuse(
                            StatusCode::UpstreamRefused,
                            format!("pooled connection: {e}"),
                        ));
                    }
                    continue;
                }
                Ok(Err(e)) => return Err(refuse(StatusCode::UpstreamRefused, e.to_string())),
                Err(_) => {
                    return Err(refuse(
                        StatusCode::Timeout,
                        "no pooled stream slot freed in time".into(),
                    ))
                }
            };
            self.counts.streams.inc();
            match open(&mut io, header, &self.limits).await {
                Ok(()) => return Ok(io),
                Err(e) => {
                    if !io.connection_lost() {
                        return Err(refuse(e.status(), e.to_string()));
                    }
                    leg.closed.store(true, Ordering::Release);
                    if tries >= 2 {
                        return Err(refuse(
                            StatusCode::UpstreamRefused,
                            format!("pooled connection: {e}"),
                        ));
                    }
                }
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
    ) -> Result<(H2Stream, SocketAddr), Refusal>
    where
        I: IntoIterator<Item = (SocketAddr, SpiffeId)>,
    {
        let mut last = Refusal::new(StatusCode::NoHealthyEndpoint, "no endpoint to try");
        for (addr, identity) in targets.into_iter().take(self.limits.max_attempts) {
            match self.open(addr, &identity, header).await {
                Ok(s) => return Ok((s, addr)),
                Err(r) if r.retryable() => {
                    tracing::debug!(code = %r.code, reason = %r.message, "next hop failed; trying the next");
                    last = r;
                }
                Err(r) => return Err(r),
            }
        }
        Err(last)
    }

    /// A pooled connection with a free stream slot: an open one, else a
    /// new one while the bound allows, else the first slot freed.
    async fn leg(
        &self,
        addr: SocketAddr,
        identity: &SpiffeId,
    ) -> Result<(Arc<Leg>, OwnedSemaphorePermit), Refusal> {
        let generation = self.source.generation();
        let key = (addr, identity.clone());
        let wait_on = {
            let mut slots = self.lock();
            let slot = slots.entry(key.clone()).or_default();
            // Closed and pre-renewal connections leave the pool; a
            // pre-renewal one drains as its streams end.
            slot.legs.retain(|l| l.usable(generation));
            for l in &slot.legs {
                if let Ok(p) = l.slots.clone().try_acquire_owned() {
                    return Ok((l.clone(), p));
                }
            }
            if slot.legs.len() + slot.dialing < self.limits.pool_connections {
                slot.dialing += 1;
                None
            } else {
                slot.legs
                    .iter()
                    .max_by_key(|l| l.slots.available_permits())
                    .cloned()
            }
        };
        if let Some(l) = wait_on {
            return match tokio::time::timeout(
                self.limits.status_timeout,
                l.slots.clone().acquire_owned(),
            )
            .await
            {
                Ok(Ok(p)) if l.usable(generation) => Ok((l, p)),
                _ => {
                    self.counts.overloaded.inc();
                    Err(Refusal::new(
                        StatusCode::Overloaded,
                        format!("{addr}: every pooled stream slot stayed taken"),
                    ))
                }
            };
        }
        let dialed = self.dial(addr, identity, generation).await;
        let mut slots = self.lock();
        let slot = slots.entry(key).or_default();
        slot.dialing = slot.dialing.saturating_sub(1);
        let leg = Arc::new(dialed?);
        slot.legs.push(leg.clone());
        let permit =
            leg.slots.clone().try_acquire_owned().map_err(|_| {
                Refusal::new(StatusCode::Overloaded, format!("{addr}: no stream slot"))
            })?;
        Ok((leg, permit))
    }

    async fn dial(
        &self,
        addr: SocketAddr,
        identity: &SpiffeId,
        generation: u64,
    ) -> Result<Leg, Refusal> {
        let refuse =
            |why: String| Refusal::new(StatusCode::UpstreamRefused, format!("{addr}: {why}"));
        self.counts.dials.inc();
        let tls = dial_tls(addr, &self.connector, identity, self.limits.connect_timeout)
            .await
            .map_err(|e| refuse(e.to_string()))?;
        if tls.get_ref().1.alpn_protocol() != Some(fedmesh_wire::ALPN_H2) {
            return Err(refuse(
                "does not speak pooled streams (fedmesh-h2/1)".into(),
            ));
        }
        let (send, mut conn) = tokio::time::timeout(
            self.limits.connect_timeout,
            crate::h2_client(&self.limits, crate::H2Windows::pooled(&self.limits))
                .handshake::<_, Bytes>(tls),
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
        Ok(Leg {
            send,
            slots,
            generation,
            closed,
        })
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
