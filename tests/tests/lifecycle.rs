//! Session lifecycle: admin disconnect, resuming with the cookie, dead peer
//! detection and the idle timeout, all with the real client.

use std::time::Duration;

use vpn_tests::*;

fn address(c: &mut Client) -> String {
    c.wait_connected(Duration::from_secs(20)).unwrap()["INTERNAL_IP4_ADDRESS"].clone()
}

#[test]
fn admin_disconnect_ends_the_tunnel_and_a_new_login_keeps_the_address() {
    require_root();
    let topo = Topology::new().unwrap();
    let gw = Gateway::start(&topo, ConfigParts::default(), &[ALICE]).unwrap();
    let cookie = authenticate(&topo, &gw, ALICE.name, ALICE.password).unwrap();
    let mut c = Client::start_with_cookie(&topo, &gw, &cookie).unwrap();
    let addr = address(&mut c);
    assert!(topo.client.ping(SERVER, 1));

    let out = gw.vpnctl(&["disconnect", "alice"]).unwrap();
    assert!(out.contains("disconnected 1 session"), "{out}");
    // openconnect gets the TERMINATE frame and exits by itself.
    let status = c
        .wait_exit(Duration::from_secs(10))
        .expect("openconnect exits");
    assert!(!status.success());
    assert!(c.log().contains("terminate"), "{}", c.log());
    assert!(gw.sessions().unwrap().is_empty());
    let ev = gw.events();
    let d = ev
        .iter()
        .find(|e| e["event"] == "client_disconnected")
        .unwrap();
    assert_eq!(d["reason"], "disconnected by administrator");

    // The ended session's cookie is dead.
    let mut stale = Client::start_with_cookie(&topo, &gw, &cookie).unwrap();
    assert_eq!(
        stale.wait_exit(Duration::from_secs(20)).unwrap().code(),
        Some(2)
    );

    // A new login gets the same address again.
    let mut c2 = Client::start(&topo, &gw, ALICE.name, ALICE.password, &[]).unwrap();
    assert_eq!(address(&mut c2), addr);

    // Disconnecting by VPN address works too.
    let out = gw.vpnctl(&["disconnect", &addr]).unwrap();
    assert!(out.contains("disconnected 1 session"), "{out}");
    assert!(c2.wait_exit(Duration::from_secs(10)).is_some());

    // Unknown targets are an error naming the target.
    let err = gw
        .vpnctl(&["disconnect", "nobody"])
        .unwrap_err()
        .to_string();
    assert!(err.contains("no session matches 'nobody'"), "{err}");
}

#[test]
fn reconnect_with_the_cookie_resumes_the_session_and_address() {
    require_root();
    let topo = Topology::new().unwrap();
    let gw = Gateway::start(&topo, ConfigParts::default(), &[ALICE]).unwrap();
    let cookie = authenticate(&topo, &gw, ALICE.name, ALICE.password).unwrap();
    let mut c = Client::start_with_cookie(&topo, &gw, &cookie).unwrap();
    let addr = address(&mut c);
    let id = gw.sessions().unwrap()[0]["id"].clone();

    // SIGHUP: openconnect detaches without a BYE (a lost network looks the
    // same to the gateway). The session waits for the client to come back.
    c.signal("HUP");
    c.wait_exit(Duration::from_secs(10))
        .expect("openconnect detaches");
    assert!(
        wait_for(Duration::from_secs(10), || {
            (gw.sessions().unwrap()[0]["state"] == "disconnected").then_some(())
        })
        .is_some()
    );

    let mut c2 = Client::start_with_cookie(&topo, &gw, &cookie).unwrap();
    assert_eq!(address(&mut c2), addr, "same address without a new login");
    let s = gw.sessions().unwrap();
    assert_eq!(s.len(), 1);
    assert_eq!(s[0]["id"], id, "same session");
    assert_eq!(s[0]["state"], "connected");
    assert!(topo.client.ping(SERVER, 2));
    assert!(
        gw.events()
            .iter()
            .any(|e| e["event"] == "client_connected" && e["resumed"] == true)
    );

    // SIGUSR2: openconnect reconnects in place; the gateway must answer with
    // the identical address or openconnect aborts.
    c2.signal("USR2");
    assert!(
        wait_for(Duration::from_secs(20), || c2
            .reasons()
            .contains(&"reconnect".to_string())
            .then_some(()))
        .is_some(),
        "{}",
        c2.log()
    );
    assert!(
        c2.child_mut().try_wait().unwrap().is_none(),
        "still running"
    );
    assert!(topo.client.ping(SERVER, 2));
}

