//! Writing the controller's Multi-Cluster Services view back to the API
//! server: a ServiceImport per import (this cluster's own exports
//! included), deleted when the import goes away, and the `Valid`, `Ready`
//! and `Conflict` conditions of every ServiceExport.
//!
//! Level-driven against what the API server holds: ServiceImports are
//! watched (and ServiceExports' status comes from the source's watch), so
//! an object edited by hand is put back, and a restart that changes
//! nothing writes nothing. A condition's `lastTransitionTime` changes only
//! when its status does. After a write, an object is not judged again
//! until the watch shows that write (or anything newer), so one change
//! costs one write.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use fedmesh_catalog::mcs::{conflict_reason, Conflict, Import, ServiceType, SessionAffinity};
use fedmesh_wire::ServiceName;
use kube::api::{Api, DeleteParams, Patch, PatchParams};
use kube::core::DynamicObject;
use kube::{Client, ResourceExt};
use serde_json::{json, Value};
use tokio::sync::{watch, Notify};
use tokio::task::JoinHandle;

use super::{
    lock, run_watcher, service_export_resource, service_import_resource, Caches, ExportCheck,
    KubeMetrics, SeenExports, FIELD_MANAGER, MANAGED_BY, MCS_API_VERSION,
};
use crate::app::AbortOnDrop;
use crate::clusterset::ClusterSetIps;
use crate::controller::McsView;

/// Longest condition message the API accepts.
const MAX_MESSAGE: usize = 32 * 1024;

/// The ServiceImport fedmesh writes for one import (server-side apply),
/// with the service's ClusterSet IPs (ignored for a Headless import).
pub fn service_import(name: &ServiceName, imp: &Import, ips: &[IpAddr]) -> Value {
    let mut labels = serde_json::Map::new();
    for (k, v) in &imp.meta.labels {
        labels.insert(k.clone(), v.clone().into());
    }
    labels.insert(MANAGED_BY.0.into(), MANAGED_BY.1.into());
    let mut metadata = json!({
        "name": name.name(),
        "namespace": name.namespace(),
        "labels": labels,
    });
    if !imp.meta.annotations.is_empty() {
        metadata["annotations"] = json!(imp.meta.annotations);
    }
    let ports: Vec<Value> = imp
        .ports
        .iter()
        .map(|p| {
            let mut o = json!({ "port": p.port, "protocol": p.protocol.as_k8s() });
            if !p.name.is_empty() {
                o["name"] = p.name.clone().into();
            }
            if let Some(a) = &p.app_protocol {
                o["appProtocol"] = a.clone().into();
            }
            o
        })
        .collect();
    let mut spec = json!({
        "type": match imp.service_type {
            ServiceType::ClusterSetIP => "ClusterSetIP",
            ServiceType::Headless => "Headless",
        },
        "ports": ports,
    });
    if imp.service_type == ServiceType::ClusterSetIP && !ips.is_empty() {
        spec["ips"] = json!(ips.iter().map(ToString::to_string).collect::<Vec<_>>());
        spec["ipFamilies"] = json!(ips
            .iter()
            .map(|ip| if ip.is_ipv4() { "IPv4" } else { "IPv6" })
            .collect::<Vec<_>>());
    }
    match imp.meta.session_affinity {
        SessionAffinity::None => spec["sessionAffinity"] = "None".into(),
        SessionAffinity::ClientIp { timeout_seconds } => {
            spec["sessionAffinity"] = "ClientIP".into();
            if let Some(t) = timeout_seconds {
                spec["sessionAffinityConfig"] = json!({ "clientIP": { "timeoutSeconds": t } });
            }
        }
    }
    json!({
        "apiVersion": MCS_API_VERSION,
        "kind": "ServiceImport",
        "metadata": metadata,
        "spec": spec,
        "status": {
            "clusters": imp.exporters.iter().map(|c| json!({ "cluster": c.as_str() })).collect::<Vec<_>>(),
        },
    })
}

/// One condition as fedmesh sets it, before its `lastTransitionTime`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Condition {
    pub type_: &'static str,
    pub status: &'static str,
    pub reason: String,
    pub message: String,
}

fn cond(type_: &'static str, status: &'static str, reason: &str, message: &str) -> Condition {
    let mut message = message.to_owned();
    if message.len() > MAX_MESSAGE {
        let mut end = MAX_MESSAGE - 3;
        while !message.is_char_boundary(end) {
            end -= 1;
        }
        message.truncate(end);
        message.push('…');
    }
    Condition {
        type_,
        status,
        reason: reason.to_owned(),
        message,
    }
}

