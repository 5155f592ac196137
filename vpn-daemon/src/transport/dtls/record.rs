//! The DTLS 1.2 record layer of an established channel.
//!
//! OpenSSL does the handshake; the records that carry packets afterwards
//! are sealed and opened here, in place, with no allocation and no lock
//! shared between the two directions. That keeps a packet on the thread
//! that received it, lets the UDP side work in batches, and costs one
//! AES-GCM operation per packet — OpenSSL's `SSL_read`/`SSL_write` per
//! datagram (a BIO round trip, a copy each way, a lock for the whole
//! connection) was the largest user-space cost of the first version.
//!
//! Only the AEAD suites we negotiate are handled: AES-128-GCM and
//! AES-256-GCM (RFC 5288), with the TLS 1.2 PRF (RFC 5246 §5) to expand
//! the master secret OpenSSL agreed on into keys.
//!
//! Record (RFC 6347 §4.1): type(1) version(2) epoch(2) seq(6) length(2),
//! then explicit nonce(8) ciphertext tag(16). AAD = epoch‖seq‖type‖
//! version‖plaintext length; nonce = salt(4)‖explicit nonce(8), where we
//! send epoch‖seq as the explicit nonce (unique per key).

use std::sync::atomic::{AtomicU64, Ordering};

use parking_lot::Mutex;

use ring::{aead, hmac};

pub const HEADER_LEN: usize = 13;
pub const EXPLICIT_NONCE_LEN: usize = 8;
pub const TAG_LEN: usize = 16;
/// Bytes in front of the plaintext in a sealed record.
pub const PREFIX_LEN: usize = HEADER_LEN + EXPLICIT_NONCE_LEN;
/// What a record adds to its plaintext.
pub const OVERHEAD: usize = PREFIX_LEN + TAG_LEN;

/// The largest record: header and at most 2^14 + 2048 bytes of
/// ciphertext (RFC 6347 §4.1 via RFC 5246 §6.2.3). A longer one is
/// malformed whatever the datagram holds.
pub const MAX_RECORD_LEN: usize = HEADER_LEN + (1 << 14) + 2048;

pub const CONTENT_ALERT: u8 = 21;
pub const CONTENT_APPLICATION_DATA: u8 = 23;
pub const DTLS12: [u8; 2] = [0xfe, 0xfd];
const SEQ_MASK: u64 = (1 << 48) - 1;

/// The AEAD suites whose records we handle ourselves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Suite {
    Aes128Gcm,
    Aes256Gcm,
}

impl Suite {
    /// From OpenSSL's cipher name (`PSK-AES256-GCM-SHA384`,
    /// `ECDHE-RSA-AES128-GCM-SHA256`, ...).
    pub fn from_openssl_name(name: &str) -> Option<Suite> {
        if name.contains("AES256-GCM-SHA384") {
            Some(Suite::Aes256Gcm)
        } else if name.contains("AES128-GCM-SHA256") {
            Some(Suite::Aes128Gcm)
        } else {
            None
        }
    }

    fn key_len(self) -> usize {
        match self {
            Suite::Aes128Gcm => 16,
            Suite::Aes256Gcm => 32,
        }
    }

    fn aead(self) -> &'static aead::Algorithm {
        match self {
            Suite::Aes128Gcm => &aead::AES_128_GCM,
            Suite::Aes256Gcm => &aead::AES_256_GCM,
        }
    }

    fn prf(self) -> hmac::Algorithm {
        match self {
            Suite::Aes128Gcm => hmac::HMAC_SHA256,
            Suite::Aes256Gcm => hmac::HMAC_SHA384,
        }
    }
}

/// The TLS 1.2 PRF: P_hash(secret, label ‖ seed), `out.len()` bytes.
pub fn prf(alg: hmac::Algorithm, secret: &[u8], label: &[u8], seed: &[u8], out: &mut [u8]) {
    let key = hmac::Key::new(alg, secret);
    let label_seed = [label, seed].concat();
    let mut a = hmac::sign(&key, &label_seed);
    let mut filled = 0;
    while filled < out.len() {
        let mut ctx = hmac::Context::with_key(&key);
        ctx.update(a.as_ref());
        ctx.update(&label_seed);
        let block = ctx.sign();
        let n = block.as_ref().len().min(out.len() - filled);
        out[filled..filled + n].copy_from_slice(&block.as_ref()[..n]);
        filled += n;
        a = hmac::sign(&key, a.as_ref());
    }
}

/// One direction's key and implicit salt.
pub struct DirectionKeys {
    key: Vec<u8>,
    salt: [u8; 4],
}

