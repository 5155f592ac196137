//! Uplinks: which WAN link client traffic leaves through, its NAT, and
//! failover between links.
//!
//! The pieces, all owned by the daemon and removed when it stops (and
//! cleaned at start, after a crash):
//! - marks: `tun_ingress` marks each client packet with the active uplink's
//!   number and, for destinations in that uplink's `nat_exempt` prefixes,
//!   an exemption bit (`uplink_active`, `nat_exempt` maps; see vpn-common);
//! - routing (rtnetlink): one table per uplink with its default route;
//!   `ip rule`s from `failover.rule_priority` on: main table without its
//!   default route first (specific routes, e.g. the LAN, win), then the
//!   table of the uplink a packet is marked for, then each uplink's own
//!   address to its table (replies to clients that came in on that uplink
//!   leave on it);
//! - NAT (nftables, through nft's JSON API): table `inet vpn_gateway` with a
//!   masquerade rule per uplink matching its mark without the exemption
//!   bit, replaced in one transaction; no other table is touched;
//! - health: carrier from rtnetlink link events, and an ICMP echo probe per
//!   uplink sent out of its interface. When the active uplink is judged
//!   down, the best healthy one (lowest priority) becomes active: one map
//!   write, so new flows follow at once; a preferred uplink that recovers
//!   gets traffic back after `failover.hold_secs` of health.

use std::{
    net::{IpAddr, Ipv4Addr, SocketAddr},
    os::fd::AsRawFd,
    sync::{
        Arc,
        atomic::{AtomicU32, Ordering},
    },
    time::{Duration, Instant},
};

use crate::api::UplinkRow;
use anyhow::{Context as _, anyhow};
use futures::{StreamExt as _, TryStreamExt as _};
use netlink_packet_route::{
    link::{LinkAttribute, LinkFlag, LinkMessage},
    rule::RuleAttribute,
};
use netlink_sys::AsyncSocket as _;
use parking_lot::Mutex;
use tokio::io::unix::AsyncFd;
use vpn_common::{MARK_BASE, MARK_EXEMPT, MARK_MASK, MARK_UPLINK, MAX_UPLINKS};

use crate::{
    config::{FailoverConfig, UplinkConfig},
    datapath::bpf::LocalDatapath,
    events::{Event, EventLog},
    net::netlink::get_link,
};

pub mod failover;

/// The nft table the daemon owns.
pub const NFT_TABLE: &str = "vpn_gateway";

/// `ip rule` priorities used: `rule_priority ..= rule_priority + RULE_SPAN`.
const RULE_SPAN: u32 = 1 + 2 * MAX_UPLINKS;

/// The mark of packets for uplink `number` (1-based).
pub fn mark(number: u32) -> u32 {
    MARK_BASE | number
}

#[derive(Debug, Default)]
struct LinkState {
    ifindex: u32,
    address: Option<Ipv4Addr>,
    carrier: bool,
    failures: u32,
    /// Since when it has been healthy; `None` while down.
    healthy_since: Option<Instant>,
    last_rtt: Option<Duration>,
    probes_sent: u64,
    probes_lost: u64,
    rx_bytes: u64,
    tx_bytes: u64,
}

/// The uplinks and their live state.
pub struct Uplinks {
    cfg: Vec<UplinkConfig>,
    failover: FailoverConfig,
    state: Mutex<(Vec<LinkState>, Option<usize>)>,
    /// The healthy set last written to the data path (`u32::MAX` = none
    /// yet), so each probe does not rewrite it.
    healthy_mask: AtomicU32,
    datapath: LocalDatapath,
    events: Arc<EventLog>,
}

impl Uplinks {
    fn healthy(&self, links: &[LinkState], i: usize) -> bool {
        links[i].carrier && links[i].failures < self.cfg[i].probe.failures
    }

    fn probe_target(&self, i: usize) -> Ipv4Addr {
        self.cfg[i].probe.target.unwrap_or(self.cfg[i].gateway)
    }

