//! Bad input gets a clear error and the gateway keeps serving everyone else:
//! an openconnect client stays connected and passes traffic throughout.

use std::{
    io::{Read, Write},
    time::{Duration, Instant},
};

use vpn_tests::*;

fn post(body: &str) -> String {
    format!(
        "POST / HTTP/1.1\r\nHost: {GW_OUTSIDE}\r\nX-Aggregate-Auth: 1\r\nContent-Type: application/xml\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
}

#[test]
fn bad_requests_get_clear_errors_while_a_tunnel_keeps_working() {
    require_root();
    let topo = Topology::new().unwrap();
    let gw = Gateway::start(
        &topo,
        ConfigParts {
            rest: "[http]\nrequest_timeout_secs = 2\nmax_header_bytes = 4096\n",
            ..Default::default()
        },
        &[ALICE],
    )
    .unwrap();
    let mut client = Client::start(&topo, &gw, ALICE.name, ALICE.password, &[]).unwrap();
    client.wait_connected(Duration::from_secs(20)).unwrap();
    assert!(topo.client.ping(SERVER, 1));

    // Malformed XML: 400 naming the problem.
    let mut s = raw_tls(&topo).unwrap();
    s.write_all(post("<config-auth type=\"init\"><auth></config-auth>").as_bytes())
        .unwrap();
    let (status, text) = read_http_response(&mut s).unwrap();
    assert_eq!(status, 400, "{text}");
    assert!(text.contains("malformed XML"), "{text}");

    // Not XML at all.
    let mut s = raw_tls(&topo).unwrap();
    s.write_all(post("{\"user\": \"alice\"}").as_bytes())
        .unwrap();
    let (status, text) = read_http_response(&mut s).unwrap();
    assert_eq!(status, 400, "{text}");
    assert!(text.contains("not a <config-auth> document"), "{text}");

    // Oversized headers: 431.
    let mut s = raw_tls(&topo).unwrap();
    let big = format!(
        "GET / HTTP/1.1\r\nHost: x\r\nX-Big: {}\r\n\r\n",
        "a".repeat(8000)
    );
    s.write_all(big.as_bytes()).unwrap();
    let (status, text) = read_http_response(&mut s).unwrap();
    assert_eq!(status, 431, "{text}");

    // A body larger than announced limits: 413 before reading it.
    let mut s = raw_tls(&topo).unwrap();
    s.write_all(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 10000000\r\n\r\n")
        .unwrap();
    let (status, _) = read_http_response(&mut s).unwrap();
    assert_eq!(status, 413);

    // An unknown cookie on CONNECT: 401.
    let mut s = raw_tls(&topo).unwrap();
    s.write_all(
        b"CONNECT /CSCOSSLC/tunnel HTTP/1.1\r\nHost: x\r\nCookie: webvpn=0123456789abcdef\r\n\r\n",
    )
    .unwrap();
    let (status, _) = read_http_response(&mut s).unwrap();
    assert_eq!(status, 401);

    // A stalled client (slowloris): half a request, then silence. It gets a
    // 408 after the request timeout; the tunnel passes traffic meanwhile.
    let mut s = raw_tls(&topo).unwrap();
    s.write_all(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Le")
        .unwrap();
    let t0 = Instant::now();
    assert!(
        topo.client.ping(SERVER, 3),
        "tunnel stalled by a slow client"
    );
    let (status, _) = read_http_response(&mut s).unwrap();
    assert_eq!(status, 408);
    assert!(
        t0.elapsed() < Duration::from_secs(6),
        "timeout took {:?}",
        t0.elapsed()
    );

    // A client that connects and never starts TLS is dropped too.
    let mut tcp = in_netns(&topo.client, || {
        std::net::TcpStream::connect((GW_OUTSIDE, 443))
    })
    .unwrap();
    tcp.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut b = [0u8; 16];
    let t0 = Instant::now();
    let n = tcp.read(&mut b).unwrap_or(0);
    assert_eq!(n, 0, "closed without data");
    assert!(t0.elapsed() < Duration::from_secs(6));

    // Through all of it: the tunnel works and the session is untouched.
    assert!(topo.client.ping(SERVER, 2));
    let sessions = gw.sessions().unwrap();
    assert_eq!(sessions.len(), 1);
    assert_eq!(sessions[0]["state"], "connected");
    assert!(client.child_mut().try_wait().unwrap().is_none());
}

#[test]
fn garbage_in_the_tunnel_ends_only_that_tunnel() {
    require_root();
    let topo = Topology::new().unwrap();
    let gw = Gateway::start(&topo, ConfigParts::default(), &[ALICE]).unwrap();
    let mut client = Client::start(&topo, &gw, ALICE.name, ALICE.password, &[]).unwrap();
    client.wait_connected(Duration::from_secs(20)).unwrap();

    // A second session whose tunnel we drive by hand, sending a bad frame.
    let cookie = authenticate(&topo, &gw, ALICE.name, ALICE.password).unwrap();
    let mut s = raw_tls(&topo).unwrap();
    let head = raw_connect(&mut s, webvpn_cookie(&cookie)).unwrap();
    assert!(head.starts_with(b"HTTP/1.1 200 "));
    s.write_all(b"XXXX\x00\x10\x00\x00garbage-garbage!")
        .unwrap();
    let mut rest = Vec::new();
    let _ = s.read_to_end(&mut rest);
    // The hand-driven session is down (resumable), the real client is fine.
    assert!(
        wait_for(Duration::from_secs(5), || {
            gw.events().into_iter().find(|e| {
                e["event"] == "tunnel_down"
                    && e["reason"].as_str().unwrap().contains("bad CSTP header")
            })
        })
        .is_some()
    );
    assert!(topo.client.ping(SERVER, 2));
    assert!(client.child_mut().try_wait().unwrap().is_none());
    // The bad frame scored ban points for its source (its TCP handshake
    // proved it; openconnect never sends one).
    let offences = &gw.stats().unwrap()["bans"]["offences"];
    let bad = offences
        .as_array()
        .unwrap()
        .iter()
        .find(|o| o[0] == "bad-record")
        .map(|o| o[1].as_u64().unwrap());
    assert_eq!(bad, Some(1), "{offences}");
}
