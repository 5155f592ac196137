//! Web proxies (`[[web_proxy]]`): where policies with `web_proxy` send
//! their clients' web traffic, unchanged, for the proxy to intercept (the
//! WCCP-like model: the proxy host redirects it to its intercepting port).
//!
//! - marks: `tun_ingress` marks such packets with the proxy's number while
//!   the proxy is healthy (`web_proxy_up`; see vpn-common);
//! - routing (rtnetlink): one table per proxy, `default via ADDRESS`, and
//!   an `ip rule` per proxy's mark, just below `failover.rule_priority` so
//!   it comes before the main table's specific routes (the web server may
//!   well be on the LAN) and the uplinks;
//! - health: a TCP connection to `probe_port` every `interval_ms`;
//!   `failures` in a row make the proxy down, one success up again. The
//!   first round runs before vpnd serves, so no policy starts on a guess.
//!
//! All removed when the broker stops, and at start after a crash.

use std::{
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicU32, Ordering},
    },
    time::Duration,
};

use anyhow::Context as _;
use netlink_packet_route::rule::RuleAttribute;
use vpn_common::{MARK_BASE, MARK_WEB, MAX_UPLINKS, MAX_WEB_PROXIES};

use crate::{
    config::{FailoverConfig, WebProxyConfig},
    datapath::bpf::LocalDatapath,
    events::{Event, EventLog},
};

/// The mark of packets for proxy `number` (1-based).
pub fn mark(number: u32) -> u32 {
    MARK_BASE | MARK_WEB | number
}

/// The routing table of proxy `number` (1-based): after the uplinks'.
fn table(f: &FailoverConfig, number: u32) -> u32 {
    f.table_base + MAX_UPLINKS + number - 1
}

/// The `ip rule` priority of proxy `number`: below the uplinks' first.
fn priority(f: &FailoverConfig, number: u32) -> u32 {
    f.rule_priority - MAX_WEB_PROXIES + number - 1
}

/// A proxy's probes, for `vpnctl web-proxies`.
#[derive(Debug, Clone, Copy)]
struct Probes {
    failures: u32,
    sent: u64,
    failed: u64,
    since: std::time::Instant,
}

/// The proxies, their health, and where it goes.
pub struct WebProxies {
    cfg: Vec<WebProxyConfig>,
    /// Bit n-1: proxy n is up.
    healthy: AtomicU32,
    probes: parking_lot::Mutex<Vec<Probes>>,
    datapath: LocalDatapath,
    events: Arc<EventLog>,
}

impl WebProxies {
    /// Installs the routes and rules, probes each proxy once, and keeps
    /// probing.
    pub async fn start(
        cfg: &[WebProxyConfig],
        f: &FailoverConfig,
        datapath: LocalDatapath,
        events: Arc<EventLog>,
    ) -> anyhow::Result<Arc<Self>> {
        let (conn, handle, _) = rtnetlink::new_connection().context("opening rtnetlink socket")?;
        tokio::spawn(conn);
        for (i, w) in cfg.iter().enumerate() {
            let n = i as u32 + 1;
            handle
                .route()
                .add()
                .v4()
                .table_id(table(f, n))
                .gateway(w.address)
                .execute()
                .await
                .with_context(|| {
                    format!(
                        "web proxy '{}': default route via {} table {} (is {} on a connected network?)",
                        w.name,
                        w.address,
                        table(f, n),
                        w.address
                    )
                })?;
            let mut rule = handle
                .rule()
                .add()
                .v4()
                .priority(priority(f, n))
                .table_id(table(f, n))
                .action(netlink_packet_route::rule::RuleAction::ToTable)
                .fw_mark(mark(n));
            rule.message_mut()
                .attributes
                .push(RuleAttribute::FwMask(u32::MAX));
            rule.execute()
                .await
                .with_context(|| format!("web proxy '{}': mark rule", w.name))?;
        }
        let me = Arc::new(WebProxies {
            cfg: cfg.to_vec(),
            healthy: AtomicU32::new(0),
            probes: parking_lot::Mutex::new(vec![
                Probes {
                    failures: 0,
                    sent: 0,
                    failed: 0,
                    since: std::time::Instant::now(),
                };
                cfg.len()
            ]),
            datapath,
            events,
        });
        let first =
            futures::future::join_all((0..cfg.len()).map(|i| probe(me.target(i), me.timeout(i))))
                .await;
        let mut mask = 0;
        for (i, up) in first.into_iter().enumerate() {
            let mut p = me.probes.lock();
            p[i].sent += 1;
            if !up {
                p[i].failed += 1;
                p[i].failures = cfg[i].failures;
            }
            drop(p);
            tracing::info!(
                proxy = cfg[i].name,
                address = %cfg[i].address,
                "web proxy {}",
                if up { "up" } else { "down" }
            );
            if up {
                mask |= 1 << i;
            }
        }
        me.healthy.store(mask, Ordering::Relaxed);
        me.datapath.lock().set_healthy_web_proxies(mask)?;
        for i in 0..cfg.len() {
            tokio::spawn(me.clone().probe_loop(i));
        }
        Ok(me)
    }

