//! The process's own resources at their limits: descriptors and memory.
//!
//! - [`SpareDescriptor`]: at the descriptor limit `accept` fails with
//!   EMFILE and the connection stays in the kernel's backlog, where the
//!   client waits for a timeout without learning why, and `vpnctl` cannot
//!   get in either. A descriptor kept open on `/dev/null` is given up for
//!   one accept, so that connection can be served (`vpnctl`) or told why
//!   not (a login), and is taken back once it is closed (or at once, when
//!   descriptors were freed meanwhile). Linux fails `accept` at the limit
//!   before it looks for a connection, so a listener at the limit gives
//!   its spare up and waits in `accept` for the next one. This is how
//!   libev's and nginx's users survive EMFILE.
//! - [`Resident`]: the process's resident memory, read from
//!   `/proc/self/statm` through a descriptor opened at start, so reading
//!   it at the memory limit or the descriptor limit still works.
//!
//! A leaf: nothing here knows the rest of the crate.

use std::{
    fs::File,
    io,
    os::unix::fs::FileExt as _,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
};

use parking_lot::Mutex;

/// Whether `e` says the process (EMFILE) or the system (ENFILE) has no
/// descriptor left.
pub fn out_of_descriptors(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::EMFILE | libc::ENFILE))
}

/// A descriptor held in reserve for one connection at the limit; see the
/// module docs.
pub struct SpareDescriptor {
    spare: Mutex<Option<File>>,
    /// Told when a connection that used the spare ends.
    pub returned: tokio::sync::Notify,
}

/// The spare, given up for as long as this lives; dropping it takes the
/// descriptor back (when one is free by then; else at the next
/// [`SpareDescriptor::give_up`]).
pub struct GivenUp(Arc<SpareDescriptor>);

impl SpareDescriptor {
    /// Opens the spare (at start, when descriptors are plenty; if it
    /// cannot be, the first [`SpareDescriptor::give_up`] tries again).
    pub fn new() -> Arc<Self> {
        Arc::new(SpareDescriptor {
            spare: Mutex::new(File::open("/dev/null").ok()),
            returned: tokio::sync::Notify::new(),
        })
    }

    /// Closes the spare so one `accept` can succeed, or `None` when it is
    /// already given up (another connection holds it) and could not be
    /// taken back.
    pub fn give_up(self: &Arc<Self>) -> Option<GivenUp> {
        let mut s = self.spare.lock();
        let f = s.take().or_else(|| File::open("/dev/null").ok())?;
        drop(f);
        Some(GivenUp(self.clone()))
    }

    /// Takes the spare back if it is not held and a descriptor is free
    /// (after a plain accept: the last connection that used it may have
    /// ended while the process was at its limit).
    pub fn restore(&self) {
        let mut s = self.spare.lock();
        if s.is_none() {
            *s = File::open("/dev/null").ok();
        }
    }

    /// Whether the spare is held (ready for the next connection at the
    /// limit).
    pub fn held(&self) -> bool {
        self.spare.lock().is_some()
    }
}

impl GivenUp {
    /// Takes the spare back now if a descriptor is free: whether the
    /// process is still at its limit (`false`) or not (`true`).
    pub fn take_back(&self) -> bool {
        self.0.restore();
        self.0.held()
    }
}

impl Drop for GivenUp {
    fn drop(&mut self) {
        self.0.restore();
        self.0.returned.notify_one();
    }
}

/// The process's resident memory; see the module docs.
pub struct Resident {
    statm: File,
    page: u64,
}

impl Resident {
    pub fn open() -> io::Result<Self> {
        // SAFETY: sysconf has no preconditions.
        let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
        Ok(Resident {
            statm: File::open("/proc/self/statm")?,
            page: u64::try_from(page).unwrap_or(4096),
        })
    }

    /// Resident bytes now (statm's second field, in pages).
    pub fn bytes(&self) -> io::Result<u64> {
        let mut buf = [0u8; 128];
        let n = self.statm.read_at(&mut buf, 0)?;
        std::str::from_utf8(&buf[..n])
            .ok()
            .and_then(|t| t.split_ascii_whitespace().nth(1))
            .and_then(|p| p.parse::<u64>().ok())
            .map(|pages| pages * self.page)
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "unreadable statm"))
    }
}

/// A ceiling on resident memory (0: none), changed by a reload.
#[derive(Default)]
pub struct Ceiling(AtomicU64);

impl Ceiling {
    pub fn set(&self, bytes: u64) {
        self.0.store(bytes, Ordering::Relaxed);
    }

    /// The ceiling in bytes, when there is one.
    pub fn get(&self) -> Option<u64> {
        Some(self.0.load(Ordering::Relaxed)).filter(|&b| b > 0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resident_memory_is_read_and_follows_what_is_touched() {
        let r = Resident::open().unwrap();
        let before = r.bytes().unwrap();
        assert!(before > 1 << 20, "{before}");
        let v = vec![1u8; 64 << 20];
        let during = r.bytes().unwrap();
        assert!(during >= before + (60 << 20), "{before} -> {during}");
        drop(v);
    }

    #[test]
    fn the_spare_is_given_up_once_and_taken_back() {
        let s = SpareDescriptor::new();
        assert!(s.held());
        let g = s.give_up().unwrap();
        assert!(!s.held());
        drop(g);
        assert!(s.held());
        let g = s.give_up().unwrap();
        assert!(g.take_back(), "descriptors are free here");
        assert!(s.held());
        drop(g);
        assert!(s.held());
    }

    #[test]
    fn running_out_of_descriptors_is_recognised() {
        assert!(out_of_descriptors(&io::Error::from_raw_os_error(
            libc::EMFILE
        )));
        assert!(out_of_descriptors(&io::Error::from_raw_os_error(
            libc::ENFILE
        )));
        assert!(!out_of_descriptors(&io::Error::from_raw_os_error(
            libc::ECONNABORTED
        )));
    }
}
