//! A proxy's memory of one service between requests — outlier state, load
//! per member, retry budget — and the plan for the next request made from
//! it and the catalog's [`ClusterRoute`]s. Pure: the caller passes `now`
//! and a random source, and reports each attempt's result back.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::Instant;

use fedmesh_balance::{plan, Candidate, Ejection, Group, Load, Outlier, RetryBudget};
use rand::Rng;

use crate::{ClusterName, ClusterRoute, Hop, ServicePolicy};

/// What outlier detection tracks: an endpoint of this cluster, or a whole
/// remote cluster (reached through a gateway).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Member {
    Endpoint(SocketAddr),
    Cluster(ClusterName),
}

impl std::fmt::Display for Member {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Member::Endpoint(a) => write!(f, "endpoint {a}"),
            Member::Cluster(c) => write!(f, "cluster {c}"),
        }
    }
}

/// One place to try, in plan order.
#[derive(Debug, Clone)]
pub struct Attempt {
    pub hop: Hop,
    pub cluster: ClusterName,
    /// Whether `cluster` is the proxy's own.
    pub local: bool,
    pub member: Member,
    pub load: Load,
}

#[derive(Debug)]
pub struct ServiceBalancer {
    policy: ServicePolicy,
    endpoints: Outlier<SocketAddr>,
    clusters: Outlier<ClusterName>,
    loads: HashMap<Member, Load>,
    budget: RetryBudget,
    /// Members of the last plan; state is pruned when they change.
    members: Vec<Member>,
}

impl ServiceBalancer {
    pub fn new(policy: &ServicePolicy, now: Instant) -> Self {
        Self {
            policy: policy.clone(),
            endpoints: Outlier::new(policy.outlier.clone()),
            clusters: Outlier::new(policy.outlier.clone()),
            loads: HashMap::new(),
            budget: RetryBudget::new(policy.retry.budget.clone(), now),
            members: Vec::new(),
        }
    }

    /// Follows a changed policy, keeping what was learned.
    pub fn set_policy(&mut self, policy: &ServicePolicy, now: Instant) {
        if &self.policy == policy {
            return;
        }
        self.endpoints.set_config(policy.outlier.clone());
        self.clusters.set_config(policy.outlier.clone());
        if self.policy.retry.budget != policy.retry.budget {
            self.budget = RetryBudget::new(policy.retry.budget.clone(), now);
        }
        self.policy = policy.clone();
    }

    fn member(own: &ClusterName, route: &ClusterRoute, hop: &Hop) -> Member {
        match hop {
            Hop::Endpoint { address, .. } if &route.cluster == own => Member::Endpoint(*address),
            _ => Member::Cluster(route.cluster.clone()),
        }
    }

    fn prune(&mut self, own: &ClusterName, routes: &[ClusterRoute]) {
        let members: Vec<Member> = routes
            .iter()
            .flat_map(|r| r.hops.iter().map(move |h| Self::member(own, r, h)))
            .collect();
        if members == self.members {
            return;
        }
        let eps: Vec<SocketAddr> = members
            .iter()
            .filter_map(|m| match m {
                Member::Endpoint(a) => Some(*a),
                Member::Cluster(_) => None,
            })
            .collect();
        let cls: Vec<ClusterName> = members
            .iter()
            .filter_map(|m| match m {
                Member::Cluster(c) => Some(c.clone()),
                Member::Endpoint(_) => None,
            })
            .collect();
        self.endpoints.retain(&eps);
        self.clusters.retain(&cls);
        self.loads.retain(|k, _| members.contains(k));
        self.members = members;
    }

    /// The attempts for one request, best first, at most `max`.
    pub fn plan<R: Rng>(
        &mut self,
        own: &ClusterName,
        routes: &[ClusterRoute],
        max: usize,
        rng: &mut R,
        now: Instant,
    ) -> Vec<Attempt> {
        self.prune(own, routes);
        let mut groups = Vec::with_capacity(routes.len());
        for r in routes {
            let local = &r.cluster == own;
            let members = r
                .hops
                .iter()
                .map(|h| {
                    let member = Self::member(own, r, h);
                    let load = self.loads.entry(member.clone()).or_default().clone();
                    let ejected = match &member {
                        Member::Endpoint(a) => self.endpoints.is_ejected(a, now),
                        // A remote cluster is one member: its ejection is the group's.
                        Member::Cluster(_) => false,
                    };
                    Candidate {
                        cost: load.cost(),
                        ejected,
                        item: Attempt {
                            hop: h.clone(),
                            cluster: r.cluster.clone(),
                            local,
                            member,
                            load,
                        },
                    }
                })
                .collect();
            groups.push(Group {
                level: r.level,
                weight: r.weight,
                ejected: !local && self.clusters.is_ejected(&r.cluster, now),
                members,
            });
        }
        plan(groups, max, rng)
    }

