//! Two WAN uplinks: per-uplink masquerade, NAT exemption, failover and
//! failback, cookie resume through the other uplink, and cleanup.
//!
//! ```text
//!            .40 ─ isp1 ─ .10 (wan1) ┐            ┌ .20 ─┐
//! client ─┤                          gateway ─ lan0 ─ internal
//!            .41 ─ isp2 ─ .11 (wan2) ┘   isp1 ─ .20 ─ internet (198.18.30.30,
//!                                        isp2 ─ .21 ─┘  partner 198.18.31.31)
//! ```
//! Addresses are 198.18.X.0/24 with X as drawn; the gateway has no default
//! route of its own: client traffic to the internet leaves only through
//! the uplinks' tables.

use std::{
    net::{SocketAddr, TcpListener, TcpStream},
    time::{Duration, Instant},
};

use vpn_tests::*;

const WAN1: &str = "198.18.10.1";
const WAN2: &str = "198.18.11.1";
const INTERNET: &str = "198.18.30.30";
const PARTNER: &str = "198.18.31.31";

struct Net {
    topo: Topology,
    isp1: Netns,
    isp2: Netns,
}

impl Net {
    /// `topo.client` is the client, `topo.gw` the gateway, `topo.server` the
    /// internal host and `topo.client2` the internet host.
    fn new() -> Net {
        let id = unique_id();
        let ns = |t: &str| Netns::new(format!("vgu-{id}-{t}")).unwrap();
        let (client, gw, internal, internet) = (ns("c"), ns("g"), ns("n"), ns("x"));
        let (isp1, isp2) = (ns("i1"), ns("i2"));
        let veth = |a: &Netns, an: &str, aaddr: &str, b: &Netns, bn: &str, baddr: &str| {
            a.ip(&[
                "link", "add", an, "type", "veth", "peer", "name", bn, "netns", &b.name,
            ])
            .unwrap();
            a.ip(&["addr", "add", aaddr, "dev", an]).unwrap();
            b.ip(&["addr", "add", baddr, "dev", bn]).unwrap();
            a.ip(&["link", "set", an, "up"]).unwrap();
            b.ip(&["link", "set", bn, "up"]).unwrap();
        };
        veth(
            &client,
            "eth1",
            "198.18.40.2/24",
            &isp1,
            "tocl",
            "198.18.40.1/24",
        );
        veth(
            &client,
            "eth2",
            "198.18.41.2/24",
            &isp2,
            "tocl",
            "198.18.41.1/24",
        );
        veth(
            &isp1,
            "togw",
            "198.18.10.2/24",
            &gw,
            "wan1",
            "198.18.10.1/24",
        );
        veth(
            &isp2,
            "togw",
            "198.18.11.2/24",
            &gw,
            "wan2",
            "198.18.11.1/24",
        );
        veth(
            &isp1,
            "ext",
            "198.18.20.1/24",
            &internet,
            "e1",
            "198.18.20.2/24",
        );
        veth(
            &isp2,
            "ext",
            "198.18.21.1/24",
            &internet,
            "e2",
            "198.18.21.2/24",
        );
        veth(
            &gw,
            "lan0",
            "198.18.2.1/24",
            &internal,
            "eth0",
            "198.18.2.2/24",
        );
        for a in [INTERNET, PARTNER] {
            internet
                .ip(&["addr", "add", &format!("{a}/32"), "dev", "lo"])
                .unwrap();
        }
        let route = |n: &Netns, dst: &str, via: &str| {
            n.ip(&["route", "add", dst, "via", via]).unwrap();
        };
        route(&client, "198.18.10.0/24", "198.18.40.1");
        route(&client, "198.18.11.0/24", "198.18.41.1");
        route(&isp1, "198.18.30.0/23", "198.18.20.2");
        route(&isp2, "198.18.30.0/23", "198.18.21.2");
        // Exempt traffic keeps the pool address; its answers come back
        // through isp1.
        route(&isp1, POOL, "198.18.10.1");
        route(&internet, "198.18.10.0/24", "198.18.20.1");
        route(&internet, "198.18.11.0/24", "198.18.21.1");
        route(&internet, POOL, "198.18.20.1");
        route(&internal, POOL, "198.18.2.1");
        for n in [&isp1, &isp2] {
            sh(n.cmd("sysctl").args(["-qw", "net.ipv4.ip_forward=1"])).unwrap();
        }
        Net {
            topo: Topology {
                id,
                client,
                gw,
                server: internal,
                client2: internet,
            },
            isp1,
            isp2,
        }
    }