    fn target(&self, i: usize) -> SocketAddr {
        SocketAddr::from((self.cfg[i].address, self.cfg[i].probe_port))
    }

    fn timeout(&self, i: usize) -> Duration {
        Duration::from_millis(self.cfg[i].interval_ms.min(1000))
    }

    /// Probes proxy `i` for ever; applies its changes.
    async fn probe_loop(self: Arc<Self>, i: usize) {
        let w = &self.cfg[i];
        let mut tick = tokio::time::interval(Duration::from_millis(w.interval_ms));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick.tick().await;
        let mut failures = if self.healthy.load(Ordering::Relaxed) & (1 << i) != 0 {
            0
        } else {
            w.failures
        };
        loop {
            tick.tick().await;
            let ok = probe(self.target(i), self.timeout(i)).await;
            let was_up = failures < w.failures;
            failures = if ok { 0 } else { failures.saturating_add(1) };
            let up = failures < w.failures;
            {
                let mut p = self.probes.lock();
                let p = &mut p[i];
                p.sent += 1;
                p.failed += u64::from(!ok);
                p.failures = failures;
                if up != was_up {
                    p.since = std::time::Instant::now();
                }
            }
            if up != was_up {
                self.set(i, up, ok);
            }
        }
    }

    fn set(&self, i: usize, up: bool, answered: bool) {
        let w = &self.cfg[i];
        let bit = 1u32 << i;
        let mask = if up {
            self.healthy.fetch_or(bit, Ordering::Relaxed) | bit
        } else {
            self.healthy.fetch_and(!bit, Ordering::Relaxed) & !bit
        };
        if let Err(e) = self.datapath.lock().set_healthy_web_proxies(mask) {
            tracing::error!(proxy = w.name, "web proxy health not applied: {e}");
        }
        let reason = if answered {
            format!("{}:{} accepts connections", w.address, w.probe_port)
        } else {
            format!(
                "{} probes in a row to {}:{} failed",
                w.failures, w.address, w.probe_port
            )
        };
        tracing::warn!(
            proxy = w.name,
            "web proxy {}: {reason}",
            if up { "up" } else { "down" }
        );
        self.events.emit(Event::WebProxyState {
            proxy: w.name.clone(),
            state: if up { "up" } else { "down" }.into(),
            reason,
        });
    }
}

impl WebProxies {
    /// Each proxy's state and probes (`vpnctl web-proxies`).
    pub fn rows(&self) -> Vec<crate::api::WebProxyRow> {
        let healthy = self.healthy.load(Ordering::Relaxed);
        let probes = self.probes.lock().clone();
        self.cfg
            .iter()
            .zip(probes)
            .enumerate()
            .map(|(i, (w, p))| crate::api::WebProxyRow {
                name: w.name.clone(),
                address: w.address.to_string(),
                probe: self.target(i).to_string(),
                state: if healthy & (1 << i) != 0 {
                    "up"
                } else {
                    "down"
                }
                .into(),
                consecutive_failures: p.failures,
                probes_sent: p.sent,
                probes_failed: p.failed,
                state_secs: p.since.elapsed().as_secs(),
            })
            .collect()
    }
}

/// Whether `target` accepts a TCP connection within `timeout`.
async fn probe(target: SocketAddr, timeout: Duration) -> bool {
    matches!(
        tokio::time::timeout(timeout, tokio::net::TcpStream::connect(target)).await,
        Ok(Ok(_))
    )
}

/// Removes the rules and routes any run installed for web proxies. Safe
/// to call when nothing is there.
pub async fn cleanup(f: &FailoverConfig) -> anyhow::Result<()> {
    let (conn, handle, _) = rtnetlink::new_connection().context("opening rtnetlink socket")?;
    tokio::spawn(conn);
    crate::net::netlink::delete_owned(
        &handle,
        priority(f, 1)..=priority(f, MAX_WEB_PROXIES),
        table(f, 1)..=table(f, MAX_WEB_PROXIES),
    )
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn marks_rules_and_tables_stay_apart_from_the_uplinks() {
        let f = FailoverConfig::default();
        assert_eq!(mark(1), 0x5650_0201);
        // Below the uplinks' first rule (7100), above the others' tables.
        assert_eq!(priority(&f, 1), 7084);
        assert_eq!(priority(&f, MAX_WEB_PROXIES), 7099);
        assert_eq!(table(&f, 1), 7116);
        assert_eq!(table(&f, MAX_WEB_PROXIES), 7131);
        // An uplink rule (mask MARK_MASK | MARK_UPLINK) never sees a web
        // mark: the web rules come first and match the whole mark.
        assert_ne!(mark(1), crate::net::uplinks::mark(1));
    }
}
