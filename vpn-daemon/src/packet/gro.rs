//! Receive offload in user space, for packets from clients (one DTLS
//! `recvmmsg` batch, or one TLS read, at a time):
//!
//! - Consecutive TCP segments of one flow are merged into one large packet,
//!   written to the TUN device once with a virtio-net header asking the
//!   kernel for TCP segmentation (`VIRTIO_NET_HDR_GSO_TCPV4`). Forwarding,
//!   the TC programs and the receiver's TCP stack then handle one packet
//!   instead of dozens. Merged only when Linux's own GRO would: IPv4
//!   without options or fragmentation, same addresses and ports, same TCP
//!   header length and options, same ACK number and window, flags ACK
//!   (PSH allowed on the last segment), sequence numbers contiguous, every
//!   segment but the last of the first's size, 64 KiB at most.
//! - A pure ACK made redundant by a later one of the same flow in the same
//!   batch is dropped (what the `cake` qdisc's ack-filter does): during a
//!   download every ACK written makes the server's TCP run, in our
//!   context, and the later ACK carries everything the earlier one did.
//!   Only plain ACKs qualify: no data, flags ACK alone, no options but
//!   timestamps (so never a SACK), and the later one must acknowledge
//!   strictly more (duplicate ACKs, the loss signal, are all kept) with
//!   timestamps not older. Nothing of the flow may come between them.
//!
//! Anything else is written as it came, and the order within a flow is
//! kept.

use crate::packet::csum::checksum;

/// `struct virtio_net_hdr` (no mergeable buffers), native endian as TUN
/// uses by default on little-endian hosts.
pub const VNET_HDR_LEN: usize = 10;
const VIRTIO_NET_HDR_F_NEEDS_CSUM: u8 = 1;
const VIRTIO_NET_HDR_GSO_TCPV4: u8 = 1;
const MAX_MERGED: usize = 65_000;
/// Flows whose latest pure ACK is held at once.
const MAX_HELD_ACKS: usize = 8;
const NO_OFFLOAD: [u8; VNET_HDR_LEN] = [0; VNET_HDR_LEN];

/// Where a [`Coalescer`] hands packets to write: the virtio-net header,
/// then the packet.
pub trait Sink {
    fn write(&mut self, vnet: &[u8], pkt: &[u8]);
}

impl<F: FnMut(&[u8], &[u8])> Sink for F {
    fn write(&mut self, vnet: &[u8], pkt: &[u8]) {
        self(vnet, pkt)
    }
}

/// Merges and thins one batch of packets; [`Self::push`] each, then
/// [`Self::finish`].
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
    /// The latest pure ACK of up to [`MAX_HELD_ACKS`] flows (reused
    /// buffers; `acks_held` of them are live).
    acks: Vec<Vec<u8>>,
    acks_held: usize,
    /// Pure ACKs dropped as redundant since the owner last took the count
    /// (`vpnctl stats` shows the DTLS workers').
    pub acks_thinned: u64,
}

impl Default for Coalescer {
    fn default() -> Self {
        // Buffers are taken at the first segment that needs them: most
        // sessions are idle most of the time, and 10,000 of them each
        // holding 66 KiB they never use was most of the daemon's memory.
        Coalescer {
            buf: Vec::new(),
            segs: 0,
            mss: 0,
            hdr_len: 0,
            next_seq: 0,
            closed: false,
            acks: (0..MAX_HELD_ACKS).map(|_| Vec::new()).collect(),
            acks_held: 0,
            acks_thinned: 0,
        }
    }
}

impl Coalescer {
    /// Lets the buffers go while nothing is held (a quiet tunnel); they
    /// are taken again by the next segment that needs them.
    pub fn release(&mut self) {
        if self.segs == 0 {
            self.buf = Vec::new();
        }
        if self.acks_held == 0 {
            self.acks.iter_mut().for_each(|a| *a = Vec::new());
        }
    }
}

