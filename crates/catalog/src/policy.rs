//! Per-service traffic and authorization policy, as declared by operators
//! and carried to proxies in the catalog.
//!
//! A policy says, for one service: in which order clusters are tried
//! (locality, or an explicit list), how traffic is split between clusters
//! (weights), how long a connect may take, how many attempts and retries a
//! request may make, when a member is ejected, what to do when a cluster is
//! partitioned from the store, and — on the serving side — which callers
//! may reach it.

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use fedmesh_balance::{BudgetConfig, OutlierConfig};
use fedmesh_trust::SpiffeId;
use fedmesh_wire::ServiceName;
use serde::{Deserialize, Serialize};

use crate::ClusterName;

/// Who may call: one identity, a namespace of a trust domain, or a whole
/// trust domain. Written `spiffe://td/ns/NS/sa/SA`, `spiffe://td/ns/NS/*`
/// or `spiffe://td/*`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum Principal {
    Exact(SpiffeId),
    Namespace {
        trust_domain: String,
        namespace: String,
    },
    TrustDomain(String),
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("principal {raw:?}: {why}")]
pub struct PrincipalError {
    raw: String,
    why: String,
}

impl Principal {
    pub fn parse(raw: &str) -> Result<Self, PrincipalError> {
        let err = |why: &str| PrincipalError {
            raw: raw.to_owned(),
            why: why.to_owned(),
        };
        let Some(rest) = raw.strip_suffix("/*") else {
            return SpiffeId::new(raw)
                .map(Principal::Exact)
                .map_err(|e| err(&e.to_string()));
        };
        // Check the prefix with the SPIFFE ID rules by completing it.
        let wildcard = || err("a wildcard must follow spiffe://TD/ or spiffe://TD/ns/NS/");
        let after = rest.strip_prefix("spiffe://").ok_or_else(wildcard)?;
        let id =
            SpiffeId::new(&format!("{rest}/ns/probe/sa/probe")).map_err(|e| err(&e.to_string()))?;
        if !after.contains('/') {
            return Ok(Principal::TrustDomain(id.trust_domain_name().to_owned()));
        }
        let ns = id
            .path()
            .strip_prefix("/ns/")
            .and_then(|p| p.strip_suffix("/ns/probe/sa/probe"))
            .filter(|ns| !ns.contains('/') && !ns.is_empty())
            .ok_or_else(wildcard)?;
        Ok(Principal::Namespace {
            trust_domain: id.trust_domain_name().to_owned(),
            namespace: ns.to_owned(),
        })
    }

    pub fn matches(&self, id: &SpiffeId) -> bool {
        match self {
            Principal::Exact(p) => p == id,
            Principal::TrustDomain(td) => id.trust_domain_name() == td,
            Principal::Namespace {
                trust_domain,
                namespace,
            } => {
                id.trust_domain_name() == trust_domain
                    && id
                        .path()
                        .strip_prefix("/ns/")
                        .and_then(|p| p.strip_prefix(namespace.as_str()))
                        .is_some_and(|rest| rest.starts_with('/'))
            }
        }
    }
}

impl TryFrom<String> for Principal {
    type Error = PrincipalError;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        Self::parse(&s)
    }
}

impl From<Principal> for String {
    fn from(p: Principal) -> String {
        p.to_string()
    }
}

impl fmt::Display for Principal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Principal::Exact(id) => write!(f, "{id}"),
            Principal::Namespace {
                trust_domain,
                namespace,
            } => write!(f, "spiffe://{trust_domain}/ns/{namespace}/*"),
            Principal::TrustDomain(td) => write!(f, "spiffe://{td}/*"),
        }
    }
}

/// Which callers may reach a service. Without one, every authenticated
/// caller that can reach the service may call it (a service that is not
/// exported is still never reachable through a gateway).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Authz {
    pub allow: Vec<Principal>,
}

impl Authz {
    pub fn allows(&self, id: &SpiffeId) -> bool {
        self.allow.iter().any(|p| p.matches(id))
    }
}

/// The order clusters are tried in. YAML: `locality`, or a list of
/// cluster names.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(try_from = "FailoverRepr", into = "FailoverRepr")]
pub enum Failover {
    /// This cluster, then clusters of the same region, then the others.
    #[default]
    Locality,
    /// These clusters in this order (this cluster may be named); clusters
    /// not listed come after them, by locality.
    Priority(Vec<String>),
}

