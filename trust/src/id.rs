//! SPIFFE identities: [`TrustDomain`] and [`SpiffeId`].
//!
//! Both types can only hold values that follow the SPIFFE ID standard
//! (<https://github.com/spiffe/spiffe/blob/main/standards/SPIFFE-ID.md>), so
//! every other part of fedmesh can compare and print them without checking
//! again. fedmesh workload and gateway IDs always carry a path; a bare trust
//! domain is a [`TrustDomain`], never a `SpiffeId`.

use std::fmt;
use std::str::FromStr;

/// Longest SPIFFE ID accepted, per the standard's "2048 bytes" limit.
pub const MAX_ID_LEN: usize = 2048;
/// Longest trust domain name accepted (a DNS name's limit).
pub const MAX_TRUST_DOMAIN_LEN: usize = 255;

const SCHEME: &str = "spiffe://";

/// Why a string is not a valid trust domain or SPIFFE ID.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum IdError {
    #[error("SPIFFE ID is empty")]
    Empty,
    #[error("SPIFFE ID must start with `spiffe://` (lowercase scheme)")]
    WrongScheme,
    #[error("trust domain is empty")]
    EmptyTrustDomain,
    #[error("trust domain is longer than {MAX_TRUST_DOMAIN_LEN} bytes")]
    TrustDomainTooLong,
    #[error("SPIFFE ID is longer than {MAX_ID_LEN} bytes")]
    TooLong,
    #[error("trust domain must not carry a port")]
    Port,
    #[error("trust domain must not carry userinfo (`user@`)")]
    UserInfo,
    #[error(
        "trust domain may only contain lowercase letters, digits, `.`, `-` and `_`; found {0:?}"
    )]
    TrustDomainChar(char),
    #[error("SPIFFE ID needs a path (`spiffe://domain/path`)")]
    MissingPath,
    #[error("path segments must not be empty (`//` or a trailing `/`)")]
    EmptySegment,
    #[error("path segments must not be `.` or `..`")]
    DotSegment,
    #[error("SPIFFE IDs must not be percent-encoded")]
    PercentEncoded,
    #[error("SPIFFE IDs must not carry a query (`?`)")]
    Query,
    #[error("SPIFFE IDs must not carry a fragment (`#`)")]
    Fragment,
    #[error("path may only contain letters, digits, `.`, `-` and `_`; found {0:?}")]
    PathChar(char),
}

/// A SPIFFE trust domain such as `east.acme`: one per cluster in fedmesh.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TrustDomain(String);

impl TrustDomain {
    /// Parses a bare trust domain name (`east.acme`), or the trust domain
    /// part of `spiffe://east.acme` with no path.
    pub fn new(name: &str) -> Result<Self, IdError> {
        let name = name.strip_prefix(SCHEME).unwrap_or(name);
        validate_trust_domain(name)?;
        Ok(Self(name.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The trust domain's own ID, `spiffe://<domain>`, used as the URI of a
    /// root CA and as the key of a bundle.
    pub fn id_string(&self) -> String {
        format!("{SCHEME}{}", self.0)
    }

    /// Builds an ID in this trust domain from path segments.
    pub fn id(&self, segments: &[&str]) -> Result<SpiffeId, IdError> {
        let mut s = self.id_string();
        for seg in segments {
            // A segment is one path element: a `/` inside would silently
            // change the ID's shape (`ns/a/b/sa/x`).
            if seg.contains('/') {
                return Err(IdError::PathChar('/'));
            }
            s.push('/');
            s.push_str(seg);
        }
        SpiffeId::new(&s)
    }

    /// The ID of a fedmesh component, `spiffe://<td>/ns/fedmesh-system/sa/<component>`.
    /// Infallible: a component name that breaks the path rules becomes
    /// `invalid-component`, which matches nothing anyone was issued.
    pub fn system_id(&self, component: &'static str) -> SpiffeId {
        let component =
            if validate_path(&format!("/{component}")).is_ok() && !component.contains('/') {
                component
            } else {
                "invalid-component"
            };
        let uri = format!("{SCHEME}{}/ns/fedmesh-system/sa/{component}", self.0);
        SpiffeId {
            path_start: SCHEME.len() + self.0.len(),
            uri,
        }
    }

    /// The Kubernetes-style workload ID `spiffe://<td>/ns/<ns>/sa/<sa>`.
    pub fn workload(&self, namespace: &str, service_account: &str) -> Result<SpiffeId, IdError> {
        self.id(&["ns", namespace, "sa", service_account])
    }
}

impl fmt::Display for TrustDomain {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for TrustDomain {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "TrustDomain({})", self.0)
    }
}

impl FromStr for TrustDomain {
    type Err = IdError;
    fn from_str(s: &str) -> Result<Self, IdError> {
        Self::new(s)
    }
}

/// A SPIFFE ID with a non-empty path, e.g. `spiffe://west.acme/ns/shop/sa/api`.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SpiffeId {
    uri: String,
    // Byte offset of the `/` that starts the path; the trust domain is
    // `uri[SCHEME.len()..path_start]`.
    path_start: usize,
}

impl SpiffeId {
    pub fn new(uri: &str) -> Result<Self, IdError> {
        if uri.is_empty() {
            return Err(IdError::Empty);
        }
        if uri.len() > MAX_ID_LEN {
            return Err(IdError::TooLong);
        }
        let rest = uri.strip_prefix(SCHEME).ok_or(IdError::WrongScheme)?;
        // Query and fragment are reported as such, wherever they appear.
        if rest.contains('?') {
            return Err(IdError::Query);
        }
        if rest.contains('#') {
            return Err(IdError::Fragment);
        }
        let (td, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, ""),
        };
        validate_trust_domain(td)?;
        if path.is_empty() {
            return Err(IdError::MissingPath);
        }
        validate_path(path)?;
        Ok(Self {
            uri: uri.to_owned(),
            path_start: SCHEME.len() + td.len(),
        })
    }

