//! The link to one peer gateway as a value: which connection streams are
//! handed, which are draining, when to dial, adopt, back off, probe and
//! close. No I/O and no clock: [`Link::on`] takes an event and the time
//! and returns what to do; [`Link::poll_timeout`] says when to call it
//! with [`Event::Tick`] next. The pool's driver ([`crate::pool`]) does
//! the dialing, watching and closing and feeds the results back in, so
//! every race between them is a sequence of events a test can replay on
//! virtual time.
//!
//! States (the [`Phase`]; `docs/architecture.md` has the table):
//! - **Awaiting** the peer's dial (only the side that does not [`dials`]),
//!   for [`Settings::adopt_grace`]; then it dials itself.
//! - **Dialing** QUIC, or TCP when QUIC met silence (or UDP is known
//!   blocked) and the peer offers a fallback address.
//! - **Up** on one installed connection; every stream is handed it and
//!   holds a lease on it. Over TCP a QUIC handshake is probed every
//!   [`Settings::quic_retry`].
//! - **Backoff** after a failed dial or a connection that died young.
//! - **Removed**: the peer left the catalog; everything closes.
//!
//! A connection that stops being installed (the peer's dial replaced
//! ours, QUIC replaced the TCP fallback, the peer's address changed) is
//! *draining*: it closes once its last lease ends (or after
//! [`Settings::drain_max`]), never before. Only a dead connection (silent,
//! failed under a stream, closed) or a removed peer is closed under its
//! leases.
//!
//! [`dials`]: crate::pool::dials

use std::collections::BTreeMap;
use std::time::Duration;

use tokio::time::Instant;

use crate::transport::Transport;

/// A connection, numbered by the driver (unique per pool).
pub type ConnId = u64;
/// A dial this link asked for; a result for one it gave up on is closed.
pub type Attempt = u64;

/// Application close code for connections we close on purpose.
pub const CLOSE_POLICY: u32 = 1;
/// Application close code for a connection declared dead for silence.
pub const CLOSE_SILENT: u32 = 2;
/// Application close code for our own dial, folded into the pair's one
/// connection (the peer's dial) once its streams ended.
pub const CLOSE_FOLDED: u32 = 3;

/// Who dialed a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    Us,
    /// The peer dialed and we adopted it: one connection per pair.
    Peer,
}

impl Origin {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Us => "us",
            Self::Peer => "peer",
        }
    }
}

/// Why a dial failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DialError {
    /// Nothing came back within the connect timeout: the path may drop
    /// UDP, or the peer is gone.
    Silent(String),
    /// The peer answered and refused (or we refused it), or the dial
    /// could not start.
    Refused(String),
}

impl DialError {
    fn message(&self) -> &str {
        match self {
            Self::Silent(m) | Self::Refused(m) => m,
        }
    }
}

#[derive(Debug, Clone)]
pub enum Event {
    /// The peer's QUIC dial, accepted and identified.
    Adopted(ConnId),
    /// A dial asked for by [`Action::Dial`] ended.
    Dialed {
        attempt: Attempt,
        result: Result<(ConnId, Transport), DialError>,
    },
    /// A connection closed, whoever closed it.
    Closed { conn: ConnId, reason: String },
    /// Nothing arrived on a connection for the dead-after time.
    Silent(ConnId),
    /// A stream on the connection failed at the connection level (for
    /// example the peer refused our certificate, which TLS 1.3 reveals
    /// only at the first stream).
    Failed(ConnId),
    /// A stream handed the connection ended: its lease is returned.
    StreamEnded(ConnId),
    /// A stream waits for a first connection: skip the backoff.
    Wanted,
    /// The catalog changed the peer's address, fallback address or
    /// identity.
    Moved { identity: bool, has_tcp: bool },
    /// The peer left the catalog.
    Removed,
    /// Time passed: deadlines at or before `now` fire.
    Tick,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    Dial {
        attempt: Attempt,
        transport: Transport,
    },
    /// Serve the peer's streams on our QUIC dial: the pair shares it.
    Serve(ConnId),
    /// Close the connection; with `linger`, a few round trips from now so
    /// the last bytes of its streams can be acknowledged first.
    Close {
        conn: ConnId,
        code: u32,
        reason: &'static str,
        linger: bool,
    },
    /// A connect result is known: streams waiting for one look again.
    Settled,
    /// Reports for logs and metrics.
    Note(Note),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Note {
    /// `conn` is installed: new streams are handed it.
    Up {
        conn: ConnId,
        transport: Transport,
        origin: Origin,
        /// It replaced the connection streams were handed before.
        replaced: Option<Transport>,
    },
    /// The installed connection was lost; nothing is installed.
    Down { reason: String },
    /// A dial failed; `failures` in a row.
    ConnectFailed { error: String, failures: u32 },
    /// QUIC met silence and TCP worked.
    FellBack,
    /// A QUIC probe beside the TCP fallback failed.
    ProbeFailed { error: String },
    /// An installed QUIC connection went silent.
    Silent,
    /// The peer left the catalog; its connections are closed.
    Removed,
}

/// What a link needs to decide, fixed per peer.
#[derive(Debug, Clone)]
pub struct Settings {
    /// This side dials the pair's connection.
    pub we_dial: bool,
    /// The peer offers a TCP fallback address.
    pub has_tcp: bool,
    /// How long the side that does not dial waits for the peer's dial.
    pub adopt_grace: Duration,
    /// How often QUIC is tried again while on the TCP fallback.
    pub quic_retry: Duration,
    /// A connection closing sooner after it opened counts as a failure.
    pub min_healthy: Duration,
    /// A draining connection is closed after this even under leases.
    pub drain_max: Duration,
    pub backoff_base: Duration,
    pub backoff_max: Duration,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            we_dial: true,
            has_tcp: false,
            adopt_grace: Duration::from_millis(500),
            quic_retry: Duration::from_secs(10),
            min_healthy: Duration::from_secs(1),
            drain_max: Duration::from_secs(300),
            backoff_base: Duration::from_millis(100),
            backoff_max: Duration::from_secs(2),
        }
    }
}

