//! Packets that wait for their client's window: a queue per client.
//!
//! Download flow control ([`flow_control`](super::flow_control)) holds new
//! TCP data for a client whose window is full until its ACKs make room, at
//! most [`MAX_WAIT`]. A packet worker reads one TUN queue for many clients,
//! so it must not stop reading for one of them: what waits goes into that
//! client's queue here, with everything after it for that client (its
//! packets keep their order), and the worker goes on with everybody else's.
//! Each packet at the head of a queue waits at most [`MAX_WAIT`] from when
//! it got there, as a held packet did when the worker held one at a time.
//!
//! The queues are bounded, per client ([`CLIENT_BYTES`]), per worker
//! ([`WORKER_BYTES`]) and in number ([`CLIENTS`]); past a bound a packet is
//! dropped, as a full router queue drops, and the server's TCP slows down.
//! A client's bound is four times what the fastest download here (about 2
//! Gbit/s) brings in [`MAX_WAIT`]; on the bench a quarter of it (256 KiB)
//! dropped more there, and the losses at the client rose from 3% to 10%.

use std::{
    collections::VecDeque,
    sync::Arc,
    time::{Duration, Instant},
};

use super::{Link, flow_control::MAX_WAIT};

/// Bytes of buffers one client's queue may hold.
pub const CLIENT_BYTES: usize = 1 << 20;
/// Bytes of buffers all of a worker's queues may hold.
pub const WORKER_BYTES: usize = 16 << 20;
/// Clients a worker may hold packets for at once.
pub const CLIENTS: usize = 256;
/// Read buffers kept for reuse.
const SPARE_BUFFERS: usize = 16;

/// New TCP data of a flow, `start..end` in its sequence space: what flow
/// control admits or holds.
#[derive(Clone, Copy, Debug)]
pub struct TcpData {
    pub flow: u64,
    pub start: u32,
    pub end: u32,
}

/// What the queues need of a client's channel (a [`Link`]; a fake in the
/// tests).
pub trait Client {
    /// The session: one queue per session, whichever channel it has now.
    fn session_id(&self) -> u64;
    /// `LinkWindow::admit`.
    fn admit(&self, t: TcpData, now: Instant, overdue: bool) -> bool;
    /// `LinkWindow::delivered`.
    fn delivered(&self) -> u64;
    /// `LinkWindow::count_overdue`.
    fn count_overdue(&self, now: Instant, delivered: u64) -> bool;
}

impl Client for Link {
    fn session_id(&self) -> u64 {
        self.session.id
    }
    fn admit(&self, t: TcpData, now: Instant, overdue: bool) -> bool {
        self.window.admit(t.flow, t.start, t.end, now, overdue)
    }
    fn delivered(&self) -> u64 {
        self.window.delivered()
    }
    fn count_overdue(&self, now: Instant, delivered: u64) -> bool {
        self.window.count_overdue(now, delivered)
    }
}

/// What [`HeldQueues::release`] did, for the counters.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Released {
    /// New TCP data that waited for its window, and how long in all.
    pub waits: u64,
    pub waited: Duration,
    /// Clients whose holds stopped because their window did not open.
    pub holds_stopped: u64,
}

struct Packet {
    /// The read (virtio-net header and packet) in `buf[..len]`.
    buf: Vec<u8>,
    len: usize,
    /// What it counts against the bounds: its buffer's size when that is
    /// a read buffer (reused after), else `len`.
    cost: usize,
    /// Set when it is new TCP data: it goes when the window admits it.
    tcp: Option<TcpData>,
}

struct ClientQueue<L> {
    /// The client's channel (the latest, if it changed meanwhile).
    link: Arc<L>,
    packets: VecDeque<Packet>,
    /// Capacity of the packets' buffers.
    bytes: usize,
    /// When the head got there: it goes at `since` + [`MAX_WAIT`].
    since: Instant,
    /// What the client had acknowledged then (`LinkWindow::count_overdue`).
    delivered: u64,
}

/// Why [`HeldQueues::push`] did not take a packet.
#[derive(Debug, PartialEq, Eq)]
pub enum Full {
    Client,
    Worker,
}

/// One packet worker's queues.
pub struct HeldQueues<L = Link> {
    clients: Vec<ClientQueue<L>>,
    bytes: usize,
    spare: Vec<Vec<u8>>,
}

impl<L> Default for HeldQueues<L> {
    fn default() -> Self {
        HeldQueues {
            clients: Vec::new(),
            bytes: 0,
            spare: Vec::new(),
        }
    }
}

impl<L: Client> HeldQueues<L> {
    pub fn is_empty(&self) -> bool {
        self.clients.is_empty()
    }

    /// Whether packets of `link`'s client wait here: the next must go
    /// behind them.
    pub fn holds(&self, link: &L) -> bool {
        let id = link.session_id();
        self.clients.iter().any(|c| c.link.session_id() == id)
    }

    /// When the first head goes regardless of its client's window.
    pub fn deadline(&self) -> Option<Instant> {
        self.clients.iter().map(|c| c.since + MAX_WAIT).min()
    }