#[derive(Serialize, Deserialize)]
#[serde(untagged)]
enum FailoverRepr {
    Named(String),
    Priority(Vec<String>),
}

impl TryFrom<FailoverRepr> for Failover {
    type Error = String;
    fn try_from(r: FailoverRepr) -> Result<Self, String> {
        match r {
            FailoverRepr::Named(s) if s == "locality" => Ok(Failover::Locality),
            FailoverRepr::Named(s) => Err(format!(
                "failover {s:?}: expected `locality` or a list of clusters"
            )),
            FailoverRepr::Priority(l) => Ok(Failover::Priority(l)),
        }
    }
}

impl From<Failover> for FailoverRepr {
    fn from(f: Failover) -> Self {
        match f {
            Failover::Locality => FailoverRepr::Named("locality".into()),
            Failover::Priority(l) => FailoverRepr::Priority(l),
        }
    }
}

/// What a proxy does when a cluster's lease has expired in the store but
/// its gateway still answers. YAML: `serve_stale`, or
/// `{ fail_closed_after: 30s }`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(try_from = "PartitionRepr", into = "PartitionRepr")]
pub enum Partition {
    /// Keep sending to it while it answers.
    #[default]
    ServeStale,
    /// Stop sending to it this long after its lease expired.
    FailClosedAfter(Duration),
}

#[derive(Serialize, Deserialize)]
#[serde(untagged)]
enum PartitionRepr {
    Named(String),
    After {
        #[serde(with = "humantime_serde")]
        fail_closed_after: Duration,
    },
}

impl TryFrom<PartitionRepr> for Partition {
    type Error = String;
    fn try_from(r: PartitionRepr) -> Result<Self, String> {
        match r {
            PartitionRepr::Named(s) if s == "serve_stale" => Ok(Partition::ServeStale),
            PartitionRepr::Named(s) => Err(format!(
                "partition {s:?}: expected `serve_stale` or `{{ fail_closed_after: DURATION }}`"
            )),
            PartitionRepr::After { fail_closed_after } => {
                Ok(Partition::FailClosedAfter(fail_closed_after))
            }
        }
    }
}

impl From<Partition> for PartitionRepr {
    fn from(p: Partition) -> Self {
        match p {
            Partition::ServeStale => PartitionRepr::Named("serve_stale".into()),
            Partition::FailClosedAfter(d) => PartitionRepr::After {
                fail_closed_after: d,
            },
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RetryPolicy {
    /// Places one request or connection may try (the first included).
    pub attempts: u32,
    pub budget: BudgetConfig,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            attempts: 3,
            budget: BudgetConfig::default(),
        }
    }
}

/// Policy for one service.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ServicePolicy {
    pub failover: Failover,
    /// Traffic share per cluster (this cluster may be named). Weighted
    /// clusters are tried before the others, split by weight; weight 0
    /// takes traffic only when the weighted ones fail.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub weights: BTreeMap<String, u32>,
    /// Connect + handshake + status per attempt; the proxy's limit when absent.
    #[serde(with = "humantime_serde", skip_serializing_if = "Option::is_none")]
    pub connect_timeout: Option<Duration>,
    /// Whole request (HTTP); absent means none.
    #[serde(with = "humantime_serde", skip_serializing_if = "Option::is_none")]
    pub request_timeout: Option<Duration>,
    pub retry: RetryPolicy,
    pub outlier: OutlierConfig,
    pub partition: Partition,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub authz: Option<Authz>,
    /// Per-request rules for HTTP traffic (the sidecar detects HTTP/1.1
    /// and HTTP/2 on outbound connections; other bytes stay L4).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub http: Option<crate::http::HttpPolicy>,
}

/// Policies keyed by service as a config file writes them (`NAME.NS` →
/// policy), checked: every problem goes to `errs`, prefixed with
/// `policies[NAME]`; only valid entries are returned.
pub fn parse_policies(
    raw: &BTreeMap<String, ServicePolicy>,
    errs: &mut Vec<String>,
) -> BTreeMap<ServiceName, std::sync::Arc<ServicePolicy>> {
    let mut out = BTreeMap::new();
    for (name, p) in raw {
        let what = format!("policies[{name}]");
        match ServiceName::parse(name) {
            Ok(n) => {
                let problems = p.problems(&what);
                if problems.is_empty() {
                    out.insert(n, std::sync::Arc::new(p.clone()));
                }
                errs.extend(problems);
            }
            Err(e) => errs.push(format!("{what}: {e}")),
        }
    }
    out
}

