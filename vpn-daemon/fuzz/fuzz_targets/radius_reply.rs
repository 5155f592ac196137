//! RADIUS packets from the network (`proto/radius.rs`): replies to our
//! requests (Access-Accept/Reject/Challenge, Accounting-Response) and
//! dynamic-authorization requests (CoA, Disconnect) from a server.

#![no_main]

use libfuzzer_sys::fuzz_target;
use vpn_daemon::proto::radius;

fuzz_target!(|data: &[u8]| {
    if let Ok(p) = radius::decode(data) {
        for t in [1u8, 8, 18, 25, 26, 27, 80] {
            let _ = (p.attr(t), p.text(t), p.joined_text(t), p.u32(t), p.ipv4(t));
            let _ = p.all(t).count();
        }
    }
    let id = data.first().copied().unwrap_or(0);
    for require in [true, false] {
        let _ = radius::verify_reply(data, id, &[7; 16], b"fuzz-secret", require);
    }
    let _ = radius::verify_request(data, b"fuzz-secret");
});
