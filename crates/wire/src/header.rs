//! The tunnel header codec.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;

use crate::name::{NameError, ServiceName};
use crate::{PREFIX_LEN, VERSION};

pub(crate) const HEADER_MAGIC: [u8; 4] = *b"FMTH";

/// Hops a stream may take before it is refused as a loop. The longest
/// legitimate path is sidecar → gateway → gateway → sidecar.
pub const MAX_HOPS: u8 = 8;

const F_TARGET: u8 = 0x01;
const F_SOURCE: u8 = 0x02;
const F_TRACEPARENT: u8 = 0x03;
const F_DEADLINE: u8 = 0x04;
const F_HOPS: u8 = 0x05;
const F_CONN_ID: u8 = 0x06;
/// Preferred cluster (an extension: a receiver that does not know it may
/// pick the cluster itself, which is still correct).
const F_CLUSTER: u8 = 0x81;
/// Field types with this bit set may be skipped by a reader that does not
/// know them; unknown types without it are an error (forward compatibility
/// without silently dropping meaning).
const F_IGNORABLE: u8 = 0x80;

const T_SERVICE: u8 = 1;
const T_ENDPOINT: u8 = 2;

const MAX_SOURCE_LEN: usize = 2048;
const TRACEPARENT_LEN: usize = 55;

/// Size limits a reader enforces.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Largest header accepted, prefix included.
    pub max_header_bytes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_header_bytes: 16 * 1024,
        }
    }
}

/// Where a stream should go.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Target {
    /// A multi-cluster service and port; the receiver picks the endpoint.
    Service { name: ServiceName, port: u16 },
    /// One specific endpoint address (used by the last hop).
    Endpoint(SocketAddr),
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Target::Service { name, port } => write!(f, "{}:{port}", name.host()),
            Target::Endpoint(a) => write!(f, "{a}"),
        }
    }
}

/// A W3C trace context `traceparent` value, validated on decode.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct Traceparent(String);

impl Traceparent {
    /// Checks the `version-traceid-parentid-flags` shape of W3C Trace
    /// Context: lowercase hex, non-zero IDs, version `ff` forbidden.
    pub fn parse(s: &str) -> Result<Self, DecodeError> {
        let b = s.as_bytes();
        let hex = |r: std::ops::Range<usize>| {
            b.get(r)
                .is_some_and(|x| x.iter().all(|c| matches!(c, b'0'..=b'9' | b'a'..=b'f')))
        };
        let zero =
            |r: std::ops::Range<usize>| b.get(r).is_some_and(|x| x.iter().all(|c| *c == b'0'));
        let ok = b.len() == TRACEPARENT_LEN
            && hex(0..2)
            && &b[0..2] != b"ff"
            && b[2] == b'-'
            && hex(3..35)
            && !zero(3..35)
            && b[35] == b'-'
            && hex(36..52)
            && !zero(36..52)
            && b[52] == b'-'
            && hex(53..55);
        if ok {
            Ok(Self(s.to_owned()))
        } else {
            Err(DecodeError::BadTraceparent)
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Traceparent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Traceparent({})", self.0)
    }
}

/// The preface of every tunnel stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    pub target: Target,
    /// The caller's SPIFFE ID, as vouched for by a gateway. Sidecars never
    /// set it; receivers trust it only from the peers the design names.
    pub source: Option<String>,
    pub traceparent: Option<Traceparent>,
    /// Time budget left for the whole call, relative so clocks need not agree.
    pub deadline: Option<Duration>,
    /// Hops taken so far; each forwarder increments it.
    pub hops: u8,
    /// Connection id for log and span correlation across hops.
    pub connection_id: Option<u64>,
    /// The cluster a sidecar chose for this stream; its gateway tries only
    /// that cluster, and the sidecar moves on if it fails.
    pub cluster: Option<String>,
}