    /// Queues the read in `buf[..len]` for `link`'s client. A large read's
    /// buffer itself is queued and `buf` replaced by a spare one; a small
    /// one is copied.
    pub fn push(
        &mut self,
        link: Arc<L>,
        buf: &mut Vec<u8>,
        len: usize,
        tcp: Option<TcpData>,
        now: Instant,
    ) -> Result<(), Full> {
        let id = link.session_id();
        let i = self.clients.iter().position(|c| c.link.session_id() == id);
        let cost = if len > buf.len() / 2 { buf.len() } else { len };
        if self.bytes + cost > WORKER_BYTES || (i.is_none() && self.clients.len() == CLIENTS) {
            return Err(Full::Worker);
        }
        let q = match i {
            Some(i) => &mut self.clients[i],
            None => {
                self.clients.push(ClientQueue {
                    delivered: link.delivered(),
                    link: link.clone(),
                    packets: VecDeque::new(),
                    bytes: 0,
                    since: now,
                });
                self.clients.last_mut().expect("just pushed")
            }
        };
        if q.bytes + cost > CLIENT_BYTES {
            return Err(Full::Client);
        }
        let packet = if cost == len {
            buf[..len].to_vec()
        } else {
            let fresh = self.spare.pop().unwrap_or_else(|| vec![0; buf.len()]);
            std::mem::replace(buf, fresh)
        };
        q.link = link;
        q.bytes += cost;
        self.bytes += cost;
        q.packets.push_back(Packet {
            buf: packet,
            len,
            cost,
            tcp,
        });
        Ok(())
    }

    /// Passes on what may go now, to `send` (the client's channel and the
    /// read): each client's packets from the oldest, while its window
    /// admits them or the head has waited [`MAX_WAIT`]. A client whose
    /// window keeps not opening stops being held for a while
    /// (`LinkWindow::count_overdue`).
    pub fn release(&mut self, now: Instant, mut send: impl FnMut(&L, &[u8])) -> Released {
        let mut done = Released::default();
        let HeldQueues {
            clients,
            bytes,
            spare,
        } = self;
        let mut i = 0;
        while i < clients.len() {
            let c = &mut clients[i];
            while let Some(p) = c.packets.front() {
                if let Some(t) = p.tcp {
                    if !c.link.admit(t, now, false) {
                        if now < c.since + MAX_WAIT {
                            break;
                        }
                        c.link.admit(t, now, true);
                        if c.link.count_overdue(now, c.delivered) {
                            done.holds_stopped += 1;
                        }
                    }
                    done.waits += 1;
                    done.waited += now.saturating_duration_since(c.since);
                }
                let p = c.packets.pop_front().expect("front exists");
                send(&c.link, &p.buf[..p.len]);
                c.bytes -= p.cost;
                *bytes -= p.cost;
                if p.cost != p.len && spare.len() < SPARE_BUFFERS {
                    spare.push(p.buf);
                }
                c.since = now;
                c.delivered = c.link.delivered();
            }
            if c.packets.is_empty() {
                clients.swap_remove(i);
            } else {
                i += 1;
            }
        }
        done
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU32, Ordering::Relaxed};

    use super::*;

    /// A client whose window admits `room` more bytes.
    struct Fake {
        id: u64,
        room: AtomicU32,
        overdue: AtomicU32,
    }

    impl Client for Fake {
        fn session_id(&self) -> u64 {
            self.id
        }
        fn admit(&self, t: TcpData, _: Instant, overdue: bool) -> bool {
            let len = t.end - t.start;
            if overdue || len <= self.room.load(Relaxed) {
                self.room
                    .store(self.room.load(Relaxed).saturating_sub(len), Relaxed);
                return true;
            }
            false
        }
        fn delivered(&self) -> u64 {
            0
        }
        fn count_overdue(&self, _: Instant, _: u64) -> bool {
            self.overdue.fetch_add(1, Relaxed);
            true
        }
    }

    fn client(id: u64, room: u32) -> Arc<Fake> {
        Arc::new(Fake {
            id,
            room: AtomicU32::new(room),
            overdue: AtomicU32::new(0),
        })
    }

    fn data(start: u32, len: u32) -> Option<TcpData> {
        Some(TcpData {
            flow: 1,
            start,
            end: start + len,
        })
    }

    /// Releases at `now`; what was sent, as (client, first byte of read).
    fn release(h: &mut HeldQueues<Fake>, now: Instant) -> (Vec<(u64, u8)>, Released) {
        let mut sent = Vec::new();
        let r = h.release(now, |c, read| sent.push((c.id, read[0])));
        (sent, r)
    }

    /// A read buffer whose first byte is `tag`.
    fn read(tag: u8) -> Vec<u8> {
        let mut b = vec![0u8; 4096];
        b[0] = tag;
        b
    }

