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
    let _c = Client::start_psk_dtls(&topo, &gw, &ALICE).unwrap();
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

/// H2: a client sends packets whose source is another user's VPN address
/// (IPv4, IPv6, and IPv4-mapped IPv6, which the BPF session map keys like
/// IPv4). BPF only checked that the source was some session's, then
/// applied that session's policy: user A could send as user B. Over DTLS
/// and over TLS, none may reach the internal host, each is counted for
/// the sender's session, and the sender's own packets still pass.
#[test]
fn a_client_cannot_send_as_another_user() {
    require_root();
    let topo = Topology::new().unwrap();
    let gw = Gateway::start(&topo, ConfigParts::default(), &[ALICE, BOB]).unwrap();
    let mut bob = Client::start_in(&topo.client2, &gw, BOB.name, BOB.password, &[]).unwrap();
    bob.wait_connected(Duration::from_secs(20)).unwrap();
    let sink = UdpCollector::start(&topo.server, 9999).unwrap();
    for (round, transport, args) in [
        (0u8, "dtls", &["--dtls-ciphers=PSK-NEGOTIATE"][..]),
        (1, "tls", &["--no-dtls"][..]),
    ] {
        let mut alice = Client::start(&topo, &gw, ALICE.name, ALICE.password, args).unwrap();
        let env = alice.wait_connected(Duration::from_secs(20)).unwrap();
        let sessions = gw.sessions().unwrap();
        let of = |user: &str| {
            sessions
                .iter()
                .find(|s| s["user"] == user && s["state"] == "connected")
                .unwrap_or_else(|| panic!("{user}: {sessions:?}"))
                .clone()
        };
        let (a, b) = (of("alice"), of("bob"));
        if transport == "dtls" {
            alice.wait_dtls(Duration::from_secs(10)).unwrap();
            assert!(
                wait_for(Duration::from_secs(5), || {
                    gw.sessions().unwrap().iter().find(|s| s["id"] == a["id"])?["transport"]
                        .eq("dtls")
                        .then_some(())
                })
                .is_some()
            );
        }
        let addr = |s: &serde_json::Value, k: &str| -> std::net::IpAddr {
            s[k].as_str().unwrap().parse().unwrap()
        };
        let (a4, a6, b4, b6) = (
            addr(&a, "vpn_address"),
            addr(&a, "vpn_address6"),
            addr(&b, "vpn_address"),
            addr(&b, "vpn_address6"),
        );
        assert!(
            env.contains_key("INTERNAL_IP6_ADDRESS") || env.contains_key("INTERNAL_IP6_NETMASK")
        );
        let mapped: std::net::IpAddr = match b4 {
            std::net::IpAddr::V4(v4) => v4.to_ipv6_mapped().into(),
            _ => unreachable!(),
        };
        let (srv4, srv6): (std::net::IpAddr, std::net::IpAddr) =
            (SERVER.parse().unwrap(), SERVER6.parse().unwrap());
        let tag = |what: &str| format!("{what}-{round}").into_bytes();
        for _ in 0..5 {
            send_raw_udp(&topo.client, a4, srv4, 9999, &tag("own4")).unwrap();
            send_raw_udp(&topo.client, a6, srv6, 9999, &tag("own6")).unwrap();
            send_raw_udp(&topo.client, b4, srv4, 9999, &tag("spoof4")).unwrap();
            send_raw_udp(&topo.client, b6, srv6, 9999, &tag("spoof6")).unwrap();
            send_raw_udp(&topo.client, mapped, srv6, 9999, &tag("mapped")).unwrap();
            std::thread::sleep(Duration::from_millis(50));
        }
        assert!(
            wait_for(Duration::from_secs(3), || (sink.count(&tag("own4")) == 5
                && sink.count(&tag("own6")) == 5)
                .then_some(()))
            .is_some(),
            "{transport}: the sender's own packets pass ({} and {})",
            sink.count(&tag("own4")),
            sink.count(&tag("own6"))
        );
        std::thread::sleep(Duration::from_millis(300));
        for what in ["spoof4", "spoof6", "mapped"] {
            assert_eq!(
                sink.count(&tag(what)),
                0,
                "{transport}: {what} reached the server"
            );
        }
        let spoofed = gw
            .sessions()
            .unwrap()
            .iter()
            .find(|s| s["id"] == a["id"])
            .map(|s| s["spoofed_dropped"].as_u64().unwrap_or(0))
            .unwrap();
        assert_eq!(spoofed, 15, "{transport}: counted for alice's session");
        assert_eq!(
            gw.sessions()
                .unwrap()
                .iter()
                .find(|s| s["user"] == "bob")
                .unwrap()["spoofed_dropped"],
            0
        );
        drop(alice);
    }
    // Both rounds in the daemon's total, live and ended sessions alike.
    let stats = gw.stats().unwrap();
    assert!(
        stats["daemon_drops"]
            .as_array()
            .and_then(|a| a.iter().find(|d| d[0] == "spoofed-source"))
            .and_then(|d| d[1].as_u64())
            >= Some(30),
        "{stats}"
    );
    assert!(gw.vpnctl(&["stats"]).unwrap().contains("spoofed-source"));
}

