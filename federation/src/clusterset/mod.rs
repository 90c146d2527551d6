//! ClusterSet IPs (KEP-1645 `ServiceImport.spec.ips`): one virtual IP per
//! configured family for each ClusterSetIP service, allocated for the
//! whole ClusterSet in the federation store, so every cluster (and its
//! DNS) gives one service the same address.
//!
//! `/fedmesh/v1/clusterset/ips/<ip>` holds an [`IpRecord`]: the service
//! the address is for, which cluster took it and when, and when it was
//! released. One key per address, created or changed only by
//! compare-and-set, so two controllers can never hand one address to two
//! services; the store, not a controller's memory, is the truth, so an
//! allocation survives restarts, leader changes and compaction, whatever
//! the service source.
//!
//! The rules ([`Allocator::on`], a pure state machine on virtual time):
//! - A controller allocates for the ClusterSetIP services its own cluster
//!   exports, one address per configured family: first its own released
//!   address back (a service that comes back keeps its IP), else a free
//!   one, searched from an offset hashed from the service name (so two
//!   controllers allocating at once rarely pick the same address; when
//!   they do, the compare-and-set decides).
//! - Free means: no record, or released longer ago than the quarantine
//!   (a cached DNS answer must not reach another service).
//! - Two live addresses of one family for one service (two controllers
//!   raced): the oldest (then lowest) stays, the others are released.
//! - An address whose service nobody exported for `release_after` is
//!   released (any controller may; the compare-and-set makes it once).
//! - A record that does not parse is reported and never touched.

mod cidr;
pub(crate) mod driver;

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::time::Duration;

use fedmesh_wire::ServiceName;
use serde::{Deserialize, Serialize};

pub use cidr::{Cidr, CidrError};
pub use driver::{run, ClusterSetIps, Exported, IpMetrics};

/// Where address records live.
pub const IPS_PREFIX: &str = "/fedmesh/v1/clusterset/ips/";

pub fn ip_key(ip: IpAddr) -> String {
    format!("{IPS_PREFIX}{ip}")
}

/// `/fedmesh/v1/clusterset/ips/<ip>`
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IpRecord {
    /// `NAME.NAMESPACE`
    pub service: String,
    /// The cluster whose controller took it.
    pub cluster: String,
    pub allocated_at_ms: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub released_at_ms: Option<u64>,
}

/// An address record that parsed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Held {
    pub service: ServiceName,
    pub allocated_at_ms: u64,
    pub released_at_ms: Option<u64>,
}

/// Largest address record read from the store.
const MAX_RECORD: usize = 4096;

/// Why an address record was not used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IpRecordError {
    #[error("key does not end in an IP address")]
    Key,
    #[error("record of {0} bytes; at most {MAX_RECORD}")]
    TooLarge(usize),
    #[error("record does not decode: {0}")]
    Decode(String),
    #[error("service `{0}` is not NAME.NAMESPACE")]
    Service(String),
}

/// Decodes one record under [`IPS_PREFIX`].
pub fn decode(key: &str, value: &[u8]) -> Result<(IpAddr, Held), IpRecordError> {
    let ip: IpAddr = key
        .strip_prefix(IPS_PREFIX)
        .and_then(|s| s.parse().ok())
        .ok_or(IpRecordError::Key)?;
    if value.len() > MAX_RECORD {
        return Err(IpRecordError::TooLarge(value.len()));
    }
    let r: IpRecord = serde_json::from_slice(value)
        .map_err(|e| IpRecordError::Decode(fedmesh_wire::bounded(&e.to_string())))?;
    let service = ServiceName::parse(&r.service)
        .map_err(|_| IpRecordError::Service(fedmesh_wire::bounded(&r.service)))?;
    Ok((
        ip,
        Held {
            service,
            allocated_at_ms: r.allocated_at_ms,
            released_at_ms: r.released_at_ms,
        },
    ))
}

/// `clusterset_ips:` in the controller config.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterSetIpConfig {
    /// At most one CIDR per IP family, e.g. `["241.0.0.0/16", "fd00:fe::/112"]`;
    /// every cluster of a ClusterSet should name the same.
    pub cidrs: Vec<String>,
    /// How long a released address is not handed to another service.
    #[serde(default = "default_quarantine", with = "humantime_serde")]
    pub quarantine: Duration,
    /// How long a service may go unexported before its address is
    /// released (a controller restart must not cost a service its IP).
    #[serde(default = "default_release_after", with = "humantime_serde")]
    pub release_after: Duration,
}

