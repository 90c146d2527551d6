//! Config files an operator (or a mounted ConfigMap) hands to the gateway,
//! sidecar and controller, the controller's services file and a static
//! catalog: each must be refused with readable problems, never a panic.
//! Only the parts that read no files are exercised (paths in a fuzzed file
//! would name arbitrary files on this machine).
#![no_main]

use fedmesh_catalog::CatalogSpec;
use fedmesh_federation::config::ControllerConfig;
use fedmesh_gateway::GatewayConfig;
use fedmesh_sidecar::SidecarConfig;
use fedmesh_trust::TrustDomain;
use libfuzzer_sys::fuzz_target;

fn catalog(spec: &CatalogSpec) {
    if let Ok(c) = spec.build() {
        // What a proxy dumps at /config_dump builds the same catalog.
        let again = c.to_spec().build().expect("a built catalog's spec builds");
        assert_eq!(again.to_spec(), c.to_spec());
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&kind, rest)) = data.split_first() else {
        return;
    };
    let Ok(text) = std::str::from_utf8(rest) else {
        return;
    };
    match kind % 5 {
        0 => {
            if let Ok(c) = serde_yaml_ng::from_str::<GatewayConfig>(text) {
                let _ = c.limits.problems();
                let _ = c.congestion.problems();
                if let Some(spec) = &c.catalog {
                    catalog(spec);
                }
            }
        }
        1 => {
            if let Ok(c) = serde_yaml_ng::from_str::<SidecarConfig>(text) {
                let _ = c.limits.problems();
                let _ = c.http.problems();
                if let Some(spec) = &c.catalog {
                    catalog(spec);
                }
            }
        }
        2 => {
            if let Ok(c) = serde_yaml_ng::from_str::<ControllerConfig>(text) {
                if let Some(ips) = &c.clusterset_ips {
                    let _ = ips.check(&c.gateways.iter().map(|a| a.ip()).collect::<Vec<_>>());
                }
                for (name, p) in &c.policies {
                    let _ = p.problems(name);
                }
            }
        }
        3 => {
            let td = TrustDomain::new("east.mesh").expect("trust domain");
            let _ = fedmesh_federation::source::parse(text, &td);
        }
        _ => {
            if let Ok(spec) = CatalogSpec::from_yaml(text) {
                catalog(&spec);
            }
        }
    }
});
