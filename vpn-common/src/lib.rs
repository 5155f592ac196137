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
//! | `policy_class`   | hash            | [`ClassKey`]   | `u32` class id  | daemon |
//! | `policy_ports`   | hash            | [`PortsKey`]   | [`IntervalRange`] | daemon |
//! | `policy_intervals` | array         | `u32` index    | [`Interval`]    | daemon |
//! | `split_allow`    | LPM trie        | [`SplitKey`]   | `u32` (unused)  | daemon |
//! | `rule_hits`      | per-CPU array   | `u32` rule slot | `u64` packets  | BPF |
//! | `rate_state`     | hash            | `u64` session id | [`RateState`] | BPF (daemon deletes) |
//! | `uplink_active`  | array[2]        | `0`, `1`       | `[0]` active uplink number (0 = no uplinks managed), `[1]` bitmask of healthy uplinks | daemon |
//! | `web_proxy_up`   | array[1]        | `0`            | bitmask of healthy web proxies (bit n-1 = proxy n) | daemon |
//! | `nat_exempt`     | LPM trie        | [`ExemptKey`]  | `u32` (unused)  | daemon |
//! | `guard_config`   | array[1]        | `0`            | [`GuardConfig`] | daemon |
//! | `guard_drops`    | per-CPU array   | `u32` reason ([`GuardDrop`]) | `u64` packets | BPF |
//! | `hello_buckets`  | LRU hash        | [`SessionKey`] | [`HelloBucket`] | BPF |
//! | `banned`         | LPM trie        | [`SessionKey`] | [`Ban`]         | daemon (`vpnctl ban`, ban points) |
//!
//! # Uplink marks
//!
//! With uplinks configured, `tun_ingress` marks every packet it passes from
//! a client: [`MARK_BASE`] | the uplink's number (1-based, low byte: the
//! client's policy's pinned uplink while it is healthy, else the active one)
//! | [`MARK_EXEMPT`] when the destination is in that uplink's NAT-exemption
//! prefixes (`nat_exempt`). The daemon's `ip rule`s route marked packets by
//! the uplink's table (after the main table's specific routes), and its nft
//! table masquerades marked, non-exempt packets leaving that uplink.
//!
//! # Web proxy redirection
//!
//! A policy with a web proxy ([`PolicyInfo::web_proxy`]) has its clients'
//! TCP packets to one of its `web_ports` (IPv4) marked [`MARK_BASE`] |
//! [`MARK_WEB`] | the proxy's number (low byte) instead, while the proxy
//! is healthy in `web_proxy_up`: the daemon's `ip rule` for that mark
//! routes them to the proxy host, which intercepts them (the WCCP-like
//! model). While it is down they go their usual way, or are dropped
//! ([`DropReason::WebProxyDown`]) when the policy fails closed.
//!
//! All maps are pinned under [`DEFAULT_PIN_DIR`] (configurable for tests).
//!
//! # Policy classification
//!
//! A group policy is an ordered list of rules (first match wins, default
//! allow) over destination CIDR, protocol and destination port. The daemon
//! compiles it so that the per-packet cost does not depend on the rule
//! count, only on the policy's shape:
//!
//! 1. Class. The rule prefixes of a policy form a prefix tree; an address
//!    belongs to the class of its longest matching rule prefix (every family
//!    has a root class, length 0, for rules with destination "any"). The
//!    rules that can match an address are exactly those whose prefix
//!    contains its class prefix. BPF finds the class with exact hash lookups
//!    in `policy_class`, one per distinct prefix length of the policy
//!    (longest first, at most [`MAX_PREFIX_LENS`], listed in [`PolicyInfo`]).
//!    LPM tries were measured first: their lookups deepen with the entry
//!    count (+45% per packet from 10 to 10,000 rules); hash lookups do not.
//! 2. Verdict. Per class and protocol bucket, the compiler splits the port
//!    space into intervals and resolves each interval's first matching rule.
//!    `policy_ports[(policy, class, bucket)]` gives the class's run of
//!    sorted intervals in the `policy_intervals` array, binary-searched (at
//!    most 17 steps, as many as log2 of the class's intervals). An interval
//!    holds the verdict and the rule's slot in `rule_hits`; no interval =
//!    no rule matched = allow.
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
    pub const POLICY_PORTS: &str = "POLICY_PORTS";
    pub const POLICY_INTERVALS: &str = "POLICY_INTERVALS";
    pub const SPLIT_ALLOW: &str = "SPLIT_ALLOW";
    pub const RULE_HITS: &str = "RULE_HITS";
    pub const RATE_STATE: &str = "RATE_STATE";
    pub const UPLINK_ACTIVE: &str = "UPLINK_ACTIVE";
    pub const NAT_EXEMPT: &str = "NAT_EXEMPT";
    pub const WEB_PROXY_UP: &str = "WEB_PROXY_UP";

    /// Every map the daemon pins, in one place.
    pub const ALL: [&str; 17] = [
        WEB_PROXY_UP,
        UPLINK_ACTIVE,
        NAT_EXEMPT,
        super::guard_map_names::BANNED,
        super::guard_map_names::GUARD_CONFIG,
        super::guard_map_names::GUARD_DROPS,
        super::guard_map_names::HELLO_BUCKETS,
        RATE_STATE,
        POLICY_INTERVALS,
        SESSIONS,
        SESSION_STATS,
        DROPS,
        POLICIES,
        POLICY_CLASS,
        POLICY_PORTS,
        SPLIT_ALLOW,
        RULE_HITS,
    ];
}

