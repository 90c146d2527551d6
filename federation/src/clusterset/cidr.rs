//! IPv4 and IPv6 CIDRs as ClusterSet IP ranges.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::str::FromStr;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    base: IpAddr,
    prefix: u8,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CidrError {
    #[error("{0:?} is not a CIDR (ADDRESS/PREFIX)")]
    Parse(String),
    #[error("{0}: address bits set past the prefix (did you mean {1}?)")]
    HostBits(String, String),
    #[error("{0} has no address to allocate (IPv4 needs /30 or shorter, IPv6 /126 or shorter)")]
    TooSmall(String),
    #[error("{0} is a special-purpose range (loopback, link-local, multicast or unspecified)")]
    Special(String),
    #[error("{0} overlaps {1}")]
    Overlap(String, String),
    #[error("{0}: one CIDR per IP family")]
    TwoOfAFamily(String),
    #[error("no CIDR given")]
    Empty,
}

impl FromStr for Cidr {
    type Err = CidrError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || CidrError::Parse(s.chars().take(64).collect());
        let (a, p) = s.split_once('/').ok_or_else(bad)?;
        let base: IpAddr = a.parse().map_err(|_| bad())?;
        let prefix: u8 = p.parse().map_err(|_| bad())?;
        if prefix > bits(base) {
            return Err(bad());
        }
        let c = Cidr { base, prefix };
        let masked = c.nth(0).ok_or_else(bad)?;
        if masked != base {
            return Err(CidrError::HostBits(
                s.to_owned(),
                format!("{masked}/{prefix}"),
            ));
        }
        Ok(c)
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.base, self.prefix)
    }
}

fn bits(ip: IpAddr) -> u8 {
    if ip.is_ipv4() {
        32
    } else {
        128
    }
}

fn to_u128(ip: IpAddr) -> u128 {
    match ip {
        IpAddr::V4(v) => u128::from(u32::from(v)),
        IpAddr::V6(v) => u128::from(v),
    }
}

impl Cidr {
    pub fn is_v4(&self) -> bool {
        self.base.is_ipv4()
    }

    fn host_bits(&self) -> u32 {
        u32::from(bits(self.base) - self.prefix)
    }

    fn mask(&self) -> u128 {
        let host = self.host_bits();
        let all = if self.is_v4() {
            u128::from(u32::MAX)
        } else {
            u128::MAX
        };
        if host >= 128 {
            0
        } else {
            all & !((1u128 << host) - 1)
        }
    }

    /// The `i`-th address of the range (0: the network address).
    fn nth(&self, i: u128) -> Option<IpAddr> {
        let n = (to_u128(self.base) & self.mask()).checked_add(i)?;
        Some(if self.is_v4() {
            IpAddr::V4(Ipv4Addr::from(u32::try_from(n).ok()?))
        } else {
            IpAddr::V6(Ipv6Addr::from(n))
        })
    }

    pub fn contains(&self, ip: IpAddr) -> bool {
        ip.is_ipv4() == self.is_v4() && to_u128(ip) & self.mask() == to_u128(self.base)
    }

    pub fn overlaps(&self, other: &Cidr) -> bool {
        self.contains(other.base) || other.contains(self.base)
    }

    /// Addresses that may be handed out: all but the first and the last
    /// (network and broadcast for IPv4; the subnet-router anycast address
    /// and, for symmetry, the last for IPv6).
    pub fn usable_count(&self) -> u128 {
        let host = self.host_bits();
        let size = if host >= 128 {
            u128::MAX
        } else {
            1u128 << host
        };
        size.saturating_sub(2)
    }

    pub fn usable_nth(&self, i: u128) -> Option<IpAddr> {
        (i < self.usable_count()).then(|| self.nth(i + 1)).flatten()
    }

    /// Whether addresses can be allocated from it at all.
    pub fn usable(&self) -> Result<(), CidrError> {
        let special = match self.base {
            IpAddr::V4(v) => {
                v.is_loopback()
                    || v.is_link_local()
                    || v.is_multicast()
                    || v.is_unspecified()
                    || v.is_broadcast()
            }
            IpAddr::V6(v) => {
                v.is_loopback()
                    || v.is_multicast()
                    || v.is_unspecified()
                    || (v.segments()[0] & 0xffc0) == 0xfe80
            }
        };
        if special || self.prefix == 0 {
            return Err(CidrError::Special(self.to_string()));
        }
        if self.usable_count() == 0 {
            return Err(CidrError::TooSmall(self.to_string()));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn c(s: &str) -> Cidr {
        s.parse().unwrap()
    }

    #[test]
    fn parses_contains_and_counts() {
        let v4 = c("241.0.0.0/30");
        assert_eq!(v4.usable_count(), 2);
        assert_eq!(v4.usable_nth(0), Some("241.0.0.1".parse().unwrap()));
        assert_eq!(v4.usable_nth(1), Some("241.0.0.2".parse().unwrap()));
        assert_eq!(v4.usable_nth(2), None);
        assert!(v4.contains("241.0.0.3".parse().unwrap()));
        assert!(!v4.contains("241.0.0.4".parse().unwrap()));
        assert!(!v4.contains("::1".parse().unwrap()));
        let v6 = c("fd00:fe::/112");
        assert_eq!(v6.usable_count(), 65_534);
        assert_eq!(v6.usable_nth(0), Some("fd00:fe::1".parse().unwrap()));
        assert!(c("fd00::/8").overlaps(&v6));
        assert!(!c("241.0.1.0/24").overlaps(&c("241.0.0.0/24")));
        assert_eq!(c("8000::/1").usable_count(), (1u128 << 127) - 2);
    }

    #[test]
    fn refuses_what_cannot_be_allocated_from() {
        for (s, want) in [
            ("241.0.0.0", "not a CIDR"),
            ("241.0.0.0/33", "not a CIDR"),
            ("241.0.0.1/24", "did you mean 241.0.0.0/24"),
            ("x/8", "not a CIDR"),
        ] {
            assert!(
                s.parse::<Cidr>().unwrap_err().to_string().contains(want),
                "{s}"
            );
        }
        for (s, want) in [
            ("241.0.0.0/31", "no address"),
            ("241.0.0.4/32", "no address"),
            ("127.0.0.0/8", "special"),
            ("ff00::/8", "special"),
            ("fe80::/64", "special"),
            ("0.0.0.0/0", "special"),
        ] {
            assert!(c(s).usable().unwrap_err().to_string().contains(want), "{s}");
        }
    }
}
