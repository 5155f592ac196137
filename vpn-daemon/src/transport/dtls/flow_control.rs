//! Download flow control towards DTLS clients: no more unacknowledged TCP
//! data in flight to a client than the path holds plus what the client's
//! UDP socket can queue.
//!
//! A read from the TUN device can be one 64 KiB TCP packet (TSO), which
//! becomes some 45 datagrams sent within microseconds, and the server's TCP
//! sends several such packets back to back. A client takes datagrams off
//! its UDP socket one at a time (openconnect: 5 to 10 us each), and that
//! socket holds about 90 of them (Linux's default 208 KiB of buffer); if
//! the client is off the CPU for half a millisecond at 2 Gbit/s, what we
//! send meanwhile is lost there. On the bench, unpaced DTLS downloads lost
//! 16% of their datagrams at the client; the server's TCP retransmitted
//! each, we sealed and sent them again, and the losses kept its window
//! small. ocserv escapes this only by being slower than the client.
//!
//! The client's own TCP says what it has taken: its ACKs (and SACK blocks,
//! which say what arrived after a loss). Each [`LinkWindow`] tracks, per
//! TCP flow to the client, the highest sequence number sent and the highest
//! the client has, and a packet worker (`transport/workers.rs`) about to send new data
//! beyond the client's window holds it for ACKs first (at most
//! [`MAX_WAIT`]). The server's TCP then meets queueing in the TUN device
//! instead of losses at the client. Retransmissions never wait: they fill
//! the hole the client's ACKs are stuck at.
//!
//! The window is what a TCP sender's would be, for the path between us and
//! the client's TCP: its bandwidth-delay product (the highest delivery rate
//! seen lately times the lowest round-trip time, both measured on the
//! client's ACKs, as BBR does) plus [`QUEUE_BYTES`] for the client's socket
//! to absorb. On a LAN the product is small and the allowance decides; on a
//! long path the product grows with the rate, by up to [`QUEUE_BYTES`] per
//! round trip, so a client far away is not held back.
//!
//! A flow the client has not acknowledged anything on for [`STALE`] stops
//! counting: a flow that ended, a client that went quiet (the next send is
//! a probe), or one that withholds its ACKs, which thus cannot hold a
//! packet worker's reading, and the other clients it serves, for more than
//! that.

use std::time::{Duration, Instant};

use parking_lot::{Mutex, MutexGuard};

use crate::packet::gro::{self, Seg, after};

/// The longest a packet worker holds one client's packet for its ACKs.
pub const MAX_WAIT: Duration = Duration::from_millis(1);
/// A flow without ACKs for this long stops counting.
pub const STALE: Duration = Duration::from_millis(20);
/// In flight beyond the bandwidth-delay product: TCP payload that 90
/// full-size datagrams carry, what a Linux client's default UDP receive
/// buffer holds. Measured on the bench: 96 KiB held throughput back,
/// 160 KiB let losses at the client come back.
pub const QUEUE_BYTES: u64 = 128 * 1024;
/// How long the lowest round-trip time stays valid without being seen
/// again (BBR's 10 s).
const MIN_RTT_LIFETIME: Duration = Duration::from_secs(10);
/// Rate samples the delivery rate is the highest of.
const RATE_SAMPLES: usize = 8;
/// TCP flows per client whose sequence numbers are tracked.
const FLOWS: usize = 16;
/// Held packets a client may have sent only at [`MAX_WAIT`], without
/// having acknowledged anything meanwhile, in one second before its
/// packets are not held at all for [`NO_HOLD`]: a hold stops its worker's
/// reading for everyone on that worker, so a client whose ACKs never open
/// its window (one that keeps its flows fresh with ACKs that acknowledge
/// nothing) may cost the others at most this many milliseconds a second
/// (audit M3). A client whose ACKs come, if late, is held as before.
pub const OVERDUE_PER_SEC: u32 = 10;
/// How long a client past [`OVERDUE_PER_SEC`] goes without holds.
pub const NO_HOLD: Duration = Duration::from_secs(1);

#[derive(Clone, Copy)]
struct Flow {
    hash: u64,
    /// Sequence number after the highest byte sent.
    snd_max: u32,
    /// Highest sequence number the client has (ACK or SACK).
    ack: u32,
    /// When the client last acknowledged on the flow.
    last: Instant,
}

/// A send being timed: done when `flow` is acknowledged past `seq`.
#[derive(Clone, Copy)]
struct Probe {
    flow: u64,
    seq: u32,
    sent: Instant,
    /// `State::delivered` when it was sent.
    delivered: u64,
}

