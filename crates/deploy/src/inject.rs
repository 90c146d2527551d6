//! `fedmesh inject` / `uninject`: add the sidecar (and the init container
//! that redirects the pod's traffic through it) to every workload of a
//! multi-document YAML stream, or take them out again.
//!
//! All or nothing: every document is checked before any output is
//! produced, so a bad document never leaves half an output behind.
//! Injecting twice changes nothing; `uninject(inject(x))` gives `x` back
//! (as objects: comments and formatting of the input are not kept).

use serde_yaml_ng::{Mapping, Value};

use crate::{parse_documents, ports, to_documents, YamlError, PROXY_UID};

pub const PROXY_CONTAINER: &str = "fedmesh-proxy";
pub const INIT_CONTAINER: &str = "fedmesh-init";
/// Second init container: trades the pod's service account token for
/// its SVID (as the proxy's UID, so the redirect leaves it alone).
pub const IDENTITY_CONTAINER: &str = "fedmesh-identity";
/// The cluster's trust bundle on the pod template, projected into the
/// pod as a file (pods cannot mount fedmesh-system's ConfigMaps).
pub const BUNDLE_ANNOTATION: &str = "fedmesh.io/trust-bundle";
/// On the pod template of an injected workload: what injected it.
pub const STATUS_ANNOTATION: &str = "fedmesh.io/inject-status";
/// `disabled` on a pod template (or the object) skips it.
pub const INJECT_ANNOTATION: &str = "fedmesh.io/inject";
const VOLUMES: &[&str] = &["fedmesh-identity", "fedmesh-token", "fedmesh-bundle"];
/// Other meshes' proxies: two redirecting proxies in a pod break it.
const OTHER_MESHES: &[&str] = &["istio-proxy", "linkerd-proxy", "cilium-envoy"];

#[derive(Debug, Clone)]
pub struct InjectOptions {
    pub image: String,
    pub pull_policy: String,
    /// The cluster the pods run in (the controller refuses config for
    /// another).
    pub cluster: String,
    /// The cluster's trust bundle (PEM) and its trust domain.
    pub bundle_pem: String,
    pub trust_domain: String,
    /// Outbound destination ports left alone (e.g. a database reached
    /// outside the mesh).
    pub skip_outbound_ports: Vec<u16>,
    /// Outbound destination networks left alone (e.g. the cloud metadata
    /// address).
    pub skip_outbound_cidrs: Vec<String>,
}

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum InjectError {
    #[error(transparent)]
    Yaml(#[from] YamlError),
    #[error("document {doc}: not a Kubernetes object ({reason})")]
    NotAnObject { doc: usize, reason: &'static str },
    #[error("document {doc} ({kind} {name}): unknown workload kind with a pod template; fedmesh knows Pod, Deployment, StatefulSet, DaemonSet, ReplicaSet, Job, CronJob and List")]
    UnknownWorkload {
        doc: usize,
        kind: String,
        name: String,
    },
    #[error("document {doc} ({kind} {name}): {what}")]
    Workload {
        doc: usize,
        kind: String,
        name: String,
        what: String,
    },
}

/// What happened to each object, for the report on stderr.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Injected,
    Uninjected,
    /// Already injected, or nothing to remove.
    Unchanged,
    /// Not a workload (Service, ConfigMap, ...): passed through.
    NotAWorkload,
    /// Opted out, or host network.
    Skipped(&'static str),
}

#[derive(Debug, Clone)]
pub struct Report {
    pub kind: String,
    pub name: String,
    pub outcome: Outcome,
}

/// Where the pod spec of each kind lives.
fn pod_spec_path(kind: &str) -> Option<&'static [&'static str]> {
    Some(match kind {
        "Pod" => &["spec"],
        "Deployment"
        | "StatefulSet"
        | "DaemonSet"
        | "ReplicaSet"
        | "Job"
        | "ReplicationController" => &["spec", "template", "spec"],
        "CronJob" => &["spec", "jobTemplate", "spec", "template", "spec"],
        _ => return None,
    })
}

/// Where the annotations of the pods live (the template's, or the Pod's).
fn pod_meta_path(kind: &str) -> &'static [&'static str] {
    match kind {
        "Pod" => &["metadata"],
        "CronJob" => &["spec", "jobTemplate", "spec", "template", "metadata"],
        _ => &["spec", "template", "metadata"],
    }
}

