use super::*;

const MIN: u64 = 60_000;

fn svc(s: &str) -> ServiceName {
    ServiceName::parse(s).unwrap()
}

fn settings(cidrs: &[&str]) -> IpSettings {
    ClusterSetIpConfig {
        cidrs: cidrs.iter().map(|s| s.to_string()).collect(),
        quarantine: Duration::from_secs(600),
        release_after: Duration::from_secs(120),
    }
    .check(&[])
    .unwrap()
}

fn set(names: &[&str]) -> BTreeSet<ServiceName> {
    names.iter().map(|n| svc(n)).collect()
}

/// Applies a plan's actions as the store would (all compare-and-sets
/// succeed), at `now`.
fn apply(records: &mut BTreeMap<IpAddr, Held>, plan: &Plan, now: u64) {
    for a in &plan.actions {
        match a {
            Action::Claim { ip, service, .. } => {
                records.insert(
                    *ip,
                    Held {
                        service: service.clone(),
                        allocated_at_ms: now,
                        released_at_ms: None,
                    },
                );
            }
            Action::Release { ip, seen } => {
                records.insert(
                    *ip,
                    Held {
                        released_at_ms: Some(now),
                        ..seen.clone()
                    },
                );
            }
        }
    }
}

fn none() -> BTreeSet<IpAddr> {
    BTreeSet::new()
}

#[test]
fn one_address_per_family_for_each_service_this_cluster_exports() {
    let s = settings(&["241.0.0.0/24", "fd00:fe::/112"]);
    let mut a = Allocator::default();
    let mut records = BTreeMap::new();
    let all = set(&["echo.demo", "api.shop", "theirs.shop"]);
    let mine = set(&["echo.demo", "api.shop"]);
    let plan = a.on(&s, &records, &none(), &all, &mine, 0);
    assert_eq!(plan.actions.len(), 4, "{plan:?}");
    apply(&mut records, &plan, 0);
    let plan = a.on(&s, &records, &none(), &all, &mine, 1);
    assert!(plan.actions.is_empty(), "{plan:?}");
    let echo = &plan.assigned[&svc("echo.demo")];
    assert_eq!(echo.len(), 2);
    assert!(
        echo[0].is_ipv4() && echo[1].is_ipv6(),
        "IPv4 first: {echo:?}"
    );
    assert!(!plan.assigned.contains_key(&svc("theirs.shop")));
    let distinct: BTreeSet<_> = plan.assigned.values().flatten().collect();
    assert_eq!(distinct.len(), 4);
    // A controller that starts afresh on the same records changes nothing.
    let plan2 = Allocator::default().on(&s, &records, &none(), &all, &mine, 2);
    assert!(plan2.actions.is_empty());
    assert_eq!(plan2.assigned, plan.assigned);
    // Another cluster that does not export them still sees them.
    let other = Allocator::default().on(&s, &records, &none(), &all, &set(&[]), 2);
    assert_eq!(other.assigned, plan.assigned);
}

#[test]
fn two_live_addresses_of_a_family_keep_the_oldest() {
    let s = settings(&["241.0.0.0/24"]);
    let held = |at| Held {
        service: svc("echo.demo"),
        allocated_at_ms: at,
        released_at_ms: None,
    };
    let records: BTreeMap<IpAddr, Held> = [
        ("241.0.0.9".parse().unwrap(), held(5)),
        ("241.0.0.7".parse().unwrap(), held(9)),
    ]
    .into();
    let all = set(&["echo.demo"]);
    let plan = Allocator::default().on(&s, &records, &none(), &all, &all, 10);
    assert_eq!(
        plan.actions,
        [Action::Release {
            ip: "241.0.0.7".parse().unwrap(),
            seen: held(9)
        }]
    );
    assert_eq!(
        plan.assigned[&svc("echo.demo")],
        ["241.0.0.9".parse::<IpAddr>().unwrap()]
    );
}

#[test]
fn an_unexported_service_keeps_its_address_for_release_after_then_quarantine_holds_it() {
    let s = settings(&["241.0.0.0/30"]); // two usable addresses
    let mut a = Allocator::default();
    let mut records = BTreeMap::new();
    let echo = set(&["echo.demo"]);
    let plan = a.on(&s, &records, &none(), &echo, &echo, 0);
    apply(&mut records, &plan, 0);
    let ip = a.on(&s, &records, &none(), &echo, &echo, 1).assigned[&svc("echo.demo")][0];

    // Unexported: kept for two minutes, with a wake-up when due.
    let plan = a.on(&s, &records, &none(), &set(&[]), &set(&[]), MIN);
    assert!(plan.actions.is_empty());
    assert_eq!(
        plan.wake_at_ms,
        Some(1 + 2 * MIN),
        "two minutes after it was last seen"
    );
    assert_eq!(plan.assigned[&svc("echo.demo")], [ip]);
    // Back within the grace: nothing happened.
    assert!(a
        .on(&s, &records, &none(), &echo, &echo, 2 * MIN)
        .actions
        .is_empty());
    // Gone for good: released once due.
    let plan = a.on(&s, &records, &none(), &set(&[]), &set(&[]), 3 * MIN);
    assert!(plan.actions.is_empty());
    let plan = a.on(&s, &records, &none(), &set(&[]), &set(&[]), 5 * MIN);
    assert!(
        matches!(plan.actions[..], [Action::Release { .. }]),
        "{plan:?}"
    );
    apply(&mut records, &plan, 5 * MIN);

    // Two other services: only the one free address is handed out; the
    // quarantined one is not, until its time is up.
    let two = set(&["a.demo", "b.demo"]);
    let plan = a.on(&s, &records, &none(), &two, &two, 6 * MIN);
    let claimed: Vec<IpAddr> = plan
        .actions
        .iter()
        .filter_map(|x| match x {
            Action::Claim { ip, .. } => Some(*ip),
            _ => None,
        })
        .collect();
    assert_eq!(claimed.len(), 1);
    assert_ne!(claimed[0], ip);
    assert_eq!(plan.exhausted.len(), 1, "{plan:?}");
    assert_eq!(
        plan.wake_at_ms,
        Some(5 * MIN + 10 * MIN),
        "woken when the quarantine ends"
    );
    apply(&mut records, &plan, 6 * MIN);
    let plan = a.on(&s, &records, &none(), &two, &two, 15 * MIN);
    assert!(
        matches!(plan.actions[..], [Action::Claim { ip: got, .. }] if got == ip),
        "{plan:?}"
    );
    assert!(plan.exhausted.is_empty());
}

