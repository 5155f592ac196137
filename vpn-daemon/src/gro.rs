//! Receive offload in user space: consecutive TCP segments of one flow
//! that arrive in the same batch are merged into one large packet, written
//! to the TUN device once with a virtio-net header asking the kernel for
//! TCP segmentation (`VIRTIO_NET_HDR_GSO_TCPV4`). Forwarding, the TC
//! programs and the receiver's TCP stack then handle one packet instead of
//! dozens — the work that dominated the gateway's CPU on uploads.
//!
//! Merged only when Linux's own GRO would: IPv4 without options or
//! fragmentation, same addresses and ports, same TCP header length and
//! options, same ACK number and window, flags ACK (PSH allowed on the last
//! segment), sequence numbers contiguous, every segment but the last of the
//! first's size, 64 KiB at most. Anything else is written as it came.

use crate::csum::checksum;

/// `struct virtio_net_hdr` (no mergeable buffers), native endian as TUN
/// uses by default on little-endian hosts.
pub const VNET_HDR_LEN: usize = 10;
const VIRTIO_NET_HDR_F_NEEDS_CSUM: u8 = 1;
const VIRTIO_NET_HDR_GSO_TCPV4: u8 = 1;
const MAX_MERGED: usize = 65_000;

/// Accumulates one flow's segments; [`Self::push`] returns what to write.
pub struct Coalescer {
    /// The merged packet, after room for the virtio-net header.
    buf: Vec<u8>,
    /// Segments in `buf` (0 = empty).
    segs: usize,
    /// Payload size of the first segment (the MSS of the merged packet).
    mss: usize,
    /// IP + TCP header length.
    hdr_len: usize,
    next_seq: u32,
    /// The last segment was shorter than `mss` or carried PSH: closed.
    closed: bool,
}

impl Default for Coalescer {
    fn default() -> Self {
        Coalescer {
            buf: Vec::with_capacity(VNET_HDR_LEN + MAX_MERGED + 2048),
            segs: 0,
            mss: 0,
            hdr_len: 0,
            next_seq: 0,
            closed: false,
        }
    }
}

/// A TCP/IPv4 segment's fields that decide merging.
struct Seg {
    ihl: usize,
    hdr_len: usize,
    seq: u32,
    flags: u8,
    payload: usize,
}

fn parse(p: &[u8]) -> Option<Seg> {
    if p.len() < 40 || p[0] != 0x45 || p[9] != 6 {
        return None;
    }
    let total = usize::from(u16::from_be_bytes([p[2], p[3]]));
    // No fragments (MF clear, offset 0); DF allowed.
    if total != p.len() || u16::from_be_bytes([p[6], p[7]]) & 0x3fff != 0 {
        return None;
    }
    let ihl = 20;
    let doff = usize::from(p[ihl + 12] >> 4) * 4;
    if doff < 20 || ihl + doff > p.len() {
        return None;
    }
    let flags = p[ihl + 13];
    // ACK, optionally PSH; nothing else (no SYN/FIN/RST/URG/ECE/CWR).
    if flags & !0x08 != 0x10 {
        return None;
    }
    Some(Seg {
        ihl,
        hdr_len: ihl + doff,
        seq: u32::from_be_bytes(p[ihl + 4..ihl + 8].try_into().unwrap()),
        flags,
        payload: p.len() - ihl - doff,
    })
}

impl Coalescer {
    pub fn is_empty(&self) -> bool {
        self.segs == 0
    }

    /// Whether `p` continues the packet being built.
    fn continues(&self, p: &[u8], s: &Seg) -> bool {
        let first = &self.buf[VNET_HDR_LEN..VNET_HDR_LEN + self.hdr_len];
        !self.closed
            && s.hdr_len == self.hdr_len
            && s.seq == self.next_seq
            && s.payload > 0
            && s.payload <= self.mss
            && self.buf.len() - VNET_HDR_LEN + s.payload <= MAX_MERGED
            // addresses, then ports + (skip seq) ack, then data offset ..
            // window, then (skip checksum) urgent pointer and options
            && p[1] == first[1]
            && p[8] == first[8]
            && p[12..20] == first[12..20]
            && p[20..24] == first[20..24]
            && p[28..32] == first[28..32]
            && p[32] == first[32]
            && p[34..36] == first[34..36]
            && p[38..self.hdr_len] == first[38..self.hdr_len]
    }

