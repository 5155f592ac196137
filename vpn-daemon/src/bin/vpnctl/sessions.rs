//! `vpnctl sessions|show|disconnect|stats|uplinks`: requests to the running
//! daemon.

use std::path::Path;

use anyhow::bail;
use vpn_daemon::{
    api::{Request, Response, SessionList},
    control,
};

pub fn call(socket: &Path, req: Request) -> anyhow::Result<Response> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    match rt.block_on(control::call(socket, &req))? {
        Response::Error { error } => bail!("{error}"),
        r => Ok(r),
    }
}

pub fn list(socket: &Path, json: bool) -> anyhow::Result<()> {
    use std::io::{IsTerminal as _, Write as _};
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    if json && !std::io::stdout().is_terminal() {
        // For a program: vpnd's JSON as it came (compact), checked but not
        // rebuilt, which at 10,000 sessions took longer than vpnd's answer.
        #[derive(serde::Deserialize)]
        struct Raw<'a> {
            #[serde(borrow)]
            sessions: &'a serde_json::value::RawValue,
        }
        let line = rt.block_on(control::call_line(socket, &Request::Sessions))?;
        let raw: Raw<'_> = serde_json::from_str(&line).map_err(|e| {
            control::answer_error(&line).map_or_else(|| anyhow::anyhow!(e), |m| anyhow::anyhow!(m))
        })?;
        let mut out = std::io::stdout().lock();
        out.write_all(raw.sessions.get().as_bytes())?;
        out.write_all(b"\n")?;
        return Ok(());
    }
    let SessionList { sessions } = rt.block_on(control::call_as(socket, &Request::Sessions))?;
    if json {
        println!("{}", serde_json::to_string_pretty(&sessions)?);
        return Ok(());
    }
    println!(
        "{:<16} {:<15} {:<22} {:<20} {:<12} {:<14} {:>12} {:>12} {:>9} {:>9} PSEUDO-MAC",
        "USER",
        "VPN ADDRESS",
        "PUBLIC ADDRESS",
        "SINCE",
        "STATE",
        "POLICY",
        "BYTES IN",
        "BYTES OUT",
        "PKTS IN",
        "PKTS OUT",
    );
    for s in &sessions {
        let public = match (&s.public_address, s.public_port) {
            (Some(a), Some(p)) if a.contains(':') => format!("[{a}]:{p}"),
            (Some(a), Some(p)) => format!("{a}:{p}"),
            _ => "-".into(),
        };
        println!(
            "{:<16} {:<15} {:<22} {:<20} {:<12} {:<14} {:>12} {:>12} {:>9} {:>9} {}",
            s.user,
            s.vpn_address,
            public,
            s.since,
            s.state,
            s.group_policy.as_deref().unwrap_or("-"),
            s.bytes_in,
            s.bytes_out,
            s.packets_in,
            s.packets_out,
            s.pseudo_mac
        );
    }
    if sessions.is_empty() {
        println!("(no sessions)");
    }
    Ok(())
}

pub fn disconnect(socket: &Path, target: &str) -> anyhow::Result<()> {
    let Response::Disconnected { disconnected } = call(
        socket,
        Request::Disconnect {
            target: target.into(),
        },
    )?
    else {
        bail!("unexpected answer from vpnd");
    };
    println!("disconnected {disconnected} session(s) matching '{target}'");
    Ok(())
}

