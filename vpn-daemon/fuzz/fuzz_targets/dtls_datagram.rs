//! What the DTLS receive path reads from a datagram before any key is
//! involved (`transport/dtls`): the record pre-parser that tiles a
//! datagram into records, the last sequence number of an epoch, and the
//! ClientHello's session id (the App-ID that picks the session).

#![no_main]

use libfuzzer_sys::fuzz_target;
use vpn_daemon::transport::dtls::{handshake, record};

fuzz_target!(|data: &[u8]| {
    let _ = record::Channel::record_len(data);
    if record::Channel::tiles(data) {
        // Tiled: every record's length fits; walk them as the worker does.
        let mut d = data;
        while let Some(n) = record::Channel::record_len(d) {
            assert!(n <= d.len(), "a tiled datagram's record overruns it");
            d = &d[n..];
            if d.is_empty() {
                break;
            }
        }
    }
    for epoch in [0, 1, 2] {
        let _ = record::last_seq_in(data, epoch);
    }
    if handshake::is_client_hello(data) {
        let _ = handshake::client_hello_session_id(data);
    }
});
