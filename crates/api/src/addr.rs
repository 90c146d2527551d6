//! `host:port` addresses in config files and flags: an IP literal or a DNS
//! name (a Kubernetes Service's `name.namespace.svc`), resolved when used.

use std::fmt;
use std::net::{SocketAddr, ToSocketAddrs};

/// Why an address was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum AddressError {
    #[error("`{0}`: expected host:port (IPv6 as [addr]:port)")]
    Shape(String),
    #[error("`{0}`: port must be 1-65535")]
    Port(String),
    #[error(
        "`{0}`: host must be an IP address or a DNS name (a-z, 0-9, '-', '.'; labels of 1-63)"
    )]
    Host(String),
    #[error("`{addr}` did not resolve: {reason}")]
    Resolve { addr: String, reason: String },
}

/// An address as written: `10.0.0.1:15012`, `[::1]:15012` or
/// `fedmesh-controller.fedmesh-system.svc:15012`.
#[derive(Clone, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct HostPort {
    text: String,
    /// Set when the host is an IP literal: nothing to resolve.
    literal: Option<SocketAddr>,
}

impl HostPort {
    pub fn parse(text: &str) -> Result<Self, AddressError> {
        if let Ok(a) = text.parse::<SocketAddr>() {
            if a.port() == 0 {
                return Err(AddressError::Port(text.into()));
            }
            return Ok(Self {
                text: text.into(),
                literal: Some(a),
            });
        }
        let (host, port) = text
            .rsplit_once(':')
            .ok_or_else(|| AddressError::Shape(text.into()))?;
        match port.parse::<u16>() {
            Ok(p) if p > 0 => {}
            _ => return Err(AddressError::Port(text.into())),
        }
        let host = host.strip_suffix('.').unwrap_or(host);
        let label_ok = |l: &str| {
            !l.is_empty()
                && l.len() <= 63
                && l.bytes()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'-')
                && !l.starts_with('-')
                && !l.ends_with('-')
        };
        if host.is_empty() || host.len() > 253 || !host.split('.').all(label_ok) {
            return Err(AddressError::Host(text.into()));
        }
        Ok(Self {
            text: text.into(),
            literal: None,
        })
    }

    /// The address when the host is an IP literal.
    pub fn literal(&self) -> Option<SocketAddr> {
        self.literal
    }

    /// The first address the name resolves to (blocking: for start-up,
    /// where a Service's ClusterIP is stable for the Service's life).
    pub fn resolve(&self) -> Result<SocketAddr, AddressError> {
        if let Some(a) = self.literal {
            return Ok(a);
        }
        let err = |reason: String| AddressError::Resolve {
            addr: self.text.clone(),
            reason,
        };
        self.text
            .to_socket_addrs()
            .map_err(|e| err(e.to_string()))?
            .next()
            .ok_or_else(|| err("no addresses".into()))
    }

    pub fn as_str(&self) -> &str {
        &self.text
    }
}

impl From<SocketAddr> for HostPort {
    fn from(a: SocketAddr) -> Self {
        Self {
            text: a.to_string(),
            literal: Some(a),
        }
    }
}

impl TryFrom<String> for HostPort {
    type Error = AddressError;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        Self::parse(&s)
    }
}

impl From<HostPort> for String {
    fn from(h: HostPort) -> String {
        h.text
    }
}

impl std::str::FromStr for HostPort {
    type Err = AddressError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

impl fmt::Display for HostPort {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

impl fmt::Debug for HostPort {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "HostPort({})", self.text)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn literals_names_and_refusals() {
        let l = HostPort::parse("127.0.0.1:15012").unwrap();
        assert_eq!(l.literal(), Some("127.0.0.1:15012".parse().unwrap()));
        assert!(HostPort::parse("[::1]:15012").unwrap().literal().is_some());
        let n = HostPort::parse("fedmesh-controller.fedmesh-system.svc:15012").unwrap();
        assert_eq!(n.literal(), None);
        assert_eq!(n.to_string(), "fedmesh-controller.fedmesh-system.svc:15012");
        assert!(matches!(
            HostPort::parse("localhost"),
            Err(AddressError::Shape(_))
        ));
        assert!(matches!(HostPort::parse("a:0"), Err(AddressError::Port(_))));
        assert!(matches!(
            HostPort::parse("a:99999"),
            Err(AddressError::Port(_))
        ));
        assert!(matches!(
            HostPort::parse("Bad_Host:1"),
            Err(AddressError::Host(_))
        ));
        assert!(matches!(
            HostPort::parse("-a.b:1"),
            Err(AddressError::Host(_))
        ));
        assert!(matches!(HostPort::parse(":1"), Err(AddressError::Host(_))));
        assert_eq!(
            HostPort::parse("localhost:7")
                .unwrap()
                .resolve()
                .unwrap()
                .port(),
            7
        );
    }

    #[test]
    fn serde_round_trip_refuses_bad_text() {
        let h: HostPort = serde_json::from_str("\"ctl.ns.svc:15012\"").unwrap();
        assert_eq!(serde_json::to_string(&h).unwrap(), "\"ctl.ns.svc:15012\"");
        assert!(serde_json::from_str::<HostPort>("\"ctl:0\"").is_err());
    }
}
