//! CONNECT: turning a TLS connection into a CSTP tunnel (with a DTLS offer),
//! the headers that configure the client, and the frame loop.

use std::{
    net::SocketAddr,
    sync::{Arc, atomic::Ordering},
    time::{Duration, Instant},
};

use bytes::BytesMut;
use futures::FutureExt as _;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    sync::{mpsc, oneshot},
};
use tracing::Instrument as _;

use crate::{
    api::ReadStats,
    auth::admission::ConnectionSlot,
    config::Settings,
    datapath::tun::Tun,
    datapath::tun::TunSink,
    events::EventLog,
    events::{DownReason, Event},
    mac::format_mac,
    proto::connect::TunnelParams,
    proto::{
        client_string,
        connect::{self, Addresses, DtlsAnswer, DtlsChoice, NoDtls},
        cstp::{self, FrameType},
        dpd::{Dpd, DpdAction},
        http::{Request, Response},
    },
    session::manager::SessionManager,
    session::{Kick, Session, TunnelHandle},
    transport::dtls::DtlsServer,
    transport::pacing::Pacer,
    transport::{read_batch::Counters, tls::ClientTls},
};

/// Packets queued towards one client before new ones are dropped.
const CLIENT_QUEUE: usize = 512;

/// Plaintext bytes one wake-up of a tunnel takes from its TLS connection
/// before it writes to the tunnel device and lets other tasks run.
const READ_BURST: usize = 256 * 1024;

/// Room made in the input buffer while the client sends in bulk: two
/// maximal TLS records.
const READ_ROOM: usize = 32 * 1024;

/// Quiet time after which a tunnel lets its buffers go.
const IDLE_TRIM: Duration = Duration::from_secs(5);

/// What running TLS tunnels takes.
pub struct TunnelService {
    sessions: Arc<SessionManager>,
    dtls: Option<Arc<DtlsServer>>,
    tun: Arc<Tun>,
    events: Arc<EventLog>,
    /// What every client is told at CONNECT.
    params: TunnelParams,
    /// Offer PSK-NEGOTIATE to clients that can (`dtls.psk_negotiate`).
    psk_negotiate: bool,
    /// Batch the reads of fast senders (`tls.read_batching`).
    read_batching: bool,
    /// How TLS tunnels' reads were batched (`vpnctl stats`).
    reads: Counters,
    /// A CONNECT with an unknown cookie scores ban points.
    bans: Arc<crate::auth::bans::Bans>,
}

impl TunnelService {
    pub fn new(
        settings: &Settings,
        sessions: Arc<SessionManager>,
        dtls: Option<Arc<DtlsServer>>,
        tun: Arc<Tun>,
        events: Arc<EventLog>,
        bans: Arc<crate::auth::bans::Bans>,
    ) -> Arc<Self> {
        Arc::new(TunnelService {
            sessions,
            dtls,
            tun,
            events,
            params: settings.tunnel.clone(),
            psk_negotiate: settings.dtls.as_ref().is_some_and(|d| d.psk_negotiate),
            read_batching: settings.tls.read_batching,
            reads: Counters::default(),
            bans,
        })
    }

    /// How TLS tunnels' reads were batched so far.
    pub fn read_stats(&self) -> ReadStats {
        self.reads.snapshot()
    }

    /// `CONNECT /CSCOSSLC/tunnel`: validates the cookie, attaches a tunnel
    /// to the session (taking it over from an older one) and runs it.
    pub async fn connect(
        self: Arc<Self>,
        mut tls: ClientTls,
        leftover: BytesMut,
        req: Request,
        peer: SocketAddr,
        slot: ConnectionSlot,
    ) -> std::io::Result<()> {
        if req.path != "/CSCOSSLC/tunnel" {
            Response::text(404, "Not Found", "the tunnel path is /CSCOSSLC/tunnel\n")
                .closing()
                .write_to(&mut tls)
                .await?;
            return Ok(());
        }
        let Some(session) = req
            .cookie("webvpn")
            .and_then(|c| self.sessions.table().by_cookie(c))
        else {
            tracing::info!(%peer, "CONNECT with an unknown or expired cookie");
            self.bans
                .offence(peer.ip(), crate::auth::bans::Offence::UnknownCookie);
            Response::text(
                401,
                "Cookie is not valid",
                "unknown or expired session cookie\n",
            )
            .closing()
            .write_to(&mut tls)
            .await?;
            let _ = tls.shutdown().await;
            return Ok(());
        };
        // A tunnel no longer counts against the login phase's limits.
        slot.into_tunnel();
        let span = session.span();
        self.tunnel(tls, leftover, req, peer, session)
            .instrument(span)
            .await
    }

