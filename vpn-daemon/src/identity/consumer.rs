//! A consumer of the identity feed: keeps every mapping current from
//! `/v1/changes`, and when the connection drops connects again from the
//! last position it saw, so it misses nothing. Lookups are answered from
//! memory; while the feed is away the last known state stays.
//!
//! Blocking, on a thread of its own: the Squid helper
//! (`vpn-identity-helper`) is a small synchronous program.

use std::{
    io::{BufRead, BufReader, Write as _},
    net::{IpAddr, SocketAddr, TcpStream},
    sync::Arc,
    time::Duration,
};

use anyhow::{Context as _, anyhow, bail};
use parking_lot::{Condvar, Mutex};

use crate::proto::identity::{
    Change, Mapping, MappingSet, Position, Snapshot, SseEvent, SseReader,
};

/// No event nor keepalive for this long (the server sends one every
/// 15 s): the connection is dead.
const READ_TIMEOUT: Duration = Duration::from_secs(45);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Waits between reconnections, growing to the last.
const BACKOFF: [Duration; 4] = [
    Duration::from_millis(500),
    Duration::from_secs(1),
    Duration::from_secs(2),
    Duration::from_secs(5),
];

#[derive(Default)]
struct State {
    position: Option<String>,
    mappings: MappingSet,
}

/// The mappings as the feed last told them.
#[derive(Default)]
pub struct Mappings {
    state: Mutex<State>,
    synced: Condvar,
}

impl Mappings {
    /// Applies one event of the stream.
    pub fn apply(&self, ev: &SseEvent) -> anyhow::Result<()> {
        let mut s = self.state.lock();
        match ev.event.as_str() {
            "snapshot" => {
                let snap: Snapshot = serde_json::from_str(&ev.data).context("snapshot event")?;
                s.mappings.replace(snap.mappings);
            }
            "add" | "update" | "remove" => {
                let c: Change = serde_json::from_str(&ev.data).context("change event")?;
                s.mappings.apply(c.op, c.mapping);
            }
            // Newer servers may send more kinds; skipping them is safe
            // only while they change no mapping, which is their contract.
            _ => return Ok(()),
        }
        if let Some(id) = &ev.id {
            s.position = Some(id.clone());
        }
        drop(s);
        self.synced.notify_all();
        Ok(())
    }

    /// The holder of `a`, as last known.
    pub fn lookup(&self, a: IpAddr) -> Option<Mapping> {
        self.state.lock().mappings.lookup(a).cloned()
    }

    /// The last position seen (`EPOCH-SEQ`).
    pub fn position(&self) -> Option<String> {
        self.state.lock().position.clone()
    }

    /// Waits up to `t` for a first state; whether there is one.
    pub fn wait_synced(&self, t: Duration) -> bool {
        let mut s = self.state.lock();
        if s.position.is_none() {
            self.synced.wait_for(&mut s, t);
        }
        s.position.is_some()
    }
}

/// The answer to one request line of Squid's external ACL protocol
/// (`[CHANNEL] ADDRESS`, the channel when `concurrency` is on): `OK
/// user=NAME group=GROUP [groups=A,B]` for an address a session holds
/// (`groups`: its directory groups), `ERR` for one
/// none holds or while the feed gave no state within `wait`, `BH` (broken
/// helper) for a line without an address.
pub fn squid_answer(maps: &Mappings, line: &str, wait: Duration) -> String {
    let tokens: Vec<&str> = line.split_whitespace().collect();
    let (channel, rest) = match tokens.as_slice() {
        [c, rest @ ..] if !rest.is_empty() && c.parse::<u64>().is_ok() => (Some(*c), rest),
        all => (None, all),
    };
    let prefix = channel.map_or(String::new(), |c| format!("{c} "));
    let Some(addr) = rest.first().and_then(|t| t.parse::<IpAddr>().ok()) else {
        return format!("{prefix}BH message=\"not a client address\"");
    };
    if !maps.wait_synced(wait) {
        return format!("{prefix}ERR message=\"identity feed unavailable\"");
    }
    match maps.lookup(addr) {
        // User and group names are validated: no spaces, no quotes.
        Some(m) if m.groups.is_empty() => format!("{prefix}OK user={} group={}", m.user, m.group),
        // Directory group names are client strings: quoted, with their
        // quotes and backslashes escaped (Squid's helper syntax).
        Some(m) => format!(
            "{prefix}OK user={} group={} groups=\"{}\"",
            m.user,
            m.group,
            m.groups
                .join(",")
                .replace('\\', "\\\\")
                .replace('"', "\\\"")
        ),
        None => format!("{prefix}ERR"),
    }
}