/// Marks `tun_ingress` sets on packets from clients (see the module docs).
pub const MARK_BASE: u32 = 0x5650_0000;
/// The bits that say "ours".
pub const MARK_MASK: u32 = 0xffff_0000;
/// The uplink number (1-based).
pub const MARK_UPLINK: u32 = 0x0000_00ff;
/// The destination is NAT-exempt on that uplink.
pub const MARK_EXEMPT: u32 = 0x0000_0100;
/// Redirected to a web proxy (its number in the low byte).
pub const MARK_WEB: u32 = 0x0000_0200;
/// Uplinks the daemon manages at most.
pub const MAX_UPLINKS: u32 = 16;
/// Web proxies the daemon redirects to at most.
pub const MAX_WEB_PROXIES: u32 = 16;
/// Web ports one policy redirects at most.
pub const MAX_WEB_PORTS: usize = 4;
/// Entries in `nat_exempt` (all uplinks).
pub const MAX_EXEMPT_ENTRIES: u32 = 16_384;

/// Key of `nat_exempt` (LPM trie): the first [`EXEMPT_KEY_FIXED_BITS`] bits
/// (uplink number and family) always match exactly, then the prefix.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ExemptKey {
    pub uplink: u32,
    pub family: u32,
    pub addr: [u8; 16],
}

/// Bits of [`ExemptKey`] before the address.
pub const EXEMPT_KEY_FIXED_BITS: u32 = 64;

/// Size limits of the policy maps.
pub const MAX_POLICIES: u32 = 4096;
/// Entries in `policy_class` (sum over all loaded policy versions).
pub const MAX_CLASS_ENTRIES: u32 = 262_144;
/// Entries in `policy_ports` (classes x protocol buckets, all versions).
pub const MAX_PORTS_ENTRIES: u32 = 1_048_576;
/// Slots in `policy_intervals` (all versions).
pub const MAX_INTERVALS: u32 = 1_048_576;
/// Distinct destination prefix lengths one policy may use per family.
pub const MAX_PREFIX_LENS: usize = 16;
/// Binary search steps over one class's intervals (2^17 > 65536 ports).
pub const MAX_SEARCH_STEPS: u32 = 17;
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

/// Key of `policy_class`: an address masked to one of the policy's prefix
/// lengths.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
#[cfg_attr(feature = "user", derive(serde::Serialize, serde::Deserialize))]
pub struct ClassKey {
    pub policy: u32,
    /// [`FAMILY_V4`] or [`FAMILY_V6`].
    pub family: u8,
    pub prefix_len: u8,
    pub _pad: u16,
    /// Masked to `prefix_len`; IPv4 uses the first 4 bytes.
    pub addr: [u8; 16],
}

/// Data of a `split_allow` LPM key (the prefix length counts the 8 bytes
/// of policy and family plus the address prefix).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
#[cfg_attr(feature = "user", derive(serde::Serialize, serde::Deserialize))]
pub struct SplitKey {
    pub policy: u32,
    pub family: u32,
    pub addr: [u8; 16],
}

/// Bits of [`SplitKey`] before the address.
pub const SPLIT_KEY_FIXED_BITS: u32 = 64;

/// Key of `policy_ports`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
#[cfg_attr(feature = "user", derive(serde::Serialize, serde::Deserialize))]
pub struct PortsKey {
    pub policy: u32,
    pub class: u32,
    /// Protocol bucket (`PROTO_*`).
    pub proto: u32,
}