/// Both directions' keys from the key block (RFC 5246 §6.3; AEAD suites
/// have no MAC keys).
pub fn key_block(
    suite: Suite,
    master: &[u8],
    client_random: &[u8; 32],
    server_random: &[u8; 32],
) -> (DirectionKeys, DirectionKeys) {
    let k = suite.key_len();
    let mut block = vec![0u8; 2 * k + 8];
    let seed = [&server_random[..], &client_random[..]].concat();
    prf(suite.prf(), master, b"key expansion", &seed, &mut block);
    let client = DirectionKeys {
        key: block[..k].to_vec(),
        salt: block[2 * k..2 * k + 4].try_into().unwrap(),
    };
    let server = DirectionKeys {
        key: block[k..2 * k].to_vec(),
        salt: block[2 * k + 4..2 * k + 8].try_into().unwrap(),
    };
    (client, server)
}

/// Why a record was not accepted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OpenError {
    /// Not a DTLS 1.2 application-data record of our epoch.
    NotOurs,
    /// Length field and datagram disagree.
    Malformed,
    /// Seen before, or older than the window.
    Replayed,
    /// The tag did not verify.
    Forged,
}

/// An alert the peer sent (RFC 5246 §7.2).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Alert {
    pub level: u8,
    pub description: u8,
}

impl Alert {
    pub const FATAL: u8 = 2;
    pub const CLOSE_NOTIFY: u8 = 0;

    /// Whether the channel ends with it: a close_notify or any fatal alert.
    pub fn ends_channel(self) -> bool {
        self.level == Self::FATAL || self.description == Self::CLOSE_NOTIFY
    }
}

/// RFC 6347 §4.1.2.6 anti-replay window of 64 records.
#[derive(Debug, Default, Clone, Copy)]
pub struct ReplayWindow {
    /// Highest sequence number accepted, plus one (0 = none yet).
    next: u64,
    /// Bit i = `next - 1 - i` was accepted.
    bits: u64,
}

impl ReplayWindow {
    pub fn check(&self, seq: u64) -> bool {
        if self.next == 0 || seq >= self.next {
            return true;
        }
        let back = self.next - 1 - seq;
        back < 64 && self.bits & (1 << back) == 0
    }

    /// Whether `seq` is newer than every accepted sequence number.
    pub fn is_newest(&self, seq: u64) -> bool {
        seq >= self.next
    }

    /// Marks `seq` accepted (after its tag verified).
    pub fn mark(&mut self, seq: u64) {
        if self.next == 0 || seq >= self.next {
            let shift = if self.next == 0 {
                64
            } else {
                seq + 1 - self.next
            };
            self.bits = if shift >= 64 { 0 } else { self.bits << shift };
            self.bits |= 1;
            self.next = seq + 1;
        } else {
            self.bits |= 1 << (self.next - 1 - seq);
        }
    }
}

/// The record state of one established channel.
pub struct Channel {
    epoch: u16,
    open_key: aead::LessSafeKey,
    open_salt: [u8; 4],
    seal_key: aead::LessSafeKey,
    seal_salt: [u8; 4],
    /// Next sequence number we send.
    tx_seq: AtomicU64,
    window: Mutex<ReplayWindow>,
}

impl Channel {
    /// `open` keys decrypt what the peer sends, `seal` keys what we send;
    /// `first_seq` continues after the records the handshake sent in
    /// `epoch` (the peer's replay window must not see a jump).
    pub fn new(
        suite: Suite,
        epoch: u16,
        open: &DirectionKeys,
        seal: &DirectionKeys,
        first_seq: u64,
    ) -> Channel {
        let key = |k: &DirectionKeys| {
            aead::LessSafeKey::new(aead::UnboundKey::new(suite.aead(), &k.key).expect("key length"))
        };
        Channel {
            epoch,
            open_key: key(open),
            open_salt: open.salt,
            seal_key: key(seal),
            seal_salt: seal.salt,
            tx_seq: AtomicU64::new(first_seq),
            window: Mutex::new(ReplayWindow::default()),
        }
    }

    /// Seals `buf[PREFIX_LEN..PREFIX_LEN + len]` in place into one record;
    /// `buf` must have `TAG_LEN` spare bytes after the plaintext. Returns
    /// the record's length.
    pub fn seal(&self, buf: &mut [u8], len: usize) -> usize {
        let seq = self.tx_seq.fetch_add(1, Ordering::Relaxed) & SEQ_MASK;
        let es = (u64::from(self.epoch) << 48) | seq;
        let es_bytes = es.to_be_bytes();
        buf[0] = CONTENT_APPLICATION_DATA;
        buf[1..3].copy_from_slice(&DTLS12);
        buf[3..11].copy_from_slice(&es_bytes);
        let frag_len = (EXPLICIT_NONCE_LEN + len + TAG_LEN) as u16;
        buf[11..13].copy_from_slice(&frag_len.to_be_bytes());
        buf[HEADER_LEN..PREFIX_LEN].copy_from_slice(&es_bytes);
        let aad = aad(&es_bytes, CONTENT_APPLICATION_DATA, len as u16);
        let nonce = nonce(&self.seal_salt, &es_bytes);
        let (plain, rest) = buf[PREFIX_LEN..].split_at_mut(len);
        let tag = self
            .seal_key
            .seal_in_place_separate_tag(nonce, aead::Aad::from(aad), plain)
            .expect("AES-GCM seal cannot fail for packet sizes");
        rest[..TAG_LEN].copy_from_slice(tag.as_ref());
        PREFIX_LEN + len + TAG_LEN
    }