/// fedmesh's own ServiceExport condition: whether the service has its
/// ClusterSet IPs (only with `clusterset_ips` configured).
pub const CLUSTERSET_IP_CONDITION: &str = "fedmesh.io/ClusterSetIP";

/// The condition types fedmesh owns on a ServiceExport.
const EXPORT_CONDITIONS: [&str; 4] = ["Valid", "Ready", "Conflict", CLUSTERSET_IP_CONDITION];

/// What a ClusterSetIP export's addresses are: assigned, or none free in
/// these CIDRs.
pub type IpState<'a> = Result<&'a [IpAddr], &'a [String]>;

/// A ServiceExport's conditions with mcs-api v1beta1's reasons: `Valid`
/// (`Valid`, or False with `NoService`, `InvalidServiceType`, ...),
/// `Ready` (`Exported` once the federation store holds the export,
/// `Pending` before, `Failed` for an invalid export) and `Conflict`
/// (`NoConflicts`, or the comma-joined reasons of its conflicts; only
/// once exported), and with `ip` fedmesh's `fedmesh.io/ClusterSetIP`
/// (`Allocated`, or False/`NoFreeAddress`). `None` when nothing should be
/// written yet.
pub fn export_conditions(
    check: &ExportCheck,
    published: bool,
    was_ready: bool,
    conflicts: Option<&Vec<Conflict>>,
    ip: Option<IpState<'_>>,
) -> Option<Vec<Condition>> {
    Some(match check {
        ExportCheck::Invalid { reason, message } => vec![
            cond("Valid", "False", reason, message),
            cond("Ready", "False", "Failed", "the export is not valid"),
        ],
        // Exported before (a restart, or the store briefly behind):
        // wait for the store rather than flap to Pending.
        ExportCheck::Valid if !published && was_ready => return None,
        ExportCheck::Valid if !published => vec![
            cond("Valid", "True", "Valid", ""),
            cond(
                "Ready",
                "False",
                "Pending",
                "waiting for the federation store",
            ),
        ],
        ExportCheck::Valid => {
            let conflict = match conflicts {
                Some(c) if !c.is_empty() => cond(
                    "Conflict",
                    "True",
                    &conflict_reason(c),
                    &c.iter()
                        .map(ToString::to_string)
                        .collect::<Vec<_>>()
                        .join("; "),
                ),
                _ => cond("Conflict", "False", "NoConflicts", ""),
            };
            let mut all = vec![
                cond("Valid", "True", "Valid", ""),
                cond("Ready", "True", "Exported", ""),
                conflict,
            ];
            match ip {
                Some(Ok(ips)) if !ips.is_empty() => all.push(cond(
                    CLUSTERSET_IP_CONDITION,
                    "True",
                    "Allocated",
                    &ips.iter()
                        .map(ToString::to_string)
                        .collect::<Vec<_>>()
                        .join(", "),
                )),
                Some(Err(cidrs)) => all.push(cond(
                    CLUSTERSET_IP_CONDITION,
                    "False",
                    "NoFreeAddress",
                    &format!("no free address in {}", cidrs.join(", ")),
                )),
                // Allocation under way: the condition comes with it.
                _ => {}
            }
            all
        }
    })
}

/// The conditions as sent: each keeps the `lastTransitionTime` it has in
/// `seen` while its status is the same, else gets `now`.
pub fn stamped(want: &[Condition], seen: &[Value], now: SystemTime) -> Vec<Value> {
    let now = humantime::format_rfc3339_seconds(now).to_string();
    want.iter()
        .map(|c| {
            let since = seen
                .iter()
                .find(|s| s["type"] == c.type_ && s["status"] == c.status)
                .and_then(|s| s["lastTransitionTime"].as_str())
                .unwrap_or(&now);
            json!({
                "type": c.type_,
                "status": c.status,
                "reason": c.reason,
                "message": c.message,
                "lastTransitionTime": since,
            })
        })
        .collect()
}

/// Whether `seen` holds exactly `sent` among the types fedmesh owns.
fn same_conditions(sent: &[Value], seen: &[Value]) -> bool {
    let ours = |v: &&Value| EXPORT_CONDITIONS.iter().any(|t| v["type"] == *t);
    let fields = |v: &Value| {
        ["type", "status", "reason", "message", "lastTransitionTime"]
            .map(|f| v[f].as_str().unwrap_or_default().to_owned())
    };
    let a: BTreeSet<_> = sent.iter().filter(ours).map(fields).collect();
    let b: BTreeSet<_> = seen.iter().filter(ours).map(fields).collect();
    a == b && seen.iter().filter(ours).count() == a.len()
}

