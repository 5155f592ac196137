//! The XDP guard in front of the DTLS port, on crafted frames through the
//! kernel's BPF_PROG_TEST_RUN.

use vpn_common::GuardConfig;
use vpn_daemon::datapath::bpf::Datapath;
use vpn_tests::require_root;

const XDP_DROP: u32 = 1;
const XDP_PASS: u32 = 2;
const PORT: u16 = 443;

/// Ethernet + IPv4 + UDP to `dport` from 198.18.1.`src` with `payload`.
fn udp4(src: u8, dport: u16, payload: &[u8]) -> Vec<u8> {
    let mut f = vec![0u8; 12];
    f.extend_from_slice(&[0x08, 0x00]);
    let mut ip = [0u8; 20];
    ip[0] = 0x45;
    ip[2..4].copy_from_slice(&((28 + payload.len()) as u16).to_be_bytes());
    ip[8] = 64;
    ip[9] = 17;
    ip[12..16].copy_from_slice(&[198, 18, 1, src]);
    ip[16..20].copy_from_slice(&[198, 18, 1, 1]);
    f.extend_from_slice(&ip);
    f.extend_from_slice(&40000u16.to_be_bytes());
    f.extend_from_slice(&dport.to_be_bytes());
    f.extend_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
    f.extend_from_slice(&[0, 0]);
    f.extend_from_slice(payload);
    f
}

/// A DTLS record of `content` type with `body`.
fn record(content: u8, version: u16, body: &[u8]) -> Vec<u8> {
    let mut r = vec![content];
    r.extend_from_slice(&version.to_be_bytes());
    r.extend_from_slice(&[0, 0, 0, 0, 0, 0, 0, 0]);
    r.extend_from_slice(&(body.len() as u16).to_be_bytes());
    r.extend_from_slice(body);
    r
}

fn client_hello() -> Vec<u8> {
    let mut body = vec![1u8, 0, 0, 60, 0, 0, 0, 0, 0, 0, 0, 60];
    body.extend_from_slice(&[0xfe, 0xfd]);
    body.extend_from_slice(&[0u8; 58]);
    record(22, 0xfeff, &body)
}

#[test]
fn guard_passes_dtls_drops_garbage_and_limits_hellos() {
    require_root();
    let mut dp = Datapath::load_for_test_run().unwrap();
    dp.set_guard(GuardConfig {
        port: u32::from(PORT),
        hello_rate: 1,
        hello_burst: 5,
        tls_port: 0,
    })
    .unwrap();
    let run = |f: &[u8]| dp.test_run_xdp(f).unwrap();

    // Well-formed DTLS application data passes; so does other traffic.
    assert_eq!(
        run(&udp4(2, PORT, &record(23, 0xfefd, &[0u8; 64]))),
        XDP_PASS
    );
    assert_eq!(run(&udp4(2, 53, b"garbage to another port")), XDP_PASS);
    // Garbage, truncated records and unknown versions do not.
    assert_eq!(run(&udp4(2, PORT, b"GET / HTTP/1.1\r\n\r\n")), XDP_DROP);
    assert_eq!(run(&udp4(2, PORT, &[23, 0xfe, 0xfd])), XDP_DROP);
    let mut lying = record(23, 0xfefd, &[0u8; 10]);
    lying[11..13].copy_from_slice(&500u16.to_be_bytes());
    assert_eq!(
        run(&udp4(2, PORT, &lying)),
        XDP_DROP,
        "length beyond the datagram"
    );
    assert_eq!(
        run(&udp4(2, PORT, &record(23, 0x0303, &[0u8; 16]))),
        XDP_DROP,
        "TLS, not DTLS"
    );

    // A flood of ClientHellos from one source: the burst passes, the rest
    // is dropped, and another source is unaffected.
    let hello = client_hello();
    let passed = (0..50)
        .filter(|_| run(&udp4(7, PORT, &hello)) == XDP_PASS)
        .count();
    assert!(
        (5..=6).contains(&passed),
        "{passed} of 50 hellos passed with a burst of 5"
    );
    assert_eq!(run(&udp4(8, PORT, &hello)), XDP_PASS);

    let drops: std::collections::HashMap<&str, u64> = dp
        .guard_drops()
        .into_iter()
        .map(|(r, n)| (r.name(), n))
        .collect();
    assert_eq!(drops["dtls-bad-content-type"], 1);
    assert_eq!(drops["dtls-truncated"], 2);
    assert_eq!(drops["dtls-bad-version"], 1);
    assert!(drops["dtls-hello-rate-limited"] >= 44);

    // Port 0 turns the guard off.
    dp.set_guard(GuardConfig::default()).unwrap();
    assert_eq!(
        dp.test_run_xdp(&udp4(2, PORT, b"anything")).unwrap(),
        XDP_PASS
    );
}

