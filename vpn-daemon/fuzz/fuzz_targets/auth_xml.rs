//! The client's config-auth documents (`proto/auth_xml.rs`): init,
//! auth-reply with its fields, group selection, opaque blocks.

#![no_main]

use libfuzzer_sys::fuzz_target;
use vpn_daemon::proto::auth_xml;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        match auth_xml::parse_client_auth(text) {
            Ok(a) => {
                let _ = format!("{a:?}");
            }
            Err(e) => {
                let _ = e.to_string();
            }
        }
    }
});