fn default_quarantine() -> Duration {
    Duration::from_secs(600)
}

fn default_release_after() -> Duration {
    Duration::from_secs(120)
}

/// The checked config.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IpSettings {
    pub cidrs: Vec<Cidr>,
    pub quarantine: Duration,
    pub release_after: Duration,
}

impl ClusterSetIpConfig {
    /// `cidrs` with the default quarantine and release times.
    pub fn new(cidrs: Vec<String>) -> Self {
        Self {
            cidrs,
            quarantine: default_quarantine(),
            release_after: default_release_after(),
        }
    }

    /// Refuses what cannot work: a CIDR that does not parse, two of one
    /// family, CIDRs that overlap each other or `avoid` (addresses the
    /// controller knows are in use: gateways), a range of special
    /// addresses, or one too small to hold an address.
    pub fn check(&self, avoid: &[IpAddr]) -> Result<IpSettings, CidrError> {
        let mut cidrs: Vec<Cidr> = Vec::new();
        for s in &self.cidrs {
            let c: Cidr = s.parse()?;
            c.usable()?;
            if let Some(o) = cidrs.iter().find(|o| o.overlaps(&c)) {
                return Err(CidrError::Overlap(c.to_string(), o.to_string()));
            }
            if cidrs.iter().any(|o| o.is_v4() == c.is_v4()) {
                return Err(CidrError::TwoOfAFamily(c.to_string()));
            }
            if let Some(ip) = avoid.iter().find(|ip| c.contains(**ip)) {
                return Err(CidrError::Overlap(c.to_string(), ip.to_string()));
            }
            cidrs.push(c);
        }
        if cidrs.is_empty() {
            return Err(CidrError::Empty);
        }
        Ok(IpSettings {
            cidrs,
            quarantine: self.quarantine,
            release_after: self.release_after,
        })
    }
}

/// What the allocator asks its driver to do; each is one compare-and-set
/// against the record as the allocator saw it (`None`: no record).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    Claim {
        ip: IpAddr,
        service: ServiceName,
        seen: Option<Held>,
    },
    Release {
        ip: IpAddr,
        seen: Held,
    },
}

/// The allocator's answer to one look at the records.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Plan {
    pub actions: Vec<Action>,
    /// Every service's live addresses (IPv4 first), this cluster's or not.
    pub assigned: BTreeMap<ServiceName, Vec<IpAddr>>,
    /// This cluster's services a configured family has no free address
    /// for, with the CIDR.
    pub exhausted: BTreeMap<ServiceName, Vec<String>>,
    /// When to look again even if nothing changes (a release or a
    /// quarantine due), ms since the epoch.
    pub wake_at_ms: Option<u64>,
}

/// The allocator's memory: when each held service was last seen exported
/// (only to time `release_after`; after a restart it starts afresh, which
/// errs on the side of keeping an address).
#[derive(Debug, Default)]
pub struct Allocator {
    last_seen: BTreeMap<ServiceName, u64>,
}

