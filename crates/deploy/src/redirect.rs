//! The pod's traffic redirection: one nftables table that sends every
//! outbound TCP connection of the pod to the sidecar's transparent
//! listener, except the sidecar's own (by UID), loopback, and the ports
//! and networks the user keeps out. Inbound is not redirected: mesh
//! callers connect to the sidecar's inbound port directly, so plain
//! traffic to the app's own ports keeps working (permissive).
//!
//! The script replaces the table whole in one nft transaction, so
//! running it again (an init container restart) leaves one copy.

use std::fmt::Write;
use std::net::IpAddr;

pub const TABLE: &str = "fedmesh";

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RedirectSpec {
    /// The sidecar's UID: its connections go out as they are.
    pub proxy_uid: u32,
    /// The sidecar's transparent outbound listener.
    pub outbound_port: u16,
    /// Destination ports left alone.
    pub skip_ports: Vec<u16>,
    /// Destination networks left alone (`10.0.0.0/8`, `fd00::/8`).
    pub skip_cidrs: Vec<Cidr>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    pub addr: IpAddr,
    pub len: u8,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("`{0}`: expected an address or ADDRESS/PREFIX (10.0.0.0/8, fd00::/8)")]
pub struct CidrError(pub String);

impl std::str::FromStr for Cidr {
    type Err = CidrError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = || CidrError(s.to_owned());
        let (a, len) = match s.split_once('/') {
            Some((a, l)) => (a, Some(l.parse::<u8>().map_err(|_| err())?)),
            None => (s, None),
        };
        let addr: IpAddr = a.parse().map_err(|_| err())?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let len = len.unwrap_or(max);
        if len > max {
            return Err(err());
        }
        Ok(Self { addr, len })
    }
}

impl std::fmt::Display for Cidr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.addr, self.len)
    }
}

impl RedirectSpec {
    /// The `nft -f -` input that installs the redirect.
    pub fn nft_script(&self) -> String {
        let mut s = String::new();
        // `add` then `delete` makes the delete safe when the table is new.
        let _ = writeln!(s, "add table inet {TABLE}");
        let _ = writeln!(s, "delete table inet {TABLE}");
        let _ = writeln!(s, "table inet {TABLE} {{");
        let _ = writeln!(s, "  chain output {{");
        let _ = writeln!(s, "    type nat hook output priority -100; policy accept;");
        let _ = writeln!(s, "    meta skuid {} return", self.proxy_uid);
        let _ = writeln!(s, "    ip daddr 127.0.0.0/8 return");
        let _ = writeln!(s, "    ip6 daddr ::1 return");
        if !self.skip_ports.is_empty() {
            let ports: Vec<String> = self.skip_ports.iter().map(u16::to_string).collect();
            let _ = writeln!(s, "    tcp dport {{ {} }} return", ports.join(", "));
        }
        for c in &self.skip_cidrs {
            let fam = if c.addr.is_ipv4() { "ip" } else { "ip6" };
            let _ = writeln!(s, "    {fam} daddr {c} return");
        }
        let _ = writeln!(
            s,
            "    meta l4proto tcp redirect to :{}",
            self.outbound_port
        );
        let _ = writeln!(s, "  }}");
        let _ = writeln!(s, "}}");
        s
    }

    /// Removes the redirect.
    pub fn undo_script() -> String {
        format!("add table inet {TABLE}\ndelete table inet {TABLE}\n")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn script_exempts_the_proxy_loopback_and_skips() {
        let s = RedirectSpec {
            proxy_uid: 1337,
            outbound_port: 15001,
            skip_ports: vec![5432, 6379],
            skip_cidrs: vec![
                "169.254.169.254".parse().unwrap(),
                "fd00::/8".parse().unwrap(),
            ],
        }
        .nft_script();
        let lines: Vec<&str> = s.lines().map(str::trim).collect();
        let at = |l: &str| {
            lines
                .iter()
                .position(|x| *x == l)
                .unwrap_or_else(|| panic!("no `{l}` in\n{s}"))
        };
        // Every exemption comes before the redirect.
        let redirect = at("meta l4proto tcp redirect to :15001");
        for l in [
            "meta skuid 1337 return",
            "ip daddr 127.0.0.0/8 return",
            "tcp dport { 5432, 6379 } return",
            "ip daddr 169.254.169.254/32 return",
            "ip6 daddr fd00::/8 return",
        ] {
            assert!(at(l) < redirect, "{l}");
        }
        assert!(lines[0] == "add table inet fedmesh" && lines[1] == "delete table inet fedmesh");
    }

    #[test]
    fn cidrs_parse_or_name_the_input() {
        assert_eq!("10.0.0.0/8".parse::<Cidr>().unwrap().len, 8);
        assert!("10.0.0.0/33".parse::<Cidr>().is_err());
        assert!("fd00::/129".parse::<Cidr>().is_err());
        assert_eq!(
            "nope".parse::<Cidr>().unwrap_err().to_string(),
            "`nope`: expected an address or ADDRESS/PREFIX (10.0.0.0/8, fd00::/8)"
        );
    }
}