    fn config(&self, dir: &std::path::Path) -> String {
        self.config_with(dir, "")
    }

    fn config_with(&self, dir: &std::path::Path, extra: &str) -> String {
        let id = &self.topo.id;
        format!(
            r#"[server]
listen = "0.0.0.0:443"
state_dir = "{dir}/state"
control_socket = "{dir}/vpnd.sock"
event_log = "{dir}/events.jsonl"
bpf_pin_dir = "/sys/fs/bpf/vpn-test-{id}"
max_sessions = 10

[auth]
users_file = "{dir}/users.toml"

[tunnel]
pool_v4 = "{POOL}"
mtu = 1300

[client_routing]
mode = "include"
subnets = ["198.18.2.0/24", "198.18.30.0/23"]

[failover]
hold_secs = 3

[[uplink]]
name = "isp1"
interface = "wan1"
gateway = "198.18.10.2"
priority = 10
nat_exempt = ["198.18.31.0/24"]
[uplink.probe]
target = "198.18.20.2"
interval_ms = 300
failures = 3

[[uplink]]
name = "isp2"
interface = "wan2"
gateway = "198.18.11.2"
priority = 20
[uplink.probe]
target = "198.18.21.2"
interval_ms = 300
failures = 3

{extra}
"#,
            dir = dir.display()
        )
    }

    fn gateway(&self) -> Gateway {
        Gateway::start_with(&self.topo, |d| self.config(d), &[ALICE]).unwrap()
    }

    /// Opens a TCP connection from the client through the tunnel to
    /// `dst:port` on the internet host; returns the source address the
    /// internet host saw.
    fn source_seen(&self, dst: &str, port: u16) -> Option<String> {
        let addr: SocketAddr = format!("{dst}:{port}").parse().unwrap();
        let listener = in_netns(&self.topo.client2, move || TcpListener::bind(addr)).ok()?;
        listener.set_nonblocking(true).ok()?;
        let connected = in_netns(&self.topo.client, move || {
            TcpStream::connect_timeout(&addr, Duration::from_millis(300)).ok()
        });
        connected?;
        wait_for(Duration::from_secs(1), || {
            listener
                .accept()
                .ok()
                .map(|(_, peer)| peer.ip().to_string())
        })
    }

    fn uplinks(&self, gw: &Gateway) -> serde_json::Value {
        let out = gw.vpnctl(&["uplinks", "--json"]).unwrap();
        serde_json::from_str(&out).unwrap()
    }

    fn active(&self, gw: &Gateway) -> String {
        self.uplinks(gw)
            .as_array()
            .unwrap()
            .iter()
            .find(|u| u["role"] == "active")
            .map(|u| u["name"].as_str().unwrap().to_owned())
            .unwrap_or_default()
    }
}

/// Waits until new connections to the internet host come from `want`;
/// returns how long that took.
fn wait_source(net: &Net, want: &str, timeout: Duration, port: &mut u16) -> Option<Duration> {
    let t0 = Instant::now();
    wait_for(timeout, || {
        *port += 1;
        (net.source_seen(INTERNET, *port).as_deref() == Some(want)).then(|| t0.elapsed())
    })
}

