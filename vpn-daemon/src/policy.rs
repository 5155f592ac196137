//! Group policies: the rule model, the reference evaluator that defines
//! what a rule set means, and the compiler to the BPF maps (one hash lookup
//! per distinct prefix length, then a binary search over port intervals,
//! whatever the rule count; the scheme is described in `vpn-common`).
//!
//! Semantics (the reference, [`evaluate`]):
//! - rules are ordered; the first matching rule decides; no match = allow;
//! - a rule matches when its destination (CIDR, or any) contains the remote
//!   address (same family), its protocol matches the packet's protocol
//!   bucket, and its port range (if any) contains the remote port;
//! - a rule with a port range matches only TCP and UDP packets (with
//!   protocol "any" it means "TCP or UDP to these ports");
//! - the remote end is the destination of packets from the client and the
//!   source of packets to it, so rules apply to both directions of a flow;
//! - ICMP means IPv4 ICMP, ICMP6 means ICMPv6; IP fragments after the first
//!   and protocols other than TCP, UDP, ICMP and ICMPv6 are "other", which
//!   only rules with protocol "any" and no port match;
//! - an IPv6 packet is classified by the protocol after its extension
//!   headers (up to four, AH included); one whose chain goes on longer, or
//!   holds a header the data path cannot walk, is dropped as malformed
//!   whatever the rules say, so no header chain hides a packet's port.

use std::{
    collections::{BTreeSet, HashMap},
    net::IpAddr,
};

use ipnet::IpNet;
use serde::Deserialize;
use vpn_common::{
    ACTION_ALLOW, ACTION_DENY, ClassKey, FAMILY_V4, FAMILY_V6, Interval, MAX_PREFIX_LENS,
    PROTO_ICMP, PROTO_ICMP6, PROTO_OTHER, PROTO_TCP, PROTO_UDP, PolicyInfo, PortsKey,
    SPLIT_KEY_FIXED_BITS, SplitKey, Verdict,
};

/// A `[[group_policy.rule]]` that does not parse: the field's value and
/// what would be valid.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RuleError {
    #[error("action '{0}' is not valid: use 'allow' or 'deny'")]
    Action(String),
    #[error("protocol '{0}' is not valid: use any, tcp, udp, icmp or icmp6")]
    Protocol(String),
    #[error("destination '{0}' is not 'any' or a CIDR subnet (198.18.2.0/24, fd00:2::/64)")]
    Destination(String),
    #[error("port '{0}' is not 'any', a port (443) or a range (8000-8100)")]
    Port(String),
    #[error("port '{port}' cannot be combined with protocol '{protocol}': ICMP has no ports")]
    PortWithIcmp { port: String, protocol: String },
    #[error("protocol 'icmp' is IPv4 but destination '{0}' is IPv6: use icmp6")]
    IcmpToIpv6(String),
    #[error("protocol 'icmp6' is IPv6 but destination '{0}' is IPv4: use icmp")]
    Icmp6ToIpv4(String),
}

/// A `[group_policy.schedule]` that does not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ScheduleError {
    #[error("day '{0}' is not valid: use mon, tue, wed, thu, fri, sat or sun")]
    Day(String),
    #[error("{field} '{value}' is not a time of day HH:MM (00:00 to 24:00)")]
    Time { field: &'static str, value: String },
    #[error("from '{from}' equals to '{to}': the window would be empty")]
    EmptyWindow { from: String, to: String },
}

/// A policy too large for the data path ([`compile`]).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CompileError {
    #[error(
        "uses {lens} distinct {family} destination prefix lengths; at most {max} are supported (including 'any')",
        max = MAX_PREFIX_LENS
    )]
    TooManyPrefixLengths { family: &'static str, lens: usize },
    #[error(
        "compiles to more than {max} map entries (policy.max_entries); use fewer or broader rules, or raise the limit"
    )]
    TooManyEntries { max: usize },
}

/// A group policy, validated and compiled once to check its size.
#[derive(Debug, Clone, PartialEq)]
pub struct PolicyDef {
    pub name: String,
    pub rules: Vec<Rule>,
    pub info: PolicyInfo,
    /// When it applies, and the fallback policy outside that window.
    pub schedule: Option<(Schedule, String)>,
    /// `web_proxy_pac_url`.
    pub proxy_pac: Option<String>,
}

