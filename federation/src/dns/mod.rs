//! The `clusterset.local` zone a controller serves (MCS DNS): what names
//! exist, and the answer to one query ("decide, then do": the server in
//! [`server`] only moves bytes and counts).
//!
//! For a ClusterSetIP import `<svc>.<ns>` with ClusterSet IPs:
//! `<svc>.<ns>.svc.clusterset.local` A/AAAA → the ClusterSet IPs, and per
//! named port `_<port>._<proto>.<svc>.<ns>.svc.clusterset.local` SRV →
//! that port on the service's name. For a headless import, the same names
//! answer with every member cluster's ready endpoint addresses, each
//! endpoint is also `<hostname>.<cluster>.<svc>.<ns>.svc.clusterset.local`
//! (its address with `-` when it has no hostname), and SRV records name
//! each endpoint. Only what this cluster imports exists:
//! a service nobody exports (or exports only to others) is NXDOMAIN, like
//! a name that was never there.

pub mod client;
pub mod server;

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::time::Duration;

use fedmesh_catalog::mcs::{Import, Protocol, ServiceType};
use fedmesh_wire::ServiceName;
use hickory_proto::op::{Edns, Message, MessageType, OpCode, ResponseCode};
use hickory_proto::rr::rdata::{A, AAAA, SOA, SRV};
use hickory_proto::rr::{DNSClass, Name, RData, Record, RecordType};

/// The zone's apex.
pub const APEX: &str = "clusterset.local.";

/// Largest UDP answer: the EDNS payload a client offers, at most this
/// (the DNS flag day 2020 size, which avoids IP fragmentation).
pub const MAX_UDP_PAYLOAD: u16 = 1232;

/// Records of one name.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct Node {
    ips: Vec<IpAddr>,
    /// (port, target) of SRV records: the service's name, or (headless)
    /// each endpoint's.
    srv: Vec<(u16, Name)>,
}

/// Every name of the zone, rebuilt whenever the imports or the ClusterSet
/// IPs change (a few microseconds per service; answers read it lock-free
/// through a `watch`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Zone {
    /// Lowercase names without the trailing dot.
    nodes: BTreeMap<String, Node>,
    /// Names that exist only because something below them does (`svc.
    /// clusterset.local`, `demo.svc.clusterset.local`): NODATA, not
    /// NXDOMAIN (RFC 8020).
    interior: BTreeSet<String>,
    ttl: u32,
    /// Bumped with every rebuild that changed something (SOA serial).
    serial: u32,
    apex: Name,
    hostmaster: Name,
}

fn key(name: &Name) -> String {
    let mut s = name.to_lowercase().to_ascii();
    if s.ends_with('.') {
        s.pop();
    }
    s
}

fn fqdn(s: &str) -> Option<Name> {
    Name::from_ascii(format!("{s}.")).ok()
}

/// `<svc>.<ns>.svc.clusterset.local`
pub fn service_name(s: &ServiceName) -> String {
    format!("{}.{}.svc.clusterset.local", s.name(), s.namespace())
}

impl Zone {
    pub fn empty(ttl: Duration) -> Self {
        Self::build(
            &BTreeMap::<ServiceName, Import>::new(),
            &BTreeMap::new(),
            ttl,
            0,
        )
    }

