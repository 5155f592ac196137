//! TC programs on the tunnel device: session accounting and group-policy
//! enforcement.
//!
//! The tunnel device is a layer-3 TUN device, so `skb->data` starts at the
//! IP header (`L2_LEN` = 0). `BPF_PROG_TEST_RUN` hands TC programs an
//! Ethernet frame, so the differential tests load the object with
//! `L2_LEN` = 14. Each hook is a few lines; the parsing and the decisions
//! live in helpers returning `Result`/`Option` so `?` works.
//!
//! Map layout and the classification scheme are documented in `vpn-common`.
#![cfg_attr(target_arch = "bpf", no_std)]
#![cfg_attr(target_arch = "bpf", no_main)]

#[cfg(target_arch = "bpf")]
mod prog {
    use aya_ebpf::{
        bindings::{TC_ACT_OK, TC_ACT_SHOT, xdp_action},
        btf_maps::{
            Array, HashMap, LpmTrie, LruHashMap, PerCpuArray, PerCpuHashMap, lpm_trie::Key,
        },
        macros::{btf_map, classifier, xdp},
        programs::{TcContext, XdpContext},
    };
    use vpn_common::{
        ACTION_DENY, ClassKey, DOWN_RATE_TOLERANCE_NS, DROP_REASONS, DropReason, FAMILY_V4,
        FAMILY_V6, Interval, IntervalRange, MAX_CLASS_ENTRIES, MAX_INTERVALS, MAX_POLICIES,
        MAX_PORTS_ENTRIES, MAX_PREFIX_LENS, MAX_RULE_SLOTS, MAX_SEARCH_STEPS, MAX_SESSIONS,
        MAX_SPLIT_ENTRIES, POLICY_ISOLATE, POLICY_SPLIT_ENFORCE, PROTO_ICMP, PROTO_ICMP6,
        PROTO_OTHER, PROTO_TCP, PROTO_UDP, PolicyInfo, PortsKey, RATE_TOLERANCE_NS, RateState,
        SPLIT_KEY_FIXED_BITS, SessionInfo, SessionKey, SessionStats, SplitKey, Verdict,
    };
    use vpn_common::{
        Ban, GUARD_DROP_REASONS, GuardConfig, GuardDrop, HelloBucket, MAX_BANS, MAX_HELLO_SOURCES,
    };
    use vpn_common::{
        EXEMPT_KEY_FIXED_BITS, ExemptKey, MARK_BASE, MARK_EXEMPT, MARK_WEB, MAX_EXEMPT_ENTRIES,
        MAX_WEB_PORTS,
    };

    /// Hash maps whose entries are allocated on insert.
    const NO_PREALLOC: usize = aya_ebpf::bindings::BPF_F_NO_PREALLOC as usize;

    /// Bytes before the IP header: 0 on the TUN device, 14 under
    /// `BPF_PROG_TEST_RUN`. Set by the loader.
    // SAFETY: the loader sets this symbol by name before loading; nothing else has the name.
    #[unsafe(no_mangle)]
    static L2_LEN: u32 = 0;

    /// Sessions by client tunnel address; written by the daemon.
    #[btf_map]
    static SESSIONS: HashMap<SessionKey, SessionInfo, { MAX_SESSIONS as usize }> = HashMap::new();

    /// Per-session traffic counters. The daemon creates the (zeroed) entry
    /// with the session and deletes it at the end; BPF only adds.
    #[btf_map]
    static SESSION_STATS: PerCpuHashMap<SessionKey, SessionStats, { MAX_SESSIONS as usize }> =
        PerCpuHashMap::new();

    /// Dropped packets per [`DropReason`].
    #[btf_map]
    static DROPS: PerCpuArray<u64, { DROP_REASONS as usize }> = PerCpuArray::new();

    /// Per-policy switches, by policy id.
    #[btf_map]
    static POLICIES: HashMap<u32, PolicyInfo, { MAX_POLICIES as usize }> = HashMap::new();

    /// (policy, family, prefix length, masked address) -> class id.
    #[btf_map]
    static POLICY_CLASS: HashMap<ClassKey, u32, { MAX_CLASS_ENTRIES as usize }, NO_PREALLOC> =
        HashMap::new();

