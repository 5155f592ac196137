//! Pacing of rate-limited clients (a group policy's `bandwidth_*_kbps`),
//! without I/O.
//!
//! The daemon shapes a limited session's packets to its rate, so TCP inside
//! the tunnel meets delay instead of the BPF policer's drops (the policer
//! stays the hard bound behind it). Both directions, both transports:
//!
//! - TLS: the tunnel's task waits before it writes an upload to the device
//!   (the outer TCP connection is not read meanwhile: backpressure) and
//!   before it writes a download to the client (its queue full = drop).
//! - DTLS: the packet worker that has the packet puts it in its own
//!   [`PacedQueue`] with the time it may go, and sends it then between
//!   batches. UDP has no backpressure, so a packet that would wait longer
//!   than [`MAX_PACE_WAIT`] is dropped, as a shaper's full queue would.
//!
//! [`Pacer`] is the same GCRA as the policer with half the upload tolerance,
//! so paced traffic always conforms there.

use std::{
    cmp::Reverse,
    collections::BinaryHeap,
    time::{Duration, Instant},
};

/// The longest a DTLS packet waits in a worker's paced queue: 200 ms of
/// traffic at the session's rate, a queue long enough for TCP to keep a
/// limited link busy and short enough not to add seconds of delay.
pub const MAX_PACE_WAIT: Duration = Duration::from_millis(200);

/// Packets one worker's paced queue holds at most (all its clients
/// together), about 6 MB of full-size packets.
pub const PACED_QUEUE_MAX: usize = 4096;

/// One direction of one session's rate: when its next packet conforms.
#[derive(Debug)]
pub struct Pacer {
    /// The theoretical arrival time of the next packet.
    tat: Instant,
}

impl Default for Pacer {
    fn default() -> Self {
        Pacer {
            tat: Instant::now(),
        }
    }
}

impl Pacer {
    pub const TOLERANCE: Duration = Duration::from_nanos(vpn_common::RATE_TOLERANCE_NS / 2);

    /// How long to wait before sending `len` bytes at `rate_bps` (0 = no
    /// limit); the packet counts as sent then.
    pub fn delay(&mut self, len: usize, rate_bps: u64, now: Instant) -> Duration {
        if rate_bps == 0 {
            return Duration::ZERO;
        }
        let tat = self.tat.max(now);
        let wait = (tat - now).saturating_sub(Self::TOLERANCE);
        self.tat = tat + Duration::from_nanos(len as u64 * 8 * 1_000_000_000 / rate_bps);
        wait
    }

    /// [`Self::delay`], unless the wait would exceed `max`: then `None`,
    /// and the packet does not count (it is dropped).
    pub fn admit(
        &mut self,
        len: usize,
        rate_bps: u64,
        now: Instant,
        max: Duration,
    ) -> Option<Duration> {
        let before = self.tat;
        let wait = self.delay(len, rate_bps, now);
        if wait > max {
            self.tat = before;
            return None;
        }
        Some(wait)
    }
}

/// Which way a paced packet goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// From the client, to the tunnel device.
    Up,
    /// To the client.
    Down,
}

/// Packets waiting for their time, earliest first; `T` says whose they
/// are (a DTLS channel). Packets released at the same time leave in the
/// order they came.
pub struct PacedQueue<T> {
    heap: BinaryHeap<Reverse<Entry<T>>>,
    seq: u64,
}

struct Entry<T> {
    at: Instant,
    seq: u64,
    dir: Direction,
    to: T,
    pkt: Vec<u8>,
}

impl<T> PartialEq for Entry<T> {
    fn eq(&self, other: &Self) -> bool {
        (self.at, self.seq) == (other.at, other.seq)
    }
}
impl<T> Eq for Entry<T> {}
impl<T> PartialOrd for Entry<T> {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl<T> Ord for Entry<T> {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        (self.at, self.seq).cmp(&(other.at, other.seq))
    }
}

impl<T> Default for PacedQueue<T> {
    fn default() -> Self {
        PacedQueue {
            heap: BinaryHeap::new(),
            seq: 0,
        }
    }
}

