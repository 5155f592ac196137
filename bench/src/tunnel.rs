//! Throughput and CPU through the tunnel, vpnd against ocserv 1.1.6, same
//! namespace topology, same openconnect client, in one run: iperf3 TCP both
//! directions over DTLS and over TLS. CPU is utime+stime of the gateway's
//! processes (ocserv: main, sec-mod and workers) from /proc, divided by the
//! bytes moved.

use std::{fmt::Write as _, path::Path, time::Duration};

use anyhow::{Context as _, bail};
use vpn_tests::{Client, ConfigParts, Gateway, SERVER, TestUser, Topology, iperf3_json};

use crate::ocserv::{Ocserv, Setup, crypt};

const USER: &str = "bench";
const PASSWORD: &str = "bench-password";
const SECS: u32 = 5;

/// Clock ticks of a process and all its descendants.
pub(crate) fn cpu_ticks(root: u32) -> u64 {
    crate::load::process_tree(root).iter().map(|(_, t)| t).sum()
}

pub(crate) fn ticks_per_sec() -> f64 {
    // SAFETY: sysconf has no preconditions.
    (unsafe { libc::sysconf(libc::_SC_CLK_TCK) }) as f64
}

/// One measurement: bits/s, gateway CPU seconds per GB, and the share of
/// datagrams the client's UDP socket dropped (buffer full).
struct Cell {
    mbps: f64,
    cpu_per_gb: f64,
    client_udp_drop_pct: f64,
}

impl Cell {
    const ZERO: Cell = Cell {
        mbps: 0.0,
        cpu_per_gb: 0.0,
        client_udp_drop_pct: 0.0,
    };
}

/// The client namespace's UDP datagrams received and dropped for a full
/// socket buffer.
fn client_udp(topo: &Topology) -> anyhow::Result<(u64, u64)> {
    Ok((
        topo.client.nstat("UdpInDatagrams")?,
        topo.client.nstat("UdpRcvbufErrors")?,
    ))
}

