//! Scale, vpnd against ocserv 1.1.6 in one run, driven by the load
//! generator (`load`) from a client namespace:
//!
//! - Held sessions: N clients (`VPN_BENCH_SESSIONS`, default 10,000) log
//!   in at `VPN_BENCH_RATE` per second (100) from 64 source addresses and
//!   hold their tunnels for `VPN_BENCH_HOLD` seconds (300) with keepalives
//!   and an echo through each tunnel every 30 s; the gateway's memory
//!   (PSS of its whole process tree) and CPU are sampled, and its admin
//!   command (`vpnctl sessions`, `occtl show users`) is timed every 10 s
//!   during the hold.
//! - Logins per second: a burst of `VPN_BENCH_BURST` logins (1,000), 32 in
//!   flight, with the same crypt SHA-512 hash on both gateways (ocserv's
//!   cost) and with vpnd's own argon2id.

use std::{
    fmt::Write as _,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use serde_json::Value;
use vpn_daemon::auth::users::{User, UserFile};
use vpn_tests::{ConfigParts, GW_INSIDE, GW_OUTSIDE, Gateway, Topology, bin_dir};

use crate::ocserv::{Ocserv, Setup, crypt};

pub const PASSWORD: &str = "scale-pw";
const SOURCES: u32 = 64;

pub fn env_or(name: &str, default: u64) -> anyhow::Result<u64> {
    match std::env::var(name) {
        Err(_) => Ok(default),
        Ok(v) => v
            .parse()
            .with_context(|| format!("{name}={v:?}: expected a whole number")),
    }
}

struct Params {
    sessions: u64,
    rate: u64,
    hold: u64,
    burst: u64,
}

/// The generator's source addresses, added to the client namespace.
pub fn sources(topo: &Topology) -> anyhow::Result<Vec<String>> {
    let v: Vec<String> = (0..SOURCES)
        .map(|i| format!("198.18.1.{}", 64 + i))
        .collect();
    for a in &v {
        topo.client
            .ip(&["addr", "add", &format!("{a}/24"), "dev", "eth0"])?;
    }
    Ok(v)
}

/// One generator run against the gateway `pid`; `admin` is timed every
/// 10 s from the hold's start to its end.
struct Run<'a> {
    topo: &'a Topology,
    sources: &'a [String],
    pid: u32,
    sessions: u64,
    rate: u64,
    hold: u64,
    in_flight: u64,
    echo: bool,
    /// Each client opens a DTLS channel too (PSK-NEGOTIATE) and keeps it.
    dtls: bool,
    admin: Option<Box<dyn Fn() -> bool + 'a>>,
}

struct Outcome {
    report: Value,
    /// Admin command times during the hold, ms.
    admin_ms: Vec<f64>,
}

impl Run<'_> {
    fn go(self) -> anyhow::Result<Outcome> {
        let ramp = self.sessions as f64 / self.rate as f64;
        let limit = (ramp * 3.0) as u64 + self.hold + 120;
        let mut cmd = self.topo.client.cmd(std::env::current_exe()?);
        cmd.args(["load", "--target", &format!("{GW_OUTSIDE}:443")])
            .args(["--sources", &self.sources.join(",")])
            .args(["--sessions", &self.sessions.to_string()])
            .args(["--rate", &self.rate.to_string()])
            .args(["--in-flight", &self.in_flight.to_string()])
            .args(["--hold", &self.hold.to_string()])
            .args(["--limit", &limit.to_string()])
            .args(["--users", &self.sessions.to_string()])
            .args(["--password", PASSWORD])
            .args(["--keepalive", "20", "--sample-every", "5"])
            .args(["--gateway-pid", &self.pid.to_string()]);
        if self.echo {
            cmd.args(["--echo", GW_INSIDE, "--echo-every", "30"]);
        }
        if self.dtls {
            cmd.arg("--dtls");
        }
        let mut child = cmd
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .context("starting the load generator")?;
        let start = Instant::now();
        let mut admin_ms = Vec::new();
        if let Some(admin) = &self.admin {
            let hold_start = Duration::from_secs_f64(ramp + 5.0);
            let hold_end = Duration::from_secs_f64(ramp + self.hold as f64 - 2.0);
            let mut next = hold_start;
            while start.elapsed() < hold_end {
                if let Ok(Some(_)) = child.try_wait() {
                    break;
                }
                if start.elapsed() >= next {
                    let t = Instant::now();
                    if admin() {
                        admin_ms.push(t.elapsed().as_secs_f64() * 1e3);
                    }
                    next += Duration::from_secs(10);
                }
                std::thread::sleep(Duration::from_millis(200));
            }
        }
        let out = child.wait_with_output()?;
        if !out.status.success() {
            bail!("the load generator failed ({})", out.status);
        }
        // The generator's whole report (samples over time) for a closer
        // look: VPN_BENCH_RAW=DIR.
        if let Some(dir) = std::env::var_os("VPN_BENCH_RAW") {
            let path =
                std::path::Path::new(&dir).join(format!("{}-{}.json", self.pid, self.sessions));
            std::fs::write(&path, &out.stdout)?;
            eprintln!("report in {}", path.display());
        }
        Ok(Outcome {
            report: serde_json::from_slice(&out.stdout).context("the generator's report")?,
            admin_ms,
        })
    }
}

