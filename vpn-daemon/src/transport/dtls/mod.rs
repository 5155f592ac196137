//! The DTLS data channel, in both modes clients use:
//! - PSK-NEGOTIATE (openconnect, ocserv): the PSK is the TLS connection's
//!   RFC 5705 exporter;
//! - session resumption (Cisco clients; openconnect with X-DTLS12 ciphers):
//!   the client picks the master secret (`X-DTLS-Master-Secret`), we pick the
//!   session id and suite, and the DTLS 1.2 handshake "resumes" a session
//!   we place in OpenSSL's session cache beforehand.
//!
//! At CONNECT the gateway derives a 32-byte PSK from the TLS connection
//! (RFC 5705 exporter, label `EXPORTER-openconnect-psk`, no context) and
//! announces a random App-ID. The client's DTLS 1.2 ClientHello carries the
//! App-ID as its session id: that is how a new UDP peer is matched to its
//! session before OpenSSL sees the datagram. Records then carry one type
//! byte (CSTP numbering) and one IP packet.
//!
//! OpenSSL (system OpenSSL 3 through the `openssl` crate) does the
//! handshake: rustls has no DTLS. Each handshaking peer is a task driving a
//! non-blocking `SslStream` over [`DatagramIo`]. Once established, the
//! channel's keys go to our own record layer ([`record`]) and packets no
//! longer leave the packet worker that received them (`transport/workers.rs`): it
//! reads datagrams in batches (`recvmmsg`), opens records in place and
//! writes the packets to the tunnel device, and seals packets the device
//! has for clients in place and sends them in batches (`sendmmsg`). A
//! client whose address changes (NAT rebinding) is followed once a record
//! from the new address authenticates.
//!
//! Here: the server, its sockets and offers, and the receive path the
//! workers run (datagram → channel, handshake task or rebinding trial →
//! opened packet → tunnel device). Beside it: [`handshake`] (what each
//! offer allows, the ClientHello parse), [`task`] (the per-peer task
//! running OpenSSL), [`link`] (an established channel), [`peers`] (who is
//! who by address), [`record`] (the record layer), [`batch`]
//! (`recvmmsg`/`sendmmsg`), [`flow_control`], [`held`] (what waits for a
//! client's window) and [`paced`].

pub mod batch;
pub mod flow_control;
pub mod handshake;
pub mod held;
pub mod link;
pub mod paced;
pub mod peers;
pub mod record;
pub mod task;

use handshake::{Offered, client_hello_session_id, is_client_hello, server_context};
pub use link::{Link, UnusableChannel};
pub use paced::Paced;
pub use peers::HandshakeLimits;
use peers::{HandshakeRefused, Kind, Peers, Route, TrialBudget};
use task::Handshaking;
pub use task::{ChannelEnd, DatagramIo};

