//! The BPF programs on the tunnel device, observed through real traffic.

use std::time::Duration;

use vpn_tests::*;

const ALICE: TestUser = TestUser {
    name: "alice",
    password: "alice-pw",
    group_policy: None,
};

#[test]
fn forged_source_is_dropped_and_counted_by_bpf() {
    require_root();
    let topo = Topology::new().unwrap();
    let gw = Gateway::start(&topo, ConfigParts::default(), &[ALICE]).unwrap();
    let mut client = Client::start(&topo, &gw, ALICE.name, ALICE.password, &[]).unwrap();
    let env = client.wait_connected(Duration::from_secs(20)).unwrap();
    assert!(topo.client.ping(SERVER, 2), "the genuine address passes");

    let before = gw.drops("unknown-source").unwrap();
    // A second, unassigned pool address on the client's tunnel device: its
    // packets enter the tunnel with a forged source.
    let forged = "198.19.0.250";
    assert_ne!(env["INTERNAL_IP4_ADDRESS"], forged);
    topo.client
        .ip(&["addr", "add", &format!("{forged}/32"), "dev", "octun0"])
        .unwrap();
    let ok = topo
        .client
        .cmd("ping")
        .args([
            "-c", "5", "-i", "0.2", "-W", "1", "-q", "-I", forged, SERVER,
        ])
        .status()
        .unwrap()
        .success();
    assert!(!ok, "forged packets must not reach the server");
    let after = gw.drops("unknown-source").unwrap();
    assert!(after >= before + 5, "drop counter {before} -> {after}");

    // The per-session counters did not count them, and the session is fine.
    assert!(topo.client.ping(SERVER, 2));
    let s = &gw.sessions().unwrap()[0];
    assert!(s["packets_in"].as_u64().unwrap() < 20, "{s}");
}
