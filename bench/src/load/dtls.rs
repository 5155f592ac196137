//! The simulated client's DTLS channel in PSK-NEGOTIATE mode
//! (../shared/protocol/anyconnect.md §5.3), as openconnect opens it: the
//! key is the TLS connection's exporter (`EXPORTER-openconnect-psk`, 32
//! bytes), the ClientHello carries the gateway's App-ID as its session id
//! (OpenSSL sends the id of a session it was given to resume; the gateway
//! does not resume it but runs a full PSK handshake), and each record
//! carries one CSTP-typed packet. OpenSSL (the daemon's own DTLS library)
//! runs over a connected, non-blocking UDP socket driven by tokio.

use std::{
    io,
    net::{IpAddr, SocketAddr},
    sync::Arc,
    time::Duration,
};

use openssl::{
    ex_data::Index,
    ssl::{
        ErrorCode, Ssl, SslContext, SslContextBuilder, SslMethod, SslOptions, SslStream, SslVersion,
    },
};
use tokio::net::UdpSocket;
use vpn_daemon::{
    proto::connect::ResumeSuite,
    transport::dtls::{
        handshake::{SID_CTX, resumption_session},
        task::retransmit_if_due,
    },
};

use super::peer::Failure;

/// The suites openconnect offers in PSK mode that OpenSSL has.
const PSK_SUITES: &str = "PSK-AES256-GCM-SHA384:PSK-AES128-GCM-SHA256";
/// The suite of the pretend session whose id carries the App-ID: one of
/// those offered, or OpenSSL would not send it.
const CARRIER: ResumeSuite = ResumeSuite {
    name: "PSK-AES128-GCM-SHA256",
    id: [0x00, 0xa8],
};

/// What every channel shares: one OpenSSL context, the key per
/// connection in its ex data.
pub struct Client {
    ctx: SslContext,
    key: Index<Ssl, [u8; 32]>,
}

impl Client {
    pub fn new() -> anyhow::Result<Arc<Self>> {
        let key = Ssl::new_ex_index::<[u8; 32]>()?;
        let mut c = SslContextBuilder::new(SslMethod::dtls())?;
        c.set_cipher_list(PSK_SUITES)?;
        c.set_min_proto_version(Some(SslVersion::DTLS1_2))?;
        c.set_max_proto_version(Some(SslVersion::DTLS1_2))?;
        c.set_options(SslOptions::NO_QUERY_MTU | SslOptions::NO_TICKET);
        // OpenSSL sends a session's id only when the id contexts match;
        // `resumption_session` stamps the daemon's.
        c.set_session_id_context(SID_CTX)?;
        c.set_psk_client_callback(move |ssl, _hint, identity, psk| {
            let k = ssl
                .ex_data(key)
                .ok_or_else(openssl::error::ErrorStack::get)?;
            identity[..4].copy_from_slice(b"psk\0");
            psk[..32].copy_from_slice(k);
            Ok(32)
        });
        Ok(Arc::new(Client {
            ctx: c.build(),
            key,
        }))
    }

    /// Opens the channel from `source` to the gateway's DTLS `server`.
    pub async fn connect(
        &self,
        source: IpAddr,
        server: SocketAddr,
        app_id: &[u8; 32],
        psk: [u8; 32],
        limit: Duration,
    ) -> Result<Channel, Failure> {
        let fail = |what: &str, e: &dyn std::fmt::Display| {
            say(format_args!("DTLS to {server} from {source}: {what}: {e}"));
            Failure::Dtls
        };
        let sock = UdpSocket::bind(SocketAddr::new(source, 0))
            .await
            .map_err(|e| match Failure::local(&e) {
                Failure::GeneratorDescriptors => Failure::GeneratorDescriptors,
                _ => fail("bind", &e),
            })?;
        sock.connect(server)
            .await
            .map_err(|e| fail("connect", &e))?;
        let sock = Arc::new(sock);
        let mut ssl = Ssl::new(&self.ctx).map_err(|e| fail("new", &e))?;
        ssl.set_ex_data(self.key, psk);
        ssl.set_mtu(1400).map_err(|e| fail("mtu", &e))?;
        // A session to "resume" whose id is the App-ID; its master secret
        // is never used (the gateway runs a full PSK handshake).
        let carrier = resumption_session(&self.ctx, &[0u8; 48], app_id, CARRIER)
            .map_err(|e| fail("the session to carry the App-ID", &e))?;
        // SAFETY: the session was made for this context.
        unsafe { ssl.set_session(&carrier) }.map_err(|e| fail("session", &e))?;
        let mut stream = SslStream::new(ssl, Udp(sock.clone())).map_err(|e| fail("stream", &e))?;
        let handshake = async {
            loop {
                match stream.connect() {
                    Ok(()) => return Ok(()),
                    Err(e) if e.code() == ErrorCode::WANT_READ => {
                        // No answer within OpenSSL's timer (1 s, then
                        // doubling): our flight goes again.
                        if tokio::time::timeout(Duration::from_secs(1), sock.readable())
                            .await
                            .is_err()
                        {
                            retransmit_if_due(stream.ssl());
                        }
                    }
                    Err(e) if e.code() == ErrorCode::WANT_WRITE => {
                        let _ = sock.writable().await;
                    }
                    Err(e) => return Err(fail("handshake", &e)),
                }
            }
        };
        let done = tokio::time::timeout(limit, handshake)
            .await
            .unwrap_or(Err(Failure::Timeout));
        // Out of the cache only now: removing a session marks it not
        // resumable, and OpenSSL would then send no id.
        // SAFETY: the session was made for this context.
        unsafe { self.ctx.remove_session(&carrier) };
        done?;
        Ok(Channel { stream, sock })
    }
}