    /// Sets up routing, NAT and marks, and starts the health checks.
    pub async fn start(
        cfg: &[UplinkConfig],
        failover: &FailoverConfig,
        datapath: LocalDatapath,
        events: Arc<EventLog>,
    ) -> anyhow::Result<Arc<Uplinks>> {
        let (conn, handle, _) = rtnetlink::new_connection().context("opening rtnetlink socket")?;
        tokio::spawn(conn);
        let mut links = Vec::new();
        for u in cfg {
            let link = get_link(&handle, &u.interface)
                .await
                .with_context(|| format!("uplink '{}': interface {}", u.name, u.interface))?;
            let address = first_v4(&handle, link.header.index).await?;
            links.push(LinkState {
                ifindex: link.header.index,
                address,
                carrier: carrier(&link),
                ..Default::default()
            });
        }
        let me = Arc::new(Uplinks {
            cfg: cfg.to_vec(),
            failover: failover.clone(),
            state: Mutex::new((links, None)),
            healthy_mask: AtomicU32::new(u32::MAX),
            datapath,
            events,
        });
        me.install(&handle).await?;
        {
            let mut dp = me.datapath.lock();
            let exempt: Vec<(u32, ipnet::IpNet)> = cfg
                .iter()
                .enumerate()
                .flat_map(|(i, u)| u.nat_exempt.iter().map(move |n| (i as u32 + 1, *n)))
                .collect();
            dp.set_exempt(&exempt)?;
        }
        // Carrier counts at once; probes confirm within their interval.
        {
            let now = Instant::now();
            let mut st = me.state.lock();
            for l in st.0.iter_mut() {
                if l.carrier {
                    l.healthy_since = Some(now);
                }
            }
        }
        me.decide();
        // The probes' raw sockets are opened now, while the daemon still
        // holds CAP_NET_RAW: it drops it once it serves.
        for (i, u) in cfg.iter().enumerate() {
            match probe_socket(&u.interface, mark(i as u32 + 1)) {
                Ok(socket) => {
                    tokio::spawn(me.clone().probe_loop(i, socket, handle.clone()));
                }
                Err(e) => tracing::error!(uplink = u.name, "probe socket: {e:#}"),
            }
        }
        tokio::spawn(me.clone().watch_links());
        Ok(me)
    }

    /// Routes, rules and the nft table, from scratch.
    async fn install(&self, handle: &rtnetlink::Handle) -> anyhow::Result<()> {
        cleanup(&self.failover).await?;
        let base = self.failover.rule_priority;
        let st = self
            .state
            .lock()
            .0
            .iter()
            .map(|l| (l.ifindex, l.address))
            .collect::<Vec<_>>();
        let to_table = netlink_packet_route::rule::RuleAction::ToTable;
        let mut main_first = handle
            .rule()
            .add()
            .v4()
            .priority(base)
            .table_id(254)
            .action(to_table);
        main_first
            .message_mut()
            .attributes
            .push(RuleAttribute::SuppressPrefixLen(0));
        main_first
            .execute()
            .await
            .context("adding the main-table rule (ip rule)")?;
        for (i, u) in self.cfg.iter().enumerate() {
            let table = self.failover.table_base + i as u32;
            let (ifindex, address) = st[i];
            handle
                .route()
                .add()
                .v4()
                .table_id(table)
                .output_interface(ifindex)
                .gateway(u.gateway)
                .execute()
                .await
                .with_context(|| {
                    format!(
                        "uplink '{}': default route via {} dev {} table {table}",
                        u.name, u.gateway, u.interface
                    )
                })?;
            let number = i as u32 + 1;
            let mut by_mark = handle
                .rule()
                .add()
                .v4()
                .priority(base + number)
                .table_id(table)
                .action(to_table)
                .fw_mark(mark(number));
            by_mark
                .message_mut()
                .attributes
                .push(RuleAttribute::FwMask(MARK_MASK | MARK_UPLINK));
            by_mark
                .execute()
                .await
                .with_context(|| format!("uplink '{}': mark rule", u.name))?;
            if let Some(a) = address {
                handle
                    .rule()
                    .add()
                    .v4()
                    .priority(base + MAX_UPLINKS + number)
                    .table_id(table)
                    .action(to_table)
                    .source_prefix(a, 32)
                    .execute()
                    .await
                    .with_context(|| format!("uplink '{}': rule from {a}", u.name))?;
            }
        }
        apply_nft(&self.cfg)
    }