impl<T> PacedQueue<T> {
    /// Queues `pkt` to go `dir` at `at`; `false` (dropped) if the queue
    /// holds [`PACED_QUEUE_MAX`] packets already.
    pub fn push(&mut self, at: Instant, dir: Direction, to: T, pkt: &[u8]) -> bool {
        if self.heap.len() >= PACED_QUEUE_MAX {
            return false;
        }
        self.seq += 1;
        self.heap.push(Reverse(Entry {
            at,
            seq: self.seq,
            dir,
            to,
            pkt: pkt.to_vec(),
        }));
        true
    }

    /// When the earliest packet is due.
    pub fn next_due(&self) -> Option<Instant> {
        self.heap.peek().map(|Reverse(e)| e.at)
    }

    /// The earliest packet, if it is due at `now`.
    pub fn pop_due(&mut self, now: Instant) -> Option<(Direction, T, Vec<u8>)> {
        if self.next_due()? > now {
            return None;
        }
        let Reverse(e) = self.heap.pop()?;
        Some((e.dir, e.to, e.pkt))
    }

    pub fn len(&self) -> usize {
        self.heap.len()
    }

    pub fn is_empty(&self) -> bool {
        self.heap.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pacer_holds_the_rate_after_the_tolerance() {
        let mut p = Pacer::default();
        let t0 = p.tat;
        // 1,000,000 bit/s: a 1250-byte packet is 10 ms.
        let mut now = t0;
        let mut sent = 0;
        for _ in 0..200 {
            now += p.delay(1250, 1_000_000, now);
            sent += 1250;
        }
        // 200 packets = 2 s of traffic, the first 50 ms of it as a burst.
        let elapsed = now - t0;
        assert!(
            elapsed >= Duration::from_millis(1940) && elapsed <= Duration::from_millis(1960),
            "{elapsed:?}"
        );
        assert_eq!(sent, 250_000);
        assert_eq!(p.delay(1250, 0, now), Duration::ZERO, "no limit, no wait");
    }

    #[test]
    fn admit_drops_what_would_wait_too_long_without_counting_it() {
        let mut p = Pacer::default();
        let now = p.tat;
        // 1 Mbit/s, 1250-byte packets (10 ms each), all at once: 6 go at
        // once (the tolerance is 50 ms), then each waits 10 ms more, up to
        // 200 ms: 26 admitted, the rest dropped.
        let waits: Vec<_> = (0..40)
            .map(|_| p.admit(1250, 1_000_000, now, MAX_PACE_WAIT))
            .collect();
        let admitted = waits.iter().filter(|w| w.is_some()).count();
        assert_eq!(admitted, 26, "{waits:?}");
        assert_eq!(waits[25], Some(Duration::from_millis(200)));
        assert_eq!(waits[26], None);
        // The drops did not count: 10 ms later exactly one more fits.
        let later = now + Duration::from_millis(10);
        assert_eq!(
            p.admit(1250, 1_000_000, later, MAX_PACE_WAIT),
            Some(MAX_PACE_WAIT)
        );
        assert_eq!(p.admit(1250, 1_000_000, later, MAX_PACE_WAIT), None);
    }

    #[test]
    fn the_queue_releases_in_time_order_then_arrival_order() {
        let t0 = Instant::now();
        let ms = Duration::from_millis;
        let mut q = PacedQueue::default();
        assert!(q.push(t0 + ms(20), Direction::Down, "b", b"2"));
        assert!(q.push(t0 + ms(10), Direction::Up, "a", b"1"));
        assert!(q.push(t0 + ms(20), Direction::Down, "b", b"3"));
        assert_eq!(q.next_due(), Some(t0 + ms(10)));
        assert!(q.pop_due(t0 + ms(9)).is_none(), "nothing due yet");
        assert_eq!(
            q.pop_due(t0 + ms(10)),
            Some((Direction::Up, "a", b"1".to_vec()))
        );
        assert_eq!(q.pop_due(t0 + ms(30)).unwrap().2, b"2");
        assert_eq!(q.pop_due(t0 + ms(30)).unwrap().2, b"3");
        assert!(q.is_empty() && q.next_due().is_none());
    }

    #[test]
    fn a_full_queue_drops() {
        let now = Instant::now();
        let mut q = PacedQueue::default();
        for _ in 0..PACED_QUEUE_MAX {
            assert!(q.push(now, Direction::Up, (), b"x"));
        }
        assert!(!q.push(now, Direction::Up, (), b"x"));
        assert_eq!(q.len(), PACED_QUEUE_MAX);
    }
}