impl Allocator {
    /// `records`: the address records that parsed; `unreadable`: the
    /// addresses of those that did not (never handed out). `exported`: the
    /// ClusterSetIP services any cluster exports. `mine`: those among them
    /// this cluster exports (it allocates for these).
    pub fn on(
        &mut self,
        s: &IpSettings,
        records: &BTreeMap<IpAddr, Held>,
        unreadable: &BTreeSet<IpAddr>,
        exported: &BTreeSet<ServiceName>,
        mine: &BTreeSet<ServiceName>,
        now_ms: u64,
    ) -> Plan {
        let mut plan = Plan::default();
        for svc in exported {
            self.last_seen.insert(svc.clone(), now_ms);
        }
        // Live addresses by service and family, oldest first.
        let mut live: BTreeMap<(&ServiceName, bool), Vec<(u64, IpAddr)>> = BTreeMap::new();
        for (ip, h) in records {
            if h.released_at_ms.is_none() {
                live.entry((&h.service, ip.is_ipv4()))
                    .or_default()
                    .push((h.allocated_at_ms, *ip));
            }
        }
        let mut keep: BTreeMap<ServiceName, Vec<IpAddr>> = BTreeMap::new();
        for ((svc, _), mut list) in live {
            list.sort();
            for (_, ip) in list.iter().skip(1) {
                plan.actions.push(Action::Release {
                    ip: *ip,
                    seen: records[ip].clone(),
                });
            }
            let (_, ip) = list[0];
            if exported.contains(svc) {
                keep.entry(svc.clone()).or_default().push(ip);
                continue;
            }
            let seen = *self.last_seen.entry(svc.clone()).or_insert(now_ms);
            let due = seen.saturating_add(ms(s.release_after));
            if due <= now_ms {
                plan.actions.push(Action::Release {
                    ip,
                    seen: records[&ip].clone(),
                });
            } else {
                keep.entry(svc.clone()).or_default().push(ip);
                wake(&mut plan, due);
            }
        }
        self.last_seen
            .retain(|svc, _| exported.contains(svc) || keep.contains_key(svc));
        // Addresses this plan takes, so two services are not given one.
        let mut taken: BTreeSet<IpAddr> = unreadable.clone();
        for svc in mine {
            for cidr in &s.cidrs {
                let has = keep
                    .get(svc)
                    .is_some_and(|ips| ips.iter().any(|ip| ip.is_ipv4() == cidr.is_v4()));
                if has {
                    continue;
                }
                // Its own released address back, the most recent first.
                let own = records
                    .iter()
                    .filter(|(ip, h)| {
                        &h.service == svc && h.released_at_ms.is_some() && cidr.contains(**ip)
                    })
                    .max_by_key(|(_, h)| h.released_at_ms)
                    .map(|(ip, _)| *ip)
                    .filter(|ip| !taken.contains(ip));
                let pick = own.or_else(|| {
                    free(cidr, svc, records, &taken, s.quarantine, now_ms, &mut |t| {
                        wake(&mut plan, t)
                    })
                });
                match pick {
                    Some(ip) => {
                        taken.insert(ip);
                        plan.actions.push(Action::Claim {
                            ip,
                            service: svc.clone(),
                            seen: records.get(&ip).cloned(),
                        });
                    }
                    None => plan
                        .exhausted
                        .entry(svc.clone())
                        .or_default()
                        .push(cidr.to_string()),
                }
            }
        }
        for ips in keep.values_mut() {
            ips.sort_by_key(|ip| (!ip.is_ipv4(), *ip));
        }
        plan.assigned = keep;
        plan
    }
}

fn wake(plan: &mut Plan, t: u64) {
    plan.wake_at_ms = Some(plan.wake_at_ms.map_or(t, |w| w.min(t)));
}

fn ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// A free address of `cidr` for `svc`: scanned from an offset hashed from
/// the name. Only addresses with a record can be unfree, so the scan looks
/// at most at `records.len() + taken.len() + 1` addresses.
fn free(
    cidr: &Cidr,
    svc: &ServiceName,
    records: &BTreeMap<IpAddr, Held>,
    taken: &BTreeSet<IpAddr>,
    quarantine: Duration,
    now_ms: u64,
    wake: &mut dyn FnMut(u64),
) -> Option<IpAddr> {
    let size = cidr.usable_count();
    if size == 0 {
        return None;
    }
    let start = fnv(&svc.to_string()) % size;
    let limit = (records.len() + taken.len() + 1) as u128;
    for i in 0..limit.min(size) {
        let ip = cidr.usable_nth((start + i) % size)?;
        if taken.contains(&ip) {
            continue;
        }
        match records.get(&ip) {
            None => return Some(ip),
            Some(h) => match h.released_at_ms {
                Some(r) if r.saturating_add(ms(quarantine)) <= now_ms => return Some(ip),
                Some(r) => wake(r.saturating_add(ms(quarantine))),
                None => {}
            },
        }
    }
    None
}

/// FNV-1a: a stable spread of names over a range (not for security).
fn fnv(s: &str) -> u128 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in s.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    u128::from(h)
}

#[cfg(test)]
mod tests;
