//! Fewer, larger reads from a busy TLS tunnel.
//!
//! openconnect sends every packet as its own TLS record and its own TCP
//! segment. Left alone, a tunnel wakes up for every few segments that
//! arrive: an upload at 1 Gbit/s cost about 13k wake-ups a second of
//! ~9 KB each, and each wake-up pays for an epoll round, a socket read, a
//! tunnel device write (with the forwarding and the server's TCP receive
//! behind it) and the server's ACK coming back. Per byte, that was most of
//! the upload's CPU.
//!
//! While a client sends fast, its socket gets `SO_RCVLOWAT` set to what
//! arrives in about half a millisecond (16–64 KiB): the kernel wakes the
//! tunnel only once that much is queued, so every wake-up moves a large
//! burst and the tunnel device gets one large merged write for it.
//!
//! A low-water mark alone could strand the last bytes of a burst forever,
//! so a tail timer runs while it is set: `TAIL` after the last wake-up,
//! the mark drops back to one byte (which wakes the reader at once if
//! anything is queued, see `tcp_set_rcvlowat`). If data was waiting then,
//! the sender was slower than the mark assumed (a window-limited flow, or
//! a sender that paused): that was a stall, and batching stays off for a
//! hold-off. The hold-off starts at 5 ms and doubles with every stall that
//! ends a short batching run, up to 1 s, so a flow that can never fill
//! the mark pays one tail wait a second; a stall after 20 ms or more of
//! batching (a sender that was descheduled for a moment) costs at most 10%
//! and starts again from 5 ms. The kernel also wakes the reader before
//! the mark when its receive window runs out or memory is short.

use crate::api::ReadStats;
use std::{
    os::fd::RawFd,
    sync::atomic::{AtomicU64, Ordering},
    time::{Duration, Instant},
};

/// Arrival rate (bytes per millisecond, about 270 Mbit/s) at which a
/// tunnel starts batching its reads.
const ENTER_PER_MS: usize = 32 * 1024;
/// The low-water mark is what arrives in this long at the measured rate...
const FILL: Duration = Duration::from_micros(500);
/// ...within these bounds.
const MIN_LOWAT: usize = 16 * 1024;
const MAX_LOWAT: usize = 64 * 1024;
/// How long after the last wake-up the mark is dropped. Twice `FILL`, so a
/// steady sender reaches the mark first; tokio's timer rounds up to the
/// next millisecond, so the wait is 1–2 ms.
pub const TAIL: Duration = Duration::from_millis(1);
/// No batching for a hold-off after a tail wait found data waiting: from
/// `MIN_HOLD_OFF`, doubling up to `MAX_HOLD_OFF` while batching runs end
/// in a stall before `GOOD_RUN`.
const MIN_HOLD_OFF: Duration = Duration::from_millis(5);
const MAX_HOLD_OFF: Duration = Duration::from_secs(1);
const GOOD_RUN: Duration = Duration::from_millis(20);
/// Shortest period the arrival rate is measured over.
const PERIOD: Duration = Duration::from_millis(1);

/// Gateway-wide counters, shown by `vpnctl stats`.
#[derive(Default)]
pub struct Counters {
    wakeups: AtomicU64,
    bytes: AtomicU64,
    entries: AtomicU64,
    stalls: AtomicU64,
}

impl Counters {
    pub fn snapshot(&self) -> ReadStats {
        ReadStats {
            wakeups: self.wakeups.load(Ordering::Relaxed),
            bytes: self.bytes.load(Ordering::Relaxed),
            batching_started: self.entries.load(Ordering::Relaxed),
            tail_stalls: self.stalls.load(Ordering::Relaxed),
        }
    }
}

/// The batching decisions for one tunnel, free of system calls (the
/// caller applies the marks they return).
#[derive(Debug)]
struct Policy {
    /// The mark in force; `None` while not batching.
    lowat: Option<usize>,
    period_start: Instant,
    period_bytes: usize,
    hold_off_until: Option<Instant>,
    /// The next hold-off.
    hold_off: Duration,
    /// When the current batching run started.
    run_start: Instant,
}

