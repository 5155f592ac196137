//! Dropping the capabilities the daemon no longer needs once it serves.
//!
//! Start-up needs many: creating the TUN device, loading and attaching BPF
//! programs (CAP_BPF, CAP_PERFMON, CAP_NET_ADMIN), binding port 443
//! (CAP_NET_BIND_SERVICE), opening the uplink probes' raw sockets
//! (CAP_NET_RAW), raising rlimits (CAP_SYS_RESOURCE), and, run as plain
//! root, everything else too. Once set up, the broker (`broker/mod.rs`)
//! needs two: CAP_NET_ADMIN for routes, nft and the uplinks' netlink
//! work, and CAP_BPF for the `bpf()` calls that read and write the maps
//! (the kernel refuses every `bpf()` call without it while
//! `kernel.unprivileged_bpf_disabled` is set, Debian's default).
//! [`drop_all_but`] keeps those and drops the rest from the effective,
//! permitted, inheritable, ambient and bounding sets, so neither the
//! process nor anything it could exec gets them back. vpnd itself needs
//! none: [`become_user`] makes it nobody with nothing.
//!
//! Capabilities belong to threads, not processes: `capset` changes only
//! the calling thread's, and by the time the daemon serves, tokio's
//! workers, its blocking pool and the packet workers all exist. So the
//! drop is done the way glibc's `setuid` and libcap's psx do it: every
//! thread of the process is signalled and drops its own in the handler
//! (a few system calls, all async-signal-safe; user and group ids are per
//! thread in the kernel too), then `/proc/self/task/*/status` is read back
//! until every thread shows the kept set (and user). Threads created later
//! inherit them from whichever thread creates them.
//!
//! Then [`forbid_system_calls`] makes the system calls a serving vpnd
//! never makes fail, in every thread.
//!
//! A leaf: nothing here knows the rest of the crate.

use std::{
    fmt,
    sync::atomic::{AtomicU64, Ordering},
    time::{Duration, Instant},
};

/// A set of capabilities, bit `n` for capability number `n`.
#[derive(Clone, Copy, PartialEq, Eq, Default)]
pub struct CapSet(pub u64);

pub const CAP_SETGID: u32 = 6;
pub const CAP_SETUID: u32 = 7;
pub const CAP_NET_BIND_SERVICE: u32 = 10;
pub const CAP_NET_ADMIN: u32 = 12;
pub const CAP_NET_RAW: u32 = 13;
pub const CAP_SYS_ADMIN: u32 = 21;
pub const CAP_SYS_RESOURCE: u32 = 24;
pub const CAP_PERFMON: u32 = 38;
pub const CAP_BPF: u32 = 39;

/// Names as `capabilities(7)` spells them, by number.
const NAMES: [&str; 41] = [
    "cap_chown",
    "cap_dac_override",
    "cap_dac_read_search",
    "cap_fowner",
    "cap_fsetid",
    "cap_kill",
    "cap_setgid",
    "cap_setuid",
    "cap_setpcap",
    "cap_linux_immutable",
    "cap_net_bind_service",
    "cap_net_broadcast",
    "cap_net_admin",
    "cap_net_raw",
    "cap_ipc_lock",
    "cap_ipc_owner",
    "cap_sys_module",
    "cap_sys_rawio",
    "cap_sys_chroot",
    "cap_sys_ptrace",
    "cap_sys_pacct",
    "cap_sys_admin",
    "cap_sys_boot",
    "cap_sys_nice",
    "cap_sys_resource",
    "cap_sys_time",
    "cap_sys_tty_config",
    "cap_mknod",
    "cap_lease",
    "cap_audit_write",
    "cap_audit_control",
    "cap_setfcap",
    "cap_mac_override",
    "cap_mac_admin",
    "cap_syslog",
    "cap_wake_alarm",
    "cap_block_suspend",
    "cap_audit_read",
    "cap_perfmon",
    "cap_bpf",
    "cap_checkpoint_restore",
];

impl CapSet {
    pub const EMPTY: CapSet = CapSet(0);

    pub fn of(caps: &[u32]) -> CapSet {
        CapSet(caps.iter().fold(0, |m, &c| m | 1 << c))
    }

    pub fn contains(self, cap: u32) -> bool {
        self.0 & (1 << cap) != 0
    }

    pub fn intersect(self, other: CapSet) -> CapSet {
        CapSet(self.0 & other.0)
    }

    pub fn without(self, other: CapSet) -> CapSet {
        CapSet(self.0 & !other.0)
    }

    pub fn is_empty(self) -> bool {
        self.0 == 0
    }