#[test]
fn masquerade_exemption_failover_and_failback() {
    require_root();
    let net = Net::new();
    let gw = net.gateway();
    // The client reaches the gateway through isp2, so its tunnel survives
    // isp1's failures.
    let mut c = Client::start_at(
        &net.topo.client,
        &gw.pin,
        WAN2,
        ALICE.name,
        ALICE.password,
        &[],
    )
    .unwrap();
    let env = c.wait_connected(Duration::from_secs(20)).unwrap();
    let vpn_addr = env["INTERNAL_IP4_ADDRESS"].clone();
    let mut port = 9000;

    // Internet traffic leaves via isp1 (priority 10), masqueraded to wan1.
    assert_eq!(net.active(&gw), "isp1");
    assert_eq!(
        net.source_seen(INTERNET, port).as_deref(),
        Some(WAN1),
        "{}",
        gw.log()
    );
    // The partner prefix is NAT-exempt on isp1: it sees the VPN address.
    assert_eq!(
        net.source_seen(PARTNER, 9500).as_deref(),
        Some(vpn_addr.as_str())
    );

    // isp1's carrier goes away: within 3 s new connections use isp2.
    net.isp1.ip(&["link", "set", "togw", "down"]).unwrap();
    let took = wait_source(&net, WAN2, Duration::from_secs(6), &mut port)
        .unwrap_or_else(|| panic!("no failover to isp2\n{}", gw.log()));
    eprintln!("carrier loss: failover in {took:?}");
    assert!(took < Duration::from_secs(3), "failover took {took:?}");
    assert_eq!(net.active(&gw), "isp2");
    let ev = gw.events();
    let fo = ev
        .iter()
        .find(|e| e["event"] == "uplink_failover" && e["to"] == "isp2")
        .expect("uplink_failover event");
    assert_eq!(fo["from"], "isp1");

    // isp1 returns: after the hold time (3 s) traffic fails back.
    let back = Instant::now();
    net.isp1.ip(&["link", "set", "togw", "up"]).unwrap();
    let took = wait_source(&net, WAN1, Duration::from_secs(10), &mut port)
        .unwrap_or_else(|| panic!("no failback to isp1\n{}", gw.log()));
    eprintln!("failback after {:?}", back.elapsed());
    assert!(
        took >= Duration::from_secs(3),
        "failback before the hold time"
    );
    assert_eq!(net.active(&gw), "isp1");

    // The probe target behind isp1 stops answering (carrier stays up).
    net.topo.client2.ip(&["link", "set", "e1", "down"]).unwrap();
    let took = wait_source(&net, WAN2, Duration::from_secs(6), &mut port)
        .unwrap_or_else(|| panic!("no failover on probe loss\n{}", gw.log()));
    eprintln!("probe loss: failover in {took:?}");
    assert!(took < Duration::from_secs(3), "failover took {took:?}");
    let rows = net.uplinks(&gw);
    let isp1 = &rows[0];
    assert_eq!(isp1["state"], "down");
    assert_eq!(isp1["carrier"], true);
    assert!(isp1["probes_lost"].as_u64().unwrap() >= 3);
    assert!(rows[1]["tx_bytes"].as_u64().unwrap() > 0);
    drop(c);
}

