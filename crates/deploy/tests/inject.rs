//! `inject`/`uninject` on inputs shaped like real ones.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use fedmesh_deploy::inject::{
    self, InjectError, InjectOptions, Outcome, IDENTITY_CONTAINER, INIT_CONTAINER, PROXY_CONTAINER,
};
use fedmesh_deploy::parse_documents;
use serde_yaml_ng::Value;

fn opts() -> InjectOptions {
    InjectOptions {
        image: "fedmesh:dev".into(),
        pull_policy: "IfNotPresent".into(),
        cluster: "east".into(),
        bundle_pem: "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n".into(),
        trust_domain: "east.acme".into(),
        skip_outbound_ports: vec![5432],
        skip_outbound_cidrs: vec!["169.254.169.254/32".into()],
    }
}

const MIXED: &str = r#"
# A typical app file: comments, a Service, a Deployment with a log
# shipper sidecar and an init container, a StatefulSet, a bare Pod.
apiVersion: v1
kind: Service
metadata: { name: web, namespace: shop }
spec:
  selector: { app: web }
  ports: [{ port: 80, targetPort: 8080 }]
---
apiVersion: apps/v1
kind: Deployment
metadata: { name: web, namespace: shop }
spec:
  replicas: 3
  selector: { matchLabels: { app: web } }
  template:
    metadata:
      labels: { app: web }
      annotations: { team: checkout }
    spec:
      initContainers:
        - { name: migrate, image: "shop/migrate:1" }
      containers:
        - name: web
          image: shop/web:1
          ports: [{ containerPort: 8080 }, { containerPort: 9090, name: metrics }, { containerPort: 53, protocol: UDP }]
        - { name: fluent-bit, image: "fluent/fluent-bit:3" }
---
apiVersion: apps/v1
kind: StatefulSet
metadata: { name: db, namespace: shop }
spec:
  serviceName: db
  selector: { matchLabels: { app: db } }
  template:
    metadata: { labels: { app: db } }
    spec:
      containers: [{ name: pg, image: "postgres:17" }]
---
---
apiVersion: v1
kind: Pod
metadata: { name: debug, namespace: shop }
spec:
  containers: [{ name: sh, image: busybox }]
---
apiVersion: batch/v1
kind: CronJob
metadata: { name: report, namespace: shop }
spec:
  schedule: "0 * * * *"
  jobTemplate:
    spec:
      template:
        spec:
          restartPolicy: Never
          containers: [{ name: r, image: "shop/report:1" }]
"#;

fn pod_specs(docs: &[Value]) -> Vec<(String, Value)> {
    docs.iter()
        .filter_map(|d| {
            let kind = d["kind"].as_str()?.to_owned();
            let spec = match kind.as_str() {
                "Pod" => d.get("spec"),
                "CronJob" => d["spec"]["jobTemplate"]["spec"]["template"].get("spec"),
                "Service" => None,
                _ => d["spec"]["template"].get("spec"),
            }?;
            Some((kind, spec.clone()))
        })
        .collect()
}