    /// Offers a packet. Returns `Some(out)` when something must be written
    /// first: the packet being built (it cannot take `p`); `p` is then
    /// held (if mergeable) or must be written as is, which
    /// [`Push::Alone`] says.
    pub fn push(&mut self, p: &[u8], out: &mut Vec<u8>) -> Push {
        let Some(s) = parse(p) else {
            return if self.is_empty() {
                Push::Alone
            } else {
                self.finish(out);
                Push::FlushedThenAlone
            };
        };
        if !self.is_empty() && self.continues(p, &s) {
            self.buf.extend_from_slice(&p[s.hdr_len..]);
            self.segs += 1;
            self.next_seq = s.seq.wrapping_add(s.payload as u32);
            if s.payload < self.mss || s.flags & 0x08 != 0 {
                self.closed = true;
            }
            // The merged header takes the last segment's PSH.
            let f = VNET_HDR_LEN + s.ihl + 13;
            self.buf[f] |= s.flags & 0x08;
            return Push::Held;
        }
        let flushed = !self.is_empty();
        if flushed {
            self.finish(out);
        }
        if s.payload == 0 {
            return if flushed {
                Push::FlushedThenAlone
            } else {
                Push::Alone
            };
        }
        self.buf.clear();
        self.buf.resize(VNET_HDR_LEN, 0);
        self.buf.extend_from_slice(p);
        self.segs = 1;
        self.mss = s.payload;
        self.hdr_len = s.hdr_len;
        self.next_seq = s.seq.wrapping_add(s.payload as u32);
        self.closed = s.flags & 0x08 != 0;
        if flushed {
            Push::FlushedThenHeld
        } else {
            Push::Held
        }
    }

    /// Moves the packet being built into `out` (virtio-net header first),
    /// ready to write; leaves the coalescer empty.
    pub fn finish(&mut self, out: &mut Vec<u8>) {
        out.clear();
        if self.segs == 0 {
            return;
        }
        let total = self.buf.len() - VNET_HDR_LEN;
        let ip = VNET_HDR_LEN;
        let ihl = 20;
        if self.segs > 1 {
            // IP: total length and header checksum for the merged packet.
            self.buf[ip + 2..ip + 4].copy_from_slice(&(total as u16).to_be_bytes());
            self.buf[ip + 10..ip + 12].copy_from_slice(&[0, 0]);
            let c = checksum(&self.buf[ip..ip + ihl], 0);
            self.buf[ip + 10..ip + 12].copy_from_slice(&(!c).to_be_bytes());
            // TCP: the kernel completes the checksum per segment from the
            // pseudo-header sum we leave in the field.
            let tcp_len = (total - ihl) as u32;
            let mut pseudo = Vec::with_capacity(12);
            pseudo.extend_from_slice(&self.buf[ip + 12..ip + 20]);
            pseudo.extend_from_slice(&[0, 6]);
            pseudo.extend_from_slice(&(tcp_len as u16).to_be_bytes());
            let c = checksum(&pseudo, 0);
            self.buf[ip + ihl + 16..ip + ihl + 18].copy_from_slice(&c.to_be_bytes());
            let h = &mut self.buf[..VNET_HDR_LEN];
            h[0] = VIRTIO_NET_HDR_F_NEEDS_CSUM;
            h[1] = VIRTIO_NET_HDR_GSO_TCPV4;
            h[2..4].copy_from_slice(&(self.hdr_len as u16).to_ne_bytes());
            h[4..6].copy_from_slice(&(self.mss as u16).to_ne_bytes());
            h[6..8].copy_from_slice(&(ihl as u16).to_ne_bytes());
            h[8..10].copy_from_slice(&16u16.to_ne_bytes());
        } else {
            self.buf[..VNET_HDR_LEN].fill(0);
        }
        std::mem::swap(out, &mut self.buf);
        self.buf.clear();
        self.segs = 0;
    }
}

