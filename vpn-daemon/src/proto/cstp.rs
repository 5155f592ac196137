//! CSTP framing over the TLS stream.
//!
//! ```text
//!  'S' 'T' 'F' 0x01 | length (u16 BE, payload only) | type | 0x00 | payload
//! ```
//!
//! openconnect reads one TLS record per frame, so the sender must write each
//! frame with exactly one TLS write (see `transport/tls_tunnel.rs`). The receiver side here
//! is a byte-stream decoder: frames may arrive split or coalesced in any way.

use bytes::{Buf, BytesMut};

pub const HEADER_LEN: usize = 8;
const MAGIC: [u8; 4] = *b"STF\x01";
/// Largest payload a frame may carry: a TLS record holds 16384 bytes.
pub const MAX_PAYLOAD: usize = 16384 - HEADER_LEN;

/// CSTP frame types.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum FrameType {
    Data = 0x00,
    DpdRequest = 0x03,
    DpdResponse = 0x04,
    Disconnect = 0x05,
    Keepalive = 0x07,
    Compressed = 0x08,
    Terminate = 0x09,
}

impl FrameType {
    fn from_u8(b: u8) -> Option<Self> {
        Some(match b {
            0x00 => FrameType::Data,
            0x03 => FrameType::DpdRequest,
            0x04 => FrameType::DpdResponse,
            0x05 => FrameType::Disconnect,
            0x07 => FrameType::Keepalive,
            0x08 => FrameType::Compressed,
            0x09 => FrameType::Terminate,
            _ => return None,
        })
    }
}

/// Payload byte that starts a client's DISCONNECT for an explicit logout.
pub const DISCONNECT_LOGOUT: u8 = 0xb0;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FrameError {
    #[error("bad CSTP header {0:02x?}: expected 'STF\\x01' magic and a zero byte 7")]
    BadHeader([u8; HEADER_LEN]),
    #[error("CSTP frame of {0} bytes exceeds the {MAX_PAYLOAD}-byte limit")]
    TooLong(usize),
    #[error("unknown CSTP frame type {0:#04x}")]
    UnknownType(u8),
}

/// Writes one frame (header + payload) into `out`, replacing its contents.
pub fn encode(out: &mut Vec<u8>, ty: FrameType, payload: &[u8]) {
    debug_assert!(payload.len() <= MAX_PAYLOAD);
    out.clear();
    out.reserve(HEADER_LEN + payload.len());
    out.extend_from_slice(&MAGIC);
    out.extend_from_slice(&(payload.len() as u16).to_be_bytes());
    out.push(ty as u8);
    out.push(0);
    out.extend_from_slice(payload);
}

/// A decoded frame: its type and payload.
#[derive(Debug, PartialEq, Eq)]
pub struct Frame {
    pub ty: FrameType,
    pub payload: BytesMut,
}

/// Takes the next complete frame off the front of `buf`. `Ok(None)` means
/// more bytes are needed. An error means the stream is unusable: the caller
/// ends the tunnel, as openconnect and ocserv do.
pub fn decode(buf: &mut BytesMut) -> Result<Option<Frame>, FrameError> {
    if buf.len() < HEADER_LEN {
        return Ok(None);
    }
    let mut hdr = [0u8; HEADER_LEN];
    hdr.copy_from_slice(&buf[..HEADER_LEN]);
    if hdr[..4] != MAGIC || hdr[7] != 0 {
        return Err(FrameError::BadHeader(hdr));
    }
    let len = usize::from(u16::from_be_bytes([hdr[4], hdr[5]]));
    if len > MAX_PAYLOAD {
        return Err(FrameError::TooLong(len));
    }
    let ty = FrameType::from_u8(hdr[6]).ok_or(FrameError::UnknownType(hdr[6]))?;
    if buf.len() < HEADER_LEN + len {
        buf.reserve(HEADER_LEN + len - buf.len());
        return Ok(None);
    }
    buf.advance(HEADER_LEN);
    let payload = buf.split_to(len);
    Ok(Some(Frame { ty, payload }))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Encodes into a fresh buffer.
    fn frame(ty: FrameType, payload: &[u8]) -> Vec<u8> {
        let mut v = Vec::new();
        encode(&mut v, ty, payload);
        v
    }

    #[test]
    fn roundtrip() {
        let f = frame(FrameType::Data, b"\x45abc");
        assert_eq!(&f[..8], b"STF\x01\x00\x04\x00\x00");
        let mut b = BytesMut::from(&f[..]);
        let got = decode(&mut b).unwrap().unwrap();
        assert_eq!(got.ty, FrameType::Data);
        assert_eq!(&got.payload[..], b"\x45abc");
        assert!(b.is_empty());
    }

    #[test]
    fn split_frames_byte_by_byte() {
        let mut stream = frame(FrameType::DpdRequest, b"xyz");
        stream.extend(frame(FrameType::Data, &[0x45; 100]));
        stream.extend(frame(FrameType::Keepalive, b""));
        let mut b = BytesMut::new();
        let mut out = Vec::new();
        for byte in stream {
            b.extend_from_slice(&[byte]);
            while let Some(f) = decode(&mut b).unwrap() {
                out.push(f);
            }
        }
        let types: Vec<_> = out.iter().map(|f| f.ty).collect();
        assert_eq!(
            types,
            [FrameType::DpdRequest, FrameType::Data, FrameType::Keepalive]
        );
        assert_eq!(out[1].payload.len(), 100);
    }

    #[test]
    fn coalesced_frames() {
        let mut stream = frame(FrameType::Data, b"a");
        stream.extend(frame(FrameType::Data, b"bc"));
        let mut b = BytesMut::from(&stream[..]);
        assert_eq!(&decode(&mut b).unwrap().unwrap().payload[..], b"a");
        assert_eq!(&decode(&mut b).unwrap().unwrap().payload[..], b"bc");
        assert_eq!(decode(&mut b).unwrap(), None);
    }

    #[test]
    fn bad_magic() {
        let mut b = BytesMut::from(&b"GET / HTTP/1.1\r\n"[..]);
        assert!(matches!(decode(&mut b), Err(FrameError::BadHeader(_))));
    }

    #[test]
    fn nonzero_byte_seven() {
        let mut f = frame(FrameType::Data, b"a");
        f[7] = 1;
        assert!(matches!(
            decode(&mut BytesMut::from(&f[..])),
            Err(FrameError::BadHeader(_))
        ));
    }

    #[test]
    fn oversized_length() {
        let mut b = BytesMut::from(&b"STF\x01\xff\xff\x00\x00"[..]);
        assert_eq!(decode(&mut b), Err(FrameError::TooLong(65535)));
    }

    #[test]
    fn unknown_type() {
        let mut b = BytesMut::from(&b"STF\x01\x00\x00\x06\x00"[..]);
        assert_eq!(decode(&mut b), Err(FrameError::UnknownType(6)));
    }

    #[test]
    fn incomplete_payload_waits() {
        let f = frame(FrameType::Data, &[1, 2, 3, 4]);
        let mut b = BytesMut::from(&f[..10]);
        assert_eq!(decode(&mut b), Ok(None));
        b.extend_from_slice(&f[10..]);
        assert_eq!(&decode(&mut b).unwrap().unwrap().payload[..], &[1, 2, 3, 4]);
    }
}
