//! The Terraform module refuses what `fedmesh install` refuses, with the
//! rule in the message: its real `variables.tf` is planned (offline: a
//! root module of the variables alone needs no providers) with each value
//! and Terraform's verdict compared with [`fedmesh_deploy::names`].
//! Needs `terraform` on PATH; without it the test says so and passes
//! unless `FEDMESH_REQUIRE_TERRAFORM` is set.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::process::Command;

use fedmesh_deploy::names;
use serde_json::{json, Value};

fn terraform() -> Option<()> {
    let ok = Command::new("terraform")
        .arg("version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !ok {
        assert!(
            std::env::var_os("FEDMESH_REQUIRE_TERRAFORM").is_none(),
            "terraform is not installed"
        );
        eprintln!("skipped: terraform is not installed");
    }
    ok.then_some(())
}

fn good() -> Value {
    json!({
        "cluster_name": "east",
        "trust_domain": "east.acme",
        "store_endpoints": ["https://etcd-0.acme.net:2379"],
        "ca": { "cert_pem": "-----BEGIN CERTIFICATE-----\n", "key_pem": "-----BEGIN PRIVATE KEY-----\n" },
        "gateway": { "advertise_address": "203.0.113.10:15443" },
    })
}

/// Terraform's verdict on `vars`: Ok, or the error text.
fn plan(dir: &Path, vars: &Value) -> Result<(), String> {
    let f = dir.join("case.tfvars.json");
    std::fs::write(&f, vars.to_string()).unwrap();
    let o = Command::new("terraform")
        .current_dir(dir)
        .args([
            "plan",
            "-input=false",
            "-no-color",
            "-lock=false",
            "-var-file=case.tfvars.json",
        ])
        .env("TF_CLI_CONFIG_FILE", "/dev/null")
        .output()
        .unwrap();
    if o.status.success() {
        Ok(())
    } else {
        // Terraform wraps long messages; compare words.
        let text = String::from_utf8_lossy(&o.stderr).replace('│', " ");
        Err(text.split_whitespace().collect::<Vec<_>>().join(" "))
    }
}

