//! RADIUS packets, without I/O: Access-Request with its hidden password
//! and Message-Authenticator (RFC 2865, RFC 3579), Accounting-Request
//! (RFC 2866), the checks every reply must pass, and the attributes the
//! gateway reads and writes.
//!
//! RADIUS protects replies with MD5 over the shared secret only: after
//! the Blast-RADIUS attack (CVE-2024-3596) an Access-Reject could be
//! forged into an Access-Accept unless the reply carries a
//! Message-Authenticator (HMAC-MD5 over the whole packet). So every
//! Access-Request carries one, as its first attribute, and replies without
//! one are refused unless the caller allows it for a server that cannot
//! send it ([`verify_reply`]).
//!
//! ```text
//!   0       1       2       4                       20
//!   | code  |  id   | length | authenticator (16)   | attributes: type, length (2..=255), value ...
//! ```

use hmac::{Hmac, Mac as _};
use md5::{Digest as _, Md5};

/// The largest packet RADIUS allows (RFC 2865 §3).
pub const MAX_PACKET: usize = 4096;
/// Code, identifier, length and authenticator.
pub const HEADER_LEN: usize = 20;
/// The longest attribute value (its length byte counts the two header
/// bytes too).
pub const MAX_VALUE: usize = 253;
/// The longest password User-Password can carry (RFC 2865 §5.2).
pub const MAX_PASSWORD: usize = 128;

/// Packet codes the gateway sends or understands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Code {
    AccessRequest = 1,
    AccessAccept = 2,
    AccessReject = 3,
    AccountingRequest = 4,
    AccountingResponse = 5,
    AccessChallenge = 11,
    DisconnectRequest = 40,
    DisconnectAck = 41,
    DisconnectNak = 42,
    CoaRequest = 43,
    CoaAck = 44,
    CoaNak = 45,
}

impl TryFrom<u8> for Code {
    type Error = u8;
    fn try_from(c: u8) -> Result<Self, u8> {
        Ok(match c {
            1 => Code::AccessRequest,
            2 => Code::AccessAccept,
            3 => Code::AccessReject,
            4 => Code::AccountingRequest,
            5 => Code::AccountingResponse,
            11 => Code::AccessChallenge,
            40 => Code::DisconnectRequest,
            41 => Code::DisconnectAck,
            42 => Code::DisconnectNak,
            43 => Code::CoaRequest,
            44 => Code::CoaAck,
            45 => Code::CoaNak,
            other => return Err(other),
        })
    }
}

impl std::fmt::Display for Code {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Code::AccessRequest => "Access-Request",
            Code::AccessAccept => "Access-Accept",
            Code::AccessReject => "Access-Reject",
            Code::AccountingRequest => "Accounting-Request",
            Code::AccountingResponse => "Accounting-Response",
            Code::AccessChallenge => "Access-Challenge",
            Code::DisconnectRequest => "Disconnect-Request",
            Code::DisconnectAck => "Disconnect-ACK",
            Code::DisconnectNak => "Disconnect-NAK",
            Code::CoaRequest => "CoA-Request",
            Code::CoaAck => "CoA-ACK",
            Code::CoaNak => "CoA-NAK",
        })
    }
}

/// Attribute types (RFC 2865 §5, RFC 2866 §5, RFC 3579, RFC 6911).
pub mod attr {
    pub const USER_NAME: u8 = 1;
    pub const USER_PASSWORD: u8 = 2;
    pub const NAS_IP_ADDRESS: u8 = 4;
    pub const NAS_PORT: u8 = 5;
    pub const SERVICE_TYPE: u8 = 6;
    pub const FRAMED_IP_ADDRESS: u8 = 8;
    pub const FILTER_ID: u8 = 11;
    pub const REPLY_MESSAGE: u8 = 18;
    pub const STATE: u8 = 24;
    pub const CLASS: u8 = 25;
    pub const SESSION_TIMEOUT: u8 = 27;
    pub const IDLE_TIMEOUT: u8 = 28;
    pub const CALLED_STATION_ID: u8 = 30;
    pub const CALLING_STATION_ID: u8 = 31;
    pub const NAS_IDENTIFIER: u8 = 32;
    pub const ACCT_STATUS_TYPE: u8 = 40;
    pub const ACCT_DELAY_TIME: u8 = 41;
    pub const ACCT_INPUT_OCTETS: u8 = 42;
    pub const ACCT_OUTPUT_OCTETS: u8 = 43;
    pub const ACCT_SESSION_ID: u8 = 44;
    pub const ACCT_AUTHENTIC: u8 = 45;
    pub const ACCT_SESSION_TIME: u8 = 46;
    pub const ACCT_INPUT_PACKETS: u8 = 47;
    pub const ACCT_OUTPUT_PACKETS: u8 = 48;
    pub const ACCT_TERMINATE_CAUSE: u8 = 49;
    pub const ACCT_INPUT_GIGAWORDS: u8 = 52;
    pub const ACCT_OUTPUT_GIGAWORDS: u8 = 53;
    pub const EVENT_TIMESTAMP: u8 = 55;
    pub const NAS_PORT_TYPE: u8 = 61;
    pub const MESSAGE_AUTHENTICATOR: u8 = 80;
    pub const ERROR_CAUSE: u8 = 101;
    pub const FRAMED_IPV6_ADDRESS: u8 = 168;
}