fn names(spec: &Value, field: &str) -> Vec<String> {
    spec.get(field)
        .and_then(Value::as_sequence)
        .map(|s| {
            s.iter()
                .map(|c| c["name"].as_str().unwrap().to_owned())
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn every_workload_kind_gets_the_proxy_first_and_others_pass_through() {
    let (out, reports) = inject::inject(MIXED, &opts()).unwrap();
    let docs = parse_documents(&out).unwrap();
    assert_eq!(docs.len(), 5, "the empty document is dropped, nothing else");
    for (kind, spec) in pod_specs(&docs) {
        assert_eq!(names(&spec, "containers")[0], PROXY_CONTAINER, "{kind}");
        assert_eq!(names(&spec, "initContainers")[0], INIT_CONTAINER, "{kind}");
    }
    let web = &pod_specs(&docs)[0].1;
    // The app's own sidecar and init container are kept, in order.
    assert_eq!(
        names(web, "containers"),
        [PROXY_CONTAINER, "web", "fluent-bit"]
    );
    assert_eq!(
        names(web, "initContainers"),
        [INIT_CONTAINER, IDENTITY_CONTAINER, "migrate"]
    );
    // The identity init container asks for the pod's own SPIFFE ID with
    // its service account token; the bundle travels on the template.
    let id_args: Vec<&str> = web["initContainers"][1]["args"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap())
        .collect();
    assert!(id_args.contains(
        &"spiffe://$(FEDMESH_TRUST_DOMAIN)/ns/$(POD_NAMESPACE)/sa/$(POD_SERVICE_ACCOUNT)"
    ));
    assert!(id_args.contains(&"--k8s-token-file"));
    assert!(
        docs[1]["spec"]["template"]["metadata"]["annotations"]["fedmesh.io/trust-bundle"]
            .as_str()
            .unwrap()
            .starts_with("-----BEGIN CERTIFICATE-----")
    );
    // The redirect knows the skipped ports; the proxy the app's TCP ports.
    let args: Vec<&str> = web["initContainers"][0]["args"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap())
        .collect();
    assert!(
        args.windows(2).any(|w| w == ["--skip-ports", "5432"]),
        "{args:?}"
    );
    assert!(
        args.windows(2)
            .any(|w| w == ["--skip-cidrs", "169.254.169.254/32"]),
        "{args:?}"
    );
    let env = &web["containers"][0]["env"];
    let app_ports = env
        .as_sequence()
        .unwrap()
        .iter()
        .find(|e| e["name"] == "FEDMESH_APP_PORTS")
        .unwrap();
    assert_eq!(app_ports["value"], "8080,9090");
    // The template's existing annotations stay; ours is added.
    assert_eq!(
        docs[1]["spec"]["template"]["metadata"]["annotations"]["team"],
        "checkout"
    );
    let outcomes: Vec<_> = reports
        .iter()
        .map(|r| (r.kind.as_str(), r.outcome.clone()))
        .collect();
    assert_eq!(
        outcomes,
        [
            ("Service", Outcome::NotAWorkload),
            ("Deployment", Outcome::Injected),
            ("StatefulSet", Outcome::Injected),
            ("Pod", Outcome::Injected),
            ("CronJob", Outcome::Injected),
        ]
    );
}

#[test]
fn injecting_twice_changes_nothing_and_uninject_gives_the_input_back() {
    let (once, _) = inject::inject(MIXED, &opts()).unwrap();
    let (twice, reports) = inject::inject(&once, &opts()).unwrap();
    assert_eq!(once, twice);
    assert!(reports
        .iter()
        .all(|r| matches!(r.outcome, Outcome::Unchanged | Outcome::NotAWorkload)));
    let (back, _) = inject::uninject(&once).unwrap();
    assert_eq!(
        parse_documents(&back).unwrap(),
        parse_documents(MIXED).unwrap()
    );
    // Uninjecting what was never injected changes nothing either.
    let (same, reports) = inject::uninject(MIXED).unwrap();
    assert_eq!(
        parse_documents(&same).unwrap(),
        parse_documents(MIXED).unwrap()
    );
    assert!(reports.iter().all(|r| r.outcome != Outcome::Uninjected));
}

#[test]
fn lists_opt_outs_and_host_network() {
    let input = r#"
apiVersion: v1
kind: List
items:
  - apiVersion: apps/v1
    kind: DaemonSet
    metadata: { name: agent }
    spec:
      selector: { matchLabels: { a: b } }
      template:
        metadata: { labels: { a: b } }
        spec:
          hostNetwork: true
          containers: [{ name: agent, image: agent }]
  - apiVersion: apps/v1
    kind: Deployment
    metadata: { name: legacy }
    spec:
      selector: { matchLabels: { a: c } }
      template:
        metadata: { labels: { a: c }, annotations: { fedmesh.io/inject: disabled } }
        spec:
          containers: [{ name: legacy, image: legacy }]
  - apiVersion: apps/v1
    kind: ReplicaSet
    metadata: { name: rs }
    spec:
      selector: { matchLabels: { a: d } }
      template:
        spec:
          containers: [{ name: x, image: x }]
"#;
    let (out, reports) = inject::inject(input, &opts()).unwrap();
    let outcomes: Vec<_> = reports.iter().map(|r| r.outcome.clone()).collect();
    assert_eq!(
        outcomes,
        [
            Outcome::Skipped("host network"),
            Outcome::Skipped("fedmesh.io/inject: disabled"),
            Outcome::Injected
        ]
    );
    let docs = parse_documents(&out).unwrap();
    let rs = &docs[0]["items"][2];
    // A template without metadata gets one for the status annotation...
    assert!(
        rs["spec"]["template"]["metadata"]["annotations"]["fedmesh.io/inject-status"].is_string()
    );
    // ...and loses it again on uninject.
    let (back, _) = inject::uninject(&out).unwrap();
    assert_eq!(
        parse_documents(&back).unwrap(),
        parse_documents(input).unwrap()
    );
}

#[test]
fn bad_input_is_refused_whole_with_the_document_named() {
    let good = "apiVersion: v1\nkind: Pod\nmetadata: { name: ok }\nspec: { containers: [{ name: a, image: a }] }\n";
    let cases: &[(&str, &str)] = &[
        ("key: [unclosed", "document 1: not YAML"),
        ("- just\n- a list\n", "document 1: not a Kubernetes object (not a mapping)"),
        ("metadata: { name: x }\n", "not a Kubernetes object (no kind)"),
        ("kind: Pod\nmetadata: { name: x }\n", "no apiVersion"),
        ("apiVersion: v1\nkind: Pod\nmetadata: { name: empty }\nspec: { containers: [] }\n", "document 1 (Pod empty): no containers"),
        ("apiVersion: apps/v1\nkind: Deployment\nmetadata: { name: d }\nspec: { template: { spec: {} } }\n", "document 1 (Deployment d): no containers"),
        ("apiVersion: v1\nkind: Pod\nmetadata: { name: nospec }\n", "no pod spec"),
        ("apiVersion: argoproj.io/v1alpha1\nkind: Rollout\nmetadata: { name: r }\nspec: { template: { spec: { containers: [{ name: a, image: a }] } } }\n", "unknown workload kind with a pod template"),
        ("apiVersion: v1\nkind: Pod\nmetadata: { name: meshed }\nspec: { containers: [{ name: app, image: a }, { name: istio-proxy, image: i }] }\n", "another mesh's proxy `istio-proxy`"),
        ("apiVersion: v1\nkind: Pod\nmetadata: { name: anon }\nspec: { containers: [{ image: a }] }\n", "container 1 has no name"),
    ];
    for (bad, want) in cases {
        // The bad document comes second: the good first one must not be
        // emitted on its own.
        let input = format!("{good}---\n{bad}");
        let e = inject::inject(&input, &opts()).unwrap_err();
        let msg = e.to_string().replace("document 2", "document 1");
        assert!(msg.contains(want), "wanted `{want}`, got `{e}`");
        assert!(!matches!(e, InjectError::Yaml(_)) || want.contains("YAML"));
    }
}
