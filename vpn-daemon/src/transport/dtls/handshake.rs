//! What a DTLS handshake may be, and the check that it was.
//!
//! A ClientHello reaches OpenSSL only if its session id is one we offered
//! at CONNECT ([`client_hello_session_id`]), and the offer decides the one
//! handshake its peer may complete ([`Offered`]):
//! - PSK-NEGOTIATE: a full handshake with a PSK suite, keyed with the TLS
//!   connection's exporter. Nothing else: no resumption, no other suite.
//! - Session resumption (Cisco): only the abbreviated handshake resuming
//!   the session we placed in OpenSSL's cache, in its one suite. There is
//!   no key for a full handshake: the PSK callback fails without one, and
//!   the peer's cipher list holds only the resumed suite, which has no
//!   certificate to do a full handshake with.
//!
//! After the handshake [`Offered::check`] refuses a channel whose
//! handshake was not that one. Before these checks, a resumption offer
//! handed out an all-zero PSK, and anyone who saw the session id (it
//! travels in clear in the Cisco client's ClientHello) could complete a
//! full PSK handshake with it and take the victim's data channel over
//! (audit C1): OpenSSL quietly falls back to a full handshake when, for
//! one, the ClientHello asks for the extended master secret, which the
//! cached session does not have.

use std::sync::OnceLock;

use crate::proto::connect::{DTLS12_SUITES, ResumeSuite};
use anyhow::Context as _;
use openssl::ssl::{
    Ssl, SslContext, SslContextBuilder, SslMethod, SslOptions, SslRef, SslSession, SslStream,
    SslVersion,
};

/// PSK suites of PSK-NEGOTIATE, strongest first (openconnect offers no
/// (EC)DHE-PSK). AES-GCM only: our record layer does those.
const PSK_SUITES: &str = "PSK-AES256-GCM-SHA384:PSK-AES128-GCM-SHA256";

/// The handshake a peer that sent an offered id may complete.
#[derive(Clone)]
pub enum Offered {
    /// PSK-NEGOTIATE: a full handshake with a PSK suite and this key.
    Psk([u8; 32]),
    /// Cisco resumption: only the abbreviated handshake resuming `session`
    /// (the client's master secret, our session id) in `suite`.
    Resume {
        session: SslSession,
        suite: ResumeSuite,
    },
}

/// Why an established DTLS channel was refused: its handshake was not the
/// one its offer allows.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum HandshakeRefused {
    #[error("a full handshake on a resumption offer")]
    NotResumed,
    #[error("a resumed session on a PSK offer")]
    ResumedOnPskOffer,
    #[error("the resumed session is not the offered one")]
    OtherSession,
    #[error("suite {got} where the offer allows {allowed}")]
    WrongSuite { got: String, allowed: &'static str },
}

impl Offered {
    /// A server SSL for a peer whose ClientHello carried this offer's id.
    pub fn ssl(&self, ctx: &SslContext) -> Result<Ssl, openssl::error::ErrorStack> {
        let mut ssl = Ssl::new(ctx)?;
        match self {
            Offered::Psk(key) => {
                ssl.set_cipher_list(PSK_SUITES)?;
                ssl.set_ex_data(psk_index(), *key);
            }
            // No key: a PSK suite cannot complete. One suite: the resumed
            // one, whose full handshake would need a certificate we lack.
            Offered::Resume { suite, .. } => ssl.set_cipher_list(suite.name)?,
        }
        Ok(ssl)
    }

    /// Whether the completed handshake on `ssl` is the one this offer
    /// allows.
    pub fn check(&self, ssl: &SslRef) -> Result<(), HandshakeRefused> {
        let got = ssl.current_cipher().map_or("none", |c| c.name());
        match self {
            Offered::Psk(_) => {
                if ssl.session_reused() {
                    return Err(HandshakeRefused::ResumedOnPskOffer);
                }
                if !PSK_SUITES.split(':').any(|s| s == got) {
                    return Err(HandshakeRefused::WrongSuite {
                        got: got.to_owned(),
                        allowed: PSK_SUITES,
                    });
                }
            }
            Offered::Resume { session, suite } => {
                if !ssl.session_reused() {
                    return Err(HandshakeRefused::NotResumed);
                }
                if ssl.session().map(|s| s.id()) != Some(session.id()) {
                    return Err(HandshakeRefused::OtherSession);
                }
                if got != suite.name {
                    return Err(HandshakeRefused::WrongSuite {
                        got: got.to_owned(),
                        allowed: suite.name,
                    });
                }
            }
        }
        Ok(())
    }
}

