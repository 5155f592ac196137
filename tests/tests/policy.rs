//! Group policies enforced on real traffic from the real client.

use std::time::{Duration, Instant};

use vpn_tests::*;

const STAFF: &str = r#"
[policy]
default = "staff"

[[group_policy]]
name = "staff"

[[group_policy.rule]]
action = "deny"
protocol = "tcp"
destination = "198.18.2.2/32"
port = "5299"
comment = "no service on 5299"

[[group_policy.rule]]
action = "deny"
protocol = "icmp"
comment = "No ICMP"

[[group_policy.rule]]
action = "deny"
protocol = "udp"
comment = "No UDP"
"#;

fn rule_hits(gw: &Gateway, policy: &str) -> Vec<u64> {
    let v: serde_json::Value =
        serde_json::from_str(&gw.vpnctl(&["policy", "show", policy, "--json"]).unwrap()).unwrap();
    v["rules"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["hits"].as_u64().unwrap())
        .collect()
}

#[test]
fn firewall_rules_allow_and_deny_real_traffic() {
    require_root();
    let topo = Topology::new().unwrap();
    let gw = Gateway::start(
        &topo,
        ConfigParts {
            rest: STAFF,
            ..Default::default()
        },
        &[ALICE],
    )
    .unwrap();
    let mut c = Client::start(&topo, &gw, ALICE.name, ALICE.password, &[]).unwrap();
    c.wait_connected(Duration::from_secs(20)).unwrap();
    assert_eq!(gw.sessions().unwrap()[0]["group_policy"], "staff");

    // An allowed TCP port passes, the denied one does not.
    let ok = iperf3_with(&topo.client, &topo.server, SERVER, 5298, 1, &[]).unwrap();
    assert!(ok > 1e6, "allowed port: {ok} bit/s");
    assert!(
        iperf3_with(&topo.client, &topo.server, SERVER, 5299, 1, &[]).is_err(),
        "denied port connected"
    );

    // "No ICMP" blocks ping; "No UDP" blocks a UDP iperf3 (its TCP control
    // connection still works, every datagram is lost).
    let denied_before = gw.drops("policy-deny").unwrap();
    assert!(!topo.client.ping(SERVER, 3), "ping must be denied");
    let udp = iperf3_json(
        &topo.client,
        &topo.server,
        SERVER,
        5297,
        2,
        &["-u", "-b", "5M"],
    )
    .unwrap();
    let received = udp["end"]["sum_received"]["bytes"]
        .as_u64()
        .or(udp["end"]["sum"]["bytes"].as_u64());
    let lost = udp["end"]["sum"]["lost_percent"].as_f64();
    assert!(
        lost.is_some_and(|l| l > 99.0) || udp["error"].is_string(),
        "UDP got through: received {received:?}, lost {lost:?}: {udp}"
    );

    let hits = rule_hits(&gw, "staff");
    assert!(hits[0] >= 1, "tcp/5299 rule hits {hits:?}");
    assert!(hits[1] >= 3, "icmp rule hits {hits:?}");
    assert!(hits[2] >= 1, "udp rule hits {hits:?}");
    assert!(
        gw.drops("policy-deny").unwrap() >= denied_before + 4,
        "3 pings and a datagram"
    );
    let s = &gw.sessions().unwrap()[0];
    assert!(s["denied_in"].as_u64().unwrap() >= 4, "{s}");
    let list: serde_json::Value =
        serde_json::from_str(&gw.vpnctl(&["policy", "list", "--json"]).unwrap()).unwrap();
    assert_eq!(list[0]["name"], "staff");
    assert_eq!(list[0]["sessions"], 1);
    assert_eq!(list[0]["default"], true);
    // The pinned maps are readable with bpftool.
    let dump = sh(std::process::Command::new("bpftool")
        .args(["map", "dump", "pinned"])
        .arg(gw.pin_dir.join("policies")))
    .unwrap();
    assert!(String::from_utf8_lossy(&dump.stdout).contains("rate_up_bps"));
}

