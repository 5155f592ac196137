//! The router around the tunnel: rtnetlink (`netlink`) and the WAN uplinks
//! with their routing, NAT and failover (`uplinks`).

pub mod netlink;
pub mod uplinks;
pub mod web_proxy;
