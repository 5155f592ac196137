//! The packet workers: a thread per core, each with a TUN queue, which
//! move packets between the tunnel device and the clients' DTLS channels.
//!
//! A worker polls its TUN queue and its DTLS socket (one per worker, the
//! kernel spreads clients over them, `dtls/mod.rs`), and takes turns: a batch
//! of datagrams from clients (opened and written to its queue), then what
//! the device has for clients. A packet for a DTLS client is cut into the
//! client's packets (`packet/gso.rs`), sealed in a send slot and sent with the
//! others in one `sendmmsg`; one for a TLS client goes to its tunnel's
//! queue.
//!
//! The TLS tunnels run on the async runtime and write to a queue of their
//! own, the last, which a task on the runtime reads (`tls_reader`): the
//! kernel steers their flows' replies there (`datapath/tun.rs`), so a server's ACK
//! reaches its tunnel task without waking another thread.
//!
//! One thread for both directions is what makes a download cheap. The
//! client's ACKs arrive on the socket; written to the device, they make the
//! server's TCP send its next data into the TUN queue during that very
//! write; the same thread reads and sends it without a wake-up in between.
//! Separate receive and read threads cost two context switches and a futex
//! hand-over for every ACK that opened the client's window.
//!
//! Download flow control (`dtls/flow_control.rs`) holds new TCP data while the
//! client's window is full, until the client's ACKs make room or it has
//! waited `MAX_WAIT`: in a queue of that client's (`dtls/held.rs`), so the
//! worker goes on reading its TUN queue for everybody else.

use std::{
    io::{self, Read},
    os::fd::AsRawFd,
    sync::Arc,
    time::{Duration, Instant},
};

use tokio::io::unix::AsyncFd;

use crate::{
    datapath::tun::READ_MAX,
    packet::gro::VNET_HDR_LEN,
    packet::gso::Packets,
    packet::ip::packet_dst,
    session::SessionTable,
    transport::dtls::{
        DtlsServer, Link, PACKET_MAX, PACKET_OFFSET, Paced,
        batch::SendBatch,
        held::{Full, HeldQueues, TcpData},
    },
};

/// Device reads before a worker looks at the socket again. (Bounding the
/// burst by time as well, 500 us, cost 5-10% of DTLS throughput on the
/// bench, both ways.)
const READ_BURST: usize = 64;

/// The TUN queues to create: one per core (at most 8) for the workers,
/// and the TLS tunnels' queue.
pub fn tun_queues() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get().min(8)) + 1
}

/// How many workers serve `tun`: one per queue but the last, at least one
/// (with a single queue, worker 0 reads the TLS tunnels' too).
pub fn count(tun: &crate::datapath::tun::Tun) -> usize {
    tun.tls_queue().max(1)
}

/// Starts the workers ([`count`]), and the TLS queue's reader on `rt`.
/// Workers run for the daemon's life; one that panics on some packet logs
/// it and starts over, so one bad packet does not end the tunnel for
/// everybody. Handshakes are spawned on `rt`.
/// What the workers move packets between: the tunnel device's queues, the
/// sessions (a packet's destination finds its client) and the DTLS server.
#[derive(Clone)]
pub struct Wiring {
    pub tun: Arc<crate::datapath::tun::Tun>,
    pub sessions: Arc<SessionTable>,
    pub dtls: Option<Arc<DtlsServer>>,
}