/// Whether an answer is a 503 or a lockout, the two ways a flood is told no.
fn refused(answer: &str) -> bool {
    answer.starts_with("503 ") || answer.contains("try again in")
}

/// H3: strangers flood logins, one address with inits on many keep-alive
/// connections, another with wrong passwords for the user, while a real
/// user logs in from a third. Before the limits, ~17 inits a second filled the table of
/// logins in progress for everyone, connections were unbounded, guessing
/// was unlimited (a new login handle reset the count) and every guess ran
/// argon2 on its own thread. Now the flooding address runs into its own
/// limits and a lockout, and the user is connected within seconds.
#[test]
fn a_login_flood_from_one_address_does_not_keep_others_out() {
    require_root();
    let topo = Topology::new().unwrap();
    let gw = Gateway::start(&topo, ConfigParts::default(), &[ALICE]).unwrap();
    let guesser = CLIENT2_OUTSIDE;
    let flooder = "198.18.3.3";
    topo.client2
        .ip(&["addr", "add", &format!("{flooder}/24"), "dev", "eth0"])
        .unwrap();
    let stop = std::sync::atomic::AtomicBool::new(false);
    // Refusals the guessers and the init flooders got.
    let refusals = [
        std::sync::atomic::AtomicU64::new(0),
        std::sync::atomic::AtomicU64::new(0),
    ];
    let legit = std::thread::scope(|sc| {
        let flood = |src: &'static str, wrong_passwords: bool| {
            let (topo, stop) = (&topo, &stop);
            let refusals = &refusals[usize::from(!wrong_passwords)];
            move || {
                // Bounded: 15 s or 20,000 requests per thread.
                let end = std::time::Instant::now() + Duration::from_secs(15);
                let mut sent = 0;
                while !stop.load(std::sync::atomic::Ordering::Relaxed)
                    && std::time::Instant::now() < end
                    && sent < 20_000
                {
                    let Ok(mut s) = raw_tls_from(&topo.client2, Some(src)) else {
                        std::thread::sleep(Duration::from_millis(20));
                        continue;
                    };
                    // Keep-alive: as many requests as the gateway takes;
                    // a guesser answers each form it gets with a guess.
                    let mut handle: Option<String> = None;
                    while sent < 20_000 && !stop.load(std::sync::atomic::Ordering::Relaxed) {
                        sent += 1;
                        let body = match &handle {
                            Some(h) if wrong_passwords => auth_reply(h, "alice", "guess"),
                            _ => AUTH_INIT.to_owned(),
                        };
                        let Ok((code, text)) = post_xml(&mut s, &body) else {
                            break;
                        };
                        if refused(&format!("{code} {text}")) {
                            refusals.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                            break;
                        }
                        handle = form_handle(&text);
                    }
                }
            }
        };
        for _ in 0..2 {
            sc.spawn(flood(guesser, true));
        }
        for _ in 0..4 {
            sc.spawn(flood(flooder, false));
        }
        // The flood reaches a limit (before the fix: the shared table of
        // logins in progress) before the user tries.
        let hit = |i: usize| refusals[i].load(std::sync::atomic::Ordering::Relaxed) > 0;
        let first = wait_for(Duration::from_secs(15), || (hit(0) || hit(1)).then_some(()));
        let t0 = std::time::Instant::now();
        let mut c = Client::start(&topo, &gw, ALICE.name, ALICE.password, &[]).unwrap();
        let connected = c.wait_connected(Duration::from_secs(30));
        let took = t0.elapsed();
        // The flood goes on until both kinds hit their limits (bounded).
        let both = wait_for(Duration::from_secs(15), || (hit(0) && hit(1)).then_some(()));
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        assert!(
            first.is_some() && both.is_some(),
            "the flood never hit a limit"
        );
        connected.unwrap();
        (c, took)
    });
    let (_c, took) = legit;
    eprintln!("alice connected {took:?} after the flood hit its limits");
    assert!(took < Duration::from_secs(15), "{took:?}");
    assert!(topo.client.ping(SERVER, 1));
    let a = &gw.stats().unwrap()["admission"];
    assert!(
        a["logins_refused_source_busy"].as_u64() > Some(0)
            || a["connections_refused_source"].as_u64() > Some(0),
        "{a}"
    );
    assert!(a["logins_refused_source_locked"].as_u64() > Some(0), "{a}");
    assert_eq!(a["sources_locked"], 1, "{a}");
    assert!(
        gw.events().iter().any(|e| e["event"] == "login_lockout"
            && e["scope"] == "source"
            && e["target"] == guesser),
        "{:?}",
        gw.events()
    );
    let text = gw.vpnctl(&["stats"]).unwrap();
    assert!(text.contains("login phase: "), "{text}");
}