struct State {
    flows: Vec<Flow>,
    /// Bytes the client has acknowledged over all flows.
    delivered: u64,
    probe: Option<Probe>,
    min_rtt: Option<(Duration, Instant)>,
    /// Delivery rates (bytes per second) of the last probes.
    rates: [u64; RATE_SAMPLES],
    next_rate: usize,
    /// Held packets sent at [`MAX_WAIT`] since the second that began then.
    overdue: (Instant, u32),
    /// No holds before this.
    no_hold_until: Option<Instant>,
}

/// The flight state of one DTLS channel's TCP flows.
pub struct LinkWindow {
    state: Mutex<State>,
}

impl Default for LinkWindow {
    fn default() -> Self {
        LinkWindow {
            state: Mutex::new(State {
                // Taken with the first TCP flow: an idle channel holds
                // none of its 512 bytes.
                flows: Vec::new(),
                delivered: 0,
                probe: None,
                min_rtt: None,
                rates: [0; RATE_SAMPLES],
                next_rate: 0,
                overdue: (Instant::now(), 0),
                no_hold_until: None,
            }),
        }
    }
}

impl State {
    /// Bytes in flight on flows heard from lately.
    fn in_flight(&self, now: Instant) -> u64 {
        self.flows
            .iter()
            .filter(|f| now.saturating_duration_since(f.last) < STALE)
            .map(|f| u64::from(f.snd_max.wrapping_sub(f.ack)).min(1 << 30))
            .sum()
    }

    /// The client's window: bandwidth-delay product plus the allowance.
    fn window(&self) -> u64 {
        let rate = self.rates.iter().copied().max().unwrap_or(0);
        let bdp = self.min_rtt.map_or(0, |(rtt, _)| {
            (u128::from(rate) * rtt.as_nanos() / 1_000_000_000) as u64
        });
        bdp + QUEUE_BYTES
    }
}

impl LinkWindow {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock()
    }

    /// A TCP packet from the client on `flow` saying it has everything
    /// before `high` (`client_ack`).
    pub fn on_ack(&self, flow: u64, high: u32, now: Instant) {
        let mut s = self.lock();
        let s = &mut *s;
        match s.flows.iter_mut().find(|f| f.hash == flow) {
            Some(f) => {
                if after(high, f.ack) {
                    s.delivered += u64::from(high.wrapping_sub(f.ack));
                    f.ack = high;
                    if after(high, f.snd_max) {
                        f.snd_max = high;
                    }
                }
                f.last = now;
            }
            None => {
                let f = Flow {
                    hash: flow,
                    snd_max: high,
                    ack: high,
                    last: now,
                };
                if s.flows.len() < FLOWS {
                    s.flows.push(f);
                } else if let Some(old) = s.flows.iter_mut().min_by_key(|f| f.last) {
                    *old = f;
                }
            }
        }
        if let Some(p) = s.probe
            && p.flow == flow
            && !after(p.seq, high)
        {
            s.probe = None;
            let rtt = now
                .saturating_duration_since(p.sent)
                .max(Duration::from_micros(1));
            if s.min_rtt.is_none_or(|(min, at)| {
                rtt <= min || now.saturating_duration_since(at) > MIN_RTT_LIFETIME
            }) {
                s.min_rtt = Some((rtt, now));
            }
            let bytes = s.delivered - p.delivered;
            s.rates[s.next_rate] = (u128::from(bytes) * 1_000_000_000 / rtt.as_nanos()) as u64;
            s.next_rate = (s.next_rate + 1) % RATE_SAMPLES;
        }
    }

    /// Bytes the client has acknowledged so far (taken when a packet is
    /// held, for [`Self::count_overdue`]).
    pub fn delivered(&self) -> u64 {
        self.lock().delivered
    }

    /// A held packet went at [`MAX_WAIT`], its window still full; the
    /// client had acknowledged `delivered` bytes when it was held. If it
    /// acknowledged nothing since, it counts: past [`OVERDUE_PER_SEC`] in a
    /// second, holds stop for [`NO_HOLD`]. Returns whether they stopped
    /// now.
    pub fn count_overdue(&self, now: Instant, delivered: u64) -> bool {
        let mut s = self.lock();
        if s.delivered != delivered {
            return false;
        }
        if now.saturating_duration_since(s.overdue.0) >= Duration::from_secs(1) {
            s.overdue = (now, 0);
        }
        s.overdue.1 += 1;
        if s.overdue.1 >= OVERDUE_PER_SEC {
            s.overdue = (now, 0);
            s.no_hold_until = Some(now + NO_HOLD);
            return true;
        }
        false
    }

    /// Whether `flow`'s data from `start` to `end` may go to the client
    /// now: it fits in the client's window, or it is no new data (a
    /// retransmission fills the hole the client's ACKs are stuck at), or
    /// the flow is not tracked. `overdue` (the sender has held it for
    /// [`MAX_WAIT`]) sends it regardless, as does a client whose holds
    /// stopped ([`Self::count_overdue`]). What it admits counts as sent.
    pub fn admit(&self, flow: u64, start: u32, end: u32, now: Instant, overdue: bool) -> bool {
        let mut s = self.lock();
        let overdue = overdue || s.no_hold_until.is_some_and(|t| now < t);
        // Only flows the client has acknowledged are tracked, and only new
        // data waits.
        let Some(i) = s
            .flows
            .iter()
            .position(|f| f.hash == flow && after(end, f.snd_max))
        else {
            return true;
        };
        let bytes = u64::from(end.wrapping_sub(start));
        let flight = s.in_flight(now);
        if !overdue && flight != 0 && flight + bytes > s.window() {
            return false;
        }
        s.flows[i].snd_max = end;
        let delivered = s.delivered;
        // Timed to the ACK of its first byte: the round trip without the
        // time the client takes for the rest of the burst.
        if s.probe.is_none() {
            s.probe = Some(Probe {
                flow,
                seq: start.wrapping_add(1),
                sent: now,
                delivered,
            });
        }
        true
    }
}