/// Upper bounds, so a policy cannot make a proxy do unbounded work.
pub const MAX_ATTEMPTS: u32 = 16;
pub const MAX_PRINCIPALS: usize = 1_000;

impl ServicePolicy {
    /// Every problem, each prefixed with `what`.
    pub fn problems(&self, what: &str) -> Vec<String> {
        let mut v = Vec::new();
        let mut cluster = |field: &str, name: &str| {
            if let Err(e) = ClusterName::new(name) {
                v.push(format!("{what}: {field}: {e}"));
            }
        };
        if let Failover::Priority(list) = &self.failover {
            for c in list {
                cluster("failover.priority", c);
            }
        }
        for c in self.weights.keys() {
            cluster("weights", c);
        }
        if let Failover::Priority(list) = &self.failover {
            let mut seen = std::collections::BTreeSet::new();
            if list.iter().any(|c| !seen.insert(c)) {
                v.push(format!("{what}: failover.priority names a cluster twice"));
            }
        }
        if !self.weights.is_empty() && self.weights.values().all(|w| *w == 0) {
            v.push(format!(
                "{what}: weights are all 0; remove them or give one a share"
            ));
        }
        if self.weights.values().any(|w| *w > 10_000) {
            v.push(format!("{what}: a weight is above 10000"));
        }
        for (name, d) in [
            ("connect_timeout", self.connect_timeout),
            ("request_timeout", self.request_timeout),
        ] {
            if d.is_some_and(|d| d.is_zero()) {
                v.push(format!("{what}: {name} must be more than zero"));
            }
        }
        if self.retry.attempts == 0 || self.retry.attempts > MAX_ATTEMPTS {
            v.push(format!(
                "{what}: retry.attempts must be within 1..={MAX_ATTEMPTS}"
            ));
        }
        v.extend(self.retry.budget.problems(&format!("{what}: retry.budget")));
        v.extend(self.outlier.problems(&format!("{what}: outlier")));
        if let Partition::FailClosedAfter(d) = self.partition {
            if d.is_zero() {
                v.push(format!(
                    "{what}: partition.fail_closed_after must be more than zero"
                ));
            }
        }
        if let Some(h) = &self.http {
            v.extend(h.problems(&format!("{what}: http")));
        }
        if let Some(a) = &self.authz {
            if a.allow.len() > MAX_PRINCIPALS {
                v.push(format!(
                    "{what}: authz.allow has more than {MAX_PRINCIPALS} entries"
                ));
            }
        }
        v
    }

    /// The priority level of `cluster` for a caller in `own` (region
    /// `own_region`), `region` being the other cluster's: lower goes first.
    pub fn level(
        &self,
        own: &ClusterName,
        own_region: &str,
        cluster: &ClusterName,
        region: &str,
    ) -> u32 {
        let locality = if cluster == own {
            0
        } else if !own_region.is_empty() && own_region == region {
            1
        } else {
            2
        };
        if self.weights.get(cluster.as_str()).is_some_and(|w| *w > 0) {
            // Weighted clusters share the first level: that is the split.
            return 0;
        }
        let base = if self.weights.is_empty() { 0 } else { 1 };
        match &self.failover {
            Failover::Locality => base + locality,
            Failover::Priority(list) => match list.iter().position(|c| c == cluster.as_str()) {
                Some(i) => base + i as u32,
                None => base + list.len() as u32 + locality,
            },
        }
    }