/// Error-Cause values of Disconnect- and CoA-NAK (RFC 5176 §3.6).
pub mod error_cause {
    pub const UNSUPPORTED_ATTRIBUTE: u32 = 401;
    pub const MISSING_ATTRIBUTE: u32 = 402;
    pub const INVALID_ATTRIBUTE_VALUE: u32 = 407;
    pub const SESSION_CONTEXT_NOT_FOUND: u32 = 503;
}

/// Service-Type Framed (RFC 2865 §5.6).
pub const SERVICE_TYPE_FRAMED: u32 = 2;
/// NAS-Port-Type Virtual (RFC 2865 §5.41): a VPN.
pub const NAS_PORT_TYPE_VIRTUAL: u32 = 5;

/// A decoded packet: the header and the attributes in their order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Packet {
    pub code: Code,
    pub id: u8,
    pub authenticator: [u8; 16],
    pub attrs: Vec<(u8, Vec<u8>)>,
}

impl Packet {
    /// The first value of attribute `t`.
    pub fn attr(&self, t: u8) -> Option<&[u8]> {
        self.attrs
            .iter()
            .find(|(a, _)| *a == t)
            .map(|(_, v)| v.as_slice())
    }

    /// Every value of attribute `t`, in order.
    pub fn all(&self, t: u8) -> impl Iterator<Item = &[u8]> {
        self.attrs
            .iter()
            .filter(move |(a, _)| *a == t)
            .map(|(_, v)| v.as_slice())
    }

    /// Attribute `t` as text (a server may send any bytes: invalid UTF-8
    /// is replaced).
    pub fn text(&self, t: u8) -> Option<String> {
        self.attr(t)
            .map(|v| String::from_utf8_lossy(v).into_owned())
    }

    /// Every value of text attribute `t` (Reply-Message may come in
    /// several parts), joined.
    pub fn joined_text(&self, t: u8) -> Option<String> {
        let parts: Vec<_> = self.all(t).map(String::from_utf8_lossy).collect();
        (!parts.is_empty()).then(|| parts.concat())
    }

    /// Integer attribute `t`; a value that is not 4 bytes is ignored.
    pub fn u32(&self, t: u8) -> Option<u32> {
        self.attr(t)
            .and_then(|v| <[u8; 4]>::try_from(v).ok())
            .map(u32::from_be_bytes)
    }

    /// Address attribute `t`; a value that is not 4 bytes is ignored.
    pub fn ipv4(&self, t: u8) -> Option<std::net::Ipv4Addr> {
        self.attr(t)
            .and_then(|v| <[u8; 4]>::try_from(v).ok())
            .map(std::net::Ipv4Addr::from)
    }
}

/// Why bytes are not a RADIUS packet.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("{0} bytes is shorter than a RADIUS header (20)")]
    Short(usize),
    #[error("the header says {said} bytes, but {got} arrived (at most 4096, at least 20)")]
    Length { said: usize, got: usize },
    #[error("unknown packet code {0}")]
    Code(u8),
    #[error("attribute {typ} at offset {at} runs past the packet or has length {len} (at least 2)")]
    Attribute { typ: u8, at: usize, len: usize },
}