/// Where a PSK-mode peer's SSL keeps its key for the PSK callback.
fn psk_index() -> openssl::ex_data::Index<Ssl, [u8; 32]> {
    static INDEX: OnceLock<openssl::ex_data::Index<Ssl, [u8; 32]>> = OnceLock::new();
    *INDEX.get_or_init(|| Ssl::new_ex_index().expect("OpenSSL ex_data index"))
}

/// Session id context shared by our cached sessions and the context.
pub const SID_CTX: &[u8] = b"vpn-gateway-dtls";
const DTLS1_2_VERSION: i32 = 0xfefd;

/// The OpenSSL context every peer's handshake runs in. Each peer's SSL
/// narrows it to its offer ([`Offered::ssl`]).
pub fn server_context() -> anyhow::Result<SslContext> {
    let mut b = SslContextBuilder::new(SslMethod::dtls()).context("OpenSSL DTLS context")?;
    b.set_min_proto_version(Some(SslVersion::DTLS1_2))?;
    b.set_max_proto_version(Some(SslVersion::DTLS1_2))?;
    b.set_cipher_list(&format!(
        "{PSK_SUITES}:{}",
        DTLS12_SUITES.map(|s| s.name).join(":")
    ))?;
    b.set_session_id_context(SID_CTX)?;
    // The cache holds only the sessions resumption offers place in it
    // (`resumption_session`). A full PSK handshake's session is never
    // resumed (a PSK offer refuses that), so it is not stored: OpenSSL
    // would otherwise keep about 1.5 KiB per channel for 5 minutes.
    b.set_session_cache_mode(
        openssl::ssl::SslSessionCacheMode::SERVER
            | openssl::ssl::SslSessionCacheMode::NO_INTERNAL_STORE,
    );
    b.set_options(SslOptions::NO_TICKET | SslOptions::NO_QUERY_MTU);
    b.set_psk_server_callback(|ssl, _identity, out| {
        // The identity is always "psk": the key comes from the offer the
        // ClientHello was matched to. Only PSK offers have one; without
        // it the handshake fails.
        let psk = ssl
            .ex_data(psk_index())
            .copied()
            .ok_or_else(openssl::error::ErrorStack::get)?;
        out[..32].copy_from_slice(&psk);
        Ok(32)
    });
    Ok(b.build())
}

/// Lets go of a channel's completed handshake. OpenSSL removes the
/// session of an SSL freed without a shutdown from the cache
/// (`ssl_clear_bad_session`), which would take a resumption offer's
/// session away from the client's next handshake on the same offer; the
/// SSL is marked shut down first, and no alert is sent.
pub fn release<S: std::io::Read + std::io::Write>(mut s: SslStream<S>) {
    s.set_shutdown(openssl::ssl::ShutdownState::SENT | openssl::ssl::ShutdownState::RECEIVED);
}