    /// Picks the active uplink after a health change ([`failover::decide`])
    /// and applies it: one map write each for the healthy set and the
    /// active uplink, then the event.
    fn decide(&self) {
        let mut st = self.state.lock();
        let (links, active) = &mut *st;
        let hold = Duration::from_secs(self.failover.hold_secs);
        let health: Vec<failover::Health> = (0..self.cfg.len())
            .map(|i| failover::Health {
                priority: self.cfg[i].priority,
                healthy: self.healthy(links, i),
                healthy_since: links[i].healthy_since,
            })
            .collect();
        let mask = (0..health.len())
            .filter(|&i| health[i].healthy)
            .fold(0u32, |m, i| m | (1 << i));
        if self.healthy_mask.swap(mask, Ordering::Relaxed) != mask
            && let Err(e) = self.datapath.lock().set_healthy_uplinks(mask)
        {
            tracing::error!("updating uplink health: {e}");
        }
        let Some(switch) = failover::decide(&health, *active, hold, Instant::now()) else {
            return;
        };
        let why = match switch.why {
            failover::Why::Start => "start".to_string(),
            failover::Why::Down(a) => format!("{} is down", self.cfg[a].name),
            failover::Why::Recovered(b) => {
                format!("{} healthy for {} s", self.cfg[b].name, hold.as_secs())
            }
        };
        let from = active.map(|a| self.cfg[a].name.clone());
        let to = self.cfg[switch.to].name.clone();
        if let Err(e) = self.datapath.lock().set_active_uplink(switch.to as u32 + 1) {
            tracing::error!("switching uplinks: {e}");
            return;
        }
        *active = Some(switch.to);
        drop(st);
        tracing::info!(from = ?from, to, "uplink failover: {why}");
        self.events.emit(Event::UplinkFailover {
            from,
            to,
            reason: why,
        });
    }

    /// One ICMP echo per interval out of the uplink's interface, marked for
    /// its table.
    async fn probe_loop(
        self: Arc<Self>,
        i: usize,
        socket: AsyncFd<socket2::Socket>,
        handle: rtnetlink::Handle,
    ) {
        let u = &self.cfg[i];
        let interval = Duration::from_millis(u.probe.interval_ms);
        let target = self.probe_target(i);
        let id = (std::process::id() as u16) ^ (i as u16).wrapping_mul(0x9e37);
        let mut seq: u16 = 0;
        let mut tick = tokio::time::interval(interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            seq = seq.wrapping_add(1);
            let sent = Instant::now();
            let ok = echo(&socket, target, id, seq, interval).await;
            let stats = get_link(&handle, &u.interface).await.ok();
            {
                let mut st = self.state.lock();
                let l = &mut st.0[i];
                l.probes_sent += 1;
                let was = l.failures < u.probe.failures;
                if ok {
                    l.failures = 0;
                    l.last_rtt = Some(sent.elapsed());
                } else {
                    l.failures = l.failures.saturating_add(1);
                    l.probes_lost += 1;
                }
                if let Some(link) = &stats {
                    for a in &link.attributes {
                        if let LinkAttribute::Stats64(s) = a {
                            l.rx_bytes = s.rx_bytes;
                            l.tx_bytes = s.tx_bytes;
                        }
                    }
                }
                let now_ok = l.failures < u.probe.failures;
                if was != now_ok {
                    self.state_change(l, now_ok && l.carrier, i, "probe");
                }
            }
            self.decide();
        }
    }