/// H3: a stranger guessing a user's password from several addresses (each
/// under its own limit) locks the user out, but only from addresses the
/// user never logged in from: the user's own device still gets in.
#[test]
fn a_locked_out_user_still_logs_in_from_a_familiar_address() {
    require_root();
    let topo = Topology::new().unwrap();
    let gw = Gateway::start(
        &topo,
        ConfigParts {
            rest: "[limits]\nlockout_source_failures = 3\nlockout_user_failures = 6\n",
            ..Default::default()
        },
        &[ALICE],
    )
    .unwrap();
    // Alice's device logs in once: its address becomes familiar.
    authenticate(&topo, &gw, ALICE.name, ALICE.password).unwrap();
    let strangers = ["198.18.3.3", "198.18.3.4", "198.18.3.5"];
    for a in strangers.iter().chain(&["198.18.3.6"]) {
        topo.client2
            .ip(&["addr", "add", &format!("{a}/24"), "dev", "eth0"])
            .unwrap();
    }
    for src in strangers {
        for _ in 0..2 {
            let mut s = raw_tls_from(&topo.client2, Some(src)).unwrap();
            let (_, form) = post_xml(&mut s, AUTH_INIT).unwrap();
            let h = form_handle(&form).unwrap();
            let (code, text) = post_xml(&mut s, &auth_reply(&h, "alice", "guess")).unwrap();
            assert_eq!(code, 200, "{text}");
        }
    }
    assert!(
        gw.events().iter().any(|e| e["event"] == "login_lockout"
            && e["scope"] == "user"
            && e["target"] == "alice"),
        "{:?}",
        gw.events()
    );
    // From an address she never used, even the right password is refused,
    // with a message that says why.
    let mut s = raw_tls_from(&topo.client2, Some("198.18.3.6")).unwrap();
    let (_, form) = post_xml(&mut s, AUTH_INIT).unwrap();
    let h = form_handle(&form).unwrap();
    let (_, text) = post_xml(&mut s, &auth_reply(&h, ALICE.name, ALICE.password)).unwrap();
    assert!(text.contains("this account is locked"), "{text}");
    // Her own device connects.
    let mut c = Client::start(&topo, &gw, ALICE.name, ALICE.password, &[]).unwrap();
    c.wait_connected(Duration::from_secs(20)).unwrap();
    let a = &gw.stats().unwrap()["admission"];
    assert_eq!(a["users_locked"], 1, "{a}");
    assert_eq!(a["logins_refused_user_locked"], 1, "{a}");
}

/// The App-ID openconnect was given (it logs the CONNECT answer with -v).
fn app_id(c: &Client) -> [u8; 32] {
    let log = c.log();
    let hex = log
        .lines()
        .find_map(|l| l.strip_prefix("X-DTLS-App-ID: "))
        .unwrap_or_else(|| panic!("no App-ID in the client's log:\n{log}"));
    let mut id = [0u8; 32];
    for (i, b) in id.iter_mut().enumerate() {
        *b = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).unwrap();
    }
    id
}

/// M2: DTLS ClientHellos with a session's App-ID (sent in clear by the
/// client, so anyone on its path has it). One from the client's own
/// address and port used to replace its established channel (DTLS dead
/// until the client gave up on it); a flood from many ports held a
/// handshake each, without bound. The channel stays, the handshakes in
/// progress stay within `dtls.max_handshakes_per_source`, the rest are
/// refused and counted.
#[test]
fn dtls_hellos_cannot_tear_down_a_channel_or_pile_up_handshakes() {
    require_root();
    let topo = Topology::new().unwrap();
    let gw = Gateway::start(
        &topo,
        ConfigParts {
            rest: "[dtls]\nmax_handshakes_per_source = 4\n",
            ..Default::default()
        },
        &[ALICE],
    )
    .unwrap();
    let c = Client::start_psk_dtls(&topo, &gw, &ALICE).unwrap();
    let peer = gw.dtls_peer().unwrap();
    let sport: u16 = peer.rsplit(':').next().unwrap().parse().unwrap();
    let hello = dtls_client_hello(&app_id(&c));
    let (client_ip, gw_ip) = (CLIENT_OUTSIDE.parse().unwrap(), GW_OUTSIDE.parse().unwrap());
    // From the client's own address and port.
    send_raw_udp_ports(&topo.client, (client_ip, sport), (gw_ip, 443), &hello).unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let out = sh(topo
        .client
        .cmd("ping")
        .args(["-c", "3", "-i", "0.2", "-W", "1", SERVER]))
    .map(|o| String::from_utf8_lossy(&o.stdout).into_owned());
    assert!(
        out.as_ref().is_ok_and(|o| o.contains(" 0% packet loss")),
        "{out:?}\n{}",
        gw.log()
    );
    let s = &gw.sessions().unwrap()[0];
    assert_eq!(s["transport"], "dtls", "{s}");
    assert_eq!(s["dtls_peer"].as_str(), Some(peer.as_str()));
    assert_eq!(c.log().matches("Established DTLS connection").count(), 1);
    // From 40 ports of the same address.
    in_netns(&topo.client, {
        let hello = hello.clone();
        move || {
            let socks: Vec<_> = (0..40)
                .map(|_| std::net::UdpSocket::bind("198.18.1.2:0").unwrap())
                .collect();
            for s in &socks {
                s.send_to(&hello, (GW_OUTSIDE, 443)).unwrap();
            }
        }
    });
    std::thread::sleep(Duration::from_millis(300));
    let hs = &gw.stats().unwrap()["dtls_handshakes"];
    assert!(hs["in_progress"].as_u64() <= Some(4), "{hs}");
    assert!(hs["refused_per_source"].as_u64() >= Some(36), "{hs}");
    assert!(topo.client.ping(SERVER, 2));
    assert_eq!(gw.sessions().unwrap()[0]["transport"], "dtls");
}