pub fn start(gw: &Wiring, rt: &tokio::runtime::Handle) -> io::Result<()> {
    let tls = gw.tun.tls_queue();
    if tls > 0 {
        rt.spawn(tls_reader(gw.clone(), tls));
    }
    for q in 0..count(&gw.tun) {
        let gw = gw.clone();
        let rt = rt.clone();
        std::thread::Builder::new()
            .name(format!("vpnd-worker{q}"))
            .spawn(move || {
                let _rt = rt.enter();
                // Coalescing waits and window holds are a few hundred
                // microseconds: wake on time, not up to 50 us late.
                // SAFETY: prctl with an integer argument, for this thread.
                unsafe { libc::prctl(libc::PR_SET_TIMERSLACK, 1000 as libc::c_ulong) };
                loop {
                    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| run(&gw, q)));
                    let why = match &r {
                        Err(p) => p
                            .downcast_ref::<&str>()
                            .map(|s| s.to_string())
                            .or_else(|| p.downcast_ref::<String>().cloned())
                            .unwrap_or_else(|| "a panic without a message".into()),
                        Ok(()) => "it returned".into(),
                    };
                    tracing::error!(queue = q, "packet worker panicked ({why}); restarting it");
                    std::thread::sleep(Duration::from_millis(10));
                }
            })?;
    }
    Ok(())
}

/// Worker `q`'s loop.
fn run(gw: &Wiring, q: usize) {
    let dtls = gw.dtls.clone();
    let mut rx = dtls.as_ref().map(|d| d.receiver(q));
    let mut reader = Reader::new(q);
    let tun_fd = gw.tun.queue(q).as_raw_fd();
    let udp_fd = rx.as_ref().map_or(-1, |rx| rx.fd());
    // Receive coalescing (`dtls/mod.rs`): the socket rests until then; the
    // queue is served meanwhile.
    let mut rest_until: Option<Instant> = None;
    loop {
        let now = Instant::now();
        if rest_until.is_some_and(|t| t <= now) {
            rest_until = None;
        }
        let mut fds = [
            libc::pollfd {
                fd: tun_fd,
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: udp_fd,
                events: if rest_until.is_some() {
                    0
                } else {
                    libc::POLLIN
                },
                revents: 0,
            },
        ];
        let paced_due = rx.as_mut().and_then(|rx| rx.paced().next_due());
        let wake = [reader.deadline(), rest_until, paced_due]
            .into_iter()
            .flatten()
            .min();
        let timeout = wake.map(|d| {
            let left = d.saturating_duration_since(now);
            libc::timespec {
                tv_sec: left.as_secs() as libc::time_t,
                tv_nsec: left.subsec_nanos().into(),
            }
        });
        let t = timeout.as_ref().map_or(std::ptr::null(), |t| t as *const _);
        // SAFETY: `fds` and `t` outlive the call; no signal mask.
        let r = unsafe { libc::ppoll(fds.as_mut_ptr(), 2, t, std::ptr::null()) };
        if r < 0 {
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::Interrupted {
                tracing::warn!(queue = q, "poll: {e}");
                std::thread::sleep(Duration::from_millis(10));
            }
            continue;
        }
        // Rate-limited clients' packets whose time has come, first: a
        // client's later packets must not overtake them.
        if let (Some(d), Some(rx)) = (&dtls, &mut rx) {
            d.release_paced(rx.paced(), &mut reader.out, q, Some(q), Instant::now());
        }
        if let (Some(d), Some(rx)) = (&dtls, &mut rx)
            && fds[1].revents != 0
            && d.receive(rx) == Some(true)
        {
            rest_until = Some(Instant::now() + d.coalesce());
        }
        if fds[0].revents != 0 || !reader.held.is_empty() {
            reader.run(gw, dtls.as_ref(), rx.as_mut().map(|rx| rx.paced()));
        }
    }
}

/// A packet that has to wait for its client's window, or behind its
/// client's packets that do.
struct Wait {
    link: Arc<Link>,
    tcp: Option<TcpData>,
}

/// Reads a TUN queue and passes each packet on to its client.
struct Reader {
    queue: usize,
    buf: Vec<u8>,
    out: SendBatch,
    /// What waits for clients' windows.
    held: HeldQueues,
}

impl Reader {
    fn new(queue: usize) -> Self {
        Reader {
            queue,
            buf: vec![0u8; READ_MAX],
            out: SendBatch::default(),
            held: HeldQueues::default(),
        }
    }