    #[test]
    fn a_clients_packets_wait_for_its_window_in_order_and_others_do_not() {
        let t0 = Instant::now();
        let mut h = HeldQueues::default();
        let (a, b) = (client(1, 0), client(2, 1 << 20));
        // New data for a, then a small packet of a's (an ACK, say) that
        // must stay behind it.
        h.push(a.clone(), &mut read(1), 1500, data(0, 1400), t0)
            .unwrap();
        h.push(a.clone(), &mut read(2), 60, None, t0).unwrap();
        assert!(h.holds(&a) && !h.holds(&b));
        assert_eq!(h.deadline(), Some(t0 + MAX_WAIT));
        // Window still shut: nothing goes.
        assert_eq!(release(&mut h, t0 + MAX_WAIT / 2).0, []);
        // Its ACKs made room: both go, in order, and the queue is gone.
        a.room.store(1400, Relaxed);
        let (sent, r) = release(&mut h, t0 + MAX_WAIT / 2);
        assert_eq!(sent, [(1, 1), (1, 2)]);
        assert_eq!(r.waits, 1);
        assert_eq!(r.waited, MAX_WAIT / 2);
        assert!(h.is_empty() && !h.holds(&a) && h.deadline().is_none());
    }

    #[test]
    fn each_head_waits_at_most_max_wait_from_when_it_got_there() {
        let t0 = Instant::now();
        let mut h = HeldQueues::default();
        let a = client(1, 0);
        h.push(a.clone(), &mut read(1), 1500, data(0, 1400), t0)
            .unwrap();
        h.push(a.clone(), &mut read(2), 1500, data(1400, 1400), t0)
            .unwrap();
        // The first goes at MAX_WAIT without room; the second becomes the
        // head then and waits its own MAX_WAIT.
        let (sent, r) = release(&mut h, t0 + MAX_WAIT);
        assert_eq!(sent, [(1, 1)]);
        assert_eq!((r.waits, r.holds_stopped), (1, 1));
        assert_eq!(h.deadline(), Some(t0 + 2 * MAX_WAIT));
        assert_eq!(release(&mut h, t0 + MAX_WAIT * 3 / 2).0, []);
        assert_eq!(release(&mut h, t0 + 2 * MAX_WAIT).0, [(1, 2)]);
        assert_eq!(a.overdue.load(Relaxed), 2);
    }

    #[test]
    fn queues_are_bounded_per_client_per_worker_and_in_number() {
        let t0 = Instant::now();
        let mut h = HeldQueues::default();
        let big = |tag| {
            let mut b = vec![0u8; 65_546];
            b[0] = tag;
            b
        };
        // A client's bound: full-size reads are counted by their buffers.
        let a = client(1, 0);
        let per_client = CLIENT_BYTES / 65_546;
        for i in 0..per_client {
            h.push(
                a.clone(),
                &mut big(1),
                65_000,
                data(i as u32 * 65_000, 65_000),
                t0,
            )
            .unwrap();
        }
        assert_eq!(
            h.push(a.clone(), &mut big(1), 65_000, None, t0),
            Err(Full::Client)
        );
        // Small packets are copied, and cost their length.
        h.push(a.clone(), &mut read(1), 100, None, t0).unwrap();
        // The worker's bound, over clients.
        let mut id = 2;
        let err = loop {
            let c = client(id, 0);
            id += 1;
            match (0..per_client)
                .map(|_| h.push(c.clone(), &mut big(2), 65_000, data(0, 65_000), t0))
                .find(Result::is_err)
            {
                Some(e) => break e,
                None => continue,
            }
        };
        assert_eq!(err, Err(Full::Worker));
        assert!(h.bytes <= WORKER_BYTES);
        // And the number of clients.
        let mut h = HeldQueues::default();
        for id in 0..CLIENTS as u64 {
            h.push(client(id, 0), &mut read(0), 60, None, t0).unwrap();
        }
        assert_eq!(
            h.push(client(9999, 0), &mut read(0), 60, None, t0),
            Err(Full::Worker)
        );
        // A client already held is still taken.
        h.push(client(0, 0), &mut read(0), 60, None, t0).unwrap();
    }

    #[test]
    fn a_large_read_is_queued_by_swapping_buffers_which_are_reused() {
        let t0 = Instant::now();
        let mut h = HeldQueues::default();
        let a = client(1, 0);
        let mut buf = read(7);
        let ptr = buf.as_ptr();
        h.push(a.clone(), &mut buf, 4000, data(0, 3900), t0)
            .unwrap();
        // The caller reads on into a fresh buffer of the same size.
        assert_ne!(buf.as_ptr(), ptr);
        assert_eq!((buf.len(), buf[0]), (4096, 0));
        a.room.store(u32::MAX, Relaxed);
        assert_eq!(release(&mut h, t0).0, [(1, 7)]);
        assert_eq!(h.bytes, 0);
        // The queued buffer is the next one handed out.
        let mut next = read(8);
        h.push(a.clone(), &mut next, 4000, None, t0).unwrap();
        assert_eq!(next.as_ptr(), ptr);
        // A small read is copied; the caller keeps its buffer.
        let mut small = read(9);
        let ptr = small.as_ptr();
        h.push(a.clone(), &mut small, 100, None, t0).unwrap();
        assert_eq!((small.as_ptr(), small[0]), (ptr, 9));
        assert_eq!(release(&mut h, t0).0, [(1, 8), (1, 9)]);
    }
}
