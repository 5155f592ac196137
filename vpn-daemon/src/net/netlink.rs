//! rtnetlink: bringing up the tunnel device with the gateway's addresses
//! (which also installs the pool's routes) and enabling forwarding.

use std::net::IpAddr;

use anyhow::{Context as _, anyhow};
use futures::TryStreamExt as _;

/// The link called `name`.
pub async fn get_link(
    handle: &rtnetlink::Handle,
    name: &str,
) -> anyhow::Result<netlink_packet_route::link::LinkMessage> {
    handle
        .link()
        .get()
        .match_name(name.to_owned())
        .execute()
        .try_next()
        .await
        .with_context(|| format!("looking up link {name}"))?
        .ok_or_else(|| anyhow!("link {name} not found"))
}

/// Sets the MTU, adds the gateway's addresses (with the pool's prefix, so the
/// kernel routes the whole pool to the device) and brings `name` up.
pub async fn configure_tunnel(name: &str, mtu: u16, addrs: &[(IpAddr, u8)]) -> anyhow::Result<u32> {
    let (conn, handle, _) = rtnetlink::new_connection().context("opening rtnetlink socket")?;
    let task = tokio::spawn(conn);
    let result = async {
        let index = get_link(&handle, name).await?.header.index;
        handle
            .link()
            .set(index)
            .mtu(u32::from(mtu))
            .execute()
            .await
            .with_context(|| format!("setting MTU {mtu} on {name}"))?;
        for (ip, prefix) in addrs {
            handle
                .address()
                .add(index, *ip, *prefix)
                .execute()
                .await
                .with_context(|| format!("adding {ip}/{prefix} to {name}"))?;
        }
        handle
            .link()
            .set(index)
            .up()
            .execute()
            .await
            .with_context(|| format!("bringing {name} up"))?;
        Ok::<_, anyhow::Error>(index)
    }
    .await;
    task.abort();
    result
}

/// Enables IPv4 (and, when wanted, IPv6) forwarding in the daemon's network
/// namespace.
pub fn enable_forwarding(ipv6: bool) -> anyhow::Result<()> {
    std::fs::write("/proc/sys/net/ipv4/ip_forward", "1").context("enabling IPv4 forwarding")?;
    if ipv6 {
        std::fs::write("/proc/sys/net/ipv6/conf/all/forwarding", "1")
            .context("enabling IPv6 forwarding")?;
    }
    Ok(())
}

/// Deletes the IPv4 `ip rule`s whose priority is in `priorities` and the
/// IPv4 routes in the tables `tables`: what a component owns by range,
/// removed at stop and after a crash.
pub async fn delete_owned(
    handle: &rtnetlink::Handle,
    priorities: std::ops::RangeInclusive<u32>,
    tables: std::ops::RangeInclusive<u32>,
) -> anyhow::Result<()> {
    use netlink_packet_route::{route::RouteAttribute, rule::RuleAttribute};
    let rules: Vec<_> = handle
        .rule()
        .get(rtnetlink::IpVersion::V4)
        .execute()
        .try_collect()
        .await
        .context("listing ip rules")?;
    for r in rules {
        let prio = r.attributes.iter().find_map(|a| match a {
            RuleAttribute::Priority(p) => Some(*p),
            _ => None,
        });
        if prio.is_some_and(|p| priorities.contains(&p)) {
            handle
                .rule()
                .del(r)
                .execute()
                .await
                .context("deleting an ip rule")?;
        }
    }
    let routes: Vec<_> = handle
        .route()
        .get(rtnetlink::IpVersion::V4)
        .execute()
        .try_collect()
        .await
        .context("listing routes")?;
    for r in routes {
        let table = r.attributes.iter().find_map(|a| match a {
            RouteAttribute::Table(t) => Some(*t),
            _ => None,
        });
        if table.is_some_and(|t| tables.contains(&t)) {
            handle
                .route()
                .del(r)
                .execute()
                .await
                .context("deleting a route")?;
        }
    }
    Ok(())
}
