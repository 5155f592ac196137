//! The identity feed (`[identity_feed]`): the secret guards it, the
//! mappings follow logins, policy moves and ends, and a consumer that was
//! away for 60 s and resumes from its last position gets every change it
//! missed, in order. Consumers are curl in the internal network's
//! namespace, as a web proxy on the LAN would be.

use std::{
    process::{Child, Stdio},
    time::{Duration, Instant},
};

use vpn_daemon::proto::identity::{Change, Snapshot, SseEvent, SseReader};
use vpn_tests::*;

const SECRET: &str = "feed-secret-0123456789abcdef";
const FEED: &str = "https://198.18.2.1:9443";

fn config(policy: &str) -> String {
    format!(
        "[identity_feed]\nenabled = true\nlisten = \"198.18.2.1:9443\"\nsecret = \"{SECRET}\"\n\
         [[group_policy]]\nname = \"p1\"\n[[group_policy]]\nname = \"p2\"\n\
         [policy]\ndefault = \"{policy}\"\n"
    )
}

/// `GET path` on the feed from the internal network with `auth` curl
/// arguments; returns the status and body.
fn get(topo: &Topology, path: &str, auth: &[&str]) -> (u16, String) {
    let out = sh(topo
        .server
        .cmd("curl")
        .args(["-sk", "--max-time", "5", "-w", "\n%{http_code}"])
        .args(auth)
        .arg(format!("{FEED}{path}")))
    .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n').unwrap();
    (code.trim().parse().unwrap(), body.to_owned())
}

fn bearer(secret: &str) -> String {
    format!("Authorization: Bearer {secret}")
}

/// A consumer of `/v1/changes` (curl -N), its output in a file.
struct Consumer {
    child: Child,
    dir: TempDir,
}

impl Consumer {
    fn start(topo: &Topology, last_event_id: Option<&str>) -> Consumer {
        let dir = TempDir::new("feed").unwrap();
        let mut cmd = topo.server.cmd("curl");
        cmd.args(["-Nsk", "--max-time", "150", "-H", &bearer(SECRET)]);
        if let Some(id) = last_event_id {
            cmd.args(["-H", &format!("Last-Event-ID: {id}")]);
        }
        let child = cmd
            .arg(format!("{FEED}/v1/changes"))
            .stdout(std::fs::File::create(dir.path().join("out")).unwrap())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        Consumer { child, dir }
    }

    fn events(&self) -> Vec<SseEvent> {
        let text = std::fs::read_to_string(self.dir.path().join("out")).unwrap_or_default();
        let mut r = SseReader::default();
        text.lines().filter_map(|l| r.line(l)).collect()
    }

    /// Waits until at least `n` events arrived (10 s at most).
    fn wait_events(&self, n: usize) -> Vec<SseEvent> {
        wait_for(Duration::from_secs(10), || {
            let e = self.events();
            (e.len() >= n).then_some(e)
        })
        .unwrap_or_else(|| panic!("fewer than {n} events: {:?}", self.events()))
    }

    fn stop(mut self) {
        signal(&self.child, "TERM");
        let _ = self.child.wait();
    }
}

fn change(e: &SseEvent) -> Change {
    serde_json::from_str(&e.data).unwrap_or_else(|err| panic!("{err}: {e:?}"))
}