    /// (policy, class, protocol bucket) -> the class's intervals.
    #[btf_map]
    static POLICY_PORTS: HashMap<
        PortsKey,
        IntervalRange,
        { MAX_PORTS_ENTRIES as usize },
        NO_PREALLOC,
    > = HashMap::new();

    /// Port intervals with their verdicts, a sorted run per class.
    #[btf_map]
    static POLICY_INTERVALS: Array<Interval, { MAX_INTERVALS as usize }> = Array::new();

    /// `[0]`: the active uplink's number; 0 = the daemon manages no uplinks
    /// (packets are not marked). `[1]`: bit n-1 set = uplink n is healthy.
    #[btf_map]
    static UPLINK_ACTIVE: Array<u32, 2> = Array::new();

    /// `[0]`: bit n-1 set = web proxy n is healthy.
    #[btf_map]
    static WEB_PROXY_UP: Array<u32, 1> = Array::new();

    /// Per uplink, the destinations that keep the client's own address.
    #[btf_map]
    static NAT_EXEMPT: LpmTrie<ExemptKey, u32, { MAX_EXEMPT_ENTRIES as usize }> = LpmTrie::new();

    /// Destinations an enforcing policy's clients may reach.
    #[btf_map]
    static SPLIT_ALLOW: LpmTrie<SplitKey, u32, { MAX_SPLIT_ENTRIES as usize }> = LpmTrie::new();

    /// Packets that matched each rule slot.
    #[btf_map]
    static RULE_HITS: PerCpuArray<u64, { MAX_RULE_SLOTS as usize }> = PerCpuArray::new();

    /// Bandwidth policing state by session id.
    #[btf_map]
    static RATE_STATE: HashMap<u64, RateState, { MAX_SESSIONS as usize }> = HashMap::new();

    /// GCRA policer: whether a packet of `len` bytes at `rate_bps` conforms,
    /// updating the session's state for the direction (`up` = from the
    /// client).
    /// Two CPUs updating one session at once may both pass: the limit is
    /// exact over time, not per packet.
    #[inline(always)]
    fn police(session_id: u64, up: bool, len: u64, rate_bps: u64) -> bool {
        // SAFETY: a helper without arguments.
        let now = unsafe { aya_ebpf::helpers::bpf_ktime_get_ns() };
        let st = match RATE_STATE.get_ptr_mut(&session_id) {
            Some(p) => p,
            None => {
                let _ = RATE_STATE.insert(&session_id, &RateState::default(), 0);
                match RATE_STATE.get_ptr_mut(&session_id) {
                    Some(p) => p,
                    None => return true,
                }
            }
        };
        // SAFETY: `st` is this session's RATE_STATE value, non-null; CPUs may race on it (RATE_STATE's docs): an update lost at worst.
        let (tat, tolerance) = unsafe {
            if up {
                ((*st).up_tat, RATE_TOLERANCE_NS)
            } else {
                ((*st).down_tat, DOWN_RATE_TOLERANCE_NS)
            }
        };
        if tat > now && tat - now > tolerance {
            return false;
        }
        let cost = len * 8 * 1_000_000_000 / rate_bps;
        let next = if tat > now { tat } else { now } + cost;
        // SAFETY: as above.
        unsafe {
            if up {
                (*st).up_tat = next;
            } else {
                (*st).down_tat = next;
            }
        }
        true
    }

    /// What the classifier needs from a packet.
    struct Packet {
        family: u32,
        src: [u8; 16],
        dst: [u8; 16],
        /// Protocol bucket (`PROTO_*`).
        proto: u8,
        sport: u16,
        dport: u16,
    }

    impl Packet {
        fn key(family: u32, a: &[u8; 16]) -> SessionKey {
            if family == FAMILY_V4 {
                SessionKey::v4([a[0], a[1], a[2], a[3]])
            } else {
                SessionKey::v6(*a)
            }
        }
    }

    /// IPv6 Authentication Header.
    const IPPROTO_AH: u8 = 51;

    /// Whether `nh` is an IPv6 extension header (RFC 8200 §4, the IANA
    /// registry): hop-by-hop, routing, fragment, destination options, AH,
    /// mobility, HIP, shim6 and the experimental ones. ESP (50) is not:
    /// nothing after it can be read.
    #[inline(always)]
    fn is_ipv6_extension(nh: u8) -> bool {
        matches!(nh, 0 | 43 | 44 | 51 | 60 | 135 | 139 | 140 | 253 | 254)
    }

