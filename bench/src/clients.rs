//! Many clients at once: aggregate iperf3 throughput and the gateway's CPU
//! per GB with 1, 4 and 16 concurrent openconnect clients over DTLS, each
//! in its own namespace with its own link to the gateway, vpnd against
//! ocserv 1.1.6 in the same run (`cargo xtask bench clients`).

use std::{fmt::Write as _, time::Duration};

use anyhow::Context as _;
use vpn_tests::{
    Client, ConfigParts, GW_OUTSIDE, Gateway, Netns, SERVER, TestUser, Topology, iperf3_json,
};

use crate::{
    ocserv::{Ocserv, Setup, crypt},
    tunnel::{cpu_ticks, ticks_per_sec},
};

const PASSWORD: &str = "bench-password";
const SECS: u32 = 5;
const COUNTS: [usize; 3] = [1, 4, 16];

/// `n` client namespaces, each with a veth to the gateway namespace
/// (198.18.16+i.0/24) and a route to the gateway's outside address.
fn client_namespaces(topo: &Topology, n: usize) -> anyhow::Result<Vec<Netns>> {
    let mut v = Vec::new();
    for i in 0..n {
        let ns = Netns::new(format!("vgt-{}-k{i}", topo.id))?;
        let up = format!("upk{i}");
        ns.ip(&[
            "link",
            "add",
            "eth0",
            "type",
            "veth",
            "peer",
            "name",
            &up,
            "netns",
            &topo.gw.name,
        ])?;
        let net = 16 + i;
        ns.ip(&["addr", "add", &format!("198.18.{net}.2/24"), "dev", "eth0"])?;
        ns.ip(&["link", "set", "eth0", "up"])?;
        ns.ip(&[
            "route",
            "add",
            "198.18.1.0/24",
            "via",
            &format!("198.18.{net}.1"),
        ])?;
        topo.gw
            .ip(&["addr", "add", &format!("198.18.{net}.1/24"), "dev", &up])?;
        topo.gw.ip(&["link", "set", &up, "up"])?;
        v.push(ns);
    }
    Ok(v)
}

/// Aggregate Mbit/s and gateway CPU s per GB of `n` clients at once.
struct Cell {
    mbps: f64,
    cpu_per_gb: f64,
}

fn measure(topo: &Topology, clients: &[Netns], gw_pid: u32, reverse: bool) -> anyhow::Result<Cell> {
    let t0 = cpu_ticks(gw_pid);
    let results: Vec<anyhow::Result<serde_json::Value>> = std::thread::scope(|s| {
        let handles: Vec<_> = clients
            .iter()
            .enumerate()
            .map(|(i, ns)| {
                s.spawn(move || {
                    let args: &[&str] = if reverse { &["-R"] } else { &[] };
                    iperf3_json(ns, &topo.server, SERVER, 5301 + i as u16, SECS, args)
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("iperf3 thread"))
            .collect()
    });
    let t1 = cpu_ticks(gw_pid);
    let (mut bytes, mut bps) = (0.0, 0.0);
    for r in results {
        let v = r?;
        bytes += v["end"]["sum_received"]["bytes"]
            .as_f64()
            .context("iperf3 result")?;
        bps += v["end"]["sum_received"]["bits_per_second"]
            .as_f64()
            .context("iperf3 result")?;
    }
    let cpu = (t1 - t0) as f64 / ticks_per_sec();
    Ok(Cell {
        mbps: bps / 1e6,
        cpu_per_gb: cpu / (bytes / 1e9).max(f64::MIN_POSITIVE),
    })
}

/// Connects one openconnect per namespace (DTLS up), then measures up and
/// down.
fn run_clients(
    topo: &Topology,
    clients: &[Netns],
    pin: &str,
    gw_pid: u32,
    user: impl Fn(usize) -> String,
) -> anyhow::Result<(Cell, Cell)> {
    let mut running = Vec::new();
    for (i, ns) in clients.iter().enumerate() {
        let mut c = Client::start_at(ns, pin, GW_OUTSIDE, &user(i), PASSWORD, &[])?;
        c.wait_connected(Duration::from_secs(30))?;
        c.wait_dtls(Duration::from_secs(15))?;
        running.push(c);
    }
    let up = measure(topo, clients, gw_pid, false)?;
    let down = measure(topo, clients, gw_pid, true)?;
    drop(running);
    Ok((up, down))
}

fn vpnd(n: usize) -> anyhow::Result<(Cell, Cell)> {
    let topo = Topology::new()?;
    let clients = client_namespaces(&topo, n)?;
    let names: Vec<String> = (0..n).map(|i| format!("bench{i}")).collect();
    let users = TestUser::all(&names, PASSWORD);
    let gw = Gateway::start(
        &topo,
        ConfigParts {
            server: "max_sessions = 32",
            tunnel: "mtu = 1472",
            rest: "[client_routing]\nmode = \"include\"\nsubnets = [\"198.18.2.0/24\"]\n",
        },
        &users,
    )?;
    let pid = gw.pid().context("vpnd pid")?;
    run_clients(&topo, &clients, &gw.pin, pid, |i| names[i].clone())
}

fn ocserv(n: usize) -> anyhow::Result<(Cell, Cell)> {
    let topo = Topology::new()?;
    let clients = client_namespaces(&topo, n)?;
    let oc = Ocserv::start(
        &topo,
        &Setup {
            passwd: format!("bench:*:{}\n", crypt("-6", PASSWORD)?),
            max_clients: 32,
            network: ("198.19.0.0", "255.255.255.0"),
            rate_limit_ms: 0,
            occtl: false,
        },
    )?;
    run_clients(&topo, &clients, &oc.pin, oc.child.id(), |_| "bench".into())
}

pub fn run() -> anyhow::Result<String> {
    anyhow::ensure!(
        std::path::Path::new("/usr/sbin/ocserv").exists(),
        "ocserv is not installed (apt-get install ocserv)"
    );
    let mut out = String::new();
    writeln!(out, "# Many clients: vpnd against ocserv\n")?;
    writeln!(
        out,
        "1, 4 and 16 openconnect clients at once, each in its own namespace with its own link to the gateway, DTLS (PSK-NEGOTIATE), one iperf3 TCP flow per client for {SECS} s per direction, all at the same time; the iperf3 servers behind the gateway. Aggregate throughput, and the gateway's CPU (utime+stime of all its processes) per GB moved. One run; a 2-core VM where a single run varies by 15-20%.\n"
    )?;
    writeln!(
        out,
        "| clients | direction | vpnd Mbit/s | ocserv Mbit/s | throughput ratio | vpnd CPU s/GB | ocserv CPU s/GB | CPU ratio |"
    )?;
    writeln!(out, "|---:|---|---:|---:|---:|---:|---:|---:|")?;
    for n in COUNTS {
        let (vu, vd) = vpnd(n)?;
        let (ou, od) = ocserv(n)?;
        for (dir, v, o) in [("up", &vu, &ou), ("down", &vd, &od)] {
            writeln!(
                out,
                "| {n} | {dir} | {:.0} | {:.0} | {:.2} | {:.2} | {:.2} | {:.2} |",
                v.mbps,
                o.mbps,
                v.mbps / o.mbps.max(f64::MIN_POSITIVE),
                v.cpu_per_gb,
                o.cpu_per_gb,
                v.cpu_per_gb / o.cpu_per_gb.max(f64::MIN_POSITIVE),
            )?;
            eprintln!(
                "{n} clients {dir}: vpnd {:.0} Mbit/s, ocserv {:.0}",
                v.mbps, o.mbps
            );
        }
    }
    Ok(out)
}