/// `[[group_policy]]` in the config file.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct GroupPolicyConfig {
    /// The name users refer to (the local user database now; RADIUS
    /// Filter-Id and LDAP groups are planned).
    pub name: String,
    /// Layer-3 firewall rules, in order (`[[group_policy.rule]]`).
    #[serde(default, rename = "rule")]
    pub rules: Vec<RuleConfig>,
    /// Bandwidth limit from each client in kbit/s; 0 or absent = unlimited.
    /// Paced by vpnd (`transport/pacing.rs`), policed in BPF.
    #[serde(default)]
    pub bandwidth_up_kbps: u64,
    /// Bandwidth limit to each client in kbit/s; 0 or absent = unlimited.
    #[serde(default)]
    pub bandwidth_down_kbps: u64,
    /// Forbid clients of this policy to reach other VPN clients.
    #[serde(default)]
    pub client_isolation: bool,
    /// With client routing mode "include", drop traffic to destinations
    /// outside the included subnets at the gateway too (clients may ignore
    /// pushed routes). The pushed DNS servers stay reachable.
    #[serde(default)]
    pub split_enforcement: bool,
    /// When this policy applies (`[group_policy.schedule]`); outside the
    /// window its fallback policy applies instead. Absent = always.
    pub schedule: Option<ScheduleConfig>,
    /// Name of the `[[uplink]]` this policy's clients leave through while
    /// it is healthy (otherwise the active one). Absent = the active one.
    #[serde(default)]
    pub uplink: Option<String>,
    /// Name of the `[[web_proxy]]` this policy's clients' web traffic
    /// (TCP to `web_ports`, IPv4) is routed to, unchanged, for the proxy
    /// to intercept (the WCCP-like model). Absent = none.
    #[serde(default)]
    pub web_proxy: Option<String>,
    /// The TCP ports that are web traffic, at most 4. Default [80, 443].
    #[serde(default)]
    pub web_ports: Option<Vec<u16>>,
    /// While the proxy is down: `"open"` (default; web traffic goes
    /// direct) or `"closed"` (it is dropped).
    #[serde(default)]
    pub web_proxy_down: WebProxyDown,
    /// A proxy auto-config (PAC) URL pushed to this policy's clients at
    /// connect (`X-CSTP-MSIE-Proxy-PAC-URL`): the explicit-proxy way, for
    /// clients that apply it (openconnect hands it to its script as
    /// `CISCO_PROXY_PAC`). `http://` or `https://`. Absent = none.
    #[serde(default)]
    pub web_proxy_pac_url: Option<String>,
}

/// `group_policy.web_proxy_down`.
#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum WebProxyDown {
    #[default]
    Open,
    Closed,
}

/// `[group_policy.schedule]`: days and hours (the gateway's local time).
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ScheduleConfig {
    /// Days it applies: `mon` ... `sun`. Default every day.
    #[serde(default)]
    pub days: Vec<String>,
    /// Start, `HH:MM`, inclusive. Default `00:00`.
    #[serde(default = "midnight")]
    pub from: String,
    /// End, `HH:MM`, exclusive; `24:00` = end of day. A window that ends
    /// before it starts runs past midnight into the next day. Default `24:00`.
    #[serde(default = "end_of_day")]
    pub to: String,
    /// The policy that applies outside the window (it must exist and have
    /// no schedule of its own).
    pub fallback: String,
}

fn midnight() -> String {
    "00:00".into()
}
fn end_of_day() -> String {
    "24:00".into()
}

/// A validated schedule: a set of weekdays (0 = Monday) and a daily window
/// in minutes since midnight.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Schedule {
    /// Bit d set = applies on weekday d (0 = Monday).
    pub days: u8,
    pub from: u16,
    pub to: u16,
}

impl Schedule {
    /// Parses a schedule, naming the bad field and value on error.
    pub fn parse(c: &ScheduleConfig) -> Result<Schedule, ScheduleError> {
        const NAMES: [&str; 7] = ["mon", "tue", "wed", "thu", "fri", "sat", "sun"];
        let mut days = 0u8;
        for d in &c.days {
            let i = NAMES
                .iter()
                .position(|n| n.eq_ignore_ascii_case(d))
                .ok_or_else(|| ScheduleError::Day(d.clone()))?;
            days |= 1 << i;
        }
        if c.days.is_empty() {
            days = 0x7f;
        }
        let minutes = |field: &'static str, v: &str| -> Result<u16, ScheduleError> {
            let bad = || ScheduleError::Time {
                field,
                value: v.to_owned(),
            };
            let (h, m) = v.split_once(':').ok_or_else(bad)?;
            let (h, m): (u16, u16) = (h.parse().map_err(|_| bad())?, m.parse().map_err(|_| bad())?);
            if m > 59 || h > 24 || (h == 24 && m != 0) {
                return Err(bad());
            }
            Ok(h * 60 + m)
        };
        let from = minutes("from", &c.from)?;
        let to = minutes("to", &c.to)?;
        if from == to {
            return Err(ScheduleError::EmptyWindow {
                from: c.from.clone(),
                to: c.to.clone(),
            });
        }
        Ok(Schedule { days, from, to })
    }

    /// Whether the schedule applies on `weekday` (0 = Monday) at `minute`
    /// after midnight. A window past midnight belongs to the day it starts.
    pub fn active(&self, weekday: u8, minute: u16) -> bool {
        let on = |d: u8| self.days & (1 << (d % 7)) != 0;
        if self.from < self.to {
            on(weekday) && (self.from..self.to).contains(&minute)
        } else {
            (on(weekday) && minute >= self.from) || (on((weekday + 6) % 7) && minute < self.to)
        }
    }
}

