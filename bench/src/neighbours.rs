//! Neighbours: does one client's bulk download raise another client's
//! latency? Alice downloads over DTLS as fast as her openconnect takes it
//! (her window is full all along: the gateway holds her packets for her
//! ACKs); Bob pings the server through his own tunnel meanwhile, 10 ms
//! apart. On vpnd Bob is made to share Alice's packet worker (he
//! reconnects until the kernel gives him her socket), the case where a
//! worker that stopped reading at each of her holds kept his replies
//! waiting; ocserv gives each client a process of its own. vpnd against
//! ocserv in the same run (`cargo xtask bench neighbours`).

use std::{fmt::Write as _, time::Duration};

use anyhow::Context as _;
use vpn_tests::{
    Client, ConfigParts, GW_OUTSIDE, Gateway, SERVER, TestUser, Topology, iperf3, quantile,
};

use crate::ocserv::{Ocserv, Setup, crypt};

const PASSWORD: &str = "bench-password";
/// Bob's pings in each phase, 10 ms apart.
const PINGS: u32 = 300;
/// Alice's download: long enough to cover Bob's pings after a start.
const DOWNLOAD_SECS: u32 = 6;
const ROUNDS: usize = 3;

/// Bob's round-trip times idle and during Alice's download, her Mbit/s.
struct Phase {
    idle: Vec<f64>,
    busy: Vec<f64>,
    alice_mbps: f64,
}

/// Bob's pings alone, then during Alice's download.
fn phase(topo: &Topology) -> anyhow::Result<Phase> {
    let idle = topo.client2.ping_times(SERVER, PINGS)?;
    let (busy, down) = std::thread::scope(|s| {
        let down = s.spawn(|| iperf3(&topo.client, &topo.server, SERVER, DOWNLOAD_SECS, true));
        std::thread::sleep(Duration::from_millis(1500));
        let busy = topo.client2.ping_times(SERVER, PINGS);
        (busy, down.join().expect("iperf3 thread"))
    });
    Ok(Phase {
        idle,
        busy: busy?,
        alice_mbps: down? / 1e6,
    })
}

fn vpnd() -> anyhow::Result<Vec<Phase>> {
    let topo = Topology::new()?;
    let users = TestUser::all(&["alice", "bob"], PASSWORD);
    let gw = Gateway::start(
        &topo,
        ConfigParts {
            tunnel: "mtu = 1472",
            ..Default::default()
        },
        &users,
    )?;
    let _clients = gw.dtls_pair(&topo, ("alice", PASSWORD), ("bob", PASSWORD), &[], true)?;
    let phases = (0..ROUNDS).map(|_| phase(&topo)).collect();
    let fc = &gw.stats()?["dtls_flow_control"];
    eprintln!("vpnd flow control after the rounds: {fc}");
    phases
}

fn ocserv() -> anyhow::Result<Vec<Phase>> {
    let topo = Topology::new()?;
    let hash = crypt("-6", PASSWORD)?;
    let oc = Ocserv::start(
        &topo,
        &Setup {
            passwd: format!("alice:*:{hash}\nbob:*:{hash}\n"),
            max_clients: 8,
            network: ("198.19.0.0", "255.255.255.0"),
            rate_limit_ms: 0,
            occtl: false,
        },
    )?;
    let mut clients = Vec::new();
    for (ns, user) in [(&topo.client, "alice"), (&topo.client2, "bob")] {
        let mut c = Client::start_at(ns, &oc.pin, GW_OUTSIDE, user, PASSWORD, &[])?;
        c.wait_connected(Duration::from_secs(30))
            .with_context(|| oc.log())?;
        c.wait_dtls(Duration::from_secs(15))?;
        clients.push(c);
    }
    (0..ROUNDS).map(|_| phase(&topo)).collect()
}

pub fn run() -> anyhow::Result<String> {
    anyhow::ensure!(
        std::path::Path::new("/usr/sbin/ocserv").exists(),
        "ocserv is not installed (apt-get install ocserv)"
    );
    let v = vpnd()?;
    let o = ocserv()?;
    let mut out = String::new();
    writeln!(
        out,
        "# Neighbours: one client's download, another's latency\n"
    )?;
    writeln!(
        out,
        "Alice downloads over DTLS (iperf3 -R, one TCP flow, {DOWNLOAD_SECS} s) as fast as her openconnect takes it, so her window is full throughout; Bob pings the server through his own tunnel, {PINGS} pings 10 ms apart, first alone, then from 1.5 s into her download. On vpnd Bob shares Alice's packet worker (he reconnected until the kernel gave him her socket). {ROUNDS} rounds per gateway, vpnd then ocserv; everything (gateway, both openconnects, iperf3) on this 2-core VM. Bob's round-trip time in ms, quantiles over all rounds.\n"
    )?;
    writeln!(
        out,
        "| gateway | Alice Mbit/s (median) | Bob idle p50 | p90 | p99 | Bob during p50 | p90 | p99 | p50 during/idle |"
    )?;
    writeln!(out, "|---|---:|---:|---:|---:|---:|---:|---:|---:|")?;
    let mut row = |name: &str, phases: &[Phase]| -> anyhow::Result<(f64, f64)> {
        let all = |f: &dyn Fn(&Phase) -> &Vec<f64>| {
            let mut v: Vec<f64> = phases.iter().flat_map(|p| f(p).iter().copied()).collect();
            v.sort_by(f64::total_cmp);
            v
        };
        let (idle, busy) = (all(&|p| &p.idle), all(&|p| &p.busy));
        let mut mbps: Vec<f64> = phases.iter().map(|p| p.alice_mbps).collect();
        mbps.sort_by(f64::total_cmp);
        let q = |v: &[f64], x| quantile(v, x);
        writeln!(
            out,
            "| {name} | {:.0} | {:.3} | {:.3} | {:.3} | {:.3} | {:.3} | {:.3} | {:.2} |",
            q(&mbps, 0.5),
            q(&idle, 0.5),
            q(&idle, 0.9),
            q(&idle, 0.99),
            q(&busy, 0.5),
            q(&busy, 0.9),
            q(&busy, 0.99),
            q(&busy, 0.5) / q(&idle, 0.5).max(f64::MIN_POSITIVE)
        )?;
        Ok((q(&busy, 0.5), q(&busy, 0.99)))
    };
    let (v50, v99) = row("vpnd", &v)?;
    let (o50, o99) = row("ocserv", &o)?;
    writeln!(
        out,
        "\nBob's latency during Alice's download, vpnd / ocserv: p50 {:.2}, p99 {:.2}.",
        v50 / o50.max(f64::MIN_POSITIVE),
        v99 / o99.max(f64::MIN_POSITIVE)
    )?;
    Ok(out)
}