    /// When a held packet goes regardless of its client's window.
    fn deadline(&self) -> Option<Instant> {
        self.held.deadline()
    }

    /// Sends what waited for clients' windows and may go now, then reads
    /// the queue until it is empty or for [`READ_BURST`] reads; what has to
    /// wait joins its client's queue.
    fn run(&mut self, gw: &Wiring, dtls: Option<&Arc<DtlsServer>>, mut paced: Option<&mut Paced>) {
        if let Some(d) = dtls
            && !self.held.is_empty()
        {
            let (queue, out) = (self.queue, &mut self.out);
            let done = self.held.release(Instant::now(), |link, read| {
                let (vnet, pkt) = read.split_at(VNET_HDR_LEN);
                if let Ok(pkts) = Packets::parse(vnet, pkt) {
                    seal(d, Some(queue), link, &pkts, out);
                }
            });
            d.count_released(&done);
        }
        let mut file = gw.tun.queue(self.queue);
        let mut passed_while_held = 0;
        for _ in 0..READ_BURST {
            let n = match file.read(&mut self.buf) {
                Ok(n) if n > VNET_HDR_LEN => n,
                Ok(_) => continue,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => {
                    tracing::debug!("reading {}: {e}", gw.tun.name());
                    break;
                }
            };
            let read = &self.buf[..n];
            let wait = dispatch(
                gw,
                dtls,
                read,
                &mut self.out,
                paced.as_deref_mut(),
                Some((self.queue, &self.held)),
            );
            match (wait, dtls) {
                (Some(w), Some(d)) => {
                    let pushed = self
                        .held
                        .push(w.link, &mut self.buf, n, w.tcp, Instant::now());
                    if let Err(full) = pushed {
                        d.count_hold_drop(full == Full::Client);
                    }
                    // The client's ACKs make the room: the socket first,
                    // then the next read (the queue stays polled).
                    break;
                }
                _ if !self.held.is_empty() => passed_while_held += 1,
                _ => {}
            }
        }
        if let Some(d) = dtls {
            d.count_passed_while_held(passed_while_held);
            d.flush(&mut self.out);
        }
    }
}

/// Passes a packet read from the device (`read`: virtio-net header and
/// packet, which may be one large TCP packet) on to its client; `Some` if
/// it has to wait for the client's window, or behind packets of that
/// client's which wait in `worker`'s queues. Only a packet `worker` (its
/// number and queues) may hold a packet (the TLS queue's reader, `None`,
/// sends at once). A DTLS client with a download limit gets its packets
/// through `paced`.
fn dispatch(
    gw: &Wiring,
    dtls: Option<&Arc<DtlsServer>>,
    read: &[u8],
    out: &mut SendBatch,
    paced: Option<&mut Paced>,
    worker: Option<(usize, &HeldQueues)>,
) -> Option<Wait> {
    let (vnet, pkt) = read.split_at(VNET_HDR_LEN);
    let pkts = match Packets::parse(vnet, pkt) {
        Ok(p) if p.max_len() <= PACKET_MAX => p,
        Ok(_) => return None,
        Err(e) => {
            tracing::debug!("packet from {}: {}", gw.tun.name(), e.0);
            return None;
        }
    };
    let s = gw.sessions.by_addr(&packet_dst(pkts.packet())?)?;
    s.touch();
    let rate = s.rate_down_bps.load(std::sync::atomic::Ordering::Relaxed);
    let (worker, held) = worker.unzip();
    match dtls.and_then(|d| Some((d, d.link_for(s.id)?))) {
        // Behind what waits for the client: its packets keep their order.
        Some((_, link)) if held.is_some_and(|h| h.holds(&link)) => {
            let tcp = tcp_data(pkts.packet());
            return Some(Wait { link, tcp });
        }
        // Rate-limited: each packet now or when it conforms.
        Some((d, link)) if rate != 0 => {
            let paced = paced?;
            let now = Instant::now();
            let mut p = vec![0u8; pkts.max_len()];
            for i in 0..pkts.count() {
                let len = pkts.write(i, &mut p);
                d.pace_down(&link, &p[..len], rate, now, paced, out, worker);
            }
        }
        Some((d, link)) => {
            // New TCP data waits while the client's window is full.
            if let Some(t) = tcp_data(pkts.packet())
                && !link
                    .window
                    .admit(t.flow, t.start, t.end, Instant::now(), held.is_none())
            {
                // What is sealed goes out first: the client's ACKs for it
                // make the room.
                d.flush(out);
                return Some(Wait { link, tcp: Some(t) });
            }
            seal(d, worker, &link, &pkts, out);
        }
        // TLS: its tunnel's queue (and pacer).
        None => {
            for i in 0..pkts.count() {
                let mut p = vec![0u8; pkts.max_len()];
                let len = pkts.write(i, &mut p);
                p.truncate(len);
                s.deliver(p);
            }
        }
    }
    None
}