/// M1: a flood of junk application-data records from another address
/// (the right epoch, a sequence number ahead of every window) while a
/// client's NAT mapping changes. The trials for unknown addresses came
/// from one global budget (2000 a second), which the junk used up, so the
/// client's new address was never tried and its DTLS stayed dead. Now
/// only channels seen at the junk's IP are candidates (none), and budgets
/// are per source.
#[test]
fn junk_from_one_address_does_not_stop_another_clients_rebinding() {
    require_root();
    let topo = Topology::new().unwrap();
    let gw = Gateway::start(&topo, ConfigParts::default(), &[ALICE]).unwrap();
    let _c = Client::start_psk_dtls(&topo, &gw, &ALICE).unwrap();
    let peer = gw.dtls_peer().unwrap();
    let port: u16 = peer.rsplit(':').next().unwrap().parse().unwrap();
    let stop = std::sync::atomic::AtomicBool::new(false);
    let (out, sent) = std::thread::scope(|sc| {
        let junk = sc.spawn(|| {
            let stop = &stop;
            let s = in_netns(&topo.client2, || std::net::UdpSocket::bind("198.18.3.2:0")).unwrap();
            let mut r = vec![23, 0xfe, 0xfd, 0, 1, 0, 0, 0, 0, 0xff, 0xff, 0, 100];
            r.resize(13 + 100, 0x42);
            let end = std::time::Instant::now() + Duration::from_secs(8);
            let mut sent = 0u32;
            // Bounded: 8 s or 200,000 datagrams.
            while !stop.load(std::sync::atomic::Ordering::Relaxed)
                && std::time::Instant::now() < end
                && sent < 200_000
            {
                let _ = s.send_to(&r, (GW_OUTSIDE, 443));
                sent += 1;
                if sent.is_multiple_of(200) {
                    std::thread::sleep(Duration::from_millis(5));
                }
            }
            sent
        });
        std::thread::sleep(Duration::from_millis(500));
        // The client's NAT changes its port (a stateless NAT in its
        // namespace).
        let nft = |rule: &str| sh(topo.client.cmd("nft").arg(rule)).unwrap();
        nft("add table inet vgnat");
        nft("add chain inet vgnat out { type filter hook output priority -300 ; }");
        nft("add chain inet vgnat pre { type filter hook prerouting priority -300 ; }");
        nft(&format!(
            "add rule inet vgnat out udp dport 443 udp sport {port} udp sport set 40000"
        ));
        nft(&format!(
            "add rule inet vgnat pre udp sport 443 udp dport 40000 udp dport set {port}"
        ));
        let out = sh(topo
            .client
            .cmd("ping")
            .args(["-c", "5", "-i", "0.2", "-W", "1", SERVER]))
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned());
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        (out, junk.join().unwrap())
    });
    eprintln!("junk datagrams sent: {sent}");
    assert!(sent > 10_000, "{sent}");
    assert!(
        out.as_ref().is_ok_and(|o| o.contains(" 0% packet loss")),
        "{out:?}\n{}",
        gw.log()
    );
    assert_eq!(
        gw.sessions().unwrap()[0]["dtls_peer"].as_str(),
        Some("198.18.1.2:40000")
    );
}

/// The reason the session of `user` ended, once it has.
fn ended(gw: &Gateway, user: &str) -> Option<String> {
    gw.events().into_iter().find_map(|e| {
        (e["event"] == "client_disconnected" && e["user"] == user)
            .then(|| e["reason"].as_str().unwrap().to_owned())
    })
}

/// M5: a user removed from the database, or whose password changed, kept
/// their tunnel and their cookie until the session timed out (8 h by
/// default). Now their sessions end within seconds, the event says why,
/// and the client is told (openconnect exits).
#[test]
fn removing_a_user_or_changing_a_password_ends_their_sessions() {
    require_root();
    let topo = Topology::new().unwrap();
    let gw = Gateway::start(&topo, ConfigParts::default(), &[ALICE, BOB]).unwrap();
    let mut alice = Client::start(&topo, &gw, ALICE.name, ALICE.password, &[]).unwrap();
    alice.wait_connected(Duration::from_secs(20)).unwrap();
    let mut bob = Client::start_in(&topo.client2, &gw, BOB.name, BOB.password, &[]).unwrap();
    bob.wait_connected(Duration::from_secs(20)).unwrap();

    assert!(
        gw.vpnctl_user(&["passwd", "alice"], "a-new-password")
            .status
            .success()
    );
    let why = wait_for(Duration::from_secs(5), || ended(&gw, "alice"));
    assert_eq!(why.as_deref(), Some("password changed"), "{}", gw.log());
    assert!(
        alice.wait_exit(Duration::from_secs(10)).is_some(),
        "openconnect was told: {}",
        alice.log()
    );
    assert!(topo.client2.ping(SERVER, 1), "bob is untouched");

    assert!(gw.vpnctl_user(&["del", "bob"], "").status.success());
    let why = wait_for(Duration::from_secs(5), || ended(&gw, "bob"));
    assert_eq!(why.as_deref(), Some("user removed from the user database"));
    assert!(bob.wait_exit(Duration::from_secs(10)).is_some());
    assert!(gw.sessions().unwrap().is_empty());
}

