//! Rate-limited DTLS clients, paced on the packet worker that has their
//! packets (`transport/pacing.rs` for the model): a packet that conforms
//! to the session's rate goes at once, one that must wait goes into the
//! worker's [`PacedQueue`] and leaves between batches when its time comes,
//! one that would wait longer than [`MAX_PACE_WAIT`] is dropped.

use std::{
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Instant,
};

use super::{DtlsServer, Link, PACKET_MAX, PACKET_OFFSET, batch::SendBatch};
use crate::{
    api::PacingStats,
    packet::gro::VNET_HDR_LEN,
    transport::pacing::{Direction, MAX_PACE_WAIT, PacedQueue},
};

/// A worker's paced packets, for its DTLS clients.
pub type Paced = PacedQueue<Arc<Link>>;

#[derive(Default)]
pub(super) struct PacingCounters {
    up_delayed: AtomicU64,
    down_delayed: AtomicU64,
    dropped: AtomicU64,
}

impl DtlsServer {
    /// An upload from `link`'s client, limited to `rate` bit/s: written
    /// to TUN queue `queue` now or when it conforms.
    pub(super) fn pace_up(
        &self,
        link: &Arc<Link>,
        pkt: &[u8],
        rate: u64,
        now: Instant,
        paced: &mut Paced,
        queue: usize,
    ) {
        match link
            .pace_up
            .lock()
            .admit(pkt.len(), rate, now, MAX_PACE_WAIT)
        {
            Some(wait) if wait.is_zero() => self.write_up(queue, pkt),
            Some(wait) if paced.push(now + wait, Direction::Up, link.clone(), pkt) => {
                self.pacing.up_delayed.fetch_add(1, Ordering::Relaxed);
            }
            _ => {
                self.pacing.dropped.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// A download for `link`'s client, limited to `rate` bit/s: sealed into
    /// `out` now or when it conforms.
    #[allow(clippy::too_many_arguments)]
    pub fn pace_down(
        &self,
        link: &Arc<Link>,
        pkt: &[u8],
        rate: u64,
        now: Instant,
        paced: &mut Paced,
        out: &mut SendBatch,
        worker: Option<usize>,
    ) {
        if pkt.len() > PACKET_MAX {
            return;
        }
        match link
            .pace_down
            .lock()
            .admit(pkt.len(), rate, now, MAX_PACE_WAIT)
        {
            Some(wait) if wait.is_zero() => self.seal_one(link, pkt, out, worker),
            Some(wait) if paced.push(now + wait, Direction::Down, link.clone(), pkt) => {
                self.pacing.down_delayed.fetch_add(1, Ordering::Relaxed);
            }
            _ => {
                self.pacing.dropped.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// Sends what in `paced` is due at `now`: uploads to TUN queue
    /// `queue`, downloads sealed into `out` and sent.
    pub fn release_paced(
        &self,
        paced: &mut Paced,
        out: &mut SendBatch,
        queue: usize,
        worker: Option<usize>,
        now: Instant,
    ) {
        if paced.next_due().is_none_or(|t| t > now) {
            return;
        }
        while let Some((dir, link, pkt)) = paced.pop_due(now) {
            if link.is_closed() {
                continue;
            }
            match dir {
                Direction::Up => self.write_up(queue, &pkt),
                Direction::Down => self.seal_one(&link, &pkt, out, worker),
            }
        }
        self.flush(out);
    }

    pub fn pacing_stats(&self) -> PacingStats {
        let c = &self.pacing;
        PacingStats {
            up_delayed: c.up_delayed.load(Ordering::Relaxed),
            down_delayed: c.down_delayed.load(Ordering::Relaxed),
            dropped: c.dropped.load(Ordering::Relaxed),
        }
    }

    fn write_up(&self, queue: usize, pkt: &[u8]) {
        if let Err(e) = self.tun.send_parts_on(queue, &[0u8; VNET_HDR_LEN], pkt) {
            tracing::trace!("tun write: {e}");
        }
    }

    /// Seals one packet (at most [`PACKET_MAX`]) into `out`.
    fn seal_one(&self, link: &Link, pkt: &[u8], out: &mut SendBatch, worker: Option<usize>) {
        out.slot()[PACKET_OFFSET..PACKET_OFFSET + pkt.len()].copy_from_slice(pkt);
        self.seal_into(link, link.path(), out, pkt.len());
        if let Some(w) = worker {
            self.count_sent(w, 1);
        }
    }
}
