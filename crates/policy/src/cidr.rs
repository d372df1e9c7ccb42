//! IPv4 CIDR blocks, as used for VPC address ranges and rule peers.

use std::fmt;
use std::net::Ipv4Addr;
use std::str::FromStr;

/// An IPv4 network: a network address and a prefix length (0..=32).
///
/// Always canonical: the host bits of [`network`](Self::network) are zero.
/// Text with host bits set (`10.0.0.5/24`) is rejected rather than silently
/// widened, because in a firewall rule it is far more often a typo for a /32
/// than a deliberate way to write `10.0.0.0/24`. A bare address (`10.0.0.5`)
/// means that single host, `/32`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Ipv4Cidr {
    network: Ipv4Addr,
    prefix_len: u8,
}

/// Why text or parts could not form an [`Ipv4Cidr`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CidrError {
    /// `"{0}" is not an IPv4 address`
    BadAddress(String),
    /// `prefix length "{0}" is not a number from 0 to 32`
    BadPrefixLength(String),
    /// `host bits are set in {given} (the network is {suggested})`
    HostBitsSet {
        /// The block as written.
        given: String,
        /// The canonical block the author probably meant.
        suggested: Ipv4Cidr,
    },
}

impl fmt::Display for CidrError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::BadAddress(text) => write!(f, "\"{text}\" is not an IPv4 address"),
            Self::BadPrefixLength(text) => {
                write!(f, "prefix length \"{text}\" is not a number from 0 to 32")
            }
            Self::HostBitsSet { given, suggested } => {
                write!(f, "host bits are set in {given} (the network is {suggested})")
            }
        }
    }
}

impl std::error::Error for CidrError {}

impl Ipv4Cidr {
    /// Every IPv4 address, `0.0.0.0/0`.
    pub const ANY: Self = Self { network: Ipv4Addr::UNSPECIFIED, prefix_len: 0 };

    /// The block `network/prefix_len`; rejects a prefix over 32 and host bits
    /// set in `network`.
    pub fn new(network: Ipv4Addr, prefix_len: u8) -> Result<Self, CidrError> {
        if prefix_len > 32 {
            return Err(CidrError::BadPrefixLength(prefix_len.to_string()));
        }
        let canonical = Self { network: Ipv4Addr::from(u32::from(network) & mask(prefix_len)), prefix_len };
        if canonical.network != network {
            return Err(CidrError::HostBitsSet { given: format!("{network}/{prefix_len}"), suggested: canonical });
        }
        Ok(canonical)
    }

    /// The single-address block `addr/32`.
    pub const fn host(addr: Ipv4Addr) -> Self {
        Self { network: addr, prefix_len: 32 }
    }

    /// The network address (host bits zero).
    pub const fn network(&self) -> Ipv4Addr {
        self.network
    }

    /// The number of leading bits that are fixed, 0..=32.
    pub const fn prefix_len(&self) -> u8 {
        self.prefix_len
    }

    /// Whether `addr` lies inside this block.
    pub fn contains(&self, addr: Ipv4Addr) -> bool {
        u32::from(addr) & mask(self.prefix_len) == u32::from(self.network)
    }
}

/// The netmask with the top `prefix_len` bits set; `prefix_len` is at most 32.
fn mask(prefix_len: u8) -> u32 {
    // `checked_shl` because shifting a u32 by 32 overflows: /0 has no bits set.
    u32::MAX.checked_shl(32 - u32::from(prefix_len)).unwrap_or(0)
}

impl FromStr for Ipv4Cidr {
    type Err = CidrError;

    /// Parses `a.b.c.d/len` or a bare `a.b.c.d` (meaning `/32`).
    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let (addr_text, prefix_text) = match text.split_once('/') {
            Some((addr, prefix)) => (addr, Some(prefix)),
            None => (text, None),
        };
        let network: Ipv4Addr = addr_text.parse().map_err(|_| CidrError::BadAddress(addr_text.to_owned()))?;
        let prefix_len = match prefix_text {
            None => 32,
            // u8::from_str accepts a leading '+'; a prefix length never has one.
            Some(p) if p.starts_with('+') => return Err(CidrError::BadPrefixLength(p.to_owned())),
            Some(p) => {
                p.parse::<u8>().ok().filter(|len| *len <= 32).ok_or_else(|| CidrError::BadPrefixLength(p.to_owned()))?
            }
        };
        Self::new(network, prefix_len)
    }
}

impl fmt::Display for Ipv4Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.network, self.prefix_len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cidr(text: &str) -> Ipv4Cidr {
        text.parse().unwrap()
    }

    #[test]
    fn parses_and_displays_canonical_blocks() {
        for text in ["10.0.0.0/16", "0.0.0.0/0", "10.10.0.2/32", "192.168.1.128/25"] {
            assert_eq!(cidr(text).to_string(), text);
        }
        assert_eq!(cidr("10.10.0.2"), Ipv4Cidr::host(Ipv4Addr::new(10, 10, 0, 2)));
        assert_eq!(cidr("0.0.0.0/0"), Ipv4Cidr::ANY);
    }

    #[test]
    fn contains_respects_the_prefix() {
        let block = cidr("10.0.0.0/16");
        assert!(block.contains(Ipv4Addr::new(10, 0, 0, 0)));
        assert!(block.contains(Ipv4Addr::new(10, 0, 255, 255)));
        assert!(!block.contains(Ipv4Addr::new(10, 1, 0, 0)));
        assert!(!block.contains(Ipv4Addr::new(9, 255, 255, 255)));

        assert!(Ipv4Cidr::ANY.contains(Ipv4Addr::BROADCAST));
        assert!(Ipv4Cidr::ANY.contains(Ipv4Addr::UNSPECIFIED));

        let host = cidr("10.0.0.7/32");
        assert!(host.contains(Ipv4Addr::new(10, 0, 0, 7)));
        assert!(!host.contains(Ipv4Addr::new(10, 0, 0, 6)));
    }

    #[test]
    fn rejects_malformed_text() {
        let cases = [
            ("10.0.0/8", CidrError::BadAddress("10.0.0".into())),
            ("", CidrError::BadAddress(String::new())),
            ("10.0.0.0/33", CidrError::BadPrefixLength("33".into())),
            ("10.0.0.0/", CidrError::BadPrefixLength(String::new())),
            ("10.0.0.0/+8", CidrError::BadPrefixLength("+8".into())),
            ("10.0.0.0/8/8", CidrError::BadPrefixLength("8/8".into())),
            ("10.0.0.5/24", CidrError::HostBitsSet { given: "10.0.0.5/24".into(), suggested: cidr("10.0.0.0/24") }),
        ];
        for (text, expected) in cases {
            assert_eq!(text.parse::<Ipv4Cidr>(), Err(expected), "{text:?}");
        }
    }

    #[test]
    fn host_bits_error_suggests_the_network() {
        let err = "10.0.0.5/24".parse::<Ipv4Cidr>().unwrap_err();
        assert_eq!(err.to_string(), "host bits are set in 10.0.0.5/24 (the network is 10.0.0.0/24)");
    }
}
