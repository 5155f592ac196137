//! Bulk TCP through the tunnel arrives byte for byte, both ways, IPv4 and
//! IPv6, over DTLS and over TLS: the check on the offloads of the data
//! path. Downloads leave the TUN device as 64 KiB TSO packets that vpnd cuts
//! into segments (gso.rs) and go out as UDP GSO runs; uploads are merged
//! into GSO writes (gro.rs). With the kernel offloads off (a kernel without
//! them, or `tunnel.offloads = false`) the same bytes arrive the slower way.

use std::time::Duration;

use vpn_tests::*;

const LEN: usize = 6 << 20;

#[test]
fn bulk_transfers_arrive_intact_on_both_transports() {
    require_root();
    bulk_transfers(true);
}

/// The degraded data path, as on a kernel without the offloads: the start
/// log names each offload as off and why, `vpnctl stats` says so, no UDP
/// GSO run is sent, and every byte still arrives.
#[test]
fn with_the_kernel_offloads_off_bulk_transfers_still_arrive_intact() {
    require_root();
    bulk_transfers(false);
}

/// Bulk transfers both ways, IPv4 and IPv6, over DTLS then TLS, with the
/// kernel offloads on or off (`tunnel.offloads`).
fn bulk_transfers(offloads: bool) {
    for (transport, flags) in [("dtls", &[][..]), ("tls", &["--no-dtls"][..])] {
        let topo = Topology::new().unwrap();
        let parts = ConfigParts {
            tunnel: if offloads { "" } else { "offloads = false" },
            ..Default::default()
        };
        let gw = Gateway::start(&topo, parts, &[ALICE]).unwrap();
        let stats = gw.stats().unwrap();
        assert_eq!(
            stats["offloads"],
            serde_json::json!({"tun_tso": offloads, "udp_gso": offloads, "udp_gro": offloads}),
            "{stats}"
        );
        if offloads {
            assert!(
                gw.log()
                    .contains("kernel offloads: TUN TSO on, UDP GSO on, UDP GRO on"),
                "{}",
                gw.log()
            );
        } else {
            for what in [
                "TUN TSO and checksum offload off (tunnel.offloads = false)",
                "UDP GSO off (tunnel.offloads = false): DTLS sends one message per datagram",
                "UDP GRO off (tunnel.offloads = false)",
            ] {
                assert!(gw.log().contains(what), "{what}: {}", gw.log());
            }
        }
        let mut c = Client::start(&topo, &gw, ALICE.name, ALICE.password, flags).unwrap();
        c.wait_connected(Duration::from_secs(20)).unwrap();
        if transport == "dtls" {
            c.wait_dtls(Duration::from_secs(10)).unwrap();
        }
        let before = gw.sessions().unwrap()[0].clone();
        let client_v4 = before["vpn_address"].as_str().unwrap().to_owned();
        let client_v6 = before["vpn_address6"].as_str().unwrap().to_owned();
        for (k, (server, client)) in [(SERVER, &client_v4), (SERVER6, &client_v6)]
            .into_iter()
            .enumerate()
        {
            let seed = 0x5eed + k as u64;
            let down = tcp_transfer(
                &topo.server,
                &topo.client,
                client,
                7000 + k as u16,
                test_stream(seed, LEN),
            )
            .unwrap();
            assert!(
                down == test_stream(seed, LEN),
                "{transport} download to the client from {server} corrupted: {} of {LEN} bytes",
                down.len()
            );
            let up = tcp_transfer(
                &topo.client,
                &topo.server,
                server,
                7200 + k as u16,
                test_stream(seed + 7, LEN),
            )
            .unwrap();
            assert!(
                up == test_stream(seed + 7, LEN),
                "{transport} upload to {server} corrupted: {} of {LEN} bytes",
                up.len()
            );
        }
        let after = gw.sessions().unwrap()[0].clone();
        assert_eq!(after["transport"], transport);
        // The BPF counters count a TSO packet once: more than a full-size
        // packet's bytes per packet means the large packets were used.
        // Without TUN TSO it depends on the kernel where they are cut:
        // 6.18 after TC (about 4,800 bytes per packet counted), 6.1
        // before it (1,453). And only a fast sender makes them: TCP sizes
        // its TSO packets to about 1 ms of its rate, one segment at the
        // 14 Mbit/s of an emulated CPU (1,493 there, offloads on).
        let delta = |k: &str| after[k].as_u64().unwrap() - before[k].as_u64().unwrap();
        let per_packet = delta("bytes_out") / delta("packets_out").max(1);
        let counted = format!(
            "{transport}, offloads {offloads}: {} bytes in {} packets to the client",
            delta("bytes_out"),
            delta("packets_out")
        );
        assert!(delta("bytes_out") >= 2 * LEN as u64, "{counted}");
        assert_at_speed!(!offloads || per_packet > 1500, "{counted}");
        // Downloads over DTLS went out in UDP GSO runs, or one datagram
        // per message.
        let gso = gw.stats().unwrap()["dtls_rx"]["gso_messages"]
            .as_u64()
            .unwrap();
        match (transport, offloads) {
            // Runs of records need TSO-sized reads: a fast sender's.
            ("dtls", true) => assert_at_speed!(gso > 100, "{gso} GSO sends"),
            _ => assert_eq!(gso, 0, "{transport}, offloads {offloads}"),
        }
        if transport == "dtls" {
            let text = gw.vpnctl(&["stats"]).unwrap();
            assert!(
                text.contains(&format!(
                    "UDP GSO {} ({gso} sends of several datagrams)",
                    if offloads { "on" } else { "off" }
                )),
                "{text}"
            );
        }
        drop(c);
    }
}

