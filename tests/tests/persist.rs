//! `session.persist`: sessions survive a restart of vpnd, stopped or
//! killed; the real openconnect reconnects with its cookie to the same
//! session and address. Off, a restart ends them.

use std::time::Duration;

use vpn_tests::*;

const PERSIST: &str = "[session]\npersist = true\n";

/// A gateway with `session.persist` on, Alice its user.
fn with_persist(topo: &Topology) -> Gateway {
    Gateway::start(
        topo,
        ConfigParts {
            rest: PERSIST,
            ..ConfigParts::default()
        },
        &[ALICE],
    )
    .unwrap()
}

fn state_file(gw: &Gateway) -> std::path::PathBuf {
    gw.state_dir.join("sessions.json")
}

/// The one session, as `vpnctl sessions --json` shows it.
fn only_session(gw: &Gateway) -> serde_json::Value {
    let s = gw.sessions().unwrap();
    assert_eq!(s.len(), 1, "{s:?}");
    s[0].clone()
}

#[test]
fn with_session_persist_clients_reconnect_to_their_sessions_after_a_stop_or_a_kill() {
    require_root();
    let topo = Topology::new().unwrap();
    let mut gw = with_persist(&topo);
    let cookie = authenticate(&topo, &gw, ALICE.name, ALICE.password).unwrap();
    let mut c = Client::start_with_cookie(&topo, &gw, &cookie).unwrap();
    let env = c.wait_connected(Duration::from_secs(20)).unwrap();
    let address = env["INTERNAL_IP4_ADDRESS"].clone();
    assert!(topo.client.ping(SERVER, 3));
    let first = only_session(&gw);
    assert_eq!(first["vpn_address"], address.as_str());

    // Counters come back as last saved: at a stop, exactly; after a kill,
    // as of the last save (a change, or every 30 s).
    let mut saved_bytes = 0;
    for how in ["stopped", "killed"] {
        let bytes_before = match how {
            "stopped" => only_session(&gw)["bytes_in"].as_u64().unwrap(),
            _ => saved_bytes,
        };
        match how {
            "stopped" => {
                gw.stop();
            }
            _ => gw.kill(),
        }
        // The file holds the session, its cookie only as a hash, 0600.
        let text = std::fs::read_to_string(state_file(&gw)).unwrap();
        let hash = hex::encode(vpn_daemon::session::cookie_hash(webvpn_cookie(&cookie)));
        assert!(
            text.contains(&hash) && !text.contains(webvpn_cookie(&cookie)),
            "{how}: {text}"
        );
        use std::os::unix::fs::PermissionsExt as _;
        let mode = std::fs::metadata(state_file(&gw))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600, "{how}");

        gw.restart(&topo).unwrap();
        // The session is back before its client is: same id, address and
        // counters, waiting for its tunnel.
        let s = only_session(&gw);
        assert_eq!(s["id"], first["id"], "{how}: {s}");
        assert_eq!(s["vpn_address"], address.as_str(), "{how}");
        assert_eq!(s["state"], "disconnected", "{how}: {s}");
        assert!(
            s["bytes_in"].as_u64().unwrap() >= bytes_before,
            "{how}: {s}"
        );
        saved_bytes = s["bytes_in"].as_u64().unwrap();
        assert!(saved_bytes > 0, "{how}: {s}");
        let restored = gw
            .events_of("sessions_restored")
            .pop()
            .expect("a sessions_restored event");
        assert_eq!(restored["restored"], 1, "{how}: {restored}");

        // openconnect reconnects by itself (its first retry comes at once,
        // the next after 10 s) and traffic flows again.
        let back = wait_for(Duration::from_secs(60), || {
            (only_session(&gw)["state"] == "connected").then_some(())
        });
        assert!(back.is_some(), "{how}: not reconnected:\n{}", c.log());
        assert!(
            wait_for(Duration::from_secs(10), || topo
                .client
                .ping(SERVER, 1)
                .then_some(()))
            .is_some(),
            "{how}: no traffic after the reconnect"
        );
        assert!(
            c.child_mut().try_wait().unwrap().is_none(),
            "{how}: openconnect gave up"
        );
        let s = only_session(&gw);
        assert_eq!(s["id"], first["id"]);
        assert_eq!(s["vpn_address"], address.as_str());
    }

    // A password changed while vpnd was down ends the session, as it
    // would have while up.
    gw.stop();
    let out = gw.vpnctl_user(&["passwd", ALICE.name], "a-new-password");
    assert!(out.status.success(), "{out:?}");
    gw.restart(&topo).unwrap();
    assert!(gw.sessions().unwrap().is_empty());
    let restored = gw.events_of("sessions_restored").pop().unwrap();
    assert_eq!(restored["restored"], 0, "{restored}");
    let why = restored["left_out"][0].as_str().unwrap();
    assert!(
        why.starts_with(&format!("session {} of alice ({address})", first["id"]))
            && why.ends_with("the user's password changed"),
        "{why}"
    );

    // A file that does not read is kept aside; vpnd starts without it.
    gw.stop();
    std::fs::write(state_file(&gw), "{\"version\": 1, \"sessions\": [").unwrap();
    gw.restart(&topo).unwrap();
    assert!(gw.sessions().unwrap().is_empty());
    assert!(gw.state_dir.join("sessions.json.bad").exists());
    assert!(
        gw.log().contains("does not read; it is kept as"),
        "{}",
        gw.log()
    );
}

#[test]
fn without_session_persist_a_restart_ends_sessions_and_forgets_a_saved_file() {
    require_root();
    let topo = Topology::new().unwrap();
    let mut gw = with_persist(&topo);
    let mut c = Client::start(&topo, &gw, ALICE.name, ALICE.password, &[]).unwrap();
    c.wait_connected(Duration::from_secs(20)).unwrap();
    gw.stop();
    assert!(state_file(&gw).exists());
    // Turned off: the saved session does not come back, and the file goes.
    let config = std::fs::read_to_string(&gw.config).unwrap();
    std::fs::write(
        &gw.config,
        config.replace("persist = true", "persist = false"),
    )
    .unwrap();
    gw.restart(&topo).unwrap();
    assert!(gw.sessions().unwrap().is_empty());
    assert!(!state_file(&gw).exists());
    // The client's cookie is refused and it gives up.
    let gone = c.wait_exit(Duration::from_secs(60));
    assert!(gone.is_some(), "openconnect still running:\n{}", c.log());
    assert!(
        gw.log()
            .contains("CONNECT with an unknown or expired cookie"),
        "{}",
        gw.log()
    );
}