    pub fn success(&mut self, a: &Attempt, now: Instant) {
        match &a.member {
            Member::Endpoint(e) => self.endpoints.success(e, now),
            Member::Cluster(c) => self.clusters.success(c, now),
        }
    }

    pub fn failure(&mut self, a: &Attempt, now: Instant) -> Option<Ejection> {
        match &a.member {
            Member::Endpoint(e) => self.endpoints.failure(e, now),
            Member::Cluster(c) => self.clusters.failure(c, now),
        }
    }

    /// An original request: it adds to the retry budget.
    pub fn request(&mut self, now: Instant) {
        self.budget.request(now);
    }

    /// Whether one more attempt fits the retry budget (and counts it).
    pub fn try_retry(&mut self, now: Instant) -> bool {
        self.budget.try_retry(now)
    }

    /// Attempts per request the policy allows.
    pub fn attempts(&self) -> usize {
        self.policy.retry.attempts as usize
    }
}

/// Every service's balancer of one proxy, kept across catalog updates.
#[derive(Debug, Default)]
pub struct Balancers {
    map: std::sync::Mutex<HashMap<fedmesh_wire::ServiceName, ServiceBalancer>>,
}

impl Balancers {
    /// Runs `f` on `service`'s balancer (created on first use, following
    /// `policy`). Keep `f` short: every connection to any service takes
    /// this lock, and it must never be held across an await.
    pub fn with<T>(
        &self,
        service: &fedmesh_wire::ServiceName,
        policy: &ServicePolicy,
        f: impl FnOnce(&mut ServiceBalancer) -> T,
    ) -> T {
        let mut map = match self.map.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        };
        let now = Instant::now();
        let b = map
            .entry(service.clone())
            .or_insert_with(|| ServiceBalancer::new(policy, now));
        b.set_policy(policy, now);
        f(b)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::CatalogSpec;
    use fedmesh_wire::ServiceName;
    use rand::rngs::StdRng;
    use rand::SeedableRng;
    use std::time::Duration;

    const YAML: &str = r#"
cluster: east
trust_domain: east.demo
region: eu
gateway: { address: "127.0.0.1:15008" }
services:
  - name: echo.demo
    ports: [7000]
    endpoints:
      - { address: "127.0.0.1:9001", identity: "spiffe://east.demo/ns/demo/sa/echo" }
imports:
  - { service: echo.demo, clusters: [west, north] }
peers:
  - { cluster: west, trust_domain: west.demo, gateway: "127.0.0.1:16443", region: us }
  - { cluster: north, trust_domain: north.demo, gateway: "127.0.0.1:17443", region: eu }
policies:
  echo.demo:
    outlier: { consecutive_failures: 2, base_ejection: 1s }
"#;

    #[test]
    fn locality_order_then_ejection_moves_traffic_and_it_comes_back() {
        let c = CatalogSpec::from_yaml(YAML).unwrap().build().unwrap();
        let svc = ServiceName::parse("echo.demo").unwrap();
        let routes = c.outbound_routes(&svc, 7000).unwrap();
        let t0 = Instant::now();
        let mut rng = StdRng::seed_from_u64(7);
        let mut b = ServiceBalancer::new(c.policy_or_default(&svc), t0);
        let order = |b: &mut ServiceBalancer, rng: &mut StdRng, now| {
            b.plan(&c.cluster, &routes, 8, rng, now)
                .into_iter()
                .map(|a| a.member.to_string())
                .collect::<Vec<_>>()
        };
        assert_eq!(
            order(&mut b, &mut rng, t0),
            ["endpoint 127.0.0.1:9001", "cluster north", "cluster west"],
            "own cluster, then same region (north: eu), then the rest"
        );
        let first = b.plan(&c.cluster, &routes, 8, &mut rng, t0).remove(0);
        assert_eq!(b.failure(&first, t0), None);
        assert!(matches!(b.failure(&first, t0), Some(Ejection::Ejected(_))));
        assert_eq!(
            order(&mut b, &mut rng, t0)[0],
            "cluster north",
            "the only local endpoint is out: the next level takes over"
        );
        let later = t0 + Duration::from_secs(1);
        assert_eq!(order(&mut b, &mut rng, later)[0], "endpoint 127.0.0.1:9001");
    }

    #[test]
    fn a_gateway_with_a_hint_sees_only_that_cluster() {
        let c = CatalogSpec::from_yaml(YAML).unwrap().build().unwrap();
        let t = fedmesh_wire::Target::Service {
            name: ServiceName::parse("echo.demo").unwrap(),
            port: 7000,
        };
        let r = c.peer_routes(&t, Some("west")).unwrap();
        assert_eq!(r.len(), 1);
        assert_eq!(r[0].cluster.as_str(), "west");
        assert!(matches!(
            c.peer_routes(&t, Some("south")),
            Err(crate::RouteError::NotServedBy { .. })
        ));
        assert_eq!(c.peer_routes(&t, None).unwrap().len(), 2);
    }
}
