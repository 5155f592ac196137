//! Segmentation offload in user space, the download half of `gro.rs`.
//!
//! The TUN device is opened with TCP segmentation and checksum offload
//! (`TUN_F_TSO4 | TUN_F_TSO6 | TUN_F_CSUM`), so the large TCP packets a
//! server's TSO builds cross the gateway's forwarding path, the TC programs
//! and the TUN queue whole, up to 64 KiB per packet, and one `read` returns
//! what used to take forty. Here each such packet is cut into the packets
//! the client gets, exactly as the kernel's `tcp_gso_segment` would have:
//!
//! - every segment carries the headers, `gso_size` payload bytes (the last
//!   one the rest), its own sequence number, IP length and (IPv4) ID;
//! - FIN and PSH only on the last segment, CWR only on the first;
//! - IP header and TCP checksums computed in full (the client's kernel
//!   verifies them: openconnect writes without offload information).
//!
//! A packet without segmentation but with a partial checksum
//! (`VIRTIO_NET_HDR_F_NEEDS_CSUM`, e.g. UDP from a local socket) gets its
//! checksum completed the way `skb_checksum_help` does.

use crate::packet::csum::{checksum, pseudo_header};

const NEEDS_CSUM: u8 = 1;
const GSO_NONE: u8 = 0;
const GSO_TCPV4: u8 = 1;
const GSO_TCPV6: u8 = 4;
const GSO_ECN: u8 = 0x80;

const TCP_FIN: u8 = 0x01;
const TCP_PSH: u8 = 0x08;
const TCP_CWR: u8 = 0x80;

/// A packet read from the TUN device with its virtio-net header, as the
/// packets to send: [`Self::count`] of them, each written by
/// [`Self::write`].
#[derive(Debug)]
pub struct Packets<'a> {
    pkt: &'a [u8],
    kind: Kind,
}

#[derive(Debug)]
enum Kind {
    /// Sent as it is.
    Whole,
    /// Sent as it is once the checksum at `field` covers `start..`.
    Csum { start: usize, field: usize },
    /// Cut into TCP segments of `mss` payload bytes.
    Tcp {
        v6: bool,
        /// Offset of the TCP header, and of the payload.
        l4: usize,
        hdr_len: usize,
        mss: usize,
    },
}