/// M6: one credential looping logins filled `max_sessions` and locked
/// everybody out. Now a user has at most `session.max_per_user`: a new
/// login replaces the oldest session without a tunnel, and is refused,
/// with a message, when all have one.
#[test]
fn a_user_holds_at_most_max_per_user_sessions() {
    require_root();
    let topo = Topology::new().unwrap();
    let gw = Gateway::start(
        &topo,
        ConfigParts {
            rest: "[session]\nmax_per_user = 2\n",
            ..Default::default()
        },
        &[ALICE],
    )
    .unwrap();
    for _ in 0..3 {
        authenticate(&topo, &gw, ALICE.name, ALICE.password).unwrap();
    }
    assert_eq!(gw.sessions().unwrap().len(), 2);
    assert_eq!(
        ended(&gw, "alice").as_deref(),
        Some("replaced by a newer login of the same user")
    );
    // Two tunnels: the third login is refused, and says why.
    let mut a = Client::start(&topo, &gw, ALICE.name, ALICE.password, &[]).unwrap();
    a.wait_connected(Duration::from_secs(20)).unwrap();
    let mut b = Client::start_in(&topo.client2, &gw, ALICE.name, ALICE.password, &[]).unwrap();
    b.wait_connected(Duration::from_secs(20)).unwrap();
    let refused = authenticate(&topo, &gw, ALICE.name, ALICE.password).unwrap_err();
    assert!(
        refused.to_string().contains("you already have 2 sessions"),
        "{refused}"
    );
    assert_eq!(gw.sessions().unwrap().len(), 2);
    assert!(topo.client.ping(SERVER, 1) && topo.client2.ping(SERVER, 1));
}

/// M8: a TLS client that stops reading while traffic for it keeps coming.
/// The tunnel task waited in its flush forever: DPD, an admin disconnect
/// and session expiry could no longer reach it, and the connection stayed.
/// Now a write that cannot finish within 3 DPD intervals ends the tunnel.
#[test]
fn a_tls_client_that_stops_reading_is_dropped() {
    require_root();
    let topo = Topology::new().unwrap();
    let gw = Gateway::start(
        &topo,
        ConfigParts {
            rest: "[session]\ndpd_secs = 2\n",
            ..Default::default()
        },
        &[ALICE],
    )
    .unwrap();
    let cookie = authenticate(&topo, &gw, ALICE.name, ALICE.password).unwrap();
    let vpn_address = gw.sessions().unwrap()[0]["vpn_address"]
        .as_str()
        .unwrap()
        .to_owned();
    // A client with a tiny receive window that reads the CONNECT answer
    // and nothing after.
    let tcp = in_netns(&topo.client, || {
        let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)?;
        s.set_recv_buffer_size(4096)?;
        let gw: std::net::SocketAddr =
            (GW_OUTSIDE.parse::<std::net::IpAddr>().unwrap(), 443).into();
        s.connect(&gw.into())?;
        Ok::<std::net::TcpStream, std::io::Error>(s.into())
    })
    .unwrap();
    let mut s = tls_over(tcp).unwrap();
    let head = raw_connect(&mut s, webvpn_cookie(&cookie)).unwrap();
    assert!(head.starts_with(b"HTTP/1.1 200 "));
    // Traffic for the client from the LAN, more than every buffer holds
    // (bounded: 60,000 datagrams or 10 s).
    let flood = std::thread::spawn({
        let (ns, to) = (topo.server.name.clone(), vpn_address.clone());
        move || {
            let path = format!("/run/netns/{ns}");
            std::thread::spawn(move || {
                use std::os::fd::AsRawFd;
                let f = std::fs::File::open(&path).unwrap();
                // SAFETY: setns on this thread only.
                assert_eq!(unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) }, 0);
                let u = std::net::UdpSocket::bind("0.0.0.0:0").unwrap();
                let end = std::time::Instant::now() + Duration::from_secs(10);
                let buf = [0x55u8; 1200];
                for _ in 0..60_000 {
                    if std::time::Instant::now() > end {
                        break;
                    }
                    let _ = u.send_to(&buf, (to.as_str(), 9));
                }
            })
            .join()
            .unwrap();
        }
    });
    let t0 = std::time::Instant::now();
    let down = wait_for(Duration::from_secs(25), || {
        gw.events()
            .into_iter()
            .find(|e| e["event"] == "tunnel_down" && e["user"] == "alice")
    });
    flood.join().unwrap();
    let down = down.unwrap_or_else(|| panic!("the tunnel never ended\n{}", gw.log()));
    eprintln!("tunnel ended after {:?}: {}", t0.elapsed(), down["reason"]);
    assert!(
        down["reason"].as_str().unwrap().contains("stopped reading"),
        "{down}"
    );
    drop(s);
}