fn get<'a>(v: &'a Value, path: &[&str]) -> Option<&'a Value> {
    path.iter().try_fold(v, |v, k| v.get(*k))
}

fn get_mut<'a>(v: &'a mut Value, path: &[&str]) -> Option<&'a mut Value> {
    path.iter().try_fold(v, |v, k| v.get_mut(*k))
}

/// The mapping at `path`, created (as empty mappings) if missing.
fn ensure_map<'a>(v: &'a mut Value, path: &[&str]) -> Option<&'a mut Mapping> {
    let mut cur = v;
    for k in path {
        let m = cur.as_mapping_mut()?;
        if !m.contains_key(*k) || m.get(*k).is_some_and(Value::is_null) {
            m.insert((*k).into(), Value::Mapping(Mapping::new()));
        }
        cur = m.get_mut(*k)?;
    }
    cur.as_mapping_mut()
}

fn name_of(v: &Value) -> String {
    get(v, &["metadata", "name"])
        .and_then(Value::as_str)
        .or_else(|| get(v, &["metadata", "generateName"]).and_then(Value::as_str))
        .unwrap_or("<unnamed>")
        .to_owned()
}

fn containers_named<'a>(spec: &'a Value, field: &str) -> impl Iterator<Item = &'a str> {
    spec.get(field)
        .and_then(Value::as_sequence)
        .into_iter()
        .flatten()
        .filter_map(|c| c.get("name").and_then(Value::as_str))
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Mode {
    Inject,
    Uninject,
}

/// Injects every workload in `text`; all or nothing.
pub fn inject(text: &str, opts: &InjectOptions) -> Result<(String, Vec<Report>), InjectError> {
    run(text, Mode::Inject, opts)
}

/// Removes what [`inject`] added; all or nothing.
pub fn uninject(text: &str) -> Result<(String, Vec<Report>), InjectError> {
    let opts = InjectOptions {
        image: String::new(),
        pull_policy: String::new(),
        cluster: String::new(),
        bundle_pem: String::new(),
        trust_domain: String::new(),
        skip_outbound_ports: Vec::new(),
        skip_outbound_cidrs: Vec::new(),
    };
    run(text, Mode::Uninject, &opts)
}

fn run(text: &str, mode: Mode, opts: &InjectOptions) -> Result<(String, Vec<Report>), InjectError> {
    let mut docs = parse_documents(text)?;
    let mut reports = Vec::new();
    for (i, doc) in docs.iter_mut().enumerate() {
        visit(doc, i + 1, mode, opts, &mut reports)?;
    }
    Ok((to_documents(&docs)?, reports))
}

