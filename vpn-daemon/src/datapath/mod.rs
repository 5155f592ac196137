//! The kernel side of the data path: the BPF programs and their pinned
//! maps (`bpf`), the multi-queue TUN device (`tun`), and which kernel
//! offloads they use (`offloads`).
//!
//! The sessions' side reaches the maps through [`DatapathOps`] only: in
//! `vpnd` the maps live in the privileged broker (the `broker` module) and
//! each call is a request to it; tests and benches use [`bpf::Datapath`]
//! in process.

pub mod bpf;
pub mod offloads;
pub mod tun;

use std::{net::IpAddr, ops::Range, time::Duration};

use vpn_common::{DropReason, GuardDrop, PolicyInfo, SessionInfo, SessionStats};

use self::bpf::{MapWriteError, StatsSnapshot};
use crate::policy::Compiled;

/// What sessions, policies, bans and the admin surface do to the maps:
/// the narrow interface between the unprivileged part of `vpnd` and the
/// part that may call `bpf()`. Each method is one change or read.
pub trait DatapathOps: Send {
    /// A session address's entry, its counters starting at `from`.
    fn add_session_counting_from(
        &mut self,
        ip: IpAddr,
        info: SessionInfo,
        from: SessionStats,
    ) -> Result<(), MapWriteError>;
    /// Removes an address's entry and returns its last counters.
    fn remove_session(&mut self, ip: IpAddr) -> SessionStats;
    /// Replaces an address's entry (a new policy).
    fn set_session(&mut self, ip: IpAddr, info: SessionInfo) -> Result<(), MapWriteError>;
    /// Every address's counters at one moment.
    fn all_session_stats(&self) -> StatsSnapshot;
    /// Forgets a session's bandwidth policing state.
    fn forget_rate_state(&mut self, session_id: u64);
    /// Installs a compiled policy (see [`bpf::Datapath::install_policy`]).
    fn install_policy(
        &mut self,
        id: u32,
        info: PolicyInfo,
        c: &Compiled,
        first_interval: u32,
    ) -> Result<(), MapWriteError>;
    /// Removes a policy version no session points at.
    fn remove_policy(&mut self, id: u32, c: &Compiled);
    /// Zeroes rule counters before a new policy version uses them.
    fn reset_hits(&mut self, slots: Range<u32>) -> Result<(), MapWriteError>;
    /// Packets that matched each rule slot of `slots`.
    fn rule_hits(&self, slots: Range<u32>) -> Vec<u64>;
    /// Packets the TC programs dropped, by reason.
    fn drops(&self) -> Vec<(DropReason, u64)>;
    /// Packets the XDP guard dropped, by reason.
    fn guard_drops(&self) -> Vec<(GuardDrop, u64)>;
    /// Bans a source prefix (until removed when `time` is `None`).
    fn ban(&mut self, net: ipnet::IpNet, time: Option<Duration>) -> Result<(), MapWriteError>;
    /// Lifts a ban.
    fn unban(&mut self, net: ipnet::IpNet);
}

impl DatapathOps for bpf::Datapath {
    fn add_session_counting_from(
        &mut self,
        ip: IpAddr,
        info: SessionInfo,
        from: SessionStats,
    ) -> Result<(), MapWriteError> {
        bpf::Datapath::add_session_counting_from(self, ip, info, from)
    }
    fn remove_session(&mut self, ip: IpAddr) -> SessionStats {
        bpf::Datapath::remove_session(self, ip)
    }
    fn set_session(&mut self, ip: IpAddr, info: SessionInfo) -> Result<(), MapWriteError> {
        bpf::Datapath::set_session(self, ip, info)
    }
    fn all_session_stats(&self) -> StatsSnapshot {
        bpf::Datapath::all_session_stats(self)
    }
    fn forget_rate_state(&mut self, session_id: u64) {
        bpf::Datapath::forget_rate_state(self, session_id)
    }
    fn install_policy(
        &mut self,
        id: u32,
        info: PolicyInfo,
        c: &Compiled,
        first_interval: u32,
    ) -> Result<(), MapWriteError> {
        bpf::Datapath::install_policy(self, id, info, c, first_interval)
    }
    fn remove_policy(&mut self, id: u32, c: &Compiled) {
        bpf::Datapath::remove_policy(self, id, c)
    }
    fn reset_hits(&mut self, slots: Range<u32>) -> Result<(), MapWriteError> {
        bpf::Datapath::reset_hits(self, slots)
    }
    fn rule_hits(&self, slots: Range<u32>) -> Vec<u64> {
        slots.map(|s| bpf::Datapath::rule_hits(self, s)).collect()
    }
    fn drops(&self) -> Vec<(DropReason, u64)> {
        bpf::Datapath::drops(self)
    }
    fn guard_drops(&self) -> Vec<(GuardDrop, u64)> {
        bpf::Datapath::guard_drops(self)
    }
    fn ban(&mut self, net: ipnet::IpNet, time: Option<Duration>) -> Result<(), MapWriteError> {
        bpf::Datapath::ban(self, net, time)
    }
    fn unban(&mut self, net: ipnet::IpNet) {
        bpf::Datapath::unban(self, net)
    }
}
