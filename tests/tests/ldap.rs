//! LDAP authentication against a real OpenLDAP slapd in the server
//! namespace, with the real openconnect logging in: LDAPS and StartTLS,
//! search-then-bind and DN templates, groups mapped to policies (first
//! match wins), users in no group, failover, and a directory that is down.

use std::time::Duration;

use vpn_tests::{ldap::*, *};

/// The gateway's config with `auth.method = "ldap"` and the `[ldap]` lines
/// `ldap`.
fn start_gateway(topo: &Topology, ldap: &str) -> Gateway {
    let rest = format!(
        "[[group_policy]]\nname = \"engineering\"\n\n\
         [[group_policy]]\nname = \"staff\"\n\n\
         [[group_policy]]\nname = \"guest\"\n\n\
         [policy]\ndefault = \"guest\"\n\n\
         [ldap]\ntimeout_ms = 2000\n{ldap}\n\
         [[ldap.group_map]]\ngroup = \"vpn-eng\"\npolicy = \"engineering\"\n\n\
         [[ldap.group_map]]\ngroup = \"cn=vpn-staff, ou=groups, {BASE}\"\npolicy = \"staff\"\n"
    );
    Gateway::start_with_method(topo, "ldap", &rest, &[]).unwrap()
}

fn policy_of(gw: &Gateway, user: &str) -> serde_json::Value {
    gw.sessions()
        .unwrap()
        .into_iter()
        .find(|s| s["user"] == user)
        .map(|s| s["group_policy"].clone())
        .unwrap_or_default()
}

fn failure_reasons(gw: &Gateway, user: &str) -> Vec<String> {
    gw.events()
        .into_iter()
        .filter(|e| e["event"] == "authentication_failed" && e["user"] == user)
        .map(|e| e["reason"].as_str().unwrap_or_default().to_owned())
        .collect()
}

#[test]
fn ldaps_search_then_bind_maps_groups_to_policies() {
    require_root();
    let topo = Topology::new().unwrap();
    let slapd = Slapd::start(&topo.server, SERVER).unwrap();
    let gw = start_gateway(
        &topo,
        &format!(
            "servers = [\"ldaps://{SERVER}:636\"]\nca_file = \"{ca}\"\n\
             search_base = \"ou=people,{BASE}\"\n\
             service_dn = \"{SERVICE_DN}\"\nservice_password = \"{SERVICE_PASSWORD}\"\n\
             group_base = \"ou=groups,{BASE}\"\nnested_groups = true\n",
            ca = slapd.ca_file().display()
        ),
    );

    let mut carol = Client::start(&topo, &gw, "carol", "carol-pw", &[]).unwrap();
    carol.wait_connected(Duration::from_secs(20)).unwrap();
    assert!(topo.client.ping(SERVER, 1), "traffic through the tunnel");
    assert_eq!(policy_of(&gw, "carol"), "engineering", "mapped by name");
    drop(carol);

    let mut dave = Client::start_in(&topo.client2, &gw, "dave", "dave-pw", &[]).unwrap();
    dave.wait_connected(Duration::from_secs(20)).unwrap();
    assert_eq!(policy_of(&gw, "dave"), "staff", "mapped by DN");
    drop(dave);

    // In vpn-interns, which is in vpn-eng: engineering, by nesting.
    let mut erin = Client::start(&topo, &gw, "erin", "erin-pw", &[]).unwrap();
    erin.wait_connected(Duration::from_secs(20)).unwrap();
    assert_eq!(policy_of(&gw, "erin"), "engineering", "a nested group");
    // Her directory groups go to the identity feed's consumers (and the
    // event log) with her address.
    let mapped = gw
        .events_of("identity_changed")
        .into_iter()
        .find(|e| e["user"] == "erin" && e["op"] == "add")
        .expect("erin's identity_changed event");
    let groups: Vec<&str> = mapped["groups"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|g| g.as_str())
        .collect();
    assert!(
        groups.contains(&"vpn-interns") && groups.contains(&"vpn-eng"),
        "{mapped}"
    );
    drop(erin);

    // In no group: the default policy (unmapped = "default").
    let mut frank = Client::start(&topo, &gw, "frank", "frank-pw", &[]).unwrap();
    frank.wait_connected(Duration::from_secs(20)).unwrap();
    assert_eq!(policy_of(&gw, "frank"), "guest");
    drop(frank);

    // A wrong password and an unknown user: no session.
    for (user, pw, reason) in [
        ("carol", "not-carols", "wrong password"),
        ("zed", "x", "unknown user"),
    ] {
        let mut c = Client::start(&topo, &gw, user, pw, &[]).unwrap();
        assert!(!c.wait_exit(Duration::from_secs(20)).unwrap().success());
        assert!(
            failure_reasons(&gw, user).contains(&reason.to_owned()),
            "{user}: {:?}",
            gw.events()
        );
    }
    // An empty password (openconnect never sends one; a raw client
    // can), which an LDAP server would take as an unauthenticated bind
    // and answer with success: refused (the login flow asks again; the
    // LDAP client refuses it too, see its unit test).
    let dave_binds = || slapd.log().matches("BIND dn=\"uid=dave").count();
    let binds_before = dave_binds();
    let mut s = raw_tls(&topo).unwrap();
    let (_, form) = post_xml(&mut s, AUTH_INIT).unwrap();
    let handle = form_handle(&form).unwrap();
    let (status, answer) = post_xml(&mut s, &auth_reply(&handle, "dave", "")).unwrap();
    assert_eq!(status, 200);
    assert!(answer.contains("Login failed"), "{answer}");
    assert!(!answer.contains("webvpn="), "no session cookie: {answer}");
    assert!(gw.sessions().unwrap().is_empty(), "{:?}", gw.sessions());
    assert_eq!(dave_binds(), binds_before, "{}", slapd.log());
    // The TLS handshakes happened (slapd logs each TLS connection).
    assert!(slapd.log().contains("TLS established"), "{}", slapd.log());
}

