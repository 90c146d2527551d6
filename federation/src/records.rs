//! The values stored under each key (JSON), with strict decoding: a value
//! that does not decode, is too large, or disagrees with its key is
//! rejected with a typed error and never reaches a catalog.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;

use fedmesh_catalog::mcs::{
    Export, ExportedMeta, HeadlessEndpoint, Port, Protocol, ServiceType, SessionAffinity,
};
use fedmesh_catalog::ClusterName;
use fedmesh_trust::{TrustBundle, TrustDomain};
use fedmesh_wire::ServiceName;
use serde::{Deserialize, Serialize};

use crate::keys::Key;

/// Largest record accepted from the store.
pub const MAX_RECORD_BYTES: usize = 256 * 1024;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct Locality {
    #[serde(default)]
    pub region: String,
    #[serde(default)]
    pub zone: String,
}

/// `/fedmesh/v1/clusters/<cluster>/info`
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterInfo {
    pub cluster: String,
    pub trust_domain: String,
    /// QUIC addresses of the cluster's east-west gateways.
    pub gateways: Vec<SocketAddr>,
    /// TLS/TCP fallback addresses of the same gateways (HTTP/2 CONNECT),
    /// for peers whose path drops UDP; empty when they offer none.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub gateways_tcp: Vec<SocketAddr>,
    #[serde(default)]
    pub locality: Locality,
    /// PEM roots of the cluster's trust domain.
    pub bundle_pem: String,
    /// Signatures over the bundle by roots of the previous bundle, so
    /// others can accept a rotation without an operator.
    #[serde(default)]
    pub bundle_endorsements: Vec<fedmesh_trust::rotation::Endorsement>,
    pub published_at_ms: u64,
    /// The clusters whose bundles this cluster trusts, so its gateways
    /// accept their gateways' certificates. Peers route here only once
    /// they are in it (a dial before that would fail its handshake).
    /// Absent in records of controllers that predate it: then assumed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trusts: Option<Vec<String>>,
}

/// Most clusters a record may say it trusts.
pub const MAX_TRUSTS: usize = 1024;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PortRecord {
    pub port: u16,
    #[serde(default = "tcp")]
    pub protocol: Protocol,
    /// The Service port's name (empty: unnamed).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub app_protocol: Option<String>,
}

/// Longest `appProtocol`, label or annotation key
/// (253-byte prefix, `/`, 63-byte name), and label value accepted.
const MAX_APP_PROTOCOL: usize = 253;
const MAX_META_KEY: usize = 317;
const MAX_LABEL_VALUE: usize = 63;
/// Most exported labels, and annotations, one record may carry.
pub const MAX_EXPORTED_META: usize = 64;
/// Longest session affinity timeout Kubernetes allows (one day).
const MAX_AFFINITY_TIMEOUT: u32 = 86_400;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
pub enum AffinityRecord {
    #[default]
    None,
    #[serde(rename = "ClientIP")]
    ClientIp,
}

fn is_default<T: Default + PartialEq>(t: &T) -> bool {
    *t == T::default()
}

fn tcp() -> Protocol {
    Protocol::Tcp
}

fn weight() -> u32 {
    100
}

/// Most endpoint addresses a headless export's record carries (a
/// controller publishes the first this many, by address, and says so).
pub const MAX_HEADLESS_ENDPOINTS: usize = 1000;

/// One ready address of a headless export.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EndpointRecord {
    pub ip: std::net::IpAddr,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hostname: Option<String>,
}

