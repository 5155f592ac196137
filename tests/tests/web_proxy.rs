//! Web traffic redirected to a web proxy that logs it by VPN user:
//! Debian's Squid in intercept mode on a proxy host beside the gateway,
//! with `vpn-identity-helper` asking the identity feed who holds a client
//! address. The proxy's health decides per policy: fail open (direct) or
//! fail closed (dropped).
//!
//! ```text
//! client  (alice) ─┐                      ┌─ lan0 ─ web server 198.18.2.2:80
//!                  gateway 198.18.1.1 ────┤
//! client2 (bob)  ──┘                      └─ px0 198.18.5.1 ─ proxy 198.18.5.2
//!                                              (Squid :3129 intercept, nft redirect :80)
//! ```

use std::{
    io::{Read as _, Write as _},
    net::TcpListener,
    process::{Child, Command, Stdio},
    sync::{Arc, Mutex},
    time::Duration,
};

use vpn_tests::*;

const SECRET: &str = "proxy-feed-secret-0123456789";
const PROXY: &str = "198.18.5.2";
const WEB: &str = "198.18.2.2";

/// alice fails open, bob fails closed.
const OPEN: TestUser<'static> = TestUser {
    name: "alice",
    password: "alice-pw",
    group_policy: Some("web-open"),
};
const CLOSED: TestUser<'static> = TestUser {
    name: "bob",
    password: "bob-pw",
    group_policy: Some("web-closed"),
};

fn gateway_config() -> String {
    format!(
        r#"[identity_feed]
enabled = true
listen = "198.18.5.1:9443"
secret = "{SECRET}"

[[web_proxy]]
name = "squid"
address = "{PROXY}"
probe_port = 3129
interval_ms = 300
failures = 2

[[group_policy]]
name = "web-open"
web_proxy = "squid"
web_ports = [80]
web_proxy_pac_url = "http://{PROXY}:3128/proxy.pac"

[[group_policy]]
name = "web-closed"
web_proxy = "squid"
web_ports = [80]
web_proxy_down = "closed"
"#
    )
}

/// The web server: answers every request with "web-ok", and remembers
/// who connected (bounded: it stops with the test).
struct Web {
    seen: Arc<Mutex<Vec<String>>>,
}

impl Web {
    fn start(topo: &Topology) -> Web {
        let l = in_netns(&topo.server, || TcpListener::bind(format!("{WEB}:80"))).unwrap();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let s = seen.clone();
        std::thread::spawn(move || {
            for c in l.incoming().take(200) {
                let Ok(mut c) = c else { continue };
                if let Ok(peer) = c.peer_addr() {
                    s.lock().unwrap().push(peer.ip().to_string());
                }
                let _ = c.set_read_timeout(Some(Duration::from_secs(2)));
                let mut buf = [0u8; 2048];
                let _ = c.read(&mut buf);
                let _ = c.write_all(
                    b"HTTP/1.1 200 OK\r\nContent-Length: 7\r\nConnection: close\r\n\r\nweb-ok\n",
                );
            }
        });
        Web { seen }
    }

    fn last_peer(&self) -> Option<String> {
        self.seen.lock().unwrap().last().cloned()
    }
}

/// Squid in intercept mode in the proxy namespace, with the helper.
struct Squid {
    child: Option<Child>,
    dir: TempDir,
    ns: Netns,
}