    pub fn as_str(&self) -> &str {
        &self.uri
    }

    pub fn trust_domain_name(&self) -> &str {
        &self.uri[SCHEME.len()..self.path_start]
    }

    pub fn trust_domain(&self) -> TrustDomain {
        TrustDomain(self.trust_domain_name().to_owned())
    }

    /// The path, starting with `/`.
    pub fn path(&self) -> &str {
        &self.uri[self.path_start..]
    }

    /// The namespace of a Kubernetes-style ID (`/ns/<ns>/...`), if it has one.
    pub fn namespace(&self) -> Option<&str> {
        let mut segs = self.path().split('/').skip(1);
        match (segs.next(), segs.next()) {
            (Some("ns"), Some(ns)) => Some(ns),
            _ => None,
        }
    }
}

impl fmt::Display for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.uri)
    }
}

impl fmt::Debug for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SpiffeId({})", self.uri)
    }
}

impl FromStr for SpiffeId {
    type Err = IdError;
    fn from_str(s: &str) -> Result<Self, IdError> {
        Self::new(s)
    }
}

impl serde::Serialize for SpiffeId {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.uri)
    }
}

impl<'de> serde::Deserialize<'de> for SpiffeId {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        SpiffeId::new(&s).map_err(serde::de::Error::custom)
    }
}

impl serde::Serialize for TrustDomain {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.0)
    }
}

impl<'de> serde::Deserialize<'de> for TrustDomain {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        TrustDomain::new(&s).map_err(serde::de::Error::custom)
    }
}

fn validate_trust_domain(td: &str) -> Result<(), IdError> {
    if td.is_empty() {
        return Err(IdError::EmptyTrustDomain);
    }
    if td.len() > MAX_TRUST_DOMAIN_LEN {
        return Err(IdError::TrustDomainTooLong);
    }
    if td.contains('@') {
        return Err(IdError::UserInfo);
    }
    if td.contains(':') {
        return Err(IdError::Port);
    }
    if td.contains('%') {
        return Err(IdError::PercentEncoded);
    }
    match td
        .chars()
        .find(|c| !matches!(c, 'a'..='z' | '0'..='9' | '.' | '-' | '_'))
    {
        Some(c) => Err(IdError::TrustDomainChar(c)),
        None => Ok(()),
    }
}

