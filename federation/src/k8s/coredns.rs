//! Keeps the cluster's CoreDNS forwarding `clusterset.local` to this
//! controller's DNS server: a server block of its own in the Corefile,
//! between marker comments, put back when edited away and moved when the
//! DNS Service's cluster IP changes. What the block says is a pure
//! function of the Corefile and the addresses ([`with_forward`]); the task
//! only reads and writes the ConfigMap (optimistic concurrency: a write
//! against a newer version is refused by the API server and retried).

use std::net::SocketAddr;
use std::time::Duration;

use k8s_openapi::api::core::v1::{ConfigMap, Service};
use kube::api::{Api, PostParams};
use kube::Client;
use tokio::task::JoinHandle;

use super::KubeMetrics;
use crate::app::AbortOnDrop;
use fedmesh_wire::bounded;

/// First and last line of the block fedmesh keeps.
pub const BEGIN: &str =
    "# BEGIN fedmesh clusterset.local (kept by the fedmesh controller; edits are put back)";
pub const END: &str = "# END fedmesh clusterset.local";

/// Largest Corefile handled (a ConfigMap holds at most 1 MiB).
pub const MAX_COREFILE: usize = 1024 * 1024;

/// Most addresses forwarded to (one per IP family of the Service, with
/// room for a few ports).
const MAX_TARGETS: usize = 8;

/// Why the Corefile is left as it is.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum CorefileError {
    #[error("the Corefile already has a clusterset.local server block fedmesh does not keep (line {0}); it is left alone")]
    Foreign(usize),
    #[error("the Corefile has a `{BEGIN}` line without its end marker")]
    Unterminated,
    #[error("the Corefile is {0} bytes; at most {MAX_COREFILE} are handled")]
    TooLarge(usize),
    #[error("no address to forward to")]
    NoTarget,
}

/// The block forwarding `clusterset.local` to `to`.
pub fn block(to: &[SocketAddr]) -> String {
    let to: Vec<String> = to.iter().map(ToString::to_string).collect();
    format!(
        "{BEGIN}\nclusterset.local:53 {{\n    errors\n    cache 30\n    forward . {}\n}}\n{END}\n",
        to.join(" ")
    )
}

/// Whether `line` opens a server block for `clusterset.local` (with or
/// without a port, possibly among other zones).
fn opens_clusterset_block(line: &str) -> bool {
    let l = line.trim();
    l.ends_with('{')
        && l.trim_end_matches('{').split_whitespace().any(|z| {
            let z = z.trim_start_matches("dns://").trim_end_matches(':');
            let zone = z.split(':').next().unwrap_or_default();
            zone.trim_end_matches('.') == "clusterset.local"
        })
}

/// `corefile` with fedmesh's block forwarding to `to`: `Ok(None)` when it
/// already says exactly that. A block someone else wrote for the zone is
/// never overwritten.
pub fn with_forward(corefile: &str, to: &[SocketAddr]) -> Result<Option<String>, CorefileError> {
    if corefile.len() > MAX_COREFILE {
        return Err(CorefileError::TooLarge(corefile.len()));
    }
    if to.is_empty() {
        return Err(CorefileError::NoTarget);
    }
    let want = block(&to[..to.len().min(MAX_TARGETS)]);
    let mut kept = String::with_capacity(corefile.len() + want.len());
    let mut lines = corefile.split_inclusive('\n').enumerate();
    while let Some((i, line)) = lines.next() {
        if line.trim_end() == BEGIN {
            // Ours, whatever it says now: written anew below (a second
            // copy is dropped).
            loop {
                let Some((_, l)) = lines.next() else {
                    return Err(CorefileError::Unterminated);
                };
                if l.trim_end() == END {
                    break;
                }
            }
            continue;
        }
        if opens_clusterset_block(line) && !line.trim_start().starts_with('#') {
            return Err(CorefileError::Foreign(i + 1));
        }
        kept.push_str(line);
    }
    if !kept.is_empty() && !kept.ends_with('\n') {
        kept.push('\n');
    }
    kept.push_str(&want);
    Ok((kept != corefile).then_some(kept))
}