#[test]
fn a_session_moves_to_the_other_uplink_with_its_cookie_and_cleanup_is_exact() {
    require_root();
    let net = Net::new();
    let mut gw = net.gateway();
    let cookie =
        authenticate_at(&net.topo.client, &gw.pin, WAN1, ALICE.name, ALICE.password).unwrap();
    let mut c = Client::start_with_cookie_at(&net.topo.client, &gw.pin, WAN1, &cookie).unwrap();
    let env = c.wait_connected(Duration::from_secs(20)).unwrap();
    let addr = env["INTERNAL_IP4_ADDRESS"].clone();
    assert!(net.topo.client.ping("198.18.2.2", 2));
    // isp1 dies under the client; it comes back through isp2 with the
    // cookie and keeps its address, without a new login.
    c.child_mut().kill().unwrap();
    let _ = c.child_mut().wait();
    drop(c);
    net.isp1.ip(&["link", "set", "togw", "down"]).unwrap();
    let mut c2 = Client::start_with_cookie_at(&net.topo.client, &gw.pin, WAN2, &cookie).unwrap();
    let env2 = c2.wait_connected(Duration::from_secs(20)).unwrap();
    assert_eq!(env2["INTERNAL_IP4_ADDRESS"], addr);
    assert!(net.topo.client.ping("198.18.2.2", 2), "{}", gw.log());
    let sessions = gw.sessions().unwrap();
    assert_eq!(sessions.len(), 1);
    assert_eq!(sessions[0]["public_address"], "198.18.41.2");
    drop(c2);

    // What the daemon installed, counted in the gateway namespace.
    let g = &net.topo.gw;
    let rules = || {
        let out = String::from_utf8(g.ip(&["rule", "show"]).unwrap().stdout).unwrap();
        out.lines()
            .filter(|l| {
                l.split(':')
                    .next()
                    .and_then(|p| p.trim().parse::<u32>().ok())
                    .is_some_and(|p| (7100..=7133).contains(&p))
            })
            .count()
    };
    let routes = || {
        (7100..7102)
            .map(|t| {
                String::from_utf8(
                    g.ip(&["route", "show", "table", &t.to_string()])
                        .unwrap()
                        .stdout,
                )
                .unwrap()
                .lines()
                .count()
            })
            .sum::<usize>()
    };
    let masquerades = || {
        let out = sh(g.cmd("nft").args(["list", "ruleset"])).unwrap();
        let text = String::from_utf8(out.stdout).unwrap();
        (
            text.matches("table inet vpn_gateway").count(),
            text.matches("masquerade").count(),
        )
    };
    // 1 main-table rule + per uplink a mark rule and a source rule.
    assert_eq!(rules(), 5);
    assert_eq!(routes(), 2);
    assert_eq!(masquerades(), (1, 2));

    // SIGKILL leaves it all; a new start replaces it with exactly one set.
    gw.child_mut().kill().unwrap();
    let _ = gw.child_mut().wait();
    assert_eq!(rules(), 5);
    let mut gw2 = net.gateway();
    assert_eq!(rules(), 5);
    assert_eq!(routes(), 2);
    assert_eq!(masquerades(), (1, 2));

    // A clean stop removes everything.
    gw2.stop();
    assert_eq!(rules(), 0);
    assert_eq!(routes(), 0);
    assert_eq!(masquerades(), (0, 0));
}

/// A group policy pinned to isp2: its client leaves through isp2 while isp1
/// is active, and through the active uplink while isp2 is down.
#[test]
fn a_policy_pins_its_clients_to_an_uplink_while_it_is_healthy() {
    require_root();
    let net = Net::new();
    let alice = TestUser {
        group_policy: Some("via-isp2"),
        ..ALICE
    };
    let gw = Gateway::start_with(
        &net.topo,
        |d| {
            net.config_with(
                d,
                "[[group_policy]]\nname = \"via-isp2\"\nuplink = \"isp2\"\n",
            )
        },
        &[alice],
    )
    .unwrap();
    let mut c = Client::start_at(
        &net.topo.client,
        &gw.pin,
        WAN1,
        ALICE.name,
        ALICE.password,
        &[],
    )
    .unwrap();
    c.wait_connected(Duration::from_secs(20)).unwrap();
    assert_eq!(net.active(&gw), "isp1");
    let mut port = 9100;
    assert_eq!(
        net.source_seen(INTERNET, port).as_deref(),
        Some(WAN2),
        "pinned to isp2\n{}",
        gw.log()
    );
    net.isp2.ip(&["link", "set", "togw", "down"]).unwrap();
    let took = wait_source(&net, WAN1, Duration::from_secs(6), &mut port).unwrap_or_else(|| {
        panic!(
            "pinned uplink down: no move to the active one\n{}",
            gw.log()
        )
    });
    assert!(took < Duration::from_secs(3), "took {took:?}");
    drop(c);
}