    fn state_change(&self, l: &mut LinkState, up: bool, i: usize, why: &str) {
        let name = &self.cfg[i].name;
        if up {
            if l.healthy_since.is_none() {
                l.healthy_since = Some(Instant::now());
            }
        } else {
            l.healthy_since = None;
        }
        let reason = match (why, up) {
            ("probe", true) => format!("probe to {} answers again", self.probe_target(i)),
            ("probe", false) => format!(
                "{} probes to {} lost",
                self.cfg[i].probe.failures,
                self.probe_target(i)
            ),
            (_, true) => "carrier up".into(),
            (_, false) => "carrier lost".into(),
        };
        tracing::info!(uplink = name, up, "uplink state: {reason}");
        self.events.emit(Event::UplinkState {
            uplink: name.clone(),
            state: if up { "up" } else { "down" }.into(),
            reason,
        });
    }

    /// Carrier changes, from rtnetlink link events.
    async fn watch_links(self: Arc<Self>) {
        let result: std::io::Result<()> = async {
            let (mut conn, _, mut messages) = rtnetlink::new_connection()?;
            conn.socket_mut()
                .socket_mut()
                .bind(&netlink_sys::SocketAddr::new(
                    0,
                    rtnetlink::constants::RTMGRP_LINK,
                ))?;
            tokio::spawn(conn);
            while let Some((msg, _)) = messages.next().await {
                let netlink_packet_core::NetlinkPayload::InnerMessage(m) = msg.payload else {
                    continue;
                };
                let link = match m {
                    netlink_packet_route::RouteNetlinkMessage::NewLink(l) => l,
                    netlink_packet_route::RouteNetlinkMessage::DelLink(mut l) => {
                        l.header.flags.clear();
                        l
                    }
                    _ => continue,
                };
                let up = carrier(&link);
                let changed = {
                    let mut st = self.state.lock();
                    let Some(i) = st.0.iter().position(|l| l.ifindex == link.header.index) else {
                        continue;
                    };
                    let l = &mut st.0[i];
                    if l.carrier == up {
                        continue;
                    }
                    l.carrier = up;
                    let healthy = up && l.failures < self.cfg[i].probe.failures;
                    self.state_change(l, healthy, i, "carrier");
                    true
                };
                if changed {
                    self.decide();
                }
            }
            Ok(())
        }
        .await;
        if let Err(e) = result {
            tracing::error!("watching uplink carriers: {e}");
        }
    }

    pub fn rows(&self) -> Vec<UplinkRow> {
        let st = self.state.lock();
        let (links, active) = &*st;
        self.cfg
            .iter()
            .enumerate()
            .map(|(i, u)| {
                let l = &links[i];
                UplinkRow {
                    name: u.name.clone(),
                    interface: u.interface.clone(),
                    priority: u.priority,
                    role: if *active == Some(i) {
                        "active"
                    } else {
                        "standby"
                    }
                    .into(),
                    state: if self.healthy(links, i) { "up" } else { "down" }.into(),
                    carrier: l.carrier,
                    probe_target: self.probe_target(i).to_string(),
                    consecutive_failures: l.failures,
                    last_rtt_ms: l.last_rtt.map(|d| d.as_secs_f64() * 1e3),
                    probes_sent: l.probes_sent,
                    probes_lost: l.probes_lost,
                    address: l.address.map(|a| a.to_string()),
                    rx_bytes: l.rx_bytes,
                    tx_bytes: l.tx_bytes,
                }
            })
            .collect()
    }
}