    /// The first record in `d`: its total length, if the header is sane.
    pub fn record_len(d: &[u8]) -> Option<usize> {
        if d.len() < HEADER_LEN {
            return None;
        }
        let n = HEADER_LEN + usize::from(u16::from_be_bytes([d[11], d[12]]));
        (n <= d.len() && n <= MAX_RECORD_LEN).then_some(n)
    }

    /// Whether `d` is a whole number of records, each of a legal length:
    /// the lengths from the wire tile the datagram exactly.
    pub fn tiles(mut d: &[u8]) -> bool {
        while !d.is_empty() {
            match Self::record_len(d) {
                Some(n) => d = &d[n..],
                None => return false,
            }
        }
        true
    }

    /// Whether `rec` is an application-data record of this channel's epoch
    /// newer than any it accepted — the cheap test before trying its tag
    /// on a record from a new address (a replayed older one must not move
    /// the channel).
    pub fn is_newest(&self, rec: &[u8]) -> bool {
        rec.len() >= PREFIX_LEN + TAG_LEN
            && rec[0] == CONTENT_APPLICATION_DATA
            && rec[1..3] == DTLS12
            && u16::from_be_bytes([rec[3], rec[4]]) == self.epoch
            && self.window.lock().is_newest(seq_of(rec))
    }

    /// Opens one application-data record (exactly `rec`) in place;
    /// returns the plaintext. The replay window moves only for records
    /// whose tag verified.
    pub fn open<'a>(&self, rec: &'a mut [u8]) -> Result<&'a mut [u8], OpenError> {
        self.open_as(CONTENT_APPLICATION_DATA, rec)
    }

    /// Opens one alert record (exactly `rec`) of this channel's epoch: how
    /// a client's close_notify arrives once OpenSSL has let go of the
    /// channel.
    pub fn open_alert(&self, rec: &mut [u8]) -> Result<Alert, OpenError> {
        match *self.open_as(CONTENT_ALERT, rec)? {
            [level, description] => Ok(Alert { level, description }),
            _ => Err(OpenError::Malformed),
        }
    }

    /// Whether any record of the peer has authenticated yet: a peer that
    /// sends in the channel's epoch has our last handshake flight, so
    /// nothing of the handshake can be asked for again.
    pub fn heard_from(&self) -> bool {
        self.window.lock().next != 0
    }

    fn open_as<'a>(&self, content: u8, rec: &'a mut [u8]) -> Result<&'a mut [u8], OpenError> {
        if rec.len() < HEADER_LEN
            || rec[0] != content
            || rec[1..3] != DTLS12
            || u16::from_be_bytes([rec[3], rec[4]]) != self.epoch
        {
            return Err(OpenError::NotOurs);
        }
        if Self::record_len(rec) != Some(rec.len()) || rec.len() < PREFIX_LEN + TAG_LEN {
            return Err(OpenError::Malformed);
        }
        let seq = seq_of(rec);
        if !self.window.lock().check(seq) {
            return Err(OpenError::Replayed);
        }
        let es: [u8; 8] = rec[3..11].try_into().unwrap();
        let explicit: [u8; 8] = rec[HEADER_LEN..PREFIX_LEN].try_into().unwrap();
        let plain_len = rec.len() - PREFIX_LEN - TAG_LEN;
        let aad = aad(&es, content, plain_len as u16);
        let nonce = nonce(&self.open_salt, &explicit);
        let plain = self
            .open_key
            .open_in_place(nonce, aead::Aad::from(aad), &mut rec[PREFIX_LEN..])
            .map_err(|_| OpenError::Forged)?;
        let mut w = self.window.lock();
        // A duplicate may have raced in between check and mark.
        if !w.check(seq) {
            return Err(OpenError::Replayed);
        }
        w.mark(seq);
        Ok(plain)
    }
}

fn seq_of(rec: &[u8]) -> u64 {
    u64::from_be_bytes([0, 0, rec[5], rec[6], rec[7], rec[8], rec[9], rec[10]])
}

