//! Types shared by the vpn-gateway BPF programs (`vpn-ebpf`) and the daemon
//! (`vpn-daemon`).
//!
//! Everything here is `#[repr(C)]`, `Copy` and free of implicit padding, so the
//! kernel and user space agree byte for byte and `bpftool map dump` can print
//! the fields by name from the BTF the BPF object carries.
//!
//! # Map layout
//!
//! | pinned name      | type            | key          | value          | written by |
//! |------------------|-----------------|--------------|----------------|------------|
//! | `sessions`       | hash            | [`SessionKey`] | [`SessionInfo`]  | daemon     |
//! | `session_stats`  | per-CPU hash    | [`SessionKey`] | [`SessionStats`] | BPF (daemon creates/deletes the entry) |
//! | `drops`          | per-CPU array   | `u32` reason ([`DropReason`]) | `u64` packets | BPF |
//!
//! All maps are pinned under [`DEFAULT_PIN_DIR`] (configurable for tests).
#![no_std]

/// Where the daemon pins its maps unless configured otherwise.
pub const DEFAULT_PIN_DIR: &str = "/sys/fs/bpf/vpn";

/// Maximum number of concurrent sessions the BPF maps can hold. The daemon's
/// `max_sessions` option is validated against it.
pub const MAX_SESSIONS: u32 = 65_536;

/// Pinned map names (also the symbol names in the BPF object, upper-cased).
pub mod map_names {
    pub const SESSIONS: &str = "SESSIONS";
    pub const SESSION_STATS: &str = "SESSION_STATS";
    pub const DROPS: &str = "DROPS";
}

/// Program names in the BPF object.
pub mod prog_names {
    /// TC ingress on the tunnel device: packets coming from VPN clients.
    pub const TUN_INGRESS: &str = "tun_ingress";
    /// TC egress on the tunnel device: packets going to VPN clients.
    pub const TUN_EGRESS: &str = "tun_egress";
}

/// A VPN client's tunnel address. IPv4 addresses are stored IPv4-mapped
/// (`::ffff:a.b.c.d`) so one map serves both families.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct SessionKey {
    /// The address in network byte order.
    pub addr: [u8; 16],
}

impl SessionKey {
    /// The key for an IPv4 address given as its four octets.
    pub const fn v4(octets: [u8; 4]) -> Self {
        let mut addr = [0u8; 16];
        addr[10] = 0xff;
        addr[11] = 0xff;
        addr[12] = octets[0];
        addr[13] = octets[1];
        addr[14] = octets[2];
        addr[15] = octets[3];
        SessionKey { addr }
    }

    /// The key for an IPv6 address given as its sixteen octets.
    pub const fn v6(octets: [u8; 16]) -> Self {
        SessionKey { addr: octets }
    }
}

/// Per-session state the daemon installs when a tunnel comes up.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct SessionInfo {
    /// The daemon's session id (also shown by `vpnctl sessions`).
    pub session_id: u64,
    /// Group-policy id; 0 = no policy (allow). Used by the policy issue.
    pub policy_id: u32,
    /// `SESSION_FLAG_*` bits. A `u32` rather than `bool`s so the type has no
    /// implicit padding.
    pub flags: u32,
}

/// Traffic counters of one session, per CPU. "rx" is from the client (TC
/// ingress on the tunnel device), "tx" is to the client (TC egress).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct SessionStats {
    pub rx_packets: u64,
    pub rx_bytes: u64,
    pub tx_packets: u64,
    pub tx_bytes: u64,
}

impl SessionStats {
    /// Adds another CPU's counters to these.
    pub fn add(&mut self, other: &SessionStats) {
        self.rx_packets += other.rx_packets;
        self.rx_bytes += other.rx_bytes;
        self.tx_packets += other.tx_packets;
        self.tx_bytes += other.tx_bytes;
    }
}

/// Why the data path dropped a packet: the index into the `drops` array.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DropReason {
    /// A packet from the tunnel whose source address belongs to no session
    /// (spoofed, or a session that already ended).
    UnknownSource = 0,
    /// A packet from the tunnel that is not a parsable IPv4/IPv6 packet.
    Malformed = 1,
    /// A packet routed to the tunnel whose destination belongs to no session.
    UnknownDestination = 2,
}

/// Number of [`DropReason`] values; the size of the `drops` array.
pub const DROP_REASONS: u32 = 3;

impl DropReason {
    /// All reasons, in index order.
    pub const ALL: [DropReason; DROP_REASONS as usize] = [
        DropReason::UnknownSource,
        DropReason::Malformed,
        DropReason::UnknownDestination,
    ];

    /// A short name for displays (`vpnctl stats`).
    pub const fn name(self) -> &'static str {
        match self {
            DropReason::UnknownSource => "unknown-source",
            DropReason::Malformed => "malformed",
            DropReason::UnknownDestination => "unknown-destination",
        }
    }
}

#[cfg(feature = "user")]
mod pod {
    use super::*;
    // SAFETY: all are repr(C), Copy, contain only integers and have no padding.
    unsafe impl aya::Pod for SessionKey {}
    unsafe impl aya::Pod for SessionInfo {}
    unsafe impl aya::Pod for SessionStats {}
}

#[cfg(test)]
mod tests {
    use super::*;
    use core::mem::size_of;

    #[test]
    fn no_padding() {
        assert_eq!(size_of::<SessionKey>(), 16);
        assert_eq!(size_of::<SessionInfo>(), 16);
        assert_eq!(size_of::<SessionStats>(), 32);
    }

    #[test]
    fn v4_mapped() {
        let k = SessionKey::v4([198, 19, 0, 2]);
        assert_eq!(
            k.addr,
            [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 198, 19, 0, 2]
        );
    }
}