/// Why a packet cannot be built.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EncodeError {
    #[error("attribute {typ} is {len} bytes: a value holds 1 to 253")]
    Value { typ: u8, len: usize },
    #[error("the password is {0} bytes: RADIUS carries at most 128")]
    Password(usize),
    #[error("the packet would be {0} bytes: RADIUS allows 4096")]
    TooLong(usize),
}

/// Why a reply was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReplyError {
    #[error(transparent)]
    Decode(#[from] DecodeError),
    #[error("reply identifier {got} does not match the request's {want}")]
    Id { got: u8, want: u8 },
    #[error(
        "the Response Authenticator does not match: the shared secret differs from the server's"
    )]
    ResponseAuthenticator,
    #[error(
        "the Message-Authenticator does not match: the shared secret differs from the server's, or the reply was forged"
    )]
    MessageAuthenticator,
    #[error(
        "the reply has no Message-Authenticator (required against forged replies, CVE-2024-3596; configure the server to send it, or set require_message_authenticator = false for it)"
    )]
    NoMessageAuthenticator,
}

fn md5(parts: &[&[u8]]) -> [u8; 16] {
    let mut h = Md5::new();
    for p in parts {
        h.update(p);
    }
    h.finalize().into()
}

fn hmac_md5(secret: &[u8], data: &[u8]) -> [u8; 16] {
    let mut m = <Hmac<Md5>>::new_from_slice(secret).expect("HMAC takes keys of any length");
    m.update(data);
    m.finalize().into_bytes().into()
}

/// Appends attribute `typ` with `value`.
fn push_attr(out: &mut Vec<u8>, typ: u8, value: &[u8]) -> Result<(), EncodeError> {
    if value.is_empty() || value.len() > MAX_VALUE {
        return Err(EncodeError::Value {
            typ,
            len: value.len(),
        });
    }
    out.push(typ);
    out.push(value.len() as u8 + 2);
    out.extend_from_slice(value);
    Ok(())
}

/// A packet with `attrs` and a zero authenticator; the length is set.
fn build(code: Code, id: u8, attrs: &[(u8, &[u8])]) -> Result<Vec<u8>, EncodeError> {
    let mut p = vec![code as u8, id, 0, 0];
    p.extend_from_slice(&[0; 16]);
    for (t, v) in attrs {
        push_attr(&mut p, *t, v)?;
    }
    if p.len() > MAX_PACKET {
        return Err(EncodeError::TooLong(p.len()));
    }
    let len = p.len() as u16;
    p[2..4].copy_from_slice(&len.to_be_bytes());
    Ok(p)
}

/// User-Password's value (RFC 2865 §5.2): the password padded to 16
/// bytes, each block XORed with MD5(secret, previous block), the first
/// with the Request Authenticator.
pub fn hide_password(
    password: &[u8],
    secret: &[u8],
    request_auth: &[u8; 16],
) -> Result<Vec<u8>, EncodeError> {
    if password.len() > MAX_PASSWORD {
        return Err(EncodeError::Password(password.len()));
    }
    let blocks = password.len().div_ceil(16).max(1);
    let mut out = vec![0u8; blocks * 16];
    out[..password.len()].copy_from_slice(password);
    let mut prev: [u8; 16] = *request_auth;
    for block in out.chunks_mut(16) {
        let b = md5(&[secret, &prev]);
        for (c, k) in block.iter_mut().zip(b) {
            *c ^= k;
        }
        prev.copy_from_slice(block);
    }
    Ok(out)
}

/// An Access-Request (RFC 2865 §4.1) with Request Authenticator
/// `request_auth` (16 random bytes), always carrying a
/// Message-Authenticator as its first attribute (RFC 3579 §3.2, and the
/// Blast-RADIUS advice to put it first). `password`, if any, is hidden as
/// User-Password; `attrs` follow in order.
pub fn access_request(
    id: u8,
    request_auth: [u8; 16],
    secret: &[u8],
    password: Option<&[u8]>,
    attrs: &[(u8, &[u8])],
) -> Result<Vec<u8>, EncodeError> {
    let hidden = password
        .map(|p| hide_password(p, secret, &request_auth))
        .transpose()?;
    let mut all: Vec<(u8, &[u8])> = vec![(attr::MESSAGE_AUTHENTICATOR, &[0; 16])];
    all.extend_from_slice(attrs);
    if let Some(h) = &hidden {
        all.push((attr::USER_PASSWORD, h));
    }
    let mut p = build(Code::AccessRequest, id, &all)?;
    p[4..20].copy_from_slice(&request_auth);
    // The Message-Authenticator is the first attribute: bytes 22..38.
    let mac = hmac_md5(secret, &p);
    p[22..38].copy_from_slice(&mac);
    Ok(p)
}

