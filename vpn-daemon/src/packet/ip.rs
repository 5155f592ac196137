//! IP packets from clients: the checks both transports make before a
//! packet goes anywhere, and the destination a packet to a client has.

use std::net::{IpAddr, Ipv6Addr};

/// Whether a client's packet is long enough to be the IPv4 or IPv6 packet
/// its version says (the BPF program checks the rest).
pub fn valid_ip_packet(p: &[u8]) -> bool {
    match p.first().map(|b| b >> 4) {
        Some(4) => p.len() >= 20,
        Some(6) => p.len() >= 40,
        _ => false,
    }
}

/// The destination address of an IP packet.
pub fn packet_dst(p: &[u8]) -> Option<IpAddr> {
    match p.first()? >> 4 {
        4 if p.len() >= 20 => Some(IpAddr::from(<[u8; 4]>::try_from(&p[16..20]).ok()?)),
        6 if p.len() >= 40 => Some(IpAddr::from(<[u8; 16]>::try_from(&p[24..40]).ok()?)),
        _ => None,
    }
}

/// The key a source is counted under: an IPv4 address, or an IPv6 /64
/// (IPv4-mapped IPv6 counts as IPv4).
pub fn source_key(ip: IpAddr) -> IpAddr {
    match ip.to_canonical() {
        IpAddr::V6(a) => IpAddr::V6(Ipv6Addr::from(u128::from(a) & !((1u128 << 64) - 1))),
        v4 => v4,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn packet_destination() {
        let mut v4 = [0u8; 20];
        v4[0] = 0x45;
        v4[16..20].copy_from_slice(&[198, 19, 0, 7]);
        assert_eq!(packet_dst(&v4), Some("198.19.0.7".parse().unwrap()));
        assert_eq!(packet_dst(&v4[..19]), None);
        assert_eq!(packet_dst(&[0x70; 40]), None);
    }

    #[test]
    fn sources_are_counted_per_ipv4_address_and_ipv6_64() {
        assert_eq!(source_key(addr("198.18.1.2")), addr("198.18.1.2"));
        assert_eq!(source_key(addr("::ffff:198.18.1.2")), addr("198.18.1.2"));
        assert_eq!(source_key(addr("fd00:1:2:3:4:5:6:7")), addr("fd00:1:2:3::"));
    }

    fn addr(s: &str) -> IpAddr {
        s.parse().unwrap()
    }
}