/// Everything vpnd installs in the gateway namespace, as lines to compare
/// between runs (ids, handles and counters left out): the uplinks' policy
/// rules and routes, its nft table, the BPF programs attached to the
/// gateway's devices (the XDP guards on the uplinks; Debian 12's bpftool
/// does not list the TCX programs on the tunnel device, which go with the
/// device), its pinned maps and the entries of the session map.
fn installed(g: &Netns, pins: &std::path::Path) -> Vec<String> {
    let text = |out: std::process::Output| String::from_utf8_lossy(&out.stdout).into_owned();
    let mut seen = Vec::new();
    for l in text(g.ip(&["rule", "show"]).unwrap()).lines() {
        let prio = l
            .split(':')
            .next()
            .and_then(|p| p.trim().parse::<u32>().ok());
        if prio.is_some_and(|p| (7100..=7133).contains(&p)) {
            seen.push(format!("rule {l}"));
        }
    }
    for t in 7100..7102 {
        for l in text(g.ip(&["route", "show", "table", &t.to_string()]).unwrap()).lines() {
            seen.push(format!("route {t} {l}"));
        }
    }
    if let Ok(out) = sh(g.cmd("nft").args(["list", "table", "inet", "vpn_gateway"])) {
        for l in text(out).lines() {
            // Counters differ between runs: their figures are left out.
            let mut words: Vec<&str> = l.split_whitespace().collect();
            for i in 1..words.len() {
                if matches!(words[i - 1], "packets" | "bytes") {
                    words[i] = "N";
                }
            }
            seen.push(format!("nft {}", words.join(" ")));
        }
    }
    let net: serde_json::Value = serde_json::from_slice(
        &sh(g.cmd("bpftool").args(["-j", "net", "show"]))
            .unwrap()
            .stdout,
    )
    .unwrap();
    for section in net.as_array().into_iter().flatten() {
        for (kind, list) in section.as_object().into_iter().flatten() {
            for a in list.as_array().into_iter().flatten() {
                seen.push(format!(
                    "attached {kind} {} {} {}",
                    a["devname"].as_str().unwrap_or(""),
                    a["kind"].as_str().or(a["mode"].as_str()).unwrap_or(""),
                    a["name"].as_str().unwrap_or(""),
                ));
            }
        }
    }
    if let Ok(dir) = std::fs::read_dir(pins) {
        let mut names: Vec<String> = dir
            .filter_map(Result::ok)
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        seen.push(format!("pinned {}", names.join(" ")));
        let dump = sh(std::process::Command::new("bpftool")
            .args(["-j", "map", "dump", "pinned"])
            .arg(pins.join("sessions")))
        .map(|o| serde_json::from_slice::<Vec<serde_json::Value>>(&o.stdout).unwrap_or_default());
        seen.push(format!("session entries {:?}", dump.map(|d| d.len()).ok()));
    }
    seen.sort();
    seen
}