/// A TCP segment's fields that decide merging and thinning (and download
/// flow control, `transport/dtls/flow_control.rs`).
pub(crate) struct Seg {
    /// IP header length (20 for IPv4, 40 for IPv6).
    pub(crate) ihl: usize,
    pub(crate) hdr_len: usize,
    pub(crate) seq: u32,
    pub(crate) ack: u32,
    pub(crate) flags: u8,
    pub(crate) payload: usize,
}

pub(crate) const ACK: u8 = 0x10;
const PSH: u8 = 0x08;

/// A TCP segment of IPv4 (no options, not a fragment) or IPv6 (no
/// extension headers); a TSO packet read from the TUN device is one too.
pub(crate) fn parse(p: &[u8]) -> Option<Seg> {
    let ihl = match p.first()? {
        0x45 if p.len() >= 40 && p[9] == 6 => {
            let total = usize::from(u16::from_be_bytes([p[2], p[3]]));
            // No fragments (MF clear, offset 0); DF allowed.
            if total != p.len() || u16::from_be_bytes([p[6], p[7]]) & 0x3fff != 0 {
                return None;
            }
            20
        }
        b if b >> 4 == 6 && p.len() >= 60 && p[6] == 6 => {
            if usize::from(u16::from_be_bytes([p[4], p[5]])) + 40 != p.len() {
                return None;
            }
            40
        }
        _ => return None,
    };
    let doff = usize::from(p[ihl + 12] >> 4) * 4;
    if doff < 20 || ihl + doff > p.len() {
        return None;
    }
    let be32 = |o: usize| u32::from_be_bytes([p[o], p[o + 1], p[o + 2], p[o + 3]]);
    Some(Seg {
        ihl,
        hdr_len: ihl + doff,
        seq: be32(ihl + 4),
        ack: be32(ihl + 8),
        flags: p[ihl + 13],
        payload: p.len() - ihl - doff,
    })
}

/// The bytes that name a TCP flow in one direction: addresses and ports.
pub(crate) fn flow<'a>(p: &'a [u8], s: &Seg) -> (&'a [u8], &'a [u8]) {
    let addrs = if s.ihl == 20 { &p[12..20] } else { &p[8..40] };
    (addrs, &p[s.ihl..s.ihl + 4])
}

/// A plain ACK that a later one can make redundant: no data, ACK alone,
/// and either no options or exactly NOP NOP timestamps.
fn thinnable(p: &[u8], s: &Seg) -> bool {
    let opts = &p[s.ihl + 20..s.hdr_len];
    s.payload == 0
        && s.flags == ACK
        && (opts.is_empty() || (opts.len() == 12 && opts[..4] == [1, 1, 8, 10]))
}

/// `a` after `b` in sequence space.
pub(crate) fn after(a: u32, b: u32) -> bool {
    (a.wrapping_sub(b) as i32) > 0
}

/// Whether the pure ACK `new` carries everything `old` does (same flow,
/// both [`thinnable`]).
fn supersedes(new: &[u8], n: &Seg, old: &[u8]) -> bool {
    let Some(o) = parse(old) else { return false };
    if n.hdr_len != o.hdr_len || n.seq != o.seq || !after(n.ack, o.ack) {
        return false;
    }
    // Same traffic class / TOS (ECN marks) too.
    if (n.ihl == 20 && new[1] != old[1]) || (n.ihl == 40 && new[..2] != old[..2]) {
        return false;
    }
    if n.hdr_len > n.ihl + 20 {
        let ts = |p: &[u8], at: usize| {
            let t = n.ihl + 24 + at;
            u32::from_be_bytes([p[t], p[t + 1], p[t + 2], p[t + 3]])
        };
        // Timestamps must not go back (PAWS), value and echo alike.
        if after(ts(old, 0), ts(new, 0)) || after(ts(old, 4), ts(new, 4)) {
            return false;
        }
    }
    true
}

impl Coalescer {
    pub fn is_empty(&self) -> bool {
        self.segs == 0 && self.acks_held == 0
    }

