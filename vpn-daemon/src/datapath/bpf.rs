//! Loading the TC programs onto the tunnel device, pinning their maps, and
//! the per-session map operations.
//!
//! Maps are pinned under the configured directory (default
//! `/sys/fs/bpf/vpn/`) with lower-case names (`sessions`, `session_stats`,
//! `drops`), so `bpftool map dump pinned /sys/fs/bpf/vpn/sessions` shows the
//! entries with field names from the object's BTF. At start any pins left by
//! a crashed run are removed before the fresh maps are pinned, so no stale
//! session survives a restart.

use std::{
    net::IpAddr,
    path::{Path, PathBuf},
};

use anyhow::{Context as _, anyhow};
#[cfg(feature = "testing")]
use aya::programs::{ProgramError, TestRun, TestRunOptions};
use aya::{
    Ebpf, EbpfLoader,
    maps::{
        Array, HashMap, LpmTrie, MapData, PerCpuArray, PerCpuHashMap, PerCpuValues, lpm_trie::Key,
    },
    programs::{SchedClassifier, TcAttachType, Xdp, XdpMode, tc},
};
use vpn_common::{
    Ban, ClassKey, DropReason, ExemptKey, GuardConfig, GuardDrop, Interval, IntervalRange,
    PolicyInfo, PortsKey, RateState, SessionInfo, SessionKey, SessionStats, SplitKey,
    guard_map_names, map_names, prog_names,
};

use crate::policy::Compiled;

/// The BPF object built from `vpn-ebpf` by `build.rs`.
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/vpn-ebpf"));

const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

/// The data path as the sessions' services share it: each takes the lock
/// for one change or read (lock order in `session/manager.rs`). In `vpnd`
/// it is the broker's (`RemoteDatapath` of the `broker` module).
pub type SharedDatapath = std::sync::Arc<parking_lot::Mutex<Box<dyn super::DatapathOps>>>;

/// The data path in the process that loaded it (the broker's uplinks).
pub type LocalDatapath = std::sync::Arc<parking_lot::Mutex<Datapath>>;

/// A map write the kernel refused while the gateway runs (a full map, no
/// memory): what was being written, and the kernel's answer.
#[derive(Debug, thiserror::Error)]
pub enum MapWriteError {
    #[error("{what}: {cause}")]
    Map {
        what: String,
        cause: Box<aya::maps::MapError>,
    },
    #[error("per-CPU values: {0}")]
    PerCpu(std::io::Error),
    /// The broker refused the write or could not be asked.
    #[error("{0}")]
    Broker(String),
}

/// Names a refused write.
fn writing(what: impl Into<String>) -> impl FnOnce(aya::maps::MapError) -> MapWriteError {
    move |cause| MapWriteError::Map {
        what: what.into(),
        cause: Box::new(cause),
    }
}

/// Every address's counters at one moment ([`Datapath::all_session_stats`]).
#[derive(Default)]
pub struct StatsSnapshot(std::collections::HashMap<SessionKey, SessionStats>);

impl StatsSnapshot {
    /// The snapshot's entries (to send it to another process).
    pub fn entries(&self) -> Vec<(SessionKey, SessionStats)> {
        self.0.iter().map(|(k, v)| (*k, *v)).collect()
    }

    pub fn from_entries(entries: Vec<(SessionKey, SessionStats)>) -> Self {
        StatsSnapshot(entries.into_iter().collect())
    }

    /// The counters of `addrs` (a session's addresses), summed.
    pub fn of(&self, addrs: impl IntoIterator<Item = IpAddr>) -> SessionStats {
        let mut t = SessionStats::default();
        for a in addrs {
            if let Some(s) = self.0.get(&key_for(a)) {
                t.add(s);
            }
        }
        t
    }
}

/// `BPF_MAP_LOOKUP_BATCH` (linux/bpf.h), and its part of `union bpf_attr`.
const BPF_MAP_LOOKUP_BATCH: libc::c_long = 24;

#[repr(C)]
struct BatchAttr {
    in_batch: u64,
    out_batch: u64,
    keys: u64,
    values: u64,
    count: u32,
    map_fd: u32,
    elem_flags: u64,
    flags: u64,
}