    #[inline(always)]
    fn l2_len() -> usize {
        // SAFETY: a plain read of a loader-set constant.
        unsafe { core::ptr::read_volatile(&L2_LEN) as usize }
    }

    #[inline(always)]
    fn be16(ctx: &TcContext, off: usize) -> Result<u16, ()> {
        ctx.load::<[u8; 2]>(off)
            .map(u16::from_be_bytes)
            .map_err(|_| ())
    }

    /// Parses the IP header (IPv6: through up to four extension headers) and
    /// the ports of TCP and UDP. Non-first fragments carry no L4 header and
    /// go to the `PROTO_OTHER` bucket. An IPv6 header chain that does not
    /// end within four extension headers, or holds one this parser cannot
    /// walk, is an error (dropped as malformed): in the "other" bucket it
    /// would have slipped past rules for its real protocol and port.
    #[inline(always)]
    fn parse(ctx: &TcContext) -> Result<Packet, ()> {
        let off = l2_len();
        let b0 = ctx.load::<u8>(off).map_err(|_| ())?;
        let mut p = Packet {
            family: 0,
            src: [0; 16],
            dst: [0; 16],
            proto: PROTO_OTHER,
            sport: 0,
            dport: 0,
        };
        let (proto, l4, first_fragment) = match b0 >> 4 {
            4 => {
                let ihl = usize::from(b0 & 0x0f) * 4;
                if ihl < 20 {
                    return Err(());
                }
                p.family = FAMILY_V4;
                let s = ctx.load::<[u8; 4]>(off + 12).map_err(|_| ())?;
                let d = ctx.load::<[u8; 4]>(off + 16).map_err(|_| ())?;
                p.src[..4].copy_from_slice(&s);
                p.dst[..4].copy_from_slice(&d);
                let frag = be16(ctx, off + 6)?;
                let proto = ctx.load::<u8>(off + 9).map_err(|_| ())?;
                (proto, off + ihl, frag & 0x1fff == 0)
            }
            6 => {
                p.family = FAMILY_V6;
                p.src = ctx.load::<[u8; 16]>(off + 8).map_err(|_| ())?;
                p.dst = ctx.load::<[u8; 16]>(off + 24).map_err(|_| ())?;
                let mut nh = ctx.load::<u8>(off + 6).map_err(|_| ())?;
                let mut l4 = off + 40;
                let mut first = true;
                for _ in 0..4 {
                    match nh {
                        0 | 43 | 60 => {
                            let next = ctx.load::<u8>(l4).map_err(|_| ())?;
                            let len =
                                (usize::from(ctx.load::<u8>(l4 + 1).map_err(|_| ())?) + 1) * 8;
                            nh = next;
                            l4 += len;
                        }
                        44 => {
                            let next = ctx.load::<u8>(l4).map_err(|_| ())?;
                            if be16(ctx, l4 + 2)? & 0xfff8 != 0 {
                                first = false;
                            }
                            nh = next;
                            l4 += 8;
                        }
                        // AH (RFC 4302 §2.2): its length is in 4-byte units,
                        // less 2.
                        IPPROTO_AH => {
                            let next = ctx.load::<u8>(l4).map_err(|_| ())?;
                            let len =
                                (usize::from(ctx.load::<u8>(l4 + 1).map_err(|_| ())?) + 2) * 4;
                            nh = next;
                            l4 += len;
                        }
                        _ => break,
                    }
                }
                if is_ipv6_extension(nh) {
                    return Err(());
                }
                (nh, l4, first)
            }
            _ => return Err(()),
        };
        if !first_fragment {
            return Ok(p);
        }
        match proto {
            PROTO_TCP | PROTO_UDP => {
                p.proto = proto;
                p.sport = be16(ctx, l4)?;
                p.dport = be16(ctx, l4 + 2)?;
            }
            PROTO_ICMP if p.family == FAMILY_V4 => p.proto = PROTO_ICMP,
            PROTO_ICMP6 if p.family == FAMILY_V6 => p.proto = PROTO_ICMP6,
            _ => {}
        }
        Ok(p)
    }

