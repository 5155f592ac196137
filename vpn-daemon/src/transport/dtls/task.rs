//! The task each DTLS peer gets, running OpenSSL: the handshake (datagrams
//! fed from the workers, OpenSSL's timer retransmitting its flight), the
//! check that it was the offered kind, then the channel's control side
//! (alerts, retransmissions, silence) while the workers carry its records.

use std::{
    collections::VecDeque,
    io,
    net::{IpAddr, SocketAddr},
    os::fd::AsRawFd,
    sync::{Arc, atomic::Ordering},
    time::{Duration, Instant},
};

use openssl::ssl::{ErrorCode, HandshakeError, SslStream};
use std::net::UdpSocket;
use tokio::sync::mpsc;

use super::{
    DtlsServer, batch, handshake, handshake::Offered, link::Link, link::UnusableChannel, record,
};
use crate::session::Session;

const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(15);

mod ffi {
    use std::ffi::{c_int, c_long, c_void};

    use openssl_sys::SSL;

    // SAFETY: SSL_ctrl's signature in OpenSSL 1.1.1 and 3
    // (<openssl/ssl.h>); openssl-sys does not export it.
    unsafe extern "C" {
        pub fn SSL_ctrl(ssl: *mut SSL, cmd: c_int, larg: c_long, parg: *mut c_void) -> c_long;
        /// Frees an SSL's record buffers when nothing is pending in them
        /// (OpenSSL >= 1.1.0); they are taken again when next needed.
        pub fn SSL_free_buffers(ssl: *mut SSL) -> c_int;
    }

    const DTLS_CTRL_HANDLE_TIMEOUT: c_int = 74;

    /// `DTLSv1_handle_timeout` (a macro in C): retransmits the last flight
    /// if its timer expired.
    ///
    /// # Safety
    /// `ssl` must be a valid SSL object.
    pub unsafe fn handle_timeout(ssl: *mut SSL) {
        unsafe { SSL_ctrl(ssl, DTLS_CTRL_HANDLE_TIMEOUT, 0, std::ptr::null_mut()) };
    }
}

/// Retransmits `ssl`'s last handshake flight if its timer ran out
/// (`DTLSv1_handle_timeout`); for a handshake driven by hand over a
/// non-blocking transport, as here and in the load generator.
pub fn retransmit_if_due(ssl: &openssl::ssl::SslRef) {
    // SAFETY: a valid SSL for the call's duration.
    unsafe { ffi::handle_timeout(foreign_types::ForeignTypeRef::as_ptr(ssl)) }
}

/// Why a DTLS peer's task ended (logged; the client's tunnel goes on over
/// TLS until it tries DTLS again).
#[derive(Debug, thiserror::Error)]
pub enum ChannelEnd {
    #[error("OpenSSL: {0}")]
    Setup(openssl::error::ErrorStack),
    #[error("handshake failed: {0}")]
    HandshakeFailed(openssl::ssl::Error),
    #[error("handshake timed out")]
    HandshakeTimeout,
    #[error("handshake refused: {0}")]
    Refused(handshake::HandshakeRefused),
    #[error("unusable DTLS channel: {0}")]
    Unusable(UnusableChannel),
    #[error("superseded by another handshake")]
    Superseded,
    #[error("its queue closed")]
    QueueClosed,
    /// The gateway closed it (the session ended, or fell back to TLS).
    #[error("closed")]
    Closed,
    #[error("closed by client")]
    ClosedByClient,
    #[error("fatal alert {0} from the client")]
    Alert(u8),
    #[error("read error: {0}")]
    Read(openssl::ssl::Error),
    #[error("silent for {} s (3 x DTLS DPD)", .0.as_secs())]
    Silent(Duration),
}

impl<S> From<HandshakeError<S>> for ChannelEnd {
    fn from(e: HandshakeError<S>) -> Self {
        match e {
            HandshakeError::SetupFailure(e) => ChannelEnd::Setup(e),
            HandshakeError::Failure(m) | HandshakeError::WouldBlock(m) => {
                ChannelEnd::HandshakeFailed(m.into_error())
            }
        }
    }
}

/// A handshake in progress, as its task knows it.
pub(super) struct Handshaking {
    pub(super) from: SocketAddr,
    pub(super) local: Option<IpAddr>,
    /// Its id in [`Peers`].
    pub(super) id: u64,
    /// Its queue's sending end (the channel keeps it when established).
    pub(super) task: mpsc::Sender<Vec<u8>>,
}

