//! The BPF programs on the tunnel device, observed through real traffic.

use std::time::Duration;

use vpn_tests::*;

/// A source address the session was not given: dropped before the tunnel
/// device (the daemon knows the packet's session; BPF only that the source
/// is some session's, `security.rs` has the cross-user case) and counted.
#[test]
fn forged_source_is_dropped_and_counted() {
    require_root();
    let topo = Topology::new().unwrap();
    let gw = Gateway::start(&topo, ConfigParts::default(), &[ALICE]).unwrap();
    let mut client = Client::start(&topo, &gw, ALICE.name, ALICE.password, &[]).unwrap();
    let env = client.wait_connected(Duration::from_secs(20)).unwrap();
    assert!(topo.client.ping(SERVER, 2), "the genuine address passes");

    let spoofed = || {
        let v = gw.stats().unwrap();
        v["daemon_drops"]
            .as_array()
            .and_then(|a| a.iter().find(|d| d[0] == "spoofed-source"))
            .and_then(|d| d[1].as_u64())
            .unwrap()
    };
    let before = spoofed();
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
    let after = spoofed();
    assert!(after >= before + 5, "drop counter {before} -> {after}");

    // The session's traffic counters did not count them, its drop counter
    // did, and the session is fine.
    assert!(topo.client.ping(SERVER, 2));
    let s = &gw.sessions().unwrap()[0];
    assert!(s["packets_in"].as_u64().unwrap() < 20, "{s}");
    assert!(s["spoofed_dropped"].as_u64().unwrap() >= 5, "{s}");
}

#[test]
fn a_restart_after_a_crash_starts_from_clean_maps() {
    require_root();
    let topo = Topology::new().unwrap();
    let mut gw = Gateway::start(&topo, ConfigParts::default(), &[ALICE]).unwrap();
    let mut client = Client::start(&topo, &gw, ALICE.name, ALICE.password, &[]).unwrap();
    client.wait_connected(Duration::from_secs(20)).unwrap();
    let pins = gw.pin_dir.clone();
    let dump = || {
        let out = sh(std::process::Command::new("bpftool")
            .args(["-j", "map", "dump", "pinned"])
            .arg(pins.join("sessions")))
        .unwrap();
        serde_json::from_slice::<Vec<serde_json::Value>>(&out.stdout).unwrap()
    };
    // Two entries: the client's IPv4 and IPv6 addresses.
    assert_eq!(dump().len(), 2);

    // SIGKILL: no cleanup runs, the pinned map (and its entries) survive.
    gw.child_mut().kill().unwrap();
    gw.child_mut().wait().unwrap();
    assert_eq!(dump().len(), 2, "pins outlive a crash");
    drop(client);

    let gw2 = Gateway::start(&topo, ConfigParts::default(), &[ALICE]).unwrap();
    assert_eq!(gw2.pin_dir, gw.pin_dir);
    assert!(
        dump().is_empty(),
        "stale sessions are gone after the restart"
    );
    let mut c2 = Client::start(&topo, &gw2, ALICE.name, ALICE.password, &[]).unwrap();
    c2.wait_connected(Duration::from_secs(20)).unwrap();
    assert_eq!(dump().len(), 2);
    assert!(topo.client.ping(SERVER, 2));
}