/// Runs a copy of vpnctl (in a directory anyone may enter) as `uid`/`gid`
/// without supplementary groups.
fn vpnctl_as(gw: &Gateway, uid: u32, gid: u32, args: &[&str]) -> std::process::Output {
    let copy = gw.dir.path().join("vpnctl");
    if !copy.exists() {
        std::fs::copy(bin_dir().join("vpnctl"), &copy).unwrap();
    }
    std::process::Command::new("setpriv")
        .args([
            &format!("--reuid={uid}"),
            &format!("--regid={gid}"),
            "--clear-groups",
        ])
        .arg(&copy)
        .arg("--socket")
        .arg(&gw.socket)
        .args(args)
        .output()
        .unwrap()
}

/// The control socket (audit L4): created with its final mode (0660 and
/// the control group's here, never the umask's for a moment), each
/// client's credentials checked (a socket someone made world-writable
/// still answers only root and the group), and a request line bounded.
#[test]
fn the_control_socket_answers_only_root_and_its_group() {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    require_root();
    let topo = Topology::new().unwrap();
    let gw = Gateway::start(
        &topo,
        ConfigParts {
            server: "control_group = \"nogroup\"",
            ..Default::default()
        },
        &[ALICE],
    )
    .unwrap();
    let meta = std::fs::metadata(&gw.socket).unwrap();
    assert_eq!(meta.mode() & 0o777, 0o660);
    assert_eq!(meta.gid(), 65534);
    // nobody, in group nogroup: answered.
    let ok = vpnctl_as(&gw, 65534, 65534, &["stats"]);
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    assert!(String::from_utf8_lossy(&ok.stdout).contains("sessions: 0 of 10"));
    // daemon (uid 1), not a member: the file mode keeps it out...
    assert!(!vpnctl_as(&gw, 1, 1, &["stats"]).status.success());
    // ...and with the mode loosened, the credentials check does.
    std::fs::set_permissions(&gw.socket, std::fs::Permissions::from_mode(0o666)).unwrap();
    let refused = vpnctl_as(&gw, 1, 1, &["stats"]);
    assert!(!refused.status.success());
    let err = String::from_utf8_lossy(&refused.stderr);
    assert!(err.contains("permission denied: uid 1 "), "{err}");
    // A request line longer than 64 KiB gets an error; vpnd carries on.
    {
        use std::io::{BufRead, Write};
        let mut s = std::os::unix::net::UnixStream::connect(&gw.socket).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let _ = s.write_all(&vec![b'x'; 100 * 1024]);
        let mut line = String::new();
        std::io::BufReader::new(&s).read_line(&mut line).unwrap();
        assert!(line.contains("request longer than 65536 bytes"), "{line}");
    }
    assert!(gw.vpnctl(&["stats"]).unwrap().contains("sessions: 0 of 10"));
}

