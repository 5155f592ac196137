//! Ban points and the XDP blocklist (`auth/bans.rs`, the guard in
//! `vpn-ebpf`): a source that storms wrong passwords is banned and its
//! new connections die in XDP, while other users log in at their usual
//! speed and tunnels already up from the banned address keep going;
//! `vpnctl ban` lists, adds (for a while or for good) and lifts bans.

use std::{
    net::{IpAddr, SocketAddr, TcpStream},
    sync::atomic::{AtomicBool, AtomicU64, Ordering},
    time::{Duration, Instant},
};

use vpn_tests::*;

/// A TCP connection to the gateway's TLS port from `src` in `ns`, given
/// up after `timeout` (a dropped SYN is never answered).
fn connect(ns: &Netns, src: &str, timeout: Duration) -> std::io::Result<TcpStream> {
    let src: IpAddr = src.parse().unwrap();
    in_netns(ns, move || {
        let gw = SocketAddr::new(GW_OUTSIDE.parse().unwrap(), 443);
        let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)?;
        s.bind(&SocketAddr::new(src, 0).into())?;
        s.connect_timeout(&gw.into(), timeout)?;
        Ok(s.into())
    })
}

/// Whether `src` in `ns` gets a TLS session with the gateway.
fn gets_in(ns: &Netns, src: &str) -> bool {
    let Ok(tcp) = connect(ns, src, Duration::from_secs(1)) else {
        return false;
    };
    let Ok(mut s) = tls_over(tcp) else {
        return false;
    };
    post_xml(&mut s, AUTH_INIT).is_ok_and(|(code, _)| code == 200)
}

/// One `openconnect --authenticate` of alice; how long it took.
fn alice_login_time(topo: &Topology, gw: &Gateway) -> Duration {
    let t = Instant::now();
    authenticate(topo, gw, ALICE.name, ALICE.password).expect("alice logs in");
    t.elapsed()
}