/// Why a packet from the TUN device can't be sent (the kernel built it,
/// so this means a kernel feature we did not ask for).
#[derive(Debug, PartialEq, Eq)]
pub struct Unsupported(pub &'static str);

impl<'a> Packets<'a> {
    /// `vnet` is the virtio-net header in front of `pkt`.
    pub fn parse(vnet: &[u8], pkt: &'a [u8]) -> Result<Self, Unsupported> {
        let Some(&[flags, gso_type, _, _, g0, g1, s0, s1, o0, o1]) =
            vnet.get(..crate::packet::gro::VNET_HDR_LEN)
        else {
            return Err(Unsupported("short virtio-net header"));
        };
        let gso_size = usize::from(u16::from_ne_bytes([g0, g1]));
        let start = usize::from(u16::from_ne_bytes([s0, s1]));
        let field = start + usize::from(u16::from_ne_bytes([o0, o1]));
        let kind = match gso_type & !GSO_ECN {
            GSO_NONE if flags & NEEDS_CSUM == 0 => Kind::Whole,
            GSO_NONE => {
                if field + 2 > pkt.len() {
                    return Err(Unsupported("checksum offset beyond the packet"));
                }
                Kind::Csum { start, field }
            }
            t @ (GSO_TCPV4 | GSO_TCPV6) => {
                let v6 = t == GSO_TCPV6;
                // The TCP header follows the IP header: right after an
                // IPv4 header of IHL words (at least 5), after the fixed
                // IPv6 header or its extension headers.
                let ok_ip = match pkt.first().map(|b| b >> 4) {
                    Some(4) => {
                        !v6 && pkt.len() >= 20
                            && pkt[9] == 6
                            && start >= 20
                            && start == usize::from(pkt[0] & 15) * 4
                    }
                    Some(6) => v6 && pkt.len() >= 40 && start >= 40,
                    _ => false,
                };
                // The kernel points csum_start at the TCP header.
                if !ok_ip || flags & NEEDS_CSUM == 0 || start + 20 > pkt.len() || gso_size == 0 {
                    return Err(Unsupported("malformed TCP segmentation request"));
                }
                let hdr_len = start + usize::from(pkt[start + 12] >> 4) * 4;
                if hdr_len > pkt.len() || hdr_len < start + 20 {
                    return Err(Unsupported("TCP header beyond the packet"));
                }
                if pkt.len() - hdr_len <= gso_size {
                    // One segment: only the checksum is left to do.
                    Kind::Csum {
                        start,
                        field: start + 16,
                    }
                } else {
                    Kind::Tcp {
                        v6,
                        l4: start,
                        hdr_len,
                        mss: gso_size,
                    }
                }
            }
            _ => return Err(Unsupported("segmentation type not enabled")),
        };
        Ok(Packets { pkt, kind })
    }

    /// How many packets this is.
    pub fn count(&self) -> usize {
        match self.kind {
            Kind::Tcp { hdr_len, mss, .. } => (self.pkt.len() - hdr_len).div_ceil(mss),
            _ => 1,
        }
    }

    /// The length of the longest packet (what `write`'s buffer must hold).
    pub fn max_len(&self) -> usize {
        match self.kind {
            Kind::Tcp { hdr_len, mss, .. } => hdr_len + mss,
            _ => self.pkt.len(),
        }
    }

    /// The packet as read: its addresses are every segment's.
    pub fn packet(&self) -> &'a [u8] {
        self.pkt
    }

    /// Writes packet `i` (< [`Self::count`]) to the start of `out` (at
    /// least [`Self::max_len`] long); returns its length.
    pub fn write(&self, i: usize, out: &mut [u8]) -> usize {
        let p = self.pkt;
        match self.kind {
            Kind::Whole => {
                out[..p.len()].copy_from_slice(p);
                p.len()
            }
            Kind::Csum { start, field } => {
                let o = &mut out[..p.len()];
                o.copy_from_slice(p);
                // The field holds the pseudo-header sum; the sum over the
                // rest completes it (a zero result is sent as 0xffff).
                let c = !checksum(&o[start..], 0);
                let c = if c == 0 { 0xffff } else { c };
                o[field..field + 2].copy_from_slice(&c.to_be_bytes());
                p.len()
            }
            Kind::Tcp {
                v6,
                l4,
                hdr_len,
                mss,
            } => {
                let off = hdr_len + i * mss;
                let payload = &p[off..(off + mss).min(p.len())];
                let len = hdr_len + payload.len();
                let o = &mut out[..len];
                o[..hdr_len].copy_from_slice(&p[..hdr_len]);
                o[hdr_len..].copy_from_slice(payload);
                let last = off + mss >= p.len();
                // IP: length, and for IPv4 the ID and header checksum.
                if v6 {
                    o[4..6].copy_from_slice(&((len - 40) as u16).to_be_bytes());
                } else {
                    let ihl = l4;
                    o[2..4].copy_from_slice(&(len as u16).to_be_bytes());
                    let id = u16::from_be_bytes([p[4], p[5]]).wrapping_add(i as u16);
                    o[4..6].copy_from_slice(&id.to_be_bytes());
                    o[10..12].fill(0);
                    let c = !checksum(&o[..ihl], 0);
                    o[10..12].copy_from_slice(&c.to_be_bytes());
                }
                // TCP: sequence number, flags, checksum.
                let t = l4;
                let seq = u32::from_be_bytes([p[t + 4], p[t + 5], p[t + 6], p[t + 7]])
                    .wrapping_add((i * mss) as u32);
                o[t + 4..t + 8].copy_from_slice(&seq.to_be_bytes());
                if !last {
                    o[t + 13] &= !(TCP_FIN | TCP_PSH);
                }
                if i > 0 {
                    o[t + 13] &= !TCP_CWR;
                }
                o[t + 16..t + 18].fill(0);
                let pseudo = if v6 {
                    pseudo_header(&o[8..24], &o[24..40], 6, len - t)
                } else {
                    pseudo_header(&o[12..16], &o[16..20], 6, len - t)
                };
                let c = !checksum(&o[t..], pseudo);
                o[t + 16..t + 18].copy_from_slice(&c.to_be_bytes());
                len
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A TCP packet with `payload` bytes (a counting pattern from `seq`),
    /// and a valid IP header checksum.
    fn tcp(v6: bool, seq: u32, payload: usize, flags: u8) -> Vec<u8> {
        let ip = if v6 { 40 } else { 20 };
        let mut p = vec![0u8; ip + 20 + payload];
        let total = p.len();
        if v6 {
            p[0] = 0x60;
            p[4..6].copy_from_slice(&((total - 40) as u16).to_be_bytes());
            p[6] = 6;
            p[7] = 64;
            p[8] = 0xfd;
            p[23] = 2;
            p[24] = 0xfd;
            p[39] = 9;
        } else {
            p[0] = 0x45;
            p[2..4].copy_from_slice(&(total as u16).to_be_bytes());
            p[4..6].copy_from_slice(&0xfffeu16.to_be_bytes());
            p[6] = 0x40;
            p[8] = 64;
            p[9] = 6;
            p[12..16].copy_from_slice(&[198, 18, 2, 2]);
            p[16..20].copy_from_slice(&[198, 19, 0, 9]);
            let c = !checksum(&p[..20], 0);
            p[10..12].copy_from_slice(&c.to_be_bytes());
        }
        let t = ip;
        p[t..t + 2].copy_from_slice(&5201u16.to_be_bytes());
        p[t + 2..t + 4].copy_from_slice(&40000u16.to_be_bytes());
        p[t + 4..t + 8].copy_from_slice(&seq.to_be_bytes());
        p[t + 8..t + 12].copy_from_slice(&77u32.to_be_bytes());
        p[t + 12] = 5 << 4;
        p[t + 13] = flags;
        p[t + 14..t + 16].copy_from_slice(&1000u16.to_be_bytes());
        for (i, b) in p[t + 20..].iter_mut().enumerate() {
            *b = (seq as usize + i) as u8;
        }
        p
    }

    fn tcp_checksum_ok(p: &[u8]) -> bool {
        let (t, pseudo) = if p[0] >> 4 == 6 {
            (40, pseudo_header(&p[8..24], &p[24..40], 6, p.len() - 40))
        } else {
            (20, pseudo_header(&p[12..16], &p[16..20], 6, p.len() - 20))
        };
        checksum(&p[t..], pseudo) == 0xffff
    }

    fn vnet(gso_type: u8, hdr_len: usize, mss: usize, start: usize) -> [u8; 10] {
        let mut h = [0u8; 10];
        h[0] = NEEDS_CSUM;
        h[1] = gso_type;
        h[2..4].copy_from_slice(&(hdr_len as u16).to_ne_bytes());
        h[4..6].copy_from_slice(&(mss as u16).to_ne_bytes());
        h[6..8].copy_from_slice(&(start as u16).to_ne_bytes());
        h[8..10].copy_from_slice(&16u16.to_ne_bytes());
        h
    }

    /// What the kernel's segmentation would produce: `tcp()` for each
    /// piece, with the flags adjusted and the IPv4 ID counting up.
    #[test]
    fn segments_match_what_the_sender_would_have_sent() {
        for v6 in [false, true] {
            let ip = if v6 { 40 } else { 20 };
            let big = tcp(v6, 0xffff_f000, 4000, 0x80 | 0x18 | 0x01);
            let gso = if v6 { GSO_TCPV6 } else { GSO_TCPV4 };
            let pk = Packets::parse(&vnet(gso, ip + 20, 1400, ip), &big).unwrap();
            assert_eq!(pk.count(), 3);
            assert_eq!(pk.max_len(), ip + 20 + 1400);
            let mut out = vec![0u8; 2000];
            let mut joined = Vec::new();
            for i in 0..3 {
                let n = pk.write(i, &mut out);
                let s = &out[..n];
                assert_eq!(n, ip + 20 + if i < 2 { 1400 } else { 1200 });
                let seq = 0xffff_f000u32.wrapping_add(1400 * i as u32);
                let flags = match i {
                    0 => 0x80 | 0x10,
                    1 => 0x10,
                    _ => 0x18 | 0x01,
                };
                let mut want = tcp(v6, seq, n - ip - 20, flags);
                if !v6 {
                    want[4..6].copy_from_slice(&0xfffeu16.wrapping_add(i as u16).to_be_bytes());
                    want[10..12].fill(0);
                    let c = !checksum(&want[..20], 0);
                    want[10..12].copy_from_slice(&c.to_be_bytes());
                    assert_eq!(checksum(&s[..20], 0), 0xffff, "IP checksum");
                }
                assert!(tcp_checksum_ok(s), "TCP checksum of segment {i}");
                // Everything but the TCP checksum field is as expected.
                let mut got = s.to_vec();
                got[ip + 16..ip + 18].fill(0);
                assert_eq!(got, want, "segment {i}, v6 {v6}");
                joined.extend_from_slice(&s[ip + 20..]);
            }
            assert_eq!(joined, big[ip + 20..], "payload in order, nothing lost");
        }
    }

    #[test]
    fn partial_checksums_are_completed() {
        // What the kernel hands over: the pseudo-header sum in the field.
        let mut p = tcp(false, 5, 333, 0x18);
        let pseudo = pseudo_header(&p[12..16], &p[16..20], 6, p.len() - 20);
        p[36..38].copy_from_slice(&checksum(&[], pseudo).to_be_bytes());
        // A single-segment GSO packet and a plain partial checksum alike.
        for h in [vnet(GSO_TCPV4, 40, 1400, 20), vnet(GSO_NONE, 0, 0, 20)] {
            let pk = Packets::parse(&h, &p).unwrap();
            assert_eq!(pk.count(), 1);
            let mut out = vec![0u8; 2000];
            let n = pk.write(0, &mut out);
            assert!(tcp_checksum_ok(&out[..n]));
        }
        // No offload: untouched.
        let pk = Packets::parse(&[0; 10], &p).unwrap();
        let mut out = vec![0u8; 2000];
        let n = pk.write(0, &mut out);
        assert_eq!(&out[..n], &p[..]);
    }

    #[test]
    fn requests_we_did_not_enable_are_refused() {
        let p = tcp(false, 5, 3000, 0x10);
        // UDP segmentation (TUN_F_USO4 is not enabled).
        assert!(Packets::parse(&vnet(5, 40, 1400, 20), &p).is_err());
        // TCPv6 type on an IPv4 packet, zero MSS, offsets out of range.
        assert!(Packets::parse(&vnet(GSO_TCPV6, 40, 1400, 20), &p).is_err());
        assert!(Packets::parse(&vnet(GSO_TCPV4, 40, 0, 20), &p).is_err());
        assert!(Packets::parse(&vnet(GSO_TCPV4, 40, 1400, 4000), &p).is_err());
        assert!(Packets::parse(&vnet(GSO_NONE, 0, 0, 3030), &p).is_err());
        assert!(Packets::parse(&[0; 4], &p).is_err());
    }

    /// Found by the tcp_packets fuzz target: a TCP header said to start
    /// inside the IP header (IPv6 at 0, IPv4 with an IHL below 5) made a
    /// segment shorter than its IP header, and its length underflow.
    #[test]
    fn a_tcp_header_inside_the_ip_header_is_refused() {
        for start in [0, 20, 39] {
            let mut v6 = tcp(true, 5, 3000, 0x10);
            // A data offset of 5 where the header is said to start.
            v6[start + 12] = 0x50;
            assert!(Packets::parse(&vnet(GSO_TCPV6, start + 20, 8, start), &v6).is_err());
        }
        let mut v4 = tcp(false, 5, 3000, 0x10);
        v4[0] = 0x43;
        v4[12 + 12] = 0x50;
        assert!(Packets::parse(&vnet(GSO_TCPV4, 32, 8, 12), &v4).is_err());
    }
}