/// Least privilege once serving (issue 21): every thread of vpnd (tokio's
/// workers, its blocking pool, the packet workers), which parses all
/// client input, holds no capability in any set and no descriptor of a
/// BPF map, program or link; only the broker it started holds
/// CAP_NET_ADMIN and CAP_BPF (a root process keeps all 41 otherwise, and
/// capabilities belong to threads, so dropping them in one is not
/// enough). Logins, the data path and an admin disconnect still work:
/// their map writes go through the broker.
#[test]
fn vpnd_serves_with_no_capabilities_and_only_its_broker_holds_net_admin_and_bpf() {
    use vpn_daemon::privileges::{CAP_BPF, CAP_NET_ADMIN, CapSet, ThreadCaps};
    require_root();
    let topo = Topology::new().unwrap();
    let gw = Gateway::start(&topo, ConfigParts::default(), &[ALICE]).unwrap();
    let pid = gw.pid().unwrap();
    // A session made after the drop: its map entries are written by the
    // broker.
    let mut c = Client::start(&topo, &gw, ALICE.name, ALICE.password, &[]).unwrap();
    c.wait_connected(Duration::from_secs(20)).unwrap();
    assert!(topo.client.ping(SERVER, 2));

    let broker = broker_of(pid);
    let cmdline = std::fs::read_to_string(format!("/proc/{broker}/cmdline")).unwrap();
    assert!(cmdline.contains("--broker"), "{cmdline:?}");
    for (who, kept) in [
        (pid, CapSet::EMPTY),
        (broker, CapSet::of(&[CAP_NET_ADMIN, CAP_BPF])),
    ] {
        let tasks: Vec<_> = std::fs::read_dir(format!("/proc/{who}/task"))
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        if who == pid {
            assert!(tasks.len() >= 4, "tokio and packet workers: {tasks:?}");
        }
        let user = if who == pid { "65534" } else { "0" };
        for t in &tasks {
            let status = std::fs::read_to_string(t.join("status")).unwrap();
            let name = std::fs::read_to_string(t.join("comm")).unwrap();
            let caps = ThreadCaps::parse(&status).unwrap();
            assert!(
                caps.within(kept),
                "thread {} ({}) holds {caps:?}",
                t.display(),
                name.trim()
            );
            assert_eq!(caps.effective, kept, "{}", name.trim());
            // And the system calls it never makes are filtered in every one.
            let field = |f: &str| {
                status
                    .lines()
                    .find_map(|l| l.strip_prefix(f))
                    .map(str::trim)
                    .unwrap_or_default()
                    .to_owned()
            };
            assert_eq!(field("Seccomp:"), "2", "{}", name.trim());
            assert_eq!(field("NoNewPrivs:"), "1", "{}", name.trim());
            // vpnd serves as nobody in every thread; the broker stays root.
            for ids in ["Uid:", "Gid:"] {
                let f = field(ids);
                assert!(
                    f.split_whitespace().all(|i| i == user),
                    "{} {ids} {f}",
                    name.trim()
                );
            }
        }
    }
    // The maps, programs and links are the broker's alone.
    let bpf_fds = |p: u32| {
        std::fs::read_dir(format!("/proc/{p}/fd"))
            .unwrap()
            .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
            .filter(|l| l.to_string_lossy().contains("bpf"))
            .count()
    };
    assert_eq!(bpf_fds(pid), 0, "vpnd holds a BPF object");
    assert!(bpf_fds(broker) >= 10, "the broker's maps and programs");
    let log = gw.log();
    assert!(
        log.contains("seccomp: 45 system calls a serving vpnd never makes now fail"),
        "{log}"
    );
    assert!(
        log.contains("serving as uid 65534 gid 65534; capabilities: none kept"),
        "{log}"
    );
    assert!(
        log.contains("broker: capabilities: kept cap_net_admin,cap_bpf"),
        "{log}"
    );

    // Ending a session removes its map entries: asked of the broker.
    let out = gw.vpnctl(&["disconnect", "alice"]).unwrap();
    assert!(out.contains("disconnected 1 session"), "{out}");
    assert!(c.wait_exit(Duration::from_secs(10)).is_some());
    assert!(gw.sessions().unwrap().is_empty());
    let mut again = Client::start(&topo, &gw, ALICE.name, ALICE.password, &[]).unwrap();
    again.wait_connected(Duration::from_secs(20)).unwrap();
    assert!(topo.client.ping(SERVER, 2));
}

/// The broker vpnd `pid` started: its child running `--broker`.
fn broker_of(pid: u32) -> u32 {
    let children = std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children")).unwrap();
    children
        .split_whitespace()
        .filter_map(|c| c.parse().ok())
        .find(|c: &u32| {
            std::fs::read_to_string(format!("/proc/{c}/cmdline"))
                .is_ok_and(|l| l.contains("--broker"))
        })
        .unwrap_or_else(|| panic!("no broker among vpnd's children {children:?}"))
}

/// Whether `needle` is anywhere in the readable memory of process `pid`
/// (its mappings, read through /proc/PID/mem).
fn in_memory(pid: u32, needle: &[u8]) -> bool {
    use std::os::unix::fs::FileExt as _;
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).unwrap();
    let mem = std::fs::File::open(format!("/proc/{pid}/mem")).unwrap();
    let mut buf = vec![0u8; 1 << 20];
    for line in maps.lines() {
        let mut f = line.split_whitespace();
        let (Some(range), Some(perms)) = (f.next(), f.next()) else {
            continue;
        };
        if !perms.starts_with('r') || line.ends_with("[vvar]") || line.ends_with("[vsyscall]") {
            continue;
        }
        let (a, b) = range.split_once('-').unwrap();
        let (a, b) = (
            u64::from_str_radix(a, 16).unwrap(),
            u64::from_str_radix(b, 16).unwrap(),
        );
        // Overlapping chunks, so a needle across a boundary is found.
        let mut at = a;
        while at < b {
            let n = ((b - at) as usize).min(buf.len());
            let Ok(got) = mem.read_at(&mut buf[..n], at) else {
                break;
            };
            if got == 0 {
                break;
            }
            if buf[..got].windows(needle.len()).any(|w| w == needle) {
                return true;
            }
            if at + got as u64 >= b {
                break;
            }
            at += (got - needle.len().min(got)) as u64 + 1;
        }
    }
    false
}

/// The processes whose parent is `pid`.
fn children(pid: u32) -> Vec<u32> {
    std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|p| {
            std::fs::read_to_string(format!("/proc/{p}/stat")).is_ok_and(|s| {
                s.rsplit_once(") ")
                    .and_then(|(_, rest)| rest.split_whitespace().nth(1)?.parse::<u32>().ok())
                    == Some(pid)
            })
        })
        .collect()
}

