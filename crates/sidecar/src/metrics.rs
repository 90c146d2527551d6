use std::collections::BTreeMap;
use std::sync::Mutex;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::{Family, MetricConstructor};
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutboundLabels {
    pub service: String,
    /// `local`, `gateway`, or `failed`.
    pub path: &'static str,
    /// The cluster that took the connection ("" when none did).
    pub cluster: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ServiceLabels {
    pub service: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct MemberLabels {
    pub service: String,
    /// `endpoint` or `cluster`.
    pub kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct LatencyLabels {
    pub service: String,
    pub cluster: String,
}

fn latency_histogram() -> Histogram {
    // 50 µs … ~1.6 s: a loopback hop up to a cross-region connect.
    Histogram::new(exponential_buckets(0.000_05, 2.0, 16))
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct HttpLabels {
    /// The service the request was routed to (`NAME.NS`).
    pub service: String,
    /// The cluster that answered ("" when none did).
    pub cluster: String,
    /// `2xx` … `5xx`.
    pub class: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct HttpLatencyLabels {
    pub service: String,
    pub class: &'static str,
}

/// The response-class label of an HTTP status.
pub fn class(status: u16) -> &'static str {
    match status {
        100..=199 => "1xx",
        200..=299 => "2xx",
        300..=399 => "3xx",
        400..=499 => "4xx",
        _ => "5xx",
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct InboundLabels {
    pub service: String,
    /// The caller's SPIFFE ID as this sidecar decided it.
    pub source: String,
    /// `direct` (sidecar to sidecar) or `gateway` (relayed).
    pub via: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabels {
    pub result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ProtocolLabels {
    pub protocol: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabels {
    pub reason: &'static str,
}

/// One row of "who called which service, and how".
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SeenCaller {
    pub service: String,
    pub source: String,
    pub via: &'static str,
    pub connections: u64,
}

#[derive(Clone, Debug)]
pub struct NewHistogram;

impl MetricConstructor<Histogram> for NewHistogram {
    fn new_metric(&self) -> Histogram {
        latency_histogram()
    }
}

#[derive(Debug)]
pub struct SidecarMetrics {
    pub outbound: Family<OutboundLabels, Counter>,
    /// Dial + TLS + status frame of the attempt that succeeded.
    pub connect_latency: Family<LatencyLabels, Histogram, NewHistogram>,
    /// Attempts after the first (connect-level failover).
    pub failovers: Family<ServiceLabels, Counter>,
    pub budget_exhausted: Family<ServiceLabels, Counter>,
    pub ejections: Family<MemberLabels, Counter>,
    /// Inbound streams refused by the service's authorization policy.
    pub denied: Family<ServiceLabels, Counter>,
    pub inbound: Family<InboundLabels, Counter>,
    pub rejected: Family<ReasonLabels, Counter>,
    pub bytes: Counter,
    /// HTTP requests proxied by outbound listeners (L7), by response class.
    pub http_requests: Family<HttpLabels, Counter>,
    /// Request start until the response head, as the app sees it.
    pub http_latency: Family<HttpLatencyLabels, Histogram, NewHistogram>,
    /// HTTP attempts after the first (request-level retries and failover).
    pub http_retries: Family<ServiceLabels, Counter>,
    /// Outbound connections by detected protocol (`http1`, `http2`, `opaque`).
    pub protocols: Family<ProtocolLabels, Counter>,
    /// Connections of the transparent listener by what became of them:
    /// `mesh` (a service's VIP), `passthrough` (anything else, as sent),
    /// `refused` (not redirected, or a passthrough connect failed).
    pub transparent: Family<ResultLabels, Counter>,
    // prometheus-client cannot list a family's label sets; this keeps the
    // inbound table for reports (one entry per distinct caller, not per call).
    seen: Mutex<BTreeMap<(String, String, &'static str), u64>>,
}

impl Default for SidecarMetrics {
    fn default() -> Self {
        Self {
            outbound: Family::default(),
            connect_latency: Family::new_with_constructor(NewHistogram),
            failovers: Family::default(),
            budget_exhausted: Family::default(),
            ejections: Family::default(),
            denied: Family::default(),
            inbound: Family::default(),
            rejected: Family::default(),
            bytes: Counter::default(),
            http_requests: Family::default(),
            http_latency: Family::new_with_constructor(NewHistogram),
            http_retries: Family::default(),
            protocols: Family::default(),
            transparent: Family::default(),
            seen: Mutex::default(),
        }
    }
}

impl SidecarMetrics {
    pub fn register(&self, reg: &mut Registry) {
        let reg = reg.sub_registry_with_prefix("fedmesh_sidecar");
        reg.register(
            "transparent_connections",
            "Connections of the transparent listener: mesh (a service VIP), passthrough, refused",
            self.transparent.clone(),
        );
        reg.register(
            "connect_latency_seconds",
            "Dial, handshake and status frame of successful outbound attempts, by service and cluster",
            self.connect_latency.clone(),
        );
        reg.register(
            "failovers",
            "Outbound attempts after the first (connect-level failover), by service",
            self.failovers.clone(),
        );
        reg.register(
            "retry_budget_exhausted",
            "Outbound connections that stopped failing over because the retry budget was spent",
            self.budget_exhausted.clone(),
        );
        reg.register(
            "ejections",
            "Outlier ejections of endpoints or whole clusters, by service",
            self.ejections.clone(),
        );
        reg.register(
            "denied",
            "Inbound streams refused by authorization policy, by service",
            self.denied.clone(),
        );
        reg.register(
            "outbound_connections",
            "Outbound connections by service and path taken",
            self.outbound.clone(),
        );
        reg.register(
            "inbound_connections",
            "Inbound connections by service, caller identity and path",
            self.inbound.clone(),
        );
        reg.register(
            "rejected",
            "Connections refused, by reason",
            self.rejected.clone(),
        );
        reg.register(
            "http_requests",
            "HTTP requests proxied by outbound listeners, by destination service, cluster and response class",
            self.http_requests.clone(),
        );
        reg.register(
            "http_request_duration_seconds",
            "HTTP request start until the response head, by destination service and response class",
            self.http_latency.clone(),
        );
        reg.register(
            "http_retries",
            "HTTP attempts after the first (retries and failover), by destination service",
            self.http_retries.clone(),
        );
        reg.register(
            "outbound_protocols",
            "Outbound connections by detected protocol",
            self.protocols.clone(),
        );
        reg.register(
            "bytes",
            "Payload bytes spliced (both directions)",
            self.bytes.clone(),
        );
    }

    pub fn reject(&self, reason: &'static str) {
        self.rejected.get_or_create(&ReasonLabels { reason }).inc();
    }

    pub fn rejected_count(&self, reason: &'static str) -> u64 {
        self.rejected.get_or_create(&ReasonLabels { reason }).get()
    }

    pub fn outbound(&self, service: &str, path: &'static str, cluster: &str) {
        self.outbound
            .get_or_create(&OutboundLabels {
                service: service.to_owned(),
                path,
                cluster: cluster.to_owned(),
            })
            .inc();
    }

    /// Connections to `service` that `cluster` took (any path).
    pub fn outbound_count(&self, service: &str, cluster: &str) -> u64 {
        ["local", "gateway"]
            .iter()
            .map(|path| {
                self.outbound
                    .get_or_create(&OutboundLabels {
                        service: service.to_owned(),
                        path,
                        cluster: cluster.to_owned(),
                    })
                    .get()
            })
            .sum()
    }

    pub fn service(&self, f: &Family<ServiceLabels, Counter>, service: &str) -> u64 {
        f.get_or_create(&ServiceLabels {
            service: service.to_owned(),
        })
        .get()
    }

    pub fn inc_service(&self, f: &Family<ServiceLabels, Counter>, service: &str) {
        f.get_or_create(&ServiceLabels {
            service: service.to_owned(),
        })
        .inc();
    }

    /// HTTP requests to `service` answered with `class` (any cluster).
    pub fn http_count(&self, service: &str, cluster: &str, class: &'static str) -> u64 {
        self.http_requests
            .get_or_create(&HttpLabels {
                service: service.to_owned(),
                cluster: cluster.to_owned(),
                class,
            })
            .get()
    }

    pub fn inbound(&self, service: &str, source: &str, via: &'static str) {
        self.inbound
            .get_or_create(&InboundLabels {
                service: service.to_owned(),
                source: source.to_owned(),
                via,
            })
            .inc();
        let mut seen = match self.seen.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        };
        *seen
            .entry((service.to_owned(), source.to_owned(), via))
            .or_default() += 1;
    }

    /// Every distinct inbound caller seen so far.
    pub fn seen(&self) -> Vec<SeenCaller> {
        let seen = match self.seen.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        };
        seen.iter()
            .map(|((service, source, via), n)| SeenCaller {
                service: service.clone(),
                source: source.clone(),
                via,
                connections: *n,
            })
            .collect()
    }
}