/// Every way header or status bytes can be wrong.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum DecodeError {
    #[error("need {needed} more bytes")]
    Incomplete { needed: usize },
    #[error("bad magic {0:02x?}: not a fedmesh tunnel frame")]
    BadMagic([u8; 4]),
    #[error("unsupported version {0} (this side speaks {VERSION})")]
    UnsupportedVersion(u8),
    #[error("reserved flags {0:#04x} set")]
    ReservedFlags(u8),
    #[error("header of {len} bytes exceeds the limit of {max}")]
    TooLarge { len: usize, max: usize },
    #[error("field {field:#04x} claims {len} bytes, past the end of the header")]
    FieldOverrun { field: u8, len: usize },
    #[error("field {0:#04x} appears twice")]
    DuplicateField(u8),
    #[error("unknown mandatory field {0:#04x}")]
    UnknownField(u8),
    #[error("field {field:#04x} has length {len}, which is not valid for it")]
    FieldLength { field: u8, len: usize },
    #[error("header has no target")]
    MissingTarget,
    #[error("header has no hop count")]
    MissingHops,
    #[error("unknown target kind {0}")]
    TargetKind(u8),
    #[error("target service: {0}")]
    TargetName(NameError),
    #[error("target is not UTF-8")]
    TargetUtf8,
    #[error("target port 0")]
    ZeroPort,
    #[error("source identity is not printable ASCII or is longer than {MAX_SOURCE_LEN} bytes")]
    BadSource,
    #[error("traceparent is not a valid W3C trace context")]
    BadTraceparent,
    #[error("cluster hint is not a DNS-1123 label")]
    BadCluster,
    #[error("status message is not UTF-8")]
    StatusUtf8,
}

impl Header {
    pub fn new(target: Target) -> Self {
        Self {
            target,
            source: None,
            traceparent: None,
            deadline: None,
            hops: 0,
            connection_id: None,
            cluster: None,
        }
    }

    /// Appends the encoded header to `out`. Fails only when the header would
    /// not fit the limit (a caller bug, or a source ID at its maximum length).
    pub fn encode(&self, out: &mut Vec<u8>, limits: &Limits) -> Result<(), DecodeError> {
        let start = out.len();
        out.extend_from_slice(&HEADER_MAGIC);
        out.push(VERSION);
        out.push(0);
        out.extend_from_slice(&[0, 0]);
        let mut target = Vec::with_capacity(64);
        match &self.target {
            Target::Service { name, port } => {
                target.push(T_SERVICE);
                target.extend_from_slice(&port.to_be_bytes());
                target.extend_from_slice(name.host().as_bytes());
            }
            Target::Endpoint(addr) => {
                target.push(T_ENDPOINT);
                target.extend_from_slice(&addr.port().to_be_bytes());
                match addr.ip() {
                    IpAddr::V4(ip) => target.extend_from_slice(&ip.octets()),
                    IpAddr::V6(ip) => target.extend_from_slice(&ip.octets()),
                }
            }
        }
        field(out, F_TARGET, &target);
        field(out, F_HOPS, &[self.hops]);
        if let Some(s) = &self.source {
            field(out, F_SOURCE, s.as_bytes());
        }
        if let Some(t) = &self.traceparent {
            field(out, F_TRACEPARENT, t.0.as_bytes());
        }
        if let Some(d) = self.deadline {
            let ms = u32::try_from(d.as_millis()).unwrap_or(u32::MAX);
            field(out, F_DEADLINE, &ms.to_be_bytes());
        }
        if let Some(id) = self.connection_id {
            field(out, F_CONN_ID, &id.to_be_bytes());
        }
        if let Some(c) = &self.cluster {
            field(out, F_CLUSTER, c.as_bytes());
        }
        let total = out.len() - start;
        let body = total - PREFIX_LEN;
        if total > limits.max_header_bytes || body > usize::from(u16::MAX) {
            out.truncate(start);
            return Err(DecodeError::TooLarge {
                len: total,
                max: limits.max_header_bytes,
            });
        }
        out[start + 6..start + 8].copy_from_slice(&(body as u16).to_be_bytes());
        Ok(())
    }

    pub fn to_bytes(&self, limits: &Limits) -> Result<Vec<u8>, DecodeError> {
        let mut v = Vec::with_capacity(128);
        self.encode(&mut v, limits)?;
        Ok(v)
    }

    /// Checks the 8-byte prefix and returns the body length that follows.
    /// Lets a reader refuse an oversized header before reading its body.
    pub fn body_len(prefix: &[u8; PREFIX_LEN], limits: &Limits) -> Result<usize, DecodeError> {
        let magic = [prefix[0], prefix[1], prefix[2], prefix[3]];
        if magic != HEADER_MAGIC {
            return Err(DecodeError::BadMagic(magic));
        }
        if prefix[4] != VERSION {
            return Err(DecodeError::UnsupportedVersion(prefix[4]));
        }
        if prefix[5] != 0 {
            return Err(DecodeError::ReservedFlags(prefix[5]));
        }
        let len = usize::from(u16::from_be_bytes([prefix[6], prefix[7]]));
        if PREFIX_LEN + len > limits.max_header_bytes {
            return Err(DecodeError::TooLarge {
                len: PREFIX_LEN + len,
                max: limits.max_header_bytes,
            });
        }
        Ok(len)
    }

