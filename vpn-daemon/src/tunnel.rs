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

use crate::{
    auth::admission::ConnectionSlot,
    config::Routing,
    datapath::tun::TunSink,
    events::Event,
    mac::format_mac,
    proto::client_string,
    proto::cstp::{self, FrameType},
    proto::http::{Request, Response},
    server::{ClientTls, Gateway},
    session::{Kick, Pacer, Session, TunnelHandle},
};

/// Packets queued towards one client before new ones are dropped.
const CLIENT_QUEUE: usize = 512;

/// Plaintext bytes one wake-up of a tunnel takes from its TLS connection
/// before it writes to the tunnel device and lets other tasks run.
const READ_BURST: usize = 256 * 1024;

impl Gateway {
    /// `CONNECT /CSCOSSLC/tunnel`: validates the cookie, attaches a tunnel
    /// to the session (taking it over from an older one) and runs it.
    pub(crate) async fn connect(
        self: Arc<Self>,
        mut tls: ClientTls,
        leftover: BytesMut,
        req: Request,
        peer: SocketAddr,
        slot: ConnectionSlot,
    ) -> anyhow::Result<()> {
        if req.path != "/CSCOSSLC/tunnel" {
            Response::text(404, "Not Found", "the tunnel path is /CSCOSSLC/tunnel\n")
                .closing()
                .write_to(&mut tls)
                .await?;
            return Ok(());
        }
        let Some(session) = req
            .cookie("webvpn")
            .and_then(|c| self.sessions.by_cookie(c))
        else {
            tracing::info!(%peer, "CONNECT with an unknown or expired cookie");
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

        let (to_client, from_gw) = mpsc::channel(CLIENT_QUEUE);
        let (paced_up, paced_up_rx) = mpsc::channel(CLIENT_QUEUE);
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
                paced_up,
                kick: Some(kick_tx),
            });
            (slot.generation, resumed)
        };
        session.touch();

        let dtls_offer = self
            .dtls
            .get()
            .and_then(|d| self.dtls_offer(d, &req, &tls, &session));
        let head = self.connect_response(
            &req,
            &session,
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
            .run_tunnel(tls, leftover, &session, from_gw, paced_up_rx, kick_rx)
            .await;
        // The DTLS offer belongs to this TLS connection (its PSK does).
        if let Some((d, answer)) = &dtls_offer {
            d.withdraw(answer.id());
        }
        match end {
            TunnelEnd::Logout => {
                self.end_session(session.id, "user logout");
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

    /// The CONNECT response head: everything the client needs to configure
    /// its side. Header names are written in the exact case openconnect
    /// matches.
    /// Chooses the DTLS mode for this tunnel (PSK-NEGOTIATE when the client
    /// offers it, else Cisco session resumption with the strongest
    /// X-DTLS12 suite both know) and registers the offer.
    fn dtls_offer(
        &self,
        d: &Arc<crate::transport::dtls::DtlsServer>,
        req: &Request,
        tls: &ClientTls,
        session: &Arc<Session>,
    ) -> Option<(Arc<crate::transport::dtls::DtlsServer>, DtlsAnswer)> {
        tracing::debug!(
            user = session.user,
            dtls = ?req.header("X-DTLS-CipherSuite").map(client_string),
            dtls12 = ?req.header("X-DTLS12-CipherSuite").map(client_string),
            "the client's DTLS offer"
        );
        if offers_psk_negotiate(req) && self.settings.raw.dtls.psk_negotiate {
            let mut psk = [0u8; 32];
            // The PSK: this TLS connection's exporter.
            if let Err(e) = tls.get_ref().1.export_keying_material(
                &mut psk,
                crate::transport::dtls::PSK_LABEL,
                None,
            ) {
                tracing::warn!("no DTLS for this tunnel: exporter failed: {e}");
                return None;
            }
            let app_id = d.offer(session.clone(), psk);
            return Some((
                d.clone(),
                DtlsAnswer::Psk {
                    port: d.port(),
                    app_id,
                },
            ));
        }
        let master: [u8; 48] = hex::decode(req.header("X-DTLS-Master-Secret")?)
            .ok()?
            .try_into()
            .ok()?;
        // Cisco's X-DTLS12 list first, else openconnect's legacy names; the
        // answer goes back in the header the suite came from.
        let (header, name, suite) = match req
            .header("X-DTLS12-CipherSuite")
            .and_then(crate::transport::dtls::pick_dtls12_suite)
        {
            Some(s) => ("X-DTLS12-CipherSuite", s.name, s),
            None => match req
                .header("X-DTLS-CipherSuite")
                .and_then(crate::transport::dtls::pick_legacy_suite)
            {
                Some((name, s)) => ("X-DTLS-CipherSuite", name, s),
                None => {
                    tracing::info!(
                        user = session.user,
                        "no DTLS for this tunnel: the client offers no DTLS suite the gateway does (PSK-NEGOTIATE, AES-GCM in DTLS 1.2)"
                    );
                    return None;
                }
            },
        };
        match d.offer_resumption(session.clone(), &master, suite) {
            Ok(sid) => Some((
                d.clone(),
                DtlsAnswer::Resume {
                    port: d.port(),
                    sid,
                    header,
                    name,
                },
            )),
            Err(e) => {
                tracing::warn!("no DTLS for this tunnel: {e:#}");
                None
            }
        }
    }

    fn connect_response(
        &self,
        req: &Request,
        s: &Session,
        peer_v6: bool,
        dtls: Option<&DtlsAnswer>,
    ) -> String {
        let st = &self.settings;
        let cfg = &st.raw;
        let mut h: Vec<(&str, String)> = Vec::with_capacity(32);
        h.push(("X-CSTP-Version", "1".into()));
        h.push((
            "X-CSTP-Server-Name",
            format!("vpn-gateway {}", env!("CARGO_PKG_VERSION")),
        ));
        h.push(("X-CSTP-Address", s.lease.v4.to_string()));
        h.push(("X-CSTP-Netmask", st.pool_v4.netmask().to_string()));
        let wants_v6 = req
            .header("X-CSTP-Address-Type")
            .is_none_or(|t| t.split(',').any(|f| f.trim().eq_ignore_ascii_case("IPv6")));
        let full_v6 = req
            .header("X-CSTP-Full-IPv6-Capability")
            .is_some_and(|v| v.eq_ignore_ascii_case("true"));
        let v6 = match (s.lease.v6, st.pool_v6) {
            (Some(a), Some(net)) if wants_v6 && full_v6 => {
                h.push(("X-CSTP-Address-IP6", format!("{a}/{}", net.prefix_len())));
                true
            }
            _ => false,
        };
        for d in &cfg.tunnel.dns {
            if d.is_ipv4() || v6 {
                h.push(("X-CSTP-DNS", d.to_string()));
            }
        }
        if let Some(d) = &cfg.tunnel.default_domain {
            h.push(("X-CSTP-Default-Domain", d.clone()));
        }
        if cfg.client_routing.local_lan_access {
            // Cisco's "local LAN access" flag; it must come first.
            h.push(("X-CSTP-Split-Exclude", "0.0.0.0/255.255.255.255".into()));
        }
        let (name, nets) = match &st.routing {
            Routing::All => ("", &[][..]),
            Routing::Include(n) => ("Include", &n[..]),
            Routing::Exclude(n) => ("Exclude", &n[..]),
        };
        for n in nets {
            match n {
                ipnet::IpNet::V4(n) => h.push((
                    if name == "Include" {
                        "X-CSTP-Split-Include"
                    } else {
                        "X-CSTP-Split-Exclude"
                    },
                    format!("{}/{}", n.network(), n.netmask()),
                )),
                ipnet::IpNet::V6(n) if v6 => h.push((
                    if name == "Include" {
                        "X-CSTP-Split-Include-IP6"
                    } else {
                        "X-CSTP-Split-Exclude-IP6"
                    },
                    n.to_string(),
                )),
                ipnet::IpNet::V6(_) => {}
            }
        }
        h.push((
            "X-CSTP-Tunnel-All-DNS",
            matches!(st.routing, Routing::All).to_string(),
        ));
        if let Some(b) = &cfg.tunnel.banner {
            h.push(("X-CSTP-Banner", percent_encode_banner(b)));
        }
        let session_secs = st.session_timeout.as_secs();
        let remaining = st
            .session_timeout
            .saturating_sub(s.started.elapsed())
            .as_secs();
        h.push(("X-CSTP-Session-Timeout", session_secs.to_string()));
        h.push(("X-CSTP-Session-Timeout-Remaining", remaining.to_string()));
        h.push(("X-CSTP-Lease-Duration", session_secs.to_string()));
        h.push((
            "X-CSTP-Idle-Timeout",
            match cfg.session.idle_timeout_secs {
                0 => "none".into(),
                n => n.to_string(),
            },
        ));
        h.push((
            "X-CSTP-Disconnected-Timeout",
            cfg.session.disconnected_timeout_secs.to_string(),
        ));
        h.push(("X-CSTP-DPD", cfg.session.dpd_secs.to_string()));
        h.push(("X-CSTP-Keepalive", cfg.session.keepalive_secs.to_string()));
        // rustls cannot renegotiate: ask for a fresh tunnel instead (never).
        h.push(("X-CSTP-Rekey-Method", "none".into()));
        let base = req
            .header("X-CSTP-Base-MTU")
            .and_then(|v| v.parse::<u16>().ok());
        if let Some(base) = base {
            h.push(("X-CSTP-Base-MTU", base.to_string()));
        }
        let mtu = tunnel_mtu(cfg.tunnel.mtu, base, dtls.is_some(), peer_v6);
        h.push(("X-CSTP-MTU", mtu.to_string()));
        h.push(("X-CSTP-Keep", "true".into()));
        h.push(("X-CSTP-TCP-Keepalive", "true".into()));
        h.push(("X-CSTP-License", "accept".into()));
        h.push(("X-CSTP-Client-Bypass-Protocol", "false".into()));
        if let Some(answer) = dtls {
            match answer {
                DtlsAnswer::Psk { port, app_id } => {
                    h.push(("X-DTLS-Port", port.to_string()));
                    h.push(("X-DTLS-App-ID", hex::encode(app_id)));
                    h.push(("X-DTLS-CipherSuite", "PSK-NEGOTIATE".into()));
                }
                DtlsAnswer::Resume {
                    port,
                    sid,
                    header,
                    name,
                } => {
                    h.push(("X-DTLS-Port", port.to_string()));
                    h.push(("X-DTLS-Session-ID", hex::encode_upper(sid)));
                    h.push((header, name.to_string()));
                    h.push(("X-DTLS-MTU", mtu.to_string()));
                }
            }
            h.push(("X-DTLS-DPD", cfg.session.dpd_secs.to_string()));
            h.push(("X-DTLS-Keepalive", cfg.session.keepalive_secs.to_string()));
            h.push(("X-DTLS-Rekey-Method", "none".into()));
        }

        let mut out = String::from("HTTP/1.1 200 CONNECTED\r\n");
        for (n, v) in h {
            out.push_str(n);
            out.push_str(": ");
            out.push_str(&v);
            out.push_str("\r\n");
        }
        out.push_str("\r\n");
        out
    }

    /// Moves packets between the TLS stream and the tunnel device until the
    /// client leaves, dies, or the server kicks it.
    async fn run_tunnel(
        &self,
        tls: ClientTls,
        mut inbuf: BytesMut,
        session: &Arc<Session>,
        mut from_gw: mpsc::Receiver<Vec<u8>>,
        mut paced_up: mpsc::Receiver<Vec<u8>>,
        mut kick: oneshot::Receiver<Kick>,
    ) -> TunnelEnd {
        // Larger reads while the client sends fast (read_batch.rs). `batch`
        // makes system calls only inside the loop below, while the halves of
        // `tls` keep the socket open.
        let mut batch = crate::transport::read_batch::ReadBatching::new(
            std::os::fd::AsRawFd::as_raw_fd(tls.get_ref().0.get_ref()),
            self.settings.raw.tls.read_batching.unwrap_or(true),
            &self.tls_reads,
        );
        let tail = tokio::time::sleep(crate::transport::read_batch::TAIL);
        tokio::pin!(tail);
        let dpd = Duration::from_secs(self.settings.raw.session.dpd_secs);
        let (mut rd, wr) = tokio::io::split(tls);
        let mut wr = ClientWriter { wr, limit: dpd * 3 };
        let mut last_rx = Instant::now();
        let mut last_dpd_sent = Instant::now();
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        let mut out = Vec::with_capacity(cstp::MAX_PAYLOAD + cstp::HEADER_LEN);
        let mut pacer = Pacer::default();
        let mut down_pacer = Pacer::default();
        // TCP segments merged, ACKs thinned across one read (see gro.rs).
        let mut gro = crate::packet::gro::Coalescer::default();
        inbuf.reserve(32 * 1024);

        tracing::debug!(session = session.id, "tunnel loop starts");
        let end = loop {
            tokio::select! {
                // A kick comes first: when a session ends, its packet queue
                // closes right after the kick is sent, and the client must
                // get the TERMINATE frame rather than a bare close.
                biased;
                k = &mut kick => {
                    batch.stop();
                    match k {
                        Ok(Kick::Terminate(reason)) => {
                            tracing::info!(user = session.user, "terminating tunnel: {reason}");
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
                    last_rx = Instant::now();
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
                            // A rate-limited client on DTLS gets its paced
                            // packets there.
                            if let Some(d) = self.dtls.get()
                                && let Some(link) = d.link_for(session.id)
                            {
                                d.send_one(&link, &p);
                            } else if p.len() <= cstp::MAX_PAYLOAD {
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
                // Uploads over DTLS of a rate-limited client, paced here
                // like the TLS ones (UDP has no backpressure to apply).
                Some(p) = paced_up.recv() => {
                    let rate = session.rate_up_bps.load(Ordering::Relaxed);
                    let wait = pacer.delay(p.len(), rate, Instant::now());
                    if !wait.is_zero() {
                        tokio::time::sleep(wait).await;
                    }
                    let _ = self.tun.send(&p);
                }
                _ = tick.tick() => {
                    let silent = last_rx.elapsed();
                    if silent >= dpd * 3 {
                        break TunnelEnd::Down("dead peer detected (no DPD answer)".into());
                    }
                    if silent >= dpd && last_dpd_sent.elapsed() >= dpd / 2 {
                        cstp::encode(&mut out, FrameType::DpdRequest, &[]);
                        if let Err(end) = wr.send(&out).await {
                            break end;
                        }
                        last_dpd_sent = Instant::now();
                    }
                }
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
                    tracing::info!(user = session.user, "ending tunnel: {e}");
                    return Some(TunnelEnd::Down(e.to_string()));
                }
            };
            match frame.ty {
                FrameType::Data => {
                    session.touch();
                    if let Some(d) = self.dtls.get() {
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
                    return Some(TunnelEnd::Down("client disconnected temporarily".into()));
                }
                FrameType::DpdResponse | FrameType::Keepalive => {}
                FrameType::Compressed => {
                    // Never negotiated; a client sending it is broken.
                    return Some(TunnelEnd::Down(
                        "compressed frame without negotiation".into(),
                    ));
                }
                FrameType::Terminate => {
                    return Some(TunnelEnd::Down("client sent terminate".into()));
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
        TunnelEnd::Down(format!(
            "client stopped reading (a write waited {} s)",
            self.limit.as_secs()
        ))
    }

    async fn write(&mut self, buf: &[u8]) -> Result<(), TunnelEnd> {
        match tokio::time::timeout(self.limit, self.wr.write_all(buf)).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(TunnelEnd::Down(format!("write error: {e}"))),
            Err(_) => Err(self.stalled()),
        }
    }

    async fn flush(&mut self) -> Result<(), TunnelEnd> {
        match tokio::time::timeout(self.limit, self.wr.flush()).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(TunnelEnd::Down(format!("write error: {e}"))),
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
    Down(String),
}

/// A read from the client's TLS stream: the bytes it brought, or how the
/// tunnel ends.
fn read_outcome(r: std::io::Result<usize>) -> Result<usize, TunnelEnd> {
    match r {
        Ok(0) => Err(TunnelEnd::Down("connection closed by client".into())),
        Err(e) => Err(TunnelEnd::Down(format!("read error: {e}"))),
        Ok(n) => Ok(n),
    }
}

/// The DTLS mode chosen for a tunnel, as announced in the CONNECT answer.
enum DtlsAnswer {
    Psk {
        port: u16,
        app_id: [u8; 32],
    },
    Resume {
        port: u16,
        sid: [u8; 32],
        /// `X-DTLS12-CipherSuite` (Cisco) or `X-DTLS-CipherSuite`
        /// (openconnect's legacy names): where the suite came from.
        header: &'static str,
        /// The suite's name as the client gave it.
        name: &'static str,
    },
}

impl DtlsAnswer {
    /// The id a ClientHello carries in this mode.
    fn id(&self) -> &[u8; 32] {
        match self {
            DtlsAnswer::Psk { app_id, .. } => app_id,
            DtlsAnswer::Resume { sid, .. } => sid,
        }
    }
}

/// Whether the client offers DTLS in PSK-NEGOTIATE mode.
fn offers_psk_negotiate(req: &Request) -> bool {
    ["X-DTLS-CipherSuite", "X-DTLS12-CipherSuite"]
        .iter()
        .filter_map(|h| req.header(h))
        .any(|v| v.split(':').any(|c| c.trim() == "PSK-NEGOTIATE"))
}

/// openconnect decodes `%XX` in the banner: escape `%`, control characters
/// and non-ASCII bytes so multi-line and UTF-8 banners survive a header.
fn percent_encode_banner(b: &str) -> String {
    let mut out = String::with_capacity(b.len());
    for byte in b.bytes() {
        if byte == b'%' || !(0x20..0x7f).contains(&byte) {
            out.push_str(&format!("%{byte:02X}"));
        } else {
            out.push(byte as char);
        }
    }
    out
}

/// The tunnel MTU for a client: the configured one, and with DTLS no more
/// than fits one datagram on the client's path (its `X-CSTP-Base-MTU`
/// less the outer IP and UDP headers and the record overhead of the GCM
/// suites we use), so full-size packets are never fragmented.
///
/// The client's own `X-CSTP-MTU` is not used (ocserv ignores it too):
/// openconnect sends an estimate with room for any suite, 1390 on a
/// 1500-byte path where our AES-GCM records fit 1434, and takes what the
/// server answers.
fn tunnel_mtu(configured: u16, base: Option<u16>, dtls: bool, peer_v6: bool) -> u16 {
    match base {
        Some(base) if dtls => {
            let outer = if peer_v6 { 40 + 8 } else { 20 + 8 };
            configured.min(
                base.saturating_sub(outer + crate::transport::dtls::DTLS_GCM_OVERHEAD)
                    .max(576),
            )
        }
        _ => configured,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn banner_encoding() {
        assert_eq!(percent_encode_banner("50% off\nnow"), "50%25 off%0Anow");
        assert_eq!(percent_encode_banner("Grüße"), "Gr%C3%BC%C3%9Fe");
    }

    #[test]
    fn dtls_mtu_fills_the_path_exactly() {
        // 1500 - 20 (IPv4) - 8 (UDP) - 13 (record header) - 8 (nonce)
        // - 16 (tag) - 1 (CSTP type byte).
        assert_eq!(tunnel_mtu(1500, Some(1500), true, false), 1434);
        assert_eq!(tunnel_mtu(1500, Some(1500), true, true), 1414);
        // The configured MTU stays the ceiling; TLS alone has no datagram
        // to fit; a tiny path still gets the minimum.
        assert_eq!(tunnel_mtu(1300, Some(1500), true, false), 1300);
        assert_eq!(tunnel_mtu(1399, Some(1500), false, false), 1399);
        assert_eq!(tunnel_mtu(1399, None, true, false), 1399);
        assert_eq!(tunnel_mtu(1399, Some(300), true, false), 576);
    }
}