    #[inline(always)]
    fn count_drop(reason: DropReason) {
        if let Some(n) = DROPS.get_ptr_mut(reason as u32) {
            // Per-CPU slot: no other CPU writes it.
            // SAFETY: a per-CPU slot the map returned, non-null: no other CPU writes it.
            unsafe { *n += 1 };
        }
    }

    #[inline(always)]
    fn addr_bits(family: u32) -> u32 {
        if family == FAMILY_V4 { 32 } else { 128 }
    }

    /// `a` masked to `len` bits (IPv4 in the first 4 bytes).
    #[inline(always)]
    fn mask(a: &[u8; 16], len: u8) -> [u8; 16] {
        let mut m = [0u8; 16];
        let len = usize::from(len);
        for j in 0..16 {
            let bits = if len >= (j + 1) * 8 {
                8
            } else if len <= j * 8 {
                0
            } else {
                len - j * 8
            };
            m[j] = if bits == 0 {
                0
            } else {
                a[j] & (0xffu8 << (8 - bits))
            };
        }
        m
    }

    /// The first rule of `policy` matching a packet to or from `remote`:
    /// one hash lookup per distinct prefix length of the policy (longest
    /// first) for the class, then a binary search of the class's port
    /// intervals. The cost depends on the policy's shape, not its size.
    #[inline(always)]
    fn classify(
        info: &PolicyInfo,
        policy: u32,
        family: u32,
        remote: &[u8; 16],
        proto: u8,
        port: u16,
    ) -> Option<Verdict> {
        let (n, lens) = if family == FAMILY_V4 {
            (info.n_v4, &info.v4_lens)
        } else {
            (info.n_v6, &info.v6_lens)
        };
        let mut class = 0u32;
        for i in 0..MAX_PREFIX_LENS {
            if i >= usize::from(n) {
                break;
            }
            let key = ClassKey {
                policy,
                family: family as u8,
                prefix_len: lens[i],
                _pad: 0,
                addr: mask(remote, lens[i]),
            };
            // SAFETY: the value is read at once; the daemon never changes a policy version in place (a new one gets a new id).
            if let Some(c) = unsafe { POLICY_CLASS.get(&key) } {
                class = *c;
                break;
            }
        }
        if class == 0 {
            return None;
        }
        // SAFETY: as for POLICY_CLASS: read at once, never changed in place.
        let range = unsafe {
            *POLICY_PORTS.get(&PortsKey {
                policy,
                class,
                proto: u32::from(proto),
            })?
        };
        let (mut lo, mut hi) = (range.start, range.start + range.count);
        for _ in 0..MAX_SEARCH_STEPS {
            if lo >= hi {
                return None;
            }
            let mid = lo + (hi - lo) / 2;
            let iv = POLICY_INTERVALS.get(mid)?;
            if port < iv.lo {
                hi = mid;
            } else if port > iv.hi {
                lo = mid + 1;
            } else {
                let v = iv.verdict;
                if let Some(n) = RULE_HITS.get_ptr_mut(v.slot) {
                    // SAFETY: a per-CPU slot the map returned, non-null: no other CPU writes it.
                    unsafe { *n += 1 };
                }
                return Some(v);
            }
        }
        None
    }

    /// Packets from a client: source must be its session, then the policy.
    #[inline(always)]
    fn from_client(ctx: &TcContext) -> Result<(), DropReason> {
        let p = parse(ctx).map_err(|_| DropReason::Malformed)?;
        let key = Packet::key(p.family, &p.src);
        let info = SESSIONS.get_ptr(&key).ok_or(DropReason::UnknownSource)?;
        // SAFETY: `info` is the value the map returned, non-null; two words read at once.
        let (policy, session_id) = unsafe { ((*info).policy_id, (*info).session_id) };
        // Before the policy's branches: marking there multiplies the
        // verifier's states past its limit (a dropped packet's mark is moot).
        mark_uplink(ctx, &p, policy);
        // The daemon inserts a policy's entry last and removes it only
        // after no session points at it: a miss cannot happen mid-update.
        // SAFETY: read at once; a policy's entry never changes in place.
        let info = if policy != 0 {
            unsafe { POLICIES.get(&policy) }
        } else {
            None
        };
        let stats = SESSION_STATS.get_ptr_mut(&key);
        if let Some(info) = info
            && let Err(reason) = redirect_web(ctx, &p, info)
                .and_then(|()| enforce_outbound(info, policy, session_id, u64::from(ctx.len()), &p))
        {
            if let Some(s) = stats {
                // SAFETY: SESSION_STATS is per-CPU: no other CPU writes this value.
                unsafe { (*s).rx_denied += 1 };
            }
            return Err(reason);
        }
        if let Some(s) = stats {
            // SAFETY: SESSION_STATS is per-CPU: no other CPU writes this value.
            unsafe {
                (*s).rx_packets += 1;
                (*s).rx_bytes += u64::from(ctx.len());
            }
        }
        Ok(())
    }