    /// Decodes one header from the start of `buf`, returning it and the
    /// number of bytes it used. Bytes after it (payload) are not touched.
    pub fn decode(buf: &[u8], limits: &Limits) -> Result<(Header, usize), DecodeError> {
        let prefix = crate::split_prefix(buf)?;
        let len = Self::body_len(prefix, limits)?;
        let body =
            buf.get(PREFIX_LEN..PREFIX_LEN + len)
                .ok_or_else(|| DecodeError::Incomplete {
                    needed: PREFIX_LEN + len - buf.len(),
                })?;
        Ok((Self::decode_body(body)?, PREFIX_LEN + len))
    }

    /// Decodes the body (the bytes after the prefix).
    pub fn decode_body(mut body: &[u8]) -> Result<Header, DecodeError> {
        let mut target = None;
        let mut hops = None;
        let mut source = None;
        let mut traceparent = None;
        let mut deadline = None;
        let mut connection_id = None;
        let mut cluster = None;
        let mut seen = 0u64;
        while !body.is_empty() {
            let [ty, l0, l1, rest @ ..] = body else {
                return Err(DecodeError::FieldOverrun {
                    field: body.first().copied().unwrap_or(0),
                    len: body.len(),
                });
            };
            let len = usize::from(u16::from_be_bytes([*l0, *l1]));
            let value = rest
                .get(..len)
                .ok_or(DecodeError::FieldOverrun { field: *ty, len })?;
            body = &rest[len..];
            let ty = *ty;
            if ty == F_CLUSTER {
                if cluster.is_some() {
                    return Err(DecodeError::DuplicateField(ty));
                }
                let name = std::str::from_utf8(value).map_err(|_| DecodeError::BadCluster)?;
                crate::check_label("cluster", name).map_err(|_| DecodeError::BadCluster)?;
                cluster = Some(name.to_owned());
                continue;
            }
            if ty & F_IGNORABLE != 0 {
                continue;
            }
            if ty < 64 {
                let bit = 1u64 << ty;
                if seen & bit != 0 {
                    return Err(DecodeError::DuplicateField(ty));
                }
                seen |= bit;
            }
            let bad_len = || DecodeError::FieldLength { field: ty, len };
            match ty {
                F_TARGET => target = Some(decode_target(value)?),
                F_HOPS => hops = Some(*value.first().filter(|_| len == 1).ok_or_else(bad_len)?),
                F_SOURCE => {
                    if value.is_empty()
                        || value.len() > MAX_SOURCE_LEN
                        || !value.iter().all(|c| c.is_ascii_graphic())
                    {
                        return Err(DecodeError::BadSource);
                    }
                    // Printable ASCII is valid UTF-8.
                    source = Some(String::from_utf8_lossy(value).into_owned());
                }
                F_TRACEPARENT => {
                    let s = std::str::from_utf8(value).map_err(|_| DecodeError::BadTraceparent)?;
                    traceparent = Some(Traceparent::parse(s)?);
                }
                F_DEADLINE => {
                    let b: [u8; 4] = value.try_into().map_err(|_| bad_len())?;
                    deadline = Some(Duration::from_millis(u64::from(u32::from_be_bytes(b))));
                }
                F_CONN_ID => {
                    let b: [u8; 8] = value.try_into().map_err(|_| bad_len())?;
                    connection_id = Some(u64::from_be_bytes(b));
                }
                other => return Err(DecodeError::UnknownField(other)),
            }
        }
        Ok(Header {
            target: target.ok_or(DecodeError::MissingTarget)?,
            hops: hops.ok_or(DecodeError::MissingHops)?,
            source,
            traceparent,
            deadline,
            connection_id,
            cluster,
        })
    }
}

fn field(out: &mut Vec<u8>, ty: u8, value: &[u8]) {
    out.push(ty);
    // Lengths over u16 are caught by the total-size check in `encode`.
    out.extend_from_slice(&(value.len().min(usize::from(u16::MAX)) as u16).to_be_bytes());
    out.extend_from_slice(value);
}

