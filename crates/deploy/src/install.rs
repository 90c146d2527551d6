//! The manifests of one cluster's fedmesh: `fedmesh install` prints them
//! and the Terraform module applies the same output (it runs
//! `fedmesh install --terraform`), so the two cannot drift.
//!
//! Objects, in apply order: namespace; the MCS CRDs; service accounts and
//! RBAC (each component gets only the verbs it uses); the CA, bootstrap
//! token and store TLS Secrets; config maps (controller and gateway
//! config, the cluster's bundle, pinned peer bundles); the controller
//! (Deployment with leader election, its API Service, PDB; with ClusterSet
//! IPs, the `fedmesh-dns` Service CoreDNS forwards `clusterset.local` to,
//! and the right to keep that forward in CoreDNS's ConfigMap); the gateway
//! (Deployment, the east-west Service with QUIC on UDP and the TLS/TCP
//! fallback, the in-cluster tunnel Service, PDB).

use std::collections::BTreeMap;

use base64::Engine;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

use crate::names::{self, NameError};
use crate::{ports, NAMESPACE};

/// Everything a cluster's manifests depend on.
#[derive(Debug, Clone)]
pub struct InstallSpec {
    pub cluster: String,
    pub trust_domain: String,
    pub store: StoreSpec,
    pub image: String,
    pub pull_policy: String,
    pub ca: CaFiles,
    pub gateway: GatewaySpec,
    pub controller_replicas: u32,
    /// Admitted peers: cluster name → its root bundle (PEM).
    pub peers: BTreeMap<String, String>,
    /// ClusterSet IPs and `clusterset.local` DNS, when wanted.
    pub clusterset: Option<ClusterSetSpec>,
    /// Who may set faults through the gateways' drill API (SPIFFE
    /// principals); empty: no drill API.
    pub drill_operators: Vec<String>,
}

/// Multi-cluster services by name: ClusterSet IPs from `cidrs` and the
/// controller's `clusterset.local` DNS server.
#[derive(Debug, Clone)]
pub struct ClusterSetSpec {
    /// One CIDR per IP family (`241.0.0.0/16`, `fd00:fe::/112`).
    pub cidrs: Vec<String>,
    /// `NAMESPACE/NAME` of CoreDNS's ConfigMap, which the controller keeps
    /// forwarding `clusterset.local` to it; `None`: CoreDNS is left alone.
    pub coredns: Option<String>,
}

/// The Service in front of the controller's DNS server.
pub const DNS_SERVICE: &str = "fedmesh-dns";

#[derive(Debug, Clone)]
pub struct StoreSpec {
    pub endpoints: Vec<String>,
    pub tls: Option<StoreTlsFiles>,
}

/// PEM contents (not paths): they go into a Secret.
#[derive(Debug, Clone)]
pub struct StoreTlsFiles {
    pub ca: String,
    pub cert: Option<String>,
    pub key: Option<String>,
    pub server_name: Option<String>,
}

/// The cluster CA as `fedmesh ca init` writes it.
#[derive(Debug, Clone)]
pub struct CaFiles {
    pub ca_pem: String,
    pub ca_key: String,
    pub chain_pem: String,
    pub bundle_pem: String,
}

#[derive(Debug, Clone)]
pub struct GatewaySpec {
    pub service_type: String,
    pub annotations: BTreeMap<String, String>,
    /// The QUIC address peers reach this cluster's gateways at (the load
    /// balancer's or a node's IP); the TCP fallback is the same host on
    /// its own port unless `advertise_tcp` says otherwise. `None` (a
    /// LoadBalancer only): the controller advertises whatever address the
    /// load balancer gets, and follows it.
    pub advertise: Option<std::net::SocketAddr>,
    pub advertise_tcp: Option<std::net::SocketAddr>,
    /// For `NodePort`: the node ports of QUIC and the TCP fallback.
    pub node_ports: Option<(u16, u16)>,
    pub replicas: u32,
}