/// A class's run of intervals in `policy_intervals`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct IntervalRange {
    pub start: u32,
    pub count: u32,
}

/// Ports `lo..=hi` (host order) have their first matching rule here.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
#[cfg_attr(feature = "user", derive(serde::Serialize, serde::Deserialize))]
pub struct Interval {
    pub lo: u16,
    pub hi: u16,
    pub verdict: Verdict,
}

/// What a matching rule says.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
#[cfg_attr(feature = "user", derive(serde::Serialize, serde::Deserialize))]
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
#[cfg_attr(feature = "user", derive(serde::Serialize, serde::Deserialize))]
pub struct PolicyInfo {
    /// `POLICY_*` bits.
    pub flags: u32,
    /// How many entries of `v4_lens` / `v6_lens` are used.
    pub n_v4: u8,
    pub n_v6: u8,
    /// The uplink this policy's clients leave through while it is healthy
    /// (1-based; 0 = the active uplink).
    pub uplink: u16,
    /// The distinct IPv4 / IPv6 rule prefix lengths, longest first, always
    /// ending with 0 (the root class).
    pub v4_lens: [u8; MAX_PREFIX_LENS],
    pub v6_lens: [u8; MAX_PREFIX_LENS],
    /// Bandwidth limit from clients, bits per second (0 = unlimited).
    pub rate_up_bps: u64,
    /// Bandwidth limit to clients, bits per second (0 = unlimited).
    pub rate_down_bps: u64,
    /// TCP destination ports redirected to the web proxy (0 = unused).
    pub web_ports: [u16; MAX_WEB_PORTS],
    /// The web proxy (1-based; 0 = none).
    pub web_proxy: u8,
    /// 1: drop web traffic while the proxy is down; 0: let it go direct.
    pub web_fail_closed: u8,
    pub _pad: [u8; 6],
}

/// Maps of the XDP guard in front of the DTLS port.
pub mod guard_map_names {
    pub const GUARD_CONFIG: &str = "GUARD_CONFIG";
    pub const GUARD_DROPS: &str = "GUARD_DROPS";
    pub const HELLO_BUCKETS: &str = "HELLO_BUCKETS";
    pub const BANNED: &str = "BANNED";
}

/// Settings of the XDP guard (`guard_config[0]`).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
#[cfg_attr(feature = "user", derive(serde::Serialize, serde::Deserialize))]
pub struct GuardConfig {
    /// UDP port of the DTLS server; 0 = guard off (everything passes).
    pub port: u32,
    /// New ClientHellos allowed per source address per second.
    pub hello_rate: u32,
    /// Burst of ClientHellos a source may send at once.
    pub hello_burst: u32,
    /// TCP port of the TLS server: connection attempts (SYN without ACK)
    /// from a banned source are dropped. 0 = none.
    pub tls_port: u32,
}

/// A banned source: the value of `banned`, an LPM trie keyed by the
/// address as in [`SessionKey`] (IPv4-mapped), with the prefix length in
/// bits of that 128-bit form (an IPv4 /32 is 128, an IPv6 /64 is 64). The
/// guard drops new connections from it: TCP SYNs to the TLS port and
/// DTLS ClientHellos. Packets of connections already open pass.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Ban {
    /// When the ban ends, in `CLOCK_MONOTONIC` nanoseconds (what
    /// `bpf_ktime_get_ns` reads); 0 = when it is removed.
    pub until_ns: u64,
}

/// Bans the guard holds at once.
pub const MAX_BANS: u32 = 65_536;

/// Token bucket of one source address (LRU map, key = address as in
/// [`SessionKey`]). Tokens are scaled by 1e9 so refills are exact in ns.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct HelloBucket {
    pub tokens: u64,
    pub last_ns: u64,
}

/// Why the XDP guard dropped a packet (index into `guard_drops`).
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GuardDrop {
    /// Shorter than a DTLS record header, or a length that does not fit.
    Truncated = 0,
    /// Not a DTLS content type (20..=23).
    BadContentType = 1,
    /// Not a DTLS version (1.0, 1.2, or Cisco's pre-standard 0x0100).
    BadVersion = 2,
    /// A ClientHello over its source's rate.
    HelloRateLimited = 3,
    /// A new connection (TCP SYN to the TLS port, DTLS ClientHello) from
    /// a banned source.
    Banned = 4,
}

pub const GUARD_DROP_REASONS: u32 = 5;

