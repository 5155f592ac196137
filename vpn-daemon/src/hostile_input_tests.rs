//! Every parser of bytes from the wire, fed random and half-valid input:
//! none may panic (audit H1 asked for the slices on packet data to be
//! bounded; this keeps them so). Deterministic, so a failure repeats.

use bytes::BytesMut;

use crate::{
    packet::{gro, gso, ip},
    proto::cstp,
    transport::dtls,
    transport::dtls::flow_control,
};

/// xorshift64: the same inputs on every run.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
    fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next() as u8).collect()
    }
}

/// An IPv4 or IPv6 TCP packet whose header fields are mostly consistent
/// and sometimes not (lengths, data offset, version), so parsers get past
/// their first checks.
fn half_valid_ip(r: &mut Rng) -> Vec<u8> {
    let v6 = r.below(3) == 0;
    let ihl = if v6 { 40 } else { 20 };
    let len = ihl + r.below(120);
    let mut p = r.bytes(len);
    if v6 {
        p[0] = 0x60 | (p[0] & 0x0f);
        if r.below(4) != 0 {
            p[6] = 6;
            let plen = (len - 40) as u16;
            p[4..6].copy_from_slice(&plen.to_be_bytes());
        }
    } else {
        p[0] = if r.below(8) == 0 { p[0] } else { 0x45 };
        if r.below(4) != 0 {
            p[9] = 6;
            p[2..4].copy_from_slice(&(len as u16).to_be_bytes());
            p[6] &= 0x40;
            p[7] = 0;
        }
    }
    if len > ihl + 12 {
        // Data offset anywhere from 0 to 60 bytes.
        p[ihl + 12] = (r.below(16) as u8) << 4;
    }
    p
}

fn every_parser(r: &mut Rng, p: &[u8]) {
    if let Some(seg) = gro::parse(p) {
        let _ = flow_control::client_ack(p, &seg);
        let _ = gro::flow(p, &seg);
    }
    let _ = flow_control::tcp_data(p);
    let _ = ip::valid_ip_packet(p);
    let _ = ip::packet_dst(p);
    let _ = dtls::record::Channel::record_len(p);
    let _ = dtls::record::Channel::tiles(p);
    let _ = dtls::handshake::client_hello_session_id(p);
    let _ = crate::proto::auth_xml::parse_client_auth(&String::from_utf8_lossy(p));
    let _ = crate::proto::radius::verify_reply(p, 0, &[0; 16], b"secret", true);
    let mut buf = BytesMut::from(p);
    while let Ok(Some(_)) = cstp::decode(&mut buf) {}
    let vnet = r.bytes(gro::VNET_HDR_LEN);
    if let Ok(pkts) = gso::Packets::parse(&vnet, p) {
        let mut out = vec![0u8; pkts.max_len()];
        for i in 0..pkts.count().min(64) {
            pkts.write(i, &mut out);
        }
    }
}

#[test]
fn parsers_of_wire_input_survive_random_and_half_valid_bytes() {
    let mut r = Rng(0x9e37_79b9_7f4a_7c15);
    let mut co = gro::Coalescer::default();
    let mut written = 0usize;
    for i in 0..40_000 {
        let p = if i % 2 == 0 {
            let n = r.below(200);
            r.bytes(n)
        } else {
            half_valid_ip(&mut r)
        };
        every_parser(&mut r, &p);
        // Every truncation of a half-valid packet too.
        if i % 97 == 1 {
            for n in 0..p.len() {
                every_parser(&mut r, &p[..n]);
            }
        }
        co.push(&p, &mut |_: &[u8], pkt: &[u8]| written += pkt.len());
        if i % 16 == 0 {
            co.finish(&mut |_: &[u8], pkt: &[u8]| written += pkt.len());
        }
    }
    assert!(written > 0, "the coalescer passed packets on");
}