/// `/fedmesh/v1/clusters/<cluster>/services/<ns>/<name>`: one export.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServiceRecord {
    pub name: String,
    pub namespace: String,
    pub ports: Vec<PortRecord>,
    #[serde(default)]
    pub service_type: ServiceType,
    pub exported_at_ms: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub audience: Option<Vec<String>>,
    pub ready_endpoints: u32,
    #[serde(default = "weight")]
    pub weight: u32,
    /// The Service's `sessionAffinity` (absent: `None`).
    #[serde(default, skip_serializing_if = "is_default")]
    pub session_affinity: AffinityRecord,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub session_affinity_timeout_seconds: Option<u32>,
    /// The ServiceExport's `spec.exportedLabels` / `exportedAnnotations`.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
    /// A headless export's ready addresses (absent for ClusterSetIP ones:
    /// their endpoints stay private to the cluster).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub endpoints: Vec<EndpointRecord>,
}

impl ServiceRecord {
    /// The record of one export (what [`ServiceRecord::decode`] reads back);
    /// `endpoints` are published for a headless export only, at most
    /// [`MAX_HEADLESS_ENDPOINTS`].
    #[allow(clippy::too_many_arguments)]
    pub fn of(
        service: &ServiceName,
        ports: &[Port],
        service_type: ServiceType,
        meta: &ExportedMeta,
        exported_at_ms: u64,
        audience: Option<Vec<String>>,
        ready_endpoints: u32,
        endpoints: &[HeadlessEndpoint],
    ) -> Self {
        let (session_affinity, timeout) = match meta.session_affinity {
            SessionAffinity::None => (AffinityRecord::None, None),
            SessionAffinity::ClientIp { timeout_seconds } => {
                (AffinityRecord::ClientIp, timeout_seconds)
            }
        };
        ServiceRecord {
            name: service.name().to_owned(),
            namespace: service.namespace().to_owned(),
            ports: ports
                .iter()
                .map(|p| PortRecord {
                    port: p.port,
                    protocol: p.protocol,
                    name: p.name.clone(),
                    app_protocol: p.app_protocol.clone(),
                })
                .collect(),
            service_type,
            exported_at_ms,
            audience,
            ready_endpoints,
            weight: 100,
            session_affinity,
            session_affinity_timeout_seconds: timeout,
            labels: meta.labels.clone(),
            annotations: meta.annotations.clone(),
            endpoints: match service_type {
                ServiceType::Headless => endpoints
                    .iter()
                    .take(MAX_HEADLESS_ENDPOINTS)
                    .map(|e| EndpointRecord {
                        ip: e.ip,
                        hostname: e.hostname.clone(),
                    })
                    .collect(),
                ServiceType::ClusterSetIP => Vec::new(),
            },
        }
    }
}

fn invalid(field: &'static str, why: impl Into<String>) -> RecordError {
    RecordError::Invalid {
        field,
        why: why.into(),
    }
}

/// Most bytes of exported annotations one record may carry.
pub const MAX_EXPORTED_ANNOTATION_BYTES: usize = 64 * 1024;

