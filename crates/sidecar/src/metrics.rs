use std::collections::BTreeMap;
use std::sync::Mutex;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutboundLabels {
    pub service: String,
    /// `local`, `gateway`, or `failed`.
    pub path: &'static str,
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

#[derive(Debug, Default)]
pub struct SidecarMetrics {
    pub outbound: Family<OutboundLabels, Counter>,
    pub inbound: Family<InboundLabels, Counter>,
    pub rejected: Family<ReasonLabels, Counter>,
    pub bytes: Counter,
    // prometheus-client cannot list a family's label sets; this keeps the
    // inbound table for reports (one entry per distinct caller, not per call).
    seen: Mutex<BTreeMap<(String, String, &'static str), u64>>,
}

impl SidecarMetrics {
    pub fn register(&self, reg: &mut Registry) {
        let reg = reg.sub_registry_with_prefix("fedmesh_sidecar");
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

    pub fn outbound(&self, service: &str, path: &'static str) {
        self.outbound
            .get_or_create(&OutboundLabels {
                service: service.to_owned(),
                path,
            })
            .inc();
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