pub fn stats(socket: &Path, json: bool) -> anyhow::Result<()> {
    let Response::Stats { stats } = call(socket, Request::Stats)? else {
        bail!("unexpected answer from vpnd");
    };
    if json {
        println!("{}", serde_json::to_string_pretty(&stats)?);
        return Ok(());
    }
    println!(
        "sessions: {} of {} allowed",
        stats.sessions, stats.max_sessions
    );
    println!(
        "pool: {} of {} addresses in use",
        stats.pool_in_use, stats.pool_capacity
    );
    println!("packets dropped by the data path:");
    for (reason, n) in &stats.drops {
        println!("  {reason:<22} {n}");
    }
    let a = &stats.admission;
    println!(
        "login phase: {} of {} connections ({} per source), {} of {} logins in progress",
        a.connections,
        a.max_connections,
        a.max_connections_per_source,
        a.pending_logins,
        a.max_pending_logins
    );
    println!(
        "  refused: connections {} (all in use) {} (per source); logins {} (busy) {} (per source); locked out: {} attempts from {} sources now, {} attempts for {} users now",
        a.connections_refused_total,
        a.connections_refused_source,
        a.logins_refused_busy,
        a.logins_refused_source_busy,
        a.logins_refused_source_locked,
        a.sources_locked,
        a.logins_refused_user_locked,
        a.users_locked
    );
    println!(
        "  closed: {} after the request limit, {} after the time limit; password checks: {} running or waiting, {} refused (queue full)",
        a.connections_closed_requests,
        a.connections_closed_lifetime,
        a.verifications_in_progress,
        a.verifications_refused_busy
    );
    println!(
        "  at the process's limits: {} logins refused for memory (resident {} MiB, limit {}), {} connections refused for descriptors",
        a.logins_refused_memory,
        a.resident_bytes >> 20,
        match a.max_memory_bytes {
            0 => "none".to_owned(),
            b => format!("{} MiB", b >> 20),
        },
        a.connections_refused_descriptors
    );
    let b = &stats.bans;
    println!(
        "ban points: {} bans now ({} by points since start), {} sources scoring, {} connections closed at accept; offences: {}",
        b.active,
        b.banned_total,
        b.scored_sources,
        b.refused_at_accept,
        b.offences
            .iter()
            .map(|(o, n)| format!("{o} {n}"))
            .collect::<Vec<_>>()
            .join(", ")
    );
    println!("packets dropped by vpnd before the tunnel device:");
    for (reason, n) in &stats.daemon_drops {
        println!("  {reason:<22} {n}");
    }
    if let Some(o) = &stats.offloads {
        let on = |b: bool| if b { "on" } else { "off" };
        println!(
            "kernel offloads: TUN TSO {}, UDP GSO {} ({} sends of several datagrams), UDP GRO {}",
            on(o.tun_tso),
            on(o.udp_gso),
            stats.dtls_rx.as_ref().map_or(0, |rx| rx.gso_messages),
            on(o.udp_gro)
        );
    }
    if let Some(rx) = &stats.dtls_rx {
        println!(
            "DTLS receive: {} datagrams in {} batches ({:.1} per batch), {} coalescing waits, {} redundant client ACKs dropped",
            rx.datagrams,
            rx.batches,
            rx.datagrams as f64 / rx.batches.max(1) as f64,
            rx.coalesce_waits,
            rx.acks_thinned
        );
        println!(
            "DTLS datagrams dropped: {} malformed (record lengths that do not fit)",
            rx.malformed
        );
        for (i, w) in rx.workers.iter().enumerate() {
            println!(
                "  packet worker {i}: {} datagrams in, {} packets out",
                w.datagrams_in, w.packets_out
            );
        }
    }
    if let Some(h) = &stats.dtls_handshakes {
        println!(
            "DTLS handshakes: {} of {} in progress ({} per source); refused: {} (all in use) {} (per source) {} (per offer) {} (not the offered kind); {} channels still holding OpenSSL; {} rebindings, {} rebinding trials refused (source budget spent)",
            h.in_progress,
            h.max,
            h.max_per_source,
            h.refused_total,
            h.refused_per_source,
            h.refused_per_offer,
            h.refused_after,
            h.holding_openssl,
            h.rebinds,
            h.rebind_trials_refused
        );
    }
    if let Some(p) = &stats.dtls_flow_control {
        println!(
            "DTLS download flow control: {} waits for client ACKs ({} ms in all), holds stopped {} times for clients whose window did not open, {} packets dropped with their client's queue full, {} with the worker's; {} packets of other clients passed on meanwhile",
            p.waits,
            p.wait_us / 1000,
            p.holds_stopped,
            p.dropped_client_full,
            p.dropped_worker_full,
            p.passed_while_held
        );
    }
    if let Some(p) = &stats.dtls_pacing {
        println!(
            "DTLS rate limits: {} uploads and {} downloads paced by the packet workers, {} dropped (over 200 ms of queue)",
            p.up_delayed, p.down_delayed, p.dropped
        );
    }
    if let Some(a) = &stats.accounting {
        println!(
            "RADIUS accounting: {} records sent, {} not taken by any server, {} dropped (queue full), {} waiting",
            a.sent, a.failed, a.dropped, a.pending
        );
    }
    let r = &stats.tls_reads;
    println!(
        "TLS tunnel reads: {} wake-ups, {:.1} KB each, batching started {} times, {} tail stalls",
        r.wakeups,
        r.bytes as f64 / r.wakeups.max(1) as f64 / 1000.0,
        r.batching_started,
        r.tail_stalls
    );
    Ok(())
}