fn visit(
    doc: &mut Value,
    n: usize,
    mode: Mode,
    opts: &InjectOptions,
    reports: &mut Vec<Report>,
) -> Result<(), InjectError> {
    if !doc.is_mapping() {
        return Err(InjectError::NotAnObject {
            doc: n,
            reason: "not a mapping",
        });
    }
    let kind = match doc.get("kind").and_then(Value::as_str) {
        Some(k) if !k.is_empty() => k.to_owned(),
        _ => {
            return Err(InjectError::NotAnObject {
                doc: n,
                reason: "no kind",
            })
        }
    };
    if doc.get("apiVersion").and_then(Value::as_str).is_none() {
        return Err(InjectError::NotAnObject {
            doc: n,
            reason: "no apiVersion",
        });
    }
    let name = name_of(doc);
    if kind == "List" || kind.ends_with("List") {
        let items = doc
            .get_mut("items")
            .and_then(Value::as_sequence_mut)
            .ok_or(InjectError::NotAnObject {
                doc: n,
                reason: "a List without items",
            })?;
        for item in items {
            visit(item, n, mode, opts, reports)?;
        }
        return Ok(());
    }
    let werr = |what: String| InjectError::Workload {
        doc: n,
        kind: kind.clone(),
        name: name.clone(),
        what,
    };
    let Some(path) = pod_spec_path(&kind) else {
        // A kind we do not know that carries a pod template would be
        // silently left without a sidecar: refuse it instead.
        if get(doc, &["spec", "template", "spec", "containers"]).is_some() {
            return Err(InjectError::UnknownWorkload { doc: n, kind, name });
        }
        reports.push(Report {
            kind,
            name,
            outcome: Outcome::NotAWorkload,
        });
        return Ok(());
    };
    let spec = get(doc, path)
        .filter(|s| s.is_mapping())
        .ok_or_else(|| werr("no pod spec".into()))?;
    let containers = spec
        .get("containers")
        .and_then(Value::as_sequence)
        .ok_or_else(|| werr("no containers".into()))?;
    if containers.is_empty() {
        return Err(werr("no containers".into()));
    }
    if let Some(c) = containers
        .iter()
        .position(|c| c.get("name").and_then(Value::as_str).is_none())
    {
        return Err(werr(format!("container {} has no name", c + 1)));
    }
    if let Some(other) = containers_named(spec, "containers").find(|c| OTHER_MESHES.contains(c)) {
        return Err(werr(format!(
            "already has another mesh's proxy `{other}`: remove that mesh's injection first"
        )));
    }
    let injected = containers_named(spec, "containers").any(|c| c == PROXY_CONTAINER)
        || containers_named(spec, "initContainers")
            .any(|c| c == INIT_CONTAINER || c == IDENTITY_CONTAINER);
    let outcome = match mode {
        Mode::Uninject if !injected => Outcome::Unchanged,
        Mode::Uninject => {
            remove(doc, &kind);
            Outcome::Uninjected
        }
        Mode::Inject if injected => Outcome::Unchanged,
        Mode::Inject => {
            let annotation = |p: &[&str]| {
                get(doc, p)
                    .and_then(|m| m.get("annotations"))
                    .and_then(|a| a.get(INJECT_ANNOTATION))
                    .and_then(Value::as_str)
                    == Some("disabled")
            };
            if annotation(pod_meta_path(&kind)) || annotation(&["metadata"]) {
                Outcome::Skipped("fedmesh.io/inject: disabled")
            } else if spec.get("hostNetwork").and_then(Value::as_bool) == Some(true) {
                // A redirect would capture the node's traffic.
                Outcome::Skipped("host network")
            } else {
                add(doc, &kind, opts).map_err(|w| werr(w.into()))?;
                Outcome::Injected
            }
        }
    };
    reports.push(Report {
        kind,
        name,
        outcome,
    });
    Ok(())
}

fn add(doc: &mut Value, kind: &str, opts: &InjectOptions) -> Result<(), &'static str> {
    let path = pod_spec_path(kind).ok_or("no pod spec")?;
    let spec = ensure_map(doc, path).ok_or("pod spec is not a mapping")?;
    let seq = |spec: &mut Mapping, key: &str| -> Result<(), &'static str> {
        match spec.get(key) {
            None | Some(Value::Null) => {
                spec.insert(key.into(), Value::Sequence(Vec::new()));
                Ok(())
            }
            Some(Value::Sequence(_)) => Ok(()),
            Some(_) => Err("containers, initContainers and volumes must be lists"),
        }
    };
    seq(spec, "initContainers")?;
    seq(spec, "volumes")?;
    let app_ports = app_ports(spec);
    if let Some(Value::Sequence(init)) = spec.get_mut("initContainers") {
        // First: the redirect must be in place before any other init
        // container makes a connection; then the identity.
        init.insert(0, identity_container(opts));
        init.insert(0, init_container(opts));
    }
    if let Some(Value::Sequence(cs)) = spec.get_mut("containers") {
        // First too: kubelet starts containers in order, so the proxy is
        // up before the app's first connection.
        cs.insert(0, proxy_container(opts, &app_ports));
    }
    if let Some(Value::Sequence(vs)) = spec.get_mut("volumes") {
        vs.extend(volumes());
    }
    let annotations = ensure_map(doc, &[pod_meta_path(kind), &["annotations"]].concat())
        .ok_or("pod metadata is not a mapping")?;
    annotations.insert(
        STATUS_ANNOTATION.into(),
        format!("injected by fedmesh {}", env!("CARGO_PKG_VERSION")).into(),
    );
    annotations.insert(BUNDLE_ANNOTATION.into(), opts.bundle_pem.clone().into());
    Ok(())
}