/// Where the feed is and how to trust and open it.
pub struct FeedClient {
    /// `host:port` as in the URL (the `Host` header).
    pub authority: String,
    pub addr: SocketAddr,
    pub secret: String,
    /// `pin-sha256:...` of the feed's certificate (the gateway's, as vpnd
    /// logs it and `openconnect --servercert` takes it).
    pub pin: String,
}

impl FeedClient {
    /// A client of `url` (`https://ADDRESS:PORT`).
    pub fn new(url: &str, secret: String, pin: String) -> anyhow::Result<FeedClient> {
        let authority = url
            .strip_prefix("https://")
            .ok_or_else(|| anyhow!("'{url}' is not an https:// URL of the identity feed"))?
            .trim_end_matches('/');
        let addr: SocketAddr = authority.parse().map_err(|_| {
            anyhow!("'{authority}' is not ADDRESS:PORT (e.g. https://198.18.2.1:9443)")
        })?;
        if !pin.starts_with("pin-sha256:") {
            bail!("'{pin}' is not a pin-sha256:... certificate pin");
        }
        Ok(FeedClient {
            authority: authority.to_owned(),
            addr,
            secret,
            pin,
        })
    }

    /// Follows the feed into `m` for ever, reconnecting from the last
    /// position after any failure.
    pub fn follow(&self, m: &Mappings) -> ! {
        let mut failures = 0usize;
        loop {
            match self.stream(m) {
                Ok(()) => failures = 0,
                Err(e) => {
                    eprintln!("vpn-identity-helper: identity feed: {e:#}");
                    failures += 1;
                }
            }
            std::thread::sleep(BACKOFF[failures.min(BACKOFF.len() - 1)]);
        }
    }

    /// One connection: reads events into `m` until it ends.
    fn stream(&self, m: &Mappings) -> anyhow::Result<()> {
        let tcp = TcpStream::connect_timeout(&self.addr, CONNECT_TIMEOUT)
            .with_context(|| format!("connecting to {}", self.addr))?;
        tcp.set_read_timeout(Some(READ_TIMEOUT))?;
        tcp.set_nodelay(true)?;
        let conn = rustls::ClientConnection::new(
            self.tls_config(),
            rustls::pki_types::ServerName::IpAddress(self.addr.ip().into()),
        )?;
        let mut tls = rustls::StreamOwned::new(conn, tcp);
        let mut head = format!(
            "GET /v1/changes HTTP/1.1\r\nHost: {}\r\nAuthorization: Bearer {}\r\nAccept: text/event-stream\r\n",
            self.authority, self.secret
        );
        if let Some(p) = m.position().filter(|p| Position::parse(p).is_some()) {
            head.push_str(&format!("Last-Event-ID: {p}\r\n"));
        }
        head.push_str("\r\n");
        tls.write_all(head.as_bytes())?;
        tls.flush()?;
        let mut r = BufReader::new(tls);
        let mut line = String::new();
        r.read_line(&mut line)?;
        let status = line.trim_end().to_owned();
        if !status.starts_with("HTTP/1.1 200 ") {
            bail!("the feed answered {status:?}");
        }
        loop {
            line.clear();
            if r.read_line(&mut line)? == 0 {
                bail!("the feed closed the connection in its header");
            }
            if line.trim_end().is_empty() {
                break;
            }
        }
        let mut events = SseReader::default();
        loop {
            line.clear();
            if r.read_line(&mut line)? == 0 {
                return Ok(());
            }
            if let Some(ev) = events.line(line.trim_end_matches(['\r', '\n'])) {
                m.apply(&ev)?;
            }
        }
    }

    fn tls_config(&self) -> Arc<rustls::ClientConfig> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let verifier = Arc::new(PinVerifier {
            pin: self.pin.clone(),
            provider: provider.clone(),
        });
        Arc::new(
            rustls::ClientConfig::builder_with_provider(provider)
                .with_safe_default_protocol_versions()
                .expect("ring supports the default versions")
                .dangerous()
                .with_custom_certificate_verifier(verifier)
                .with_no_client_auth(),
        )
    }
}

/// Trusts the one certificate whose public key has the pin (the
/// gateway's is usually self-signed), checking the handshake's
/// signatures as usual.
#[derive(Debug)]
struct PinVerifier {
    pin: String,
    provider: Arc<rustls::crypto::CryptoProvider>,
}