impl DtlsServer {
    pub(super) async fn run_peer(
        &self,
        peer: Handshaking,
        session: Arc<Session>,
        offered: Offered,
        mut inbox: mpsc::Receiver<Vec<u8>>,
    ) -> ChannelEnd {
        let (from, local) = (peer.from, peer.local);
        let mut ssl = match offered.ssl(&self.ctx) {
            Ok(s) => s,
            Err(e) => return ChannelEnd::Setup(e),
        };
        let _ = ssl.set_mtu(1400);
        let io = DatagramIo {
            inbox: VecDeque::new(),
            socket: self.socket().clone(),
            peer: from,
            local,
            last_epoch1_seq: None,
        };
        // Handshake: feed datagrams until OpenSSL is done, letting its
        // timer retransmit our flight when the client's answer is lost.
        let mut mid = match ssl.accept(io) {
            Ok(s) => {
                return self
                    .run_channel(s, peer, &session, &offered, &mut inbox)
                    .await;
            }
            Err(HandshakeError::WouldBlock(m)) => m,
            Err(e) => return e.into(),
        };
        let deadline = Instant::now() + HANDSHAKE_TIMEOUT;
        loop {
            let wake = (Instant::now() + Duration::from_millis(250)).min(deadline);
            match tokio::time::timeout_at(wake.into(), inbox.recv()).await {
                Ok(Some(d)) => mid.get_mut().inbox.push_back(d),
                Ok(None) => return ChannelEnd::QueueClosed,
                Err(_) if Instant::now() >= deadline => return ChannelEnd::HandshakeTimeout,
                Err(_) => {
                    retransmit_if_due(mid.ssl());
                    continue;
                }
            }
            match mid.handshake() {
                Ok(s) => {
                    return self
                        .run_channel(s, peer, &session, &offered, &mut inbox)
                        .await;
                }
                Err(HandshakeError::WouldBlock(m)) => mid = m,
                Err(e) => return e.into(),
            }
        }
    }

    /// The established channel: its records are the packet workers' (see
    /// [`Link`]); this task keeps OpenSSL for what
    /// remains of the protocol (alerts, handshake retransmissions) and
    /// watches for silence.
    async fn run_channel(
        &self,
        s: SslStream<DatagramIo>,
        peer: Handshaking,
        session: &Arc<Session>,
        offered: &Offered,
        inbox: &mut mpsc::Receiver<Vec<u8>>,
    ) -> ChannelEnd {
        let from = peer.from;
        if let Err(e) = offered.check(s.ssl()) {
            self.handshake_counters
                .refused_after
                .fetch_add(1, Ordering::Relaxed);
            tracing::warn!(%from, "DTLS handshake refused: {e}");
            return ChannelEnd::Refused(e);
        }
        let link = match Link::from_handshake(&s, from, session) {
            Ok(l) => Arc::new(l),
            Err(e) => return ChannelEnd::Unusable(e),
        };
        tracing::info!(%from, cipher = s.ssl().current_cipher().map(|c| c.name()).unwrap_or("?"), "DTLS established");
        free_buffers(&s);
        let tls_ip = session.tunnel.lock().peer.map(|p| p.ip());
        let established = self.peers.lock().establish(
            from,
            peer.id,
            link.clone(),
            link.id,
            peer.task.clone(),
            tls_ip,
        );
        match established {
            None => return ChannelEnd::Superseded,
            // The channel this address had before: this one replaces it.
            Some(Some(old)) => old.close(),
            Some(None) => {}
        }
        if let Some(old) = self.links.write().insert(session.id, link.clone()) {
            old.close();
        }
        let reason = self.channel_loop(s, &link, inbox).await;
        link.close();
        {
            let mut links = self.links.write();
            if links.get(&session.id).is_some_and(|l| l.id == link.id) {
                links.remove(&session.id);
            }
        }
        self.peers.lock().close_channel(link.id, link.addr());
        reason
    }

    /// The channel's life after the handshake. OpenSSL stays only until
    /// the client's first authenticated record: until then the client may
    /// not have our Finished and may ask for it again (OpenSSL answers
    /// its retransmitted flight); after it nothing of the handshake can
    /// come back, so the SSL object and its buffers (about 33 KiB) go, and
    /// the record layer opens the alerts that remain (close_notify).
    async fn channel_loop(
        &self,
        s: SslStream<DatagramIo>,
        link: &Link,
        inbox: &mut mpsc::Receiver<Vec<u8>>,
    ) -> ChannelEnd {
        let held = &self.handshake_counters.holding_openssl;
        held.fetch_add(1, Ordering::Relaxed);
        let mut ssl = Some(s);
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        let end = loop {
            if link.is_closed() {
                break ChannelEnd::Closed;
            }
            if link.channel.heard_from()
                && let Some(s) = ssl.take()
            {
                handshake::release(s);
                held.fetch_sub(1, Ordering::Relaxed);
            }
            tokio::select! {
                d = inbox.recv() => {
                    let Some(d) = d else { break ChannelEnd::QueueClosed };
                    let end = match ssl.as_mut() {
                        Some(s) => read_with_openssl(s, d),
                        None => read_alerts(&link.channel, d),
                    };
                    if let Some(end) = end {
                        break end;
                    }
                }
                _ = link.closed.notified() => {}
                _ = tick.tick() => {
                    if link.silent_for() > self.dpd * 3 {
                        break ChannelEnd::Silent(self.dpd * 3);
                    }
                }
            }
        };
        if let Some(s) = ssl {
            handshake::release(s);
            held.fetch_sub(1, Ordering::Relaxed);
        }
        end
    }
}

