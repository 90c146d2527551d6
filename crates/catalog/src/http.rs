//! Per-request HTTP routing policy: which rule a request matches and what
//! the rule decides (destination service, allowed clusters, timeout,
//! whether it may be retried). Pure: the sidecar's L7 shell passes the
//! request's method, authority, path and headers in and acts on the answer.

use std::collections::BTreeMap;
use std::time::Duration;

use fedmesh_wire::ServiceName;
use serde::{Deserialize, Serialize};

use crate::ClusterName;

/// Upper bounds, so a policy cannot make a proxy do unbounded work per
/// request.
pub const MAX_ROUTES: usize = 100;
pub const MAX_MATCH_HEADERS: usize = 16;

/// HTTP rules of one service, tried in order; the first match decides.
/// A request matching none goes to the service itself, every cluster
/// allowed, with the service's timeout and retry settings.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HttpPolicy {
    pub routes: Vec<HttpRoute>,
}

#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HttpRoute {
    /// For logs and metrics; `route[i]` when absent.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(rename = "match")]
    pub matches: HttpMatch,
    pub to: HttpDestination,
    /// Whole request until the response head arrives; overrides the
    /// service's `request_timeout`.
    #[serde(with = "humantime_serde", skip_serializing_if = "Option::is_none")]
    pub timeout: Option<Duration>,
    /// Retry every method on this route, not only idempotent ones (the
    /// operator vouches the backend tolerates duplicates).
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub retry_any_method: bool,
}

/// All given conditions must hold; an empty match matches everything.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HttpMatch {
    /// Exact host (port ignored, case-insensitive).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
    /// Path prefix on segment boundaries: `/api` matches `/api` and
    /// `/api/x`, not `/apix`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub path_prefix: Option<String>,
    /// Header name (case-insensitive) → exact value.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub headers: BTreeMap<String, String>,
}

/// Where a matched request goes: another service (`NAME.NS`, same port),
/// and/or only these clusters (in the service's own order and weights).
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HttpDestination {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub service: Option<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub clusters: Vec<String>,
}

/// The parts of a request routing looks at.
pub struct RequestFacts<'a, H> {
    pub method: &'a str,
    /// From `:authority` or `Host`, possibly with a port.
    pub authority: Option<&'a str>,
    pub path: &'a str,
    /// Looks a header up by lower-case name.
    pub header: H,
}

/// What routing decided for one request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpDecision {
    /// Which rule, for logs and the `route` metric label.
    pub route: String,
    pub service: ServiceName,
    /// Empty: every cluster serving the service.
    pub clusters: Vec<ClusterName>,
    pub timeout: Option<Duration>,
    /// May be sent again after it may have reached a backend.
    pub retryable: bool,
}

/// RFC 9110 §9.2.2: repeating these has the effect of doing them once.
pub fn idempotent(method: &str) -> bool {
    matches!(
        method,
        "GET" | "HEAD" | "OPTIONS" | "TRACE" | "PUT" | "DELETE"
    )
}

impl HttpMatch {
    fn matches<'a, H: Fn(&str) -> Option<&'a str>>(&self, r: &RequestFacts<'a, H>) -> bool {
        if let Some(h) = &self.host {
            let got = r.authority.map(strip_port).unwrap_or("");
            if !got.eq_ignore_ascii_case(h) {
                return false;
            }
        }
        if let Some(p) = &self.path_prefix {
            let path = r.path.split('?').next().unwrap_or("");
            let prefix = p.trim_end_matches('/');
            let ok = prefix.is_empty()
                || path
                    .strip_prefix(prefix)
                    .is_some_and(|rest| rest.is_empty() || rest.starts_with('/'));
            if !ok {
                return false;
            }
        }
        self.headers
            .iter()
            .all(|(k, v)| (r.header)(&k.to_ascii_lowercase()) == Some(v.as_str()))
    }
}

fn strip_port(authority: &str) -> &str {
    // `[::1]:80` keeps its brackets; `host:80` loses the port.
    if authority.starts_with('[') {
        return authority
            .find(']')
            .map(|i| &authority[..=i])
            .unwrap_or(authority);
    }
    authority.split(':').next().unwrap_or(authority)
}

impl HttpPolicy {
    /// The decision for a request sent to `service`, whose own request
    /// timeout is `default_timeout`.
    pub fn decide<'a, H: Fn(&str) -> Option<&'a str>>(
        &self,
        service: &ServiceName,
        default_timeout: Option<Duration>,
        r: &RequestFacts<'a, H>,
    ) -> HttpDecision {
        let idem = idempotent(r.method);
        for (i, route) in self.routes.iter().enumerate() {
            if !route.matches.matches(r) {
                continue;
            }
            // Validated when the policy was accepted; a name that fails
            // here falls back to the service itself.
            let target = route
                .to
                .service
                .as_deref()
                .and_then(|s| ServiceName::parse(s).ok())
                .unwrap_or_else(|| service.clone());
            return HttpDecision {
                route: route.name.clone().unwrap_or_else(|| format!("route[{i}]")),
                service: target,
                clusters: route
                    .to
                    .clusters
                    .iter()
                    .filter_map(|c| ClusterName::new(c).ok())
                    .collect(),
                timeout: route.timeout.or(default_timeout),
                retryable: idem || route.retry_any_method,
            };
        }
        HttpDecision {
            route: "default".into(),
            service: service.clone(),
            clusters: Vec::new(),
            timeout: default_timeout,
            retryable: idem,
        }
    }