fn remove(doc: &mut Value, kind: &str) {
    let Some(path) = pod_spec_path(kind) else {
        return;
    };
    if let Some(spec) = get_mut(doc, path).and_then(Value::as_mapping_mut) {
        let drop_named = |spec: &mut Mapping, key: &str, names: &[&str]| {
            let empty = match spec.get_mut(key) {
                Some(Value::Sequence(s)) => {
                    s.retain(|c| {
                        !c.get("name")
                            .and_then(Value::as_str)
                            .is_some_and(|n| names.contains(&n))
                    });
                    s.is_empty()
                }
                _ => false,
            };
            // Inject created the list: leave none behind.
            if empty && key != "containers" {
                spec.remove(key);
            }
        };
        drop_named(
            spec,
            "initContainers",
            &[INIT_CONTAINER, IDENTITY_CONTAINER],
        );
        drop_named(spec, "containers", &[PROXY_CONTAINER]);
        drop_named(spec, "volumes", VOLUMES);
    }
    let meta = pod_meta_path(kind);
    if let Some(m) = get_mut(doc, meta).and_then(Value::as_mapping_mut) {
        let empty = match m.get_mut("annotations").and_then(Value::as_mapping_mut) {
            Some(a) => {
                a.remove(STATUS_ANNOTATION);
                a.remove(BUNDLE_ANNOTATION);
                a.is_empty()
            }
            None => false,
        };
        if empty {
            m.remove("annotations");
        }
        // Inject created the template metadata for the annotation.
        if m.is_empty() && kind != "Pod" {
            if let Some(parent) =
                get_mut(doc, &meta[..meta.len() - 1]).and_then(Value::as_mapping_mut)
            {
                parent.remove("metadata");
            }
        }
    }
}

/// The app's declared container ports: the sidecar's inbound listener
/// forwards to them.
fn app_ports(spec: &Mapping) -> Vec<u16> {
    let mut out: Vec<u16> = spec
        .get("containers")
        .and_then(Value::as_sequence)
        .into_iter()
        .flatten()
        .flat_map(|c| {
            c.get("ports")
                .and_then(Value::as_sequence)
                .into_iter()
                .flatten()
        })
        .filter(|p| {
            p.get("protocol")
                .and_then(Value::as_str)
                .is_none_or(|p| p == "TCP")
        })
        .filter_map(|p| p.get("containerPort").and_then(Value::as_u64))
        .filter_map(|p| u16::try_from(p).ok())
        .collect();
    out.sort_unstable();
    out.dedup();
    out
}

fn list_ports(ports: &[u16]) -> String {
    list(ports.iter().copied())
}

fn list(ports: impl IntoIterator<Item = u16>) -> String {
    ports
        .into_iter()
        .map(|p| p.to_string())
        .collect::<Vec<_>>()
        .join(",")
}

fn init_container(opts: &InjectOptions) -> Value {
    let mut args = vec![
        "redirect".to_string(),
        "--proxy-uid".into(),
        PROXY_UID.to_string(),
        "--outbound-port".into(),
        ports::SIDECAR_OUTBOUND.to_string(),
    ];
    if !opts.skip_outbound_ports.is_empty() {
        args.push("--skip-ports".into());
        args.push(list(opts.skip_outbound_ports.iter().copied()));
    }
    if !opts.skip_outbound_cidrs.is_empty() {
        args.push("--skip-cidrs".into());
        args.push(opts.skip_outbound_cidrs.join(","));
    }
    let v = serde_json::json!({
        "name": INIT_CONTAINER,
        "image": opts.image,
        "imagePullPolicy": opts.pull_policy,
        "args": args,
        // Only what writing nftables rules in the pod's own network
        // namespace needs; runs as root once, then exits.
        "securityContext": {
            "runAsUser": 0,
            "runAsNonRoot": false,
            "allowPrivilegeEscalation": false,
            "readOnlyRootFilesystem": true,
            "capabilities": { "drop": ["ALL"], "add": ["NET_ADMIN", "NET_RAW"] },
        },
        "resources": {
            "requests": { "cpu": "10m", "memory": "10Mi" },
            "limits": { "cpu": "100m", "memory": "50Mi" },
        },
    });
    serde_yaml_ng::to_value(v).unwrap_or(Value::Null)
}

fn env(opts: &InjectOptions) -> serde_json::Value {
    serde_json::json!([
        { "name": "POD_NAME", "valueFrom": { "fieldRef": { "fieldPath": "metadata.name" } } },
        { "name": "POD_NAMESPACE", "valueFrom": { "fieldRef": { "fieldPath": "metadata.namespace" } } },
        { "name": "POD_SERVICE_ACCOUNT", "valueFrom": { "fieldRef": { "fieldPath": "spec.serviceAccountName" } } },
        { "name": "FEDMESH_CLUSTER", "value": opts.cluster },
        { "name": "FEDMESH_TRUST_DOMAIN", "value": opts.trust_domain },
        { "name": "FEDMESH_CONTROLLER", "value": format!("fedmesh-controller.{}.svc:{}", crate::NAMESPACE, ports::CONTROLLER_API) },
    ])
}