impl rustls::client::danger::ServerCertVerifier for PinVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &rustls::pki_types::CertificateDer<'_>,
        _intermediates: &[rustls::pki_types::CertificateDer<'_>],
        _server_name: &rustls::pki_types::ServerName<'_>,
        _ocsp: &[u8],
        _now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        match crate::transport::tls::pin_sha256(end_entity) {
            Ok(p) if p == self.pin => Ok(rustls::client::danger::ServerCertVerified::assertion()),
            Ok(p) => Err(rustls::Error::General(format!(
                "the feed's certificate is {p}, not the pinned {}",
                self.pin
            ))),
            Err(e) => Err(rustls::Error::General(e.to_string())),
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::identity::{Op, sse_event};

    fn m(id: u64, user: &str, last: u8) -> Mapping {
        Mapping {
            session_id: id,
            user: user.into(),
            group: "staff".into(),
            groups: vec![],
            policy: None,
            address: std::net::Ipv4Addr::new(198, 19, 0, last),
            address6: None,
            since: "2026-12-04T23:00:00Z".into(),
        }
    }

    fn feed(m: &Mappings, text: &str) {
        let mut r = SseReader::default();
        for ev in text.lines().filter_map(|l| r.line(l)) {
            m.apply(&ev).unwrap();
        }
    }

    fn pos(seq: u64) -> Position {
        Position {
            epoch: "ab".into(),
            seq,
        }
    }

    #[test]
    fn a_snapshot_then_changes_keep_the_map_and_the_position() {
        let maps = Mappings::default();
        assert!(!maps.wait_synced(Duration::ZERO));
        let snap = Snapshot {
            epoch: "ab".into(),
            seq: 2,
            mappings: vec![m(1, "alice", 10), m(2, "bob", 11)],
        };
        let change = |seq, op, mapping| Change { seq, op, mapping };
        let text = [
            sse_event(&pos(2), "snapshot", &snap),
            ": keepalive\n\n".into(),
            sse_event(&pos(3), "remove", &change(3, Op::Remove, m(1, "alice", 10))),
            sse_event(&pos(4), "add", &change(4, Op::Add, m(3, "carol", 10))),
            sse_event(&pos(5), "something-new", &"ignored"),
        ]
        .concat();
        feed(&maps, &text);
        let user = |last| {
            maps.lookup(IpAddr::from([198, 19, 0, last]))
                .map(|m| m.user)
        };
        assert_eq!(user(10).as_deref(), Some("carol"));
        assert_eq!(user(11).as_deref(), Some("bob"));
        assert_eq!(user(12), None);
        assert_eq!(maps.position().as_deref(), Some("ab-4"));
        assert!(maps.wait_synced(Duration::ZERO));
        // A new snapshot replaces everything.
        let empty = Snapshot {
            epoch: "cd".into(),
            seq: 0,
            mappings: vec![],
        };
        feed(&maps, &sse_event(&pos(0), "snapshot", &empty));
        assert_eq!(user(11), None);
    }

    #[test]
    fn squid_lines_with_and_without_channels() {
        let maps = Mappings::default();
        let w = Duration::ZERO;
        assert_eq!(
            squid_answer(&maps, "198.19.0.10", w),
            "ERR message=\"identity feed unavailable\""
        );
        let snap = Snapshot {
            epoch: "ab".into(),
            seq: 1,
            mappings: vec![m(1, "alice", 10)],
        };
        feed(&maps, &sse_event(&pos(1), "snapshot", &snap));
        assert_eq!(
            squid_answer(&maps, "198.19.0.10", w),
            "OK user=alice group=staff"
        );
        assert_eq!(
            squid_answer(&maps, "7 198.19.0.10", w),
            "7 OK user=alice group=staff"
        );
        assert_eq!(squid_answer(&maps, "8 198.19.0.11", w), "8 ERR");
        let mut dir = m(2, "bob", 12);
        dir.groups = vec!["vpn-eng".into(), "odd \"one\"".into()];
        let add = Change {
            seq: 2,
            op: Op::Add,
            mapping: dir,
        };
        feed(&maps, &sse_event(&pos(2), "add", &add));
        assert_eq!(
            squid_answer(&maps, "198.19.0.12", w),
            "OK user=bob group=staff groups=\"vpn-eng,odd \\\"one\\\"\""
        );
        assert_eq!(squid_answer(&maps, "198.19.0.11", w), "ERR");
        assert_eq!(
            squid_answer(&maps, "9 -", w),
            "9 BH message=\"not a client address\""
        );
        assert_eq!(
            squid_answer(&maps, "", w),
            "BH message=\"not a client address\""
        );
    }

    #[test]
    fn bad_urls_and_pins_are_named() {
        let e = |u: &str, p: &str| {
            FeedClient::new(u, "s".into(), p.into())
                .err()
                .unwrap()
                .to_string()
        };
        assert!(e("http://198.18.2.1:9443", "pin-sha256:x").contains("not an https://"));
        assert!(e("https://feed:9443", "pin-sha256:x").contains("not ADDRESS:PORT"));
        assert!(e("https://198.18.2.1:9443", "sha1:x").contains("pin-sha256"));
        let c = FeedClient::new(
            "https://198.18.2.1:9443/",
            "s".into(),
            "pin-sha256:x".into(),
        )
        .unwrap();
        assert_eq!(c.authority, "198.18.2.1:9443");
    }
}