fn measure(topo: &Topology, gw_pid: u32, reverse: bool) -> anyhow::Result<Cell> {
    let t0 = cpu_ticks(gw_pid);
    let (in0, drop0) = client_udp(topo)?;
    // VPN_BENCH_IPERF3_ARGS adds client options, e.g. "-w 32K" for a
    // window-limited flow.
    let extra = std::env::var("VPN_BENCH_IPERF3_ARGS").unwrap_or_default();
    let mut args: Vec<&str> = extra.split_whitespace().collect();
    if reverse {
        args.push("-R");
    }
    let v = iperf3_json(&topo.client, &topo.server, SERVER, 5201, SECS, &args)?;
    let t1 = cpu_ticks(gw_pid);
    let (in1, drop1) = client_udp(topo)?;
    let (got, dropped) = ((in1 - in0) as f64, (drop1 - drop0) as f64);
    let bytes = v["end"]["sum_received"]["bytes"]
        .as_f64()
        .context("iperf3 result")?;
    let bps = v["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .context("iperf3 result")?;
    let cpu = (t1 - t0) as f64 / ticks_per_sec();
    Ok(Cell {
        mbps: bps / 1e6,
        cpu_per_gb: cpu / (bytes / 1e9),
        client_udp_drop_pct: 100.0 * dropped / (got + dropped).max(1.0),
    })
}

/// Runs the four measurements against a running gateway.
fn run_gateway(
    topo: &Topology,
    pin: &str,
    gw_pid: u32,
    dtls: bool,
) -> anyhow::Result<(Cell, Cell)> {
    let extra: &[&str] = if dtls { &[] } else { &["--no-dtls"] };
    let mut c = Client::start_pinned(&topo.client, pin, USER, PASSWORD, extra)?;
    c.wait_connected(Duration::from_secs(20))?;
    if dtls {
        c.wait_dtls(Duration::from_secs(15))?;
    }
    let up = measure(topo, gw_pid, false)?;
    let down = measure(topo, gw_pid, true)?;
    drop(c);
    Ok((up, down))
}

fn vpnd(dtls: bool) -> anyhow::Result<(Cell, Cell)> {
    let topo = Topology::new()?;
    let gw = Gateway::start(
        &topo,
        ConfigParts {
            // The MTUs ocserv picks on these 1500-byte links, 1434 over
            // DTLS (vpnd takes its DTLS overhead off the same way) and 1472
            // over TLS, so both gateways move the same bytes per packet.
            tunnel: "mtu = 1472",
            rest: "[client_routing]\nmode = \"include\"\nsubnets = [\"198.18.2.0/24\"]\n",
            ..Default::default()
        },
        &[TestUser {
            name: USER,
            password: PASSWORD,
            group_policy: None,
        }],
    )?;
    let pid = gw.pid().context("vpnd pid")?;
    run_gateway(&topo, &gw.pin, pid, dtls)
}

fn ocserv(dtls: bool) -> anyhow::Result<(Cell, Cell)> {
    let topo = Topology::new()?;
    let oc = Ocserv::start(
        &topo,
        &Setup {
            passwd: format!("{USER}:*:{}\n", crypt("-6", PASSWORD)?),
            max_clients: 16,
            network: ("198.19.0.0", "255.255.255.0"),
            rate_limit_ms: 100,
            occtl: false,
        },
    )?;
    run_gateway(&topo, &oc.pin, oc.child.id(), dtls)
}

/// Rounds per transport (`VPN_BENCH_ROUNDS`, 1 to 9; default 3): vpnd and
/// ocserv alternate, and the table shows medians, so one slow run of
/// either side does not decide a ratio.
fn rounds() -> anyhow::Result<usize> {
    match std::env::var("VPN_BENCH_ROUNDS") {
        Err(_) => Ok(3),
        Ok(v) => match v.parse::<usize>() {
            Ok(n @ 1..=9) => Ok(n),
            _ => bail!("VPN_BENCH_ROUNDS={v:?}: use a number from 1 to 9"),
        },
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// Per-round values of one ratio, for the spread column.
fn per_round(a: &[Cell], b: &[Cell], f: impl Fn(&Cell) -> f64) -> String {
    a.iter()
        .zip(b)
        .map(|(x, y)| format!("{:.2}", f(x) / f(y)))
        .collect::<Vec<_>>()
        .join(" ")
}

pub fn run() -> anyhow::Result<String> {
    if !Path::new("/usr/sbin/ocserv").exists() {
        bail!("ocserv is not installed (apt-get install ocserv)");
    }
    let rounds = rounds()?;
    let mut out = String::new();
    writeln!(out, "# Tunnel throughput and CPU: vpnd against ocserv\n")?;
    writeln!(
        out,
        "iperf3 TCP for {SECS} s per direction through the tunnel, openconnect 9.01 in a client namespace, the gateway in its own namespace, the iperf3 server behind it. Both gateways give the client the same tunnel MTU (1434 over DTLS, 1472 over TLS). CPU = utime+stime of the gateway's processes per GB moved. Client UDP drops = datagrams the client's socket dropped for a full buffer, as a share of all that reached it (the DTLS download's weak point: openconnect's socket holds about 90 datagrams). {rounds} rounds per transport, vpnd and ocserv alternating; medians, and each round's ratio to show the spread (a 2-core VM where the same build varies by 15-20% from run to run).\n"
    )?;
    writeln!(
        out,
        "| transport | direction | vpnd Mbit/s | ocserv Mbit/s | throughput ratio | vpnd CPU s/GB | ocserv CPU s/GB | CPU ratio | throughput ratio per round | CPU ratio per round | client UDP drops vpnd | client UDP drops ocserv |"
    )?;
    writeln!(
        out,
        "|---|---|---:|---:|---:|---:|---:|---:|---|---|---:|---:|"
    )?;
    // VPN_BENCH_ONLY=vpnd-dtls (or ocserv-tls, ...) runs one gateway and
    // transport, for profiling; the table then has zeros for the rest.
    let only = std::env::var("VPN_BENCH_ONLY").ok();
    let wanted = |gw: &str, dtls: bool| {
        only.as_deref()
            .is_none_or(|o| o == format!("{gw}-{}", if dtls { "dtls" } else { "tls" }))
    };
    for dtls in [true, false] {
        if !wanted("vpnd", dtls) && !wanted("ocserv", dtls) {
            continue;
        }
        // [up, down] cells per round.
        let (mut v, mut o): ([Vec<Cell>; 2], [Vec<Cell>; 2]) = Default::default();
        for _ in 0..rounds {
            let (vu, vd) = if wanted("vpnd", dtls) {
                vpnd(dtls)?
            } else {
                (Cell::ZERO, Cell::ZERO)
            };
            let (ou, od) = if wanted("ocserv", dtls) {
                ocserv(dtls)?
            } else {
                (Cell::ZERO, Cell::ZERO)
            };
            v[0].push(vu);
            v[1].push(vd);
            o[0].push(ou);
            o[1].push(od);
        }
        for (k, dir) in ["up", "down"].into_iter().enumerate() {
            let (vs, os) = (&v[k], &o[k]);
            let vm = median(vs.iter().map(|c| c.mbps).collect());
            let om = median(os.iter().map(|c| c.mbps).collect());
            let vc = median(vs.iter().map(|c| c.cpu_per_gb).collect());
            let oc = median(os.iter().map(|c| c.cpu_per_gb).collect());
            let vd = median(vs.iter().map(|c| c.client_udp_drop_pct).collect());
            let od = median(os.iter().map(|c| c.client_udp_drop_pct).collect());
            writeln!(
                out,
                "| {} | {dir} | {vm:.0} | {om:.0} | {:.2} | {vc:.2} | {oc:.2} | {:.2} | {} | {} | {vd:.1}% | {od:.1}% |",
                if dtls { "DTLS" } else { "TLS" },
                vm / om,
                vc / oc,
                per_round(vs, os, |c| c.mbps),
                per_round(vs, os, |c| c.cpu_per_gb),
            )?;
        }
    }
    Ok(out)
}