impl Squid {
    /// The proxy host: wired to the gateway, routes back through it, and
    /// port 80 redirected to Squid's intercepting port.
    fn host(topo: &Topology) -> Netns {
        let ns = Netns::new(format!("vgt-{}-p", topo.id)).unwrap();
        ns.ip(&[
            "link",
            "add",
            "eth0",
            "type",
            "veth",
            "peer",
            "name",
            "px0",
            "netns",
            &topo.gw.name,
        ])
        .unwrap();
        ns.ip(&["addr", "add", &format!("{PROXY}/24"), "dev", "eth0"])
            .unwrap();
        ns.ip(&["link", "set", "eth0", "up"]).unwrap();
        ns.ip(&["link", "set", "lo", "up"]).unwrap();
        topo.gw
            .ip(&["addr", "add", "198.18.5.1/24", "dev", "px0"])
            .unwrap();
        topo.gw.ip(&["link", "set", "px0", "up"]).unwrap();
        for net in [POOL, "198.18.2.0/24"] {
            ns.ip(&["route", "add", net, "via", "198.18.5.1"]).unwrap();
        }
        // Squid's own connections to the web server, and their answers.
        topo.server
            .ip(&["route", "add", "198.18.5.0/24", "via", GW_INSIDE])
            .unwrap();
        // The proxy's answers to clients come in on px0 with the web
        // server's address, which the gateway routes out of lan0.
        for dev in ["all", "px0"] {
            topo.gw
                .sysctl(&format!("net.ipv4.conf.{dev}.rp_filter"), "0")
                .unwrap();
        }
        let mut nft = ns
            .cmd("nft")
            .args(["-f", "-"])
            .stdin(Stdio::piped())
            .spawn()
            .unwrap();
        nft.stdin
            .take()
            .unwrap()
            .write_all(
                b"table ip intercept {\n chain pre {\n  type nat hook prerouting priority dstnat;\n  \
                  iifname \"eth0\" tcp dport 80 redirect to :3129\n }\n}\n",
            )
            .unwrap();
        assert!(nft.wait().unwrap().success());
        ns
    }

    /// Squid on proxy host `ns`, its helper trusting the gateway's `pin`.
    fn start(ns: Netns, pin: &str) -> Squid {
        let dir = TempDir::new("squid").unwrap();
        let d = dir.path();
        // Squid runs as `proxy`: the directory, the helper and the secret
        // must be its to reach.
        std::fs::copy(bin_dir().join("vpn-identity-helper"), d.join("helper")).unwrap();
        std::fs::write(d.join("secret"), SECRET).unwrap();
        std::fs::write(
            d.join("squid.conf"),
            format!(
                "http_port {PROXY}:3128\n\
                 http_port {PROXY}:3129 intercept\n\
                 visible_hostname vgt-proxy\n\
                 dns_nameservers 198.18.5.1\n\
                 pid_filename {d}/squid.pid\n\
                 access_log stdio:{d}/access.log squid\n\
                 cache_log {d}/cache.log\n\
                 cache_store_log none\n\
                 coredump_dir {d}\n\
                 cache deny all\n\
                 cache_effective_user proxy\n\
                 shutdown_lifetime 1 seconds\n\
                 external_acl_type vpn_user ttl=1 negative_ttl=1 children-max=1 concurrency=10 %SRC {d}/helper --feed https://198.18.5.1:9443 --pin {pin} --secret-file {d}/secret\n\
                 acl vpn_users external vpn_user\n\
                 http_access allow vpn_users\n\
                 http_access deny all\n",
                d = d.display()
            ),
        )
        .unwrap();
        sh(Command::new("chown").args(["-R", "proxy:proxy"]).arg(d)).unwrap();
        sh(Command::new("chmod").args(["0755"]).arg(d)).unwrap();
        let mut s = Squid {
            child: None,
            dir,
            ns,
        };
        s.run();
        s
    }

    /// Starts squid and waits until it accepts connections.
    fn run(&mut self) {
        let conf = self.dir.path().join("squid.conf");
        let log = std::fs::File::create(self.dir.path().join("squid.out")).unwrap();
        let child = self
            .ns
            .cmd("squid")
            .args(["-N", "-f"])
            .arg(&conf)
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        self.child = Some(child);
        let ns = self.ns.name.clone();
        let up = wait_for(Duration::from_secs(20), || {
            let ok = Command::new("ip")
                .args(["netns", "exec", &ns, "bash", "-c"])
                .arg(format!("exec 3<>/dev/tcp/{PROXY}/3129"))
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success());
            ok.then_some(())
        });
        assert!(up.is_some(), "squid did not start:\n{}", self.logs());
    }

    fn stop(&mut self) {
        if let Some(c) = &mut self.child.take() {
            stop_child(c);
        }
    }

    fn access_log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("access.log")).unwrap_or_default()
    }

    fn logs(&self) -> String {
        let r = |f: &str| std::fs::read_to_string(self.dir.path().join(f)).unwrap_or_default();
        format!("{}{}{}", r("squid.out"), r("cache.log"), self.access_log())
    }
}