pub fn show(socket: &Path, target: &str, json: bool) -> anyhow::Result<()> {
    let details = match call(
        socket,
        Request::Show {
            target: target.to_owned(),
        },
    )? {
        Response::Show { details } => details,
        _ => bail!("unexpected answer from vpnd"),
    };
    if json {
        println!("{}", serde_json::to_string_pretty(&details)?);
        return Ok(());
    }
    let secs = |s: Option<u64>| s.map_or("-".to_owned(), |s| format!("{s}s"));
    for d in &details {
        let s = &d.session;
        let p = &d.pushed;
        println!("session {} of {} (group {})", s.id, s.user, s.group);
        println!(
            "  state        {} over {}, since {}, from {} (authenticated by {})",
            s.state, s.transport, s.since, d.login_from, d.authenticated_by
        );
        println!(
            "  address      {}{}",
            p.address,
            p.address6
                .as_ref()
                .map(|a| format!(", {a}"))
                .unwrap_or_default()
        );
        println!(
            "  routing      {}{}{}",
            p.routing,
            if p.routes.is_empty() {
                String::new()
            } else {
                format!(": {}", p.routes.join(", "))
            },
            if p.local_lan_access {
                " (local LAN access)"
            } else {
                ""
            }
        );
        println!(
            "  dns          {}{}",
            if p.dns.is_empty() {
                "-".to_owned()
            } else {
                p.dns.join(", ")
            },
            p.default_domain
                .as_ref()
                .map(|d| format!(" (domain {d})"))
                .unwrap_or_default()
        );
        println!(
            "  timers       session {}s, idle {}, disconnected {}s, DPD {}s, keepalive {}s, MTU {}",
            p.session_timeout_secs,
            secs((p.idle_timeout_secs > 0).then_some(p.idle_timeout_secs)),
            p.disconnected_timeout_secs,
            p.dpd_secs,
            p.keepalive_secs,
            p.mtu
        );
        println!(
            "  time left    session {}, idle {}, disconnected {}",
            secs(Some(d.timers.session_left_secs)),
            secs(d.timers.idle_left_secs),
            secs(d.timers.disconnected_left_secs)
        );
        println!(
            "  traffic      in {} bytes / {} packets, out {} bytes / {} packets, denied {} in / {} out, spoofed {}",
            s.bytes_in,
            s.packets_in,
            s.bytes_out,
            s.packets_out,
            s.denied_in,
            s.denied_out,
            s.spoofed_dropped
        );
        println!(
            "  policy       {}",
            s.group_policy
                .as_deref()
                .unwrap_or("- (everything allowed)")
        );
        for r in &d.rules {
            println!("    {:>3}. {:<48} {:>10} hits", r.index, r.rule, r.hits);
        }
    }
    Ok(())
}

/// `--since`: a duration ago or an RFC 3339 time, as RFC 3339.
fn since_time(since: &str) -> anyhow::Result<String> {
    if humantime::parse_rfc3339_weak(since).is_ok() {
        return Ok(since.to_owned());
    }
    let ago = humantime::parse_duration(since).map_err(|_| {
        anyhow::anyhow!("--since '{since}': give a duration (10m, 2h, 1day) or an RFC 3339 time")
    })?;
    let t = std::time::SystemTime::now()
        .checked_sub(ago)
        .ok_or_else(|| anyhow::anyhow!("--since '{since}' is before 1970"))?;
    Ok(humantime::format_rfc3339_millis(t).to_string())
}