/// Zeroed per-CPU values.
fn per_cpu_zero<T: aya::Pod + Default + Clone>() -> Result<PerCpuValues<T>, MapWriteError> {
    let ncpus = aya::util::nr_cpus().map_err(|(_, e)| MapWriteError::PerCpu(e))?;
    PerCpuValues::try_from(vec![T::default(); ncpus]).map_err(MapWriteError::PerCpu)
}

/// The loaded programs and the maps the daemon writes.
pub struct Datapath {
    /// Keeps the programs (and their TCX links) alive.
    ebpf: Ebpf,
    sessions: HashMap<MapData, SessionKey, SessionInfo>,
    stats: PerCpuHashMap<MapData, SessionKey, SessionStats>,
    drops: PerCpuArray<MapData, u64>,
    policies: HashMap<MapData, u32, PolicyInfo>,
    class: HashMap<MapData, ClassKey, u32>,
    ports: HashMap<MapData, PortsKey, IntervalRange>,
    intervals: Array<MapData, Interval>,
    split: LpmTrie<MapData, SplitKey, u32>,
    hits: PerCpuArray<MapData, u64>,
    rate: HashMap<MapData, u64, RateState>,
    guard_config: Array<MapData, GuardConfig>,
    guard_drops: PerCpuArray<MapData, u64>,
    banned: LpmTrie<MapData, SessionKey, Ban>,
    uplink_active: Array<MapData, u32>,
    web_proxy_up: Array<MapData, u32>,
    exempt: LpmTrie<MapData, ExemptKey, u32>,
    /// What `set_exempt` installed, to replace it.
    exempt_installed: Vec<(u32, ExemptKey)>,
    pin_dir: Option<PathBuf>,
}

/// `CLOCK_MONOTONIC` in nanoseconds: the clock of `bpf_ktime_get_ns`.
fn monotonic_ns() -> u64 {
    let mut t = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `t` is a valid timespec to write; CLOCK_MONOTONIC always exists.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut t) };
    (t.tv_sec as u64)
        .saturating_mul(1_000_000_000)
        .saturating_add(t.tv_nsec as u64)
}

/// The `banned` key for a prefix: the address IPv4-mapped, the length
/// in bits of that 128-bit form.
fn ban_key(net: ipnet::IpNet) -> Key<SessionKey> {
    let plen = match net {
        ipnet::IpNet::V4(n) => 96 + u32::from(n.prefix_len()),
        ipnet::IpNet::V6(n) => u32::from(n.prefix_len()),
    };
    Key::new(plen, key_for(net.network()))
}

/// The key for a client address.
pub fn key_for(ip: IpAddr) -> SessionKey {
    match ip {
        IpAddr::V4(a) => SessionKey::v4(a.octets()),
        IpAddr::V6(a) => SessionKey::v6(a.octets()),
    }
}

/// Mounts bpffs on /sys/fs/bpf if nothing is mounted there yet.
pub fn ensure_bpffs() -> anyhow::Result<()> {
    let root = c"/sys/fs/bpf";
    // SAFETY: all-zero is a valid `struct statfs` (integers only).
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: a C string path and a struct we own for the result.
    if unsafe { libc::statfs(root.as_ptr(), &mut st) } == 0 && st.f_type == BPF_FS_MAGIC {
        return Ok(());
    }
    // SAFETY: C string arguments and no data; mount changes nothing of
    // this process's memory.
    let r = unsafe {
        libc::mount(
            c"bpf".as_ptr(),
            root.as_ptr(),
            c"bpf".as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    if r != 0 {
        return Err(std::io::Error::last_os_error()).context("mounting bpffs on /sys/fs/bpf");
    }
    Ok(())
}

fn raise_memlock() {
    let rlim = libc::rlimit {
        rlim_cur: libc::RLIM_INFINITY,
        rlim_max: libc::RLIM_INFINITY,
    };
    // SAFETY: a valid rlimit for the call to read.
    if unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &rlim) } != 0 {
        tracing::debug!("could not raise RLIMIT_MEMLOCK; relying on memcg accounting");
    }
}

/// Loads the object with `L2_LEN` set.
fn open(l2_len: u32) -> anyhow::Result<Ebpf> {
    EbpfLoader::new()
        .override_global("L2_LEN", &l2_len, true)
        .load(OBJECT)
        .context("loading the BPF object")
}