/// Where the link is; see the module docs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    Awaiting {
        until: Instant,
    },
    Dialing {
        attempt: Attempt,
        transport: Transport,
        /// QUIC met silence just before: a TCP failure now is that
        /// silence, and a TCP success means UDP is blocked.
        after_silence: bool,
    },
    Up {
        conn: ConnId,
    },
    Backoff {
        until: Instant,
    },
    Removed,
}

#[derive(Debug, Clone)]
struct Conn {
    transport: Transport,
    origin: Origin,
    opened: Instant,
    leases: usize,
    /// Set once it no longer is installed: (since, close code, reason).
    draining: Option<(Instant, u32, &'static str)>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Probe {
    At(Instant),
    InFlight(Attempt),
}

/// What [`Link::admit`] says of a stream that finds no connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admit {
    /// A connect is under way or due; wait for [`Action::Settled`].
    Wait,
    /// The peer is down: fail over now.
    Down,
}

/// One peer's connection lifecycle.
#[derive(Debug, Clone)]
pub struct Link {
    settings: Settings,
    phase: Phase,
    conns: BTreeMap<ConnId, Conn>,
    probe: Option<Probe>,
    next_attempt: Attempt,
    failures: u32,
    /// The last connect failed or the connection died.
    down: bool,
    /// A connection once stayed up for `min_healthy`: until then the peer
    /// is starting (its catalog may not list us yet) and streams wait.
    healthy_once: bool,
    /// The peer answered the last failed attempt rather than staying
    /// silent: alive, maybe not ready for us yet.
    answered: bool,
    /// QUIC met silence and TCP worked; cleared when QUIC works again.
    udp_blocked: bool,
    last_error: String,
    /// xorshift state for backoff jitter (seeded, so tests replay).
    rng: u64,
}

impl Link {
    /// A link that starts connecting at `now`.
    pub fn new(settings: Settings, seed: u64, now: Instant) -> (Self, Vec<Action>) {
        let mut link = Self {
            settings,
            phase: Phase::Removed,
            conns: BTreeMap::new(),
            probe: None,
            next_attempt: 0,
            failures: 0,
            down: false,
            healthy_once: false,
            answered: false,
            udp_blocked: false,
            last_error: String::new(),
            rng: seed | 1,
        };
        let mut out = Vec::new();
        link.connect(now, &mut out);
        (link, out)
    }

    #[cfg(test)]
    pub fn phase(&self) -> Phase {
        self.phase
    }

    /// The connection streams are handed now, if any.
    pub fn installed(&self) -> Option<ConnId> {
        match self.phase {
            Phase::Up { conn } => Some(conn),
            _ => None,
        }
    }

    /// The installed connection: its transport, who dialed it and when
    /// it opened.
    pub fn installed_info(&self) -> Option<(Transport, Origin, Instant)> {
        let c = self.conns.get(&self.installed()?)?;
        Some((c.transport, c.origin, c.opened))
    }