/// Reads the TLS tunnels' queue on the runtime. What it finds for a DTLS
/// client (a flow the kernel spread here because no worker has written
/// any of it lately) is sent without waiting for the client's window, or
/// paced here if the client is rate-limited.
async fn tls_reader(gw: Wiring, q: usize) {
    // SAFETY: the duplicate is ours and closes only with the AsyncFd.
    let fd = gw.tun.queue(q).try_clone();
    let fd = match fd.and_then(|f| unsafe { AsyncFd::register(f) }.map_err(|e| e.into_parts().1)) {
        Ok(fd) => fd,
        Err(e) => {
            tracing::error!("reading {} queue {q}: {e}", gw.tun.name());
            return;
        }
    };
    let dtls = gw.dtls.clone();
    let mut out = SendBatch::default();
    let mut paced = Paced::default();
    let mut buf = vec![0u8; READ_MAX];
    loop {
        let due = paced.next_due();
        let readable = tokio::select! {
            r = fd.readable() => Some(r),
            _ = tokio::time::sleep_until(due.unwrap_or_else(Instant::now).into()), if due.is_some() => None,
        };
        if let Some(d) = &dtls {
            d.release_paced(&mut paced, &mut out, q, None, Instant::now());
        }
        let mut guard = match readable {
            None => continue,
            Some(Ok(g)) => g,
            Some(Err(e)) => {
                tracing::error!("reading {}: {e}", gw.tun.name());
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        loop {
            let n = match guard.try_io(|f| f.get_ref().read(&mut buf)) {
                Ok(Ok(n)) if n > VNET_HDR_LEN => n,
                Ok(Ok(_)) => continue,
                Ok(Err(e)) => {
                    tracing::debug!("reading {}: {e}", gw.tun.name());
                    break;
                }
                // Drained; readiness re-armed.
                Err(_would_block) => break,
            };
            dispatch(
                &gw,
                dtls.as_ref(),
                &buf[..n],
                &mut out,
                Some(&mut paced),
                None,
            );
        }
        if let Some(d) = &dtls {
            d.flush(&mut out);
        }
    }
}

/// New TCP data in `p`: its flow and sequence range.
fn tcp_data(p: &[u8]) -> Option<TcpData> {
    let (flow, start, data) = crate::transport::dtls::flow_control::tcp_data(p)?;
    Some(TcpData {
        flow,
        start,
        end: start.wrapping_add(data),
    })
}

/// Writes each of `pkts` straight into a send slot and seals it there;
/// counts them for `worker`.
fn seal(d: &DtlsServer, worker: Option<usize>, link: &Link, pkts: &Packets, out: &mut SendBatch) {
    let path = link.path();
    for i in 0..pkts.count() {
        let len = pkts.write(i, &mut out.slot()[PACKET_OFFSET..]);
        d.seal_into(link, path, out, len);
    }
    if let Some(w) = worker {
        d.count_sent(w, pkts.count());
    }
}