/// Says why a channel failed, for the first few (a run of thousands would
/// otherwise bury the report).
fn say(what: std::fmt::Arguments<'_>) {
    static SAID: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    if SAID.fetch_add(1, std::sync::atomic::Ordering::Relaxed) < 10 {
        eprintln!("vpn-bench load: {what}");
    }
}

/// An established channel.
pub struct Channel {
    stream: SslStream<Udp>,
    sock: Arc<UdpSocket>,
}

impl Channel {
    /// Sends one record: the type byte, then `payload`.
    pub async fn send(&mut self, kind: u8, payload: &[u8]) -> Result<(), Failure> {
        let mut rec = Vec::with_capacity(1 + payload.len());
        rec.push(kind);
        rec.extend_from_slice(payload);
        loop {
            match self.stream.ssl_write(&rec) {
                Ok(_) => return Ok(()),
                Err(e) if e.code() == ErrorCode::WANT_WRITE => self
                    .sock
                    .writable()
                    .await
                    .map_err(|_| Failure::TunnelLost)?,
                Err(_) => return Err(Failure::TunnelLost),
            }
        }
    }

    /// The next record: its type and payload. Cancel-safe (it waits only
    /// for the socket to be readable).
    pub async fn recv(&mut self) -> Result<(u8, Vec<u8>), Failure> {
        let mut buf = vec![0u8; 2048];
        loop {
            match self.stream.ssl_read(&mut buf) {
                Ok(0) => continue,
                Ok(n) => return Ok((buf[0], buf[1..n].to_vec())),
                Err(e) if e.code() == ErrorCode::WANT_READ => self
                    .sock
                    .readable()
                    .await
                    .map_err(|_| Failure::TunnelLost)?,
                Err(e) if e.code() == ErrorCode::ZERO_RETURN => return Err(Failure::Terminated),
                Err(_) => return Err(Failure::TunnelLost),
            }
        }
    }
}

/// A connected UDP socket as OpenSSL's transport: a read is a datagram,
/// a write sends one; "would block" makes OpenSSL return WANT_READ or
/// WANT_WRITE.
struct Udp(Arc<UdpSocket>);

impl io::Read for Udp {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.0.try_recv(buf)
    }
}

impl io::Write for Udp {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.try_send(buf)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The first datagram is a ClientHello whose session id is the App-ID:
    /// what the gateway matches a handshake to its session by.
    #[tokio::test]
    async fn the_client_hello_carries_the_app_id() {
        let gw = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let server = gw.local_addr().unwrap();
        let client = Client::new().unwrap();
        let app_id = [0x5a; 32];
        let connecting = tokio::spawn(async move {
            client
                .connect(
                    "127.0.0.1".parse().unwrap(),
                    server,
                    &app_id,
                    [1; 32],
                    Duration::from_millis(300),
                )
                .await
                .err()
        });
        let mut buf = [0u8; 2048];
        let n = gw.recv(&mut buf).await.unwrap();
        assert_eq!(
            vpn_daemon::transport::dtls::handshake::client_hello_session_id(&buf[..n]),
            Some(app_id),
            "{:02x?}",
            &buf[..n.min(100)]
        );
        assert_eq!(connecting.await.unwrap(), Some(Failure::Timeout));
    }
}