    /// Attaches a tunnel to `session` (taking it over from an older one),
    /// answers the CONNECT and runs the tunnel until it ends.
    async fn tunnel(
        self: Arc<Self>,
        mut tls: ClientTls,
        leftover: BytesMut,
        req: Request,
        peer: SocketAddr,
        session: Arc<Session>,
    ) -> std::io::Result<()> {
        tracing::debug!(%peer, "tunnel starts");

        let (to_client, from_gw) = mpsc::channel(CLIENT_QUEUE);
        let (kick_tx, kick_rx) = oneshot::channel();
        let (generation, resumed) = {
            let mut slot = session.tunnel.lock();
            let resumed = slot.generation > 0;
            if let Some(old) = slot.handle.take()
                && let Some(k) = old.kick
            {
                let _ = k.send(Kick::Replaced);
            }
            slot.generation += 1;
            slot.peer = Some(peer);
            slot.down_since = None;
            slot.handle = Some(TunnelHandle {
                generation: slot.generation,
                to_client,
                kick: Some(kick_tx),
            });
            (slot.generation, resumed)
        };
        session.touch();

        let dtls_offer = self
            .dtls
            .as_ref()
            .and_then(|d| self.dtls_offer(d, &req, &tls, &session));
        let params = session.tunnel_params(&self.params);
        let head = connect::response_head(
            &params,
            &req,
            Addresses {
                v4: session.lease.v4,
                v6: session.lease.v6,
            },
            params
                .session_timeout
                .saturating_sub(session.started.elapsed()),
            peer.ip().to_canonical().is_ipv6(),
            dtls_offer.as_ref().map(|(_, a)| a),
        );
        tls.write_all(head.as_bytes()).await?;
        tls.flush().await?;
        self.events.emit(Event::ClientConnected {
            session_id: session.id,
            user: session.user.clone(),
            group: session.group.clone(),
            vpn_address: session.lease.v4.to_string(),
            public_address: peer.to_string(),
            pseudo_mac: format_mac(&session.mac),
            resumed,
        });

        let end = self
            .run_tunnel(tls, leftover, &session, from_gw, kick_rx)
            .await;
        // The DTLS offer belongs to this TLS connection (its PSK does).
        if let Some((d, answer)) = &dtls_offer {
            d.withdraw(answer.id());
        }
        match end {
            TunnelEnd::Logout => {
                self.sessions
                    .end(session.id, crate::events::EndReason::UserLogout);
            }
            TunnelEnd::Kicked => {}
            TunnelEnd::Down(reason) => {
                let mut slot = session.tunnel.lock();
                if slot.generation == generation {
                    slot.handle = None;
                    slot.down_since = Some(Instant::now());
                    drop(slot);
                    self.events.emit(Event::TunnelDown {
                        session_id: session.id,
                        user: session.user.clone(),
                        reason,
                    });
                }
            }
        }
        Ok(())
    }