/// The gateway's local weekday (0 = Monday) and minute of the day.
pub fn local_now() -> (u8, u16) {
    // SAFETY: time() with a null pointer only returns the time.
    let t = unsafe { libc::time(std::ptr::null_mut()) };
    // SAFETY: all-zero is a valid `struct tm` (integers, a null zone name).
    let mut tm: libc::tm = unsafe { std::mem::zeroed() };
    // SAFETY: localtime_r writes into `tm`, which we own.
    unsafe { libc::localtime_r(&t, &mut tm) };
    (
        ((tm.tm_wday + 6) % 7) as u8,
        (tm.tm_hour * 60 + tm.tm_min) as u16,
    )
}

/// `[[group_policy.rule]]`.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RuleConfig {
    /// `allow` or `deny`.
    pub action: String,
    /// `any`, `tcp`, `udp`, `icmp` or `icmp6`. Default `any`.
    #[serde(default = "any")]
    pub protocol: String,
    /// Destination CIDR (IPv4 or IPv6) or `any`. Default `any`.
    #[serde(default = "any")]
    pub destination: String,
    /// `any`, a port (`443`) or a range (`8000-8100`); only with tcp, udp
    /// or any. Default `any`.
    #[serde(default = "any")]
    pub port: String,
    /// Free text shown by `vpnctl policy show`.
    pub comment: Option<String>,
}

fn any() -> String {
    "any".into()
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    Allow,
    Deny,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Proto {
    Any,
    Tcp,
    Udp,
    Icmp,
    Icmp6,
}

/// A validated rule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    pub action: Action,
    pub proto: Proto,
    /// `None` = any destination.
    pub dst: Option<IpNet>,
    /// Inclusive port range; `None` = any port.
    pub ports: Option<(u16, u16)>,
    pub comment: Option<String>,
}

impl Rule {
    /// Parses a rule, naming the bad field and value on error.
    pub fn parse(c: &RuleConfig) -> Result<Rule, RuleError> {
        let action = match c.action.as_str() {
            "allow" => Action::Allow,
            "deny" => Action::Deny,
            a => return Err(RuleError::Action(a.to_owned())),
        };
        let proto = match c.protocol.as_str() {
            "any" => Proto::Any,
            "tcp" => Proto::Tcp,
            "udp" => Proto::Udp,
            "icmp" => Proto::Icmp,
            "icmp6" => Proto::Icmp6,
            p => return Err(RuleError::Protocol(p.to_owned())),
        };
        let dst = match c.destination.as_str() {
            "any" => None,
            d => Some(
                d.parse::<IpNet>()
                    .map_err(|_| RuleError::Destination(d.to_owned()))?
                    .trunc(),
            ),
        };
        let ports = match c.port.as_str() {
            "any" => None,
            p => {
                let bad = || RuleError::Port(p.to_owned());
                let (lo, hi) = match p.split_once('-') {
                    Some((a, b)) => (
                        a.trim().parse::<u16>().map_err(|_| bad())?,
                        b.trim().parse::<u16>().map_err(|_| bad())?,
                    ),
                    None => {
                        let v = p.trim().parse::<u16>().map_err(|_| bad())?;
                        (v, v)
                    }
                };
                if lo > hi {
                    return Err(bad());
                }
                Some((lo, hi))
            }
        };
        if ports.is_some() && matches!(proto, Proto::Icmp | Proto::Icmp6) {
            return Err(RuleError::PortWithIcmp {
                port: c.port.clone(),
                protocol: c.protocol.clone(),
            });
        }
        match (proto, dst) {
            (Proto::Icmp, Some(IpNet::V6(_))) => {
                return Err(RuleError::IcmpToIpv6(c.destination.clone()));
            }
            (Proto::Icmp6, Some(IpNet::V4(_))) => {
                return Err(RuleError::Icmp6ToIpv4(c.destination.clone()));
            }
            _ => {}
        }
        Ok(Rule {
            action,
            proto,
            dst,
            ports,
            comment: c.comment.clone(),
        })
    }

    /// Whether this rule matches `p` (see the module docs).
    pub fn matches(&self, p: &PacketMeta) -> bool {
        if let Some(net) = self.dst
            && !net.contains(&p.remote)
        {
            return false;
        }
        let proto_ok = match self.proto {
            Proto::Any => true,
            Proto::Tcp => p.proto == PROTO_TCP,
            Proto::Udp => p.proto == PROTO_UDP,
            Proto::Icmp => p.proto == PROTO_ICMP,
            Proto::Icmp6 => p.proto == PROTO_ICMP6,
        };
        if !proto_ok {
            return false;
        }
        match self.ports {
            None => true,
            Some((lo, hi)) => has_ports(p.proto) && (lo..=hi).contains(&p.port),
        }
    }