fn decode_target(v: &[u8]) -> Result<Target, DecodeError> {
    let [kind, p0, p1, rest @ ..] = v else {
        return Err(DecodeError::FieldLength {
            field: F_TARGET,
            len: v.len(),
        });
    };
    let port = u16::from_be_bytes([*p0, *p1]);
    if port == 0 {
        return Err(DecodeError::ZeroPort);
    }
    match *kind {
        T_SERVICE => {
            let host = std::str::from_utf8(rest).map_err(|_| DecodeError::TargetUtf8)?;
            let name = ServiceName::parse(host).map_err(DecodeError::TargetName)?;
            Ok(Target::Service { name, port })
        }
        T_ENDPOINT => {
            let ip = match rest.len() {
                4 => {
                    let b: [u8; 4] = rest
                        .try_into()
                        .map_err(|_| DecodeError::TargetKind(*kind))?;
                    IpAddr::V4(Ipv4Addr::from(b))
                }
                16 => {
                    let b: [u8; 16] = rest
                        .try_into()
                        .map_err(|_| DecodeError::TargetKind(*kind))?;
                    IpAddr::V6(Ipv6Addr::from(b))
                }
                n => {
                    return Err(DecodeError::FieldLength {
                        field: F_TARGET,
                        len: n + 3,
                    })
                }
            };
            Ok(Target::Endpoint(SocketAddr::new(ip, port)))
        }
        k => Err(DecodeError::TargetKind(k)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn sample() -> Header {
        Header {
            target: Target::Service {
                name: ServiceName::new("echo", "demo").unwrap(),
                port: 8080,
            },
            source: Some("spiffe://east.demo/ns/demo/sa/client".into()),
            traceparent: Some(
                Traceparent::parse("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01")
                    .unwrap(),
            ),
            deadline: Some(Duration::from_millis(1500)),
            hops: 2,
            connection_id: Some(42),
            cluster: Some("west".into()),
        }
    }

    #[test]
    fn round_trip_and_payload_untouched() {
        let l = Limits::default();
        let h = sample();
        let mut buf = h.to_bytes(&l).unwrap();
        let n = buf.len();
        buf.extend_from_slice(b"payload");
        let (got, used) = Header::decode(&buf, &l).unwrap();
        assert_eq!(got, h);
        assert_eq!(used, n);
        assert_eq!(&buf[used..], b"payload");

        let ep = Header::new(Target::Endpoint("[::1]:9".parse().unwrap()));
        let b = ep.to_bytes(&l).unwrap();
        assert_eq!(Header::decode(&b, &l).unwrap().0, ep);
    }

    #[test]
    fn each_error_has_a_case() {
        let l = Limits::default();
        let good = sample().to_bytes(&l).unwrap();
        let dec = |b: &[u8]| Header::decode(b, &l).unwrap_err();

        assert_eq!(dec(&good[..3]), DecodeError::Incomplete { needed: 5 });
        assert!(matches!(
            dec(&good[..good.len() - 1]),
            DecodeError::Incomplete { needed: 1 }
        ));
        assert!(matches!(
            dec(b"GET / HTTP/1.1\r\n"),
            DecodeError::BadMagic(_)
        ));
        let mut v = good.clone();
        v[4] = 9;
        assert_eq!(dec(&v), DecodeError::UnsupportedVersion(9));
        let mut v = good.clone();
        v[5] = 1;
        assert_eq!(dec(&v), DecodeError::ReservedFlags(1));
        let mut v = good.clone();
        v[6..8].copy_from_slice(&u16::MAX.to_be_bytes());
        assert!(matches!(dec(&v), DecodeError::TooLarge { .. }));

        let with_body = |body: &[u8]| {
            let mut v = HEADER_MAGIC.to_vec();
            v.extend_from_slice(&[VERSION, 0]);
            v.extend_from_slice(&(body.len() as u16).to_be_bytes());
            v.extend_from_slice(body);
            v
        };
        let target = [F_TARGET, 0, 12, T_ENDPOINT, 0, 80, 127, 0, 0, 1];
        let target = &target[..]; // length byte fixed below
        let mut t = target.to_vec();
        t[2] = 7;
        let hops = [F_HOPS, 0, 1, 0];
        let cat = |parts: &[&[u8]]| parts.concat();

        assert_eq!(dec(&with_body(&hops)), DecodeError::MissingTarget);
        assert_eq!(dec(&with_body(&t)), DecodeError::MissingHops);
        assert!(Header::decode(&with_body(&cat(&[&t, &hops])), &l).is_ok());
        let hint = |v: &[u8]| [&[F_CLUSTER, 0, v.len() as u8][..], v].concat();
        assert_eq!(
            dec(&with_body(&cat(&[&t, &hops, &hint(b"West")]))),
            DecodeError::BadCluster
        );
        assert_eq!(
            dec(&with_body(&cat(&[&t, &hops, &hint(b"a"), &hint(b"b")]))),
            DecodeError::DuplicateField(F_CLUSTER)
        );
        // Other extensions are skipped, whatever they hold.
        let ext = [0x9f, 0, 2, 0xff, 0x00];
        assert!(Header::decode(&with_body(&cat(&[&t, &hops, &ext])), &l).is_ok());
        assert_eq!(
            dec(&with_body(&cat(&[&t, &hops, &hops]))),
            DecodeError::DuplicateField(F_HOPS)
        );
        assert_eq!(
            dec(&with_body(&cat(&[&t, &hops, &[0x33, 0, 0]]))),
            DecodeError::UnknownField(0x33)
        );
        // Ignorable unknown fields are skipped.
        assert!(Header::decode(&with_body(&cat(&[&t, &hops, &[0xb3, 0, 1, 9]])), &l).is_ok());
        assert!(matches!(
            dec(&with_body(&cat(&[&t, &hops, &[F_SOURCE, 0, 9, b'x']]))),
            DecodeError::FieldOverrun { .. }
        ));
        assert!(matches!(
            dec(&with_body(&cat(&[&t, &hops, &[F_SOURCE]]))),
            DecodeError::FieldOverrun { .. }
        ));
        assert!(matches!(
            dec(&with_body(&cat(&[&t, &[F_HOPS, 0, 2, 1, 1]]))),
            DecodeError::FieldLength { .. }
        ));
        assert_eq!(
            dec(&with_body(&cat(&[
                &t,
                &hops,
                &[F_SOURCE, 0, 2, b'a', b' ']
            ]))),
            DecodeError::BadSource
        );
        assert_eq!(
            dec(&with_body(&cat(&[&t, &hops, &[F_TRACEPARENT, 0, 1, b'0']]))),
            DecodeError::BadTraceparent
        );
        assert!(matches!(
            dec(&with_body(&cat(&[&t, &hops, &[F_DEADLINE, 0, 1, 0]]))),
            DecodeError::FieldLength { .. }
        ));
        assert!(matches!(
            dec(&with_body(&cat(&[&t, &hops, &[F_CONN_ID, 0, 1, 0]]))),
            DecodeError::FieldLength { .. }
        ));
        assert_eq!(
            dec(&with_body(&cat(&[
                &[F_TARGET, 0, 7, 9, 0, 80, 1, 2, 3, 4],
                &hops
            ]))),
            DecodeError::TargetKind(9)
        );
        assert_eq!(
            dec(&with_body(&cat(&[
                &[F_TARGET, 0, 7, T_ENDPOINT, 0, 0, 1, 2, 3, 4],
                &hops
            ]))),
            DecodeError::ZeroPort
        );
        assert!(matches!(
            dec(&with_body(&cat(&[
                &[F_TARGET, 0, 5, T_ENDPOINT, 0, 1, 1, 2],
                &hops
            ]))),
            DecodeError::FieldLength { .. }
        ));
        assert!(matches!(
            dec(&with_body(&cat(&[&[F_TARGET, 0, 2, T_ENDPOINT, 0], &hops]))),
            DecodeError::FieldLength { .. }
        ));
        assert_eq!(
            dec(&with_body(&cat(&[
                &[F_TARGET, 0, 5, T_SERVICE, 0, 1, 0xff, 0xfe],
                &hops
            ]))),
            DecodeError::TargetUtf8
        );
        assert!(matches!(
            dec(&with_body(&cat(&[
                &[F_TARGET, 0, 7, T_SERVICE, 0, 1, b'a', b'.', b'B', b'c'],
                &hops
            ]))),
            DecodeError::TargetName(_)
        ));
    }

    #[test]
    fn encode_refuses_oversized_header() {
        let mut h = sample();
        h.source = Some("x".repeat(100));
        let small = Limits {
            max_header_bytes: 64,
        };
        let mut out = b"keep".to_vec();
        assert!(matches!(
            h.encode(&mut out, &small),
            Err(DecodeError::TooLarge { .. })
        ));
        assert_eq!(out, b"keep");
    }

    #[test]
    fn traceparent_rules() {
        let ok = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        assert!(Traceparent::parse(ok).is_ok());
        for bad in [
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            "00_4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        ] {
            assert!(Traceparent::parse(bad).is_err(), "{bad}");
        }
    }
}