#[test]
fn the_feed_needs_its_secret_and_a_consumer_resumes_after_60_s_with_every_change_in_order() {
    require_root();
    let topo = Topology::new().unwrap();
    let rest = config("p1");
    let gw = Gateway::start(
        &topo,
        ConfigParts {
            rest: &rest,
            ..Default::default()
        },
        &[ALICE, BOB],
    )
    .unwrap();

    // The secret, as bearer token or basic password; nothing else.
    let basic = |p: &str| ["-u".to_string(), format!("squid:{p}")];
    let ok = get(&topo, "/v1/mappings", &["-H", &bearer(SECRET)]);
    assert_eq!(ok.0, 200, "{ok:?}\n{}", gw.log());
    let empty: Snapshot = serde_json::from_str(&ok.1).unwrap();
    assert_eq!((empty.seq, empty.mappings.len()), (0, 0));
    assert_eq!(
        get(
            &topo,
            "/v1/mappings",
            &basic(SECRET).each_ref().map(String::as_str)
        )
        .0,
        200
    );
    for auth in [
        vec![],
        vec!["-H".to_string(), bearer("feed-secret-0123456789abcdeX")],
        vec!["-H".to_string(), bearer("feed-secret")],
        basic("wrong-secret-0123456789abcdef").to_vec(),
    ] {
        let args: Vec<&str> = auth.iter().map(String::as_str).collect();
        let (code, body) = get(&topo, "/v1/changes", &args);
        assert_eq!(code, 401, "{auth:?}: {body}");
    }

    // A consumer from the start: the (empty) snapshot, then alice's login.
    let first = Consumer::start(&topo, None);
    let ev = first.wait_events(1);
    assert_eq!(ev[0].event, "snapshot");
    authenticate(&topo, &gw, ALICE.name, ALICE.password).unwrap();
    let ev = first.wait_events(2);
    let added = change(&ev[1]);
    assert_eq!(
        (ev[1].event.as_str(), added.mapping.user.as_str()),
        ("add", "alice")
    );
    assert_eq!(added.mapping.policy.as_deref(), Some("p1"));
    assert_eq!(added.mapping.group, "default");
    assert!(
        added.mapping.groups.is_empty(),
        "a local user has no directory groups"
    );
    let alice_addr = added.mapping.address;
    let last_seen = ev[1].id.clone().unwrap();
    first.stop();

    // Away for 60 s; meanwhile alice leaves, bob comes, a reload moves him
    // to p2, alice comes back.
    let away = Instant::now();
    gw.vpnctl(&["disconnect", "alice"]).unwrap();
    authenticate(&topo, &gw, BOB.name, BOB.password).unwrap();
    std::fs::write(
        &gw.config,
        Gateway::base_config(
            gw.dir.path(),
            &topo,
            &ConfigParts {
                rest: &config("p2"),
                ..Default::default()
            },
        ),
    )
    .unwrap();
    gw.vpnctl(&["reload"]).unwrap();
    authenticate(&topo, &gw, ALICE.name, ALICE.password).unwrap();
    // One address, asked for directly.
    let (code, body) = get(
        &topo,
        &format!("/v1/mappings/{alice_addr}"),
        &["-H", &bearer(SECRET)],
    );
    assert_eq!(code, 200, "{body}");
    assert!(body.contains("\"user\":\"alice\""), "{body}");
    assert_eq!(
        get(&topo, "/v1/mappings/198.19.0.250", &["-H", &bearer(SECRET)]).0,
        404
    );
    assert_eq!(
        get(&topo, "/v1/mappings/nope", &["-H", &bearer(SECRET)]).0,
        400
    );
    std::thread::sleep(Duration::from_secs(60).saturating_sub(away.elapsed()));

    // Back, from the last position it saw: exactly what it missed.
    let back = Consumer::start(&topo, Some(&last_seen));
    let ev = back.wait_events(4);
    std::thread::sleep(Duration::from_millis(300));
    let ev_all = back.events();
    assert_eq!(ev_all.len(), 4, "nothing more, no snapshot: {ev_all:?}");
    let got: Vec<(u64, String, String, Option<String>)> = ev
        .iter()
        .map(|e| {
            let c = change(e);
            assert_eq!(e.event, c.op.name());
            assert_eq!(
                e.id.as_deref(),
                Some(format!("{}-{}", last_seen.rsplit_once('-').unwrap().0, c.seq).as_str())
            );
            (c.seq, e.event.clone(), c.mapping.user, c.mapping.policy)
        })
        .collect();
    let s = added.seq;
    let p = |x: &str| Some(x.to_string());
    assert_eq!(
        got,
        [
            (s + 1, "remove".into(), "alice".into(), p("p1")),
            (s + 2, "add".into(), "bob".into(), p("p1")),
            (s + 3, "update".into(), "bob".into(), p("p2")),
            (s + 4, "add".into(), "alice".into(), p("p2")),
        ]
    );
    // The event log has the same changes, same numbers.
    let logged: Vec<(u64, String)> = gw
        .events_of("identity_changed")
        .iter()
        .map(|e| {
            (
                e["seq"].as_u64().unwrap(),
                e["op"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    assert_eq!(
        logged[1..],
        got.iter().map(|g| (g.0, g.1.clone())).collect::<Vec<_>>()[..]
    );
    back.stop();

    // A position from another run (or too old): a snapshot first.
    let stale = Consumer::start(&topo, Some("0123abcd-3"));
    let ev = stale.wait_events(1);
    assert_eq!(ev[0].event, "snapshot");
    let snap: Snapshot = serde_json::from_str(&ev[0].data).unwrap();
    let mut users: Vec<String> = snap.mappings.into_iter().map(|m| m.user).collect();
    users.sort();
    assert_eq!(
        (snap.seq, users),
        (s + 4, vec!["alice".to_string(), "bob".to_string()])
    );
    stale.stop();
}

/// Sends `bytes` to the feed over TLS from the internal network (openssl
/// s_client); returns what came back.
fn raw(topo: &Topology, bytes: &[u8]) -> String {
    use std::io::Write as _;
    let mut c = topo
        .server
        .cmd("timeout")
        .args([
            "5",
            "openssl",
            "s_client",
            "-quiet",
            "-connect",
            "198.18.2.1:9443",
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut stdin = c.stdin.take().unwrap();
    let _ = stdin.write_all(bytes);
    // Closing stdin would end s_client before the answer: keep it open
    // until the server closes.
    let out = c.wait_with_output().unwrap();
    drop(stdin);
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn bad_requests_to_the_feed_get_clear_errors_and_it_keeps_serving() {
    require_root();
    let topo = Topology::new().unwrap();
    let rest = config("p1");
    let gw = Gateway::start(
        &topo,
        ConfigParts {
            rest: &rest,
            ..Default::default()
        },
        &[ALICE],
    )
    .unwrap();
    let auth = format!("Authorization: Bearer {SECRET}\r\n");
    let cases: [(String, &str); 5] = [
        ("GARBAGE\r\n\r\n".into(), "HTTP/1.1 400"),
        (
            format!(
                "GET /v1/mappings HTTP/1.1\r\nX: {}\r\n\r\n",
                "a".repeat(20_000)
            ),
            "HTTP/1.1 431",
        ),
        (
            format!("POST /v1/mappings HTTP/1.1\r\n{auth}Content-Length: 0\r\n\r\n"),
            "HTTP/1.1 405",
        ),
        (
            format!("GET /v2/everything HTTP/1.1\r\n{auth}\r\n"),
            "HTTP/1.1 404",
        ),
        (
            "GET /v1/changes HTTP/1.1\r\nAuthorization: Basic Og==\r\n\r\n".into(),
            "HTTP/1.1 401",
        ),
    ];
    for (req, want) in &cases {
        let got = raw(&topo, req.as_bytes());
        assert!(got.starts_with(want), "{req:.60?}: {got:?}");
    }
    // A flood of idle connections is capped (vpnd's descriptors are the
    // VPN's too): logins go on, and the feed serves again once they go.
    let idle = in_netns(&topo.server, || {
        (0..150)
            .filter_map(|_| std::net::TcpStream::connect("198.18.2.1:9443").ok())
            .collect::<Vec<_>>()
    });
    assert_eq!(idle.len(), 150);
    let capped = wait_for(Duration::from_secs(5), || {
        gw.log()
            .contains("identity feed: too many connections")
            .then_some(())
    });
    assert!(capped.is_some(), "no cap:\n{}", gw.log());
    authenticate(&topo, &gw, ALICE.name, ALICE.password).unwrap();
    drop(idle);
    // Still serving, with the right secret.
    let (code, body) = get(&topo, "/v1/mappings", &["-H", &bearer(SECRET)]);
    assert_eq!(code, 200, "{body}");
    let snap: Snapshot = serde_json::from_str(&body).unwrap();
    assert_eq!(snap.mappings[0].user, "alice");
    assert!(
        gw.log()
            .contains("identity feed: request without the secret refused"),
        "refusals are logged"
    );
}