    /// One line for displays.
    pub fn describe(&self) -> String {
        format!(
            "{} {} {} port {}",
            match self.action {
                Action::Allow => "allow",
                Action::Deny => "deny",
            },
            match self.proto {
                Proto::Any => "any",
                Proto::Tcp => "tcp",
                Proto::Udp => "udp",
                Proto::Icmp => "icmp",
                Proto::Icmp6 => "icmp6",
            },
            self.dst.map_or("any".to_string(), |d| d.to_string()),
            match self.ports {
                None => "any".to_string(),
                Some((a, b)) if a == b => a.to_string(),
                Some((a, b)) => format!("{a}-{b}"),
            }
        )
    }
}

fn has_ports(bucket: u8) -> bool {
    bucket == PROTO_TCP || bucket == PROTO_UDP
}

/// What the classifier sees of a packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PacketMeta {
    /// The remote end: destination from the client, source to it.
    pub remote: IpAddr,
    /// Protocol bucket: `PROTO_TCP`, `_UDP`, `_ICMP`, `_ICMP6` or `_OTHER`.
    pub proto: u8,
    /// The remote port (TCP/UDP), else 0.
    pub port: u16,
}

/// The protocol bucket of an IP protocol number.
pub fn bucket(is_v4: bool, proto: u8, first_fragment: bool) -> u8 {
    match proto {
        _ if !first_fragment => PROTO_OTHER,
        PROTO_TCP | PROTO_UDP => proto,
        PROTO_ICMP if is_v4 => PROTO_ICMP,
        PROTO_ICMP6 if !is_v4 => PROTO_ICMP6,
        _ => PROTO_OTHER,
    }
}

/// The reference: index of the first rule matching `p`, if any.
pub fn evaluate(rules: &[Rule], p: &PacketMeta) -> Option<usize> {
    rules.iter().position(|r| r.matches(p))
}

/// A policy compiled to map entries (layout in `vpn-common`).
#[derive(Debug, Default, Clone, serde::Serialize, serde::Deserialize)]
pub struct Compiled {
    /// Distinct rule prefix lengths per family, longest first, ending in 0.
    pub v4_lens: Vec<u8>,
    pub v6_lens: Vec<u8>,
    pub classes: Vec<(ClassKey, u32)>,
    /// Per (class, bucket): its intervals, sorted and disjoint. Installing
    /// places them in `policy_intervals` and points `policy_ports` at them.
    pub ports: Vec<(PortsKey, Vec<Interval>)>,
    pub split_entries: Vec<(u32, SplitKey)>,
}

impl Compiled {
    /// Map entries this policy takes, over all maps.
    pub fn entries(&self) -> usize {
        self.classes.len() + self.ports.len() + self.intervals() + self.split_entries.len()
    }

    /// Slots it needs in `policy_intervals`.
    pub fn intervals(&self) -> usize {
        self.ports.iter().map(|(_, v)| v.len()).sum()
    }

    /// `base` with the prefix-length lists filled in.
    pub fn info(&self, base: PolicyInfo) -> PolicyInfo {
        let mut info = base;
        info.n_v4 = self.v4_lens.len() as u8;
        info.n_v6 = self.v6_lens.len() as u8;
        info.v4_lens[..self.v4_lens.len()].copy_from_slice(&self.v4_lens);
        info.v6_lens[..self.v6_lens.len()].copy_from_slice(&self.v6_lens);
        info
    }
}

fn family_of(n: &IpNet) -> u8 {
    match n {
        IpNet::V4(_) => FAMILY_V4 as u8,
        IpNet::V6(_) => FAMILY_V6 as u8,
    }
}

/// The address bytes of `ip` masked to `len` bits (IPv4 in the first 4).
pub fn masked(ip: &IpAddr, len: u8) -> [u8; 16] {
    let mut addr = [0u8; 16];
    match ip {
        IpAddr::V4(a) => addr[..4].copy_from_slice(&a.octets()),
        IpAddr::V6(a) => addr.copy_from_slice(&a.octets()),
    }
    for (j, b) in addr.iter_mut().enumerate() {
        let bits = (usize::from(len)).saturating_sub(j * 8).min(8);
        *b &= if bits == 0 { 0 } else { 0xffu8 << (8 - bits) };
    }
    addr
}

fn split_key(policy: u32, net: &IpNet) -> (u32, SplitKey) {
    (
        SPLIT_KEY_FIXED_BITS + u32::from(net.prefix_len()),
        SplitKey {
            policy,
            family: u32::from(family_of(net)),
            addr: masked(&net.network(), net.prefix_len()),
        },
    )
}

/// `[lo, hi]` as the fewest aligned port prefixes `(value, prefix length)`.
pub fn port_prefixes(lo: u16, hi: u16) -> Vec<(u16, u32)> {
    let (mut lo, hi) = (u32::from(lo), u32::from(hi));
    let mut out = Vec::new();
    while lo <= hi {
        let mut size = if lo == 0 {
            1 << 16
        } else {
            1u32 << lo.trailing_zeros()
        };
        while lo + size - 1 > hi {
            size >>= 1;
        }
        out.push((lo as u16, 16 - size.trailing_zeros()));
        lo += size;
    }
    out
}

