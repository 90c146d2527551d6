//! Gateway metrics, registered in the caller's Prometheus registry.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

use crate::transport::Transport;
use std::sync::atomic::AtomicU64;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StreamLabels {
    /// `from_sidecar` (outbound to a peer) or `from_peer` (inbound).
    pub direction: &'static str,
    /// Status answered to the stream's sender.
    pub status: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabels {
    pub reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DirectionLabels {
    pub direction: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PeerLabels {
    pub peer: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PeerReasonLabels {
    pub peer: String,
    /// [`AttemptFailure::as_str`].
    pub reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PeerRefusalLabels {
    /// The calling peer's cluster: one the catalog names, so the label set
    /// is bounded by the peers times the reasons.
    pub peer: String,
    /// `not_in_audience`, `unknown_service`, `source_denied`, ...
    pub reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TransportLabels {
    pub peer: String,
    /// `quic` or `tcp` (the HTTP/2-over-TLS fallback).
    pub transport: &'static str,
}

#[derive(Clone, Debug, Default)]
pub struct GatewayMetrics {
    /// 1 for the transport a dialed peer is reached by now, 0 for the other.
    pub peer_transport: Family<TransportLabels, Gauge>,
    /// Moves to the TCP fallback after QUIC met silence.
    pub transport_fallbacks: Family<PeerLabels, Counter>,
    /// Smoothed QUIC round-trip time to each peer gateway we dialed.
    pub peer_rtt: Family<PeerLabels, Gauge<f64, AtomicU64>>,
    /// 1 while a live connection (either transport) to the peer exists.
    pub peer_up: Family<PeerLabels, Gauge>,
    pub ejections: Family<PeerLabels, Counter>,
    /// Streams opened to a peer gateway (answered ok), by transport.
    pub peer_streams: Family<TransportLabels, Counter>,
    /// Tries to open a stream on a peer that failed (another cluster may
    /// then be tried), by why.
    pub peer_attempt_failures: Family<PeerReasonLabels, Counter>,
    pub streams: Family<StreamLabels, Counter>,
    /// Streams from peer gateways refused, by peer cluster and why.
    pub peer_refused: Family<PeerRefusalLabels, Counter>,
    pub rejected: Family<ReasonLabels, Counter>,
    pub bytes: Family<DirectionLabels, Counter>,
    pub invalid_datagrams: Counter,
    /// UDP datagrams sent and received on the QUIC port.
    pub udp_datagrams: Family<DirectionLabels, Counter>,
    /// Send and receive calls that moved them: datagrams per call above 1
    /// means GSO (send) and GRO (receive) batch packets.
    pub udp_calls: Family<DirectionLabels, Counter>,
    pub peer_connections: Gauge,
    pub sidecar_connections: Gauge,
    pub path: PathMetrics,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ControllerLabels {
    pub peer: String,
    pub controller: &'static str,
}

/// The QUIC path to each peer gateway, from quinn's connection stats and
/// the congestion controller ([`crate::congestion::Observed`]). Gauges
/// follow the connection in use; counters add up every QUIC connection
/// to the peer.
#[derive(Clone, Debug, Default)]
pub struct PathMetrics {
    pub cwnd: Family<PeerLabels, Gauge>,
    pub in_flight: Family<PeerLabels, Gauge>,
    /// +Inf while the controller is in slow start without a threshold;
    /// absent for BBR, which has none.
    pub ssthresh: Family<PeerLabels, Gauge<f64, AtomicU64>>,
    pub mtu: Family<PeerLabels, Gauge>,
    pub controller: Family<ControllerLabels, Gauge>,
    pub sent_packets: Family<PeerLabels, Counter>,
    pub lost_packets: Family<PeerLabels, Counter>,
    pub congestion_events: Family<PeerLabels, Counter>,
    pub black_holes: Family<PeerLabels, Counter>,
    pub restarts: Family<PeerLabels, Counter>,
    pub forgiven: Family<PeerLabels, Counter>,
    /// BBR only.
    pub bandwidth: Family<PeerLabels, Gauge>,
}

/// What a connection's counters stood at when last published.
#[derive(Debug, Clone, Copy, Default)]
pub struct PathTotals {
    sent: u64,
    lost: u64,
    events: u64,
    black_holes: u64,
    restarts: u64,
    forgiven: u64,
}

impl PathMetrics {
    fn register(&self, reg: &mut Registry) {
        reg.register(
            "peer_cwnd_bytes",
            "Congestion window of the QUIC connection to the peer gateway",
            self.cwnd.clone(),
        );
        reg.register(
            "peer_bytes_in_flight",
            "Bytes sent to the peer gateway and not yet acknowledged or lost",
            self.in_flight.clone(),
        );
        reg.register(
            "peer_ssthresh_bytes",
            "Slow-start threshold of a loss-based controller (+Inf: none yet)",
            self.ssthresh.clone(),
        );
        reg.register(
            "peer_path_mtu_bytes",
            "Largest UDP payload the QUIC path to the peer carries now",
            self.mtu.clone(),
        );
        reg.register(
            "peer_congestion_controller",
            "1 for the congestion controller of the connection to the peer",
            self.controller.clone(),
        );
        reg.register(
            "peer_sent_packets",
            "QUIC packets sent to the peer gateway",
            self.sent_packets.clone(),
        );
        reg.register(
            "peer_lost_packets",
            "QUIC packets to the peer gateway declared lost",
            self.lost_packets.clone(),
        );
        reg.register(
            "peer_congestion_events",
            "Loss events quinn reported on the QUIC path to the peer (window reductions for Cubic/NewReno)",
            self.congestion_events.clone(),
        );
        reg.register(
            "peer_black_holes",
            "MTU black holes detected on the path to the peer (packets shrink to 1200 bytes)",
            self.black_holes.clone(),
        );
        reg.register(
            "peer_slow_start_restarts",
            "Controller restarts after persistent congestion (a path event): slow start, or BBR's Startup",
            self.restarts.clone(),
        );
        reg.register(
            "peer_bandwidth_estimate_bytes_per_second",
            "BBR's estimate of the bottleneck bandwidth of the QUIC path to the peer",
            self.bandwidth.clone(),
        );
        reg.register(
            "peer_idle_losses",
            "Losses not passed to Cubic/NewReno: the connection was application-limited, not using its window",
            self.forgiven.clone(),
        );
    }

    /// Zeroes `peer`'s gauges when its QUIC connection closes: they
    /// describe the connection in use, and the next one in use (within a
    /// watch tick) sets them again.
    pub fn clear(&self, peer: &str) {
        let l = PeerLabels {
            peer: peer.to_owned(),
        };
        for g in [&self.cwnd, &self.in_flight, &self.mtu] {
            g.get_or_create(&l).set(0);
        }
        // Absent rather than 0: the next connection may use BBR, which
        // has no threshold.
        self.ssthresh.remove(&l);
        self.bandwidth.remove(&l);
        for a in crate::congestion::Algorithm::ALL {
            self.controller
                .get_or_create(&ControllerLabels {
                    peer: peer.to_owned(),
                    controller: a.as_str(),
                })
                .set(0);
        }
    }

    /// Publishes one QUIC connection to `peer`: its counters' growth since
    /// `last` always, its gauges when it is the connection in use.
    pub fn publish(
        &self,
        peer: &str,
        path: &quinn::PathStats,
        seen: &crate::congestion::Observation,
        in_use: bool,
        last: &mut PathTotals,
    ) {
        let l = PeerLabels {
            peer: peer.to_owned(),
        };
        let now = PathTotals {
            sent: path.sent_packets,
            lost: path.lost_packets,
            events: path.congestion_events,
            black_holes: path.black_holes_detected,
            restarts: seen.restarts,
            forgiven: seen.forgiven,
        };
        for (family, was, is) in [
            (&self.sent_packets, last.sent, now.sent),
            (&self.lost_packets, last.lost, now.lost),
            (&self.congestion_events, last.events, now.events),
            (&self.black_holes, last.black_holes, now.black_holes),
            (&self.restarts, last.restarts, now.restarts),
            (&self.forgiven, last.forgiven, now.forgiven),
        ] {
            if is > was {
                family.get_or_create(&l).inc_by(is - was);
            }
        }
        *last = now;
        if !in_use {
            return;
        }
        let gauge = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
        self.cwnd.get_or_create(&l).set(gauge(path.cwnd));
        self.in_flight.get_or_create(&l).set(gauge(seen.in_flight));
        self.mtu.get_or_create(&l).set(i64::from(path.current_mtu));
        if let Some(t) = seen.ssthresh {
            let v = if t == u64::MAX {
                f64::INFINITY
            } else {
                t as f64
            };
            self.ssthresh.get_or_create(&l).set(v);
        }
        match seen.bandwidth {
            Some(b) => {
                self.bandwidth.get_or_create(&l).set(gauge(b));
            }
            None => {
                self.bandwidth.remove(&l);
            }
        }
        if let Some(a) = seen.algorithm {
            for other in crate::congestion::Algorithm::ALL {
                self.controller
                    .get_or_create(&ControllerLabels {
                        peer: peer.to_owned(),
                        controller: other.as_str(),
                    })
                    .set(i64::from(other == a));
            }
        }
    }
}

/// Why a try to open a stream on a peer failed: the `reason` label of
/// `fedmesh_gateway_peer_attempt_failures_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AttemptFailure {
    /// The peer was known down; nothing was sent.
    PeerDown,
    /// No connection could be made.
    Connect,
    /// No stream could be opened on the connection.
    Stream,
    /// The stream broke before the peer answered.
    Io,
    /// The peer did not answer in time.
    Timeout,
    /// The peer answered with a refusal.
    Refused,
}

impl AttemptFailure {
    pub const ALL: [Self; 6] = [
        Self::PeerDown,
        Self::Connect,
        Self::Stream,
        Self::Io,
        Self::Timeout,
        Self::Refused,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::PeerDown => "peer_down",
            Self::Connect => "connect",
            Self::Stream => "stream",
            Self::Io => "io",
            Self::Timeout => "timeout",
            Self::Refused => "refused",
        }
    }
}

impl GatewayMetrics {
    pub fn register(&self, reg: &mut Registry) {
        let reg = reg.sub_registry_with_prefix("fedmesh_gateway");
        reg.register(
            "streams",
            "Tunnel streams by direction and answered status",
            self.streams.clone(),
        );
        reg.register(
            "peer_streams_refused",
            "Streams from peer gateways refused, by peer cluster and reason",
            self.peer_refused.clone(),
        );
        reg.register(
            "rejected",
            "Connections and streams refused, by reason",
            self.rejected.clone(),
        );
        reg.register(
            "bytes",
            "Payload bytes spliced, by direction",
            self.bytes.clone(),
        );
        reg.register(
            "invalid_datagrams",
            "UDP datagrams on the QUIC port that cannot be QUIC packets",
            self.invalid_datagrams.clone(),
        );
        reg.register(
            "udp_datagrams",
            "UDP datagrams moved on the QUIC port, by direction (tx, rx)",
            self.udp_datagrams.clone(),
        );
        reg.register(
            "udp_calls",
            "Socket calls that moved them (datagrams per call above 1: GSO/GRO at work)",
            self.udp_calls.clone(),
        );
        reg.register(
            "peer_connections",
            "Open connections (QUIC or TCP fallback) from peer gateways",
            self.peer_connections.clone(),
        );
        reg.register(
            "peer_rtt_seconds",
            "Smoothed QUIC round-trip time to each dialed peer gateway",
            self.peer_rtt.clone(),
        );
        reg.register(
            "peer_up",
            "1 while a live connection to the peer gateway exists",
            self.peer_up.clone(),
        );
        reg.register(
            "peer_transport",
            "1 for the transport (quic, tcp) a peer gateway is reached by now",
            self.peer_transport.clone(),
        );
        reg.register(
            "transport_fallbacks",
            "Moves to the TCP fallback after QUIC to the peer met silence",
            self.transport_fallbacks.clone(),
        );
        reg.register(
            "peer_ejections",
            "Outlier ejections of peer clusters",
            self.ejections.clone(),
        );
        reg.register(
            "peer_streams",
            "Streams opened to peer gateways and answered ok, by peer and transport (quic, tcp)",
            self.peer_streams.clone(),
        );
        reg.register(
            "peer_attempt_failures",
            "Tries to open a stream to a peer gateway that failed, by peer and reason",
            self.peer_attempt_failures.clone(),
        );
        reg.register(
            "sidecar_connections",
            "Open TLS connections from sidecars",
            self.sidecar_connections.clone(),
        );
        self.path.register(reg);
    }

    /// Records how `peer` is reached now (`None`: not at all).
    pub fn set_transport(&self, peer: &str, now: Option<Transport>) {
        for t in [Transport::Quic, Transport::Tcp] {
            self.peer_transport
                .get_or_create(&TransportLabels {
                    peer: peer.to_owned(),
                    transport: t.as_str(),
                })
                .set(i64::from(now == Some(t)));
        }
    }

    pub fn peer_stream(&self, peer: &str, transport: Transport) {
        self.peer_streams
            .get_or_create(&TransportLabels {
                peer: peer.to_owned(),
                transport: transport.as_str(),
            })
            .inc();
    }

    /// Streams opened to `peer` over `transport` so far.
    pub fn peer_stream_count(&self, peer: &str, transport: Transport) -> u64 {
        self.peer_streams
            .get_or_create(&TransportLabels {
                peer: peer.to_owned(),
                transport: transport.as_str(),
            })
            .get()
    }

    pub fn peer_attempt_failure(&self, peer: &str, why: AttemptFailure) {
        self.peer_attempt_failures
            .get_or_create(&PeerReasonLabels {
                peer: peer.to_owned(),
                reason: why.as_str(),
            })
            .inc();
    }

    /// Failed tries on `peer` so far, whatever the reason.
    pub fn peer_attempt_failure_count(&self, peer: &str) -> u64 {
        let mut n = 0;
        // Families have no iteration: sum every reason.
        for why in AttemptFailure::ALL {
            n += self
                .peer_attempt_failures
                .get_or_create(&PeerReasonLabels {
                    peer: peer.to_owned(),
                    reason: why.as_str(),
                })
                .get();
        }
        n
    }

    pub fn fallback(&self, peer: &str) {
        self.transport_fallbacks
            .get_or_create(&PeerLabels {
                peer: peer.to_owned(),
            })
            .inc();
    }

    pub fn ejection(&self, peer: &str) {
        self.ejections
            .get_or_create(&PeerLabels {
                peer: peer.to_owned(),
            })
            .inc();
    }

    pub fn peer_refused(&self, peer: &str, reason: &'static str) {
        self.peer_refused
            .get_or_create(&PeerRefusalLabels {
                peer: peer.to_owned(),
                reason,
            })
            .inc();
    }

    pub fn peer_refused_count(&self, peer: &str, reason: &'static str) -> u64 {
        self.peer_refused
            .get_or_create(&PeerRefusalLabels {
                peer: peer.to_owned(),
                reason,
            })
            .get()
    }

    pub fn reject(&self, reason: &'static str) {
        self.rejected.get_or_create(&ReasonLabels { reason }).inc();
    }

    pub fn rejected_count(&self, reason: &'static str) -> u64 {
        self.rejected.get_or_create(&ReasonLabels { reason }).get()
    }

    pub fn stream(&self, direction: &'static str, status: &'static str) {
        self.streams
            .get_or_create(&StreamLabels { direction, status })
            .inc();
    }

    pub fn stream_count(&self, direction: &'static str, status: &'static str) -> u64 {
        self.streams
            .get_or_create(&StreamLabels { direction, status })
            .get()
    }

    /// The largest UDP payload the QUIC path to `peer` carries now (0 when
    /// no connection to it is in use).
    pub fn path_mtu(&self, peer: &str) -> i64 {
        self.path
            .mtu
            .get_or_create(&PeerLabels {
                peer: peer.to_owned(),
            })
            .get()
    }

    /// MTU black holes detected on the path to `peer` so far.
    pub fn black_hole_count(&self, peer: &str) -> u64 {
        self.path
            .black_holes
            .get_or_create(&PeerLabels {
                peer: peer.to_owned(),
            })
            .get()
    }

    /// UDP datagrams and the socket calls that moved them, in `direction`
    /// (`tx` or `rx`): their ratio is the GSO/GRO batch size achieved.
    pub fn udp_counts(&self, direction: &'static str) -> (u64, u64) {
        let labels = DirectionLabels { direction };
        let datagrams = self.udp_datagrams.get_or_create(&labels).get();
        let calls = self.udp_calls.get_or_create(&labels).get();
        (datagrams, calls)
    }
}