    /// Marks a client's packet with the active uplink and, if its
    /// destination is NAT-exempt there, the exemption bit: routing and
    /// masquerade follow the mark.
    #[inline(always)]
    fn mark_uplink(ctx: &TcContext, p: &Packet, policy: u32) {
        let Some(&mut_active) = UPLINK_ACTIVE.get(0) else {
            return;
        };
        if mut_active == 0 {
            return;
        }
        let mut active = mut_active;
        // A policy's pinned uplink, while it is healthy.
        if policy != 0
            // SAFETY: read at once; a policy's entry never changes in place.
            && let Some(info) = unsafe { POLICIES.get(&policy) }
        {
            let pinned = u32::from(info.uplink);
            if (1..=16).contains(&pinned)
                && let Some(&healthy) = UPLINK_ACTIVE.get(1)
                && healthy & (1u32 << (pinned - 1)) != 0
            {
                active = pinned;
            }
        }
        let k = Key::new(
            EXEMPT_KEY_FIXED_BITS + addr_bits(p.family),
            ExemptKey {
                uplink: active,
                family: p.family,
                addr: p.dst,
            },
        );
        let exempt = if NAT_EXEMPT.get(&k).is_some() {
            MARK_EXEMPT
        } else {
            0
        };
        ctx.set_mark(MARK_BASE | active | exempt);
    }

    /// Sends a client's web traffic (TCP to one of its policy's web ports,
    /// IPv4) to the policy's web proxy by marking it for the proxy's
    /// `ip rule`, while the proxy is healthy; while it is down the packet
    /// keeps its way, or is dropped when the policy fails closed.
    #[inline(always)]
    fn redirect_web(ctx: &TcContext, p: &Packet, info: &PolicyInfo) -> Result<(), DropReason> {
        if p.proto != PROTO_TCP || p.family != FAMILY_V4 {
            return Ok(());
        }
        let proxy = u32::from(info.web_proxy);
        if !(1..=16).contains(&proxy) {
            return Ok(());
        }
        let mut web = false;
        for i in 0..MAX_WEB_PORTS {
            if info.web_ports[i] != 0 && info.web_ports[i] == p.dport {
                web = true;
            }
        }
        if !web {
            return Ok(());
        }
        let up = WEB_PROXY_UP
            .get(0)
            .is_some_and(|&mask| mask & (1u32 << (proxy - 1)) != 0);
        if up {
            ctx.set_mark(MARK_BASE | MARK_WEB | proxy);
            Ok(())
        } else if info.web_fail_closed != 0 {
            Err(DropReason::WebProxyDown)
        } else {
            Ok(())
        }
    }

    /// The policy on a packet from the client: isolation, split
    /// enforcement, the rules (against its destination), the upload limit.
    #[inline(always)]
    fn enforce_outbound(
        info: &PolicyInfo,
        policy: u32,
        session_id: u64,
        len: u64,
        p: &Packet,
    ) -> Result<(), DropReason> {
        if info.flags & POLICY_ISOLATE != 0
            && SESSIONS.get_ptr(&Packet::key(p.family, &p.dst)).is_some()
        {
            return Err(DropReason::ClientIsolation);
        }
        if info.flags & POLICY_SPLIT_ENFORCE != 0 {
            let k = Key::new(
                SPLIT_KEY_FIXED_BITS + addr_bits(p.family),
                SplitKey {
                    policy,
                    family: p.family,
                    addr: p.dst,
                },
            );
            if SPLIT_ALLOW.get(&k).is_none() {
                return Err(DropReason::SplitEnforcement);
            }
        }
        if let Some(v) = classify(info, policy, p.family, &p.dst, p.proto, p.dport)
            && v.action == ACTION_DENY
        {
            return Err(DropReason::PolicyDeny);
        }
        if info.rate_up_bps != 0 && !police(session_id, true, len, info.rate_up_bps) {
            return Err(DropReason::RateLimit);
        }
        Ok(())
    }

