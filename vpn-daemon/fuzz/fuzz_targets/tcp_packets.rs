//! The data path's packet surgery on packets from clients and from the
//! TUN device (`packet/`, `transport/dtls/flow_control.rs`): IP checks,
//! TCP segment merging (GRO) with what it writes, TSO packets cut into
//! segments (GSO) behind any virtio-net header, and the TCP fields flow
//! control reads.

#![no_main]

use libfuzzer_sys::fuzz_target;
use vpn_daemon::{
    packet::{gro, gso, ip},
    transport::dtls::flow_control,
};

fuzz_target!(|data: &[u8]| {
    if data.len() < gro::VNET_HDR_LEN {
        return;
    }
    let (vnet, rest) = data.split_at(gro::VNET_HDR_LEN);
    let _ = ip::valid_ip_packet(rest);
    let _ = ip::packet_dst(rest);
    let _ = flow_control::tcp_data(rest);
    if let Ok(pkts) = gso::Packets::parse(vnet, rest) {
        let mut out = vec![0u8; pkts.max_len()];
        for i in 0..pkts.count().min(256) {
            let n = pkts.write(i, &mut out);
            assert!(n <= out.len());
        }
    }
    // The bytes as a run of packets through the coalescer, cut where each
    // packet's IP header says it ends (at least one byte each).
    let mut co = gro::Coalescer::default();
    let mut written = 0usize;
    let mut d = rest;
    while !d.is_empty() {
        let stated = match d[0] >> 4 {
            4 if d.len() >= 4 => usize::from(u16::from_be_bytes([d[2], d[3]])),
            6 if d.len() >= 6 => 40 + usize::from(u16::from_be_bytes([d[4], d[5]])),
            _ => d.len(),
        };
        let n = stated.clamp(1, d.len());
        co.push(&d[..n], &mut |_: &[u8], p: &[u8]| written += p.len());
        d = &d[n..];
    }
    co.finish(&mut |_: &[u8], p: &[u8]| written += p.len());
});
