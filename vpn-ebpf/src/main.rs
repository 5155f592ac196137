//! TC programs on the tunnel device.
//!
//! The tunnel device is a layer-3 TUN device, so `skb->data` starts at the
//! IP header in both directions. Each hook is a few lines that turn the
//! result of `try_<name>` into a verdict; the parsing lives in helpers that
//! return `Result` so `?` works.
#![cfg_attr(target_arch = "bpf", no_std)]
#![cfg_attr(target_arch = "bpf", no_main)]

#[cfg(target_arch = "bpf")]
mod prog {
    use aya_ebpf::{
        bindings::{TC_ACT_OK, TC_ACT_SHOT},
        btf_maps::{HashMap, PerCpuArray, PerCpuHashMap},
        macros::{btf_map, classifier},
        programs::TcContext,
    };
    use vpn_common::{
        DROP_REASONS, DropReason, MAX_SESSIONS, SessionInfo, SessionKey, SessionStats,
    };

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

    enum Dir {
        /// From the client: key on the source address.
        FromClient,
        /// To the client: key on the destination address.
        ToClient,
    }

    #[inline(always)]
    fn count_drop(reason: DropReason) {
        if let Some(n) = DROPS.get_ptr_mut(reason as u32) {
            // Per-CPU slot: no other CPU writes it.
            unsafe { *n += 1 };
        }
    }

    /// Reads the client address of the packet: the source for packets from
    /// clients, the destination for packets to them.
    #[inline(always)]
    fn client_key(ctx: &TcContext, dir: &Dir) -> Result<SessionKey, ()> {
        let version = ctx.load::<u8>(0).map_err(|_| ())? >> 4;
        match version {
            4 => {
                let off = match dir {
                    Dir::FromClient => 12,
                    Dir::ToClient => 16,
                };
                let a = ctx.load::<[u8; 4]>(off).map_err(|_| ())?;
                Ok(SessionKey::v4(a))
            }
            6 => {
                let off = match dir {
                    Dir::FromClient => 8,
                    Dir::ToClient => 24,
                };
                let a = ctx.load::<[u8; 16]>(off).map_err(|_| ())?;
                Ok(SessionKey::v6(a))
            }
            _ => Err(()),
        }
    }

    #[inline(always)]
    fn account(ctx: &TcContext, dir: Dir) -> i32 {
        let key = match client_key(ctx, &dir) {
            Ok(k) => k,
            Err(()) => {
                count_drop(DropReason::Malformed);
                return TC_ACT_SHOT;
            }
        };
        if SESSIONS.get_ptr(&key).is_none() {
            count_drop(match dir {
                Dir::FromClient => DropReason::UnknownSource,
                Dir::ToClient => DropReason::UnknownDestination,
            });
            return TC_ACT_SHOT;
        }
        if let Some(s) = SESSION_STATS.get_ptr_mut(&key) {
            let len = u64::from(ctx.len());
            // Per-CPU value: plain adds are race-free.
            unsafe {
                match dir {
                    Dir::FromClient => {
                        (*s).rx_packets += 1;
                        (*s).rx_bytes += len;
                    }
                    Dir::ToClient => {
                        (*s).tx_packets += 1;
                        (*s).tx_bytes += len;
                    }
                }
            }
        }
        TC_ACT_OK
    }

    /// Packets from VPN clients (written to the TUN device by the daemon).
    #[classifier]
    pub fn tun_ingress(ctx: TcContext) -> i32 {
        account(&ctx, Dir::FromClient)
    }

    /// Packets routed to VPN clients (read from the TUN device by the daemon).
    #[classifier]
    pub fn tun_egress(ctx: TcContext) -> i32 {
        account(&ctx, Dir::ToClient)
    }

    #[panic_handler]
    fn panic(_info: &core::panic::PanicInfo) -> ! {
        loop {}
    }

    #[unsafe(link_section = "license")]
    #[unsafe(no_mangle)]
    static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
}

#[cfg(not(target_arch = "bpf"))]
fn main() {
    eprintln!("vpn-ebpf is a BPF object; it is built by vpn-daemon's build script");
}
