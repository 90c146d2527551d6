use super::*;
use fedmesh_catalog::mcs::{ExportedMeta, Port};
use fedmesh_catalog::ClusterName;
use hickory_proto::op::Query;

fn svc(s: &str) -> ServiceName {
    ServiceName::parse(s).unwrap()
}

fn import(name: &str, ports: Vec<Port>, service_type: ServiceType) -> (ServiceName, Import) {
    let c = ClusterName::new("west").unwrap();
    (
        svc(name),
        Import {
            service: svc(name),
            service_type,
            ports,
            meta: ExportedMeta::default(),
            exporters: vec![c.clone()],
            clusters: vec![c],
            conflicts: Vec::new(),
            endpoints: Default::default(),
        },
    )
}

fn zone() -> Zone {
    let imports: BTreeMap<_, _> = [
        import(
            "echo.demo",
            vec![
                Port::named("http", 7000, Protocol::Tcp),
                Port::named("dns", 53, Protocol::Udp),
                Port::new(9000, Protocol::Tcp),
            ],
            ServiceType::ClusterSetIP,
        ),
        import(
            "db.demo",
            vec![Port::new(5432, Protocol::Tcp)],
            ServiceType::Headless,
        ),
        // Imported, but no address allocated yet.
        import(
            "new.demo",
            vec![Port::new(80, Protocol::Tcp)],
            ServiceType::ClusterSetIP,
        ),
    ]
    .into_iter()
    .collect();
    let ips: BTreeMap<_, _> = [
        (
            svc("echo.demo"),
            vec!["241.0.0.8".parse().unwrap(), "fd00:fe::8".parse().unwrap()],
        ),
        (svc("db.demo"), vec!["241.0.0.9".parse().unwrap()]),
    ]
    .into_iter()
    .collect();
    Zone::build(&imports, &ips, Duration::from_secs(5), 7)
}

fn ask(z: &Zone, name: &str, t: RecordType) -> Message {
    let mut m = Message::new();
    m.set_id(4242)
        .set_recursion_desired(true)
        .add_query(Query::query(Name::from_ascii(name).unwrap(), t));
    let resp = z.answer(&m).unwrap();
    assert_eq!(resp.id(), 4242);
    assert_eq!(resp.message_type(), MessageType::Response);
    resp
}

fn ips(m: &Message) -> Vec<String> {
    m.answers()
        .iter()
        .map(|r| match r.data() {
            RData::A(a) => a.0.to_string(),
            RData::AAAA(a) => a.0.to_string(),
            other => format!("{other:?}"),
        })
        .collect()
}

#[test]
fn a_clusterset_ip_service_resolves_to_its_ips() {
    let z = zone();
    let a = ask(&z, "echo.demo.svc.clusterset.local.", RecordType::A);
    assert_eq!(a.response_code(), ResponseCode::NoError);
    assert!(a.authoritative());
    assert_eq!(ips(&a), ["241.0.0.8"]);
    assert_eq!(a.answers()[0].ttl(), 5);
    let aaaa = ask(&z, "ECHO.Demo.svc.clusterset.local.", RecordType::AAAA);
    assert_eq!(ips(&aaaa), ["fd00:fe::8"]);
    // The name as asked is the name answered (case kept).
    assert_eq!(
        aaaa.answers()[0].name().to_ascii(),
        "ECHO.Demo.svc.clusterset.local."
    );
}

