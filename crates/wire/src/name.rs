//! Multi-cluster service names: `NAME.NS.svc.clusterset.local` (KEP-1645).

use std::fmt;
use std::str::FromStr;

const SUFFIX: &str = ".svc.clusterset.local";

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum NameError {
    /// The host as [`crate::bounded`] quotes it: these errors carry names
    /// others chose into logs and answers.
    #[error(
        "service host `{0}` must look like NAME.NAMESPACE.svc.clusterset.local or NAME.NAMESPACE"
    )]
    Shape(String),
    #[error("{what} `{label}` is not a valid DNS-1123 label (lowercase letters, digits and `-`, 1-63 chars, starting and ending with a letter or digit)")]
    Label { what: &'static str, label: String },
}

/// A service exported across clusters: same namespace and name in every
/// cluster means the same service.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ServiceName {
    name: String,
    namespace: String,
}

/// Checks a DNS-1123 label (what Kubernetes requires of names and
/// namespaces, and fedmesh of cluster names).
pub fn check_label(what: &'static str, label: &str) -> Result<(), NameError> {
    let b = label.as_bytes();
    let ok = !b.is_empty()
        && b.len() <= 63
        && b.iter()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-')
        && b.first().is_some_and(|c| c.is_ascii_alphanumeric())
        && b.last().is_some_and(|c| c.is_ascii_alphanumeric());
    if ok {
        Ok(())
    } else {
        Err(NameError::Label {
            what,
            label: crate::bounded(label),
        })
    }
}

impl ServiceName {
    pub fn new(name: &str, namespace: &str) -> Result<Self, NameError> {
        check_label("service name", name)?;
        check_label("namespace", namespace)?;
        Ok(Self {
            name: name.to_owned(),
            namespace: namespace.to_owned(),
        })
    }

    /// Parses `NAME.NS.svc.clusterset.local` or the short `NAME.NS`.
    pub fn parse(host: &str) -> Result<Self, NameError> {
        let short = host.strip_suffix(SUFFIX).unwrap_or(host);
        let mut parts = short.split('.');
        match (parts.next(), parts.next(), parts.next()) {
            (Some(name), Some(ns), None) => Self::new(name, ns),
            _ => Err(NameError::Shape(crate::bounded(host))),
        }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn namespace(&self) -> &str {
        &self.namespace
    }

    /// The full clusterset host, `NAME.NS.svc.clusterset.local`.
    pub fn host(&self) -> String {
        format!("{}.{}{SUFFIX}", self.name, self.namespace)
    }
}

impl fmt::Display for ServiceName {
    /// The short form `NAME.NS`, as operators type it.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", self.name, self.namespace)
    }
}

impl fmt::Debug for ServiceName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ServiceName({self})")
    }
}

impl FromStr for ServiceName {
    type Err = NameError;
    fn from_str(s: &str) -> Result<Self, NameError> {
        Self::parse(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_quote_a_bounded_escaped_prefix() {
        let host = format!("{}\n.demo", "a".repeat(12_000));
        let e = ServiceName::parse(&host).unwrap_err().to_string();
        assert!(e.len() < crate::MAX_LOGGED + 200, "{} bytes", e.len());
        assert!(e.contains("bytes)"), "{e}");
        let e = ServiceName::new("x\u{1b}[2J", "demo")
            .unwrap_err()
            .to_string();
        assert!(e.contains("x\\u{1b}[2J"), "{e}");
        assert!(!e.contains('\u{1b}'), "{e}");
    }

    #[test]
    fn parses_long_and_short_forms() {
        let a = ServiceName::parse("echo.demo.svc.clusterset.local").unwrap();
        let b = ServiceName::parse("echo.demo").unwrap();
        assert_eq!(a, b);
        assert_eq!(a.host(), "echo.demo.svc.clusterset.local");
        assert_eq!(a.to_string(), "echo.demo");
    }

    #[test]
    fn rejects_bad_names() {
        for bad in [
            "echo",
            "a.b.c",
            "Echo.demo",
            "-x.demo",
            "x-.demo",
            "x.",
            ".demo",
            "x_y.demo",
            "echo.demo.svc.cluster.local",
        ] {
            assert!(ServiceName::parse(bad).is_err(), "{bad}");
        }
        assert!(ServiceName::new(&"a".repeat(64), "ns").is_err());
        assert!(ServiceName::new(&"a".repeat(63), "ns").is_ok());
    }
}