impl Policy {
    fn new(now: Instant) -> Self {
        Policy {
            lowat: None,
            period_start: now,
            period_bytes: 0,
            hold_off_until: None,
            hold_off: MIN_HOLD_OFF,
            run_start: now,
        }
    }

    /// After a wake-up that read `n` bytes: the new mark to set, if it
    /// changes (`Some(1)` to stop batching).
    fn after_read(&mut self, n: usize, now: Instant) -> Option<usize> {
        self.period_bytes += n;
        let elapsed = now.saturating_duration_since(self.period_start);
        if elapsed < PERIOD {
            return None;
        }
        let per_ms = (self.period_bytes as u128 * 1000 / elapsed.as_micros()) as usize;
        self.period_start = now;
        self.period_bytes = 0;
        if per_ms < ENTER_PER_MS {
            return self.lowat.take().map(|_| 1);
        }
        if self.lowat.is_none() && self.hold_off_until.is_some_and(|t| now < t) {
            return None;
        }
        let want = (per_ms as u128 * FILL.as_micros() / 1000) as usize;
        let want = want.clamp(MIN_LOWAT, MAX_LOWAT);
        match self.lowat {
            // Small changes are not worth a system call.
            Some(l) if l.abs_diff(want) <= l / 4 => None,
            _ => {
                if self.lowat.is_none() {
                    self.run_start = now;
                }
                self.lowat = Some(want);
                Some(want)
            }
        }
    }

    /// The tail timer fired with `pending` bytes queued: the mark to set.
    fn tail(&mut self, pending: usize, now: Instant) -> usize {
        self.lowat = None;
        // The rate is measured afresh, without the pause.
        self.period_start = now;
        self.period_bytes = 0;
        if pending > 0 {
            if now.saturating_duration_since(self.run_start) >= GOOD_RUN {
                self.hold_off = MIN_HOLD_OFF;
            }
            self.hold_off_until = Some(now + self.hold_off);
            self.hold_off = (self.hold_off * 2).min(MAX_HOLD_OFF);
        }
        1
    }
}

/// Read batching for one tunnel's socket.
pub struct ReadBatching<'a> {
    fd: RawFd,
    /// Off: wake-ups are only counted.
    enabled: bool,
    policy: Policy,
    counters: &'a Counters,
}

impl<'a> ReadBatching<'a> {
    /// `fd` is the tunnel's TCP socket; it must be open whenever
    /// [`Self::after_read`], [`Self::tail`] or [`Self::stop`] runs.
    pub fn new(fd: RawFd, enabled: bool, counters: &'a Counters) -> Self {
        ReadBatching {
            fd,
            enabled,
            policy: Policy::new(Instant::now()),
            counters,
        }
    }

    /// Whether a low-water mark is in force (the tail timer must run).
    pub fn batching(&self) -> bool {
        self.policy.lowat.is_some()
    }

    /// After a wake-up that read `n` bytes of the tunnel.
    pub fn after_read(&mut self, n: usize) {
        self.counters.wakeups.fetch_add(1, Ordering::Relaxed);
        self.counters.bytes.fetch_add(n as u64, Ordering::Relaxed);
        if !self.enabled {
            return;
        }
        let was = self.batching();
        if let Some(mark) = self.policy.after_read(n, Instant::now()) {
            if !was && self.batching() {
                self.counters.entries.fetch_add(1, Ordering::Relaxed);
            }
            self.set(mark);
        }
    }

    /// The tail timer fired.
    pub fn tail(&mut self) {
        let pending = self.pending();
        if pending > 0 {
            self.counters.stalls.fetch_add(1, Ordering::Relaxed);
        }
        let mark = self.policy.tail(pending, Instant::now());
        self.set(mark);
    }

    /// Stops batching, for reads that must see every byte at once (the
    /// last reads before closing).
    pub fn stop(&mut self) {
        if self.policy.lowat.take().is_some() {
            self.set(1);
        }
    }