/// A gateway with the XDP guard on both client-facing interfaces.
fn guarded(topo: &Topology, users: &[TestUser<'_>]) -> Gateway {
    Gateway::start(
        topo,
        ConfigParts {
            rest: "[dtls]\nxdp_interfaces = [\"up0\", \"up1\"]\n",
            ..ConfigParts::default()
        },
        users,
    )
    .unwrap()
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

#[test]
fn a_wrong_password_storm_is_banned_in_xdp_and_others_log_in_at_their_usual_speed() {
    require_root();
    let topo = Topology::new().unwrap();
    let gw = guarded(&topo, &[ALICE, BOB]);
    let attacker = CLIENT2_OUTSIDE;
    let attacker_net = format!("{attacker}/32");

    // Bob's tunnel is up from the address that will be banned (a user
    // behind the same NAT as the attacker).
    let mut bob = Client::start_in(&topo.client2, &gw, BOB.name, BOB.password, &[]).unwrap();
    bob.wait_connected(Duration::from_secs(20)).unwrap();
    assert!(
        topo.client2.ping(SERVER, 1),
        "bob's tunnel before the storm"
    );

    let baseline = median((0..5).map(|_| alice_login_time(&topo, &gw)).collect());

    // The storm: four threads of wrong passwords from the attacker, each
    // answering every form with a guess, reconnecting when told no.
    let stop = AtomicBool::new(false);
    let (guesses, connects_failed) = (AtomicU64::new(0), AtomicU64::new(0));
    let during = std::thread::scope(|sc| {
        for _ in 0..4 {
            sc.spawn(|| {
                // Bounded: 30 s or 5,000 guesses per thread.
                let end = Instant::now() + Duration::from_secs(30);
                let mut sent = 0;
                while !stop.load(Ordering::Relaxed) && Instant::now() < end && sent < 5_000 {
                    let Ok(tcp) = connect(&topo.client2, attacker, Duration::from_millis(500))
                    else {
                        connects_failed.fetch_add(1, Ordering::Relaxed);
                        continue;
                    };
                    let Ok(mut s) = tls_over(tcp) else { continue };
                    let mut handle: Option<String> = None;
                    while sent < 5_000 && !stop.load(Ordering::Relaxed) {
                        sent += 1;
                        let body = match &handle {
                            Some(h) => auth_reply(h, "alice", "guess"),
                            None => AUTH_INIT.to_owned(),
                        };
                        let Ok((_, text)) = post_xml(&mut s, &body) else {
                            break;
                        };
                        guesses.fetch_add(u64::from(handle.is_some()), Ordering::Relaxed);
                        handle = form_handle(&text);
                        if handle.is_none() {
                            break;
                        }
                    }
                }
            });
        }
        let during: Vec<Duration> = (0..5).map(|_| alice_login_time(&topo, &gw)).collect();
        // The storm goes on until its SYNs have been dropped for a while.
        let dropped = wait_for(Duration::from_secs(20), || {
            (connects_failed.load(Ordering::Relaxed) >= 8).then_some(())
        });
        stop.store(true, Ordering::Relaxed);
        assert!(
            dropped.is_some(),
            "the attacker's connections kept getting through"
        );
        during
    });
    let during = median(during);
    eprintln!(
        "alice's login: {baseline:?} alone, {during:?} in the storm ({} guesses, {} connects dropped)",
        guesses.load(Ordering::Relaxed),
        connects_failed.load(Ordering::Relaxed)
    );
    assert_at_speed!(
        during <= baseline * 2,
        "alice's login took {during:?} in the storm, {baseline:?} alone"
    );

    // Banned by points, with the reason; the drops happened in XDP.
    let banned = gw.events_of("source_banned");
    assert_eq!(banned.len(), 1, "{banned:?}");
    assert_eq!(banned[0]["source"], attacker_net.as_str());
    let reason = banned[0]["reason"].as_str().unwrap();
    assert!(
        reason.starts_with("score 100 of 100: wrong-password x") && reason.contains("locked-out x"),
        "{reason}"
    );
    assert_eq!(banned[0]["secs"], 900);
    let xdp = gw.drops("banned-source").unwrap();
    assert!(xdp >= 8, "{xdp} SYNs dropped in XDP");
    let list = gw.vpnctl(&["ban", "list"]).unwrap();
    assert!(
        list.contains(&attacker_net) && list.contains("wrong-password"),
        "{list}"
    );
    let stats = gw.stats().unwrap();
    assert_eq!(stats["bans"]["active"], 1, "{}", stats["bans"]);
    assert_eq!(stats["bans"]["banned_total"], 1, "{}", stats["bans"]);

    // The banned address opens nothing new; its tunnel stays; others
    // get in.
    assert!(!gets_in(&topo.client2, attacker));
    assert!(topo.client2.ping(SERVER, 1), "bob's tunnel after the ban");
    assert!(gets_in(&topo.client, CLIENT_OUTSIDE));
    let mut alice = Client::start(&topo, &gw, ALICE.name, ALICE.password, &[]).unwrap();
    alice.wait_connected(Duration::from_secs(20)).unwrap();
    assert!(topo.client.ping(SERVER, 1));

    // Lifted by an admin: the address gets in again.
    let out = gw.vpnctl(&["ban", "remove", attacker]).unwrap();
    assert!(
        out.contains(&format!("ban of {attacker_net} lifted")),
        "{out}"
    );
    assert!(gets_in(&topo.client2, attacker));
    let lifted = gw.events_of("ban_lifted");
    assert_eq!(lifted.last().unwrap()["reason"], "vpnctl", "{lifted:?}");
    let out = gw.vpnctl(&["ban", "remove", attacker]).unwrap_err();
    assert!(
        format!("{out:#}").contains(&format!("no ban of {attacker_net}")),
        "{out:#}"
    );
}

#[test]
fn vpnctl_bans_a_prefix_for_a_while_and_refuses_nonsense() {
    require_root();
    let topo = Topology::new().unwrap();
    let gw = guarded(&topo, &[ALICE]);
    let before = gw.drops("banned-source").unwrap();
    let out = gw
        .vpnctl(&["ban", "add", "198.18.3.0/24", "--for", "3s"])
        .unwrap();
    assert!(out.contains("banned 198.18.3.0/24 (3s)"), "{out}");
    assert!(!gets_in(&topo.client2, CLIENT2_OUTSIDE));
    assert!(gets_in(&topo.client, CLIENT_OUTSIDE), "another /24");
    assert!(
        gw.drops("banned-source").unwrap() > before,
        "dropped in XDP"
    );
    let list = gw.vpnctl(&["ban", "list"]).unwrap();
    assert!(
        list.contains("198.18.3.0/24") && list.contains("vpnctl"),
        "{list}"
    );
    // The ban ends by itself, and the sweep says so.
    let back = wait_for(Duration::from_secs(15), || {
        gets_in(&topo.client2, CLIENT2_OUTSIDE).then_some(())
    });
    assert!(back.is_some(), "the ban did not end");
    let lifted = wait_for(Duration::from_secs(10), || {
        gw.events_of("ban_lifted")
            .into_iter()
            .find(|e| e["source"] == "198.18.3.0/24")
    })
    .expect("a ban_lifted event");
    assert_eq!(lifted["reason"], "expired");
    assert!(gw.vpnctl(&["ban", "list"]).unwrap().contains("(no bans)"));

    // Bad input names the value and what would do.
    let e = gw.vpnctl(&["ban", "add", "198.18.300.1"]).unwrap_err();
    let e = format!("{e:#}");
    assert!(
        e.contains("'198.18.300.1' is not an address or a prefix") && e.contains("198.18.7.0/24"),
        "{e}"
    );
    // A ban without an end stays.
    gw.vpnctl(&["ban", "add", CLIENT2_OUTSIDE]).unwrap();
    let list = gw.vpnctl(&["ban", "list"]).unwrap();
    assert!(
        list.contains("198.18.3.2/32") && list.contains("until lifted"),
        "{list}"
    );
    assert!(!gets_in(&topo.client2, CLIENT2_OUTSIDE));
}