    /// Chooses the DTLS mode for this tunnel ([`connect::choose_dtls`])
    /// and registers the offer with the DTLS server: the PSK of
    /// PSK-NEGOTIATE is this TLS connection's exporter.
    fn dtls_offer(
        &self,
        d: &Arc<DtlsServer>,
        req: &Request,
        tls: &ClientTls,
        session: &Arc<Session>,
    ) -> Option<(Arc<DtlsServer>, DtlsAnswer)> {
        tracing::debug!(
            dtls = ?req.header("X-DTLS-CipherSuite").map(client_string),
            dtls12 = ?req.header("X-DTLS12-CipherSuite").map(client_string),
            "the client's DTLS offer"
        );
        let answer = match connect::choose_dtls(req, self.psk_negotiate) {
            Err(NoDtls::NotAsked) => return None,
            Err(e) => {
                tracing::info!("no DTLS for this tunnel: {e}");
                return None;
            }
            Ok(DtlsChoice::Psk) => {
                let mut psk = [0u8; 32];
                if let Err(e) = tls.get_ref().1.export_keying_material(
                    &mut psk,
                    crate::transport::dtls::PSK_LABEL,
                    None,
                ) {
                    tracing::warn!("no DTLS for this tunnel: exporter failed: {e}");
                    return None;
                }
                DtlsAnswer::Psk {
                    port: d.port(),
                    app_id: d.offer(session.clone(), psk),
                }
            }
            Ok(DtlsChoice::Resume {
                master,
                header,
                name,
                suite,
            }) => match d.offer_resumption(session.clone(), &master, suite) {
                Ok(sid) => DtlsAnswer::Resume {
                    port: d.port(),
                    sid,
                    header,
                    name,
                },
                Err(e) => {
                    tracing::warn!("no DTLS for this tunnel: {e}");
                    return None;
                }
            },
        };
        Some((d.clone(), answer))
    }