/// Where CoreDNS reaches the DNS Service `svc`: each cluster IP with the
/// Service's DNS port (named `dns` or `dns-udp`, else its first UDP port).
pub fn targets(svc: &Service) -> Vec<SocketAddr> {
    let Some(spec) = &svc.spec else {
        return Vec::new();
    };
    let ports = spec.ports.as_deref().unwrap_or_default();
    let port = ports
        .iter()
        .find(|p| matches!(p.name.as_deref(), Some("dns" | "dns-udp")))
        .or_else(|| ports.iter().find(|p| p.protocol.as_deref() == Some("UDP")))
        .and_then(|p| u16::try_from(p.port).ok());
    let Some(port) = port else {
        return Vec::new();
    };
    spec.cluster_ips
        .clone()
        .or_else(|| spec.cluster_ip.clone().map(|ip| vec![ip]))
        .unwrap_or_default()
        .iter()
        .filter_map(|ip| ip.parse().ok())
        .map(|ip| SocketAddr::new(ip, port))
        .take(MAX_TARGETS)
        .collect()
}

/// `NAMESPACE/NAME` pairs, as the config gives them.
#[derive(Debug, Clone)]
pub struct CorednsSettings {
    pub configmap: (String, String),
    pub dns_service: (String, String),
    /// How often the Corefile is checked even without a change of the
    /// Service (an edit of the ConfigMap is put back within this).
    pub resync: Duration,
}

/// Follows the DNS Service and keeps the Corefile's block. Runs until
/// aborted; every failure is logged, counted and retried at `resync`.
pub fn keep_forward(client: Client, s: CorednsSettings, metrics: KubeMetrics) -> JoinHandle<()> {
    let (svc_ns, svc_name) = &s.dns_service;
    let (mut rx, follow) = super::follow_service(client.clone(), svc_ns, svc_name, targets);
    tokio::spawn(async move {
        let _follow = AbortOnDrop(follow);
        let (ns, name) = s.configmap.clone();
        let maps: Api<ConfigMap> = Api::namespaced(client, &ns);
        let what = format!("{ns}/{name}");
        let mut last_problem = String::new();
        loop {
            let to = rx.borrow_and_update().clone();
            if !to.is_empty() {
                let result = sync(&maps, &name, &to).await;
                // 1 while the Corefile cannot be kept as it should be.
                metrics
                    .skipped
                    .get_or_create(&super::Labels {
                        kind: "configmap",
                        what: "coredns",
                    })
                    .set(i64::from(result.is_err()));
                match result {
                    Ok(true) => {
                        KubeMetrics::inc(&metrics.writes, "configmap", "coredns");
                        tracing::info!(configmap = %what, to = ?to, "CoreDNS forwards clusterset.local to this controller");
                        last_problem.clear();
                    }
                    Ok(false) => last_problem.clear(),
                    Err(e) => {
                        // Logged once per distinct problem.
                        if e != last_problem {
                            tracing::warn!(configmap = %what, error = %bounded(&e), "CoreDNS not configured for clusterset.local");
                            last_problem = e;
                        }
                    }
                }
            }
            let _ = tokio::time::timeout(s.resync, rx.changed()).await;
        }
    })
}