/// Whether `have` holds everything `want` says: objects by key (extra
/// keys allowed: other field managers own them), anything else equal.
pub fn contains(have: &Value, want: &Value) -> bool {
    match (have, want) {
        (Value::Object(h), Value::Object(w)) => w
            .iter()
            .all(|(k, wv)| h.get(k).is_some_and(|hv| contains(hv, wv))),
        _ => have == want,
    }
}

/// A write not yet seen through the watch: the object's resourceVersion
/// before it and the one the API server answered with.
#[derive(Debug, Clone)]
struct Pending {
    before: Option<String>,
    after: Option<String>,
}

impl Pending {
    /// Whether the watch shows the write (or something after it).
    /// resourceVersions are compared as numbers when both are (they are
    /// etcd revisions on every API server fedmesh knows); otherwise any
    /// change from `before` counts.
    fn seen_at(&self, now: Option<&str>) -> bool {
        let num = |s: Option<&str>| s.and_then(|s| s.parse::<u64>().ok());
        match (num(self.after.as_deref()), num(now)) {
            (Some(after), Some(now)) => now >= after,
            _ => now != self.before.as_deref(),
        }
    }
}

#[derive(Default)]
struct State {
    import_pending: BTreeMap<String, Pending>,
    /// The object last applied (or found in place) per import, and the
    /// resourceVersion it was last seen in place at: a change of it is
    /// written even when the old object still "contains" the new one (a
    /// label no longer exported), and an object still at that version is
    /// not serialized and compared again.
    import_applied: BTreeMap<String, (Option<String>, Value)>,
    export_pending: BTreeMap<(String, String), Pending>,
    /// Conditions sent, for sources that do not read ServiceExports.
    export_sent: BTreeMap<(String, String), Vec<Value>>,
}

/// Writes the controller's MCS view back. `exports` is every
/// ServiceExport the source knows with its check. Retries a failed write
/// on the next change or after `retry`.
pub fn write_back(
    client: Client,
    mut mcs: watch::Receiver<Arc<McsView>>,
    mut exports: watch::Receiver<Arc<SeenExports>>,
    mut ips: Option<watch::Receiver<Arc<ClusterSetIps>>>,
    metrics: KubeMetrics,
    retry: Duration,
) -> JoinHandle<()> {
    tokio::spawn(async move {
        let caches = Arc::new(Mutex::new(Caches::default()));
        let changed = Arc::new(Notify::new());
        let watcher = tokio::spawn(run_watcher(
            Api::<DynamicObject>::all_with(client.clone(), &service_import_resource()),
            "serviceimport",
            caches.clone(),
            |c| &mut c.imports,
            changed.clone(),
            metrics.clone(),
        ));
        let _stop = AbortOnDrop(watcher);
        let mut st = State::default();
        loop {
            let view = mcs.borrow_and_update().clone();
            let seen = exports.borrow_and_update().clone();
            // Without allocation configured, no service has ClusterSet IPs.
            let addrs = match &mut ips {
                Some(rx) => rx.borrow_and_update().clone(),
                None => Arc::new(ClusterSetIps {
                    synced: true,
                    ..ClusterSetIps::default()
                }),
            };
            let observed = {
                let c = lock(&caches);
                c.imports.synced.then(|| c.imports.live.clone())
            };
            let mut failed = false;
            if let (Some(observed), true, true) = (&observed, view.computed, addrs.synced) {
                let known = Known {
                    view: &view,
                    exports: &seen,
                    ips: &addrs,
                    allocating: ips.is_some(),
                };
                failed |= !sync_imports(&client, &known, observed, &mut st, &metrics).await;
                failed |= !sync_exports(&client, &known, &mut st, &metrics).await;
            }
            let wait = async {
                let ips_changed = async {
                    match &mut ips {
                        Some(rx) => rx.changed().await.is_ok(),
                        None => std::future::pending().await,
                    }
                };
                tokio::select! {
                    r = mcs.changed() => r.is_ok(),
                    r = exports.changed() => r.is_ok(),
                    r = ips_changed => r,
                    () = changed.notified() => true,
                }
            };
            if failed {
                let _ = tokio::time::timeout(retry, wait).await;
            } else if !wait.await {
                return;
            }
        }
    })
}

