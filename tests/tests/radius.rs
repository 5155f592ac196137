//! RADIUS authentication against a real FreeRADIUS in the server
//! namespace, with the real openconnect logging in: Filter-Id picks the
//! policy, Framed-IP-Address and the timeouts reach the client, a second
//! factor by Access-Challenge, failover between servers, and a clear
//! message when none answers.

use std::time::Duration;

use vpn_tests::{radius::*, *};

/// The gateway's config with `auth.method = "radius"` and `servers`
/// (`(address, secret)`) in order.
fn radius_config(servers: &[(&str, &str)]) -> String {
    let mut rest = String::from(
        "[radius]\ntimeout_ms = 500\ntries = 2\ninterim_secs = 2\n\
         dynamic_authorization = \"198.18.2.1:3799\"\n\n\
         [[group_policy]]\nname = \"engineering\"\n\n\
         [[group_policy]]\nname = \"staff\"\n\n\
         [[group_policy.rule]]\naction = \"deny\"\nprotocol = \"icmp\"\ndestination = \"198.18.2.2/32\"\n\n\
         [policy]\ndefault = \"staff\"\n",
    );
    for (address, secret) in servers {
        rest.push_str(&format!(
            "\n[[radius.server]]\naddress = \"{address}\"\nsecret = \"{secret}\"\n"
        ));
    }
    rest
}

fn start_gateway(topo: &Topology, servers: &[(&str, &str)]) -> Gateway {
    let rest = radius_config(servers);
    // The local users file has none of these users: RADIUS decides.
    Gateway::start_with_method(topo, "radius", &rest, &[]).unwrap()
}

/// A topology, FreeRADIUS in its server namespace, and a gateway that
/// asks it.
fn with_one_server() -> (Topology, FreeRadius, Gateway) {
    require_root();
    let topo = Topology::new().unwrap();
    let radius = FreeRadius::start(&topo.server, SERVER, GW_INSIDE).unwrap();
    let gw = start_gateway(&topo, &[(&format!("{SERVER}:1812"), SECRET)]);
    (topo, radius, gw)
}