use std::{
    collections::HashMap,
    io,
    net::{IpAddr, SocketAddr},
    os::fd::{AsRawFd, RawFd},
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::Context as _;
use openssl::ssl::SslContext;
use parking_lot::{Mutex, RwLock};
use std::net::UdpSocket;

use tokio::sync::mpsc;
use tracing::Instrument as _;

use crate::{
    api::{FlowControlStats, HandshakeStats, RxStats, WorkerStats},
    proto::cstp::FrameType,
    session::Session,
};

/// Requested UDP socket buffer size (the kernel caps it at rmem_max/wmem_max).
const SOCKET_BUFFER: usize = 8 << 20;
/// A receive batch with this much data (about eight full-size records) is
/// bulk traffic, worth coalescing.
const BULK_BATCH_BYTES: usize = 12_000;

/// The exporter label openconnect uses for the DTLS PSK.
pub const PSK_LABEL: &[u8] = b"EXPORTER-openconnect-psk";

/// A session's DTLS offer: what a ClientHello with this App-ID (PSK mode)
/// or session id (resumption mode) gets.
struct Offer {
    session: Arc<Session>,
    /// The one handshake it allows.
    handshake: Offered,
}

/// The UDP side of the gateway.
pub struct DtlsServer {
    /// One socket per packet worker, all bound to the port
    /// (`SO_REUSEPORT`): the kernel gives each client's datagrams to one
    /// of them by a hash of its address and port, so clients spread over
    /// the workers. Sends go out of the first.
    sockets: Vec<Arc<UdpSocket>>,
    ctx: SslContext,
    offers: Mutex<HashMap<[u8; 32], Offer>>,
    peers: Mutex<Peers<Arc<Link>, mpsc::Sender<Vec<u8>>>>,
    /// Each session's established channel, by session id: where packets
    /// to its client go rather than over TLS.
    links: RwLock<HashMap<u64, Arc<Link>>>,
    /// Handshakes in progress at most (`[dtls]`).
    handshake_limits: HandshakeLimits,
    tun: Arc<crate::datapath::tun::Tun>,
    port: u16,
    /// DTLS dead-peer interval: the channel closes after 3 silent ones.
    dpd: Duration,
    /// Trial decryptions for records from unknown addresses, per source.
    rebind_budget: Mutex<TrialBudget>,
    /// Receive coalescing wait after a bulk batch (`dtls.rx_coalesce_usecs`).
    coalesce: Duration,
    /// Receive-path counters for `vpnctl stats`.
    counters: RxCounters,
    handshake_counters: HandshakeCounters,
    flow_control: FlowControlCounters,
    pacing: paced::PacingCounters,
    per_worker: Vec<WorkerCounters>,
    /// Send runs of equal-size records as one message (UDP GSO).
    udp_gso: bool,
}

/// One packet worker's counters ([`WorkerStats`]).
#[derive(Default)]
struct WorkerCounters {
    datagrams_in: AtomicU64,
    packets_out: AtomicU64,
}

/// What the workers received, for `vpnctl stats`: datagrams per batch
/// and how often coalescing waited show whether batching works.
#[derive(Default)]
struct RxCounters {
    batches: AtomicU64,
    /// (Send side) messages of several datagrams sent with UDP GSO.
    gso_messages: AtomicU64,
    coalesce_waits: AtomicU64,
    acks_thinned: AtomicU64,
    malformed: AtomicU64,
}

/// What became of ClientHellos and of records from unknown addresses.
#[derive(Default)]
struct HandshakeCounters {
    refused_total: AtomicU64,
    refused_per_source: AtomicU64,
    refused_per_offer: AtomicU64,
    refused_after: AtomicU64,
    rebind_trials_refused: AtomicU64,
    rebinds: AtomicU64,
    /// Established channels that still hold their `SslStream`.
    holding_openssl: std::sync::atomic::AtomicUsize,
}

/// How often workers held packets for clients' ACKs (`flow_control.rs`).
#[derive(Default)]
struct FlowControlCounters {
    waits: AtomicU64,
    wait_us: AtomicU64,
    holds_stopped: AtomicU64,
    dropped_client_full: AtomicU64,
    dropped_worker_full: AtomicU64,
    passed_while_held: AtomicU64,
}

/// Messages the next `recvmmsg` takes: a full batch after bulk data (an
/// upload); after anything else (client ACKs of a download) half of one,
/// since larger ACK batches reach the servers later and in clumps, and
/// their bursts back overflow the client (bench, a full batch always: 1490
/// vs 1720 Mbit/s down, 3 alternating runs).
fn recv_max(after_bulk: bool) -> usize {
    if after_bulk {
        batch::RECV_BATCH
    } else {
        batch::RECV_BATCH / 2
    }
}

impl DtlsServer {
    /// Binds the UDP port next to the TLS listener, with a socket for
    /// each of `workers` packet workers.
    pub async fn bind(
        addr: SocketAddr,
        workers: usize,
        tun: Arc<crate::datapath::tun::Tun>,
        dpd: Duration,
        coalesce: Duration,
        handshake_limits: HandshakeLimits,
        offloads: crate::datapath::offloads::Offloads,
    ) -> anyhow::Result<Arc<Self>> {
        let first = reuseport_socket(addr, offloads.udp_gro)?;
        // An ephemeral port (tests) is the first socket's for the others.
        let port = first.local_addr()?.port();
        let mut sockets = vec![Arc::new(first)];
        for _ in 1..workers.max(1) {
            let mut a = addr;
            a.set_port(port);
            sockets.push(Arc::new(reuseport_socket(a, offloads.udp_gro)?));
        }
        Ok(Arc::new(DtlsServer {
            port,
            sockets,
            ctx: server_context()?,
            offers: Mutex::new(HashMap::new()),
            peers: Mutex::new(Peers::default()),
            links: RwLock::new(HashMap::new()),
            handshake_limits,
            tun,
            dpd,
            rebind_budget: Mutex::new(TrialBudget::new(REBIND_TRIALS_PER_SEC)),
            coalesce,
            counters: RxCounters::default(),
            handshake_counters: HandshakeCounters::default(),
            flow_control: FlowControlCounters::default(),
            pacing: Default::default(),
            per_worker: (0..workers.max(1)).map(|_| Default::default()).collect(),
            udp_gso: offloads.udp_gso,
        }))
    }

    /// The receive counters so far.
    pub fn rx_stats(&self) -> RxStats {
        let c = &self.counters;
        RxStats {
            batches: c.batches.load(Ordering::Relaxed),
            datagrams: self
                .per_worker
                .iter()
                .map(|w| w.datagrams_in.load(Ordering::Relaxed))
                .sum(),
            coalesce_waits: c.coalesce_waits.load(Ordering::Relaxed),
            acks_thinned: c.acks_thinned.load(Ordering::Relaxed),
            malformed: c.malformed.load(Ordering::Relaxed),
            gso_messages: c.gso_messages.load(Ordering::Relaxed),
            workers: self
                .per_worker
                .iter()
                .map(|w| WorkerStats {
                    datagrams_in: w.datagrams_in.load(Ordering::Relaxed),
                    packets_out: w.packets_out.load(Ordering::Relaxed),
                })
                .collect(),
        }
    }

    /// The handshake counters so far.
    pub fn handshake_stats(&self) -> HandshakeStats {
        let c = &self.handshake_counters;
        let n = |a: &AtomicU64| a.load(Ordering::Relaxed);
        HandshakeStats {
            in_progress: self.peers.lock().handshakes(),
            max: self.handshake_limits.total,
            max_per_source: self.handshake_limits.per_source,
            refused_total: n(&c.refused_total),
            refused_per_source: n(&c.refused_per_source),
            refused_per_offer: n(&c.refused_per_offer),
            refused_after: n(&c.refused_after),
            holding_openssl: c.holding_openssl.load(Ordering::Relaxed),
            rebinds: n(&c.rebinds),
            rebind_trials_refused: n(&c.rebind_trials_refused),
        }
    }

    /// Session `session`'s established channel, if it has one: packets to
    /// its client go there.
    pub fn link_for(&self, session: u64) -> Option<Arc<Link>> {
        self.links.read().get(&session).cloned()
    }

    /// The client of `session` sends over TLS: if its DTLS channel has
    /// been silent for [`DTLS_FALLBACK_SILENCE`], UDP no longer gets
    /// through, and packets to it go over TLS too.
    pub fn fall_back_if_silent(&self, session: u64) {
        let silent = self
            .link_for(session)
            .filter(|l| l.silent_for() > DTLS_FALLBACK_SILENCE);
        if let Some(link) = silent {
            tracing::info!(
                user = link.session.user,
                "client sends over TLS and DTLS is silent: falling back to TLS"
            );
            self.close_session(session);
        }
    }

    /// Ends `session`'s channel, if it has one (the session ended, or fell
    /// back to TLS).
    pub fn close_session(&self, session: u64) {
        if let Some(link) = self.links.write().remove(&session) {
            link.close();
        }
    }

    /// Sends `out` on `fd`, with UDP GSO if it is on, and counts the
    /// messages that carried several datagrams.
    fn send(&self, fd: std::os::fd::RawFd, out: &mut batch::SendBatch) {
        out.flush(fd, self.udp_gso);
        let n = std::mem::take(&mut out.gso_messages);
        if n > 0 {
            self.counters.gso_messages.fetch_add(n, Ordering::Relaxed);
        }
    }

    /// Counts `n` packets worker `worker` sealed and sent to clients.
    pub fn count_sent(&self, worker: usize, n: usize) {
        if let Some(w) = self.per_worker.get(worker) {
            w.packets_out.fetch_add(n as u64, Ordering::Relaxed);
        }
    }

    /// The download flow-control counters so far.
    pub fn flow_control_stats(&self) -> FlowControlStats {
        let c = &self.flow_control;
        FlowControlStats {
            waits: c.waits.load(Ordering::Relaxed),
            wait_us: c.wait_us.load(Ordering::Relaxed),
            holds_stopped: c.holds_stopped.load(Ordering::Relaxed),
            dropped_client_full: c.dropped_client_full.load(Ordering::Relaxed),
            dropped_worker_full: c.dropped_worker_full.load(Ordering::Relaxed),
            passed_while_held: c.passed_while_held.load(Ordering::Relaxed),
        }
    }

    /// Counts what a worker's queues of held packets let go (`held.rs`).
    pub fn count_released(&self, r: &held::Released) {
        let c = &self.flow_control;
        if r.waits != 0 {
            c.waits.fetch_add(r.waits, Ordering::Relaxed);
            c.wait_us
                .fetch_add(r.waited.as_micros() as u64, Ordering::Relaxed);
        }
        if r.holds_stopped != 0 {
            c.holds_stopped
                .fetch_add(r.holds_stopped, Ordering::Relaxed);
            tracing::debug!(
                "DTLS flow control: holds stopped for a client whose window does not open"
            );
        }
    }

    /// Counts `n` packets for other clients passed on while a worker held
    /// some client's.
    pub fn count_passed_while_held(&self, n: u64) {
        if n != 0 {
            self.flow_control
                .passed_while_held
                .fetch_add(n, Ordering::Relaxed);
        }
    }

    /// Counts a packet dropped because its client's queue of held packets
    /// (`client_full`) or its worker's were full (`held.rs`).
    pub fn count_hold_drop(&self, client_full: bool) {
        let c = &self.flow_control;
        if client_full {
            &c.dropped_client_full
        } else {
            &c.dropped_worker_full
        }
        .fetch_add(1, Ordering::Relaxed);
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// Registers a session's PSK-mode offer; returns the App-ID to announce.
    pub fn offer(&self, session: Arc<Session>, psk: [u8; 32]) -> [u8; 32] {
        let mut app_id = [0u8; 32];
        rand::RngCore::fill_bytes(&mut rand::rngs::OsRng, &mut app_id);
        self.offers.lock().insert(
            app_id,
            Offer {
                session,
                handshake: Offered::Psk(psk),
            },
        );
        app_id
    }

    /// Registers a resumption-mode offer: a DTLS 1.2 session with the
    /// client's master secret, our session id and `suite`, placed in
    /// OpenSSL's cache so the client's ClientHello resumes it. Returns the
    /// session id to announce.
    pub fn offer_resumption(
        &self,
        session: Arc<Session>,
        master: &[u8; 48],
        suite: crate::proto::connect::ResumeSuite,
    ) -> Result<[u8; 32], handshake::ResumeError> {
        let mut sid = [0u8; 32];
        rand::RngCore::fill_bytes(&mut rand::rngs::OsRng, &mut sid);
        let cached = handshake::resumption_session(&self.ctx, master, &sid, suite)?;
        self.offers.lock().insert(
            sid,
            Offer {
                session,
                handshake: Offered::Resume {
                    session: cached,
                    suite,
                },
            },
        );
        Ok(sid)
    }

    /// Withdraws an offer (its TLS tunnel ended).
    pub fn withdraw(&self, id: &[u8; 32]) {
        if let Some(Offer {
            handshake: Offered::Resume { session: sess, .. },
            ..
        }) = self.offers.lock().remove(id)
        {
            // SAFETY: the session was added to this context's cache.
            unsafe { self.ctx.remove_session(&sess) };
        }
    }

    /// The socket sends leave from (any would do: all are bound alike).
    fn socket(&self) -> &Arc<UdpSocket> {
        &self.sockets[0]
    }

    /// Receive state for packet worker `worker`: its own socket, and TUN
    /// queue `worker` for what it receives.
    pub fn receiver(&self, worker: usize) -> Receiver {
        Receiver {
            fd: self.sockets[worker % self.sockets.len()].as_raw_fd(),
            batch: batch::RecvBatch::default(),
            w: Work {
                replies: batch::SendBatch::default(),
                scratch: vec![0u8; record::MAX_RECORD_LEN],
                gro: crate::packet::gro::Coalescer::default(),
                now: Instant::now(),
                worker,
                paced: Paced::default(),
            },
            max: recv_max(false),
        }
    }

    /// Takes a batch of datagrams off the socket without waiting and
    /// handles it: records of established channels are opened right there
    /// and their packets written to the tunnel device; handshakes go to a
    /// task per peer (on the runtime the caller entered) running OpenSSL.
    /// `None` if nothing was queued; otherwise whether the caller should
    /// wait [`Self::coalesce`] before the next batch.
    pub fn receive(self: &Arc<Self>, rx: &mut Receiver) -> Option<bool> {
        let Receiver { fd, batch, w, max } = rx;
        let fd = *fd;
        if let Err(e) = batch.recv(fd, *max) {
            match e.kind() {
                io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted => {}
                _ => tracing::warn!("dtls recv: {e}"),
            }
            return None;
        }
        let mut datagrams = 0;
        w.now = Instant::now();
        for i in 0..batch.len() {
            if let Some((from, local, d, seg)) = batch.get_mut(i) {
                // Each datagram of a merged message on its own; an empty
                // datagram has none and is ignored.
                for d in d.chunks_mut(seg) {
                    datagrams += 1;
                    self.datagram(from, local, d, w);
                }
            }
        }
        // What the batch merged or held goes to the kernel now.
        w.gro.finish(&mut crate::datapath::tun::TunSink {
            tun: &self.tun,
            queue: w.worker,
        });
        let c = &self.counters;
        c.batches.fetch_add(1, Ordering::Relaxed);
        if let Some(p) = self.per_worker.get(w.worker) {
            p.datagrams_in.fetch_add(datagrams, Ordering::Relaxed);
        }
        c.acks_thinned
            .fetch_add(std::mem::take(&mut w.gro.acks_thinned), Ordering::Relaxed);
        if !w.replies.is_empty() {
            self.send(fd, &mut w.replies);
        }
        // Adaptive receive coalescing, as NICs do it: a batch that brought
        // bulk data but did not fill up means a stream is running at about
        // our pace; waiting a moment lets the next batch gather more of it,
        // so merges grow, the server's TCP sees fewer and larger packets
        // and acknowledges less. Small batches (interactive traffic, ACKs)
        // and full ones (more is already queued) go straight back to the
        // socket.
        let bulk = batch.bytes() >= BULK_BATCH_BYTES;
        let full = batch.len() == *max;
        *max = recv_max(bulk);
        let coalesce = !self.coalesce.is_zero() && bulk && !full;
        if coalesce {
            c.coalesce_waits.fetch_add(1, Ordering::Relaxed);
        }
        Some(coalesce)
    }

    /// The receive coalescing wait (`dtls.rx_coalesce_usecs`).
    pub fn coalesce(&self) -> Duration {
        self.coalesce
    }

    /// One datagram from `from`.
    fn datagram(
        self: &Arc<Self>,
        from: SocketAddr,
        local: Option<IpAddr>,
        d: &mut [u8],
        w: &mut Work,
    ) {
        let kind = if is_client_hello(d) {
            Kind::ClientHello
        } else if d.first() == Some(&record::CONTENT_APPLICATION_DATA) {
            Kind::ApplicationData
        } else {
            Kind::Other
        };
        if kind == Kind::ApplicationData && !record::Channel::tiles(d) {
            // A length from the wire that does not fit: nothing in this
            // datagram is looked at.
            self.counters.malformed.fetch_add(1, Ordering::Relaxed);
            return;
        }
        let route = self.peers.lock().route(from, kind);
        match route {
            Route::Channel(link) => self.open_records(&link, d, w),
            // Handshake, alerts, retransmissions: OpenSSL's business.
            Route::Task(task) => {
                let _ = task.try_send(d.to_vec());
            }
            Route::NewHandshake => self.client_hello(from, local, d),
            Route::Unknown => self.try_rebind(from, local, d, w),
            Route::Drop => {}
        }
    }

    /// A ClientHello: start a handshake if its session id is one we
    /// offered and the limits on handshakes in progress allow.
    fn client_hello(self: &Arc<Self>, from: SocketAddr, local: Option<IpAddr>, d: &[u8]) {
        let Some(app_id) = client_hello_session_id(d) else {
            return;
        };
        let offer = {
            let offers = self.offers.lock();
            offers
                .get(&app_id)
                .map(|o| (o.session.clone(), o.handshake.clone()))
        };
        let Some((session, offered)) = offer else {
            tracing::debug!(%from, "DTLS ClientHello with an unknown App-ID");
            return;
        };
        let (tx, rx) = mpsc::channel(64);
        let _ = tx.try_send(d.to_vec());
        let begun =
            self.peers
                .lock()
                .begin_handshake(from, app_id, tx.clone(), self.handshake_limits);
        let id = match begun {
            Ok(id) => id,
            Err(refused) => {
                let c = &self.handshake_counters;
                match refused {
                    HandshakeRefused::Total => &c.refused_total,
                    HandshakeRefused::Source => &c.refused_per_source,
                    HandshakeRefused::Offer => &c.refused_per_offer,
                }
                .fetch_add(1, Ordering::Relaxed);
                tracing::debug!(%from, "DTLS ClientHello refused: {refused:?} limit reached");
                return;
            }
        };
        let me = self.clone();
        let span = session.span();
        tokio::spawn(
            async move {
                let peer = Handshaking {
                    from,
                    local,
                    id,
                    task: tx,
                };
                let reason = me.run_peer(peer, session.clone(), offered, rx).await;
                tracing::info!(%from, "DTLS channel closed: {reason}");
                // A handshake that never became a channel is forgotten here.
                me.peers.lock().end_handshake(from, id);
            }
            .instrument(span),
        );
    }

    /// Opens the records of a datagram from an established peer.
    fn open_records(&self, link: &Arc<Link>, d: &mut [u8], w: &mut Work) {
        let mut rest = d;
        while let Some(n) = record::Channel::record_len(rest) {
            let (rec, tail) = rest.split_at_mut(n);
            rest = tail;
            match link.channel.open(rec) {
                Ok(plain) => self.plaintext(link, plain, w),
                Err(e) => {
                    tracing::trace!(user = link.session.user, "DTLS record dropped: {e:?}");
                }
            }
        }
    }

    /// An authenticated record's content: one CSTP-typed packet.
    fn plaintext(&self, link: &Arc<Link>, plain: &[u8], w: &mut Work) {
        let replies = &mut w.replies;
        link.touch();
        let Some((&ty, payload)) = plain.split_first() else {
            return;
        };
        match ty {
            t if t == FrameType::Data as u8 => {
                link.session.touch();
                if !crate::packet::ip::valid_ip_packet(payload)
                    || !link.session.owns_source(payload)
                {
                    return;
                }
                // Parsed once: the client's TCP ACKs open its download
                // window, then segments are merged.
                let seg = crate::packet::gro::parse(payload);
                if let Some((flow, high)) = seg
                    .as_ref()
                    .and_then(|s| crate::transport::dtls::flow_control::client_ack(payload, s))
                {
                    link.window.on_ack(flow, high, w.now);
                }
                let rate = link.session.rate_up_bps.load(Ordering::Relaxed);
                if rate != 0 {
                    self.pace_up(link, payload, rate, w.now, &mut w.paced, w.worker);
                    return;
                }
                // TCP segments of one flow are merged across the batch,
                // redundant ACKs dropped.
                let tun = &mut crate::datapath::tun::TunSink {
                    tun: &self.tun,
                    queue: w.worker,
                };
                w.gro.push_parsed(payload, seg, tun);
            }
            // Echo DPD verbatim with the type changed: openconnect's MTU
            // probe accepts nothing else.
            t if t == FrameType::DpdRequest as u8 && payload.len() <= PACKET_MAX => {
                replies.slot()[PACKET_OFFSET..PACKET_OFFSET + payload.len()]
                    .copy_from_slice(payload);
                self.commit_frame(
                    link,
                    link.path(),
                    replies,
                    FrameType::DpdResponse,
                    payload.len(),
                );
            }
            t if t == FrameType::Disconnect as u8 => link.close(),
            _ => {}
        }
    }

    /// An application-data record from an address no channel has: a client
    /// whose NAT mapping changed. The channel it belongs to moves to the
    /// new address once one of its records authenticates there — never on
    /// anything unauthenticated, and only on a record newer than any the
    /// channel accepted, so a replayed one cannot turn its downloads
    /// elsewhere. Only channels seen at the same IP, or whose client's TLS
    /// connection comes from it, are tried ([`Peers::candidates`]), each
    /// trial from the source's own budget ([`TrialBudget`]).
    fn try_rebind(&self, from: SocketAddr, local: Option<IpAddr>, d: &mut [u8], w: &mut Work) {
        let Some(n) = record::Channel::record_len(d) else {
            return;
        };
        let rec = &d[..n];
        if rec[0] != record::CONTENT_APPLICATION_DATA {
            return;
        }
        let candidates = self.peers.lock().candidates(from.ip());
        for (old, link) in candidates {
            if !link.channel.is_newest(rec) {
                continue;
            }
            if !self.rebind_budget.lock().take(from.ip(), w.now) {
                self.handshake_counters
                    .rebind_trials_refused
                    .fetch_add(1, Ordering::Relaxed);
                return;
            }
            // `record_len` bounds `n` by the largest legal record, which
            // is the scratch buffer's size.
            let Some(trial) = w.scratch.get_mut(..n) else {
                return;
            };
            trial.copy_from_slice(rec);
            let Ok(plain) = link.channel.open(trial) else {
                continue;
            };
            if !self.peers.lock().move_channel(old, from) {
                return;
            }
            *link.addr.lock() = (from, local);
            self.handshake_counters
                .rebinds
                .fetch_add(1, Ordering::Relaxed);
            tracing::info!(user = link.session.user, %old, new = %from, "DTLS peer moved (NAT rebinding)");
            let plain = plain.to_vec();
            self.plaintext(&link, &plain, w);
            // The rest of the datagram, if it carried more records.
            if n < d.len() {
                self.open_records(&link, &mut d[n..], w);
            }
            return;
        }
    }

    /// Seals a packet for `link` into `out`'s next slot, where the caller
    /// read it at [`PACKET_OFFSET`], and commits it for `path` (the link's
    /// [`Link::path`], looked up once for all segments of a read). Flushes
    /// a full batch.
    pub fn seal_into(
        &self,
        link: &Link,
        path: (SocketAddr, Option<IpAddr>),
        out: &mut batch::SendBatch,
        len: usize,
    ) {
        self.commit_frame(link, path, out, FrameType::Data, len);
    }

    /// Seals the `len`-byte payload at [`PACKET_OFFSET`] of `out`'s next
    /// slot as a frame of type `ty` for `link`, commits it for `path`,
    /// flushes a full batch.
    fn commit_frame(
        &self,
        link: &Link,
        (to, src): (SocketAddr, Option<IpAddr>),
        out: &mut batch::SendBatch,
        ty: FrameType,
        len: usize,
    ) {
        let n = link.seal_frame(out.slot(), ty, len);
        out.commit(n, to, src);
        if out.is_full() {
            self.send(self.socket().as_raw_fd(), out);
        }
    }

    /// Sends what a worker sealed, if anything.
    pub fn flush(&self, out: &mut batch::SendBatch) {
        if !out.is_empty() {
            self.send(self.socket().as_raw_fd(), out);
        }
    }
}

/// Where a worker puts a packet in a [`batch::SendBatch`] slot so it
/// can be sealed in place: after the record prefix and the type byte.
pub const PACKET_OFFSET: usize = record::PREFIX_LEN + 1;
/// The largest packet a slot takes (room for the tag).
pub const PACKET_MAX: usize = batch::SLOT - PACKET_OFFSET - record::TAG_LEN;

/// A DATA frame over TLS while DTLS is silent this long means the client
/// has fallen back to TLS (UDP blocked): send over TLS too.
pub const DTLS_FALLBACK_SILENCE: Duration = Duration::from_secs(5);

/// Trial decryptions per second for records from one unknown source.
const REBIND_TRIALS_PER_SEC: u32 = 100;

/// A packet worker's receive buffers and batch in progress
/// ([`DtlsServer::receive`]).
pub struct Receiver {
    /// The worker's socket.
    fd: RawFd,
    batch: batch::RecvBatch,
    w: Work,
    /// Messages the next `recvmmsg` takes ([`recv_max`]).
    max: usize,
}

impl Receiver {
    /// The worker's socket, to poll.
    pub fn fd(&self) -> RawFd {
        self.fd
    }

    /// The worker's paced queue (rate-limited clients, both ways).
    pub fn paced(&mut self) -> &mut Paced {
        &mut self.w.paced
    }

    /// The worker's TUN queue.
    pub fn worker(&self) -> usize {
        self.w.worker
    }
}

/// The dispatcher's reusable buffers.
struct Work {
    /// DPD answers, sent at the end of each batch.
    replies: batch::SendBatch,
    /// Trial decryptions (NAT rebinding).
    scratch: Vec<u8>,
    /// TCP segments merged and ACKs thinned across a batch.
    gro: crate::packet::gro::Coalescer,
    /// When the batch arrived.
    now: Instant,
    /// The worker, and the TUN queue packets are written to: its own, so
    /// the kernel steers the flows' replies back to it.
    worker: usize,
    /// Rate-limited clients' packets waiting for their time, both ways.
    paced: Paced,
}

/// A UDP socket bound to `addr` in a `SO_REUSEPORT` group, set up for the
/// data path: large buffers (bursts from many clients must not overflow
/// the default ~200 KB, where ocserv loses datagrams), the destination
/// address of each datagram (`IP_PKTINFO`) and GRO. It stays blocking,
/// but packet workers poll it and every receive and send passes
/// MSG_DONTWAIT: a full buffer drops, as a network does. (Only a process
/// of the same user can join the group, as with any port we hold.)
fn reuseport_socket(addr: SocketAddr, gro: bool) -> anyhow::Result<UdpSocket> {
    use socket2::{Domain, Socket, Type};
    let bind = || -> io::Result<UdpSocket> {
        let s = Socket::new(Domain::for_address(addr), Type::DGRAM, None)?;
        if addr.is_ipv6() {
            s.set_only_v6(false)?;
        }
        s.set_reuse_port(true)?;
        s.bind(&addr.into())?;
        Ok(s.into())
    };
    let socket = bind().with_context(|| format!("binding DTLS on udp {addr}"))?;
    let s = socket2::SockRef::from(&socket);
    let _ = s.set_recv_buffer_size(SOCKET_BUFFER);
    let _ = s.set_send_buffer_size(SOCKET_BUFFER);
    batch::enable_pktinfo(socket.as_raw_fd());
    if gro {
        batch::enable_gro(socket.as_raw_fd());
    }
    Ok(socket)
}