pub fn users_toml(n: u64, hash: &str) -> UserFile {
    UserFile {
        users: (0..n)
            .map(|i| User {
                name: format!("load{i}"),
                password_hash: hash.to_owned(),
                group_policy: None,
            })
            .collect(),
    }
}

fn ocpasswd(n: u64, hash: &str) -> String {
    (0..n).map(|i| format!("load{i}:*:{hash}\n")).collect()
}

fn start_vpnd(topo: &Topology, n: u64, hash: &str) -> anyhow::Result<Gateway> {
    let server = format!("max_sessions = {}", n.max(16));
    let gw = Gateway::start_with(
        topo,
        |dir| {
            Gateway::base_config(
                dir,
                topo,
                &ConfigParts {
                    server: &server,
                    tunnel: "mtu = 1400",
                    rest: "[limits]\nmax_connections_per_source = 64\nmax_pending_logins_per_source = 64\n",
                },
            )
            .replace("198.19.0.0/24", "198.19.0.0/16")
        },
        &[],
    )?;
    users_toml(n, hash).write(&gw.users_file)?;
    // The daemon looks at the file every second.
    std::thread::sleep(Duration::from_secs(3));
    Ok(gw)
}

fn start_ocserv(topo: &Topology, n: u64, hash: &str) -> anyhow::Result<Ocserv> {
    Ocserv::start(
        topo,
        &Setup {
            passwd: ocpasswd(n, hash),
            max_clients: n as usize,
            network: ("198.19.0.0", "255.255.0.0"),
            rate_limit_ms: 0,
            occtl: true,
        },
    )
}

fn admin_vpnd(gw: &Gateway) -> impl Fn() -> bool + '_ {
    move || {
        Command::new(bin_dir().join("vpnctl"))
            .arg("--socket")
            .arg(&gw.socket)
            .args(["sessions", "--json"])
            .stdout(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    }
}

fn admin_ocserv(oc: &Ocserv) -> impl Fn() -> bool + '_ {
    move || {
        Command::new("occtl")
            .arg("-s")
            .arg(oc.occtl_socket())
            .args(["-j", "show", "users"])
            .stdout(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    }
}

/// The figures of one held-sessions run.
struct Held {
    wanted: u64,
    at_start: u64,
    at_end: u64,
    failures: String,
    /// PSS before the first login, KiB.
    base_kib: f64,
    /// PSS with every session up (first sample of the hold), KiB.
    full_kib: f64,
    /// PSS 30 s into the hold, every tunnel having carried traffic, KiB.
    settled_kib: f64,
    /// PSS growth from then to the hold's last sample, KiB.
    growth_kib: f64,
    processes: u64,
    /// Gateway CPU seconds per 1,000 logins during the ramp.
    cpu_per_1000: f64,
    login_p50: f64,
    login_p99: f64,
    setup_p50: f64,
    admin_p50: f64,
    admin_max: f64,
    echo: String,
    /// DTLS channels up and their handshake's p50, ms ("-" over TLS).
    dtls: String,
}