/// Compiles `rules` for policy `id`. Rule `i` counts its hits in slot
/// `first_slot + i`. `split` is the destinations an enforcing policy allows.
/// Fails when the result would exceed `max_entries` or the policy uses more
/// distinct prefix lengths than the data path probes.
pub fn compile(
    id: u32,
    rules: &[Rule],
    first_slot: u32,
    split: &[IpNet],
    max_entries: usize,
) -> Result<Compiled, CompileError> {
    let mut out = Compiled::default();
    let mut class_id = 0u32;
    let mut entries = 0usize;
    for (family, root) in [
        (FAMILY_V4 as u8, "0.0.0.0/0".parse::<IpNet>().unwrap()),
        (FAMILY_V6 as u8, "::/0".parse::<IpNet>().unwrap()),
    ] {
        // Rules by destination prefix (this family), and any-destination rules.
        let mut by_prefix: HashMap<IpNet, Vec<usize>> = HashMap::new();
        let mut any: Vec<usize> = Vec::new();
        for (i, r) in rules.iter().enumerate() {
            match r.dst {
                None => any.push(i),
                Some(d) if family_of(&d) == family => by_prefix.entry(d).or_default().push(i),
                Some(_) => {}
            }
        }
        let mut lens: Vec<u8> = by_prefix
            .keys()
            .map(|n| n.prefix_len())
            .chain([0])
            .collect();
        lens.sort_unstable_by(|a, b| b.cmp(a));
        lens.dedup();
        if lens.len() > MAX_PREFIX_LENS {
            return Err(CompileError::TooManyPrefixLengths {
                family: if family == FAMILY_V4 as u8 {
                    "IPv4"
                } else {
                    "IPv6"
                },
                lens: lens.len(),
            });
        }
        let mut classes: Vec<IpNet> = by_prefix.keys().copied().collect();
        classes.push(root);
        classes.sort();
        classes.dedup();
        let buckets = [
            PROTO_TCP,
            PROTO_UDP,
            if family == FAMILY_V4 as u8 {
                PROTO_ICMP
            } else {
                PROTO_ICMP6
            },
            PROTO_OTHER,
        ];
        for class in &classes {
            class_id += 1;
            out.classes.push((
                ClassKey {
                    policy: id,
                    family,
                    prefix_len: class.prefix_len(),
                    _pad: 0,
                    addr: masked(&class.network(), class.prefix_len()),
                },
                class_id,
            ));
            // Rules that can match an address of this class: those whose
            // prefix contains the class prefix (its ancestors, found by
            // masking it to each shorter length), plus any-destination ones.
            let mut applicable: Vec<usize> = any.clone();
            for &len in lens.iter().filter(|&&l| l <= class.prefix_len() && l > 0) {
                let anc = IpNet::new(class.network(), len)
                    .expect("valid length")
                    .trunc();
                if let Some(v) = by_prefix.get(&anc) {
                    applicable.extend_from_slice(v);
                }
            }
            applicable.sort_unstable();
            let example = class.network();
            for &b in &buckets {
                let candidates: Vec<(usize, &Rule)> = applicable
                    .iter()
                    .map(|&i| (i, &rules[i]))
                    .filter(|(_, r)| {
                        // Port aside, does the rule accept this bucket?
                        r.matches(&PacketMeta {
                            remote: example,
                            proto: b,
                            port: r.ports.map_or(0, |p| p.0),
                        })
                    })
                    .collect();
                let intervals: Vec<Interval> = first_match_intervals(&candidates, has_ports(b))
                    .into_iter()
                    .map(|(lo, hi, idx)| Interval {
                        lo,
                        hi,
                        verdict: Verdict {
                            slot: first_slot + idx as u32,
                            action: match rules[idx].action {
                                Action::Allow => ACTION_ALLOW,
                                Action::Deny => ACTION_DENY,
                            },
                        },
                    })
                    .collect();
                if intervals.is_empty() {
                    continue;
                }
                entries += 1 + intervals.len();
                out.ports.push((
                    PortsKey {
                        policy: id,
                        class: class_id,
                        proto: u32::from(b),
                    },
                    intervals,
                ));
            }
            entries += 1;
            if entries > max_entries {
                return Err(CompileError::TooManyEntries { max: max_entries });
            }
        }
        if family == FAMILY_V4 as u8 {
            out.v4_lens = lens;
        } else {
            out.v6_lens = lens;
        }
    }
    for net in split {
        out.split_entries.push(split_key(id, net));
    }
    Ok(out)
}