fn rv(o: &DynamicObject) -> Option<String> {
    o.metadata.resource_version.clone()
}

/// What the write-back knows at one pass.
struct Known<'a> {
    view: &'a McsView,
    exports: &'a SeenExports,
    ips: &'a ClusterSetIps,
    /// `clusterset_ips` is configured.
    allocating: bool,
}

/// Returns false if any write failed (it is retried later).
async fn sync_imports(
    client: &Client,
    known: &Known<'_>,
    observed: &BTreeMap<String, DynamicObject>,
    st: &mut State,
    metrics: &KubeMetrics,
) -> bool {
    let (view, exports) = (known.view, known.exports);
    let mut ok = true;
    let mut want = BTreeSet::new();
    // This cluster exports these, but the store does not show it yet (a
    // restart, or an export a moment old): their ServiceImports would
    // lack this cluster, so they are left as they are until it does.
    let awaiting: BTreeSet<String> = exports
        .iter()
        .filter(|(_, e)| e.check == ExportCheck::Valid)
        .filter(|((ns, name), _)| {
            ServiceName::new(name, ns).is_ok_and(|s| !view.published.contains(&s))
        })
        .map(|((ns, name), _)| format!("{ns}/{name}"))
        .collect();
    for (name, imp) in &view.imports {
        let k = format!("{}/{}", name.namespace(), name.name());
        want.insert(k.clone());
        if awaiting.contains(&k) {
            continue;
        }
        let cur = observed.get(&k);
        let cur_rv = cur.and_then(rv);
        if let Some(p) = st.import_pending.get(&k) {
            if !p.seen_at(cur_rv.as_deref()) {
                continue;
            }
            st.import_pending.remove(&k);
        }
        let ips = known
            .ips
            .assigned
            .get(name)
            .map(Vec::as_slice)
            .unwrap_or(&[]);
        let obj = service_import(name, imp, ips);
        let applied = st.import_applied.get(&k);
        if applied.is_some_and(|(at, a)| at.is_some() && *at == cur_rv && *a == obj) {
            continue;
        }
        let holds = cur
            .and_then(|o| serde_json::to_value(o).ok())
            .is_some_and(|v| contains(&v, &obj));
        let moved = applied.is_some_and(|(_, a)| *a != obj);
        if holds && !moved {
            st.import_applied.insert(k, (cur_rv, obj));
            continue;
        }
        let api: Api<DynamicObject> =
            Api::namespaced_with(client.clone(), name.namespace(), &service_import_resource());
        let pp = PatchParams::apply(FIELD_MANAGER).force();
        let r = match api.patch(name.name(), &pp, &Patch::Apply(&obj)).await {
            Ok(_) => {
                api.patch_status(name.name(), &pp, &Patch::Apply(&obj))
                    .await
            }
            Err(e) => Err(e),
        };
        match r {
            Ok(answer) => {
                KubeMetrics::inc(&metrics.writes, "serviceimport", "apply");
                st.import_pending.insert(
                    k.clone(),
                    Pending {
                        before: cur_rv,
                        after: rv(&answer),
                    },
                );
                // Confirmed in place once the watch shows it.
                st.import_applied.insert(k, (None, obj));
            }
            Err(e) => {
                ok = false;
                tracing::warn!(service = %name, error = %e, "applying ServiceImport failed");
            }
        }
    }
    st.import_applied.retain(|k, _| want.contains(k));
    for (k, o) in observed {
        if want.contains(k)
            || o.labels().get(MANAGED_BY.0).map(String::as_str) != Some(MANAGED_BY.1)
        {
            continue;
        }
        if awaiting.contains(k) {
            continue;
        }
        let (ns, name) = k.split_once('/').unwrap_or_default();
        let cur_rv = rv(o);
        if let Some(p) = st.import_pending.get(k) {
            if !p.seen_at(cur_rv.as_deref()) {
                continue;
            }
        }
        let api: Api<DynamicObject> =
            Api::namespaced_with(client.clone(), ns, &service_import_resource());
        let r = match api.delete(name, &DeleteParams::default()).await {
            Err(kube::Error::Api(s)) if s.code == 404 => Ok(()),
            r => r.map(|_| ()),
        };
        match r {
            Ok(()) => {
                KubeMetrics::inc(&metrics.writes, "serviceimport", "delete");
                st.import_pending.insert(
                    k.clone(),
                    Pending {
                        before: cur_rv,
                        after: None,
                    },
                );
            }
            Err(e) => {
                ok = false;
                tracing::warn!(namespace = %ns, name = %name, error = %e, "deleting ServiceImport failed");
            }
        }
    }
    st.import_pending
        .retain(|k, _| want.contains(k) || observed.contains_key(k));
    ok
}

