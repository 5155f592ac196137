//! The Prometheus endpoint, scraped during real traffic and parsed with a
//! Prometheus text parser: sessions, bytes, logins by result, rule hits,
//! latency histograms and process figures are there and move.

use std::{
    io::{Read as _, Write as _},
    time::Duration,
};

use vpn_tests::*;

const METRICS: &str = "198.18.1.1:9810";

/// `GET path` on the endpoint from the client namespace: status line and
/// body.
fn get(topo: &Topology, path: &str) -> (String, String) {
    let path = path.to_owned();
    in_netns(&topo.client, move || {
        let mut s = std::net::TcpStream::connect(METRICS).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        write!(s, "GET {path} HTTP/1.1\r\nHost: gw\r\n\r\n").unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).unwrap();
        let (head, body) = out.split_once("\r\n\r\n").unwrap();
        (head.lines().next().unwrap().to_owned(), body.to_owned())
    })
}

fn scrape(topo: &Topology) -> prometheus_parse::Scrape {
    let (status, body) = get(topo, "/metrics");
    assert!(status.contains("200"), "{status}");
    if std::env::var_os("VPN_TEST_SHOW_METRICS").is_some() {
        eprintln!("{body}");
    }
    prometheus_parse::Scrape::parse(body.lines().map(|l| Ok(l.to_owned()))).unwrap()
}

/// The value of `name` whose labels include all of `labels`, summed.
fn value(s: &prometheus_parse::Scrape, name: &str, labels: &[(&str, &str)]) -> f64 {
    s.samples
        .iter()
        .filter(|m| m.metric == name)
        .filter(|m| labels.iter().all(|(k, v)| m.labels.get(k) == Some(*v)))
        .map(|m| match m.value {
            prometheus_parse::Value::Counter(v)
            | prometheus_parse::Value::Gauge(v)
            | prometheus_parse::Value::Untyped(v) => v,
            _ => 0.0,
        })
        .sum()
}

#[test]
fn metrics_show_sessions_traffic_logins_and_rule_hits() {
    require_root();
    let topo = Topology::new().unwrap();
    let gw = Gateway::start(
        &topo,
        ConfigParts {
            rest: &format!(
                "[metrics]\nlisten = \"{METRICS}\"\n\n\
                 [[group_policy]]\nname = \"staff\"\n\n\
                 [[group_policy.rule]]\naction = \"allow\"\nprotocol = \"icmp\"\ndestination = \"198.18.2.0/24\"\n\n\
                 [policy]\ndefault = \"staff\"\n"
            ),
            ..Default::default()
        },
        &[ALICE],
    )
    .unwrap();
    let before = scrape(&topo);
    assert_eq!(value(&before, "vpn_sessions", &[]), 0.0);

    let mut c = Client::start(&topo, &gw, ALICE.name, ALICE.password, &[]).unwrap();
    c.wait_connected(Duration::from_secs(20)).unwrap();
    assert!(topo.client.ping(SERVER, 3));
    let mut bad = Client::start_in(&topo.client2, &gw, "alice", "wrong", &[]).unwrap();
    bad.wait_exit(Duration::from_secs(20)).unwrap();

    let s = scrape(&topo);
    assert_eq!(value(&s, "vpn_sessions", &[("policy", "staff")]), 1.0);
    assert!(value(&s, "vpn_client_bytes_total", &[("direction", "in")]) >= 3.0 * 84.0);
    assert!(value(&s, "vpn_client_packets_total", &[("direction", "out")]) >= 3.0);
    assert_eq!(value(&s, "vpn_logins_total", &[("result", "success")]), 1.0);
    assert_eq!(
        value(&s, "vpn_logins_total", &[("result", "wrong password")]),
        1.0
    );
    assert!(
        value(
            &s,
            "vpn_policy_rule_hits_total",
            &[("policy", "staff"), ("rule", "1")]
        ) >= 3.0
    );
    assert!(value(&s, "vpn_login_seconds_count", &[]) >= 2.0);
    assert!(value(&s, "vpn_tls_handshake_seconds_count", &[]) >= 2.0);
    assert!(value(&s, "vpn_process_resident_memory_bytes", &[]) > 1e6);
    assert!(value(&s, "vpn_pool_addresses", &[("state", "in_use")]) >= 1.0);

    // Traffic counters count from start: they do not fall when the
    // session ends.
    let bytes = value(&s, "vpn_client_bytes_total", &[("direction", "in")]);
    drop(c);
    let after = wait_for(Duration::from_secs(10), || {
        let s = scrape(&topo);
        (value(&s, "vpn_sessions", &[]) == 0.0).then_some(s)
    })
    .unwrap();
    assert!(value(&after, "vpn_client_bytes_total", &[("direction", "in")]) >= bytes);

    let (status, _) = get(&topo, "/other");
    assert!(status.contains("404"), "{status}");

    // Every series the Grafana dashboard queries exists (uplinks and
    // RADIUS accounting only where configured).
    let dashboard = include_str!("../../examples/grafana/vpn-gateway.json");
    let names: std::collections::BTreeSet<&str> =
        s.samples.iter().map(|m| m.metric.as_str()).collect();
    let mut missing = Vec::new();
    for (i, _) in dashboard.match_indices("vpn_") {
        let name: String = dashboard[i..]
            .chars()
            .take_while(|c| c.is_ascii_lowercase() || *c == '_')
            .collect();
        // The parser folds a histogram's buckets into one sample.
        let name = name.strip_suffix("_bucket").unwrap_or(&name).to_owned();
        let conditional = name.starts_with("vpn_uplink_") || name.starts_with("vpn_radius_");
        if !conditional && !names.contains(name.as_str()) {
            missing.push(name);
        }
    }
    assert!(
        missing.is_empty(),
        "the dashboard queries {missing:?}, which the endpoint does not have"
    );
}