/// Why nothing was rendered.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum InstallError {
    #[error("{}", .0.iter().map(ToString::to_string).collect::<Vec<_>>().join("\n"))]
    Invalid(Vec<Problem>),
}

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Problem {
    #[error(transparent)]
    Name(#[from] NameError),
    #[error("{0}")]
    Other(String),
}

const BOUNDS_REPLICAS: std::ops::RangeInclusive<u32> = 1..=5;

impl InstallSpec {
    /// Every problem, not just the first.
    pub fn validate(&self) -> Result<(), InstallError> {
        let mut p: Vec<Problem> = Vec::new();
        let mut check = |r: Result<(), NameError>| {
            if let Err(e) = r {
                p.push(e.into());
            }
        };
        check(names::cluster_name(&self.cluster));
        check(names::trust_domain(&self.trust_domain));
        check(names::image(&self.image));
        check(names::one_of(
            "image pull policy",
            &self.pull_policy,
            names::PULL_POLICIES,
        ));
        check(names::one_of(
            "gateway service type",
            &self.gateway.service_type,
            names::SERVICE_TYPES,
        ));
        for e in &self.store.endpoints {
            check(names::store_endpoint(e));
        }
        for k in self.gateway.annotations.keys() {
            check(names::annotation_key(k));
        }
        for name in self.peers.keys() {
            check(names::cluster_name(name));
        }
        if let Some((q, t)) = self.gateway.node_ports {
            check(names::node_port("gateway QUIC node port", q.into()).map(drop));
            check(names::node_port("gateway TCP node port", t.into()).map(drop));
        }
        if self.store.endpoints.is_empty() {
            p.push(Problem::Other("store: at least one etcd endpoint".into()));
        }
        if self.store.endpoints.len() > 16 {
            p.push(Problem::Other("store: at most 16 etcd endpoints".into()));
        }
        if self.gateway.node_ports.is_some() && self.gateway.service_type != "NodePort" {
            p.push(Problem::Other(
                "gateway node ports: only with gateway service type NodePort".into(),
            ));
        }
        match self.gateway.advertise {
            Some(a) if a.port() == 0 => p.push(Problem::Other(
                "gateway advertise address: port must be 1-65535".into(),
            )),
            None if self.gateway.service_type != "LoadBalancer" => p.push(Problem::Other(
                "gateway advertise address: required unless the gateway Service is a LoadBalancer (whose address is then discovered)".into(),
            )),
            None if self.gateway.advertise_tcp.is_some() => p.push(Problem::Other(
                "gateway advertise TCP address: only with an advertise address".into(),
            )),
            _ => {}
        }
        for (what, n) in [
            ("controller replicas", self.controller_replicas),
            ("gateway replicas", self.gateway.replicas),
        ] {
            if !BOUNDS_REPLICAS.contains(&n) {
                p.push(Problem::Other(format!("{what}: {n}: must be from 1 to 5")));
            }
        }
        if self.peers.contains_key(&self.cluster) {
            p.push(Problem::Other(format!(
                "peer `{}`: a cluster does not join itself",
                self.cluster
            )));
        }
        if self.drill_operators.len() > 64 {
            p.push(Problem::Other("drill operators: at most 64".into()));
        }
        for o in &self.drill_operators {
            if !valid_principal(o) {
                p.push(Problem::Other(format!(
                    "drill operator `{o}`: expected spiffe://TD/PATH, spiffe://TD/ns/NS/* or spiffe://TD/*"
                )));
            }
        }
        if let Some(c) = &self.clusterset {
            if c.cidrs.is_empty() || c.cidrs.len() > 2 {
                p.push(Problem::Other(
                    "clusterset CIDRs: one or two (one per IP family)".into(),
                ));
            }
            for cidr in &c.cidrs {
                if !valid_cidr(cidr) {
                    p.push(Problem::Other(format!(
                        "clusterset CIDR `{cidr}`: expected ADDRESS/PREFIX"
                    )));
                }
            }
            if let Some(cm) = &c.coredns {
                let ok = cm.split_once('/').is_some_and(|(ns, name)| {
                    names::dns_label("namespace", ns).is_ok()
                        && names::dns_label("name", name).is_ok()
                });
                if !ok {
                    p.push(Problem::Other(format!(
                        "CoreDNS ConfigMap `{cm}`: expected NAMESPACE/NAME"
                    )));
                }
            }
        }
        if let Some(tls) = &self.store.tls {
            if tls.cert.is_some() != tls.key.is_some() {
                p.push(Problem::Other(
                    "store TLS: client cert and key go together".into(),
                ));
            }
            if self
                .store
                .endpoints
                .iter()
                .any(|e| e.starts_with("http://"))
            {
                p.push(Problem::Other(
                    "store TLS: endpoints must be https://".into(),
                ));
            }
        }
        if names::trust_domain(&self.trust_domain).is_ok() {
            if let Err(e) = self.ca.check(&self.trust_domain) {
                p.push(e);
            }
        }
        for (name, pem) in &self.peers {
            if let Err(e) = check_peer_bundle(name, pem) {
                p.push(e);
            }
        }
        if p.is_empty() {
            Ok(())
        } else {
            Err(InstallError::Invalid(p))
        }
    }

    /// The token a gateway presents once to get its first SVID: derived
    /// from the CA key, so re-rendering gives the same Secret (an apply
    /// changes nothing) and only the CA's holder can compute it.
    pub fn bootstrap_token(&self) -> String {
        let mut h = Sha256::new();
        h.update(b"fedmesh-bootstrap/gateway/");
        h.update(self.cluster.as_bytes());
        h.update(b"\n");
        h.update(self.ca.ca_key.as_bytes());
        hex(&h.finalize())
    }

    fn gateway_id(&self) -> String {
        format!("spiffe://{}/ns/{NAMESPACE}/sa/gateway", self.trust_domain)
    }

    /// The objects, in apply order.
    pub fn render(&self) -> Result<Vec<Value>, InstallError> {
        self.validate()?;
        let mut out = vec![namespace()];
        out.extend(crds());
        out.extend(self.rbac());
        out.extend(self.secrets());
        out.extend(self.config_maps()?);
        out.extend(self.controller());
        out.extend(self.gateway());
        Ok(out)
    }

    fn labels(&self, component: &str) -> Value {
        json!({
            "app.kubernetes.io/name": "fedmesh",
            "app.kubernetes.io/component": component,
            "app.kubernetes.io/part-of": "fedmesh",
            "app.kubernetes.io/managed-by": "fedmesh",
            "fedmesh.io/cluster": self.cluster,
        })
    }

    fn meta(&self, name: &str, component: &str) -> Value {
        json!({ "name": name, "namespace": NAMESPACE, "labels": self.labels(component) })
    }

    fn rbac(&self) -> Vec<Value> {
        let sa = |name: &str, automount: bool| {
            json!({
                "apiVersion": "v1", "kind": "ServiceAccount",
                "metadata": self.meta(name, name),
                "automountServiceAccountToken": automount,
            })
        };
        let cluster_meta =
            json!({ "name": "fedmesh-controller", "labels": self.labels("controller") });
        vec![
            sa("controller", true),
            // The gateway never talks to the API server.
            sa("gateway", false),
            json!({
                "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole",
                "metadata": cluster_meta,
                "rules": [
                    // What it reads to know the cluster's services.
                    { "apiGroups": [""], "resources": ["services"], "verbs": ["get", "list", "watch"] },
                    { "apiGroups": ["discovery.k8s.io"], "resources": ["endpointslices"], "verbs": ["get", "list", "watch"] },
                    { "apiGroups": ["multicluster.x-k8s.io"], "resources": ["serviceexports"], "verbs": ["get", "list", "watch"] },
                    // Export conditions (status subresource only).
                    { "apiGroups": ["multicluster.x-k8s.io"], "resources": ["serviceexports/status"], "verbs": ["patch"] },
                    // Imports it owns (server-side apply is a patch).
                    { "apiGroups": ["multicluster.x-k8s.io"], "resources": ["serviceimports"], "verbs": ["get", "list", "watch", "patch", "delete"] },
                    { "apiGroups": ["multicluster.x-k8s.io"], "resources": ["serviceimports/status"], "verbs": ["patch"] },
                    // Pods' service account tokens, checked before their
                    // first SVID is signed.
                    { "apiGroups": ["authentication.k8s.io"], "resources": ["tokenreviews"], "verbs": ["create"] },
                ],
            }),
            json!({
                "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding",
                "metadata": cluster_meta,
                "roleRef": { "apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "fedmesh-controller" },
                "subjects": [{ "kind": "ServiceAccount", "name": "controller", "namespace": NAMESPACE }],
            }),
            json!({
                "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role",
                "metadata": self.meta("fedmesh-controller", "controller"),
                "rules": [
                    // Leader election: one Lease, by name (create cannot
                    // be limited by name).
                    { "apiGroups": ["coordination.k8s.io"], "resources": ["leases"], "verbs": ["create"] },
                    { "apiGroups": ["coordination.k8s.io"], "resources": ["leases"], "resourceNames": ["fedmesh-controller"], "verbs": ["get", "update"] },
                    // The leader labels its own pod so the API Service
                    // selects it alone.
                    { "apiGroups": [""], "resources": ["pods"], "verbs": ["get", "patch"] },
                ],
            }),
            json!({
                "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
                "metadata": self.meta("fedmesh-controller", "controller"),
                "roleRef": { "apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "fedmesh-controller" },
                "subjects": [{ "kind": "ServiceAccount", "name": "controller", "namespace": NAMESPACE }],
            }),
        ]
    }

    fn secrets(&self) -> Vec<Value> {
        let b64 = |s: &str| base64::engine::general_purpose::STANDARD.encode(s);
        let tokens = format!(
            "tokens:\n  - token: {}\n    identities: [\"{}\"]\n",
            self.bootstrap_token(),
            self.gateway_id()
        );
        let mut out = vec![
            json!({
                "apiVersion": "v1", "kind": "Secret", "type": "Opaque",
                "metadata": self.meta("fedmesh-ca", "controller"),
                "data": {
                    "ca.pem": b64(&self.ca.ca_pem),
                    "ca.key": b64(&self.ca.ca_key),
                    "chain.pem": b64(&self.ca.chain_pem),
                    "bundle.pem": b64(&self.ca.bundle_pem),
                },
            }),
            json!({
                "apiVersion": "v1", "kind": "Secret", "type": "Opaque",
                "metadata": self.meta("fedmesh-bootstrap", "controller"),
                "data": {
                    "tokens.yaml": b64(&tokens),
                    "gateway-token": b64(&self.bootstrap_token()),
                },
            }),
        ];
        if let Some(tls) = &self.store.tls {
            let mut data = serde_json::Map::new();
            data.insert("ca.pem".into(), b64(&tls.ca).into());
            if let (Some(c), Some(k)) = (&tls.cert, &tls.key) {
                data.insert("cert.pem".into(), b64(c).into());
                data.insert("key.pem".into(), b64(k).into());
            }
            out.push(json!({
                "apiVersion": "v1", "kind": "Secret", "type": "Opaque",
                "metadata": self.meta("fedmesh-store-tls", "controller"),
                "data": data,
            }));
        }
        out
    }

    /// The controller's config file, exactly as the controller reads it.
    pub fn controller_config(&self) -> Value {
        let (quic, tcp) = match self.gateway.advertise {
            Some(a) => {
                let tcp = self
                    .gateway
                    .advertise_tcp
                    .unwrap_or(std::net::SocketAddr::new(
                        a.ip(),
                        self.gateway
                            .node_ports
                            .map_or(ports::GATEWAY_TCP, |(_, t)| t),
                    ));
                (vec![a.to_string()], vec![tcp.to_string()])
            }
            None => (Vec::new(), Vec::new()),
        };
        let mut kubernetes = json!({ "inbound_port": ports::SIDECAR_INBOUND, "write_back": true });
        if self.gateway.advertise.is_none() {
            kubernetes["gateway_service"] = format!("{NAMESPACE}/fedmesh-gateway").into();
        }
        let mut store = json!({ "kind": "etcd", "endpoints": self.store.endpoints });
        if let Some(tls) = &self.store.tls {
            let mut t = json!({ "ca": "/etc/fedmesh/store-tls/ca.pem" });
            if tls.cert.is_some() {
                t["cert"] = "/etc/fedmesh/store-tls/cert.pem".into();
                t["key"] = "/etc/fedmesh/store-tls/key.pem".into();
            }
            if let Some(n) = &tls.server_name {
                t["server_name"] = n.clone().into();
            }
            store["tls"] = t;
        }
        let mut cfg = json!({
            "cluster": self.cluster,
            "trust_domain": self.trust_domain,
            "gateways": quic,
            "gateways_tcp": tcp,
            "gateway_tunnel": format!("fedmesh-gateway-tunnel.{NAMESPACE}.svc:{}", ports::GATEWAY_TUNNEL),
            "lease_ttl": "10s",
            "store": store,
            "bundle": "/etc/fedmesh/ca/bundle.pem",
            "pins_dir": "/etc/fedmesh/pins",
            "kubernetes": kubernetes,
            "admin": format!("0.0.0.0:{}", ports::CONTROLLER_ADMIN),
            "api": {
                "listen": format!("0.0.0.0:{}", ports::CONTROLLER_API),
                "ca_dir": "/etc/fedmesh/ca",
                "tokens": "/etc/fedmesh/bootstrap/tokens.yaml",
            },
        });
        if let Some(c) = &self.clusterset {
            cfg["clusterset_ips"] = json!({ "cidrs": c.cidrs });
            cfg["dns"] = json!({ "listen": format!("0.0.0.0:{}", ports::CONTROLLER_DNS) });
            if let Some(cm) = &c.coredns {
                cfg["kubernetes"]["coredns"] = json!({
                    "configmap": cm,
                    "dns_service": format!("{NAMESPACE}/{DNS_SERVICE}"),
                });
            }
        }
        cfg
    }

    /// The gateway's config file, exactly as the gateway reads it.
    pub fn gateway_config(&self) -> Value {
        let mut cfg = json!({
            "listen": {
                "quic": format!("0.0.0.0:{}", ports::GATEWAY_QUIC),
                "tcp_fallback": format!("0.0.0.0:{}", ports::GATEWAY_TCP),
                "tunnel": format!("0.0.0.0:{}", ports::GATEWAY_TUNNEL),
                "admin": format!("0.0.0.0:{}", ports::GATEWAY_ADMIN),
            },
            "identity": {
                "cert": "/var/run/fedmesh/identity/svid.pem",
                "key": "/var/run/fedmesh/identity/svid.key",
            },
            "bundles": [{ "trust_domain": self.trust_domain, "path": "/var/run/fedmesh/identity/bundle.pem" }],
            "controller": {
                "address": format!("fedmesh-controller.{NAMESPACE}.svc:{}", ports::CONTROLLER_API),
                "cluster": self.cluster,
            },
        });
        if !self.drill_operators.is_empty() {
            cfg["drills"] = json!({
                "listen": format!("0.0.0.0:{}", ports::GATEWAY_DRILLS),
                "operators": self.drill_operators,
            });
        }
        cfg
    }

    fn config_maps(&self) -> Result<Vec<Value>, InstallError> {
        let yaml = |v: &Value| {
            serde_yaml_ng::to_string(v)
                .map_err(|e| InstallError::Invalid(vec![Problem::Other(e.to_string())]))
        };
        let pins: serde_json::Map<String, Value> = self
            .peers
            .iter()
            .map(|(name, pem)| (format!("{name}.pem"), Value::from(pem.as_str())))
            .collect();
        Ok(vec![
            json!({
                "apiVersion": "v1", "kind": "ConfigMap",
                "metadata": self.meta("fedmesh-controller", "controller"),
                "data": { "controller.yaml": yaml(&self.controller_config())? },
            }),
            json!({
                "apiVersion": "v1", "kind": "ConfigMap",
                "metadata": self.meta("fedmesh-gateway", "gateway"),
                "data": { "gateway.yaml": yaml(&self.gateway_config())? },
            }),
            // Public: what workloads and the gateway's first contact trust.
            json!({
                "apiVersion": "v1", "kind": "ConfigMap",
                "metadata": self.meta("fedmesh-bundle", "controller"),
                "data": { "bundle.pem": self.ca.bundle_pem },
            }),
            json!({
                "apiVersion": "v1", "kind": "ConfigMap",
                "metadata": self.meta("fedmesh-pins", "controller"),
                "data": pins,
            }),
        ])
    }

    /// A checksum of what a component reads at start: a changed config
    /// rolls its pods.
    fn checksum(&self, parts: &[&Value]) -> String {
        let mut h = Sha256::new();
        for p in parts {
            h.update(p.to_string().as_bytes());
        }
        h.update(self.ca.bundle_pem.as_bytes());
        for (n, pem) in &self.peers {
            h.update(n.as_bytes());
            h.update(pem.as_bytes());
        }
        hex(&h.finalize())[..16].to_string()
    }

    fn controller(&self) -> Vec<Value> {
        let labels = self.labels("controller");
        let selector = json!({ "app.kubernetes.io/name": "fedmesh", "app.kubernetes.io/component": "controller" });
        // Secrets are 0440, root and the pod's fsGroup: the non-root
        // process reads them through its group, nobody else can.
        let mut volumes = vec![
            json!({ "name": "config", "configMap": { "name": "fedmesh-controller" } }),
            json!({ "name": "ca", "secret": { "secretName": "fedmesh-ca", "defaultMode": 0o440 } }),
            json!({ "name": "bootstrap", "secret": { "secretName": "fedmesh-bootstrap", "defaultMode": 0o440 } }),
            json!({ "name": "pins", "configMap": { "name": "fedmesh-pins" } }),
        ];
        let mut mounts = vec![
            json!({ "name": "config", "mountPath": "/etc/fedmesh/controller", "readOnly": true }),
            json!({ "name": "ca", "mountPath": "/etc/fedmesh/ca", "readOnly": true }),
            json!({ "name": "bootstrap", "mountPath": "/etc/fedmesh/bootstrap", "readOnly": true }),
            json!({ "name": "pins", "mountPath": "/etc/fedmesh/pins", "readOnly": true }),
        ];
        if self.store.tls.is_some() {
            volumes.push(json!({ "name": "store-tls", "secret": { "secretName": "fedmesh-store-tls", "defaultMode": 0o440 } }));
            mounts.push(json!({ "name": "store-tls", "mountPath": "/etc/fedmesh/store-tls", "readOnly": true }));
        }
        let mut pod_labels = labels.clone();
        pod_labels["fedmesh.io/leader"] = "false".into();
        let mut container_ports = vec![
            json!({ "name": "grpc-api", "containerPort": ports::CONTROLLER_API, "protocol": "TCP" }),
            json!({ "name": "admin", "containerPort": ports::CONTROLLER_ADMIN, "protocol": "TCP" }),
        ];
        if self.clusterset.is_some() {
            container_ports.push(json!({ "name": "dns-udp", "containerPort": ports::CONTROLLER_DNS, "protocol": "UDP" }));
            container_ports.push(json!({ "name": "dns-tcp", "containerPort": ports::CONTROLLER_DNS, "protocol": "TCP" }));
        }
        let leader = json!({ "app.kubernetes.io/component": "controller", "app.kubernetes.io/name": "fedmesh", "fedmesh.io/leader": "true" });
        let mut out = vec![
            json!({
                "apiVersion": "apps/v1", "kind": "Deployment",
                "metadata": self.meta("fedmesh-controller", "controller"),
                "spec": {
                    "replicas": self.controller_replicas,
                    "selector": { "matchLabels": selector },
                    // A standby is ready at once: rolling one pod at a
                    // time always leaves a leader or a standby.
                    "strategy": { "type": "RollingUpdate", "rollingUpdate": { "maxUnavailable": 0, "maxSurge": 1 } },
                    "template": {
                        "metadata": {
                            "labels": pod_labels,
                            "annotations": {
                                "fedmesh.io/config-checksum": self.checksum(&[&self.controller_config()]),
                                "prometheus.io/scrape": "true",
                                "prometheus.io/port": ports::CONTROLLER_ADMIN.to_string(),
                            },
                        },
                        "spec": {
                            "serviceAccountName": "controller",
                            "securityContext": pod_security(),
                            "terminationGracePeriodSeconds": 30,
                            "affinity": spread(&selector),
                            "containers": [{
                                "name": "controller",
                                "image": self.image,
                                "imagePullPolicy": self.pull_policy,
                                "args": ["controller", "--config", "/etc/fedmesh/controller/controller.yaml", "--leader-elect"],
                                "env": downward_env(),
                                "ports": container_ports,
                                "livenessProbe": probe("/live", ports::CONTROLLER_ADMIN, 10),
                                "readinessProbe": probe("/ready", ports::CONTROLLER_ADMIN, 5),
                                "resources": {
                                    "requests": { "cpu": "50m", "memory": "64Mi" },
                                    "limits": { "cpu": "1", "memory": "256Mi" },
                                },
                                "securityContext": container_security(),
                                "volumeMounts": mounts,
                            }],
                            "volumes": volumes,
                        },
                    },
                },
            }),
            json!({
                "apiVersion": "v1", "kind": "Service",
                "metadata": self.meta("fedmesh-controller", "controller"),
                "spec": {
                    "type": "ClusterIP",
                    // The leader alone: it labels its own pod.
                    "selector": leader,
                    "ports": [{ "name": "grpc-api", "port": ports::CONTROLLER_API, "targetPort": "grpc-api", "protocol": "TCP" }],
                },
            }),
            json!({
                "apiVersion": "policy/v1", "kind": "PodDisruptionBudget",
                "metadata": self.meta("fedmesh-controller", "controller"),
                "spec": {
                    "maxUnavailable": 1,
                    "selector": { "matchLabels": selector },
                },
            }),
        ];
        if let Some(c) = &self.clusterset {
            out.extend(self.dns(c, &leader));
        }
        out
    }

    /// The DNS Service (the leader serves the zone; a standby has no view
    /// to answer from) and, when CoreDNS is kept, the right to read and
    /// update its one ConfigMap.
    fn dns(&self, c: &ClusterSetSpec, leader: &Value) -> Vec<Value> {
        let mut out = vec![json!({
            "apiVersion": "v1", "kind": "Service",
            "metadata": self.meta(DNS_SERVICE, "controller"),
            "spec": {
                "type": "ClusterIP",
                "selector": leader,
                "ports": [
                    { "name": "dns-udp", "port": 53, "targetPort": "dns-udp", "protocol": "UDP" },
                    { "name": "dns-tcp", "port": 53, "targetPort": "dns-tcp", "protocol": "TCP" },
                ],
            },
        })];
        if let Some((ns, name)) = c.coredns.as_deref().and_then(|cm| cm.split_once('/')) {
            let meta = json!({ "name": "fedmesh-coredns", "namespace": ns, "labels": self.labels("controller") });
            out.push(json!({
                "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role",
                "metadata": meta,
                "rules": [
                    { "apiGroups": [""], "resources": ["configmaps"], "resourceNames": [name], "verbs": ["get", "update"] },
                ],
            }));
            out.push(json!({
                "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
                "metadata": meta,
                "roleRef": { "apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "fedmesh-coredns" },
                "subjects": [{ "kind": "ServiceAccount", "name": "controller", "namespace": NAMESPACE }],
            }));
        }
        out
    }

    fn gateway(&self) -> Vec<Value> {
        let selector = json!({ "app.kubernetes.io/name": "fedmesh", "app.kubernetes.io/component": "gateway" });
        let identity_mount =
            json!({ "name": "identity", "mountPath": "/var/run/fedmesh/identity" });
        let (quic_np, tcp_np) = match self.gateway.node_ports {
            Some((q, t)) => (json!(q), json!(t)),
            None => (Value::Null, Value::Null),
        };
        let mut quic_port = json!({ "name": "quic", "port": ports::GATEWAY_QUIC, "targetPort": "quic", "protocol": "UDP" });
        let mut tcp_port = json!({ "name": "tls-fallback", "port": ports::GATEWAY_TCP, "targetPort": "tls-fallback", "protocol": "TCP" });
        if !quic_np.is_null() {
            quic_port["nodePort"] = quic_np;
            tcp_port["nodePort"] = tcp_np;
        }
        let mut gateway_ports = vec![
            json!({ "name": "quic", "containerPort": ports::GATEWAY_QUIC, "protocol": "UDP" }),
            json!({ "name": "tls-fallback", "containerPort": ports::GATEWAY_TCP, "protocol": "TCP" }),
            json!({ "name": "tunnel", "containerPort": ports::GATEWAY_TUNNEL, "protocol": "TCP" }),
            json!({ "name": "admin", "containerPort": ports::GATEWAY_ADMIN, "protocol": "TCP" }),
        ];
        if !self.drill_operators.is_empty() {
            gateway_ports.push(json!({ "name": "drills", "containerPort": ports::GATEWAY_DRILLS, "protocol": "TCP" }));
        }
        let mut svc_meta = self.meta("fedmesh-gateway", "gateway");
        if !self.gateway.annotations.is_empty() {
            svc_meta["annotations"] = json!(self.gateway.annotations);
        }
        let mut svc_spec = json!({
            "type": self.gateway.service_type,
            "selector": selector,
            "ports": [quic_port, tcp_port],
        });
        if self.gateway.service_type != "ClusterIP" {
            // Peers see the client's address; no second hop through
            // another node (which would also break QUIC path checks).
            svc_spec["externalTrafficPolicy"] = "Local".into();
        }
        let mut out = vec![
            json!({
                "apiVersion": "apps/v1", "kind": "Deployment",
                "metadata": self.meta("fedmesh-gateway", "gateway"),
                "spec": {
                    "replicas": self.gateway.replicas,
                    "selector": { "matchLabels": selector },
                    "strategy": { "type": "RollingUpdate", "rollingUpdate": { "maxUnavailable": 0, "maxSurge": 1 } },
                    "template": {
                        "metadata": {
                            "labels": self.labels("gateway"),
                            "annotations": {
                                "fedmesh.io/config-checksum": self.checksum(&[&self.gateway_config()]),
                                "prometheus.io/scrape": "true",
                                "prometheus.io/port": ports::GATEWAY_ADMIN.to_string(),
                            },
                        },
                        "spec": {
                            "serviceAccountName": "gateway",
                            "automountServiceAccountToken": false,
                            "securityContext": pod_security(),
                            // Longer than the drain: open streams finish.
                            "terminationGracePeriodSeconds": 45,
                            "affinity": spread(&selector),
                            "initContainers": [{
                                "name": "identity",
                                "image": self.image,
                                "imagePullPolicy": self.pull_policy,
                                "args": [
                                    "cert", "request",
                                    "--controller", format!("fedmesh-controller.{NAMESPACE}.svc:{}", ports::CONTROLLER_API),
                                    "--bundle", "/etc/fedmesh/bundle/bundle.pem",
                                    "--spiffe-id", self.gateway_id(),
                                    "--token-file", "/etc/fedmesh/bootstrap/gateway-token",
                                    "--out", "/var/run/fedmesh/identity",
                                ],
                                "resources": {
                                    "requests": { "cpu": "10m", "memory": "16Mi" },
                                    "limits": { "cpu": "200m", "memory": "64Mi" },
                                },
                                "securityContext": container_security(),
                                "volumeMounts": [
                                    identity_mount,
                                    { "name": "bundle", "mountPath": "/etc/fedmesh/bundle", "readOnly": true },
                                    { "name": "bootstrap", "mountPath": "/etc/fedmesh/bootstrap", "readOnly": true },
                                ],
                            }],
                            "containers": [{
                                "name": "gateway",
                                "image": self.image,
                                "imagePullPolicy": self.pull_policy,
                                "args": ["gateway", "--config", "/etc/fedmesh/gateway/gateway.yaml", "--drain", "20s"],
                                "ports": gateway_ports,
                                "livenessProbe": probe("/live", ports::GATEWAY_ADMIN, 10),
                                "readinessProbe": probe("/ready", ports::GATEWAY_ADMIN, 2),
                                "resources": {
                                    "requests": { "cpu": "250m", "memory": "128Mi" },
                                    "limits": { "cpu": "2", "memory": "512Mi" },
                                },
                                "securityContext": container_security(),
                                "volumeMounts": [
                                    identity_mount,
                                    { "name": "config", "mountPath": "/etc/fedmesh/gateway", "readOnly": true },
                                ],
                            }],
                            "volumes": [
                                // Written by the identity init container,
                                // rewritten at every renewal.
                                { "name": "identity", "emptyDir": { "medium": "Memory", "sizeLimit": "1Mi" } },
                                { "name": "config", "configMap": { "name": "fedmesh-gateway" } },
                                { "name": "bundle", "configMap": { "name": "fedmesh-bundle" } },
                                { "name": "bootstrap", "secret": { "secretName": "fedmesh-bootstrap", "defaultMode": 0o440, "items": [{ "key": "gateway-token", "path": "gateway-token" }] } },
                            ],
                        },
                    },
                },
            }),
            json!({
                "apiVersion": "v1", "kind": "Service",
                "metadata": svc_meta,
                "spec": svc_spec,
            }),
            json!({
                "apiVersion": "v1", "kind": "Service",
                "metadata": self.meta("fedmesh-gateway-tunnel", "gateway"),
                "spec": {
                    "type": "ClusterIP",
                    "selector": selector,
                    "ports": [{ "name": "tunnel", "port": ports::GATEWAY_TUNNEL, "targetPort": "tunnel", "protocol": "TCP" }],
                },
            }),
            json!({
                "apiVersion": "policy/v1", "kind": "PodDisruptionBudget",
                "metadata": self.meta("fedmesh-gateway", "gateway"),
                "spec": {
                    "maxUnavailable": 1,
                    "selector": { "matchLabels": selector },
                },
            }),
        ];
        if !self.drill_operators.is_empty() {
            // Headless: every replica's address resolves, and a drill sets
            // its fault on each (faults are per gateway process).
            out.push(json!({
                "apiVersion": "v1", "kind": "Service",
                "metadata": self.meta("fedmesh-gateway-drills", "gateway"),
                "spec": {
                    "clusterIP": "None",
                    "selector": selector,
                    "ports": [{ "name": "drills", "port": ports::GATEWAY_DRILLS, "targetPort": "drills", "protocol": "TCP" }],
                },
            }));
        }
        out
    }
}

fn namespace() -> Value {
    json!({
        "apiVersion": "v1", "kind": "Namespace",
        "metadata": {
            "name": NAMESPACE,
            "labels": {
                "app.kubernetes.io/part-of": "fedmesh",
                // The gateway and controller need nothing privileged.
                "pod-security.kubernetes.io/enforce": "restricted",
            },
        },
    })
}

fn downward_env() -> Value {
    json!([
        { "name": "POD_NAME", "valueFrom": { "fieldRef": { "fieldPath": "metadata.name" } } },
        { "name": "POD_NAMESPACE", "valueFrom": { "fieldRef": { "fieldPath": "metadata.namespace" } } },
    ])
}

fn probe(path: &str, port: u16, period: u32) -> Value {
    json!({
        "httpGet": { "path": path, "port": port },
        "periodSeconds": period,
        "timeoutSeconds": 2,
        "failureThreshold": 3,
    })
}

fn pod_security() -> Value {
    json!({
        "runAsNonRoot": true,
        "runAsUser": 65532,
        "runAsGroup": 65532,
        "fsGroup": 65532,
        "seccompProfile": { "type": "RuntimeDefault" },
    })
}

fn container_security() -> Value {
    json!({
        "allowPrivilegeEscalation": false,
        "readOnlyRootFilesystem": true,
        "capabilities": { "drop": ["ALL"] },
    })
}

/// Replicas on different nodes when there are several.
fn spread(selector: &Value) -> Value {
    json!({
        "podAntiAffinity": {
            "preferredDuringSchedulingIgnoredDuringExecution": [{
                "weight": 100,
                "podAffinityTerm": {
                    "topologyKey": "kubernetes.io/hostname",
                    "labelSelector": { "matchLabels": selector },
                },
            }],
        },
    })
}

/// `ADDRESS/PREFIX` with a prefix the address family allows (the
/// controller checks the rest: overlaps, special-purpose ranges).
fn valid_cidr(s: &str) -> bool {
    let Some((ip, len)) = s.split_once('/') else {
        return false;
    };
    let max = match ip.parse::<std::net::IpAddr>() {
        Ok(std::net::IpAddr::V4(_)) => 32,
        Ok(std::net::IpAddr::V6(_)) => 128,
        Err(_) => return false,
    };
    len.parse::<u8>().is_ok_and(|l| l <= max)
}

/// A SPIFFE principal as policies and `drills.operators` spell it (the
/// gateway checks it again when it reads its config).
fn valid_principal(p: &str) -> bool {
    let Some(rest) = p.strip_prefix("spiffe://") else {
        return false;
    };
    let (td, path) = rest.split_once('/').unwrap_or((rest, ""));
    names::trust_domain(td).is_ok()
        && !path.is_empty()
        && path
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-._/*".contains(&b))
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// The version of the Multi-Cluster Services API fedmesh speaks and
/// stores (mcs-api v0.5.0 and later).
pub const MCS_VERSION: &str = "v1beta1";

/// The two MCS API CRDs, compatible with the upstream definitions
/// (kubernetes-sigs/mcs-api v0.5.0, `multicluster.x-k8s.io`): same group,
/// names, scope, subresources and field shapes; v1beta1 stored, v1alpha1
/// still served, so clusters that already have the v1alpha1 CRDs keep
/// their objects and other MCS tools read what fedmesh writes.
pub fn crds() -> Vec<Value> {
    let meta_props = json!({
        "apiVersion": { "type": "string" },
        "kind": { "type": "string" },
        "metadata": { "type": "object" },
    });
    let condition = json!({
        "type": "object",
        "required": ["lastTransitionTime", "message", "reason", "status", "type"],
        "properties": {
            "lastTransitionTime": { "type": "string", "format": "date-time" },
            "message": { "type": "string", "maxLength": 32768 },
            "observedGeneration": { "type": "integer", "format": "int64", "minimum": 0 },
            "reason": { "type": "string", "maxLength": 1024, "minLength": 1, "pattern": "^[A-Za-z]([A-Za-z0-9_,:]*[A-Za-z0-9_])?$" },
            "status": { "type": "string", "enum": ["True", "False", "Unknown"] },
            "type": { "type": "string", "maxLength": 316, "pattern": "^([a-z0-9]([-a-z0-9]*[a-z0-9])?(\\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*/)?(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])$" },
        },
    });
    let string_map = json!({ "type": "object", "additionalProperties": { "type": "string" } });
    let mut export_props = meta_props.clone();
    export_props["spec"] = json!({
        "type": "object",
        "properties": {
            "exportedLabels": string_map,
            "exportedAnnotations": string_map,
        },
    });
    export_props["status"] = json!({
        "description": "Written by the MCS implementation: Valid, Ready and Conflict conditions.",
        "type": "object",
        "properties": {
            "conditions": {
                "type": "array",
                "items": condition,
                "x-kubernetes-list-map-keys": ["type"],
                "x-kubernetes-list-type": "map",
            },
        },
    });
    let mut import_props = meta_props;
    import_props["spec"] = json!({
        "type": "object",
        "required": ["ports", "type"],
        "properties": {
            "ips": { "type": "array", "maxItems": 2, "items": { "type": "string" } },
            "ipFamilies": { "type": "array", "maxItems": 2, "items": { "type": "string" } },
            "internalTrafficPolicy": { "type": "string" },
            "trafficDistribution": { "type": "string" },
            "ports": {
                "type": "array",
                "x-kubernetes-list-type": "atomic",
                "items": {
                    "type": "object",
                    "required": ["port"],
                    "properties": {
                        "appProtocol": { "type": "string" },
                        "name": { "type": "string" },
                        "port": { "type": "integer", "format": "int32" },
                        "protocol": { "type": "string" },
                    },
                },
            },
            "sessionAffinity": { "type": "string" },
            "sessionAffinityConfig": {
                "type": "object",
                "properties": {
                    "clientIP": {
                        "type": "object",
                        "properties": { "timeoutSeconds": { "type": "integer", "format": "int32" } },
                    },
                },
            },
            "type": { "type": "string", "enum": ["ClusterSetIP", "Headless"] },
        },
    });
    import_props["status"] = json!({
        "type": "object",
        "properties": {
            "clusters": {
                "type": "array",
                "items": {
                    "type": "object",
                    "required": ["cluster"],
                    "properties": { "cluster": { "type": "string" } },
                },
                "x-kubernetes-list-map-keys": ["cluster"],
                "x-kubernetes-list-type": "map",
            },
            "conditions": {
                "type": "array",
                "items": condition,
                "x-kubernetes-list-map-keys": ["type"],
                "x-kubernetes-list-type": "map",
            },
            "endpointSliceObjects": { "type": "string", "enum": ["Present", "Absent"] },
        },
    });
    let crd = |kind: &str, plural: &str, short: &str, props: Value, columns: Value, doc: &str| {
        // The same schema under both names: v1beta1 is stored and what
        // fedmesh speaks; v1alpha1 is still served, so tools and objects
        // written for it keep working (identical shapes: no conversion
        // webhook).
        let versions: Vec<Value> = ["v1beta1", "v1alpha1"]
            .iter()
            .map(|v| {
                json!({
                    "name": v, "served": true, "storage": *v == MCS_VERSION,
                    "subresources": { "status": {} },
                    "additionalPrinterColumns": columns,
                    "schema": { "openAPIV3Schema": { "description": doc, "type": "object", "properties": props } },
                })
            })
            .collect();
        json!({
            "apiVersion": "apiextensions.k8s.io/v1", "kind": "CustomResourceDefinition",
            "metadata": {
                "name": format!("{plural}.multicluster.x-k8s.io"),
                "labels": { "app.kubernetes.io/part-of": "fedmesh" },
            },
            "spec": {
                "group": "multicluster.x-k8s.io",
                "scope": "Namespaced",
                "names": { "plural": plural, "singular": kind.to_lowercase(), "kind": kind, "shortNames": [short] },
                "versions": versions,
            },
        })
    };
    vec![
        crd(
            "ServiceExport",
            "serviceexports",
            "svcex",
            export_props,
            json!([{ "name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp" }]),
            "Exports the Service of the same name and namespace to the other clusters of the ClusterSet.",
        ),
        crd(
            "ServiceImport",
            "serviceimports",
            "svcim",
            import_props,
            json!([
                { "name": "Type", "type": "string", "description": "ClusterSetIP or Headless", "jsonPath": ".spec.type" },
                { "name": "IP", "type": "string", "description": "The ClusterSet VIP", "jsonPath": ".spec.ips" },
                { "name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp" },
            ]),
            "A service imported from the clusters of the ClusterSet that export it.",
        ),
    ]
}

