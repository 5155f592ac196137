//! Crafted packets for `BPF_PROG_TEST_RUN`: an Ethernet header, then IPv4 or
//! IPv6 (optionally with a hop-by-hop header or as a non-first fragment),
//! then TCP, UDP, ICMP or an opaque payload.

use std::net::IpAddr;

use vpn_common::{PROTO_ICMP, PROTO_ICMP6, PROTO_TCP, PROTO_UDP};

/// What to build.
#[derive(Debug, Clone, Copy)]
pub struct Spec {
    pub src: IpAddr,
    pub dst: IpAddr,
    /// The IP protocol number.
    pub proto: u8,
    pub sport: u16,
    pub dport: u16,
    /// IPv4: a fragment with a non-zero offset. IPv6: a fragment header
    /// with a non-zero offset.
    pub later_fragment: bool,
    /// IPv6 only: put a hop-by-hop options header first.
    pub hop_by_hop: bool,
}

fn l4(proto: u8, sport: u16, dport: u16) -> Vec<u8> {
    match proto {
        PROTO_TCP => {
            let mut h = vec![0u8; 20];
            h[0..2].copy_from_slice(&sport.to_be_bytes());
            h[2..4].copy_from_slice(&dport.to_be_bytes());
            h[12] = 5 << 4;
            h[13] = 0x02; // SYN
            h
        }
        PROTO_UDP => {
            let mut h = vec![0u8; 8];
            h[0..2].copy_from_slice(&sport.to_be_bytes());
            h[2..4].copy_from_slice(&dport.to_be_bytes());
            h[4..6].copy_from_slice(&16u16.to_be_bytes());
            h.extend_from_slice(&[0u8; 8]);
            h
        }
        PROTO_ICMP | PROTO_ICMP6 => vec![8, 0, 0, 0, 0, 1, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0],
        _ => vec![0u8; 16],
    }
}

/// Builds the frame.
pub fn frame(s: &Spec) -> Vec<u8> {
    let payload = l4(s.proto, s.sport, s.dport);
    let mut f = vec![0u8; 12];
    match (s.src, s.dst) {
        (IpAddr::V4(a), IpAddr::V4(b)) => {
            f.extend_from_slice(&[0x08, 0x00]);
            let total = 20 + payload.len();
            let mut h = [0u8; 20];
            h[0] = 0x45;
            h[2..4].copy_from_slice(&(total as u16).to_be_bytes());
            if s.later_fragment {
                h[6..8].copy_from_slice(&185u16.to_be_bytes());
            }
            h[8] = 64;
            h[9] = s.proto;
            h[12..16].copy_from_slice(&a.octets());
            h[16..20].copy_from_slice(&b.octets());
            f.extend_from_slice(&h);
        }
        (IpAddr::V6(a), IpAddr::V6(b)) => {
            f.extend_from_slice(&[0x86, 0xdd]);
            let mut ext = Vec::new();
            let mut next = s.proto;
            if s.later_fragment {
                // Fragment header: next, reserved, offset 100 (x8), id.
                let mut fh = vec![next, 0];
                fh.extend_from_slice(&(100u16 << 3).to_be_bytes());
                fh.extend_from_slice(&[0, 0, 0, 1]);
                ext = fh;
                next = 44;
            }
            if s.hop_by_hop {
                let mut hbh = vec![next, 0, 1, 4, 0, 0, 0, 0];
                hbh.extend_from_slice(&ext);
                ext = hbh;
                next = 0;
            }
            let mut h = [0u8; 40];
            h[0] = 0x60;
            h[4..6].copy_from_slice(&((ext.len() + payload.len()) as u16).to_be_bytes());
            h[6] = next;
            h[7] = 64;
            h[8..24].copy_from_slice(&a.octets());
            h[24..40].copy_from_slice(&b.octets());
            f.extend_from_slice(&h);
            f.extend_from_slice(&ext);
        }
        _ => panic!("mixed address families"),
    }
    f.extend_from_slice(&payload);
    f
}

/// An IPv6 frame from `src` to `dst` whose upper layer (`proto`, with
/// ports) sits behind the extension headers `ext` (their next-header
/// numbers, in order: 0, 43, 60 with 8 bytes each, 51 (AH) with 16), so a
/// parser must walk them all to find it.
pub fn frame_v6_behind(
    src: std::net::Ipv6Addr,
    dst: std::net::Ipv6Addr,
    proto: u8,
    dport: u16,
    ext: &[u8],
) -> Vec<u8> {
    let payload = l4(proto, 40_000, dport);
    let mut chain = Vec::new();
    for (i, &h) in ext.iter().enumerate() {
        let next = ext.get(i + 1).copied().unwrap_or(proto);
        match h {
            // AH: payload length in 4-byte units, minus 2.
            51 => chain.extend_from_slice(&[next, 2, 0, 0, 0, 0, 0, 1, 0, 0, 0, 1, 0, 0, 0, 0]),
            _ => chain.extend_from_slice(&[next, 0, 1, 4, 0, 0, 0, 0]),
        }
    }
    let mut f = vec![0u8; 12];
    f.extend_from_slice(&[0x86, 0xdd]);
    let mut h = [0u8; 40];
    h[0] = 0x60;
    h[4..6].copy_from_slice(&((chain.len() + payload.len()) as u16).to_be_bytes());
    h[6] = ext.first().copied().unwrap_or(proto);
    h[7] = 64;
    h[8..24].copy_from_slice(&src.octets());
    h[24..40].copy_from_slice(&dst.octets());
    f.extend_from_slice(&h);
    f.extend_from_slice(&chain);
    f.extend_from_slice(&payload);
    f
}