    pub fn len(self) -> u32 {
        self.0.count_ones()
    }

    fn iter(self) -> impl Iterator<Item = u32> {
        (0..64).filter(move |&c| self.contains(c))
    }
}

impl fmt::Display for CapSet {
    /// `cap_net_admin,cap_bpf`, or `none`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.is_empty() {
            return f.write_str("none");
        }
        for (i, c) in self.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            match NAMES.get(c as usize) {
                Some(n) => f.write_str(n)?,
                None => write!(f, "cap_{c}")?,
            }
        }
        Ok(())
    }
}

impl fmt::Debug for CapSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// What the broker keeps once it serves (`broker/mod.rs`): CAP_NET_ADMIN
/// for the uplinks' netlink and nft work, and CAP_BPF where the kernel
/// has it (5.8 and later; before it, `bpf()` needed CAP_SYS_ADMIN) for
/// the maps. vpnd itself keeps nothing.
pub fn broker_needs() -> CapSet {
    if last_cap() >= CAP_BPF {
        CapSet::of(&[CAP_NET_ADMIN, CAP_BPF])
    } else {
        CapSet::of(&[CAP_NET_ADMIN, CAP_SYS_ADMIN])
    }
}

/// One thread's capability sets, as its `/proc/.../status` shows them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct ThreadCaps {
    pub inheritable: CapSet,
    pub permitted: CapSet,
    pub effective: CapSet,
    pub bounding: CapSet,
    pub ambient: CapSet,
}

impl ThreadCaps {
    /// Parses the `Cap*:` lines of a `/proc/PID/task/TID/status` file.
    pub fn parse(status: &str) -> Option<ThreadCaps> {
        let field = |name: &str| {
            let line = status.lines().find_map(|l| l.strip_prefix(name))?;
            u64::from_str_radix(line.trim(), 16).ok().map(CapSet)
        };
        Some(ThreadCaps {
            inheritable: field("CapInh:")?,
            permitted: field("CapPrm:")?,
            effective: field("CapEff:")?,
            bounding: field("CapBnd:")?,
            // Older kernels have no ambient set.
            ambient: field("CapAmb:").unwrap_or_default(),
        })
    }

    /// Whether this thread holds nothing beyond `keep` in any set.
    pub fn within(&self, keep: CapSet) -> bool {
        [
            self.inheritable,
            self.permitted,
            self.effective,
            self.bounding,
            self.ambient,
        ]
        .iter()
        .all(|s| s.without(keep).is_empty())
    }
}

/// What [`drop_all_but`] did.
#[derive(Debug)]
pub struct Dropped {
    /// Capabilities every thread still has.
    pub kept: CapSet,
    /// What the process held before and no longer does.
    pub dropped: CapSet,
    /// How many threads were signalled.
    pub threads: usize,
}

#[derive(Debug, thiserror::Error)]
pub enum DropError {
    #[error("reading {path}: {source}")]
    Proc {
        path: String,
        source: std::io::Error,
    },
    #[error("dropping this thread's capabilities failed: {0}")]
    Own(std::io::Error),
    #[error("installing the signal handler: {0}")]
    Handler(std::io::Error),
    #[error(
        "threads {threads:?} still hold capabilities beyond {keep} after {waited:?} \
         (a thread blocking signal {signal} would)"
    )]
    Stragglers {
        threads: Vec<String>,
        keep: CapSet,
        waited: Duration,
        signal: i32,
    },
}

/// The set the signal handler drops to; `u64::MAX` while nothing is asked.
static TARGET: AtomicU64 = AtomicU64::new(u64::MAX);

/// The user and group the handler switches to (`uid << 32 | gid`);
/// `u64::MAX` for none.
static BECOME: AtomicU64 = AtomicU64::new(u64::MAX);

/// Drops every capability but `keep` (those of it the process has) in
/// every thread of the process, waiting up to `wait` for them all.
pub fn drop_all_but(keep: CapSet, wait: Duration) -> Result<Dropped, DropError> {
    drop_to(keep, wait)
}

/// Every thread of the process becomes user `uid` and group `gid` (no
/// supplementary groups) and drops every capability, the bounding set
/// included: what vpnd does before it serves (`broker/mod.rs`). Each
/// thread switches itself, as for [`drop_all_but`]: the bounding set is
/// dropped first (that takes CAP_SETPCAP, gone with the switch), then the
/// groups and the user, which clears the rest.
pub fn become_user(uid: u32, gid: u32, wait: Duration) -> Result<Dropped, DropError> {
    BECOME.store(u64::from(uid) << 32 | u64::from(gid), Ordering::SeqCst);
    drop_to(CapSet::EMPTY, wait)
}

