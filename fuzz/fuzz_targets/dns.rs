//! What a DNS client sends the controller's `clusterset.local` server:
//! decoding must never panic, an answer (if any) must encode, decode
//! again and echo the query's ID, and a query outside the zone is never
//! answered with records.
#![no_main]

use std::collections::BTreeMap;
use std::sync::OnceLock;
use std::time::Duration;

use fedmesh_catalog::mcs::{ExportedMeta, Import, Port, Protocol, ServiceType};
use fedmesh_catalog::ClusterName;
use fedmesh_federation::dns::Zone;
use fedmesh_wire::ServiceName;
use hickory_proto::op::{Message, ResponseCode};
use libfuzzer_sys::fuzz_target;

fn zone() -> &'static Zone {
    static Z: OnceLock<Zone> = OnceLock::new();
    Z.get_or_init(|| {
        let west = ClusterName::new("west").expect("name");
        let mut imports = BTreeMap::new();
        let mut ips = BTreeMap::new();
        for (i, name) in ["echo", "db", "api"].iter().enumerate() {
            let s = ServiceName::new(name, "demo").expect("name");
            imports.insert(
                s.clone(),
                Import {
                    service: s.clone(),
                    service_type: ServiceType::ClusterSetIP,
                    ports: vec![
                        Port::named("http", 7000, Protocol::Tcp),
                        Port::named("dns", 53, Protocol::Udp),
                    ],
                    meta: ExportedMeta::default(),
                    exporters: vec![west.clone()],
                    clusters: vec![west.clone()],
                    conflicts: Vec::new(),
                    endpoints: Default::default(),
                },
            );
            let n = u8::try_from(i).expect("few");
            ips.insert(
                s,
                vec![
                    std::net::IpAddr::from([241, 0, 0, n]),
                    std::net::IpAddr::from([0xfd00, 0xfe, 0, 0, 0, 0, 0, u16::from(n)]),
                ],
            );
        }
        Zone::build(&imports, &ips, Duration::from_secs(5), 1)
    })
}

fuzz_target!(|data: &[u8]| {
    let Ok(req) = Message::from_vec(data) else {
        return;
    };
    let Some(resp) = zone().answer(&req) else {
        return;
    };
    assert_eq!(resp.id(), req.id());
    let bytes = resp.to_vec().expect("an answer encodes");
    let again = Message::from_vec(&bytes).expect("an answer decodes");
    assert_eq!(again.response_code(), resp.response_code());
    if resp.response_code() == ResponseCode::Refused {
        assert!(resp.answers().is_empty());
    }
    // What a truncated UDP answer carries encodes too.
    resp.truncate()
        .to_vec()
        .expect("a truncated answer encodes");
});