/// A hash naming a TCP flow the same both ways: FNV-1a over the client's
/// address and port, then the other end's.
fn flow_hash(p: &[u8], s: &Seg, from_client: bool) -> u64 {
    let (addrs, ports) = gro::flow(p, s);
    let (src, dst) = addrs.split_at(addrs.len() / 2);
    let (sport, dport) = ports.split_at(2);
    let [a, b, c, d] = if from_client {
        [src, sport, dst, dport]
    } else {
        [dst, dport, src, sport]
    };
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &x in a.iter().chain(b).chain(c).chain(d) {
        h = (h ^ u64::from(x)).wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

/// The flow of a TCP segment `p` (parsed as `s`) from a client, if it
/// carries an ACK, and the highest sequence number it says the client has:
/// its ACK number, or the right edge of a SACK block beyond it (what
/// arrived after a loss).
pub(crate) fn client_ack(p: &[u8], s: &Seg) -> Option<(u64, u32)> {
    if s.flags & gro::ACK == 0 {
        return None;
    }
    let be32 = |b: &[u8]| u32::from_be_bytes([b[0], b[1], b[2], b[3]]);
    let mut high = s.ack;
    let mut opts = &p[s.ihl + 20..s.hdr_len];
    while let Some((&kind, rest)) = opts.split_first() {
        match kind {
            0 => break,
            1 => opts = rest,
            _ => {
                let len = usize::from(rest.first().copied().unwrap_or(0));
                if len < 2 || len > opts.len() {
                    break;
                }
                if kind == 5 {
                    for block in opts[2..len].chunks_exact(8) {
                        let right = be32(&block[4..]);
                        if after(right, high) {
                            high = right;
                        }
                    }
                }
                opts = &opts[len..];
            }
        }
    }
    Some((flow_hash(p, s, true), high))
}

/// The flow, first sequence number and data length of a TCP packet to a
/// client (a whole TSO packet: all its segments' data); `None` without
/// data or if it is not TCP.
pub fn tcp_data(p: &[u8]) -> Option<(u64, u32, u32)> {
    let s = gro::parse(p).filter(|s| s.payload > 0)?;
    Some((flow_hash(p, &s, false), s.seq, s.payload as u32))
}

#[cfg(test)]
mod tests {
    use super::*;

    const CLIENT: [u8; 4] = [198, 19, 0, 2];
    const SERVER: [u8; 4] = [198, 18, 2, 1];

    /// An IPv4 TCP packet; `to_client` decides the direction. `opts` are
    /// TCP options (a multiple of 4 bytes).
    fn tcp(to_client: bool, port: u16, seq: u32, ack: u32, opts: &[u8], data: usize) -> Vec<u8> {
        let hl = 20 + opts.len();
        let mut p = vec![0u8; 20 + hl + data];
        let total = p.len() as u16;
        p[0] = 0x45;
        p[2..4].copy_from_slice(&total.to_be_bytes());
        p[9] = 6;
        let (src, dst, sport, dport) = if to_client {
            (SERVER, CLIENT, 5201, port)
        } else {
            (CLIENT, SERVER, port, 5201)
        };
        p[12..16].copy_from_slice(&src);
        p[16..20].copy_from_slice(&dst);
        p[20..22].copy_from_slice(&sport.to_be_bytes());
        p[22..24].copy_from_slice(&dport.to_be_bytes());
        p[24..28].copy_from_slice(&seq.to_be_bytes());
        p[28..32].copy_from_slice(&ack.to_be_bytes());
        p[32] = ((hl / 4) as u8) << 4;
        p[33] = 0x10;
        p[40..40 + opts.len()].copy_from_slice(opts);
        p
    }

    /// [`client_ack`] of a packet from the client.
    fn tcp_ack(p: &[u8]) -> Option<(u64, u32)> {
        client_ack(p, &gro::parse(p)?)
    }

    /// TCP options NOP NOP SACK with one block, NOP NOP.
    fn sack(left: u32, right: u32) -> Vec<u8> {
        let mut o = vec![1, 1, 5, 10];
        o.extend_from_slice(&left.to_be_bytes());
        o.extend_from_slice(&right.to_be_bytes());
        o.extend_from_slice(&[1, 1]);
        o
    }

    fn ack(w: &LinkWindow, port: u16, n: u32, now: Instant) {
        let (f, h) = tcp_ack(&tcp(false, port, 1, n, &[], 0)).unwrap();
        w.on_ack(f, h, now);
    }

    /// Sends `len` bytes at `seq` on `port`, in TSO packets of at most
    /// 64000 bytes, as far as the window admits them; whether it admitted
    /// them all.
    fn send(w: &LinkWindow, port: u16, seq: u32, len: usize) -> bool {
        let mut sent = 0;
        while sent < len {
            let n = (len - sent).min(64_000);
            let p = tcp(true, port, seq.wrapping_add(sent as u32), 1, &[], n);
            let (f, s, d) = tcp_data(&p).unwrap();
            if !w.admit(f, s, s.wrapping_add(d), Instant::now(), false) {
                return false;
            }
            sent += n;
        }
        true
    }

    /// Audit M3: a client whose window never opens makes its worker wait
    /// MAX_WAIT per packet, for everyone on that worker. After
    /// OVERDUE_PER_SEC such waits in a second its packets are not held for
    /// NO_HOLD; then holding resumes.
    #[test]
    fn a_client_whose_window_never_opens_is_not_held_for_long() {
        let w = full_window();
        let t0 = Instant::now();
        let ms = |n: u64| t0 + Duration::from_millis(n);
        // New data that does not fit: held, until the budget is spent.
        let mut seq = 131072u32;
        let mut fits = |at| {
            // The client's ACKs keep the flow fresh without making room.
            ack(&w, 40000, 0, at);
            let (f, s, d) = tcp_data(&tcp(true, 40000, seq, 1, &[], 1000)).unwrap();
            seq += 1000;
            w.admit(f, s, s.wrapping_add(d), at, false)
        };
        assert!(!fits(ms(0)));
        let d = w.delivered();
        for i in 1..OVERDUE_PER_SEC {
            assert!(!w.count_overdue(ms(u64::from(i)), d));
        }
        assert!(!fits(ms(20)), "still held");
        assert!(w.count_overdue(ms(50), d), "the budget is spent");
        assert!(fits(ms(51)), "not held any more");
        assert!(fits(ms(50) + NO_HOLD - Duration::from_millis(1)));
        assert!(!fits(ms(50) + NO_HOLD), "held again");
        // Overdue packets spread thinner than the budget never stop holds,
        // nor do late ones of a client whose ACKs come.
        let w = full_window();
        let d = w.delivered();
        for i in 0..100u64 {
            assert!(!w.count_overdue(t0 + Duration::from_millis(200 * i), d));
        }
        ack(&w, 40000, 1000, t0);
        for i in 0..100u64 {
            assert!(!w.count_overdue(t0 + Duration::from_millis(i), d));
        }
    }

    /// A window with flow 40000 acknowledged up to 0 and the allowance
    /// (128 KiB) in flight on it.
    fn full_window() -> LinkWindow {
        let w = LinkWindow::default();
        ack(&w, 40000, 0, Instant::now());
        assert!(send(&w, 40000, 0, 131072));
        w
    }

    #[test]
    fn parses_both_directions_of_a_flow_and_sack_blocks() {
        let (f_ack, high) = tcp_ack(&tcp(false, 40000, 1, 5000, &[], 0)).unwrap();
        assert_eq!(high, 5000);
        let (f_data, seq, len) = tcp_data(&tcp(true, 40000, 7000, 1, &[], 1300)).unwrap();
        assert_eq!(
            (f_data, seq, len),
            (f_ack, 7000, 1300),
            "same flow both ways"
        );
        let (other, _) = tcp_ack(&tcp(false, 40001, 1, 5000, &[], 0)).unwrap();
        assert_ne!(other, f_ack);
        // NOP NOP SACK(10) with one block 6000..9000: the client has up to 9000.
        let mut sack = vec![1, 1, 5, 10];
        sack.extend_from_slice(&6000u32.to_be_bytes());
        sack.extend_from_slice(&9000u32.to_be_bytes());
        sack.extend_from_slice(&[1, 1]);
        assert_eq!(
            tcp_ack(&tcp(false, 40000, 1, 5000, &sack, 0)).unwrap().1,
            9000
        );
        // A bad option length ends parsing, keeping what was read.
        let bad = [5u8, 40, 0, 0];
        assert_eq!(
            tcp_ack(&tcp(false, 40000, 1, 5000, &bad, 0)).unwrap().1,
            5000
        );
        // Pure ACKs carry no data to pace; no ACK flag, nothing to learn.
        assert_eq!(tcp_data(&tcp(true, 40000, 7000, 1, &[], 0)), None);
        let mut syn = tcp(false, 40000, 1, 0, &[], 0);
        syn[33] = 0x02;
        assert_eq!(tcp_ack(&syn), None);
        let mut udp = tcp(false, 40000, 1, 0, &[], 0);
        udp[9] = 17;
        assert_eq!(tcp_ack(&udp), None);
    }

    #[test]
    fn new_data_beyond_the_window_waits_for_acks() {
        let w = LinkWindow::default();
        let t = Instant::now();
        ack(&w, 40000, 1000, t);
        // 128 KiB in flight: the allowance, admitted.
        assert!(send(&w, 40000, 1000, 65536));
        assert!(send(&w, 40000, 66536, 65536));
        // One byte more waits for an ACK...
        assert!(!send(&w, 40000, 132072, 1400));
        // ...or until the sender has held it for MAX_WAIT.
        let p = tcp(true, 40000, 132072, 1, &[], 1400);
        let (f, s, d) = tcp_data(&p).unwrap();
        assert!(w.admit(f, s, s + d, Instant::now(), true));
        // A retransmission never waits.
        assert!(send(&w, 40000, 1000, 1400));
        // An untracked flow (no ACK seen yet) is not held.
        assert!(send(&w, 40001, 1, 65536));
    }

    #[test]
    fn an_ack_opens_the_window() {
        let w = full_window();
        assert!(!send(&w, 40000, 131072, 1400));
        ack(&w, 40000, 1400, Instant::now());
        assert!(
            send(&w, 40000, 131072, 1400),
            "room for what was acknowledged"
        );
        assert!(!send(&w, 40000, 132472, 1400), "and no more");
    }

    #[test]
    fn sacked_data_is_not_in_flight() {
        let w = full_window();
        // The first segment was lost; the client has everything after it.
        let opts = sack(1400, 131072);
        let (f, h) = tcp_ack(&tcp(false, 40000, 1, 0, &opts, 0)).unwrap();
        w.on_ack(f, h, Instant::now());
        assert!(send(&w, 40000, 131072, 65536));
    }

    #[test]
    fn a_flow_without_acks_stops_counting() {
        let w = full_window();
        assert!(!send(&w, 40000, 131072, 1400), "window full");
        // Sending does not keep a flow alive: once its last ACK is STALE
        // old, a client withholding ACKs holds nobody.
        w.lock().flows[0].last = Instant::now() - STALE * 2;
        assert!(send(&w, 40000, 131072, 65536));
        // Nor does it count against the client's other flows.
        ack(&w, 40001, 0, Instant::now());
        assert!(send(&w, 40001, 0, 65536));
    }

    #[test]
    fn the_window_grows_with_the_path() {
        let w = LinkWindow::default();
        let t0 = Instant::now();
        ack(&w, 40000, 0, t0);
        assert!(send(&w, 40000, 0, 1400));
        // A 20 ms path delivering 12.5 MB/s (100 Mbit/s): the probe sent
        // above comes back with 250 KB delivered.
        let t1 = t0 + Duration::from_millis(20);
        {
            let mut s = w.lock();
            s.probe.as_mut().unwrap().sent = t0;
        }
        ack(&w, 40000, 250_000, t1);
        let s = w.lock();
        let rtt = s.min_rtt.unwrap().0;
        assert!(rtt >= Duration::from_millis(19), "{rtt:?}");
        let window = s.window();
        assert!(
            (240_000 + QUEUE_BYTES..=260_000 + QUEUE_BYTES).contains(&window),
            "bandwidth-delay product plus the allowance: {window}"
        );
    }
}
