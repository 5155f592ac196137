//! DTLS (PSK-NEGOTIATE) with the real openconnect client.

use std::time::Duration;

use vpn_tests::*;

const ALICE: TestUser = TestUser {
    name: "alice",
    password: "alice-pw",
    group_policy: None,
};

#[test]
fn openconnect_establishes_dtls_and_passes_traffic_over_it() {
    require_root();
    let topo = Topology::new().unwrap();
    let gw = Gateway::start(
        &topo,
        ConfigParts {
            rest: "[dtls]\nenabled = true\n",
            ..Default::default()
        },
        &[ALICE],
    )
    .unwrap();
    let mut c = Client::start(
        &topo,
        &gw,
        ALICE.name,
        ALICE.password,
        &["--dtls-ciphers=PSK-NEGOTIATE"],
    )
    .unwrap();
    c.wait_connected(Duration::from_secs(20)).unwrap();
    let established = wait_for(Duration::from_secs(10), || {
        c.log()
            .contains("Established DTLS connection")
            .then_some(())
    });
    assert!(established.is_some(), "{}", c.log());
    assert!(c.log().contains("(PSK)"), "{}", c.log());
    assert!(
        wait_for(Duration::from_secs(5), || {
            (gw.sessions().unwrap()[0]["transport"] == "dtls").then_some(())
        })
        .is_some()
    );

    assert!(topo.client.ping(SERVER, 3), "ping over DTLS\n{}", gw.log());
    let up = iperf3(&topo.client, &topo.server, SERVER, 2, false).unwrap();
    let down = iperf3(&topo.client, &topo.server, SERVER, 2, true).unwrap();
    eprintln!("iperf3 over DTLS (debug build): up {:.0} Mbit/s, down {:.0} Mbit/s", up / 1e6, down / 1e6);
    assert!(up > 10e6 && down > 10e6, "up {up} down {down}");
    // The MTU probe got its echoes: no reduction.
    assert!(!c.log().contains("MTU reduced"), "{}", c.log());
    let s = &gw.sessions().unwrap()[0];
    assert_eq!(s["transport"], "dtls");
    assert!(
        s["bytes_in"].as_u64().unwrap() > 1_000_000,
        "BPF counters include DTLS traffic: {s}"
    );
}
