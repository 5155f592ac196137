//! Client certificates with the real openconnect (`--certificate`,
//! `--sslkey`): a certificate-only group, a certificate-and-password
//! group, certificates from a CA the gateway does not trust, revoked ones,
//! and a CRL that changes on reload.

use std::time::Duration;

use vpn_tests::{certs::*, *};

const CAROL: TestUser = TestUser {
    name: "carol",
    password: "carol-pw",
    group_policy: None,
};
const DAVE: TestUser = TestUser {
    name: "dave",
    password: "dave-pw",
    group_policy: None,
};

struct Pki {
    _dir: TempDir,
    trusted: TestCa,
    carol: ClientCert,
    dave: ClientCert,
    erin: ClientCert,
    stranger: ClientCert,
    crl: std::path::PathBuf,
}

/// The trusted CA with certificates for carol, dave and erin (dave's
/// revoked), and one for carol from a CA the gateway does not trust.
fn pki() -> Pki {
    let dir = TempDir::new("pki").unwrap();
    let mut trusted = TestCa::new(dir.path(), "trusted-ca").unwrap();
    let mut other = TestCa::new(dir.path(), "other-ca").unwrap();
    let carol = trusted.issue("carol").unwrap();
    let dave = trusted.issue("dave").unwrap();
    let erin = trusted.issue("erin").unwrap();
    let stranger = other.issue("carol").unwrap();
    let crl = trusted.crl("crl.pem", &[&dave]).unwrap();
    Pki {
        _dir: dir,
        trusted,
        carol,
        dave,
        erin,
        stranger,
        crl,
    }
}

fn start_gateway(topo: &Topology, pki: &Pki) -> Gateway {
    let rest = format!(
        "[tls]\nclient_ca_file = \"{ca}\"\nclient_crl_file = \"{crl}\"\n\n\
         [[group]]\nname = \"staff\"\n\n\
         [[group]]\nname = \"certonly\"\nauth = \"certificate\"\n\n\
         [[group]]\nname = \"both\"\nauth = \"certificate+password\"\n",
        ca = pki.trusted.ca_file().display(),
        crl = pki.crl.display()
    );
    Gateway::start(
        topo,
        ConfigParts {
            rest: &rest,
            ..Default::default()
        },
        &[CAROL, DAVE],
    )
    .unwrap()
}

/// openconnect for `user`/`password` in `group` presenting `cert`.
fn connect(
    topo: &Topology,
    gw: &Gateway,
    group: &str,
    cert: Option<&ClientCert>,
    user: &str,
    password: &str,
) -> Client {
    let mut args = vec![format!("--authgroup={group}")];
    if let Some(c) = cert {
        args.extend(c.args());
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    Client::start(topo, gw, user, password, &args).unwrap()
}

fn fails(mut c: Client) -> String {
    let st = c
        .wait_exit(Duration::from_secs(20))
        .expect("openconnect gave up");
    assert!(!st.success(), "{}", c.log());
    c.log()
}

#[test]
fn certificate_only_group_takes_trusted_unrevoked_certificates() {
    require_root();
    let topo = Topology::new().unwrap();
    let pki = pki();
    let gw = start_gateway(&topo, &pki);

    // The trusted CA's certificate alone logs carol in: no password asked
    // (the password given on stdin is never read).
    let mut c = connect(&topo, &gw, "certonly", Some(&pki.carol), "carol", "unused");
    c.wait_connected(Duration::from_secs(20)).unwrap();
    assert!(topo.client.ping(SERVER, 1));
    let s = gw.sessions().unwrap();
    assert_eq!(s.len(), 1);
    assert_eq!(s[0]["user"], "carol");
    assert_eq!(s[0]["group"], "certonly");
    drop(c);

    // Another CA's certificate, and a revoked one: the handshake fails.
    let log = fails(connect(
        &topo,
        &gw,
        "certonly",
        Some(&pki.stranger),
        "carol",
        "x",
    ));
    assert!(
        log.to_lowercase().contains("ssl") || log.contains("TLS"),
        "{log}"
    );
    fails(connect(
        &topo,
        &gw,
        "certonly",
        Some(&pki.dave),
        "dave",
        "x",
    ));
    // No certificate: told the group needs one.
    let log = fails(connect(&topo, &gw, "certonly", None, "carol", "carol-pw"));
    assert!(log.contains("needs a client certificate"), "{log}");
    assert!(gw.sessions().unwrap().is_empty());

    // A password group still works without a certificate.
    let mut d = connect(&topo, &gw, "staff", None, "dave", "dave-pw");
    d.wait_connected(Duration::from_secs(20)).unwrap();
    drop(d);

    // A new CRL revoking carol too, applied by reload: her certificate no
    // longer gets in; a broken CRL file is rejected and the list stays.
    std::fs::write(&pki.crl, "not a CRL").unwrap();
    let out = gw.vpnctl(&["reload"]).unwrap_or_else(|e| e.to_string());
    assert!(out.contains("rejected"), "{out}");
    let mut e = connect(&topo, &gw, "certonly", Some(&pki.erin), "erin", "x");
    e.wait_connected(Duration::from_secs(20)).unwrap();
    drop(e);
    pki.trusted
        .crl("crl.pem", &[&pki.dave, &pki.carol])
        .unwrap();
    let out = gw.vpnctl(&["reload"]).unwrap();
    assert!(out.contains("reloaded"), "{out}");
    assert!(
        !out.contains("[tls]"),
        "a CRL change needs no restart: {out}"
    );
    fails(connect(
        &topo,
        &gw,
        "certonly",
        Some(&pki.carol),
        "carol",
        "x",
    ));
    let mut e = connect(&topo, &gw, "certonly", Some(&pki.erin), "erin", "x");
    e.wait_connected(Duration::from_secs(20)).unwrap();
}

#[test]
fn certificate_and_password_group_needs_both_for_the_same_user() {
    require_root();
    let topo = Topology::new().unwrap();
    let pki = pki();
    let gw = start_gateway(&topo, &pki);

    let mut c = connect(&topo, &gw, "both", Some(&pki.carol), "carol", "carol-pw");
    c.wait_connected(Duration::from_secs(20)).unwrap();
    assert_eq!(gw.sessions().unwrap()[0]["group"], "both");
    drop(c);

    // Carol's certificate with dave's name and password: refused.
    let log = fails(connect(
        &topo,
        &gw,
        "both",
        Some(&pki.carol),
        "dave",
        "dave-pw",
    ));
    assert!(log.contains("not for this user"), "{log}");
    // The right certificate with a wrong password: refused.
    let log = fails(connect(
        &topo,
        &gw,
        "both",
        Some(&pki.carol),
        "carol",
        "wrong",
    ));
    assert!(log.contains("invalid username or password"), "{log}");
    // A password without a certificate: refused.
    let log = fails(connect(&topo, &gw, "both", None, "carol", "carol-pw"));
    assert!(log.contains("needs a client certificate"), "{log}");
    assert!(gw.sessions().unwrap().is_empty());
    let reasons: Vec<String> = gw
        .events()
        .into_iter()
        .filter(|e| e["event"] == "authentication_failed")
        .map(|e| e["reason"].as_str().unwrap().to_owned())
        .collect();
    assert!(
        reasons.contains(&"the client certificate names another user".to_owned()),
        "{reasons:?}"
    );
    assert!(
        reasons.contains(&"no client certificate".to_owned()),
        "{reasons:?}"
    );
}