/// Why a resumption offer could not be prepared (the tunnel goes on
/// without DTLS).
#[derive(Debug, thiserror::Error)]
pub enum ResumeError {
    #[error("OpenSSL: {0}")]
    Openssl(#[from] openssl::error::ErrorStack),
    #[error("OpenSSL lacks DTLS suite {0}")]
    MissingSuite(&'static str),
    #[error("building the DTLS session failed")]
    Build,
    #[error("OpenSSL's session cache refused the DTLS session")]
    CacheRefused,
}

/// A DTLS 1.2 session with the client's `master` secret, session id `sid`
/// and `suite`, placed in `ctx`'s cache so that the client's ClientHello
/// resumes it (Cisco mode). The caller removes it when the offer ends.
pub fn resumption_session(
    ctx: &SslContext,
    master: &[u8; 48],
    sid: &[u8; 32],
    suite: ResumeSuite,
) -> Result<SslSession, ResumeError> {
    use foreign_types::ForeignType;
    let probe = Ssl::new(ctx)?;
    // SAFETY: plain OpenSSL calls on objects we own; the SSL_SESSION is
    // handed to SslSession at once, which frees it (also on the errors
    // below).
    unsafe {
        let cipher = ffi::SSL_CIPHER_find(probe.as_ptr(), suite.id.as_ptr());
        if cipher.is_null() {
            return Err(ResumeError::MissingSuite(suite.name));
        }
        let raw = ffi::SSL_SESSION_new();
        if raw.is_null() {
            return Err(ResumeError::Build);
        }
        let sess = SslSession::from_ptr(raw);
        let ok = ffi::SSL_SESSION_set1_master_key(raw, master.as_ptr(), master.len()) == 1
            && ffi::SSL_SESSION_set1_id(raw, sid.as_ptr(), sid.len() as u32) == 1
            && ffi::SSL_SESSION_set1_id_context(raw, SID_CTX.as_ptr(), SID_CTX.len() as u32) == 1
            && ffi::SSL_SESSION_set_cipher(raw, cipher) == 1
            && ffi::SSL_SESSION_set_protocol_version(raw, DTLS1_2_VERSION) == 1;
        if !ok {
            return Err(ResumeError::Build);
        }
        ffi::SSL_SESSION_set_timeout(raw, 7 * 86400);
        if !ctx.add_session(&sess) {
            return Err(ResumeError::CacheRefused);
        }
        Ok(sess)
    }
}

/// The 32-byte session id of a DTLS 1.2 ClientHello that OpenSSL will
/// process as the first message of a handshake: a handshake record of
/// epoch 0 whose message is a whole ClientHello with message_seq 0 (a
/// fragment, a later message or another epoch is not matched, so the id we
/// match is the one OpenSSL reads).
///
/// Layout (RFC 6347 §4.1, §4.2.2): record header 13 bytes (type, version,
/// epoch, sequence, length), handshake header 12 (type, length, message_seq,
/// fragment_offset, fragment_length), client_version 2, random 32, then
/// the session id with its length byte.
pub fn client_hello_session_id(d: &[u8]) -> Option<[u8; 32]> {
    if !is_client_hello(d) {
        return None;
    }
    let be24 = |b: &[u8]| u32::from_be_bytes([0, b[0], b[1], b[2]]);
    let (rec, hs) = (d.get(..13)?, d.get(13..25)?);
    let epoch = u16::from_be_bytes([rec[3], rec[4]]);
    let (len, seq, off, frag) = (
        be24(&hs[1..4]),
        u16::from_be_bytes([hs[4], hs[5]]),
        be24(&hs[6..9]),
        be24(&hs[9..12]),
    );
    if epoch != 0 || seq != 0 || off != 0 || frag != len {
        return None;
    }
    let at = 13 + 12 + 2 + 32;
    if *d.get(at)? != 32 {
        return None;
    }
    d.get(at + 1..at + 33)?.try_into().ok()
}

/// Whether `d` starts with a handshake record holding a ClientHello.
pub fn is_client_hello(d: &[u8]) -> bool {
    d.len() > 13 && d[0] == 22 && d[13] == 1
}

mod ffi {
    use std::ffi::{c_int, c_long, c_uint};

    use openssl_sys::{SSL, SSL_CIPHER, SSL_SESSION};

    // Present in OpenSSL 1.1.1 and 3; openssl-sys does not declare them.
    // SAFETY: the signatures are those of OpenSSL 3's <openssl/ssl.h>
    // (unsigned int id lengths, size_t master-key length), unchanged
    // since 1.1.1.
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

#[cfg(test)]
pub(crate) mod tests {
    use std::{cell::RefCell, collections::VecDeque, io, rc::Rc};

    use openssl::ssl::{ErrorCode, SslStream};

    use super::*;

    #[test]
    fn session_id_only_from_a_whole_first_client_hello() {
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
        // Records OpenSSL would not take as the first ClientHello.
        let mut epoch = d.clone();
        epoch[4] = 5;
        assert_eq!(client_hello_session_id(&epoch), None, "epoch 5");
        let mut later = d.clone();
        later[13 + 5] = 3;
        assert_eq!(client_hello_session_id(&later), None, "message_seq 3");
        let mut fragment = d.clone();
        fragment[13 + 11] = 40;
        assert_eq!(client_hello_session_id(&fragment), None, "a fragment");
    }

    /// One end of an in-memory datagram link.
    #[derive(Debug)]
    pub(crate) struct Mem {
        pub rx: Rc<RefCell<VecDeque<Vec<u8>>>>,
        pub tx: Rc<RefCell<VecDeque<Vec<u8>>>>,
        /// The last epoch-1 sequence number this end wrote, as
        /// `DatagramIo` tracks it.
        pub last_epoch1_seq: Option<u64>,
    }

    impl io::Read for Mem {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            let d = self
                .rx
                .borrow_mut()
                .pop_front()
                .ok_or(io::ErrorKind::WouldBlock)?;
            buf[..d.len()].copy_from_slice(&d);
            Ok(d.len())
        }
    }

    impl io::Write for Mem {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            if let Some(q) = crate::transport::dtls::record::last_seq_in(buf, 1) {
                self.last_epoch1_seq = self.last_epoch1_seq.max(Some(q));
            }
            self.tx.borrow_mut().push_back(buf.to_vec());
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    /// Runs a handshake between a server SSL and a client SSL in memory;
    /// `Ok` with the server's stream if both ends completed it.
    fn handshake(mut server: Ssl, mut client: Ssl) -> Result<SslStream<Mem>, String> {
        server.set_mtu(1400).unwrap();
        client.set_mtu(1400).unwrap();
        let (a, b) = (Rc::default(), Rc::default());
        let mem = |rx: &Rc<_>, tx: &Rc<_>| Mem {
            rx: Rc::clone(rx),
            tx: Rc::clone(tx),
            last_epoch1_seq: None,
        };
        let mut s = SslStream::new(server, mem(&a, &b)).unwrap();
        let mut c = SslStream::new(client, mem(&b, &a)).unwrap();
        let (mut c_done, mut s_done) = (false, false);
        for _ in 0..20 {
            if !c_done {
                match c.connect() {
                    Ok(()) => c_done = true,
                    Err(e) if e.code() == ErrorCode::WANT_READ => {}
                    Err(e) => return Err(format!("client: {e}")),
                }
            }
            if !s_done {
                match s.accept() {
                    Ok(()) => s_done = true,
                    Err(e) if e.code() == ErrorCode::WANT_READ => {}
                    Err(e) => return Err(format!("server: {e}")),
                }
            }
        }
        if c_done && s_done {
            Ok(s)
        } else {
            Err("the handshake did not complete".into())
        }
    }

    /// A DTLS 1.2 client offering `ciphers`, with `psk` for PSK suites.
    fn client(ciphers: &str, psk: Option<[u8; 32]>, ems: bool) -> SslContextBuilder {
        let mut c = SslContextBuilder::new(SslMethod::dtls()).unwrap();
        c.set_cipher_list(ciphers).unwrap();
        c.set_max_proto_version(Some(SslVersion::DTLS1_2)).unwrap();
        // Sessions made by `resumption_session` carry our id context.
        c.set_session_id_context(SID_CTX).unwrap();
        let mut opts = SslOptions::NO_QUERY_MTU | SslOptions::NO_TICKET;
        if !ems {
            // SSL_OP_NO_EXTENDED_MASTER_SECRET, as Cisco-mode clients
            // resume (the shared protocol notes, §5.4).
            opts |= SslOptions::from_bits_retain(0x1);
        }
        c.set_options(opts);
        if let Some(psk) = psk {
            c.set_psk_client_callback(move |_, _, identity, key| {
                identity[..4].copy_from_slice(b"psk\0");
                key[..32].copy_from_slice(&psk);
                Ok(32)
            });
        }
        c
    }

    const MASTER: [u8; 48] = [0x11; 48];
    const SID: [u8; 32] = [0x22; 32];

    fn resume_offer(ctx: &SslContext, suite: ResumeSuite) -> Offered {
        Offered::Resume {
            session: resumption_session(ctx, &MASTER, &SID, suite).unwrap(),
            suite,
        }
    }

    /// A client that resumes the offered session: the one it was told
    /// (`sid`, `master`), so its ClientHello carries the offered id.
    fn resuming_client(master: &[u8; 48], suite: ResumeSuite, ems: bool) -> Ssl {
        let cctx = client(suite.name, None, ems).build();
        let sess = resumption_session(&cctx, master, &SID, suite).unwrap();
        let mut ssl = Ssl::new(&cctx).unwrap();
        // SAFETY: the session was made for this client's context.
        unsafe { ssl.set_session(&sess).unwrap() };
        ssl
    }

    /// Audit C1: someone who saw a resumption offer's session id runs a
    /// full PSK handshake with an all-zero key. It must not complete, and
    /// if it did, the channel must be refused.
    #[test]
    fn a_zero_psk_handshake_on_a_resumption_offer_fails() {
        let ctx = server_context().unwrap();
        let offer = resume_offer(&ctx, DTLS12_SUITES[1]);
        let attacker = client(PSK_SUITES, Some([0; 32]), true).build();
        let r = handshake(offer.ssl(&ctx).unwrap(), Ssl::new(&attacker).unwrap());
        let refused = match &r {
            Err(_) => true,
            Ok(s) => offer.check(s.ssl()).is_err(),
        };
        assert!(refused, "zero-key PSK handshake accepted");
    }

    /// Audit C1, the quiet way in: a ClientHello that carries the offered
    /// id but asks for the extended master secret, which the cached
    /// session lacks, so OpenSSL does not resume and falls back to a full
    /// handshake. The attacker does not know the master secret, and offers
    /// PSK with a zero key besides the resumed suite.
    #[test]
    fn a_client_hello_with_the_id_that_cannot_resume_gets_no_channel() {
        let ctx = server_context().unwrap();
        let suite = DTLS12_SUITES[3];
        let offer = resume_offer(&ctx, suite);
        let attacker = {
            let cctx = client(&format!("{PSK_SUITES}:{}", suite.name), Some([0; 32]), true).build();
            let sess = resumption_session(&cctx, &[0x99; 48], &SID, suite).unwrap();
            let mut ssl = Ssl::new(&cctx).unwrap();
            // SAFETY: the session was made for this client's context.
            unsafe { ssl.set_session(&sess).unwrap() };
            ssl
        };
        let r = handshake(offer.ssl(&ctx).unwrap(), attacker);
        let refused = match &r {
            Err(_) => true,
            Ok(s) => offer.check(s.ssl()).is_err(),
        };
        assert!(
            refused,
            "a full handshake on a resumption offer was accepted"
        );
    }

    /// The real modes still work: PSK-NEGOTIATE with the exporter's key,
    /// and resumption of the offered session in every suite we offer.
    #[test]
    fn the_offered_handshakes_complete_and_pass_the_check() {
        let ctx = server_context().unwrap();
        let key = [0x5a; 32];
        let offer = Offered::Psk(key);
        let c = client(PSK_SUITES, Some(key), true).build();
        let s = handshake(offer.ssl(&ctx).unwrap(), Ssl::new(&c).unwrap()).unwrap();
        assert_eq!(offer.check(s.ssl()), Ok(()));
        assert_eq!(cached(&ctx), 0, "a PSK channel's session is not kept");

        // A PSK client with the wrong key gets nothing.
        let c = client(PSK_SUITES, Some([0x5b; 32]), true).build();
        assert!(handshake(offer.ssl(&ctx).unwrap(), Ssl::new(&c).unwrap()).is_err());

        for suite in DTLS12_SUITES {
            let offer = resume_offer(&ctx, suite);
            // Twice: a client whose channel ended (silence, a new
            // address) resumes the same offer again, so the channel's end
            // must leave the offered session in the cache.
            for attempt in 0..2 {
                let s = handshake(
                    offer.ssl(&ctx).unwrap(),
                    resuming_client(&MASTER, suite, false),
                )
                .unwrap_or_else(|e| panic!("{} (attempt {attempt}): {e}", suite.name));
                assert!(s.ssl().session_reused(), "{}", suite.name);
                assert_eq!(offer.check(s.ssl()), Ok(()), "{}", suite.name);
                release(s);
            }
        }
        // The offers' sessions, one per id: the last one placed.
        assert_eq!(cached(&ctx), 1);
    }

    /// Sessions in `ctx`'s cache (`SSL_CTX_sess_number`).
    fn cached(ctx: &SslContext) -> i64 {
        const SSL_CTRL_SESS_NUMBER: std::ffi::c_int = 20;
        // SAFETY: a valid context; this control only reads.
        unsafe {
            openssl_sys::SSL_CTX_ctrl(
                foreign_types::ForeignType::as_ptr(ctx),
                SSL_CTRL_SESS_NUMBER,
                0,
                std::ptr::null_mut(),
            )
        }
    }

    /// The check itself: a PSK offer refuses a resumed session, a
    /// resumption offer a handshake in another suite.
    #[test]
    fn the_check_refuses_the_other_mode() {
        let ctx = server_context().unwrap();
        let psk = Offered::Psk([1; 32]);
        let suite = DTLS12_SUITES[3];
        let resume = resume_offer(&ctx, suite);
        let s = handshake(
            resume.ssl(&ctx).unwrap(),
            resuming_client(&MASTER, suite, false),
        )
        .unwrap();
        assert_eq!(psk.check(s.ssl()), Err(HandshakeRefused::ResumedOnPskOffer));
        let other = resume_offer(&ctx, DTLS12_SUITES[1]);
        assert!(matches!(
            other.check(s.ssl()),
            Err(HandshakeRefused::WrongSuite { .. })
        ));
    }
}