    /// Moves packets between the TLS stream and the tunnel device until the
    /// client leaves, dies, or the server kicks it.
    async fn run_tunnel(
        &self,
        tls: ClientTls,
        mut inbuf: BytesMut,
        session: &Arc<Session>,
        mut from_gw: mpsc::Receiver<Vec<u8>>,
        mut kick: oneshot::Receiver<Kick>,
    ) -> TunnelEnd {
        // Larger reads while the client sends fast (`read_batch.rs`). `batch`
        // makes system calls only inside the loop below, while the halves of
        // `tls` keep the socket open.
        let mut batch = crate::transport::read_batch::ReadBatching::new(
            std::os::fd::AsRawFd::as_raw_fd(tls.get_ref().0.get_ref()),
            self.read_batching,
            &self.reads,
        );
        let tail = tokio::time::sleep(crate::transport::read_batch::TAIL);
        tokio::pin!(tail);
        let dpd = Duration::from_secs(self.params.dpd_secs);
        let (mut rd, wr) = tokio::io::split(tls);
        let mut wr = ClientWriter { wr, limit: dpd * 3 };
        let mut dpd = Dpd::new(dpd, Instant::now());
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        // Grows to the largest frame sent; idle tunnels keep it small.
        let mut out = Vec::new();
        let mut pacer = Pacer::default();
        let mut down_pacer = Pacer::default();
        // TCP segments merged, ACKs thinned across one read (see `packet/gro.rs`).
        let mut gro = crate::packet::gro::Coalescer::default();

        // Buffers grow with traffic and are let go after IDLE_TRIM of
        // quiet: most sessions are idle most of the time.
        let mut last_got = 0usize;
        let mut busy_at = Instant::now();
        let end = loop {
            if last_got >= 1024 && inbuf.capacity() - inbuf.len() < READ_ROOM / 2 {
                inbuf.reserve(READ_ROOM);
            }
            tokio::select! {
                // A kick comes first: when a session ends, its packet queue
                // closes right after the kick is sent, and the client must
                // get the TERMINATE frame rather than a bare close.
                biased;
                k = &mut kick => {
                    batch.stop();
                    match k {
                        Ok(Kick::Terminate(reason)) => {
                            tracing::info!("terminating tunnel: {reason}");
                            cstp::encode(&mut out, FrameType::Terminate, &[]);
                            let _ = wr.send(&out).await;
                            // Let the client read the frame and hang up first:
                            // closing with unread input would send a RST, and a
                            // RST discards the frame before the client reads it.
                            let mut sink = vec![0u8; 16 * 1024];
                            let _ = tokio::time::timeout(Duration::from_secs(2), async {
                                while let Ok(n) = rd.read(&mut sink).await {
                                    if n == 0 {
                                        break;
                                    }
                                }
                            })
                            .await;
                        }
                        Ok(Kick::Replaced) | Err(_) => {}
                    }
                    break TunnelEnd::Kicked;
                }
                // The last bytes of a burst below the low-water mark.
                _ = &mut tail, if batch.batching() => batch.tail(),
                r = rd.read_buf(&mut inbuf) => {
                    let mut got = match read_outcome(r) {
                        Ok(n) => n,
                        Err(end) => break end,
                    };
                    dpd.received(Instant::now());
                    let mut end = self.handle_frames(&mut inbuf, session, &mut wr, &mut out, &mut pacer, &mut gro).await;
                    // rustls hands out one record per read: take what is
                    // already here before writing, so the coalescer sees
                    // the whole burst and the tunnel device gets one write
                    // per flow and burst. Not for a rate-limited client: its
                    // packets are paced out one by one, and its downloads
                    // must not wait behind a burst of them.
                    let limited = session.rate_up_bps.load(Ordering::Relaxed) != 0;
                    while end.is_none() && got < READ_BURST && !limited {
                        let Some(r) = rd.read_buf(&mut inbuf).now_or_never() else { break };
                        match read_outcome(r) {
                            Ok(n) => {
                                got += n;
                                end = self.handle_frames(&mut inbuf, session, &mut wr, &mut out, &mut pacer, &mut gro).await;
                            }
                            Err(e) => end = Some(e),
                        }
                    }
                    last_got = got;
                    if got >= 1024 {
                        busy_at = Instant::now();
                    }
                    batch.after_read(got);
                    if batch.batching() {
                        tail.as_mut().reset(tokio::time::Instant::now() + crate::transport::read_batch::TAIL);
                    }
                    // What this read merged or held goes to the kernel now.
                    gro.finish(&mut TunSink::new(&self.tun));
                    if let Some(end) = end {
                        break end;
                    }
                }
                pkt = from_gw.recv() => {
                    let Some(pkt) = pkt else { break TunnelEnd::Kicked };
                    if pkt.len() >= 1024 {
                        busy_at = Instant::now();
                    }
                    let mut next = Some(pkt);
                    // Drain what is queued, one TLS record per frame, then flush once.
                    let sent: Result<(), TunnelEnd> = async {
                        while let Some(p) = next {
                            let rate = session.rate_down_bps.load(Ordering::Relaxed);
                            let wait = down_pacer.delay(p.len(), rate, Instant::now());
                            if !wait.is_zero() {
                                wr.flush().await?;
                                tokio::time::sleep(wait).await;
                            }
                            if p.len() <= cstp::MAX_PAYLOAD {
                                cstp::encode(&mut out, FrameType::Data, &p);
                                wr.write(&out).await?;
                            }
                            next = from_gw.try_recv().ok();
                        }
                        wr.flush().await
                    }
                    .await;
                    if let Err(end) = sent {
                        break end;
                    }
                }
                _ = tick.tick() => {
                    if busy_at.elapsed() >= IDLE_TRIM {
                        // Even the login's 4 KiB request buffer: a page
                        // per session is a tenth of an idle one's cost.
                        if inbuf.is_empty() && inbuf.capacity() > 0 {
                            inbuf = BytesMut::new();
                        }
                        if out.capacity() > 256 {
                            out = Vec::new();
                        }
                        gro.release();
                    }
                    match dpd.tick(Instant::now()) {
                    DpdAction::Nothing => {}
                    DpdAction::Dead => {
                        break TunnelEnd::Down(DownReason::DeadPeer);
                    }
                    DpdAction::SendRequest => {
                        cstp::encode(&mut out, FrameType::DpdRequest, &[]);
                        if let Err(end) = wr.send(&out).await {
                            break end;
                        }
                    }
                }},
            }
        };
        let _ = tokio::time::timeout(Duration::from_secs(1), wr.wr.shutdown()).await;
        end
    }