/// Multi-document YAML, top-level keys in the order people read
/// (apiVersion, kind, metadata, then the rest).
pub fn to_yaml(objects: &[Value]) -> Result<String, crate::YamlError> {
    const FIRST: &[&str] = &["apiVersion", "kind", "metadata"];
    let mut docs = Vec::with_capacity(objects.len());
    for o in objects {
        let mut m = serde_yaml_ng::Mapping::new();
        let conv = |v: &Value| {
            serde_yaml_ng::to_value(v).map_err(|e| crate::YamlError::Emit(e.to_string()))
        };
        if let Value::Object(obj) = o {
            for k in FIRST {
                if let Some(v) = obj.get(*k) {
                    m.insert((*k).into(), conv(v)?);
                }
            }
            for (k, v) in obj {
                if !FIRST.contains(&k.as_str()) {
                    m.insert(k.as_str().into(), conv(v)?);
                }
            }
        }
        docs.push(serde_yaml_ng::Value::Mapping(m));
    }
    crate::to_documents(&docs)
}

impl CaFiles {
    /// Reads a CA directory written by `fedmesh ca init`.
    pub fn read_dir(dir: &std::path::Path) -> Result<Self, Problem> {
        let read = |f: &str| {
            std::fs::read_to_string(dir.join(f))
                .map_err(|e| Problem::Other(format!("CA {}: {e}", dir.join(f).display())))
        };
        let ca_pem = read("ca.pem")?;
        let chain_pem = match std::fs::read_to_string(dir.join("chain.pem")) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
            Err(e) => return Err(Problem::Other(format!("CA chain.pem: {e}"))),
        };
        let bundle_pem = match std::fs::read_to_string(dir.join("bundle.pem")) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => ca_pem.clone(),
            Err(e) => return Err(Problem::Other(format!("CA bundle.pem: {e}"))),
        };
        Ok(Self {
            ca_key: read("ca.key")?,
            ca_pem,
            chain_pem,
            bundle_pem,
        })
    }

    /// Checks the CA is a CA of `trust_domain` with a usable key and
    /// returns its bundle's fingerprint (what peers pin).
    pub fn check(&self, trust_domain: &str) -> Result<String, Problem> {
        let bad = |what: &str, e: &dyn std::fmt::Display| Problem::Other(format!("CA {what}: {e}"));
        let certs =
            fedmesh_trust::pem::decode_certs(&self.ca_pem).map_err(|e| bad("ca.pem", &e))?;
        let [cert] = certs.as_slice() else {
            return Err(bad("ca.pem", &"must hold exactly one certificate"));
        };
        let td = fedmesh_trust::svid::inspect_ca(cert).map_err(|e| bad("ca.pem", &e))?;
        if td.as_str() != trust_domain {
            return Err(Problem::Other(format!(
                "CA is for trust domain `{td}`, not `{trust_domain}`"
            )));
        }
        let bundle = fedmesh_trust::TrustBundle::from_pem(td.clone(), &self.bundle_pem)
            .map_err(|e| bad("bundle.pem", &e))?;
        // What the controller will do at start, done now: load the CA,
        // issue, and check the result against the bundle (a key that does
        // not belong to ca.pem, or a bundle without its root, fails here).
        let dir = tempfile::tempdir().map_err(|e| bad("check", &e))?;
        for (name, text) in [
            ("ca.pem", &self.ca_pem),
            ("ca.key", &self.ca_key),
            ("chain.pem", &self.chain_pem),
            ("bundle.pem", &self.bundle_pem),
        ] {
            std::fs::write(dir.path().join(name), text).map_err(|e| bad("check", &e))?;
        }
        let ca =
            fedmesh_trust::CertificateAuthority::load(dir.path()).map_err(|e| bad("dir", &e))?;
        let probe = td.system_id("install-check");
        let svid = ca
            .issue(&probe, std::time::Duration::from_secs(60))
            .map_err(|e| bad("ca.key", &e))?;
        let bundles = fedmesh_trust::TrustBundles::new().with(bundle.clone());
        fedmesh_trust::verify_svid(
            &bundles,
            svid.chain(),
            std::time::SystemTime::now(),
            fedmesh_trust::Usage::Client,
        )
        .map_err(|e| bad("ca.key", &format!("does not sign for bundle.pem ({e})")))?;
        Ok(bundle.fingerprint())
    }
}

/// A peer's root bundle (PEM): its roots must name `cluster`'s trust
/// domain; returns that trust domain.
pub fn check_peer_bundle(cluster: &str, pem: &str) -> Result<String, Problem> {
    let bad = |e: &dyn std::fmt::Display| Problem::Other(format!("peer `{cluster}` bundle: {e}"));
    let certs = fedmesh_trust::pem::decode_certs(pem).map_err(|e| bad(&e))?;
    let first = certs.first().ok_or_else(|| bad(&"no certificate"))?;
    let td = fedmesh_trust::svid::inspect_ca(first).map_err(|e| bad(&e))?;
    fedmesh_trust::TrustBundle::from_pem(td.clone(), pem).map_err(|e| bad(&e))?;
    Ok(td.to_string())
}