#[test]
fn variable_validations_match_the_cli_rules() {
    if terraform().is_none() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let module =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../terraform/modules/fedmesh-cluster");
    std::fs::copy(module.join("variables.tf"), dir.path().join("variables.tf")).unwrap();
    std::fs::write(dir.path().join("main.tf"), "terraform {}\n").unwrap();
    let init = Command::new("terraform")
        .current_dir(dir.path())
        .args(["init", "-input=false", "-no-color"])
        .env("TF_CLI_CONFIG_FILE", "/dev/null")
        .output()
        .unwrap();
    assert!(
        init.status.success(),
        "{}",
        String::from_utf8_lossy(&init.stderr)
    );
    assert_eq!(plan(dir.path(), &good()), Ok(()));

    type Rule = fn(&str) -> Result<(), names::NameError>;
    let fields: &[(&str, Rule, &[&str])] = &[
        (
            "cluster_name",
            names::cluster_name,
            &[
                "east",
                "e",
                "east-2",
                "East",
                "-east",
                "east-",
                "",
                "e_st",
                &"a".repeat(63),
                &"a".repeat(64),
            ],
        ),
        (
            "trust_domain",
            names::trust_domain,
            &[
                "east.acme",
                "a_b.c-d",
                "east..acme",
                ".east",
                "east.",
                "East.acme",
                "east.acme-",
                "east acme",
                "",
            ],
        ),
        (
            "image",
            names::image,
            &[
                "ghcr.io/fedmesh/fedmesh:0.1.0",
                "fedmesh:dev",
                "localhost:5000/fedmesh:Dev",
                "fedmesh@sha256:abc123",
                "Fedmesh:dev",
                "fed mesh",
                "",
            ],
        ),
    ];
    for (field, rule, values) in fields {
        for v in *values {
            let mut vars = good();
            vars[*field] = (*v).into();
            let tf = plan(dir.path(), &vars);
            let cli = rule(v);
            assert_eq!(
                tf.is_ok(),
                cli.is_ok(),
                "{field} = {v:?}: terraform {tf:?}, cli {cli:?}"
            );
            if let Err(text) = tf {
                assert!(
                    text.contains(&format!("{field}: ")),
                    "{field} = {v:?}: the message names the variable: {text}"
                );
            }
        }
    }

    // Structured variables: the message names the rule that failed.
    let cases: &[(&str, Value, &str)] = &[
        (
            "store_endpoints",
            json!(["etcd:2379"]),
            "each must be http://host:port or https://host:port",
        ),
        ("store_endpoints", json!([]), "1 to 16 endpoints"),
        (
            "gateway",
            json!({ "advertise_address": "gw.acme.net:15443" }),
            "must be IP:PORT",
        ),
        (
            "gateway",
            json!({ "advertise_address": "10.0.0.1:15443", "service_type": "Ingress" }),
            "must be one of LoadBalancer, NodePort, ClusterIP",
        ),
        (
            "gateway",
            json!({ "advertise_address": "10.0.0.1:30443", "service_type": "NodePort", "node_ports": { "quic": 8080, "tcp": 30444 } }),
            "from 30000 to 32767",
        ),
        (
            "gateway",
            json!({ "advertise_address": "10.0.0.1:15443", "node_ports": { "quic": 30443, "tcp": 30444 } }),
            "only with service_type NodePort",
        ),
        (
            "gateway",
            json!({ "advertise_address": "10.0.0.1:15443", "replicas": 0 }),
            "gateway.replicas: must be from 1 to 5",
        ),
        (
            "gateway",
            json!({ "service_type": "NodePort" }),
            "required unless service_type is LoadBalancer",
        ),
        (
            "gateway",
            json!({ "advertise_address": "10.0.0.1:15443", "annotations": { "bad key": "x" } }),
            "gateway.annotations",
        ),
        (
            "clusterset_cidrs",
            json!(["241.0.0.0/33"]),
            "clusterset_cidrs: at most two CIDRs",
        ),
        (
            "clusterset_cidrs",
            json!(["241.0.0.0/16", "fd00::/112", "242.0.0.0/16"]),
            "clusterset_cidrs: at most two CIDRs",
        ),
        (
            "coredns_configmap",
            json!("coredns"),
            "coredns_configmap: NAMESPACE/NAME, or none",
        ),
        (
            "controller_replicas",
            json!(9),
            "controller_replicas: must be from 1 to 5",
        ),
        (
            "peers",
            json!({ "West": "-----BEGIN CERTIFICATE-----" }),
            "peers: each key is a cluster name",
        ),
        (
            "peers",
            json!({ "west": "not pem" }),
            "peers: each value is a PEM bundle",
        ),
        (
            "store_tls",
            json!({ "ca_pem": "x", "cert_pem": "c" }),
            "cert_pem and key_pem go together",
        ),
        (
            "image_pull_policy",
            json!("Sometimes"),
            "must be one of IfNotPresent, Always, Never",
        ),
    ];
    for (field, value, want) in cases {
        let mut vars = good();
        vars[*field] = value.clone();
        let text = plan(dir.path(), &vars).expect_err(&format!("{field} = {value} was accepted"));
        assert!(
            text.contains(want),
            "{field} = {value}: wanted `{want}` in\n{text}"
        );
    }
    // And the good shapes of each pass.
    for (field, value) in [
        (
            "gateway",
            json!({ "advertise_address": "[2001:db8::1]:15443", "service_type": "NodePort", "node_ports": { "quic": 30443, "tcp": 30444 }, "replicas": 1, "annotations": { "service.beta.kubernetes.io/aws-load-balancer-type": "nlb" } }),
        ),
        ("peers", json!({ "west": "-----BEGIN CERTIFICATE-----\n" })),
        // A LoadBalancer's address may be left to discovery.
        ("gateway", json!({ "annotations": { "x.io/y": "z" } })),
        (
            "store_tls",
            json!({ "ca_pem": "x", "cert_pem": "c", "key_pem": "k" }),
        ),
    ] {
        let mut vars = good();
        vars[field] = value.clone();
        assert_eq!(plan(dir.path(), &vars), Ok(()), "{field} = {value}");
    }
}

#[test]
fn the_module_readme_documents_every_input_and_output() {
    let module =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../terraform/modules/fedmesh-cluster");
    let readme = std::fs::read_to_string(module.join("README.md")).unwrap();
    for (file, block, anchor) in [
        ("variables.tf", "variable", "input"),
        ("outputs.tf", "output", "output"),
    ] {
        let text = std::fs::read_to_string(module.join(file)).unwrap();
        let names: Vec<&str> = text
            .lines()
            .filter_map(|l| l.strip_prefix(&format!("{block} \"")))
            .filter_map(|l| l.split('"').next())
            .collect();
        assert!(!names.is_empty());
        for n in names {
            assert!(
                readme.contains(&format!("<a name=\"{anchor}_{n}\">")),
                "README misses {block} {n}"
            );
        }
    }
}