#[test]
fn named_ports_have_srv_records() {
    let z = zone();
    let srv = ask(
        &z,
        "_http._tcp.echo.demo.svc.clusterset.local.",
        RecordType::SRV,
    );
    assert_eq!(srv.response_code(), ResponseCode::NoError);
    let RData::SRV(s) = srv.answers()[0].data() else {
        panic!("{srv:?}")
    };
    assert_eq!(s.port(), 7000);
    assert_eq!(s.target().to_ascii(), "echo.demo.svc.clusterset.local.");
    assert_eq!(srv.additionals().len(), 2, "the target's A and AAAA");
    let udp = ask(
        &z,
        "_dns._udp.echo.demo.svc.clusterset.local.",
        RecordType::SRV,
    );
    assert_eq!(udp.answers().len(), 1);
    // Not the protocol of that port; unnamed ports have none.
    let wrong = ask(
        &z,
        "_dns._tcp.echo.demo.svc.clusterset.local.",
        RecordType::SRV,
    );
    assert_eq!(wrong.response_code(), ResponseCode::NXDomain);
    // `_tcp.echo...` exists because `_http._tcp.echo...` does.
    let ent = ask(&z, "_tcp.echo.demo.svc.clusterset.local.", RecordType::SRV);
    assert_eq!(ent.response_code(), ResponseCode::NoError);
    assert!(ent.answers().is_empty());
}

#[test]
fn what_is_not_imported_does_not_exist() {
    let z = zone();
    for name in [
        "nope.demo.svc.clusterset.local.",
        // Headless without a ready endpoint; imported without an address yet.
        "db.demo.svc.clusterset.local.",
        "new.demo.svc.clusterset.local.",
        "x.echo.demo.svc.clusterset.local.",
    ] {
        let r = ask(&z, name, RecordType::A);
        assert_eq!(r.response_code(), ResponseCode::NXDomain, "{name}");
        assert!(r.answers().is_empty());
        // The SOA lets resolvers cache the negative answer.
        assert!(matches!(r.name_servers()[0].data(), RData::SOA(_)));
    }
    // Interior names and known names of another type: NODATA.
    for (name, t) in [
        ("demo.svc.clusterset.local.", RecordType::A),
        ("svc.clusterset.local.", RecordType::A),
        ("clusterset.local.", RecordType::A),
        ("echo.demo.svc.clusterset.local.", RecordType::MX),
    ] {
        let r = ask(&z, name, t);
        assert_eq!(r.response_code(), ResponseCode::NoError, "{name}");
        assert!(r.answers().is_empty(), "{name}");
    }
    let soa = ask(&z, "clusterset.local.", RecordType::SOA);
    let RData::SOA(s) = soa.answers()[0].data() else {
        panic!("{soa:?}")
    };
    assert_eq!(s.serial(), 7);
}

#[test]
fn other_zones_and_odd_queries_are_refused() {
    let z = zone();
    for name in [
        "echo.demo.svc.cluster.local.",
        "example.com.",
        "local.",
        ".",
    ] {
        let r = ask(&z, name, RecordType::A);
        assert_eq!(r.response_code(), ResponseCode::Refused, "{name}");
        assert!(!r.authoritative());
    }
    // Two questions, none, another opcode, a response.
    let q = Query::query(
        Name::from_ascii("echo.demo.svc.clusterset.local.").unwrap(),
        RecordType::A,
    );
    let mut two = Message::new();
    two.add_query(q.clone()).add_query(q.clone());
    assert_eq!(
        z.answer(&two).unwrap().response_code(),
        ResponseCode::FormErr
    );
    assert_eq!(
        z.answer(&Message::new()).unwrap().response_code(),
        ResponseCode::FormErr
    );
    let mut notify = Message::new();
    notify.set_op_code(OpCode::Notify).add_query(q.clone());
    assert_eq!(
        z.answer(&notify).unwrap().response_code(),
        ResponseCode::NotImp
    );
    let mut resp = Message::new();
    resp.set_message_type(MessageType::Response).add_query(q);
    assert!(z.answer(&resp).is_none());
}

#[test]
fn the_serial_moves_only_when_names_change() {
    let a = zone();
    let same = zone().versioned(&a);
    assert_eq!(same.serial, a.serial);
    let empty = Zone::empty(Duration::from_secs(5)).versioned(&a);
    assert_eq!(empty.serial, a.serial + 1);
    assert!(empty.is_empty());
}

