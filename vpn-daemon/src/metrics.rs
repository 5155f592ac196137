//! Prometheus metrics on `[metrics] listen` (loopback by default): `GET
//! /metrics` answers in the OpenMetrics text format, encoded by
//! prometheus-client from a snapshot taken at the scrape (the same figures
//! `vpnctl` shows: sessions, traffic, drops, logins, limits, DTLS,
//! accounting, uplinks, rule hits) plus the latency histograms the
//! services fill in (`telemetry.rs`) and the process's own figures.
//!
//! Label values come from the gateway's own names (policies, rules,
//! reasons, uplinks), never from clients, so the number of series is
//! bounded by the configuration.

use std::{net::SocketAddr, sync::Arc, time::Duration};

use bytes::BytesMut;
use prometheus_client::{
    encoding::text::encode,
    metrics::{counter::Counter, family::Family, gauge::Gauge},
    registry::Registry,
};
use tokio::net::{TcpListener, TcpStream};

use crate::{
    gateway::Gateway,
    proto::http::{self, Response},
};

/// Labels of a series: `(name, value)` pairs.
type Labels = Vec<(&'static str, String)>;

/// Rules per policy whose hits are exported (the first ones), so that a
/// policy of 10,000 rules does not make 10,000 series.
const MAX_RULE_SERIES: usize = 64;

/// Serves the endpoint until the daemon ends.
pub async fn serve(gw: Arc<Gateway>, listener: TcpListener) {
    loop {
        let (tcp, peer) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!("metrics: accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let gw = gw.clone();
        tokio::spawn(async move {
            if let Err(e) = answer(&gw, tcp).await {
                tracing::debug!(%peer, "metrics request: {e}");
            }
        });
    }
}

/// Binds `addr` for [`serve`].
pub async fn bind(addr: SocketAddr) -> anyhow::Result<TcpListener> {
    TcpListener::bind(addr)
        .await
        .map_err(|e| anyhow::anyhow!("metrics.listen: cannot listen on {addr}: {e}"))
}

async fn answer(gw: &Gateway, mut tcp: TcpStream) -> std::io::Result<()> {
    let mut buf = BytesMut::with_capacity(1024);
    let limits = http::Limits::default();
    let req = match http::read_request(&mut tcp, &mut buf, &limits, Duration::from_secs(10)).await {
        Ok(r) => r,
        Err(e) => {
            if let Some((code, reason)) = e.status() {
                Response::text(code, reason, format!("{e}\n"))
                    .closing()
                    .write_to(&mut tcp)
                    .await?;
            }
            return Ok(());
        }
    };
    let resp = match (req.method.as_str(), req.path.as_str()) {
        ("GET", "/metrics") => Response::text(200, "OK", render(gw)).header(
            "Content-Type",
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        ),
        ("GET", _) => Response::text(404, "Not Found", "only /metrics is here\n"),
        _ => Response::text(405, "Method Not Allowed", "GET /metrics\n").header("Allow", "GET"),
    };
    resp.closing().write_to(&mut tcp).await
}

/// A family of gauges or counters, registered under `name`.
fn family<M>(reg: &mut Registry, name: &str, help: &str) -> Family<Labels, M>
where
    M: prometheus_client::metrics::TypedMetric
        + prometheus_client::encoding::EncodeMetric
        + Default
        + Clone
        + std::fmt::Debug
        + Send
        + Sync
        + 'static,
{
    let f = Family::<Labels, M>::default();
    reg.register(name, help, f.clone());
    f
}

/// A gauge without labels, registered under `name` with value `v`.
fn gauge(reg: &mut Registry, name: &str, help: &str, v: i64) {
    let g = Gauge::<i64>::default();
    g.set(v);
    reg.register(name, help, g);
}

fn count(f: &Family<Labels, Counter>, labels: Labels, v: u64) {
    f.get_or_create(&labels).inc_by(v);
}

fn set(f: &Family<Labels, Gauge>, labels: Labels, v: i64) {
    f.get_or_create(&labels).set(v);
}

/// The whole exposition, now.
pub fn render(gw: &Gateway) -> String {
    let mut reg = Registry::with_prefix("vpn");
    let stats = gw.stats();
    let rows = gw.session_rows();

    let sessions = family::<Gauge>(
        &mut reg,
        "sessions",
        "Sessions by transport (tls, dtls, or none while disconnected) and group policy",
    );
    for r in &rows {
        let labels = vec![
            ("transport", r.transport.clone()),
            ("policy", r.group_policy.clone().unwrap_or_default()),
        ];
        sessions.get_or_create(&labels).inc();
    }
    gauge(
        &mut reg,
        "sessions_max",
        "server.max_sessions",
        stats.max_sessions.into(),
    );
    let pool = family::<Gauge>(&mut reg, "pool_addresses", "Client addresses of the pool");
    set(
        &pool,
        vec![("state", "in_use".into())],
        stats.pool_in_use as i64,
    );
    set(
        &pool,
        vec![("state", "capacity".into())],
        stats.pool_capacity.into(),
    );

    let traffic = gw.sessions.traffic_totals();
    let bytes = family::<Counter>(
        &mut reg,
        "client_bytes",
        "Bytes through the tunnels since start (in: from clients)",
    );
    count(&bytes, vec![("direction", "in".into())], traffic.rx_bytes);
    count(&bytes, vec![("direction", "out".into())], traffic.tx_bytes);
    let packets = family::<Counter>(&mut reg, "client_packets", "Packets through the tunnels");
    count(
        &packets,
        vec![("direction", "in".into())],
        traffic.rx_packets,
    );
    count(
        &packets,
        vec![("direction", "out".into())],
        traffic.tx_packets,
    );
    let denied = family::<Counter>(
        &mut reg,
        "policy_denied_packets",
        "Packets denied by policies",
    );
    count(&denied, vec![("direction", "in".into())], traffic.rx_denied);
    count(
        &denied,
        vec![("direction", "out".into())],
        traffic.tx_denied,
    );

    let drops = family::<Counter>(&mut reg, "bpf_drops", "Packets the BPF programs dropped");
    for (reason, n) in &stats.drops {
        count(&drops, vec![("reason", reason.clone())], *n);
    }
    let dd = family::<Counter>(
        &mut reg,
        "daemon_drops",
        "Packets the daemon dropped before the tunnel device",
    );
    for (reason, n) in &stats.daemon_drops {
        count(&dd, vec![("reason", reason.clone())], *n);
    }

    let logins = family::<Counter>(
        &mut reg,
        "logins",
        "Logins by result: success, or why not (failure reasons, unavailable, refused)",
    );
    for (result, n) in gw.login.outcomes() {
        count(&logins, vec![("result", result)], n);
    }

    let a = &stats.admission;
    gauge(
        &mut reg,
        "login_connections",
        "Connections that are not tunnels",
        a.connections as i64,
    );
    gauge(
        &mut reg,
        "pending_logins",
        "Logins in progress",
        a.pending_logins as i64,
    );
    let refused = family::<Counter>(
        &mut reg,
        "admission_refused",
        "Connections and logins the limits before authentication refused",
    );
    for (why, n) in [
        ("connections_total", a.connections_refused_total),
        ("connections_per_source", a.connections_refused_source),
        ("logins_busy", a.logins_refused_busy),
        ("logins_source_busy", a.logins_refused_source_busy),
        ("logins_source_locked", a.logins_refused_source_locked),
        ("logins_user_locked", a.logins_refused_user_locked),
        ("verifications_busy", a.verifications_refused_busy),
        ("logins_memory", a.logins_refused_memory),
        ("connections_descriptors", a.connections_refused_descriptors),
    ] {
        count(&refused, vec![("limit", why.into())], n);
    }

    let b = &stats.bans;
    gauge(
        &mut reg,
        "bans_active",
        "Sources banned now (ban points or vpnctl ban)",
        b.active as i64,
    );
    let offences = family::<Counter>(
        &mut reg,
        "ban_offences",
        "Offences that scored ban points, by kind",
    );
    for (kind, n) in &b.offences {
        count(&offences, vec![("offence", kind.clone())], *n);
    }
    let bans = family::<Counter>(
        &mut reg,
        "bans",
        "Bans made by ban points, and connections of banned sources closed at accept",
    );
    count(&bans, vec![("what", "banned".into())], b.banned_total);
    count(
        &bans,
        vec![("what", "closed_at_accept".into())],
        b.refused_at_accept,
    );

    if let Some(o) = &stats.offloads {
        let f = family::<Gauge>(
            &mut reg,
            "kernel_offload_enabled",
            "Kernel offloads the data path uses (tunnel.offloads and what the kernel has)",
        );
        for (name, on) in [
            ("tun_tso", o.tun_tso),
            ("udp_gso", o.udp_gso),
            ("udp_gro", o.udp_gro),
        ] {
            set(&f, vec![("offload", name.into())], i64::from(on));
        }
    }
    if let Some(rx) = &stats.dtls_rx {
        let g = family::<Counter>(
            &mut reg,
            "dtls_gso_sends",
            "Messages of several DTLS datagrams sent with UDP GSO",
        );
        count(&g, vec![], rx.gso_messages);
        let d = family::<Counter>(&mut reg, "dtls_datagrams", "DTLS datagrams received");
        count(&d, vec![("kind", "all".into())], rx.datagrams);
        count(&d, vec![("kind", "malformed".into())], rx.malformed);
        let w = family::<Counter>(
            &mut reg,
            "dtls_worker_datagrams",
            "DTLS datagrams each packet worker received",
        );
        let wp = family::<Counter>(
            &mut reg,
            "dtls_worker_packets_out",
            "Packets each packet worker sent to its clients",
        );
        for (i, wk) in rx.workers.iter().enumerate() {
            count(&w, vec![("worker", i.to_string())], wk.datagrams_in);
            count(&wp, vec![("worker", i.to_string())], wk.packets_out);
        }
    }
    if let Some(h) = &stats.dtls_handshakes {
        gauge(
            &mut reg,
            "dtls_handshakes_in_progress",
            "DTLS handshakes now",
            h.in_progress as i64,
        );
        gauge(
            &mut reg,
            "dtls_channels_holding_openssl",
            "Established DTLS channels still holding OpenSSL's state (until their client's first record)",
            h.holding_openssl as i64,
        );
        let r = family::<Counter>(
            &mut reg,
            "dtls_handshakes_refused",
            "DTLS handshakes refused",
        );
        count(&r, vec![("limit", "total".into())], h.refused_total);
        count(
            &r,
            vec![("limit", "per_source".into())],
            h.refused_per_source,
        );
        count(&r, vec![("limit", "per_offer".into())], h.refused_per_offer);
        count(&r, vec![("limit", "after".into())], h.refused_after);
    }
    if let Some(acct) = &stats.accounting {
        let c = family::<Counter>(
            &mut reg,
            "radius_accounting_records",
            "RADIUS accounting records",
        );
        count(&c, vec![("result", "sent".into())], acct.sent);
        count(&c, vec![("result", "failed".into())], acct.failed);
        count(&c, vec![("result", "dropped".into())], acct.dropped);
    }

    if !gw.settings.uplinks.is_empty() {
        let up = family::<Gauge>(&mut reg, "uplink_up", "1 while an uplink is healthy");
        let active = family::<Gauge>(
            &mut reg,
            "uplink_active",
            "1 for the uplink VPN traffic uses",
        );
        let rtt = family::<Gauge<f64, std::sync::atomic::AtomicU64>>(
            &mut reg,
            "uplink_probe_rtt_seconds",
            "The last probe's round trip",
        );
        for row in gw.broker.uplinks() {
            let l = vec![("uplink", row.name.clone())];
            set(&up, l.clone(), i64::from(row.state == "up"));
            set(&active, l.clone(), i64::from(row.role == "active"));
            if let Some(ms) = row.last_rtt_ms {
                rtt.get_or_create(&l).set(ms / 1000.0);
            }
        }
    }

    if !gw.settings.web_proxies.is_empty() {
        let up = family::<Gauge>(
            &mut reg,
            "web_proxy_up",
            "1 while the web proxy answers its health probe",
        );
        let failed = family::<Counter>(
            &mut reg,
            "web_proxy_probes_failed",
            "Health probes of the web proxy that failed",
        );
        for row in gw.broker.web_proxies() {
            let l = vec![("proxy", row.name.clone())];
            set(&up, l.clone(), i64::from(row.state == "up"));
            count(&failed, l, row.probes_failed);
        }
    }
    let changes = Counter::<u64>::default();
    changes.inc_by(gw.sessions.journal().seq());
    reg.register(
        "identity_changes",
        "Changes of who holds which VPN address since start (the identity feed's last sequence number)",
        changes,
    );

    let hits = family::<Counter>(
        &mut reg,
        "policy_rule_hits",
        "Packets each rule matched (the first 64 rules of each policy)",
    );
    for (policy, rule, n) in gw.rule_hits(MAX_RULE_SERIES) {
        count(
            &hits,
            vec![("policy", policy), ("rule", rule.to_string())],
            n,
        );
    }

    reg.register(
        "tls_handshake_seconds",
        "TCP accepted to TLS established",
        gw.latencies.tls_handshake.clone(),
    );
    reg.register(
        "login_seconds",
        "An auth-reply to its answer (password check, RADIUS or LDAP, session creation)",
        gw.latencies.login.clone(),
    );
    process(&mut reg);

    let mut out = String::with_capacity(8192);
    encode(&mut out, &reg).expect("writing to a String cannot fail");
    out
}

/// The process's resident memory, CPU time and open descriptors, from
/// /proc/self.
fn process(reg: &mut Registry) {
    if let Ok(statm) = std::fs::read_to_string("/proc/self/statm")
        && let Some(pages) = statm
            .split_whitespace()
            .nth(1)
            .and_then(|p| p.parse::<i64>().ok())
    {
        // SAFETY: sysconf has no preconditions.
        let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
        gauge(
            reg,
            "process_resident_memory_bytes",
            "Resident memory",
            pages * page,
        );
    }
    if let Ok(stat) = std::fs::read_to_string("/proc/self/stat")
        // The fields after the command name, which is in parentheses.
        && let Some(rest) = stat.rsplit_once(')').map(|(_, r)| r)
    {
        let f: Vec<&str> = rest.split_whitespace().collect();
        // utime and stime are fields 14 and 15 of stat: 11 and 12 here.
        let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
        // SAFETY: sysconf has no preconditions.
        let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
        let cpu = Gauge::<f64, std::sync::atomic::AtomicU64>::default();
        cpu.set((ticks(11) + ticks(12)) / hz.max(1.0));
        reg.register(
            "process_cpu_seconds",
            "User and system CPU time since start",
            cpu,
        );
    }
    if let Ok(dir) = std::fs::read_dir("/proc/self/fd") {
        gauge(
            reg,
            "process_open_fds",
            "Open file descriptors",
            dir.count() as i64,
        );
    }
}