impl Drop for Squid {
    fn drop(&mut self) {
        self.stop();
    }
}

/// `curl http://WEB/` from `ns` through the tunnel: the body, or None.
fn fetch(ns: &Netns) -> Option<String> {
    let out = ns
        .cmd("curl")
        .args(["-s", "--max-time", "3", &format!("http://{WEB}/")])
        .output()
        .ok()?;
    let body = String::from_utf8_lossy(&out.stdout).into_owned();
    (out.status.success() && !body.is_empty()).then_some(body)
}

/// Waits for `web_proxy_state` event number `n` (1-based) to say `state`.
fn wait_state(gw: &Gateway, n: usize, state: &str) {
    let got = wait_for(Duration::from_secs(10), || {
        let ev = gw.events_of("web_proxy_state");
        (ev.len() >= n).then(|| ev[n - 1]["state"].as_str().unwrap_or("").to_owned())
    });
    assert_eq!(got.as_deref(), Some(state), "{}", gw.log());
}

#[test]
fn web_traffic_goes_through_squid_which_logs_the_vpn_user_and_a_dead_proxy_fails_per_policy() {
    require_root();
    let topo = Topology::new().unwrap();
    let web = Web::start(&topo);
    let rest = gateway_config();
    // The proxy host exists before the gateway starts (its route needs
    // the network); Squid needs the gateway's pin, so it comes after.
    let proxy_host = Squid::host(&topo);
    let gw = Gateway::start_with(
        &topo,
        |d| {
            Gateway::base_config(
                d,
                &topo,
                &ConfigParts {
                    rest: &rest,
                    ..Default::default()
                },
            )
        },
        &[OPEN, CLOSED],
    );
    let gw = match gw {
        Ok(g) => g,
        Err(e) => panic!("{e:#}"),
    };
    let mut squid = Squid::start(proxy_host, &gw.pin);
    wait_state(&gw, 1, "up");

    let mut a = Client::start(&topo, &gw, OPEN.name, OPEN.password, &[]).unwrap();
    let env_a = a.wait_connected(Duration::from_secs(20)).unwrap();
    let addr_a = env_a["INTERNAL_IP4_ADDRESS"].clone();
    let mut b = Client::start_in(&topo.client2, &gw, CLOSED.name, CLOSED.password, &[]).unwrap();
    let env_b = b.wait_connected(Duration::from_secs(20)).unwrap();
    let addr_b = env_b["INTERNAL_IP4_ADDRESS"].clone();
    // The explicit way too, where the policy has one: a PAC URL pushed at
    // connect, which openconnect hands to its script.
    assert_eq!(
        env_a.get("CISCO_PROXY_PAC").map(String::as_str),
        Some("http://198.18.5.2:3128/proxy.pac")
    );
    assert_eq!(env_b.get("CISCO_PROXY_PAC"), None);

    // Through Squid: the web server sees the proxy, Squid logs the user.
    for (ns, addr, user) in [
        (&topo.client, &addr_a, "alice"),
        (&topo.client2, &addr_b, "bob"),
    ] {
        assert_eq!(
            fetch(ns).as_deref(),
            Some("web-ok\n"),
            "{user}: {}\n{}",
            squid.logs(),
            gw.log()
        );
        assert_eq!(
            web.last_peer().as_deref(),
            Some(PROXY),
            "{user} went direct"
        );
        let line = wait_for(Duration::from_secs(5), || {
            squid
                .access_log()
                .lines()
                .find(|l| l.contains(&format!(" {addr} ")) && l.contains(&format!("http://{WEB}/")))
                .map(str::to_owned)
        })
        .unwrap_or_else(|| panic!("no access log line for {addr}:\n{}", squid.logs()));
        assert!(
            line.split_whitespace().any(|w| w == user),
            "Squid did not log {user}: {line}"
        );
    }

    // The proxy goes down: alice's policy fails open (direct, the server
    // sees her VPN address), bob's fails closed (dropped, counted).
    squid.stop();
    wait_state(&gw, 2, "down");
    // What an admin sees: vpnctl and the metrics.
    let rows: serde_json::Value =
        serde_json::from_str(&gw.vpnctl(&["web-proxies", "--json"]).unwrap()).unwrap();
    assert_eq!(rows[0]["name"], "squid", "{rows}");
    assert_eq!(rows[0]["state"], "down", "{rows}");
    assert!(rows[0]["probes_failed"].as_u64().unwrap() >= 2, "{rows}");
    let metric = |line: &str| {
        let out = topo
            .gw
            .cmd("curl")
            .args(["-s", "--max-time", "3", "http://127.0.0.1:9810/metrics"])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .find(|l| l.starts_with(line))
            .map(str::to_owned)
    };
    assert_eq!(
        metric("vpn_web_proxy_up{").as_deref(),
        Some("vpn_web_proxy_up{proxy=\"squid\"} 0")
    );
    let changes = metric("vpn_identity_changes_total ").unwrap();
    assert!(changes.ends_with(" 2"), "alice and bob mapped: {changes}");
    assert_eq!(fetch(&topo.client).as_deref(), Some("web-ok\n"));
    assert_eq!(web.last_peer().as_deref(), Some(addr_a.as_str()));
    let before = gw.drops("web-proxy-down").unwrap();
    assert_eq!(fetch(&topo.client2), None, "bob's policy fails closed");
    assert!(gw.drops("web-proxy-down").unwrap() > before);

    // Back up: through Squid again.
    squid.run();
    wait_state(&gw, 3, "up");
    assert_eq!(
        metric("vpn_web_proxy_up{").as_deref(),
        Some("vpn_web_proxy_up{proxy=\"squid\"} 1")
    );
    assert_eq!(fetch(&topo.client2).as_deref(), Some("web-ok\n"));
    assert_eq!(web.last_peer().as_deref(), Some(PROXY));

    // After alice disconnects, her address maps to nobody.
    let (code, body) = feed_get(&squid.ns, &format!("/v1/mappings/{addr_a}"));
    assert_eq!(code, 200, "{body}");
    assert!(body.contains("\"user\":\"alice\""), "{body}");
    gw.vpnctl(&["disconnect", "alice"]).unwrap();
    assert_eq!(
        feed_get(&squid.ns, &format!("/v1/mappings/{addr_a}")).0,
        404
    );
    drop(a);
    drop(b);

    // The proxy's rule and route go with the gateway.
    let rules = |gw_ns: &Netns| String::from_utf8(gw_ns.ip(&["rule"]).unwrap().stdout).unwrap();
    assert!(rules(&topo.gw).contains("7084:"), "{}", rules(&topo.gw));
    let mut gw = gw;
    gw.stop();
    assert!(!rules(&topo.gw).contains("7084:"), "{}", rules(&topo.gw));
    let table = topo.gw.ip(&["route", "show", "table", "7116"]).unwrap();
    assert!(
        table.stdout.is_empty(),
        "{}",
        String::from_utf8_lossy(&table.stdout)
    );
}

/// `GET path` on the identity feed from the proxy host.
fn feed_get(ns: &Netns, path: &str) -> (u16, String) {
    let out = ns
        .cmd("curl")
        .args(["-sk", "--max-time", "3", "-w", "\n%{http_code}"])
        .args(["-H", &format!("Authorization: Bearer {SECRET}")])
        .arg(format!("https://198.18.5.1:9443{path}"))
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", "0"));
    (code.trim().parse().unwrap_or(0), body.to_owned())
}