    /// Packets to a client: destination must be a session, then its policy
    /// (matched against the remote end: the source).
    #[inline(always)]
    fn to_client(ctx: &TcContext) -> Result<(), DropReason> {
        let p = parse(ctx).map_err(|_| DropReason::Malformed)?;
        let key = Packet::key(p.family, &p.dst);
        let info = SESSIONS
            .get_ptr(&key)
            .ok_or(DropReason::UnknownDestination)?;
        // SAFETY: `info` is the value the map returned, non-null; two words read at once.
        let (policy, session_id) = unsafe { ((*info).policy_id, (*info).session_id) };
        let stats = SESSION_STATS.get_ptr_mut(&key);
        if policy != 0
            && let Err(reason) = enforce_inbound(ctx, policy, session_id, &p)
        {
            if let Some(s) = stats {
                // SAFETY: SESSION_STATS is per-CPU: no other CPU writes this value.
                unsafe { (*s).tx_denied += 1 };
            }
            return Err(reason);
        }
        if let Some(s) = stats {
            // SAFETY: SESSION_STATS is per-CPU: no other CPU writes this value.
            unsafe {
                (*s).tx_packets += 1;
                (*s).tx_bytes += u64::from(ctx.len());
            }
        }
        Ok(())
    }

    /// The policy on a packet to the client: the rules (against its
    /// source), then the download limit.
    #[inline(always)]
    fn enforce_inbound(
        ctx: &TcContext,
        policy: u32,
        session_id: u64,
        p: &Packet,
    ) -> Result<(), DropReason> {
        // SAFETY: read at once; a policy's entry never changes in place.
        let Some(info) = (unsafe { POLICIES.get(&policy) }) else {
            return Ok(());
        };
        if let Some(v) = classify(info, policy, p.family, &p.src, p.proto, p.sport)
            && v.action == ACTION_DENY
        {
            return Err(DropReason::PolicyDeny);
        }
        if info.rate_down_bps != 0
            && !police(session_id, false, u64::from(ctx.len()), info.rate_down_bps)
        {
            return Err(DropReason::RateLimit);
        }
        Ok(())
    }

    #[inline(always)]
    fn verdict(r: Result<(), DropReason>) -> i32 {
        match r {
            Ok(()) => TC_ACT_OK,
            Err(reason) => {
                count_drop(reason);
                TC_ACT_SHOT
            }
        }
    }

    /// Packets from VPN clients (written to the TUN device by the daemon).
    #[classifier]
    pub fn tun_ingress(ctx: TcContext) -> i32 {
        verdict(from_client(&ctx))
    }

    /// Packets routed to VPN clients (read from the TUN device by the daemon).
    #[classifier]
    pub fn tun_egress(ctx: TcContext) -> i32 {
        verdict(to_client(&ctx))
    }

    // ---- XDP guard in front of the DTLS port -------------------------

    /// `[0]`: the guard's settings, written by the daemon.
    #[btf_map]
    static GUARD_CONFIG: Array<GuardConfig, 1> = Array::new();

    /// Datagrams dropped per [`GuardDrop`] reason.
    #[btf_map]
    static GUARD_DROPS: PerCpuArray<u64, { GUARD_DROP_REASONS as usize }> = PerCpuArray::new();

    /// ClientHello token buckets by source address.
    #[btf_map]
    static HELLO_BUCKETS: LruHashMap<SessionKey, HelloBucket, { MAX_HELLO_SOURCES as usize }> =
        LruHashMap::new();

    /// Banned sources (prefixes), written by the daemon.
    #[btf_map]
    static BANNED: LpmTrie<SessionKey, Ban, { MAX_BANS as usize }> = LpmTrie::new();

    /// Whether `src` is banned now.
    #[inline(always)]
    fn banned(src: &SessionKey) -> bool {
        match BANNED.get(&Key::new(128, *src)) {
            None => false,
            // SAFETY: a helper without arguments.
            Some(b) => {
                b.until_ns == 0 || unsafe { aya_ebpf::helpers::bpf_ktime_get_ns() } < b.until_ns
            }
        }
    }