    /// Handles the complete frames in `inbuf`; `Some` ends the tunnel.
    async fn handle_frames<W: tokio::io::AsyncWrite + Unpin>(
        &self,
        inbuf: &mut BytesMut,
        session: &Arc<Session>,
        wr: &mut ClientWriter<W>,
        out: &mut Vec<u8>,
        pacer: &mut Pacer,
        gro: &mut crate::packet::gro::Coalescer,
    ) -> Option<TunnelEnd> {
        loop {
            let frame = match cstp::decode(inbuf) {
                Ok(Some(f)) => f,
                Ok(None) => return None,
                Err(e) => {
                    tracing::info!("ending tunnel: {e}");
                    if let Some(peer) = session.tunnel.lock().peer {
                        self.bans
                            .offence(peer.ip(), crate::auth::bans::Offence::BadRecord);
                    }
                    return Some(TunnelEnd::Down(DownReason::BadFrame(e.to_string())));
                }
            };
            match frame.ty {
                FrameType::Data => {
                    session.touch();
                    if let Some(d) = self.dtls.as_ref() {
                        d.fall_back_if_silent(session.id);
                    }
                    if !crate::packet::ip::valid_ip_packet(&frame.payload)
                        || !session.owns_source(&frame.payload)
                    {
                        continue;
                    }
                    let rate = session.rate_up_bps.load(Ordering::Relaxed);
                    if rate == 0 {
                        gro.push(&frame.payload, &mut TunSink::new(&self.tun));
                        continue;
                    }
                    let wait = pacer.delay(frame.payload.len(), rate, Instant::now());
                    if !wait.is_zero() {
                        tokio::time::sleep(wait).await;
                    }
                    if let Err(e) = self.tun.send(&frame.payload) {
                        tracing::debug!("tun write: {e}");
                    }
                }
                FrameType::DpdRequest => {
                    cstp::encode(out, FrameType::DpdResponse, &frame.payload);
                    if let Err(end) = wr.send(out).await {
                        return Some(end);
                    }
                }
                FrameType::Disconnect => {
                    if frame.payload.first() == Some(&cstp::DISCONNECT_LOGOUT) {
                        return Some(TunnelEnd::Logout);
                    }
                    // Cisco clients disconnect without 0xb0 for a network
                    // change: keep the session resumable.
                    return Some(TunnelEnd::Down(DownReason::TemporaryDisconnect));
                }
                FrameType::DpdResponse | FrameType::Keepalive => {}
                FrameType::Compressed => {
                    // Never negotiated; a client sending it is broken.
                    return Some(TunnelEnd::Down(DownReason::CompressedFrame));
                }
                FrameType::Terminate => {
                    return Some(TunnelEnd::Down(DownReason::ClientTerminate));
                }
            }
        }
    }
}

/// The writing half of a client's TLS connection. Every write and flush
/// must finish within `limit` (3 DPD intervals): a client that stops
/// reading fills its TCP window, and a write that waited for it forever
/// would keep the tunnel's task from DPD, kicks and expiry (audit M8).
struct ClientWriter<W> {
    wr: W,
    limit: Duration,
}

impl<W: tokio::io::AsyncWrite + Unpin> ClientWriter<W> {
    fn stalled(&self) -> TunnelEnd {
        TunnelEnd::Down(DownReason::StoppedReading {
            waited_secs: self.limit.as_secs(),
        })
    }

    async fn write(&mut self, buf: &[u8]) -> Result<(), TunnelEnd> {
        match tokio::time::timeout(self.limit, self.wr.write_all(buf)).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(TunnelEnd::Down(DownReason::WriteError(e.to_string()))),
            Err(_) => Err(self.stalled()),
        }
    }

    async fn flush(&mut self) -> Result<(), TunnelEnd> {
        match tokio::time::timeout(self.limit, self.wr.flush()).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(TunnelEnd::Down(DownReason::WriteError(e.to_string()))),
            Err(_) => Err(self.stalled()),
        }
    }

    /// Writes and flushes.
    async fn send(&mut self, buf: &[u8]) -> Result<(), TunnelEnd> {
        self.write(buf).await?;
        self.flush().await
    }
}

/// How a tunnel ended.
#[derive(Debug)]
enum TunnelEnd {
    /// The client logged out (DISCONNECT 0xb0): the session ends.
    Logout,
    /// The server closed it (admin, timeout, takeover).
    Kicked,
    /// The connection failed or the peer went silent: the session stays
    /// resumable.
    Down(DownReason),
}

/// A read from the client's TLS stream: the bytes it brought, or how the
/// tunnel ends.
fn read_outcome(r: std::io::Result<usize>) -> Result<usize, TunnelEnd> {
    match r {
        Ok(0) => Err(TunnelEnd::Down(DownReason::ClosedByClient)),
        Err(e) => Err(TunnelEnd::Down(DownReason::ReadError(e.to_string()))),
        Ok(n) => Ok(n),
    }
}