    /// Whether `p` continues the packet being built.
    fn continues(&self, p: &[u8], s: &Seg) -> bool {
        let first = &self.buf[VNET_HDR_LEN..VNET_HDR_LEN + self.hdr_len];
        !self.closed
            && s.ihl == 20
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

    /// Whether the packet being built belongs to `p`'s flow.
    fn merging(&self, p: &[u8], s: &Seg) -> bool {
        if self.segs == 0 || s.ihl != 20 {
            return false;
        }
        let first = &self.buf[VNET_HDR_LEN..];
        p[12..24] == first[12..24]
    }

    /// The held ACK of `p`'s flow, if any.
    fn held_ack(&self, p: &[u8], s: &Seg) -> Option<usize> {
        let f = flow(p, s);
        self.acks[..self.acks_held].iter().position(|a| {
            // Same IP version (and so the same offsets), same flow.
            a[0] >> 4 == p[0] >> 4 && parse(a).is_some_and(|o| flow(a, &o) == f)
        })
    }

    /// Writes held ACK `i` and stops holding it.
    fn release_ack(&mut self, i: usize, out: &mut impl Sink) {
        out.write(&NO_OFFLOAD, &self.acks[i]);
        self.acks_held -= 1;
        self.acks.swap(i, self.acks_held);
    }

    /// Takes a packet from a client: held (merged, or the latest ACK of its
    /// flow) or written to `out`, along with whatever it makes ready.
    pub fn push(&mut self, p: &[u8], out: &mut impl Sink) {
        self.push_parsed(p, parse(p), out);
    }

    /// [`Self::push`] of a packet the caller has already [`parse`]d.
    pub(crate) fn push_parsed(&mut self, p: &[u8], seg: Option<Seg>, out: &mut impl Sink) {
        let Some(s) = seg else {
            // Not TCP (or not a shape we handle): written now. Other
            // protocols are separate flows; nothing held must go first.
            out.write(&NO_OFFLOAD, p);
            return;
        };
        let held = self.held_ack(p, &s);
        if thinnable(p, &s) {
            if let Some(i) = held {
                if supersedes(p, &s, &self.acks[i]) {
                    self.acks[i].clear();
                    self.acks[i].extend_from_slice(p);
                    self.acks_thinned += 1;
                    return;
                }
                self.release_ack(i, out);
            }
            // Its flow's data being merged goes first.
            if self.merging(p, &s) {
                self.flush_merged(out);
            }
            if self.acks_held == MAX_HELD_ACKS {
                self.release_ack(0, out);
            }
            let a = &mut self.acks[self.acks_held];
            a.clear();
            a.extend_from_slice(p);
            self.acks_held += 1;
            return;
        }
        // Anything else of a flow with a held ACK comes after that ACK.
        if let Some(i) = held {
            self.release_ack(i, out);
        }
        if s.flags & !PSH == ACK && self.segs > 0 && self.continues(p, &s) {
            self.buf.extend_from_slice(&p[s.hdr_len..]);
            self.segs += 1;
            self.next_seq = s.seq.wrapping_add(s.payload as u32);
            if s.payload < self.mss || s.flags & PSH != 0 {
                self.closed = true;
            }
            // The merged header takes the last segment's PSH.
            let f = VNET_HDR_LEN + s.ihl + 13;
            self.buf[f] |= s.flags & PSH;
            return;
        }
        self.flush_merged(out);
        // Only plain IPv4 data segments (ACK, maybe PSH) start a merge.
        if s.ihl != 20 || s.payload == 0 || s.flags & !PSH != ACK {
            out.write(&NO_OFFLOAD, p);
            return;
        }
        if self.buf.capacity() == 0 {
            self.buf.reserve_exact(VNET_HDR_LEN + MAX_MERGED + 2048);
        }
        self.buf.clear();
        self.buf.resize(VNET_HDR_LEN, 0);
        self.buf.extend_from_slice(p);
        self.segs = 1;
        self.mss = s.payload;
        self.hdr_len = s.hdr_len;
        self.next_seq = s.seq.wrapping_add(s.payload as u32);
        self.closed = s.flags & PSH != 0;
    }

    /// Writes everything held: the end of a batch.
    pub fn finish(&mut self, out: &mut impl Sink) {
        self.flush_merged(out);
        while self.acks_held > 0 {
            self.release_ack(self.acks_held - 1, out);
        }
    }

    /// Writes the packet being built (with a GSO header when it is more
    /// than one segment).
    fn flush_merged(&mut self, out: &mut impl Sink) {
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
            let pseudo = crate::packet::csum::pseudo_header(
                &self.buf[ip + 12..ip + 16],
                &self.buf[ip + 16..ip + 20],
                6,
                total - ihl,
            );
            let c = checksum(&[], pseudo);
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
        let (vnet, pkt) = self.buf.split_at(VNET_HDR_LEN);
        out.write(vnet, pkt);
        self.buf.clear();
        self.segs = 0;
    }
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

    /// Collects what a coalescer writes: (virtio-net header, packet).
    #[derive(Default)]
    struct Written(Vec<(Vec<u8>, Vec<u8>)>);

    impl Sink for Written {
        fn write(&mut self, vnet: &[u8], pkt: &[u8]) {
            self.0.push((vnet.to_vec(), pkt.to_vec()));
        }
    }

    /// A pure ACK acknowledging `ack`, timestamp value `ts`.
    fn ack(ack: u32, ts: u32) -> Vec<u8> {
        let mut p = seg(1000, 0, 0x10);
        p[28..32].copy_from_slice(&ack.to_be_bytes());
        p[44..48].copy_from_slice(&ts.to_be_bytes());
        p
    }

    #[test]
    fn contiguous_segments_merge_into_one_gso_packet() {
        let mut c = Coalescer::default();
        let mut out = Written::default();
        c.push(&seg(1000, 1200, 0x10), &mut out);
        c.push(&seg(2200, 1200, 0x10), &mut out);
        c.push(&seg(3400, 700, 0x18), &mut out);
        assert!(out.0.is_empty(), "all held");
        // Closed by the short PSH segment: the next one starts anew.
        c.push(&seg(4100, 1200, 0x10), &mut out);
        assert_eq!(out.0.len(), 1);
        let (h, p) = &out.0[0];
        assert_eq!(h[0], VIRTIO_NET_HDR_F_NEEDS_CSUM);
        assert_eq!(h[1], VIRTIO_NET_HDR_GSO_TCPV4);
        assert_eq!(u16::from_ne_bytes([h[2], h[3]]), 52);
        assert_eq!(u16::from_ne_bytes([h[4], h[5]]), 1200);
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
        assert_eq!(out.0.len(), 2);
        assert_eq!(out.0[1].0, NO_OFFLOAD, "a single segment goes without GSO");
        assert_eq!(out.0[1].1, seg(4100, 1200, 0x10));
        assert!(c.is_empty());
    }

    #[test]
    fn gaps_other_flows_and_non_data_are_not_merged() {
        let mut c = Coalescer::default();
        let mut out = Written::default();
        c.push(&seg(1000, 1200, 0x10), &mut out);
        // A gap in sequence numbers.
        c.push(&seg(5000, 1200, 0x10), &mut out);
        assert_eq!(out.0.len(), 1);
        assert_eq!(out.0[0].1, seg(1000, 1200, 0x10));
        // Another ack number: a different flow state.
        let mut other = seg(6200, 1200, 0x10);
        other[28..32].copy_from_slice(&8u32.to_be_bytes());
        c.push(&other, &mut out);
        assert_eq!(out.0.len(), 2);
        // A FIN is written alone, after the segment before it.
        c.push(&seg(7400, 10, 0x11), &mut out);
        assert_eq!(out.0.len(), 4);
        assert_eq!(out.0[2].1, other);
        assert_eq!(out.0[3].1, seg(7400, 10, 0x11));
        // Not TCP at all.
        let mut udp = seg(1, 100, 0x10);
        udp[9] = 17;
        c.push(&udp, &mut out);
        assert_eq!(out.0.len(), 5);
        assert!(c.is_empty());
    }

    #[test]
    fn redundant_acks_are_thinned_and_the_rest_kept_in_order() {
        let mut c = Coalescer::default();
        let mut out = Written::default();
        // Three ACKs in a row: only the last is written, at the end.
        for (a, ts) in [(10_000, 5), (12_800, 5), (15_600, 6)] {
            c.push(&ack(a, ts), &mut out);
        }
        assert!(out.0.is_empty());
        c.finish(&mut out);
        assert_eq!(out.0.len(), 1);
        assert_eq!(out.0[0].1, ack(15_600, 6));
        assert_eq!(c.acks_thinned, 2);

        // Duplicate ACKs (the loss signal) are all kept, and so is an ACK
        // whose timestamp goes back.
        let mut out = Written::default();
        for (a, ts) in [(20_000, 7), (20_000, 7), (20_000, 8), (21_000, 6)] {
            c.push(&ack(a, ts), &mut out);
        }
        c.finish(&mut out);
        assert_eq!(out.0.len(), 4);

        // SACK blocks or another flag: never thinned.
        let mut out = Written::default();
        let mut sack = ack(30_000, 9);
        sack[40..44].copy_from_slice(&[1, 1, 5, 10]);
        c.push(&sack, &mut out);
        c.push(&ack(31_000, 9), &mut out);
        let mut ece = ack(32_000, 9);
        ece[33] |= 0x40;
        c.push(&ece, &mut out);
        c.push(&ack(33_000, 9), &mut out);
        c.finish(&mut out);
        let got: Vec<_> = out.0.iter().map(|w| w.1.clone()).collect();
        assert_eq!(got, vec![sack, ack(31_000, 9), ece, ack(33_000, 9)]);

        // Data of the flow between two ACKs: everything kept, in order.
        let mut out = Written::default();
        c.push(&ack(40_000, 9), &mut out);
        let data = seg(1000, 100, 0x18);
        c.push(&data, &mut out);
        c.push(&ack(41_000, 9), &mut out);
        c.finish(&mut out);
        let got: Vec<_> = out.0.iter().map(|w| w.1.clone()).collect();
        assert_eq!(got, vec![ack(40_000, 9), data, ack(41_000, 9)]);

        // Another flow's ACKs are thinned on their own.
        let mut out = Written::default();
        let other = |a: u32| {
            let mut p = ack(a, 9);
            p[20..22].copy_from_slice(&40001u16.to_be_bytes());
            p
        };
        c.push(&ack(50_000, 9), &mut out);
        c.push(&other(1), &mut out);
        c.push(&ack(51_000, 9), &mut out);
        c.push(&other(2), &mut out);
        c.finish(&mut out);
        let mut got: Vec<_> = out.0.iter().map(|w| w.1.clone()).collect();
        got.sort();
        let mut want = vec![ack(51_000, 9), other(2)];
        want.sort();
        assert_eq!(got, want);
    }

    #[test]
    fn ipv6_acks_are_thinned_too() {
        let v6 = |a: u32| {
            let mut p = vec![0u8; 40 + 20];
            p[0] = 0x60;
            p[4..6].copy_from_slice(&20u16.to_be_bytes());
            p[6] = 6;
            p[8] = 0xfd;
            p[24] = 0xfd;
            p[39] = 2;
            p[48..52].copy_from_slice(&a.to_be_bytes());
            p[52] = 5 << 4;
            p[53] = 0x10;
            p
        };
        let mut c = Coalescer::default();
        let mut out = Written::default();
        c.push(&v6(1), &mut out);
        c.push(&v6(2), &mut out);
        c.finish(&mut out);
        assert_eq!(out.0.len(), 1);
        assert_eq!(out.0[0].1, v6(2));
    }
}