#[test]
fn a_service_that_comes_back_gets_its_own_address_back_at_once() {
    let s = settings(&["241.0.0.0/24"]);
    let mut a = Allocator::default();
    let mut records = BTreeMap::new();
    let echo = set(&["echo.demo"]);
    let plan = a.on(&s, &records, &none(), &echo, &echo, 0);
    apply(&mut records, &plan, 0);
    let ip = *records.keys().next().unwrap();
    let plan = a.on(&s, &records, &none(), &set(&[]), &set(&[]), 10 * MIN);
    apply(&mut records, &plan, 10 * MIN);
    let plan = a.on(&s, &records, &none(), &set(&[]), &set(&[]), 13 * MIN);
    apply(&mut records, &plan, 13 * MIN);
    assert!(records[&ip].released_at_ms.is_some());
    // Within the quarantine, the same service takes it back.
    let plan = a.on(&s, &records, &none(), &echo, &echo, 14 * MIN);
    assert!(
        matches!(plan.actions[..], [Action::Claim { ip: got, .. }] if got == ip),
        "{plan:?}"
    );
}

#[test]
fn unreadable_records_are_never_handed_out() {
    let s = settings(&["241.0.0.0/30"]);
    let both: BTreeSet<IpAddr> = ["241.0.0.1", "241.0.0.2"]
        .iter()
        .map(|s| s.parse().unwrap())
        .collect();
    let echo = set(&["echo.demo"]);
    let plan = Allocator::default().on(&s, &BTreeMap::new(), &both, &echo, &echo, 0);
    assert!(plan.actions.is_empty());
    assert_eq!(plan.exhausted[&svc("echo.demo")], ["241.0.0.0/30"]);
}

#[test]
fn config_refuses_overlaps_two_of_a_family_and_nothing() {
    let cfg = |c: &[&str]| ClusterSetIpConfig {
        cidrs: c.iter().map(|s| s.to_string()).collect(),
        quarantine: Duration::from_secs(1),
        release_after: Duration::from_secs(1),
    };
    let err = |c: &[&str], avoid: &[&str]| {
        let avoid: Vec<IpAddr> = avoid.iter().map(|a| a.parse().unwrap()).collect();
        cfg(c).check(&avoid).unwrap_err().to_string()
    };
    assert!(err(&["241.0.0.0/16", "241.0.1.0/24"], &[]).contains("overlaps"));
    assert!(err(&["241.0.0.0/16", "242.0.0.0/16"], &[]).contains("one CIDR per IP family"));
    assert!(err(&["10.0.0.0/8"], &["10.1.2.3"]).contains("overlaps 10.1.2.3"));
    assert!(err(&["241.0.0.0/31"], &[]).contains("no address"));
    assert!(err(&[], &[]).contains("no CIDR"));
    assert!(cfg(&["241.0.0.0/16", "fd00:fe::/112"]).check(&[]).is_ok());
}

#[test]
fn records_decode_strictly() {
    let ok = serde_json::to_vec(&IpRecord {
        service: "echo.demo".into(),
        cluster: "west".into(),
        allocated_at_ms: 1,
        released_at_ms: None,
    })
    .unwrap();
    let key = ip_key("241.0.0.1".parse().unwrap());
    assert_eq!(decode(&key, &ok).unwrap().1.service, svc("echo.demo"));
    assert!(matches!(
        decode(&format!("{IPS_PREFIX}nope"), &ok),
        Err(IpRecordError::Key)
    ));
    assert!(matches!(decode(&key, b"{"), Err(IpRecordError::Decode(_))));
    assert!(matches!(
        decode(
            &key,
            br#"{"service":"x","cluster":"w","allocated_at_ms":1}"#
        ),
        Err(IpRecordError::Service(_))
    ));
    assert!(matches!(
        decode(
            &key,
            br#"{"service":"echo.demo","cluster":"w","allocated_at_ms":1,"extra":1}"#
        ),
        Err(IpRecordError::Decode(_))
    ));
    assert!(matches!(
        decode(&key, &vec![b' '; 5000]),
        Err(IpRecordError::TooLarge(_))
    ));
}