#[test]
fn radius_accept_applies_filter_id_framed_ip_and_timeouts() {
    let (topo, radius, gw) = with_one_server();

    let mut alice = Client::start(&topo, &gw, "alice", "alice-pw", &[]).unwrap();
    let env = alice.wait_connected(Duration::from_secs(20)).unwrap();
    // Framed-IP-Address is the client's address; Idle-Timeout 900 is
    // shorter than the configured 1800, so the client is told 900.
    assert_eq!(env["INTERNAL_IP4_ADDRESS"], ALICE_FRAMED_IP);
    assert_eq!(env["IDLE_TIMEOUT"], "900");
    assert!(topo.client.ping(SERVER, 2), "traffic through the tunnel");
    let s = gw.sessions().unwrap();
    assert_eq!(s.len(), 1);
    assert_eq!(s[0]["user"], "alice");
    // Filter-Id names the policy, over the default "staff".
    assert_eq!(s[0]["group_policy"], "engineering");
    // vpnctl show says what the client was pushed, and who let it in.
    let shown: serde_json::Value =
        serde_json::from_str(&gw.vpnctl(&["show", "alice", "--json"]).unwrap()).unwrap();
    let d = &shown[0];
    assert_eq!(d["authenticated_by"], "radius");
    assert_eq!(d["login_from"], CLIENT_OUTSIDE);
    assert_eq!(
        d["pushed"]["address"].as_str().unwrap().split('/').next(),
        Some(env["INTERNAL_IP4_ADDRESS"].as_str())
    );
    assert_eq!(
        d["pushed"]["idle_timeout_secs"].to_string(),
        env["IDLE_TIMEOUT"]
    );
    assert_eq!(d["pushed"]["session_timeout_secs"], 3600);
    let left = d["timers"]["session_left_secs"].as_u64().unwrap();
    assert!((3500..=3600).contains(&left), "{left}");
    assert!(d["timers"]["idle_left_secs"].as_u64().unwrap() <= 900);
    assert!(d["timers"]["disconnected_left_secs"].is_null());
    let text = gw.vpnctl(&["show", ALICE_FRAMED_IP]).unwrap();
    assert!(text.contains("authenticated by radius"), "{text}");
    assert!(gw.vpnctl(&["show", "nobody"]).is_err());

    // A user without Filter-Id gets the default policy.
    let mut bob = Client::start_in(&topo.client2, &gw, "bob", "bob-pw", &[]).unwrap();
    bob.wait_connected(Duration::from_secs(20)).unwrap();
    let s = gw.sessions().unwrap();
    let bob_row = s.iter().find(|r| r["user"] == "bob").unwrap();
    assert_eq!(bob_row["group_policy"], "staff");
    assert_ne!(bob_row["vpn_address"], ALICE_FRAMED_IP);

    // Accounting: a Start with who holds which address, Interim-Updates
    // with the counters, and a Stop that says why.
    let of_alice = |status: &str| {
        radius
            .accounting()
            .into_iter()
            .filter(|r| {
                r.get("User-Name").map(String::as_str) == Some("alice")
                    && r.get("Acct-Status-Type").map(String::as_str) == Some(status)
            })
            .collect::<Vec<_>>()
    };
    let start = wait_for(Duration::from_secs(5), || of_alice("Start").pop())
        .unwrap_or_else(|| panic!("no Start:\n{}", radius.detail()));
    assert_eq!(start["Framed-IP-Address"], ALICE_FRAMED_IP);
    assert_eq!(start["Calling-Station-Id"], CLIENT_OUTSIDE);
    assert_eq!(start["Class"], format!("0x{}", hex("acct-class-1")));
    assert_eq!(start["NAS-Port-Type"], "Virtual");
    let octets = |r: &std::collections::HashMap<String, String>, k: &str| -> u64 {
        r.get(k).and_then(|v| v.parse().ok()).unwrap_or(0)
    };
    let interim = wait_for(Duration::from_secs(8), || {
        of_alice("Interim-Update")
            .into_iter()
            .find(|r| octets(r, "Acct-Input-Octets") > 0)
    })
    .unwrap_or_else(|| panic!("no Interim-Update with traffic:\n{}", radius.detail()));
    assert_eq!(interim["Acct-Session-Id"], start["Acct-Session-Id"]);
    gw.vpnctl(&["disconnect", "alice"]).unwrap();
    let stop = wait_for(Duration::from_secs(5), || of_alice("Stop").pop())
        .unwrap_or_else(|| panic!("no Stop:\n{}", radius.detail()));
    assert_eq!(stop["Acct-Session-Id"], start["Acct-Session-Id"]);
    assert_eq!(stop["Acct-Terminate-Cause"], "Admin-Reset");
    assert!(octets(&stop, "Acct-Input-Octets") >= octets(&interim, "Acct-Input-Octets"));
    assert!(octets(&stop, "Acct-Output-Packets") >= 2, "{stop:?}");
    assert_eq!(stop["Class"], start["Class"]);
    // vpnctl stats counts what accounting sent.
    let acct = gw.stats().unwrap()["accounting"].clone();
    assert!(acct["sent"].as_u64().unwrap() >= 4, "{acct}");
    assert_eq!(acct["failed"], 0, "{acct}");
}

fn hex(s: &str) -> String {
    s.bytes().map(|b| format!("{b:02x}")).collect()
}

