//! The CSTP framing of the TLS tunnel (`proto/cstp.rs`): frames taken off
//! a stream that arrives in pieces of any size.

#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use vpn_daemon::proto::cstp;

fuzz_target!(|data: &[u8]| {
    let Some((&step, stream)) = data.split_first() else {
        return;
    };
    let step = usize::from(step).max(1);
    let mut buf = BytesMut::new();
    for piece in stream.chunks(step) {
        buf.extend_from_slice(piece);
        loop {
            match cstp::decode(&mut buf) {
                Ok(Some(f)) => {
                    // What the tunnel does with a frame: re-encode it.
                    let mut out = Vec::new();
                    cstp::encode(&mut out, f.ty, &f.payload);
                }
                Ok(None) => break,
                Err(e) => {
                    let _ = e.to_string();
                    return;
                }
            }
        }
    }
});
