//! The rules a name, port or reference must meet before anything is
//! rendered: what Kubernetes (or SPIFFE) would reject later, refused
//! now with the rule that failed. The Terraform module's variable
//! validations state the same rules (a test holds them together).

use std::fmt;

/// A refused value: what it was for, the value, and the rule it broke.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{what} `{value}`: {rule}")]
pub struct NameError {
    pub what: &'static str,
    pub value: String,
    pub rule: Rule,
}

/// Which rule failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Rule {
    Empty,
    TooLong(usize),
    /// Characters outside the allowed set.
    Charset(&'static str),
    /// First and last character must be alphanumeric.
    Edges,
    /// Empty label between dots.
    EmptyLabel,
    PortRange(u16, u16),
    Scheme(&'static str),
    OneOf(&'static [&'static str]),
}

impl fmt::Display for Rule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Rule::Empty => f.write_str("must not be empty"),
            Rule::TooLong(n) => write!(f, "must be at most {n} characters"),
            Rule::Charset(set) => write!(f, "may contain only {set}"),
            Rule::Edges => f.write_str("must start and end with a lowercase letter or digit"),
            Rule::EmptyLabel => {
                f.write_str("must not have empty labels (`..`, leading or trailing `.`)")
            }
            Rule::PortRange(lo, hi) => write!(f, "must be a port number from {lo} to {hi}"),
            Rule::Scheme(s) => write!(f, "must be {s}"),
            Rule::OneOf(v) => write!(f, "must be one of {}", v.join(", ")),
        }
    }
}

fn fail(what: &'static str, value: &str, rule: Rule) -> NameError {
    NameError {
        what,
        value: value.to_owned(),
        rule,
    }
}

const LABEL_CHARS: &str = "lowercase letters, digits and '-'";

/// An RFC 1123 label: Kubernetes names of namespaces and Services, and
/// fedmesh cluster names (which become label values and DNS labels).
pub fn dns_label(what: &'static str, v: &str) -> Result<(), NameError> {
    if v.is_empty() {
        return Err(fail(what, v, Rule::Empty));
    }
    if v.len() > 63 {
        return Err(fail(what, v, Rule::TooLong(63)));
    }
    if !v
        .bytes()
        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'-')
    {
        return Err(fail(what, v, Rule::Charset(LABEL_CHARS)));
    }
    if v.starts_with('-') || v.ends_with('-') {
        return Err(fail(what, v, Rule::Edges));
    }
    Ok(())
}

pub fn cluster_name(v: &str) -> Result<(), NameError> {
    dns_label("cluster name", v)
}

/// A SPIFFE trust domain that is also a DNS name (dots separate labels).
pub fn trust_domain(v: &str) -> Result<(), NameError> {
    const W: &str = "trust domain";
    if v.is_empty() {
        return Err(fail(W, v, Rule::Empty));
    }
    if v.len() > 253 {
        return Err(fail(W, v, Rule::TooLong(253)));
    }
    if !v.bytes().all(|c| {
        c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'-' || c == b'.' || c == b'_'
    }) {
        return Err(fail(
            W,
            v,
            Rule::Charset("lowercase letters, digits, '-', '_' and '.'"),
        ));
    }
    if v.split('.').any(str::is_empty) {
        return Err(fail(W, v, Rule::EmptyLabel));
    }
    let edge = |c: Option<char>| c.is_some_and(|c| c.is_ascii_alphanumeric());
    if !edge(v.chars().next()) || !edge(v.chars().last()) {
        return Err(fail(W, v, Rule::Edges));
    }
    Ok(())
}

pub fn port(what: &'static str, v: u32) -> Result<u16, NameError> {
    match u16::try_from(v) {
        Ok(p) if p > 0 => Ok(p),
        _ => Err(fail(what, &v.to_string(), Rule::PortRange(1, 65535))),
    }
}

/// A NodePort in Kubernetes' default range.
pub fn node_port(what: &'static str, v: u32) -> Result<u16, NameError> {
    match u16::try_from(v) {
        Ok(p) if (30000..=32767).contains(&p) => Ok(p),
        _ => Err(fail(what, &v.to_string(), Rule::PortRange(30000, 32767))),
    }
}

/// An etcd client URL: `http(s)://host:port`.
pub fn store_endpoint(v: &str) -> Result<(), NameError> {
    const W: &str = "store endpoint";
    let rest = v
        .strip_prefix("http://")
        .or_else(|| v.strip_prefix("https://"))
        .ok_or_else(|| fail(W, v, Rule::Scheme("http://host:port or https://host:port")))?;
    let (host, p) = rest
        .rsplit_once(':')
        .ok_or_else(|| fail(W, v, Rule::Scheme("http://host:port or https://host:port")))?;
    if host.is_empty() || host.contains('/') || host.contains(char::is_whitespace) {
        return Err(fail(
            W,
            v,
            Rule::Scheme("http://host:port or https://host:port"),
        ));
    }
    match p.parse::<u16>() {
        Ok(n) if n > 0 => Ok(()),
        _ => Err(fail(W, v, Rule::PortRange(1, 65535))),
    }
}