/// Splits the port space into maximal intervals with the same first
/// matching rule among `candidates` (in rule order). Without ports, only
/// port-less rules can match and the whole space is one interval.
fn first_match_intervals(candidates: &[(usize, &Rule)], ports: bool) -> Vec<(u16, u16, usize)> {
    if !ports {
        return candidates
            .iter()
            .find(|(_, r)| r.ports.is_none())
            .map(|&(i, _)| vec![(0, u16::MAX, i)])
            .unwrap_or_default();
    }
    // Elementary interval starts.
    let mut points: BTreeSet<u32> = BTreeSet::from([0]);
    for (_, r) in candidates {
        if let Some((lo, hi)) = r.ports {
            points.insert(u32::from(lo));
            if hi < u16::MAX {
                points.insert(u32::from(hi) + 1);
            }
        }
        if r.ports.is_none() {
            // Nothing after a port-less rule can win.
            break;
        }
    }
    let starts: Vec<u32> = points.into_iter().collect();
    let mut out: Vec<(u16, u16, usize)> = Vec::new();
    for (k, &a) in starts.iter().enumerate() {
        let b = starts.get(k + 1).map_or(u32::from(u16::MAX), |n| n - 1);
        let winner = candidates.iter().find(|(_, r)| match r.ports {
            None => true,
            Some((lo, hi)) => u32::from(lo) <= a && a <= u32::from(hi),
        });
        let Some(&(idx, _)) = winner else { continue };
        match out.last_mut() {
            Some(last) if last.2 == idx && u32::from(last.1) + 1 == a => last.1 = b as u16,
            _ => out.push((a as u16, b as u16, idx)),
        }
    }
    out
}