/// Loads (verifies) one classifier program.
fn classifier<'a>(ebpf: &'a mut Ebpf, name: &str) -> anyhow::Result<&'a mut SchedClassifier> {
    let p: &mut SchedClassifier = ebpf
        .program_mut(name)
        .ok_or_else(|| anyhow!("program {name} missing from the BPF object"))?
        .try_into()?;
    p.load().with_context(|| format!("loading {name}"))?;
    Ok(p)
}

/// Loads (verifies) the XDP guard program.
fn xdp_program(ebpf: &mut Ebpf) -> anyhow::Result<()> {
    let p: &mut Xdp = ebpf
        .program_mut(prog_names::DTLS_GUARD)
        .ok_or_else(|| {
            anyhow!(
                "program {} missing from the BPF object",
                prog_names::DTLS_GUARD
            )
        })?
        .try_into()?;
    p.load().context("loading the XDP guard")?;
    Ok(())
}

/// Lower-case pin file name for a map symbol.
fn pin_name(map: &str) -> String {
    map.to_ascii_lowercase()
}

impl Datapath {
    /// Loads the programs, pins the maps under `pin_dir` (replacing stale
    /// pins) and attaches ingress and egress classifiers to `iface`.
    pub fn load(iface: &str, pin_dir: &Path) -> anyhow::Result<Self> {
        ensure_bpffs()?;
        raise_memlock();
        std::fs::create_dir_all(pin_dir)
            .with_context(|| format!("creating pin directory {}", pin_dir.display()))?;
        let mut ebpf = open(0)?;
        for name in map_names::ALL {
            let path = pin_dir.join(pin_name(name));
            match std::fs::remove_file(&path) {
                Ok(()) => {
                    tracing::info!(pin = %path.display(), "removed a stale map pin from an earlier run")
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => {
                    return Err(e)
                        .with_context(|| format!("removing stale pin {}", path.display()));
                }
            }
            ebpf.map(name)
                .ok_or_else(|| anyhow!("map {name} missing from the BPF object"))?
                .pin(&path)
                .with_context(|| format!("pinning {name} at {}", path.display()))?;
        }

        if let Err(e) = tc::qdisc_add_clsact(iface) {
            // Already present is fine; with TCX the qdisc is not needed at all.
            tracing::debug!("clsact on {iface}: {e}");
        }
        for (prog, dir) in [
            (prog_names::TUN_INGRESS, TcAttachType::Ingress),
            (prog_names::TUN_EGRESS, TcAttachType::Egress),
        ] {
            classifier(&mut ebpf, prog)?
                .attach(iface, dir)
                .with_context(|| format!("attaching {prog} to {iface} {dir:?}"))?;
        }
        xdp_program(&mut ebpf)?;
        Self::from_ebpf(ebpf, Some(pin_dir.to_owned()))
    }

    /// Loads the programs without attaching or pinning them, with the IP
    /// header after a 14-byte Ethernet header, as `BPF_PROG_TEST_RUN` hands
    /// packets to TC programs. For tests and benchmarks.
    #[cfg(feature = "testing")]
    pub fn load_for_test_run() -> anyhow::Result<Self> {
        ensure_bpffs()?;
        raise_memlock();
        let mut ebpf = open(14)?;
        for prog in [prog_names::TUN_INGRESS, prog_names::TUN_EGRESS] {
            classifier(&mut ebpf, prog)?;
        }
        xdp_program(&mut ebpf)?;
        Self::from_ebpf(ebpf, None)
    }

    /// Attaches the client-side (ingress) program of an object loaded by
    /// [`Datapath::load_for_test_run`] to an Ethernet device's TC ingress in
    /// the calling thread's namespace: the forwarding benchmark runs the
    /// classifier on a veth that way.
    #[cfg(feature = "testing")]
    pub fn attach_ingress_for_bench(&mut self, iface: &str) -> anyhow::Result<()> {
        let _ = tc::qdisc_add_clsact(iface);
        let p: &mut SchedClassifier = self
            .ebpf
            .program_mut(prog_names::TUN_INGRESS)
            .ok_or_else(|| anyhow!("program missing"))?
            .try_into()?;
        p.attach(iface, TcAttachType::Ingress)
            .with_context(|| format!("attaching to {iface}"))?;
        Ok(())
    }

    fn from_ebpf(mut ebpf: Ebpf, pin_dir: Option<PathBuf>) -> anyhow::Result<Self> {
        fn take(ebpf: &mut Ebpf, name: &str) -> anyhow::Result<aya::maps::Map> {
            ebpf.take_map(name)
                .ok_or_else(|| anyhow!("map {name} missing from the BPF object"))
        }
        Ok(Datapath {
            sessions: HashMap::try_from(take(&mut ebpf, map_names::SESSIONS)?)?,
            stats: PerCpuHashMap::try_from(take(&mut ebpf, map_names::SESSION_STATS)?)?,
            drops: PerCpuArray::try_from(take(&mut ebpf, map_names::DROPS)?)?,
            policies: HashMap::try_from(take(&mut ebpf, map_names::POLICIES)?)?,
            class: HashMap::try_from(take(&mut ebpf, map_names::POLICY_CLASS)?)?,
            ports: HashMap::try_from(take(&mut ebpf, map_names::POLICY_PORTS)?)?,
            intervals: Array::try_from(take(&mut ebpf, map_names::POLICY_INTERVALS)?)?,
            split: LpmTrie::try_from(take(&mut ebpf, map_names::SPLIT_ALLOW)?)?,
            hits: PerCpuArray::try_from(take(&mut ebpf, map_names::RULE_HITS)?)?,
            rate: HashMap::try_from(take(&mut ebpf, map_names::RATE_STATE)?)?,
            guard_config: Array::try_from(take(&mut ebpf, guard_map_names::GUARD_CONFIG)?)?,
            guard_drops: PerCpuArray::try_from(take(&mut ebpf, guard_map_names::GUARD_DROPS)?)?,
            banned: LpmTrie::try_from(take(&mut ebpf, guard_map_names::BANNED)?)?,
            uplink_active: Array::try_from(take(&mut ebpf, map_names::UPLINK_ACTIVE)?)?,
            web_proxy_up: Array::try_from(take(&mut ebpf, map_names::WEB_PROXY_UP)?)?,
            exempt: LpmTrie::try_from(take(&mut ebpf, map_names::NAT_EXEMPT)?)?,
            exempt_installed: Vec::new(),
            ebpf,
            pin_dir,
        })
    }

    /// Runs a program once over `frame` (Ethernet + IP, see
    /// [`Datapath::load_for_test_run`]); returns its TC verdict and the
    /// kernel's time per run over `repeat` runs.
    #[cfg(feature = "testing")]
    pub fn test_run(
        &self,
        ingress: bool,
        frame: &[u8],
        repeat: u32,
    ) -> Result<(u32, std::time::Duration), ProgramError> {
        let name = if ingress {
            prog_names::TUN_INGRESS
        } else {
            prog_names::TUN_EGRESS
        };
        let p: &SchedClassifier = self
            .ebpf
            .program(name)
            .expect("program exists")
            .try_into()
            .expect("a classifier");
        let mut opts = TestRunOptions::new();
        opts.data_in = Some(frame);
        opts.repeat = repeat.max(1);
        let r = p.test_run(opts)?;
        Ok((r.return_value, r.duration))
    }

    /// Lets packets from and to `ip` through, counted for this session.
    pub fn add_session(&mut self, ip: IpAddr, info: SessionInfo) -> Result<(), MapWriteError> {
        self.add_session_counting_from(ip, info, SessionStats::default())
    }

    /// [`Self::add_session`] with counters that start at `from` (a
    /// session restored after a restart).
    pub fn add_session_counting_from(
        &mut self,
        ip: IpAddr,
        info: SessionInfo,
        from: SessionStats,
    ) -> Result<(), MapWriteError> {
        let key = key_for(ip);
        let mut counters = per_cpu_zero::<SessionStats>()?.to_vec();
        counters[0] = from;
        let counters = PerCpuValues::try_from(counters).map_err(MapWriteError::PerCpu)?;
        self.stats
            .insert(key, counters, 0)
            .map_err(writing(format!("creating the counters of session {ip}")))?;
        self.sessions
            .insert(key, info, 0)
            .map_err(writing(format!("inserting session {ip}")))
    }

    /// Removes a session's entries; its packets are dropped from now on.
    /// Returns its final counters.
    pub fn remove_session(&mut self, ip: IpAddr) -> SessionStats {
        let key = key_for(ip);
        let _ = self.sessions.remove(&key);
        let stats = self.session_stats(ip);
        let _ = self.stats.remove(&key);
        stats
    }

    /// A session's counters summed over CPUs (zero if unknown).
    pub fn session_stats(&self, ip: IpAddr) -> SessionStats {
        let mut total = SessionStats::default();
        if let Ok(per_cpu) = self.stats.get(&key_for(ip), 0) {
            for s in per_cpu.iter() {
                total.add(s);
            }
        }
        total
    }

    /// Every address's counters, summed over CPUs: the whole map in a few
    /// `BPF_MAP_LOOKUP_BATCH` calls (1,024 entries each) where
    /// [`Datapath::session_stats`] makes one call per address, 20,000 for
    /// `vpnctl sessions` at 10,000 sessions. A kernel without batches
    /// (before 5.6) is walked key by key.
    pub fn all_session_stats(&self) -> StatsSnapshot {
        let all = self.batch_session_stats().unwrap_or_else(|| {
            self.stats
                .iter()
                .filter_map(Result::ok)
                .map(|(k, per_cpu)| {
                    let mut total = SessionStats::default();
                    for s in per_cpu.iter() {
                        total.add(s);
                    }
                    (k, total)
                })
                .collect()
        });
        StatsSnapshot(all)
    }

    /// The batch read of [`Datapath::all_session_stats`]; `None` where the
    /// kernel has no batch operations.
    pub fn batch_session_stats(
        &self,
    ) -> Option<std::collections::HashMap<SessionKey, SessionStats>> {
        use aya::maps::IterableMap as _;
        use std::os::fd::{AsFd as _, AsRawFd as _};
        const BATCH: usize = 1024;
        let ncpus = aya::util::nr_cpus().ok()?;
        // Per-CPU values come rounded up to 8 bytes per CPU.
        const _: () = assert!(std::mem::size_of::<SessionStats>().is_multiple_of(8));
        let fd = self.stats.map().fd().as_fd().as_raw_fd();
        let mut keys = vec![SessionKey::default(); BATCH];
        let mut values = vec![SessionStats::default(); BATCH * ncpus];
        let mut out = std::collections::HashMap::new();
        // The batch token of a hash map is a bucket index.
        let (mut token_in, mut token_out) = (0u32, 0u32);
        let mut first = true;
        loop {
            let mut attr = BatchAttr {
                in_batch: if first {
                    0
                } else {
                    &token_in as *const u32 as u64
                },
                out_batch: &mut token_out as *mut u32 as u64,
                keys: keys.as_mut_ptr() as u64,
                values: values.as_mut_ptr() as u64,
                count: BATCH as u32,
                map_fd: fd as u32,
                elem_flags: 0,
                flags: 0,
            };
            // SAFETY: the buffers hold `count` keys and `count` per-CPU
            // values of the map's sizes, the tokens are u32 as the hash
            // map's batches use, and all outlive the call.
            let r = unsafe {
                libc::syscall(
                    libc::SYS_bpf,
                    BPF_MAP_LOOKUP_BATCH,
                    &mut attr as *mut BatchAttr,
                    std::mem::size_of::<BatchAttr>(),
                )
            };
            let done = r != 0;
            if done && std::io::Error::last_os_error().raw_os_error() != Some(libc::ENOENT) {
                return None;
            }
            let n = (attr.count as usize).min(BATCH);
            for (i, k) in keys[..n].iter().enumerate() {
                let mut total = SessionStats::default();
                for v in &values[i * ncpus..(i + 1) * ncpus] {
                    total.add(v);
                }
                out.insert(*k, total);
            }
            if done {
                return Some(out);
            }
            token_in = token_out;
            first = false;
        }
    }

    /// Dropped packets per reason, summed over CPUs.
    pub fn drops(&self) -> Vec<(DropReason, u64)> {
        DropReason::ALL
            .iter()
            .map(|&r| {
                let n = self
                    .drops
                    .get(&(r as u32), 0)
                    .map(|v| v.iter().sum())
                    .unwrap_or(0);
                (r, n)
            })
            .collect()
    }

    /// Installs a compiled policy under `id`, its intervals from slot
    /// `first_interval` of `policy_intervals`: every entry first, the
    /// `policies` entry last, so a session pointed at `id` afterwards never
    /// sees part of it.
    pub fn install_policy(
        &mut self,
        id: u32,
        info: PolicyInfo,
        c: &Compiled,
        first_interval: u32,
    ) -> Result<(), MapWriteError> {
        let result = (|| -> Result<(), aya::maps::MapError> {
            let mut next = first_interval;
            for (k, ivs) in &c.ports {
                let start = next;
                for iv in ivs {
                    self.intervals.set(next, *iv, 0)?;
                    next += 1;
                }
                self.ports.insert(
                    k,
                    IntervalRange {
                        start,
                        count: ivs.len() as u32,
                    },
                    0,
                )?;
            }
            for (k, class) in &c.classes {
                self.class.insert(k, class, 0)?;
            }
            for (plen, k) in &c.split_entries {
                self.split.insert(&Key::new(*plen, *k), 1, 0)?;
            }
            self.policies.insert(id, c.info(info), 0)?;
            Ok(())
        })();
        if result.is_err() {
            self.remove_policy(id, c);
        }
        result.map_err(writing(format!(
            "installing policy id {id} ({} map entries)",
            c.entries()
        )))
    }

    /// Removes a policy version no session points at any more (its
    /// interval slots are simply reused later).
    pub fn remove_policy(&mut self, id: u32, c: &Compiled) {
        let _ = self.policies.remove(&id);
        for (k, _) in &c.classes {
            let _ = self.class.remove(k);
        }
        for (k, _) in &c.ports {
            let _ = self.ports.remove(k);
        }
        for (plen, k) in &c.split_entries {
            let _ = self.split.remove(&Key::new(*plen, *k));
        }
    }

    /// Points an installed session at another policy: one map update, so
    /// the switch is atomic for every packet.
    pub fn set_session(&mut self, ip: IpAddr, info: SessionInfo) -> Result<(), MapWriteError> {
        self.sessions
            .insert(key_for(ip), info, 0)
            .map_err(writing(format!("updating session {ip}")))
    }

    /// Sets the uplink client packets are marked for (1-based; 0 = none,
    /// packets unmarked). One map write: the switch is atomic.
    pub fn set_active_uplink(&mut self, number: u32) -> Result<(), MapWriteError> {
        self.uplink_active
            .set(0, number, 0)
            .map_err(writing("setting the active uplink"))
    }

    /// Tells the data path which uplinks are healthy (bit n-1 = uplink n),
    /// for policies pinned to an uplink.
    pub fn set_healthy_uplinks(&mut self, mask: u32) -> Result<(), MapWriteError> {
        self.uplink_active
            .set(1, mask, 0)
            .map_err(writing("setting healthy uplinks"))
    }

    /// Tells the data path which web proxies are healthy (bit n-1 = proxy
    /// n): policies redirect web traffic only to a healthy one.
    pub fn set_healthy_web_proxies(&mut self, mask: u32) -> Result<(), MapWriteError> {
        self.web_proxy_up
            .set(0, mask, 0)
            .map_err(writing("setting healthy web proxies"))
    }

    /// Replaces the NAT-exemption prefixes: `(uplink number, prefix)`.
    pub fn set_exempt(&mut self, entries: &[(u32, ipnet::IpNet)]) -> Result<(), MapWriteError> {
        for (plen, k) in std::mem::take(&mut self.exempt_installed) {
            let _ = self.exempt.remove(&Key::new(plen, k));
        }
        for (uplink, net) in entries {
            let (family, addr, bits) = match net {
                ipnet::IpNet::V4(n) => {
                    let mut a = [0u8; 16];
                    a[..4].copy_from_slice(&n.network().octets());
                    (vpn_common::FAMILY_V4, a, n.prefix_len())
                }
                ipnet::IpNet::V6(n) => {
                    (vpn_common::FAMILY_V6, n.network().octets(), n.prefix_len())
                }
            };
            let k = ExemptKey {
                uplink: *uplink,
                family,
                addr,
            };
            let plen = vpn_common::EXEMPT_KEY_FIXED_BITS + u32::from(bits);
            self.exempt
                .insert(&Key::new(plen, k), 1, 0)
                .map_err(writing(format!("adding NAT exemption {net}")))?;
            self.exempt_installed.push((plen, k));
        }
        Ok(())
    }

    /// Sets the XDP guard's port and ClientHello limits (port 0 = off).
    pub fn set_guard(&mut self, cfg: GuardConfig) -> Result<(), MapWriteError> {
        self.guard_config
            .set(0, cfg, 0)
            .map_err(writing("setting the XDP guard"))
    }

    /// Bans `net` in the XDP guard for `time` from now (None: until
    /// [`Self::unban`]): its new connections are dropped. The guard ends
    /// the ban itself when the time is up; the entry stays until removed.
    pub fn ban(
        &mut self,
        net: ipnet::IpNet,
        time: Option<std::time::Duration>,
    ) -> Result<(), MapWriteError> {
        let until_ns = time.map_or(0, |t| {
            monotonic_ns()
                .saturating_add(u64::try_from(t.as_nanos()).unwrap_or(u64::MAX))
                .max(1)
        });
        self.banned
            .insert(&ban_key(net), Ban { until_ns }, 0)
            .map_err(writing(format!("banning {net}")))
    }

    /// Lifts the ban on `net` (a ban that is not there is not an error).
    pub fn unban(&mut self, net: ipnet::IpNet) {
        let _ = self.banned.remove(&ban_key(net));
    }

    /// Attaches the XDP guard to an uplink (in the calling thread's netns).
    pub fn attach_guard(&mut self, iface: &str) -> anyhow::Result<()> {
        let p: &mut Xdp = self
            .ebpf
            .program_mut(prog_names::DTLS_GUARD)
            .ok_or_else(|| anyhow!("XDP guard missing"))?
            .try_into()?;
        p.attach(iface, XdpMode::default())
            .with_context(|| format!("attaching the XDP guard to {iface} (dtls.xdp_interfaces)"))?;
        Ok(())
    }

    /// Datagrams the XDP guard dropped, per reason.
    pub fn guard_drops(&self) -> Vec<(GuardDrop, u64)> {
        GuardDrop::ALL
            .iter()
            .map(|&r| {
                (
                    r,
                    self.guard_drops
                        .get(&(r as u32), 0)
                        .map(|v| v.iter().sum())
                        .unwrap_or(0),
                )
            })
            .collect()
    }

    /// Runs the XDP guard once over an Ethernet frame; returns its action.
    #[cfg(feature = "testing")]
    pub fn test_run_xdp(&self, frame: &[u8]) -> Result<u32, ProgramError> {
        let p: &Xdp = self
            .ebpf
            .program(prog_names::DTLS_GUARD)
            .expect("program exists")
            .try_into()
            .expect("an XDP program");
        let mut opts = TestRunOptions::new();
        opts.data_in = Some(frame);
        Ok(p.test_run(opts)?.return_value)
    }

    /// Forgets a session's bandwidth state (at its end).
    pub fn forget_rate_state(&mut self, session_id: u64) {
        let _ = self.rate.remove(&session_id);
    }

    /// Packets that matched a rule slot, summed over CPUs.
    pub fn rule_hits(&self, slot: u32) -> u64 {
        self.hits.get(&slot, 0).map(|v| v.iter().sum()).unwrap_or(0)
    }

    /// Zeroes a range of rule slots before a new policy version uses them.
    pub fn reset_hits(&mut self, slots: std::ops::Range<u32>) -> Result<(), MapWriteError> {
        for s in slots {
            self.hits
                .set(s, per_cpu_zero::<u64>()?, 0)
                .map_err(writing(format!("zeroing rule counter {s}")))?;
        }
        Ok(())
    }

    /// Removes the pins (clean shutdown); the maps go away with the daemon.
    pub fn unpin(&self) {
        let Some(dir) = &self.pin_dir else { return };
        for name in map_names::ALL {
            let _ = std::fs::remove_file(dir.join(pin_name(name)));
        }
        let _ = std::fs::remove_dir(dir);
    }
}