/// A fast upload over TLS is read in large batches (read_batch.rs): the
/// socket's low-water mark makes each wake-up take tens of KB. Right
/// after it, a lone ping still gets through: the tail timer drops the
/// mark, so the last packets of a burst are never stranded below it.
#[test]
fn a_fast_tls_upload_is_read_in_batches_and_strands_nothing() {
    require_root();
    let topo = Topology::new().unwrap();
    let gw = Gateway::start(&topo, ConfigParts::default(), &[ALICE]).unwrap();
    let mut c = Client::start(&topo, &gw, ALICE.name, ALICE.password, &["--no-dtls"]).unwrap();
    c.wait_connected(Duration::from_secs(20)).unwrap();
    let reads = || {
        let v = gw.stats().unwrap();
        v["tls_reads"].clone()
    };
    let before = reads();
    let up = iperf3(&topo.client, &topo.server, SERVER, 3, false).unwrap();
    assert!(
        topo.client.ping(SERVER, 3),
        "a ping after the upload got no answer: {}",
        reads()
    );
    let after = reads();
    let delta = |k: &str| after[k].as_u64().unwrap() - before[k].as_u64().unwrap();
    let per_wakeup = delta("bytes") / delta("wakeups").max(1);
    eprintln!("TLS upload at {:.0} Mbit/s: {after}", up / 1e6);
    assert!(
        delta("bytes") > (up / 8.0 * 3.0 * 0.9) as u64,
        "the upload's bytes were not counted: {after}"
    );
    // A debug gateway is slow enough that its reads are large with or
    // without the mark; that the mark was set shows it is in use (the
    // bench measures what it saves).
    // An upload as slow as an emulated CPU's (16 Mbit/s) never needs it.
    assert_at_speed!(delta("batching_started") >= 1, "{after}");
    assert!(
        per_wakeup > 16_000,
        "{per_wakeup} bytes per wake-up: {after}"
    );
    assert_eq!(gw.sessions().unwrap()[0]["transport"], "tls");
    let text = gw.vpnctl(&["stats"]).unwrap();
    assert!(
        text.contains("TLS tunnel reads: ") && text.contains("KB each, batching started "),
        "{text}"
    );
}