/// One event as a line: time, type, then its fields.
fn event_line(e: &serde_json::Value) -> String {
    let mut line = format!(
        "{} {}",
        e["time"].as_str().unwrap_or("-"),
        e["event"].as_str().unwrap_or("-")
    );
    if let Some(o) = e.as_object() {
        for (k, v) in o.iter().filter(|(k, _)| *k != "time" && *k != "event") {
            match v {
                serde_json::Value::String(s) => line.push_str(&format!(" {k}={s:?}")),
                v => line.push_str(&format!(" {k}={v}")),
            }
        }
    }
    line
}

pub fn events(socket: &Path, a: crate::args::EventsArgs) -> anyhow::Result<()> {
    let (follow, json) = (a.follow, a.json);
    let mut q = vpn_daemon::api::EventQuery {
        from: None,
        user: a.user,
        kind: a.kind,
        since: a.since.as_deref().map(since_time).transpose()?,
        limit: a.limit,
    };
    loop {
        let Response::Events { events, next } = call(socket, Request::Events(q.clone()))? else {
            bail!("unexpected answer from vpnd");
        };
        for e in &events {
            if json {
                println!("{e}");
            } else {
                println!("{}", event_line(e));
            }
        }
        if !follow {
            return Ok(());
        }
        use std::io::Write as _;
        std::io::stdout().flush()?;
        q.from = Some(next);
        q.limit = 0;
        std::thread::sleep(std::time::Duration::from_millis(300));
    }
}

pub fn web_proxies(socket: &Path, json: bool) -> anyhow::Result<()> {
    let Response::WebProxies { web_proxies } = call(socket, Request::WebProxies)? else {
        bail!("unexpected answer from vpnd");
    };
    if json {
        println!("{}", serde_json::to_string_pretty(&web_proxies)?);
        return Ok(());
    }
    if web_proxies.is_empty() {
        println!("no web proxies configured ([[web_proxy]] in the config)");
        return Ok(());
    }
    println!(
        "{:<12} {:<22} {:<5} {:>8} {:>13} {:>10}",
        "NAME", "PROBE", "STATE", "FAILURES", "FAILED/SENT", "FOR"
    );
    for w in web_proxies {
        println!(
            "{:<12} {:<22} {:<5} {:>8} {:>13} {:>10}",
            w.name,
            w.probe,
            w.state,
            w.consecutive_failures,
            format!("{}/{}", w.probes_failed, w.probes_sent),
            format!("{}s", w.state_secs)
        );
    }
    Ok(())
}

pub fn uplinks(socket: &Path, json: bool) -> anyhow::Result<()> {
    let Response::Uplinks { uplinks } = call(socket, Request::Uplinks)? else {
        bail!("unexpected answer from vpnd");
    };
    if json {
        println!("{}", serde_json::to_string_pretty(&uplinks)?);
        return Ok(());
    }
    if uplinks.is_empty() {
        println!("no uplinks configured ([[uplink]] in the config)");
        return Ok(());
    }
    println!(
        "{:<10} {:<10} {:>4} {:<8} {:<5} {:<16} {:>8} {:>11} {:>14} {:>14}",
        "NAME",
        "INTERFACE",
        "PRIO",
        "ROLE",
        "STATE",
        "PROBE",
        "RTT ms",
        "LOST/SENT",
        "RX BYTES",
        "TX BYTES"
    );
    for u in uplinks {
        println!(
            "{:<10} {:<10} {:>4} {:<8} {:<5} {:<16} {:>8} {:>11} {:>14} {:>14}",
            u.name,
            u.interface,
            u.priority,
            u.role,
            u.state,
            u.probe_target,
            u.last_rtt_ms.map_or("-".into(), |r| format!("{r:.2}")),
            format!("{}/{}", u.probes_lost, u.probes_sent),
            u.rx_bytes,
            u.tx_bytes
        );
    }
    Ok(())
}
