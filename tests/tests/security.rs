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

/// An application-data record header (epoch 1, a sequence number far
/// ahead of any window, so every channel would try it) announcing `len`
/// bytes, followed by `body` bytes.
fn record(len: u16, body: usize) -> Vec<u8> {
    let mut r = vec![23, 0xfe, 0xfd, 0, 1, 0, 0, 0, 0, 0xff, 0xff];
    r.extend_from_slice(&len.to_be_bytes());
    r.resize(13 + body, 0x42);
    r
}

/// H1: records whose lengths do not fit, from an address no channel has,
/// while a DTLS client pings. A record larger than the workers' trial
/// buffer (a UDP datagram reassembled from IP fragments arrives whole, up
/// to 64 KiB) used to panic the packet worker; repeated, DTLS went down
/// for everyone. Each is dropped and counted; nothing panics; the client's
/// pings all get answers.
#[test]
fn oversized_and_lying_dtls_records_are_dropped_and_counted() {
    require_root();
    let topo = Topology::new().unwrap();
    let gw = Gateway::start(&topo, ConfigParts::default(), &[ALICE]).unwrap();
    let mut c = Client::start(
        &topo,
        &gw,
        ALICE.name,
        ALICE.password,
        &["--dtls-ciphers=PSK-NEGOTIATE"],
    )
    .unwrap();
    c.wait_connected(Duration::from_secs(20)).unwrap();
    c.wait_dtls(Duration::from_secs(10)).unwrap();
    let bad: Vec<Vec<u8>> = vec![
        // Larger than the largest legal record (2^14 + 2048), and than
        // the old 9216-byte trial buffer.
        record(20_000, 20_000),
        // Legal size, larger than the old trial buffer.
        record(12_000, 12_000),
        // Claims more than the datagram holds.
        record(1_000, 100),
        // One good-sized record, then one that lies about its length.
        [record(100, 100), record(60_000, 200)].concat(),
        // A header cut short.
        vec![23, 0xfe, 0xfd, 0, 1],
    ];
    // All but the legal-sized one (it is junk, dropped when its tag
    // fails) are malformed.
    let sent = (bad.len() as u64 - 1) * 20;
    let pinger = std::thread::spawn({
        let ns = topo.client.name.clone();
        move || {
            let out = std::process::Command::new("ip")
                .args([
                    "netns", "exec", &ns, "ping", "-c", "15", "-i", "0.2", "-W", "2",
                ])
                .arg(SERVER)
                .output()
                .unwrap();
            String::from_utf8_lossy(&out.stdout).into_owned()
        }
    });
    in_netns(&topo.client, move || {
        let s = std::net::UdpSocket::bind("198.18.1.2:40002").unwrap();
        for _ in 0..20 {
            for d in &bad {
                s.send_to(d, (GW_OUTSIDE, 443)).unwrap();
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    });
    let pings = pinger.join().unwrap();
    assert!(pings.contains(" 0% packet loss"), "{pings}\n{}", gw.log());
    assert!(!gw.log().contains("panicked"), "{}", gw.log());
    let stats = gw.stats().unwrap();
    let malformed = stats["dtls_rx"]["malformed"].as_u64().unwrap_or(0);
    assert!(
        malformed >= sent,
        "{sent} sent, {malformed} counted: {stats}"
    );
    assert_eq!(gw.sessions().unwrap()[0]["transport"], "dtls");
    assert!(gw.vpnctl(&["stats"]).unwrap().contains(" malformed"));
}