async fn sync_exports(
    client: &Client,
    known: &Known<'_>,
    st: &mut State,
    metrics: &KubeMetrics,
) -> bool {
    let (view, exports) = (known.view, known.exports);
    let mut ok = true;
    st.export_pending.retain(|k, _| exports.contains_key(k));
    st.export_sent.retain(|k, _| exports.contains_key(k));
    for (k, e) in exports {
        let cur_rv = e.seen.as_ref().map(|(rv, _)| rv.as_str());
        if let Some(p) = st.export_pending.get(k) {
            if !p.seen_at(cur_rv) {
                continue;
            }
            st.export_pending.remove(k);
        }
        let svc = ServiceName::new(&k.1, &k.0).ok();
        let published = svc.as_ref().is_some_and(|s| view.published.contains(s));
        let conflicts = svc.as_ref().and_then(|s| view.export_conflicts.get(s));
        let base: &[Value] = match &e.seen {
            Some((_, c)) => c,
            None => st.export_sent.get(k).map(Vec::as_slice).unwrap_or(&[]),
        };
        let was_ready = base
            .iter()
            .any(|c| c["type"] == "Ready" && c["status"] == "True");
        let clusterset_ip = svc.as_ref().filter(|s| {
            known.allocating
                && view
                    .imports
                    .get(*s)
                    .is_some_and(|i| i.service_type == ServiceType::ClusterSetIP)
        });
        let ip = clusterset_ip.map(|s| match known.ips.exhausted.get(s) {
            Some(cidrs) => Err(cidrs.as_slice()),
            None => Ok(known.ips.assigned.get(s).map(Vec::as_slice).unwrap_or(&[])),
        });
        let Some(want) = export_conditions(&e.check, published, was_ready, conflicts, ip) else {
            continue;
        };
        let sent = stamped(&want, base, SystemTime::now());
        if same_conditions(&sent, base) {
            continue;
        }
        let body = json!({
            "apiVersion": MCS_API_VERSION,
            "kind": "ServiceExport",
            "status": { "conditions": sent },
        });
        let api: Api<DynamicObject> =
            Api::namespaced_with(client.clone(), &k.0, &service_export_resource());
        let pp = PatchParams::apply(FIELD_MANAGER).force();
        match api.patch_status(&k.1, &pp, &Patch::Apply(&body)).await {
            Ok(answer) => {
                KubeMetrics::inc(&metrics.writes, "serviceexport", "status");
                if e.seen.is_some() {
                    st.export_pending.insert(
                        k.clone(),
                        Pending {
                            before: cur_rv.map(str::to_owned),
                            after: rv(&answer),
                        },
                    );
                }
                st.export_sent.insert(k.clone(), sent);
            }
            Err(e) => {
                ok = false;
                tracing::warn!(namespace = %k.0, name = %k.1, error = %e, "writing ServiceExport status failed");
            }
        }
    }
    ok
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(secs: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000 + secs)
    }

    #[test]
    fn a_condition_keeps_its_transition_time_while_its_status_holds() {
        let valid = export_conditions(&ExportCheck::Valid, true, false, None, None).unwrap();
        let first = stamped(&valid, &[], t(0));
        // Same conditions later: same times, nothing to write.
        let again = stamped(&valid, &first, t(60));
        assert_eq!(again, first);
        assert!(same_conditions(&again, &first));
        // A conflict appears: only Conflict's time moves.
        let c = vec![Conflict {
            kind: fedmesh_catalog::mcs::ConflictKind::Type,
            winner: "west".into(),
            loser: "east".into(),
        }];
        let conflicted =
            export_conditions(&ExportCheck::Valid, true, true, Some(&c), None).unwrap();
        let next = stamped(&conflicted, &first, t(120));
        assert!(!same_conditions(&next, &first));
        assert_eq!(next[0], first[0]);
        assert_eq!(next[1], first[1]);
        assert_eq!(next[2]["reason"], "TypeConflict");
        assert_eq!(
            next[2]["lastTransitionTime"],
            humantime::format_rfc3339_seconds(t(120)).to_string()
        );
        // A message change alone keeps the time (status unchanged).
        let other = vec![Conflict {
            kind: fedmesh_catalog::mcs::ConflictKind::Labels,
            ..c[0].clone()
        }];
        let relabelled =
            export_conditions(&ExportCheck::Valid, true, true, Some(&other), None).unwrap();
        let after = stamped(&relabelled, &next, t(180));
        assert_eq!(
            after[2]["lastTransitionTime"],
            next[2]["lastTransitionTime"]
        );
        assert_eq!(after[2]["reason"], "LabelsConflict");
    }

    #[test]
    fn a_clusterset_ip_export_says_whether_it_got_its_addresses() {
        let ips: Vec<IpAddr> = vec!["241.0.0.7".parse().unwrap(), "fd00:fe::7".parse().unwrap()];
        let c = export_conditions(&ExportCheck::Valid, true, true, None, Some(Ok(&ips))).unwrap();
        let ip = c
            .iter()
            .find(|c| c.type_ == CLUSTERSET_IP_CONDITION)
            .unwrap();
        assert_eq!((ip.status, ip.reason.as_str()), ("True", "Allocated"));
        assert_eq!(ip.message, "241.0.0.7, fd00:fe::7");
        let full = ["241.0.0.0/30".to_owned()];
        let c = export_conditions(&ExportCheck::Valid, true, true, None, Some(Err(&full))).unwrap();
        let ip = c
            .iter()
            .find(|c| c.type_ == CLUSTERSET_IP_CONDITION)
            .unwrap();
        assert_eq!((ip.status, ip.reason.as_str()), ("False", "NoFreeAddress"));
        assert!(ip.message.contains("241.0.0.0/30"));
        // Still allocating, or not configured: no condition yet.
        let c = export_conditions(&ExportCheck::Valid, true, true, None, Some(Ok(&[]))).unwrap();
        assert!(c.iter().all(|c| c.type_ != CLUSTERSET_IP_CONDITION));
        // Conditions of this type are fedmesh's to set and compare.
        let sent = stamped(
            &export_conditions(&ExportCheck::Valid, true, true, None, Some(Ok(&ips))).unwrap(),
            &[],
            t(0),
        );
        assert!(!same_conditions(&sent, &sent[..3]));
    }

    #[test]
    fn ready_waits_for_the_store_but_does_not_flap_back() {
        let pending = export_conditions(&ExportCheck::Valid, false, false, None, None).unwrap();
        assert_eq!(pending[1].reason, "Pending");
        assert_eq!(pending.len(), 2);
        assert!(export_conditions(&ExportCheck::Valid, false, true, None, None).is_none());
        let bad = ExportCheck::Invalid {
            reason: "NoService",
            message: "none".into(),
        };
        let c = export_conditions(&bad, true, true, None, None).unwrap();
        assert_eq!((c[0].status, c[0].reason.as_str()), ("False", "NoService"));
        assert_eq!((c[1].status, c[1].reason.as_str()), ("False", "Failed"));
    }

    #[test]
    fn other_managers_conditions_and_fields_are_left_alone() {
        let ours = stamped(
            &export_conditions(&ExportCheck::Valid, true, false, None, None).unwrap(),
            &[],
            t(0),
        );
        let mut seen = ours.clone();
        seen.push(json!({ "type": "Synced", "status": "True" }));
        assert!(same_conditions(&ours, &seen));
        seen.pop();
        seen.pop();
        assert!(!same_conditions(&ours, &seen));

        let have = json!({ "a": { "b": 1, "extra": 2 }, "l": [1, 2] });
        assert!(contains(&have, &json!({ "a": { "b": 1 } })));
        assert!(!contains(&have, &json!({ "a": { "b": 2 } })));
        assert!(!contains(&have, &json!({ "l": [1] })));
        assert!(!contains(&have, &json!({ "missing": 1 })));
    }

    #[test]
    fn a_write_is_seen_once_the_watch_reaches_its_version() {
        let p = Pending {
            before: Some("10".into()),
            after: Some("12".into()),
        };
        assert!(!p.seen_at(Some("10")));
        assert!(!p.seen_at(Some("11")));
        assert!(p.seen_at(Some("12")));
        assert!(p.seen_at(Some("40")));
        let opaque = Pending {
            before: Some("a".into()),
            after: Some("b".into()),
        };
        assert!(!opaque.seen_at(Some("a")));
        assert!(opaque.seen_at(Some("c")));
        let deleted = Pending {
            before: Some("10".into()),
            after: None,
        };
        assert!(!deleted.seen_at(Some("10")));
        assert!(deleted.seen_at(None));
    }
}
