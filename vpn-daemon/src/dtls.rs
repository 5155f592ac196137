//! The DTLS data channel, in both modes clients use:
//! - PSK-NEGOTIATE (openconnect, ocserv): the PSK is the TLS connection's
//!   RFC 5705 exporter;
//! - session resumption (Cisco clients; openconnect with X-DTLS12 ciphers):
//!   the client picks the master secret (`X-DTLS-Master-Secret`), we pick the
//!   session id and suite, and the DTLS 1.2 handshake "resumes" a session
//!   we place in OpenSSL's session cache beforehand.
//!
//! Not yet: batching, NAT rebinding, the XDP guard.
//!
//! At CONNECT the gateway derives a 32-byte PSK from the TLS connection
//! (RFC 5705 exporter, label `EXPORTER-openconnect-psk`, no context) and
//! announces a random App-ID. The client's DTLS 1.2 ClientHello carries the
//! App-ID as its session id: that is how a new UDP peer is matched to its
//! session before OpenSSL sees the datagram. Records then carry one type
//! byte (CSTP numbering) and one IP packet.
//!
//! OpenSSL (system OpenSSL 3 through the `openssl` crate) does the DTLS:
//! rustls has none. Each peer is a task driving a non-blocking `SslStream`
//! over [`DatagramIo`], which hands OpenSSL one datagram per read and sends
//! one per write.