/// Crash recovery (issue 21): vpnd killed with SIGKILL at any moment (at
/// five points of its start-up, ready, with a session up, while a client
/// logs in) and started again has exactly one set of what it installs,
/// the same as after a clean start: policy rules, routes, the nft table,
/// the XDP guards and TC programs, the pinned maps, no stale session
/// entries. A client then connects and reaches the internal host through
/// it, and a clean stop removes all of it.
#[test]
fn after_sigkill_at_any_moment_a_restart_leaves_exactly_one_set() {
    require_root();
    let net = Net::new();
    let config =
        |d: &std::path::Path| net.config_with(d, "[dtls]\nxdp_interfaces = [\"wan1\", \"wan2\"]\n");
    let g = &net.topo.gw;
    // Alice's openconnect through isp1.
    let alice = |gw: &Gateway| {
        Client::start_at(
            &net.topo.client,
            &gw.pin,
            WAN1,
            ALICE.name,
            ALICE.password,
            &[],
        )
        .unwrap()
    };
    let mut gw = Gateway::start_with(&net.topo, config, &[ALICE]).unwrap();
    let pins = gw.pin_dir.clone();
    let clean = installed(g, &pins);
    eprintln!("a clean start installs:\n{}", clean.join("\n"));
    for what in [
        "rule ",
        "route 7100",
        "route 7101",
        "nft table inet vpn_gateway",
    ] {
        assert!(
            clean.iter().any(|l| l.starts_with(what)),
            "{what}: {clean:?}"
        );
    }
    for dev in ["wan1", "wan2"] {
        assert!(
            clean
                .iter()
                .any(|l| l.starts_with(&format!("attached xdp {dev} "))),
            "the XDP guard on {dev}: {clean:?}"
        );
    }
    assert!(
        clean.contains(&"session entries Some(0)".to_owned()),
        "{clean:?}"
    );
    gw.stop();
    let nothing: Vec<String> = Vec::new();
    assert_eq!(installed(g, &pins), nothing, "a clean stop removes it all");

    // Moments of the start-up, by the log line that ends each step.
    let steps = [
        ("as it starts", "vpnd"),
        ("with its tunnel device made", "kernel offloads: "),
        ("with its BPF programs attached", "BPF programs attached"),
        ("with an XDP guard attached", "XDP guard attached"),
        ("as the uplinks go in", "uplink failover: start"),
    ];
    for moment in steps.iter().map(|(m, _)| *m).chain([
        "ready",
        "with a session up",
        "while a client logs in",
    ]) {
        let mut client = None;
        let mut gw = match steps.iter().find(|(m, _)| *m == moment) {
            Some((_, line)) => {
                let gw = Gateway::spawn(&net.topo, config, &[ALICE], &[]).unwrap();
                let seen = wait_for(Duration::from_secs(20), || {
                    gw.log().contains(line).then_some(())
                });
                assert!(seen.is_some(), "{moment}: {}", gw.log());
                gw
            }
            None => Gateway::start_with(&net.topo, config, &[ALICE]).unwrap(),
        };
        if moment == "with a session up" {
            let mut c = alice(&gw);
            c.wait_connected(Duration::from_secs(20)).unwrap();
            assert!(installed(g, &pins).contains(&"session entries Some(1)".to_owned()));
            client = Some(c);
        } else if moment == "while a client logs in" {
            client = Some(alice(&gw));
            std::thread::sleep(Duration::from_millis(300));
        }
        gw.child_mut().kill().unwrap();
        let _ = gw.child_mut().wait();
        // The tunnel device, and the TC programs on it, went with vpnd and
        // its broker (which follows vpnd at once, PR_SET_PDEATHSIG; it may
        // hold the device while it sets up), and so did the XDP guards
        // (BPF links close with their process); the rules, routes, nft
        // table and pinned maps stay for the restart to deal with.
        let gone = Instant::now() + Duration::from_secs(5);
        let left = loop {
            let left = installed(g, &pins);
            let device = g.ip(&["link", "show", "vpn0"]).is_ok();
            let attached = left.iter().any(|l| l.starts_with("attached "));
            if !(device || attached) {
                break left;
            }
            assert!(Instant::now() < gone, "{moment}: device {device}, {left:?}");
            std::thread::sleep(Duration::from_millis(20));
        };
        if ["ready", "with a session up", "while a client logs in"].contains(&moment) {
            for what in [
                "rule ",
                "route 7100",
                "nft table inet vpn_gateway",
                "pinned ",
            ] {
                assert!(left.iter().any(|l| l.starts_with(what)), "{what}: {left:?}");
            }
        }
        if moment == "with a session up" {
            assert!(
                left.contains(&"session entries Some(1)".to_owned()),
                "{left:?}"
            );
        }
        // The old client would retry with a cookie the new vpnd never gave.
        drop(client);

        let mut gw2 = Gateway::start_with(&net.topo, config, &[ALICE]).unwrap();
        let after = installed(g, &pins);
        assert_eq!(
            after,
            clean,
            "after SIGKILL {moment} and a restart\n{}",
            gw2.log()
        );
        if moment == "with a session up" {
            let mut c = alice(&gw2);
            c.wait_connected(Duration::from_secs(20)).unwrap();
            assert!(net.topo.client.ping("198.18.2.2", 2), "{}", gw2.log());
        }
        gw2.stop();
        assert_eq!(
            installed(g, &pins),
            nothing,
            "a clean stop after the restart ({moment})"
        );
    }
}

