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
use aya::{
    Ebpf,
    maps::{HashMap, MapData, PerCpuArray, PerCpuHashMap, PerCpuValues},
    programs::{SchedClassifier, TcAttachType, tc},
};
use vpn_common::{DropReason, SessionInfo, SessionKey, SessionStats, map_names, prog_names};

/// The BPF object built from `vpn-ebpf` by `build.rs`.
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/vpn-ebpf"));

const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

/// The loaded programs and the maps the daemon writes.
pub struct Datapath {
    /// Keeps the programs (and their TCX links) alive.
    _ebpf: Ebpf,
    sessions: HashMap<MapData, SessionKey, SessionInfo>,
    stats: PerCpuHashMap<MapData, SessionKey, SessionStats>,
    drops: PerCpuArray<MapData, u64>,
    pin_dir: PathBuf,
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
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statfs(root.as_ptr(), &mut st) } == 0 && st.f_type == BPF_FS_MAGIC {
        return Ok(());
    }
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
    if unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &rlim) } != 0 {
        tracing::debug!("could not raise RLIMIT_MEMLOCK; relying on memcg accounting");
    }
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
        let mut ebpf = Ebpf::load(OBJECT).context("loading the BPF object")?;

        for name in [
            map_names::SESSIONS,
            map_names::SESSION_STATS,
            map_names::DROPS,
        ] {
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
            let p: &mut SchedClassifier = ebpf
                .program_mut(prog)
                .ok_or_else(|| anyhow!("program {prog} missing from the BPF object"))?
                .try_into()?;
            p.load().with_context(|| format!("loading {prog}"))?;
            p.attach(iface, dir)
                .with_context(|| format!("attaching {prog} to {iface} {dir:?}"))?;
        }

        let take = |ebpf: &mut Ebpf, name: &str| {
            ebpf.take_map(name)
                .ok_or_else(|| anyhow!("map {name} missing from the BPF object"))
        };
        let sessions = HashMap::try_from(take(&mut ebpf, map_names::SESSIONS)?)?;
        let stats = PerCpuHashMap::try_from(take(&mut ebpf, map_names::SESSION_STATS)?)?;
        let drops = PerCpuArray::try_from(take(&mut ebpf, map_names::DROPS)?)?;
        Ok(Datapath {
            _ebpf: ebpf,
            sessions,
            stats,
            drops,
            pin_dir: pin_dir.to_owned(),
        })
    }

    /// Lets packets from and to `ip` through, counted for this session.
    pub fn add_session(&mut self, ip: IpAddr, info: SessionInfo) -> anyhow::Result<()> {
        let key = key_for(ip);
        let ncpus = aya::util::nr_cpus().map_err(|(_, e)| e)?;
        let zero = PerCpuValues::try_from(vec![SessionStats::default(); ncpus])?;
        self.stats
            .insert(key, zero, 0)
            .context("creating session counters")?;
        self.sessions
            .insert(key, info, 0)
            .context("inserting session")?;
        Ok(())
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

    pub fn pin_dir(&self) -> &Path {
        &self.pin_dir
    }

    /// Removes the pins (clean shutdown); the maps go away with the daemon.
    pub fn unpin(&self) {
        for name in [
            map_names::SESSIONS,
            map_names::SESSION_STATS,
            map_names::DROPS,
        ] {
            let _ = std::fs::remove_file(self.pin_dir.join(pin_name(name)));
        }
        let _ = std::fs::remove_dir(&self.pin_dir);
    }
}