/// One read-modify-write of the Corefile: `Ok(true)` when written.
async fn sync(maps: &Api<ConfigMap>, name: &str, to: &[SocketAddr]) -> Result<bool, String> {
    let mut cm = maps.get(name).await.map_err(|e| e.to_string())?;
    let corefile = cm
        .data
        .as_ref()
        .and_then(|d| d.get("Corefile"))
        .cloned()
        .ok_or_else(|| "no `Corefile` key".to_owned())?;
    let Some(new) = with_forward(&corefile, to).map_err(|e| e.to_string())? else {
        return Ok(false);
    };
    cm.data
        .get_or_insert_with(Default::default)
        .insert("Corefile".into(), new);
    // A replace carries the resourceVersion read: a concurrent edit makes
    // it fail with a conflict instead of being lost.
    maps.replace(name, &PostParams::default(), &cm)
        .await
        .map_err(|e| e.to_string())?;
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// kind's (kubeadm's) default Corefile.
    const KIND: &str = ".:53 {
    errors
    health {
       lameduck 5s
    }
    ready
    kubernetes cluster.local in-addr.arpa ip6.arpa {
       pods insecure
       fallthrough in-addr.arpa ip6.arpa
       ttl 30
    }
    prometheus :9153
    forward . /etc/resolv.conf {
       max_concurrent 1000
    }
    cache 30
    loop
    reload
    loadbalance
}
";

    fn to(s: &[&str]) -> Vec<SocketAddr> {
        s.iter().map(|a| a.parse().unwrap()).collect()
    }

    #[test]
    fn the_block_is_added_once_and_kept() {
        let one = to(&["10.96.0.53:53"]);
        let added = with_forward(KIND, &one).unwrap().unwrap();
        assert!(added.starts_with(KIND), "the rest is untouched");
        assert!(added.ends_with(&block(&one)));
        assert!(added.contains(
            "clusterset.local:53 {\n    errors\n    cache 30\n    forward . 10.96.0.53:53\n}"
        ));
        // Already so: nothing to write.
        assert_eq!(with_forward(&added, &one).unwrap(), None);
        // A new address (dual stack) replaces the block in place.
        let two = to(&["10.96.0.53:53", "[fd00::53]:53"]);
        let moved = with_forward(&added, &two).unwrap().unwrap();
        assert_eq!(moved.matches(BEGIN).count(), 1);
        assert!(moved.contains("forward . 10.96.0.53:53 [fd00::53]:53"));
        // Edited by hand: put back; a duplicate block is dropped.
        let edited = added.replace("cache 30\n    forward", "forward");
        assert_eq!(with_forward(&edited, &one).unwrap().unwrap(), added);
        let twice = format!("{added}{}", block(&one));
        assert_eq!(with_forward(&twice, &one).unwrap().unwrap(), added);
        // A Corefile without a final newline.
        let bare = KIND.trim_end();
        let fixed = with_forward(bare, &one).unwrap().unwrap();
        assert_eq!(fixed, added);
    }

    #[test]
    fn a_clusterset_block_someone_else_wrote_is_left_alone() {
        let one = to(&["10.96.0.53:53"]);
        for foreign in [
            "clusterset.local:53 {\n    forward . 10.0.0.1\n}\n",
            "clusterset.local {\n}\n",
            "clusterset.local.:53 cluster.local {\n}\n",
            "dns://clusterset.local:53 {\n}\n",
        ] {
            let file = format!("{KIND}{foreign}");
            assert_eq!(
                with_forward(&file, &one),
                Err(CorefileError::Foreign(21)),
                "{foreign}"
            );
        }
        // A comment, or the zone named inside another block, is not one.
        let file = format!("# clusterset.local {{\n{KIND}");
        assert!(with_forward(&file, &one).unwrap().is_some());
        let plugin = KIND.replace(
            "    loop\n",
            "    multicluster clusterset.local\n    loop\n",
        );
        assert!(with_forward(&plugin, &one).unwrap().is_some());
    }

    #[test]
    fn bad_corefiles_and_targets_are_refused() {
        let one = to(&["10.96.0.53:53"]);
        let cut = format!("{KIND}{BEGIN}\nclusterset.local:53 {{\n");
        assert_eq!(with_forward(&cut, &one), Err(CorefileError::Unterminated));
        let huge = "#".repeat(MAX_COREFILE + 1);
        assert_eq!(
            with_forward(&huge, &one),
            Err(CorefileError::TooLarge(MAX_COREFILE + 1))
        );
        assert_eq!(with_forward(KIND, &[]), Err(CorefileError::NoTarget));
    }

    #[test]
    fn targets_are_the_services_cluster_ips_on_its_dns_port() {
        let svc: Service = serde_json::from_value(serde_json::json!({
            "metadata": { "name": "fedmesh-dns", "namespace": "fedmesh-system" },
            "spec": {
                "clusterIP": "10.96.0.53", "clusterIPs": ["10.96.0.53", "fd00::53"],
                "ports": [
                    { "name": "dns-tcp", "port": 53, "protocol": "TCP", "targetPort": 5353 },
                    { "name": "dns-udp", "port": 53, "protocol": "UDP", "targetPort": 5353 },
                ],
            },
        }))
        .unwrap();
        assert_eq!(targets(&svc), to(&["10.96.0.53:53", "[fd00::53]:53"]));
        let none: Service = serde_json::from_value(serde_json::json!({
            "metadata": { "name": "x" },
            "spec": { "clusterIP": "None", "ports": [{ "name": "dns", "port": 53 }] },
        }))
        .unwrap();
        assert!(targets(&none).is_empty());
    }
}