/// The user every thread must have become, if any.
fn target_user() -> Option<u32> {
    let b = BECOME.load(Ordering::SeqCst);
    (b != u64::MAX).then_some((b >> 32) as u32)
}

/// Whether a thread's status shows the user asked for (all four ids).
fn is_target_user(status: &str) -> bool {
    let Some(uid) = target_user() else {
        return true;
    };
    status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .is_some_and(|ids| ids.split_whitespace().all(|i| i.parse() == Ok(uid)))
}

fn drop_to(keep: CapSet, wait: Duration) -> Result<Dropped, DropError> {
    let own = read_status("/proc/thread-self/status")?;
    let keep = keep.intersect(own.permitted);
    let before = own.permitted.0 | own.bounding.0;
    if own.within(keep) && target_user().is_none() && all_within(keep)?.is_empty() {
        return Ok(Dropped {
            kept: keep,
            dropped: CapSet::EMPTY,
            threads: 0,
        });
    }
    TARGET.store(keep.0, Ordering::SeqCst);
    let signal = install_handler()?;
    apply(keep.0, last_cap()).map_err(DropError::Own)?;

    let pid = std::process::id() as libc::pid_t;
    let start = Instant::now();
    let mut signalled = std::collections::BTreeSet::new();
    loop {
        let left = all_within(keep)?;
        if left.is_empty() {
            break;
        }
        if start.elapsed() >= wait {
            return Err(DropError::Stragglers {
                threads: left
                    .iter()
                    .map(|t| format!("{t} ({})", thread_name(*t)))
                    .collect(),
                keep,
                waited: wait,
                signal,
            });
        }
        for &tid in &left {
            signalled.insert(tid);
            // SAFETY: tgkill takes plain integers; a thread that ended in
            // between makes it fail with ESRCH, which is fine.
            unsafe { libc::syscall(libc::SYS_tgkill, pid, tid, signal) };
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    Ok(Dropped {
        kept: keep,
        dropped: CapSet(before).without(keep),
        threads: signalled.len(),
    })
}

/// Drops the calling thread's capabilities to `keep` (all sets, the
/// bounding set too while CAP_SETPCAP is held): for a process of one
/// thread, such as the key signer.
pub fn drop_own(keep: CapSet) -> Result<(), std::io::Error> {
    apply(keep.0, last_cap())
}

/// System calls a serving vpnd never makes, and that an attacker who got
/// code running in it would want: debugging and reading other processes,
/// mounts and namespaces, kernel modules, kexec and reboot, the clock,
/// changing user, the kernel keyring, io_uring, userfaultfd, perf. After
/// [`forbid_system_calls`] they fail with EPERM in every thread (and in
/// what vpnd runs, `nft`), on top of the unit's own filter and for a vpnd
/// started without systemd.
const FORBIDDEN: &[libc::c_long] = &[
    libc::SYS_ptrace,
    libc::SYS_process_vm_readv,
    libc::SYS_process_vm_writev,
    libc::SYS_mount,
    libc::SYS_umount2,
    libc::SYS_pivot_root,
    libc::SYS_chroot,
    libc::SYS_unshare,
    libc::SYS_setns,
    libc::SYS_swapon,
    libc::SYS_swapoff,
    libc::SYS_reboot,
    libc::SYS_kexec_load,
    libc::SYS_kexec_file_load,
    libc::SYS_init_module,
    libc::SYS_finit_module,
    libc::SYS_delete_module,
    libc::SYS_acct,
    libc::SYS_settimeofday,
    libc::SYS_clock_settime,
    libc::SYS_clock_adjtime,
    libc::SYS_adjtimex,
    libc::SYS_setuid,
    libc::SYS_setgid,
    libc::SYS_setreuid,
    libc::SYS_setregid,
    libc::SYS_setresuid,
    libc::SYS_setresgid,
    libc::SYS_setgroups,
    libc::SYS_setfsuid,
    libc::SYS_setfsgid,
    libc::SYS_keyctl,
    libc::SYS_add_key,
    libc::SYS_request_key,
    libc::SYS_userfaultfd,
    libc::SYS_perf_event_open,
    libc::SYS_open_by_handle_at,
    libc::SYS_name_to_handle_at,
    libc::SYS_personality,
    libc::SYS_io_uring_setup,
    libc::SYS_io_uring_enter,
    libc::SYS_io_uring_register,
    libc::SYS_quotactl,
    libc::SYS_syslog,
    libc::SYS_vhangup,
];

/// Makes the [`FORBIDDEN`] system calls fail with EPERM in every thread
/// from now on (seccomp with TSYNC; it sets no_new_privs, which costs a
/// serving vpnd nothing: what it runs keeps the capabilities it has).
/// Returns how many.
pub fn forbid_system_calls() -> Result<usize, String> {
    use seccompiler::{SeccompAction, SeccompFilter, TargetArch};
    let arch = TargetArch::try_from(std::env::consts::ARCH)
        .map_err(|e| format!("seccomp on {}: {e:?}", std::env::consts::ARCH))?;
    let filter = SeccompFilter::new(
        FORBIDDEN.iter().map(|s| (*s, Vec::new())).collect(),
        SeccompAction::Allow,
        SeccompAction::Errno(libc::EPERM as u32),
        arch,
    )
    .map_err(|e| format!("the seccomp filter: {e}"))?;
    let prog: seccompiler::BpfProgram = filter
        .try_into()
        .map_err(|e| format!("the seccomp filter: {e:?}"))?;
    seccompiler::apply_filter_all_threads(&prog)
        .map_err(|e| format!("applying the seccomp filter: {e}"))?;
    Ok(FORBIDDEN.len())
}

/// The threads of this process holding more than `keep`, by id.
fn all_within(keep: CapSet) -> Result<Vec<libc::pid_t>, DropError> {
    let dir = "/proc/self/task";
    let entries = std::fs::read_dir(dir).map_err(|source| DropError::Proc {
        path: dir.into(),
        source,
    })?;
    let mut out = Vec::new();
    for e in entries.flatten() {
        let Some(tid) = e.file_name().to_str().and_then(|s| s.parse().ok()) else {
            continue;
        };
        // A thread that ended since the listing has nothing left to drop.
        let Ok(status) = std::fs::read_to_string(e.path().join("status")) else {
            continue;
        };
        if !ThreadCaps::parse(&status).is_some_and(|c| c.within(keep)) || !is_target_user(&status) {
            out.push(tid);
        }
    }
    Ok(out)
}

fn read_status(path: &str) -> Result<ThreadCaps, DropError> {
    let text = std::fs::read_to_string(path).map_err(|source| DropError::Proc {
        path: path.into(),
        source,
    })?;
    ThreadCaps::parse(&text).ok_or_else(|| DropError::Proc {
        path: path.into(),
        source: std::io::Error::new(std::io::ErrorKind::InvalidData, "no Cap* lines"),
    })
}

fn thread_name(tid: libc::pid_t) -> String {
    std::fs::read_to_string(format!("/proc/self/task/{tid}/comm"))
        .map(|s| s.trim().to_owned())
        .unwrap_or_default()
}

/// The highest capability number this kernel knows.
fn last_cap() -> u32 {
    std::fs::read_to_string("/proc/sys/kernel/cap_last_cap")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(CAP_BPF + 1)
}

/// The highest capability number, read once before any signal is sent so
/// the handler does no file I/O.
static LAST_CAP: AtomicU64 = AtomicU64::new(0);

/// Installs the handler (once; it stays: a late signal must never meet the
/// default action of a real-time signal, which ends the process).
fn install_handler() -> Result<i32, DropError> {
    LAST_CAP.store(u64::from(last_cap()), Ordering::SeqCst);
    let signal = libc::SIGRTMIN() + 4;
    // SAFETY: a zeroed sigaction is a valid start; the handler only makes
    // async-signal-safe system calls and touches atomics.
    unsafe {
        let mut sa: libc::sigaction = std::mem::zeroed();
        sa.sa_sigaction = on_signal as extern "C" fn(libc::c_int) as libc::sighandler_t;
        sa.sa_flags = libc::SA_RESTART;
        libc::sigemptyset(&mut sa.sa_mask);
        if libc::sigaction(signal, &sa, std::ptr::null_mut()) != 0 {
            return Err(DropError::Handler(std::io::Error::last_os_error()));
        }
    }
    Ok(signal)
}

extern "C" fn on_signal(_: libc::c_int) {
    // SAFETY: errno is thread-local; restoring it keeps the interrupted
    // code's view of it unchanged.
    let errno = unsafe { *libc::__errno_location() };
    let target = TARGET.load(Ordering::SeqCst);
    if target != u64::MAX {
        // A failure shows in the thread's status, which the caller reads.
        let _ = apply(target, LAST_CAP.load(Ordering::SeqCst) as u32);
    }
    // SAFETY: as above.
    unsafe { *libc::__errno_location() = errno };
}

const LINUX_CAPABILITY_VERSION_3: u32 = 0x2008_0522;

#[repr(C)]
struct CapHeader {
    version: u32,
    pid: libc::c_int,
}

#[repr(C)]
#[derive(Clone, Copy, Default)]
struct CapData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

/// Drops the calling thread's capabilities to `keep`: the bounding set
/// first (that needs CAP_SETPCAP, still held), then ambient, then
/// effective, permitted and inheritable in one `capset`. Only system
/// calls, no allocation: this runs in a signal handler.
fn apply(keep: u64, last_cap: u32) -> Result<(), std::io::Error> {
    for cap in 0..=last_cap.min(63) {
        if keep & (1 << cap) == 0 {
            // SAFETY: prctl with integer arguments. EINVAL (a capability
            // the kernel does not know) and EPERM (no CAP_SETPCAP: then the
            // bounding set was already bounded for us) leave it as it is.
            unsafe { libc::prctl(libc::PR_CAPBSET_DROP, cap as libc::c_ulong, 0, 0, 0) };
        }
    }
    // SAFETY: integer arguments; fails harmlessly on kernels before 4.3.
    unsafe {
        libc::prctl(
            libc::PR_CAP_AMBIENT,
            libc::PR_CAP_AMBIENT_CLEAR_ALL as libc::c_ulong,
            0,
            0,
            0,
        )
    };
    let switch = BECOME.load(Ordering::SeqCst);
    if switch != u64::MAX {
        let (uid, gid) = ((switch >> 32) as libc::uid_t, switch as libc::gid_t);
        // SAFETY: raw system calls with integer arguments, on this thread's
        // own credentials (glibc's wrappers would signal every thread, which
        // is not async-signal-safe here). Leaving uid 0 clears the
        // permitted and effective sets.
        unsafe {
            if libc::syscall(libc::SYS_getuid) as libc::uid_t != uid
                && (libc::syscall(libc::SYS_setgroups, 0, std::ptr::null::<libc::gid_t>()) != 0
                    || libc::syscall(libc::SYS_setresgid, gid, gid, gid) != 0
                    || libc::syscall(libc::SYS_setresuid, uid, uid, uid) != 0)
            {
                return Err(std::io::Error::last_os_error());
            }
        }
    }
    let mut hdr = CapHeader {
        version: LINUX_CAPABILITY_VERSION_3,
        pid: 0,
    };
    let mut now = [CapData::default(); 2];
    // SAFETY: header and a two-element data array, as capget(2) expects
    // for version 3.
    if unsafe { libc::syscall(libc::SYS_capget, &mut hdr, now.as_mut_ptr()) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    let mut data = [CapData::default(); 2];
    for (i, d) in data.iter_mut().enumerate() {
        let k = (keep >> (32 * i)) as u32 & now[i].permitted;
        *d = CapData {
            effective: k,
            permitted: k,
            inheritable: 0,
        };
    }
    // SAFETY: as above, for capset(2).
    if unsafe { libc::syscall(libc::SYS_capset, &mut hdr, data.as_ptr()) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const STATUS: &str = "Name:\tvpnd\nCapInh:\t0000000000000000\nCapPrm:\t000001ffffffffff\n\
        CapEff:\t000001ffffffffff\nCapBnd:\t000001ffffffffff\nCapAmb:\t0000000000000000\n";

    #[test]
    fn reads_a_threads_sets_from_proc() {
        let c = ThreadCaps::parse(STATUS).unwrap();
        assert_eq!(c.permitted, CapSet(0x1ff_ffff_ffff));
        assert_eq!(c.inheritable, CapSet::EMPTY);
        assert!(!c.within(broker_needs()));
        let kept = CapSet::of(&[CAP_NET_ADMIN, CAP_BPF]);
        let dropped = ThreadCaps {
            permitted: kept,
            effective: kept,
            bounding: kept,
            ..ThreadCaps::default()
        };
        assert!(dropped.within(kept));
        assert!(!dropped.within(CapSet::of(&[CAP_NET_ADMIN])));
    }

    #[test]
    fn names_capabilities_as_the_man_page_does() {
        assert_eq!(
            CapSet::of(&[CAP_NET_ADMIN, CAP_BPF]).to_string(),
            "cap_net_admin,cap_bpf"
        );
        assert_eq!(CapSet::EMPTY.to_string(), "none");
        assert_eq!(NAMES[CAP_PERFMON as usize], "cap_perfmon");
        assert_eq!(NAMES[CAP_SYS_RESOURCE as usize], "cap_sys_resource");
        assert_eq!(NAMES[CAP_NET_RAW as usize], "cap_net_raw");
        assert_eq!(NAMES[CAP_NET_BIND_SERVICE as usize], "cap_net_bind_service");
    }
}