/// Whether exported labels and annotations are within what a record
/// carries: at most [`MAX_EXPORTED_META`] of each, keys of 1 to 317 bytes,
/// label values of at most 63, annotations of at most
/// [`MAX_EXPORTED_ANNOTATION_BYTES`] together.
pub fn check_exported_meta(meta: &ExportedMeta) -> Result<(), RecordError> {
    for (field, m, max_value) in [
        ("labels", &meta.labels, MAX_LABEL_VALUE),
        (
            "annotations",
            &meta.annotations,
            MAX_EXPORTED_ANNOTATION_BYTES,
        ),
    ] {
        if m.len() > MAX_EXPORTED_META {
            return Err(invalid(
                field,
                format!("{} entries; at most {MAX_EXPORTED_META}", m.len()),
            ));
        }
        let mut total = 0;
        for (k, v) in m {
            total += k.len() + v.len();
            if k.is_empty() || k.len() > MAX_META_KEY || v.len() > max_value {
                return Err(invalid(
                    field,
                    format!(
                        "a key of {} bytes with a value of {} bytes; keys of 1 to {MAX_META_KEY}, values of at most {max_value}",
                        k.len(),
                        v.len()
                    ),
                ));
            }
        }
        if field == "annotations" && total > MAX_EXPORTED_ANNOTATION_BYTES {
            return Err(invalid(
                field,
                format!("{total} bytes; at most {MAX_EXPORTED_ANNOTATION_BYTES}"),
            ));
        }
    }
    Ok(())
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum RecordError {
    #[error("record of {0} bytes exceeds the limit of {MAX_RECORD_BYTES}")]
    TooLarge(usize),
    #[error("record does not decode: {0}")]
    Decode(String),
    #[error("record says {field} {got:?}, but its key says {want:?}")]
    KeyMismatch {
        field: &'static str,
        got: String,
        want: String,
    },
    #[error("record field {field}: {why}")]
    Invalid { field: &'static str, why: String },
}

fn decode<T: for<'de> Deserialize<'de>>(bytes: &[u8]) -> Result<T, RecordError> {
    if bytes.len() > MAX_RECORD_BYTES {
        return Err(RecordError::TooLarge(bytes.len()));
    }
    // serde's messages quote what they met (an unknown field's name, a
    // string of the wrong kind): a store writer chose those.
    serde_json::from_slice(bytes)
        .map_err(|e| RecordError::Decode(fedmesh_wire::bounded(&e.to_string())))
}

/// A cluster info that decoded and validated.
#[derive(Debug, Clone)]
pub struct ValidInfo {
    pub cluster: ClusterName,
    pub trust_domain: TrustDomain,
    pub gateways: Vec<SocketAddr>,
    pub gateways_tcp: Vec<SocketAddr>,
    pub locality: Locality,
    pub bundle: TrustBundle,
    pub endorsements: Vec<fedmesh_trust::rotation::Endorsement>,
    pub published_at_ms: u64,
    /// `None`: the record does not say (an older controller).
    pub trusts: Option<BTreeSet<ClusterName>>,
}

impl ValidInfo {
    /// Whether this cluster's gateways accept `cluster`'s gateways.
    pub fn trusts(&self, cluster: &ClusterName) -> bool {
        self.trusts.as_ref().is_none_or(|t| t.contains(cluster))
    }
}

impl ClusterInfo {
    pub fn decode(key: &Key, bytes: &[u8]) -> Result<ValidInfo, RecordError> {
        let r: ClusterInfo = decode(bytes)?;
        let want = key.cluster();
        if r.cluster != want.as_str() {
            return Err(RecordError::KeyMismatch {
                field: "cluster",
                got: fedmesh_wire::bounded(&r.cluster),
                want: want.to_string(),
            });
        }
        let td = TrustDomain::new(&r.trust_domain).map_err(|e| RecordError::Invalid {
            field: "trust_domain",
            why: e.to_string(),
        })?;
        if r.gateways.is_empty() || r.gateways.len() > 16 {
            return Err(RecordError::Invalid {
                field: "gateways",
                why: format!("{} addresses; 1 to 16 expected", r.gateways.len()),
            });
        }
        if r.gateways_tcp.len() > 16 {
            return Err(RecordError::Invalid {
                field: "gateways_tcp",
                why: format!("{} addresses; at most 16 expected", r.gateways_tcp.len()),
            });
        }
        let trusts = match r.trusts {
            None => None,
            Some(t) if t.len() > MAX_TRUSTS => {
                return Err(RecordError::Invalid {
                    field: "trusts",
                    why: format!("{} clusters; at most {MAX_TRUSTS} expected", t.len()),
                })
            }
            Some(t) => Some(
                t.iter()
                    .map(|c| ClusterName::new(c))
                    .collect::<Result<BTreeSet<_>, _>>()
                    .map_err(|e| RecordError::Invalid {
                        field: "trusts",
                        why: e.to_string(),
                    })?,
            ),
        };
        let bundle =
            TrustBundle::from_pem(td.clone(), &r.bundle_pem).map_err(|e| RecordError::Invalid {
                field: "bundle_pem",
                why: e.to_string(),
            })?;
        Ok(ValidInfo {
            cluster: want.clone(),
            trust_domain: td,
            gateways: r.gateways,
            gateways_tcp: r.gateways_tcp,
            locality: r.locality,
            bundle,
            endorsements: r.bundle_endorsements,
            published_at_ms: r.published_at_ms,
            trusts,
        })
    }
}

impl ServiceRecord {
    pub fn decode(key: &Key, bytes: &[u8]) -> Result<Export, RecordError> {
        let Key::Service(cluster, service) = key else {
            return Err(RecordError::Invalid {
                field: "key",
                why: "not a service key".into(),
            });
        };
        let r: ServiceRecord = decode(bytes)?;
        let got = ServiceName::new(&r.name, &r.namespace).map_err(|e| RecordError::Invalid {
            field: "name",
            why: e.to_string(),
        })?;
        if &got != service {
            return Err(RecordError::KeyMismatch {
                field: "name",
                got: got.to_string(),
                want: service.to_string(),
            });
        }
        if r.ports.is_empty() || r.ports.len() > 100 || r.ports.iter().any(|p| p.port == 0) {
            return Err(RecordError::Invalid {
                field: "ports",
                why: "1 to 100 non-zero ports expected".into(),
            });
        }
        for p in &r.ports {
            if !Port::valid_name(&p.name) {
                return Err(invalid(
                    "ports",
                    format!(
                        "port {}: the name is not a DNS label of at most 63 bytes",
                        p.port
                    ),
                ));
            }
            if p.app_protocol
                .as_ref()
                .is_some_and(|a| a.is_empty() || a.len() > MAX_APP_PROTOCOL)
            {
                return Err(invalid(
                    "ports",
                    format!(
                        "port {}: appProtocol of 1 to {MAX_APP_PROTOCOL} bytes expected",
                        p.port
                    ),
                ));
            }
        }
        let session_affinity = match (r.session_affinity, r.session_affinity_timeout_seconds) {
            (AffinityRecord::None, None) => SessionAffinity::None,
            (AffinityRecord::None, Some(_)) => {
                return Err(invalid(
                    "session_affinity_timeout_seconds",
                    "set without ClientIP session affinity",
                ))
            }
            (AffinityRecord::ClientIp, Some(t)) if t == 0 || t > MAX_AFFINITY_TIMEOUT => {
                return Err(invalid(
                    "session_affinity_timeout_seconds",
                    format!("{t}; 1 to {MAX_AFFINITY_TIMEOUT} expected"),
                ))
            }
            (AffinityRecord::ClientIp, timeout_seconds) => {
                SessionAffinity::ClientIp { timeout_seconds }
            }
        };
        let meta = ExportedMeta {
            session_affinity,
            labels: r.labels,
            annotations: r.annotations,
        };
        check_exported_meta(&meta)?;
        let audience = match r.audience {
            None => None,
            Some(list) => {
                let mut set = BTreeSet::new();
                for c in list {
                    set.insert(ClusterName::new(&c).map_err(|e| RecordError::Invalid {
                        field: "audience",
                        why: e.to_string(),
                    })?);
                }
                Some(set)
            }
        };
        if !r.endpoints.is_empty() && r.service_type != ServiceType::Headless {
            return Err(invalid("endpoints", "published for headless services only"));
        }
        if r.endpoints.len() > MAX_HEADLESS_ENDPOINTS {
            return Err(invalid(
                "endpoints",
                format!(
                    "{} addresses; at most {MAX_HEADLESS_ENDPOINTS}",
                    r.endpoints.len()
                ),
            ));
        }
        let mut endpoints = Vec::with_capacity(r.endpoints.len());
        for e in r.endpoints {
            // A hostname becomes a DNS label in every importing cluster.
            if let Some(h) = &e.hostname {
                if !HeadlessEndpoint::valid_hostname(h) {
                    return Err(invalid(
                        "endpoints",
                        format!("hostname {:?} is not a DNS label", fedmesh_wire::bounded(h)),
                    ));
                }
            }
            endpoints.push(HeadlessEndpoint {
                ip: e.ip,
                hostname: e.hostname,
            });
        }
        endpoints.sort();
        endpoints.dedup();
        Ok(Export {
            cluster: cluster.clone(),
            service: got,
            ports: r
                .ports
                .into_iter()
                .map(|p| Port {
                    name: p.name,
                    port: p.port,
                    protocol: p.protocol,
                    app_protocol: p.app_protocol,
                })
                .collect(),
            service_type: r.service_type,
            meta,
            exported_at: r.exported_at_ms,
            audience,
            ready_endpoints: r.ready_endpoints,
            weight: r.weight,
            endpoints,
        })
    }
}

/// `<cluster>/left`: the cluster left the federation on purpose.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LeftRecord {
    pub left_at_ms: u64,
}

impl LeftRecord {
    pub fn decode(bytes: &[u8]) -> Result<LeftRecord, RecordError> {
        decode(bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key() -> Key {
        Key::Service(
            ClusterName::new("west").unwrap(),
            ServiceName::new("api", "shop").unwrap(),
        )
    }

    fn full() -> (Vec<Port>, ExportedMeta) {
        let mut h2 = Port::named("grpc", 9090, Protocol::Tcp);
        h2.app_protocol = Some("kubernetes.io/h2c".into());
        let meta = ExportedMeta {
            session_affinity: SessionAffinity::ClientIp {
                timeout_seconds: Some(300),
            },
            labels: [("tier".to_owned(), "web".to_owned())].into(),
            annotations: [("example.com/owner".to_owned(), "a".to_owned())].into(),
        };
        (vec![Port::named("http", 80, Protocol::Tcp), h2], meta)
    }

    fn record(ports: &[Port], meta: &ExportedMeta) -> serde_json::Value {
        let r = ServiceRecord::of(
            &ServiceName::new("api", "shop").unwrap(),
            ports,
            ServiceType::ClusterSetIP,
            meta,
            7,
            None,
            2,
            &[],
        );
        serde_json::to_value(r).unwrap()
    }

    fn decode(v: &serde_json::Value) -> Result<Export, RecordError> {
        ServiceRecord::decode(&key(), v.to_string().as_bytes())
    }

    #[test]
    fn an_export_round_trips_with_port_names_affinity_labels_and_annotations() {
        let (ports, meta) = full();
        let e = decode(&record(&ports, &meta)).unwrap();
        assert_eq!(e.ports, ports);
        assert_eq!(e.meta, meta);
        // A record of an export with none of them has none of the fields,
        // so controllers that predate them still read it.
        let plain = record(&[Port::new(80, Protocol::Tcp)], &ExportedMeta::default());
        assert_eq!(
            plain["ports"][0],
            serde_json::json!({ "port": 80, "protocol": "TCP" })
        );
        for field in [
            "session_affinity",
            "session_affinity_timeout_seconds",
            "labels",
            "annotations",
        ] {
            assert!(plain.get(field).is_none(), "{field} in {plain}");
        }
        assert_eq!(decode(&plain).unwrap().meta, ExportedMeta::default());
    }

    #[test]
    fn a_store_writer_cannot_slip_in_bad_mcs_fields() {
        let (ports, meta) = full();
        let good = record(&ports, &meta);
        let bad = |f: &dyn Fn(&mut serde_json::Value)| {
            let mut v = good.clone();
            f(&mut v);
            decode(&v).unwrap_err().to_string()
        };
        assert!(bad(&|v| v["ports"][0]["name"] = "Not A Label".into()).contains("DNS label"));
        assert!(bad(&|v| v["ports"][0]["name"] = "x".repeat(64).into()).contains("DNS label"));
        assert!(bad(&|v| v["ports"][0]["app_protocol"] = "".into()).contains("appProtocol"));
        assert!(bad(&|v| v["session_affinity_timeout_seconds"] = 0.into()).contains("1 to 86400"));
        assert!(bad(&|v| {
            v["session_affinity"] = "None".into();
        })
        .contains("without ClientIP"));
        assert!(bad(&|v| v["session_affinity"] = "Sticky".into()).contains("decode"));
        assert!(bad(&|v| v["labels"]["k"] = "v".repeat(64).into()).contains("labels"));
        assert!(bad(&|v| v["labels"][""] = "v".into()).contains("labels"));
        assert!(bad(&|v| {
            for i in 0..=MAX_EXPORTED_META {
                v["annotations"][format!("k{i}")] = "v".into();
            }
        })
        .contains("entries"));
        assert!(bad(&|v| {
            v["annotations"]["big"] = "x".repeat(MAX_EXPORTED_ANNOTATION_BYTES).into();
        })
        .contains("annotations"));
        assert!(bad(&|v| v["labels"]["n"] = 1.into()).contains("decode"));
    }

    #[test]
    fn a_headless_export_publishes_its_endpoints_and_nothing_else_does() {
        let (ports, meta) = full();
        let eps = [
            HeadlessEndpoint {
                ip: "10.0.0.2".parse().unwrap(),
                hostname: Some("web-0".into()),
            },
            HeadlessEndpoint {
                ip: "fd00::2".parse().unwrap(),
                hostname: None,
            },
        ];
        let name = ServiceName::new("api", "shop").unwrap();
        let of = |t| {
            serde_json::to_value(ServiceRecord::of(&name, &ports, t, &meta, 7, None, 2, &eps))
                .unwrap()
        };
        let headless = of(ServiceType::Headless);
        assert_eq!(decode(&headless).unwrap().endpoints, eps);
        assert_eq!(
            headless["endpoints"],
            serde_json::json!([{ "ip": "10.0.0.2", "hostname": "web-0" }, { "ip": "fd00::2" }])
        );
        let vip = of(ServiceType::ClusterSetIP);
        assert!(vip.get("endpoints").is_none(), "{vip}");
        // Too many are cut when published.
        let many: Vec<HeadlessEndpoint> = (0..MAX_HEADLESS_ENDPOINTS as u32 + 5)
            .map(|i| HeadlessEndpoint {
                ip: std::net::Ipv4Addr::from(0x0a00_0000 + i).into(),
                hostname: None,
            })
            .collect();
        let r = ServiceRecord::of(
            &name,
            &ports,
            ServiceType::Headless,
            &meta,
            7,
            None,
            2,
            &many,
        );
        assert_eq!(r.endpoints.len(), MAX_HEADLESS_ENDPOINTS);

        let bad = |f: &dyn Fn(&mut serde_json::Value)| {
            let mut v = headless.clone();
            f(&mut v);
            decode(&v).unwrap_err().to_string()
        };
        for host in ["", "Web-0", "-web", "web.0", &"x".repeat(64)] {
            let e = bad(&|v| v["endpoints"][0]["hostname"] = host.into());
            assert!(e.contains("not a DNS label"), "{host}: {e}");
        }
        assert!(bad(&|v| v["endpoints"][0]["ip"] = "web-0".into()).contains("decode"));
        assert!(bad(&|v| v["endpoints"][0]["port"] = 1.into()).contains("decode"));
        assert!(
            bad(&|v| v["service_type"] = "ClusterSetIP".into()).contains("headless services only")
        );
        assert!(bad(&|v| {
            v["endpoints"] = (0..=MAX_HEADLESS_ENDPOINTS)
                .map(|i| serde_json::json!({ "ip": format!("10.0.{}.{}", i / 256, i % 256) }))
                .collect();
        })
        .contains("at most"));
    }
}