    /// The weight of `cluster` within its level (1 when not set).
    pub fn weight(&self, cluster: &ClusterName) -> u32 {
        if self.weights.is_empty() {
            1
        } else {
            self.weights.get(cluster.as_str()).copied().unwrap_or(0)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(s: &str) -> SpiffeId {
        SpiffeId::new(s).unwrap()
    }

    #[test]
    fn principals_parse_and_match() {
        let exact = Principal::parse("spiffe://east.demo/ns/shop/sa/web").unwrap();
        let ns = Principal::parse("spiffe://east.demo/ns/shop/*").unwrap();
        let td = Principal::parse("spiffe://west.demo/*").unwrap();
        assert!(exact.matches(&id("spiffe://east.demo/ns/shop/sa/web")));
        assert!(!exact.matches(&id("spiffe://east.demo/ns/shop/sa/api")));
        assert!(ns.matches(&id("spiffe://east.demo/ns/shop/sa/api")));
        assert!(!ns.matches(&id("spiffe://east.demo/ns/shopping/sa/api")));
        assert!(!ns.matches(&id("spiffe://west.demo/ns/shop/sa/api")));
        assert!(td.matches(&id("spiffe://west.demo/ns/x/sa/y")));
        assert!(!td.matches(&id("spiffe://east.demo/ns/x/sa/y")));
        for p in [&exact, &ns, &td] {
            assert_eq!(&Principal::parse(&p.to_string()).unwrap(), p);
        }
        for bad in [
            "*",
            "spiffe://*",
            "spiffe://east.demo/ns/*/sa/*",
            "spiffe://east.demo/ns/a/b/*",
            "spiffe://East.demo/*",
            "https://east.demo/*",
            "spiffe://east.demo/ns/shop/sa/web/",
        ] {
            assert!(Principal::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn levels_follow_locality_priority_and_weights() {
        let c = |s| ClusterName::new(s).unwrap();
        let (east, west, north) = (c("east"), c("west"), c("north"));
        let p = ServicePolicy::default();
        assert_eq!(p.level(&east, "eu", &east, "eu"), 0);
        assert_eq!(p.level(&east, "eu", &west, "eu"), 1);
        assert_eq!(p.level(&east, "eu", &north, "us"), 2);
        assert_eq!(
            p.level(&east, "", &west, ""),
            2,
            "unknown regions are not the same region"
        );
        let p = ServicePolicy {
            failover: Failover::Priority(vec!["north".into(), "east".into()]),
            ..Default::default()
        };
        assert_eq!(p.level(&east, "eu", &north, "us"), 0);
        assert_eq!(p.level(&east, "eu", &east, "eu"), 1);
        assert_eq!(p.level(&east, "eu", &west, "eu"), 3);
        let p = ServicePolicy {
            weights: [("east".to_owned(), 90), ("west".to_owned(), 10)].into(),
            ..Default::default()
        };
        assert_eq!(p.level(&east, "eu", &west, "us"), 0);
        assert_eq!(p.weight(&west), 10);
        assert_eq!(p.level(&east, "eu", &north, "us"), 3);
        assert_eq!(p.weight(&north), 0);
    }

    #[test]
    fn yaml_round_trips_and_problems_are_collected() {
        let y = r#"
failover: [west, north]
weights: { west: 90, north: 10 }
connect_timeout: 500ms
retry: { attempts: 2, budget: { percent: 10 } }
outlier: { consecutive_failures: 3, base_ejection: 1s }
partition: { fail_closed_after: 30s }
authz: { allow: ["spiffe://east.demo/ns/demo/*", "spiffe://west.demo/*"] }
"#;
        let p: ServicePolicy = serde_yaml_ng::from_str(y).unwrap();
        assert!(p.problems("p").is_empty(), "{:?}", p.problems("p"));
        assert_eq!(
            p.partition,
            Partition::FailClosedAfter(Duration::from_secs(30))
        );
        let back: ServicePolicy =
            serde_yaml_ng::from_str(&serde_yaml_ng::to_string(&p).unwrap()).unwrap();
        assert_eq!(back, p);
        let bad = ServicePolicy {
            failover: Failover::Priority(vec!["West".into(), "x".into(), "x".into()]),
            weights: [("a".to_owned(), 0)].into(),
            connect_timeout: Some(Duration::ZERO),
            retry: RetryPolicy {
                attempts: 0,
                ..Default::default()
            },
            ..Default::default()
        };
        assert_eq!(bad.problems("p").len(), 5, "{:?}", bad.problems("p"));
        assert!(serde_yaml_ng::from_str::<ServicePolicy>("authz: { allow: ['*'] }").is_err());
        assert!(serde_yaml_ng::from_str::<ServicePolicy>("retries: 3").is_err());
    }
}
