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
//! | `policies`       | hash            | `u32` policy id | [`PolicyInfo`] | daemon |
//! | `policy_class`   | LPM trie        | [`ClassKey`]   | `u32` class id  | daemon |
//! | `policy_rules`   | LPM trie        | [`PortKey`]    | [`Verdict`]     | daemon |
//! | `split_allow`    | LPM trie        | [`ClassKey`]   | `u32` (unused)  | daemon |
//! | `rule_hits`      | per-CPU array   | `u32` rule slot | `u64` packets  | BPF |
//! | `rate_state`     | hash            | `u64` session id | [`RateState`] | BPF (daemon deletes) |
//!
//! All maps are pinned under [`DEFAULT_PIN_DIR`] (configurable for tests).
//!
//! # Policy classification
//!
//! A group policy is an ordered list of rules (first match wins, default
//! allow) over destination CIDR, protocol and destination port. The daemon
//! compiles it so that every packet costs two LPM lookups whatever the rule
//! count:
//!
//! 1. `policy_class[(policy, family, address)]`: the rule prefixes of a
//!    policy form a prefix tree; an address belongs to the class of its
//!    longest matching rule prefix (every family has a root class for rules
//!    with destination "any"). The rules that can match an address are
//!    exactly those whose prefix contains its class prefix.
//! 2. `policy_rules[(policy, class, protocol bucket, port prefix)]`: per class
//!    and protocol, the port space is split into intervals, the first
//!    matching rule of each interval is resolved at compile time, and each
//!    interval is stored as port prefixes. The value is the verdict and the
//!    rule's slot in `rule_hits`. A miss means no rule matched: allow.
//!
//! Packets to a client are classified by their source (the remote end), so a
//! rule applies symmetrically to both directions of a flow. Protocol buckets
//! are TCP, UDP, ICMP, ICMPv6 and [`PROTO_OTHER`] (any other protocol, and
//! IPv4/IPv6 fragments after the first, which carry no ports).
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
    pub const POLICIES: &str = "POLICIES";
    pub const POLICY_CLASS: &str = "POLICY_CLASS";
    pub const POLICY_RULES: &str = "POLICY_RULES";
    pub const SPLIT_ALLOW: &str = "SPLIT_ALLOW";
    pub const RULE_HITS: &str = "RULE_HITS";
    pub const RATE_STATE: &str = "RATE_STATE";

    /// Every map the daemon pins, in one place.
    pub const ALL: [&str; 9] = [
        RATE_STATE,
        SESSIONS,
        SESSION_STATS,
        DROPS,
        POLICIES,
        POLICY_CLASS,
        POLICY_RULES,
        SPLIT_ALLOW,
        RULE_HITS,
    ];
}

/// Size limits of the policy maps.
pub const MAX_POLICIES: u32 = 4096;
/// Entries in `policy_class` (sum over all loaded policy versions).
pub const MAX_CLASS_ENTRIES: u32 = 262_144;
/// Entries in `policy_rules` (sum over all loaded policy versions).
pub const MAX_RULE_ENTRIES: u32 = 1_048_576;
/// Entries in `split_allow`.
pub const MAX_SPLIT_ENTRIES: u32 = 65_536;
/// Slots in `rule_hits` (rules over all loaded policy versions).
pub const MAX_RULE_SLOTS: u32 = 131_072;

/// Address family tags used in [`ClassKey`].
pub const FAMILY_V4: u32 = 4;
pub const FAMILY_V6: u32 = 6;

/// IP protocol numbers of the protocol buckets.
pub const PROTO_ICMP: u8 = 1;
pub const PROTO_TCP: u8 = 6;
pub const PROTO_UDP: u8 = 17;
pub const PROTO_ICMP6: u8 = 58;
/// The bucket of every other protocol (and of non-first fragments).
pub const PROTO_OTHER: u8 = 255;

/// `PolicyInfo::flags`: clients of this policy may not reach other clients.
pub const POLICY_ISOLATE: u32 = 1;
/// `PolicyInfo::flags`: only destinations in `split_allow` are reachable.
pub const POLICY_SPLIT_ENFORCE: u32 = 2;

/// Bits of [`ClassKey`] before the address: policy and family.
pub const CLASS_KEY_FIXED_BITS: u32 = 64;
/// Bits of [`PortKey`] before the port: policy, class, protocol, zero byte.
pub const PORT_KEY_FIXED_BITS: u32 = 80;

/// Data of a `policy_class` / `split_allow` LPM key (the prefix length
/// counts [`CLASS_KEY_FIXED_BITS`] plus the address prefix).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct ClassKey {
    pub policy: u32,
    pub family: u32,
    /// IPv4 addresses use the first 4 bytes.
    pub addr: [u8; 16],
}