/// Looks `p` up in compiled entries the way the BPF program does (probe
/// the prefix lengths longest first, then binary-search the class's
/// intervals); checks the compiler against [`evaluate`] without a kernel.
pub fn lookup(c: &Compiled, policy: u32, p: &PacketMeta) -> Option<Verdict> {
    let (family, lens) = match p.remote {
        IpAddr::V4(_) => (FAMILY_V4 as u8, &c.v4_lens),
        IpAddr::V6(_) => (FAMILY_V6 as u8, &c.v6_lens),
    };
    let class = lens.iter().find_map(|&len| {
        let key = ClassKey {
            policy,
            family,
            prefix_len: len,
            _pad: 0,
            addr: masked(&p.remote, len),
        };
        c.classes.iter().find(|(k, _)| *k == key).map(|(_, id)| *id)
    })?;
    let want = PortsKey {
        policy,
        class,
        proto: u32::from(p.proto),
    };
    let (_, intervals) = c.ports.iter().find(|(k, _)| *k == want)?;
    let (mut lo, mut hi) = (0usize, intervals.len());
    while lo < hi {
        let mid = lo + (hi - lo) / 2;
        let iv = &intervals[mid];
        if p.port < iv.lo {
            hi = mid;
        } else if p.port > iv.hi {
            lo = mid + 1;
        } else {
            return Some(iv.verdict);
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(action: &str, proto: &str, dst: &str, port: &str) -> Rule {
        Rule::parse(&RuleConfig {
            action: action.into(),
            protocol: proto.into(),
            destination: dst.into(),
            port: port.into(),
            comment: None,
        })
        .unwrap()
    }

    fn pkt(remote: &str, proto: u8, port: u16) -> PacketMeta {
        PacketMeta {
            remote: remote.parse().unwrap(),
            proto,
            port,
        }
    }

    #[test]
    fn parse_errors_name_the_value() {
        let bad = |proto: &str, dst: &str, port: &str| {
            Rule::parse(&RuleConfig {
                action: "deny".into(),
                protocol: proto.into(),
                destination: dst.into(),
                port: port.into(),
                comment: None,
            })
            .unwrap_err()
        };
        assert_eq!(bad("gre", "any", "any"), RuleError::Protocol("gre".into()));
        assert_eq!(
            bad("tcp", "198.18.2.0/33", "any"),
            RuleError::Destination("198.18.2.0/33".into())
        );
        assert_eq!(bad("tcp", "any", "90-80"), RuleError::Port("90-80".into()));
        assert_eq!(bad("tcp", "any", "70000"), RuleError::Port("70000".into()));
        assert!(matches!(
            bad("icmp", "any", "80"),
            RuleError::PortWithIcmp { .. }
        ));
        assert_eq!(
            bad("icmp", "fd00::/8", "any"),
            RuleError::IcmpToIpv6("fd00::/8".into())
        );
        // The message names the value and what would be valid.
        assert_eq!(
            bad("icmp", "any", "80").to_string(),
            "port '80' cannot be combined with protocol 'icmp': ICMP has no ports"
        );
    }

    #[test]
    fn reference_semantics() {
        let rules = vec![
            rule("allow", "tcp", "198.18.2.0/24", "443"),
            rule("deny", "tcp", "198.18.2.0/24", "any"),
            rule("deny", "udp", "any", "any"),
            rule("deny", "any", "any", "8000-8100"),
            rule("deny", "icmp", "any", "any"),
        ];
        assert_eq!(
            evaluate(&rules, &pkt("198.18.2.2", PROTO_TCP, 443)),
            Some(0)
        );
        assert_eq!(evaluate(&rules, &pkt("198.18.2.2", PROTO_TCP, 22)), Some(1));
        assert_eq!(evaluate(&rules, &pkt("198.18.3.2", PROTO_TCP, 22)), None);
        assert_eq!(evaluate(&rules, &pkt("fd00:2::2", PROTO_UDP, 53)), Some(2));
        assert_eq!(
            evaluate(&rules, &pkt("198.18.3.2", PROTO_TCP, 8050)),
            Some(3)
        );
        assert_eq!(evaluate(&rules, &pkt("198.18.3.2", PROTO_ICMP, 0)), Some(4));
        assert_eq!(evaluate(&rules, &pkt("fd00:2::2", PROTO_ICMP6, 0)), None);
        assert_eq!(
            evaluate(&rules, &pkt("198.18.3.2", PROTO_OTHER, 0)),
            None,
            "port rules skip port-less protocols"
        );
    }

    #[test]
    fn schedules() {
        let sched = |days: &[&str], from: &str, to: &str| {
            Schedule::parse(&ScheduleConfig {
                days: days.iter().map(|d| d.to_string()).collect(),
                from: from.into(),
                to: to.into(),
                fallback: "x".into(),
            })
        };
        let office = sched(&["mon", "tue", "wed", "thu", "fri"], "08:00", "18:00").unwrap();
        assert!(office.active(0, 8 * 60));
        assert!(!office.active(0, 18 * 60), "the end is exclusive");
        assert!(!office.active(5, 12 * 60), "not on Saturday");
        let night = sched(&["fri"], "22:00", "06:00").unwrap();
        assert!(night.active(4, 23 * 60));
        assert!(night.active(5, 5 * 60), "Friday's night runs into Saturday");
        assert!(!night.active(4, 5 * 60), "but not Friday early morning");
        let all = sched(&[], "00:00", "24:00").unwrap();
        assert!(all.active(6, 24 * 60 - 1));
        assert_eq!(
            sched(&["funday"], "00:00", "24:00").unwrap_err(),
            ScheduleError::Day("funday".into())
        );
        assert_eq!(
            sched(&[], "25:00", "24:00").unwrap_err(),
            ScheduleError::Time {
                field: "from",
                value: "25:00".into()
            }
        );
        assert!(matches!(
            sched(&[], "09:00", "09:00").unwrap_err(),
            ScheduleError::EmptyWindow { .. }
        ));
        let (d, m) = local_now();
        assert!(d < 7 && m < 24 * 60);
    }

    #[test]
    fn buckets() {
        assert_eq!(bucket(true, 6, true), PROTO_TCP);
        assert_eq!(bucket(true, 6, false), PROTO_OTHER);
        assert_eq!(bucket(true, 58, true), PROTO_OTHER);
        assert_eq!(bucket(false, 58, true), PROTO_ICMP6);
        assert_eq!(bucket(false, 1, true), PROTO_OTHER);
        assert_eq!(bucket(true, 47, true), PROTO_OTHER);
    }

    #[test]
    fn port_prefix_decomposition_covers_exactly() {
        let mut rng = Lcg(7);
        for _ in 0..2000 {
            let a = rng.next() as u16;
            let b = rng.next() as u16;
            let (lo, hi) = (a.min(b), a.max(b));
            let ps = port_prefixes(lo, hi);
            let covered: u64 = ps.iter().map(|&(_, bits)| 1u64 << (16 - bits)).sum();
            assert_eq!(covered, u64::from(hi - lo) + 1);
            for &(v, bits) in &ps {
                let size = 1u32 << (16 - bits);
                assert_eq!(u32::from(v) % size, 0, "aligned");
                assert!(v >= lo && u32::from(v) + size - 1 <= u32::from(hi));
            }
        }
        assert_eq!(port_prefixes(0, 65535), vec![(0, 0)]);
        assert_eq!(port_prefixes(443, 443), vec![(443, 16)]);
    }

    /// Small deterministic generator so failures reproduce from the seed.
    pub struct Lcg(pub u64);
    impl Lcg {
        pub fn next(&mut self) -> u64 {
            self.0 = self
                .0
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            self.0 >> 33
        }
    }

    #[test]
    fn compiler_agrees_with_reference_on_random_rule_sets() {
        let mut rng = Lcg(0x5eed);
        for round in 0..200 {
            let rules =
                crate::policy::testgen::rules(&mut |n| rng.next() % n, 1 + (round % 30) as usize);
            let c = compile(7, &rules, 100, &[], 1_000_000).unwrap();
            for _ in 0..50 {
                let p = crate::policy::testgen::packet(&mut |n| rng.next() % n, &rules);
                let want =
                    evaluate(&rules, &p).map(|i| (100 + i as u32, rules[i].action == Action::Deny));
                let got = lookup(&c, 7, &p).map(|v| (v.slot, v.action == ACTION_DENY));
                assert_eq!(got, want, "round {round} packet {p:?} rules {rules:#?}");
            }
        }
    }

    #[test]
    fn entry_limit_is_a_clear_error() {
        let rules: Vec<Rule> = (0..100)
            .map(|i| rule("deny", "tcp", &format!("198.18.{i}.0/24"), "1000-2000"))
            .collect();
        let e = compile(1, &rules, 0, &[], 50).unwrap_err();
        assert_eq!(e, CompileError::TooManyEntries { max: 50 });
        assert!(e.to_string().contains("more than 50 map entries"), "{e}");
    }
}

/// Random rule sets and packets for the differential tests (unit and BPF;
/// feature `testing` for the tests and bench crates).
#[cfg(any(test, feature = "testing"))]
pub mod testgen {
    use super::*;

    const NETS: [&str; 10] = [
        "198.18.0.0/15",
        "198.18.2.0/24",
        "198.18.2.0/25",
        "198.18.2.128/26",
        "198.18.2.7/32",
        "198.19.0.0/16",
        "fd00::/8",
        "fd00:2::/64",
        "fd00:2::/96",
        "fd00:2::7/128",
    ];

    /// A random rule set of `n` rules; `r(k)` returns a number below `k`.
    pub fn rules(r: &mut impl FnMut(u64) -> u64, n: usize) -> Vec<Rule> {
        (0..n)
            .map(|_| {
                let proto = ["any", "tcp", "udp", "icmp", "icmp6"][r(5) as usize];
                let dst = if r(4) == 0 {
                    "any".to_string()
                } else {
                    NETS[r(NETS.len() as u64) as usize].to_string()
                };
                let port = if matches!(proto, "icmp" | "icmp6") || r(3) == 0 {
                    "any".to_string()
                } else {
                    let lo = [0u64, 22, 53, 80, 443, 1000, 8000, 65535][r(8) as usize] + r(3);
                    let lo = lo.min(65535);
                    let hi = (lo + [0, 0, 1, 10, 1000, 65535][r(6) as usize]).min(65535);
                    if lo == hi {
                        lo.to_string()
                    } else {
                        format!("{lo}-{hi}")
                    }
                };
                let c = RuleConfig {
                    action: if r(2) == 0 { "allow" } else { "deny" }.into(),
                    protocol: proto.into(),
                    destination: dst.clone(),
                    port,
                    comment: None,
                };
                Rule::parse(&c).unwrap_or_else(|_| {
                    // icmp/icmp6 with the other family: fall back to any destination.
                    Rule::parse(&RuleConfig {
                        destination: "any".into(),
                        ..c
                    })
                    .unwrap()
                })
            })
            .collect()
    }

    /// A random packet, biased towards the rules' own addresses and ports.
    pub fn packet(r: &mut impl FnMut(u64) -> u64, rules: &[Rule]) -> PacketMeta {
        let v4 = r(2) == 0;
        let remote: IpAddr = match rules
            .get(r(rules.len() as u64 + 1) as usize)
            .and_then(|x| x.dst)
        {
            Some(net) if r(3) != 0 && matches!(net, IpNet::V4(_)) == v4 => {
                // An address inside (or at the edge of) a rule's prefix.
                match net {
                    IpNet::V4(n) => {
                        let span = u64::from(!u32::from(n.netmask()));
                        std::net::Ipv4Addr::from(u32::from(n.network()) + r(span + 1) as u32).into()
                    }
                    IpNet::V6(n) => {
                        let host = r(1 << 20) as u128 & !u128::from(n.netmask());
                        std::net::Ipv6Addr::from(u128::from(n.network()) | host).into()
                    }
                }
            }
            _ if v4 => {
                std::net::Ipv4Addr::new(198, 18 + r(2) as u8, r(4) as u8, r(256) as u8).into()
            }
            _ => std::net::Ipv6Addr::new(0xfd00, r(3) as u16, 0, 0, 0, 0, 0, r(256) as u16).into(),
        };
        let proto = match r(5) {
            0 => PROTO_TCP,
            1 => PROTO_UDP,
            2 if v4 => PROTO_ICMP,
            2 => PROTO_ICMP6,
            3 => PROTO_OTHER,
            _ => [PROTO_TCP, PROTO_UDP][r(2) as usize],
        };
        let port = if has_ports(proto) {
            match rules
                .get(r(rules.len() as u64 + 1) as usize)
                .and_then(|x| x.ports)
            {
                Some((lo, hi)) if r(2) == 0 => {
                    [lo, hi, lo.saturating_sub(1), hi.saturating_add(1)][r(4) as usize]
                }
                _ => r(65536) as u16,
            }
        } else {
            0
        };
        PacketMeta {
            remote,
            proto,
            port,
        }
    }
}