    /// Every problem, each prefixed with `what`.
    pub fn problems(&self, what: &str) -> Vec<String> {
        let mut v = Vec::new();
        if self.routes.len() > MAX_ROUTES {
            v.push(format!("{what}: more than {MAX_ROUTES} routes"));
        }
        for (i, r) in self.routes.iter().enumerate() {
            let at = format!("{what}.routes[{i}]");
            if let Some(s) = &r.to.service {
                if let Err(e) = ServiceName::parse(s) {
                    v.push(format!("{at}.to.service: {e}"));
                }
            }
            for c in &r.to.clusters {
                if let Err(e) = ClusterName::new(c) {
                    v.push(format!("{at}.to.clusters: {e}"));
                }
            }
            if r.timeout.is_some_and(|d| d.is_zero()) {
                v.push(format!("{at}.timeout must be more than zero"));
            }
            if r.matches.headers.len() > MAX_MATCH_HEADERS {
                v.push(format!("{at}.match.headers: more than {MAX_MATCH_HEADERS}"));
            }
            for k in r.matches.headers.keys() {
                let token = !k.is_empty()
                    && k.bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b));
                if !token {
                    v.push(format!("{at}.match.headers: {k:?} is not a header name"));
                }
            }
            if let Some(p) = &r.matches.path_prefix {
                if !p.starts_with('/') {
                    v.push(format!("{at}.match.path_prefix must start with `/`"));
                }
            }
            if r.matches.host.as_deref().is_some_and(str::is_empty) {
                v.push(format!("{at}.match.host is empty"));
            }
        }
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn svc(s: &str) -> ServiceName {
        ServiceName::parse(s).unwrap()
    }

    fn policy(yaml: &str) -> HttpPolicy {
        let p: HttpPolicy = serde_yaml_ng::from_str(yaml).unwrap();
        assert!(p.problems("http").is_empty(), "{:?}", p.problems("http"));
        p
    }

    fn decide(
        p: &HttpPolicy,
        method: &str,
        host: &str,
        path: &str,
        headers: &[(&str, &str)],
    ) -> HttpDecision {
        let h: Vec<(String, String)> = headers
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let facts = RequestFacts {
            method,
            authority: Some(host),
            path,
            header: |name: &str| h.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str()),
        };
        p.decide(&svc("web.shop"), Some(Duration::from_secs(5)), &facts)
    }

    #[test]
    fn first_matching_route_decides() {
        let p = policy(
            r#"
routes:
  - name: canary
    match: { headers: { x-canary: "1" } }
    to: { service: web-v2.shop }
    timeout: 200ms
  - match: { path_prefix: /api }
    to: { clusters: [west] }
    retry_any_method: true
  - match: { host: admin.shop }
    to: { clusters: [east] }
"#,
        );
        let d = decide(&p, "POST", "web", "/api/x", &[("x-canary", "1")]);
        assert_eq!(d.route, "canary");
        assert_eq!(d.service, svc("web-v2.shop"));
        assert_eq!(d.timeout, Some(Duration::from_millis(200)));
        assert!(!d.retryable, "POST is not idempotent on the canary route");

        let d = decide(&p, "POST", "web", "/api/x?q=1", &[("x-canary", "0")]);
        assert_eq!(d.route, "route[1]");
        assert_eq!(d.service, svc("web.shop"));
        assert_eq!(d.clusters, vec![ClusterName::new("west").unwrap()]);
        assert_eq!(d.timeout, Some(Duration::from_secs(5)));
        assert!(d.retryable, "retry_any_method");

        assert_eq!(decide(&p, "GET", "web", "/apix", &[]).route, "default");
        assert_eq!(decide(&p, "GET", "web", "/api", &[]).route, "route[1]");
        assert_eq!(
            decide(&p, "GET", "ADMIN.shop:8080", "/", &[]).route,
            "route[2]"
        );
        let d = decide(&p, "GET", "web", "/", &[]);
        assert_eq!((d.route.as_str(), d.retryable), ("default", true));
        assert!(d.clusters.is_empty());
        assert!(!decide(&p, "PATCH", "web", "/", &[]).retryable);
    }

    #[test]
    fn bad_rules_are_reported_together() {
        let p: HttpPolicy = serde_yaml_ng::from_str(
            r#"
routes:
  - match: { path_prefix: api, headers: { "bad header": x }, host: "" }
    to: { service: "no dots", clusters: ["Not_A_Label"] }
    timeout: 0s
"#,
        )
        .unwrap();
        let v = p.problems("policies[web.shop].http");
        assert_eq!(v.len(), 6, "{v:#?}");
        assert!(v
            .iter()
            .all(|m| m.starts_with("policies[web.shop].http.routes[0]")));
        assert!(serde_yaml_ng::from_str::<HttpPolicy>("routes: [{ matches: {} }]").is_err());
    }

    #[test]
    fn authority_ports_and_ipv6() {
        assert_eq!(strip_port("a.b:80"), "a.b");
        assert_eq!(strip_port("[::1]:80"), "[::1]");
        assert_eq!(strip_port("host"), "host");
    }
}