/// What [`Coalescer::push`] did with a packet.
#[derive(Debug, PartialEq, Eq)]
pub enum Push {
    /// Kept for merging; nothing to write yet.
    Held,
    /// The previous packet is in `out` (write it); this one is kept.
    FlushedThenHeld,
    /// Not mergeable: write it alone.
    Alone,
    /// The previous packet is in `out` (write it first), then write this
    /// one alone.
    FlushedThenAlone,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seg(seq: u32, payload: usize, flags: u8) -> Vec<u8> {
        let mut p = vec![0u8; 20 + 32 + payload];
        let total = p.len() as u16;
        p[0] = 0x45;
        p[2..4].copy_from_slice(&total.to_be_bytes());
        p[6] = 0x40; // DF
        p[8] = 64;
        p[9] = 6;
        p[12..16].copy_from_slice(&[198, 19, 0, 5]);
        p[16..20].copy_from_slice(&[198, 18, 2, 2]);
        p[20..22].copy_from_slice(&40000u16.to_be_bytes());
        p[22..24].copy_from_slice(&5201u16.to_be_bytes());
        p[24..28].copy_from_slice(&seq.to_be_bytes());
        p[28..32].copy_from_slice(&7u32.to_be_bytes());
        p[32] = 8 << 4; // 32-byte header (timestamps)
        p[33] = flags;
        p[34..36].copy_from_slice(&500u16.to_be_bytes());
        p[40..52].copy_from_slice(&[1, 1, 8, 10, 0, 0, 0, 1, 0, 0, 0, 2]);
        for (i, b) in p[52..].iter_mut().enumerate() {
            *b = (seq as usize + i) as u8;
        }
        p
    }

    #[test]
    fn contiguous_segments_merge_into_one_gso_packet() {
        let mut c = Coalescer::default();
        let mut out = Vec::new();
        assert_eq!(c.push(&seg(1000, 1200, 0x10), &mut out), Push::Held);
        assert_eq!(c.push(&seg(2200, 1200, 0x10), &mut out), Push::Held);
        assert_eq!(c.push(&seg(3400, 700, 0x18), &mut out), Push::Held);
        // Closed by the short PSH segment: the next one starts anew.
        assert_eq!(
            c.push(&seg(4100, 1200, 0x10), &mut out),
            Push::FlushedThenHeld
        );
        let h = &out[..VNET_HDR_LEN];
        assert_eq!(h[0], VIRTIO_NET_HDR_F_NEEDS_CSUM);
        assert_eq!(h[1], VIRTIO_NET_HDR_GSO_TCPV4);
        assert_eq!(u16::from_ne_bytes([h[2], h[3]]), 52);
        assert_eq!(u16::from_ne_bytes([h[4], h[5]]), 1200);
        let p = &out[VNET_HDR_LEN..];
        assert_eq!(p.len(), 52 + 3100);
        assert_eq!(usize::from(u16::from_be_bytes([p[2], p[3]])), p.len());
        assert_eq!(checksum(&p[..20], 0), 0xffff, "IP header checksum");
        assert_eq!(p[33], 0x18, "PSH carried over");
        // Payload bytes in order.
        assert_eq!(&p[52..52 + 1200], &seg(1000, 1200, 0x10)[52..]);
        assert_eq!(&p[52 + 2400..], &seg(3400, 700, 0x18)[52..]);
        // The TCP field holds the pseudo-header sum the kernel completes.
        let mut pseudo = p[12..20].to_vec();
        pseudo.extend_from_slice(&[0, 6]);
        pseudo.extend_from_slice(&((p.len() - 20) as u16).to_be_bytes());
        assert_eq!(u16::from_be_bytes([p[36], p[37]]), checksum(&pseudo, 0));
        c.finish(&mut out);
        assert_eq!(out[1], 0, "a single segment goes without GSO");
        assert_eq!(out.len(), VNET_HDR_LEN + 52 + 1200);
    }

    #[test]
    fn gaps_other_flows_and_non_data_are_not_merged() {
        let mut c = Coalescer::default();
        let mut out = Vec::new();
        assert_eq!(c.push(&seg(1000, 1200, 0x10), &mut out), Push::Held);
        // A gap in sequence numbers.
        assert_eq!(
            c.push(&seg(5000, 1200, 0x10), &mut out),
            Push::FlushedThenHeld
        );
        assert_eq!(out.len(), VNET_HDR_LEN + 52 + 1200);
        // Another ack number: a different flow state.
        let mut other = seg(6200, 1200, 0x10);
        other[28..32].copy_from_slice(&8u32.to_be_bytes());
        assert_eq!(c.push(&other, &mut out), Push::FlushedThenHeld);
        // A pure ACK and a FIN are written alone.
        assert_eq!(
            c.push(&seg(7400, 0, 0x10), &mut out),
            Push::FlushedThenAlone
        );
        assert_eq!(c.push(&seg(7400, 10, 0x11), &mut out), Push::Alone);
        // Not TCP/IPv4 at all.
        let mut udp = seg(1, 100, 0x10);
        udp[9] = 17;
        assert_eq!(c.push(&udp, &mut out), Push::Alone);
    }
}