#[test]
fn ldap_starttls_template_fails_over_refuses_unmapped_and_says_when_down() {
    require_root();
    let topo = Topology::new().unwrap();
    let mut slapd = Slapd::start(&topo.server, SERVER).unwrap();
    // First a port nothing listens on, then StartTLS on 389.
    let gw = start_gateway(
        &topo,
        &format!(
            "servers = [\"ldap://{SERVER}:1389\", \"ldap://{SERVER}:389\"]\n\
             ca_file = \"{ca}\"\n\
             bind_dn = \"uid={{user}},ou=people,{BASE}\"\n\
             group_base = \"ou=groups,{BASE}\"\nunmapped = \"refuse\"\n",
            ca = slapd.ca_file().display()
        ),
    );
    let mut dave = Client::start(&topo, &gw, "dave", "dave-pw", &[]).unwrap();
    dave.wait_connected(Duration::from_secs(20)).unwrap();
    assert_eq!(policy_of(&gw, "dave"), "staff");
    assert!(
        gw.log()
            .contains(&format!("now asking ldap://{SERVER}:389 first")),
        "{}",
        gw.log()
    );
    drop(dave);

    // Only in a nested group, not followed here (nested_groups is off),
    // with unmapped = "refuse": told why, no session.
    let mut erin = Client::start(&topo, &gw, "erin", "erin-pw", &[]).unwrap();
    assert!(!erin.wait_exit(Duration::from_secs(20)).unwrap().success());
    assert!(
        erin.log()
            .contains("not in a group allowed to use this VPN"),
        "{}",
        erin.log()
    );
    assert!(policy_of(&gw, "erin").is_null());

    // The directory goes down: "unavailable", not "wrong password", and
    // an event naming each server.
    slapd.stop();
    let mut c = Client::start(&topo, &gw, "carol", "carol-pw", &[]).unwrap();
    assert!(!c.wait_exit(Duration::from_secs(20)).unwrap().success());
    assert!(
        c.log().contains("authentication service is unavailable"),
        "{}",
        c.log()
    );
    let down: Vec<_> = gw
        .events()
        .into_iter()
        .filter(|e| e["event"] == "authentication_unavailable")
        .collect();
    assert_eq!(down.len(), 1, "{down:?}");
    let servers = down[0]["servers"].as_str().unwrap();
    assert!(servers.contains(":1389: cannot connect"), "{servers}");
    assert!(servers.contains(":389: cannot connect"), "{servers}");
    assert!(failure_reasons(&gw, "carol").is_empty());
}

#[test]
fn ldap_password_then_a_radius_one_time_code_as_second_factor() {
    require_root();
    let topo = Topology::new().unwrap();
    let slapd = Slapd::start(&topo.server, SERVER).unwrap();
    let _radius = vpn_tests::radius::FreeRadius::start(&topo.server, SERVER, GW_INSIDE).unwrap();
    let rest = format!(
        "[[group_policy]]\nname = \"engineering\"\n\n\
         [[group]]\nname = \"contractors\"\nsecond_factor = \"radius\"\n\n\
         [ldap]\nservers = [\"ldaps://{SERVER}:636\"]\nca_file = \"{ca}\"\n\
         bind_dn = \"uid={{user}},ou=people,{BASE}\"\ngroup_base = \"ou=groups,{BASE}\"\n\n\
         [[ldap.group_map]]\ngroup = \"vpn-eng\"\npolicy = \"engineering\"\n\n\
         [radius]\ntimeout_ms = 1000\naccounting = false\n\n\
         [[radius.server]]\naddress = \"{SERVER}:1812\"\nsecret = \"{secret}\"\n",
        ca = slapd.ca_file().display(),
        secret = vpn_tests::radius::SECRET,
    );
    let gw = Gateway::start_with_method(&topo, "ldap", &rest, &[]).unwrap();

    // The directory's password, then the code, both typed on stdin.
    let answers = format!("carol-pw\n{}", vpn_tests::radius::CAROL_OTP);
    let mut c = Client::start(&topo, &gw, "carol", &answers, &[]).unwrap();
    c.wait_connected(Duration::from_secs(20)).unwrap();
    assert!(c.log().contains("Enter your one-time code"), "{}", c.log());
    // The policy is the directory's (group vpn-eng).
    assert_eq!(policy_of(&gw, "carol"), "engineering");
    drop(c);

    // The right password and a wrong code: no session.
    let mut c = Client::start(&topo, &gw, "carol", "carol-pw\n000000", &[]).unwrap();
    assert!(!c.wait_exit(Duration::from_secs(20)).unwrap().success());
    assert!(
        failure_reasons(&gw, "carol").contains(&"rejected by the authentication server".to_owned())
    );
    // A wrong password never reaches the second factor.
    let mut c = Client::start(&topo, &gw, "carol", "nope\n654321", &[]).unwrap();
    assert!(!c.wait_exit(Duration::from_secs(20)).unwrap().success());
    assert!(!c.log().contains("Enter your one-time code"), "{}", c.log());
    assert!(gw.sessions().unwrap().is_empty());
}