impl GuardDrop {
    pub const ALL: [GuardDrop; GUARD_DROP_REASONS as usize] = [
        GuardDrop::Truncated,
        GuardDrop::BadContentType,
        GuardDrop::BadVersion,
        GuardDrop::HelloRateLimited,
        GuardDrop::Banned,
    ];

    pub const fn name(self) -> &'static str {
        match self {
            GuardDrop::Truncated => "dtls-truncated",
            GuardDrop::BadContentType => "dtls-bad-content-type",
            GuardDrop::BadVersion => "dtls-bad-version",
            GuardDrop::HelloRateLimited => "dtls-hello-rate-limited",
            GuardDrop::Banned => "banned-source",
        }
    }
}

/// Sources the guard tracks at once (LRU: the oldest are forgotten).
pub const MAX_HELLO_SOURCES: u32 = 65_536;

/// Program names in the BPF object.
pub mod prog_names {
    /// XDP on the uplinks: only well-formed DTLS reaches the DTLS port.
    pub const DTLS_GUARD: &str = "dtls_guard";
    /// TC ingress on the tunnel device: packets coming from VPN clients.
    pub const TUN_INGRESS: &str = "tun_ingress";
    /// TC egress on the tunnel device: packets going to VPN clients.
    pub const TUN_EGRESS: &str = "tun_egress";
}

/// A VPN client's tunnel address. IPv4 addresses are stored IPv4-mapped
/// (`::ffff:a.b.c.d`) so one map serves both families.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
#[cfg_attr(feature = "user", derive(serde::Serialize, serde::Deserialize))]
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
#[cfg_attr(feature = "user", derive(serde::Serialize, serde::Deserialize))]
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
#[cfg_attr(feature = "user", derive(serde::Serialize, serde::Deserialize))]
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
    /// Web traffic of a policy that fails closed while its proxy is down.
    WebProxyDown = 7,
}

/// Number of [`DropReason`] values; the size of the `drops` array.
pub const DROP_REASONS: u32 = 8;

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
        DropReason::WebProxyDown,
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
            DropReason::WebProxyDown => "web-proxy-down",
        }
    }
}

// Every shared-memory type has the size the BPF programs and the daemon
// agree on, checked at compile time: no implicit padding, so `Pod` below
// holds and both sides read the same bytes.
const _: () = {
    use core::mem::size_of;
    assert!(size_of::<SessionKey>() == 16);
    assert!(size_of::<SessionInfo>() == 16);
    assert!(size_of::<SessionStats>() == 48);
    assert!(size_of::<ClassKey>() == 24);
    assert!(size_of::<SplitKey>() == 24);
    assert!(size_of::<ExemptKey>() == 24);
    assert!(size_of::<PortsKey>() == 12);
    assert!(size_of::<IntervalRange>() == 8);
    assert!(size_of::<Interval>() == 12);
    assert!(size_of::<Verdict>() == 8);
    assert!(size_of::<PolicyInfo>() == 72);
    assert!(size_of::<RateState>() == 16);
    assert!(size_of::<GuardConfig>() == 16);
    assert!(size_of::<HelloBucket>() == 16);
    assert!(size_of::<Ban>() == 8);
};

#[cfg(feature = "user")]
mod pod {
    use super::*;
    // SAFETY (each): the type is repr(C) and Copy, holds only integers and
    // integer arrays, and has no padding (its size is checked against the
    // sum of its fields above), so every bit pattern is a valid value.
    unsafe impl aya::Pod for SessionKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for SessionInfo {}
    // SAFETY: as above.
    unsafe impl aya::Pod for SessionStats {}
    // SAFETY: as above.
    unsafe impl aya::Pod for ClassKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for SplitKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for ExemptKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for PortsKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for IntervalRange {}
    // SAFETY: as above.
    unsafe impl aya::Pod for Interval {}
    // SAFETY: as above.
    unsafe impl aya::Pod for Verdict {}
    // SAFETY: as above.
    unsafe impl aya::Pod for PolicyInfo {}
    // SAFETY: as above.
    unsafe impl aya::Pod for RateState {}
    // SAFETY: as above.
    unsafe impl aya::Pod for GuardConfig {}
    // SAFETY: as above.
    unsafe impl aya::Pod for HelloBucket {}
    // SAFETY: as above.
    unsafe impl aya::Pod for Ban {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_key_fixed_bits() {
        assert_eq!(SPLIT_KEY_FIXED_BITS, 8 * 8);
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