/// A request whose authenticator is MD5 over the packet with a zero
/// authenticator and the secret: Accounting-Request (RFC 2866 §3), and
/// the answers to Disconnect and CoA requests use the same with the
/// request's authenticator ([`response`]). Returns the packet and its
/// authenticator (to check the reply against).
pub fn accounting_request(
    id: u8,
    secret: &[u8],
    attrs: &[(u8, &[u8])],
) -> Result<(Vec<u8>, [u8; 16]), EncodeError> {
    let mut p = build(Code::AccountingRequest, id, attrs)?;
    let auth = md5(&[&p, secret]);
    p[4..20].copy_from_slice(&auth);
    Ok((p, auth))
}

/// A reply to a request with authenticator `request_auth` (what a server
/// sends: the answers to Disconnect and CoA requests, and test servers):
/// Response Authenticator = MD5(code, id, length, request authenticator,
/// attributes, secret), with a Message-Authenticator when
/// `message_authenticator` is set.
pub fn response(
    code: Code,
    id: u8,
    request_auth: &[u8; 16],
    secret: &[u8],
    attrs: &[(u8, &[u8])],
    message_authenticator: bool,
) -> Result<Vec<u8>, EncodeError> {
    let mut all: Vec<(u8, &[u8])> = Vec::with_capacity(attrs.len() + 1);
    if message_authenticator {
        all.push((attr::MESSAGE_AUTHENTICATOR, &[0; 16]));
    }
    all.extend_from_slice(attrs);
    let mut p = build(code, id, &all)?;
    p[4..20].copy_from_slice(request_auth);
    if message_authenticator {
        let mac = hmac_md5(secret, &p);
        p[22..38].copy_from_slice(&mac);
    }
    let auth = md5(&[&p, secret]);
    p[4..20].copy_from_slice(&auth);
    Ok(p)
}

/// Checks a request whose authenticator is MD5 over the packet with a
/// zero authenticator and the secret (Disconnect-Request and CoA-Request,
/// RFC 5176 §3.5; Accounting-Request, RFC 2866 §3), and its
/// Message-Authenticator if it has one (computed over the packet with a
/// zero authenticator).
pub fn verify_request(buf: &[u8], secret: &[u8]) -> Result<Packet, ReplyError> {
    use subtle::ConstantTimeEq as _;
    let p = decode(buf)?;
    let len = u16::from_be_bytes([buf[2], buf[3]]) as usize;
    let mut copy = buf[..len].to_vec();
    copy[4..20].fill(0);
    if !bool::from(md5(&[&copy, secret]).ct_eq(&p.authenticator)) {
        return Err(ReplyError::ResponseAuthenticator);
    }
    check_message_authenticator(&mut copy, secret, false)?;
    Ok(p)
}

/// A Disconnect-Request or CoA-Request as a RADIUS server sends it (for
/// tests): authenticator over the packet and the secret, with a
/// Message-Authenticator.
pub fn dynamic_request(
    code: Code,
    id: u8,
    secret: &[u8],
    attrs: &[(u8, &[u8])],
) -> Result<Vec<u8>, EncodeError> {
    let mut all: Vec<(u8, &[u8])> = vec![(attr::MESSAGE_AUTHENTICATOR, &[0; 16])];
    all.extend_from_slice(attrs);
    let mut p = build(code, id, &all)?;
    let mac = hmac_md5(secret, &p);
    p[22..38].copy_from_slice(&mac);
    let auth = md5(&[&p, secret]);
    p[4..20].copy_from_slice(&auth);
    Ok(p)
}

