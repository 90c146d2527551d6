//! The Multi-Cluster Services API as kubernetes-sigs/mcs-api's conformance
//! suite checks it (`conformance/service_import.go`, and the DNS specs
//! `clusterip_service_dns.go` and `headless_service_dns.go`), against two
//! `fedmesh controller` processes with the Kubernetes source, each with
//! its own API server stand-in, federated through a real etcd.
//!
//! Test names follow the specs they mirror; `docs/mcs.md` lists which
//! specs are covered and which are not yet. Cluster 0 (`east`) always
//! exports first (its ServiceExport is older), so its export wins
//! conflicts, as the spec's tests expect of the first cluster.
#![cfg(all(feature = "kube", feature = "etcd"))]
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::needless_range_loop)]

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use fedmesh_testkit::etcd::EtcdCluster;
use fedmesh_testkit::fake_kube::FakeKube;
use serde_json::{json, Value};

mod common;
use common::{bin, free_tcp, kubeconfig, p};

const SERVICES: &str = "/api/v1/services";
const SLICES: &str = "/apis/discovery.k8s.io/v1/endpointslices";
const EXPORTS: &str = "/apis/multicluster.x-k8s.io/v1beta1/serviceexports";
const IMPORTS: &str = "/apis/multicluster.x-k8s.io/v1beta1/serviceimports";
const NS: &str = "demo";
const HELLO: &str = "hello";
const CLUSTERS: [&str; 2] = ["east", "west"];
/// How long anything may take to show (the spec's tests allow minutes).
const WAIT: Duration = Duration::from_secs(20);

/// Two clusters: an API server stand-in and a controller process each,
/// one etcd between them.
struct ClusterSet {
    /// Runs the API server stand-ins.
    _rt: tokio::runtime::Runtime,
    _etcd: EtcdCluster,
    dir: tempfile::TempDir,
    fakes: Vec<FakeKube>,
    procs: Vec<Option<Child>>,
    /// Each controller's `clusterset.local` DNS server (UDP and TCP).
    dns: Vec<u16>,
}