fn median(mut v: Vec<f64>) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn held(o: &Outcome, p: &Params, dtls: bool) -> Held {
    let r = &o.report;
    let samples = r["samples"].as_array().cloned().unwrap_or_default();
    let f = |v: &Value, k: &str| v[k].as_f64().unwrap_or(0.0);
    let ramp = p.sessions as f64 / p.rate as f64;
    // Samples inside the hold (from 5 s after the ramp to 5 s before its end).
    let in_hold: Vec<&Value> = samples
        .iter()
        .filter(|s| f(s, "t") >= ramp + 5.0 && f(s, "t") <= ramp + p.hold as f64 - 5.0)
        .collect();
    let first = in_hold.first().copied();
    let last = in_hold.last().copied();
    // Growth is counted once every session has sent its first echo (30 s
    // into the hold): the first packet through a tunnel takes a few
    // buffers once (vpnd: about 3 KiB per session), which is not growth.
    let settled = in_hold
        .iter()
        .find(|s| f(s, "t") >= ramp + 35.0)
        .copied()
        .or(first);
    let base = samples.first();
    let ok = f(r, "logins_ok");
    let cpu_ramp = first.map_or(0.0, |s| f(s, "cpu_s")) - base.map_or(0.0, |s| f(s, "cpu_s"));
    Held {
        wanted: p.sessions,
        at_start: r["held_at_hold_start"].as_u64().unwrap_or(0),
        at_end: r["held_at_hold_end"].as_u64().unwrap_or(0),
        failures: failures(r),
        base_kib: base.map_or(0.0, |s| f(s, "pss_kib")),
        full_kib: first.map_or(0.0, |s| f(s, "pss_kib")),
        settled_kib: settled.map_or(0.0, |s| f(s, "pss_kib")),
        growth_kib: match (settled, last) {
            (Some(a), Some(b)) => f(b, "pss_kib") - f(a, "pss_kib"),
            _ => 0.0,
        },
        processes: first.map_or(0, |s| s["processes"].as_u64().unwrap_or(0)),
        cpu_per_1000: if ok > 0.0 {
            cpu_ramp / ok * 1000.0
        } else {
            0.0
        },
        login_p50: f(&r["login_ms"], "p50"),
        login_p99: f(&r["login_ms"], "p99"),
        setup_p50: f(&r["setup_ms"], "p50"),
        admin_p50: median(o.admin_ms.clone()),
        admin_max: o.admin_ms.iter().copied().fold(0.0, f64::max),
        echo: format!(
            "{}/{}",
            r["echo_received"].as_u64().unwrap_or(0),
            r["echo_sent"].as_u64().unwrap_or(0)
        ),
        dtls: if dtls {
            format!(
                "{} / {:.1}",
                r["dtls_up"].as_u64().unwrap_or(0),
                f(&r["dtls_ms"], "p50")
            )
        } else {
            "-".into()
        },
    }
}