fn aad(es: &[u8; 8], content: u8, plain_len: u16) -> [u8; 13] {
    let mut a = [0u8; 13];
    a[..8].copy_from_slice(es);
    a[8] = content;
    a[9..11].copy_from_slice(&DTLS12);
    a[11..13].copy_from_slice(&plain_len.to_be_bytes());
    a
}

fn nonce(salt: &[u8; 4], explicit: &[u8; 8]) -> aead::Nonce {
    let mut n = [0u8; 12];
    n[..4].copy_from_slice(salt);
    n[4..].copy_from_slice(explicit);
    aead::Nonce::assume_unique_for_key(n)
}

/// The highest (epoch, sequence) among the records in a datagram we sent,
/// so the record layer can continue where OpenSSL's handshake stopped.
pub fn last_seq_in(d: &[u8], epoch: u16) -> Option<u64> {
    let mut rest = d;
    let mut max = None;
    while let Some(n) = Channel::record_len(rest) {
        if u16::from_be_bytes([rest[3], rest[4]]) == epoch {
            max = max.max(Some(seq_of(rest)));
        }
        rest = &rest[n..];
    }
    max
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prf_matches_rfc_test_vector() {
        // TLS 1.2 PRF (SHA-256) test vector widely used for RFC 5246
        // implementations (from the IETF TLS WG mailing list).
        let secret = hex::decode("9bbe436ba940f017b17652849a71db35").unwrap();
        let seed = hex::decode("a0ba9f936cda311827a6f796ffd5198c").unwrap();
        let mut out = [0u8; 100];
        prf(hmac::HMAC_SHA256, &secret, b"test label", &seed, &mut out);
        assert_eq!(
            hex::encode(&out[..32]),
            "e3f229ba727be17b8d122620557cd453c2aab21d07c3d495329b52d4e61edb5a"
        );
        assert_eq!(hex::encode(&out[96..]), "87347b66");
    }

    #[test]
    fn replay_window() {
        let mut w = ReplayWindow::default();
        assert!(w.check(5));
        w.mark(5);
        assert!(!w.check(5));
        assert!(w.check(4));
        assert!(w.check(6));
        w.mark(100);
        assert!(!w.check(36), "64 behind is outside the window");
        assert!(w.check(37));
        w.mark(37);
        assert!(!w.check(37));
        assert!(!w.check(100));
        w.mark(1000);
        assert!(w.check(999) && !w.check(1000) && !w.check(936));
        // Only records beyond everything accepted may move a channel: an
        // unseen older one (999) could be a copy raced ahead of the client.
        assert!(w.is_newest(1001) && !w.is_newest(1000) && !w.is_newest(999));
    }

    #[test]
    fn which_alerts_end_a_channel() {
        let alert = |level, description| Alert { level, description };
        assert!(alert(1, Alert::CLOSE_NOTIFY).ends_channel());
        assert!(alert(Alert::FATAL, 20).ends_channel(), "bad_record_mac");
        assert!(
            !alert(1, 100).ends_channel(),
            "no_renegotiation is a warning"
        );
    }

    /// Server and client views of one channel, the client keyed the other
    /// way round.
    fn pair(suite: Suite) -> (Channel, Channel) {
        let master = [7u8; 48];
        let (c, s) = key_block(suite, &master, &[1; 32], &[2; 32]);
        (
            Channel::new(suite, 1, &c, &s, 10),
            Channel::new(suite, 1, &s, &c, 0),
        )
    }

    #[test]
    fn seal_open_round_trip_and_tamper() {
        for suite in [Suite::Aes128Gcm, Suite::Aes256Gcm] {
            let (server, client) = pair(suite);
            let mut buf = vec![0u8; PREFIX_LEN + 100 + TAG_LEN];
            buf[PREFIX_LEN..PREFIX_LEN + 100].copy_from_slice(&[0x45; 100]);
            let n = server.seal(&mut buf, 100);
            assert_eq!(n, buf.len());
            assert_eq!(last_seq_in(&buf, 1), Some(10));
            let mut copy = buf.clone();
            assert_eq!(client.open(&mut buf).unwrap(), &[0x45; 100][..]);
            assert_eq!(client.open(&mut copy.clone()), Err(OpenError::Replayed));
            copy[PREFIX_LEN + 3] ^= 1;
            let (server, client) = pair(suite);
            let _ = server;
            assert_eq!(client.open(&mut copy), Err(OpenError::Forged));
            // Forged records do not move the window: the genuine one still opens.
            let mut again = vec![0u8; PREFIX_LEN + 4 + TAG_LEN];
            let (server, _) = pair(suite);
            server.seal(&mut again, 4);
            assert!(client.open(&mut again).is_ok());
            assert_eq!(client.open(&mut [22u8; 40]), Err(OpenError::NotOurs));
        }
    }
}
