//! `fedmesh install`, `inject` and `uninject` as users call them: the
//! manifests must configure our own binaries correctly (their config maps
//! parse with the daemons' own config types) and pass the Kubernetes 1.33
//! schemas offline (`scripts/validate-manifests.py`, which needs the PyPI
//! packages `kubernetes-validate` and `jsonschema`: `scripts/test.sh`
//! installs them into a venv and points `FEDMESH_K8S_PYTHON` at it).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

fn fedmesh(args: &[&str], stdin: Option<&str>) -> Output {
    let mut c = Command::new(env!("CARGO_BIN_EXE_fedmesh"))
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run fedmesh");
    let mut input = c.stdin.take().unwrap();
    input.write_all(stdin.unwrap_or("").as_bytes()).unwrap();
    drop(input);
    c.wait_with_output().unwrap()
}

fn out(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn err(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn ca(dir: &Path, td: &str) -> PathBuf {
    let d = dir.join(td);
    let o = fedmesh(&["ca", "init", "--trust-domain", td, "--out", s(&d)], None);
    assert!(o.status.success(), "{}", err(&o));
    d
}

fn docs(yaml: &str) -> Vec<serde_json::Value> {
    serde_yaml_ng::Deserializer::from_str(yaml)
        .map(|d| serde::Deserialize::deserialize(d).unwrap())
        .filter(|v: &serde_json::Value| !v.is_null())
        .collect()
}

fn find<'a>(objs: &'a [serde_json::Value], kind: &str, name: &str) -> &'a serde_json::Value {
    objs.iter()
        .find(|o| o["kind"] == kind && o["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("no {kind}/{name}"))
}

/// Three shapes users run: a cloud load balancer with store TLS and two
/// peers, a kind NodePort, and the smallest ClusterIP install.
fn render_variants(dir: &Path) -> Vec<(PathBuf, String)> {
    let east = ca(dir, "east.acme");
    let west = ca(dir, "west.acme");
    let north = ca(dir, "north.acme");
    let tls = dir.join("etcd-ca.pem");
    std::fs::copy(east.join("ca.pem"), &tls).unwrap();
    let variants: Vec<Vec<String>> = vec![
        vec![
            "--cluster=east",
            "--trust-domain=east.acme",
            "--store=https://etcd-0.acme.net:2379,https://etcd-1.acme.net:2379",
            &format!("--store-ca={}", s(&tls)),
            &format!("--store-cert={}", s(&east.join("ca.pem"))),
            &format!("--store-key={}", s(&east.join("ca.key"))),
            &format!("--ca={}", s(&east)),
            // No --advertise: the controller follows the load balancer.
            "--gateway-annotation=service.beta.kubernetes.io/aws-load-balancer-type=nlb",
            &format!("--peer=west={}", s(&west.join("bundle.pem"))),
            &format!("--peer=north={}", s(&north.join("bundle.pem"))),
            "--image=registry.acme.net/fedmesh:v0.1.0",
            // ClusterSet IPs and DNS, CoreDNS configured by other means.
            "--clusterset-cidr=241.0.0.0/16",
            "--coredns-configmap=none",
        ]
        .into_iter()
        .map(String::from)
        .collect(),
        vec![
            "--cluster=west",
            "--trust-domain=west.acme",
            "--store=http://172.18.0.1:2379",
            &format!("--ca={}", s(&west)),
            "--advertise=172.18.0.3:30443",
            "--gateway-service-type=NodePort",
            "--node-ports=30443,30444",
            "--gateway-replicas=1",
            "--controller-replicas=1",
            "--image=fedmesh:dev",
            "--pull-policy=Never",
            // Dual-stack ClusterSet IPs; CoreDNS kept forwarding.
            "--clusterset-cidr=241.1.0.0/16",
            "--clusterset-cidr=fd00:fe:1::/112",
            // A drill API for the ops namespace's workloads.
            "--drill-operator=spiffe://west.acme/ns/ops/*",
        ]
        .into_iter()
        .map(String::from)
        .collect(),
        vec![
            "--cluster=north",
            "--trust-domain=north.acme",
            "--store=http://etcd.fedmesh:2379",
            &format!("--ca={}", s(&north)),
            "--advertise=10.0.0.5:15443",
            "--gateway-service-type=ClusterIP",
        ]
        .into_iter()
        .map(String::from)
        .collect(),
    ];
    variants
        .into_iter()
        .enumerate()
        .map(|(i, v)| {
            let mut args = vec!["install"];
            args.extend(v.iter().map(String::as_str));
            let o = fedmesh(&args, None);
            assert!(o.status.success(), "variant {i}: {}", err(&o));
            let path = dir.join(format!("install-{i}.yaml"));
            std::fs::write(&path, out(&o)).unwrap();
            (path, out(&o))
        })
        .collect()
}

#[test]
fn install_manifests_configure_our_binaries() {
    let dir = tempfile::tempdir().unwrap();
    for (path, yaml) in render_variants(dir.path()) {
        let objs = docs(&yaml);
        let cm = find(&objs, "ConfigMap", "fedmesh-controller");
        let text = cm["data"]["controller.yaml"].as_str().unwrap();
        let cfg: fedmesh_federation::config::ControllerConfig = serde_yaml_ng::from_str(text)
            .unwrap_or_else(|e| panic!("{}: controller.yaml: {e}\n{text}", path.display()));
        let k = cfg.kubernetes.as_ref().unwrap();
        assert!(cfg.api.is_some());
        // Advertised as given, or discovered from the LoadBalancer.
        match (cfg.gateways.len(), &k.gateway_service) {
            (1, None) => {}
            (0, Some(svc)) => assert_eq!(svc, "fedmesh-system/fedmesh-gateway"),
            other => panic!("{}: gateways {other:?}", path.display()),
        }
        // With ClusterSet IPs, the DNS server and its Service (the
        // leader's pod, port 53 over UDP and TCP), and CoreDNS's forward
        // unless turned off, with the right to keep that one ConfigMap.
        let dns_svc = objs
            .iter()
            .find(|o| o["kind"] == "Service" && o["metadata"]["name"] == "fedmesh-dns");
        let coredns_role = objs
            .iter()
            .find(|o| o["kind"] == "Role" && o["metadata"]["name"] == "fedmesh-coredns");
        match (&cfg.dns, &cfg.clusterset_ips) {
            (Some(dns), Some(_)) => {
                let svc = dns_svc.expect("a fedmesh-dns Service");
                assert_eq!(svc["spec"]["selector"]["fedmesh.io/leader"], "true");
                let ports: Vec<_> = svc["spec"]["ports"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|p| {
                        (
                            p["port"].as_u64().unwrap(),
                            p["protocol"].as_str().unwrap().to_owned(),
                        )
                    })
                    .collect();
                assert_eq!(ports, [(53, "UDP".to_owned()), (53, "TCP".to_owned())]);
                let ctrl = find(&objs, "Deployment", "fedmesh-controller");
                let container_ports = ctrl["spec"]["template"]["spec"]["containers"][0]["ports"]
                    .as_array()
                    .unwrap();
                for p in ["dns-udp", "dns-tcp"] {
                    let cp = container_ports.iter().find(|c| c["name"] == p).unwrap();
                    assert_eq!(
                        cp["containerPort"].as_u64(),
                        Some(u64::from(dns.listen.port()))
                    );
                }
                match &k.coredns {
                    Some(c) => {
                        assert_eq!(c.configmap, "kube-system/coredns");
                        assert_eq!(c.dns_service, "fedmesh-system/fedmesh-dns");
                        let role = coredns_role.expect("a Role to keep CoreDNS's ConfigMap");
                        assert_eq!(role["metadata"]["namespace"], "kube-system");
                        assert_eq!(
                            role["rules"][0]["resourceNames"],
                            serde_json::json!(["coredns"])
                        );
                    }
                    None => assert!(coredns_role.is_none()),
                }
            }
            (None, None) => assert!(dns_svc.is_none() && coredns_role.is_none()),
            other => panic!("{}: dns and clusterset_ips {other:?}", path.display()),
        }
        let gw = find(&objs, "ConfigMap", "fedmesh-gateway");
        let text = gw["data"]["gateway.yaml"].as_str().unwrap();
        let g: fedmesh_gateway::GatewayConfig = serde_yaml_ng::from_str(text)
            .unwrap_or_else(|e| panic!("{}: gateway.yaml: {e}\n{text}", path.display()));
        assert!(g.listen.tcp_fallback.is_some(), "the TCP fallback is on");
        // The drill API, when asked for: config, container port, and a
        // headless Service (faults are per replica).
        let drills_svc = objs
            .iter()
            .find(|o| o["kind"] == "Service" && o["metadata"]["name"] == "fedmesh-gateway-drills");
        match &g.drills {
            Some(d) => {
                assert!(d.problems().is_empty(), "{:?}", d.problems());
                let svc = drills_svc.expect("a drills Service");
                assert_eq!(svc["spec"]["clusterIP"], "None");
                assert_eq!(
                    svc["spec"]["ports"][0]["port"].as_u64(),
                    Some(u64::from(d.listen.port()))
                );
            }
            None => assert!(drills_svc.is_none()),
        }
        // The Service carries QUIC on UDP and the fallback on TCP.
        let svc = find(&objs, "Service", "fedmesh-gateway");
        let protos: Vec<_> = svc["spec"]["ports"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p["protocol"].as_str().unwrap().to_owned())
            .collect();
        assert_eq!(protos, ["UDP", "TCP"]);
        // Tokens the controller reads name the gateway alone.
        let sec = find(&objs, "Secret", "fedmesh-bootstrap");
        use base64::Engine;
        let tokens = base64::engine::general_purpose::STANDARD
            .decode(sec["data"]["tokens.yaml"].as_str().unwrap())
            .unwrap();
        let t: fedmesh_api::server::TokensFile = serde_yaml_ng::from_slice(&tokens).unwrap();
        assert_eq!(t.tokens.len(), 1);
        assert!(t.tokens[0].identities[0].ends_with("/ns/fedmesh-system/sa/gateway"));
        // Every container has requests, limits and (daemons) probes.
        for d in objs.iter().filter(|o| o["kind"] == "Deployment") {
            for c in d["spec"]["template"]["spec"]["containers"]
                .as_array()
                .unwrap()
            {
                assert!(c["resources"]["limits"].is_object() && c["readinessProbe"].is_object());
            }
        }
    }
}

#[test]
fn the_same_input_renders_the_same_manifests() {
    // So `kubectl apply` of a re-render changes nothing (the bootstrap
    // token is derived, not random) and Terraform plans stay empty.
    let dir = tempfile::tempdir().unwrap();
    let east = ca(dir.path(), "east.acme");
    let args = [
        "install",
        "--cluster=east",
        "--trust-domain=east.acme",
        "--store=http://etcd:2379",
        &format!("--ca={}", s(&east)),
        "--advertise=10.0.0.1:15443",
    ];
    let (a, b) = (fedmesh(&args, None), fedmesh(&args, None));
    assert!(a.status.success() && !a.stdout.is_empty());
    assert_eq!(out(&a), out(&b));
}

#[test]
fn bad_flags_are_refused_naming_the_rule_and_nothing_is_printed() {
    let dir = tempfile::tempdir().unwrap();
    let east = ca(dir.path(), "east.acme");
    let west = ca(dir.path(), "west.acme");
    // A CA directory whose key is another CA's.
    let mixed = dir.path().join("mixed");
    std::fs::create_dir_all(&mixed).unwrap();
    for f in ["ca.pem", "chain.pem", "bundle.pem"] {
        std::fs::copy(east.join(f), mixed.join(f)).unwrap();
    }
    std::fs::copy(west.join("ca.key"), mixed.join("ca.key")).unwrap();
    let ca_flag = format!("--ca={}", s(&east));
    let mixed_flag = format!("--ca={}", s(&mixed));
    // Each case: the flags after `install` (a good base unless replaced)
    // and the words the refusal must contain ("" for clap's own errors).
    let ok_base: Vec<&str> = vec![
        "--store=http://etcd:2379",
        &ca_flag,
        "--advertise=10.0.0.1:15443",
    ];
    fn with<'a>(base: &[&'a str], extra: &[&'a str]) -> Vec<&'a str> {
        [base, extra].concat()
    }
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (
            with(&ok_base, &["--cluster=East", "--trust-domain=east.acme"]),
            "cluster name `East`: may contain only lowercase letters",
        ),
        (
            with(&ok_base, &["--cluster=-east", "--trust-domain=east.acme"]),
            "must start and end with a lowercase letter or digit",
        ),
        (
            with(&ok_base, &["--cluster=east", "--trust-domain=east..acme"]),
            "must not have empty labels",
        ),
        (
            with(&ok_base, &["--cluster=east", "--trust-domain=west.acme"]),
            "CA is for trust domain `east.acme`, not `west.acme`",
        ),
        (
            with(
                &ok_base,
                &[
                    "--cluster=east",
                    "--trust-domain=east.acme",
                    "--gateway-service-type=Ingress",
                ],
            ),
            "must be one of LoadBalancer, NodePort, ClusterIP",
        ),
        (
            with(
                &ok_base,
                &[
                    "--cluster=east",
                    "--trust-domain=east.acme",
                    "--gateway-service-type=NodePort",
                    "--node-ports=8080,30444",
                ],
            ),
            "gateway QUIC node port `8080`: must be a port number from 30000 to 32767",
        ),
        (
            with(
                &ok_base,
                &[
                    "--cluster=east",
                    "--trust-domain=east.acme",
                    "--image=Fedmesh:dev",
                ],
            ),
            "image `Fedmesh:dev`",
        ),
        (
            with(
                &ok_base,
                &[
                    "--cluster=east",
                    "--trust-domain=east.acme",
                    "--peer=east=/dev/null",
                ],
            ),
            "a cluster does not join itself",
        ),
        (
            with(
                &ok_base,
                &[
                    "--cluster=east",
                    "--trust-domain=east.acme",
                    "--gateway-replicas=0",
                ],
            ),
            "gateway replicas: 0: must be from 1 to 5",
        ),
        (
            vec![
                "--cluster=east",
                "--trust-domain=east.acme",
                "--store=http://e:1",
                &mixed_flag,
                "--advertise=10.0.0.1:15443",
            ],
            "CA ca.key: does not sign for bundle.pem",
        ),
        // Only a load balancer's address can be discovered.
        (
            vec![
                "--cluster=east",
                "--trust-domain=east.acme",
                "--store=http://e:1",
                &ca_flag,
                "--gateway-service-type=NodePort",
            ],
            "required unless the gateway Service is a LoadBalancer",
        ),
        (
            with(
                &ok_base,
                &[
                    "--cluster=east",
                    "--trust-domain=east.acme",
                    "--clusterset-cidr=241.0.0.0/33",
                    "--coredns-configmap=coredns",
                ],
            ),
            "clusterset CIDR `241.0.0.0/33`: expected ADDRESS/PREFIX",
        ),
        (
            with(
                &ok_base,
                &[
                    "--cluster=east",
                    "--trust-domain=east.acme",
                    "--clusterset-cidr=241.0.0.0/16",
                    "--coredns-configmap=coredns",
                ],
            ),
            "CoreDNS ConfigMap `coredns`: expected NAMESPACE/NAME",
        ),
        (
            with(
                &ok_base,
                &[
                    "--cluster=east",
                    "--trust-domain=east.acme",
                    "--drill-operator=ops",
                ],
            ),
            "drill operator `ops`: expected spiffe://",
        ),
        // CoreDNS without ClusterSet IPs: nothing to forward to.
        (
            with(
                &ok_base,
                &[
                    "--cluster=east",
                    "--trust-domain=east.acme",
                    "--coredns-configmap=kube-system/coredns",
                ],
            ),
            "",
        ),
        // A bad port is clap's to refuse, also with exit 2.
        (
            vec![
                "--cluster=east",
                "--trust-domain=east.acme",
                "--store=http://e:1",
                &ca_flag,
                "--advertise=10.0.0.1:70000",
            ],
            "",
        ),
    ];
    for (flags, want) in &cases {
        let mut args = vec!["install"];
        args.extend(flags);
        let o = fedmesh(&args, None);
        assert_eq!(o.status.code(), Some(2), "{flags:?}: {}", err(&o));
        assert!(
            err(&o).contains(want),
            "{flags:?}: wanted `{want}` in:\n{}",
            err(&o)
        );
        assert!(o.stdout.is_empty(), "{flags:?}: printed something");
    }
}

#[test]
fn terraform_mode_speaks_the_external_protocol() {
    let dir = tempfile::tempdir().unwrap();
    let east = ca(dir.path(), "east.acme");
    let west = ca(dir.path(), "west.acme");
    let read = |p: PathBuf| std::fs::read_to_string(p).unwrap();
    let query = serde_json::json!({
        "cluster": "east",
        "trust_domain": "east.acme",
        "store_endpoints": "[\"http://etcd:2379\"]",
        "ca_cert_pem": read(east.join("ca.pem")),
        "ca_key_pem": read(east.join("ca.key")),
        "gateway_service_type": "NodePort",
        "gateway_node_ports": "30443,30444",
        "gateway_advertise": "172.18.0.2:30443",
        "gateway_annotations": "{}",
        "peers": serde_json::json!({ "west": read(west.join("bundle.pem")) }).to_string(),
        "image": "fedmesh:dev",
    });
    let o = fedmesh(&["install", "--terraform"], Some(&query.to_string()));
    assert!(o.status.success(), "{}", err(&o));
    let v: serde_json::Map<String, serde_json::Value> = serde_json::from_slice(&o.stdout).unwrap();
    assert!(
        v.values().all(|x| x.is_string()),
        "external wants strings only"
    );
    let fp = v["bundle_fingerprint"].as_str().unwrap();
    let bundle = fedmesh_trust::TrustBundle::from_pem(
        "east.acme".parse().unwrap(),
        &read(east.join("bundle.pem")),
    )
    .unwrap();
    assert_eq!(fp, bundle.fingerprint());
    // The same settings through flags give the same manifests.
    let flags = fedmesh(
        &[
            "install",
            "--cluster=east",
            "--trust-domain=east.acme",
            "--store=http://etcd:2379",
            &format!("--ca={}", s(&east)),
            "--gateway-service-type=NodePort",
            "--node-ports=30443,30444",
            "--advertise=172.18.0.2:30443",
            &format!("--peer=west={}", s(&west.join("bundle.pem"))),
            "--image=fedmesh:dev",
        ],
        None,
    );
    assert_eq!(v["manifests"].as_str().unwrap(), out(&flags));
    // Bad query: exit 2, nothing on stdout.
    let mut bad = query.clone();
    bad["cluster"] = "East".into();
    let o = fedmesh(&["install", "--terraform"], Some(&bad.to_string()));
    assert_eq!(o.status.code(), Some(2));
    assert!(o.stdout.is_empty() && err(&o).contains("cluster name `East`"));
    let o = fedmesh(&["install", "--terraform"], Some("not json"));
    assert_eq!(o.status.code(), Some(2));
}

/// The MCS objects the controller writes (a ServiceImport, and export
/// statuses with and without a conflict) as YAML documents, or nothing in
/// a build without the Kubernetes source.
fn controller_writes() -> String {
    #[cfg(feature = "kube")]
    {
        use fedmesh_catalog::mcs::{
            Conflict, ConflictKind, ExportedMeta, Import, Port, Protocol, ServiceType,
            SessionAffinity,
        };
        use fedmesh_federation::k8s::{export_conditions, service_import, stamped, ExportCheck};
        let name: fedmesh_wire::ServiceName = "cart.shop".parse().unwrap();
        let mut h2 = Port::named("grpc", 9090, Protocol::Tcp);
        h2.app_protocol = Some("kubernetes.io/h2c".into());
        let import = Import {
            service: name.clone(),
            service_type: ServiceType::ClusterSetIP,
            ports: vec![
                Port::named("http", 8080, Protocol::Tcp),
                Port::named("dns", 5353, Protocol::Udp),
                h2,
            ],
            meta: ExportedMeta {
                session_affinity: SessionAffinity::ClientIp {
                    timeout_seconds: Some(600),
                },
                labels: [("tier".to_owned(), "web".to_owned())].into(),
                annotations: [("example.com/owner".to_owned(), "team-a".to_owned())].into(),
            },
            exporters: vec!["east".parse().unwrap(), "west".parse().unwrap()],
            clusters: vec!["west".parse().unwrap()],
            conflicts: Vec::new(),
            endpoints: Default::default(),
        };
        let conflict = vec![Conflict {
            kind: ConflictKind::Port {
                name: "http".into(),
                port: 8081,
            },
            winner: "east".into(),
            loser: "west".into(),
        }];
        let now = std::time::SystemTime::now();
        let status = |c: Vec<fedmesh_federation::k8s::Condition>| {
            serde_json::json!({
                "apiVersion": "multicluster.x-k8s.io/v1beta1",
                "kind": "ServiceExport",
                "metadata": { "name": "cart", "namespace": "shop" },
                "spec": { "exportedLabels": { "tier": "web" } },
                "status": { "conditions": stamped(&c, &[], now) },
            })
        };
        let invalid = ExportCheck::Invalid {
            reason: "NoService",
            message: "no Service of this name in this namespace".into(),
        };
        let docs = [
            service_import(
                &name,
                &import,
                &["241.0.0.7".parse().unwrap(), "fd00:fe::7".parse().unwrap()],
            ),
            status(export_conditions(&ExportCheck::Valid, true, false, None, None).unwrap()),
            status(
                export_conditions(&ExportCheck::Valid, true, false, Some(&conflict), None).unwrap(),
            ),
            status(export_conditions(&ExportCheck::Valid, false, false, None, None).unwrap()),
            status(export_conditions(&invalid, false, false, None, None).unwrap()),
            status(
                export_conditions(
                    &ExportCheck::Valid,
                    true,
                    true,
                    None,
                    Some(Err(&["241.0.0.0/30".to_owned()])),
                )
                .unwrap(),
            ),
        ];
        docs.iter()
            .map(|d| format!("---\n{}", serde_yaml_ng::to_string(d).unwrap()))
            .collect()
    }
    #[cfg(not(feature = "kube"))]
    String::new()
}

/// The Python validator from the venv `scripts/test.sh` makes.
fn validator() -> Option<String> {
    let py = std::env::var("FEDMESH_K8S_PYTHON").unwrap_or_else(|_| "python3".into());
    let ok = Command::new(&py)
        .args(["-c", "import kubernetes_validate, jsonschema, yaml"])
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    ok.then_some(py)
}

#[test]
fn manifests_and_mcs_objects_pass_the_kubernetes_1_33_schemas() {
    let Some(py) = validator() else {
        assert!(
            std::env::var_os("FEDMESH_SKIP_K8S_VALIDATE").is_some(),
            "kubernetes-validate is missing: run scripts/test.sh (it installs it) or set FEDMESH_K8S_PYTHON; FEDMESH_SKIP_K8S_VALIDATE=1 skips"
        );
        eprintln!("skipped: kubernetes-validate not installed");
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let mut files: Vec<String> = render_variants(dir.path())
        .into_iter()
        .map(|(p, _)| s(&p).to_owned())
        .collect();
    // Injected workloads are applied too.
    let app = std::fs::read_to_string(repo().join("e2e/kind/samples/app.yaml")).unwrap();
    let east = ca(dir.path(), "inject.acme");
    let o = fedmesh(
        &[
            "inject",
            "--image=fedmesh:dev",
            "--cluster=east",
            &format!("--bundle={}", s(&east.join("bundle.pem"))),
        ],
        Some(&app),
    );
    assert!(o.status.success(), "{}", err(&o));
    let injected = dir.path().join("injected.yaml");
    std::fs::write(&injected, out(&o)).unwrap();
    files.push(s(&injected).to_owned());
    // The kind drill's app and Job, as up.sh fills them in and injects them.
    for (sample, subst) in [
        (
            "drill-echo.yaml",
            [("IMAGE", "fedmesh:dev"), ("CLUSTER_NAME", "east")],
        ),
        (
            "drill-job.yaml",
            [
                ("GATEWAY_API", "10.10.0.7:15022"),
                ("LOAD", "241.0.0.3:7000"),
            ],
        ),
    ] {
        let mut text =
            std::fs::read_to_string(repo().join("e2e/kind/samples").join(sample)).unwrap();
        for (from, to) in subst {
            text = text.replace(from, to);
        }
        text = text.replace("IMAGE", "fedmesh:dev");
        let o = fedmesh(
            &[
                "inject",
                "--image=fedmesh:dev",
                "--cluster=east",
                &format!("--bundle={}", s(&east.join("bundle.pem"))),
            ],
            Some(&text),
        );
        assert!(o.status.success(), "{sample}: {}", err(&o));
        let path = dir.path().join(format!("injected-{sample}"));
        std::fs::write(&path, out(&o)).unwrap();
        files.push(s(&path).to_owned());
    }
    // And what the controller itself writes back, from its own code.
    let written = dir.path().join("controller-writes.yaml");
    std::fs::write(&written, controller_writes()).unwrap();
    let o = Command::new(py)
        .arg(repo().join("scripts/validate-manifests.py"))
        .args(["--k8s", "1.33.0"])
        .args(&files)
        .arg("--crd-samples")
        .arg(repo().join("e2e/kind/samples/mcs-objects.yaml"))
        .arg(repo().join("e2e/kind/samples/export.yaml"))
        .arg(repo().join("e2e/kind/samples/drill-export.yaml"))
        .arg(&written)
        .output()
        .unwrap();
    println!("{}", out(&o));
    assert!(o.status.success(), "{}{}", out(&o), err(&o));
    assert!(out(&o).contains("all passed"));
}

/// mcs-api v0.5.0: v1beta1 is stored, v1alpha1 still served with the same
/// schema (so objects written as either are one object), and the stored
/// version is the one the controller reads and writes.
#[cfg(feature = "kube")]
#[test]
fn the_mcs_crds_store_the_version_the_controller_speaks() {
    for crd in fedmesh_deploy::install::crds() {
        let versions = crd["spec"]["versions"].as_array().unwrap();
        let names = |f: &dyn Fn(&serde_json::Value) -> bool| -> Vec<String> {
            versions
                .iter()
                .filter(|v| f(v))
                .map(|v| v["name"].as_str().unwrap().to_owned())
                .collect()
        };
        assert_eq!(
            names(&|v| v["storage"] == true),
            [fedmesh_federation::k8s::MCS_VERSION]
        );
        assert_eq!(names(&|v| v["served"] == true), ["v1beta1", "v1alpha1"]);
        assert_eq!(versions[0]["schema"], versions[1]["schema"]);
    }
}