#[test]
fn client_isolation_blocks_client_to_client() {
    require_root();
    let topo = Topology::new().unwrap();
    let alice = TestUser {
        group_policy: Some("isolated"),
        ..ALICE
    };
    let gw = Gateway::start(
        &topo,
        ConfigParts {
            rest: "[[group_policy]]\nname = \"isolated\"\nclient_isolation = true\n",
            ..Default::default()
        },
        &[alice, BOB],
    )
    .unwrap();
    let mut a = Client::start(&topo, &gw, ALICE.name, ALICE.password, &[]).unwrap();
    let a_addr = a.wait_connected(Duration::from_secs(20)).unwrap()["INTERNAL_IP4_ADDRESS"].clone();
    let mut b = Client::start_in(&topo.client2, &gw, BOB.name, BOB.password, &[]).unwrap();
    let b_addr = b.wait_connected(Duration::from_secs(20)).unwrap()["INTERNAL_IP4_ADDRESS"].clone();

    // Both reach the server.
    assert!(topo.client.ping(SERVER, 1));
    assert!(topo.client2.ping(SERVER, 1));
    let before = gw.drops("client-isolation").unwrap();
    assert!(!topo.client.ping(&b_addr, 3), "isolated alice reached bob");
    assert!(
        !topo.client2.ping(&a_addr, 3),
        "bob reached isolated alice (her replies must be dropped)"
    );
    assert!(gw.drops("client-isolation").unwrap() >= before + 6);
}

#[test]
fn clients_without_isolation_reach_each_other() {
    // The control for the test above: the same topology without isolation.
    require_root();
    let topo = Topology::new().unwrap();
    let gw = Gateway::start(&topo, ConfigParts::default(), &[ALICE, BOB]).unwrap();
    let mut a = Client::start(&topo, &gw, ALICE.name, ALICE.password, &[]).unwrap();
    a.wait_connected(Duration::from_secs(20)).unwrap();
    let mut b = Client::start_in(&topo.client2, &gw, BOB.name, BOB.password, &[]).unwrap();
    let b_addr = b.wait_connected(Duration::from_secs(20)).unwrap()["INTERNAL_IP4_ADDRESS"].clone();
    assert!(topo.client.ping(&b_addr, 2));
}

#[test]
fn split_enforcement_drops_traffic_outside_the_included_subnets() {
    require_root();
    let topo = Topology::new().unwrap();
    let alice = TestUser {
        group_policy: Some("enforced"),
        ..ALICE
    };
    let gw = Gateway::start(
        &topo,
        ConfigParts {
            rest: "[client_routing]\nmode = \"include\"\nsubnets = [\"198.18.2.0/24\"]\n\n[[group_policy]]\nname = \"enforced\"\nsplit_enforcement = true\n\n[[group_policy]]\nname = \"trusting\"\n",
            ..Default::default()
        },
        &[alice, TestUser { group_policy: Some("trusting"), ..BOB }],
    )
    .unwrap();
    let mut a = Client::start(&topo, &gw, ALICE.name, ALICE.password, &[]).unwrap();
    a.wait_connected(Duration::from_secs(20)).unwrap();
    // The client ignores the pushed routes and sends other traffic in too.
    topo.client
        .ip(&["route", "add", "198.18.4.0/24", "dev", "octun0"])
        .unwrap();
    assert!(topo.client.ping(SERVER, 1), "included subnet");
    let before = gw.drops("split-enforcement").unwrap();
    assert!(
        !topo.client.ping(SERVER_OUTSIDE_SPLIT, 3),
        "non-included subnet must be dropped"
    );
    assert!(gw.drops("split-enforcement").unwrap() >= before + 3);

    // Without enforcement the same route works (the gateway forwards it).
    let mut b = Client::start_in(&topo.client2, &gw, BOB.name, BOB.password, &[]).unwrap();
    b.wait_connected(Duration::from_secs(20)).unwrap();
    topo.client2
        .ip(&["route", "add", "198.18.4.0/24", "dev", "octun0"])
        .unwrap();
    assert!(topo.client2.ping(SERVER_OUTSIDE_SPLIT, 2));
}

