//! The kind rig's cluster definitions: what kind would only tell us on a
//! machine with Docker (overlapping subnets, clashing host ports) is
//! checked here.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::Ipv4Addr;
use std::path::Path;

use fedmesh_deploy::parse_documents;

fn cidr(s: &str) -> (u32, u32) {
    let (ip, len) = s.split_once('/').unwrap();
    let ip: Ipv4Addr = ip.parse().unwrap();
    let len: u32 = len.parse().unwrap();
    let mask = if len == 0 { 0 } else { u32::MAX << (32 - len) };
    (u32::from(ip) & mask, mask)
}

fn overlap(a: (u32, u32), b: (u32, u32)) -> bool {
    let mask = a.1 & b.1;
    a.0 & mask == b.0 & mask
}

#[test]
fn three_clusters_with_disjoint_subnets_and_the_gateway_ports_mapped() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../kind-configs");
    let mut nets = Vec::new();
    let mut host_ports = Vec::new();
    for c in ["east", "west", "north"] {
        let text = std::fs::read_to_string(dir.join(format!("{c}.yaml"))).unwrap();
        let docs = parse_documents(&text).unwrap();
        let [cfg] = docs.as_slice() else {
            panic!("{c}: one document")
        };
        assert_eq!(cfg["kind"], "Cluster");
        assert_eq!(cfg["apiVersion"], "kind.x-k8s.io/v1alpha4");
        assert_eq!(cfg["name"], format!("fedmesh-{c}").as_str());
        for key in ["podSubnet", "serviceSubnet"] {
            let s = cfg["networking"][key].as_str().unwrap();
            nets.push((format!("{c} {key}"), cidr(s)));
        }
        let nodes = cfg["nodes"].as_sequence().unwrap();
        assert_eq!(
            nodes.len(),
            1,
            "{c}: the node with the port mappings runs the gateway"
        );
        let maps = nodes[0]["extraPortMappings"].as_sequence().unwrap();
        let got: Vec<(u64, &str)> = maps
            .iter()
            .map(|m| {
                (
                    m["containerPort"].as_u64().unwrap(),
                    m["protocol"].as_str().unwrap(),
                )
            })
            .collect();
        assert_eq!(
            got,
            [(30443, "UDP"), (30444, "TCP")],
            "{c}: the install's node ports"
        );
        for m in maps {
            host_ports.push((
                m["hostPort"].as_u64().unwrap(),
                m["protocol"].as_str().unwrap().to_owned(),
            ));
        }
    }
    for (i, (na, a)) in nets.iter().enumerate() {
        for (nb, b) in &nets[i + 1..] {
            assert!(!overlap(*a, *b), "{na} overlaps {nb}");
        }
    }
    let n = host_ports.len();
    host_ports.sort();
    host_ports.dedup();
    assert_eq!(host_ports.len(), n, "host ports clash");
    // The script installs with the node ports the configs map.
    let up = std::fs::read_to_string(dir.join("../e2e/kind/up.sh")).unwrap();
    assert!(up.contains("--node-ports 30443,30444"));
}