fn status_field(pid: u32, name: &str) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{name}:")))
        .map(|v| v.split_whitespace().collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

/// Defence in depth (issue 21): vpnd, which parses everything clients
/// send, never holds the TLS private key; a locked-down signer process
/// does (nobody, no capabilities, no new privileges, seccomp), and signs
/// each handshake for it. Killed, it is started again for the next one.
#[test]
fn the_private_key_is_held_only_by_the_locked_down_key_signer() {
    require_root();
    let topo = Topology::new().unwrap();
    let gw = Gateway::start(&topo, ConfigParts::default(), &[ALICE]).unwrap();
    let pid = gw.pid().unwrap();
    let mut c = Client::start(&topo, &gw, ALICE.name, ALICE.password, &[]).unwrap();
    c.wait_connected(Duration::from_secs(20)).unwrap();

    // The key's private scalar (P-256, in its SEC1 structure: version 1,
    // then a 32-byte octet string).
    let pem = std::fs::read(gw.state_dir.join("server-key.pem")).unwrap();
    let der = rustls_pemfile::private_key(&mut &pem[..]).unwrap().unwrap();
    let der = der.secret_der().to_vec();
    let at = der
        .windows(5)
        .position(|w| w == [0x02, 0x01, 0x01, 0x04, 0x20])
        .expect("an EC private key");
    let scalar = der[at + 5..at + 37].to_vec();
    // The search finds it where it is (this process just read it).
    assert!(in_memory(std::process::id(), &scalar), "the search works");
    assert!(!in_memory(pid, &scalar), "vpnd holds the private key");
    let pem_line = pem
        .split(|b| *b == b'\n')
        .nth(2)
        .expect("a PEM body line")
        .to_vec();
    assert!(!in_memory(pid, &pem_line), "vpnd holds the key's PEM");
    // Nor can it read the file: it serves as nobody, and nobody may not.
    assert_eq!(status_field(pid, "Uid"), "65534 65534 65534 65534");
    assert_eq!(status_field(pid, "Gid"), "65534 65534 65534 65534");
    let key = gw.state_dir.join("server-key.pem");
    let as_nobody = |path: &std::path::Path| {
        std::process::Command::new("setpriv")
            .args(["--reuid=65534", "--regid=65534", "--clear-groups", "cat"])
            .arg(path)
            .output()
            .unwrap()
    };
    let read = as_nobody(&key);
    assert!(!read.status.success(), "nobody read the key");
    assert!(
        String::from_utf8_lossy(&read.stderr).contains("Permission denied"),
        "{read:?}"
    );
    // (The control: nobody reads what is meant for everyone.)
    assert!(
        as_nobody(std::path::Path::new("/etc/hostname"))
            .status
            .success()
    );

    let signer = |pid: u32| -> u32 {
        let found = children(pid).into_iter().find(|c| {
            std::fs::read(format!("/proc/{c}/cmdline"))
                .is_ok_and(|l| l.windows(12).any(|w| w == b"--key-signer"))
        });
        found.expect("a key signer child of vpnd")
    };
    let s = signer(pid);
    assert_eq!(status_field(s, "Uid"), "65534 65534 65534 65534");
    assert_eq!(status_field(s, "CapEff"), "0000000000000000");
    assert_eq!(status_field(s, "CapPrm"), "0000000000000000");
    assert_eq!(status_field(s, "NoNewPrivs"), "1");
    assert_eq!(status_field(s, "Seccomp"), "2", "a seccomp filter");
    let mut fds: Vec<u32> = std::fs::read_dir(format!("/proc/{s}/fd"))
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .collect();
    fds.sort();
    assert_eq!(fds, [0, 1, 2], "the signer holds its socket and stdio only");

    // Killed: the next handshake starts it again, and logins go on. vpnd,
    // as nobody, cannot read the key: its broker starts the new one.
    drop(c);
    // SAFETY: kill(2) on the signer our vpnd started, found by its parent.
    assert_eq!(unsafe { libc::kill(s as libc::pid_t, libc::SIGKILL) }, 0);
    let cookie = authenticate(&topo, &gw, ALICE.name, ALICE.password).unwrap();
    assert!(!cookie.is_empty());
    let again = signer(broker_of(pid));
    assert_ne!(again, s);
    assert!(
        gw.log().contains("key signer started again"),
        "{}",
        gw.log()
    );
    assert_eq!(status_field(again, "CapEff"), "0000000000000000");
    assert_eq!(status_field(again, "NoNewPrivs"), "1");
    assert_eq!(status_field(again, "Seccomp"), "2");
}

/// vpnd without its broker has no data path (the TC programs and maps
/// went with it): it exits with the reason, for its service manager to
/// start it again, rather than take logins it cannot carry.
#[test]
fn vpnd_exits_when_its_broker_dies() {
    require_root();
    let topo = Topology::new().unwrap();
    let mut gw = Gateway::start(&topo, ConfigParts::default(), &[ALICE]).unwrap();
    let broker = broker_of(gw.pid().unwrap());
    // SAFETY: kill(2) on the broker our vpnd started, found by its parent.
    assert_eq!(
        unsafe { libc::kill(broker as libc::pid_t, libc::SIGKILL) },
        0
    );
    let until = std::time::Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(s) = gw.child_mut().try_wait().unwrap() {
            break s;
        }
        assert!(std::time::Instant::now() < until, "vpnd still runs");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(!status.success(), "{status}");
    assert!(
        gw.log()
            .contains("the broker exited (signal: 9 (SIGKILL)): vpnd cannot serve without it"),
        "{}",
        gw.log()
    );
}