#[test]
fn dead_peer_is_detected_and_the_session_expires() {
    require_root();
    let topo = Topology::new().unwrap();
    let gw = Gateway::start(
        &topo,
        ConfigParts {
            rest: "[session]\ndpd_secs = 1\ndisconnected_timeout_secs = 3\n",
            ..Default::default()
        },
        &[ALICE],
    )
    .unwrap();
    let mut c = Client::start(&topo, &gw, ALICE.name, ALICE.password, &[]).unwrap();
    address(&mut c);
    // Freeze the client: it stops answering DPD but its socket stays open.
    c.signal("STOP");
    let down = wait_for(Duration::from_secs(10), || {
        gw.events()
            .into_iter()
            .find(|e| e["event"] == "tunnel_down")
    })
    .expect("tunnel declared down");
    assert!(
        down["reason"].as_str().unwrap().contains("dead peer"),
        "{down}"
    );
    let ended = wait_for(Duration::from_secs(10), || {
        gw.events()
            .into_iter()
            .find(|e| e["event"] == "client_disconnected")
    })
    .expect("session ended");
    assert_eq!(ended["reason"], "disconnected timeout");
    assert!(gw.sessions().unwrap().is_empty());
    c.signal("CONT");
}

#[test]
fn idle_sessions_are_ended() {
    require_root();
    let topo = Topology::new().unwrap();
    let gw = Gateway::start(
        &topo,
        ConfigParts {
            rest: "[session]\nidle_timeout_secs = 3\n",
            ..Default::default()
        },
        &[ALICE],
    )
    .unwrap();
    let mut c = Client::start(&topo, &gw, ALICE.name, ALICE.password, &[]).unwrap();
    address(&mut c);
    let status = c
        .wait_exit(Duration::from_secs(15))
        .expect("idle session ended");
    assert!(!status.success());
    let ended = gw
        .events()
        .into_iter()
        .find(|e| e["event"] == "client_disconnected")
        .unwrap();
    assert_eq!(ended["reason"], "idle timeout");
}

#[test]
fn sigterm_tells_every_client_removes_what_vpnd_made_and_exits_within_5_s() {
    require_root();
    let topo = Topology::new().unwrap();
    let mut gw = Gateway::start(&topo, ConfigParts::default(), &[ALICE, BOB]).unwrap();
    let mut a = Client::start(&topo, &gw, ALICE.name, ALICE.password, &[]).unwrap();
    a.wait_connected(Duration::from_secs(20)).unwrap();
    let mut b = Client::start_in(&topo.client2, &gw, BOB.name, BOB.password, &[]).unwrap();
    b.wait_connected(Duration::from_secs(20)).unwrap();
    assert!(gw.pin_dir.exists());
    assert!(topo.gw.ip(&["link", "show", "vpn0"]).is_ok());

    let started = std::time::Instant::now();
    let status = gw.stop().expect("vpnd exits on SIGTERM");
    let took = started.elapsed();
    assert!(status.success(), "{status:?}\n{}", gw.log());
    eprintln!("vpnd stopped in {took:?}");
    assert!(took < Duration::from_secs(5), "took {took:?}");

    // Both clients were told: they exit by themselves instead of
    // reconnecting.
    for c in [&mut a, &mut b] {
        assert!(
            c.wait_exit(Duration::from_secs(10)).is_some(),
            "{}",
            c.log()
        );
        assert!(c.log().contains("terminate"), "{}", c.log());
    }
    let ended: Vec<_> = gw
        .events()
        .into_iter()
        .filter(|e| e["event"] == "client_disconnected")
        .map(|e| e["reason"].clone())
        .collect();
    assert_eq!(ended, vec!["gateway shutting down"; 2]);
    // Nothing it made remains: the tunnel device (and its TC programs
    // with it), the pinned maps.
    assert!(topo.gw.ip(&["link", "show", "vpn0"]).is_err());
    assert!(!gw.pin_dir.exists(), "{}", gw.pin_dir.display());
}
