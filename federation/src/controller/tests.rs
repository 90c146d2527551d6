//! The incremental view against a full recomputation.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use fedmesh_catalog::mcs::{Port, Protocol, ServiceType};
use fedmesh_catalog::ClusterName;
use fedmesh_trust::{CertificateAuthority, TrustDomain};
use fedmesh_wire::ServiceName;

use super::cache::Cache;
use super::publish::{info_record, service_record};
use super::view::{compute, incremental, View};
use super::{ControllerMetrics, ControllerSettings, Gateways, LocalService};
use crate::keys;
use crate::records::Locality;
use crate::store::Delta;

fn settings(
    name: &str,
    pinned: &[(&str, &CertificateAuthority)],
    ca: &CertificateAuthority,
) -> ControllerSettings {
    ControllerSettings {
        cluster: ClusterName::new(name).unwrap(),
        trust_domain: ca.trust_domain().clone(),
        locality: Locality::default(),
        gateways: vec!["127.0.0.1:15443".parse().unwrap()],
        gateways_tcp: Vec::new(),
        gateway_tunnel: None,
        lease_ttl: Duration::from_secs(10),
        bundle: ca.bundle(),
        endorsements: vec![],
        pinned: pinned
            .iter()
            .map(|(n, ca)| (ClusterName::new(n).unwrap(), ca.bundle()))
            .collect(),
        policies: Default::default(),
        clusterset_ips: None,
    }
}

fn svc(i: u32, export: bool, proto: Protocol, td: &TrustDomain) -> LocalService {
    LocalService {
        vips: Vec::new(),
        hostnames: Default::default(),
        name: ServiceName::new(&format!("s{i}"), "ns").unwrap(),
        ports: vec![Port::new(80, proto)],
        meta: Default::default(),
        service_type: ServiceType::ClusterSetIP,
        export,
        audience: None,
        endpoints: vec![(
            "127.0.0.1:9000".parse().unwrap(),
            td.workload("ns", "x").unwrap(),
        )],
        exported_at_ms: None,
    }
}

/// Many random single-service changes: after each, the incremental
/// view equals a full recomputation from the same cache.
#[test]
fn incremental_views_equal_full_recomputation() {
    let m = ControllerMetrics::default();
    let cas: Vec<CertificateAuthority> = ["a", "b", "c"]
        .iter()
        .map(|c| {
            CertificateAuthority::new_root(
                format!("{c}.mesh").parse().unwrap(),
                Duration::from_secs(600),
            )
            .unwrap()
        })
        .collect();
    let me = settings("a", &[("b", &cas[1]), ("c", &cas[2])], &cas[0]);
    let others = [settings("b", &[], &cas[1]), settings("c", &[], &cas[2])];
    let local: Vec<LocalService> = (0..5)
        .map(|i| svc(i, i % 2 == 0, Protocol::Tcp, &cas[0].trust_domain().clone()))
        .collect();
    let mut cache = Cache::default();
    let record = |s: &ControllerSettings| {
        let g = Gateways {
            quic: s.gateways.clone(),
            tcp: s.gateways_tcp.clone(),
        };
        // Everyone trusts everyone: this test is about exports.
        let all = ["a", "b", "c"].map(|c| ClusterName::new(c).unwrap());
        Some(info_record(s, &g, &all.into_iter().collect()))
    };
    let mut changes: Vec<(String, Option<Vec<u8>>)> = others
        .iter()
        .map(|o| (keys::info_key(&o.cluster), record(o)))
        .collect();
    changes.push((keys::info_key(&me.cluster), record(&me)));
    // Our own exports come back from the store like everyone else's.
    for l in local.iter().filter(|l| l.export) {
        changes.push((
            keys::service_key(&me.cluster, &l.name),
            Some(service_record(l, 2)),
        ));
    }
    cache.apply(
        Delta {
            replaced: true,
            changes,
        },
        &m,
    );
    let mut trusted = BTreeMap::new();
    cache.structural = false;
    let mut view = compute(&me, &cache, &local, &mut trusted, &m, None, Instant::now());
    let mut x: u32 = 7;
    let mut rnd = move || {
        x = x.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
        x >> 8
    };
    let (mut lost, mut conflicted) = (false, false);
    for step in 0..300 {
        // One to three changes per step, like a burst between recomputes.
        let mut changes = Vec::new();
        for _ in 0..=(rnd() % 3) {
            let o = &others[(rnd() % 2) as usize];
            let i = rnd() % 8;
            let name = ServiceName::new(&format!("s{i}"), "ns").unwrap();
            let key = keys::service_key(&o.cluster, &name);
            let value = match rnd() % 4 {
                0 => None,
                1 => Some(b"{not json".to_vec()),
                k => {
                    let proto = if k == 2 { Protocol::Tcp } else { Protocol::Udp };
                    let s = svc(i, true, proto, &o.trust_domain);
                    Some(service_record(&s, u64::from(rnd() % 5)))
                }
            };
            changes.push((key, value));
        }
        cache.apply(
            Delta {
                replaced: false,
                changes,
            },
            &m,
        );
        assert!(
            !cache.structural,
            "single-service changes are not structural"
        );
        view = incremental(&me, &mut cache, view, &m, Instant::now());
        let full = compute(&me, &cache, &local, &mut trusted, &m, None, Instant::now());
        assert_eq!(view.catalog, full.catalog, "catalog differs at step {step}");
        assert_eq!(view.mcs, full.mcs, "MCS view differs at step {step}");
        assert_eq!(
            view.conflicts, full.conflicts,
            "conflicts differ at step {step}"
        );
        let exported = |v: &View| v.clusters.iter().map(|c| c.exported).collect::<Vec<_>>();
        assert_eq!(
            exported(&view),
            exported(&full),
            "counts differ at step {step}"
        );
        lost |= !view.mcs.export_conflicts.is_empty();
        conflicted |= !view.conflicts.is_empty();
    }
    // The walk did reach the interesting states.
    assert!(lost && conflicted, "no conflicts were exercised");
}