/// A container image reference: no spaces, no upper case in the name
/// part, at most 255 characters (what the kubelet would reject later).
pub fn image(v: &str) -> Result<(), NameError> {
    const W: &str = "image";
    if v.is_empty() {
        return Err(fail(W, v, Rule::Empty));
    }
    if v.len() > 255 {
        return Err(fail(W, v, Rule::TooLong(255)));
    }
    let ok = v.bytes().all(|c| {
        c.is_ascii_lowercase()
            || c.is_ascii_digit()
            || matches!(c, b'.' | b'_' | b'-' | b'/' | b':' | b'@')
            || c.is_ascii_uppercase()
    });
    // Upper case is allowed only in a tag or digest, after the last '/'.
    let name_part = v.split(['@']).next().unwrap_or(v);
    let repo = match name_part.rsplit_once(':') {
        Some((r, tag)) if !tag.contains('/') => r,
        _ => name_part,
    };
    if !ok || repo.bytes().any(|c| c.is_ascii_uppercase()) {
        return Err(fail(
            W,
            v,
            Rule::Charset("lowercase repository names, then an optional :tag or @digest"),
        ));
    }
    Ok(())
}

pub const SERVICE_TYPES: &[&str] = &["LoadBalancer", "NodePort", "ClusterIP"];
pub const PULL_POLICIES: &[&str] = &["IfNotPresent", "Always", "Never"];

pub fn one_of(what: &'static str, v: &str, set: &'static [&'static str]) -> Result<(), NameError> {
    if set.contains(&v) {
        Ok(())
    } else {
        Err(fail(what, v, Rule::OneOf(set)))
    }
}

/// An annotation key: optional DNS-subdomain prefix and `/`, then a name
/// of 1-63 alphanumerics, '-', '_' or '.', alphanumeric at both ends.
pub fn annotation_key(v: &str) -> Result<(), NameError> {
    const W: &str = "annotation key";
    let (prefix, name) = match v.rsplit_once('/') {
        Some((p, n)) => (Some(p), n),
        None => (None, v),
    };
    if let Some(p) = prefix {
        if p.is_empty() || p.len() > 253 || p.split('.').any(|l| dns_label(W, l).is_err()) {
            return Err(fail(
                W,
                v,
                Rule::Charset("a DNS subdomain prefix (lowercase labels) before '/'"),
            ));
        }
    }
    if name.is_empty() {
        return Err(fail(W, v, Rule::Empty));
    }
    if name.len() > 63 {
        return Err(fail(W, v, Rule::TooLong(63)));
    }
    if !name
        .bytes()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'-' | b'_' | b'.'))
    {
        return Err(fail(
            W,
            v,
            Rule::Charset("letters, digits, '-', '_' and '.' after the prefix"),
        ));
    }
    if !name.starts_with(|c: char| c.is_ascii_alphanumeric())
        || !name.ends_with(|c: char| c.is_ascii_alphanumeric())
    {
        return Err(fail(W, v, Rule::Edges));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_rule_is_named() {
        assert_eq!(cluster_name("east"), Ok(()));
        let e = cluster_name("East").unwrap_err();
        assert_eq!(
            e.to_string(),
            "cluster name `East`: may contain only lowercase letters, digits and '-'"
        );
        assert_eq!(cluster_name("-east").unwrap_err().rule, Rule::Edges);
        assert_eq!(cluster_name("").unwrap_err().rule, Rule::Empty);
        assert_eq!(
            cluster_name(&"a".repeat(64)).unwrap_err().rule,
            Rule::TooLong(63)
        );
        assert_eq!(trust_domain("east.acme"), Ok(()));
        assert_eq!(
            trust_domain("east..acme").unwrap_err().rule,
            Rule::EmptyLabel
        );
        assert!(matches!(
            trust_domain("East.acme").unwrap_err().rule,
            Rule::Charset(_)
        ));
        assert_eq!(trust_domain("-east.acme").unwrap_err().rule, Rule::Edges);
        assert_eq!(port("p", 0).unwrap_err().rule, Rule::PortRange(1, 65535));
        assert_eq!(
            port("p", 70000).unwrap_err().rule,
            Rule::PortRange(1, 65535)
        );
        assert_eq!(
            node_port("p", 8080).unwrap_err().rule,
            Rule::PortRange(30000, 32767)
        );
        assert!(store_endpoint("https://etcd-0.etcd:2379").is_ok());
        assert!(matches!(
            store_endpoint("etcd:2379").unwrap_err().rule,
            Rule::Scheme(_)
        ));
        assert!(matches!(
            store_endpoint("http://etcd:0").unwrap_err().rule,
            Rule::PortRange(..)
        ));
        assert!(image("ghcr.io/acme/fedmesh:v0.1.0").is_ok());
        assert!(image("fedmesh@sha256:abc").is_ok());
        assert!(image("localhost:5000/fedmesh:Dev").is_ok());
        assert!(image("Fedmesh:dev").is_err());
        assert!(image("fed mesh").is_err());
        assert!(annotation_key("service.beta.kubernetes.io/aws-load-balancer-type").is_ok());
        assert!(annotation_key("bad key").is_err());
        assert!(annotation_key("Acme.io/x").is_err());
        assert!(one_of("service type", "Ingress", SERVICE_TYPES).is_err());
    }
}