/// Reads a packet; bytes after the header's length are ignored (RFC 2865
/// §3), every attribute length is checked against the packet.
pub fn decode(buf: &[u8]) -> Result<Packet, DecodeError> {
    if buf.len() < HEADER_LEN {
        return Err(DecodeError::Short(buf.len()));
    }
    let said = u16::from_be_bytes([buf[2], buf[3]]) as usize;
    if !(HEADER_LEN..=MAX_PACKET).contains(&said) || said > buf.len() {
        return Err(DecodeError::Length {
            said,
            got: buf.len(),
        });
    }
    let code = Code::try_from(buf[0]).map_err(DecodeError::Code)?;
    let mut attrs = Vec::new();
    let mut at = HEADER_LEN;
    while at < said {
        let typ = buf[at];
        let len = buf.get(at + 1).map_or(0, |l| *l as usize);
        if len < 2 || at + len > said {
            return Err(DecodeError::Attribute { typ, at, len });
        }
        attrs.push((typ, buf[at + 2..at + len].to_vec()));
        at += len;
    }
    Ok(Packet {
        code,
        id: buf[1],
        authenticator: buf[4..20].try_into().expect("16 bytes"),
        attrs,
    })
}

/// Offsets of the Message-Authenticator values in a decoded `buf`.
fn message_authenticators(buf: &[u8], len: usize) -> Vec<usize> {
    let mut out = Vec::new();
    let mut at = HEADER_LEN;
    while at + 2 <= len {
        let l = buf[at + 1] as usize;
        if buf[at] == attr::MESSAGE_AUTHENTICATOR && l == 18 {
            out.push(at + 2);
        }
        at += l.max(2);
    }
    out
}

/// Checks a reply to the request with identifier `id` and authenticator
/// `request_auth`: the identifier, the Response Authenticator, and the
/// Message-Authenticator (always checked when present; required unless
/// `require_message_authenticator` is off, and never for
/// Accounting-Response, which has none).
pub fn verify_reply(
    buf: &[u8],
    id: u8,
    request_auth: &[u8; 16],
    secret: &[u8],
    require_message_authenticator: bool,
) -> Result<Packet, ReplyError> {
    use subtle::ConstantTimeEq as _;
    let p = decode(buf)?;
    if p.id != id {
        return Err(ReplyError::Id {
            got: p.id,
            want: id,
        });
    }
    let len = u16::from_be_bytes([buf[2], buf[3]]) as usize;
    let mut copy = buf[..len].to_vec();
    copy[4..20].copy_from_slice(request_auth);
    let want = md5(&[&copy, secret]);
    if !bool::from(want.ct_eq(&p.authenticator)) {
        return Err(ReplyError::ResponseAuthenticator);
    }
    let required = require_message_authenticator && p.code != Code::AccountingResponse;
    check_message_authenticator(&mut copy, secret, required)?;
    Ok(p)
}