    fn set(&self, mark: usize) {
        let v = mark as libc::c_int;
        // SAFETY: a valid option value for a socket the caller keeps open.
        let r = unsafe {
            libc::setsockopt(
                self.fd,
                libc::SOL_SOCKET,
                libc::SO_RCVLOWAT,
                (&v as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        if r != 0 {
            tracing::debug!("SO_RCVLOWAT {mark}: {}", std::io::Error::last_os_error());
        }
    }

    /// Bytes queued on the socket, unread.
    fn pending(&self) -> usize {
        let mut n: libc::c_int = 0;
        // SAFETY: FIONREAD writes one int.
        if unsafe { libc::ioctl(self.fd, libc::FIONREAD, &mut n) } != 0 {
            return 0;
        }
        n.max(0) as usize
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    /// Feeds `per_ms` bytes a millisecond for `ms` milliseconds, one read a
    /// millisecond; returns the marks set.
    fn feed(p: &mut Policy, t: &mut Instant, per_ms: usize, ms: u32) -> Vec<usize> {
        let mut marks = vec![];
        for _ in 0..ms {
            *t += MS;
            marks.extend(p.after_read(per_ms, *t));
        }
        marks
    }

    #[test]
    fn a_fast_sender_gets_a_mark_of_half_a_millisecond() {
        let mut t = Instant::now();
        let mut p = Policy::new(t);
        // 10 KB/ms (80 Mbit/s): never batched.
        assert!(feed(&mut p, &mut t, 10_000, 20).is_empty());
        // 100 KB/ms: 50 KB, once.
        assert_eq!(feed(&mut p, &mut t, 100_000, 20), [50_000]);
        // Faster: capped at 64 KiB. Within a quarter: no new call.
        assert_eq!(feed(&mut p, &mut t, 200_000, 5), [MAX_LOWAT]);
        assert!(feed(&mut p, &mut t, 110_000, 5).is_empty());
        // Slowing down but still fast: the mark follows; slow: it ends.
        assert_eq!(feed(&mut p, &mut t, 40_000, 1), [MIN_LOWAT.max(20_000)]);
        assert_eq!(feed(&mut p, &mut t, 5_000, 1), [1]);
        assert!(p.lowat.is_none());
    }

    #[test]
    fn the_rate_is_measured_over_a_millisecond_at_least() {
        let mut t = Instant::now();
        let mut p = Policy::new(t);
        // 40 KB in each of five reads 100 us apart: one period of 200 KB in
        // 0.5 ms is not complete yet...
        for _ in 0..5 {
            t += Duration::from_micros(100);
            assert_eq!(p.after_read(40_000, t), None);
        }
        // ...and at 1 ms it is: 240 KB/ms.
        t += Duration::from_micros(500);
        assert_eq!(p.after_read(40_000, t), Some(MAX_LOWAT));
    }

    #[test]
    fn stalls_hold_batching_off_longer_and_longer() {
        let mut t = Instant::now();
        let mut p = Policy::new(t);
        // Each run batches for 2 ms, then the tail timer finds 30 KB
        // waiting: a sender that cannot fill the mark (window-limited).
        // The hold-offs double: 5, 10, 20, ... 1000 ms.
        let mut offs = vec![];
        for _ in 0..10 {
            let mut off = 0;
            while feed(&mut p, &mut t, 100_000, 1).is_empty() {
                off += 1;
            }
            offs.push(off);
            feed(&mut p, &mut t, 100_000, 1);
            t += TAIL;
            assert_eq!(p.tail(30_000, t), 1);
            assert!(p.lowat.is_none());
        }
        assert_eq!(offs[1..], [4, 9, 19, 39, 79, 159, 319, 639, 999]);
        // A run of 20 ms or more that ends in a stall (a sender
        // descheduled for a moment) starts again from 5 ms.
        assert_eq!(feed(&mut p, &mut t, 100_000, 1000), [50_000]);
        assert!(feed(&mut p, &mut t, 100_000, 100).is_empty());
        t += TAIL;
        p.tail(30_000, t);
        assert_eq!(feed(&mut p, &mut t, 100_000, 5), [50_000]);
        // A tail that finds nothing (the sender just stopped) holds
        // nothing off.
        t += TAIL;
        assert_eq!(p.tail(0, t), 1);
        assert_eq!(feed(&mut p, &mut t, 100_000, 1), [50_000]);
    }
}
