//! The login portal's and CONNECT's HTTP reader (`proto/http.rs`) on any
//! bytes a client may send, under small and default limits; then what the
//! gateway reads from a request it accepted: headers, cookies, the DTLS
//! offer of a CONNECT (`proto/connect.rs`) and a config-auth body.

#![no_main]

use std::{sync::LazyLock, time::Duration};

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use vpn_daemon::proto::{auth_xml, connect, http};

static RT: LazyLock<tokio::runtime::Runtime> = LazyLock::new(|| {
    tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .expect("a runtime")
});

fuzz_target!(|data: &[u8]| {
    let Some((&pick, mut rest)) = data.split_first() else {
        return;
    };
    // Tiny limits reach the "too large" answers; the defaults the rest.
    let limits = if pick & 1 == 0 {
        http::Limits::default()
    } else {
        http::Limits {
            max_header_bytes: 64 + usize::from(pick) * 4,
            max_body_bytes: usize::from(pick),
            ..Default::default()
        }
    };
    RT.block_on(async {
        let mut buf = BytesMut::new();
        // Keep-alive: every request the bytes hold, one after another.
        for _ in 0..8 {
            let r = http::read_request(&mut rest, &mut buf, &limits, Duration::from_secs(1)).await;
            let req = match r {
                Ok(req) => req,
                Err(e) => {
                    let _ = (e.to_string(), e.status());
                    return;
                }
            };
            let _ = (req.header("host"), req.cookie("webvpn"), req.wants_close());
            let _ = req.headers_named("content-length").count();
            let _ = connect::choose_dtls(&req, pick & 2 == 0);
            let _ = connect::offers_psk_negotiate(&req);
            if let Ok(body) = std::str::from_utf8(&req.body) {
                let _ = auth_xml::parse_client_auth(body);
            }
        }
    });
});