fn failures(r: &Value) -> String {
    let m = r["failures"].as_object().cloned().unwrap_or_default();
    if m.is_empty() {
        return "none".into();
    }
    m.iter()
        .map(|(k, v)| format!("{k} {v}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// KiB per session once every tunnel has carried traffic.
fn per_session(h: &Held) -> f64 {
    if h.at_end == 0 {
        0.0
    } else {
        (h.settled_kib - h.base_kib) / h.at_end as f64
    }
}

fn held_row(out: &mut String, name: &str, h: &Held) -> std::fmt::Result {
    writeln!(
        out,
        "| {name} | {} | {} | {} | {} | {} | {:.0} | {:.0} | {:.0} | {:.1} | {:+.1} | {} | {:.2} | {:.1} / {:.1} | {:.1} | {:.0} / {:.0} | {} |",
        h.dtls,
        h.wanted,
        h.at_start,
        h.at_end,
        h.failures,
        h.base_kib / 1024.0,
        h.full_kib / 1024.0,
        h.settled_kib / 1024.0,
        per_session(h),
        h.growth_kib / 1024.0,
        h.processes,
        h.cpu_per_1000,
        h.login_p50,
        h.login_p99,
        h.setup_p50,
        h.admin_p50,
        h.admin_max,
        h.echo,
    )
}

struct Burst {
    rate: f64,
    login_p50: f64,
    login_p99: f64,
    setup_p50: f64,
    password_p50: f64,
    failures: String,
}

fn burst(o: &Outcome) -> Burst {
    let r = &o.report;
    let f = |v: &Value, k: &str| v[k].as_f64().unwrap_or(0.0);
    Burst {
        rate: f(r, "logins_per_s"),
        login_p50: f(&r["login_ms"], "p50"),
        login_p99: f(&r["login_ms"], "p99"),
        setup_p50: f(&r["setup_ms"], "p50"),
        password_p50: f(&r["password_ms"], "p50"),
        failures: failures(r),
    }
}

pub fn machine() -> String {
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let mem = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find_map(|l| l.strip_prefix("MemTotal:"))
                .map(|v| v.trim().to_owned())
        })
        .unwrap_or_default();
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let ocserv = Command::new("ocserv")
        .arg("-v")
        .output()
        .map(|o| {
            let mut text = o.stdout;
            text.extend(o.stderr);
            String::from_utf8_lossy(&text)
                .lines()
                .next()
                .unwrap_or("")
                .to_owned()
        })
        .unwrap_or_default();
    let rev = Command::new("git")
        .args(["rev-parse", "--short", "HEAD"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default();
    format!(
        "{cores} cores, {mem} memory, kernel {}; vpnd at {rev} (release build), {ocserv}",
        kernel.trim()
    )
}

pub fn run() -> anyhow::Result<String> {
    if !std::path::Path::new("/usr/sbin/ocserv").exists() {
        bail!("ocserv is not installed (apt-get install ocserv)");
    }
    let p = Params {
        sessions: env_or("VPN_BENCH_SESSIONS", 10_000)?,
        rate: env_or("VPN_BENCH_RATE", 100)?,
        hold: env_or("VPN_BENCH_HOLD", 300)?,
        burst: env_or("VPN_BENCH_BURST", 1_000)?,
    };
    if p.sessions == 0 || p.rate == 0 || p.hold < 20 || p.burst == 0 {
        bail!("VPN_BENCH_SESSIONS, _RATE and _BURST must be above 0, VPN_BENCH_HOLD at least 20");
    }
    // vpnd raises its own limit; ocserv's main process holds a descriptor
    // per client and inherits ours.
    crate::load::raise_nofile(p.sessions * 4 + 4096);
    let sha512 = crypt("-6", PASSWORD)?;
    let argon2 = vpn_daemon::auth::users::hash_password(PASSWORD)?;
    let mut only = std::env::var("VPN_BENCH_ONLY").ok();
    only = only.filter(|o| !o.is_empty());
    let want = |w: &str| only.as_deref().is_none_or(|o| o == w);

    // Logins per second first: a fresh machine for each burst.
    let mut bursts = Vec::new();
    for (name, hash, vpnd) in [
        ("vpnd", &sha512, true),
        ("vpnd", &argon2, true),
        ("ocserv", &sha512, false),
    ] {
        if !want(&format!("{name}-logins")) {
            continue;
        }
        let topo = Topology::new()?;
        let src = sources(&topo)?;
        let run = |pid| Run {
            topo: &topo,
            sources: &src,
            pid,
            sessions: p.burst,
            rate: 100_000,
            hold: 1,
            in_flight: 32,
            echo: false,
            dtls: false,
            admin: None,
        };
        let o = if vpnd {
            let gw = start_vpnd(&topo, p.burst, hash)?;
            run(gw.pid().context("vpnd pid")?).go()?
        } else {
            let oc = start_ocserv(&topo, p.burst, hash)?;
            run(oc.child.id()).go()?
        };
        let scheme = if hash.starts_with("$6$") {
            "crypt SHA-512 (5,000 rounds)"
        } else {
            "argon2id (19 MiB, t=2)"
        };
        eprintln!("{name} logins with {scheme}: {}", o.report["logins_per_s"]);
        bursts.push((name, scheme, burst(&o)));
    }

    let mut helds = Vec::new();
    for (name, dtls) in [
        ("vpnd", false),
        ("ocserv", false),
        ("vpnd", true),
        ("ocserv", true),
    ] {
        let key = format!("{name}-held{}", if dtls { "-dtls" } else { "" });
        if !want(&key) {
            continue;
        }
        let topo = Topology::new()?;
        let src = sources(&topo)?;
        let o = if name == "vpnd" {
            let gw = start_vpnd(&topo, p.sessions, &sha512)?;
            Run {
                topo: &topo,
                sources: &src,
                pid: gw.pid().context("vpnd pid")?,
                sessions: p.sessions,
                rate: p.rate,
                hold: p.hold,
                in_flight: 64,
                echo: true,
                dtls,
                admin: Some(Box::new(admin_vpnd(&gw))),
            }
            .go()?
        } else {
            let oc = start_ocserv(&topo, p.sessions, &sha512)?;
            let o = Run {
                topo: &topo,
                sources: &src,
                pid: oc.child.id(),
                sessions: p.sessions,
                rate: p.rate,
                hold: p.hold,
                in_flight: 64,
                echo: true,
                dtls,
                admin: Some(Box::new(admin_ocserv(&oc))),
            }
            .go()?;
            if o.report["logins_ok"].as_u64() == Some(0) {
                eprintln!("{}", oc.log());
            }
            o
        };
        eprintln!(
            "{key}: held {} of {}",
            o.report["held_at_hold_start"], p.sessions
        );
        helds.push((name, dtls, held(&o, &p, dtls)));
    }

    let mut out = String::new();
    writeln!(out, "# Scale: vpnd against ocserv\n")?;
    writeln!(out, "Machine: {}.\n", machine())?;
    writeln!(
        out,
        "Both gateways in the same namespace topology, driven by `vpn-bench load` (a protocol peer: TLS, aggregate-auth, CONNECT, CSTP keepalive and DPD, echoes through the tunnel) from 64 source addresses in a client namespace on the same 2 cores. Memory is the PSS of the gateway's whole process tree (ocserv: main, sec-mod and a worker per client), from /proc/PID/smaps_rollup. `cargo xtask bench scale` (VPN_BENCH_SESSIONS={}, VPN_BENCH_RATE={}, VPN_BENCH_HOLD={}, VPN_BENCH_BURST={}).\n",
        p.sessions, p.rate, p.hold, p.burst
    )?;
    if !helds.is_empty() {
        writeln!(
            out,
            "## Held sessions\n\n{} clients log in at {}/s and hold their tunnels for {} s with a keepalive every 20 s and an echo through the tunnel every 30 s. Memory per session = (PSS 30 s into the hold, when every tunnel has carried an echo, - PSS before the first login) / sessions held. The hold starts when the last client is due; a gateway slower than the ramp is still taking logins then (see held at hold start). The admin command (`vpnctl sessions --json`, `occtl -j show users`) listing every session is timed every 10 s during the hold. Passwords: crypt SHA-512 on both. In the DTLS rows each client also opens a DTLS channel right after CONNECT (PSK-NEGOTIATE, the key exported from its TLS connection, as openconnect does) and sends its echoes and a keepalive over it; the TLS channel keeps its own keepalives.\n",
            p.sessions, p.rate, p.hold
        )?;
        writeln!(
            out,
            "| gateway | DTLS up / handshake ms p50 | sessions | held at hold start | held at hold end | failures | PSS before, MiB | PSS at hold start, MiB | PSS 30 s into hold, MiB | KiB per session | PSS change from then to the end, MiB | processes | CPU s per 1,000 logins | login ms p50 / p99 | set-up ms p50 | admin command ms p50 / max | echoes back / sent |"
        )?;
        writeln!(
            out,
            "|---|---:|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
        )?;
        for (name, _, h) in &helds {
            held_row(&mut out, name, h)?;
        }
        for dtls in [false, true] {
            let of = |n: &str| helds.iter().find(|h| h.0 == n && h.1 == dtls).map(|h| &h.2);
            if let (Some(v), Some(o)) = (of("vpnd"), of("ocserv")) {
                writeln!(
                    out,
                    "\nRatios vpnd / ocserv{}: memory per session {:.3}, CPU per login {:.2}, admin command p50 {:.2}.",
                    if dtls { " with DTLS" } else { "" },
                    per_session(v) / per_session(o).max(f64::MIN_POSITIVE),
                    v.cpu_per_1000 / o.cpu_per_1000.max(f64::MIN_POSITIVE),
                    v.admin_p50 / o.admin_p50.max(f64::MIN_POSITIVE),
                )?;
            }
        }
    }
    if !bursts.is_empty() {
        writeln!(
            out,
            "\n## Logins per second\n\n{} logins as fast as they are answered, 32 in flight, each a new TLS connection, the forms, CONNECT, then DISCONNECT after a second. Set-up = TLS handshake + first form + CONNECT (the gateway's work without the password check).\n",
            p.burst
        )?;
        writeln!(
            out,
            "| gateway | password hash | logins/s | ratio to ocserv | login ms p50 / p99 | set-up ms p50 | password round ms p50 | failures |"
        )?;
        writeln!(out, "|---|---|---:|---:|---:|---:|---:|---|")?;
        let oc = bursts
            .iter()
            .find(|(n, _, _)| *n == "ocserv")
            .map_or(0.0, |b| b.2.rate);
        for (name, scheme, b) in &bursts {
            writeln!(
                out,
                "| {name} | {scheme} | {:.0} | {:.2} | {:.1} / {:.1} | {:.2} | {:.1} | {} |",
                b.rate,
                b.rate / oc.max(f64::MIN_POSITIVE),
                b.login_p50,
                b.login_p99,
                b.setup_p50,
                b.password_p50,
                b.failures,
            )?;
        }
    }
    Ok(out)
}