impl Drop for ClusterSet {
    fn drop(&mut self) {
        for c in self.procs.iter_mut().flatten() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl ClusterSet {
    /// `None` (the test is skipped) only where etcd cannot be found
    /// outside CI; `scripts/test.sh` installs it.
    fn start(test: &str) -> Option<Self> {
        let etcd_bin = fedmesh_testkit::etcd::etcd_or_skip(test)?;
        let etcd = EtcdCluster::start(etcd_bin, 1).unwrap();
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        for c in CLUSTERS {
            common::ca_init(d, &format!("{c}-ca"), &format!("{c}.acme"));
        }
        common::pin_each_other(d, "east", "west");
        let mut fakes = Vec::new();
        let mut dns = Vec::new();
        for (i, c) in CLUSTERS.iter().enumerate() {
            let fake = rt.block_on(FakeKube::start()).unwrap();
            dns.push(common::free_udp_tcp().port());
            let cfg = format!(
                "cluster: {c}\ntrust_domain: {c}.acme\ngateways: [\"127.0.0.1:{gw}\"]\nlease_ttl: 2s\n\
                 store: {{ kind: etcd, endpoints: [{eps}] }}\nbundle: {bundle}\npins_dir: {pins}\n\
                 kubernetes: {{ inbound_port: 15006, write_back: true }}\nadmin: \"127.0.0.1:{admin}\"\n\
                 clusterset_ips: {{ cidrs: [\"241.0.0.0/24\", \"fd00:fe::/112\"] }}\n\
                 dns: {{ listen: \"127.0.0.1:{dns}\" }}\n",
                dns = dns[i],
                gw = 15443 + i,
                eps = etcd
                    .endpoints()
                    .iter()
                    .map(|e| format!("\"{e}\""))
                    .collect::<Vec<_>>()
                    .join(", "),
                bundle = p(&d.join(format!("{c}-ca/bundle.pem"))),
                pins = p(&d.join(format!("{c}-pins"))),
                admin = free_tcp().port(),
            );
            std::fs::write(d.join(format!("{c}.yaml")), cfg).unwrap();
            std::fs::create_dir_all(d.join(c)).unwrap();
            kubeconfig(&d.join(c), &fake.url());
            fakes.push(fake);
        }
        let mut set = ClusterSet {
            _rt: rt,
            _etcd: etcd,
            dir,
            fakes,
            procs: Vec::new(),
            dns,
        };
        for i in 0..CLUSTERS.len() {
            let child = set.spawn(i);
            set.procs.push(Some(child));
        }
        Some(set)
    }

    fn spawn(&self, i: usize) -> Child {
        let d = self.dir.path();
        let c = CLUSTERS[i];
        Command::new(bin())
            .args(["controller", "--config", &p(&d.join(format!("{c}.yaml")))])
            .env("KUBECONFIG", d.join(c).join("kubeconfig"))
            .env("FEDMESH_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap()
    }

    /// Kills cluster `i`'s controller and starts it again.
    fn restart(&mut self, i: usize) {
        if let Some(mut c) = self.procs[i].take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        self.procs[i] = Some(self.spawn(i));
    }

    fn fake(&self, i: usize) -> &FakeKube {
        &self.fakes[i]
    }

    /// The hello Service with `spec` (ports and whatever else) and one
    /// ready endpoint, in cluster `i`.
    fn deploy(&self, i: usize, spec: Value) {
        self.deploy_with(
            i,
            spec,
            json!([{ "addresses": [format!("10.{i}.1.5")], "conditions": { "ready": true } }]),
        );
    }

    /// [`ClusterSet::deploy`] with these EndpointSlice `endpoints`.
    fn deploy_with(&self, i: usize, spec: Value, endpoints: Value) {
        let mut full = json!({ "type": "ClusterIP", "clusterIP": format!("10.{i}.0.10"), "sessionAffinity": "None" });
        fedmesh_testkit::fake_kube::merge(&mut full, &spec);
        self.fake(i).put(
            SERVICES,
            json!({ "apiVersion": "v1", "kind": "Service",
                    "metadata": { "name": HELLO, "namespace": NS }, "spec": full }),
        );
        self.fake(i).put(
            SLICES,
            json!({ "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
                    "metadata": { "name": "hello-1", "namespace": NS,
                                  "labels": { "kubernetes.io/service-name": HELLO } },
                    "addressType": "IPv4",
                    "endpoints": endpoints }),
        );
    }

    /// A ServiceExport of hello in cluster `i` with `spec`; cluster 0's is
    /// the older.
    fn export(&self, i: usize, spec: Value) {
        self.fake(i).put(
            EXPORTS,
            json!({ "apiVersion": "multicluster.x-k8s.io/v1beta1", "kind": "ServiceExport",
                    "metadata": { "name": HELLO, "namespace": NS,
                                  "creationTimestamp": format!("2026-01-0{}T00:00:00Z", i + 1) },
                    "spec": spec }),
        );
    }

    fn unexport(&self, i: usize) {
        self.fake(i).delete(EXPORTS, NS, HELLO);
    }

    fn import(&self, i: usize) -> Option<Value> {
        self.fake(i).get(IMPORTS, NS, HELLO)
    }

    /// (status, reason) of hello's export condition `ty` in cluster `i`.
    fn condition(&self, i: usize, ty: &str) -> Option<(String, String)> {
        let e = self.fake(i).get(EXPORTS, NS, HELLO)?;
        let c = e["status"]["conditions"]
            .as_array()?
            .iter()
            .find(|c| c["type"] == ty)?
            .clone();
        Some((
            c["status"].as_str()?.to_owned(),
            c["reason"].as_str()?.to_owned(),
        ))
    }

    fn writes(&self, i: usize) -> usize {
        self.fake(i).writes().len()
    }
}

impl ClusterSet {
    /// Waits until `f` holds; panics with `what` after [`WAIT`].
    fn await_that(&self, what: &str, f: impl Fn(&Self) -> bool) -> Duration {
        let t = Instant::now();
        while !f(self) {
            assert!(t.elapsed() < WAIT, "not within {WAIT:?}: {what}");
            std::thread::sleep(Duration::from_millis(50));
        }
        t.elapsed()
    }

    /// Asserts `f` holds throughout `d`.
    fn ensure(&self, what: &str, d: Duration, f: impl Fn(&Self) -> bool) {
        let t = Instant::now();
        while t.elapsed() < d {
            assert!(f(self), "{what}");
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn await_import(&self, i: usize, what: &str, f: impl Fn(&Value) -> bool) -> Value {
        self.await_that(&format!("{}: {what}", CLUSTERS[i]), |s| {
            s.import(i).is_some_and(|o| f(&o))
        });
        self.import(i).unwrap()
    }

    fn await_no_import(&self, i: usize, what: &str) {
        self.await_that(&format!("{}: {what}", CLUSTERS[i]), |s| {
            s.import(i).is_none()
        });
    }

    fn await_condition(&self, i: usize, ty: &str, status: &str) -> String {
        self.await_that(
            &format!("{}: {ty}={status} on the ServiceExport", CLUSTERS[i]),
            |s| s.condition(i, ty).is_some_and(|c| c.0 == status),
        );
        self.condition(i, ty).unwrap().1
    }
}

/// hello's MCS name.
const NAME: &str = "hello.demo.svc.clusterset.local";

/// Whether `dig` (Debian's bind9-dnsutils, which `scripts/test.sh`
/// installs) is here; outside CI a test without it is skipped.
fn have_dig(test: &str) -> bool {
    let ok = Command::new("dig")
        .arg("-v")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !ok {
        assert!(
            std::env::var_os("CI").is_none(),
            "{test}: dig is missing (apt-get install bind9-dnsutils)"
        );
        eprintln!("{test}: skipped, dig is missing");
    }
    ok
}

impl ClusterSet {
    /// [`ClusterSet::start`] for a DNS test: `None` (skipped) also without
    /// `dig` outside CI.
    fn with_dig(test: &str) -> Option<Self> {
        if !have_dig(test) {
            return None;
        }
        Self::start(test)
    }

    /// `dig` against cluster `i`'s DNS server over UDP or TCP: the status
    /// (`NOERROR`, `NXDOMAIN`, ...; empty when nothing answered) and the
    /// answers as `TYPE DATA`.
    fn dig(&self, i: usize, name: &str, qtype: &str, tcp: bool) -> (String, Vec<String>) {
        let out = Command::new("dig")
            .arg("@127.0.0.1")
            .arg(format!("-p{}", self.dns[i]))
            .args(["+tries=1", "+time=2", "+noall", "+comments", "+answer"])
            .arg(if tcp { "+tcp" } else { "+notcp" })
            .args([name, qtype])
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        let status = text
            .split("status: ")
            .nth(1)
            .and_then(|r| r.split(',').next())
            .unwrap_or_default()
            .to_owned();
        let answers = text
            .lines()
            .filter(|l| !l.starts_with(';') && !l.trim().is_empty())
            .map(|l| l.split_whitespace().skip(3).collect::<Vec<_>>().join(" "))
            .collect();
        (status, answers)
    }

    /// Waits until cluster `i` answers `name`/`qtype` with `status` and
    /// `answers`, over UDP and over TCP.
    fn await_dns(&self, i: usize, name: &str, qtype: &str, status: &str, answers: &[String]) {
        for tcp in [false, true] {
            self.await_that(
                &format!(
                    "{}: {name} {qtype} (tcp: {tcp}) is {status} {answers:?}",
                    CLUSTERS[i]
                ),
                |s| {
                    let (st, mut got) = s.dig(i, name, qtype, tcp);
                    got.sort();
                    st == status && got == answers
                },
            );
        }
    }
}

fn hello_ports() -> Value {
    json!([{ "name": "tcp", "port": 42, "protocol": "TCP" },
           { "name": "udp", "port": 53, "protocol": "UDP" }])
}

/// Ports as the conformance suite compares them: sorted.
fn ports(o: &Value) -> Vec<Value> {
    let mut v = o["spec"]["ports"].as_array().cloned().unwrap_or_default();
    v.sort_by_key(|p| (p["name"].to_string(), p["port"].as_u64()));
    v
}

fn clusters(o: &Value) -> Vec<String> {
    o["status"]["clusters"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|c| c["cluster"].as_str().map(str::to_owned))
        .collect()
}

fn labels(o: &Value, field: &str) -> serde_json::Map<String, Value> {
    o["metadata"][field]
        .as_object()
        .cloned()
        .unwrap_or_default()
}

// ---- testGeneralServiceImport ----

#[test]
fn a_service_import_should_only_exist_as_long_as_there_is_at_least_one_exporting_cluster() {
    let Some(s) = ClusterSet::start("mcs_conformance") else {
        return;
    };
    s.deploy(0, json!({ "ports": hello_ports() }));
    s.export(0, json!({}));
    s.await_import(0, "the ServiceImport for cluster 0's own export", |_| true);
    s.deploy(1, json!({ "ports": hello_ports() }));
    s.export(1, json!({}));
    s.await_import(0, "both clusters in status.clusters", |o| {
        clusters(o) == ["east", "west"]
    });
    s.unexport(0);
    s.await_import(0, "only west left", |o| clusters(o) == ["west"]);
    s.ensure(
        "the ServiceImport no longer exists after unexporting on cluster 0 while still exported on cluster 1",
        Duration::from_secs(1),
        |s| s.import(0).is_some(),
    );
    s.unexport(1);
    s.await_no_import(
        0,
        "the ServiceImport still exists after unexporting on all clusters",
    );
    s.await_no_import(
        1,
        "the ServiceImport still exists after unexporting on all clusters",
    );
}

#[test]
fn only_labels_and_annotations_specified_as_exported_in_the_service_export_should_be_propagated_to_the_service_import(
) {
    let Some(s) = ClusterSet::start("mcs_conformance") else {
        return;
    };
    s.deploy(0, json!({ "ports": hello_ports() }));
    // The Service's own labels are not exported.
    let mut svc = s.fake(0).get(SERVICES, NS, HELLO).unwrap();
    svc["metadata"]["labels"] = json!({ "service-label": "true" });
    svc["metadata"]["annotations"] = json!({ "service-annotation": "true" });
    s.fake(0).put(SERVICES, svc);
    s.export(
        0,
        json!({ "exportedLabels": { "dummy-label": "true" },
                "exportedAnnotations": { "dummy-annotation": "true" } }),
    );
    for i in 0..2 {
        let o = s.await_import(i, "the exported labels", |o| {
            labels(o, "labels").contains_key("dummy-label")
        });
        assert_eq!(labels(&o, "labels")["dummy-label"], "true");
        assert_eq!(labels(&o, "annotations")["dummy-annotation"], "true");
        assert!(!labels(&o, "labels").contains_key("service-label"));
        assert!(!labels(&o, "annotations").contains_key("service-annotation"));
    }
}

#[test]
fn a_service_exported_on_two_clusters_with_conflicting_annotations_and_labels_should_apply_the_conflict_resolution_policy_and_report_a_conflict_condition_on_each_service_export(
) {
    let Some(s) = ClusterSet::start("mcs_conformance") else {
        return;
    };
    for i in 0..2 {
        s.deploy(i, json!({ "ports": hello_ports() }));
    }
    s.export(
        0,
        json!({ "exportedLabels": { "dummy-label": "true" },
                "exportedAnnotations": { "dummy-annotation": "true" } }),
    );
    s.export(
        1,
        json!({ "exportedLabels": { "dummy-label2": "true" },
                "exportedAnnotations": { "dummy-annotation2": "true" } }),
    );
    for i in 0..2 {
        let reason = s.await_condition(i, "Conflict", "True");
        assert_eq!(
            reason, "LabelsConflict,AnnotationsConflict",
            "{}",
            CLUSTERS[i]
        );
    }
    let o = s.await_import(0, "both exporters", |o| clusters(o).len() == 2);
    assert!(labels(&o, "labels").contains_key("dummy-label"));
    assert!(!labels(&o, "labels").contains_key("dummy-label2"));
    assert!(labels(&o, "annotations").contains_key("dummy-annotation"));
    assert!(!labels(&o, "annotations").contains_key("dummy-annotation2"));
}

// ---- testClusterIPServiceImport ----

#[test]
fn exporting_a_cluster_ip_service_should_create_a_cluster_set_ip_service_import_in_each_cluster_and_unexporting_should_delete_it(
) {
    let Some(s) = ClusterSet::start("mcs_conformance") else {
        return;
    };
    s.deploy(0, json!({ "ports": hello_ports() }));
    s.export(0, json!({}));
    for i in 0..2 {
        let o = s.await_import(i, "a ServiceImport", |o| clusters(o) == ["east"]);
        assert_eq!(o["spec"]["type"], "ClusterSetIP", "{}", CLUSTERS[i]);
    }
    assert_eq!(s.await_condition(0, "Valid", "True"), "Valid");
    assert_eq!(s.await_condition(0, "Ready", "True"), "Exported");
    assert_eq!(s.await_condition(0, "Conflict", "False"), "NoConflicts");
    s.unexport(0);
    for i in 0..2 {
        s.await_no_import(i, "the ServiceImport still exists after unexporting");
    }
}

#[test]
fn the_session_affinity_of_a_cluster_set_ip_service_import_should_match_the_exported_service() {
    let Some(s) = ClusterSet::start("mcs_conformance") else {
        return;
    };
    s.deploy(
        0,
        json!({ "ports": hello_ports(), "sessionAffinity": "ClientIP",
                "sessionAffinityConfig": { "clientIP": { "timeoutSeconds": 300 } } }),
    );
    s.export(0, json!({}));
    let o = s.await_import(0, "session affinity", |o| {
        o["spec"]["sessionAffinity"] == "ClientIP"
    });
    assert_eq!(
        o["spec"]["sessionAffinityConfig"],
        json!({ "clientIP": { "timeoutSeconds": 300 } })
    );
}

#[test]
fn an_ip_should_be_allocated_for_a_cluster_set_ip_service_import() {
    let Some(s) = ClusterSet::start("mcs_conformance") else {
        return;
    };
    s.deploy(0, json!({ "ports": hello_ports() }));
    s.export(0, json!({}));
    let o = s.await_import(0, "spec.ips", |o| !o["spec"]["ips"].is_null());
    let ips: Vec<std::net::IpAddr> = o["spec"]["ips"]
        .as_array()
        .unwrap()
        .iter()
        .map(|ip| ip.as_str().unwrap().parse().unwrap())
        .collect();
    assert_eq!(ips.len(), 2, "one per configured family: {ips:?}");
    assert!(ips[0].is_ipv4() && ips[1].is_ipv6());
    assert_eq!(o["spec"]["ipFamilies"], json!(["IPv4", "IPv6"]));
    // Every cluster gives the service the same addresses.
    s.await_import(1, "the same spec.ips", |p| {
        p["spec"]["ips"] == o["spec"]["ips"]
    });
    assert_eq!(
        s.await_condition(0, "fedmesh.io/ClusterSetIP", "True"),
        "Allocated"
    );
}

#[test]
fn the_ports_of_a_cluster_set_ip_service_import_should_match_those_of_the_exported_service() {
    let Some(s) = ClusterSet::start("mcs_conformance") else {
        return;
    };
    s.deploy(0, json!({ "ports": hello_ports() }));
    s.export(0, json!({}));
    let o = s.await_import(0, "ports", |o| !ports(o).is_empty());
    assert_eq!(ports(&o), hello_ports().as_array().unwrap().clone());
}

#[test]
fn a_cluster_ip_service_exported_on_two_clusters_should_expose_the_union_of_the_constituent_service_ports(
) {
    let Some(s) = ClusterSet::start("mcs_conformance") else {
        return;
    };
    s.deploy(0, json!({ "ports": hello_ports() }));
    let sctp = json!({ "name": "stcp", "port": 142, "protocol": "SCTP" });
    s.deploy(
        1,
        json!({ "ports": [hello_ports()[0].clone(), sctp.clone()] }),
    );
    s.export(0, json!({}));
    s.export(1, json!({}));
    let mut want = hello_ports().as_array().unwrap().clone();
    want.push(sctp);
    want.sort_by_key(|p| (p["name"].to_string(), p["port"].as_u64()));
    for i in 0..2 {
        let o = s.await_import(i, "the union of the ports", |o| ports(o).len() == 3);
        assert_eq!(ports(&o), want);
    }
    assert_eq!(s.await_condition(1, "Conflict", "False"), "NoConflicts");
}

#[test]
fn a_cluster_ip_service_exported_on_two_clusters_with_conflicting_ports_should_apply_the_conflict_resolution_policy_and_report_a_conflict_condition_on_each_service_export(
) {
    let Some(s) = ClusterSet::start("mcs_conformance") else {
        return;
    };
    s.deploy(0, json!({ "ports": hello_ports() }));
    let mut other = hello_ports()[0].clone();
    other["port"] = json!(43);
    s.deploy(1, json!({ "ports": [other] }));
    s.export(0, json!({}));
    s.export(1, json!({}));
    for i in 0..2 {
        assert_eq!(s.await_condition(i, "Conflict", "True"), "PortConflict");
    }
    for i in 0..2 {
        let o = s.await_import(i, "both exporters", |o| clusters(o).len() == 2);
        assert_eq!(
            ports(&o),
            hello_ports().as_array().unwrap().clone(),
            "the service ports were not resolved correctly"
        );
    }
}

// ---- testHeadlessServiceImport ----

#[test]
fn exporting_a_headless_service_should_create_a_headless_service_import_in_each_cluster_and_unexporting_should_delete_it(
) {
    let Some(s) = ClusterSet::start("mcs_conformance") else {
        return;
    };
    s.deploy(0, json!({ "ports": hello_ports(), "clusterIP": "None" }));
    s.export(0, json!({}));
    for i in 0..2 {
        let o = s.await_import(i, "a ServiceImport", |_| true);
        assert_eq!(o["spec"]["type"], "Headless", "{}", CLUSTERS[i]);
    }
    s.unexport(0);
    for i in 0..2 {
        s.await_no_import(i, "the ServiceImport still exists after unexporting");
    }
}

#[test]
fn no_cluster_set_ip_should_be_allocated_for_a_headless_service_import() {
    let Some(s) = ClusterSet::start("mcs_conformance") else {
        return;
    };
    s.deploy(0, json!({ "ports": hello_ports(), "clusterIP": "None" }));
    s.export(0, json!({}));
    s.await_import(0, "a ServiceImport", |_| true);
    s.ensure(
        "a Headless ServiceImport got IPs",
        Duration::from_secs(2),
        |s| s.import(0).is_some_and(|o| o["spec"]["ips"].is_null()),
    );
}

// ---- testExternalNameService ----

#[test]
fn exporting_an_external_name_service_should_set_the_service_export_valid_condition_to_false() {
    let Some(s) = ClusterSet::start("mcs_conformance") else {
        return;
    };
    s.deploy(
        0,
        json!({ "type": "ExternalName", "externalName": "example.com", "clusterIP": null }),
    );
    s.export(0, json!({}));
    assert_eq!(s.await_condition(0, "Valid", "False"), "InvalidServiceType");
    assert_eq!(s.await_condition(0, "Ready", "False"), "Failed");
    s.ensure(
        "the ServiceImport should not exist for an ExternalName service",
        Duration::from_secs(2),
        |s| s.import(0).is_none() && s.import(1).is_none(),
    );
}

// ---- testServiceTypeConflict ----

#[test]
fn a_service_exported_on_two_clusters_with_conflicting_headlessness_should_apply_the_conflict_resolution_policy_and_report_a_conflict_condition_on_the_service_export(
) {
    let Some(s) = ClusterSet::start("mcs_conformance") else {
        return;
    };
    s.deploy(0, json!({ "ports": hello_ports() }));
    s.deploy(1, json!({ "ports": hello_ports(), "clusterIP": "None" }));
    s.export(0, json!({}));
    s.export(1, json!({}));
    for i in 0..2 {
        assert_eq!(s.await_condition(i, "Conflict", "True"), "TypeConflict");
    }
    for i in 0..2 {
        // The losing cluster is not part of the import.
        let o = s.await_import(i, "a ServiceImport of east only", |o| {
            clusters(o) == ["east"]
        });
        assert_eq!(o["spec"]["type"], "ClusterSetIP", "{}", CLUSTERS[i]);
        s.ensure("west joined the import", Duration::from_millis(500), |s| {
            s.import(i).is_some_and(|o| clusters(&o) == ["east"])
        });
    }
}

// ---- beyond the conformance suite ----

#[test]
fn a_service_exported_on_two_clusters_with_conflicting_session_affinity_should_report_a_conflict_condition_on_each_service_export(
) {
    let Some(s) = ClusterSet::start("mcs_conformance") else {
        return;
    };
    let sticky = |t: u32| {
        json!({ "ports": hello_ports(), "sessionAffinity": "ClientIP",
                "sessionAffinityConfig": { "clientIP": { "timeoutSeconds": t } } })
    };
    s.deploy(0, sticky(300));
    s.deploy(1, json!({ "ports": hello_ports() }));
    s.export(0, json!({}));
    s.export(1, json!({}));
    for i in 0..2 {
        assert_eq!(
            s.await_condition(i, "Conflict", "True"),
            "SessionAffinityConflict"
        );
        let o = s.await_import(i, "both exporters", |o| clusters(o).len() == 2);
        assert_eq!(
            o["spec"]["sessionAffinity"], "ClientIP",
            "the oldest export's"
        );
    }
    // Both sticky, another timeout: the config conflicts.
    s.deploy(1, sticky(60));
    for i in 0..2 {
        s.await_that("SessionAffinityConfigConflict", |s| {
            s.condition(i, "Conflict")
                .is_some_and(|c| c.1 == "SessionAffinityConfigConflict")
        });
    }
    let o = s.import(1).unwrap();
    assert_eq!(
        o["spec"]["sessionAffinityConfig"]["clientIP"]["timeoutSeconds"],
        300
    );
    // Same everywhere: no conflict.
    s.deploy(1, sticky(300));
    for i in 0..2 {
        assert_eq!(s.await_condition(i, "Conflict", "False"), "NoConflicts");
    }
    // fedmesh routes from its own catalog: it writes no MCS EndpointSlices.
    for i in 0..2 {
        assert!(s
            .fake(i)
            .writes()
            .iter()
            .all(|w| w.path.contains("/multicluster.x-k8s.io/")));
    }
}

#[test]
fn a_service_export_without_a_service_is_not_valid_with_reason_no_service() {
    let Some(s) = ClusterSet::start("mcs_conformance") else {
        return;
    };
    s.export(0, json!({}));
    assert_eq!(s.await_condition(0, "Valid", "False"), "NoService");
    // The Service appears: the export becomes valid and is imported.
    s.deploy(0, json!({ "ports": hello_ports() }));
    assert_eq!(s.await_condition(0, "Valid", "True"), "Valid");
    s.await_import(1, "a ServiceImport", |_| true);
}

#[test]
fn a_restarted_controller_that_finds_nothing_changed_writes_nothing() {
    let Some(mut s) = ClusterSet::start("mcs_conformance") else {
        return;
    };
    for i in 0..2 {
        s.deploy(i, json!({ "ports": hello_ports() }));
        s.export(i, json!({}));
    }
    for i in 0..2 {
        s.await_import(i, "both exporters", |o| clusters(o).len() == 2);
        s.await_condition(i, "Conflict", "False");
    }
    // Settled: nothing more is written.
    std::thread::sleep(Duration::from_secs(1));
    let before = s.writes(0);
    let since: Vec<Value> = s.fake(0).get(EXPORTS, NS, HELLO).unwrap()["status"]["conditions"]
        .as_array()
        .unwrap()
        .clone();
    s.restart(0);
    // The restarted controller lists, computes and republishes.
    let reads = s.fake(0).requests().len();
    s.await_that("the restarted controller listed", |s| {
        s.fake(0).requests().len() > reads + 3
    });
    std::thread::sleep(Duration::from_secs(3));
    let extra: Vec<_> = s.fake(0).writes()[before..]
        .iter()
        .map(|w| format!("{} {}", w.method, w.path))
        .collect();
    assert!(
        extra.is_empty(),
        "a restart that changed nothing wrote: {extra:#?}"
    );
    let after = s.fake(0).get(EXPORTS, NS, HELLO).unwrap()["status"]["conditions"].clone();
    assert_eq!(after, json!(since), "lastTransitionTime moved");
    // And the clusters still see each other's exports.
    s.await_import(1, "both exporters", |o| clusters(o).len() == 2);
}

/// `clusterip_service_dns.go`: a ClusterSetIP service's MCS name resolves
/// to its ClusterSet IPs in every cluster, with SRV records for its named
/// ports.
#[test]
fn a_cluster_set_ip_service_should_be_resolvable_by_its_clusterset_local_name_in_every_cluster() {
    let Some(s) = ClusterSet::with_dig("mcs_conformance") else {
        return;
    };
    s.deploy(0, json!({ "ports": hello_ports() }));
    s.export(0, json!({}));
    let o = s.await_import(1, "two spec.ips", |o| {
        o["spec"]["ips"].as_array().is_some_and(|a| a.len() == 2)
    });
    let v4 = o["spec"]["ips"][0].as_str().unwrap().to_owned();
    let v6 = o["spec"]["ips"][1].as_str().unwrap().to_owned();
    // west does not serve hello; it resolves it all the same.
    for i in 0..2 {
        s.await_dns(i, NAME, "A", "NOERROR", &[format!("A {v4}")]);
        s.await_dns(i, NAME, "AAAA", "NOERROR", &[format!("AAAA {v6}")]);
    }
    s.await_dns(
        1,
        &format!("_tcp._tcp.{NAME}"),
        "SRV",
        "NOERROR",
        &[format!("SRV 0 100 42 {NAME}.")],
    );
    s.await_dns(
        1,
        &format!("_udp._udp.{NAME}"),
        "SRV",
        "NOERROR",
        &[format!("SRV 0 100 53 {NAME}.")],
    );
}

/// `connectivity.go`'s other half: a service that is not exported is not
/// resolvable anywhere; exporting makes it so, unexporting undoes it.
#[test]
fn a_service_that_is_not_exported_should_not_be_resolvable() {
    let Some(s) = ClusterSet::with_dig("mcs_conformance") else {
        return;
    };
    s.deploy(0, json!({ "ports": hello_ports() }));
    for i in 0..2 {
        s.await_dns(i, NAME, "A", "NXDOMAIN", &[]);
    }
    s.export(0, json!({}));
    let o = s.await_import(1, "spec.ips", |o| !o["spec"]["ips"].is_null());
    let v4 = o["spec"]["ips"][0].as_str().unwrap().to_owned();
    s.await_dns(1, NAME, "A", "NOERROR", &[format!("A {v4}")]);
    s.unexport(0);
    for i in 0..2 {
        s.await_dns(i, NAME, "A", "NXDOMAIN", &[]);
    }
}

/// The controller answers only `clusterset.local`: `cluster.local` stays
/// with the cluster's own DNS (which resolves only local services), and
/// anything else is refused rather than resolved.
#[test]
fn names_outside_clusterset_local_are_refused() {
    let Some(s) = ClusterSet::with_dig("mcs_conformance") else {
        return;
    };
    s.deploy(0, json!({ "ports": hello_ports() }));
    s.export(0, json!({}));
    s.await_import(0, "spec.ips", |o| !o["spec"]["ips"].is_null());
    for name in ["hello.demo.svc.cluster.local", "example.com"] {
        s.await_dns(0, name, "A", "REFUSED", &[]);
    }
}

// ---- headless_service_dns.go ----

/// A headless hello in cluster `i`: two ready pods of a StatefulSet
/// (`hello-0`, `hello-1`) when `stateful`, else of a Deployment (no
/// hostnames), and one that is not ready.
fn deploy_headless(s: &ClusterSet, i: usize, stateful: bool) -> Vec<String> {
    let ips: Vec<String> = (5..7).map(|h| format!("10.{i}.1.{h}")).collect();
    let mut endpoints: Vec<Value> = ips
        .iter()
        .enumerate()
        .map(|(n, ip)| {
            let mut e = json!({ "addresses": [ip], "conditions": { "ready": true } });
            if stateful {
                e["hostname"] = json!(format!("hello-{n}"));
            }
            e
        })
        .collect();
    endpoints
        .push(json!({ "addresses": [format!("10.{i}.1.9")], "conditions": { "ready": false } }));
    s.deploy_with(
        i,
        json!({ "ports": hello_ports(), "clusterIP": "None" }),
        Value::Array(endpoints),
    );
    s.export(i, json!({}));
    ips
}

/// "A DNS query of the <service>.<ns>.svc.clusterset.local domain for a
/// headless service should return the ready endpoint addresses of all the
/// backing pods", here of both clusters' pods.
#[test]
fn a_dns_query_of_a_headless_service_should_return_the_ready_endpoint_addresses_of_all_the_backing_pods(
) {
    let Some(s) = ClusterSet::with_dig("mcs_conformance") else {
        return;
    };
    let mut want = deploy_headless(&s, 0, false);
    for i in 0..2 {
        let a: Vec<String> = want.iter().map(|ip| format!("A {ip}")).collect();
        s.await_dns(i, NAME, "A", "NOERROR", &a);
    }
    // west exports it too: every cluster answers with both clusters' pods.
    want.extend(deploy_headless(&s, 1, false));
    want.sort();
    let a: Vec<String> = want.iter().map(|ip| format!("A {ip}")).collect();
    for i in 0..2 {
        s.await_dns(i, NAME, "A", "NOERROR", &a);
    }
    // No ready endpoint anywhere: NXDOMAIN.
    for i in 0..2 {
        s.deploy_with(
            i,
            json!({ "ports": hello_ports(), "clusterIP": "None" }),
            json!([{ "addresses": [format!("10.{i}.1.5")], "conditions": { "ready": false } }]),
        );
    }
    for i in 0..2 {
        s.await_dns(i, NAME, "A", "NXDOMAIN", &[]);
    }
}

/// "A DNS query of the <hostname>.<clusterid>.<service>.<ns>.svc.
/// clusterset.local domain for a headless StatefulSet service should
/// return the requested pod's endpoint address".
#[test]
fn a_dns_query_of_the_hostname_clusterid_domain_for_a_headless_stateful_set_service_should_return_the_requested_pods_endpoint_address(
) {
    let Some(s) = ClusterSet::with_dig("mcs_conformance") else {
        return;
    };
    let ips = deploy_headless(&s, 0, true);
    for i in 0..2 {
        for (n, ip) in ips.iter().enumerate() {
            let name = format!("hello-{n}.east.{NAME}");
            s.await_dns(i, &name, "A", "NOERROR", &[format!("A {ip}")]);
        }
        // Not a pod of west; no name that picks east's pods as a whole.
        s.await_dns(i, &format!("hello-0.west.{NAME}"), "A", "NXDOMAIN", &[]);
        s.await_dns(i, &format!("east.{NAME}"), "A", "NOERROR", &[]);
    }
}

/// "A DNS SRV query of the <service>.<ns>.svc.clusterset.local domain for
/// a headless service should return valid SRV records": one per ready
/// endpoint and named port, naming the endpoint (its hostname, or its
/// address with dashes).
#[test]
fn a_dns_srv_query_of_a_headless_service_should_return_valid_srv_records() {
    let Some(s) = ClusterSet::with_dig("mcs_conformance") else {
        return;
    };
    deploy_headless(&s, 0, true);
    deploy_headless(&s, 1, false);
    let want = [
        format!("SRV 0 100 42 10-1-1-5.west.{NAME}."),
        format!("SRV 0 100 42 10-1-1-6.west.{NAME}."),
        format!("SRV 0 100 42 hello-0.east.{NAME}."),
        format!("SRV 0 100 42 hello-1.east.{NAME}."),
    ];
    for i in 0..2 {
        s.await_dns(i, &format!("_tcp._tcp.{NAME}"), "SRV", "NOERROR", &want);
    }
    s.await_dns(
        1,
        &format!("10-1-1-6.west.{NAME}"),
        "A",
        "NOERROR",
        &["A 10.1.1.6".to_owned()],
    );
}