    #[cfg(test)]
    /// Connections this link holds (installed and draining).
    pub fn conns(&self) -> impl Iterator<Item = ConnId> + '_ {
        self.conns.keys().copied()
    }

    #[cfg(test)]
    /// Leases held on `conn`.
    pub fn leases(&self, conn: ConnId) -> usize {
        self.conns.get(&conn).map_or(0, |c| c.leases)
    }

    pub fn udp_blocked(&self) -> bool {
        self.udp_blocked
    }

    pub fn last_error(&self) -> &str {
        &self.last_error
    }

    pub fn is_removed(&self) -> bool {
        self.phase == Phase::Removed
    }

    /// Hands the installed connection to one stream: the lease is
    /// returned with [`Event::StreamEnded`].
    pub fn lease(&mut self) -> Option<ConnId> {
        let id = self.installed()?;
        let c = self.conns.get_mut(&id)?;
        c.leases += 1;
        Some(id)
    }

    /// What a stream that finds no connection does: waits while the peer
    /// was never down, or is starting and answered; otherwise fails over.
    pub fn admit(&self) -> Admit {
        let starting = !self.healthy_once && self.answered;
        if self.is_removed() || (self.down && !starting) {
            Admit::Down
        } else {
            Admit::Wait
        }
    }

    /// The next deadline; call [`Link::on`] with [`Event::Tick`] then.
    pub fn poll_timeout(&self) -> Option<Instant> {
        let phase = match self.phase {
            Phase::Awaiting { until } | Phase::Backoff { until } => Some(until),
            Phase::Up { conn } if !self.healthy_once => self
                .conns
                .get(&conn)
                .map(|c| c.opened + self.settings.min_healthy),
            _ => None,
        };
        let probe = match self.probe {
            Some(Probe::At(at)) => Some(at),
            _ => None,
        };
        let drains = self.conns.values().filter_map(|c| {
            c.draining
                .map(|(since, ..)| since + self.settings.drain_max)
        });
        phase.into_iter().chain(probe).chain(drains).min()
    }

    pub fn on(&mut self, event: Event, now: Instant) -> Vec<Action> {
        let mut out = Vec::new();
        if self.is_removed() {
            // Nothing new is kept for a removed peer.
            match event {
                Event::Adopted(conn)
                | Event::Dialed {
                    result: Ok((conn, _)),
                    ..
                } => out.push(close(conn, CLOSE_POLICY, "peer removed", false)),
                _ => {}
            }
            return out;
        }
        match event {
            Event::Adopted(conn) => {
                if self.settings.we_dial {
                    // Our dial is the pair's: the accept path serves the
                    // peer's streams on theirs, we hand ours out.
                    return out;
                }
                self.install(conn, Transport::Quic, Origin::Peer, now, &mut out);
            }
            Event::Dialed { attempt, result } => self.dialed(attempt, result, now, &mut out),
            Event::Closed { conn, reason } => self.lost(conn, reason, None, now, &mut out),
            Event::Silent(conn) => {
                if self.installed() == Some(conn) {
                    out.push(Action::Note(Note::Silent));
                }
                self.lost(
                    conn,
                    "peer silent".into(),
                    Some((CLOSE_SILENT, "peer silent")),
                    now,
                    &mut out,
                );
            }
            Event::Failed(conn) => self.lost(
                conn,
                "connection failed under a stream".into(),
                Some((CLOSE_POLICY, "connection failed")),
                now,
                &mut out,
            ),
            Event::StreamEnded(conn) => {
                if let Some(c) = self.conns.get_mut(&conn) {
                    c.leases = c.leases.saturating_sub(1);
                    if c.leases == 0 {
                        if let Some((_, code, reason)) = c.draining {
                            self.conns.remove(&conn);
                            out.push(close(conn, code, reason, true));
                        }
                    }
                }
            }
            Event::Wanted => {
                if let Phase::Backoff { .. } = self.phase {
                    if !self.healthy_once {
                        self.connect(now, &mut out);
                    }
                }
            }
            Event::Moved { identity, has_tcp } => {
                self.settings.has_tcp = has_tcp;
                // A new path: what we learned of the old one is moot.
                self.udp_blocked = false;
                self.probe = None;
                match self.installed() {
                    // The peer's own dial does not depend on the address
                    // we know for it; a new identity is another peer.
                    Some(id) if !identity && self.conns[&id].origin == Origin::Peer => {}
                    Some(id) => {
                        self.drain(id, CLOSE_POLICY, "peer address changed", now, &mut out);
                        self.connect(now, &mut out);
                    }
                    None => {
                        self.failures = 0;
                        self.connect(now, &mut out);
                    }
                }
            }
            Event::Removed => {
                for (id, _) in std::mem::take(&mut self.conns) {
                    out.push(close(id, CLOSE_POLICY, "peer removed", false));
                }
                self.phase = Phase::Removed;
                self.probe = None;
                self.down = true;
                self.last_error = "peer removed from the catalog".into();
                out.push(Action::Settled);
                out.push(Action::Note(Note::Removed));
            }
            Event::Tick => self.tick(now, &mut out),
        }
        out
    }

    fn tick(&mut self, now: Instant, out: &mut Vec<Action>) {
        match self.phase {
            Phase::Awaiting { until } if until <= now => {
                let attempt = self.attempt();
                self.dial(attempt, Transport::Quic, false, out);
            }
            Phase::Backoff { until } if until <= now => self.connect(now, out),
            Phase::Up { conn }
                if !self.healthy_once
                    && self
                        .conns
                        .get(&conn)
                        .is_some_and(|c| c.opened + self.settings.min_healthy <= now) =>
            {
                self.healthy_once = true;
                self.failures = 0;
            }
            _ => {}
        }
        if let Some(Probe::At(at)) = self.probe {
            if at <= now {
                let attempt = self.attempt();
                self.probe = Some(Probe::InFlight(attempt));
                out.push(Action::Dial {
                    attempt,
                    transport: Transport::Quic,
                });
            }
        }
        let expired: Vec<ConnId> = self
            .conns
            .iter()
            .filter(|(_, c)| {
                c.draining
                    .is_some_and(|(since, ..)| since + self.settings.drain_max <= now)
            })
            .map(|(id, _)| *id)
            .collect();
        for id in expired {
            if let Some(c) = self.conns.remove(&id) {
                let code = c.draining.map_or(CLOSE_POLICY, |(_, code, _)| code);
                out.push(close(id, code, "drain limit reached", false));
            }
        }
    }

    fn attempt(&mut self) -> Attempt {
        self.next_attempt += 1;
        self.next_attempt
    }

    /// Starts getting a connection: the peer's dial first when it is the
    /// one that dials (unless only TCP works), else our own.
    fn connect(&mut self, now: Instant, out: &mut Vec<Action>) {
        if !self.settings.we_dial && !self.udp_blocked {
            self.phase = Phase::Awaiting {
                until: now + self.settings.adopt_grace,
            };
            return;
        }
        let attempt = self.attempt();
        let transport = if self.udp_blocked && self.settings.has_tcp {
            Transport::Tcp
        } else {
            Transport::Quic
        };
        self.dial(attempt, transport, false, out);
    }

    fn dial(
        &mut self,
        attempt: Attempt,
        transport: Transport,
        after_silence: bool,
        out: &mut Vec<Action>,
    ) {
        self.phase = Phase::Dialing {
            attempt,
            transport,
            after_silence,
        };
        out.push(Action::Dial { attempt, transport });
    }

    fn dialed(
        &mut self,
        attempt: Attempt,
        result: Result<(ConnId, Transport), DialError>,
        now: Instant,
        out: &mut Vec<Action>,
    ) {
        if self.probe == Some(Probe::InFlight(attempt)) {
            self.probe = None;
            match result {
                Ok((conn, transport)) if self.installed_transport() == Some(Transport::Tcp) => {
                    self.install(conn, transport, Origin::Us, now, out);
                }
                Ok((conn, _)) => out.push(close(conn, CLOSE_POLICY, "superseded", false)),
                Err(e) => {
                    out.push(Action::Note(Note::ProbeFailed {
                        error: e.message().to_owned(),
                    }));
                    if self.installed_transport() == Some(Transport::Tcp) {
                        self.probe = Some(Probe::At(now + self.settings.quic_retry));
                    }
                }
            }
            return;
        }
        let (transport, after_silence) = match self.phase {
            Phase::Dialing {
                attempt: current,
                transport,
                after_silence,
            } if current == attempt => (transport, after_silence),
            _ => {
                // Given up on (adopted meanwhile, address changed,
                // superseded by a newer attempt): never handed out.
                if let Ok((conn, _)) = result {
                    out.push(close(conn, CLOSE_POLICY, "superseded", false));
                }
                return;
            }
        };
        match (result, transport) {
            (Ok((conn, t)), _) => {
                if t == Transport::Tcp && after_silence {
                    self.udp_blocked = true;
                    out.push(Action::Note(Note::FellBack));
                }
                self.install(conn, t, Origin::Us, now, out);
            }
            (Err(DialError::Silent(e)), Transport::Quic) if self.settings.has_tcp => {
                self.last_error = e;
                let attempt = self.attempt();
                self.dial(attempt, Transport::Tcp, true, out);
            }
            (Err(e), Transport::Tcp) if self.udp_blocked && !after_silence => {
                // The TCP path broke too: start again from QUIC now.
                self.udp_blocked = false;
                self.last_error = e.message().to_owned();
                let attempt = self.attempt();
                self.dial(attempt, Transport::Quic, false, out);
            }
            (Err(e), Transport::Tcp) if after_silence => {
                let error = format!("{}; TCP fallback: {}", self.last_error, e.message());
                self.failed(DialError::Silent(error), now, out);
            }
            (Err(e), _) => self.failed(e, now, out),
        }
    }

    fn installed_transport(&self) -> Option<Transport> {
        self.installed_info().map(|(t, ..)| t)
    }

    fn failed(&mut self, e: DialError, now: Instant, out: &mut Vec<Action>) {
        self.answered = !matches!(e, DialError::Silent(_));
        self.down = true;
        self.failures = self.failures.saturating_add(1);
        self.last_error = e.message().to_owned();
        out.push(Action::Settled);
        out.push(Action::Note(Note::ConnectFailed {
            error: self.last_error.clone(),
            failures: self.failures,
        }));
        self.phase = Phase::Backoff {
            until: now + self.backoff(),
        };
    }

    fn install(
        &mut self,
        conn: ConnId,
        transport: Transport,
        origin: Origin,
        now: Instant,
        out: &mut Vec<Action>,
    ) {
        let replaced = self.installed().and_then(|old| {
            let t = self.conns.get(&old).map(|c| c.transport);
            let reason = match (origin, t) {
                (Origin::Peer, _) => "folded into the pair's connection",
                (Origin::Us, _) => "QUIC replaces the TCP fallback",
            };
            let code = if origin == Origin::Peer {
                CLOSE_FOLDED
            } else {
                CLOSE_POLICY
            };
            self.drain(old, code, reason, now, out);
            t
        });
        self.conns.insert(
            conn,
            Conn {
                transport,
                origin,
                opened: now,
                leases: 0,
                draining: None,
            },
        );
        self.phase = Phase::Up { conn };
        self.down = false;
        if replaced.is_some() {
            self.failures = 0;
        }
        match transport {
            Transport::Quic => {
                self.udp_blocked = false;
                self.probe = None;
            }
            Transport::Tcp => self.probe = Some(Probe::At(now + self.settings.quic_retry)),
        }
        if self.settings.we_dial && origin == Origin::Us && transport == Transport::Quic {
            out.push(Action::Serve(conn));
        }
        out.push(Action::Settled);
        out.push(Action::Note(Note::Up {
            conn,
            transport,
            origin,
            replaced,
        }));
    }

    /// `conn` is no longer handed out; it closes once its leases end.
    /// Callers move the phase on (install another, or connect).
    fn drain(
        &mut self,
        conn: ConnId,
        code: u32,
        reason: &'static str,
        now: Instant,
        out: &mut Vec<Action>,
    ) {
        let Some(c) = self.conns.get_mut(&conn) else {
            return;
        };
        if c.leases == 0 {
            self.conns.remove(&conn);
            out.push(close(conn, code, reason, true));
        } else if c.draining.is_none() {
            c.draining = Some((now, code, reason));
        }
    }

    /// `conn` is dead (closed, silent or failed): forget it, closing it
    /// with `close` first; if it was installed, reconnect.
    fn lost(
        &mut self,
        conn: ConnId,
        reason: String,
        close_with: Option<(u32, &'static str)>,
        now: Instant,
        out: &mut Vec<Action>,
    ) {
        let Some(c) = self.conns.remove(&conn) else {
            return;
        };
        if let Some((code, why)) = close_with {
            out.push(close(conn, code, why, false));
        }
        if self.installed() != Some(conn) {
            return;
        }
        self.probe = None;
        self.down = true;
        self.last_error = format!(
            "{} connection closed: {reason}",
            match c.transport {
                Transport::Quic => "QUIC",
                Transport::Tcp => "TCP fallback",
            }
        );
        out.push(Action::Note(Note::Down {
            reason: self.last_error.clone(),
        }));
        if now.saturating_duration_since(c.opened) < self.settings.min_healthy {
            // Accepted and then refused, or died young: do not spin.
            self.answered = true;
            self.failures = self.failures.saturating_add(1);
            self.phase = Phase::Backoff {
                until: now + self.backoff(),
            };
            out.push(Action::Settled);
        } else {
            self.failures = 0;
            self.connect(now, out);
        }
    }

    /// Exponential from `backoff_base`, capped, plus up to 25 % jitter so
    /// peers that failed together do not retry together.
    fn backoff(&mut self) -> Duration {
        let s = &self.settings;
        let exp = s.backoff_base.saturating_mul(1u32 << self.failures.min(10));
        let capped = exp.min(s.backoff_max);
        self.rng ^= self.rng << 13;
        self.rng ^= self.rng >> 7;
        self.rng ^= self.rng << 17;
        // 53 random bits as a fraction in [0, 1).
        let unit = (self.rng >> 11) as f64 / (1u64 << 53) as f64;
        capped + capped.mul_f64(unit * 0.25)
    }
}

