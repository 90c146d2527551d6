//! The file source: a cluster's services and endpoints from a YAML file,
//! for clusters without Kubernetes and for the demo. Re-read when it
//! changes; an invalid file is reported and the last good content kept.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use fedmesh_catalog::mcs::{HeadlessEndpoint, Port, Protocol, ServiceType};
use fedmesh_catalog::ClusterName;
use fedmesh_trust::{SpiffeId, TrustDomain};
use fedmesh_wire::ServiceName;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use crate::controller::LocalService;

/// Largest services file read.
pub const MAX_FILE_BYTES: u64 = 16 << 20;

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServicesFile {
    #[serde(default)]
    pub services: Vec<FileService>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileService {
    /// `NAME.NAMESPACE`
    pub name: String,
    pub ports: Vec<FilePort>,
    #[serde(default)]
    pub export: bool,
    #[serde(default)]
    pub headless: bool,
    #[serde(default)]
    pub audience: Option<Vec<String>>,
    #[serde(default)]
    pub endpoints: Vec<FileEndpoint>,
    #[serde(default)]
    pub exported_at_ms: Option<u64>,
    /// Addresses apps connect to for this service (a Service's cluster
    /// IPs); sidecars' transparent listeners route them.
    #[serde(default)]
    pub vips: Vec<std::net::IpAddr>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(untagged)]
pub enum FilePort {
    Port(u16),
    Full {
        port: u16,
        #[serde(default = "tcp")]
        protocol: Protocol,
        /// The port's name in the ServiceImport (a DNS label).
        #[serde(default)]
        name: Option<String>,
    },
}

fn tcp() -> Protocol {
    Protocol::Tcp
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileEndpoint {
    pub address: SocketAddr,
    pub identity: String,
    /// The endpoint's hostname (a DNS label): a headless service's
    /// endpoint is then also `<hostname>.<cluster>.<svc>.<ns>.svc.clusterset.local`.
    #[serde(default)]
    pub hostname: Option<String>,
}

/// Parses and validates a services file for a cluster of `trust_domain`;
/// every problem is reported.
pub fn parse(text: &str, trust_domain: &TrustDomain) -> Result<Vec<LocalService>, Vec<String>> {
    let f: ServicesFile = serde_yaml_ng::from_str(text).map_err(|e| vec![e.to_string()])?;
    let mut errs = Vec::new();
    let mut out = Vec::new();
    for (i, s) in f.services.iter().enumerate() {
        let what = format!("services[{i}] ({})", s.name);
        let name = match ServiceName::parse(&s.name) {
            Ok(n) => n,
            Err(e) => {
                errs.push(format!("{what}: {e}"));
                continue;
            }
        };
        let ports: Vec<Port> = s
            .ports
            .iter()
            .map(|p| match p {
                FilePort::Port(p) => Port::new(*p, Protocol::Tcp),
                FilePort::Full {
                    port,
                    protocol,
                    name,
                } => Port::named(name.as_deref().unwrap_or_default(), *port, *protocol),
            })
            .collect();
        if ports.is_empty() || ports.iter().any(|p| p.port == 0) {
            errs.push(format!("{what}: needs one or more non-zero ports"));
        }
        for p in &ports {
            if !Port::valid_name(&p.name) {
                errs.push(format!("{what}: port {}: name is not a DNS label", p.port));
            }
        }
        let mut endpoints = Vec::new();
        let mut hostnames = std::collections::BTreeMap::new();
        for (j, e) in s.endpoints.iter().enumerate() {
            if let Some(h) = &e.hostname {
                if !HeadlessEndpoint::valid_hostname(h) {
                    errs.push(format!(
                        "{what}: endpoints[{j}]: hostname {h:?} is not a DNS label"
                    ));
                } else if let Some(other) = hostnames.insert(e.address.ip(), h.clone()) {
                    if &other != h {
                        errs.push(format!(
                            "{what}: endpoints[{j}]: {} has two hostnames ({other}, {h})",
                            e.address.ip()
                        ));
                    }
                }
            }
            match SpiffeId::new(&e.identity) {
                Ok(id) if id.trust_domain_name() == trust_domain.as_str() => {
                    endpoints.push((e.address, id))
                }
                Ok(id) => errs.push(format!(
                    "{what}: endpoints[{j}]: {id} is not in trust domain {trust_domain}"
                )),
                Err(err) => errs.push(format!("{what}: endpoints[{j}]: {err}")),
            }
        }
        let audience = match &s.audience {
            None => None,
            Some(list) => {
                let mut v = Vec::new();
                for c in list {
                    match ClusterName::new(c) {
                        Ok(c) => v.push(c),
                        Err(e) => errs.push(format!("{what}: audience: {e}")),
                    }
                }
                Some(v)
            }
        };
        if out.iter().any(|o: &LocalService| o.name == name) {
            errs.push(format!("{what}: duplicate service"));
        }
        out.push(LocalService {
            vips: s.vips.clone(),
            hostnames,
            name,
            ports,
            service_type: if s.headless {
                ServiceType::Headless
            } else {
                ServiceType::ClusterSetIP
            },
            meta: Default::default(),
            export: s.export,
            audience,
            endpoints,
            exported_at_ms: s.exported_at_ms,
        });
    }
    if errs.is_empty() {
        Ok(out)
    } else {
        Err(errs)
    }
}

fn read(path: &Path) -> Result<String, String> {
    let meta = std::fs::metadata(path).map_err(|e| format!("{}: {e}", path.display()))?;
    if meta.len() > MAX_FILE_BYTES {
        return Err(format!(
            "{}: {} bytes, more than {MAX_FILE_BYTES}",
            path.display(),
            meta.len()
        ));
    }
    std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))
}