    #[inline(always)]
    fn xdp_byte(ctx: &XdpContext, off: usize) -> Result<u8, ()> {
        let p = ctx.data() + off;
        if p + 1 > ctx.data_end() {
            return Err(());
        }
        // SAFETY: `p` is inside the packet: checked against data_end just above, as the verifier requires.
        Ok(unsafe { *(p as *const u8) })
    }

    /// The largest DTLS record payload: 2^14 + 2048 bytes.
    const MAX_RECORD_PAYLOAD: usize = (1 << 14) + 2048;

    #[inline(always)]
    fn xdp_be16(ctx: &XdpContext, off: usize) -> Result<u16, ()> {
        Ok(u16::from_be_bytes([
            xdp_byte(ctx, off)?,
            xdp_byte(ctx, off + 1)?,
        ]))
    }

    /// Whether a ClientHello from `src` fits its token bucket.
    #[inline(always)]
    fn hello_allowed(src: &SessionKey, cfg: &GuardConfig) -> bool {
        const SCALE: u64 = 1_000_000_000;
        // SAFETY: a helper without arguments.
        let now = unsafe { aya_ebpf::helpers::bpf_ktime_get_ns() };
        let cap = u64::from(cfg.hello_burst) * SCALE;
        let b = match HELLO_BUCKETS.get_ptr_mut(src) {
            Some(b) => b,
            None => {
                let fresh = HelloBucket {
                    tokens: cap,
                    last_ns: now,
                };
                let _ = HELLO_BUCKETS.insert(src, &fresh, 0);
                match HELLO_BUCKETS.get_ptr_mut(src) {
                    Some(b) => b,
                    None => return true,
                }
            }
        };
        // SAFETY: `b` is this source's bucket, non-null; CPUs may race on
        // it, which lets a hello more or fewer through at worst.
        unsafe {
            // Capped so the product stays far below 2^64 (no 128-bit
            // multiply in BPF): a 10 s refill already fills any bucket.
            let elapsed = if now > (*b).last_ns {
                now - (*b).last_ns
            } else {
                0
            }
            .min(10_000_000_000);
            let refill = elapsed * u64::from(cfg.hello_rate.min(100_000));
            let tokens = ((*b).tokens + refill).min(cap);
            (*b).last_ns = now;
            if tokens < SCALE {
                (*b).tokens = tokens;
                return false;
            }
            (*b).tokens = tokens - SCALE;
        }
        true
    }

    /// Ok = pass, Err = drop for that reason. Only UDP to the DTLS port and
    /// TCP to the TLS port are looked at; everything else on the interface
    /// passes untouched. Every packet offset is a constant (IPv4 with
    /// options and IPv6 with extension headers pass to the daemon, which
    /// checks bans at accept too), which keeps the verifier's bounds
    /// tracking simple.
    #[inline(always)]
    fn try_dtls_guard(ctx: &XdpContext) -> Result<(), Option<GuardDrop>> {
        let Some(cfg) = GUARD_CONFIG.get(0) else {
            return Ok(());
        };
        if cfg.port == 0 && cfg.tls_port == 0 {
            return Ok(());
        }
        let mut src = [0u8; 16];
        match xdp_be16(ctx, 12).map_err(|_| None)? {
            0x0800 => {
                // Version 4, no options; not a later fragment.
                if xdp_byte(ctx, 14).map_err(|_| None)? != 0x45
                    || xdp_be16(ctx, 14 + 6).map_err(|_| None)? & 0x1fff != 0
                {
                    return Ok(());
                }
                let proto = xdp_byte(ctx, 14 + 9).map_err(|_| None)?;
                for i in 0..4 {
                    src[i] = xdp_byte(ctx, 14 + 12 + i).map_err(|_| None)?;
                }
                let key = Packet::key(FAMILY_V4, &src);
                match proto {
                    PROTO_UDP => check_dtls::<34>(ctx, cfg, &key),
                    PROTO_TCP => check_syn::<34>(ctx, cfg, &key),
                    _ => Ok(()),
                }
            }
            0x86dd => {
                let proto = xdp_byte(ctx, 14 + 6).map_err(|_| None)?;
                for i in 0..16 {
                    src[i] = xdp_byte(ctx, 14 + 8 + i).map_err(|_| None)?;
                }
                let key = Packet::key(FAMILY_V6, &src);
                match proto {
                    PROTO_UDP => check_dtls::<54>(ctx, cfg, &key),
                    PROTO_TCP => check_syn::<54>(ctx, cfg, &key),
                    _ => Ok(()),
                }
            }
            _ => Ok(()),
        }
    }