/// Removes everything the daemon installs for uplinks: its nft table, its
/// `ip rule`s (by priority range) and the routes in its tables. Safe to
/// call when nothing is there.
pub async fn cleanup(f: &FailoverConfig) -> anyhow::Result<()> {
    // Adding first makes the delete valid whether or not the table exists.
    let table = || {
        nftables::schema::NfListObject::Table(nftables::schema::Table {
            family: nftables::types::NfFamily::INet,
            name: NFT_TABLE.into(),
            ..Default::default()
        })
    };
    let mut batch = nftables::batch::Batch::new();
    batch.add(table());
    batch.delete(table());
    nftables::helper::apply_ruleset(&batch.to_nftables())
        .map_err(|e| anyhow!("removing nft table {NFT_TABLE}: {e}"))?;

    let (conn, handle, _) = rtnetlink::new_connection().context("opening rtnetlink socket")?;
    tokio::spawn(conn);
    crate::net::netlink::delete_owned(
        &handle,
        f.rule_priority..=f.rule_priority + RULE_SPAN,
        f.table_base..=f.table_base + MAX_UPLINKS - 1,
    )
    .await
}

/// The daemon's nft table: a masquerade rule per masquerading uplink, for
/// packets marked for it without the exemption bit. One transaction (add,
/// delete, re-create), so there is never a moment without the rules.
fn apply_nft(cfg: &[UplinkConfig]) -> anyhow::Result<()> {
    use nftables::{
        batch::Batch,
        expr::{BinaryOperation, Expression, Meta, MetaKey, NamedExpression},
        schema::{Chain, NfListObject, Rule, Table},
        stmt::{Match, Operator, Statement},
        types::{NfChainPolicy, NfChainType, NfFamily, NfHook},
    };
    let table = || Table {
        family: NfFamily::INet,
        name: NFT_TABLE.into(),
        ..Default::default()
    };
    let mut b = Batch::new();
    b.add(NfListObject::Table(table()));
    b.delete(NfListObject::Table(table()));
    b.add(NfListObject::Table(table()));
    b.add(NfListObject::Chain(Chain {
        family: NfFamily::INet,
        table: NFT_TABLE.into(),
        name: "postrouting".into(),
        _type: Some(NfChainType::NAT),
        hook: Some(NfHook::Postrouting),
        prio: Some(100),
        policy: Some(NfChainPolicy::Accept),
        ..Default::default()
    }));
    for (i, u) in cfg.iter().enumerate() {
        if !u.masquerade {
            continue;
        }
        let number = i as u32 + 1;
        let stmts = vec![
            Statement::Match(Match {
                left: Expression::BinaryOperation(Box::new(BinaryOperation::AND(
                    Expression::Named(NamedExpression::Meta(Meta { key: MetaKey::Mark })),
                    Expression::Number(MARK_MASK | MARK_UPLINK | MARK_EXEMPT),
                ))),
                right: Expression::Number(mark(number)),
                op: Operator::EQ,
            }),
            Statement::Match(Match {
                left: Expression::Named(NamedExpression::Meta(Meta {
                    key: MetaKey::Oifname,
                })),
                right: Expression::String(u.interface.clone().into()),
                op: Operator::EQ,
            }),
            Statement::Masquerade(None),
        ];
        b.add(NfListObject::Rule(Rule {
            family: NfFamily::INet,
            table: NFT_TABLE.into(),
            chain: "postrouting".into(),
            expr: stmts.into(),
            comment: Some(format!("uplink {}", u.name).into()),
            ..Default::default()
        }));
    }
    nftables::helper::apply_ruleset(&b.to_nftables())
        .map_err(|e| anyhow!("applying nft table {NFT_TABLE}: {e}"))
}

async fn first_v4(handle: &rtnetlink::Handle, index: u32) -> anyhow::Result<Option<Ipv4Addr>> {
    let mut addrs = handle
        .address()
        .get()
        .set_link_index_filter(index)
        .execute();
    while let Some(a) = addrs.try_next().await? {
        for attr in a.attributes {
            if let netlink_packet_route::address::AddressAttribute::Local(IpAddr::V4(v4)) = attr {
                return Ok(Some(v4));
            }
        }
    }
    Ok(None)
}

fn carrier(link: &LinkMessage) -> bool {
    link.header.flags.contains(&LinkFlag::Up) && link.header.flags.contains(&LinkFlag::LowerUp)
}