use std::{
    collections::{HashMap, VecDeque},
    io,
    net::SocketAddr,
    sync::{
        Arc, Mutex, OnceLock,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::Context as _;
use openssl::ssl::{
    ErrorCode, HandshakeError, Ssl, SslContext, SslContextBuilder, SslMethod, SslOptions,
    SslStream, SslVersion,
};
use tokio::{net::UdpSocket, sync::mpsc};

use crate::{cstp::FrameType, session::Session};

/// Requested UDP socket buffer size (the kernel caps it at rmem_max/wmem_max).
const SOCKET_BUFFER: usize = 8 << 20;

/// The exporter label openconnect uses for the DTLS PSK.
pub const PSK_LABEL: &[u8] = b"EXPORTER-openconnect-psk";

/// Per-record overhead of DTLS 1.2 with an AES-GCM PSK suite: 13-byte
/// header, 8-byte explicit nonce, 16-byte tag, plus the type byte.
pub const DTLS_GCM_OVERHEAD: u16 = 13 + 8 + 16 + 1;

/// A session's DTLS offer: what a ClientHello with this App-ID (PSK mode)
/// or session id (resumption mode) gets.
struct Offer {
    session: Arc<Session>,
    /// PSK mode: the key. Resumption mode: unused (OpenSSL's cache holds
    /// the session).
    psk: [u8; 32],
    resumption: Option<openssl::ssl::SslSession>,
}

/// Cisco DTLS 1.2 suites we resume, strongest first:
/// (`X-DTLS12-CipherSuite` name, IANA id). Only names taken from the
/// client's own list are ever answered.
pub const DTLS12_SUITES: [(&str, [u8; 2]); 4] = [
    ("ECDHE-RSA-AES256-GCM-SHA384", [0xc0, 0x30]),
    ("AES256-GCM-SHA384", [0x00, 0x9d]),
    ("ECDHE-RSA-AES128-GCM-SHA256", [0xc0, 0x2f]),
    ("AES128-GCM-SHA256", [0x00, 0x9c]),
];

/// The strongest suite both sides support, from an `X-DTLS12-CipherSuite`
/// offer.
pub fn pick_dtls12_suite(offer: &str) -> Option<(&'static str, [u8; 2])> {
    DTLS12_SUITES
        .iter()
        .find(|(name, _)| offer.split(':').any(|c| c.trim() == *name))
        .copied()
}

mod ffi {
    use std::ffi::{c_int, c_long, c_uint};

    use openssl_sys::{SSL, SSL_CIPHER, SSL_SESSION};

    // Present in OpenSSL 1.1.1 and 3; openssl-sys does not declare them.
    unsafe extern "C" {
        pub fn SSL_SESSION_new() -> *mut SSL_SESSION;
        pub fn SSL_SESSION_set1_master_key(
            s: *mut SSL_SESSION,
            key: *const u8,
            len: usize,
        ) -> c_int;
        pub fn SSL_SESSION_set1_id(s: *mut SSL_SESSION, sid: *const u8, len: c_uint) -> c_int;
        pub fn SSL_SESSION_set1_id_context(
            s: *mut SSL_SESSION,
            ctx: *const u8,
            len: c_uint,
        ) -> c_int;
        pub fn SSL_SESSION_set_cipher(s: *mut SSL_SESSION, cipher: *const SSL_CIPHER) -> c_int;
        pub fn SSL_SESSION_set_protocol_version(s: *mut SSL_SESSION, version: c_int) -> c_int;
        pub fn SSL_SESSION_set_timeout(s: *mut SSL_SESSION, t: c_long) -> c_long;
        pub fn SSL_CIPHER_find(ssl: *mut SSL, ptr: *const u8) -> *const SSL_CIPHER;
    }
}

/// Session id context shared by our cached sessions and the context.
const SID_CTX: &[u8] = b"vpn-gateway-dtls";
const DTLS1_2_VERSION: i32 = 0xfefd;

/// The UDP side of the gateway.
pub struct DtlsServer {
    socket: Arc<UdpSocket>,
    ctx: SslContext,
    offers: Mutex<HashMap<[u8; 32], Offer>>,
    peers: Mutex<HashMap<SocketAddr, mpsc::Sender<Vec<u8>>>>,
    tun: Arc<crate::tun::Tun>,
    port: u16,
    /// DTLS dead-peer interval: the channel closes after 3 silent ones.
    dpd: Duration,
}

fn psk_index() -> openssl::ex_data::Index<Ssl, [u8; 32]> {
    static INDEX: OnceLock<openssl::ex_data::Index<Ssl, [u8; 32]>> = OnceLock::new();
    *INDEX.get_or_init(|| Ssl::new_ex_index().expect("OpenSSL ex_data index"))
}

impl DtlsServer {
    /// Binds the UDP port next to the TLS listener.
    pub async fn bind(
        addr: SocketAddr,
        tun: Arc<crate::tun::Tun>,
        dpd: Duration,
    ) -> anyhow::Result<Arc<Self>> {
        let socket = UdpSocket::bind(addr)
            .await
            .with_context(|| format!("binding DTLS on udp {addr}"))?;
        // Bursts from many clients must not overflow the default ~200 KB
        // buffers (ocserv loses datagrams there).
        let s = socket2::SockRef::from(&socket);
        let _ = s.set_recv_buffer_size(SOCKET_BUFFER);
        let _ = s.set_send_buffer_size(SOCKET_BUFFER);
        let mut b = SslContextBuilder::new(SslMethod::dtls()).context("OpenSSL DTLS context")?;
        b.set_min_proto_version(Some(SslVersion::DTLS1_2))?;
        b.set_max_proto_version(Some(SslVersion::DTLS1_2))?;
        // Plain PSK suites: openconnect offers no (EC)DHE-PSK.
        // PSK suites for PSK-NEGOTIATE; the others are only ever resumed.
        b.set_cipher_list(
            "PSK-AES256-GCM-SHA384:PSK-AES128-GCM-SHA256:PSK-CHACHA20-POLY1305:ECDHE-RSA-AES256-GCM-SHA384:AES256-GCM-SHA384:ECDHE-RSA-AES128-GCM-SHA256:AES128-GCM-SHA256",
        )?;
        b.set_session_id_context(SID_CTX)?;
        b.set_session_cache_mode(openssl::ssl::SslSessionCacheMode::SERVER);
        b.set_options(SslOptions::NO_TICKET | SslOptions::NO_QUERY_MTU);
        b.set_psk_server_callback(|ssl, _identity, out| {
            // The identity is always "psk": the key comes from the session
            // the ClientHello was matched to.
            let psk = ssl.ex_data(psk_index()).copied().unwrap_or([0u8; 32]);
            out[..32].copy_from_slice(&psk);
            Ok(32)
        });
        Ok(Arc::new(DtlsServer {
            port: socket.local_addr()?.port(),
            socket: Arc::new(socket),
            ctx: b.build(),
            offers: Mutex::new(HashMap::new()),
            peers: Mutex::new(HashMap::new()),
            tun,
            dpd,
        }))
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// Registers a session's PSK-mode offer; returns the App-ID to announce.
    pub fn offer(&self, session: Arc<Session>, psk: [u8; 32]) -> [u8; 32] {
        let mut app_id = [0u8; 32];
        rand::RngCore::fill_bytes(&mut rand::rngs::OsRng, &mut app_id);
        self.offers.lock().unwrap().insert(
            app_id,
            Offer {
                session,
                psk,
                resumption: None,
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
        suite: [u8; 2],
    ) -> anyhow::Result<[u8; 32]> {
        use foreign_types::ForeignType;
        let mut sid = [0u8; 32];
        rand::RngCore::fill_bytes(&mut rand::rngs::OsRng, &mut sid);
        let probe = Ssl::new(&self.ctx)?;
        // SAFETY: plain OpenSSL calls on objects we own; the SSL_SESSION is
        // handed to SslSession, which frees it.
        let sess = unsafe {
            let cipher = ffi::SSL_CIPHER_find(probe.as_ptr(), suite.as_ptr());
            anyhow::ensure!(!cipher.is_null(), "OpenSSL lacks DTLS suite {suite:02x?}");
            let raw = ffi::SSL_SESSION_new();
            anyhow::ensure!(!raw.is_null(), "SSL_SESSION_new failed");
            let sess = openssl::ssl::SslSession::from_ptr(raw);
            let ok = ffi::SSL_SESSION_set1_master_key(raw, master.as_ptr(), master.len()) == 1
                && ffi::SSL_SESSION_set1_id(raw, sid.as_ptr(), sid.len() as u32) == 1
                && ffi::SSL_SESSION_set1_id_context(raw, SID_CTX.as_ptr(), SID_CTX.len() as u32)
                    == 1
                && ffi::SSL_SESSION_set_cipher(raw, cipher) == 1
                && ffi::SSL_SESSION_set_protocol_version(raw, DTLS1_2_VERSION) == 1;
            anyhow::ensure!(ok, "building the DTLS session failed");
            ffi::SSL_SESSION_set_timeout(raw, 7 * 86400);
            anyhow::ensure!(
                self.ctx.add_session(&sess),
                "OpenSSL refused the DTLS session"
            );
            sess
        };
        self.offers.lock().unwrap().insert(
            sid,
            Offer {
                session,
                psk: [0; 32],
                resumption: Some(sess),
            },
        );
        Ok(sid)
    }

    /// Withdraws an offer (its TLS tunnel ended).
    pub fn withdraw(&self, id: &[u8; 32]) {
        if let Some(o) = self.offers.lock().unwrap().remove(id)
            && let Some(sess) = o.resumption
        {
            // SAFETY: the session was added to this context's cache.
            unsafe { self.ctx.remove_session(&sess) };
        }
    }

    /// Receives datagrams forever, handing each to its peer's task or
    /// starting a peer for a ClientHello whose session id is an App-ID.
    pub async fn serve(self: Arc<Self>) {
        let mut buf = vec![0u8; 65536];
        loop {
            let (n, from) = match self.socket.recv_from(&mut buf).await {
                Ok(x) => x,
                Err(e) => {
                    tracing::debug!("dtls recv: {e}");
                    continue;
                }
            };
            let d = buf[..n].to_vec();
            let known = self.peers.lock().unwrap().get(&from).cloned();
            if let Some(tx) = known
                && !is_client_hello(&d)
            {
                let _ = tx.try_send(d);
                continue;
            }
            let Some(app_id) = client_hello_session_id(&d) else {
                continue;
            };
            let offer = {
                let offers = self.offers.lock().unwrap();
                offers.get(&app_id).map(|o| (o.session.clone(), o.psk))
            };
            let Some((session, psk)) = offer else {
                tracing::debug!(%from, "DTLS ClientHello with an unknown App-ID");
                continue;
            };
            let (tx, rx) = mpsc::channel(256);
            let _ = tx.try_send(d);
            self.peers.lock().unwrap().insert(from, tx);
            let me = self.clone();
            tokio::spawn(async move {
                let reason = me.run_peer(from, session.clone(), psk, rx).await;
                tracing::info!(user = session.user, %from, "DTLS channel closed: {reason}");
                let mut peers = me.peers.lock().unwrap();
                if peers.get(&from).is_some_and(|tx| tx.is_closed()) {
                    peers.remove(&from);
                }
            });
        }
    }

    async fn run_peer(
        &self,
        from: SocketAddr,
        session: Arc<Session>,
        psk: [u8; 32],
        mut inbox: mpsc::Receiver<Vec<u8>>,
    ) -> String {
        let mut ssl = match Ssl::new(&self.ctx) {
            Ok(s) => s,
            Err(e) => return format!("OpenSSL: {e}"),
        };
        ssl.set_ex_data(psk_index(), psk);
        let _ = ssl.set_mtu(1400);
        let io = DatagramIo {
            inbox: VecDeque::new(),
            socket: self.socket.clone(),
            peer: from,
        };
        // Handshake: feed datagrams until OpenSSL is done.
        let mut mid = match ssl.accept(io) {
            Ok(s) => return self.run_channel(s, from, &session, &mut inbox).await,
            Err(HandshakeError::WouldBlock(m)) => m,
            Err(e) => return format!("handshake failed: {e}"),
        };
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            let d = match tokio::time::timeout_at(deadline.into(), inbox.recv()).await {
                Ok(Some(d)) => d,
                Ok(None) => return "replaced".into(),
                Err(_) => return "handshake timed out".into(),
            };
            mid.get_mut().inbox.push_back(d);
            match mid.handshake() {
                Ok(s) => return self.run_channel(s, from, &session, &mut inbox).await,
                Err(HandshakeError::WouldBlock(m)) => mid = m,
                Err(e) => return format!("handshake failed: {e}"),
            }
        }
    }

    /// The established channel: records from the client into the tunnel
    /// device, packets for the client out as records.
    async fn run_channel(
        &self,
        mut s: SslStream<DatagramIo>,
        from: SocketAddr,
        session: &Arc<Session>,
        inbox: &mut mpsc::Receiver<Vec<u8>>,
    ) -> String {
        tracing::info!(user = session.user, %from, cipher = s.ssl().current_cipher().map(|c| c.name()).unwrap_or("?"), "DTLS established");
        let (tx, mut out) = mpsc::channel::<Vec<u8>>(512);
        let since = Instant::now();
        let last_rx_ms = Arc::new(AtomicU64::new(0));
        static CHANNELS: AtomicU64 = AtomicU64::new(1);
        let channel = CHANNELS.fetch_add(1, Ordering::Relaxed);
        session.tunnel.lock().unwrap().dtls = Some(crate::session::DtlsHandle {
            channel,
            peer: from,
            to_client: tx,
            last_rx_ms: last_rx_ms.clone(),
            since,
        });
        let reason = self
            .channel_loop(&mut s, session, inbox, &mut out, &last_rx_ms, since)
            .await;
        let mut slot = session.tunnel.lock().unwrap();
        if slot.dtls.as_ref().is_some_and(|d| d.channel == channel) {
            slot.dtls = None;
        }
        reason
    }

    async fn channel_loop(
        &self,
        s: &mut SslStream<DatagramIo>,
        session: &Arc<Session>,
        inbox: &mut mpsc::Receiver<Vec<u8>>,
        out: &mut mpsc::Receiver<Vec<u8>>,
        last_rx_ms: &AtomicU64,
        since: Instant,
    ) -> String {
        let mut rec = vec![0u8; 16384];
        let mut frame = Vec::with_capacity(2048);
        let mut last_rx = Instant::now();
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        loop {
            tokio::select! {
                d = inbox.recv() => {
                    let Some(d) = d else { return "replaced".into() };
                    last_rx = Instant::now();
                    last_rx_ms.store(since.elapsed().as_millis() as u64, Ordering::Relaxed);
                    s.get_mut().inbox.push_back(d);
                    loop {
                        match s.ssl_read(&mut rec) {
                            Ok(0) => return "closed by client".into(),
                            Ok(n) => {
                                if let Some(reason) = self.handle_record(s, &rec[..n], session, &mut frame).await {
                                    return reason;
                                }
                            }
                            Err(e) if e.code() == ErrorCode::WANT_READ => break,
                            Err(e) if e.code() == ErrorCode::ZERO_RETURN => return "closed by client".into(),
                            Err(e) => return format!("read error: {e}"),
                        }
                    }
                }
                p = out.recv() => {
                    let Some(p) = p else { return "session ended".into() };
                    frame.clear();
                    frame.push(FrameType::Data as u8);
                    frame.extend_from_slice(&p);
                    if let Err(e) = s.ssl_write(&frame) {
                        return format!("write error: {e}");
                    }
                }
                _ = tick.tick() => {
                    if last_rx.elapsed() > self.dpd * 3 {
                        return format!("silent for {} s (3 x DTLS DPD)", (self.dpd * 3).as_secs());
                    }
                }
            }
        }
    }

    async fn handle_record(
        &self,
        s: &mut SslStream<DatagramIo>,
        rec: &[u8],
        session: &Arc<Session>,
        frame: &mut Vec<u8>,
    ) -> Option<String> {
        let (&ty, payload) = rec.split_first()?;
        match ty {
            t if t == FrameType::Data as u8 => {
                session.touch();
                if matches!(payload.first().map(|b| b >> 4), Some(4 | 6)) {
                    let _ = self.tun.send(payload).await;
                }
            }
            t if t == FrameType::DpdRequest as u8 => {
                // Echo verbatim with the type changed: openconnect's MTU
                // probe accepts nothing else.
                frame.clear();
                frame.push(FrameType::DpdResponse as u8);
                frame.extend_from_slice(payload);
                let _ = s.ssl_write(frame);
            }
            t if t == FrameType::Disconnect as u8 => return Some("client disconnect".into()),
            _ => {}
        }
        None
    }
}

/// One datagram per read, one per write.
#[derive(Debug)]
pub struct DatagramIo {
    inbox: VecDeque<Vec<u8>>,
    socket: Arc<UdpSocket>,
    peer: SocketAddr,
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
        // A full socket buffer drops the datagram, as the network would.
        let _ = self.socket.try_send_to(buf, self.peer);
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

fn is_client_hello(d: &[u8]) -> bool {
    d.len() > 13 && d[0] == 22 && d[13] == 1
}

/// The 32-byte session id of a DTLS ClientHello (record header 13 bytes,
/// handshake header 12, client_version 2, random 32, then the id).
pub fn client_hello_session_id(d: &[u8]) -> Option<[u8; 32]> {
    if !is_client_hello(d) {
        return None;
    }
    let off = 13 + 12 + 2 + 32;
    if *d.get(off)? != 32 {
        return None;
    }
    d.get(off + 1..off + 33)?.try_into().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn session_id_from_client_hello() {
        let mut d = vec![22, 0xfe, 0xff, 0, 0, 0, 0, 0, 0, 0, 0, 0, 100];
        d.extend_from_slice(&[1, 0, 0, 90, 0, 0, 0, 0, 0, 0, 0, 90]);
        d.extend_from_slice(&[0xfe, 0xfd]);
        d.extend_from_slice(&[7u8; 32]);
        d.push(32);
        d.extend_from_slice(&[0xaa; 32]);
        d.push(0);
        assert_eq!(client_hello_session_id(&d), Some([0xaa; 32]));
        let mut short = d.clone();
        short[13 + 12 + 2 + 32] = 16;
        assert_eq!(client_hello_session_id(&short), None);
        assert_eq!(client_hello_session_id(&d[..60]), None);
        let mut app_data = d.clone();
        app_data[0] = 23;
        assert_eq!(client_hello_session_id(&app_data), None);
    }
}