fn headless() -> Zone {
    use fedmesh_catalog::mcs::HeadlessEndpoint;
    let ep = |ip: &str, host: Option<&str>| HeadlessEndpoint {
        ip: ip.parse().unwrap(),
        hostname: host.map(str::to_owned),
    };
    let (name, mut imp) = import(
        "db.demo",
        vec![
            Port::named("pg", 5432, Protocol::Tcp),
            Port::new(9187, Protocol::Tcp),
        ],
        ServiceType::Headless,
    );
    let c = |s: &str| ClusterName::new(s).unwrap();
    imp.endpoints = [
        (
            c("east"),
            vec![
                ep("10.2.0.5", Some("db-0")),
                ep("fd00::2:5", Some("db-0")),
                ep("10.2.0.6", None),
            ],
        ),
        (c("west"), vec![ep("10.1.0.5", Some("db-0"))]),
    ]
    .into();
    Zone::build([(&name, &imp)], &BTreeMap::new(), Duration::from_secs(5), 1)
}

fn targets(m: &Message) -> Vec<String> {
    let mut v: Vec<String> = m
        .answers()
        .iter()
        .map(|r| match r.data() {
            RData::SRV(s) => format!("{} {}", s.port(), s.target()),
            other => format!("{other:?}"),
        })
        .collect();
    v.sort();
    v
}

#[test]
fn a_headless_service_resolves_to_every_clusters_ready_endpoints() {
    let z = headless();
    let a = ask(&z, "db.demo.svc.clusterset.local.", RecordType::A);
    assert_eq!(a.response_code(), ResponseCode::NoError);
    assert_eq!(ips(&a), ["10.1.0.5", "10.2.0.5", "10.2.0.6"]);
    let aaaa = ask(&z, "db.demo.svc.clusterset.local.", RecordType::AAAA);
    assert_eq!(ips(&aaaa), ["fd00::2:5"]);
    // One endpoint of one cluster by its hostname, every address of it.
    let one = ask(
        &z,
        "db-0.east.db.demo.svc.clusterset.local.",
        RecordType::ANY,
    );
    assert_eq!(ips(&one), ["10.2.0.5", "fd00::2:5"]);
    let west = ask(&z, "db-0.west.db.demo.svc.clusterset.local.", RecordType::A);
    assert_eq!(ips(&west), ["10.1.0.5"]);
    // Without a hostname, by its address.
    let dashed = ask(
        &z,
        "10-2-0-6.east.db.demo.svc.clusterset.local.",
        RecordType::A,
    );
    assert_eq!(ips(&dashed), ["10.2.0.6"]);
    // No record picks one cluster's backends (MCS DNS 2.4.4): NODATA.
    let cluster = ask(&z, "east.db.demo.svc.clusterset.local.", RecordType::A);
    assert_eq!(cluster.response_code(), ResponseCode::NoError);
    assert!(cluster.answers().is_empty());
    for name in [
        "db-1.east.db.demo.svc.clusterset.local.",
        "db-0.north.db.demo.svc.clusterset.local.",
    ] {
        let r = ask(&z, name, RecordType::A);
        assert_eq!(r.response_code(), ResponseCode::NXDomain, "{name}");
    }
}

#[test]
fn a_headless_services_srv_records_name_each_endpoint() {
    let z = headless();
    let srv = ask(
        &z,
        "_pg._tcp.db.demo.svc.clusterset.local.",
        RecordType::SRV,
    );
    assert_eq!(srv.response_code(), ResponseCode::NoError);
    assert_eq!(
        targets(&srv),
        [
            "5432 10-2-0-6.east.db.demo.svc.clusterset.local.",
            "5432 db-0.east.db.demo.svc.clusterset.local.",
            "5432 db-0.west.db.demo.svc.clusterset.local.",
        ]
    );
    // Each target's addresses come along.
    assert_eq!(srv.additionals().len(), 4);
    // The unnamed port has none.
    let r = ask(
        &z,
        "_9187._tcp.db.demo.svc.clusterset.local.",
        RecordType::SRV,
    );
    assert_eq!(r.response_code(), ResponseCode::NXDomain);
}