fn close(conn: ConnId, code: u32, reason: &'static str, linger: bool) -> Action {
    Action::Close {
        conn,
        code,
        reason,
        linger,
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;
    use Transport::{Quic, Tcp};

    const MS: Duration = Duration::from_millis(1);

    /// A link on virtual time: every call says how far time moved.
    struct T {
        link: Link,
        t0: Instant,
        now: Instant,
        out: Vec<Action>,
    }

    impl T {
        fn new(we_dial: bool, has_tcp: bool) -> Self {
            let t0 = Instant::now();
            let (link, out) = Link::new(
                Settings {
                    we_dial,
                    has_tcp,
                    ..Settings::default()
                },
                7,
                t0,
            );
            Self {
                link,
                t0,
                now: t0,
                out,
            }
        }

        /// Feeds `event` at `at` after the start; returns what it said.
        fn on(&mut self, at: u64, event: Event) -> Vec<Action> {
            self.now = self.t0 + MS * u32::try_from(at).unwrap();
            self.out = self.link.on(event, self.now);
            self.out.clone()
        }

        /// Ticks at `at` when a deadline is due by then.
        fn tick(&mut self, at: u64) -> Vec<Action> {
            self.on(at, Event::Tick)
        }

        fn dial(&self) -> (Attempt, Transport) {
            self.out
                .iter()
                .find_map(|a| match a {
                    Action::Dial { attempt, transport } => Some((*attempt, *transport)),
                    _ => None,
                })
                .unwrap_or_else(|| panic!("no dial in {:?}", self.out))
        }

        fn closes(&self) -> Vec<(ConnId, u32, &'static str)> {
            closes(&self.out)
        }

        fn ok(&mut self, at: u64, attempt: Attempt, conn: ConnId, t: Transport) -> Vec<Action> {
            self.on(
                at,
                Event::Dialed {
                    attempt,
                    result: Ok((conn, t)),
                },
            )
        }

        /// The side that does not dial: its own dial (100) is installed at
        /// 510 ms, handed to `leases` streams, and the peer's (200)
        /// arrives at 600 ms.
        fn ours_then_theirs(&mut self, leases: usize) -> Vec<Action> {
            self.tick(500);
            self.ok(510, 1, 100, Quic);
            for _ in 0..leases {
                assert_eq!(self.link.lease(), Some(100));
            }
            self.on(600, Event::Adopted(200))
        }

        fn err(&mut self, at: u64, attempt: Attempt, e: DialError) -> Vec<Action> {
            self.on(
                at,
                Event::Dialed {
                    attempt,
                    result: Err(e),
                },
            )
        }
    }

    fn closes(out: &[Action]) -> Vec<(ConnId, u32, &'static str)> {
        out.iter()
            .filter_map(|a| match a {
                Action::Close {
                    conn, code, reason, ..
                } => Some((*conn, *code, *reason)),
                _ => None,
            })
            .collect()
    }

    fn silent() -> DialError {
        DialError::Silent("no answer".into())
    }

    fn refused() -> DialError {
        DialError::Refused("unknown issuer".into())
    }

    #[test]
    fn the_side_that_dials_dials_at_once_and_serves_its_dial() {
        let mut t = T::new(true, false);
        assert_eq!(t.dial(), (1, Quic));
        let out = t.ok(20, 1, 100, Quic);
        assert!(out.contains(&Action::Serve(100)), "{out:?}");
        assert!(out.contains(&Action::Settled));
        assert_eq!(t.link.installed(), Some(100));
        // The peer's dial, if it comes, is not ours to hand out.
        assert!(t.on(30, Event::Adopted(200)).is_empty());
        assert_eq!(t.link.installed(), Some(100));
    }

    #[test]
    fn both_sides_dial_at_once_and_one_connection_stays() {
        let mut t = T::new(false, false);
        assert!(matches!(t.link.phase(), Phase::Awaiting { .. }));
        assert_eq!(t.link.poll_timeout(), Some(t.t0 + ADOPT));
        t.tick(500);
        let (attempt, _) = t.dial();
        // The peer's dial arrives while ours is under way: it is the pair's.
        t.on(510, Event::Adopted(200));
        assert_eq!(t.link.installed(), Some(200));
        // Ours lands after: never handed out, closed at once.
        t.ok(520, attempt, 100, Quic);
        assert_eq!(t.closes(), [(100, CLOSE_POLICY, "superseded")]);
        assert_eq!(t.link.installed(), Some(200));
        assert_eq!(t.link.conns().collect::<Vec<_>>(), [200]);
    }

    const ADOPT: Duration = Duration::from_millis(500);

    #[test]
    fn a_fold_waits_for_every_stream_handed_the_old_connection() {
        let mut t = T::new(false, false);
        let out = t.ours_then_theirs(3);
        assert!(closes(&out).is_empty(), "closed under leases: {out:?}");
        assert!(out.contains(&Action::Note(Note::Up {
            conn: 200,
            transport: Quic,
            origin: Origin::Peer,
            replaced: Some(Quic),
        })));
        assert_eq!(
            t.link.lease(),
            Some(200),
            "new streams go to the peer's dial"
        );
        t.on(700, Event::StreamEnded(100));
        t.on(710, Event::StreamEnded(100));
        assert!(t.closes().is_empty());
        let out = t.on(720, Event::StreamEnded(100));
        assert_eq!(
            out,
            [Action::Close {
                conn: 100,
                code: CLOSE_FOLDED,
                reason: "folded into the pair's connection",
                linger: true
            }]
        );
        // A stream on the folded connection that ends after its close
        // changes nothing; the installed one keeps its lease.
        assert!(t.on(730, Event::StreamEnded(100)).is_empty());
        assert_eq!(t.link.leases(200), 1);
    }

    #[test]
    fn a_long_drain_is_bounded() {
        let mut t = T::new(false, false);
        t.ours_then_theirs(1);
        // The new connection's healthy mark is due first.
        t.tick(1600);
        let max = Settings::default().drain_max;
        assert_eq!(t.link.poll_timeout(), Some(t.t0 + MS * 600 + max));
        let end = 600 + u64::try_from(max.as_millis()).unwrap();
        assert!(t.tick(end - 1).is_empty());
        t.tick(end);
        assert_eq!(t.closes(), [(100, CLOSE_FOLDED, "drain limit reached")]);
    }

    #[test]
    fn an_address_change_keeps_the_peers_dial_and_drains_ours() {
        // The side that does not dial holds the peer's dial: it stays.
        let mut t = T::new(false, false);
        t.on(10, Event::Adopted(200));
        t.link.lease();
        let out = t.on(
            20,
            Event::Moved {
                identity: false,
                has_tcp: false,
            },
        );
        assert!(out.is_empty(), "{out:?}");
        assert_eq!(t.link.installed(), Some(200));
        // A new identity is another peer: even its dial drains.
        t.on(
            30,
            Event::Moved {
                identity: true,
                has_tcp: false,
            },
        );
        assert_eq!(t.link.installed(), None);
        assert!(t.closes().is_empty(), "closed under a lease");
        assert!(matches!(t.link.phase(), Phase::Awaiting { .. }));

        // The side that dials: its dial went to the old address.
        let mut t = T::new(true, false);
        t.ok(10, 1, 100, Quic);
        t.link.lease();
        t.on(
            20,
            Event::Moved {
                identity: false,
                has_tcp: false,
            },
        );
        assert!(t.closes().is_empty(), "closed under a lease");
        let (attempt, transport) = t.dial();
        assert_eq!(transport, Quic);
        t.ok(30, attempt, 101, Quic);
        assert_eq!(t.link.installed(), Some(101));
        t.on(40, Event::StreamEnded(100));
        assert_eq!(t.closes(), [(100, CLOSE_POLICY, "peer address changed")]);
    }

    #[test]
    fn an_address_change_during_a_dial_abandons_it() {
        let mut t = T::new(true, false);
        t.on(
            5,
            Event::Moved {
                identity: false,
                has_tcp: false,
            },
        );
        let (attempt, _) = t.dial();
        assert_eq!(attempt, 2);
        t.ok(10, 1, 100, Quic);
        assert_eq!(t.closes(), [(100, CLOSE_POLICY, "superseded")]);
        t.ok(11, 2, 101, Quic);
        assert_eq!(t.link.installed(), Some(101));
    }

    #[test]
    fn udp_blocked_then_tcp_then_quic_back() {
        let mut t = T::new(true, true);
        t.err(2000, 1, silent());
        assert_eq!(t.dial(), (2, Tcp), "silence over UDP tries TCP at once");
        let out = t.ok(2010, 2, 100, Tcp);
        assert!(out.contains(&Action::Note(Note::FellBack)));
        assert!(
            !out.contains(&Action::Serve(100)),
            "TCP serves no peer streams"
        );
        assert!(t.link.udp_blocked());
        t.link.lease();
        // A QUIC probe every quic_retry while on TCP.
        let retry = 2010 + 10_000;
        assert!(t.tick(retry - 1).is_empty());
        t.tick(retry);
        let (probe, transport) = t.dial();
        assert_eq!(transport, Quic);
        let out = t.err(retry + 2000, probe, silent());
        assert!(matches!(out[..], [Action::Note(Note::ProbeFailed { .. })]));
        assert_eq!(t.link.installed(), Some(100), "a failed probe keeps TCP");
        t.tick(retry + 12_000);
        let (probe, _) = t.dial();
        let out = t.ok(retry + 12_020, probe, 101, Quic);
        assert!(out.contains(&Action::Serve(101)));
        assert_eq!(t.link.installed(), Some(101));
        assert!(!t.link.udp_blocked());
        assert!(t.closes().is_empty(), "TCP closed under a lease");
        t.on(retry + 13_000, Event::StreamEnded(100));
        assert_eq!(
            t.closes(),
            [(100, CLOSE_POLICY, "QUIC replaces the TCP fallback")]
        );
    }

    #[test]
    fn a_peer_known_to_need_tcp_is_reconnected_over_tcp_first() {
        let mut t = T::new(true, true);
        t.err(2000, 1, silent());
        t.ok(2010, 2, 100, Tcp);
        t.on(
            9000,
            Event::Closed {
                conn: 100,
                reason: "reset".into(),
            },
        );
        assert_eq!(t.dial(), (3, Tcp));
        // TCP broke as well: back to QUIC at once, not after a backoff.
        t.err(9010, 3, refused());
        assert_eq!(t.dial(), (4, Quic));
        assert!(!t.link.udp_blocked());
    }

    #[test]
    fn silence_closes_the_connection_and_reconnects() {
        let mut t = T::new(true, false);
        t.ok(10, 1, 100, Quic);
        t.tick(1010);
        let out = t.on(5000, Event::Silent(100));
        assert!(out.contains(&Action::Note(Note::Silent)));
        assert_eq!(t.closes(), [(100, CLOSE_SILENT, "peer silent")]);
        // It had been healthy: reconnect now, but streams fail over.
        assert_eq!(t.dial(), (2, Quic));
        assert_eq!(t.link.admit(), Admit::Down);
        // Its own close event, when it comes, is old news.
        assert!(t
            .on(
                5001,
                Event::Closed {
                    conn: 100,
                    reason: "closed".into()
                }
            )
            .is_empty());
    }

    #[test]
    fn failures_back_off_and_a_waiting_stream_cuts_only_a_first_backoff() {
        let mut t = T::new(true, false);
        let mut at = 0;
        let mut waits = Vec::new();
        for attempt in 1..=6 {
            t.err(at, attempt, refused());
            let Phase::Backoff { until } = t.link.phase() else {
                panic!("{:?}", t.link.phase())
            };
            let wait = until - t.now;
            waits.push(wait);
            at += u64::try_from(wait.as_micros().div_ceil(1000)).unwrap();
            assert!(t.tick(at - 1).is_empty(), "dialed before the backoff ended");
            t.tick(at);
            assert_eq!(t.dial().0, attempt + 1);
        }
        for (i, w) in waits.iter().enumerate() {
            let base = (MS * 100 * (1 << (i + 1))).min(Duration::from_secs(2));
            assert!(
                *w >= base && *w <= base.mul_f64(1.25),
                "backoff {i}: {w:?} not within {base:?}+25%"
            );
        }
        // Never healthy and the peer answered: a stream waits and cuts the
        // backoff short.
        t.err(at, 7, refused());
        assert_eq!(t.link.admit(), Admit::Wait);
        t.on(at + 1, Event::Wanted);
        assert_eq!(t.dial().0, 8);
        // Once healthy, a lost peer is failed over and the backoff kept.
        t.ok(at + 2, 8, 100, Quic);
        t.tick(at + 2 + 1000);
        t.on(at + 1500, Event::Failed(100));
        t.err(at + 1501, 9, refused());
        assert_eq!(t.link.admit(), Admit::Down);
        assert!(t.on(at + 1502, Event::Wanted).is_empty());
    }

    #[test]
    fn a_connection_that_dies_young_backs_off() {
        let mut t = T::new(true, false);
        t.ok(10, 1, 100, Quic);
        // Accepted, then refused at the first stream (TLS 1.3).
        t.on(20, Event::Failed(100));
        assert_eq!(t.closes(), [(100, CLOSE_POLICY, "connection failed")]);
        assert!(matches!(t.link.phase(), Phase::Backoff { .. }));
        assert_eq!(t.link.admit(), Admit::Wait, "answered and starting");
    }

    #[test]
    fn a_failure_on_a_draining_connection_leaves_the_installed_one_alone() {
        let mut t = T::new(false, false);
        t.ours_then_theirs(1);
        t.on(610, Event::Failed(100));
        assert_eq!(t.closes(), [(100, CLOSE_POLICY, "connection failed")]);
        assert_eq!(t.link.installed(), Some(200));
        assert_eq!(t.link.admit(), Admit::Wait);
        assert!(!t.link.down);
    }

    #[test]
    fn a_removed_peer_closes_everything_and_keeps_nothing() {
        let mut t = T::new(false, false);
        t.ours_then_theirs(1);
        t.link.lease();
        t.on(700, Event::Removed);
        let mut c = t.closes();
        c.sort_unstable();
        assert_eq!(
            c,
            [
                (100, CLOSE_POLICY, "peer removed"),
                (200, CLOSE_POLICY, "peer removed")
            ]
        );
        assert_eq!(t.link.admit(), Admit::Down);
        assert_eq!(t.link.poll_timeout(), None);
        t.on(800, Event::Adopted(300));
        assert_eq!(t.closes(), [(300, CLOSE_POLICY, "peer removed")]);
        assert!(t.link.conns().next().is_none());
    }

    mod props {
        use super::*;
        use proptest::prelude::*;
        use std::collections::{BTreeMap, BTreeSet};

        /// A step of the world around a link; indices pick among what
        /// exists at that moment.
        #[derive(Debug, Clone)]
        enum Step {
            Wait(u16),
            Adopt,
            DialOk(u8, bool),
            DialErr(u8, bool),
            Close(u8),
            Silent(u8),
            Failed(u8),
            Lease,
            End(u8),
            Wanted,
            Moved(bool, bool),
            Removed,
        }

        fn step() -> impl Strategy<Value = Step> {
            prop_oneof![
                4 => (1u16..3000).prop_map(Step::Wait),
                2 => Just(Step::Adopt),
                4 => (any::<u8>(), any::<bool>()).prop_map(|(i, t)| Step::DialOk(i, t)),
                2 => (any::<u8>(), any::<bool>()).prop_map(|(i, s)| Step::DialErr(i, s)),
                1 => any::<u8>().prop_map(Step::Close),
                1 => any::<u8>().prop_map(Step::Silent),
                1 => any::<u8>().prop_map(Step::Failed),
                4 => Just(Step::Lease),
                3 => any::<u8>().prop_map(Step::End),
                1 => Just(Step::Wanted),
                1 => (any::<bool>(), any::<bool>()).prop_map(|(i, t)| Step::Moved(i, t)),
                1 => Just(Step::Removed),
            ]
        }

        /// The link and what the world knows: dials under way, connections
        /// open (given to the link and not closed), leases held.
        struct World {
            link: Link,
            we_dial: bool,
            now: Instant,
            next: ConnId,
            dials: Vec<(Attempt, Transport)>,
            open: BTreeSet<ConnId>,
            leases: BTreeMap<ConnId, usize>,
        }

        /// Closes that may cut leased streams: the connection is dead, or
        /// the peer is gone, or a drain ran out of time.
        fn may_cut(reason: &str) -> bool {
            matches!(
                reason,
                "peer silent" | "connection failed" | "peer removed" | "drain limit reached"
            )
        }

        impl World {
            fn feed(&mut self, event: Event) -> Result<(), TestCaseError> {
                let out = self.link.on(event, self.now);
                for a in out {
                    match a {
                        Action::Dial { attempt, transport } => {
                            self.dials.push((attempt, transport))
                        }
                        Action::Close { conn, reason, .. } => {
                            let held = self.leases.get(&conn).copied().unwrap_or(0);
                            prop_assert!(
                                held == 0 || may_cut(reason),
                                "closed {conn} ({reason}) under {held} leases"
                            );
                            self.open.remove(&conn);
                        }
                        _ => {}
                    }
                }
                // Never forgotten: every open connection the link was
                // given is still its own (installed or draining), and
                // it holds nothing that is closed.
                let held: BTreeSet<ConnId> = self.link.conns().collect();
                prop_assert_eq!(&held, &self.open);
                if let Some(i) = self.link.installed() {
                    prop_assert!(self.open.contains(&i));
                }
                Ok(())
            }

            fn conn(&mut self) -> ConnId {
                self.next += 1;
                self.next
            }

            fn pick<T: Copy>(items: &[T], i: u8) -> Option<T> {
                (!items.is_empty()).then(|| items[usize::from(i) % items.len()])
            }

            fn run(&mut self, s: Step) -> Result<(), TestCaseError> {
                match s {
                    Step::Wait(ms) => {
                        self.now += MS * u32::from(ms);
                        self.feed(Event::Tick)?;
                    }
                    Step::Adopt => {
                        let c = self.conn();
                        if !self.we_dial && !self.link.is_removed() {
                            self.open.insert(c);
                        }
                        self.feed(Event::Adopted(c))?;
                    }
                    Step::DialOk(i, tcp) => {
                        if let Some((a, t)) = Self::pick(&self.dials, i) {
                            self.dials.retain(|d| d.0 != a);
                            let c = self.conn();
                            self.open.insert(c);
                            let t = if tcp { Tcp } else { t };
                            self.feed(Event::Dialed {
                                attempt: a,
                                result: Ok((c, t)),
                            })?;
                        }
                    }
                    Step::DialErr(i, silent) => {
                        if let Some((a, _)) = Self::pick(&self.dials, i) {
                            self.dials.retain(|d| d.0 != a);
                            let e = if silent {
                                DialError::Silent("s".into())
                            } else {
                                DialError::Refused("r".into())
                            };
                            self.feed(Event::Dialed {
                                attempt: a,
                                result: Err(e),
                            })?;
                        }
                    }
                    Step::Close(i) | Step::Silent(i) | Step::Failed(i) => {
                        let open: Vec<ConnId> = self.open.iter().copied().collect();
                        if let Some(c) = Self::pick(&open, i) {
                            let e = match s {
                                Step::Close(_) => {
                                    self.open.remove(&c);
                                    Event::Closed {
                                        conn: c,
                                        reason: "x".into(),
                                    }
                                }
                                Step::Silent(_) => Event::Silent(c),
                                _ => Event::Failed(c),
                            };
                            self.feed(e)?;
                        }
                    }
                    Step::Lease => {
                        if let Some(c) = self.link.lease() {
                            *self.leases.entry(c).or_default() += 1;
                        }
                    }
                    Step::End(i) => {
                        let held: Vec<ConnId> = self.leases.keys().copied().collect();
                        if let Some(c) = Self::pick(&held, i) {
                            let n = self.leases.get_mut(&c).expect("held");
                            *n -= 1;
                            if *n == 0 {
                                self.leases.remove(&c);
                            }
                            self.feed(Event::StreamEnded(c))?;
                        }
                    }
                    Step::Wanted => self.feed(Event::Wanted)?,
                    Step::Moved(identity, has_tcp) => {
                        self.feed(Event::Moved { identity, has_tcp })?;
                    }
                    Step::Removed => self.feed(Event::Removed)?,
                }
                Ok(())
            }

            /// Streams end, dials succeed and time passes until nothing
            /// is due: then at most the installed connection is open.
            fn settle(&mut self) -> Result<(), TestCaseError> {
                let held: Vec<(ConnId, usize)> =
                    std::mem::take(&mut self.leases).into_iter().collect();
                for (c, n) in held {
                    for _ in 0..n {
                        self.feed(Event::StreamEnded(c))?;
                    }
                }
                for _ in 0..20 {
                    if let Some((a, t)) = self.dials.pop() {
                        let c = self.conn();
                        self.open.insert(c);
                        self.feed(Event::Dialed {
                            attempt: a,
                            result: Ok((c, t)),
                        })?;
                        continue;
                    }
                    match self.link.poll_timeout() {
                        Some(at) if at > self.now + Duration::from_secs(60) => break,
                        Some(at) => {
                            self.now = self.now.max(at);
                            self.feed(Event::Tick)?;
                        }
                        None => break,
                    }
                }
                prop_assert!(
                    self.open.len() <= 1,
                    "settled with {:?} open (installed {:?})",
                    self.open,
                    self.link.installed()
                );
                prop_assert!(self.open.iter().all(|c| Some(*c) == self.link.installed()));
                Ok(())
            }
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(2000))]
            #[test]
            fn no_lease_cut_nothing_forgotten_one_connection_once_settled(
                we_dial in any::<bool>(),
                has_tcp in any::<bool>(),
                steps in proptest::collection::vec(step(), 1..80),
            ) {
                let now = Instant::now();
                let (link, out) = Link::new(Settings { we_dial, has_tcp, ..Settings::default() }, 3, now);
                let mut w = World {
                    link,
                    we_dial,
                    now,
                    next: 0,
                    dials: Vec::new(),
                    open: BTreeSet::new(),
                    leases: BTreeMap::new(),
                };
                for a in out {
                    if let Action::Dial { attempt, transport } = a {
                        w.dials.push((attempt, transport));
                    }
                }
                for s in steps {
                    w.run(s)?;
                }
                w.settle()?;
            }
        }
    }
}
