//! Socket addresses as programs write them, and as vSocket carries them.
//!
//! vSocket carries IPv4 flows (the tenant model is IPv4). Programs reach
//! them through AF_INET sockets, or through AF_INET6 sockets using
//! IPv4-mapped addresses (`::ffff:a.b.c.d`): a dual-stack server bound to
//! `::` (the default of redis, nginx and most modern servers) accepts IPv4
//! clients that way, and a client handed a mapped address connects that
//! way. Native IPv6 addresses stay on the kernel path.
//!
//! Addresses are handled here as the bytes of a `sockaddr_in` or
//! `sockaddr_in6` (hooks copy them in and out), so this module needs no
//! unsafe code and is tested on its own.

use std::net::{Ipv4Addr, Ipv6Addr, SocketAddrV4};

/// Room for any socket address (`sizeof(struct sockaddr_storage)`).
pub const STORAGE: usize = 128;
/// `sizeof(struct sockaddr_in)`.
pub const V4_LEN: usize = 16;
/// `sizeof(struct sockaddr_in6)`.
pub const V6_LEN: usize = 28;

/// The address family of a program's socket.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    V4,
    V6,
}

impl Family {
    pub fn from_domain(domain: i32) -> Option<Family> {
        match domain {
            libc::AF_INET => Some(Family::V4),
            libc::AF_INET6 => Some(Family::V6),
            _ => None,
        }
    }

    pub fn domain(self) -> i32 {
        match self {
            Family::V4 => libc::AF_INET,
            Family::V6 => libc::AF_INET6,
        }
    }
}

/// The IPv4 endpoint named by a socket address, if it names one: an
/// AF_INET address, or an AF_INET6 one that is IPv4-mapped or unspecified
/// (`::` means "every address", IPv4 ones included, on a dual-stack
/// socket; `0.0.0.0` stands for it).
pub fn parse(bytes: &[u8]) -> Option<(SocketAddrV4, Family)> {
    let family = Family::from_domain(i32::from(u16::from_ne_bytes(bytes.get(..2)?.try_into().ok()?)))?;
    let port = u16::from_be_bytes(bytes.get(2..4)?.try_into().ok()?);
    match family {
        Family::V4 if bytes.len() >= V4_LEN => {
            let ip: [u8; 4] = bytes[4..8].try_into().ok()?;
            Some((SocketAddrV4::new(Ipv4Addr::from(ip), port), family))
        }
        Family::V6 if bytes.len() >= V6_LEN => {
            let ip: [u8; 16] = bytes[8..24].try_into().ok()?;
            let ip = Ipv6Addr::from(ip);
            let v4 = if ip.is_unspecified() { Some(Ipv4Addr::UNSPECIFIED) } else { ip.to_ipv4_mapped() };
            v4.map(|v4| (SocketAddrV4::new(v4, port), family))
        }
        _ => None,
    }
}

/// `a` as a socket address of `family` (IPv4-mapped for AF_INET6; the
/// unspecified address becomes `::`). Returns the buffer and its length.
pub fn render(a: SocketAddrV4, family: Family) -> ([u8; STORAGE], usize) {
    let mut out = [0u8; STORAGE];
    out[..2].copy_from_slice(&(family.domain() as u16).to_ne_bytes());
    out[2..4].copy_from_slice(&a.port().to_be_bytes());
    match family {
        Family::V4 => {
            out[4..8].copy_from_slice(&a.ip().octets());
            (out, V4_LEN)
        }
        Family::V6 => {
            let ip = if a.ip().is_unspecified() { Ipv6Addr::UNSPECIFIED } else { a.ip().to_ipv6_mapped() };
            out[8..24].copy_from_slice(&ip.octets());
            (out, V6_LEN)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v4_bytes(ip: [u8; 4], port: u16) -> Vec<u8> {
        let mut b = vec![0u8; V4_LEN];
        b[..2].copy_from_slice(&(libc::AF_INET as u16).to_ne_bytes());
        b[2..4].copy_from_slice(&port.to_be_bytes());
        b[4..8].copy_from_slice(&ip);
        b
    }

    fn v6_bytes(ip: Ipv6Addr, port: u16) -> Vec<u8> {
        let mut b = vec![0u8; V6_LEN];
        b[..2].copy_from_slice(&(libc::AF_INET6 as u16).to_ne_bytes());
        b[2..4].copy_from_slice(&port.to_be_bytes());
        b[8..24].copy_from_slice(&ip.octets());
        b
    }

    #[test]
    fn ipv4_addresses_parse() {
        let a = parse(&v4_bytes([10, 10, 0, 3], 6379)).unwrap();
        assert_eq!(a, ("10.10.0.3:6379".parse().unwrap(), Family::V4));
    }

    #[test]
    fn mapped_and_unspecified_ipv6_addresses_are_ipv4_flows() {
        let mapped = Ipv4Addr::new(10, 10, 0, 3).to_ipv6_mapped();
        assert_eq!(parse(&v6_bytes(mapped, 80)).unwrap(), ("10.10.0.3:80".parse().unwrap(), Family::V6));
        assert_eq!(parse(&v6_bytes(Ipv6Addr::UNSPECIFIED, 80)).unwrap(), ("0.0.0.0:80".parse().unwrap(), Family::V6));
    }

    #[test]
    fn native_ipv6_and_short_or_foreign_addresses_are_not() {
        assert_eq!(parse(&v6_bytes(Ipv6Addr::LOCALHOST, 80)), None);
        assert_eq!(parse(&v6_bytes("fd00::3".parse().unwrap(), 80)), None);
        assert_eq!(parse(&v4_bytes([10, 0, 0, 1], 1)[..8]), None);
        assert_eq!(parse(&v6_bytes(Ipv6Addr::UNSPECIFIED, 1)[..16]), None);
        let mut unix = vec![0u8; 110];
        unix[..2].copy_from_slice(&(libc::AF_UNIX as u16).to_ne_bytes());
        assert_eq!(parse(&unix), None);
        assert_eq!(parse(&[]), None);
    }

    #[test]
    fn render_round_trips() {
        for a in ["10.10.0.3:6379", "0.0.0.0:0", "127.0.0.1:65535"] {
            let a: SocketAddrV4 = a.parse().unwrap();
            for family in [Family::V4, Family::V6] {
                let (bytes, len) = render(a, family);
                assert_eq!(parse(&bytes[..len]), Some((a, family)));
            }
        }
        let (bytes, len) = render("10.1.2.3:7".parse().unwrap(), Family::V6);
        assert_eq!(len, V6_LEN);
        assert_eq!(&bytes[8..24], &Ipv4Addr::new(10, 1, 2, 3).to_ipv6_mapped().octets());
    }
}
