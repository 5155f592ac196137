//! The tunnel end to end: real openconnect in a client namespace, vpnd in a
//! gateway namespace, an internal server behind it.

use std::time::Duration;

use vpn_tests::*;

fn full_config(topo: &Topology, dir: &std::path::Path) -> String {
    Gateway::base_config(
        dir,
        topo,
        &ConfigParts {
            server: "",
            tunnel: r#"dns = ["198.18.2.53", "fd00:2::53"]
default_domain = "corp.example"
banner = "Authorised use only.\nAll access is logged: 100% of it."
"#,
            rest: r#"[client_routing]
mode = "include"
subnets = ["198.18.2.0/24", "198.19.0.0/24", "fd00:2::/64"]

[session]
timeout = "1d"
idle_timeout_secs = 900
dpd_secs = 15
keepalive_secs = 25
"#,
        },
    )
}

#[test]
fn login_pushes_every_setting_and_passes_traffic() {
    require_root();
    let topo = Topology::new().unwrap();
    // The config refers to the gateway's own temp dir; start writes it there.
    let gw = start_gateway(&topo, full_config);
    let mut client = Client::start(&topo, &gw, ALICE.name, ALICE.password, &[]).unwrap();
    let env = client.wait_connected(Duration::from_secs(20)).unwrap();

    let addr = env["INTERNAL_IP4_ADDRESS"].clone();
    assert!(addr.starts_with("198.19.0."), "{addr}");
    assert_ne!(
        addr, "198.19.0.1",
        "the gateway's own address is never handed out"
    );
    assert_eq!(env["INTERNAL_IP4_NETMASK"], "255.255.255.0");
    assert_eq!(env["INTERNAL_IP4_MTU"], "1300");
    // openconnect lists resolvers of both families in INTERNAL_IP4_DNS.
    assert_eq!(env["INTERNAL_IP4_DNS"], "198.18.2.53 fd00:2::53");
    assert_eq!(env["CISCO_DEF_DOMAIN"], "corp.example");
    assert_eq!(
        env["CISCO_BANNER"],
        "Authorised use only.\nAll access is logged: 100% of it."
    );
    // openconnect lists routes in reverse order of the headers.
    assert_eq!(
        split_routes(&env, "CISCO_SPLIT_INC"),
        ["198.18.2.0/255.255.255.0/24", "198.19.0.0/255.255.255.0/24"]
    );
    assert_eq!(env.get("CISCO_SPLIT_EXC"), None);
    assert_eq!(env["CISCO_IPV6_SPLIT_INC"], "1");
    assert_eq!(env["CISCO_IPV6_SPLIT_INC_0_ADDR"], "fd00:2::");
    assert_eq!(env["CISCO_IPV6_SPLIT_INC_0_MASKLEN"], "64");
    assert!(
        env["INTERNAL_IP6_NETMASK"].starts_with("fd00:1::"),
        "{:?}",
        env.get("INTERNAL_IP6_NETMASK")
    );
    assert!(env["INTERNAL_IP6_NETMASK"].ends_with("/64"));
    assert_eq!(env["IDLE_TIMEOUT"], "900");
    let opts = &env["CISCO_CSTP_OPTIONS"];
    for want in [
        "X-CSTP-DPD=15",
        "X-CSTP-Keepalive=25",
        "X-CSTP-Session-Timeout=86400",
        "X-CSTP-Idle-Timeout=900",
    ] {
        assert!(opts.contains(want), "{want} missing from {opts}");
    }

    // Traffic both ways, IPv4 and IPv6.
    assert!(
        topo.client.ping(SERVER, 3),
        "ping through the tunnel failed\n{}",
        gw.log()
    );
    assert!(
        topo.client.ping(SERVER6, 3),
        "IPv6 ping through the tunnel failed"
    );
    let up = iperf3(&topo.client, &topo.server, SERVER, 3, false).unwrap();
    let down = iperf3(&topo.client, &topo.server, SERVER, 3, true).unwrap();
    assert!(up > 1e6 && down > 1e6, "up {up} down {down} bit/s");
    assert_at_speed!(up > 10e6, "client->server {up} bit/s");
    assert_at_speed!(down > 10e6, "server->client {down} bit/s");

    // The session shows up with BPF counters that saw that traffic.
    let sessions = gw.sessions().unwrap();
    assert_eq!(sessions.len(), 1);
    let s = &sessions[0];
    assert_eq!(s["user"], "alice");
    assert_eq!(s["vpn_address"], addr.as_str());
    assert_eq!(s["public_address"], CLIENT_OUTSIDE);
    assert_eq!(s["state"], "connected");
    assert_eq!(
        s["pseudo_mac"],
        vpn_daemon::mac::format_mac(&vpn_daemon::mac::pseudo_mac("alice")).as_str()
    );
    let bytes_in = s["bytes_in"].as_u64().unwrap();
    let bytes_out = s["bytes_out"].as_u64().unwrap();
    assert!(bytes_in > 1_000_000, "bytes_in {bytes_in}");
    assert!(bytes_out > 1_000_000, "bytes_out {bytes_out}");

    // The pinned map is readable by bpftool, with field names.
    let dump = sh(std::process::Command::new("bpftool")
        .args(["map", "dump", "pinned"])
        .arg(gw.pin_dir.join("sessions")))
    .unwrap();
    let dump = String::from_utf8_lossy(&dump.stdout);
    assert!(dump.contains("session_id"), "{dump}");

    // Logout (SIGINT makes openconnect send DISCONNECT 0xb0) ends the session.
    client.signal("INT");
    assert!(client.wait_exit(Duration::from_secs(10)).is_some());
    assert!(
        wait_for(Duration::from_secs(5), || gw
            .sessions()
            .unwrap()
            .is_empty()
            .then_some(()))
        .is_some()
    );
    let ev = gw.events();
    let disc = ev
        .iter()
        .find(|e| e["event"] == "client_disconnected")
        .expect("disconnect event");
    assert_eq!(disc["reason"], "user logout");
    assert!(disc["bytes_in"].as_u64().unwrap() > 1_000_000);
    assert!(
        ev.iter()
            .any(|e| e["event"] == "client_connected" && e["user"] == "alice")
    );
}

/// Starts vpnd with a config built by `f` from the gateway's directory.
fn start_gateway(topo: &Topology, f: fn(&Topology, &std::path::Path) -> String) -> Gateway {
    Gateway::start_with(topo, |dir| f(topo, dir), &[ALICE]).unwrap()
}

/// `PREFIX_<i>_ADDR/MASK/MASKLEN` entries, sorted.
fn split_routes(env: &std::collections::HashMap<String, String>, prefix: &str) -> Vec<String> {
    let n: usize = env.get(prefix).map_or(0, |v| v.parse().unwrap());
    let mut v: Vec<String> = (0..n)
        .map(|i| {
            format!(
                "{}/{}/{}",
                env[&format!("{prefix}_{i}_ADDR")],
                env[&format!("{prefix}_{i}_MASK")],
                env[&format!("{prefix}_{i}_MASKLEN")]
            )
        })
        .collect();
    v.sort();
    v
}