/// Checks the Message-Authenticator of `packet` (its authenticator field
/// already as the HMAC covers it): at most one, and it must verify;
/// `required` refuses a packet without one. Zeroes its value in `packet`.
fn check_message_authenticator(
    packet: &mut [u8],
    secret: &[u8],
    required: bool,
) -> Result<(), ReplyError> {
    use subtle::ConstantTimeEq as _;
    match message_authenticators(packet, packet.len()).as_slice() {
        [] if required => Err(ReplyError::NoMessageAuthenticator),
        [] => Ok(()),
        [at] => {
            let got: [u8; 16] = packet[*at..at + 16].try_into().expect("16 bytes");
            packet[*at..at + 16].fill(0);
            if bool::from(hmac_md5(secret, packet).ct_eq(&got)) {
                Ok(())
            } else {
                Err(ReplyError::MessageAuthenticator)
            }
        }
        // RFC 3579 §3.2: at most one.
        _ => Err(ReplyError::MessageAuthenticator),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn unhex(s: &str) -> Vec<u8> {
        hex::decode(s.replace(' ', "")).unwrap()
    }

    /// RFC 2865 §7.1: user "nemo", password "arctangent", secret
    /// "xyzzy5461".
    const RFC_REQUEST: &str = "01 00 00 38 0f 40 3f 94 73 97 80 57 bd 83 d5 cb 98 f4 22 7a \
        01 06 6e 65 6d 6f 02 12 0d be 70 8d 93 d4 13 ce 31 96 e4 3f 78 2a 0a ee \
        04 06 c0 a8 01 10 05 06 00 00 00 03";
    const RFC_ACCEPT: &str = "02 00 00 26 86 fe 22 0e 76 24 ba 2a 10 05 f6 bf 9b 55 e0 b2 \
        06 06 00 00 00 01 0f 06 00 00 00 00 0e 06 c0 a8 01 03";

    #[test]
    fn rfc2865_example_password_and_response_authenticator() {
        let req = decode(&unhex(RFC_REQUEST)).unwrap();
        assert_eq!(req.code, Code::AccessRequest);
        assert_eq!(req.text(attr::USER_NAME).as_deref(), Some("nemo"));
        let hidden = hide_password(b"arctangent", b"xyzzy5461", &req.authenticator).unwrap();
        assert_eq!(req.attr(attr::USER_PASSWORD), Some(hidden.as_slice()));
        // The RFC's reply verifies (it has no Message-Authenticator).
        let accept = verify_reply(
            &unhex(RFC_ACCEPT),
            0,
            &req.authenticator,
            b"xyzzy5461",
            false,
        )
        .unwrap();
        assert_eq!(accept.code, Code::AccessAccept);
        assert_eq!(accept.u32(attr::SERVICE_TYPE), Some(1));
        // ... but not under the Blast-RADIUS rule, nor with another
        // secret or request.
        let err = |e| verify_reply(&unhex(RFC_ACCEPT), 0, &req.authenticator, e, true);
        assert_eq!(
            err(b"xyzzy5461").unwrap_err(),
            ReplyError::NoMessageAuthenticator
        );
        assert_eq!(
            verify_reply(&unhex(RFC_ACCEPT), 0, &req.authenticator, b"wrong", false).unwrap_err(),
            ReplyError::ResponseAuthenticator
        );
        assert_eq!(
            verify_reply(&unhex(RFC_ACCEPT), 0, &[0; 16], b"xyzzy5461", false).unwrap_err(),
            ReplyError::ResponseAuthenticator
        );
        assert_eq!(
            verify_reply(
                &unhex(RFC_ACCEPT),
                1,
                &req.authenticator,
                b"xyzzy5461",
                false
            )
            .unwrap_err(),
            ReplyError::Id { got: 0, want: 1 }
        );
    }

    #[test]
    fn long_passwords_chain_blocks_and_round_trip() {
        let auth = [7u8; 16];
        let pw = b"a password longer than sixteen bytes";
        let hidden = hide_password(pw, b"s3cret", &auth).unwrap();
        assert_eq!(hidden.len(), 48);
        // Unhide as a server does: block i XOR MD5(secret, cipher block i-1).
        let mut prev = auth.to_vec();
        let mut plain = Vec::new();
        for block in hidden.chunks(16) {
            let b = md5(&[b"s3cret", &prev]);
            plain.extend(block.iter().zip(b).map(|(c, k)| c ^ k));
            prev = block.to_vec();
        }
        assert_eq!(&plain[..pw.len()], pw);
        assert!(plain[pw.len()..].iter().all(|b| *b == 0));
        assert_eq!(
            hide_password(&[b'x'; 129], b"s", &auth),
            Err(EncodeError::Password(129))
        );
    }

    #[test]
    fn access_request_message_authenticator_is_first_and_verifies() {
        let auth = [3u8; 16];
        let p = access_request(
            9,
            auth,
            b"testing123",
            Some(b"pw"),
            &[(attr::USER_NAME, b"alice")],
        )
        .unwrap();
        let d = decode(&p).unwrap();
        assert_eq!(d.attrs[0].0, attr::MESSAGE_AUTHENTICATOR);
        assert_eq!(d.attrs[1], (attr::USER_NAME, b"alice".to_vec()));
        let mut zeroed = p.clone();
        zeroed[22..38].fill(0);
        assert_eq!(hmac_md5(b"testing123", &zeroed).as_slice(), &p[22..38]);
    }

    #[test]
    fn replies_with_message_authenticators_are_checked() {
        let req = [5u8; 16];
        let secret = b"testing123";
        let attrs: &[(u8, &[u8])] = &[(attr::FILTER_ID, b"engineering")];
        let good = response(Code::AccessAccept, 4, &req, secret, attrs, true).unwrap();
        let p = verify_reply(&good, 4, &req, secret, true).unwrap();
        assert_eq!(p.text(attr::FILTER_ID).as_deref(), Some("engineering"));
        // A forged reply that recomputes the Response Authenticator (the
        // Blast-RADIUS collision gives the attacker that) but cannot
        // compute the HMAC: refused.
        let mut forged = good.clone();
        forged[22] ^= 1;
        let a = md5(&[&[&forged[..4], &req[..], &forged[20..]].concat(), secret]);
        forged[4..20].copy_from_slice(&a);
        assert_eq!(
            verify_reply(&forged, 4, &req, secret, true).unwrap_err(),
            ReplyError::MessageAuthenticator
        );
        // Without one: refused when required, accepted when not.
        let bare = response(Code::AccessAccept, 4, &req, secret, attrs, false).unwrap();
        assert_eq!(
            verify_reply(&bare, 4, &req, secret, true).unwrap_err(),
            ReplyError::NoMessageAuthenticator
        );
        assert!(verify_reply(&bare, 4, &req, secret, false).is_ok());
        // Accounting-Response carries none and needs none.
        let acct = response(Code::AccountingResponse, 4, &req, secret, &[], false).unwrap();
        assert!(verify_reply(&acct, 4, &req, secret, true).is_ok());
        // Two Message-Authenticators: refused.
        let two = response(
            Code::AccessAccept,
            4,
            &req,
            secret,
            &[(attr::MESSAGE_AUTHENTICATOR, &[0; 16])],
            true,
        )
        .unwrap();
        assert_eq!(
            verify_reply(&two, 4, &req, secret, true).unwrap_err(),
            ReplyError::MessageAuthenticator
        );
    }

    #[test]
    fn accounting_authenticator_is_md5_of_the_packet_and_secret() {
        let (p, auth) = accounting_request(1, b"s", &[(attr::ACCT_SESSION_ID, b"42")]).unwrap();
        let mut zeroed = p.clone();
        zeroed[4..20].fill(0);
        assert_eq!(md5(&[&zeroed, b"s"]), auth);
        assert_eq!(&p[4..20], &auth);
    }

    #[test]
    fn hostile_packets_are_errors_not_panics() {
        assert_eq!(decode(&[2; 10]), Err(DecodeError::Short(10)));
        let mut p = response(Code::AccessAccept, 1, &[0; 16], b"s", &[], false).unwrap();
        p[3] = 200;
        assert!(matches!(decode(&p), Err(DecodeError::Length { .. })));
        let mut p = response(
            Code::AccessAccept,
            1,
            &[0; 16],
            b"s",
            &[(attr::CLASS, b"x")],
            false,
        )
        .unwrap();
        p[21] = 1;
        assert!(matches!(decode(&p), Err(DecodeError::Attribute { .. })));
        p[21] = 40;
        assert!(matches!(decode(&p), Err(DecodeError::Attribute { .. })));
        p[0] = 99;
        assert_eq!(decode(&p), Err(DecodeError::Code(99)));
        // Random bytes never panic.
        let mut seed = 0x1234_5678_u64;
        for _ in 0..20_000 {
            let len = (seed % 80) as usize;
            let buf: Vec<u8> = (0..len)
                .map(|_| {
                    seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1);
                    (seed >> 33) as u8
                })
                .collect();
            let _ = verify_reply(&buf, 0, &[0; 16], b"s", true);
        }
        assert_eq!(
            build(Code::AccessRequest, 0, &[(attr::USER_NAME, &[])]),
            Err(EncodeError::Value {
                typ: attr::USER_NAME,
                len: 0
            })
        );
    }

    #[test]
    fn dynamic_requests_verify_with_their_secret_only() {
        let p = dynamic_request(
            Code::DisconnectRequest,
            3,
            b"s",
            &[(attr::USER_NAME, b"alice")],
        )
        .unwrap();
        let d = verify_request(&p, b"s").unwrap();
        assert_eq!(d.code, Code::DisconnectRequest);
        assert_eq!(d.text(attr::USER_NAME).as_deref(), Some("alice"));
        assert_eq!(
            verify_request(&p, b"t").unwrap_err(),
            ReplyError::ResponseAuthenticator
        );
        let mut forged = p.clone();
        forged[22] ^= 1;
        let mut zeroed = forged.clone();
        zeroed[4..20].fill(0);
        let a = md5(&[&zeroed, b"s"]);
        forged[4..20].copy_from_slice(&a);
        assert_eq!(
            verify_request(&forged, b"s").unwrap_err(),
            ReplyError::MessageAuthenticator
        );
    }
}