fn validate_path(path: &str) -> Result<(), IdError> {
    // `path` starts with '/', so the first split element is empty.
    for seg in path.split('/').skip(1) {
        if seg.is_empty() {
            return Err(IdError::EmptySegment);
        }
        if seg == "." || seg == ".." {
            return Err(IdError::DotSegment);
        }
        if seg.contains('%') {
            return Err(IdError::PercentEncoded);
        }
        if let Some(c) = seg
            .chars()
            .find(|c| !matches!(c, 'a'..='z' | 'A'..='Z' | '0'..='9' | '.' | '-' | '_'))
        {
            return Err(IdError::PathChar(c));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn valid_ids_round_trip() {
        for s in [
            "spiffe://east.acme/ns/shop/sa/api",
            "spiffe://a/b",
            "spiffe://x_y-z.0/A.b-C_d/..x/x..",
        ] {
            let id = SpiffeId::new(s).unwrap();
            assert_eq!(id.as_str(), s);
            assert_eq!(id.to_string(), s);
        }
        let id = SpiffeId::new("spiffe://east.acme/ns/shop/sa/api").unwrap();
        assert_eq!(id.trust_domain_name(), "east.acme");
        assert_eq!(id.path(), "/ns/shop/sa/api");
        assert_eq!(id.namespace(), Some("shop"));
        assert_eq!(id.trust_domain(), TrustDomain::new("east.acme").unwrap());
    }

    #[test]
    fn each_rule_has_its_error() {
        let cases: &[(&str, IdError)] = &[
            ("", IdError::Empty),
            ("http://east/x", IdError::WrongScheme),
            ("SPIFFE://east/x", IdError::WrongScheme),
            ("spiffe:/east/x", IdError::WrongScheme),
            ("spiffe:///x", IdError::EmptyTrustDomain),
            ("spiffe://East/x", IdError::TrustDomainChar('E')),
            ("spiffe://ea st/x", IdError::TrustDomainChar(' ')),
            ("spiffe://east:443/x", IdError::Port),
            ("spiffe://u@east/x", IdError::UserInfo),
            ("spiffe://east", IdError::MissingPath),
            ("spiffe://east/", IdError::EmptySegment),
            ("spiffe://east/a//b", IdError::EmptySegment),
            ("spiffe://east/a/", IdError::EmptySegment),
            ("spiffe://east/a/./b", IdError::DotSegment),
            ("spiffe://east/a/..", IdError::DotSegment),
            ("spiffe://east/a%20b", IdError::PercentEncoded),
            ("spiffe://ea%73t/a", IdError::PercentEncoded),
            ("spiffe://east/a?x=1", IdError::Query),
            ("spiffe://east/a#frag", IdError::Fragment),
            ("spiffe://east/a b", IdError::PathChar(' ')),
            ("spiffe://east/a*b", IdError::PathChar('*')),
            ("spiffe://east/ü", IdError::PathChar('ü')),
        ];
        for (s, want) in cases {
            assert_eq!(SpiffeId::new(s).unwrap_err(), *want, "{s}");
        }
    }

    #[test]
    fn length_limits() {
        let long_td = "a".repeat(MAX_TRUST_DOMAIN_LEN + 1);
        assert_eq!(
            SpiffeId::new(&format!("spiffe://{long_td}/x")).unwrap_err(),
            IdError::TrustDomainTooLong
        );
        let long_path = "a".repeat(MAX_ID_LEN);
        assert_eq!(
            SpiffeId::new(&format!("spiffe://east/{long_path}")).unwrap_err(),
            IdError::TooLong
        );
        let ok = format!("spiffe://east/{}", "a".repeat(MAX_ID_LEN - 14));
        assert_eq!(ok.len(), MAX_ID_LEN);
        assert!(SpiffeId::new(&ok).is_ok());
    }

    #[test]
    fn trust_domain_parsing() {
        assert_eq!(TrustDomain::new("east.acme").unwrap().as_str(), "east.acme");
        assert_eq!(
            TrustDomain::new("spiffe://east.acme").unwrap().as_str(),
            "east.acme"
        );
        assert_eq!(TrustDomain::new("").unwrap_err(), IdError::EmptyTrustDomain);
        assert_eq!(
            TrustDomain::new("East").unwrap_err(),
            IdError::TrustDomainChar('E')
        );
        let td = TrustDomain::new("west.acme").unwrap();
        assert_eq!(
            td.workload("shop", "api").unwrap().as_str(),
            "spiffe://west.acme/ns/shop/sa/api"
        );
        assert_eq!(td.workload("a/b", "c").unwrap_err(), IdError::PathChar('/'));
        assert_eq!(td.workload("", "c").unwrap_err(), IdError::EmptySegment);
    }
}