/// A datagram for the channel's OpenSSL (a retransmitted handshake flight
/// or an alert): what it says, if it ends the channel.
fn read_with_openssl(s: &mut SslStream<DatagramIo>, d: Vec<u8>) -> Option<ChannelEnd> {
    s.get_mut().inbox.push_back(d);
    // Rare: a buffer each time rather than 16 KiB held by every channel.
    let mut rec = vec![0u8; 16384];
    loop {
        match s.ssl_read(&mut rec) {
            Ok(0) => return Some(ChannelEnd::ClosedByClient),
            // Application data all goes through `Link`.
            Ok(_) => {}
            Err(e) if e.code() == ErrorCode::WANT_READ => {
                free_buffers(s);
                return None;
            }
            Err(e) if e.code() == ErrorCode::ZERO_RETURN => {
                return Some(ChannelEnd::ClosedByClient);
            }
            Err(e) => return Some(ChannelEnd::Read(e)),
        }
    }
}

/// A datagram for a channel without OpenSSL: its authenticated alerts end
/// the channel if they are a close_notify or fatal; anything else (a stray
/// handshake record, a forged or replayed alert) is dropped.
pub(super) fn read_alerts(channel: &record::Channel, mut d: Vec<u8>) -> Option<ChannelEnd> {
    let mut rest = &mut d[..];
    while let Some(n) = record::Channel::record_len(rest) {
        let (rec, tail) = rest.split_at_mut(n);
        rest = tail;
        if rec[0] != record::CONTENT_ALERT {
            continue;
        }
        match channel.open_alert(rec) {
            Ok(alert) if alert.ends_channel() => {
                return Some(match alert.level {
                    record::Alert::FATAL => ChannelEnd::Alert(alert.description),
                    _ => ChannelEnd::ClosedByClient,
                });
            }
            Ok(_) => {}
            Err(e) => tracing::trace!("DTLS alert dropped: {e:?}"),
        }
    }
    None
}

/// Lets go of OpenSSL's read and write buffers (about 33 KiB) while the
/// channel's SSL has nothing to do: the packet workers carry its records,
/// and an alert or a retransmitted handshake message now and then has
/// them taken again. Without this 10,000 DTLS clients held 330 MiB in
/// them (`SSL_MODE_RELEASE_BUFFERS` does not cover this).
fn free_buffers(s: &SslStream<DatagramIo>) {
    // SAFETY: a valid SSL, owned by `s`; OpenSSL keeps buffers that hold
    // pending data.
    unsafe { ffi::SSL_free_buffers(foreign_types::ForeignTypeRef::as_ptr(s.ssl())) };
}

/// OpenSSL's side of a peer: one datagram per read, one per write. Only
/// handshakes and alerts pass here.
#[derive(Debug)]
pub struct DatagramIo {
    pub(super) inbox: VecDeque<Vec<u8>>,
    pub(super) socket: Arc<UdpSocket>,
    pub(super) peer: SocketAddr,
    pub(super) local: Option<IpAddr>,
    /// The last sequence number OpenSSL used in epoch 1 (its Finished):
    /// our record layer continues from there.
    pub(super) last_epoch1_seq: Option<u64>,
}

impl io::Read for DatagramIo {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self.inbox.pop_front() {
            None => Err(io::ErrorKind::WouldBlock.into()),
            Some(d) => {
                let n = d.len().min(buf.len());
                buf[..n].copy_from_slice(&d[..n]);
                Ok(n)
            }
        }
    }
}

impl io::Write for DatagramIo {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if let Some(q) = record::last_seq_in(buf, 1) {
            self.last_epoch1_seq = self.last_epoch1_seq.max(Some(q));
        }
        // A full socket buffer drops the datagram, as the network would.
        batch::send_one(self.socket.as_raw_fd(), buf, self.peer, self.local);
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}
