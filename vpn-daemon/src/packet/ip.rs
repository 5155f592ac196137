//! IP packets from clients: the checks both transports make before a
//! packet goes anywhere, and the destination a packet to a client has.

use std::net::IpAddr;

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
}
