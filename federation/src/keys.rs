//! The store keyspace, versioned:
//!
//! - `/fedmesh/v1/clusters/<cluster>/info`
//! - `/fedmesh/v1/clusters/<cluster>/services/<namespace>/<name>`
//! - `/fedmesh/v1/clusters/<cluster>/left`: written without a lease when a
//!   controller shuts down on purpose (so others tell leaving from a
//!   partition); the cluster deletes it when it publishes again.
//!
//! Each cluster writes only under its own `<cluster>/` prefix, under its
//! own lease. ClusterSet IPs live apart, under `/fedmesh/v1/clusterset/ips/`
//! (shared by every cluster, no lease; see `crate::clusterset`). Parsing is strict: anything else under the prefix is
//! reported, never guessed at.

use fedmesh_catalog::ClusterName;
use fedmesh_wire::ServiceName;

pub const ROOT: &str = "/fedmesh/v1/clusters/";

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Key {
    Info(ClusterName),
    Service(ClusterName, ServiceName),
    Left(ClusterName),
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("key {key:?} is not a fedmesh v1 key: {why}")]
pub struct KeyError {
    pub key: String,
    pub why: String,
}

pub fn cluster_prefix(cluster: &ClusterName) -> String {
    format!("{ROOT}{cluster}/")
}

pub fn info_key(cluster: &ClusterName) -> String {
    format!("{ROOT}{cluster}/info")
}

pub fn left_key(cluster: &ClusterName) -> String {
    format!("{ROOT}{cluster}/left")
}

pub fn service_key(cluster: &ClusterName, service: &ServiceName) -> String {
    format!(
        "{ROOT}{cluster}/services/{}/{}",
        service.namespace(),
        service.name()
    )
}

impl Key {
    pub fn cluster(&self) -> &ClusterName {
        match self {
            Key::Info(c) | Key::Service(c, _) | Key::Left(c) => c,
        }
    }

    pub fn parse(key: &str) -> Result<Key, KeyError> {
        let err = |why: &str| KeyError {
            key: key.chars().take(256).collect(),
            why: why.to_owned(),
        };
        let rest = key
            .strip_prefix(ROOT)
            .ok_or_else(|| err("outside /fedmesh/v1/clusters/"))?;
        let parts: Vec<&str> = rest.split('/').collect();
        match parts.as_slice() {
            [cluster, "info"] => Ok(Key::Info(
                ClusterName::new(cluster).map_err(|e| err(&e.to_string()))?,
            )),
            [cluster, "left"] => Ok(Key::Left(
                ClusterName::new(cluster).map_err(|e| err(&e.to_string()))?,
            )),
            [cluster, "services", ns, name] => {
                let c = ClusterName::new(cluster).map_err(|e| err(&e.to_string()))?;
                let s = ServiceName::new(name, ns).map_err(|e| err(&e.to_string()))?;
                Ok(Key::Service(c, s))
            }
            _ => Err(err("unknown key shape")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_strictness() {
        let c = ClusterName::new("west").unwrap();
        let s = ServiceName::new("api", "shop").unwrap();
        assert_eq!(Key::parse(&info_key(&c)).unwrap(), Key::Info(c.clone()));
        assert_eq!(Key::parse(&left_key(&c)).unwrap(), Key::Left(c.clone()));
        assert_eq!(
            service_key(&c, &s),
            "/fedmesh/v1/clusters/west/services/shop/api"
        );
        assert_eq!(
            Key::parse(&service_key(&c, &s)).unwrap(),
            Key::Service(c, s)
        );
        for bad in [
            "/fedmesh/v2/clusters/west/info",
            "/fedmesh/v1/clusters/West/info",
            "/fedmesh/v1/clusters/west/other",
            "/fedmesh/v1/clusters/west/services/shop",
            "/fedmesh/v1/clusters/west/services/shop/api/extra",
            "/fedmesh/v1/clusters/west/services/Shop/api",
            "/fedmesh/v1/clusters//info",
        ] {
            assert!(Key::parse(bad).is_err(), "{bad}");
        }
    }
}