fn probe_socket(iface: &str, mark: u32) -> anyhow::Result<AsyncFd<socket2::Socket>> {
    use socket2::{Domain, Protocol, Socket, Type};
    let s =
        Socket::new(Domain::IPV4, Type::RAW, Some(Protocol::ICMPV4)).context("raw ICMP socket")?;
    s.bind_device(Some(iface.as_bytes()))
        .with_context(|| format!("binding the probe to {iface}"))?;
    s.set_mark(mark).context("SO_MARK on the probe")?;
    s.set_nonblocking(true)?;
    // SAFETY: the socket is open and owned by the AsyncFd from here on.
    unsafe { AsyncFd::register(s) }
        .map_err(|e| anyhow!("registering the probe: {}", e.into_parts().1))
}

/// Sends an echo request and waits up to `timeout` for its reply.
async fn echo(
    socket: &AsyncFd<socket2::Socket>,
    target: Ipv4Addr,
    id: u16,
    seq: u16,
    timeout: Duration,
) -> bool {
    let mut pkt = [0u8; 24];
    pkt[0] = 8;
    pkt[4..6].copy_from_slice(&id.to_be_bytes());
    pkt[6..8].copy_from_slice(&seq.to_be_bytes());
    pkt[8..24].copy_from_slice(b"vpn-gateway-prob");
    let c = !crate::packet::csum::checksum(&pkt, 0);
    pkt[2..4].copy_from_slice(&c.to_be_bytes());
    let to = socket2::SockAddr::from(SocketAddr::new(IpAddr::V4(target), 0));
    if socket.get_ref().send_to(&pkt, &to).is_err() {
        // No route or link down: counts as lost, after the interval.
        tokio::time::sleep(timeout).await;
        return false;
    }
    let wait = async {
        let mut buf = [0u8; 1500];
        loop {
            let Ok(mut guard) = socket.readable().await else {
                return false;
            };
            let n = match guard.try_io(|s| {
                let fd = s.get_ref().as_raw_fd();
                // SAFETY: reading into a buffer we own.
                let r = unsafe { libc::recv(fd, buf.as_mut_ptr().cast(), buf.len(), 0) };
                if r < 0 {
                    Err(std::io::Error::last_os_error())
                } else {
                    Ok(r as usize)
                }
            }) {
                Ok(Ok(n)) => n,
                Ok(Err(_)) => return false,
                Err(_) => continue,
            };
            let d = &buf[..n];
            let ihl = usize::from(d.first().map_or(0, |b| b & 0xf)) * 4;
            // The kernel hands raw sockets a validated IP header; the
            // lengths are checked anyway before anything is sliced.
            if ihl < 20 || n < ihl + 8 || d[12..16] != target.octets() {
                continue;
            }
            let icmp = &d[ihl..];
            if icmp[0] == 0
                && u16::from_be_bytes([icmp[4], icmp[5]]) == id
                && u16::from_be_bytes([icmp[6], icmp[7]]) == seq
            {
                return true;
            }
        }
    };
    tokio::time::timeout(timeout, wait).await.unwrap_or(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn icmp_checksum() {
        // An echo request whose checksum field holds the right value sums
        // to zero.
        let mut p = [8u8, 0, 0, 0, 0x12, 0x34, 0, 1, b'a', b'b', b'c'];
        let c = !crate::packet::csum::checksum(&p, 0);
        p[2..4].copy_from_slice(&c.to_be_bytes());
        assert_eq!(crate::packet::csum::checksum(&p, 0), 0xffff);
    }

    #[test]
    fn marks_keep_uplink_and_exemption_apart() {
        assert_eq!(mark(1) & MARK_MASK, MARK_BASE);
        assert_eq!(mark(16) & MARK_UPLINK, 16);
        assert_eq!((mark(3) | MARK_EXEMPT) & (MARK_MASK | MARK_UPLINK), mark(3));
        assert_ne!(
            (mark(3) | MARK_EXEMPT) & (MARK_MASK | MARK_UPLINK | MARK_EXEMPT),
            mark(3)
        );
    }
}