/// Ethernet + IP + TCP from `src` to port `dport` with `flags`.
fn tcp(src: std::net::IpAddr, dport: u16, flags: u8) -> Vec<u8> {
    let mut f = vec![0u8; 12];
    let mut tcp = [0u8; 20];
    tcp[0..2].copy_from_slice(&40000u16.to_be_bytes());
    tcp[2..4].copy_from_slice(&dport.to_be_bytes());
    tcp[12] = 0x50;
    tcp[13] = flags;
    match src {
        std::net::IpAddr::V4(a) => {
            f.extend_from_slice(&[0x08, 0x00]);
            let mut ip = [0u8; 20];
            ip[0] = 0x45;
            ip[2..4].copy_from_slice(&40u16.to_be_bytes());
            ip[8] = 64;
            ip[9] = 6;
            ip[12..16].copy_from_slice(&a.octets());
            ip[16..20].copy_from_slice(&[198, 18, 1, 1]);
            f.extend_from_slice(&ip);
        }
        std::net::IpAddr::V6(a) => {
            f.extend_from_slice(&[0x86, 0xdd]);
            let mut ip = [0u8; 40];
            ip[0] = 0x60;
            ip[4..6].copy_from_slice(&20u16.to_be_bytes());
            ip[6] = 6;
            ip[7] = 64;
            ip[8..24].copy_from_slice(&a.octets());
            ip[24] = 0xfd;
            ip[39] = 1;
            f.extend_from_slice(&ip);
        }
    }
    f.extend_from_slice(&tcp);
    f
}

/// A banned source opens no new connection (TCP SYN to the TLS port, DTLS
/// ClientHello); its open connections, other ports and other sources pass;
/// a ban ends on time and when lifted; an IPv6 ban covers its /64.
#[test]
fn banned_sources_open_no_new_connections() {
    use std::{net::IpAddr, time::Duration};
    const SYN: u8 = 0x02;
    const ACK: u8 = 0x10;
    require_root();
    let mut dp = Datapath::load_for_test_run().unwrap();
    dp.set_guard(GuardConfig {
        port: u32::from(PORT),
        hello_rate: 1000,
        hello_burst: 1000,
        tls_port: 443,
    })
    .unwrap();
    let bad: IpAddr = "198.18.1.66".parse().unwrap();
    let good: IpAddr = "198.18.1.67".parse().unwrap();
    let run = |dp: &Datapath, f: &[u8]| dp.test_run_xdp(f).unwrap();

    // Before the ban everything passes.
    assert_eq!(run(&dp, &tcp(bad, 443, SYN)), XDP_PASS);
    dp.ban("198.18.1.66/32".parse().unwrap(), None).unwrap();
    assert_eq!(run(&dp, &tcp(bad, 443, SYN)), XDP_DROP, "new connection");
    assert_eq!(
        run(&dp, &udp4(66, PORT, &client_hello())),
        XDP_DROP,
        "new DTLS handshake"
    );
    assert_eq!(
        run(&dp, &tcp(bad, 443, SYN | ACK)),
        XDP_PASS,
        "not an attempt"
    );
    assert_eq!(
        run(&dp, &tcp(bad, 443, ACK)),
        XDP_PASS,
        "an open connection"
    );
    assert_eq!(
        run(&dp, &udp4(66, PORT, &record(23, 0xfefd, &[0u8; 64]))),
        XDP_PASS,
        "an established DTLS channel"
    );
    assert_eq!(run(&dp, &tcp(bad, 22, SYN)), XDP_PASS, "another port");
    assert_eq!(run(&dp, &tcp(good, 443, SYN)), XDP_PASS, "another source");

    // Lifted.
    dp.unban("198.18.1.66/32".parse().unwrap());
    assert_eq!(run(&dp, &tcp(bad, 443, SYN)), XDP_PASS);

    // A ban for a while ends by itself, though its entry is still there.
    dp.ban(
        "198.18.1.0/24".parse().unwrap(),
        Some(Duration::from_millis(300)),
    )
    .unwrap();
    assert_eq!(
        run(&dp, &tcp(good, 443, SYN)),
        XDP_DROP,
        "in the banned /24"
    );
    std::thread::sleep(Duration::from_millis(400));
    assert_eq!(
        run(&dp, &tcp(good, 443, SYN)),
        XDP_PASS,
        "the ban has ended"
    );

    // IPv6: a /64 is one source.
    dp.ban("fd00:66:0:1::/64".parse().unwrap(), None).unwrap();
    let in64: IpAddr = "fd00:66:0:1::abcd".parse().unwrap();
    let other: IpAddr = "fd00:66:0:2::1".parse().unwrap();
    assert_eq!(run(&dp, &tcp(in64, 443, SYN)), XDP_DROP);
    assert_eq!(run(&dp, &tcp(other, 443, SYN)), XDP_PASS);

    let banned: u64 = dp
        .guard_drops()
        .into_iter()
        .filter(|(r, _)| r.name() == "banned-source")
        .map(|(_, n)| n)
        .sum();
    assert_eq!(banned, 4, "the drops counted as bans");
}