#[test]
fn radius_rejects_wrong_passwords_and_unknown_policies_fail_closed() {
    let (topo, _radius, gw) = with_one_server();

    let mut c = Client::start(&topo, &gw, "alice", "not-her-password", &[]).unwrap();
    assert!(!c.wait_exit(Duration::from_secs(20)).unwrap().success());
    assert!(
        c.log().contains("invalid username or password"),
        "{}",
        c.log()
    );
    let failed = gw.events_of("authentication_failed");
    assert_eq!(failed.len(), 1, "{failed:?}");
    assert_eq!(failed[0]["user"], "alice");
    assert_eq!(failed[0]["reason"], "rejected by the authentication server");

    // Filter-Id naming a policy the gateway does not have: no session.
    let mut g = Client::start(&topo, &gw, "ghost", "ghost-pw", &[]).unwrap();
    assert!(!g.wait_exit(Duration::from_secs(20)).unwrap().success());
    assert!(g.log().contains("no-such-policy"), "{}", g.log());
    assert!(gw.sessions().unwrap().is_empty());
    let refused = gw.events_of("login_refused");
    assert_eq!(refused.len(), 1, "{refused:?}");
    assert_eq!(refused[0]["user"], "ghost");
}

#[test]
fn radius_challenge_asks_openconnect_for_a_second_factor() {
    let (topo, _radius, gw) = with_one_server();

    // The challenge form's field, filled by openconnect non-interactively.
    let code = format!("--form-entry=challenge:secondary_password={MFA_CODE}");
    let mut c = Client::start(&topo, &gw, "mfa", "mfa-pw", &[&code]).unwrap();
    c.wait_connected(Duration::from_secs(20)).unwrap();
    assert!(
        c.log().contains("Enter the code from your token"),
        "{}",
        c.log()
    );
    assert_eq!(gw.sessions().unwrap()[0]["user"], "mfa");
    drop(c);

    // The code typed as a user would: openconnect reads the challenge's
    // answer from stdin after the password.
    let both = format!("mfa-pw\n{MFA_CODE}");
    let mut c = Client::start(&topo, &gw, "mfa", &both, &[]).unwrap();
    c.wait_connected(Duration::from_secs(20)).unwrap();
    assert!(c.log().contains("Enter the code from your token"));
    drop(c);

    // A wrong code: the server's message, and back to the password form.
    let wrong = "--form-entry=challenge:secondary_password=000000";
    let mut c = Client::start_in(&topo.client2, &gw, "mfa", "mfa-pw", &[wrong]).unwrap();
    assert!(!c.wait_exit(Duration::from_secs(20)).unwrap().success());
    assert!(c.log().contains("Wrong code"), "{}", c.log());
    assert!(
        gw.events_of("authentication_failed")
            .iter()
            .any(|e| e["user"] == "mfa")
    );
}

#[test]
fn radius_fails_over_and_says_when_no_server_answers() {
    require_root();
    let topo = Topology::new().unwrap();
    let radius = FreeRadius::start(&topo.server, SERVER, GW_INSIDE).unwrap();
    // First a port nothing listens on (ICMP unreachable), then the server.
    let closed = format!("{SERVER}:1999");
    let good = format!("{SERVER}:1812");
    let gw = start_gateway(&topo, &[(&closed, SECRET), (&good, SECRET)]);
    let mut c = Client::start(&topo, &gw, "bob", "bob-pw", &[]).unwrap();
    c.wait_connected(Duration::from_secs(20)).unwrap();
    assert!(gw.log().contains("now asking 198.18.2.2:1812 first"));
    drop(c);
    drop(gw);

    // Nobody answers: the closed port, and the real server with a wrong
    // secret (FreeRADIUS drops requests whose Message-Authenticator it
    // cannot verify, and says so).
    let gw = start_gateway(&topo, &[(&closed, SECRET), (&good, "wrong-secret")]);
    let mut c = Client::start(&topo, &gw, "bob", "bob-pw", &[]).unwrap();
    assert!(!c.wait_exit(Duration::from_secs(20)).unwrap().success());
    let log = c.log();
    assert!(
        log.contains("authentication service is unavailable"),
        "{log}"
    );
    assert!(!log.contains("invalid username or password"), "{log}");
    let down = gw.events_of("authentication_unavailable");
    assert_eq!(down.len(), 1, "{down:?}");
    let servers = down[0]["servers"].as_str().unwrap();
    assert!(
        servers.contains("198.18.2.2:1999: nothing listens"),
        "{servers}"
    );
    assert!(
        servers.contains("198.18.2.2:1812: no answer to 2 tries"),
        "{servers}"
    );
    // Not counted as a failed login.
    assert!(gw.events_of("authentication_failed").is_empty());
    assert!(
        radius.log().contains("Message-Authenticator"),
        "{}",
        radius.log()
    );
}