    /// A TCP segment whose header starts at `TCP`: a connection attempt
    /// to the TLS port from a banned source is dropped; segments of open
    /// connections pass.
    #[inline(always)]
    fn check_syn<const TCP: usize>(
        ctx: &XdpContext,
        cfg: &GuardConfig,
        src: &SessionKey,
    ) -> Result<(), Option<GuardDrop>> {
        const SYN: u8 = 0x02;
        const ACK: u8 = 0x10;
        if cfg.tls_port == 0 || u32::from(xdp_be16(ctx, TCP + 2).map_err(|_| None)?) != cfg.tls_port
        {
            return Ok(());
        }
        let flags = xdp_byte(ctx, TCP + 13).map_err(|_| None)?;
        if flags & (SYN | ACK) == SYN && banned(src) {
            return Err(Some(GuardDrop::Banned));
        }
        Ok(())
    }

    /// The checks on a UDP datagram whose header starts at `UDP`.
    #[inline(always)]
    fn check_dtls<const UDP: usize>(
        ctx: &XdpContext,
        cfg: &GuardConfig,
        src: &SessionKey,
    ) -> Result<(), Option<GuardDrop>> {
        if cfg.port == 0 || u32::from(xdp_be16(ctx, UDP + 2).map_err(|_| None)?) != cfg.port {
            return Ok(());
        }
        let truncated = |_| Some(GuardDrop::Truncated);
        let content = xdp_byte(ctx, UDP + 8).map_err(truncated)?;
        if !(20..=23).contains(&content) {
            return Err(Some(GuardDrop::BadContentType));
        }
        let version = xdp_be16(ctx, UDP + 9).map_err(truncated)?;
        if !matches!(version, 0xfeff | 0xfefd | 0x0100) {
            return Err(Some(GuardDrop::BadVersion));
        }
        let len = usize::from(xdp_be16(ctx, UDP + 8 + 11).map_err(truncated)?);
        // No record is longer (RFC 6347 via RFC 5246 §6.2.3). The check
        // also bounds `len` for the verifier: LLVM reads the field with a
        // byte swap, whose result kernels before 6.6 do not bound, and
        // Linux 6.1 refused the program ("math between pkt pointer and
        // register with unbounded min value").
        if len > MAX_RECORD_PAYLOAD {
            return Err(Some(GuardDrop::Truncated));
        }
        // The record must fit in the datagram.
        if ctx.data() + UDP + 8 + 13 + len > ctx.data_end() {
            return Err(Some(GuardDrop::Truncated));
        }
        if content == 22 && xdp_byte(ctx, UDP + 8 + 13).map_err(truncated)? == 1 {
            if banned(src) {
                return Err(Some(GuardDrop::Banned));
            }
            if !hello_allowed(src, cfg) {
                return Err(Some(GuardDrop::HelloRateLimited));
            }
        }
        Ok(())
    }

    /// XDP on the uplinks: only well-formed DTLS reaches the DTLS port,
    /// each source gets a limited rate of new handshakes, and banned
    /// sources open no new connections.
    #[xdp]
    pub fn dtls_guard(ctx: XdpContext) -> u32 {
        match try_dtls_guard(&ctx) {
            Ok(()) | Err(None) => xdp_action::XDP_PASS,
            Err(Some(reason)) => {
                if let Some(n) = GUARD_DROPS.get_ptr_mut(reason as u32) {
                    // SAFETY: a per-CPU slot the map returned, non-null: no other CPU writes it.
                    unsafe { *n += 1 };
                }
                xdp_action::XDP_DROP
            }
        }
    }

    #[panic_handler]
    fn panic(_info: &core::panic::PanicInfo) -> ! {
        loop {}
    }

    // SAFETY: the kernel reads the license from this section; nothing else uses the name.
    #[unsafe(link_section = "license")]
    #[unsafe(no_mangle)]
    static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
}

#[cfg(not(target_arch = "bpf"))]
fn main() {
    eprintln!("vpn-ebpf is a BPF object; it is built by vpn-daemon's build script");
}