/// Loads `path` once (errors are fatal at start), then polls it every
/// `interval` and publishes each new valid content. Invalid content is
/// logged and ignored: the last good services stay.
/// A followed services file: the latest valid services, and the poller.
pub type FileWatch = (
    watch::Receiver<Vec<LocalService>>,
    tokio::task::JoinHandle<()>,
);

pub fn watch_file(
    path: PathBuf,
    trust_domain: TrustDomain,
    interval: Duration,
) -> Result<FileWatch, Vec<String>> {
    let first_text = read(&path).map_err(|e| vec![e])?;
    let first = parse(&first_text, &trust_domain)?;
    let (tx, rx) = watch::channel(first);
    let task = tokio::spawn(async move {
        let mut last = first_text;
        let mut iv = tokio::time::interval(interval);
        iv.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            iv.tick().await;
            if tx.is_closed() {
                return;
            }
            let text = match read(&path) {
                Ok(t) => t,
                Err(e) => {
                    tracing::warn!(error = %e, "services file unreadable; keeping the last good services");
                    continue;
                }
            };
            if text == last {
                continue;
            }
            match parse(&text, &trust_domain) {
                Ok(services) => {
                    tracing::info!(path = %path.display(), services = services.len(), "services file changed");
                    tx.send_replace(services);
                }
                Err(errs) => {
                    tracing::warn!(path = %path.display(), problems = %errs.join("; "), "services file invalid; keeping the last good services");
                }
            }
            last = text;
        }
    });
    Ok((rx, task))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_reports_every_problem() {
        let td = TrustDomain::new("west.acme").unwrap();
        let ok = r#"
services:
  - name: echo.shop
    ports: [8080, { port: 53, protocol: UDP }]
    export: true
    audience: [east]
    endpoints:
      - { address: "10.0.0.1:15006", identity: "spiffe://west.acme/ns/shop/sa/echo" }
"#;
        let s = parse(ok, &td).unwrap();
        assert_eq!(
            s[0].ports,
            [Port::new(8080, Protocol::Tcp), Port::new(53, Protocol::Udp)]
        );
        assert_eq!(s[0].audience.as_ref().unwrap()[0].as_str(), "east");
        let bad = r#"
services:
  - name: Echo
    ports: [1]
  - name: a.b
    ports: []
    audience: [Mars]
    endpoints:
      - { address: "10.0.0.1:1", identity: "spiffe://east.acme/x" }
"#;
        let errs = parse(bad, &td).unwrap_err();
        assert_eq!(errs.len(), 4, "{errs:?}");
        assert!(parse("services: 3", &td).is_err());
    }

    #[test]
    fn endpoints_may_have_hostnames() {
        let td = TrustDomain::new("west.acme").unwrap();
        let ok = r#"
services:
  - name: db.shop
    ports: [5432]
    export: true
    headless: true
    endpoints:
      - { address: "10.0.0.1:15006", identity: "spiffe://west.acme/ns/shop/sa/db", hostname: db-0 }
      - { address: "10.0.0.2:15006", identity: "spiffe://west.acme/ns/shop/sa/db" }
"#;
        let s = parse(ok, &td).unwrap();
        assert_eq!(s[0].service_type, ServiceType::Headless);
        let ip: std::net::IpAddr = "10.0.0.1".parse().unwrap();
        assert_eq!(s[0].hostnames, [(ip, "db-0".to_owned())].into());
        let bad = r#"
services:
  - name: db.shop
    ports: [5432]
    endpoints:
      - { address: "10.0.0.1:1", identity: "spiffe://west.acme/ns/shop/sa/db", hostname: "DB.0" }
      - { address: "10.0.0.2:1", identity: "spiffe://west.acme/ns/shop/sa/db", hostname: db-0 }
      - { address: "10.0.0.2:2", identity: "spiffe://west.acme/ns/shop/sa/db", hostname: db-1 }
"#;
        let errs = parse(bad, &td).unwrap_err();
        assert_eq!(errs.len(), 2, "{errs:?}");
        assert!(errs[0].contains("not a DNS label"), "{errs:?}");
        assert!(errs[1].contains("two hostnames"), "{errs:?}");
    }
}