    /// The zone of `imports` (this cluster's view) with `ips` (every
    /// service's ClusterSet IPs).
    pub fn build<'a, I>(
        imports: I,
        ips: &BTreeMap<ServiceName, Vec<IpAddr>>,
        ttl: Duration,
        serial: u32,
    ) -> Self
    where
        I: IntoIterator<Item = (&'a ServiceName, &'a Import)>,
    {
        let mut nodes: BTreeMap<String, Node> = BTreeMap::new();
        for (name, imp) in imports {
            let host = service_name(name);
            // Each named port's SRV targets: the service's own name, or
            // (headless) every endpoint's name.
            let targets: Vec<String> = match imp.service_type {
                ServiceType::ClusterSetIP => {
                    let Some(addrs) = ips.get(name).filter(|a| !a.is_empty()) else {
                        continue;
                    };
                    nodes.entry(host.clone()).or_default().ips = addrs.clone();
                    vec![host.clone()]
                }
                ServiceType::Headless => {
                    let mut targets = Vec::new();
                    for (cluster, eps) in &imp.endpoints {
                        for e in eps {
                            let ep_host = format!("{}.{cluster}.{host}", e.dns_label());
                            // Longer than a name may be: left out.
                            if fqdn(&ep_host).is_none() {
                                continue;
                            }
                            nodes.entry(host.clone()).or_default().ips.push(e.ip);
                            let node = nodes.entry(ep_host.clone()).or_default();
                            if node.ips.is_empty() {
                                targets.push(ep_host);
                            }
                            node.ips.push(e.ip);
                        }
                    }
                    // No ready endpoint anywhere: NXDOMAIN, as the MCS DNS
                    // specification asks.
                    if targets.is_empty() {
                        continue;
                    }
                    if let Some(n) = nodes.get_mut(&host) {
                        n.ips.sort();
                        n.ips.dedup();
                    }
                    targets
                }
            };
            let targets: Vec<Name> = targets.iter().filter_map(|t| fqdn(t)).collect();
            for p in imp.ports.iter().filter(|p| !p.name.is_empty()) {
                let proto = match p.protocol {
                    Protocol::Tcp => "tcp",
                    Protocol::Udp => "udp",
                    Protocol::Sctp => "sctp",
                };
                let srv = format!("_{}._{proto}.{host}", p.name.to_ascii_lowercase());
                let node = nodes.entry(srv).or_default();
                node.srv.extend(targets.iter().map(|t| (p.port, t.clone())));
            }
        }
        // Every ancestor of a name down to the apex exists too
        // (`_tcp.<svc>…`, `<cluster>.<svc>…`, `<ns>.svc.clusterset.local`).
        let mut interior = BTreeSet::new();
        for name in nodes.keys() {
            let mut rest = name.as_str();
            while let Some((_, parent)) = rest.split_once('.') {
                if parent == "local" || !interior.insert(parent.to_owned()) {
                    break;
                }
                rest = parent;
            }
        }
        interior.retain(|n| !nodes.contains_key(n));
        // Both parse; the root is only a type-level fallback.
        let apex = Name::from_ascii(APEX).unwrap_or_else(|_| Name::root());
        let hostmaster = fqdn("hostmaster.clusterset.local").unwrap_or_else(Name::root);
        Self {
            nodes,
            interior,
            ttl: u32::try_from(ttl.as_secs()).unwrap_or(u32::MAX),
            serial,
            apex,
            hostmaster,
        }
    }

    /// The same zone with `serial` when its names differ from `prev`'s,
    /// else `prev`'s serial: the SOA serial moves only on change.
    pub fn versioned(mut self, prev: &Zone) -> Self {
        self.serial = if self.nodes == prev.nodes {
            prev.serial
        } else {
            prev.serial.wrapping_add(1)
        };
        self
    }

    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }

    fn soa(&self) -> Record {
        // minimum: how long resolvers cache "no such name".
        let soa = SOA::new(
            self.apex.clone(),
            self.hostmaster.clone(),
            self.serial,
            60,
            60,
            3600,
            self.ttl,
        );
        Record::from_rdata(self.apex.clone(), self.ttl, RData::SOA(soa))
    }

    fn records(&self, name: &Name, node: &Node, qtype: RecordType) -> Vec<Record> {
        let mut out = Vec::new();
        let want = |t: RecordType| qtype == t || qtype == RecordType::ANY;
        for ip in &node.ips {
            match ip {
                IpAddr::V4(v4) if want(RecordType::A) => {
                    out.push(Record::from_rdata(name.clone(), self.ttl, RData::A(A(*v4))))
                }
                IpAddr::V6(v6) if want(RecordType::AAAA) => out.push(Record::from_rdata(
                    name.clone(),
                    self.ttl,
                    RData::AAAA(AAAA(*v6)),
                )),
                _ => {}
            }
        }
        if want(RecordType::SRV) {
            for (port, target) in &node.srv {
                let srv = SRV::new(0, 100, *port, target.clone());
                out.push(Record::from_rdata(name.clone(), self.ttl, RData::SRV(srv)));
            }
        }
        out
    }

    /// The answer to `req`, or `None` for what gets none (a response, not
    /// a query).
    pub fn answer(&self, req: &Message) -> Option<Message> {
        if req.message_type() != MessageType::Query {
            return None;
        }
        let mut resp = Message::new();
        resp.set_id(req.id())
            .set_message_type(MessageType::Response)
            .set_op_code(req.op_code())
            .set_recursion_desired(req.recursion_desired())
            .set_checking_disabled(req.checking_disabled());
        if let Some(edns) = req.extensions() {
            let mut ours = Edns::new();
            ours.set_max_payload(MAX_UDP_PAYLOAD.min(edns.max_payload().max(512)));
            resp.set_edns(ours);
        }
        if req.op_code() != OpCode::Query {
            resp.set_response_code(ResponseCode::NotImp);
            return Some(resp);
        }
        let [q] = req.queries() else {
            resp.set_response_code(ResponseCode::FormErr);
            return Some(resp);
        };
        resp.add_query(q.clone());
        let apex = &self.apex;
        if q.query_class() != DNSClass::IN || !apex.zone_of(q.name()) {
            // Not a recursive resolver: only this zone is answered here.
            resp.set_response_code(ResponseCode::Refused);
            return Some(resp);
        }
        resp.set_authoritative(true);
        let k = key(q.name());
        let qtype = q.query_type();
        match self.nodes.get(&k) {
            Some(node) => {
                let answers = self.records(q.name(), node, qtype);
                if answers.is_empty() {
                    resp.add_name_server(self.soa());
                }
                resp.add_answers(answers);
                // A client asking for SRV gets the targets' addresses too
                // (the server leaves them out when they do not fit).
                if qtype == RecordType::SRV {
                    let mut seen = BTreeSet::new();
                    for (_, t) in &node.srv {
                        let k = key(t);
                        if let Some(n) = self.nodes.get(&k).filter(|_| seen.insert(k.clone())) {
                            resp.add_additionals(self.records(t, n, RecordType::ANY));
                        }
                    }
                }
            }
            None if k == key(apex) || self.interior.contains(&k) => {
                if qtype == RecordType::SOA && k == key(apex) {
                    resp.add_answer(self.soa());
                } else {
                    resp.add_name_server(self.soa());
                }
            }
            None => {
                resp.set_response_code(ResponseCode::NXDomain);
                resp.add_name_server(self.soa());
            }
        }
        Some(resp)
    }
}

#[cfg(test)]
mod tests;