/// `radclient` (FreeRADIUS's own client) in the server namespace sending
/// `attrs` as a `kind` ("coa" or "disconnect") request to the gateway;
/// its output.
fn radclient(topo: &Topology, kind: &str, attrs: &str, secret: &str) -> String {
    let mut cmd = topo.server.cmd("radclient");
    cmd.args(["-x", "-r", "1", "-t", "2"])
        .arg(format!("{GW_INSIDE}:3799"))
        .args([kind, secret])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    let mut child = cmd.spawn().unwrap();
    {
        use std::io::Write as _;
        let mut stdin = child.stdin.take().unwrap();
        writeln!(stdin, "{attrs},Message-Authenticator=0x00").unwrap();
    }
    let out = child.wait_with_output().unwrap();
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

#[test]
fn radius_coa_changes_the_policy_live_and_disconnect_ends_the_session() {
    let (topo, radius, gw) = with_one_server();
    let mut alice = Client::start(&topo, &gw, "alice", "alice-pw", &[]).unwrap();
    alice.wait_connected(Duration::from_secs(20)).unwrap();
    let policy = || gw.sessions().unwrap()[0]["group_policy"].clone();
    assert_eq!(policy(), "engineering");
    assert!(topo.client.ping(SERVER, 1), "engineering may ping");

    // CoA with a Filter-Id: the session moves at once, in the data path
    // too ("staff" denies ICMP to the server).
    let out = radclient(&topo, "coa", "User-Name=alice,Filter-Id=staff", SECRET);
    assert!(out.contains("Received CoA-ACK"), "{out}");
    assert_eq!(policy(), "staff");
    assert!(!topo.client.ping(SERVER, 2), "staff may not ping");
    // A policy the gateway does not have: NAK, nothing changes.
    let out = radclient(&topo, "coa", "User-Name=alice,Filter-Id=nope", SECRET);
    assert!(out.contains("Received CoA-NAK"), "{out}");
    assert!(out.contains("Invalid-Attribute-Value"), "{out}");
    assert_eq!(policy(), "staff");
    // Nobody by that name: NAK with the RFC's cause.
    let out = radclient(&topo, "disconnect", "User-Name=nobody", SECRET);
    assert!(out.contains("Received Disconnect-NAK"), "{out}");
    assert!(out.contains("Session-Context-Not-Found"), "{out}");
    // The same request sent again (a capture replayed) gets no second
    // answer.
    let packet = vpn_daemon::proto::radius::dynamic_request(
        vpn_daemon::proto::radius::Code::DisconnectRequest,
        7,
        SECRET.as_bytes(),
        &[(vpn_daemon::proto::radius::attr::USER_NAME, b"nobody")],
    )
    .unwrap();
    let answers = in_netns(&topo.server, move || {
        let s = std::net::UdpSocket::bind(format!("{SERVER}:0")).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        let mut got = Vec::new();
        for _ in 0..2 {
            s.send_to(&packet, format!("{GW_INSIDE}:3799")).unwrap();
            let mut buf = [0u8; 4096];
            got.push(s.recv(&mut buf).ok().map(|n| buf[0..n].to_vec()));
        }
        got
    });
    let first = answers[0].as_ref().expect("the first is answered");
    assert_eq!(
        first[0],
        vpn_daemon::proto::radius::Code::DisconnectNak as u8
    );
    assert!(answers[1].is_none(), "the replay is not");
    // A wrong secret gets no answer at all, and changes nothing.
    let out = radclient(&topo, "disconnect", "User-Name=alice", "wrong-secret");
    assert!(!out.contains("Received"), "{out}");
    assert_eq!(gw.sessions().unwrap().len(), 1);

    // Disconnect: the session ends, the client is told, accounting says why.
    let out = radclient(&topo, "disconnect", "User-Name=alice", SECRET);
    assert!(out.contains("Received Disconnect-ACK"), "{out}");
    assert!(
        alice.wait_exit(Duration::from_secs(10)).is_some(),
        "openconnect exits"
    );
    assert!(gw.sessions().unwrap().is_empty());
    assert!(
        gw.events()
            .iter()
            .any(|e| e["event"] == "client_disconnected"
                && e["reason"] == "disconnected by the RADIUS server (Disconnect-Request)")
    );
    let stop = wait_for(Duration::from_secs(5), || {
        radius
            .accounting()
            .into_iter()
            .find(|r| r.get("Acct-Status-Type").map(String::as_str) == Some("Stop"))
    })
    .unwrap();
    assert_eq!(stop["Acct-Terminate-Cause"], "Admin-Reset");
}

#[test]
fn one_group_uses_radius_beside_local_users_and_reload_moves_its_servers() {
    require_root();
    let topo = Topology::new().unwrap();
    let _radius = FreeRadius::start(&topo.server, SERVER, GW_INSIDE).unwrap();
    let lena = TestUser {
        name: "lena",
        password: "lena-pw",
        group_policy: None,
    };
    let rest = format!(
        "[[group]]\nname = \"staff\"\n\n\
         [[group]]\nname = \"contractors\"\nmethod = \"radius\"\n\n\
         [radius]\ntimeout_ms = 500\ntries = 1\naccounting = false\n\n\
         [[radius.server]]\naddress = \"{SERVER}:1812\"\nsecret = \"{SECRET}\"\n"
    );
    let gw = Gateway::start(
        &topo,
        ConfigParts {
            rest: &rest,
            ..Default::default()
        },
        &[lena],
    )
    .unwrap();
    // The local user in the local group, the RADIUS user in the RADIUS one.
    let mut l = Client::start(&topo, &gw, "lena", "lena-pw", &["--authgroup=staff"]).unwrap();
    l.wait_connected(Duration::from_secs(20)).unwrap();
    let mut b = Client::start_in(
        &topo.client2,
        &gw,
        "bob",
        "bob-pw",
        &["--authgroup=contractors"],
    )
    .unwrap();
    b.wait_connected(Duration::from_secs(20)).unwrap();
    let groups: Vec<_> = gw
        .sessions()
        .unwrap()
        .iter()
        .map(|s| format!("{}@{}", s["user"], s["group"]).replace('"', ""))
        .collect();
    assert!(groups.contains(&"lena@staff".to_owned()), "{groups:?}");
    assert!(groups.contains(&"bob@contractors".to_owned()), "{groups:?}");
    drop(b);
    // RADIUS's bob is nobody in the local group.
    let mut c =
        Client::start_in(&topo.client2, &gw, "bob", "bob-pw", &["--authgroup=staff"]).unwrap();
    assert!(!c.wait_exit(Duration::from_secs(20)).unwrap().success());

    // A reload moves the group's RADIUS server (here: to a closed port):
    // new logins use it at once, no restart.
    let config = std::fs::read_to_string(&gw.config).unwrap();
    std::fs::write(&gw.config, config.replace(":1812", ":1999")).unwrap();
    let out = gw.vpnctl(&["reload"]).unwrap();
    assert!(out.contains("reloaded"), "{out}");
    assert!(!out.contains("restart"), "{out}");
    let mut c = Client::start_in(
        &topo.client2,
        &gw,
        "bob",
        "bob-pw",
        &["--authgroup=contractors"],
    )
    .unwrap();
    assert!(!c.wait_exit(Duration::from_secs(20)).unwrap().success());
    assert!(
        c.log().contains("authentication service is unavailable"),
        "{}",
        c.log()
    );
    // The session already up stays.
    assert!(topo.client.ping(SERVER, 1));
}