#[test]
fn reload_changes_a_live_session_within_a_second() {
    require_root();
    let topo = Topology::new().unwrap();
    let policies = "[[group_policy]]\nname = \"open\"\n\n[[group_policy]]\nname = \"noicmp\"\n[[group_policy.rule]]\naction = \"deny\"\nprotocol = \"icmp\"\n";
    let alice = TestUser {
        group_policy: Some("open"),
        ..ALICE
    };
    let gw = Gateway::start(
        &topo,
        ConfigParts {
            rest: policies,
            ..Default::default()
        },
        &[alice],
    )
    .unwrap();
    let mut c = Client::start(&topo, &gw, ALICE.name, ALICE.password, &[]).unwrap();
    c.wait_connected(Duration::from_secs(20)).unwrap();
    assert!(topo.client.ping(SERVER, 1));

    // Move alice to "noicmp" in the user database and reload.
    let mut db = vpn_daemon::auth::users::UserFile::read(&gw.users_file).unwrap();
    db.users
        .iter_mut()
        .find(|u| u.name == "alice")
        .unwrap()
        .group_policy = Some("noicmp".into());
    db.write(&gw.users_file).unwrap();
    let t0 = Instant::now();
    let out = gw.vpnctl(&["reload"]).unwrap();
    assert!(out.contains("reloaded"), "{out}");
    assert!(
        t0.elapsed() < Duration::from_secs(1),
        "reload took {:?}",
        t0.elapsed()
    );
    assert!(
        !topo.client.ping(SERVER, 2),
        "the new policy applies to the live session"
    );
    assert_eq!(gw.sessions().unwrap()[0]["group_policy"], "noicmp");
    assert_eq!(
        gw.sessions().unwrap()[0]["state"],
        "connected",
        "no reconnect needed"
    );

    // Editing the policy itself applies live too.
    let cfg = std::fs::read_to_string(&gw.config).unwrap();
    std::fs::write(
        &gw.config,
        cfg.replace("protocol = \"icmp\"", "protocol = \"udp\""),
    )
    .unwrap();
    gw.vpnctl(&["reload"]).unwrap();
    assert!(
        topo.client.ping(SERVER, 2),
        "icmp allowed again after the edit"
    );

    // A broken config is rejected and the running policy stays.
    let good = std::fs::read_to_string(&gw.config).unwrap();
    std::fs::write(
        &gw.config,
        good.replace("protocol = \"udp\"", "protocol = \"sctp\""),
    )
    .unwrap();
    let err = gw.vpnctl(&["reload"]).unwrap_err().to_string();
    assert!(
        err.contains("reload rejected") && err.contains("'sctp'"),
        "{err}"
    );
    assert!(topo.client.ping(SERVER, 2), "still the old policy");
    assert!(
        gw.events()
            .iter()
            .any(|e| e["event"] == "config_reload_failed")
    );
    assert!(c.child_mut().try_wait().unwrap().is_none());
}

#[test]
fn a_missing_policy_refuses_the_login() {
    require_root();
    let topo = Topology::new().unwrap();
    let alice = TestUser {
        group_policy: Some("ghost"),
        ..ALICE
    };
    let gw = Gateway::start(
        &topo,
        ConfigParts {
            rest: "[[group_policy]]\nname = \"real\"\n",
            ..Default::default()
        },
        &[alice],
    )
    .unwrap();
    let mut c = Client::start(&topo, &gw, ALICE.name, ALICE.password, &[]).unwrap();
    assert!(!c.wait_exit(Duration::from_secs(20)).unwrap().success());
    assert!(
        c.log().contains("group policy 'ghost' does not exist"),
        "{}",
        c.log()
    );
    assert!(gw.sessions().unwrap().is_empty());
    let ev = gw.events();
    let refused = ev
        .iter()
        .find(|e| e["event"] == "login_refused")
        .expect("event");
    assert!(refused["reason"].as_str().unwrap().contains("'ghost'"));
}

