//! The gateway as an attacker sees it: each test tries one hole of
//! `shared/design/security-audit.md` (named in its doc comment) against a
//! real gateway, and asserts what a user would observe: logins still
//! work, packets do not get through, the counters show the drops.

use std::time::Duration;

use vpn_tests::*;

/// C2: several wrong passwords on one login handle at once, over several
/// TLS connections. The handle goes away while the others still verify
/// their password (the failure limit is reached); before the fix the next
/// lookup panicked under the login table's lock, poisoning it, and every
/// later login failed until a restart.
#[test]
fn concurrent_wrong_passwords_on_one_login_leave_logins_working() {
    require_root();
    let topo = Topology::new().unwrap();
    let gw = Gateway::start(&topo, ConfigParts::default(), &[ALICE]).unwrap();
    let mut s = raw_tls(&topo).unwrap();
    let (status, form) = post_xml(&mut s, AUTH_INIT).unwrap();
    assert_eq!(status, 200, "{form}");
    let handle = form_handle(&form).expect("the form has a handle");
    let answers: Vec<String> = std::thread::scope(|sc| {
        let tries: Vec<_> = (0..6)
            .map(|_| {
                let (topo, handle) = (&topo, &handle);
                sc.spawn(move || {
                    let mut s = raw_tls(topo).unwrap();
                    post_xml(&mut s, &auth_reply(handle, "alice", "wrong"))
                        .map(|(code, text)| format!("{code} {text}"))
                        .unwrap_or_else(|e| format!("no answer: {e}"))
                })
            })
            .collect();
        tries.into_iter().map(|t| t.join().unwrap()).collect()
    });
    // Each attempt got an answer: the form again, 401 at the limit, or
    // "expired" for those whose handle was gone when they finished.
    for a in &answers {
        assert!(
            a.starts_with("200 ") || a.starts_with("401 "),
            "{a}\n{answers:#?}"
        );
    }
    assert!(
        answers.iter().any(|a| a.contains("expired")),
        "the attempts that finished after the limit were told their login expired: {answers:#?}"
    );
    let mut c = Client::start(&topo, &gw, ALICE.name, ALICE.password, &[]).unwrap();
    c.wait_connected(Duration::from_secs(20)).unwrap();
    assert!(topo.client.ping(SERVER, 1));
    assert!(!gw.log().contains("panicked"), "{}", gw.log());
}
