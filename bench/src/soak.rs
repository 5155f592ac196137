//! The soak (`cargo xtask bench soak`): vpnd under churn for a long time,
//! to catch what grows. `VPN_SOAK_SESSIONS` clients (1,000) log in from
//! 64 source addresses at `VPN_SOAK_RATE` per second (20) and keep
//! `VPN_SOAK_SESSIONS` sessions up for `VPN_SOAK_MINUTES` (30): each
//! session lives 0.5 to 1.5 times `VPN_SOAK_CHURN` seconds (120) with
//! keepalives and an echo through its tunnel every 10 s, then ends (one in
//! five vanishes without a DISCONNECT, to be reaped after
//! `disconnected_timeout_secs` = 30) and its client logs in again.
//!
//! Sampled every 30 s: the sessions held, vpnd's resident memory and open
//! descriptors. Reported: the growth of memory and descriptors from the
//! end of the warm-up (the first third of the run) to the end, as a rate
//! per hour from a least-squares line over the samples; echoes lost;
//! failures by reason; and, after every client is gone and 45 s have
//! passed, the sessions vpnd still holds (stuck ones) and its memory and
//! descriptors against the start. The targets are absolute (no growth, no
//! stuck session); there is no ocserv column, since an hour-long ocserv
//! soak would not change what this measures.

use std::{
    fmt::Write as _,
    process::Stdio,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use serde_json::Value;
use vpn_tests::{ConfigParts, GW_INSIDE, GW_OUTSIDE, Gateway, Topology, wait_for};

use crate::scale::{PASSWORD, env_or, machine, sources, users_toml};

/// The broker vpnd `pid` started (its child running `--broker`).
fn broker_of(pid: u32) -> Option<u32> {
    std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))
        .ok()?
        .split_whitespace()
        .filter_map(|c| c.parse().ok())
        .find(|c: &u32| {
            std::fs::read_to_string(format!("/proc/{c}/cmdline"))
                .is_ok_and(|l| l.contains("--broker"))
        })
}

/// vpnd's resident KiB and open descriptors now.
fn usage(pid: u32) -> (u64, usize) {
    let (_, rss, _, _) = crate::load::gateway_usage(pid);
    (rss, crate::load::open_fds(pid))
}

/// Least-squares slope of `(t seconds, y)`, per hour.
fn per_hour(points: &[(f64, f64)]) -> f64 {
    let n = points.len() as f64;
    if n < 2.0 {
        return 0.0;
    }
    let (mt, my) = points
        .iter()
        .fold((0.0, 0.0), |(a, b), (t, y)| (a + t / n, b + y / n));
    let (num, den) = points.iter().fold((0.0, 0.0), |(a, b), (t, y)| {
        (a + (t - mt) * (y - my), b + (t - mt) * (t - mt))
    });
    if den == 0.0 { 0.0 } else { num / den * 3600.0 }
}