/// Runs `openconnect --authenticate` from the client with `args` (the
/// server last); returns its exit status and output.
fn authenticate_with(net: &Net, pin: &str, args: &[&str]) -> (bool, String) {
    let mut child = net
        .topo
        .client
        .cmd("openconnect")
        .args([
            "--authenticate",
            "--protocol=anyconnect",
            "-v",
            "--servercert",
            pin,
            "-u",
            ALICE.name,
            "--passwd-on-stdin",
        ])
        .args(args)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write as _;
    writeln!(child.stdin.take().unwrap(), "{}", ALICE.password).unwrap();
    let out = child.wait_with_output().unwrap();
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

/// The client profile: openconnect downloads it at login (through the
/// port suffix openconnect 9.01 adds to its path), its server list has
/// both uplinks' names, a client that has it does not download it again,
/// its entry for isp2 takes openconnect to isp2 in the entry's group, and
/// a reload that changes it makes clients download the new file.
#[test]
fn openconnect_downloads_the_profile_and_connects_by_its_entries() {
    require_root();
    let net = Net::new();
    let config = |d: &std::path::Path, backup: &str| {
        net.config_with(
            d,
            &format!(
                "[[group]]\nname = \"staff\"\n[[group]]\nname = \"guests\"\n\
                 [profile]\nhost_name = \"Corp VPN\"\ntrusted_dns_domains = [\"corp.example.com\"]\n{backup}"
            ),
        )
        .replace("listen = \"0.0.0.0:443\"", "listen = \"0.0.0.0:8443\"")
        .replace(
            "name = \"isp1\"\n",
            "name = \"isp1\"\nhostname = \"vpn-isp1.test\"\n",
        )
        .replace(
            "name = \"isp2\"\n",
            "name = \"isp2\"\nhostname = \"vpn-isp2.test\"\n",
        )
    };
    let gw = Gateway::start_with(&net.topo, |d| config(d, ""), &[ALICE]).unwrap();
    let resolve = [
        format!("--resolve=vpn-isp1.test:{WAN1}"),
        format!("--resolve=vpn-isp2.test:{WAN2}"),
    ];
    let dir = TempDir::new("profile").unwrap();
    let file = dir.path().join("profile.xml");
    let file_arg = file.to_str().unwrap();
    let login = |target: &str, group: Option<&str>| {
        let mut args = vec![resolve[0].as_str(), resolve[1].as_str(), "-x", file_arg];
        if let Some(g) = group {
            args.extend(["--authgroup", g]);
        }
        args.push(target);
        authenticate_with(&net, &gw.pin, &args)
    };
    let sent = |gw: &Gateway| gw.log().matches("client profile sent").count();

    // First login (no file yet): openconnect fetches and keeps it.
    let (ok, out) = login("https://vpn-isp1.test:8443/", Some("staff"));
    assert!(ok, "{out}\n{}", gw.log());
    let got = std::fs::read(&file).unwrap_or_else(|e| panic!("{e}: {out}\n{}", gw.log()));
    let text = String::from_utf8(got.clone()).unwrap();
    assert!(
        text.contains("<HostAddress>vpn-isp1.test:8443</HostAddress>"),
        "{text}"
    );
    assert!(
        text.contains("<HostAddress>vpn-isp2.test:8443</HostAddress>"),
        "{text}"
    );
    assert!(text.contains("<UserGroup>staff</UserGroup>"), "{text}");
    assert!(
        text.contains("<TrustedDNSDomains>corp.example.com<"),
        "{text}"
    );
    assert_eq!(sent(&gw), 1, "{}", gw.log());
    // The file is the one announced, byte for byte: its SHA-1 is the
    // one the gateway logged when it sent it.
    let sha1 = sha1_of(&file);
    assert!(
        gw.log()
            .lines()
            .any(|l| l.contains("client profile sent") && l.contains(&sha1)),
        "{sha1} not sent:\n{}",
        gw.log()
    );

    // Second login: the file's hash matches, nothing is downloaded.
    let (ok, out) = login("https://vpn-isp1.test:8443/", Some("staff"));
    assert!(ok, "{out}");
    assert_eq!(sent(&gw), 1, "downloaded again:\n{out}");
    assert_eq!(std::fs::read(&file).unwrap(), got);

    // The isp2 entry, by name: openconnect goes to vpn-isp2.test in the
    // entry's group.
    let (ok, out) = login("Corp VPN (isp2)", None);
    assert!(ok, "{out}\n{}", gw.log());
    let sessions = gw.sessions().unwrap();
    let last = sessions
        .iter()
        .max_by_key(|s| s["id"].as_u64().unwrap())
        .unwrap();
    assert_eq!(last["group"], "staff", "{last}");
    let through_isp2 = gw
        .log()
        .lines()
        .filter(|l| l.contains("login succeeded"))
        .any(|l| l.contains("198.18.41.2:"));
    assert!(through_isp2, "no login through isp2:\n{}", gw.log());

    // Only a session's own group's profile, and only with its cookie.
    let cookie = out
        .lines()
        .find_map(|l| l.strip_prefix("COOKIE="))
        .and_then(|c| c.trim_matches('\'').rsplit("webvpn=").next())
        .unwrap()
        .to_owned();
    let get = |path: &str, cookie: Option<&str>| {
        let mut cmd = net.topo.client.cmd("curl");
        cmd.args(["-sk", "-o", "/dev/null", "-w", "%{http_code}"])
            .args(["--resolve", &format!("vpn-isp1.test:8443:{WAN1}")])
            .arg(format!("https://vpn-isp1.test:8443{path}"));
        if let Some(c) = cookie {
            cmd.args(["-b", &format!("webvpn={c}")]);
        }
        String::from_utf8(sh(&mut cmd).unwrap().stdout).unwrap()
    };
    assert_eq!(get("/profiles/staff.xml", Some(&cookie)), "200");
    assert_eq!(get("/profiles/staff.xml", None), "404");
    assert_eq!(get("/profiles/staff.xml", Some("0123456789abcdef")), "404");
    assert_eq!(get("/profiles/guests.xml", Some(&cookie)), "404");
    let served = sent(&gw);

    // A reload that adds a backup server: a new file, downloaded again.
    std::fs::write(
        &gw.config,
        config(gw.dir.path(), "backup_servers = [\"vpn-dr.test\"]\n"),
    )
    .unwrap();
    let out = gw.vpnctl(&["reload"]).unwrap();
    assert!(!out.contains("restart"), "{out}");
    let (ok, out) = login("https://vpn-isp1.test:8443/", Some("staff"));
    assert!(ok, "{out}");
    assert_eq!(
        sent(&gw),
        served + 1,
        "not downloaded after the change:\n{out}"
    );
    let text = std::fs::read_to_string(&file).unwrap();
    assert!(
        text.contains("<HostAddress>vpn-dr.test</HostAddress>"),
        "{text}"
    );
}

/// SHA-1 of the file at `path`, upper-case hex (`sha1sum`).
fn sha1_of(path: &std::path::Path) -> String {
    let out = sh(std::process::Command::new("sha1sum").arg(path)).unwrap();
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .unwrap_or_default()
        .to_uppercase()
}
