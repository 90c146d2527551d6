//! Federation store records: anyone with write access to the store can put
//! any bytes under any key, so every decoder of a store value (cluster
//! info, service exports, leave markers, ClusterSet IP records) and the key
//! parser must answer with a typed error whose text stays bounded, never a
//! panic.
#![no_main]

use std::sync::OnceLock;

use fedmesh_catalog::ClusterName;
use fedmesh_federation::clusterset;
use fedmesh_federation::keys::Key;
use fedmesh_federation::records::{ClusterInfo, LeftRecord, ServiceRecord};
use fedmesh_wire::ServiceName;
use libfuzzer_sys::fuzz_target;

/// Longest error text a store value may produce (it is logged).
const MAX_ERROR: usize = 2048;

fn keys() -> &'static (Key, Key) {
    static KEYS: OnceLock<(Key, Key)> = OnceLock::new();
    KEYS.get_or_init(|| {
        let east = ClusterName::new("east").expect("name");
        let echo = ServiceName::new("echo", "demo").expect("name");
        (Key::Info(east.clone()), Key::Service(east, echo))
    })
}

fn bounded<T, E: std::fmt::Display>(r: Result<T, E>) {
    if let Err(e) = r {
        let text = e.to_string();
        assert!(
            text.len() <= MAX_ERROR,
            "{} bytes: {}",
            text.len(),
            &text[..200]
        );
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&kind, rest)) = data.split_first() else {
        return;
    };
    let (info, service) = keys();
    match kind % 5 {
        0 => bounded(Key::parse(&String::from_utf8_lossy(rest))),
        1 => bounded(ClusterInfo::decode(info, rest)),
        2 => bounded(ServiceRecord::decode(service, rest)),
        3 => bounded(LeftRecord::decode(rest)),
        _ => {
            // key, newline, value: both come from the store.
            let split = rest.iter().position(|b| *b == b'\n').unwrap_or(rest.len());
            let key = String::from_utf8_lossy(&rest[..split]);
            let value = rest.get(split + 1..).unwrap_or_default();
            bounded(clusterset::decode(&key, value));
        }
    }
});