fn proxy_security() -> serde_json::Value {
    serde_json::json!({
        "runAsUser": PROXY_UID,
        "runAsGroup": PROXY_UID,
        "runAsNonRoot": true,
        "allowPrivilegeEscalation": false,
        "readOnlyRootFilesystem": true,
        "capabilities": { "drop": ["ALL"] },
    })
}

fn identity_container(opts: &InjectOptions) -> Value {
    let v = serde_json::json!({
        "name": IDENTITY_CONTAINER,
        "image": opts.image,
        "imagePullPolicy": opts.pull_policy,
        // $(VAR) is expanded by the kubelet from `env`.
        "args": [
            "cert", "request",
            "--controller", "$(FEDMESH_CONTROLLER)",
            "--bundle", "/etc/fedmesh/bundle/bundle.pem",
            "--spiffe-id", "spiffe://$(FEDMESH_TRUST_DOMAIN)/ns/$(POD_NAMESPACE)/sa/$(POD_SERVICE_ACCOUNT)",
            "--k8s-token-file", "/var/run/secrets/fedmesh/token",
            "--out", "/var/run/fedmesh/identity",
        ],
        "env": env(opts),
        "securityContext": proxy_security(),
        "resources": {
            "requests": { "cpu": "10m", "memory": "16Mi" },
            "limits": { "cpu": "100m", "memory": "64Mi" },
        },
        "volumeMounts": [
            { "name": "fedmesh-identity", "mountPath": "/var/run/fedmesh/identity" },
            { "name": "fedmesh-bundle", "mountPath": "/etc/fedmesh/bundle", "readOnly": true },
            { "name": "fedmesh-token", "mountPath": "/var/run/secrets/fedmesh", "readOnly": true },
        ],
    });
    serde_yaml_ng::to_value(v).unwrap_or(Value::Null)
}

fn proxy_container(opts: &InjectOptions, app_ports: &[u16]) -> Value {
    let mut env = env(opts);
    if let Some(list) = env.as_array_mut() {
        list.push(
            serde_json::json!({ "name": "FEDMESH_APP_PORTS", "value": list_ports(app_ports) }),
        );
    }
    let v = serde_json::json!({
        "name": PROXY_CONTAINER,
        "image": opts.image,
        "imagePullPolicy": opts.pull_policy,
        "args": ["sidecar", "--kubernetes"],
        "env": env,
        "ports": [
            { "name": "fedmesh-in", "containerPort": ports::SIDECAR_INBOUND, "protocol": "TCP" },
            { "name": "fedmesh-admin", "containerPort": ports::SIDECAR_ADMIN, "protocol": "TCP" },
        ],
        "readinessProbe": { "httpGet": { "path": "/ready", "port": ports::SIDECAR_ADMIN }, "periodSeconds": 2 },
        "livenessProbe": { "httpGet": { "path": "/live", "port": ports::SIDECAR_ADMIN }, "periodSeconds": 10 },
        "resources": {
            "requests": { "cpu": "20m", "memory": "32Mi" },
            "limits": { "cpu": "1", "memory": "256Mi" },
        },
        "securityContext": proxy_security(),
        "volumeMounts": [
            { "name": "fedmesh-identity", "mountPath": "/var/run/fedmesh/identity" },
        ],
    });
    serde_yaml_ng::to_value(v).unwrap_or(Value::Null)
}

fn volumes() -> Vec<Value> {
    let v = serde_json::json!([
        // Written by the identity init container, rewritten at renewals.
        { "name": "fedmesh-identity", "emptyDir": { "medium": "Memory", "sizeLimit": "1Mi" } },
        { "name": "fedmesh-bundle", "downwardAPI": { "items": [
            { "path": "bundle.pem", "fieldRef": { "fieldPath": format!("metadata.annotations['{BUNDLE_ANNOTATION}']") } },
        ] } },
        // A token only the fedmesh controller accepts (audience), short-lived.
        { "name": "fedmesh-token", "projected": { "sources": [
            { "serviceAccountToken": { "audience": "fedmesh", "expirationSeconds": 3600, "path": "token" } },
        ] } },
    ]);
    match serde_yaml_ng::to_value(v) {
        Ok(Value::Sequence(s)) => s,
        _ => Vec::new(),
    }
}