pub fn run() -> anyhow::Result<String> {
    let sessions = env_or("VPN_SOAK_SESSIONS", 1_000)?;
    let rate = env_or("VPN_SOAK_RATE", 20)?;
    let minutes = env_or("VPN_SOAK_MINUTES", 30)?;
    let churn = env_or("VPN_SOAK_CHURN", 120)?;
    if sessions == 0 || rate == 0 || minutes < 3 || churn < 10 {
        bail!(
            "VPN_SOAK_SESSIONS and _RATE must be above 0, VPN_SOAK_MINUTES at least 3, VPN_SOAK_CHURN at least 10"
        );
    }
    crate::load::raise_nofile(sessions * 4 + 4096);
    let hash = crate::ocserv::crypt("-6", PASSWORD)?;
    let topo = Topology::new()?;
    let src = sources(&topo)?;
    let server = format!("max_sessions = {}", sessions * 2);
    let gw = Gateway::start_with(
        &topo,
        |dir| {
            Gateway::base_config(
                dir,
                &topo,
                &ConfigParts {
                    server: &server,
                    tunnel: "mtu = 1400",
                    rest: "[session]\ndisconnected_timeout_secs = 30\ndpd_secs = 10\n\
                           [limits]\nmax_connections_per_source = 64\nmax_pending_logins_per_source = 64\n",
                },
            )
            .replace("198.19.0.0/24", "198.19.0.0/16")
        },
        &[],
    )?;
    users_toml(sessions, &hash).write(&gw.users_file)?;
    std::thread::sleep(Duration::from_secs(3));
    let pid = gw.pid().context("vpnd's pid")?;
    let at_start = usage(pid);
    let broker = broker_of(pid).context("vpnd's broker")?;
    let broker_at_start = usage(broker);

    let ramp = sessions as f64 / rate as f64;
    let hold = minutes * 60;
    let limit = (ramp * 3.0) as u64 + hold + 300;
    eprintln!(
        "soak: {sessions} sessions, {minutes} min, churn {churn} s (about {:.0} logins)",
        sessions as f64 * hold as f64 / churn as f64
    );
    let started = Instant::now();
    let out = topo
        .client
        .cmd(std::env::current_exe()?)
        .args(["load", "--target", &format!("{GW_OUTSIDE}:443")])
        .args(["--sources", &src.join(",")])
        .args(["--sessions", &sessions.to_string()])
        .args(["--rate", &rate.to_string()])
        .args(["--in-flight", "32"])
        .args(["--hold", &hold.to_string()])
        .args(["--limit", &limit.to_string()])
        .args(["--users", &sessions.to_string()])
        .args(["--password", PASSWORD])
        .args(["--keepalive", "20", "--sample-every", "30"])
        .args(["--echo", GW_INSIDE, "--echo-every", "10"])
        .args(["--churn", &churn.to_string()])
        .args(["--gateway-pid", &pid.to_string()])
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .output()
        .context("running the load generator")?;
    if !out.status.success() {
        bail!("the load generator failed ({})", out.status);
    }
    let ran = started.elapsed();
    let r: Value = serde_json::from_slice(&out.stdout).context("the generator's report")?;
    // Every client is gone: what vanished is reaped after 30 s.
    let drained = wait_for(Duration::from_secs(90), || {
        let s: Value = serde_json::from_str(&gw.vpnctl(&["stats", "--json"]).ok()?).ok()?;
        (s["sessions"] == 0 && s["pool_in_use"] == 0).then_some(())
    });
    std::thread::sleep(Duration::from_secs(5));
    let stats: Value = serde_json::from_str(&gw.vpnctl(&["stats", "--json"])?)?;
    let at_end = usage(pid);
    let broker_at_end = usage(broker);

    let samples = r["samples"].as_array().cloned().unwrap_or_default();
    let ramp_end = ramp + 5.0;
    let hold_end = ramp + hold as f64;
    let warm = ramp_end + (hold_end - ramp_end) / 3.0;
    let series = |key: &str| -> Vec<(f64, f64)> {
        samples
            .iter()
            .filter_map(|s| Some((s["t"].as_f64()?, s[key].as_f64()?)))
            .filter(|(t, _)| *t >= warm && *t <= hold_end)
            .collect()
    };
    let rss = series("rss_kib");
    // The second half alone: does it level off?
    let half = (warm + hold_end) / 2.0;
    let rss_late: Vec<(f64, f64)> = rss.iter().copied().filter(|(t, _)| *t >= half).collect();
    let fds = series("fds");
    let held = series("held");
    let first = |v: &[(f64, f64)]| v.first().map_or(0.0, |p| p.1);
    let last = |v: &[(f64, f64)]| v.last().map_or(0.0, |p| p.1);
    let min_held = held.iter().map(|p| p.1).fold(f64::INFINITY, f64::min);
    let n = |k: &str| r[k].as_u64().unwrap_or(0);
    let failures: Vec<String> = r["failures"]
        .as_object()
        .map(|m| m.iter().map(|(k, v)| format!("{k} {v}")).collect())
        .unwrap_or_default();
    let lost = n("echo_sent").saturating_sub(n("echo_received"));

    let mut t = String::new();
    writeln!(t, "# Soak: vpnd under churn for {minutes} minutes\n")?;
    writeln!(
        t,
        "{} sessions kept up from 64 source addresses, each living 0.5-1.5 x {churn} s with keepalives and an echo through its tunnel every 10 s, then ending (one in five vanishing without DISCONNECT, reaped after 30 s) and logging in again; vpnd sampled every 30 s. `cargo xtask bench soak` (VPN_SOAK_SESSIONS={sessions}, VPN_SOAK_RATE={rate}, VPN_SOAK_MINUTES={minutes}, VPN_SOAK_CHURN={churn}). {}.\n",
        sessions,
        machine()
    )?;
    writeln!(t, "| what | value |\n|---|---|")?;
    writeln!(t, "| run | {:.1} min |", ran.as_secs_f64() / 60.0)?;
    writeln!(
        t,
        "| logins | {} ({} after an ending, {} endings vanished) |",
        n("logins_ok"),
        n("relogins"),
        n("vanished")
    )?;
    writeln!(
        t,
        "| failures | {} |",
        if failures.is_empty() {
            "none".into()
        } else {
            failures.join(", ")
        }
    )?;
    writeln!(
        t,
        "| sessions held after the warm-up | {:.0} to {:.0}, at least {:.0} |",
        first(&held),
        last(&held),
        min_held
    )?;
    writeln!(
        t,
        "| echoes through the tunnels | {} sent, {} lost ({:.3}%) |",
        n("echo_sent"),
        lost,
        100.0 * lost as f64 / n("echo_sent").max(1) as f64
    )?;
    writeln!(
        t,
        "| vpnd resident memory after the warm-up, at the end | {:.1} MiB, {:.1} MiB |",
        first(&rss) / 1024.0,
        last(&rss) / 1024.0
    )?;
    writeln!(
        t,
        "| its trend from the warm-up on (least squares) | {:+.2} MiB per hour |",
        per_hour(&rss) / 1024.0
    )?;
    writeln!(
        t,
        "| and over the second half of that | {:+.2} MiB per hour |",
        per_hour(&rss_late) / 1024.0
    )?;
    writeln!(
        t,
        "| vpnd descriptors after the warm-up, at the end | {:.0}, {:.0} (trend {:+.1} per hour) |",
        first(&fds),
        last(&fds),
        per_hour(&fds)
    )?;
    writeln!(
        t,
        "| after every client left | {} sessions, {} pool addresses in use{} |",
        stats["sessions"],
        stats["pool_in_use"],
        if drained.is_some() {
            ""
        } else {
            " 90 s later: stuck"
        }
    )?;
    writeln!(
        t,
        "| vpnd at start, after the soak | {:.1} MiB and {} descriptors, {:.1} MiB and {} descriptors |",
        at_start.0 as f64 / 1024.0,
        at_start.1,
        at_end.0 as f64 / 1024.0,
        at_end.1
    )?;
    writeln!(
        t,
        "| its broker at start, after the soak | {:.1} MiB and {} descriptors, {:.1} MiB and {} descriptors |",
        broker_at_start.0 as f64 / 1024.0,
        broker_at_start.1,
        broker_at_end.0 as f64 / 1024.0,
        broker_at_end.1
    )?;
    writeln!(
        t,
        "| CPU of vpnd | {:.0} s |",
        samples
            .last()
            .and_then(|s| s["cpu_s"].as_f64())
            .unwrap_or(0.0)
    )?;
    drop(gw);
    Ok(t)
}
