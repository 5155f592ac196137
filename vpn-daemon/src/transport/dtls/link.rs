//! An established channel as the data path sees it: the record layer's
//! keys taken from OpenSSL's completed handshake, where the client is, and
//! what the workers keep per channel (download window, rate pacers).

use std::{
    net::{IpAddr, SocketAddr},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use openssl::ssl::SslStream;
use parking_lot::Mutex;

use super::{record, task::DatagramIo};
use crate::{proto::cstp::FrameType, session::Session};

/// A completed handshake whose keys our record layer cannot take.
#[derive(Debug, thiserror::Error)]
pub enum UnusableChannel {
    #[error("cipher {0} is not an AES-GCM suite")]
    NotAesGcm(String),
    #[error("no session after the handshake")]
    NoSession,
    #[error("master secret of {0} bytes, not 48")]
    MasterSecret(usize),
}

/// An established DTLS channel as the data path sees it.
pub struct Link {
    pub id: u64,
    pub session: Arc<Session>,
    pub(super) channel: record::Channel,
    /// The client's current address (moves on NAT rebinding), and our
    /// local address it sends to (answers leave from there).
    pub(super) addr: Mutex<(SocketAddr, Option<IpAddr>)>,
    pub(super) since: Instant,
    /// Milliseconds after `since` of the last authenticated record.
    pub(super) last_rx_ms: AtomicU64,
    pub(super) is_closed: AtomicBool,
    pub(super) closed: tokio::sync::Notify,
    /// Download flow control from the client's TCP ACKs.
    pub(crate) window: crate::transport::dtls::flow_control::LinkWindow,
    /// The session's rate limits, each way (`paced.rs`).
    pub(super) pace_up: Mutex<crate::transport::pacing::Pacer>,
    pub(super) pace_down: Mutex<crate::transport::pacing::Pacer>,
}

impl Link {
    pub(super) fn from_handshake(
        s: &SslStream<DatagramIo>,
        from: SocketAddr,
        session: &Arc<Session>,
    ) -> Result<Link, UnusableChannel> {
        let first_seq = s.get_ref().last_epoch1_seq.map_or(0, |q| q + 1);
        let channel = channel_from(s.ssl(), first_seq)?;
        static IDS: AtomicU64 = AtomicU64::new(1);
        Ok(Link {
            id: IDS.fetch_add(1, Ordering::Relaxed),
            session: session.clone(),
            channel,
            addr: Mutex::new((from, s.get_ref().local)),
            since: Instant::now(),
            last_rx_ms: AtomicU64::new(0),
            is_closed: AtomicBool::new(false),
            closed: tokio::sync::Notify::new(),
            window: Default::default(),
            pace_up: Default::default(),
            pace_down: Default::default(),
        })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr.lock().0
    }

    /// Seals the `len` payload bytes at [`PACKET_OFFSET`] of `buf` as one
    /// record holding a frame of type `ty`; returns the record's length.
    pub(super) fn seal_frame(&self, buf: &mut [u8], ty: FrameType, len: usize) -> usize {
        buf[record::PREFIX_LEN] = ty as u8;
        self.channel.seal(buf, len + 1)
    }

    /// Where records go: the client's address and our source address.
    pub fn path(&self) -> (SocketAddr, Option<IpAddr>) {
        *self.addr.lock()
    }

    pub(super) fn touch(&self) {
        self.last_rx_ms
            .store(self.since.elapsed().as_millis() as u64, Ordering::Relaxed);
    }

    /// Time since the client's last authenticated record.
    pub fn silent_for(&self) -> Duration {
        self.since.elapsed().saturating_sub(Duration::from_millis(
            self.last_rx_ms.load(Ordering::Relaxed),
        ))
    }

    /// Ends the channel (its task exits and forgets the peer).
    pub fn close(&self) {
        self.is_closed.store(true, Ordering::Relaxed);
        self.closed.notify_one();
    }

    pub fn is_closed(&self) -> bool {
        self.is_closed.load(Ordering::Relaxed)
    }
}

/// The record layer of a completed handshake, continuing after sequence
/// number `first_seq` of epoch 1.
fn channel_from(
    ssl: &openssl::ssl::SslRef,
    first_seq: u64,
) -> Result<record::Channel, UnusableChannel> {
    let name = ssl.current_cipher().map(|c| c.name()).unwrap_or("none");
    let suite = record::Suite::from_openssl_name(name)
        .ok_or_else(|| UnusableChannel::NotAesGcm(name.to_owned()))?;
    let sess = ssl.session().ok_or(UnusableChannel::NoSession)?;
    let mut master = [0u8; 48];
    let n = sess.master_key(&mut master);
    if n != 48 {
        return Err(UnusableChannel::MasterSecret(n));
    }
    let (mut cr, mut sr) = ([0u8; 32], [0u8; 32]);
    ssl.client_random(&mut cr);
    ssl.server_random(&mut sr);
    let (client, server) = record::key_block(suite, &master, &cr, &sr);
    Ok(record::Channel::new(suite, 1, &client, &server, first_seq))
}

#[cfg(test)]
mod tests {
    use std::collections::VecDeque;

    use openssl::ssl::{ErrorCode, Ssl, SslContextBuilder, SslMethod, SslOptions, SslVersion};

    use super::*;
    use crate::transport::dtls::handshake::{Offered, server_context, tests::Mem};
    use crate::transport::dtls::task::{ChannelEnd, read_alerts};

    /// Our record layer against OpenSSL's DTLS client: after a real PSK
    /// handshake, records we seal are read by OpenSSL and records OpenSSL
    /// writes open here, in both AES-GCM suites, over many records (the
    /// client's replay window must accept where our sequence continues).
    #[test]
    fn record_layer_interoperates_with_openssl() {
        for suite in ["PSK-AES256-GCM-SHA384", "PSK-AES128-GCM-SHA256"] {
            let a = std::rc::Rc::new(std::cell::RefCell::new(VecDeque::new()));
            let b = std::rc::Rc::new(std::cell::RefCell::new(VecDeque::new()));
            let psk = [0x5a; 32];
            let mut cctx = SslContextBuilder::new(SslMethod::dtls()).unwrap();
            cctx.set_cipher_list(suite).unwrap();
            cctx.set_max_proto_version(Some(SslVersion::DTLS1_2))
                .unwrap();
            cctx.set_options(SslOptions::NO_QUERY_MTU);
            cctx.set_psk_client_callback(move |_, _, identity, key| {
                identity[..4].copy_from_slice(b"psk\0");
                key[..32].copy_from_slice(&psk);
                Ok(32)
            });
            let cctx = cctx.build();
            let mut sssl = Offered::Psk(psk).ssl(&server_context().unwrap()).unwrap();
            sssl.set_mtu(1400).unwrap();
            let mut server = SslStream::new(
                sssl,
                Mem {
                    rx: a.clone(),
                    tx: b.clone(),
                    last_epoch1_seq: None,
                },
            )
            .unwrap();
            let mut cssl = Ssl::new(&cctx).unwrap();
            cssl.set_mtu(1400).unwrap();
            let mut client = SslStream::new(
                cssl,
                Mem {
                    rx: b.clone(),
                    tx: a.clone(),
                    last_epoch1_seq: None,
                },
            )
            .unwrap();
            let (mut c_done, mut s_done) = (false, false);
            for _ in 0..20 {
                if !c_done {
                    match client.connect() {
                        Ok(()) => c_done = true,
                        Err(e) => assert_eq!(e.code(), ErrorCode::WANT_READ, "client: {e}"),
                    }
                }
                if !s_done {
                    match server.accept() {
                        Ok(()) => s_done = true,
                        Err(e) => assert_eq!(e.code(), ErrorCode::WANT_READ, "server: {e}"),
                    }
                }
            }
            assert!(c_done && s_done, "handshake with {suite}");
            assert_eq!(client.ssl().current_cipher().unwrap().name(), suite);
            // Whatever the handshake left in flight is consumed.
            while client.ssl_read(&mut [0u8; 64]).is_ok() {}
            let first = server.get_ref().last_epoch1_seq.map_or(0, |q| q + 1);
            let ch = channel_from(server.ssl(), first).unwrap();
            assert!(!ch.heard_from());

            for i in 0..200u32 {
                // Client to us.
                let msg = format!("\0packet {i} from the client");
                client.ssl_write(msg.as_bytes()).unwrap();
                let mut d = a.borrow_mut().pop_front().unwrap();
                assert_eq!(ch.open(&mut d).unwrap(), msg.as_bytes());
                // Us to the client.
                let reply = format!("\0packet {i} to the client");
                let mut buf = vec![0u8; 200];
                buf[record::PREFIX_LEN..record::PREFIX_LEN + reply.len()]
                    .copy_from_slice(reply.as_bytes());
                let n = ch.seal(&mut buf, reply.len());
                b.borrow_mut().push_back(buf[..n].to_vec());
                let mut got = [0u8; 200];
                let n = client.ssl_read(&mut got).expect("OpenSSL reads our record");
                assert_eq!(&got[..n], reply.as_bytes());
            }
            assert!(ch.heard_from());
            // The client's close_notify, once OpenSSL is gone on our side,
            // ends the channel; a copy of it does nothing.
            client.shutdown().unwrap();
            let d = a.borrow_mut().pop_front().unwrap();
            let mut copy = d.clone();
            assert!(matches!(
                read_alerts(&ch, d),
                Some(ChannelEnd::ClosedByClient)
            ));
            assert_eq!(ch.open_alert(&mut copy), Err(record::OpenError::Replayed));
            assert!(read_alerts(&ch, copy).is_none());
        }
    }
}
