#![allow(clippy::unwrap_used, clippy::expect_used)]
//! Property tests: valid headers round-trip; random and mutated bytes never
//! panic and never decode past their own length.

use std::time::Duration;

use fedmesh_wire::*;
use proptest::prelude::*;

fn label() -> impl Strategy<Value = String> {
    "[a-z]([a-z0-9-]{0,20}[a-z0-9])?"
}

fn target() -> impl Strategy<Value = Target> {
    prop_oneof![
        (label(), label(), 1u16..).prop_map(|(n, ns, port)| Target::Service {
            name: ServiceName::new(&n, &ns).unwrap(),
            port
        }),
        (any::<[u8; 4]>(), 1u16..).prop_map(|(ip, p)| Target::Endpoint((ip, p).into())),
        (any::<[u8; 16]>(), 1u16..).prop_map(|(ip, p)| Target::Endpoint((ip, p).into())),
    ]
}

fn header() -> impl Strategy<Value = Header> {
    (
        target(),
        proptest::option::of("spiffe://[a-z]{1,10}/[a-z]{1,10}"),
        proptest::option::of(
            (
                "[0-9a-f]{31}[1-9a-f]",
                "[0-9a-f]{15}[1-9a-f]",
                "[0-9a-f]{2}",
            )
                .prop_map(|(t, p, f)| Traceparent::parse(&format!("00-{t}-{p}-{f}")).unwrap()),
        ),
        proptest::option::of(0u32..).prop_map(|d| d.map(|ms| Duration::from_millis(ms.into()))),
        any::<u8>(),
        proptest::option::of(any::<u64>()),
        proptest::option::of("[a-z][a-z0-9-]{0,20}[a-z0-9]"),
    )
        .prop_map(
            |(target, source, traceparent, deadline, hops, connection_id, cluster)| Header {
                target,
                source,
                traceparent,
                deadline,
                hops,
                connection_id,
                cluster,
            },
        )
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

    #[test]
    fn valid_headers_round_trip(h in header(), tail in proptest::collection::vec(any::<u8>(), 0..32)) {
        let l = Limits::default();
        let mut b = h.to_bytes(&l).unwrap();
        let n = b.len();
        b.extend_from_slice(&tail);
        let (got, used) = Header::decode(&b, &l).unwrap();
        prop_assert_eq!(got, h);
        prop_assert_eq!(used, n);
        // Every strict prefix is incomplete, never an error about content.
        for cut in [0, 1, n / 2, n - 1] {
            let is_incomplete = matches!(Header::decode(&b[..cut], &l), Err(DecodeError::Incomplete { .. }));
            prop_assert!(is_incomplete);
        }
    }

    #[test]
    fn random_bytes_never_panic(b in proptest::collection::vec(any::<u8>(), 0..512)) {
        let l = Limits::default();
        if let Ok((_, used)) = Header::decode(&b, &l) {
            prop_assert!(used <= b.len());
        }
        if let Ok((_, used)) = Status::decode(&b) {
            prop_assert!(used <= b.len());
        }
        let _ = Header::decode_body(&b);
    }

    #[test]
    fn mutated_headers_never_panic(
        h in header(),
        flips in proptest::collection::vec((any::<usize>(), any::<u8>()), 1..8),
    ) {
        let l = Limits::default();
        let mut b = h.to_bytes(&l).unwrap();
        for (i, x) in flips {
            let i = i % b.len();
            b[i] ^= x;
        }
        if let Ok((h2, used)) = Header::decode(&b, &l) {
            prop_assert!(used <= b.len());
            // Whatever decodes re-encodes to something that decodes the same.
            let again = h2.to_bytes(&l).unwrap();
            prop_assert_eq!(Header::decode(&again, &l).unwrap().0, h2);
        }
    }
}