#[test]
fn bandwidth_limits_hold_within_ten_percent() {
    require_root();
    let topo = Topology::new().unwrap();
    let alice = TestUser {
        group_policy: Some("slow"),
        ..ALICE
    };
    let gw = Gateway::start(
        &topo,
        ConfigParts {
            rest: "[[group_policy]]\nname = \"slow\"\nbandwidth_up_kbps = 8000\nbandwidth_down_kbps = 4000\n",
            ..Default::default()
        },
        &[alice],
    )
    .unwrap();
    // Both transports: TLS paces in its tunnel's task (backpressure on
    // uploads), DTLS on the packet workers (their paced queues).
    let paced = |what: &str| gw.stats().unwrap()["dtls_pacing"][what].as_u64().unwrap();
    for (transport, flags) in [("dtls", &[][..]), ("tls", &["--no-dtls"][..])] {
        let mut c = Client::start(&topo, &gw, ALICE.name, ALICE.password, flags).unwrap();
        c.wait_connected(Duration::from_secs(20)).unwrap();
        if transport == "dtls" {
            c.wait_dtls(Duration::from_secs(10)).unwrap();
        }
        let up = iperf3(&topo.client, &topo.server, SERVER, 5, false).unwrap();
        let down = iperf3(&topo.client, &topo.server, SERVER, 5, true).unwrap();
        eprintln!(
            "{transport}: limited to 8000/4000 kbit/s: measured up {:.0} kbit/s, down {:.0} kbit/s",
            up / 1e3,
            down / 1e3
        );
        let sessions = gw.sessions().unwrap();
        let live: Vec<_> = sessions
            .iter()
            .filter(|s| s["state"] == "connected")
            .collect();
        assert_eq!(live.len(), 1);
        assert_eq!(live[0]["transport"], transport);
        // Never above the limit; up to it where the CPU keeps up (an
        // emulated one moved 6.9 of the 8 Mbit/s beside other tests).
        assert!(
            up <= 8.8e6 && down <= 4.4e6,
            "{transport}: up {up}, down {down} bit/s above 8 / 4 Mbit/s + 10%"
        );
        assert_at_speed!(
            up >= 7.2e6,
            "{transport}: up {up} bit/s not within 10% of 8 Mbit/s"
        );
        assert_at_speed!(
            down >= 3.6e6,
            "{transport}: down {down} bit/s not within 10% of 4 Mbit/s"
        );
        let (up_paced, down_paced) = (paced("up_delayed"), paced("down_delayed"));
        eprintln!(
            "{transport}: paced by the workers so far: {up_paced} up, {down_paced} down, {} dropped",
            paced("dropped")
        );
        if transport == "dtls" {
            // The workers paced: thousands of packets each way waited on
            // one (926 up on an emulated CPU whose upload reached 4.6 of
            // the 8 Mbit/s).
            assert!(up_paced + down_paced > 0, "{up_paced} {down_paced}");
            assert_at_speed!(
                up_paced > 1000 && down_paced > 1000,
                "{up_paced} {down_paced}"
            );
        }
        drop(c);
    }
    // The daemon shaped both directions below the BPF policer, which is the
    // hard bound behind it (tested on its own in policy_bpf.rs).
    eprintln!("policer drops: {}", gw.drops("rate-limit").unwrap());
}

#[test]
fn a_schedule_outside_its_window_applies_the_fallback() {
    require_root();
    let topo = Topology::new().unwrap();
    let (today, _) = vpn_daemon::policy::local_now();
    let names = ["mon", "tue", "wed", "thu", "fri", "sat", "sun"];
    let other_day = names[usize::from((today + 3) % 7)];
    let config = format!(
        "[[group_policy]]\nname = \"office\"\n[group_policy.schedule]\ndays = [\"{other_day}\"]\nfallback = \"closed\"\n\n[[group_policy]]\nname = \"closed\"\n[[group_policy.rule]]\naction = \"deny\"\nprotocol = \"icmp\"\n"
    );
    let alice = TestUser {
        group_policy: Some("office"),
        ..ALICE
    };
    let gw = Gateway::start(
        &topo,
        ConfigParts {
            rest: &config,
            ..Default::default()
        },
        &[alice],
    )
    .unwrap();
    let mut c = Client::start(&topo, &gw, ALICE.name, ALICE.password, &[]).unwrap();
    c.wait_connected(Duration::from_secs(20)).unwrap();
    assert_eq!(
        gw.sessions().unwrap()[0]["group_policy"],
        "closed",
        "outside the window"
    );
    assert!(!topo.client.ping(SERVER, 2));

    // Every day: the scheduled policy applies to the live session.
    let cfg = std::fs::read_to_string(&gw.config).unwrap();
    std::fs::write(
        &gw.config,
        cfg.replace(&format!("days = [\"{other_day}\"]"), "days = []"),
    )
    .unwrap();
    gw.vpnctl(&["reload"]).unwrap();
    assert_eq!(gw.sessions().unwrap()[0]["group_policy"], "office");
    assert!(topo.client.ping(SERVER, 2));
}