/// Data of a `policy_rules` LPM key (the prefix length counts
/// [`PORT_KEY_FIXED_BITS`] plus the port prefix).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct PortKey {
    pub policy: u32,
    pub class: u32,
    pub proto: u8,
    pub zero: u8,
    /// Big-endian port.
    pub port: [u8; 2],
}

/// What a matching rule says.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Verdict {
    /// Index into `rule_hits`.
    pub slot: u32,
    /// [`ACTION_ALLOW`] or [`ACTION_DENY`].
    pub action: u32,
}

pub const ACTION_ALLOW: u32 = 0;
pub const ACTION_DENY: u32 = 1;

/// Bandwidth policing state of one session: the GCRA "theoretical arrival
/// time" per direction, in `bpf_ktime_get_ns` nanoseconds. A packet of L
/// bytes conforms when `tat - now <= tolerance` and then moves `tat` to
/// `max(tat, now) + L * 8e9 / rate`; others are dropped. The daemon paces
/// both directions below these limits (TCP in the tunnel then sees delay,
/// not loss); the policer guarantees the limit whatever the daemon does.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct RateState {
    pub up_tat: u64,
    pub down_tat: u64,
}

/// How far ahead of real time a session's upload may run: the burst it may
/// send at line rate, as time at its configured rate.
pub const RATE_TOLERANCE_NS: u64 = 100_000_000;

/// The same for downloads. The daemon shapes downloads in its per-client
/// queue (the kernel here has no fq qdisc for EDT pacing), which lets bursts
/// of up to a queue's worth through at arrival; the policer is the hard
/// bound behind it.
pub const DOWN_RATE_TOLERANCE_NS: u64 = 2_000_000_000;

/// Per-policy switches and limits.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct PolicyInfo {
    /// `POLICY_*` bits.
    pub flags: u32,
    pub _reserved: u32,
    /// Bandwidth limit from clients, bits per second (0 = unlimited).
    pub rate_up_bps: u64,
    /// Bandwidth limit to clients, bits per second (0 = unlimited).
    pub rate_down_bps: u64,
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
    /// Packets from the client denied by its policy.
    pub rx_denied: u64,
    /// Packets to the client denied by its policy.
    pub tx_denied: u64,
}

impl SessionStats {
    /// Adds another CPU's counters to these.
    pub fn add(&mut self, other: &SessionStats) {
        self.rx_packets += other.rx_packets;
        self.rx_bytes += other.rx_bytes;
        self.tx_packets += other.tx_packets;
        self.tx_bytes += other.tx_bytes;
        self.rx_denied += other.rx_denied;
        self.tx_denied += other.tx_denied;
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
    /// Denied by a group-policy firewall rule.
    PolicyDeny = 3,
    /// Client-to-client traffic where a policy isolates clients.
    ClientIsolation = 4,
    /// A destination outside the split-include list of an enforcing policy.
    SplitEnforcement = 5,
    /// Over the session's bandwidth limit.
    RateLimit = 6,
}

/// Number of [`DropReason`] values; the size of the `drops` array.
pub const DROP_REASONS: u32 = 7;

impl DropReason {
    /// All reasons, in index order.
    pub const ALL: [DropReason; DROP_REASONS as usize] = [
        DropReason::UnknownSource,
        DropReason::Malformed,
        DropReason::UnknownDestination,
        DropReason::PolicyDeny,
        DropReason::ClientIsolation,
        DropReason::SplitEnforcement,
        DropReason::RateLimit,
    ];

    /// A short name for displays (`vpnctl stats`).
    pub const fn name(self) -> &'static str {
        match self {
            DropReason::UnknownSource => "unknown-source",
            DropReason::Malformed => "malformed",
            DropReason::UnknownDestination => "unknown-destination",
            DropReason::PolicyDeny => "policy-deny",
            DropReason::ClientIsolation => "client-isolation",
            DropReason::SplitEnforcement => "split-enforcement",
            DropReason::RateLimit => "rate-limit",
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
    unsafe impl aya::Pod for ClassKey {}
    unsafe impl aya::Pod for PortKey {}
    unsafe impl aya::Pod for Verdict {}
    unsafe impl aya::Pod for PolicyInfo {}
    unsafe impl aya::Pod for RateState {}
}

#[cfg(test)]
mod tests {
    use super::*;
    use core::mem::size_of;

    #[test]
    fn no_padding() {
        assert_eq!(size_of::<SessionKey>(), 16);
        assert_eq!(size_of::<SessionInfo>(), 16);
        assert_eq!(size_of::<SessionStats>(), 48);
        assert_eq!(size_of::<ClassKey>(), 24);
        assert_eq!(size_of::<PortKey>(), 12);
        assert_eq!(size_of::<Verdict>(), 8);
        assert_eq!(size_of::<PolicyInfo>(), 24);
        assert_eq!(CLASS_KEY_FIXED_BITS, 8 * 8);
        assert_eq!(PORT_KEY_FIXED_BITS, 8 * 10);
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
